//! The training step's numerics outside the model graphs: the flow critic's readout and target
//! solves, the prior noise, distributional GAE, whitening, the KL penalty, the risk statistics
//! and the risk losses. Every call the step makes to them goes through [`StepOps`], the one
//! place that decides where they run.
//!
//! On the CPU each runs its CPU reference. On a CUDA device they run their CUDA kernels
//! (`kernels::{flow, rl, risk, step}::cuda`). Two forms:
//! - the slice methods ([`StepOps::integrate`], [`StepOps::dist_gae`], ...) take and return host
//!   vectors (on CUDA each call uploads its inputs and downloads its outputs): tests, tools;
//! - the [`StepBuf`] methods keep the step's data where the backend computes: host vectors on
//!   the CPU, device buffers on CUDA, so the trainer's readout feeds GAE, whitening and the loss
//!   graphs' inputs with no host round trip (issue 11 item 2). Only the rollout's bookkeeping
//!   (row lengths, rewards, token lists) goes up, and the step's scalar metrics come down in one
//!   read ([`Scalars`]).
//!
//! The risk losses are called by the graph's loss ops (`train::heads`), which run their own CUDA
//! kernels on the graph's device tensors.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};
use crate::kernels::flow::{self, FlowHeadShape, IntegrateOpts, Interval, NoiseOpts};
use crate::kernels::risk::{self, RiskLossWeights, TailLevels};
use crate::kernels::rl::{self, GaeParams, KlKind};

/// Where the step's numerics run.
#[derive(Clone)]
enum Backend {
    /// The CPU references, on host vectors.
    Host,
    /// The CUDA kernels, host vectors uploaded per call.
    Cuda(Arc<CudaDevice>),
}

/// The step's numerics on one backend (see the module documentation).
#[derive(Clone)]
pub struct StepOps {
    backend: Backend,
}

impl std::fmt::Debug for StepOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.backend {
            Backend::Host => "StepOps(host)",
            Backend::Cuda(_) => "StepOps(cuda)",
        })
    }
}

/// Uploads a host vector (the CUDA backend's inputs).
fn up<T: cudarc::driver::DeviceRepr>(dev: &CudaDevice, x: &[T]) -> Result<CudaSlice<T>> {
    dev.htod(x)
}

/// A zeroed device output of `n` values.
fn zeros(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    Ok(dev.stream().alloc_zeros::<f32>(n)?)
}

/// Downloads a device output into `out` (a stream synchronisation).
fn down(dev: &CudaDevice, x: &CudaSlice<f32>, out: &mut [f32]) -> Result<()> {
    let v = dev.dtoh(x)?;
    if v.len() != out.len() {
        return Err(Error::Shape(format!(
            "step ops: a device output of {} values for a host buffer of {}",
            v.len(),
            out.len()
        )));
    }
    out.copy_from_slice(&v);
    Ok(())
}

impl StepOps {
    /// The ops of a step on `device`: the CPU references on the CPU, the CUDA kernels on CUDA.
    pub fn new(device: &Device) -> Self {
        StepOps {
            backend: match device {
                Device::Cuda(dev) => Backend::Cuda(dev.clone()),
                _ => Backend::Host,
            },
        }
    }

    /// Whether the numerics run on a CUDA device.
    pub fn is_cuda(&self) -> bool {
        matches!(self.backend, Backend::Cuda(_))
    }

    /// Host ops, for callers that hold host vectors by design (the graph's host kernels).
    pub fn host() -> Self {
        StepOps {
            backend: Backend::Host,
        }
    }

    /// Prior noise per row ([`flow::cpu::noise`]).
    pub fn noise(&self, opts: &NoiseOpts, k: usize, out: &mut [f32]) -> Result<()> {
        match &self.backend {
            Backend::Host => flow::cpu::noise(opts, k, out),
            Backend::Cuda(_) if out.is_empty() => Ok(()),
            Backend::Cuda(dev) => {
                let mut d = zeros(dev, out.len())?;
                flow::cuda::noise(dev, opts, k, &mut d.as_view_mut())?;
                down(dev, &d, out)
            }
        }
    }

