//! One RL training step of each algorithm (dfpo, ppo, grpo, quantile), timed two ways:
//!
//! - `{algo}/step`: one whole `Trainer::train_step()`: rollout generation (CPU KV-cache
//!   decoding), rewards, old log-probs, critic readout, (distributional) GAE, flow targets, and
//!   the PPO epochs × minibatches of actor and critic updates;
//! - `{algo}/update`: the update phase alone on one fixed, prepared minibatch (no generation):
//!   `Policy::update` + `Policy::step`, then `Critic::update` + `Critic::step` (no critic for
//!   grpo). The minibatch is prepared exactly as `train_step` prepares its minibatches.
//!
//! Throughput is tokens/s with tokens = rows × S: the padded token count every graph op of the
//! step processes (the real prompt + response tokens vary from step to step; criterion needs one
//! number). After each section one line per algo prints its time and its ratio to PPO's, and
//! one line the DFPO/PPO ratio that issue 4 bounds by 1.15.
//!
//! Sections:
//! - `train_step_cpu` (always, fp32): the shipped `assets/arith-sft` when present, else the tiny
//!   arithmetic model (`task::arith::model_config()`) with random weights; the trainer's default
//!   run (16 prompts × 4 samples = 64 rows, 2 minibatches of 32, 8 new tokens, K = 16, flow head
//!   64 × 2), so `step` is one real RL step of the default run.
//! - `train_step_cuda` (bf16, only when `dfpo::device::cuda_device()` finds a GPU): a
//!   Qwen2-0.5B-shaped model with random weights (24 layers, d 896, I 4864, 14 q / 2 kv heads of
//!   64, V 151936, tied; the full vocabulary, no reduction), dfpo and ppo by default
//!   (`DFPO_BENCH_CUDA_ALGOS=dfpo,ppo,grpo,quantile` for all four: each 0.5B update costs
//!   seconds, and the GPU run gives every bench executable 300 s).
//!   `update`: B = 8 rows × S = 512 (64 prompt + 448 response tokens, random ids, random 0/1
//!   rewards), the shape `tools/reference/torch_dfpo_step.py` times in PyTorch.
//!   `step`: 4 prompts × 2 samples, 1 minibatch, 8 new tokens; rollouts decode a 0.5B model on
//!   the host, so one step takes seconds and criterion's minimum of 10 samples does not fit: it
//!   is timed by hand (1 warm-up + `DFPO_BENCH_CUDA_STEPS`, default 2, median printed).
//!
//! `DFPO_BENCH_BIG_CPU=1` runs the CUDA section's code on the CPU with a reduced Qwen2-like
//! shape (d 128, 2 layers, the full 151936 vocabulary, S = 64), to check that code without a GPU.
//!
//! `cargo bench --bench train_step -- --warm-up-time 1 --measurement-time 3`

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};
use dfpo::model::checkpoint::{save_hf_folder, Dtype};
use dfpo::model::config::ModelConfig;
use dfpo::model::init::random_params;
use dfpo::model::tokenizer::Tokenizer;
use dfpo::task::arith;
use dfpo::train::config::{Algo, TrainConfig};
use dfpo::train::rollout::{Batch, Stream};
use dfpo::train::trainer::Trainer;
use dfpo::{Error, Result};

/// Every bench's per-call mean iteration time (s), so the ratio lines need no criterion output.
#[derive(Default)]
struct Record(RefCell<BTreeMap<String, Vec<f64>>>);

impl Record {
    /// Benches `f` as `id` in `grp` and records each call's mean iteration time under `id`.
    fn bench(
        &self,
        grp: &mut BenchmarkGroup<'_, WallTime>,
        id: &str,
        tokens: usize,
        mut f: impl FnMut(),
    ) {
        grp.throughput(Throughput::Elements(tokens as u64));
        grp.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let t0 = Instant::now();
                for _ in 0..iters {
                    f();
                }
                let d = t0.elapsed();
                self.push(id, d.as_secs_f64() / iters.max(1) as f64);
                d
            })
        });
    }

    /// Records the phase times `train_step` reports in its metrics (rollout, prep, update).
    fn phases(&self, algo: Algo, m: &BTreeMap<String, f64>) {
        for ph in PHASES {
            if let Some(&v) = m.get(&format!("timing/{ph}_s")) {
                self.push(&format!("{}/phase/{ph}", algo.as_str()), v);
            }
        }
    }

    fn push(&self, id: &str, secs: f64) {
        self.0
            .borrow_mut()
            .entry(id.to_string())
            .or_default()
            .push(secs);
    }

    /// The median of the recorded per-call means (robust to criterion's short warm-up calls).
    fn median(&self, id: &str) -> Option<f64> {
        let mut v = self.0.borrow().get(id)?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }
}

