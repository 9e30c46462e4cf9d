//! CPU reference of the flow head (src/kernels/flow.rs) against independent truths: central
//! finite differences in f64 for every gradient, closed forms and convergence orders for the
//! integrators, finite differences for J, the normal quantile for the noise, and bad inputs.

mod common;

use common::*;
use dfpo::kernels::flow::{
    self, cpu, FlowHeadShape, IntegrateOpts, Interval, Noise, NoiseOpts, Solver,
};
use dfpo::kernels::inv_normal_cdf;
use dfpo::Error;

/// Random parameters that make the head clearly nonlinear: weights N(0, 1/fan_in), gamma near 1,
/// non-zero beta and biases, and an O(1) output layer.
fn random_params(shape: &FlowHeadShape, rng: &mut Rng, wz_scale: f64) -> Vec<f64> {
    let lay = shape.layout();
    let mut p = vec![0.0; lay.total];
    let mut fill = |p: &mut [f64], r: std::ops::Range<usize>, s: f64, mean: f64| {
        for i in r {
            p[i] = mean + s * rng.normal();
        }
    };
    let h = shape.width as f64;
    fill(
        &mut p,
        lay.w_cond.clone(),
        1.0 / (shape.cond_dim as f64).sqrt(),
        0.0,
    );
    fill(&mut p, lay.b_in.clone(), 0.2, 0.0);
    fill(&mut p, lay.w_z.clone(), wz_scale, 0.0);
    fill(&mut p, lay.w_t.clone(), 0.5, 0.0);
    for l in &lay.layers {
        if let Some(w) = &l.w {
            fill(&mut p, w.clone(), 1.0 / h.sqrt(), 0.0);
        }
        if let Some(b) = &l.b {
            fill(&mut p, b.clone(), 0.1, 0.0);
        }
        fill(&mut p, l.gamma.clone(), 0.2, 1.0);
        fill(&mut p, l.beta.clone(), 0.1, 0.0);
    }
    fill(&mut p, lay.w_out.clone(), 1.0 / h.sqrt(), 0.0);
    fill(&mut p, lay.b_out.clone(), 0.1, 0.0);
    p
}

struct Problem {
    shape: FlowHeadShape,
    k: usize,
    params: Vec<f64>,
    c: Vec<f64>,
    z: Vec<f64>,
    tau: Vec<f64>,
    w: Vec<f64>,
}

impl Problem {
    fn new(rng: &mut Rng, cond: usize, width: usize, depth: usize, n_tok: usize, k: usize) -> Self {
        let shape = FlowHeadShape::new(cond, width, depth).unwrap();
        let rows = n_tok * k;
        Problem {
            params: random_params(&shape, rng, 0.7),
            c: rng.normal_vec_f64(n_tok * cond, 1.0),
            z: rng.normal_vec_f64(rows, 1.0),
            tau: (0..rows).map(|_| rng.uniform()).collect(),
            w: rng.normal_vec_f64(rows, 1.0),
            shape,
            k,
        }
    }

    fn u(&self, params: &[f64], c: &[f64]) -> Vec<f64> {
        let n = c.len() / self.shape.cond_dim;
        let mut u = vec![0.0; n * self.shape.width];
        cpu::cond_forward(&self.shape, params, c, &mut u).unwrap();
        u
    }

    fn v_of_u(&self, params: &[f64], u: &[f64], z: &[f64]) -> Vec<f64> {
        let mut v = vec![0.0; z.len()];
        cpu::eval_forward(&self.shape, params, u, self.k, z, &self.tau, &mut v).unwrap();
        v
    }

    /// L = Σ_r w_r·v_r through the cond op and the head.
    fn loss(&self, params: &[f64], c: &[f64], z: &[f64]) -> f64 {
        let u = self.u(params, c);
        self.v_of_u(params, &u, z)
            .iter()
            .zip(&self.w)
            .map(|(v, w)| v * w)
            .sum()
    }
}

/// Central differences of `f` at `x` for every index.
fn fd_all(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let h = 1e-5 * (1.0 + x[i].abs());
            xp[i] = x[i] + h;
            let lp = f(&xp);
            xp[i] = x[i] - h;
            let lm = f(&xp);
            xp[i] = x[i];
            (lp - lm) / (2.0 * h)
        })
        .collect()
}

fn assert_grad(what: &str, got: &[f64], fd: &[f64]) {
    assert_eq!(got.len(), fd.len(), "{what}: length");
    let scale = fd.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-3);
    for (i, (&g, &f)) in got.iter().zip(fd).enumerate() {
        assert!(
            (g - f).abs() <= 1e-7 * scale + 1e-5 * f.abs(),
            "{what}[{i}]: analytic {g} vs finite difference {f} (scale {scale})"
        );
    }
    assert!(
        fd.iter().any(|x| x.abs() > 1e-6),
        "{what}: finite differences are all ~0 (test cannot fail)"
    );
}

