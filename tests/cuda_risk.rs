//! CUDA parity of the `risk` family (kernels/risk.cu) against the CPU reference, on fresh
//! random rows (continuous, tie-heavy, constant, repeated value) with poisoned outputs.
//! Skips visibly without a GPU; DFPO_REQUIRE_CUDA=1 turns the skip into a failure.
//!
//! Tolerances (fp32 on both sides, different summation orders): stats, terms, row_loss and
//! grad rtol 1e-4 + atol 1e-5 (values are O(1)); quantiles rtol 1e-5 + atol 1e-6; sorted rows
//! and permutations exactly (both sides sort stably, ties by index).

mod common;

use std::sync::Arc;

use common::{assert_close, Rng, POISON};
use dfpo::device::{cuda_for_test, CudaDevice};
use dfpo::kernels::risk::{
    cpu, cuda, RiskLossWeights, TailLevels, MAX_K, MAX_QUANTILES_CUDA, NSTATS, NTERMS,
};
use dfpo::Error;

/// Every padded length P (1, 2, 4, ..., 1024: one kernel each) at least once, at and off a power
/// of two.
const KS: &[usize] = &[1, 2, 3, 5, 16, 31, 32, 33, 64, 100, 256, 500, 1000, 1024];
const QS: &[f32] = &[0.0, 0.1, 0.5, 0.9, 1.0, 0.37, 0.999, 0.02];

fn lv(alpha: f32, beta: f32) -> TailLevels {
    TailLevels { alpha, beta }
}

/// Rows per test: two full blocks and a partial one (never a multiple of the rows per block).
fn rows_for(k: usize) -> usize {
    2 * cuda::layout(k).rows_per_block + 5
}

/// One row of kind `kind`: 0 continuous, 1 many ties, 2 constant, 3 a repeated value, 4 signed
/// zeros (−0 sorts before +0, ties by index: the permutation must match exactly).
fn make_row(rng: &mut Rng, k: usize, kind: usize, scale: f64, shift: f64) -> Vec<f32> {
    (0..k)
        .map(|j| {
            let v = rng.normal() * scale + shift;
            (match kind % 5 {
                0 => v,
                1 => (v * 2.0).round() / 2.0,
                2 => 1.25,
                4 => match j % 3 {
                    0 => 0.0,
                    1 => -0.0,
                    _ => v,
                },
                _ => {
                    if j % 3 == 0 {
                        -0.5
                    } else {
                        v
                    }
                }
            }) as f32
        })
        .collect()
}

fn make_rows(rng: &mut Rng, r: usize, k: usize) -> Vec<f32> {
    (0..r)
        .flat_map(|row| make_row(rng, k, row, 1.0, 0.2))
        .collect()
}

fn exact<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("{what}[{i}]: got {:?} want {:?}", got[i], want[i]);
    }
}

struct CpuStats {
    stats: Vec<f32>,
    quant: Vec<f32>,
    sorted: Vec<f32>,
    perm: Vec<u32>,
}

fn cpu_stats(x: &[f32], k: usize, levels: TailLevels, qs: &[f32]) -> CpuStats {
    let r = x.len() / k;
    let mut o = CpuStats {
        stats: vec![0.0; r * NSTATS],
        quant: vec![0.0; r * qs.len()],
        sorted: vec![0.0; r * k],
        perm: vec![0; r * k],
    };
    cpu::stats(
        x,
        k,
        levels,
        qs,
        &mut o.stats,
        &mut o.quant,
        Some(&mut o.sorted),
        Some(&mut o.perm),
    )
    .unwrap();
    o
}

/// The poison of statistics and quantiles: finite, so a NaN the kernel must write is told apart
/// from an element it never wrote.
const UNWRITTEN: f32 = -3.0e38;

