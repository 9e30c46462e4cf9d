//! The LM-head graphs tests/lm_head.rs and tests/cuda_lm_head.rs compare: the chunked
//! `LmHeadXent` and the unfused `Linear` → logits → `TokenLogprob` it replaces, on one device,
//! with a loss Σ_i cl_i·logprob_i + ce_i·entropy_i whose weights are inputs (so every upstream
//! gradient pattern can be set per row), and a copy op in front of the head so the head's input
//! is an activation (bf16 on CUDA, as in the decoder) whose gradient reaches a parameter.
#![allow(dead_code)]

use dfpo::graph::{DType, Exec, GraphBuilder, Op, Session, TensorId};
use dfpo::model::lm_head::LmHeadXent;
use dfpo::model::ops::{Linear, TokenLogprob};
use dfpo::{Device, Result};

/// One problem: `a` `[n][h]`, `w` `[v][h]`, targets, loss weights, temperature.
#[derive(Clone)]
pub struct Case {
    pub n: usize,
    pub h: usize,
    pub v: usize,
    pub temperature: f32,
    pub a: Vec<f32>,
    pub w: Vec<f32>,
    pub targets: Vec<u32>,
    pub cl: Vec<f32>,
    pub ce: Vec<f32>,
}

/// What a run gives back.
#[derive(Clone, Debug)]
pub struct Out {
    pub logprob: Vec<f32>,
    pub lse: Vec<f32>,
    pub entropy: Vec<f32>,
    pub loss: f32,
    pub da: Vec<f32>,
    pub dw: Vec<f32>,
}

#[derive(Clone, Copy, Debug)]
pub enum Head {
    /// `LmHeadXent` with this many rows a chunk.
    Chunked(usize),
    /// `Linear` + `TokenLogprob`.
    Unfused,
}

/// `a = p` (same dtype); the backward adds `d(a)` into the f32 gradient of `p`.
struct Copy;

impl Op for Copy {
    fn name(&self) -> String {
        "test_copy".into()
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        let v = x.to_host(ins[0])?;
        x.from_host(outs[0], &v)
    }
    fn backward_reads(&self) -> (bool, bool) {
        (false, false)
    }
    fn backward(
        &self,
        x: &mut Exec<'_>,
        _ins: &[TensorId],
        _outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        let Some(dp) = d_ins[0] else { return Ok(()) };
        let mut g = x.to_host(dp)?;
        for (o, d) in g.iter_mut().zip(x.to_host(d_outs[0])?) {
            *o += d;
        }
        x.from_host(dp, &g)
    }
}

/// loss = Σ cl·logprob + ce·entropy: ins `[logprob, entropy, cl, ce]`.
struct Weighted;

impl Op for Weighted {
    fn name(&self) -> String {
        "test_weighted".into()
    }
    fn forward(&self, x: &mut Exec<'_>, ins: &[TensorId], outs: &[TensorId]) -> Result<()> {
        let [lp, ent, cl, ce] = [ins[0], ins[1], ins[2], ins[3]].map(|t| x.to_host(t).unwrap());
        let s: f64 = (0..lp.len())
            .map(|i| cl[i] as f64 * lp[i] as f64 + ce[i] as f64 * ent[i] as f64)
            .sum();
        x.from_host(outs[0], &[s as f32])
    }
    fn backward_reads(&self) -> (bool, bool) {
        (true, false)
    }
    fn backward(
        &self,
        x: &mut Exec<'_>,
        ins: &[TensorId],
        _outs: &[TensorId],
        d_outs: &[TensorId],
        d_ins: &[Option<TensorId>],
    ) -> Result<()> {
        let dl = x.to_host(d_outs[0])?[0];
        for (k, c) in [(0usize, ins[2]), (1, ins[3])] {
            if let Some(d) = d_ins[k] {
                let c = x.to_host(c)?;
                let mut g = x.to_host(d)?;
                for (o, c) in g.iter_mut().zip(c) {
                    *o += dl * c;
                }
                x.from_host(d, &g)?;
            }
        }
        Ok(())
    }
}

/// A planned head graph with its tensors.
pub struct Graph {
    pub session: Session,
    bf16: bool,
    a: TensorId,
    w: TensorId,
    targets: TensorId,
    cl: TensorId,
    ce: TensorId,
    outs: Vec<TensorId>,
    loss: TensorId,
}

