//! The `dfpo-train` binary's error paths: a bad configuration, a missing model folder or a
//! bad dataset line ends with a message naming the key/file/line and a non-zero exit status,
//! and leaves no run folder behind.

use std::path::PathBuf;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dfpo-train"))
}

fn out_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dfpo-cli-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Runs `train` with these `--set`s; returns (exit code, stderr).
fn train(sets: &[String]) -> (i32, String) {
    let mut c = bin();
    c.arg("train");
    for s in sets {
        c.arg("--set").arg(s);
    }
    let o = c.output().expect("run dfpo-train");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn bad_inputs_fail_with_a_clear_message_and_write_nothing() {
    let out = out_dir("bad");
    let od = format!("run.out_dir={}", out.display());
    // Unknown key (with a suggestion), a bad value, a missing model folder.
    let (code, err) = train(&[od.clone(), "critic.kk=3".into()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("critic.kk") && err.contains("critic.k"),
        "{err}"
    );
    let (code, err) = train(&[od.clone(), "reward.flip_prob=1.5".into()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("reward.flip_prob"), "{err}");
    let (code, err) = train(&[od.clone(), "model.policy=/no/such/model".into()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/no/such/model"), "{err}");
    // A dataset with a bad second line.
    let data = std::env::temp_dir().join(format!("dfpo-cli-{}-data.jsonl", std::process::id()));
    std::fs::write(
        &data,
        "{\"prompt\":\"1+1=\",\"answer\":\"2\"}\n{\"prompt\":\"2+2=\"}\n",
    )
    .unwrap();
    let (code, err) = train(&[
        od.clone(),
        "data.task=jsonl".into(),
        format!("data.train_file={}", data.display()),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("data.jsonl") && err.contains("line 2") && err.contains("answer"),
        "{err}"
    );
    assert!(
        !out.exists(),
        "a failed start must not create {}",
        out.display()
    );
    let _ = std::fs::remove_file(data);
}

#[test]
fn config_lists_every_key() {
    let o = bin().arg("config").output().unwrap();
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for key in [
        "algo.name",
        "reward.flip_prob",
        "critic.w_dcfm",
        "run.on_nonfinite",
    ] {
        assert!(text.contains(key), "{key} missing from `dfpo-train config`");
    }
}

#[test]
fn a_copied_binary_runs_the_builtin_model_without_the_source_tree() {
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_dfpo-train"));
    let bytes = std::fs::read(exe).unwrap();
    // The binary must not name the source tree's assets folder (it would read the model there).
    let assets = dfpo::model::builtin::assets_dir();
    let needle = assets.display().to_string();
    assert!(
        !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
        "the binary names {needle}"
    );
    let dir = out_dir("copied");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("dfpo-train");
    std::fs::copy(exe, &copy).unwrap();
    let cache = dir.join("cache");
    let o = Command::new(&copy)
        .current_dir(&dir)
        .env("DFPO_CACHE_DIR", &cache)
        .args(["train", "--set", "run.steps=1", "--set", "data.eval_size=4"])
        .args([
            "--set",
            "rollout.prompts_per_step=2",
            "--set",
            "run.progress=false",
        ])
        .args(["--set", "run.device=cpu", "--set", "run.out_dir=run"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(dir.join("run/final/model.safetensors").is_file(), "{err}");
    // The model came from the embedded bytes, identical to the shipped files.
    let written: Vec<_> = std::fs::read_dir(&cache).unwrap().flatten().collect();
    assert_eq!(written.len(), 1, "{written:?}");
    for (name, bytes) in dfpo::model::builtin::FILES {
        assert_eq!(std::fs::read(written[0].path().join(name)).unwrap(), *bytes);
        assert_eq!(std::fs::read(assets.join(name)).unwrap(), *bytes, "{name}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