/// Runs `cuda::stats` with every output poisoned; `full` = also quantiles, sorted and perm.
fn gpu_stats(
    dev: &Arc<CudaDevice>,
    x: &[f32],
    k: usize,
    levels: TailLevels,
    qs: &[f32],
    full: bool,
) -> CpuStats {
    let st = dev.stream();
    let r = x.len() / k;
    let xd = st.clone_htod(x).unwrap();
    let mut sd = st.clone_htod(&vec![UNWRITTEN; r * NSTATS]).unwrap();
    let mut qd = st
        .clone_htod(&vec![UNWRITTEN; r * qs.len().max(1)])
        .unwrap();
    let mut sod = st.clone_htod(&vec![POISON; r * k]).unwrap();
    let mut pd = st.clone_htod(&vec![u32::MAX; r * k]).unwrap();
    let qs_used: &[f32] = if full { qs } else { &[] };
    {
        let mut sv = sd.as_view_mut();
        let mut qv = qd.slice_mut(0..r * qs.len());
        let mut sov = sod.as_view_mut();
        let mut pv = pd.as_view_mut();
        cuda::stats(
            dev,
            &xd.as_view(),
            k,
            levels,
            qs_used,
            &mut sv,
            full.then_some(&mut qv),
            full.then_some(&mut sov),
            full.then_some(&mut pv),
        )
        .unwrap();
    }
    dev.synchronize().unwrap();
    let quant = st.clone_dtoh(&qd).unwrap();
    CpuStats {
        stats: st.clone_dtoh(&sd).unwrap(),
        quant: quant[..r * qs.len()].to_vec(),
        sorted: st.clone_dtoh(&sod).unwrap(),
        perm: st.clone_dtoh(&pd).unwrap(),
    }
}

#[test]
fn layout_is_consistent() {
    for k in 1..=MAX_K {
        let l = cuda::layout(k);
        assert!(l.p.is_power_of_two() && l.p >= k && l.p < 2 * k.max(1));
        assert_eq!(l.per_lane * l.lanes_per_row, l.p);
        assert!(l.lanes_per_row <= 32 && 32 % l.lanes_per_row == 0);
        assert_eq!(l.threads % 32, 0);
        assert_eq!(l.rows_per_block, l.threads / 32 * (32 / l.lanes_per_row));
    }
}

/// The block size `cuda::layout` launches with is the one each kernel was compiled for
/// (`.maxntid` in the embedded PTX comes from `__launch_bounds__(RiskCfg<P>::THREADS, 2)`).
#[test]
fn layout_matches_the_compiled_launch_bounds() {
    let Some(ptx) = dfpo::device::embedded::get("risk").and_then(|k| k.ptx) else {
        eprintln!("SKIPPED layout_matches_the_compiled_launch_bounds: this build has no PTX");
        return;
    };
    for p in (0..=10).map(|s| 1usize << s) {
        let l = cuda::layout(p);
        for kind in ["stats", "stats_perm", "loss"] {
            let entry = format!(".entry risk_{kind}_p{p}(");
            let at = ptx
                .find(&entry)
                .unwrap_or_else(|| panic!("no {entry} in risk PTX"));
            let rest = &ptx[at..];
            let body = &rest[..rest.find('{').expect("kernel body")];
            let want = format!(".maxntid {}, 1, 1", l.threads);
            assert!(
                body.contains(&want),
                "risk_{kind}_p{p}: expected {want} in {body}"
            );
        }
    }
}