/// Every parameter block (through the chain cond -> head), dc and dz, with += checked on
/// non-zero initial buffers.
fn check_all_grads(
    cond: usize,
    width: usize,
    depth: usize,
    n_tok: usize,
    k: usize,
    seed_tag: &str,
) {
    let mut rng = Rng::fresh(seed_tag);
    let p = Problem::new(&mut rng, cond, width, depth, n_tok, k);
    let (shape, rows) = (p.shape, n_tok * k);
    let u = p.u(&p.params, &p.c);

    let d0 = rng.normal_vec_f64(p.params.len(), 1.0);
    let dz0 = rng.normal_vec_f64(rows, 1.0);
    let dc0 = rng.normal_vec_f64(p.c.len(), 1.0);
    let mut dparams = d0.clone();
    let mut du = vec![0.0; u.len()];
    let mut dz = dz0.clone();
    let mut dc = dc0.clone();
    cpu::eval_backward(
        &shape,
        &p.params,
        &u,
        k,
        &p.z,
        &p.tau,
        &p.w,
        &mut dparams,
        &mut du,
        Some(&mut dz),
    )
    .unwrap();
    cpu::cond_backward(&shape, &p.params, &p.c, &du, &mut dparams, Some(&mut dc)).unwrap();
    let sub = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>();
    let (gp, gz, gc) = (sub(&dparams, &d0), sub(&dz, &dz0), sub(&dc, &dc0));

    let fd_p = fd_all(&p.params, |x| p.loss(x, &p.c, &p.z));
    let lay = shape.layout();
    let mut blocks = vec![
        ("w_cond", lay.w_cond.clone()),
        ("b_in", lay.b_in.clone()),
        ("w_z", lay.w_z.clone()),
        ("w_t", lay.w_t.clone()),
        ("w_out", lay.w_out.clone()),
        ("b_out", lay.b_out.clone()),
    ];
    for (l, ll) in lay.layers.iter().enumerate() {
        let tag = |s: &str| -> &'static str { Box::leak(format!("{s}_{l}").into_boxed_str()) };
        if let Some(w) = &ll.w {
            blocks.push((tag("W"), w.clone()));
        }
        if let Some(b) = &ll.b {
            blocks.push((tag("b"), b.clone()));
        }
        blocks.push((tag("gamma"), ll.gamma.clone()));
        blocks.push((tag("beta"), ll.beta.clone()));
    }
    let covered: usize = blocks.iter().map(|(_, r)| r.len()).sum();
    assert_eq!(covered, lay.total, "the blocks cover every parameter");
    for (name, r) in blocks {
        assert_grad(
            &format!("H={width} depth={depth} d{name}"),
            &gp[r.clone()],
            &fd_p[r],
        );
    }
    let fd_z = fd_all(&p.z, |x| p.loss(&p.params, &p.c, x));
    assert_grad("dz", &gz, &fd_z);
    let fd_c = fd_all(&p.c, |x| p.loss(&p.params, x, &p.z));
    assert_grad("dc", &gc, &fd_c);

    // du directly (eval_backward alone), accumulated onto a non-zero buffer
    let du0 = rng.normal_vec_f64(u.len(), 1.0);
    let mut du2 = du0.clone();
    let mut scratch = vec![0.0; p.params.len()];
    cpu::eval_backward(
        &shape,
        &p.params,
        &u,
        k,
        &p.z,
        &p.tau,
        &p.w,
        &mut scratch,
        &mut du2,
        None,
    )
    .unwrap();
    let fd_u = fd_all(&u, |x| {
        p.v_of_u(&p.params, x, &p.z)
            .iter()
            .zip(&p.w)
            .map(|(v, w)| v * w)
            .sum()
    });
    assert_grad("du", &sub(&du2, &du0), &fd_u);
    // eval_backward leaves w_cond and b_in alone
    assert!(scratch[lay.w_cond.clone()]
        .iter()
        .chain(&scratch[lay.b_in.clone()])
        .all(|&x| x == 0.0));
}

#[test]
fn gradients_match_finite_differences_depth1_width32() {
    check_all_grads(3, 32, 1, 3, 4, "grads d1 w32");
}

#[test]
fn gradients_match_finite_differences_depth3_width32() {
    check_all_grads(5, 32, 3, 2, 3, "grads d3 w32");
}

#[test]
fn gradients_match_finite_differences_depth3_width64() {
    // K = 1 and a row count that is not a multiple of anything in particular
    check_all_grads(2, 64, 3, 5, 1, "grads d3 w64");
}

