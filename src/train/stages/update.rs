//! Stage 5, the updates: PPO epochs × minibatches, each one actor update and one critic update
//! on the prepared step buffers, in micro-batches whose gradients accumulate, a non-finite
//! update skipped (or the run stopped, run.on_nonfinite).

use std::collections::BTreeMap;
use std::ops::Range;

use super::Prepared;
use crate::error::{Error, Result};
use crate::graph::TensorId;
use crate::train::config::TrainConfig;
use crate::train::models::{ActorStats, Critic, CriticHead, CriticStats, Policy};
use crate::train::rollout::{gather, Stream};
use crate::train::step_ops::{FlowMicro, StepOps};

/// The updates' metrics: name → (sum, count); the step reports their means.
pub type Acc = BTreeMap<String, (f64, f64)>;

/// What the stage reads of the configuration and the step.
#[derive(Clone, Debug)]
pub struct UpdateOpts {
    /// The graphs' sequence length S.
    pub s: usize,
    /// The run seed and the step (from 0; messages number steps from 1, as metrics.jsonl does),
    /// for the minibatch order.
    pub seed: u64,
    pub step: u64,
    pub epochs: usize,
    pub minibatches: usize,
    /// Rows per micro-batch (0: the whole minibatch in one pass).
    pub micro_batch_size: usize,
    /// β of the actor loss's KL term (with one).
    pub kl_coef: f64,
    /// run.on_nonfinite = "skip": a non-finite update is skipped with a warning, else an error.
    pub skip_nonfinite: bool,
    /// ppo.agg = "seq-mean": the actor's token weights are sequence means.
    pub seq_mean: bool,
    /// critic.risk_targets = "prompt": the flow head's risk weights count first tokens.
    pub pool_first_token: bool,
}

impl UpdateOpts {
    pub fn new(cfg: &TrainConfig, s: usize, kl_coef: f64, step: u64) -> Self {
        UpdateOpts {
            s,
            seed: cfg.run.seed,
            step,
            epochs: cfg.ppo.epochs,
            minibatches: cfg.ppo.minibatches,
            micro_batch_size: cfg.ppo.micro_batch_size,
            kl_coef,
            skip_nonfinite: cfg.run.on_nonfinite == "skip",
            seq_mean: cfg.ppo.agg == "seq-mean",
            pool_first_token: cfg.critic.risk_targets == "prompt",
        }
    }
}

/// Every update of the step: `ppo.epochs` passes over the rows in a random order, cut into
/// `ppo.minibatches` minibatches; returns the metrics and how many updates were skipped.
pub fn epochs(
    ops: &StepOps,
    policy: &mut Policy,
    mut critic: Option<&mut Critic>,
    p: &Prepared,
    o: &UpdateOpts,
) -> Result<(Acc, f64)> {
    let rows = p.batch.rows();
    let bsz = rows / o.minibatches;
    let mut acc = Acc::new();
    let mut skipped = 0.0;
    for epoch in 0..o.epochs {
        let order = Stream::new(o.seed, o.step, &format!("minibatch{epoch}")).permutation(rows);
        for j in 0..o.minibatches {
            let sel = &order[j * bsz..(j + 1) * bsz];
            skipped += minibatch(ops, policy, critic.as_deref_mut(), p, sel, &mut acc, o)?;
        }
    }
    Ok((acc, skipped))
}

/// One minibatch: its rollout rows and its micro-batches (ranges of positions in `sel`).
struct Minibatch<'a> {
    sel: &'a [usize],
    micro: Vec<Range<usize>>,
}

/// One actor update and one critic update on the minibatch of rollout rows `sel` (metrics
/// accumulated into `acc`); returns how many updates were skipped as non-finite. The loss
/// inputs are written into the graphs from the step buffers where they are (on CUDA a device
/// gather per input: only the row lists go up).
pub fn minibatch(
    ops: &StepOps,
    policy: &mut Policy,
    critic: Option<&mut Critic>,
    p: &Prepared,
    sel: &[usize],
    acc: &mut Acc,
    o: &UpdateOpts,
) -> Result<f64> {
    let mb = Minibatch {
        sel,
        micro: micro_batches(sel.len(), o.micro_batch_size),
    };
    let mut skipped = actor_update(ops, policy, p, &mb, acc, o)?;
    if let Some(c) = critic {
        skipped += critic_update(ops, c, p, &mb, acc, o)?;
    }
    Ok(skipped)
}

