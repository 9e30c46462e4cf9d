//! Compiles every `kernels/*.cu` with NVRTC and embeds the result.
//!
//! What gets embedded, per kernel family (one `.cu` file):
//! - the preprocessed source (local `#include "x.cuh"` lines inlined), always: the CUDA backend
//!   compiles it at run time when the build had no NVRTC;
//! - PTX for `compute_80` (portable: the driver JIT-compiles it for any sm_80+ GPU);
//! - a CUBIN for `sm_90` (H100/H200 load it without JIT).
//!
//! NVRTC is looked up, in order, at: `$DFPO_NVRTC` (path of libnvrtc.so), `$DFPO_CUDA_TOOLS`
//! (a folder laid out like the PyPI wheels, `nvidia/cu13/lib`), the project's `.cuda-tools/`
//! (made by `tools/setup-cuda-tools`), `$CUDA_HOME`/`$CUDA_PATH`, and `/usr/local/cuda`.
//! Only NVRTC 13.0 or older is used: PTX from a newer NVRTC does not load on a 13.0 driver.
//!
//! A kernel that fails to compile fails the build and prints NVRTC's log. Without NVRTC the build
//! succeeds, says so once, and the kernels are compiled at run time instead; with
//! `DFPO_REQUIRE_NVRTC=1` a missing NVRTC fails the build (the test command sets it).

use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const PTX_ARCH: &str = "compute_80";
const CUBIN_ARCH: &str = "sm_90";

type Prog = *mut std::ffi::c_void;

struct Nvrtc {
    _builtins: Option<libloading::Library>,
    lib: libloading::Library,
    path: PathBuf,
    version: (i32, i32),
}

impl Nvrtc {
    fn open(path: &Path) -> Result<Self, String> {
        // NVRTC dlopens its builtins library by soname; loading it first by full path makes
        // that lookup succeed without LD_LIBRARY_PATH.
        let dir = path.parent().unwrap_or(Path::new("."));
        let builtins = std::fs::read_dir(dir).ok().and_then(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .to_string();
                    n.starts_with("libnvrtc-builtins.so") && !n.contains(".alt.")
                })
                .find_map(|p| unsafe { libloading::Library::new(&p) }.ok())
        });
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        let mut nv = Nvrtc {
            _builtins: builtins,
            lib,
            path: path.to_path_buf(),
            version: (0, 0),
        };
        let (mut major, mut minor) = (0, 0);
        unsafe {
            let f: libloading::Symbol<unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int> =
                nv.lib.get(b"nvrtcVersion").map_err(|e| e.to_string())?;
            if f(&mut major, &mut minor) != 0 {
                return Err("nvrtcVersion failed".into());
            }
        }
        nv.version = (major, minor);
        Ok(nv)
    }

    fn sym<T>(&self, name: &[u8]) -> libloading::Symbol<'_, T> {
        unsafe { self.lib.get(name) }.unwrap_or_else(|e| {
            panic!(
                "{} lacks {}: {e}",
                self.path.display(),
                String::from_utf8_lossy(name)
            )
        })
    }

    /// The include folder next to NVRTC's lib folder (wheel: nvidia/cu13/include; toolkit:
    /// lib64/../include), when it holds cuda_bf16.h.
    fn include_dir(&self) -> Option<PathBuf> {
        let inc = self.path.parent()?.parent()?.join("include");
        inc.join("cuda_bf16.h").exists().then_some(inc)
    }

    /// Compiles `src` for `arch`; returns PTX text (for `compute_*`) or CUBIN bytes (for `sm_*`).
    fn compile(&self, name: &str, src: &str, arch: &str) -> Result<Vec<u8>, String> {
        type Create = unsafe extern "C" fn(
            *mut Prog,
            *const c_char,
            *const c_char,
            c_int,
            *const *const c_char,
            *const *const c_char,
        ) -> c_int;
        type Compile = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> c_int;
        type Size = unsafe extern "C" fn(Prog, *mut usize) -> c_int;
        type Get = unsafe extern "C" fn(Prog, *mut c_char) -> c_int;
        type Destroy = unsafe extern "C" fn(*mut Prog) -> c_int;
        let c_src = CString::new(src).map_err(|e| e.to_string())?;
        let c_name = CString::new(name).unwrap();
        let mut opts: Vec<String> = vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".into(),
            "-lineinfo".into(),
            "-DDFPO_NVRTC=1".into(),
        ];
        // The CUDA headers (cuda_bf16.h, mma.h) of the same toolkit: lib/../include.
        if let Some(inc) = self.include_dir() {
            opts.push(format!("--include-path={}", inc.display()));
        }
        let opts: Vec<CString> = opts.into_iter().map(|s| CString::new(s).unwrap()).collect();
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|s| s.as_ptr()).collect();
        unsafe {
            let mut prog: Prog = std::ptr::null_mut();
            let rc = self.sym::<Create>(b"nvrtcCreateProgram")(
                &mut prog,
                c_src.as_ptr(),
                c_name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            if rc != 0 {
                return Err(format!("nvrtcCreateProgram failed with code {rc}"));
            }
            let rc = self.sym::<Compile>(b"nvrtcCompileProgram")(
                prog,
                opt_ptrs.len() as c_int,
                opt_ptrs.as_ptr(),
            );
            let mut log_len = 0usize;
            self.sym::<Size>(b"nvrtcGetProgramLogSize")(prog, &mut log_len);
            let mut log = vec![0u8; log_len.max(1)];
            self.sym::<Get>(b"nvrtcGetProgramLog")(prog, log.as_mut_ptr() as *mut c_char);
            let log = CStr::from_bytes_until_nul(&log)
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if rc != 0 {
                self.sym::<Destroy>(b"nvrtcDestroyProgram")(&mut prog);
                return Err(format!("NVRTC failed to compile {name} for {arch}:\n{log}"));
            }
            let (size_fn, get_fn): (&[u8], &[u8]) = if arch.starts_with("sm_") {
                (b"nvrtcGetCUBINSize", b"nvrtcGetCUBIN")
            } else {
                (b"nvrtcGetPTXSize", b"nvrtcGetPTX")
            };
            let mut n = 0usize;
            self.sym::<Size>(size_fn)(prog, &mut n);
            let mut out = vec![0u8; n];
            self.sym::<Get>(get_fn)(prog, out.as_mut_ptr() as *mut c_char);
            self.sym::<Destroy>(b"nvrtcDestroyProgram")(&mut prog);
            if !arch.starts_with("sm_") {
                // PTX comes NUL-terminated.
                while out.last() == Some(&0) {
                    out.pop();
                }
            }
            Ok(out)
        }
    }
}