    /// Integrates the flow ODE from `z0` over `interval` ([`flow::cpu::integrate`], no J).
    #[allow(clippy::too_many_arguments)]
    pub fn integrate(
        &self,
        shape: &FlowHeadShape,
        params: &[f32],
        u: &[f32],
        k: usize,
        z0: &[f32],
        interval: Interval<'_, f32>,
        opts: &IntegrateOpts,
        z1: &mut [f32],
    ) -> Result<()> {
        match &self.backend {
            Backend::Host => {
                flow::cpu::integrate(shape, params, u, k, z0, interval, opts, z1, None)
            }
            Backend::Cuda(_) if z1.is_empty() => Ok(()),
            Backend::Cuda(dev) => {
                let (p, ud, zd) = (up(dev, params)?, up(dev, u)?, up(dev, z0)?);
                let mut out = zeros(dev, z1.len())?;
                match interval {
                    Interval::Uniform(a, b) => flow::cuda::integrate(
                        dev,
                        shape,
                        &p.as_view(),
                        &ud.as_view(),
                        k,
                        &zd.as_view(),
                        flow::cuda::DeviceInterval::Uniform(a, b),
                        opts,
                        &mut out.as_view_mut(),
                        None,
                    )?,
                    Interval::PerRow(a, b) => {
                        let (ad, bd) = (up(dev, a)?, up(dev, b)?);
                        let (av, bv) = (ad.as_view(), bd.as_view());
                        flow::cuda::integrate(
                            dev,
                            shape,
                            &p.as_view(),
                            &ud.as_view(),
                            k,
                            &zd.as_view(),
                            flow::cuda::DeviceInterval::PerRow(&av, &bv),
                            opts,
                            &mut out.as_view_mut(),
                            None,
                        )?
                    }
                }
                down(dev, &out, z1)
            }
        }
    }

    /// One head evaluation per row ([`flow::cpu::eval_forward`]).
    #[allow(clippy::too_many_arguments)]
    pub fn eval(
        &self,
        shape: &FlowHeadShape,
        params: &[f32],
        u: &[f32],
        k: usize,
        z: &[f32],
        tau: &[f32],
        v: &mut [f32],
    ) -> Result<()> {
        match &self.backend {
            Backend::Host => flow::cpu::eval_forward(shape, params, u, k, z, tau, v),
            Backend::Cuda(_) if v.is_empty() => Ok(()),
            Backend::Cuda(dev) => {
                let (p, ud, zd, td) = (up(dev, params)?, up(dev, u)?, up(dev, z)?, up(dev, tau)?);
                let mut out = zeros(dev, v.len())?;
                flow::cuda::eval_forward(
                    dev,
                    shape,
                    &p.as_view(),
                    &ud.as_view(),
                    k,
                    &zd.as_view(),
                    &td.as_view(),
                    &mut out.as_view_mut(),
                )?;
                down(dev, &out, v)
            }
        }
    }

    /// The per-token KL against the reference ([`rl::cpu::kl_penalty`]).
    pub fn kl_penalty(
        &self,
        logp: &[f32],
        logp_ref: &[f32],
        mask: &[f32],
        kind: KlKind,
        out: &mut [f32],
    ) -> Result<()> {
        match &self.backend {
            Backend::Host => rl::cpu::kl_penalty(logp, logp_ref, mask, kind, out, None),
            Backend::Cuda(_) if out.is_empty() => Ok(()),
            Backend::Cuda(dev) => {
                let (a, b, m) = (up(dev, logp)?, up(dev, logp_ref)?, up(dev, mask)?);
                let mut o = zeros(dev, out.len())?;
                rl::cuda::kl_penalty(
                    dev,
                    &a.as_view(),
                    &b.as_view(),
                    &m.as_view(),
                    kind,
                    &mut o.as_view_mut(),
                    None,
                )?;
                down(dev, &o, out)
            }
        }
    }

    /// Distributional GAE ([`rl::cpu::dist_gae`]).
    #[allow(clippy::too_many_arguments)]
    pub fn dist_gae(
        &self,
        values: &[f32],
        rewards: &[f32],
        mask: &[f32],
        b: usize,
        t: usize,
        k: usize,
        p: GaeParams,
        adv: &mut [f32],
        ret: &mut [f32],
        adv_mean: &mut [f32],
    ) -> Result<()> {
        match &self.backend {
            Backend::Host => {
                rl::cpu::dist_gae(values, rewards, mask, b, t, k, p, adv, ret, adv_mean)
            }
            Backend::Cuda(_) if adv_mean.is_empty() => Ok(()),
            Backend::Cuda(dev) => {
                let (v, r, m) = (up(dev, values)?, up(dev, rewards)?, up(dev, mask)?);
                let (mut a, mut g) = (zeros(dev, adv.len())?, zeros(dev, ret.len())?);
                let mut am = zeros(dev, adv_mean.len())?;
                rl::cuda::dist_gae(
                    dev,
                    &v.as_view(),
                    &r.as_view(),
                    &m.as_view(),
                    b,
                    t,
                    k,
                    p,
                    &mut a.as_view_mut(),
                    &mut g.as_view_mut(),
                    &mut am.as_view_mut(),
                )?;
                down(dev, &a, adv)?;
                down(dev, &g, ret)?;
                down(dev, &am, adv_mean)
            }
        }
    }

