//! The built-in chained-addition task, where credit assignment over tokens matters: the model
//! writes a scratchpad of one addition per line and the reward reads only the last number, so
//! one wrong digit anywhere in a ~40-token response makes the whole response wrong.
//!
//! Prompt `"23+41+17+35+12="`, answer (what the SFT warm start learns to write, and what the
//! checker reads the reference from) `"23+41=64;64+17=81;81+35=116;116+12=128"`: line i adds
//! operand i+1 to the running sum. Checker `chain`: the integer after the last `=` of the
//! response (see [`crate::task::checkers::chain_extract`]).
//!
//! Splits (operands uniform in [`OPERAND_RANGE`]):
//! - in-domain: [`IN_DOMAIN_OPERANDS`] operands (4 lines, responses of 36-40 tokens with EOS).
//! - out-of-domain: [`OUT_OF_DOMAIN_OPERANDS`] operands (6 lines, 58-62 tokens): longer
//!   responses and larger sums. The SFT warm start sees this length in a minority of its data
//!   ([`SFT_OOD_FRACTION`]); RL trains on in-domain prompts only.
//! - validation: in-domain-shaped prompts carved from the TRAINING side (never trained on by
//!   RL), for choosing variants and learning rates without touching the eval splits.
//!
//! Every prompt belongs to one partition by a hash of its operands, independent of any seed:
//! 2 in [`BUCKETS`] held out for evaluation, 1 for validation, the rest for training (SFT and
//! RL). The eval and validation sets are FIXED (drawn with a constant seed, whatever the run's
//! seed), so every seed and algorithm is scored on the same prompts.

use std::path::Path;

use super::Example;
use crate::error::Result;
use crate::kernels::splitmix64;
use crate::model::config::{ModelConfig, ModelType};

/// The ordinary tokens, one character each (ids 4.. after the special tokens of
/// [`super::arith`]).
pub const CHARS: &str = "0123456789+=;";
/// Operand range (inclusive).
pub const OPERAND_RANGE: (u32, u32) = (10, 49);
/// Operands of an in-domain prompt.
pub const IN_DOMAIN_OPERANDS: usize = 5;
/// Operands of an out-of-domain prompt.
pub const OUT_OF_DOMAIN_OPERANDS: usize = 7;
/// Share of out-of-domain-shaped examples in the SFT data of the warm start.
pub const SFT_OOD_FRACTION: f64 = 0.3;
/// Hash buckets: 0 and 1 are held out for evaluation, 2 is validation, the rest train.
pub const BUCKETS: u64 = 10;
/// Fixed sizes of the eval pools (the "whole held-out pool" of the comparison) and of the
/// validation set.
pub const IN_DOMAIN_POOL: usize = 400;
pub const OUT_OF_DOMAIN_POOL: usize = 200;
pub const VALIDATION_POOL: usize = 200;
/// Distinct training prompts per run (drawn per seed; 100 steps x 16 prompts use 1 600).
pub const TRAIN_POOL: usize = 8192;
/// The longest answer in tokens (an out-of-domain scratchpad, with EOS): rollouts and evals
/// need `rollout.max_new_tokens` at least this large.
pub const MAX_ANSWER_TOKENS: usize = 63;
/// `rollout.max_new_tokens` of a chain run unless given (the longest answer fits).
pub const ROLLOUT_MAX_NEW_TOKENS: usize = 64;
/// The seed of the fixed eval and validation sets.
const FIXED_SEED: u64 = 0x0C4A_15E7;

/// The prompts' partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    HeldOut,
    Validation,
    Train,
}

/// The vocabulary in id order.
pub fn vocab() -> Vec<String> {
    super::arith::vocab_of(CHARS)
}

/// The tokenizer.json (the arith builder with [`CHARS`]).
pub fn tokenizer_json() -> String {
    super::arith::tokenizer_json_of(CHARS)
}

/// The tokenizer_config.json.
pub fn tokenizer_config_json() -> String {
    super::arith::tokenizer_config_json_of(96)
}

/// Writes tokenizer.json and tokenizer_config.json into `dir`.
pub fn write_tokenizer_files(dir: &Path) -> Result<()> {
    super::arith::write_tokenizer_files_of(dir, &tokenizer_json(), &tokenizer_config_json())
}

/// The tiny model: [`super::arith::model_config`] (hidden 128, 2 layers, 2 heads of 64) with
/// this vocabulary and 96 positions (the longest prompt, 22 tokens with BOS, plus the longest
/// answer).
pub fn model_config() -> ModelConfig {
    let mut c = super::arith::model_config();
    c.model_type = ModelType::Llama;
    c.vocab_size = vocab().len();
    c.max_position_embeddings = 96;
    c
}

