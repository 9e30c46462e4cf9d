//! Graph ops of the Llama/Qwen2 decoder ([`super::decoder`]): each wraps one kernel family's CPU
//! reference (f32; matrix products through [`Real::gemm`], i.e. matrixmultiply, multithreaded)
//! with an explicit forward and backward following the graph's conventions (backward
//! ACCUMULATES into input gradients).
//!
//! Layouts are token-major (`[n][width]`, `n = B·S`), HF weights `[out][in]`. Integer inputs
//! (token ids, positions, sequence lengths, targets) are `U32` tensors.
//!
//! CUDA (bf16 activations and parameters, fp32 gradients of parameters, fp32 statistics): each
//! op follows its kernel family's documented contract; matrix products through cuBLAS GemmEx
//! (bf16 inputs, fp32 compute; parameter gradients accumulated in fp32), glue kernels in
//! `kernels/decoder.cu` ([`gpu`]). The CUDA paths are compiled but NOT yet run on a GPU.

use super::super::graph::{DType, Exec, Op, TensorId};
use crate::error::{check_len, Error, Result};
use crate::kernels::{act, attention, embed, norm, rope, xent, Real};

fn need(t: Option<TensorId>, what: &str) -> Result<TensorId> {
    t.ok_or_else(|| {
        Error::Invalid(format!(
            "{what}: the CUDA path needs this gradient (the decoder graph always has it)"
        ))
    })
}

fn check_t(x: &Exec<'_>, what: &str, t: TensorId, len: usize, dtype: DType) -> Result<()> {
    check_len(what, x.len(t), len)?;
    if x.dtype(t) != dtype {
        return Err(Error::Invalid(format!(
            "{what}: holds {:?}, expected {dtype:?}",
            x.dtype(t)
        )));
    }
    Ok(())
}

/// Token embedding: ins `[ids (U32, n), table (v·d)]`, out `[x (n·d)]`. The CUDA backward
/// first builds its deterministic schedule from `ids` on the device, in its scratch
/// (`embed::cuda::embed_plan_raw`: nothing is uploaded per batch).
pub struct Embed {
    pub n: usize,
    pub v: usize,
    pub d: usize,
}

impl Op for Embed {
    fn name(&self) -> String {
        "embed".into()
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        check_t(x, "embed ids", ins[0], self.n, DType::U32)?;
        if let Some(dev) = x.cuda_device() {
            let (ids, table, out) = (x.ptr(ins[0]), x.ptr(ins[1]), x.ptr(outs[0]));
            // SAFETY: graph tensors of the checked lengths (ids n, table v·d, out n·d).
            return unsafe {
                embed::cuda::embed_fwd_raw(dev, ids, table, self.n, self.v, self.d, out, 0)
            };
        }
        embed::cpu::embed_fwd(
            x.slice::<u32>(ins[0]),
            x.cpu(ins[1]),
            self.v,
            self.d,
            x.cpu_mut(outs[0]),
        )
    }
    fn backward_reads(&self) -> (bool, bool) {
        (true, false)
    }
    fn backward_scratch(&self, _ins: &[usize], _outs: &[usize], cuda: bool) -> usize {
        if cuda {
            // The workspace (first: 16-byte vector access), the plan, the plan builder's scratch.
            embed::cuda::embed_bwd_workspace_len(self.n, self.d)
                + embed::plan_len(self.n)
                + embed::cuda::embed_plan_scratch_len(self.n)
        } else {
            0
        }
    }
    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        _outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        let Some(dt) = d_ins[1] else { return Ok(()) };
        if let Some(dev) = x.cuda_device() {
            check_t(x, "embed ids", ins[0], self.n, DType::U32)?;
            let ws = x.require_scratch("embed")?;
            let wlen = embed::cuda::embed_bwd_workspace_len(self.n, self.d);
            let plen = embed::plan_len(self.n);
            let slen = embed::cuda::embed_plan_scratch_len(self.n);
            check_len("embed scratch", x.len(ws), wlen + plen + slen)?;
            let (ids, dout, dtab, w) = (x.ptr(ins[0]), x.ptr(d_outs[0]), x.ptr(dt), x.ptr(ws));
            let plan = w + 4 * wlen as u64;
            let plan_scratch = plan + 4 * plen as u64;
            // SAFETY: ids n u32, dout n·d bf16, dtable v·d f32; the scratch (4-byte words,
            // checked above) holds the workspace, the plan and the builder's scratch, disjoint.
            return unsafe {
                embed::cuda::embed_plan_raw(dev, ids, self.n, self.v, plan, plan_scratch)?;
                embed::cuda::embed_bwd_raw(dev, plan, dout, self.n, self.v, self.d, dtab, w)
            };
        }
        embed::cpu::embed_bwd(
            x.slice::<u32>(ins[0]),
            x.cpu(d_outs[0]),
            self.v,
            self.d,
            x.cpu_mut(dt),
        )
    }
}

/// RMSNorm: ins `[x (n·d), w (d)]`, outs `[y (n·d), rstd (n)]`.
pub struct RmsNorm {
    pub n: usize,
    pub d: usize,
    pub eps: f32,
}