    /// Masked whitening ([`rl::cpu::whiten`]); returns (μ, σ).
    pub fn whiten(&self, x: &[f32], mask: &[f32], out: &mut [f32]) -> Result<(f32, f32)> {
        match &self.backend {
            Backend::Host => rl::cpu::whiten(x, mask, out),
            Backend::Cuda(dev) => {
                let (xd, m) = (up(dev, x)?, up(dev, mask)?);
                let mut o = zeros(dev, out.len().max(1))?;
                let r = rl::cuda::whiten(dev, &xd.as_view(), &m.as_view(), &mut o.as_view_mut())?;
                down(dev, &o, out)?;
                Ok(r)
            }
        }
    }

    /// Per-row statistics of `k` samples per row ([`risk::cpu::stats`], no quantiles).
    pub fn risk_stats(
        &self,
        x: &[f64],
        k: usize,
        levels: TailLevels,
        stats: &mut [f64],
    ) -> Result<()> {
        match &self.backend {
            Backend::Host => risk::cpu::stats(x, k, levels, &[], stats, &mut [], None, None),
            Backend::Cuda(_) if stats.is_empty() => Ok(()),
            Backend::Cuda(dev) => {
                // The kernel works in fp32 (the statistics are metrics).
                let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
                let xd = up(dev, &x32)?;
                let mut sd = zeros(dev, stats.len())?;
                risk::cuda::stats(
                    dev,
                    &xd.as_view(),
                    k,
                    levels,
                    &[],
                    &mut sd.as_view_mut(),
                    None,
                    None,
                    None,
                )?;
                let mut s32 = vec![0.0f32; stats.len()];
                down(dev, &sd, &mut s32)?;
                for (o, v) in stats.iter_mut().zip(s32) {
                    *o = v as f64;
                }
                Ok(())
            }
        }
    }

    /// The risk-loss terms and their gradient ([`risk::cpu::loss`]).
    #[allow(clippy::too_many_arguments)]
    pub fn risk_loss(
        &self,
        pred: &[f32],
        target: &[f32],
        k: usize,
        levels: TailLevels,
        w: &RiskLossWeights,
        row_scale: &[f32],
        terms: &mut [f32],
        grad: &mut [f32],
    ) -> Result<f32> {
        // Called by the graph's host kernels (host vectors by design): the CPU reference.
        match &self.backend {
            Backend::Host | Backend::Cuda(_) => {
                risk::cpu::loss(pred, target, k, levels, w, row_scale, terms, grad)
            }
        }
    }
}

// ---- Step buffers: the step's data where the backend computes (issue 11 item 2) -------------

/// One f32 tensor of the step's data: a host vector on the CPU backend, a device buffer on CUDA.
pub enum StepBuf {
    Host(Vec<f32>),
    Dev(CudaSlice<f32>),
}

impl std::fmt::Debug for StepBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepBuf::Host(v) => write!(f, "StepBuf::Host({} values)", v.len()),
            StepBuf::Dev(d) => write!(f, "StepBuf::Dev({} values)", d.len()),
        }
    }
}

