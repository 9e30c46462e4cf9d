//! CPU references of kernels/rl.cu (in f64) against independent truths: a direct-sum GAE,
//! closed forms (Monte-Carlo returns at λ = 1, one-step TD at λ = 0, two-token whitening),
//! moments of the whitened output, the PPO surrogate written in its min form, and finite
//! differences for every gradient. Also: bad input gives errors, never panics.

mod common;

use common::{assert_close, assert_close_f64, Rng};
use dfpo::kernels::rl::{cpu, GaeParams, KlKind, PpoParams};
use dfpo::Error;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A [B][T] 0/1 mask mixing every case: all padding, length 1, full, a random right-padded
/// length, and random holes.
fn mixed_mask(rng: &mut Rng, b: usize, t: usize) -> Vec<f64> {
    let mut m = vec![0.0; b * t];
    for bi in 0..b {
        let row = &mut m[bi * t..(bi + 1) * t];
        match bi % 5 {
            0 => {}
            1 => row[0] = 1.0,
            2 => row.fill(1.0),
            3 => {
                let len = (rng.next_u64() % (t as u64 + 1)) as usize;
                row[..len].fill(1.0);
            }
            _ => {
                for x in row.iter_mut() {
                    *x = if rng.uniform() < 0.7 { 1.0 } else { 0.0 };
                }
            }
        }
    }
    m
}

/// Puts NaN into values and rewards at padded positions: the references must never read them
/// into arithmetic that reaches an output.
fn poison_padding(values: &mut [f64], rewards: &mut [f64], mask: &[f64], k: usize) {
    for (row, &m) in mask.iter().enumerate() {
        if m == 0.0 {
            rewards[row] = f64::NAN;
            values[row * k..(row + 1) * k].fill(f64::NAN);
        }
    }
}

struct Gae {
    adv: Vec<f64>,
    ret: Vec<f64>,
    mean: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn run_gae(
    values: &[f64],
    rewards: &[f64],
    mask: &[f64],
    b: usize,
    t: usize,
    k: usize,
    p: GaeParams,
) -> Gae {
    let mut g = Gae {
        adv: vec![f64::NAN; b * t * k],
        ret: vec![f64::NAN; b * t * k],
        mean: vec![f64::NAN; b * t],
    };
    cpu::dist_gae(
        values,
        rewards,
        mask,
        b,
        t,
        k,
        p,
        &mut g.adv,
        &mut g.ret,
        &mut g.mean,
    )
    .unwrap();
    g
}

/// A_{t,k} = Σ_l (γλ)^l (Π_{j<l} continue_{t+j}) δ_{t+l,k}: the definition, summed directly.
#[allow(clippy::too_many_arguments)]
fn direct_sum_adv(
    values: &[f64],
    rewards: &[f64],
    mask: &[f64],
    b: usize,
    t: usize,
    k: usize,
    gamma: f64,
    lambda: f64,
) -> Vec<f64> {
    let valid = |bi: usize, s: usize| s < t && mask[bi * t + s] == 1.0;
    let z = |bi: usize, s: usize, ki: usize| values[(bi * t + s) * k + ki];
    let mut adv = vec![0.0; b * t * k];
    for bi in 0..b {
        for ti in 0..t {
            if !valid(bi, ti) {
                continue;
            }
            for ki in 0..k {
                let (mut sum, mut coef, mut s) = (0.0, 1.0, ti);
                loop {
                    let cont = valid(bi, s + 1);
                    let boot = if cont { gamma * z(bi, s + 1, ki) } else { 0.0 };
                    let delta = rewards[bi * t + s] + boot - z(bi, s, ki);
                    sum += coef * delta;
                    if !cont {
                        break;
                    }
                    coef *= gamma * lambda;
                    s += 1;
                }
                adv[(bi * t + ti) * k + ki] = sum;
            }
        }
    }
    adv
}

fn assert_all_finite(what: &str, x: &[f64]) {
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        panic!("{what}[{i}] = {} is not finite", x[i]);
    }
}

fn expect_shape(r: dfpo::Result<impl std::fmt::Debug>, needle: &str) {
    match r {
        Err(Error::Shape(msg)) => assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}"),
        other => panic!("expected Error::Shape naming {needle:?}, got {other:?}"),
    }
}