impl Op for RmsNorm {
    fn name(&self) -> String {
        "rmsnorm".into()
    }
    fn backward_scratch(&self, _ins: &[usize], _outs: &[usize], cuda: bool) -> usize {
        if cuda {
            norm::cuda::rmsnorm_bwd_workspace_len(self.n, self.d)
        } else {
            0
        }
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        if let Some(dev) = x.cuda_device() {
            check_len("rmsnorm x", x.len(ins[0]), self.n * self.d)?;
            check_len("rmsnorm w", x.len(ins[1]), self.d)?;
            let (xx, w, y, r) = (x.ptr(ins[0]), x.ptr(ins[1]), x.ptr(outs[0]), x.ptr(outs[1]));
            // SAFETY: graph tensors of the checked lengths.
            return unsafe {
                norm::cuda::rmsnorm_fwd_raw(dev, xx, w, self.n, self.d, self.eps, y, r)
            };
        }
        norm::cpu::rmsnorm_fwd(
            x.cpu(ins[0]),
            x.cpu(ins[1]),
            self.n,
            self.d,
            self.eps,
            x.cpu_mut(outs[0]),
            x.cpu_mut(outs[1]),
        )
    }
    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        if let Some(dev) = x.cuda_device() {
            let (dx, dw) = (need(d_ins[0], "rmsnorm dx")?, need(d_ins[1], "rmsnorm dw")?);
            let ws = x.require_scratch("rmsnorm")?;
            let (xx, w, r, dy) = (
                x.ptr(ins[0]),
                x.ptr(ins[1]),
                x.ptr(outs[1]),
                x.ptr(d_outs[0]),
            );
            let (dx, dw, ws) = (x.ptr(dx), x.ptr(dw), x.ptr(ws));
            // SAFETY: graph tensors of the forward's lengths; workspace from backward_scratch.
            return unsafe {
                norm::cuda::rmsnorm_bwd_raw(dev, xx, w, r, dy, self.n, self.d, dx, dw, ws)
            };
        }
        let mut dx_tmp;
        let dx: &mut [f32] = match d_ins[0] {
            Some(t) => x.cpu_mut(t),
            None => {
                dx_tmp = vec![0.0; self.n * self.d];
                &mut dx_tmp
            }
        };
        let mut dw_tmp;
        let dw: &mut [f32] = match d_ins[1] {
            Some(t) => x.cpu_mut(t),
            None => {
                dw_tmp = vec![0.0; self.d];
                &mut dw_tmp
            }
        };
        norm::cpu::rmsnorm_bwd(
            x.cpu(ins[0]),
            x.cpu(ins[1]),
            x.cpu(outs[1]),
            x.cpu(d_outs[0]),
            self.n,
            self.d,
            dx,
            dw,
        )
    }
}

/// Fused residual add + RMSNorm: ins `[x (n·d), residual (n·d), w (d)]`, outs
/// `[h = x + residual (n·d), y = rmsnorm(h)·w (n·d), rstd (n)]`. `h` is the next residual.
pub struct AddRmsNorm {
    pub n: usize,
    pub d: usize,
    pub eps: f32,
}

impl Op for AddRmsNorm {
    fn name(&self) -> String {
        "add_rmsnorm".into()
    }
    fn backward_scratch(&self, _ins: &[usize], _outs: &[usize], cuda: bool) -> usize {
        if cuda {
            norm::cuda::rmsnorm_bwd_workspace_len(self.n, self.d)
        } else {
            0
        }
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        if let Some(dev) = x.cuda_device() {
            let nd = self.n * self.d;
            check_len("add_rmsnorm x", x.len(ins[0]), nd)?;
            check_len("add_rmsnorm residual", x.len(ins[1]), nd)?;
            check_len("add_rmsnorm w", x.len(ins[2]), self.d)?;
            let (xx, res, w) = (x.ptr(ins[0]), x.ptr(ins[1]), x.ptr(ins[2]));
            let (h, y, r) = (x.ptr(outs[0]), x.ptr(outs[1]), x.ptr(outs[2]));
            let (n, d, eps) = (self.n, self.d, self.eps);
            // SAFETY: graph tensors of the checked lengths.
            return unsafe { norm::cuda::add_rmsnorm_fwd_raw(dev, xx, res, w, n, d, eps, h, y, r) };
        }
        norm::cpu::add_rmsnorm_fwd(
            x.cpu(ins[0]),
            x.cpu(ins[1]),
            x.cpu(ins[2]),
            self.n,
            self.d,
            self.eps,
            x.cpu_mut(outs[0]),
            x.cpu_mut(outs[1]),
            x.cpu_mut(outs[2]),
        )
    }
    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        if let Some(dev) = x.cuda_device() {
            let dx = need(d_ins[0], "add_rmsnorm dx")?;
            let dres = need(d_ins[1], "add_rmsnorm dres")?;
            let dw = need(d_ins[2], "add_rmsnorm dw")?;
            let ws = x.require_scratch("add_rmsnorm")?;
            let (h, w, r) = (x.ptr(outs[0]), x.ptr(ins[2]), x.ptr(outs[2]));
            let (dh, dy) = (x.ptr(d_outs[0]), x.ptr(d_outs[1]));
            let (dx, dres, dw, ws) = (x.ptr(dx), x.ptr(dres), x.ptr(dw), x.ptr(ws));
            let (n, d) = (self.n, self.d);
            // SAFETY: graph tensors of the forward's lengths; workspace from backward_scratch.
            return unsafe {
                norm::cuda::add_rmsnorm_bwd_raw(dev, h, w, r, dy, dh, n, d, dx, dres, dw, ws)
            };
        }
        let nd = self.n * self.d;
        let (mut t0, mut t1, mut t2);
        let dx: &mut [f32] = match d_ins[0] {
            Some(t) => x.cpu_mut(t),
            None => {
                t0 = vec![0.0; nd];
                &mut t0
            }
        };
        let dres: &mut [f32] = match d_ins[1] {
            Some(t) => x.cpu_mut(t),
            None => {
                t1 = vec![0.0; nd];
                &mut t1
            }
        };
        let dw: &mut [f32] = match d_ins[2] {
            Some(t) => x.cpu_mut(t),
            None => {
                t2 = vec![0.0; self.d];
                &mut t2
            }
        };
        norm::cpu::add_rmsnorm_bwd(
            x.cpu(outs[0]),
            x.cpu(ins[2]),
            x.cpu(outs[2]),
            x.cpu(d_outs[1]),
            Some(x.cpu(d_outs[0])),
            self.n,
            self.d,
            dx,
            dres,
            dw,
        )
    }
}

