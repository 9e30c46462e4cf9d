//! Supervised fine-tuning (the warm start of RL): next-token cross-entropy on the ANSWER tokens
//! of prompt + answer + EOS (the prompt is context only: `DecoderGraph::set_batch_masked`),
//! AdamW over fp32 master weights (`train::optim`, warmup + cosine), greedy evaluation before
//! and after, and the result saved as an HF folder.
//!
//! Settings: the `[sft]` section ([`SftArgs`]). `sft.model = "builtin"` (the default) continues
//! from the shipped warm start, `"builtin-init"` starts from a random init
//! ([`crate::model::init::random_decoder`]) of the built-in arithmetic model with the tokenizer
//! we build ([`crate::task::arith`]); `sft.data = "arith"` trains on the built-in task's SFT mix
//! (in-domain training prompts plus a share `sft.ood_frac` of out-of-domain-shaped ones, never
//! a held-out eval prompt). Otherwise `sft.model` is an HF folder and `sft.data` a JSONL
//! `{"prompt","answer"}` file. The default learning rate (2e-5, TRL's) does not harm a trained
//! model; a random init needs ~1.5e-3 ([`RECIPE_LR`], the recipe of the shipped warm start).
//!
//! Output: `--out` receives config.json, model.safetensors (f32), the tokenizer files and
//! `sft_eval.json` (before/after evals, loss curve). `--out` must be new or empty, or (with
//! `--overwrite`) an earlier sft output, of which only the files sft writes are replaced; this
//! is checked before training. The folder is written in a sibling staging folder and renamed
//! into place, so an interrupted run never leaves a half-written `--out`.
//! Everything is deterministic per `--seed` on the CPU (the same seed gives the same bytes).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::eval::{evaluate, EvalOpts, EvalResult};
use super::optim::{AdamW, Schedule};
use super::run_dir::ModelOut;
use crate::error::{Error, Result};
use crate::kernels::adamw::AdamWParams;
use crate::model::checkpoint::{save_hf_folder, write_atomic, Dtype, Tensor, TensorMap};
use crate::model::decoder::Decoder;
use crate::model::init::random_decoder;
use crate::model::score::parse_device;
use crate::model::tokenizer::Tokenizer;
use crate::task::{arith, chain, dataset, encode_prompt, parse_eval_spec, Checker, Example};

/// `--model` value for a random init of the built-in model.
pub const BUILTIN_INIT: &str = "builtin-init";

/// Settings of `dfpo-train sft` (the `[sft]` section of the configuration; documented in
/// `dfpo-train config`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftArgs {
    /// An HF model folder, "builtin" (the shipped warm start) or "builtin-init" (a random init
    /// of the built-in arithmetic model with the tokenizer we build).
    pub model: String,
    /// "arith" or "chain" (the built-in tasks) or a JSONL file of {"prompt","answer"} lines.
    pub data: String,
    /// Eval sets for JSONL data, "name=path". The arith task has its own.
    pub eval_files: Vec<String>,
    /// Answer checker for the evals of JSONL data: arith, gsm8k or math.
    pub checker: String,
    /// Output HF folder: new or empty (written in a staging folder and renamed into place).
    pub out: PathBuf,
    /// Replace an earlier sft output in `out` (only the files sft writes; others are kept).
    pub overwrite: bool,
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Peak learning rate (TRL's SFT default; a random init needs ~1.5e-3).
    pub lr: f64,
    /// Warmup as a fraction of the steps (then cosine to 10% of the peak).
    pub warmup_frac: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: off).
    pub max_grad_norm: f64,
    /// Seeds the init, the data order and the eval prompts.
    pub seed: u64,
    /// Eval prompts per eval set (0: all of a JSONL set; for arith the held-out in-domain pool's
    /// size, ~1 600).
    pub eval_size: usize,
    /// Arith data: share of out-of-domain-shaped examples in the SFT mix.
    pub ood_frac: f64,
    /// Arith data: number of distinct training examples (0: steps x batch).
    pub train_size: usize,
    /// Longest generated answer in the evals.
    pub max_new_tokens: usize,
    /// Wrap prompts in the tokenizer's chat template.
    pub chat_template: bool,
    /// cpu, cuda or auto. The CPU is the default: it is the tested, deterministic path.
    pub device: String,
    /// Log the mean loss every this many steps (0: never).
    pub log_every: usize,
    /// Learning-rate schedule after warmup: "cosine" (to 10% of the peak) or "constant".
    pub schedule: String,
    /// Also evaluate every this many steps (0: only before and after).
    pub eval_every: usize,
    /// Evaluate before training.
    pub eval_before: bool,
    /// JSONL field of the prompt (HF GSM8K: "question").
    pub prompt_key: String,
    /// JSONL field of the answer.
    pub answer_key: String,
}

