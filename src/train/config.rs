//! The run configuration: one TOML file (sections below) plus `--set section.key=value`
//! overrides. Every field has a default, so an empty config is the built-in run.
//!
//! Loading, overrides, validation and the option listing live here; the trainer only reads the
//! resolved [`TrainConfig`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which algorithm trains the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    /// PPO with the distributional value-flow critic (the mission).
    Dfpo,
    /// PPO with a scalar value head and value clipping.
    Ppo,
    /// Group-normalised rewards, no critic.
    Grpo,
    /// PPO with a K-quantile critic (quantile-Huber + the same tail terms, as in DVPO).
    Quantile,
}

impl Algo {
    /// Every algorithm, in the order the tools list them.
    pub const ALL: [Algo; 4] = [Algo::Dfpo, Algo::Ppo, Algo::Grpo, Algo::Quantile];

    /// The algorithm named `s` (the TOML spelling), if any.
    pub fn parse(s: &str) -> Option<Algo> {
        Algo::ALL.into_iter().find(|a| a.as_str() == s)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Algo::Dfpo => "dfpo",
            Algo::Ppo => "ppo",
            Algo::Grpo => "grpo",
            Algo::Quantile => "quantile",
        }
    }
    pub fn has_critic(self) -> bool {
        self != Algo::Grpo
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Output folder: metrics.jsonl, checkpoints/, final/ (HF export), config.toml.
    pub out_dir: String,
    pub seed: u64,
    /// "auto" (CUDA when present, else CPU), "cpu" or "cuda".
    pub device: String,
    /// RL steps (one rollout batch + its PPO epochs each).
    pub steps: usize,
    /// Evaluate every this many steps (0: only before and after).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Checkpoints kept (oldest removed first), >= 1.
    pub keep_checkpoints: usize,
    /// "auto" (resume from the newest checkpoint in out_dir/checkpoints when there is one, else
    /// start afresh), "true" (a checkpoint must exist) or "false" (a fresh run: the folder must
    /// be empty). A resumed checkpoint's configuration fingerprint must match (run_dir.rs).
    pub resume: String,
    /// What a non-finite loss or gradient does: "skip" (drop the update, log it) or "stop".
    pub on_nonfinite: String,
    /// Show the progress bar (stderr).
    pub progress: bool,
    /// Rows of each step's batch written to samples.jsonl (0: none).
    pub log_samples: usize,
    /// Start afresh in a folder holding a dfpo-train run, removing only what dfpo-train wrote.
    pub overwrite: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            out_dir: "runs/default".into(),
            seed: 1,
            device: "auto".into(),
            steps: 100,
            eval_every: 0,
            save_every: 50,
            keep_checkpoints: 2,
            resume: "auto".into(),
            on_nonfinite: "skip".into(),
            progress: true,
            log_samples: 4,
            overwrite: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Policy initialisation: "builtin" (the shipped SFT warm start of the arithmetic task) or
    /// an HF folder (config.json, safetensors, tokenizer.json).
    pub policy: String,
    /// Critic backbone initialisation: "" = same as the policy.
    pub critic: String,
    /// Reference policy for the KL term: "" = the initial policy.
    pub reference: String,
    /// Recompute each decoder layer's activations in the backward instead of keeping them
    /// (per-layer activation checkpointing): memory of one layer's activations instead of all
    /// of them, for one more forward of every layer (~+1/3 of the trunk's FLOPs in an update).
    /// Off by default (HF / TRL / OpenRLHF's `gradient_checkpointing` default).
    pub gradient_checkpointing: bool,
}

impl ModelSection {
    /// How the decoders of this run build their graphs.
    pub fn build_options(&self) -> crate::model::decoder::BuildOptions {
        crate::model::decoder::BuildOptions {
            recompute_layers: self.gradient_checkpointing,
            ..Default::default()
        }
    }

