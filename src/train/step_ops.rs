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
use crate::model::decoder::SeqRows;

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
    /// For a batch's list ([`StepOps::batch_tokens`]): row r's tokens are
    /// `idx[row_off[r]..row_off[r + 1]]`.
    row_off: Option<Vec<usize>>,
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
    /// The step's token list ([`StepOps::batch_tokens`]) and the micro-batch's rollout rows in
    /// order, when `global` is their response tokens: on CUDA `global` is then gathered from
    /// the device list (12 bytes a row go up, not 4 a token).
    pub from: Option<(&'a TokenList, &'a [usize])>,
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

    /// The step's token rows where the graphs compute ([`SeqRows`]: uploaded once on CUDA).
    pub fn seq_rows(&self, seqs: &[Vec<u32>], skip: &[usize]) -> Result<SeqRows> {
        let device = match &self.backend {
            Backend::Host => crate::device::Device::Cpu,
            Backend::Cuda(d) => crate::device::Device::Cuda(d.clone()),
        };
        SeqRows::new(&device, seqs, skip)
    }

    /// The batch's response tokens (the set positions of its mask `mask`, in order); on CUDA the
    /// device list is built from the rows' lengths (12 bytes a row go up, not 4 a token).
    pub fn batch_tokens(
        &self,
        batch: &crate::train::rollout::Batch,
        mask: &[f32],
    ) -> Result<TokenList> {
        let idx: Vec<usize> = (0..mask.len()).filter(|&i| mask[i] != 0.0).collect();
        let Some(dev) = self.cuda() else {
            return Ok(TokenList {
                idx,
                dev: None,
                row_off: None,
            });
        };
        if idx.is_empty() {
            return Ok(TokenList {
                idx,
                dev: None,
                row_off: None,
            });
        }
        let (rows, s) = (batch.rows(), batch.s);
        crate::kernels::step::check_f32_index("token list", rows * s)?;
        let i32s = |v: &[usize]| -> Result<Vec<i32>> {
            v.iter()
                .map(|&x| crate::kernels::check_i32("token list", x))
                .collect()
        };
        let mut off = Vec::with_capacity(rows + 1);
        let mut at = 0usize;
        for &l in &batch.response_len {
            off.push(at);
            at += l;
        }
        off.push(at);
        if at != idx.len() {
            return Err(Error::Shape(format!(
                "token list: the rows' response lengths add to {at}, the mask has {} tokens",
                idx.len()
            )));
        }
        let (p, r, o) = (
            up(dev, &i32s(&batch.prompt_len)?)?,
            up(dev, &i32s(&batch.response_len)?)?,
            up(dev, &i32s(&off[..rows])?)?,
        );
        let list = dev.stream().alloc_zeros::<f32>(idx.len())?;
        // SAFETY: rows i32 each; the mask's positions (plen − 1 + rlen <= S, as Batch::mask
        // indexes them) number Σ rlen = the list's length (checked).
        unsafe {
            crate::kernels::step::token_list(
                dev,
                dptr(dev, &p),
                dptr(dev, &r),
                dptr(dev, &o),
                rows,
                s,
                dptr(dev, &list),
            )?
        };
        Ok(TokenList {
            idx,
            dev: Some(list),
            row_off: Some(off),
        })
    }

    /// The positions a token list holds where the step computes, as f32 (on CUDA a download of
    /// the device list: tests).
    pub fn read_token_list(&self, l: &TokenList) -> Result<Vec<f32>> {
        match (self.cuda(), &l.dev) {
            (Some(dev), Some(d)) => dev.dtoh(d),
            (Some(_), None) if !l.idx.is_empty() => Err(Error::Invalid(
                "read_token_list: a host token list on the CUDA backend".into(),
            )),
            _ => Ok(l.idx.iter().map(|&i| i as f32).collect()),
        }
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

// ---- The flow critic's readout and targets, the risk statistics, the scalar metrics ---------

/// Index of the target field G in [`crate::train::rollout::FlowTargets::fields`].
pub const FLOW_TARGET_FIELD: usize = 7;

impl StepOps {
    /// The flow readout ([`crate::train::rollout::flow_readout`]) of step buffers: `u` the
    /// conditioning `[N][W]`, `tokens` the masked positions of `mask` (`[N]`); returns the
    /// samples `[N][K]` and the per-token std `[N]` (0 off the mask).
    pub fn flow_readout_buf(
        &self,
        fs: &crate::train::rollout::FlowSolve,
        params: &StepBuf,
        u: &StepBuf,
        mask: &StepBuf,
        tokens: &TokenList,
    ) -> Result<(StepBuf, StepBuf)> {
        let Some(dev) = self.cuda() else {
            let (z, sd) = crate::train::rollout::flow_readout(
                self,
                fs,
                params.host()?,
                u.host()?,
                mask.host()?,
            )?;
            return Ok((StepBuf::Host(z), StepBuf::Host(sd)));
        };
        let (k, w, n, m) = (fs.k, fs.shape.width, mask.len(), tokens.len());
        crate::error::check_len("flow readout u", u.len(), n * w)?;
        let (z, sd) = (zeros(dev, n * k)?, zeros(dev, n)?);
        if m == 0 {
            return Ok((StepBuf::Dev(z), StepBuf::Dev(sd)));
        }
        let idx = Self::list_ptr(dev, tokens)?;
        let (us, z0, z1) = (zeros(dev, m * w)?, zeros(dev, m * k)?, zeros(dev, m * k)?);
        let noise = NoiseOpts {
            kind: flow::Noise::Stratified,
            truncate: None,
        };
        let opts = IntegrateOpts {
            steps: fs.readout_steps,
            solver: flow::Solver::Euler,
            clip: None,
            jacobian: false,
        };
        // SAFETY: u [N][W], idx m distinct tokens below N, us [m][W], z0/z1 m·K, z N·K, sd N.
        unsafe {
            crate::model::ops::gpu::rows(
                dev,
                false,
                dptr(dev, dev_buf(u, "u")?),
                idx,
                dptr(dev, &us),
                n,
                m,
                w,
            )?;
            flow::cuda::noise_raw(dev, &noise, k, dptr(dev, &z0), m * k)?;
            flow::cuda::integrate_raw(
                dev,
                &fs.shape,
                dptr(dev, dev_buf(params, "params")?),
                dptr(dev, &us),
                k,
                dptr(dev, &z0),
                flow::cuda::RawInterval::Uniform(0.0, 1.0),
                &opts,
                dptr(dev, &z1),
                0,
                m,
            )?;
            crate::kernels::step::readout_finish(
                dev,
                dptr(dev, &z1),
                idx,
                m,
                k,
                fs.clip,
                dptr(dev, &z),
                dptr(dev, &sd),
            )?;
        }
        Ok((StepBuf::Dev(z), StepBuf::Dev(sd)))
    }

    /// The flow critic's targets ([`crate::train::rollout::flow_targets`]) of step buffers, as
    /// the 12 fields of [`crate::train::rollout::FlowTargets::fields`]; `rng` advances by the
    /// draws made (the same values on both backends).
    #[allow(clippy::too_many_arguments)]
    pub fn flow_targets_buf(
        &self,
        fs: &crate::train::rollout::FlowSolve,
        params: &StepBuf,
        u: &StepBuf,
        z: &StepBuf,
        sd: &StepBuf,
        ret: &StepBuf,
        rewards: &StepBuf,
        mask: &StepBuf,
        tokens: &TokenList,
        s: usize,
        o: &crate::train::rollout::FlowTargetOpts,
        rng: &mut crate::train::rollout::Stream,
    ) -> Result<Vec<StepBuf>> {
        let Some(dev) = self.cuda() else {
            let t = crate::train::rollout::flow_targets(
                self,
                fs,
                params.host()?,
                u.host()?,
                z.host()?,
                sd.host()?,
                ret.host()?,
                rewards.host()?,
                mask.host()?,
                s,
                o,
                rng,
            )?;
            return Ok(t.into_fields().into_iter().map(StepBuf::Host).collect());
        };
        let (k, w, n, m) = (fs.k, fs.shape.width, mask.len(), tokens.len());
        if u.len() != n * w || z.len() != n * k || ret.len() != n * k || rewards.len() != n {
            return Err(Error::Shape(format!(
                "flow_targets: u {} z {} ret {} rewards {} for {n} tokens, K {k}, W {w}",
                u.len(),
                z.len(),
                ret.len(),
                rewards.len()
            )));
        }
        let mut fields = Vec::with_capacity(12);
        for i in 0..12 {
            let len = if i < 10 { n * k } else { n };
            fields.push(if i == FLOW_TARGET_FIELD {
                dev.stream().clone_dtod(dev_buf(ret, "ret")?)?
            } else {
                zeros(dev, len)?
            });
        }
        if m > 0 {
            let mk = m * k;
            let idx = Self::list_ptr(dev, tokens)?;
            let (tau, noise) = (zeros(dev, mk)?, zeros(dev, mk)?);
            let (next, un) = (zeros(dev, m)?, zeros(dev, m * w)?);
            let (start, zp, vold) = (zeros(dev, mk)?, zeros(dev, mk)?, zeros(dev, mk)?);
            let (seed, counter) = rng.state();
            let pp = dptr(dev, dev_buf(params, "params")?);
            let mp = dptr(dev, dev_buf(mask, "mask")?);
            let opts = IntegrateOpts {
                steps: fs.target_steps,
                solver: fs.solver,
                clip: None,
                jacobian: false,
            };
            let ptrs: Vec<u64> = fields.iter().map(|f| dptr(dev, f)).collect();
            let mut out = [0u64; 10];
            out.copy_from_slice(&ptrs[..10]);
            // SAFETY: every buffer has the length the launchers document (allocated above or
            // checked against n, k, w).
            unsafe {
                crate::kernels::step::uniform_normal(
                    dev,
                    seed,
                    counter,
                    mk,
                    dptr(dev, &tau),
                    dptr(dev, &noise),
                )?;
                crate::kernels::step::next_rows(dev, idx, mp, m, n, s, dptr(dev, &next))?;
                crate::model::ops::gpu::rows(
                    dev,
                    false,
                    dptr(dev, dev_buf(u, "u")?),
                    dptr(dev, &next),
                    dptr(dev, &un),
                    n,
                    m,
                    w,
                )?;
                // z'_τ: the old flow at h_{t+1} from ε over [0, τ]; then v_old(z'_τ, τ | h_{t+1}).
                flow::cuda::integrate_raw(
                    dev,
                    &fs.shape,
                    pp,
                    dptr(dev, &un),
                    k,
                    dptr(dev, &noise),
                    flow::cuda::RawInterval::PerRow(dptr(dev, &start), dptr(dev, &tau)),
                    &opts,
                    dptr(dev, &zp),
                    0,
                    m,
                )?;
                flow::cuda::eval_forward_raw(
                    dev,
                    &fs.shape,
                    pp,
                    dptr(dev, &un),
                    k,
                    dptr(dev, &zp),
                    dptr(dev, &tau),
                    dptr(dev, &vold),
                    m,
                )?;
                let x = crate::kernels::step::FlowFieldInputs {
                    idx,
                    mask: mp,
                    tau: dptr(dev, &tau),
                    noise: dptr(dev, &noise),
                    zp: dptr(dev, &zp),
                    vold: dptr(dev, &vold),
                    sd: dptr(dev, dev_buf(sd, "sd")?),
                    ret: dptr(dev, dev_buf(ret, "ret")?),
                    rewards: dptr(dev, dev_buf(rewards, "rewards")?),
                    z: dptr(dev, dev_buf(z, "z")?),
                };
                crate::kernels::step::flow_fields(
                    dev,
                    crate::kernels::step::FlowFieldPtrs(out),
                    ptrs[10],
                    ptrs[11],
                    &x,
                    m,
                    k,
                    n,
                    s,
                    crate::kernels::step::FlowFieldOpts {
                        gamma: o.gamma,
                        kappa: o.kappa,
                        direction: o.direction,
                        anchor_lambda: o.anchor_lambda,
                    },
                )?;
            }
            rng.skip(2 * mk as u64);
        }
        Ok(fields.into_iter().map(StepBuf::Dev).collect())
    }

    /// `critic.risk_targets = "prompt"` ([`crate::train::rollout::pool_first_token_targets`])
    /// on the target field `[R·S][K]`.
    pub fn pool_first_buf(
        &self,
        batch: &crate::train::rollout::Batch,
        target: &mut StepBuf,
        k: usize,
    ) -> Result<()> {
        let Some(dev) = self.cuda() else {
            crate::train::rollout::pool_first_token_targets(batch, target.host_mut()?, k);
            return Ok(());
        };
        let s = batch.s;
        let groups = batch.group.iter().copied().max().map_or(0, |g| g + 1);
        let (mut first, mut start) = (Vec::new(), vec![0i32]);
        for g in 0..groups {
            for r in 0..batch.rows() {
                if batch.group[r] == g && batch.response_len[r] > 0 {
                    first.push((r * s + batch.prompt_len[r] - 1) as i32);
                }
            }
            start.push(first.len() as i32);
        }
        if first.is_empty() {
            return Ok(());
        }
        let (fd, sd) = (up(dev, &first)?, up(dev, &start)?);
        let scratch = zeros(dev, first.len() * k)?;
        let tp = dptr(dev, dev_buf(target, "target")?);
        // SAFETY: every first index is a token of target's [R·S][K]; start has groups + 1
        // entries; scratch first.len()·K f32.
        unsafe {
            crate::kernels::step::pool_first(
                dev,
                tp,
                dptr(dev, &fd),
                dptr(dev, &sd),
                groups,
                k,
                dptr(dev, &scratch),
            )
        }
    }

    /// New scalar metrics, all zero.
    pub fn scalars(&self) -> Result<Scalars> {
        Ok(Scalars {
            names: Vec::new(),
            host: Vec::new(),
            dev: match self.cuda() {
                None => None,
                Some(d) => Some(d.stream().alloc_zeros::<f64>(MAX_SCALARS)?),
            },
        })
    }

    fn slot(sc: &mut Scalars, name: &str) -> Result<usize> {
        if let Some(i) = sc.names.iter().position(|n| n == name) {
            return Ok(i);
        }
        if sc.names.len() == MAX_SCALARS {
            return Err(Error::Invalid(format!(
                "step scalars: more than {MAX_SCALARS} (adding {name})"
            )));
        }
        sc.names.push(name.into());
        sc.host.push(0.0);
        Ok(sc.names.len() - 1)
    }

    /// Scalar `name` = Σ_{i<n} x[i·stride + col]·(w[i] or 1): each product in f32, summed in f64
    /// (in order on the host, in one block on CUDA).
    #[allow(clippy::too_many_arguments)]
    pub fn sum_into(
        &self,
        sc: &mut Scalars,
        name: &str,
        x: &StepBuf,
        w: Option<&StepBuf>,
        n: usize,
        stride: usize,
        col: usize,
    ) -> Result<()> {
        if n > 0 {
            crate::error::check_len("sum x", x.len().max((n - 1) * stride + col + 1), x.len())?;
        }
        if let Some(w) = w {
            crate::error::check_len("sum w", w.len(), n)?;
        }
        let i = Self::slot(sc, name)?;
        match self.cuda() {
            None => {
                let xs = x.host()?;
                let ws = w.map(|w| w.host()).transpose()?;
                // -0.0: the start of Iterator::sum, which the host metrics used.
                let mut acc = -0.0f64;
                for j in 0..n {
                    let v = xs[j * stride + col];
                    acc += match ws {
                        Some(ws) => (v * ws[j]) as f64,
                        None => v as f64,
                    };
                }
                sc.host[i] = acc;
                Ok(())
            }
            Some(dev) => {
                let out = dptr(dev, sc.dev.as_ref().expect("device scalars")) + 8 * i as u64;
                let wp = match w {
                    Some(w) => dptr(dev, dev_buf(w, "w")?),
                    None => 0,
                };
                let xp = if n > 0 {
                    dptr(dev, dev_buf(x, "x")?)
                } else {
                    0
                };
                // SAFETY: x holds (n−1)·stride + col + 1 values, w n (checked), out one f64.
                unsafe { crate::kernels::step::sum(dev, xp, wp, n, stride, col, out) }
            }
        }
    }

    /// Scalars `names[j].0` = Σ over the listed tokens of the risk statistic `names[j].1` of
    /// their `k` value samples ([`risk::cpu::stats`]: f64 on the host, the fp32 kernel on CUDA).
    pub fn risk_stat_sums(
        &self,
        sc: &mut Scalars,
        values: &StepBuf,
        tokens: &TokenList,
        k: usize,
        levels: TailLevels,
        names: &[(&str, risk::Stat)],
    ) -> Result<()> {
        let m = tokens.len();
        match self.cuda() {
            None => {
                let v = values.host()?;
                let x: Vec<f64> = crate::train::rollout::gather(v, &tokens.idx, k)
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let mut st = vec![0.0f64; m * risk::NSTATS];
                self.risk_stats(&x, k, levels, &mut st)?;
                for (name, stat) in names {
                    let i = Self::slot(sc, name)?;
                    sc.host[i] = st.chunks(risk::NSTATS).map(|r| r[*stat as usize]).sum();
                }
                Ok(())
            }
            Some(dev) => {
                let st = StepBuf::Dev(zeros(dev, m * risk::NSTATS)?);
                if m > 0 {
                    let xs = zeros(dev, m * k)?;
                    let n = values.len() / k;
                    // SAFETY: values [n][k], idx m tokens below n; xs m·k; stats m·NSTATS.
                    unsafe {
                        crate::model::ops::gpu::rows(
                            dev,
                            false,
                            dptr(dev, dev_buf(values, "values")?),
                            Self::list_ptr(dev, tokens)?,
                            dptr(dev, &xs),
                            n,
                            m,
                            k,
                        )?;
                        risk::cuda::stats_raw(
                            dev,
                            dptr(dev, &xs),
                            m,
                            k,
                            levels,
                            &[],
                            dptr(dev, dev_buf(&st, "stats")?),
                            0,
                            0,
                            0,
                        )?;
                    }
                }
                for (name, stat) in names {
                    self.sum_into(sc, name, &st, None, m, risk::NSTATS, *stat as usize)?;
                }
                Ok(())
            }
        }
    }

    /// Every scalar by name (on CUDA one download of the slots).
    pub fn read_scalars(&self, sc: &Scalars) -> Result<Vec<(String, f64)>> {
        let vals = match (&sc.dev, self.cuda()) {
            (Some(d), Some(dev)) => {
                let v = dev.dtoh(d)?;
                v[..sc.names.len()].to_vec()
            }
            _ => sc.host.clone(),
        };
        Ok(sc.names.iter().cloned().zip(vals).collect())
    }
}

// ---- Graph inputs and outputs from and to step buffers ---------------------------------------

impl StepOps {
    /// Copies the first `n` values of graph tensor `t` (f32, or bf16 widened) into `dst` at
    /// `offset` (on CUDA device to device, no host traffic).
    pub fn read_graph(
        &self,
        sess: &crate::graph::Session,
        t: crate::graph::TensorId,
        n: usize,
        dst: &mut StepBuf,
        offset: usize,
    ) -> Result<()> {
        crate::error::check_len("read_graph range", dst.len().max(offset + n), dst.len())?;
        let dtype = sess.plan().tensor(t).dtype;
        match (self.cuda(), dst) {
            (None, StepBuf::Host(v)) => {
                let x: Vec<f32> = match dtype {
                    crate::graph::DType::BF16 => sess
                        .read::<half::bf16>(t)?
                        .into_iter()
                        .map(f32::from)
                        .collect(),
                    _ => sess.read_f32(t)?,
                };
                if x.len() < n {
                    return Err(Error::Shape(format!(
                        "read_graph: {n} values of a tensor of {}",
                        x.len()
                    )));
                }
                v[offset..offset + n].copy_from_slice(&x[..n]);
                Ok(())
            }
            (Some(dev), StepBuf::Dev(d)) => {
                if n == 0 {
                    return Ok(());
                }
                match dtype {
                    crate::graph::DType::BF16 => {
                        if sess.plan().tensor(t).len < n {
                            return Err(Error::Shape(format!(
                                "read_graph: {n} values of a tensor of {}",
                                sess.plan().tensor(t).len
                            )));
                        }
                        let src = sess.cuda_ptr(t)?;
                        let dp = dptr(dev, d) + 4 * offset as u64;
                        // SAFETY: n bf16 at src (checked), n f32 at dst (checked above).
                        unsafe { crate::model::ops::gpu::cast_bf16_f32(dev, src, dp, n) }
                    }
                    _ => sess.read_device(t, &mut d.slice_mut(offset..offset + n)),
                }
            }
            _ => Err(Error::Invalid(
                "read_graph: a step buffer of the other backend".into(),
            )),
        }
    }

    /// Writes graph input `t` (f32, `rows.len()·w` values) with row j = row `rows[j]` of `src`
    /// (`[·][w]`; `None`: zeros).
    pub fn write_rows(
        &self,
        sess: &mut crate::graph::Session,
        t: crate::graph::TensorId,
        src: &StepBuf,
        rows: RowPick<'_>,
        w: usize,
    ) -> Result<()> {
        crate::error::check_len(
            "write_rows input",
            sess.plan().tensor(t).len,
            rows.len() * w,
        )?;
        let n = src.len() / w.max(1);
        if let Some(r) = rows.iter().flatten().find(|&&r| r >= n) {
            return Err(Error::Shape(format!(
                "write_rows: row {r} of a source of {n} rows"
            )));
        }
        let Some(dev) = self.cuda() else {
            let x = src.host()?;
            let mut o = vec![0.0f32; rows.len() * w];
            for (j, r) in rows.iter().enumerate() {
                if let Some(r) = r {
                    o[j * w..(j + 1) * w].copy_from_slice(&x[r * w..(r + 1) * w]);
                }
            }
            return sess.write(t, &o);
        };
        if rows.is_empty() || w == 0 {
            return Ok(());
        }
        crate::kernels::step::check_f32_index("write_rows", n)?;
        let rd = up(dev, &rows_f32(rows))?;
        let dst = sess.input_device_ptr(t, crate::graph::DType::F32)?;
        // SAFETY: src n·w f32, rows m f32 below n, dst m·w f32 (checked).
        unsafe {
            crate::model::ops::gpu::rows(
                dev,
                false,
                dptr(dev, dev_buf(src, "src")?),
                dptr(dev, &rd),
                dst,
                n.max(1),
                rows.len(),
                w,
            )
        }
    }

    /// Writes graph input `t` (`rows.len()·s` f32) with token weights: row j = the rollout
    /// mask's row `rows[j]` divided by `denom[j]` (0 where `denom[j]` is 0 or the row is
    /// `None`), [`crate::train::rollout::token_weights`]'s arithmetic.
    pub fn write_token_weights(
        &self,
        sess: &mut crate::graph::Session,
        t: crate::graph::TensorId,
        mask: &StepBuf,
        rows: RowPick<'_>,
        s: usize,
        denom: &[f32],
    ) -> Result<()> {
        crate::error::check_len(
            "token weights input",
            sess.plan().tensor(t).len,
            rows.len() * s,
        )?;
        crate::error::check_len("token weights denominators", denom.len(), rows.len())?;
        let n = mask.len() / s.max(1);
        if let Some(r) = rows.iter().flatten().find(|&&r| r >= n) {
            return Err(Error::Shape(format!(
                "token weights: row {r} of a mask of {n} rows"
            )));
        }
        let Some(dev) = self.cuda() else {
            let m = mask.host()?;
            let mut o = vec![0.0f32; rows.len() * s];
            for (j, r) in rows.iter().enumerate() {
                if let (Some(r), true) = (r, denom[j] != 0.0) {
                    for tt in 0..s {
                        o[j * s + tt] = m[r * s + tt] / denom[j];
                    }
                }
            }
            return sess.write(t, &o);
        };
        if rows.is_empty() || s == 0 {
            return Ok(());
        }
        let (rd, dd) = (up(dev, &rows_f32(rows))?, up(dev, denom)?);
        let dst = sess.input_device_ptr(t, crate::graph::DType::F32)?;
        // SAFETY: mask n·s f32, rows and denom m f32, dst m·s f32 (checked).
        unsafe {
            crate::kernels::step::row_value(
                dev,
                dptr(dev, dev_buf(mask, "mask")?),
                dptr(dev, &rd),
                dptr(dev, &dd),
                rows.len(),
                s,
                1,
                dst,
            )
        }
    }

    /// The response tokens of `rows` (rollout rows, in order) from the batch's device token
    /// list `list`, as f32 on the device; they must be `want` (the host's list).
    fn token_rows(
        &self,
        dev: &CudaDevice,
        list: &TokenList,
        rows: &[usize],
        want: &[usize],
    ) -> Result<CudaSlice<f32>> {
        let (Some(src), Some(off)) = (&list.dev, &list.row_off) else {
            return Err(Error::Invalid(
                "flow inputs: a token list without device rows".into(),
            ));
        };
        let nseg = rows.len();
        let mut seg = vec![0i32; 3 * nseg];
        let mut at = 0usize;
        for (i, &r) in rows.iter().enumerate() {
            if r + 1 >= off.len() {
                return Err(Error::Shape(format!(
                    "flow inputs: row {r} of a token list of {} rows",
                    off.len() - 1
                )));
            }
            let len = off[r + 1] - off[r];
            if want.get(at..at + len) != Some(&list.idx[off[r]..off[r + 1]]) {
                return Err(Error::Invalid(format!(
                    "flow inputs: the micro-batch's tokens are not row {r}'s response tokens"
                )));
            }
            seg[i] = off[r] as i32;
            seg[nseg + i] = at as i32;
            seg[2 * nseg + i] = len as i32;
            at += len;
        }
        crate::error::check_len("flow inputs' tokens", want.len(), at)?;
        let out = dev.stream().alloc_zeros::<f32>(at.max(1))?;
        let sd = up(dev, &seg)?;
        // SAFETY: segments of src (list.idx.len() f32, offsets from row_off) into disjoint
        // ranges of out (at f32).
        unsafe {
            crate::kernels::step::segments(
                dev,
                dptr(dev, src),
                dptr(dev, &sd),
                nseg,
                dptr(dev, &out),
            )?
        };
        Ok(out)
    }

    /// Writes the flow critic head's token inputs of one micro-batch: `inputs` are the graph's
    /// row list, the 12 fields' inputs ([`crate::train::models::FLOW_SAMPLE_INPUTS`], then
    /// `w_unc`, `dcfm_mask`), token weights and risk weights; `fields` the step's target fields
    /// (`[R·S][K]` ×10, `[R·S]` ×2); the inputs hold `cap` tokens (unused: row −1, zeros).
    pub fn write_flow_inputs(
        &self,
        sess: &mut crate::graph::Session,
        inputs: &[crate::graph::TensorId],
        fields: &[StepBuf],
        mb: &FlowMicro<'_>,
        k: usize,
    ) -> Result<()> {
        crate::error::check_len("flow inputs", inputs.len(), 15)?;
        crate::error::check_len("flow fields", fields.len(), 12)?;
        let cap = sess.plan().tensor(inputs[0]).len;
        let m = mb.global.len();
        if m > cap {
            return Err(Error::Shape(format!(
                "flow critic: {m} tokens in a micro-batch, the head holds {cap}"
            )));
        }
        let n = fields[11].len();
        if let Some(&g) = mb.global.iter().find(|&&g| g >= n) {
            return Err(Error::Shape(format!("flow inputs: token {g} of {n}")));
        }
        let first = |g: usize| g % mb.s + 1 == mb.plen[g / mb.s];
        let Some(dev) = self.cuda() else {
            let mut rows: Vec<f32> = mb
                .global
                .iter()
                .map(|&g| (mb.rowpos[g / mb.s] as usize * mb.s + g % mb.s) as f32)
                .collect();
            rows.resize(cap, -1.0);
            sess.write(inputs[0], &rows)?;
            for (i, f) in fields.iter().enumerate() {
                let w = if i < 10 { k } else { 1 };
                let mut v = crate::train::rollout::gather(f.host()?, mb.global, w);
                v.resize(cap * w, 0.0);
                sess.write(inputs[1 + i], &v)?;
            }
            let mut tw = vec![1.0f32 / mb.total; m];
            tw.resize(cap, 0.0);
            let mut rw: Vec<f32> = match mb.first_count {
                Some(nf) => mb
                    .global
                    .iter()
                    .map(|&g| if first(g) { 1.0 / nf } else { 0.0 })
                    .collect(),
                None => tw[..m].to_vec(),
            };
            rw.resize(cap, 0.0);
            sess.write(inputs[13], &tw)?;
            return sess.write(inputs[14], &rw);
        };
        let ptr = |t: crate::graph::TensorId| sess.input_device_ptr(t, crate::graph::DType::F32);
        let rowpos = up(dev, mb.rowpos)?;
        let plen: Vec<i32> = mb.plen.iter().map(|&p| p as i32).collect();
        let pl = up(dev, &plen)?;
        let gd = if m == 0 {
            None
        } else {
            Some(match mb.from {
                Some((list, rows)) => self.token_rows(dev, list, rows, mb.global)?,
                None => {
                    let gf: Vec<f32> = mb.global.iter().map(|&g| g as f32).collect();
                    up(dev, &gf)?
                }
            })
        };
        let gp = gd.as_ref().map_or(0, |g| dptr(dev, g));
        crate::kernels::step::check_f32_index("flow inputs", n)?;
        // SAFETY: the inputs hold cap (·k) f32 (the head's plan); global m tokens below n;
        // rowpos and plen one entry per rollout row.
        unsafe {
            crate::kernels::step::flow_rows(
                dev,
                gp,
                dptr(dev, &rowpos),
                dptr(dev, &pl),
                m,
                cap,
                mb.s,
                mb.total,
                mb.first_count.unwrap_or(1.0),
                mb.first_count.is_some(),
                ptr(inputs[0])?,
                ptr(inputs[13])?,
                ptr(inputs[14])?,
            )?;
            for (i, f) in fields.iter().enumerate() {
                let w = if i < 10 { k } else { 1 };
                let dst = ptr(inputs[1 + i])?;
                crate::error::check_len(
                    "flow input",
                    sess.plan().tensor(inputs[1 + i]).len,
                    cap * w,
                )?;
                if m > 0 {
                    crate::model::ops::gpu::rows(
                        dev,
                        false,
                        dptr(dev, dev_buf(f, "field")?),
                        gp,
                        dst,
                        n,
                        m,
                        w,
                    )?;
                }
                if cap > m {
                    cudarc::driver::result::memset_d8_async(
                        dst + (4 * m * w) as u64,
                        0,
                        4 * (cap - m) * w,
                        dev.stream().cu_stream(),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// A parameter of a graph as a step buffer (the live weights: on CUDA a device copy).
    pub fn graph_param(
        &self,
        sess: &crate::graph::Session,
        t: crate::graph::TensorId,
    ) -> Result<StepBuf> {
        let n = sess.plan().tensor(t).len;
        let mut b = self.zeros(n)?;
        self.read_graph(sess, t, n, &mut b, 0)?;
        Ok(b)
    }
}
