//! Rotary position embedding (`kernels/rope.cu`), Hugging Face "rotate_half" convention
//! (Llama, Qwen2: pairs `(i, i + D/2)`, not interleaved), applied in place to q and k.
//!
//! # Layout and math
//! `q` is `[n][hq][D]`, `k` is `[n][hkv][D]` token-major, `pos` is `[n]` i32 (the position of
//! each token in its sequence). For each token, head and `i < D/2`, with `half = D/2`:
//! ```text
//! θ_i   = pos · inv_freq_i,   inv_freq_i = 1 / theta^(2i/D)
//! out_i        = x_i·cos θ_i − x_{i+half}·sin θ_i
//! out_{i+half} = x_{i+half}·cos θ_i + x_i·sin θ_i
//! ```
//! which is HF's `q·cos + rotate_half(q)·sin`. The backward is the inverse rotation (by −θ),
//! applied in place to `dq`, `dk`: the rotation is orthogonal, so the gradient with respect to
//! the pre-rotation q is the transposed rotation of the gradient with respect to the rotated q.
//! Note that the backward **replaces** dq/dk (an in-place transform of the gradient buffer, not
//! an accumulation): the decoder runs it on the attention backward's dq/dk before they flow into
//! the q/k projection backward.
//!
//! # Angles: HF's fp32 computation, no table
//! Hugging Face computes, in fp32: `inv_freq = 1.0 / (theta ** (arange(0, D, 2).float() / D))`
//! and `angle = pos.float() * inv_freq`, then `cos`/`sin` of the fp32 angle. Both backends
//! compute exactly those fp32 roundings ([`inv_freq`], [`angle`]): the exponent `fp32(2i)/fp32(D)`
//! and the reciprocal are fp32 divisions, `theta^e` is evaluated in f64 and rounded once (the
//! correctly rounded fp32 power; PyTorch's fp32 `pow` can differ from it by an ulp), the angle is
//! one fp32 multiply, and `cos`/`sin` are evaluated in f64 on the fp32 angle and rounded once.
//! So the CPU reference and the CUDA kernel use the same cos/sin bits, within ~1 fp32 ulp of
//! HF's. No cos/sin table is kept: the kernel computes them per block (D/2 `pow` and
//! `tokens·D/2` `sincos` in double, small next to the memory traffic), so it needs no extra
//! buffer and has no maximum position. Positions are converted to fp32 like HF does (exact
//! below 2²⁴).
//!
//! On CUDA q and k are bf16 (`u16` bit patterns), rotated in fp32 and rounded once (HF rounds
//! cos/sin and every product to bf16; this is more accurate).

use super::Real;
use crate::error::{check_len, Error, Result};

/// Largest head dim the kernel handles (`ROPE_MAX_HALF`·2).
pub const MAX_HEAD_DIM: usize = 256;

/// HF's fp32 `inv_freq[i] = 1 / theta^(2i/D)` (see the module doc for the exact roundings).
pub fn inv_freq(i: usize, head_dim: usize, theta: f32) -> f32 {
    let e = (2 * i) as f32 / head_dim as f32;
    let p = (theta as f64).powf(e as f64) as f32;
    1.0f32 / p
}

/// HF's fp32 angle `fp32(pos) · inv_freq[i]`.
pub fn angle(pos: i32, i: usize, head_dim: usize, theta: f32) -> f32 {
    pos as f32 * inv_freq(i, head_dim, theta)
}

/// (cos, sin) of the fp32 [`angle`], in f64; rounding them to f32 gives the values both
/// backends use in fp32 (the f64 reference keeps them unrounded, an exactly orthogonal rotation).
pub fn cos_sin(pos: i32, i: usize, head_dim: usize, theta: f32) -> (f64, f64) {
    let a = angle(pos, i, head_dim, theta) as f64;
    (a.cos(), a.sin())
}

/// Checks the RoPE shape arguments; returns (n·hq·D, n·hkv·D).
pub fn check_dims(
    what: &str,
    n: usize,
    hq: usize,
    hkv: usize,
    head_dim: usize,
    theta: f32,
) -> Result<(usize, usize)> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) || head_dim > MAX_HEAD_DIM {
        return Err(Error::Invalid(format!(
            "{what}: head_dim = {head_dim}: must be even, in [2, {MAX_HEAD_DIM}]"
        )));
    }
    if !(theta > 0.0 && theta.is_finite()) {
        return Err(Error::Invalid(format!(
            "{what}: theta = {theta}: must be finite and > 0"
        )));
    }
    let ovf = || Error::Shape(format!("{what}: n·heads·head_dim overflows usize"));
    let lq = n
        .checked_mul(hq)
        .and_then(|v| v.checked_mul(head_dim))
        .ok_or_else(ovf)?;
    let lk = n
        .checked_mul(hkv)
        .and_then(|v| v.checked_mul(head_dim))
        .ok_or_else(ovf)?;
    Ok((lq, lk))
}

pub mod cpu {
    //! CPU references, generic over [`Real`] (f64 for checks, f32 for parity with CUDA).
    use super::*;

