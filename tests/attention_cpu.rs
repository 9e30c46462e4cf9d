//! CPU reference of kernels/attention.cu (src/kernels/attention.rs) against independent truths:
//! a naive materialised softmax(QKᵀ·scale + causal mask)·V, a direct log-sum-exp, the hard
//! argmax limit, central finite differences (f64) of a random scalar loss for dq, dk, dv, and the
//! last row of the full forward for decode attention. Padded positions hold NaN in every input
//! and must not leak; bad shapes must return errors.

mod common;

use common::{assert_close, Rng};
use dfpo::kernels::attention::{cpu, softmax_scale};
use dfpo::Error;

#[derive(Clone, Debug)]
struct Shape {
    b: usize,
    s: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    lens: Vec<u32>,
}

impl Shape {
    fn nq(&self) -> usize {
        self.b * self.s * self.hq * self.d
    }
    fn nk(&self) -> usize {
        self.b * self.s * self.hkv * self.d
    }
    fn nl(&self) -> usize {
        self.b * self.hq * self.s
    }
}

/// Random [B][S][H][D] values (N(0, sigma)) with NaN at padded positions.
fn tokens(rng: &mut Rng, sh: &Shape, h: usize, sigma: f64) -> Vec<f64> {
    let mut x = rng.normal_vec_f64(sh.b * sh.s * h * sh.d, sigma);
    for b in 0..sh.b {
        for s in sh.lens[b] as usize..sh.s {
            let o = (b * sh.s + s) * h * sh.d;
            x[o..o + h * sh.d].fill(f64::NAN);
        }
    }
    x
}

fn random_lens(rng: &mut Rng, b: usize, s: usize) -> Vec<u32> {
    (0..b)
        .map(|i| match i % 3 {
            0 => s as u32,
            1 if b > 2 => 0,
            _ => 1 + (rng.next_u64() % s as u64) as u32,
        })
        .collect()
}

fn forward(sh: &Shape, q: &[f64], k: &[f64], v: &[f64], scale: f64) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![f64::NAN; sh.nq()];
    let mut lse = vec![f64::NAN; sh.nl()];
    cpu::attention_forward(
        q, k, v, &sh.lens, sh.b, sh.s, sh.hq, sh.hkv, sh.d, scale, &mut out, &mut lse,
    )
    .unwrap();
    (out, lse)
}

/// softmax(Q Kᵀ scale + mask) V per (b, h) with the whole masked score matrix materialised.
fn naive(sh: &Shape, q: &[f64], k: &[f64], v: &[f64], scale: f64) -> (Vec<f64>, Vec<f64>) {
    let (s, d, g) = (sh.s, sh.d, sh.hq / sh.hkv);
    let mut out = vec![0.0; sh.nq()];
    let mut lse = vec![0.0; sh.nl()];
    for b in 0..sh.b {
        let len = sh.lens[b] as usize;
        for h in 0..sh.hq {
            let hk = h / g;
            let qa = |i: usize, x: usize| q[((b * s + i) * sh.hq + h) * d + x];
            let ka = |j: usize, x: usize| k[((b * s + j) * sh.hkv + hk) * d + x];
            let va = |j: usize, x: usize| v[((b * s + j) * sh.hkv + hk) * d + x];
            let mut sc = vec![vec![f64::NEG_INFINITY; len]; len];
            for (i, row) in sc.iter_mut().enumerate() {
                for (j, x) in row.iter_mut().enumerate().take(i + 1) {
                    *x = scale * (0..d).map(|c| qa(i, c) * ka(j, c)).sum::<f64>();
                }
            }
            for (i, row) in sc.iter().enumerate() {
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = row.iter().map(|x| (x - m).exp() / z).collect();
                for c in 0..d {
                    out[((b * s + i) * sh.hq + h) * d + c] = (0..len)
                        .map(|j| if p[j] > 0.0 { p[j] * va(j, c) } else { 0.0 })
                        .sum();
                }
                lse[(b * sh.hq + h) * s + i] = m + z.ln();
            }
        }
    }
    (out, lse)
}

