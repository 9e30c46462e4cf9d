//! CPU reference of the `risk` family against independent truths: brute-force sorts and
//! pairwise-difference variances, closed forms, finite differences (f64) of the loss.

mod common;

use common::Rng;
use dfpo::kernels::risk::{
    cpu, hazen_position, quantile_sorted, tail_count, RiskLossWeights, Stat, TailLevels, Term,
    MAX_K, NSTATS, NTERMS,
};
use dfpo::Error;

const KS: &[usize] = &[1, 2, 3, 5, 8, 31, 32, 33, 64, 100, 1000, 1024];
const LEVELS: &[(f32, f32)] = &[
    (0.1, 0.1),
    (0.37, 0.05),
    (1.0, 1.0),
    (0.5, 0.9),
    (0.01, 0.3),
];
const QS: &[f32] = &[0.0, 0.02, 0.1, 0.25, 0.5, 0.77, 0.9, 0.999, 1.0];

fn lv(a: f32, b: f32) -> TailLevels {
    TailLevels { alpha: a, beta: b }
}

/// Sort order by (value, index) with an unstable sort of tuples: the stable order, found
/// independently of the reference's stable `sort_by`. Values order as (NaN?, value, +0 after
/// −0): NaN last, −0 before +0.
fn bf_perm(x: &[f64]) -> Vec<usize> {
    let key = |v: f64| {
        (
            v.is_nan(),
            if v.is_nan() { 0.0 } else { v },
            !v.is_sign_negative(),
        )
    };
    let mut t: Vec<(f64, usize)> = x.iter().copied().zip(0..).collect();
    t.sort_unstable_by(|a, b| key(a.0).partial_cmp(&key(b.0)).unwrap().then(a.1.cmp(&b.1)));
    t.into_iter().map(|(_, i)| i).collect()
}

fn bf_mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

/// Population variance as the mean squared pairwise difference / 2 (no mean involved).
fn bf_var(x: &[f64]) -> f64 {
    let n = x.len() as f64;
    let mut s = 0.0;
    for a in x {
        for b in x {
            s += (a - b) * (a - b);
        }
    }
    s / (2.0 * n * n)
}

/// Hazen quantile by scanning for the bracketing sample levels (i + ½)/K.
fn bf_quantile(sorted: &[f64], q: f64) -> f64 {
    let k = sorted.len();
    let level = |i: usize| (i as f64 + 0.5) / k as f64;
    if q <= level(0) {
        return sorted[0];
    }
    if q >= level(k - 1) {
        return sorted[k - 1];
    }
    let i = (0..k - 1).find(|&i| q < level(i + 1)).unwrap();
    let t = (q - level(i)) * k as f64;
    sorted[i] * (1.0 - t) + sorted[i + 1] * t
}

/// Rows of several kinds: continuous, many ties (rounded), a constant row, a repeated value.
fn make_rows(rng: &mut Rng, r: usize, k: usize) -> Vec<f64> {
    let mut x = Vec::with_capacity(r * k);
    for row in 0..r {
        for j in 0..k {
            let v = rng.normal() * (0.5 + rng.uniform()) + 0.3;
            x.push(match row % 4 {
                0 => v,
                1 => (v * 2.0).round() / 2.0,
                2 => 1.25,
                _ => {
                    if j % 3 == 0 {
                        -0.5
                    } else {
                        v
                    }
                }
            });
        }
    }
    x
}

struct Out {
    stats: Vec<f64>,
    quant: Vec<f64>,
    sorted: Vec<f64>,
    perm: Vec<u32>,
}

fn run_stats(x: &[f64], k: usize, levels: TailLevels, qs: &[f32]) -> Out {
    let r = x.len() / k;
    let mut o = Out {
        stats: vec![f64::NAN; r * NSTATS],
        quant: vec![f64::NAN; r * qs.len()],
        sorted: vec![f64::NAN; r * k],
        perm: vec![u32::MAX; r * k],
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

fn close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol * (1.0 + want.abs()),
        "{what}: got {got} want {want}"
    );
}

