//! Hugging Face checkpoint I/O: safetensors reading (single file or sharded index), the expected
//! parameter list of a [`ModelConfig`], a checked loader, and atomic writers.
//!
//! # Reading untrusted files
//! A safetensors file is `u64 LE header length N | N bytes of JSON header | data`. Before the
//! `safetensors` crate parses it we validate it ourselves, so every corruption is an
//! [`Error::Format`] naming the file and the problem, never a panic:
//! file shorter than 8 bytes, header length past end of file, non-UTF-8 or invalid JSON header,
//! entries that are not `{dtype, shape, data_offsets}`, unknown or unsupported dtypes, shapes whose
//! byte size overflows or disagrees with the offsets, offsets past the data section (a truncated
//! file), overlapping tensors, and gaps or trailing bytes in the data section. The crate then
//! parses the same buffer as a second check and its tensor views are what we convert.
//! The whole file is read into memory (peak memory = file size + the f32 copy).
//!
//! Floating-point tensors (F32, BF16, F16) are converted to f32 with `half`; I64/I32 are only
//! accepted by [`read_safetensors_any`] (golden files store token ids that way); every other
//! dtype is an error naming the tensor and the dtype.
//!
//! # Checked loading
//! [`load_checkpoint`] reads config.json and the weights of a folder and compares the tensors with
//! [`expected_tensors`]: missing and misshaped tensors are errors. Unexpected tensors are ALSO
//! errors (a tensor we would ignore, such as a bias the config does not declare, means the model
//! we run is not the model in the file), except two known-harmless cases that are dropped with a
//! warning in [`Checkpoint::warnings`]: `*.rotary_emb.inv_freq` buffers (recomputed from
//! `rope_theta`) and, for a tied model, an `lm_head.weight` equal to `model.embed_tokens.weight`.
//!
//! # Writing
//! [`save_safetensors`] writes F32 or BF16 (round-to-nearest-even) with `{"format": "pt"}` metadata
//! through [`write_atomic`] (temp file in the same folder, fsync, rename, fsync of the folder), so a
//! crash leaves either the old file or the new one. [`save_hf_folder`] writes a folder that
//! `transformers.AutoModelForCausalLM.from_pretrained` loads.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};

use super::config::ModelConfig;
use crate::error::{Error, Result};

/// A dense row-major f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// Checks that `data.len()` is the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n = numel(&shape).ok_or_else(|| Error::Shape(format!("shape {shape:?} overflows")))?;
        crate::error::check_len("Tensor::new data", data.len(), n)?;
        Ok(Tensor { shape, data })
    }

    /// Number of elements (the product of the shape).
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// A dense row-major integer tensor (token ids, masks).
#[derive(Clone, Debug, PartialEq)]
pub struct IntTensor {
    pub shape: Vec<usize>,
    pub data: Vec<i64>,
}

/// A tensor read by [`read_safetensors_any`].
#[derive(Clone, Debug, PartialEq)]
pub enum AnyTensor {
    /// F32, BF16 or F16 in the file, converted to f32.
    Float(Tensor),
    /// I64 or I32 in the file.
    Int(IntTensor),
}

/// Tensors by name (sorted, so files are written in a stable order).
pub type TensorMap = BTreeMap<String, Tensor>;

/// Storage dtype for writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    /// bfloat16, rounded to nearest even from f32.
    BF16,
}

impl Dtype {
    /// The safetensors dtype string.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::BF16 => "BF16",
        }
    }

    /// The `torch_dtype` string of config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::BF16 => "bfloat16",
        }
    }
}

/// The largest JSON header we accept (the safetensors crate's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

fn fmt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Element kinds we can read; everything else is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileDtype {
    F32,
    Bf16,
    F16,
    I64,
    I32,
}

impl FileDtype {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => FileDtype::F32,
            "BF16" => FileDtype::Bf16,
            "F16" => FileDtype::F16,
            "I64" => FileDtype::I64,
            "I32" => FileDtype::I32,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            FileDtype::F32 | FileDtype::I32 => 4,
            FileDtype::Bf16 | FileDtype::F16 => 2,
            FileDtype::I64 => 8,
        }
    }
}

