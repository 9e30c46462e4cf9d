//! Causal multi-head attention with grouped-query heads: the CPU reference ([`cpu`], generic over
//! [`Real`]) and the CUDA launchers ([`cuda`], bf16 in and out) of `kernels/attention.cu`.
//!
//! Layouts (row-major; exactly the output of the q/k/v projections of token-major activations, so
//! no transposes):
//! - training / prefill: `q`, `out`, `dq`, `dout`: `[B][S][Hq][D]`; `k`, `v`, `dk`, `dv`:
//!   `[B][S][Hkv][D]`; `lse`: `[B][Hq][S]`, the natural log of the sum of exponentials of the
//!   scaled scores of each query row;
//! - decode: `q`, `out`: `[B][Hq][D]`; `k_cache`, `v_cache`: `[B][Hkv][max_len][D]`;
//!   `cache_lens[b]`: the number of valid cached positions, including the new token.
//!
//! Semantics: query `i` attends keys `j <= i` (causal) with weights
//! `softmax_j(scale · q_i · k_j)`; query head `h` reads kv head `h / (Hq / Hkv)`. Batches are
//! right-padded: positions `s >= seq_lens[b]` are padding. Their inputs may hold anything (NaN
//! included) and never reach a valid output; the forward writes `out = 0` and `lse = 0` there;
//! the backward leaves `dq`, `dk`, `dv` there untouched. A sequence of length 0 is allowed.
//! Gradients ACCUMULATE (`+=`) into `dq`, `dk`, `dv`, the crate's convention.
//!
//! The backward takes the forward's `out` and `lse` (FlashAttention convention):
//! `P_ij = exp(scale q_i·k_j − lse_i)`, `D_i = Σ_d dout_i·out_i`,
//! `dS_ij = P_ij (dout_i·v_j − D_i)`, `dq_i += scale Σ_j dS_ij k_j`,
//! `dk_j += scale Σ_i dS_ij q_i`, `dv_j += Σ_i P_ij dout_i`.

use crate::error::{check_len, Error, Result};
use crate::kernels::Real;

/// The default softmax scale, `1 / sqrt(d)`.
pub fn softmax_scale(d: usize) -> f32 {
    1.0 / (d as f32).sqrt()
}

fn mul_len(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x))
        .ok_or_else(|| Error::Shape(format!("{what}: size {dims:?} overflows usize")))
}

/// Checks (B, S, Hq, Hkv, D) and returns the element counts of q, k and lse.
fn attn_dims(
    what: &str,
    b: usize,
    s: usize,
    hq: usize,
    hkv: usize,
    d: usize,
) -> Result<(usize, usize, usize)> {
    if hkv == 0 || hq == 0 || !hq.is_multiple_of(hkv) {
        return Err(Error::Invalid(format!(
            "{what}: Hq = {hq} must be a positive multiple of Hkv = {hkv}"
        )));
    }
    if d == 0 {
        return Err(Error::Invalid(format!(
            "{what}: head dim D must be positive"
        )));
    }
    Ok((
        mul_len(&format!("{what} q"), &[b, s, hq, d])?,
        mul_len(&format!("{what} k"), &[b, s, hkv, d])?,
        mul_len(&format!("{what} lse"), &[b, hq, s])?,
    ))
}

fn check_scale(what: &str, scale: f64) -> Result<()> {
    if scale.is_finite() {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what}: scale {scale} is not finite"
        )))
    }
}

fn check_lens(what: &str, lens: &[u32], b: usize, max: usize) -> Result<()> {
    check_len(what, lens.len(), b)?;
    if let Some((i, &l)) = lens.iter().enumerate().find(|(_, &l)| l as usize > max) {
        return Err(Error::Invalid(format!(
            "{what}[{i}] = {l} exceeds the padded length {max}"
        )));
    }
    Ok(())
}

pub mod cpu {
    //! The reference: plain loops in `T` (f32 to run, f64 for checks), a numerically stable
    //! softmax (max subtracted), one row of scores of scratch per call.
    use super::*;

    /// Dot product with 8 independent partial sums (vectorisable; a fixed summation order).
    fn dot<T: Real>(a: &[T], b: &[T]) -> T {
        let mut acc = [T::ZERO; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for l in 0..8 {
                acc[l] += x[l] * y[l];
            }
        }
        let mut s =
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (&x, &y) in ra.iter().zip(rb) {
            s += x * y;
        }
        s
    }