fn nvrtc_candidates(manifest: &Path) -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Ok(p) = std::env::var("DFPO_NVRTC") {
        c.push(PathBuf::from(p));
    }
    let wheel_lib = |root: PathBuf| root.join("nvidia/cu13/lib/libnvrtc.so.13");
    if let Ok(p) = std::env::var("DFPO_CUDA_TOOLS") {
        c.push(wheel_lib(PathBuf::from(p)));
    }
    c.push(wheel_lib(manifest.join(".cuda-tools")));
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = std::env::var(var) {
            c.push(PathBuf::from(&p).join("lib64/libnvrtc.so"));
            c.push(PathBuf::from(&p).join("lib64/libnvrtc.so.13"));
        }
    }
    c.push(PathBuf::from("/usr/local/cuda/lib64/libnvrtc.so"));
    c
}

fn find_nvrtc(manifest: &Path) -> Result<Nvrtc, String> {
    let mut tried = Vec::new();
    for p in nvrtc_candidates(manifest) {
        if !p.exists() {
            tried.push(format!("{} (absent)", p.display()));
            continue;
        }
        match Nvrtc::open(&p) {
            Ok(nv) if nv.version.0 < 13 || nv.version == (13, 0) => return Ok(nv),
            Ok(nv) => tried.push(format!(
                "{} (NVRTC {}.{}: newer than the 13.0 driver, skipped)",
                p.display(),
                nv.version.0,
                nv.version.1
            )),
            Err(e) => tried.push(e),
        }
    }
    Err(tried.join("; "))
}

