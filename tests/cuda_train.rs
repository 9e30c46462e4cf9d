//! CUDA parity of the training step: the policy's PPO update and every critic head's update on
//! CUDA (bf16 backbone, f32 heads) against the CPU (f32) on the same weights and batch, within
//! bf16 tolerance; then a full RL step of every algorithm on CUDA. Ignored without a GPU
//! (`DFPO_REQUIRE_CUDA=1` makes a missing GPU a failure).

use dfpo::device::Device;
use dfpo::kernels::flow::{FlowHeadShape, IntegrateOpts, Solver};
use dfpo::kernels::risk::{RiskLossWeights, TailLevels};
use dfpo::model::decoder::Decoder;
use dfpo::task::arith;
use dfpo::train::config::TrainConfig;
use dfpo::train::heads::{FlowTermWeights, RiskTerms};
use dfpo::train::models::{Critic, CriticHead, OptSettings, Policy};
use dfpo::train::trainer::Trainer;

mod common;
use common::Rng;

fn close(what: &str, got: f64, want: f64, rtol: f64) {
    assert!(
        got.is_finite() && (got - want).abs() <= rtol * (1e-3 + want.abs()),
        "{what}: CUDA {got} vs CPU {want}"
    );
}

fn batch(rng: &mut Rng, b: usize, s: usize) -> (Vec<Vec<u32>>, Vec<usize>, Vec<f32>) {
    let seqs: Vec<Vec<u32>> = (0..b)
        .map(|i| {
            (0..s - i % 3)
                .map(|_| (rng.next_u64() % 12) as u32 + 3)
                .collect()
        })
        .collect();
    let skip: Vec<usize> = (0..b).map(|_| 4).collect();
    let mut mask = vec![0.0f32; b * s];
    for (r, q) in seqs.iter().enumerate() {
        for t in 3..q.len() - 1 {
            mask[r * s + t] = 1.0;
        }
    }
    (seqs, skip, mask)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_policy_and_critic_updates_match_the_cpu() {
    let Some(dev) = dfpo::device::cuda_for_test("cuda_policy_and_critic_updates_match_the_cpu")
    else {
        return;
    };
    let cuda = Device::Cuda(dev);
    let mut rng = Rng::fresh("cuda_train");
    let dec = dfpo::model::init::random_decoder(arith::model_config(), rng.next_u64()).unwrap();
    let (b, s) = (4, 12);
    let (seqs, skip, mask) = batch(&mut rng, b, s);
    let tw = dfpo::train::rollout::token_weights(&mask, s, false);

    // Policy.
    let mk = |d: &Device| {
        Policy::new(
            dec_clone(&dec),
            b,
            s,
            d,
            0.8,
            0.2,
            0.2,
            0.01,
            None,
            &OptSettings::constant(1e-3),
        )
        .unwrap()
    };
    let (mut pc, mut pg) = (mk(&Device::Cpu), mk(&cuda));
    let (lp, _) = pc.logprobs(&seqs, &skip).unwrap();
    let (lpg, _) = pg.logprobs(&seqs, &skip).unwrap();
    for i in 0..lp.len() {
        if mask[i] != 0.0 {
            close(&format!("logprob[{i}]"), lpg[i] as f64, lp[i] as f64, 5e-2);
        }
    }
    let old: Vec<f32> = lp
        .iter()
        .map(|&l| l + (rng.range(-0.2, 0.2) as f32))
        .collect();
    let adv: Vec<f32> = (0..b * s).map(|_| rng.normal() as f32).collect();
    let a = pc.update(&seqs, &skip, &old, &adv, &tw, None).unwrap();
    let c = pg.update(&seqs, &skip, &old, &adv, &tw, None).unwrap();
    let (ga, gc) = (pc.grads().unwrap(), pg.grads().unwrap());
    close("actor pg_loss", c.pg_loss, a.pg_loss, 5e-2);
    close("actor entropy", c.entropy, a.entropy, 5e-2);
    let norm = |g: &[Vec<f32>]| {
        g.iter()
            .flatten()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    close("actor grad norm", norm(&gc), norm(&ga), 1e-1);

    // Critic heads.
    let k = 8;
    let risk = RiskTerms {
        levels: TailLevels {
            alpha: 0.25,
            beta: 0.25,
        },
        weights: RiskLossWeights::default(),
    };
    let shape = FlowHeadShape::new(dec.config.hidden_size, 32, 2).unwrap();
    let heads = [
        CriticHead::Value { clip: 0.2 },
        CriticHead::Quantile {
            k,
            kappa: 1.0,
            sum_quantiles: true,
            risk,
        },
        CriticHead::Flow {
            k,
            max_tokens: 4 * 12,
            shape,
            weights: FlowTermWeights {
                dcfm: 1.0,
                bcfm: 1.0,
                gc: 0.5,
            },
            risk,
            init_seed: 5,
            gc_solve: IntegrateOpts {
                steps: 4,
                solver: Solver::Euler,
                clip: None,
                jacobian: false,
            },
        },
    ];
    for head in heads {
        let n = b * s;
        let kk = head.k();
        let inputs: Vec<Vec<f32>> = match &head {
            CriticHead::Value { .. } => vec![
                (0..n).map(|_| rng.range(-1.0, 1.0) as f32).collect(),
                (0..n).map(|_| rng.range(-0.5, 0.5) as f32).collect(),
                tw.clone(),
            ],
            CriticHead::Quantile { .. } => vec![
                (0..n * kk).map(|_| rng.range(-1.0, 2.0) as f32).collect(),
                tw.clone(),
            ],
            CriticHead::Flow { .. } => {
                let mut v: Vec<Vec<f32>> = (0..10)
                    .map(|i| {
                        (0..n * kk)
                            .map(|_| {
                                if i == 1 {
                                    0.0
                                } else if i % 2 == 1 && i < 6 {
                                    rng.range(0.0, 1.0) as f32
                                } else {
                                    rng.range(-1.0, 1.0) as f32
                                }
                            })
                            .collect()
                    })
                    .collect();
                v[6] = v[0].clone();
                v.push((0..n).map(|_| rng.range(0.5, 1.0) as f32).collect());
                v.push(mask.clone());
                v.push(tw.clone());
                v.push(tw.clone());
                // Every token listed (identity gather).
                let mut all = vec![(0..n).map(|i| i as f32).collect::<Vec<f32>>()];
                all.extend(v);
                all
            }
        };
        let mut cc = Critic::new(
            &dec,
            b,
            s,
            &Device::Cpu,
            head.clone(),
            &OptSettings::constant(1e-3),
        )
        .unwrap();
        let mut cg = Critic::new(
            &dec,
            b,
            s,
            &cuda,
            head.clone(),
            &OptSettings::constant(1e-3),
        )
        .unwrap();
        let x = cc.update(&seqs, &inputs).unwrap();
        let y = cg.update(&seqs, &inputs).unwrap();
        let (gx, gy) = (cc.grads().unwrap(), cg.grads().unwrap());
        close(&format!("{head:?} loss"), y.loss, x.loss, 5e-2);
        for ((n1, v1), (_, v2)) in x.terms.iter().zip(&y.terms) {
            close(n1, *v2, *v1, 8e-2);
        }
        close("critic grad norm", norm(&gy), norm(&gx), 1.5e-1);
    }
}

fn dec_clone(d: &Decoder) -> Decoder {
    Decoder::new(d.config.clone(), d.params().clone()).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_full_steps_of_every_algorithm_are_finite() {
    if dfpo::device::cuda_for_test("cuda_full_steps_of_every_algorithm_are_finite").is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dfpo-cuda-train-{}", std::process::id()));
    arith::write_random_model(&dir, 3).unwrap();
    for algo in ["dfpo", "ppo", "grpo", "quantile"] {
        let out = dir.join(format!("run-{algo}"));
        let sets: Vec<String> = vec![
            format!("algo.name={algo}"),
            format!("model.policy={}", dir.display()),
            format!("run.out_dir={}", out.display()),
            "run.device=cuda".into(),
            "run.steps=2".into(),
            "run.progress=false".into(),
            "rollout.prompts_per_step=4".into(),
            "rollout.n_samples=2".into(),
            "data.eval_size=8".into(),
            "critic.k=8".into(),
            // Tails of 2 samples, so the tail-shape term is active (config validation).
            "critic.alpha=0.25".into(),
            "critic.beta=0.25".into(),
            "kl.coef=0.01".into(),
        ];
        let cfg = TrainConfig::load(None, &sets).unwrap();
        let mut t = Trainer::new(cfg).unwrap();
        for _ in 0..2 {
            let m = t.train_step().unwrap();
            for (k, v) in &m {
                assert!(v.is_finite(), "{algo}: {k} = {v}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The trainer's rollout on CUDA generates on the device (src/model/generate_cuda.rs) from the
/// policy graph's weights: its draws follow the CPU sampler's rule (the exponential race with the
/// same seed and counters) on the CPU's own logits of the rollout's tokens, except at near-ties
/// that bf16 arithmetic cannot settle.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_rollout_draws_follow_the_cpu_rule() {
    use dfpo::kernels::sample::cpu as scpu;
    if dfpo::device::cuda_for_test("cuda_rollout_draws_follow_the_cpu_rule").is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dfpo-cuda-rollout-{}", std::process::id()));
    arith::write_random_model(&dir, 5).unwrap();
    let sets: Vec<String> = vec![
        format!("model.policy={}", dir.display()),
        format!("run.out_dir={}", dir.join("run").display()),
        "run.device=cuda".into(),
        "run.progress=false".into(),
        "rollout.prompts_per_step=4".into(),
        "rollout.n_samples=4".into(),
        "data.eval_size=8".into(),
    ];
    let cfg = TrainConfig::load(None, &sets).unwrap();
    let t = Trainer::new(cfg).unwrap();
    let step = 0;
    let b = t.rollout(step).unwrap();
    let seed = dfpo::train::rollout::Stream::new(t.cfg.run.seed, step, "rollout").next_u64();
    let rc = &t.cfg.rollout;
    let sp = dfpo::kernels::sample::SampleParams {
        temperature: rc.temperature,
        top_k: rc.top_k as u32,
        top_p: rc.top_p,
    };
    let dec = &t.policy.dec;
    let v = dec.config.vocab_size;
    let rows = b.rows() as u64;
    let (mut exact, mut all) = (0usize, 0usize);
    for r in 0..b.rows() {
        let seq = &b.seqs[r];
        let mut g = dec.build_with_logits(1, seq.len(), &Device::Cpu).unwrap();
        g.set_batch(std::slice::from_ref(seq)).unwrap();
        g.forward().unwrap();
        let z = g.logits().unwrap();
        for j in 0..b.response_len[r] {
            let at = b.prompt_len[r] - 1 + j;
            let row = &z[at * v..(at + 1) * v];
            let tok = seq[at + 1];
            let tol = 3e-2 * row.iter().fold(0.0f64, |m, &x| m.max(x.abs() as f64)) + 1e-4;
            let (zmax, _) = scpu::row_max(row).unwrap();
            let order = scpu::rank_order(row);
            let len = scpu::kept_len(row, &order, zmax, &sp);
            let counter = j as u64 * rows;
            let te = sp.temperature as f64;
            let (want, best) = scpu::race(row, &order[..len], zmax, te, seed, counter, r);
            all += 1;
            if tok == want {
                exact += 1;
                continue;
            }
            let u = dfpo::kernels::uniform_open(
                seed,
                dfpo::kernels::sample::element_counter(counter, r, v, tok as usize),
            );
            let sc = scpu::race_score(row[tok as usize] as f64, zmax, te, u);
            assert!(
                sc >= best - 4.0 * tol / te,
                "row {r} token {j}: the device drew {tok} (race score {sc}), the CPU rule {want} \
                 ({best}): not a near-tie"
            );
        }
    }
    eprintln!("CUDA rollout: {exact} of {all} draws equal the CPU rule's exactly");
    assert!(all > 0 && exact * 10 >= all * 8, "{exact} of {all}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `dfpo-train eval` and the trainer's evals generate on the device on CUDA: the device
/// generators' decode steps grow, and the result covers every example.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_eval_generates_on_the_device() {
    if dfpo::device::cuda_for_test("cuda_eval_generates_on_the_device").is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dfpo-cuda-eval-{}", std::process::id()));
    arith::write_random_model(&dir, 6).unwrap();
    let sets: Vec<String> = vec![
        format!("model.policy={}", dir.display()),
        format!("run.out_dir={}", dir.join("run").display()),
        "run.device=cuda".into(),
        "run.progress=false".into(),
        "rollout.prompts_per_step=2".into(),
        "rollout.n_samples=2".into(),
        "data.eval_size=6".into(),
        "data.max_unparsed=1".into(),
    ];
    let cfg = TrainConfig::load(None, &sets).unwrap();
    let t = Trainer::new(cfg).unwrap();
    let before = t.generation_traffic().expect("CUDA trainer");
    let res = t.evaluate().unwrap();
    let after = t.generation_traffic().unwrap();
    assert!(!res.is_empty());
    for r in &res {
        assert_eq!(r.n, 6, "{}", r.name);
        assert!(
            (0.0..=1.0).contains(&r.accuracy),
            "{}: {}",
            r.name,
            r.accuracy
        );
    }
    let steps = |x: &dfpo::model::generate_cuda::Traffic| x.graph_launches + x.direct_steps;
    assert!(
        steps(&after) > steps(&before) && after.d2h_bytes > before.d2h_bytes,
        "the evals did not generate on the device: {before:?} -> {after:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `got` within `tol`·max(1, max|want|) of `want` everywhere, and exactly 0 wherever `want` is
/// exactly 0 (off the response: both backends leave those untouched).
fn close_vec(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f64, |m, &w| m.max(w.abs() as f64));
    let mut worst = (0usize, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}[{i}] = {g} (CPU {w})");
        if w == 0.0 && g != 0.0 && want.iter().filter(|&&v| v != 0.0).count() * 2 < want.len() {
            // Mostly-zero tensors (per-token fields): a value where the CPU has none.
            let d = (g as f64).abs();
            if d > worst.1 {
                worst = (i, d);
            }
        }
        let d = (g as f64 - w as f64).abs();
        if d > worst.1 {
            worst = (i, d);
        }
    }
    assert!(
        worst.1 <= tol * scale,
        "{what}: element {} CUDA {} vs CPU {} (|diff| {:.3e} > {tol}·{scale:.3})",
        worst.0,
        got[worst.0],
        want[worst.0],
        worst.1
    );
}

/// The prepare phase (log-probs, reference KL, token rewards, critic readout and flow solves,
/// GAE, whitening, GRPO advantages, the flow critic's targets and the prompt pooling) and one
/// minibatch update of a CUDA trainer, whose step data stays on the device, against a CPU
/// trainer on the same weights and rollout batch: every tensor within bf16 tolerance, the
/// random draws of the targets identical, the update's losses close.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_step_on_device_buffers_matches_the_cpu_step() {
    let Some(_) = dfpo::device::cuda_for_test("cuda_step_on_device_buffers_matches_the_cpu_step")
    else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("dfpo-cuda-parity-{}", std::process::id()));
    arith::write_random_model(&dir, 7).unwrap();
    for algo in ["dfpo", "ppo", "grpo", "quantile"] {
        let cfg = |device: &str| {
            let sets: Vec<String> = vec![
                format!("algo.name={algo}"),
                format!("model.policy={}", dir.display()),
                format!(
                    "run.out_dir={}",
                    dir.join(format!("run-{algo}-{device}")).display()
                ),
                format!("run.device={device}"),
                "run.progress=false".into(),
                "rollout.prompts_per_step=4".into(),
                "rollout.n_samples=2".into(),
                "data.eval_size=8".into(),
                "critic.k=8".into(),
                "critic.alpha=0.25".into(),
                "critic.beta=0.25".into(),
                "kl.coef=0.05".into(),
            ];
            TrainConfig::load(None, &sets).unwrap()
        };
        let mut tc = Trainer::new(cfg("cpu")).unwrap();
        let mut tg = Trainer::new(cfg("cuda")).unwrap();
        let batch = tc.rollout(0).unwrap();
        let pc = tc.prepare_batch(batch.clone()).unwrap();
        let pg = tg.prepare_batch(batch.clone()).unwrap();
        let ops = tg.step_ops().clone();
        let dl = |b: &dfpo::train::step_ops::StepBuf| {
            assert!(
                b.host().is_err(),
                "{algo}: the CUDA trainer's step data is on the host"
            );
            ops.read(b).unwrap()
        };
        let h = |b: &dfpo::train::step_ops::StepBuf| b.host().unwrap().to_vec();
        close_vec(&format!("{algo} mask"), &dl(&pg.mask_buf), &pc.mask, 0.0);
        close_vec(
            &format!("{algo} old_lp"),
            &dl(&pg.old_lp),
            &h(&pc.old_lp),
            5e-2,
        );
        if let (Some(a), Some(b)) = (&pg.kl, &pc.kl) {
            close_vec(&format!("{algo} kl"), &dl(a), &h(b), 5e-2);
        }
        close_vec(
            &format!("{algo} values"),
            &dl(&pg.values),
            &h(&pc.values),
            5e-2,
        );
        close_vec(&format!("{algo} ret"), &dl(&pg.ret), &h(&pc.ret), 5e-2);
        close_vec(&format!("{algo} adv"), &dl(&pg.adv), &h(&pc.adv), 1e-1);
        let names = [
            "z_read", "tau_read", "z_b", "tau_b", "z_d", "tau_d", "eps", "target", "vel_b",
            "vel_d", "w_unc", "dmask",
        ];
        match (&pg.targets, &pc.targets) {
            (Some(tg_), Some(tc_)) => {
                for ((name, a), b) in names.iter().zip(tg_).zip(tc_) {
                    // The draws (τ) and the readout levels are the same numbers.
                    let tol = match *name {
                        "tau_read" | "tau_b" | "tau_d" | "eps" | "z_read" | "dmask" => 1e-6,
                        _ => 5e-2,
                    };
                    close_vec(&format!("{algo} target field {name}"), &dl(a), &h(b), tol);
                }
            }
            (None, None) => {}
            _ => panic!("{algo}: targets on one backend only"),
        }
        for (k, v) in &pc.metrics {
            close(&format!("{algo} {k}"), pg.metrics[k], *v, 5e-2);
        }
        close(
            &format!("{algo} entropy"),
            pg.entropy_sum,
            pc.entropy_sum,
            5e-2,
        );
        // One minibatch update on each: the losses of the same inputs.
        let sel: Vec<usize> = (0..batch.rows() / 2).collect();
        let (mut ac, mut ag) = (Default::default(), Default::default());
        tc.update_minibatch(&pc, &sel, &mut ac).unwrap();
        tg.update_minibatch(&pg, &sel, &mut ag).unwrap();
        let ac: std::collections::BTreeMap<String, (f64, f64)> = ac;
        for (k, (v, _)) in &ac {
            if k.ends_with("grad_norm") || k.ends_with("lr") {
                continue;
            }
            close(&format!("{algo} update {k}"), ag[k].0, *v, 1e-1);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
