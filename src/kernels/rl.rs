//! RL-side kernels (`kernels/rl.cu`): distributional GAE, the mean advantage over samples, masked
//! advantage whitening, the clipped PPO policy loss and the per-token KL penalty.
//!
//! # Layout
//! `B` sequences × `T` response positions (right-padded, or with holes), `K` value samples per
//! position: `values`, `adv`, `ret` are `[B][T][K]` row-major (k fastest); `rewards`, `mask`,
//! `adv_mean` are `[B][T]`. `mask` is fp32 0/1: 1 = a valid response token, 0 = padding. The CPU
//! references reject any other mask value; the CUDA kernels treat every non-zero as valid.
//!
//! # Distributional GAE (method doc 2.1, 2.4)
//! With `continue_t = mask[b][t+1]` (0 at `t = T−1`, and 0 at the last valid token, so the
//! terminal bootstrap is 0), for every valid `t` and sample `k`:
//! ```text
//! δ_{t,k} = r_t + γ·continue_t·z_{t+1,k} − z_{t,k}
//! A_{t,k} = δ_{t,k} + γλ·continue_t·A_{t+1,k}          (= Σ_l (γλ)^l δ_{t+l,k} over the run)
//! G_{t,k} = z_{t,k} + A_{t,k}
//! ```
//! and `A = G = 0` at invalid `t`. `adv_mean[b][t] = mean_k A_{t,k}` (0 where invalid). A hole in
//! the mask ends a run: the token before it bootstraps with 0, and the tokens after it start a
//! new one. Padded values and rewards are never used in arithmetic (selects, not products with
//! 0), so garbage or NaN there cannot leak into the results.
//!
//! # Masked whitening (method doc 2.4; verl `masked_whiten`)
//! Over all valid tokens of the batch: `μ` = masked mean, `σ²` = masked **unbiased** variance
//! (`n − 1`), `out = (x − μ)·(σ² + 1e-8)^(−1/2)` on valid tokens and 0 on invalid ones. Fewer than
//! two valid tokens leave `σ` undefined: [`cpu::whiten`] and [`cuda::whiten`] return
//! [`Error::Invalid`], which the caller must handle (e.g. skip the update). Both return `(μ, σ)`
//! for logging. Statistics are accumulated in f64 on both backends.
//!
//! # PPO policy loss (method doc 2.11)
//! Per valid token: `ratio = exp(clamp(logp − logp_old, ±`[`LOG_RATIO_CLAMP`]`))` (verl's clamp,
//! so one extreme token cannot make the loss non-finite; outside it the gradient is 0),
//! `loss = max(−A·ratio, −A·clip(ratio, 1 − clip_low, 1 + clip_high))`, clipfrac indicator =
//! "the clipped branch is strictly larger", approx KL = `logp_old − logp`. Aggregation is the
//! token mean over the mask (`n_valid` tokens); the per-token gradient is that of the aggregated
//! loss: `dL/dlogp_t = mask_t·(clipped or outside the clamp ? 0 : −A·ratio)/n_valid`. With no
//! valid token every output
//! is 0. No dual clip.
//!
//! # KL penalty
//! Per valid token, against a reference policy: k1 `logp − logp_ref` (gradient 1) or k3
//! `exp(ref − logp) − (ref − logp) − 1` (gradient `1 − exp(ref − logp)`); 0 on invalid tokens.
//! k3 is evaluated as written (no clamp, no expm1): for |ref − logp| ≲ 1e-3 its absolute error
//! in fp32 is ~1e-7.

use super::Real;
use crate::error::{check_len, Error, Result};

/// The PPO log-ratio is clamped to ±this before the exp (verl's `ratio = exp(clamp(·, −20, 20))`).
pub const LOG_RATIO_CLAMP: f32 = 20.0;

/// Discount and GAE λ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GaeParams {
    pub gamma: f32,
    pub lambda: f32,
}

impl Default for GaeParams {
    /// γ = 1.0, λ = 0.95 (the DVPO recipe).
    fn default() -> Self {
        GaeParams {
            gamma: 1.0,
            lambda: 0.95,
        }
    }
}

impl GaeParams {
    /// Both must be finite and in [0, 1].
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("gamma", self.gamma), ("lambda", self.lambda)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::Invalid(format!(
                    "GaeParams.{name} = {v}: must be in [0, 1]"
                )));
            }
        }
        Ok(())
    }
}

