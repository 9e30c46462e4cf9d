//! The optimizer step (`kernels/adamw.cu`): fused AdamW over a flat fp32 parameter vector, the
//! global gradient norm over a list of gradient buffers, and clipping.
//!
//! # AdamW (as `torch.optim.AdamW`, single-tensor path)
//! With step `t >= 1` (1 for the first update), `bc1 = 1 − β1^t`, `bc2 = 1 − β2^t`, and the
//! gradient scaled by the clip factor `s` (`g ← g·s`):
//! ```text
//! p ← p·(1 − lr·wd)                                  decoupled weight decay
//! m ← m + (1 − β1)·(g − m)                           (= β1·m + (1 − β1)·g)
//! v ← β2·v + ((1 − β2)·g)·g
//! p ← p − (lr/bc1)·( m / (sqrt(v)/sqrt(bc2) + eps) )
//! ```
//! in exactly this operation order. The per-step scalars `1 − lr·wd`, `lr/bc1`, `sqrt(bc2)`,
//! `1 − β1`, `1 − β2` are computed in f64 on the host ([`AdamWParams::scalars`]) and rounded once
//! to the working precision, so the f32 CPU reference and the kernel (explicit round-to-nearest
//! intrinsics, no FMA contraction) agree bit for bit. `lr` and `wd` are per call: the caller
//! decides the schedule and which tensors decay (`wd = 0` for the ones that do not).
//! An optional bf16 copy of the updated weights is written (round to nearest even).
//!
//! # Gradient norm and clipping
//! `norm = sqrt(Σ g²)` over every element of every buffer, accumulated in f64 (on the GPU: a
//! deterministic two-pass reduction, fixed grid and tree order, no atomics). The clip scale is
//! `min(1, max_norm / (norm + 1e-6))` (`max_norm = +inf`: no clipping, scale 1). When the norm is
//! not finite (a NaN or inf gradient) the scale is NaN: the trainer should skip the step, and
//! the AdamW step itself refuses to update with a non-finite scale (CPU: returns `Ok(false)`;
//! GPU: the kernel returns without writing). On the GPU the norm and the scale live in a device
//! buffer `clip = [norm, scale]` (f32) that the step kernel reads, so nothing goes through the
//! host. The guard relies on the scale: pass the `clip` buffer of `grad_norm` over the same
//! gradients (a finite norm implies finite gradients).

use super::Real;
use crate::error::{check_len, Error, Result};

/// Added to the norm in the clip scale: `min(1, max_norm / (norm + NORM_EPS))`.
pub const NORM_EPS: f64 = 1e-6;

/// AdamW hyper-parameters of one step. Held in f64, like torch's Python floats: `1 − β2` from
/// an f32 `β2 = 0.999` would be off by 1.3e-5 relative.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    /// Learning rate (>= 0).
    pub lr: f64,
    /// β1 in [0, 1).
    pub beta1: f64,
    /// β2 in [0, 1).
    pub beta2: f64,
    /// ε (> 0).
    pub eps: f64,
    /// Decoupled weight decay (>= 0); 0 for tensors that do not decay.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// torch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2.
    fn default() -> Self {
        AdamWParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// The per-step scalars of [`AdamWParams`] at step `t`, in f64.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    /// `1 − lr·wd`.
    pub decay: f64,
    /// `lr / (1 − β1^t)`.
    pub step_size: f64,
    /// `sqrt(1 − β2^t)`.
    pub bc2_sqrt: f64,
    /// `1 − β1`.
    pub one_minus_beta1: f64,
    /// `β2`.
    pub beta2: f64,
    /// `1 − β2`.
    pub one_minus_beta2: f64,
    /// `ε`.
    pub eps: f64,
}

