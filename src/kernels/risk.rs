//! Per-row distribution statistics and the DFPO risk-loss terms (method doc 2.8, 2.9, 6);
//! the CUDA side is `kernels/risk.cu`.
//!
//! A row holds the K value samples of one token (1 ≤ K ≤ [`MAX_K`]); R rows are stored
//! row-major `[R][K]`. Per row:
//! - [`cpu::stats`] / [`cuda::stats`]: the [`NSTATS`] statistics of [`Stat`] (population
//!   moments; the lower tail is the lowest k_α = [`tail_count`]`(α, K)` samples, the upper tail
//!   the highest k_β), Hazen quantiles ([`quantile_sorted`]), and optionally the ascending sorted
//!   row and its stable sort permutation.
//! - [`cpu::loss`] / [`cuda::loss`]: the [`NTERMS`] risk-loss terms of [`Term`] between the
//!   critic's samples `pred` and the (stop-gradient) targets `target`, and dL/dpred:
//!   - L_cvar  = (CVaR_α(pred) − CVaR_α(target))², CVaR_α = mean of the lowest k_α (doc 2.8);
//!   - L_gain  = (MeanHigh_β(pred) − MeanHigh_β(target))², the upper-tail twin (doc 2.8);
//!   - L_shape = relu(VarLow(pred) − VarLow(target)) + relu(VarHigh(target) − VarHigh(pred))
//!     (doc 2.9: contract the lower tail, keep the upper tail at least as wide as the target);
//!   - L_mean  = relu(mean(target) − mean(pred)) (doc 2.8, DVPO's mean-shift penalty).
//!
//!   The row's loss is row_scale_r · Σ_j w_j·L_j. Its gradient flows back through pred's
//!   stable sort permutation into the unsorted positions; at a relu kink (argument exactly 0)
//!   the subgradient 0 is used. When k_α + k_β > K the tails overlap and both contribute.
//!
//! Sorting is stable (ties keep index order) on the CPU and on the GPU, so `perm` and the
//! gradient's placement on ties agree exactly between the two. The order is total:
//! −inf < … < −0 < +0 < … < +inf < NaN (NaN last, as numpy and torch sort; every NaN equal).
//!
//! Non-finite samples (CPU and GPU alike): a row holding a NaN or ±inf sample gets NaN for every
//! statistic and quantile, and in the loss (a non-finite sample in pred or target) NaN for every
//! term and the row's loss, and NaN added to every gradient position of the row. NaN propagates
//! to whatever consumes it (e.g. the trainer's non-finite-loss policy); it is never turned into
//! a finite, wrong statistic. `sorted` and `perm` stay exact (the sorted row shows NaN, as a
//! canonical NaN on the GPU, at its end).

use std::cmp::Ordering;

use crate::error::{check_len, Error, Result};
use crate::kernels::Real;

/// Largest supported number of samples per row.
pub const MAX_K: usize = 1024;
/// Number of per-row statistics, see [`Stat`].
pub const NSTATS: usize = 7;
/// Number of per-row loss terms, see [`Term`].
pub const NTERMS: usize = 4;
/// Most quantile levels one CUDA `stats` launch takes (they travel as a kernel argument).
pub const MAX_QUANTILES_CUDA: usize = 16;

/// Tail fractions: α for the lower tail, β for the upper tail, each in (0, 1].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TailLevels {
    pub alpha: f32,
    pub beta: f32,
}

impl Default for TailLevels {
    /// α = β = 0.1 (DVPO recipe, method doc 2.12).
    fn default() -> Self {
        TailLevels {
            alpha: 0.1,
            beta: 0.1,
        }
    }
}

impl TailLevels {
    /// `Error::Invalid` unless α and β are both in (0, 1].
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("alpha", self.alpha), ("beta", self.beta)] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(Error::Invalid(format!(
                    "TailLevels.{name} = {v}: must be in (0, 1]"
                )));
            }
        }
        Ok(())
    }

    /// (k_α, k_β) for rows of `k` samples.
    pub fn counts(&self, k: usize) -> (usize, usize) {
        (tail_count(self.alpha, k), tail_count(self.beta, k))
    }
}

