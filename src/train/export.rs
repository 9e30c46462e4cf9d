//! `dfpo-train export`: a checkpoint's policy and critic as Hugging Face folders.
//!
//! Output (`export.out`, new or empty; or an earlier export with `export.overwrite`):
//! - `policy/`: the policy's master weights (f32 `model.safetensors`, `config.json`, the
//!   tokenizer files): the same format as a run's `final/`.
//! - `critic/` (algorithms with a critic): the critic's trunk as an HF folder of the same kind
//!   (loadable as a causal LM; its LM head is unused), plus the value head:
//!   `value_head.safetensors` (f32) and `value_head.json` describing it:
//!   - `"type": "value"`: `value_head.weight [H]`, `value_head.bias [1]`; the value of a token
//!     is `h_t . weight + bias` on the trunk's last hidden state `h_t` (after the final norm).
//!   - `"type": "quantile"`: `quantile_head.weight [K, H]`, `quantile_head.bias [K]`: K
//!     quantile values per token, `weight @ h_t + bias`.
//!   - `"type": "flow"`: the flow head v(z, tau | h_t) of `kernels/flow.rs` (cond_dim = H,
//!     `width`, `depth`), each block of its flat parameter vector as its own tensor
//!     (`flow_head.w_cond [H, width]`, `b_in`, `w_z`, `w_t`, per hidden layer `layer{l}.w
//!     [width, width]` (l >= 1), `layer{l}.b`, `layer{l}.gamma`, `layer{l}.beta`, `w_out`,
//!     `b_out`), with `param_order` listing them in the flat order; values are read out by
//!     integrating dz/dtau = v from K standard-normal samples z over tau in [0, 1] with
//!     `readout_steps` Euler steps.
//! - `export.json`: the checkpoint, its step and algorithm (marks the folder as an export).
//!
//! The checkpoint is restored through its own `config.toml`, so the model folders that run
//! started from must still be where that file says.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::json;

use super::config::{ExportConfig, TrainConfig};
use super::models::{tensor_map, CriticHead, FLOW_PARAMS};
use super::run_dir::{list_checkpoints, ModelOut};
use super::trainer::{model_dir, Trainer};
use crate::error::{Error, Result};
use crate::model::checkpoint::{save_hf_folder, save_safetensors, write_atomic, Dtype, Tensor};
use crate::model::decoder::Decoder;

/// What an export wrote.
#[derive(Clone, Debug, Serialize)]
pub struct Exported {
    pub checkpoint: String,
    pub step: u64,
    pub algo: String,
    pub policy: String,
    /// None for grpo (no critic).
    pub critic: Option<String>,
}

impl Exported {
    /// One line for the terminal.
    pub fn describe(&self) -> String {
        let critic = self
            .critic
            .as_deref()
            .map_or(" (no critic: grpo)".to_string(), |c| {
                format!(", critic -> {c}")
            });
        format!(
            "export: {} step {} ({}): policy -> {}{critic}",
            self.checkpoint, self.step, self.algo, self.policy
        )
    }
}

/// The entries export writes in its output folder.
const WRITTEN: &[&str] = &["policy", "critic", "export.json"];

fn io_err(p: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: p.display().to_string(),
        source,
    }
}

/// The checkpoint folder `spec` names: a checkpoint itself, or a run folder's newest.
fn checkpoint_dir(spec: &str) -> Result<PathBuf> {
    if spec.is_empty() {
        return Err(Error::Invalid(
            "export needs a checkpoint: --checkpoint RUN/checkpoints/step-N (or a run folder)"
                .into(),
        ));
    }
    let p = PathBuf::from(spec);
    if p.join("meta.json").is_file() {
        return Ok(p);
    }
    let all = list_checkpoints(&p.join("checkpoints"))?;
    all.last().map(|(_, d)| d.clone()).ok_or_else(|| {
        Error::Invalid(format!(
            "export.checkpoint = {spec}: neither a checkpoint (no meta.json) nor a run folder \
             with checkpoints/step-N"
        ))
    })
}

