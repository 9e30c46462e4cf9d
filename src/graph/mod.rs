//! The small static graph runtime.
//!
//! A DFPO step is static: the same ops in the same order with the same shapes every iteration.
//! So the runtime is three plain pieces, with no broadcasting and no autograd over arbitrary
//! expressions:
//! 1. [`GraphBuilder`] records tensors (inputs, parameters, activations) and nodes (an [`Op`]
//!    with its input and output tensors);
//! 2. [`GraphBuilder::plan`] derives the backward schedule from each op's own backward rule,
//!    computes every activation's and gradient's live interval over the forward + backward
//!    schedule, and packs them into ONE arena by first-fit on those intervals ([`Plan`]);
//! 3. [`Session`] owns the storage on a [`Device`] (inputs and parameters in their own buffer,
//!    the arena in one allocation) and runs forward, seeds the loss gradient, and runs the
//!    backward nodes in reverse order.
//!
//! Gradient convention: every backward ACCUMULATES (+=) into its input gradients, so a tensor
//! read by several nodes gets the sum; the executor zero-fills each gradient when it becomes live.
//!
//! Activation recomputation: nodes recorded between [`GraphBuilder::begin_recompute`] and
//! [`GraphBuilder::end_recompute`] form a segment (e.g. one decoder layer). Its internal
//! tensors (outputs read only inside the segment) live in the forward only until their last
//! reader there; just before the segment's backward the executor runs the segment's forward
//! again into fresh copies of them, which the backward steps read. The segment's inputs and its
//! outputs read elsewhere are kept as usual. Memory: one segment's activations instead of all;
//! cost: one more forward of every segment.

mod exec;
pub mod ops;

pub use exec::{Element, Exec, Session};

use crate::device::Device;
use crate::error::{Error, Result};

/// Index of a tensor in its graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub usize);

/// What a tensor is for; decides where it is stored and how long it lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Data bound by the caller before each run (persistent buffer).
    Input,
    /// Trainable parameters (persistent buffer); their gradient lives to the end of the run.
    Param,
    /// Scratch memory of one backward step (arena).
    Scratch,
    /// Produced by a node (arena).
    Activation,
    /// Gradient of another tensor (arena).
    Grad,
}

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 => 2,
        }
    }
}

/// A flat tensor: the graph only needs lengths and element types; ops know their own shapes.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub len: usize,
    pub dtype: DType,
    pub role: Role,
}

impl Tensor {
    /// Bytes it occupies, rounded up to the storage alignment.
    pub fn bytes(&self) -> usize {
        align_up(self.len * self.dtype.size(), ALIGN)
    }
}

/// One operation with an explicit forward and backward.
pub trait Op {
    /// Short name for errors and schedules.
    fn name(&self) -> String;
    /// Reads `ins`, overwrites `outs`.
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()>;
    /// Whether the backward reads the forward's (inputs, outputs); what it does not read is
    /// not kept alive for it. Default: both.
    fn backward_reads(&self) -> (bool, bool) {
        (true, true)
    }
    /// f32 of scratch memory the backward needs (given its tensors' lengths and whether it runs
    /// on CUDA); the planner gives it an arena region live during that backward only
    /// ([`Exec::scratch`]).
    fn backward_scratch(&self, _ins: &[usize], _outs: &[usize], _cuda: bool) -> usize {
        0
    }
    /// f32 of scratch memory the forward needs, as [`Op::backward_scratch`]: an arena region
    /// live during that forward only (e.g. one chunk of logits of the chunked LM head).
    fn forward_scratch(&self, _ins: &[usize], _outs: &[usize], _cuda: bool) -> usize {
        0
    }
    /// Reads `ins`, `outs` and `d_outs`; ACCUMULATES into each `d_ins[i]` that is `Some`
    /// (gradients nobody needs are `None`).
    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()>;
}

pub(crate) struct Node {
    pub op: Box<dyn Op>,
    pub ins: Vec<TensorId>,
    pub outs: Vec<TensorId>,
    /// Backward scratch ([`Op::backward_scratch`]).
    pub scratch: Option<TensorId>,
    /// Forward scratch ([`Op::forward_scratch`]).
    pub fwd_scratch: Option<TensorId>,
    /// The tensors the recompute and backward steps use in place of `ins` / `outs` /
    /// `fwd_scratch`: the same, except a recomputed segment's internal tensors, replaced by
    /// their copies.
    pub re_ins: Vec<TensorId>,
    pub re_outs: Vec<TensorId>,
    pub re_fwd_scratch: Option<TensorId>,
}

