//! The built-in verifiable arithmetic task: "a+b=" → the decimal sum, a char-level tokenizer we
//! build ourselves, and the tiny Llama-shaped model that learns it (the shipped warm start lives
//! in `assets/arith-sft`, made by `tools/make-builtin-sft`).
//!
//! Splits (prompts are `"{a}+{b}="`, answers `"{a+b}"`; the model answers digits then EOS):
//! - in-domain: a, b uniform in 10..=99 (two-digit operands; 8 100 prompts).
//! - out-of-domain: a in 100..=999, b in 10..=99 (a three-digit first operand: a longer prompt,
//!   other digit positions, answers up to 1098). The SFT warm start sees this shape in a minority
//!   of its data ([`SFT_OOD_FRACTION`]), so it transfers partially; RL trains on in-domain
//!   prompts only.
//!
//! Every prompt belongs to a fixed held-out partition or not (a hash of (a, b), independent of
//! any seed; 1 in [`HELD_OUT_ONE_IN`]). Eval prompts come from the held-out partition, training
//! prompts (SFT and RL) from the rest, so train and eval never share a prompt, whatever the seeds.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::Example;
use crate::error::Result;
use crate::kernels::splitmix64;
use crate::model::checkpoint::write_atomic;
use crate::model::config::{ModelConfig, ModelType};

/// Special tokens, ids 0..4 in this order.
pub const PAD: &str = "<pad>";
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
pub const UNK: &str = "<unk>";
/// The ordinary tokens, one character each, ids 4.. in this order.
pub const CHARS: &str = "0123456789+-*=. ";
/// Ids of the special tokens.
pub const PAD_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;
pub const UNK_ID: u32 = 3;

/// One prompt in this many is held out for evaluation.
pub const HELD_OUT_ONE_IN: u64 = 5;
/// Share of out-of-domain-shaped examples in the SFT data of the shipped warm start.
pub const SFT_OOD_FRACTION: f64 = 0.3;

/// Operand ranges (inclusive) of the in-domain split: (a, b).
pub const IN_DOMAIN: ((u32, u32), (u32, u32)) = ((10, 99), (10, 99));
/// Operand ranges (inclusive) of the out-of-domain split: (a, b).
pub const OUT_OF_DOMAIN: ((u32, u32), (u32, u32)) = ((100, 999), (10, 99));

/// The shipped warm start as an HF folder: the copy embedded in the binary
/// ([`crate::model::builtin`]), written to the cache folder on first use.
pub fn builtin_dir() -> Result<PathBuf> {
    crate::model::builtin::builtin_dir()
}

/// The vocabulary in id order.
pub fn vocab() -> Vec<String> {
    vocab_of(CHARS)
}

/// The special tokens then one token per character of `chars`, in id order (the vocabulary of
/// every built-in char-level task).
pub fn vocab_of(chars: &str) -> Vec<String> {
    let mut v: Vec<String> = [PAD, BOS, EOS, UNK].iter().map(|s| s.to_string()).collect();
    v.extend(chars.chars().map(String::from));
    v
}

/// The tokenizer.json: a BPE model with one token per character and no merges (so every string
/// of [`CHARS`] encodes to one token per character, anything else to `<unk>`), no normaliser or
/// pre-tokeniser, a BOS prepended by the post-processor, and the `Fuse` decoder (concatenate).
pub fn tokenizer_json() -> String {
    tokenizer_json_of(CHARS)
}

/// [`tokenizer_json`] for the vocabulary [`vocab_of`]`(chars)` (the builder every built-in
/// char-level task shares).
pub fn tokenizer_json_of(chars: &str) -> String {
    let vocab = vocab_of(chars);
    let added: Vec<Value> = vocab[..4]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let mut vmap = serde_json::Map::new();
    for (i, t) in vocab.iter().enumerate() {
        vmap.insert(t.clone(), json!(i));
    }
    let v = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}
            ],
            "pair": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {BOS: {"id": BOS, "ids": [BOS_ID], "tokens": [BOS]}}
        },
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": UNK,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vmap,
            "merges": []
        }
    });
    let mut s = serde_json::to_string_pretty(&v).expect("a Value always serializes");
    s.push('\n');
    s
}

/// The tokenizer_config.json naming the special tokens (no chat template: prompts are raw).
pub fn tokenizer_config_json() -> String {
    tokenizer_config_json_of(64)
}

/// [`tokenizer_config_json`] with `model_max_length` = `max_len`.
pub fn tokenizer_config_json_of(max_len: usize) -> String {
    let v = json!({
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "add_bos_token": true,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast"
    });
    let mut s = serde_json::to_string_pretty(&v).expect("a Value always serializes");
    s.push('\n');
    s
}

/// Writes a randomly initialised model of [`model_config`] (seeded) with the task's tokenizer
/// as an HF folder: a stand-in policy for tests and benches.
pub fn write_random_model(dir: &Path, seed: u64) -> Result<()> {
    let dec = crate::model::init::random_decoder(model_config(), seed)?;
    crate::model::checkpoint::save_hf_folder(
        dir,
        &dec.config,
        dec.params(),
        crate::model::checkpoint::Dtype::F32,
        &[],
    )?;
    write_tokenizer_files(dir)
}

/// Writes tokenizer.json and tokenizer_config.json into `dir` (created if needed), atomically.
pub fn write_tokenizer_files(dir: &Path) -> Result<()> {
    write_tokenizer_files_of(dir, &tokenizer_json(), &tokenizer_config_json())
}

