//! The training step's numerics outside the model graphs: the flow critic's readout and target
//! solves, the prior noise, distributional GAE, whitening, the KL penalty, the risk statistics
//! and the risk losses. Every call the step makes to them goes through [`StepOps`], the one
//! place that decides where they run.
//!
//! On the CPU each runs its CPU reference. On a CUDA device the readout and target solves, the
//! noise, the head evaluations, distributional GAE, whitening, the KL penalty and the risk
//! statistics run their CUDA kernels (`kernels::{flow, rl, risk}::cuda`), each call uploading
//! its host inputs and downloading its outputs. That is an intermediate form of the
//! GPU-resident step (issue 11): the kernels run, but the inputs still come from host vectors;
//! keeping them on the device means device tensors in and out of these calls. The risk losses
//! are called by the graph's host kernels, which hold host vectors by design: they stay on the
//! host ([`StepOps::host`]).

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
