//! Graph runtime: planning, arena packing and execution on the CPU (CUDA: tests/cuda_graph.rs).

mod common;

use common::{assert_close, Rng};
use dfpo::graph::{ops::MseLoss, GraphBuilder};
use dfpo::Device;

#[test]
fn mse_of_a_parameter_has_the_closed_form_gradient() {
    let mut rng = Rng::fresh("mse_of_a_parameter");
    let n = 37;
    let mut g = GraphBuilder::new();
    let p = g.param("p", n);
    let t = g.input("t", n);
    let w = g.input("w", n);
    let loss = g.node(MseLoss, &[p, t, w], &[("loss", 1)]).unwrap()[0];
    let plan = g.plan(loss, &Device::Cpu).unwrap();
    plan.verify_packing().unwrap();
    let dp = plan.grad(p).unwrap();
    assert!(plan.grad(t).is_none(), "inputs get no gradient");
    let mut s = dfpo::graph::Session::new(plan, Device::Cpu).unwrap();
    let (pv, tv, wv) = (
        rng.normal_vec(n, 1.0),
        rng.normal_vec(n, 1.0),
        rng.uniform_vec(n, 0.5, 1.5),
    );
    s.write(p, &pv).unwrap();
    s.write(t, &tv).unwrap();
    s.write(w, &wv).unwrap();
    let l = s.run().unwrap();
    let want: f64 = (0..n)
        .map(|i| wv[i] as f64 * ((pv[i] - tv[i]) as f64).powi(2))
        .sum::<f64>()
        / n as f64;
    assert!(
        (l as f64 - want).abs() < 1e-5 * want.max(1.0),
        "loss {l} want {want}"
    );
    let want_g: Vec<f32> = (0..n)
        .map(|i| 2.0 * wv[i] * (pv[i] - tv[i]) / n as f32)
        .collect();
    assert_close("d(p)", &s.read_f32(dp).unwrap(), &want_g, 1e-5, 1e-7);
    // A second run gives the same gradient: gradients are zeroed, not accumulated across runs.
    s.run().unwrap();
    assert_close(
        "d(p) on rerun",
        &s.read_f32(dp).unwrap(),
        &want_g,
        1e-5,
        1e-7,
    );
}

#[test]
fn plan_rejects_bad_losses_and_writes() {
    let mut g = GraphBuilder::new();
    let t = g.input("t", 4);
    let u = g.input("u", 4);
    let loss = g.node(MseLoss, &[t, u], &[("loss", 1)]).unwrap()[0];
    assert!(
        g.plan(loss, &Device::Cpu).is_err(),
        "a loss without parameters has nothing to train"
    );
    let mut g = GraphBuilder::new();
    let p = g.param("p", 4);
    let t = g.input("t", 4);
    let v = g.node(MseLoss, &[p, t], &[("v", 2)]).unwrap()[0];
    assert!(
        g.plan(v, &Device::Cpu).is_err(),
        "the loss must have length 1"
    );
    let mut g = GraphBuilder::new();
    let p = g.param("p", 4);
    let t = g.input("t", 4);
    let loss = g.node(MseLoss, &[p, t], &[("loss", 1)]).unwrap()[0];
    let mut s =
        dfpo::graph::Session::new(g.plan(loss, &Device::Cpu).unwrap(), Device::Cpu).unwrap();
    assert!(s.write(p, &[1.0f32; 3]).is_err(), "wrong length");
    assert!(
        s.write(loss, &[1.0f32]).is_err(),
        "activations are not written by the caller"
    );
    let mut t2 = vec![0.0; 4];
    t2[1] = 1.0;
    s.write(t, &t2).unwrap();
    s.write(p, &[0.0f32; 4]).unwrap();
    assert!((s.run().unwrap() - 0.25).abs() < 1e-7);
}

/// A test-only op: y = k·x elementwise (CPU), to exercise planning on long chains.
struct Scale(f32);

