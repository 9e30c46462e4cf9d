//! Rollout generation throughput (new tokens/s).
//!
//! - CPU (fp32): the tiny-llama fixture, 4 prompts x 2 samples of 16 prompt tokens, 32 new
//!   tokens each ([`dfpo::model::generate::generate`]).
//! - CUDA (bf16, when a GPU is present): a Qwen2-0.5B-shaped model with random weights (the
//!   shape of benches/model.rs), 8 prompts x 8 samples = 64 rows, 128 prompt tokens, 256 new
//!   tokens each, temperature 1, no stop ids (every row runs to the end): device generation
//!   ([`dfpo::model::generate_cuda`]) with each decode step one CUDA-graph launch
//!   (`rollout_graph`) and with direct launches (`rollout_direct`). Throughput counts new
//!   tokens (64 x 256 = 16384 per iteration); the prefill is inside the time.
//!   `tools/reference/torch_generate_bench.py` times transformers' `generate` with a static KV
//!   cache on the same shape and batch; tools/reference/summarize.py prints the ratio.
//!
//! `cargo bench --bench generate -- --warm-up-time 1 --measurement-time 2`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dfpo::kernels::sample::SampleParams;
use dfpo::model::checkpoint::{expected_tensors, Tensor, TensorMap};
use dfpo::model::config::ModelConfig;
use dfpo::model::decoder::Decoder;
use dfpo::model::generate::{generate, GenerateParams};
use dfpo::model::generate_cuda::{DeviceGenerator, GenCapacity};
use dfpo::Device;

/// The CUDA rollout shape (the same in torch_generate_bench.py).
const PROMPTS: usize = 8;
const SAMPLES: usize = 8;
const PROMPT_LEN: usize = 128;
const NEW_TOKENS: usize = 256;

fn prompts(n: usize, len: usize, v: u32, seed: u64) -> Vec<Vec<u32>> {
    let mut c = seed;
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| {
                    c = c.wrapping_add(1);
                    (dfpo::kernels::splitmix64(c) % v as u64) as u32
                })
                .collect()
        })
        .collect()
}

fn cpu(c: &mut Criterion) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let dec = Decoder::load(dir).unwrap();
    let ps = prompts(4, 16, dec.config.vocab_size as u32, 1);
    let p = GenerateParams {
        max_new_tokens: 32,
        sample: SampleParams::default(),
        stop_ids: vec![],
        n_samples: 2,
        seed: 1,
    };
    println!("cpu: tiny-llama generate, 4 prompts x 2 samples, 16 + 32 tokens");
    let mut grp = c.benchmark_group("generate_cpu");
    grp.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements((4 * 2 * 32) as u64));
    grp.bench_function("tiny_llama_rollout", |b| {
        b.iter(|| generate(&dec, &ps, &p).unwrap())
    });
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
    let cfg = qwen05b_config();
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
    let dec = Decoder::new(cfg, params).unwrap();
    // The policy graph holds the device weights generation reads (its batch shape is unused).
    let graph = dec.build(1, 16, &Device::Cuda(dev.clone())).unwrap();
    let ps = prompts(PROMPTS, PROMPT_LEN, v, 2);
    let cap = GenCapacity {
        prompts: PROMPTS,
        n_samples: SAMPLES,
        max_prompt_len: PROMPT_LEN,
        max_new_tokens: NEW_TOKENS,
    };
    let mut p = GenerateParams {
        max_new_tokens: NEW_TOKENS,
        sample: SampleParams::default(),
        stop_ids: vec![],
        n_samples: SAMPLES,
        seed: 3,
    };
    let rows = PROMPTS * SAMPLES;
    println!(
        "cuda: Qwen2-0.5B shape generate bf16, {PROMPTS} prompts x {SAMPLES} samples = {rows} \
         rows, {PROMPT_LEN} prompt + {NEW_TOKENS} new tokens, temperature 1"
    );
    let mut grp = c.benchmark_group("generate_cuda");
    grp.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements((rows * NEW_TOKENS) as u64));
    for (name, graph_on) in [("rollout_graph", true), ("rollout_direct", false)] {
        let mut g = DeviceGenerator::new(dev.clone(), &dec.config, cap).unwrap();
        g.set_use_graph(graph_on);
        println!(
            "cuda: {name}: {:.2} GB of generation buffers",
            g.device_bytes() as f64 / 1e9
        );
        // generate() downloads the tokens, which synchronises the stream.
        grp.bench_function(name, |b| {
            b.iter(|| {
                p.seed = p.seed.wrapping_add(1);
                let out = g.generate(&graph, &ps, &p).unwrap();
                assert_eq!(out.len(), rows);
                out
            })
        });
        let t = g.traffic();
        println!(
            "cuda: {name}: {} graph launches, {} direct steps, {} B up, {} B down{}",
            t.graph_launches,
            t.direct_steps,
            t.h2d_bytes,
            t.d2h_bytes,
            g.graph_unavailable()
                .map(|e| format!(" (no stream capture: {e})"))
                .unwrap_or_default()
        );
    }
    grp.finish();
}

criterion_group!(benches, cpu, cuda);
criterion_main!(benches);