    /// Loads the HF folder `dir` as a decoder with this section's build options.
    pub fn load_decoder(
        &self,
        dir: &std::path::Path,
    ) -> crate::Result<crate::model::decoder::Decoder> {
        let mut d = crate::model::decoder::Decoder::load(dir)?;
        d.set_build_options(self.build_options());
        Ok(d)
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            policy: "builtin".into(),
            critic: String::new(),
            reference: String::new(),
            gradient_checkpointing: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// "arith" or "chain" (built-in tasks) or "jsonl" (train_file/eval_files).
    pub task: String,
    /// JSONL {"prompt","answer"} training prompts (task = "jsonl").
    pub train_file: String,
    /// JSONL eval sets as "name=path" (task = "jsonl"); the arith task has "in_domain" and
    /// "out_of_domain".
    pub eval_files: Vec<String>,
    /// Answer checker: "arith" (exact integer), "gsm8k" (`#### n`) or "math" (`\boxed{}`).
    pub checker: String,
    /// Apply the tokenizer's chat template to prompts.
    pub chat_template: bool,
    /// Eval prompts per split (0: all).
    pub eval_size: usize,
    /// Largest share of reference answers (at load) or of responses (at the first eval) the
    /// checker may fail to read before the run stops with an error (warnings below it).
    pub max_unparsed: f64,
    /// JSONL field of the prompt (verl's data.prompt_key; HF GSM8K: "question").
    pub prompt_key: String,
    /// JSONL field of the reference answer.
    pub answer_key: String,
    /// Longest prompt in tokens (0: only the model's max_position_embeddings limits it).
    pub max_prompt_length: usize,
    /// A longer prompt: "error" (verl's default: name it and stop), "left" (keep its last
    /// max_prompt_length tokens, as TRL does) or "drop" (skip it, counted in the log).
    pub truncation: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            task: "arith".into(),
            train_file: String::new(),
            eval_files: Vec::new(),
            checker: "arith".into(),
            chat_template: false,
            eval_size: 500,
            max_unparsed: 0.5,
            prompt_key: "prompt".into(),
            answer_key: "answer".into(),
            max_prompt_length: 0,
            truncation: "error".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// Prompts per RL step.
    pub prompts_per_step: usize,
    /// Samples per prompt (GRPO's group size).
    pub n_samples: usize,
    pub max_new_tokens: usize,
    pub temperature: f32,
    /// 0: off.
    pub top_k: usize,
    /// 1.0: off.
    pub top_p: f32,
    /// Stop strings: a response ends with the token that completes one (kept in the response).
    pub stop: Vec<String>,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            prompts_per_step: 16,
            n_samples: 4,
            max_new_tokens: 8,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            stop: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// Training reward flipped (correct ↔ incorrect) with this probability.
    pub flip_prob: f64,
    /// Zero-mean Gaussian noise of this std added to the training reward.
    pub gaussian_sigma: f64,
    /// Asymmetric label noise (after the symmetric flip): a reported-correct response becomes
    /// incorrect with this probability (false negatives; train/noise.rs).
    pub fn_prob: f64,
    /// A reported-incorrect response becomes correct with this probability (false positives).
    pub fp_prob: f64,
    /// Scale of additive Student-t noise (0: off).
    pub t_scale: f64,
    /// Degrees of freedom of the Student-t noise (> 0; small = heavy tails).
    pub t_nu: f64,
    /// Probability of an additive outlier of ±outlier_mag (either sign equally likely).
    pub outlier_prob: f64,
    pub outlier_mag: f64,
    /// State-dependent noise: "none", or "odd_first" (prompts whose first integer is odd flip
    /// with subset_flip_prob instead of flip_prob).
    pub subset: String,
    pub subset_flip_prob: f64,
    /// Flawed verifier: a wrong answer of the right shape earns this share of the way from the
    /// incorrect to the correct reward (0: off).
    pub partial_credit: f64,
    /// Debiased reward under the known label error rates, c0 + (r - c0 - q0(c1 - c0))/(1 - q0
    /// - q1); (r - p)/(1 - 2p) for symmetric flips of 0/1 rewards.
    pub debias: bool,
    pub correct: f64,
    pub incorrect: f64,
    /// An external reward program (JSONL over stdin/stdout, reward_cmd.rs); "" = the checker.
    pub command: String,
    /// Seconds the program may take to answer one batch.
    pub timeout_s: f64,
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            flip_prob: 0.2,
            gaussian_sigma: 0.0,
            fn_prob: 0.0,
            fp_prob: 0.0,
            t_scale: 0.0,
            t_nu: 3.0,
            outlier_prob: 0.0,
            outlier_mag: 5.0,
            subset: "none".into(),
            subset_flip_prob: 0.0,
            partial_credit: 0.0,
            debias: false,
            correct: 1.0,
            incorrect: 0.0,
            command: String::new(),
            timeout_s: 60.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KlConfig {
    /// Coefficient of the KL penalty (0: no reference model run).
    pub coef: f64,
    /// "k1" (log-ratio), "k3" (unbiased, non-negative) or "auto": k1 in the reward (TRL, method
    /// doc 2.1), k3 in the loss (verl's low_var_kl).
    pub estimator: String,
    /// Adaptive controller (Ziegler et al.) toward `target`.
    pub adaptive: bool,
    /// Target KL per sequence (summed over the response, averaged over the batch; TRL's unit).
    pub target: f64,
    pub horizon: f64,
    /// Where the KL goes: "auto" (grpo: the actor loss, as verl's use_kl_loss, since its
    /// advantages see only the sequence rewards; the critic algorithms: the reward), "reward"
    /// (a per-token penalty in the token rewards) or "loss" (a term of the actor loss).
    pub placement: String,
}

impl Default for KlConfig {
    fn default() -> Self {
        KlConfig {
            coef: 0.001,
            estimator: "auto".into(),
            adaptive: false,
            target: 6.0,
            horizon: 10000.0,
            placement: "auto".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoConfig {
    /// Lower clip ε (ratio ≥ 1 − clip_low).
    pub clip_low: f64,
    /// Upper clip ε ("clip-higher": ratio ≤ 1 + clip_high).
    pub clip_high: f64,
    pub ent_coef: f64,
    /// "token-mean" or "seq-mean".
    pub agg: String,
    pub epochs: usize,
    pub minibatches: usize,
    /// Rows per forward/backward pass (gradient accumulation over a minibatch's micro-batches;
    /// 0: the whole minibatch in one pass). The graphs are built for this batch, so it bounds
    /// the activation memory; the update is the same (the loss weights are normalised over the
    /// whole minibatch, so the micro-batch gradients sum to the minibatch's).
    pub micro_batch_size: usize,
    pub gamma: f64,
    pub lam: f64,
    /// Whiten advantages over the batch.
    pub whiten: bool,
    /// PPO baseline: value clip range (0: off).
    pub value_clip: f64,
    /// GRPO's reward scale: "unbiased" (the group's sample std, verl/TRL), "population" or
    /// "none" (Dr. GRPO).
    pub grpo_std: String,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            clip_low: 0.2,
            clip_high: 0.2,
            ent_coef: 0.0,
            agg: "token-mean".into(),
            epochs: 1,
            minibatches: 2,
            micro_batch_size: 0,
            gamma: 1.0,
            lam: 0.95,
            whiten: true,
            value_clip: 0.2,
            grpo_std: "unbiased".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriticConfig {
    /// Value samples (dfpo) or quantiles (quantile) per token.
    pub k: usize,
    /// Flow head hidden width and depth (hidden layers).
    pub head_width: usize,
    pub head_depth: usize,
    /// Euler steps of the readout used for values/advantages (the paper: 1).
    pub readout_steps: usize,
    /// Steps of the target solves: the DCFM z' (rollout-time critic, over [0, τ]) and the
    /// geometric-consistency target (the current critic, stop-gradient, over [0, 1]).
    pub target_steps: usize,
    /// "euler" or "midpoint" (for the target solves).
    pub solver: String,
    /// Clip return samples (the end of every [0, 1] solve) to the reachable return range (the
    /// rewards ± 3σ of Gaussian reward noise ± β·T for a KL in the reward); the partial [0, τ]
    /// solves of the DCFM target are not clipped.
    pub clip_returns: bool,
    /// Confidence temperature κ of the uncertainty weight.
    pub kappa: f64,
    /// "up" (Value Flows: up-weight uncertain tokens), "down" (inverse), or "none".
    pub weight_direction: String,
    pub w_dcfm: f64,
    pub w_bcfm: f64,
    pub w_gc: f64,
    pub w_cvar: f64,
    pub w_gain: f64,
    pub w_shape: f64,
    /// Lower / upper tail fractions.
    pub alpha: f64,
    pub beta: f64,
    /// Quantile-Huber κ (quantile critic).
    pub huber_kappa: f64,
    /// Bootstrapped-anchor target: "lambda" (the distributional λ-return G) or "td" (r + γ z').
    pub anchor: String,
    /// What the DFPO risk terms (CVaR, upper tail, tail shape) compare with: "token" (each
    /// response token's own distributional-GAE targets, as the method doc specifies; these
    /// come from one trajectory and collapse the critic's spread, docs/RESULTS.md) or "prompt"
    /// (the default: only at the first response token, whose state the n samples of a prompt
    /// share, against the pooled targets of the group).
    pub risk_targets: String,
    /// Quantile critic: the quantile-Huber loss "sum"s over the K predicted quantiles and
    /// averages over the targets (QR-DQN), or takes the "mean" over both (K times smaller).
    pub quantile_norm: String,
}

impl Default for CriticConfig {
    fn default() -> Self {
        CriticConfig {
            k: 32,
            head_width: 32,
            head_depth: 2,
            readout_steps: 1,
            target_steps: 10,
            solver: "euler".into(),
            clip_returns: true,
            kappa: 0.3,
            weight_direction: "up".into(),
            w_dcfm: 1.0,
            w_bcfm: 1.0,
            w_gc: 2.0,
            w_cvar: 1.0,
            w_gain: 1.0,
            w_shape: 1.0,
            alpha: 0.1,
            beta: 0.1,
            huber_kappa: 1.0,
            anchor: "lambda".into(),
            risk_targets: "prompt".into(),
            quantile_norm: "sum".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub actor_lr: f64,
    pub critic_lr: f64,
    /// Warmup fraction of the total optimizer steps.
    pub warmup_frac: f64,
    /// "cosine" or "constant" after warmup.
    pub schedule: String,
    /// Cosine floor as a fraction of the peak.
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip per model (0: off).
    pub max_grad_norm: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            actor_lr: 1e-4,
            critic_lr: 1e-3,
            warmup_frac: 0.1,
            schedule: "cosine".into(),
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Greedy decoding (else sampling at rollout temperature).
    pub greedy: bool,
    /// pass@k samples per prompt (1 with greedy).
    pub pass_k: usize,
    /// Critic calibration after training (`critic_calibration.json`): states sampled from
    /// rollouts of training prompts (0: off).
    pub critic_prefixes: usize,
    /// Continuations of the current policy per state: the Monte-Carlo truth.
    pub critic_continuations: usize,
    /// The flow critic is also scored with its readout solved in this many Euler steps (0: not).
    pub critic_ode_steps: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            greedy: true,
            pass_k: 1,
            critic_prefixes: 0,
            critic_continuations: 64,
            critic_ode_steps: 10,
        }
    }
}

/// The whole resolved configuration.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub algo: AlgoSection,
    pub run: RunConfig,
    pub model: ModelSection,
    pub data: DataConfig,
    pub rollout: RolloutConfig,
    pub reward: RewardConfig,
    pub kl: KlConfig,
    pub ppo: PpoConfig,
    pub critic: CriticConfig,
    pub optim: OptimConfig,
    pub eval: EvalConfig,
    /// `dfpo-train sft` only.
    pub sft: super::sft::SftArgs,
    /// `dfpo-train score` only.
    pub score: crate::model::score::ScoreArgs,
    /// `dfpo-train export` only.
    pub export: ExportConfig,
}

/// `dfpo-train export`: a checkpoint's policy and critic as HF folders.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// A checkpoint folder (RUN/checkpoints/step-N) or a run folder (its newest checkpoint).
    pub checkpoint: String,
    /// Output folder: policy/ and critic/ (new or empty).
    pub out: String,
    /// Replace an earlier export in `out` (only the files export writes).
    pub overwrite: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlgoSection {
    pub name: Algo,
}

impl Default for AlgoSection {
    fn default() -> Self {
        AlgoSection { name: Algo::Dfpo }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading, overrides, validation, listing.
// ---------------------------------------------------------------------------------------------

/// One line of documentation per option key. `options_help` lists the keys in the order of the
/// serialized defaults and takes the text from here; a unit test checks that this table and the
/// defaults name exactly the same keys, so neither can drift.
const OPTION_DOCS: &[(&str, &str)] = &[
    (
        "algo.name",
        "dfpo | ppo | grpo | quantile (grpo has no critic)",
    ),
    (
        "run.out_dir",
        "output folder: metrics.jsonl, checkpoints/, final/ (HF export), config.toml",
    ),
    ("run.seed", "random seed (0 ..= 2^63-1)"),
    (
        "run.device",
        "auto (CUDA when present, else CPU) | cpu | cuda",
    ),
    (
        "run.steps",
        "RL steps (one rollout batch + its PPO epochs each), >= 1",
    ),
    (
        "run.eval_every",
        "evaluate every this many steps (0: only before and after)",
    ),
    (
        "run.save_every",
        "checkpoint every this many steps (0: only at the end)",
    ),
    (
        "run.keep_checkpoints",
        "checkpoints kept (oldest removed first), >= 1",
    ),
    (
        "run.resume",
        "auto (continue the newest checkpoint of this configuration if there is one, else start afresh; verl's default) | true (a checkpoint must exist) | false (a new run: the folder must be empty)",
    ),
    (
        "run.on_nonfinite",
        "skip (drop the update, log it) | stop: on a non-finite loss or gradient",
    ),
    ("run.progress", "show the progress bar on stderr"),
    (
        "run.log_samples",
        "responses of each step written to samples.jsonl (prompt, response, answer, rewards; 0: none)",
    ),
    (
        "run.overwrite",
        "start afresh in a folder holding a dfpo-train run: removes only what dfpo-train wrote (run.json, config.toml, metrics.jsonl, samples.jsonl, summary.json, checkpoints/, final/)",
    ),
    (
        "model.policy",
        "policy init: builtin (the shipped SFT warm start) or an HF folder",
    ),
    (
        "model.critic",
        "critic backbone init (\"\": same as the policy)",
    ),
    (
        "model.reference",
        "reference policy for the KL term (\"\": the initial policy)",
    ),
    (
        "model.gradient_checkpointing",
        "recompute each layer's activations in the backward instead of keeping them: memory of one layer's activations, for one more forward of every layer (~+1/3 of the trunk's update FLOPs); a Qwen2-0.5B step of 64 x 1024 tokens needs it on an 80 GB card (docs/PERF.md)",
    ),
    (
        "data.task",
        "arith (the built-in addition task) | chain (the built-in chained-addition task with a scratchpad, 36-62-token answers; sets the keys not given: model.policy builtin -> builtin-chain, data.checker chain, rollout.max_new_tokens 64) | jsonl (data.train_file, data.eval_files)",
    ),
    (
        "data.train_file",
        "JSONL {\"prompt\",\"answer\"} training prompts (needed when task = jsonl)",
    ),
    (
        "data.eval_files",
        "eval sets as [\"name=path.jsonl\", ...] (task = jsonl)",
    ),
    (
        "data.checker",
        "answer checker: arith (exact integer) | gsm8k (#### n) | math (\\boxed{}) | chain (the integer after the last =)",
    ),
    (
        "data.chat_template",
        "apply the tokenizer's chat template to prompts",
    ),
    ("data.eval_size", "eval prompts per split (0: all)"),
    (
        "data.max_unparsed",
        "largest share, in [0, 1], of reference answers (at load) or responses (first eval) the checker may fail to read; above it the run stops with an error, above 0 it warns",
    ),
    (
        "data.prompt_key",
        "JSONL field of the prompt (verl's data.prompt_key; HF GSM8K: question)",
    ),
    ("data.answer_key", "JSONL field of the reference answer"),
    (
        "data.max_prompt_length",
        "longest prompt in tokens (0: only max_position_embeddings - rollout.max_new_tokens)",
    ),
    (
        "data.truncation",
        "a longer prompt: error (verl's default) | left (keep its last tokens, as TRL) | drop (skip it)",
    ),
    ("rollout.prompts_per_step", "prompts per RL step, >= 1"),
    (
        "rollout.n_samples",
        "samples per prompt (the GRPO group size), >= 1 (grpo: >= 2)",
    ),
    (
        "rollout.max_new_tokens",
        "response length limit in tokens, >= 1",
    ),
    ("rollout.temperature", "sampling temperature, > 0"),
    ("rollout.top_k", "top-k sampling (0: off)"),
    ("rollout.top_p", "nucleus sampling, in (0, 1] (1: off)"),
    (
        "rollout.stop",
        "stop strings, e.g. [\"\\n\\n\"]: a response (rollout and eval) ends with the token completing one",
    ),
    (
        "reward.flip_prob",
        "training reward flipped (correct <-> incorrect) with this probability, in [0, 1]",
    ),
    (
        "reward.gaussian_sigma",
        "std of zero-mean Gaussian noise added to the training reward, >= 0",
    ),
    (
        "reward.fn_prob",
        "false negatives: a reported-correct training reward becomes incorrect with this probability (after the flip), in [0, 1]",
    ),
    (
        "reward.fp_prob",
        "false positives: a reported-incorrect training reward becomes correct with this probability (after the flip), in [0, 1]",
    ),
    (
        "reward.t_scale",
        "scale of additive Student-t noise on the training reward, >= 0 (0: off)",
    ),
    (
        "reward.t_nu",
        "degrees of freedom of the Student-t noise, > 0 (1: Cauchy)",
    ),
    (
        "reward.outlier_prob",
        "probability of an additive outlier of +-reward.outlier_mag on the training reward, in [0, 1]",
    ),
    ("reward.outlier_mag", "size of the outliers, >= 0"),
    (
        "reward.subset",
        "state-dependent noise: none | odd_first (prompts whose first integer is odd flip with reward.subset_flip_prob instead of reward.flip_prob)",
    ),
    (
        "reward.subset_flip_prob",
        "flip probability on the prompts of reward.subset, in [0, 1]",
    ),
    (
        "reward.partial_credit",
        "flawed verifier: a wrong answer of the right shape (chain: a full scratchpad; others: a readable answer) earns this share of correct - incorrect, in [0, 1] (0: off)",
    ),
    (
        "reward.debias",
        "replace the training reward by its unbiased estimate under the known label error rates ((r - p)/(1 - 2p) for flips of 0/1 rewards; needs total error rates below 1)",
    ),
    ("reward.correct", "reward of a correct answer"),
    ("reward.incorrect", "reward of an incorrect answer"),
    (
        "reward.command",
        "external reward program (sh -c), JSONL over stdin/stdout (README); \"\": the data.checker rewards",
    ),
    (
        "reward.timeout_s",
        "seconds reward.command may take to answer one batch, > 0",
    ),
    (
        "kl.coef",
        "KL penalty coefficient (see kl.placement; 0.001 as the method doc's DVPO recipe, verl's kl_loss_coef), >= 0 (0: no reference model run)",
    ),
    (
        "kl.estimator",
        "k1 (log-ratio) | k3 (unbiased, non-negative) | auto (k1 in the reward as TRL, k3 in the loss as verl's low_var_kl)",
    ),
    (
        "kl.adaptive",
        "adaptive KL controller (Ziegler et al.) toward kl.target",
    ),
    (
        "kl.target",
        "target KL of the adaptive controller per sequence (summed over the response, TRL's unit), > 0",
    ),
    ("kl.horizon", "horizon of the adaptive controller, > 0"),
    (
        "kl.placement",
        "auto (grpo: the actor loss, verl's use_kl_loss; dfpo/ppo/quantile: the reward, method doc 2.1) | reward (per-token penalty in the token rewards) | loss (a term of the actor loss)",
    ),
    (
        "ppo.clip_low",
        "lower clip: ratio >= 1 - clip_low, in [0, 1)",
    ),
    (
        "ppo.clip_high",
        "upper clip (clip-higher): ratio <= 1 + clip_high, >= 0",
    ),
    ("ppo.ent_coef", "entropy bonus coefficient, >= 0"),
    ("ppo.agg", "loss aggregation: token-mean | seq-mean"),
    ("ppo.epochs", "PPO epochs over each rollout batch, >= 1"),
    (
        "ppo.minibatches",
        "minibatches per epoch, >= 1, dividing prompts_per_step * n_samples",
    ),
    (
        "ppo.micro_batch_size",
        "responses per forward/backward pass; the minibatch's gradients are accumulated over its micro-batches before one optimizer step (verl's ppo_micro_batch_size, TRL's gradient accumulation; the loss is normalised over the whole minibatch, so the update equals the one-pass update up to float rounding). 0: the whole minibatch in one pass. Must divide the minibatch (prompts_per_step * n_samples / minibatches)",
    ),
    ("ppo.gamma", "discount, in [0, 1]"),
    ("ppo.lam", "GAE lambda, in [0, 1]"),
    ("ppo.whiten", "whiten advantages over the batch"),
    (
        "ppo.value_clip",
        "ppo baseline: value clip range, >= 0 (0: off)",
    ),
    (
        "ppo.grpo_std",
        "grpo: divide the group-centred rewards by the group's std: unbiased (n - 1, verl/TRL) | population (n) | none (Dr. GRPO)",
    ),
    (
        "critic.k",
        "value samples (dfpo) or quantiles (quantile) per token, 2 ..= 1024 (each tail needs >= 2 when critic.w_shape > 0)",
    ),
    (
        "critic.head_width",
        "flow head hidden width, a multiple of 32 in 32 ..= 512",
    ),
    ("critic.head_depth", "flow head hidden layers, 1 ..= 8"),
    (
        "critic.readout_steps",
        "Euler steps of the readout for values/advantages (the paper: 1), >= 1",
    ),
    (
        "critic.target_steps",
        "steps of the target solves (DCFM z' of the rollout-time critic; the consistency target of the current critic, stop-gradient), >= 1",
    ),
    ("critic.solver", "euler | midpoint (the target solves)"),
    (
        "critic.clip_returns",
        "clip return samples (the end of each [0, 1] solve) to the reachable return range (rewards +- 3 sigma of reward noise +- kl.coef * max_new_tokens when the KL is in the reward); partial [0, tau] solves are not clipped",
    ),
    (
        "critic.kappa",
        "confidence temperature of the uncertainty weight, > 0",
    ),
    (
        "critic.weight_direction",
        "up (up-weight uncertain tokens, as Value Flows) | down | none",
    ),
    (
        "critic.w_dcfm",
        "weight of the distributional conditional flow-matching term, >= 0",
    ),
    (
        "critic.w_bcfm",
        "weight of the bootstrapped-anchor term (BCFM), >= 0",
    ),
    (
        "critic.w_gc",
        "weight of the geometric-consistency term, >= 0",
    ),
    ("critic.w_cvar", "weight of the lower-tail CVaR term, >= 0"),
    (
        "critic.w_gain",
        "weight of the upper-tail (gain) term, >= 0",
    ),
    ("critic.w_shape", "weight of the tail-shape term, >= 0"),
    ("critic.alpha", "lower tail fraction, in (0, 1]"),
    ("critic.beta", "upper tail fraction, in (0, 1]"),
    (
        "critic.huber_kappa",
        "quantile-Huber threshold (quantile critic), > 0",
    ),
    (
        "critic.anchor",
        "bootstrapped-anchor target: lambda (distributional lambda-return) | td",
    ),
    (
        "critic.risk_targets",
        "dfpo risk terms against each token's own targets (token) or the group-pooled targets at the first response token (prompt)",
    ),
    (
        "critic.quantile_norm",
        "quantile critic's quantile-Huber loss: sum over the K quantiles, mean over the targets (QR-DQN) | mean over both (K times smaller)",
    ),
    ("optim.actor_lr", "policy peak learning rate, >= 0"),
    ("optim.critic_lr", "critic peak learning rate, >= 0"),
    (
        "optim.warmup_frac",
        "warmup fraction of the total optimizer steps, in [0, 1]",
    ),
    ("optim.schedule", "cosine | constant (after warmup)"),
    (
        "optim.min_lr_ratio",
        "cosine floor as a fraction of the peak, in [0, 1]",
    ),
    (
        "optim.weight_decay",
        "AdamW weight decay of the matrices (never norms or biases, also inside the flow head), >= 0",
    ),
    ("optim.beta1", "AdamW beta1, in [0, 1)"),
    ("optim.beta2", "AdamW beta2, in [0, 1)"),
    ("optim.eps", "AdamW epsilon, > 0"),
    (
        "optim.max_grad_norm",
        "global gradient-norm clip per model, >= 0 (0: off)",
    ),
    (
        "eval.greedy",
        "greedy decoding in eval (else sampling at the rollout temperature)",
    ),
    (
        "eval.pass_k",
        "pass@k samples per prompt, >= 1 (must be 1 with greedy)",
    ),
    (
        "eval.critic_prefixes",
        "critic calibration after training (critic_calibration.json; tools/plot_calibration.py): states sampled from rollouts of training prompts, 0: off",
    ),
    (
        "eval.critic_continuations",
        "critic calibration: continuations of the current policy per state (the Monte-Carlo truth), >= 2",
    ),
    (
        "eval.critic_ode_steps",
        "critic calibration: also score the flow critic's readout solved in this many Euler steps (0: not)",
    ),
    (
        "sft.model",
        "builtin (the shipped warm start) | builtin-init (a random init of its architecture) | an HF folder",
    ),
    (
        "sft.data",
        "arith (the built-in task's SFT mix) | a JSONL file of {prompt, answer} lines",
    ),
    (
        "sft.eval_files",
        "eval sets of JSONL data as [\"name=path.jsonl\", ...] (arith has its own)",
    ),
    ("sft.checker", "answer checker of the evals: arith | gsm8k | math"),
    (
        "sft.out",
        "output HF folder: new or empty (or an earlier sft output with sft.overwrite)",
    ),
    (
        "sft.overwrite",
        "replace an earlier sft output in sft.out (only the files sft writes; others are kept)",
    ),
    ("sft.steps", "optimizer steps, >= 1"),
    ("sft.batch", "sequences per step, >= 1"),
    (
        "sft.lr",
        "peak learning rate, > 0 (2e-5, TRL's default: safe for a trained model; a random init needs ~1.5e-3)",
    ),
    (
        "sft.warmup_frac",
        "warmup as a fraction of the steps, in [0, 1]",
    ),
    ("sft.weight_decay", "AdamW weight decay, >= 0"),
    (
        "sft.max_grad_norm",
        "global gradient-norm clip, >= 0 (0: off)",
    ),
    ("sft.seed", "seeds the init, the data order and the eval prompts"),
    (
        "sft.eval_size",
        "eval prompts per eval set (0: all of a JSONL set; arith: the held-out pool)",
    ),
    (
        "sft.ood_frac",
        "arith data: share of out-of-domain-shaped examples, in [0, 1]",
    ),
    (
        "sft.train_size",
        "arith data: distinct training examples (0: steps x batch)",
    ),
    ("sft.max_new_tokens", "longest generated answer in the evals"),
    (
        "sft.chat_template",
        "wrap prompts in the tokenizer's chat template",
    ),
    (
        "sft.device",
        "cpu (the tested, deterministic default) | cuda | auto",
    ),
    (
        "sft.log_every",
        "log the mean loss every this many steps (0: never)",
    ),
    ("sft.schedule", "cosine (to 10% of the peak) | constant, after warmup"),
    (
        "sft.eval_every",
        "also evaluate every this many steps (0: only before and after)",
    ),
    ("sft.eval_before", "evaluate before training"),
    ("sft.prompt_key", "JSONL field of the prompt (HF GSM8K: question)"),
    ("sft.answer_key", "JSONL field of the answer"),
    (
        "score.model",
        "builtin | an HF folder (config.json, safetensors, tokenizer.json)",
    ),
    (
        "score.data",
        "input JSONL with \"prompt\" and \"response\" string fields",
    ),
    (
        "score.out",
        "output JSONL (new, or replaced with score.overwrite; never the input)",
    ),
    ("score.overwrite", "replace an existing score.out"),
    ("score.batch", "records per forward pass, >= 1"),
    ("score.device", "cpu | cuda | auto (CUDA when present)"),
    (
        "export.checkpoint",
        "a checkpoint folder (RUN/checkpoints/step-N) or a run folder (its newest checkpoint)",
    ),
    (
        "export.out",
        "output folder: policy/ and critic/ as HF folders (new or empty)",
    ),
    (
        "export.overwrite",
        "replace an earlier export in export.out (only the files export writes)",
    ),
];

/// Where a resolved value came from, so a validation error can name the file line or `--set`.
#[derive(Clone, Debug)]
enum Origin {
    File { path: String, line: usize },
    Set(String),
}

/// A failed check: the keys it is about (the first user-set one is blamed) and the problem.
struct Violation {
    keys: &'static [&'static str],
    msg: String,
}

impl TrainConfig {
    /// Defaults ← the TOML file (if any) ← each `section.key=value` override in order, then
    /// [`validate`](Self::validate). Every error names the file (or `--set`), the key and the
    /// problem.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<TrainConfig> {
        let schema = default_table();
        let mut merged = toml::Table::new();
        let mut origins: BTreeMap<String, Origin> = BTreeMap::new();
        if let Some(path) = path {
            merge_file(&schema, path, &mut merged, &mut origins)?;
        }
        for set in sets {
            merge_set(&schema, set, &mut merged, &mut origins)?;
        }
        let mut cfg: TrainConfig =
            toml::Value::Table(merged)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    // Every key and type was checked above, so this is not expected.
                    Error::Invalid(format!("config: {}", e.to_string().trim_end()))
                })?;
        cfg.apply_task_defaults(|k| origins.contains_key(k));
        if let Err(v) = cfg.check() {
            let blamed = v.keys.iter().find_map(|k| origins.get(*k).map(|o| (*k, o)));
            return Err(match blamed {
                Some((key, Origin::File { path, line })) => Error::Format {
                    path: path.clone(),
                    msg: format!("line {line}: {key}: {}", v.msg),
                },
                Some((key, Origin::Set(arg))) => Error::Format {
                    path: "--set".into(),
                    msg: format!("`{arg}`: {key}: {}", v.msg),
                },
                None => Error::Invalid(format!("config {}: {} (default value)", v.keys[0], v.msg)),
            });
        }
        Ok(cfg)
    }

    /// The built-in chain task's own defaults for the keys the file and the `--set`s did not
    /// give (`given`): with `data.task = "chain"`, `model.policy = "builtin"` is the chain warm
    /// start (`builtin-chain`), `data.checker` is `chain`, `rollout.max_new_tokens` is
    /// [`crate::task::chain::ROLLOUT_MAX_NEW_TOKENS`]. So one key selects the task.
    pub fn apply_task_defaults(&mut self, given: impl Fn(&str) -> bool) {
        if self.data.task != "chain" {
            return;
        }
        if !given("model.policy") && self.model.policy == crate::model::builtin::BUILTIN {
            self.model.policy = crate::model::builtin::BUILTIN_CHAIN.into();
        }
        if !given("data.checker") {
            self.data.checker = "chain".into();
        }
        if !given("rollout.max_new_tokens") {
            self.rollout.max_new_tokens = crate::task::chain::ROLLOUT_MAX_NEW_TOKENS;
        }
    }

    /// Checks ranges, enumerations and the cross-field rules; the error names the key.
    pub fn validate(&self) -> Result<()> {
        self.check()
            .map_err(|v| Error::Invalid(format!("config {}: {}", v.keys[0], v.msg)))
    }

    /// Whether the KL penalty is a term of the actor loss (else it is in the token rewards).
    pub fn kl_in_loss(&self) -> bool {
        match self.kl.placement.as_str() {
            "loss" => true,
            "reward" => false,
            _ => self.algo.name == Algo::Grpo,
        }
    }

    /// The KL estimator: as set, or ("auto") k3 in the loss and k1 in the reward.
    pub fn kl_kind(&self) -> crate::kernels::rl::KlKind {
        use crate::kernels::rl::KlKind;
        match self.kl.estimator.as_str() {
            "k1" => KlKind::K1,
            "k3" => KlKind::K3,
            _ if self.kl_in_loss() => KlKind::K3,
            _ => KlKind::K1,
        }
    }

    /// The resolved configuration as TOML, loadable again by [`load`](Self::load).
    pub fn to_toml(&self) -> String {
        match toml::to_string(self) {
            Ok(s) => format!("# dfpo-train run configuration (resolved)\n{s}"),
            // Only a seed above i64::MAX cannot be written; validate() rejects it.
            Err(e) => format!("# dfpo-train: this configuration cannot be written as TOML: {e}\n"),
        }
    }

    /// Every option with its default and meaning as a valid TOML file (`[section]` headers,
    /// `key = default  # doc`), in declaration order: `dfpo-train config > run.toml`.
    pub fn options_help() -> String {
        let lines = default_lines();
        let width = lines
            .iter()
            .map(|(k, v)| k.split_once('.').map_or(0, |(_, b)| b.len()) + 3 + v.len())
            .max()
            .unwrap_or(0);
        let mut out = String::from(
            "# dfpo-train configuration: every key with its default and meaning (valid TOML).\n\
             # Use it as --config FILE (keep only what you change), or set one key with\n\
             # --set section.key=value. Order: defaults, --config, the flags --model/--data/\n\
             # --out/--overwrite, then each --set. train and eval read every section but\n\
             # [sft], [score] and [export], which only those commands read.\n",
        );
        let mut section = "";
        for (key, value) in &lines {
            let (sec, name) = key.split_once('.').unwrap_or(("", key));
            if sec != section {
                out.push_str(&format!("\n[{sec}]\n"));
                section = sec;
            }
            let doc = option_doc(key).unwrap_or("(undocumented)");
            let left = format!("{name} = {value}");
            out.push_str(&format!("{left:<width$}  # {doc}\n"));
        }
        out
    }

    fn check(&self) -> std::result::Result<(), Violation> {
        fn fail(keys: &'static [&'static str], msg: String) -> std::result::Result<(), Violation> {
            Err(Violation { keys, msg })
        }
        macro_rules! key {
            ($k:literal) => {
                &[$k]
            };
        }
        fn one_of(
            keys: &'static [&'static str],
            v: &str,
            allowed: &[&str],
        ) -> std::result::Result<(), Violation> {
            if allowed.contains(&v) {
                Ok(())
            } else {
                fail(
                    keys,
                    format!("must be one of {}, got {v:?}", allowed.join(" | ")),
                )
            }
        }
        fn at_least(
            keys: &'static [&'static str],
            v: usize,
            min: usize,
        ) -> std::result::Result<(), Violation> {
            if v >= min {
                Ok(())
            } else {
                fail(keys, format!("must be >= {min}, got {v}"))
            }
        }
        /// `v` finite and inside the interval written as `lo`/`hi` with open/closed ends.
        fn range(
            keys: &'static [&'static str],
            v: f64,
            lo: Option<(f64, bool)>,
            hi: Option<(f64, bool)>,
        ) -> std::result::Result<(), Violation> {
            let lo_ok = lo.is_none_or(|(l, closed)| if closed { v >= l } else { v > l });
            let hi_ok = hi.is_none_or(|(h, closed)| if closed { v <= h } else { v < h });
            if v.is_finite() && lo_ok && hi_ok {
                return Ok(());
            }
            let want = match (lo, hi) {
                (Some((l, lc)), Some((h, hc))) => format!(
                    "in {}{l}, {h}{}",
                    if lc { '[' } else { '(' },
                    if hc { ']' } else { ')' }
                ),
                (Some((l, true)), None) => format!(">= {l}"),
                (Some((l, false)), None) => format!("> {l}"),
                (None, Some((h, true))) => format!("<= {h}"),
                (None, Some((h, false))) => format!("< {h}"),
                (None, None) => "finite".into(),
            };
            fail(keys, format!("must be {want}, got {v}"))
        }
        const NONNEG: Option<(f64, bool)> = Some((0.0, true));
        const POS: Option<(f64, bool)> = Some((0.0, false));
        const LE1: Option<(f64, bool)> = Some((1.0, true));
        const LT1: Option<(f64, bool)> = Some((1.0, false));

