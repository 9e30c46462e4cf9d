//! `dfpo-train score`: per-token log-probs of responses given prompts.
//!
//! Input: JSONL, one object per line with string fields `"prompt"` and `"response"` (other
//! fields are ignored; blank lines are skipped). Tokenisation: the prompt is encoded WITH the
//! tokenizer's special tokens (e.g. a BOS), the response WITHOUT, and the two id lists are
//! concatenated — so the response's tokens are exactly `encode(response)` whatever the prompt
//! ends with (no merge across the boundary; this is what a sampler that generated the response
//! after the prompt sees). The prompt must encode to at least one token, the response too.
//!
//! Output: JSONL, one line per input record in order:
//! `{"line": L, "prompt_tokens": P, "response_ids": [...], "logprobs": [...], "sum": S}` where
//! `logprobs[j] = log p(response_ids[j] | prompt, response_ids[..j])` (natural log, temperature
//! 1, fp32 on the CPU) and `sum` their sum. Written atomically (temp file + rename).
//!
//! Batching: records are scored `--batch` at a time in a right-padded forward-only pass of the
//! decoder graph; graphs are cached per padded length (a multiple of 16).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::checkpoint::write_atomic;
use super::decoder::{Decoder, DecoderGraph};
use super::tokenizer::Tokenizer;
use crate::device::Device;
use crate::error::{Error, Result};

/// Settings of `dfpo-train score` (the `[score]` section of the configuration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreArgs {
    /// "builtin" (the shipped warm start) or a Hugging Face model folder (config.json,
    /// safetensors, tokenizer.json).
    pub model: PathBuf,
    /// Input JSONL with "prompt" and "response" string fields.
    pub data: PathBuf,
    /// Output JSONL (written atomically): a new file, or an existing one with `overwrite`;
    /// never the input.
    pub out: PathBuf,
    /// Replace an existing `out`.
    pub overwrite: bool,
    /// Records per forward pass.
    pub batch: usize,
    /// cpu, cuda or auto (CUDA when present).
    pub device: String,
}

impl Default for ScoreArgs {
    fn default() -> Self {
        ScoreArgs {
            model: PathBuf::from(super::builtin::BUILTIN),
            data: PathBuf::new(),
            out: PathBuf::new(),
            overwrite: false,
            batch: 8,
            device: "auto".into(),
        }
    }
}

/// Checks `args.out` before any work: named, not the input, and new unless `overwrite`.
fn check_out(args: &ScoreArgs) -> Result<()> {
    let bad = |msg: String| Err(Error::Invalid(msg));
    if args.data.as_os_str().is_empty() || args.out.as_os_str().is_empty() {
        return bad("score needs score.data (--data) and score.out (--out)".into());
    }
    let same = match (args.data.canonicalize(), args.out.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return bad(format!(
            "score.out (--out) {} is the input score.data: choose another output file",
            args.out.display()
        ));
    }
    if args.out.is_dir() {
        return bad(format!(
            "score.out (--out) {} is a folder; the output is a JSONL file",
            args.out.display()
        ));
    }
    if args.out.exists() && !args.overwrite {
        return bad(format!(
            "score.out (--out) {} exists: choose a new file, or --overwrite to replace it",
            args.out.display()
        ));
    }
    Ok(())
}

/// One scored record.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    /// 1-based line number in the input file.
    pub line: usize,
    pub prompt_tokens: usize,
    pub response_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub sum: f64,
}

/// Resolves a device setting; `key` names it in errors (`run.device`, `score.device`, ...).
pub fn parse_device(key: &str, s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => crate::device::cuda_device()
            .map(Device::Cuda)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{key} = cuda: no CUDA device ({})",
                    crate::device::cuda_unavailable_reason()
                ))
            }),
        "auto" => Device::best(),
        other => Err(Error::Invalid(format!(
            "{key} = {other:?}: expected cpu, cuda or auto"
        ))),
    }
}

/// Reads the JSONL records: (line number, prompt, response).
pub fn read_records(path: &std::path::Path) -> Result<Vec<(usize, String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let ln = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| Error::Format {
            path: path.display().to_string(),
            msg: format!("line {ln}: {msg}"),
        };
        let v: Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let field = |name: &str| -> Result<String> {
            match v.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(bad(format!("field \"{name}\" is not a string"))),
                None => Err(bad(format!("field \"{name}\" is missing"))),
            }
        };
        if !v.is_object() {
            return Err(bad("not a JSON object".into()));
        }
        out.push((ln, field("prompt")?, field("response")?));
    }
    Ok(out)
}

/// Scores the records of `args.data` (see the module doc) and returns them.
pub fn score(args: &ScoreArgs) -> Result<Vec<Scored>> {
    if args.batch == 0 {
        return Err(Error::Invalid("score.batch must be at least 1".into()));
    }
    let device = parse_device("score.device", &args.device)?;
    let model = super::builtin::model_dir(&args.model.to_string_lossy())?;
    let dec = Decoder::load(&model)?;
    let tok = Tokenizer::from_dir(&model)?;
    let recs = read_records(&args.data)?;
    let dpath = args.data.display().to_string();
    let mut items = Vec::with_capacity(recs.len());
    for (ln, p, r) in &recs {
        let bad = |field: &str, msg: &str| Error::Format {
            path: dpath.clone(),
            msg: format!("line {ln}: field \"{field}\" {msg}"),
        };
        let pi = tok.encode(p, true)?;
        let ri = tok.encode(r, false)?;
        if pi.is_empty() {
            return Err(bad("prompt", "encodes to no tokens"));
        }
        if ri.is_empty() {
            return Err(bad("response", "encodes to no tokens"));
        }
        let total = pi.len() + ri.len();
        if total > dec.config.max_position_embeddings {
            return Err(bad(
                "response",
                &format!(
                    "with the prompt is {total} tokens, above max_position_embeddings {}",
                    dec.config.max_position_embeddings
                ),
            ));
        }
        items.push((*ln, pi, ri));
    }
    let mut graphs: HashMap<usize, DecoderGraph> = HashMap::new();
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(args.batch) {
        let seqs: Vec<Vec<u32>> = chunk
            .iter()
            .map(|(_, p, r)| p.iter().chain(r).copied().collect())
            .collect();
        let s = seqs.iter().map(Vec::len).max().unwrap_or(1).div_ceil(16) * 16;
        let g = match graphs.entry(s) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(dec.build(args.batch, s, &device)?)
            }
        };
        g.set_batch(&seqs)?;
        g.forward()?;
        let lp = g.token_logprobs()?;
        for (b, (ln, p, r)) in chunk.iter().enumerate() {
            let lps: Vec<f32> = (0..r.len()).map(|j| lp[b * s + p.len() + j - 1]).collect();
            let sum = lps.iter().map(|&x| x as f64).sum();
            out.push(Scored {
                line: *ln,
                prompt_tokens: p.len(),
                response_ids: r.clone(),
                logprobs: lps,
                sum,
            });
        }
    }
    Ok(out)
}

/// `dfpo-train score`: [`score`], then the JSONL output written atomically.
pub fn run(args: &ScoreArgs) -> Result<usize> {
    check_out(args)?;
    let scored = score(args)?;
    write_atomic(&args.out, |w: &mut dyn Write| {
        for s in &scored {
            let v = json!({
                "line": s.line,
                "prompt_tokens": s.prompt_tokens,
                "response_ids": s.response_ids,
                "logprobs": s.logprobs,
                "sum": s.sum,
            });
            writeln!(w, "{v}")?;
        }
        Ok(())
    })?;
    Ok(scored.len())
}