fn assert_close64(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g} want {w}"
        );
    }
}

fn shapes(rng: &mut Rng) -> Vec<Shape> {
    let mut v = Vec::new();
    for &(hq, hkv) in &[(2, 2), (4, 2), (4, 1), (3, 3)] {
        for &s in &[1usize, 5, 17, 33] {
            let b = 3;
            v.push(Shape {
                b,
                s,
                hq,
                hkv,
                d: [3, 8, 16][(rng.next_u64() % 3) as usize],
                lens: random_lens(rng, b, s),
            });
        }
    }
    v
}

#[test]
fn forward_matches_naive_materialised_softmax() {
    let mut rng = Rng::fresh("forward_matches_naive_materialised_softmax");
    for sh in shapes(&mut rng) {
        let q = tokens(&mut rng, &sh, sh.hq, 1.3);
        let k = tokens(&mut rng, &sh, sh.hkv, 1.3);
        let v = tokens(&mut rng, &sh, sh.hkv, 1.0);
        let scale = softmax_scale(sh.d) as f64;
        let (out, lse) = forward(&sh, &q, &k, &v, scale);
        // Padding: zeros exactly; valid rows finite (the NaN in padded inputs must not leak).
        for b in 0..sh.b {
            for s in 0..sh.s {
                for h in 0..sh.hq {
                    let o = ((b * sh.s + s) * sh.hq + h) * sh.d;
                    let l = lse[(b * sh.hq + h) * sh.s + s];
                    if s >= sh.lens[b] as usize {
                        assert!(
                            out[o..o + sh.d].iter().all(|&x| x == 0.0) && l == 0.0,
                            "{sh:?}"
                        );
                    } else {
                        assert!(out[o..o + sh.d].iter().all(|x| x.is_finite()) && l.is_finite());
                    }
                }
            }
        }
        let (no, nl) = naive(&sh, &q, &k, &v, scale);
        assert_close64(&format!("out {sh:?}"), &out, &no, 1e-12);
        assert_close64(&format!("lse {sh:?}"), &lse, &nl, 1e-12);
    }
}

#[test]
fn lse_is_the_direct_log_sum_exp_and_rows_are_convex_combinations() {
    let mut rng = Rng::fresh("lse_is_the_direct_log_sum_exp");
    let sh = Shape {
        b: 2,
        s: 23,
        hq: 4,
        hkv: 2,
        d: 8,
        lens: vec![23, 11],
    };
    let q = tokens(&mut rng, &sh, sh.hq, 1.0);
    let k = tokens(&mut rng, &sh, sh.hkv, 1.0);
    let v = tokens(&mut rng, &sh, sh.hkv, 1.0);
    let scale = 0.4;
    let (out, lse) = forward(&sh, &q, &k, &v, scale);
    for b in 0..2 {
        for h in 0..4 {
            let hk = h / 2;
            for i in 0..sh.lens[b] as usize {
                let qi = &q[((b * 23 + i) * 4 + h) * 8..][..8];
                let direct: f64 = (0..=i)
                    .map(|j| {
                        let kj = &k[((b * 23 + j) * 2 + hk) * 8..][..8];
                        (scale * qi.iter().zip(kj).map(|(a, c)| a * c).sum::<f64>()).exp()
                    })
                    .sum::<f64>()
                    .ln();
                let got = lse[(b * 4 + h) * 23 + i];
                assert!((got - direct).abs() < 1e-12, "lse {got} vs {direct}");
                // Each output lies within the range of the values it averages.
                for c in 0..8 {
                    let vals = (0..=i).map(|j| v[((b * 23 + j) * 2 + hk) * 8 + c]);
                    let (lo, hi) =
                        vals.fold((f64::MAX, f64::MIN), |(l, u), x| (l.min(x), u.max(x)));
                    let o = out[((b * 23 + i) * 4 + h) * 8 + c];
                    assert!(o >= lo - 1e-12 && o <= hi + 1e-12);
                }
            }
        }
    }
}