fn actor_update(
    ops: &StepOps,
    policy: &mut Policy,
    p: &Prepared,
    mb: &Minibatch,
    acc: &mut Acc,
    o: &UpdateOpts,
) -> Result<f64> {
    let (step, s, sel) = (o.step + 1, o.s, mb.sel);
    let mut skipped = 0.0;
    let denom = weight_denoms(&p.mask, sel, s, o.seq_mean);
    let (pb, _) = policy.graph.shape();
    let pin = policy.inputs();
    let mut st = ActorStats::default();
    // More than one micro-batch: their gradients are summed on the host and written back
    // into the graph, where the optimizer reads them (a download and an upload per
    // micro-batch on CUDA: no device-side accumulation yet).
    let mut g = Vec::new();
    for r in &mb.micro {
        let rows = pick(sel, r, pb);
        let sess = policy.graph.session_mut();
        ops.write_rows(sess, pin.old_lp, &p.old_lp, &rows, s)?;
        ops.write_rows(sess, pin.adv, &p.adv, &rows, s)?;
        ops.write_token_weights(
            sess,
            pin.tok_w,
            &p.mask_buf,
            &rows,
            s,
            &padded(&denom, r, pb),
        )?;
        match (pin.kl, &p.ref_lp) {
            (Some((rt, ct)), Some(ref_lp)) => {
                ops.write_rows(sess, rt, ref_lp, &rows, s)?;
                sess.write(ct, &[o.kl_coef as f32])?;
            }
            (None, None) => {}
            (have, _) => {
                return Err(Error::Invalid(format!(
                    "policy update: the actor loss {} a KL term, the step {} reference log-probs",
                    if have.is_some() { "has" } else { "has no" },
                    if have.is_some() { "has no" } else { "has" }
                )))
            }
        }
        let mst = policy.update_written_rows(&p.seqs, &rows)?;
        // The weights are the minibatch's: losses, statistics and gradients add.
        st.loss += mst.loss;
        st.pg_loss += mst.pg_loss;
        st.clipfrac += mst.clipfrac;
        st.ppo_kl += mst.ppo_kl;
        st.entropy += mst.entropy;
        st.kl_loss += mst.kl_loss;
        if mb.micro.len() > 1 {
            accumulate(&mut g, policy.grads()?);
        }
    }
    if mb.micro.len() > 1 {
        policy.set_grads(&g)?;
    }
    if !st.loss.is_finite() {
        nonfinite(
            o,
            format!("step {step}: the actor loss (actor/pg_loss) is {}", st.loss),
        )?;
        skipped += 1.0;
    } else {
        let out = policy.step()?;
        if !out.applied {
            nonfinite(
                o,
                format!("step {step}: the actor gradient norm is {}", out.grad_norm),
            )?;
            skipped += 1.0;
        }
        add(acc, "actor/grad_norm", out.grad_norm);
        add(acc, "actor/lr", out.lr);
    }
    add(acc, "actor/pg_loss", st.pg_loss);
    add(acc, "actor/clipfrac", st.clipfrac);
    add(acc, "actor/ppo_kl", st.ppo_kl);
    add(acc, "actor/entropy", st.entropy);
    if p.ref_lp.is_some() {
        add(acc, "actor/kl_loss", st.kl_loss);
    }
    Ok(skipped)
}

fn critic_update(
    ops: &StepOps,
    c: &mut Critic,
    p: &Prepared,
    mb: &Minibatch,
    acc: &mut Acc,
    o: &UpdateOpts,
) -> Result<f64> {
    let (step, s, sel) = (o.step + 1, o.s, mb.sel);
    let mut skipped = 0.0;
    // The critic's token weights are token means over the minibatch.
    let cdenom = weight_denoms(&p.mask, sel, s, false);
    // The flow head: the minibatch's response tokens (graph row r·S + t, rollout token
    // sel[r]·S + t) and, with critic.risk_targets = "prompt", its first-token count.
    let flow_tokens = |r: &Range<usize>| -> Vec<usize> {
        sel[r.clone()]
            .iter()
            .flat_map(|&row| (row * s..(row + 1) * s).filter(|&i| p.mask[i] != 0.0))
            .collect()
    };
    let all = flow_tokens(&(0..sel.len()));
    let first_count = o.pool_first_token.then(|| {
        all.iter()
            .filter(|&&g| g % s + 1 == p.skip[g / s])
            .count()
            .max(1) as f32
    });
    let total: f32 = gather(&p.mask, sel, s).iter().sum();
    let (cb, _) = c.graph.shape();
    let cin: Vec<TensorId> = c.inputs().to_vec();
    let head = c.head.clone();
    let kk = p.k;
    let (mut cst, mut g) = (None::<CriticStats>, Vec::new());
    for r in &mb.micro {
        let rows = pick(sel, r, cb);
        let sess = c.graph.session_mut();
        match &head {
            CriticHead::Value { .. } => {
                ops.write_rows(sess, cin[0], &p.ret, &rows, s)?;
                ops.write_rows(sess, cin[1], &p.values, &rows, s)?;
                ops.write_token_weights(
                    sess,
                    cin[2],
                    &p.mask_buf,
                    &rows,
                    s,
                    &padded(&cdenom, r, cb),
                )?;
            }
            CriticHead::Quantile { .. } => {
                ops.write_rows(sess, cin[0], &p.ret, &rows, s * kk)?;
                ops.write_token_weights(
                    sess,
                    cin[1],
                    &p.mask_buf,
                    &rows,
                    s,
                    &padded(&cdenom, r, cb),
                )?;
            }
            CriticHead::Flow { .. } => {
                let t = p.targets.as_ref().expect("flow targets");
                let mut rowpos = vec![-1i32; p.batch.rows()];
                for (j, &row) in sel[r.clone()].iter().enumerate() {
                    rowpos[row] = j as i32;
                }
                let global = flow_tokens(r);
                let fm = FlowMicro {
                    global: &global,
                    rowpos: &rowpos,
                    total,
                    first_count,
                    plen: &p.skip,
                    s,
                    from: Some((&p.tokens, &sel[r.clone()])),
                };
                ops.write_flow_inputs(sess, &cin, t, &fm, kk)?;
            }
        }
        let mst = c.update_written_rows(&p.seqs, &rows)?;
        match &mut cst {
            None => cst = Some(mst),
            Some(a) => {
                a.loss += mst.loss;
                for ((_, v), (_, mv)) in a.terms.iter_mut().zip(&mst.terms) {
                    *v += mv;
                }
            }
        }
        if mb.micro.len() > 1 {
            accumulate(&mut g, c.grads()?);
        }
    }
    if mb.micro.len() > 1 {
        c.set_grads(&g)?;
    }
    let cst = cst.expect("a minibatch has at least one micro-batch");
    let finite = cst.loss.is_finite();
    let out = if finite { Some(c.step()?) } else { None };
    if !finite || !out.is_some_and(|st| st.applied) {
        let bad = cst
            .terms
            .iter()
            .find(|(_, v)| !v.is_finite())
            .map_or("critic/grad_norm".to_string(), |(n, _)| {
                format!("critic/{n}")
            });
        nonfinite(
            o,
            format!(
                "step {step}: the critic loss or gradient is not finite (first bad term: {bad})"
            ),
        )?;
        skipped += 1.0;
    }
    if let Some(out) = out {
        add(acc, "critic/grad_norm", out.grad_norm);
    }
    add(acc, "critic/loss", cst.loss);
    for (n, v) in &cst.terms {
        add(acc, &format!("critic/{n}"), *v);
    }
    Ok(skipped)
}

