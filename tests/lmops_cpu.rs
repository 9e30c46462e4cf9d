//! CPU references of kernels/xent.cu, sample.cu and adamw.cu against independent truths:
//! log-softmax and entropy from their definitions, finite differences (f64) for every gradient,
//! brute-force ranks and prefix masses for the sampling filters, a chi-square test of the
//! sampler's empirical distribution, the AdamW update written out directly and numbers from
//! torch.optim.AdamW. Also: bad input gives errors, never panics.

mod common;

use common::{assert_close, assert_close_f64, Rng};
use dfpo::kernels::adamw::{self, AdamWParams};
use dfpo::kernels::sample::{self, SampleParams};
use dfpo::kernels::xent::{self, IGNORE_INDEX};
use dfpo::Error;

// =============================================================================================
// xent
// =============================================================================================

struct Fwd {
    lp: Vec<f64>,
    lse: Vec<f64>,
    ent: Vec<f64>,
}

fn fwd(z: &[f64], tg: &[u32], n: usize, v: usize, t: f32) -> Fwd {
    let mut f = Fwd {
        lp: vec![f64::NAN; n],
        lse: vec![f64::NAN; n],
        ent: vec![f64::NAN; n],
    };
    xent::cpu::forward(z, tg, n, v, t, &mut f.lp, &mut f.lse, &mut f.ent).unwrap();
    f
}

/// Random targets with every kind: 0, v − 1, ignored, random.
fn targets(rng: &mut Rng, n: usize, v: usize) -> Vec<u32> {
    (0..n)
        .map(|r| match r % 5 {
            0 => 0,
            1 => (v - 1) as u32,
            2 => IGNORE_INDEX,
            _ => (rng.next_u64() % v as u64) as u32,
        })
        .collect()
}

#[test]
fn xent_forward_matches_log_softmax_and_entropy_definitions() {
    let mut rng = Rng::fresh("xent_forward_matches_log_softmax_and_entropy_definitions");
    let (n, v) = (9, 13);
    for &t in &[1.0f32, 0.7, 2.5] {
        let z = rng.normal_vec_f64(n * v, 2.0);
        let tg = targets(&mut rng, n, v);
        let f = fwd(&z, &tg, n, v, t);
        for r in 0..n {
            // Direct definitions, no max shift (the logits are small).
            let s: Vec<f64> = z[r * v..(r + 1) * v]
                .iter()
                .map(|&x| x / t as f64)
                .collect();
            let zsum: f64 = s.iter().map(|x| x.exp()).sum();
            let p: Vec<f64> = s.iter().map(|x| x.exp() / zsum).collect();
            let ent: f64 = -p.iter().map(|&q| q * q.ln()).sum::<f64>();
            let lp = if tg[r] == IGNORE_INDEX {
                0.0
            } else {
                p[tg[r] as usize].ln()
            };
            assert!((f.lse[r] - zsum.ln()).abs() < 1e-12, "lse row {r} T={t}");
            assert!((f.ent[r] - ent).abs() < 1e-12, "entropy row {r} T={t}");
            assert!((f.lp[r] - lp).abs() < 1e-12, "logprob row {r} T={t}");
            assert!(f.ent[r] >= 0.0 && f.ent[r] <= (v as f64).ln() + 1e-12);
        }
    }
}

#[test]
fn xent_forward_is_stable_under_large_shifts() {
    let mut rng = Rng::fresh("xent_forward_is_stable_under_large_shifts");
    let (n, v, t) = (4, 50, 0.8f32);
    let z = rng.normal_vec_f64(n * v, 3.0);
    let tg = targets(&mut rng, n, v);
    let shifted: Vec<f64> = z.iter().map(|x| x + 1000.0).collect();
    let (a, b) = (fwd(&z, &tg, n, v, t), fwd(&shifted, &tg, n, v, t));
    for r in 0..n {
        assert!((b.lse[r] - a.lse[r] - 1000.0 / t as f64).abs() < 1e-9);
        assert!((b.lp[r] - a.lp[r]).abs() < 1e-9);
        assert!((b.ent[r] - a.ent[r]).abs() < 1e-9);
    }
    // A one-hot limit: entropy → 0, logprob of the spike → 0.
    let mut spike = vec![0.0f64; v];
    spike[7] = 200.0;
    let f = fwd(&spike, &[7], 1, v, 1.0);
    assert!(f.ent[0].abs() < 1e-70 && f.lp[0].abs() < 1e-70);
}

/// L(z) = Σ_r a_r·logprob_r + b_r·H_r, evaluated by the forward.
fn xent_loss(z: &[f64], tg: &[u32], n: usize, v: usize, t: f32, a: &[f64], b: &[f64]) -> f64 {
    let f = fwd(z, tg, n, v, t);
    (0..n).map(|r| a[r] * f.lp[r] + b[r] * f.ent[r]).sum()
}

#[test]
fn xent_backward_matches_finite_differences() {
    let mut rng = Rng::fresh("xent_backward_matches_finite_differences");
    let (n, v) = (6, 11);
    for &t in &[1.0f32, 0.6, 1.7] {
        for which in 0..3 {
            // 0: both upstream terms; 1: logprob only; 2: entropy only.
            let z = rng.normal_vec_f64(n * v, 1.5);
            let tg = targets(&mut rng, n, v);
            let a = if which == 2 {
                vec![0.0; n]
            } else {
                rng.normal_vec_f64(n, 1.0)
            };
            let b = if which == 1 {
                vec![0.0; n]
            } else {
                rng.normal_vec_f64(n, 1.0)
            };
            let f = fwd(&z, &tg, n, v, t);
            let init = rng.normal_vec_f64(n * v, 1.0);
            let mut d = init.clone();
            xent::cpu::backward(
                &z,
                &tg,
                n,
                v,
                t,
                &f.lse,
                &f.ent,
                (which != 2).then_some(&a[..]),
                (which != 1).then_some(&b[..]),
                &mut d,
            )
            .unwrap();
            let h = 1e-6;
            for i in 0..n * v {
                let mut zp = z.clone();
                zp[i] += h;
                let mut zm = z.clone();
                zm[i] -= h;
                let fd = (xent_loss(&zp, &tg, n, v, t, &a, &b)
                    - xent_loss(&zm, &tg, n, v, t, &a, &b))
                    / (2.0 * h);
                let got = d[i] - init[i];
                assert!(
                    (got - fd).abs() < 1e-7 * (1.0 + fd.abs()),
                    "T={t} case {which} element {i}: backward {got} vs finite difference {fd}"
                );
            }
        }
    }
}

