//! The Llama/Qwen2 decoder on the graph runtime.
//!
//! [`Decoder`] holds a checked config and its parameters (HF names, f32). [`Decoder::build`]
//! makes a [`DecoderGraph`] for one batch shape `(B, S)`: a planned [`Session`] of the training
//! graph (forward, per-token log-probs, mean next-token NLL, backward to every parameter), with
//! the parameters written in.
//!
//! Graph (activations token-major `[B·S][width]`):
//! ```text
//! x0 = embed(ids);  a = rmsnorm(x0, ln1_0);  r = x0
//! per layer l:  q,k,v = linear(a) (+bias for qwen2)   (q_rot, k_rot) = rope(q, k, pos)
//!               (o, lse) = attention(q_rot, k_rot, v, seq_lens)   ao = o_proj(o)
//!               (h1, a2) = add_rmsnorm(ao, r, ln2_l)   gu = [gate|up](a2)   m = down(swiglu(gu))
//!               (r, a) = add_rmsnorm(m, h1, ln1_{l+1} or model.norm)
//! (logprob, lse, entropy) = lm_head_xent(a, lm_head or embed_tokens, targets);  loss = mean NLL
//! ```
//! The LM head ([`LmHeadMode`]) is by default the chunked [`LmHeadXent`]: the `[B·S][V]` logits
//! are never formed (one chunk of them at a time in a bounded scratch). Graphs that must read
//! the logits ([`Decoder::build_with_logits`]: golden tests, teacher forcing on small models)
//! take the unfused `Linear` → kept `logits` → `TokenLogprob` instead.
//! A batch is right-padded: sequence `b` has `seq_lens[b]` tokens at positions `0..len`;
//! `targets[b][t] = ids[b][t+1]` for `t + 1 < len`, else [`IGNORE_INDEX`] (no target, log-prob 0).
//! The loss is the mean of `−logprob` over tokens with a target, as the golden files define it.
//!
//! Device: on the CPU every tensor is f32. On CUDA the parameters are registered as bf16
//! copies (gradients f32), activations are bf16, softmax/norm statistics, log-probs and the loss
//! f32; the embedding backward builds its plan from the `ids` input on the device (no upload). The
//! CUDA path is compiled but has NOT been run on a GPU yet (tests/cuda_decoder.rs is its parity
//! test).

use std::collections::BTreeMap;
use std::path::Path;

use half::bf16;

use super::checkpoint::{expected_tensors, load_checkpoint, TensorMap};
use super::config::ModelConfig;
use super::lm_head::{LmHeadXent, DEFAULT_HEAD_SCRATCH_BYTES};
use super::ops::{
    AddRmsNorm, Attention, Embed, GateUp, Linear, MeanNll, RmsNorm, Rope, SwiGlu, TokenLogprob,
};
use crate::device::Device;
use crate::error::{check_len, Error, Result};
use crate::graph::{DType, GraphBuilder, Plan, Session, TensorId};
pub use crate::kernels::xent::IGNORE_INDEX;

/// How a decoder graph computes the per-token log-probs from the final hidden states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LmHeadMode {
    /// [`LmHeadXent`]: tokens in chunks whose logits fit `scratch_bytes` of arena scratch; the
    /// full logits never exist ([`DecoderGraph::logits`] is an error).
    Chunked { scratch_bytes: usize },
    /// `Linear` into a kept `[B·S][V]` logits tensor, then `TokenLogprob`: for graphs that read
    /// the logits (small models only: at 65536 × 151936 that tensor alone is 20 GB).
    Logits,
}

/// How [`Decoder`] builds its graphs (not part of the HF config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuildOptions {
    pub lm_head: LmHeadMode,
    /// Recompute each layer's activations in the backward instead of keeping them from the
    /// forward (gradient checkpointing per layer): the arena keeps only each layer's output
    /// (residual and normed hidden state) plus one layer's activations at a time, for one more
    /// forward of every layer (about +1/3 of the trunk's FLOPs in a training step).
    pub recompute_layers: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            lm_head: LmHeadMode::Chunked {
                scratch_bytes: DEFAULT_HEAD_SCRATCH_BYTES,
            },
            recompute_layers: false,
        }
    }
}

/// A decoder-only model: config and parameters by HF name.
pub struct Decoder {
    pub config: ModelConfig,
    params: TensorMap,
    opts: BuildOptions,
}

