//! The policy and the critic as planned graphs with their optimizers.
//!
//! Both are a [`Decoder`] trunk built for one minibatch shape `(B, S)`; the policy adds the LM
//! head and the clipped-PPO actor loss, the critic one of three heads: a scalar value head
//! (PPO), a K-quantile head (quantile critic) or the DFPO flow head (`FlowCond` + three
//! `FlowEval`s + [`FlowCriticLoss`]). Each owns an [`Optimizer`] over its fp32 master weights
//! (on the host on the CPU, on the GPU on CUDA) that writes the new weights into its graph after
//! every update; the policy's host [`Decoder`] (it generates rollouts) is refreshed from them by
//! [`Policy::sync_host`].
//!
//! Per-token vectors are `[B][S]` row-major, index t = the position of the token that PRECEDES
//! the scored token (the log-prob at t scores token t + 1; the value at t is V(s_{t+1}) in the
//! verl convention), matching [`DecoderGraph::token_logprobs`].

use std::collections::BTreeMap;

use super::heads::{
    ActorLoss, Cast, FlowCriticLoss, FlowTermWeights, GatherRows, QuantileLoss, RiskTerms,
    ValueLoss,
};
use super::optim::{Optimizer, Schedule, StepOutcome};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::graph::ops::FlowSolveTarget;
use crate::graph::GraphBuilder;
use crate::graph::{DType, TensorId};
use crate::kernels::adamw::AdamWParams;
use crate::kernels::flow::{self, FlowHeadShape, IntegrateOpts};
use crate::kernels::rl::KlKind;
use crate::model::checkpoint::TensorMap;
use crate::model::decoder::{Decoder, DecoderGraph, HeadOut, SeqRows};
use crate::train::step_ops::{StepBuf, StepOps};

/// Optimizer settings of one model.
#[derive(Clone, Debug)]
pub struct OptSettings {
    pub hp: AdamWParams,
    pub max_grad_norm: f32,
    pub schedule: Schedule,
}

impl OptSettings {
    /// torch's AdamW defaults at a constant rate `lr`, global-norm clip 1.0.
    pub fn constant(lr: f64) -> Self {
        OptSettings {
            hp: AdamWParams {
                lr,
                ..AdamWParams::default()
            },
            max_grad_norm: 1.0,
            schedule: Schedule {
                peak: lr,
                warmup: 0,
                total: 0,
                cosine: false,
                min_ratio: 1.0,
            },
        }
    }
}

fn optimizer(
    dec: &Decoder,
    extra: &[(String, Vec<f32>)],
    s: &OptSettings,
    device: &Device,
) -> Result<Optimizer> {
    let mut named: Vec<(String, Vec<f32>)> = dec
        .params()
        .iter()
        .map(|(k, t)| (k.clone(), t.data.clone()))
        .collect();
    named.extend(extra.iter().cloned());
    Optimizer::new(named, s.hp, s.max_grad_norm, s.schedule.clone(), device)
}

/// Reads every parameter's gradient in optimizer order (a download on CUDA: tests and tools;
/// the optimizer reads them where they are).
fn grads(graph: &DecoderGraph, opt: &Optimizer) -> Result<Vec<Vec<f32>>> {
    opt.names().iter().map(|n| graph.grad(n)).collect()
}

/// Writes every parameter's gradient (optimizer order) into the graph.
fn set_grads(graph: &mut DecoderGraph, opt: &Optimizer, g: &[Vec<f32>]) -> Result<()> {
    if g.len() != opt.names().len() {
        return Err(Error::Invalid(format!(
            "set_grads: {} gradients for {} parameters",
            g.len(),
            opt.names().len()
        )));
    }
    for (n, v) in opt.names().iter().zip(g) {
        graph.set_grad(n, v)?;
    }
    Ok(())
}

/// Splits rows into chunks of the graph's batch size.
fn chunks(rows: usize, b: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..rows.div_ceil(b)).map(move |i| i * b..((i + 1) * b).min(rows))
}