/// Tail size max(1, ⌊frac·K⌋) (the k_α, k_β of method doc 2.8, 2.9), at most K.
///
/// The max(1, ·) keeps a tail non-empty when frac·K < 1 (α = 0.1 with K < 10 still uses the
/// lowest sample) so the tail means and variances stay defined. The product is formed in f64
/// with a relative slack of 1e-6, so a level written as a decimal counts as that decimal:
/// 0.7f32 is 0.69999999, and (0.7, K = 10) gives 7, not 6.
pub fn tail_count(frac: f32, k: usize) -> usize {
    let c = (frac as f64 * k as f64 * (1.0 + 1e-6)).floor();
    let c = if c.is_finite() && c > 0.0 {
        c as usize
    } else {
        0
    };
    c.clamp(1, k.max(1))
}

/// Per-row statistics, in output order. Variances are population variances (divide by n).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Mean of the row.
    Mean = 0,
    /// Variance of the row.
    Var = 1,
    /// CVaR_α: mean of the lowest k_α samples.
    CvarLow = 2,
    /// Mean of the highest k_β samples.
    MeanHigh = 3,
    /// Variance of the lowest k_α samples.
    VarLow = 4,
    /// Variance of the highest k_β samples.
    VarHigh = 5,
    /// Standard deviation of the row, sqrt(Var).
    Std = 6,
}

/// Per-row loss terms, in output order (unweighted values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Term {
    /// (CVaR_α(pred) − CVaR_α(target))².
    Cvar = 0,
    /// (MeanHigh_β(pred) − MeanHigh_β(target))².
    Gain = 1,
    /// relu(VarLow(pred) − VarLow(target)) + relu(VarHigh(target) − VarHigh(pred)).
    Shape = 2,
    /// relu(mean(target) − mean(pred)).
    MeanShift = 3,
}

/// Weights of the loss terms, see [`Term`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RiskLossWeights {
    pub cvar: f32,
    pub gain: f32,
    pub shape: f32,
    pub mean_shift: f32,
}

impl Default for RiskLossWeights {
    /// The DV recipe: 1, 1, 1, and the optional mean-shift penalty off (method doc 2.8, 2.10).
    fn default() -> Self {
        RiskLossWeights {
            cvar: 1.0,
            gain: 1.0,
            shape: 1.0,
            mean_shift: 0.0,
        }
    }
}

impl RiskLossWeights {
    /// `Error::Invalid` unless every weight is finite.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("cvar", self.cvar),
            ("gain", self.gain),
            ("shape", self.shape),
            ("mean_shift", self.mean_shift),
        ] {
            if !v.is_finite() {
                return Err(Error::Invalid(format!(
                    "RiskLossWeights.{name} = {v}: must be finite"
                )));
            }
        }
        Ok(())
    }
}

/// Hazen read-out position of level `q` in `k` sorted samples: (lower index, weight of the
/// next one). Position p = q·K − ½ (0-based) clamped to [0, K−1]; see [`quantile_sorted`].
pub fn hazen_position(q: f32, k: usize) -> (usize, f64) {
    let p = q as f64 * k as f64 - 0.5;
    // A NaN level reads the first sample (callers validate levels first).
    if p.is_nan() || p <= 0.0 || k == 0 {
        return (0, 0.0);
    }
    if p >= (k - 1) as f64 {
        return (k - 1, 0.0);
    }
    let lo = p.floor();
    (lo as usize, p - lo)
}

/// The level-`q` quantile of ascending `sorted`, Hazen's rule: sample i (0-based) sits at level
/// (i + ½)/K, linear interpolation between neighbours, clamped to the first/last sample
/// outside [½/K, 1 − ½/K].
///
/// Why Hazen: the stratified noise ε_k = Φ⁻¹((k − ½)/K), k = 1..K (method doc 2.3), and the
/// monotone flow map put the k-th smallest value sample exactly at level (k − ½)/K of the
/// modelled return distribution, so this reads the model's quantile function back without
/// bias. Returns NaN for an empty slice or a NaN level.
pub fn quantile_sorted<T: Real>(sorted: &[T], q: f32) -> T {
    if sorted.is_empty() || q.is_nan() {
        return T::from_f64(f64::NAN);
    }
    let k = sorted.len();
    let (lo, frac) = hazen_position(q, k);
    let a = sorted[lo];
    if frac == 0.0 {
        return a;
    }
    let b = sorted[(lo + 1).min(k - 1)];
    a + T::from_f64(frac) * (b - a)
}

