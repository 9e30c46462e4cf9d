//! Token sampling from logits (`kernels/sample.cu`): temperature, top-k, top-p, greedy.
//!
//! # Semantics (the CPU reference defines them; the kernel follows)
//! Per row of logits `z` (`[N][V]` row-major), with [`SampleParams`] `{temperature T, top_k,
//! top_p}`:
//! - **Order.** Tokens are totally ordered by logit descending, ties by id ascending. Every
//!   filter keeps a prefix of this order, so a tie at a filter's boundary keeps the lower ids.
//! - **Greedy** (`T == 0`): the first token of the order (argmax, ties to the lowest id);
//!   `top_k`/`top_p` are ignored, the sampling log-prob is 0 (a point mass), 1 token is kept.
//! - **Temperature** (`T > 0`): weights `w_j = exp((z_j − z_max)/T)`.
//! - **Top-k** (`0 < k < V`; `k == 0` or `k >= V` disables it): keep the first `k` tokens of the
//!   order — exactly `k`.
//! - **Top-p** (`p < 1`; `p == 1` disables it; `p` must be in (0, 1]), applied after top-k on the
//!   top-k survivors: keep the shortest prefix whose weight reaches `p·W` (`W` = the survivors'
//!   total weight), i.e. the smallest `L` with `Σ_{i<L} w_(i) >= p·W`. At least one token is kept.
//! - **Draw** over the kept set K, with probabilities `w_j / Σ_K w`: the exponential race (the
//!   method of vLLM's sampler): `token = argmax_{j∈K} (z_j − z_max)/T − ln(−ln u_j)` (ties to the
//!   lowest id), with `u_j = uniform_open(seed, element_counter(counter, row, V, j))`. The uniform
//!   is bit-identical on CPU and GPU, so both draw the same token from the same kept set unless
//!   two race scores are within float rounding of each other.
//! - **Outputs**: the token; `logprob_sample = ln(w_tok / Σ_K w)` (0 for greedy);
//!   `logprob_policy = z_tok − logsumexp(z)` (the temperature-1, unfiltered policy); optionally
//!   the kept count `|K|`.
//!
//! Rows get consecutive random streams: the caller advances `counter` by at least N per call.
//!
//! # CUDA (bf16 logits as `u16` bits, fp32 arithmetic)
//! One block per row; see the header of `kernels/sample.cu` for the passes. Top-k is exact (a
//! radix select on the 16-bit order key of bf16, then a scan in id order for ties). Top-p sums
//! weights `round(2^40·w)` as exact integers (deterministic, order-free) with `w` from fp32
//! `exp2f`; the CPU uses f64. So the kept count of top-p can differ from the CPU only when some
//! prefix mass is within ~1e-6 relative of `p·W` (a near-tie of the cumulative probability at the
//! boundary, which cannot be settled in fp32); likewise the drawn token can differ only when the
//! best two race scores are within ~1e-5. The parity tests check exactly these conditions.
//! Tokens whose weight is below 2^-41 of the max add nothing to the top-p mass on the GPU.
//!
//! # Rows that cannot be sampled
//! `-inf` logits are allowed (never drawn). A row holding a NaN or `+inf` logit, or whose every
//! logit is `-inf`, cannot be sampled. CPU and CUDA write the same for it: token 0 (a valid id,
//! so nothing downstream indexes out of range), NaN for both log-probs, and `n_kept = 0` (the
//! flag: a sampled row keeps at least one token). The CPU reference then returns
//! [`Error::Invalid`] naming the first such row and why; the kernel cannot return an error, so
//! the host checks the flags it downloads with [`unsampled_rows`] (with `n_kept` omitted, the
//! NaN log-probs still show it). The GPU computes the policy log-sum-exp in fp32 with the logits
//! scaled by log2(e), so a finite logit beyond about ±2.3e38 counts as infinite there.

use super::{uniform_open, Real};
use crate::error::{check_len, Error, Result};

/// Sampling settings, shared by every row of a call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    /// 0 = greedy; otherwise finite and > 0.
    pub temperature: f32,
    /// Keep the `top_k` best tokens; 0 (or >= V) disables.
    pub top_k: u32,
    /// Keep the shortest prefix with probability mass >= `top_p`; 1 disables. In (0, 1].
    pub top_p: f32,
}