fn expect_invalid(r: dfpo::Result<impl std::fmt::Debug>, needle: &str) {
    match r {
        Err(Error::Invalid(msg)) => {
            assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}")
        }
        other => panic!("expected Error::Invalid naming {needle:?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Distributional GAE
// ---------------------------------------------------------------------------------------------

#[test]
fn gae_matches_direct_sum_on_mixed_masks() {
    let mut rng = Rng::fresh("gae_matches_direct_sum_on_mixed_masks");
    for &(b, t, k) in &[(10, 23, 3), (7, 40, 1), (5, 9, 6)] {
        for &(gamma, lambda) in &[(1.0f32, 0.95f32), (0.9, 0.7), (0.99, 1.0), (0.5, 0.0)] {
            let mask = mixed_mask(&mut rng, b, t);
            let mut values = rng.normal_vec_f64(b * t * k, 1.0);
            let mut rewards = rng.normal_vec_f64(b * t, 1.0);
            poison_padding(&mut values, &mut rewards, &mask, k);
            let p = GaeParams { gamma, lambda };
            let g = run_gae(&values, &rewards, &mask, b, t, k, p);
            assert_all_finite("adv", &g.adv);
            assert_all_finite("ret", &g.ret);
            assert_all_finite("adv_mean", &g.mean);

            let want = direct_sum_adv(
                &values,
                &rewards,
                &mask,
                b,
                t,
                k,
                gamma as f64,
                lambda as f64,
            );
            assert_close_f64("adv vs direct sum", &g.adv, &want, 1e-12, 1e-12);
            for (row, &mv) in mask.iter().enumerate() {
                let valid = mv == 1.0;
                let mut sum = 0.0;
                for ki in 0..k {
                    let i = row * k + ki;
                    let want_ret = if valid { values[i] + want[i] } else { 0.0 };
                    assert!(
                        (g.ret[i] - want_ret).abs() <= 1e-12 * (1.0 + want_ret.abs()),
                        "ret[{i}] = {} want {want_ret}",
                        g.ret[i]
                    );
                    sum += want[i];
                }
                let want_mean = if valid { sum / k as f64 } else { 0.0 };
                assert!(
                    (g.mean[row] - want_mean).abs() <= 1e-12 * (1.0 + want_mean.abs()),
                    "adv_mean[{row}] = {} want {want_mean}",
                    g.mean[row]
                );
            }
        }
    }
}

/// Index of the last position of the run of valid tokens containing `ti` (within sequence bi).
fn run_end(mask: &[f64], t: usize, bi: usize, ti: usize) -> usize {
    let mut e = ti;
    while e + 1 < t && mask[bi * t + e + 1] == 1.0 {
        e += 1;
    }
    e
}

#[test]
fn gae_lambda1_gives_monte_carlo_returns_independent_of_values() {
    // With λ = 1 the z terms telescope and the last bootstrap is 0:
    // G_t = Σ_{s=t}^{end} γ^{s−t} r_s, for every sample k, whatever the values.
    let mut rng = Rng::fresh("gae_lambda1_gives_monte_carlo_returns_independent_of_values");
    let (b, t, k) = (10, 31, 4);
    for &gamma in &[1.0f32, 0.9] {
        let mask = mixed_mask(&mut rng, b, t);
        let mut values = rng.normal_vec_f64(b * t * k, 3.0);
        let mut rewards = rng.normal_vec_f64(b * t, 1.0);
        poison_padding(&mut values, &mut rewards, &mask, k);
        let g = run_gae(
            &values,
            &rewards,
            &mask,
            b,
            t,
            k,
            GaeParams { gamma, lambda: 1.0 },
        );
        for bi in 0..b {
            for ti in 0..t {
                let row = bi * t + ti;
                if mask[row] == 0.0 {
                    continue;
                }
                let e = run_end(&mask, t, bi, ti);
                let mc: f64 = (ti..=e)
                    .map(|s| (gamma as f64).powi((s - ti) as i32) * rewards[bi * t + s])
                    .sum();
                for ki in 0..k {
                    let got = g.ret[row * k + ki];
                    assert!(
                        (got - mc).abs() <= 1e-11 * (1.0 + mc.abs()),
                        "γ={gamma}: G[{bi}][{ti}][{ki}] = {got}, Monte-Carlo return {mc}"
                    );
                }
            }
        }
    }
}

#[test]
fn gae_lambda0_is_one_step_td() {
    let mut rng = Rng::fresh("gae_lambda0_is_one_step_td");
    let (b, t, k) = (10, 17, 5);
    let gamma = 0.8f32;
    let mask = mixed_mask(&mut rng, b, t);
    let mut values = rng.normal_vec_f64(b * t * k, 1.0);
    let mut rewards = rng.normal_vec_f64(b * t, 1.0);
    poison_padding(&mut values, &mut rewards, &mask, k);
    let g = run_gae(
        &values,
        &rewards,
        &mask,
        b,
        t,
        k,
        GaeParams { gamma, lambda: 0.0 },
    );
    for bi in 0..b {
        for ti in 0..t {
            let row = bi * t + ti;
            for ki in 0..k {
                let i = row * k + ki;
                let want = if mask[row] == 0.0 {
                    0.0
                } else if ti + 1 < t && mask[row + 1] == 1.0 {
                    rewards[row] + gamma as f64 * values[i + k] - values[i]
                } else {
                    rewards[row] - values[i]
                };
                assert!(
                    (g.adv[i] - want).abs() <= 1e-13,
                    "adv[{i}] = {} want TD {want}",
                    g.adv[i]
                );
            }
        }
    }
}

#[test]
fn gae_edge_shapes() {
    let mut rng = Rng::fresh("gae_edge_shapes");
    let p = GaeParams::default();
    // All padding: everything 0, even with NaN inputs.
    let (b, t, k) = (3, 5, 2);
    let mask = vec![0.0; b * t];
    let mut values = rng.normal_vec_f64(b * t * k, 1.0);
    let mut rewards = rng.normal_vec_f64(b * t, 1.0);
    poison_padding(&mut values, &mut rewards, &mask, k);
    let g = run_gae(&values, &rewards, &mask, b, t, k, p);
    assert!(g.adv.iter().chain(&g.ret).chain(&g.mean).all(|&x| x == 0.0));

    // Length-1 sequences (T = 1): A = r − z, G = r.
    let (b, t, k) = (4, 1, 3);
    let mask = vec![1.0; b];
    let values = rng.normal_vec_f64(b * k, 1.0);
    let rewards = rng.normal_vec_f64(b, 1.0);
    let g = run_gae(&values, &rewards, &mask, b, t, k, p);
    for (bi, &r) in rewards.iter().enumerate() {
        for ki in 0..k {
            let i = bi * k + ki;
            assert!((g.adv[i] - (r - values[i])).abs() < 1e-14);
            assert!((g.ret[i] - r).abs() < 1e-14);
        }
    }

    // Empty batch and empty sequences are fine.
    for &(b, t) in &[(0usize, 7usize), (3, 0)] {
        let (mut a, mut r, mut m) = (vec![], vec![], vec![]);
        cpu::dist_gae::<f64>(&[], &[], &[], b, t, 4, p, &mut a, &mut r, &mut m).unwrap();
    }
}

#[test]
fn gae_f32_reference_tracks_f64() {
    let mut rng = Rng::fresh("gae_f32_reference_tracks_f64");
    let (b, t, k) = (6, 200, 8);
    let mask = mixed_mask(&mut rng, b, t);
    let values = rng.normal_vec_f64(b * t * k, 1.0);
    let rewards = rng.normal_vec_f64(b * t, 0.3);
    let p = GaeParams::default();
    let g = run_gae(&values, &rewards, &mask, b, t, k, p);
    let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let (v32, r32, m32) = (f(&values), f(&rewards), f(&mask));
    let mut a32 = vec![f32::NAN; b * t * k];
    let mut g32 = vec![f32::NAN; b * t * k];
    let mut mean32 = vec![f32::NAN; b * t];
    cpu::dist_gae(
        &v32,
        &r32,
        &m32,
        b,
        t,
        k,
        p,
        &mut a32,
        &mut g32,
        &mut mean32,
    )
    .unwrap();
    assert_close("adv f32 vs f64", &a32, &f(&g.adv), 1e-4, 1e-4);
    assert_close("ret f32 vs f64", &g32, &f(&g.ret), 1e-4, 1e-4);
    assert_close("adv_mean f32 vs f64", &mean32, &f(&g.mean), 1e-4, 1e-4);
}

#[test]
fn gae_bad_input_is_an_error() {
    let (b, t, k) = (2, 3, 4);
    let p = GaeParams::default();
    let v = vec![0.0f64; b * t * k];
    let r = vec![0.0f64; b * t];
    let m = vec![1.0f64; b * t];
    let mut a = vec![0.0f64; b * t * k];
    let mut g = vec![0.0f64; b * t * k];
    let mut am = vec![0.0f64; b * t];
    let short = vec![0.0f64; 1];
    let mut short_m = vec![0.0f64; 1];
    let mut short_m2 = vec![0.0f64; 1];
    let mut short_m3 = vec![0.0f64; 1];
    expect_shape(
        cpu::dist_gae(&short, &r, &m, b, t, k, p, &mut a, &mut g, &mut am),
        "values",
    );
    expect_shape(
        cpu::dist_gae(&v, &short, &m, b, t, k, p, &mut a, &mut g, &mut am),
        "rewards",
    );
    expect_shape(
        cpu::dist_gae(&v, &r, &short, b, t, k, p, &mut a, &mut g, &mut am),
        "mask",
    );
    expect_shape(
        cpu::dist_gae(&v, &r, &m, b, t, k, p, &mut short_m, &mut g, &mut am),
        "adv",
    );
    expect_shape(
        cpu::dist_gae(&v, &r, &m, b, t, k, p, &mut a, &mut short_m2, &mut am),
        "ret",
    );
    expect_shape(
        cpu::dist_gae(&v, &r, &m, b, t, k, p, &mut a, &mut g, &mut short_m3),
        "adv_mean",
    );
    expect_invalid(
        cpu::dist_gae(&v, &r, &m, b, t, 0, p, &mut a, &mut g, &mut am),
        "k = 0",
    );
    expect_shape(
        cpu::dist_gae(&v, &r, &m, usize::MAX, 2, k, p, &mut a, &mut g, &mut am),
        "overflows",
    );
    for (gamma, lambda, name) in [
        (f32::NAN, 0.9, "gamma"),
        (1.5, 0.9, "gamma"),
        (1.0, -0.1, "lambda"),
        (1.0, f32::INFINITY, "lambda"),
    ] {
        let bad = GaeParams { gamma, lambda };
        expect_invalid(
            cpu::dist_gae(&v, &r, &m, b, t, k, bad, &mut a, &mut g, &mut am),
            name,
        );
    }
    let mut m_bad = m.clone();
    m_bad[4] = 0.5;
    expect_invalid(
        cpu::dist_gae(&v, &r, &m_bad, b, t, k, p, &mut a, &mut g, &mut am),
        "mask[4]",
    );
}

// ---------------------------------------------------------------------------------------------
// Whitening
// ---------------------------------------------------------------------------------------------

fn masked_moments(x: &[f64], mask: &[f64]) -> (f64, f64, usize) {
    let v: Vec<f64> = x
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m == 1.0)
        .map(|(&x, _)| x)
        .collect();
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n as f64;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n as f64 - 1.0);
    (mean, var, n)
}