#[test]
fn gradients_match_finite_differences_depth2_width96_chunked() {
    // > 256 rows: several CPU chunks, with tokens straddling chunk boundaries (K = 7)
    let mut rng = Rng::fresh("grads chunked");
    let p = Problem::new(&mut rng, 4, 96, 2, 40, 7);
    let u = p.u(&p.params, &p.c);
    let mut dparams = vec![0.0; p.params.len()];
    let mut du = vec![0.0; u.len()];
    cpu::eval_backward(
        &p.shape,
        &p.params,
        &u,
        p.k,
        &p.z,
        &p.tau,
        &p.w,
        &mut dparams,
        &mut du,
        None,
    )
    .unwrap();
    let fd_u = fd_all(&u, |x| {
        p.v_of_u(&p.params, x, &p.z)
            .iter()
            .zip(&p.w)
            .map(|(v, w)| v * w)
            .sum()
    });
    assert_grad("du (chunked)", &du, &fd_u);
    // a sample of parameters (all of them would be slow at this size)
    let lay = p.shape.layout();
    let idx: Vec<usize> = (0..60)
        .map(|_| (rng.uniform() * lay.total as f64) as usize)
        .collect();
    let f = |x: &[f64]| {
        let v = p.v_of_u(x, &u, &p.z);
        v.iter().zip(&p.w).map(|(v, w)| v * w).sum::<f64>()
    };
    let mut x = p.params.clone();
    for &i in &idx {
        if lay.w_cond.contains(&i) || lay.b_in.contains(&i) {
            continue; // u is fixed here
        }
        let h = 1e-5;
        x[i] += h;
        let lp = f(&x);
        x[i] -= 2.0 * h;
        let lm = f(&x);
        x[i] += h;
        let fd = (lp - lm) / (2.0 * h);
        assert!(
            (dparams[i] - fd).abs() <= 1e-6 * (1.0 + fd.abs()),
            "param {i}: {} vs {fd}",
            dparams[i]
        );
    }
}

#[test]
fn f32_reference_agrees_with_f64() {
    let mut rng = Rng::fresh("f32 vs f64");
    let p = Problem::new(&mut rng, 6, 64, 3, 4, 5);
    let u = p.u(&p.params, &p.c);
    let v64 = p.v_of_u(&p.params, &u, &p.z);
    let to32 = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let mut v32 = vec![0.0f32; v64.len()];
    cpu::eval_forward(
        &p.shape,
        &to32(&p.params),
        &to32(&u),
        p.k,
        &to32(&p.z),
        &to32(&p.tau),
        &mut v32,
    )
    .unwrap();
    assert_close("v f32 vs f64", &v32, &to32(&v64), 1e-4, 1e-5);
}

// ---------------------------------------------------------------------------------- integrate

fn opts(steps: u32, solver: Solver, clip: Option<(f32, f32)>, jacobian: bool) -> IntegrateOpts {
    IntegrateOpts {
        steps,
        solver,
        clip,
        jacobian,
    }
}

#[test]
fn integrate_exact_for_a_field_constant_in_z_and_tau() {
    let mut rng = Rng::fresh("integrate constant field");
    let mut p = Problem::new(&mut rng, 3, 32, 2, 4, 6);
    let lay = p.shape.layout();
    for i in lay.w_z.clone().chain(lay.w_t.clone()) {
        p.params[i] = 0.0;
    }
    let u = p.u(&p.params, &p.c);
    let rows = p.z.len();
    let v = p.v_of_u(&p.params, &u, &p.z); // any z, tau: v depends on the token only
    assert!(v.iter().any(|x| x.abs() > 1e-3));
    let t0: Vec<f64> = (0..rows).map(|_| rng.range(-0.5, 0.5)).collect();
    let t1: Vec<f64> = (0..rows).map(|_| rng.range(0.0, 1.5)).collect();
    for solver in [Solver::Euler, Solver::Midpoint] {
        for steps in [1u32, 3, 7] {
            let mut z1 = vec![f64::NAN; rows];
            let mut jac = vec![f64::NAN; rows];
            cpu::integrate(
                &p.shape,
                &p.params,
                &u,
                p.k,
                &p.z,
                Interval::PerRow(&t0, &t1),
                &opts(steps, solver, None, true),
                &mut z1,
                Some(&mut jac),
            )
            .unwrap();
            for r in 0..rows {
                let want = p.z[r] + (t1[r] - t0[r]) * v[r];
                assert!(
                    (z1[r] - want).abs() < 1e-12 * (1.0 + want.abs()),
                    "{solver:?} steps {steps} row {r}: {} vs {want}",
                    z1[r]
                );
                assert_eq!(jac[r], 1.0, "v_z = 0 so J stays 1");
            }
            // the uniform interval gives the same as a per-row copy of it
            let mut z1u = vec![f64::NAN; rows];
            cpu::integrate(
                &p.shape,
                &p.params,
                &u,
                p.k,
                &p.z,
                Interval::Uniform(0.25, 0.75),
                &opts(steps, solver, None, false),
                &mut z1u,
                None,
            )
            .unwrap();
            for r in 0..rows {
                let want = p.z[r] + 0.5 * v[r];
                assert!((z1u[r] - want).abs() < 1e-12 * (1.0 + want.abs()));
            }
        }
    }
}