#[test]
fn huge_scores_give_the_argmax_value_without_overflow() {
    // With scores ~1e4 a direct softmax overflows; the stable reference returns v of the argmax
    // key (unique with probability 1) and lse = the max score (up to e^-gap terms).
    let mut rng = Rng::fresh("huge_scores_give_the_argmax_value");
    let sh = Shape {
        b: 1,
        s: 12,
        hq: 2,
        hkv: 1,
        d: 4,
        lens: vec![12],
    };
    let q = tokens(&mut rng, &sh, 2, 1.0);
    let k = tokens(&mut rng, &sh, 1, 1.0);
    let v = tokens(&mut rng, &sh, 1, 1.0);
    let scale = 1e4;
    let (out, lse) = forward(&sh, &q, &k, &v, scale);
    for h in 0..2 {
        for i in 0..12 {
            let qi = &q[(i * 2 + h) * 4..][..4];
            let scores: Vec<f64> = (0..=i)
                .map(|j| {
                    scale
                        * qi.iter()
                            .zip(&k[j * 4..j * 4 + 4])
                            .map(|(a, c)| a * c)
                            .sum::<f64>()
                })
                .collect();
            let (arg, &mx) = scores
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.partial_cmp(b.1).unwrap())
                .unwrap();
            let gap = scores
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != arg)
                .map(|(_, x)| mx - x)
                .fold(f64::INFINITY, f64::min);
            if gap < 50.0 {
                continue; // a near tie: the limit is not reached
            }
            assert!((lse[h * 12 + i] - mx).abs() < 1e-9 * mx.abs().max(1.0));
            for c in 0..4 {
                assert!((out[(i * 2 + h) * 4 + c] - v[arg * 4 + c]).abs() < 1e-12);
            }
        }
    }
}

/// Σ w ∘ out over valid positions, in f64.
fn loss(sh: &Shape, q: &[f64], k: &[f64], v: &[f64], w: &[f64], scale: f64) -> f64 {
    let (out, _) = forward(sh, q, k, v, scale);
    let mut l = 0.0;
    for b in 0..sh.b {
        for s in 0..sh.lens[b] as usize {
            let o = (b * sh.s + s) * sh.hq * sh.d;
            for x in o..o + sh.hq * sh.d {
                l += w[x] * out[x];
            }
        }
    }
    l
}