#[test]
fn xent_ignored_rows_and_zero_upstream_leave_gradients_alone() {
    let mut rng = Rng::fresh("xent_ignored_rows_and_zero_upstream_leave_gradients_alone");
    let (n, v) = (3, 9);
    let z = rng.normal_vec_f64(n * v, 1.0);
    let tg = vec![IGNORE_INDEX, 4, 2];
    let f = fwd(&z, &tg, n, v, 1.0);
    assert_eq!(f.lp[0], 0.0);
    let init = rng.normal_vec_f64(n * v, 1.0);
    let mut d = init.clone();
    // Row 0: logprob gradient only, but ignored; row 1: both zero; row 2: live.
    let a = vec![3.0, 0.0, 1.0];
    let b = vec![0.0, 0.0, 0.0];
    xent::cpu::backward(
        &z,
        &tg,
        n,
        v,
        1.0,
        &f.lse,
        &f.ent,
        Some(&a),
        Some(&b),
        &mut d,
    )
    .unwrap();
    assert_eq!(
        &d[..2 * v],
        &init[..2 * v],
        "rows 0 and 1 must be untouched"
    );
    assert!(d[2 * v..].iter().zip(&init[2 * v..]).any(|(x, y)| x != y));
    // The live row's gradient sums to zero (softmax gradients are shift-invariant).
    let s: f64 = (2 * v..3 * v).map(|i| d[i] - init[i]).sum();
    assert!(s.abs() < 1e-12);
}

/// A row whose every logit is -inf (everything masked) is defined, not an error and not NaN
/// entropy: lse -inf, entropy 0, logprob NaN for a real target and 0 when ignored, and no
/// gradient even with upstream gradients; the other rows are unaffected.
#[test]
fn xent_all_masked_row_is_defined() {
    let mut rng = Rng::fresh("xent_all_masked_row_is_defined");
    let (n, v) = (4, 7);
    let mut z = rng.normal_vec_f64(n * v, 1.0);
    z[v..2 * v].fill(f64::NEG_INFINITY);
    z[3 * v..].fill(f64::NEG_INFINITY);
    let tg = vec![2, 5, 0, IGNORE_INDEX];
    for t in [1.0f32, 0.5] {
        let f = fwd(&z, &tg, n, v, t);
        let clean = fwd(&z[..v], &tg[..1], 1, v, t);
        assert_eq!(
            (f.lp[0], f.lse[0], f.ent[0]),
            (clean.lp[0], clean.lse[0], clean.ent[0])
        );
        for r in [1, 3] {
            assert_eq!(f.lse[r], f64::NEG_INFINITY, "T={t} row {r}");
            assert_eq!(f.ent[r], 0.0, "T={t} row {r}: entropy");
        }
        assert!(
            f.lp[1].is_nan(),
            "a real target of an all -inf row: {}",
            f.lp[1]
        );
        assert_eq!(f.lp[3], 0.0, "an ignored target");
        let init = rng.normal_vec_f64(n * v, 1.0);
        let mut d = init.clone();
        let ones = vec![1.0; n];
        xent::cpu::backward(
            &z,
            &tg,
            n,
            v,
            t,
            &f.lse,
            &f.ent,
            Some(&ones),
            Some(&ones),
            &mut d,
        )
        .unwrap();
        assert_eq!(&d[v..2 * v], &init[v..2 * v], "T={t}: row 1 untouched");
        assert_eq!(&d[3 * v..], &init[3 * v..], "T={t}: row 3 untouched");
        assert!(d[..v]
            .iter()
            .zip(&init)
            .all(|(a, b)| a.is_finite() && a != b));
    }
}

#[test]
fn xent_masked_logits_act_as_removed_tokens() {
    let mut rng = Rng::fresh("xent_masked_logits_act_as_removed_tokens");
    let v = 12;
    let z = rng.normal_vec_f64(v, 1.0);
    let masked = [0usize, 5, 11];
    let mut zm = z.clone();
    for &j in &masked {
        zm[j] = f64::NEG_INFINITY;
    }
    let kept: Vec<f64> = (0..v)
        .filter(|j| !masked.contains(j))
        .map(|j| z[j])
        .collect();
    let t = 0.9f32;
    let full = fwd(&zm, &[3], 1, v, t);
    // Target 3 is index 2 among the kept tokens (0 is masked).
    let small = fwd(&kept, &[2], 1, v - masked.len(), t);
    assert!((full.lse[0] - small.lse[0]).abs() < 1e-12);
    assert!((full.ent[0] - small.ent[0]).abs() < 1e-12);
    assert!((full.lp[0] - small.lp[0]).abs() < 1e-12);
    let mut d = vec![0.0; v];
    xent::cpu::backward(
        &zm,
        &[3],
        1,
        v,
        t,
        &full.lse,
        &full.ent,
        Some(&[1.0]),
        Some(&[0.5]),
        &mut d,
    )
    .unwrap();
    for &j in &masked {
        assert_eq!(d[j], 0.0, "masked token {j} gets no gradient");
    }
    assert!(d.iter().all(|x| x.is_finite()));
}