/// The learning rate of the shipped warm start's recipe (SFT from a random init).
pub const RECIPE_LR: f64 = 1.5e-3;

impl Default for SftArgs {
    fn default() -> Self {
        SftArgs {
            model: crate::model::builtin::BUILTIN.into(),
            data: "arith".into(),
            eval_files: Vec::new(),
            checker: "arith".into(),
            out: PathBuf::from("runs/sft"),
            overwrite: false,
            steps: 1000,
            batch: 64,
            lr: 2e-5,
            warmup_frac: 0.05,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 1,
            eval_size: 500,
            ood_frac: arith::SFT_OOD_FRACTION,
            train_size: 0,
            max_new_tokens: 8,
            chat_template: false,
            device: "cpu".into(),
            log_every: 50,
            schedule: "cosine".into(),
            eval_every: 0,
            eval_before: true,
            prompt_key: "prompt".into(),
            answer_key: "answer".into(),
        }
    }
}

/// What a run did (also written to `<out>/sft_eval.json`).
#[derive(Clone, Debug, Serialize)]
pub struct SftReport {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    pub train_examples: usize,
    /// Mean answer-token loss of each step's batch (before its update).
    pub losses: Vec<f32>,
    pub before: Vec<EvalResult>,
    pub after: Vec<EvalResult>,
    pub seconds: f64,
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The tokenizer files of an HF folder that are copied into the output.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Token sequences (prompt + answer + EOS) and their prompt lengths.
fn tokenize(
    tok: &Tokenizer,
    examples: &[Example],
    eos: u32,
    chat: bool,
    max_len: usize,
    source: &str,
) -> Result<(Vec<Vec<u32>>, Vec<usize>)> {
    let mut seqs = Vec::with_capacity(examples.len());
    let mut skips = Vec::with_capacity(examples.len());
    for (i, e) in examples.iter().enumerate() {
        let mut s = encode_prompt(tok, &e.prompt, chat)?;
        let p = s.len();
        s.extend(tok.encode(&e.answer, false)?);
        s.push(eos);
        if s.len() > max_len {
            return Err(Error::Invalid(format!(
                "{source}: example {} (prompt {:?}) is {} tokens with its answer and EOS, \
                 above max_position_embeddings {max_len}",
                i + 1,
                e.prompt,
                s.len()
            )));
        }
        seqs.push(s);
        skips.push(p);
    }
    Ok((seqs, skips))
}

/// Runs SFT as described in the module doc and returns its report.
pub fn train(args: &SftArgs) -> Result<SftReport> {
    let t0 = Instant::now();
    if args.steps == 0 || args.batch == 0 {
        return Err(Error::Invalid(format!(
            "sft.steps = {} and sft.batch = {} must be >= 1",
            args.steps, args.batch
        )));
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        return Err(Error::Invalid(format!("sft.lr = {} must be > 0", args.lr)));
    }
    if !(0.0..=1.0).contains(&args.warmup_frac) || !(0.0..=1.0).contains(&args.ood_frac) {
        return Err(Error::Invalid(format!(
            "sft.warmup_frac = {} and sft.ood_frac = {} must be in [0, 1]",
            args.warmup_frac, args.ood_frac
        )));
    }
    if args.schedule != "cosine" && args.schedule != "constant" {
        return Err(Error::Invalid(format!(
            "sft.schedule = {:?}: expected cosine or constant",
            args.schedule
        )));
    }
    let device = parse_device("sft.device", &args.device)?;
    let out = ModelOut {
        flag: "sft.out (--out)",
        dir: &args.out,
        written: super::run_dir::HF_FILES,
        marker: "sft_eval.json",
        overwrite: args.overwrite,
    };
    out.check()?;
    let staging = out.staging();
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| io_err(&staging, e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| io_err(&staging, e))?;
    let result = train_into(args, &device, &staging, t0);
    match result {
        Ok(report) => {
            out.publish(&staging)?;
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

fn train_into(
    args: &SftArgs,
    device: &crate::Device,
    staging: &Path,
    t0: Instant,
) -> Result<SftReport> {
    // Model and tokenizer.
    let (dec, tok, tok_files) = if args.model == BUILTIN_INIT {
        // The built-in model of the task: chain's with sft.data = "chain", else arith's.
        let config = if args.data == "chain" {
            chain::write_tokenizer_files(staging)?;
            chain::model_config()
        } else {
            arith::write_tokenizer_files(staging)?;
            arith::model_config()
        };
        let dec = random_decoder(config, args.seed)?;
        (dec, Tokenizer::from_dir(staging)?, Vec::new())
    } else {
        let dir = crate::model::builtin::model_dir(&args.model)?;
        let dir = dir.as_path();
        let dec = Decoder::load(dir)?;
        let tok = Tokenizer::from_dir(dir)?;
        let files: Vec<PathBuf> = TOKENIZER_FILES
            .iter()
            .map(|f| dir.join(f))
            .filter(|p| p.is_file())
            .collect();
        (dec, tok, files)
    };
    if tok.vocab_size() > dec.config.vocab_size {
        return Err(Error::Invalid(format!(
            "sft: the tokenizer of {} has {} tokens, the model's vocab_size is {}",
            args.model,
            tok.vocab_size(),
            dec.config.vocab_size
        )));
    }
    let eos = tok
        .eos_token_id()
        .or_else(|| dec.config.eos_token_ids.first().copied())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "sft: {} has no EOS token (tokenizer_config.json eos_token or config.json \
                 eos_token_id): answers could not be terminated",
                args.model
            ))
        })?;

