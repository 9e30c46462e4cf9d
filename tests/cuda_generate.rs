//! Device generation (src/model/generate_cuda.rs) against the CPU generator and the CPU
//! sampling rule, on the tiny llama and qwen2 fixtures.
//!
//! The device runs bf16 weights and activations, the CPU fp32, so their logits differ by bf16
//! rounding. Every check therefore teacher-forces the CPU decoder on the device's own tokens
//! and asks: is each device token what the CPU rule picks from the CPU logits, or, where it is
//! not, were the CPU's candidates closer than the logit tolerance `TOL_REL · max|logit|` (the
//! one tests/cuda_decoder.rs uses for the logits)? And where every step of a row was clear
//! (no near-tie), the device row must equal the CPU generator's row token for token. Log-probs
//! of the device's tokens (a logit minus a log-sum-exp) are held to twice the logit tolerance.

mod common;

use std::sync::Arc;

use dfpo::device::CudaDevice;
use dfpo::kernels::sample::{cpu as scpu, SampleParams};
use dfpo::model::decoder::{Decoder, DecoderGraph};
use dfpo::model::generate::{generate, GenerateParams, Generation};
use dfpo::model::generate_cuda::{DeviceGenerator, GenCapacity, ACTIVE_CHECK_EVERY};
use dfpo::Device;

const TOL_REL: f32 = 3e-2;

struct Setup {
    dev: Arc<CudaDevice>,
    dec: Decoder,
    graph: DecoderGraph,
    v: usize,
}

fn setup(test: &str, model: &str) -> Option<Setup> {
    let dev = dfpo::device::cuda_for_test(&format!("{test}_{model}"))?;
    let dec = Decoder::load(common::fixtures_dir().join(model)).unwrap();
    // The policy graph only holds the live weights here; its batch shape does not matter.
    let graph = dec.build(1, 8, &Device::Cuda(dev.clone())).unwrap();
    let v = dec.config.vocab_size;
    Some(Setup { dev, dec, graph, v })
}

fn prompts(rng: &mut common::Rng, lens: &[usize], v: usize) -> Vec<Vec<u32>> {
    lens.iter()
        .map(|&l| {
            (0..l)
                .map(|_| 3 + (rng.next_u64() % (v as u64 - 3)) as u32)
                .collect()
        })
        .collect()
}

fn generator(
    s: &Setup,
    ps: &[Vec<u32>],
    p: &GenerateParams,
    extra_prompts: usize,
) -> DeviceGenerator {
    let cap = GenCapacity {
        prompts: ps.len() + extra_prompts,
        n_samples: p.n_samples,
        max_prompt_len: ps.iter().map(Vec::len).max().unwrap(),
        max_new_tokens: p.max_new_tokens,
    };
    let mut g = DeviceGenerator::new(s.dev.clone(), &s.dec.config, cap).unwrap();
    g.set_return_logprobs(true);
    g
}

/// CPU fp32 logits `[len][V]` of `seq`.
fn cpu_logits(dec: &Decoder, seq: &[u32]) -> Vec<f32> {
    let mut g = dec.build_with_logits(1, seq.len(), &Device::Cpu).unwrap();
    g.set_batch(&[seq.to_vec()]).unwrap();
    g.forward().unwrap();
    g.logits().unwrap()
}

/// The CPU logits after each generated prefix of `g`: row j scores token j.
fn teacher_forced(dec: &Decoder, prompt: &[u32], g: &Generation) -> Vec<Vec<f32>> {
    let v = dec.config.vocab_size;
    let full: Vec<u32> = prompt.iter().chain(&g.tokens).copied().collect();
    let z = cpu_logits(dec, &full);
    (0..g.tokens.len())
        .map(|j| {
            let t = prompt.len() - 1 + j;
            z[t * v..(t + 1) * v].to_vec()
        })
        .collect()
}

fn tol_of(row: &[f32]) -> f32 {
    TOL_REL * row.iter().fold(0.0f32, |m, &x| m.max(x.abs())) + 1e-4
}

fn top2(row: &[f32]) -> (usize, usize) {
    let order = scpu::rank_order(row);
    (order[0] as usize, order[1] as usize)
}

fn log_softmax_at(row: &[f32], t: usize) -> f32 {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = m + row.iter().map(|&z| (z as f64 - m).exp()).sum::<f64>().ln();
    (row[t] as f64 - lse) as f32
}

