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

// ---- The step-buffer forms (issue 11 item 2): data stays on the device ----------------------

use dfpo::graph::{GraphBuilder, Session, TensorId};
use dfpo::train::rollout::Batch;
use dfpo::train::step_ops::{FlowMicro, StepBuf, TokenList, FLOW_TARGET_FIELD};

/// A random rollout batch of `groups` × `n` rows of at most `s` tokens (some responses empty).
fn random_batch(rng: &mut Rng, groups: usize, n: usize, s: usize) -> Batch {
    let mut b = Batch {
        s,
        ..Default::default()
    };
    for g in 0..groups {
        for j in 0..n {
            let pl = 1 + (rng.uniform() * (s as f64 / 2.0)) as usize;
            let rl = if (g + j) % 5 == 3 {
                0
            } else {
                ((rng.uniform() * (s - pl) as f64) as usize).min(s - pl)
            };
            b.prompt_len.push(pl);
            b.response_len.push(rl);
            b.seqs.push(vec![3; pl + rl]);
            b.group.push(g);
            b.noisy.push(rng.range(-1.0, 1.5));
            b.clean.push(0.0);
            b.correct.push(false);
            b.unparsed.push(false);
            b.texts.push(String::new());
        }
    }
    b
}

fn dev_of(cuda: &StepOps, x: &[f32]) -> StepBuf {
    let b = cuda.upload(x).unwrap();
    assert!(b.host().is_err(), "an upload on CUDA is a device buffer");
    b
}

/// Batch bookkeeping on the device: the mask, the token rewards (with and without the KL term),
/// GRPO's per-row advantages on the mask and a masked readout; against the CPU backend's host
/// code, exactly (the same f32 and f64 operations).
#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn step_bookkeeping_matches_the_cpu_backend() {
    let Some((host, cuda)) = backends("step_bookkeeping_matches_the_cpu_backend") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_step_ops_bookkeeping");
    let batch = random_batch(&mut rng, 3, 4, 11);
    let (rows, s) = (batch.rows(), batch.s);
    let mh = host.batch_mask(&batch).unwrap();
    let mc = cuda.batch_mask(&batch).unwrap();
    assert_eq!(cuda.read(&mc).unwrap(), mh.host().unwrap(), "batch mask");
    // The response tokens: built on the device from the rows' lengths.
    let mask = mh.host().unwrap();
    let want: Vec<f32> = (0..rows * s)
        .filter(|&i| mask[i] != 0.0)
        .map(|i| i as f32)
        .collect();
    assert!(!want.is_empty());
    let th = host.batch_tokens(&batch, mask).unwrap();
    let tc = cuda.batch_tokens(&batch, mask).unwrap();
    assert_eq!(host.read_token_list(&th).unwrap(), want, "host token list");
    assert_eq!(
        cuda.read_token_list(&tc).unwrap(),
        want,
        "device token list"
    );
    let mut bad = batch.clone();
    bad.response_len[0] += 1;
    assert!(
        cuda.batch_tokens(&bad, mask).is_err(),
        "lengths that miss the mask"
    );
    let kl = rng.normal_vec(rows * s, 0.3);
    let klh = StepBuf::Host(kl.clone());
    let klc = dev_of(&cuda, &kl);
    for with_kl in [false, true] {
        let beta = rng.range(0.0, 0.5);
        let h = host
            .token_rewards(&batch, &mh, with_kl.then_some(&klh), beta, &batch.noisy)
            .unwrap();
        let c = cuda
            .token_rewards(&batch, &mc, with_kl.then_some(&klc), beta, &batch.noisy)
            .unwrap();
        assert_eq!(
            cuda.read(&c).unwrap(),
            h.host().unwrap(),
            "token rewards (kl {with_kl})"
        );
    }
    let a = rng.normal_vec(rows, 1.0);
    let h = host.rows_on_mask(&mh, s, &a).unwrap();
    let c = cuda.rows_on_mask(&mc, s, &a).unwrap();
    assert_eq!(cuda.read(&c).unwrap(), h.host().unwrap(), "rows on mask");
    let k = 3;
    let x = rng.normal_vec(rows * s * k, 1.0);
    let (mut xh, mut xc) = (StepBuf::Host(x.clone()), dev_of(&cuda, &x));
    host.mask_select(&mut xh, &mh, k).unwrap();
    cuda.mask_select(&mut xc, &mc, k).unwrap();
    assert_eq!(cuda.read(&xc).unwrap(), xh.host().unwrap(), "mask select");
}

