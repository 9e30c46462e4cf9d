//! Forward + backward of the whole decoder on the graph runtime (tokens/s).
//!
//! - CPU (fp32): the tiny-llama fixture (2 layers, d = 64) at B = 4, S = 64 (256 tokens).
//! - CUDA (bf16, when a GPU is present): a Qwen2-0.5B-shaped model with random weights
//!   (24 layers, d = 896, I = 4864, 14 q / 2 kv heads of 64, V = 151936, tied) at B = 8, S = 512
//!   (4096 tokens); the same shape is timed in PyTorch eager bf16 by
//!   `tools/reference/torch_model_bench.py`.
//!
//! Each at three graph variants: the default chunked LM head, the unfused head (kept logits,
//! `_unfused_head`) and the chunked head with every layer recomputed (`_recompute`): the ratios
//! are the chunked head's and the recomputation's cost.
//!
//! `cargo bench --bench model -- --warm-up-time 1 --measurement-time 2`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dfpo::model::checkpoint::{expected_tensors, Tensor, TensorMap};
use dfpo::model::config::ModelConfig;
use dfpo::model::decoder::{BuildOptions, Decoder, LmHeadMode};
use dfpo::Device;

fn batch(b: usize, s: usize, v: u32, seed: u64) -> Vec<Vec<u32>> {
    let mut c = seed;
    (0..b)
        .map(|_| {
            (0..s)
                .map(|_| {
                    c = c.wrapping_add(1);
                    (dfpo::kernels::splitmix64(c) % v as u64) as u32
                })
                .collect()
        })
        .collect()
}

/// (bench name suffix, build options) of the three variants.
fn variants() -> [(&'static str, BuildOptions); 3] {
    let d = BuildOptions::default();
    [
        ("", d),
        (
            "_unfused_head",
            BuildOptions {
                lm_head: LmHeadMode::Logits,
                ..d
            },
        ),
        (
            "_recompute",
            BuildOptions {
                recompute_layers: true,
                ..d
            },
        ),
    ]
}

fn cpu(c: &mut Criterion) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let mut dec = Decoder::load(dir).unwrap();
    let (b, s) = (4, 64);
    println!(
        "cpu: tiny-llama fwd+bwd, B = {b}, S = {s} ({} tokens)",
        b * s
    );
    let mut grp = c.benchmark_group("model_cpu");
    grp.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements((b * s) as u64));
    for (suffix, opts) in variants() {
        dec.set_build_options(opts);
        let mut g = dec.build(b, s, &Device::Cpu).unwrap();
        g.set_batch(&batch(b, s, dec.config.vocab_size as u32, 1))
            .unwrap();
        grp.bench_function(format!("tiny_llama_fwd_bwd{suffix}"), |bch| {
            bch.iter(|| g.run().unwrap())
        });
    }
    grp.finish();
}

fn qwen05b_config() -> ModelConfig {
    ModelConfig::from_json_str(
        r#"{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936,
            "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "tie_word_embeddings": true, "hidden_act": "silu"}"#,
        "qwen2-0.5b-shape",
    )
    .unwrap()
}

fn cuda(c: &mut Criterion) {
    // Parsed (and its parameter count printed) on every machine, so a bad config shows here.
    let cfg = qwen05b_config();
    let n_params: usize = expected_tensors(&cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    println!("Qwen2-0.5B shape: {n_params} parameters");
    let Some(dev) = dfpo::device::cuda_device() else {
        println!("cuda: no device, skipped");
        return;
    };
    let mut params = TensorMap::new();
    let mut ctr = 0u64;
    for (name, shape) in expected_tensors(&cfg) {
        let n: usize = shape.iter().product();
        let is_norm = shape.len() == 1 && name.ends_with("norm.weight");
        let data = (0..n)
            .map(|_| {
                ctr = ctr.wrapping_add(1);
                if is_norm {
                    1.0
                } else {
                    (dfpo::kernels::uniform_open(9, ctr) as f32 - 0.5) * 0.04
                }
            })
            .collect();
        params.insert(name, Tensor::new(shape, data).unwrap());
    }
    let v = cfg.vocab_size as u32;
    let mut dec = Decoder::new(cfg, params).unwrap();
    let (b, s) = (8, 512);
    println!(
        "cuda: Qwen2-0.5B shape fwd+bwd bf16, B = {b}, S = {s} ({} tokens)",
        b * s
    );
    let mut grp = c.benchmark_group("model_cuda");
    grp.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements((b * s) as u64));
    for (suffix, opts) in variants() {
        dec.set_build_options(opts);
        // One graph at a time on the card (dropped at the end of the iteration).
        let mut g = dec.build(b, s, &Device::Cuda(dev.clone())).unwrap();
        g.set_batch(&batch(b, s, v, 2)).unwrap();
        // run() reads the loss back, which synchronises the stream.
        grp.bench_function(format!("qwen2_0.5b_fwd_bwd{suffix}"), |bch| {
            bch.iter(|| g.run().unwrap())
        });
    }
    grp.finish();
}

criterion_group!(benches, cpu, cuda);
criterion_main!(benches);
