//! RMSNorm (`kernels/norm.cu`), the Llama/Qwen2 flavour, with a fused residual-add variant.
//!
//! # Layout and math
//! Activations are token-major `[n][d]` row-major (`n = B·S` tokens), the weight is `[d]`.
//! Per row, in fp32 on every backend:
//! ```text
//! r = 1 / sqrt(Σ_j h_j² / d + eps)        (saved as rstd[row], fp32)
//! y_j = (h_j · r) · w_j
//! ```
//! with `h = x` ([`cpu::rmsnorm_fwd`]) or `h = x + residual` ([`cpu::add_rmsnorm_fwd`], which
//! also writes `h`). Hugging Face rounds `h·r` to the activation dtype before multiplying by
//! `w`; here `y` is rounded once, so on bf16 it differs from HF by at most about one bf16 ulp.
//!
//! Backward, with `c = Σ_j dy_j·w_j·h_j` per row:
//! ```text
//! dh_j += (r·w_j)·dy_j − (r³·c/d)·h_j          dw_j += Σ_rows (dy_j·h_j)·r
//! ```
//! Every gradient output **accumulates** (`+=`). On CUDA `dx` is bf16 (read, add in fp32, round
//! once) and `dw` fp32; `dw` is reduced deterministically (per-chunk column sums into a
//! workspace, then an ordered sum), so repeated runs give identical bits.
//!
//! # The fused residual add and how a decoder uses it
//! A pre-norm decoder layer is `h₁ = r + attn(norm₁(r))`, `r' = h₁ + mlp(norm₂(h₁))`. Fusing
//! each residual add with the norm that follows it, one layer is
//! ```text
//! (h₁, a₂) = add_rmsnorm_fwd(x = attn_out, residual = r, w = w_norm2)    a₂ feeds the MLP
//! (r', a₁') = add_rmsnorm_fwd(x = mlp_out,  residual = h₁, w = w_norm1 of the next layer)
//! ```
//! (only the very first norm, on the embeddings, is a plain [`cpu::rmsnorm_fwd`]; the last one
//! is `add_rmsnorm_fwd` with the final norm weight). `h` is both the next add's residual and
//! this norm's input, and `x` and `residual` receive the same gradient: `dh_total = dh_down +
//! rmsnorm_bwd(h, dy)`, where `dh_down` is what flowed back into `h` from its other consumer.
//! So the decoder keeps **one** residual-stream gradient buffer `dR` and, walking back, calls
//! `rmsnorm_bwd(h, w, rstd, dy, dx = dR, dw)`: `dR += normgrad` turns it into `dh_total`, which
//! is then read as the gradient of `x` (the sublayer output, fed to its backward) and stays in
//! `dR` as the gradient of `residual`; no copy or second buffer. [`cpu::add_rmsnorm_bwd`] /
//! [`cuda::add_rmsnorm_bwd_raw`] are the explicit two-output form (`dx += dh_down + normgrad`,
//! `dres += dh_down + normgrad`) for callers that keep separate buffers.
//!
//! # Precision on CUDA
//! bf16 activations and weight (`CudaSlice<u16>` holding bf16 bit patterns, `half::bf16::to_bits`:
//! cudarc's `f16` feature is off in this crate), fp32 math and reductions, fp32 `rstd` and `dw`.
//! In the fused variant `h` is rounded to bf16 before it is normalised (as in HF, where the
//! residual add happens in bf16), so `y` matches an unfused bf16 pipeline.

use super::Real;
use crate::error::{check_len, Error, Result};

fn dims(what: &str, n: usize, d: usize) -> Result<usize> {
    if d == 0 {
        return Err(Error::Invalid(format!(
            "{what}: d = 0: rows must be non-empty"
        )));
    }
    n.checked_mul(d)
        .ok_or_else(|| Error::Shape(format!("{what}: n·d = {n}·{d} overflows usize")))
}

fn check_eps(what: &str, eps: f32) -> Result<()> {
    if !(eps > 0.0 && eps.is_finite()) {
        return Err(Error::Invalid(format!(
            "{what}: eps = {eps}: must be finite and > 0"
        )));
    }
    Ok(())
}