/// Records tensors and nodes.
#[derive(Default)]
pub struct GraphBuilder {
    tensors: Vec<Tensor>,
    nodes: Vec<Node>,
    producer: Vec<Option<usize>>,
    keep: Vec<TensorId>,
    /// Recomputed segments: node ranges.
    segments: Vec<std::ops::Range<usize>>,
    open_segment: Option<usize>,
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, name: &str, len: usize, dtype: DType, role: Role) -> TensorId {
        self.tensors.push(Tensor {
            name: name.to_string(),
            len,
            dtype,
            role,
        });
        self.producer.push(None);
        TensorId(self.tensors.len() - 1)
    }

    /// A caller-bound f32 input of `len` elements.
    pub fn input(&mut self, name: &str, len: usize) -> TensorId {
        self.add(name, len, DType::F32, Role::Input)
    }

    /// A caller-bound input of `len` elements of `dtype`.
    pub fn input_typed(&mut self, name: &str, len: usize, dtype: DType) -> TensorId {
        self.add(name, len, dtype, Role::Input)
    }

    /// A trainable f32 parameter of `len` elements.
    pub fn param(&mut self, name: &str, len: usize) -> TensorId {
        self.add(name, len, DType::F32, Role::Param)
    }

    /// A trainable parameter stored as `dtype` (e.g. the bf16 copy of fp32 masters kept by
    /// the optimizer); its gradient is always f32.
    pub fn param_typed(&mut self, name: &str, len: usize, dtype: DType) -> TensorId {
        self.add(name, len, dtype, Role::Param)
    }

    /// Adds `op` reading `ins` and producing new f32 activations of the given (name, len).
    pub fn node(
        &mut self,
        op: impl Op + 'static,
        ins: &[TensorId],
        outs: &[(&str, usize)],
    ) -> Result<Vec<TensorId>> {
        let outs: Vec<(&str, usize, DType)> =
            outs.iter().map(|&(n, l)| (n, l, DType::F32)).collect();
        self.node_typed(op, ins, &outs)
    }

    /// Adds `op` reading `ins` and producing new activations of the given (name, len, dtype).
    pub fn node_typed(
        &mut self,
        op: impl Op + 'static,
        ins: &[TensorId],
        outs: &[(&str, usize, DType)],
    ) -> Result<Vec<TensorId>> {
        for &i in ins {
            if i.0 >= self.tensors.len() {
                return Err(Error::Invalid(format!(
                    "{}: unknown input tensor {i:?}",
                    op.name()
                )));
            }
        }
        let out_ids: Vec<TensorId> = outs
            .iter()
            .map(|&(n, len, dt)| self.add(n, len, dt, Role::Activation))
            .collect();
        for o in &out_ids {
            self.producer[o.0] = Some(self.nodes.len());
        }
        self.nodes.push(Node {
            op: Box::new(op),
            ins: ins.to_vec(),
            outs: out_ids.clone(),
            scratch: None,
            fwd_scratch: None,
            re_ins: ins.to_vec(),
            re_outs: out_ids.clone(),
            re_fwd_scratch: None,
        });
        Ok(out_ids)
    }

    /// Keeps `t` alive (and readable) until the end of the run.
    pub fn keep(&mut self, t: TensorId) {
        self.keep.push(t);
    }

    /// Starts a recomputed segment: the nodes added until [`GraphBuilder::end_recompute`] run
    /// their forward again before their backward, and their internal activations are not kept
    /// between the two (module doc). Segments do not nest.
    pub fn begin_recompute(&mut self) -> Result<()> {
        if self.open_segment.is_some() {
            return Err(Error::Invalid(
                "begin_recompute: a recomputed segment is already open".into(),
            ));
        }
        self.open_segment = Some(self.nodes.len());
        Ok(())
    }

    /// Ends the segment [`GraphBuilder::begin_recompute`] started.
    pub fn end_recompute(&mut self) -> Result<()> {
        let start = self
            .open_segment
            .take()
            .ok_or_else(|| Error::Invalid("end_recompute: no recomputed segment is open".into()))?;
        if start < self.nodes.len() {
            self.segments.push(start..self.nodes.len());
        }
        Ok(())
    }

    /// Plans forward + backward of the scalar `loss` (an activation of length 1) for `device`
    /// (scratch sizes may differ between the CPU and CUDA paths of an op).
    pub fn plan(self, loss: TensorId, device: &Device) -> Result<Plan> {
        self.plan_for(loss, device.is_cuda())
    }

    /// [`GraphBuilder::plan`] for the CPU (`cuda = false`) or a CUDA device, without one: the
    /// plan is layout only (sizes, offsets, schedule), so the memory of a shape no machine here
    /// could hold can be planned and measured ([`Plan::arena_bytes`]). A session for it needs a
    /// device of the same kind.
    pub fn plan_for(mut self, loss: TensorId, cuda: bool) -> Result<Plan> {
        let nt = self.tensors.len();
        let bad = loss.0 >= nt
            || self.tensors[loss.0].len != 1
            || self.tensors[loss.0].dtype != DType::F32
            || self.producer[loss.0].is_none();
        if bad {
            return Err(Error::Invalid(
                "plan: the loss must be an f32 node output of length 1".into(),
            ));
        }
        // Which tensors need a gradient: parameters, and anything computed from one.
        let mut needs_grad: Vec<bool> =
            self.tensors.iter().map(|t| t.role == Role::Param).collect();
        for n in &self.nodes {
            if n.ins.iter().any(|i| needs_grad[i.0]) {
                for o in &n.outs {
                    needs_grad[o.0] = true;
                }
            }
        }
        if !needs_grad[loss.0] {
            return Err(Error::Invalid(
                "plan: the loss does not depend on any parameter".into(),
            ));
        }
        let mut grad_of = vec![None; nt];
        for (i, ng) in needs_grad.iter().enumerate() {
            if *ng {
                let t = &self.tensors[i];
                // Parameter gradients are f32 whatever the parameter's storage type.
                let dt = if t.role == Role::Param {
                    DType::F32
                } else {
                    t.dtype
                };
                let (name, len) = (format!("d({})", t.name), t.len);
                let g = self.add(&name, len, dt, Role::Grad);
                grad_of[i] = Some(g);
            }
        }

        if self.open_segment.is_some() {
            return Err(Error::Invalid(
                "plan: a recomputed segment was begun and not ended".into(),
            ));
        }
        // Schedule: forward nodes in order, then the backward of every node that has a
        // gradient to give, in reverse order; a recomputed segment's forward runs again just
        // before the first of its backward steps.
        let nf = self.nodes.len();
        let has_bwd =
            |n: &Node, grad_of: &[Option<TensorId>]| n.ins.iter().any(|t| grad_of[t.0].is_some());
        let mut steps: Vec<Step> = (0..nf).map(Step::Forward).collect();
        let segments = std::mem::take(&mut self.segments);
        let seg_of = |i: usize| segments.iter().find(|r| r.contains(&i));
        let mut recomputed = vec![false; segments.len()];
        for i in (0..nf).rev() {
            if !has_bwd(&self.nodes[i], &grad_of) {
                continue;
            }
            if let Some(r) = seg_of(i) {
                let k = segments.iter().position(|x| x == r).expect("found above");
                if !recomputed[k] {
                    recomputed[k] = true;
                    steps.extend(r.clone().map(Step::Recompute));
                }
            }
            steps.push(Step::Backward(i));
        }
        // A recomputed segment's internal tensors (outputs read only by its own nodes, not kept,
        // not the loss) get copies that the recompute and backward steps use.
        let mut readers: Vec<Vec<usize>> = vec![Vec::new(); self.tensors.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for t in &n.ins {
                readers[t.0].push(i);
            }
        }
        for (k, r) in segments.iter().enumerate() {
            if !recomputed[k] {
                continue;
            }
            let mut copy: std::collections::HashMap<TensorId, TensorId> = Default::default();
            for i in r.clone() {
                for o in self.nodes[i].outs.clone() {
                    let internal = o != loss
                        && !self.keep.contains(&o)
                        && readers[o.0].iter().all(|j| r.contains(j));
                    if internal {
                        let t = self.tensors[o.0].clone();
                        let c = self.add(&format!("{}'", t.name), t.len, t.dtype, t.role);
                        copy.insert(o, c);
                    }
                }
            }
            for i in r.clone() {
                let n = &mut self.nodes[i];
                let map = |ts: &[TensorId]| ts.iter().map(|t| *copy.get(t).unwrap_or(t)).collect();
                n.re_ins = map(&n.ins);
                n.re_outs = map(&n.outs);
            }
        }
        // Scratch regions of the forward, recompute and backward steps.
        for st in &steps {
            let (i, fwd) = match *st {
                Step::Forward(i) | Step::Recompute(i) => (i, true),
                Step::Backward(i) => (i, false),
            };
            let n = &self.nodes[i];
            let lens =
                |ts: &[TensorId]| ts.iter().map(|t| self.tensors[t.0].len).collect::<Vec<_>>();
            let (ins, outs) = (lens(&n.ins), lens(&n.outs));
            let need = if fwd {
                n.op.forward_scratch(&ins, &outs, cuda)
            } else {
                n.op.backward_scratch(&ins, &outs, cuda)
            };
            if need > 0 {
                let what = if fwd { "fwd_scratch" } else { "scratch" };
                let name = format!("{what}({})", n.op.name());
                let t = self.add(&name, need, DType::F32, Role::Scratch);
                match *st {
                    Step::Forward(_) => self.nodes[i].fwd_scratch = Some(t),
                    Step::Recompute(_) => self.nodes[i].re_fwd_scratch = Some(t),
                    Step::Backward(_) => self.nodes[i].scratch = Some(t),
                }
            }
        }
        let last = steps.len();
        // Live intervals [first, last] in schedule positions, for arena tensors only.
        let total = self.tensors.len();
        let mut first = vec![usize::MAX; total];
        let mut lastu = vec![0usize; total];
        let touch = |t: TensorId, s: usize, first: &mut Vec<usize>, lastu: &mut Vec<usize>| {
            first[t.0] = first[t.0].min(s);
            lastu[t.0] = lastu[t.0].max(s);
        };
        for (s, step) in steps.iter().enumerate() {
            match *step {
                Step::Forward(i) => {
                    let n = &self.nodes[i];
                    for &t in n.ins.iter().chain(&n.outs).chain(&n.fwd_scratch) {
                        touch(t, s, &mut first, &mut lastu);
                    }
                }
                Step::Recompute(i) => {
                    let n = &self.nodes[i];
                    for &t in n.re_ins.iter().chain(&n.re_outs).chain(&n.re_fwd_scratch) {
                        touch(t, s, &mut first, &mut lastu);
                    }
                }
                Step::Backward(i) => {
                    let n = &self.nodes[i];
                    if let Some(t) = n.scratch {
                        touch(t, s, &mut first, &mut lastu);
                    }
                    let (reads_ins, reads_outs) = n.op.backward_reads();
                    // Values through the recompute copies; gradients by the original tensors.
                    for ((&t, &rt), reads) in n
                        .ins
                        .iter()
                        .zip(&n.re_ins)
                        .map(|p| (p, reads_ins))
                        .chain(n.outs.iter().zip(&n.re_outs).map(|p| (p, reads_outs)))
                    {
                        if reads {
                            touch(rt, s, &mut first, &mut lastu);
                        }
                        if let Some(g) = grad_of[t.0] {
                            touch(g, s, &mut first, &mut lastu);
                        }
                    }
                }
            }
        }
        // The loss gradient is seeded just before the first backward step.
        let lg = grad_of[loss.0].unwrap();
        first[lg.0] = first[lg.0].min(nf);
        // Parameter gradients and kept tensors live to the end.
        for (i, t) in self.tensors.iter().enumerate() {
            if t.role == Role::Param {
                if let Some(g) = grad_of[i] {
                    lastu[g.0] = last;
                }
            }
        }
        // Kept tensors and the loss (returned by `run`) live to the end.
        for &k in self.keep.iter().chain([&loss]) {
            lastu[k.0] = last;
        }

        // First-fit packing, largest tensors first.
        let mut order: Vec<usize> = (0..total)
            .filter(|&i| {
                matches!(
                    self.tensors[i].role,
                    Role::Activation | Role::Grad | Role::Scratch
                )
            })
            .filter(|&i| first[i] != usize::MAX)
            .collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(self.tensors[i].bytes()), i));
        let mut offset = vec![usize::MAX; total];
        let mut placed: Vec<usize> = Vec::new();
        let mut arena_len = 0usize;
        for &i in &order {
            let len = self.tensors[i].bytes();
            // Busy ranges of tensors whose live interval overlaps this one's.
            let mut busy: Vec<(usize, usize)> = placed
                .iter()
                .filter(|&&j| first[j] <= lastu[i] && first[i] <= lastu[j])
                .map(|&j| (offset[j], offset[j] + self.tensors[j].bytes()))
                .collect();
            busy.sort();
            // Byte offsets stay ALIGN-aligned (vector loads, cp.async).
            let mut at = 0usize;
            for (s, e) in busy {
                if at + len <= s {
                    break;
                }
                at = at.max(align_up(e, ALIGN));
            }
            offset[i] = at;
            arena_len = arena_len.max(at + len);
            placed.push(i);
        }
        let tensor_sum: usize = order.iter().map(|&i| self.tensors[i].bytes()).sum();

        // Persistent storage for inputs and parameters.
        let mut pers_offset = vec![usize::MAX; total];
        let mut pers_len = 0;
        for (i, t) in self.tensors.iter().enumerate() {
            if matches!(t.role, Role::Input | Role::Param) {
                pers_offset[i] = pers_len;
                pers_len += t.bytes();
            }
        }

        // Zero-fill each gradient at the first step it is live.
        let mut zero_at: Vec<Vec<TensorId>> = vec![Vec::new(); steps.len()];
        for g in grad_of.iter().flatten() {
            if first[g.0] != usize::MAX && *g != lg {
                zero_at[first[g.0]].push(*g);
            }
        }
        Ok(Plan {
            tensors: self.tensors,
            nodes: self.nodes,
            grad_of,
            steps,
            offset,
            pers_offset,
            arena_len,
            pers_len,
            tensor_sum,
            zero_at,
            loss,
            live: first.into_iter().zip(lastu).collect(),
            cuda,
        })
    }
}

