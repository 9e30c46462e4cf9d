//! Generation on the CUDA device from a policy graph's LIVE device weights.
//!
//! The same loop as the CPU generator ([`super::generate`], the reference): one batched prefill
//! of the P distinct prompts (right-padded to the call's longest prompt S), whose keys and
//! values are copied into the cache rows of each prompt's `n_samples` samples (computed once,
//! copied n times); then per new token: sample every row (`kernels/sample.cu`
//! `sample_rows_dev`, the CPU's draw rules and counters: [`crate::kernels::sample`]), record
//! it, finish rows on a stop id (`kernels/generate.cu` `gen_step`, all on the device), and run
//! one decode step over every row (embedding, RMSNorm, cuBLAS projections, RoPE at the row's
//! position, the cache write, flash-decoding attention, SwiGLU MLP, LM head). Finished rows keep
//! decoding their last token (as on the CPU; their results are ignored).
//!
//! The weights are read where the policy's [`DecoderGraph`] keeps them (bf16, the graph's
//! persistent buffer): no host copy and no sync step. Activations are bf16, softmax and norm
//! statistics fp32, as in the training graph (the same kernels), so greedy tokens equal the CPU
//! generator's (fp32) except where two logits are closer than bf16 arithmetic resolves.
//!
//! The per-token work (sample, step update, decode forward) reads all its varying inputs from
//! device memory (the seed and counter, positions, cache lengths, the last tokens), so it is
//! captured once in a CUDA graph and a token costs one graph launch. The graph is captured on
//! the second step of the first call (the first runs the same launches directly, which loads
//! every kernel and the cuBLAS handle before capture), and recaptured only when the weights'
//! addresses or the sampling settings change. [`DeviceGenerator::set_use_graph`]`(false)` or
//! `DFPO_CUDA_GRAPH=0` runs the launches directly every step (debugging; also forced by
//! `DFPO_SYNC_LAUNCH=1`, which synchronises inside launches).
//!
//! A generator has its own stream and cuBLAS handle on the device's context (its capture then
//! records only its own launches, whatever other threads queue elsewhere); a call first waits
//! for the work queued on the stream of the weights' graph, so it reads the updated weights.
//!
//! Host traffic per call: the prompts, their lengths and the state block up (a few KiB), the
//! active-row count (4 bytes) every [`ACTIVE_CHECK_EVERY`] steps so that a batch whose rows
//! all stopped ends early, and at the end the generated token ids and counts (and, only when
//! asked, their log-probs). [`DeviceGenerator::traffic`] counts the bytes.

use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::config::ModelConfig;
use super::decoder::DecoderGraph;
use super::generate::{GenerateParams, Generation};
use super::ops::gpu;
use crate::device::{blocks_for, CudaDevice, Device};
use crate::error::{Error, Result};
use crate::kernels::sample::{self, SampleParams};
use crate::kernels::{act, attention, embed, norm, rope};

const FAMILY: &str = "generate";
/// Most stop ids one call may use.
pub const MAX_STOP_IDS: usize = 64;
/// Steps between two reads of the active-row count (an early end of the batch is noticed at
/// most this many steps late; the extra steps change no recorded token).
pub const ACTIVE_CHECK_EVERY: usize = 8;

/// The shapes a [`DeviceGenerator`] is allocated for; a call may use less of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenCapacity {
    /// Prompts per call.
    pub prompts: usize,
    /// Rows per prompt (exact: a call must use this many).
    pub n_samples: usize,
    /// Longest prompt.
    pub max_prompt_len: usize,
    /// Most new tokens per row.
    pub max_new_tokens: usize,
}

impl GenCapacity {
    fn rows(&self) -> usize {
        self.prompts * self.n_samples
    }
    fn max_len(&self) -> usize {
        self.max_prompt_len + self.max_new_tokens
    }
}

/// Bytes moved between host and device by a generator since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub h2d_bytes: u64,
    pub d2h_bytes: u64,
    /// Decode steps run as one CUDA-graph launch.
    pub graph_launches: u64,
    /// Decode steps run as direct launches.
    pub direct_steps: u64,
}

/// The state block of `kernels/generate.cu` (`GenState`, same layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct GenState {
    seed: u64,
    counter: u64,
    advance: u64,
    step: u32,
    n_stop: u32,
    active: u32,
    bad_row: u32,
}

/// One device allocation and its address.
struct Buf {
    _mem: CudaSlice<u8>,
    ptr: u64,
    bytes: usize,
}

impl Buf {
    fn new(dev: &CudaDevice, bytes: usize) -> Result<Self> {
        let mem = dev.stream().alloc_zeros::<u8>(bytes.max(16)).map_err(|e| {
            Error::Cuda(format!("device generation: allocating {bytes} bytes: {e}"))
        })?;
        let ptr = {
            let (ptr, _g) = mem.device_ptr(dev.stream());
            ptr
        };
        Ok(Buf {
            _mem: mem,
            ptr,
            bytes,
        })
    }
}