/// Per-token log-probs and entropies (`[rows][S]`) of the tokens at positions >= `skip[r]`
/// under `graph` (forward only, in chunks of its batch size); any number of rows.
pub fn response_logprobs(
    graph: &mut DecoderGraph,
    seqs: &[Vec<u32>],
    skip: &[usize],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (b, s) = graph.shape();
    let (mut lp, mut ent) = (Vec::with_capacity(seqs.len() * s), Vec::new());
    for r in chunks(seqs.len(), b) {
        let m = r.len();
        graph.set_batch_masked(&seqs[r.clone()], &skip[r])?;
        graph.forward()?;
        lp.extend_from_slice(&graph.token_logprobs()?[..m * s]);
        ent.extend_from_slice(&graph.token_entropies()?[..m * s]);
    }
    Ok((lp, ent))
}

/// [`response_logprobs`] of the step's rows `src` (prompt lengths as skip) into step buffers
/// (on CUDA the batches are gathered from `src` and the log-probs stay on the device).
pub fn response_logprobs_buf(
    ops: &StepOps,
    graph: &mut DecoderGraph,
    src: &SeqRows,
) -> Result<(StepBuf, StepBuf)> {
    let (b, s) = graph.shape();
    let (lt, et) = graph
        .logprob_tensors()
        .ok_or_else(|| Error::Invalid("response log-probs: the graph has no LM head".into()))?;
    let (mut lp, mut ent) = (ops.zeros(src.rows() * s)?, ops.zeros(src.rows() * s)?);
    for r in chunks(src.rows(), b) {
        let m = r.len();
        graph.set_batch_rows(src, &run_rows(&r), true)?;
        graph.forward()?;
        ops.read_graph(graph.session(), lt, m * s, &mut lp, r.start * s)?;
        ops.read_graph(graph.session(), et, m * s, &mut ent, r.start * s)?;
    }
    Ok((lp, ent))
}

/// The rows of a contiguous range, as a batch's row list.
fn run_rows(r: &std::ops::Range<usize>) -> Vec<Option<usize>> {
    r.clone().map(Some).collect()
}

/// The actor loss's inputs in the policy graph (see [`Policy::update_written`]).
#[derive(Clone, Copy, Debug)]
pub struct PolicyInputs {
    /// `[B][S]` each.
    pub old_lp: TensorId,
    pub adv: TensorId,
    pub tok_w: TensorId,
    /// The KL-in-the-loss inputs: reference log-probs `[B][S]` and β (1).
    pub kl: Option<(TensorId, TensorId)>,
}

/// Statistics of one actor update.
#[derive(Clone, Copy, Debug, Default)]
pub struct ActorStats {
    pub loss: f64,
    pub pg_loss: f64,
    pub clipfrac: f64,
    pub ppo_kl: f64,
    pub entropy: f64,
    /// The weighted KL of the KL-in-the-loss term (before β); 0 without one.
    pub kl_loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub applied: bool,
}

/// The policy: trunk + LM head + clipped-PPO loss.
pub struct Policy {
    pub graph: DecoderGraph,
    pub opt: Optimizer,
    /// Host copy for generation: equal to the master weights after [`Policy::sync_host`] (at
    /// once after each step with the host optimizer; on CUDA once per training step).
    pub dec: Decoder,
    /// The device optimizer stepped since `dec` was last refreshed.
    host_stale: bool,
    old_lp: TensorId,
    adv: TensorId,
    tok_w: TensorId,
    stats: TensorId,
    /// The KL-in-the-loss inputs (reference log-probs, coefficient), when the loss has one.
    kl_in: Option<(TensorId, TensorId)>,
}