    fn axpy<T: Real>(alpha: T, x: &[T], y: &mut [T]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o += alpha * v;
        }
    }

    fn ln<T: Real>(x: T) -> T {
        T::from_f64(x.to_f64().ln())
    }

    /// Causal attention forward: writes `out` `[B][S][Hq][D]` and `lse` `[B][Hq][S]` (0 on
    /// padding). Errors on mismatched lengths, `Hq % Hkv != 0`, `seq_lens[b] > S` or a
    /// non-finite scale.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_forward<T: Real>(
        q: &[T],
        k: &[T],
        v: &[T],
        seq_lens: &[u32],
        b: usize,
        s: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        scale: T,
        out: &mut [T],
        lse: &mut [T],
    ) -> Result<()> {
        let (nq, nk, nl) = attn_dims("attention_forward", b, s, hq, hkv, d)?;
        check_len("attention_forward q", q.len(), nq)?;
        check_len("attention_forward k", k.len(), nk)?;
        check_len("attention_forward v", v.len(), nk)?;
        check_len("attention_forward out", out.len(), nq)?;
        check_len("attention_forward lse", lse.len(), nl)?;
        check_lens("attention_forward seq_lens", seq_lens, b, s)?;
        check_scale("attention_forward", scale.to_f64())?;
        let g = hq / hkv;
        let mut sc = vec![T::ZERO; s];
        for (bi, &len) in seq_lens.iter().enumerate() {
            let len = len as usize;
            for i in 0..s {
                for h in 0..hq {
                    let qo = ((bi * s + i) * hq + h) * d;
                    let li = (bi * hq + h) * s + i;
                    let orow = &mut out[qo..qo + d];
                    orow.fill(T::ZERO);
                    if i >= len {
                        lse[li] = T::ZERO;
                        continue;
                    }
                    let hk = h / g;
                    let qrow = &q[qo..qo + d];
                    let mut m = T::ZERO;
                    for (j, x) in sc[..=i].iter_mut().enumerate() {
                        let ko = ((bi * s + j) * hkv + hk) * d;
                        *x = scale * dot(qrow, &k[ko..ko + d]);
                        m = if j == 0 { *x } else { m.max(*x) };
                    }
                    let mut l = T::ZERO;
                    for (j, x) in sc[..=i].iter_mut().enumerate() {
                        *x = (*x - m).exp();
                        l += *x;
                        let vo = ((bi * s + j) * hkv + hk) * d;
                        axpy(*x, &v[vo..vo + d], orow);
                    }
                    let inv = T::ONE / l;
                    for o in orow.iter_mut() {
                        *o *= inv;
                    }
                    lse[li] = m + ln(l);
                }
            }
        }
        Ok(())
    }

    /// Causal attention backward from the forward's `out` and `lse`: ACCUMULATES into `dq`,
    /// `dk`, `dv` (padding positions untouched). Errors as [`attention_forward`], and on a
    /// non-finite `lse` at a valid position.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward<T: Real>(
        q: &[T],
        k: &[T],
        v: &[T],
        out: &[T],
        lse: &[T],
        dout: &[T],
        seq_lens: &[u32],
        b: usize,
        s: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        scale: T,
        dq: &mut [T],
        dk: &mut [T],
        dv: &mut [T],
    ) -> Result<()> {
        let (nq, nk, nl) = attn_dims("attention_backward", b, s, hq, hkv, d)?;
        for (what, len, want) in [
            ("attention_backward q", q.len(), nq),
            ("attention_backward k", k.len(), nk),
            ("attention_backward v", v.len(), nk),
            ("attention_backward out", out.len(), nq),
            ("attention_backward lse", lse.len(), nl),
            ("attention_backward dout", dout.len(), nq),
            ("attention_backward dq", dq.len(), nq),
            ("attention_backward dk", dk.len(), nk),
            ("attention_backward dv", dv.len(), nk),
        ] {
            check_len(what, len, want)?;
        }
        check_lens("attention_backward seq_lens", seq_lens, b, s)?;
        check_scale("attention_backward", scale.to_f64())?;
        for bi in 0..b {
            for h in 0..hq {
                let row = &lse[(bi * hq + h) * s..(bi * hq + h) * s + seq_lens[bi] as usize];
                if let Some(i) = row.iter().position(|x| !x.is_finite()) {
                    return Err(Error::Invalid(format!(
                        "attention_backward lse[b={bi}][h={h}][s={i}] = {:?} is not finite",
                        row[i]
                    )));
                }
            }
        }
        let g = hq / hkv;
        for bi in 0..b {
            let len = seq_lens[bi] as usize;
            for i in 0..len {
                for h in 0..hq {
                    let hk = h / g;
                    let qo = ((bi * s + i) * hq + h) * d;
                    let qrow = &q[qo..qo + d];
                    let dorow = &dout[qo..qo + d];
                    let di = dot(dorow, &out[qo..qo + d]);
                    let li = lse[(bi * hq + h) * s + i];
                    for j in 0..=i {
                        let ko = ((bi * s + j) * hkv + hk) * d;
                        let p = (scale * dot(qrow, &k[ko..ko + d]) - li).exp();
                        let ds = p * (dot(dorow, &v[ko..ko + d]) - di);
                        axpy(p, dorow, &mut dv[ko..ko + d]);
                        axpy(scale * ds, &k[ko..ko + d], &mut dq[qo..qo + d]);
                        axpy(scale * ds, qrow, &mut dk[ko..ko + d]);
                    }
                }
            }
        }
        Ok(())
    }

    /// Attention of one new query per sequence over its KV cache: `out[b][h]` =
    /// `softmax_j(scale q·k_j) v_j` over `j < cache_lens[b]` (0 when the length is 0). Errors on
    /// mismatched lengths, `max_len == 0`, `cache_lens[b] > max_len`, or a non-finite scale.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention<T: Real>(
        q: &[T],
        k_cache: &[T],
        v_cache: &[T],
        cache_lens: &[u32],
        b: usize,
        hq: usize,
        hkv: usize,
        max_len: usize,
        d: usize,
        scale: T,
        out: &mut [T],
    ) -> Result<()> {
        let (nq, nc) = decode_dims("decode_attention", b, hq, hkv, max_len, d)?;
        check_len("decode_attention q", q.len(), nq)?;
        check_len("decode_attention k_cache", k_cache.len(), nc)?;
        check_len("decode_attention v_cache", v_cache.len(), nc)?;
        check_len("decode_attention out", out.len(), nq)?;
        check_lens("decode_attention cache_lens", cache_lens, b, max_len)?;
        check_scale("decode_attention", scale.to_f64())?;
        let g = hq / hkv;
        let mut sc = vec![T::ZERO; max_len];
        for (bi, &len) in cache_lens.iter().enumerate() {
            let len = len as usize;
            for h in 0..hq {
                let hk = h / g;
                let qo = (bi * hq + h) * d;
                let qrow = &q[qo..qo + d];
                let orow = &mut out[qo..qo + d];
                orow.fill(T::ZERO);
                if len == 0 {
                    continue;
                }
                let base = (bi * hkv + hk) * max_len * d;
                let mut m = T::ZERO;
                for (j, x) in sc[..len].iter_mut().enumerate() {
                    *x = scale * dot(qrow, &k_cache[base + j * d..base + (j + 1) * d]);
                    m = if j == 0 { *x } else { m.max(*x) };
                }
                let mut l = T::ZERO;
                for (j, x) in sc[..len].iter_mut().enumerate() {
                    *x = (*x - m).exp();
                    l += *x;
                    axpy(*x, &v_cache[base + j * d..base + (j + 1) * d], orow);
                }
                let inv = T::ONE / l;
                for o in orow.iter_mut() {
                    *o *= inv;
                }
            }
        }
        Ok(())
    }
}