#[test]
fn stats_match_brute_force() {
    let mut rng = Rng::fresh("stats_match_brute_force");
    for &k in KS {
        let r = if k >= 1000 { 4 } else { 8 };
        let x = make_rows(&mut rng, r, k);
        for &(a, b) in LEVELS {
            let o = run_stats(&x, k, lv(a, b), QS);
            let (klo, khi) = (tail_count(a, k), tail_count(b, k));
            for row in 0..r {
                let xr = &x[row * k..(row + 1) * k];
                let p = bf_perm(xr);
                let s: Vec<f64> = p.iter().map(|&i| xr[i]).collect();
                let want = [
                    bf_mean(&s),
                    bf_var(&s),
                    bf_mean(&s[..klo]),
                    bf_mean(&s[k - khi..]),
                    bf_var(&s[..klo]),
                    bf_var(&s[k - khi..]),
                    bf_var(&s).sqrt(),
                ];
                let st = &o.stats[row * NSTATS..(row + 1) * NSTATS];
                for (i, (&g, &w)) in st.iter().zip(&want).enumerate() {
                    close(&format!("K={k} {a}/{b} row {row} stat {i}"), g, w, 1e-9);
                }
                for (i, &q) in QS.iter().enumerate() {
                    let g = o.quant[row * QS.len() + i];
                    close(
                        &format!("K={k} row {row} q={q}"),
                        g,
                        bf_quantile(&s, q as f64),
                        1e-9,
                    );
                }
                for i in 0..k {
                    assert_eq!(
                        o.perm[row * k + i] as usize,
                        p[i],
                        "K={k} row {row} perm[{i}]"
                    );
                    assert_eq!(o.sorted[row * k + i], s[i], "K={k} row {row} sorted[{i}]");
                }
            }
        }
    }
}

#[test]
fn stats_f32_agree_with_f64() {
    let mut rng = Rng::fresh("stats_f32_agree_with_f64");
    for &k in KS {
        let x = make_rows(&mut rng, 4, k);
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let x64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
        let o = run_stats(&x64, k, TailLevels::default(), QS);
        let r = x.len() / k;
        let mut st = vec![f32::NAN; r * NSTATS];
        let mut qo = vec![f32::NAN; r * QS.len()];
        cpu::stats(
            &x32,
            k,
            TailLevels::default(),
            QS,
            &mut st,
            &mut qo,
            None,
            None,
        )
        .unwrap();
        // Recursive f32 summation of K terms errs by up to (K - 1) units of roundoff relative
        // to the sum of magnitudes (Higham 4.2): 1e-5 held to K = 100, not to K = 1024.
        let tol = 1e-5f64.max(k as f64 * f32::EPSILON as f64);
        for (i, (&g, &w)) in st.iter().zip(&o.stats).enumerate() {
            close(&format!("K={k} stat {i}"), g as f64, w, tol);
        }
        for (i, (&g, &w)) in qo.iter().zip(&o.quant).enumerate() {
            close(&format!("K={k} quantile {i}"), g as f64, w, 1e-6);
        }
    }
}

#[test]
fn tails_of_known_samples() {
    let mut rng = Rng::fresh("tails_of_known_samples");
    for &k in &[1usize, 2, 7, 10, 64, 100, 1024] {
        // 1..K in a random order.
        let mut x: Vec<f64> = (1..=k).map(|v| v as f64).collect();
        for i in (1..k).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            x.swap(i, j);
        }
        for &(a, b) in &[(0.1f32, 0.1f32), (0.25, 0.5), (1.0, 0.05)] {
            let o = run_stats(&x, k, lv(a, b), &[]);
            let (ka, kb) = (tail_count(a, k) as f64, tail_count(b, k) as f64);
            let kf = k as f64;
            let st = &o.stats;
            let want = [
                (Stat::Mean, (kf + 1.0) / 2.0),
                (Stat::Var, (kf * kf - 1.0) / 12.0),
                (Stat::CvarLow, (ka + 1.0) / 2.0),
                (Stat::MeanHigh, (2.0 * kf - kb + 1.0) / 2.0),
                (Stat::VarLow, (ka * ka - 1.0) / 12.0),
                (Stat::VarHigh, (kb * kb - 1.0) / 12.0),
                (Stat::Std, ((kf * kf - 1.0) / 12.0).sqrt()),
            ];
            for (s, w) in want {
                close(&format!("K={k} {a}/{b} {s:?}"), st[s as usize], w, 1e-12);
            }
            for i in 0..k {
                assert_eq!(o.sorted[i], (i + 1) as f64);
                assert_eq!(x[o.perm[i] as usize], (i + 1) as f64);
            }
        }
    }
}