impl Policy {
    /// `kl`: a KL penalty against the reference in the loss (GRPO's form), with this estimator.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dec: Decoder,
        b: usize,
        s: usize,
        device: &Device,
        temperature: f32,
        clip_low: f32,
        clip_high: f32,
        ent_coef: f32,
        kl: Option<KlKind>,
        opt: &OptSettings,
    ) -> Result<Self> {
        let mut ids = None;
        let graph = dec.build_tempered(b, s, device, temperature, true, |g, t| {
            let n = t.n;
            let lp = t
                .logprob
                .ok_or_else(|| Error::Invalid("policy: no LM head".into()))?;
            let ent = t
                .entropy
                .ok_or_else(|| Error::Invalid("policy: no LM head".into()))?;
            let old_lp = g.input("old_logprob", n);
            let adv = g.input("advantage", n);
            let tok_w = g.input("token_weight", n);
            let mut ins = vec![lp, ent, old_lp, adv, tok_w];
            let kl_in = kl.map(|_| (g.input("ref_logprob", n), g.input("kl_coef", 1)));
            if let Some((r, c)) = kl_in {
                ins.extend([r, c]);
            }
            let outs = g.node_typed(
                ActorLoss {
                    n,
                    clip_low,
                    clip_high,
                    ent_coef,
                    kl,
                },
                &ins,
                &[
                    ("actor_loss", 1, DType::F32),
                    ("actor_stats", 5, DType::F32),
                ],
            )?;
            ids = Some((old_lp, adv, tok_w, outs[1], kl_in));
            Ok(HeadOut {
                loss: outs[0],
                keep: vec![outs[1]],
                params: vec![],
            })
        })?;
        let (old_lp, adv, tok_w, stats, kl_in) = ids.expect("head built");
        let opt = optimizer(&dec, &[], opt, device)?;
        Ok(Policy {
            graph,
            opt,
            dec,
            host_stale: false,
            old_lp,
            adv,
            tok_w,
            stats,
            kl_in,
        })
    }

    /// Per-token log-probs and entropies (`[rows][S]`) of the response tokens (positions >=
    /// `skip[r]`) under the current weights (forward only).
    pub fn logprobs(&mut self, seqs: &[Vec<u32>], skip: &[usize]) -> Result<(Vec<f32>, Vec<f32>)> {
        response_logprobs(&mut self.graph, seqs, skip)
    }

    /// The loss and gradients of a minibatch (at most B rows; `old_lp`, `adv`, `tok_w` are
    /// `[rows][S]`); apply them with [`Policy::step`]. `kl`: the KL-in-the-loss inputs, the
    /// reference log-probs (`[rows][S]`) and β, given exactly when the policy was built with a
    /// KL term.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        seqs: &[Vec<u32>],
        skip: &[usize],
        old_lp: &[f32],
        adv: &[f32],
        tok_w: &[f32],
        kl: Option<(&[f32], f32)>,
    ) -> Result<ActorStats> {
        let (b, s) = self.graph.shape();
        let pad = |v: &[f32]| {
            let mut o = v.to_vec();
            o.resize(b * s, 0.0);
            o
        };
        let sess = self.graph.session_mut();
        sess.write(self.old_lp, &pad(old_lp))?;
        sess.write(self.adv, &pad(adv))?;
        sess.write(self.tok_w, &pad(tok_w))?;
        match (self.kl_in, kl) {
            (Some((r, c)), Some((ref_lp, beta))) => {
                sess.write(r, &pad(ref_lp))?;
                sess.write(c, &[beta])?;
            }
            (None, None) => {}
            (have, _) => {
                return Err(Error::Invalid(format!(
                    "policy update: the actor loss {} a KL term, the update {} reference log-probs",
                    if have.is_some() { "has" } else { "has no" },
                    if have.is_some() { "gives no" } else { "gives" }
                )))
            }
        }
        self.update_written(seqs, skip)
    }

    /// The actor loss's graph inputs, to write them in place (see [`Policy::update_written`]).
    pub fn inputs(&self) -> PolicyInputs {
        PolicyInputs {
            old_lp: self.old_lp,
            adv: self.adv,
            tok_w: self.tok_w,
            kl: self.kl_in,
        }
    }

    /// [`Policy::update`] with the loss's inputs ([`Policy::inputs`]) already written.
    pub fn update_written(&mut self, seqs: &[Vec<u32>], skip: &[usize]) -> Result<ActorStats> {
        self.graph.set_batch_masked(seqs, skip)?;
        self.run_update()
    }

    /// [`Policy::update_written`] on the batch of the step's rows `rows` of `src` (see
    /// [`DecoderGraph::set_batch_rows`]; prompt lengths as skip).
    pub fn update_written_rows(
        &mut self,
        src: &SeqRows,
        rows: &[Option<usize>],
    ) -> Result<ActorStats> {
        self.graph.set_batch_rows(src, rows, true)?;
        self.run_update()
    }

    fn run_update(&mut self) -> Result<ActorStats> {
        let loss = self.graph.run()?;
        let st = self.graph.read(self.stats)?;
        Ok(ActorStats {
            loss: loss as f64,
            pg_loss: st[0] as f64,
            clipfrac: st[1] as f64,
            ppo_kl: st[2] as f64,
            entropy: st[3] as f64,
            kl_loss: st[4] as f64,
            ..Default::default()
        })
    }

    /// The parameter gradients of the last [`Policy::update`], in optimizer order (copied to
    /// the host: tests, and gradient accumulation over micro-batches).
    pub fn grads(&self) -> Result<Vec<Vec<f32>>> {
        grads(&self.graph, &self.opt)
    }

    /// Replaces the last update's gradients (optimizer order), e.g. by a micro-batch sum.
    pub fn set_grads(&mut self, g: &[Vec<f32>]) -> Result<()> {
        set_grads(&mut self.graph, &self.opt, g)
    }

    /// Applies an optimizer step with the last update's gradients (the graph holds the new
    /// weights afterwards; the host copy with the host optimizer, else after
    /// [`Policy::sync_host`]).
    pub fn step(&mut self) -> Result<StepOutcome> {
        let out = self.opt.step_graph(&mut self.graph)?;
        if out.applied {
            self.host_stale = true;
            if matches!(self.opt, Optimizer::Host(_)) {
                self.sync_host()?;
            }
        }
        Ok(out)
    }

    /// Refreshes the host copy `dec` from the master weights when a step changed them (on
    /// CUDA a download of every parameter: the trainer does it once per training step, for
    /// generation on the host).
    pub fn sync_host(&mut self) -> Result<()> {
        if !self.host_stale {
            return Ok(());
        }
        for (n, p) in self.opt.names().iter().zip(self.opt.params_host()?) {
            self.dec.set_param_data(n, &p)?;
        }
        self.host_stale = false;
        Ok(())
    }

    /// Writes the master weights into the graph and the generation copy (after a restore).
    pub fn sync(&mut self) -> Result<()> {
        self.opt.write_graph(&mut self.graph)?;
        self.host_stale = true;
        self.sync_host()
    }
}