/// Checks the decode shape; returns the element counts of q (and out) and of one cache.
fn decode_dims(
    what: &str,
    b: usize,
    hq: usize,
    hkv: usize,
    max_len: usize,
    d: usize,
) -> Result<(usize, usize)> {
    attn_dims(what, b, 1, hq, hkv, d)?;
    if max_len == 0 {
        return Err(Error::Invalid(format!(
            "{what}: max_len must be at least 1"
        )));
    }
    Ok((
        mul_len(&format!("{what} q"), &[b, hq, d])?,
        mul_len(&format!("{what} cache"), &[b, hkv, max_len, d])?,
    ))
}

pub mod cuda {
    //! CUDA launchers: bf16 q/k/v/o/gradients and caches, fp32 lse and workspaces, `u32`
    //! lengths. `*_raw` take raw device pointers (`CUdeviceptr` as u64, e.g. arena offsets) and
    //! queue work on [`CudaDevice::stream`] without synchronising; the safe wrappers take cudarc
    //! views and check lengths. The kernels cannot read the lengths on the host: values above S
    //! (`max_len`) are clamped on the device. Head dims: [`HEAD_DIMS`].
    //!
    //! bf16 accumulation of gradients: each kernel reads the existing bf16 value, adds its
    //! contribution in fp32 and writes back one bf16 rounding (`dk`, `dv` in the main backward
    //! kernel or, split, in its finalize; `dq` in the dQ kernel), so `+=` rounds once per call.
    //! Each gradient element is summed by one thread in a fixed order (no atomics): the backward
    //! is bit-reproducible.
    //!
    //! GQA split of the dK/dV kernel ([`bwd_splits`]): at small B·S the grid of one CTA per
    //! (KV head, sequence, 64-key tile) leaves SMs idle (B 8, S 512, 2 KV heads: 128 CTAs on
    //! 132 SMs), so the query heads of each group are cut into contiguous slices, one CTA each;
    //! every slice writes fp32 partials into the workspace and a finalize adds their sum, in
    //! slice order, into `dk`, `dv`. The split changes only the fp32 summation order of the
    //! slices; one split is the unsplit kernel, bit for bit.
    //!
    //! Views of `half::bf16` work without cudarc's `f16` feature (they only need a device
    //! pointer): allocate `u16` and use `CudaSlice::transmute` / `transmute_mut`.
    use super::*;
    use crate::device::CudaDevice;
    use crate::kernels::check_ptr;
    use cudarc::driver::{
        CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    };
    use half::bf16;