    fn rotate<T: Real>(x: &mut [T], heads: usize, head_dim: usize, c: &[T], s: &[T]) {
        let half = head_dim / 2;
        for h in 0..heads {
            let base = h * head_dim;
            for i in 0..half {
                let (a, b) = (x[base + i], x[base + half + i]);
                x[base + i] = a * c[i] - b * s[i];
                x[base + half + i] = b * c[i] + a * s[i];
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn apply<T: Real>(
        what: &str,
        q: &mut [T],
        k: &mut [T],
        pos: &[i32],
        n: usize,
        hq: usize,
        hkv: usize,
        head_dim: usize,
        theta: f32,
        inverse: bool,
    ) -> Result<()> {
        let (lq, lk) = check_dims(what, n, hq, hkv, head_dim, theta)?;
        check_len(&format!("{what} q"), q.len(), lq)?;
        check_len(&format!("{what} k"), k.len(), lk)?;
        check_len(&format!("{what} pos"), pos.len(), n)?;
        let half = head_dim / 2;
        let (mut c, mut s) = (vec![T::ZERO; half], vec![T::ZERO; half]);
        for t in 0..n {
            for i in 0..half {
                let (cv, sv) = cos_sin(pos[t], i, head_dim, theta);
                c[i] = T::from_f64(cv);
                s[i] = T::from_f64(if inverse { -sv } else { sv });
            }
            rotate(
                &mut q[t * hq * head_dim..(t + 1) * hq * head_dim],
                hq,
                head_dim,
                &c,
                &s,
            );
            rotate(
                &mut k[t * hkv * head_dim..(t + 1) * hkv * head_dim],
                hkv,
                head_dim,
                &c,
                &s,
            );
        }
        Ok(())
    }

    /// Rotates `q` (`[n][hq][D]`) and `k` (`[n][hkv][D]`) in place by the angles of `pos`.
    /// Errors: lengths, `D` odd, 0 or above [`MAX_HEAD_DIM`], `theta` not finite and > 0.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_fwd<T: Real>(
        q: &mut [T],
        k: &mut [T],
        pos: &[i32],
        n: usize,
        hq: usize,
        hkv: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        apply("rope_fwd", q, k, pos, n, hq, hkv, head_dim, theta, false)
    }

    /// Backward of [`rope_fwd`]: rotates `dq`, `dk` in place by the inverse rotation (replaces
    /// them with the gradient with respect to the pre-rotation q, k).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_bwd<T: Real>(
        dq: &mut [T],
        dk: &mut [T],
        pos: &[i32],
        n: usize,
        hq: usize,
        hkv: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        apply("rope_bwd", dq, dk, pos, n, hq, hkv, head_dim, theta, true)
    }
}

pub mod cuda {
    //! CUDA launchers (bf16 as `u16` bits). `*_raw` take raw device pointers and queue work on
    //! [`CudaDevice::stream`] without synchronising; the safe wrappers take cudarc views.
    use super::*;
    use crate::device::{blocks_for, CudaDevice};
    use crate::kernels::check_ptr;
    use cudarc::driver::{
        CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    };

    const FAMILY: &str = "rope";
    /// Tokens per block and threads per block (`ROPE_TOK`, `ROPE_THREADS`).
    const TOK: u32 = 8;
    const THREADS: u32 = 256;