        let r = &self.run;
        if r.out_dir.trim().is_empty() {
            fail(key!("run.out_dir"), "must not be empty".into())?;
        }
        if r.seed > i64::MAX as u64 {
            fail(
                key!("run.seed"),
                format!(
                    "must be <= {} (TOML integers are i64), got {}",
                    i64::MAX,
                    r.seed
                ),
            )?;
        }
        one_of(key!("run.device"), &r.device, &["auto", "cpu", "cuda"])?;
        at_least(key!("run.steps"), r.steps, 1)?;
        at_least(key!("run.keep_checkpoints"), r.keep_checkpoints, 1)?;
        one_of(key!("run.on_nonfinite"), &r.on_nonfinite, &["skip", "stop"])?;
        one_of(key!("run.resume"), &r.resume, &["auto", "true", "false"])?;
        if r.overwrite && r.resume == "true" {
            fail(
                &["run.overwrite", "run.resume"],
                "run.overwrite = true starts afresh, run.resume = true continues a checkpoint: \
                 choose one"
                    .into(),
            )?;
        }

        if self.model.policy.trim().is_empty() {
            fail(
                key!("model.policy"),
                "must be \"builtin\" or an HF folder, got \"\"".into(),
            )?;
        }

        let d = &self.data;
        one_of(key!("data.task"), &d.task, &["arith", "chain", "jsonl"])?;
        if d.task == "jsonl" && d.train_file.trim().is_empty() {
            fail(
                &["data.train_file", "data.task"],
                "data.task = \"jsonl\" needs a training file (data.train_file)".into(),
            )?;
        }
        let mut names = Vec::new();
        for spec in &d.eval_files {
            match spec.split_once('=') {
                Some((name, file)) if !name.trim().is_empty() && !file.trim().is_empty() => {
                    if names.contains(&name.trim()) {
                        fail(
                            key!("data.eval_files"),
                            format!("eval set name {:?} appears twice", name.trim()),
                        )?;
                    }
                    names.push(name.trim());
                }
                _ => fail(
                    key!("data.eval_files"),
                    format!("each entry must be \"name=path\", got {spec:?}"),
                )?,
            }
        }
        if !d.eval_files.is_empty() && d.task != "jsonl" {
            fail(
                &["data.eval_files", "data.task"],
                format!(
                    "eval files are read only with data.task = \"jsonl\" (task is {:?})",
                    d.task
                ),
            )?;
        }
        one_of(
            key!("data.checker"),
            &d.checker,
            &["arith", "gsm8k", "math", "chain"],
        )?;
        range(key!("data.max_unparsed"), d.max_unparsed, NONNEG, LE1)?;
        one_of(
            key!("data.truncation"),
            &d.truncation,
            &["error", "left", "drop"],
        )?;
        if d.prompt_key.is_empty() || d.answer_key.is_empty() || d.prompt_key == d.answer_key {
            fail(
                &["data.prompt_key", "data.answer_key"],
                format!(
                    "must be two different non-empty field names, got {:?} and {:?}",
                    d.prompt_key, d.answer_key
                ),
            )?;
        }