#[test]
fn xent_f32_reference_agrees_with_f64() {
    let mut rng = Rng::fresh("xent_f32_reference_agrees_with_f64");
    let (n, v, t) = (5, 1000, 1.3f32);
    let z = rng.normal_vec(n * v, 3.0);
    let z64: Vec<f64> = z.iter().map(|&x| x as f64).collect();
    let tg = targets(&mut rng, n, v);
    let (mut lp, mut lse, mut ent) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    xent::cpu::forward(&z, &tg, n, v, t, &mut lp, &mut lse, &mut ent).unwrap();
    let f = fwd(&z64, &tg, n, v, t);
    let c = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<_>>();
    assert_close("lse f32", &lse, &c(&f.lse), 1e-5, 1e-5);
    assert_close("logprob f32", &lp, &c(&f.lp), 1e-5, 1e-5);
    assert_close("entropy f32", &ent, &c(&f.ent), 1e-5, 1e-5);
}

#[test]
fn xent_rejects_bad_input() {
    let (n, v) = (2, 4);
    let z = vec![0.5f64; n * v];
    let tg = vec![1u32, 2];
    let (mut a, mut b, mut c) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let mut run = |z: &[f64], tg: &[u32], v: usize, t: f32| {
        xent::cpu::forward(z, tg, n, v, t, &mut a, &mut b, &mut c)
    };
    assert!(matches!(run(&z[1..], &tg, v, 1.0), Err(Error::Shape(_))));
    assert!(matches!(run(&z, &tg[1..], v, 1.0), Err(Error::Shape(_))));
    for t in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(
            matches!(run(&z, &tg, v, t), Err(Error::Invalid(_))),
            "T={t}"
        );
    }
    assert!(matches!(run(&z, &[1, 4], v, 1.0), Err(Error::Invalid(_))));
    assert!(matches!(run(&z, &tg, 0, 1.0), Err(Error::Invalid(_))));
    for bad in [f64::NAN, f64::INFINITY] {
        let mut zb = z.clone();
        zb[5] = bad;
        let e = run(&zb, &tg, v, 1.0);
        assert!(
            matches!(e, Err(Error::Invalid(ref m)) if m.contains("[1][1]")),
            "{e:?}"
        );
    }
    // Backward: lengths of the optional upstream gradients.
    let mut d = vec![0.0; n * v];
    let e = xent::cpu::backward(
        &z,
        &tg,
        n,
        v,
        1.0,
        &[0.0; 2],
        &[0.0; 2],
        Some(&[1.0]),
        None,
        &mut d,
    );
    assert!(matches!(e, Err(Error::Shape(_))));
    let e = xent::cpu::backward(
        &z,
        &tg,
        n,
        v,
        1.0,
        &[0.0; 2],
        &[0.0; 2],
        None,
        None,
        &mut d[1..],
    );
    assert!(matches!(e, Err(Error::Shape(_))));
}

// =============================================================================================
// sample
// =============================================================================================

struct Drawn {
    tok: Vec<u32>,
    lps: Vec<f64>,
    lpp: Vec<f64>,
    nk: Vec<u32>,
}

fn draw(z: &[f64], n: usize, v: usize, p: &SampleParams, seed: u64, counter: u64) -> Drawn {
    let mut d = Drawn {
        tok: vec![u32::MAX; n],
        lps: vec![f64::NAN; n],
        lpp: vec![f64::NAN; n],
        nk: vec![u32::MAX; n],
    };
    sample::cpu::sample(
        z,
        n,
        v,
        p,
        seed,
        counter,
        &mut d.tok,
        &mut d.lps,
        &mut d.lpp,
        Some(&mut d.nk),
    )
    .unwrap();
    d
}

/// Brute-force rank of every token: #{strictly larger} + #{equal with a lower id}.
fn ranks(row: &[f64]) -> Vec<usize> {
    (0..row.len())
        .map(|j| {
            (0..row.len())
                .filter(|&i| row[i] > row[j] || (row[i] == row[j] && i < j))
                .count()
        })
        .collect()
}

fn log_softmax(row: &[f64], t: f64) -> Vec<f64> {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let l = m / t + row.iter().map(|&x| ((x - m) / t).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x / t - l).collect()
}

/// Logits drawn from a few values, so ties are everywhere (as with bf16 logits).
fn tied_logits(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| (rng.next_u64() % 7) as f64 * 0.75 - 2.0)
        .collect()
}

#[test]
fn sample_greedy_is_argmax_with_ties_to_lowest_id() {
    let mut rng = Rng::fresh("sample_greedy_is_argmax_with_ties_to_lowest_id");
    let (n, v) = (40, 23);
    let z = tied_logits(&mut rng, n * v);
    // Top-k / top-p are ignored by greedy.
    let p = SampleParams {
        temperature: 0.0,
        top_k: 3,
        top_p: 0.5,
    };
    let d = draw(&z, n, v, &p, 1, 0);
    for r in 0..n {
        let row = &z[r * v..(r + 1) * v];
        let rk = ranks(row);
        let want = rk.iter().position(|&x| x == 0).unwrap() as u32;
        assert_eq!(d.tok[r], want, "row {r}");
        assert_eq!(d.lps[r], 0.0);
        assert_eq!(d.nk[r], 1);
        let ls = log_softmax(row, 1.0);
        assert!((d.lpp[r] - ls[want as usize]).abs() < 1e-12);
    }
}

