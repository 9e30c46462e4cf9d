//! [`ModelConfig`]: the architecture of a Llama- or Qwen2-family decoder, read from and written
//! to a Hugging Face `config.json`.
//!
//! Reading is strict where a wrong guess would silently give a different model: an unknown
//! `model_type`, RoPE scaling, a non-SiLU activation, an MLP bias or a Qwen2 sliding window are
//! errors (we implement the plain architecture only), and every size is validated. Every error
//! is [`Error::Format`] naming the file and the field.
//!
//! Defaults follow transformers: `num_key_value_heads` = `num_attention_heads`, `head_dim` =
//! `hidden_size / num_attention_heads`, `rope_theta` = 10000, `tie_word_embeddings` = false,
//! `attention_bias` = false for Llama. Qwen2 always has q/k/v biases and no o_proj bias; Llama's
//! `attention_bias` puts a bias on q, k, v AND o_proj (as in transformers' `LlamaAttention`).
//! Transformers v5's `rope_parameters` (`{"rope_type": "default", "rope_theta": ...}`) is
//! accepted as well as the v4 `rope_theta`, and `dtype` as well as `torch_dtype`.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The model families we implement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    /// Llama 2 / 3 (`LlamaForCausalLM`).
    Llama,
    /// Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): q/k/v projections carry a bias.
    Qwen2,
}

impl ModelType {
    /// The `model_type` string of config.json.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Llama => "llama",
            ModelType::Qwen2 => "qwen2",
        }
    }

    /// The transformers class written to `architectures`.
    pub fn architecture(self) -> &'static str {
        match self {
            ModelType::Llama => "LlamaForCausalLM",
            ModelType::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// Architecture hyper-parameters of a decoder-only Llama/Qwen2 model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (always true for Qwen2; Llama's `attention_bias`).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids (config.json allows an int or a list).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// `torch_dtype` (or v5 `dtype`) as written in the file, e.g. "bfloat16".
    pub torch_dtype: Option<String>,
    /// Every other field of the source config.json, written back unchanged by [`Self::to_json`].
    pub extra: Map<String, Value>,
}

/// Keys that [`ModelConfig`] owns: read into fields and rewritten by `to_json`.
const OWNED_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "hidden_act",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "torch_dtype",
    "dtype",
];

/// Reads JSON fields of one config object, naming the file in every error.
struct Fields<'a> {
    path: &'a str,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, msg: String) -> Error {
        Error::Format {
            path: self.path.to_string(),
            msg,
        }
    }

    /// Absent and `null` both read as None.
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => usize::try_from(n)
                    .map(Some)
                    .map_err(|_| self.err(format!("field `{key}` = {n} is too large"))),
                None => Err(self.err(format!(
                    "field `{key}` must be a non-negative integer, found {v}"
                ))),
            },
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(format!("missing required field `{key}`")))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("field `{key}` must be a number, found {v}"))),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("field `{key}` must be true or false, found {v}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(format!("field `{key}` must be a string, found {v}"))),
        }
    }

    fn token_id(&self, key: &str, v: &Value) -> Result<u32> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.err(format!("field `{key}` must be a token id, found {v}")))
    }

    /// An int, a list of ints, or absent/null.
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(|v| self.token_id(key, v)).collect(),
            Some(v) => Ok(vec![self.token_id(key, v)?]),
        }
    }
}

