//! Random initialisation of a decoder, as transformers' `LlamaPreTrainedModel._init_weights`
//! does it: every matrix (embeddings, projections, lm_head) drawn from normal(0, 0.02), RMSNorm
//! weights 1, biases 0. Deterministic per seed (splitmix64 + xorshift64*, Box-Muller), so a
//! warm start made from `random_decoder(cfg, seed)` is reproducible bit for bit.

use super::checkpoint::{expected_tensors, Tensor, TensorMap};
use super::config::ModelConfig;
use super::decoder::Decoder;
use crate::error::Result;

/// Standard deviation of the matrices (HF `initializer_range` default).
pub const INIT_STD: f64 = 0.02;

/// xorshift64* seeded through splitmix64: small, deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(crate::kernels::splitmix64(seed) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    /// Uniform in (0, 1).
    fn uniform_open(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / 9007199254740992.0)
    }
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform_open();
        let u2 = self.uniform_open();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// The parameters of `config`, initialised as described in the module doc.
pub fn random_params(config: &ModelConfig, seed: u64) -> Result<TensorMap> {
    config.validate("random_decoder config")?;
    let mut rng = Rng::new(seed);
    let mut out = TensorMap::new();
    for (name, shape) in expected_tensors(config) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| (rng.normal() * INIT_STD) as f32).collect()
        };
        out.insert(name, Tensor::new(shape, data)?);
    }
    Ok(out)
}

/// A decoder of `config` with freshly initialised parameters (see the module doc).
pub fn random_decoder(config: ModelConfig, seed: u64) -> Result<Decoder> {
    let params = random_params(&config, seed)?;
    Decoder::new(config, params)
}
