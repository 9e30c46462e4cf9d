//! CUDA parity for the step's numerics (`train::step_ops::StepOps`): on a CUDA device the flow
//! critic's readout and target solves, the noise, the head evaluations, distributional GAE,
//! whitening, the KL penalty and the risk statistics run their CUDA kernels; each must equal the
//! CPU backend on the same inputs (fresh random head weights, conditioning and returns; ragged
//! masks with an empty row and odd token counts; K = 32, the default, and K = 20).
//! Host outputs are pre-filled with NaN, so an element the CUDA backend forgets to write fails.

mod common;

use common::{assert_close, assert_close_f64, Rng, POISON};
use dfpo::device::{cuda_for_test, Device};
use dfpo::kernels::flow::{self, FlowHeadShape, IntegrateOpts, Interval, Noise, NoiseOpts, Solver};
use dfpo::kernels::risk::{self, TailLevels};
use dfpo::kernels::rl::{GaeParams, KlKind};
use dfpo::train::rollout::{flow_readout, flow_targets, FlowSolve, FlowTargetOpts, Stream};
use dfpo::train::step_ops::StepOps;

/// `rows` rows of `s` tokens: an empty row, a full row, and random response spans.
fn ragged_mask(rng: &mut Rng, rows: usize, s: usize) -> Vec<f32> {
    let mut m = vec![0.0f32; rows * s];
    for r in 0..rows {
        let (a, b) = match r {
            0 => (0, 0),
            1 => (0, s),
            _ => {
                let a = (rng.uniform() * (s as f64 / 2.0)) as usize;
                (
                    a,
                    (a + 1 + (rng.uniform() * (s - a) as f64) as usize).min(s),
                )
            }
        };
        m[r * s + a..r * s + b].fill(1.0);
    }
    m
}

