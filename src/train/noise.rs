//! Reward noise models (the `reward.*` options): what the TRAINING reward of one response is,
//! given its clean verdict. Evaluation never sees any of this (it scores with the checker).
//!
//! One response's training reward, in this order (c₀ = `reward.incorrect`, c₁ = `reward.correct`):
//! 1. Label noise on the clean verdict y ∈ {0, 1}: a symmetric flip with probability p
//!    (`reward.flip_prob`; on the prompts of `reward.subset` the rate is
//!    `reward.subset_flip_prob` instead: state-dependent noise), then an asymmetric step on the
//!    result: a reported-correct becomes incorrect with probability `reward.fn_prob` (false
//!    negatives), a reported-incorrect becomes correct with probability `reward.fp_prob` (false
//!    positives). The reported label ỹ is wrong with probabilities
//!    q₁ = P(ỹ=0 | y=1) = p(1−f₊) + (1−p)f₋ and q₀ = P(ỹ=1 | y=0) = p(1−f₋) + (1−p)f₊
//!    ([`label_error_rates`]).
//! 2. Flawed verifier: a response whose clean verdict is incorrect but has the right shape
//!    ([`crate::task::Checker::right_shape`]) and whose label stayed incorrect gets partial
//!    credit c₀ + c·(c₁ − c₀) (`reward.partial_credit` = c) instead of c₀.
//! 3. Additive noise: σ·N(0, 1) (`reward.gaussian_sigma`), s·T_ν (`reward.t_scale`,
//!    `reward.t_nu`: Student-t, heavy-tailed for small ν), and with probability
//!    `reward.outlier_prob` an outlier ±M (`reward.outlier_mag`, either sign with probability ½).
//! 4. `reward.debias = true`: the observed reward r̃ is mapped to
//!    c₀ + (r̃ − c₀ − q₀(c₁ − c₀)) / (1 − q₀ − q₁), the unbiased estimate of the clean reward
//!    under the KNOWN label error rates of this prompt (for symmetric flips and 0/1 rewards,
//!    (r̃ − p)/(1 − 2p)). Needs q₀ + q₁ < 1.
//!
//! Random draws happen only for the options that are on, in the order above, so the default
//! (symmetric flips, nothing else) draws exactly what it drew before these options existed.

use super::config::RewardConfig;
use super::rollout::Stream;

/// What the noise model needs to know about one response.
#[derive(Clone, Copy, Debug)]
pub struct Scored {
    /// The clean verdict.
    pub correct: bool,
    /// A wrong answer of the right shape (partial credit of the flawed verifier).
    pub right_shape: bool,
    /// The prompt is in `reward.subset` (state-dependent noise).
    pub in_subset: bool,
}

/// The symmetric flip rate of a prompt (in or out of `reward.subset`).
pub fn flip_rate(r: &RewardConfig, in_subset: bool) -> f64 {
    if in_subset && r.subset != "none" {
        r.subset_flip_prob
    } else {
        r.flip_prob
    }
}

/// (q₀, q₁): the probabilities that the reported label is correct for a wrong answer and
/// incorrect for a correct one (see the module doc).
pub fn label_error_rates(r: &RewardConfig, in_subset: bool) -> (f64, f64) {
    let p = flip_rate(r, in_subset);
    let (fp, fneg) = (r.fp_prob, r.fn_prob);
    let q0 = p * (1.0 - fneg) + (1.0 - p) * fp;
    let q1 = p * (1.0 - fp) + (1.0 - p) * fneg;
    (q0, q1)
}

/// Whether `prompt` is in the subset named by `reward.subset` ("none": no prompt).
pub fn in_subset(r: &RewardConfig, prompt: &str) -> bool {
    match r.subset.as_str() {
        "odd_first" => crate::task::first_operand_odd(prompt),
        _ => false,
    }
}

/// The training reward of one response (module doc).
pub fn noisy_reward(s: Scored, r: &RewardConfig, rng: &mut Stream) -> f64 {
    let p = flip_rate(r, s.in_subset);
    let mut label = s.correct;
    if p > 0.0 && rng.uniform() < p {
        label = !label;
    }
    if label && r.fn_prob > 0.0 {
        if rng.uniform() < r.fn_prob {
            label = false;
        }
    } else if !label && r.fp_prob > 0.0 && rng.uniform() < r.fp_prob {
        label = true;
    }
    let mut v = if label {
        r.correct
    } else if !s.correct && s.right_shape && r.partial_credit > 0.0 {
        r.incorrect + r.partial_credit * (r.correct - r.incorrect)
    } else {
        r.incorrect
    };
    v += additive_noise(r, rng);
    if r.debias {
        v = debias(v, r, s.in_subset);
    }
    v
}