/// Which critic head.
#[derive(Clone, Debug)]
pub enum CriticHead {
    /// Scalar value, PPO value loss with clipping.
    Value { clip: f32 },
    /// K quantiles, quantile-Huber + risk terms.
    Quantile {
        k: usize,
        kappa: f32,
        /// QR-DQN's sum over the quantiles (else their mean), see [`QuantileLoss`].
        sum_quantiles: bool,
        risk: RiskTerms,
    },
    /// The DFPO flow head.
    Flow {
        k: usize,
        /// Token capacity of a minibatch's response (the flow head and its loss run on these
        /// gathered rows only; the first input of an update lists them).
        max_tokens: usize,
        shape: FlowHeadShape,
        weights: FlowTermWeights,
        risk: RiskTerms,
        init_seed: u64,
        /// The consistency target's solve over [0, 1] (of the current head, stop-gradient).
        gc_solve: IntegrateOpts,
    },
}

impl CriticHead {
    /// Samples per token (1 for the scalar head).
    pub fn k(&self) -> usize {
        match self {
            CriticHead::Value { .. } => 1,
            CriticHead::Quantile { k, .. } | CriticHead::Flow { k, .. } => *k,
        }
    }
}

/// Statistics of one critic update: the loss and the head's terms.
#[derive(Clone, Debug, Default)]
pub struct CriticStats {
    pub loss: f64,
    pub terms: Vec<(&'static str, f64)>,
}

/// The flow head's parameter name (one flat vector).
pub const FLOW_PARAMS: &str = "flow_head.params";

/// The flow critic loss's statistics, in output order (see [`FlowCriticLoss`]).
pub const FLOW_TERMS: [&str; 6] = ["dcfm", "bcfm", "gc", "cvar_loss", "gain_loss", "shape_loss"];

/// The flow head's per-sample inputs (rows = tokens × K), in order (see [`FlowCriticLoss`]).
pub const FLOW_SAMPLE_INPUTS: [&str; 10] = [
    "z_read", "tau_read", "z_b", "tau_b", "z_d", "tau_d", "eps", "target", "vel_b", "vel_d",
];

/// The flow head's per-token inputs, in order.
pub const FLOW_TOKEN_INPUTS: [&str; 4] = ["w_unc", "dcfm_mask", "token_weight", "risk_weight"];

/// What the DFPO flow critic head is (the settings of [`CriticHead::Flow`] that shape its graph).
#[derive(Clone, Copy, Debug)]
pub struct FlowHeadSpec {
    pub k: usize,
    pub max_tokens: usize,
    pub shape: FlowHeadShape,
    pub weights: FlowTermWeights,
    pub risk: RiskTerms,
    pub gc_solve: IntegrateOpts,
}

/// The tensors of a flow critic head in a graph.
pub struct FlowHeadGraph {
    /// Host-fed inputs in order: the row list (`max_tokens` f32 token indices, −1 = none), the
    /// [`FLOW_SAMPLE_INPUTS`] (max_tokens·K each), the [`FLOW_TOKEN_INPUTS`] (max_tokens each).
    pub inputs: Vec<TensorId>,
    /// The per-token conditioning u (n·W).
    pub u: TensorId,
    pub loss: TensorId,
    /// [`FLOW_TERMS`].
    pub stats: TensorId,
}

/// The DFPO flow critic head (method doc 2.5–2.10) on the f32 conditioning `c` of `n` tokens
/// (n·C, the backbone's hidden states) with the flat parameters `p`: u = cond(c); the listed
/// tokens' rows of u; the readout, anchor and DCFM evaluations; the consistency target (the
/// current head's [0, 1] solve from the readout levels, stop-gradient); [`FlowCriticLoss`].
pub fn flow_head_graph(
    g: &mut GraphBuilder,
    p: TensorId,
    c: TensorId,
    n: usize,
    spec: &FlowHeadSpec,
) -> Result<FlowHeadGraph> {
    let (k, m, shape) = (spec.k, spec.max_tokens, spec.shape);
    let u = g.node(flow_cond(shape), &[p, c], &[("flow_u", n * shape.width)])?[0];
    let rows = g.input("flow_rows", m);
    let us = g.node_typed(
        GatherRows {
            n,
            m,
            w: shape.width,
        },
        &[u, rows],
        &[("flow_u_rows", m * shape.width, DType::F32)],
    )?[0];
    let ins: Vec<TensorId> = FLOW_SAMPLE_INPUTS
        .iter()
        .map(|nm| g.input(nm, m * k))
        .collect();
    let tok: Vec<TensorId> = FLOW_TOKEN_INPUTS.iter().map(|nm| g.input(nm, m)).collect();
    let mut evals = Vec::new();
    for (i, nm) in ["v_read", "v_b", "v_d"].iter().enumerate() {
        // DCFM switched off (weight 0): no evaluation; v_d = vel_d, a zero term.
        if i == 2 && spec.weights.dcfm == 0.0 {
            evals.push(ins[9]);
            continue;
        }
        evals.push(
            g.node(
                flow_eval(shape, k),
                &[p, us, ins[2 * i], ins[2 * i + 1]],
                &[(nm, m * k)],
            )?[0],
        );
    }
    // Consistency switched off (weight 0): no solve (the loss neither uses nor reports it).
    let gc_target = if spec.weights.gc == 0.0 {
        ins[0]
    } else {
        g.node(
            FlowSolveTarget {
                shape,
                samples_per_token: k,
                opts: spec.gc_solve,
            },
            &[p, us, ins[0]],
            &[("gc_target", m * k)],
        )?[0]
    };
    // v_read, v_b, v_d, eps, target, gc_target, vel_b, vel_d, then the per-token inputs.
    let mut loss_ins = evals;
    loss_ins.extend([ins[6], ins[7], gc_target, ins[8], ins[9]]);
    loss_ins.extend_from_slice(&tok);
    let outs = g.node_typed(
        FlowCriticLoss {
            n: m,
            k,
            w: spec.weights,
            risk: spec.risk,
        },
        &loss_ins,
        &[("flow_loss", 1, DType::F32), ("flow_stats", 6, DType::F32)],
    )?;
    let mut inputs = vec![rows];
    inputs.extend_from_slice(&ins);
    inputs.extend_from_slice(&tok);
    Ok(FlowHeadGraph {
        inputs,
        u,
        loss: outs[0],
        stats: outs[1],
    })
}

/// The critic: trunk + head + loss.
pub struct Critic {
    pub graph: DecoderGraph,
    pub opt: Optimizer,
    pub head: CriticHead,
    /// Host-fed inputs of the loss, in the head's order.
    inputs: Vec<TensorId>,
    /// What [`Critic::forward_values`] reads: values (n), quantiles (n·K) or the flow
    /// conditioning u (n·W).
    readout: TensorId,
    stats: TensorId,
    term_names: &'static [&'static str],
}

