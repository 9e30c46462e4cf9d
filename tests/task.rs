//! The task layer: answer checkers, JSONL datasets, the built-in arithmetic task (splits,
//! tokenizer, model config), random init, and the shipped warm-start folder.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use dfpo::model::checkpoint::expected_tensors;
use dfpo::model::config::ModelConfig;
use dfpo::model::decoder::Decoder;
use dfpo::model::init::random_decoder;
use dfpo::model::tokenizer::Tokenizer;
use dfpo::task::{arith, dataset, encode_prompt, load_task, Checker, Verdict};
use dfpo::train::config::DataConfig;
use dfpo::Error;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dfpo-task-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The built tokenizer, loaded from a scratch folder.
fn builtin_tokenizer(tag: &str) -> Tokenizer {
    let d = tmpdir(tag);
    arith::write_tokenizer_files(&d).unwrap();
    Tokenizer::from_dir(&d).unwrap()
}

use Verdict::{Correct, Incorrect, Unparsed};

#[test]
fn arith_checker_cases() {
    let c = Checker::Arith;
    for (resp, ans, want) in [
        ("68", "68", Correct),
        (" 68", "68", Correct),
        ("6 8", "68", Correct),
        ("068", "68", Correct),
        ("68=", "68", Correct),
        ("68+1", "68", Correct),
        ("-5", "-5", Correct),
        ("0", "0", Correct),
        ("-0", "0", Correct),
        ("69", "68", Incorrect),
        ("6", "68", Incorrect),
        ("680", "68", Incorrect),
        ("-68", "68", Incorrect),
        ("", "68", Unparsed),
        ("   ", "68", Unparsed),
        ("+68", "68", Unparsed),
        ("=68", "68", Unparsed),
        ("-", "68", Unparsed),
        ("abc", "68", Unparsed),
    ] {
        assert_eq!(c.check(resp, ans), want, "arith {resp:?} vs {ans:?}");
    }
    assert_eq!(c.extract("0012 "), Some("12".into()));
    assert_eq!(c.extract("x12"), None);
}

#[test]
fn gsm8k_checker_cases() {
    let c = Checker::Gsm8k;
    for (resp, ans, want) in [
        ("so 3+4 = 7\n#### 7", "7", Correct),
        ("#### 1,234", "1234", Correct),
        ("#### $1,234.", "1234", Correct),
        ("#### $ 56", "56", Correct),
        ("#### 72.00", "72", Correct),
        ("#### 0.50", "0.5", Correct),
        ("#### -3", "-3", Correct),
        ("#### 3", "-3", Incorrect),
        ("#### 12 apples", "12", Correct),
        ("#### 5\nnext question ... #### 6", "6", Correct),
        ("#### 5\nnext question ... #### 6", "5", Incorrect),
        ("#### 8", "7", Incorrect),
        // The reference may itself be a full GSM8K solution.
        (
            "#### 18",
            "Janet sells 16 - 3 - 4 = 9 eggs ... 9 * 2 = 18\n#### 18",
            Correct,
        ),
        ("#### 17", "Janet ... 9 * 2 = 18\n#### 18", Incorrect),
        ("the answer is 7", "7", Unparsed),
        ("#### ", "7", Unparsed),
        ("#### none", "7", Unparsed),
        ("", "7", Unparsed),
    ] {
        assert_eq!(c.check(resp, ans), want, "gsm8k {resp:?} vs {ans:?}");
    }
    assert_eq!(c.extract("a\n####   $2,000,000.\n"), Some("2000000".into()));
}