#[test]
fn sample_top_k_keeps_exactly_k_with_ties_by_id() {
    let mut rng = Rng::fresh("sample_top_k_keeps_exactly_k_with_ties_by_id");
    let v = 31;
    for trial in 0..20 {
        let row = if trial % 2 == 0 {
            tied_logits(&mut rng, v)
        } else {
            rng.normal_vec_f64(v, 2.0)
        };
        let rk = ranks(&row);
        for k in [1u32, 2, 5, 17, 30] {
            let p = SampleParams {
                temperature: 0.9,
                top_k: k,
                top_p: 1.0,
            };
            let dist = sample::cpu::filtered_distribution(&row, &p).unwrap();
            let mut got: Vec<u32> = dist.iter().map(|x| x.0).collect();
            got.sort();
            let want: Vec<u32> = (0..v as u32)
                .filter(|&j| rk[j as usize] < k as usize)
                .collect();
            assert_eq!(got, want, "trial {trial} k={k}");
            let d = draw(&row, 1, v, &p, 7, trial);
            assert_eq!(d.nk[0], k);
            assert!(want.contains(&d.tok[0]));
        }
        // k = 0 and k >= V disable the filter.
        for k in [0u32, v as u32, 1000] {
            let p = SampleParams {
                temperature: 1.0,
                top_k: k,
                top_p: 1.0,
            };
            assert_eq!(
                sample::cpu::filtered_distribution(&row, &p).unwrap().len(),
                v
            );
            assert_eq!(draw(&row, 1, v, &p, 7, 0).nk[0], v as u32);
        }
    }
}

/// Brute force: the smallest L such that the L best tokens (by rank) among the top-k hold at
/// least p of the top-k mass at temperature t.
fn brute_top_p_len(row: &[f64], t: f64, k: usize, p: f64) -> usize {
    let rk = ranks(row);
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w = |j: usize| ((row[j] - m) / t).exp();
    let total: f64 = (0..row.len()).filter(|&j| rk[j] < k).map(w).sum();
    (1..=k)
        .find(|&l| (0..row.len()).filter(|&j| rk[j] < l).map(w).sum::<f64>() >= p * total)
        .unwrap()
}

#[test]
fn sample_top_p_keeps_the_smallest_prefix_reaching_p() {
    let mut rng = Rng::fresh("sample_top_p_keeps_the_smallest_prefix_reaching_p");
    let v = 29;
    for trial in 0..30 {
        let row = if trial % 3 == 0 {
            tied_logits(&mut rng, v)
        } else {
            rng.normal_vec_f64(v, 1.5)
        };
        let rk = ranks(&row);
        for (k, pp) in [(0u32, 0.3f32), (0, 0.9), (8, 0.5), (12, 0.95), (0, 0.999)] {
            let t = 0.8;
            let p = SampleParams {
                temperature: t,
                top_k: k,
                top_p: pp,
            };
            let kk = if k == 0 { v } else { k as usize };
            let len = brute_top_p_len(&row, t as f64, kk, pp as f64);
            let dist = sample::cpu::filtered_distribution(&row, &p).unwrap();
            assert_eq!(dist.len(), len, "trial {trial} k={k} p={pp}");
            for &(j, _) in &dist {
                assert!(
                    rk[j as usize] < len,
                    "token {j} of rank {} kept",
                    rk[j as usize]
                );
            }
            let s: f64 = dist.iter().map(|x| x.1).sum();
            assert!((s - 1.0).abs() < 1e-12);
        }
    }
    // Edges: a tiny p keeps only the best token; p = 1 keeps everything.
    let row = rng.normal_vec_f64(v, 1.0);
    let tiny = SampleParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1e-6,
    };
    assert_eq!(
        sample::cpu::filtered_distribution(&row, &tiny)
            .unwrap()
            .len(),
        1
    );
    let one = SampleParams { top_p: 1.0, ..tiny };
    assert_eq!(
        sample::cpu::filtered_distribution(&row, &one)
            .unwrap()
            .len(),
        v
    );
    // A tie split by the boundary keeps the lower id: ids 1 and 3 tie for the top; p = 0.4 of
    // two equal halves needs one of them.
    let tie = [0.0, 5.0, -1e9, 5.0];
    let p = SampleParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 0.4,
    };
    let dist = sample::cpu::filtered_distribution(&tie, &p).unwrap();
    assert_eq!(dist.len(), 1);
    assert_eq!(dist[0].0, 1);
    // Exactly reaching p counts: four equal weights with p = 0.5 keep two tokens (all exact).
    let flat = [0.25, 0.25, 0.25, 0.25];
    let p = SampleParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 0.5,
    };
    assert_eq!(
        sample::cpu::filtered_distribution(&flat, &p).unwrap().len(),
        2
    );
}

#[test]
fn sample_logprobs_are_logs_of_the_renormalised_probabilities() {
    let mut rng = Rng::fresh("sample_logprobs_are_logs_of_the_renormalised_probabilities");
    let (n, v) = (50, 40);
    let z = rng.normal_vec_f64(n * v, 2.0);
    for p in [
        SampleParams::default(),
        SampleParams {
            temperature: 0.7,
            top_k: 10,
            top_p: 1.0,
        },
        SampleParams {
            temperature: 1.4,
            top_k: 0,
            top_p: 0.8,
        },
        SampleParams {
            temperature: 0.5,
            top_k: 20,
            top_p: 0.9,
        },
    ] {
        let d = draw(&z, n, v, &p, 99, 1234);
        for r in 0..n {
            let row = &z[r * v..(r + 1) * v];
            let dist = sample::cpu::filtered_distribution(row, &p).unwrap();
            let q = dist
                .iter()
                .find(|x| x.0 == d.tok[r])
                .expect("drawn token is kept")
                .1;
            assert!((d.lps[r] - q.ln()).abs() < 1e-12, "{p:?} row {r}");
            assert_eq!(d.nk[r] as usize, dist.len());
            let ls = log_softmax(row, 1.0);
            assert!((d.lpp[r] - ls[d.tok[r] as usize]).abs() < 1e-12);
        }
    }
}

