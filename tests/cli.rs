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
fn config_prints_a_valid_toml_file_of_every_section() {
    let o = bin().arg("config").output().unwrap();
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    let t: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
    for (sec, key) in [
        ("algo", "name"),
        ("reward", "flip_prob"),
        ("critic", "w_dcfm"),
        ("run", "on_nonfinite"),
        ("sft", "lr"),
        ("score", "out"),
        ("export", "checkpoint"),
    ] {
        assert!(t[sec].get(key).is_some(), "{sec}.{key} missing");
    }
}

/// Runs the binary with `args`; returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let o = bin().args(args).output().expect("run dfpo-train");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn one_command_line_for_every_subcommand() {
    let dir = out_dir("one-cli");
    std::fs::create_dir_all(&dir).unwrap();
    let d = |p: &str| dir.join(p).display().to_string();
    // One TOML file for sft, train and eval; --model/--data/--out mean the same everywhere.
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        "[run]\nsteps = 2\nsave_every = 1\nprogress = false\ndevice = \"cpu\"\n\
         [rollout]\nprompts_per_step = 2\nn_samples = 2\n[data]\neval_size = 8\n\
         [sft]\nsteps = 2\nbatch = 4\neval_size = 8\nlog_every = 1\n",
    )
    .unwrap();
    let c = cfg.display().to_string();
    let (code, out, err) = run(&[
        "sft",
        "--config",
        &c,
        "--model",
        "builtin",
        "--out",
        &d("sft"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("sft | 2 steps") && out.contains("in_domain"),
        "{out}"
    );
    assert!(err.contains("sft step"), "the log goes to stderr: {err}");
    let (code, out, err) = run(&[
        "train",
        "--config",
        &c,
        "--model",
        &d("sft"),
        "--out",
        &d("run"),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(summary["steps"], 2);
    assert!(
        err.contains("configuration saved to") && !err.contains("[critic]"),
        "the config dump is replaced by its path: {err}"
    );
    let (_, _, err) = run(&["train", "--config", &c, "--out", &d("run"), "-v"]);
    assert!(
        err.contains("[critic]"),
        "-v prints the configuration: {err}"
    );
    // eval on one JSONL file, machine-readable.
    let data = dir.join("eval.jsonl");
    std::fs::write(&data, "{\"prompt\":\"12+34=\",\"answer\":\"46\"}\n").unwrap();
    let (code, out, err) = run(&[
        "eval",
        "--config",
        &c,
        "--model",
        "builtin",
        "--data",
        &data.display().to_string(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(r["metric"], "accuracy (greedy)");
    assert_eq!(r["splits"][0]["name"], "eval");
    let (code, out, _) = run(&[
        "eval",
        "--config",
        &c,
        "--set",
        "eval.greedy=false",
        "--set",
        "eval.pass_k=2",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("pass@2"), "{out}");
    // score with the same flags.
    let sdata = dir.join("score.jsonl");
    std::fs::write(&sdata, "{\"prompt\":\"1+2=\",\"response\":\"3\"}\n").unwrap();
    let s = sdata.display().to_string();
    let (code, out, err) = run(&[
        "score",
        "--model",
        "builtin",
        "--data",
        &s,
        "--out",
        &d("s.jsonl"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 records"), "{out}");
    let (code, _, err) = run(&["score", "--model", "builtin", "--data", &s, "--out", &s]);
    assert_eq!(code, 1);
    assert!(err.contains("is the input"), "{err}");
    // A flag that does not apply is an error, not ignored.
    let (code, _, err) = run(&["export", "--model", "builtin"]);
    assert_eq!(code, 1);
    assert!(err.contains("--model does not apply"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
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
