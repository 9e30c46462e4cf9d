//! JSONL datasets: one `{"prompt": "...", "answer": "..."}` object per line (other fields are
//! ignored, blank lines skipped); other field names (HF GSM8K's `question`/`answer`) with
//! [`read_jsonl_fields`]. Every error names the file, the 1-based line and the field.

use std::path::Path;

use serde_json::Value;

use super::Example;
use crate::error::{Error, Result};

/// Reads a JSONL dataset (see the module doc). An empty file (no records) is an error.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    read_jsonl_fields(path, "prompt", "answer")
}

/// [`read_jsonl`] with the prompt and answer under the fields `prompt_key` and `answer_key`.
pub fn read_jsonl_fields(path: &Path, prompt_key: &str, answer_key: &str) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
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
        let Value::Object(obj) = &v else {
            return Err(bad("not a JSON object".into()));
        };
        let field = |name: &str| -> Result<String> {
            match obj.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(bad(format!(
                    "field \"{name}\" is not a string (found {})",
                    kind(other)
                ))),
                None => Err(bad(format!("field \"{name}\" is missing"))),
            }
        };
        let prompt = field(prompt_key)?;
        let answer = field(answer_key)?;
        if prompt.is_empty() {
            return Err(bad(format!("field \"{prompt_key}\" is empty")));
        }
        out.push(Example { prompt, answer });
    }
    if out.is_empty() {
        return Err(Error::Format {
            path: path.display().to_string(),
            msg: "no records (the file is empty or blank)".into(),
        });
    }
    Ok(out)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