fn check_k(k: usize) -> Result<()> {
    if k == 0 || k > MAX_K {
        Err(Error::Invalid(format!(
            "k = {k}: samples per row must be in 1..={MAX_K}"
        )))
    } else {
        Ok(())
    }
}

fn rows_of(what: &str, len: usize, k: usize) -> Result<usize> {
    if !len.is_multiple_of(k) {
        Err(Error::Shape(format!(
            "{what}: length {len} is not a multiple of k = {k}"
        )))
    } else {
        Ok(len / k)
    }
}

fn check_quantiles(quantiles: &[f32]) -> Result<()> {
    for (i, &q) in quantiles.iter().enumerate() {
        if !(0.0..=1.0).contains(&q) {
            return Err(Error::Invalid(format!(
                "quantiles[{i}] = {q}: levels must be in [0, 1]"
            )));
        }
    }
    Ok(())
}

pub mod cpu {
    //! The CPU reference, generic over [`Real`] (f32 to run, f64 for checks).

    use super::*;

    /// The sort order: NaN after everything else (all NaN equal), otherwise IEEE total order
    /// (−0 before +0), which for f32 is the GPU's integer sort key order.
    fn order<T: Real>(a: T, b: T) -> Ordering {
        let (a, b) = (a.to_f64(), b.to_f64());
        match (a.is_nan(), b.is_nan()) {
            (false, false) => a.total_cmp(&b),
            (x, y) => x.cmp(&y),
        }
    }

    fn row_finite<T: Real>(row: &[T]) -> bool {
        row.iter().all(|v| v.is_finite())
    }

    /// Writes into `perm` the stable ascending sort permutation of `row` (`perm[i]` = index of
    /// the i-th smallest in the order of the module doc, NaN last; ties keep index order).
    pub fn sort_perm<T: Real>(row: &[T], perm: &mut [u32]) {
        let mut pairs = Vec::with_capacity(row.len());
        sort_pairs(row, &mut pairs);
        for (p, &(_, i)) in perm.iter_mut().zip(&pairs) {
            *p = i;
        }
    }

    /// Fills `pairs` with (value, index) of `row` in stable ascending order.
    fn sort_pairs<T: Real>(row: &[T], pairs: &mut Vec<(T, u32)>) {
        pairs.clear();
        pairs.extend(row.iter().zip(0u32..).map(|(&v, i)| (v, i)));
        // `sort_by` is stable: equal values keep increasing index order.
        pairs.sort_by(|a, b| order(a.0, b.0));
    }

    /// Population mean and variance (two-pass) of a non-empty slice.
    fn mean_var<T: Real>(xs: &[T]) -> (T, T) {
        let n = T::from_f64(xs.len() as f64);
        let mut s = T::ZERO;
        for &x in xs {
            s += x;
        }
        let m = s / n;
        let mut d = T::ZERO;
        for &x in xs {
            d += (x - m) * (x - m);
        }
        (m, d / n)
    }

    struct Moments<T> {
        mean: T,
        var: T,
        mlo: T,
        vlo: T,
        mhi: T,
        vhi: T,
    }

    fn moments<T: Real>(sorted: &[T], klo: usize, khi: usize) -> Moments<T> {
        let k = sorted.len();
        let (mean, var) = mean_var(sorted);
        let (mlo, vlo) = mean_var(&sorted[..klo]);
        let (mhi, vhi) = mean_var(&sorted[k - khi..]);
        Moments {
            mean,
            var,
            mlo,
            vlo,
            mhi,
            vhi,
        }
    }

