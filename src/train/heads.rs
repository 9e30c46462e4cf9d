//! The training heads' loss ops: the clipped-PPO actor loss, the PPO value loss, the quantile
//! critic loss and the DFPO flow-critic loss, plus a dtype cast.
//!
//! Their inputs are per-token (or per token × sample) vectors, tiny next to the backbone, so
//! each is written once, on the host, as a [`HostKernel`] (plain slices in, values and
//! gradients out): the CPU reference and the CPU backend. As graph ops the four losses run that
//! host kernel on the CPU and their device kernels (`kernels/heads.cu`, the risk terms through
//! `risk.cu`) on CUDA, so no loss input or gradient leaves the device; [`HostOp`] runs any host
//! kernel in a graph on either device (on CUDA by downloading its inputs and uploading its
//! outputs). The heavy per-sample work (flow-head evaluations) is in `FlowEval`/`FlowCond`.
//!
//! Token weights `tok_w` carry masking and aggregation: 0 off the response, and Σ tok_w = 1
//! over a minibatch for the token mean (or 1/(len·#seqs) per token for the sequence mean), so
//! every loss is Σ_t tok_w_t · loss_t.

use crate::error::{check_len, Error, Result};
use crate::graph::{DType, Exec, Op, TensorId};
use crate::kernels::risk::{self, RiskLossWeights, TailLevels};
use crate::kernels::rl;
use crate::model::ops::gpu;
use crate::train::step_ops::StepOps;

/// A small op computed on the host from f32 vectors.
pub trait HostKernel {
    fn name(&self) -> String;
    /// Output lengths given the input lengths are implied by the op; returns the outputs.
    fn forward(&self, ins: &[Vec<f32>]) -> Result<Vec<Vec<f32>>>;
    /// Gradients of the inputs flagged in `need` (None elsewhere), not accumulated.
    fn backward(
        &self,
        ins: &[Vec<f32>],
        outs: &[Vec<f32>],
        d_outs: &[Vec<f32>],
        need: &[bool],
    ) -> Result<Vec<Option<Vec<f32>>>>;
}

/// Runs a [`HostKernel`] as a graph op.
pub struct HostOp<K>(pub K);

fn read_all(x: &Exec<'_>, ts: &[TensorId]) -> Result<Vec<Vec<f32>>> {
    ts.iter().map(|&t| x.to_host(t)).collect()
}

impl<K: HostKernel> Op for HostOp<K> {
    fn name(&self) -> String {
        self.0.name()
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        host_forward(&self.0, x, ins, outs)
    }
    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        host_backward(&self.0, x, ins, outs, d_outs, d_ins)
    }
}

/// [`HostOp`]'s forward: the host kernel on host copies of the inputs (a download and upload
/// on CUDA).
fn host_forward<K: HostKernel + ?Sized>(
    k: &K,
    x: &mut Exec<'_>,
    ins: &[TensorId],
    outs: &[TensorId],
) -> Result<()> {
    let iv = read_all(x, ins)?;
    let ov = k.forward(&iv)?;
    check_len(&format!("{} outputs", k.name()), ov.len(), outs.len())?;
    for (&t, v) in outs.iter().zip(&ov) {
        x.from_host(t, v)?;
    }
    Ok(())
}

/// [`HostOp`]'s backward (accumulates into the needed input gradients).
fn host_backward<K: HostKernel + ?Sized>(
    k: &K,
    x: &mut Exec<'_>,
    ins: &[TensorId],
    outs: &[TensorId],
    d_outs: &[TensorId],
    d_ins: &[Option<TensorId>],
) -> Result<()> {
    let need: Vec<bool> = d_ins.iter().map(Option::is_some).collect();
    if !need.iter().any(|&b| b) {
        return Ok(());
    }
    let iv = read_all(x, ins)?;
    let ov = read_all(x, outs)?;
    let dv = read_all(x, d_outs)?;
    let grads = k.backward(&iv, &ov, &dv, &need)?;
    for (i, (d, g)) in d_ins.iter().zip(grads).enumerate() {
        let (Some(d), Some(g)) = (d, g) else { continue };
        let mut acc = x.to_host(*d)?;
        check_len(&format!("{} gradient {i}", k.name()), g.len(), acc.len())?;
        for (a, v) in acc.iter_mut().zip(&g) {
            *a += v;
        }
        x.from_host(*d, &acc)?;
    }
    Ok(())
}

fn check_lens(what: &str, ins: &[Vec<f32>], lens: &[usize]) -> Result<()> {
    check_len(&format!("{what} inputs"), ins.len(), lens.len())?;
    for (i, (v, &n)) in ins.iter().zip(lens).enumerate() {
        check_len(&format!("{what} input {i}"), v.len(), n)?;
    }
    Ok(())
}

/// Widens or narrows between activation dtypes: out = in (the output's dtype decides the
/// storage); the gradient passes through.
pub struct Cast {
    pub n: usize,
}

impl HostKernel for Cast {
    fn name(&self) -> String {
        "cast".into()
    }
    fn forward(&self, ins: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        check_lens("cast", ins, &[self.n])?;
        Ok(vec![ins[0].clone()])
    }
    fn backward(
        &self,
        _ins: &[Vec<f32>],
        _outs: &[Vec<f32>],
        d_outs: &[Vec<f32>],
        need: &[bool],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        Ok(vec![need[0].then(|| d_outs[0].clone())])
    }
}

/// The graph op of [`Cast`] from bf16 to f32 (the flow critic's conditioning): on CUDA a cast
/// kernel and, backward, `dx = bf16(dx + dy)` on the device (the host kernel's arithmetic:
/// one rounding), never a host round trip; on the CPU the host kernel.
impl Op for Cast {
    fn name(&self) -> String {
        "cast_bf16_f32".into()
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        check_len("cast input", x.len(ins[0]), self.n)?;
        check_len("cast output", x.len(outs[0]), self.n)?;
        if let Some(dev) = x.cuda_device() {
            if (x.dtype(ins[0]), x.dtype(outs[0])) != (DType::BF16, DType::F32) {
                return Err(Error::Invalid(format!(
                    "cast: the CUDA op casts bf16 to f32, got {:?} to {:?}",
                    x.dtype(ins[0]),
                    x.dtype(outs[0])
                )));
            }
            // SAFETY: n bf16 in, n f32 out (checked above).
            return unsafe { gpu::cast_bf16_f32(dev, x.ptr(ins[0]), x.ptr(outs[0]), self.n) };
        }
        let v = x.to_host(ins[0])?;
        x.from_host(outs[0], &v)
    }
    fn backward_reads(&self) -> (bool, bool) {
        (false, false)
    }
    fn backward(
        &self,
        x: &mut Exec<'_>,
        _ins: &[TensorId],
        _outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        let Some(d) = d_ins[0] else { return Ok(()) };
        if let Some(dev) = x.cuda_device() {
            if (x.dtype(d_outs[0]), x.dtype(d)) != (DType::F32, DType::BF16) {
                return Err(Error::Invalid(
                    "cast backward: the CUDA op adds an f32 gradient into a bf16 one".into(),
                ));
            }
            // SAFETY: n f32 and n bf16 gradients (the forward's lengths).
            return unsafe { gpu::acc_f32_bf16(dev, x.ptr(d_outs[0]), x.ptr(d), self.n) };
        }
        let dy = x.to_host(d_outs[0])?;
        let mut acc = x.to_host(d)?;
        for (a, v) in acc.iter_mut().zip(&dy) {
            *a += v;
        }
        x.from_host(d, &acc)
    }
}

