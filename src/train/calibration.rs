//! Critic calibration against a Monte-Carlo truth (`eval.critic_*`).
//!
//! On the built-in task the true return distribution at a state is computable: from a prefix
//! (a training prompt and the first j tokens of one response of the current policy, j uniform
//! over the response), M continuations of the current policy give M returns, scored by the
//! clean verifier and by the noisy training reward (`reward.*`, one draw per continuation).
//! The critic's prediction at that state (the value at the token before y_j, as in training)
//! is compared with both:
//! - `value_mse`: (mean of the prediction − mean of the truth)², averaged over prefixes;
//! - `crps`: the CRPS of the predicted distribution (its samples or quantiles with equal
//!   weights; a point mass for the PPO value) averaged over the truth samples and prefixes,
//!   with `crps_floor` = that of the truth itself (½·E|Y − Y′|: no prediction scores lower);
//! - `cvar_abs_err`: |CVaR_α(prediction) − CVaR_α(truth)|, α = `critic.alpha`, each the exact
//!   lower-tail mean of its empirical distribution (fractional weight at the α boundary);
//! - `pit`: the histogram of the randomized PIT F(y−) + V·(F(y) − F(y−)), V ~ U(0, 1), over
//!   every truth sample y (uniform when the prediction is calibrated; mass at the ends: too
//!   narrow; in the middle: too wide), and `pit_l1` = Σ_b |freq_b − 1/B|.
//!
//! The KL part of the training return (−β·KL per token) is left out of the truth: at the
//! default β = 0.001 it is ~1e-3 of a reward.
//!
//! The flow critic is scored twice: its readout as trained (`critic.readout_steps`, 1) and the
//! same flow solved with `eval.critic_ode_steps` Euler steps.

use serde::Serialize;

use super::models::CriticHead;
use super::rollout::{flow_readout, Stream};
use super::trainer::Trainer;
use crate::error::{Error, Result};
use crate::kernels::sample::SampleParams;
use crate::model::generate::{generate, GenerateParams};
use crate::task::Verdict;

/// PIT histogram bins.
pub const PIT_BINS: usize = 10;

/// Scores of one critic against one truth (see the module documentation).
#[derive(Clone, Debug, Serialize)]
pub struct Scores {
    pub value_mse: f64,
    pub crps: f64,
    pub crps_floor: f64,
    pub cvar_abs_err: f64,
    pub pit: Vec<f64>,
    pub pit_l1: f64,
}

/// One critic's scores against the clean and the noisy truth.
#[derive(Clone, Debug, Serialize)]
pub struct CriticScores {
    pub name: String,
    /// Samples (or quantiles) per prediction; 1 for a scalar value.
    pub samples: usize,
    pub clean: Scores,
    pub noisy: Scores,
}

/// What `critic_calibration.json` holds.
#[derive(Clone, Debug, Serialize)]
pub struct Calibration {
    pub algo: String,
    pub step: u64,
    pub prefixes: usize,
    pub continuations: usize,
    pub alpha: f64,
    /// Mean over prefixes of the truth's std (clean, noisy).
    pub truth_std_clean: f64,
    pub truth_std_noisy: f64,
    pub critics: Vec<CriticScores>,
}

/// Σ_i Σ_j |x_i − x_j| of ascending `x`.
fn pair_abs_sum(x: &[f64]) -> f64 {
    let n = x.len() as f64;
    x.iter()
        .enumerate()
        .map(|(i, &v)| (2.0 * i as f64 - n + 1.0) * v)
        .sum::<f64>()
        * 2.0
}

/// CRPS of the empirical distribution of ascending `pred` at the observation `y`.
pub fn crps(pred: &[f64], y: f64) -> f64 {
    let n = pred.len() as f64;
    pred.iter().map(|x| (x - y).abs()).sum::<f64>() / n - pair_abs_sum(pred) / (2.0 * n * n)
}

/// CVaR_α (lower-tail mean) of the empirical distribution of ascending `x`: each sample has
/// mass 1/n, the one across the α boundary counts with its part below α.
pub fn cvar(x: &[f64], alpha: f64) -> f64 {
    let n = x.len() as f64;
    let mut acc = 0.0;
    for (i, &v) in x.iter().enumerate() {
        let lo = i as f64 / n;
        if lo >= alpha {
            break;
        }
        acc += v * (((i + 1) as f64 / n).min(alpha) - lo);
    }
    acc / alpha
}

