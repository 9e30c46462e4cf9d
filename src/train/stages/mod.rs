//! The stages of one RL step, in the order [`crate::train::trainer::Trainer`] calls them:
//!
//! 1. [`rollout`]: the step's prompts → generations → the batch's token rows;
//! 2. [`rewards`]: each row scored (checker or `reward.command`), reward noise applied;
//! 3. [`reference`](mod@reference): old-policy log-probs and entropies, reference log-probs,
//!    the KL;
//! 4. [`advantages`]: token rewards, the critic readout, GAE or GRPO advantages, whitening,
//!    value statistics, the flow critic's targets;
//! 5. [`update`]: PPO epochs × minibatches of actor and critic updates.
//!
//! Stages 1–2 work on the host (token ids, texts, rewards). From stage 3 on, the batch is a
//! [`StepRows`] and each stage's outputs are step buffers ([`StepBuf`]: host vectors on the CPU,
//! device buffers on CUDA) computed through [`StepOps`], the one place that picks the backend;
//! stages 3–4 add their scalar metrics to one [`crate::train::step_ops::Scalars`], read once.

pub mod advantages;
pub mod reference;
pub mod rewards;
pub mod rollout;
pub mod update;

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::model::decoder::SeqRows;
use crate::train::rollout::Batch;
use crate::train::step_ops::{StepBuf, StepOps, TokenList};

/// The scored batch where the step computes (what stages 3 and 4 read).
pub struct StepRows {
    pub batch: Batch,
    /// The response-token mask `[rows][S]` on the host (the rollout's bookkeeping: token lists,
    /// weights) and as a step buffer.
    pub mask: Vec<f32>,
    pub mask_buf: StepBuf,
    /// Each row's prompt length (the log-probs skip the prompt).
    pub skip: Vec<usize>,
    /// The number of response tokens.
    pub ntok: f64,
    /// The response tokens: the flow readout's and the statistics' rows.
    pub tokens: TokenList,
    /// The rows' token ids where the graphs compute (bound once; each graph batch of the step
    /// is gathered from them).
    pub seqs: SeqRows,
}

impl StepRows {
    /// The rows of `batch`, for graphs of sequence length `s`.
    pub fn new(ops: &StepOps, batch: Batch, s: usize) -> Result<Self> {
        if batch.s != s || batch.rows() == 0 {
            return Err(Error::Shape(format!(
                "prepare_batch: {} rows of S = {}, the trainer's S is {s}",
                batch.rows(),
                batch.s,
            )));
        }
        let mask = batch.mask();
        let mask_buf = ops.batch_mask(&batch)?;
        let skip = batch.prompt_len.clone();
        let seqs = ops.seq_rows(&batch.seqs, &skip)?;
        let ntok: f64 = mask.iter().map(|&v| v as f64).sum();
        let tokens = ops.batch_tokens(&batch, &mask)?;
        Ok(StepRows {
            batch,
            mask,
            mask_buf,
            skip,
            ntok,
            tokens,
            seqs,
        })
    }
}

/// What the update stage reads (see [`crate::train::trainer::Trainer::prepare`]): the outputs
/// of stages 1–4. Per-token tensors are `[rows][S]` (× K for the value samples), rows
/// prompt-major, as step buffers ([`StepBuf::host`] reads them on the CPU; [`StepOps::read`]
/// downloads either).
pub struct Prepared {
    pub batch: Batch,
    /// The rollout mask on the host (the rollout's bookkeeping: token lists, weights).
    pub mask: Vec<f32>,
    /// The same mask where the step computes.
    pub mask_buf: StepBuf,
    pub skip: Vec<usize>,
    /// The rows' token ids where the graphs compute ([`StepRows::seqs`]).
    pub seqs: SeqRows,
    /// The response tokens ([`StepRows::tokens`]).
    pub tokens: TokenList,
    pub ntok: f64,
    pub old_lp: StepBuf,
    pub old_ent: StepBuf,
    /// The per-token KL against the reference (its estimator), when there is a reference.
    pub kl: Option<StepBuf>,
    /// The reference log-probs, when the KL is a term of the actor loss.
    pub ref_lp: Option<StepBuf>,
    pub values: StepBuf,
    pub ret: StepBuf,
    pub adv: StepBuf,
    pub k: usize,
    /// The flow critic's targets: the 12 fields of [`crate::train::rollout::FlowTargets::fields`].
    pub targets: Option<Vec<StepBuf>>,
    /// The critic readout's statistics.
    pub metrics: BTreeMap<String, f64>,
    /// Σ entropy over the response tokens and (with a reference) Σ KL (the step's metrics).
    pub entropy_sum: f64,
    pub kl_sum: Option<f64>,
    pub t_roll: f64,
    pub t_prep: f64,
}