        let ro = &self.rollout;
        at_least(key!("rollout.prompts_per_step"), ro.prompts_per_step, 1)?;
        at_least(key!("rollout.n_samples"), ro.n_samples, 1)?;
        if self.algo.name == Algo::Grpo && ro.n_samples < 2 {
            fail(
                &["rollout.n_samples", "algo.name"],
                format!("grpo normalises rewards within a group and needs >= 2 samples per prompt, got {}", ro.n_samples),
            )?;
        }
        at_least(key!("rollout.max_new_tokens"), ro.max_new_tokens, 1)?;
        range(
            key!("rollout.temperature"),
            ro.temperature as f64,
            POS,
            None,
        )?;
        range(key!("rollout.top_p"), ro.top_p as f64, POS, LE1)?;
        if ro.stop.iter().any(String::is_empty) {
            fail(
                key!("rollout.stop"),
                "stop strings must not be empty".into(),
            )?;
        }

        let rw = &self.reward;
        range(key!("reward.flip_prob"), rw.flip_prob, NONNEG, LE1)?;
        range(
            key!("reward.gaussian_sigma"),
            rw.gaussian_sigma,
            NONNEG,
            None,
        )?;
        for (k, v) in [
            (key!("reward.fn_prob"), rw.fn_prob),
            (key!("reward.fp_prob"), rw.fp_prob),
            (key!("reward.outlier_prob"), rw.outlier_prob),
            (key!("reward.subset_flip_prob"), rw.subset_flip_prob),
            (key!("reward.partial_credit"), rw.partial_credit),
        ] {
            range(k, v, NONNEG, LE1)?;
        }
        range(key!("reward.t_scale"), rw.t_scale, NONNEG, None)?;
        range(key!("reward.t_nu"), rw.t_nu, POS, None)?;
        range(key!("reward.outlier_mag"), rw.outlier_mag, NONNEG, None)?;
        one_of(key!("reward.subset"), &rw.subset, &["none", "odd_first"])?;
        if rw.debias {
            for sub in [false, true] {
                let (q0, q1) = super::noise::label_error_rates(rw, sub);
                if q0 + q1 >= 1.0 - 1e-6 {
                    fail(
                        &["reward.debias", "reward.flip_prob"],
                        format!(
                            "the label error rates add up to {:.3} (>= 1): the debiased reward \
                             divides by 1 - q0 - q1",
                            q0 + q1
                        ),
                    )?;
                }
            }
            if rw.correct == rw.incorrect {
                fail(
                    &["reward.debias", "reward.correct"],
                    "reward.correct = reward.incorrect: nothing to debias".into(),
                )?;
            }
        }
        range(key!("reward.correct"), rw.correct, None, None)?;
        range(key!("reward.incorrect"), rw.incorrect, None, None)?;
        range(key!("reward.timeout_s"), rw.timeout_s, POS, None)?;
        if !rw.command.is_empty()
            && (rw.fn_prob > 0.0
                || rw.fp_prob > 0.0
                || rw.subset != "none"
                || rw.partial_credit > 0.0
                || rw.debias)
        {
            fail(
                &["reward.command"],
                "the label noise models (reward.fn_prob, fp_prob, subset, partial_credit, \
                 debias) act on the checker's verdict; with reward.command set only the additive \
                 ones (gaussian_sigma, t_scale, outlier_prob) apply"
                    .into(),
            )?;
        }
        if !rw.command.is_empty() && rw.flip_prob > 0.0 {
            fail(
                &["reward.flip_prob", "reward.command"],
                "flips swap the checker's correct/incorrect rewards; with reward.command set \
                 reward.flip_prob = 0 (reward.gaussian_sigma still applies)"
                    .into(),
            )?;
        }

