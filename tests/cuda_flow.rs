//! CUDA parity of kernels/flow.cu against the f32 CPU reference, on fresh random inputs with
//! poisoned outputs. Gradients accumulate onto non-zero buffers (checks the += semantics).
//! Without a GPU every test prints a SKIPPED line; DFPO_REQUIRE_CUDA=1 turns that into a failure.

mod common;

use std::sync::Arc;

use common::*;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use dfpo::device::{cuda_for_test, CudaDevice};
use dfpo::kernels::flow::{
    cpu, cuda, FlowHeadShape, IntegrateOpts, Interval, Noise, NoiseOpts, Solver,
};
use dfpo::Error;

/// (cond_dim, width, depth, n_tok, K): tails (rows not a multiple of the tile), K = 1, K = 33,
/// widths 32 / 64 / 96 / 160 / 256 / 288 / 384 / 512 (1, 2 and 4 column groups, partial groups),
/// depth 1 / 2 / 3 / 8, and enough rows for split-K weight gradients and for blocks of the
/// backward that loop over several tiles.
const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
    (7, 32, 1, 5, 33),
    (16, 256, 3, 9, 31),
    (5, 512, 3, 7, 1),
    (3, 96, 2, 13, 5),
    (130, 160, 2, 6, 11),
    (9, 512, 1, 3, 33),
    (4, 64, 3, 70, 1),
    (4, 384, 2, 3, 7),
    (2, 288, 2, 2, 9),
    (3, 32, 8, 4, 9),
    (3, 64, 2, 100, 33),
    (3, 32, 2, 600, 33),
];

fn up(dev: &Arc<CudaDevice>, x: &[f32]) -> CudaSlice<f32> {
    dev.stream().clone_htod(x).unwrap()
}

fn down(dev: &Arc<CudaDevice>, x: &CudaSlice<f32>) -> Vec<f32> {
    dev.stream().clone_dtoh(x).unwrap()
}

fn poisoned(dev: &Arc<CudaDevice>, n: usize) -> CudaSlice<f32> {
    up(dev, &vec![POISON; n])
}

/// Random f32 parameters that make every layer matter (see tests/flow_cpu.rs).
fn random_params(shape: &FlowHeadShape, rng: &mut Rng) -> Vec<f32> {
    let lay = shape.layout();
    let mut p = vec![0.0f32; lay.total];
    let mut fill = |p: &mut [f32], r: std::ops::Range<usize>, s: f64, mean: f64| {
        for i in r {
            p[i] = (mean + s * rng.normal()) as f32;
        }
    };
    let h = shape.width as f64;
    fill(
        &mut p,
        lay.w_cond.clone(),
        1.0 / (shape.cond_dim as f64).sqrt(),
        0.0,
    );
    fill(&mut p, lay.b_in.clone(), 0.2, 0.0);
    fill(&mut p, lay.w_z.clone(), 0.7, 0.0);
    fill(&mut p, lay.w_t.clone(), 0.5, 0.0);
    for l in &lay.layers {
        if let Some(w) = &l.w {
            fill(&mut p, w.clone(), 1.0 / h.sqrt(), 0.0);
        }
        if let Some(b) = &l.b {
            fill(&mut p, b.clone(), 0.1, 0.0);
        }
        fill(&mut p, l.gamma.clone(), 0.2, 1.0);
        fill(&mut p, l.beta.clone(), 0.1, 0.0);
    }
    fill(&mut p, lay.w_out.clone(), 1.0 / h.sqrt(), 0.0);
    fill(&mut p, lay.b_out.clone(), 0.1, 0.0);
    p
}

struct Case {
    shape: FlowHeadShape,
    n: usize,
    k: usize,
    params: Vec<f32>,
    u: Vec<f32>,
    z: Vec<f32>,
    tau: Vec<f32>,
}

fn case(rng: &mut Rng, &(c, h, d, n, k): &(usize, usize, usize, usize, usize)) -> Case {
    let shape = FlowHeadShape::new(c, h, d).unwrap();
    let rows = n * k;
    Case {
        params: random_params(&shape, rng),
        u: rng.normal_vec(n * h, 0.7),
        z: rng.normal_vec(rows, 1.0),
        tau: rng.uniform_vec(rows, 0.0, 1.0),
        shape,
        n,
        k,
    }
}