#[test]
fn integrate_is_a_riemann_sum_for_a_field_independent_of_z() {
    // w_z = 0: v = v(τ) per token, so Euler is the left Riemann sum and midpoint the midpoint rule.
    let mut rng = Rng::fresh("integrate riemann");
    let mut p = Problem::new(&mut rng, 3, 64, 3, 3, 5);
    let lay = p.shape.layout();
    for i in lay.w_z.clone() {
        p.params[i] = 0.0;
    }
    for i in lay.w_t.clone() {
        p.params[i] *= 3.0; // make τ matter
    }
    let u = p.u(&p.params, &p.c);
    let rows = p.z.len();
    let t0: Vec<f64> = (0..rows).map(|_| rng.range(0.0, 0.3)).collect();
    let t1: Vec<f64> = (0..rows).map(|_| rng.range(0.6, 1.0)).collect();
    let steps = 5u32;
    for solver in [Solver::Euler, Solver::Midpoint] {
        let mut want = p.z.clone();
        for i in 0..steps {
            let tau: Vec<f64> = (0..rows)
                .map(|r| {
                    let d = (t1[r] - t0[r]) / steps as f64;
                    t0[r]
                        + i as f64 * d
                        + if solver == Solver::Midpoint {
                            0.5 * d
                        } else {
                            0.0
                        }
                })
                .collect();
            let mut v = vec![0.0; rows];
            cpu::eval_forward(&p.shape, &p.params, &u, p.k, &p.z, &tau, &mut v).unwrap();
            for r in 0..rows {
                want[r] += (t1[r] - t0[r]) / steps as f64 * v[r];
            }
        }
        let mut z1 = vec![f64::NAN; rows];
        cpu::integrate(
            &p.shape,
            &p.params,
            &u,
            p.k,
            &p.z,
            Interval::PerRow(&t0, &t1),
            &opts(steps, solver, None, false),
            &mut z1,
            None,
        )
        .unwrap();
        assert_close_f64(&format!("{solver:?} riemann"), &z1, &want, 1e-12, 1e-12);
        // and it is not the trivial answer
        assert!(z1.iter().zip(&p.z).any(|(a, b)| (a - b).abs() > 1e-3));
    }
}