        let kl = &self.kl;
        range(key!("kl.coef"), kl.coef, NONNEG, None)?;
        one_of(key!("kl.estimator"), &kl.estimator, &["auto", "k1", "k3"])?;
        one_of(
            key!("kl.placement"),
            &kl.placement,
            &["auto", "reward", "loss"],
        )?;
        range(key!("kl.target"), kl.target, POS, None)?;
        range(key!("kl.horizon"), kl.horizon, POS, None)?;

        let p = &self.ppo;
        range(key!("ppo.clip_low"), p.clip_low, NONNEG, LT1)?;
        range(key!("ppo.clip_high"), p.clip_high, NONNEG, None)?;
        range(key!("ppo.ent_coef"), p.ent_coef, NONNEG, None)?;
        one_of(key!("ppo.agg"), &p.agg, &["token-mean", "seq-mean"])?;
        at_least(key!("ppo.epochs"), p.epochs, 1)?;
        at_least(key!("ppo.minibatches"), p.minibatches, 1)?;
        let batch = ro.prompts_per_step * ro.n_samples;
        if !batch.is_multiple_of(p.minibatches) {
            fail(
                &["ppo.minibatches", "rollout.prompts_per_step", "rollout.n_samples"],
                format!(
                    "{} minibatches do not divide the batch of prompts_per_step * n_samples = {} * {} = {batch} responses",
                    p.minibatches, ro.prompts_per_step, ro.n_samples
                ),
            )?;
        }
        let minibatch = batch / p.minibatches.max(1);
        if p.micro_batch_size > 0 && !minibatch.is_multiple_of(p.micro_batch_size) {
            fail(
                &["ppo.micro_batch_size", "ppo.minibatches"],
                format!(
                    "a micro-batch of {} responses does not divide the minibatch of {minibatch} (prompts_per_step * n_samples / minibatches)",
                    p.micro_batch_size
                ),
            )?;
        }
        range(key!("ppo.gamma"), p.gamma, NONNEG, LE1)?;
        range(key!("ppo.lam"), p.lam, NONNEG, LE1)?;
        range(key!("ppo.value_clip"), p.value_clip, NONNEG, None)?;
        one_of(
            key!("ppo.grpo_std"),
            &p.grpo_std,
            &["unbiased", "population", "none"],
        )?;

