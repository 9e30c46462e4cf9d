//! The chunked LM head fused with the cross-entropy: per-token log-prob, log-sum-exp and entropy
//! of `softmax(a·Wᵀ / T)` without ever forming the full `[n][V]` logits.
//!
//! At a Qwen2-0.5B-shape step (65536 tokens × 151936 vocabulary) the logits are 1e10 values:
//! 20 GB in bf16, the same again for their gradient, and one GEMM past 2^31 elements. The
//! [`LmHeadXent`] op instead walks the tokens in chunks of `chunk` rows through ONE scratch
//! region the planner gives each step ([`crate::graph::Op::forward_scratch`] /
//! [`crate::graph::Op::backward_scratch`]), sized by [`LmHeadXent::chunk_rows`] to a byte budget
//! ([`DEFAULT_HEAD_SCRATCH_BYTES`]):
//!
//! ```text
//! forward, per chunk c:   Z = a[c]·Wᵀ (scratch);  (logprob, lse, entropy)[c] = xent(Z)
//! backward, per chunk c:  Z = a[c]·Wᵀ again;  dZ = ∂(g_lp·logprob + g_H·entropy)/∂Z
//!                         da[c] += dZ·W;  dW += dZᵀ·a[c]      (chunks in order: deterministic)
//! ```
//! The xent math is [`crate::kernels::xent`]'s (CPU reference on each chunk; on CUDA `xent_fwd`
//! and `xent_bwd_inplace`, which writes dZ over Z so a chunk needs one bf16 buffer), the GEMMs
//! the decoder's ([`super::ops::gpu`] on CUDA: bf16 operands, fp32 compute, dW accumulated in
//! fp32). The head costs one GEMM more than the unfused `Linear` + `TokenLogprob` (the backward
//! recomputes Z): 4·n·V·h multiply-adds instead of 3.
//!
//! The unfused path stays for graphs that must expose the logits ([`super::decoder::LmHeadMode`]).

use crate::error::{check_len, Error, Result};
use crate::graph::{DType, Exec, Op, TensorId};
use crate::kernels::{xent, Real};

use super::ops::gpu;

/// Default scratch budget of one chunk of the head: 256 MiB.
pub const DEFAULT_HEAD_SCRATCH_BYTES: usize = 256 << 20;

/// The chunked LM head + cross-entropy: ins `[a (n·h), W (v·h, HF layout; tied or not),
/// targets (U32, n)]`, outs `[logprob (n), lse (n), entropy (n)]` (f32), as
/// `Linear{n, h, v}` followed by [`super::ops::TokenLogprob`] (same definitions, same
/// temperature handling; the lse output gets no gradient).
pub struct LmHeadXent {
    pub n: usize,
    pub h: usize,
    pub v: usize,
    pub temperature: f32,
    /// Token rows per chunk (>= 1; a value >= n is one chunk).
    pub chunk: usize,
}

impl LmHeadXent {
    /// Bytes of scratch one row of a chunk takes: on CUDA one bf16 row (the backward writes the
    /// gradient over the logits), on the CPU two f32 rows (logits and their gradient).
    pub fn row_bytes(v: usize, cuda: bool) -> usize {
        if cuda {
            2 * v
        } else {
            8 * v
        }
    }

    /// Rows per chunk so that one chunk's scratch fits `scratch_bytes`: at least 1, at most `n`,
    /// rounded down to a multiple of 64 when above 128 (GEMM-friendly; the last chunk takes the
    /// rest).
    pub fn chunk_rows(n: usize, v: usize, cuda: bool, scratch_bytes: usize) -> usize {
        let mut rows = (scratch_bytes / Self::row_bytes(v, cuda).max(1)).max(1);
        if rows > 128 {
            rows -= rows % 64;
        }
        rows.min(n.max(1))
    }

    fn rows(&self) -> usize {
        self.chunk.clamp(1, self.n.max(1))
    }

    /// Scratch (f32 elements) of either step.
    fn scratch_len(&self, cuda: bool) -> usize {
        (self.rows() * Self::row_bytes(self.v, cuda)).div_ceil(4)
    }

