//! Kernel families: one module per `kernels/<family>.cu`. Each pairs the CPU reference (plain
//! Rust, generic over [`Real`] so checks can run it in f64) with the CUDA launchers (fp32 over
//! cudarc device slices).

pub mod act;
pub mod adamw;
pub mod attention;
pub mod embed;
pub mod flow;
pub mod heads;
pub mod norm;
pub mod risk;
pub mod rl;
pub mod rope;
pub mod sample;
pub mod step;
pub mod xent;

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

/// The scalar of the CPU references: `f32` for running, `f64` for finite-difference checks.
pub trait Real:
    Copy
    + Default
    + PartialOrd
    + Debug
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn is_finite(self) -> bool;
    /// Row-major C = alpha·op(A)·op(B) + beta·C with op(A): m×k, op(B): k×n (`ta`/`tb`
    /// transpose A and B as stored, A stored m×k or k×m, B stored k×n or n×k).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: &[Self],
        ta: bool,
        b: &[Self],
        tb: bool,
        beta: Self,
        c: &mut [Self],
    );
}

macro_rules! impl_real {
    ($t:ty, $gemm:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
            fn min(self, o: Self) -> Self {
                <$t>::min(self, o)
            }
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            fn gemm(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: &[Self],
                ta: bool,
                b: &[Self],
                tb: bool,
                beta: Self,
                c: &mut [Self],
            ) {
                assert!(
                    a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
                    "gemm sizes"
                );
                if m == 0 || n == 0 {
                    return;
                }
                // Strides (row, column) of op(A) and op(B) in their row-major storage.
                let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
                let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
                // SAFETY: the asserts above bound every index the strides reach.
                unsafe {
                    $gemm(
                        m,
                        k,
                        n,
                        alpha,
                        a.as_ptr(),
                        rsa,
                        csa,
                        b.as_ptr(),
                        rsb,
                        csb,
                        beta,
                        c.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                }
            }
        }
    };
}
impl_real!(f32, matrixmultiply::sgemm);
impl_real!(f64, matrixmultiply::dgemm);

/// For the CUDA launchers: `Error::Invalid` unless `ptr` is a non-null, `align`-byte aligned
/// device address.
pub(crate) fn check_ptr(what: &str, ptr: u64, align: u64) -> crate::Result<()> {
    if ptr == 0 || !ptr.is_multiple_of(align) {
        return Err(crate::Error::Invalid(format!(
            "{what}: device pointer {ptr:#x} is null or not {align}-byte aligned"
        )));
    }
    Ok(())
}

/// For the CUDA launchers: `v` as a kernel's i32 argument, or `Error::Shape` when it does not fit.
pub(crate) fn check_i32(what: &str, v: usize) -> crate::Result<i32> {
    i32::try_from(v).map_err(|_| crate::Error::Shape(format!("{what} = {v} exceeds i32::MAX")))
}

/// splitmix64 finaliser; the same bits as `splitmix64` in kernels/common.cuh.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E3779B97F4A7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D049BB133111EB);
    x ^ (x >> 31)
}

/// Uniform in (0, 1) for (seed, counter); the same value as `uniform_open` in common.cuh.
pub fn uniform_open(seed: u64, counter: u64) -> f64 {
    let x = splitmix64(seed ^ splitmix64(counter));
    ((x >> 11) as f64 + 0.5) * (1.0 / 9007199254740992.0)
}