    // Data.
    let (train, evals, checker) = if args.data == "chain" {
        let n = if args.train_size > 0 {
            args.train_size
        } else {
            args.steps * args.batch
        };
        let m = |full: usize| {
            if args.eval_size == 0 {
                full
            } else {
                args.eval_size.min(full)
            }
        };
        let evals = vec![
            (
                "in_domain".to_string(),
                chain::in_domain(m(chain::IN_DOMAIN_POOL)),
            ),
            (
                "out_of_domain".to_string(),
                chain::out_of_domain(m(chain::OUT_OF_DOMAIN_POOL)),
            ),
        ];
        (
            chain::sft_examples(n, args.ood_frac, args.seed),
            evals,
            Checker::Chain,
        )
    } else if args.data == "arith" {
        let n = if args.train_size > 0 {
            args.train_size
        } else {
            args.steps * args.batch
        };
        let evals = vec![
            (
                "in_domain".to_string(),
                arith::in_domain(eval_n(args), args.seed),
            ),
            (
                "out_of_domain".to_string(),
                arith::out_of_domain(eval_n(args), args.seed),
            ),
        ];
        (
            arith::sft_examples(n, args.ood_frac, args.seed),
            evals,
            Checker::Arith,
        )
    } else {
        let read =
            |p: &str| dataset::read_jsonl_fields(Path::new(p), &args.prompt_key, &args.answer_key);
        let train = read(&args.data)?;
        let mut evals = Vec::new();
        for spec in &args.eval_files {
            let (name, path) = parse_eval_spec(spec)?;
            let mut ex = read(&path)?;
            if args.eval_size > 0 {
                ex.truncate(args.eval_size);
            }
            evals.push((name, ex));
        }
        (train, evals, Checker::parse(&args.checker)?)
    };
    // Warnings only: SFT learns the answers; its evals read them with the checker.
    let task = crate::task::TaskData {
        train,
        evals,
        checker,
    };
    for note in crate::task::data_report(&task, &tok, 1.0)? {
        eprintln!("sft: warning: data: {note}");
    }
    if let Some(u) = crate::task::unknown_chars(&tok, task.train.iter().map(|e| e.answer.as_str()))?
        .report("answers")
    {
        eprintln!("sft: warning: data: {u}");
    }
    let crate::task::TaskData {
        train,
        evals,
        checker,
    } = task;
    let max_len = dec.config.max_position_embeddings;
    let (seqs, skips) = tokenize(&tok, &train, eos, args.chat_template, max_len, &args.data)?;
    let s = seqs.iter().map(Vec::len).max().unwrap_or(1);