/// Σ (observed − expected)² / expected over the kept tokens; panics if a token outside the
/// kept set was drawn.
fn chi_square(tokens: &[u32], dist: &[(u32, f64)], v: usize) -> f64 {
    let mut counts = vec![0usize; v];
    for &t in tokens {
        counts[t as usize] += 1;
    }
    let n = tokens.len() as f64;
    let mut chi = 0.0;
    for (j, &c) in counts.iter().enumerate() {
        match dist.iter().find(|x| x.0 == j as u32) {
            Some(&(_, q)) => {
                let e = q * n;
                chi += (c as f64 - e).powi(2) / e;
            }
            None => assert_eq!(c, 0, "token {j} is filtered out but was drawn"),
        }
    }
    chi
}

#[test]
fn sample_empirical_distribution_matches_the_filtered_distribution() {
    // Deterministic seeds: the bound is about 6 standard deviations of the chi-square law, so
    // a correct sampler passes with certainty for these seeds and a wrong one fails.
    let v = 10;
    let row: Vec<f64> = (0..v).map(|j| ((j * 7 % 10) as f64) * 0.35 - 1.0).collect();
    let draws = 40_000;
    let z: Vec<f64> = (0..draws).flat_map(|_| row.iter().cloned()).collect();
    let cases = [
        SampleParams::default(),
        SampleParams {
            temperature: 0.5,
            top_k: 5,
            top_p: 1.0,
        },
        SampleParams {
            temperature: 1.3,
            top_k: 0,
            top_p: 0.8,
        },
        SampleParams {
            temperature: 0.8,
            top_k: 6,
            top_p: 0.9,
        },
    ];
    for (ci, p) in cases.iter().enumerate() {
        let d = draw(&z, draws, v, p, 0xC0FFEE + ci as u64, 17);
        let dist = sample::cpu::filtered_distribution(&row, p).unwrap();
        let df = (dist.len() - 1) as f64;
        let bound = df + 6.0 * (2.0 * df).sqrt() + 6.0;
        let chi = chi_square(&d.tok, &dist, v);
        assert!(chi < bound, "{p:?}: chi-square {chi:.1} >= {bound:.1}");
        // Power: the unfiltered temperature-1 policy must be rejected by the same counts.
        if *p != SampleParams::default() {
            let plain = sample::cpu::filtered_distribution(&row, &SampleParams::default()).unwrap();
            let mut counts = vec![0f64; v];
            for &t in &d.tok {
                counts[t as usize] += 1.0;
            }
            let chi_wrong: f64 = plain
                .iter()
                .map(|&(j, q)| (counts[j as usize] - q * draws as f64).powi(2) / (q * draws as f64))
                .sum();
            assert!(
                chi_wrong > 10.0 * bound,
                "{p:?}: the test cannot tell distributions apart"
            );
        }
    }
}

#[test]
fn sample_temperature_scales_the_distribution() {
    let mut rng = Rng::fresh("sample_temperature_scales_the_distribution");
    let v = 16;
    let row = rng.normal_vec_f64(v, 1.0);
    for t in [0.25f32, 1.0, 3.0] {
        let p = SampleParams {
            temperature: t,
            ..Default::default()
        };
        let dist = sample::cpu::filtered_distribution(&row, &p).unwrap();
        let ls = log_softmax(&row, t as f64);
        for &(j, q) in &dist {
            assert!((q.ln() - ls[j as usize]).abs() < 1e-12);
        }
        let d = draw(&row, 1, v, &p, 5, 9);
        assert!((d.lps[0] - ls[d.tok[0] as usize]).abs() < 1e-12);
    }
    // A very low temperature draws the argmax every time when it leads by a clear margin.
    let mut row = rng.normal_vec_f64(v, 1.0);
    row[11] = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max) + 1.0;
    let n = 500;
    let z: Vec<f64> = (0..n).flat_map(|_| row.iter().cloned()).collect();
    let p = SampleParams {
        temperature: 0.01,
        ..Default::default()
    };
    let d = draw(&z, n, v, &p, 3, 0);
    assert!(d.tok.iter().all(|&t| t == 11));
}

#[test]
fn sample_draws_are_reproducible_and_use_the_row_streams() {
    let mut rng = Rng::fresh("sample_draws_are_reproducible_and_use_the_row_streams");
    let (n, v) = (8, 64);
    let z = rng.normal_vec_f64(n * v, 0.5);
    let p = SampleParams::default();
    let a = draw(&z, n, v, &p, 42, 100);
    let b = draw(&z, n, v, &p, 42, 100);
    assert_eq!(a.tok, b.tok);
    // Row r of a call with counter c draws like row 0 of a call with counter c + r.
    for r in 0..n {
        let one = draw(&z[r * v..(r + 1) * v], 1, v, &p, 42, 100 + r as u64);
        assert_eq!(one.tok[0], a.tok[r]);
    }
    // The race picks the argmax of its scores, recomputed here from uniform_open.
    for r in 0..n {
        let row = &z[r * v..(r + 1) * v];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let best = (0..v)
            .map(|j| {
                let u = dfpo::kernels::uniform_open(42, sample::element_counter(100, r, v, j));
                (j, row[j] - m - (-u.ln()).ln())
            })
            .fold((0, f64::NEG_INFINITY), |b, x| if x.1 > b.1 { x } else { b });
        assert_eq!(a.tok[r] as usize, best.0);
    }
    // Different counters give different draws (the logits are flat enough).
    let c = draw(&z, n, v, &p, 42, 100 + n as u64);
    assert_ne!(a.tok, c.tok);
}