impl Decoder {
    /// From a config and its tensors; every expected tensor must be present with its shape.
    pub fn new(config: ModelConfig, params: TensorMap) -> Result<Self> {
        for (name, shape) in expected_tensors(&config) {
            let t = params
                .get(&name)
                .ok_or_else(|| Error::Invalid(format!("Decoder::new: missing parameter {name}")))?;
            if t.shape != shape {
                return Err(Error::Shape(format!(
                    "Decoder::new: parameter {name} has shape {:?}, expected {shape:?}",
                    t.shape
                )));
            }
        }
        Ok(Decoder {
            config,
            params,
            opts: BuildOptions::default(),
        })
    }

    /// Loads an HF folder (config.json + safetensors, single or sharded).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let ck = load_checkpoint(dir)?;
        Self::new(ck.config, ck.tensors)
    }

    /// How graphs are built ([`BuildOptions::default`] unless set).
    pub fn build_options(&self) -> BuildOptions {
        self.opts
    }

    /// Sets how later graphs are built.
    pub fn set_build_options(&mut self, opts: BuildOptions) {
        self.opts = opts;
    }

    /// The parameters by HF name.
    pub fn params(&self) -> &TensorMap {
        &self.params
    }

    /// Overwrites parameter `name`'s values (same length).
    pub fn set_param_data(&mut self, name: &str, data: &[f32]) -> Result<()> {
        let t = self
            .params
            .get_mut(name)
            .ok_or_else(|| Error::Invalid(format!("set_param_data: no parameter {name}")))?;
        check_len(name, data.len(), t.data.len())?;
        t.data.copy_from_slice(data);
        Ok(())
    }

    /// Builds, plans and allocates the training graph for batches of `b` sequences of at most
    /// `s` tokens on `device`, with the parameters written in.
    pub fn build(&self, b: usize, s: usize, device: &Device) -> Result<DecoderGraph> {
        self.build_nll(b, s, device, 1.0)
    }

    /// [`Decoder::build`] with the unfused LM head ([`LmHeadMode::Logits`]), so that
    /// [`DecoderGraph::logits`] can be read: for small models (the logits tensor is B·S·V).
    pub fn build_with_logits(&self, b: usize, s: usize, device: &Device) -> Result<DecoderGraph> {
        let opts = BuildOptions {
            lm_head: LmHeadMode::Logits,
            ..self.opts
        };
        self.build_opts(b, s, device, 1.0, true, opts, nll_head)
    }

    /// [`Decoder::build`] with the log-probs, entropies and loss at softmax `temperature`.
    pub fn build_nll(
        &self,
        b: usize,
        s: usize,
        device: &Device,
        temperature: f32,
    ) -> Result<DecoderGraph> {
        self.build_tempered(b, s, device, temperature, true, nll_head)
    }

    /// The plan (layout and schedule, nothing allocated) of the training graph
    /// [`Decoder::build_tempered`] would make with `opts` and `head` for a model with `config`,
    /// for batches of `b` × `s` tokens on the CPU or a CUDA device (`cuda`): the memory a shape
    /// needs ([`Plan::arena_bytes`], [`Plan::persistent_bytes`]), measured without the weights or
    /// a device.
    #[allow(clippy::too_many_arguments)]
    pub fn plan_with(
        config: &ModelConfig,
        b: usize,
        s: usize,
        cuda: bool,
        temperature: f32,
        lm_head: bool,
        opts: BuildOptions,
        head: impl FnOnce(&mut GraphBuilder, &Trunk) -> Result<HeadOut>,
    ) -> Result<Plan> {
        config.validate("Decoder::plan_with")?;
        let built = graph_for(config, b, s, cuda, temperature, lm_head, opts, head)?;
        built.g.plan_for(built.loss, cuda)
    }

    /// [`Decoder::plan_with`] of the NLL graph of [`Decoder::build_nll`].
    pub fn plan_nll(
        config: &ModelConfig,
        b: usize,
        s: usize,
        cuda: bool,
        temperature: f32,
        opts: BuildOptions,
    ) -> Result<Plan> {
        Self::plan_with(config, b, s, cuda, temperature, true, opts, nll_head)
    }

    /// Builds the trunk (and, with `lm_head`, the logits and per-token log-probs/entropies), then
    /// lets `head` add its own parameters, nodes and the scalar loss the backward starts from.
    /// The head's parameters become settable and readable by name like the decoder's.
    pub fn build_with(
        &self,
        b: usize,
        s: usize,
        device: &Device,
        lm_head: bool,
        head: impl FnOnce(&mut GraphBuilder, &Trunk) -> Result<HeadOut>,
    ) -> Result<DecoderGraph> {
        self.build_tempered(b, s, device, 1.0, lm_head, head)
    }

    /// [`Decoder::build_with`] with the per-token log-probs and entropies taken at softmax
    /// `temperature` (the sampler's, so that PPO ratios compare the distributions the rollouts
    /// were drawn from).
    pub fn build_tempered(
        &self,
        b: usize,
        s: usize,
        device: &Device,
        temperature: f32,
        lm_head: bool,
        head: impl FnOnce(&mut GraphBuilder, &Trunk) -> Result<HeadOut>,
    ) -> Result<DecoderGraph> {
        self.build_opts(b, s, device, temperature, lm_head, self.opts, head)
    }

    #[allow(clippy::too_many_arguments)]
    fn build_opts(
        &self,
        b: usize,
        s: usize,
        device: &Device,
        temperature: f32,
        lm_head: bool,
        opts: BuildOptions,
        head: impl FnOnce(&mut GraphBuilder, &Trunk) -> Result<HeadOut>,
    ) -> Result<DecoderGraph> {
        let cuda = device.is_cuda();
        let Built {
            g,
            ids,
            pos,
            seq_lens,
            targets,
            logits,
            logprob,
            entropy,
            loss,
            params,
            decoder_params,
        } = graph_for(&self.config, b, s, cuda, temperature, lm_head, opts, head)?;
        let plan = g.plan(loss, device)?;
        let mut session = Session::new(plan, device.clone())?;
        for (name, t) in &decoder_params {
            let data = &self.params[name].data;
            if cuda {
                let bits: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                session.write(*t, &bits)?;
            } else {
                session.write(*t, data)?;
            }
        }
        // Positions are 0..S in every row whatever the batch: written once, here.
        let positions: Vec<u32> = (0..b * s).map(|i| (i % s) as u32).collect();
        session.write(pos, &positions)?;
        Ok(DecoderGraph {
            session,
            b,
            s,
            vocab: self.config.vocab_size,
            pad_id: self.config.pad_token_id.unwrap_or(0),
            ids,
            seq_lens,
            targets,
            logits,
            logprob,
            entropy,
            loss,
            params,
            lens: vec![0; b],
        })
    }
}