#[test]
fn whiten_gives_zero_mean_unit_unbiased_variance() {
    let mut rng = Rng::fresh("whiten_gives_zero_mean_unit_unbiased_variance");
    for &(n, loc, scale) in &[(2000usize, 3.0, 0.5), (37, -100.0, 7.0), (5, 0.0, 1e-2)] {
        let mask: Vec<f64> = (0..n)
            .map(|i| {
                if i < 2 || rng.uniform() < 0.6 {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        let mut x: Vec<f64> = (0..n).map(|_| loc + scale * rng.normal()).collect();
        for (xi, &m) in x.iter_mut().zip(&mask) {
            if m == 0.0 {
                *xi = f64::NAN; // padding is ignored
            }
        }
        let mut out = vec![f64::NAN; n];
        let (mu, sigma) = cpu::whiten(&x, &mask, &mut out).unwrap();
        let (want_mu, want_var, _) = masked_moments(&x, &mask);
        assert!(
            (mu - want_mu).abs() <= 1e-12 * (1.0 + want_mu.abs()),
            "μ {mu} vs {want_mu}"
        );
        assert!(
            (sigma - want_var.sqrt()).abs() <= 1e-12 * want_var.sqrt(),
            "σ {sigma} vs {}",
            want_var.sqrt()
        );
        for (i, (&o, &m)) in out.iter().zip(&mask).enumerate() {
            if m == 0.0 {
                assert_eq!(o, 0.0, "out[{i}] on padding");
            }
        }
        let (om, ov, _) = masked_moments(&out, &mask);
        let want_ov = want_var / (want_var + 1e-8);
        assert!(om.abs() < 1e-12, "whitened mean {om}");
        assert!(
            (ov - want_ov).abs() < 1e-10,
            "whitened unbiased var {ov} vs {want_ov}"
        );
    }
}

#[test]
fn whiten_two_tokens_closed_form_and_affine_invariance() {
    let mut rng = Rng::fresh("whiten_two_tokens_closed_form_and_affine_invariance");
    // Two valid tokens a, b: μ = (a+b)/2, σ = |a−b|/√2, out = ±(1/√2)·σ/sqrt(σ²+1e-8).
    let (a, b) = (rng.range(-3.0, 3.0), rng.range(4.0, 9.0));
    let x = [a, 17.0, b];
    let mask = [1.0, 0.0, 1.0];
    let mut out = [f64::NAN; 3];
    let (mu, sigma) = cpu::whiten(&x, &mask, &mut out).unwrap();
    let s = (a - b).abs() / 2f64.sqrt();
    assert!((mu - (a + b) / 2.0).abs() < 1e-14);
    assert!((sigma - s).abs() < 1e-14);
    let mag = (0.5f64).sqrt() * s / (s * s + 1e-8).sqrt();
    assert!((out[0] + mag).abs() < 1e-14 && (out[2] - mag).abs() < 1e-14 && out[1] == 0.0);

    // whiten(c + s·x) = whiten(x) for s > 0 (up to the 1e-8 in the denominator).
    let n = 300;
    let mask: Vec<f64> = (0..n).map(|i| ((i * 7) % 3 != 0) as u8 as f64).collect();
    let x: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let y: Vec<f64> = x.iter().map(|&v| 5.0 + 40.0 * v).collect();
    let (mut ox, mut oy) = (vec![0.0; n], vec![0.0; n]);
    cpu::whiten(&x, &mask, &mut ox).unwrap();
    cpu::whiten(&y, &mask, &mut oy).unwrap();
    assert_close_f64("affine invariance", &oy, &ox, 1e-7, 1e-7);

    // A constant input has σ = 0 and whitens to exactly 0.
    let c = vec![2.5; 10];
    let mut oc = vec![f64::NAN; 10];
    let (mu, sigma) = cpu::whiten(&c, &[1.0; 10], &mut oc).unwrap();
    assert!(mu == 2.5 && sigma == 0.0 && oc.iter().all(|&v| v == 0.0));
}

#[test]
fn whiten_bad_input_is_an_error() {
    let x = [1.0f64, 2.0, 3.0];
    let mut out = [7.0f64; 3];
    // Fewer than two valid tokens: the caller must handle it; out is untouched.
    expect_invalid(cpu::whiten(&x, &[0.0, 0.0, 0.0], &mut out), "0 valid");
    expect_invalid(cpu::whiten(&x, &[0.0, 1.0, 0.0], &mut out), "1 valid");
    assert_eq!(out, [7.0; 3]);
    expect_invalid(
        cpu::whiten(&[1.0, f64::NAN, 3.0], &[1.0, 1.0, 1.0], &mut out),
        "x[1]",
    );
    expect_invalid(cpu::whiten(&x, &[1.0, 1.0, -1.0], &mut out), "mask[2]");
    expect_shape(cpu::whiten(&x, &[1.0, 1.0], &mut out), "mask");
    expect_shape(cpu::whiten(&x, &[1.0; 3], &mut [0.0; 2]), "out");
    let empty: [f64; 0] = [];
    expect_invalid(cpu::whiten(&empty, &empty, &mut []), "0 valid");
}

// ---------------------------------------------------------------------------------------------
// PPO policy loss
// ---------------------------------------------------------------------------------------------

/// Random PPO inputs whose ratio stays at least `margin` away from both clip bounds (so finite
/// differences and float rounding cannot flip the clip decision).
fn ppo_inputs(rng: &mut Rng, n: usize, p: PpoParams, margin: f64) -> [Vec<f64>; 4] {
    let (lo, hi) = (1.0 - p.clip_low as f64, 1.0 + p.clip_high as f64);
    let mut logp = Vec::with_capacity(n);
    let mut old = Vec::with_capacity(n);
    for _ in 0..n {
        let o = rng.range(-6.0, -0.05);
        let d = loop {
            let d = rng.range(-0.6, 0.6);
            let r = d.exp();
            if (r - lo).abs() > margin && (r - hi).abs() > margin {
                break d;
            }
        };
        old.push(o);
        logp.push(o + d);
    }
    let adv = rng.normal_vec_f64(n, 1.0);
    let mask: Vec<f64> = (0..n)
        .map(|_| if rng.uniform() < 0.8 { 1.0 } else { 0.0 })
        .collect();
    [logp, old, adv, mask]
}

#[test]
fn ppo_loss_matches_the_min_form_and_clip_truth() {
    let mut rng = Rng::fresh("ppo_loss_matches_the_min_form_and_clip_truth");
    for p in [
        PpoParams::default(),
        PpoParams {
            clip_low: 0.2,
            clip_high: 0.28,
        },
    ] {
        let n = 500;
        let [logp, old, adv, mask] = ppo_inputs(&mut rng, n, p, 1e-3);
        let (mut lt, mut g) = (vec![f64::NAN; n], vec![f64::NAN; n]);
        let st = cpu::ppo_policy_loss(&logp, &old, &adv, &mask, p, &mut lt, &mut g).unwrap();
        let (lo, hi) = (1.0 - p.clip_low as f64, 1.0 + p.clip_high as f64);
        let (mut cnt, mut sl, mut sc, mut sk) = (0.0, 0.0, 0.0, 0.0);
        for i in 0..n {
            if mask[i] == 0.0 {
                assert_eq!((lt[i], g[i]), (0.0, 0.0), "token {i} is padding");
                continue;
            }
            let r = (logp[i] - old[i]).exp();
            let a = adv[i];
            // PPO's pessimistic objective, written as a min (independent of the max form).
            let want = -(r * a).min(r.clamp(lo, hi) * a);
            assert!(
                (lt[i] - want).abs() < 1e-13,
                "loss[{i}] {} want {want}",
                lt[i]
            );
            let clipped = (a > 0.0 && r > hi) || (a < 0.0 && r < lo);
            cnt += 1.0;
            sl += want;
            sc += clipped as u8 as f64;
            sk += old[i] - logp[i];
        }
        assert_eq!(st.n_valid, cnt);
        assert!((st.loss - sl / cnt).abs() < 1e-13);
        assert!((st.clipfrac - sc / cnt).abs() < 1e-15);
        assert!((st.approx_kl - sk / cnt).abs() < 1e-13);
        assert!(st.clipfrac > 0.05, "inputs should clip some tokens");
    }
}

#[test]
fn ppo_grad_matches_finite_differences() {
    let mut rng = Rng::fresh("ppo_grad_matches_finite_differences");
    let p = PpoParams {
        clip_low: 0.2,
        clip_high: 0.28,
    };
    let n = 120;
    let [logp, old, adv, mask] = ppo_inputs(&mut rng, n, p, 1e-3);
    let loss = |lp: &[f64]| {
        let (mut lt, mut g) = (vec![0.0; n], vec![0.0; n]);
        cpu::ppo_policy_loss(lp, &old, &adv, &mask, p, &mut lt, &mut g)
            .unwrap()
            .loss
    };
    let (mut lt, mut g) = (vec![0.0; n], vec![0.0; n]);
    cpu::ppo_policy_loss(&logp, &old, &adv, &mask, p, &mut lt, &mut g).unwrap();
    let h = 1e-6;
    let mut nonzero = 0;
    for i in 0..n {
        let mut lp = logp.clone();
        lp[i] += h;
        let up = loss(&lp);
        lp[i] -= 2.0 * h;
        let down = loss(&lp);
        let fd = (up - down) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() <= 1e-8 + 1e-6 * fd.abs(),
            "grad[{i}] = {} finite difference {fd}",
            g[i]
        );
        nonzero += (g[i] != 0.0) as usize;
    }
    assert!(nonzero > n / 4, "too few tokens with a gradient: {nonzero}");
}

#[test]
fn ppo_edge_cases() {
    let mut rng = Rng::fresh("ppo_edge_cases");
    let p = PpoParams::default();
    // ratio = 1: loss = −A, gradient −A/n, nothing clipped, KL 0.
    let n = 9;
    let logp: Vec<f64> = (0..n).map(|_| rng.range(-5.0, 0.0)).collect();
    let adv = rng.normal_vec_f64(n, 1.0);
    let mask = vec![1.0; n];
    let (mut lt, mut g) = (vec![0.0; n], vec![0.0; n]);
    let st = cpu::ppo_policy_loss(&logp, &logp, &adv, &mask, p, &mut lt, &mut g).unwrap();
    let mean_a = adv.iter().sum::<f64>() / n as f64;
    assert!((st.loss + mean_a).abs() < 1e-14 && st.clipfrac == 0.0 && st.approx_kl == 0.0);
    for i in 0..n {
        assert!((lt[i] + adv[i]).abs() < 1e-15 && (g[i] + adv[i] / n as f64).abs() < 1e-15);
    }
    // No valid token: every output 0 (NaN inputs at padding are ignored).
    let nan = vec![f64::NAN; n];
    let (mut lt, mut g) = (vec![1.0; n], vec![1.0; n]);
    let st = cpu::ppo_policy_loss(&nan, &nan, &nan, &[0.0; 9], p, &mut lt, &mut g).unwrap();
    assert_eq!(
        (st.loss, st.clipfrac, st.approx_kl, st.n_valid),
        (0.0, 0.0, 0.0, 0.0)
    );
    assert!(lt.iter().chain(&g).all(|&v| v == 0.0));
    // A log-ratio of ±100 is clamped to ±20 before the exp (verl): finite, no gradient there.
    let (logp, old, adv) = ([0.0f32, -100.0], [-100.0f32, 0.0], [-1.0f32, 1.0]);
    let (mut lt, mut g) = (vec![0.0f32; 2], vec![0.0f32; 2]);
    let st = cpu::ppo_policy_loss(&logp, &old, &adv, &[1.0; 2], p, &mut lt, &mut g).unwrap();
    assert!(st.loss.is_finite(), "loss {}", st.loss);
    assert_eq!(lt[0], 20.0f32.exp());
    assert_eq!(lt[1], -(-20.0f32).exp()); // A > 0, ratio e^-20: the unclipped branch
    assert_eq!(g, [0.0, 0.0]);
}

#[test]
fn ppo_bad_input_is_an_error() {
    let v = [0.0f64; 4];
    let m = [1.0f64; 4];
    let p = PpoParams::default();
    let (mut lt, mut g) = ([0.0f64; 4], [0.0f64; 4]);
    expect_shape(
        cpu::ppo_policy_loss(&v, &v[..3], &v, &m, p, &mut lt, &mut g),
        "logp_old",
    );
    expect_shape(
        cpu::ppo_policy_loss(&v, &v, &v[..2], &m, p, &mut lt, &mut g),
        "adv",
    );
    expect_shape(
        cpu::ppo_policy_loss(&v, &v, &v, &m[..1], p, &mut lt, &mut g),
        "mask",
    );
    expect_shape(
        cpu::ppo_policy_loss(&v, &v, &v, &m, p, &mut lt[..3], &mut g),
        "loss_tok",
    );
    expect_shape(
        cpu::ppo_policy_loss(&v, &v, &v, &m, p, &mut lt, &mut g[..1]),
        "grad",
    );
    expect_invalid(
        cpu::ppo_policy_loss(&v, &v, &v, &[1.0, 2.0, 0.0, 1.0], p, &mut lt, &mut g),
        "mask[1]",
    );
    for (cl, ch, name) in [
        (1.0, 0.2, "clip_low"),
        (-0.1, 0.2, "clip_low"),
        (0.2, f32::NAN, "clip_high"),
        (0.2, -1.0, "clip_high"),
    ] {
        let bad = PpoParams {
            clip_low: cl,
            clip_high: ch,
        };
        expect_invalid(
            cpu::ppo_policy_loss(&v, &v, &v, &m, bad, &mut lt, &mut g),
            name,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// KL penalty
// ---------------------------------------------------------------------------------------------

#[test]
fn kl_penalty_values_and_finite_difference_grads() {
    let mut rng = Rng::fresh("kl_penalty_values_and_finite_difference_grads");
    let n = 200;
    let logp: Vec<f64> = (0..n).map(|_| rng.range(-8.0, -0.01)).collect();
    let refp: Vec<f64> = logp.iter().map(|&l| l + rng.range(-2.0, 2.0)).collect();
    let mask: Vec<f64> = (0..n).map(|i| (i % 4 != 3) as u8 as f64).collect();
    for kind in [KlKind::K1, KlKind::K3] {
        let mut out = vec![f64::NAN; n];
        let mut g = vec![f64::NAN; n];
        cpu::kl_penalty(&logp, &refp, &mask, kind, &mut out, Some(&mut g)).unwrap();
        let f = |lp: f64, r: f64| match kind {
            KlKind::K1 => lp - r,
            KlKind::K3 => (r - lp).exp() - (r - lp) - 1.0,
        };
        let h = 1e-6;
        for i in 0..n {
            if mask[i] == 0.0 {
                assert_eq!((out[i], g[i]), (0.0, 0.0));
                continue;
            }
            assert!((out[i] - f(logp[i], refp[i])).abs() < 1e-14);
            let fd = (f(logp[i] + h, refp[i]) - f(logp[i] - h, refp[i])) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-7 * (1.0 + fd.abs()),
                "{kind:?} grad[{i}] {} fd {fd}",
                g[i]
            );
            if kind == KlKind::K3 {
                // k3 ≥ 0, and ≈ x²/2 − x³/6 for small x = ref − logp.
                assert!(out[i] >= 0.0);
            }
        }
        // The grad is optional.
        let mut out2 = vec![f64::NAN; n];
        cpu::kl_penalty(&logp, &refp, &mask, kind, &mut out2, None).unwrap();
        assert_eq!(out, out2);
    }
    // k3 near 0: second-order Taylor expansion.
    let x: f64 = 1e-3;
    let mut out = [0.0];
    cpu::kl_penalty(&[-1.0], &[-1.0 + x], &[1.0], KlKind::K3, &mut out, None).unwrap();
    let taylor = x * x / 2.0 + x * x * x / 6.0;
    assert!(
        (out[0] - taylor).abs() < 1e-13,
        "k3({x}) = {} vs {taylor}",
        out[0]
    );
}

#[test]
fn kl_penalty_bad_input_is_an_error() {
    let v = [0.0f64; 3];
    let m = [1.0f64; 3];
    let mut out = [0.0f64; 3];
    let mut g = [0.0f64; 2];
    expect_shape(
        cpu::kl_penalty(&v, &v[..2], &m, KlKind::K1, &mut out, None),
        "logp_ref",
    );
    expect_shape(
        cpu::kl_penalty(&v, &v, &m[..2], KlKind::K1, &mut out, None),
        "mask",
    );
    expect_shape(
        cpu::kl_penalty(&v, &v, &m, KlKind::K1, &mut out[..1], None),
        "out",
    );
    expect_shape(
        cpu::kl_penalty(&v, &v, &m, KlKind::K3, &mut out, Some(&mut g)),
        "grad",
    );
    expect_invalid(
        cpu::kl_penalty(&v, &v, &[0.0, 0.3, 1.0], KlKind::K3, &mut out, None),
        "mask[1]",
    );
}
