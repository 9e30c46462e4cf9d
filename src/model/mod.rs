//! Llama/Qwen2-family models: Hugging Face config, checkpoint and tokenizer I/O.
//!
//! - [`config`]: [`config::ModelConfig`] from/to an HF `config.json`, validated.
//! - [`checkpoint`]: safetensors (single file or sharded index) reading with full validation of
//!   untrusted files, the expected parameter list for a config, atomic writers and an HF folder
//!   exporter.
//! - [`tokenizer`]: `tokenizer.json` through the `tokenizers` crate and the chat template from
//!   `tokenizer_config.json` / `chat_template.jinja` rendered with minijinja.

pub mod builtin;
pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod generate;
pub mod generate_cuda;
pub mod init;
pub mod lm_head;
pub mod ops;
pub mod score;
pub mod tokenizer;
