//! The DFPO flow head v(z, τ | h_t) and its integration (method doc 2.2, 2.3 and 6), as a CPU
//! reference ([`cpu`], generic over [`Real`]) and fp32 CUDA launchers ([`cuda`], `kernels/flow.cu`).
//!
//! # Parameterisation
//!
//! The head is the Value Flows vector field: an MLP over `[z, τ, f(h_t)]` with `f` linear, where
//! every hidden layer is Dense → GELU (tanh approximation) → LayerNorm and the output is a Dense to
//! one scalar. Because `f` and the first Dense are both linear, the conditioning part of the first
//! layer is folded into one per-token "cond" op, computed once per token:
//!
//! ```text
//! u_t = c_t·W_cond + b_in                      (c_t: backbone hidden state, dim C; u_t: dim H)
//! a_0 = u_t + w_z·z + w_t·τ ;  h_0 = LN_0(GELU(a_0))
//! a_l = h_{l-1}·W_l + b_l   ;  h_l = LN_l(GELU(a_l))        l = 1 .. depth-1
//! v   = h_{depth-1}·w_out + b_out
//! ```
//!
//! LN_l has an affine gamma_l, beta_l, eps = 1e-5 and the population variance. `depth` counts the
//! hidden layers (1..=8); the width H is a multiple of 32 in 32..=512; C >= 1.
//!
//! Rows: with `n_tok` tokens and K samples per token there are R = n_tok·K rows; row r belongs to
//! token r / K.
//!
//! # Flat parameter layout ([`FlowLayout`])
//!
//! ```text
//! w_cond [C][H]   (row i = input i)
//! b_in   [H]
//! w_z    [H]
//! w_t    [H]
//! layer 0:        gamma_0 [H], beta_0 [H]
//! layer l >= 1:   W_l [H_in][H_out] row-major, b_l [H], gamma_l [H], beta_l [H]
//! w_out  [H]
//! b_out  [1]
//! ```
//!
//! # Gradients
//!
//! Every gradient output accumulates (`+=`), so several loss terms can share one buffer.
//! `eval_backward` produces the gradients of every head parameter except `w_cond`/`b_in` (those
//! are `cond_backward`'s), du per token (summed over its K rows) and optionally dz per row.
//!
//! # Integration
//!
//! N = steps, Δ = (τ1 − τ0)/N, τ_i = τ0 + i·Δ. Euler: z ← z + Δ·v(z, τ_i). Midpoint:
//! z_m = z + Δ/2·v(z, τ_i); z ← z + Δ·v(z_m, τ_i + Δ/2). An optional clip clamps z to [lo, hi]
//! after every full step (not the midpoint's half step). The optional J = ∂z/∂z0 is carried in
//! forward mode (the tangent of v with respect to z through the MLP, `v_z`), J_0 = 1:
//! Euler J ← J + Δ·v_z·J; midpoint J_m = J + Δ/2·v_z(z, τ_i)·J, J ← J + Δ·v_z(z_m, τ_i + Δ/2)·J_m;
//! where the clip is active (z was clamped) J becomes 0.
//!
//! # CUDA design
//!
//! fp32 SIMT, correctness first; tensor cores are a later issue. A block of 256 threads owns a
//! tile of TR rows (64 for H <= 128, 32 for H <= 256, 16 for H <= 512) whose activations live in
//! shared memory; hidden-layer matmuls give each thread an 8-row × 4-column register tile (W rows
//! read as coalesced float4s); GELU + LayerNorm run one warp per row. The backward recomputes the
//! forward per tile, saves a_l / h_l to a workspace, backpropagates inside the block, and forms
//! the weight gradients with a split-K SGEMM whose slices are summed in a fixed order. Nothing
//! uses float atomics: every CUDA result is deterministic for a given GPU and problem size.
//! Limits of one call: n_tok <= 4,194,240 for the cond op (SGEMM grid), K < 2^31.
//!
//! The CPU reference evaluates the same tanh-GELU through the exact identity
//! (1 ± tanh y)/2 = σ(±2y) (one `exp`, stable in both tails), because libm's `tanh` dominated its
//! time; the GPU uses `tanhf`. Both agree with `kernels::gelu_tanh` to rounding.

use std::ops::Range;

use super::{inv_normal_cdf, uniform_open, Real};
use crate::error::{check_len, Error, Result};

/// LayerNorm epsilon.
pub const LN_EPS: f64 = 1e-5;
/// Largest supported width.
pub const MAX_WIDTH: usize = 512;
/// Largest supported depth (hidden layers).
pub const MAX_DEPTH: usize = 8;

/// Sizes of a flow head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowHeadShape {
    /// C: the dimension of the conditioning vector c_t (the backbone hidden size).
    pub cond_dim: usize,
    /// H: the hidden width, a multiple of 32 in 32..=512.
    pub width: usize,
    /// The number of hidden layers, 1..=8.
    pub depth: usize,
}

/// Where one hidden layer's parameters live in the flat vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowLayerLayout {
    /// W_l, `[H_in][H_out]` row-major; `None` for layer 0 (its input weights are w_cond, w_z, w_t).
    pub w: Option<Range<usize>>,
    /// b_l; `None` for layer 0 (its bias is b_in).
    pub b: Option<Range<usize>>,
    /// LayerNorm scale.
    pub gamma: Range<usize>,
    /// LayerNorm shift.
    pub beta: Range<usize>,
}

/// The flat fp32 parameter layout (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowLayout {
    pub w_cond: Range<usize>,
    pub b_in: Range<usize>,
    pub w_z: Range<usize>,
    pub w_t: Range<usize>,
    pub layers: Vec<FlowLayerLayout>,
    pub w_out: Range<usize>,
    pub b_out: Range<usize>,
    /// Total number of parameters.
    pub total: usize,
}

impl FlowHeadShape {
    /// Validates and builds a shape.
    pub fn new(cond_dim: usize, width: usize, depth: usize) -> Result<Self> {
        let s = FlowHeadShape {
            cond_dim,
            width,
            depth,
        };
        s.validate()?;
        Ok(s)
    }

    /// Checks the documented limits (the fields are public, so every op re-checks).
    pub fn validate(&self) -> Result<()> {
        if self.cond_dim == 0 {
            return Err(Error::Invalid("flow head: cond_dim must be >= 1".into()));
        }
        if self.width < 32 || self.width > MAX_WIDTH || !self.width.is_multiple_of(32) {
            return Err(Error::Invalid(format!(
                "flow head: width {} must be a multiple of 32 in 32..={MAX_WIDTH}",
                self.width
            )));
        }
        if self.depth == 0 || self.depth > MAX_DEPTH {
            return Err(Error::Invalid(format!(
                "flow head: depth {} must be in 1..={MAX_DEPTH}",
                self.depth
            )));
        }
        Ok(())
    }

    /// Number of fp32 parameters.
    pub fn param_count(&self) -> usize {
        let (c, h, d) = (self.cond_dim, self.width, self.depth);
        c * h + 3 * h + 2 * h + (d - 1) * (h * h + 3 * h) + h + 1
    }

    /// The flat parameter layout.
    pub fn layout(&self) -> FlowLayout {
        let (c, h) = (self.cond_dim, self.width);
        let mut at = 0usize;
        let mut take = |n: usize| {
            let r = at..at + n;
            at += n;
            r
        };
        let w_cond = take(c * h);
        let b_in = take(h);
        let w_z = take(h);
        let w_t = take(h);
        let mut layers = Vec::with_capacity(self.depth);
        for l in 0..self.depth {
            let (w, b) = if l == 0 {
                (None, None)
            } else {
                (Some(take(h * h)), Some(take(h)))
            };
            let gamma = take(h);
            let beta = take(h);
            layers.push(FlowLayerLayout { w, b, gamma, beta });
        }
        let w_out = take(h);
        let b_out = take(1);
        FlowLayout {
            w_cond,
            b_in,
            w_z,
            w_t,
            layers,
            w_out,
            b_out,
            total: at,
        }
    }
}

/// Deterministic initial parameters: weights U(±1/sqrt(fan_in)), LayerNorm gamma 1 and beta 0,
/// biases 0, and w_out scaled by 0.1 so the initial velocity is small. The first layer is the
/// unfolded Dense over [z, τ, f(h)], so w_cond, w_z and w_t share fan_in = C + 2; hidden layers
/// and w_out have fan_in = H. Element i of the vector draws `uniform_open(seed, i)`.
pub fn init_params(shape: &FlowHeadShape, seed: u64) -> Vec<f32> {
    let lay = shape.layout();
    let mut p = vec![0.0f32; lay.total];
    let fill = |p: &mut [f32], r: &Range<usize>, bound: f64| {
        for i in r.clone() {
            p[i] = ((2.0 * uniform_open(seed, i as u64) - 1.0) * bound) as f32;
        }
    };
    let first = 1.0 / ((shape.cond_dim + 2) as f64).sqrt();
    let hidden = 1.0 / (shape.width as f64).sqrt();
    fill(&mut p, &lay.w_cond, first);
    fill(&mut p, &lay.w_z, first);
    fill(&mut p, &lay.w_t, first);
    for l in &lay.layers {
        if let Some(w) = &l.w {
            fill(&mut p, w, hidden);
        }
        for i in l.gamma.clone() {
            p[i] = 1.0;
        }
    }
    fill(&mut p, &lay.w_out, 0.1 * hidden);
    p
}