/// The flow readout and targets, the prompt pooling, GAE, whitening, the KL and the scalar
/// sums on step buffers: the CUDA backend's device buffers against the CPU backend's host
/// vectors, on fresh random heads and ragged batches.
#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn step_buffers_match_the_cpu_backend() {
    let Some((host, cuda)) = backends("step_buffers_match_the_cpu_backend") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_step_ops_buffers");
    for (k, width, solver, clip) in [
        (8, 32, Solver::Euler, Some((-0.4f32, 1.3f32))),
        (20, 64, Solver::Midpoint, None),
    ] {
        let shape = FlowHeadShape::new(24, width, 2).unwrap();
        let batch = random_batch(&mut rng, 3, 3, 10);
        let (rows, s) = (batch.rows(), batch.s);
        let n = rows * s;
        let fs = FlowSolve {
            shape,
            k,
            readout_steps: 2,
            target_steps: 3,
            solver,
            clip,
        };
        let (mh, mc) = (
            host.batch_mask(&batch).unwrap(),
            cuda.batch_mask(&batch).unwrap(),
        );
        let mask = mh.host().unwrap().to_vec();
        let (th, tc) = (
            host.batch_tokens(&batch, &mask).unwrap(),
            cuda.batch_tokens(&batch, &mask).unwrap(),
        );
        let params = flow::init_params(&shape, rng.next_u64());
        let u = rng.normal_vec(n * width, 1.0);
        let (ph, pc) = (StepBuf::Host(params.clone()), dev_of(&cuda, &params));
        let (uh, uc) = (StepBuf::Host(u.clone()), dev_of(&cuda, &u));
        let (zh, sdh) = host.flow_readout_buf(&fs, &ph, &uh, &mh, &th).unwrap();
        let (zc, sdc) = cuda.flow_readout_buf(&fs, &pc, &uc, &mc, &tc).unwrap();
        let rd = |b: &StepBuf| cuda.read(b).unwrap();
        assert_close("readout", &rd(&zc), zh.host().unwrap(), 1e-4, 1e-5);
        assert_close("readout std", &rd(&sdc), sdh.host().unwrap(), 1e-4, 1e-5);

        let rewards = rng.uniform_vec(n, -0.2, 0.2);
        let (rh, rc) = (StepBuf::Host(rewards.clone()), dev_of(&cuda, &rewards));
        let p = GaeParams {
            gamma: 1.0,
            lambda: 0.95,
        };
        let gh = host.gae_buf(&zh, &rh, &mh, rows, s, k, p).unwrap();
        let gc = cuda.gae_buf(&zc, &rc, &mc, rows, s, k, p).unwrap();
        assert_close("gae ret", &rd(&gc.1), gh.1.host().unwrap(), 1e-4, 1e-5);
        assert_close("gae adv", &rd(&gc.2), gh.2.host().unwrap(), 1e-4, 1e-5);
        let wh = host.whiten_buf(&gh.2, &mh).unwrap();
        let wc = cuda.whiten_buf(&gc.2, &mc).unwrap();
        assert_close("whiten", &rd(&wc), wh.host().unwrap(), 1e-3, 1e-4);

        for (direction, anchor_lambda) in [(1, true), (-1, false)] {
            let o = FlowTargetOpts {
                gamma: 0.97,
                kappa: 0.3,
                direction,
                anchor_lambda,
            };
            let seed = rng.next_u64() >> 1;
            let (mut r1, mut r2) = (Stream::new(seed, 2, "tau"), Stream::new(seed, 2, "tau"));
            let mut fh = host
                .flow_targets_buf(
                    &fs, &ph, &uh, &zh, &sdh, &gh.1, &rh, &mh, &th, s, &o, &mut r1,
                )
                .unwrap();
            let mut fc = cuda
                .flow_targets_buf(
                    &fs, &pc, &uc, &zc, &sdc, &gc.1, &rc, &mc, &tc, s, &o, &mut r2,
                )
                .unwrap();
            assert_eq!(r1.state(), r2.state(), "the streams advance alike");
            host.pool_first_buf(&batch, &mut fh[FLOW_TARGET_FIELD], k)
                .unwrap();
            cuda.pool_first_buf(&batch, &mut fc[FLOW_TARGET_FIELD], k)
                .unwrap();
            for (i, (a, b)) in fc.iter().zip(&fh).enumerate() {
                assert_close(
                    &format!("target field {i} (K {k}, dir {direction})"),
                    &rd(a),
                    b.host().unwrap(),
                    1e-4,
                    1e-5,
                );
            }
        }

        let levels = TailLevels {
            alpha: 0.25,
            beta: 0.25,
        };
        let stats = [
            ("mean", risk::Stat::Mean),
            ("std", risk::Stat::Std),
            ("cvar", risk::Stat::CvarLow),
        ];
        let (mut sh, mut scd) = (host.scalars().unwrap(), cuda.scalars().unwrap());
        host.risk_stat_sums(&mut sh, &zh, &th, k, levels, &stats)
            .unwrap();
        cuda.risk_stat_sums(&mut scd, &zc, &tc, k, levels, &stats)
            .unwrap();
        host.sum_into(&mut sh, "wsum", &uh, Some(&mh), n, width, 3)
            .unwrap();
        cuda.sum_into(&mut scd, "wsum", &uc, Some(&mc), n, width, 3)
            .unwrap();
        let (a, b) = (
            host.read_scalars(&sh).unwrap(),
            cuda.read_scalars(&scd).unwrap(),
        );
        for ((na, va), (nb, vb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert_close_f64(&format!("scalar {na}"), &[*vb], &[*va], 1e-4, 1e-4);
        }
    }
}

