//! The flow-head training graph shared by tests/graph_flow.rs and tests/cuda_graph.rs.
#![allow(dead_code)]

use dfpo::graph::{
    ops::{FlowCond, FlowEval, MseLoss},
    GraphBuilder, Session, TensorId,
};
use dfpo::kernels::flow::FlowHeadShape;
use dfpo::Device;

pub struct FlowGraph {
    pub session: Session,
    pub p: TensorId,
    pub c: TensorId,
    pub z: TensorId,
    pub tau: TensorId,
    pub target: TensorId,
    pub w: TensorId,
    pub v: TensorId,
}

pub fn build(shape: FlowHeadShape, n_tok: usize, k: usize, device: Device) -> FlowGraph {
    let rows = n_tok * k;
    let mut g = GraphBuilder::new();
    let p = g.param("flow.params", shape.param_count());
    let c = g.input("c", n_tok * shape.cond_dim);
    let z = g.input("z_tau", rows);
    let tau = g.input("tau", rows);
    let target = g.input("target_velocity", rows);
    let w = g.input("weight", rows);
    let u = g
        .node(FlowCond { shape }, &[p, c], &[("u", n_tok * shape.width)])
        .unwrap()[0];
    let v = g
        .node(
            FlowEval {
                shape,
                samples_per_token: k,
            },
            &[p, u, z, tau],
            &[("v", rows)],
        )
        .unwrap()[0];
    g.keep(v);
    let loss = g.node(MseLoss, &[v, target, w], &[("loss", 1)]).unwrap()[0];
    let plan = g.plan(loss, &device).unwrap();
    plan.verify_packing().unwrap();
    let session = Session::new(plan, device).unwrap();
    FlowGraph {
        session,
        p,
        c,
        z,
        tau,
        target,
        w,
        v,
    }
}
