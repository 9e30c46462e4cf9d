//! Kernel resource check: assembles every embedded kernel's PTX with ptxas for sm_90 and prints,
//! per kernel, registers, shared memory and spills. Any spill or ptxas error fails.
//!
//! ptxas is looked up at `$DFPO_PTXAS`, `$DFPO_CUDA_TOOLS/nvidia/cu13/bin/ptxas`, the project's
//! `.cuda-tools/`, `$CUDA_HOME/bin`, then `PATH`. Without it the check is skipped visibly, and
//! fails under `DFPO_REQUIRE_PTXAS=1` (the test command sets it).

use std::path::PathBuf;
use std::process::Command;

use dfpo::device::embedded;

fn find_ptxas() -> Option<PathBuf> {
    let mut c: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("DFPO_PTXAS") {
        c.push(p.into());
    }
    if let Ok(p) = std::env::var("DFPO_CUDA_TOOLS") {
        c.push(PathBuf::from(p).join("nvidia/cu13/bin/ptxas"));
    }
    c.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cuda-tools/nvidia/cu13/bin/ptxas"));
    if let Ok(p) = std::env::var("CUDA_HOME") {
        c.push(PathBuf::from(p).join("bin/ptxas"));
    }
    c.push("/usr/local/cuda/bin/ptxas".into());
    c.into_iter().find(|p| p.exists()).or_else(|| {
        Command::new("ptxas")
            .arg("--version")
            .output()
            .ok()
            .map(|_| PathBuf::from("ptxas"))
    })
}

#[derive(Debug, Default)]
struct Usage {
    name: String,
    registers: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

fn num_before(s: &str, key: &str) -> Option<u32> {
    let i = s.find(key)?;
    s[..i].split_whitespace().last()?.parse().ok()
}

fn parse(log: &str) -> Vec<Usage> {
    let mut out: Vec<Usage> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(Usage {
                name,
                ..Default::default()
            });
        } else if let Some(u) = out.last_mut() {
            if line.contains("bytes stack frame") {
                u.stack = num_before(line, "bytes stack frame").unwrap_or(0);
                u.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                u.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                u.registers = num_before(line, "registers").unwrap_or(0);
                u.smem = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

#[test]
fn every_kernel_assembles_for_sm90_without_spills() {
    let require = std::env::var("DFPO_REQUIRE_PTXAS").is_ok_and(|v| v == "1");
    let Some(nvrtc) = embedded::NVRTC_BUILD_VERSION else {
        assert!(
            !require,
            "DFPO_REQUIRE_PTXAS=1 but this build had no NVRTC (no PTX embedded)"
        );
        eprintln!("SKIPPED kernel resource check: this build had no NVRTC");
        return;
    };
    let Some(ptxas) = find_ptxas() else {
        assert!(
            !require,
            "DFPO_REQUIRE_PTXAS=1 but ptxas was not found (run tools/setup-cuda-tools)"
        );
        eprintln!("SKIPPED kernel resource check: ptxas not found (run tools/setup-cuda-tools)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("dfpo-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut failures = Vec::new();
    let mut total = 0;
    assert!(!embedded::KERNELS.is_empty(), "no kernel families embedded");
    for k in embedded::KERNELS {
        let ptx = k
            .ptx
            .unwrap_or_else(|| panic!("kernels/{}.cu has no embedded PTX", k.name));
        assert!(
            k.cubin.is_some(),
            "kernels/{}.cu has no embedded sm_90 CUBIN",
            k.name
        );
        let path = dir.join(format!("{}.ptx", k.name));
        std::fs::write(&path, ptx).unwrap();
        let out = Command::new(&ptxas)
            .args(["-v", "--gpu-name", "sm_90", "-o", "/dev/null"])
            .arg(&path)
            .output()
            .expect("running ptxas");
        let log = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            failures.push(format!("ptxas failed on kernels/{}.cu:\n{log}", k.name));
            continue;
        }
        let usages = parse(&log);
        println!(
            "kernels/{}.cu: compiled by NVRTC {nvrtc} ({} PTX + {} CUBIN), assembled by ptxas for sm_90: {} kernels",
            k.name,
            embedded::PTX_ARCH,
            embedded::CUBIN_ARCH,
            usages.len()
        );
        assert!(
            !usages.is_empty(),
            "kernels/{}.cu: ptxas reported no entry function",
            k.name
        );
        for u in &usages {
            total += 1;
            println!(
                "  {:<36} {:>3} registers  {:>6} B smem  {:>4} B stack  spills {} B store / {} B load",
                u.name, u.registers, u.smem, u.stack, u.spill_stores, u.spill_loads
            );
            if u.spill_stores > 0 || u.spill_loads > 0 {
                failures.push(format!("{}.cu: {} spills registers", k.name, u.name));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "kernel resource check: {total} kernels, {} failures",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