#[test]
fn backward_matches_central_finite_differences() {
    let mut rng = Rng::fresh("backward_matches_central_finite_differences");
    let cases = [
        Shape {
            b: 2,
            s: 6,
            hq: 2,
            hkv: 2,
            d: 3,
            lens: vec![6, 4],
        },
        Shape {
            b: 2,
            s: 7,
            hq: 4,
            hkv: 2,
            d: 3,
            lens: vec![3, 7],
        },
        Shape {
            b: 3,
            s: 5,
            hq: 4,
            hkv: 1,
            d: 2,
            lens: vec![5, 0, 1],
        },
        Shape {
            b: 1,
            s: 1,
            hq: 2,
            hkv: 1,
            d: 4,
            lens: vec![1],
        },
    ];
    for sh in cases {
        let q = tokens(&mut rng, &sh, sh.hq, 1.0);
        let k = tokens(&mut rng, &sh, sh.hkv, 1.0);
        let v = tokens(&mut rng, &sh, sh.hkv, 1.0);
        let w = tokens(&mut rng, &sh, sh.hq, 1.0); // dout: NaN on padding must not leak
        let scale = 0.7;
        let (out, lse) = forward(&sh, &q, &k, &v, scale);
        // Gradients accumulate: start from random values (NaN on padding, which must stay NaN).
        let dq0 = tokens(&mut rng, &sh, sh.hq, 1.0);
        let dk0 = tokens(&mut rng, &sh, sh.hkv, 1.0);
        let dv0 = tokens(&mut rng, &sh, sh.hkv, 1.0);
        let (mut dq, mut dk, mut dv) = (dq0.clone(), dk0.clone(), dv0.clone());
        cpu::attention_backward(
            &q, &k, &v, &out, &lse, &w, &sh.lens, sh.b, sh.s, sh.hq, sh.hkv, sh.d, scale, &mut dq,
            &mut dk, &mut dv,
        )
        .unwrap();
        let eps = 1e-6;
        for (name, x, g, g0) in [
            ("q", &q, &dq, &dq0),
            ("k", &k, &dk, &dk0),
            ("v", &v, &dv, &dv0),
        ] {
            for i in 0..x.len() {
                if x[i].is_nan() {
                    assert!(g[i].is_nan(), "d{name}[{i}] on padding was touched");
                    continue;
                }
                let mut xp = x.clone();
                xp[i] += eps;
                let mut xm = x.clone();
                xm[i] -= eps;
                let (lp, lm) = match name {
                    "q" => (
                        loss(&sh, &xp, &k, &v, &w, scale),
                        loss(&sh, &xm, &k, &v, &w, scale),
                    ),
                    "k" => (
                        loss(&sh, &q, &xp, &v, &w, scale),
                        loss(&sh, &q, &xm, &v, &w, scale),
                    ),
                    _ => (
                        loss(&sh, &q, &k, &xp, &w, scale),
                        loss(&sh, &q, &k, &xm, &w, scale),
                    ),
                };
                let fd = (lp - lm) / (2.0 * eps);
                let an = g[i] - g0[i];
                assert!(
                    (fd - an).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "d{name}[{i}] {sh:?}: analytic {an} vs finite difference {fd}"
                );
            }
        }
    }
}

#[test]
fn decode_equals_the_last_row_of_the_full_forward() {
    let mut rng = Rng::fresh("decode_equals_the_last_row_of_the_full_forward");
    for &(hq, hkv, d) in &[(2usize, 2usize, 8usize), (4, 2, 5), (7, 1, 16), (4, 4, 3)] {
        let s = 19;
        let sh = Shape {
            b: 4,
            s,
            hq,
            hkv,
            d,
            lens: vec![19, 0, 1, 1 + (rng.next_u64() % 19) as u32],
        };
        let q = tokens(&mut rng, &sh, hq, 1.2);
        let k = tokens(&mut rng, &sh, hkv, 1.2);
        let v = tokens(&mut rng, &sh, hkv, 1.0);
        let scale = softmax_scale(d) as f64;
        let (out, _) = forward(&sh, &q, &k, &v, scale);
        // The cache laid out [B][Hkv][max_len][D] from k/v, NaN past each length.
        let max_len = s + 5;
        let mut kc = vec![f64::NAN; sh.b * hkv * max_len * d];
        let mut vc = kc.clone();
        let mut qd = vec![0.0; sh.b * hq * d];
        for b in 0..sh.b {
            let len = sh.lens[b] as usize;
            for hk in 0..hkv {
                for j in 0..len {
                    let src = ((b * s + j) * hkv + hk) * d;
                    let dst = ((b * hkv + hk) * max_len + j) * d;
                    kc[dst..dst + d].copy_from_slice(&k[src..src + d]);
                    vc[dst..dst + d].copy_from_slice(&v[src..src + d]);
                }
            }
            if len > 0 {
                let src = (b * s + len - 1) * hq * d;
                qd[b * hq * d..(b + 1) * hq * d].copy_from_slice(&q[src..src + hq * d]);
            }
        }
        let mut od = vec![f64::NAN; sh.b * hq * d];
        cpu::decode_attention(
            &qd, &kc, &vc, &sh.lens, sh.b, hq, hkv, max_len, d, scale, &mut od,
        )
        .unwrap();
        for b in 0..sh.b {
            let len = sh.lens[b] as usize;
            let got = &od[b * hq * d..(b + 1) * hq * d];
            if len == 0 {
                assert!(got.iter().all(|&x| x == 0.0));
                continue;
            }
            let want = &out[(b * s + len - 1) * hq * d..][..hq * d];
            assert_close64(&format!("decode b={b} hq={hq} hkv={hkv}"), got, want, 1e-13);
        }
    }
}

