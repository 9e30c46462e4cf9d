//! The LM-head cross-entropy fused over the vocabulary (`kernels/xent.cu`): per-token log-prob of
//! a target, log-sum-exp and entropy of the tempered softmax, and their backward into the logits.
//!
//! # Definitions
//! Logits are row-major `[N][V]`. For row `r` with temperature `T > 0`, `s_j = z_j / T`:
//! ```text
//! lse      = log Σ_j exp(s_j)
//! logprob  = s_t − lse                      (t = targets[r]; 0 when t == IGNORE_INDEX)
//! entropy  = −Σ_j p_j log p_j,  p = softmax(s)
//! ```
//! The backward takes the per-row upstream gradients `g_lp = dL/dlogprob`, `g_H = dL/dentropy`
//! and the `lse`, `entropy` saved by the forward, and ACCUMULATES into `d_logits`:
//! ```text
//! d z_j += ( g_lp·(1[j = t] − p_j) − g_H·p_j·(log p_j + H) ) / T
//! ```
//! A row whose target is [`IGNORE_INDEX`] has logprob 0 and gets no gradient through it (its
//! entropy, lse and entropy gradient are computed as for any row; mask `d_entropy` if unwanted).
//! Rows with `g_lp = g_H = 0` are left untouched.
//!
//! # Non-finite logits
//! `-inf` logits are allowed (masked vocabulary entries: probability 0, gradient 0). A row of
//! only `-inf` logits (everything masked) has no distribution; CPU and CUDA both give it
//! `lse = -inf`, `entropy = 0` (an empty support carries no uncertainty, and a masked-out row
//! must not turn a batch's entropy into NaN), `logprob = NaN` for a real target (its probability
//! is undefined: visible downstream) and 0 for [`IGNORE_INDEX`], and no gradient. The CPU
//! reference rejects NaN and `+inf` logits and targets `>= V` with [`Error::Invalid`]. The CUDA
//! kernels cannot return errors: NaN / `+inf` logits give NaN outputs for their row, and an
//! out-of-range target (other than [`IGNORE_INDEX`]) gives a NaN logprob and no logprob
//! gradient.
//!
//! # CUDA
//! Logits and `d_logits` are bf16, passed as their bit patterns (`u16`, `half::bf16::to_bits`;
//! cudarc is built without its `f16` feature). All arithmetic is fp32; `d_logits` is read, the
//! gradient added in fp32 and the sum rounded once to bf16 (round to nearest even). One block of
//! 512 threads per row: the forward is one pass over the logits with an online (max, Σ2^(x−m),
//! Σ2^(x−m)(x−m)) state per thread, merged across the block; the backward is one pass reading
//! logits and `d_logits` and writing `d_logits`. Both use 16-byte loads over the aligned body of
//! a row and scalar loads for the unaligned head and the tail, so any `V` works.

use super::Real;
use crate::error::{check_len, Error, Result};

/// Target id meaning "no target": logprob 0 and no logprob gradient for that row.
pub const IGNORE_INDEX: u32 = u32::MAX;

fn check_temperature(what: &str, t: f32) -> Result<()> {
    if !(t > 0.0 && t.is_finite()) {
        return Err(Error::Invalid(format!(
            "{what}: temperature = {t}: must be finite and > 0"
        )));
    }
    Ok(())
}

fn dims(what: &str, n: usize, v: usize) -> Result<usize> {
    if v == 0 {
        return Err(Error::Invalid(format!(
            "{what}: v = 0: the vocabulary is empty"
        )));
    }
    n.checked_mul(v)
        .ok_or_else(|| Error::Shape(format!("{what}: n·v = {n}·{v} overflows usize")))
}

fn check_targets(what: &str, targets: &[u32], v: usize) -> Result<()> {
    for (r, &t) in targets.iter().enumerate() {
        if t != IGNORE_INDEX && t as usize >= v {
            return Err(Error::Invalid(format!(
                "{what}: targets[{r}] = {t}: out of range for v = {v} (use IGNORE_INDEX = u32::MAX to ignore a row)"
            )));
        }
    }
    Ok(())
}