/// Rows that cannot be sampled (a NaN or +inf logit, every logit -inf) get token 0, NaN
/// log-probs and n_kept 0, every other row is sampled as if they were not there, and the call
/// returns an error naming the first of them (as `unsampled_rows` does from the flags).
#[test]
fn sample_unsampleable_rows_are_flagged() {
    let mut rng = Rng::fresh("sample_unsampleable_rows_are_flagged");
    let (n, v) = (6, 9);
    let good = rng.normal_vec_f64(n * v, 1.0);
    let mut z = good.clone();
    z[v..2 * v].fill(f64::NAN);
    z[2 * v + 4] = f64::INFINITY;
    z[4 * v..5 * v].fill(f64::NEG_INFINITY);
    let bad_rows = [1, 2, 4];
    for p in [
        SampleParams::greedy(),
        SampleParams::default(),
        SampleParams {
            top_k: 3,
            top_p: 0.8,
            temperature: 0.7,
        },
    ] {
        let want = draw(&good, n, v, &p, 5, 11);
        let mut d = Drawn {
            tok: vec![u32::MAX; n],
            lps: vec![0.5; n],
            lpp: vec![0.5; n],
            nk: vec![u32::MAX; n],
        };
        let e = sample::cpu::sample(
            &z,
            n,
            v,
            &p,
            5,
            11,
            &mut d.tok,
            &mut d.lps,
            &mut d.lpp,
            Some(&mut d.nk),
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::Invalid(ref m) if m.contains("row 1")),
            "{e:?}"
        );
        let e = sample::unsampled_rows(&d.nk).unwrap_err();
        assert!(
            e.to_string().contains("row 1") && e.to_string().contains("3 row(s)"),
            "{e}"
        );
        for r in 0..n {
            if bad_rows.contains(&r) {
                assert_eq!((d.tok[r], d.nk[r]), (0, 0), "{p:?} row {r}");
                assert!(d.lps[r].is_nan() && d.lpp[r].is_nan(), "{p:?} row {r}");
            } else {
                assert_eq!(
                    (d.tok[r], d.lps[r], d.lpp[r], d.nk[r]),
                    (want.tok[r], want.lps[r], want.lpp[r], want.nk[r]),
                    "{p:?} row {r}"
                );
            }
        }
    }
    assert!(sample::unsampled_rows(&[1, 4, 9]).is_ok());
}

#[test]
fn sample_rejects_bad_input() {
    let (n, v) = (2, 5);
    let z = vec![0.1f64; n * v];
    let mut tok = vec![0u32; n];
    let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
    let mut run = |z: &[f64], v: usize, p: SampleParams, tok: &mut [u32]| {
        sample::cpu::sample(z, n, v, &p, 1, 0, tok, &mut a, &mut b, None)
    };
    let ok = SampleParams::default();
    assert!(matches!(
        run(&z[1..], v, ok, &mut tok),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        run(&z, v, ok, &mut tok[1..]),
        Err(Error::Shape(_))
    ));
    assert!(matches!(run(&z, 0, ok, &mut tok), Err(Error::Invalid(_))));
    for t in [-0.5, f32::NAN, f32::INFINITY] {
        let p = SampleParams {
            temperature: t,
            ..ok
        };
        assert!(
            matches!(run(&z, v, p, &mut tok), Err(Error::Invalid(_))),
            "T={t}"
        );
    }
    for tp in [0.0, -0.1, 1.5, f32::NAN] {
        let p = SampleParams { top_p: tp, ..ok };
        assert!(
            matches!(run(&z, v, p, &mut tok), Err(Error::Invalid(_))),
            "top_p={tp}"
        );
    }
    for bad in [f64::NAN, f64::INFINITY] {
        let mut zb = z.clone();
        zb[7] = bad;
        let e = run(&zb, v, ok, &mut tok);
        assert!(
            matches!(e, Err(Error::Invalid(ref m)) if m.contains("row 1")),
            "{e:?}"
        );
    }
    let mut zb = z.clone();
    zb[..5].fill(f64::NEG_INFINITY);
    assert!(matches!(run(&zb, v, ok, &mut tok), Err(Error::Invalid(_))));
    // -inf logits alone are fine and never drawn.
    let mut zm = z.clone();
    zm[0] = f64::NEG_INFINITY;
    zm[6] = f64::NEG_INFINITY;
    for seed in 0..50 {
        let d = draw(&zm, n, v, &ok, seed, 0);
        assert!(d.tok[0] != 0 && d.tok[1] != 1);
    }
}

// =============================================================================================
// adamw
// =============================================================================================

#[test]
fn adamw_matches_the_direct_formula_over_several_steps() {
    let mut rng = Rng::fresh("adamw_matches_the_direct_formula_over_several_steps");
    let n = 50;
    let hp = AdamWParams {
        lr: 3e-3,
        beta1: 0.85,
        beta2: 0.99,
        eps: 1e-6,
        weight_decay: 0.05,
    };
    let (lr, b1, b2, eps, wd) = (hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay);
    let mut p = rng.normal_vec_f64(n, 1.0);
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    let (mut pw, mut mw, mut vw) = (p.clone(), vec![0.0; n], vec![0.0; n]);
    for t in 1..=6u64 {
        let g = rng.normal_vec_f64(n, 0.3);
        let scale = 0.75f32;
        assert!(adamw::cpu::step(&mut p, &g, &mut m, &mut v, None, &hp, t, scale).unwrap());
        for i in 0..n {
            let gi = g[i] * scale as f64;
            mw[i] = b1 * mw[i] + (1.0 - b1) * gi;
            vw[i] = b2 * vw[i] + (1.0 - b2) * gi * gi;
            let mhat = mw[i] / (1.0 - b1.powi(t as i32));
            let vhat = vw[i] / (1.0 - b2.powi(t as i32));
            pw[i] = pw[i] * (1.0 - lr * wd) - lr * mhat / (vhat.sqrt() + eps);
        }
        assert_close_f64(&format!("p step {t}"), &p, &pw, 1e-12, 1e-15);
        assert_close_f64(&format!("m step {t}"), &m, &mw, 1e-12, 1e-15);
        assert_close_f64(&format!("v step {t}"), &v, &vw, 1e-12, 1e-18);
    }
}