    /// The chunks: (first row, rows).
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let c = self.rows();
        (0..self.n)
            .step_by(c)
            .map(move |r0| (r0, c.min(self.n - r0)))
    }

    fn check(&self, x: &Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<TensorId> {
        let (n, h, v) = (self.n, self.h, self.v);
        if v == 0 || h == 0 {
            return Err(Error::Invalid(format!(
                "lm_head_xent: h = {h}, v = {v}: both must be > 0"
            )));
        }
        check_len("lm_head_xent a", x.len(ins[0]), n * h)?;
        check_len("lm_head_xent W", x.len(ins[1]), v * h)?;
        check_len("lm_head_xent targets", x.len(ins[2]), n)?;
        if x.dtype(ins[2]) != DType::U32 {
            return Err(Error::Invalid("lm_head_xent targets: must be U32".into()));
        }
        for (what, &t) in ["logprob", "lse", "entropy"].iter().zip(outs) {
            check_len(&format!("lm_head_xent {what}"), x.len(t), n)?;
        }
        let sc = x.require_scratch("lm_head_xent")?;
        let need = self.scratch_len(x.cuda_device().is_some());
        if x.len(sc) < need {
            return Err(Error::Invalid(format!(
                "lm_head_xent: scratch of {} f32, a chunk needs {need}",
                x.len(sc)
            )));
        }
        Ok(sc)
    }
}

fn at(e: Error, r0: usize, c: usize) -> Error {
    Error::Invalid(format!("lm_head_xent rows {r0}..{}: {e}", r0 + c))
}

impl Op for LmHeadXent {
    fn name(&self) -> String {
        format!("lm_head_xent({}x{}, chunk {})", self.v, self.h, self.rows())
    }

    fn forward_scratch(&self, _ins: &[usize], _outs: &[usize], cuda: bool) -> usize {
        self.scratch_len(cuda)
    }

