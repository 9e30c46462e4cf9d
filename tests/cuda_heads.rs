//! CUDA parity of the training heads' loss ops (`kernels/heads.cu`, the risk terms through
//! `risk.cu`): each loss op in a graph on the CUDA device against its host kernel (the CPU
//! reference, whose backward `tests/train_heads.rs` checks by finite differences) on fresh random
//! inputs: the loss, every statistic and the gradient of every differentiable input. Covers
//! zero token weights, both KL estimators and no KL, value clipping on and off, the quantile
//! sum and mean, risk terms on and off, the consistency term on and off, and an input gradient
//! that is not needed. Gradients accumulate into the graph's zero-filled gradients, so an
//! element the kernel forgets to write differs from the (non-zero) reference.
//! Ignored without a GPU (`DFPO_REQUIRE_CUDA=1` makes a missing GPU a failure).

mod common;

use common::{assert_close, Rng};
use dfpo::device::{cuda_for_test, Device};
use dfpo::graph::{DType, GraphBuilder, Op, Session, TensorId};
use dfpo::kernels::risk::{RiskLossWeights, TailLevels};
use dfpo::kernels::rl::KlKind;
use dfpo::train::heads::{
    ActorLoss, FlowCriticLoss, FlowTermWeights, HostKernel, QuantileLoss, RiskTerms, ValueLoss,
};

/// Runs `op` on `ins` in a graph on `dev` (inputs `diff` as parameters, so they get gradients;
/// d loss = 1): (loss, stats, gradients of `diff`).
fn run_graph(
    dev: &Device,
    op: impl Op + 'static,
    ins: &[Vec<f32>],
    diff: &[usize],
    n_stats: usize,
) -> (f32, Vec<f32>, Vec<Vec<f32>>) {
    let mut g = GraphBuilder::new();
    let ids: Vec<TensorId> = ins
        .iter()
        .enumerate()
        .map(|(i, v)| {
            if diff.contains(&i) {
                g.param(&format!("p{i}"), v.len())
            } else {
                g.input(&format!("x{i}"), v.len())
            }
        })
        .collect();
    let outs = g
        .node_typed(
            op,
            &ids,
            &[("loss", 1, DType::F32), ("stats", n_stats, DType::F32)],
        )
        .unwrap();
    g.keep(outs[1]);
    let plan = g.plan(outs[0], dev).unwrap();
    let grads: Vec<TensorId> = diff.iter().map(|&i| plan.grad(ids[i]).unwrap()).collect();
    let mut sess = Session::new(plan, dev.clone()).unwrap();
    for (&t, v) in ids.iter().zip(ins) {
        sess.write(t, v).unwrap();
    }
    let loss = sess.run().unwrap();
    let stats = sess.read_f32(outs[1]).unwrap();
    let gv = grads.iter().map(|&t| sess.read_f32(t).unwrap()).collect();
    (loss, stats, gv)
}

/// The host kernel's (loss, stats, gradients of `diff`) with d loss = 1.
fn reference(
    k: &dyn HostKernel,
    ins: &[Vec<f32>],
    diff: &[usize],
) -> (f32, Vec<f32>, Vec<Vec<f32>>) {
    let outs = k.forward(ins).unwrap();
    let d_outs = vec![vec![1.0f32], vec![0.0; outs[1].len()]];
    let need: Vec<bool> = (0..ins.len()).map(|i| diff.contains(&i)).collect();
    let g = k.backward(ins, &outs, &d_outs, &need).unwrap();
    let gv = diff.iter().map(|&i| g[i].clone().unwrap()).collect();
    (outs[0][0], outs[1].clone(), gv)
}

fn compare(
    what: &str,
    dev: &Device,
    op: impl Op + HostKernel + 'static,
    ins: &[Vec<f32>],
    diff: &[usize],
) {
    let want = reference(&op, ins, diff);
    let n_stats = want.1.len();
    let got = run_graph(dev, op, ins, diff, n_stats);
    assert!(want.0.abs() > 0.0, "{what}: a zero loss tests nothing");
    assert_close(&format!("{what} loss"), &[got.0], &[want.0], 1e-4, 1e-6);
    assert_close(&format!("{what} stats"), &got.1, &want.1, 1e-4, 1e-6);
    for ((i, g), w) in diff.iter().zip(&got.2).zip(&want.2) {
        assert!(w.iter().any(|&v| v != 0.0), "{what}: gradient {i} all zero");
        assert_close(&format!("{what} gradient {i}"), g, w, 2e-4, 1e-6);
    }
}

fn weights(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            if i % 5 == 2 {
                0.0
            } else {
                rng.range(0.0, 2.0 / n as f64) as f32
            }
        })
        .collect()
}