fn max_err(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn euler_is_first_order_and_midpoint_second_order() {
    let mut rng = Rng::fresh("convergence order");
    let p = Problem::new(&mut rng, 4, 32, 3, 3, 4);
    let u = p.u(&p.params, &p.c);
    let rows = p.z.len();
    let run = |solver, steps| {
        let mut z1 = vec![0.0; rows];
        cpu::integrate(
            &p.shape,
            &p.params,
            &u,
            p.k,
            &p.z,
            Interval::Uniform(0.0, 1.0),
            &opts(steps, solver, None, false),
            &mut z1,
            None,
        )
        .unwrap();
        z1
    };
    let reference = run(Solver::Midpoint, 4096);
    let ratios = |solver| {
        let e: Vec<f64> = [8u32, 16, 32, 64]
            .iter()
            .map(|&n| max_err(&run(solver, n), &reference))
            .collect();
        eprintln!("{solver:?} errors at N = 8, 16, 32, 64: {e:?}");
        assert!(
            e[0] > 1e-6,
            "the field must be nonlinear enough to show an error"
        );
        e.windows(2).map(|w| w[0] / w[1]).collect::<Vec<_>>()
    };
    let re = ratios(Solver::Euler);
    let rm = ratios(Solver::Midpoint);
    eprintln!("error ratios per step doubling: Euler {re:?}, midpoint {rm:?}");
    let last = |r: &[f64]| r[r.len() - 1];
    assert!(
        (1.6..2.5).contains(&last(&re)),
        "Euler ratio {re:?} should approach 2"
    );
    assert!(
        (3.2..5.0).contains(&last(&rm)),
        "midpoint ratio {rm:?} should approach 4"
    );
}

fn check_jacobian(solver: Solver, clip: Option<(f32, f32)>, tag: &str) -> (usize, usize) {
    let mut rng = Rng::fresh(tag);
    let p = Problem::new(&mut rng, 3, 32, 2, 6, 8);
    let u = p.u(&p.params, &p.c);
    let rows = p.z.len();
    let z0: Vec<f64> = p.z.iter().map(|z| 2.0 * z).collect();
    let t0: Vec<f64> = (0..rows).map(|_| rng.range(0.0, 0.2)).collect();
    let t1: Vec<f64> = (0..rows).map(|_| rng.range(0.8, 1.2)).collect();
    let o = opts(4, solver, clip, true);
    let run = |z: &[f64]| {
        let mut z1 = vec![0.0; rows];
        let mut j = vec![0.0; rows];
        cpu::integrate(
            &p.shape,
            &p.params,
            &u,
            p.k,
            z,
            Interval::PerRow(&t0, &t1),
            &o,
            &mut z1,
            Some(&mut j),
        )
        .unwrap();
        (z1, j)
    };
    let (z1, jac) = run(&z0);
    let h = 1e-6;
    let (mut clamped, mut free, mut nontrivial) = (0, 0, 0);
    for r in 0..rows {
        let mut zp = z0.clone();
        zp[r] += h;
        let mut zm = z0.clone();
        zm[r] -= h;
        let fd = (run(&zp).0[r] - run(&zm).0[r]) / (2.0 * h);
        assert!(
            (jac[r] - fd).abs() <= 1e-6 * (1.0 + fd.abs()),
            "{tag} row {r}: J {} vs finite difference {fd}",
            jac[r]
        );
        if let Some((lo, hi)) = clip {
            assert!(z1[r] >= lo as f64 && z1[r] <= hi as f64, "clip bounds");
        }
        if jac[r] == 0.0 {
            clamped += 1;
        } else {
            free += 1;
            if (jac[r] - 1.0).abs() > 1e-3 {
                nontrivial += 1;
            }
        }
    }
    assert!(
        2 * nontrivial > free,
        "{tag}: J should differ from 1 on most rows of a nonlinear head ({nontrivial} of {free})"
    );
    (clamped, free)
}

#[test]
fn jacobian_matches_finite_differences_euler() {
    let (c, f) = check_jacobian(Solver::Euler, None, "jac euler");
    assert_eq!(c, 0);
    assert!(f > 0);
}

#[test]
fn jacobian_matches_finite_differences_midpoint() {
    let (c, f) = check_jacobian(Solver::Midpoint, None, "jac midpoint");
    assert_eq!(c, 0);
    assert!(f > 0);
}

#[test]
fn jacobian_matches_finite_differences_with_clip() {
    for solver in [Solver::Euler, Solver::Midpoint] {
        let (c, f) = check_jacobian(solver, Some((-1.0, 1.2)), "jac clip");
        assert!(
            c > 0 && f > 0,
            "{solver:?}: want both clamped ({c}) and free ({f}) rows"
        );
    }
}

#[test]
fn clip_bounds_are_respected_every_step() {
    let mut rng = Rng::fresh("clip bounds");
    let p = Problem::new(&mut rng, 3, 32, 1, 8, 4);
    let u = p.u(&p.params, &p.c);
    let rows = p.z.len();
    let z0: Vec<f64> = p.z.iter().map(|z| 3.0 * z).collect();
    let (lo, hi) = (-0.3f32, 0.4f32);
    for solver in [Solver::Euler, Solver::Midpoint] {
        for steps in [1u32, 2, 5] {
            let mut z1 = vec![0.0; rows];
            cpu::integrate(
                &p.shape,
                &p.params,
                &u,
                p.k,
                &z0,
                Interval::Uniform(0.0, 1.0),
                &opts(steps, solver, Some((lo, hi)), false),
                &mut z1,
                None,
            )
            .unwrap();
            assert!(z1.iter().all(|&z| z >= lo as f64 && z <= hi as f64));
            assert!(z1.contains(&(lo as f64)) || z1.contains(&(hi as f64)));
            // one step with a clip equals a clamp of the unclipped step
            if steps == 1 {
                let mut free = vec![0.0; rows];
                cpu::integrate(
                    &p.shape,
                    &p.params,
                    &u,
                    p.k,
                    &z0,
                    Interval::Uniform(0.0, 1.0),
                    &opts(1, solver, None, false),
                    &mut free,
                    None,
                )
                .unwrap();
                for r in 0..rows {
                    assert_eq!(z1[r], free[r].clamp(lo as f64, hi as f64));
                }
            }
        }
    }
}

#[test]
fn one_euler_step_is_the_readout() {
    // z1 = ε + v(ε, 0 | h) (method doc 2.3)
    let mut rng = Rng::fresh("readout");
    let p = Problem::new(&mut rng, 5, 64, 3, 7, 3);
    let u = p.u(&p.params, &p.c);
    let rows = p.z.len();
    let mut v = vec![0.0; rows];
    cpu::eval_forward(&p.shape, &p.params, &u, p.k, &p.z, &vec![0.0; rows], &mut v).unwrap();
    let mut z1 = vec![0.0; rows];
    cpu::integrate(
        &p.shape,
        &p.params,
        &u,
        p.k,
        &p.z,
        Interval::Uniform(0.0, 1.0),
        &opts(1, Solver::Euler, None, false),
        &mut z1,
        None,
    )
    .unwrap();
    for r in 0..rows {
        assert!((z1[r] - (p.z[r] + v[r])).abs() < 1e-14);
    }
}

// ---------------------------------------------------------------------------------- noise

#[test]
fn stratified_noise_is_the_normal_quantile_grid() {
    for k in [1usize, 2, 7, 32, 33] {
        let mut out = vec![f64::NAN; 3 * k];
        cpu::noise(
            &NoiseOpts {
                kind: Noise::Stratified,
                truncate: None,
            },
            k,
            &mut out,
        )
        .unwrap();
        for (r, &e) in out.iter().enumerate() {
            let kk = r % k;
            assert_eq!(e, inv_normal_cdf((kk as f64 + 0.5) / k as f64));
            // symmetric: ε_k = −ε_{K−1−k}
            let mirror = out[r - kk + (k - 1 - kk)];
            assert!((e + mirror).abs() < 1e-12, "K={k}: {e} vs {mirror}");
        }
        for tok in out.chunks(k) {
            assert!(tok.windows(2).all(|w| w[0] < w[1]), "sorted within a token");
            assert!(
                tok.iter().sum::<f64>().abs() < 1e-9,
                "zero mean by symmetry"
            );
        }
        if k == 2 {
            assert!((out[1] - 0.6744897501960817).abs() < 1e-12, "Φ⁻¹(0.75)");
        }
    }
    // truncation
    let mut out = vec![0.0f32; 64];
    cpu::noise(
        &NoiseOpts {
            kind: Noise::Stratified,
            truncate: Some(1.5),
        },
        64,
        &mut out,
    )
    .unwrap();
    assert!(out.iter().all(|&e| (-1.5..=1.5).contains(&e)));
    assert_eq!(out[0], -1.5);
    assert_eq!(out[63], 1.5);
}

#[test]
fn random_noise_is_standard_normal_and_seeded() {
    let n = 200_000;
    let mut out = vec![0.0f64; n];
    let o = NoiseOpts {
        kind: Noise::Random { seed: 42 },
        truncate: None,
    };
    cpu::noise(&o, 8, &mut out).unwrap();
    let mean = out.iter().sum::<f64>() / n as f64;
    let var = out.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
    let within1 = out.iter().filter(|x| x.abs() < 1.0).count() as f64 / n as f64;
    assert!(mean.abs() < 0.01, "mean {mean}");
    assert!((var - 1.0).abs() < 0.02, "var {var}");
    assert!(
        (within1 - 0.6826894921370859).abs() < 0.005,
        "P(|ε| < 1) = {within1}"
    );
    // the counter hash: row r draws uniform_open(seed, r)
    for r in [0usize, 1, 999, 199_999] {
        assert_eq!(
            out[r],
            inv_normal_cdf(dfpo::kernels::uniform_open(42, r as u64))
        );
    }
    let mut again = vec![0.0f64; n];
    cpu::noise(&o, 8, &mut again).unwrap();
    assert_eq!(out, again, "deterministic per seed");
    let mut other = vec![0.0f64; 100];
    cpu::noise(
        &NoiseOpts {
            kind: Noise::Random { seed: 43 },
            truncate: None,
        },
        1,
        &mut other,
    )
    .unwrap();
    assert!(other.iter().zip(&out).any(|(a, b)| a != b));
    // truncation
    let mut t = vec![0.0f32; 20_000];
    cpu::noise(
        &NoiseOpts {
            kind: Noise::Random { seed: 7 },
            truncate: Some(2.0),
        },
        4,
        &mut t,
    )
    .unwrap();
    assert!(t.iter().all(|&e| (-2.0..=2.0).contains(&e)));
    assert!(t.contains(&2.0) && t.contains(&-2.0));
}

// ---------------------------------------------------------------------------------- layout, init

#[test]
fn layout_is_contiguous_and_matches_param_count() {
    for (c, h, d) in [(1, 32, 1), (7, 64, 3), (896, 256, 3), (3, 512, 8)] {
        let s = FlowHeadShape::new(c, h, d).unwrap();
        let l = s.layout();
        assert_eq!(l.total, s.param_count());
        let mut ranges = vec![
            l.w_cond.clone(),
            l.b_in.clone(),
            l.w_z.clone(),
            l.w_t.clone(),
        ];
        for (i, ll) in l.layers.iter().enumerate() {
            assert_eq!(ll.w.is_some(), i > 0);
            assert_eq!(ll.b.is_some(), i > 0);
            if let Some(w) = &ll.w {
                assert_eq!(w.len(), h * h);
                ranges.push(w.clone());
            }
            if let Some(b) = &ll.b {
                ranges.push(b.clone());
            }
            ranges.push(ll.gamma.clone());
            ranges.push(ll.beta.clone());
        }
        ranges.push(l.w_out.clone());
        ranges.push(l.b_out.clone());
        assert_eq!(l.w_cond.len(), c * h);
        assert_eq!(l.layers.len(), d);
        let mut at = 0;
        for r in ranges {
            assert_eq!(r.start, at, "contiguous");
            at = r.end;
        }
        assert_eq!(at, l.total);
    }
}

#[test]
fn init_params_is_deterministic_and_follows_the_scheme() {
    let s = FlowHeadShape::new(10, 64, 3).unwrap();
    let p = flow::init_params(&s, 5);
    assert_eq!(p, flow::init_params(&s, 5));
    assert_ne!(p, flow::init_params(&s, 6));
    let l = s.layout();
    let b1 = 1.0 / (12f32).sqrt();
    let bh = 1.0 / (64f32).sqrt();
    assert!(p[l.w_cond.clone()].iter().all(|x| x.abs() <= b1));
    assert!(p[l.w_z.clone()].iter().all(|x| x.abs() <= b1));
    assert!(p[l.w_cond.clone()].iter().any(|x| x.abs() > 0.5 * b1));
    assert!(p[l.b_in.clone()].iter().all(|&x| x == 0.0));
    for ll in &l.layers {
        assert!(p[ll.gamma.clone()].iter().all(|&x| x == 1.0));
        assert!(p[ll.beta.clone()].iter().all(|&x| x == 0.0));
        if let Some(w) = &ll.w {
            assert!(p[w.clone()].iter().all(|x| x.abs() <= bh));
            assert!(p[w.clone()].iter().any(|x| x.abs() > 0.5 * bh));
        }
        if let Some(b) = &ll.b {
            assert!(p[b.clone()].iter().all(|&x| x == 0.0));
        }
    }
    assert!(p[l.w_out.clone()].iter().all(|x| x.abs() <= 0.1 * bh));
    assert_eq!(p[l.b_out.start], 0.0);
}

// ---------------------------------------------------------------------------------- bad input

fn is_shape<T>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::Shape(_)))
}
fn is_invalid<T>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::Invalid(_)))
}

