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
    let plan = g.plan(loss).unwrap();
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
        g.plan(loss).is_err(),
        "a loss without parameters has nothing to train"
    );
    let mut g = GraphBuilder::new();
    let p = g.param("p", 4);
    let t = g.input("t", 4);
    let v = g.node(MseLoss, &[p, t], &[("v", 2)]).unwrap()[0];
    assert!(g.plan(v).is_err(), "the loss must have length 1");
    let mut g = GraphBuilder::new();
    let p = g.param("p", 4);
    let t = g.input("t", 4);
    let loss = g.node(MseLoss, &[p, t], &[("loss", 1)]).unwrap()[0];
    let mut s = dfpo::graph::Session::new(g.plan(loss).unwrap(), Device::Cpu).unwrap();
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
