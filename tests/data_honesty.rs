//! Data honesty (issue 9): a checker that cannot read the reference answers or the model's
//! responses is reported (an error above `data.max_unparsed`), every step logs
//! `reward/unparsed_frac`, and prompt characters the tokenizer does not know are counted.

use std::path::{Path, PathBuf};

use dfpo::model::tokenizer::Tokenizer;
use dfpo::task::{self, arith, Checker};
use dfpo::train::config::TrainConfig;
use dfpo::train::trainer::Trainer;

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dfpo-honesty-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_jsonl(path: &Path, rows: &[(&str, &str)]) {
    let text: String = rows
        .iter()
        .map(|(p, a)| format!("{}\n", serde_json::json!({"prompt": p, "answer": a})))
        .collect();
    std::fs::write(path, text).unwrap();
}

fn cfg(dir: &Path, extra: &[String]) -> TrainConfig {
    let mut sets: Vec<String> = vec![
        format!("model.policy={}", arith::builtin_dir().unwrap().display()),
        format!("run.out_dir={}", dir.join("run").display()),
        "run.steps=2".into(),
        "run.device=cpu".into(),
        "run.progress=false".into(),
        "rollout.prompts_per_step=2".into(),
        "rollout.n_samples=2".into(),
        "rollout.max_new_tokens=4".into(),
        "data.eval_size=8".into(),
    ];
    sets.extend(extra.iter().cloned());
    TrainConfig::load(None, &sets).unwrap()
}

#[test]
fn references_the_checker_cannot_read_are_an_error_naming_the_checker() {
    let d = tmp("refs");
    let f = d.join("gsm.jsonl");
    // GSM8K-style references under the arith checker: nothing can ever be scored correct.
    write_jsonl(&f, &[("12+34=", "so #### 46"), ("10+10=", "#### 20")]);
    let sets = [
        "data.task=jsonl".to_string(),
        format!("data.train_file={}", f.display()),
        format!("data.eval_files=test={}", f.display()),
    ];
    let e = Trainer::new(cfg(&d, &sets))
        .err()
        .expect("unreadable references");
    let msg = e.to_string();
    assert!(
        msg.contains("arith") && msg.contains("2 of 2") && msg.contains("data.checker"),
        "{msg}"
    );
    // The right checker reads them.
    let mut ok = sets.to_vec();
    ok.push("data.checker=gsm8k".into());
    Trainer::new(cfg(&d, &ok)).unwrap();
    // Below the threshold: a warning, not an error.
    write_jsonl(
        &f,
        &[("12+34=", "46"), ("10+10=", "20"), ("1+1=", "#### 2")],
    );
    let t = task::load_task(&cfg(&d, &sets).data, 1).unwrap();
    let tok = Tokenizer::from_dir(arith::builtin_dir().unwrap()).unwrap();
    let notes = task::data_report(&t, &tok, 0.5).unwrap();
    assert!(notes.iter().any(|n| n.contains("1 of 3")), "{notes:?}");
    assert_eq!(Checker::Arith.parse_reference("#### 2"), None);
    assert_eq!(
        Checker::Gsm8k.parse_reference("#### 2").as_deref(),
        Some("2")
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn unknown_prompt_characters_are_counted_and_named() {
    let tok = Tokenizer::from_dir(arith::builtin_dir().unwrap()).unwrap();
    let u = task::unknown_chars(&tok, ["12+34=", "12×3=", "é+é="]).unwrap();
    assert_eq!(u.texts, 3);
    assert_eq!(u.affected, 2);
    assert_eq!(u.chars, vec![('é', 2), ('×', 1)]);
    let line = u.report("prompts").unwrap();
    assert!(
        line.contains("2 of 3 prompts") && line.contains("'é'"),
        "{line}"
    );
    assert_eq!(
        task::unknown_chars(&tok, ["1+1="]).unwrap().report("x"),
        None
    );
}

#[test]
fn responses_the_checker_cannot_read_stop_the_run_at_the_first_eval_and_are_logged() {
    let d = tmp("responses");
    // The built-in model answers digits; the math checker wants \boxed{}: every response is
    // unparsed, and the first eval stops the run before any training step.
    let f = d.join("math.jsonl");
    write_jsonl(&f, &[("12+34=", "46"), ("10+10=", "20"), ("11+13=", "24")]);
    let sets = [
        "data.task=jsonl".to_string(),
        format!("data.train_file={}", f.display()),
        format!("data.eval_files=test={}", f.display()),
        "data.checker=math".into(),
    ];
    let e = Trainer::new(cfg(&d, &sets)).unwrap().run().unwrap_err();
    assert!(
        e.to_string().contains("data.max_unparsed") && e.to_string().contains("100.0%"),
        "{e}"
    );
    assert!(
        !d.join("run/metrics.jsonl").exists() || {
            let m = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap();
            m.trim().is_empty()
        }
    );
    // Allowed (max_unparsed = 1): the run goes on and logs the share per step.
    let mut all = sets.to_vec();
    all.push("data.max_unparsed=1".into());
    all.push("run.overwrite=true".into());
    Trainer::new(cfg(&d, &all)).unwrap().run().unwrap();
    let m = dfpo::train::metrics::read_metrics(&d.join("run/metrics.jsonl")).unwrap();
    assert_eq!(m.len(), 2);
    for line in &m {
        assert_eq!(line["reward/unparsed_frac"], 1.0, "{line:?}");
    }
    // The built-in task: most answers parse.
    let d2 = tmp("builtin");
    Trainer::new(cfg(&d2, &[])).unwrap().run().unwrap();
    let m = dfpo::train::metrics::read_metrics(&d2.join("run/metrics.jsonl")).unwrap();
    assert!(m.iter().all(|l| l["reward/unparsed_frac"] < 0.5), "{m:?}");
    let _ = std::fs::remove_dir_all(d);
    let _ = std::fs::remove_dir_all(d2);
}