    const FAMILY: &str = "attention";
    /// Head dims with a compiled kernel.
    pub const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];
    const THREADS: u32 = 128;
    const PAD: usize = 8;
    /// Query rows per forward CTA, keys per forward K/V tile, keys per backward CTA.
    const TILE: usize = 64;
    /// Granularity of a decode split (a multiple of every decode chunk).
    const SPLIT_GRANULE: usize = 64;
    /// Aim of the decode grid: about this many CTAs in flight (8 per SM on a 132-SM H100).
    const DECODE_TARGET_CTAS: usize = 1024;
    /// Aim of the dK/dV grid: two waves of resident CTAs on a 132-SM H100 (2 CTAs per SM by the
    /// kernel's launch bounds). Below it the GQA group is split ([`bwd_splits`]).
    const BWD_TARGET_CTAS: usize = 2 * 2 * 132;
    /// Threads of the split finalize.
    const FINALIZE_THREADS: u32 = 256;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const STATIC_SMEM_LIMIT: usize = 48 * 1024;

    fn check_d(what: &str, d: usize) -> Result<()> {
        if HEAD_DIMS.contains(&d) {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "{what}: head dim D = {d} has no CUDA kernel (supported: {HEAD_DIMS:?})"
            )))
        }
    }

    fn to_i32(what: &str, v: usize) -> Result<i32> {
        i32::try_from(v).map_err(|_| Error::Shape(format!("{what} = {v} exceeds i32::MAX")))
    }

    fn grid_dim(what: &str, v: usize, max: usize) -> Result<u32> {
        if v > max {
            return Err(Error::Shape(format!(
                "{what} = {v} exceeds the CUDA grid limit {max}"
            )));
        }
        Ok(v as u32)
    }

    fn bwd_bm(d: usize) -> usize {
        if d >= 128 {
            32
        } else {
            64
        }
    }

    fn dec_chunk(d: usize) -> usize {
        if d >= 128 {
            32
        } else {
            64
        }
    }

    fn fwd_smem(d: usize) -> usize {
        3 * TILE * (d + PAD) * 2
    }

    fn bwd_smem(d: usize) -> usize {
        let bm = bwd_bm(d);
        (2 * TILE + 4 * bm) * (d + PAD) * 2 + 4 * bm * 4
    }

    /// The dQ kernel: Q and dO tiles, double-buffered K and V tiles.
    fn dq_smem(d: usize) -> usize {
        (2 * TILE + 4 * TILE) * (d + PAD) * 2
    }

    fn dec_smem(d: usize) -> usize {
        let ch = dec_chunk(d);
        (8 * d + 8 * ch + 8) * 4 + 4 * ch * (d + PAD) * 2
    }

    fn smem_opt_in(dev: &CudaDevice, f: &cudarc::driver::CudaFunction, bytes: usize) -> Result<()> {
        if bytes > STATIC_SMEM_LIMIT {
            dev.set_dynamic_smem(f, bytes as u32)?;
        }
        Ok(())
    }

    /// Number of slices the dK/dV kernel cuts each GQA group of `G = Hq / Hkv` query heads into:
    /// 1 (unsplit) when the grid `Hkv·B·ceil(S/64)` already has [`BWD_TARGET_CTAS`] CTAs (two
    /// waves of an H100) or `G = 1`; else enough slices to reach it, at most `G`, and the fewest
    /// that give the same largest slice (`ceil(G / splits)` heads), which keeps the workspace
    /// small. Depends on the shape only (not on the GPU), so the planned workspace and the
    /// gradient bits are the same on every card. B 8, S 512, Hq 14, Hkv 2: 128 CTAs -> 4
    /// slices of 1, 2, 2, 2 heads (slice `sp` is heads `[sp·G/4, (sp+1)·G/4)`), 512 CTAs.
    pub fn bwd_splits(b: usize, s: usize, hq: usize, hkv: usize) -> usize {
        if hkv == 0 || hq < hkv {
            return 1;
        }
        let g = hq / hkv;
        let blocks = hkv * b * s.div_ceil(TILE);
        if g <= 1 || blocks == 0 || blocks >= BWD_TARGET_CTAS {
            return 1;
        }
        let want = BWD_TARGET_CTAS.div_ceil(blocks).min(g);
        g.div_ceil(g.div_ceil(want))
    }

    /// Checks an explicit split count: 1..=G.
    fn check_splits(what: &str, splits: usize, hq: usize, hkv: usize) -> Result<()> {
        let g = hq / hkv.max(1);
        if splits == 0 || splits > g.max(1) {
            return Err(Error::Invalid(format!(
                "{what}: splits = {splits} must be 1..={} (the GQA group Hq / Hkv = {hq} / {hkv})",
                g.max(1)
            )));
        }
        Ok(())
    }

    /// f32 elements of delta (`B·Hq·S`), rounded up to 16 bytes so the split partials after it
    /// are aligned for the kernel's 8-byte stores.
    fn delta_len(b: usize, s: usize, hq: usize) -> usize {
        (b * hq * s).div_ceil(4) * 4
    }

    /// f32 elements of the workspace [`attention_bwd_split_raw`] needs for `splits` slices:
    /// delta (`B·Hq·S`, rounded up to a multiple of 4), then, when `splits > 1`, the dK and dV
    /// partials of every slice (`2·splits·B·S·Hkv·D`).
    pub fn bwd_workspace_len_split(
        b: usize,
        s: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        splits: usize,
    ) -> usize {
        let part = if splits > 1 {
            2 * splits * b * s * hkv * d
        } else {
            0
        };
        delta_len(b, s, hq) + part
    }

    /// f32 elements of the workspace [`attention_bwd_raw`] needs (its [`bwd_splits`]).
    pub fn bwd_workspace_len(b: usize, s: usize, hq: usize, hkv: usize, d: usize) -> usize {
        bwd_workspace_len_split(b, s, hq, hkv, d, bwd_splits(b, s, hq, hkv))
    }

    /// Decode split: `(number of splits, keys per split)`. Depends on the shape only (the same
    /// on every GPU): about [`DECODE_TARGET_CTAS`] CTAs, at least 128 keys per split.
    pub fn decode_splits(b: usize, hkv: usize, max_len: usize) -> (usize, usize) {
        let pairs = (b * hkv).max(1);
        let want = DECODE_TARGET_CTAS.div_ceil(pairs).max(1);
        let most = max_len.div_ceil(128).max(1);
        let n0 = want.min(most);
        let split_len = max_len.max(1).div_ceil(n0).div_ceil(SPLIT_GRANULE) * SPLIT_GRANULE;
        (max_len.max(1).div_ceil(split_len), split_len)
    }

    /// f32 elements of the workspace [`decode_attention_raw`] needs: per (batch, query head,
    /// split) a (max, sum) pair and D partial outputs.
    pub fn decode_workspace_len(
        b: usize,
        hq: usize,
        hkv: usize,
        max_len: usize,
        d: usize,
    ) -> usize {
        let (n, _) = decode_splits(b, hkv, max_len);
        b * hq * n * (2 + d)
    }

    /// Grids: forward (Hq, B, S/64), backward (Hkv, B, S/64), decode (splits, Hkv, B),
    /// combine (Hq, B): y and z are limited to 65535.
    fn grid_checks(what: &str, b: usize, s: usize, hq: usize, hkv: usize) -> Result<()> {
        grid_dim(&format!("{what} Hq"), hq, i32::MAX as usize)?;
        grid_dim(&format!("{what} Hkv"), hkv, 65535)?;
        grid_dim(&format!("{what} B"), b, 65535)?;
        grid_dim(
            &format!("{what} query tiles"),
            (to_i32(&format!("{what} S"), s)? as usize).div_ceil(TILE),
            65535,
        )?;
        Ok(())
    }

    /// The launch configurations of the forward and the backward kernels for a shape (pure, so
    /// the limits are tested at real sizes without a GPU). Grids: forward and dQ (Hq, B, S/64),
    /// delta (B·S·Hq/4), dK/dV (Hkv·splits, B, S/64), finalize (B·S·Hkv·D/512, at most 4096;
    /// launched only when `splits > 1`).
    #[derive(Clone, Copy, Debug)]
    pub struct Launches {
        pub fwd: LaunchConfig,
        pub bwd_pre: LaunchConfig,
        pub bwd: LaunchConfig,
        pub bwd_finalize: LaunchConfig,
        pub bwd_dq: LaunchConfig,
        /// Slices of the GQA group in `bwd`.
        pub splits: usize,
    }

    /// [`Launches`] of a (checked) shape with its [`bwd_splits`]; `Error::Shape` past a grid
    /// limit.
    pub fn launches(b: usize, s: usize, hq: usize, hkv: usize, d: usize) -> Result<Launches> {
        launches_split(b, s, hq, hkv, d, bwd_splits(b, s, hq, hkv))
    }

    /// [`Launches`] with an explicit split count (1..=Hq/Hkv).
    pub fn launches_split(
        b: usize,
        s: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        splits: usize,
    ) -> Result<Launches> {
        grid_checks("attention", b, s, hq, hkv)?;
        check_splits("attention_bwd", splits, hq, hkv)?;
        let bwd_x = grid_dim("attention_bwd Hkv*splits", hkv * splits, i32::MAX as usize)?;
        let pairs = (b * s * hkv * d / 2).max(1);
        let fin_blocks = pairs.div_ceil(FINALIZE_THREADS as usize).min(4096) as u32;
        let rows = b * s * hq;
        let pre_blocks = to_i32(
            "attention_bwd B*S*Hq/4",
            rows.div_ceil((THREADS / 32) as usize),
        )?;
        let cfg = |grid_dim, smem: usize| LaunchConfig {
            grid_dim,
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let tiles = s.div_ceil(TILE) as u32;
        Ok(Launches {
            fwd: cfg((hq as u32, b as u32, tiles), fwd_smem(d)),
            bwd_pre: cfg((pre_blocks as u32, 1, 1), 0),
            bwd: cfg((bwd_x, b as u32, tiles), bwd_smem(d)),
            bwd_finalize: LaunchConfig {
                grid_dim: (fin_blocks, 1, 1),
                block_dim: (FINALIZE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            bwd_dq: cfg((hq as u32, b as u32, tiles), dq_smem(d)),
            splits,
        })
    }

    /// Causal attention forward on raw device pointers: `out` (bf16) and `lse` (f32).
    ///
    /// # Safety
    /// `q`, `out` must hold `B·S·Hq·D` bf16, `k`, `v` `B·S·Hkv·D` bf16, `lse` `B·Hq·S` f32 and
    /// `seq_lens` `B` u32, on `dev`'s context; outputs must not overlap each other or the inputs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attention_fwd_raw(
        dev: &CudaDevice,
        q: u64,
        k: u64,
        v: u64,
        seq_lens: u64,
        b: usize,
        s: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        scale: f32,
        out: u64,
        lse: u64,
    ) -> Result<()> {
        let (nq, _, _) = attn_dims("attention_fwd", b, s, hq, hkv, d)?;
        check_d("attention_fwd", d)?;
        check_scale("attention_fwd", scale as f64)?;
        if nq == 0 {
            return Ok(());
        }
        let cfg = launches(b, s, hq, hkv, d)?.fwd;
        for (what, p, a) in [
            ("attention_fwd q", q, 16),
            ("attention_fwd k", k, 16),
            ("attention_fwd v", v, 16),
            ("attention_fwd out", out, 16),
            ("attention_fwd seq_lens", seq_lens, 4),
            ("attention_fwd lse", lse, 4),
        ] {
            check_ptr(what, p, a)?;
        }
        let (si, hqi, hkvi) = (s as i32, hq as i32, hkv as i32);
        let sl2 = scale * LOG2E;
        let name = format!("attention_fwd_d{d}");
        let f = dev.function(FAMILY, &name)?;
        smem_opt_in(dev, &f, cfg.shared_mem_bytes as usize)?;
        let mut a = dev.launch_builder(&f);
        a.arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&seq_lens)
            .arg(&out)
            .arg(&lse)
            .arg(&si)
            .arg(&hqi)
            .arg(&hkvi)
            .arg(&sl2);
        dev.launch(&name, a, cfg)
    }

    /// Causal attention forward (see the module doc) on device views.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_fwd(
        dev: &CudaDevice,
        q: &CudaView<'_, bf16>,
        k: &CudaView<'_, bf16>,
        v: &CudaView<'_, bf16>,
        seq_lens: &CudaView<'_, u32>,
        b: usize,
        s: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        scale: f32,
        out: &mut CudaViewMut<'_, bf16>,
        lse: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let (nq, nk, nl) = attn_dims("attention_fwd", b, s, hq, hkv, d)?;
        check_len("attention_fwd q", q.len(), nq)?;
        check_len("attention_fwd k", k.len(), nk)?;
        check_len("attention_fwd v", v.len(), nk)?;
        check_len("attention_fwd seq_lens", seq_lens.len(), b)?;
        check_len("attention_fwd out", out.len(), nq)?;
        check_len("attention_fwd lse", lse.len(), nl)?;
        if nq == 0 {
            return check_d("attention_fwd", d);
        }
        let st = dev.stream();
        let (qp, _gq) = q.device_ptr(st);
        let (kp, _gk) = k.device_ptr(st);
        let (vp, _gv) = v.device_ptr(st);
        let (lp, _gl) = seq_lens.device_ptr(st);
        let (op, _go) = out.device_ptr_mut(st);
        let (sp, _gs) = lse.device_ptr_mut(st);
        // SAFETY: lengths checked above; &mut views cannot alias each other or the inputs.
        unsafe { attention_fwd_raw(dev, qp, kp, vp, lp, b, s, hq, hkv, d, scale, op, sp) }
    }

    /// Causal attention backward on raw device pointers with the shape's [`bwd_splits`]:
    /// [`attention_bwd_split_raw`]. `workspace` holds [`bwd_workspace_len`] f32.
    ///
    /// # Safety
    /// As [`attention_bwd_split_raw`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attention_bwd_raw(
        dev: &CudaDevice,
        q: u64,
        k: u64,
        v: u64,
        out: u64,
        lse: u64,
        dout: u64,
        seq_lens: u64,
        b: usize,
        s: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        scale: f32,
        dq: u64,
        dk: u64,
        dv: u64,
        workspace: u64,
    ) -> Result<()> {
        let splits = bwd_splits(b, s, hq, hkv);
        attention_bwd_split_raw(
            dev, q, k, v, out, lse, dout, seq_lens, b, s, hq, hkv, d, scale, dq, dk, dv, workspace,
            splits,
        )
    }

    /// Causal attention backward on raw device pointers: delta; the dK/dV kernel, which adds
    /// into `dk`, `dv` (`splits = 1`) or writes `splits` slices' partials into the workspace,
    /// then the finalize adds their ordered sum into `dk`, `dv`; the dQ kernel, which adds into
    /// `dq`. Every element is summed in a fixed order (no atomics): the gradients are
    /// bit-reproducible. `workspace` holds [`bwd_workspace_len_split`] f32 and is overwritten.
    ///
    /// # Safety
    /// `q`, `out`, `dout`, `dq` must hold `B·S·Hq·D` bf16; `k`, `v`, `dk`, `dv` `B·S·Hkv·D` bf16;
    /// `lse` `B·Hq·S` f32; `seq_lens` `B` u32; `workspace` as above, 8-byte aligned; all on
    /// `dev`'s context. `dq`, `dk`, `dv` and `workspace` must not overlap anything else.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attention_bwd_split_raw(
        dev: &CudaDevice,
        q: u64,
        k: u64,
        v: u64,
        out: u64,
        lse: u64,
        dout: u64,
        seq_lens: u64,
        b: usize,
        s: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        scale: f32,
        dq: u64,
        dk: u64,
        dv: u64,
        workspace: u64,
        splits: usize,
    ) -> Result<()> {
        let (nq, nk, _) = attn_dims("attention_bwd", b, s, hq, hkv, d)?;
        check_d("attention_bwd", d)?;
        check_scale("attention_bwd", scale as f64)?;
        check_splits("attention_bwd", splits, hq, hkv)?;
        if nq == 0 {
            return Ok(());
        }
        let cfgs = launches_split(b, s, hq, hkv, d, splits)?;
        for (what, p, a) in [
            ("attention_bwd q", q, 16),
            ("attention_bwd k", k, 16),
            ("attention_bwd v", v, 16),
            ("attention_bwd out", out, 16),
            ("attention_bwd dout", dout, 16),
            ("attention_bwd dq", dq, 16),
            ("attention_bwd dk", dk, 16),
            ("attention_bwd dv", dv, 16),
            ("attention_bwd workspace", workspace, 8),
            ("attention_bwd lse", lse, 4),
            ("attention_bwd seq_lens", seq_lens, 4),
        ] {
            check_ptr(what, p, a)?;
        }
        let (bi, si, hqi, hkvi) = (b as i32, s as i32, hq as i32, hkv as i32);
        let delta = workspace;
        // The partials (read only when splits > 1; a valid address either way).
        let part = workspace + 4 * delta_len(b, s, hq) as u64;
        let spi = splits as i32;
        let sl2 = scale * LOG2E;

        let name = format!("attention_bwd_pre_d{d}");
        let f = dev.function(FAMILY, &name)?;
        let mut a = dev.launch_builder(&f);
        a.arg(&out)
            .arg(&dout)
            .arg(&seq_lens)
            .arg(&delta)
            .arg(&bi)
            .arg(&si)
            .arg(&hqi);
        dev.launch(&name, a, cfgs.bwd_pre)?;

        // dK, dV (grid over key tiles) and dQ (grid over query tiles) read the same inputs.
        for (name, cfg, grad) in [
            (format!("attention_bwd_d{d}"), cfgs.bwd, None),
            (format!("attention_bwd_dq_d{d}"), cfgs.bwd_dq, Some(dq)),
        ] {
            let f = dev.function(FAMILY, &name)?;
            smem_opt_in(dev, &f, cfg.shared_mem_bytes as usize)?;
            let mut a = dev.launch_builder(&f);
            a.arg(&q)
                .arg(&k)
                .arg(&v)
                .arg(&dout)
                .arg(&lse)
                .arg(&delta)
                .arg(&seq_lens);
            match &grad {
                Some(dq) => {
                    a.arg(dq).arg(&si).arg(&hqi).arg(&hkvi);
                }
                None => {
                    a.arg(&dk)
                        .arg(&dv)
                        .arg(&part)
                        .arg(&si)
                        .arg(&hqi)
                        .arg(&hkvi)
                        .arg(&spi);
                }
            };
            a.arg(&scale).arg(&sl2);
            dev.launch(&name, a, cfg)?;
            if grad.is_none() && splits > 1 {
                let name = "attention_bwd_finalize";
                let f = dev.function(FAMILY, name)?;
                let row_w = to_i32("attention_bwd Hkv*D", hkv * d)?;
                let n = nk as i64;
                let mut a = dev.launch_builder(&f);
                a.arg(&part)
                    .arg(&seq_lens)
                    .arg(&dk)
                    .arg(&dv)
                    .arg(&si)
                    .arg(&row_w)
                    .arg(&n)
                    .arg(&spi)
                    .arg(&scale);
                dev.launch(name, a, cfgs.bwd_finalize)?;
            }
        }
        Ok(())
    }

    /// Causal attention backward (see the module doc) on device views with the shape's
    /// [`bwd_splits`]; `dq`, `dk`, `dv` accumulate. `workspace` holds at least
    /// [`bwd_workspace_len`] f32.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd(
        dev: &CudaDevice,
        q: &CudaView<'_, bf16>,
        k: &CudaView<'_, bf16>,
        v: &CudaView<'_, bf16>,
        out: &CudaView<'_, bf16>,
        lse: &CudaView<'_, f32>,
        dout: &CudaView<'_, bf16>,
        seq_lens: &CudaView<'_, u32>,
        b: usize,
        s: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        scale: f32,
        dq: &mut CudaViewMut<'_, bf16>,
        dk: &mut CudaViewMut<'_, bf16>,
        dv: &mut CudaViewMut<'_, bf16>,
        workspace: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let splits = bwd_splits(b, s, hq, hkv);
        attention_bwd_split(
            dev, q, k, v, out, lse, dout, seq_lens, b, s, hq, hkv, d, scale, dq, dk, dv, workspace,
            splits,
        )
    }

    /// [`attention_bwd`] with an explicit split count (1..=Hq/Hkv); `workspace` holds at least
    /// [`bwd_workspace_len_split`] f32.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd_split(
        dev: &CudaDevice,
        q: &CudaView<'_, bf16>,
        k: &CudaView<'_, bf16>,
        v: &CudaView<'_, bf16>,
        out: &CudaView<'_, bf16>,
        lse: &CudaView<'_, f32>,
        dout: &CudaView<'_, bf16>,
        seq_lens: &CudaView<'_, u32>,
        b: usize,
        s: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        scale: f32,
        dq: &mut CudaViewMut<'_, bf16>,
        dk: &mut CudaViewMut<'_, bf16>,
        dv: &mut CudaViewMut<'_, bf16>,
        workspace: &mut CudaViewMut<'_, f32>,
        splits: usize,
    ) -> Result<()> {
        let (nq, nk, nl) = attn_dims("attention_bwd", b, s, hq, hkv, d)?;
        check_splits("attention_bwd", splits, hq, hkv)?;
        for (what, len, want) in [
            ("attention_bwd q", q.len(), nq),
            ("attention_bwd k", k.len(), nk),
            ("attention_bwd v", v.len(), nk),
            ("attention_bwd out", out.len(), nq),
            ("attention_bwd lse", lse.len(), nl),
            ("attention_bwd dout", dout.len(), nq),
            ("attention_bwd seq_lens", seq_lens.len(), b),
            ("attention_bwd dq", dq.len(), nq),
            ("attention_bwd dk", dk.len(), nk),
            ("attention_bwd dv", dv.len(), nk),
        ] {
            check_len(what, len, want)?;
        }
        let ws = bwd_workspace_len_split(b, s, hq, hkv, d, splits);
        if workspace.len() < ws {
            return Err(Error::Shape(format!(
                "attention_bwd workspace: length {}, needs at least {ws}",
                workspace.len()
            )));
        }
        if nq == 0 {
            return check_d("attention_bwd", d);
        }
        let st = dev.stream();
        let (qp, _g1) = q.device_ptr(st);
        let (kp, _g2) = k.device_ptr(st);
        let (vp, _g3) = v.device_ptr(st);
        let (op, _g4) = out.device_ptr(st);
        let (lp, _g5) = lse.device_ptr(st);
        let (dop, _g6) = dout.device_ptr(st);
        let (sp, _g7) = seq_lens.device_ptr(st);
        let (dqp, _g8) = dq.device_ptr_mut(st);
        let (dkp, _g9) = dk.device_ptr_mut(st);
        let (dvp, _g10) = dv.device_ptr_mut(st);
        let (wp, _g11) = workspace.device_ptr_mut(st);
        // SAFETY: lengths checked above; &mut views cannot alias each other or the inputs.
        unsafe {
            attention_bwd_split_raw(
                dev, qp, kp, vp, op, lp, dop, sp, b, s, hq, hkv, d, scale, dqp, dkp, dvp, wp,
                splits,
            )
        }
    }

    /// Decode attention (flash-decoding) on raw device pointers: a partial kernel over
    /// [`decode_splits`] splits of the cache, then a combine kernel writing `out`.
    ///
    /// # Safety
    /// `q`, `out` must hold `B·Hq·D` bf16; `k_cache`, `v_cache` `B·Hkv·max_len·D` bf16;
    /// `cache_lens` `B` u32; `workspace` [`decode_workspace_len`] f32; all on `dev`'s context;
    /// `out` and `workspace` must not overlap anything else.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn decode_attention_raw(
        dev: &CudaDevice,
        q: u64,
        k_cache: u64,
        v_cache: u64,
        cache_lens: u64,
        b: usize,
        hq: usize,
        hkv: usize,
        max_len: usize,
        d: usize,
        scale: f32,
        out: u64,
        workspace: u64,
    ) -> Result<()> {
        let (nq, _) = decode_dims("decode_attention", b, hq, hkv, max_len, d)?;
        check_d("decode_attention", d)?;
        check_scale("decode_attention", scale as f64)?;
        if nq == 0 {
            return Ok(());
        }
        grid_checks("decode_attention", b, 1, hq, hkv)?;
        for (what, p, a) in [
            ("decode_attention q", q, 16),
            ("decode_attention k_cache", k_cache, 16),
            ("decode_attention v_cache", v_cache, 16),
            ("decode_attention out", out, 4),
            ("decode_attention cache_lens", cache_lens, 4),
            ("decode_attention workspace", workspace, 4),
        ] {
            check_ptr(what, p, a)?;
        }
        let (n, split_len) = decode_splits(b, hkv, max_len);
        let part_ml = workspace;
        let part_acc = workspace + 4 * (b * hq * n * 2) as u64;
        let (hqi, hkvi) = (hq as i32, hkv as i32);
        let ml = to_i32("decode_attention max_len", max_len)?;
        let spl = split_len as i32;
        let ni = to_i32("decode_attention splits", n)?;
        let sl2 = scale * LOG2E;

        let name = format!("attention_decode_d{d}");
        let f = dev.function(FAMILY, &name)?;
        let smem = dec_smem(d);
        smem_opt_in(dev, &f, smem)?;
        let mut a = dev.launch_builder(&f);
        a.arg(&q)
            .arg(&k_cache)
            .arg(&v_cache)
            .arg(&cache_lens)
            .arg(&part_ml)
            .arg(&part_acc)
            .arg(&hqi)
            .arg(&hkvi)
            .arg(&ml)
            .arg(&spl)
            .arg(&sl2);
        let cfg = LaunchConfig {
            grid_dim: (
                grid_dim("decode_attention splits", n, i32::MAX as usize)?,
                hkv as u32,
                b as u32,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        dev.launch(&name, a, cfg)?;

        let name = format!("attention_decode_combine_d{d}");
        let f = dev.function(FAMILY, &name)?;
        let mut a = dev.launch_builder(&f);
        a.arg(&part_ml).arg(&part_acc).arg(&out).arg(&hqi).arg(&ni);
        let cfg = LaunchConfig {
            grid_dim: (hq as u32, b as u32, 1),
            block_dim: (d as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch(&name, a, cfg)
    }

    /// Decode attention (see the module doc) on device views. `workspace` holds at least
    /// [`decode_workspace_len`] f32.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention(
        dev: &CudaDevice,
        q: &CudaView<'_, bf16>,
        k_cache: &CudaView<'_, bf16>,
        v_cache: &CudaView<'_, bf16>,
        cache_lens: &CudaView<'_, u32>,
        b: usize,
        hq: usize,
        hkv: usize,
        max_len: usize,
        d: usize,
        scale: f32,
        out: &mut CudaViewMut<'_, bf16>,
        workspace: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let (nq, nc) = decode_dims("decode_attention", b, hq, hkv, max_len, d)?;
        check_len("decode_attention q", q.len(), nq)?;
        check_len("decode_attention k_cache", k_cache.len(), nc)?;
        check_len("decode_attention v_cache", v_cache.len(), nc)?;
        check_len("decode_attention cache_lens", cache_lens.len(), b)?;
        check_len("decode_attention out", out.len(), nq)?;
        let ws = decode_workspace_len(b, hq, hkv, max_len, d);
        if workspace.len() < ws {
            return Err(Error::Shape(format!(
                "decode_attention workspace: length {}, needs at least {ws}",
                workspace.len()
            )));
        }
        if nq == 0 {
            return check_d("decode_attention", d);
        }
        let st = dev.stream();
        let (qp, _g1) = q.device_ptr(st);
        let (kp, _g2) = k_cache.device_ptr(st);
        let (vp, _g3) = v_cache.device_ptr(st);
        let (lp, _g4) = cache_lens.device_ptr(st);
        let (op, _g5) = out.device_ptr_mut(st);
        let (wp, _g6) = workspace.device_ptr_mut(st);
        // SAFETY: lengths checked above; &mut views cannot alias each other or the inputs.
        unsafe { decode_attention_raw(dev, qp, kp, vp, lp, b, hq, hkv, max_len, d, scale, op, wp) }
    }
}

#[cfg(test)]
mod tests {
    use super::cuda::{launches, HEAD_DIMS};
    use crate::device::check_launch;

    /// Shared memory a block may opt into on an H100 / H200.
    const SMEM_LIMIT: u32 = 227 * 1024;

    #[test]
    fn launches_at_the_qwen2_05b_training_size() {
        // 64 sequences of 1024 tokens, 14 query heads, 2 kv heads, head dim 64.
        let l = launches(64, 1024, 14, 2, 64).unwrap();
        assert_eq!(l.fwd.grid_dim, (14, 64, 16));
        assert_eq!(l.bwd.grid_dim, (2, 64, 16));
        assert_eq!(l.bwd_dq.grid_dim, (14, 64, 16));
        assert_eq!(l.bwd_pre.grid_dim, (64 * 1024 * 14 / 4, 1, 1));
        for d in HEAD_DIMS {
            let l = launches(64, 1024, 14, 2, d).unwrap();
            for (name, c) in [
                ("fwd", l.fwd),
                ("pre", l.bwd_pre),
                ("bwd", l.bwd),
                ("dq", l.bwd_dq),
            ] {
                assert!(check_launch(name, &c).unwrap(), "D={d} {name}");
                assert!(c.shared_mem_bytes <= SMEM_LIMIT, "D={d} {name}: {c:?}");
            }
        }
    }

    #[test]
    fn the_gqa_split_fills_the_card_at_small_batch() {
        use super::cuda::{bwd_splits, bwd_workspace_len, bwd_workspace_len_split, launches_split};
        // Qwen2-0.5B heads (Hq 14, Hkv 2, D 64) at B 8, S 512: 2·8·8 = 128 CTAs unsplit, under
        // one wave of a 132-SM H100; 4 slices (1, 2, 2, 2 heads) give 512.
        assert_eq!(bwd_splits(8, 512, 14, 2), 4);
        let l = launches(8, 512, 14, 2, 64).unwrap();
        assert_eq!((l.splits, l.bwd.grid_dim), (4, (8, 8, 8)));
        assert!(check_launch("finalize", &l.bwd_finalize).unwrap());
        // Workspace: delta (8·14·512 f32) + dK, dV partials of 4 slices (2·4·8·512·2·64 f32).
        let delta = 8 * 14 * 512;
        assert_eq!(
            bwd_workspace_len(8, 512, 14, 2, 64),
            delta + 2 * 4 * 8 * 512 * 2 * 64
        );
        // Larger grids: fewer slices, none from 528 CTAs on (B 64, S 512: 1024 CTAs).
        assert_eq!(bwd_splits(16, 512, 14, 2), 3);
        assert_eq!(bwd_splits(32, 512, 14, 2), 2);
        assert_eq!(bwd_splits(64, 512, 14, 2), 1);
        assert_eq!(bwd_workspace_len(64, 512, 14, 2, 64), 64 * 14 * 512);
        // G = 1 cannot be split; a tiny grid splits up to G.
        assert_eq!(bwd_splits(1, 64, 4, 4), 1);
        assert_eq!(bwd_splits(1, 64, 7, 1), 7);
        // One split is the unsplit launch; the delta region is padded to 16 bytes.
        assert_eq!(
            launches_split(8, 512, 14, 2, 64, 1).unwrap().bwd.grid_dim,
            (2, 8, 8)
        );
        assert_eq!(bwd_workspace_len_split(1, 3, 7, 1, 16, 1), 24);
        assert_eq!(
            bwd_workspace_len_split(1, 3, 7, 1, 16, 2),
            24 + 2 * 2 * 3 * 16
        );
        assert!(launches_split(8, 512, 14, 2, 64, 8).is_err());
        assert!(launches_split(8, 512, 14, 2, 64, 0).is_err());
    }

    #[test]
    fn launches_past_the_grid_limits_are_errors() {
        // Grid z: at most 65535 query tiles of 64; grid y: at most 65535 sequences.
        let l = launches(1, 65535 * 64, 1, 1, 64).unwrap();
        assert_eq!(l.fwd.grid_dim.2, 65535);
        assert!(check_launch("fwd", &l.fwd).unwrap());
        assert!(launches(1, 65535 * 64 + 1, 1, 1, 64).is_err());
        assert!(launches(65535, 64, 1, 1, 64).is_ok());
        assert!(launches(65536, 64, 1, 1, 64).is_err());
        assert!(launches(1, 64, 1, 65536, 64).is_err());
        // The delta kernel's grid: B·S·Hq / 4 blocks at most i32::MAX.
        assert!(launches(65535, 65536, 4, 1, 64).is_err());
    }
}