fn ln<T: Real>(x: T) -> T {
    T::from_f64(x.to_f64().ln())
}

pub mod cpu {
    //! CPU references, generic over [`Real`] (f64 for checks, f32 for running).
    use super::*;

    /// (max of s, Σ exp(s − m), Σ exp(s − m)·(s − m)) over one row, s = z / t; validates the row.
    /// A row of only -inf gives (-inf, 0, 0).
    fn row_stats<T: Real>(row: &[T], t: T, r: usize) -> Result<(T, T, T)> {
        let mut m: Option<T> = None;
        for (j, &z) in row.iter().enumerate() {
            #[allow(clippy::eq_op)]
            let nan = z != z;
            if nan || (!z.is_finite() && z > T::ZERO) {
                return Err(Error::Invalid(format!(
                    "xent: logits[{r}][{j}] = {z:?}: NaN and +inf logits are not allowed"
                )));
            }
            if z.is_finite() {
                let s = z / t;
                m = Some(match m {
                    Some(mm) => mm.max(s),
                    None => s,
                });
            }
        }
        let Some(m) = m else {
            return Ok((T::from_f64(f64::NEG_INFINITY), T::ZERO, T::ZERO));
        };
        let (mut s_sum, mut a_sum) = (T::ZERO, T::ZERO);
        for &z in row {
            if z.is_finite() {
                let d = z / t - m;
                let e = d.exp();
                s_sum += e;
                if e > T::ZERO {
                    a_sum += e * d;
                }
            }
        }
        Ok((m, s_sum, a_sum))
    }

    /// Forward (see the module doc): writes `logprob`, `lse`, `entropy` (`[N]` each).
    #[allow(clippy::too_many_arguments)]
    pub fn forward<T: Real>(
        logits: &[T],
        targets: &[u32],
        n: usize,
        v: usize,
        temperature: f32,
        logprob: &mut [T],
        lse: &mut [T],
        entropy: &mut [T],
    ) -> Result<()> {
        check_temperature("xent forward", temperature)?;
        let nv = dims("xent forward", n, v)?;
        check_len("xent forward logits", logits.len(), nv)?;
        check_len("xent forward targets", targets.len(), n)?;
        check_len("xent forward logprob", logprob.len(), n)?;
        check_len("xent forward lse", lse.len(), n)?;
        check_len("xent forward entropy", entropy.len(), n)?;
        check_targets("xent forward", targets, v)?;
        let t = T::from_f64(temperature as f64);
        for r in 0..n {
            let row = &logits[r * v..(r + 1) * v];
            let (m, s, a) = row_stats(row, t, r)?;
            let ls = ln(s);
            let l = m + ls;
            lse[r] = l;
            // s = 0 only for a row of -inf logits (module doc): entropy 0, not 0/0.
            entropy[r] = if s == T::ZERO { T::ZERO } else { ls - a / s };
            let tg = targets[r];
            logprob[r] = if tg == IGNORE_INDEX {
                T::ZERO
            } else {
                row[tg as usize] / t - l
            };
        }
        Ok(())
    }