/// Linear layer `y = x·Wᵀ (+ b)`: ins `[x (n·din), W (dout·din, HF layout), b (dout)?]`, out
/// `[y (n·dout)]`.
pub struct Linear {
    pub n: usize,
    pub din: usize,
    pub dout: usize,
}

impl Op for Linear {
    fn name(&self) -> String {
        format!("linear({}x{})", self.dout, self.din)
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        let (n, k, m) = (self.n, self.din, self.dout);
        check_len("linear x", x.len(ins[0]), n * k)?;
        check_len("linear W", x.len(ins[1]), m * k)?;
        check_len("linear y", x.len(outs[0]), n * m)?;
        if let Some(dev) = x.cuda_device() {
            let (xx, w, y) = (x.ptr(ins[0]), x.ptr(ins[1]), x.ptr(outs[0]));
            let mut beta = 0.0;
            if let Some(&b) = ins.get(2) {
                check_len("linear b", x.len(b), m)?;
                // SAFETY: y n·m, b m (bf16).
                unsafe { gpu::bias_fill(dev, y, x.ptr(b), n, m)? };
                beta = 1.0;
            }
            // SAFETY: graph tensors of the checked lengths.
            return unsafe { gpu::linear_fwd(dev, xx, w, n, k, m, y, m, beta) };
        }
        let y = x.cpu_mut(outs[0]);
        match ins.get(2) {
            Some(&b) => {
                let b = x.cpu(b);
                check_len("linear b", b.len(), m)?;
                for row in y.chunks_exact_mut(m) {
                    row.copy_from_slice(b);
                }
                f32::gemm(
                    n,
                    k,
                    m,
                    1.0,
                    x.cpu(ins[0]),
                    false,
                    x.cpu(ins[1]),
                    true,
                    1.0,
                    y,
                );
            }
            None => f32::gemm(
                n,
                k,
                m,
                1.0,
                x.cpu(ins[0]),
                false,
                x.cpu(ins[1]),
                true,
                0.0,
                y,
            ),
        }
        Ok(())
    }
    fn backward_reads(&self) -> (bool, bool) {
        (true, false)
    }
    fn backward_scratch(&self, ins: &[usize], _outs: &[usize], cuda: bool) -> usize {
        // The bias gradient's row-chunk partials (CUDA).
        if cuda && ins.len() == 3 {
            gpu::bias_grad_workspace_len(self.n, self.dout)
        } else {
            0
        }
    }
    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        _outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        let (n, k, m) = (self.n, self.din, self.dout);
        if let Some(dev) = x.cuda_device() {
            let (xx, w, dy) = (x.ptr(ins[0]), x.ptr(ins[1]), x.ptr(d_outs[0]));
            let dx = d_ins[0].map_or(0, |t| x.ptr(t));
            let dw = d_ins[1].map_or(0, |t| x.ptr(t));
            // SAFETY: graph tensors of the forward's lengths; dW is the f32 parameter gradient.
            unsafe { gpu::linear_bwd(dev, xx, w, dy, m, n, k, m, dx, dw)? };
            if let Some(Some(db)) = d_ins.get(2) {
                let ws = x.require_scratch("linear bias gradient")?;
                // SAFETY: dy n·m bf16, db m f32, the scratch sized by backward_scratch.
                unsafe { gpu::bias_grad_split(dev, dy, x.ptr(*db), x.ptr(ws), n, m)? };
            }
            return Ok(());
        }
        let dy = x.cpu(d_outs[0]);
        if let Some(dx) = d_ins[0] {
            // dx [n][k] += dy [n][m] · W [m][k]
            f32::gemm(
                n,
                m,
                k,
                1.0,
                dy,
                false,
                x.cpu(ins[1]),
                false,
                1.0,
                x.cpu_mut(dx),
            );
        }
        if let Some(dw) = d_ins[1] {
            // dW [m][k] += dyᵀ · x
            f32::gemm(
                m,
                n,
                k,
                1.0,
                dy,
                true,
                x.cpu(ins[0]),
                false,
                1.0,
                x.cpu_mut(dw),
            );
        }
        if let Some(Some(db)) = d_ins.get(2) {
            let db = x.cpu_mut(*db);
            for row in dy.chunks_exact(m) {
                for (o, &g) in db.iter_mut().zip(row) {
                    *o += g;
                }
            }
        }
        Ok(())
    }
}

/// The MLP's gate and up projections into one `[n][2I]` buffer (gate columns first), the layout
/// of [`act`]: ins `[x (n·h), W_gate (I·h), W_up (I·h)]`, out `[gu (n·2I)]`.
pub struct GateUp {
    pub n: usize,
    pub h: usize,
    pub inter: usize,
}

