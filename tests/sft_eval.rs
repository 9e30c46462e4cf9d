//! Evaluation of the shipped warm start (its accuracy bands, a corrupted answer key, unparsed
//! rates) and SFT runs (the answer-token loss falls, the output folder loads, errors are clear).

use std::path::{Path, PathBuf};

use dfpo::device::Device;
use dfpo::model::decoder::Decoder;
use dfpo::model::init::random_decoder;
use dfpo::model::tokenizer::Tokenizer;
use dfpo::task::{arith, encode_prompt, Checker, Example};
use dfpo::train::eval::{evaluate, EvalOpts};
use dfpo::train::sft::{self, SftArgs};

/// The documented greedy accuracy bands of the shipped warm start (assets/arith-sft/README.md),
/// on 500 eval prompts per split drawn with seed 1.
const IN_DOMAIN_BAND: (f64, f64) = (0.30, 0.70);
const OUT_OF_DOMAIN_BAND: (f64, f64) = (0.10, 0.50);
const EVAL_SEED: u64 = 1;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dfpo-sft-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn shipped() -> (Decoder, Tokenizer) {
    let dir = arith::builtin_dir().unwrap();
    (
        Decoder::load(&dir).unwrap(),
        Tokenizer::from_dir(&dir).unwrap(),
    )
}

fn greedy() -> EvalOpts {
    EvalOpts::default()
}

#[test]
fn shipped_warm_start_greedy_accuracy_is_in_the_documented_bands() {
    let (dec, tok) = shipped();
    for (name, ex, (lo, hi)) in [
        (
            "in_domain",
            arith::in_domain(500, EVAL_SEED),
            IN_DOMAIN_BAND,
        ),
        (
            "out_of_domain",
            arith::out_of_domain(500, EVAL_SEED),
            OUT_OF_DOMAIN_BAND,
        ),
    ] {
        let r = evaluate(&dec, &tok, name, &ex, Checker::Arith, &greedy()).unwrap();
        eprintln!("{name}: {r:?}");
        assert_eq!(r.n, 500);
        assert_eq!(r.name, name);
        assert!(
            lo < r.accuracy && r.accuracy < hi,
            "{name}: accuracy {} not in ({lo}, {hi})",
            r.accuracy
        );
        assert!(r.unparsed < 0.05, "{name}: unparsed {}", r.unparsed);
    }
}

#[test]
fn corrupted_answer_key_scores_zero_and_wrong_format_is_unparsed() {
    let (dec, tok) = shipped();
    let ex = arith::in_domain(200, 2);
    let good = evaluate(&dec, &tok, "good", &ex, Checker::Arith, &greedy()).unwrap();
    assert!(good.accuracy > 0.1, "{good:?}");
    // Every key shifted by 5000: no sum of the task is that large (the model does make off-by-one
    // carry errors, so a +1 shift would sometimes match).
    let corrupted: Vec<Example> = ex
        .iter()
        .map(|e| Example {
            prompt: e.prompt.clone(),
            answer: (e.answer.parse::<u64>().unwrap() + 5000).to_string(),
        })
        .collect();
    let bad = evaluate(
        &dec,
        &tok,
        "corrupted",
        &corrupted,
        Checker::Arith,
        &greedy(),
    )
    .unwrap();
    assert_eq!(bad.accuracy, 0.0, "{bad:?}");
    assert_eq!(bad.unparsed, good.unparsed, "the responses are the same");
    // The model never writes "#### n": with the GSM8K checker every response is unparsed.
    let g = evaluate(&dec, &tok, "gsm8k", &ex, Checker::Gsm8k, &greedy()).unwrap();
    assert_eq!((g.accuracy, g.unparsed), (0.0, 1.0), "{g:?}");
}