        let c = &self.critic;
        if !(2..=crate::kernels::risk::MAX_K).contains(&c.k) {
            fail(
                key!("critic.k"),
                format!(
                    "must be in 2 ..= {}, got {}",
                    crate::kernels::risk::MAX_K,
                    c.k
                ),
            )?;
        }
        let max_w = crate::kernels::flow::MAX_WIDTH;
        if c.head_width < 32 || c.head_width > max_w || !c.head_width.is_multiple_of(32) {
            fail(
                key!("critic.head_width"),
                format!(
                    "must be a multiple of 32 in 32 ..= {max_w}, got {}",
                    c.head_width
                ),
            )?;
        }
        let max_d = crate::kernels::flow::MAX_DEPTH;
        if !(1..=max_d).contains(&c.head_depth) {
            fail(
                key!("critic.head_depth"),
                format!("must be in 1 ..= {max_d}, got {}", c.head_depth),
            )?;
        }
        at_least(key!("critic.readout_steps"), c.readout_steps, 1)?;
        at_least(key!("critic.target_steps"), c.target_steps, 1)?;
        one_of(key!("critic.solver"), &c.solver, &["euler", "midpoint"])?;
        range(key!("critic.kappa"), c.kappa, POS, None)?;
        one_of(
            key!("critic.weight_direction"),
            &c.weight_direction,
            &["up", "down", "none"],
        )?;
        range(key!("critic.w_dcfm"), c.w_dcfm, NONNEG, None)?;
        range(key!("critic.w_bcfm"), c.w_bcfm, NONNEG, None)?;
        range(key!("critic.w_gc"), c.w_gc, NONNEG, None)?;
        range(key!("critic.w_cvar"), c.w_cvar, NONNEG, None)?;
        range(key!("critic.w_gain"), c.w_gain, NONNEG, None)?;
        range(key!("critic.w_shape"), c.w_shape, NONNEG, None)?;
        range(key!("critic.alpha"), c.alpha, POS, LE1)?;
        range(key!("critic.beta"), c.beta, POS, LE1)?;
        // A tail of one sample has variance 0 in the prediction and the target alike: the
        // tail-shape term would be identically 0 while its weight says it is on.
        let risk_algo = matches!(self.algo.name, Algo::Dfpo | Algo::Quantile);
        for (side, frac) in [("lower", c.alpha), ("upper", c.beta)] {
            let n = crate::kernels::risk::tail_count(frac as f32, c.k);
            if risk_algo && c.w_shape > 0.0 && n < 2 {
                fail(
                    &["critic.w_shape", "critic.k", "critic.alpha", "critic.beta"],
                    format!(
                        "critic.w_shape = {} compares tail variances, but at critic.k = {} the {side} tail holds {n} sample (max(1, floor({frac} * {}))): it needs at least 2 (raise critic.k or the tail fraction, or set critic.w_shape = 0)",
                        c.w_shape, c.k, c.k
                    ),
                )?;
            }
        }
        range(key!("critic.huber_kappa"), c.huber_kappa, POS, None)?;
        one_of(key!("critic.anchor"), &c.anchor, &["lambda", "td"])?;
        one_of(
            key!("critic.risk_targets"),
            &c.risk_targets,
            &["token", "prompt"],
        )?;
        one_of(
            key!("critic.quantile_norm"),
            &c.quantile_norm,
            &["sum", "mean"],
        )?;