impl ModelConfig {
    /// Reads and validates `path` (a config.json).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses and validates config.json text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Format {
            path: path.to_string(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(obj) = value else {
            return Err(Error::Format {
                path: path.to_string(),
                msg: "config.json must be a JSON object".into(),
            });
        };
        let f = Fields { path, obj: &obj };

        let model_type = match f.str_opt("model_type")? {
            Some("llama") => ModelType::Llama,
            Some("qwen2") => ModelType::Qwen2,
            Some(other) => {
                return Err(f.err(format!(
                    "unsupported model_type \"{other}\" (supported: \"llama\", \"qwen2\")"
                )))
            }
            None => return Err(f.err("missing required field `model_type`".into())),
        };

        // Unsupported variants of the architecture: refuse rather than run a different model.
        if let Some(v) = f.get("rope_scaling") {
            return Err(f.err(format!(
                "unsupported field `rope_scaling` = {v}: only plain RoPE is implemented"
            )));
        }
        let mut rope_theta = f.f64_opt("rope_theta")?;
        if let Some(rp) = f.get("rope_parameters") {
            let Some(rp) = rp.as_object() else {
                return Err(f.err(format!(
                    "field `rope_parameters` must be an object, found {rp}"
                )));
            };
            let sub = Fields { path, obj: rp };
            match sub.str_opt("rope_type")? {
                None | Some("default") => {}
                Some(t) => {
                    return Err(f.err(format!(
                        "unsupported `rope_parameters.rope_type` \"{t}\": only plain RoPE \
                         (\"default\") is implemented"
                    )))
                }
            }
            if let Some(t) = sub.f64_opt("rope_theta")? {
                rope_theta = Some(t);
            }
        }
        if let Some(types) = f.get("layer_types") {
            let ok = types
                .as_array()
                .is_some_and(|a| a.iter().all(|t| t.as_str() == Some("full_attention")));
            if !ok {
                return Err(f.err(format!(
                    "unsupported `layer_types` = {types}: only \"full_attention\" layers are \
                     implemented"
                )));
            }
        }
        if let Some(act) = f.str_opt("hidden_act")? {
            if act != "silu" {
                return Err(f.err(format!(
                    "unsupported hidden_act \"{act}\" (only \"silu\" is implemented)"
                )));
            }
        }
        if f.bool_opt("mlp_bias")? == Some(true) {
            return Err(
                f.err("unsupported `mlp_bias` = true (MLP biases are not implemented)".into())
            );
        }
        if f.bool_opt("use_sliding_window")? == Some(true) {
            return Err(f.err(
                "unsupported `use_sliding_window` = true (sliding-window attention is not implemented)"
                    .into(),
            ));
        }

        let hidden_size = f.usize_req("hidden_size")?;
        let num_attention_heads = f.usize_req("num_attention_heads")?;
        let head_dim = match f.usize_opt("head_dim")? {
            Some(h) => h,
            None => {
                if num_attention_heads == 0 {
                    return Err(
                        f.err("field `num_attention_heads` must be positive, found 0".into())
                    );
                }
                if !hidden_size.is_multiple_of(num_attention_heads) {
                    return Err(f.err(format!(
                        "field `num_attention_heads` = {num_attention_heads} does not divide \
                         `hidden_size` = {hidden_size} (and no `head_dim` is given)"
                    )));
                }
                hidden_size / num_attention_heads
            }
        };
        let attention_bias = match model_type {
            ModelType::Qwen2 => {
                if f.bool_opt("attention_bias")? == Some(false) {
                    return Err(f.err(
                        "field `attention_bias` = false, but Qwen2 always has q/k/v biases".into(),
                    ));
                }
                true
            }
            ModelType::Llama => f.bool_opt("attention_bias")?.unwrap_or(false),
        };
        let torch_dtype = match f.str_opt("torch_dtype")? {
            Some(s) => Some(s.to_string()),
            None => f.str_opt("dtype")?.map(str::to_string),
        };
        let bos = f.token_ids("bos_token_id")?;
        if bos.len() > 1 {
            return Err(f.err(format!(
                "field `bos_token_id` must be one id, found {bos:?}"
            )));
        }
        let pad = f.token_ids("pad_token_id")?;
        if pad.len() > 1 {
            return Err(f.err(format!(
                "field `pad_token_id` must be one id, found {pad:?}"
            )));
        }

        let cfg = ModelConfig {
            model_type,
            vocab_size: f.usize_req("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize_req("intermediate_size")?,
            num_hidden_layers: f.usize_req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: f
                .usize_opt("num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: f
                .f64_opt("rms_norm_eps")?
                .ok_or_else(|| f.err("missing required field `rms_norm_eps`".into()))?,
            rope_theta: rope_theta.unwrap_or(10000.0),
            max_position_embeddings: f.usize_req("max_position_embeddings")?,
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            attention_bias,
            bos_token_id: bos.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
            pad_token_id: pad.first().copied(),
            torch_dtype,
            extra: obj
                .iter()
                .filter(|(k, _)| !OWNED_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks sizes and their relations; errors name `path` and the field.
    pub fn validate(&self, path: &str) -> Result<()> {
        let err = |msg: String| Error::Format {
            path: path.to_string(),
            msg,
        };
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(err(format!("field `{name}` must be positive, found 0")));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(err(format!(
                "field `num_key_value_heads` = {} does not divide `num_attention_heads` = {}",
                self.num_key_value_heads, self.num_attention_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(err(format!(
                "field `head_dim` = {} must be even (RoPE rotates pairs)",
                self.head_dim
            )));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(err(format!(
                "field `rms_norm_eps` must be a positive finite number, found {}",
                self.rms_norm_eps
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(err(format!(
                "field `rope_theta` must be a positive finite number, found {}",
                self.rope_theta
            )));
        }
        if self.model_type == ModelType::Qwen2 && !self.attention_bias {
            return Err(err("Qwen2 requires `attention_bias` (q/k/v biases)".into()));
        }
        let ids = self
            .bos_token_id
            .iter()
            .map(|&i| ("bos_token_id", i))
            .chain(self.eos_token_ids.iter().map(|&i| ("eos_token_id", i)))
            .chain(self.pad_token_id.iter().map(|&i| ("pad_token_id", i)));
        for (name, id) in ids {
            if id as usize >= self.vocab_size {
                return Err(err(format!(
                    "field `{name}` = {id} is outside the vocabulary (vocab_size {})",
                    self.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// Width of the q projection output: `num_attention_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the k and v projection outputs: `num_key_value_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Whether o_proj has a bias (Llama with `attention_bias`; never for Qwen2).
    pub fn o_proj_bias(&self) -> bool {
        self.model_type == ModelType::Llama && self.attention_bias
    }

    /// The config as an HF-compatible JSON object: the fields of `extra` (unchanged) plus every
    /// owned field, so `AutoConfig.from_pretrained` reads back the same architecture.
    pub fn to_json_value(&self) -> Value {
        let mut obj = self.extra.clone();
        let mut put = |k: &str, v: Value| {
            obj.insert(k.to_string(), v);
        };
        put(
            "architectures",
            Value::Array(vec![self.model_type.architecture().into()]),
        );
        put("model_type", self.model_type.as_str().into());
        put("vocab_size", self.vocab_size.into());
        put("hidden_size", self.hidden_size.into());
        put("intermediate_size", self.intermediate_size.into());
        put("num_hidden_layers", self.num_hidden_layers.into());
        put("num_attention_heads", self.num_attention_heads.into());
        put("num_key_value_heads", self.num_key_value_heads.into());
        put("head_dim", self.head_dim.into());
        put("hidden_act", "silu".into());
        put("rms_norm_eps", self.rms_norm_eps.into());
        put(
            "max_position_embeddings",
            self.max_position_embeddings.into(),
        );
        put("tie_word_embeddings", self.tie_word_embeddings.into());
        if self.model_type == ModelType::Llama {
            put("attention_bias", self.attention_bias.into());
        }
        put(
            "bos_token_id",
            self.bos_token_id.map_or(Value::Null, Value::from),
        );
        put(
            "eos_token_id",
            match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => (*one).into(),
                many => many.iter().map(|&i| Value::from(i)).collect(),
            },
        );
        if let Some(p) = self.pad_token_id {
            put("pad_token_id", p.into());
        }
        // transformers v5 writes `rope_parameters` and `dtype`; v4 `rope_theta` and
        // `torch_dtype` (both read by v5). Keep the style of the source; v4 style by default.
        let v5 = obj.contains_key("rope_parameters");
        if v5 {
            let mut rp = Map::new();
            rp.insert("rope_type".into(), "default".into());
            rp.insert("rope_theta".into(), self.rope_theta.into());
            obj.insert("rope_parameters".into(), Value::Object(rp));
        } else {
            obj.insert("rope_theta".into(), self.rope_theta.into());
        }
        if let Some(d) = &self.torch_dtype {
            let key = if v5 { "dtype" } else { "torch_dtype" };
            obj.insert(key.into(), d.as_str().into());
        }
        Value::Object(obj)
    }

    /// [`Self::to_json_value`] pretty-printed, as `save_pretrained` writes it.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(&self.to_json_value())
            .expect("a serde_json::Value always serializes");
        s.push('\n');
        s
    }
}