/// Byte alignment of every tensor in the arena and the persistent buffer.
const ALIGN: usize = 256;

fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Forward(usize),
    /// A recomputed segment's node run forward again (on its `re_*` tensors).
    Recompute(usize),
    Backward(usize),
}

/// A planned graph: the schedule, the arena layout and the persistent layout.
pub struct Plan {
    pub(crate) tensors: Vec<Tensor>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) grad_of: Vec<Option<TensorId>>,
    pub(crate) steps: Vec<Step>,
    pub(crate) offset: Vec<usize>,
    pub(crate) pers_offset: Vec<usize>,
    pub(crate) arena_len: usize,
    pub(crate) pers_len: usize,
    tensor_sum: usize,
    pub(crate) zero_at: Vec<Vec<TensorId>>,
    pub(crate) loss: TensorId,
    live: Vec<(usize, usize)>,
    pub(crate) cuda: bool,
}

impl Plan {
    /// Bytes of the one arena holding every activation and gradient.
    pub fn arena_bytes(&self) -> usize {
        self.arena_len
    }

    /// Bytes all activations and gradients would take with one buffer each.
    pub fn tensor_bytes(&self) -> usize {
        self.tensor_sum
    }

    /// Bytes of the persistent inputs + parameters buffer.
    pub fn persistent_bytes(&self) -> usize {
        self.pers_len
    }