/// Row gather: ins `[x (n·w), rows (m; f32 row indices, −1 = none)]`, out `[y (m·w)]` with
/// y[i] = x[rows[i]] (zeros for −1); the backward scatter-adds into x. Lets the flow head
/// evaluate only the response tokens of a minibatch.
pub struct GatherRows {
    pub n: usize,
    pub m: usize,
    pub w: usize,
}

impl GatherRows {
    fn f32_only(&self, x: &Exec<'_>, ts: &[TensorId]) -> Result<()> {
        match ts.iter().find(|&&t| x.dtype(t) != DType::F32) {
            Some(&t) => Err(Error::Invalid(format!(
                "gather_rows: the CUDA op takes f32 tensors, got {:?}",
                x.dtype(t)
            ))),
            None => Ok(()),
        }
    }

    /// Checks a row list before it is written to the device op: every entry an integer in
    /// `-1..n` (−1: none) and no row twice (the device backward gives each row one writer).
    pub fn check_rows(&self, idx: &[f32]) -> Result<()> {
        let mut seen = vec![false; self.n];
        for r in self.rows(idx)?.into_iter().flatten() {
            if std::mem::replace(&mut seen[r], true) {
                return Err(Error::Invalid(format!(
                    "gather_rows: row {r} is listed twice"
                )));
            }
        }
        Ok(())
    }

    fn rows(&self, idx: &[f32]) -> Result<Vec<Option<usize>>> {
        idx.iter()
            .map(|&r| {
                if r < 0.0 {
                    Ok(None)
                } else if r.fract() == 0.0 && (r as usize) < self.n {
                    Ok(Some(r as usize))
                } else {
                    Err(Error::Invalid(format!(
                        "gather_rows: row index {r} is not an integer in 0..{}",
                        self.n
                    )))
                }
            })
            .collect()
    }
}

/// The graph op of [`GatherRows`] (f32 rows): on CUDA a gather kernel and, backward, a
/// scatter-add on the device (the rows must be distinct: [`GatherRows::check_rows`], which the
/// critic applies to its row list on the host); on the CPU the host kernel.
impl Op for GatherRows {
    fn name(&self) -> String {
        "gather_rows".into()
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        check_len("gather_rows x", x.len(ins[0]), self.n * self.w)?;
        check_len("gather_rows rows", x.len(ins[1]), self.m)?;
        check_len("gather_rows y", x.len(outs[0]), self.m * self.w)?;
        if let Some(dev) = x.cuda_device() {
            self.f32_only(x, &[ins[0], ins[1], outs[0]])?;
            let (a, r, b) = (x.ptr(ins[0]), x.ptr(ins[1]), x.ptr(outs[0]));
            // SAFETY: lengths and dtypes checked above.
            return unsafe { gpu::rows(dev, false, a, r, b, self.n, self.m, self.w) };
        }
        let iv = vec![x.to_host(ins[0])?, x.to_host(ins[1])?];
        let y = HostKernel::forward(self, &iv)?;
        x.from_host(outs[0], &y[0])
    }
    fn backward_reads(&self) -> (bool, bool) {
        (true, false)
    }
    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        _outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        if d_ins[1].is_some() {
            return Err(Error::Invalid(
                "gather_rows: indices get no gradient".into(),
            ));
        }
        let Some(d) = d_ins[0] else { return Ok(()) };
        if let Some(dev) = x.cuda_device() {
            self.f32_only(x, &[d_outs[0], d])?;
            let (a, r, b) = (x.ptr(d_outs[0]), x.ptr(ins[1]), x.ptr(d));
            // SAFETY: the forward's lengths; the graph's gradients are f32 (checked).
            return unsafe { gpu::rows(dev, true, a, r, b, self.n, self.m, self.w) };
        }
        let rows = self.rows(&x.to_host(ins[1])?)?;
        let dy = x.to_host(d_outs[0])?;
        let mut acc = x.to_host(d)?;
        let w = self.w;
        for (i, r) in rows.into_iter().enumerate() {
            if let Some(r) = r {
                for (a, g) in acc[r * w..(r + 1) * w]
                    .iter_mut()
                    .zip(&dy[i * w..(i + 1) * w])
                {
                    *a += g;
                }
            }
        }
        x.from_host(d, &acc)
    }
}

impl HostKernel for GatherRows {
    fn name(&self) -> String {
        "gather_rows".into()
    }
    fn forward(&self, ins: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        check_lens("gather_rows", ins, &[self.n * self.w, self.m])?;
        let w = self.w;
        let mut y = vec![0.0f32; self.m * w];
        for (i, r) in self.rows(&ins[1])?.into_iter().enumerate() {
            if let Some(r) = r {
                y[i * w..(i + 1) * w].copy_from_slice(&ins[0][r * w..(r + 1) * w]);
            }
        }
        Ok(vec![y])
    }
    fn backward(
        &self,
        ins: &[Vec<f32>],
        _outs: &[Vec<f32>],
        d_outs: &[Vec<f32>],
        need: &[bool],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        if need[1] {
            return Err(Error::Invalid(
                "gather_rows: indices get no gradient".into(),
            ));
        }
        let w = self.w;
        let mut dx = vec![0.0f32; self.n * w];
        for (i, r) in self.rows(&ins[1])?.into_iter().enumerate() {
            if let Some(r) = r {
                for (d, g) in dx[r * w..(r + 1) * w]
                    .iter_mut()
                    .zip(&d_outs[0][i * w..(i + 1) * w])
                {
                    *d += g;
                }
            }
        }
        Ok(vec![need[0].then_some(dx), None])
    }
}