/// The phases of `Trainer::train_step` (its `timing/*_s` metrics).
const PHASES: [&str; 3] = ["rollout", "prep", "update"];

/// Prints one line per algo (time, tokens/s, ratio to PPO) and the DFPO/PPO line for `phase`.
fn report(section: &str, rec: &Record, algos: &[Algo], phase: &str, tokens: usize) {
    let key = |a: Algo| format!("{}/{phase}", a.as_str());
    let ppo = rec.median(&key(Algo::Ppo));
    for &a in algos {
        let Some(t) = rec.median(&key(a)) else {
            continue;
        };
        let ratio = ppo.map_or("no ppo time".to_string(), |p| {
            format!("{:.3}x PPO's time", t / p)
        });
        // The whole step's breakdown, from the trainer's own timing metrics (medians).
        let parts: Vec<String> = PHASES
            .iter()
            .filter_map(|ph| {
                let v = rec.median(&format!("{}/phase/{ph}", a.as_str()))?;
                Some(format!("{ph} {:.2}", v * 1e3))
            })
            .collect();
        let parts = if phase == "step" && !parts.is_empty() {
            format!(" [ms: {}]", parts.join(", "))
        } else {
            String::new()
        };
        println!(
            "{section}/{}/{phase}: {:.2} ms, {:.0} tokens/s ({tokens} tokens), {ratio}{parts}",
            a.as_str(),
            t * 1e3,
            tokens as f64 / t
        );
    }
    if let (Some(d), Some(p)) = (rec.median(&key(Algo::Dfpo)), ppo) {
        println!(
            "{section}: DFPO/PPO {phase} time ratio = {:.3} ({} the 1.15 target)",
            d / p,
            if d / p <= 1.15 { "within" } else { "OVER" }
        );
    }
}

/// Benches stop at the first error, naming what failed.
trait OrDie<T> {
    fn or_die(self, what: &str) -> T;
}

impl<T> OrDie<T> for Result<T> {
    fn or_die(self, what: &str) -> T {
        self.unwrap_or_else(|e| panic!("train_step bench: {what}: {e}"))
    }
}

/// A scratch folder removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "dfpo-bench-train-step-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The trainer's defaults, with an algo, a policy folder and a device; the learning rate is
/// constant so that steps past the configured count (criterion runs many) change nothing.
fn base_config(algo: Algo, policy: &Path, device: &str, out: &Path) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.algo.name = algo;
    c.model.policy = policy.display().to_string();
    c.run.device = device.into();
    c.run.out_dir = out.display().to_string();
    c.run.progress = false;
    c.optim.schedule = "constant".into();
    c.optim.warmup_frac = 0.0;
    c
}

/// The graph's (B, S) and the rows of one RL step of `tr`.
fn shape_of(tr: &Trainer) -> (usize, usize, usize) {
    let (b, s) = tr.policy.graph.shape();
    let rows = tr.cfg.rollout.prompts_per_step * tr.cfg.rollout.n_samples;
    (b, s, rows)
}

// ---- CPU: the tiny model, the default run ----------------------------------------------------

/// The shipped warm start when it exists, else a random tiny arithmetic model in `dir`.
fn tiny_policy(dir: &Path) -> Result<(PathBuf, &'static str)> {
    let builtin = dfpo::model::builtin::assets_dir();
    if builtin.join("config.json").exists() {
        return Ok((builtin, "assets/arith-sft"));
    }
    let p = dir.join("tiny-random");
    arith::write_random_model(&p, 7)?;
    Ok((p, "the tiny arithmetic model, random weights"))
}

fn cpu(c: &mut Criterion) {
    let scratch = Scratch::new("cpu");
    let (policy, what) = tiny_policy(&scratch.0).or_die("tiny model");
    let rec = Record::default();
    let mut grp = c.benchmark_group("train_step_cpu");
    grp.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let (mut step_tokens, mut update_tokens) = (0, 0);
    for algo in Algo::ALL {
        let out = scratch.0.join(algo.as_str());
        let cfg = base_config(algo, &policy, "cpu", &out);
        let mut tr = Trainer::new(cfg).or_die("Trainer::new");
        let (b, s, rows) = shape_of(&tr);
        if algo == Algo::Dfpo {
            println!(
                "train_step_cpu: {what}; {rows} rows x S = {s} per step, minibatches of {b}, \
                 {} threads",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            );
        }
        step_tokens = rows * s;
        update_tokens = b * s;
        rec.bench(
            &mut grp,
            &format!("{}/step", algo.as_str()),
            rows * s,
            || {
                let m = tr.train_step().or_die("train_step");
                rec.phases(algo, &m);
            },
        );
        let p = tr.prepare().or_die("prepare");
        let sel: Vec<usize> = (0..b).collect();
        rec.bench(
            &mut grp,
            &format!("{}/update", algo.as_str()),
            b * s,
            || {
                let mut acc = BTreeMap::new();
                tr.update_minibatch(&p, &sel, &mut acc).or_die("update");
            },
        );
    }
    grp.finish();
    report("train_step_cpu", &rec, &Algo::ALL, "step", step_tokens);
    report("train_step_cpu", &rec, &Algo::ALL, "update", update_tokens);
}