/// Runs the export described in the module doc.
pub fn run(cfg: &ExportConfig) -> Result<Exported> {
    let ck = checkpoint_dir(&cfg.checkpoint)?;
    if cfg.out.is_empty() {
        return Err(Error::Invalid(
            "export needs an output folder: --out DIR (export.out)".into(),
        ));
    }
    let out_dir = PathBuf::from(&cfg.out);
    let out = ModelOut {
        flag: "export.out (--out)",
        dir: &out_dir,
        written: WRITTEN,
        marker: "export.json",
        overwrite: cfg.overwrite,
    };
    out.check()?;
    let cfg_path = ck.join("config.toml");
    let sets = ["run.device=cpu".to_string(), "run.progress=false".into()];
    let run_cfg = TrainConfig::load(Some(&cfg_path), &sets)?;
    let mut t = Trainer::new(run_cfg)?;
    let step = t.load_checkpoint(&ck)?;
    let staging = out.staging();
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| io_err(&staging, e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| io_err(&staging, e))?;
    let result = (|| -> Result<bool> {
        t.export(&staging.join("policy"))?;
        let has_critic = export_critic(&t, &staging.join("critic"))?;
        let meta = json!({
            "checkpoint": ck.display().to_string(),
            "step": step,
            "algo": t.cfg.algo.name.as_str(),
        });
        let text =
            serde_json::to_string_pretty(&meta).map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomic(staging.join("export.json"), |w| {
            w.write_all(text.as_bytes())
        })?;
        Ok(has_critic)
    })();
    let has_critic = match result {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    out.publish(&staging)?;
    Ok(Exported {
        checkpoint: ck.display().to_string(),
        step,
        algo: t.cfg.algo.name.as_str().into(),
        policy: out_dir.join("policy").display().to_string(),
        critic: has_critic.then(|| out_dir.join("critic").display().to_string()),
    })
}

/// Writes the critic (trunk HF folder + value head); false when the algorithm has none.
fn export_critic(t: &Trainer, dir: &Path) -> Result<bool> {
    let Some(c) = t.critic.as_ref() else {
        return Ok(false);
    };
    let spec = if t.cfg.model.critic.is_empty() {
        &t.cfg.model.policy
    } else {
        &t.cfg.model.critic
    };
    let cdec = Decoder::load(model_dir(spec)?)?;
    let trunk = tensor_map(&cdec, &c.opt)?;
    let files: Vec<&Path> = t.tokenizer_files().iter().map(PathBuf::as_path).collect();
    save_hf_folder(dir, &cdec.config, &trunk, Dtype::F32, &files)?;
    let h = cdec.config.hidden_size;
    let param = |name: &str| -> Result<Vec<f32>> {
        c.opt
            .param_host(name)
            .map_err(|_| Error::Invalid(format!("export: the critic has no parameter {name}")))
    };
    let mut head: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut put = |name: &str, shape: Vec<usize>, data: Vec<f32>| -> Result<()> {
        head.insert(name.to_string(), Tensor::new(shape, data)?);
        Ok(())
    };
    let desc = match &c.head {
        CriticHead::Value { .. } => {
            put("value_head.weight", vec![h], param("value_head.weight")?)?;
            put("value_head.bias", vec![1], param("value_head.bias")?)?;
            json!({"type": "value", "hidden_size": h})
        }
        CriticHead::Quantile { k, .. } => {
            put(
                "quantile_head.weight",
                vec![*k, h],
                param("quantile_head.weight")?,
            )?;
            put("quantile_head.bias", vec![*k], param("quantile_head.bias")?)?;
            json!({"type": "quantile", "hidden_size": h, "k": k})
        }
        CriticHead::Flow { k, shape, .. } => {
            let flat = param(FLOW_PARAMS)?;
            let l = shape.layout();
            let (w, cdim) = (shape.width, shape.cond_dim);
            let mut order = Vec::new();
            let mut block = |name: String, shape: Vec<usize>, r: &std::ops::Range<usize>| {
                order.push(name.clone());
                put(&name, shape, flat[r.clone()].to_vec())
            };
            block("flow_head.w_cond".into(), vec![cdim, w], &l.w_cond)?;
            block("flow_head.b_in".into(), vec![w], &l.b_in)?;
            block("flow_head.w_z".into(), vec![w], &l.w_z)?;
            block("flow_head.w_t".into(), vec![w], &l.w_t)?;
            for (i, layer) in l.layers.iter().enumerate() {
                if let Some(r) = &layer.w {
                    block(format!("flow_head.layer{i}.w"), vec![w, w], r)?;
                }
                if let Some(r) = &layer.b {
                    block(format!("flow_head.layer{i}.b"), vec![w], r)?;
                }
                block(format!("flow_head.layer{i}.gamma"), vec![w], &layer.gamma)?;
                block(format!("flow_head.layer{i}.beta"), vec![w], &layer.beta)?;
            }
            block("flow_head.w_out".into(), vec![w], &l.w_out)?;
            block("flow_head.b_out".into(), vec![1], &l.b_out)?;
            let cc = &t.cfg.critic;
            json!({
                "type": "flow", "hidden_size": h, "k": k, "width": w,
                "depth": shape.depth, "readout_steps": cc.readout_steps,
                "solver": cc.solver, "param_order": order, "total_params": l.total,
                "layout": "kernels/flow.rs FlowHeadShape::layout",
            })
        }
    };
    save_safetensors(dir.join("value_head.safetensors"), &head, Dtype::F32)?;
    let text = serde_json::to_string_pretty(&desc).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(dir.join("value_head.json"), |w| {
        w.write_all(text.as_bytes())
    })?;
    Ok(true)
}