    /// The gradient tensor of `t`, if `t` needs one.
    pub fn grad(&self, t: TensorId) -> Option<TensorId> {
        self.grad_of.get(t.0).copied().flatten()
    }

    /// Tensor metadata.
    pub fn tensor(&self, t: TensorId) -> &Tensor {
        &self.tensors[t.0]
    }

    /// Number of schedule steps (forward + backward nodes).
    pub fn num_steps(&self) -> usize {
        self.steps.len()
    }

    /// The schedule as text, one step per line: what runs, and which arena tensors are live.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (i, st) in self.steps.iter().enumerate() {
            let (dir, n) = match *st {
                Step::Forward(n) => ("fwd", n),
                Step::Recompute(n) => ("re ", n),
                Step::Backward(n) => ("bwd", n),
            };
            s += &format!("{i:>3} {dir} {}\n", self.nodes[n].op.name());
        }
        s += &format!(
            "arena {} B for {} B of activations and gradients ({:.0}%)\n",
            self.arena_bytes(),
            self.tensor_bytes(),
            100.0 * self.arena_bytes() as f64 / self.tensor_bytes().max(1) as f64
        );
        s
    }

    /// Checks the packing invariant: no two arena tensors with overlapping live intervals
    /// overlap in memory. (The planner guarantees it; tests call this.)
    pub fn verify_packing(&self) -> Result<()> {
        let arena: Vec<usize> = (0..self.tensors.len())
            .filter(|&i| self.offset[i] != usize::MAX)
            .collect();
        for (a, &i) in arena.iter().enumerate() {
            if self.offset[i] + self.tensors[i].bytes() > self.arena_len
                || !self.offset[i].is_multiple_of(ALIGN)
            {
                return Err(Error::Invalid(format!(
                    "tensor {} out of arena",
                    self.tensors[i].name
                )));
            }
            for &j in &arena[a + 1..] {
                let time = self.live[i].0 <= self.live[j].1 && self.live[j].0 <= self.live[i].1;
                let (si, ei) = (self.offset[i], self.offset[i] + self.tensors[i].bytes());
                let (sj, ej) = (self.offset[j], self.offset[j] + self.tensors[j].bytes());
                if time && si < ej && sj < ei {
                    return Err(Error::Invalid(format!(
                        "{} and {} are live together and overlap",
                        self.tensors[i].name, self.tensors[j].name
                    )));
                }
            }
        }
        Ok(())
    }
}
