//! The DFPO training step on the CPU: the actor and critic losses against independent
//! computations, one full step of every algorithm, resume exactness, the HF export, and the
//! trainer's error paths.

use std::path::{Path, PathBuf};

use dfpo::device::Device;
use dfpo::kernels::flow::{self, FlowHeadShape, IntegrateOpts, Solver};
use dfpo::kernels::risk::{RiskLossWeights, TailLevels};
use dfpo::kernels::rl::{self, PpoParams};
use dfpo::model::decoder::{Decoder, HeadOut};
use dfpo::train::config::TrainConfig;
use dfpo::train::heads::{FlowTermWeights, RiskTerms};
use dfpo::train::models::{Critic, CriticHead, OptSettings};
use dfpo::train::trainer::Trainer;

mod common;
use common::Rng;

fn tiny_model() -> PathBuf {
    common::tiny_model("dfpo-train-step", 11)
}

fn out_dir(tag: &str) -> PathBuf {
    common::out_dir("dfpo-train-step", tag)
}

/// A small, fast configuration on the tiny model.
fn small_cfg(algo: &str, out: &Path, steps: usize) -> TrainConfig {
    let sets: Vec<String> = [
        format!("algo.name=\"{algo}\""),
        format!("model.policy=\"{}\"", tiny_model().display()),
        format!("run.out_dir=\"{}\"", out.display()),
        format!("run.steps={steps}"),
        "run.device=\"cpu\"".into(),
        "run.progress=false".into(),
        "run.save_every=2".into(),
        "rollout.prompts_per_step=4".into(),
        "rollout.n_samples=2".into(),
        "rollout.max_new_tokens=5".into(),
        "data.eval_size=8".into(),
        // A random model's answers are unreadable (data honesty checks: tests/data_honesty.rs).
        "data.max_unparsed=1".into(),
        "critic.k=8".into(),
        // Tails of 2 samples, so the tail-shape term is active (config validation).
        "critic.alpha=0.25".into(),
        "critic.beta=0.25".into(),
        "critic.head_width=32".into(),
        "ppo.epochs=2".into(),
        "ppo.minibatches=2".into(),
        "kl.coef=0.01".into(),
        // A high rate, so a few steps move the weights visibly.
        "optim.actor_lr=0.01".into(),
    ]
    .to_vec();
    TrainConfig::load(None, &sets).unwrap()
}

#[test]
fn actor_loss_matches_an_independent_ppo_computation() {
    let mut rng = Rng::fresh("actor_loss_matches");
    let out = out_dir("actor");
    let mut cfg = small_cfg("grpo", &out, 1);
    cfg.ppo.clip_high = 0.28;
    cfg.kl.coef = 0.0; // the PPO surrogate alone (grpo's KL would be a term of this loss)
    let mut t = Trainer::new(cfg).unwrap();
    let batch = t.rollout(0).unwrap();
    let mask = batch.mask();
    let s = batch.s;
    let rows = 4; // one minibatch
    let seqs = &batch.seqs[..rows];
    let skip = &batch.prompt_len[..rows];
    let m = &mask[..rows * s];
    let (lp, _) = t.policy.logprobs(seqs, skip).unwrap();
    // Old log-probs perturbed so that ratios differ from 1 (some clipped).
    let old: Vec<f32> = lp
        .iter()
        .map(|&l| l + (rng.range(-1.0, 1.0) as f32))
        .collect();
    let adv: Vec<f32> = (0..rows * s).map(|_| rng.normal() as f32).collect();
    let tw = dfpo::train::rollout::token_weights(m, s, false);
    let st = t.policy.update(seqs, skip, &old, &adv, &tw, None).unwrap();

    // Independently: the plain decoder graph's log-probs and the rl kernel's PPO loss.
    let dec = Decoder::load(tiny_model()).unwrap();
    let mut g = dec.build(rows, s, &Device::Cpu).unwrap();
    g.set_batch_masked(seqs, skip).unwrap();
    g.forward().unwrap();
    let lp2 = g.token_logprobs().unwrap();
    let mut loss_tok = vec![0.0f32; rows * s];
    let mut grad = vec![0.0f32; rows * s];
    let want = rl::cpu::ppo_policy_loss(
        &lp2,
        &old,
        &adv,
        m,
        PpoParams {
            clip_low: 0.2,
            clip_high: 0.28,
        },
        &mut loss_tok,
        &mut grad,
    )
    .unwrap();
    assert!(
        (st.pg_loss - want.loss as f64).abs() < 1e-5,
        "pg_loss {} vs independent {}",
        st.pg_loss,
        want.loss
    );
    assert!((st.clipfrac - want.clipfrac as f64).abs() < 1e-6);
    assert!((st.ppo_kl - want.approx_kl as f64).abs() < 1e-5);
    assert!(
        want.clipfrac > 0.0,
        "the perturbation should clip some tokens"
    );
}

/// Hidden states of the trunk (final norm), read through a trivial head.
fn hidden_states(dec: &Decoder, seqs: &[Vec<u32>], s: usize) -> Vec<f32> {
    let mut ids = None;
    let mut g = dec
        .build_with(seqs.len(), s, &Device::Cpu, false, |g, t| {
            let zero = g.input("zero", t.n * t.hidden_size);
            let l = g.node(dfpo::graph::ops::MseLoss, &[t.hidden, zero], &[("l", 1)])?[0];
            ids = Some(t.hidden);
            Ok(HeadOut {
                loss: l,
                keep: vec![t.hidden],
                params: vec![],
            })
        })
        .unwrap();
    g.set_batch(seqs).unwrap();
    g.forward().unwrap();
    g.read(ids.unwrap()).unwrap()
}

