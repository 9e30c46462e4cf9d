//! The chunked LM head (`LmHeadXent`) on the CPU against the unfused `Linear` + `TokenLogprob`
//! it replaces (values and both gradients, chunk sizes 1, non-dividing, dividing, n and past n,
//! temperatures 1 and 0.7), a finite-difference check of its backward, and the planner: the head's
//! scratch is one chunk, not n·V.

mod common;
mod lm_head_graph;

use common::{assert_close, Rng};
use dfpo::graph::{DType, GraphBuilder};
use dfpo::model::lm_head::LmHeadXent;
use dfpo::Device;
use lm_head_graph::{build, case, run_after_decoy, Head, Out};

fn max_abs(x: &[f32]) -> f64 {
    x.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()))
}

fn assert_same(what: &str, got: &Out, want: &Out) {
    let tol = |x: &[f32]| 1e-5 * max_abs(x).max(1.0);
    assert_close(
        &format!("{what} logprob"),
        &got.logprob,
        &want.logprob,
        1e-5,
        tol(&want.logprob),
    );
    assert_close(&format!("{what} lse"), &got.lse, &want.lse, 1e-5, 1e-5);
    assert_close(
        &format!("{what} entropy"),
        &got.entropy,
        &want.entropy,
        1e-5,
        1e-5,
    );
    assert!(
        (got.loss - want.loss).abs() as f64 <= 1e-5 * (want.loss.abs() as f64).max(1.0),
        "{what} loss {} want {}",
        got.loss,
        want.loss
    );
    assert_close(
        &format!("{what} da"),
        &got.da,
        &want.da,
        1e-4,
        tol(&want.da),
    );
    assert_close(
        &format!("{what} dW"),
        &got.dw,
        &want.dw,
        1e-4,
        tol(&want.dw),
    );
}

#[test]
fn chunked_head_equals_the_unfused_head() {
    let mut rng = Rng::fresh("lm_head_chunked_equals_unfused");
    for &(n, h, v) in &[(10usize, 6usize, 37usize), (29, 16, 301)] {
        for temperature in [1.0f32, 0.7] {
            let c = case(&mut rng, n, h, v, temperature);
            let decoy = case(&mut rng, n, h, v, temperature);
            let want = run_after_decoy(&Device::Cpu, &c, &decoy, Head::Unfused);
            assert!(max_abs(&want.da) > 0.0 && max_abs(&want.dw) > 0.0);
            for chunk in [1, 3, 4, 7, n - 1, n, 4 * n] {
                let got = run_after_decoy(&Device::Cpu, &c, &decoy, Head::Chunked(chunk));
                assert_same(
                    &format!("n {n} h {h} v {v} T {temperature} chunk {chunk}"),
                    &got,
                    &want,
                );
            }
        }
    }
}

#[test]
fn ignored_rows_and_rows_without_gradient() {
    // Ignored targets give logprob 0; rows 0..3 have no upstream gradient at all (a whole chunk
    // at chunk 3, skipped): their rows of da stay 0.
    let mut rng = Rng::fresh("lm_head_ignored_rows");
    let (n, h, v) = (12, 5, 23);
    let c = case(&mut rng, n, h, v, 1.0);
    let decoy = case(&mut rng, n, h, v, 1.0);
    let got = run_after_decoy(&Device::Cpu, &c, &decoy, Head::Chunked(3));
    for i in 0..n {
        if c.targets[i] == dfpo::kernels::xent::IGNORE_INDEX {
            assert_eq!(got.logprob[i], 0.0, "row {i}");
        } else {
            assert!(got.logprob[i] < 0.0, "row {i}: {}", got.logprob[i]);
        }
        assert!(got.entropy[i] > 0.0 && got.lse[i].is_finite(), "row {i}");
    }
    assert!(
        got.da[..3 * h].iter().all(|&x| x == 0.0),
        "{:?}",
        &got.da[..3 * h]
    );
    assert!(got.da[3 * h..].iter().any(|&x| x != 0.0));
}