impl Op for GateUp {
    fn name(&self) -> String {
        "gate_up".into()
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        let (n, h, i) = (self.n, self.h, self.inter);
        check_len("gate_up x", x.len(ins[0]), n * h)?;
        check_len("gate_up W_gate", x.len(ins[1]), i * h)?;
        check_len("gate_up W_up", x.len(ins[2]), i * h)?;
        check_len("gate_up gu", x.len(outs[0]), n * 2 * i)?;
        if let Some(dev) = x.cuda_device() {
            let (xx, gu) = (x.ptr(ins[0]), x.ptr(outs[0]));
            for (half, w) in [(0u64, ins[1]), (1, ins[2])] {
                // Gate into columns [0, I), up into [I, 2I) of each 2I-wide row (bf16: 2 bytes).
                let y = gu + half * (i as u64) * 2;
                // SAFETY: graph tensors of the checked lengths; y rows of stride 2I.
                unsafe { gpu::linear_fwd(dev, xx, x.ptr(w), n, h, i, y, 2 * i, 0.0)? };
            }
            return Ok(());
        }
        let xs = x.cpu(ins[0]);
        let mut tmp = vec![0.0f32; n * i];
        let gu = x.cpu_mut(outs[0]);
        for (half, w) in [(0usize, ins[1]), (1, ins[2])] {
            f32::gemm(n, h, i, 1.0, xs, false, x.cpu(w), true, 0.0, &mut tmp);
            for r in 0..n {
                gu[r * 2 * i + half * i..r * 2 * i + (half + 1) * i]
                    .copy_from_slice(&tmp[r * i..(r + 1) * i]);
            }
        }
        Ok(())
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
        let (n, h, i) = (self.n, self.h, self.inter);
        if let Some(dev) = x.cuda_device() {
            let (xx, dgu) = (x.ptr(ins[0]), x.ptr(d_outs[0]));
            let dx = d_ins[0].map_or(0, |t| x.ptr(t));
            for (half, w) in [(0u64, 1usize), (1, 2)] {
                let dy = dgu + half * (i as u64) * 2;
                let dw = d_ins[w].map_or(0, |t| x.ptr(t));
                // SAFETY: as in forward; dx accumulates both halves (beta = 1).
                unsafe { gpu::linear_bwd(dev, xx, x.ptr(ins[w]), dy, 2 * i, n, h, i, dx, dw)? };
            }
            return Ok(());
        }
        let dgu = x.cpu(d_outs[0]);
        let xs = x.cpu(ins[0]);
        let mut tmp = vec![0.0f32; n * i];
        for (half, w) in [(0usize, 1usize), (1, 2)] {
            for r in 0..n {
                tmp[r * i..(r + 1) * i]
                    .copy_from_slice(&dgu[r * 2 * i + half * i..r * 2 * i + (half + 1) * i]);
            }
            if let Some(dx) = d_ins[0] {
                f32::gemm(
                    n,
                    i,
                    h,
                    1.0,
                    &tmp,
                    false,
                    x.cpu(ins[w]),
                    false,
                    1.0,
                    x.cpu_mut(dx),
                );
            }
            if let Some(dw) = d_ins[w] {
                f32::gemm(i, n, h, 1.0, &tmp, true, xs, false, 1.0, x.cpu_mut(dw));
            }
        }
        Ok(())
    }
}

/// SwiGLU: ins `[gu (n·2I)]`, out `[silu(gate)·up (n·I)]`.
pub struct SwiGlu {
    pub n: usize,
    pub inter: usize,
}

impl Op for SwiGlu {
    fn name(&self) -> String {
        "swiglu".into()
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        if let Some(dev) = x.cuda_device() {
            check_len("swiglu gu", x.len(ins[0]), self.n * 2 * self.inter)?;
            check_len("swiglu out", x.len(outs[0]), self.n * self.inter)?;
            let (gu, out) = (x.ptr(ins[0]), x.ptr(outs[0]));
            // SAFETY: graph tensors of the checked lengths.
            return unsafe { act::cuda::swiglu_fwd_raw(dev, gu, self.n, self.inter, out) };
        }
        act::cpu::swiglu_fwd(x.cpu(ins[0]), self.n, self.inter, x.cpu_mut(outs[0]))
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
        let Some(dgu) = d_ins[0] else { return Ok(()) };
        if let Some(dev) = x.cuda_device() {
            let (gu, dout, dgu) = (x.ptr(ins[0]), x.ptr(d_outs[0]), x.ptr(dgu));
            // SAFETY: graph tensors of the forward's lengths.
            return unsafe { act::cuda::swiglu_bwd_raw(dev, gu, dout, self.n, self.inter, dgu) };
        }
        act::cpu::swiglu_bwd(
            x.cpu(ins[0]),
            x.cpu(d_outs[0]),
            self.n,
            self.inter,
            x.cpu_mut(dgu),
        )
    }
}

/// Rotary embedding, out of place: ins `[q (n·hq·D), k (n·hkv·D), pos (U32, n)]`, outs
/// `[q_rot, k_rot]`. The backward rotates copies of `d(q_rot)`, `d(k_rot)` back and adds them.
pub struct Rope {
    pub n: usize,
    pub hq: usize,
    pub hkv: usize,
    pub head_dim: usize,
    pub theta: f32,
}

impl Rope {
    fn pos<'a>(&self, x: &'a Exec<'_>, t: TensorId) -> Result<&'a [i32]> {
        check_t(x, "rope pos", t, self.n, DType::U32)?;
        let p: &[i32] = bytemuck::cast_slice(x.slice::<u32>(t));
        if let Some(i) = p.iter().position(|&v| v < 0) {
            return Err(Error::Invalid(format!(
                "rope pos[{i}] = {} is not a valid position",
                p[i] as u32
            )));
        }
        Ok(p)
    }
}

