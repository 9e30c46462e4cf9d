//! AdamW over named fp32 master weights, with a warmup + cosine/constant learning-rate schedule
//! and global gradient-norm clipping (the CPU reference of `kernels/adamw.cu`, bit for bit).
//!
//! The optimizer owns the master weights; after [`AdamW::step`] the caller writes them back into
//! its graph (bf16 on CUDA, f32 on the CPU). A step whose gradient norm is not finite changes
//! nothing and says so ([`StepOutcome::applied`] = false), so the caller can skip or stop.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr};

use crate::device::{CudaDevice, Device};
use crate::error::{check_len, Error, Result};
use crate::graph::DType;
use crate::kernels::adamw::{self, AdamWParams};
use crate::model::decoder::DecoderGraph;

/// Learning rate over optimizer steps: linear warmup from 0 to `peak` over `warmup` steps, then
/// constant or cosine down to `peak · min_ratio` at `total`.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    pub cosine: bool,
    pub min_ratio: f64,
}

impl Schedule {
    /// The rate of (1-based) optimizer step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if self.warmup > 0 && step <= self.warmup {
            return self.peak * step as f64 / self.warmup as f64;
        }
        if !self.cosine || self.total <= self.warmup {
            return self.peak;
        }
        let span = (self.total - self.warmup) as f64;
        let done = ((step - self.warmup) as f64 / span).clamp(0.0, 1.0);
        let floor = self.peak * self.min_ratio;
        floor + (self.peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * done).cos())
    }
}

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// Global gradient norm before clipping (NaN/inf when a gradient is not finite).
    pub grad_norm: f64,
    /// The learning rate used.
    pub lr: f64,
    /// False when the norm was not finite and nothing changed.
    pub applied: bool,
}

/// AdamW over a fixed list of named tensors.
#[derive(Clone, Debug)]
pub struct AdamW {
    names: Vec<String>,
    params: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Per tensor, the element ranges that never decay (norm gains and biases packed inside a
    /// flat tensor, such as the flow head's); empty: the tensor's name decides.
    no_decay: Vec<Vec<Range<usize>>>,
    /// Optimizer steps applied so far.
    pub step: u64,
    pub hp: AdamWParams,
    /// Clip the global norm to this (+inf: off).
    pub max_grad_norm: f32,
    pub schedule: Schedule,
}

/// Whether a tensor decays: matrices do, norm weights and biases (1-D) do not.
fn decays(name: &str) -> bool {
    !(name.contains("norm") || name.ends_with("bias") || name.ends_with(".b"))
}

impl AdamW {
    /// Starts from these weights (m = v = 0, step 0).
    pub fn new(
        named: Vec<(String, Vec<f32>)>,
        hp: AdamWParams,
        max_grad_norm: f32,
        schedule: Schedule,
    ) -> Result<Self> {
        hp.validate()?;
        if max_grad_norm.is_nan() || max_grad_norm <= 0.0 {
            return Err(Error::Invalid(format!(
                "optimizer max_grad_norm = {max_grad_norm}: must be > 0 (inf: off)"
            )));
        }
        let (names, params): (Vec<_>, Vec<_>) = named.into_iter().unzip();
        let m = params
            .iter()
            .map(|p: &Vec<f32>| vec![0.0; p.len()])
            .collect();
        let v = params
            .iter()
            .map(|p: &Vec<f32>| vec![0.0; p.len()])
            .collect();
        let no_decay = vec![Vec::new(); names.len()];
        Ok(AdamW {
            names,
            params,
            m,
            v,
            no_decay,
            step: 0,
            hp,
            max_grad_norm,
            schedule,
        })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Marks element ranges of tensor `name` as never weight-decayed (the rest decays).
    pub fn set_no_decay(&mut self, name: &str, ranges: Vec<Range<usize>>) -> Result<()> {
        let i = self
            .names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| Error::Invalid(format!("optimizer: no tensor {name}")))?;
        let len = self.params[i].len();
        if let Some(r) = ranges.iter().find(|r| r.start > r.end || r.end > len) {
            return Err(Error::Invalid(format!(
                "optimizer: no-decay range {r:?} of {name} outside 0..{len}"
            )));
        }
        self.no_decay[i] = ranges;
        Ok(())
    }