/// Per-token clipped-PPO surrogate and its gradient d/dlogp (method doc 2.11):
/// ρ = exp(clamp(logp − logp_old, ±20)) (verl's clamp: one extreme token cannot make the loss
/// non-finite), s1 = −Aρ, s2 = −A·clip(ρ, 1−lo, 1+hi); loss = max(s1, s2); gradient −Aρ where
/// the unclipped branch is the max and the log-ratio is inside the clamp, else 0. Returns
/// (loss, grad, clipped).
pub fn ppo_token(logp: f32, logp_old: f32, adv: f32, lo: f32, hi: f32) -> (f32, f32, bool) {
    let d = logp - logp_old;
    let c = rl::LOG_RATIO_CLAMP;
    let ratio = d.clamp(-c, c).exp();
    let s1 = -adv * ratio;
    let s2 = -adv * ratio.clamp(1.0 - lo, 1.0 + hi);
    if s2 > s1 {
        (s2, 0.0, true)
    } else {
        (s1, if d.abs() <= c { s1 } else { 0.0 }, false)
    }
}

/// The KL-in-the-loss term of one token against the reference and its gradient d/dlogp:
/// k1 = logp − ref; k3 ("low_var_kl", verl's clamps) = clamp(e^x − x − 1, ±10) with
/// x = clamp(ref − logp, ±20), gradient 1 − e^x inside both clamps, else 0.
pub fn kl_loss_token(logp: f32, logp_ref: f32, kind: rl::KlKind) -> (f32, f32) {
    match kind {
        rl::KlKind::K1 => (logp - logp_ref, 1.0),
        rl::KlKind::K3 => {
            let d = logp_ref - logp;
            let c = rl::LOG_RATIO_CLAMP;
            let x = d.clamp(-c, c);
            let ex = x.exp();
            let kl = ex - x - 1.0;
            let g = if d.abs() <= c && kl <= 10.0 {
                1.0 - ex
            } else {
                0.0
            };
            (kl.min(10.0), g)
        }
    }
}

/// Clipped-PPO actor loss with an entropy bonus and (when `kl` is set) a KL penalty against the
/// reference in the loss (verl's use_kl_loss, GRPO's form): ins `[logprob, entropy,
/// logprob_old, adv, tok_w]` (each n) and, with `kl`, `[logprob_ref (n), kl_coef (1)]`; outs
/// `[loss (1), stats (5) = pg_loss, clipfrac, ppo_kl, entropy, kl_loss]` (tok_w-weighted).
/// loss = Σ tok_w (pg − ent_coef·H + β·kl).
pub struct ActorLoss {
    pub n: usize,
    pub clip_low: f32,
    pub clip_high: f32,
    pub ent_coef: f32,
    pub kl: Option<rl::KlKind>,
}

impl HostKernel for ActorLoss {
    fn name(&self) -> String {
        "actor_loss".into()
    }
    fn forward(&self, ins: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let n = self.n;
        match self.kl {
            Some(_) => check_lens("actor_loss", ins, &[n, n, n, n, n, n, 1])?,
            None => check_lens("actor_loss", ins, &[n; 5])?,
        }
        let (lp, ent, old, adv, w) = (&ins[0], &ins[1], &ins[2], &ins[3], &ins[4]);
        let (mut pg, mut cf, mut kl, mut h, mut kll) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for i in 0..n {
            if w[i] == 0.0 {
                continue;
            }
            let (l, _, c) = ppo_token(lp[i], old[i], adv[i], self.clip_low, self.clip_high);
            let wi = w[i] as f64;
            pg += wi * l as f64;
            cf += if c { wi } else { 0.0 };
            kl += wi * (old[i] - lp[i]) as f64;
            h += wi * ent[i] as f64;
            if let Some(kind) = self.kl {
                kll += wi * kl_loss_token(lp[i], ins[5][i], kind).0 as f64;
            }
        }
        let beta = self.kl.map_or(0.0, |_| ins[6][0] as f64);
        let loss = pg - self.ent_coef as f64 * h + beta * kll;
        Ok(vec![
            vec![loss as f32],
            vec![pg as f32, cf as f32, kl as f32, h as f32, kll as f32],
        ])
    }
    fn backward(
        &self,
        ins: &[Vec<f32>],
        _outs: &[Vec<f32>],
        d_outs: &[Vec<f32>],
        need: &[bool],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        if need[2..].iter().any(|&b| b) {
            return Err(Error::Invalid(
                "actor_loss: old and reference log-probs, advantages, weights and the KL coefficient get no gradient".into(),
            ));
        }
        let dl = d_outs[0][0];
        let (lp, old, adv, w) = (&ins[0], &ins[2], &ins[3], &ins[4]);
        let beta = self.kl.map_or(0.0, |_| ins[6][0]);
        let dlp = need[0].then(|| {
            (0..self.n)
                .map(|i| {
                    if w[i] == 0.0 {
                        return 0.0;
                    }
                    let (_, g, _) = ppo_token(lp[i], old[i], adv[i], self.clip_low, self.clip_high);
                    let gk = self
                        .kl
                        .map_or(0.0, |kind| kl_loss_token(lp[i], ins[5][i], kind).1);
                    dl * w[i] * (g + beta * gk)
                })
                .collect()
        });
        let dent = need[1].then(|| w.iter().map(|&wi| -dl * self.ent_coef * wi).collect());
        let mut out = vec![dlp, dent];
        out.resize(ins.len(), None);
        Ok(out)
    }
}

/// PPO value loss with value clipping: ins `[v, ret, v_old, tok_w]` (each n), outs
/// `[loss (1), stats (2) = loss, clipfrac]`; loss = Σ tok_w · ½·max((v−R)², (v_clip−R)²) with
/// v_clip = v_old + clamp(v − v_old, ±clip) (clip = 0: unclipped).
pub struct ValueLoss {
    pub n: usize,
    pub clip: f32,
}

impl ValueLoss {
    /// (loss, dloss/dv, clipped) of one token.
    fn token(&self, v: f32, r: f32, old: f32) -> (f32, f32, bool) {
        let l1 = 0.5 * (v - r) * (v - r);
        if self.clip <= 0.0 {
            return (l1, v - r, false);
        }
        let d = (v - old).clamp(-self.clip, self.clip);
        let vc = old + d;
        let l2 = 0.5 * (vc - r) * (vc - r);
        if l2 > l1 {
            // The clipped value moves with v only inside the clip range.
            let inside = (v - old).abs() < self.clip;
            (l2, if inside { vc - r } else { 0.0 }, true)
        } else {
            (l1, v - r, false)
        }
    }
}