/// Tail statistics of one row, written out plainly: (CVaR_α, top-β mean, var low, var high).
fn tails(row: &[f64], klo: usize, khi: usize) -> (f64, f64, f64, f64) {
    let mut v = row.to_vec();
    v.sort_by(f64::total_cmp);
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let var = |x: &[f64]| {
        let m = mean(x);
        x.iter().map(|y| (y - m).powi(2)).sum::<f64>() / x.len() as f64
    };
    let lo = &v[..klo];
    let hi = &v[v.len() - khi..];
    (mean(lo), mean(hi), var(lo), var(hi))
}

#[test]
fn flow_critic_loss_matches_an_independent_computation() {
    let mut rng = Rng::fresh("flow_critic_loss_matches");
    let dec = Decoder::load(tiny_model()).unwrap();
    let (b, s, k) = (3, 9, 8);
    let shape = FlowHeadShape::new(dec.config.hidden_size, 32, 2).unwrap();
    let (alpha, beta) = (0.25f32, 0.25f32);
    let w = FlowTermWeights {
        dcfm: 0.7,
        bcfm: 1.3,
        gc: 0.4,
    };
    let rw = RiskLossWeights {
        cvar: 1.0,
        gain: 0.6,
        shape: 0.8,
        mean_shift: 0.0,
    };
    let (b, s) = (b, s);
    let cap = b * s + 3; // more capacity than tokens: the spare rows are −1
                         // The consistency target: the current head's own 4-step midpoint solve.
    let gc_solve = IntegrateOpts {
        steps: 4,
        solver: Solver::Midpoint,
        clip: None,
        jacobian: false,
    };
    let head = CriticHead::Flow {
        k,
        max_tokens: cap,
        shape,
        weights: w,
        risk: RiskTerms {
            levels: TailLevels { alpha, beta },
            weights: rw,
        },
        init_seed: rng.next_u64(),
        gc_solve,
    };
    let mut critic =
        Critic::new(&dec, b, s, &Device::Cpu, head, &OptSettings::constant(1e-3)).unwrap();
    let seqs: Vec<Vec<u32>> = (0..b)
        .map(|i| {
            (0..s - i)
                .map(|_| (rng.next_u64() % 12) as u32 + 3)
                .collect()
        })
        .collect();
    let n = b * s;
    let nk = n * k;
    let mut u = |lo: f64, hi: f64, len: usize| -> Vec<f32> {
        (0..len).map(|_| rng.range(lo, hi) as f32).collect()
    };
    let mut inputs = vec![
        u(-2.0, 2.0, nk), // z_read
        vec![0.0; nk],    // tau_read
        u(-1.0, 1.0, nk), // z_b
        u(0.0, 1.0, nk),  // tau_b
        u(-1.0, 1.0, nk), // z_d
        u(0.0, 1.0, nk),  // tau_d
        vec![0.0; nk],    // eps (= z_read below)
        u(-0.5, 1.5, nk), // target
        u(-1.0, 1.0, nk), // vel_b
        u(-1.0, 1.0, nk), // vel_d
        u(0.5, 1.0, n),   // w_unc
        (0..n).map(|i| (i % 4 != 0) as u8 as f32).collect(),
    ];
    inputs[6] = inputs[0].clone();
    let mask: Vec<f32> = (0..n).map(|i| (i % 5 != 2) as u8 as f32).collect();
    let tw = dfpo::train::rollout::token_weights(&mask, s, false);
    inputs.push(tw.clone());
    // The risk terms weigh every other token (as with critic.risk_targets = "prompt").
    let risk_w: Vec<f32> = (0..n)
        .map(|i| if i % 2 == 0 { tw[i] } else { 0.0 })
        .collect();
    inputs.push(risk_w.clone());
    // The head sees only the listed tokens (those with a weight), in a shuffled order.
    let mut rows: Vec<usize> = (0..n).filter(|&i| tw[i] != 0.0).collect();
    for i in (1..rows.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        rows.swap(i, j);
    }
    let mut gathered: Vec<Vec<f32>> = vec![rows.iter().map(|&r| r as f32).collect()];
    gathered[0].resize(cap, -1.0);
    for (i, full) in inputs.iter().enumerate() {
        let w = if i < 10 { k } else { 1 };
        gathered.push(
            rows.iter()
                .flat_map(|&r| full[r * w..(r + 1) * w].to_vec())
                .collect(),
        );
    }
    let st = critic.update(&seqs, &gathered).unwrap();
    let grads = critic.grads().unwrap();

    // Independently: hidden → u → the three evaluations → the loss, term by term, in f64.
    let params = critic.flow_params().unwrap();
    let h = hidden_states(&dec, &seqs, s);
    let mut cu = vec![0.0f64; n * shape.width];
    let p64: Vec<f64> = params.iter().map(|&x| x as f64).collect();
    let h64: Vec<f64> = h.iter().map(|&x| x as f64).collect();
    flow::cpu::cond_forward(&shape, &p64, &h64, &mut cu).unwrap();
    let eval = |z: &[f32], tau: &[f32]| -> Vec<f64> {
        let z: Vec<f64> = z.iter().map(|&x| x as f64).collect();
        let tau: Vec<f64> = tau.iter().map(|&x| x as f64).collect();
        let mut v = vec![0.0f64; nk];
        flow::cpu::eval_forward(&shape, &p64, &cu, k, &z, &tau, &mut v).unwrap();
        v
    };
    let vr = eval(&inputs[0], &inputs[1]);
    let vb = eval(&inputs[2], &inputs[3]);
    let vd = eval(&inputs[4], &inputs[5]);
    // The consistency target, solved here from the readout levels with the same parameters.
    let mut gct = vec![0.0f64; nk];
    let zr: Vec<f64> = inputs[0].iter().map(|&x| x as f64).collect();
    let iv = flow::Interval::Uniform(0.0, 1.0);
    flow::cpu::integrate(&shape, &p64, &cu, k, &zr, iv, &gc_solve, &mut gct, None).unwrap();
    let klo = ((alpha * k as f32) as usize).max(1);
    let khi = ((beta * k as f32) as usize).max(1);
    let (mut want, mut dcfm) = (0.0f64, 0.0f64);
    for t in 0..n {
        let wt = tw[t] as f64;
        if wt == 0.0 {
            continue;
        }
        let (mut sd, mut sb, mut sc) = (0.0, 0.0, 0.0);
        let mut z1 = vec![0.0f64; k];
        let mut g = vec![0.0f64; k];
        for j in 0..k {
            let r = t * k + j;
            sd += (vd[r] - inputs[9][r] as f64).powi(2);
            sb += (vb[r] - inputs[8][r] as f64).powi(2);
            z1[j] = inputs[6][r] as f64 + vr[r];
            g[j] = inputs[7][r] as f64;
            sc += (z1[j] - gct[r]).powi(2);
        }
        let wu = inputs[10][t] as f64;
        let dm = inputs[11][t] as f64;
        dcfm += wt * wu * dm * sd / k as f64;
        want += wt
            * (w.dcfm as f64 * wu * dm * sd / k as f64
                + w.bcfm as f64 * wu * sb / k as f64
                + w.gc as f64 * sc / k as f64);
        let (pc, pg, pvl, pvh) = tails(&z1, klo, khi);
        let (tc, tg, tvl, tvh) = tails(&g, klo, khi);
        want += risk_w[t] as f64
            * (rw.cvar as f64 * (pc - tc).powi(2)
                + rw.gain as f64 * (pg - tg).powi(2)
                + rw.shape as f64 * ((pvl - tvl).max(0.0) + (tvh - pvh).max(0.0)));
    }
    assert!(
        (st.loss - want).abs() < 1e-4 * (1.0 + want.abs()),
        "flow critic loss {} vs independent {want}",
        st.loss
    );
    let got_dcfm = st.terms.iter().find(|(n, _)| *n == "dcfm").unwrap().1;
    assert!((got_dcfm - dcfm).abs() < 1e-4 * (1.0 + dcfm));
    // Every parameter got a finite gradient, the flow head's and the trunk's non-zero.
    let names = critic.opt.names().to_vec();
    for (name, g) in names.iter().zip(&grads) {
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{name}: non-finite gradient"
        );
    }
    let norm = |name: &str| {
        let i = names.iter().position(|n| n == name).unwrap();
        grads[i].iter().map(|&v| (v as f64).powi(2)).sum::<f64>()
    };
    assert!(norm("flow_head.params") > 0.0);
    assert!(norm("model.layers.0.mlp.down_proj.weight") > 0.0);
}