#[test]
fn math_checker_cases() {
    let c = Checker::Math;
    for (resp, ans, want) in [
        ("so \\boxed{5}", "5", Correct),
        ("\\boxed{5.}", "5", Correct),
        ("\\boxed{ 5 }", "5", Correct),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", Correct),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", Correct),
        ("\\boxed{\\tfrac12}", "\\frac12", Correct),
        ("\\boxed{\\left(1, 2\\right)}", "(1,2)", Correct),
        (
            "\\boxed{\\frac{\\sqrt{3}}{2}}",
            "\\frac{\\sqrt{3}}{2}",
            Correct,
        ),
        ("\\boxed{x^{2^{3}}}", "x^{2^{3}}", Correct),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}", Correct),
        ("first \\boxed{3} then \\boxed{4}", "4", Correct),
        ("first \\boxed{3} then \\boxed{4}", "3", Incorrect),
        ("\\boxed{4}", "\\boxed{4}", Correct),
        ("\\boxed{2.0}", "2", Correct),
        ("\\boxed 7", "7", Correct),
        ("$\\boxed{\\rightarrow}$", "\\rightarrow", Correct),
        ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", Incorrect),
        ("\\boxed{6}", "5", Incorrect),
        ("the answer is 5", "5", Unparsed),
        ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", Unparsed),
        ("\\boxed{}", "5", Unparsed),
        ("\\boxed5", "5", Unparsed),
    ] {
        assert_eq!(c.check(resp, ans), want, "math {resp:?} vs {ans:?}");
    }
    assert_eq!(
        c.extract("\\boxed{\\frac{a}{b}} and \\boxed{\\sqrt{\\frac{1}{x+1}}}"),
        Some("\\sqrt{\\frac{1}{x+1}}".into())
    );
}

#[test]
fn checker_parse_names_and_errors() {
    assert_eq!(Checker::parse("arith").unwrap(), Checker::Arith);
    assert_eq!(Checker::parse("gsm8k").unwrap(), Checker::Gsm8k);
    assert_eq!(Checker::parse("math").unwrap(), Checker::Math);
    for bad in ["", "GSM8K", "boxed"] {
        let e = Checker::parse(bad).unwrap_err().to_string();
        assert!(e.contains("checker") && e.contains("gsm8k"), "{e}");
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn read_jsonl_reads_records_and_skips_blank_lines() {
    let d = tmpdir("jsonl-ok");
    let p = write(
        &d,
        "ok.jsonl",
        "{\"prompt\": \"1+1=\", \"answer\": \"2\", \"id\": 7}\n\n  \n{\"answer\": \"#### 3\", \"prompt\": \"q\"}\n",
    );
    let ex = dataset::read_jsonl(&p).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].prompt, "1+1=");
    assert_eq!(ex[0].answer, "2");
    assert_eq!(ex[1].answer, "#### 3");
}

#[test]
fn read_jsonl_errors_name_file_line_and_field() {
    let d = tmpdir("jsonl-bad");
    let good = "{\"prompt\": \"a\", \"answer\": \"1\"}\n";
    for (name, text, want) in [
        (
            "missing-prompt",
            format!("{good}{{\"answer\": \"1\"}}\n"),
            vec!["line 2", "\"prompt\"", "missing"],
        ),
        (
            "missing-answer",
            format!("{good}{good}{{\"prompt\": \"x\"}}\n"),
            vec!["line 3", "\"answer\"", "missing"],
        ),
        (
            "answer-number",
            "{\"prompt\": \"a\", \"answer\": 5}\n".to_string(),
            vec!["line 1", "\"answer\"", "not a string"],
        ),
        (
            "prompt-null",
            format!("{good}\n{{\"prompt\": null, \"answer\": \"1\"}}\n"),
            vec!["line 3", "\"prompt\"", "not a string"],
        ),
        (
            "prompt-empty",
            "{\"prompt\": \"\", \"answer\": \"1\"}\n".to_string(),
            vec!["line 1", "\"prompt\"", "empty"],
        ),
        (
            "bad-json",
            format!("{good}{{\"prompt\": \"a\", \n"),
            vec!["line 2", "not valid JSON"],
        ),
        (
            "not-object",
            "[1, 2]\n".to_string(),
            vec!["line 1", "not a JSON object"],
        ),
        ("empty", String::new(), vec!["no records"]),
        ("blank", "\n \n".to_string(), vec!["no records"]),
    ] {
        let p = write(&d, &format!("{name}.jsonl"), &text);
        let e = dataset::read_jsonl(&p).unwrap_err();
        assert!(matches!(e, Error::Format { .. }), "{name}: {e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&p.display().to_string()), "{name}: {msg}");
        for w in want {
            assert!(msg.contains(w), "{name}: {msg:?} lacks {w:?}");
        }
    }
    let missing = d.join("nope.jsonl");
    let e = dataset::read_jsonl(&missing).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("nope.jsonl"));
}

/// (a, b) of a built-in prompt, asserting its form.
fn operands(prompt: &str) -> (u32, u32) {
    let body = prompt.strip_suffix('=').expect("prompt ends with =");
    let (a, b) = body.split_once('+').expect("prompt has +");
    (a.parse().unwrap(), b.parse().unwrap())
}