impl Critic {
    pub fn new(
        dec: &Decoder,
        b: usize,
        s: usize,
        device: &Device,
        head: CriticHead,
        opt: &OptSettings,
    ) -> Result<Self> {
        let mut built = None;
        // The head's parameters with their initial values, registered where they are declared.
        let mut extra: Vec<(String, Vec<f32>)> = Vec::new();
        let graph = dec.build_with(b, s, device, false, |g, t| {
            let n = t.n;
            let h = t.hidden_size;
            match &head {
                CriticHead::Value { clip } => {
                    let w = g.param_typed("value_head.weight", h, t.act);
                    let bias = g.param_typed("value_head.bias", 1, t.act);
                    let v = g.node_typed(
                        crate::model::ops::Linear { n, din: h, dout: 1 },
                        &[t.hidden, w, bias],
                        &[("value", n, t.act)],
                    )?[0];
                    let ins: Vec<TensorId> = ["returns", "value_old", "token_weight"]
                        .iter()
                        .map(|nm| g.input(nm, n))
                        .collect();
                    let outs = g.node_typed(
                        ValueLoss { n, clip: *clip },
                        &[v, ins[0], ins[1], ins[2]],
                        &[
                            ("value_loss", 1, DType::F32),
                            ("value_stats", 2, DType::F32),
                        ],
                    )?;
                    built = Some((ins, v, outs[1], &["vf_loss", "vf_clipfrac"][..]));
                    extra.push(("value_head.weight".into(), vec![0.0; h]));
                    extra.push(("value_head.bias".into(), vec![0.0]));
                    Ok(HeadOut {
                        loss: outs[0],
                        keep: vec![v, outs[1]],
                        params: vec![
                            ("value_head.weight".into(), w),
                            ("value_head.bias".into(), bias),
                        ],
                    })
                }
                CriticHead::Quantile {
                    k,
                    kappa,
                    sum_quantiles,
                    risk,
                } => {
                    let k = *k;
                    let w = g.param_typed("quantile_head.weight", k * h, t.act);
                    let bias = g.param_typed("quantile_head.bias", k, t.act);
                    let q = g.node_typed(
                        crate::model::ops::Linear { n, din: h, dout: k },
                        &[t.hidden, w, bias],
                        &[("quantiles", n * k, t.act)],
                    )?[0];
                    let tg = g.input("target", n * k);
                    let tw = g.input("token_weight", n);
                    let outs = g.node_typed(
                        QuantileLoss {
                            n,
                            k,
                            kappa: *kappa,
                            sum_quantiles: *sum_quantiles,
                            risk: *risk,
                        },
                        &[q, tg, tw],
                        &[
                            ("quantile_loss", 1, DType::F32),
                            ("quantile_stats", 4, DType::F32),
                        ],
                    )?;
                    built = Some((
                        vec![tg, tw],
                        q,
                        outs[1],
                        &["quantile_huber", "cvar_loss", "gain_loss", "shape_loss"][..],
                    ));
                    extra.push(("quantile_head.weight".into(), vec![0.0; k * h]));
                    extra.push(("quantile_head.bias".into(), vec![0.0; k]));
                    Ok(HeadOut {
                        loss: outs[0],
                        keep: vec![q, outs[1]],
                        params: vec![
                            ("quantile_head.weight".into(), w),
                            ("quantile_head.bias".into(), bias),
                        ],
                    })
                }
                CriticHead::Flow {
                    k,
                    max_tokens,
                    shape,
                    weights,
                    risk,
                    init_seed,
                    gc_solve,
                } => {
                    let c = if t.act == DType::F32 {
                        t.hidden
                    } else {
                        g.node_typed(
                            Cast { n: n * h },
                            &[t.hidden],
                            &[("hidden_f32", n * h, DType::F32)],
                        )?[0]
                    };
                    let p = g.param(FLOW_PARAMS, shape.param_count());
                    let spec = FlowHeadSpec {
                        k: *k,
                        max_tokens: *max_tokens,
                        shape: *shape,
                        weights: *weights,
                        risk: *risk,
                        gc_solve: *gc_solve,
                    };
                    let fh = flow_head_graph(g, p, c, n, &spec)?;
                    built = Some((fh.inputs, fh.u, fh.stats, &FLOW_TERMS[..]));
                    extra.push((FLOW_PARAMS.into(), flow::init_params(shape, *init_seed)));
                    Ok(HeadOut {
                        loss: fh.loss,
                        keep: vec![fh.u, fh.stats],
                        params: vec![(FLOW_PARAMS.into(), p)],
                    })
                }
            }
        })?;
        let (inputs, readout, stats, term_names) = built.expect("head built");
        let mut opt = optimizer(dec, &extra, opt, device)?;
        if let CriticHead::Flow { shape, .. } = &head {
            opt.set_no_decay(FLOW_PARAMS, flow_no_decay(shape))?;
        }
        let mut c = Critic {
            graph,
            opt,
            head,
            inputs,
            readout,
            stats,
            term_names,
        };
        c.opt.write_graph(&mut c.graph)?;
        Ok(c)
    }