pub mod cpu {
    //! CPU references, generic over [`Real`] (f64 for checks, f32 for parity with CUDA).
    use super::*;

    fn norm_rows<T: Real>(
        h: &[T],
        w: &[T],
        n: usize,
        d: usize,
        eps: f32,
        y: &mut [T],
        rstd: &mut [T],
    ) {
        let eps = T::from_f64(eps as f64);
        let df = T::from_f64(d as f64);
        for row in 0..n {
            let hr = &h[row * d..(row + 1) * d];
            let mut ss = T::ZERO;
            for &v in hr {
                ss += v * v;
            }
            let r = T::ONE / (ss / df + eps).sqrt();
            rstd[row] = r;
            for ((yo, &hv), &wv) in y[row * d..(row + 1) * d].iter_mut().zip(hr).zip(w) {
                *yo = (hv * r) * wv;
            }
        }
    }

    /// `y = rmsnorm(x)·w` per row, `rstd[row] = 1/sqrt(mean(x²) + eps)`. `x`, `y`: `[n][d]`,
    /// `w`: `[d]`, `rstd`: `[n]`. Errors: lengths, `d = 0`, `eps` not finite and > 0.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_fwd<T: Real>(
        x: &[T],
        w: &[T],
        n: usize,
        d: usize,
        eps: f32,
        y: &mut [T],
        rstd: &mut [T],
    ) -> Result<()> {
        let nd = dims("rmsnorm_fwd", n, d)?;
        check_eps("rmsnorm_fwd", eps)?;
        check_len("rmsnorm_fwd x", x.len(), nd)?;
        check_len("rmsnorm_fwd w", w.len(), d)?;
        check_len("rmsnorm_fwd y", y.len(), nd)?;
        check_len("rmsnorm_fwd rstd", rstd.len(), n)?;
        norm_rows(x, w, n, d, eps, y, rstd);
        Ok(())
    }

    /// Fused residual add: `h = x + residual` (written), `y = rmsnorm(h)·w`, `rstd` as in
    /// [`rmsnorm_fwd`]. See the module doc for how a decoder chains it.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rmsnorm_fwd<T: Real>(
        x: &[T],
        residual: &[T],
        w: &[T],
        n: usize,
        d: usize,
        eps: f32,
        h: &mut [T],
        y: &mut [T],
        rstd: &mut [T],
    ) -> Result<()> {
        let nd = dims("add_rmsnorm_fwd", n, d)?;
        check_eps("add_rmsnorm_fwd", eps)?;
        check_len("add_rmsnorm_fwd x", x.len(), nd)?;
        check_len("add_rmsnorm_fwd residual", residual.len(), nd)?;
        check_len("add_rmsnorm_fwd w", w.len(), d)?;
        check_len("add_rmsnorm_fwd h", h.len(), nd)?;
        check_len("add_rmsnorm_fwd y", y.len(), nd)?;
        check_len("add_rmsnorm_fwd rstd", rstd.len(), n)?;
        for ((o, &a), &b) in h.iter_mut().zip(x).zip(residual) {
            *o = a + b;
        }
        norm_rows(h, w, n, d, eps, y, rstd);
        Ok(())
    }

    /// The shared backward: calls `emit(index, g)` with the input gradient of every element and
    /// accumulates `dw`.
    #[allow(clippy::too_many_arguments)]
    fn norm_bwd_rows<T: Real>(
        x: &[T],
        w: &[T],
        rstd: &[T],
        dy: &[T],
        n: usize,
        d: usize,
        dw: &mut [T],
        mut emit: impl FnMut(usize, T),
    ) {
        let df = T::from_f64(d as f64);
        for (row, &r) in rstd.iter().enumerate().take(n) {
            let o = row * d;
            let mut c = T::ZERO;
            for j in 0..d {
                c += (dy[o + j] * w[j]) * x[o + j];
            }
            let a = ((r * r) * r) * c / df;
            for j in 0..d {
                let g = (r * w[j]) * dy[o + j] - a * x[o + j];
                emit(o + j, g);
                dw[j] += (dy[o + j] * x[o + j]) * r;
            }
        }
    }

    /// Backward of [`rmsnorm_fwd`] given the saved `rstd`: `dx += ∂L/∂x`, `dw += ∂L/∂w`.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_bwd<T: Real>(
        x: &[T],
        w: &[T],
        rstd: &[T],
        dy: &[T],
        n: usize,
        d: usize,
        dx: &mut [T],
        dw: &mut [T],
    ) -> Result<()> {
        let nd = dims("rmsnorm_bwd", n, d)?;
        check_len("rmsnorm_bwd x", x.len(), nd)?;
        check_len("rmsnorm_bwd w", w.len(), d)?;
        check_len("rmsnorm_bwd rstd", rstd.len(), n)?;
        check_len("rmsnorm_bwd dy", dy.len(), nd)?;
        check_len("rmsnorm_bwd dx", dx.len(), nd)?;
        check_len("rmsnorm_bwd dw", dw.len(), d)?;
        norm_bwd_rows(x, w, rstd, dy, n, d, dw, |i, g| dx[i] += g);
        Ok(())
    }

    /// Backward of [`add_rmsnorm_fwd`]: with `g = dh_down + ∂(y·dy)/∂h` (`dh_down`: the
    /// gradient that reached `h` from its other consumers, `None` = 0), `dx += g`,
    /// `dres += g`, `dw += ∂L/∂w`. `h` and `rstd` are the forward's outputs.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rmsnorm_bwd<T: Real>(
        h: &[T],
        w: &[T],
        rstd: &[T],
        dy: &[T],
        dh_down: Option<&[T]>,
        n: usize,
        d: usize,
        dx: &mut [T],
        dres: &mut [T],
        dw: &mut [T],
    ) -> Result<()> {
        let nd = dims("add_rmsnorm_bwd", n, d)?;
        check_len("add_rmsnorm_bwd h", h.len(), nd)?;
        check_len("add_rmsnorm_bwd w", w.len(), d)?;
        check_len("add_rmsnorm_bwd rstd", rstd.len(), n)?;
        check_len("add_rmsnorm_bwd dy", dy.len(), nd)?;
        if let Some(dh) = dh_down {
            check_len("add_rmsnorm_bwd dh_down", dh.len(), nd)?;
        }
        check_len("add_rmsnorm_bwd dx", dx.len(), nd)?;
        check_len("add_rmsnorm_bwd dres", dres.len(), nd)?;
        check_len("add_rmsnorm_bwd dw", dw.len(), d)?;
        norm_bwd_rows(h, w, rstd, dy, n, d, dw, |i, g| {
            let g = match dh_down {
                Some(dh) => g + dh[i],
                None => g,
            };
            dx[i] += g;
            dres[i] += g;
        });
        Ok(())
    }
}