/// Dtypes of the safetensors format that we recognise but do not read.
const KNOWN_UNSUPPORTED: &[&str] = &[
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "I16",
    "U16",
    "U32",
    "C64",
    "F64",
    "U64",
];

/// One validated header entry.
struct Entry {
    name: String,
    dtype: FileDtype,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

/// Validates the header and layout of a whole safetensors file held in `buf`.
/// Returns the entries (sorted by offset) and the start of the data section.
fn validate(path: &Path, buf: &[u8]) -> Result<(Vec<Entry>, usize)> {
    let file_len = buf.len();
    if file_len < 8 {
        return Err(fmt_err(
            path,
            format!(
                "file is {file_len} bytes, too short for the 8-byte header length (truncated or \
                 not a safetensors file)"
            ),
        ));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER {
        return Err(fmt_err(
            path,
            format!("header length {n} exceeds the {MAX_HEADER}-byte limit (corrupt file?)"),
        ));
    }
    let n = n as usize;
    if n > file_len - 8 {
        return Err(fmt_err(
            path,
            format!(
                "header length {n} runs past the end of the file ({file_len} bytes; truncated or \
                 corrupt)"
            ),
        ));
    }
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let header = std::str::from_utf8(&buf[8..data_start]).map_err(|e| {
        fmt_err(
            path,
            format!(
                "header is not valid UTF-8 (at header byte {})",
                e.valid_up_to()
            ),
        )
    })?;
    let value: Value = serde_json::from_str(header)
        .map_err(|e| fmt_err(path, format!("header is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(fmt_err(path, "header is not a JSON object"));
    };

    let mut entries = Vec::with_capacity(obj.len());
    for (name, v) in &obj {
        if name == "__metadata__" {
            let ok = v
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string));
            if !ok {
                return Err(fmt_err(
                    path,
                    "header `__metadata__` must be an object of strings",
                ));
            }
            continue;
        }
        let t = |msg: String| fmt_err(path, format!("tensor `{name}`: {msg}"));
        let Some(e) = v.as_object() else {
            return Err(t(format!("header entry must be an object, found {v}")));
        };
        let dtype_s = e
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| t("header entry has no string `dtype`".into()))?;
        let dtype = match FileDtype::parse(dtype_s) {
            Some(d) => d,
            None if KNOWN_UNSUPPORTED.contains(&dtype_s) => {
                return Err(t(format!(
                    "unsupported dtype {dtype_s} (supported: F32, BF16, F16; I64, I32 for \
                     index tensors)"
                )))
            }
            None => return Err(t(format!("unknown dtype \"{dtype_s}\""))),
        };
        let shape = e
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| t("header entry has no array `shape`".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| t("`shape` must be a list of non-negative integers".into()))?;
        let offs = e
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| {
                let b = usize::try_from(a[0].as_u64()?).ok()?;
                let e = usize::try_from(a[1].as_u64()?).ok()?;
                Some((b, e))
            })
            .ok_or_else(|| {
                t("`data_offsets` must be two non-negative integers [begin, end]".into())
            })?;
        let (begin, end) = offs;
        if begin > end {
            return Err(t(format!("data_offsets [{begin}, {end}] has begin > end")));
        }
        let nbytes = numel(&shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| t(format!("shape {shape:?} overflows")))?;
        if end - begin != nbytes {
            return Err(t(format!(
                "data_offsets [{begin}, {end}] span {} bytes, but dtype {dtype_s} with shape \
                 {shape:?} needs {nbytes} bytes",
                end - begin
            )));
        }
        if end > data_len {
            return Err(t(format!(
                "data_offsets [{begin}, {end}] run past the end of the data section ({data_len} \
                 bytes; file truncated or header lies)"
            )));
        }
        entries.push(Entry {
            name: name.clone(),
            dtype,
            shape,
            begin,
            end,
        });
    }