        let o = &self.optim;
        range(key!("optim.actor_lr"), o.actor_lr, NONNEG, None)?;
        range(key!("optim.critic_lr"), o.critic_lr, NONNEG, None)?;
        range(key!("optim.warmup_frac"), o.warmup_frac, NONNEG, LE1)?;
        one_of(key!("optim.schedule"), &o.schedule, &["cosine", "constant"])?;
        range(key!("optim.min_lr_ratio"), o.min_lr_ratio, NONNEG, LE1)?;
        range(key!("optim.weight_decay"), o.weight_decay, NONNEG, None)?;
        range(key!("optim.beta1"), o.beta1, NONNEG, LT1)?;
        range(key!("optim.beta2"), o.beta2, NONNEG, LT1)?;
        range(key!("optim.eps"), o.eps, POS, None)?;
        range(key!("optim.max_grad_norm"), o.max_grad_norm, NONNEG, None)?;

        at_least(key!("eval.pass_k"), self.eval.pass_k, 1)?;
        if self.eval.critic_prefixes > 0 {
            at_least(
                key!("eval.critic_continuations"),
                self.eval.critic_continuations,
                2,
            )?;
        }
        if self.eval.greedy && self.eval.pass_k > 1 {
            fail(
                &["eval.pass_k", "eval.greedy"],
                format!("pass@{} needs sampling: set eval.greedy = false (greedy decoding gives one answer per prompt)", self.eval.pass_k),
            )?;
        }
        Ok(())
    }
}

/// The arguments every subcommand takes: `--config FILE`, `--set section.key=value`
/// (repeatable), and the shortcuts `--model`, `--data`, `--out`, `--overwrite` for the keys of
/// the command's section ([`Command::shortcut_keys`]).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// TOML configuration (sections as in `dfpo-train config`); defaults when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Set one option, e.g. --set run.steps=10 (repeatable, applied in order, last).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// The model the command reads: "builtin" (the shipped warm start) or an HF folder.
    #[arg(long)]
    pub model: Option<String>,
    /// The data the command reads: a JSONL file ("arith": the built-in task).
    #[arg(long)]
    pub data: Option<String>,
    /// Where the command writes (train: the run folder; sft, export: a model folder; score: a
    /// JSONL file).
    #[arg(long)]
    pub out: Option<String>,
    /// Replace what an earlier run of the command wrote in --out (never other files).
    #[arg(long)]
    pub overwrite: bool,
}

/// The subcommands, for the meaning of the shortcut flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Train,
    Eval,
    Sft,
    Score,
    Export,
}

impl Command {
    /// The keys `--model`, `--data`, `--out`, `--overwrite` set for this command (None: the
    /// flag does not apply).
    pub fn shortcut_keys(self) -> [Option<&'static str>; 4] {
        match self {
            Command::Train => [
                Some("model.policy"),
                Some("data.train_file"),
                Some("run.out_dir"),
                Some("run.overwrite"),
            ],
            Command::Eval => [Some("model.policy"), Some("data.eval_files"), None, None],
            Command::Sft => [
                Some("sft.model"),
                Some("sft.data"),
                Some("sft.out"),
                Some("sft.overwrite"),
            ],
            Command::Score => [
                Some("score.model"),
                Some("score.data"),
                Some("score.out"),
                Some("score.overwrite"),
            ],
            Command::Export => [None, None, Some("export.out"), Some("export.overwrite")],
        }
    }
}

impl ConfigArgs {
    /// [`TrainConfig::load`] of these arguments (shortcut flags as for `train`).
    pub fn resolve(&self) -> Result<TrainConfig> {
        self.resolve_for(Command::Train)
    }

    /// [`TrainConfig::load`] with the shortcut flags turned into `--set`s of `cmd`'s keys,
    /// applied after the file and before the explicit `--set`s.
    pub fn resolve_for(&self, cmd: Command) -> Result<TrainConfig> {
        let [model, data, out, overwrite] = cmd.shortcut_keys();
        let mut sets = Vec::new();
        let flags = [
            ("--model", model, self.model.as_deref()),
            ("--data", data, self.data.as_deref()),
            ("--out", out, self.out.as_deref()),
            ("--overwrite", overwrite, self.overwrite.then_some("true")),
        ];
        for (flag, key, value) in flags {
            let Some(value) = value else { continue };
            let Some(key) = key else {
                return Err(Error::Invalid(format!(
                    "{flag} does not apply to `dfpo-train {}`",
                    format!("{cmd:?}").to_lowercase()
                )));
            };
            match (key, value) {
                // The built-in task's name selects it; a file selects JSONL data.
                ("data.train_file", "arith" | "builtin") => sets.push("data.task=arith".into()),
                ("data.train_file", "chain") => sets.push("data.task=chain".into()),
                ("data.train_file", f) => {
                    sets.push("data.task=jsonl".into());
                    sets.push(format!("data.train_file={f}"));
                }
                ("data.eval_files", f) => {
                    // eval on one file: it is also the (unused) training file of the task.
                    sets.push("data.task=jsonl".into());
                    sets.push(format!("data.train_file={f}"));
                    sets.push(format!("data.eval_files=eval={f}"));
                }
                (key, v) => sets.push(format!("{key}={v}")),
            }
        }
        sets.extend(self.sets.iter().cloned());
        TrainConfig::load(self.config.as_deref(), &sets)
    }
}

/// The documentation line of `key` ("section.key").
fn option_doc(key: &str) -> Option<&'static str> {
    OPTION_DOCS.iter().find(|(k, _)| *k == key).map(|(_, d)| *d)
}

/// The defaults as a TOML table: the schema of known sections, keys and value types.
fn default_table() -> toml::Table {
    match toml::Table::try_from(TrainConfig::default()) {
        Ok(t) => t,
        // The defaults are plain strings, numbers, booleans and string arrays.
        Err(e) => unreachable!("the default config serializes to TOML: {e}"),
    }
}

/// `("section.key", "default value as TOML")` in declaration order, read off the serialized
/// defaults (toml writes `[section]` headers and `key = value` lines in struct order).
fn default_lines() -> Vec<(String, String)> {
    let text = toml::to_string(&TrainConfig::default()).unwrap_or_default();
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
        } else if let Some((k, v)) = line.split_once(" = ") {
            out.push((format!("{section}.{}", k.trim()), v.trim().to_string()));
        }
    }
    out
}

/// Every known "section.key".
fn known_keys(schema: &toml::Table) -> Vec<String> {
    let mut keys = Vec::new();
    for (sec, t) in schema {
        if let Some(t) = t.as_table() {
            keys.extend(t.keys().map(|k| format!("{sec}.{k}")));
        }
    }
    keys
}

/// Levenshtein distance (characters).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// " (did you mean `x`?)" for the closest known name, or "" when nothing is close.
fn suggest(given: &str, candidates: &[String]) -> String {
    // The same key name in another section is the likeliest mistake.
    let bare = given.rsplit('.').next().unwrap_or(given);
    if let Some(c) = candidates
        .iter()
        .find(|c| c.rsplit('.').next() == Some(bare) && c.as_str() != given)
    {
        return format!(" (did you mean `{c}`?)");
    }
    let best = candidates
        .iter()
        .map(|c| (edit_distance(given, c), c))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((d, c)) if d <= (given.chars().count() / 3).max(2) => {
            format!(" (did you mean `{c}`?)")
        }
        _ => String::new(),
    }
}

fn a_type(v: &toml::Value) -> String {
    let t = v.type_str();
    let article = if t.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    match v {
        toml::Value::String(s) => format!("a string {s:?}"),
        toml::Value::Integer(i) => format!("an integer {i}"),
        toml::Value::Float(f) => format!("a float {f}"),
        toml::Value::Boolean(b) => format!("a boolean {b}"),
        _ => format!("{article} {t}"),
    }
}

