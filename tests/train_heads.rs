//! Finite-difference checks of the training heads' backward passes (`src/train/heads.rs`):
//! each host kernel's analytic gradient against central differences of its own forward.

use dfpo::kernels::risk::{RiskLossWeights, TailLevels};
use dfpo::train::heads::{
    ActorLoss, FlowCriticLoss, FlowTermWeights, HostKernel, QuantileLoss, RiskTerms, ValueLoss,
};

mod common;
use common::Rng;

/// Checks d loss / d ins[i] for every i in `wrt` by central differences (f32 forward,
/// relative step), on a few random coordinates each.
fn fd_check(kern: &dyn HostKernel, ins: &[Vec<f32>], wrt: &[usize], rng: &mut Rng, tol: f64) {
    let outs = kern.forward(ins).unwrap();
    let d_outs: Vec<Vec<f32>> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            if i == 0 {
                vec![1.0]
            } else {
                vec![0.0; o.len()]
            }
        })
        .collect();
    let need: Vec<bool> = (0..ins.len()).map(|i| wrt.contains(&i)).collect();
    let grads = kern.backward(ins, &outs, &d_outs, &need).unwrap();
    for &i in wrt {
        let g = grads[i].as_ref().expect("gradient asked for");
        assert_eq!(g.len(), ins[i].len());
        let mut checked = 0;
        for _ in 0..40 {
            let j = (rng.next_u64() % ins[i].len() as u64) as usize;
            let h = 1e-2f32;
            let mut p = ins.to_vec();
            p[i][j] += h;
            let lp = kern.forward(&p).unwrap()[0][0] as f64;
            p[i][j] -= 2.0 * h;
            let lm = kern.forward(&p).unwrap()[0][0] as f64;
            let fd = (lp - lm) / (2.0 * h as f64);
            let an = g[j] as f64;
            let err = (fd - an).abs();
            assert!(
                err <= tol * (1.0 + an.abs().max(fd.abs())),
                "{}: input {i}[{j}]: analytic {an} vs finite difference {fd}",
                kern.name()
            );
            checked += 1;
        }
        assert!(checked > 0);
    }
}

fn weights(n: usize, rng: &mut Rng) -> Vec<f32> {
    let w: Vec<f32> = (0..n)
        .map(|i| {
            if i % 4 == 3 {
                0.0
            } else {
                rng.range(0.5, 1.5) as f32
            }
        })
        .collect();
    let s: f32 = w.iter().sum();
    w.into_iter().map(|x| x / s).collect()
}

#[test]
fn actor_loss_gradient_matches_finite_differences() {
    let mut rng = Rng::fresh(module_path!());
    let n = 64;
    let lp: Vec<f32> = (0..n).map(|_| rng.range(-3.0, -0.1) as f32).collect();
    // Old log-probs near the new ones: some ratios inside the clip range, some outside.
    let old: Vec<f32> = lp
        .iter()
        .map(|&l| l + (rng.range(-0.4, 0.4) as f32))
        .collect();
    let ent: Vec<f32> = (0..n).map(|_| rng.range(0.1, 2.0) as f32).collect();
    let adv: Vec<f32> = (0..n).map(|_| rng.range(-2.0, 2.0) as f32).collect();
    let w = weights(n, &mut rng);
    let k = ActorLoss {
        n,
        clip_low: 0.2,
        clip_high: 0.28,
        ent_coef: 0.01,
        kl: None,
    };
    let ins = vec![lp, ent, old, adv, w];
    fd_check(&k, &ins, &[0, 1], &mut rng, 2e-2);
    // Some tokens were clipped, some not (both branches exercised).
    let cf = k.forward(&ins).unwrap()[1][1];
    assert!(cf > 0.0 && cf < 1.0, "clip fraction {cf}");
}

