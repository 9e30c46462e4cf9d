//! Hugging Face I/O: config.json, safetensors checkpoints (single and sharded), tokenizer and chat
//! template, writers, and one test per kind of bad input.
//!
//! The truths are files written by transformers/PyTorch (`tools/reference/make_tiny_models.py`):
//! the tiny checkpoints, their golden files (parameter names from `named_parameters`, copies of
//! parameter values), `tokenizer_cases.json` (encodings and rendered chat templates) and
//! `param_shapes.json` (parameter shapes of more config variants). Corrupt inputs are made in a
//! temp dir by each test.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use common::Rng;
use dfpo::model::checkpoint::{
    check_tensors, expected_tensors, load_checkpoint, parse_safetensors_any, read_safetensors,
    read_safetensors_any, read_weights, save_hf_folder, save_safetensors, write_atomic, AnyTensor,
    Dtype, Tensor, TensorMap, WeightsSource,
};
use dfpo::model::config::{ModelConfig, ModelType};
use dfpo::model::tokenizer::{ChatMessage, Tokenizer};
use serde_json::Value;

fn fixtures() -> PathBuf {
    common::fixtures_dir()
}

fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "dfpo-hf_io-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies every file of fixture folder `name` into a new temp dir.
fn copy_fixture(name: &str) -> TempDir {
    let t = TempDir::new(name);
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), t.join(e.file_name().to_str().unwrap())).unwrap();
    }
    t
}

/// Asserts `r` is an error whose message contains every one of `needles`.
#[track_caller]
fn assert_err<T>(r: dfpo::Result<T>, needles: &[&str]) -> String {
    let msg = match r {
        Ok(_) => panic!("expected an error containing {needles:?}, got Ok"),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(
            msg.contains(n),
            "error message lacks {n:?}:\n  {msg}\n(expected all of {needles:?})"
        );
    }
    msg
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn cases() -> Value {
    read_json(&fixture("tokenizer_cases.json"))
}

fn golden(model: &str) -> BTreeMap<String, AnyTensor> {
    read_safetensors_any(fixture(model).join("golden.safetensors")).unwrap()
}

fn float(t: &AnyTensor) -> &Tensor {
    match t {
        AnyTensor::Float(t) => t,
        AnyTensor::Int(_) => panic!("expected a float tensor"),
    }
}

fn ints(t: &AnyTensor) -> (&[usize], &[i64]) {
    match t {
        AnyTensor::Int(t) => (&t.shape, &t.data),
        AnyTensor::Float(_) => panic!("expected an int tensor"),
    }
}

fn as_u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// config.json

#[test]
fn config_fields_of_the_tiny_checkpoints() {
    let c = cases();
    let vocab = c["vocab_size"].as_u64().unwrap() as usize;
    let (bos, eos, pad) = (
        c["bos_token_id"].as_u64().unwrap() as u32,
        c["eos_token_id"].as_u64().unwrap() as u32,
        c["pad_token_id"].as_u64().unwrap() as u32,
    );
    for (name, mt, tied, bias, eps, theta, dtype) in [
        (
            "tiny-llama",
            ModelType::Llama,
            false,
            false,
            1e-5,
            1e4,
            "bfloat16",
        ),
        (
            "tiny-llama-sharded",
            ModelType::Llama,
            false,
            false,
            1e-5,
            1e4,
            "float16",
        ),
        (
            "tiny-qwen2",
            ModelType::Qwen2,
            true,
            true,
            1e-6,
            1e6,
            "float32",
        ),
    ] {
        let cfg = ModelConfig::from_file(fixture(name).join("config.json")).unwrap();
        assert_eq!(cfg.model_type, mt, "{name}");
        assert_eq!(cfg.vocab_size, vocab, "{name}");
        assert_eq!(cfg.hidden_size, 64, "{name}");
        assert_eq!(cfg.intermediate_size, 128, "{name}");
        assert_eq!(cfg.num_hidden_layers, 2, "{name}");
        assert_eq!(cfg.num_attention_heads, 4, "{name}");
        assert_eq!(cfg.num_key_value_heads, 2, "{name}");
        assert_eq!(cfg.head_dim, 16, "{name}");
        assert_eq!(cfg.max_position_embeddings, 128, "{name}");
        assert_eq!(cfg.tie_word_embeddings, tied, "{name}");
        assert_eq!(cfg.attention_bias, bias, "{name}");
        assert!(!cfg.o_proj_bias(), "{name}");
        assert_eq!(cfg.rms_norm_eps, eps, "{name}");
        assert_eq!(cfg.rope_theta, theta, "{name}");
        assert_eq!(cfg.bos_token_id, Some(bos), "{name}");
        assert_eq!(cfg.eos_token_ids, vec![eos], "{name}");
        assert_eq!(cfg.pad_token_id, Some(pad), "{name}");
        assert_eq!(cfg.torch_dtype.as_deref(), Some(dtype), "{name}");
        assert_eq!((cfg.q_dim(), cfg.kv_dim()), (64, 32), "{name}");
    }
}

/// A transformers v4-style config with only the required fields: the defaults apply.
#[test]
fn config_defaults_and_v4_style_fields() {
    let text = r#"{"model_type": "llama", "vocab_size": 100, "hidden_size": 48,
        "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 6,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "torch_dtype": "bfloat16",
        "eos_token_id": [7, 9], "bos_token_id": null, "rope_scaling": null,
        "transformers_version": "4.40.0"}"#;
    let cfg = ModelConfig::from_json_str(text, "mem/config.json").unwrap();
    assert_eq!(cfg.num_key_value_heads, 6);
    assert_eq!(cfg.head_dim, 8);
    assert_eq!(cfg.rope_theta, 10000.0);
    assert!(!cfg.tie_word_embeddings);
    assert!(!cfg.attention_bias);
    assert_eq!(cfg.bos_token_id, None);
    assert_eq!(cfg.eos_token_ids, vec![7, 9]);
    assert_eq!(cfg.pad_token_id, None);
    assert_eq!(cfg.torch_dtype.as_deref(), Some("bfloat16"));

    let text = r#"{"model_type": "llama", "vocab_size": 100, "hidden_size": 48,
        "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 6,
        "num_key_value_heads": 2, "rope_theta": 500000, "attention_bias": true,
        "tie_word_embeddings": true, "rms_norm_eps": 1e-5, "max_position_embeddings": 512}"#;
    let cfg = ModelConfig::from_json_str(text, "mem/config.json").unwrap();
    assert_eq!(cfg.rope_theta, 500000.0);
    assert!(cfg.attention_bias && cfg.o_proj_bias() && cfg.tie_word_embeddings);
    assert_eq!(cfg.num_key_value_heads, 2);
}