#[test]
fn value_and_quantile_losses_match_independent_computations() {
    let mut rng = Rng::fresh("value_and_quantile_losses");
    let dec = Decoder::load(tiny_model()).unwrap();
    let (b, s) = (2, 7);
    let n = b * s;
    let seqs: Vec<Vec<u32>> = (0..b)
        .map(|_| (0..s).map(|_| (rng.next_u64() % 12) as u32 + 3).collect())
        .collect();
    let mask: Vec<f32> = (0..n).map(|i| (i % 3 != 0) as u8 as f32).collect();
    let tw = dfpo::train::rollout::token_weights(&mask, s, false);
    // Value head: initialised to zero, so v = 0 everywhere.
    let mut c = Critic::new(
        &dec,
        b,
        s,
        &Device::Cpu,
        CriticHead::Value { clip: 0.2 },
        &OptSettings::constant(1e-3),
    )
    .unwrap();
    let ret: Vec<f32> = (0..n).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    let old: Vec<f32> = (0..n).map(|_| rng.range(-0.5, 0.5) as f32).collect();
    let st = c
        .update(&seqs, &[ret.clone(), old.clone(), tw.clone()])
        .unwrap();
    let mut want = 0.0f64;
    for t in 0..n {
        let v = 0.0f64;
        let (r, o) = (ret[t] as f64, old[t] as f64);
        let vc = o + (v - o).clamp(-0.2, 0.2);
        want += tw[t] as f64 * 0.5 * ((v - r).powi(2)).max((vc - r).powi(2));
    }
    assert!(
        (st.loss - want).abs() < 1e-5,
        "value loss {} vs {want}",
        st.loss
    );

    // Quantile head: zero-initialised, q = 0; quantile-Huber against the targets only.
    let k = 4;
    let head = CriticHead::Quantile {
        k,
        kappa: 1.0,
        sum_quantiles: true,
        risk: RiskTerms::off(),
    };
    let mut c = Critic::new(&dec, b, s, &Device::Cpu, head, &OptSettings::constant(1e-3)).unwrap();
    let g: Vec<f32> = (0..n * k).map(|_| rng.range(-2.0, 2.0) as f32).collect();
    let st = c.update(&seqs, &[g.clone(), tw.clone()]).unwrap();
    let mut want = 0.0f64;
    for t in 0..n {
        for i in 0..k {
            let tau = (i as f64 + 0.5) / k as f64;
            for j in 0..k {
                let u = g[t * k + j] as f64; // q = 0
                let h = if u.abs() <= 1.0 {
                    0.5 * u * u
                } else {
                    u.abs() - 0.5
                };
                let wt = (tau - if u < 0.0 { 1.0 } else { 0.0 }).abs();
                // QR-DQN: sum over the quantiles i, mean over the targets j.
                want += tw[t] as f64 * wt * h / k as f64;
            }
        }
    }
    assert!(
        (st.loss - want).abs() < 1e-5,
        "quantile loss {} vs {want}",
        st.loss
    );
}