impl Op for Rope {
    fn name(&self) -> String {
        "rope".into()
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        let (nq, nk) = (
            self.n * self.hq * self.head_dim,
            self.n * self.hkv * self.head_dim,
        );
        if let Some(dev) = x.cuda_device() {
            check_len("rope q", x.len(ins[0]), nq)?;
            check_len("rope k", x.len(ins[1]), nk)?;
            check_t(x, "rope pos", ins[2], self.n, DType::U32)?;
            let (q, k, pos) = (x.ptr(ins[0]), x.ptr(ins[1]), x.ptr(ins[2]));
            let (qr, kr) = (x.ptr(outs[0]), x.ptr(outs[1]));
            let (hq, hkv, hd) = (self.hq, self.hkv, self.head_dim);
            // SAFETY: bf16 tensors of the checked lengths; the copies do not overlap (distinct
            // live tensors); pos holds n i32 (u32 bits, positions < 2^31).
            return unsafe {
                gpu::copy(dev, qr, q, nq * 2)?;
                gpu::copy(dev, kr, k, nk * 2)?;
                rope::cuda::rope_fwd_raw(
                    dev,
                    qr,
                    kr,
                    pos,
                    self.n,
                    hq,
                    hkv,
                    hd,
                    hq * hd,
                    hkv * hd,
                    self.theta,
                )
            };
        }
        let pos = self.pos(x, ins[2])?;
        let (qo, ko) = (x.cpu_mut(outs[0]), x.cpu_mut(outs[1]));
        check_len("rope q", x.len(ins[0]), qo.len())?;
        check_len("rope k", x.len(ins[1]), ko.len())?;
        qo.copy_from_slice(x.cpu(ins[0]));
        ko.copy_from_slice(x.cpu(ins[1]));
        rope::cpu::rope_fwd(
            qo,
            ko,
            pos,
            self.n,
            self.hq,
            self.hkv,
            self.head_dim,
            self.theta,
        )
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
        if let Some(dev) = x.cuda_device() {
            // Rotate d(q_rot), d(k_rot) back IN PLACE (only this backward reads them), then add
            // them into dq, dk.
            let (dqr, dkr, pos) = (x.ptr(d_outs[0]), x.ptr(d_outs[1]), x.ptr(ins[2]));
            let (hq, hkv, hd) = (self.hq, self.hkv, self.head_dim);
            // SAFETY: as in forward.
            unsafe {
                rope::cuda::rope_bwd_raw(
                    dev,
                    dqr,
                    dkr,
                    pos,
                    self.n,
                    hq,
                    hkv,
                    hd,
                    hq * hd,
                    hkv * hd,
                    self.theta,
                )?;
                if let Some(dq) = d_ins[0] {
                    gpu::add_bf16(dev, dqr, x.ptr(dq), self.n * hq * hd)?;
                }
                if let Some(dk) = d_ins[1] {
                    gpu::add_bf16(dev, dkr, x.ptr(dk), self.n * hkv * hd)?;
                }
            }
            return Ok(());
        }
        let pos = self.pos(x, ins[2])?;
        let mut dq = x.cpu(d_outs[0]).to_vec();
        let mut dk = x.cpu(d_outs[1]).to_vec();
        rope::cpu::rope_bwd(
            &mut dq,
            &mut dk,
            pos,
            self.n,
            self.hq,
            self.hkv,
            self.head_dim,
            self.theta,
        )?;
        for (i, g) in [(0usize, dq), (1, dk)] {
            if let Some(t) = d_ins[i] {
                for (o, v) in x.cpu_mut(t).iter_mut().zip(g) {
                    *o += v;
                }
            }
        }
        Ok(())
    }
}

/// Causal GQA attention over right-padded sequences: ins `[q, k, v, seq_lens (U32, B)]`
/// (q `[B][S][Hq][D]`, k/v `[B][S][Hkv][D]`), outs `[out [B][S][Hq][D], lse [B][Hq][S]]`.
pub struct Attention {
    pub b: usize,
    pub s: usize,
    pub hq: usize,
    pub hkv: usize,
    pub head_dim: usize,
}

impl Attention {
    fn scale(&self) -> f32 {
        attention::softmax_scale(self.head_dim)
    }
}

impl Op for Attention {
    fn name(&self) -> String {
        "attention".into()
    }
    fn backward_scratch(&self, _ins: &[usize], _outs: &[usize], cuda: bool) -> usize {
        if cuda {
            attention::cuda::bwd_workspace_len(self.b, self.s, self.hq, self.hkv, self.head_dim)
        } else {
            0
        }
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        check_t(x, "attention seq_lens", ins[3], self.b, DType::U32)?;
        if let Some(dev) = x.cuda_device() {
            let (q, k, v, sl) = (x.ptr(ins[0]), x.ptr(ins[1]), x.ptr(ins[2]), x.ptr(ins[3]));
            let (o, l) = (x.ptr(outs[0]), x.ptr(outs[1]));
            let (b, s, hq, hkv, d) = (self.b, self.s, self.hq, self.hkv, self.head_dim);
            // SAFETY: graph tensors sized by the decoder for (b, s, hq, hkv, d).
            return unsafe {
                attention::cuda::attention_fwd_raw(
                    dev,
                    q,
                    k,
                    v,
                    sl,
                    b,
                    s,
                    hq,
                    hkv,
                    d,
                    self.scale(),
                    o,
                    l,
                )
            };
        }
        attention::cpu::attention_forward(
            x.cpu(ins[0]),
            x.cpu(ins[1]),
            x.cpu(ins[2]),
            x.slice::<u32>(ins[3]),
            self.b,
            self.s,
            self.hq,
            self.hkv,
            self.head_dim,
            self.scale(),
            x.cpu_mut(outs[0]),
            x.cpu_mut(outs[1]),
        )
    }
    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        if let Some(dev) = x.cuda_device() {
            let (dq, dk) = (
                need(d_ins[0], "attention dq")?,
                need(d_ins[1], "attention dk")?,
            );
            let dv = need(d_ins[2], "attention dv")?;
            let ws = x.require_scratch("attention")?;
            let (q, k, v, sl) = (x.ptr(ins[0]), x.ptr(ins[1]), x.ptr(ins[2]), x.ptr(ins[3]));
            let (o, l, dout) = (x.ptr(outs[0]), x.ptr(outs[1]), x.ptr(d_outs[0]));
            let (dq, dk, dv, ws) = (x.ptr(dq), x.ptr(dk), x.ptr(dv), x.ptr(ws));
            let (b, s, hq, hkv, d) = (self.b, self.s, self.hq, self.hkv, self.head_dim);
            // SAFETY: as in forward; workspace from backward_scratch.
            return unsafe {
                attention::cuda::attention_bwd_raw(
                    dev,
                    q,
                    k,
                    v,
                    o,
                    l,
                    dout,
                    sl,
                    b,
                    s,
                    hq,
                    hkv,
                    d,
                    self.scale(),
                    dq,
                    dk,
                    dv,
                    ws,
                )
            };
        }
        let (mut t0, mut t1, mut t2);
        let dq: &mut [f32] = match d_ins[0] {
            Some(g) => x.cpu_mut(g),
            None => {
                t0 = vec![0.0; x.len(ins[0])];
                &mut t0
            }
        };
        let dk: &mut [f32] = match d_ins[1] {
            Some(g) => x.cpu_mut(g),
            None => {
                t1 = vec![0.0; x.len(ins[1])];
                &mut t1
            }
        };
        let dv: &mut [f32] = match d_ins[2] {
            Some(g) => x.cpu_mut(g),
            None => {
                t2 = vec![0.0; x.len(ins[2])];
                &mut t2
            }
        };
        attention::cpu::attention_backward(
            x.cpu(ins[0]),
            x.cpu(ins[1]),
            x.cpu(ins[2]),
            x.cpu(outs[0]),
            x.cpu(outs[1]),
            x.cpu(d_outs[0]),
            x.slice::<u32>(ins[3]),
            self.b,
            self.s,
            self.hq,
            self.hkv,
            self.head_dim,
            self.scale(),
            dq,
            dk,
            dv,
        )
    }
}