/// The kernels' parameter lists (byte sizes, in order) are what the launchers push:
/// stats (x, R, K, k_lo, k_hi, quantile struct, stats, quant_out, sorted, perm) and
/// loss (pred, target, row_scale, R, K, k_lo, k_hi, weights struct, terms, grad, row_loss).
#[test]
fn kernel_parameters_match_the_launchers() {
    let Some(ptx) = dfpo::device::embedded::get("risk").and_then(|k| k.ptx) else {
        eprintln!("SKIPPED kernel_parameters_match_the_launchers: this build has no PTX");
        return;
    };
    let q = 4 + 8 * MAX_QUANTILES_CUDA;
    let stats = [8, 4, 4, 4, 4, q, 8, 8, 8, 8];
    let loss = [8, 8, 8, 4, 4, 4, 4, 16, 8, 8, 8];
    for p in (0..=10).map(|s| 1usize << s) {
        for (kind, want) in [
            ("stats", &stats[..]),
            ("stats_perm", &stats[..]),
            ("loss", &loss[..]),
        ] {
            let sizes = common::ptx_param_sizes(ptx, &format!("risk_{kind}_p{p}"));
            assert_eq!(sizes, want, "risk_{kind}_p{p} parameter sizes");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn stats_match_cpu() {
    let Some(dev) = cuda_for_test("cuda_risk::stats_match_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_risk::stats_match_cpu");
    for &k in KS {
        for levels in [lv(0.1, 0.1), lv(0.37, 0.05), lv(1.0, 0.7)] {
            let r = rows_for(k);
            let x = make_rows(&mut rng, r, k);
            let want = cpu_stats(&x, k, levels, QS);
            let what = |s: &str| format!("K={k} {levels:?} R={r} {s}");

            let got = gpu_stats(&dev, &x, k, levels, QS, true);
            assert_close(&what("stats"), &got.stats, &want.stats, 1e-4, 1e-5);
            assert_close(&what("quantiles"), &got.quant, &want.quant, 1e-5, 1e-6);
            exact(&what("sorted"), &got.sorted, &want.sorted);
            exact(&what("perm"), &got.perm, &want.perm);

            // Stats alone: the kernel sorts values without indices.
            let got = gpu_stats(&dev, &x, k, levels, QS, false);
            assert_close(
                &what("stats (values-only sort)"),
                &got.stats,
                &want.stats,
                1e-4,
                1e-5,
            );
            assert!(
                got.sorted.iter().all(|v| v.is_nan()),
                "sorted written though not wanted"
            );
            assert!(
                got.perm.iter().all(|&p| p == u32::MAX),
                "perm written though not wanted"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn stats_match_cpu_at_bench_size() {
    let Some(dev) = cuda_for_test("cuda_risk::stats_match_cpu_at_bench_size") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_risk::stats_match_cpu_at_bench_size");
    let (r, k) = (32768 + 7, 64);
    let x = make_rows(&mut rng, r, k);
    let want = cpu_stats(&x, k, TailLevels::default(), QS);
    let got = gpu_stats(&dev, &x, k, TailLevels::default(), QS, true);
    assert_close("stats", &got.stats, &want.stats, 1e-4, 1e-5);
    assert_close("quantiles", &got.quant, &want.quant, 1e-5, 1e-6);
    exact("sorted", &got.sorted, &want.sorted);
    exact("perm", &got.perm, &want.perm);
}

/// A (pred, target) row pair whose relu arguments are far from 0 (> 1e-3 in f64) or exactly 0
/// in every precision and summation order: identical sorted tails (rows, for the mean), or
/// tails without spread (one sample, or one repeated dyadic value). Anything else near a kink
/// could flip a relu between the fp32 CPU sum order and the GPU's tree order.
fn loss_rows(rng: &mut Rng, k: usize, levels: TailLevels, kind: usize) -> (Vec<f32>, Vec<f32>) {
    let (scale, shift) = [(1.8, 0.4), (0.5, -0.4), (1.8, -0.4), (0.5, 0.4)][kind % 4];
    let (klo, khi) = levels.counts(k);
    let sorted = |x: &[f32]| {
        let mut v: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let var = |v: &[f64]| {
        let m = mean(v);
        v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64
    };
    let flat = |v: &[f64]| v.iter().all(|&x| x == v[0]);
    let ok = |d: f64, a: &[f64], b: &[f64], spread_free: bool| {
        d.abs() > 1e-3 || a == b || (spread_free && flat(a) && flat(b))
    };
    for _ in 0..10_000 {
        let t = make_row(rng, k, kind / 4, 1.0, 0.0);
        let p = make_row(rng, k, kind / 3, scale, shift);
        let (sp, st) = (sorted(&p), sorted(&t));
        let (lp, lt) = (&sp[..klo], &st[..klo]);
        let (hp, ht) = (&sp[k - khi..], &st[k - khi..]);
        if ok(var(lp) - var(lt), lp, lt, true)
            && ok(var(ht) - var(hp), hp, ht, true)
            && ok(mean(&st) - mean(&sp), &sp, &st, false)
        {
            return (p, t);
        }
    }
    panic!("no row pair away from the relu kinks (K={k})");
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn loss_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda_risk::loss_matches_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_risk::loss_matches_cpu");
    let w = RiskLossWeights {
        cvar: 1.0,
        gain: 0.7,
        shape: 1.3,
        mean_shift: 0.5,
    };
    for &k in KS {
        for (li, levels) in [lv(0.1, 0.1), lv(0.6, 0.7)].into_iter().enumerate() {
            let r = rows_for(k);
            let (mut pred, mut target) = (Vec::new(), Vec::new());
            for row in 0..r {
                let (p, t) = loss_rows(&mut rng, k, levels, row);
                pred.extend(p);
                target.extend(t);
            }
            // Row 1: pred == target, every relu exactly at its kink.
            let t1 = target[k..2 * k].to_vec();
            pred[k..2 * k].copy_from_slice(&t1);
            let mut scale: Vec<f32> = (0..r).map(|_| rng.range(0.25, 1.25) as f32).collect();
            scale[2] = 0.0;
            let init = rng.normal_vec(r * k, 1.0);

            let mut terms = vec![0.0f32; r * NTERMS];
            let mut grad = init.clone();
            cpu::loss(&pred, &target, k, levels, &w, &scale, &mut terms, &mut grad).unwrap();
            let wv = [w.cvar, w.gain, w.shape, w.mean_shift];
            let row_loss: Vec<f32> = (0..r)
                .map(|row| {
                    scale[row]
                        * (0..NTERMS)
                            .map(|t| wv[t] * terms[row * NTERMS + t])
                            .sum::<f32>()
                })
                .collect();

            let want_row_loss = li == 0;
            let (g_terms, g_grad, rl) = gpu_loss(
                &dev,
                (&pred, &target, &scale, &init),
                k,
                levels,
                &w,
                want_row_loss,
            );
            let what = |s: &str| format!("K={k} {levels:?} R={r} {s}");
            assert_close(&what("terms"), &g_terms, &terms, 1e-4, 1e-5);
            assert_close(&what("grad (+=)"), &g_grad, &grad, 1e-4, 1e-5);
            if want_row_loss {
                assert_close(&what("row_loss"), &rl, &row_loss, 1e-4, 1e-5);
            } else {
                assert!(
                    rl.iter().all(|&v| v == UNWRITTEN),
                    "row_loss written though not wanted"
                );
            }
        }
    }
}

/// Runs `cuda::loss` on (pred, target, row_scale, initial grad) with terms and row_loss poisoned
/// by [`UNWRITTEN`]; returns (terms, grad, row_loss) (row_loss stays poisoned unless wanted).
fn gpu_loss(
    dev: &Arc<CudaDevice>,
    (pred, target, scale, init): (&[f32], &[f32], &[f32], &[f32]),
    k: usize,
    levels: TailLevels,
    w: &RiskLossWeights,
    want_row_loss: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let st = dev.stream();
    let r = scale.len();
    let pd = st.clone_htod(pred).unwrap();
    let td = st.clone_htod(target).unwrap();
    let sd = st.clone_htod(scale).unwrap();
    let mut md = st.clone_htod(&vec![UNWRITTEN; r * NTERMS]).unwrap();
    let mut gd = st.clone_htod(init).unwrap();
    let mut rd = st.clone_htod(&vec![UNWRITTEN; r]).unwrap();
    {
        let mut rv = rd.as_view_mut();
        cuda::loss(
            dev,
            &pd.as_view(),
            &td.as_view(),
            k,
            levels,
            w,
            &sd.as_view(),
            &mut md.as_view_mut(),
            &mut gd.as_view_mut(),
            want_row_loss.then_some(&mut rv),
        )
        .unwrap();
    }
    dev.synchronize().unwrap();
    (
        st.clone_dtoh(&md).unwrap(),
        st.clone_dtoh(&gd).unwrap(),
        st.clone_dtoh(&rd).unwrap(),
    )
}

/// `assert_close` where `want` is a number; where it is NaN, `got` must be NaN too.
fn close_or_nan(what: &str, got: &[f32], want: &[f32], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(!w.is_nan() || g.is_nan(), "{what}[{i}]: got {g}, want NaN");
    }
    let (g, w): (Vec<f32>, Vec<f32>) = got
        .iter()
        .zip(want)
        .filter(|(_, w)| !w.is_nan())
        .map(|(g, w)| (*g, *w))
        .unzip();
    assert_close(what, &g, &w, rtol, atol);
}

/// Non-finite samples into some rows of `x` (`[r][k]`), by row % 5: 0 none, 1 one NaN,
/// 2 one +inf, 3 a -inf (and a NaN on every other such row), 4 every sample NaN.
fn inject_non_finite(rng: &mut Rng, x: &mut [f32], k: usize, shift: usize) {
    for (row, xr) in x.chunks_mut(k).enumerate() {
        let mut at = || (rng.next_u64() % k as u64) as usize;
        match (row + shift) % 5 {
            1 => xr[at()] = f32::NAN,
            2 => xr[at()] = f32::INFINITY,
            3 => {
                xr[at()] = f32::NEG_INFINITY;
                if ((row + shift) / 5) % 2 == 1 {
                    xr[at()] = f32::NAN;
                }
            }
            4 => xr.fill(f32::NAN),
            _ => {}
        }
    }
}

/// NaN and ±inf samples: the GPU gives exactly what the CPU reference gives (NaN statistics,
/// quantiles, terms and gradient for the row; the exact stable sort with NaN last and a true
/// permutation), and the clean rows next to them are unaffected. (fminf/fmaxf compare-exchanges
/// used to drop a NaN from the row, giving finite statistics, and the index sort repeated an
/// index, so the loss read stale shared memory.)
#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn non_finite_rows_match_cpu() {
    let Some(dev) = cuda_for_test("cuda_risk::non_finite_rows_match_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_risk::non_finite_rows_match_cpu");
    let w = RiskLossWeights {
        cvar: 1.0,
        gain: 0.7,
        shape: 1.3,
        mean_shift: 0.5,
    };
    let levels = lv(0.25, 0.25);
    for &k in KS {
        let r = rows_for(k);
        let what = |s: &str| format!("K={k} R={r} {s}");
        let mut x = make_rows(&mut rng, r, k);
        inject_non_finite(&mut rng, &mut x, k, 0);
        let want = cpu_stats(&x, k, levels, QS);
        for full in [true, false] {
            let got = gpu_stats(&dev, &x, k, levels, QS, full);
            close_or_nan(&what("stats"), &got.stats, &want.stats, 1e-4, 1e-5);
            if full {
                close_or_nan(&what("quantiles"), &got.quant, &want.quant, 1e-5, 1e-6);
                close_or_nan(&what("sorted"), &got.sorted, &want.sorted, 0.0, 0.0);
                exact(&what("perm"), &got.perm, &want.perm);
            }
        }

        let (mut pred, mut target) = (Vec::new(), Vec::new());
        for row in 0..r {
            let (p, t) = loss_rows(&mut rng, k, levels, row);
            pred.extend(p);
            target.extend(t);
        }
        inject_non_finite(&mut rng, &mut pred, k, 0);
        inject_non_finite(&mut rng, &mut target, k, 2);
        let scale: Vec<f32> = (0..r)
            .map(|i| if i % 7 == 3 { 0.0 } else { 0.75 })
            .collect();
        let init = rng.normal_vec(r * k, 1.0);
        let mut terms = vec![0.0f32; r * NTERMS];
        let mut grad = init.clone();
        cpu::loss(&pred, &target, k, levels, &w, &scale, &mut terms, &mut grad).unwrap();
        let (g_terms, g_grad, rl) =
            gpu_loss(&dev, (&pred, &target, &scale, &init), k, levels, &w, true);
        close_or_nan(&what("terms"), &g_terms, &terms, 1e-4, 1e-5);
        close_or_nan(&what("grad (+=)"), &g_grad, &grad, 1e-4, 1e-5);
        for row in 0..r {
            let bad = terms[row * NTERMS].is_nan();
            assert_eq!(
                rl[row].is_nan(),
                bad,
                "{}",
                what(&format!("row_loss[{row}] = {}", rl[row]))
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn bad_inputs_are_errors() {
    let Some(dev) = cuda_for_test("cuda_risk::bad_inputs_are_errors") else {
        return;
    };
    let st = dev.stream();
    let x = st.clone_htod(&vec![0.5f32; 12]).unwrap();
    let mut s = st.clone_htod(&vec![0.0f32; 3 * NSTATS]).unwrap();
    let mut q = st
        .clone_htod(&vec![0.0f32; 3 * (MAX_QUANTILES_CUDA + 1)])
        .unwrap();
    let lvd = TailLevels::default();
    let shape = |e: Error| matches!(e, Error::Shape(_));
    let invalid = |e: Error| matches!(e, Error::Invalid(_));
    let mut run = |k: usize, l: TailLevels, qs: &[f32], with_q: bool| {
        let mut qv = q.slice_mut(0..3 * qs.len());
        cuda::stats(
            &dev,
            &x.as_view(),
            k,
            l,
            qs,
            &mut s.as_view_mut(),
            with_q.then_some(&mut qv),
            None,
            None,
        )
    };
    assert!(run(4, lvd, &[0.5], true).is_ok());
    assert!(invalid(run(0, lvd, &[], false).unwrap_err()));
    assert!(invalid(run(MAX_K + 1, lvd, &[], false).unwrap_err()));
    assert!(shape(run(5, lvd, &[], false).unwrap_err()));
    assert!(
        shape(run(6, lvd, &[], false).unwrap_err()),
        "stats length for 2 rows"
    );
    assert!(invalid(run(4, lv(0.0, 0.1), &[], false).unwrap_err()));
    assert!(invalid(run(4, lv(0.1, 1.5), &[], false).unwrap_err()));
    assert!(invalid(run(4, lvd, &[1.5], true).unwrap_err()));
    assert!(
        invalid(run(4, lvd, &[0.5], false).unwrap_err()),
        "levels without quant_out"
    );
    let many = vec![0.5f32; MAX_QUANTILES_CUDA + 1];
    assert!(invalid(run(4, lvd, &many, true).unwrap_err()));

    let sc = st.clone_htod(&[1.0f32; 3]).unwrap();
    let mut terms = st.clone_htod(&vec![0.0f32; 3 * NTERMS]).unwrap();
    let mut grad = st.clone_htod(&vec![0.0f32; 12]).unwrap();
    let w = RiskLossWeights::default();
    let mut loss = |k: usize, l: TailLevels, w: &RiskLossWeights, t_len: usize| {
        cuda::loss(
            &dev,
            &x.as_view(),
            &x.slice(0..t_len),
            k,
            l,
            w,
            &sc.as_view(),
            &mut terms.as_view_mut(),
            &mut grad.as_view_mut(),
            None,
        )
    };
    assert!(loss(4, lvd, &w, 12).is_ok());
    assert!(invalid(loss(0, lvd, &w, 12).unwrap_err()));
    assert!(shape(loss(4, lvd, &w, 8).unwrap_err()));
    assert!(
        shape(loss(6, lvd, &w, 12).unwrap_err()),
        "row_scale length for 2 rows"
    );
    assert!(invalid(loss(4, lv(2.0, 0.1), &w, 12).unwrap_err()));
    let wn = RiskLossWeights {
        shape: f32::INFINITY,
        ..w
    };
    assert!(invalid(loss(4, lvd, &wn, 12).unwrap_err()));
    dev.synchronize().unwrap();
}