    let eval_opts = EvalOpts {
        greedy: true,
        pass_k: 1,
        max_new_tokens: args.max_new_tokens,
        temperature: 1.0,
        seed: args.seed,
        chat_template: args.chat_template,
        batch: 100,
        ..EvalOpts::default()
    };
    let run_evals = |d: &Decoder, when: &str| -> Result<Vec<EvalResult>> {
        let mut out = Vec::new();
        for (name, ex) in &evals {
            let r = evaluate(d, &tok, name, ex, checker, &eval_opts)?;
            eprintln!(
                "sft {when}: {name}: accuracy {:.3} unparsed {:.3} (n = {})",
                r.accuracy, r.unparsed, r.n
            );
            out.push(r);
        }
        Ok(out)
    };
    let before = if args.eval_before {
        run_evals(&dec, "before")?
    } else {
        Vec::new()
    };

    // Optimizer over the graph's parameters.
    let mut graph = dec.build(args.batch, s, device)?;
    let names: Vec<String> = graph.param_names().map(str::to_string).collect();
    let named = names
        .iter()
        .map(|n| (n.clone(), dec.params()[n].data.clone()))
        .collect();
    let warmup = (args.warmup_frac * args.steps as f64).round() as u64;
    let hp = AdamWParams {
        lr: args.lr,
        weight_decay: args.weight_decay,
        ..AdamWParams::default()
    };
    let clip = if args.max_grad_norm > 0.0 {
        args.max_grad_norm as f32
    } else {
        f32::INFINITY
    };
    let mut opt = AdamW::new(
        named,
        hp,
        clip,
        Schedule {
            peak: args.lr,
            warmup,
            total: args.steps as u64,
            cosine: args.schedule == "cosine",
            min_ratio: 0.1,
        },
    )?;