/// Per-token log-prob of the target token (at `temperature`) through the fused xent: ins
/// `[logits (n·V), targets (U32, n; [`xent::IGNORE_INDEX`] = no target, log-prob 0)]`, outs
/// `[logprob (n), lse (n), entropy (n)]`.
pub struct TokenLogprob {
    pub n: usize,
    pub v: usize,
    /// Softmax temperature (1: the model's distribution; a sampler's temperature makes the
    /// log-probs those of the tempered sampling distribution).
    pub temperature: f32,
}

impl Op for TokenLogprob {
    fn name(&self) -> String {
        "token_logprob".into()
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        check_t(x, "token_logprob targets", ins[1], self.n, DType::U32)?;
        if let Some(dev) = x.cuda_device() {
            check_len("token_logprob logits", x.len(ins[0]), self.n * self.v)?;
            let (z, t) = (x.ptr(ins[0]), x.ptr(ins[1]));
            let (lp, lse, ent) = (x.ptr(outs[0]), x.ptr(outs[1]), x.ptr(outs[2]));
            // SAFETY: logits n·V bf16, targets n u32, outputs n f32.
            return unsafe {
                xent::cuda::forward_raw(dev, z, t, self.n, self.v, self.temperature, lp, lse, ent)
            };
        }
        xent::cpu::forward(
            x.cpu(ins[0]),
            x.slice::<u32>(ins[1]),
            self.n,
            self.v,
            self.temperature,
            x.cpu_mut(outs[0]),
            x.cpu_mut(outs[1]),
            x.cpu_mut(outs[2]),
        )
    }
    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        let Some(dz) = d_ins[0] else { return Ok(()) };
        if let Some(dev) = x.cuda_device() {
            let (z, t) = (x.ptr(ins[0]), x.ptr(ins[1]));
            let (lse, ent) = (x.ptr(outs[1]), x.ptr(outs[2]));
            let (dlp, dent, dz) = (x.ptr(d_outs[0]), x.ptr(d_outs[2]), x.ptr(dz));
            let (n, v) = (self.n, self.v);
            // SAFETY: as in forward; d_logits n·V bf16.
            return unsafe {
                xent::cuda::backward_raw(dev, z, t, n, v, self.temperature, lse, ent, dlp, dent, dz)
            };
        }
        xent::cpu::backward(
            x.cpu(ins[0]),
            x.slice::<u32>(ins[1]),
            self.n,
            self.v,
            self.temperature,
            x.cpu(outs[1]),
            x.cpu(outs[2]),
            Some(x.cpu(d_outs[0])),
            Some(x.cpu(d_outs[2])),
            x.cpu_mut(dz),
        )
    }
}

/// Mean negative log-likelihood over the tokens that have a target: ins
/// `[logprob (n), targets (U32, n)]`, out `[loss (1)] = −Σ_{t valid} logprob_t / #valid`
/// (0 when no token has a target).
pub struct MeanNll {
    pub n: usize,
}

fn valid_count(t: &[u32]) -> usize {
    t.iter().filter(|&&v| v != xent::IGNORE_INDEX).count()
}

impl Op for MeanNll {
    fn name(&self) -> String {
        "mean_nll".into()
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        check_len("mean_nll logprob", x.len(ins[0]), self.n)?;
        check_t(x, "mean_nll targets", ins[1], self.n, DType::U32)?;
        if let Some(dev) = x.cuda_device() {
            let (lp, t, l) = (x.ptr(ins[0]), x.ptr(ins[1]), x.ptr(outs[0]));
            // SAFETY: lp n f32, targets n u32, loss 1 f32.
            return unsafe { gpu::nll_fwd(dev, lp, t, self.n, l) };
        }
        let t = x.slice::<u32>(ins[1]);
        let c = valid_count(t);
        let s: f64 = x
            .cpu(ins[0])
            .iter()
            .zip(t)
            .filter(|(_, &t)| t != xent::IGNORE_INDEX)
            .map(|(&l, _)| l as f64)
            .sum();
        x.cpu_mut(outs[0])[0] = if c == 0 { 0.0 } else { (-s / c as f64) as f32 };
        Ok(())
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
        let Some(dl) = d_ins[0] else { return Ok(()) };
        if let Some(dev) = x.cuda_device() {
            let (t, dloss, dl) = (x.ptr(ins[1]), x.ptr(d_outs[0]), x.ptr(dl));
            // SAFETY: as in forward.
            return unsafe { gpu::nll_bwd(dev, t, self.n, dloss, dl) };
        }
        let t = x.slice::<u32>(ins[1]);
        let c = valid_count(t);
        if c == 0 {
            return Ok(());
        }
        let g = -x.cpu(d_outs[0])[0] / c as f32;
        for (o, &tt) in x.cpu_mut(dl).iter_mut().zip(t) {
            if tt != xent::IGNORE_INDEX {
                *o += g;
            }
        }
        Ok(())
    }
}