    /// Forward only over all rows: `[rows][S]` values, `[rows][S][K]` quantiles, or the flow
    /// conditioning `[rows][S][W]` (then integrate with [`Critic::flow_params`]).
    pub fn forward_readout(&mut self, seqs: &[Vec<u32>]) -> Result<Vec<f32>> {
        let (b, _) = self.graph.shape();
        let per_row = self.graph.session().plan().tensor(self.readout).len / b;
        let mut out = Vec::with_capacity(seqs.len() * per_row);
        for r in chunks(seqs.len(), b) {
            let m = r.len();
            self.graph.set_batch(&seqs[r])?;
            // Only the trunk and the head's readout: the loss nodes need targets.
            self.graph.forward_to(self.readout)?;
            out.extend_from_slice(&self.graph.read(self.readout)?[..m * per_row]);
        }
        Ok(out)
    }

    /// [`Critic::forward_readout`] of the step's rows `src` into a step buffer (on CUDA the
    /// batches are gathered from `src` and the readout stays on the device).
    pub fn forward_readout_buf(&mut self, ops: &StepOps, src: &SeqRows) -> Result<StepBuf> {
        let (b, _) = self.graph.shape();
        let per_row = self.graph.session().plan().tensor(self.readout).len / b;
        let mut out = ops.zeros(src.rows() * per_row)?;
        for r in chunks(src.rows(), b) {
            let m = r.len();
            self.graph.set_batch_rows(src, &run_rows(&r), false)?;
            self.graph.forward_to(self.readout)?;
            let sess = self.graph.session();
            ops.read_graph(sess, self.readout, m * per_row, &mut out, r.start * per_row)?;
        }
        Ok(out)
    }