    fn backward_scratch(&self, _ins: &[usize], _outs: &[usize], cuda: bool) -> usize {
        self.scratch_len(cuda)
    }

    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        let sc = self.check(x, ins, outs)?;
        let (h, v, temp) = (self.h, self.v, self.temperature);
        if let Some(dev) = x.cuda_device() {
            let (a, w, tg, z) = (x.ptr(ins[0]), x.ptr(ins[1]), x.ptr(ins[2]), x.ptr(sc));
            let (lp, lse, ent) = (x.ptr(outs[0]), x.ptr(outs[1]), x.ptr(outs[2]));
            for (r0, c) in self.chunks() {
                let (ra, rf) = ((r0 * h * 2) as u64, (r0 * 4) as u64);
                // SAFETY: a n·h bf16, W v·h bf16, the scratch holds c·v bf16 (checked), the
                // per-row tensors n elements of 4 bytes; row offsets stay inside them.
                unsafe {
                    gpu::linear_fwd(dev, a + ra, w, c, h, v, z, v, 0.0)?;
                    xent::cuda::forward_raw(
                        dev,
                        z,
                        tg + rf,
                        c,
                        v,
                        temp,
                        lp + rf,
                        lse + rf,
                        ent + rf,
                    )?;
                }
            }
            return Ok(());
        }
        let (a, w, tg) = (x.cpu(ins[0]), x.cpu(ins[1]), x.slice::<u32>(ins[2]));
        let (lp, lse, ent) = (x.cpu_mut(outs[0]), x.cpu_mut(outs[1]), x.cpu_mut(outs[2]));
        let z = x.cpu_mut(sc);
        for (r0, c) in self.chunks() {
            let (z, r) = (&mut z[..c * v], r0..r0 + c);
            f32::gemm(c, h, v, 1.0, &a[r0 * h..], false, w, true, 0.0, z);
            xent::cpu::forward(
                z,
                &tg[r.clone()],
                c,
                v,
                temp,
                &mut lp[r.clone()],
                &mut lse[r.clone()],
                &mut ent[r],
            )
            .map_err(|e| at(e, r0, c))?;
        }
        Ok(())
    }

    fn backward_reads(&self) -> (bool, bool) {
        (true, true) // a, W, targets; lse and entropy
    }

    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        if d_ins[2].is_some() {
            return Err(Error::Invalid(
                "lm_head_xent: targets get no gradient".into(),
            ));
        }
        let (da, dw) = (d_ins[0], d_ins[1]);
        if da.is_none() && dw.is_none() {
            return Ok(());
        }
        let sc = self.check(x, ins, outs)?;
        let (h, v, temp) = (self.h, self.v, self.temperature);
        if let Some(dev) = x.cuda_device() {
            let (a, w, tg, z) = (x.ptr(ins[0]), x.ptr(ins[1]), x.ptr(ins[2]), x.ptr(sc));
            let (lse, ent) = (x.ptr(outs[1]), x.ptr(outs[2]));
            let (dlp, dent) = (x.ptr(d_outs[0]), x.ptr(d_outs[2]));
            let da = da.map_or(0, |t| x.ptr(t));
            let dw = dw.map_or(0, |t| x.ptr(t));
            for (r0, c) in self.chunks() {
                let (ra, rf) = ((r0 * h * 2) as u64, (r0 * 4) as u64);
                let da_c = if da == 0 { 0 } else { da + ra };
                // SAFETY: as in forward; da n·h bf16, dW v·h f32 (the parameter's gradient).
                unsafe {
                    gpu::linear_fwd(dev, a + ra, w, c, h, v, z, v, 0.0)?;
                    xent::cuda::backward_inplace_raw(
                        dev,
                        z,
                        tg + rf,
                        c,
                        v,
                        temp,
                        lse + rf,
                        ent + rf,
                        dlp + rf,
                        dent + rf,
                    )?;
                    gpu::linear_bwd(dev, a + ra, w, z, v, c, h, v, da_c, dw)?;
                }
            }
            return Ok(());
        }
        let (a, w, tg) = (x.cpu(ins[0]), x.cpu(ins[1]), x.slice::<u32>(ins[2]));
        let (lse, ent) = (x.cpu(outs[1]), x.cpu(outs[2]));
        let (dlp, dent) = (x.cpu(d_outs[0]), x.cpu(d_outs[2]));
        let mut da = da.map(|t| x.cpu_mut(t));
        let mut dw = dw.map(|t| x.cpu_mut(t));
        let sc = x.cpu_mut(sc);
        let rows = self.rows();
        let (z, dz) = sc.split_at_mut(rows * v);
        for (r0, c) in self.chunks() {
            let r = r0..r0 + c;
            // A chunk with no upstream gradient (padding, prompts) adds nothing: skip its GEMMs.
            let live = r
                .clone()
                .any(|i| dent[i] != 0.0 || (tg[i] != xent::IGNORE_INDEX && dlp[i] != 0.0));
            if !live {
                continue;
            }
            let (z, dz) = (&mut z[..c * v], &mut dz[..c * v]);
            let a_c = &a[r0 * h..(r0 + c) * h];
            f32::gemm(c, h, v, 1.0, a_c, false, w, true, 0.0, z);
            dz.fill(0.0);
            xent::cpu::backward(
                z,
                &tg[r.clone()],
                c,
                v,
                temp,
                &lse[r.clone()],
                &ent[r.clone()],
                Some(&dlp[r.clone()]),
                Some(&dent[r]),
                dz,
            )
            .map_err(|e| at(e, r0, c))?;
            if let Some(da) = da.as_deref_mut() {
                // da[c] [c][h] += dZ [c][v] · W [v][h]
                f32::gemm(c, v, h, 1.0, dz, false, w, false, 1.0, &mut da[r0 * h..]);
            }
            if let Some(dw) = dw.as_deref_mut() {
                // dW [v][h] += dZᵀ · a[c]
                f32::gemm(v, c, h, 1.0, dz, true, a_c, false, 1.0, dw);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::LmHeadXent;

    #[test]
    fn chunk_rows_fit_the_budget() {
        // Qwen2-0.5B shape on CUDA: 256 MiB of bf16 rows of 151936 -> 883 rows, rounded to 832.
        let v = 151_936;
        let r = LmHeadXent::chunk_rows(65536, v, true, 256 << 20);
        assert_eq!(r, 832);
        assert!(r * LmHeadXent::row_bytes(v, true) <= 256 << 20);
        // The CPU keeps logits and their gradient in f32: 4x the bytes per row.
        let r = LmHeadXent::chunk_rows(65536, v, false, 256 << 20);
        assert!(r * 8 * v <= 256 << 20 && r >= 64, "{r}");
        // Tiny budgets still make progress; a budget past n is one chunk.
        assert_eq!(LmHeadXent::chunk_rows(10, v, true, 1), 1);
        assert_eq!(LmHeadXent::chunk_rows(10, 32, true, 1 << 30), 10);
        assert_eq!(LmHeadXent::chunk_rows(0, 32, true, 1 << 30), 1);
    }
}