#[test]
fn f32_reference_tracks_f64() {
    let mut rng = Rng::fresh("f32_reference_tracks_f64");
    let sh = Shape {
        b: 2,
        s: 128,
        hq: 4,
        hkv: 2,
        d: 64,
        lens: vec![128, 77],
    };
    let q = tokens(&mut rng, &sh, sh.hq, 1.0);
    let k = tokens(&mut rng, &sh, sh.hkv, 1.0);
    let v = tokens(&mut rng, &sh, sh.hkv, 1.0);
    let dout = tokens(&mut rng, &sh, sh.hq, 1.0);
    let scale = softmax_scale(64);
    let (o64, l64) = forward(&sh, &q, &k, &v, scale as f64);
    let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
    let (q32, k32, v32, do32) = (f(&q), f(&k), f(&v), f(&dout));
    let mut o32 = vec![0.0f32; sh.nq()];
    let mut l32 = vec![0.0f32; sh.nl()];
    cpu::attention_forward(
        &q32, &k32, &v32, &sh.lens, 2, 128, 4, 2, 64, scale, &mut o32, &mut l32,
    )
    .unwrap();
    assert_close("f32 out", &o32, &f(&o64), 1e-4, 1e-5);
    assert_close("f32 lse", &l32, &f(&l64), 1e-5, 1e-5);
    let (mut dq64, mut dk64, mut dv64) =
        (vec![0.0; sh.nq()], vec![0.0; sh.nk()], vec![0.0; sh.nk()]);
    cpu::attention_backward(
        &q,
        &k,
        &v,
        &o64,
        &l64,
        &dout,
        &sh.lens,
        2,
        128,
        4,
        2,
        64,
        scale as f64,
        &mut dq64,
        &mut dk64,
        &mut dv64,
    )
    .unwrap();
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; sh.nq()],
        vec![0.0f32; sh.nk()],
        vec![0.0f32; sh.nk()],
    );
    cpu::attention_backward(
        &q32, &k32, &v32, &o32, &l32, &do32, &sh.lens, 2, 128, 4, 2, 64, scale, &mut dq, &mut dk,
        &mut dv,
    )
    .unwrap();
    // Padding rows stay 0 (their initial value), NaN in padded inputs notwithstanding.
    assert_close("f32 dq", &dq, &f(&dq64), 1e-3, 1e-4);
    assert_close("f32 dk", &dk, &f(&dk64), 1e-3, 1e-4);
    assert_close("f32 dv", &dv, &f(&dv64), 1e-3, 1e-4);
}