    /// Per-row statistics of `x` (`[R][k]`): `stats[R][NSTATS]` in [`Stat`] order,
    /// `quant_out[R][quantiles.len()]` by [`quantile_sorted`], and optionally `sorted[R][k]`
    /// (ascending) and `perm[R][k]` (`perm[r][i]` = index within the row of the i-th smallest,
    /// stable: ties by index, so `sorted[r][i] == x[r][perm[r][i]]`).
    ///
    /// A row with a non-finite sample gets NaN statistics and quantiles (module doc).
    ///
    /// Errors: k outside 1..=[`MAX_K`], a length that does not fit, α or β outside (0, 1], a
    /// quantile level outside [0, 1].
    #[allow(clippy::too_many_arguments)]
    pub fn stats<T: Real>(
        x: &[T],
        k: usize,
        levels: TailLevels,
        quantiles: &[f32],
        stats: &mut [T],
        quant_out: &mut [T],
        mut sorted: Option<&mut [T]>,
        mut perm: Option<&mut [u32]>,
    ) -> Result<()> {
        check_k(k)?;
        levels.validate()?;
        check_quantiles(quantiles)?;
        let r = rows_of("x", x.len(), k)?;
        let nq = quantiles.len();
        check_len("stats", stats.len(), r * NSTATS)?;
        check_len("quant_out", quant_out.len(), r * nq)?;
        if let Some(s) = sorted.as_deref() {
            check_len("sorted", s.len(), r * k)?;
        }
        if let Some(p) = perm.as_deref() {
            check_len("perm", p.len(), r * k)?;
        }
        let (klo, khi) = levels.counts(k);
        let nan = T::from_f64(f64::NAN);
        let mut pairs = Vec::with_capacity(k);
        let mut pbuf = vec![0u32; k];
        let mut sbuf = vec![T::ZERO; k];
        for row in 0..r {
            let xr = &x[row * k..(row + 1) * k];
            sort_pairs(xr, &mut pairs);
            for ((s, p), &(v, i)) in sbuf.iter_mut().zip(pbuf.iter_mut()).zip(&pairs) {
                *s = v;
                *p = i;
            }
            let finite = row_finite(xr);
            let m = moments(&sbuf, klo, khi);
            let st = &mut stats[row * NSTATS..(row + 1) * NSTATS];
            st[Stat::Mean as usize] = m.mean;
            st[Stat::Var as usize] = m.var;
            st[Stat::CvarLow as usize] = m.mlo;
            st[Stat::MeanHigh as usize] = m.mhi;
            st[Stat::VarLow as usize] = m.vlo;
            st[Stat::VarHigh as usize] = m.vhi;
            st[Stat::Std as usize] = m.var.sqrt();
            let qo = &mut quant_out[row * nq..(row + 1) * nq];
            for (o, &q) in qo.iter_mut().zip(quantiles) {
                *o = quantile_sorted(&sbuf, q);
            }
            if !finite {
                st.fill(nan);
                qo.fill(nan);
            }
            if let Some(s) = sorted.as_deref_mut() {
                s[row * k..(row + 1) * k].copy_from_slice(&sbuf);
            }
            if let Some(p) = perm.as_deref_mut() {
                p[row * k..(row + 1) * k].copy_from_slice(&pbuf);
            }
        }
        Ok(())
    }