    // The format requires the tensors to tile the data section exactly.
    entries.sort_by_key(|e| (e.begin, e.end));
    let mut pos = 0usize;
    for (i, e) in entries.iter().enumerate() {
        if e.begin < pos {
            let prev = &entries[i - 1];
            return Err(fmt_err(
                path,
                format!(
                    "tensors `{}` [{}, {}] and `{}` [{}, {}] overlap",
                    prev.name, prev.begin, prev.end, e.name, e.begin, e.end
                ),
            ));
        }
        if e.begin > pos {
            return Err(fmt_err(
                path,
                format!(
                    "gap of {} unreferenced bytes before tensor `{}` at data offset {pos}",
                    e.begin - pos,
                    e.name
                ),
            ));
        }
        pos = e.end;
    }
    if pos != data_len {
        return Err(fmt_err(
            path,
            format!(
                "data section is {data_len} bytes but the header describes {pos} (trailing bytes \
                 or a header that lies about sizes)"
            ),
        ));
    }
    Ok((entries, data_start))
}

fn convert(dtype: FileDtype, bytes: &[u8], shape: Vec<usize>) -> AnyTensor {
    match dtype {
        FileDtype::F32 => AnyTensor::Float(Tensor {
            shape,
            data: bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        }),
        FileDtype::Bf16 => AnyTensor::Float(Tensor {
            shape,
            data: bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        }),
        FileDtype::F16 => AnyTensor::Float(Tensor {
            shape,
            data: bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        }),
        FileDtype::I64 => AnyTensor::Int(IntTensor {
            shape,
            data: bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        }),
        FileDtype::I32 => AnyTensor::Int(IntTensor {
            shape,
            data: bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
        }),
    }
}

/// Parses a safetensors image already in memory; `path` names it in errors.
pub fn parse_safetensors_any(path: &Path, buf: &[u8]) -> Result<BTreeMap<String, AnyTensor>> {
    let (entries, _) = validate(path, buf)?;
    // Second opinion from the reference parser; after our checks it should always agree.
    let st = safetensors::SafeTensors::deserialize(buf)
        .map_err(|e| fmt_err(path, format!("safetensors: {e}")))?;
    let mut out = BTreeMap::new();
    for e in entries {
        let view = st
            .tensor(&e.name)
            .map_err(|err| fmt_err(path, format!("tensor `{}`: safetensors: {err}", e.name)))?;
        let bytes = view.data();
        if view.shape() != e.shape.as_slice() || bytes.len() != e.end - e.begin {
            return Err(fmt_err(
                path,
                format!(
                    "tensor `{}`: safetensors crate disagrees on its layout",
                    e.name
                ),
            ));
        }
        out.insert(e.name, convert(e.dtype, bytes, e.shape));
    }
    Ok(out)
}

/// Reads every tensor of a safetensors file, floats as f32 and I64/I32 as i64.
pub fn read_safetensors_any(path: impl AsRef<Path>) -> Result<BTreeMap<String, AnyTensor>> {
    let path = path.as_ref();
    let buf = std::fs::read(path).map_err(|e| io_err(path, e))?;
    parse_safetensors_any(path, &buf)
}

/// Reads a safetensors file of floating-point tensors (F32/BF16/F16), converted to f32.
/// Integer tensors are an error naming the tensor.
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<TensorMap> {
    let path = path.as_ref();
    read_safetensors_any(path)?
        .into_iter()
        .map(|(name, t)| match t {
            AnyTensor::Float(t) => Ok((name, t)),
            AnyTensor::Int(_) => Err(fmt_err(
                path,
                format!("tensor `{name}`: integer dtype where a floating-point weight is expected"),
            )),
        })
        .collect()
}

/// Where a checkpoint folder keeps its weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightsSource {
    /// `model.safetensors`.
    Single(PathBuf),
    /// `model.safetensors.index.json` and its shards.
    Sharded(PathBuf),
}