impl Default for SampleParams {
    /// Plain sampling at temperature 1 (no top-k, no top-p).
    fn default() -> Self {
        SampleParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl SampleParams {
    /// Greedy decoding (temperature 0).
    pub fn greedy() -> Self {
        SampleParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// `temperature` finite and >= 0, `top_p` in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Invalid(format!(
                "SampleParams.temperature = {}: must be finite and >= 0 (0 = greedy)",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!(
                "SampleParams.top_p = {}: must be in (0, 1] (1 disables top-p)",
                self.top_p
            )));
        }
        Ok(())
    }

    /// True for temperature 0.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The top-k in effect for a vocabulary of `v` tokens (`None`: disabled).
    pub fn top_k_for(&self, v: usize) -> Option<usize> {
        let k = self.top_k as usize;
        (k != 0 && k < v).then_some(k)
    }

    /// True when top-p filters anything.
    pub fn top_p_active(&self) -> bool {
        self.top_p < 1.0
    }
}

/// Counter of the uniform that token `j` of row `row` draws: `(counter + row)·v + j`
/// (wrapping). Rows use consecutive streams of `v` counters.
pub fn element_counter(counter: u64, row: usize, v: usize, j: usize) -> u64 {
    counter
        .wrapping_add(row as u64)
        .wrapping_mul(v as u64)
        .wrapping_add(j as u64)
}

