//! Stage 1, the rollout: the step's prompts, their generations (on CUDA on the device from the
//! policy graph's live weights, else on the CPU from the policy's host copy) and the batch's
//! token rows (prompt + response cut at the stop strings, and the response texts).

use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::kernels::sample::SampleParams;
use crate::model::generate::{generate, GenerateParams, Generation};
use crate::model::generate_cuda::DeviceGenerators;
use crate::model::tokenizer::Tokenizer;
use crate::train::config::RolloutConfig;
use crate::train::eval::{cut_at_stop, response_text};
use crate::train::models::Policy;
use crate::train::rollout::{Batch, Stream};

/// Where rollouts and evals generate.
pub struct Generator<'a> {
    pub policy: &'a Policy,
    /// On CUDA: the device generators (`None`: the CPU generates).
    pub device: Option<&'a Mutex<DeviceGenerators>>,
    /// The longest prompt a device generator is sized for (S − rollout.max_new_tokens), so that
    /// one generator serves every call of a run.
    pub prompt_room: usize,
}

impl Generator<'_> {
    pub fn generate(&self, prompts: &[Vec<u32>], gp: &GenerateParams) -> Result<Vec<Generation>> {
        match self.device {
            Some(m) => m
                .lock()
                .map_err(|_| Error::Invalid("device generation: a previous call panicked".into()))?
                .generate(&self.policy.graph, prompts, gp, self.prompt_room),
            None => generate(&self.policy.dec, prompts, gp),
        }
    }
}

/// The prompts of RL step `step` (indices into the `n` training prompts): consecutive slices
/// of a per-epoch permutation, `per_step` of them.
pub fn step_prompts(n: usize, per_step: usize, seed: u64, step: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(per_step);
    let mut pos = step as usize * per_step;
    let mut perm_epoch = usize::MAX;
    let mut perm = Vec::new();
    while out.len() < per_step {
        let (epoch, i) = (pos / n, pos % n);
        if epoch != perm_epoch {
            perm = Stream::new(seed, epoch as u64, "data").permutation(n);
            perm_epoch = epoch;
        }
        out.push(perm[i]);
        pos += 1;
    }
    out
}

/// The rollout's rows before scoring.
pub struct Generated {
    /// Token rows and response texts; the reward fields are empty (filled by the rewards stage).
    pub batch: Batch,
    /// The training prompts of the step: row r answers prompt `prompts[batch.group[r]]`.
    pub prompts: Vec<usize>,
}

/// Generates the rollout of step `step`: `rollout.n_samples` responses to each of the step's
/// prompts (`train_ids`: every training prompt's ids), in rows of length `s`.
#[allow(clippy::too_many_arguments)]
pub fn rollout(
    gen: &Generator,
    rc: &RolloutConfig,
    tok: &Tokenizer,
    stop: &[u32],
    train_ids: &[Vec<u32>],
    s: usize,
    seed: u64,
    step: u64,
) -> Result<Generated> {
    let idx = step_prompts(train_ids.len(), rc.prompts_per_step, seed, step);
    let prompts: Vec<Vec<u32>> = idx.iter().map(|&i| train_ids[i].clone()).collect();
    let gp = GenerateParams {
        max_new_tokens: rc.max_new_tokens,
        sample: SampleParams {
            temperature: rc.temperature,
            top_k: rc.top_k as u32,
            top_p: rc.top_p,
        },
        stop_ids: stop.to_vec(),
        n_samples: rc.n_samples,
        seed: Stream::new(seed, step, "rollout").next_u64(),
    };
    let gens = gen.generate(&prompts, &gp)?;
    let mut b = Batch {
        s,
        ..Default::default()
    };
    for g in &gens {
        let keep = cut_at_stop(tok, &g.tokens, &rc.stop)?;
        let tokens = &g.tokens[..keep];
        let prompt = &prompts[g.prompt_index];
        let mut seq = prompt.clone();
        seq.extend_from_slice(tokens);
        b.prompt_len.push(prompt.len());
        b.response_len.push(tokens.len());
        b.seqs.push(seq);
        b.group.push(g.prompt_index);
        b.texts.push(response_text(tok, tokens, stop)?);
    }
    Ok(Generated {
        batch: b,
        prompts: idx,
    })
}