/// The NLL head of [`Decoder::build_nll`]: the mean of −logprob over tokens with a target.
fn nll_head(g: &mut GraphBuilder, t: &Trunk) -> Result<HeadOut> {
    let lp = t
        .logprob
        .ok_or_else(|| Error::Invalid("no lm head".into()))?;
    let loss = g.node_typed(
        MeanNll { n: t.n },
        &[lp, t.targets],
        &[("loss", 1, DType::F32)],
    )?[0];
    Ok(HeadOut {
        loss,
        keep: vec![],
        params: vec![],
    })
}

/// A built (not yet planned) decoder graph and its named tensors.
struct Built {
    g: GraphBuilder,
    ids: TensorId,
    pos: TensorId,
    seq_lens: TensorId,
    targets: TensorId,
    logits: Option<TensorId>,
    logprob: Option<TensorId>,
    entropy: Option<TensorId>,
    loss: TensorId,
    params: BTreeMap<String, TensorId>,
    decoder_params: Vec<(String, TensorId)>,
}

/// Records the decoder graph of `c` for `b` × `s` tokens (bf16 activations and parameters when
/// `cuda`), its LM head per `opts`, and `head`'s nodes.
#[allow(clippy::too_many_arguments)]
fn graph_for(
    c: &ModelConfig,
    b: usize,
    s: usize,
    cuda: bool,
    temperature: f32,
    lm_head: bool,
    opts: BuildOptions,
    head: impl FnOnce(&mut GraphBuilder, &Trunk) -> Result<HeadOut>,
) -> Result<Built> {
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(Error::Invalid(format!(
            "Decoder::build_tempered: temperature {temperature} must be finite and > 0"
        )));
    }
    if b == 0 || s == 0 {
        return Err(Error::Invalid(format!(
            "Decoder::build: batch {b} x {s}: both must be > 0"
        )));
    }
    let act = if cuda { DType::BF16 } else { DType::F32 };
    let pdt = act;
    let n = b * s;
    let (h, qd, kvd, ff, v) = (
        c.hidden_size,
        c.q_dim(),
        c.kv_dim(),
        c.intermediate_size,
        c.vocab_size,
    );
    let (hq, hkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let eps = c.rms_norm_eps as f32;
    let theta = c.rope_theta as f32;

    let mut g = GraphBuilder::new();
    let ids = g.input_typed("ids", n, DType::U32);
    let pos = g.input_typed("pos", n, DType::U32);
    let seq_lens = g.input_typed("seq_lens", b, DType::U32);
    let targets = g.input_typed("targets", n, DType::U32);
    let mut params = BTreeMap::new();
    for (name, shape) in expected_tensors(c) {
        let len = shape.iter().product();
        let t = g.param_typed(&name, len, pdt);
        params.insert(name, t);
    }
    let p = |name: String| -> Result<TensorId> {
        params
            .get(&name)
            .copied()
            .ok_or_else(|| Error::Invalid(format!("Decoder::build: no parameter {name}")))
    };

    // (On CUDA the embedding backward builds its schedule from `ids` on the device.)
    let x0 = g.node_typed(
        Embed { n, v, d: h },
        &[ids, p("model.embed_tokens.weight".into())?],
        &[("x0", n * h, act)],
    )?[0];
    let first = g.node_typed(
        RmsNorm { n, d: h, eps },
        &[x0, p("model.layers.0.input_layernorm.weight".into())?],
        &[("a.0", n * h, act), ("rstd.0", n, DType::F32)],
    )?;
    let (mut resid, mut a) = (x0, first[0]);
    for l in 0..c.num_hidden_layers {
        if opts.recompute_layers {
            g.begin_recompute()?;
        }
        let pn = |s: &str| format!("model.layers.{l}.{s}");
        let lin = |g: &mut GraphBuilder,
                   x: TensorId,
                   w: &str,
                   bias: bool,
                   din: usize,
                   dout: usize,
                   name: &str|
         -> Result<TensorId> {
            let mut ins = vec![x, p(pn(&format!("{w}.weight")))?];
            if bias {
                ins.push(p(pn(&format!("{w}.bias")))?);
            }
            Ok(g.node_typed(
                Linear { n, din, dout },
                &ins,
                &[(&format!("{name}.{l}"), n * dout, act)],
            )?[0])
        };
        let qkv_bias = c.attention_bias;
        let q = lin(&mut g, a, "self_attn.q_proj", qkv_bias, h, qd, "q")?;
        let k = lin(&mut g, a, "self_attn.k_proj", qkv_bias, h, kvd, "k")?;
        let vv = lin(&mut g, a, "self_attn.v_proj", qkv_bias, h, kvd, "v")?;
        let r = g.node_typed(
            Rope {
                n,
                hq,
                hkv,
                head_dim: hd,
                theta,
            },
            &[q, k, pos],
            &[
                (&format!("q_rot.{l}"), n * qd, act),
                (&format!("k_rot.{l}"), n * kvd, act),
            ],
        )?;
        let at = g.node_typed(
            Attention {
                b,
                s,
                hq,
                hkv,
                head_dim: hd,
            },
            &[r[0], r[1], vv, seq_lens],
            &[
                (&format!("attn.{l}"), n * qd, act),
                (&format!("lse.{l}"), b * hq * s, DType::F32),
            ],
        )?;
        let ao = lin(
            &mut g,
            at[0],
            "self_attn.o_proj",
            c.o_proj_bias(),
            qd,
            h,
            "ao",
        )?;
        let n2 = g.node_typed(
            AddRmsNorm { n, d: h, eps },
            &[ao, resid, p(pn("post_attention_layernorm.weight"))?],
            &[
                (&format!("h1.{l}"), n * h, act),
                (&format!("a2.{l}"), n * h, act),
                (&format!("rstd2.{l}"), n, DType::F32),
            ],
        )?;
        let gu = g.node_typed(
            GateUp { n, h, inter: ff },
            &[
                n2[1],
                p(pn("mlp.gate_proj.weight"))?,
                p(pn("mlp.up_proj.weight"))?,
            ],
            &[(&format!("gu.{l}"), n * 2 * ff, act)],
        )?[0];
        let sw = g.node_typed(
            SwiGlu { n, inter: ff },
            &[gu],
            &[(&format!("swiglu.{l}"), n * ff, act)],
        )?[0];
        let m = lin(&mut g, sw, "mlp.down_proj", false, ff, h, "mlp")?;
        let next_w = if l + 1 < c.num_hidden_layers {
            format!("model.layers.{}.input_layernorm.weight", l + 1)
        } else {
            "model.norm.weight".to_string()
        };
        let n1 = g.node_typed(
            AddRmsNorm { n, d: h, eps },
            &[m, n2[0], p(next_w)?],
            &[
                (&format!("r.{}", l + 1), n * h, act),
                (&format!("a.{}", l + 1), n * h, act),
                (&format!("rstd.{}", l + 1), n, DType::F32),
            ],
        )?;
        resid = n1[0];
        a = n1[1];
        if opts.recompute_layers {
            g.end_recompute()?;
        }
    }
    let (logits, lp) = if lm_head {
        let head_w = p(if c.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        }
        .into())?;
        let outs = [
            ("logprob", n, DType::F32),
            ("xent_lse", n, DType::F32),
            ("entropy", n, DType::F32),
        ];
        let (logits, lp) = match opts.lm_head {
            LmHeadMode::Chunked { scratch_bytes } => {
                let chunk = LmHeadXent::chunk_rows(n, v, cuda, scratch_bytes);
                let op = LmHeadXent {
                    n,
                    h,
                    v,
                    temperature,
                    chunk,
                };
                (None, g.node_typed(op, &[a, head_w, targets], &outs)?)
            }
            LmHeadMode::Logits => {
                let logits = g.node_typed(
                    Linear { n, din: h, dout: v },
                    &[a, head_w],
                    &[("logits", n * v, act)],
                )?[0];
                g.keep(logits);
                let op = TokenLogprob { n, v, temperature };
                (Some(logits), g.node_typed(op, &[logits, targets], &outs)?)
            }
        };
        g.keep(lp[0]);
        g.keep(lp[2]);
        (logits, Some((lp[0], lp[2])))
    } else {
        (None, None)
    };
    let trunk = Trunk {
        n,
        hidden_size: h,
        hidden: a,
        act,
        targets,
        logprob: lp.map(|x| x.0),
        entropy: lp.map(|x| x.1),
    };
    let out = head(&mut g, &trunk)?;
    // Only the decoder's own parameters are written here; the head's are the caller's.
    let decoder_params: Vec<(String, TensorId)> =
        params.iter().map(|(k, &v)| (k.clone(), v)).collect();
    for (name, t) in &out.params {
        if params.insert(name.clone(), *t).is_some() {
            return Err(Error::Invalid(format!(
                "Decoder::build_with: head parameter {name} clashes with a decoder parameter"
            )));
        }
    }
    let loss = out.loss;
    g.keep(loss);
    for &t in &out.keep {
        g.keep(t);
    }
    Ok(Built {
        g,
        ids,
        pos,
        seq_lens,
        targets,
        logits,
        logprob: lp.map(|x| x.0),
        entropy: lp.map(|x| x.1),
        loss,
        params,
        decoder_params,
    })
}

