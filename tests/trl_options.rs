//! What TRL and verl users look for first (issue 9): dataset field names, a prompt length limit
//! with its truncation mode, stop strings, the external reward command, samples.jsonl.

use std::path::{Path, PathBuf};

use dfpo::model::tokenizer::Tokenizer;
use dfpo::task::arith;
use dfpo::train::config::TrainConfig;
use dfpo::train::eval::cut_at_stop;
use dfpo::train::trainer::Trainer;

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dfpo-trl-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cfg(dir: &Path, extra: &[String]) -> TrainConfig {
    let mut sets: Vec<String> = vec![
        format!("run.out_dir={}", dir.join("run").display()),
        "run.steps=2".into(),
        "run.device=cpu".into(),
        "run.progress=false".into(),
        "rollout.prompts_per_step=4".into(),
        "rollout.n_samples=2".into(),
        "rollout.max_new_tokens=4".into(),
        "data.eval_size=8".into(),
    ];
    sets.extend(extra.iter().cloned());
    TrainConfig::load(None, &sets).unwrap()
}

/// HF GSM8K-shaped lines: {"question", "answer"}.
fn gsm_file(dir: &Path, prompts: &[&str]) -> PathBuf {
    let f = dir.join("gsm.jsonl");
    let text: String = prompts
        .iter()
        .map(|p| {
            format!(
                "{}\n",
                serde_json::json!({"question": p, "answer": "#### 5", "id": 1})
            )
        })
        .collect();
    std::fs::write(&f, text).unwrap();
    f
}