// ---- CUDA: the Qwen2-0.5B shape --------------------------------------------------------------

/// A Qwen2 config with the arithmetic tokenizer's special ids.
fn qwen2_config(
    name: &str,
    hidden: usize,
    layers: usize,
    heads: usize,
    inter: usize,
) -> ModelConfig {
    let text = format!(
        r#"{{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936,
            "hidden_size": {hidden}, "intermediate_size": {inter}, "num_hidden_layers": {layers},
            "num_attention_heads": {heads}, "num_key_value_heads": 2, "head_dim": 64,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "tie_word_embeddings": true, "hidden_act": "silu",
            "bos_token_id": {}, "eos_token_id": {}, "pad_token_id": {}}}"#,
        arith::BOS_ID,
        arith::EOS_ID,
        arith::PAD_ID
    );
    ModelConfig::from_json_str(&text, name).or_die("model config")
}

/// The arithmetic tokenizer with its vocabulary padded by filler tokens to `vocab` entries, so
/// a model with a 151936-token vocabulary can decode whatever it samples.
fn big_tokenizer_json(vocab: usize) -> Result<String> {
    let mut v: serde_json::Value = serde_json::from_str(&arith::tokenizer_json())
        .map_err(|e| Error::Invalid(format!("arith tokenizer.json: {e}")))?;
    let map = v["model"]["vocab"]
        .as_object_mut()
        .ok_or_else(|| Error::Invalid("arith tokenizer.json: no model.vocab".into()))?;
    for i in map.len()..vocab {
        map.insert(format!("<f{i}>"), serde_json::json!(i));
    }
    serde_json::to_string(&v).map_err(|e| Error::Invalid(e.to_string()))
}

/// Writes a random model of `config` (bf16 safetensors) with the padded tokenizer.
fn write_big_model(dir: &Path, config: &ModelConfig) -> Result<()> {
    let params = random_params(config, 11)?;
    save_hf_folder(dir, config, &params, Dtype::BF16, &[])?;
    arith::write_tokenizer_files(dir)?;
    let tj = big_tokenizer_json(config.vocab_size)?;
    std::fs::write(dir.join("tokenizer.json"), tj).map_err(|e| Error::Io {
        path: dir.join("tokenizer.json").display().to_string(),
        source: e,
    })
}

/// The longest encoded training prompt of the config's task (to size S exactly).
fn max_prompt(cfg: &TrainConfig, dir: &Path) -> Result<usize> {
    let tok = Tokenizer::from_dir(dir)?;
    let task = dfpo::task::load_task(&cfg.data, cfg.run.seed)?;
    let mut m = 1;
    for e in &task.train {
        m = m.max(dfpo::task::encode_prompt(&tok, &e.prompt, cfg.data.chat_template)?.len());
    }
    Ok(m)
}

/// `rows` rows of exactly `s` tokens: `prompt` prompt tokens then the response, random ids,
/// random 0/1 rewards, groups of 4 rows (GRPO).
fn synthetic_batch(rows: usize, s: usize, prompt: usize, vocab: usize, seed: u64) -> Batch {
    let mut rng = Stream::new(seed, 0, "synthetic-batch");
    let mut b = Batch {
        s,
        ..Default::default()
    };
    for r in 0..rows {
        b.seqs.push(
            (0..s)
                .map(|_| (rng.next_u64() % vocab as u64) as u32)
                .collect(),
        );
        b.prompt_len.push(prompt);
        b.response_len.push(s - prompt);
        b.group.push(r / 4);
        let ok = rng.uniform() < 0.5;
        b.correct.push(ok);
        b.clean.push(if ok { 1.0 } else { 0.0 });
        b.noisy.push(if ok { 1.0 } else { 0.0 });
    }
    b
}

/// The algos of the CUDA section: `DFPO_BENCH_CUDA_ALGOS` (comma-separated) or dfpo, ppo.
fn cuda_algos() -> Vec<Algo> {
    let Ok(v) = std::env::var("DFPO_BENCH_CUDA_ALGOS") else {
        return vec![Algo::Dfpo, Algo::Ppo];
    };
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            Algo::parse(s).unwrap_or_else(|| {
                panic!("DFPO_BENCH_CUDA_ALGOS: unknown algo \"{s}\" (dfpo, ppo, grpo, quantile)")
            })
        })
        .collect()
}