pub mod cuda {
    //! CUDA launchers. bf16 buffers are `u16` bit patterns. `*_raw` take raw device pointers
    //! (`CUdeviceptr` as u64, e.g. arena offsets) and queue work on [`CudaDevice::stream`]
    //! without synchronising; the safe wrappers take cudarc views and check lengths. Outputs
    //! must not overlap inputs or each other.
    use super::*;
    use crate::device::{blocks_for, CudaDevice};
    use crate::kernels::{check_i32, check_ptr};
    use cudarc::driver::{
        CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    };

    const FAMILY: &str = "norm";
    /// Rows (warps) per block of the row kernels (`NORM_WARPS`).
    const WARPS: u32 = 8;
    /// Columns per block of the dw partial kernel (`NORM_DW_COLS`).
    const DW_COLS: u32 = 128;
    /// Block of the dw finalize kernel (`NORM_FIN_X`, `NORM_FIN_Y`).
    const FIN: (u32, u32) = (32, 16);
    /// At most this many row chunks in the dw reduction (bounds the workspace).
    const MAX_CHUNKS: usize = 256;
    /// At least this many rows per chunk.
    const MIN_ROWS_PER_CHUNK: usize = 64;

    /// 16-byte vector path: every row starts 16-byte aligned and holds whole vectors of 8.
    fn vec_path(d: usize, ptrs: &[u64]) -> i32 {
        (d.is_multiple_of(8) && ptrs.iter().all(|p| p.is_multiple_of(16))) as i32
    }