#[test]
fn arith_answers_are_correct_by_construction_and_in_range() {
    let splits = [
        (
            "in_domain",
            arith::in_domain(arith::in_domain_pool_size(), 3),
            arith::IN_DOMAIN,
        ),
        (
            "out_of_domain",
            arith::out_of_domain(3000, 3),
            arith::OUT_OF_DOMAIN,
        ),
        ("train", arith::train_examples(5000, 3), arith::IN_DOMAIN),
    ];
    for (name, ex, ((a0, a1), (b0, b1))) in splits {
        for e in &ex {
            let (a, b) = operands(&e.prompt);
            assert!(
                (a0..=a1).contains(&a) && (b0..=b1).contains(&b),
                "{name}: {e:?}"
            );
            assert_eq!(
                e.answer.parse::<u64>().unwrap(),
                a as u64 + b as u64,
                "{name}: {e:?}"
            );
            assert_eq!(e.answer, (a + b).to_string(), "{name}: canonical form");
            assert_eq!(Checker::Arith.check(&e.answer, &e.answer), Correct);
        }
        let distinct: HashSet<_> = ex.iter().map(|e| e.prompt.clone()).collect();
        assert_eq!(
            distinct.len(),
            ex.len(),
            "{name}: distinct while the pool lasts"
        );
    }
    // The SFT mix holds the requested share of out-of-domain-shaped examples, none held out.
    let mix = arith::sft_examples(1000, 0.3, 5);
    assert_eq!(mix.len(), 1000);
    let ood = mix.iter().filter(|e| operands(&e.prompt).0 >= 100).count();
    assert_eq!(ood, 300);
    assert!(mix.iter().all(|e| {
        let (a, b) = operands(&e.prompt);
        !arith::is_held_out(a, b)
    }));
}

#[test]
fn load_task_arith_splits_are_disjoint_and_deterministic() {
    let cfg = DataConfig {
        eval_size: 300,
        ..DataConfig::default()
    };
    let t = load_task(&cfg, 11).unwrap();
    assert_eq!(t.checker, Checker::Arith);
    let names: Vec<&str> = t.evals.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["in_domain", "out_of_domain"]);
    assert!(t.evals.iter().all(|(_, e)| e.len() == 300));
    assert_eq!(t.train.len(), arith::train_pool_size());
    assert!(t.train.len() > 6000);
    let train: HashSet<&str> = t.train.iter().map(|e| e.prompt.as_str()).collect();
    for (name, ex) in &t.evals {
        for e in ex {
            assert!(
                !train.contains(e.prompt.as_str()),
                "{name} prompt {} is in train",
                e.prompt
            );
        }
    }
    // Eval prompts of other seeds are also never training prompts of this one.
    let other = load_task(&cfg, 12).unwrap();
    for (_, ex) in &other.evals {
        assert!(ex.iter().all(|e| !train.contains(e.prompt.as_str())));
    }
    // Same seed: the same data; another seed: another order.
    let again = load_task(&cfg, 11).unwrap();
    assert_eq!(again.train, t.train);
    assert_eq!(again.evals, t.evals);
    assert_ne!(other.train, t.train);
    assert_ne!(other.evals[0].1, t.evals[0].1);
    // eval_size 0: the whole held-out in-domain pool, each prompt once.
    let all = load_task(
        &DataConfig {
            eval_size: 0,
            ..DataConfig::default()
        },
        11,
    )
    .unwrap();
    assert_eq!(all.evals[0].1.len(), arith::in_domain_pool_size());
    let distinct: HashSet<_> = all.evals[0].1.iter().map(|e| e.prompt.clone()).collect();
    assert_eq!(distinct.len(), all.evals[0].1.len());
    // About 1 in HELD_OUT_ONE_IN prompts is held out.
    let total = 90 * 90;
    let held = arith::in_domain_pool_size();
    assert!(
        (held as f64 / total as f64 - 0.2).abs() < 0.02,
        "{held} of {total}"
    );
    assert_eq!(held + arith::train_pool_size(), total);
}