impl HostKernel for ValueLoss {
    fn name(&self) -> String {
        "value_loss".into()
    }
    fn forward(&self, ins: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        check_lens("value_loss", ins, &[self.n; 4])?;
        let (mut l, mut cf) = (0.0f64, 0.0f64);
        #[allow(clippy::needless_range_loop)] // four parallel inputs
        for i in 0..self.n {
            let w = ins[3][i] as f64;
            if w == 0.0 {
                continue;
            }
            let (li, _, c) = self.token(ins[0][i], ins[1][i], ins[2][i]);
            l += w * li as f64;
            cf += if c { w } else { 0.0 };
        }
        Ok(vec![vec![l as f32], vec![l as f32, cf as f32]])
    }
    fn backward(
        &self,
        ins: &[Vec<f32>],
        _outs: &[Vec<f32>],
        d_outs: &[Vec<f32>],
        need: &[bool],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        if need[1..].iter().any(|&b| b) {
            return Err(Error::Invalid("value_loss: only v gets a gradient".into()));
        }
        let dl = d_outs[0][0];
        let dv = (0..self.n)
            .map(|i| {
                let w = ins[3][i];
                if w == 0.0 {
                    0.0
                } else {
                    dl * w * self.token(ins[0][i], ins[1][i], ins[2][i]).1
                }
            })
            .collect();
        Ok(vec![Some(dv), None, None, None])
    }
}

/// The risk terms shared by the quantile and flow critics, as configured.
#[derive(Clone, Copy, Debug)]
pub struct RiskTerms {
    pub levels: TailLevels,
    pub weights: RiskLossWeights,
}

impl RiskTerms {
    /// No risk term (every weight 0).
    pub fn off() -> Self {
        RiskTerms {
            levels: TailLevels::default(),
            weights: RiskLossWeights {
                cvar: 0.0,
                gain: 0.0,
                shape: 0.0,
                mean_shift: 0.0,
            },
        }
    }

    fn active(&self) -> bool {
        let w = &self.weights;
        w.cvar != 0.0 || w.gain != 0.0 || w.shape != 0.0 || w.mean_shift != 0.0
    }

    /// Adds the weighted risk loss between `pred` and `target` (`[n][k]`, rows scaled by `tok_w`)
    /// into `grad` (when given) and returns (total, [cvar, gain, shape] tok_w-weighted means).
    fn apply(
        &self,
        pred: &[f32],
        target: &[f32],
        k: usize,
        tok_w: &[f32],
        grad: Option<&mut [f32]>,
    ) -> Result<(f64, [f64; 3])> {
        if !self.active() {
            return Ok((0.0, [0.0; 3]));
        }
        let n = tok_w.len();
        let mut terms = vec![0.0f32; n * risk::NTERMS];
        let mut g = vec![0.0f32; n * k];
        let total = StepOps::host().risk_loss(
            pred,
            target,
            k,
            self.levels,
            &self.weights,
            tok_w,
            &mut terms,
            &mut g,
        )?;
        if let Some(out) = grad {
            for (o, v) in out.iter_mut().zip(&g) {
                *o += v;
            }
        }
        let mut means = [0.0f64; 3];
        for (i, &w) in tok_w.iter().enumerate() {
            for (j, m) in means.iter_mut().enumerate() {
                *m += w as f64 * terms[i * risk::NTERMS + j] as f64;
            }
        }
        Ok((total as f64, means))
    }
}

/// Quantile critic (DVPO-style): ins `[q (n·K), target (n·K), tok_w (n)]`, outs `[loss (1),
/// stats (4) = quantile_huber, cvar, gain, shape]`. The quantile-Huber term compares each
/// predicted quantile q_i (level τ_i = (i+½)/K) with every target sample G_j:
/// ρ_τ(u) = |τ − 1{u<0}|·H_κ(u)/κ, u = G_j − q_i, summed over i and averaged over j (QR-DQN;
/// `sum_quantiles = false` averages over i too); plus the risk terms
/// between the (sorted) quantiles and the targets.
pub struct QuantileLoss {
    pub n: usize,
    pub k: usize,
    pub kappa: f32,
    /// Sum over the predicted quantiles i (QR-DQN, the default), else average over them too.
    pub sum_quantiles: bool,
    pub risk: RiskTerms,
}

/// Huber H_κ(u) and its derivative.
fn huber(u: f32, kappa: f32) -> (f32, f32) {
    if u.abs() <= kappa {
        (0.5 * u * u, u)
    } else {
        (kappa * (u.abs() - 0.5 * kappa), kappa * u.signum())
    }
}

impl QuantileLoss {
    /// Quantile-Huber loss of one row and (when asked) its gradient d/dq (unscaled).
    fn row(&self, q: &[f32], g: &[f32], grad: Option<&mut [f32]>) -> f64 {
        let k = self.k;
        // Mean over the targets j; sum (QR-DQN) or mean over the quantiles i.
        let inv = if self.sum_quantiles {
            1.0 / k as f32
        } else {
            1.0 / (k * k) as f32
        };
        let mut total = 0.0f64;
        let mut gr = vec![0.0f32; k];
        for (i, &qi) in q.iter().enumerate() {
            let tau = (i as f32 + 0.5) / k as f32;
            for &gj in g {
                let u = gj - qi;
                let wt = (tau - if u < 0.0 { 1.0 } else { 0.0 }).abs();
                let (h, dh) = huber(u, self.kappa);
                total += (wt * h / self.kappa * inv) as f64;
                gr[i] -= wt * dh / self.kappa * inv;
            }
        }
        if let Some(out) = grad {
            out.copy_from_slice(&gr);
        }
        total
    }
}