/// PPO clip range: the ratio is clipped to `[1 − clip_low, 1 + clip_high]` (DAPO's clip-higher
/// when `clip_high > clip_low`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PpoParams {
    pub clip_low: f32,
    pub clip_high: f32,
}

impl Default for PpoParams {
    /// ε = 0.2 on both sides.
    fn default() -> Self {
        PpoParams {
            clip_low: 0.2,
            clip_high: 0.2,
        }
    }
}

impl PpoParams {
    /// `clip_low` in [0, 1), `clip_high` finite and ≥ 0.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.clip_low) {
            return Err(Error::Invalid(format!(
                "PpoParams.clip_low = {}: must be in [0, 1)",
                self.clip_low
            )));
        }
        if !(self.clip_high >= 0.0 && self.clip_high.is_finite()) {
            return Err(Error::Invalid(format!(
                "PpoParams.clip_high = {}: must be finite and >= 0",
                self.clip_high
            )));
        }
        Ok(())
    }
}

/// Token means over the mask of the PPO policy loss (0 when `n_valid` is 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PpoStats<T> {
    /// Token-mean clipped surrogate loss.
    pub loss: T,
    /// Fraction of valid tokens where the clipped branch was active.
    pub clipfrac: T,
    /// Token mean of `logp_old − logp`.
    pub approx_kl: T,
    /// Number of valid tokens.
    pub n_valid: T,
}

/// Which per-token KL estimator [`cpu::kl_penalty`] / [`cuda::kl_penalty`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KlKind {
    /// `logp − logp_ref`.
    K1,
    /// `exp(ref − logp) − (ref − logp) − 1` (Schulman's low-variance, non-negative estimator).
    K3,
}

impl KlKind {
    fn code(self) -> i32 {
        match self {
            KlKind::K1 => 0,
            KlKind::K3 => 1,
        }
    }
}

fn mul_len(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Shape(format!("{what}: size {dims:?} overflows usize")))
}

/// Checks the GAE dimensions; returns (B·T, B·T·K).
fn gae_dims(b: usize, t: usize, k: usize) -> Result<(usize, usize)> {
    if k == 0 {
        return Err(Error::Invalid(
            "dist_gae: k = 0: need at least one value sample per position".into(),
        ));
    }
    Ok((
        mul_len("dist_gae B*T", &[b, t])?,
        mul_len("dist_gae B*T*K", &[b, t, k])?,
    ))
}

pub mod cpu {
    //! CPU references, generic over [`Real`] (f64 for checks, f32 for parity with CUDA).
    use super::*;

    fn check_mask<T: Real>(what: &str, mask: &[T]) -> Result<()> {
        for (i, &m) in mask.iter().enumerate() {
            if m != T::ZERO && m != T::ONE {
                return Err(Error::Invalid(format!(
                    "{what}: mask[{i}] = {m:?}: must be 0.0 or 1.0"
                )));
            }
        }
        Ok(())
    }

    /// Distributional GAE (see the module doc): writes `adv`, `ret` (`[B][T][K]`) and
    /// `adv_mean` (`[B][T]`), every element, 0 at invalid positions.
    #[allow(clippy::too_many_arguments)]
    pub fn dist_gae<T: Real>(
        values: &[T],
        rewards: &[T],
        mask: &[T],
        b: usize,
        t: usize,
        k: usize,
        p: GaeParams,
        adv: &mut [T],
        ret: &mut [T],
        adv_mean: &mut [T],
    ) -> Result<()> {
        p.validate()?;
        let (bt, btk) = gae_dims(b, t, k)?;
        check_len("dist_gae values", values.len(), btk)?;
        check_len("dist_gae rewards", rewards.len(), bt)?;
        check_len("dist_gae mask", mask.len(), bt)?;
        check_len("dist_gae adv", adv.len(), btk)?;
        check_len("dist_gae ret", ret.len(), btk)?;
        check_len("dist_gae adv_mean", adv_mean.len(), bt)?;
        check_mask("dist_gae", mask)?;
        let gamma = T::from_f64(p.gamma as f64);
        let gl = T::from_f64(p.gamma as f64 * p.lambda as f64);
        let kf = T::from_f64(k as f64);
        for bi in 0..b {
            for ti in (0..t).rev() {
                let row = bi * t + ti;
                let (cur, next) = (row * k, (row + 1) * k);
                if mask[row] == T::ZERO {
                    adv[cur..next].fill(T::ZERO);
                    ret[cur..next].fill(T::ZERO);
                    adv_mean[row] = T::ZERO;
                    continue;
                }
                let cont = ti + 1 < t && mask[row + 1] != T::ZERO;
                let r = rewards[row];
                let mut sum = T::ZERO;
                for ki in 0..k {
                    let z = values[cur + ki];
                    let a = if cont {
                        // adv of row + 1 is already final: rows are visited last to first.
                        let delta = r + gamma * values[next + ki] - z;
                        delta + gl * adv[next + ki]
                    } else {
                        r - z
                    };
                    adv[cur + ki] = a;
                    ret[cur + ki] = z + a;
                    sum += a;
                }
                adv_mean[row] = sum / kf;
            }
        }
        Ok(())
    }