    #[allow(clippy::too_many_arguments)]
    unsafe fn launch(
        dev: &CudaDevice,
        what: &str,
        q: u64,
        k: u64,
        pos: u64,
        n: usize,
        hq: usize,
        hkv: usize,
        head_dim: usize,
        q_stride: usize,
        k_stride: usize,
        theta: f32,
        inverse: bool,
    ) -> Result<()> {
        check_dims(what, n, hq, hkv, head_dim, theta)?;
        if n == 0 || hq + hkv == 0 {
            return Ok(());
        }
        let too_big = |v: usize, name: &str| -> Result<i32> {
            i32::try_from(v)
                .map_err(|_| Error::Shape(format!("{what}: {name} = {v} exceeds i32::MAX")))
        };
        let ni = too_big(n, "n")?;
        let hqi = too_big(hq, "hq")?;
        let hkvi = too_big(hkv, "hkv")?;
        let half = head_dim / 2;
        // Units per block must fit an i32 index: 8 tokens · (hq + hkv) · D/2.
        too_big(TOK as usize * (hq + hkv) * half, "8·(hq + hkv)·head_dim/2")?;
        check_ptr(&format!("{what} pos"), pos, 4)?;
        let mut ptrs = Vec::new();
        if hq > 0 {
            check_ptr(&format!("{what} q"), q, 2)?;
            if q_stride < hq * head_dim {
                return Err(Error::Shape(format!(
                    "{what}: q_stride = {q_stride} < hq·head_dim = {}",
                    hq * head_dim
                )));
            }
            ptrs.push((q, q_stride));
        }
        if hkv > 0 {
            check_ptr(&format!("{what} k"), k, 2)?;
            if k_stride < hkv * head_dim {
                return Err(Error::Shape(format!(
                    "{what}: k_stride = {k_stride} < hkv·head_dim = {}",
                    hkv * head_dim
                )));
            }
            ptrs.push((k, k_stride));
        }
        // Pairs per thread: 8 with 16-byte accesses when every head's halves start 16-byte
        // aligned, else 2 (4-byte), else 1.
        let aligned = |u: usize| {
            half.is_multiple_of(u)
                && ptrs
                    .iter()
                    .all(|&(p, st)| p.is_multiple_of(2 * u as u64) && st.is_multiple_of(u))
        };
        let unit: i32 = if aligned(8) {
            8
        } else if aligned(2) {
            2
        } else {
            1
        };
        let (qs, ks) = (q_stride as i64, k_stride as i64);
        let di = head_dim as i32;
        let inv = inverse as i32;
        let f = dev.function(FAMILY, "rope_apply")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&q)
            .arg(&k)
            .arg(&pos)
            .arg(&ni)
            .arg(&hqi)
            .arg(&hkvi)
            .arg(&di)
            .arg(&qs)
            .arg(&ks)
            .arg(&theta)
            .arg(&unit)
            .arg(&inv);
        let cfg = LaunchConfig {
            grid_dim: (blocks_for(n, TOK), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("rope_apply", a, cfg)
    }

    /// RoPE forward in place on raw pointers, q and k in one launch. Token `t`'s heads start at
    /// `q + 2·t·q_stride` bytes (strides in elements, ≥ `hq·D`, resp. `hkv·D`), so q and k can
    /// be views into a fused QKV buffer `[n][(hq + 2·hkv)·D]` (`q = base`, `k = base + hq·D`,
    /// both strides `(hq + 2·hkv)·D`). `hq` or `hkv` may be 0 (that pointer is then unused).
    /// `pos`: `[n]` i32.
    ///
    /// # Safety
    /// The pointers must be live device allocations of `dev`'s context covering the strided
    /// rows; the q and k regions touched must not overlap each other or `pos`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rope_fwd_raw(
        dev: &CudaDevice,
        q: u64,
        k: u64,
        pos: u64,
        n: usize,
        hq: usize,
        hkv: usize,
        head_dim: usize,
        q_stride: usize,
        k_stride: usize,
        theta: f32,
    ) -> Result<()> {
        launch(
            dev, "rope_fwd", q, k, pos, n, hq, hkv, head_dim, q_stride, k_stride, theta, false,
        )
    }

    /// RoPE backward in place on raw pointers: the inverse rotation of `dq`, `dk` (same layout
    /// rules as [`rope_fwd_raw`]).
    ///
    /// # Safety
    /// As [`rope_fwd_raw`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rope_bwd_raw(
        dev: &CudaDevice,
        dq: u64,
        dk: u64,
        pos: u64,
        n: usize,
        hq: usize,
        hkv: usize,
        head_dim: usize,
        q_stride: usize,
        k_stride: usize,
        theta: f32,
    ) -> Result<()> {
        launch(
            dev, "rope_bwd", dq, dk, pos, n, hq, hkv, head_dim, q_stride, k_stride, theta, true,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn safe(
        dev: &CudaDevice,
        what: &str,
        q: &mut CudaViewMut<'_, u16>,
        k: &mut CudaViewMut<'_, u16>,
        pos: &CudaView<'_, i32>,
        n: usize,
        hq: usize,
        hkv: usize,
        head_dim: usize,
        theta: f32,
        inverse: bool,
    ) -> Result<()> {
        let (lq, lk) = check_dims(what, n, hq, hkv, head_dim, theta)?;
        check_len(&format!("{what} q"), q.len(), lq)?;
        check_len(&format!("{what} k"), k.len(), lk)?;
        check_len(&format!("{what} pos"), pos.len(), n)?;
        if n == 0 || hq + hkv == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let (qp, _g1) = q.device_ptr_mut(s);
        let (kp, _g2) = k.device_ptr_mut(s);
        let (pp, _g3) = pos.device_ptr(s);
        // SAFETY: lengths checked above (contiguous rows); &mut views cannot alias.
        unsafe {
            launch(
                dev,
                what,
                qp,
                kp,
                pp,
                n,
                hq,
                hkv,
                head_dim,
                hq * head_dim,
                hkv * head_dim,
                theta,
                inverse,
            )
        }
    }

    /// RoPE forward in place on contiguous device views `q` `[n][hq][D]`, `k` `[n][hkv][D]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_fwd(
        dev: &CudaDevice,
        q: &mut CudaViewMut<'_, u16>,
        k: &mut CudaViewMut<'_, u16>,
        pos: &CudaView<'_, i32>,
        n: usize,
        hq: usize,
        hkv: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        safe(
            dev, "rope_fwd", q, k, pos, n, hq, hkv, head_dim, theta, false,
        )
    }

    /// RoPE backward in place on contiguous device views `dq`, `dk`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_bwd(
        dev: &CudaDevice,
        dq: &mut CudaViewMut<'_, u16>,
        dk: &mut CudaViewMut<'_, u16>,
        pos: &CudaView<'_, i32>,
        n: usize,
        hq: usize,
        hkv: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        safe(
            dev, "rope_bwd", dq, dk, pos, n, hq, hkv, head_dim, theta, true,
        )
    }
}