fn risk(on: bool) -> RiskTerms {
    if !on {
        return RiskTerms::off();
    }
    RiskTerms {
        levels: TailLevels {
            alpha: 0.25,
            beta: 0.25,
        },
        weights: RiskLossWeights {
            cvar: 1.0,
            gain: 0.7,
            shape: 1.3,
            mean_shift: 0.4,
        },
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn loss_ops_match_their_host_kernels() {
    let Some(d) = cuda_for_test("loss_ops_match_their_host_kernels") else {
        return;
    };
    let dev = Device::Cuda(d);
    let mut rng = Rng::fresh("cuda_heads");
    let n = 333;

    // Actor: no KL, k1, k3 (log-ratios wide enough to clip and to hit the k3 clamp).
    for kl in [None, Some(KlKind::K1), Some(KlKind::K3)] {
        let lp = rng.uniform_vec(n, -4.0, 0.0);
        let old: Vec<f32> = lp
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                l + if i % 17 == 0 {
                    25.0
                } else {
                    rng.range(-0.5, 0.5) as f32
                }
            })
            .collect();
        let mut ins = vec![
            lp.clone(),
            rng.uniform_vec(n, 0.0, 3.0),
            old,
            rng.normal_vec(n, 1.0),
            weights(&mut rng, n),
        ];
        if kl.is_some() {
            ins.push(
                lp.iter()
                    .enumerate()
                    .map(|(i, &l)| {
                        l + if i % 13 == 0 {
                            -12.0
                        } else {
                            rng.range(-1.0, 1.0) as f32
                        }
                    })
                    .collect(),
            );
            ins.push(vec![0.3]);
        }
        let op = ActorLoss {
            n,
            clip_low: 0.2,
            clip_high: 0.28,
            ent_coef: 0.01,
            kl,
        };
        compare(&format!("actor ({kl:?})"), &dev, op, &ins, &[0, 1]);
    }
    // Only the log-prob gradient needed.
    let ins = vec![
        rng.uniform_vec(n, -3.0, 0.0),
        rng.uniform_vec(n, 0.0, 3.0),
        rng.uniform_vec(n, -3.0, 0.0),
        rng.normal_vec(n, 1.0),
        weights(&mut rng, n),
    ];
    let op = ActorLoss {
        n,
        clip_low: 0.2,
        clip_high: 0.2,
        ent_coef: 0.0,
        kl: None,
    };
    compare("actor (logp only)", &dev, op, &ins, &[0]);

    // Value loss, clipped and not.
    for clip in [0.0f32, 0.2] {
        let v = rng.normal_vec(n, 1.0);
        let old: Vec<f32> = v.iter().map(|&x| x + rng.range(-0.5, 0.5) as f32).collect();
        let ins = vec![v, rng.normal_vec(n, 1.0), old, weights(&mut rng, n)];
        compare(
            &format!("value (clip {clip})"),
            &dev,
            ValueLoss { n, clip },
            &ins,
            &[0],
        );
    }

    // Quantile loss: sum / mean over quantiles, risk terms on / off.
    for (k, sum_quantiles, on) in [(8, true, true), (12, false, false), (5, true, true)] {
        let ins = vec![
            rng.normal_vec(n * k, 1.0),
            rng.normal_vec(n * k, 1.0),
            weights(&mut rng, n),
        ];
        let op = QuantileLoss {
            n,
            k,
            kappa: 0.7,
            sum_quantiles,
            risk: risk(on),
        };
        compare(
            &format!("quantile (K {k}, sum {sum_quantiles}, risk {on})"),
            &dev,
            op,
            &ins,
            &[0],
        );
    }

    // Flow critic loss: consistency on / off, risk on / off, DCFM mask and weights.
    for (k, gc, on) in [(8, 0.5f32, true), (6, 0.0, false), (16, 1.0, true)] {
        let nk = n * k;
        let mut ins: Vec<Vec<f32>> = (0..8).map(|_| rng.normal_vec(nk, 1.0)).collect();
        ins.push(rng.uniform_vec(n, 0.5, 1.0));
        ins.push((0..n).map(|i| (i % 3 != 0) as u8 as f32).collect());
        let tw = weights(&mut rng, n);
        ins.push(tw.clone());
        // Risk weights: on "first tokens" only, one in four.
        ins.push(
            (0..n)
                .map(|i| if i % 4 == 0 { 4.0 / n as f32 } else { 0.0 })
                .collect(),
        );
        let op = FlowCriticLoss {
            n,
            k,
            w: FlowTermWeights {
                dcfm: 0.8,
                bcfm: 1.2,
                gc,
            },
            risk: risk(on),
        };
        // Without consistency and risk terms v_read gets no gradient: then it needs none.
        let diff: &[usize] = if gc == 0.0 && !on {
            &[1, 2]
        } else {
            &[0, 1, 2]
        };
        compare(
            &format!("flow critic (K {k}, gc {gc}, risk {on})"),
            &dev,
            op,
            &ins,
            diff,
        );
    }
}