/// A non-finite update: a warning when it is skipped (run.on_nonfinite = "skip"), else the
/// error that stops the run.
fn nonfinite(o: &UpdateOpts, msg: String) -> Result<()> {
    if !o.skip_nonfinite {
        return Err(Error::Invalid(format!(
            "{msg}; stopping (run.on_nonfinite = \"stop\")"
        )));
    }
    eprintln!("dfpo-train: warning: {msg}; update skipped");
    Ok(())
}

fn add(acc: &mut Acc, k: &str, v: f64) {
    let e = acc.entry(k.to_string()).or_insert((0.0, 0.0));
    e.0 += v;
    e.1 += 1.0;
}

/// Graph row j of micro-batch `r` reads rollout row `sel[r.start + j]` (None: padding up to
/// the graph's batch `b`).
fn pick(sel: &[usize], r: &Range<usize>, b: usize) -> Vec<Option<usize>> {
    let mut v: Vec<Option<usize>> = sel[r.clone()].iter().map(|&x| Some(x)).collect();
    v.resize(b, None);
    v
}

/// The micro-batch `r` of the per-row `v`, zero-padded to the graph's batch `b`.
fn padded(v: &[f32], r: &Range<usize>, b: usize) -> Vec<f32> {
    let mut o = v[r.clone()].to_vec();
    o.resize(b, 0.0);
    o
}

/// The micro-batches (ranges of positions) of a minibatch of `rows` rows, `size` rows each
/// (0: one).
fn micro_batches(rows: usize, size: usize) -> Vec<Range<usize>> {
    let m = match size {
        0 => rows.max(1),
        m => m,
    };
    (0..rows).step_by(m).map(|a| a..(a + m).min(rows)).collect()
}

/// Adds the gradients `g` of one micro-batch into `acc` (empty: takes them).
fn accumulate(acc: &mut Vec<Vec<f32>>, g: Vec<Vec<f32>>) {
    if acc.is_empty() {
        *acc = g;
        return;
    }
    for (a, g) in acc.iter_mut().zip(g) {
        for (x, y) in a.iter_mut().zip(g) {
            *x += y;
        }
    }
}

/// Token-weight denominators of the minibatch rows `sel`
/// ([`crate::train::rollout::token_weights`]' arithmetic on the minibatch's mask: the token
/// count for the token mean, each row's length × the number of rows with tokens for the
/// sequence mean; 0 where a row gets no weight).
fn weight_denoms(mask: &[f32], sel: &[usize], s: usize, seq_mean: bool) -> Vec<f32> {
    let mm = gather(mask, sel, s);
    let total: f32 = mm.iter().sum();
    if total == 0.0 {
        return vec![0.0; sel.len()];
    }
    if !seq_mean {
        return vec![total; sel.len()];
    }
    let lens: Vec<f32> = (0..sel.len())
        .map(|r| mm[r * s..(r + 1) * s].iter().sum())
        .collect();
    let nonempty = lens.iter().filter(|&&l| l > 0.0).count() as f32;
    lens.iter()
        .map(|&l| if l > 0.0 { l * nonempty } else { 0.0 })
        .collect()
}