/// ODE solver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Solver {
    /// One head evaluation per step.
    Euler,
    /// Explicit midpoint (RK2): two head evaluations per step.
    Midpoint,
}

/// Options of [`cpu::integrate`] / [`cuda::integrate`].
#[derive(Clone, Copy, Debug)]
pub struct IntegrateOpts {
    /// Number of steps N >= 1.
    pub steps: u32,
    pub solver: Solver,
    /// Clamp z to [lo, hi] after every step.
    pub clip: Option<(f32, f32)>,
    /// Carry J = ∂z/∂z0 (the caller passes a `jac` output iff this is set).
    pub jacobian: bool,
}

/// The integration interval [τ_start, τ_end]: shared by every row, or per row.
#[derive(Clone, Copy, Debug)]
pub enum Interval<'a, T> {
    Uniform(T, T),
    PerRow(&'a [T], &'a [T]),
}

/// Prior noise kind.
#[derive(Clone, Copy, Debug)]
pub enum Noise {
    /// ε_r = Φ⁻¹((k+½)/K), k = r mod K: the same K quantile levels at every token.
    Stratified,
    /// ε_r = Φ⁻¹(uniform_open(seed, r)): a counter hash, bit-identical on CPU and GPU.
    Random { seed: u64 },
}

/// Options of [`cpu::noise`] / [`cuda::noise`].
#[derive(Clone, Copy, Debug)]
pub struct NoiseOpts {
    pub kind: Noise,
    /// Clamp ε to [−t, t] (FlowCritic's truncated prior); t must be finite and > 0.
    pub truncate: Option<f32>,
}

// ---------------------------------------------------------------------------------------------
// Validation shared by both backends.

fn check_k(k: usize) -> Result<()> {
    if k == 0 {
        return Err(Error::Invalid("samples_per_token (K) must be >= 1".into()));
    }
    Ok(())
}

fn check_params(shape: &FlowHeadShape, what: &str, len: usize) -> Result<()> {
    shape.validate()?;
    check_len(what, len, shape.param_count())
}

/// Number of tokens of a conditioning buffer of `len` elements with `dim` columns.
fn tokens_of(what: &str, len: usize, dim: usize) -> Result<usize> {
    if !len.is_multiple_of(dim) {
        return Err(Error::Shape(format!(
            "{what}: length {len} is not a multiple of its row size {dim}"
        )));
    }
    Ok(len / dim)
}

fn check_noise(opts: &NoiseOpts, k: usize, len: usize) -> Result<()> {
    check_k(k)?;
    if !len.is_multiple_of(k) {
        return Err(Error::Shape(format!(
            "noise out: length {len} is not a multiple of samples_per_token {k}"
        )));
    }
    if let Some(t) = opts.truncate {
        if !(t.is_finite() && t > 0.0) {
            return Err(Error::Invalid(format!(
                "noise truncate: {t} must be finite and > 0"
            )));
        }
    }
    Ok(())
}

fn check_opts(opts: &IntegrateOpts, has_jac: bool) -> Result<()> {
    if opts.steps == 0 {
        return Err(Error::Invalid("integrate: steps must be >= 1".into()));
    }
    if opts.steps > i32::MAX as u32 {
        return Err(Error::Invalid(format!(
            "integrate: steps {} is too large",
            opts.steps
        )));
    }
    if let Some((lo, hi)) = opts.clip {
        if lo.is_nan() || hi.is_nan() || lo > hi {
            return Err(Error::Invalid(format!(
                "integrate clip: ({lo}, {hi}) must satisfy lo <= hi"
            )));
        }
    }
    if opts.jacobian != has_jac {
        return Err(Error::Invalid(format!(
            "integrate: jac must be given iff opts.jacobian (jacobian = {}, jac given = {has_jac})",
            opts.jacobian
        )));
    }
    Ok(())
}

pub mod cpu {
    //! The CPU reference: chunks of rows go layer by layer through `T::gemm`.

    use super::*;

    /// Rows per chunk.
    const CHUNK: usize = 256;