/// Writes the given tokenizer.json and tokenizer_config.json texts into `dir` (created if
/// needed), atomically.
pub fn write_tokenizer_files_of(dir: &Path, tj: &str, tc: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| crate::Error::Io {
        path: dir.display().to_string(),
        source,
    })?;
    write_atomic(dir.join("tokenizer.json"), |w| w.write_all(tj.as_bytes()))?;
    write_atomic(dir.join("tokenizer_config.json"), |w| {
        w.write_all(tc.as_bytes())
    })
}

/// The tiny Llama-shaped model: hidden 128, 2 layers, 2 query heads of 64 (the CUDA attention
/// kernel's head size), 1 KV head, SwiGLU width 256, tied embeddings, 64 positions.
pub fn model_config() -> ModelConfig {
    let mut extra = serde_json::Map::new();
    extra.insert("initializer_range".into(), json!(0.02));
    extra.insert("attention_dropout".into(), json!(0.0));
    extra.insert("mlp_bias".into(), json!(false));
    extra.insert("pretraining_tp".into(), json!(1));
    extra.insert("use_cache".into(), json!(true));
    ModelConfig {
        model_type: ModelType::Llama,
        vocab_size: vocab().len(),
        hidden_size: 128,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        attention_bias: false,
        bos_token_id: Some(BOS_ID),
        eos_token_ids: vec![EOS_ID],
        pad_token_id: Some(PAD_ID),
        torch_dtype: Some("float32".into()),
        extra,
    }
}

/// The example "a+b=" → "a+b".
pub fn example(a: u32, b: u32) -> Example {
    Example {
        prompt: format!("{a}+{b}="),
        answer: (a as u64 + b as u64).to_string(),
    }
}

/// Whether (a, b) is in the fixed held-out (evaluation) partition.
pub fn is_held_out(a: u32, b: u32) -> bool {
    let key = ((a as u64) << 32) | b as u64;
    splitmix64(key ^ 0xA11_7E57_5EED).is_multiple_of(HELD_OUT_ONE_IN)
}

/// Every (a, b) of `ranges` on the held-out side (`held_out`) or the training side.
fn pool(ranges: ((u32, u32), (u32, u32)), held_out: bool) -> Vec<(u32, u32)> {
    let ((a0, a1), (b0, b1)) = ranges;
    let mut out = Vec::new();
    for a in a0..=a1 {
        for b in b0..=b1 {
            if is_held_out(a, b) == held_out {
                out.push((a, b));
            }
        }
    }
    out
}

/// `n` examples from `pool` in a seed-determined order: distinct while `n` fits the pool, then
/// the pool again in a fresh order (so any `n` works; the pools hold 1 600 to 65 000 prompts).
fn draw(pool: &[(u32, u32)], n: usize, seed: u64) -> Vec<Example> {
    let mut out = Vec::with_capacity(n);
    let mut state = splitmix64(seed ^ 0x005E_ED0F_A817);
    let mut round = 0u64;
    while out.len() < n && !pool.is_empty() {
        let mut p = pool.to_vec();
        // Fisher-Yates with splitmix64 draws.
        for i in (1..p.len()).rev() {
            state = splitmix64(state ^ round);
            let j = (state % (i as u64 + 1)) as usize;
            p.swap(i, j);
        }
        out.extend(p.iter().take(n - out.len()).map(|&(a, b)| example(a, b)));
        round += 1;
    }
    out
}

/// Number of held-out in-domain prompts (the most distinct in-domain eval prompts).
pub fn in_domain_pool_size() -> usize {
    pool(IN_DOMAIN, true).len()
}

/// Number of in-domain training prompts (the most distinct [`train_examples`]).
pub fn train_pool_size() -> usize {
    pool(IN_DOMAIN, false).len()
}

/// `n` held-out in-domain eval examples (distinct up to [`in_domain_pool_size`], ~1 600).
pub fn in_domain(n: usize, seed: u64) -> Vec<Example> {
    draw(&pool(IN_DOMAIN, true), n, seed)
}

/// `n` held-out out-of-domain eval examples (distinct up to the pool's ~16 000).
pub fn out_of_domain(n: usize, seed: u64) -> Vec<Example> {
    draw(&pool(OUT_OF_DOMAIN, true), n, seed.wrapping_add(1))
}

/// `n` in-domain training examples (never a held-out prompt; distinct up to
/// [`train_pool_size`], ~6 500).
pub fn train_examples(n: usize, seed: u64) -> Vec<Example> {
    draw(&pool(IN_DOMAIN, false), n, seed.wrapping_add(2))
}

/// `n` out-of-domain-shaped training examples (never a held-out prompt), for the SFT mix.
pub fn ood_train_examples(n: usize, seed: u64) -> Vec<Example> {
    draw(&pool(OUT_OF_DOMAIN, false), n, seed.wrapping_add(3))
}

/// The SFT data of the warm start: `n` examples, a share `ood_fraction` of them
/// out-of-domain-shaped, interleaved evenly (deterministic per seed).
pub fn sft_examples(n: usize, ood_fraction: f64, seed: u64) -> Vec<Example> {
    let n_ood = ((n as f64) * ood_fraction.clamp(0.0, 1.0)).round() as usize;
    let ind = train_examples(n - n_ood, seed);
    let ood = ood_train_examples(n_ood, seed);
    // Even interleave: position i takes an OOD example when floor((i+1)·k/n) grows.
    let (mut a, mut b) = (ind.into_iter(), ood.into_iter());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let take_ood = n_ood > 0 && ((i + 1) * n_ood / n) > (i * n_ood / n);
        let next = if take_ood { b.next() } else { a.next() };
        out.extend(next);
    }
    out
}