/// |got − want| <= rtol·max|want| + rtol·|want| elementwise (sums of many terms carry absolute
/// error relative to the block's scale).
fn assert_scaled(what: &str, got: &[f32], want: &[f32], rtol: f64) {
    let scale = want
        .iter()
        .fold(0.0f64, |m, &x| m.max((x as f64).abs()))
        .max(1e-6);
    assert_close(what, got, want, rtol, rtol * scale);
}

/// Accumulated outputs: checks got − init against want − init (scaled to the gradient itself,
/// so a missing contribution cannot hide under the initial values).
fn assert_delta(what: &str, got: &[f32], want: &[f32], init: &[f32], rtol: f64) {
    let d = |x: &[f32]| x.iter().zip(init).map(|(a, b)| a - b).collect::<Vec<f32>>();
    assert_scaled(what, &d(got), &d(want), rtol);
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn noise_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda flow noise") else {
        return;
    };
    let mut rng = Rng::fresh("cuda flow noise");
    for (k, tok) in [(1usize, 1000usize), (32, 97), (33, 41), (256, 3)] {
        let seed = rng.next_u64();
        for kind in [Noise::Stratified, Noise::Random { seed }] {
            for truncate in [None, Some(1.75f32)] {
                let o = NoiseOpts { kind, truncate };
                let rows = k * tok;
                let mut want = vec![0.0f32; rows];
                cpu::noise(&o, k, &mut want).unwrap();
                let mut d = poisoned(&dev, rows);
                cuda::noise(&dev, &o, k, &mut d.as_view_mut()).unwrap();
                assert_close(
                    &format!("noise {o:?} K={k}"),
                    &down(&dev, &d),
                    &want,
                    1e-6,
                    1e-6,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cond_forward_and_backward_match_cpu() {
    let Some(dev) = cuda_for_test("cuda flow cond") else {
        return;
    };
    let mut rng = Rng::fresh("cuda flow cond");
    for sh in SHAPES.iter().chain(&[(896, 256, 2, 300, 1)]) {
        let cs = case(&mut rng, sh);
        let (s, n) = (cs.shape, cs.n);
        let c = rng.normal_vec(n * s.cond_dim, 1.0);
        // forward
        let mut want = vec![0.0f32; n * s.width];
        cpu::cond_forward(&s, &cs.params, &c, &mut want).unwrap();
        let (pd, cd) = (up(&dev, &cs.params), up(&dev, &c));
        let mut ud = poisoned(&dev, n * s.width);
        cuda::cond_forward(
            &dev,
            &s,
            &pd.as_view(),
            &cd.as_view(),
            &mut ud.as_view_mut(),
        )
        .unwrap();
        assert_scaled(
            &format!("cond_forward u {sh:?}"),
            &down(&dev, &ud),
            &want,
            1e-5,
        );
        // backward onto non-zero buffers
        let du = rng.normal_vec(n * s.width, 1.0);
        let dp0 = rng.normal_vec(cs.params.len(), 1.0);
        let dc0 = rng.normal_vec(c.len(), 1.0);
        let (mut dp_want, mut dc_want) = (dp0.clone(), dc0.clone());
        cpu::cond_backward(&s, &cs.params, &c, &du, &mut dp_want, Some(&mut dc_want)).unwrap();
        let dud = up(&dev, &du);
        let (mut dpd, mut dcd) = (up(&dev, &dp0), up(&dev, &dc0));
        cuda::cond_backward(
            &dev,
            &s,
            &pd.as_view(),
            &cd.as_view(),
            &dud.as_view(),
            &mut dpd.as_view_mut(),
            Some(&mut dcd.as_view_mut()),
        )
        .unwrap();
        let dp = down(&dev, &dpd);
        let lay = s.layout();
        assert_delta(
            &format!("cond dW_cond {sh:?}"),
            &dp[lay.w_cond.clone()],
            &dp_want[lay.w_cond.clone()],
            &dp0[lay.w_cond.clone()],
            2e-5,
        );
        assert_delta(
            &format!("cond db_in {sh:?}"),
            &dp[lay.b_in.clone()],
            &dp_want[lay.b_in.clone()],
            &dp0[lay.b_in.clone()],
            2e-5,
        );
        assert_eq!(
            &dp[lay.b_in.end..],
            &dp0[lay.b_in.end..],
            "cond_backward touches only w_cond and b_in"
        );
        assert_delta(
            &format!("cond dc {sh:?}"),
            &down(&dev, &dcd),
            &dc_want,
            &dc0,
            2e-5,
        );
        // without dc
        let mut dpd2 = up(&dev, &dp0);
        cuda::cond_backward(
            &dev,
            &s,
            &pd.as_view(),
            &cd.as_view(),
            &dud.as_view(),
            &mut dpd2.as_view_mut(),
            None,
        )
        .unwrap();
        assert_eq!(
            down(&dev, &dpd2),
            dp,
            "deterministic, and dc does not change dparams"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn eval_forward_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda flow eval_forward") else {
        return;
    };
    let mut rng = Rng::fresh("cuda flow eval_forward");
    for sh in SHAPES {
        let cs = case(&mut rng, sh);
        let rows = cs.z.len();
        let mut want = vec![0.0f32; rows];
        cpu::eval_forward(
            &cs.shape, &cs.params, &cs.u, cs.k, &cs.z, &cs.tau, &mut want,
        )
        .unwrap();
        let (pd, ud, zd, td) = (
            up(&dev, &cs.params),
            up(&dev, &cs.u),
            up(&dev, &cs.z),
            up(&dev, &cs.tau),
        );
        let mut vd = poisoned(&dev, rows);
        cuda::eval_forward(
            &dev,
            &cs.shape,
            &pd.as_view(),
            &ud.as_view(),
            cs.k,
            &zd.as_view(),
            &td.as_view(),
            &mut vd.as_view_mut(),
        )
        .unwrap();
        assert_close(
            &format!("eval_forward v {sh:?}"),
            &down(&dev, &vd),
            &want,
            1e-4,
            1e-4,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn eval_backward_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda flow eval_backward") else {
        return;
    };
    let mut rng = Rng::fresh("cuda flow eval_backward");
    // On the emulator: every other shape (widths 32, 512, 160, 64, 288 and 64: 1, 2 and 4
    // column groups, partial tiles, depths 1 to 3).
    for sh in SHAPES
        .iter()
        .enumerate()
        .filter(|(i, _)| !dfpo::device::emulated() || i % 2 == 0)
        .map(|(_, sh)| sh)
    {
        let cs = case(&mut rng, sh);
        let (s, rows) = (cs.shape, cs.z.len());
        let dv = rng.normal_vec(rows, 1.0);
        let dp0 = rng.normal_vec(cs.params.len(), 1.0);
        let du0 = rng.normal_vec(cs.u.len(), 1.0);
        let dz0 = rng.normal_vec(rows, 1.0);
        let (mut dp_want, mut du_want, mut dz_want) = (dp0.clone(), du0.clone(), dz0.clone());
        cpu::eval_backward(
            &s,
            &cs.params,
            &cs.u,
            cs.k,
            &cs.z,
            &cs.tau,
            &dv,
            &mut dp_want,
            &mut du_want,
            Some(&mut dz_want),
        )
        .unwrap();
        let (pd, ud, zd, td, dvd) = (
            up(&dev, &cs.params),
            up(&dev, &cs.u),
            up(&dev, &cs.z),
            up(&dev, &cs.tau),
            up(&dev, &dv),
        );
        let (mut dpd, mut dud, mut dzd) = (up(&dev, &dp0), up(&dev, &du0), up(&dev, &dz0));
        cuda::eval_backward(
            &dev,
            &s,
            &pd.as_view(),
            &ud.as_view(),
            cs.k,
            &zd.as_view(),
            &td.as_view(),
            &dvd.as_view(),
            &mut dpd.as_view_mut(),
            &mut dud.as_view_mut(),
            Some(&mut dzd.as_view_mut()),
        )
        .unwrap();
        let dp = down(&dev, &dpd);
        let lay = s.layout();
        let mut blocks = vec![
            ("w_z", lay.w_z.clone()),
            ("w_t", lay.w_t.clone()),
            ("w_out", lay.w_out.clone()),
            ("b_out", lay.b_out.clone()),
        ];
        for (l, ll) in lay.layers.iter().enumerate() {
            for (name, r) in [
                ("W", ll.w.clone()),
                ("b", ll.b.clone()),
                ("gamma", Some(ll.gamma.clone())),
                ("beta", Some(ll.beta.clone())),
            ] {
                if let Some(r) = r {
                    blocks.push((Box::leak(format!("{name}_{l}").into_boxed_str()), r));
                }
            }
        }
        for (name, r) in blocks {
            assert_delta(
                &format!("eval_backward d{name} {sh:?}"),
                &dp[r.clone()],
                &dp_want[r.clone()],
                &dp0[r],
                1e-3,
            );
        }
        assert_eq!(
            &dp[..lay.w_z.start],
            &dp0[..lay.w_z.start],
            "w_cond and b_in untouched"
        );
        assert_delta(
            &format!("eval_backward du {sh:?}"),
            &down(&dev, &dud),
            &du_want,
            &du0,
            1e-3,
        );
        assert_delta(
            &format!("eval_backward dz {sh:?}"),
            &down(&dev, &dzd),
            &dz_want,
            &dz0,
            1e-3,
        );
        // without dz, run twice: bitwise deterministic
        let run = || {
            let (mut a, mut b) = (up(&dev, &dp0), up(&dev, &du0));
            cuda::eval_backward(
                &dev,
                &s,
                &pd.as_view(),
                &ud.as_view(),
                cs.k,
                &zd.as_view(),
                &td.as_view(),
                &dvd.as_view(),
                &mut a.as_view_mut(),
                &mut b.as_view_mut(),
                None,
            )
            .unwrap();
            (down(&dev, &a), down(&dev, &b))
        };
        let (a1, b1) = run();
        let (a2, b2) = run();
        assert!(a1 == a2 && b1 == b2, "eval_backward is deterministic");
        assert_eq!(a1, dp, "dz does not change dparams");
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn eval_backward_in_many_chunks_matches_cpu() {
    // the smallest workspace forces one token per chunk through the raw launcher
    let Some(dev) = cuda_for_test("cuda flow eval_backward chunks") else {
        return;
    };
    let mut rng = Rng::fresh("cuda flow eval_backward chunks");
    let cs = case(&mut rng, &(3, 64, 3, 23, 40));
    let (s, rows) = (cs.shape, cs.z.len());
    let dv = rng.normal_vec(rows, 1.0);
    let dp0 = rng.normal_vec(cs.params.len(), 1.0);
    let du0 = rng.normal_vec(cs.u.len(), 1.0);
    let (mut dp_want, mut du_want) = (dp0.clone(), du0.clone());
    cpu::eval_backward(
        &s,
        &cs.params,
        &cs.u,
        cs.k,
        &cs.z,
        &cs.tau,
        &dv,
        &mut dp_want,
        &mut du_want,
        None,
    )
    .unwrap();
    let (pd, ud, zd, td, dvd) = (
        up(&dev, &cs.params),
        up(&dev, &cs.u),
        up(&dev, &cs.z),
        up(&dev, &cs.tau),
        up(&dev, &dv),
    );
    let st = dev.stream();
    let min = cuda::eval_backward_min_workspace_len(&s, cs.k);
    for ws_len in [min, min + 3 * s.width * cs.k * 5] {
        let mut ws = poisoned(&dev, ws_len);
        let (mut dpd, mut dud) = (up(&dev, &dp0), up(&dev, &du0));
        {
            let (p, _a) = pd.device_ptr(st);
            let (u, _b) = ud.device_ptr(st);
            let (z, _c) = zd.device_ptr(st);
            let (t, _d) = td.device_ptr(st);
            let (g, _e) = dvd.device_ptr(st);
            let (dp, _f) = dpd.device_ptr_mut(st);
            let (du, _g) = dud.device_ptr_mut(st);
            let (w, _h) = ws.device_ptr_mut(st);
            // SAFETY: every buffer has the length the safe wrapper would check.
            unsafe {
                cuda::eval_backward_raw(&dev, &s, p, u, cs.k, z, t, g, dp, du, 0, cs.n, w, ws_len)
            }
            .unwrap();
            // too small a workspace is an error, not a fault
            let e = unsafe {
                cuda::eval_backward_raw(&dev, &s, p, u, cs.k, z, t, g, dp, du, 0, cs.n, w, min - 1)
            };
            assert!(matches!(e, Err(Error::Shape(_))), "{e:?}");
        }
        let dp = down(&dev, &dpd);
        let lay = s.layout();
        assert_delta(
            "chunked dparams",
            &dp[lay.w_z.start..],
            &dp_want[lay.w_z.start..],
            &dp0[lay.w_z.start..],
            1e-3,
        );
        assert_delta("chunked du", &down(&dev, &dud), &du_want, &du0, 1e-3);
    }
}

fn integrate_case(
    dev: &Arc<CudaDevice>,
    rng: &mut Rng,
    sh: &(usize, usize, usize, usize, usize),
    o: &IntegrateOpts,
    per_row: bool,
) {
    let cs = case(rng, sh);
    let rows = cs.z.len();
    let z0: Vec<f32> = cs.z.iter().map(|z| 1.5 * z).collect();
    let t0 = rng.uniform_vec(rows, 0.0, 0.3);
    let t1 = rng.uniform_vec(rows, 0.7, 1.0);
    let iv = if per_row {
        Interval::PerRow(&t0, &t1)
    } else {
        Interval::Uniform(0.1, 0.9)
    };
    let mut z_want = vec![0.0f32; rows];
    let mut j_want = vec![0.0f32; rows];
    cpu::integrate(
        &cs.shape,
        &cs.params,
        &cs.u,
        cs.k,
        &z0,
        iv,
        o,
        &mut z_want,
        o.jacobian.then_some(&mut j_want[..]),
    )
    .unwrap();
    let (pd, ud, zd, ad, bd) = (
        up(dev, &cs.params),
        up(dev, &cs.u),
        up(dev, &z0),
        up(dev, &t0),
        up(dev, &t1),
    );
    let (av, bv) = (ad.as_view(), bd.as_view());
    let div = if per_row {
        cuda::DeviceInterval::PerRow(&av, &bv)
    } else {
        cuda::DeviceInterval::Uniform(0.1, 0.9)
    };
    let mut z1d = poisoned(dev, rows);
    let mut jd = poisoned(dev, rows);
    let mut jv = jd.as_view_mut();
    cuda::integrate(
        dev,
        &cs.shape,
        &pd.as_view(),
        &ud.as_view(),
        cs.k,
        &zd.as_view(),
        div,
        o,
        &mut z1d.as_view_mut(),
        o.jacobian.then_some(&mut jv),
    )
    .unwrap();
    let what = format!("integrate {sh:?} {o:?} per_row={per_row}");
    let z1 = down(dev, &z1d);
    assert_close(&format!("{what} z1"), &z1, &z_want, 1e-3, 1e-4);
    if let Some((lo, hi)) = o.clip {
        assert!(
            z1.iter().all(|&z| z >= lo && z <= hi),
            "{what}: clip bounds"
        );
    }
    if o.jacobian {
        let j = down(dev, &jd);
        // A row that ends a step within rounding of a clip bound may clamp on one side only:
        // allow a few such J mismatches when clipping, never otherwise.
        let mut bad = 0;
        for r in 0..rows {
            let (g, w) = (j[r] as f64, j_want[r] as f64);
            assert!(!g.is_nan(), "{what}: J[{r}] never written");
            if (g - w).abs() > 2e-3 * (1.0 + w.abs()) {
                assert!(
                    o.clip.is_some() && (g == 0.0 || w == 0.0),
                    "{what}: J[{r}] {g} vs {w}"
                );
                bad += 1;
            }
        }
        assert!(
            bad <= 1 + rows / 200,
            "{what}: {bad} J mismatches at clip bounds"
        );
    } else {
        assert!(
            down(dev, &jd).iter().all(|x| x.is_nan()),
            "jac untouched without the flag"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn integrate_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda flow integrate") else {
        return;
    };
    let mut rng = Rng::fresh("cuda flow integrate");
    for (i, sh) in SHAPES.iter().enumerate() {
        for (si, solver) in [Solver::Euler, Solver::Midpoint].into_iter().enumerate() {
            for (ci, (steps, clip, jacobian)) in [
                (1u32, None, false),
                (4, None, true),
                (3, Some((-0.8f32, 1.1f32)), true),
                (2, Some((-0.5, 0.5)), false),
            ]
            .into_iter()
            .enumerate()
            {
                // On the emulator each shape runs a third of the (solver, options) pairs, in
                // rotation: every pair still runs on 4 of the 12 shapes (widths 32..512, so
                // 1, 2 and 4 column groups, partial tiles, depths 1..8).
                if dfpo::device::emulated() && (i + 2 * si + ci) % 3 != 0 {
                    continue;
                }
                let o = IntegrateOpts {
                    steps,
                    solver,
                    clip,
                    jacobian,
                };
                integrate_case(
                    &dev,
                    &mut rng,
                    sh,
                    &o,
                    (i + steps as usize).is_multiple_of(2),
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn raw_launchers_reject_bad_pointers_and_sizes() {
    let Some(dev) = cuda_for_test("cuda flow raw validation") else {
        return;
    };
    let s = FlowHeadShape::new(3, 32, 2).unwrap();
    let p = up(&dev, &dfpo::kernels::flow::init_params(&s, 1));
    let buf = up(&dev, &vec![0.0f32; 4096]);
    let st = dev.stream();
    let (pp, _a) = p.device_ptr(st);
    let (b, _b) = buf.device_ptr(st);
    let o = IntegrateOpts {
        steps: 1,
        solver: Solver::Euler,
        clip: None,
        jacobian: false,
    };
    let iv = cuda::RawInterval::Uniform(0.0, 1.0);
    // SAFETY: each call fails validation before launching anything.
    unsafe {
        assert!(
            matches!(
                cuda::eval_forward_raw(&dev, &s, pp + 4, b, 2, b, b, b, 3),
                Err(Error::Invalid(_))
            ),
            "misaligned params"
        );
        assert!(
            matches!(
                cuda::eval_forward_raw(&dev, &s, pp, 0, 2, b, b, b, 3),
                Err(Error::Invalid(_))
            ),
            "null u"
        );
        assert!(matches!(
            cuda::integrate_raw(
                &dev,
                &s,
                pp,
                b,
                2,
                b,
                iv,
                &IntegrateOpts { steps: 0, ..o },
                b,
                0,
                3
            ),
            Err(Error::Invalid(_))
        ));
        assert!(
            matches!(
                cuda::integrate_raw(&dev, &s, pp, b, 2, b, iv, &o, b, b, 3),
                Err(Error::Invalid(_))
            ),
            "jac without flag"
        );
        assert!(
            matches!(
                cuda::integrate_raw(&dev, &s, pp, b, 0, b, iv, &o, b, 0, 3),
                Err(Error::Invalid(_))
            ),
            "K = 0"
        );
        let need = cuda::cond_backward_workspace_len(&s, 3);
        assert!(matches!(
            cuda::cond_backward_raw(&dev, &s, pp, b, b, b, 0, 3, b, need - 1),
            Err(Error::Shape(_))
        ));
    }
    // safe wrappers check lengths
    let mut out = poisoned(&dev, 6);
    let short = up(&dev, &[0.0f32; 5]);
    let u = up(&dev, &vec![0.0f32; 64]);
    let e = cuda::eval_forward(
        &dev,
        &s,
        &p.as_view(),
        &u.as_view(),
        3,
        &short.as_view(),
        &short.as_view(),
        &mut out.as_view_mut(),
    );
    assert!(matches!(e, Err(Error::Shape(_))), "{e:?}");
    dev.synchronize().unwrap();
}