#[test]
#[allow(clippy::excessive_precision)] // torch's values, pasted as printed
fn adamw_matches_torch_optim_adamw() {
    // Generated with /work/torchenv/bin/python (torch 2.15.0, CPU, fp32):
    //   p0 = torch.tensor([0.5, -1.25, 2.0, 0.0, -0.03125, 3.5])
    //   grads = [[0.1, -0.2, 0.3, 0.0, 1.5, -0.75], [-0.05, 0.4, 0.25, 0.125, -2.0, 0.5],
    //            [0.2, 0.1, -0.6, -0.25, 0.75, 0.0625]]
    //   for wd in (0.0, 0.1): p = Parameter(p0.clone()); opt = torch.optim.AdamW([p], lr=1e-2,
    //       betas=(0.9, 0.999), eps=1e-8, weight_decay=wd); for g in grads: p.grad = g;
    //       opt.step(); print p, opt.state[p]['exp_avg'], ['exp_avg_sq'] with "%.9e".
    // Only the values after step 3 are pasted (the steps before are checked through them).
    let p0 = [0.5f32, -1.25, 2.0, 0.0, -0.03125, 3.5];
    let grads: [[f32; 6]; 3] = [
        [0.1, -0.2, 0.3, 0.0, 1.5, -0.75],
        [-0.05, 0.4, 0.25, 0.125, -2.0, 0.5],
        [0.2, 0.1, -0.6, -0.25, 0.75, 0.0625],
    ];
    let want_p = [
        [
            4.807555079e-01f32,
            -1.247817516e+00,
            1.981266379e+00,
            -4.298506305e-03,
            -3.971897811e-02,
            3.512117386e+00,
        ],
        [
            4.792796671e-01,
            -1.244087577e+00,
            1.975302339e+00,
            -4.291065037e-03,
            -3.960727155e-02,
            3.501606703e+00,
        ],
    ];
    let want_m = [
        2.360000089e-02f32,
        2.980000153e-02,
        -1.320000086e-02,
        -1.374999899e-02,
        1.649999619e-02,
        -9.500003420e-03,
    ];
    let want_v = [
        5.247751324e-05f32,
        2.097600518e-04,
        5.122576258e-04,
        7.810937677e-05,
        6.804002449e-03,
        8.150318172e-04,
    ];
    for (wi, wd) in [0.0f64, 0.1].into_iter().enumerate() {
        let hp = AdamWParams {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: wd,
        };
        let mut p = p0.to_vec();
        let (mut m, mut v) = (vec![0.0f32; 6], vec![0.0f32; 6]);
        for (t, g) in grads.iter().enumerate() {
            adamw::cpu::step(&mut p, g, &mut m, &mut v, None, &hp, t as u64 + 1, 1.0).unwrap();
        }
        assert_close(&format!("p wd={wd}"), &p, &want_p[wi], 2e-7, 1e-9);
        // m is 0.9·m + 0.1·g with cancellation (element 4: −0.0585 + 0.075); torch fuses the
        // lerp (an FMA), we round twice: one ulp of the terms is 4.5e-7 of the result.
        assert_close(&format!("m wd={wd}"), &m, &want_m, 2e-7, 1e-8);
        assert_close(&format!("v wd={wd}"), &v, &want_v, 2e-7, 1e-12);
    }
}

#[test]
fn adamw_weight_decay_off_and_on() {
    let mut rng = Rng::fresh("adamw_weight_decay_off_and_on");
    let n = 20;
    let p0 = rng.normal_vec(n, 1.0);
    let zero = vec![0.0f32; n];
    for wd in [0.0f64, 0.1] {
        let hp = AdamWParams {
            lr: 0.01,
            weight_decay: wd,
            ..Default::default()
        };
        let mut p = p0.clone();
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        adamw::cpu::step(&mut p, &zero, &mut m, &mut v, None, &hp, 1, 1.0).unwrap();
        // Zero gradient, zero moments: only the decay moves the weights.
        let decay = (1.0 - 0.01 * wd) as f32;
        for i in 0..n {
            assert_eq!(p[i], p0[i] * decay, "wd={wd} element {i}");
        }
        if wd == 0.0 {
            assert_eq!(p, p0);
        }
    }
    // With a gradient, decay on = decay off, then the decayed part: the difference is
    // lr·wd·p0 (up to rounding).
    let g = rng.normal_vec_f64(n, 1.0);
    let p0d: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
    let run = |wd: f64| {
        let hp = AdamWParams {
            lr: 0.01,
            weight_decay: wd,
            ..Default::default()
        };
        let mut p = p0d.clone();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        adamw::cpu::step(&mut p, &g, &mut m, &mut v, None, &hp, 1, 1.0).unwrap();
        p
    };
    let (off, on) = (run(0.0), run(0.2));
    for i in 0..n {
        let want = 0.01 * 0.2 * p0d[i];
        assert!((off[i] - on[i] - want).abs() < 1e-9, "element {i}");
    }
}