/// The host check of the kernel's flags: `Error::Invalid` naming the first row with
/// `n_kept == 0` (a row that could not be sampled: a NaN or +inf logit, or every logit -inf;
/// its token is 0 and its log-probs NaN), `Ok` when there is none.
pub fn unsampled_rows(n_kept: &[u32]) -> Result<()> {
    match n_kept.iter().position(|&k| k == 0) {
        None => Ok(()),
        Some(r) => Err(Error::Invalid(format!(
            "sample: row {r} could not be sampled (a NaN or +inf logit, or every logit -inf); \
             {} row(s) in all got token 0 and NaN log-probs",
            n_kept.iter().filter(|&&k| k == 0).count()
        ))),
    }
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

pub mod cpu {
    //! CPU reference (f64 arithmetic inside, any [`Real`] logits) and its building blocks, which
    //! the tests use to check kept sets and race scores independently.
    use super::*;

    /// Checks a row (no NaN, no +inf, not all -inf); returns (max logit, its lowest id).
    pub fn row_max<T: Real>(row: &[T]) -> Result<(f64, u32)> {
        let mut best: Option<(f64, u32)> = None;
        for (j, &z) in row.iter().enumerate() {
            let z = z.to_f64();
            if z.is_nan() || z == f64::INFINITY {
                return Err(Error::Invalid(format!(
                    "sample: logit {j} = {z}: NaN and +inf logits are not allowed"
                )));
            }
            if z.is_finite() && best.is_none_or(|(b, _)| z > b) {
                best = Some((z, j as u32));
            }
        }
        best.ok_or_else(|| {
            Error::Invalid("sample: every logit of the row is -inf: nothing can be drawn".into())
        })
    }

    /// Token ids in the total order: logit descending, ties by id ascending.
    pub fn rank_order<T: Real>(row: &[T]) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..row.len() as u32).collect();
        ids.sort_by(|&a, &b| {
            let (za, zb) = (row[a as usize].to_f64(), row[b as usize].to_f64());
            zb.partial_cmp(&za)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        });
        ids
    }

    /// Number of tokens kept by top-k then top-p (`p.temperature > 0`), given `order` from
    /// [`rank_order`] and the row's max logit. The kept set is `order[..len]`.
    pub fn kept_len<T: Real>(row: &[T], order: &[u32], zmax: f64, p: &SampleParams) -> usize {
        let v = row.len();
        let k = p.top_k_for(v).unwrap_or(v);
        if !p.top_p_active() {
            return k;
        }
        let t = p.temperature as f64;
        let w = |j: u32| ((row[j as usize].to_f64() - zmax) / t).exp();
        let total: f64 = order[..k].iter().map(|&j| w(j)).sum();
        let target = p.top_p as f64 * total;
        let mut cum = 0.0;
        for (i, &j) in order[..k].iter().enumerate() {
            cum += w(j);
            if cum >= target {
                return i + 1;
            }
        }
        k
    }

    /// Race score `(z_j − z_max)/T − ln(−ln u)` (natural-log units).
    pub fn race_score(z: f64, zmax: f64, temperature: f64, u: f64) -> f64 {
        (z - zmax) / temperature - (-u.ln()).ln()
    }

    /// The exponential race over `kept` (any order): (token, its score), ties to the lowest id.
    /// `stream` is `counter + row` (see [`element_counter`]).
    pub fn race<T: Real>(
        row: &[T],
        kept: &[u32],
        zmax: f64,
        temperature: f64,
        seed: u64,
        counter: u64,
        r: usize,
    ) -> (u32, f64) {
        let v = row.len();
        let mut best = (u32::MAX, f64::NEG_INFINITY);
        for &j in kept {
            let u = uniform_open(seed, element_counter(counter, r, v, j as usize));
            let s = race_score(row[j as usize].to_f64(), zmax, temperature, u);
            if s > best.1 || (s == best.1 && j < best.0) {
                best = (j, s);
            }
        }
        best
    }

    /// The kept tokens (in the total order) with their probabilities under the sampling
    /// distribution (renormalised over the kept set). Greedy: the argmax with probability 1.
    pub fn filtered_distribution<T: Real>(row: &[T], p: &SampleParams) -> Result<Vec<(u32, f64)>> {
        p.validate()?;
        let (zmax, amax) = row_max(row)?;
        if p.is_greedy() {
            return Ok(vec![(amax, 1.0)]);
        }
        let order = rank_order(row);
        let len = kept_len(row, &order, zmax, p);
        let t = p.temperature as f64;
        let w: Vec<f64> = order[..len]
            .iter()
            .map(|&j| ((row[j as usize].to_f64() - zmax) / t).exp())
            .collect();
        let total: f64 = w.iter().sum();
        Ok(order[..len]
            .iter()
            .zip(&w)
            .map(|(&j, &wj)| (j, wj / total))
            .collect())
    }

    /// Samples one token per row (see the module doc). Writes `tokens`, `logprob_sample`,
    /// `logprob_policy` (`[N]` each) and, when given, `n_kept`. Rows that cannot be sampled are
    /// written as the module doc says (token 0, NaN log-probs, `n_kept` 0), the others are
    /// sampled, and then the first such row is returned as [`Error::Invalid`].
    #[allow(clippy::too_many_arguments)]
    pub fn sample<T: Real>(
        logits: &[T],
        n: usize,
        v: usize,
        p: &SampleParams,
        seed: u64,
        counter: u64,
        tokens: &mut [u32],
        logprob_sample: &mut [T],
        logprob_policy: &mut [T],
        mut n_kept: Option<&mut [u32]>,
    ) -> Result<()> {
        p.validate()?;
        let nv = dims("sample", n, v)?;
        check_len("sample logits", logits.len(), nv)?;
        check_len("sample tokens", tokens.len(), n)?;
        check_len("sample logprob_sample", logprob_sample.len(), n)?;
        check_len("sample logprob_policy", logprob_policy.len(), n)?;
        if let Some(k) = n_kept.as_deref() {
            check_len("sample n_kept", k.len(), n)?;
        }
        let t = p.temperature as f64;
        let filtered = p.top_k_for(v).is_some() || p.top_p_active();
        let mut first_bad = None;
        for r in 0..n {
            let row = &logits[r * v..(r + 1) * v];
            let (zmax, amax) = match row_max(row) {
                Ok(m) => m,
                Err(e) => {
                    let nan = T::from_f64(f64::NAN);
                    (tokens[r], logprob_sample[r], logprob_policy[r]) = (0, nan, nan);
                    if let Some(k) = n_kept.as_deref_mut() {
                        k[r] = 0;
                    }
                    first_bad = first_bad.or(Some(match e {
                        Error::Invalid(m) => Error::Invalid(format!("{m} (row {r})")),
                        e => e,
                    }));
                    continue;
                }
            };
            let lse1 = zmax
                + row
                    .iter()
                    .map(|&z| (z.to_f64() - zmax).exp())
                    .sum::<f64>()
                    .ln();
            let (tok, lps, nk) = if p.is_greedy() {
                (amax, 0.0, 1usize)
            } else {
                let kept: Vec<u32> = if filtered {
                    let order = rank_order(row);
                    let len = kept_len(row, &order, zmax, p);
                    order[..len].to_vec()
                } else {
                    (0..v as u32).collect()
                };
                let (tok, _) = race(row, &kept, zmax, t, seed, counter, r);
                let sum: f64 = kept
                    .iter()
                    .map(|&j| ((row[j as usize].to_f64() - zmax) / t).exp())
                    .sum();
                let lps = (row[tok as usize].to_f64() - zmax) / t - sum.ln();
                (tok, lps, kept.len())
            };
            tokens[r] = tok;
            logprob_sample[r] = T::from_f64(lps);
            logprob_policy[r] = T::from_f64(row[tok as usize].to_f64() - lse1);
            if let Some(k) = n_kept.as_deref_mut() {
                k[r] = nk as u32;
            }
        }
        first_bad.map_or(Ok(()), Err)
    }
}

