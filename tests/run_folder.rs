//! The run folder rules (issue 9): a run never deletes or overwrites what it did not write,
//! never mixes with another run (fingerprint, lock), cleans what killed runs left, and resumes
//! only its own configuration.

use std::path::{Path, PathBuf};

use dfpo::task::arith;

mod common;
use dfpo::train::config::TrainConfig;
use dfpo::train::trainer::Trainer;

fn tiny_model() -> PathBuf {
    common::tiny_model("dfpo-run-folder", 5)
}

fn out_dir(tag: &str) -> PathBuf {
    common::out_dir("dfpo-run-folder", tag)
}

/// A fast configuration on the tiny model into `out`, with extra `--set`s.
fn cfg(out: &Path, extra: &[&str]) -> TrainConfig {
    let mut sets = common::small_run_sets(&tiny_model(), out);
    sets.extend(["run.steps=2".into(), "run.save_every=1".into()]);
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &sets).unwrap()
}

fn run(out: &Path, extra: &[&str]) -> dfpo::Result<dfpo::train::trainer::Summary> {
    Trainer::new(cfg(out, extra))?.run()
}

/// Every file under `dir` (relative path -> bytes).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_path_buf();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_new_run_refuses_a_folder_holding_another_run_and_changes_nothing() {
    let out = out_dir("other-run");
    run(&out, &[]).unwrap();
    let before = snapshot(&out);
    let e = run(&out, &["run.seed=2"]).expect_err("another run's folder must be refused");
    let msg = e.to_string();
    assert!(
        msg.contains("run.seed"),
        "the error names the difference: {msg}"
    );
    assert!(
        msg.contains("run.out_dir") && msg.contains("run.overwrite"),
        "the error names the options: {msg}"
    );
    assert_eq!(before, snapshot(&out), "a refused run changed the folder");
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn resume_of_another_run_is_refused_naming_each_difference() {
    let out = out_dir("resume-other");
    run(&out, &["run.steps=2"]).unwrap();
    let before = snapshot(&out);
    let e = run(
        &out,
        &[
            "run.resume=true",
            "run.seed=3",
            "rollout.prompts_per_step=1",
            "run.steps=4",
        ],
    )
    .expect_err("resuming another configuration must be refused");
    let msg = e.to_string();
    for key in ["run.seed", "rollout.prompts_per_step"] {
        assert!(msg.contains(key), "{key} not named: {msg}");
    }
    assert!(!msg.contains("run.steps"), "run.steps may change: {msg}");
    assert_eq!(before, snapshot(&out));
    // A model of other content under the same path is another run too.
    let model2 = out_dir("resume-other-model");
    arith::write_random_model(&model2, 6).unwrap();
    let other = format!("model.policy={}", model2.display());
    let e = run(&out, &["run.resume=true", &other]).expect_err("another policy");
    assert!(e.to_string().contains("model.policy"), "{e}");
    // run.steps below the checkpoint's step.
    let e = run(&out, &["run.resume=true", "run.steps=1"]).expect_err("steps < checkpoint");
    assert!(e.to_string().contains("run.steps"), "{e}");
    assert_eq!(before, snapshot(&out));
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_dir_all(model2);
}

