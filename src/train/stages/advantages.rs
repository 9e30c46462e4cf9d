//! Stage 4, advantages and critic targets: the token rewards (the row's reward at its last
//! token, −β·KL with the KL in the reward), the rollout-time critic's readout, GAE (or GRPO's
//! group-normalised rewards), whitening, the value statistics and the flow critic's targets.

use std::collections::BTreeMap;

use super::reference::LogProbs;
use super::StepRows;
use crate::error::Result;
use crate::kernels::risk::{Stat, TailLevels};
use crate::kernels::rl::GaeParams;
use crate::train::config::{Algo, TrainConfig};
use crate::train::models::{Critic, CriticHead};
use crate::train::rollout::{grpo_row_advantages, FlowSolve, FlowTargetOpts, GrpoStd, Stream};
use crate::train::step_ops::{Scalars, StepBuf, StepOps, FLOW_TARGET_FIELD};

/// What the stage reads of the configuration and the step.
#[derive(Clone, Debug)]
pub struct AdvantageOpts {
    /// β of the KL penalty; it is in the token rewards unless `kl_in_loss`.
    pub kl_coef: f64,
    pub kl_in_loss: bool,
    pub gae: GaeParams,
    /// GRPO: group-normalised rewards (scaled by this std) instead of GAE.
    pub grpo: Option<GrpoStd>,
    pub whiten: bool,
    /// The tail levels of the value statistics.
    pub levels: TailLevels,
    pub targets: FlowTargetOpts,
    /// critic.risk_targets = "prompt": the risk targets at first tokens are the group's pool.
    pub pool_first_token: bool,
    /// The run seed and the step, for the flow targets' random stream.
    pub seed: u64,
    pub step: u64,
}

impl AdvantageOpts {
    pub fn new(cfg: &TrainConfig, kl_coef: f64, step: u64) -> Self {
        let gae = GaeParams {
            gamma: cfg.ppo.gamma as f32,
            lambda: cfg.ppo.lam as f32,
        };
        let cc = &cfg.critic;
        AdvantageOpts {
            kl_coef,
            kl_in_loss: cfg.kl_in_loss(),
            gae,
            grpo: (cfg.algo.name == Algo::Grpo).then_some(match cfg.ppo.grpo_std.as_str() {
                "population" => GrpoStd::Population,
                "none" => GrpoStd::None,
                _ => GrpoStd::Unbiased,
            }),
            whiten: cfg.ppo.whiten,
            levels: TailLevels {
                alpha: cc.alpha as f32,
                beta: cc.beta as f32,
            },
            targets: FlowTargetOpts {
                gamma: gae.gamma,
                kappa: cc.kappa as f32,
                direction: match cc.weight_direction.as_str() {
                    "up" => 1,
                    "down" => -1,
                    _ => 0,
                },
                anchor_lambda: cc.anchor == "lambda",
            },
            pool_first_token: cc.risk_targets == "prompt",
            seed: cfg.run.seed,
            step,
        }
    }
}

/// The value statistics of the rollout-time critic (the risk kernel's per-row statistics),
/// summed over the response tokens into the step's scalars.
const VALUE_STATS: [(&str, Stat); 3] = [
    ("critic/value_mean", Stat::Mean),
    ("critic/value_std", Stat::Std),
    ("critic/cvar", Stat::CvarLow),
];

/// The stage's step buffers.
pub struct Advantages {
    /// The rollout-time critic's values `[rows][S][K]` (zeros without a critic).
    pub values: StepBuf,
    /// The (distributional) λ-returns `[rows][S][K]` (zeros with GRPO) and the advantages
    /// `[rows][S]`.
    pub ret: StepBuf,
    pub adv: StepBuf,
    /// Value samples per token.
    pub k: usize,
    /// The flow critic's targets: the 12 fields of [`crate::train::rollout::FlowTargets::fields`].
    pub targets: Option<Vec<StepBuf>>,
    /// Whether [`VALUE_STATS`] were added to the step's scalars (with a critic).
    value_stats: bool,
}

impl Advantages {
    /// The value statistics' means per response token (none without a critic), from the step's
    /// scalars once read.
    pub fn value_metrics(
        &self,
        scalars: &BTreeMap<String, f64>,
        ntok: f64,
    ) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        if self.value_stats {
            let d = ntok.max(1.0);
            for (name, _) in VALUE_STATS {
                m.insert(name.into(), scalars[name] / d);
            }
        }
        m
    }
}

/// Runs the stage on the rows and their log-probs; `fs`: the flow critic's solve settings
/// (with a flow critic). Adds the value statistics to `sc`.
pub fn estimate(
    ops: &StepOps,
    rows: &StepRows,
    lp: &LogProbs,
    critic: Option<&mut Critic>,
    fs: Option<&FlowSolve>,
    o: &AdvantageOpts,
    sc: &mut Scalars,
) -> Result<Advantages> {
    let (batch, mask_buf, tokens) = (&rows.batch, &rows.mask_buf, &rows.tokens);
    let (n_rows, s) = (batch.rows(), batch.s);
    let reward_kl = if o.kl_in_loss { None } else { lp.kl.as_ref() };
    let rewards = ops.token_rewards(batch, mask_buf, reward_kl, o.kl_coef, &batch.noisy)?;

    // Critic readout and advantages.
    let k = critic.as_ref().map_or(1, |c| c.head.k());
    let value_stats = critic.is_some();
    let mut values = ops.zeros(n_rows * s * k)?;
    let mut flow = None;
    if let Some(c) = critic {
        let mut out = c.forward_readout_buf(ops, &rows.seqs)?;
        match (&c.head, fs) {
            (CriticHead::Flow { .. }, Some(fs)) => {
                let params = c.flow_params_buf(ops)?;
                let (z, sd) = ops.flow_readout_buf(fs, &params, &out, mask_buf, tokens)?;
                values = z;
                flow = Some((params, out, sd));
            }
            _ => {
                ops.mask_select(&mut out, mask_buf, k)?;
                values = out;
            }
        }
    }
    let (ret, adv) = match o.grpo {
        Some(std) => {
            let a = grpo_row_advantages(batch, &batch.noisy, std);
            (
                ops.zeros(n_rows * s * k)?,
                ops.rows_on_mask(mask_buf, s, &a)?,
            )
        }
        None => {
            let (_, ret, adv) = ops.gae_buf(&values, &rewards, mask_buf, n_rows, s, k, o.gae)?;
            if o.whiten && rows.ntok >= 2.0 {
                (ret, ops.whiten_buf(&adv, mask_buf)?)
            } else {
                (ret, adv)
            }
        }
    };
    if value_stats {
        ops.risk_stat_sums(sc, &values, tokens, k, o.levels, &VALUE_STATS)?;
    }
    let targets = match (fs, &flow) {
        (Some(fs), Some((params, u, sd))) => {
            let mut rng = Stream::new(o.seed, o.step, "tau");
            let mut t = ops.flow_targets_buf(
                fs, params, u, &values, sd, &ret, &rewards, mask_buf, tokens, s, &o.targets,
                &mut rng,
            )?;
            if o.pool_first_token {
                ops.pool_first_buf(batch, &mut t[FLOW_TARGET_FIELD], fs.k)?;
            }
            Some(t)
        }
        _ => None,
    };
    Ok(Advantages {
        values,
        ret,
        adv,
        k,
        targets,
        value_stats,
    })
}