#[test]
fn actor_loss_with_a_kl_term_matches_finite_differences_and_its_value() {
    use dfpo::kernels::rl::KlKind;
    let mut rng = Rng::fresh(module_path!());
    let n = 48;
    let lp: Vec<f32> = (0..n).map(|_| rng.range(-3.0, -0.1) as f32).collect();
    // Ratios well inside the clip range: no kink within the finite-difference step.
    let old: Vec<f32> = lp
        .iter()
        .map(|&l| l + rng.range(-0.1, 0.1) as f32)
        .collect();
    let rf: Vec<f32> = lp
        .iter()
        .map(|&l| l + rng.range(-1.0, 1.0) as f32)
        .collect();
    let ent: Vec<f32> = (0..n).map(|_| rng.range(0.1, 2.0) as f32).collect();
    let adv: Vec<f32> = (0..n).map(|_| rng.range(-2.0, 2.0) as f32).collect();
    let w = weights(n, &mut rng);
    let beta = 0.3f32;
    for kind in [KlKind::K1, KlKind::K3] {
        let k = ActorLoss {
            n,
            clip_low: 0.2,
            clip_high: 0.2,
            ent_coef: 0.0,
            kl: Some(kind),
        };
        let ins = vec![
            lp.clone(),
            ent.clone(),
            old.clone(),
            adv.clone(),
            w.clone(),
            rf.clone(),
            vec![beta],
        ];
        fd_check(&k, &ins, &[0], &mut rng, 2e-2);
        // The KL statistic is the weighted k1 / k3 written out, and the loss adds β times it.
        let want: f64 = (0..n)
            .map(|i| {
                let x = (rf[i] - lp[i]) as f64;
                let kl = match kind {
                    KlKind::K1 => -x,
                    KlKind::K3 => x.exp() - x - 1.0,
                };
                w[i] as f64 * kl
            })
            .sum();
        let outs = k.forward(&ins).unwrap();
        assert!(
            (outs[1][4] as f64 - want).abs() < 1e-5,
            "{kind:?}: {} vs {want}",
            outs[1][4]
        );
        let plain = ActorLoss { kl: None, ..k };
        let base = plain.forward(&ins[..5]).unwrap()[0][0] as f64;
        assert!((outs[0][0] as f64 - base - beta as f64 * want).abs() < 1e-5);
    }
}

#[test]
fn value_loss_gradient_matches_finite_differences() {
    let mut rng = Rng::fresh(module_path!());
    let n = 64;
    let old: Vec<f32> = (0..n).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    let v: Vec<f32> = old
        .iter()
        .map(|&o| o + (rng.range(-0.5, 0.5) as f32))
        .collect();
    let ret: Vec<f32> = (0..n).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    let w = weights(n, &mut rng);
    let k = ValueLoss { n, clip: 0.2 };
    fd_check(&k, &[v, ret, old, w], &[0], &mut rng, 2e-2);
}

fn risk() -> RiskTerms {
    RiskTerms {
        levels: TailLevels {
            alpha: 0.25,
            beta: 0.25,
        },
        weights: RiskLossWeights {
            cvar: 1.0,
            gain: 0.7,
            shape: 0.5,
            mean_shift: 0.0,
        },
    }
}

#[test]
fn quantile_loss_gradient_matches_finite_differences() {
    let mut rng = Rng::fresh(module_path!());
    let (n, k) = (12, 8);
    let q: Vec<f32> = (0..n * k).map(|_| rng.range(-1.5, 1.5) as f32).collect();
    let g: Vec<f32> = (0..n * k).map(|_| rng.range(-1.0, 2.0) as f32).collect();
    let w = weights(n, &mut rng);
    let kern = QuantileLoss {
        n,
        k,
        kappa: 1.0,
        sum_quantiles: true,
        risk: risk(),
    };
    let ins = [q, g, w];
    fd_check(&kern, &ins, &[0], &mut rng, 3e-2);
    // The mean over the quantiles is the QR-DQN sum over K.
    let mean = QuantileLoss {
        sum_quantiles: false,
        ..kern
    };
    let (a, b) = (kern.forward(&ins).unwrap(), mean.forward(&ins).unwrap());
    assert!((a[1][0] - k as f32 * b[1][0]).abs() < 1e-5 * a[1][0].abs());
}