/// CUDA helpers of the decoder ops: cuBLAS GEMMs (bf16 in, fp32 compute) and the small glue
/// kernels of `kernels/decoder.cu`. Row-major matrices are passed to column-major cuBLAS as
/// their transposes (see each caller).
pub mod gpu {
    use cudarc::cublas::{result as blas_result, sys};
    use cudarc::driver::{LaunchConfig, PushKernelArg};

    use crate::device::{blocks_for, CudaDevice};
    use crate::error::{Error, Result};

    const FAMILY: &str = "decoder";

    fn int(what: &str, x: usize) -> Result<i32> {
        i32::try_from(x).map_err(|_| Error::Shape(format!("{what} = {x} exceeds i32::MAX")))
    }

    /// Column-major `C = op(A)·op(B) + beta·C` (m×n, inner k) with bf16 A, B, fp32 compute and
    /// C bf16 (`c_f32 = false`) or fp32.
    ///
    /// # Safety
    /// The pointers are device buffers of the sizes the dims and leading dimensions imply.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        dev: &CudaDevice,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        beta: f32,
        c: u64,
        ldc: usize,
        c_f32: bool,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        // Binds the context to this thread (cuBLAS calls are raw calls).
        let h = dev.blas()?;
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let alpha = 1.0f32;
        let bf = sys::cudaDataType::CUDA_R_16BF;
        let ct = if c_f32 {
            sys::cudaDataType::CUDA_R_32F
        } else {
            bf
        };
        blas_result::gemm_ex(
            *h.handle(),
            op(ta),
            op(tb),
            int("gemm m", m)?,
            int("gemm n", n)?,
            int("gemm k", k)?,
            &alpha as *const f32 as *const _,
            a as *const _,
            bf,
            int("gemm lda", lda)?,
            b as *const _,
            bf,
            int("gemm ldb", ldb)?,
            &beta as *const f32 as *const _,
            c as *mut _,
            ct,
            int("gemm ldc", ldc)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(|e| Error::Cuda(format!("cublasGemmEx {m}x{n}x{k}: {e:?}")))
    }