impl HostKernel for QuantileLoss {
    fn name(&self) -> String {
        "quantile_loss".into()
    }
    fn forward(&self, ins: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let (n, k) = (self.n, self.k);
        check_lens("quantile_loss", ins, &[n * k, n * k, n])?;
        let (q, g, w) = (&ins[0], &ins[1], &ins[2]);
        let mut qh = 0.0f64;
        for t in 0..n {
            if w[t] != 0.0 {
                qh += w[t] as f64 * self.row(&q[t * k..(t + 1) * k], &g[t * k..(t + 1) * k], None);
            }
        }
        let (rt, m) = self.risk.apply(q, g, k, w, None)?;
        Ok(vec![
            vec![(qh + rt) as f32],
            vec![qh as f32, m[0] as f32, m[1] as f32, m[2] as f32],
        ])
    }
    fn backward(
        &self,
        ins: &[Vec<f32>],
        _outs: &[Vec<f32>],
        d_outs: &[Vec<f32>],
        need: &[bool],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        if need[1] || need[2] {
            return Err(Error::Invalid(
                "quantile_loss: targets and weights get no gradient".into(),
            ));
        }
        let (n, k) = (self.n, self.k);
        let (q, g, w) = (&ins[0], &ins[1], &ins[2]);
        let mut dq = vec![0.0f32; n * k];
        #[allow(clippy::needless_range_loop)] // rows of q, g and dq by token
        for t in 0..n {
            if w[t] != 0.0 {
                let r = t * k..(t + 1) * k;
                self.row(&q[r.clone()], &g[r.clone()], Some(&mut dq[r.clone()]));
                for v in &mut dq[r] {
                    *v *= w[t];
                }
            }
        }
        self.risk.apply(q, g, k, w, Some(&mut dq))?;
        let dl = d_outs[0][0];
        for v in &mut dq {
            *v *= dl;
        }
        Ok(vec![Some(dq), None, None])
    }
}

/// Weights of the flow critic's flow-matching and consistency terms.
#[derive(Clone, Copy, Debug)]
pub struct FlowTermWeights {
    pub dcfm: f32,
    pub bcfm: f32,
    pub gc: f32,
}

/// The DFPO critic loss (method doc 2.5–2.10) from three flow-head evaluations.
///
/// ins (rows = n tokens × K samples):
/// 0 `v_read` = v(ε_k, 0 | h_t): the one-step readout ẑ = ε_k + v_read at the K readout levels;
/// 1 `v_b` = v(τG + (1−τ)ε, τ | h_t): the bootstrapped anchor's evaluation;
/// 2 `v_d` = v(r_t + γ m_t z'_τ, τ | h_t): the distributional CFM evaluation (z'_τ from ε);
/// with (ε, τ) sampled per row for 1 and 2;
/// 3 `eps` (the readout levels ε_k), 4 `target` G (the distributional λ-returns), 5
/// `gc_target` (the current head's N-step solve from ε_k; stop-gradient: it gets no gradient
/// even when computed in the graph), 6 `vel_b` = G − ε, 7 `vel_d` = v_old(z'_τ, τ |
/// h_{t+1}) (rows × K each); 8 `w_unc` (n, the confidence weight), 9 `dmask` (n, 0 where the DCFM
/// target does not exist: the last response token), 10 `tok_w` (n), 11 `risk_w` (n, the row
/// weights of the risk terms: `tok_w`, or only the rows whose targets are pooled).
///
/// outs `[loss (1), stats (6) = dcfm, bcfm, gc, cvar, gain, shape]` (tok_w-weighted means; gc
/// is 0 when its weight is):
/// loss = Σ_t tok_w·[ w_unc·(λ_D·mean_k dmask·(v_d − vel_d)² + λ_B·mean_k (v_b − vel_b)²)
///                   + λ_GC·mean_k (ẑ − gc_target)² ] + risk(ẑ, G; rows weighted by risk_w).
pub struct FlowCriticLoss {
    pub n: usize,
    pub k: usize,
    pub w: FlowTermWeights,
    pub risk: RiskTerms,
}

impl FlowCriticLoss {
    fn readout(&self, ins: &[Vec<f32>]) -> Vec<f32> {
        ins[0].iter().zip(&ins[3]).map(|(v, e)| v + e).collect()
    }
}

impl HostKernel for FlowCriticLoss {
    fn name(&self) -> String {
        "flow_critic_loss".into()
    }
    fn forward(&self, ins: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let (n, k) = (self.n, self.k);
        let nk = n * k;
        check_lens(
            "flow_critic_loss",
            ins,
            &[nk, nk, nk, nk, nk, nk, nk, nk, n, n, n, n],
        )?;
        let z1 = self.readout(ins);
        let (vb, vd, g, gct, velb, veld) = (&ins[1], &ins[2], &ins[4], &ins[5], &ins[6], &ins[7]);
        let (wu, dm, tw) = (&ins[8], &ins[9], &ins[10]);
        let inv_k = 1.0 / k as f64;
        let (mut d, mut b, mut c) = (0.0f64, 0.0f64, 0.0f64);
        for t in 0..n {
            if tw[t] == 0.0 {
                continue;
            }
            let (mut sd, mut sb, mut sc) = (0.0f64, 0.0f64, 0.0f64);
            for r in t * k..(t + 1) * k {
                sd += ((vd[r] - veld[r]) as f64).powi(2);
                sb += ((vb[r] - velb[r]) as f64).powi(2);
                // A switched-off consistency term may have no target: neither used nor reported.
                if self.w.gc != 0.0 {
                    sc += ((z1[r] - gct[r]) as f64).powi(2);
                }
            }
            let w = tw[t] as f64;
            d += w * wu[t] as f64 * dm[t] as f64 * sd * inv_k;
            b += w * wu[t] as f64 * sb * inv_k;
            c += w * sc * inv_k;
        }
        let (rt, m) = self.risk.apply(&z1, g, k, &ins[11], None)?;
        let loss = self.w.dcfm as f64 * d + self.w.bcfm as f64 * b + self.w.gc as f64 * c + rt;
        Ok(vec![
            vec![loss as f32],
            vec![
                d as f32,
                b as f32,
                c as f32,
                m[0] as f32,
                m[1] as f32,
                m[2] as f32,
            ],
        ])
    }
    fn backward(
        &self,
        ins: &[Vec<f32>],
        _outs: &[Vec<f32>],
        d_outs: &[Vec<f32>],
        need: &[bool],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        // gc_target (5) may be computed from the parameters: it is a stop-gradient target.
        if need[3..].iter().enumerate().any(|(j, &b)| b && j + 3 != 5) {
            return Err(Error::Invalid(
                "flow_critic_loss: only the three head evaluations get gradients".into(),
            ));
        }
        let (n, k) = (self.n, self.k);
        let z1 = self.readout(ins);
        let (vb, vd, g, gct, velb, veld) = (&ins[1], &ins[2], &ins[4], &ins[5], &ins[6], &ins[7]);
        let (wu, dm, tw) = (&ins[8], &ins[9], &ins[10]);
        let dl = d_outs[0][0];
        let inv_k = 1.0 / k as f32;
        let (mut dr, mut db, mut dd) = (
            vec![0.0f32; n * k],
            vec![0.0f32; n * k],
            vec![0.0f32; n * k],
        );
        for t in 0..n {
            if tw[t] == 0.0 {
                continue;
            }
            let s = tw[t] * inv_k * 2.0;
            for r in t * k..(t + 1) * k {
                dd[r] = self.w.dcfm * s * wu[t] * dm[t] * (vd[r] - veld[r]);
                db[r] = self.w.bcfm * s * wu[t] * (vb[r] - velb[r]);
                dr[r] = self.w.gc * s * (z1[r] - gct[r]);
            }
        }
        // ẑ = ε + v_read, so d/dv_read = d/dẑ.
        self.risk.apply(&z1, g, k, &ins[11], Some(&mut dr))?;
        for v in dr.iter_mut().chain(db.iter_mut()).chain(dd.iter_mut()) {
            *v *= dl;
        }
        let mut out = vec![Some(dr), Some(db), Some(dd)];
        out.extend((3..12).map(|_| None));
        for (i, o) in out.iter_mut().enumerate().take(3) {
            if !need[i] {
                *o = None;
            }
        }
        Ok(out)
    }
}