    /// (rows per chunk, chunks) of the dw reduction over `n` rows: depends on `n` only.
    pub fn dw_chunks(n: usize) -> (usize, usize) {
        let rows = n.div_ceil(MAX_CHUNKS).max(MIN_ROWS_PER_CHUNK);
        (rows, n.div_ceil(rows).max(1))
    }

    /// f32 elements of the workspace [`rmsnorm_bwd_raw`] / [`add_rmsnorm_bwd_raw`] need.
    pub fn rmsnorm_bwd_workspace_len(n: usize, d: usize) -> usize {
        dw_chunks(n).1 * d
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn fwd_launch(
        dev: &CudaDevice,
        what: &str,
        x: u64,
        res: u64,
        w: u64,
        n: usize,
        d: usize,
        eps: f32,
        h: u64,
        y: u64,
        rstd: u64,
    ) -> Result<()> {
        dims(what, n, d)?;
        check_eps(what, eps)?;
        if n == 0 {
            return Ok(());
        }
        let ni = check_i32(&format!("{what} n"), n)?;
        let di = check_i32(&format!("{what} d"), d)?;
        let mut ptrs = vec![("x", x, 2), ("w", w, 2), ("y", y, 2), ("rstd", rstd, 4)];
        if res != 0 || h != 0 {
            ptrs.push(("residual", res, 2));
            ptrs.push(("h", h, 2));
        }
        for (name, p, a) in &ptrs {
            check_ptr(&format!("{what} {name}"), *p, *a)?;
        }
        let vec = vec_path(d, &[x, res, w, h, y]);
        let f = dev.function(FAMILY, "norm_rmsnorm_fwd")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&x)
            .arg(&res)
            .arg(&w)
            .arg(&h)
            .arg(&y)
            .arg(&rstd)
            .arg(&ni)
            .arg(&di)
            .arg(&eps)
            .arg(&vec);
        let cfg = LaunchConfig {
            grid_dim: (blocks_for(n, WARPS), 1, 1),
            block_dim: (32 * WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("norm_rmsnorm_fwd", a, cfg)
    }

    /// RMSNorm forward on raw pointers: `x`, `y` bf16 `[n][d]`, `w` bf16 `[d]`, `rstd` f32 `[n]`.
    ///
    /// # Safety
    /// The pointers must be live device allocations of `dev`'s context of the sizes above; `y`
    /// and `rstd` must not overlap anything else.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rmsnorm_fwd_raw(
        dev: &CudaDevice,
        x: u64,
        w: u64,
        n: usize,
        d: usize,
        eps: f32,
        y: u64,
        rstd: u64,
    ) -> Result<()> {
        fwd_launch(dev, "rmsnorm_fwd", x, 0, w, n, d, eps, 0, y, rstd)
    }

    /// Fused residual add + RMSNorm on raw pointers: `h = bf16(x + residual)` written, `y`,
    /// `rstd` as in [`rmsnorm_fwd_raw`]. `x`, `residual`, `h`, `y` bf16 `[n][d]`.
    ///
    /// # Safety
    /// As [`rmsnorm_fwd_raw`]; `h` must not overlap anything else either.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn add_rmsnorm_fwd_raw(
        dev: &CudaDevice,
        x: u64,
        residual: u64,
        w: u64,
        n: usize,
        d: usize,
        eps: f32,
        h: u64,
        y: u64,
        rstd: u64,
    ) -> Result<()> {
        if n > 0 {
            check_ptr("add_rmsnorm_fwd residual", residual, 2)?;
            check_ptr("add_rmsnorm_fwd h", h, 2)?;
        }
        fwd_launch(
            dev,
            "add_rmsnorm_fwd",
            x,
            residual,
            w,
            n,
            d,
            eps,
            h,
            y,
            rstd,
        )
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn bwd_launch(
        dev: &CudaDevice,
        what: &str,
        x: u64,
        w: u64,
        rstd: u64,
        dy: u64,
        dh: u64,
        n: usize,
        d: usize,
        dx: u64,
        dx2: u64,
        dw: u64,
        workspace: u64,
    ) -> Result<()> {
        dims(what, n, d)?;
        if n == 0 {
            return Ok(()); // nothing to accumulate
        }
        let ni = check_i32(&format!("{what} n"), n)?;
        let di = check_i32(&format!("{what} d"), d)?;
        for (name, p, a) in [
            ("x", x, 2),
            ("w", w, 2),
            ("rstd", rstd, 4),
            ("dy", dy, 2),
            ("dx", dx, 2),
            ("dw", dw, 4),
            ("workspace", workspace, 4),
        ] {
            check_ptr(&format!("{what} {name}"), p, a)?;
        }
        if dh != 0 {
            check_ptr(&format!("{what} dh_down"), dh, 2)?;
        }
        if dx2 != 0 {
            check_ptr(&format!("{what} dres"), dx2, 2)?;
        }
        let vec = vec_path(d, &[x, w, dy, dh, dx, dx2]);
        let f = dev.function(FAMILY, "norm_rmsnorm_bwd_dx")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&x)
            .arg(&w)
            .arg(&rstd)
            .arg(&dy)
            .arg(&dh)
            .arg(&dx)
            .arg(&dx2)
            .arg(&ni)
            .arg(&di)
            .arg(&vec);
        let cfg = LaunchConfig {
            grid_dim: (blocks_for(n, WARPS), 1, 1),
            block_dim: (32 * WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("norm_rmsnorm_bwd_dx", a, cfg)?;

        let (rows, chunks) = dw_chunks(n);
        let rows_i = check_i32(&format!("{what} rows per chunk"), rows)?;
        let chunks_i = chunks as i32; // ≤ MAX_CHUNKS
        let f = dev.function(FAMILY, "norm_rmsnorm_bwd_dw_partial")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&x)
            .arg(&dy)
            .arg(&rstd)
            .arg(&workspace)
            .arg(&ni)
            .arg(&di)
            .arg(&rows_i);
        let cfg = LaunchConfig {
            grid_dim: (blocks_for(d, DW_COLS), chunks as u32, 1),
            block_dim: (DW_COLS, 1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("norm_rmsnorm_bwd_dw_partial", a, cfg)?;

        let f = dev.function(FAMILY, "norm_rmsnorm_bwd_dw_finalize")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&workspace).arg(&chunks_i).arg(&di).arg(&dw);
        let cfg = LaunchConfig {
            grid_dim: (blocks_for(d, FIN.0), 1, 1),
            block_dim: (FIN.0, FIN.1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("norm_rmsnorm_bwd_dw_finalize", a, cfg)
    }

    /// RMSNorm backward on raw pointers (three launches): `dx += ∂L/∂x` (bf16 `[n][d]`),
    /// `dw += ∂L/∂w` (f32 `[d]`), deterministic. `x`, `dy` bf16 `[n][d]`, `w` bf16 `[d]`,
    /// `rstd` f32 `[n]` (from the forward), `workspace` [`rmsnorm_bwd_workspace_len`]`(n, d)` f32.
    ///
    /// # Safety
    /// The pointers must be live device allocations of `dev`'s context of the sizes above;
    /// `dx`, `dw`, `workspace` must not overlap anything else.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rmsnorm_bwd_raw(
        dev: &CudaDevice,
        x: u64,
        w: u64,
        rstd: u64,
        dy: u64,
        n: usize,
        d: usize,
        dx: u64,
        dw: u64,
        workspace: u64,
    ) -> Result<()> {
        bwd_launch(
            dev,
            "rmsnorm_bwd",
            x,
            w,
            rstd,
            dy,
            0,
            n,
            d,
            dx,
            0,
            dw,
            workspace,
        )
    }

    /// Backward of the fused residual add on raw pointers: with `g = dh_down + normgrad(h)`,
    /// `dx += g`, `dres += g` (both bf16 `[n][d]`, distinct buffers), `dw +=`. `dh_down` may
    /// be 0 (no upstream gradient). See the module doc for the cheaper one-buffer pattern.
    ///
    /// # Safety
    /// As [`rmsnorm_bwd_raw`]; `dres` must not overlap anything else either.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn add_rmsnorm_bwd_raw(
        dev: &CudaDevice,
        h: u64,
        w: u64,
        rstd: u64,
        dy: u64,
        dh_down: u64,
        n: usize,
        d: usize,
        dx: u64,
        dres: u64,
        dw: u64,
        workspace: u64,
    ) -> Result<()> {
        if n > 0 {
            check_ptr("add_rmsnorm_bwd dres", dres, 2)?;
        }
        bwd_launch(
            dev,
            "add_rmsnorm_bwd",
            h,
            w,
            rstd,
            dy,
            dh_down,
            n,
            d,
            dx,
            dres,
            dw,
            workspace,
        )
    }

    fn check_fwd_lens(what: &str, n: usize, d: usize, lens: &[(&str, usize, usize)]) -> Result<()> {
        dims(what, n, d)?;
        for (name, got, want) in lens {
            check_len(&format!("{what} {name}"), *got, *want)?;
        }
        Ok(())
    }

    /// RMSNorm forward on device views (bf16 as `u16` bits).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_fwd(
        dev: &CudaDevice,
        x: &CudaView<'_, u16>,
        w: &CudaView<'_, u16>,
        n: usize,
        d: usize,
        eps: f32,
        y: &mut CudaViewMut<'_, u16>,
        rstd: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let nd = dims("rmsnorm_fwd", n, d)?;
        check_fwd_lens(
            "rmsnorm_fwd",
            n,
            d,
            &[
                ("x", x.len(), nd),
                ("w", w.len(), d),
                ("y", y.len(), nd),
                ("rstd", rstd.len(), n),
            ],
        )?;
        check_eps("rmsnorm_fwd", eps)?;
        if n == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let (xp, _g1) = x.device_ptr(s);
        let (wp, _g2) = w.device_ptr(s);
        let (yp, _g3) = y.device_ptr_mut(s);
        let (rp, _g4) = rstd.device_ptr_mut(s);
        // SAFETY: lengths checked above; &mut views cannot alias each other or the inputs.
        unsafe { rmsnorm_fwd_raw(dev, xp, wp, n, d, eps, yp, rp) }
    }

    /// Fused residual add + RMSNorm on device views (bf16 as `u16` bits).
    #[allow(clippy::too_many_arguments)]
    pub fn add_rmsnorm_fwd(
        dev: &CudaDevice,
        x: &CudaView<'_, u16>,
        residual: &CudaView<'_, u16>,
        w: &CudaView<'_, u16>,
        n: usize,
        d: usize,
        eps: f32,
        h: &mut CudaViewMut<'_, u16>,
        y: &mut CudaViewMut<'_, u16>,
        rstd: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let nd = dims("add_rmsnorm_fwd", n, d)?;
        check_fwd_lens(
            "add_rmsnorm_fwd",
            n,
            d,
            &[
                ("x", x.len(), nd),
                ("residual", residual.len(), nd),
                ("w", w.len(), d),
                ("h", h.len(), nd),
                ("y", y.len(), nd),
                ("rstd", rstd.len(), n),
            ],
        )?;
        check_eps("add_rmsnorm_fwd", eps)?;
        if n == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let (xp, _g1) = x.device_ptr(s);
        let (rp, _g2) = residual.device_ptr(s);
        let (wp, _g3) = w.device_ptr(s);
        let (hp, _g4) = h.device_ptr_mut(s);
        let (yp, _g5) = y.device_ptr_mut(s);
        let (sp, _g6) = rstd.device_ptr_mut(s);
        // SAFETY: lengths checked above; &mut views cannot alias each other or the inputs.
        unsafe { add_rmsnorm_fwd_raw(dev, xp, rp, wp, n, d, eps, hp, yp, sp) }
    }

    /// RMSNorm backward on device views: `dx +=`, `dw +=` (allocates its workspace).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_bwd(
        dev: &CudaDevice,
        x: &CudaView<'_, u16>,
        w: &CudaView<'_, u16>,
        rstd: &CudaView<'_, f32>,
        dy: &CudaView<'_, u16>,
        n: usize,
        d: usize,
        dx: &mut CudaViewMut<'_, u16>,
        dw: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let nd = dims("rmsnorm_bwd", n, d)?;
        check_fwd_lens(
            "rmsnorm_bwd",
            n,
            d,
            &[
                ("x", x.len(), nd),
                ("w", w.len(), d),
                ("rstd", rstd.len(), n),
                ("dy", dy.len(), nd),
                ("dx", dx.len(), nd),
                ("dw", dw.len(), d),
            ],
        )?;
        if n == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let mut ws = s.alloc_zeros::<f32>(rmsnorm_bwd_workspace_len(n, d))?;
        let (xp, _g1) = x.device_ptr(s);
        let (wp, _g2) = w.device_ptr(s);
        let (rp, _g3) = rstd.device_ptr(s);
        let (dyp, _g4) = dy.device_ptr(s);
        let (dxp, _g5) = dx.device_ptr_mut(s);
        let (dwp, _g6) = dw.device_ptr_mut(s);
        let (wsp, _g7) = ws.device_ptr_mut(s);
        // SAFETY: lengths checked above; &mut views and the fresh workspace cannot alias.
        unsafe { rmsnorm_bwd_raw(dev, xp, wp, rp, dyp, n, d, dxp, dwp, wsp) }
    }