impl StepBuf {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            StepBuf::Host(v) => v.len(),
            StepBuf::Dev(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values of a host buffer; an error for a device buffer (read it with
    /// [`StepOps::read`], a counted download).
    pub fn host(&self) -> Result<&[f32]> {
        match self {
            StepBuf::Host(v) => Ok(v),
            StepBuf::Dev(_) => Err(Error::Invalid(
                "a device step buffer has no host values (StepOps::read downloads it)".into(),
            )),
        }
    }

    fn host_mut(&mut self) -> Result<&mut Vec<f32>> {
        match self {
            StepBuf::Host(v) => Ok(v),
            StepBuf::Dev(_) => Err(Error::Invalid(
                "a device step buffer has no host values".into(),
            )),
        }
    }
}

/// Token (row) indices of the step's `[R·S]` positions: on the host, and on CUDA also as f32 on
/// the device (uploaded once, 4 bytes per token).
pub struct TokenList {
    pub idx: Vec<usize>,
    dev: Option<CudaSlice<f32>>,
}

impl TokenList {
    pub fn len(&self) -> usize {
        self.idx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.idx.is_empty()
    }
}

/// The step's scalar metrics: each a sum on the backend (a device slot on CUDA), read together
/// by [`StepOps::read_scalars`] (one small download).
pub struct Scalars {
    names: Vec<String>,
    host: Vec<f64>,
    dev: Option<CudaSlice<f64>>,
}

/// Most scalars a [`Scalars`] holds.
const MAX_SCALARS: usize = 16;

/// The device address of a buffer (the guard's stream sync is not needed: one stream).
fn dptr<T>(dev: &CudaDevice, s: &CudaSlice<T>) -> u64 {
    let (p, _g) = cudarc::driver::DevicePtr::device_ptr(s, dev.stream());
    p
}

fn dev_buf<'a>(b: &'a StepBuf, what: &str) -> Result<&'a CudaSlice<f32>> {
    match b {
        StepBuf::Dev(d) => Ok(d),
        StepBuf::Host(_) => Err(Error::Invalid(format!(
            "step ops: {what} is a host buffer on the CUDA backend"
        ))),
    }
}

/// How [`StepOps::write_rows`] and friends pick rows: graph row j reads source row `rows[j]`
/// (`None`: a zero row).
pub type RowPick<'a> = &'a [Option<usize>];

fn rows_f32(rows: RowPick<'_>) -> Vec<f32> {
    rows.iter().map(|r| r.map_or(-1.0, |r| r as f32)).collect()
}

/// The flow critic head's token inputs of one micro-batch (see [`StepOps::write_flow_inputs`]).
pub struct FlowMicro<'a> {
    /// The micro-batch's rollout tokens (indices into `[R·S]`), in row order.
    pub global: &'a [usize],
    /// Graph row of each rollout row in this micro-batch (−1: not in it), R entries.
    pub rowpos: &'a [i32],
    /// The minibatch's token count: token weights 1/total.
    pub total: f32,
    /// `critic.risk_targets = "prompt"`: the minibatch's first-token count (risk weights 1/nf at
    /// first response tokens), else None (risk weights = token weights).
    pub first_count: Option<f32>,
    /// Prompt lengths of the rollout rows (a row's first response token is at plen − 1).
    pub plen: &'a [usize],
    pub s: usize,
}

impl StepOps {
    fn cuda(&self) -> Option<&Arc<CudaDevice>> {
        match &self.backend {
            Backend::Cuda(d) => Some(d),
            Backend::Host => None,
        }
    }

    /// `n` zeros.
    pub fn zeros(&self, n: usize) -> Result<StepBuf> {
        Ok(match self.cuda() {
            None => StepBuf::Host(vec![0.0; n]),
            Some(dev) => StepBuf::Dev(zeros(dev, n)?),
        })
    }

    /// `x` as a step buffer (a counted upload on CUDA).
    pub fn upload(&self, x: &[f32]) -> Result<StepBuf> {
        Ok(match self.cuda() {
            None => StepBuf::Host(x.to_vec()),
            Some(dev) => StepBuf::Dev(up(dev, x)?),
        })
    }

    /// The values of `x` on the host (a counted download of a device buffer).
    pub fn read(&self, x: &StepBuf) -> Result<Vec<f32>> {
        match x {
            StepBuf::Host(v) => Ok(v.clone()),
            StepBuf::Dev(d) => {
                let dev = self
                    .cuda()
                    .ok_or_else(|| Error::Invalid("a device buffer on the host backend".into()))?;
                dev.dtoh(d)
            }
        }
    }

    /// A token list (uploaded as f32 on CUDA).
    pub fn token_list(&self, idx: Vec<usize>) -> Result<TokenList> {
        let dev = match self.cuda() {
            None => None,
            Some(d) => {
                let n = idx.iter().max().map_or(0, |&m| m + 1);
                crate::kernels::step::check_f32_index("token list", n)?;
                let f: Vec<f32> = idx.iter().map(|&i| i as f32).collect();
                Some(up(d, &f)?)
            }
        };
        Ok(TokenList { idx, dev })
    }

    fn list_ptr(dev: &CudaDevice, l: &TokenList) -> Result<u64> {
        match &l.dev {
            Some(d) => Ok(dptr(dev, d)),
            None if l.idx.is_empty() => Ok(0),
            None => Err(Error::Invalid(
                "step ops: a host token list on the CUDA backend".into(),
            )),
        }
    }