impl AdamWParams {
    /// Checks the ranges (see the fields).
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64, rule: &str| {
            Err(Error::Invalid(format!(
                "AdamWParams.{what} = {v}: must be {rule}"
            )))
        };
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return bad("lr", self.lr, "finite and >= 0");
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", self.beta1, "in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", self.beta2, "in [0, 1)");
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return bad("eps", self.eps, "finite and > 0");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", self.weight_decay, "finite and >= 0");
        }
        Ok(())
    }

    /// The scalars of step `step` (1-based), computed in f64.
    pub fn scalars(&self, step: u64) -> Result<AdamWScalars> {
        self.validate()?;
        if step == 0 {
            return Err(Error::Invalid(
                "adamw: step = 0: steps count from 1 (bias correction 1 − β^t would be 0)".into(),
            ));
        }
        let t = step.min(i32::MAX as u64) as i32;
        let (lr, b1, b2) = (self.lr, self.beta1, self.beta2);
        Ok(AdamWScalars {
            decay: 1.0 - lr * self.weight_decay,
            step_size: lr / (1.0 - b1.powi(t)),
            bc2_sqrt: (1.0 - b2.powi(t)).sqrt(),
            one_minus_beta1: 1.0 - b1,
            beta2: b2,
            one_minus_beta2: 1.0 - b2,
            eps: self.eps,
        })
    }
}

/// Clip scale `min(1, max_norm / (norm + 1e-6))` in f64, rounded to f32 (as the GPU stores it);
/// NaN when `norm` is not finite (skip the step).
pub fn clip_scale(norm: f64, max_norm: f32) -> f32 {
    if norm.is_finite() {
        (max_norm as f64 / (norm + NORM_EPS)).min(1.0) as f32
    } else {
        f32::NAN
    }
}

fn check_max_norm(max_norm: f32) -> Result<()> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(Error::Invalid(format!(
            "grad_norm: max_norm = {max_norm}: must be > 0 (+inf for no clipping)"
        )));
    }
    Ok(())
}

pub mod cpu {
    //! CPU references, generic over [`Real`] (f64 for checks, f32 for bit parity with CUDA).
    use super::*;

    /// `sqrt(Σ g²)` over every buffer, accumulated in f64 (NaN or inf when a gradient is not
    /// finite).
    pub fn grad_norm<T: Real>(grads: &[&[T]]) -> f64 {
        grads
            .iter()
            .flat_map(|b| b.iter())
            .map(|&g| {
                let g = g.to_f64();
                g * g
            })
            .sum::<f64>()
            .sqrt()
    }

    /// One AdamW step (see the module doc) with the gradient scaled by `grad_scale` (the clip
    /// scale; 1 for none). Returns `Ok(false)` without touching anything when `grad_scale` is
    /// not finite (the step is skipped), `Ok(true)` after an update. `bf16_out`, when given,
    /// receives the updated weights as bf16 bits.
    #[allow(clippy::too_many_arguments)]
    pub fn step<T: Real>(
        params: &mut [T],
        grads: &[T],
        m: &mut [T],
        v: &mut [T],
        bf16_out: Option<&mut [u16]>,
        hp: &AdamWParams,
        step: u64,
        grad_scale: f32,
    ) -> Result<bool> {
        let sc = hp.scalars(step)?;
        let n = params.len();
        check_len("adamw grads", grads.len(), n)?;
        check_len("adamw m", m.len(), n)?;
        check_len("adamw v", v.len(), n)?;
        if let Some(b) = bf16_out.as_deref() {
            check_len("adamw bf16_out", b.len(), n)?;
        }
        if !grad_scale.is_finite() {
            return Ok(false);
        }
        let f = T::from_f64;
        let (s, b1c, b2, b2c) = (
            f(grad_scale as f64),
            f(sc.one_minus_beta1),
            f(sc.beta2),
            f(sc.one_minus_beta2),
        );
        let (eps, decay, step_size, bc2s) =
            (f(sc.eps), f(sc.decay), f(sc.step_size), f(sc.bc2_sqrt));
        for i in 0..n {
            let gs = grads[i] * s;
            let mi = m[i] + b1c * (gs - m[i]);
            let vi = b2 * v[i] + (b2c * gs) * gs;
            let pd = params[i] * decay;
            let denom = vi.sqrt() / bc2s + eps;
            params[i] = pd - step_size * (mi / denom);
            m[i] = mi;
            v[i] = vi;
        }
        if let Some(b) = bf16_out {
            for (o, &p) in b.iter_mut().zip(params.iter()) {
                *o = half::bf16::from_f32(p.to_f64() as f32).to_bits();
            }
        }
        Ok(true)
    }
}

