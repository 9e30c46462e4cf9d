//! Evaluation: generate answers to eval prompts and score them with a [`Checker`].
//!
//! Generation is [`crate::model::generate::generate`] (CPU, KV cache; the trainer generates on
//! the device on CUDA, [`evaluate_with`]) in batches of
//! `opts.batch` prompts, stopping at EOS (the tokenizer's and the config's EOS ids). Greedy
//! decoding takes one answer per prompt; otherwise `pass_k` samples at `temperature`, and a
//! prompt counts as solved when ANY of them is correct (pass@k). `unparsed` is the share of all
//! generated responses from which the checker could extract no answer.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::kernels::sample::SampleParams;
use crate::kernels::splitmix64;
use crate::model::decoder::Decoder;
use crate::model::generate::{generate, GenerateParams, Generation};
use crate::model::tokenizer::Tokenizer;
use crate::task::{encode_prompt, Checker, Example, Verdict};

/// How to evaluate.
#[derive(Clone, Debug)]
pub struct EvalOpts {
    /// Greedy decoding, one answer per prompt (else `pass_k` samples at `temperature`).
    pub greedy: bool,
    pub pass_k: usize,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub seed: u64,
    pub chat_template: bool,
    /// Prompts per generate call.
    pub batch: usize,
    /// Longer prompts keep their last this many tokens (0: no limit).
    pub max_prompt_length: usize,
    /// Stop strings: a response ends with the token that completes one ([`cut_at_stop`]).
    pub stop: Vec<String>,
}

impl Default for EvalOpts {
    fn default() -> Self {
        EvalOpts {
            greedy: true,
            pass_k: 1,
            max_new_tokens: 8,
            temperature: 1.0,
            seed: 0,
            chat_template: false,
            batch: 64,
            max_prompt_length: 0,
            stop: Vec::new(),
        }
    }
}

/// The result of one eval set.
#[derive(Clone, Debug, Serialize)]
pub struct EvalResult {
    pub name: String,
    /// Prompts evaluated.
    pub n: usize,
    /// Share of prompts solved (pass@k when sampling).
    pub accuracy: f64,
    /// Share of responses with no extractable answer.
    pub unparsed: f64,
}

/// What `dfpo-train eval` reports.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub model: String,
    /// What `accuracy` means: "accuracy (greedy)" or "pass@k (temperature T)".
    pub metric: String,
    pub splits: Vec<EvalResult>,
}

impl EvalReport {
    /// The result table for the terminal.
    pub fn table(&self) -> String {
        let mut t = format!(
            "eval | {} | {}\n{:<16} {:>6} {:>10} {:>9}\n",
            self.model, self.metric, "split", "n", "score", "unparsed"
        );
        for r in &self.splits {
            t.push_str(&format!(
                "{:<16} {:>6} {:>9.1}% {:>8.1}%\n",
                r.name,
                r.n,
                100.0 * r.accuracy,
                100.0 * r.unparsed
            ));
        }
        t
    }
}

/// `dfpo-train eval`: `model.policy` on the eval splits of `cfg` (warnings for answers the
/// checker cannot read go to stderr).
pub fn run_command(mut cfg: crate::train::config::TrainConfig) -> Result<EvalReport> {
    // Evaluation needs the policy only: no critic, no reference model.
    cfg.algo.name = crate::train::config::Algo::Grpo;
    cfg.kl.coef = 0.0;
    cfg.rollout.n_samples = cfg.rollout.n_samples.max(2);
    let t = crate::train::trainer::Trainer::new(cfg)?;
    let splits = t.evaluate()?;
    for note in check_unparsed(&splits, 1.0)? {
        eprintln!("dfpo-train: warning: {note}");
    }
    let e = &t.cfg.eval;
    let metric = if e.greedy {
        "accuracy (greedy)".to_string()
    } else {
        format!(
            "pass@{} (temperature {})",
            e.pass_k, t.cfg.rollout.temperature
        )
    };
    Ok(EvalReport {
        model: t.cfg.model.policy.clone(),
        metric,
        splits,
    })
}

/// Warnings for eval results whose responses the checker could not read (above 5%); Err when
/// a split's share exceeds `max_unparsed` (`data.max_unparsed`).
pub fn check_unparsed(results: &[EvalResult], max_unparsed: f64) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    for r in results {
        if r.unparsed <= 0.05 {
            continue;
        }
        let msg = format!(
            "the checker found no answer in {:.1}% of the responses on `{}` (n {}): the \
             accuracy counts them as wrong; check the prompt format and data.checker",
            100.0 * r.unparsed,
            r.name,
            r.n
        );
        if r.unparsed > max_unparsed {
            return Err(Error::Invalid(format!(
                "{msg}. Above data.max_unparsed = {max_unparsed}: stopping before training on a \
                 reward the checker cannot compute (set data.max_unparsed = 1 to train anyway)"
            )));
        }
        notes.push(msg);
    }
    Ok(notes)
}

