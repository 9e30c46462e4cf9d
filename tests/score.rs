//! `score` on the tiny fixtures: log-probs equal the decoder's own forward on each record
//! alone (so batching and padding change nothing), the output file is written, bad input
//! gives errors naming the file, line and field.

mod common;

use std::path::PathBuf;

use dfpo::model::decoder::Decoder;
use dfpo::model::score::{run, score, ScoreArgs};
use dfpo::model::tokenizer::Tokenizer;
use dfpo::Device;

struct Tmp(PathBuf);
impl Tmp {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("dfpo-score-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn args(model: &str, dir: &Tmp, data: &str, batch: usize) -> ScoreArgs {
    let d = dir.0.join("in.jsonl");
    std::fs::write(&d, data).unwrap();
    ScoreArgs {
        model: common::fixtures_dir().join(model),
        data: d,
        out: dir.0.join("out.jsonl"),
        batch,
        device: "cpu".into(),
        ..ScoreArgs::default()
    }
}

const DATA: &str = r#"{"prompt": "The quick brown fox", "response": " jumps over the lazy dog."}
{"prompt": "Hello", "response": " world", "extra": 3}

{"prompt": "A much longer prompt about numbers: 1 2 3 4 5 6 7 8 9", "response": " ten eleven"}
"#;

#[test]
fn score_equals_the_decoder_forward_of_each_record() {
    for model in ["tiny-llama", "tiny-qwen2"] {
        let dir = Tmp::new(model);
        let a1 = args(model, &dir, DATA, 1);
        let a3 = args(model, &dir, DATA, 3);
        let s1 = score(&a1).unwrap();
        let s3 = score(&a3).unwrap();
        assert_eq!(s1.len(), 3);
        assert_eq!(
            s1.iter().map(|s| s.line).collect::<Vec<_>>(),
            vec![1, 2, 4],
            "line numbers (blank line skipped)"
        );
        let dec = Decoder::load(common::fixtures_dir().join(model)).unwrap();
        let tok = Tokenizer::from_dir(common::fixtures_dir().join(model)).unwrap();
        let recs = [
            ("The quick brown fox", " jumps over the lazy dog."),
            ("Hello", " world"),
            (
                "A much longer prompt about numbers: 1 2 3 4 5 6 7 8 9",
                " ten eleven",
            ),
        ];
        for (i, (p, r)) in recs.iter().enumerate() {
            let pi = tok.encode(p, true).unwrap();
            let ri = tok.encode(r, false).unwrap();
            let ids: Vec<u32> = pi.iter().chain(&ri).copied().collect();
            // The record alone, unpadded (B = 1, S = its length).
            let mut g = dec.build(1, ids.len(), &Device::Cpu).unwrap();
            g.set_batch(std::slice::from_ref(&ids)).unwrap();
            g.forward().unwrap();
            let lp = g.token_logprobs().unwrap();
            let want: Vec<f32> = (0..ri.len()).map(|j| lp[pi.len() + j - 1]).collect();
            assert_eq!(s1[i].response_ids, ri);
            assert_eq!(s1[i].prompt_tokens, pi.len());
            common::assert_close(
                &format!("{model} rec {i}"),
                &s1[i].logprobs,
                &want,
                1e-5,
                1e-5,
            );
            common::assert_close(
                &format!("{model} rec {i} batch 3"),
                &s3[i].logprobs,
                &want,
                1e-5,
                1e-5,
            );
            assert!(want.iter().all(|&x| x < 0.0), "log-probs are negative");
            let sum: f64 = s1[i].logprobs.iter().map(|&x| x as f64).sum();
            assert!((s1[i].sum - sum).abs() < 1e-9);
        }
        // The file.
        run(&a3).unwrap();
        let text = std::fs::read_to_string(&a3.out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1]["line"], 2);
        let lp0: Vec<f64> = lines[0]["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(lp0.len(), s3[0].logprobs.len());
        assert!((lines[0]["sum"].as_f64().unwrap() - s3[0].sum).abs() < 1e-6);
    }
}

#[test]
fn bad_input_names_file_line_and_field() {
    let dir = Tmp::new("bad");
    let cases = [
        ("{\"prompt\": \"a\"}\n", "line 1", "\"response\" is missing"),
        (
            "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": 3, \"response\": \"b\"}\n",
            "line 2",
            "\"prompt\" is not a string",
        ),
        (
            "{\"prompt\": \"a\", \"response\": \"b\"}\nnot json\n",
            "line 2",
            "not valid JSON",
        ),
        ("[1, 2]\n", "line 1", "not a JSON object"),
        (
            "{\"prompt\": \"a\", \"response\": \"\"}\n",
            "line 1",
            "\"response\" encodes to no tokens",
        ),
    ];
    for (data, line, what) in cases {
        let a = args("tiny-llama", &dir, data, 2);
        let e = run(&a).unwrap_err().to_string();
        assert!(
            e.contains("in.jsonl") && e.contains(line) && e.contains(what),
            "{data:?}: {e}"
        );
        assert!(!a.out.exists(), "no output on error");
    }
    let mut a = args("tiny-llama", &dir, DATA, 0);
    assert!(run(&a).unwrap_err().to_string().contains("score.batch"));
    a.batch = 2;
    a.device = "tpu".into();
    assert!(run(&a)
        .unwrap_err()
        .to_string()
        .contains("score.device = \"tpu\""));
    a.device = "cpu".into();
    a.data = dir.0.join("missing.jsonl");
    assert!(run(&a).unwrap_err().to_string().contains("missing.jsonl"));
}

#[test]
fn the_output_never_replaces_the_input_or_an_existing_file_unasked() {
    let dir = Tmp::new("out");
    let mut a = args("tiny-llama", &dir, DATA, 2);
    // --out equal to --data (also through another spelling of the path).
    a.out = dir.0.join(".").join("in.jsonl");
    let e = run(&a).unwrap_err().to_string();
    assert!(e.contains("is the input"), "{e}");
    a.overwrite = true;
    assert!(run(&a).unwrap_err().to_string().contains("is the input"));
    assert_eq!(std::fs::read_to_string(&a.data).unwrap(), DATA);
    // An existing output: refused, then replaced with overwrite.
    a.out = dir.0.join("old.jsonl");
    a.overwrite = false;
    std::fs::write(&a.out, "mine").unwrap();
    let e = run(&a).unwrap_err().to_string();
    assert!(e.contains("exists") && e.contains("--overwrite"), "{e}");
    assert_eq!(std::fs::read_to_string(&a.out).unwrap(), "mine");
    a.overwrite = true;
    assert_eq!(run(&a).unwrap(), 3);
    assert!(std::fs::read_to_string(&a.out)
        .unwrap()
        .contains("logprobs"));
}
