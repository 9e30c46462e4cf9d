//! CUDA decoder (bf16 weights and activations, fp32 accumulation and parameter gradients)
//! against the CPU fp32 decoder, which tests/decoder_golden.rs ties to transformers.
//!
//! bf16 tolerances: logits |diff| ≤ 3e-2·max|logit| (+2e-2·|want|); log-probs of valid targets
//! |diff| ≤ 5e-2 + 2e-2·|want|; loss relative 2e-2; every parameter gradient: cosine similarity
//! with the CPU gradient ≥ 0.99 and max|diff| ≤ 0.1·max|want|.
//!
//! The CPU side is always the unfused head (readable logits); the CUDA side runs the unfused head,
//! and the chunked LM head (5 rows a chunk over 72 tokens: the last chunk short) with every layer
//! recomputed in the backward.

mod common;

use common::assert_close;
use dfpo::model::decoder::{BuildOptions, Decoder, LmHeadMode};
use dfpo::model::lm_head::LmHeadXent;
use dfpo::Device;

fn max_abs(x: &[f32]) -> f64 {
    x.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()))
}

fn check(model: &str, chunked: bool) {
    let Some(dev) = dfpo::device::cuda_for_test(&format!("cuda_decoder_{model}")) else {
        return;
    };
    let mut dec = Decoder::load(common::fixtures_dir().join(model)).unwrap();
    // A right-padded batch of 3 with lengths 23, 9, 1 over S = 24 (ids from a fresh stream).
    let mut rng = common::Rng::fresh(&format!("cuda_decoder_{model}"));
    let v = dec.config.vocab_size as u64;
    let seqs: Vec<Vec<u32>> = [23usize, 9, 1]
        .iter()
        .map(|&l| (0..l).map(|_| (rng.next_u64() % v) as u32).collect())
        .collect();
    let (b, s) = (3, 24);
    let mut cpu = dec.build_with_logits(b, s, &Device::Cpu).unwrap();
    cpu.set_batch(&seqs).unwrap();
    let want_loss = cpu.run().unwrap();
    let row = LmHeadXent::row_bytes(v as usize, true);
    dec.set_build_options(BuildOptions {
        lm_head: if chunked {
            LmHeadMode::Chunked {
                scratch_bytes: 5 * row + row / 2,
            }
        } else {
            LmHeadMode::Logits
        },
        recompute_layers: chunked,
    });
    let mut gpu = dec.build(b, s, &Device::Cuda(dev.clone())).unwrap();
    gpu.set_batch(&seqs).unwrap();
    let loss = gpu.run().unwrap();
    dev.synchronize().unwrap();

    let vv = v as usize;
    let wl = cpu.logits().unwrap();
    if chunked {
        assert!(gpu.logits().is_err(), "the chunked head has no logits");
    } else {
        let gl = gpu.logits().unwrap();
        let (mut a, mut bb) = (Vec::new(), Vec::new());
        for (i, q) in seqs.iter().enumerate() {
            a.extend_from_slice(&gl[i * s * vv..(i * s + q.len()) * vv]);
            bb.extend_from_slice(&wl[i * s * vv..(i * s + q.len()) * vv]);
        }
        assert_close(
            &format!("{model} logits"),
            &a,
            &bb,
            2e-2,
            3e-2 * max_abs(&bb),
        );
    }
    assert_close(
        &format!("{model} logprobs"),
        &gpu.token_logprobs().unwrap(),
        &cpu.token_logprobs().unwrap(),
        2e-2,
        5e-2,
    );
    let rel = ((loss - want_loss) / want_loss).abs();
    assert!(rel < 2e-2, "{model} loss {loss} want {want_loss}");
    for name in cpu.param_names().map(str::to_string).collect::<Vec<_>>() {
        let (w, g) = (cpu.grad(&name).unwrap(), gpu.grad(&name).unwrap());
        let dot: f64 = w.iter().zip(&g).map(|(&x, &y)| x as f64 * y as f64).sum();
        let nw: f64 = w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let ng: f64 = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (nw * ng).max(1e-30);
        assert!(cos >= 0.99, "{model} d({name}): cosine {cos}");
        assert_close(
            &format!("{model} d({name})"),
            &g,
            &w,
            0.0,
            0.1 * max_abs(&w),
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_tiny_llama_matches_cpu() {
    check("tiny-llama", false);
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_tiny_llama_chunked_head_matches_cpu() {
    check("tiny-llama", true);
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_tiny_qwen2_matches_cpu() {
    check("tiny-qwen2", false);
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_tiny_qwen2_chunked_head_matches_cpu() {
    check("tiny-qwen2", true);
}
