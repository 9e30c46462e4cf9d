//! The training step's numerics outside the model graphs: the flow critic's readout and target
//! solves, the prior noise, distributional GAE, whitening, the KL penalty, the risk statistics
//! and the risk losses. Every call the step makes to them goes through [`StepOps`], the one
//! place that decides where they run.
//!
//! Today each runs its CPU reference on host vectors, on a CUDA device too (there only the
//! backbones and the flow head's loss evaluations run as device ops). The CUDA kernels of all of
//! them exist (`kernels::{flow, rl, risk}::cuda`); moving these calls onto the device is the
//! GPU-resident step's work, and it starts in [`StepOps::new`].

use crate::device::Device;
use crate::error::Result;
use crate::kernels::flow::{self, FlowHeadShape, IntegrateOpts, Interval, NoiseOpts};
use crate::kernels::risk::{self, RiskLossWeights, TailLevels};
use crate::kernels::rl::{self, GaeParams, KlKind};

/// Where the step's numerics run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// The CPU references, on host vectors.
    Host,
}

/// The step's numerics on one backend (see the module documentation).
#[derive(Clone, Debug)]
pub struct StepOps {
    backend: Backend,
}

impl StepOps {
    /// The ops of a step on `device`: the host for every device today.
    pub fn new(device: &Device) -> Self {
        let _ = device;
        StepOps {
            backend: Backend::Host,
        }
    }

    /// Host ops, for callers that hold host vectors by design (the graph's host kernels).
    pub fn host() -> Self {
        StepOps {
            backend: Backend::Host,
        }
    }

    /// Prior noise per row ([`flow::cpu::noise`]).
    pub fn noise(&self, opts: &NoiseOpts, k: usize, out: &mut [f32]) -> Result<()> {
        match self.backend {
            Backend::Host => flow::cpu::noise(opts, k, out),
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
        match self.backend {
            Backend::Host => {
                flow::cpu::integrate(shape, params, u, k, z0, interval, opts, z1, None)
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
        match self.backend {
            Backend::Host => flow::cpu::eval_forward(shape, params, u, k, z, tau, v),
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
        match self.backend {
            Backend::Host => rl::cpu::kl_penalty(logp, logp_ref, mask, kind, out, None),
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
        match self.backend {
            Backend::Host => {
                rl::cpu::dist_gae(values, rewards, mask, b, t, k, p, adv, ret, adv_mean)
            }
        }
    }

    /// Masked whitening ([`rl::cpu::whiten`]); returns (μ, σ).
    pub fn whiten(&self, x: &[f32], mask: &[f32], out: &mut [f32]) -> Result<(f32, f32)> {
        match self.backend {
            Backend::Host => rl::cpu::whiten(x, mask, out),
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
        match self.backend {
            Backend::Host => risk::cpu::stats(x, k, levels, &[], stats, &mut [], None, None),
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
        match self.backend {
            Backend::Host => risk::cpu::loss(pred, target, k, levels, w, row_scale, terms, grad),
        }
    }
}