/// Writes a randomly initialised model of [`model_config`] with the tokenizer (tests).
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

/// The example of `ops`: the prompt and its scratchpad answer.
pub fn example(ops: &[u32]) -> Example {
    let prompt = ops.iter().map(u32::to_string).collect::<Vec<_>>().join("+") + "=";
    let mut lines = Vec::with_capacity(ops.len().saturating_sub(1));
    let mut acc = ops[0] as u64;
    for &x in &ops[1..] {
        let next = acc + x as u64;
        lines.push(format!("{acc}+{x}={next}"));
        acc = next;
    }
    Example {
        prompt,
        answer: lines.join(";"),
    }
}

/// The partition of the prompt with operands `ops`.
pub fn part(ops: &[u32]) -> Part {
    let mut h = 0x0C4A_17ED_u64;
    for &x in ops {
        h = splitmix64(h ^ x as u64);
    }
    match splitmix64(h ^ ops.len() as u64) % BUCKETS {
        0 | 1 => Part::HeldOut,
        2 => Part::Validation,
        _ => Part::Train,
    }
}

/// `n` distinct prompts of `n_ops` operands in partition `want`, in a `seed`-determined order.
fn draw(n_ops: usize, want: Part, n: usize, seed: u64) -> Vec<Example> {
    let (lo, hi) = OPERAND_RANGE;
    let span = (hi - lo + 1) as u64;
    let mut state = splitmix64(seed ^ 0x00C4_A1ED_5EED ^ ((n_ops as u64) << 40));
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let ops: Vec<u32> = (0..n_ops)
            .map(|_| {
                state = splitmix64(state);
                lo + (state % span) as u32
            })
            .collect();
        if part(&ops) == want && seen.insert(ops.clone()) {
            out.push(example(&ops));
        }
    }
    out
}

/// The fixed in-domain eval set (the first `n` of the held-out pool; `n` ≤ [`IN_DOMAIN_POOL`]
/// for the whole pool; independent of any run seed).
pub fn in_domain(n: usize) -> Vec<Example> {
    draw(IN_DOMAIN_OPERANDS, Part::HeldOut, n, FIXED_SEED)
}

/// The fixed out-of-domain eval set.
pub fn out_of_domain(n: usize) -> Vec<Example> {
    draw(OUT_OF_DOMAIN_OPERANDS, Part::HeldOut, n, FIXED_SEED + 1)
}

/// The fixed validation set: in-domain-shaped prompts of the validation partition (never in
/// the RL training prompts, never in the eval sets).
pub fn validation(n: usize) -> Vec<Example> {
    draw(IN_DOMAIN_OPERANDS, Part::Validation, n, FIXED_SEED + 2)
}

/// `n` distinct in-domain training prompts in a seed-determined order.
pub fn train_examples(n: usize, seed: u64) -> Vec<Example> {
    draw(IN_DOMAIN_OPERANDS, Part::Train, n, seed.wrapping_add(2))
}

/// `n` out-of-domain-shaped training prompts (for the SFT mix).
pub fn ood_train_examples(n: usize, seed: u64) -> Vec<Example> {
    draw(OUT_OF_DOMAIN_OPERANDS, Part::Train, n, seed.wrapping_add(3))
}

/// The SFT data of the warm start: `n` examples, a share `ood_fraction` out-of-domain-shaped,
/// interleaved evenly (deterministic per seed).
pub fn sft_examples(n: usize, ood_fraction: f64, seed: u64) -> Vec<Example> {
    let n_ood = ((n as f64) * ood_fraction.clamp(0.0, 1.0)).round() as usize;
    let ind = train_examples(n - n_ood, seed);
    let ood = ood_train_examples(n_ood, seed);
    let (mut a, mut b) = (ind.into_iter(), ood.into_iter());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let take_ood = n_ood > 0 && ((i + 1) * n_ood / n) > (i * n_ood / n);
        out.extend(if take_ood { b.next() } else { a.next() });
    }
    out
}