    /// Backward of the fused residual add on device views: `dx += g`, `dres += g`, `dw +=`
    /// with `g = dh_down + normgrad(h)` (allocates its workspace).
    #[allow(clippy::too_many_arguments)]
    pub fn add_rmsnorm_bwd(
        dev: &CudaDevice,
        h: &CudaView<'_, u16>,
        w: &CudaView<'_, u16>,
        rstd: &CudaView<'_, f32>,
        dy: &CudaView<'_, u16>,
        dh_down: Option<&CudaView<'_, u16>>,
        n: usize,
        d: usize,
        dx: &mut CudaViewMut<'_, u16>,
        dres: &mut CudaViewMut<'_, u16>,
        dw: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let nd = dims("add_rmsnorm_bwd", n, d)?;
        check_fwd_lens(
            "add_rmsnorm_bwd",
            n,
            d,
            &[
                ("h", h.len(), nd),
                ("w", w.len(), d),
                ("rstd", rstd.len(), n),
                ("dy", dy.len(), nd),
                ("dh_down", dh_down.map_or(nd, |v| v.len()), nd),
                ("dx", dx.len(), nd),
                ("dres", dres.len(), nd),
                ("dw", dw.len(), d),
            ],
        )?;
        if n == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let mut ws = s.alloc_zeros::<f32>(rmsnorm_bwd_workspace_len(n, d))?;
        let (hp, _g1) = h.device_ptr(s);
        let (wp, _g2) = w.device_ptr(s);
        let (rp, _g3) = rstd.device_ptr(s);
        let (dyp, _g4) = dy.device_ptr(s);
        let dh = dh_down.map(|v| v.device_ptr(s));
        let dhp = dh.as_ref().map_or(0, |(p, _)| *p);
        let (dxp, _g5) = dx.device_ptr_mut(s);
        let (drp, _g6) = dres.device_ptr_mut(s);
        let (dwp, _g7) = dw.device_ptr_mut(s);
        let (wsp, _g8) = ws.device_ptr_mut(s);
        // SAFETY: lengths checked above; &mut views and the fresh workspace cannot alias.
        unsafe { add_rmsnorm_bwd_raw(dev, hp, wp, rp, dyp, dhp, n, d, dxp, drp, dwp, wsp) }
    }
}