/// Randomized PIT of `y` under the empirical CDF of ascending `pred`, with `v` ~ U(0, 1).
pub fn pit(pred: &[f64], y: f64, v: f64) -> f64 {
    let n = pred.len() as f64;
    let below = pred.partition_point(|&x| x < y) as f64;
    let at_or_below = pred.partition_point(|&x| x <= y) as f64;
    (below + v * (at_or_below - below)) / n
}

/// Scores predictions (`preds[i]` ascending) against truth samples (`truths[i]`), per prefix i.
pub fn score(preds: &[Vec<f64>], truths: &[Vec<f64>], alpha: f64, rng: &mut Stream) -> Scores {
    let np = preds.len().max(1) as f64;
    let (mut mse, mut cr, mut floor, mut cv) = (0.0, 0.0, 0.0, 0.0);
    let mut hist = [0.0f64; PIT_BINS];
    let mut count = 0.0f64;
    for (p, t) in preds.iter().zip(truths) {
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
        mse += (mean(p) - mean(t)).powi(2);
        let mut ts = t.clone();
        ts.sort_by(f64::total_cmp);
        cr += t.iter().map(|&y| crps(p, y)).sum::<f64>() / t.len() as f64;
        floor += pair_abs_sum(&ts) / (2.0 * (ts.len() * ts.len()) as f64);
        cv += (cvar(p, alpha) - cvar(&ts, alpha)).abs();
        for &y in t {
            let u = pit(p, y, rng.uniform());
            hist[((u * PIT_BINS as f64) as usize).min(PIT_BINS - 1)] += 1.0;
            count += 1.0;
        }
    }
    let pit: Vec<f64> = hist.iter().map(|h| h / count.max(1.0)).collect();
    let pit_l1 = pit.iter().map(|f| (f - 1.0 / PIT_BINS as f64).abs()).sum();
    Scores {
        value_mse: mse / np,
        crps: cr / np,
        crps_floor: floor / np,
        cvar_abs_err: cv / np,
        pit,
        pit_l1,
    }
}

