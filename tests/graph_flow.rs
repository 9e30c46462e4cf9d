//! The graph runtime on the flow-head training graph (the bootstrapped-anchor flow-matching
//! loss of docs/dfpo-method.md 2.6): u = FlowCond(p, c); v = FlowEval(p, u, z_τ, τ);
//! loss = mean w·(v − (G − ε))². Checked against a direct composition of the CPU kernels.

mod common;

use common::{assert_close, Rng};
mod flow_graph;

use dfpo::kernels::flow::{self, FlowHeadShape};
use dfpo::Device;
use flow_graph::build;

#[test]
fn flow_training_graph_matches_direct_composition() {
    check(37, 4, "flow_training_graph");
}

/// Large enough (>= 1024 rows) that the CPU FlowEval op splits its tokens over two threads;
/// the direct composition below is single-threaded.
#[test]
fn flow_training_graph_matches_direct_composition_on_two_threads() {
    check(301, 8, "flow_training_graph_two_threads");
}

fn check(n_tok: usize, k: usize, name: &str) {
    let mut rng = Rng::fresh(name);
    let shape = FlowHeadShape::new(12, 64, 3).unwrap();
    let rows = n_tok * k;
    let mut fg = build(shape, n_tok, k, Device::Cpu);
    println!("{}", fg.session.plan().describe());
    let params = flow::init_params(&shape, 7);
    let c = rng.normal_vec(n_tok * shape.cond_dim, 1.0);
    let z = rng.normal_vec(rows, 1.0);
    let tau = rng.uniform_vec(rows, 0.0, 1.0);
    let target = rng.normal_vec(rows, 1.0);
    let w = rng.uniform_vec(rows, 0.5, 1.5);
    let s = &mut fg.session;
    s.write(fg.p, &params).unwrap();
    s.write(fg.c, &c).unwrap();
    s.write(fg.z, &z).unwrap();
    s.write(fg.tau, &tau).unwrap();
    s.write(fg.target, &target).unwrap();
    s.write(fg.w, &w).unwrap();
    let loss = s.run().unwrap();
    let dp = s.plan().grad(fg.p).unwrap();

    // Direct composition of the CPU kernels.
    let mut u = vec![0.0f32; n_tok * shape.width];
    flow::cpu::cond_forward(&shape, &params, &c, &mut u).unwrap();
    let mut v = vec![0.0f32; rows];
    flow::cpu::eval_forward(&shape, &params, &u, k, &z, &tau, &mut v).unwrap();
    let want_loss: f64 = (0..rows)
        .map(|i| w[i] as f64 * ((v[i] - target[i]) as f64).powi(2))
        .sum::<f64>()
        / rows as f64;
    assert!(
        (loss as f64 - want_loss).abs() < 1e-5 * want_loss,
        "loss {loss} vs {want_loss}"
    );
    assert_close("v", &s.read_f32(fg.v).unwrap(), &v, 1e-6, 1e-7);
    let dv: Vec<f32> = (0..rows)
        .map(|i| 2.0 * w[i] * (v[i] - target[i]) / rows as f32)
        .collect();
    let mut want_dp = vec![0.0f32; params.len()];
    let mut du = vec![0.0f32; u.len()];
    flow::cpu::eval_backward(
        &shape,
        &params,
        &u,
        k,
        &z,
        &tau,
        &dv,
        &mut want_dp,
        &mut du,
        None,
    )
    .unwrap();
    flow::cpu::cond_backward(&shape, &params, &c, &du, &mut want_dp, None).unwrap();
    assert_close("d(params)", &s.read_f32(dp).unwrap(), &want_dp, 1e-4, 1e-7);

    // The arena holds less than all activations and gradients side by side.
    let plan = s.plan();
    println!(
        "flow training graph: arena {} B, all activations + gradients {} B, persistent {} B",
        plan.arena_bytes(),
        plan.tensor_bytes(),
        plan.persistent_bytes()
    );
    assert!(plan.arena_bytes() < plan.tensor_bytes());
}