    /// Borrowed views of one layer's parameters.
    struct LayerP<'a, T> {
        w: &'a [T],
        b: &'a [T],
        gamma: &'a [T],
        beta: &'a [T],
    }

    /// Borrowed views of the head parameters (everything but w_cond / b_in).
    struct Head<'a, T> {
        h: usize,
        w_z: &'a [T],
        w_t: &'a [T],
        layers: Vec<LayerP<'a, T>>,
        w_out: &'a [T],
        b_out: T,
    }

    impl<'a, T: Real> Head<'a, T> {
        fn new(shape: &FlowHeadShape, lay: &FlowLayout, p: &'a [T]) -> Self {
            let layers = lay
                .layers
                .iter()
                .map(|l| LayerP {
                    w: l.w.clone().map_or(&p[0..0], |r| &p[r]),
                    b: l.b.clone().map_or(&p[0..0], |r| &p[r]),
                    gamma: &p[l.gamma.clone()],
                    beta: &p[l.beta.clone()],
                })
                .collect();
            Head {
                h: shape.width,
                w_z: &p[lay.w_z.clone()],
                w_t: &p[lay.w_t.clone()],
                layers,
                w_out: &p[lay.w_out.clone()],
                b_out: p[lay.b_out.start],
            }
        }
    }

    /// Activations of one chunk, kept for the tangent and backward passes.
    struct Acts<T> {
        /// a[l]: pre-activations, n×H.
        a: Vec<Vec<T>>,
        /// xhat[l]: normalised GELU outputs, n×H.
        xhat: Vec<Vec<T>>,
        /// rstd[l]: 1/sqrt(var + eps) per row.
        rstd: Vec<Vec<T>>,
        /// h[l]: LayerNorm outputs, n×H.
        h: Vec<Vec<T>>,
    }

    impl<T: Real> Acts<T> {
        fn new(depth: usize, h: usize) -> Self {
            let m = |n: usize| (0..depth).map(|_| vec![T::ZERO; n]).collect::<Vec<_>>();
            Acts {
                a: m(CHUNK * h),
                xhat: m(CHUNK * h),
                rstd: m(CHUNK),
                h: m(CHUNK * h),
            }
        }
    }

    /// (p, q) = ((1 + t)/2, (1 − t)/2) for t = tanh(y), y = c·(x + a·x³) of the tanh-approximated
    /// GELU, through the exact identities (1 ± t)/2 = σ(±2y) with one e = exp(−2|y|) <= 1:
    /// σ(2|y|) = 1/(1 + e), σ(−2|y|) = e/(1 + e). No overflow, no cancellation in either tail, and
    /// one `exp` is several times cheaper than libm's `tanh`, which dominated the CPU reference.
    #[inline]
    fn gelu_pq<T: Real>(x: T) -> (T, T) {
        let c = T::from_f64(0.7978845608028654);
        let a = T::from_f64(0.044715);
        let y = c * (x + a * x * x * x);
        let e = (T::from_f64(-2.0) * y.abs()).exp();
        let big = T::ONE / (T::ONE + e);
        let small = e * big;
        if y >= T::ZERO {
            (big, small)
        } else {
            (small, big)
        }
    }

    /// GELU(x) = x·(1 + tanh(y))/2, the same function as `kernels::gelu_tanh`.
    #[inline]
    pub(crate) fn gelu<T: Real>(x: T) -> T {
        x * gelu_pq(x).0
    }

    /// GELU'(x) = (1 + t)/2 + x·(1 − t²)/2·dy/dx, the same function as `kernels::gelu_tanh_grad`.
    #[inline]
    pub(crate) fn gelu_grad<T: Real>(x: T) -> T {
        let c = T::from_f64(0.7978845608028654);
        let a3 = T::from_f64(3.0 * 0.044715);
        let (p, q) = gelu_pq(x);
        // (1 − t²)/2 = 2·p·q
        p + T::from_f64(2.0) * x * p * q * c * (T::ONE + a3 * x * x)
    }

    /// GELU then LayerNorm of one row: writes xhat and h, returns rstd.
    fn gelu_ln_row<T: Real>(a: &[T], gamma: &[T], beta: &[T], xhat: &mut [T], h: &mut [T]) -> T {
        let n = T::from_f64(a.len() as f64);
        let mut s = T::ZERO;
        for (x, &ai) in xhat.iter_mut().zip(a) {
            *x = gelu(ai);
            s += *x;
        }
        let mean = s / n;
        let mut s2 = T::ZERO;
        for x in xhat.iter_mut() {
            *x -= mean;
            s2 += *x * *x;
        }
        let rstd = T::ONE / (s2 / n + T::from_f64(LN_EPS)).sqrt();
        for j in 0..a.len() {
            xhat[j] *= rstd;
            h[j] = gamma[j] * xhat[j] + beta[j];
        }
        rstd
    }

    /// Forward of `n = z.len()` rows starting at global row `r0`: fills `acts`, writes v.
    #[allow(clippy::too_many_arguments)]
    fn forward_chunk<T: Real>(
        hd: &Head<'_, T>,
        u: &[T],
        k: usize,
        r0: usize,
        z: &[T],
        tau: &[T],
        acts: &mut Acts<T>,
        v: &mut [T],
    ) {
        let (h, n) = (hd.h, z.len());
        for i in 0..n {
            let tok = (r0 + i) / k;
            let ur = &u[tok * h..(tok + 1) * h];
            let a = &mut acts.a[0][i * h..(i + 1) * h];
            for j in 0..h {
                a[j] = ur[j] + hd.w_z[j] * z[i] + hd.w_t[j] * tau[i];
            }
        }
        for (l, lp) in hd.layers.iter().enumerate() {
            if l > 0 {
                let a = &mut acts.a[l][..n * h];
                T::gemm(
                    n,
                    h,
                    h,
                    T::ONE,
                    &acts.h[l - 1][..n * h],
                    false,
                    lp.w,
                    false,
                    T::ZERO,
                    a,
                );
                for row in a.chunks_exact_mut(h) {
                    for (x, &b) in row.iter_mut().zip(lp.b) {
                        *x += b;
                    }
                }
            }
            for i in 0..n {
                let s = i * h..(i + 1) * h;
                acts.rstd[l][i] = gelu_ln_row(
                    &acts.a[l][s.clone()],
                    lp.gamma,
                    lp.beta,
                    &mut acts.xhat[l][s.clone()],
                    &mut acts.h[l][s],
                );
            }
        }
        let last = &acts.h[hd.layers.len() - 1];
        for i in 0..n {
            let mut s = T::ZERO;
            for (&x, &w) in last[i * h..(i + 1) * h].iter().zip(hd.w_out) {
                s += x * w;
            }
            v[i] = s + hd.b_out;
        }
    }

    /// ∂v/∂z for the `n` rows of `acts` (forward-mode tangent through the MLP).
    fn tangent_chunk<T: Real>(
        hd: &Head<'_, T>,
        acts: &Acts<T>,
        n: usize,
        t0: &mut [T],
        t1: &mut [T],
        vz: &mut [T],
    ) {
        let h = hd.h;
        let inv_h = T::ONE / T::from_f64(h as f64);
        let (mut cur, mut prev) = (t0, t1);
        for row in cur[..n * h].chunks_exact_mut(h) {
            row.copy_from_slice(hd.w_z);
        }
        for (l, lp) in hd.layers.iter().enumerate() {
            if l > 0 {
                std::mem::swap(&mut cur, &mut prev);
                T::gemm(
                    n,
                    h,
                    h,
                    T::ONE,
                    &prev[..n * h],
                    false,
                    lp.w,
                    false,
                    T::ZERO,
                    &mut cur[..n * h],
                );
            }
            for i in 0..n {
                let s = i * h..(i + 1) * h;
                let (a, xh, rstd) = (
                    &acts.a[l][s.clone()],
                    &acts.xhat[l][s.clone()],
                    acts.rstd[l][i],
                );
                let d = &mut cur[s];
                let (mut m1, mut m2) = (T::ZERO, T::ZERO);
                for j in 0..h {
                    d[j] *= gelu_grad(a[j]); // dg
                    m1 += d[j];
                    m2 += xh[j] * d[j];
                }
                m1 *= inv_h;
                m2 *= inv_h;
                for j in 0..h {
                    d[j] = lp.gamma[j] * ((d[j] - m1 - xh[j] * m2) * rstd);
                }
            }
        }
        for i in 0..n {
            let mut s = T::ZERO;
            for (&x, &w) in cur[i * h..(i + 1) * h].iter().zip(hd.w_out) {
                s += x * w;
            }
            vz[i] = s;
        }
    }

    /// Backward of the `n` rows of `acts` given dv: accumulates into dparams, du, dz.
    #[allow(clippy::too_many_arguments)]
    fn backward_chunk<T: Real>(
        hd: &Head<'_, T>,
        lay: &FlowLayout,
        acts: &Acts<T>,
        k: usize,
        r0: usize,
        z: &[T],
        tau: &[T],
        dv: &[T],
        dparams: &mut [T],
        du: &mut [T],
        mut dz: Option<&mut [T]>,
        dh: &mut [T],
        da: &mut [T],
    ) {
        let (h, n) = (hd.h, dv.len());
        let depth = hd.layers.len();
        let inv_h = T::ONE / T::from_f64(h as f64);
        // output layer
        let last = &acts.h[depth - 1];
        for i in 0..n {
            dparams[lay.b_out.start] += dv[i];
            for j in 0..h {
                dparams[lay.w_out.start + j] += dv[i] * last[i * h + j];
                dh[i * h + j] = dv[i] * hd.w_out[j];
            }
        }
        for l in (0..depth).rev() {
            let (lp, ll) = (&hd.layers[l], &lay.layers[l]);
            for i in 0..n {
                let s = i * h..(i + 1) * h;
                let (a, xh, rstd) = (
                    &acts.a[l][s.clone()],
                    &acts.xhat[l][s.clone()],
                    acts.rstd[l][i],
                );
                let dhr = &dh[s.clone()];
                let dar = &mut da[s];
                let (mut m1, mut m2) = (T::ZERO, T::ZERO);
                for j in 0..h {
                    dparams[ll.gamma.start + j] += dhr[j] * xh[j];
                    dparams[ll.beta.start + j] += dhr[j];
                    let dx = dhr[j] * lp.gamma[j];
                    dar[j] = dx;
                    m1 += dx;
                    m2 += dx * xh[j];
                }
                m1 *= inv_h;
                m2 *= inv_h;
                for j in 0..h {
                    dar[j] = rstd * (dar[j] - m1 - xh[j] * m2) * gelu_grad(a[j]);
                }
            }
            if l > 0 {
                let b = ll.b.clone().unwrap();
                for row in da[..n * h].chunks_exact(h) {
                    for j in 0..h {
                        dparams[b.start + j] += row[j];
                    }
                }
                // dW_l += h_{l-1}ᵀ·δ_l ; dh_{l-1} = δ_l·W_lᵀ
                let w = ll.w.clone().unwrap();
                T::gemm(
                    h,
                    n,
                    h,
                    T::ONE,
                    &acts.h[l - 1][..n * h],
                    true,
                    &da[..n * h],
                    false,
                    T::ONE,
                    &mut dparams[w],
                );
                T::gemm(
                    n,
                    h,
                    h,
                    T::ONE,
                    &da[..n * h],
                    false,
                    lp.w,
                    true,
                    T::ZERO,
                    &mut dh[..n * h],
                );
            } else {
                for i in 0..n {
                    let row = &da[i * h..(i + 1) * h];
                    let tok = (r0 + i) / k;
                    let mut s = T::ZERO;
                    for j in 0..h {
                        dparams[lay.w_z.start + j] += row[j] * z[i];
                        dparams[lay.w_t.start + j] += row[j] * tau[i];
                        du[tok * h + j] += row[j];
                        s += row[j] * hd.w_z[j];
                    }
                    if let Some(dz) = dz.as_deref_mut() {
                        dz[i] += s;
                    }
                }
            }
        }
    }

    /// Prior noise per row (see [`Noise`]); `out.len()` must be a multiple of K.
    pub fn noise<T: Real>(opts: &NoiseOpts, samples_per_token: usize, out: &mut [T]) -> Result<()> {
        check_noise(opts, samples_per_token, out.len())?;
        let k = samples_per_token;
        for (r, o) in out.iter_mut().enumerate() {
            let p = match opts.kind {
                Noise::Stratified => ((r % k) as f64 + 0.5) / k as f64,
                Noise::Random { seed } => uniform_open(seed, r as u64),
            };
            let mut e = inv_normal_cdf(p);
            if let Some(t) = opts.truncate {
                e = e.clamp(-(t as f64), t as f64);
            }
            *o = T::from_f64(e);
        }
        Ok(())
    }

    /// u = c·W_cond + b_in per token; n_tok = c.len() / C.
    pub fn cond_forward<T: Real>(
        shape: &FlowHeadShape,
        params: &[T],
        c: &[T],
        u: &mut [T],
    ) -> Result<()> {
        check_params(shape, "cond_forward params", params.len())?;
        let (cd, h) = (shape.cond_dim, shape.width);
        let n = tokens_of("cond_forward c", c.len(), cd)?;
        check_len("cond_forward u", u.len(), n * h)?;
        let lay = shape.layout();
        T::gemm(
            n,
            cd,
            h,
            T::ONE,
            c,
            false,
            &params[lay.w_cond.clone()],
            false,
            T::ZERO,
            u,
        );
        let b = &params[lay.b_in];
        for row in u.chunks_exact_mut(h) {
            for (x, &bj) in row.iter_mut().zip(b) {
                *x += bj;
            }
        }
        Ok(())
    }

    /// Accumulates dW_cond += cᵀ·du, db_in += Σ du and (optionally) dc += du·W_condᵀ.
    pub fn cond_backward<T: Real>(
        shape: &FlowHeadShape,
        params: &[T],
        c: &[T],
        du: &[T],
        dparams: &mut [T],
        dc: Option<&mut [T]>,
    ) -> Result<()> {
        check_params(shape, "cond_backward params", params.len())?;
        check_len("cond_backward dparams", dparams.len(), params.len())?;
        let (cd, h) = (shape.cond_dim, shape.width);
        let n = tokens_of("cond_backward c", c.len(), cd)?;
        check_len("cond_backward du", du.len(), n * h)?;
        if let Some(dc) = &dc {
            check_len("cond_backward dc", dc.len(), c.len())?;
        }
        let lay = shape.layout();
        T::gemm(
            cd,
            n,
            h,
            T::ONE,
            c,
            true,
            du,
            false,
            T::ONE,
            &mut dparams[lay.w_cond.clone()],
        );
        for row in du.chunks_exact(h) {
            for j in 0..h {
                dparams[lay.b_in.start + j] += row[j];
            }
        }
        if let Some(dc) = dc {
            T::gemm(
                n,
                h,
                cd,
                T::ONE,
                du,
                false,
                &params[lay.w_cond],
                true,
                T::ONE,
                dc,
            );
        }
        Ok(())
    }

    /// Validates the per-row inputs of eval / integrate; returns (n_tok, R).
    fn check_rows(
        shape: &FlowHeadShape,
        what: &str,
        params: usize,
        u: usize,
        k: usize,
    ) -> Result<(usize, usize)> {
        check_params(shape, &format!("{what} params"), params)?;
        check_k(k)?;
        let n = tokens_of(&format!("{what} u"), u, shape.width)?;
        Ok((n, n * k))
    }

    /// `v[r] = v(z[r], tau[r] | u_{r/K})`.
    #[allow(clippy::too_many_arguments)]
    pub fn eval_forward<T: Real>(
        shape: &FlowHeadShape,
        params: &[T],
        u: &[T],
        samples_per_token: usize,
        z: &[T],
        tau: &[T],
        v: &mut [T],
    ) -> Result<()> {
        let (_, rows) = check_rows(
            shape,
            "eval_forward",
            params.len(),
            u.len(),
            samples_per_token,
        )?;
        check_len("eval_forward z", z.len(), rows)?;
        check_len("eval_forward tau", tau.len(), rows)?;
        check_len("eval_forward v", v.len(), rows)?;
        let lay = shape.layout();
        let hd = Head::new(shape, &lay, params);
        let mut acts = Acts::new(shape.depth, shape.width);
        for r0 in (0..rows).step_by(CHUNK) {
            let r1 = (r0 + CHUNK).min(rows);
            forward_chunk(
                &hd,
                u,
                samples_per_token,
                r0,
                &z[r0..r1],
                &tau[r0..r1],
                &mut acts,
                &mut v[r0..r1],
            );
        }
        Ok(())
    }

    /// Given dv per row, accumulates the gradients of every head parameter except w_cond/b_in
    /// into `dparams` (full layout), du per token (summed over its K rows) and optionally dz.
    #[allow(clippy::too_many_arguments)]
    pub fn eval_backward<T: Real>(
        shape: &FlowHeadShape,
        params: &[T],
        u: &[T],
        samples_per_token: usize,
        z: &[T],
        tau: &[T],
        dv: &[T],
        dparams: &mut [T],
        du: &mut [T],
        mut dz: Option<&mut [T]>,
    ) -> Result<()> {
        let (_, rows) = check_rows(
            shape,
            "eval_backward",
            params.len(),
            u.len(),
            samples_per_token,
        )?;
        check_len("eval_backward z", z.len(), rows)?;
        check_len("eval_backward tau", tau.len(), rows)?;
        check_len("eval_backward dv", dv.len(), rows)?;
        check_len("eval_backward dparams", dparams.len(), params.len())?;
        check_len("eval_backward du", du.len(), u.len())?;
        if let Some(dz) = &dz {
            check_len("eval_backward dz", dz.len(), rows)?;
        }
        let lay = shape.layout();
        let hd = Head::new(shape, &lay, params);
        let h = shape.width;
        let mut acts = Acts::new(shape.depth, h);
        let (mut dh, mut da) = (vec![T::ZERO; CHUNK * h], vec![T::ZERO; CHUNK * h]);
        let mut v = [T::ZERO; CHUNK];
        for r0 in (0..rows).step_by(CHUNK) {
            let r1 = (r0 + CHUNK).min(rows);
            let (zc, tc) = (&z[r0..r1], &tau[r0..r1]);
            forward_chunk(
                &hd,
                u,
                samples_per_token,
                r0,
                zc,
                tc,
                &mut acts,
                &mut v[..r1 - r0],
            );
            backward_chunk(
                &hd,
                &lay,
                &acts,
                samples_per_token,
                r0,
                zc,
                tc,
                &dv[r0..r1],
                dparams,
                du,
                dz.as_deref_mut().map(|d| &mut d[r0..r1]),
                &mut dh,
                &mut da,
            );
        }
        Ok(())
    }

    /// Integrates dz/dτ = v(z, τ | u) from z0 over the interval (see the module documentation).
    #[allow(clippy::too_many_arguments)]
    pub fn integrate<T: Real>(
        shape: &FlowHeadShape,
        params: &[T],
        u: &[T],
        samples_per_token: usize,
        z0: &[T],
        interval: Interval<'_, T>,
        opts: &IntegrateOpts,
        z1: &mut [T],
        mut jac: Option<&mut [T]>,
    ) -> Result<()> {
        let (_, rows) = check_rows(shape, "integrate", params.len(), u.len(), samples_per_token)?;
        check_opts(opts, jac.is_some())?;
        check_len("integrate z0", z0.len(), rows)?;
        check_len("integrate z1", z1.len(), rows)?;
        if let Interval::PerRow(a, b) = interval {
            check_len("integrate tau_start", a.len(), rows)?;
            check_len("integrate tau_end", b.len(), rows)?;
        }
        if let Some(j) = &jac {
            check_len("integrate jac", j.len(), rows)?;
        }
        let lay = shape.layout();
        let hd = Head::new(shape, &lay, params);
        let h = shape.width;
        let k = samples_per_token;
        let mut acts = Acts::new(shape.depth, h);
        let (mut t0b, mut t1b) = (vec![T::ZERO; CHUNK * h], vec![T::ZERO; CHUNK * h]);
        let nsteps = T::from_f64(opts.steps as f64);
        let half = T::from_f64(0.5);
        let clip = opts
            .clip
            .map(|(lo, hi)| (T::from_f64(lo as f64), T::from_f64(hi as f64)));
        let mut buf = [T::ZERO; 9 * CHUNK];
        for r0 in (0..rows).step_by(CHUNK) {
            let r1 = (r0 + CHUNK).min(rows);
            let n = r1 - r0;
            let (z, rest) = buf.split_at_mut(CHUNK);
            let (jj, rest) = rest.split_at_mut(CHUNK);
            let (t0, rest) = rest.split_at_mut(CHUNK);
            let (dt, rest) = rest.split_at_mut(CHUNK);
            let (tau, rest) = rest.split_at_mut(CHUNK);
            let (v, rest) = rest.split_at_mut(CHUNK);
            let (vz, zm) = rest.split_at_mut(CHUNK);
            for i in 0..n {
                let (a, b) = match interval {
                    Interval::Uniform(a, b) => (a, b),
                    Interval::PerRow(a, b) => (a[r0 + i], b[r0 + i]),
                };
                z[i] = z0[r0 + i];
                jj[i] = T::ONE;
                t0[i] = a;
                dt[i] = (b - a) / nsteps;
            }
            for s in 0..opts.steps {
                let sf = T::from_f64(s as f64);
                for i in 0..n {
                    tau[i] = t0[i] + sf * dt[i];
                }
                forward_chunk(&hd, u, k, r0, &z[..n], &tau[..n], &mut acts, &mut v[..n]);
                if opts.jacobian {
                    tangent_chunk(&hd, &acts, n, &mut t0b, &mut t1b, &mut vz[..n]);
                }
                if opts.solver == Solver::Midpoint {
                    // zm holds the midpoint state; jm (in the upper half of zm) its tangent
                    let (zmid, jm) = zm.split_at_mut(CHUNK);
                    for i in 0..n {
                        let hd_ = half * dt[i];
                        zmid[i] = z[i] + hd_ * v[i];
                        tau[i] += hd_;
                        jm[i] = jj[i] + hd_ * vz[i] * jj[i];
                    }
                    forward_chunk(&hd, u, k, r0, &zmid[..n], &tau[..n], &mut acts, &mut v[..n]);
                    if opts.jacobian {
                        tangent_chunk(&hd, &acts, n, &mut t0b, &mut t1b, &mut vz[..n]);
                    }
                    for i in 0..n {
                        z[i] += dt[i] * v[i];
                        jj[i] += dt[i] * vz[i] * jm[i];
                    }
                } else {
                    for i in 0..n {
                        z[i] += dt[i] * v[i];
                        jj[i] += dt[i] * vz[i] * jj[i];
                    }
                }
                if let Some((lo, hi)) = clip {
                    for i in 0..n {
                        if z[i] < lo {
                            z[i] = lo;
                            jj[i] = T::ZERO;
                        } else if z[i] > hi {
                            z[i] = hi;
                            jj[i] = T::ZERO;
                        }
                    }
                }
            }
            z1[r0..r1].copy_from_slice(&z[..n]);
            if let Some(j) = jac.as_deref_mut() {
                j[r0..r1].copy_from_slice(&jj[..n]);
            }
        }
        Ok(())
    }
}