/// Greedy device rows against the CPU (see the file doc). Returns (tokens compared exactly,
/// all tokens).
fn check_greedy(
    what: &str,
    dec: &Decoder,
    ps: &[Vec<u32>],
    dev: &[Generation],
    cpu: &[Generation],
) -> (usize, usize) {
    assert_eq!(dev.len(), cpu.len(), "{what}: rows");
    let (mut exact, mut all) = (0, 0);
    for (r, (d, c)) in dev.iter().zip(cpu).enumerate() {
        assert_eq!(
            (d.prompt_index, d.sample_index),
            (c.prompt_index, c.sample_index),
            "{what} row {r}"
        );
        let z = teacher_forced(dec, &ps[d.prompt_index], d);
        let mut clear = true;
        for (j, &t) in d.tokens.iter().enumerate() {
            let row = &z[j];
            let (best, second) = top2(row);
            let tol = tol_of(row);
            assert!(
                row[t as usize] >= row[best] - tol,
                "{what} row {r} step {j}: device token {t} has CPU logit {} but the argmax {best} \
                 has {} (tolerance {tol})",
                row[t as usize],
                row[best]
            );
            if !d.policy_logprobs.is_empty() {
                let want = log_softmax_at(row, t as usize);
                let got = d.policy_logprobs[j];
                assert!(
                    (got - want).abs() <= (2.0 * tol).max(5e-2) + 2e-2 * want.abs(),
                    "{what} row {r} step {j}: policy log-prob {got} vs CPU {want}"
                );
                assert_eq!(d.logprobs[j], 0.0, "{what}: greedy samples a point mass");
            }
            clear &= row[best] - row[second] > tol;
            all += 1;
            if clear {
                assert_eq!(
                    Some(&t),
                    c.tokens.get(j),
                    "{what} row {r} step {j}: every margin so far is clear, yet the device and \
                     the CPU generator differ"
                );
                exact += 1;
            }
        }
        if clear {
            assert_eq!(d.tokens, c.tokens, "{what} row {r}");
            assert_eq!(d.stopped, c.stopped, "{what} row {r}: stopped");
        }
    }
    eprintln!("{what}: {exact} of {all} tokens compared exactly with the CPU generator");
    (exact, all)
}

fn greedy_matches_cpu(model: &str) {
    let Some(s) = setup("cuda_generate_greedy", model) else {
        return;
    };
    let mut rng = common::Rng::fresh(&format!("cuda_generate_greedy_{model}"));
    // Ragged prompts; two samples each share one prefill.
    let ps = prompts(&mut rng, &[7, 1, 12, 3], s.v);
    let p = GenerateParams {
        max_new_tokens: 10,
        sample: SampleParams::greedy(),
        stop_ids: vec![],
        n_samples: 2,
        seed: rng.next_u64(),
    };
    let mut g = generator(&s, &ps, &p, 0);
    let dev = g.generate(&s.graph, &ps, &p).unwrap();
    let cpu = generate(&s.dec, &ps, &p).unwrap();
    assert_eq!(dev.len(), 8);
    for d in &dev {
        assert_eq!(
            d.tokens.len(),
            10,
            "no stop ids: every row reaches max_new_tokens"
        );
        assert!(!d.stopped);
    }
    for pair in dev.chunks(2) {
        assert_eq!(
            pair[0].tokens, pair[1].tokens,
            "greedy samples of one prompt (one shared prefill) must be identical"
        );
    }
    let (exact, _) = check_greedy(&format!("greedy {model}"), &s.dec, &ps, &dev, &cpu);
    assert!(exact > 0, "no token could be compared exactly");
}

