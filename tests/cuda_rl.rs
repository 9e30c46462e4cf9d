//! CUDA parity for kernels/rl.cu against the f32 CPU references, on fresh random inputs with
//! every output pre-filled with NaN (POISON), so an element a kernel forgets to write fails.
//! Without a GPU every test prints a SKIPPED line (and fails under DFPO_REQUIRE_CUDA=1).

mod common;

use common::{assert_close, Rng, POISON};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use dfpo::device::{cuda_for_test, CudaDevice};
use dfpo::kernels::rl::{cpu, cuda, GaeParams, KlKind, PpoParams};
use dfpo::Error;

fn up(dev: &CudaDevice, x: &[f32]) -> CudaSlice<f32> {
    dev.stream().clone_htod(x).unwrap()
}

fn poisoned(dev: &CudaDevice, n: usize) -> CudaSlice<f32> {
    up(dev, &vec![POISON; n])
}

fn down(dev: &CudaDevice, x: &CudaSlice<f32>) -> Vec<f32> {
    let v = dev.stream().clone_dtoh(x).unwrap();
    dev.synchronize().unwrap();
    v
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// A [B][T] 0/1 mask mixing all padding, length 1, full, random right-padded lengths and holes.
fn mixed_mask(rng: &mut Rng, b: usize, t: usize) -> Vec<f32> {
    let mut m = vec![0.0f32; b * t];
    for bi in 0..b {
        let row = &mut m[bi * t..(bi + 1) * t];
        match bi % 5 {
            0 if b > 1 => {}
            1 => row[0] = 1.0,
            2 | 0 => row.fill(1.0),
            3 => {
                let len = (rng.next_u64() % (t as u64 + 1)) as usize;
                row[..len].fill(1.0);
            }
            _ => {
                for x in row.iter_mut() {
                    *x = if rng.uniform() < 0.7 { 1.0 } else { 0.0 };
                }
            }
        }
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Distributional GAE
// ---------------------------------------------------------------------------------------------

struct GaeOut {
    adv: Vec<f32>,
    ret: Vec<f32>,
    mean: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn gae_gpu(
    dev: &CudaDevice,
    v: &CudaSlice<f32>,
    r: &CudaSlice<f32>,
    m: &CudaSlice<f32>,
    b: usize,
    t: usize,
    k: usize,
    p: GaeParams,
) -> GaeOut {
    let mut adv = poisoned(dev, b * t * k);
    let mut ret = poisoned(dev, b * t * k);
    let mut mean = poisoned(dev, b * t);
    cuda::dist_gae(
        dev,
        &v.as_view(),
        &r.as_view(),
        &m.as_view(),
        b,
        t,
        k,
        p,
        &mut adv.as_view_mut(),
        &mut ret.as_view_mut(),
        &mut mean.as_view_mut(),
    )
    .unwrap();
    GaeOut {
        adv: down(dev, &adv),
        ret: down(dev, &ret),
        mean: down(dev, &mean),
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_dist_gae_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda_dist_gae_matches_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_dist_gae_matches_cpu");
    let shapes = [
        (1usize, 1usize, 1usize),
        (3, 37, 1),
        (5, 77, 33),
        (2, 300, 256),
        (1, 513, 32),
        (7, 1000, 3),
        (64, 512, 32),
    ];
    let params = [
        GaeParams::default(),
        GaeParams {
            gamma: 0.9,
            lambda: 0.7,
        },
        GaeParams {
            gamma: 1.0,
            lambda: 1.0,
        },
    ];
    for &(b, t, k) in &shapes {
        for p in params {
            let mask = mixed_mask(&mut rng, b, t);
            let mut values = rng.normal_vec(b * t * k, 1.0);
            let mut rewards = rng.normal_vec(b * t, 0.5);
            // Padding holds NaN: the kernel must never let it reach an output.
            for (row, &mv) in mask.iter().enumerate() {
                if mv == 0.0 {
                    rewards[row] = f32::NAN;
                    values[row * k..(row + 1) * k].fill(f32::NAN);
                }
            }
            let mut adv = vec![0.0f32; b * t * k];
            let mut ret = vec![0.0f32; b * t * k];
            let mut mean = vec![0.0f32; b * t];
            cpu::dist_gae(
                &values, &rewards, &mask, b, t, k, p, &mut adv, &mut ret, &mut mean,
            )
            .unwrap();
            let (v, r, m) = (up(&dev, &values), up(&dev, &rewards), up(&dev, &mask));
            let g = gae_gpu(&dev, &v, &r, &m, b, t, k, p);
            let what = format!("B={b} T={t} K={k} {p:?}");
            assert_close(&format!("adv {what}"), &g.adv, &adv, 1e-4, 2e-4);
            assert_close(&format!("ret {what}"), &g.ret, &ret, 1e-4, 2e-4);
            assert_close(&format!("adv_mean {what}"), &g.mean, &mean, 1e-4, 2e-4);
            // Padding is exactly 0.
            for (row, &mv) in mask.iter().enumerate() {
                if mv == 0.0 {
                    assert_eq!(g.mean[row], 0.0, "{what}: adv_mean[{row}] on padding");
                    assert!(g.adv[row * k..(row + 1) * k].iter().all(|&x| x == 0.0));
                    assert!(g.ret[row * k..(row + 1) * k].iter().all(|&x| x == 0.0));
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_dist_gae_is_deterministic() {
    let Some(dev) = cuda_for_test("cuda_dist_gae_is_deterministic") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_dist_gae_is_deterministic");
    let (b, t, k) = (64, 512, 32);
    let mask = mixed_mask(&mut rng, b, t);
    let (v, r, m) = (
        up(&dev, &rng.normal_vec(b * t * k, 1.0)),
        up(&dev, &rng.normal_vec(b * t, 1.0)),
        up(&dev, &mask),
    );
    let p = GaeParams::default();
    let g1 = gae_gpu(&dev, &v, &r, &m, b, t, k, p);
    let g2 = gae_gpu(&dev, &v, &r, &m, b, t, k, p);
    assert_eq!(bits(&g1.adv), bits(&g2.adv));
    assert_eq!(bits(&g1.ret), bits(&g2.ret));
    assert_eq!(bits(&g1.mean), bits(&g2.mean));
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_dist_gae_rejects_bad_input() {
    let Some(dev) = cuda_for_test("cuda_dist_gae_rejects_bad_input") else {
        return;
    };
    let (b, t, k) = (2, 5, 3);
    let v = poisoned(&dev, b * t * k);
    let r = poisoned(&dev, b * t);
    let short = poisoned(&dev, b * t - 1);
    let mut adv = poisoned(&dev, b * t * k);
    let mut ret = poisoned(&dev, b * t * k);
    let mut mean = poisoned(&dev, b * t);
    let p = GaeParams::default();
    let e = cuda::dist_gae(
        &dev,
        &v.as_view(),
        &r.as_view(),
        &short.as_view(),
        b,
        t,
        k,
        p,
        &mut adv.as_view_mut(),
        &mut ret.as_view_mut(),
        &mut mean.as_view_mut(),
    );
    assert!(
        matches!(e, Err(Error::Shape(ref s)) if s.contains("mask")),
        "{e:?}"
    );
    let e = cuda::dist_gae(
        &dev,
        &v.as_view(),
        &r.as_view(),
        &r.as_view(),
        b,
        t,
        k,
        GaeParams {
            gamma: 2.0,
            lambda: 0.9,
        },
        &mut adv.as_view_mut(),
        &mut ret.as_view_mut(),
        &mut mean.as_view_mut(),
    );
    assert!(
        matches!(e, Err(Error::Invalid(ref s)) if s.contains("gamma")),
        "{e:?}"
    );
    // Raw: a null pointer is refused before any launch.
    let e = unsafe { cuda::dist_gae_raw(&dev, 0, 4, 4, b, t, k, p, 4, 4, 4) };
    assert!(
        matches!(e, Err(Error::Invalid(ref s)) if s.contains("values")),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Whitening
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_whiten_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda_whiten_matches_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_whiten_matches_cpu");
    for &(n, loc, scale) in &[
        (2usize, 0.0, 1.0),
        (3, 1.0, 2.0),
        (1000, 3.0, 0.5),
        (32768, -2.0, 1.0),
        (100_003, 0.0, 10.0),
        (5_000_000, 0.5, 1.0), // more than 1024 partial blocks' worth: the capped grid
    ] {
        let mut mask: Vec<f32> = (0..n)
            .map(|_| if rng.uniform() < 0.7 { 1.0 } else { 0.0 })
            .collect();
        mask[0] = 1.0;
        mask[n - 1] = 1.0;
        let mut x: Vec<f32> = (0..n)
            .map(|_| (loc + scale * rng.normal()) as f32)
            .collect();
        for (xi, &m) in x.iter_mut().zip(&mask) {
            if m == 0.0 {
                *xi = f32::NAN;
            }
        }
        let mut want = vec![0.0f32; n];
        let (mu, sigma) = cpu::whiten(&x, &mask, &mut want).unwrap();
        let (xd, md) = (up(&dev, &x), up(&dev, &mask));
        let mut out = poisoned(&dev, n);
        let (gmu, gsigma) =
            cuda::whiten(&dev, &xd.as_view(), &md.as_view(), &mut out.as_view_mut()).unwrap();
        let got = down(&dev, &out);
        assert_close(&format!("whiten n={n}"), &got, &want, 1e-5, 1e-5);
        assert_close(
            &format!("whiten (μ, σ) n={n}"),
            &[gmu, gsigma],
            &[mu, sigma],
            1e-6,
            1e-7,
        );

        // Stats left on the device, and determinism.
        let mut out2 = poisoned(&dev, n);
        let mut stats = poisoned(&dev, 2);
        cuda::whiten_into(
            &dev,
            &xd.as_view(),
            &md.as_view(),
            &mut out2.as_view_mut(),
            &mut stats.as_view_mut(),
        )
        .unwrap();
        assert_eq!(bits(&down(&dev, &out2)), bits(&got), "n={n}: rerun differs");
        assert_eq!(bits(&down(&dev, &stats)), bits(&[gmu, gsigma]));
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_whiten_in_place_raw() {
    let Some(dev) = cuda_for_test("cuda_whiten_in_place_raw") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_whiten_in_place_raw");
    let n = 70_001;
    let x = rng.normal_vec(n, 3.0);
    let mask: Vec<f32> = (0..n).map(|i| (i % 3 != 0) as u8 as f32).collect();
    let mut want = vec![0.0f32; n];
    let (mu, sigma) = cpu::whiten(&x, &mask, &mut want).unwrap();
    let mut xd = up(&dev, &x);
    let md = up(&dev, &mask);
    let mut stats = poisoned(&dev, 2);
    let mut ws = dev
        .stream()
        .alloc_zeros::<f64>(cuda::whiten_workspace_len(n))
        .unwrap();
    {
        let s = dev.stream();
        let (xp, _gx) = xd.device_ptr_mut(s);
        let (mp, _gm) = md.device_ptr(s);
        let (sp, _gs) = stats.device_ptr_mut(s);
        let (wp, _gw) = ws.device_ptr_mut(s);
        unsafe { cuda::whiten_raw(&dev, xp, mp, xp, n, sp, wp) }.unwrap();
    }
    assert_close("whiten in place", &down(&dev, &xd), &want, 1e-5, 1e-5);
    assert_close(
        "whiten raw stats",
        &down(&dev, &stats),
        &[mu, sigma],
        1e-6,
        1e-7,
    );
    let g = cuda::reduce_blocks(n);
    let fin = dev
        .stream()
        .clone_dtoh(&ws.slice(3 * g..3 * g + 4))
        .unwrap();
    dev.synchronize().unwrap();
    let n_valid = mask.iter().filter(|&&m| m != 0.0).count();
    assert_eq!(fin[2], n_valid as f64, "valid-token count in the workspace");
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_whiten_fewer_than_two_valid_tokens() {
    let Some(dev) = cuda_for_test("cuda_whiten_fewer_than_two_valid_tokens") else {
        return;
    };
    for mask in [vec![0.0f32; 5], vec![0.0, 0.0, 1.0, 0.0, 0.0]] {
        let xd = up(&dev, &[1.0, 2.0, 3.0, 4.0, 5.0]);
        let md = up(&dev, &mask);
        let mut out = poisoned(&dev, 5);
        let e = cuda::whiten(&dev, &xd.as_view(), &md.as_view(), &mut out.as_view_mut());
        assert!(
            matches!(e, Err(Error::Invalid(ref s)) if s.contains("valid")),
            "{e:?}"
        );
        let mut out = poisoned(&dev, 5);
        let mut stats = poisoned(&dev, 2);
        cuda::whiten_into(
            &dev,
            &xd.as_view(),
            &md.as_view(),
            &mut out.as_view_mut(),
            &mut stats.as_view_mut(),
        )
        .unwrap();
        assert_eq!(down(&dev, &out), vec![0.0; 5]);
        assert!(down(&dev, &stats).iter().all(|v| v.is_nan()));
    }
    let xd = poisoned(&dev, 4);
    let md = poisoned(&dev, 3);
    let mut out = poisoned(&dev, 4);
    let e = cuda::whiten(&dev, &xd.as_view(), &md.as_view(), &mut out.as_view_mut());
    assert!(
        matches!(e, Err(Error::Shape(ref s)) if s.contains("mask")),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// PPO policy loss
// ---------------------------------------------------------------------------------------------

/// Random PPO inputs (f32) whose ratio stays 1e-3 away from both clip bounds, so float
/// differences between exp implementations cannot flip a clip decision.
fn ppo_inputs(rng: &mut Rng, n: usize, p: PpoParams) -> [Vec<f32>; 4] {
    let (lo, hi) = (1.0 - p.clip_low, 1.0 + p.clip_high);
    let (mut logp, mut old) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let o = rng.range(-6.0, -0.05) as f32;
        loop {
            let l = o + rng.range(-0.6, 0.6) as f32;
            let r = (l - o).exp();
            if (r - lo).abs() > 1e-3 && (r - hi).abs() > 1e-3 {
                logp.push(l);
                break;
            }
        }
        old.push(o);
    }
    let adv = rng.normal_vec(n, 1.0);
    let mask = (0..n)
        .map(|_| if rng.uniform() < 0.8 { 1.0 } else { 0.0 })
        .collect();
    [logp, old, adv, mask]
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_ppo_policy_loss_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda_ppo_policy_loss_matches_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_ppo_policy_loss_matches_cpu");
    let p = PpoParams {
        clip_low: 0.2,
        clip_high: 0.28,
    };
    for &n in &[1usize, 1000, 32768, 100_003] {
        let [logp, old, adv, mut mask] = ppo_inputs(&mut rng, n, p);
        mask[0] = 1.0;
        let (mut lt, mut g) = (vec![0.0f32; n], vec![0.0f32; n]);
        let st = cpu::ppo_policy_loss(&logp, &old, &adv, &mask, p, &mut lt, &mut g).unwrap();
        let (ld, od, ad, md) = (
            up(&dev, &logp),
            up(&dev, &old),
            up(&dev, &adv),
            up(&dev, &mask),
        );
        let mut glt = poisoned(&dev, n);
        let mut gg = poisoned(&dev, n);
        let gst = cuda::ppo_policy_loss(
            &dev,
            &ld.as_view(),
            &od.as_view(),
            &ad.as_view(),
            &md.as_view(),
            p,
            &mut glt.as_view_mut(),
            &mut gg.as_view_mut(),
        )
        .unwrap();
        assert_close(
            &format!("ppo loss_tok n={n}"),
            &down(&dev, &glt),
            &lt,
            1e-5,
            1e-6,
        );
        let gmax = g.iter().fold(0.0f32, |a, &v| a.max(v.abs())) as f64;
        assert_close(
            &format!("ppo grad n={n}"),
            &down(&dev, &gg),
            &g,
            1e-5,
            1e-6 * gmax,
        );
        assert_eq!(gst.n_valid, st.n_valid, "n={n}");
        assert_eq!(gst.clipfrac, st.clipfrac, "n={n}: clip decisions differ");
        assert_close(
            &format!("ppo (loss, approx_kl) n={n}"),
            &[gst.loss, gst.approx_kl],
            &[st.loss, st.approx_kl],
            1e-5,
            1e-6,
        );
    }
    // No valid token: zeros everywhere.
    let n = 7;
    let nan = up(&dev, &[f32::NAN; 7]);
    let md = up(&dev, &[0.0; 7]);
    let mut glt = poisoned(&dev, n);
    let mut gg = poisoned(&dev, n);
    let gst = cuda::ppo_policy_loss(
        &dev,
        &nan.as_view(),
        &nan.as_view(),
        &nan.as_view(),
        &md.as_view(),
        p,
        &mut glt.as_view_mut(),
        &mut gg.as_view_mut(),
    )
    .unwrap();
    assert_eq!(
        (gst.loss, gst.clipfrac, gst.approx_kl, gst.n_valid),
        (0.0, 0.0, 0.0, 0.0)
    );
    assert_eq!(down(&dev, &glt), vec![0.0; n]);
    assert_eq!(down(&dev, &gg), vec![0.0; n]);
    // Bad input.
    let mut short = poisoned(&dev, n - 1);
    let e = cuda::ppo_policy_loss(
        &dev,
        &nan.as_view(),
        &nan.as_view(),
        &nan.as_view(),
        &md.as_view(),
        p,
        &mut glt.as_view_mut(),
        &mut short.as_view_mut(),
    );
    assert!(
        matches!(e, Err(Error::Shape(ref s)) if s.contains("grad")),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// KL penalty
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_kl_penalty_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda_kl_penalty_matches_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_kl_penalty_matches_cpu");
    for &n in &[1usize, 1000, 100_003] {
        let logp: Vec<f32> = (0..n).map(|_| rng.range(-8.0, -0.01) as f32).collect();
        let refp: Vec<f32> = logp
            .iter()
            .map(|&l| l + rng.range(-2.0, 2.0) as f32)
            .collect();
        let mut mask: Vec<f32> = (0..n)
            .map(|_| if rng.uniform() < 0.8 { 1.0 } else { 0.0 })
            .collect();
        mask[0] = 1.0;
        let (ld, rd, md) = (up(&dev, &logp), up(&dev, &refp), up(&dev, &mask));
        for kind in [KlKind::K1, KlKind::K3] {
            let (mut v, mut g) = (vec![0.0f32; n], vec![0.0f32; n]);
            cpu::kl_penalty(&logp, &refp, &mask, kind, &mut v, Some(&mut g)).unwrap();
            let mut gv = poisoned(&dev, n);
            let mut gg = poisoned(&dev, n);
            cuda::kl_penalty(
                &dev,
                &ld.as_view(),
                &rd.as_view(),
                &md.as_view(),
                kind,
                &mut gv.as_view_mut(),
                Some(&mut gg.as_view_mut()),
            )
            .unwrap();
            assert_close(
                &format!("kl {kind:?} n={n}"),
                &down(&dev, &gv),
                &v,
                1e-5,
                1e-6,
            );
            assert_close(
                &format!("kl grad {kind:?} n={n}"),
                &down(&dev, &gg),
                &g,
                1e-5,
                1e-6,
            );
            // Without a gradient buffer.
            let mut gv2 = poisoned(&dev, n);
            cuda::kl_penalty(
                &dev,
                &ld.as_view(),
                &rd.as_view(),
                &md.as_view(),
                kind,
                &mut gv2.as_view_mut(),
                None,
            )
            .unwrap();
            assert_close(
                &format!("kl {kind:?} no grad n={n}"),
                &down(&dev, &gv2),
                &v,
                1e-5,
                1e-6,
            );
        }
        let mut gv = poisoned(&dev, n);
        let mut short = poisoned(&dev, n + 1);
        let e = cuda::kl_penalty(
            &dev,
            &ld.as_view(),
            &rd.as_view(),
            &md.as_view(),
            KlKind::K3,
            &mut gv.as_view_mut(),
            Some(&mut short.as_view_mut()),
        );
        assert!(
            matches!(e, Err(Error::Shape(ref s)) if s.contains("grad")),
            "{e:?}"
        );
    }
}