#[test]
fn load_task_jsonl_and_config_errors() {
    let d = tmpdir("load-jsonl");
    let tr = write(
        &d,
        "train.jsonl",
        "{\"prompt\": \"q1\", \"answer\": \"#### 1\"}\n{\"prompt\": \"q2\", \"answer\": \"2\"}\n",
    );
    let ev = write(&d, "test.jsonl", "{\"prompt\": \"q3\", \"answer\": \"3\"}\n{\"prompt\": \"q4\", \"answer\": \"4\"}\n{\"prompt\": \"q5\", \"answer\": \"5\"}\n");
    let cfg = DataConfig {
        task: "jsonl".into(),
        train_file: tr.display().to_string(),
        eval_files: vec![
            format!("test={}", ev.display()),
            format!("small = {}", ev.display()),
        ],
        checker: "gsm8k".into(),
        eval_size: 2,
        ..DataConfig::default()
    };
    let t = load_task(&cfg, 0).unwrap();
    assert_eq!(t.checker, Checker::Gsm8k);
    assert_eq!(t.train.len(), 2);
    assert_eq!(t.evals.len(), 2);
    assert_eq!(t.evals[0].0, "test");
    assert_eq!(t.evals[1].0, "small");
    assert_eq!(t.evals[0].1.len(), 2, "eval_size truncates");
    assert_eq!(t.evals[0].1[1].prompt, "q4");

    let err = |c: DataConfig| load_task(&c, 0).unwrap_err().to_string();
    let e = err(DataConfig {
        eval_files: vec!["nameless".into()],
        ..cfg.clone()
    });
    assert!(e.contains("name=path"), "{e}");
    let e = err(DataConfig {
        eval_files: vec![format!("a={}", ev.display()), format!("a={}", ev.display())],
        ..cfg.clone()
    });
    assert!(e.contains("used twice"), "{e}");
    let e = err(DataConfig {
        train_file: String::new(),
        ..cfg.clone()
    });
    assert!(e.contains("train_file"), "{e}");
    let e = err(DataConfig {
        train_file: d.join("missing.jsonl").display().to_string(),
        ..cfg.clone()
    });
    assert!(e.contains("missing.jsonl"), "{e}");
    let e = err(DataConfig {
        task: "csv".into(),
        ..cfg.clone()
    });
    assert!(e.contains("data.task") && e.contains("csv"), "{e}");
    let e = err(DataConfig {
        checker: "exact".into(),
        ..cfg.clone()
    });
    assert!(e.contains("exact"), "{e}");
    let e = err(DataConfig {
        checker: "math".into(),
        ..DataConfig::default()
    });
    assert!(e.contains("arith"), "{e}");
}

#[test]
fn tokenizer_round_trips_every_task_string() {
    let tok = builtin_tokenizer("tok");
    assert_eq!(tok.vocab_size(), arith::vocab().len());
    assert_eq!(tok.bos_token_id(), Some(arith::BOS_ID));
    assert_eq!(tok.eos_token_id(), Some(arith::EOS_ID));
    assert_eq!(tok.pad_token_id(), Some(arith::PAD_ID));
    for (i, t) in arith::vocab().iter().enumerate() {
        assert_eq!(tok.token_to_id(t), Some(i as u32), "token {t:?}");
    }
    let mut strings: Vec<String> = Vec::new();
    for e in arith::in_domain(300, 1)
        .into_iter()
        .chain(arith::out_of_domain(300, 1))
        .chain(arith::train_examples(300, 1))
    {
        strings.push(e.prompt.clone());
        strings.push(e.answer.clone());
        strings.push(format!("{}{}", e.prompt, e.answer));
    }
    strings.push(arith::CHARS.to_string());
    strings.push("12 * 3 - 4.5 = 31.5".into());
    for s in &strings {
        let ids = tok.encode(s, true).unwrap();
        assert_eq!(ids[0], arith::BOS_ID, "{s:?}: BOS first");
        assert_eq!(
            ids.len(),
            s.chars().count() + 1,
            "{s:?}: one token per char"
        );
        assert!(!ids[1..].contains(&arith::UNK_ID), "{s:?}");
        assert_eq!(tok.decode(&ids, true).unwrap(), *s, "{s:?}: round trip");
        let plain = tok.encode(s, false).unwrap();
        assert_eq!(plain, ids[1..], "{s:?}: no special tokens");
        assert_eq!(encode_prompt(&tok, s, false).unwrap(), ids);
    }
    // A character outside the vocabulary is <unk>, not dropped or a panic.
    assert_eq!(tok.encode("1x", false).unwrap(), vec![4 + 1, arith::UNK_ID]);
    // Generated answers decode with EOS skipped.
    let mut ids = tok.encode("68", false).unwrap();
    ids.push(arith::EOS_ID);
    assert_eq!(tok.decode(&ids, true).unwrap(), "68");
}

