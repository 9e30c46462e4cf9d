//! SwiGLU on a fused gate/up projection (`kernels/act.cu`), the Llama/Qwen2 MLP activation.
//!
//! # Layout and math
//! `gu` is `[n][2I]` token-major: columns `[0, I)` are the gate projection `g`, `[I, 2I)` the up
//! projection `u` (one GEMM with the gate and up weights stacked). `out` is `[n][I]`:
//! ```text
//! σ(g) = 1 / (1 + e^−g),   silu(g) = g·σ(g),   out = silu(g)·u
//! ∂out/∂g = u·σ(g)·(1 + g·(1 − σ(g))),   ∂out/∂u = silu(g)
//! ```
//! The backward **accumulates** into `dgu` (`[n][2I]`, `+=`). On CUDA everything is bf16
//! (`u16` bit patterns) with fp32 math, rounded once per output (HF rounds `silu(g)` to bf16
//! before the product; here there is one rounding).

use super::Real;
use crate::error::{check_len, Error, Result};

fn dims(what: &str, n: usize, inter: usize) -> Result<(usize, usize)> {
    if inter == 0 {
        return Err(Error::Invalid(format!(
            "{what}: intermediate size I = 0: must be > 0"
        )));
    }
    let ni = n
        .checked_mul(inter)
        .and_then(|v| v.checked_mul(2).map(|_| v))
        .ok_or_else(|| Error::Shape(format!("{what}: n·2I = {n}·2·{inter} overflows usize")))?;
    Ok((ni, 2 * ni))
}

/// σ(g) in `T`: `1/(1 + e^−g)` (e^−g = ∞ for very negative g gives exactly 0).
fn sigmoid<T: Real>(g: T) -> T {
    T::ONE / (T::ONE + (-g).exp())
}

pub mod cpu {
    //! CPU references, generic over [`Real`] (f64 for checks, f32 for parity with CUDA).
    use super::*;

    /// `out = silu(gate)·up` per row. Errors: lengths, `I = 0`.
    pub fn swiglu_fwd<T: Real>(gu: &[T], n: usize, inter: usize, out: &mut [T]) -> Result<()> {
        let (ni, n2i) = dims("swiglu_fwd", n, inter)?;
        check_len("swiglu_fwd gu", gu.len(), n2i)?;
        check_len("swiglu_fwd out", out.len(), ni)?;
        for row in 0..n {
            let (g, u) = gu[row * 2 * inter..(row + 1) * 2 * inter].split_at(inter);
            for ((o, &gv), &uv) in out[row * inter..(row + 1) * inter].iter_mut().zip(g).zip(u) {
                *o = (gv * sigmoid(gv)) * uv;
            }
        }
        Ok(())
    }

    /// Backward of [`swiglu_fwd`]: `dgu += ∂L/∂gu` given `dout = ∂L/∂out`.
    pub fn swiglu_bwd<T: Real>(
        gu: &[T],
        dout: &[T],
        n: usize,
        inter: usize,
        dgu: &mut [T],
    ) -> Result<()> {
        let (ni, n2i) = dims("swiglu_bwd", n, inter)?;
        check_len("swiglu_bwd gu", gu.len(), n2i)?;
        check_len("swiglu_bwd dout", dout.len(), ni)?;
        check_len("swiglu_bwd dgu", dgu.len(), n2i)?;
        for row in 0..n {
            let o = row * 2 * inter;
            for c in 0..inter {
                let (g, u) = (gu[o + c], gu[o + inter + c]);
                let d = dout[row * inter + c];
                let s = sigmoid(g);
                let ds = s * (T::ONE + g * (T::ONE - s));
                dgu[o + c] += (d * u) * ds;
                dgu[o + inter + c] += d * (g * s);
            }
        }
        Ok(())
    }
}

pub mod cuda {
    //! CUDA launchers (bf16 as `u16` bits). `*_raw` take raw device pointers and queue work on
    //! [`CudaDevice::stream`] without synchronising; the safe wrappers take cudarc views.
    use super::*;
    use crate::device::CudaDevice;
    use crate::kernels::check_ptr;
    use cudarc::driver::{
        CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    };

    const FAMILY: &str = "act";
    const THREADS: u32 = 256;
    /// Grid cap of the grid-stride loops (plenty for any GPU; keeps the grid a function of size).
    const MAX_BLOCKS: usize = 65536;

    /// (vec flag, grid) for `n` rows of `inter` columns.
    fn plan(n: usize, inter: usize, ptrs: &[u64]) -> (i32, u32) {
        let vec = inter.is_multiple_of(8) && ptrs.iter().all(|p| p.is_multiple_of(16));
        let units = if vec { n * (inter / 8) } else { n * inter };
        (
            vec as i32,
            units.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32,
        )
    }