/// `to_json` writes back a config that reads as the same config, in the style of the source
/// (v5 `rope_parameters`/`dtype` or v4 `rope_theta`/`torch_dtype`), keeping unknown fields.
#[test]
fn config_to_json_round_trip() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let path = fixture(name).join("config.json");
        let cfg = ModelConfig::from_file(&path).unwrap();
        let back = ModelConfig::from_json_str(&cfg.to_json(), "back").unwrap();
        assert_eq!(back, cfg, "{name}");
        let v: Value = serde_json::from_str(&cfg.to_json()).unwrap();
        let src = read_json(&path);
        for key in [
            "transformers_version",
            "rope_parameters",
            "dtype",
            "use_cache",
        ] {
            assert_eq!(v[key], src[key], "{name}: field {key}");
        }
        assert_eq!(v["architectures"][0], src["architectures"][0], "{name}");
    }
    let text = r#"{"model_type": "qwen2", "vocab_size": 100, "hidden_size": 48,
        "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 6,
        "num_key_value_heads": 2, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512, "torch_dtype": "float32", "sliding_window": 4096}"#;
    let cfg = ModelConfig::from_json_str(text, "mem").unwrap();
    let v: Value = serde_json::from_str(&cfg.to_json()).unwrap();
    assert_eq!(v["rope_theta"], 1000000.0);
    assert_eq!(v["torch_dtype"], "float32");
    assert_eq!(v["sliding_window"], 4096);
    assert_eq!(v["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(
        ModelConfig::from_json_str(&cfg.to_json(), "back").unwrap(),
        cfg
    );
}

/// Writes `text` as config.json in a temp dir and expects an error naming the file and `needles`.
#[track_caller]
fn bad_config(text: &str, needles: &[&str]) {
    let t = TempDir::new("cfg");
    let path = t.join("config.json");
    std::fs::write(&path, text).unwrap();
    let p = path.display().to_string();
    let mut all = vec![p.as_str()];
    all.extend_from_slice(needles);
    assert_err(ModelConfig::from_file(&path), &all);
}

/// The tiny Llama config with `edit` applied to its JSON object.
fn llama_config_with(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
    let mut v = read_json(&fixture("tiny-llama").join("config.json"));
    edit(v.as_object_mut().unwrap());
    v.to_string()
}

#[test]
fn config_bad_json() {
    bad_config(
        r#"{"model_type": "llama", "hidden_size": 64,"#,
        &["not valid JSON"],
    );
    bad_config("[1, 2]", &["JSON object"]);
}

#[test]
fn config_missing_field() {
    bad_config(
        &llama_config_with(|o| {
            o.remove("hidden_size");
        }),
        &["missing required field `hidden_size`"],
    );
    bad_config(
        &llama_config_with(|o| {
            o.remove("model_type");
        }),
        &["`model_type`"],
    );
}

#[test]
fn config_unknown_model_type() {
    bad_config(
        &llama_config_with(|o| {
            o.insert("model_type".into(), "mistral".into());
        }),
        &["unsupported model_type \"mistral\""],
    );
}

#[test]
fn config_zero_heads() {
    bad_config(
        &llama_config_with(|o| {
            o.insert("num_attention_heads".into(), 0.into());
        }),
        &["`num_attention_heads`", "positive"],
    );
    bad_config(
        &llama_config_with(|o| {
            o.insert("num_key_value_heads".into(), 0.into());
        }),
        &["`num_key_value_heads`", "positive"],
    );
}

#[test]
fn config_inconsistent_or_unsupported_fields() {
    let cases: Vec<(String, &[&str])> = vec![
        (
            llama_config_with(|o| {
                o.insert("num_key_value_heads".into(), 3.into());
            }),
            &["`num_key_value_heads` = 3 does not divide `num_attention_heads` = 4"],
        ),
        (
            llama_config_with(|o| {
                o.remove("head_dim");
                o.insert("hidden_size".into(), 66.into());
            }),
            &["`num_attention_heads` = 4 does not divide `hidden_size` = 66"],
        ),
        (
            llama_config_with(|o| {
                o.insert("head_dim".into(), 15.into());
            }),
            &["`head_dim` = 15 must be even"],
        ),
        (
            llama_config_with(|o| {
                o.insert(
                    "rope_scaling".into(),
                    serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
                );
            }),
            &["`rope_scaling`", "unsupported"],
        ),
        (
            llama_config_with(|o| {
                o.insert(
                    "rope_parameters".into(),
                    serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4}),
                );
            }),
            &["rope_type", "\"yarn\""],
        ),
        (
            llama_config_with(|o| {
                o.insert("hidden_act".into(), "gelu".into());
            }),
            &["hidden_act \"gelu\""],
        ),
        (
            llama_config_with(|o| {
                o.insert("mlp_bias".into(), true.into());
            }),
            &["`mlp_bias`"],
        ),
        (
            llama_config_with(|o| {
                o.insert("hidden_size".into(), "64".into());
            }),
            &["`hidden_size` must be a non-negative integer"],
        ),
        (
            llama_config_with(|o| {
                o.insert("rms_norm_eps".into(), (-1.0).into());
            }),
            &["`rms_norm_eps`"],
        ),
        (
            llama_config_with(|o| {
                o.insert("eos_token_id".into(), serde_json::json!([0, 500]));
            }),
            &["`eos_token_id` = 500 is outside the vocabulary"],
        ),
        (
            llama_config_with(|o| {
                o.insert("model_type".into(), "qwen2".into());
                o.insert("use_sliding_window".into(), true.into());
            }),
            &["`use_sliding_window`"],
        ),
        (
            llama_config_with(|o| {
                o.insert(
                    "layer_types".into(),
                    serde_json::json!(["full_attention", "sliding_attention"]),
                );
            }),
            &["`layer_types`"],
        ),
    ];
    for (text, needles) in cases {
        bad_config(&text, needles);
    }
}

