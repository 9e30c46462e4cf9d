//! Tasks: prompts with verifiable answers, answer checkers, and where the data comes from.
//!
//! - [`arith`]: the built-in arithmetic task (in-domain / out-of-domain splits, its tokenizer and
//!   tiny model config).
//! - [`dataset`]: JSONL `{"prompt", "answer"}` files.
//! - [`checkers`]: answer extraction and comparison for the arith, GSM8K and MATH formats.
//!
//! [`load_task`] resolves a [`DataConfig`] into training prompts, named eval sets and a checker.

pub mod arith;
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
}

impl Checker {
    /// "arith" | "gsm8k" | "math".
    pub fn parse(name: &str) -> Result<Checker> {
        match name {
            "arith" => Ok(Checker::Arith),
            "gsm8k" => Ok(Checker::Gsm8k),
            "math" => Ok(Checker::Math),
            other => Err(Error::Invalid(format!(
                "data.checker = \"{other}\": expected \"arith\", \"gsm8k\" or \"math\""
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Checker::Arith => "arith",
            Checker::Gsm8k => "gsm8k",
            Checker::Math => "math",
        }
    }

    /// The final answer `response` gives, normalised; None when there is none.
    pub fn extract(&self, response: &str) -> Option<String> {
        match self {
            Checker::Arith => checkers::arith_extract(response),
            Checker::Gsm8k => checkers::gsm8k_extract(response),
            Checker::Math => checkers::math_extract(response),
        }
    }

    /// The reference answer of a dataset line, normalised the same way (a GSM8K reference may
    /// be a full solution ending in `#### n`, a MATH one may hold a `\boxed{}`).
    pub fn reference(&self, answer: &str) -> String {
        match self {
            Checker::Arith => checkers::arith_extract(answer),
            Checker::Gsm8k => {
                checkers::gsm8k_extract(answer).or_else(|| checkers::gsm8k_normalise(answer))
            }
            Checker::Math => {
                checkers::math_extract(answer).or_else(|| Some(checkers::math_normalise(answer)))
            }
        }
        .unwrap_or_else(|| answer.trim().to_string())
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
        "jsonl" => {
            if cfg.train_file.is_empty() {
                return Err(Error::Invalid(
                    "data.task = \"jsonl\" needs data.train_file (a JSONL of {\"prompt\",\"answer\"})"
                        .into(),
                ));
            }
            let train = dataset::read_jsonl(Path::new(&cfg.train_file))?;
            let mut evals: Vec<(String, Vec<Example>)> = Vec::new();
            for spec in &cfg.eval_files {
                let (name, path) = parse_eval_spec(spec)?;
                if evals.iter().any(|(n, _)| *n == name) {
                    return Err(Error::Invalid(format!(
                        "data.eval_files: the name \"{name}\" is used twice"
                    )));
                }
                let mut ex = dataset::read_jsonl(Path::new(&path))?;
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
            "data.task = \"{other}\": expected \"arith\" or \"jsonl\""
        ))),
    }
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