// ---- The losses as graph ops: the host kernels on the CPU, the device kernels on CUDA -------
// (kernels/heads.cu and risk.cu's risk_loss; issue 11 item 2: on CUDA no loss input or gradient
// leaves the device, and no host copy of the loss's inputs is made).

mod device {
    use super::*;
    use crate::device::CudaDevice;
    use crate::kernels::heads as hk;
    use cudarc::driver::{CudaSlice, DevicePtr};

    /// A zeroed device temporary of `n` values (freed in stream order when dropped).
    pub fn temp<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        dev: &CudaDevice,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        Ok(dev.stream().alloc_zeros::<T>(n.max(1))?)
    }

    pub fn ptr<T>(dev: &CudaDevice, s: &CudaSlice<T>) -> u64 {
        let (p, _g) = s.device_ptr(dev.stream());
        p
    }

    /// Errors unless every tensor of `ts` holds f32 (`what` names the op).
    pub fn f32s(x: &Exec<'_>, what: &str, ts: &[TensorId]) -> Result<()> {
        match ts.iter().find(|&&t| x.dtype(t) != DType::F32) {
            Some(&t) => Err(Error::Invalid(format!(
                "{what}: the CUDA op takes f32 here, got {:?}",
                x.dtype(t)
            ))),
            None => Ok(()),
        }
    }

    /// Whether `t` is bf16 (else it must be f32).
    pub fn is_bf16(x: &Exec<'_>, what: &str, t: TensorId) -> Result<bool> {
        match x.dtype(t) {
            DType::BF16 => Ok(true),
            DType::F32 => Ok(false),
            d => Err(Error::Invalid(format!("{what}: a {d:?} tensor"))),
        }
    }

    pub fn kl_code(kind: Option<rl::KlKind>) -> i32 {
        match kind {
            None => -1,
            Some(rl::KlKind::K1) => 0,
            Some(rl::KlKind::K3) => 1,
        }
    }

    /// The risk loss of `pred` (f32 `[n][k]`) against `target` with row weights `row_scale` on
    /// the device: returns (terms `[n][4]`, row losses `[n]`, dL/dpred `[n][k]`), or None when
    /// every risk weight is 0.
    #[allow(clippy::type_complexity)]
    pub fn risk(
        dev: &CudaDevice,
        r: &RiskTerms,
        pred: u64,
        target: u64,
        row_scale: u64,
        n: usize,
        k: usize,
    ) -> Result<Option<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)>> {
        if !r.active() {
            return Ok(None);
        }
        let terms = temp::<f32>(dev, n * risk::NTERMS)?;
        let rows = temp::<f32>(dev, n)?;
        let grad = temp::<f32>(dev, n * k)?;
        // SAFETY: pred/target n·k f32, row_scale n f32 (the op's checked inputs); the outputs
        // are allocated above with the sizes risk_loss writes.
        unsafe {
            risk::cuda::loss_raw(
                dev,
                pred,
                target,
                row_scale,
                n,
                k,
                r.levels,
                &r.weights,
                ptr(dev, &terms),
                ptr(dev, &grad),
                ptr(dev, &rows),
            )?
        };
        Ok(Some((terms, rows, grad)))
    }

    /// Sums the per-token rows `c` into the op's outputs `[loss (1), stats]`.
    pub fn finish(
        dev: &CudaDevice,
        x: &Exec<'_>,
        c: &CudaSlice<f64>,
        n: usize,
        f: &hk::Finish,
        scale: u64,
        outs: &[TensorId],
    ) -> Result<()> {
        f32s(x, "loss outputs", outs)?;
        check_len("loss output", x.len(outs[0]), 1)?;
        check_len("loss statistics", x.len(outs[1]), f.n_stats as usize)?;
        // SAFETY: c n·cols f64; the outputs 1 and n_stats f32 (checked).
        unsafe {
            hk::finish(
                dev,
                ptr(dev, c),
                n,
                f,
                scale,
                x.ptr(outs[0]),
                x.ptr(outs[1]),
            )
        }
    }
}

use device::{f32s, is_bf16};

fn opt_ptr(x: &Exec<'_>, t: Option<TensorId>) -> u64 {
    t.map_or(0, |t| x.ptr(t))
}

