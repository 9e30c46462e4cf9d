//! Tokenizer: `tokenizer.json` through the `tokenizers` crate (offline, pure-Rust regex), special
//! tokens from `tokenizer_config.json` (or `special_tokens_map.json`), and the chat template
//! rendered with minijinja the way transformers' `apply_chat_template` renders it with jinja2
//! (`trim_blocks`, `lstrip_blocks`, loop controls, `tojson`, Python string methods such as
//! `.strip()`, a `raise_exception(msg)` function; the context has `messages`,
//! `add_generation_prompt` and the special-token strings `bos_token`, `eos_token`, `pad_token`,
//! `unk_token`).
//!
//! The template comes from `chat_template.jinja` when the folder has one (newer transformers save
//! it there), else from `tokenizer_config.json`'s `chat_template` (a string, or a list of
//! `{name, template}` of which the one named "default" is used).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A loaded tokenizer with its special tokens and optional chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The tokenizer.json it was read from.
    pub path: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// The chat template source and the file it came from.
    chat_template: Option<(String, PathBuf)>,
}

fn fmt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// A special token in tokenizer_config.json: a string or an AddedToken `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_json_object(path: &Path) -> Result<serde_json::Map<String, Value>> {
    let v: Value = serde_json::from_str(&read_text(path)?)
        .map_err(|e| fmt_err(path, format!("not valid JSON: {e}")))?;
    match v {
        Value::Object(o) => Ok(o),
        _ => Err(fmt_err(path, "must be a JSON object")),
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json` alone (no special-token names, no chat template).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = read_text(path)?;
        // Parse as JSON first so a syntax error is reported as such, with its position.
        serde_json::from_str::<Value>(&text)
            .map_err(|e| fmt_err(path, format!("not valid JSON: {e}")))?;
        let mut inner = text
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| fmt_err(path, format!("not a valid tokenizer.json: {e}")))?;
        // A tokenizer.json may carry truncation/padding settings from its last use; transformers
        // overrides them per call, and so do we: encode never truncates or pads.
        inner
            .with_truncation(None)
            .map_err(|e| fmt_err(path, format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
            bos_token: None,
            eos_token: None,
            pad_token: None,
            unk_token: None,
            chat_template: None,
        })
    }

    /// Loads `dir/tokenizer.json` (required) with `tokenizer_config.json`,
    /// `special_tokens_map.json` and `chat_template.jinja` when present (each validated).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut tok = Self::from_file(dir.join("tokenizer.json"))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.is_file() {
            Some(read_json_object(&cfg_path)?)
        } else {
            None
        };
        let map_path = dir.join("special_tokens_map.json");
        let map = if map_path.is_file() {
            Some(read_json_object(&map_path)?)
        } else {
            None
        };
        let special = |key: &str| {
            token_string(cfg.as_ref().and_then(|c| c.get(key)))
                .or_else(|| token_string(map.as_ref().and_then(|m| m.get(key))))
        };
        tok.bos_token = special("bos_token");
        tok.eos_token = special("eos_token");
        tok.pad_token = special("pad_token");
        tok.unk_token = special("unk_token");
        for (name, t) in [
            ("bos_token", &tok.bos_token),
            ("eos_token", &tok.eos_token),
            ("pad_token", &tok.pad_token),
            ("unk_token", &tok.unk_token),
        ] {
            if let Some(t) = t {
                if tok.inner.token_to_id(t).is_none() {
                    return Err(fmt_err(
                        &cfg_path,
                        format!("`{name}` \"{t}\" is not in the vocabulary of tokenizer.json"),
                    ));
                }
            }
        }

        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            tok.chat_template = Some((read_text(&jinja)?, jinja));
        } else if let Some(v) = cfg.as_ref().and_then(|c| c.get("chat_template")) {
            let src = match v {
                Value::String(s) => Some(s.clone()),
                Value::Array(items) => items
                    .iter()
                    .find(|it| it.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|it| it.get("template")?.as_str().map(str::to_string)),
                Value::Null => None,
                _ => {
                    return Err(fmt_err(
                        &cfg_path,
                        "`chat_template` must be a string or a list of {name, template}",
                    ))
                }
            };
            if src.is_none() && !v.is_null() {
                return Err(fmt_err(
                    &cfg_path,
                    "`chat_template` list has no template named \"default\"",
                ));
            }
            tok.chat_template = src.map(|s| (s, cfg_path.clone()));
        }
        Ok(tok)
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. a BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| fmt_err(&self.path, format!("encode failed: {e}")))
    }

    /// Text of `ids`. Ids outside the vocabulary are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= n) {
            return Err(Error::Invalid(format!(
                "decode: token id {bad} is outside the vocabulary of {} ({n} tokens)",
                self.path.display()
            )));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| fmt_err(&self.path, format!("decode failed: {e}")))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Ids of the added tokens marked special, sorted.
    pub fn special_token_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(i, _)| i)
            .collect();
        ids.sort_unstable();
        ids
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The id of the unknown token (`unk_token` of tokenizer_config.json), if the tokenizer
    /// names one.
    pub fn unk_token_id(&self) -> Option<u32> {
        self.unk_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The chat template source, if the folder has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_ref().map(|(s, _)| s.as_str())
    }

    /// Renders the chat template for `messages`; with `add_generation_prompt` the template's
    /// assistant header is appended. An error if the tokenizer has no template, the template
    /// does not compile, or rendering fails (including `raise_exception` in the template).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some((src, src_path)) = &self.chat_template else {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            return Err(fmt_err(
                &dir.join("tokenizer_config.json"),
                "no `chat_template` (nor chat_template.jinja) for this tokenizer",
            ));
        };
        let terr = |e: minijinja::Error| {
            let mut msg = format!("chat template: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg.push_str(&format!(": {c}"));
                cause = c.source();
            }
            fmt_err(src_path, msg)
        };
        let mut env = minijinja::Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(terr)?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let tmpl = env.template_from_str(src).map_err(terr)?;
        use minijinja::Value as J;
        let msgs: Vec<J> = messages
            .iter()
            .map(|m| J::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())]))
            .collect();
        let mut ctx: Vec<(&str, J)> = vec![
            ("messages", J::from(msgs)),
            ("add_generation_prompt", J::from(add_generation_prompt)),
        ];
        // Unset special tokens stay undefined (render as ""), as transformers leaves them.
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("unk_token", &self.unk_token),
        ] {
            if let Some(v) = v {
                ctx.push((k, J::from(v.as_str())));
            }
        }
        let ctx = J::from_pairs(ctx);
        tmpl.render(ctx).map_err(terr)
    }

    /// [`Self::apply_chat_template`] then [`Self::encode`] without adding special tokens, as
    /// transformers' `apply_chat_template(tokenize=True)` does.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}