    /// The flow head's current parameters as a step buffer (on CUDA a device copy of the
    /// graph's live weights, on the CPU the master weights).
    pub fn flow_params_buf(&self, ops: &StepOps) -> Result<StepBuf> {
        if !ops.is_cuda() {
            return Ok(StepBuf::Host(self.flow_params()?));
        }
        let t = self.graph.param_id(FLOW_PARAMS)?;
        ops.graph_param(self.graph.session(), t)
    }

    /// The flow head's token capacity per minibatch (flow critic only).
    pub fn flow_capacity(&self) -> Option<usize> {
        match self.head {
            CriticHead::Flow { max_tokens, .. } => Some(max_tokens),
            _ => None,
        }
    }

    /// The flow head's current parameters (flow critic only; a small download on CUDA).
    pub fn flow_params(&self) -> Result<Vec<f32>> {
        if !matches!(self.head, CriticHead::Flow { .. }) {
            return Err(Error::Invalid("flow_params: not a flow critic".into()));
        }
        self.opt.param_host(FLOW_PARAMS)
    }

    /// The loss and gradients of a minibatch with the head's inputs (each `[rows][S]` or
    /// `[rows][S][K]`, in the head's input order; padded here to the graph's batch); apply them
    /// with [`Critic::step`].
    pub fn update(&mut self, seqs: &[Vec<u32>], inputs: &[Vec<f32>]) -> Result<CriticStats> {
        if inputs.len() != self.inputs.len() {
            return Err(Error::Invalid(format!(
                "critic update: {} inputs, the head takes {}",
                inputs.len(),
                self.inputs.len()
            )));
        }
        if let CriticHead::Flow {
            max_tokens, shape, ..
        } = &self.head
        {
            // The device gather's backward needs distinct rows: refuse a bad list here.
            let (b, s) = self.graph.shape();
            GatherRows {
                n: b * s,
                m: *max_tokens,
                w: shape.width,
            }
            .check_rows(&inputs[0])?;
        }
        let flow = matches!(self.head, CriticHead::Flow { .. });
        for (i, (&t, v)) in self.inputs.iter().zip(inputs).enumerate() {
            let len = self.graph.session().plan().tensor(t).len;
            let mut o = v.clone();
            if o.len() > len {
                return Err(Error::Shape(format!(
                    "critic update: an input of {} values for a tensor of {len}",
                    o.len()
                )));
            }
            // The flow head's row list pads with "none" (a 0 would list token 0 again).
            o.resize(len, if flow && i == 0 { -1.0 } else { 0.0 });
            self.graph.session_mut().write(t, &o)?;
        }
        self.update_written(seqs)
    }