/// Whether a prompt of this task is in the state-dependent noise subset (its first operand is
/// odd): the generic rule of [`crate::task::first_operand_odd`].
pub fn in_noisy_subset(prompt: &str) -> bool {
    super::first_operand_odd(prompt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Checker;

    #[test]
    fn example_and_checker_agree() {
        let e = example(&[23, 41, 17, 35, 12]);
        assert_eq!(e.prompt, "23+41+17+35+12=");
        assert_eq!(e.answer, "23+41=64;64+17=81;81+35=116;116+12=128");
        let c = Checker::Chain;
        assert_eq!(c.reference(&e.answer), "128");
        assert_eq!(c.check(&e.answer, &e.answer), crate::task::Verdict::Correct);
        assert_eq!(
            c.check("23+41=64;64+17=81;81+35=116;116+12=127", &e.answer),
            crate::task::Verdict::Incorrect
        );
        assert_eq!(c.check("23+41", &e.answer), crate::task::Verdict::Unparsed);
        assert!(c.right_shape("23+41=64;64+17=81;81+35=116;116+12=127", &e.prompt));
        assert!(!c.right_shape("23+41=64;64+17=81;81+35=127", &e.prompt));
        assert!(!c.right_shape("23+41=64;64+17=81;81+35=116;116+12=", &e.prompt));
    }

    #[test]
    fn partitions_are_disjoint_and_fixed() {
        let ind = in_domain(IN_DOMAIN_POOL);
        let val = validation(VALIDATION_POOL);
        let train = train_examples(2000, 5);
        let p: std::collections::HashSet<&str> = ind.iter().map(|e| e.prompt.as_str()).collect();
        assert_eq!(p.len(), IN_DOMAIN_POOL);
        for e in val.iter().chain(&train) {
            assert!(
                !p.contains(e.prompt.as_str()),
                "{} is in two splits",
                e.prompt
            );
        }
        let v: std::collections::HashSet<&str> = val.iter().map(|e| e.prompt.as_str()).collect();
        assert!(train.iter().all(|e| !v.contains(e.prompt.as_str())));
        // Fixed: the same prompts every call; train order depends on the seed.
        assert_eq!(in_domain(10), ind[..10].to_vec());
        assert_ne!(train_examples(10, 1), train_examples(10, 2));
    }

    #[test]
    fn lengths_fit_the_model() {
        let tok_len = |s: &str| s.chars().count();
        let worst_ood = example(&[49; OUT_OF_DOMAIN_OPERANDS]);
        let worst_ind = example(&[49; IN_DOMAIN_OPERANDS]);
        let best_ind = example(&[10; IN_DOMAIN_OPERANDS]);
        assert!(tok_len(&worst_ood.answer) < MAX_ANSWER_TOKENS);
        assert!(tok_len(&best_ind.answer) + 1 >= 30, "{}", best_ind.answer);
        assert!(tok_len(&worst_ind.answer) < 200);
        let longest = 1 + tok_len(&worst_ood.prompt) + MAX_ANSWER_TOKENS;
        assert!(longest <= model_config().max_position_embeddings);
        for ch in worst_ood.prompt.chars().chain(worst_ood.answer.chars()) {
            assert!(CHARS.contains(ch));
        }
    }

    #[test]
    fn one_key_selects_the_task() {
        use crate::train::config::TrainConfig;
        let c = TrainConfig::load(None, &["data.task=chain".into()]).unwrap();
        assert_eq!(c.model.policy, crate::model::builtin::BUILTIN_CHAIN);
        assert_eq!(c.data.checker, "chain");
        assert_eq!(c.rollout.max_new_tokens, ROLLOUT_MAX_NEW_TOKENS);
        let c = TrainConfig::load(
            None,
            &[
                "data.task=chain".into(),
                "rollout.max_new_tokens=70".into(),
                "model.policy=/some/folder".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.rollout.max_new_tokens, 70);
        assert_eq!(c.model.policy, "/some/folder");
        // The default run is untouched.
        let d = TrainConfig::load(None, &[]).unwrap();
        assert_eq!(d, TrainConfig::default());
        assert_eq!(d.model.policy, "builtin");
        // A debiased reward needs error rates below 1/2 in total.
        let e = TrainConfig::load(
            None,
            &["reward.flip_prob=0.5".into(), "reward.debias=true".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("reward.debias"), "{e}");
    }

    #[test]
    fn the_shared_tokenizer_builder_keeps_the_shipped_files() {
        // The arith files the builder writes are the shipped ones, byte for byte; the chain
        // files too.
        assert_eq!(
            super::super::arith::tokenizer_json(),
            include_str!("../../assets/arith-sft/tokenizer.json")
        );
        assert_eq!(
            super::super::arith::tokenizer_config_json(),
            include_str!("../../assets/arith-sft/tokenizer_config.json")
        );
        assert_eq!(
            tokenizer_json(),
            include_str!("../../assets/chain-sft/tokenizer.json")
        );
        assert_eq!(vocab().len(), 17);
    }
}