#[test]
fn quantile_closed_forms() {
    for &k in &[1usize, 2, 3, 10, 64, 100, 1000, 1024] {
        let s: Vec<f64> = (0..k).map(|v| v as f64).collect();
        assert_eq!(quantile_sorted(&s, 0.0), 0.0);
        assert_eq!(quantile_sorted(&s, 1.0), (k - 1) as f64);
        assert_eq!(
            quantile_sorted(&s, 0.1 / k as f32),
            0.0,
            "below the first level clamps"
        );
        for i in 0..k {
            let q = (i as f32 + 0.5) / k as f32;
            let got = quantile_sorted(&s, q);
            if k.is_power_of_two() {
                // (i + ½)/K is exact in f32: sample i exactly.
                assert_eq!(got, i as f64, "K={k} i={i}");
            } else {
                close(&format!("K={k} i={i}"), got, i as f64, 1e-6);
            }
            if i + 1 < k {
                // Halfway between two sample levels: halfway between the samples.
                let q = (i as f32 + 1.0) / k as f32;
                close(
                    &format!("K={k} mid {i}"),
                    quantile_sorted(&s, q),
                    i as f64 + 0.5,
                    1e-6,
                );
            }
        }
    }
    assert_eq!(quantile_sorted(&[7.5f32], 0.3), 7.5);
    assert!(quantile_sorted::<f64>(&[], 0.5).is_nan());
    assert!(quantile_sorted(&[1.0f64, 2.0], f32::NAN).is_nan());
    assert_eq!(hazen_position(0.5, 4), (1, 0.5));
    assert_eq!(hazen_position(0.0, 4), (0, 0.0));
    assert_eq!(hazen_position(1.0, 4), (3, 0.0));
}

#[test]
fn tail_count_cases() {
    assert_eq!(tail_count(0.1, 10), 1);
    assert_eq!(tail_count(0.1, 5), 1, "max(1, ·)");
    assert_eq!(tail_count(0.1, 1), 1);
    assert_eq!(tail_count(0.1, 32), 3);
    assert_eq!(tail_count(0.1, 1024), 102);
    assert_eq!(tail_count(0.7, 10), 7, "0.7f32 < 0.7 still counts as 0.7");
    assert_eq!(tail_count(0.3, 10), 3);
    assert_eq!(tail_count(0.05, 1024), 51);
    assert_eq!(tail_count(0.999, 1000), 999);
    assert_eq!(tail_count(1.0, 1024), 1024);
    assert_eq!(tail_count(1.0, 1), 1);
    assert_eq!(lv(0.25, 0.5).counts(16), (4, 8));
}