pub mod cuda {
    //! CUDA launchers. `*_raw` take raw device pointers (`CUdeviceptr` as u64) and queue work on
    //! [`CudaDevice::stream`] without synchronising; the safe wrappers take cudarc views.
    use super::*;
    use crate::device::CudaDevice;
    use crate::kernels::check_ptr;
    use cudarc::driver::PushKernelArg;
    use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig};

    const FAMILY: &str = "adamw";
    /// Threads per block (`ADAMW_BLOCK`, `NORM_BLOCK` in adamw.cu).
    const ADAMW_BLOCK: u32 = 256;
    const NORM_BLOCK: u32 = 256;
    /// Most partial blocks of the norm's first pass.
    const MAX_NORM_PARTIALS: usize = 1024;

    /// Blocks of the norm's first pass over `total` elements (about 16 per thread, at most
    /// 1024, at least 1). Depends on `total` only, so the norm is identical on every GPU.
    pub fn norm_blocks(total: usize) -> usize {
        total
            .div_ceil(NORM_BLOCK as usize * 16)
            .clamp(1, MAX_NORM_PARTIALS)
    }

    /// f64 elements of the workspace [`grad_norm_raw`] needs: the partials, then the norm.
    pub fn grad_norm_workspace_len(total: usize) -> usize {
        norm_blocks(total) + 1
    }

    /// The device table [`grad_norm_raw`] reads, for buffers `(address, length in f32)`:
    /// the addresses, then the prefix offsets (`2·len + 1` u64). Upload it once for a fixed
    /// set of buffers (e.g. the gradient arena of a graph).
    pub fn grad_norm_table(bufs: &[(u64, usize)]) -> Vec<u64> {
        let mut t: Vec<u64> = bufs.iter().map(|&(p, _)| p).collect();
        let mut off = 0u64;
        t.push(0);
        for &(_, len) in bufs {
            off += len as u64;
            t.push(off);
        }
        t
    }

    /// Global gradient norm on raw pointers: two launches, no synchronisation. `table` is
    /// [`grad_norm_table`] of `nbufs` buffers holding `total` elements in all, on the device;
    /// `clip` (2 f32) receives `[norm, scale]` (scale NaN when the norm is not finite);
    /// `workspace` holds [`grad_norm_workspace_len`]`(total)` f64, its last element the norm in
    /// f64 afterwards.
    ///
    /// # Safety
    /// The table must describe live fp32 buffers on `dev`'s context (4-byte aligned, lengths
    /// and offsets as built by [`grad_norm_table`]); `clip` and `workspace` must not overlap
    /// anything else.
    pub unsafe fn grad_norm_raw(
        dev: &CudaDevice,
        table: u64,
        nbufs: usize,
        total: usize,
        max_norm: f32,
        clip: u64,
        workspace: u64,
    ) -> Result<()> {
        check_max_norm(max_norm)?;
        check_ptr("grad_norm table", table, 8)?;
        check_ptr("grad_norm clip", clip, 4)?;
        check_ptr("grad_norm workspace", workspace, 8)?;
        let nb = i32::try_from(nbufs)
            .map_err(|_| Error::Shape(format!("grad_norm: {nbufs} buffers exceed i32::MAX")))?;
        let g = norm_blocks(total);
        let chunk = total.div_ceil(g).max(1) as i64;
        let (tl, gi) = (total as i64, g as i32);
        let norm_out = workspace + 8 * g as u64;

        let f = dev.function(FAMILY, "adamw_norm_partial")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&table).arg(&nb).arg(&tl).arg(&chunk).arg(&workspace);
        dev.launch(
            "adamw_norm_partial",
            a,
            LaunchConfig {
                grid_dim: (g as u32, 1, 1),
                block_dim: (NORM_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            },
        )?;
        let f = dev.function(FAMILY, "adamw_norm_finalize")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&workspace)
            .arg(&gi)
            .arg(&max_norm)
            .arg(&clip)
            .arg(&norm_out);
        dev.launch(
            "adamw_norm_finalize",
            a,
            LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (NORM_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    }

    fn norm_with_workspace(
        dev: &CudaDevice,
        grads: &[&CudaView<'_, f32>],
        max_norm: f32,
        clip: &mut CudaViewMut<'_, f32>,
        ws: &mut cudarc::driver::CudaSlice<f64>,
    ) -> Result<()> {
        check_max_norm(max_norm)?;
        check_len("grad_norm clip", clip.len(), 2)?;
        let s = dev.stream();
        let mut bufs = Vec::with_capacity(grads.len());
        let mut guards = Vec::with_capacity(grads.len());
        for g in grads {
            let (p, guard) = g.device_ptr(s);
            // An empty view may carry any address: give it a harmless aligned one.
            bufs.push((if g.is_empty() { 8 } else { p }, g.len()));
            guards.push(guard);
        }
        let total: usize = bufs.iter().map(|b| b.1).sum();
        check_len(
            "grad_norm workspace",
            ws.len(),
            grad_norm_workspace_len(total),
        )?;
        let table = s.clone_htod(&grad_norm_table(&bufs))?;
        let (tp, _gt) = table.device_ptr(s);
        let (cp, _gc) = clip.device_ptr_mut(s);
        let (wp, _gw) = ws.device_ptr_mut(s);
        // SAFETY: the table describes the live views above; clip and ws are exclusive borrows.
        unsafe { grad_norm_raw(dev, tp, bufs.len(), total, max_norm, cp, wp) }
    }

    /// Global gradient norm without a host round trip: `clip` (2 f32) receives `[norm, scale]`
    /// on the device (scale NaN when the norm is not finite). Builds and uploads the buffer
    /// table each call (use [`grad_norm_raw`] with a resident table in a hot loop).
    pub fn grad_norm_into(
        dev: &CudaDevice,
        grads: &[&CudaView<'_, f32>],
        max_norm: f32,
        clip: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let total: usize = grads.iter().map(|g| g.len()).sum();
        let mut ws = dev
            .stream()
            .alloc_zeros::<f64>(grad_norm_workspace_len(total))?;
        norm_with_workspace(dev, grads, max_norm, clip, &mut ws)
    }

    /// Global gradient norm (f64) and clip scale, copied back to the host (a synchronisation).
    /// A non-finite norm is returned as is (and the scale is NaN).
    pub fn grad_norm(
        dev: &CudaDevice,
        grads: &[&CudaView<'_, f32>],
        max_norm: f32,
    ) -> Result<(f64, f32)> {
        let total: usize = grads.iter().map(|g| g.len()).sum();
        let s = dev.stream();
        let mut ws = s.alloc_zeros::<f64>(grad_norm_workspace_len(total))?;
        let mut clip = s.alloc_zeros::<f32>(2)?;
        norm_with_workspace(dev, grads, max_norm, &mut clip.as_view_mut(), &mut ws)?;
        let g = norm_blocks(total);
        let norm = s.clone_dtoh(&ws.slice(g..g + 1))?;
        let c = s.clone_dtoh(&clip)?;
        dev.synchronize()?;
        Ok((norm[0], c[1]))
    }

    /// One AdamW step on raw pointers (see the module doc): `params`, `grads`, `m`, `v` `n` f32;
    /// `bf16_out` `n` bf16 (u16) or 0 (skipped); `scale` the device f32 clip scale (element 1 of
    /// the `clip` buffer of [`grad_norm_raw`]) or 0 (scale 1 and NO non-finite guard).
    ///
    /// # Safety
    /// Every non-zero pointer must address `n` elements on `dev`'s context (`scale` one f32);
    /// `params`, `m`, `v`, `bf16_out` must not overlap each other or `grads`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn step_raw(
        dev: &CudaDevice,
        params: u64,
        grads: u64,
        m: u64,
        v: u64,
        bf16_out: u64,
        n: usize,
        hp: &AdamWParams,
        step: u64,
        scale: u64,
    ) -> Result<()> {
        let sc = hp.scalars(step)?;
        if n == 0 {
            return Ok(());
        }
        check_ptr("adamw params", params, 4)?;
        check_ptr("adamw grads", grads, 4)?;
        check_ptr("adamw m", m, 4)?;
        check_ptr("adamw v", v, 4)?;
        if bf16_out != 0 {
            check_ptr("adamw bf16_out", bf16_out, 2)?;
        }
        if scale != 0 {
            check_ptr("adamw scale", scale, 4)?;
        }
        let vec = [params, grads, m, v].iter().all(|p| p % 16 == 0) && bf16_out.is_multiple_of(8);
        let vec = i32::from(vec);
        let nl = n as i64;
        let f32s = |x: f64| x as f32;
        let (b1c, b2, b2c, eps) = (
            f32s(sc.one_minus_beta1),
            f32s(sc.beta2),
            f32s(sc.one_minus_beta2),
            f32s(sc.eps),
        );
        let (decay, step_size, bc2s) = (f32s(sc.decay), f32s(sc.step_size), f32s(sc.bc2_sqrt));
        let groups = n.div_ceil(4);
        let blocks = groups
            .div_ceil(ADAMW_BLOCK as usize)
            .clamp(1, dev.sm_count().max(1) as usize * 16) as u32;
        let f = dev.function(FAMILY, "adamw_step")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&params)
            .arg(&grads)
            .arg(&m)
            .arg(&v)
            .arg(&bf16_out)
            .arg(&nl)
            .arg(&vec)
            .arg(&b1c)
            .arg(&b2)
            .arg(&b2c)
            .arg(&eps)
            .arg(&decay)
            .arg(&step_size)
            .arg(&bc2s)
            .arg(&scale);
        dev.launch(
            "adamw_step",
            a,
            LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (ADAMW_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    }

    /// Elements per block of [`multi_step_raw`] (a multiple of 4).
    pub const MULTI_CHUNK: usize = 8192;

    /// What [`MultiSeg::out`] receives: nothing, an fp32 copy or a bf16 copy of the weights.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum OutKind {
        None = 0,
        F32 = 1,
        Bf16 = 2,
    }

    /// One contiguous run of one parameter updated with one weight decay by [`multi_step_raw`]:
    /// device addresses of the fp32 master weights, gradient and moments (`n` each) and of the
    /// compute copy (`out`, 0 with [`OutKind::None`]); `decay` false: never weight-decayed.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct MultiSeg {
        pub p: u64,
        pub g: u64,
        pub m: u64,
        pub v: u64,
        pub out: u64,
        pub out_kind: OutKind,
        pub n: usize,
        pub decay: bool,
    }

    /// The two device tables of [`multi_step_raw`]: the segments (8 u64 words each, the layout
    /// of `AdamwSeg` in adamw.cu) and the chunks (`[segment, start]` pairs, one block each).
    /// Empty segments get no chunk. Checks every pointer's alignment.
    pub fn multi_tables(segs: &[MultiSeg]) -> Result<(Vec<u64>, Vec<i64>)> {
        let mut words = Vec::with_capacity(segs.len() * 8);
        let mut chunks = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let what = |x: &str| format!("adamw_multi segment {i} {x}");
            if s.n > 0 {
                check_ptr(&what("p"), s.p, 4)?;
                check_ptr(&what("g"), s.g, 4)?;
                check_ptr(&what("m"), s.m, 4)?;
                check_ptr(&what("v"), s.v, 4)?;
                match s.out_kind {
                    OutKind::None => {}
                    OutKind::F32 => check_ptr(&what("out"), s.out, 4)?,
                    OutKind::Bf16 => check_ptr(&what("out"), s.out, 2)?,
                }
            }
            let out_align = match s.out_kind {
                OutKind::None => 1,
                OutKind::F32 => 16,
                OutKind::Bf16 => 8,
            };
            let vec = [s.p, s.g, s.m, s.v].iter().all(|p| p % 16 == 0)
                && (s.out_kind == OutKind::None || s.out.is_multiple_of(out_align));
            let out = if s.out_kind == OutKind::None {
                0
            } else {
                s.out
            };
            words.extend([s.p, s.g, s.m, s.v, out, s.n as u64]);
            words.push(s.out_kind as u64 | (u64::from(s.decay) << 32));
            words.push(u64::from(vec));
            for c in (0..s.n).step_by(MULTI_CHUNK) {
                chunks.extend([i as i64, c as i64]);
            }
        }
        Ok((words, chunks))
    }

    /// One AdamW step over every segment of a [`multi_tables`] pair in one launch (or, with
    /// `copy_only`, the compute copies rewritten from the master weights and nothing else).
    /// `hp.weight_decay` applies to the segments with `decay`; `scale` is the device clip scale
    /// (element 1 of [`grad_norm_raw`]'s `clip`; ignored with `copy_only`): a non-finite scale
    /// leaves everything unchanged.
    ///
    /// # Safety
    /// `segs` and `chunks` must be the uploaded tables of live, non-overlapping buffers on
    /// `dev`'s context (`nchunks` = the chunk pairs); `scale` must address one f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn multi_step_raw(
        dev: &CudaDevice,
        segs: u64,
        chunks: u64,
        nchunks: usize,
        hp: &AdamWParams,
        step: u64,
        scale: u64,
        copy_only: bool,
    ) -> Result<()> {
        let sc = hp.scalars(step)?;
        if nchunks == 0 {
            return Ok(());
        }
        check_ptr("adamw_multi segments", segs, 8)?;
        check_ptr("adamw_multi chunks", chunks, 8)?;
        if !copy_only {
            check_ptr("adamw_multi scale", scale, 4)?;
        }
        let grid = u32::try_from(nchunks)
            .map_err(|_| Error::Shape(format!("adamw_multi: {nchunks} chunks")))?;
        let f32s = |x: f64| x as f32;
        let (b1c, b2, b2c, eps) = (
            f32s(sc.one_minus_beta1),
            f32s(sc.beta2),
            f32s(sc.one_minus_beta2),
            f32s(sc.eps),
        );
        let (decay, step_size, bc2s) = (f32s(sc.decay), f32s(sc.step_size), f32s(sc.bc2_sqrt));
        let chunk = MULTI_CHUNK as i64;
        let copy = i32::from(copy_only);
        let f = dev.function(FAMILY, "adamw_multi")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&segs)
            .arg(&chunks)
            .arg(&chunk)
            .arg(&b1c)
            .arg(&b2)
            .arg(&b2c)
            .arg(&eps)
            .arg(&decay)
            .arg(&step_size)
            .arg(&bc2s)
            .arg(&scale)
            .arg(&copy);
        dev.launch(
            "adamw_multi",
            a,
            LaunchConfig {
                grid_dim: (grid, 1, 1),
                block_dim: (ADAMW_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    }

    /// One AdamW step (see the module doc) on device views. `clip` is the `[norm, scale]`
    /// buffer of [`grad_norm_into`]: its scale multiplies the gradients, and a NaN scale (a
    /// non-finite norm) makes the kernel leave everything unchanged.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        dev: &CudaDevice,
        params: &mut CudaViewMut<'_, f32>,
        grads: &CudaView<'_, f32>,
        m: &mut CudaViewMut<'_, f32>,
        v: &mut CudaViewMut<'_, f32>,
        bf16_out: Option<&mut CudaViewMut<'_, u16>>,
        hp: &AdamWParams,
        step: u64,
        clip: &CudaView<'_, f32>,
    ) -> Result<()> {
        hp.scalars(step)?;
        let n = params.len();
        check_len("adamw grads", grads.len(), n)?;
        check_len("adamw m", m.len(), n)?;
        check_len("adamw v", v.len(), n)?;
        if let Some(b) = bf16_out.as_deref() {
            check_len("adamw bf16_out", b.len(), n)?;
        }
        check_len("adamw clip", clip.len(), 2)?;
        if n == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let (pp, _g1) = params.device_ptr_mut(s);
        let (gp, _g2) = grads.device_ptr(s);
        let (mp, _g3) = m.device_ptr_mut(s);
        let (vp, _g4) = v.device_ptr_mut(s);
        let (bp, _g5) = match bf16_out {
            Some(b) => {
                let (p, g) = b.device_ptr_mut(s);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (cp, _g6) = clip.device_ptr(s);
        // SAFETY: lengths checked above; the &mut views are disjoint from each other and from
        // the shared inputs. Element 1 of `clip` is the scale.
        unsafe { step_raw(dev, pp, gp, mp, vp, bp, n, hp, step, cp + 4) }
    }
}