#[test]
fn backward_matches_finite_differences() {
    let mut rng = Rng::fresh("lm_head_finite_differences");
    let (n, h, v) = (7, 4, 11);
    let c = case(&mut rng, n, h, v, 0.8);
    let mut g = build(&Device::Cpu, n, h, v, 0.8, Head::Chunked(3));
    g.set(&c);
    let out = g.run();
    let eps = 1e-2f32;
    for (which, x, grad) in [(0usize, &c.a, &out.da), (1, &c.w, &out.dw)] {
        let scale = max_abs(grad);
        assert!(scale > 0.0);
        // Every entry of a; a random sample of W's.
        let idx: Vec<usize> = if which == 0 {
            (0..x.len()).collect()
        } else {
            (0..12)
                .map(|_| (rng.next_u64() % x.len() as u64) as usize)
                .collect()
        };
        for i in idx {
            let mut xp = x.clone();
            xp[i] += eps;
            g.set_param(which, &xp);
            let lp = g.loss() as f64;
            xp[i] -= 2.0 * eps;
            g.set_param(which, &xp);
            let lm = g.loss() as f64;
            g.set_param(which, x);
            let fd = (lp - lm) / (2.0 * eps as f64);
            let an = grad[i] as f64;
            assert!(
                (fd - an).abs() <= 1e-2 * scale + 2e-3,
                "{} [{i}]: finite difference {fd} vs backward {an}",
                if which == 0 { "da" } else { "dW" }
            );
        }
    }
}

#[test]
fn the_arena_holds_one_chunk_not_the_logits() {
    // 4096 tokens x 32000 vocabulary: the unfused head's logits alone are 4096·32000·4 B = 524 MB
    // (and their gradient the same); the chunked head's scratch is one chunk of the budget.
    let (n, h, v) = (4096usize, 64usize, 32000usize);
    let arena = |head: Head| {
        let mut g = GraphBuilder::new();
        let a = g.param("a", n * h);
        let w = g.param("w", v * h);
        let t = g.input_typed("targets", n, DType::U32);
        let outs = [
            ("logprob", n, DType::F32),
            ("lse", n, DType::F32),
            ("entropy", n, DType::F32),
        ];
        let o = match head {
            Head::Chunked(chunk) => g
                .node_typed(
                    LmHeadXent {
                        n,
                        h,
                        v,
                        temperature: 1.0,
                        chunk,
                    },
                    &[a, w, t],
                    &outs,
                )
                .unwrap(),
            Head::Unfused => {
                let z = g
                    .node(
                        dfpo::model::ops::Linear { n, din: h, dout: v },
                        &[a, w],
                        &[("z", n * v)],
                    )
                    .unwrap()[0];
                let op = dfpo::model::ops::TokenLogprob {
                    n,
                    v,
                    temperature: 1.0,
                };
                g.node_typed(op, &[z, t], &outs).unwrap()
            }
        };
        let loss = g
            .node(dfpo::model::ops::MeanNll { n }, &[o[0], t], &[("loss", 1)])
            .unwrap()[0];
        let p = g.plan_for(loss, false).unwrap();
        p.verify_packing().unwrap();
        p.arena_bytes()
    };
    let budget = 16 << 20;
    let chunk = LmHeadXent::chunk_rows(n, v, false, budget);
    let fused = arena(Head::Chunked(chunk));
    let unfused = arena(Head::Unfused);
    assert!(unfused >= 2 * n * v * 4, "unfused arena {unfused}");
    // One chunk (logits + their gradient, f32) plus the per-token vectors, dA and dW.
    let rest = (4 * 4 + h * 4) * n + v * h * 4;
    assert!(
        fused <= budget + rest + (1 << 20),
        "chunked arena {fused} for a {budget} B budget"
    );
}