    /// The rollout mask `[R][S]` ([`crate::train::rollout::Batch::mask`]); on CUDA built on the
    /// device from the rows' lengths.
    pub fn batch_mask(&self, batch: &crate::train::rollout::Batch) -> Result<StepBuf> {
        let Some(dev) = self.cuda() else {
            return Ok(StepBuf::Host(batch.mask()));
        };
        let (rows, s) = (batch.rows(), batch.s);
        let plen: Vec<i32> = batch.prompt_len.iter().map(|&v| v as i32).collect();
        let rlen: Vec<i32> = batch.response_len.iter().map(|&v| v as i32).collect();
        let out = zeros(dev, rows * s)?;
        if rows * s == 0 {
            return Ok(StepBuf::Dev(out));
        }
        let (p, r) = (up(dev, &plen)?, up(dev, &rlen)?);
        // SAFETY: rows i32 each, rows·S f32 out.
        unsafe {
            crate::kernels::step::batch_mask(
                dev,
                dptr(dev, &p),
                dptr(dev, &r),
                rows,
                s,
                dptr(dev, &out),
            )?
        };
        Ok(StepBuf::Dev(out))
    }

    /// Token rewards ([`crate::train::rollout::token_rewards`]): −β·kl on the mask plus the
    /// rows' `rewards` at their last tokens.
    pub fn token_rewards(
        &self,
        batch: &crate::train::rollout::Batch,
        mask: &StepBuf,
        kl: Option<&StepBuf>,
        beta: f64,
        rewards: &[f64],
    ) -> Result<StepBuf> {
        let Some(dev) = self.cuda() else {
            let kl = kl.map(|k| k.host()).transpose()?;
            return Ok(StepBuf::Host(crate::train::rollout::token_rewards(
                batch, kl, beta, rewards,
            )));
        };
        let (rows, s) = (batch.rows(), batch.s);
        crate::error::check_len("token_rewards rewards", rewards.len(), rows)?;
        let out = zeros(dev, rows * s)?;
        if rows * s == 0 {
            return Ok(StepBuf::Dev(out));
        }
        let plen: Vec<i32> = batch.prompt_len.iter().map(|&v| v as i32).collect();
        let rlen: Vec<i32> = batch.response_len.iter().map(|&v| v as i32).collect();
        let (p, r, w) = (up(dev, &plen)?, up(dev, &rlen)?, up(dev, rewards)?);
        let klp = match kl {
            Some(k) => dptr(dev, dev_buf(k, "kl")?),
            None => 0,
        };
        // SAFETY: rows·S f32 mask/kl/out, rows i32/i32/f64.
        unsafe {
            crate::kernels::step::token_rewards(
                dev,
                dptr(dev, dev_buf(mask, "mask")?),
                klp,
                beta,
                dptr(dev, &p),
                dptr(dev, &r),
                dptr(dev, &w),
                rows,
                s,
                dptr(dev, &out),
            )?
        };
        Ok(StepBuf::Dev(out))
    }

    /// The per-token KL ([`rl::cpu::kl_penalty`]) of step buffers.
    pub fn kl_buf(
        &self,
        logp: &StepBuf,
        logp_ref: &StepBuf,
        mask: &StepBuf,
        kind: KlKind,
    ) -> Result<StepBuf> {
        let Some(dev) = self.cuda() else {
            let mut out = vec![0.0f32; logp.len()];
            rl::cpu::kl_penalty(
                logp.host()?,
                logp_ref.host()?,
                mask.host()?,
                kind,
                &mut out,
                None,
            )?;
            return Ok(StepBuf::Host(out));
        };
        let mut out = zeros(dev, logp.len())?;
        rl::cuda::kl_penalty(
            dev,
            &dev_buf(logp, "logp")?.as_view(),
            &dev_buf(logp_ref, "logp_ref")?.as_view(),
            &dev_buf(mask, "mask")?.as_view(),
            kind,
            &mut out.as_view_mut(),
            None,
        )?;
        Ok(StepBuf::Dev(out))
    }