    /// Master weights, in [`AdamW::names`] order.
    pub fn params(&self) -> &[Vec<f32>] {
        &self.params
    }

    pub fn param(&self, name: &str) -> Option<&[f32]> {
        let i = self.names.iter().position(|n| n == name)?;
        Some(&self.params[i])
    }

    /// One step with `grads` in [`AdamW::names`] order. Non-finite norm: nothing changes.
    pub fn step(&mut self, grads: &[Vec<f32>]) -> Result<StepOutcome> {
        check_len("optimizer grads", grads.len(), self.params.len())?;
        for (i, g) in grads.iter().enumerate() {
            check_len(
                &format!("gradient of {}", self.names[i]),
                g.len(),
                self.params[i].len(),
            )?;
        }
        let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        let norm = adamw::cpu::grad_norm(&refs);
        let lr = self.schedule.lr(self.step + 1);
        let scale = adamw::clip_scale(norm, self.max_grad_norm);
        if !scale.is_finite() {
            return Ok(StepOutcome {
                grad_norm: norm,
                lr,
                applied: false,
            });
        }
        self.step += 1;
        #[allow(clippy::needless_range_loop)] // params, grads, m, v by tensor
        for i in 0..self.params.len() {
            let wd = if decays(&self.names[i]) {
                self.hp.weight_decay
            } else {
                0.0
            };
            // Elementwise update: each run with its own decay (the whole tensor, or the
            // decayed and never-decayed ranges of a flat one).
            let len = self.params[i].len();
            let segs = decay_runs(len, decays(&self.names[i]), &self.no_decay[i]);
            for (r, decayed) in segs {
                let hp = AdamWParams {
                    lr,
                    weight_decay: if decayed { wd } else { 0.0 },
                    ..self.hp
                };
                adamw::cpu::step(
                    &mut self.params[i][r.clone()],
                    &grads[i][r.clone()],
                    &mut self.m[i][r.clone()],
                    &mut self.v[i][r],
                    None,
                    &hp,
                    self.step,
                    scale,
                )?;
            }
        }
        Ok(StepOutcome {
            grad_norm: norm,
            lr,
            applied: true,
        })
    }

    /// The full state as named tensors: `{prefix}param.{name}`, `{prefix}m.{name}`,
    /// `{prefix}v.{name}` (the step count is saved by the caller).
    pub fn state(&self, prefix: &str) -> BTreeMap<String, Vec<f32>> {
        let mut out = BTreeMap::new();
        for (i, n) in self.names.iter().enumerate() {
            out.insert(format!("{prefix}param.{n}"), self.params[i].clone());
            out.insert(format!("{prefix}m.{n}"), self.m[i].clone());
            out.insert(format!("{prefix}v.{n}"), self.v[i].clone());
        }
        out
    }