pub mod cuda {
    //! fp32 launchers for `kernels/flow.cu`. Every op has an `unsafe fn <op>_raw` over raw device
    //! pointers (`u64` CUdeviceptr, e.g. into the graph runtime's arena; 0 means "absent" for
    //! optional outputs) and a safe wrapper over cudarc views that checks every length.
    //!
    //! Pointer requirements of the raw functions: every pointer addresses at least the number of
    //! f32 the safe wrapper would check; `params` and `workspace` are 16-byte aligned (the fused
    //! kernels read weights as float4; a cudarc allocation always is).

    use cudarc::driver::{
        CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    };

    use super::*;
    use crate::device::{blocks_for, CudaDevice};

    const FAMILY: &str = "flow";
    const THREADS: u32 = 256;
    /// Bytes per f32.
    const F: u64 = 4;
    /// Most blocks of one flow_eval_bwd launch (each writes a partial of the vector gradients).
    const BWD_MAX_BLOCKS: usize = 256;
    /// Cap on the per-chunk activation workspace of the backward, in f32 (256 MiB).
    const BWD_CHUNK_FLOATS: usize = 1 << 26;
    /// Split-K aims at about this many blocks per SGEMM.
    const GEMM_TARGET_BLOCKS: usize = 256;
    const GEMM_TILE: usize = 64;
    const GEMM_MAX_GRID_Y: usize = 65535;