    /// The risk-loss terms between `pred` and `target` (both `[R][k]`; target is a
    /// stop-gradient): writes `terms[R][NTERMS]` (unweighted, [`Term`] order), ADDS
    /// d(total)/dpred into `grad[R][k]` (at the unsorted positions), and returns
    /// total = Σ_r row_scale_r · Σ_j w_j·terms_rj. `row_scale[R]` is e.g. mask/num_valid.
    ///
    /// A row with a non-finite sample in pred or target gets NaN terms and NaN added to its
    /// gradient, so the total is NaN (module doc).
    ///
    /// Errors: as [`stats`], plus mismatched lengths of target/row_scale/terms/grad and
    /// non-finite weights.
    #[allow(clippy::too_many_arguments)]
    pub fn loss<T: Real>(
        pred: &[T],
        target: &[T],
        k: usize,
        levels: TailLevels,
        w: &RiskLossWeights,
        row_scale: &[T],
        terms: &mut [T],
        grad: &mut [T],
    ) -> Result<T> {
        check_k(k)?;
        levels.validate()?;
        w.validate()?;
        let r = rows_of("pred", pred.len(), k)?;
        check_len("target", target.len(), r * k)?;
        check_len("row_scale", row_scale.len(), r)?;
        check_len("terms", terms.len(), r * NTERMS)?;
        check_len("grad", grad.len(), r * k)?;
        let (klo, khi) = levels.counts(k);
        let nan = T::from_f64(f64::NAN);
        let f = |v: f32| T::from_f64(v as f64);
        let (wc, wg, ws, wm) = (f(w.cvar), f(w.gain), f(w.shape), f(w.mean_shift));
        let two = T::from_f64(2.0);
        let (kt, klo_t, khi_t) = (
            T::from_f64(k as f64),
            T::from_f64(klo as f64),
            T::from_f64(khi as f64),
        );
        let relu = |x: T| if x > T::ZERO { x } else { T::ZERO };
        let mut pairs = Vec::with_capacity(k);
        let mut pp = vec![0u32; k];
        let mut ps = vec![T::ZERO; k];
        let mut ts = vec![T::ZERO; k];
        let mut total = T::ZERO;
        for row in 0..r {
            sort_pairs(&pred[row * k..(row + 1) * k], &mut pairs);
            for ((s, p), &(v, i)) in ps.iter_mut().zip(pp.iter_mut()).zip(&pairs) {
                *s = v;
                *p = i;
            }
            // The target needs its sorted values only.
            let tr = &target[row * k..(row + 1) * k];
            let finite = row_finite(&pred[row * k..(row + 1) * k]) && row_finite(tr);
            ts.copy_from_slice(tr);
            ts.sort_by(|a, b| order(*a, *b));
            let mp = moments(&ps, klo, khi);
            let mt = moments(&ts, klo, khi);
            let dc = mp.mlo - mt.mlo;
            let dg = mp.mhi - mt.mhi;
            let dl = mp.vlo - mt.vlo;
            let dh = mt.vhi - mp.vhi;
            let dm = mt.mean - mp.mean;
            let tm = if finite {
                [dc * dc, dg * dg, relu(dl) + relu(dh), relu(dm)]
            } else {
                [nan; NTERMS]
            };
            terms[row * NTERMS..(row + 1) * NTERMS].copy_from_slice(&tm);
            let sc = row_scale[row];
            total += sc * (wc * tm[0] + wg * tm[1] + ws * tm[2] + wm * tm[3]);
            // d/d(sorted position i); relu' = 0 at exactly 0. VarLow' = 2(x − mean_lo)/k_lo.
            for (i, &x) in ps.iter().enumerate() {
                let mut g = T::ZERO;
                if dm > T::ZERO {
                    g -= wm / kt;
                }
                if i < klo {
                    g += wc * two * dc / klo_t;
                    if dl > T::ZERO {
                        g += ws * two * (x - mp.mlo) / klo_t;
                    }
                }
                if i >= k - khi {
                    g += wg * two * dg / khi_t;
                    if dh > T::ZERO {
                        g -= ws * two * (x - mp.mhi) / khi_t;
                    }
                }
                grad[row * k + pp[i] as usize] += if finite { sc * g } else { nan };
            }
        }
        Ok(total)
    }
}

pub mod cuda {
    //! fp32 CUDA launchers (kernels/risk.cu). Kernels per padded row length P = next_pow2(K):
    //! `risk_stats_p<P>` (values-only sort), `risk_stats_perm_p<P>` (sort carries the index,
    //! used when `perm` is wanted) and `risk_loss_p<P>`.
    //!
    //! Quantile levels travel as a kernel argument (at most [`MAX_QUANTILES_CUDA`]): the host
    //! turns each level into its Hazen read-out position ([`hazen_position`], the CPU
    //! reference's own f64 arithmetic), so no device buffer or copy is needed and the launch
    //! can be captured in a CUDA graph. The total loss is not reduced on the device: `terms`
    //! and the optional `row_loss[R]` = row_scale·Σ_j w_j·terms_j hold everything needed.

    use super::*;
    use crate::device::CudaDevice;
    use cudarc::driver::{
        CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
    };

