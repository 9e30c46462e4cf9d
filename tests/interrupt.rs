//! Interrupted runs (issue 9): SIGINT/SIGTERM finish the current step, write a checkpoint and
//! exit with 128 + the signal; a run killed (SIGKILL) at random moments and started again each
//! time ends with the uninterrupted run's metrics and weights, and no stray file or folder.
//!
//! `killed_25_times_...` is the full check (25 kills; about 15 s on the 2-core machine,
//! so it runs in the suite); `killed_3_times_...` is its fast variant.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::Rng;

fn tiny_model() -> PathBuf {
    common::tiny_model("dfpo-interrupt", 9)
}

fn out_dir(tag: &str) -> PathBuf {
    common::out_dir("dfpo-interrupt", tag)
}

/// `dfpo-train train` on the tiny model into `out`.
fn train(out: &Path, steps: usize, save_every: usize) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dfpo-train"));
    c.arg("train");
    let mut sets = common::small_run_sets(&tiny_model(), out);
    sets.extend([
        format!("run.steps={steps}"),
        format!("run.save_every={save_every}"),
        "run.keep_checkpoints=2".into(),
        "kl.coef=0.01".into(),
    ]);
    for s in sets {
        c.arg("--set").arg(s);
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn metrics_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

/// The metrics without wall-clock values.
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.retain(|k, _| !k.starts_with("timing/") && !k.starts_with("perf/"));
            v
        })
        .collect()
}

fn summary_after(out: &Path) -> serde_json::Value {
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    serde_json::json!({"before": s["before"], "after": s["after"], "steps": s["steps"]})
}

/// Every entry under `dir` that no finished run should leave: temporaries, trash, the lock.
fn strays(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(".tmp") || name.contains(".del-") || name == ".lock" {
                out.push(e.path().display().to_string());
            }
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

fn wait(child: Child) -> (i32, String) {
    let o = child.wait_with_output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, sig) };
}

fn uninterrupted(tag: &str, steps: usize, save_every: usize) -> (PathBuf, f64) {
    let out = out_dir(tag);
    let t0 = Instant::now();
    let (code, err) = wait(train(&out, steps, save_every).spawn().unwrap());
    assert_eq!(code, 0, "{err}");
    (out, t0.elapsed().as_secs_f64())
}

fn assert_same_run(a: &Path, b: &Path) {
    assert_eq!(metrics(a), metrics(b), "the metrics differ");
    let samples = |d: &Path| std::fs::read_to_string(d.join("samples.jsonl")).unwrap();
    assert_eq!(samples(a), samples(b), "samples.jsonl differs");
    assert_eq!(summary_after(a), summary_after(b));
    assert!(
        std::fs::read(a.join("final/model.safetensors")).unwrap()
            == std::fs::read(b.join("final/model.safetensors")).unwrap(),
        "the final weights differ"
    );
    assert_eq!(strays(b), Vec::<String>::new(), "stray entries");
}

#[test]
fn sigint_and_sigterm_finish_the_step_save_and_exit_nonzero() {
    let steps = 40;
    let (a, _) = uninterrupted("sig-a", steps, 0);
    for (sig, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let b = out_dir(&format!("sig-{sig}"));
        let child = train(&b, steps, 0).spawn().unwrap();
        while metrics_lines(&b) < 2 {
            std::thread::sleep(Duration::from_millis(5));
        }
        signal(&child, sig);
        let (got, err) = wait(child);
        assert_eq!(got, code, "exit status after signal {sig}: {err}");
        let done = metrics_lines(&b);
        assert!(done < steps, "the run went on to the end: {err}");
        // save_every = 0: the only checkpoint is the one the signal wrote, at the last step.
        let ck = dfpo::train::trainer::list_checkpoints(&b.join("checkpoints")).unwrap();
        assert_eq!(
            ck.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![done as u64],
            "{err}"
        );
        assert!(
            err.contains("received") && err.contains(&format!("after step {done}")),
            "{err}"
        );
        assert!(!b.join(".lock").exists());
        // The same command continues it to the uninterrupted result.
        let (got, err) = wait(train(&b, steps, 0).spawn().unwrap());
        assert_eq!(got, 0, "{err}");
        assert!(err.contains(&format!("resumed from step {done}")), "{err}");
        assert_same_run(&a, &b);
        let _ = std::fs::remove_dir_all(&b);
    }
    let _ = std::fs::remove_dir_all(&a);
}

/// Kills (SIGKILL) a run `kills` times at random moments, restarting it each time, then lets it
/// finish; it must equal the uninterrupted run with no stray entry left. A quarter of the kills
/// land anywhere in the first 0.3 s (start-up: folder checks, model load, first eval); the rest
/// wait until the run has logged a new step, then strike within the next two steps' time (in a
/// step, its checkpoint write, a prune or the final export). A start that finishes before its
/// kill is checked the same way, and the run starts over.
fn killed_runs_resume_exactly(tag: &str, kills: usize, steps: usize) {
    let (a, t_full) = uninterrupted(&format!("{tag}-a"), steps, 1);
    let t_step = t_full / steps as f64;
    let b = out_dir(&format!("{tag}-b"));
    let mut rng = Rng::fresh(tag);
    let (mut killed, mut mid_run, mut starts) = (0, 0, 0);
    while killed < kills {
        starts += 1;
        assert!(
            starts < 20 * kills,
            "the run never got far enough to be killed"
        );
        let before = metrics_lines(&b);
        let mut child = train(&b, steps, 1).spawn().unwrap();
        let in_run = rng.uniform() < 0.75;
        if in_run {
            let t0 = Instant::now();
            while metrics_lines(&b) <= before
                && child.try_wait().unwrap().is_none()
                && t0.elapsed() < Duration::from_secs(30)
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_secs_f64(rng.range(0.0, 2.0 * t_step)));
        } else {
            std::thread::sleep(Duration::from_secs_f64(rng.range(0.0, 0.3)));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            let _ = child.wait();
            killed += 1;
            mid_run += usize::from(in_run);
        } else {
            let (code, err) = wait(child);
            assert_eq!(code, 0, "{err}");
            assert_same_run(&a, &b);
            eprintln!("finished after {killed} kills; starting over");
            let _ = std::fs::remove_dir_all(&b);
        }
    }
    eprintln!(
        "{killed} kills ({mid_run} after a new step) in {starts} starts (uninterrupted: \
         {t_full:.2} s); finishing"
    );
    let (code, err) = wait(train(&b, steps, 1).spawn().unwrap());
    assert_eq!(code, 0, "{err}");
    assert_same_run(&a, &b);
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

#[test]
fn killed_3_times_at_random_resumes_to_the_uninterrupted_run() {
    killed_runs_resume_exactly("kill3", 3, 12);
}

#[test]
fn killed_25_times_at_random_resumes_to_the_uninterrupted_run() {
    killed_runs_resume_exactly("kill25", 25, 80);
}