// ---------------------------------------------------------------------------------------------
// checkpoints

/// Every expected tensor is present with the right shape, nothing else is, and the expected
/// names are exactly the parameters PyTorch differentiated (the golden gradients' names).
#[test]
fn checkpoints_have_every_expected_tensor() {
    for (name, golden_of, n_expected) in [
        ("tiny-llama", "tiny-llama", 21),
        ("tiny-llama-sharded", "tiny-llama", 21),
        ("tiny-qwen2", "tiny-qwen2", 26),
    ] {
        let ck = load_checkpoint(fixture(name)).unwrap();
        assert!(ck.warnings.is_empty(), "{name}: {:?}", ck.warnings);
        let exp = expected_tensors(&ck.config);
        assert_eq!(exp.len(), n_expected, "{name}");
        assert_eq!(ck.tensors.len(), exp.len(), "{name}");
        for (t, shape) in &exp {
            assert_eq!(&ck.tensors[t].shape, shape, "{name}: {t}");
            assert_eq!(ck.tensors[t].data.len(), shape.iter().product::<usize>());
            assert!(
                ck.tensors[t].data.iter().all(|x| x.is_finite()),
                "{name}: {t}"
            );
        }
        let g = golden(golden_of);
        let torch_params: BTreeSet<String> = g
            .keys()
            .filter_map(|k| k.strip_prefix("grad.").map(str::to_string))
            .collect();
        let ours: BTreeSet<String> = exp.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(ours, torch_params, "{name}");
        for (t, shape) in &exp {
            assert_eq!(
                &float(&g[&format!("grad.{t}")]).shape,
                shape,
                "{name}: grad.{t}"
            );
        }
    }
}

/// `expected_tensors` against transformers' `named_parameters` for three more config variants
/// (Llama attention_bias -> q/k/v/o biases, tied; heads * head_dim != hidden; untied Qwen2 MHA).
#[test]
fn expected_tensors_match_transformers_variants() {
    let all = read_json(&fixture("param_shapes.json"));
    let all = all.as_object().unwrap();
    assert_eq!(all.len(), 3);
    for (variant, v) in all {
        let cfg = ModelConfig::from_json_str(&v["config"].to_string(), variant).unwrap();
        let ours: BTreeMap<String, Vec<usize>> = expected_tensors(&cfg).into_iter().collect();
        let torch: BTreeMap<String, Vec<usize>> = v["params"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, s)| {
                let s = s.as_array().unwrap();
                (
                    k.clone(),
                    s.iter().map(|d| d.as_u64().unwrap() as usize).collect(),
                )
            })
            .collect();
        assert_eq!(ours, torch, "{variant}");
    }
}

/// Loaded values equal PyTorch's own copies of the parameters (BF16 and F32 files exactly; the
/// F16 shards within f16 rounding), and the sharded copy equals the single file.
#[test]
fn checkpoint_values_match_golden_copies() {
    for (name, golden_of) in [("tiny-llama", "tiny-llama"), ("tiny-qwen2", "tiny-qwen2")] {
        let ck = load_checkpoint(fixture(name)).unwrap();
        let g = golden(golden_of);
        let mut n = 0;
        for (k, t) in &g {
            if let Some(p) = k.strip_prefix("param.") {
                assert_eq!(&ck.tensors[p], float(t), "{name}: {p}");
                n += 1;
            }
        }
        assert_eq!(n, 2, "{name}: golden parameter copies");
    }
    let single = load_checkpoint(fixture("tiny-llama")).unwrap();
    let sharded = load_checkpoint(fixture("tiny-llama-sharded")).unwrap();
    assert!(matches!(sharded.weights, WeightsSource::Sharded(_)));
    assert!(matches!(single.weights, WeightsSource::Single(_)));
    let mut exact = 0usize;
    let mut total = 0usize;
    for (k, a) in &single.tensors {
        let b = &sharded.tensors[k];
        assert_eq!(a.shape, b.shape, "{k}");
        for (&x, &y) in a.data.iter().zip(&b.data) {
            // f16: 11 significant bits, subnormal spacing 2^-24.
            let tol = x.abs() * 2f32.powi(-11) + 2f32.powi(-24);
            assert!((x - y).abs() <= tol, "{k}: bf16 {x} vs f16 {y}");
            exact += (x == y) as usize;
            total += 1;
        }
    }
    // bf16 values inside the f16 normal range are exact in f16; only tiny ones round.
    assert!(
        exact * 10 > total * 9,
        "only {exact} of {total} f16 values exact"
    );
}