fn expect_err<T: std::fmt::Debug>(r: Result<T, Error>, needle: &str) {
    match r {
        Err(e @ (Error::Shape(_) | Error::Invalid(_))) => {
            let msg = e.to_string();
            assert!(
                msg.contains(needle),
                "error {msg:?} does not name {needle:?}"
            );
        }
        other => panic!("expected an error naming {needle:?}, got {other:?}"),
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let (b, s, hq, hkv, d) = (2, 4, 4, 2, 3);
    let nq = b * s * hq * d;
    let nk = b * s * hkv * d;
    let nl = b * hq * s;
    let q = vec![0.1f32; nq];
    let k = vec![0.2f32; nk];
    let v = vec![0.3f32; nk];
    let lens = vec![4u32, 2];
    let (mut o, mut l) = (vec![0.0f32; nq], vec![0.0f32; nl]);
    let f = |q: &[f32],
             k: &[f32],
             lens: &[u32],
             hq: usize,
             hkv: usize,
             o: &mut [f32],
             l: &mut [f32],
             scale: f32| {
        cpu::attention_forward(q, k, &v, lens, b, s, hq, hkv, d, scale, o, l)
    };
    expect_err(f(&q[1..], &k, &lens, hq, hkv, &mut o, &mut l, 0.5), "q");
    expect_err(f(&q, &k[1..], &lens, hq, hkv, &mut o, &mut l, 0.5), "k");
    expect_err(
        f(&q, &k, &lens[..1], hq, hkv, &mut o, &mut l, 0.5),
        "seq_lens",
    );
    expect_err(
        f(&q, &k, &[5, 1], hq, hkv, &mut o, &mut l, 0.5),
        "seq_lens[0] = 5",
    );
    expect_err(
        f(&q, &k, &lens, 4, 3, &mut o, &mut l, 0.5),
        "multiple of Hkv",
    );
    expect_err(
        f(&q, &k, &lens, 4, 0, &mut o, &mut l, 0.5),
        "multiple of Hkv",
    );
    expect_err(f(&q, &k, &lens, hq, hkv, &mut o[1..], &mut l, 0.5), "out");
    expect_err(f(&q, &k, &lens, hq, hkv, &mut o, &mut l[1..], 0.5), "lse");
    expect_err(f(&q, &k, &lens, hq, hkv, &mut o, &mut l, f32::NAN), "scale");
    cpu::attention_forward(&q, &k, &v, &lens, b, s, hq, hkv, d, 0.5, &mut o, &mut l).unwrap();

    let (mut dq, mut dk, mut dv) = (vec![0.0f32; nq], vec![0.0f32; nk], vec![0.0f32; nk]);
    let mut bad_lse = l.clone();
    bad_lse[1] = f32::NAN; // b 0, h 0, s 1: valid
    expect_err(
        cpu::attention_backward(
            &q, &k, &v, &o, &bad_lse, &q, &lens, b, s, hq, hkv, d, 0.5, &mut dq, &mut dk, &mut dv,
        ),
        "lse[b=0][h=0][s=1]",
    );
    bad_lse = l.clone();
    bad_lse[(hq + 1) * s - 1] = f32::NAN; // b 1, h 0, s 3: padding, ignored
    cpu::attention_backward(
        &q, &k, &v, &o, &bad_lse, &q, &lens, b, s, hq, hkv, d, 0.5, &mut dq, &mut dk, &mut dv,
    )
    .unwrap();
    expect_err(
        cpu::attention_backward(
            &q,
            &k,
            &v,
            &o,
            &l,
            &q,
            &lens,
            b,
            s,
            hq,
            hkv,
            d,
            0.5,
            &mut dq,
            &mut dk[1..],
            &mut dv,
        ),
        "dk",
    );
    expect_err(
        cpu::attention_backward(
            &q,
            &k,
            &v,
            &o[2..],
            &l,
            &q,
            &lens,
            b,
            s,
            hq,
            hkv,
            d,
            0.5,
            &mut dq,
            &mut dk,
            &mut dv,
        ),
        "out",
    );

    let max_len = 6;
    let qd = vec![0.1f32; b * hq * d];
    let kc = vec![0.2f32; b * hkv * max_len * d];
    let mut od = vec![0.0f32; b * hq * d];
    expect_err(
        cpu::decode_attention(&qd, &kc, &kc, &[7, 1], b, hq, hkv, max_len, d, 0.5, &mut od),
        "cache_lens[0] = 7",
    );
    expect_err(
        cpu::decode_attention(&qd, &kc, &kc, &[1, 1], b, hq, hkv, 0, d, 0.5, &mut od),
        "max_len",
    );
    expect_err(
        cpu::decode_attention(
            &qd,
            &kc[1..],
            &kc,
            &[1, 1],
            b,
            hq,
            hkv,
            max_len,
            d,
            0.5,
            &mut od,
        ),
        "k_cache",
    );
    expect_err(
        cpu::decode_attention(&qd, &kc, &kc, &[1, 1], b, 3, hkv, max_len, d, 0.5, &mut od),
        "multiple of Hkv",
    );
    cpu::decode_attention(&qd, &kc, &kc, &[6, 0], b, hq, hkv, max_len, d, 0.5, &mut od).unwrap();
}