/// Inlines `#include "name"` lines that refer to files in `kernels/`, so the embedded source is
/// self-contained (the run-time compile has no include path to the project).
fn preprocess(dir: &Path, file: &Path, depth: usize) -> String {
    let text = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("#include \"") {
            let inc = rest.trim_end_matches('"');
            let path = dir.join(inc);
            if path.exists() && depth < 8 {
                let _ = writeln!(out, "// ---- begin {inc} ----");
                out.push_str(&preprocess(dir, &path, depth + 1));
                let _ = writeln!(out, "// ---- end {inc} ----");
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let kdir = manifest.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for v in [
        "DFPO_NVRTC",
        "DFPO_CUDA_TOOLS",
        "DFPO_REQUIRE_NVRTC",
        "CUDA_HOME",
        "CUDA_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    let mut files: Vec<PathBuf> = std::fs::read_dir(&kdir)
        .expect("kernels/ folder missing")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    for f in std::fs::read_dir(&kdir).unwrap().flatten() {
        println!("cargo:rerun-if-changed={}", f.path().display());
    }

    let nvrtc = find_nvrtc(&manifest);
    // Watch the NVRTC that was used. Without one, watch nothing that is absent (cargo reruns a
    // build script whose watched path is missing on EVERY build, and then recompiles the crate):
    // tools/setup-cuda-tools touches kernels/ after installing, which reruns this script.
    match &nvrtc {
        Ok(nv) => println!("cargo:rerun-if-changed={}", nv.path.display()),
        Err(_) => {
            let lib = manifest.join(".cuda-tools/nvidia/cu13/lib");
            if lib.exists() {
                println!("cargo:rerun-if-changed={}", lib.display());
            }
        }
    }
    let require = std::env::var("DFPO_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    let nvrtc = match nvrtc {
        Ok(nv) => Some(nv),
        Err(tried) if require => panic!(
            "DFPO_REQUIRE_NVRTC=1 but no usable NVRTC was found (run tools/setup-cuda-tools). Tried: {tried}"
        ),
        Err(_) => {
            println!(
                "cargo:warning=dfpo: NVRTC not found; kernels will be compiled at run time on a GPU machine (run tools/setup-cuda-tools to compile them now)"
            );
            None
        }
    };

    let art_dir = out_dir.join("kernels");
    std::fs::create_dir_all(&art_dir).unwrap();
    let mut gen = String::new();
    let version = nvrtc
        .as_ref()
        .map(|n| format!("{}.{}", n.version.0, n.version.1));
    let _ = writeln!(
        gen,
        "/// NVRTC version used at build time; `None` when the build had no NVRTC."
    );
    let _ = writeln!(
        gen,
        "pub const NVRTC_BUILD_VERSION: Option<&str> = {version:?};"
    );
    let _ = writeln!(gen, "/// Virtual architecture of the embedded PTX.");
    let _ = writeln!(gen, "pub const PTX_ARCH: &str = {PTX_ARCH:?};");
    let _ = writeln!(gen, "/// Real architecture of the embedded CUBIN.");
    let _ = writeln!(gen, "pub const CUBIN_ARCH: &str = {CUBIN_ARCH:?};");
    let _ = writeln!(
        gen,
        "/// Every kernel family in `kernels/`, in file-name order."
    );
    let _ = writeln!(gen, "pub const KERNELS: &[EmbeddedKernel] = &[");
    let mut failures = Vec::new();
    for f in &files {
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let src = preprocess(&kdir, f, 0);
        let src_path = art_dir.join(format!("{stem}.cu"));
        std::fs::write(&src_path, &src).unwrap();
        let (mut ptx_expr, mut cubin_expr) = ("None".to_string(), "None".to_string());
        if let Some(nv) = &nvrtc {
            let name = format!("{stem}.cu");
            match nv.compile(&name, &src, PTX_ARCH) {
                Ok(ptx) => {
                    let p = art_dir.join(format!("{stem}.{PTX_ARCH}.ptx"));
                    std::fs::write(&p, ptx).unwrap();
                    ptx_expr = format!("Some(include_str!({:?}))", p.display().to_string());
                }
                Err(log) => failures.push(log),
            }
            match nv.compile(&name, &src, CUBIN_ARCH) {
                Ok(cubin) => {
                    let p = art_dir.join(format!("{stem}.{CUBIN_ARCH}.cubin"));
                    std::fs::write(&p, cubin).unwrap();
                    cubin_expr = format!("Some(include_bytes!({:?}))", p.display().to_string());
                }
                Err(log) => failures.push(log),
            }
        }
        let _ = writeln!(
            gen,
            "    EmbeddedKernel {{ name: {stem:?}, source: include_str!({:?}), ptx: {ptx_expr}, cubin: {cubin_expr} }},",
            src_path.display().to_string()
        );
    }
    let _ = writeln!(gen, "];");
    if !failures.is_empty() {
        // Print the whole log: cargo shows a build script's stderr when it fails.
        for f in &failures {
            eprintln!("{f}");
        }
        panic!(
            "{} kernel compile(s) failed; NVRTC's log is above",
            failures.len()
        );
    }
    std::fs::write(out_dir.join("kernels_embedded.rs"), gen).unwrap();
}