#[test]
fn flow_critic_loss_gradient_matches_finite_differences() {
    let mut rng = Rng::fresh(module_path!());
    let (n, k) = (10, 8);
    let nk = n * k;
    let mut r = |lo: f32, hi: f32, len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| rng.range(lo as f64, hi as f64) as f32)
            .collect()
    };
    let ins = vec![
        r(-1.0, 1.0, nk), // v_read
        r(-1.0, 1.0, nk), // v_b
        r(-1.0, 1.0, nk), // v_d
        r(-2.0, 2.0, nk), // eps
        r(-0.5, 1.5, nk), // target
        r(-1.0, 1.0, nk), // gc_target
        r(-1.0, 1.0, nk), // vel_b
        r(-1.0, 1.0, nk), // vel_d
        r(0.5, 1.0, n),   // w_unc
        (0..n).map(|i| (i % 3 != 0) as u8 as f32).collect(),
        {
            let mut rr = Rng::fresh("flow_critic_loss weights");
            weights(n, &mut rr)
        },
        // Risk-term row weights: other rows than the token weights.
        (0..n).map(|i| if i % 2 == 0 { 0.2 } else { 0.0 }).collect(),
    ];
    let kern = FlowCriticLoss {
        n,
        k,
        w: FlowTermWeights {
            dcfm: 1.0,
            bcfm: 0.8,
            gc: 0.5,
        },
        risk: risk(),
    };
    let mut rng = Rng::fresh(module_path!());
    fd_check(&kern, &ins, &[0, 1, 2], &mut rng, 3e-2);
    // Each term switches off with its weight.
    let off = FlowCriticLoss {
        n,
        k,
        w: FlowTermWeights {
            dcfm: 0.0,
            bcfm: 0.0,
            gc: 0.0,
        },
        risk: RiskTerms {
            weights: RiskLossWeights {
                cvar: 0.0,
                gain: 0.0,
                shape: 0.0,
                mean_shift: 0.0,
            },
            ..risk()
        },
    };
    assert_eq!(off.forward(&ins).unwrap()[0][0], 0.0);
}

#[test]
fn gather_rows_backward_is_the_adjoint_of_its_forward() {
    use dfpo::train::heads::GatherRows;
    let mut rng = Rng::fresh(module_path!());
    let (n, m, w) = (9, 7, 5);
    let x: Vec<f32> = (0..n * w).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    // Repeats, a skipped row (−1) and unlisted rows.
    let rows: Vec<f32> = vec![3.0, 0.0, 3.0, -1.0, 8.0, 5.0, 1.0];
    let k = GatherRows { n, m, w };
    let ins = vec![x.clone(), rows.clone()];
    let y = k.forward(&ins).unwrap().remove(0);
    assert_eq!(&y[0..w], &x[3 * w..4 * w]);
    assert!(y[3 * w..4 * w].iter().all(|&v| v == 0.0));
    let dy: Vec<f32> = (0..m * w).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    let dx = k
        .backward(
            &ins,
            std::slice::from_ref(&y),
            std::slice::from_ref(&dy),
            &[true, false],
        )
        .unwrap()[0]
        .clone()
        .unwrap();
    // <G x, dy> = <x, Gᵀ dy> for every x: check on the unit vectors' sums.
    let lhs: f64 = y.iter().zip(&dy).map(|(a, b)| (a * b) as f64).sum();
    let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| (a * b) as f64).sum();
    assert!((lhs - rhs).abs() < 1e-5, "{lhs} vs {rhs}");
    assert!(k
        .forward(&[x, vec![0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
        .is_err());
}

/// verl clamps the log-ratio to ±20 before the exp: one token whose log-prob moved by 100 must
/// not make the loss or its gradient non-finite (it would skip the whole update).
#[test]
fn actor_loss_stays_finite_for_an_extreme_log_ratio() {
    let k = ActorLoss {
        n: 3,
        clip_low: 0.2,
        clip_high: 0.2,
        ent_coef: 0.0,
        kl: None,
    };
    // Token 0: log-ratio +100 with a negative advantage (the unclipped branch is exp(100)·|A|).
    let ins = vec![
        vec![0.0, -1.0, -0.5],
        vec![0.0; 3],
        vec![-100.0, -1.0, -0.4],
        vec![-1.0, 0.5, -0.3],
        vec![1.0 / 3.0; 3],
    ];
    let outs = k.forward(&ins).unwrap();
    let (l, dl, _) = dfpo::train::heads::ppo_token(0.0, -100.0, -1.0, 0.2, 0.2);
    assert!(outs[0][0].is_finite(), "loss {}", outs[0][0]);
    assert!(
        l.is_finite() && dl.is_finite(),
        "token loss {l}, gradient {dl}"
    );
    // exp(20)·|A| weighted 1/3, plus the two ordinary tokens.
    let want = (20.0f64.exp() - 0.5 + 0.3 * (-0.1f64).exp()) / 3.0;
    assert!(
        ((outs[0][0] as f64) - want).abs() < 1e-6 * want,
        "{} vs {want}",
        outs[0][0]
    );
    let g = k
        .backward(
            &ins,
            &outs,
            &[vec![1.0], vec![0.0; 4]],
            &[true, false, false, false, false],
        )
        .unwrap();
    let g = g[0].as_ref().unwrap();
    assert!(g.iter().all(|v| v.is_finite()), "gradient {g:?}");
    // Outside the clamp the ratio is constant: no gradient (torch.clamp's).
    assert_eq!(g[0], 0.0);
}