impl Op for ActorLoss {
    fn name(&self) -> String {
        HostKernel::name(self)
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        let Some(dev) = x.cuda_device().cloned() else {
            return host_forward(self, x, ins, outs);
        };
        let n = self.n;
        let want = if self.kl.is_some() { 7 } else { 5 };
        check_len("actor_loss inputs", ins.len(), want)?;
        f32s(x, "actor_loss", ins)?;
        for &t in &ins[..want.min(6)] {
            check_len("actor_loss input", x.len(t), n)?;
        }
        let c = device::temp::<f64>(&dev, n * crate::kernels::heads::ACTOR_COLS)?;
        let reference = if self.kl.is_some() { x.ptr(ins[5]) } else { 0 };
        // SAFETY: n f32 inputs (checked), c n·5 f64.
        unsafe {
            crate::kernels::heads::actor_rows(
                &dev,
                x.ptr(ins[0]),
                x.ptr(ins[1]),
                x.ptr(ins[2]),
                x.ptr(ins[3]),
                x.ptr(ins[4]),
                reference,
                n,
                (self.clip_low, self.clip_high),
                device::kl_code(self.kl),
                device::ptr(&dev, &c),
            )?
        };
        let kl_coef = if self.kl.is_some() { 1.0 } else { 0.0 };
        let f = crate::kernels::heads::Finish::new(
            &[1.0, 0.0, 0.0, -(self.ent_coef as f64), kl_coef],
            &[0, 1, 2, 3, 4],
            self.kl.map(|_| 4),
        )?;
        let beta = if self.kl.is_some() { x.ptr(ins[6]) } else { 0 };
        device::finish(&dev, x, &c, n, &f, beta, outs)
    }
    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        let Some(dev) = x.cuda_device().cloned() else {
            return host_backward(self, x, ins, outs, d_outs, d_ins);
        };
        if d_ins[2..].iter().any(Option::is_some) {
            return Err(Error::Invalid(
                "actor_loss: old and reference log-probs, advantages, weights and the KL coefficient get no gradient".into(),
            ));
        }
        if d_ins[0].is_none() && d_ins[1].is_none() {
            return Ok(());
        }
        let grads: Vec<TensorId> = d_ins[..2].iter().flatten().copied().collect();
        f32s(x, "actor_loss gradients", &grads)?;
        f32s(x, "actor_loss d(loss)", &d_outs[..1])?;
        let reference = if self.kl.is_some() { x.ptr(ins[5]) } else { 0 };
        let beta = if self.kl.is_some() { x.ptr(ins[6]) } else { 0 };
        // SAFETY: the forward's checked inputs; the gradients n f32 (f32 checked, lengths are
        // the inputs').
        unsafe {
            crate::kernels::heads::actor_bwd(
                &dev,
                x.ptr(ins[0]),
                x.ptr(ins[2]),
                x.ptr(ins[3]),
                x.ptr(ins[4]),
                reference,
                beta,
                self.n,
                (self.clip_low, self.clip_high),
                self.ent_coef,
                device::kl_code(self.kl),
                x.ptr(d_outs[0]),
                opt_ptr(x, d_ins[0]),
                opt_ptr(x, d_ins[1]),
            )
        }
    }
}

impl Op for ValueLoss {
    fn name(&self) -> String {
        HostKernel::name(self)
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        let Some(dev) = x.cuda_device().cloned() else {
            return host_forward(self, x, ins, outs);
        };
        let n = self.n;
        check_len("value_loss inputs", ins.len(), 4)?;
        for &t in ins {
            check_len("value_loss input", x.len(t), n)?;
        }
        let vb = is_bf16(x, "value_loss v", ins[0])?;
        f32s(x, "value_loss", &ins[1..])?;
        let c = device::temp::<f64>(&dev, n * crate::kernels::heads::VALUE_COLS)?;
        // SAFETY: n values of v's type and n f32 (checked), c n·2 f64.
        unsafe {
            crate::kernels::heads::value_rows(
                &dev,
                x.ptr(ins[0]),
                vb,
                x.ptr(ins[1]),
                x.ptr(ins[2]),
                x.ptr(ins[3]),
                n,
                self.clip,
                device::ptr(&dev, &c),
            )?
        };
        let f = crate::kernels::heads::Finish::new(&[1.0, 0.0], &[0, 1], None)?;
        device::finish(&dev, x, &c, n, &f, 0, outs)
    }
    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        let Some(dev) = x.cuda_device().cloned() else {
            return host_backward(self, x, ins, outs, d_outs, d_ins);
        };
        if d_ins[1..].iter().any(Option::is_some) {
            return Err(Error::Invalid("value_loss: only v gets a gradient".into()));
        }
        let Some(dv) = d_ins[0] else { return Ok(()) };
        let vb = is_bf16(x, "value_loss v", ins[0])?;
        let db = is_bf16(x, "value_loss dv", dv)?;
        f32s(x, "value_loss d(loss)", &d_outs[..1])?;
        // SAFETY: the forward's checked inputs; dv n values of its type.
        unsafe {
            crate::kernels::heads::value_bwd(
                &dev,
                x.ptr(ins[0]),
                vb,
                x.ptr(ins[1]),
                x.ptr(ins[2]),
                x.ptr(ins[3]),
                self.n,
                self.clip,
                x.ptr(d_outs[0]),
                x.ptr(dv),
                db,
            )
        }
    }
}

impl QuantileLoss {
    /// The predicted quantiles as f32 on the device: `q` itself, or a widened copy of bf16.
    fn q_f32(
        &self,
        dev: &crate::device::CudaDevice,
        x: &Exec<'_>,
        q: TensorId,
    ) -> Result<(u64, Option<cudarc::driver::CudaSlice<f32>>)> {
        if !is_bf16(x, "quantile_loss q", q)? {
            return Ok((x.ptr(q), None));
        }
        let nk = self.n * self.k;
        let t = device::temp::<f32>(dev, nk)?;
        let p = device::ptr(dev, &t);
        // SAFETY: q holds n·k bf16 (checked by the caller), t n·k f32.
        unsafe { gpu::cast_bf16_f32(dev, x.ptr(q), p, nk)? };
        Ok((p, Some(t)))
    }

    fn check_cuda(&self, x: &Exec<'_>, ins: &[TensorId]) -> Result<()> {
        let (n, k) = (self.n, self.k);
        check_len("quantile_loss inputs", ins.len(), 3)?;
        check_len("quantile_loss q", x.len(ins[0]), n * k)?;
        check_len("quantile_loss target", x.len(ins[1]), n * k)?;
        check_len("quantile_loss weights", x.len(ins[2]), n)?;
        f32s(x, "quantile_loss", &ins[1..])
    }
}