    fn ints(what: &str, n: usize, inter: usize) -> Result<(i32, i32)> {
        let f = |v: usize, name: &str| {
            i32::try_from(v)
                .map_err(|_| Error::Shape(format!("{what}: {name} = {v} exceeds i32::MAX")))
        };
        // 2I must fit too: the kernels index gate/up columns as i32 products in i64.
        f(2 * inter, "2I")?;
        Ok((f(n, "n")?, f(inter, "I")?))
    }

    /// SwiGLU forward on raw pointers: `gu` bf16 `[n][2I]`, `out` bf16 `[n][I]`.
    ///
    /// # Safety
    /// The pointers must be live device allocations of `dev`'s context of those sizes; `out`
    /// must not overlap `gu`.
    pub unsafe fn swiglu_fwd_raw(
        dev: &CudaDevice,
        gu: u64,
        n: usize,
        inter: usize,
        out: u64,
    ) -> Result<()> {
        dims("swiglu_fwd", n, inter)?;
        if n == 0 {
            return Ok(());
        }
        let (ni, ii) = ints("swiglu_fwd", n, inter)?;
        check_ptr("swiglu_fwd gu", gu, 2)?;
        check_ptr("swiglu_fwd out", out, 2)?;
        let (vec, grid) = plan(n, inter, &[gu, out]);
        let f = dev.function(FAMILY, "act_swiglu_fwd")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&gu).arg(&out).arg(&ni).arg(&ii).arg(&vec);
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("act_swiglu_fwd", a, cfg)
    }

    /// SwiGLU backward on raw pointers: `dgu += ∂L/∂gu` (bf16 `[n][2I]`) from `dout` (`[n][I]`).
    ///
    /// # Safety
    /// As [`swiglu_fwd_raw`]; `dgu` must not overlap `gu` or `dout`.
    pub unsafe fn swiglu_bwd_raw(
        dev: &CudaDevice,
        gu: u64,
        dout: u64,
        n: usize,
        inter: usize,
        dgu: u64,
    ) -> Result<()> {
        dims("swiglu_bwd", n, inter)?;
        if n == 0 {
            return Ok(());
        }
        let (ni, ii) = ints("swiglu_bwd", n, inter)?;
        check_ptr("swiglu_bwd gu", gu, 2)?;
        check_ptr("swiglu_bwd dout", dout, 2)?;
        check_ptr("swiglu_bwd dgu", dgu, 2)?;
        let (vec, grid) = plan(n, inter, &[gu, dout, dgu]);
        let f = dev.function(FAMILY, "act_swiglu_bwd")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&gu).arg(&dout).arg(&dgu).arg(&ni).arg(&ii).arg(&vec);
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("act_swiglu_bwd", a, cfg)
    }

    /// SwiGLU forward on device views.
    pub fn swiglu_fwd(
        dev: &CudaDevice,
        gu: &CudaView<'_, u16>,
        n: usize,
        inter: usize,
        out: &mut CudaViewMut<'_, u16>,
    ) -> Result<()> {
        let (ni, n2i) = dims("swiglu_fwd", n, inter)?;
        check_len("swiglu_fwd gu", gu.len(), n2i)?;
        check_len("swiglu_fwd out", out.len(), ni)?;
        if n == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let (gp, _g1) = gu.device_ptr(s);
        let (op, _g2) = out.device_ptr_mut(s);
        // SAFETY: lengths checked above; the &mut view cannot alias the input.
        unsafe { swiglu_fwd_raw(dev, gp, n, inter, op) }
    }

    /// SwiGLU backward on device views: `dgu +=`.
    pub fn swiglu_bwd(
        dev: &CudaDevice,
        gu: &CudaView<'_, u16>,
        dout: &CudaView<'_, u16>,
        n: usize,
        inter: usize,
        dgu: &mut CudaViewMut<'_, u16>,
    ) -> Result<()> {
        let (ni, n2i) = dims("swiglu_bwd", n, inter)?;
        check_len("swiglu_bwd gu", gu.len(), n2i)?;
        check_len("swiglu_bwd dout", dout.len(), ni)?;
        check_len("swiglu_bwd dgu", dgu.len(), n2i)?;
        if n == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let (gp, _g1) = gu.device_ptr(s);
        let (dp, _g2) = dout.device_ptr(s);
        let (op, _g3) = dgu.device_ptr_mut(s);
        // SAFETY: lengths checked above; the &mut view cannot alias the inputs.
        unsafe { swiglu_bwd_raw(dev, gp, dp, n, inter, op) }
    }
}
