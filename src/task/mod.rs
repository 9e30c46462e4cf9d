//! Tasks: prompts with verifiable answers, answer checkers, and where the data comes from.
//!
//! - [`arith`]: the built-in arithmetic task (in-domain / out-of-domain splits, its tokenizer and
//!   tiny model config).
//! - [`dataset`]: JSONL `{"prompt", "answer"}` files.
//! - [`checkers`]: answer extraction and comparison for the arith, GSM8K and MATH formats.
//!
//! [`load_task`] resolves a [`DataConfig`] into training prompts, named eval sets and a checker.

pub mod arith;
pub mod chain;
pub mod checkers;
pub mod dataset;

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::tokenizer::{ChatMessage, Tokenizer};
use crate::train::config::DataConfig;

/// One prompt with its reference answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub prompt: String,
    pub answer: String,
}

/// The outcome of checking one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Correct,
    Incorrect,
    /// No final answer could be extracted from the response.
    Unparsed,
}

/// How a response's final answer is found and compared (see [`checkers`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checker {
    /// The leading integer of the response (spaces ignored), compared exactly.
    Arith,
    /// The number after the last `####` (commas, `$`, a trailing `.` removed).
    Gsm8k,
    /// The content of the last `\boxed{...}`, normalised.
    Math,
    /// The integer after the last `=` (the built-in chain task's scratchpad).
    Chain,
}

