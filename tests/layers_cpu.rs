//! CPU references of the memory-bound transformer layers (kernels/norm.cu, rope.cu, act.cu,
//! embed.cu) against independent truths: direct formulas in f64, an explicit complex rotation and
//! numbers from Hugging Face transformers for RoPE, brute force for the embedding backward, and
//! central finite differences in f64 for every backward. Plus the embedding backward's CUDA
//! schedule (the packed plan) replayed on the CPU, and bad-input errors.

mod common;

use common::{assert_close, assert_close_f64, Rng};
use dfpo::kernels::{act, embed, norm, rope};
use dfpo::Error;

/// Central difference of `f` along coordinate `i` of `x`.
fn fd(f: &dyn Fn(&[f64]) -> f64, x: &[f64], i: usize) -> f64 {
    let h = 1e-6 * (1.0 + x[i].abs());
    let mut p = x.to_vec();
    p[i] = x[i] + h;
    let fp = f(&p);
    p[i] = x[i] - h;
    let fm = f(&p);
    (fp - fm) / (2.0 * h)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Checks `got[i] − init[i]` (an accumulated gradient) against finite differences of `f` at `x`.
fn check_grad(what: &str, f: &dyn Fn(&[f64]) -> f64, x: &[f64], init: &[f64], got: &[f64]) {
    for i in 0..x.len() {
        let want = fd(f, x, i);
        let g = got[i] - init[i];
        assert!(
            (g - want).abs() <= 1e-6 * (1.0 + want.abs()),
            "{what}[{i}]: analytic {g} vs finite difference {want}"
        );
    }
}

fn expect_err<T: std::fmt::Debug>(r: dfpo::Result<T>, shape: bool, needle: &str) {
    match r {
        Err(Error::Shape(m)) if shape => {
            assert!(
                m.contains(needle),
                "Shape error {m:?} should mention {needle:?}"
            )
        }
        Err(Error::Invalid(m)) if !shape => {
            assert!(
                m.contains(needle),
                "Invalid error {m:?} should mention {needle:?}"
            )
        }
        other => panic!(
            "expected {} error mentioning {needle:?}, got {other:?}",
            if shape { "Shape" } else { "Invalid" }
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

const EPS: f32 = 1e-6;

#[test]
fn rmsnorm_fwd_matches_definition() {
    let mut rng = Rng::fresh("rmsnorm_fwd_matches_definition");
    for &(n, d) in &[(1usize, 1usize), (3, 7), (5, 64), (2, 896)] {
        let x = rng.normal_vec_f64(n * d, 1.5);
        let w = rng.normal_vec_f64(d, 1.0);
        let (mut y, mut rstd) = (vec![f64::NAN; n * d], vec![f64::NAN; n]);
        norm::cpu::rmsnorm_fwd(&x, &w, n, d, EPS, &mut y, &mut rstd).unwrap();
        for r in 0..n {
            let row = &x[r * d..(r + 1) * d];
            let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
            let want_r = 1.0 / (ms + EPS as f64).sqrt();
            assert!((rstd[r] - want_r).abs() <= 1e-13 * want_r, "rstd[{r}]");
            for j in 0..d {
                let want = row[j] * want_r * w[j];
                assert!(
                    (y[r * d + j] - want).abs() <= 1e-13 * (1.0 + want.abs()),
                    "y[{r}][{j}]"
                );
            }
        }
        // The f32 instance agrees with the f64 one to f32 precision.
        let (x32, w32): (Vec<f32>, Vec<f32>) = (
            x.iter().map(|&v| v as f32).collect(),
            w.iter().map(|&v| v as f32).collect(),
        );
        let (mut y32, mut r32) = (vec![f32::NAN; n * d], vec![f32::NAN; n]);
        norm::cpu::rmsnorm_fwd(&x32, &w32, n, d, EPS, &mut y32, &mut r32).unwrap();
        let y64: Vec<f32> = y.iter().map(|&v| v as f32).collect();
        assert_close("rmsnorm f32 vs f64", &y32, &y64, 1e-5, 1e-6);
    }
}

#[test]
fn add_rmsnorm_fwd_is_add_then_rmsnorm() {
    let mut rng = Rng::fresh("add_rmsnorm_fwd_is_add_then_rmsnorm");
    let (n, d) = (4, 24);
    let x = rng.normal_vec_f64(n * d, 1.0);
    let res = rng.normal_vec_f64(n * d, 2.0);
    let w = rng.normal_vec_f64(d, 1.0);
    let (mut h, mut y, mut rstd) = (
        vec![f64::NAN; n * d],
        vec![f64::NAN; n * d],
        vec![f64::NAN; n],
    );
    norm::cpu::add_rmsnorm_fwd(&x, &res, &w, n, d, EPS, &mut h, &mut y, &mut rstd).unwrap();
    let sum: Vec<f64> = x.iter().zip(&res).map(|(a, b)| a + b).collect();
    assert_close_f64("h", &h, &sum, 0.0, 0.0);
    let (mut y2, mut r2) = (vec![0.0; n * d], vec![0.0; n]);
    norm::cpu::rmsnorm_fwd(&sum, &w, n, d, EPS, &mut y2, &mut r2).unwrap();
    assert_close_f64("y", &y, &y2, 0.0, 0.0);
    assert_close_f64("rstd", &rstd, &r2, 0.0, 0.0);
}

#[test]
fn rmsnorm_bwd_matches_finite_differences() {
    let mut rng = Rng::fresh("rmsnorm_bwd_matches_finite_differences");
    for &(n, d) in &[(1usize, 1usize), (3, 5), (2, 16)] {
        let x = rng.normal_vec_f64(n * d, 1.0);
        let w = rng.normal_vec_f64(d, 1.0);
        let dy = rng.normal_vec_f64(n * d, 1.0);
        // A small eps makes the d = 1 case a real test of the rstd path too.
        let eps = 0.05f32;
        let loss = |x: &[f64], w: &[f64]| {
            let (mut y, mut r) = (vec![0.0; n * d], vec![0.0; n]);
            norm::cpu::rmsnorm_fwd(x, w, n, d, eps, &mut y, &mut r).unwrap();
            dot(&y, &dy)
        };
        let (mut y, mut rstd) = (vec![0.0; n * d], vec![0.0; n]);
        norm::cpu::rmsnorm_fwd(&x, &w, n, d, eps, &mut y, &mut rstd).unwrap();
        // Accumulation: start from random gradients and check the increment.
        let dx0 = rng.normal_vec_f64(n * d, 1.0);
        let dw0 = rng.normal_vec_f64(d, 1.0);
        let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
        norm::cpu::rmsnorm_bwd(&x, &w, &rstd, &dy, n, d, &mut dx, &mut dw).unwrap();
        check_grad("rmsnorm dx", &|v| loss(v, &w), &x, &dx0, &dx);
        check_grad("rmsnorm dw", &|v| loss(&x, v), &w, &dw0, &dw);
    }
}

#[test]
fn add_rmsnorm_bwd_matches_finite_differences() {
    let mut rng = Rng::fresh("add_rmsnorm_bwd_matches_finite_differences");
    let (n, d) = (3, 6);
    let x = rng.normal_vec_f64(n * d, 1.0);
    let res = rng.normal_vec_f64(n * d, 1.0);
    let w = rng.normal_vec_f64(d, 1.0);
    let dy = rng.normal_vec_f64(n * d, 1.0);
    let dh = rng.normal_vec_f64(n * d, 1.0);
    for with_dh in [false, true] {
        // L = Σ y·dy + Σ h·dh (h also feeds the next residual add).
        let loss = |x: &[f64], res: &[f64], w: &[f64]| {
            let (mut h, mut y, mut r) = (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; n]);
            norm::cpu::add_rmsnorm_fwd(x, res, w, n, d, EPS, &mut h, &mut y, &mut r).unwrap();
            dot(&y, &dy) + if with_dh { dot(&h, &dh) } else { 0.0 }
        };
        let (mut h, mut y, mut rstd) = (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; n]);
        norm::cpu::add_rmsnorm_fwd(&x, &res, &w, n, d, EPS, &mut h, &mut y, &mut rstd).unwrap();
        let dx0 = rng.normal_vec_f64(n * d, 1.0);
        let dr0 = rng.normal_vec_f64(n * d, 1.0);
        let dw0 = rng.normal_vec_f64(d, 1.0);
        let (mut dx, mut dr, mut dw) = (dx0.clone(), dr0.clone(), dw0.clone());
        norm::cpu::add_rmsnorm_bwd(
            &h,
            &w,
            &rstd,
            &dy,
            with_dh.then_some(&dh[..]),
            n,
            d,
            &mut dx,
            &mut dr,
            &mut dw,
        )
        .unwrap();
        check_grad("add_rmsnorm dx", &|v| loss(v, &res, &w), &x, &dx0, &dx);
        check_grad("add_rmsnorm dres", &|v| loss(&x, v, &w), &res, &dr0, &dr);
        check_grad("add_rmsnorm dw", &|v| loss(&x, &res, v), &w, &dw0, &dw);

        // The one-buffer pattern of the module doc: dR holds dh_down, rmsnorm_bwd(h) adds the
        // norm's gradient, and dR is then the gradient of both x and residual.
        let mut d_r = if with_dh {
            dh.clone()
        } else {
            vec![0.0; n * d]
        };
        let mut dw2 = vec![0.0; d];
        norm::cpu::rmsnorm_bwd(&h, &w, &rstd, &dy, n, d, &mut d_r, &mut dw2).unwrap();
        let inc: Vec<f64> = dx.iter().zip(&dx0).map(|(a, b)| a - b).collect();
        assert_close_f64("one-buffer pattern", &d_r, &inc, 1e-12, 1e-12);
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------------

#[test]
fn rope_fwd_matches_complex_rotation() {
    let mut rng = Rng::fresh("rope_fwd_matches_complex_rotation");
    for &(n, hq, hkv, dh, theta) in &[
        (5usize, 3usize, 1usize, 8usize, 10000.0f32),
        (4, 2, 2, 64, 1_000_000.0),
        (3, 1, 0, 2, 500_000.0),
        (2, 0, 2, 6, 10.0),
    ] {
        let pos: Vec<i32> = (0..n).map(|_| (rng.next_u64() % 200) as i32).collect();
        let q0 = rng.normal_vec_f64(n * hq * dh, 1.0);
        let k0 = rng.normal_vec_f64(n * hkv * dh, 1.0);
        let (mut q, mut k) = (q0.clone(), k0.clone());
        rope::cpu::rope_fwd(&mut q, &mut k, &pos, n, hq, hkv, dh, theta).unwrap();
        let half = dh / 2;
        // Independent: z = x_i + i·x_{i+half} times e^{iθ}, θ = pos·theta^(−2i/D) all in f64.
        // The reference uses HF's fp32 angle; their difference is the fp32 rounding of θ.
        let check = |x0: &[f64], x: &[f64], heads: usize| {
            for (t, &p) in pos.iter().enumerate() {
                for h in 0..heads {
                    let b = (t * heads + h) * dh;
                    for i in 0..half {
                        let th = p as f64 * (theta as f64).powf(-2.0 * i as f64 / dh as f64);
                        let (re, im) = (x0[b + i], x0[b + half + i]);
                        let (c, s) = (th.cos(), th.sin());
                        let (wr, wi) = (re * c - im * s, re * s + im * c);
                        let tol = (re.abs() + im.abs()) * (th.abs() * 4e-7 + 1e-14) + 1e-14;
                        assert!(
                            (x[b + i] - wr).abs() <= tol && (x[b + half + i] - wi).abs() <= tol,
                            "token {t} head {h} pair {i}: got ({}, {}) want ({wr}, {wi})",
                            x[b + i],
                            x[b + half + i]
                        );
                    }
                }
            }
        };
        check(&q0, &q, hq);
        check(&k0, &k, hkv);
    }
}

/// Inputs of the Hugging Face case below (the same formulas as in the generator).
fn hf_rope_inputs() -> (Vec<f32>, Vec<f32>) {
    let (n, hq, d) = (3usize, 2usize, 8usize);
    let mut q = Vec::new();
    for t in 0..n {
        for h in 0..hq {
            for j in 0..d {
                q.push((((t * hq + h) * d + j) as f32) * 0.25 - 5.0 + 0.125 * (j % 3) as f32);
            }
        }
    }
    let mut k = Vec::new();
    for t in 0..n {
        for j in 0..d {
            k.push(1.5 - 0.375 * j as f32 + 0.5 * t as f32);
        }
    }
    (q, k)
}

// Numbers from transformers 5.24.0 (torch 2.15.0, CPU, fp32), made by:
//   from transformers import Qwen2Config
//   from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb
//   cfg = Qwen2Config(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
//                     rope_parameters={"rope_type": "default", "rope_theta": theta})
//   rot = Qwen2RotaryEmbedding(cfg)
//   q = [[((t*2 + h)*8 + j)*0.25 - 5 + 0.125*(j % 3) for j in range(8)] ...]  -> [1, 3, 2, 8]
//   k = [[1.5 - 0.375*j + 0.5*t for j in range(8)] ...]                      -> [1, 3, 1, 8]
//   cos, sin = rot(q, torch.tensor([pos]))
//   qe, ke = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
//   print(rot.inv_freq, qe.transpose(1, 2).flatten(), ke.transpose(1, 2).flatten())
struct HfCase {
    theta: f32,
    pos: [i32; 3],
    inv_freq: [f32; 4],
    q_out: [f32; 48],
    k_out: [f32; 24],
}

#[allow(clippy::excessive_precision)]
const HF_CASES: [HfCase; 2] = [
    HfCase {
        theta: 10000.0,
        pos: [0, 5, 1234],
        inv_freq: [
            1.0,
            0.10000000149011612,
            0.009999999776482582,
            0.0010000000474974513,
        ],
        q_out: [
            -5.0,
            -4.625,
            -4.25,
            -4.25,
            -3.875,
            -3.5,
            -3.5,
            -3.125,
            -3.0,
            -2.625,
            -2.25,
            -2.25,
            -1.875,
            -1.5,
            -1.5,
            -1.125,
            -0.16379666328430176,
            -0.7882018685340881,
            -0.2746771574020386,
            -0.25437185168266296,
            0.9943820834159851,
            0.13915032148361206,
            0.4868803322315216,
            0.8737390637397766,
            2.321376323699951,
            0.008112192153930664,
            1.622865080833435,
            1.7356030941009521,
            -0.3561421036720276,
            2.8531665802001953,
            2.5843393802642822,
            2.883713960647583,
            -4.878602981567383,
            1.3063879013061523,
            4.6643171310424805,
            -3.361870288848877,
            -1.4882382154464722,
            -5.471195220947266,
            3.5435357093811035,
            5.150335311889648,
            -7.679559707641602,
            1.5676162242889404,
            7.062175750732422,
            -4.588576316833496,
            -1.881484031677246,
            -8.287532806396484,
            5.04362678527832,
            7.698902130126953,
        ],
        k_out: [
            1.5,
            1.125,
            0.75,
            0.375,
            0.0,
            -0.375,
            -0.75,
            -1.125,
            1.0467865467071533,
            1.3661434650421143,
            1.2609326839447021,
            0.8781140446662903,
            -1.776017427444458,
            0.8887643218040466,
            -0.18721361458301544,
            -0.6206172108650208,
            -2.598304271697998,
            -0.8765324950218201,
            1.7614635229110718,
            0.5723666548728943,
            0.7062685489654541,
            -2.0341930389404297,
            -0.1491517722606659,
            1.2564419507980347,
        ],
    },
    HfCase {
        theta: 1000000.0,
        pos: [3, 40000, 32767],
        inv_freq: [
            1.0,
            0.03162277862429619,
            0.0010000000474974513,
            3.162277425872162e-05,
        ],
        q_out: [
            5.496802806854248,
            -4.2726616859436035,
            -4.239480972290039,
            -4.249703407287598,
            3.1306209564208984,
            -3.922369956970215,
            -3.5127341747283936,
            -3.1254031658172607,
            3.2345774173736572,
            -2.471107244491577,
            -2.245490074157715,
            -2.2498931884765625,
            1.4328759908676147,
            -1.7419110536575317,
            -1.506743311882019,
            -1.1252135038375854,
            -0.4409049153327942,
            -0.20162466168403625,
            -0.20582205057144165,
            -0.9096675515174866,
            -0.9062162041664124,
            -0.7745789289474487,
            -0.5197473168373108,
            0.02510020136833191,
            -1.6888091564178467,
            -2.843414306640625,
            -3.0299243927001953,
            -2.2145538330078125,
            1.6320379972457886,
            0.23584091663360596,
            -0.3633972406387329,
            2.534536838531494,
            2.173325538635254,
            5.212579250335693,
            -3.5744731426239014,
            -2.284116506576538,
            4.614355564117432,
            2.1141533851623535,
            4.640650749206543,
            5.710598468780518,
            3.7628393173217773,
            7.957625389099121,
            -5.090475559234619,
            -2.986032485961914,
            6.953895568847656,
            2.7958590984344482,
            7.028481960296631,
            8.450546264648438,
        ],
        k_out: [
            -1.4849886894226074,
            1.1554635763168335,
            0.7522466778755188,
            0.37510672211647034,
            0.21167999505996704,
            -0.2667469084262848,
            -0.7477466464042664,
            -1.1249644756317139,
            0.17190510034561157,
            -0.7768754959106445,
            -0.6473942995071411,
            0.8594833612442017,
            2.054373025894165,
            1.432729721069336,
            1.09812593460083,
            0.6461721658706665,
            2.2681517601013184,
            2.1428587436676025,
            0.13743534684181213,
            0.8081316947937012,
            1.4510297775268555,
            -0.5607191920280457,
            1.7624163627624512,
            1.1194521188735962,
        ],
    },
];

#[test]
fn rope_matches_hugging_face() {
    for case in &HF_CASES {
        // inv_freq: HF's fp32 values exactly.
        for (i, &want) in case.inv_freq.iter().enumerate() {
            let got = rope::inv_freq(i, 8, case.theta);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "theta {} inv_freq[{i}]: {got} vs HF {want}",
                case.theta
            );
        }
        let (mut q, mut k) = hf_rope_inputs();
        rope::cpu::rope_fwd(&mut q, &mut k, &case.pos, 3, 2, 1, 8, case.theta).unwrap();
        // Same fp32 angles and products; cos/sin may differ from torch's fp32 cos/sin by an ulp.
        assert_close("HF q_embed", &q, &case.q_out, 1e-6, 2e-6);
        assert_close("HF k_embed", &k, &case.k_out, 1e-6, 2e-6);
    }
}

#[test]
fn rope_bwd_inverts_fwd_and_matches_finite_differences() {
    let mut rng = Rng::fresh("rope_bwd_inverts_fwd_and_matches_finite_differences");
    let (n, hq, hkv, dh, theta) = (4usize, 3usize, 2usize, 10usize, 10000.0f32);
    let pos: Vec<i32> = (0..n).map(|_| (rng.next_u64() % 5000) as i32).collect();
    let q0 = rng.normal_vec_f64(n * hq * dh, 1.0);
    let k0 = rng.normal_vec_f64(n * hkv * dh, 1.0);
    // Inverse property, f64 (exactly orthogonal rotations) and f32.
    let (mut q, mut k) = (q0.clone(), k0.clone());
    rope::cpu::rope_fwd(&mut q, &mut k, &pos, n, hq, hkv, dh, theta).unwrap();
    assert!(
        q.iter().zip(&q0).any(|(a, b)| (a - b).abs() > 1e-3),
        "rope_fwd changed nothing"
    );
    rope::cpu::rope_bwd(&mut q, &mut k, &pos, n, hq, hkv, dh, theta).unwrap();
    assert_close_f64("bwd(fwd(q))", &q, &q0, 1e-12, 1e-12);
    assert_close_f64("bwd(fwd(k))", &k, &k0, 1e-12, 1e-12);
    let q32: Vec<f32> = q0.iter().map(|&v| v as f32).collect();
    let k32: Vec<f32> = k0.iter().map(|&v| v as f32).collect();
    let (mut qa, mut ka) = (q32.clone(), k32.clone());
    rope::cpu::rope_fwd(&mut qa, &mut ka, &pos, n, hq, hkv, dh, theta).unwrap();
    rope::cpu::rope_bwd(&mut qa, &mut ka, &pos, n, hq, hkv, dh, theta).unwrap();
    assert_close("f32 bwd(fwd(q))", &qa, &q32, 1e-6, 1e-6);
    assert_close("f32 bwd(fwd(k))", &ka, &k32, 1e-6, 1e-6);

    // Finite differences of L = Σ rope(q)·Rq + Σ rope(k)·Rk.
    let rq = rng.normal_vec_f64(q0.len(), 1.0);
    let rk = rng.normal_vec_f64(k0.len(), 1.0);
    let loss = |q: &[f64], k: &[f64]| {
        let (mut q, mut k) = (q.to_vec(), k.to_vec());
        rope::cpu::rope_fwd(&mut q, &mut k, &pos, n, hq, hkv, dh, theta).unwrap();
        dot(&q, &rq) + dot(&k, &rk)
    };
    let (mut dq, mut dk) = (rq.clone(), rk.clone());
    rope::cpu::rope_bwd(&mut dq, &mut dk, &pos, n, hq, hkv, dh, theta).unwrap();
    let zq = vec![0.0; dq.len()];
    let zk = vec![0.0; dk.len()];
    check_grad("rope dq", &|v| loss(v, &k0), &q0, &zq, &dq);
    check_grad("rope dk", &|v| loss(&q0, v), &k0, &zk, &dk);
}

// ---------------------------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------------------------

#[test]
fn swiglu_fwd_matches_formula() {
    let mut rng = Rng::fresh("swiglu_fwd_matches_formula");
    let (n, inter) = (5usize, 9usize);
    let mut gu = rng.normal_vec_f64(n * 2 * inter, 3.0);
    // Extremes: e^−g overflows to ∞ for g = −800 and the output must be a clean 0.
    gu[0] = -800.0;
    gu[1] = 800.0;
    gu[2] = 0.0;
    let mut out = vec![f64::NAN; n * inter];
    act::cpu::swiglu_fwd(&gu, n, inter, &mut out).unwrap();
    for r in 0..n {
        for c in 0..inter {
            let (g, u) = (gu[r * 2 * inter + c], gu[r * 2 * inter + inter + c]);
            let silu = if g < -700.0 {
                0.0
            } else {
                g / (1.0 + (-g).exp())
            };
            let want = silu * u;
            let got = out[r * inter + c];
            assert!(
                got.is_finite() && (got - want).abs() <= 1e-14 * (1.0 + want.abs()),
                "out[{r}][{c}]: {got} vs {want}"
            );
        }
    }
}

#[test]
fn swiglu_bwd_matches_finite_differences() {
    let mut rng = Rng::fresh("swiglu_bwd_matches_finite_differences");
    let (n, inter) = (3usize, 7usize);
    let gu = rng.normal_vec_f64(n * 2 * inter, 2.0);
    let dout = rng.normal_vec_f64(n * inter, 1.0);
    let loss = |gu: &[f64]| {
        let mut out = vec![0.0; n * inter];
        act::cpu::swiglu_fwd(gu, n, inter, &mut out).unwrap();
        dot(&out, &dout)
    };
    let d0 = rng.normal_vec_f64(gu.len(), 1.0);
    let mut dgu = d0.clone();
    act::cpu::swiglu_bwd(&gu, &dout, n, inter, &mut dgu).unwrap();
    check_grad("swiglu dgu", &loss, &gu, &d0, &dgu);
}

// ---------------------------------------------------------------------------------------------
// Embedding
// ---------------------------------------------------------------------------------------------

#[test]
fn embed_fwd_gathers_rows() {
    let mut rng = Rng::fresh("embed_fwd_gathers_rows");
    let (v, d) = (11usize, 5usize);
    let table = rng.normal_vec_f64(v * d, 1.0);
    let ids: Vec<u32> = vec![3, 0, 10, 3, 3, 7];
    let mut out = vec![f64::NAN; ids.len() * d];
    embed::cpu::embed_fwd(&ids, &table, v, d, &mut out).unwrap();
    for (t, &id) in ids.iter().enumerate() {
        for j in 0..d {
            assert_eq!(out[t * d + j], table[id as usize * d + j], "out[{t}][{j}]");
        }
    }
}

#[test]
fn embed_bwd_repeated_ids_brute_force_and_finite_differences() {
    let mut rng = Rng::fresh("embed_bwd_repeated_ids_brute_force_and_finite_differences");
    let (v, d) = (9usize, 4usize);
    let ids: Vec<u32> = vec![2, 2, 5, 0, 2, 8, 5, 2];
    let n = ids.len();
    let dout = rng.normal_vec_f64(n * d, 1.0);
    let t0 = rng.normal_vec_f64(v * d, 1.0);
    let mut dt = t0.clone();
    embed::cpu::embed_bwd(&ids, &dout, v, d, &mut dt).unwrap();
    // Brute force: for every (row, column), the sum over the tokens carrying that id.
    for id in 0..v {
        for j in 0..d {
            let want: f64 = (0..n)
                .filter(|&t| ids[t] as usize == id)
                .map(|t| dout[t * d + j])
                .sum();
            let got = dt[id * d + j] - t0[id * d + j];
            assert!(
                (got - want).abs() < 1e-12,
                "dtable[{id}][{j}]: {got} vs {want}"
            );
        }
    }
    // Finite differences of L = Σ out·dout with respect to the table.
    let table = rng.normal_vec_f64(v * d, 1.0);
    let loss = |tb: &[f64]| {
        let mut out = vec![0.0; n * d];
        embed::cpu::embed_fwd(&ids, tb, v, d, &mut out).unwrap();
        dot(&out, &dout)
    };
    check_grad("embed dtable", &loss, &table, &t0, &dt);
}

/// Replays the CUDA backward's schedule on the CPU exactly as embed.cu reads the packed plan:
/// item sums in perm order, direct adds or slots, then group sums in slot order.
fn replay_plan(plan: &embed::EmbedBwdPlan, dout: &[f64], d: usize, dtable: &mut [f64]) {
    let p = plan.packed();
    let n = plan.n();
    let gmax = embed::max_groups(n);
    assert_eq!(p.len(), embed::plan_len(n));
    let (n_items, n_groups) = (p[0] as usize, p[1] as usize);
    assert_eq!(p[2] as usize, n);
    let item_id = &p[4..4 + n];
    let item_off = &p[4 + n..4 + 2 * n + 1];
    let item_slot = &p[4 + 2 * n + 1..4 + 3 * n + 1];
    let perm = &p[4 + 3 * n + 1..4 + 4 * n + 1];
    let grp = &p[4 + 4 * n + 1..];
    assert_eq!(grp.len(), 3 * gmax);
    let mut ws = vec![f64::NAN; embed::cuda::embed_bwd_workspace_len(n, d)];
    for it in 0..n_items {
        let id = item_id[it] as usize;
        let mut acc = vec![0.0; d];
        for r in item_off[it]..item_off[it + 1] {
            let t = perm[r as usize] as usize;
            for j in 0..d {
                acc[j] += dout[t * d + j];
            }
        }
        if item_slot[it] == u32::MAX {
            for j in 0..d {
                dtable[id * d + j] += acc[j];
            }
        } else {
            let s = item_slot[it] as usize;
            ws[s * d..(s + 1) * d].copy_from_slice(&acc);
        }
    }
    for g in 0..n_groups {
        let (id, s0, cnt) = (
            grp[g] as usize,
            grp[gmax + g] as usize,
            grp[2 * gmax + g] as usize,
        );
        for j in 0..d {
            let s: f64 = (0..cnt).map(|k| ws[(s0 + k) * d + j]).sum();
            dtable[id * d + j] += s;
        }
    }
}

#[test]
fn embed_bwd_plan_is_a_complete_deterministic_schedule() {
    let mut rng = Rng::fresh("embed_bwd_plan_is_a_complete_deterministic_schedule");
    let r = embed::EMBED_ROWS_PER_ITEM;
    let v = 1000usize;
    // Mixed: a padding id repeated 5·R + 3 times, ids repeated exactly R and R + 1 times, and
    // random ids (many singletons).
    let mut ids: Vec<u32> = Vec::new();
    ids.extend(std::iter::repeat_n(0u32, 5 * r + 3));
    ids.extend(std::iter::repeat_n(7u32, r));
    ids.extend(std::iter::repeat_n(999u32, r + 1));
    for _ in 0..300 {
        // Ids 10..990 only, so the counts of 0, 7 and 999 stay as set above.
        ids.push(10 + (rng.next_u64() % 980) as u32);
    }
    // Shuffle (Fisher-Yates) so repeated ids are scattered.
    for i in (1..ids.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        ids.swap(i, j);
    }
    let n = ids.len();
    let plan = embed::EmbedBwdPlan::new(&ids, v).unwrap();
    let p = plan.packed();
    // perm is a permutation of the tokens, sorted by id, stable within an id.
    let perm = &p[4 + 3 * n + 1..4 + 4 * n + 1];
    let mut seen = vec![false; n];
    for w in perm.windows(2) {
        let (a, b) = (w[0] as usize, w[1] as usize);
        assert!(ids[a] < ids[b] || (ids[a] == ids[b] && a < b), "perm order");
    }
    for &t in perm {
        assert!(!seen[t as usize], "token {t} twice");
        seen[t as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
    // Items: at most R rows, contiguous, covering [0, n).
    let item_off = &p[4 + n..4 + 2 * n + 1];
    for it in 0..plan.n_items() {
        let len = item_off[it + 1] - item_off[it];
        assert!(len >= 1 && len as usize <= r, "item {it} has {len} rows");
    }
    assert_eq!(item_off[plan.n_items()] as usize, n);
    // Split ids: 0 (6 items) and 999 (2 items); 7 (exactly R rows) is not split.
    assert_eq!(plan.n_groups(), 2);
    assert_eq!(plan.n_slots(), 6 + 2);
    assert!(plan.n_groups() <= embed::max_groups(n) && plan.n_slots() <= embed::max_slots(n));
    // The replayed schedule gives the reference gradient.
    let d = 3;
    let dout = rng.normal_vec_f64(n * d, 1.0);
    let t0 = rng.normal_vec_f64(v * d, 1.0);
    let (mut want, mut got) = (t0.clone(), t0.clone());
    embed::cpu::embed_bwd(&ids, &dout, v, d, &mut want).unwrap();
    replay_plan(&plan, &dout, d, &mut got);
    assert_close_f64("plan replay", &got, &want, 1e-12, 1e-12);
    // Edge cases: no tokens, one token, all tokens the same id.
    for ids in [vec![], vec![4u32], vec![3u32; 3 * r]] {
        let plan = embed::EmbedBwdPlan::new(&ids, 5).unwrap();
        let n = ids.len();
        let dout = rng.normal_vec_f64(n * d, 1.0);
        let (mut want, mut got) = (vec![0.0; 5 * d], vec![0.0; 5 * d]);
        embed::cpu::embed_bwd(&ids, &dout, 5, d, &mut want).unwrap();
        replay_plan(&plan, &dout, d, &mut got);
        assert_close_f64("plan replay (edge)", &got, &want, 1e-12, 1e-12);
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_inputs_return_errors() {
    let (n, d) = (2usize, 4usize);
    let x = vec![1.0f32; n * d];
    let w = vec![1.0f32; d];
    let (mut y, mut r) = (vec![0.0f32; n * d], vec![0.0f32; n]);
    expect_err(
        norm::cpu::rmsnorm_fwd(&x[1..], &w, n, d, EPS, &mut y, &mut r),
        true,
        "rmsnorm_fwd x",
    );
    expect_err(
        norm::cpu::rmsnorm_fwd(&x, &w[1..], n, d, EPS, &mut y, &mut r),
        true,
        "rmsnorm_fwd w",
    );
    expect_err(
        norm::cpu::rmsnorm_fwd(&x, &w, n, d, EPS, &mut y, &mut r[1..]),
        true,
        "rstd",
    );
    expect_err(
        norm::cpu::rmsnorm_fwd(&x, &w, n, 0, EPS, &mut y, &mut r),
        false,
        "d = 0",
    );
    expect_err(
        norm::cpu::rmsnorm_fwd(&x, &w, n, d, 0.0, &mut y, &mut r),
        false,
        "eps",
    );
    expect_err(
        norm::cpu::rmsnorm_fwd(&x, &w, n, d, f32::NAN, &mut y, &mut r),
        false,
        "eps",
    );
    let (mut h, mut dx, mut dw) = (vec![0.0f32; n * d], vec![0.0f32; n * d], vec![0.0f32; d]);
    expect_err(
        norm::cpu::add_rmsnorm_fwd(&x, &x[..d], &w, n, d, EPS, &mut h, &mut y, &mut r),
        true,
        "residual",
    );
    expect_err(
        norm::cpu::rmsnorm_bwd(&x, &w, &r, &x[1..], n, d, &mut dx, &mut dw),
        true,
        "dy",
    );
    expect_err(
        norm::cpu::rmsnorm_bwd(&x, &w, &r, &x, n, d, &mut dx, &mut dw[1..]),
        true,
        "dw",
    );
    let mut dr = vec![0.0f32; n * d];
    expect_err(
        norm::cpu::add_rmsnorm_bwd(
            &x,
            &w,
            &r,
            &x,
            Some(&x[1..]),
            n,
            d,
            &mut dx,
            &mut dr,
            &mut dw,
        ),
        true,
        "dh_down",
    );

    let pos = vec![0i32, 1];
    let (mut q, mut k) = (vec![0.0f32; n * 2 * 6], vec![0.0f32; n * 6]);
    rope::cpu::rope_fwd(&mut q, &mut k, &pos, n, 2, 1, 6, 1e4).unwrap();
    let (mut q5, mut k5) = (vec![0.0f32; n * 2 * 5], vec![0.0f32; n * 5]);
    expect_err(
        rope::cpu::rope_fwd(&mut q5, &mut k5, &pos, n, 2, 1, 5, 1e4),
        false,
        "head_dim = 5",
    );
    let (mut qb, mut kb) = (vec![0.0f32; n * 258], vec![0.0f32; n * 258]);
    expect_err(
        rope::cpu::rope_fwd(&mut qb, &mut kb, &pos, n, 1, 1, 258, 1e4),
        false,
        "head_dim = 258",
    );
    expect_err(
        rope::cpu::rope_fwd(&mut q, &mut k, &pos, n, 2, 1, 0, 1e4),
        false,
        "head_dim = 0",
    );
    expect_err(
        rope::cpu::rope_fwd(&mut q, &mut k, &pos, n, 2, 1, 6, 0.0),
        false,
        "theta",
    );
    expect_err(
        rope::cpu::rope_fwd(&mut q, &mut k, &pos, n, 2, 1, 6, f32::INFINITY),
        false,
        "theta",
    );
    expect_err(
        rope::cpu::rope_fwd(&mut q, &mut k, &pos[..1], n, 2, 1, 6, 1e4),
        true,
        "rope_fwd pos",
    );
    expect_err(
        rope::cpu::rope_fwd(&mut q[1..], &mut k, &pos, n, 2, 1, 6, 1e4),
        true,
        "rope_fwd q",
    );
    expect_err(
        rope::cpu::rope_bwd(&mut q, &mut k[1..], &pos, n, 2, 1, 6, 1e4),
        true,
        "rope_bwd k",
    );

    let gu = vec![0.0f32; n * 2 * 3];
    let mut out = vec![0.0f32; n * 3];
    act::cpu::swiglu_fwd(&gu, n, 3, &mut out).unwrap();
    expect_err(
        act::cpu::swiglu_fwd(&gu[1..], n, 3, &mut out),
        true,
        "swiglu_fwd gu",
    );
    expect_err(
        act::cpu::swiglu_fwd(&gu, n, 3, &mut out[1..]),
        true,
        "swiglu_fwd out",
    );
    expect_err(act::cpu::swiglu_fwd(&gu, n, 0, &mut out), false, "I = 0");
    let mut dgu = vec![0.0f32; n * 2 * 3];
    expect_err(
        act::cpu::swiglu_bwd(&gu, &out[1..], n, 3, &mut dgu),
        true,
        "swiglu_bwd dout",
    );
    expect_err(
        act::cpu::swiglu_bwd(&gu, &out, n, 3, &mut dgu[2..]),
        true,
        "swiglu_bwd dgu",
    );

    let (v, d) = (5usize, 3usize);
    let table = vec![0.0f32; v * d];
    let mut eo = vec![0.0f32; 2 * d];
    embed::cpu::embed_fwd(&[0, 4], &table, v, d, &mut eo).unwrap();
    expect_err(
        embed::cpu::embed_fwd(&[0, 5], &table, v, d, &mut eo),
        false,
        "ids[1] = 5",
    );
    expect_err(
        embed::cpu::embed_fwd(&[0, 1], &table[1..], v, d, &mut eo),
        true,
        "embed_fwd table",
    );
    expect_err(
        embed::cpu::embed_fwd(&[0, 1], &table, v, d, &mut eo[1..]),
        true,
        "embed_fwd out",
    );
    expect_err(
        embed::cpu::embed_fwd(&[0, 1], &table, v, 0, &mut eo),
        false,
        "d = 0",
    );
    let mut dt = vec![0.0f32; v * d];
    expect_err(
        embed::cpu::embed_bwd(&[7, 0], &eo, v, d, &mut dt),
        false,
        "ids[0] = 7",
    );
    expect_err(
        embed::cpu::embed_bwd(&[0, 1], &eo, v, d, &mut dt[1..]),
        true,
        "embed_bwd dtable",
    );
    expect_err(
        embed::EmbedBwdPlan::new(&[1, 2, u32::MAX], v),
        false,
        "ids[2]",
    );
    expect_err(embed::check_ids(&[1, 2, 3, 5], v), false, "ids[3] = 5");
    embed::check_ids(&[1, 2, 3, 4], v).unwrap();
}