    let mut losses = Vec::with_capacity(args.steps);
    let n = seqs.len();
    for step in 0..args.steps {
        let idx: Vec<usize> = (0..args.batch)
            .map(|j| (step * args.batch + j) % n)
            .collect();
        let batch: Vec<Vec<u32>> = idx.iter().map(|&i| seqs[i].clone()).collect();
        let skip: Vec<usize> = idx.iter().map(|&i| skips[i]).collect();
        graph.set_batch_masked(&batch, &skip)?;
        let loss = graph.run()?;
        if !loss.is_finite() {
            return Err(Error::Invalid(format!(
                "sft: step {}: the loss is {loss} (lower --lr?)",
                step + 1
            )));
        }
        losses.push(loss);
        let grads = names
            .iter()
            .map(|nm| graph.grad(nm))
            .collect::<Result<Vec<_>>>()?;
        let o = opt.step(&grads)?;
        if !o.applied {
            return Err(Error::Invalid(format!(
                "sft: step {}: gradient norm {} is not finite",
                step + 1,
                o.grad_norm
            )));
        }
        for (nm, p) in names.iter().zip(opt.params()) {
            graph.set_param(nm, p)?;
        }
        if args.log_every > 0 && (step + 1) % args.log_every == 0 {
            let w = &losses[losses.len().saturating_sub(args.log_every)..];
            let mean = w.iter().sum::<f32>() / w.len() as f32;
            eprintln!(
                "sft step {:>5}/{}: loss {mean:.4} lr {:.2e} |g| {:.3} ({:.1} s)",
                step + 1,
                args.steps,
                o.lr,
                o.grad_norm,
                t0.elapsed().as_secs_f64()
            );
        }

        if args.eval_every > 0 && (step + 1) % args.eval_every == 0 && step + 1 < args.steps {
            let d = Decoder::new(dec.config.clone(), master_tensors(&dec, &names, &opt)?)?;
            run_evals(&d, &format!("step {}", step + 1))?;
        }
    }

    // The trained model.
    let tensors = master_tensors(&dec, &names, &opt)?;
    let trained = Decoder::new(dec.config.clone(), tensors.clone())?;
    let after = run_evals(&trained, "after")?;
    let file_refs: Vec<&Path> = tok_files.iter().map(PathBuf::as_path).collect();
    save_hf_folder(staging, &dec.config, &tensors, Dtype::F32, &file_refs)?;
    let report = SftReport {
        steps: args.steps,
        batch: args.batch,
        lr: args.lr,
        seed: args.seed,
        train_examples: n,
        losses,
        before,
        after,
        seconds: t0.elapsed().as_secs_f64(),
    };
    // The report without the wall time, so the folder is the same bytes for the same seed.
    let mut json = serde_json::to_value(&report).map_err(|e| Error::Invalid(e.to_string()))?;
    if let Some(o) = json.as_object_mut() {
        o.remove("seconds");
    }
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(staging.join("sft_eval.json"), |w| {
        w.write_all(text.as_bytes())?;
        w.write_all(b"\n")
    })?;
    Ok(report)
}

/// The optimizer's master weights as a tensor map with the model's shapes.
fn master_tensors(dec: &Decoder, names: &[String], opt: &AdamW) -> Result<TensorMap> {
    let mut tensors = TensorMap::new();
    for (nm, p) in names.iter().zip(opt.params()) {
        let shape = dec.params()[nm].shape.clone();
        tensors.insert(nm.clone(), Tensor::new(shape, p.clone())?);
    }
    Ok(tensors)
}

fn eval_n(args: &SftArgs) -> usize {
    if args.eval_size == 0 {
        arith::in_domain_pool_size()
    } else {
        args.eval_size
    }
}

/// `dfpo-train sft`: [`train`]; the result (a before/after table, or with `json` the report)
/// on stdout, the log on stderr.
pub fn run(args: &SftArgs, json: bool) -> Result<()> {
    let r = train(args)?;
    if json {
        let text = serde_json::to_string_pretty(&r).map_err(|e| Error::Invalid(e.to_string()))?;
        println!("{text}");
        return Ok(());
    }
    println!(
        "sft | {} steps | lr {} | seed {} | {:.0} s | saved {}",
        r.steps,
        r.lr,
        r.seed,
        r.seconds,
        args.out.display()
    );
    println!("{:<16} {:>8} {:>8}", "split", "before", "after");
    for a in &r.after {
        let b = r.before.iter().find(|b| b.name == a.name);
        let b = b.map_or("-".into(), |b| format!("{:.1}%", 100.0 * b.accuracy));
        println!("{:<16} {b:>8} {:>7.1}%", a.name, 100.0 * a.accuracy);
    }
    Ok(())
}