#[test]
fn encode_prompt_chat_template() {
    // The built tokenizer has no chat template: asking for one is a clear error.
    let tok = builtin_tokenizer("chat");
    let e = encode_prompt(&tok, "1+1=", true).unwrap_err().to_string();
    assert!(e.contains("chat_template"), "{e}");
    // A tokenizer with one renders the prompt as a user turn plus the generation prompt.
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let tok = Tokenizer::from_dir(&fx).unwrap();
    let ids = encode_prompt(&tok, "hello", true).unwrap();
    let text = tok
        .apply_chat_template(
            &[dfpo::model::tokenizer::ChatMessage::new("user", "hello")],
            true,
        )
        .unwrap();
    assert_eq!(ids, tok.encode(&text, false).unwrap());
    assert_ne!(ids, encode_prompt(&tok, "hello", false).unwrap());
}

#[test]
fn model_config_is_the_tiny_llama_and_round_trips() {
    let c = arith::model_config();
    c.validate("model_config").unwrap();
    assert_eq!(c.vocab_size, arith::vocab().len());
    assert!(
        c.head_dim == 64 || c.head_dim == 128,
        "CUDA attention head sizes"
    );
    assert!(c.tie_word_embeddings);
    let back = ModelConfig::from_json_str(&c.to_json(), "config.json").unwrap();
    assert_eq!(back, c);
    // Prompt + answer + EOS of every split fits the positions.
    let longest = arith::out_of_domain(3000, 0)
        .iter()
        .map(|e| 1 + e.prompt.len() + e.answer.len() + 1)
        .max()
        .unwrap();
    assert!(longest + 8 <= c.max_position_embeddings);
}

#[test]
fn random_decoder_shapes_init_and_determinism() {
    let c = arith::model_config();
    let a = random_decoder(c.clone(), 5).unwrap();
    let b = random_decoder(c.clone(), 5).unwrap();
    let other = random_decoder(c.clone(), 6).unwrap();
    let want = expected_tensors(&c);
    assert_eq!(a.params().len(), want.len());
    for (name, shape) in &want {
        let t = &a.params()[name];
        assert_eq!(&t.shape, shape, "{name}");
        assert_eq!(
            t.data,
            b.params()[name].data,
            "{name}: same seed, same values"
        );
        if name.ends_with("norm.weight") {
            assert!(t.data.iter().all(|&x| x == 1.0), "{name}: ones");
            continue;
        }
        assert_ne!(
            t.data,
            other.params()[name].data,
            "{name}: another seed differs"
        );
        let n = t.data.len() as f64;
        let mean = t.data.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (t
            .data
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!(mean.abs() < 0.003, "{name}: mean {mean}");
        assert!((std - 0.02).abs() < 0.002, "{name}: std {std}");
    }
    // Biases (a config with attention_bias) start at zero.
    let mut cb = c.clone();
    cb.attention_bias = true;
    let d = random_decoder(cb, 1).unwrap();
    let biases: Vec<_> = d
        .params()
        .iter()
        .filter(|(n, _)| n.ends_with(".bias"))
        .collect();
    assert!(!biases.is_empty());
    assert!(biases.iter().all(|(_, t)| t.data.iter().all(|&x| x == 0.0)));
    // An invalid config is an error, not a panic.
    let mut bad = c;
    bad.hidden_size = 0;
    assert!(random_decoder(bad, 1).is_err());
}

#[test]
fn shipped_warm_start_is_small_loadable_and_built_from_our_tokenizer() {
    let dir = arith::builtin_dir().unwrap();
    let size = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(size < 2_000_000, "model.safetensors is {size} bytes");
    let dec = Decoder::load(&dir).unwrap();
    let mut want = arith::model_config();
    want.torch_dtype = dec.config.torch_dtype.clone();
    assert_eq!(dec.config, want);
    assert_eq!(dec.config.torch_dtype.as_deref(), Some("float32"));
    let shipped = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
    assert_eq!(
        shipped,
        arith::tokenizer_json(),
        "tokenizer.json is the one we build"
    );
    let shipped = std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap();
    assert_eq!(shipped, arith::tokenizer_config_json());
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.eos_token_id(), Some(arith::EOS_ID));
    // The trained weights are not the init.
    let init = random_decoder(arith::model_config(), 1).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    assert_ne!(dec.params()[name].data, init.params()[name].data);
}
