//! The built-in models: the shipped warm starts `assets/arith-sft` (`builtin`) and
//! `assets/chain-sft` (`builtin-chain`, the chain task's) embedded in the binary
//! (`include_bytes!`), so a copied or `cargo install`ed `dfpo-train` runs the default command
//! without the source tree.
//!
//! The code that reads models takes folders, so [`builtin_dir`] writes the embedded files once
//! into a cache folder named by their hash (`$DFPO_CACHE_DIR`, else `$XDG_CACHE_HOME/dfpo`,
//! else `~/.cache/dfpo`, else the temp folder) and checks them byte for byte on every use.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::checkpoint::write_atomic;

/// The model spec of the built-in warm start (`model.policy = "builtin"`, `--model builtin`).
pub const BUILTIN: &str = "builtin";
/// The model spec of the chain task's warm start (`assets/chain-sft`; what `"builtin"` means
/// with `data.task = "chain"`).
pub const BUILTIN_CHAIN: &str = "builtin-chain";

/// The embedded files of `assets/arith-sft`.
pub const FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../../assets/arith-sft/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../assets/arith-sft/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../assets/arith-sft/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../assets/arith-sft/tokenizer_config.json"),
    ),
];

/// The embedded files of `assets/chain-sft` (made by `tools/make-chain-sft`).
pub const CHAIN_FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../../assets/chain-sft/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../assets/chain-sft/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../assets/chain-sft/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../assets/chain-sft/tokenizer_config.json"),
    ),
];

/// Where the source tree keeps the chain warm start.
pub fn chain_assets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/chain-sft")
}

/// Where the source tree keeps the warm start (`tools/make-builtin-sft` writes it there; the
/// binary never reads it).
pub fn assets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/arith-sft")
}

fn cache_root() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("DFPO_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("dfpo")))
        .or_else(|| env("HOME").map(|p| p.join(".cache/dfpo")))
        .unwrap_or_else(|| std::env::temp_dir().join("dfpo-cache"))
}

/// A short hash of the embedded files (names the cache folder).
fn content_tag(files: &[(&str, &[u8])]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in files {
        for b in name.bytes().chain(bytes.iter().copied()) {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn io_err(p: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: p.display().to_string(),
        source,
    }
}

fn holds_the_files(dir: &Path, files: &[(&str, &[u8])]) -> bool {
    files
        .iter()
        .all(|(name, bytes)| std::fs::read(dir.join(name)).is_ok_and(|b| b == *bytes))
}

/// The built-in model as an HF folder (written from the embedded bytes when missing or
/// different).
pub fn builtin_dir() -> Result<PathBuf> {
    embedded_dir("builtin-arith-sft", FILES)
}

/// The chain task's built-in warm start as an HF folder.
pub fn builtin_chain_dir() -> Result<PathBuf> {
    embedded_dir("builtin-chain-sft", CHAIN_FILES)
}

fn embedded_dir(name: &str, files: &[(&str, &[u8])]) -> Result<PathBuf> {
    let dir = cache_root().join(format!("{name}-{}", content_tag(files)));
    if holds_the_files(&dir, files) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    for (name, bytes) in files {
        write_atomic(dir.join(name), |w| w.write_all(bytes))?;
    }
    if !holds_the_files(&dir, files) {
        return Err(Error::Invalid(format!(
            "{}: the built-in model's files read back different from the embedded ones",
            dir.display()
        )));
    }
    Ok(dir)
}

/// The HF folder a model option names: "builtin" = the embedded warm start, anything else a
/// folder path (checked to exist, so the error names the option's value).
pub fn model_dir(spec: &str) -> Result<PathBuf> {
    if spec == BUILTIN {
        return builtin_dir();
    }
    if spec == BUILTIN_CHAIN {
        return builtin_chain_dir();
    }
    let p = PathBuf::from(spec);
    let checkpoint = p.join("meta.json").is_file() || p.join("checkpoints").is_dir();
    if checkpoint && !p.join("config.json").is_file() {
        return Err(Error::Invalid(format!(
            "model {spec} is a training checkpoint or run folder, not an HF folder: \
             `dfpo-train export --checkpoint {spec} --out DIR` writes its policy (DIR/policy) \
             and critic as HF folders (a finished run's policy is also in its final/)"
        )));
    }
    if !p.is_dir() {
        let what = if p.exists() {
            "is not a folder"
        } else {
            "does not exist"
        };
        return Err(Error::Invalid(format!(
            "model {spec}: {what} (a model is \"builtin\" or an HF folder with config.json, \
             model.safetensors and tokenizer.json)"
        )));
    }
    Ok(p)
}