    /// Distributional GAE ([`rl::cpu::dist_gae`]) of step buffers: (A `[B][T][K]`, G, mean_k A).
    #[allow(clippy::too_many_arguments)]
    pub fn gae_buf(
        &self,
        values: &StepBuf,
        rewards: &StepBuf,
        mask: &StepBuf,
        b: usize,
        t: usize,
        k: usize,
        p: GaeParams,
    ) -> Result<(StepBuf, StepBuf, StepBuf)> {
        let (mut a, mut g, mut am) = (
            self.zeros(b * t * k)?,
            self.zeros(b * t * k)?,
            self.zeros(b * t)?,
        );
        match (&mut a, &mut g, &mut am) {
            (StepBuf::Host(a), StepBuf::Host(g), StepBuf::Host(am)) => rl::cpu::dist_gae(
                values.host()?,
                rewards.host()?,
                mask.host()?,
                b,
                t,
                k,
                p,
                a,
                g,
                am,
            )?,
            (StepBuf::Dev(a), StepBuf::Dev(g), StepBuf::Dev(am)) => {
                let dev = self.cuda().expect("device buffers on the CUDA backend");
                rl::cuda::dist_gae(
                    dev,
                    &dev_buf(values, "values")?.as_view(),
                    &dev_buf(rewards, "rewards")?.as_view(),
                    &dev_buf(mask, "mask")?.as_view(),
                    b,
                    t,
                    k,
                    p,
                    &mut a.as_view_mut(),
                    &mut g.as_view_mut(),
                    &mut am.as_view_mut(),
                )?
            }
            _ => unreachable!("zeros() gives buffers of one backend"),
        }
        Ok((a, g, am))
    }

    /// Masked whitening ([`rl::cpu::whiten`]) of a step buffer; on CUDA its (μ, σ) stay on the
    /// device (the caller checks for at least two tokens).
    pub fn whiten_buf(&self, x: &StepBuf, mask: &StepBuf) -> Result<StepBuf> {
        let Some(dev) = self.cuda() else {
            let mut out = vec![0.0f32; x.len()];
            rl::cpu::whiten(x.host()?, mask.host()?, &mut out)?;
            return Ok(StepBuf::Host(out));
        };
        let mut out = zeros(dev, x.len().max(1))?;
        let mut stats = zeros(dev, 2)?;
        rl::cuda::whiten_into(
            dev,
            &dev_buf(x, "x")?.as_view(),
            &dev_buf(mask, "mask")?.as_view(),
            &mut out.slice_mut(..x.len()),
            &mut stats.as_view_mut(),
        )?;
        if x.is_empty() {
            out = zeros(dev, 0)?;
        }
        Ok(StepBuf::Dev(out))
    }

    /// `[R][S]`: row r's `a[r]` at its masked positions, 0 elsewhere (GRPO's advantages,
    /// [`crate::train::rollout::grpo_advantages`]).
    pub fn rows_on_mask(&self, mask: &StepBuf, s: usize, a: &[f32]) -> Result<StepBuf> {
        let rows = a.len();
        crate::error::check_len("rows_on_mask mask", mask.len(), rows * s)?;
        let Some(dev) = self.cuda() else {
            let m = mask.host()?;
            let out = (0..rows * s)
                .map(|i| if m[i] != 0.0 { a[i / s] } else { 0.0 })
                .collect();
            return Ok(StepBuf::Host(out));
        };
        let out = zeros(dev, rows * s)?;
        if rows * s == 0 {
            return Ok(StepBuf::Dev(out));
        }
        let ad = up(dev, a)?;
        // SAFETY: mask [rows][S], a rows, out rows·S (identity rows).
        unsafe {
            crate::kernels::step::row_value(
                dev,
                dptr(dev, dev_buf(mask, "mask")?),
                0,
                dptr(dev, &ad),
                rows,
                s,
                0,
                dptr(dev, &out),
            )?
        };
        Ok(StepBuf::Dev(out))
    }

    /// `x[i] = 0` where `mask[i / k]` is 0 (the value and quantile readouts).
    pub fn mask_select(&self, x: &mut StepBuf, mask: &StepBuf, k: usize) -> Result<()> {
        crate::error::check_len("mask_select x", x.len(), mask.len() * k)?;
        match self.cuda() {
            None => {
                let m = mask.host()?.to_vec();
                for (i, v) in x.host_mut()?.iter_mut().enumerate() {
                    if m[i / k] == 0.0 {
                        *v = 0.0;
                    }
                }
                Ok(())
            }
            Some(dev) => {
                if x.is_empty() {
                    return Ok(());
                }
                let xp = dptr(dev, dev_buf(x, "x")?);
                // SAFETY: x n f32, mask n / k f32.
                unsafe {
                    crate::kernels::step::mask_select(
                        dev,
                        xp,
                        dptr(dev, dev_buf(mask, "mask")?),
                        x.len(),
                        k,
                    )
                }
            }
        }
    }
}