/// The calibration of `t`'s critic with its current policy (None for a critic-less algorithm).
pub fn critic_calibration(t: &mut Trainer) -> Result<Option<Calibration>> {
    let e = t.cfg.eval.clone();
    let (np, m) = (e.critic_prefixes, e.critic_continuations);
    if t.critic.is_none() || np == 0 {
        return Ok(None);
    }
    let rc = t.cfg.rollout.clone();
    let seed = t.cfg.run.seed;
    let mut rng = Stream::new(seed, t.step, "critic-calibration");
    let sample = SampleParams {
        temperature: rc.temperature,
        top_k: rc.top_k as u32,
        top_p: rc.top_p,
    };
    let params = |max_new: usize, n: usize, rng: &mut Stream| GenerateParams {
        max_new_tokens: max_new,
        sample,
        stop_ids: t.stop.clone(),
        n_samples: n,
        seed: rng.next_u64(),
    };
    // Prefixes: a training prompt, one response of the current policy, a cut j in it.
    let n_train = t.train_ids.len();
    let idx: Vec<usize> = (0..np)
        .map(|_| ((rng.uniform() * n_train as f64) as usize).min(n_train - 1))
        .collect();
    let prompts: Vec<Vec<u32>> = idx.iter().map(|&i| t.train_ids[i].clone()).collect();
    let gens = generate(
        &t.policy.dec,
        &prompts,
        &params(rc.max_new_tokens, 1, &mut rng),
    )?;
    let cut: Vec<usize> = gens
        .iter()
        .map(|g| ((rng.uniform() * g.tokens.len() as f64) as usize).min(g.tokens.len() - 1))
        .collect();
    // The truth: M continuations per prefix, grouped by cut (one max length per call).
    let mut clean = vec![Vec::with_capacity(m); np];
    let mut noisy = vec![Vec::with_capacity(m); np];
    let mut noise = Stream::new(seed, t.step, "critic-calibration-reward");
    for j in 0..rc.max_new_tokens {
        let group: Vec<usize> = (0..np).filter(|&i| cut[i] == j).collect();
        if group.is_empty() {
            continue;
        }
        let prefixes: Vec<Vec<u32>> = group
            .iter()
            .map(|&i| [&prompts[i][..], &gens[i].tokens[..j]].concat())
            .collect();
        let conts = generate(
            &t.policy.dec,
            &prefixes,
            &params(rc.max_new_tokens - j, m, &mut rng),
        )?;
        for c in conts {
            let i = group[c.prompt_index];
            let resp = [&gens[i].tokens[..j], &c.tokens[..]].concat();
            let text = super::eval::response_text(&t.tok, &resp, &t.stop)?;
            let ex = &t.task.train[idx[i]];
            let ok = t.task.checker.check(&text, &ex.answer) == Verdict::Correct;
            let r = &t.cfg.reward;
            clean[i].push(if ok { r.correct } else { r.incorrect });
            let scored = super::noise::Scored {
                correct: ok,
                right_shape: r.partial_credit > 0.0
                    && t.task.checker.right_shape(&text, &ex.prompt),
                in_subset: super::noise::in_subset(r, &ex.prompt),
            };
            noisy[i].push(super::noise::noisy_reward(scored, r, &mut noise));
        }
    }
    // The critic at each prefix's state: the value at the token before y_j of the full row.
    let seqs: Vec<Vec<u32>> = (0..np)
        .map(|i| [&prompts[i][..], &gens[i].tokens[..]].concat())
        .collect();
    let pos: Vec<usize> = (0..np).map(|i| prompts[i].len() - 1 + cut[i]).collect();
    let s = t.s;
    let fs = t.flow_solve();
    let critic = t.critic.as_mut().expect("checked above");
    let out = critic.forward_readout(&seqs)?;
    let sorted = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v
    };
    let mut preds: Vec<(String, Vec<Vec<f64>>)> = Vec::new();
    match (&critic.head, fs) {
        (CriticHead::Value { .. }, _) => {
            let v = (0..np).map(|i| vec![out[i * s + pos[i]] as f64]).collect();
            preds.push(("ppo value".into(), v));
        }
        (CriticHead::Quantile { k, .. }, _) => {
            let k = *k;
            let q = (0..np)
                .map(|i| {
                    let at = (i * s + pos[i]) * k;
                    sorted(out[at..at + k].iter().map(|&x| x as f64).collect())
                })
                .collect();
            preds.push((format!("quantile ({k} quantiles)"), q));
        }
        (CriticHead::Flow { .. }, Some(fs)) => {
            let w = fs.shape.width;
            let u: Vec<f32> = (0..np)
                .flat_map(|i| out[(i * s + pos[i]) * w..(i * s + pos[i] + 1) * w].to_vec())
                .collect();
            let flow = critic.flow_params()?;
            let mask = vec![1.0f32; np];
            let mut steps = vec![fs.readout_steps];
            if e.critic_ode_steps > 0 && e.critic_ode_steps as u32 != fs.readout_steps {
                steps.push(e.critic_ode_steps as u32);
            }
            for n in steps {
                let fsn = super::rollout::FlowSolve {
                    readout_steps: n,
                    ..fs
                };
                let (z, _) = flow_readout(&t.ops, &fsn, &flow, &u, &mask)?;
                let k = fs.k;
                let p = (0..np)
                    .map(|i| sorted(z[i * k..(i + 1) * k].iter().map(|&x| x as f64).collect()))
                    .collect();
                let what = if n == 1 { "step" } else { "steps" };
                preds.push((format!("dfpo ({n} Euler {what}, K = {k})"), p));
            }
        }
        (CriticHead::Flow { .. }, None) => {
            return Err(Error::Invalid("critic calibration: no flow solve".into()))
        }
    }
    let alpha = t.cfg.critic.alpha;
    let std_of = |v: &[Vec<f64>]| {
        v.iter()
            .map(|x| {
                let mu = x.iter().sum::<f64>() / x.len() as f64;
                (x.iter().map(|y| (y - mu).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
            })
            .sum::<f64>()
            / v.len() as f64
    };
    let mut pit_rng = Stream::new(seed, t.step, "critic-calibration-pit");
    let critics = preds
        .into_iter()
        .map(|(name, p)| CriticScores {
            samples: p.first().map_or(0, Vec::len),
            clean: score(&p, &clean, alpha, &mut pit_rng),
            noisy: score(&p, &noisy, alpha, &mut pit_rng),
            name,
        })
        .collect();
    Ok(Some(Calibration {
        algo: t.cfg.algo.name.as_str().into(),
        step: t.step,
        prefixes: np,
        continuations: m,
        alpha,
        truth_std_clean: std_of(&clean),
        truth_std_noisy: std_of(&noisy),
        critics,
    }))
}

/// The calibration as a plain-text table (one line per critic and truth).
pub fn calibration_table(c: &Calibration) -> String {
    let mut s = format!(
        "critic calibration at step {} ({} prefixes x {} continuations; truth std clean {:.3}, noisy {:.3})\n{:<32} {:>6} {:>10} {:>8} {:>8} {:>10} {:>7}\n",
        c.step,
        c.prefixes,
        c.continuations,
        c.truth_std_clean,
        c.truth_std_noisy,
        "critic",
        "truth",
        "value_mse",
        "crps",
        "floor",
        "cvar_err",
        "pit_l1"
    );
    for cr in &c.critics {
        for (truth, sc) in [("clean", &cr.clean), ("noisy", &cr.noisy)] {
            s.push_str(&format!(
                "{:<32} {:>6} {:>10.4} {:>8.4} {:>8.4} {:>10.4} {:>7.3}\n",
                cr.name, truth, sc.value_mse, sc.crps, sc.crps_floor, sc.cvar_abs_err, sc.pit_l1
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crps_cvar_and_pit_of_small_cases() {
        // A point mass: CRPS is the absolute error.
        assert!((crps(&[0.5], 2.0) - 1.5).abs() < 1e-12);
        // Two samples {0, 1} at y = 0: (0 + 1)/2 − (2·1)/(2·4) = 0.25.
        assert!((crps(&[0.0, 1.0], 0.0) - 0.25).abs() < 1e-12);
        // CVaR_0.25 of {1, 2, 3, 4} is 1; of {1, 2} it is 1 (half of the first sample's mass).
        assert!((cvar(&[1.0, 2.0, 3.0, 4.0], 0.25) - 1.0).abs() < 1e-12);
        assert!((cvar(&[1.0, 2.0, 3.0, 4.0], 0.5) - 1.5).abs() < 1e-12);
        assert!((cvar(&[1.0, 3.0], 0.75) - (1.0 * 0.5 + 3.0 * 0.25) / 0.75).abs() < 1e-12);
        // PIT: below all, above all, and a tie spread by v.
        assert_eq!(pit(&[1.0, 2.0], 0.0, 0.3), 0.0);
        assert_eq!(pit(&[1.0, 2.0], 3.0, 0.3), 1.0);
        assert!((pit(&[1.0, 2.0], 1.0, 0.5) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn a_calibrated_prediction_scores_the_floor_and_a_flat_pit() {
        // The prediction IS the truth's distribution (Bernoulli 0.3 as 10 samples).
        let pred: Vec<f64> = (0..10).map(|i| if i < 7 { 0.0 } else { 1.0 }).collect();
        let truth: Vec<f64> = (0..1000)
            .map(|i| if i % 10 < 7 { 0.0 } else { 1.0 })
            .collect();
        let mut rng = Stream::new(1, 0, "test");
        let s = score(
            std::slice::from_ref(&pred),
            std::slice::from_ref(&truth),
            0.1,
            &mut rng,
        );
        assert!(s.value_mse < 1e-12 && s.cvar_abs_err < 1e-12);
        assert!(
            (s.crps - s.crps_floor).abs() < 1e-9,
            "{} vs {}",
            s.crps,
            s.crps_floor
        );
        assert!(s.pit_l1 < 0.08, "{:?}", s.pit);
        // A point mass at the mean is too narrow: worse CRPS, PIT mass at the ends.
        let p = score(&[vec![0.3]], &[truth], 0.1, &mut rng);
        assert!(p.crps > s.crps + 0.05 && p.pit[0] + p.pit[9] > 0.9);
    }
}