/// Sizes of the big section: the model, the update minibatch (B, S, prompt), and the rollout
/// of the whole step.
struct BigShape {
    name: &'static str,
    config: ModelConfig,
    b: usize,
    s: usize,
    prompt: usize,
    device: &'static str,
}

fn big(c: &mut Criterion, sh: BigShape) {
    let algos = cuda_algos();
    let scratch = Scratch::new(sh.name);
    let dir = scratch.0.join("model");
    let t0 = Instant::now();
    write_big_model(&dir, &sh.config).or_die("random model");
    println!(
        "{}: random model written in {:.1} s; update minibatch B = {} x S = {} ({} prompt + {} \
         response tokens)",
        sh.name,
        t0.elapsed().as_secs_f64(),
        sh.b,
        sh.s,
        sh.prompt,
        sh.s - sh.prompt
    );
    let rec = Record::default();
    let mut grp = c.benchmark_group(sh.name);
    // Flat: 10 samples of equal iteration counts (linear sampling would run 55 iterations).
    grp.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    // The update phase: a trainer whose graphs are (B, S) = (8, 512), fed a synthetic batch.
    for &algo in &algos {
        let mut cfg = base_config(algo, &dir, sh.device, &scratch.0.join(algo.as_str()));
        cfg.rollout.prompts_per_step = sh.b / 4;
        cfg.rollout.n_samples = 4;
        cfg.ppo.minibatches = 1;
        let mp = max_prompt(&cfg, &dir).or_die("prompt lengths");
        cfg.rollout.max_new_tokens = sh.s - mp;
        let t0 = Instant::now();
        let mut tr = Trainer::new(cfg).or_die("Trainer::new");
        let (b, s, _) = shape_of(&tr);
        assert_eq!((b, s), (sh.b, sh.s), "the update graphs' shape");
        let batch = synthetic_batch(b, s, sh.prompt, sh.config.vocab_size, 5);
        let p = tr.prepare_batch(batch).or_die("prepare");
        let sel: Vec<usize> = (0..b).collect();
        println!(
            "{}: {} trainer built and minibatch prepared in {:.1} s",
            sh.name,
            algo.as_str(),
            t0.elapsed().as_secs_f64()
        );
        rec.bench(
            &mut grp,
            &format!("{}/update", algo.as_str()),
            b * s,
            || {
                let mut acc = BTreeMap::new();
                tr.update_minibatch(&p, &sel, &mut acc).or_die("update");
            },
        );
    }
    grp.finish();
    report(sh.name, &rec, &algos, "update", sh.b * sh.s);

    // The whole step, timed by hand (see the module doc).
    let reps: usize = std::env::var("DFPO_BENCH_CUDA_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1);
    let mut tokens = 0;
    for &algo in &algos {
        let mut cfg = base_config(algo, &dir, sh.device, &scratch.0.join(algo.as_str()));
        cfg.rollout.prompts_per_step = 4;
        cfg.rollout.n_samples = 2;
        cfg.ppo.minibatches = 1;
        let mut tr = Trainer::new(cfg).or_die("Trainer::new");
        let (_, s, rows) = shape_of(&tr);
        tokens = rows * s;
        tr.train_step().or_die("train_step");
        for _ in 0..reps {
            let t0 = Instant::now();
            let m = tr.train_step().or_die("train_step");
            rec.push(
                &format!("{}/step", algo.as_str()),
                t0.elapsed().as_secs_f64(),
            );
            rec.phases(algo, &m);
        }
        println!(
            "{}: {} step: {rows} rows x S = {s}, 1 warm-up + {reps} timed steps",
            sh.name,
            algo.as_str()
        );
    }
    report(sh.name, &rec, &algos, "step", tokens);
}

fn cuda(c: &mut Criterion) {
    if std::env::var("DFPO_BENCH_BIG_CPU").is_ok_and(|v| v == "1") {
        big(
            c,
            BigShape {
                name: "train_step_bigcpu",
                config: qwen2_config("qwen2-small-bigvocab", 128, 2, 2, 256),
                b: 8,
                s: 64,
                prompt: 16,
                device: "cpu",
            },
        );
    }
    let config = qwen2_config("qwen2-0.5b-shape", 896, 24, 14, 4864);
    if dfpo::device::cuda_device().is_none() {
        println!(
            "train_step_cuda: no device ({}), skipped",
            dfpo::device::cuda_unavailable_reason()
        );
        return;
    }
    big(
        c,
        BigShape {
            name: "train_step_cuda",
            config,
            b: 8,
            s: 512,
            prompt: 64,
            device: "cuda",
        },
    );
}

criterion_group!(benches, cpu, cuda);
criterion_main!(benches);