#[test]
fn sampling_gives_a_mix_and_pass_at_k_is_deterministic() {
    let (dec, tok) = shipped();
    let ex = arith::in_domain(200, 3);
    let opts = |k: usize, seed: u64| EvalOpts {
        greedy: false,
        pass_k: k,
        temperature: 1.0,
        seed,
        ..EvalOpts::default()
    };
    let p1 = evaluate(&dec, &tok, "t1", &ex, Checker::Arith, &opts(1, 9)).unwrap();
    let p4 = evaluate(&dec, &tok, "t1", &ex, Checker::Arith, &opts(4, 9)).unwrap();
    eprintln!("pass@1 {p1:?}\npass@4 {p4:?}");
    assert!(0.1 < p1.accuracy && p1.accuracy < 0.9, "{p1:?}");
    assert!(
        p4.accuracy > p1.accuracy + 0.05,
        "pass@4 {p4:?} vs pass@1 {p1:?}"
    );
    let again = evaluate(&dec, &tok, "t1", &ex, Checker::Arith, &opts(4, 9)).unwrap();
    assert_eq!((again.accuracy, again.unparsed), (p4.accuracy, p4.unparsed));
    // Batching does not change greedy results.
    let a = evaluate(
        &dec,
        &tok,
        "b",
        &ex,
        Checker::Arith,
        &EvalOpts {
            batch: 7,
            ..greedy()
        },
    )
    .unwrap();
    let b = evaluate(&dec, &tok, "b", &ex, Checker::Arith, &greedy()).unwrap();
    assert_eq!(a.accuracy, b.accuracy);
}

#[test]
fn evaluate_errors() {
    let (dec, tok) = shipped();
    let ex = arith::in_domain(4, 1);
    let e = evaluate(&dec, &tok, "x", &[], Checker::Arith, &greedy()).unwrap_err();
    assert!(e.to_string().contains("no examples"), "{e}");
    let e = evaluate(
        &dec,
        &tok,
        "x",
        &ex,
        Checker::Arith,
        &EvalOpts {
            batch: 0,
            ..greedy()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("batch"), "{e}");
    let o = EvalOpts {
        greedy: false,
        pass_k: 0,
        ..greedy()
    };
    let e = evaluate(&dec, &tok, "x", &ex, Checker::Arith, &o).unwrap_err();
    assert!(e.to_string().contains("pass_k"), "{e}");
    let o = EvalOpts {
        max_new_tokens: 60,
        ..greedy()
    };
    let e = evaluate(&dec, &tok, "setname", &ex, Checker::Arith, &o).unwrap_err();
    assert!(
        e.to_string().contains("setname") && e.to_string().contains("max_position"),
        "{e}"
    );
}

/// A short SFT from a random init (the recipe's model and learning rate).
fn quick_args(out: &Path) -> SftArgs {
    SftArgs {
        model: "builtin-init".into(),
        lr: sft::RECIPE_LR,
        out: out.to_path_buf(),
        steps: 30,
        batch: 16,
        eval_size: 20,
        log_every: 0,
        ..SftArgs::default()
    }
}

#[test]
fn sft_defaults_do_no_harm_to_a_trained_model() {
    // The old default (lr 1.5e-3, the random-init recipe) took the warm start from 76.7% to
    // 16.7% in 20 steps; the default learning rate must keep it where it was.
    let d = tmpdir("defaults");
    let args = SftArgs {
        out: d.join("out"),
        steps: 20,
        eval_size: 60,
        log_every: 0,
        ..SftArgs::default()
    };
    assert_eq!(
        args.model, "builtin",
        "sft starts from the trained warm start by default"
    );
    let r = sft::train(&args).unwrap();
    for (b, a) in r.before.iter().zip(&r.after) {
        eprintln!("{}: {:.3} -> {:.3}", b.name, b.accuracy, a.accuracy);
        assert!(
            a.accuracy >= b.accuracy - 0.05,
            "{}: {} -> {}: the default SFT harmed a trained model",
            b.name,
            b.accuracy,
            a.accuracy
        );
    }
}

/// Mean answer-token NLL of `dec` on the first 64 SFT examples (seed 99), by a forward pass.
fn answer_loss(dec: &Decoder, tok: &Tokenizer) -> f32 {
    let ex = arith::sft_examples(64, 0.1, 99);
    let mut seqs = Vec::new();
    let mut skip = Vec::new();
    for e in &ex {
        let mut s = encode_prompt(tok, &e.prompt, false).unwrap();
        skip.push(s.len());
        s.extend(tok.encode(&e.answer, false).unwrap());
        s.push(arith::EOS_ID);
        seqs.push(s);
    }
    let s = seqs.iter().map(Vec::len).max().unwrap();
    let mut g = dec.build(seqs.len(), s, &Device::Cpu).unwrap();
    g.set_batch_masked(&seqs, &skip).unwrap();
    g.forward().unwrap();
    g.loss().unwrap()
}

#[test]
fn short_sft_lowers_the_answer_loss_and_writes_a_loadable_deterministic_folder() {
    let d = tmpdir("short");
    let out = d.join("model");
    let args = quick_args(&out);
    let rep = sft::train(&args).unwrap();
    assert_eq!(rep.losses.len(), 30);
    assert_eq!(rep.before.len(), 2);
    assert_eq!(rep.after.len(), 2);

    let dec = Decoder::load(&out).unwrap();
    let tok = Tokenizer::from_dir(&out).unwrap();
    let init = random_decoder(arith::model_config(), args.seed).unwrap();
    let (l0, l1) = (answer_loss(&init, &tok), answer_loss(&dec, &tok));
    eprintln!("answer loss: init {l0}, after 30 steps {l1}");
    assert!(l0 > 2.5, "a random init is near ln(V): {l0}");
    assert!(l1 < l0 - 0.5, "SFT lowered the loss: {l0} -> {l1}");
    assert!(out.join("sft_eval.json").is_file());
    assert_eq!(
        std::fs::read_to_string(out.join("tokenizer.json")).unwrap(),
        arith::tokenizer_json()
    );
    // No staging folders left beside it.
    let leftovers: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "model")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Same seed: the same bytes; another seed: different weights.
    let out2 = d.join("again");
    sft::train(&quick_args(&out2)).unwrap();
    for f in ["model.safetensors", "config.json", "sft_eval.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(out2.join(f)).unwrap(),
            "{f}"
        );
    }
    let out3 = d.join("seed2");
    sft::train(&SftArgs {
        seed: 2,
        ..quick_args(&out3)
    })
    .unwrap();
    assert_ne!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(out3.join("model.safetensors")).unwrap()
    );
}