    /// Masked whitening (see the module doc). Returns `(μ, σ)` (σ the unbiased std without the
    /// 1e-8). Errors: lengths differ, mask not 0/1, a non-finite `x` at a valid token, fewer than
    /// two valid tokens (`out` is then left untouched).
    pub fn whiten<T: Real>(x: &[T], mask: &[T], out: &mut [T]) -> Result<(T, T)> {
        check_len("whiten mask", mask.len(), x.len())?;
        check_len("whiten out", out.len(), x.len())?;
        check_mask("whiten", mask)?;
        let mut n = 0usize;
        let mut sum = 0.0f64;
        for (i, (&xi, &m)) in x.iter().zip(mask).enumerate() {
            if m != T::ZERO {
                if !xi.is_finite() {
                    return Err(Error::Invalid(format!(
                        "whiten: x[{i}] = {xi:?} at a valid token is not finite"
                    )));
                }
                n += 1;
                sum += xi.to_f64();
            }
        }
        if n < 2 {
            return Err(Error::Invalid(format!(
                "whiten: {n} valid token(s); the unbiased std needs at least 2"
            )));
        }
        let mean = sum / n as f64;
        let ss: f64 = x
            .iter()
            .zip(mask)
            .filter(|(_, &m)| m != T::ZERO)
            .map(|(&xi, _)| (xi.to_f64() - mean).powi(2))
            .sum();
        let var = ss / (n - 1) as f64;
        let mean_t = T::from_f64(mean);
        let inv_t = T::from_f64(1.0 / (var + 1e-8).sqrt());
        for ((o, &xi), &m) in out.iter_mut().zip(x).zip(mask) {
            *o = if m != T::ZERO {
                (xi - mean_t) * inv_t
            } else {
                T::ZERO
            };
        }
        Ok((mean_t, T::from_f64(var.sqrt())))
    }

    /// Clipped PPO policy loss (see the module doc): writes the per-token loss (0 on invalid
    /// tokens, not divided by `n_valid`) and `grad = dL/dlogp` of the token-mean loss `L`.
    #[allow(clippy::too_many_arguments)]
    pub fn ppo_policy_loss<T: Real>(
        logp: &[T],
        logp_old: &[T],
        adv: &[T],
        mask: &[T],
        p: PpoParams,
        loss_tok: &mut [T],
        grad: &mut [T],
    ) -> Result<PpoStats<T>> {
        p.validate()?;
        let n = logp.len();
        check_len("ppo_policy_loss logp_old", logp_old.len(), n)?;
        check_len("ppo_policy_loss adv", adv.len(), n)?;
        check_len("ppo_policy_loss mask", mask.len(), n)?;
        check_len("ppo_policy_loss loss_tok", loss_tok.len(), n)?;
        check_len("ppo_policy_loss grad", grad.len(), n)?;
        check_mask("ppo_policy_loss", mask)?;
        // Formed in T, as the kernel forms them in f32.
        let lo = T::ONE - T::from_f64(p.clip_low as f64);
        let hi = T::ONE + T::from_f64(p.clip_high as f64);
        let (mut cnt, mut sl, mut sc, mut sk) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for i in 0..n {
            let (mut l, mut g) = (T::ZERO, T::ZERO);
            if mask[i] != T::ZERO {
                let d = logp[i] - logp_old[i];
                let c = T::from_f64(LOG_RATIO_CLAMP as f64);
                let ratio = d.max(-c).min(c).exp();
                let a = adv[i];
                let s1 = -a * ratio;
                let s2 = -a * ratio.max(lo).min(hi);
                let clipped = s2 > s1;
                l = if clipped { s2 } else { s1 };
                g = if clipped || d.abs() > c { T::ZERO } else { s1 };
                cnt += 1.0;
                sl += l.to_f64();
                sc += if clipped { 1.0 } else { 0.0 };
                sk -= d.to_f64();
            }
            loss_tok[i] = l;
            grad[i] = g;
        }
        let inv = if cnt > 0.0 { 1.0 / cnt } else { 0.0 };
        let inv_t = T::from_f64(inv);
        for g in grad.iter_mut() {
            *g *= inv_t;
        }
        Ok(PpoStats {
            loss: T::from_f64(sl * inv),
            clipfrac: T::from_f64(sc * inv),
            approx_kl: T::from_f64(sk * inv),
            n_valid: T::from_f64(cnt),
        })
    }

