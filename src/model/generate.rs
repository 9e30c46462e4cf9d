//! Batched KV-cache generation on the CPU (fp32): prefill + decode with decode attention.
//!
//! Every prompt is replicated into `n_samples` rows. One batched prefill runs the prompts
//! (right-padded, causal attention over each row's own length) and fills the per-layer caches
//! `k/v_cache[row][Hkv][max_len][D]`; then each decode step feeds one token per row at
//! position `len` (RoPE at that position, cache write, [`attention::cpu::decode_attention`]).
//! Tokens are drawn by [`sample::cpu::sample`] (temperature, top-k, top-p, greedy at
//! temperature 0) with counter-based randomness (`seed`, the counter advancing by the number of
//! rows each step), so a run is reproducible.
//!
//! Returned per row: the new tokens (a stop id, when hit, is the last token), the log-probs of
//! each token under the SAMPLING policy (the tempered, filtered distribution it was drawn from;
//! 0 for greedy) and under the model (temperature 1, unfiltered).
//!
//! The CUDA path of generation is not implemented: [`generate`] runs on the CPU.

use super::decoder::Decoder;
use crate::error::{Error, Result};
use crate::kernels::sample::{self, SampleParams};
use crate::kernels::{act, attention, embed, norm, rope, Real};

/// Generation settings.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    /// Maximum number of new tokens per row (≥ 1).
    pub max_new_tokens: usize,
    pub sample: SampleParams,
    /// A row stops after emitting any of these.
    pub stop_ids: Vec<u32>,
    /// Rows per prompt (≥ 1).
    pub n_samples: usize,
    pub seed: u64,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_new_tokens: 32,
            sample: SampleParams::default(),
            stop_ids: Vec::new(),
            n_samples: 1,
            seed: 0,
        }
    }
}

/// One generated row.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub prompt_index: usize,
    pub sample_index: usize,
    pub tokens: Vec<u32>,
    /// log-prob of each token under the sampling policy.
    pub logprobs: Vec<f32>,
    /// log-prob of each token under the model (temperature 1, no filtering).
    pub policy_logprobs: Vec<f32>,
    /// Whether the row ended on a stop id (else it hit `max_new_tokens`).
    pub stopped: bool,
}

struct Layer<'a> {
    ln1: &'a [f32],
    wq: &'a [f32],
    wk: &'a [f32],
    wv: &'a [f32],
    bq: Option<&'a [f32]>,
    bk: Option<&'a [f32]>,
    bv: Option<&'a [f32]>,
    wo: &'a [f32],
    bo: Option<&'a [f32]>,
    ln2: &'a [f32],
    wg: &'a [f32],
    wu: &'a [f32],
    wd: &'a [f32],
}

fn linear(x: &[f32], w: &[f32], b: Option<&[f32]>, n: usize, din: usize, dout: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; n * dout];
    if let Some(b) = b {
        for row in y.chunks_exact_mut(dout) {
            row.copy_from_slice(b);
        }
    }
    f32::gemm(n, din, dout, 1.0, x, false, w, true, 1.0, &mut y);
    y
}

/// How attention sees the tokens of one forward call.
enum Mode<'a> {
    /// `[R][S]` right-padded prompts of these lengths; caches get positions `0..len`.
    Prefill { s: usize, lens: &'a [u32] },
    /// One token per row at position `pos[row]`.
    Decode { pos: &'a [u32] },
}

struct Cache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    max_len: usize,
}

