//! Graph ops: each wraps one kernel family's CPU reference and CUDA launcher with an explicit
//! forward and backward.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{Exec, Op, TensorId};
use crate::device::blocks_for;
use crate::error::{check_len, Error, Result};
use crate::kernels::flow::{self, FlowHeadShape};

/// The CUDA launches of [`MseLoss`] for `n` elements: the kernels' `n` argument and the forward
/// (one block) and backward (one thread per element) configurations; `Error::Shape` when `n`
/// does not fit the kernels' i32.
fn mse_cuda_launch(n: usize) -> Result<(i32, LaunchConfig, LaunchConfig)> {
    let n32 = crate::kernels::check_i32("mse_loss n", n)?;
    let fwd = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    let bwd = LaunchConfig {
        grid_dim: (blocks_for(n, 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((n32, fwd, bwd))
}

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
            let (n32, cfg, _) = mse_cuda_launch(n)?;
            let mut b = dev.launch_builder(&f);
            b.arg(&p).arg(&t).arg(&w).arg(&n32).arg(&l);
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
            let (n32, _, cfg) = mse_cuda_launch(n)?;
            let (dl, dpp) = (x.ptr(d_outs[0]), x.ptr(dp));
            let mut b = dev.launch_builder(&f);
            b.arg(&p).arg(&t).arg(&w).arg(&n32).arg(&dl).arg(&dpp);
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

/// The flow head's per-token conditioning: ins `[params, c]`, out `[u]` with
/// u = c·W_cond + b_in ([`crate::kernels::flow`]); c gets a gradient when it needs one.
pub struct FlowCond {
    pub shape: FlowHeadShape,
}

impl FlowCond {
    fn tokens(&self, c_len: usize) -> usize {
        c_len / self.shape.cond_dim
    }
}

impl Op for FlowCond {
    fn name(&self) -> String {
        "flow_cond".into()
    }

    fn backward_reads(&self) -> (bool, bool) {
        (true, false) // params and c; u itself is not needed
    }

    fn backward_scratch(&self, ins: &[usize], _outs: &[usize], cuda: bool) -> usize {
        if cuda {
            flow::cuda::cond_backward_workspace_len(&self.shape, self.tokens(ins[1]))
        } else {
            0
        }
    }

    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        let (p, c, u) = (ins[0], ins[1], outs[0]);
        if let Some(dev) = x.cuda_device() {
            let n_tok = self.tokens(x.len(c));
            check_len("flow_cond u", x.len(u), n_tok * self.shape.width)?;
            // SAFETY: graph tensors of checked lengths.
            return unsafe {
                flow::cuda::cond_forward_raw(dev, &self.shape, x.ptr(p), x.ptr(c), x.ptr(u), n_tok)
            };
        }
        flow::cpu::cond_forward(&self.shape, x.cpu(p), x.cpu(c), x.cpu_mut(u))
    }

    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        _outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        let (p, c, du) = (ins[0], ins[1], d_outs[0]);
        let dp = d_ins[0].ok_or_else(|| {
            Error::Invalid("flow_cond: the head's parameters must be trainable".into())
        })?;
        if let Some(dev) = x.cuda_device() {
            let n_tok = self.tokens(x.len(c));
            let ws = x.require_scratch(&self.name())?;
            let dc = d_ins[1].map_or(0, |t| x.ptr(t));
            // SAFETY: graph tensors of checked lengths; scratch sized by backward_scratch.
            return unsafe {
                flow::cuda::cond_backward_raw(
                    dev,
                    &self.shape,
                    x.ptr(p),
                    x.ptr(c),
                    x.ptr(du),
                    x.ptr(dp),
                    dc,
                    n_tok,
                    x.ptr(ws),
                    x.len(ws),
                )
            };
        }
        let dc = d_ins[1].map(|t| x.cpu_mut(t));
        flow::cpu::cond_backward(
            &self.shape,
            x.cpu(p),
            x.cpu(c),
            x.cpu(du),
            x.cpu_mut(dp),
            dc,
        )
    }
}

/// One evaluation of the flow head with gradients: ins `[params, u, z, tau]`, out `[v]`, with
/// rows = tokens × `samples_per_token` (row r belongs to token r / K).
pub struct FlowEval {
    pub shape: FlowHeadShape,
    pub samples_per_token: usize,
}

impl FlowEval {
    fn tokens(&self, u_len: usize) -> usize {
        u_len / self.shape.width
    }
}

impl Op for FlowEval {
    fn name(&self) -> String {
        "flow_eval".into()
    }

    fn backward_reads(&self) -> (bool, bool) {
        (true, false) // the backward recomputes the forward from its inputs
    }

    fn backward_scratch(&self, ins: &[usize], _outs: &[usize], cuda: bool) -> usize {
        if cuda {
            let n_tok = self.tokens(ins[1]);
            flow::cuda::eval_backward_workspace_len(&self.shape, n_tok, self.samples_per_token)
        } else {
            0
        }
    }

    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        let (p, u, z, tau, v) = (ins[0], ins[1], ins[2], ins[3], outs[0]);
        let k = self.samples_per_token;
        if let Some(dev) = x.cuda_device() {
            let n_tok = self.tokens(x.len(u));
            for (what, t) in [("z", z), ("tau", tau), ("v", v)] {
                check_len(&format!("flow_eval {what}"), x.len(t), n_tok * k)?;
            }
            // SAFETY: graph tensors of checked lengths.
            return unsafe {
                flow::cuda::eval_forward_raw(
                    dev,
                    &self.shape,
                    x.ptr(p),
                    x.ptr(u),
                    k,
                    x.ptr(z),
                    x.ptr(tau),
                    x.ptr(v),
                    n_tok,
                )
            };
        }
        let (w, n_tok) = (self.shape.width, self.tokens(x.len(u)));
        let (pp, uu, zz, tt, vv) = (x.cpu(p), x.cpu(u), x.cpu(z), x.cpu(tau), x.cpu_mut(v));
        check_len("flow_eval v", vv.len(), n_tok * k)?;
        // Two halves of the tokens on two threads (rows are independent).
        let Some(h) = cpu_split(n_tok, k) else {
            return flow::cpu::eval_forward(&self.shape, pp, uu, k, zz, tt, vv);
        };
        let (v0, v1) = vv.split_at_mut(h * k);
        std::thread::scope(|sc| {
            let t = sc.spawn(|| {
                let r = h * k..;
                flow::cpu::eval_forward(
                    &self.shape,
                    pp,
                    &uu[h * w..],
                    k,
                    &zz[r.clone()],
                    &tt[r],
                    v1,
                )
            });
            let a = flow::cpu::eval_forward(
                &self.shape,
                pp,
                &uu[..h * w],
                k,
                &zz[..h * k],
                &tt[..h * k],
                v0,
            );
            let b = t
                .join()
                .unwrap_or_else(|_| Err(Error::Invalid("flow_eval: worker panicked".into())));
            a.and(b)
        })
    }

    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        _outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        let (p, u, z, tau, dv) = (ins[0], ins[1], ins[2], ins[3], d_outs[0]);
        let k = self.samples_per_token;
        let dp = d_ins[0].ok_or_else(|| {
            Error::Invalid("flow_eval: the head's parameters must be trainable".into())
        })?;
        if d_ins[3].is_some() {
            return Err(Error::Invalid("flow_eval: tau gets no gradient".into()));
        }
        // u is computed from the parameters, so it always has a gradient here.
        let du =
            d_ins[1].ok_or_else(|| Error::Invalid("flow_eval: u must have a gradient".into()))?;
        if let Some(dev) = x.cuda_device() {
            let n_tok = self.tokens(x.len(u));
            let ws = x.require_scratch(&self.name())?;
            let dz = d_ins[2].map_or(0, |t| x.ptr(t));
            // SAFETY: graph tensors of checked lengths; scratch sized by backward_scratch.
            return unsafe {
                flow::cuda::eval_backward_raw(
                    dev,
                    &self.shape,
                    x.ptr(p),
                    x.ptr(u),
                    k,
                    x.ptr(z),
                    x.ptr(tau),
                    x.ptr(dv),
                    x.ptr(dp),
                    x.ptr(du),
                    dz,
                    n_tok,
                    x.ptr(ws),
                    x.len(ws),
                )
            };
        }
        let dz = d_ins[2].map(|t| x.cpu_mut(t));
        let (w, n_tok) = (self.shape.width, self.tokens(x.len(u)));
        let (pp, uu, zz, tt, dvv) = (x.cpu(p), x.cpu(u), x.cpu(z), x.cpu(tau), x.cpu(dv));
        let (dpp, duu) = (x.cpu_mut(dp), x.cpu_mut(du));
        let Some(h) = cpu_split(n_tok, k) else {
            return flow::cpu::eval_backward(&self.shape, pp, uu, k, zz, tt, dvv, dpp, duu, dz);
        };
        // Two halves of the tokens on two threads: du and dz split with them; the second half's
        // parameter gradient goes to its own buffer and is added afterwards (fixed order, so
        // the result is deterministic).
        let (du0, du1) = duu.split_at_mut(h * w);
        let (dz0, dz1) = match dz {
            Some(d) => {
                let (a, b) = d.split_at_mut(h * k);
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        let mut dp1 = vec![0.0f32; dpp.len()];
        let (r0, r1) = (..h * k, h * k..);
        std::thread::scope(|sc| {
            let t = sc.spawn(|| {
                flow::cpu::eval_backward(
                    &self.shape,
                    pp,
                    &uu[h * w..],
                    k,
                    &zz[r1.clone()],
                    &tt[r1.clone()],
                    &dvv[r1],
                    &mut dp1,
                    du1,
                    dz1,
                )
            });
            let a = flow::cpu::eval_backward(
                &self.shape,
                pp,
                &uu[..h * w],
                k,
                &zz[r0],
                &tt[r0],
                &dvv[r0],
                dpp,
                du0,
                dz0,
            );
            let b = t
                .join()
                .unwrap_or_else(|_| Err(Error::Invalid("flow_eval: worker panicked".into())));
            a.and(b)
        })?;
        for (a, b) in dpp.iter_mut().zip(&dp1) {
            *a += b;
        }
        Ok(())
    }
}

/// A stop-gradient solve of the flow ODE: ins `[params, u, z0]`, out `[z1]` = z0 integrated
/// over τ ∈ [0, 1] with `opts` (rows = tokens × `samples_per_token`). It gives nothing back to
/// its inputs: the output is a constant target (the flow critic's consistency target, computed
/// from the CURRENT head inside the update, method doc 2.7).
pub struct FlowSolveTarget {
    pub shape: FlowHeadShape,
    pub samples_per_token: usize,
    pub opts: flow::IntegrateOpts,
}

impl Op for FlowSolveTarget {
    fn name(&self) -> String {
        "flow_solve_target".into()
    }

    fn backward_reads(&self) -> (bool, bool) {
        (false, false)
    }

    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        let (p, u, z0, z1) = (ins[0], ins[1], ins[2], outs[0]);
        let k = self.samples_per_token;
        let (w, n_tok) = (self.shape.width, x.len(u) / self.shape.width);
        for (what, t) in [("z0", z0), ("z1", z1)] {
            check_len(&format!("flow_solve_target {what}"), x.len(t), n_tok * k)?;
        }
        if let Some(dev) = x.cuda_device() {
            // SAFETY: graph tensors of checked lengths; no Jacobian output.
            return unsafe {
                flow::cuda::integrate_raw(
                    dev,
                    &self.shape,
                    x.ptr(p),
                    x.ptr(u),
                    k,
                    x.ptr(z0),
                    flow::cuda::RawInterval::Uniform(0.0, 1.0),
                    &self.opts,
                    x.ptr(z1),
                    0,
                    n_tok,
                )
            };
        }
        let (pp, uu, zz, out) = (x.cpu(p), x.cpu(u), x.cpu(z0), x.cpu_mut(z1));
        let solve = |u: &[f32], z0: &[f32], z1: &mut [f32]| {
            let iv = flow::Interval::Uniform(0.0, 1.0);
            flow::cpu::integrate(&self.shape, pp, u, k, z0, iv, &self.opts, z1, None)
        };
        // Two halves of the tokens on two threads (rows are independent).
        let Some(h) = cpu_split(n_tok, k) else {
            return solve(uu, zz, out);
        };
        let (o0, o1) = out.split_at_mut(h * k);
        std::thread::scope(|sc| {
            let t = sc.spawn(|| solve(&uu[h * w..], &zz[h * k..], o1));
            let a = solve(&uu[..h * w], &zz[..h * k], o0);
            let b = t.join().unwrap_or_else(|_| {
                Err(Error::Invalid("flow_solve_target: worker panicked".into()))
            });
            a.and(b)
        })
    }

    fn backward(
        &self,
        _x: &mut Exec<'_>,
        _ins: &[TensorId],
        _outs: &[TensorId],
        _d_outs: &[TensorId],
        _d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        Ok(()) // stop-gradient
    }
}

/// Where the CPU flow evaluation splits `n_tok` tokens between two threads: None (one thread)
/// for small problems or a single core.
fn cpu_split(n_tok: usize, k: usize) -> Option<usize> {
    const MIN_ROWS: usize = 1024;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores >= 2 && n_tok >= 2 && n_tok * k >= MIN_ROWS).then_some(n_tok / 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::check_launch;

    #[test]
    fn mse_launch_checks_n_against_the_kernels_i32() {
        // The largest n the kernels take: both launches valid, the backward grid covers n.
        let n = i32::MAX as usize;
        let (n32, fwd, bwd) = mse_cuda_launch(n).unwrap();
        assert_eq!(n32, i32::MAX);
        assert!(check_launch("loss_mse_fwd", &fwd).unwrap());
        assert!(check_launch("loss_mse_bwd", &bwd).unwrap());
        assert!(bwd.grid_dim.0 as usize * bwd.block_dim.0 as usize >= n);
        // One more (and far more) is an error, not a negative or wrapped n.
        for n in [1usize << 31, 65536 * 151936] {
            let e = mse_cuda_launch(n).unwrap_err().to_string();
            assert!(e.contains("mse_loss n") && e.contains("i32"), "{e}");
        }
    }
}
