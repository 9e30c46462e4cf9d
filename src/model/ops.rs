//! Graph ops of the Llama/Qwen2 decoder ([`super::decoder`]): each wraps one kernel family's CPU
//! reference (f32; matrix products through [`Real::gemm`], i.e. matrixmultiply, multithreaded)
//! with an explicit forward and backward following the graph's conventions (backward
//! ACCUMULATES into input gradients).
//!
//! Layouts are token-major (`[n][width]`, `n = B·S`), HF weights `[out][in]`. Integer inputs
//! (token ids, positions, sequence lengths, targets) are `U32` tensors.
//!
//! CUDA: these ops currently have CPU paths only; on a CUDA session each returns an
//! `Error::Invalid` saying so (see the module [`super::decoder`] docs and the report of issue 3).

use super::super::graph::{DType, Exec, Op, TensorId};
use crate::error::{check_len, Error, Result};
use crate::kernels::{act, attention, embed, norm, rope, xent, Real};

fn no_cuda(x: &Exec<'_>, op: &str) -> Result<()> {
    if x.cuda_device().is_some() {
        return Err(Error::Invalid(format!(
            "{op}: the CUDA path of this decoder op is not implemented yet"
        )));
    }
    Ok(())
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

/// Token embedding: ins `[ids (U32, n), table (v·d)]`, out `[x (n·d)]`.
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
        no_cuda(x, "embed")?;
        check_t(x, "embed ids", ins[0], self.n, DType::U32)?;
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
    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        _outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        no_cuda(x, "embed")?;
        let Some(dt) = d_ins[1] else { return Ok(()) };
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
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        no_cuda(x, "rmsnorm")?;
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
        no_cuda(x, "rmsnorm")?;
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
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        no_cuda(x, "add_rmsnorm")?;
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
        no_cuda(x, "add_rmsnorm")?;
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
        no_cuda(x, "linear")?;
        let (n, k, m) = (self.n, self.din, self.dout);
        check_len("linear x", x.len(ins[0]), n * k)?;
        check_len("linear W", x.len(ins[1]), m * k)?;
        check_len("linear y", x.len(outs[0]), n * m)?;
        let y = x.cpu_mut(outs[0]);
        match ins.get(2) {
            Some(&b) => {
                let b = x.cpu(b);
                check_len("linear b", b.len(), m)?;
                for row in y.chunks_exact_mut(m) {
                    row.copy_from_slice(b);
                }
                f32::gemm(n, k, m, 1.0, x.cpu(ins[0]), false, x.cpu(ins[1]), true, 1.0, y);
            }
            None => f32::gemm(n, k, m, 1.0, x.cpu(ins[0]), false, x.cpu(ins[1]), true, 0.0, y),
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
        no_cuda(x, "linear")?;
        let (n, k, m) = (self.n, self.din, self.dout);
        let dy = x.cpu(d_outs[0]);
        if let Some(dx) = d_ins[0] {
            // dx [n][k] += dy [n][m] · W [m][k]
            f32::gemm(n, m, k, 1.0, dy, false, x.cpu(ins[1]), false, 1.0, x.cpu_mut(dx));
        }
        if let Some(dw) = d_ins[1] {
            // dW [m][k] += dyᵀ · x
            f32::gemm(m, n, k, 1.0, dy, true, x.cpu(ins[0]), false, 1.0, x.cpu_mut(dw));
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
        no_cuda(x, "gate_up")?;
        let (n, h, i) = (self.n, self.h, self.inter);
        check_len("gate_up x", x.len(ins[0]), n * h)?;
        check_len("gate_up W_gate", x.len(ins[1]), i * h)?;
        check_len("gate_up W_up", x.len(ins[2]), i * h)?;
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
        no_cuda(x, "gate_up")?;
        let (n, h, i) = (self.n, self.h, self.inter);
        let dgu = x.cpu(d_outs[0]);
        let xs = x.cpu(ins[0]);
        let mut tmp = vec![0.0f32; n * i];
        for (half, w) in [(0usize, 1usize), (1, 2)] {
            for r in 0..n {
                tmp[r * i..(r + 1) * i]
                    .copy_from_slice(&dgu[r * 2 * i + half * i..r * 2 * i + (half + 1) * i]);
            }
            if let Some(dx) = d_ins[0] {
                f32::gemm(n, i, h, 1.0, &tmp, false, x.cpu(ins[w]), false, 1.0, x.cpu_mut(dx));
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
        no_cuda(x, "swiglu")?;
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
        no_cuda(x, "swiglu")?;
        let Some(dgu) = d_ins[0] else { return Ok(()) };
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
        no_cuda(x, "rope")?;
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
        no_cuda(x, "rope")?;
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
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        no_cuda(x, "attention")?;
        check_t(x, "attention seq_lens", ins[3], self.b, DType::U32)?;
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
        no_cuda(x, "attention")?;
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

/// Per-token log-prob of the target token (temperature 1) through the fused xent: ins
/// `[logits (n·V), targets (U32, n; [`xent::IGNORE_INDEX`] = no target, log-prob 0)]`, outs
/// `[logprob (n), lse (n), entropy (n)]`.
pub struct TokenLogprob {
    pub n: usize,
    pub v: usize,
}

impl Op for TokenLogprob {
    fn name(&self) -> String {
        "token_logprob".into()
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        no_cuda(x, "token_logprob")?;
        check_t(x, "token_logprob targets", ins[1], self.n, DType::U32)?;
        xent::cpu::forward(
            x.cpu(ins[0]),
            x.slice::<u32>(ins[1]),
            self.n,
            self.v,
            1.0,
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
        no_cuda(x, "token_logprob")?;
        let Some(dz) = d_ins[0] else { return Ok(()) };
        xent::cpu::backward(
            x.cpu(ins[0]),
            x.slice::<u32>(ins[1]),
            self.n,
            self.v,
            1.0,
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
        no_cuda(x, "mean_nll")?;
        check_len("mean_nll logprob", x.len(ins[0]), self.n)?;
        check_t(x, "mean_nll targets", ins[1], self.n, DType::U32)?;
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
        no_cuda(x, "mean_nll")?;
        let Some(dl) = d_ins[0] else { return Ok(()) };
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