#[test]
fn sharded_index_reads_every_shard() {
    let src = WeightsSource::find(fixture("tiny-llama-sharded")).unwrap();
    let WeightsSource::Sharded(index) = &src else {
        panic!("expected the index")
    };
    let loaded = read_weights(&src).unwrap();
    let shards: BTreeSet<&PathBuf> = loaded.files.values().collect();
    let index_json = read_json(index);
    let map = index_json["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), loaded.tensors.len());
    let named: BTreeSet<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(shards.len(), named.len());
    assert!(shards.len() >= 2);
    for (t, shard) in map {
        assert_eq!(
            loaded.files[t].file_name().unwrap().to_str().unwrap(),
            shard.as_str().unwrap()
        );
    }
}

#[test]
fn golden_files_are_consistent() {
    let c = cases();
    let pad = c["pad_token_id"].as_i64().unwrap();
    for model in ["tiny-llama", "tiny-qwen2"] {
        let g = golden(model);
        let (ishape, ids) = ints(&g["input_ids"]);
        let (mshape, mask) = ints(&g["attention_mask"]);
        assert_eq!(ishape, mshape);
        let (b, t) = (ishape[0], ishape[1]);
        assert_eq!(b, 2);
        let cfg = ModelConfig::from_file(fixture(model).join("config.json")).unwrap();
        assert_eq!(float(&g["logits"]).shape, vec![b, t, cfg.vocab_size]);
        assert_eq!(float(&g["token_logprobs"]).shape, vec![b, t - 1]);
        assert_eq!(float(&g["loss"]).shape, Vec::<usize>::new());
        // The golden rows are the tokenizer's encodings of the first two recorded texts, padded.
        for row in 0..b {
            let want = as_u32s(&c["encode"][row]["ids_special"]);
            let len = mask[row * t..(row + 1) * t].iter().sum::<i64>() as usize;
            assert_eq!(len, want.len());
            for j in 0..t {
                let id = ids[row * t + j];
                if j < len {
                    assert_eq!(id, want[j] as i64);
                    assert_eq!(mask[row * t + j], 1);
                } else {
                    assert_eq!((id, mask[row * t + j]), (pad, 0));
                }
            }
        }
        // loss = mean of -token_logprobs over the mask.
        let (_, lmask) = ints(&g["logprob_mask"]);
        let lp = &float(&g["token_logprobs"]).data;
        let n: i64 = lmask.iter().sum();
        let s: f64 = lp.iter().map(|&x| -x as f64).sum();
        let loss = float(&g["loss"]).data[0] as f64;
        assert!(
            (s / n as f64 - loss).abs() < 1e-5 * loss.abs(),
            "{model}: {loss}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// tokenizer and chat template

#[test]
fn tokenizer_round_trip_matches_transformers() {
    let c = cases();
    for model in ["tiny-llama", "tiny-qwen2"] {
        let tok = Tokenizer::from_dir(fixture(model)).unwrap();
        assert_eq!(tok.vocab_size() as u64, c["vocab_size"].as_u64().unwrap());
        assert_eq!(
            tok.bos_token_id(),
            Some(c["bos_token_id"].as_u64().unwrap() as u32)
        );
        assert_eq!(
            tok.eos_token_id(),
            Some(c["eos_token_id"].as_u64().unwrap() as u32)
        );
        assert_eq!(
            tok.pad_token_id(),
            Some(c["pad_token_id"].as_u64().unwrap() as u32)
        );
        assert_eq!(tok.bos_token.as_deref(), c["bos_token"].as_str());
        assert_eq!(tok.special_token_ids(), as_u32s(&c["special_ids"]));
        let cfg = ModelConfig::from_file(fixture(model).join("config.json")).unwrap();
        assert_eq!(tok.vocab_size(), cfg.vocab_size);
        for e in c["encode"].as_array().unwrap() {
            let text = e["text"].as_str().unwrap();
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(ids, as_u32s(&e["ids"]), "{text:?}");
            let ids_sp = tok.encode(text, true).unwrap();
            assert_eq!(ids_sp, as_u32s(&e["ids_special"]), "{text:?}");
            assert_eq!(
                tok.decode(&ids_sp, true).unwrap(),
                e["decoded_skip_special"].as_str().unwrap()
            );
            assert_eq!(
                tok.decode(&ids_sp, false).unwrap(),
                e["decoded"].as_str().unwrap()
            );
        }
        assert_err(
            tok.decode(&[1, 100_000], false),
            &["token id 100000", "tokenizer.json"],
        );
    }
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

fn check_chat_cases(tok: &Tokenizer) {
    let c = cases();
    let chats = c["chat"].as_array().unwrap();
    assert_eq!(chats.len(), 4);
    for case in chats {
        let msgs = messages(&case["messages"]);
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let text = tok.apply_chat_template(&msgs, agp).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "agp {agp}");
        assert_eq!(tok.encode_chat(&msgs, agp).unwrap(), as_u32s(&case["ids"]));
    }
    let bad = &c["chat_bad_role"];
    assert_err(
        tok.apply_chat_template(&messages(&bad["messages"]), false),
        &[bad["error"].as_str().unwrap(), "chat template"],
    );
}

/// Rendered chat templates equal transformers' `apply_chat_template`, from `chat_template.jinja`
/// (what transformers v5 saves) and from `tokenizer_config.json`'s `chat_template` (v4).
#[test]
fn chat_template_matches_transformers() {
    let tok = Tokenizer::from_dir(fixture("tiny-qwen2")).unwrap();
    check_chat_cases(&tok);

    let t = copy_fixture("tiny-qwen2");
    let template = std::fs::read_to_string(t.join("chat_template.jinja")).unwrap();
    std::fs::remove_file(t.join("chat_template.jinja")).unwrap();
    let mut cfg = read_json(&t.join("tokenizer_config.json"));
    cfg["chat_template"] = template.clone().into();
    std::fs::write(t.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok = Tokenizer::from_dir(t.path()).unwrap();
    assert_eq!(tok.chat_template(), Some(template.as_str()));
    check_chat_cases(&tok);

    // The list form: [{name, template}], "default" is used.
    cfg["chat_template"] = serde_json::json!([
        {"name": "tool_use", "template": "nope"},
        {"name": "default", "template": template},
    ]);
    std::fs::write(t.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    check_chat_cases(&Tokenizer::from_dir(t.path()).unwrap());
}

#[test]
fn chat_template_absent_or_broken() {
    let t = TempDir::new("notemplate");
    std::fs::copy(
        fixture("tiny-llama").join("tokenizer.json"),
        t.join("tokenizer.json"),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(t.path()).unwrap();
    assert_eq!(tok.chat_template(), None);
    let msgs = [ChatMessage::new("user", "hi")];
    assert_err(
        tok.apply_chat_template(&msgs, true),
        &["tokenizer_config.json", "no `chat_template`"],
    );
    // A tokenizer.json alone also encodes.
    assert!(!tok.encode("12 + 7", false).unwrap().is_empty());

    std::fs::write(
        t.join("chat_template.jinja"),
        "{% for m in messages %}{{ m.content }",
    )
    .unwrap();
    let tok = Tokenizer::from_dir(t.path()).unwrap();
    assert_err(
        tok.apply_chat_template(&msgs, true),
        &["chat_template.jinja", "chat template"],
    );
}

#[test]
fn tokenizer_missing_or_malformed() {
    let t = TempDir::new("tok");
    let p = t.join("tokenizer.json");
    let ps = p.display().to_string();
    assert_err(Tokenizer::from_file(&p), &[&ps]);
    assert_err(Tokenizer::from_dir(t.path()), &[&ps]);

    std::fs::write(
        &p,
        r#"{"version": "1.0", "model": {"type": "BPE", "vocab": "#,
    )
    .unwrap();
    assert_err(Tokenizer::from_file(&p), &[&ps, "not valid JSON"]);

    std::fs::write(&p, r#"{"version": "1.0", "model": {"type": "Nonsense"}}"#).unwrap();
    assert_err(
        Tokenizer::from_file(&p),
        &[&ps, "not a valid tokenizer.json"],
    );

    // Truncation/padding settings saved in tokenizer.json do not apply (as in transformers).
    let mut v = read_json(&fixture("tiny-llama").join("tokenizer.json"));
    v["truncation"] = serde_json::json!({"direction": "Right", "max_length": 3,
        "strategy": "LongestFirst", "stride": 0});
    v["padding"] = serde_json::json!({"strategy": {"Fixed": 40}, "direction": "Right",
        "pad_to_multiple_of": null, "pad_id": 1, "pad_type_id": 0, "pad_token": "<|pad|>"});
    std::fs::write(&p, v.to_string()).unwrap();
    let c = cases();
    let e = &c["encode"][0];
    let tok = Tokenizer::from_file(&p).unwrap();
    assert_eq!(
        tok.encode(e["text"].as_str().unwrap(), true).unwrap(),
        as_u32s(&e["ids_special"])
    );

    // A good tokenizer.json with a broken tokenizer_config.json.
    std::fs::copy(fixture("tiny-llama").join("tokenizer.json"), &p).unwrap();
    let cp = t.join("tokenizer_config.json");
    std::fs::write(&cp, "{\"bos_token\": ").unwrap();
    assert_err(
        Tokenizer::from_dir(t.path()),
        &[&cp.display().to_string(), "not valid JSON"],
    );
    std::fs::write(&cp, r#"{"bos_token": "<|not-a-token|>"}"#).unwrap();
    assert_err(
        Tokenizer::from_dir(t.path()),
        &[&cp.display().to_string(), "`bos_token` \"<|not-a-token|>\""],
    );
}

// ---------------------------------------------------------------------------------------------
// writers

fn random_tensors(rng: &mut Rng) -> TensorMap {
    let mut m = TensorMap::new();
    for (name, shape) in [
        ("a.weight", vec![7, 5]),
        ("b.bias", vec![13]),
        ("c", vec![2, 3, 4]),
        ("scalar", vec![]),
        ("empty", vec![0, 3]),
    ] {
        let n = shape.iter().product::<usize>();
        let mut data = rng.normal_vec(n, 3.0);
        if name == "a.weight" {
            // Edge values: zeros, infinities, subnormals, extremes.
            let special = [
                0.0,
                -0.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                1e-40,
                -3e-39,
                f32::MAX,
                f32::MIN_POSITIVE,
                1.0 + f32::EPSILON,
            ];
            data[..special.len()].copy_from_slice(&special);
        }
        m.insert(name.to_string(), Tensor::new(shape, data).unwrap());
    }
    m
}

fn dir_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

#[test]
fn save_load_f32_is_exact() {
    let mut rng = Rng::fresh("save_load_f32_is_exact");
    let t = TempDir::new("f32");
    let tensors = random_tensors(&mut rng);
    let path = t.join("x.safetensors");
    save_safetensors(&path, &tensors, Dtype::F32).unwrap();
    let back = read_safetensors(&path).unwrap();
    assert_eq!(back.len(), tensors.len());
    for (k, a) in &tensors {
        let b = &back[k];
        assert_eq!(a.shape, b.shape, "{k}");
        let same = a
            .data
            .iter()
            .zip(&b.data)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{k}: f32 round trip not bit-exact");
    }
    // The reference parser reads our file too, with the format metadata transformers needs.
    let bytes = std::fs::read(&path).unwrap();
    let (n, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(n % 8, 0, "header padded to 8 bytes");
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    // And a real checkpoint survives too.
    let ck = load_checkpoint(fixture("tiny-qwen2")).unwrap();
    save_safetensors(t.join("m.safetensors"), &ck.tensors, Dtype::F32).unwrap();
    assert_eq!(
        read_safetensors(t.join("m.safetensors")).unwrap(),
        ck.tensors
    );
    assert_eq!(
        dir_names(t.path()),
        ["m.safetensors", "x.safetensors"].map(String::from).into()
    );
}

#[test]
fn save_load_bf16_rounds_to_nearest_even() {
    let mut rng = Rng::fresh("save_load_bf16_rounds_to_nearest_even");
    let t = TempDir::new("bf16");
    let tensors = random_tensors(&mut rng);
    let path = t.join("x.safetensors");
    save_safetensors(&path, &tensors, Dtype::BF16).unwrap();
    let back = read_safetensors(&path).unwrap();
    for (k, a) in &tensors {
        let b = &back[k];
        assert_eq!(a.shape, b.shape, "{k}");
        for (&x, &y) in a.data.iter().zip(&b.data) {
            // Independent bf16 rounding: round-to-nearest-even on the top 16 bits.
            let bits = x.to_bits();
            let want = if x.is_finite() {
                let r = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
                f32::from_bits(r)
            } else {
                x
            };
            assert_eq!(y.to_bits(), want.to_bits(), "{k}: {x} -> {y}, want {want}");
            if x.is_finite() && x.abs() < 1e38 && x.abs() > 1e-37 {
                assert!((x - y).abs() <= x.abs() * 2f32.powi(-8), "{k}: {x} -> {y}");
            }
        }
    }
    // The tiny Llama's weights are bf16 values: a BF16 save of them is exact.
    let ck = load_checkpoint(fixture("tiny-llama")).unwrap();
    save_safetensors(t.join("l.safetensors"), &ck.tensors, Dtype::BF16).unwrap();
    assert_eq!(
        read_safetensors(t.join("l.safetensors")).unwrap(),
        ck.tensors
    );
}

#[test]
fn atomic_write_leaves_no_temp_file() {
    let t = TempDir::new("atomic");
    let path = t.join("out.bin");
    write_atomic(&path, |w| w.write_all(b"first")).unwrap();
    write_atomic(&path, |w| w.write_all(b"second")).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"second");
    assert_eq!(dir_names(t.path()), ["out.bin".to_string()].into());
    // A writer that fails half-way: the old file stays, the temp file is gone.
    let r = write_atomic(&path, |w| {
        w.write_all(b"partial")?;
        Err(std::io::Error::other("disk full"))
    });
    assert_err(r, &["out.bin", "disk full"]);
    assert_eq!(std::fs::read(&path).unwrap(), b"second");
    assert_eq!(dir_names(t.path()), ["out.bin".to_string()].into());
    // Into a folder that does not exist: an error naming the path, nothing created.
    let missing = t.join("no/such/dir/x.safetensors");
    assert_err(
        save_safetensors(&missing, &TensorMap::new(), Dtype::F32),
        &["no/such/dir/x.safetensors"],
    );
    // Tensors whose data does not fit the shape are refused before anything is written.
    let mut bad = TensorMap::new();
    bad.insert(
        "x".into(),
        Tensor {
            shape: vec![2, 2],
            data: vec![1.0; 3],
        },
    );
    assert_err(
        save_safetensors(t.join("bad.safetensors"), &bad, Dtype::F32),
        &["x", "3"],
    );
    assert_eq!(dir_names(t.path()), ["out.bin".to_string()].into());
}

#[test]
fn save_hf_folder_round_trip() {
    for (model, dtype) in [("tiny-qwen2", Dtype::F32), ("tiny-llama", Dtype::BF16)] {
        let src = fixture(model);
        let ck = load_checkpoint(&src).unwrap();
        let t = TempDir::new("export");
        let out = t.join("export");
        let files = [
            src.join("tokenizer.json"),
            src.join("tokenizer_config.json"),
            src.join("chat_template.jinja"),
        ];
        let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        save_hf_folder(&out, &ck.config, &ck.tensors, dtype, &refs).unwrap();
        assert_eq!(
            dir_names(&out),
            [
                "chat_template.jinja",
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json"
            ]
            .map(String::from)
            .into()
        );
        let back = load_checkpoint(&out).unwrap();
        assert!(back.warnings.is_empty());
        let mut want_cfg = ck.config.clone();
        want_cfg.torch_dtype = Some(dtype.torch_name().to_string());
        assert_eq!(back.config, want_cfg, "{model}");
        // Qwen2's F32 and Llama's bf16-valued weights both survive exactly.
        assert_eq!(back.tensors, ck.tensors, "{model}");
        let tok = Tokenizer::from_dir(&out).unwrap();
        check_chat_cases(&tok);

        // An incomplete export is refused, naming the missing tensor.
        let mut partial = ck.tensors.clone();
        partial.remove("model.norm.weight");
        assert_err(
            save_hf_folder(t.join("partial"), &ck.config, &partial, dtype, &[]),
            &["missing tensor `model.norm.weight`"],
        );
        assert!(!t.join("partial").exists());
    }
}

// ---------------------------------------------------------------------------------------------
// bad safetensors files

/// A raw safetensors image: header length, header text, data.
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

/// Writes `bytes` to a temp file and expects read_safetensors to fail naming the file and
/// every needle.
#[track_caller]
fn bad_file(bytes: &[u8], needles: &[&str]) -> String {
    let t = TempDir::new("bad");
    let path = t.join("model.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let p = path.display().to_string();
    let mut all = vec![p.as_str()];
    all.extend_from_slice(needles);
    let msg = assert_err(read_safetensors(&path), &all);
    // The loader in a checkpoint folder reports the same problem.
    std::fs::copy(
        fixture("tiny-llama").join("config.json"),
        t.join("config.json"),
    )
    .unwrap();
    assert_err(load_checkpoint(t.path()), &all);
    msg
}

#[test]
fn bad_truncated_file() {
    let good = std::fs::read(fixture("tiny-llama").join("model.safetensors")).unwrap();
    bad_file(
        &good[..good.len() - 100],
        &["past the end of the data section", "truncated"],
    );
    bad_file(&good[..good.len() / 2], &["past the end"]);
    bad_file(&good[..5], &["too short"]);
    bad_file(&[], &["0 bytes", "too short"]);
    // Cut inside the header.
    bad_file(
        &good[..20],
        &["header length", "runs past the end of the file"],
    );
}

#[test]
fn bad_header_lies_about_sizes() {
    let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    bad_file(
        &raw(h, &[0u8; 8]),
        &["tensor `a`", "[0, 16]", "past the end"],
    );
    let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
    bad_file(
        &raw(h, &[0u8; 8]),
        &["tensor `a`", "span 8 bytes", "needs 16 bytes"],
    );
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    bad_file(
        &raw(h, &[0u8; 12]),
        &["data section is 12 bytes", "describes 8"],
    );
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#;
    bad_file(&raw(h, &[0u8; 8]), &["begin > end"]);
    let h = r#"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}}"#;
    bad_file(&raw(h, &[0u8; 8]), &["tensor `a`", "overflows"]);
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}}"#;
    bad_file(&raw(h, &[0u8; 8]), &["tensor `a`", "data_offsets"]);
    let h = r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#;
    bad_file(&raw(h, &[0u8; 8]), &["tensor `a`", "shape"]);
}

#[test]
fn bad_overlapping_or_gapped_offsets() {
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
               "b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    bad_file(
        &raw(h, &[0u8; 12]),
        &["`a` [0, 8]", "`b` [4, 12]", "overlap"],
    );
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
               "b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}"#;
    bad_file(&raw(h, &[0u8; 20]), &["gap of 4", "`b`"]);
    // Two names for the same bytes.
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
               "b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    bad_file(&raw(h, &[0u8; 8]), &["overlap"]);
}

#[test]
fn bad_header_length_past_eof() {
    let mut v = 1000u64.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    bad_file(
        &v,
        &[
            "header length 1000",
            "runs past the end of the file (10 bytes",
        ],
    );
    let mut v = u64::MAX.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    bad_file(&v, &["header length", "exceeds"]);
}

#[test]
fn bad_invalid_json_header() {
    bad_file(
        &raw("{\"a\": {\"dtype\": ", &[]),
        &["header is not valid JSON"],
    );
    bad_file(&raw("[1,2,3]", &[]), &["not a JSON object"]);
    let mut v = 4u64.to_le_bytes().to_vec();
    v.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
    bad_file(&v, &["not valid UTF-8"]);
    bad_file(
        &raw(r#"{"a": 5}"#, &[]),
        &["tensor `a`", "must be an object"],
    );
    bad_file(
        &raw(r#"{"__metadata__": {"format": 5}}"#, &[]),
        &["__metadata__"],
    );
}

#[test]
fn bad_unknown_dtype() {
    let h = r#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#;
    bad_file(&raw(h, &[0u8; 8]), &["tensor `a`", "unknown dtype \"Q9\""]);
    let h = r#"{"a":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#;
    bad_file(
        &raw(h, &[0u8; 2]),
        &["tensor `a`", "unsupported dtype F8_E4M3"],
    );
    let h = r#"{"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#;
    bad_file(&raw(h, &[0u8; 8]), &["unsupported dtype F64"]);
    // Integers are fine in golden files but not as model weights.
    let h = r#"{"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#;
    bad_file(&raw(h, &[0u8; 8]), &["tensor `ids`", "integer dtype"]);
    let t = TempDir::new("int");
    std::fs::write(t.join("g.safetensors"), raw(h, &7i64.to_le_bytes())).unwrap();
    let any = read_safetensors_any(t.join("g.safetensors")).unwrap();
    assert_eq!(ints(&any["ids"]), (&[1usize][..], &[7i64][..]));
}

/// A copy of the tiny Llama folder whose tensors were changed by `edit`.
fn edited_llama(edit: impl FnOnce(&mut TensorMap)) -> TempDir {
    let t = copy_fixture("tiny-llama");
    let mut tensors = read_safetensors(t.join("model.safetensors")).unwrap();
    edit(&mut tensors);
    save_safetensors(t.join("model.safetensors"), &tensors, Dtype::F32).unwrap();
    t
}

#[test]
fn bad_missing_tensor() {
    let t = edited_llama(|m| {
        m.remove("model.norm.weight");
        m.remove("model.layers.1.mlp.up_proj.weight");
    });
    let file = t.join("model.safetensors").display().to_string();
    assert_err(
        load_checkpoint(t.path()),
        &[
            &file,
            "missing tensor `model.norm.weight` (expected shape [64])",
            "missing tensor `model.layers.1.mlp.up_proj.weight` (expected shape [128, 64])",
        ],
    );
}

#[test]
fn bad_misshaped_tensor() {
    let t = edited_llama(|m| {
        let k = m.get_mut("model.layers.0.self_attn.k_proj.weight").unwrap();
        k.shape = vec![64, 32];
        // Same element count, transposed: only the shape check can catch it.
    });
    let file = t.join("model.safetensors").display().to_string();
    assert_err(
        load_checkpoint(t.path()),
        &[
            &file,
            "tensor `model.layers.0.self_attn.k_proj.weight`",
            "has shape [64, 32], expected [32, 64]",
        ],
    );
}

#[test]
fn unexpected_tensors_error_or_warn() {
    // A bias the config does not declare: an error (running without it would be a different model).
    let t = edited_llama(|m| {
        m.insert(
            "model.layers.0.self_attn.o_proj.bias".into(),
            Tensor::new(vec![64], vec![0.5; 64]).unwrap(),
        );
    });
    assert_err(
        load_checkpoint(t.path()),
        &[
            "unexpected tensor `model.layers.0.self_attn.o_proj.bias`",
            "model.safetensors",
        ],
    );
    // Rotary inv_freq buffers are dropped with a warning.
    let t = edited_llama(|m| {
        m.insert(
            "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
            Tensor::new(vec![8], vec![1.0; 8]).unwrap(),
        );
    });
    let ck = load_checkpoint(t.path()).unwrap();
    assert_eq!(ck.warnings.len(), 1);
    assert!(ck.warnings[0].contains("rotary_emb.inv_freq"));
    assert!(!ck.tensors.keys().any(|k| k.contains("inv_freq")));

    // A tied model with an lm_head.weight: dropped if equal to the embedding, else an error.
    let src = load_checkpoint(fixture("tiny-qwen2")).unwrap();
    let mut tensors = src.tensors.clone();
    tensors.insert(
        "lm_head.weight".into(),
        tensors["model.embed_tokens.weight"].clone(),
    );
    let files = HashMap::new();
    let w = check_tensors(
        &src.config,
        &mut tensors,
        &files,
        Path::new("m.safetensors"),
    )
    .unwrap();
    assert_eq!(w.len(), 1);
    assert!(!tensors.contains_key("lm_head.weight"));
    tensors.insert(
        "lm_head.weight".into(),
        tensors["model.embed_tokens.weight"].clone(),
    );
    tensors.get_mut("lm_head.weight").unwrap().data[3] += 1.0;
    assert_err(
        check_tensors(
            &src.config,
            &mut tensors,
            &files,
            Path::new("m.safetensors"),
        ),
        &["m.safetensors", "`lm_head.weight`", "tie_word_embeddings"],
    );
}

#[test]
fn bad_sharded_index() {
    let t = copy_fixture("tiny-llama-sharded");
    let index = t.join("model.safetensors.index.json");
    let ip = index.display().to_string();
    let good = read_json(&index);

    std::fs::write(&index, "{\"weight_map\": {").unwrap();
    assert_err(load_checkpoint(t.path()), &[&ip, "not valid JSON"]);

    std::fs::write(&index, r#"{"metadata": {}}"#).unwrap();
    assert_err(load_checkpoint(t.path()), &[&ip, "`weight_map`"]);

    let mut v = good.clone();
    v["weight_map"]["model.norm.weight"] = "../../etc/passwd".into();
    std::fs::write(&index, v.to_string()).unwrap();
    assert_err(load_checkpoint(t.path()), &[&ip, "not a plain file name"]);

    // The index points a tensor at a shard that does not hold it.
    let mut v = good.clone();
    let holder = v["weight_map"]["model.norm.weight"]
        .as_str()
        .unwrap()
        .to_string();
    let other = good["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|s| s.as_str().unwrap())
        .find(|s| *s != holder)
        .unwrap()
        .to_string();
    v["weight_map"]["model.norm.weight"] = other.clone().into();
    std::fs::write(&index, v.to_string()).unwrap();
    assert_err(
        load_checkpoint(t.path()),
        &[&ip, "`model.norm.weight`", &other, "does not contain it"],
    );

    // A shard that is missing on disk.
    std::fs::write(&index, good.to_string()).unwrap();
    std::fs::remove_file(t.join(&holder)).unwrap();
    assert_err(load_checkpoint(t.path()), &[&holder]);

    // A corrupt shard names the shard.
    std::fs::write(t.join(&holder), b"garbage!garbage!").unwrap();
    assert_err(load_checkpoint(t.path()), &[&holder, "header length"]);
}

#[test]
fn bad_checkpoint_folder() {
    let t = TempDir::new("nofolder");
    // No config.json.
    assert_err(load_checkpoint(t.path()), &["config.json"]);
    // Config but no weights.
    std::fs::copy(
        fixture("tiny-llama").join("config.json"),
        t.join("config.json"),
    )
    .unwrap();
    assert_err(
        load_checkpoint(t.path()),
        &[&t.path().display().to_string(), "no model.safetensors"],
    );
    // Weights of the other architecture: every mismatch is named.
    std::fs::copy(
        fixture("tiny-qwen2").join("model.safetensors"),
        t.join("model.safetensors"),
    )
    .unwrap();
    assert_err(
        load_checkpoint(t.path()),
        &[
            "missing tensor `lm_head.weight`",
            "unexpected tensor `model.layers.0.self_attn.q_proj.bias`",
        ],
    );
}

/// Random corruptions of a small valid file never panic: each gives Ok or a Format error.
#[test]
fn corrupted_files_never_panic() {
    let mut rng = Rng::fresh("corrupted_files_never_panic");
    let t = TempDir::new("fuzz");
    let mut tensors = TensorMap::new();
    tensors.insert("w".into(), Tensor::new(vec![3, 2], vec![1.0; 6]).unwrap());
    tensors.insert("b".into(), Tensor::new(vec![2], vec![2.0; 2]).unwrap());
    save_safetensors(t.join("ok.safetensors"), &tensors, Dtype::BF16).unwrap();
    let good = std::fs::read(t.join("ok.safetensors")).unwrap();
    let path = Path::new("fuzz.safetensors");
    let (mut ok, mut err) = (0, 0);
    for _ in 0..3000 {
        let mut b = good.clone();
        match rng.next_u64() % 3 {
            0 => {
                let i = (rng.next_u64() as usize) % b.len();
                b[i] = rng.next_u64() as u8;
            }
            1 => b.truncate((rng.next_u64() as usize) % b.len()),
            _ => {
                let i = (rng.next_u64() as usize) % b.len();
                b[i] ^= 1 << (rng.next_u64() % 8);
                let j = (rng.next_u64() as usize) % b.len();
                b[j] = b"0123456789,[]{}\":"[(rng.next_u64() % 17) as usize];
            }
        }
        match parse_safetensors_any(path, &b) {
            Ok(_) => ok += 1,
            Err(dfpo::Error::Format { path: p, .. }) => {
                assert_eq!(p, "fuzz.safetensors");
                err += 1
            }
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
    assert!(err > 1000, "{ok} ok, {err} errors");
}