    /// Restores what [`AdamW::state`] wrote (every tensor must be present with its length).
    pub fn load_state(
        &mut self,
        prefix: &str,
        state: &BTreeMap<String, Vec<f32>>,
        step: u64,
        source: &str,
    ) -> Result<()> {
        for i in 0..self.names.len() {
            let n = &self.names[i];
            for (kind, dst) in [
                ("param", &mut self.params[i]),
                ("m", &mut self.m[i]),
                ("v", &mut self.v[i]),
            ] {
                let key = format!("{prefix}{kind}.{n}");
                let src = state.get(&key).ok_or_else(|| Error::Format {
                    path: source.into(),
                    msg: format!("optimizer state: missing tensor {key}"),
                })?;
                if src.len() != dst.len() {
                    return Err(Error::Format {
                        path: source.into(),
                        msg: format!(
                            "optimizer state: {key} has {} values, expected {}",
                            src.len(),
                            dst.len()
                        ),
                    });
                }
                dst.copy_from_slice(src);
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Splits `0..len` into runs with one weight decay each: `(range, decays)`, the never-decayed
/// `no_decay` ranges (any order, may overlap) off and the rest `decays` (empty runs dropped).
fn decay_runs(len: usize, decays: bool, no_decay: &[Range<usize>]) -> Vec<(Range<usize>, bool)> {
    let mut segs = Vec::new();
    let mut at = 0;
    let mut nd = no_decay.to_vec();
    nd.sort_by_key(|r| r.start);
    for r in nd {
        if r.start > at {
            segs.push((at..r.start, decays));
        }
        segs.push((r.start.max(at)..r.end.max(at), false));
        at = at.max(r.end);
    }
    segs.push((at..len, decays));
    segs.retain(|(r, _)| !r.is_empty());
    segs
}

/// The optimizer a model holds: the host [`AdamW`] (the CPU device, and the reference), or
/// [`DeviceAdamW`] on a CUDA device (fp32 master weights and moments on the GPU, one fused
/// multi-tensor launch per step, the norm and the non-finite check on the device). Both save
/// and restore the same named state, so checkpoints move freely between them.
// The host variant is the large one; one optimizer per model, so the size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Optimizer {
    Host(AdamW),
    Device(DeviceAdamW),
}

impl Optimizer {
    /// The host AdamW on the CPU, the device one on CUDA, starting from `named`.
    pub fn new(
        named: Vec<(String, Vec<f32>)>,
        hp: AdamWParams,
        max_grad_norm: f32,
        schedule: Schedule,
        device: &Device,
    ) -> Result<Self> {
        let host = AdamW::new(named, hp, max_grad_norm, schedule)?;
        match device {
            Device::Cpu => Ok(Optimizer::Host(host)),
            Device::Cuda(dev) => Ok(Optimizer::Device(DeviceAdamW::from_host(dev, &host)?)),
        }
    }

    /// Parameter names, in optimizer order.
    pub fn names(&self) -> &[String] {
        match self {
            Optimizer::Host(o) => o.names(),
            Optimizer::Device(o) => &o.names,
        }
    }

    /// Optimizer steps applied so far.
    pub fn steps(&self) -> u64 {
        match self {
            Optimizer::Host(o) => o.step,
            Optimizer::Device(o) => o.step,
        }
    }

    /// Elements of every parameter together.
    pub fn total_len(&self) -> usize {
        match self {
            Optimizer::Host(o) => o.params().iter().map(Vec::len).sum(),
            Optimizer::Device(o) => o.lens.iter().sum(),
        }
    }

    /// See [`AdamW::set_no_decay`].
    pub fn set_no_decay(&mut self, name: &str, ranges: Vec<Range<usize>>) -> Result<()> {
        match self {
            Optimizer::Host(o) => o.set_no_decay(name, ranges),
            Optimizer::Device(o) => o.set_no_decay(name, ranges),
        }
    }

    /// The master weights on the host, in [`Optimizer::names`] order (a download on CUDA).
    pub fn params_host(&self) -> Result<Vec<Vec<f32>>> {
        match self {
            Optimizer::Host(o) => Ok(o.params().to_vec()),
            Optimizer::Device(o) => o.download(Buf::Master),
        }
    }

    /// The master weights of `name` on the host (a download of that tensor on CUDA).
    pub fn param_host(&self, name: &str) -> Result<Vec<f32>> {
        match self {
            Optimizer::Host(o) => o
                .param(name)
                .map(<[f32]>::to_vec)
                .ok_or_else(|| Error::Invalid(format!("optimizer: no tensor {name}"))),
            Optimizer::Device(o) => o.download_one(name),
        }
    }

    /// One step from the parameter gradients of `graph`'s last run; on success (applied) the
    /// graph's parameters hold the new weights (on CUDA: written by the update kernel, the
    /// gradients never leave the device and one 8-byte norm is read back).
    pub fn step_graph(&mut self, graph: &mut DecoderGraph) -> Result<StepOutcome> {
        match self {
            Optimizer::Host(o) => {
                let grads: Vec<Vec<f32>> = o
                    .names()
                    .iter()
                    .map(|n| graph.grad(n))
                    .collect::<Result<_>>()?;
                let out = o.step(&grads)?;
                if out.applied {
                    write_host_params(graph, o)?;
                }
                Ok(out)
            }
            Optimizer::Device(o) => o.step_graph(graph),
        }
    }

    /// One step with explicit host gradients (tests, tools): the host optimizer only.
    pub fn step_host(&mut self, grads: &[Vec<f32>]) -> Result<StepOutcome> {
        match self {
            Optimizer::Host(o) => o.step(grads),
            Optimizer::Device(_) => Err(Error::Invalid(
                "step_host: the device optimizer steps from a graph's gradients".into(),
            )),
        }
    }

    /// Writes the master weights into `graph`'s parameters (after a restore or at start).
    pub fn write_graph(&mut self, graph: &mut DecoderGraph) -> Result<()> {
        match self {
            Optimizer::Host(o) => write_host_params(graph, o),
            Optimizer::Device(o) => o.write_graph(graph),
        }
    }

    /// See [`AdamW::state`] (a download on CUDA).
    pub fn state(&self, prefix: &str) -> Result<BTreeMap<String, Vec<f32>>> {
        match self {
            Optimizer::Host(o) => Ok(o.state(prefix)),
            Optimizer::Device(o) => o.state(prefix),
        }
    }

    /// See [`AdamW::load_state`] (an upload on CUDA; call [`Optimizer::write_graph`] after).
    pub fn load_state(
        &mut self,
        prefix: &str,
        state: &BTreeMap<String, Vec<f32>>,
        step: u64,
        source: &str,
    ) -> Result<()> {
        match self {
            Optimizer::Host(o) => o.load_state(prefix, state, step, source),
            Optimizer::Device(o) => o.load_state(prefix, state, step, source),
        }
    }
}

fn write_host_params(graph: &mut DecoderGraph, o: &AdamW) -> Result<()> {
    for (n, p) in o.names().iter().zip(o.params()) {
        graph.set_param(n, p)?;
    }
    Ok(())
}

/// Which of the device optimizer's buffers.
#[derive(Clone, Copy, Debug)]
enum Buf {
    Master,
    M,
    V,
}

/// The tables of one graph session the device optimizer is bound to.
struct Bound {
    /// The session's parameter addresses (first parameter's and first gradient's), to notice a
    /// different session.
    key: (u64, u64),
    norm_table: CudaSlice<u64>,
    segs: CudaSlice<u64>,
    chunks: CudaSlice<i64>,
    nchunks: usize,
}

/// AdamW on a CUDA device: fp32 master weights and both moments in three device buffers
/// (each tensor at a 16-byte aligned offset), the global gradient norm over the graph's
/// gradient buffers and the clip scale on the device (deterministic two-pass reduction), and
/// one `adamw_multi` launch over every tensor that also writes the graph's compute copies (bf16
/// for the bf16 backbone, f32 for the flow head). A non-finite norm makes the scale NaN and the
/// kernel change nothing; the one value read back per step is the norm (8 bytes).
/// The same arithmetic as [`AdamW`] (bit for bit while the clip scale is 1; the norm's
/// summation order differs, so a clipped step may differ by an ulp of the scale).
pub struct DeviceAdamW {
    dev: Arc<CudaDevice>,
    names: Vec<String>,
    lens: Vec<usize>,
    /// Element offset of each tensor in the buffers (multiples of 4).
    offs: Vec<usize>,
    decays: Vec<bool>,
    no_decay: Vec<Vec<Range<usize>>>,
    master: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    /// `[norm, scale]` of the last step.
    clip: CudaSlice<f32>,
    /// The norm's partial sums, then the norm in f64.
    ws: CudaSlice<f64>,
    bound: Option<Bound>,
    /// Optimizer steps applied so far.
    pub step: u64,
    pub hp: AdamWParams,
    pub max_grad_norm: f32,
    pub schedule: Schedule,
}

impl DeviceAdamW {
    /// The device copy of a host optimizer's full state (weights, moments, step, no-decay).
    pub fn from_host(dev: &Arc<CudaDevice>, host: &AdamW) -> Result<Self> {
        let names = host.names.clone();
        let lens: Vec<usize> = host.params.iter().map(Vec::len).collect();
        let mut offs = Vec::with_capacity(lens.len());
        let mut total = 0;
        for &l in &lens {
            offs.push(total);
            total += l.next_multiple_of(4);
        }
        let total_len: usize = lens.iter().sum();
        let s = dev.stream();
        let alloc = || s.alloc_zeros::<f32>(total.max(4));
        let mut o = DeviceAdamW {
            dev: dev.clone(),
            decays: names.iter().map(|n| decays(n)).collect(),
            no_decay: host.no_decay.clone(),
            names,
            lens,
            offs,
            master: alloc()?,
            m: alloc()?,
            v: alloc()?,
            clip: s.alloc_zeros::<f32>(2)?,
            ws: s.alloc_zeros::<f64>(adamw::cuda::grad_norm_workspace_len(total_len))?,
            bound: None,
            step: host.step,
            hp: host.hp,
            max_grad_norm: host.max_grad_norm,
            schedule: host.schedule.clone(),
        };
        o.upload(Buf::Master, &host.params)?;
        o.upload(Buf::M, &host.m)?;
        o.upload(Buf::V, &host.v)?;
        Ok(o)
    }

    fn buf(&self, b: Buf) -> &CudaSlice<f32> {
        match b {
            Buf::Master => &self.master,
            Buf::M => &self.m,
            Buf::V => &self.v,
        }
    }

    fn upload(&mut self, b: Buf, data: &[Vec<f32>]) -> Result<()> {
        let mut flat = vec![0.0f32; self.master.len()];
        for (i, d) in data.iter().enumerate() {
            check_len(&self.names[i], d.len(), self.lens[i])?;
            flat[self.offs[i]..self.offs[i] + d.len()].copy_from_slice(d);
        }
        self.dev.count_h2d(std::mem::size_of_val(flat.as_slice()));
        let s = self.dev.stream().clone();
        let dst = match b {
            Buf::Master => &mut self.master,
            Buf::M => &mut self.m,
            Buf::V => &mut self.v,
        };
        s.memcpy_htod(&flat, dst)?;
        Ok(())
    }

    fn download(&self, b: Buf) -> Result<Vec<Vec<f32>>> {
        let flat = self.dev.dtoh(self.buf(b))?;
        Ok(self
            .offs
            .iter()
            .zip(&self.lens)
            .map(|(&o, &l)| flat[o..o + l].to_vec())
            .collect())
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| Error::Invalid(format!("optimizer: no tensor {name}")))
    }

    fn download_one(&self, name: &str) -> Result<Vec<f32>> {
        let i = self.index(name)?;
        let (o, l) = (self.offs[i], self.lens[i]);
        if l == 0 {
            return Ok(Vec::new());
        }
        self.dev.dtoh(&self.master.slice(o..o + l))
    }

    /// See [`AdamW::set_no_decay`].
    pub fn set_no_decay(&mut self, name: &str, ranges: Vec<Range<usize>>) -> Result<()> {
        let i = self.index(name)?;
        let len = self.lens[i];
        if let Some(r) = ranges.iter().find(|r| r.start > r.end || r.end > len) {
            return Err(Error::Invalid(format!(
                "optimizer: no-decay range {r:?} of {name} outside 0..{len}"
            )));
        }
        self.no_decay[i] = ranges;
        self.bound = None; // the segment table changes
        Ok(())
    }

    /// Builds (once per session) the norm's buffer table and the update's segment tables.
    fn bind(&mut self, graph: &DecoderGraph) -> Result<()> {
        use adamw::cuda::{MultiSeg, OutKind};
        let sess = graph.session();
        let plan = sess.plan();
        let mut grads = Vec::with_capacity(self.names.len());
        let mut outs = Vec::with_capacity(self.names.len());
        for (i, n) in self.names.iter().enumerate() {
            let t = graph.param_id(n)?;
            let info = plan.tensor(t);
            check_len(&format!("graph parameter {n}"), info.len, self.lens[i])?;
            let g = plan
                .grad(t)
                .ok_or_else(|| Error::Invalid(format!("optimizer: {n} has no gradient")))?;
            grads.push(sess.cuda_ptr(g)?);
            let kind = match info.dtype {
                DType::F32 => OutKind::F32,
                DType::BF16 => OutKind::Bf16,
                DType::U32 => {
                    return Err(Error::Invalid(format!(
                        "optimizer: parameter {n} holds u32"
                    )))
                }
            };
            outs.push((sess.cuda_ptr(t)?, kind));
        }
        let key = (
            outs.first().map_or(0, |o| o.0),
            grads.first().copied().unwrap_or(0),
        );
        if self.bound.as_ref().is_some_and(|b| b.key == key) {
            return Ok(());
        }
        let s = self.dev.stream();
        let (mp, _g1) = self.master.device_ptr(s);
        let (m1, _g2) = self.m.device_ptr(s);
        let (v1, _g3) = self.v.device_ptr(s);
        let mut segs = Vec::new();
        for i in 0..self.names.len() {
            for (r, decay) in decay_runs(self.lens[i], self.decays[i], &self.no_decay[i]) {
                let at =
                    |base: u64, off: usize, size: usize| base + ((off + r.start) * size) as u64;
                let (out, kind) = outs[i];
                let size = if kind == OutKind::Bf16 { 2 } else { 4 };
                segs.push(MultiSeg {
                    p: at(mp, self.offs[i], 4),
                    g: at(grads[i], 0, 4),
                    m: at(m1, self.offs[i], 4),
                    v: at(v1, self.offs[i], 4),
                    out: at(out, 0, size),
                    out_kind: kind,
                    n: r.len(),
                    decay,
                });
            }
        }
        let (words, chunks) = adamw::cuda::multi_tables(&segs)?;
        let nbufs: Vec<(u64, usize)> = grads
            .iter()
            .zip(&self.lens)
            .map(|(&g, &l)| (if l == 0 { 8 } else { g }, l))
            .collect();
        let table = adamw::cuda::grad_norm_table(&nbufs);
        self.bound = Some(Bound {
            key,
            norm_table: self.dev.htod(&table)?,
            segs: self.dev.htod(&words)?,
            nchunks: chunks.len() / 2,
            chunks: self.dev.htod(if chunks.is_empty() {
                &[0, 0][..]
            } else {
                &chunks
            })?,
        });
        Ok(())
    }

    /// One step from `graph`'s gradients; see [`Optimizer::step_graph`].
    pub fn step_graph(&mut self, graph: &mut DecoderGraph) -> Result<StepOutcome> {
        self.bind(graph)?;
        let lr = self.schedule.lr(self.step + 1);
        let hp = AdamWParams { lr, ..self.hp };
        let total: usize = self.lens.iter().sum();
        let b = self.bound.as_ref().expect("bound above");
        let s = self.dev.stream();
        {
            let (tp, _g1) = b.norm_table.device_ptr(s);
            let (cp, _g2) = self.clip.device_ptr(s);
            let (wp, _g3) = self.ws.device_ptr(s);
            let (sp, _g4) = b.segs.device_ptr(s);
            let (kp, _g5) = b.chunks.device_ptr(s);
            // SAFETY: the tables describe this optimizer's buffers and the live gradient and
            // parameter tensors of `graph`'s session (rebuilt when the session changes); clip
            // and ws are this optimizer's own.
            unsafe {
                adamw::cuda::grad_norm_raw(
                    &self.dev,
                    tp,
                    self.lens.len(),
                    total,
                    self.max_grad_norm,
                    cp,
                    wp,
                )?;
                adamw::cuda::multi_step_raw(
                    &self.dev,
                    sp,
                    kp,
                    b.nchunks,
                    &hp,
                    self.step + 1,
                    cp + 4,
                    false,
                )?;
            }
        }
        // The one read of the step: the f64 norm (a non-finite one: nothing was changed).
        let g = adamw::cuda::norm_blocks(total);
        let norm = self.dev.dtoh(&self.ws.slice(g..g + 1))?[0];
        let applied = adamw::clip_scale(norm, self.max_grad_norm).is_finite();
        if applied {
            self.step += 1;
        }
        Ok(StepOutcome {
            grad_norm: norm,
            lr,
            applied,
        })
    }

    /// Rewrites `graph`'s parameters from the master weights (on the device).
    pub fn write_graph(&mut self, graph: &mut DecoderGraph) -> Result<()> {
        self.bind(graph)?;
        let b = self.bound.as_ref().expect("bound above");
        let s = self.dev.stream();
        let (sp, _g1) = b.segs.device_ptr(s);
        let (kp, _g2) = b.chunks.device_ptr(s);
        // SAFETY: as in step_graph; copy_only reads the master weights and writes the copies.
        unsafe { adamw::cuda::multi_step_raw(&self.dev, sp, kp, b.nchunks, &self.hp, 1, 0, true) }
    }

    /// See [`AdamW::state`].
    pub fn state(&self, prefix: &str) -> Result<BTreeMap<String, Vec<f32>>> {
        let mut out = BTreeMap::new();
        for (kind, b) in [("param", Buf::Master), ("m", Buf::M), ("v", Buf::V)] {
            for (n, d) in self.names.iter().zip(self.download(b)?) {
                out.insert(format!("{prefix}{kind}.{n}"), d);
            }
        }
        Ok(out)
    }

    /// See [`AdamW::load_state`]; nothing changes when a tensor is missing or misshapen.
    pub fn load_state(
        &mut self,
        prefix: &str,
        state: &BTreeMap<String, Vec<f32>>,
        step: u64,
        source: &str,
    ) -> Result<()> {
        let mut bufs: Vec<Vec<Vec<f32>>> = Vec::new();
        for kind in ["param", "m", "v"] {
            let mut one = Vec::with_capacity(self.names.len());
            for (n, &len) in self.names.iter().zip(&self.lens) {
                let key = format!("{prefix}{kind}.{n}");
                let src = state.get(&key).ok_or_else(|| Error::Format {
                    path: source.into(),
                    msg: format!("optimizer state: missing tensor {key}"),
                })?;
                if src.len() != len {
                    return Err(Error::Format {
                        path: source.into(),
                        msg: format!(
                            "optimizer state: {key} has {} values, expected {len}",
                            src.len()
                        ),
                    });
                }
                one.push(src.clone());
            }
            bufs.push(one);
        }
        self.upload(Buf::Master, &bufs[0])?;
        self.upload(Buf::M, &bufs[1])?;
        self.upload(Buf::V, &bufs[2])?;
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched() -> Schedule {
        Schedule {
            peak: 1.0,
            warmup: 2,
            total: 12,
            cosine: true,
            min_ratio: 0.1,
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = sched();
        assert_eq!(s.lr(1), 0.5);
        assert_eq!(s.lr(2), 1.0);
        assert!((s.lr(7) - 0.55).abs() < 1e-12); // half way: floor + (1 - floor)/2
        assert!((s.lr(12) - 0.1).abs() < 1e-12);
        assert!((s.lr(50) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn nonfinite_gradient_changes_nothing() {
        let hp = AdamWParams::default();
        let mut o = AdamW::new(vec![("w".into(), vec![1.0, 2.0])], hp, 1.0, sched()).unwrap();
        let r = o.step(&[vec![f32::NAN, 0.0]]).unwrap();
        assert!(!r.applied);
        assert_eq!(o.step, 0);
        assert_eq!(o.params()[0], vec![1.0, 2.0]);
        let r = o.step(&[vec![0.5, -0.5]]).unwrap();
        assert!(r.applied);
        assert_eq!(o.step, 1);
        assert!(o.params()[0][0] < 1.0 && o.params()[0][1] > 2.0);
    }

    #[test]
    fn decay_runs_split_a_tensor_by_its_no_decay_ranges() {
        assert_eq!(decay_runs(5, true, &[]), vec![(0..5, true)]);
        assert_eq!(decay_runs(5, false, &[]), vec![(0..5, false)]);
        assert_eq!(decay_runs(0, true, &[]), vec![]);
        // Unsorted, touching and overlapping ranges; the ends of the tensor.
        assert_eq!(
            decay_runs(10, true, &[6..8, 0..2, 1..3, 8..10]),
            vec![
                (0..2, false),
                (2..3, false),
                (3..6, true),
                (6..8, false),
                (8..10, false)
            ]
        );
        // Every element lands in exactly one run.
        let runs = decay_runs(10, true, &[4..4, 2..5]);
        let mut seen = [0; 10];
        for (r, _) in &runs {
            for i in r.clone() {
                seen[i] += 1;
            }
        }
        assert_eq!(seen, [1; 10]);
    }

    #[test]
    fn state_round_trips() {
        let hp = AdamWParams::default();
        let mut a = AdamW::new(vec![("w".into(), vec![1.0, 2.0])], hp, 1.0, sched()).unwrap();
        a.step(&[vec![0.5, -0.5]]).unwrap();
        let st = a.state("x.");
        let mut b = AdamW::new(vec![("w".into(), vec![0.0, 0.0])], hp, 1.0, sched()).unwrap();
        b.load_state("x.", &st, a.step, "test").unwrap();
        a.step(&[vec![0.1, 0.2]]).unwrap();
        b.step(&[vec![0.1, 0.2]]).unwrap();
        assert_eq!(a.params(), b.params());
        let mut missing = st.clone();
        missing.remove("x.m.w");
        assert!(b.load_state("x.", &missing, 1, "test").is_err());
    }
}