    /// Rows per tile of the fused kernels at width `h`: 64, 32 or 16 for h <= 128, 256, 512
    /// (the tile matmul splits the 8 warps into 1, 2 or 4 column groups of 128 columns).
    pub fn tile_rows(h: usize) -> usize {
        let col_groups = if h <= 128 {
            1
        } else if h <= 256 {
            2
        } else {
            4
        };
        64 / col_groups
    }

    fn vec_len(h: usize, depth: usize) -> usize {
        3 * h + 3 * h * depth + 1
    }

    fn cfg(grid: (u32, u32, u32), smem: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: grid,
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem,
        }
    }

    fn nonnull(what: &str, p: u64) -> Result<()> {
        if p == 0 {
            return Err(Error::Invalid(format!("{what}: null device pointer")));
        }
        Ok(())
    }

    fn aligned16(what: &str, p: u64) -> Result<()> {
        nonnull(what, p)?;
        if !p.is_multiple_of(16) {
            return Err(Error::Invalid(format!(
                "{what}: device pointer {p:#x} is not 16-byte aligned"
            )));
        }
        Ok(())
    }

    fn grid_x(what: &str, blocks: usize) -> Result<u32> {
        u32::try_from(blocks)
            .ok()
            .filter(|&b| b <= i32::MAX as u32)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{what}: problem too large for one launch ({blocks} blocks)"
                ))
            })
    }

    fn head_ptr(shape: &FlowHeadShape, params: u64) -> u64 {
        params + (shape.cond_dim * shape.width) as u64 * F
    }

    /// (slices, k per slice) of the split-K SGEMM for an m×n output reduced over k.
    fn split_k(m: usize, n: usize, k: usize) -> (usize, usize) {
        let tiles = m.div_ceil(GEMM_TILE) * n.div_ceil(GEMM_TILE);
        let want = (GEMM_TARGET_BLOCKS / tiles.max(1)).max(1);
        let by_k = k.div_ceil(256).max(1); // at least 256 k per slice
        let s = want.min(by_k).min(64);
        let kchunk = k.div_ceil(s).div_ceil(16).max(1) * 16;
        (k.div_ceil(kchunk).max(1), kchunk)
    }

    /// C(m, n) = [accumulate ? C : 0] + Σ_k A(m, k)·B(k, n) [+ bias] over `split.0` slices of
    /// `split.1` k each, slice s written at C + s·slice_stride.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        dev: &CudaDevice,
        a: u64,
        (sam, sak): (usize, usize),
        b: u64,
        (sbk, sbn): (usize, usize),
        c: u64,
        ldc: usize,
        slice_stride: usize,
        (m, n, k): (usize, usize, usize),
        split: (usize, usize),
        bias: u64,
        accumulate: bool,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let gy = m.div_ceil(GEMM_TILE);
        if gy > GEMM_MAX_GRID_Y || n.div_ceil(GEMM_TILE) > GEMM_MAX_GRID_Y || m > i32::MAX as usize
        {
            return Err(Error::Invalid(format!(
                "flow_gemm: {m}×{n} output is too large for one launch"
            )));
        }
        let f = dev.function(FAMILY, "flow_gemm")?;
        let (sam, sak, sbk, sbn) = (sam as i64, sak as i64, sbk as i64, sbn as i64);
        let (ldc, ss) = (ldc as i64, slice_stride as i64);
        let (m32, n32, k64, kc) = (m as i32, n as i32, k as i64, split.1 as i64);
        let acc = accumulate as i32;
        let mut bld = dev.launch_builder(&f);
        bld.arg(&a).arg(&sam).arg(&sak).arg(&b).arg(&sbk).arg(&sbn);
        bld.arg(&c)
            .arg(&ldc)
            .arg(&ss)
            .arg(&m32)
            .arg(&n32)
            .arg(&k64)
            .arg(&kc);
        bld.arg(&bias).arg(&acc);
        let grid = (n.div_ceil(GEMM_TILE) as u32, gy as u32, split.0 as u32);
        dev.launch("flow_gemm", bld, cfg(grid, 0))
    }

    /// dst[i] += Σ_s part[s·len + i].
    unsafe fn reduce_slices(
        dev: &CudaDevice,
        part: u64,
        slices: usize,
        len: usize,
        dst: u64,
    ) -> Result<()> {
        let f = dev.function(FAMILY, "flow_reduce_slices")?;
        let (s32, len64) = (slices as i32, len as i64);
        let mut bld = dev.launch_builder(&f);
        bld.arg(&part).arg(&s32).arg(&len64).arg(&dst);
        dev.launch(
            "flow_reduce_slices",
            bld,
            cfg(
                (
                    grid_x("flow_reduce_slices", blocks_for(len, THREADS) as usize)?,
                    1,
                    1,
                ),
                0,
            ),
        )
    }

    /// Opts a fused kernel into `bytes` of dynamic shared memory.
    fn smem_for(
        dev: &CudaDevice,
        name: &str,
        bytes: usize,
    ) -> Result<(cudarc::driver::CudaFunction, u32)> {
        let f = dev.function(FAMILY, name)?;
        let b = u32::try_from(bytes)
            .map_err(|_| Error::Invalid(format!("{name}: {bytes} bytes of shared memory")))?;
        dev.set_dynamic_smem(&f, b)?;
        Ok((f, b))
    }

    // ------------------------------------------------------------------------------- noise

    /// Prior noise for `rows` rows into `out`.
    ///
    /// # Safety
    /// `out` must address `rows` f32 of device memory on `dev`.
    pub unsafe fn noise_raw(
        dev: &CudaDevice,
        opts: &NoiseOpts,
        samples_per_token: usize,
        out: u64,
        rows: usize,
    ) -> Result<()> {
        check_noise(opts, samples_per_token, rows)?;
        if rows == 0 {
            return Ok(());
        }
        nonnull("noise out", out)?;
        let k = i32::try_from(samples_per_token)
            .map_err(|_| Error::Invalid(format!("noise: K = {samples_per_token} is too large")))?;
        let (kind, seed) = match opts.kind {
            Noise::Stratified => (0i32, 0u64),
            Noise::Random { seed } => (1i32, seed),
        };
        let (trunc_on, trunc) = match opts.truncate {
            Some(t) => (1i32, t as f64),
            None => (0i32, 0.0f64),
        };
        let rows64 = rows as i64;
        let f = dev.function(FAMILY, "flow_noise")?;
        let mut b = dev.launch_builder(&f);
        b.arg(&out)
            .arg(&rows64)
            .arg(&k)
            .arg(&kind)
            .arg(&seed)
            .arg(&trunc_on)
            .arg(&trunc);
        let grid = grid_x("flow_noise", blocks_for(rows, THREADS) as usize)?;
        dev.launch("flow_noise", b, cfg((grid, 1, 1), 0))
    }

    /// Safe [`noise_raw`]: `out.len()` rows.
    pub fn noise(
        dev: &CudaDevice,
        opts: &NoiseOpts,
        samples_per_token: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let rows = out.len();
        let (p, _g) = out.device_ptr_mut(dev.stream());
        // SAFETY: p addresses `rows` f32.
        unsafe { noise_raw(dev, opts, samples_per_token, p, rows) }
    }

    // ------------------------------------------------------------------------------- cond op

    /// u = c·W_cond + b_in for `n_tok` tokens.
    ///
    /// # Safety
    /// `params` holds `shape.param_count()` f32 (16-byte aligned), `c` n_tok·C, `u` n_tok·H.
    pub unsafe fn cond_forward_raw(
        dev: &CudaDevice,
        shape: &FlowHeadShape,
        params: u64,
        c: u64,
        u: u64,
        n_tok: usize,
    ) -> Result<()> {
        shape.validate()?;
        if n_tok == 0 {
            return Ok(());
        }
        aligned16("cond_forward params", params)?;
        nonnull("cond_forward c", c)?;
        nonnull("cond_forward u", u)?;
        let (cd, h) = (shape.cond_dim, shape.width);
        gemm(
            dev,
            c,
            (cd, 1),
            params,
            (h, 1),
            u,
            h,
            0,
            (n_tok, h, cd),
            (1, cd.div_ceil(16) * 16),
            params + (cd * h) as u64 * F,
            false,
        )
    }

    /// Safe [`cond_forward_raw`].
    pub fn cond_forward(
        dev: &CudaDevice,
        shape: &FlowHeadShape,
        params: &CudaView<'_, f32>,
        c: &CudaView<'_, f32>,
        u: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        check_params(shape, "cond_forward params", params.len())?;
        let n = tokens_of("cond_forward c", c.len(), shape.cond_dim)?;
        check_len("cond_forward u", u.len(), n * shape.width)?;
        let s = dev.stream();
        let (pp, _g1) = params.device_ptr(s);
        let (cp, _g2) = c.device_ptr(s);
        let (up, _g3) = u.device_ptr_mut(s);
        // SAFETY: lengths checked above.
        unsafe { cond_forward_raw(dev, shape, pp, cp, up, n) }
    }

    fn cond_bwd_plan(shape: &FlowHeadShape, n_tok: usize) -> ((usize, usize), usize, usize) {
        let (cd, h) = (shape.cond_dim, shape.width);
        let split = split_k(cd, h, n_tok);
        let col_slices = n_tok.div_ceil(256).clamp(1, 64);
        let rows_per_slice = n_tok.div_ceil(col_slices).max(1);
        (split, col_slices, rows_per_slice)
    }

    /// f32 of workspace [`cond_backward_raw`] needs.
    pub fn cond_backward_workspace_len(shape: &FlowHeadShape, n_tok: usize) -> usize {
        let (split, col_slices, _) = cond_bwd_plan(shape, n_tok);
        split.0 * shape.cond_dim * shape.width + col_slices * shape.width
    }

    /// Accumulates dW_cond += cᵀ·du, db_in += Σ du (into the full-layout `dparams`) and, when
    /// `dc` != 0, dc += du·W_condᵀ. Deterministic (split-K slices summed in order).
    ///
    /// # Safety
    /// `params`/`dparams` hold `shape.param_count()` f32, `c`/`dc` n_tok·C, `du` n_tok·H,
    /// `workspace` at least `workspace_len` >= [`cond_backward_workspace_len`] f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn cond_backward_raw(
        dev: &CudaDevice,
        shape: &FlowHeadShape,
        params: u64,
        c: u64,
        du: u64,
        dparams: u64,
        dc: u64,
        n_tok: usize,
        workspace: u64,
        workspace_len: usize,
    ) -> Result<()> {
        shape.validate()?;
        if n_tok == 0 {
            return Ok(());
        }
        let need = cond_backward_workspace_len(shape, n_tok);
        if workspace_len < need {
            return Err(Error::Shape(format!(
                "cond_backward workspace: length {workspace_len}, needs {need}"
            )));
        }
        for (w, p) in [
            ("params", params),
            ("c", c),
            ("du", du),
            ("dparams", dparams),
            ("workspace", workspace),
        ] {
            nonnull(&format!("cond_backward {w}"), p)?;
        }
        let (cd, h) = (shape.cond_dim, shape.width);
        let (split, col_slices, rows_per_slice) = cond_bwd_plan(shape, n_tok);
        if dc != 0 {
            // dc(tok, i) += Σ_j du(tok, j)·W_cond(i, j)
            gemm(
                dev,
                du,
                (h, 1),
                params,
                (1, h),
                dc,
                cd,
                0,
                (n_tok, cd, h),
                (1, h),
                0,
                true,
            )?;
        }
        // dW_cond(i, j) = Σ_tok c(tok, i)·du(tok, j), split over tokens
        gemm(
            dev,
            c,
            (1, cd),
            du,
            (h, 1),
            workspace,
            h,
            cd * h,
            (cd, h, n_tok),
            split,
            0,
            false,
        )?;
        reduce_slices(dev, workspace, split.0, cd * h, dparams)?;
        // db_in = Σ_tok du(tok, ·)
        let part = workspace + (split.0 * cd * h) as u64 * F;
        let f = dev.function(FAMILY, "flow_colsum_partial")?;
        let (rows64, cols, rps) = (n_tok as i64, h as i32, rows_per_slice as i64);
        let mut b = dev.launch_builder(&f);
        b.arg(&du).arg(&rows64).arg(&cols).arg(&rps).arg(&part);
        let grid = (h.div_ceil(THREADS as usize) as u32, col_slices as u32, 1);
        dev.launch("flow_colsum_partial", b, cfg(grid, 0))?;
        reduce_slices(dev, part, col_slices, h, dparams + (cd * h) as u64 * F)
    }

    /// Safe [`cond_backward_raw`] (allocates its workspace on the device's stream).
    pub fn cond_backward(
        dev: &CudaDevice,
        shape: &FlowHeadShape,
        params: &CudaView<'_, f32>,
        c: &CudaView<'_, f32>,
        du: &CudaView<'_, f32>,
        dparams: &mut CudaViewMut<'_, f32>,
        dc: Option<&mut CudaViewMut<'_, f32>>,
    ) -> Result<()> {
        check_params(shape, "cond_backward params", params.len())?;
        check_len("cond_backward dparams", dparams.len(), params.len())?;
        let n = tokens_of("cond_backward c", c.len(), shape.cond_dim)?;
        check_len("cond_backward du", du.len(), n * shape.width)?;
        if let Some(dc) = &dc {
            check_len("cond_backward dc", dc.len(), c.len())?;
        }
        if n == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let ws_len = cond_backward_workspace_len(shape, n);
        // SAFETY: the workspace is written before it is read.
        let mut ws = unsafe { s.alloc::<f32>(ws_len) }?;
        let (pp, _g1) = params.device_ptr(s);
        let (cp, _g2) = c.device_ptr(s);
        let (dup, _g3) = du.device_ptr(s);
        let (dpp, _g4) = dparams.device_ptr_mut(s);
        let (wp, _g5) = ws.device_ptr_mut(s);
        let (dcp, _g6) = match dc {
            Some(d) => {
                let (p, g) = d.device_ptr_mut(s);
                (p, Some(g))
            }
            None => (0, None),
        };
        // SAFETY: lengths checked above.
        unsafe { cond_backward_raw(dev, shape, pp, cp, dup, dpp, dcp, n, wp, ws_len) }
    }

    // ------------------------------------------------------------------------------- eval

    /// `v[r] = v(z[r], tau[r] | u_{r/K})`.for R = n_tok·K rows.
    ///
    /// # Safety
    /// `params` holds `shape.param_count()` f32 (16-byte aligned), `u` n_tok·H, `z`/`tau`/`v` R.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn eval_forward_raw(
        dev: &CudaDevice,
        shape: &FlowHeadShape,
        params: u64,
        u: u64,
        samples_per_token: usize,
        z: u64,
        tau: u64,
        v: u64,
        n_tok: usize,
    ) -> Result<()> {
        shape.validate()?;
        check_k(samples_per_token)?;
        let rows = n_tok * samples_per_token;
        if rows == 0 {
            return Ok(());
        }
        aligned16("eval_forward params", params)?;
        for (w, p) in [("u", u), ("z", z), ("tau", tau), ("v", v)] {
            nonnull(&format!("eval_forward {w}"), p)?;
        }
        let k = i32::try_from(samples_per_token)
            .map_err(|_| Error::Invalid("eval_forward: K too large".into()))?;
        let (h, tr) = (shape.width, tile_rows(shape.width));
        let (f, smem) = smem_for(dev, "flow_eval_fwd", (tr * h + 4 * tr) * 4)?;
        let (hp, h32, d32, r64) = (
            head_ptr(shape, params),
            h as i32,
            shape.depth as i32,
            rows as i64,
        );
        let mut b = dev.launch_builder(&f);
        b.arg(&hp)
            .arg(&h32)
            .arg(&d32)
            .arg(&u)
            .arg(&k)
            .arg(&r64)
            .arg(&z)
            .arg(&tau)
            .arg(&v);
        let grid = grid_x("flow_eval_fwd", rows.div_ceil(tr))?;
        dev.launch("flow_eval_fwd", b, cfg((grid, 1, 1), smem))
    }

    /// Safe [`eval_forward_raw`].
    #[allow(clippy::too_many_arguments)]
    pub fn eval_forward(
        dev: &CudaDevice,
        shape: &FlowHeadShape,
        params: &CudaView<'_, f32>,
        u: &CudaView<'_, f32>,
        samples_per_token: usize,
        z: &CudaView<'_, f32>,
        tau: &CudaView<'_, f32>,
        v: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        check_params(shape, "eval_forward params", params.len())?;
        check_k(samples_per_token)?;
        let n = tokens_of("eval_forward u", u.len(), shape.width)?;
        let rows = n * samples_per_token;
        check_len("eval_forward z", z.len(), rows)?;
        check_len("eval_forward tau", tau.len(), rows)?;
        check_len("eval_forward v", v.len(), rows)?;
        let s = dev.stream();
        let (pp, _g1) = params.device_ptr(s);
        let (up, _g2) = u.device_ptr(s);
        let (zp, _g3) = z.device_ptr(s);
        let (tp, _g4) = tau.device_ptr(s);
        let (vp, _g5) = v.device_ptr_mut(s);
        // SAFETY: lengths checked above.
        unsafe { eval_forward_raw(dev, shape, pp, up, samples_per_token, zp, tp, vp, n) }
    }

    /// How eval_backward splits its work: chunks of whole tokens, and the workspace sections.
    struct BwdPlan {
        chunk_tokens: usize,
        split: (usize, usize),
        wt: usize,
        wa: usize,
        wh: usize,
        partial: usize,
        total: usize,
    }

    fn bwd_plan(shape: &FlowHeadShape, chunk_tokens: usize, k: usize) -> BwdPlan {
        let (h, d) = (shape.width, shape.depth);
        let rows = chunk_tokens * k;
        let split = split_k(h, h, rows);
        let wt = (d - 1) * h * h;
        let wa = d * rows * h;
        let wh = (d - 1) * rows * h;
        let partial = BWD_MAX_BLOCKS * vec_len(h, d);
        let wgrad = if d > 1 { split.0 * h * h } else { 0 };
        BwdPlan {
            chunk_tokens,
            split,
            wt,
            wa,
            wh,
            partial,
            total: wt + wa + wh + partial + wgrad,
        }
    }

    /// Tokens per chunk when the workspace is not a constraint: activations capped near 256 MiB.
    fn default_chunk_tokens(shape: &FlowHeadShape, n_tok: usize, k: usize) -> usize {
        let per_token = (2 * shape.depth - 1) * shape.width * k;
        (BWD_CHUNK_FLOATS / per_token.max(1)).clamp(1, n_tok.max(1))
    }

    /// f32 of workspace [`eval_backward_raw`] uses by default (activations of up to about 256 MiB
    /// per chunk plus weight-sized buffers: large problems run in chunks of whole tokens).
    pub fn eval_backward_workspace_len(
        shape: &FlowHeadShape,
        n_tok: usize,
        samples_per_token: usize,
    ) -> usize {
        if n_tok == 0 || samples_per_token == 0 {
            return 0;
        }
        bwd_plan(
            shape,
            default_chunk_tokens(shape, n_tok, samples_per_token),
            samples_per_token,
        )
        .total
    }

    /// The least workspace [`eval_backward_raw`] accepts (one token per chunk); any length in
    /// between gives the largest chunks that fit.
    pub fn eval_backward_min_workspace_len(
        shape: &FlowHeadShape,
        samples_per_token: usize,
    ) -> usize {
        bwd_plan(shape, 1, samples_per_token.max(1)).total
    }

    /// Given dv per row, accumulates the gradients of every head parameter except w_cond/b_in
    /// into the full-layout `dparams`, du per token (summed over its K rows) and, when `dz` != 0,
    /// dz per row. Deterministic: no float atomics.
    ///
    /// # Safety
    /// `params`/`dparams` hold `shape.param_count()` f32 (`params` 16-byte aligned), `u`/`du`
    /// n_tok·H, `z`/`tau`/`dv`/`dz` n_tok·K, `workspace` (16-byte aligned) at least
    /// `workspace_len` >= [`eval_backward_workspace_len`] f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn eval_backward_raw(
        dev: &CudaDevice,
        shape: &FlowHeadShape,
        params: u64,
        u: u64,
        samples_per_token: usize,
        z: u64,
        tau: u64,
        dv: u64,
        dparams: u64,
        du: u64,
        dz: u64,
        n_tok: usize,
        workspace: u64,
        workspace_len: usize,
    ) -> Result<()> {
        shape.validate()?;
        check_k(samples_per_token)?;
        if n_tok == 0 {
            return Ok(());
        }
        let k = samples_per_token;
        let mut plan = bwd_plan(shape, default_chunk_tokens(shape, n_tok, k), k);
        if workspace_len < plan.total {
            // the largest chunk that fits (the total grows with the chunk)
            let (mut lo, mut hi) = (1usize, plan.chunk_tokens);
            if bwd_plan(shape, 1, k).total > workspace_len {
                return Err(Error::Shape(format!(
                    "eval_backward workspace: length {workspace_len}, needs at least {}",
                    bwd_plan(shape, 1, k).total
                )));
            }
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if bwd_plan(shape, mid, k).total <= workspace_len {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            plan = bwd_plan(shape, lo, k);
        }
        aligned16("eval_backward params", params)?;
        aligned16("eval_backward workspace", workspace)?;
        for (w, p) in [
            ("u", u),
            ("z", z),
            ("tau", tau),
            ("dv", dv),
            ("dparams", dparams),
            ("du", du),
        ] {
            nonnull(&format!("eval_backward {w}"), p)?;
        }
        let k32 =
            i32::try_from(k).map_err(|_| Error::Invalid("eval_backward: K too large".into()))?;
        let (h, depth) = (shape.width, shape.depth);
        let (h32, d32) = (h as i32, depth as i32);
        let hp = head_ptr(shape, params);
        let dhp = head_ptr(shape, dparams);
        let lay = shape.layout();
        let wt = workspace;
        let wa = wt + plan.wt as u64 * F;
        let wh = wa + plan.wa as u64 * F;
        let partial = wh + plan.wh as u64 * F;
        let wgrad = partial + plan.partial as u64 * F;
        if depth > 1 {
            let f = dev.function(FAMILY, "flow_transpose")?;
            let mut b = dev.launch_builder(&f);
            b.arg(&hp).arg(&h32).arg(&d32).arg(&wt);
            let grid = grid_x("flow_transpose", blocks_for(plan.wt, THREADS) as usize)?;
            dev.launch("flow_transpose", b, cfg((grid, 1, 1), 0))?;
        }
        let tr = tile_rows(h);
        let vlen = vec_len(h, depth);
        let (fb, smem) = smem_for(dev, "flow_eval_bwd", (2 * tr * h + vlen + 3 * tr) * 4)?;
        let fr = dev.function(FAMILY, "flow_vec_reduce")?;
        let fs = dev.function(FAMILY, "flow_segsum")?;
        let mut t0 = 0usize;
        while t0 < n_tok {
            let nt = plan.chunk_tokens.min(n_tok - t0);
            let rows = nt * k;
            let r0 = t0 * k;
            let (uc, duc) = (u + (t0 * h) as u64 * F, du + (t0 * h) as u64 * F);
            let (zc, tc, dvc) = (z + r0 as u64 * F, tau + r0 as u64 * F, dv + r0 as u64 * F);
            let dzc = if dz != 0 { dz + r0 as u64 * F } else { 0 };
            // 1. fused recompute + backprop per tile; per-block vector-gradient partials
            let ntiles = rows.div_ceil(tr);
            let per_block = ntiles.div_ceil(BWD_MAX_BLOCKS);
            let nblocks = ntiles.div_ceil(per_block);
            let r64 = rows as i64;
            let mut b = dev.launch_builder(&fb);
            b.arg(&hp)
                .arg(&wt)
                .arg(&h32)
                .arg(&d32)
                .arg(&uc)
                .arg(&k32)
                .arg(&r64);
            b.arg(&zc)
                .arg(&tc)
                .arg(&dvc)
                .arg(&dzc)
                .arg(&wa)
                .arg(&wh)
                .arg(&partial);
            dev.launch("flow_eval_bwd", b, cfg((nblocks as u32, 1, 1), smem))?;
            // 2. vector gradients
            let nb32 = nblocks as i32;
            let mut b = dev.launch_builder(&fr);
            b.arg(&partial).arg(&nb32).arg(&h32).arg(&d32).arg(&dhp);
            dev.launch(
                "flow_vec_reduce",
                b,
                cfg((blocks_for(vlen, THREADS), 1, 1), 0),
            )?;
            // 3. dW_l += h_{l-1}ᵀ·δ_l (split over rows, slices summed in order)
            for l in 1..depth {
                let split = split_k(h, h, rows);
                debug_assert!(split.0 <= plan.split.0);
                let hprev = wh + ((l - 1) * rows * h) as u64 * F;
                let delta = wa + (l * rows * h) as u64 * F;
                gemm(
                    dev,
                    hprev,
                    (1, h),
                    delta,
                    (h, 1),
                    wgrad,
                    h,
                    h * h,
                    (h, h, rows),
                    split,
                    0,
                    false,
                )?;
                let w = lay.layers[l].w.clone().unwrap();
                reduce_slices(dev, wgrad, split.0, h * h, dparams + w.start as u64 * F)?;
            }
            // 4. du per token = Σ over its K rows of δ_0
            let nt64 = nt as i64;
            let mut b = dev.launch_builder(&fs);
            b.arg(&wa).arg(&k32).arg(&nt64).arg(&h32).arg(&duc);
            let grid = grid_x("flow_segsum", blocks_for(nt * h, THREADS) as usize)?;
            dev.launch("flow_segsum", b, cfg((grid, 1, 1), 0))?;
            t0 += nt;
        }
        Ok(())
    }

    /// Safe [`eval_backward_raw`] (allocates its workspace on the device's stream).
    #[allow(clippy::too_many_arguments)]
    pub fn eval_backward(
        dev: &CudaDevice,
        shape: &FlowHeadShape,
        params: &CudaView<'_, f32>,
        u: &CudaView<'_, f32>,
        samples_per_token: usize,
        z: &CudaView<'_, f32>,
        tau: &CudaView<'_, f32>,
        dv: &CudaView<'_, f32>,
        dparams: &mut CudaViewMut<'_, f32>,
        du: &mut CudaViewMut<'_, f32>,
        dz: Option<&mut CudaViewMut<'_, f32>>,
    ) -> Result<()> {
        check_params(shape, "eval_backward params", params.len())?;
        check_k(samples_per_token)?;
        let n = tokens_of("eval_backward u", u.len(), shape.width)?;
        let rows = n * samples_per_token;
        check_len("eval_backward z", z.len(), rows)?;
        check_len("eval_backward tau", tau.len(), rows)?;
        check_len("eval_backward dv", dv.len(), rows)?;
        check_len("eval_backward dparams", dparams.len(), params.len())?;
        check_len("eval_backward du", du.len(), u.len())?;
        if let Some(dz) = &dz {
            check_len("eval_backward dz", dz.len(), rows)?;
        }
        if n == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let ws_len = eval_backward_workspace_len(shape, n, samples_per_token);
        // SAFETY: every workspace element is written before it is read.
        let mut ws = unsafe { s.alloc::<f32>(ws_len) }?;
        let (pp, _g1) = params.device_ptr(s);
        let (up, _g2) = u.device_ptr(s);
        let (zp, _g3) = z.device_ptr(s);
        let (tp, _g4) = tau.device_ptr(s);
        let (dvp, _g5) = dv.device_ptr(s);
        let (dpp, _g6) = dparams.device_ptr_mut(s);
        let (dup, _g7) = du.device_ptr_mut(s);
        let (wp, _g8) = ws.device_ptr_mut(s);
        let (dzp, _g9) = match dz {
            Some(d) => {
                let (p, g) = d.device_ptr_mut(s);
                (p, Some(g))
            }
            None => (0, None),
        };
        // SAFETY: lengths checked above.
        unsafe {
            eval_backward_raw(
                dev,
                shape,
                pp,
                up,
                samples_per_token,
                zp,
                tp,
                dvp,
                dpp,
                dup,
                dzp,
                n,
                wp,
                ws_len,
            )
        }
    }

    // ------------------------------------------------------------------------------- integrate

    /// The integration interval for [`integrate_raw`]: shared values or per-row device pointers.
    #[derive(Clone, Copy, Debug)]
    pub enum RawInterval {
        Uniform(f32, f32),
        PerRow(u64, u64),
    }

    /// The integration interval for [`integrate`].
    #[derive(Clone, Copy, Debug)]
    pub enum DeviceInterval<'a> {
        Uniform(f32, f32),
        PerRow(&'a CudaView<'a, f32>, &'a CudaView<'a, f32>),
    }

    /// Integrates R = n_tok·K rows from z0 into z1 (and J into `jac` when opts.jacobian).
    ///
    /// # Safety
    /// `params` holds `shape.param_count()` f32 (16-byte aligned), `u` n_tok·H, `z0`/`z1`/`jac`
    /// and per-row interval pointers R f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn integrate_raw(
        dev: &CudaDevice,
        shape: &FlowHeadShape,
        params: u64,
        u: u64,
        samples_per_token: usize,
        z0: u64,
        interval: RawInterval,
        opts: &IntegrateOpts,
        z1: u64,
        jac: u64,
        n_tok: usize,
    ) -> Result<()> {
        shape.validate()?;
        check_k(samples_per_token)?;
        check_opts(opts, jac != 0)?;
        let rows = n_tok * samples_per_token;
        if rows == 0 {
            return Ok(());
        }
        aligned16("integrate params", params)?;
        for (w, p) in [("u", u), ("z0", z0), ("z1", z1)] {
            nonnull(&format!("integrate {w}"), p)?;
        }
        let (t0p, t1p, t0v, t1v) = match interval {
            RawInterval::Uniform(a, b) => (0u64, 0u64, a, b),
            RawInterval::PerRow(a, b) => {
                nonnull("integrate tau_start", a)?;
                nonnull("integrate tau_end", b)?;
                (a, b, 0.0f32, 0.0f32)
            }
        };
        let k = i32::try_from(samples_per_token)
            .map_err(|_| Error::Invalid("integrate: K too large".into()))?;
        let (h, tr) = (shape.width, tile_rows(shape.width));
        let nbuf = if opts.jacobian { 2 } else { 1 };
        let name = if opts.jacobian {
            "flow_integrate_jac"
        } else {
            "flow_integrate"
        };
        let (f, smem) = smem_for(dev, name, (nbuf * tr * h + 9 * tr) * 4)?;
        let (hp, h32, d32, r64) = (
            head_ptr(shape, params),
            h as i32,
            shape.depth as i32,
            rows as i64,
        );
        let steps = opts.steps as i32;
        let mid = (opts.solver == Solver::Midpoint) as i32;
        let (clip, lo, hi) = match opts.clip {
            Some((lo, hi)) => (1i32, lo, hi),
            None => (0i32, 0.0f32, 0.0f32),
        };
        let mut b = dev.launch_builder(&f);
        b.arg(&hp)
            .arg(&h32)
            .arg(&d32)
            .arg(&u)
            .arg(&k)
            .arg(&r64)
            .arg(&z0);
        b.arg(&t0p)
            .arg(&t1p)
            .arg(&t0v)
            .arg(&t1v)
            .arg(&steps)
            .arg(&mid)
            .arg(&clip)
            .arg(&lo)
            .arg(&hi);
        b.arg(&z1);
        if opts.jacobian {
            b.arg(&jac);
        }
        let grid = grid_x(name, rows.div_ceil(tr))?;
        dev.launch(name, b, cfg((grid, 1, 1), smem))
    }

    /// Safe [`integrate_raw`].
    #[allow(clippy::too_many_arguments)]
    pub fn integrate(
        dev: &CudaDevice,
        shape: &FlowHeadShape,
        params: &CudaView<'_, f32>,
        u: &CudaView<'_, f32>,
        samples_per_token: usize,
        z0: &CudaView<'_, f32>,
        interval: DeviceInterval<'_>,
        opts: &IntegrateOpts,
        z1: &mut CudaViewMut<'_, f32>,
        jac: Option<&mut CudaViewMut<'_, f32>>,
    ) -> Result<()> {
        check_params(shape, "integrate params", params.len())?;
        check_k(samples_per_token)?;
        check_opts(opts, jac.is_some())?;
        let n = tokens_of("integrate u", u.len(), shape.width)?;
        let rows = n * samples_per_token;
        check_len("integrate z0", z0.len(), rows)?;
        check_len("integrate z1", z1.len(), rows)?;
        if let DeviceInterval::PerRow(a, b) = interval {
            check_len("integrate tau_start", a.len(), rows)?;
            check_len("integrate tau_end", b.len(), rows)?;
        }
        if let Some(j) = &jac {
            check_len("integrate jac", j.len(), rows)?;
        }
        let s = dev.stream();
        let (pp, _g1) = params.device_ptr(s);
        let (up, _g2) = u.device_ptr(s);
        let (zp, _g3) = z0.device_ptr(s);
        let (z1p, _g4) = z1.device_ptr_mut(s);
        let (raw, _g5, _g6) = match interval {
            DeviceInterval::Uniform(a, b) => (RawInterval::Uniform(a, b), None, None),
            DeviceInterval::PerRow(a, b) => {
                let (ap, ga) = a.device_ptr(s);
                let (bp, gb) = b.device_ptr(s);
                (RawInterval::PerRow(ap, bp), Some(ga), Some(gb))
            }
        };
        let (jp, _g7) = match jac {
            Some(j) => {
                let (p, g) = j.device_ptr_mut(s);
                (p, Some(g))
            }
            None => (0, None),
        };
        // SAFETY: lengths checked above.
        unsafe {
            integrate_raw(
                dev,
                shape,
                pp,
                up,
                samples_per_token,
                zp,
                raw,
                opts,
                z1p,
                jp,
                n,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::cpu::{gelu, gelu_grad};
    use crate::kernels::{gelu_tanh, gelu_tanh_grad};

    #[test]
    fn fast_gelu_is_the_tanh_gelu() {
        for i in -4000..=4000 {
            let x = i as f64 * 0.005; // [-20, 20], including 0 and the saturated tails
            assert!(
                (gelu(x) - gelu_tanh(x)).abs() <= 1e-14 * (1.0 + x.abs()),
                "gelu({x})"
            );
            assert!(
                (gelu_grad(x) - gelu_tanh_grad(x)).abs() <= 1e-14,
                "gelu'({x})"
            );
            // f32: no less accurate than the libm-tanh helpers, measured against f64
            let xf = x as f32;
            let xd = xf as f64;
            let err = |a: f32, truth: f64| (a as f64 - truth).abs();
            let (g, gd) = (gelu_tanh(xd), gelu_tanh_grad(xd));
            assert!(
                err(gelu(xf), g) <= err(gelu_tanh(xf), g).max(1e-7 * (1.0 + xd.abs())),
                "gelu({xf}) f32"
            );
            assert!(
                err(gelu_grad(xf), gd) <= err(gelu_tanh_grad(xf), gd).max(2e-7),
                "gelu'({xf}) f32: {} vs {} (f64 {gd})",
                gelu_grad(xf),
                gelu_tanh_grad(xf)
            );
        }
        for x in [f64::MAX.sqrt(), -f64::MAX.sqrt(), 1e30, -1e30] {
            assert!(gelu(x).is_finite() || x > 0.0);
            assert!(gelu_grad(x).is_finite() || x.abs() > 1e100);
        }
        assert_eq!(gelu(0.0f64), 0.0);
        assert_eq!(gelu_grad(0.0f64), 0.5);
    }
}