    /// Per-token KL penalty against a reference policy (see the module doc); `grad`, when
    /// given, receives d out/d logp. Both are 0 on invalid tokens.
    pub fn kl_penalty<T: Real>(
        logp: &[T],
        logp_ref: &[T],
        mask: &[T],
        kind: KlKind,
        out: &mut [T],
        mut grad: Option<&mut [T]>,
    ) -> Result<()> {
        let n = logp.len();
        check_len("kl_penalty logp_ref", logp_ref.len(), n)?;
        check_len("kl_penalty mask", mask.len(), n)?;
        check_len("kl_penalty out", out.len(), n)?;
        if let Some(g) = grad.as_deref() {
            check_len("kl_penalty grad", g.len(), n)?;
        }
        check_mask("kl_penalty", mask)?;
        for i in 0..n {
            let (mut v, mut g) = (T::ZERO, T::ZERO);
            if mask[i] != T::ZERO {
                match kind {
                    KlKind::K1 => {
                        v = logp[i] - logp_ref[i];
                        g = T::ONE;
                    }
                    KlKind::K3 => {
                        let x = logp_ref[i] - logp[i];
                        let ex = x.exp();
                        v = ex - x - T::ONE;
                        g = T::ONE - ex;
                    }
                }
            }
            out[i] = v;
            if let Some(gr) = grad.as_deref_mut() {
                gr[i] = g;
            }
        }
        Ok(())
    }
}