#[allow(clippy::excessive_precision)] // AS241 coefficients, kept as published
/// Φ⁻¹(p), the standard normal quantile, by Wichura's AS241 (PPND16), |relative error| < 1e-15.
pub fn inv_normal_cdf(p: f64) -> f64 {
    assert!(
        p > 0.0 && p < 1.0,
        "inv_normal_cdf({p}): p must be in (0, 1)"
    );
    let q = p - 0.5;
    if q.abs() <= 0.425 {
        let r = 0.180625 - q * q;
        let num = (((((((2509.0809287301226727 * r + 33430.575583588128105) * r
            + 67265.770927008700853)
            * r
            + 45921.953931549871457)
            * r
            + 13731.693765509461125)
            * r
            + 1971.5909503065514427)
            * r
            + 133.14166789178437745)
            * r
            + 3.387132872796366608)
            * q;
        let den = ((((((5226.495278852545925 * r + 28729.085735721942674) * r
            + 39307.89580009271061)
            * r
            + 21213.794301586595867)
            * r
            + 5394.1960214247511077)
            * r
            + 687.1870074920579083)
            * r
            + 42.313330701600911252)
            * r
            + 1.0;
        return num / den;
    }
    let mut r = if q < 0.0 { p } else { 1.0 - p };
    r = (-r.ln()).sqrt();
    let val = if r <= 5.0 {
        r -= 1.6;
        let num = ((((((7.7454501427834140764e-4 * r + 0.0227238449892691845833) * r
            + 0.24178072517745061177)
            * r
            + 1.27045825245236838258)
            * r
            + 3.64784832476320460504)
            * r
            + 5.7694972214606914055)
            * r
            + 4.6303378461565452959)
            * r
            + 1.42343711074968357734;
        let den = ((((((1.05075007164441684324e-9 * r + 5.475938084995344946e-4) * r
            + 0.0151986665636164571966)
            * r
            + 0.14810397642748007459)
            * r
            + 0.68976733498510000455)
            * r
            + 1.6763848301838038494)
            * r
            + 2.05319162663775882187)
            * r
            + 1.0;
        num / den
    } else {
        r -= 5.0;
        let num = ((((((2.01033439929228813265e-7 * r + 2.71155556874348757815e-5) * r
            + 0.0012426609473880784386)
            * r
            + 0.026532189526576123093)
            * r
            + 0.29656057182850489123)
            * r
            + 1.7848265399172913358)
            * r
            + 5.4637849111641143699)
            * r
            + 6.6579046435011037772;
        let den = ((((((2.04426310338993978564e-15 * r + 1.4215117583164458887e-7) * r
            + 1.8463183175100546818e-5)
            * r
            + 7.868691311456132591e-4)
            * r
            + 0.0148753612908506148525)
            * r
            + 0.13692988092273580531)
            * r
            + 0.59983220655588793769)
            * r
            + 1.0;
        num / den
    };
    if q < 0.0 {
        -val
    } else {
        val
    }
}

/// GELU, tanh approximation (flax's default; torch `approximate="tanh"`).
pub fn gelu_tanh<T: Real>(x: T) -> T {
    let c = T::from_f64(0.7978845608028654);
    let a = T::from_f64(0.044715);
    let half = T::from_f64(0.5);
    half * x * (T::ONE + (c * (x + a * x * x * x)).tanh())
}

/// d/dx of [`gelu_tanh`].
pub fn gelu_tanh_grad<T: Real>(x: T) -> T {
    let c = T::from_f64(0.7978845608028654);
    let a = T::from_f64(0.044715);
    let half = T::from_f64(0.5);
    let t = (c * (x + a * x * x * x)).tanh();
    let du = c * (T::ONE + T::from_f64(3.0) * a * x * x);
    half * (T::ONE + t) + half * x * (T::ONE - t * t) * du
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inv_normal_cdf_known_values() {
        assert!((inv_normal_cdf(0.5)).abs() < 1e-15);
        assert!((inv_normal_cdf(0.975) - 1.959963984540054).abs() < 1e-12);
        assert!((inv_normal_cdf(0.025) + 1.959963984540054).abs() < 1e-12);
        assert!((inv_normal_cdf(1e-10) + 6.361340902404056).abs() < 1e-9);
        assert!((inv_normal_cdf(0.8413447460685429) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn gemm_matches_naive_for_all_transposes() {
        let (m, k, n) = (3, 4, 5);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.71).cos()).collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let at = |i: usize, p: usize| if ta { a[p * m + i] } else { a[i * k + p] };
            let bt = |p: usize, j: usize| if tb { b[j * k + p] } else { b[p * n + j] };
            let mut c = vec![1.0; m * n];
            f64::gemm(m, k, n, 2.0, &a, ta, &b, tb, 0.5, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = 0.5 + 2.0 * (0..k).map(|p| at(i, p) * bt(p, j)).sum::<f64>();
                    assert!((c[i * n + j] - want).abs() < 1e-12, "ta={ta} tb={tb}");
                }
            }
        }
    }

    #[test]
    fn gelu_grad_matches_finite_difference() {
        for &x in &[-3.0f64, -0.7, 0.0, 0.4, 2.5] {
            let h = 1e-6;
            let fd = (gelu_tanh(x + h) - gelu_tanh(x - h)) / (2.0 * h);
            assert!((fd - gelu_tanh_grad(x)).abs() < 1e-8);
        }
    }
}