impl dfpo::graph::Op for Scale {
    fn name(&self) -> String {
        format!("scale({})", self.0)
    }
    fn backward_reads(&self) -> (bool, bool) {
        (false, false)
    }
    fn forward(
        &self,
        x: &mut dfpo::graph::Exec<'_>,
        ins: &[dfpo::graph::TensorId],
        outs: &[dfpo::graph::TensorId],
    ) -> dfpo::Result<()> {
        let (a, y) = (x.cpu(ins[0]), x.cpu_mut(outs[0]));
        for (y, a) in y.iter_mut().zip(a) {
            *y = self.0 * a;
        }
        Ok(())
    }
    fn backward(
        &self,
        x: &mut dfpo::graph::Exec<'_>,
        _ins: &[dfpo::graph::TensorId],
        _outs: &[dfpo::graph::TensorId],
        d_outs: &[dfpo::graph::TensorId],
        d_ins: &[Option<dfpo::graph::TensorId>],
    ) -> dfpo::Result<()> {
        if let Some(d) = d_ins[0] {
            let (dy, dx) = (x.cpu(d_outs[0]), x.cpu_mut(d));
            for (dx, dy) in dx.iter_mut().zip(dy) {
                *dx += self.0 * dy;
            }
        }
        Ok(())
    }
}

#[test]
fn long_chain_reuses_memory_and_backpropagates_exactly() {
    let mut rng = Rng::fresh("long_chain");
    let (n, depth) = (1000, 12);
    let mut g = GraphBuilder::new();
    let p = g.param("p", n);
    let t = g.input("t", n);
    let mut h = p;
    let mut ks = Vec::new();
    for i in 0..depth {
        let k = 0.5 + 0.1 * i as f32;
        ks.push(k);
        h = g.node(Scale(k), &[h], &[("h", n)]).unwrap()[0];
    }
    let loss_a = g.node(MseLoss, &[h, t], &[("la", 1)]).unwrap()[0];
    let plan = g.plan(loss_a, &Device::Cpu).unwrap();
    plan.verify_packing().unwrap();
    eprintln!("{}", plan.describe());
    // 12 activations + 12 gradients + d(p) of n floats each; Scale's backward saves nothing,
    // so only a few are live at once.
    assert!(
        plan.arena_bytes() * 3 < plan.tensor_bytes(),
        "arena {} B should be far below the {} B of all tensors",
        plan.arena_bytes(),
        plan.tensor_bytes()
    );
    let dp = plan.grad(p).unwrap();
    let mut s = dfpo::graph::Session::new(plan, Device::Cpu).unwrap();
    let (pv, tv) = (rng.normal_vec(n, 1.0), rng.normal_vec(n, 1.0));
    s.write(p, &pv).unwrap();
    s.write(t, &tv).unwrap();
    s.run().unwrap();
    let prod: f64 = ks.iter().map(|&k| k as f64).product();
    let want: Vec<f32> = (0..n)
        .map(|i| (2.0 * (prod * pv[i] as f64 - tv[i] as f64) / n as f64 * prod) as f32)
        .collect();
    assert_close(
        "d(p) through the chain",
        &s.read_f32(dp).unwrap(),
        &want,
        1e-4,
        1e-7,
    );
}

#[test]
fn forward_to_runs_only_the_prefix_that_produces_a_tensor() {
    let mut rng = Rng::fresh("forward_to");
    let n = 64;
    let mut g = GraphBuilder::new();
    let p = g.param("p", n);
    let t = g.input("t", n);
    let a = g.node(Scale(2.0), &[p], &[("a", n)]).unwrap()[0];
    let b = g.node(Scale(3.0), &[a], &[("b", n)]).unwrap()[0];
    let loss = g.node(MseLoss, &[b, t], &[("l", 1)]).unwrap()[0];
    g.keep(a);
    let plan = g.plan(loss, &Device::Cpu).unwrap();
    let mut s = dfpo::graph::Session::new(plan, Device::Cpu).unwrap();
    let pv = rng.normal_vec(n, 1.0);
    s.write(p, &pv).unwrap();
    s.write(t, &rng.normal_vec(n, 1.0)).unwrap();
    s.forward_to(a).unwrap();
    let want: Vec<f32> = pv.iter().map(|v| 2.0 * v).collect();
    assert_close("a", &s.read_f32(a).unwrap(), &want, 0.0, 0.0);
    // The loss node did not run: the arena starts as NaN on the CPU.
    assert!(s.read_f32(loss).unwrap()[0].is_nan());
    // An input is produced by no node.
    assert!(s.forward_to(t).is_err());
}