#[test]
fn adamw_grad_norm_and_clipping() {
    let mut rng = Rng::fresh("adamw_grad_norm_and_clipping");
    let a = rng.normal_vec(37, 1.0);
    let b: Vec<f32> = vec![];
    let c = rng.normal_vec(1000, 0.1);
    let norm = adamw::cpu::grad_norm(&[&a[..], &b[..], &c[..]]);
    let want = a
        .iter()
        .chain(&c)
        .map(|&x| x as f64 * x as f64)
        .sum::<f64>()
        .sqrt();
    assert!((norm - want).abs() <= 1e-14 * want);
    assert_eq!(adamw::cpu::grad_norm::<f32>(&[]), 0.0);
    // Clip scale: min(1, max / (norm + 1e-6)).
    assert_eq!(adamw::clip_scale(0.5, 1.0), 1.0);
    assert_eq!(adamw::clip_scale(4.0, 1.0), (1.0 / (4.0 + 1e-6)) as f32);
    assert_eq!(adamw::clip_scale(1e30, f32::INFINITY), 1.0);
    assert!(adamw::clip_scale(f64::NAN, 1.0).is_nan());
    assert!(adamw::clip_scale(f64::INFINITY, 1.0).is_nan());
    // Clipping the norm to 1 scales the gradient to norm ~1.
    let s = adamw::clip_scale(norm, 1.0);
    let scaled: Vec<f32> = a.iter().chain(&c).map(|&x| x * s).collect();
    assert!((adamw::cpu::grad_norm(&[&scaled[..]]) - 1.0).abs() < 1e-5);
    // Stepping with scale s equals stepping with the gradient pre-multiplied by s (s = 0.5 is
    // exact, so the two are bit-identical).
    let hp = AdamWParams::default();
    let p0 = rng.normal_vec(37, 1.0);
    let (mut p1, mut m1, mut v1) = (p0.clone(), vec![0.0f32; 37], vec![0.0f32; 37]);
    let (mut p2, mut m2, mut v2) = (p0.clone(), vec![0.0f32; 37], vec![0.0f32; 37]);
    let half_g: Vec<f32> = a.iter().map(|&x| x * 0.5).collect();
    for t in 1..=3 {
        adamw::cpu::step(&mut p1, &a, &mut m1, &mut v1, None, &hp, t, 0.5).unwrap();
        adamw::cpu::step(&mut p2, &half_g, &mut m2, &mut v2, None, &hp, t, 1.0).unwrap();
    }
    assert_eq!(p1, p2);
    assert_eq!(m1, m2);
    assert_eq!(v1, v2);
}

#[test]
fn adamw_nan_gradient_is_flagged_and_skipped() {
    let mut rng = Rng::fresh("adamw_nan_gradient_is_flagged_and_skipped");
    let n = 16;
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut g = rng.normal_vec(n, 1.0);
        g[9] = bad;
        let norm = adamw::cpu::grad_norm(&[&g[..]]);
        assert!(!norm.is_finite(), "the norm reports the bad gradient");
        let s = adamw::clip_scale(norm, 1.0);
        assert!(s.is_nan());
        let p0 = rng.normal_vec(n, 1.0);
        let m0 = rng.normal_vec(n, 0.1);
        let v0: Vec<f32> = rng.normal_vec(n, 0.1).iter().map(|x| x * x).collect();
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        let mut b = vec![0x1234u16; n];
        let stepped = adamw::cpu::step(
            &mut p,
            &g,
            &mut m,
            &mut v,
            Some(&mut b),
            &AdamWParams::default(),
            5,
            s,
        )
        .unwrap();
        assert!(!stepped);
        assert_eq!(p, p0);
        assert_eq!(m, m0);
        assert_eq!(v, v0);
        assert!(b.iter().all(|&x| x == 0x1234));
    }
}

#[test]
fn adamw_bf16_copy_rounds_the_updated_weights() {
    let mut rng = Rng::fresh("adamw_bf16_copy_rounds_the_updated_weights");
    let n = 300;
    let mut p = rng.normal_vec(n, 2.0);
    let g = rng.normal_vec(n, 1.0);
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut b = vec![0u16; n];
    adamw::cpu::step(
        &mut p,
        &g,
        &mut m,
        &mut v,
        Some(&mut b),
        &AdamWParams::default(),
        1,
        1.0,
    )
    .unwrap();
    for i in 0..n {
        let back = half::bf16::from_bits(b[i]).to_f32();
        // Round to nearest: within half a bf16 ulp (2^-8 relative).
        assert!(
            (back - p[i]).abs() <= p[i].abs() * (1.0 / 256.0),
            "element {i}"
        );
        assert_eq!(b[i], half::bf16::from_f32(p[i]).to_bits());
    }
}

#[test]
fn adamw_rejects_bad_input() {
    let n = 4;
    let (mut p, g, mut m, mut v) = (
        vec![0.0f32; n],
        vec![0.0f32; n],
        vec![0.0f32; n],
        vec![0.0f32; n],
    );
    let ok = AdamWParams::default();
    let e = adamw::cpu::step(&mut p, &g, &mut m, &mut v, None, &ok, 0, 1.0);
    assert!(matches!(e, Err(Error::Invalid(_))), "step 0");
    let e = adamw::cpu::step(&mut p, &g[1..], &mut m, &mut v, None, &ok, 1, 1.0);
    assert!(matches!(e, Err(Error::Shape(_))));
    let e = adamw::cpu::step(&mut p, &g, &mut m, &mut v[1..], None, &ok, 1, 1.0);
    assert!(matches!(e, Err(Error::Shape(_))));
    let mut b = vec![0u16; n - 1];
    let e = adamw::cpu::step(&mut p, &g, &mut m, &mut v, Some(&mut b), &ok, 1, 1.0);
    assert!(matches!(e, Err(Error::Shape(_))));
    for bad in [
        AdamWParams { lr: -1.0, ..ok },
        AdamWParams { lr: f64::NAN, ..ok },
        AdamWParams { beta1: 1.0, ..ok },
        AdamWParams { beta2: -0.1, ..ok },
        AdamWParams { eps: 0.0, ..ok },
        AdamWParams {
            weight_decay: -0.1,
            ..ok
        },
    ] {
        let e = adamw::cpu::step(&mut p, &g, &mut m, &mut v, None, &bad, 1, 1.0);
        assert!(matches!(e, Err(Error::Invalid(_))), "{bad:?}");
    }
}