impl WeightsSource {
    /// Finds the weights of `dir`: `model.safetensors` first (as transformers does), then the
    /// sharded index.
    pub fn find(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(WeightsSource::Single(single));
        }
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            return Ok(WeightsSource::Sharded(index));
        }
        Err(io_err(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors or model.safetensors.index.json in this folder",
            ),
        ))
    }

    /// The file that describes the weights (the single file or the index).
    pub fn path(&self) -> &Path {
        match self {
            WeightsSource::Single(p) | WeightsSource::Sharded(p) => p,
        }
    }
}

/// Tensors read from a checkpoint, with the file each came from.
#[derive(Debug)]
pub struct LoadedTensors {
    pub tensors: TensorMap,
    /// Tensor name -> the file it was read from.
    pub files: HashMap<String, PathBuf>,
}

/// Reads the tensors of a single file or a sharded index (`model.safetensors.index.json`:
/// `{"weight_map": {tensor: shard file}}`). Every tensor the index names must be in that shard;
/// a tensor found in two shards is an error; shard names must be plain file names in the same
/// folder.
pub fn read_weights(source: &WeightsSource) -> Result<LoadedTensors> {
    match source {
        WeightsSource::Single(path) => {
            let tensors = read_safetensors(path)?;
            let files = tensors.keys().map(|k| (k.clone(), path.clone())).collect();
            Ok(LoadedTensors { tensors, files })
        }
        WeightsSource::Sharded(index) => read_sharded(index),
    }
}

fn read_sharded(index: &Path) -> Result<LoadedTensors> {
    let text = std::fs::read_to_string(index).map_err(|e| io_err(index, e))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| fmt_err(index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| fmt_err(index, "missing object `weight_map`"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            fmt_err(
                index,
                format!("weight_map[`{name}`] must be a file name, found {shard}"),
            )
        })?;
        let plain = !shard.is_empty()
            && Path::new(shard).file_name() == Some(std::ffi::OsStr::new(shard))
            && shard != ".."
            && shard != ".";
        if !plain {
            return Err(fmt_err(
                index,
                format!("weight_map[`{name}`] = \"{shard}\" is not a plain file name"),
            ));
        }
        by_shard
            .entry(shard.to_string())
            .or_default()
            .push(name.clone());
    }
    if by_shard.is_empty() {
        return Err(fmt_err(index, "`weight_map` is empty"));
    }
    let mut tensors = TensorMap::new();
    let mut files: HashMap<String, PathBuf> = HashMap::new();
    for (shard, names) in by_shard {
        let spath = dir.join(&shard);
        let mut got = read_safetensors(&spath)?;
        for name in &names {
            if !got.contains_key(name) {
                return Err(fmt_err(
                    index,
                    format!("tensor `{name}` is mapped to {shard}, which does not contain it"),
                ));
            }
        }
        for (name, t) in std::mem::take(&mut got) {
            if let Some(prev) = files.get(&name) {
                return Err(fmt_err(
                    index,
                    format!(
                        "tensor `{name}` appears in both {} and {shard}",
                        prev.display()
                    ),
                ));
            }
            files.insert(name.clone(), spath.clone());
            tensors.insert(name, t);
        }
    }
    Ok(LoadedTensors { tensors, files })
}