    /// Backward (see the module doc): `d_logits += ∂(Σ_r g_lp[r]·logprob[r] + g_H[r]·H[r])/∂z`,
    /// from the `lse` and `entropy` of [`forward`] (same logits, targets and temperature).
    /// `None` upstream gradients count as 0.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: Real>(
        logits: &[T],
        targets: &[u32],
        n: usize,
        v: usize,
        temperature: f32,
        lse: &[T],
        entropy: &[T],
        d_logprob: Option<&[T]>,
        d_entropy: Option<&[T]>,
        d_logits: &mut [T],
    ) -> Result<()> {
        check_temperature("xent backward", temperature)?;
        let nv = dims("xent backward", n, v)?;
        check_len("xent backward logits", logits.len(), nv)?;
        check_len("xent backward targets", targets.len(), n)?;
        check_len("xent backward lse", lse.len(), n)?;
        check_len("xent backward entropy", entropy.len(), n)?;
        if let Some(d) = d_logprob {
            check_len("xent backward d_logprob", d.len(), n)?;
        }
        if let Some(d) = d_entropy {
            check_len("xent backward d_entropy", d.len(), n)?;
        }
        check_len("xent backward d_logits", d_logits.len(), nv)?;
        check_targets("xent backward", targets, v)?;
        let t = T::from_f64(temperature as f64);
        for r in 0..n {
            let tg = targets[r];
            let g_lp = match d_logprob {
                Some(d) if tg != IGNORE_INDEX => d[r],
                _ => T::ZERO,
            };
            let g_h = d_entropy.map_or(T::ZERO, |d| d[r]);
            let (l, h) = (lse[r], entropy[r]);
            // Nothing upstream, or a row of only -inf logits (no distribution, no gradient).
            if (g_lp == T::ZERO && g_h == T::ZERO) || l.to_f64() == f64::NEG_INFINITY {
                continue;
            }
            let row = &logits[r * v..(r + 1) * v];
            let drow = &mut d_logits[r * v..(r + 1) * v];
            for (j, (&z, dz)) in row.iter().zip(drow.iter_mut()).enumerate() {
                let logp = z / t - l;
                let p = logp.exp();
                let ent = if p > T::ZERO { p * (logp + h) } else { T::ZERO };
                let onehot = if j as u32 == tg { T::ONE } else { T::ZERO };
                *dz += (g_lp * (onehot - p) - g_h * ent) / t;
            }
        }
        Ok(())
    }
}

