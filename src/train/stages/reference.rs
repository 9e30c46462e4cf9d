//! Stage 3, the reference: the rollout policy's log-probs and entropies of the response tokens
//! (the PPO ratio's old side), the reference policy's log-probs and the per-token KL between
//! the two, which goes into the token rewards or (kl.placement) into the actor loss.

use super::StepRows;
use crate::error::Result;
use crate::kernels::rl::KlKind;
use crate::model::decoder::DecoderGraph;
use crate::train::models::response_logprobs_buf;
use crate::train::step_ops::{Scalars, StepBuf, StepOps};

/// The stage's step buffers, `[rows][S]` each.
pub struct LogProbs {
    pub old_lp: StepBuf,
    pub old_ent: StepBuf,
    /// The per-token KL against the reference (its estimator), when there is a reference.
    pub kl: Option<StepBuf>,
    /// The reference log-probs, when the KL is a term of the actor loss.
    pub ref_lp: Option<StepBuf>,
}

/// The log-probs of the rows under `policy` and `reference` (forward only); adds the scalars
/// `entropy_sum` (over the response tokens) and, with a reference, `kl_sum` to `sc`.
pub fn log_probs(
    ops: &StepOps,
    rows: &StepRows,
    policy: &mut DecoderGraph,
    reference: Option<&mut DecoderGraph>,
    kl_kind: KlKind,
    kl_in_loss: bool,
    sc: &mut Scalars,
) -> Result<LogProbs> {
    let n = rows.mask.len();
    let (old_lp, old_ent) = response_logprobs_buf(ops, policy, &rows.seqs)?;
    ops.sum_into(sc, "entropy_sum", &old_ent, Some(&rows.mask_buf), n, 1, 0)?;
    let (kl, ref_lp) = if let Some(r) = reference {
        let (ref_lp, _) = response_logprobs_buf(ops, r, &rows.seqs)?;
        let kl = ops.kl_buf(&old_lp, &ref_lp, &rows.mask_buf, kl_kind)?;
        ops.sum_into(sc, "kl_sum", &kl, None, n, 1, 0)?;
        (Some(kl), kl_in_loss.then_some(ref_lp))
    } else {
        (None, None)
    };
    Ok(LogProbs {
        old_lp,
        old_ent,
        kl,
        ref_lp,
    })
}