#[test]
fn dataset_field_names_are_configurable() {
    let d = tmp("fields");
    let f = gsm_file(&d, &["2+3=", "1+4="]);
    let base = vec![
        "data.task=jsonl".to_string(),
        format!("data.train_file={}", f.display()),
        "data.checker=gsm8k".into(),
    ];
    let e = Trainer::new(cfg(&d, &base)).err().unwrap().to_string();
    assert!(
        e.contains("gsm.jsonl") && e.contains("\"prompt\" is missing"),
        "{e}"
    );
    let mut ok = base.clone();
    ok.push("data.prompt_key=question".into());
    Trainer::new(cfg(&d, &ok)).unwrap();
    let e = TrainConfig::load(None, &["data.prompt_key=answer".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.prompt_key"), "{e}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn long_prompts_error_truncate_or_drop() {
    let d = tmp("maxlen");
    let long = "1+2+3+4+5+6+7+8=";
    let f = gsm_file(&d, &["2+3=", long, "1+4="]);
    let base = vec![
        "data.task=jsonl".to_string(),
        format!("data.train_file={}", f.display()),
        "data.checker=gsm8k".into(),
        "data.prompt_key=question".into(),
        "data.max_prompt_length=8".into(),
    ];
    let e = Trainer::new(cfg(&d, &base)).err().unwrap().to_string();
    assert!(
        e.contains("train prompt 2") && e.contains("data.truncation") && e.contains("17 tokens"),
        "{e}"
    );
    for mode in ["left", "drop"] {
        let mut s = base.clone();
        s.push(format!("data.truncation={mode}"));
        let mut t = Trainer::new(cfg(&d, &s)).unwrap();
        let b = t.rollout(0).unwrap();
        assert!(b.prompt_len.iter().all(|&p| p <= 8), "{mode}");
        let m = t.train_step().unwrap();
        assert!(m.contains_key("reward/unparsed_frac"));
    }
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn stop_strings_end_responses_in_rollouts_and_evals() {
    let tok = Tokenizer::from_dir(arith::builtin_dir().unwrap()).unwrap();
    let ids = tok.encode("12+34=46", false).unwrap();
    let stop = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(cut_at_stop(&tok, &ids, &stop(&["+"])).unwrap(), 3);
    assert_eq!(cut_at_stop(&tok, &ids, &stop(&["4=", "34"])).unwrap(), 5);
    assert_eq!(cut_at_stop(&tok, &ids, &stop(&["9"])).unwrap(), ids.len());
    assert_eq!(cut_at_stop(&tok, &ids, &[]).unwrap(), ids.len());
    // In a rollout: no response runs past a stop string.
    let d = tmp("stop");
    let t = Trainer::new(cfg(&d, &["rollout.stop=[\"1\", \"5\"]".into()])).unwrap();
    let b = t.rollout(0).unwrap();
    let mut cut = 0;
    for (seq, (&p, &n)) in b.seqs.iter().zip(b.prompt_len.iter().zip(&b.response_len)) {
        let text = tok.decode(&seq[p..p + n], true).unwrap();
        let body = &text[..text.len().saturating_sub(1)];
        assert!(!body.contains('1') && !body.contains('5'), "{text:?}");
        cut += usize::from(text.ends_with('1') || text.ends_with('5'));
    }
    assert!(cut > 0, "no response met a stop string");
    let _ = std::fs::remove_dir_all(d);
}

/// A reward program in Python: rewards 0.25 for every response, counts its requests in `log`.
fn reward_program(dir: &Path, body: &str) -> String {
    let script = dir.join("reward.py");
    std::fs::write(&script, body).unwrap();
    format!("python3 {}", script.display())
}

#[test]
fn an_external_reward_command_speaks_jsonl_with_a_timeout_and_clear_errors() {
    let d = tmp("reward");
    let log = d.join("requests.log");
    let ok = reward_program(
        &d,
        &format!(
            "import json, sys\nlog = open({:?}, 'a')\nfor line in sys.stdin:\n    r = json.loads(line)\n    assert set(r) == {{'index', 'prompt', 'response', 'answer'}}, r\n    log.write(r['prompt'] + '\\n'); log.flush()\n    print(json.dumps({{'index': r['index'], 'reward': 0.25, 'correct': True}}), flush=True)\n",
            log.display().to_string()
        ),
    );
    let sets = |cmd: &str| {
        vec![
            format!("reward.command={cmd}"),
            "reward.flip_prob=0".into(),
            "reward.timeout_s=20".into(),
            "run.log_samples=3".into(),
        ]
    };
    Trainer::new(cfg(&d, &sets(&ok))).unwrap().run().unwrap();
    let m = dfpo::train::metrics::read_metrics(&d.join("run/metrics.jsonl")).unwrap();
    for line in &m {
        assert_eq!(line["reward/clean_mean"], 0.25, "{line:?}");
    }
    let n = std::fs::read_to_string(&log).unwrap().lines().count();
    assert_eq!(n, 2 * 4 * 2, "one request per response");
    // samples.jsonl: run.log_samples rows per step.
    let samples: Vec<serde_json::Value> = std::fs::read_to_string(d.join("run/samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 6);
    assert_eq!(samples[0]["step"], 1);
    assert_eq!(samples[5]["step"], 2);
    assert_eq!(samples[0]["reward"], 0.25);
    assert!(samples[0]["prompt"].as_str().unwrap().ends_with('='));

    // Clear errors: bad output, a missing answer (timeout), an exited program, flips.
    for (body, want) in [
        ("import sys\nfor l in sys.stdin:\n    print('nope', flush=True)\n", "not valid JSON"),
        ("import sys, time\nfor l in sys.stdin:\n    time.sleep(30)\n", "reward.timeout_s"),
        ("import sys\nsys.exit(3)\n", "exit"),
        (
            "import sys, json\nfor l in sys.stdin:\n    print(json.dumps({'index': 0}), flush=True)\n",
            "\"reward\"",
        ),
    ] {
        let cmd = reward_program(&d, body);
        let mut s = sets(&cmd);
        s.push("reward.timeout_s=1".into());
        s.push("run.overwrite=true".into());
        let e = Trainer::new(cfg(&d, &s)).unwrap().run().unwrap_err().to_string();
        assert!(e.contains("reward.command") && e.contains(want), "{want}: {e}");
    }
    let e = TrainConfig::load(None, &[format!("reward.command={ok}")]).unwrap_err();
    assert!(e.to_string().contains("reward.flip_prob"), "{e}");
    let _ = std::fs::remove_dir_all(d);
}