    /// `RiskQuantiles` in risk.cu.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    struct QuantArgs {
        n: i32,
        lo: [i32; MAX_QUANTILES_CUDA],
        frac: [f32; MAX_QUANTILES_CUDA],
    }
    // SAFETY: plain #[repr(C)] data with the layout of the kernel's by-value struct.
    unsafe impl DeviceRepr for QuantArgs {}
    // SAFETY: as DeviceRepr (pushed by value; the emulator checks its size).
    unsafe impl crate::device::KernelValue for QuantArgs {}

    /// `RiskWeights` in risk.cu.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    struct WeightArgs {
        cvar: f32,
        gain: f32,
        shape: f32,
        mean_shift: f32,
    }
    // SAFETY: plain #[repr(C)] data with the layout of the kernel's by-value struct.
    unsafe impl DeviceRepr for WeightArgs {}
    // SAFETY: as DeviceRepr (pushed by value; the emulator checks its size).
    unsafe impl crate::device::KernelValue for WeightArgs {}

    // The kernels' by-value parameters are 132 and 16 bytes (tests/cuda_risk.rs checks the
    // parameter lists in the PTX).
    const _: () = assert!(std::mem::size_of::<QuantArgs>() == 4 + 8 * MAX_QUANTILES_CUDA);
    const _: () = assert!(std::mem::size_of::<WeightArgs>() == 16);

    /// Launch layout for rows of `k` samples (mirrors `RiskCfg` in risk.cu; the kernels loop
    /// over row groups, so this only sizes the grid).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Layout {
        /// Padded row length next_pow2(k).
        pub p: usize,
        /// Values each lane holds in registers.
        pub per_lane: usize,
        /// Lanes of a warp that own one row.
        pub lanes_per_row: usize,
        /// Rows one block handles.
        pub rows_per_block: usize,
        /// Threads per block.
        pub threads: usize,
    }

    /// The [`Layout`] of the kernels for rows of `k` samples.
    pub fn layout(k: usize) -> Layout {
        let p = k.max(1).next_power_of_two();
        let e = if p < 16 { p } else { (p / 32).max(16) };
        let g = p / e;
        let warps = if e > 16 { 4 } else { 8 };
        Layout {
            p,
            per_lane: e,
            lanes_per_row: g,
            rows_per_block: warps * (32 / g),
            threads: warps * 32,
        }
    }

    /// The launch over `r` rows (the kernels loop over row groups, so the grid only needs to be
    /// valid); `r` is at most i32::MAX ([`stats_raw`] and [`loss_raw`] check it).
    pub fn launch_config(r: usize, l: &Layout) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (r.div_ceil(l.rows_per_block) as u32, 1, 1),
            block_dim: (l.threads as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn check_rows(r: usize) -> Result<()> {
        if r > i32::MAX as usize {
            return Err(Error::Shape(format!(
                "{r} rows: at most {} per launch",
                i32::MAX
            )));
        }
        Ok(())
    }

    fn non_null(what: &str, p: u64) -> Result<()> {
        if p == 0 {
            Err(Error::Invalid(format!("{what}: null device pointer")))
        } else {
            Ok(())
        }
    }

    /// Launches `risk_stats_p<P>` on raw device pointers (CUdeviceptr): `x[r][k]` →
    /// `stats[r][NSTATS]`, `quant_out[r][quantiles.len()]`, `sorted[r][k]`, `perm[r][k]` (u32).
    /// Any output may be 0 (= not wanted), except `quant_out` when `quantiles` is non-empty.
    ///
    /// # Safety
    /// Every non-null pointer must address device memory of `dev`'s context, of at least the
    /// sizes above, valid until the launch completes on `dev.stream()`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn stats_raw(
        dev: &CudaDevice,
        x: u64,
        r: usize,
        k: usize,
        levels: TailLevels,
        quantiles: &[f32],
        stats: u64,
        quant_out: u64,
        sorted: u64,
        perm: u64,
    ) -> Result<()> {
        check_k(k)?;
        levels.validate()?;
        check_quantiles(quantiles)?;
        check_rows(r)?;
        if quantiles.len() > MAX_QUANTILES_CUDA {
            return Err(Error::Invalid(format!(
                "{} quantile levels: the CUDA stats kernel takes at most {MAX_QUANTILES_CUDA}",
                quantiles.len()
            )));
        }
        if r == 0 {
            return Ok(());
        }
        non_null("x", x)?;
        if !quantiles.is_empty() {
            non_null("quant_out", quant_out)?;
        }
        let (klo, khi) = levels.counts(k);
        let mut qa = QuantArgs {
            n: quantiles.len() as i32,
            lo: [0; MAX_QUANTILES_CUDA],
            frac: [0.0; MAX_QUANTILES_CUDA],
        };
        for (i, &q) in quantiles.iter().enumerate() {
            let (lo, frac) = hazen_position(q, k);
            qa.lo[i] = lo as i32;
            qa.frac[i] = frac as f32;
        }
        let l = layout(k);
        // The permutation variant carries an index through the sort; the plain one does not.
        let name = if perm != 0 {
            format!("risk_stats_perm_p{}", l.p)
        } else {
            format!("risk_stats_p{}", l.p)
        };
        let f = dev.function("risk", &name)?;
        let (ri, ki, kloi, khii) = (r as i32, k as i32, klo as i32, khi as i32);
        let mut b = dev.launch_builder(&f);
        b.arg(&x)
            .arg(&ri)
            .arg(&ki)
            .arg(&kloi)
            .arg(&khii)
            .arg(&qa)
            .arg(&stats)
            .arg(&quant_out)
            .arg(&sorted)
            .arg(&perm);
        dev.launch(&name, b, launch_config(r, &l))
    }

    /// Safe [`stats_raw`]: the same contract as [`cpu::stats`] in fp32. `quant_out` must be
    /// `Some` (length R·quantiles.len()) when `quantiles` is non-empty; `sorted`/`perm` are
    /// optional. At most [`MAX_QUANTILES_CUDA`] levels.
    #[allow(clippy::too_many_arguments)]
    pub fn stats(
        dev: &CudaDevice,
        x: &CudaView<'_, f32>,
        k: usize,
        levels: TailLevels,
        quantiles: &[f32],
        stats: &mut CudaViewMut<'_, f32>,
        quant_out: Option<&mut CudaViewMut<'_, f32>>,
        sorted: Option<&mut CudaViewMut<'_, f32>>,
        perm: Option<&mut CudaViewMut<'_, u32>>,
    ) -> Result<()> {
        check_k(k)?;
        let r = rows_of("x", x.len(), k)?;
        check_len("stats", stats.len(), r * NSTATS)?;
        match &quant_out {
            Some(q) => check_len("quant_out", q.len(), r * quantiles.len())?,
            None if !quantiles.is_empty() => {
                return Err(Error::Invalid(
                    "quant_out: None, but quantile levels were given".into(),
                ))
            }
            None => {}
        }
        if let Some(s) = &sorted {
            check_len("sorted", s.len(), r * k)?;
        }
        if let Some(p) = &perm {
            check_len("perm", p.len(), r * k)?;
        }
        let st = dev.stream();
        let (xp, _gx) = x.device_ptr(st);
        let (sp, _gs) = stats.device_ptr_mut(st);
        let q = quant_out.map(|v| v.device_ptr_mut(st));
        let so = sorted.map(|v| v.device_ptr_mut(st));
        let pe = perm.map(|v| v.device_ptr_mut(st));
        let ptr = |o: &Option<(u64, _)>| o.as_ref().map_or(0, |(p, _)| *p);
        // SAFETY: every pointer comes from a live view of the length checked above.
        unsafe {
            stats_raw(
                dev,
                xp,
                r,
                k,
                levels,
                quantiles,
                sp,
                ptr(&q),
                ptr(&so),
                ptr(&pe),
            )
        }
    }

    /// Launches `risk_loss_p<P>` on raw device pointers: reads `pred[r][k]`, `target[r][k]`,
    /// `row_scale[r]`; writes `terms[r][NTERMS]` (0 = not wanted) and `row_loss[r]` =
    /// row_scale·Σ_j w_j·terms_j (0 = not wanted); ADDS dL/dpred into `grad[r][k]`.
    ///
    /// # Safety
    /// As [`stats_raw`]: every non-null pointer addresses device memory of at least the sizes
    /// above, valid until the launch completes on `dev.stream()`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn loss_raw(
        dev: &CudaDevice,
        pred: u64,
        target: u64,
        row_scale: u64,
        r: usize,
        k: usize,
        levels: TailLevels,
        w: &RiskLossWeights,
        terms: u64,
        grad: u64,
        row_loss: u64,
    ) -> Result<()> {
        check_k(k)?;
        levels.validate()?;
        w.validate()?;
        check_rows(r)?;
        if r == 0 {
            return Ok(());
        }
        non_null("pred", pred)?;
        non_null("target", target)?;
        non_null("row_scale", row_scale)?;
        non_null("grad", grad)?;
        let (klo, khi) = levels.counts(k);
        let wa = WeightArgs {
            cvar: w.cvar,
            gain: w.gain,
            shape: w.shape,
            mean_shift: w.mean_shift,
        };
        let l = layout(k);
        let name = format!("risk_loss_p{}", l.p);
        let f = dev.function("risk", &name)?;
        let (ri, ki, kloi, khii) = (r as i32, k as i32, klo as i32, khi as i32);
        let mut b = dev.launch_builder(&f);
        b.arg(&pred)
            .arg(&target)
            .arg(&row_scale)
            .arg(&ri)
            .arg(&ki)
            .arg(&kloi)
            .arg(&khii)
            .arg(&wa)
            .arg(&terms)
            .arg(&grad)
            .arg(&row_loss);
        dev.launch(&name, b, launch_config(r, &l))
    }

    /// Safe [`loss_raw`]: the same contract as [`cpu::loss`] in fp32, except that the total is
    /// not returned (sum `row_loss`, or the weighted `terms`, if it is needed).
    #[allow(clippy::too_many_arguments)]
    pub fn loss(
        dev: &CudaDevice,
        pred: &CudaView<'_, f32>,
        target: &CudaView<'_, f32>,
        k: usize,
        levels: TailLevels,
        w: &RiskLossWeights,
        row_scale: &CudaView<'_, f32>,
        terms: &mut CudaViewMut<'_, f32>,
        grad: &mut CudaViewMut<'_, f32>,
        row_loss: Option<&mut CudaViewMut<'_, f32>>,
    ) -> Result<()> {
        check_k(k)?;
        let r = rows_of("pred", pred.len(), k)?;
        check_len("target", target.len(), r * k)?;
        check_len("row_scale", row_scale.len(), r)?;
        check_len("terms", terms.len(), r * NTERMS)?;
        check_len("grad", grad.len(), r * k)?;
        if let Some(v) = &row_loss {
            check_len("row_loss", v.len(), r)?;
        }
        let st = dev.stream();
        let (pp, _gp) = pred.device_ptr(st);
        let (tp, _gt) = target.device_ptr(st);
        let (sp, _gs) = row_scale.device_ptr(st);
        let (mp, _gm) = terms.device_ptr_mut(st);
        let (gp, _gg) = grad.device_ptr_mut(st);
        let rl = row_loss.map(|v| v.device_ptr_mut(st));
        let rlp = rl.as_ref().map_or(0, |(p, _)| *p);
        // SAFETY: every pointer comes from a live view of the length checked above.
        unsafe { loss_raw(dev, pp, tp, sp, r, k, levels, w, mp, gp, rlp) }
    }
}

#[cfg(test)]
mod tests {
    use super::cuda::{launch_config, layout};
    use super::MAX_K;
    use crate::device::check_launch;

    #[test]
    fn launch_at_real_sizes() {
        // One row per response token of 64 x 1024, and the most rows a launch takes.
        for k in [1, 8, 32, 64, 1000, MAX_K] {
            for r in [64 * 1024, i32::MAX as usize] {
                let l = layout(k);
                let c = launch_config(r, &l);
                assert!(check_launch("risk", &c).unwrap(), "K={k} R={r}: {c:?}");
                assert!(c.grid_dim.0 as usize * l.rows_per_block >= r);
            }
        }
    }
}