/// A graph with f32 inputs of the given lengths (and a loss of its own), to test the
/// writes of step buffers into graph inputs.
fn input_graph(device: &Device, lens: &[usize]) -> (Session, Vec<TensorId>) {
    let mut g = GraphBuilder::new();
    let ins: Vec<TensorId> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| g.input(&format!("in{i}"), l))
        .collect();
    let p = g.param("p", 1);
    let loss = g
        .node(dfpo::graph::ops::MseLoss, &[p, p], &[("loss", 1)])
        .unwrap()[0];
    let plan = g.plan(loss, device).unwrap();
    (Session::new(plan, device.clone()).unwrap(), ins)
}

/// Row gathers, token weights and the flow critic's micro-batch inputs written from step
/// buffers into graph inputs (poisoned first): the CUDA device gathers equal the host gathers.
#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn graph_input_writes_match_the_cpu_backend() {
    let Some(dev) = cuda_for_test("graph_input_writes_match_the_cpu_backend") else {
        return;
    };
    let (host, cuda) = (StepOps::host(), StepOps::new(&Device::Cuda(dev.clone())));
    let mut rng = Rng::fresh("cuda_step_ops_inputs");
    let batch = random_batch(&mut rng, 3, 2, 9);
    let (rows, s, k, b, cap) = (batch.rows(), batch.s, 4, 4, 40);
    let (mh, mc) = (
        host.batch_mask(&batch).unwrap(),
        cuda.batch_mask(&batch).unwrap(),
    );
    let mask = mh.host().unwrap().to_vec();
    let x = rng.normal_vec(rows * s * k, 1.0);
    let (xh, xc) = (StepBuf::Host(x.clone()), dev_of(&cuda, &x));
    let fields: Vec<Vec<f32>> = (0..12)
        .map(|i| rng.normal_vec(rows * s * if i < 10 { k } else { 1 }, 1.0))
        .collect();
    let fh: Vec<StepBuf> = fields.iter().map(|f| StepBuf::Host(f.clone())).collect();
    let fc: Vec<StepBuf> = fields.iter().map(|f| dev_of(&cuda, f)).collect();
    let pick: Vec<Option<usize>> = vec![Some(4), Some(1), Some(5), None];
    let denom: Vec<f32> = vec![3.0, 0.0, 7.5, 2.0];
    let mut lens = vec![b * s * k, b * s];
    lens.extend([cap; 2]);
    lens.extend((0..12).map(|i| cap * if i < 10 { k } else { 1 }));
    lens.extend([cap; 2]);
    let sel = [4usize, 1, 5];
    let mut rowpos = vec![-1i32; rows];
    for (j, &r) in sel.iter().enumerate() {
        rowpos[r] = j as i32;
    }
    let global: Vec<usize> = sel
        .iter()
        .flat_map(|&r| (r * s..(r + 1) * s).filter(|&i| mask[i] != 0.0))
        .collect();
    // The micro-batch's tokens: listed by the host, or gathered from the step's token list.
    let (th, tc) = (
        host.batch_tokens(&batch, &mask).unwrap(),
        cuda.batch_tokens(&batch, &mask).unwrap(),
    );
    let run = |ops: &StepOps,
               device: &Device,
               x: &StepBuf,
               m: &StepBuf,
               f: &[StepBuf],
               from: Option<&TokenList>| {
        let (mut sess, ins) = input_graph(device, &lens);
        for (&t, &l) in ins.iter().zip(&lens) {
            sess.write(t, &vec![POISON; l]).unwrap();
        }
        ops.write_rows(&mut sess, ins[0], x, &pick, s * k).unwrap();
        ops.write_token_weights(&mut sess, ins[1], m, &pick, s, &denom)
            .unwrap();
        let mut fi = vec![ins[2]];
        fi.extend_from_slice(&ins[4..16]);
        fi.extend_from_slice(&ins[16..18]);
        for first in [None, Some(2.0f32)] {
            let mb = FlowMicro {
                global: &global,
                rowpos: &rowpos,
                total: global.len() as f32,
                first_count: first,
                plen: &batch.prompt_len,
                s,
                from: from.map(|l| (l, &sel[..])),
            };
            ops.write_flow_inputs(&mut sess, &fi, f, &mb, k).unwrap();
            if first.is_none() {
                // Keep the token-mean risk weights in their own input.
                let rw = sess.read_f32(ins[17]).unwrap();
                sess.write(ins[3], &rw).unwrap();
            }
        }
        ins.iter()
            .map(|&t| sess.read_f32(t).unwrap())
            .collect::<Vec<_>>()
    };
    let want = run(&host, &Device::Cpu, &xh, &mh, &fh, None);
    assert_eq!(run(&host, &Device::Cpu, &xh, &mh, &fh, Some(&th)), want);
    let cd = Device::Cuda(dev);
    for from in [None, Some(&tc)] {
        let got = run(&cuda, &cd, &xc, &mc, &fc, from);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let what = format!("graph input {i} (from the token list: {})", from.is_some());
            assert_close(&what, g, w, 0.0, 0.0);
        }
    }
    // A row list that does not match the micro-batch's tokens (a row with tokens left out) is
    // an error.
    let short: Vec<usize> = match sel.iter().position(|&r| batch.response_len[r] > 0) {
        Some(i) => sel
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, &r)| r)
            .collect(),
        None => panic!("the micro-batch has no response tokens"),
    };
    let (mut sess, ins) = input_graph(&cd, &lens);
    let mut fi = vec![ins[2]];
    fi.extend_from_slice(&ins[4..18]);
    let mb = FlowMicro {
        global: &global,
        rowpos: &rowpos,
        total: 1.0,
        first_count: None,
        plen: &batch.prompt_len,
        s,
        from: Some((&tc, &short[..])),
    };
    assert!(cuda.write_flow_inputs(&mut sess, &fi, &fc, &mb, k).is_err());
    // The host forms are the trainer's arithmetic: spot-check one gathered row and a weight.
    assert_eq!(&want[0][..s * k], &x[4 * s * k..5 * s * k]);
    assert!(want[0][3 * s * k..].iter().all(|&v| v == 0.0));
    let w1 = &want[1];
    for tt in 0..s {
        assert_eq!(w1[tt], mask[4 * s + tt] / 3.0);
        assert_eq!(w1[s + tt], 0.0);
    }
}