#[test]
fn every_algorithm_runs_a_step_and_moves_its_weights() {
    for algo in ["dfpo", "ppo", "grpo", "quantile"] {
        let out = out_dir(&format!("algo-{algo}"));
        let mut t = Trainer::new(small_cfg(algo, &out, 2)).unwrap();
        let before = t.policy.opt.params_host().unwrap();
        let cbefore = t.critic.as_ref().map(|c| c.opt.params_host().unwrap());
        let m = t.train_step().unwrap();
        for (k, v) in &m {
            assert!(v.is_finite(), "{algo}: metric {k} = {v}");
        }
        for key in [
            "actor/pg_loss",
            "reward/noisy_mean",
            "reward/clean_mean",
            "timing/step_s",
        ] {
            assert!(m.contains_key(key), "{algo}: no {key}");
        }
        assert_ne!(
            before,
            t.policy.opt.params_host().unwrap(),
            "{algo}: the policy did not move"
        );
        if let Some(cb) = cbefore {
            assert!(m.contains_key("critic/loss") && m.contains_key("critic/value_mean"));
            assert_ne!(
                cb,
                t.critic.as_ref().unwrap().opt.params_host().unwrap(),
                "{algo}: critic did not move"
            );
        }
        if algo == "dfpo" {
            for key in [
                "critic/dcfm",
                "critic/bcfm",
                "critic/gc",
                "critic/cvar_loss",
                "critic/gain_loss",
                "critic/shape_loss",
                "critic/cvar",
            ] {
                assert!(m.contains_key(key), "dfpo: no {key}");
            }
        }
        let _ = std::fs::remove_dir_all(out);
    }
}

fn strip_timing(line: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    let o = v.as_object_mut().unwrap();
    o.retain(|k, _| !k.starts_with("timing/") && !k.starts_with("perf/"));
    v
}