/// Runs the decoder over `ids` (`n` tokens, layout by `mode`) and returns the final hidden
/// states `[n][H]` (after the final norm); writes the caches.
fn forward(
    dec: &Decoder,
    ids: &[u32],
    rows: usize,
    mode: &Mode,
    cache: &mut Cache,
) -> Result<Vec<f32>> {
    let c = &dec.config;
    let pm = dec.params();
    let get = |name: &str| -> Result<&[f32]> {
        pm.get(name)
            .map(|t| t.data.as_slice())
            .ok_or_else(|| Error::Invalid(format!("generate: missing parameter {name}")))
    };
    let (h, qd, kvd, ff, v) = (
        c.hidden_size,
        c.q_dim(),
        c.kv_dim(),
        c.intermediate_size,
        c.vocab_size,
    );
    let (hq, hkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let eps = c.rms_norm_eps as f32;
    let theta = c.rope_theta as f32;
    let n = ids.len();
    let pos: Vec<i32> = match mode {
        Mode::Prefill { s, .. } => (0..n).map(|i| (i % s) as i32).collect(),
        Mode::Decode { pos } => pos.iter().map(|&p| p as i32).collect(),
    };
    let mut x = vec![0.0f32; n * h];
    embed::cpu::embed_fwd(ids, get("model.embed_tokens.weight")?, v, h, &mut x)?;
    let mut rstd = vec![0.0f32; n];
    let scale = attention::softmax_scale(hd);
    let ml = cache.max_len;
    for l in 0..c.num_hidden_layers {
        let pn = |s: &str| format!("model.layers.{l}.{s}");
        let opt = |s: &str| -> Option<&[f32]> { pm.get(&pn(s)).map(|t| t.data.as_slice()) };
        let ly = Layer {
            ln1: get(&pn("input_layernorm.weight"))?,
            wq: get(&pn("self_attn.q_proj.weight"))?,
            wk: get(&pn("self_attn.k_proj.weight"))?,
            wv: get(&pn("self_attn.v_proj.weight"))?,
            bq: opt("self_attn.q_proj.bias"),
            bk: opt("self_attn.k_proj.bias"),
            bv: opt("self_attn.v_proj.bias"),
            wo: get(&pn("self_attn.o_proj.weight"))?,
            bo: opt("self_attn.o_proj.bias"),
            ln2: get(&pn("post_attention_layernorm.weight"))?,
            wg: get(&pn("mlp.gate_proj.weight"))?,
            wu: get(&pn("mlp.up_proj.weight"))?,
            wd: get(&pn("mlp.down_proj.weight"))?,
        };
        let mut a = vec![0.0f32; n * h];
        norm::cpu::rmsnorm_fwd(&x, ly.ln1, n, h, eps, &mut a, &mut rstd)?;
        let mut q = linear(&a, ly.wq, ly.bq, n, h, qd);
        let mut k = linear(&a, ly.wk, ly.bk, n, h, kvd);
        let vv = linear(&a, ly.wv, ly.bv, n, h, kvd);
        rope::cpu::rope_fwd(&mut q, &mut k, &pos, n, hq, hkv, hd, theta)?;
        // Cache writes: token t of row r at position pos[t].
        let (kc, vc) = (&mut cache.k[l], &mut cache.v[l]);
        let row_of = |t: usize| match mode {
            Mode::Prefill { s, .. } => t / s,
            Mode::Decode { .. } => t,
        };
        for t in 0..n {
            let (r, p) = (row_of(t), pos[t] as usize);
            let valid = match mode {
                Mode::Prefill { lens, .. } => p < lens[r] as usize,
                Mode::Decode { .. } => true,
            };
            if !valid {
                continue;
            }
            if p >= ml {
                return Err(Error::Invalid(format!(
                    "generate: position {p} beyond the cache of {ml}"
                )));
            }
            for g in 0..hkv {
                let dst = ((r * hkv + g) * ml + p) * hd;
                kc[dst..dst + hd].copy_from_slice(&k[(t * hkv + g) * hd..(t * hkv + g + 1) * hd]);
                vc[dst..dst + hd].copy_from_slice(&vv[(t * hkv + g) * hd..(t * hkv + g + 1) * hd]);
            }
        }
        let mut o = vec![0.0f32; n * qd];
        match mode {
            Mode::Prefill { s, lens } => {
                let mut lse = vec![0.0f32; rows * hq * s];
                attention::cpu::attention_forward(
                    &q, &k, &vv, lens, rows, *s, hq, hkv, hd, scale, &mut o, &mut lse,
                )?;
            }
            Mode::Decode { pos } => {
                let lens: Vec<u32> = pos.iter().map(|&p| p + 1).collect();
                attention::cpu::decode_attention(
                    &q, kc, vc, &lens, rows, hq, hkv, ml, hd, scale, &mut o,
                )?;
            }
        }
        let ao = linear(&o, ly.wo, ly.bo, n, qd, h);
        for (xi, ai) in x.iter_mut().zip(&ao) {
            *xi += ai;
        }
        norm::cpu::rmsnorm_fwd(&x, ly.ln2, n, h, eps, &mut a, &mut rstd)?;
        let g = linear(&a, ly.wg, None, n, h, ff);
        let u = linear(&a, ly.wu, None, n, h, ff);
        let mut gu = vec![0.0f32; n * 2 * ff];
        for r in 0..n {
            gu[r * 2 * ff..r * 2 * ff + ff].copy_from_slice(&g[r * ff..(r + 1) * ff]);
            gu[r * 2 * ff + ff..(r + 1) * 2 * ff].copy_from_slice(&u[r * ff..(r + 1) * ff]);
        }
        let mut sw = vec![0.0f32; n * ff];
        act::cpu::swiglu_fwd(&gu, n, ff, &mut sw)?;
        let m = linear(&sw, ly.wd, None, n, ff, h);
        for (xi, mi) in x.iter_mut().zip(&m) {
            *xi += mi;
        }
    }
    let mut y = vec![0.0f32; n * h];
    norm::cpu::rmsnorm_fwd(&x, get("model.norm.weight")?, n, h, eps, &mut y, &mut rstd)?;
    Ok(y)
}

fn lm_head(dec: &Decoder, hidden: &[f32], n: usize) -> Result<Vec<f32>> {
    let c = &dec.config;
    let name = if c.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    let w = &dec
        .params()
        .get(name)
        .ok_or_else(|| Error::Invalid(format!("generate: missing parameter {name}")))?
        .data;
    Ok(linear(hidden, w, None, n, c.hidden_size, c.vocab_size))
}

/// Generates continuations of `prompts` (token ids) with `dec` on the CPU; returns
/// `prompts.len() · n_samples` rows, prompt-major.
pub fn generate(
    dec: &Decoder,
    prompts: &[Vec<u32>],
    p: &GenerateParams,
) -> Result<Vec<Generation>> {
    p.sample.validate()?;
    let c = &dec.config;
    let v = c.vocab_size;
    if p.max_new_tokens == 0 || p.n_samples == 0 {
        return Err(Error::Invalid(format!(
            "generate: max_new_tokens = {} and n_samples = {} must be >= 1",
            p.max_new_tokens, p.n_samples
        )));
    }
    if prompts.is_empty() {
        return Err(Error::Invalid("generate: no prompts".into()));
    }
    for (i, q) in prompts.iter().enumerate() {
        if q.is_empty() {
            return Err(Error::Invalid(format!("generate: prompt {i} is empty")));
        }
        if let Some(j) = q.iter().position(|&t| t as usize >= v) {
            return Err(Error::Invalid(format!(
                "generate: prompt {i} token {j} = {} is not below vocab_size {v}",
                q[j]
            )));
        }
    }
    let s = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let max_len = s + p.max_new_tokens;
    if max_len > c.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "generate: prompt length {s} + max_new_tokens {} exceeds max_position_embeddings {}",
            p.max_new_tokens, c.max_position_embeddings
        )));
    }
    let rows = prompts.len() * p.n_samples;
    let (hkv, hd) = (c.num_key_value_heads, c.head_dim);
    let mut cache = Cache {
        k: vec![vec![0.0; rows * hkv * max_len * hd]; c.num_hidden_layers],
        v: vec![vec![0.0; rows * hkv * max_len * hd]; c.num_hidden_layers],
        max_len,
    };
    let pad = c.pad_token_id.unwrap_or(0).min(v as u32 - 1);
    let mut ids = vec![pad; rows * s];
    let mut lens = vec![0u32; rows];
    for r in 0..rows {
        let q = &prompts[r / p.n_samples];
        ids[r * s..r * s + q.len()].copy_from_slice(q);
        lens[r] = q.len() as u32;
    }
    let hidden = forward(
        dec,
        &ids,
        rows,
        &Mode::Prefill { s, lens: &lens },
        &mut cache,
    )?;
    // Hidden state of each row's last prompt token.
    let h = c.hidden_size;
    let mut last = vec![0.0f32; rows * h];
    for r in 0..rows {
        let t = r * s + lens[r] as usize - 1;
        last[r * h..(r + 1) * h].copy_from_slice(&hidden[t * h..(t + 1) * h]);
    }
    let mut logits = lm_head(dec, &last, rows)?;
    let mut out: Vec<Generation> = (0..rows)
        .map(|r| Generation {
            prompt_index: r / p.n_samples,
            sample_index: r % p.n_samples,
            tokens: Vec::new(),
            logprobs: Vec::new(),
            policy_logprobs: Vec::new(),
            stopped: false,
        })
        .collect();
    let mut counter = 0u64;
    let (mut tok, mut lps, mut lpp) = (vec![0u32; rows], vec![0.0f32; rows], vec![0.0f32; rows]);
    for step in 0..p.max_new_tokens {
        sample::cpu::sample(
            &logits, rows, v, &p.sample, p.seed, counter, &mut tok, &mut lps, &mut lpp, None,
        )?;
        counter = counter.wrapping_add(rows as u64);
        let mut active = false;
        for (r, g) in out.iter_mut().enumerate() {
            if g.stopped || g.tokens.len() > step {
                continue;
            }
            g.tokens.push(tok[r]);
            g.logprobs.push(lps[r]);
            g.policy_logprobs.push(lpp[r]);
            if p.stop_ids.contains(&tok[r]) {
                g.stopped = true;
            } else {
                active = true;
            }
        }
        if !active || step + 1 == p.max_new_tokens {
            break;
        }
        // Decode one token per row (finished rows keep decoding their last token into unused
        // cache slots; their results are ignored).
        let pos: Vec<u32> = (0..rows)
            .map(|r| lens[r] + out[r].tokens.len() as u32 - 1)
            .collect();
        let last_tok: Vec<u32> = out.iter().map(|g| *g.tokens.last().unwrap()).collect();
        let hid = forward(
            dec,
            &last_tok,
            rows,
            &Mode::Decode { pos: &pos },
            &mut cache,
        )?;
        logits = lm_head(dec, &hid, rows)?;
    }
    Ok(out)
}