pub mod cuda {
    //! CUDA launchers: bf16 logits (as `u16` bits), fp32 per-row outputs. `*_raw` take raw device
    //! pointers (`CUdeviceptr` as u64) and queue work on [`CudaDevice::stream`] without
    //! synchronising; the safe wrappers take cudarc views and check lengths. Target ids are not
    //! range-checked on the device (see the module doc).
    use super::*;
    use crate::device::CudaDevice;
    use crate::kernels::check_ptr;
    use cudarc::driver::PushKernelArg;
    use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig};

    const FAMILY: &str = "xent";
    /// Threads per block (`XENT_BLOCK` in xent.cu).
    const XENT_BLOCK: u32 = 512;

    /// The launch of either kernel over `n` rows: one block per row (the kernels index the
    /// logits as `row·V` in i64, so `n·V` may pass 2^32); `Error::Shape` past the grid limit.
    pub fn launch_config(what: &str, n: usize) -> Result<LaunchConfig> {
        let rows = u32::try_from(n)
            .ok()
            .filter(|&x| x <= i32::MAX as u32)
            .ok_or_else(|| {
                Error::Shape(format!(
                    "{what}: n = {n} rows exceeds the grid limit 2^31 − 1"
                ))
            })?;
        Ok(LaunchConfig {
            grid_dim: (rows, 1, 1),
            block_dim: (XENT_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// Forward on raw device pointers: `logits` `[n][v]` bf16 bits (2-byte aligned), `targets`
    /// `[n]` u32, `logprob`, `lse`, `entropy` `[n]` f32.
    ///
    /// # Safety
    /// Every pointer must address at least the elements above on `dev`'s context; outputs must
    /// not overlap each other or the inputs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward_raw(
        dev: &CudaDevice,
        logits: u64,
        targets: u64,
        n: usize,
        v: usize,
        temperature: f32,
        logprob: u64,
        lse: u64,
        entropy: u64,
    ) -> Result<()> {
        check_temperature("xent forward", temperature)?;
        dims("xent forward", n, v)?;
        let cfg = launch_config("xent forward", n)?;
        if n == 0 {
            return Ok(());
        }
        check_ptr("xent forward logits", logits, 2)?;
        check_ptr("xent forward targets", targets, 4)?;
        check_ptr("xent forward logprob", logprob, 4)?;
        check_ptr("xent forward lse", lse, 4)?;
        check_ptr("xent forward entropy", entropy, 4)?;
        let vl = v as i64;
        let c = (std::f64::consts::LOG2_E / temperature as f64) as f32;
        let f = dev.function(FAMILY, "xent_fwd")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&logits)
            .arg(&targets)
            .arg(&vl)
            .arg(&c)
            .arg(&logprob)
            .arg(&lse)
            .arg(&entropy);
        dev.launch("xent_fwd", a, cfg)
    }

    /// Forward (see the module doc) on device views.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        dev: &CudaDevice,
        logits: &CudaView<'_, u16>,
        targets: &CudaView<'_, u32>,
        n: usize,
        v: usize,
        temperature: f32,
        logprob: &mut CudaViewMut<'_, f32>,
        lse: &mut CudaViewMut<'_, f32>,
        entropy: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        check_temperature("xent forward", temperature)?;
        let nv = dims("xent forward", n, v)?;
        check_len("xent forward logits", logits.len(), nv)?;
        check_len("xent forward targets", targets.len(), n)?;
        check_len("xent forward logprob", logprob.len(), n)?;
        check_len("xent forward lse", lse.len(), n)?;
        check_len("xent forward entropy", entropy.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let (zp, _g1) = logits.device_ptr(s);
        let (tp, _g2) = targets.device_ptr(s);
        let (lpp, _g3) = logprob.device_ptr_mut(s);
        let (lsp, _g4) = lse.device_ptr_mut(s);
        let (ep, _g5) = entropy.device_ptr_mut(s);
        // SAFETY: lengths checked above; the &mut views cannot alias each other or the inputs.
        unsafe { forward_raw(dev, zp, tp, n, v, temperature, lpp, lsp, ep) }
    }

    /// Backward on raw device pointers: accumulates into `d_logits` (`[n][v]` bf16 bits).
    /// `d_logprob` / `d_entropy` may be 0 (that upstream gradient is 0). `lse` and `entropy` are
    /// the forward's outputs for the same logits, targets and temperature.
    ///
    /// # Safety
    /// Every non-zero pointer must address the elements above on `dev`'s context; `d_logits`
    /// must not overlap any input.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn backward_raw(
        dev: &CudaDevice,
        logits: u64,
        targets: u64,
        n: usize,
        v: usize,
        temperature: f32,
        lse: u64,
        entropy: u64,
        d_logprob: u64,
        d_entropy: u64,
        d_logits: u64,
    ) -> Result<()> {
        check_temperature("xent backward", temperature)?;
        dims("xent backward", n, v)?;
        let cfg = launch_config("xent backward", n)?;
        if n == 0 || (d_logprob == 0 && d_entropy == 0) {
            return Ok(());
        }
        check_ptr("xent backward logits", logits, 2)?;
        check_ptr("xent backward targets", targets, 4)?;
        check_ptr("xent backward lse", lse, 4)?;
        check_ptr("xent backward entropy", entropy, 4)?;
        if d_logprob != 0 {
            check_ptr("xent backward d_logprob", d_logprob, 4)?;
        }
        if d_entropy != 0 {
            check_ptr("xent backward d_entropy", d_entropy, 4)?;
        }
        check_ptr("xent backward d_logits", d_logits, 2)?;
        let vl = v as i64;
        let c = (std::f64::consts::LOG2_E / temperature as f64) as f32;
        let inv_t = (1.0 / temperature as f64) as f32;
        let f = dev.function(FAMILY, "xent_bwd")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&logits)
            .arg(&targets)
            .arg(&vl)
            .arg(&c)
            .arg(&inv_t)
            .arg(&lse)
            .arg(&entropy)
            .arg(&d_logprob)
            .arg(&d_entropy)
            .arg(&d_logits);
        dev.launch("xent_bwd", a, cfg)
    }

    /// The chunked LM head's backward on raw device pointers: OVERWRITES `logits` (`[n][v]`
    /// bf16 bits) with `d_logits` = bf16 of the gradient [`backward_raw`] would add to a zeroed
    /// `d_logits` (bit-identical to that), in place; rows with no upstream gradient (both 0 or
    /// both pointers 0) or only `-inf` logits become 0. `lse` and `entropy` are the forward's for
    /// the same logits, targets and temperature.
    ///
    /// # Safety
    /// Every non-zero pointer must address the elements above on `dev`'s context; `logits` must
    /// not overlap any other argument.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn backward_inplace_raw(
        dev: &CudaDevice,
        logits: u64,
        targets: u64,
        n: usize,
        v: usize,
        temperature: f32,
        lse: u64,
        entropy: u64,
        d_logprob: u64,
        d_entropy: u64,
    ) -> Result<()> {
        check_temperature("xent backward_inplace", temperature)?;
        dims("xent backward_inplace", n, v)?;
        let cfg = launch_config("xent backward_inplace", n)?;
        if n == 0 {
            return Ok(());
        }
        check_ptr("xent backward_inplace logits", logits, 2)?;
        check_ptr("xent backward_inplace targets", targets, 4)?;
        check_ptr("xent backward_inplace lse", lse, 4)?;
        check_ptr("xent backward_inplace entropy", entropy, 4)?;
        if d_logprob != 0 {
            check_ptr("xent backward_inplace d_logprob", d_logprob, 4)?;
        }
        if d_entropy != 0 {
            check_ptr("xent backward_inplace d_entropy", d_entropy, 4)?;
        }
        let vl = v as i64;
        let c = (std::f64::consts::LOG2_E / temperature as f64) as f32;
        let inv_t = (1.0 / temperature as f64) as f32;
        let f = dev.function(FAMILY, "xent_bwd_inplace")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&logits)
            .arg(&targets)
            .arg(&vl)
            .arg(&c)
            .arg(&inv_t)
            .arg(&lse)
            .arg(&entropy)
            .arg(&d_logprob)
            .arg(&d_entropy);
        dev.launch("xent_bwd_inplace", a, cfg)
    }

    /// Backward (see the module doc) on device views; accumulates into `d_logits`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        dev: &CudaDevice,
        logits: &CudaView<'_, u16>,
        targets: &CudaView<'_, u32>,
        n: usize,
        v: usize,
        temperature: f32,
        lse: &CudaView<'_, f32>,
        entropy: &CudaView<'_, f32>,
        d_logprob: Option<&CudaView<'_, f32>>,
        d_entropy: Option<&CudaView<'_, f32>>,
        d_logits: &mut CudaViewMut<'_, u16>,
    ) -> Result<()> {
        check_temperature("xent backward", temperature)?;
        let nv = dims("xent backward", n, v)?;
        check_len("xent backward logits", logits.len(), nv)?;
        check_len("xent backward targets", targets.len(), n)?;
        check_len("xent backward lse", lse.len(), n)?;
        check_len("xent backward entropy", entropy.len(), n)?;
        if let Some(d) = d_logprob {
            check_len("xent backward d_logprob", d.len(), n)?;
        }
        if let Some(d) = d_entropy {
            check_len("xent backward d_entropy", d.len(), n)?;
        }
        check_len("xent backward d_logits", d_logits.len(), nv)?;
        if n == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let (zp, _g1) = logits.device_ptr(s);
        let (tp, _g2) = targets.device_ptr(s);
        let (lp, _g3) = lse.device_ptr(s);
        let (ep, _g4) = entropy.device_ptr(s);
        let (glp, _g5) = match d_logprob {
            Some(d) => {
                let (p, g) = d.device_ptr(s);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (gh, _g6) = match d_entropy {
            Some(d) => {
                let (p, g) = d.device_ptr(s);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (dp, _g7) = d_logits.device_ptr_mut(s);
        // SAFETY: lengths checked above; `d_logits` is a &mut view, so it aliases no input.
        unsafe { backward_raw(dev, zp, tp, n, v, temperature, lp, ep, glp, gh, dp) }
    }
}

#[cfg(test)]
mod tests {
    use super::cuda::launch_config;
    use crate::device::check_launch;

    #[test]
    fn launch_at_the_qwen2_05b_size() {
        // 64 sequences of 1024 tokens over 151936 logits: 9.96e9 logits, past 2^32 (the row
        // offsets themselves: tests/cuda_lmops.rs cuda_xent_real_size_rows_past_2_pow_32).
        let c = launch_config("xent", 64 * 1024).unwrap();
        assert_eq!(c.grid_dim, (65536, 1, 1));
        assert!(check_launch("xent_fwd", &c).unwrap());
        assert!(launch_config("xent", i32::MAX as usize).is_ok());
        assert!(launch_config("xent", 1 << 31).is_err());
    }
}