/// A step's token rows, bound once where the decoder graphs compute, for
/// [`DecoderGraph::set_batch_rows`]: the host rows on the CPU; on CUDA the tokens packed
/// (4 bytes a token) with each row's offset, length and prompt length (12 bytes a row), uploaded
/// once, so that the step's graph batches (old and reference log-probs, critic readout, updates)
/// are gathered on the device instead of each uploading its ids and targets.
pub struct SeqRows {
    lens: Vec<usize>,
    skip: Vec<usize>,
    /// Each row's largest token id (checked against a graph's vocabulary).
    max_id: Vec<Option<u32>>,
    store: SeqStore,
}

enum SeqStore {
    Host(Vec<Vec<u32>>),
    Cuda {
        dev: std::sync::Arc<crate::device::CudaDevice>,
        ids: cudarc::driver::CudaSlice<u32>,
        /// `[off | len | skip]`, i32, rows each.
        meta: cudarc::driver::CudaSlice<i32>,
    },
}

impl SeqRows {
    /// Row i = `seqs[i]` with prompt length `skip[i]` (its targets start there; see
    /// [`DecoderGraph::set_batch_masked`]).
    pub fn new(device: &Device, seqs: &[Vec<u32>], skip: &[usize]) -> Result<Self> {
        check_len("SeqRows skip", skip.len(), seqs.len())?;
        let lens: Vec<usize> = seqs.iter().map(|q| q.len()).collect();
        let max_id = seqs.iter().map(|q| q.iter().copied().max()).collect();
        let store = match device {
            Device::Cpu => SeqStore::Host(seqs.to_vec()),
            Device::Cuda(dev) => {
                let total: usize = lens.iter().sum();
                crate::kernels::check_i32("SeqRows tokens", total)?;
                let mut meta = Vec::with_capacity(3 * seqs.len());
                let mut off = 0usize;
                for l in &lens {
                    meta.push(off as i32);
                    off += l;
                }
                meta.extend(lens.iter().map(|&l| l as i32));
                for &k in skip {
                    meta.push(crate::kernels::check_i32("SeqRows skip", k)?);
                }
                let flat: Vec<u32> = seqs.concat();
                // A zero-length upload has no device buffer: keep one element.
                let ids = dev.htod(if flat.is_empty() { &[0u32][..] } else { &flat })?;
                let meta = dev.htod(if meta.is_empty() { &[0i32][..] } else { &meta })?;
                SeqStore::Cuda {
                    dev: dev.clone(),
                    ids,
                    meta,
                }
            }
        };
        Ok(SeqRows {
            lens,
            skip: skip.to_vec(),
            max_id,
            store,
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.lens.len()
    }

    /// Row lengths.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }
}

/// One planned batch shape of a [`Decoder`]: set a batch, run, read results.
pub struct DecoderGraph {
    session: Session,
    b: usize,
    s: usize,
    vocab: usize,
    pad_id: u32,
    ids: TensorId,
    seq_lens: TensorId,
    targets: TensorId,
    logits: Option<TensorId>,
    logprob: Option<TensorId>,
    entropy: Option<TensorId>,
    loss: TensorId,
    params: BTreeMap<String, TensorId>,
    lens: Vec<usize>,
}

impl DecoderGraph {
    /// (B, S) of this graph.
    pub fn shape(&self) -> (usize, usize) {
        (self.b, self.s)
    }

    /// The underlying session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Binds a batch of at most B sequences of 1..=S tokens each (fewer than B: the remaining
    /// rows are empty sequences). Right-pads with the pad id, positions `0..len`, next-token
    /// targets.
    pub fn set_batch(&mut self, seqs: &[Vec<u32>]) -> Result<()> {
        self.set_batch_masked(seqs, &vec![0; seqs.len()])
    }

    /// As [`DecoderGraph::set_batch`], but sequence `i` only gets targets for the tokens at
    /// positions `>= skip[i]` (e.g. its prompt length: the loss and log-probs then cover the
    /// response only).
    pub fn set_batch_masked(&mut self, seqs: &[Vec<u32>], skip: &[usize]) -> Result<()> {
        check_len("set_batch_masked skip", skip.len(), seqs.len())?;
        let rows: Vec<Option<usize>> = (0..seqs.len()).map(Some).collect();
        self.check_rows(&rows, |i| seqs[i].len(), |i| seqs[i].iter().copied().max())?;
        self.write_host_batch(seqs.iter().zip(skip).map(|(q, &k)| (q.as_slice(), k)))
    }

    /// Binds the batch whose row j is row `rows[j]` of `src` (`None`: an empty row; at most B
    /// rows), as [`DecoderGraph::set_batch_masked`] of those rows with their prompt lengths as
    /// `skip` (`masked`), or as [`DecoderGraph::set_batch`] of them (not `masked`). On CUDA a device gather from the rows bound once ([`SeqRows`]): only the row
    /// list goes up (4 bytes a row), nothing for a contiguous run of rows.
    pub fn set_batch_rows(
        &mut self,
        src: &SeqRows,
        rows: &[Option<usize>],
        masked: bool,
    ) -> Result<()> {
        if let Some(&r) = rows.iter().flatten().find(|&&r| r >= src.rows()) {
            return Err(Error::Shape(format!(
                "set_batch_rows: row {r} of step rows of {}",
                src.rows()
            )));
        }
        self.check_rows(rows, |i| src.lens[i], |i| src.max_id[i])?;
        match &src.store {
            SeqStore::Host(seqs) => self.write_host_batch(rows.iter().map(|r| match r {
                Some(r) => (seqs[*r].as_slice(), if masked { src.skip[*r] } else { 0 }),
                None => (&[][..], 0),
            })),
            SeqStore::Cuda { dev, ids, meta } => {
                let (b, s) = (self.b, self.s);
                // A contiguous run of rows (then empty rows) needs no list on the device.
                let m = rows.iter().take_while(|r| r.is_some()).count();
                let run = rows.first().copied().flatten().filter(|&r0| {
                    rows[..m]
                        .iter()
                        .enumerate()
                        .all(|(j, r)| *r == Some(r0 + j))
                        && rows[m..].iter().all(|r| r.is_none())
                });
                let list = match run {
                    Some(_) => None,
                    None => {
                        let l: Vec<i32> = (0..b)
                            .map(|j| rows.get(j).copied().flatten().map_or(-1, |r| r as i32))
                            .collect();
                        Some(dev.htod(&l)?)
                    }
                };
                let sess = &self.session;
                let out = [
                    sess.input_device_ptr(self.ids, DType::U32)?,
                    sess.input_device_ptr(self.targets, DType::U32)?,
                    sess.input_device_ptr(self.seq_lens, DType::U32)?,
                ];
                let (src_p, meta_p) = (dev_ptr(dev, ids), dev_ptr(dev, meta));
                let list_p = list.as_ref().map_or(0, |l| dev_ptr(dev, l));
                // SAFETY: the packed rows and their meta were uploaded together (SeqRows::new),
                // every listed row is below src.rows() and no longer than S (checked above); the
                // outputs are this graph's inputs of B·S, B·S and B u32.
                unsafe {
                    crate::kernels::step::seq_rows(
                        dev,
                        src_p,
                        meta_p,
                        src.rows(),
                        list_p,
                        run.unwrap_or(0),
                        m,
                        b,
                        s,
                        masked,
                        self.pad_id,
                        IGNORE_INDEX,
                        out,
                    )?
                };
                // `list` is freed in stream order, after the gather (as StepOps' row lists).
                drop(list);
                self.lens = (0..b)
                    .map(|j| rows.get(j).copied().flatten().map_or(0, |r| src.lens[r]))
                    .collect();
                Ok(())
            }
        }
    }

    /// Checks a batch of `rows.len()` rows (`None`: empty) against B, S and the vocabulary:
    /// `len(i)` and `max_id(i)` of each listed row.
    fn check_rows(
        &self,
        rows: &[Option<usize>],
        len: impl Fn(usize) -> usize,
        max_id: impl Fn(usize) -> Option<u32>,
    ) -> Result<()> {
        if rows.len() > self.b {
            return Err(Error::Shape(format!(
                "set_batch: {} sequences for a batch of {}",
                rows.len(),
                self.b
            )));
        }
        for (i, r) in rows.iter().enumerate() {
            let Some(r) = *r else { continue };
            if len(r) > self.s {
                return Err(Error::Shape(format!(
                    "set_batch: sequence {i} has {} tokens, more than S = {}",
                    len(r),
                    self.s
                )));
            }
            if let Some(m) = max_id(r).filter(|&m| m as usize >= self.vocab) {
                return Err(Error::Invalid(format!(
                    "set_batch: sequence {i} has token {m}, not below vocab_size {}",
                    self.vocab
                )));
            }
        }
        Ok(())
    }

    /// Writes a checked batch (each row's tokens and prompt length) from the host.
    fn write_host_batch<'a>(
        &mut self,
        rows: impl Iterator<Item = (&'a [u32], usize)>,
    ) -> Result<()> {
        let (b, s) = (self.b, self.s);
        let mut ids = vec![self.pad_id; b * s];
        let mut targets = vec![IGNORE_INDEX; b * s];
        let mut lens = vec![0u32; b];
        for (i, (q, skip)) in rows.enumerate() {
            ids[i * s..i * s + q.len()].copy_from_slice(q);
            for t in skip.saturating_sub(1)..q.len().saturating_sub(1) {
                targets[i * s + t] = q[t + 1];
            }
            lens[i] = q.len() as u32;
        }
        // Positions were written at build (nothing else writes them); on CUDA the embedding
        // backward's plan is built from these ids on the device.
        self.session.write(self.ids, &ids)?;
        self.session.write(self.seq_lens, &lens)?;
        self.session.write(self.targets, &targets)?;
        self.lens = lens.iter().map(|&l| l as usize).collect();
        Ok(())
    }

    /// Forward + backward; returns the loss. Parameter gradients are then readable.
    pub fn run(&mut self) -> Result<f32> {
        self.session.run()
    }

    /// Forward only up to the node producing `t` (see [`Session::forward_to`]).
    pub fn forward_to(&mut self, t: TensorId) -> Result<()> {
        self.session.forward_to(t)
    }

    /// Forward only (logits, log-probs and loss readable afterwards).
    pub fn forward(&mut self) -> Result<()> {
        self.session.forward()
    }

    /// The loss of the last run/forward.
    pub fn loss(&self) -> Result<f32> {
        Ok(self.session.read_f32(self.loss)?[0])
    }

    fn read_any(&self, t: TensorId) -> Result<Vec<f32>> {
        match self.session.plan().tensor(t).dtype {
            DType::BF16 => Ok(self
                .session
                .read::<bf16>(t)?
                .into_iter()
                .map(f32::from)
                .collect()),
            _ => self.session.read_f32(t),
        }
    }

    /// Logits `[B][S][V]` of the last run (padding rows hold unspecified values); only for a
    /// graph built with the unfused head ([`Decoder::build_with_logits`]).
    pub fn logits(&self) -> Result<Vec<f32>> {
        let t = self.logits.ok_or_else(|| {
            Error::Invalid(
                "this decoder graph has the chunked LM head: the full logits are never formed \
                 (build it with Decoder::build_with_logits to read them)"
                    .into(),
            )
        })?;
        self.read_any(t)
    }

    /// `[B][S]`: at `[b][t]`, `log p(ids[b][t+1] | ids[b][..=t])`; 0 where there is no target.
    pub fn token_logprobs(&self) -> Result<Vec<f32>> {
        self.session.read_f32(no_lm_head(self.logprob)?)
    }

    /// `[B][S]`: the entropy of the next-token distribution at every position with a target.
    pub fn token_entropies(&self) -> Result<Vec<f32>> {
        self.session.read_f32(no_lm_head(self.entropy)?)
    }

    /// The `[B][S]` token log-prob and entropy tensors (None without the LM head), for copies
    /// that stay on the device.
    pub fn logprob_tensors(&self) -> Option<(TensorId, TensorId)> {
        self.logprob.zip(self.entropy)
    }

    /// Any tensor of the graph as f32 (bf16 widened).
    pub fn read(&self, t: TensorId) -> Result<Vec<f32>> {
        self.read_any(t)
    }

    /// The session, to bind a head's inputs.
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// The batch's input tensors `(ids, targets, seq_lens)` (U32; `[B][S]`, `[B][S]`, `[B]`), as
    /// [`DecoderGraph::set_batch_masked`] writes them.
    pub fn batch_inputs(&self) -> (TensorId, TensorId, TensorId) {
        (self.ids, self.targets, self.seq_lens)
    }

    /// Lengths of the sequences of the current batch.
    pub fn seq_lens(&self) -> &[usize] {
        &self.lens
    }

    /// HF names of the parameters.
    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.params.keys().map(|s| s.as_str())
    }

    /// The graph tensor of parameter `name`.
    pub fn param_id(&self, name: &str) -> Result<TensorId> {
        self.params
            .get(name)
            .copied()
            .ok_or_else(|| Error::Invalid(format!("no parameter named {name}")))
    }

    /// The gradient (f32, HF layout) of parameter `name` after [`DecoderGraph::run`].
    pub fn grad(&self, name: &str) -> Result<Vec<f32>> {
        let t = *self
            .params
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("grad: no parameter named {name}")))?;
        let g = self
            .session
            .plan()
            .grad(t)
            .ok_or_else(|| Error::Invalid(format!("grad: {name} has no gradient")))?;
        self.session.read_f32(g)
    }

    /// Overwrites the gradient of parameter `name` (after a run; see
    /// [`crate::graph::exec::Session::write_param_grad`]).
    pub fn set_grad(&mut self, name: &str, g: &[f32]) -> Result<()> {
        let t = *self
            .params
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("set_grad: no parameter named {name}")))?;
        self.session.write_param_grad(t, g)
    }

    /// The device address of parameter `name` on a CUDA graph (bf16, HF layout): the live
    /// weights, fixed for the graph's life (see [`Session::persistent_ptr`]).
    pub fn param_device_ptr(&self, name: &str) -> Result<u64> {
        let t = *self.params.get(name).ok_or_else(|| {
            Error::Invalid(format!("param_device_ptr: no parameter named {name}"))
        })?;
        match self.session.persistent_ptr(t)? {
            (p, DType::BF16) => Ok(p),
            (_, d) => Err(Error::Invalid(format!(
                "param_device_ptr: {name} holds {d:?}, device generation reads bf16"
            ))),
        }
    }

    /// Overwrites parameter `name` (f32 values, HF layout).
    pub fn set_param(&mut self, name: &str, data: &[f32]) -> Result<()> {
        let t = *self
            .params
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("set_param: no parameter named {name}")))?;
        check_len(name, data.len(), self.session.plan().tensor(t).len)?;
        if self.session.plan().tensor(t).dtype == DType::BF16 {
            let bits: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
            self.session.write(t, &bits)
        } else {
            self.session.write(t, data)
        }
    }
}

