//! An external reward program (`reward.command`): one process for the run, speaking JSONL.
//!
//! For every response of a rollout batch the trainer writes one line to the program's stdin,
//! `{"index": i, "prompt": "...", "response": "...", "answer": "..."}` (the prompt text, the
//! decoded response, the dataset's reference answer), then reads one line per request from its
//! stdout, in any order: `{"index": i, "reward": r}`, optionally with `"correct": true|false`
//! (for `reward/clean_mean`'s accuracy; without it a reward above the midpoint of
//! reward.correct and reward.incorrect counts as correct). The program's stderr passes through
//! to the trainer's. Each batch must be answered within `reward.timeout_s` seconds; a late,
//! missing, malformed or non-finite answer, or an exited program, stops the run with an error
//! naming the command and the line. The command runs under `sh -c`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// One request.
pub struct Request<'a> {
    pub prompt: &'a str,
    pub response: &'a str,
    pub answer: &'a str,
}

/// One answer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reply {
    pub reward: f64,
    pub correct: Option<bool>,
}

/// The running reward program.
pub struct RewardCommand {
    command: String,
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<std::io::Result<String>>,
    timeout: Duration,
}

impl RewardCommand {
    /// Starts `command` (`sh -c`).
    pub fn start(command: &str, timeout_s: f64) -> Result<Self> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                Error::Invalid(format!("reward.command `{command}`: cannot start: {e}"))
            })?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(RewardCommand {
            command: command.to_string(),
            child,
            stdin,
            lines,
            timeout: Duration::from_secs_f64(timeout_s),
        })
    }

    fn err(&self, msg: String) -> Error {
        Error::Invalid(format!("reward.command `{}`: {msg}", self.command))
    }

    /// The rewards of `reqs`, in order.
    pub fn score(&mut self, reqs: &[Request]) -> Result<Vec<Reply>> {
        let mut text = String::new();
        for (i, r) in reqs.iter().enumerate() {
            let v =
                json!({"index": i, "prompt": r.prompt, "response": r.response, "answer": r.answer});
            text.push_str(&v.to_string());
            text.push('\n');
        }
        if let Err(e) = self
            .stdin
            .write_all(text.as_bytes())
            .and_then(|_| self.stdin.flush())
        {
            let status = self.child.try_wait().ok().flatten();
            return Err(self.err(format!(
                "cannot write the requests ({e}){}",
                status.map_or(String::new(), |s| format!("; the program exited ({s})"))
            )));
        }
        let deadline = Instant::now() + self.timeout;
        let mut got: BTreeMap<usize, Reply> = BTreeMap::new();
        let mut n_line = 0;
        while got.len() < reqs.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(Ok(l)) => l,
                Ok(Err(e)) => return Err(self.err(format!("reading its output: {e}"))),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.err(format!(
                        "answered {} of {} requests within reward.timeout_s = {} s",
                        got.len(),
                        reqs.len(),
                        self.timeout.as_secs_f64()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    return Err(self.err(format!(
                        "exited ({}) after answering {} of {} requests",
                        status.map_or("unknown status".into(), |s| s.to_string()),
                        got.len(),
                        reqs.len()
                    )));
                }
            };
            n_line += 1;
            if line.trim().is_empty() {
                continue;
            }
            let (i, reply) = parse_reply(&line, reqs.len())
                .map_err(|m| self.err(format!("output line {n_line} ({line:?}): {m}")))?;
            if got.insert(i, reply).is_some() {
                return Err(self.err(format!("output line {n_line}: index {i} answered twice")));
            }
        }
        Ok(got.into_values().collect())
    }
}

impl Drop for RewardCommand {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_reply(line: &str, n: usize) -> std::result::Result<(usize, Reply), String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let index = v
        .get("index")
        .and_then(Value::as_u64)
        .ok_or("needs \"index\", the request's index")? as usize;
    if index >= n {
        return Err(format!(
            "index {index} is not a request of this batch (0..{n})"
        ));
    }
    let reward = v
        .get("reward")
        .and_then(Value::as_f64)
        .ok_or("needs a number \"reward\"")?;
    if !reward.is_finite() {
        return Err(format!("reward {reward} is not finite"));
    }
    let correct = match v.get("correct") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(other) => return Err(format!("\"correct\" must be true or false, got {other}")),
    };
    Ok((index, Reply { reward, correct }))
}