/// Stream capture must work wherever the generator runs: on a real GPU and on the emulated
/// driver (tools/emu, whose tools/cuda-emu/graph.cpp records and replays the captured step).
fn assert_graphs_available(g: &DeviceGenerator) {
    assert_eq!(g.graph_unavailable(), None, "stream capture failed");
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn greedy_matches_cpu_llama() {
    greedy_matches_cpu("tiny-llama");
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn greedy_matches_cpu_qwen2() {
    greedy_matches_cpu("tiny-qwen2");
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn stop_ids_end_rows_and_the_batch() {
    let Some(s) = setup("cuda_generate_stop", "tiny-qwen2") else {
        return;
    };
    let mut rng = common::Rng::fresh("cuda_generate_stop");
    let ps = prompts(&mut rng, &[4, 9, 2], s.v);
    let mut p = GenerateParams {
        max_new_tokens: 12,
        sample: SampleParams::greedy(),
        stop_ids: vec![],
        n_samples: 1,
        seed: 7,
    };
    let mut g = generator(&s, &ps, &p, 0);
    let free = g.generate(&s.graph, &ps, &p).unwrap();
    // Stop on row 0's third token (and on an id no row produces).
    let x = free[0].tokens[2];
    p.stop_ids = vec![x, s.v as u32 + 5];
    let stopped = g.generate(&s.graph, &ps, &p).unwrap();
    for (r, (f, st)) in free.iter().zip(&stopped).enumerate() {
        match f.tokens.iter().position(|&t| t == x) {
            Some(i) => {
                assert_eq!(
                    st.tokens,
                    f.tokens[..=i],
                    "row {r}: cut after its first stop id"
                );
                assert!(st.stopped, "row {r}");
            }
            None => {
                assert_eq!(st.tokens, f.tokens, "row {r}");
                assert!(!st.stopped, "row {r}");
            }
        }
    }
    assert!(stopped[0].stopped && stopped[0].tokens.len() <= 3);
    let cpu = generate(&s.dec, &ps, &p).unwrap();
    check_greedy("stop ids", &s.dec, &ps, &stopped, &cpu);

    // Every row stops on its first token: the batch ends within ACTIVE_CHECK_EVERY steps.
    let mut firsts: Vec<u32> = free.iter().map(|f| f.tokens[0]).collect();
    firsts.dedup();
    p.stop_ids = firsts;
    p.max_new_tokens = 12;
    let mut g2 = generator(&s, &ps, &p, 0);
    let all = g2.generate(&s.graph, &ps, &p).unwrap();
    for a in &all {
        assert_eq!(a.tokens.len(), 1);
        assert!(a.stopped);
    }
    let t = g2.traffic();
    assert!(
        (t.graph_launches + t.direct_steps) as usize <= ACTIVE_CHECK_EVERY,
        "a batch whose rows all stopped ends early: {t:?}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn max_length_reached_at_full_capacity() {
    let Some(s) = setup("cuda_generate_maxlen", "tiny-llama") else {
        return;
    };
    let mut rng = common::Rng::fresh("cuda_generate_maxlen");
    // 20 + 108 = max_position_embeddings (128): the last decode writes the cache's last slot.
    let ps = prompts(&mut rng, &[20, 5], s.v);
    let p = GenerateParams {
        max_new_tokens: s.dec.config.max_position_embeddings - 20,
        sample: SampleParams::greedy(),
        stop_ids: vec![],
        n_samples: 1,
        seed: 1,
    };
    let mut g = generator(&s, &ps, &p, 0);
    let dev = g.generate(&s.graph, &ps, &p).unwrap();
    for d in &dev {
        assert_eq!(d.tokens.len(), p.max_new_tokens);
        assert!(!d.stopped);
    }
    let cpu = generate(&s.dec, &ps, &p).unwrap();
    check_greedy("max length", &s.dec, &ps, &dev, &cpu);
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn top_k_1_sampling_equals_greedy() {
    let Some(s) = setup("cuda_generate_topk1", "tiny-llama") else {
        return;
    };
    let mut rng = common::Rng::fresh("cuda_generate_topk1");
    let ps = prompts(&mut rng, &[6, 3, 10], s.v);
    let mut p = GenerateParams {
        max_new_tokens: 9,
        sample: SampleParams::greedy(),
        stop_ids: vec![],
        n_samples: 3,
        seed: rng.next_u64(),
    };
    let mut g = generator(&s, &ps, &p, 0);
    let greedy = g.generate(&s.graph, &ps, &p).unwrap();
    p.sample = SampleParams {
        temperature: 0.7,
        top_k: 1,
        top_p: 1.0,
    };
    let k1 = g.generate(&s.graph, &ps, &p).unwrap();
    for (r, (a, b)) in greedy.iter().zip(&k1).enumerate() {
        assert_eq!(a.tokens, b.tokens, "row {r}");
        for &lp in &b.logprobs {
            assert!(
                lp.abs() < 1e-6,
                "row {r}: one kept token has log-prob 0, got {lp}"
            );
        }
    }
}

/// The device's draws against the CPU rule on the CPU's teacher-forced logits: the exponential
/// race with the same uniforms (seed, counter = step · rows, row); returns (exact, all).
fn check_draws(
    what: &str,
    s: &Setup,
    ps: &[Vec<u32>],
    p: &GenerateParams,
    dev: &[Generation],
) -> (usize, usize) {
    let rows = dev.len() as u64;
    let t = p.sample.temperature as f64;
    let (mut exact, mut all) = (0, 0);
    for (r, d) in dev.iter().enumerate() {
        let z = teacher_forced(&s.dec, &ps[d.prompt_index], d);
        for (j, &tok) in d.tokens.iter().enumerate() {
            let row = &z[j];
            let tol = tol_of(row) as f64;
            let (zmax, _) = scpu::row_max(row).unwrap();
            let order = scpu::rank_order(row);
            let len = scpu::kept_len(row, &order, zmax, &p.sample);
            let counter = j as u64 * rows;
            let (want, best) = scpu::race(row, &order[..len], zmax, t, p.seed, counter, r);
            all += 1;
            // Only a near-tie may differ from the CPU's draw. The device's kept set lies between
            // a narrow and a wide version of the CPU's (a filter boundary moves by the logit
            // error: top-k's edge logit ± 2·tol, top-p's mass ± 0.05 and its edge logit ± 2·tol,
            // since tokens within the logit error of the top-p edge can trade places across it),
            // and its token wins the race over it: so the token is in the wide set and scores no
            // less, up to the logit error, than every token of the narrow set.
            let score = |x: u32| {
                let u = dfpo::kernels::uniform_open(
                    p.seed,
                    dfpo::kernels::sample::element_counter(counter, r, s.v, x as usize),
                );
                scpu::race_score(row[x as usize] as f64, zmax, t, u)
            };
            let z = |x: u32| row[x as usize] as f64;
            let (mut narrow, mut wide) = (p.sample, p.sample);
            if p.sample.top_p_active() {
                narrow.top_p = (p.sample.top_p - 0.05).max(1e-3);
                wide.top_p = (p.sample.top_p + 0.05).min(1.0);
            }
            let k_edge = p.sample.top_k_for(s.v).map(|k| z(order[k - 1]));
            let nlen = scpu::kept_len(row, &order, zmax, &narrow);
            let past_k_edge = |x: &u32| k_edge.is_none_or(|e| z(*x) > e + 2.0 * tol);
            let narrow_by_mass = order[..nlen].iter().filter(|&x| past_k_edge(x)).count();
            let p_edge = p.sample.top_p_active().then(|| z(order[nlen - 1]));
            let narrow_set: Vec<u32> = order[..nlen]
                .iter()
                .copied()
                .filter(past_k_edge)
                .filter(|&x| p_edge.is_none_or(|e| z(x) > e + 2.0 * tol))
                .collect();
            let wlen = scpu::kept_len(row, &order, zmax, &wide);
            // The kept set is settled when no boundary token is within the logit error (the last
            // condition is the top-p edge's).
            let settled = narrow_by_mass == len
                && wlen <= len
                && order[len..]
                    .iter()
                    .all(|&x| z(x) < z(order[len - 1]) - 2.0 * tol);
            if tok == want {
                exact += 1;
            } else {
                let rank = order.iter().position(|&x| x == tok).unwrap();
                let edge = z(order[len - 1]);
                assert!(
                    rank < wlen.max(len) || z(tok) >= edge - 2.0 * tol,
                    "{what} row {r} step {j}: device token {tok} (rank {rank}) is outside the CPU's \
                     kept set of {len} even with slack"
                );
                let sc = score(tok);
                let nbest = narrow_set
                    .iter()
                    .map(|&x| (score(x), x))
                    .fold((f64::NEG_INFINITY, 0), |a, b| if b.0 > a.0 { b } else { a });
                assert!(
                    sc >= nbest.0 - 4.0 * tol / t,
                    "{what} row {r} step {j}: device token {tok} (rank {rank}, race score {sc}) \
                     vs CPU token {want} ({best}, rank {}; kept {len}, narrow {}): token {} of \
                     the narrow kept set scores {}, so the draw rules differ",
                    order.iter().position(|&x| x == want).unwrap(),
                    narrow_set.len(),
                    nbest.1,
                    nbest.0
                );
            }
            let want_lp = log_softmax_at(row, tok as usize);
            assert!(
                (d.policy_logprobs[j] - want_lp).abs() as f64
                    <= (2.0 * tol).max(5e-2) + 2e-2 * want_lp.abs() as f64,
                "{what} row {r} step {j}: policy log-prob {} vs CPU {want_lp}",
                d.policy_logprobs[j]
            );
            if tok == want && settled {
                let dist = scpu::filtered_distribution(row, &p.sample).unwrap();
                if let Some(&(_, q)) = dist.iter().find(|x| x.0 == tok) {
                    let want_s = q.ln() as f32;
                    assert!(
                        (d.logprobs[j] - want_s).abs() <= 0.1 + 2e-2 * want_s.abs(),
                        "{what} row {r} step {j}: sampling log-prob {} vs CPU {want_s}",
                        d.logprobs[j]
                    );
                }
            }
        }
    }
    eprintln!("{what}: {exact} of {all} draws equal the CPU rule's exactly");
    (exact, all)
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn sampled_draws_follow_the_cpu_rule() {
    for model in ["tiny-llama", "tiny-qwen2"] {
        let Some(s) = setup("cuda_generate_sampled", model) else {
            return;
        };
        let mut rng = common::Rng::fresh(&format!("cuda_generate_sampled_{model}"));
        let ps = prompts(&mut rng, &[6, 2, 9], s.v);
        for sample in [
            SampleParams::default(),
            SampleParams {
                temperature: 0.8,
                top_k: 10,
                top_p: 1.0,
            },
            SampleParams {
                temperature: 1.2,
                top_k: 0,
                top_p: 0.9,
            },
            SampleParams {
                temperature: 0.9,
                top_k: 20,
                top_p: 0.8,
            },
        ] {
            let p = GenerateParams {
                max_new_tokens: 8,
                sample,
                stop_ids: vec![],
                n_samples: 4,
                seed: rng.next_u64(),
            };
            let mut g = generator(&s, &ps, &p, 0);
            let dev = g.generate(&s.graph, &ps, &p).unwrap();
            let what = format!("{model} {sample:?}");
            let (exact, all) = check_draws(&what, &s, &ps, &p, &dev);
            assert!(
                exact * 10 >= all * 8,
                "{what}: only {exact} of {all} draws equal the CPU rule's (bf16 near-ties are rare)"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn first_token_distribution_matches_the_cpu_probabilities() {
    let Some(s) = setup("cuda_generate_dist", "tiny-qwen2") else {
        return;
    };
    let mut rng = common::Rng::fresh("cuda_generate_dist");
    let ps = prompts(&mut rng, &[5], s.v);
    let n = 1024usize;
    let p = GenerateParams {
        max_new_tokens: 1,
        sample: SampleParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.95,
        },
        stop_ids: vec![],
        n_samples: n,
        seed: rng.next_u64(),
    };
    let mut g = generator(&s, &ps, &p, 0);
    let dev = g.generate(&s.graph, &ps, &p).unwrap();
    let z = cpu_logits(&s.dec, &ps[0]);
    let last = &z[(ps[0].len() - 1) * s.v..ps[0].len() * s.v];
    let dist = scpu::filtered_distribution(last, &p.sample).unwrap();
    let mut count = vec![0usize; s.v];
    for d in &dev {
        count[d.tokens[0] as usize] += 1;
    }
    let kept: f64 = dist
        .iter()
        .map(|&(j, _)| count[j as usize] as f64)
        .sum::<f64>()
        / n as f64;
    assert!(kept >= 0.98, "{kept} of the draws in the CPU's top-p set");
    for &(j, q) in dist.iter().take(8) {
        let f = count[j as usize] as f64 / n as f64;
        let bound = 4.0 * (q * (1.0 - q) / n as f64).sqrt() + 0.01;
        assert!(
            (f - q).abs() <= bound,
            "token {j}: frequency {f} vs CPU probability {q} (bound {bound})"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn graph_and_direct_launches_agree() {
    let Some(s) = setup("cuda_generate_graph", "tiny-llama") else {
        return;
    };
    let mut rng = common::Rng::fresh("cuda_generate_graph");
    let ps = prompts(&mut rng, &[3, 8], s.v);
    let p = GenerateParams {
        max_new_tokens: 12,
        sample: SampleParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
        },
        stop_ids: vec![],
        n_samples: 3,
        seed: rng.next_u64(),
    };
    let mut a = generator(&s, &ps, &p, 0);
    let mut b = generator(&s, &ps, &p, 0);
    b.set_use_graph(false);
    let (ga, gb) = (
        a.generate(&s.graph, &ps, &p).unwrap(),
        b.generate(&s.graph, &ps, &p).unwrap(),
    );
    assert_eq!(ga, gb, "graph replay and direct launches");
    // A second call replays the captured graph with a new seed.
    let p2 = GenerateParams {
        seed: p.seed ^ 1,
        ..p.clone()
    };
    assert_eq!(
        a.generate(&s.graph, &ps, &p2).unwrap(),
        b.generate(&s.graph, &ps, &p2).unwrap()
    );
    let (ta, tb) = (a.traffic(), b.traffic());
    assert_graphs_available(&a);
    assert_eq!(
        ta.graph_launches,
        2 * 10,
        "steps 1..=10 of each call: {ta:?}"
    );
    assert_eq!(ta.graph_launches + ta.direct_steps, 2 * 12, "{ta:?}");
    assert_eq!(tb.graph_launches, 0, "{tb:?}");
    // Only token ids (and here the asked-for log-probs) came back.
    let rows = 6u64;
    assert!(
        ta.d2h_bytes <= 2 * (rows * 12 * 12 + rows * 8 + 40 * 4),
        "d2h {ta:?}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn reads_the_live_weights() {
    let Some(mut s) = setup("cuda_generate_live", "tiny-qwen2") else {
        return;
    };
    let mut rng = common::Rng::fresh("cuda_generate_live");
    let ps = prompts(&mut rng, &[4, 7], s.v);
    let p = GenerateParams {
        max_new_tokens: 8,
        sample: SampleParams::greedy(),
        stop_ids: vec![],
        n_samples: 1,
        seed: 3,
    };
    let mut g = generator(&s, &ps, &p, 0);
    let before = g.generate(&s.graph, &ps, &p).unwrap();
    // An update of the policy graph's weights (bf16-exact values, so the CPU sees the same).
    let h = s.dec.config.hidden_size;
    let w: Vec<f32> = (0..h)
        .map(|_| half::bf16::from_f64(rng.range(0.2, 3.0)).to_f32())
        .collect();
    s.graph.set_param("model.norm.weight", &w).unwrap();
    s.dec.set_param_data("model.norm.weight", &w).unwrap();
    let after = g.generate(&s.graph, &ps, &p).unwrap();
    assert_ne!(before, after, "new weights, new tokens");
    let cpu = generate(&s.dec, &ps, &p).unwrap();
    check_greedy("live weights", &s.dec, &ps, &after, &cpu);
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn fewer_prompts_than_capacity_draw_the_same() {
    let Some(s) = setup("cuda_generate_capacity", "tiny-llama") else {
        return;
    };
    let mut rng = common::Rng::fresh("cuda_generate_capacity");
    let ps = prompts(&mut rng, &[5, 2, 7], s.v);
    let p = GenerateParams {
        max_new_tokens: 6,
        sample: SampleParams::default(),
        stop_ids: vec![],
        n_samples: 2,
        seed: rng.next_u64(),
    };
    let mut exact = generator(&s, &ps, &p, 0);
    let mut bigger = generator(&s, &ps, &p, 2);
    assert_eq!(
        exact.generate(&s.graph, &ps, &p).unwrap(),
        bigger.generate(&s.graph, &ps, &p).unwrap(),
        "unused prompt slots change no draw"
    );
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn bad_calls_are_errors() {
    let Some(s) = setup("cuda_generate_bad", "tiny-llama") else {
        return;
    };
    let ps = vec![vec![5u32, 6, 7], vec![8u32]];
    let p = GenerateParams {
        max_new_tokens: 4,
        n_samples: 2,
        ..Default::default()
    };
    let mut g = generator(&s, &ps, &p, 0);
    let err = |g: &mut DeviceGenerator, ps: &[Vec<u32>], p: &GenerateParams| {
        g.generate(&s.graph, ps, p).unwrap_err().to_string()
    };
    assert!(err(&mut g, &[vec![5], vec![]], &p).contains("prompt 1 is empty"));
    let e = err(&mut g, &[vec![5, s.v as u32]], &p);
    assert!(e.contains("not below vocab_size"), "{e}");
    let e = err(&mut g, &[vec![5], vec![6], vec![7]], &p);
    assert!(e.contains("capacity"), "{e}");
    let e = err(&mut g, &[vec![5; 4]], &p);
    assert!(e.contains("capacity"), "{e}");
    let mut q = p.clone();
    q.n_samples = 1;
    assert!(err(&mut g, &ps, &q).contains("capacity"));
    q = p.clone();
    q.sample.top_p = 0.0;
    assert!(err(&mut g, &ps, &q).contains("top_p"));
    let e = DeviceGenerator::new(
        s.dev.clone(),
        &s.dec.config,
        GenCapacity {
            prompts: 1,
            n_samples: 1,
            max_prompt_len: 100,
            max_new_tokens: 100,
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
    // The generator still works after refused calls.
    assert_eq!(g.generate(&s.graph, &ps, &p).unwrap().len(), 4);
}
