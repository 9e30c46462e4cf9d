//! KV-cache generation on the CPU against full re-forwarding through the decoder graph (which
//! tests/decoder_golden.rs ties to transformers).

mod common;

use dfpo::kernels::sample::SampleParams;
use dfpo::model::decoder::Decoder;
use dfpo::model::generate::{generate, GenerateParams};
use dfpo::Device;

fn model(name: &str) -> Decoder {
    Decoder::load(common::fixtures_dir().join(name)).unwrap()
}

/// Log-probs and argmax of the next token after each prefix, by re-running the whole sequence.
fn reforward(dec: &Decoder, seq: &[u32]) -> (Vec<f32>, Vec<u32>) {
    let mut g = dec.build_with_logits(1, seq.len(), &Device::Cpu).unwrap();
    g.set_batch(&[seq.to_vec()]).unwrap();
    g.forward().unwrap();
    let lp = g.token_logprobs().unwrap();
    let logits = g.logits().unwrap();
    let v = dec.config.vocab_size;
    let argmax = (0..seq.len())
        .map(|t| {
            let row = &logits[t * v..(t + 1) * v];
            let mut best = 0;
            for j in 1..v {
                if row[j] > row[best] {
                    best = j;
                }
            }
            best as u32
        })
        .collect();
    (lp, argmax)
}

fn prompts(seed: &str, v: u32) -> Vec<Vec<u32>> {
    let mut rng = common::Rng::fresh(seed);
    [5usize, 1, 11]
        .iter()
        .map(|&l| {
            (0..l)
                .map(|_| 3 + (rng.next_u64() % (v as u64 - 3)) as u32)
                .collect()
        })
        .collect()
}

#[test]
fn greedy_equals_argmax_of_full_reforwarding() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dec = model(name);
        let ps = prompts(name, dec.config.vocab_size as u32);
        let p = GenerateParams {
            max_new_tokens: 9,
            sample: SampleParams::greedy(),
            ..Default::default()
        };
        let gens = generate(&dec, &ps, &p).unwrap();
        assert_eq!(gens.len(), ps.len());
        for g in &gens {
            assert_eq!(g.tokens.len(), 9, "{name}: no stop ids, so max_new_tokens");
            let prompt = &ps[g.prompt_index];
            let full: Vec<u32> = prompt.iter().chain(&g.tokens).copied().collect();
            let (lp, argmax) = reforward(&dec, &full);
            for (j, &t) in g.tokens.iter().enumerate() {
                let at = prompt.len() + j - 1;
                assert_eq!(t, argmax[at], "{name} prompt {}: step {j}", g.prompt_index);
                let d = (g.policy_logprobs[j] - lp[at]).abs();
                assert!(
                    d <= 1e-4 + 1e-4 * lp[at].abs(),
                    "{name}: policy log-prob {} vs re-forward {}",
                    g.policy_logprobs[j],
                    lp[at]
                );
                assert_eq!(g.logprobs[j], 0.0, "greedy: point mass");
            }
        }
    }
}

#[test]
fn sampling_stops_and_reports_policy_logprobs() {
    let dec = model("tiny-llama");
    let ps = prompts("sampling", dec.config.vocab_size as u32);
    let p = GenerateParams {
        max_new_tokens: 12,
        sample: SampleParams::default(),
        n_samples: 3,
        seed: 7,
        ..Default::default()
    };
    let gens = generate(&dec, &ps, &p).unwrap();
    assert_eq!(gens.len(), 9);
    for g in &gens {
        // At temperature 1 without filtering the sampling policy is the model.
        for (a, b) in g.logprobs.iter().zip(&g.policy_logprobs) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        let prompt = &ps[g.prompt_index];
        let full: Vec<u32> = prompt.iter().chain(&g.tokens).copied().collect();
        let (lp, _) = reforward(&dec, &full);
        for j in 0..g.tokens.len() {
            let want = lp[prompt.len() + j - 1];
            assert!((g.policy_logprobs[j] - want).abs() < 1e-4 + 1e-4 * want.abs());
        }
    }
    // Same seed, same rows; the samples of one prompt differ somewhere.
    assert_eq!(generate(&dec, &ps, &p).unwrap(), gens);
    assert!(gens[0].tokens != gens[1].tokens || gens[1].tokens != gens[2].tokens);
    // Stop ids: stop on the first token each row drew above, which must then end every row
    // that drew it at its first step.
    let stop = gens[0].tokens[0];
    let p2 = GenerateParams {
        stop_ids: vec![stop],
        ..p.clone()
    };
    let g2 = generate(&dec, &ps, &p2).unwrap();
    assert!(g2[0].stopped && g2[0].tokens == vec![stop]);
    for g in &g2 {
        assert_eq!(g.stopped, g.tokens.contains(&stop));
        if let Some(i) = g.tokens.iter().position(|&t| t == stop) {
            assert_eq!(i + 1, g.tokens.len(), "nothing after a stop id");
        }
    }
    // Top-k = 1 is greedy in its tokens, with sampling log-prob 0.
    let pk = GenerateParams {
        sample: SampleParams {
            top_k: 1,
            ..SampleParams::default()
        },
        n_samples: 1,
        ..p.clone()
    };
    let gk = generate(&dec, &ps, &pk).unwrap();
    let gg = generate(
        &dec,
        &ps,
        &GenerateParams {
            sample: SampleParams::greedy(),
            ..pk.clone()
        },
    )
    .unwrap();
    for (a, b) in gk.iter().zip(&gg) {
        assert_eq!(a.tokens, b.tokens);
        assert!(a.logprobs.iter().all(|&x| x.abs() < 1e-6));
    }
}

#[test]
fn bad_generation_input_is_an_error() {
    let dec = model("tiny-llama");
    let ok = GenerateParams::default();
    assert!(generate(&dec, &[], &ok).is_err());
    assert!(generate(&dec, &[vec![]], &ok).is_err());
    let e = generate(&dec, &[vec![1, 500]], &ok)
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocab_size"), "{e}");
    let long = GenerateParams {
        max_new_tokens: 1000,
        ..Default::default()
    };
    assert!(generate(&dec, &[vec![1, 2]], &long).is_err());
    let zero = GenerateParams {
        n_samples: 0,
        ..Default::default()
    };
    assert!(generate(&dec, &[vec![1, 2]], &zero).is_err());
    let bad_t = GenerateParams {
        sample: SampleParams {
            temperature: -1.0,
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(generate(&dec, &[vec![1, 2]], &bad_t).is_err());
}