#[test]
fn resume_true_without_a_checkpoint_says_so_and_auto_starts_fresh() {
    let out = out_dir("resume-none");
    let e = run(&out, &["run.resume=true"]).expect_err("nothing to resume");
    assert!(e.to_string().contains("no checkpoint"), "{e}");
    assert!(!out.exists(), "a refused start leaves no folder behind");
    let s = run(&out, &["run.resume=auto"]).unwrap();
    assert_eq!(s.steps, 2);
    // auto on the same configuration continues it (here: extends it by two steps).
    let s = run(&out, &["run.resume=auto", "run.steps=4"]).unwrap();
    assert_eq!(s.steps, 4);
    let m = dfpo::train::metrics::read_metrics(&out.join("metrics.jsonl")).unwrap();
    let steps: Vec<f64> = m.iter().map(|l| l["step"]).collect();
    assert_eq!(steps, vec![1.0, 2.0, 3.0, 4.0]);
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn a_folder_with_user_files_is_refused_and_overwrite_keeps_them() {
    let out = out_dir("user-files");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let e = run(&out, &[]).expect_err("a non-empty folder that is not a run");
    assert!(e.to_string().contains("notes.txt"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    // overwrite: the run goes ahead, the user's file stays.
    run(&out, &["run.overwrite=true"]).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    // A second run with overwrite replaces only what dfpo-train wrote.
    run(&out, &["run.overwrite=true", "run.seed=2", "run.steps=1"]).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    let ck = dfpo::train::trainer::list_checkpoints(&out.join("checkpoints")).unwrap();
    assert_eq!(ck.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1]);
    // A file named like one the run writes, in a folder no run marked, is never replaced.
    let out2 = out_dir("user-metrics");
    std::fs::create_dir_all(&out2).unwrap();
    std::fs::write(out2.join("metrics.jsonl"), "user data").unwrap();
    let e = run(&out2, &["run.overwrite=true"]).expect_err("foreign metrics.jsonl");
    assert!(e.to_string().contains("metrics.jsonl"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out2.join("metrics.jsonl")).unwrap(),
        "user data"
    );
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_dir_all(out2);
}

#[test]
fn two_runs_into_one_folder_the_second_is_refused() {
    let out = out_dir("locked");
    // Run A in a thread, long enough to be caught running.
    let a_cfg = cfg(&out, &["run.steps=30", "run.save_every=0"]);
    let a = std::thread::spawn(move || Trainer::new(a_cfg).unwrap().run());
    let metrics = out.join("metrics.jsonl");
    while !metrics.exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let e = run(&out, &["run.seed=2"]).expect_err("a folder in use by another run");
    assert!(e.to_string().contains("in use"), "{e}");
    let e = run(
        &out,
        &["run.steps=30", "run.save_every=0", "run.resume=auto"],
    )
    .expect_err("the same configuration is refused too while A runs");
    assert!(e.to_string().contains("in use"), "{e}");
    a.join().unwrap().unwrap();
    assert!(
        !out.join(".lock").exists(),
        "the lock is removed at the end"
    );
    // A lock file left by a dead process does not block.
    std::fs::write(out.join(".lock"), "999999999 somehost\n").unwrap();
    run(
        &out,
        &["run.steps=30", "run.save_every=0", "run.resume=auto"],
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn stray_temporary_folders_of_killed_runs_are_removed_at_start() {
    let out = out_dir("stray");
    run(&out, &["run.steps=1"]).unwrap();
    let ck = out.join("checkpoints");
    // What a run killed mid-save, mid-prune or mid-export leaves (pid 999999999: not alive).
    for junk in [
        ck.join(".step-000002.tmp-999999999"),
        ck.join(".step-000000.del-999999999"),
        ck.join("step-000000"), // half-pruned: no meta.json
        out.join("final.tmp-999999999"),
    ] {
        std::fs::create_dir_all(&junk).unwrap();
        std::fs::write(junk.join("state.safetensors"), vec![0u8; 1000]).unwrap();
    }
    // A prune killed before it removed meta.json.
    std::fs::write(ck.join(".step-000000.del-999999999/meta.json"), "{}").unwrap();
    std::fs::write(out.join(".summary.json.tmp.999999999.0"), "x").unwrap();
    run(&out, &["run.steps=2", "run.resume=auto"]).unwrap();
    let names: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .chain(std::fs::read_dir(&out).unwrap())
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for n in &names {
        assert!(
            !n.contains("tmp") && !n.contains(".del-") && n != "step-000000",
            "stray entry {n} left in {names:?}"
        );
    }
    let _ = std::fs::remove_dir_all(out);
}
