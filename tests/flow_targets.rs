//! The flow critic's rollout-time solves and targets (`train::rollout`): the return clip, the
//! noise of the flow-matching terms.

use dfpo::kernels::flow::{self, FlowHeadShape, Solver};
use dfpo::train::rollout::{
    flow_readout, flow_targets, FlowSolve, FlowTargetOpts, FlowTargets, Stream,
};
use dfpo::train::step_ops::StepOps;

mod common;
use common::Rng;

/// A head whose velocity is the constant `v` everywhere (w_out = 0, b_out = v).
fn constant_head(shape: &FlowHeadShape, v: f32) -> Vec<f32> {
    let mut p = flow::init_params(shape, 3);
    let lay = shape.layout();
    for i in lay.w_out.clone() {
        p[i] = 0.0;
    }
    p[lay.b_out.start] = v;
    p
}

struct Setup {
    fs: FlowSolve,
    u: Vec<f32>,
    mask: Vec<f32>,
    s: usize,
}

/// Two rows of S = 6 with responses at t = 1..5 and t = 0..3.
fn setup(rng: &mut Rng, k: usize, clip: Option<(f32, f32)>) -> Setup {
    let shape = FlowHeadShape::new(4, 32, 2).unwrap();
    let s = 6;
    let mut mask = vec![0.0f32; 2 * s];
    mask[1..5].fill(1.0);
    mask[s..s + 3].fill(1.0);
    Setup {
        fs: FlowSolve {
            shape,
            k,
            readout_steps: 1,
            target_steps: 4,
            solver: Solver::Euler,
            clip,
        },
        u: rng.uniform_vec(2 * s * shape.width, -1.0, 1.0),
        mask,
        s,
    }
}

impl Setup {
    /// [`flow_targets`] of a still head (v ≡ 0: every solve stays at its start) with readout
    /// samples 0.5, std 0.3, the given λ-returns and token rewards.
    fn still_targets(&self, ret: &[f32], rewards: &[f32], seed: u64) -> FlowTargets {
        let n = self.mask.len();
        let k = self.fs.k;
        let still = constant_head(&self.fs.shape, 0.0);
        let (z, sd) = (vec![0.5f32; n * k], vec![0.3f32; n]);
        let mut tau_rng = Stream::new(seed, 0, "tau");
        let o = FlowTargetOpts {
            gamma: 1.0,
            kappa: 0.3,
            direction: 1,
            anchor_lambda: true,
        };
        let ops = StepOps::host();
        let (fs, u, mask) = (&self.fs, &self.u, &self.mask);
        flow_targets(
            &ops,
            fs,
            &still,
            u,
            &z,
            &sd,
            ret,
            rewards,
            mask,
            self.s,
            &o,
            &mut tau_rng,
        )
        .unwrap()
    }
}

/// The return clip acts on returns, i.e. on the END of a [0, 1] solve. The DCFM target's partial
/// solve over [0, τ] ends on the path z_τ = (1 − τ)ε + τ·g, mostly noise for small τ: clipping it
/// to the return range would read the lowest noise levels off the path.
#[test]
fn the_return_clip_applies_to_returns_not_to_partial_solves() {
    let mut rng = Rng::fresh("the_return_clip_applies_to_returns");
    let k = 16;
    let st = setup(&mut rng, k, Some((0.0, 1.0)));
    let fs = &st.fs;
    let n = st.mask.len();
    // v ≡ 0: every solve stays at its start, z'_τ = ε.
    let t = st.still_targets(&vec![0.5f32; n * k], &vec![0.0f32; n], 1);
    // DCFM's evaluation point r + γ·z'_τ = ε on continuing tokens: about half below 0.
    let mut below = 0;
    let mut total = 0;
    for i in 0..n {
        if t.dmask[i] != 0.0 {
            for j in 0..k {
                total += 1;
                below += (t.z_d[i * k + j] < 0.0) as usize;
            }
        }
    }
    assert!(total > 0);
    assert!(
        below * 4 > total,
        "{below} of {total} DCFM points below the clip's floor 0: the partial solve was clipped"
    );
    // The readout (a full solve) is still clipped: v ≡ 5 carries every ε past the ceiling 1.
    let fast = constant_head(&fs.shape, 5.0);
    let (zr, _) = flow_readout(&StepOps::host(), fs, &fast, &st.u, &st.mask).unwrap();
    for i in 0..n {
        for j in 0..k {
            let want = if st.mask[i] != 0.0 { 1.0 } else { 0.0 };
            assert_eq!(zr[i * k + j], want, "readout of token {i} sample {j}");
        }
    }
}

/// DCFM and BCFM train the flow at (ε, τ) drawn per token and sample (one pair per row, shared
/// by the two terms as in Value Flows), not along the K fixed readout levels ε_k.
#[test]
fn the_matching_terms_sample_their_noise_per_row() {
    let mut rng = Rng::fresh("the_matching_terms_sample_their_noise");
    let k = 64;
    let st = setup(&mut rng, k, None);
    let n = st.mask.len();
    let ret: Vec<f32> = rng.uniform_vec(n * k, 0.0, 1.0);
    let rewards: Vec<f32> = rng.uniform_vec(n, -0.1, 0.1);
    let t = st.still_targets(&ret, &rewards, rng.next_u64() >> 1);
    let mut eps = Vec::new();
    for (i, &r_i) in rewards.iter().enumerate() {
        if st.mask[i] == 0.0 {
            continue;
        }
        for j in 0..k {
            let r = i * k + j;
            // BCFM: z_b = τ·g + (1 − τ)·ε, vel_b = g − ε, so ε = z_b − τ·vel_b.
            let e = t.z_b[r] - t.tau_b[r] * t.vel_b[r];
            assert!(
                (t.vel_b[r] - (ret[r] - e)).abs() < 1e-5,
                "BCFM target velocity"
            );
            // DCFM with v ≡ 0: z'_τ = ε, so z_d = r_t + ε on continuing tokens (same ε).
            if t.dmask[i] != 0.0 {
                assert!((t.z_d[r] - (r_i + e)).abs() < 1e-5, "DCFM noise");
            }
            eps.push(e as f64);
        }
    }
    let mut distinct: Vec<i64> = eps.iter().map(|e| (e * 1e4).round() as i64).collect();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() > 4 * k,
        "{} distinct noise values over {} rows: the matching terms reuse the K = {k} readout levels",
        distinct.len(),
        eps.len()
    );
    let m = eps.iter().sum::<f64>() / eps.len() as f64;
    let v = eps.iter().map(|e| (e - m).powi(2)).sum::<f64>() / eps.len() as f64;
    assert!(
        m.abs() < 0.2 && (v - 1.0).abs() < 0.3,
        "noise mean {m}, variance {v}"
    );
}