pub mod cuda {
    //! CUDA launchers (fp32). `*_raw` take raw device pointers (`CUdeviceptr` as u64, e.g. arena
    //! offsets) and queue work on [`CudaDevice::stream`] without synchronising; the safe
    //! wrappers take cudarc views and check lengths. Nothing here validates mask values (every
    //! non-zero counts as valid) or finiteness: that is the CPU references' job.
    use super::*;
    use crate::device::{blocks_for, CudaDevice};
    use crate::kernels::{check_i32, check_ptr};
    use cudarc::driver::{CudaSlice, PushKernelArg};
    use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig};

    const FAMILY: &str = "rl";
    /// Threads per block of the reduction kernels (`RL_BLOCK` in rl.cu).
    const RL_BLOCK: u32 = 256;
    /// Most time segments per (b, k) chain (`GAE_MAX_SEG` in rl.cu).
    const GAE_MAX_SEG: usize = 8;
    /// Most blocks of a partial-reduction pass (bounds the workspace and the finalize work).
    const MAX_PARTIALS: usize = 1024;

    /// Blocks of a partial-reduction pass over `n` elements: about 4 per thread, at most
    /// [`MAX_PARTIALS`], at least 1. Depends on `n` only, so results are identical on every GPU.
    pub fn reduce_blocks(n: usize) -> usize {
        n.div_ceil(RL_BLOCK as usize * 4).clamp(1, MAX_PARTIALS)
    }

    /// f64 elements of the workspace [`whiten_raw`] needs for `n` tokens.
    pub fn whiten_workspace_len(n: usize) -> usize {
        3 * reduce_blocks(n) + 4
    }

    /// f64 elements of the workspace [`ppo_policy_loss_raw`] needs for `n` tokens.
    pub fn ppo_workspace_len(n: usize) -> usize {
        4 * reduce_blocks(n) + 1
    }

    /// Time segments per (b, k) chain in `rl_dist_gae`: at least 16 steps each, at most 8.
    fn gae_segments(t: usize) -> usize {
        t.div_ceil(16).clamp(1, GAE_MAX_SEG)
    }

    /// Distributional GAE on raw device pointers (see the module doc). Two launches:
    /// `rl_dist_gae` writes `adv`, `ret`; `rl_dist_gae_mean` reads `adv` and writes `adv_mean`.
    ///
    /// # Safety
    /// `values`, `adv`, `ret` must hold `b·t·k` f32 and `rewards`, `mask`, `adv_mean` `b·t` f32
    /// on `dev`'s context; outputs must not overlap each other or the inputs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dist_gae_raw(
        dev: &CudaDevice,
        values: u64,
        rewards: u64,
        mask: u64,
        b: usize,
        t: usize,
        k: usize,
        p: GaeParams,
        adv: u64,
        ret: u64,
        adv_mean: u64,
    ) -> Result<()> {
        p.validate()?;
        let (bt, btk) = gae_dims(b, t, k)?;
        if btk == 0 {
            return Ok(());
        }
        for (what, ptr) in [
            ("dist_gae values", values),
            ("dist_gae rewards", rewards),
            ("dist_gae mask", mask),
            ("dist_gae adv", adv),
            ("dist_gae ret", ret),
            ("dist_gae adv_mean", adv_mean),
        ] {
            check_ptr(what, ptr, 4)?;
        }
        let pairs = mul_len("dist_gae B*K", &[b, k])?;
        let (bi, ti, ki) = (
            check_i32("dist_gae b", b)?,
            check_i32("dist_gae t", t)?,
            check_i32("dist_gae k", k)?,
        );
        check_i32("dist_gae B*K", pairs + 31)?;
        let rows = check_i32("dist_gae B*T", bt)?;
        let segs = gae_segments(t) as u32;
        let (gamma, lambda) = (p.gamma, p.lambda);

        let f = dev.function(FAMILY, "rl_dist_gae")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&values)
            .arg(&rewards)
            .arg(&mask)
            .arg(&adv)
            .arg(&ret)
            .arg(&bi)
            .arg(&ti)
            .arg(&ki)
            .arg(&gamma)
            .arg(&lambda);
        let cfg = LaunchConfig {
            grid_dim: (blocks_for(pairs, 32), 1, 1),
            block_dim: (32, segs, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("rl_dist_gae", a, cfg)?;

        let f = dev.function(FAMILY, "rl_dist_gae_mean")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&adv).arg(&mask).arg(&adv_mean).arg(&rows).arg(&ki);
        let warps_per_block = 8u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks_for(bt, warps_per_block), 1, 1),
            block_dim: (32 * warps_per_block, 1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("rl_dist_gae_mean", a, cfg)
    }

    /// Distributional GAE (see the module doc) on device views.
    #[allow(clippy::too_many_arguments)]
    pub fn dist_gae(
        dev: &CudaDevice,
        values: &CudaView<'_, f32>,
        rewards: &CudaView<'_, f32>,
        mask: &CudaView<'_, f32>,
        b: usize,
        t: usize,
        k: usize,
        p: GaeParams,
        adv: &mut CudaViewMut<'_, f32>,
        ret: &mut CudaViewMut<'_, f32>,
        adv_mean: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        p.validate()?;
        let (bt, btk) = gae_dims(b, t, k)?;
        check_len("dist_gae values", values.len(), btk)?;
        check_len("dist_gae rewards", rewards.len(), bt)?;
        check_len("dist_gae mask", mask.len(), bt)?;
        check_len("dist_gae adv", adv.len(), btk)?;
        check_len("dist_gae ret", ret.len(), btk)?;
        check_len("dist_gae adv_mean", adv_mean.len(), bt)?;
        if btk == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let (vp, _gv) = values.device_ptr(s);
        let (rp, _gr) = rewards.device_ptr(s);
        let (mp, _gm) = mask.device_ptr(s);
        let (ap, _ga) = adv.device_ptr_mut(s);
        let (gp, _gg) = ret.device_ptr_mut(s);
        let (amp, _gam) = adv_mean.device_ptr_mut(s);
        // SAFETY: lengths checked above; &mut views cannot alias each other or the inputs.
        unsafe { dist_gae_raw(dev, vp, rp, mp, b, t, k, p, ap, gp, amp) }
    }

    /// Masked whitening on raw device pointers; queues three launches and never synchronises.
    /// `stats` (2 f32) receives `[μ, σ]`, or `[NaN, NaN]` with `out` all 0 when fewer than two
    /// tokens are valid. `workspace` holds [`whiten_workspace_len`]`(n)` f64; its element
    /// `3·reduce_blocks(n) + 2` holds the valid-token count afterwards. `out` may equal `x`.
    ///
    /// # Safety
    /// `x`, `mask`, `out` must hold `n` f32, `stats` 2 f32 and `workspace` the f64 above, on
    /// `dev`'s context; `stats` and `workspace` must not overlap anything else.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn whiten_raw(
        dev: &CudaDevice,
        x: u64,
        mask: u64,
        out: u64,
        n: usize,
        stats: u64,
        workspace: u64,
    ) -> Result<()> {
        if n > 0 {
            check_ptr("whiten x", x, 4)?;
            check_ptr("whiten mask", mask, 4)?;
            check_ptr("whiten out", out, 4)?;
        }
        check_ptr("whiten stats", stats, 4)?;
        check_ptr("whiten workspace", workspace, 8)?;
        let g = reduce_blocks(n);
        let gi = g as i32;
        let nl = n as i64;
        let fin = workspace + 8 * 3 * g as u64;

        let f = dev.function(FAMILY, "rl_whiten_partial")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&x).arg(&mask).arg(&nl).arg(&workspace);
        dev.launch(
            "rl_whiten_partial",
            a,
            LaunchConfig {
                grid_dim: (g as u32, 1, 1),
                block_dim: (RL_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            },
        )?;

        let f = dev.function(FAMILY, "rl_whiten_finalize")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&workspace).arg(&gi).arg(&stats);
        dev.launch(
            "rl_whiten_finalize",
            a,
            LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (RL_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            },
        )?;

        let f = dev.function(FAMILY, "rl_whiten_apply")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&x).arg(&mask).arg(&fin).arg(&out).arg(&nl);
        dev.launch(
            "rl_whiten_apply",
            a,
            LaunchConfig {
                grid_dim: (blocks_for(n, RL_BLOCK), 1, 1),
                block_dim: (RL_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    }

    /// Masked whitening without a host round trip: `stats` (2 f32) receives `[μ, σ]` on the
    /// device (`[NaN, NaN]` and `out` all 0 when fewer than two tokens are valid).
    pub fn whiten_into(
        dev: &CudaDevice,
        x: &CudaView<'_, f32>,
        mask: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, f32>,
        stats: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let mut ws = dev
            .stream()
            .alloc_zeros::<f64>(whiten_workspace_len(x.len()))?;
        whiten_with_workspace(dev, x, mask, out, stats, &mut ws)
    }

    fn whiten_with_workspace(
        dev: &CudaDevice,
        x: &CudaView<'_, f32>,
        mask: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, f32>,
        stats: &mut CudaViewMut<'_, f32>,
        ws: &mut CudaSlice<f64>,
    ) -> Result<()> {
        let n = x.len();
        check_len("whiten mask", mask.len(), n)?;
        check_len("whiten out", out.len(), n)?;
        check_len("whiten stats", stats.len(), 2)?;
        check_len("whiten workspace", ws.len(), whiten_workspace_len(n))?;
        let s = dev.stream();
        let (xp, _gx) = x.device_ptr(s);
        let (mp, _gm) = mask.device_ptr(s);
        let (op, _go) = out.device_ptr_mut(s);
        let (sp, _gs) = stats.device_ptr_mut(s);
        let (wp, _gw) = ws.device_ptr_mut(s);
        // SAFETY: lengths checked above; the &mut borrows keep the outputs disjoint.
        unsafe { whiten_raw(dev, xp, mp, op, n, sp, wp) }
    }

    /// Masked whitening (see the module doc); copies `(μ, σ)` back to the host (a stream
    /// synchronisation). Fewer than two valid tokens: [`Error::Invalid`] (`out` is then all 0).
    pub fn whiten(
        dev: &CudaDevice,
        x: &CudaView<'_, f32>,
        mask: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(f32, f32)> {
        let s = dev.stream();
        let mut ws = s.alloc_zeros::<f64>(whiten_workspace_len(x.len()))?;
        let mut stats = s.alloc_zeros::<f32>(2)?;
        whiten_with_workspace(dev, x, mask, out, &mut stats.as_view_mut(), &mut ws)?;
        let g = reduce_blocks(x.len());
        let fin = dev.dtoh(&ws.slice(3 * g..3 * g + 4))?;
        let st = dev.dtoh(&stats)?;
        dev.synchronize()?;
        let n_valid = fin[2];
        if n_valid < 2.0 {
            return Err(Error::Invalid(format!(
                "whiten: {n_valid} valid token(s); the unbiased std needs at least 2"
            )));
        }
        if !(st[0].is_finite() && st[1].is_finite()) {
            return Err(Error::Invalid(format!(
                "whiten: mean {} / std {} not finite (non-finite x at a valid token?)",
                st[0], st[1]
            )));
        }
        Ok((st[0], st[1]))
    }

    /// Clipped PPO policy loss on raw pointers (see the module doc); three launches, no
    /// synchronisation. `stats` (4 f32) receives `[loss, clipfrac, approx_kl, n_valid]`;
    /// `workspace` holds [`ppo_workspace_len`]`(n)` f64.
    ///
    /// # Safety
    /// `logp`, `logp_old`, `adv`, `mask`, `loss_tok`, `grad` must hold `n` f32, `stats` 4 f32
    /// and `workspace` the f64 above, on `dev`'s context; outputs must not overlap each other
    /// or the inputs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn ppo_policy_loss_raw(
        dev: &CudaDevice,
        logp: u64,
        logp_old: u64,
        adv: u64,
        mask: u64,
        n: usize,
        p: PpoParams,
        loss_tok: u64,
        grad: u64,
        stats: u64,
        workspace: u64,
    ) -> Result<()> {
        p.validate()?;
        if n > 0 {
            for (what, ptr) in [
                ("ppo_policy_loss logp", logp),
                ("ppo_policy_loss logp_old", logp_old),
                ("ppo_policy_loss adv", adv),
                ("ppo_policy_loss mask", mask),
                ("ppo_policy_loss loss_tok", loss_tok),
                ("ppo_policy_loss grad", grad),
            ] {
                check_ptr(what, ptr, 4)?;
            }
        }
        check_ptr("ppo_policy_loss stats", stats, 4)?;
        check_ptr("ppo_policy_loss workspace", workspace, 8)?;
        let g = reduce_blocks(n);
        let gi = g as i32;
        let nl = n as i64;
        let inv_n = workspace + 8 * 4 * g as u64;
        let (cl, ch) = (p.clip_low, p.clip_high);

        let f = dev.function(FAMILY, "rl_ppo_loss")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&logp)
            .arg(&logp_old)
            .arg(&adv)
            .arg(&mask)
            .arg(&nl)
            .arg(&cl)
            .arg(&ch)
            .arg(&loss_tok)
            .arg(&grad)
            .arg(&workspace);
        dev.launch(
            "rl_ppo_loss",
            a,
            LaunchConfig {
                grid_dim: (g as u32, 1, 1),
                block_dim: (RL_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            },
        )?;

        let f = dev.function(FAMILY, "rl_ppo_finalize")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&workspace).arg(&gi).arg(&stats);
        dev.launch(
            "rl_ppo_finalize",
            a,
            LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (RL_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            },
        )?;

        let f = dev.function(FAMILY, "rl_ppo_scale_grad")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&grad).arg(&inv_n).arg(&nl);
        dev.launch(
            "rl_ppo_scale_grad",
            a,
            LaunchConfig {
                grid_dim: (blocks_for(n, RL_BLOCK), 1, 1),
                block_dim: (RL_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    }

    /// Clipped PPO policy loss without a host round trip: `stats` (4 f32) receives
    /// `[loss, clipfrac, approx_kl, n_valid]` on the device.
    #[allow(clippy::too_many_arguments)]
    pub fn ppo_policy_loss_into(
        dev: &CudaDevice,
        logp: &CudaView<'_, f32>,
        logp_old: &CudaView<'_, f32>,
        adv: &CudaView<'_, f32>,
        mask: &CudaView<'_, f32>,
        p: PpoParams,
        loss_tok: &mut CudaViewMut<'_, f32>,
        grad: &mut CudaViewMut<'_, f32>,
        stats: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        p.validate()?;
        let n = logp.len();
        check_len("ppo_policy_loss logp_old", logp_old.len(), n)?;
        check_len("ppo_policy_loss adv", adv.len(), n)?;
        check_len("ppo_policy_loss mask", mask.len(), n)?;
        check_len("ppo_policy_loss loss_tok", loss_tok.len(), n)?;
        check_len("ppo_policy_loss grad", grad.len(), n)?;
        check_len("ppo_policy_loss stats", stats.len(), 4)?;
        let s = dev.stream();
        let mut ws = s.alloc_zeros::<f64>(ppo_workspace_len(n))?;
        let (lp, _g1) = logp.device_ptr(s);
        let (op, _g2) = logp_old.device_ptr(s);
        let (ap, _g3) = adv.device_ptr(s);
        let (mp, _g4) = mask.device_ptr(s);
        let (ltp, _g5) = loss_tok.device_ptr_mut(s);
        let (gp, _g6) = grad.device_ptr_mut(s);
        let (sp, _g7) = stats.device_ptr_mut(s);
        let (wp, _g8) = ws.device_ptr_mut(s);
        // SAFETY: lengths checked above; the &mut borrows keep the outputs disjoint.
        unsafe { ppo_policy_loss_raw(dev, lp, op, ap, mp, n, p, ltp, gp, sp, wp) }
    }

    /// Clipped PPO policy loss (see the module doc); copies the token-mean statistics back to
    /// the host (a stream synchronisation).
    #[allow(clippy::too_many_arguments)]
    pub fn ppo_policy_loss(
        dev: &CudaDevice,
        logp: &CudaView<'_, f32>,
        logp_old: &CudaView<'_, f32>,
        adv: &CudaView<'_, f32>,
        mask: &CudaView<'_, f32>,
        p: PpoParams,
        loss_tok: &mut CudaViewMut<'_, f32>,
        grad: &mut CudaViewMut<'_, f32>,
    ) -> Result<PpoStats<f32>> {
        let mut stats = dev.stream().alloc_zeros::<f32>(4)?;
        ppo_policy_loss_into(
            dev,
            logp,
            logp_old,
            adv,
            mask,
            p,
            loss_tok,
            grad,
            &mut stats.as_view_mut(),
        )?;
        let st = dev.dtoh(&stats)?;
        dev.synchronize()?;
        Ok(PpoStats {
            loss: st[0],
            clipfrac: st[1],
            approx_kl: st[2],
            n_valid: st[3],
        })
    }

    /// Per-token KL penalty on raw pointers (see the module doc). `grad` may be 0 (not written).
    ///
    /// # Safety
    /// `logp`, `logp_ref`, `mask`, `out` (and `grad` unless 0) must hold `n` f32 on `dev`'s
    /// context; `out` and `grad` must not overlap each other or the inputs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kl_penalty_raw(
        dev: &CudaDevice,
        logp: u64,
        logp_ref: u64,
        mask: u64,
        n: usize,
        kind: KlKind,
        out: u64,
        grad: u64,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        for (what, ptr) in [
            ("kl_penalty logp", logp),
            ("kl_penalty logp_ref", logp_ref),
            ("kl_penalty mask", mask),
            ("kl_penalty out", out),
        ] {
            check_ptr(what, ptr, 4)?;
        }
        if grad != 0 {
            check_ptr("kl_penalty grad", grad, 4)?;
        }
        let nl = n as i64;
        let code = kind.code();
        let f = dev.function(FAMILY, "rl_kl_penalty")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&logp)
            .arg(&logp_ref)
            .arg(&mask)
            .arg(&nl)
            .arg(&code)
            .arg(&out)
            .arg(&grad);
        dev.launch(
            "rl_kl_penalty",
            a,
            LaunchConfig {
                grid_dim: (blocks_for(n, RL_BLOCK), 1, 1),
                block_dim: (RL_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    }

    /// Per-token KL penalty (see the module doc) on device views; `grad` optional.
    pub fn kl_penalty(
        dev: &CudaDevice,
        logp: &CudaView<'_, f32>,
        logp_ref: &CudaView<'_, f32>,
        mask: &CudaView<'_, f32>,
        kind: KlKind,
        out: &mut CudaViewMut<'_, f32>,
        grad: Option<&mut CudaViewMut<'_, f32>>,
    ) -> Result<()> {
        let n = logp.len();
        check_len("kl_penalty logp_ref", logp_ref.len(), n)?;
        check_len("kl_penalty mask", mask.len(), n)?;
        check_len("kl_penalty out", out.len(), n)?;
        if let Some(g) = grad.as_deref() {
            check_len("kl_penalty grad", g.len(), n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let (lp, _g1) = logp.device_ptr(s);
        let (rp, _g2) = logp_ref.device_ptr(s);
        let (mp, _g3) = mask.device_ptr(s);
        let (op, _g4) = out.device_ptr_mut(s);
        let (gp, _g5) = match grad {
            Some(g) => {
                let (p, guard) = g.device_ptr_mut(s);
                (p, Some(guard))
            }
            None => (0, None),
        };
        // SAFETY: lengths checked above; the &mut borrows keep the outputs disjoint.
        unsafe { kl_penalty_raw(dev, lp, rp, mp, n, kind, op, gp) }
    }
}