impl Checker {
    /// "arith" | "gsm8k" | "math".
    pub fn parse(name: &str) -> Result<Checker> {
        match name {
            "arith" => Ok(Checker::Arith),
            "gsm8k" => Ok(Checker::Gsm8k),
            "math" => Ok(Checker::Math),
            "chain" => Ok(Checker::Chain),
            other => Err(Error::Invalid(format!(
                "data.checker = \"{other}\": expected \"arith\", \"gsm8k\", \"math\" or \"chain\""
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Checker::Arith => "arith",
            Checker::Gsm8k => "gsm8k",
            Checker::Math => "math",
            Checker::Chain => "chain",
        }
    }

    /// The final answer `response` gives, normalised; None when there is none.
    pub fn extract(&self, response: &str) -> Option<String> {
        match self {
            Checker::Arith => checkers::arith_extract(response),
            Checker::Gsm8k => checkers::gsm8k_extract(response),
            Checker::Math => checkers::math_extract(response),
            Checker::Chain => checkers::chain_extract(response),
        }
    }

    /// The reference answer of a dataset line, normalised the same way (a GSM8K reference may
    /// be a full solution ending in `#### n`, a MATH one may hold a `\boxed{}`).
    pub fn reference(&self, answer: &str) -> String {
        self.parse_reference(answer)
            .unwrap_or_else(|| answer.trim().to_string())
    }

    /// [`reference`](Self::reference), or None when this checker cannot read the answer (e.g.
    /// `arith` on a `#### n` solution): no response can ever match it.
    pub fn parse_reference(&self, answer: &str) -> Option<String> {
        match self {
            Checker::Arith => checkers::arith_extract(answer),
            Checker::Chain => checkers::chain_extract(answer),
            Checker::Gsm8k => {
                checkers::gsm8k_extract(answer).or_else(|| checkers::gsm8k_normalise(answer))
            }
            Checker::Math => checkers::math_extract(answer)
                .or_else(|| Some(checkers::math_normalise(answer)))
                .filter(|s| !s.is_empty()),
        }
    }

    /// Compares the response's final answer with the reference `answer`.
    pub fn check(&self, response: &str, answer: &str) -> Verdict {
        let Some(got) = self.extract(response) else {
            return Verdict::Unparsed;
        };
        if checkers::same_answer(&got, &self.reference(answer)) {
            Verdict::Correct
        } else {
            Verdict::Incorrect
        }
    }
}

impl Checker {
    /// Whether `response` has the right shape for `prompt` whatever its answer (the "flawed
    /// verifier" noise model gives partial credit to a wrong answer of the right shape): chain,
    /// a full scratchpad ([`checkers::chain_shape`]); the others, a readable final answer.
    pub fn right_shape(&self, response: &str, prompt: &str) -> bool {
        match self {
            Checker::Chain => checkers::chain_shape(response, prompt),
            _ => self.extract(response).is_some(),
        }
    }
}

/// Whether the first integer of `prompt` is odd (the subset of the state-dependent noise model;
/// false when the prompt holds no digit).
pub fn first_operand_odd(prompt: &str) -> bool {
    let digits: String = prompt
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.bytes().last().is_some_and(|d| (d - b'0') % 2 == 1)
}

/// What a run trains and evaluates on.
#[derive(Clone, Debug)]
pub struct TaskData {
    pub train: Vec<Example>,
    /// Named eval sets, in a fixed order.
    pub evals: Vec<(String, Vec<Example>)>,
    pub checker: Checker,
}

/// Built-in ("arith": splits "in_domain", "out_of_domain", `eval_size` each, or with `eval_size`
/// 0 the whole held-out in-domain pool's size each; train = every in-domain training prompt,
/// disjoint from the eval prompts, in a seed-determined order) or JSONL (`train_file`,
/// `eval_files` "name=path"; `eval_size` > 0 keeps the first `eval_size` of each).
pub fn load_task(cfg: &DataConfig, seed: u64) -> Result<TaskData> {
    let checker = Checker::parse(&cfg.checker)?;
    match cfg.task.as_str() {
        "arith" => {
            if checker != Checker::Arith {
                return Err(Error::Invalid(format!(
                    "data.checker = \"{}\": the built-in arith task needs \"arith\"",
                    cfg.checker
                )));
            }
            let n = if cfg.eval_size == 0 {
                arith::in_domain_pool_size()
            } else {
                cfg.eval_size
            };
            Ok(TaskData {
                train: arith::train_examples(arith::train_pool_size(), seed),
                evals: vec![
                    ("in_domain".into(), arith::in_domain(n, seed)),
                    ("out_of_domain".into(), arith::out_of_domain(n, seed)),
                ],
                checker,
            })
        }
        "chain" => {
            // The task's own checker; the default ("arith") names it too.
            if !matches!(checker, Checker::Chain | Checker::Arith) {
                return Err(Error::Invalid(format!(
                    "data.checker = \"{}\": the built-in chain task needs \"chain\"",
                    cfg.checker
                )));
            }
            let pool = |full: usize| {
                if cfg.eval_size == 0 {
                    full
                } else {
                    cfg.eval_size.min(full)
                }
            };
            Ok(TaskData {
                train: chain::train_examples(chain::TRAIN_POOL, seed),
                evals: vec![
                    (
                        "in_domain".into(),
                        chain::in_domain(pool(chain::IN_DOMAIN_POOL)),
                    ),
                    (
                        "out_of_domain".into(),
                        chain::out_of_domain(pool(chain::OUT_OF_DOMAIN_POOL)),
                    ),
                    (
                        "validation".into(),
                        chain::validation(pool(chain::VALIDATION_POOL)),
                    ),
                ],
                checker: Checker::Chain,
            })
        }
        "jsonl" => {
            if cfg.train_file.is_empty() {
                return Err(Error::Invalid(
                    "data.task = \"jsonl\" needs data.train_file (a JSONL of {\"prompt\",\"answer\"})"
                        .into(),
                ));
            }
            let read = |p: &str| {
                dataset::read_jsonl_fields(Path::new(p), &cfg.prompt_key, &cfg.answer_key)
            };
            let train = read(&cfg.train_file)?;
            let mut evals: Vec<(String, Vec<Example>)> = Vec::new();
            for spec in &cfg.eval_files {
                let (name, path) = parse_eval_spec(spec)?;
                if evals.iter().any(|(n, _)| *n == name) {
                    return Err(Error::Invalid(format!(
                        "data.eval_files: the name \"{name}\" is used twice"
                    )));
                }
                let mut ex = read(&path)?;
                if cfg.eval_size > 0 {
                    ex.truncate(cfg.eval_size);
                }
                evals.push((name, ex));
            }
            Ok(TaskData {
                train,
                evals,
                checker,
            })
        }
        other => Err(Error::Invalid(format!(
            "data.task = \"{other}\": expected \"arith\", \"chain\" or \"jsonl\""
        ))),
    }
}

/// What a data set does not say by itself: reference answers the checker cannot read (per
/// split), and prompt characters the tokenizer maps to its unknown token. Returns the warnings
/// to log; Err when a split's unreadable references exceed `max_unparsed` (a share).
pub fn data_report(task: &TaskData, tok: &Tokenizer, max_unparsed: f64) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let c = task.checker;
    let splits = std::iter::once(("train", &task.train))
        .chain(task.evals.iter().map(|(n, e)| (n.as_str(), e)));
    for (name, ex) in splits {
        let bad: Vec<&Example> = ex
            .iter()
            .filter(|e| c.parse_reference(&e.answer).is_none())
            .collect();
        if bad.is_empty() {
            continue;
        }
        let frac = bad.len() as f64 / ex.len().max(1) as f64;
        let msg = format!(
            "the {} checker cannot read {} of {} reference answers of `{name}` ({:.1}%; e.g. \
             {:?}): those prompts can never be scored correct (is data.checker right? gsm8k \
             reads `#### n`, math `\\boxed{{}}`)",
            c.as_str(),
            bad.len(),
            ex.len(),
            100.0 * frac,
            bad[0].answer
        );
        if frac > max_unparsed {
            return Err(Error::Invalid(format!(
                "{msg}; above data.max_unparsed = {max_unparsed}"
            )));
        }
        notes.push(msg);
    }
    let prompts = task
        .train
        .iter()
        .chain(task.evals.iter().flat_map(|(_, e)| e.iter()))
        .map(|e| e.prompt.as_str());
    if let Some(u) = unknown_chars(tok, prompts)?.report("prompts") {
        notes.push(u);
    }
    Ok(notes)
}

/// Texts with characters the tokenizer maps to its unknown token.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UnknownChars {
    pub texts: usize,
    /// Texts with at least one unknown character.
    pub affected: usize,
    /// The unknown characters with their counts, most frequent first.
    pub chars: Vec<(char, usize)>,
}

impl UnknownChars {
    /// One line for the log, or None when every character is known.
    pub fn report(&self, what: &str) -> Option<String> {
        if self.affected == 0 {
            return None;
        }
        let shown: Vec<String> = self
            .chars
            .iter()
            .take(10)
            .map(|(c, n)| format!("{c:?} x{n}"))
            .collect();
        Some(format!(
            "{} of {} {what} contain characters the tokenizer does not know (each becomes its \
             unknown token): {}{}",
            self.affected,
            self.texts,
            shown.join(", "),
            if self.chars.len() > 10 { ", ..." } else { "" }
        ))
    }
}

/// Counts the characters of `texts` that the tokenizer encodes to its unknown token (none when
/// it names no `unk_token`, e.g. byte-level BPE, which knows every character).
pub fn unknown_chars<'a>(
    tok: &Tokenizer,
    texts: impl IntoIterator<Item = &'a str>,
) -> Result<UnknownChars> {
    let unk = tok.unk_token_id();
    let mut known: std::collections::HashMap<char, bool> = std::collections::HashMap::new();
    let mut counts: std::collections::BTreeMap<char, usize> = std::collections::BTreeMap::new();
    let mut out = UnknownChars::default();
    for text in texts {
        out.texts += 1;
        let Some(unk) = unk else { continue };
        let mut hit = false;
        for ch in text.chars() {
            let ok = match known.get(&ch) {
                Some(&k) => k,
                None => {
                    let k = !tok.encode(&ch.to_string(), false)?.contains(&unk);
                    known.insert(ch, k);
                    k
                }
            };
            if !ok {
                hit = true;
                *counts.entry(ch).or_default() += 1;
            }
        }
        out.affected += usize::from(hit);
    }
    out.chars = counts.into_iter().collect();
    out.chars.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(out)
}

