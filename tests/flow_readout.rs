//! The flow critic's ONE-STEP readout is a return distribution (method doc 2.3, 2.7).
//!
//! The flow head alone (no backbone: the conditioning is a feature vector of the state) is
//! trained through the critic's own head graph ([`flow_head_graph`]: the anchor (BCFM) and the
//! geometric-consistency term, with the critic's default weight and target solve; DCFM and the
//! risk terms off) on returns drawn from known conditional distributions, ONE return sample
//! per token as in the trainer (a token's targets come from one trajectory). Then the trainer's
//! readout ([`flow_readout`], one Euler step from M stratified noise levels) is compared with
//! the true quantiles at the same levels: W1 = mean_i |ẑ_(i) − Q((i + ½)/M)|.
//!
//! Flow matching alone makes the one-step readout the conditional MEAN for every ε (at τ = 0
//! the flow's velocity is E[g] − ε), so with the consistency term off the samples collapse and
//! W1 is about E|G − E G|; the test asserts that too, so it can fail.

use dfpo::device::Device;
use dfpo::graph::{GraphBuilder, Session};
use dfpo::kernels::adamw::AdamWParams;
use dfpo::kernels::flow::{self, FlowHeadShape, IntegrateOpts, Solver};
use dfpo::kernels::inv_normal_cdf;
use dfpo::train::config::CriticConfig;
use dfpo::train::heads::{FlowTermWeights, RiskTerms};
use dfpo::train::models::{flow_head_graph, FlowHeadSpec};
use dfpo::train::optim::{AdamW, Schedule};
use dfpo::train::rollout::{flow_readout, stratified_eps, FlowSolve};
use dfpo::train::step_ops::StepOps;

mod common;
use common::Rng;

/// The families of return distributions; the last is conditioned on a continuous input x.
const FAMILIES: usize = 5;
/// Conditioning: one-hot family + x.
const COND: usize = FAMILIES + 1;