/// The device address of a buffer on `dev`'s stream.
fn dev_ptr<T>(dev: &crate::device::CudaDevice, x: &cudarc::driver::CudaSlice<T>) -> u64 {
    let (p, _g) = cudarc::driver::DevicePtr::device_ptr(x, dev.stream());
    p
}

fn no_lm_head(t: Option<TensorId>) -> Result<TensorId> {
    t.ok_or_else(|| Error::Invalid("this decoder graph was built without the LM head".into()))
}

/// What [`Decoder::build_with`] hands the head: the trunk's tensors.
pub struct Trunk {
    /// Tokens in the graph, B·S.
    pub n: usize,
    pub hidden_size: usize,
    /// The final-norm hidden states `[n][hidden_size]`, in `act`.
    pub hidden: TensorId,
    /// The activation dtype (f32 on the CPU, bf16 on CUDA).
    pub act: DType,
    /// Next-token targets (U32, [`IGNORE_INDEX`] where none).
    pub targets: TensorId,
    /// With the LM head: per-token log-probs and entropies (f32, n).
    pub logprob: Option<TensorId>,
    pub entropy: Option<TensorId>,
}

/// What a head adds: the scalar loss, tensors to keep readable, and its named parameters.
pub struct HeadOut {
    pub loss: TensorId,
    pub keep: Vec<TensorId>,
    pub params: Vec<(String, TensorId)>,
}