pub mod cuda {
    //! CUDA launcher: bf16 logits (as `u16` bits), fp32 log-probs, u32 tokens. `sample_raw` takes
    //! raw device pointers and queues one launch without synchronising; [`sample`] takes views.
    //! Rows that cannot be sampled are flagged, not reported: see the module doc and
    //! [`unsampled_rows`](super::unsampled_rows).
    use super::*;
    use crate::device::CudaDevice;
    use crate::kernels::check_ptr;
    use cudarc::driver::PushKernelArg;
    use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig};

    const FAMILY: &str = "sample";
    /// Threads per block (`SB` in sample.cu).
    const SAMPLE_BLOCK: u32 = 512;
    /// Largest vocabulary: keeps count·2^40 fixed-point masses inside u64.
    pub const MAX_VOCAB: usize = 1 << 22;

    /// Samples one token per row on raw device pointers: `logits` `[n][v]` bf16 bits (2-byte
    /// aligned), `tokens` `[n]` u32, `logprob_sample`, `logprob_policy` `[n]` f32, `n_kept`
    /// `[n]` u32 or 0 (not written).
    ///
    /// # Safety
    /// Every non-zero pointer must address the elements above on `dev`'s context; outputs must
    /// not overlap each other or the logits.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sample_raw(
        dev: &CudaDevice,
        logits: u64,
        n: usize,
        v: usize,
        p: &SampleParams,
        seed: u64,
        counter: u64,
        tokens: u64,
        logprob_sample: u64,
        logprob_policy: u64,
        n_kept: u64,
    ) -> Result<()> {
        p.validate()?;
        dims("sample", n, v)?;
        if v > MAX_VOCAB {
            return Err(Error::Invalid(format!(
                "sample: v = {v} exceeds the kernel's limit {MAX_VOCAB}"
            )));
        }
        let cfg = launch_config(n)?;
        if n == 0 {
            return Ok(());
        }
        check_ptr("sample logits", logits, 2)?;
        check_ptr("sample tokens", tokens, 4)?;
        check_ptr("sample logprob_sample", logprob_sample, 4)?;
        check_ptr("sample logprob_policy", logprob_policy, 4)?;
        if n_kept != 0 {
            check_ptr("sample n_kept", n_kept, 4)?;
        }
        let (vl, greedy, c, top_k, top_p) = kernel_params(v, p);
        let f = dev.function(FAMILY, "sample_rows")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&logits)
            .arg(&vl)
            .arg(&greedy)
            .arg(&c)
            .arg(&top_k)
            .arg(&top_p)
            .arg(&seed)
            .arg(&counter)
            .arg(&tokens)
            .arg(&logprob_sample)
            .arg(&logprob_policy)
            .arg(&n_kept);
        dev.launch("sample_rows", a, cfg)
    }

    /// The kernel's scalar parameters: (V, greedy, log2(e)/T, top-k or 0, top-p or 2 = off).
    fn kernel_params(v: usize, p: &SampleParams) -> (i64, i32, f32, u32, f32) {
        let c = if p.is_greedy() {
            0.0f32
        } else {
            (std::f64::consts::LOG2_E / p.temperature as f64) as f32
        };
        let top_k = p.top_k_for(v).unwrap_or(0) as u32;
        let top_p = if p.top_p_active() { p.top_p } else { 2.0f32 };
        (v as i64, i32::from(p.is_greedy()), c, top_k, top_p)
    }

    /// [`sample_raw`] with the seed and the counter read from the device when the kernel runs:
    /// `seed_ctr` addresses two u64, `[seed, counter]` (8-byte aligned). The launch's arguments
    /// do not change from call to call, so it can be captured in a CUDA graph and replayed while
    /// the counter advances on the device (device generation).
    ///
    /// # Safety
    /// As [`sample_raw`]; `seed_ctr` must address two u64 on `dev`'s context.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sample_dev_raw(
        dev: &CudaDevice,
        logits: u64,
        n: usize,
        v: usize,
        p: &SampleParams,
        seed_ctr: u64,
        tokens: u64,
        logprob_sample: u64,
        logprob_policy: u64,
        n_kept: u64,
    ) -> Result<()> {
        p.validate()?;
        dims("sample", n, v)?;
        if v > MAX_VOCAB {
            return Err(Error::Invalid(format!(
                "sample: v = {v} exceeds the kernel's limit {MAX_VOCAB}"
            )));
        }
        let cfg = launch_config(n)?;
        if n == 0 {
            return Ok(());
        }
        check_ptr("sample logits", logits, 2)?;
        check_ptr("sample seed_ctr", seed_ctr, 8)?;
        check_ptr("sample tokens", tokens, 4)?;
        check_ptr("sample logprob_sample", logprob_sample, 4)?;
        check_ptr("sample logprob_policy", logprob_policy, 4)?;
        if n_kept != 0 {
            check_ptr("sample n_kept", n_kept, 4)?;
        }
        let (vl, greedy, c, top_k, top_p) = kernel_params(v, p);
        let f = dev.function(FAMILY, "sample_rows_dev")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&logits)
            .arg(&vl)
            .arg(&greedy)
            .arg(&c)
            .arg(&top_k)
            .arg(&top_p)
            .arg(&seed_ctr)
            .arg(&tokens)
            .arg(&logprob_sample)
            .arg(&logprob_policy)
            .arg(&n_kept);
        dev.launch("sample_rows_dev", a, cfg)
    }

    /// The launch over `n` rows: one block per row (the kernel indexes rows as `row·V` in i64);
    /// `Error::Shape` past the grid limit.
    pub fn launch_config(n: usize) -> Result<LaunchConfig> {
        let rows = u32::try_from(n)
            .ok()
            .filter(|&x| x <= i32::MAX as u32)
            .ok_or_else(|| Error::Shape(format!("sample: n = {n} rows exceeds 2^31 − 1")))?;
        Ok(LaunchConfig {
            grid_dim: (rows, 1, 1),
            block_dim: (SAMPLE_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// Samples one token per row (see the module doc) on device views.
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        dev: &CudaDevice,
        logits: &CudaView<'_, u16>,
        n: usize,
        v: usize,
        p: &SampleParams,
        seed: u64,
        counter: u64,
        tokens: &mut CudaViewMut<'_, u32>,
        logprob_sample: &mut CudaViewMut<'_, f32>,
        logprob_policy: &mut CudaViewMut<'_, f32>,
        n_kept: Option<&mut CudaViewMut<'_, u32>>,
    ) -> Result<()> {
        p.validate()?;
        let nv = dims("sample", n, v)?;
        check_len("sample logits", logits.len(), nv)?;
        check_len("sample tokens", tokens.len(), n)?;
        check_len("sample logprob_sample", logprob_sample.len(), n)?;
        check_len("sample logprob_policy", logprob_policy.len(), n)?;
        if let Some(k) = n_kept.as_deref() {
            check_len("sample n_kept", k.len(), n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let (zp, _g1) = logits.device_ptr(s);
        let (tp, _g2) = tokens.device_ptr_mut(s);
        let (lsp, _g3) = logprob_sample.device_ptr_mut(s);
        let (lpp, _g4) = logprob_policy.device_ptr_mut(s);
        let (kp, _g5) = match n_kept {
            Some(k) => {
                let (p, g) = k.device_ptr_mut(s);
                (p, Some(g))
            }
            None => (0, None),
        };
        // SAFETY: lengths checked above; the &mut views cannot alias each other or the logits.
        unsafe { sample_raw(dev, zp, n, v, p, seed, counter, tp, lsp, lpp, kp) }
    }
}

#[cfg(test)]
mod tests {
    use super::cuda::{launch_config, MAX_VOCAB};
    use super::element_counter;
    use crate::device::check_launch;

    #[test]
    fn launch_and_counters_at_real_sizes() {
        // A decode batch of 64 rows and a scoring pass over 64 x 1024 rows, vocabulary 151936.
        for n in [64, 64 * 1024] {
            let c = launch_config(n).unwrap();
            assert_eq!(c.grid_dim, (n as u32, 1, 1));
            assert!(check_launch("sample_rows", &c).unwrap());
        }
        assert!(launch_config(1 << 31).is_err());
        // Per-element counters are 64-bit: the last logit of the last row is past 2^32.
        let (n, v) = (64 * 1024, 151_936usize);
        assert_eq!(element_counter(0, n - 1, v, v - 1), (n * v - 1) as u64);
        assert!(element_counter(0, n - 1, v, v - 1) > u32::MAX as u64);
        // Top-p masses are count · 2^40 in u64: the largest vocabulary keeps them in range.
        assert!((MAX_VOCAB as u128) << 40 <= u64::MAX as u128);
    }
}