/// Splits an eval-file spec "name=path".
pub fn parse_eval_spec(spec: &str) -> Result<(String, String)> {
    match spec.split_once('=') {
        Some((n, p)) if !n.trim().is_empty() && !p.trim().is_empty() => {
            Ok((n.trim().to_string(), p.trim().to_string()))
        }
        _ => Err(Error::Invalid(format!(
            "eval file \"{spec}\": expected name=path (e.g. test=data/test.jsonl)"
        ))),
    }
}

/// Applies a prompt length limit to the encoded prompts `ids` of `examples` (split `split`):
/// `mode` "error" fails naming the first long prompt, "left" keeps the last `limit` tokens of
/// each (TRL's truncation), "drop" removes the long ones. Returns the kept prompts and examples
/// and how many were dropped or truncated.
pub fn fit_prompts(
    ids: Vec<Vec<u32>>,
    examples: Vec<Example>,
    limit: usize,
    mode: &str,
    split: &str,
) -> Result<(Vec<Vec<u32>>, Vec<Example>, usize)> {
    let mut kept = (Vec::with_capacity(ids.len()), Vec::with_capacity(ids.len()));
    let mut changed = 0;
    for (i, (mut p, e)) in ids.into_iter().zip(examples).enumerate() {
        if p.len() > limit {
            changed += 1;
            match mode {
                "left" => {
                    p.drain(..p.len() - limit);
                }
                "drop" => continue,
                _ => {
                    return Err(Error::Invalid(format!(
                        "{split} prompt {} ({:?}) is {} tokens, above the limit of {limit} \
                         (data.max_prompt_length, or max_position_embeddings - \
                         rollout.max_new_tokens); raise it, or set data.truncation = left | drop",
                        i + 1,
                        e.prompt.chars().take(60).collect::<String>(),
                        p.len()
                    )))
                }
            }
        }
        kept.0.push(p);
        kept.1.push(e);
    }
    Ok((kept.0, kept.1, changed))
}

/// Token ids of a prompt as the model sees it: the tokenizer's special tokens (e.g. a BOS)
/// added, or with `chat_template` the prompt as one user turn of the tokenizer's chat template
/// with the generation prompt (the template supplies its own special tokens).
pub fn encode_prompt(tok: &Tokenizer, prompt: &str, chat_template: bool) -> Result<Vec<u32>> {
    let ids = if chat_template {
        tok.encode_chat(&[ChatMessage::new("user", prompt)], true)?
    } else {
        tok.encode(prompt, true)?
    };
    if ids.is_empty() {
        return Err(Error::Invalid(format!(
            "prompt {prompt:?} encodes to no tokens with {}",
            tok.path.display()
        )));
    }
    Ok(ids)
}