/// The parameters of `cfg` in HF naming and shape (`[out, in]` for projections), in model order.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, q, kv, ff, v) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for i in 0..cfg.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        out.push((p("input_layernorm.weight"), vec![h]));
        out.push((p("self_attn.q_proj.weight"), vec![q, h]));
        out.push((p("self_attn.k_proj.weight"), vec![kv, h]));
        out.push((p("self_attn.v_proj.weight"), vec![kv, h]));
        if cfg.attention_bias {
            out.push((p("self_attn.q_proj.bias"), vec![q]));
            out.push((p("self_attn.k_proj.bias"), vec![kv]));
            out.push((p("self_attn.v_proj.bias"), vec![kv]));
        }
        out.push((p("self_attn.o_proj.weight"), vec![h, q]));
        if cfg.o_proj_bias() {
            out.push((p("self_attn.o_proj.bias"), vec![h]));
        }
        out.push((p("post_attention_layernorm.weight"), vec![h]));
        out.push((p("mlp.gate_proj.weight"), vec![ff, h]));
        out.push((p("mlp.up_proj.weight"), vec![ff, h]));
        out.push((p("mlp.down_proj.weight"), vec![h, ff]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// Compares `tensors` with [`expected_tensors`]: missing, misshaped and unexpected tensors are
/// errors (all of them listed, up to 20) on `path`; `files` names the file of each tensor.
/// The two harmless extras (see the module docs) are removed from `tensors` and returned as
/// warnings.
pub fn check_tensors(
    cfg: &ModelConfig,
    tensors: &mut TensorMap,
    files: &HashMap<String, PathBuf>,
    path: &Path,
) -> Result<Vec<String>> {
    let file_of = |name: &str| {
        files
            .get(name)
            .map_or_else(|| path.display().to_string(), |p| p.display().to_string())
    };
    let expected = expected_tensors(cfg);
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    for (name, shape) in &expected {
        match tensors.get(name) {
            None => problems.push(format!(
                "missing tensor `{name}` (expected shape {shape:?})"
            )),
            Some(t) if &t.shape != shape => problems.push(format!(
                "tensor `{name}` in {} has shape {:?}, expected {shape:?}",
                file_of(name),
                t.shape
            )),
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let extras: Vec<String> = tensors
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .cloned()
        .collect();
    for name in extras {
        if name.ends_with(".rotary_emb.inv_freq") {
            warnings.push(format!(
                "ignored buffer `{name}` in {} (recomputed from rope_theta)",
                file_of(&name)
            ));
            tensors.remove(&name);
        } else if name == "lm_head.weight" && cfg.tie_word_embeddings {
            let same = tensors.get("model.embed_tokens.weight") == tensors.get(&name);
            if same {
                warnings.push(format!(
                    "ignored `lm_head.weight` in {} (tied to model.embed_tokens.weight and equal \
                     to it)",
                    file_of(&name)
                ));
                tensors.remove(&name);
            } else {
                problems.push(format!(
                    "tensor `lm_head.weight` in {} differs from model.embed_tokens.weight, but \
                     the config has tie_word_embeddings = true",
                    file_of(&name)
                ));
            }
        } else {
            problems.push(format!(
                "unexpected tensor `{name}` in {} (not a parameter of this {} config)",
                file_of(&name),
                cfg.model_type.as_str()
            ));
        }
    }
    if problems.is_empty() {
        return Ok(warnings);
    }
    let total = problems.len();
    problems.truncate(20);
    let mut msg = format!(
        "checkpoint does not match config.json: {}",
        problems.join("; ")
    );
    if total > 20 {
        msg.push_str(&format!("; ... and {} more", total - 20));
    }
    Err(fmt_err(path, msg))
}

/// A checked checkpoint: its config, its parameters in f32, and the warnings of the check.
#[derive(Debug)]
pub struct Checkpoint {
    pub config: ModelConfig,
    pub tensors: TensorMap,
    pub warnings: Vec<String>,
    pub weights: WeightsSource,
}

/// Loads `dir/config.json` and the folder's weights, checked against [`expected_tensors`].
pub fn load_checkpoint(dir: impl AsRef<Path>) -> Result<Checkpoint> {
    let dir = dir.as_ref();
    let config = ModelConfig::from_file(dir.join("config.json"))?;
    let weights = WeightsSource::find(dir)?;
    let LoadedTensors { mut tensors, files } = read_weights(&weights)?;
    let warnings = check_tensors(&config, &mut tensors, &files, weights.path())?;
    Ok(Checkpoint {
        config,
        tensors,
        warnings,
        weights,
    })
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `path` atomically: `write` fills a temp file in the same folder, which is fsynced and
/// renamed over `path`; the folder is then fsynced (best effort). On any error the temp file is
/// removed and `path` is untouched.
pub fn write_atomic(
    path: impl AsRef<Path>,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let fname = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        fname.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> std::io::Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path, e));
    }
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `tensors` as a safetensors file in `dtype`, atomically (see [`write_atomic`]).
pub fn save_safetensors(path: impl AsRef<Path>, tensors: &TensorMap, dtype: Dtype) -> Result<()> {
    let path = path.as_ref();
    let esize = match dtype {
        Dtype::F32 => 4,
        Dtype::BF16 => 2,
    };
    let mut header = Map::new();
    let mut meta = Map::new();
    meta.insert("format".into(), "pt".into());
    header.insert("__metadata__".into(), Value::Object(meta));
    let mut offset = 0usize;
    for (name, t) in tensors {
        if name.is_empty() || name == "__metadata__" {
            return Err(Error::Invalid(format!(
                "{}: tensor name \"{name}\" is not allowed",
                path.display()
            )));
        }
        let n = numel(&t.shape).ok_or_else(|| {
            Error::Shape(format!("tensor `{name}`: shape {:?} overflows", t.shape))
        })?;
        crate::error::check_len(&format!("tensor `{name}` data"), t.data.len(), n)?;
        let end = offset + n * esize;
        let mut e = Map::new();
        e.insert("dtype".into(), dtype.safetensors_name().into());
        e.insert(
            "shape".into(),
            t.shape.iter().map(|&d| Value::from(d)).collect(),
        );
        e.insert(
            "data_offsets".into(),
            Value::Array(vec![offset.into(), end.into()]),
        );
        header.insert(name.clone(), Value::Object(e));
        offset = end;
    }
    let mut hbytes = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| Error::Invalid(format!("{}: header: {e}", path.display())))?;
    // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
    while hbytes.len() % 8 != 0 {
        hbytes.push(b' ');
    }
    write_atomic(path, |w| {
        w.write_all(&(hbytes.len() as u64).to_le_bytes())?;
        w.write_all(&hbytes)?;
        let mut chunk = Vec::with_capacity(1 << 16);
        for t in tensors.values() {
            for block in t.data.chunks(1 << 14) {
                chunk.clear();
                match dtype {
                    Dtype::F32 => block
                        .iter()
                        .for_each(|x| chunk.extend_from_slice(&x.to_le_bytes())),
                    Dtype::BF16 => block.iter().for_each(|&x| {
                        chunk.extend_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes())
                    }),
                }
                w.write_all(&chunk)?;
            }
        }
        Ok(())
    })
}

/// Writes an HF model folder that transformers loads: `config.json` (with `torch_dtype` set to
/// `dtype`), `model.safetensors`, and copies of `tokenizer_files` (tokenizer.json,
/// tokenizer_config.json, chat_template.jinja ...) under their own names. The tensors are checked
/// against the config first ([`check_tensors`]), so an incomplete export is refused.
pub fn save_hf_folder(
    dir: impl AsRef<Path>,
    config: &ModelConfig,
    tensors: &TensorMap,
    dtype: Dtype,
    tokenizer_files: &[&Path],
) -> Result<()> {
    let dir = dir.as_ref();
    let weights = dir.join("model.safetensors");
    let mut check = tensors.clone();
    let warnings = check_tensors(config, &mut check, &HashMap::new(), &weights)?;
    if !warnings.is_empty() {
        // Export exactly the parameters of the config; drop the harmless extras.
        return save_hf_folder(dir, config, &check, dtype, tokenizer_files);
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let mut cfg = config.clone();
    cfg.torch_dtype = Some(dtype.torch_name().to_string());
    let cfg_json = cfg.to_json();
    write_atomic(dir.join("config.json"), |w| {
        w.write_all(cfg_json.as_bytes())
    })?;
    save_safetensors(&weights, tensors, dtype)?;
    for src in tokenizer_files {
        let name = src.file_name().ok_or_else(|| {
            Error::Invalid(format!("tokenizer file {} has no file name", src.display()))
        })?;
        let dst = dir.join(name);
        let same = match (src.canonicalize(), dst.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            continue;
        }
        let bytes = std::fs::read(src).map_err(|e| io_err(src, e))?;
        write_atomic(&dst, |w| w.write_all(&bytes))?;
    }
    Ok(())
}
