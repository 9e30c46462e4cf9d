//! The run configuration: one TOML file (sections below) plus `--set section.key=value`
//! overrides. Every field has a default, so an empty config is the built-in run.
//!
//! Loading, overrides, validation and the option listing live here; the trainer only reads the
//! resolved [`TrainConfig`].

use serde::{Deserialize, Serialize};

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
    /// Resume from the newest checkpoint in out_dir/checkpoints when there is one.
    pub resume: bool,
    /// What a non-finite loss or gradient does: "skip" (drop the update, log it) or "stop".
    pub on_nonfinite: String,
    /// Show the progress bar (stderr).
    pub progress: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            out_dir: "runs/default".into(),
            seed: 1,
            device: "auto".into(),
            steps: 40,
            eval_every: 0,
            save_every: 20,
            keep_checkpoints: 2,
            resume: false,
            on_nonfinite: "skip".into(),
            progress: true,
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
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            policy: "builtin".into(),
            critic: String::new(),
            reference: String::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// "arith" (built-in task) or "jsonl" (train_file/eval_files).
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
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            task: "arith".into(),
            train_file: String::new(),
            eval_files: Vec::new(),
            checker: "arith".into(),
            chat_template: false,
            eval_size: 200,
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
    pub correct: f64,
    pub incorrect: f64,
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            flip_prob: 0.2,
            gaussian_sigma: 0.0,
            correct: 1.0,
            incorrect: 0.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KlConfig {
    /// Coefficient of the per-token KL penalty in the reward (0: no reference model run).
    pub coef: f64,
    /// "k1" (log-ratio) or "k3" (unbiased, non-negative).
    pub estimator: String,
    /// Adaptive controller (Ziegler et al.) toward `target`.
    pub adaptive: bool,
    pub target: f64,
    pub horizon: f64,
}

impl Default for KlConfig {
    fn default() -> Self {
        KlConfig {
            coef: 0.0,
            estimator: "k1".into(),
            adaptive: false,
            target: 6.0,
            horizon: 10000.0,
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
    pub gamma: f64,
    pub lam: f64,
    /// Whiten advantages over the batch.
    pub whiten: bool,
    /// PPO baseline: value clip range (0: off).
    pub value_clip: f64,
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
            gamma: 1.0,
            lam: 0.95,
            whiten: true,
            value_clip: 0.2,
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
    /// Steps of the target solves (DCFM z', geometric-consistency target).
    pub target_steps: usize,
    /// "euler" or "midpoint" (for the target solves).
    pub solver: String,
    /// Clip the flow state to the reachable return range after every step.
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
}

impl Default for CriticConfig {
    fn default() -> Self {
        CriticConfig {
            k: 16,
            head_width: 64,
            head_depth: 2,
            readout_steps: 1,
            target_steps: 4,
            solver: "euler".into(),
            clip_returns: true,
            kappa: 0.3,
            weight_direction: "up".into(),
            w_dcfm: 1.0,
            w_bcfm: 1.0,
            w_gc: 0.5,
            w_cvar: 1.0,
            w_gain: 1.0,
            w_shape: 1.0,
            alpha: 0.1,
            beta: 0.1,
            huber_kappa: 1.0,
            anchor: "lambda".into(),
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
            actor_lr: 2e-4,
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
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            greedy: true,
            pass_k: 1,
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