/// Addresses of one layer's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LayerW {
    ln1: u64,
    wq: u64,
    wk: u64,
    wv: u64,
    bq: u64,
    bk: u64,
    bv: u64,
    wo: u64,
    bo: u64,
    ln2: u64,
    wg: u64,
    wu: u64,
    wd: u64,
}

/// Addresses of the model's weights in a policy graph (bf16).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Weights {
    embed: u64,
    layers: Vec<LayerW>,
    norm: u64,
    head: u64,
}

impl Weights {
    fn of(g: &DecoderGraph, c: &ModelConfig) -> Result<Self> {
        let p = |n: &str| g.param_device_ptr(n);
        let opt = |n: &str, on: bool| if on { p(n) } else { Ok(0) };
        let layers = (0..c.num_hidden_layers)
            .map(|l| {
                let n = |s: &str| format!("model.layers.{l}.{s}");
                let qkv = c.attention_bias;
                Ok(LayerW {
                    ln1: p(&n("input_layernorm.weight"))?,
                    wq: p(&n("self_attn.q_proj.weight"))?,
                    wk: p(&n("self_attn.k_proj.weight"))?,
                    wv: p(&n("self_attn.v_proj.weight"))?,
                    bq: opt(&n("self_attn.q_proj.bias"), qkv)?,
                    bk: opt(&n("self_attn.k_proj.bias"), qkv)?,
                    bv: opt(&n("self_attn.v_proj.bias"), qkv)?,
                    wo: p(&n("self_attn.o_proj.weight"))?,
                    bo: opt(&n("self_attn.o_proj.bias"), c.o_proj_bias())?,
                    ln2: p(&n("post_attention_layernorm.weight"))?,
                    wg: p(&n("mlp.gate_proj.weight"))?,
                    wu: p(&n("mlp.up_proj.weight"))?,
                    wd: p(&n("mlp.down_proj.weight"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = p("model.embed_tokens.weight")?;
        Ok(Weights {
            embed,
            layers,
            norm: p("model.norm.weight")?,
            head: if c.tie_word_embeddings {
                embed
            } else {
                p("lm_head.weight")?
            },
        })
    }
}

/// Device buffers of one generator.
struct Bufs {
    // Prefill inputs.
    ids: Buf,
    ppos: Buf,
    plen: Buf,
    // Activations, sized for max(P·S, rows) tokens.
    x: Buf,
    a: Buf,
    h1: Buf,
    t: Buf,
    q: Buf,
    k: Buf,
    v: Buf,
    o: Buf,
    gu: Buf,
    sw: Buf,
    rstd: Buf,
    lse: Buf,
    last: Buf,
    logits: Buf,
    // Caches, [L][rows][Hkv][max_len][D] each.
    kc: Buf,
    vc: Buf,
    dec_ws: Buf,
    // Sampler outputs of a step.
    tok: Buf,
    lps: Buf,
    lpp: Buf,
    nkept: Buf,
    // Generation state.
    state: Buf,
    stop: Buf,
    cur_tok: Buf,
    pos: Buf,
    cache_lens: Buf,
    finished: Buf,
    n_tok: Buf,
    out_tok: Buf,
    out_lps: Buf,
    out_lpp: Buf,
}

/// Generation on one CUDA device for one capacity (see the module doc).
pub struct DeviceGenerator {
    dev: Arc<CudaDevice>,
    c: ModelConfig,
    cap: GenCapacity,
    b: Bufs,
    use_graph: bool,
    /// The captured decode step and what it was captured for.
    graph: Option<(CudaGraph, Weights, SampleParams)>,
    traffic: Traffic,
    return_logprobs: bool,
    /// Why stream capture failed, when it did (the generator then decodes with direct launches).
    graph_unavailable: Option<String>,
}

// SAFETY: the CUDA graph handle is only used through `&mut self` (one thread at a time), which
// CUDA allows for graph objects; every other field is Send.
unsafe impl Send for DeviceGenerator {}

fn bf16s(n: usize) -> usize {
    n * 2
}

impl DeviceGenerator {
    /// Allocates the buffers for `cap` on `dev`'s GPU. The generator runs on a stream (and
    /// cuBLAS handle) of its own on the same context, so that capturing its decode step cannot
    /// take in work another thread queues on `dev`'s stream; each call first waits for the work
    /// queued on the weights' device (e.g. their last update).
    pub fn new(dev: Arc<CudaDevice>, config: &ModelConfig, cap: GenCapacity) -> Result<Self> {
        let dev = CudaDevice::new(dev.ordinal())?;
        if cap.prompts == 0
            || cap.n_samples == 0
            || cap.max_prompt_len == 0
            || cap.max_new_tokens == 0
        {
            return Err(Error::Invalid(format!(
                "device generation: capacity {cap:?}: every field must be >= 1"
            )));
        }
        let c = config.clone();
        if cap.max_len() > c.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "device generation: prompt length {} + max_new_tokens {} exceeds \
                 max_position_embeddings {}",
                cap.max_prompt_len, cap.max_new_tokens, c.max_position_embeddings
            )));
        }
        if c.vocab_size > sample::cuda::MAX_VOCAB {
            return Err(Error::Invalid(format!(
                "device generation: vocab_size {} exceeds the sampler's limit {}",
                c.vocab_size,
                sample::cuda::MAX_VOCAB
            )));
        }
        let (h, qd, kvd, ff, v) = (
            c.hidden_size,
            c.q_dim(),
            c.kv_dim(),
            c.intermediate_size,
            c.vocab_size,
        );
        let (hq, hkv, hd, nl) = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.num_hidden_layers,
        );
        let (p, s, rows, ml, mn) = (
            cap.prompts,
            cap.max_prompt_len,
            cap.rows(),
            cap.max_len(),
            cap.max_new_tokens,
        );
        let nt = (p * s).max(rows);
        let cache = nl.checked_mul(rows * hkv * ml * hd).ok_or_else(|| {
            Error::Shape(format!("device generation: cache of {cap:?} overflows"))
        })?;
        let d = &dev;
        let b = Bufs {
            ids: Buf::new(d, 4 * p * s)?,
            ppos: Buf::new(d, 4 * p * s)?,
            plen: Buf::new(d, 4 * p)?,
            x: Buf::new(d, bf16s(nt * h))?,
            a: Buf::new(d, bf16s(nt * h))?,
            h1: Buf::new(d, bf16s(nt * h))?,
            t: Buf::new(d, bf16s(nt * h))?,
            q: Buf::new(d, bf16s(nt * qd))?,
            k: Buf::new(d, bf16s(nt * kvd))?,
            v: Buf::new(d, bf16s(nt * kvd))?,
            o: Buf::new(d, bf16s(nt * qd))?,
            gu: Buf::new(d, bf16s(nt * 2 * ff))?,
            sw: Buf::new(d, bf16s(nt * ff))?,
            rstd: Buf::new(d, 4 * nt)?,
            lse: Buf::new(d, 4 * p * hq * s)?,
            last: Buf::new(d, bf16s(rows * h))?,
            logits: Buf::new(d, bf16s(rows * v))?,
            kc: Buf::new(d, bf16s(cache))?,
            vc: Buf::new(d, bf16s(cache))?,
            dec_ws: Buf::new(
                d,
                4 * attention::cuda::decode_workspace_len(rows, hq, hkv, ml, hd),
            )?,
            tok: Buf::new(d, 4 * rows)?,
            lps: Buf::new(d, 4 * rows)?,
            lpp: Buf::new(d, 4 * rows)?,
            nkept: Buf::new(d, 4 * rows)?,
            state: Buf::new(d, std::mem::size_of::<GenState>())?,
            stop: Buf::new(d, 4 * MAX_STOP_IDS)?,
            cur_tok: Buf::new(d, 4 * rows)?,
            pos: Buf::new(d, 4 * rows)?,
            cache_lens: Buf::new(d, 4 * rows)?,
            finished: Buf::new(d, 4 * rows)?,
            n_tok: Buf::new(d, 4 * rows)?,
            out_tok: Buf::new(d, 4 * rows * mn)?,
            out_lps: Buf::new(d, 4 * rows * mn)?,
            out_lpp: Buf::new(d, 4 * rows * mn)?,
        };
        let env_off = std::env::var("DFPO_CUDA_GRAPH").is_ok_and(|v| v == "0")
            || std::env::var("DFPO_SYNC_LAUNCH").is_ok_and(|v| v == "1");
        Ok(DeviceGenerator {
            dev,
            c,
            cap,
            b,
            use_graph: !env_off,
            graph: None,
            traffic: Traffic::default(),
            return_logprobs: false,
            graph_unavailable: None,
        })
    }

    /// The capacity this generator was allocated for.
    pub fn capacity(&self) -> GenCapacity {
        self.cap
    }

    /// Device memory held, in bytes.
    pub fn device_bytes(&self) -> usize {
        let b = &self.b;
        [
            &b.ids,
            &b.ppos,
            &b.plen,
            &b.x,
            &b.a,
            &b.h1,
            &b.t,
            &b.q,
            &b.k,
            &b.v,
            &b.o,
            &b.gu,
            &b.sw,
            &b.rstd,
            &b.lse,
            &b.last,
            &b.logits,
            &b.kc,
            &b.vc,
            &b.dec_ws,
            &b.tok,
            &b.lps,
            &b.lpp,
            &b.nkept,
            &b.state,
            &b.stop,
            &b.cur_tok,
            &b.pos,
            &b.cache_lens,
            &b.finished,
            &b.n_tok,
            &b.out_tok,
            &b.out_lps,
            &b.out_lpp,
        ]
        .iter()
        .map(|x| x.bytes)
        .sum()
    }

    /// Whether this generator can run `prompts` under `p` (see [`GenCapacity`]).
    pub fn fits(&self, prompts: &[Vec<u32>], p: &GenerateParams) -> bool {
        let s = prompts.iter().map(Vec::len).max().unwrap_or(0);
        p.n_samples == self.cap.n_samples
            && prompts.len() <= self.cap.prompts
            && s <= self.cap.max_prompt_len
            && p.max_new_tokens <= self.cap.max_new_tokens
            && p.stop_ids.len() <= MAX_STOP_IDS
    }

    /// Decode steps as one CUDA-graph launch each (true, the default) or as direct launches.
    pub fn set_use_graph(&mut self, on: bool) {
        self.use_graph = on;
        if !on {
            self.graph = None;
        }
    }

    /// Whether the log-probs of each token come back too (off by default: only the token ids
    /// do, and [`Generation::logprobs`] / `policy_logprobs` are empty).
    pub fn set_return_logprobs(&mut self, on: bool) {
        self.return_logprobs = on;
    }

    /// Why the driver refused stream capture, when it did (decoding then uses direct launches).
    pub fn graph_unavailable(&self) -> Option<&str> {
        self.graph_unavailable.as_deref()
    }

    /// Host traffic and step counts so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// Generates continuations of `prompts` with the weights of `weights` (a policy graph on
    /// this device); returns `prompts.len() · n_samples` rows, prompt-major, with the same
    /// tokens the CPU generator draws for the same seed where bf16 arithmetic allows.
    pub fn generate(
        &mut self,
        weights: &DecoderGraph,
        prompts: &[Vec<u32>],
        p: &GenerateParams,
    ) -> Result<Vec<Generation>> {
        p.sample.validate()?;
        let c = &self.c;
        let v = c.vocab_size;
        if p.max_new_tokens == 0 || p.n_samples == 0 {
            return Err(Error::Invalid(format!(
                "generate: max_new_tokens = {} and n_samples = {} must be >= 1",
                p.max_new_tokens, p.n_samples
            )));
        }
        if prompts.is_empty() {
            return Err(Error::Invalid("generate: no prompts".into()));
        }
        for (i, q) in prompts.iter().enumerate() {
            if q.is_empty() {
                return Err(Error::Invalid(format!("generate: prompt {i} is empty")));
            }
            if let Some(j) = q.iter().position(|&t| t as usize >= v) {
                return Err(Error::Invalid(format!(
                    "generate: prompt {i} token {j} = {} is not below vocab_size {v}",
                    q[j]
                )));
            }
        }
        if !self.fits(prompts, p) {
            return Err(Error::Invalid(format!(
                "device generation: {} prompts of at most {} tokens, n_samples {}, \
                 max_new_tokens {}, {} stop ids do not fit the generator's capacity {:?} \
                 (at most {MAX_STOP_IDS} stop ids)",
                prompts.len(),
                prompts.iter().map(Vec::len).max().unwrap_or(0),
                p.n_samples,
                p.max_new_tokens,
                p.stop_ids.len(),
                self.cap
            )));
        }
        match weights.session().device() {
            Device::Cuda(d) if d.ordinal() == self.dev.ordinal() => d.synchronize()?,
            other => {
                return Err(Error::Invalid(format!(
                    "device generation: the weights' graph is on {}, the generator on cuda:{}",
                    other.describe(),
                    self.dev.ordinal()
                )))
            }
        }
        let w = Weights::of(weights, c)?;
        let cap = self.cap;
        let (np, n) = (cap.prompts, cap.n_samples);
        let rows = cap.rows();
        let real_rows = prompts.len() * n;
        let s = prompts.iter().map(Vec::len).max().unwrap_or(1);
        let pad = c.pad_token_id.unwrap_or(0).min(v as u32 - 1);

        // Prefill inputs: P prompts (missing ones: one pad token, their rows never recorded).
        let mut ids = vec![pad; np * s];
        let mut plen = vec![1u32; np];
        for (i, q) in prompts.iter().enumerate() {
            ids[i * s..i * s + q.len()].copy_from_slice(q);
            plen[i] = q.len() as u32;
        }
        let ppos: Vec<u32> = (0..np * s).map(|i| (i % s) as u32).collect();
        let mut stop = p.stop_ids.clone();
        stop.resize(MAX_STOP_IDS, u32::MAX);
        let st = GenState {
            seed: p.seed,
            counter: 0,
            advance: real_rows as u64,
            step: 0,
            n_stop: p.stop_ids.len() as u32,
            active: real_rows as u32,
            bad_row: u32::MAX,
        };
        let finished: Vec<u32> = (0..rows).map(|r| u32::from(r >= real_rows)).collect();
        let zeros = vec![0u32; rows];
        let ones = vec![1u32; rows];
        let cur: Vec<u32> = vec![pad; rows];
        self.upload(self.b.ids.ptr, &ids)?;
        self.upload(self.b.ppos.ptr, &ppos)?;
        self.upload(self.b.plen.ptr, &plen)?;
        self.upload(self.b.stop.ptr, &stop)?;
        self.upload(self.b.state.ptr, bytemuck::bytes_of(&st))?;
        self.upload(self.b.finished.ptr, &finished)?;
        self.upload(self.b.n_tok.ptr, &zeros)?;
        self.upload(self.b.pos.ptr, &zeros)?;
        self.upload(self.b.cache_lens.ptr, &ones)?;
        self.upload(self.b.cur_tok.ptr, &cur)?;

        // SAFETY: every pointer is one of this generator's buffers, sized for `cap` (which the
        // call fits), or a weight of `weights` (its live parameters, shapes checked when the
        // graph was built from this config).
        unsafe { self.prefill(&w, s)? };
        if self
            .graph
            .as_ref()
            .is_some_and(|g| g.1 != w || g.2 != p.sample)
        {
            self.graph = None;
        }
        for step in 0..p.max_new_tokens {
            let last = step + 1 == p.max_new_tokens;
            if last {
                // The last token needs no decode step after it.
                unsafe { self.sample_step(&p.sample)? };
                self.traffic.direct_steps += 1;
            } else if self.use_graph && step > 0 {
                if self.graph.is_none() {
                    self.capture(&w, &p.sample)?;
                }
                match &self.graph {
                    Some((g, ..)) => {
                        g.launch().map_err(|e| {
                            Error::Cuda(format!("device generation: graph launch: {e}"))
                        })?;
                        self.traffic.graph_launches += 1;
                    }
                    None => {
                        // Capture is unavailable (see `capture`): direct launches.
                        unsafe { self.decode_step(&w, &p.sample)? };
                        self.traffic.direct_steps += 1;
                    }
                }
            } else {
                // SAFETY: as for the prefill.
                unsafe { self.decode_step(&w, &p.sample)? };
                self.traffic.direct_steps += 1;
            }
            if !last && (step + 1) % ACTIVE_CHECK_EVERY == 0 {
                let st: GenState = self.read_state()?;
                if st.active == 0 {
                    break;
                }
            }
        }
        let st = self.read_state()?;
        if st.bad_row != u32::MAX {
            return Err(Error::Invalid(format!(
                "generate: row {} could not be sampled (a NaN or +inf logit, or every logit -inf)",
                st.bad_row
            )));
        }
        let mn = cap.max_new_tokens;
        let toks: Vec<u32> = self.download(self.b.out_tok.ptr, real_rows * mn)?;
        let counts: Vec<u32> = self.download(self.b.n_tok.ptr, real_rows)?;
        let fin: Vec<u32> = self.download(self.b.finished.ptr, real_rows)?;
        let (lps, lpp): (Vec<f32>, Vec<f32>) = if self.return_logprobs {
            (
                self.download(self.b.out_lps.ptr, real_rows * mn)?,
                self.download(self.b.out_lpp.ptr, real_rows * mn)?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        Ok((0..real_rows)
            .map(|r| {
                let k = counts[r] as usize;
                let span = r * mn..r * mn + k;
                Generation {
                    prompt_index: r / n,
                    sample_index: r % n,
                    tokens: toks[span.clone()].to_vec(),
                    logprobs: if lps.is_empty() {
                        Vec::new()
                    } else {
                        lps[span.clone()].to_vec()
                    },
                    policy_logprobs: if lpp.is_empty() {
                        Vec::new()
                    } else {
                        lpp[span].to_vec()
                    },
                    stopped: fin[r] != 0,
                }
            })
            .collect())
    }

    fn upload<T: bytemuck::Pod>(&mut self, dst: u64, data: &[T]) -> Result<()> {
        self.dev.make_current()?;
        // SAFETY: dst is one of our buffers, at least as long as data (sized by the capacity);
        // the stream is synchronised before `data` can go away.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst, data, self.dev.stream().cu_stream())?
        };
        self.dev.synchronize()?;
        self.traffic.h2d_bytes += std::mem::size_of_val(data) as u64;
        Ok(())
    }

    fn download<T: bytemuck::Pod + Default>(&mut self, src: u64, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        self.dev.make_current()?;
        // SAFETY: src holds at least n elements of T (our buffers); synchronised before `out`
        // is read.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut out, src, self.dev.stream().cu_stream())?
        };
        self.dev.synchronize()?;
        self.traffic.d2h_bytes += std::mem::size_of_val(out.as_slice()) as u64;
        Ok(out)
    }

    fn read_state(&mut self) -> Result<GenState> {
        let bytes: Vec<u8> = self.download(self.b.state.ptr, std::mem::size_of::<GenState>())?;
        Ok(bytemuck::pod_read_unaligned(&bytes))
    }

    /// Captures one decode step (sample, state update, decode forward) as a CUDA graph.
    fn capture(&mut self, w: &Weights, sp: &SampleParams) -> Result<()> {
        let stream = self.dev.stream().clone();
        if let Err(e) =
            stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        {
            // A driver without stream capture (the emulated one): say so once, then decode
            // with direct launches. A failure after capture began is an error.
            eprintln!(
                "device generation: CUDA stream capture is unavailable ({e}); decoding with \
                 direct launches"
            );
            self.use_graph = false;
            self.graph_unavailable = Some(e.to_string());
            return Ok(());
        }
        // SAFETY: as in `generate`; during capture nothing runs, the launches are recorded.
        let r = unsafe { self.decode_step(w, sp) };
        let g = stream.end_capture(CUgraphInstantiate_flags(0));
        r?;
        let g = g
            .map_err(|e| Error::Cuda(format!("device generation: end capture: {e}")))?
            .ok_or_else(|| Error::Cuda("device generation: the captured graph is empty".into()))?;
        self.graph = Some((g, w.clone(), *sp));
        Ok(())
    }

    /// Sample every row from `logits` and update the state (2 launches).
    unsafe fn sample_step(&self, sp: &SampleParams) -> Result<()> {
        let (b, rows, v) = (&self.b, self.cap.rows(), self.c.vocab_size);
        // GenState: seed at offset 0, counter at 8.
        sample::cuda::sample_dev_raw(
            &self.dev,
            b.logits.ptr,
            rows,
            v,
            sp,
            b.state.ptr,
            b.tok.ptr,
            b.lps.ptr,
            b.lpp.ptr,
            b.nkept.ptr,
        )?;
        let f = self.dev.function(FAMILY, "gen_step")?;
        let (ns, ri, mn) = (
            self.cap.n_samples as i32,
            rows as i32,
            self.cap.max_new_tokens as i32,
        );
        let mut l = self.dev.launch_builder(&f);
        l.arg(&b.state.ptr)
            .arg(&b.tok.ptr)
            .arg(&b.lps.ptr)
            .arg(&b.lpp.ptr)
            .arg(&b.nkept.ptr)
            .arg(&b.stop.ptr)
            .arg(&b.plen.ptr)
            .arg(&ns)
            .arg(&ri)
            .arg(&mn)
            .arg(&b.out_tok.ptr)
            .arg(&b.out_lps.ptr)
            .arg(&b.out_lpp.ptr)
            .arg(&b.cur_tok.ptr)
            .arg(&b.pos.ptr)
            .arg(&b.cache_lens.ptr)
            .arg(&b.finished.ptr)
            .arg(&b.n_tok.ptr);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.dev.launch("gen_step", l, cfg)
    }

    /// One token: sample, update, and the decode forward of every row into `logits`.
    unsafe fn decode_step(&self, w: &Weights, sp: &SampleParams) -> Result<()> {
        self.sample_step(sp)?;
        let b = &self.b;
        let rows = self.cap.rows();
        self.forward(w, b.cur_tok.ptr, b.pos.ptr, rows, Attn::Decode)?;
        self.lm_head(w, b.a.ptr, rows)
    }

    /// The batched prefill of the prompts (`s` tokens each, right-padded) into the caches of
    /// every row, and the logits of each row's last prompt token.
    unsafe fn prefill(&self, w: &Weights, s: usize) -> Result<()> {
        let b = &self.b;
        let (np, h) = (self.cap.prompts, self.c.hidden_size);
        let rows = self.cap.rows();
        self.forward(w, b.ids.ptr, b.ppos.ptr, np * s, Attn::Prefill { s })?;
        let f = self.dev.function(FAMILY, "gen_gather_last")?;
        let (ns, si, hi, ri) = (self.cap.n_samples as i32, s as i32, h as i32, rows as i32);
        let mut l = self.dev.launch_builder(&f);
        l.arg(&b.a.ptr)
            .arg(&b.last.ptr)
            .arg(&b.plen.ptr)
            .arg(&ns)
            .arg(&si)
            .arg(&hi)
            .arg(&ri);
        self.dev.launch("gen_gather_last", l, grid(rows * h))?;
        self.lm_head(w, b.last.ptr, rows)
    }

    unsafe fn lm_head(&self, w: &Weights, x: u64, rows: usize) -> Result<()> {
        let (h, v) = (self.c.hidden_size, self.c.vocab_size);
        gpu::linear_fwd(&self.dev, x, w.head, rows, h, v, self.b.logits.ptr, v, 0.0)
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn linear(
        &self,
        x: u64,
        wt: u64,
        bias: u64,
        n: usize,
        din: usize,
        dout: usize,
        y: u64,
    ) -> Result<()> {
        let mut beta = 0.0;
        if bias != 0 {
            gpu::bias_fill(&self.dev, y, bias, n, dout)?;
            beta = 1.0;
        }
        gpu::linear_fwd(&self.dev, x, wt, n, din, dout, y, dout, beta)
    }

    /// The decoder over `n` tokens `ids` at positions `pos` (both device u32), as the training
    /// graph computes it (same kernels); the final-norm hidden states land in `a`, and every
    /// layer's keys and values in the caches.
    unsafe fn forward(&self, w: &Weights, ids: u64, pos: u64, n: usize, mode: Attn) -> Result<()> {
        let (c, b, dev) = (&self.c, &self.b, &*self.dev);
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
        let scale = attention::softmax_scale(hd);
        let rows = self.cap.rows();
        let ml = self.cap.max_len();
        let layer_cache = (rows * hkv * ml * hd * 2) as u64;
        embed::cuda::embed_fwd_raw(dev, ids, w.embed, n, v, h, b.x.ptr, 0)?;
        norm::cuda::rmsnorm_fwd_raw(
            dev,
            b.x.ptr,
            w.layers[0].ln1,
            n,
            h,
            eps,
            b.a.ptr,
            b.rstd.ptr,
        )?;
        for (l, lw) in w.layers.iter().enumerate() {
            self.linear(b.a.ptr, lw.wq, lw.bq, n, h, qd, b.q.ptr)?;
            self.linear(b.a.ptr, lw.wk, lw.bk, n, h, kvd, b.k.ptr)?;
            self.linear(b.a.ptr, lw.wv, lw.bv, n, h, kvd, b.v.ptr)?;
            rope::cuda::rope_fwd_raw(dev, b.q.ptr, b.k.ptr, pos, n, hq, hkv, hd, qd, kvd, theta)?;
            let (kc, vc) = (
                b.kc.ptr + l as u64 * layer_cache,
                b.vc.ptr + l as u64 * layer_cache,
            );
            match mode {
                Attn::Prefill { s } => {
                    let np = self.cap.prompts;
                    attention::cuda::attention_fwd_raw(
                        dev, b.q.ptr, b.k.ptr, b.v.ptr, b.plen.ptr, np, s, hq, hkv, hd, scale,
                        b.o.ptr, b.lse.ptr,
                    )?;
                    let f = dev.function(FAMILY, "gen_prefill_cache")?;
                    let (ns, si, hk, mli, di, ri) = (
                        self.cap.n_samples as i32,
                        s as i32,
                        hkv as i32,
                        ml as i32,
                        hd as i32,
                        rows as i32,
                    );
                    let mut a = dev.launch_builder(&f);
                    a.arg(&b.k.ptr)
                        .arg(&b.v.ptr)
                        .arg(&kc)
                        .arg(&vc)
                        .arg(&b.plen.ptr)
                        .arg(&ns)
                        .arg(&si)
                        .arg(&hk)
                        .arg(&mli)
                        .arg(&di)
                        .arg(&ri);
                    dev.launch("gen_prefill_cache", a, grid(rows * hkv * s * hd))?;
                }
                Attn::Decode => {
                    let f = dev.function(FAMILY, "gen_decode_cache")?;
                    let (hk, mli, di, ri) = (hkv as i32, ml as i32, hd as i32, rows as i32);
                    let mut a = dev.launch_builder(&f);
                    a.arg(&b.k.ptr)
                        .arg(&b.v.ptr)
                        .arg(&kc)
                        .arg(&vc)
                        .arg(&b.pos.ptr)
                        .arg(&hk)
                        .arg(&mli)
                        .arg(&di)
                        .arg(&ri);
                    dev.launch("gen_decode_cache", a, grid(rows * hkv * hd))?;
                    attention::cuda::decode_attention_raw(
                        dev,
                        b.q.ptr,
                        kc,
                        vc,
                        b.cache_lens.ptr,
                        rows,
                        hq,
                        hkv,
                        ml,
                        hd,
                        scale,
                        b.o.ptr,
                        b.dec_ws.ptr,
                    )?;
                }
            }
            self.linear(b.o.ptr, lw.wo, lw.bo, n, qd, h, b.t.ptr)?;
            // h1 = x + ao, a = rmsnorm(h1)
            norm::cuda::add_rmsnorm_fwd_raw(
                dev, b.t.ptr, b.x.ptr, lw.ln2, n, h, eps, b.h1.ptr, b.a.ptr, b.rstd.ptr,
            )?;
            for (half, wt) in [(0u64, lw.wg), (1, lw.wu)] {
                let y = b.gu.ptr + half * (ff as u64) * 2;
                gpu::linear_fwd(dev, b.a.ptr, wt, n, h, ff, y, 2 * ff, 0.0)?;
            }
            act::cuda::swiglu_fwd_raw(dev, b.gu.ptr, n, ff, b.sw.ptr)?;
            self.linear(b.sw.ptr, lw.wd, 0, n, ff, h, b.t.ptr)?;
            let next = w.layers.get(l + 1).map_or(w.norm, |x| x.ln1);
            // x = h1 + m, a = rmsnorm(x) with the next layer's (or the final) norm.
            norm::cuda::add_rmsnorm_fwd_raw(
                dev, b.t.ptr, b.h1.ptr, next, n, h, eps, b.x.ptr, b.a.ptr, b.rstd.ptr,
            )?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
enum Attn {
    /// `[P][s]` right-padded prompts (lengths in `plen`).
    Prefill { s: usize },
    /// One token per row at `pos[row]`.
    Decode,
}

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks_for(n, 256).clamp(1, 65536), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Generators for the shapes a caller uses (rollout and eval differ), made on first use.
pub struct DeviceGenerators {
    dev: Arc<CudaDevice>,
    config: ModelConfig,
    gens: Vec<DeviceGenerator>,
}

impl DeviceGenerators {
    pub fn new(dev: Arc<CudaDevice>, config: &ModelConfig) -> Self {
        DeviceGenerators {
            dev,
            config: config.clone(),
            gens: Vec::new(),
        }
    }

    /// Generates with a generator that fits the call, making one of capacity
    /// `(prompts, n_samples, max(longest prompt, max_prompt_len), max_new_tokens)` when none
    /// does (pass the caller's limits as `max_prompt_len` so that one generator serves every
    /// call of a run).
    pub fn generate(
        &mut self,
        weights: &DecoderGraph,
        prompts: &[Vec<u32>],
        p: &GenerateParams,
        max_prompt_len: usize,
    ) -> Result<Vec<Generation>> {
        let i = match self.gens.iter().position(|g| g.fits(prompts, p)) {
            Some(i) => i,
            None => {
                let s = prompts.iter().map(Vec::len).max().unwrap_or(1);
                let cap = GenCapacity {
                    prompts: prompts.len().max(1),
                    n_samples: p.n_samples,
                    max_prompt_len: s.max(max_prompt_len),
                    max_new_tokens: p.max_new_tokens,
                };
                let g = DeviceGenerator::new(self.dev.clone(), &self.config, cap)?;
                eprintln!(
                    "device generation: {} prompts x {} samples, {} + {} tokens: {:.2} GB on the \
                     device (KV cache {:.2} GB)",
                    cap.prompts,
                    cap.n_samples,
                    cap.max_prompt_len,
                    cap.max_new_tokens,
                    g.device_bytes() as f64 / 1e9,
                    (g.b.kc.bytes + g.b.vc.bytes) as f64 / 1e9
                );
                self.gens.push(g);
                self.gens.len() - 1
            }
        };
        self.gens[i].generate(weights, prompts, p)
    }

    /// Traffic summed over the generators.
    pub fn traffic(&self) -> Traffic {
        self.gens.iter().fold(Traffic::default(), |a, g| {
            let t = g.traffic();
            Traffic {
                h2d_bytes: a.h2d_bytes + t.h2d_bytes,
                d2h_bytes: a.d2h_bytes + t.d2h_bytes,
                graph_launches: a.graph_launches + t.graph_launches,
                direct_steps: a.direct_steps + t.direct_steps,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_block_matches_the_kernel_layout() {
        // kernels/generate.cu GenState: three u64 then four u32, no padding; seed at 0 and the
        // counter at 8 are what sample_rows_dev reads.
        assert_eq!(std::mem::size_of::<GenState>(), 40);
        let st = GenState {
            seed: 1,
            counter: 2,
            advance: 3,
            step: 4,
            n_stop: 5,
            active: 6,
            bad_row: 7,
        };
        let b = bytemuck::bytes_of(&st);
        assert_eq!(u64::from_ne_bytes(b[0..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_ne_bytes(b[8..16].try_into().unwrap()), 2);
        assert_eq!(u32::from_ne_bytes(b[24..28].try_into().unwrap()), 4);
        assert_eq!(u32::from_ne_bytes(b[36..40].try_into().unwrap()), 7);
    }
}