impl Op for QuantileLoss {
    fn name(&self) -> String {
        HostKernel::name(self)
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        let Some(dev) = x.cuda_device().cloned() else {
            return host_forward(self, x, ins, outs);
        };
        self.check_cuda(x, ins)?;
        let (n, k) = (self.n, self.k);
        let qb = is_bf16(x, "quantile_loss q", ins[0])?;
        let (qp, _keep) = self.q_f32(&dev, x, ins[0])?;
        let r = device::risk(&dev, &self.risk, qp, x.ptr(ins[1]), x.ptr(ins[2]), n, k)?;
        let (tp, rp) = r.as_ref().map_or((0, 0), |(t, rl, _)| {
            (device::ptr(&dev, t), device::ptr(&dev, rl))
        });
        let c = device::temp::<f64>(&dev, n * crate::kernels::heads::QUANTILE_COLS)?;
        // SAFETY: checked inputs; terms n·4 and row losses n f32 (or 0); c n·5 f64.
        unsafe {
            crate::kernels::heads::quantile_rows(
                &dev,
                x.ptr(ins[0]),
                qb,
                x.ptr(ins[1]),
                x.ptr(ins[2]),
                n,
                k,
                self.kappa,
                self.sum_quantiles,
                tp,
                rp,
                device::ptr(&dev, &c),
            )?
        };
        let f =
            crate::kernels::heads::Finish::new(&[1.0, 1.0, 0.0, 0.0, 0.0], &[0, 2, 3, 4], None)?;
        device::finish(&dev, x, &c, n, &f, 0, outs)
    }
    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        let Some(dev) = x.cuda_device().cloned() else {
            return host_backward(self, x, ins, outs, d_outs, d_ins);
        };
        if d_ins[1].is_some() || d_ins[2].is_some() {
            return Err(Error::Invalid(
                "quantile_loss: targets and weights get no gradient".into(),
            ));
        }
        let Some(dq) = d_ins[0] else { return Ok(()) };
        self.check_cuda(x, ins)?;
        let (n, k) = (self.n, self.k);
        let qb = is_bf16(x, "quantile_loss q", ins[0])?;
        let db = is_bf16(x, "quantile_loss dq", dq)?;
        f32s(x, "quantile_loss d(loss)", &d_outs[..1])?;
        let (qp, _keep) = self.q_f32(&dev, x, ins[0])?;
        let r = device::risk(&dev, &self.risk, qp, x.ptr(ins[1]), x.ptr(ins[2]), n, k)?;
        let gp = r.as_ref().map_or(0, |(_, _, g)| device::ptr(&dev, g));
        // SAFETY: checked inputs; risk gradient n·k f32 (or 0); dq n·k values of its type.
        unsafe {
            crate::kernels::heads::quantile_bwd(
                &dev,
                x.ptr(ins[0]),
                qb,
                x.ptr(ins[1]),
                x.ptr(ins[2]),
                n,
                k,
                self.kappa,
                self.sum_quantiles,
                gp,
                x.ptr(d_outs[0]),
                x.ptr(dq),
                db,
            )
        }
    }
}

impl FlowCriticLoss {
    fn check_cuda(&self, x: &Exec<'_>, ins: &[TensorId]) -> Result<crate::kernels::heads::FlowIns> {
        let (n, k) = (self.n, self.k);
        check_len("flow_critic_loss inputs", ins.len(), 12)?;
        for (i, &t) in ins.iter().enumerate() {
            check_len(
                &format!("flow_critic_loss input {i}"),
                x.len(t),
                if i < 8 { n * k } else { n },
            )?;
        }
        f32s(x, "flow_critic_loss", ins)?;
        let mut p = [0u64; 12];
        for (o, &t) in p.iter_mut().zip(ins) {
            *o = x.ptr(t);
        }
        Ok(crate::kernels::heads::FlowIns(p))
    }

    /// The readout ẑ = ε + v_read on the device, and its risk loss (None without risk terms).
    #[allow(clippy::type_complexity)]
    fn risk_cuda(
        &self,
        dev: &crate::device::CudaDevice,
        x: &Exec<'_>,
        ins: &[TensorId],
    ) -> Result<
        Option<(
            cudarc::driver::CudaSlice<f32>,
            cudarc::driver::CudaSlice<f32>,
            cudarc::driver::CudaSlice<f32>,
        )>,
    > {
        if !self.risk.active() {
            return Ok(None);
        }
        let nk = self.n * self.k;
        let z1 = device::temp::<f32>(dev, nk)?;
        // SAFETY: v_read and eps n·k f32 (checked), z1 n·k f32.
        unsafe {
            crate::kernels::heads::add(
                dev,
                x.ptr(ins[0]),
                x.ptr(ins[3]),
                nk,
                device::ptr(dev, &z1),
            )?
        };
        let zp = device::ptr(dev, &z1);
        device::risk(
            dev,
            &self.risk,
            zp,
            x.ptr(ins[4]),
            x.ptr(ins[11]),
            self.n,
            self.k,
        )
    }
}

impl Op for FlowCriticLoss {
    fn name(&self) -> String {
        HostKernel::name(self)
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        let Some(dev) = x.cuda_device().cloned() else {
            return host_forward(self, x, ins, outs);
        };
        let fi = self.check_cuda(x, ins)?;
        let (n, k) = (self.n, self.k);
        let r = self.risk_cuda(&dev, x, ins)?;
        let (tp, rp) = r.as_ref().map_or((0, 0), |(t, rl, _)| {
            (device::ptr(&dev, t), device::ptr(&dev, rl))
        });
        let c = device::temp::<f64>(&dev, n * crate::kernels::heads::FLOW_COLS)?;
        // SAFETY: checked inputs; terms n·4 and row losses n f32 (or 0); c n·7 f64.
        unsafe {
            crate::kernels::heads::flow_rows(
                &dev,
                &fi,
                n,
                k,
                self.w.gc != 0.0,
                tp,
                rp,
                device::ptr(&dev, &c),
            )?
        };
        let w = &self.w;
        let f = crate::kernels::heads::Finish::new(
            &[
                w.dcfm as f64,
                w.bcfm as f64,
                w.gc as f64,
                1.0,
                0.0,
                0.0,
                0.0,
            ],
            &[0, 1, 2, 4, 5, 6],
            None,
        )?;
        device::finish(&dev, x, &c, n, &f, 0, outs)
    }
    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        let Some(dev) = x.cuda_device().cloned() else {
            return host_backward(self, x, ins, outs, d_outs, d_ins);
        };
        // gc_target (5) may be computed from the parameters: it is a stop-gradient target.
        if d_ins[3..]
            .iter()
            .enumerate()
            .any(|(j, d)| d.is_some() && j + 3 != 5)
        {
            return Err(Error::Invalid(
                "flow_critic_loss: only the three head evaluations get gradients".into(),
            ));
        }
        if d_ins[..3].iter().all(Option::is_none) {
            return Ok(());
        }
        let fi = self.check_cuda(x, ins)?;
        let grads: Vec<TensorId> = d_ins[..3].iter().flatten().copied().collect();
        f32s(x, "flow_critic_loss gradients", &grads)?;
        f32s(x, "flow_critic_loss d(loss)", &d_outs[..1])?;
        let r = self.risk_cuda(&dev, x, ins)?;
        let gp = r.as_ref().map_or(0, |(_, _, g)| device::ptr(&dev, g));
        let w = &self.w;
        // SAFETY: checked inputs; risk gradient n·k f32 (or 0); the gradients n·k f32.
        unsafe {
            crate::kernels::heads::flow_bwd(
                &dev,
                &fi,
                self.n,
                self.k,
                (w.dcfm, w.bcfm, w.gc),
                gp,
                x.ptr(d_outs[0]),
                opt_ptr(x, d_ins[0]),
                opt_ptr(x, d_ins[1]),
                opt_ptr(x, d_ins[2]),
            )
        }
    }
}