#[test]
fn bad_shapes_are_errors() {
    assert!(is_invalid(FlowHeadShape::new(0, 32, 1)));
    assert!(is_invalid(FlowHeadShape::new(4, 48, 1)));
    assert!(is_invalid(FlowHeadShape::new(4, 0, 1)));
    assert!(is_invalid(FlowHeadShape::new(4, 544, 1)));
    assert!(is_invalid(FlowHeadShape::new(4, 64, 0)));
    assert!(is_invalid(FlowHeadShape::new(4, 64, 9)));
    assert!(FlowHeadShape::new(4, 512, 8).is_ok());
    // a hand-built invalid shape is caught by the ops too
    let bad = FlowHeadShape {
        cond_dim: 2,
        width: 40,
        depth: 1,
    };
    let mut u = vec![0.0f32; 40];
    assert!(is_invalid(cpu::cond_forward(
        &bad,
        &[0.0; 10],
        &[0.0, 0.0],
        &mut u
    )));
}

#[test]
fn bad_inputs_are_errors() {
    let s = FlowHeadShape::new(3, 32, 2).unwrap();
    let p = flow::init_params(&s, 1);
    let (n, k) = (2usize, 3usize);
    let rows = n * k;
    let c = vec![0.5f32; n * 3];
    let u = vec![0.1f32; n * 32];
    let z = vec![0.0f32; rows];
    let mut v = vec![0.0f32; rows];
    let mut out = vec![0.0f32; rows];
    // cond
    assert!(is_shape(cpu::cond_forward(
        &s,
        &p[1..],
        &c,
        &mut vec![0.0; n * 32]
    )));
    assert!(is_shape(cpu::cond_forward(
        &s,
        &p,
        &c[1..],
        &mut vec![0.0; n * 32]
    )));
    assert!(is_shape(cpu::cond_forward(
        &s,
        &p,
        &c,
        &mut vec![0.0; n * 32 + 1]
    )));
    let mut dp = vec![0.0f32; p.len()];
    assert!(is_shape(cpu::cond_backward(
        &s,
        &p,
        &c,
        &u[1..],
        &mut dp,
        None
    )));
    assert!(is_shape(cpu::cond_backward(
        &s,
        &p,
        &c,
        &u,
        &mut dp[1..],
        None
    )));
    assert!(is_shape(cpu::cond_backward(
        &s,
        &p,
        &c,
        &u,
        &mut dp,
        Some(&mut [0.0; 5])
    )));
    // eval
    assert!(is_shape(cpu::eval_forward(
        &s,
        &p,
        &u[1..],
        k,
        &z,
        &z,
        &mut v
    )));
    assert!(is_shape(cpu::eval_forward(
        &s,
        &p,
        &u,
        k,
        &z[1..],
        &z,
        &mut v
    )));
    assert!(is_shape(cpu::eval_forward(
        &s,
        &p,
        &u,
        k,
        &z,
        &z[1..],
        &mut v
    )));
    assert!(is_shape(cpu::eval_forward(
        &s,
        &p,
        &u,
        k,
        &z,
        &z,
        &mut v[1..]
    )));
    assert!(is_shape(cpu::eval_forward(
        &s,
        &p,
        &u,
        k + 1,
        &z,
        &z,
        &mut v
    )));
    assert!(is_invalid(cpu::eval_forward(&s, &p, &u, 0, &z, &z, &mut v)));
    let mut du = vec![0.0f32; u.len()];
    assert!(is_shape(cpu::eval_backward(
        &s,
        &p,
        &u,
        k,
        &z,
        &z,
        &z[1..],
        &mut dp,
        &mut du,
        None
    )));
    assert!(is_shape(cpu::eval_backward(
        &s,
        &p,
        &u,
        k,
        &z,
        &z,
        &z,
        &mut dp,
        &mut du[1..],
        None
    )));
    assert!(is_shape(cpu::eval_backward(
        &s,
        &p,
        &u,
        k,
        &z,
        &z,
        &z,
        &mut dp,
        &mut du,
        Some(&mut [0.0; 2])
    )));
    // integrate
    let o = opts(1, Solver::Euler, None, false);
    let iv = Interval::Uniform(0.0f32, 1.0);
    assert!(cpu::integrate(&s, &p, &u, k, &z, iv, &o, &mut out, None).is_ok());
    assert!(is_invalid(cpu::integrate(
        &s,
        &p,
        &u,
        k,
        &z,
        iv,
        &opts(0, Solver::Euler, None, false),
        &mut out,
        None
    )));
    let mut jac = vec![0.0f32; rows];
    assert!(
        is_invalid(cpu::integrate(
            &s,
            &p,
            &u,
            k,
            &z,
            iv,
            &o,
            &mut out,
            Some(&mut jac)
        )),
        "jac without the flag"
    );
    assert!(
        is_invalid(cpu::integrate(
            &s,
            &p,
            &u,
            k,
            &z,
            iv,
            &opts(1, Solver::Euler, None, true),
            &mut out,
            None
        )),
        "flag without jac"
    );
    assert!(is_invalid(cpu::integrate(
        &s,
        &p,
        &u,
        k,
        &z,
        iv,
        &opts(1, Solver::Euler, Some((1.0, -1.0)), false),
        &mut out,
        None
    )));
    assert!(is_invalid(cpu::integrate(
        &s,
        &p,
        &u,
        k,
        &z,
        iv,
        &opts(1, Solver::Euler, Some((f32::NAN, 1.0)), false),
        &mut out,
        None
    )));
    assert!(is_shape(cpu::integrate(
        &s,
        &p,
        &u,
        k,
        &z[1..],
        iv,
        &o,
        &mut out,
        None
    )));
    assert!(is_shape(cpu::integrate(
        &s,
        &p,
        &u,
        k,
        &z,
        iv,
        &o,
        &mut out[1..],
        None
    )));
    assert!(is_shape(cpu::integrate(
        &s,
        &p,
        &u,
        k,
        &z,
        Interval::PerRow(&z[1..], &z),
        &o,
        &mut out,
        None
    )));
    assert!(is_shape(cpu::integrate(
        &s,
        &p,
        &u,
        k,
        &z,
        Interval::PerRow(&z, &z[1..]),
        &o,
        &mut out,
        None
    )));
    assert!(is_shape(cpu::integrate(
        &s,
        &p,
        &u,
        k,
        &z,
        iv,
        &opts(1, Solver::Euler, None, true),
        &mut out,
        Some(&mut jac[1..])
    )));
    // noise
    let st = NoiseOpts {
        kind: Noise::Stratified,
        truncate: None,
    };
    assert!(is_invalid(cpu::noise(&st, 0, &mut out)));
    assert!(is_shape(cpu::noise(&st, 4, &mut out)));
    for t in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        assert!(is_invalid(cpu::noise(
            &NoiseOpts {
                kind: Noise::Stratified,
                truncate: Some(t)
            },
            3,
            &mut out
        )));
    }
    // messages name the argument
    let e = cpu::eval_forward(&s, &p, &u, k, &z[1..], &z, &mut v)
        .unwrap_err()
        .to_string();
    assert!(e.contains("eval_forward z"), "{e}");
}

#[test]
fn empty_problems_are_fine() {
    let s = FlowHeadShape::new(3, 32, 2).unwrap();
    let p = flow::init_params(&s, 1);
    let e: [f32; 0] = [];
    let mut o: [f32; 0] = [];
    cpu::cond_forward(&s, &p, &e, &mut o).unwrap();
    cpu::eval_forward(&s, &p, &e, 4, &e, &e, &mut o).unwrap();
    let mut o2: [f32; 0] = [];
    cpu::integrate(
        &s,
        &p,
        &e,
        4,
        &e,
        Interval::Uniform(0.0, 1.0),
        &opts(2, Solver::Midpoint, None, false),
        &mut o,
        None,
    )
    .unwrap();
    cpu::noise(
        &NoiseOpts {
            kind: Noise::Stratified,
            truncate: None,
        },
        4,
        &mut o2,
    )
    .unwrap();
}