#[test]
fn sft_never_deletes_or_moves_what_it_did_not_write() {
    let d = tmpdir("out-rules");
    let t0 = std::time::Instant::now();
    // A folder with the user's files: refused before any training, nothing touched.
    let out = d.join("mine");
    std::fs::create_dir_all(out.join("sub")).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    std::fs::write(out.join("sub/data.bin"), "mine too").unwrap();
    let quick = |out: &Path| SftArgs {
        steps: 2,
        eval_size: 4,
        eval_before: false,
        ..quick_args(out)
    };
    let e = sft::train(&quick(&out)).unwrap_err().to_string();
    assert!(e.contains("not empty") && e.contains("notes.txt"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("sub/data.bin")).unwrap(),
        "mine too"
    );
    // --out naming an existing file: refused before training, the file stays where it is.
    let file = d.join("a-file");
    std::fs::write(&file, "precious").unwrap();
    let e = sft::train(&quick(&file)).unwrap_err().to_string();
    assert!(e.contains("is a file"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
    // --overwrite of a folder with files named like an HF folder but not written by sft.
    let hf = d.join("user-hf");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::write(hf.join("config.json"), "{}").unwrap();
    let e = sft::train(&SftArgs {
        overwrite: true,
        ..quick(&hf)
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("config.json"), "{e}");
    assert_eq!(
        std::fs::read_to_string(hf.join("config.json")).unwrap(),
        "{}"
    );
    // --overwrite into the folder with only the user's files: they stay beside the model.
    sft::train(&SftArgs {
        overwrite: true,
        ..quick(&out)
    })
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    Decoder::load(&out).unwrap();
    // ... and again over that earlier sft output (another seed: other weights).
    let w1 = std::fs::read(out.join("model.safetensors")).unwrap();
    sft::train(&SftArgs {
        overwrite: true,
        seed: 3,
        ..quick(&out)
    })
    .unwrap();
    assert_ne!(w1, std::fs::read(out.join("model.safetensors")).unwrap());
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    let hidden: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "staging left: {hidden:?}");
    eprintln!("{:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn sft_from_an_hf_folder_on_jsonl_data() {
    let d = tmpdir("jsonl");
    let data = d.join("train.jsonl");
    let lines: String = arith::train_examples(40, 4)
        .iter()
        .map(|e| {
            format!(
                "{{\"prompt\": \"{}\", \"answer\": \"{}\"}}\n",
                e.prompt, e.answer
            )
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let evalf = d.join("eval.jsonl");
    let lines: String = arith::in_domain(10, 4)
        .iter()
        .map(|e| {
            format!(
                "{{\"prompt\": \"{}\", \"answer\": \"{}\"}}\n",
                e.prompt, e.answer
            )
        })
        .collect();
    std::fs::write(&evalf, lines).unwrap();
    let out = d.join("tuned");
    let args = SftArgs {
        model: arith::builtin_dir().unwrap().display().to_string(),
        data: data.display().to_string(),
        eval_files: vec![format!("held={}", evalf.display())],
        checker: "arith".into(),
        steps: 5,
        lr: 1e-4,
        ..quick_args(&out)
    };
    let rep = sft::train(&args).unwrap();
    assert_eq!(rep.train_examples, 40);
    assert_eq!(rep.after.len(), 1);
    assert_eq!(rep.after[0].name, "held");
    assert_eq!(rep.after[0].n, 10);
    Decoder::load(&out).unwrap();
    let tok = Tokenizer::from_dir(&out).unwrap();
    assert_eq!(tok.eos_token_id(), Some(arith::EOS_ID));
}

#[test]
fn sft_errors_are_clear_and_leave_the_output_untouched() {
    let d = tmpdir("errors");
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let base = SftArgs {
        model: arith::builtin_dir().unwrap().display().to_string(),
        eval_before: false,
        // keep.txt is the user's: every error below must come before the output is touched.
        overwrite: true,
        ..quick_args(&out)
    };
    let err = |a: SftArgs| sft::train(&a).unwrap_err().to_string();

    let missing = d.join("no-such.jsonl");
    let e = err(SftArgs {
        data: missing.display().to_string(),
        ..base.clone()
    });
    assert!(e.contains("no-such.jsonl"), "{e}");

    let bad = d.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"1+1=\", \"answer\": \"2\"}\n{\"prompt\": \"2+2=\"}\n",
    )
    .unwrap();
    let e = err(SftArgs {
        data: bad.display().to_string(),
        ..base.clone()
    });
    assert!(
        e.contains("bad.jsonl") && e.contains("line 2") && e.contains("\"answer\""),
        "{e}"
    );

    let long = d.join("long.jsonl");
    std::fs::write(
        &long,
        format!(
            "{{\"prompt\": \"{}\", \"answer\": \"2\"}}\n",
            "1".repeat(70)
        ),
    )
    .unwrap();
    let e = err(SftArgs {
        data: long.display().to_string(),
        ..base.clone()
    });
    assert!(
        e.contains("example 1") && e.contains("max_position_embeddings"),
        "{e}"
    );

    let e = err(SftArgs {
        model: d.join("no-model").display().to_string(),
        ..base.clone()
    });
    assert!(e.contains("no-model"), "{e}");
    let e = err(SftArgs {
        steps: 0,
        ..base.clone()
    });
    assert!(e.contains("sft.steps"), "{e}");
    let e = err(SftArgs {
        lr: -1.0,
        ..base.clone()
    });
    assert!(e.contains("sft.lr"), "{e}");
    let e = err(SftArgs {
        ood_frac: 2.0,
        ..base.clone()
    });
    assert!(e.contains("sft.ood_frac"), "{e}");
    let ok_data = d.join("ok.jsonl");
    std::fs::write(&ok_data, "{\"prompt\": \"1+1=\", \"answer\": \"2\"}\n").unwrap();
    let e = err(SftArgs {
        data: ok_data.display().to_string(),
        eval_files: vec!["noequals".into()],
        ..base.clone()
    });
    assert!(e.contains("name=path"), "{e}");
    let e = err(SftArgs {
        data: ok_data.display().to_string(),
        checker: "nope".into(),
        ..base.clone()
    });
    assert!(e.contains("nope"), "{e}");
    let e = err(SftArgs {
        device: "tpu".into(),
        ..base.clone()
    });
    assert!(e.contains("tpu"), "{e}");

    // The existing output is untouched and nothing is left beside it.
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    let names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}