/// Checks `value` against the default's type for `key` and returns it in the field's type
/// (an integer where a float is expected becomes that float). Err: the problem.
fn coerce(
    key: &str,
    default: &toml::Value,
    value: toml::Value,
) -> std::result::Result<toml::Value, String> {
    use toml::Value as V;
    let wrong = |want: &str, v: &V| Err(format!("expected {want}, got {}", a_type(v)));
    match (default, value) {
        (V::Integer(_), V::Integer(i)) if i < 0 => {
            Err(format!("expected a non-negative integer, got {i}"))
        }
        (V::Integer(_), V::Integer(i)) => Ok(V::Integer(i)),
        (V::Integer(_), v) => wrong("an integer", &v),
        (V::Float(_), V::Float(f)) => Ok(V::Float(f)),
        (V::Float(_), V::Integer(i)) => Ok(V::Float(i as f64)),
        (V::Float(_), v) => wrong("a float", &v),
        (V::Boolean(_), V::Boolean(b)) => Ok(V::Boolean(b)),
        // run.resume is "auto" | "true" | "false"; TOML booleans mean the same.
        (V::String(_), V::Boolean(b)) if key == "run.resume" => Ok(V::String(b.to_string())),
        (V::Boolean(_), v) => wrong("a boolean (true or false)", &v),
        (V::String(_), V::String(s)) => {
            if key == "algo.name" && Algo::parse(&s).is_none() {
                let names: Vec<&str> = Algo::ALL.iter().map(|a| a.as_str()).collect();
                return Err(format!("must be one of {}, got {s:?}", names.join(" | ")));
            }
            Ok(V::String(s))
        }
        (V::String(_), v) => wrong("a string", &v),
        (V::Array(_), V::Array(items)) => {
            // The only array options are lists of strings.
            for (i, item) in items.iter().enumerate() {
                if !item.is_str() {
                    return Err(format!(
                        "expected an array of strings, item {i} is {}",
                        a_type(item)
                    ));
                }
            }
            Ok(V::Array(items))
        }
        (V::Array(_), v) => wrong("an array of strings", &v),
        (d, v) => wrong(d.type_str(), &v),
    }
}

/// "section.key" → line (1-based) of the key in `text`, and "section" → line of its header.
fn key_lines(text: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let line_of = |pos: usize| text[..pos.min(text.len())].matches('\n').count() + 1;
    if let Ok(doc) = toml::de::DeTable::parse(text) {
        for (sec, value) in doc.get_ref().iter() {
            out.insert(sec.get_ref().to_string(), line_of(sec.span().start));
            if let toml::de::DeValue::Table(t) = value.get_ref() {
                for (k, _) in t.iter() {
                    out.insert(
                        format!("{}.{}", sec.get_ref(), k.get_ref()),
                        line_of(k.span().start),
                    );
                }
            }
        }
    }
    out
}

fn merge_file(
    schema: &toml::Table,
    path: &Path,
    merged: &mut toml::Table,
    origins: &mut BTreeMap<String, Origin>,
) -> Result<()> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: p.clone(),
        source,
    })?;
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Format {
        path: p.clone(),
        msg: format!("malformed TOML: {}", e.to_string().trim_end()),
    })?;
    let lines = key_lines(&text);
    let line = |k: &str| lines.get(k).copied().unwrap_or(0);
    let known = known_keys(schema);
    let sections: Vec<String> = schema.keys().cloned().collect();
    let bad = |key: &str, msg: String| Error::Format {
        path: p.clone(),
        msg: format!("line {}: {key}: {msg}", line(key)),
    };
    // Report in file order, so the first problem in the file is the one shown.
    let mut entries: Vec<(&String, &toml::Value)> = doc.iter().collect();
    entries.sort_by_key(|(k, _)| line(k));
    for (sec, value) in entries {
        let Some(sec_schema) = schema.get(sec).and_then(|s| s.as_table()) else {
            let hint = if value.is_table() {
                suggest(sec, &sections)
            } else {
                suggest(sec, &known)
            };
            return Err(bad(
                sec,
                format!(
                    "unknown {}{hint}; sections are [{}]",
                    if value.is_table() {
                        "section"
                    } else {
                        "top-level key (options go under a [section] header)"
                    },
                    sections.join("], [")
                ),
            ));
        };
        let Some(table) = value.as_table() else {
            return Err(bad(
                sec,
                format!("expected a section ([{sec}] table), got {}", a_type(value)),
            ));
        };
        let mut keys: Vec<(&String, &toml::Value)> = table.iter().collect();
        keys.sort_by_key(|(k, _)| line(&format!("{sec}.{k}")));
        for (k, v) in keys {
            let dotted = format!("{sec}.{k}");
            let Some(default) = sec_schema.get(k) else {
                return Err(bad(
                    &dotted,
                    format!("unknown key{}", suggest(&dotted, &known)),
                ));
            };
            let v = coerce(&dotted, default, v.clone()).map_err(|m| bad(&dotted, m))?;
            insert(merged, sec, k, v);
            origins.insert(
                dotted.clone(),
                Origin::File {
                    path: p.clone(),
                    line: line(&dotted),
                },
            );
        }
    }
    Ok(())
}

/// Parses `raw` as one TOML value (`v = raw`), or None when it is not a TOML literal.
fn toml_literal(raw: &str) -> Option<toml::Value> {
    let doc: toml::Table = format!("v = {raw}").parse().ok()?;
    if doc.len() != 1 {
        return None;
    }
    doc.get("v").cloned()
}

fn merge_set(
    schema: &toml::Table,
    arg: &str,
    merged: &mut toml::Table,
    origins: &mut BTreeMap<String, Origin>,
) -> Result<()> {
    let bad = |msg: String| Error::Format {
        path: "--set".into(),
        msg: format!("`{arg}`: {msg}"),
    };
    let Some((key, raw)) = arg.split_once('=') else {
        return Err(bad("expected KEY=VALUE, e.g. --set run.steps=10".into()));
    };
    let (key, raw) = (key.trim(), raw.trim());
    let known = known_keys(schema);
    let default = key
        .split_once('.')
        .and_then(|(sec, k)| schema.get(sec)?.as_table()?.get(k).map(|d| (sec, k, d)));
    let Some((sec, k, default)) = default else {
        return Err(bad(format!(
            "unknown key `{key}`{}; `dfpo-train config` lists every option",
            suggest(key, &known)
        )));
    };
    let literal = toml_literal(raw);
    let value = match (default, literal) {
        // A string option takes an unquoted value verbatim (--set run.out_dir=runs/2024).
        (toml::Value::String(_), Some(toml::Value::String(s))) => toml::Value::String(s),
        (toml::Value::String(_), _) => toml::Value::String(raw.to_string()),
        // A list option given one bare item (--set data.eval_files=test=t.jsonl) is that list.
        (toml::Value::Array(_), None) => {
            toml::Value::Array(vec![toml::Value::String(raw.to_string())])
        }
        (_, Some(v)) => v,
        (_, None) => toml::Value::String(raw.to_string()),
    };
    let value = coerce(key, default, value).map_err(|m| bad(format!("{key}: {m}")))?;
    insert(merged, sec, k, value);
    origins.insert(key.to_string(), Origin::Set(arg.to_string()));
    Ok(())
}

fn insert(merged: &mut toml::Table, sec: &str, key: &str, value: toml::Value) {
    let entry = merged
        .entry(sec.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = entry {
        t.insert(key.to_string(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_a_doc_and_every_doc_a_key() {
        let keys = known_keys(&default_table());
        for k in &keys {
            assert!(
                option_doc(k).is_some(),
                "option {k} has no entry in OPTION_DOCS"
            );
        }
        for (k, _) in OPTION_DOCS {
            assert!(
                keys.iter().any(|x| x == k),
                "OPTION_DOCS names {k}, which is not an option"
            );
        }
        let lines: Vec<String> = default_lines().into_iter().map(|(k, _)| k).collect();
        let mut sorted_lines = lines.clone();
        sorted_lines.sort();
        let mut sorted_keys = keys.clone();
        sorted_keys.sort();
        assert_eq!(
            sorted_lines, sorted_keys,
            "the listing must cover exactly the options"
        );
        assert_eq!(OPTION_DOCS.len(), keys.len(), "a key is documented twice");
    }

    #[test]
    fn suggestions() {
        let keys = known_keys(&default_table());
        assert_eq!(suggest("critic.kk", &keys), " (did you mean `critic.k`?)");
        assert_eq!(suggest("run.stpes", &keys), " (did you mean `run.steps`?)");
        assert_eq!(
            suggest("critic.flip_prob", &keys),
            " (did you mean `reward.flip_prob`?)"
        );
        assert_eq!(suggest("zzzzzzzzzzzzzz", &keys), "");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