    /// Row-major `y[n][dout] (+)= x[n][din]·Wᵀ` (W `[dout][din]`), y with row stride `ldy`.
    ///
    /// # Safety
    /// As [`gemm`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn linear_fwd(
        dev: &CudaDevice,
        x: u64,
        w: u64,
        n: usize,
        din: usize,
        dout: usize,
        y: u64,
        ldy: usize,
        beta: f32,
    ) -> Result<()> {
        // yᵀ (dout×n) = W (dout×din: stored as din×dout col-major, op T) · xᵀ (din×n).
        gemm(
            dev, true, false, dout, n, din, w, din, x, din, beta, y, ldy, false,
        )
    }

    /// Backward of [`linear_fwd`]: `dx += dy·W` (bf16) when `dx != 0`, `dW += dyᵀ·x` (fp32)
    /// when `dw != 0`; dy has row stride `lddy`.
    ///
    /// # Safety
    /// As [`gemm`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn linear_bwd(
        dev: &CudaDevice,
        x: u64,
        w: u64,
        dy: u64,
        lddy: usize,
        n: usize,
        din: usize,
        dout: usize,
        dx: u64,
        dw: u64,
    ) -> Result<()> {
        if dx != 0 {
            // dxᵀ (din×n) = Wᵀ (din×dout, stored col-major as is) · dyᵀ (dout×n).
            gemm(
                dev, false, false, din, n, dout, w, din, dy, lddy, 1.0, dx, din, false,
            )?;
        }
        if dw != 0 {
            // dWᵀ (din×dout) = xᵀ (din×n) · dy (n×dout: dyᵀ stored, op T).
            gemm(
                dev, false, true, din, dout, n, x, din, dy, lddy, 1.0, dw, din, true,
            )?;
        }
        Ok(())
    }

    fn grid(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks_for(n, 256).clamp(1, 65536), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `y[r][c] = b[c]` for `n` rows of `m` (bf16).
    ///
    /// # Safety
    /// Device buffers of `n·m` and `m` bf16.
    pub unsafe fn bias_fill(dev: &CudaDevice, y: u64, b: u64, n: usize, m: usize) -> Result<()> {
        let f = dev.function(FAMILY, "decoder_bias_fill")?;
        let (nn, mm) = (n as i64, int("bias m", m)?);
        let mut l = dev.launch_builder(&f);
        l.arg(&y).arg(&b).arg(&nn).arg(&mm);
        dev.launch("decoder_bias_fill", l, grid(n * m))
    }

    /// Row chunks of [`bias_grad_split`] for `n` rows: about 128 rows each, at most 64
    /// (depends on `n` only, so the sums are the same on every GPU).
    pub fn bias_grad_chunks(n: usize) -> usize {
        n.div_ceil(128).clamp(1, 64)
    }

    /// f32 workspace of [`bias_grad_split`].
    pub fn bias_grad_workspace_len(n: usize, m: usize) -> usize {
        bias_grad_chunks(n) * m
    }

    /// `db[c] += Σ_r dy[r][c]` (dy bf16 `[n][m]`, db fp32), with the rows split over
    /// [`bias_grad_chunks`] blocks per 32 columns and an ordered finalize: a narrow bias (the
    /// k/v biases, 128 columns: 4 blocks) no longer leaves the card idle. `ws` holds
    /// [`bias_grad_workspace_len`] f32.
    ///
    /// # Safety
    /// Device buffers of `n·m` bf16, `m` f32 and the workspace, not overlapping.
    pub unsafe fn bias_grad_split(
        dev: &CudaDevice,
        dy: u64,
        db: u64,
        ws: u64,
        n: usize,
        m: usize,
    ) -> Result<()> {
        let chunks = bias_grad_chunks(n);
        let rpc = int("bias rows per chunk", n.div_ceil(chunks))?;
        let (nn, mm, ch) = (int("bias n", n)?, int("bias m", m)?, chunks as i32);
        let f = dev.function(FAMILY, "decoder_bias_grad_partial")?;
        let mut l = dev.launch_builder(&f);
        l.arg(&dy).arg(&ws).arg(&nn).arg(&mm).arg(&rpc);
        let cfg = LaunchConfig {
            grid_dim: (m.div_ceil(32).max(1) as u32, chunks as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("decoder_bias_grad_partial", l, cfg)?;
        let f = dev.function(FAMILY, "decoder_bias_grad_finalize")?;
        let mut l = dev.launch_builder(&f);
        l.arg(&ws).arg(&ch).arg(&mm).arg(&db);
        let cfg = LaunchConfig {
            grid_dim: (m.div_ceil(128).max(1) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("decoder_bias_grad_finalize", l, cfg)
    }

    /// `y = float(x)` for `n` bf16 values.
    ///
    /// # Safety
    /// Device buffers of `n` bf16 and `n` f32.
    pub unsafe fn cast_bf16_f32(dev: &CudaDevice, x: u64, y: u64, n: usize) -> Result<()> {
        let f = dev.function(FAMILY, "decoder_cast_bf16_f32")?;
        let nn = n as i64;
        let mut l = dev.launch_builder(&f);
        l.arg(&x).arg(&y).arg(&nn);
        dev.launch("decoder_cast_bf16_f32", l, grid(n))
    }

    /// `dx = bf16(float(dx) + dy)` for `n` values (the cast's gradient, rounded once).
    ///
    /// # Safety
    /// Device buffers of `n` f32 and `n` bf16.
    pub unsafe fn acc_f32_bf16(dev: &CudaDevice, dy: u64, dx: u64, n: usize) -> Result<()> {
        let f = dev.function(FAMILY, "decoder_acc_f32_bf16")?;
        let nn = n as i64;
        let mut l = dev.launch_builder(&f);
        l.arg(&dy).arg(&dx).arg(&nn);
        dev.launch("decoder_acc_f32_bf16", l, grid(n))
    }

    /// `y[i] = x[rows[i]]` (rows of `w` f32; `rows` f32 indices into `n` rows, −1 = a zero
    /// row) for `m` output rows; `scatter`: the backward `dx[rows[i]] += dy[i]` instead (the
    /// rows must be distinct). `a` is x (gather) or dy (scatter), `b` y or dx.
    ///
    /// # Safety
    /// Device buffers of `n·w` f32 (x / dx), `m` f32 (rows) and `m·w` f32 (y / dy).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows(
        dev: &CudaDevice,
        scatter: bool,
        a: u64,
        rows: u64,
        b: u64,
        n: usize,
        m: usize,
        w: usize,
    ) -> Result<()> {
        let name = if scatter {
            "decoder_scatter_rows"
        } else {
            "decoder_gather_rows"
        };
        let f = dev.function(FAMILY, name)?;
        let (nn, mm, ww) = (int("rows n", n)?, int("rows m", m)?, int("rows w", w)?);
        let mut l = dev.launch_builder(&f);
        l.arg(&a).arg(&rows).arg(&b).arg(&nn).arg(&mm).arg(&ww);
        dev.launch(name, l, grid(m * w))
    }

    /// `y += x` elementwise (bf16, rounded once).
    ///
    /// # Safety
    /// Device buffers of `n` bf16.
    pub unsafe fn add_bf16(dev: &CudaDevice, x: u64, y: u64, n: usize) -> Result<()> {
        let f = dev.function(FAMILY, "decoder_add_bf16")?;
        let nn = n as i64;
        let mut l = dev.launch_builder(&f);
        l.arg(&x).arg(&y).arg(&nn);
        dev.launch("decoder_add_bf16", l, grid(n))
    }

    /// Mean NLL forward (see `decoder.cu`).
    ///
    /// # Safety
    /// `lp` f32 `[n]`, `tg` u32 `[n]`, `loss` f32 `[1]`.
    pub unsafe fn nll_fwd(dev: &CudaDevice, lp: u64, tg: u64, n: usize, loss: u64) -> Result<()> {
        let f = dev.function(FAMILY, "decoder_nll_fwd")?;
        let nn = int("nll n", n)?;
        let mut l = dev.launch_builder(&f);
        l.arg(&lp).arg(&tg).arg(&nn).arg(&loss);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("decoder_nll_fwd", l, cfg)
    }

    /// Mean NLL backward (see `decoder.cu`).
    ///
    /// # Safety
    /// `tg` u32 `[n]`, `dloss` f32 `[1]`, `dlp` f32 `[n]`.
    pub unsafe fn nll_bwd(dev: &CudaDevice, tg: u64, n: usize, dloss: u64, dlp: u64) -> Result<()> {
        let f = dev.function(FAMILY, "decoder_nll_bwd")?;
        let nn = int("nll n", n)?;
        let mut l = dev.launch_builder(&f);
        l.arg(&tg).arg(&nn).arg(&dloss).arg(&dlp);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("decoder_nll_bwd", l, cfg)
    }

    /// Device-to-device copy of `bytes` on the device's stream.
    ///
    /// # Safety
    /// Both are device buffers of at least `bytes`, not overlapping.
    pub unsafe fn copy(dev: &CudaDevice, dst: u64, src: u64, bytes: usize) -> Result<()> {
        dev.make_current()?;
        cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, dev.stream().cu_stream())?;
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::grid;
        use crate::device::check_launch;

        #[test]
        fn elementwise_grid_at_the_logits_size() {
            // 64 x 1024 tokens x 151936 logits: 9.96e9 elements; the grid-stride kernels take n
            // as i64 and index in i64, so a capped grid covers it.
            let n = 64 * 1024 * 151_936usize;
            let c = grid(n);
            assert_eq!(c.grid_dim, (65536, 1, 1));
            assert!(check_launch("decoder_add_bf16", &c).unwrap());
            assert_eq!(grid(0).grid_dim, (1, 1, 1));
        }
    }
}