/// The ids that end a response: the tokenizer's EOS and the config's `eos_token_id`s.
pub fn stop_ids(dec: &Decoder, tok: &Tokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = dec.config.eos_token_ids.clone();
    ids.extend(tok.eos_token_id());
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// How many of the generated `tokens` a response keeps under the stop strings `stop`: up to and
/// including the token whose text completes the first stop string (all when none occurs).
/// Sampling is autoregressive, so this prefix is distributed exactly as if generation had
/// stopped there (vLLM's stop strings, as TRL and verl use them).
pub fn cut_at_stop(tok: &Tokenizer, tokens: &[u32], stop: &[String]) -> Result<usize> {
    let hit = |n: usize| -> Result<bool> {
        let text = tok.decode(&tokens[..n], true)?;
        Ok(stop.iter().any(|s| text.contains(s.as_str())))
    };
    if stop.is_empty() || !hit(tokens.len())? {
        return Ok(tokens.len());
    }
    // The shortest prefix that contains a stop string (containment grows with the prefix).
    let (mut lo, mut hi) = (0, tokens.len());
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if hit(mid)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

/// The response text of generated tokens: a final stop id dropped, special tokens skipped.
pub fn response_text(tok: &Tokenizer, tokens: &[u32], stop: &[u32]) -> Result<String> {
    let body = match tokens.last() {
        Some(t) if stop.contains(t) => &tokens[..tokens.len() - 1],
        _ => tokens,
    };
    tok.decode(body, true)
}

/// Evaluates `dec` on `examples` (see the module doc), generating on the CPU.
pub fn evaluate(
    dec: &Decoder,
    tok: &Tokenizer,
    name: &str,
    examples: &[Example],
    checker: Checker,
    opts: &EvalOpts,
) -> Result<EvalResult> {
    evaluate_with(dec, tok, name, examples, checker, opts, &mut |ps, p| {
        generate(dec, ps, p)
    })
}

/// A generator: prompts and settings in, rows out (prompt-major), as
/// [`crate::model::generate::generate`].
pub type GenerateFn<'a> = dyn FnMut(&[Vec<u32>], &GenerateParams) -> Result<Vec<Generation>> + 'a;

/// [`evaluate`] with the generation done by `gen` (e.g. on the device from a policy graph's
/// weights, [`crate::model::generate_cuda`]); `dec` gives the config's stop ids.
pub fn evaluate_with(
    dec: &Decoder,
    tok: &Tokenizer,
    name: &str,
    examples: &[Example],
    checker: Checker,
    opts: &EvalOpts,
    gen: &mut GenerateFn<'_>,
) -> Result<EvalResult> {
    if opts.batch == 0 || opts.max_new_tokens == 0 {
        return Err(Error::Invalid(format!(
            "evaluate {name}: batch = {} and max_new_tokens = {} must be >= 1",
            opts.batch, opts.max_new_tokens
        )));
    }
    if !opts.greedy && opts.pass_k == 0 {
        return Err(Error::Invalid(format!(
            "evaluate {name}: pass_k must be >= 1"
        )));
    }
    if examples.is_empty() {
        return Err(Error::Invalid(format!("evaluate {name}: no examples")));
    }
    let (k, sample) = if opts.greedy {
        (1, SampleParams::greedy())
    } else {
        (
            opts.pass_k,
            SampleParams {
                temperature: opts.temperature,
                ..SampleParams::default()
            },
        )
    };
    let stop = stop_ids(dec, tok);
    let (mut solved, mut unparsed, mut responses) = (0usize, 0usize, 0usize);
    for (bi, chunk) in examples.chunks(opts.batch).enumerate() {
        let mut prompts = chunk
            .iter()
            .map(|e| encode_prompt(tok, &e.prompt, opts.chat_template))
            .collect::<Result<Vec<_>>>()?;
        if opts.max_prompt_length > 0 {
            for p in prompts.iter_mut() {
                p.drain(..p.len().saturating_sub(opts.max_prompt_length));
            }
        }
        let params = GenerateParams {
            max_new_tokens: opts.max_new_tokens,
            sample,
            stop_ids: stop.clone(),
            n_samples: k,
            seed: splitmix64(opts.seed ^ splitmix64(bi as u64)),
        };
        let gens = gen(&prompts, &params)
            .map_err(|e| Error::Invalid(format!("evaluate {name}: batch {bi}: {e}")))?;
        let mut ok = vec![false; chunk.len()];
        for g in &gens {
            let keep = cut_at_stop(tok, &g.tokens, &opts.stop)?;
            let text = response_text(tok, &g.tokens[..keep], &stop)?;
            responses += 1;
            match checker.check(&text, &chunk[g.prompt_index].answer) {
                Verdict::Correct => ok[g.prompt_index] = true,
                Verdict::Incorrect => {}
                Verdict::Unparsed => unparsed += 1,
            }
        }
        solved += ok.iter().filter(|&&b| b).count();
    }
    Ok(EvalResult {
        name: name.to_string(),
        n: examples.len(),
        accuracy: solved as f64 / examples.len() as f64,
        unparsed: unparsed as f64 / responses as f64,
    })
}