    /// The loss's graph inputs in the head's order (to write them in place, see
    /// [`Critic::update_written`]).
    pub fn inputs(&self) -> &[TensorId] {
        &self.inputs
    }

    /// [`Critic::update`] with the head's inputs ([`Critic::inputs`]) already written (the
    /// flow head's row list must hold distinct rows, as [`GatherRows::check_rows`] checks).
    pub fn update_written(&mut self, seqs: &[Vec<u32>]) -> Result<CriticStats> {
        self.graph.set_batch(seqs)?;
        self.run_update()
    }

    /// [`Critic::update_written`] on the batch of the step's rows `rows` of `src` (see
    /// [`DecoderGraph::set_batch_rows`]).
    pub fn update_written_rows(
        &mut self,
        src: &SeqRows,
        rows: &[Option<usize>],
    ) -> Result<CriticStats> {
        self.graph.set_batch_rows(src, rows, false)?;
        self.run_update()
    }

    fn run_update(&mut self) -> Result<CriticStats> {
        let loss = self.graph.run()?;
        let st = self.graph.read(self.stats)?;
        Ok(CriticStats {
            loss: loss as f64,
            terms: self
                .term_names
                .iter()
                .copied()
                .zip(st.iter().map(|&v| v as f64))
                .collect(),
        })
    }

    /// The parameter gradients of the last [`Critic::update`], in optimizer order (copied to
    /// the host: tests, and gradient accumulation over micro-batches).
    pub fn grads(&self) -> Result<Vec<Vec<f32>>> {
        grads(&self.graph, &self.opt)
    }

    /// Replaces the last update's gradients (optimizer order), e.g. by a micro-batch sum.
    pub fn set_grads(&mut self, g: &[Vec<f32>]) -> Result<()> {
        set_grads(&mut self.graph, &self.opt, g)
    }

    /// Applies an optimizer step with the last update's gradients (the graph holds the new
    /// weights afterwards).
    pub fn step(&mut self) -> Result<StepOutcome> {
        self.opt.step_graph(&mut self.graph)
    }

    /// Writes the master weights into the graph (after a checkpoint restore).
    pub fn sync(&mut self) -> Result<()> {
        self.opt.write_graph(&mut self.graph)
    }
}

/// The flow head's LayerNorm gains and shifts and its biases (inside its flat parameter
/// vector): not weight-decayed, as norms and biases are everywhere else.
fn flow_no_decay(shape: &FlowHeadShape) -> Vec<std::ops::Range<usize>> {
    let lay = shape.layout();
    let mut r = vec![lay.b_in, lay.b_out];
    for l in lay.layers {
        r.extend([l.gamma, l.beta]);
        r.extend(l.b);
    }
    r
}

fn flow_cond(shape: FlowHeadShape) -> crate::graph::ops::FlowCond {
    crate::graph::ops::FlowCond { shape }
}

fn flow_eval(shape: FlowHeadShape, k: usize) -> crate::graph::ops::FlowEval {
    crate::graph::ops::FlowEval {
        shape,
        samples_per_token: k,
    }
}

/// The policy's master weights as an HF tensor map (for export), shaped like `dec`'s.
pub fn tensor_map(dec: &Decoder, opt: &Optimizer) -> Result<TensorMap> {
    let mut out = BTreeMap::new();
    let all: BTreeMap<&str, Vec<f32>> = opt
        .names()
        .iter()
        .map(String::as_str)
        .zip(opt.params_host()?)
        .collect();
    for (name, t) in dec.params() {
        let data = all
            .get(name.as_str())
            .ok_or_else(|| Error::Invalid(format!("export: no master weights for {name}")))?;
        out.insert(
            name.clone(),
            crate::model::checkpoint::Tensor::new(t.shape.clone(), data.clone())?,
        );
    }
    Ok(out)
}