fn normal_cdf(z: f64) -> f64 {
    // Φ(z) = erfc(−z/√2)/2 with Numerical Recipes' erfc (relative error < 1.2e-7).
    let x = -z / std::f64::consts::SQRT_2;
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.5 * a);
    let poly = -a * a - 1.26551223
        + t * (1.00002368
            + t * (0.37409196
                + t * (0.09678418
                    + t * (-0.18628806
                        + t * (0.27886807
                            + t * (-1.13520398
                                + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let erfc = t * poly.exp();
    0.5 * if x >= 0.0 { erfc } else { 2.0 - erfc }
}

/// Quantile Q_f(u | x) of family f.
fn quantile(f: usize, x: f64, u: f64) -> f64 {
    match f {
        // Bimodal: ½N(−1, 0.2²) + ½N(1, 0.2²) (bisection on the CDF).
        0 => {
            let cdf =
                |z: f64| 0.5 * normal_cdf((z + 1.0) / 0.2) + 0.5 * normal_cdf((z - 1.0) / 0.2);
            let (mut lo, mut hi) = (-3.0, 3.0);
            for _ in 0..60 {
                let m = 0.5 * (lo + hi);
                if cdf(m) < u {
                    lo = m;
                } else {
                    hi = m;
                }
            }
            0.5 * (lo + hi)
        }
        // Skewed: −0.5 + Exp(rate 2).
        1 => -0.5 - 0.5 * (1.0 - u).ln(),
        // Heavy-tailed: 0.2 · Student-t with 2 degrees of freedom (infinite variance).
        2 => 0.2 * (2.0 * u - 1.0) / (2.0 * u * (1.0 - u)).sqrt(),
        // Point mass at 0.5.
        3 => 0.5,
        // Conditioned on x: N(2x − 1, (0.1 + 0.3x)²).
        _ => (2.0 * x - 1.0) + (0.1 + 0.3 * x) * inv_normal_cdf(u),
    }
}

fn cond(f: usize, x: f64) -> [f32; COND] {
    let mut c = [0.0f32; COND];
    c[f] = 1.0;
    if f == FAMILIES - 1 {
        c[FAMILIES] = x as f32;
    }
    c
}

/// The evaluation states: every family, and the conditional one at three inputs.
const EVAL: [(usize, f64); 7] = [
    (0, 0.0),
    (1, 0.0),
    (2, 0.0),
    (3, 0.0),
    (4, 0.1),
    (4, 0.5),
    (4, 0.9),
];

/// Trains the head with consistency weight `w_gc` and returns, per evaluation state, the W1 of
/// the one-step readout and of a 20-step midpoint solve (the flow itself) to the truth, and the
/// W1 of the collapse (a point mass at the mean).
fn train_and_measure(w_gc: f32, rng: &mut Rng) -> Vec<(f64, f64, f64)> {
    let d = CriticConfig::default();
    // 32 tokens x 16 samples per step, 1000 steps, cosine from 3e-3.
    let (n, k, steps, lr) = (32usize, 16usize, 1000u64, 3e-3);
    let shape = FlowHeadShape::new(COND, d.head_width, d.head_depth).unwrap();
    let spec = FlowHeadSpec {
        k,
        max_tokens: n,
        shape,
        weights: FlowTermWeights {
            dcfm: 0.0,
            bcfm: d.w_bcfm as f32,
            gc: w_gc,
        },
        risk: RiskTerms::off(),
        gc_solve: IntegrateOpts {
            steps: d.target_steps as u32,
            solver: Solver::Euler,
            clip: None,
            jacobian: false,
        },
    };
    let mut g = GraphBuilder::new();
    let p = g.param("flow", shape.param_count());
    let c = g.input("c", n * COND);
    let fh = flow_head_graph(&mut g, p, c, n, &spec).unwrap();
    let plan = g.plan(fh.loss, &Device::Cpu).unwrap();
    let dp = plan.grad(p).unwrap();
    let mut s = Session::new(plan, Device::Cpu).unwrap();
    let mut opt = AdamW::new(
        vec![("flow".into(), flow::init_params(&shape, rng.next_u64()))],
        AdamWParams {
            lr,
            ..AdamWParams::default()
        },
        1.0,
        Schedule {
            peak: lr,
            warmup: 0,
            total: steps,
            cosine: true,
            min_ratio: 0.05,
        },
    )
    .unwrap();
    let eps_k = stratified_eps(k).unwrap();
    let rows = n * k;
    // Inputs that do not change: row list, readout levels, DCFM off, weights.
    let fixed: [(usize, Vec<f32>); 9] = [
        (0, (0..n).map(|i| i as f32).collect()),
        (1, (0..rows).map(|r| eps_k[r % k]).collect()), // z_read
        (2, vec![0.0; rows]),                           // tau_read
        (5, vec![0.0; rows]),                           // z_d
        (6, vec![0.0; rows]),                           // tau_d
        (7, (0..rows).map(|r| eps_k[r % k]).collect()), // eps
        (10, vec![0.0; rows]),                          // vel_d
        (11, vec![1.0; n]),                             // w_unc
        (13, vec![1.0 / n as f32; n]),                  // token_weight
    ];
    for (i, v) in &fixed {
        s.write(fh.inputs[*i], v).unwrap();
    }
    s.write(fh.inputs[12], &vec![0.0f32; n]).unwrap(); // dcfm_mask
    s.write(fh.inputs[14], &vec![0.0f32; n]).unwrap(); // risk_weight
    let (mut cv, mut zb, mut tb, mut vb, mut tg) = (
        vec![0.0f32; n * COND],
        vec![0.0f32; rows],
        vec![0.0f32; rows],
        vec![0.0f32; rows],
        vec![0.0f32; rows],
    );
    for _ in 0..steps {
        for t in 0..n {
            let f = (rng.next_u64() % FAMILIES as u64) as usize;
            let x = rng.uniform();
            cv[t * COND..(t + 1) * COND].copy_from_slice(&cond(f, x));
            let ret = quantile(f, x, rng.uniform().clamp(1e-12, 1.0 - 1e-12)) as f32;
            for r in t * k..(t + 1) * k {
                let (e, tau) = (rng.normal() as f32, rng.uniform() as f32);
                zb[r] = tau * ret + (1.0 - tau) * e;
                tb[r] = tau;
                vb[r] = ret - e;
                tg[r] = ret;
            }
        }
        s.write(c, &cv).unwrap();
        s.write(p, opt.params()[0].as_slice()).unwrap();
        for (i, v) in [(3, &zb), (4, &tb), (9, &vb), (8, &tg)] {
            s.write(fh.inputs[i], v).unwrap();
        }
        let l = s.run().unwrap();
        assert!(l.is_finite());
        let grad = s.read_f32(dp).unwrap();
        assert!(opt.step(&[grad]).unwrap().applied);
    }

    // The trainer's readout at M stratified levels, and the flow's own multi-step solve.
    let params = opt.params()[0].clone();
    let m = 64;
    let fs = FlowSolve {
        shape,
        k: m,
        readout_steps: 1,
        target_steps: 20,
        solver: Solver::Midpoint,
        clip: None,
    };
    let eps = stratified_eps(m).unwrap();
    EVAL.iter()
        .map(|&(f, x)| {
            let mut u = vec![0.0f32; shape.width];
            flow::cpu::cond_forward(&shape, &params, &cond(f, x), &mut u).unwrap();
            let (one, _) = flow_readout(&StepOps::host(), &fs, &params, &u, &[1.0]).unwrap();
            let mut ode = vec![0.0f32; m];
            let opts = IntegrateOpts {
                steps: 20,
                solver: Solver::Midpoint,
                clip: None,
                jacobian: false,
            };
            let iv = flow::Interval::Uniform(0.0, 1.0);
            flow::cpu::integrate(&shape, &params, &u, m, &eps, iv, &opts, &mut ode, None).unwrap();
            let q: Vec<f64> = (0..m)
                .map(|i| quantile(f, x, (i as f64 + 0.5) / m as f64))
                .collect();
            let w1 = |z: &[f32]| {
                let mut z: Vec<f64> = z.iter().map(|&v| v as f64).collect();
                z.sort_by(f64::total_cmp);
                z.iter().zip(&q).map(|(a, b)| (a - b).abs()).sum::<f64>() / m as f64
            };
            let mean = q.iter().sum::<f64>() / m as f64;
            let collapse = q.iter().map(|b| (b - mean).abs()).sum::<f64>() / m as f64;
            (w1(&one), w1(&ode), collapse)
        })
        .collect()
}

fn report(what: &str, r: &[(f64, f64, f64)]) -> f64 {
    let avg = r.iter().map(|x| x.0).sum::<f64>() / r.len() as f64;
    eprintln!("{what}: mean one-step W1 {avg:.3}");
    for (&(f, x), (one, ode, col)) in EVAL.iter().zip(r) {
        eprintln!(
            "  family {f} x {x}: one-step W1 {one:.3}, 20-step W1 {ode:.3}, mean-collapse W1 {col:.3}"
        );
    }
    avg
}

#[test]
fn the_one_step_readout_learns_known_return_distributions() {
    let mut rng = Rng::fresh("the_one_step_readout_learns_known_return_distributions");
    let w_gc = CriticConfig::default().w_gc as f32;
    let on = train_and_measure(w_gc, &mut rng);
    let off = train_and_measure(0.0, &mut rng);
    let (a_on, a_off) = (
        report("consistency on", &on),
        report("consistency off", &off),
    );
    // The stated bound: mean W1 over the seven states <= 0.10 (the truths' spreads, i.e. the
    // W1 of a collapse to the mean, are 0 to 1.0, mean 0.32), and <= 0.25 on each state
    // (measured: 0.05-0.07 mean, the bimodal state the worst at 0.08-0.15).
    assert!(a_on <= 0.10, "one-step readout: mean W1 {a_on:.3} > 0.10");
    for (&(f, x), r) in EVAL.iter().zip(&on) {
        assert!(
            r.0 <= 0.25,
            "family {f} at x = {x}: one-step W1 {:.3} > 0.25",
            r.0
        );
    }
    // Without the consistency term the one-step samples collapse toward the mean: far worse,
    // although the flow itself (the multi-step solve) has learned the distribution.
    assert!(
        a_off >= 2.5 * a_on && a_off >= 0.2,
        "without the consistency term: mean W1 {a_off:.3} (with: {a_on:.3})"
    );
    let ode_off = off.iter().map(|x| x.1).sum::<f64>() / off.len() as f64;
    assert!(ode_off <= 0.10, "the flow's own 20-step W1 {ode_off:.3}");
}