pub fn build(dev: &Device, n: usize, h: usize, v: usize, temperature: f32, head: Head) -> Graph {
    let bf16 = dev.is_cuda();
    let act = if bf16 { DType::BF16 } else { DType::F32 };
    let mut g = GraphBuilder::new();
    let ap = g.param_typed("a_param", n * h, act);
    let w = g.param_typed("w", v * h, act);
    let targets = g.input_typed("targets", n, DType::U32);
    let cl = g.input("cl", n);
    let ce = g.input("ce", n);
    let a = g.node_typed(Copy, &[ap], &[("a", n * h, act)]).unwrap()[0];
    let outs = [
        ("logprob", n, DType::F32),
        ("lse", n, DType::F32),
        ("entropy", n, DType::F32),
    ];
    let outs = match head {
        Head::Chunked(chunk) => {
            let op = LmHeadXent {
                n,
                h,
                v,
                temperature,
                chunk,
            };
            g.node_typed(op, &[a, w, targets], &outs).unwrap()
        }
        Head::Unfused => {
            let z = g
                .node_typed(Linear { n, din: h, dout: v }, &[a, w], &[("z", n * v, act)])
                .unwrap()[0];
            let op = TokenLogprob { n, v, temperature };
            g.node_typed(op, &[z, targets], &outs).unwrap()
        }
    };
    let loss = g
        .node(Weighted, &[outs[0], outs[2], cl, ce], &[("loss", 1)])
        .unwrap()[0];
    for &t in &outs {
        g.keep(t);
    }
    let plan = g.plan(loss, dev).unwrap();
    plan.verify_packing().unwrap();
    let session = Session::new(plan, dev.clone()).unwrap();
    Graph {
        session,
        bf16,
        a: ap,
        w,
        targets,
        cl,
        ce,
        outs,
        loss,
    }
}

fn write_param(s: &mut Session, bf16: bool, t: TensorId, x: &[f32]) {
    if bf16 {
        let b: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
        s.write(t, &b).unwrap();
    } else {
        s.write(t, x).unwrap();
    }
}

impl Graph {
    /// Binds `c`'s inputs and parameters.
    pub fn set(&mut self, c: &Case) {
        let s = &mut self.session;
        write_param(s, self.bf16, self.a, &c.a);
        write_param(s, self.bf16, self.w, &c.w);
        s.write(self.targets, &c.targets).unwrap();
        s.write(self.cl, &c.cl).unwrap();
        s.write(self.ce, &c.ce).unwrap();
    }

    /// Forward + backward of the bound case.
    pub fn run(&mut self) -> Out {
        let loss = self.session.run().unwrap();
        let s = &self.session;
        let r = |t: TensorId| s.read_f32(t).unwrap();
        let g = |t: TensorId| s.read_f32(s.plan().grad(t).unwrap()).unwrap();
        Out {
            logprob: r(self.outs[0]),
            lse: r(self.outs[1]),
            entropy: r(self.outs[2]),
            loss,
            da: g(self.a),
            dw: g(self.w),
        }
    }

    /// Forward only: the loss of the bound case.
    pub fn loss(&mut self) -> f32 {
        self.session.forward().unwrap();
        self.session.read_f32(self.loss).unwrap()[0]
    }

    /// Sets `a` (`which` = 0) or `w` (1) of the bound case to `x`.
    pub fn set_param(&mut self, which: usize, x: &[f32]) {
        let t = if which == 0 { self.a } else { self.w };
        write_param(&mut self.session, self.bf16, t, x);
    }
}

/// A random case: logits of order `scale`, every third row ignored (no target), a few rows with
/// no upstream gradient at all (ignored and ce = 0: rows 0..3, a whole chunk for chunks <= 3),
/// mixed-sign loss weights.
pub fn case(rng: &mut super::common::Rng, n: usize, h: usize, v: usize, temperature: f32) -> Case {
    let a = rng.normal_vec(n * h, 1.0);
    let w = rng.normal_vec(v * h, 1.0 / (h as f64).sqrt() * 2.0);
    let targets = (0..n)
        .map(|i| {
            if i < 3 || i % 3 == 2 {
                dfpo::kernels::xent::IGNORE_INDEX
            } else {
                (rng.next_u64() % v as u64) as u32
            }
        })
        .collect();
    let cl = (0..n).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    let ce = (0..n)
        .map(|i| {
            if i < 3 {
                0.0
            } else {
                rng.range(-0.5, 0.5) as f32
            }
        })
        .collect();
    Case {
        n,
        h,
        v,
        temperature,
        a,
        w,
        targets,
        cl,
        ce,
    }
}

/// Runs `c` on a fresh graph after a decoy case of the same shape (so anything the head leaves
/// unwritten keeps the decoy's values and shows).
pub fn run_after_decoy(dev: &Device, c: &Case, decoy: &Case, head: Head) -> Out {
    let mut g = build(dev, c.n, c.h, c.v, c.temperature, head);
    g.set(decoy);
    g.run();
    g.set(c);
    g.run()
}