fn backends(test: &str) -> Option<(StepOps, StepOps)> {
    let dev = cuda_for_test(test)?;
    let cuda = StepOps::new(&Device::Cuda(dev));
    assert!(cuda.is_cuda());
    Some((StepOps::host(), cuda))
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn flow_readout_and_targets_match_the_cpu_backend() {
    let Some((host, cuda)) = backends("flow_readout_and_targets_match_the_cpu_backend") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_step_ops_flow");
    for (k, width, solver, steps) in [(32, 32, Solver::Euler, 1u32), (20, 64, Solver::Midpoint, 3)]
    {
        let shape = FlowHeadShape::new(24, width, 2).unwrap();
        let (rows, s) = (5, 9);
        let n = rows * s;
        let mask = ragged_mask(&mut rng, rows, s);
        let fs = FlowSolve {
            shape,
            k,
            readout_steps: steps,
            target_steps: 10,
            solver,
            clip: Some((-0.4, 1.3)),
        };
        let params = flow::init_params(&shape, rng.next_u64());
        let u = rng.normal_vec(n * width, 1.0);
        let (zh, sdh) = flow_readout(&host, &fs, &params, &u, &mask).unwrap();
        let (zc, sdc) = flow_readout(&cuda, &fs, &params, &u, &mask).unwrap();
        assert_close(&format!("readout K {k}"), &zc, &zh, 1e-4, 1e-5);
        assert_close(&format!("readout std K {k}"), &sdc, &sdh, 1e-4, 1e-5);

        let ret = rng.uniform_vec(n * k, 0.0, 1.0);
        let rewards = rng.uniform_vec(n, -0.1, 0.1);
        let o = FlowTargetOpts {
            gamma: 1.0,
            kappa: 0.3,
            direction: 1,
            anchor_lambda: true,
        };
        let seed = rng.next_u64() >> 1;
        let targets = |ops: &StepOps| {
            let mut tau = Stream::new(seed, 3, "tau");
            flow_targets(
                ops, &fs, &params, &u, &zh, &sdh, &ret, &rewards, &mask, s, &o, &mut tau,
            )
            .unwrap()
        };
        let (th, tc) = (targets(&host), targets(&cuda));
        let names = [
            "z_read", "tau_read", "z_b", "tau_b", "z_d", "tau_d", "eps", "target", "vel_b",
            "vel_d", "w_unc", "dmask",
        ];
        for ((name, a), b) in names.iter().zip(tc.fields()).zip(th.fields()) {
            assert_close(&format!("flow_targets {name}, K {k}"), a, b, 1e-4, 1e-5);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn solves_evaluations_and_noise_match_the_cpu_backend() {
    let Some((host, cuda)) = backends("solves_evaluations_and_noise_match_the_cpu_backend") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_step_ops_solves");
    let shape = FlowHeadShape::new(16, 32, 3).unwrap();
    let (n_tok, k) = (37, 32);
    let rows = n_tok * k;
    let params = flow::init_params(&shape, rng.next_u64());
    let u = rng.normal_vec(n_tok * shape.width, 1.0);
    let z0 = rng.normal_vec(rows, 1.0);
    let (a, b) = (
        rng.uniform_vec(rows, 0.0, 0.5),
        rng.uniform_vec(rows, 0.5, 1.0),
    );
    for (interval, solver, clip) in [
        (Interval::Uniform(0.0, 1.0), Solver::Euler, None),
        (
            Interval::PerRow(&a, &b),
            Solver::Midpoint,
            Some((-1.0f32, 1.0f32)),
        ),
    ] {
        let opts = IntegrateOpts {
            steps: 4,
            solver,
            clip,
            jacobian: false,
        };
        let run = |ops: &StepOps| {
            let mut z1 = vec![POISON; rows];
            ops.integrate(&shape, &params, &u, k, &z0, interval, &opts, &mut z1)
                .unwrap();
            z1
        };
        assert_close(
            &format!("integrate {solver:?}"),
            &run(&cuda),
            &run(&host),
            1e-4,
            1e-5,
        );
    }
    let tau = rng.uniform_vec(rows, 0.0, 1.0);
    let eval = |ops: &StepOps| {
        let mut v = vec![POISON; rows];
        ops.eval(&shape, &params, &u, k, &z0, &tau, &mut v).unwrap();
        v
    };
    assert_close("eval", &eval(&cuda), &eval(&host), 1e-4, 1e-5);
    for kind in [
        Noise::Stratified,
        Noise::Random {
            seed: rng.next_u64(),
        },
    ] {
        let opts = NoiseOpts {
            kind,
            truncate: None,
        };
        let noise = |ops: &StepOps| {
            let mut e = vec![POISON; rows];
            ops.noise(&opts, k, &mut e).unwrap();
            e
        };
        assert_close(
            &format!("noise {kind:?}"),
            &noise(&cuda),
            &noise(&host),
            1e-5,
            1e-5,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn advantages_kl_and_value_statistics_match_the_cpu_backend() {
    let Some((host, cuda)) = backends("advantages_kl_and_value_statistics_match_the_cpu_backend")
    else {
        return;
    };
    let mut rng = Rng::fresh("cuda_step_ops_rl");
    let (b, t, k) = (7, 13, 32);
    let mask = ragged_mask(&mut rng, b, t);
    let values = rng.normal_vec(b * t * k, 0.5);
    let rewards = rng.normal_vec(b * t, 0.3);
    let p = GaeParams {
        gamma: 0.99,
        lambda: 0.95,
    };
    let gae = |ops: &StepOps| {
        let (mut adv, mut ret) = (vec![POISON; b * t * k], vec![POISON; b * t * k]);
        let mut mean = vec![POISON; b * t];
        ops.dist_gae(
            &values, &rewards, &mask, b, t, k, p, &mut adv, &mut ret, &mut mean,
        )
        .unwrap();
        (adv, ret, mean)
    };
    let (h, c) = (gae(&host), gae(&cuda));
    assert_close("dist_gae adv", &c.0, &h.0, 1e-5, 1e-5);
    assert_close("dist_gae ret", &c.1, &h.1, 1e-5, 1e-5);
    assert_close("dist_gae adv_mean", &c.2, &h.2, 1e-5, 1e-5);

    let whiten = |ops: &StepOps| {
        let mut out = vec![POISON; b * t];
        let (mu, sd) = ops.whiten(&h.2, &mask, &mut out).unwrap();
        (out, vec![mu, sd])
    };
    let (wh, wc) = (whiten(&host), whiten(&cuda));
    assert_close("whiten", &wc.0, &wh.0, 1e-4, 1e-5);
    assert_close("whiten (mu, sigma)", &wc.1, &wh.1, 1e-5, 1e-6);

    let logp = rng.uniform_vec(b * t, -3.0, 0.0);
    let logp_ref = rng.uniform_vec(b * t, -3.0, 0.0);
    for kind in [KlKind::K1, KlKind::K3] {
        let kl = |ops: &StepOps| {
            let mut out = vec![POISON; b * t];
            ops.kl_penalty(&logp, &logp_ref, &mask, kind, &mut out)
                .unwrap();
            out
        };
        assert_close(&format!("kl {kind:?}"), &kl(&cuda), &kl(&host), 1e-5, 1e-6);
    }

    let levels = TailLevels {
        alpha: 0.1,
        beta: 0.1,
    };
    let n_rows = 29;
    let x = rng.normal_vec_f64(n_rows * k, 1.0);
    let stats = |ops: &StepOps| {
        let mut st = vec![f64::NAN; n_rows * risk::NSTATS];
        ops.risk_stats(&x, k, levels, &mut st).unwrap();
        st
    };
    assert_close_f64("risk stats", &stats(&cuda), &stats(&host), 1e-4, 1e-5);
}
