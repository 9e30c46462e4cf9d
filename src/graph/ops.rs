//! Graph ops: each wraps one kernel family's CPU reference and CUDA launcher with an explicit
//! forward and backward.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{Exec, Op, TensorId};
use crate::device::blocks_for;
use crate::error::{check_len, Error, Result};

/// Weighted mean squared error: ins `[pred, target]` or `[pred, target, weight]` (target and
/// weight get no gradient), out `[loss]` of length 1: loss = (1/n) Σ w (pred − target)².
pub struct MseLoss;

impl Op for MseLoss {
    fn name(&self) -> String {
        "mse_loss".into()
    }

    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        let n = x.len(ins[0]);
        check_len("mse target", x.len(ins[1]), n)?;
        if let Some(&w) = ins.get(2) {
            check_len("mse weight", x.len(w), n)?;
        }
        if let Some(dev) = x.cuda_device() {
            let f = dev.function("loss", "loss_mse_fwd")?;
            let (p, t, w, l) = (
                x.ptr(ins[0]),
                x.ptr(ins[1]),
                ins.get(2).map_or(0, |&w| x.ptr(w)),
                x.ptr(outs[0]),
            );
            let n32 = n as i32;
            let mut b = dev.launch_builder(&f);
            b.arg(&p).arg(&t).arg(&w).arg(&n32).arg(&l);
            let cfg = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: pointers are graph tensors of the checked lengths.
            return unsafe { dev.launch("loss_mse_fwd", b, cfg) };
        }
        let (p, t) = (x.cpu(ins[0]), x.cpu(ins[1]));
        let w = ins.get(2).map(|&w| x.cpu(w));
        let mut acc = 0.0f64;
        for i in 0..n {
            let d = p[i] as f64 - t[i] as f64;
            acc += w.map_or(1.0, |w| w[i] as f64) * d * d;
        }
        x.cpu_mut(outs[0])[0] = if n > 0 { (acc / n as f64) as f32 } else { 0.0 };
        Ok(())
    }

    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        _outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        if d_ins.get(1).copied().flatten().is_some() || d_ins.get(2).copied().flatten().is_some() {
            return Err(Error::Invalid(
                "mse_loss: target and weight must not need gradients".into(),
            ));
        }
        let Some(dp) = d_ins[0] else { return Ok(()) };
        let n = x.len(ins[0]);
        if let Some(dev) = x.cuda_device() {
            let f = dev.function("loss", "loss_mse_bwd")?;
            let (p, t, w) = (
                x.ptr(ins[0]),
                x.ptr(ins[1]),
                ins.get(2).map_or(0, |&w| x.ptr(w)),
            );
            let (dl, dpp, n32) = (x.ptr(d_outs[0]), x.ptr(dp), n as i32);
            let mut b = dev.launch_builder(&f);
            b.arg(&p).arg(&t).arg(&w).arg(&n32).arg(&dl).arg(&dpp);
            let cfg = LaunchConfig {
                grid_dim: (blocks_for(n, 256), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as in forward.
            return unsafe { dev.launch("loss_mse_bwd", b, cfg) };
        }
        let dl = x.cpu(d_outs[0])[0];
        let (p, t) = (x.cpu(ins[0]), x.cpu(ins[1]));
        let w = ins.get(2).map(|&w| x.cpu(w));
        let g = x.cpu_mut(dp);
        for i in 0..n {
            let wi = w.map_or(1.0, |w| w[i]);
            g[i] += dl * 2.0 * wi * (p[i] - t[i]) / n as f32;
        }
        Ok(())
    }
}