#[test]
fn perm_is_a_stable_permutation() {
    let mut rng = Rng::fresh("perm_is_a_stable_permutation");
    for &k in KS {
        // Few distinct values: many ties.
        let x: Vec<f32> = (0..5 * k)
            .map(|_| (rng.next_u64() % 4) as f32 - 1.5)
            .collect();
        let r = 5;
        let mut st = vec![0.0; r * NSTATS];
        let mut sorted = vec![f32::NAN; r * k];
        let mut perm = vec![u32::MAX; r * k];
        cpu::stats(
            &x,
            k,
            TailLevels::default(),
            &[],
            &mut st,
            &mut [],
            Some(&mut sorted),
            Some(&mut perm),
        )
        .unwrap();
        for row in 0..r {
            let p = &perm[row * k..(row + 1) * k];
            let mut seen = vec![false; k];
            for &i in p {
                assert!(!seen[i as usize], "K={k}: index {i} twice");
                seen[i as usize] = true;
            }
            for i in 0..k {
                assert_eq!(sorted[row * k + i], x[row * k + p[i] as usize]);
                if i > 0 {
                    assert!(sorted[row * k + i - 1] <= sorted[row * k + i], "ascending");
                    if sorted[row * k + i - 1] == sorted[row * k + i] {
                        assert!(p[i - 1] < p[i], "K={k}: ties must keep index order");
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- loss

struct Brute {
    terms: [f64; NTERMS],
    dl: f64,
    dh: f64,
    dm: f64,
    min_gap: f64,
}

/// Terms by a direct computation (brute-force sort, pairwise variances).
fn bf_terms(p: &[f64], t: &[f64], klo: usize, khi: usize) -> Brute {
    let k = p.len();
    let sp: Vec<f64> = bf_perm(p).iter().map(|&i| p[i]).collect();
    let st: Vec<f64> = bf_perm(t).iter().map(|&i| t[i]).collect();
    let dc = bf_mean(&sp[..klo]) - bf_mean(&st[..klo]);
    let dg = bf_mean(&sp[k - khi..]) - bf_mean(&st[k - khi..]);
    let dl = bf_var(&sp[..klo]) - bf_var(&st[..klo]);
    let dh = bf_var(&st[k - khi..]) - bf_var(&sp[k - khi..]);
    let dm = bf_mean(t) - bf_mean(p);
    let min_gap = sp
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(f64::INFINITY, f64::min);
    Brute {
        terms: [dc * dc, dg * dg, dl.max(0.0) + dh.max(0.0), dm.max(0.0)],
        dl,
        dh,
        dm,
        min_gap,
    }
}

const W: RiskLossWeights = RiskLossWeights {
    cvar: 0.9,
    gain: 1.1,
    shape: 1.3,
    mean_shift: 0.7,
};

/// One row of pred/target, far from relu kinks (|d| > margin unless d is exactly 0 because a
/// tail has one sample) and without near-ties in pred (so ±h does not reorder).
fn loss_row(
    rng: &mut Rng,
    k: usize,
    klo: usize,
    khi: usize,
    variant: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (scale, shift) = [(1.8, 0.4), (0.5, -0.4), (1.8, -0.4), (0.5, 0.4)][variant % 4];
    for _ in 0..10_000 {
        let t: Vec<f64> = (0..k).map(|_| rng.normal()).collect();
        let p: Vec<f64> = (0..k).map(|_| rng.normal() * scale + shift).collect();
        let b = bf_terms(&p, &t, klo, khi);
        let far = |d: f64| d == 0.0 || d.abs() > 1e-3;
        if far(b.dl) && far(b.dh) && far(b.dm) && b.min_gap > 1e-4 {
            return (p, t);
        }
    }
    panic!("no row far from the relu kinks after 10000 tries (K={k}, tails {klo}/{khi})");
}

#[test]
fn loss_gradient_matches_finite_differences() {
    let mut rng = Rng::fresh("loss_gradient_matches_finite_differences");
    let mut active = [0usize; 3]; // rows with dl > 0, dh > 0, dm > 0
    for &k in &[1usize, 2, 3, 4, 7, 16, 33, 64] {
        for &(a, b) in &[(0.1f32, 0.1f32), (0.25, 0.4), (0.6, 0.7), (1.0, 1.0)] {
            let levels = lv(a, b);
            let (klo, khi) = levels.counts(k);
            let r = 4;
            let (mut pred, mut target) = (Vec::new(), Vec::new());
            for v in 0..r {
                let (p, t) = loss_row(&mut rng, k, klo, khi, v);
                let bt = bf_terms(&p, &t, klo, khi);
                active[0] += (bt.dl > 0.0) as usize;
                active[1] += (bt.dh > 0.0) as usize;
                active[2] += (bt.dm > 0.0) as usize;
                pred.extend(p);
                target.extend(t);
            }
            let scale: Vec<f64> = (0..r).map(|_| rng.range(0.5, 1.5)).collect();
            let total = |p: &[f64]| {
                let mut terms = vec![0.0; r * NTERMS];
                let mut g = vec![0.0; r * k];
                cpu::loss(p, &target, k, levels, &W, &scale, &mut terms, &mut g).unwrap()
            };
            let mut terms = vec![0.0; r * NTERMS];
            let mut grad = vec![0.0; r * k];
            cpu::loss(&pred, &target, k, levels, &W, &scale, &mut terms, &mut grad).unwrap();
            let h = 1e-6;
            for j in 0..r * k {
                let mut pp = pred.clone();
                pp[j] += h;
                let up = total(&pp);
                pp[j] -= 2.0 * h;
                let down = total(&pp);
                let fd = (up - down) / (2.0 * h);
                assert!(
                    (fd - grad[j]).abs() <= 1e-6 * (1.0 + grad[j].abs()),
                    "K={k} {a}/{b} element {j}: analytic {} finite difference {fd}",
                    grad[j]
                );
            }
        }
    }
    assert!(
        active.iter().all(|&n| n > 0),
        "every relu branch must be exercised: {active:?}"
    );
}

#[test]
fn loss_terms_and_total_match_direct_formulas() {
    let mut rng = Rng::fresh("loss_terms_and_total_match_direct_formulas");
    for &k in KS {
        for &(a, b) in LEVELS {
            let levels = lv(a, b);
            let (klo, khi) = levels.counts(k);
            let r = 4;
            // Ties included: terms do not depend on how ties are ordered.
            let pred = make_rows(&mut rng, r, k);
            let target: Vec<f64> = make_rows(&mut rng, r, k).iter().map(|v| v * 0.8).collect();
            let scale: Vec<f64> = (0..r).map(|_| rng.range(-0.5, 2.0)).collect();
            let mut terms = vec![f64::NAN; r * NTERMS];
            let mut grad = vec![0.0; r * k];
            let total =
                cpu::loss(&pred, &target, k, levels, &W, &scale, &mut terms, &mut grad).unwrap();
            let mut want_total = 0.0;
            for row in 0..r {
                let bt = bf_terms(
                    &pred[row * k..(row + 1) * k],
                    &target[row * k..(row + 1) * k],
                    klo,
                    khi,
                );
                for t in 0..NTERMS {
                    close(
                        &format!("K={k} {a}/{b} row {row} term {t}"),
                        terms[row * NTERMS + t],
                        bt.terms[t],
                        1e-9,
                    );
                }
                let w = [W.cvar, W.gain, W.shape, W.mean_shift];
                want_total +=
                    scale[row] * (0..NTERMS).map(|t| w[t] as f64 * bt.terms[t]).sum::<f64>();
            }
            close(&format!("K={k} total"), total, want_total, 1e-9);
        }
    }
}

#[test]
fn loss_grad_accumulates_and_scales_with_row_scale() {
    let mut rng = Rng::fresh("loss_grad_accumulates_and_scales_with_row_scale");
    let (k, r) = (33, 5);
    let levels = lv(0.2, 0.3);
    let pred = make_rows(&mut rng, r, k);
    let target: Vec<f64> = (0..r * k).map(|_| rng.normal()).collect();
    let ones = vec![1.0; r];
    let run = |scale: &[f64], grad: &mut [f64]| {
        let mut terms = vec![0.0; r * NTERMS];
        let total = cpu::loss(&pred, &target, k, levels, &W, scale, &mut terms, grad).unwrap();
        (total, terms)
    };
    let mut g1 = vec![0.0; r * k];
    let (t1, terms1) = run(&ones, &mut g1);
    assert!(g1.iter().any(|&g| g != 0.0));

    // += semantics on a non-zero buffer.
    let init: Vec<f64> = (0..r * k).map(|_| rng.normal()).collect();
    let mut g2 = init.clone();
    run(&ones, &mut g2);
    for i in 0..r * k {
        close(
            &format!("accumulated grad[{i}]"),
            g2[i],
            init[i] + g1[i],
            1e-14,
        );
    }

    // Per-row scale: grad and total scale, terms do not; a zero scale leaves the row alone.
    let scale: Vec<f64> = (0..r).map(|row| [2.5, 0.0, -1.0, 0.25, 1.0][row]).collect();
    let mut g3 = vec![0.0; r * k];
    let (t3, terms3) = run(&scale, &mut g3);
    assert_eq!(terms1, terms3);
    let mut want_total = 0.0;
    for row in 0..r {
        let w = [W.cvar, W.gain, W.shape, W.mean_shift];
        want_total += scale[row]
            * (0..NTERMS)
                .map(|t| w[t] as f64 * terms1[row * NTERMS + t])
                .sum::<f64>();
        for j in 0..k {
            let i = row * k + j;
            close(
                &format!("scaled grad[{i}]"),
                g3[i],
                scale[row] * g1[i],
                1e-14,
            );
        }
    }
    close("scaled total", t3, want_total, 1e-12);
    assert!(t1 > 0.0);
}

#[test]
fn loss_is_flat_when_pred_equals_target() {
    let mut rng = Rng::fresh("loss_is_flat_when_pred_equals_target");
    for &k in KS {
        let x = make_rows(&mut rng, 4, k);
        let scale = vec![1.0; 4];
        let w = RiskLossWeights {
            mean_shift: 1.0,
            ..Default::default()
        };
        let mut terms = vec![f64::NAN; 4 * NTERMS];
        let mut grad = vec![0.0; 4 * k];
        let total = cpu::loss(
            &x,
            &x,
            k,
            TailLevels::default(),
            &w,
            &scale,
            &mut terms,
            &mut grad,
        )
        .unwrap();
        assert_eq!(total, 0.0);
        assert!(terms.iter().all(|&t| t == 0.0), "K={k}: {terms:?}");
        // Every relu sits at its kink (argument exactly 0): subgradient 0.
        assert!(grad.iter().all(|&g| g == 0.0), "K={k}");
    }
}

#[test]
fn loss_relu_kinks_take_subgradient_zero() {
    // K = 8, α = β = 0.25: tails of 2. pred = target ± ½ has exactly equal tail variances
    // (dl = dh = 0: no shape gradient), CVaR/upper-tail differences ±½, mean difference ∓½.
    let target: Vec<f64> = vec![5.0, 1.0, 8.0, 3.0, 2.0, 7.0, 4.0, 6.0];
    let levels = lv(0.25, 0.25);
    let w = RiskLossWeights {
        cvar: 1.0,
        gain: 1.0,
        shape: 1.0,
        mean_shift: 1.0,
    };
    for shift in [0.5, -0.5] {
        let pred: Vec<f64> = target.iter().map(|t| t + shift).collect();
        let mut terms = vec![f64::NAN; NTERMS];
        let mut grad = vec![0.0; 8];
        cpu::loss(&pred, &target, 8, levels, &w, &[1.0], &mut terms, &mut grad).unwrap();
        assert_eq!(terms[Term::Shape as usize], 0.0);
        assert_eq!(terms[Term::Cvar as usize], 0.25);
        assert_eq!(terms[Term::Gain as usize], 0.25);
        let mean_active = shift < 0.0;
        assert_eq!(
            terms[Term::MeanShift as usize],
            if mean_active { 0.5 } else { 0.0 }
        );
        for (j, &t) in target.iter().enumerate() {
            // 2·(±½)/2 = ±½ on each tail sample, −1/K everywhere when the mean relu is active.
            let tail = if t <= 2.0 || t >= 7.0 { shift } else { 0.0 };
            let want = tail - if mean_active { 1.0 / 8.0 } else { 0.0 };
            assert_eq!(grad[j], want, "shift {shift} element {j}");
        }
    }
}

#[test]
fn loss_gradient_lands_on_unsorted_positions() {
    // With only the CVaR term, dL/dpred is 2(CVaR_p − CVaR_t)/k_α on pred's k_α smallest
    // elements (wherever they sit in the row) and 0 elsewhere.
    let mut rng = Rng::fresh("loss_gradient_lands_on_unsorted_positions");
    let k = 50;
    let levels = lv(0.1, 0.1);
    let pred: Vec<f64> = (0..k).map(|_| rng.normal()).collect();
    let target: Vec<f64> = (0..k).map(|_| rng.normal() + 0.3).collect();
    let w = RiskLossWeights {
        cvar: 1.0,
        gain: 0.0,
        shape: 0.0,
        mean_shift: 0.0,
    };
    let mut terms = vec![0.0; NTERMS];
    let mut grad = vec![0.0; k];
    cpu::loss(&pred, &target, k, levels, &w, &[1.0], &mut terms, &mut grad).unwrap();
    let p = bf_perm(&pred);
    let st: Vec<f64> = bf_perm(&target).iter().map(|&i| target[i]).collect();
    let dc = bf_mean(&p[..5].iter().map(|&i| pred[i]).collect::<Vec<_>>()) - bf_mean(&st[..5]);
    for (rank, &j) in p.iter().enumerate() {
        let want = if rank < 5 { 2.0 * dc / 5.0 } else { 0.0 };
        close(&format!("grad[{j}] (rank {rank})"), grad[j], want, 1e-12);
    }
}

#[test]
fn bad_inputs_are_errors() {
    let x = vec![0.5f32; 12];
    let mut st = vec![0.0f32; 3 * NSTATS];
    let mut qo = vec![0.0f32; 3];
    let lvd = TailLevels::default();
    let shape = |e: Error| matches!(e, Error::Shape(_));
    let invalid = |e: Error| matches!(e, Error::Invalid(_));
    let stats = |x: &[f32], k: usize, l: TailLevels, q: &[f32], st: &mut [f32], qo: &mut [f32]| {
        cpu::stats(x, k, l, q, st, qo, None, None)
    };
    assert!(stats(&x, 4, lvd, &[0.5], &mut st, &mut qo).is_ok());
    assert!(invalid(
        stats(&x, 0, lvd, &[], &mut st, &mut []).unwrap_err()
    ));
    let big = vec![0.0f32; MAX_K + 1];
    let mut st1 = vec![0.0f32; NSTATS];
    assert!(invalid(
        stats(&big, MAX_K + 1, lvd, &[], &mut st1, &mut []).unwrap_err()
    ));
    assert!(shape(stats(&x, 5, lvd, &[], &mut st, &mut []).unwrap_err()));
    assert!(shape(
        stats(&x, 4, lvd, &[0.5], &mut st[1..], &mut qo).unwrap_err()
    ));
    assert!(shape(
        stats(&x, 4, lvd, &[0.5], &mut st, &mut qo[1..]).unwrap_err()
    ));
    for (a, b) in [
        (0.0, 0.1),
        (1.5, 0.1),
        (f32::NAN, 0.1),
        (0.1, -0.2),
        (0.1, 0.0),
    ] {
        let e = stats(&x, 4, lv(a, b), &[], &mut st, &mut []).unwrap_err();
        assert!(invalid(e), "levels {a}/{b}");
    }
    for q in [-0.1f32, 1.5, f32::NAN] {
        assert!(
            invalid(stats(&x, 4, lvd, &[q], &mut st, &mut qo).unwrap_err()),
            "q {q}"
        );
    }
    let mut short = vec![0.0f32; 11];
    let e = cpu::stats(&x, 4, lvd, &[], &mut st, &mut [], Some(&mut short), None).unwrap_err();
    assert!(shape(e));
    let mut pshort = vec![0u32; 13];
    let e = cpu::stats(&x, 4, lvd, &[], &mut st, &mut [], None, Some(&mut pshort)).unwrap_err();
    assert!(shape(e));

    let w = RiskLossWeights::default();
    let sc = vec![1.0f32; 3];
    let mut terms = vec![0.0f32; 3 * NTERMS];
    let mut grad = vec![0.0f32; 12];
    let loss = |p: &[f32],
                t: &[f32],
                k: usize,
                l: TailLevels,
                w: &RiskLossWeights,
                sc: &[f32],
                terms: &mut [f32],
                grad: &mut [f32]| { cpu::loss(p, t, k, l, w, sc, terms, grad) };
    assert!(loss(&x, &x, 4, lvd, &w, &sc, &mut terms, &mut grad).is_ok());
    assert!(invalid(
        loss(&x, &x, 0, lvd, &w, &sc, &mut terms, &mut grad).unwrap_err()
    ));
    assert!(shape(
        loss(&x, &x[..8], 4, lvd, &w, &sc, &mut terms, &mut grad).unwrap_err()
    ));
    assert!(shape(
        loss(&x, &x, 4, lvd, &w, &sc[..2], &mut terms, &mut grad).unwrap_err()
    ));
    assert!(shape(
        loss(&x, &x, 4, lvd, &w, &sc, &mut terms[1..], &mut grad).unwrap_err()
    ));
    assert!(shape(
        loss(&x, &x, 4, lvd, &w, &sc, &mut terms, &mut grad[1..]).unwrap_err()
    ));
    assert!(shape(
        loss(&x, &x, 5, lvd, &w, &sc, &mut terms, &mut grad).unwrap_err()
    ));
    assert!(invalid(
        loss(&x, &x, 4, lv(0.0, 0.1), &w, &sc, &mut terms, &mut grad).unwrap_err()
    ));
    let wn = RiskLossWeights {
        gain: f32::NAN,
        ..w
    };
    assert!(invalid(
        loss(&x, &x, 4, lvd, &wn, &sc, &mut terms, &mut grad).unwrap_err()
    ));
    // Empty input (R = 0) is fine.
    assert_eq!(
        loss(&[], &[], 4, lvd, &w, &[], &mut [], &mut []).unwrap(),
        0.0
    );
}

/// Rows with a NaN or ±inf sample: every statistic, quantile, term and gradient of that row is
/// NaN (never a finite value computed without the sample), the other rows are exactly what they
/// are without it, and `sorted` / `perm` are the stable order with NaN last.
#[test]
fn non_finite_samples_propagate_nan() {
    let k = 6;
    let lvd = TailLevels::default();
    let qs = [0.1f32, 0.5, 0.9];
    let clean: Vec<f32> = (0..3 * k)
        .map(|i| ((i * 7) % 11) as f32 * 0.25 - 1.0)
        .collect();
    let run_stats = |x: &[f32]| {
        let mut st = vec![0.0f32; 3 * NSTATS];
        let mut qo = vec![0.0f32; 3 * qs.len()];
        let mut so = vec![0.0f32; 3 * k];
        let mut pe = vec![0u32; 3 * k];
        cpu::stats(
            x,
            k,
            lvd,
            &qs,
            &mut st,
            &mut qo,
            Some(&mut so),
            Some(&mut pe),
        )
        .unwrap();
        (st, qo, so, pe)
    };
    let (st0, qo0, _, _) = run_stats(&clean);
    for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = clean.clone();
        x[k + 2] = bad;
        x[k + 4] = if bad.is_nan() { f32::NAN } else { x[k + 4] };
        let (st, qo, so, pe) = run_stats(&x);
        for row in [0, 2] {
            assert_eq!(
                st[row * NSTATS..(row + 1) * NSTATS],
                st0[row * NSTATS..(row + 1) * NSTATS]
            );
            assert_eq!(qo[row * 3..row * 3 + 3], qo0[row * 3..row * 3 + 3]);
        }
        assert!(
            st[NSTATS..2 * NSTATS].iter().all(|v| v.is_nan()),
            "{bad}: {st:?}"
        );
        assert!(qo[3..6].iter().all(|v| v.is_nan()), "{bad}: {qo:?}");
        // The row's permutation: every index once, NaN (or the infinity) where the order puts it.
        let p = &pe[k..2 * k];
        let mut seen = p.to_vec();
        seen.sort();
        assert_eq!(seen, (0..k as u32).collect::<Vec<_>>(), "{bad}: perm {p:?}");
        for i in 0..k {
            let (got, want) = (so[k + i], x[k + p[i] as usize]);
            assert!(got == want || (got.is_nan() && want.is_nan()));
        }
        if bad.is_nan() {
            assert_eq!(&p[4..], &[2, 4], "{bad}: NaN last, ties by index: {p:?}");
        } else if bad > 0.0 {
            assert_eq!(p[5], 2);
        } else {
            assert_eq!(p[0], 2);
        }
    }

    // -0 sorts before +0 (IEEE total order), whatever their indices.
    let z = [0.0f32, -0.0, 1.0, -1.0];
    let mut pz = vec![0u32; 4];
    cpu::sort_perm(&z, &mut pz);
    assert_eq!(pz, [3, 1, 0, 2]);

    // The loss: a non-finite sample in pred (row 1) or target (row 2) makes that row's terms and
    // gradient NaN and the total NaN; row 0 is unaffected.
    let w = RiskLossWeights {
        mean_shift: 0.5,
        ..Default::default()
    };
    let target: Vec<f32> = clean.iter().map(|v| v * 0.5 + 0.1).collect();
    let sc = [1.0f32, 0.5, 0.0];
    let run_loss = |p: &[f32], t: &[f32]| {
        let mut terms = vec![0.0f32; 3 * NTERMS];
        let mut grad = vec![0.25f32; 3 * k];
        let total = cpu::loss(p, t, k, lvd, &w, &sc, &mut terms, &mut grad).unwrap();
        (total, terms, grad)
    };
    let (t0, terms0, grad0) = run_loss(&clean, &target);
    assert!(t0.is_finite());
    let (mut p, mut t) = (clean.clone(), target.clone());
    p[k + 1] = f32::NAN;
    t[2 * k + 5] = f32::NEG_INFINITY;
    let (total, terms, grad) = run_loss(&p, &t);
    assert!(total.is_nan());
    assert_eq!(terms[..NTERMS], terms0[..NTERMS]);
    assert_eq!(grad[..k], grad0[..k]);
    assert!(terms[NTERMS..].iter().all(|v| v.is_nan()), "{terms:?}");
    // Row 2 has row_scale 0: its gradient is still NaN, not 0 (0 · NaN is NaN).
    assert!(grad[k..].iter().all(|v| v.is_nan()), "{grad:?}");
}

#[test]
fn defaults_follow_the_method_doc() {
    assert_eq!(TailLevels::default(), lv(0.1, 0.1));
    let w = RiskLossWeights::default();
    assert_eq!(
        (w.cvar, w.gain, w.shape, w.mean_shift),
        (1.0, 1.0, 1.0, 0.0)
    );
    assert_eq!(NSTATS, 7);
    assert_eq!(NTERMS, 4);
    assert_eq!(Stat::Std as usize, 6);
    assert_eq!(Term::MeanShift as usize, 3);
}