/// The additive part (step 3): Gaussian, Student-t and outliers, as configured (0 when off).
pub fn additive_noise(r: &RewardConfig, rng: &mut Stream) -> f64 {
    let mut v = 0.0;
    if r.gaussian_sigma > 0.0 {
        v += r.gaussian_sigma * rng.normal();
    }
    if r.t_scale > 0.0 {
        v += r.t_scale * student_t(r.t_nu, rng);
    }
    if r.outlier_prob > 0.0 && rng.uniform() < r.outlier_prob {
        v += if rng.uniform() < 0.5 {
            -r.outlier_mag
        } else {
            r.outlier_mag
        };
    }
    v
}

/// The debiased reward (step 4) of an observed reward `v`.
pub fn debias(v: f64, r: &RewardConfig, in_subset: bool) -> f64 {
    let (q0, q1) = label_error_rates(r, in_subset);
    let span = r.correct - r.incorrect;
    r.incorrect + (v - r.incorrect - q0 * span) / (1.0 - q0 - q1)
}

/// The range of the training reward without its additive noise (the two rewards, the partial
/// credit between them; mapped by the debiasing, which widens it), for the critic's return clip.
pub fn reward_range(r: &RewardConfig) -> (f64, f64) {
    let mut ends = vec![r.correct, r.incorrect];
    if r.debias {
        let subsets: &[bool] = if r.subset == "none" {
            &[false]
        } else {
            &[false, true]
        };
        ends = subsets
            .iter()
            .flat_map(|&s| [debias(r.correct, r, s), debias(r.incorrect, r, s)])
            .collect();
    }
    let lo = ends.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ends.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// How far the additive noise usually reaches (3σ of the Gaussian, 3 scales of the Student-t;
/// the rare outliers are left outside the clip on purpose), before the debiasing's scaling.
pub fn additive_spread(r: &RewardConfig) -> f64 {
    let s = 3.0 * r.gaussian_sigma + 3.0 * r.t_scale;
    if r.debias {
        let worst = [false, true]
            .iter()
            .map(|&sub| {
                let (q0, q1) = label_error_rates(r, sub);
                1.0 / (1.0 - q0 - q1)
            })
            .fold(1.0, f64::max);
        s * worst
    } else {
        s
    }
}

/// A Student-t draw with `nu` degrees of freedom: Z / sqrt(V/ν), V ~ χ²_ν = 2·Gamma(ν/2).
pub fn student_t(nu: f64, rng: &mut Stream) -> f64 {
    let z = rng.normal();
    let v = 2.0 * gamma(nu / 2.0, rng);
    z / (v / nu).sqrt()
}

/// A Gamma(shape, 1) draw (Marsaglia and Tsang 2000; shape < 1 by the boost
/// Gamma(a) = Gamma(a + 1)·U^(1/a)).
pub fn gamma(shape: f64, rng: &mut Stream) -> f64 {
    if shape < 1.0 {
        let g = gamma(shape + 1.0, rng);
        return g * rng.uniform().powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = rng.normal();
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = rng.uniform();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Statistics of every noise model over many seeded draws. Tolerances: 4.5 standard errors
    //! of the estimate (binomial sqrt(p(1−p)/n), or the CLT's σ/√n), so a correct implementation
    //! fails with probability < 1e-5 per check and a wrong rate of the size we test fails.
    use super::*;

    const N: usize = 40_000;

    fn cfg() -> RewardConfig {
        RewardConfig {
            flip_prob: 0.0,
            ..RewardConfig::default()
        }
    }

    fn s(correct: bool) -> Scored {
        Scored {
            correct,
            right_shape: true,
            in_subset: false,
        }
    }

    /// Share of draws with reward == `value`, with its binomial tolerance check against `p`.
    fn assert_rate(draws: &[f64], value: f64, p: f64, what: &str) {
        let k = draws.iter().filter(|&&v| (v - value).abs() < 1e-12).count();
        let got = k as f64 / draws.len() as f64;
        let tol = 4.5 * (p * (1.0 - p) / draws.len() as f64).sqrt() + 1e-12;
        assert!(
            (got - p).abs() <= tol,
            "{what}: rate {got:.4}, expected {p:.4} ± {tol:.4}"
        );
    }

    fn draws(sc: Scored, r: &RewardConfig, tag: &str) -> Vec<f64> {
        let mut rng = Stream::new(7, 0, tag);
        (0..N).map(|_| noisy_reward(sc, r, &mut rng)).collect()
    }

    #[test]
    fn symmetric_flips() {
        let r = RewardConfig {
            flip_prob: 0.3,
            ..cfg()
        };
        assert_rate(&draws(s(true), &r, "a"), 0.0, 0.3, "correct flipped");
        assert_rate(&draws(s(false), &r, "b"), 1.0, 0.3, "wrong flipped");
    }

    #[test]
    fn asymmetric_false_negatives_and_positives() {
        let r = RewardConfig {
            fn_prob: 0.25,
            ..cfg()
        };
        assert_rate(&draws(s(true), &r, "a"), 0.0, 0.25, "false negatives");
        assert_rate(&draws(s(false), &r, "b"), 0.0, 1.0, "no false positives");
        let r = RewardConfig {
            fp_prob: 0.15,
            ..cfg()
        };
        assert_rate(&draws(s(false), &r, "c"), 1.0, 0.15, "false positives");
        assert_rate(&draws(s(true), &r, "d"), 1.0, 1.0, "no false negatives");
        // Combined with symmetric flips: the rates of label_error_rates.
        let r = RewardConfig {
            flip_prob: 0.1,
            fn_prob: 0.2,
            fp_prob: 0.05,
            ..cfg()
        };
        let (q0, q1) = label_error_rates(&r, false);
        assert!((q1 - (0.1 * 0.95 + 0.9 * 0.2)).abs() < 1e-12);
        assert_rate(&draws(s(true), &r, "e"), 0.0, q1, "q1");
        assert_rate(&draws(s(false), &r, "f"), 1.0, q0, "q0");
    }

    #[test]
    fn state_dependent_flips() {
        let r = RewardConfig {
            flip_prob: 0.1,
            subset: "odd_first".into(),
            subset_flip_prob: 0.4,
            ..cfg()
        };
        assert!(in_subset(&r, "13+20+11+10+10="));
        assert!(!in_subset(&r, "12+21+11+10+10="));
        assert!(!in_subset(&cfg(), "13+20="));
        let inside = Scored {
            in_subset: true,
            ..s(true)
        };
        assert_rate(&draws(inside, &r, "a"), 0.0, 0.4, "subset");
        assert_rate(&draws(s(true), &r, "b"), 0.0, 0.1, "outside");
    }

    #[test]
    fn flawed_verifier_partial_credit() {
        let r = RewardConfig {
            partial_credit: 0.3,
            correct: 2.0,
            incorrect: -1.0,
            ..cfg()
        };
        let mut rng = Stream::new(1, 0, "x");
        let wrong_shaped = noisy_reward(s(false), &r, &mut rng);
        assert!((wrong_shaped - (-1.0 + 0.3 * 3.0)).abs() < 1e-12);
        let malformed = Scored {
            right_shape: false,
            ..s(false)
        };
        assert_eq!(noisy_reward(malformed, &r, &mut rng), -1.0);
        assert_eq!(noisy_reward(s(true), &r, &mut rng), 2.0);
        // Under flips the partial credit is what an unflipped wrong answer gets.
        let r = RewardConfig {
            flip_prob: 0.2,
            ..r
        };
        assert_rate(&draws(s(false), &r, "p"), -0.1, 0.8, "partial credit kept");
    }

    #[test]
    fn student_t_tails() {
        // P(|T| > 2) for ν = 3 in closed form: F(t) = ½ + (1/π)(t/(√3(1 + t²/3)) + atan(t/√3)).
        let t = 2.0f64;
        let f = 0.5
            + (t / (3f64.sqrt() * (1.0 + t * t / 3.0)) + (t / 3f64.sqrt()).atan())
                / std::f64::consts::PI;
        let p_tail = 2.0 * (1.0 - f);
        for (nu, thr, p) in [(3.0, 2.0, p_tail), (1.0, 1.0, 0.5), (0.5, 0.0, 0.5)] {
            let mut rng = Stream::new(3, 0, "t");
            let x: Vec<f64> = (0..N).map(|_| student_t(nu, &mut rng)).collect();
            let tail = x.iter().filter(|v| v.abs() > thr).count() as f64 / N as f64;
            let pos = x.iter().filter(|v| **v > 0.0).count() as f64 / N as f64;
            let tol = 4.5 * (p * (1.0 - p) / N as f64).sqrt();
            if thr > 0.0 {
                assert!(
                    (tail - p).abs() <= tol,
                    "nu {nu}: tail {tail}, want {p} ± {tol}"
                );
            }
            assert!(
                (pos - 0.5).abs() <= 4.5 * (0.25 / N as f64).sqrt(),
                "nu {nu}: P(T>0) {pos}"
            );
        }
        // Through the reward: scale s, ν = 5, variance s²ν/(ν−2); the mean is 0 (CLT bound).
        let r = RewardConfig {
            t_scale: 0.2,
            t_nu: 5.0,
            ..cfg()
        };
        let x = draws(s(true), &r, "u");
        let m = x.iter().sum::<f64>() / N as f64;
        let var = 0.04 * 5.0 / 3.0;
        assert!((m - 1.0).abs() <= 4.5 * (var / N as f64).sqrt(), "mean {m}");
        let v = x.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / N as f64;
        assert!((v / var - 1.0).abs() < 0.15, "variance {v}, want {var}");
    }

    #[test]
    fn gamma_mean_and_variance() {
        for shape in [0.5, 1.5, 4.0] {
            let mut rng = Stream::new(5, 0, "g");
            let x: Vec<f64> = (0..N).map(|_| gamma(shape, &mut rng)).collect();
            let m = x.iter().sum::<f64>() / N as f64;
            assert!(
                (m - shape).abs() <= 4.5 * (shape / N as f64).sqrt(),
                "shape {shape}: mean {m}"
            );
            let v = x.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / N as f64;
            assert!((v / shape - 1.0).abs() < 0.1, "shape {shape}: var {v}");
        }
    }

    #[test]
    fn outliers() {
        let r = RewardConfig {
            outlier_prob: 0.05,
            outlier_mag: 10.0,
            ..cfg()
        };
        let x = draws(s(false), &r, "o");
        assert_rate(&x, 10.0, 0.025, "+M");
        assert_rate(&x, -10.0, 0.025, "-M");
        assert_rate(&x, 0.0, 0.95, "no outlier");
    }

    #[test]
    fn debiased_reward_is_unbiased() {
        for (flip, fneg, fp, sub) in [
            (0.3, 0.0, 0.0, false),
            (0.1, 0.2, 0.05, false),
            (0.1, 0.0, 0.0, true),
        ] {
            let r = RewardConfig {
                flip_prob: flip,
                fn_prob: fneg,
                fp_prob: fp,
                subset: if sub {
                    "odd_first".into()
                } else {
                    "none".into()
                },
                subset_flip_prob: 0.35,
                debias: true,
                ..cfg()
            };
            for correct in [true, false] {
                let sc = Scored {
                    in_subset: sub,
                    ..s(correct)
                };
                let x = draws(sc, &r, "d");
                let m = x.iter().sum::<f64>() / N as f64;
                let sd = (x.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / N as f64).sqrt();
                let want = if correct { 1.0 } else { 0.0 };
                assert!(
                    (m - want).abs() <= 4.5 * sd / (N as f64).sqrt(),
                    "{flip} {fneg} {fp} {sub} {correct}: mean {m}, want {want}"
                );
            }
        }
        // Symmetric 0/1: exactly (r - p)/(1 - 2p).
        let r = RewardConfig {
            flip_prob: 0.2,
            debias: true,
            ..cfg()
        };
        assert!((debias(1.0, &r, false) - 0.8 / 0.6).abs() < 1e-12);
        assert!((debias(0.0, &r, false) + 0.2 / 0.6).abs() < 1e-12);
        let (lo, hi) = reward_range(&r);
        assert!((lo + 0.2 / 0.6).abs() < 1e-12 && (hi - 0.8 / 0.6).abs() < 1e-12);
    }

    #[test]
    fn default_draws_match_the_old_model() {
        // The default (flips 0.2, nothing else) draws one uniform per response, as before.
        let r = RewardConfig::default();
        let (mut a, mut b) = (Stream::new(1, 3, "reward"), Stream::new(1, 3, "reward"));
        for i in 0..1000 {
            let c = i % 3 == 0;
            let got = noisy_reward(s(c), &r, &mut a);
            let flip = b.uniform() < 0.2;
            assert_eq!(got, if c != flip { 1.0 } else { 0.0 });
        }
    }
}