#[test]
fn a_resumed_run_reproduces_the_uninterrupted_run_exactly() {
    let a = out_dir("resume-a");
    let b = out_dir("resume-b");
    let sa = Trainer::new(small_cfg("dfpo", &a, 4))
        .unwrap()
        .run()
        .unwrap();
    let mut t = Trainer::new(small_cfg("dfpo", &b, 4)).unwrap();
    t.interrupt_after = Some(2);
    let err = t.run().unwrap_err();
    assert!(err.to_string().contains("interrupted"), "{err}");
    drop(t);
    let mut cfg = small_cfg("dfpo", &b, 4);
    cfg.run.resume = "true".into();
    let mut t = Trainer::new(cfg).unwrap();
    let sb = t.run().unwrap();
    let la: Vec<String> = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let lb: Vec<String> = std::fs::read_to_string(b.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(la.len(), 4);
    assert_eq!(
        lb.len(),
        4,
        "the resumed run must not duplicate or lose steps"
    );
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(strip_timing(x), strip_timing(y));
    }
    assert_eq!(sa.after, sb.after);
    assert_eq!(sa.before, sb.before);
    // Bit-identical exported weights.
    let wa = std::fs::read(a.join("final/model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("final/model.safetensors")).unwrap();
    assert!(wa == wb, "exported weights differ");
    // keep_checkpoints = 2 (default): steps 2 and 4 remain.
    let ck = dfpo::train::trainer::list_checkpoints(&b.join("checkpoints")).unwrap();
    assert_eq!(ck.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 4]);
    let _ = std::fs::remove_dir_all(a);
    let _ = std::fs::remove_dir_all(b);
}

#[test]
fn the_export_loads_and_scores() {
    let out = out_dir("export");
    let mut t = Trainer::new(small_cfg("grpo", &out, 1)).unwrap();
    t.run().unwrap();
    let fin = out.join("final");
    let dec = Decoder::load(&fin).unwrap();
    for (name, tns) in dec.params() {
        assert_eq!(
            tns.data.as_slice(),
            t.policy.opt.param_host(name).unwrap(),
            "{name} differs from the master weights"
        );
    }
    assert!(fin.join("tokenizer.json").exists());
    let data = out.join("score.jsonl");
    std::fs::write(&data, "{\"prompt\":\"12+34=\",\"response\":\"46\"}\n").unwrap();
    let args = dfpo::model::score::ScoreArgs {
        model: fin.clone(),
        data: data.clone(),
        out: out.join("scored.jsonl"),
        batch: 4,
        device: "cpu".into(),
        ..Default::default()
    };
    dfpo::model::score::run(&args).unwrap();
    let scored = std::fs::read_to_string(out.join("scored.jsonl")).unwrap();
    assert!(scored.contains("logprobs"), "{scored}");
    let summary = std::fs::read_to_string(out.join("summary.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert!(v["after"]["in_domain"]["accuracy"].is_number());
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn a_non_finite_loss_stops_or_skips_and_keeps_the_last_checkpoint() {
    // Two healthy steps with a checkpoint, then a resume with a learning rate so large that the
    // weights blow up within a step: "stop" must end the run with an error naming the step and
    // the term, leaving the step-2 checkpoint exactly as it was.
    let out = out_dir("nonfinite-stop");
    let mut cfg = small_cfg("ppo", &out, 2);
    cfg.run.save_every = 1;
    Trainer::new(cfg.clone()).unwrap().run().unwrap();
    let ck = out.join("checkpoints/step-000002/state.safetensors");
    let saved = std::fs::read(&ck).unwrap();
    cfg.run.steps = 4;
    cfg.run.resume = "true".into();
    cfg.optim.actor_lr = 1e30;
    cfg.optim.max_grad_norm = 0.0;
    cfg.run.on_nonfinite = "stop".into();
    // Resuming with another learning rate is refused (it is another run); this test needs a
    // checkpoint whose continuation blows up, so it stamps the new fingerprint into it.
    let meta_path = out.join("checkpoints/step-000002/meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    meta["fingerprint"] =
        serde_json::to_value(dfpo::train::run_dir::Fingerprint::of(&cfg).unwrap()).unwrap();
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    let e = Trainer::new(cfg.clone())
        .unwrap()
        .run()
        .expect_err("a blown-up run must stop")
        .to_string();
    assert!(
        // Step 3 (as metrics.jsonl numbers it) is the first after the step-2 checkpoint.
        e.contains("step 3") && e.contains("actor") && e.contains("on_nonfinite"),
        "{e}"
    );
    assert!(
        std::fs::read(&ck).unwrap() == saved,
        "the last good checkpoint changed"
    );
    let _ = std::fs::remove_dir_all(&out);

    // "skip": the run goes on, every bad update is skipped and counted.
    let out = out_dir("nonfinite-skip");
    let mut cfg = small_cfg("ppo", &out, 3);
    cfg.optim.actor_lr = 1e30;
    cfg.optim.max_grad_norm = 0.0;
    cfg.run.on_nonfinite = "skip".into();
    Trainer::new(cfg).unwrap().run().unwrap();
    let metrics = dfpo::train::metrics::read_metrics(&out.join("metrics.jsonl")).unwrap();
    let skipped: f64 = metrics.iter().map(|m| m["update/skipped"]).sum();
    assert!(skipped > 0.0, "no update was skipped");
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn bad_model_folder_is_a_clear_error() {
    let out = out_dir("badmodel");
    let mut cfg = small_cfg("dfpo", &out, 1);
    cfg.model.policy = "/nonexistent/model/dir".into();
    let e = Trainer::new(cfg).err().expect("must fail").to_string();
    assert!(e.contains("/nonexistent/model/dir"), "{e}");
}

#[test]
fn policy_log_probs_are_those_of_the_tempered_sampler() {
    // PPO's old log-probs must be the behaviour policy's: at rollout temperature 0.7 the policy
    // graph's log-probs equal the sampler's (no top-k/top-p) for the sampled tokens.
    use dfpo::model::generate::{generate, GenerateParams};
    use dfpo::train::models::Policy;
    let dec = Decoder::load(tiny_model()).unwrap();
    let temp = 0.7;
    let prompts: Vec<Vec<u32>> = vec![vec![1, 6, 7, 14, 8, 9, 17], vec![1, 5, 14, 6, 17]];
    let gp = GenerateParams {
        max_new_tokens: 5,
        sample: dfpo::kernels::sample::SampleParams {
            temperature: temp,
            top_k: 0,
            top_p: 1.0,
        },
        stop_ids: vec![2],
        n_samples: 2,
        seed: 9,
    };
    let gens = generate(&dec, &prompts, &gp).unwrap();
    let s = 7 + 5;
    let mut p = Policy::new(
        Decoder::load(tiny_model()).unwrap(),
        gens.len(),
        s,
        &Device::Cpu,
        temp,
        0.2,
        0.2,
        0.0,
        None,
        &OptSettings::constant(1e-3),
    )
    .unwrap();
    let seqs: Vec<Vec<u32>> = gens
        .iter()
        .map(|g| {
            let mut q = prompts[g.prompt_index].clone();
            q.extend(&g.tokens);
            q
        })
        .collect();
    let skip: Vec<usize> = gens.iter().map(|g| prompts[g.prompt_index].len()).collect();
    let (lp, _) = p.logprobs(&seqs, &skip).unwrap();
    for (r, g) in gens.iter().enumerate() {
        for (j, &want) in g.logprobs.iter().enumerate() {
            let got = lp[r * s + skip[r] - 1 + j];
            assert!(
                (got - want).abs() < 1e-4,
                "row {r} token {j}: graph {got} vs sampler {want}"
            );
        }
    }
}

#[test]
fn prompt_pooled_risk_targets_replace_only_first_tokens() {
    use dfpo::train::rollout::{pool_first_token_targets, Batch};
    let (s, k) = (6, 2);
    let b = Batch {
        seqs: vec![vec![1; 5], vec![1; 6], vec![1; 4], vec![1; 5]],
        prompt_len: vec![3, 3, 2, 2],
        response_len: vec![2, 3, 2, 3],
        group: vec![0, 0, 1, 1],
        s,
        ..Default::default()
    };
    let mut t: Vec<f32> = (0..4 * s * k).map(|i| i as f32).collect();
    let orig = t.clone();
    pool_first_token_targets(&b, &mut t, k);
    // Group 0: first tokens at row 0 t=2 and row 1 t=2 → pooled {4, 5, 16, 17} → levels
    // 1/4 and 3/4 → nearest rank 1 and 3 → [5, 17] for both rows.
    assert_eq!(&t[2 * k..2 * k + 2], &[5.0, 17.0]);
    assert_eq!(&t[(s + 2) * k..(s + 2) * k + 2], &[5.0, 17.0]);
    // Group 1: rows 2 and 3, t = 1: {26, 27, 38, 39} → [27, 39].
    assert_eq!(&t[(2 * s + 1) * k..(2 * s + 1) * k + 2], &[27.0, 39.0]);
    // Everything else unchanged.
    let firsts = [2 * k, (s + 2) * k, (2 * s + 1) * k, (3 * s + 1) * k];
    for i in 0..t.len() {
        if !firsts.iter().any(|&f| (f..f + k).contains(&i)) {
            assert_eq!(t[i], orig[i], "element {i} changed");
        }
    }
}

#[test]
fn reference_log_probs_use_the_rollout_temperature() {
    // At step 0 the policy is the reference, so the per-token KL must vanish, also when the
    // rollouts are tempered (both log-probs at the sampling temperature).
    let out = out_dir("ref-temp");
    let mut cfg = small_cfg("grpo", &out, 1);
    cfg.rollout.temperature = 0.7;
    let mut t = Trainer::new(cfg).unwrap();
    let p = t.prepare().unwrap();
    let kl = p.kl.as_ref().expect("kl.coef > 0 runs the reference");
    let kl = kl.host().unwrap();
    assert!(p.ntok > 0.0);
    assert!(
        kl.iter().all(|&v| v.abs() < 1e-5),
        "max |kl| {:?}",
        kl.iter().map(|v| v.abs()).fold(0.0f32, f32::max)
    );
}

/// The adaptive KL controller (Ziegler et al., TRL) compares the KL per SEQUENCE (summed over
/// the response, then averaged over the batch) with its target (default 6, TRL's unit):
/// β ← β·(1 + clip(KL/target − 1, ±0.2)·rows/horizon). A per-token mean against that target
/// shrank β every step whatever the KL.
#[test]
fn adaptive_kl_controller_uses_the_per_sequence_kl() {
    let run = |target: f64, steps: usize| {
        let out = out_dir(&format!("adaptive-kl-{steps}"));
        // The same run length (so the same learning-rate schedule) whatever is taken of it.
        let mut cfg = small_cfg("ppo", &out, 3);
        cfg.kl.coef = 0.1;
        cfg.kl.adaptive = true;
        cfg.kl.horizon = 16.0; // big moves, so the rule is visible
        cfg.kl.target = target;
        let mut t = Trainer::new(cfg).unwrap();
        let ms: Vec<_> = (0..steps).map(|_| t.train_step().unwrap()).collect();
        let _ = std::fs::remove_dir_all(out);
        ms
    };
    // Step 0's KL is ~0 (the policy is the reference); step 1's is not, and does not depend on
    // the target (the controller only changes the β of later steps' rewards).
    let a = run(6.0, 2);
    let seq_kl = a[1]["actor/ref_kl"] * a[1]["response_length/mean"];
    assert!(seq_kl > 1e-6, "no KL at step 1");
    // Same run with the target just above step 1's per-sequence KL: β moves by −9%·rows/horizon.
    let target = 1.1 * seq_kl;
    let b = run(target, 3);
    assert_eq!(a[1]["actor/ref_kl"], b[1]["actor/ref_kl"]);
    let rows = 8.0; // prompts_per_step 4 x n_samples 2
    let err = (seq_kl / target - 1.0f64).clamp(-0.2, 0.2);
    let want = b[1]["actor/kl_coef"] * (1.0 + err * rows / 16.0);
    let got = b[2]["actor/kl_coef"];
    assert!(
        (got - want).abs() < 1e-9 * want,
        "β after step 1: {got}, want {want} (per-sequence KL {seq_kl}, target {target})"
    );
}

/// GRPO's KL goes into the actor loss (verl's use_kl_loss, k3 "low_var_kl"), since its
/// advantages come from the sequence rewards alone. With every reward equal (all advantages 0)
/// the KL term is the only gradient: the policy must move, and the KL to the reference on the
/// batch it trains on must fall.
#[test]
fn grpo_pulls_the_policy_toward_the_reference_through_a_kl_loss() {
    let out = out_dir("grpo-kl");
    let refdir = out_dir("grpo-kl-ref");
    dfpo::task::arith::write_random_model(&refdir, 12).unwrap();
    let mut cfg = small_cfg("grpo", &out, 3);
    cfg.model.reference = refdir.display().to_string();
    cfg.kl.coef = 0.5;
    cfg.reward.correct = 1.0;
    cfg.reward.incorrect = 1.0;
    cfg.reward.flip_prob = 0.0;
    cfg.optim.actor_lr = 1e-3;
    cfg.optim.schedule = "constant".into();
    cfg.optim.warmup_frac = 0.0;
    let mut t = Trainer::new(cfg).unwrap();
    let batch = t.rollout(0).unwrap();
    let mean_kl = |t: &mut Trainer| {
        let p = t.prepare_batch(batch.clone()).unwrap();
        let kl: f64 =
            p.kl.as_ref()
                .unwrap()
                .host()
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .sum();
        (kl / p.ntok, p)
    };
    let (kl0, p) = mean_kl(&mut t);
    assert!(
        kl0 > 0.01,
        "the reference should differ from the policy: KL {kl0}"
    );
    assert!(
        p.adv.host().unwrap().iter().all(|&a| a == 0.0),
        "equal rewards: zero advantages"
    );
    let before = t.policy.opt.params_host().unwrap();
    let rows: Vec<usize> = (0..batch.rows()).collect();
    let mut acc = std::collections::BTreeMap::new();
    t.update_minibatch(&p, &rows[..4], &mut acc).unwrap();
    assert!(
        before != t.policy.opt.params_host().unwrap(),
        "zero advantages and no KL loss: the policy did not move"
    );
    let kl_loss = acc["actor/kl_loss"].0;
    assert!(kl_loss > 0.0, "actor/kl_loss {kl_loss}");
    let mut kl = kl0;
    for _ in 0..5 {
        let (_, p) = mean_kl(&mut t);
        for half in rows.chunks(4) {
            t.update_minibatch(&p, half, &mut acc).unwrap();
        }
        kl = mean_kl(&mut t).0;
    }
    assert!(
        kl < 0.7 * kl0,
        "KL to the reference on the batch: {kl0} -> {kl}"
    );
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_dir_all(refdir);
}

/// GRPO's advantages: (R − group mean)/(group std + 1e-6) with the sample std (n − 1) by
/// default (torch.std in verl and TRL); population std and Dr. GRPO's no-division as options.
#[test]
fn grpo_advantages_use_the_configured_group_std() {
    let out = out_dir("grpo-std");
    for (std, first) in [
        ("unbiased", 0.75 / 0.5),                // var = (0.75² + 3·0.25²)/3 = 0.25
        ("population", 0.75 / 0.1875f64.sqrt()), // var = 0.75/4
        ("none", 0.75),
    ] {
        let mut cfg = small_cfg("grpo", &out, 1);
        cfg.ppo.grpo_std = std.into();
        let mut t = Trainer::new(cfg).unwrap();
        let mut batch = t.rollout(0).unwrap();
        // Groups of n_samples = 2 per prompt: make the first two groups one of 4 rows.
        for r in 0..4 {
            batch.group[r] = 0;
        }
        batch.noisy = vec![1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0];
        let p = t.prepare_batch(batch.clone()).unwrap();
        let s = batch.s;
        let adv = p.adv.host().unwrap();
        let at = |r: usize| adv[r * s + batch.prompt_len[r] - 1] as f64;
        let tol = 1e-5 * first;
        assert!((at(0) - first).abs() < tol, "{std}: {} vs {first}", at(0));
        assert!((at(1) + first / 3.0).abs() < tol, "{std}: {}", at(1));
        // A group with equal rewards: 0 (no division by a zero std).
        assert_eq!(at(4), 0.0);
    }
    let _ = std::fs::remove_dir_all(out);
}

/// AdamW's weight decay applies to the flow head's matrices, not to its LayerNorm gains and
/// shifts or its biases (the convention for named tensors, kept inside the head's one flat
/// parameter vector).
#[test]
fn flow_head_norms_and_biases_are_not_weight_decayed() {
    let dec = Decoder::load(tiny_model()).unwrap();
    let shape = FlowHeadShape::new(dec.config.hidden_size, 32, 2).unwrap();
    let head = CriticHead::Flow {
        k: 4,
        max_tokens: 8,
        shape,
        weights: FlowTermWeights {
            dcfm: 1.0,
            bcfm: 1.0,
            gc: 1.0,
        },
        risk: RiskTerms {
            levels: TailLevels::default(),
            weights: RiskLossWeights::default(),
        },
        init_seed: 5,
        gc_solve: IntegrateOpts {
            steps: 2,
            solver: Solver::Euler,
            clip: None,
            jacobian: false,
        },
    };
    let mut opt = OptSettings::constant(0.1);
    opt.hp.weight_decay = 0.5;
    let mut c = Critic::new(&dec, 2, 6, &Device::Cpu, head, &opt).unwrap();
    let before = c.flow_params().unwrap();
    let zeros: Vec<Vec<f32>> = c
        .opt
        .params_host()
        .unwrap()
        .iter()
        .map(|p| vec![0.0; p.len()])
        .collect();
    assert!(c.opt.step_host(&zeros).unwrap().applied);
    let after = c.flow_params().unwrap();
    let lay = shape.layout();
    // A zero gradient leaves Adam's step at 0: only the decay moves a weight, by lr·wd = 5%.
    let decayed = |r: std::ops::Range<usize>| {
        r.clone()
            .all(|i| (after[i] - 0.95 * before[i]).abs() <= 1e-6 * before[i].abs().max(1e-3))
    };
    let kept = |r: std::ops::Range<usize>| r.clone().all(|i| after[i] == before[i]);
    assert!(decayed(lay.w_cond.clone()) && decayed(lay.w_z.clone()) && decayed(lay.w_out.clone()));
    for l in &lay.layers {
        assert!(kept(l.gamma.clone()), "a LayerNorm gain was decayed");
        assert!(kept(l.beta.clone()), "a LayerNorm shift was decayed");
        if let (Some(w), Some(b)) = (l.w.clone(), l.b.clone()) {
            assert!(decayed(w) && kept(b));
        }
    }
    assert!(kept(lay.b_in.clone()) && kept(lay.b_out.clone()));
}

/// The flow critic's return clip is the reachable range: the rewards, ± 3σ of Gaussian reward
/// noise, ± β·T for a KL in the reward (not a whole reward of slack).
#[test]
fn the_return_clip_is_the_reachable_return_range() {
    let out = out_dir("clip-range");
    let mut cfg = small_cfg("dfpo", &out, 1);
    cfg.kl.coef = 0.01;
    cfg.reward.gaussian_sigma = 0.1;
    let t = Trainer::new(cfg.clone()).unwrap();
    let (lo, hi) = t.flow_solve().unwrap().clip.unwrap();
    // max_new_tokens 5: β·T = 0.05; 3σ = 0.3.
    assert!(
        (lo + 0.35).abs() < 1e-6 && (hi - 1.35).abs() < 1e-6,
        "({lo}, {hi})"
    );
    cfg.kl.coef = 0.0;
    cfg.reward.gaussian_sigma = 0.0;
    let t = Trainer::new(cfg).unwrap();
    assert_eq!(t.flow_solve().unwrap().clip, Some((0.0, 1.0)));
}

#[test]
fn export_writes_a_checkpoints_policy_and_critic_as_hf_folders() {
    use dfpo::model::checkpoint::read_safetensors;
    for (algo, head) in [("dfpo", "flow"), ("ppo", "value"), ("grpo", "")] {
        let out = out_dir(&format!("export-ck-{algo}"));
        let mut cfg = small_cfg(algo, &out, 2);
        cfg.run.save_every = 1;
        cfg.run.keep_checkpoints = 3;
        Trainer::new(cfg).unwrap().run().unwrap();
        // An intermediate checkpoint, not final/.
        let ck = out.join("checkpoints/step-000001");
        let dst = out_dir(&format!("export-out-{algo}"));
        let ex = dfpo::train::config::ExportConfig {
            checkpoint: ck.display().to_string(),
            out: dst.display().to_string(),
            overwrite: false,
        };
        let done = dfpo::train::export::run(&ex).unwrap();
        assert_eq!(done.step, 1);
        let state = read_safetensors(ck.join("state.safetensors")).unwrap();
        let policy = Decoder::load(dst.join("policy")).unwrap();
        for (name, t) in policy.params() {
            assert_eq!(
                t.data,
                state[&format!("policy.param.{name}")].data,
                "{algo}: policy {name}"
            );
        }
        assert!(dst.join("policy/tokenizer.json").is_file());
        if head.is_empty() {
            assert!(done.critic.is_none() && !dst.join("critic").exists());
        } else {
            let trunk = Decoder::load(dst.join("critic")).unwrap();
            for (name, t) in trunk.params() {
                assert_eq!(
                    t.data,
                    state[&format!("critic.param.{name}")].data,
                    "{name}"
                );
            }
            let desc: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dst.join("critic/value_head.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(desc["type"], head);
            let vh = read_safetensors(dst.join("critic/value_head.safetensors")).unwrap();
            let n: usize = vh.values().map(|t| t.data.len()).sum();
            let want: usize = state
                .iter()
                .filter(|(k, _)| {
                    k.starts_with("critic.param.")
                        && !k.contains("model.")
                        && !k.contains("lm_head")
                })
                .map(|(_, t)| t.data.len())
                .sum();
            assert_eq!(n, want, "{algo}: every head parameter, once");
            if head == "flow" {
                let flat = &state["critic.param.flow_head.params"].data;
                let order = desc["param_order"].as_array().unwrap();
                let joined: Vec<f32> = order
                    .iter()
                    .flat_map(|k| vh[k.as_str().unwrap()].data.clone())
                    .collect();
                assert_eq!(&joined, flat, "param_order reassembles the flat vector");
            }
        }
        // A checkpoint is not a model folder: the error points to export.
        let mut c = small_cfg(algo, &out_dir("ck-as-model"), 1);
        c.model.policy = ck.display().to_string();
        let e = Trainer::new(c).err().unwrap().to_string();
        assert!(e.contains("dfpo-train export --checkpoint"), "{e}");
        // A second export into the same folder needs overwrite.
        let e = dfpo::train::export::run(&ex).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        dfpo::train::export::run(&dfpo::train::config::ExportConfig {
            overwrite: true,
            ..ex
        })
        .unwrap();
        let _ = std::fs::remove_dir_all(out);
        let _ = std::fs::remove_dir_all(dst);
    }
}

/// `ppo.micro_batch_size`: accumulating the gradients of a minibatch's micro-batches gives the
/// one-pass update. The loss weights are normalised over the whole minibatch, so the losses,
/// the gradient norms (before clipping) and the weights after a step agree to float rounding; a
/// per-micro-batch normalisation would double every loss and gradient norm here.
#[test]
fn micro_batches_accumulate_to_the_one_pass_update() {
    for algo in ["dfpo", "ppo", "quantile", "grpo"] {
        let run = |micro: usize| {
            let out = out_dir(&format!("micro-{algo}-{micro}"));
            let _ = std::fs::remove_dir_all(&out);
            let mut cfg = small_cfg(algo, &out, 1);
            cfg.ppo.micro_batch_size = micro;
            // One update (of all 8 rollout rows): later updates would compare weights that
            // already differ by Adam-amplified rounding.
            cfg.ppo.epochs = 1;
            cfg.ppo.minibatches = 1;
            let mut t = Trainer::new(cfg).unwrap();
            let m = t.train_step().unwrap();
            let critic = t
                .critic
                .as_ref()
                .map(|c| c.opt.params_host().unwrap().concat())
                .unwrap_or_default();
            let _ = std::fs::remove_dir_all(&out);
            (m, t.policy.opt.params_host().unwrap().concat(), critic)
        };
        let (m1, p1, c1) = run(0);
        for micro in [1, 2] {
            let (m2, p2, c2) = run(micro);
            for (k, v) in &m1 {
                if k.starts_with("timing/") || k.starts_with("perf/") {
                    continue;
                }
                let w = m2[k];
                assert!(
                    (v - w).abs() <= 1e-4 * v.abs().max(1e-3),
                    "{algo}, micro-batch {micro}: {k} = {w}, one pass {v}"
                );
            }
            // Adam's normalised step turns rounding in a near-zero gradient into up to lr (0.01):
            // allow 1% of it.
            common::assert_close(&format!("{algo} policy"), &p2, &p1, 1e-4, 1e-4);
            common::assert_close(&format!("{algo} critic"), &c2, &c1, 1e-4, 1e-4);
        }
    }
}

#[test]
fn a_micro_batch_that_does_not_divide_the_minibatch_is_refused() {
    let out = out_dir("micro-bad");
    let mut sets = vec![format!("run.out_dir=\"{}\"", out.display())];
    sets.push("ppo.micro_batch_size=3".into());
    let e = TrainConfig::load(None, &sets).unwrap_err().to_string();
    assert!(
        e.contains("ppo.micro_batch_size") && e.contains("does not divide"),
        "{e}"
    );
}
