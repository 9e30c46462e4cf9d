//! CUDA parity for kernels/norm.cu, rope.cu, act.cu and embed.cu against the f32 CPU references
//! computed from the same bf16-rounded inputs, on fresh random inputs. Outputs that a kernel
//! writes are pre-filled with NaN (POISON, or the bf16 NaN 0x7FC0); outputs that it accumulates
//! into (`+=`) are pre-filled with random values, so a skipped element keeps a wrong value; RoPE
//! works in place, and its inputs change under the rotation.
//!
//! Tolerances (bf16 = 8 significant bits): a kernel output rounded once from fp32 is within half
//! a bf16 ulp (≤ 2⁻⁸ relative) of the fp32 reference plus fp32 noise from a different summation
//! order, so bf16 outputs use `rtol = 2⁻⁷` (one ulp) and a small `atol` for values near 0 where
//! fp32 cancellation dominates; fp32 outputs (rstd, dw, dtable) use fp32-sized tolerances scaled
//! by the sum of absolute terms where they are sums.
//!
//! Every test is `#[ignore]`d (there is no GPU on the build machines) and also checks for a device
//! at run time: `cargo test --release --test cuda_layers -- --include-ignored` runs them on a GPU
//! machine, where `DFPO_REQUIRE_CUDA=1` turns a missing device into a failure.

mod common;

use common::{assert_close, Rng, POISON};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use dfpo::device::{cuda_for_test, CudaDevice};
use dfpo::kernels::{act, embed, norm, rope};
use dfpo::Error;

/// One bf16 ulp, relative: the bound for a bf16 output rounded once from fp32.
const BF_RTOL: f64 = 1.0 / 128.0;
/// bf16 quiet NaN: the poison of bf16 outputs.
const BF_NAN: u16 = 0x7FC0;
const EPS: f32 = 1e-6;

fn bf(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}
fn unbf(b: u16) -> f32 {
    half::bf16::from_bits(b).to_f32()
}
fn to_bf(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf(x)).collect()
}
fn from_bf(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| unbf(b)).collect()
}
/// The values a bf16 tensor can hold: the CPU reference runs on these.
fn rounded(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| unbf(bf(x))).collect()
}

fn up<T: cudarc::driver::DeviceRepr>(dev: &CudaDevice, x: &[T]) -> CudaSlice<T> {
    dev.stream().clone_htod(x).unwrap()
}
/// Uploads bf16(v) after `off` padding elements (use `.slice(off..)`: an odd `off` misaligns
/// the view and forces the kernels' scalar path).
fn up_bf(dev: &CudaDevice, v: &[f32], off: usize) -> CudaSlice<u16> {
    let mut h = vec![0u16; off];
    h.extend(to_bf(v));
    up(dev, &h)
}
fn poisoned_bf(dev: &CudaDevice, n: usize, off: usize) -> CudaSlice<u16> {
    up(dev, &vec![BF_NAN; off + n])
}
fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
) -> Vec<T> {
    let v = dev.stream().clone_dtoh(x).unwrap();
    dev.synchronize().unwrap();
    v
}
fn down_bf(dev: &CudaDevice, x: &CudaSlice<u16>, off: usize) -> Vec<f32> {
    from_bf(&down(dev, x)[off..])
}

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

/// (n, d, offset): widths 64, 896, 4864 and odd-ish ones; n not a multiple of the 8 rows of a
/// block; offset 1 misaligns every view (scalar path) at widths that would vectorise.
const NORM_SHAPES: &[(usize, usize, usize)] = &[
    (1, 64, 0),
    (13, 896, 0),
    (1000, 896, 0),
    (37, 4864, 0),
    (129, 80, 0),
    (77, 136, 0),
    (33, 100, 0),
    (5, 37, 0),
    (3, 1, 0),
    (301, 2048, 0),
    (21, 896, 1),
    (9, 4864, 1),
    (600, 64, 0),
];

struct NormIn {
    x: Vec<f32>,
    w: Vec<f32>,
    dy: Vec<f32>,
    dx0: Vec<f32>,
    dw0: Vec<f32>,
}

fn norm_inputs(rng: &mut Rng, n: usize, d: usize) -> NormIn {
    NormIn {
        x: rounded(&rng.normal_vec(n * d, 1.0)),
        w: rounded(
            &(0..d)
                .map(|_| (1.0 + 0.3 * rng.normal()) as f32)
                .collect::<Vec<_>>(),
        ),
        dy: rounded(&rng.normal_vec(n * d, 1.0)),
        dx0: rounded(&rng.normal_vec(n * d, 1.0)),
        dw0: rng.normal_vec(d, 1.0),
    }
}

/// atol for dw: fp32 sums over n rows in different orders differ by a few ulps of Σ|terms|.
fn dw_atol(x: &[f32], dy: &[f32], rstd: &[f32], n: usize, d: usize) -> f64 {
    let mut s = vec![0.0f64; d];
    for r in 0..n {
        for j in 0..d {
            s[j] += (dy[r * d + j] as f64 * x[r * d + j] as f64 * rstd[r] as f64).abs();
        }
    }
    2e-5 * s.iter().cloned().fold(0.0, f64::max) + 1e-6
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_rmsnorm_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda_rmsnorm_matches_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_rmsnorm_matches_cpu");
    for &(n, d, off) in NORM_SHAPES {
        let what = format!("rmsnorm n={n} d={d} off={off}");
        let a = norm_inputs(&mut rng, n, d);
        // Forward.
        let (mut y_ref, mut r_ref) = (vec![0.0f32; n * d], vec![0.0f32; n]);
        norm::cpu::rmsnorm_fwd(&a.x, &a.w, n, d, EPS, &mut y_ref, &mut r_ref).unwrap();
        let (xd, wd) = (up_bf(&dev, &a.x, off), up_bf(&dev, &a.w, off));
        let mut yd = poisoned_bf(&dev, n * d, off);
        let mut rd = up(&dev, &vec![POISON; n]);
        norm::cuda::rmsnorm_fwd(
            &dev,
            &xd.slice(off..),
            &wd.slice(off..),
            n,
            d,
            EPS,
            &mut yd.slice_mut(off..),
            &mut rd.as_view_mut(),
        )
        .unwrap();
        assert_close(
            &format!("{what} y"),
            &down_bf(&dev, &yd, off),
            &y_ref,
            BF_RTOL,
            1e-6,
        );
        assert_close(&format!("{what} rstd"), &down(&dev, &rd), &r_ref, 1e-5, 0.0);

        // Backward, twice from the same state: identical bits (deterministic dw).
        let (mut dx_ref, mut dw_ref) = (a.dx0.clone(), a.dw0.clone());
        norm::cpu::rmsnorm_bwd(&a.x, &a.w, &r_ref, &a.dy, n, d, &mut dx_ref, &mut dw_ref).unwrap();
        let (rstd_d, dyd) = (up(&dev, &r_ref), up_bf(&dev, &a.dy, off));
        let mut runs = Vec::new();
        for _ in 0..2 {
            let mut dxd = up_bf(&dev, &a.dx0, off);
            let mut dwd = up(&dev, &a.dw0);
            norm::cuda::rmsnorm_bwd(
                &dev,
                &xd.slice(off..),
                &wd.slice(off..),
                &rstd_d.as_view(),
                &dyd.slice(off..),
                n,
                d,
                &mut dxd.slice_mut(off..),
                &mut dwd.as_view_mut(),
            )
            .unwrap();
            runs.push((down(&dev, &dxd), down(&dev, &dwd)));
        }
        let (dx, dw) = (&runs[0].0, &runs[0].1);
        assert_close(
            &format!("{what} dx"),
            &from_bf(&dx[off..]),
            &dx_ref,
            BF_RTOL,
            1e-4,
        );
        let atol = dw_atol(&a.x, &a.dy, &r_ref, n, d);
        assert_close(&format!("{what} dw"), dw, &dw_ref, 1e-5, atol);
        assert_eq!(runs[0].0, runs[1].0, "{what}: dx differs between runs");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&runs[0].1),
            bits(&runs[1].1),
            "{what}: dw differs between runs"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_add_rmsnorm_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda_add_rmsnorm_matches_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_add_rmsnorm_matches_cpu");
    for (case, &(n, d, off)) in NORM_SHAPES.iter().enumerate() {
        let what = format!("add_rmsnorm n={n} d={d} off={off}");
        let a = norm_inputs(&mut rng, n, d);
        let res = rounded(&rng.normal_vec(n * d, 2.0));
        // h = bf16(x + residual): the fp32 sum of two bf16 values rounded once, on both sides.
        let h_f32: Vec<f32> = a.x.iter().zip(&res).map(|(p, q)| p + q).collect();
        let h_bf = rounded(&h_f32);
        // The kernel normalises the rounded h (module doc), so the reference does too.
        let (mut y_ref, mut r_ref) = (vec![0.0f32; n * d], vec![0.0f32; n]);
        norm::cpu::rmsnorm_fwd(&h_bf, &a.w, n, d, EPS, &mut y_ref, &mut r_ref).unwrap();

        let (xd, rsd, wd) = (
            up_bf(&dev, &a.x, off),
            up_bf(&dev, &res, off),
            up_bf(&dev, &a.w, off),
        );
        let mut hd = poisoned_bf(&dev, n * d, off);
        let mut yd = poisoned_bf(&dev, n * d, off);
        let mut rd = up(&dev, &vec![POISON; n]);
        norm::cuda::add_rmsnorm_fwd(
            &dev,
            &xd.slice(off..),
            &rsd.slice(off..),
            &wd.slice(off..),
            n,
            d,
            EPS,
            &mut hd.slice_mut(off..),
            &mut yd.slice_mut(off..),
            &mut rd.as_view_mut(),
        )
        .unwrap();
        assert_eq!(
            down(&dev, &hd)[off..],
            to_bf(&h_f32)[..],
            "{what}: h is not bf16(x + residual)"
        );
        assert_close(
            &format!("{what} y"),
            &down_bf(&dev, &yd, off),
            &y_ref,
            BF_RTOL,
            1e-6,
        );
        assert_close(&format!("{what} rstd"), &down(&dev, &rd), &r_ref, 1e-5, 0.0);

        // Backward, with and without an upstream dh (alternating over the shapes).
        let with_dh = case % 2 == 0;
        let dh = rounded(&rng.normal_vec(n * d, 1.0));
        let dr0 = rounded(&rng.normal_vec(n * d, 1.0));
        let (mut dx_ref, mut dr_ref, mut dw_ref) = (a.dx0.clone(), dr0.clone(), a.dw0.clone());
        norm::cpu::add_rmsnorm_bwd(
            &h_bf,
            &a.w,
            &r_ref,
            &a.dy,
            with_dh.then_some(&dh[..]),
            n,
            d,
            &mut dx_ref,
            &mut dr_ref,
            &mut dw_ref,
        )
        .unwrap();
        let (rstd_d, dyd, dhd) = (
            up(&dev, &r_ref),
            up_bf(&dev, &a.dy, off),
            up_bf(&dev, &dh, off),
        );
        let mut dxd = up_bf(&dev, &a.dx0, off);
        let mut drd = up_bf(&dev, &dr0, off);
        let mut dwd = up(&dev, &a.dw0);
        let dh_view = dhd.slice(off..);
        norm::cuda::add_rmsnorm_bwd(
            &dev,
            &hd.slice(off..),
            &wd.slice(off..),
            &rstd_d.as_view(),
            &dyd.slice(off..),
            with_dh.then_some(&dh_view),
            n,
            d,
            &mut dxd.slice_mut(off..),
            &mut drd.slice_mut(off..),
            &mut dwd.as_view_mut(),
        )
        .unwrap();
        assert_close(
            &format!("{what} dx"),
            &down_bf(&dev, &dxd, off),
            &dx_ref,
            BF_RTOL,
            1e-4,
        );
        assert_close(
            &format!("{what} dres"),
            &down_bf(&dev, &drd, off),
            &dr_ref,
            BF_RTOL,
            1e-4,
        );
        let atol = dw_atol(&h_bf, &a.dy, &r_ref, n, d);
        assert_close(
            &format!("{what} dw"),
            &down(&dev, &dwd),
            &dw_ref,
            1e-5,
            atol,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------------

/// (n, hq, hkv, head_dim, theta): Qwen2-0.5B (14/2 heads of 64), Llama (128), 256, head dims
/// whose half is a multiple of 8 (80), even (136) and odd (6), and one of q / k absent.
const ROPE_SHAPES: &[(usize, usize, usize, usize, f32)] = &[
    (1, 14, 2, 64, 1_000_000.0),
    (1000, 14, 2, 64, 1_000_000.0),
    (77, 4, 1, 128, 500_000.0),
    (33, 2, 2, 256, 10_000.0),
    (9, 3, 1, 80, 10_000.0),
    (9, 3, 1, 136, 10_000.0),
    (5, 2, 1, 6, 10_000.0),
    (11, 0, 2, 64, 10_000.0),
    (11, 3, 0, 64, 10_000.0),
];

/// Compares a rotated bf16 tensor with the f32 reference: within one bf16 ulp everywhere and,
/// since both sides use the same cos/sin and fp32 products, equal to bf16(reference) almost
/// everywhere (a cos/sin or pow evaluated in double may round differently once in ~10⁸).
fn check_rotated(what: &str, got: &[u16], want: &[f32]) {
    assert_close(what, &from_bf(got), want, BF_RTOL, 1e-6);
    let exact = got.iter().zip(want).filter(|(&g, &w)| g == bf(w)).count();
    assert!(
        exact as f64 >= 0.999 * got.len() as f64,
        "{what}: only {exact} of {} elements equal bf16(reference)",
        got.len()
    );
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_rope_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda_rope_matches_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_rope_matches_cpu");
    for &(n, hq, hkv, dh, theta) in ROPE_SHAPES {
        let what = format!("rope n={n} hq={hq} hkv={hkv} D={dh} theta={theta}");
        // Positions up to 128k (long-context Qwen2.5), some 0 (identity).
        let pos: Vec<i32> = (0..n)
            .map(|t| {
                if t % 7 == 3 {
                    0
                } else {
                    (rng.next_u64() % 131072) as i32
                }
            })
            .collect();
        let posd = up(&dev, &pos);
        for inverse in [false, true] {
            let q = rounded(&rng.normal_vec(n * hq * dh, 1.0));
            let k = rounded(&rng.normal_vec(n * hkv * dh, 1.0));
            let (mut q_ref, mut k_ref) = (q.clone(), k.clone());
            let mut qd = up(
                &dev,
                &to_bf(&q).iter().copied().chain([0u16]).collect::<Vec<_>>(),
            );
            let mut kd = up(
                &dev,
                &to_bf(&k).iter().copied().chain([0u16]).collect::<Vec<_>>(),
            );
            let (lq, lk) = (q.len(), k.len());
            if inverse {
                rope::cpu::rope_bwd(&mut q_ref, &mut k_ref, &pos, n, hq, hkv, dh, theta).unwrap();
                rope::cuda::rope_bwd(
                    &dev,
                    &mut qd.slice_mut(..lq),
                    &mut kd.slice_mut(..lk),
                    &posd.as_view(),
                    n,
                    hq,
                    hkv,
                    dh,
                    theta,
                )
                .unwrap();
            } else {
                rope::cpu::rope_fwd(&mut q_ref, &mut k_ref, &pos, n, hq, hkv, dh, theta).unwrap();
                rope::cuda::rope_fwd(
                    &dev,
                    &mut qd.slice_mut(..lq),
                    &mut kd.slice_mut(..lk),
                    &posd.as_view(),
                    n,
                    hq,
                    hkv,
                    dh,
                    theta,
                )
                .unwrap();
            }
            let tag = if inverse { "bwd" } else { "fwd" };
            let (qg, kg) = (down(&dev, &qd), down(&dev, &kd));
            check_rotated(&format!("{what} {tag} q"), &qg[..lq], &q_ref);
            check_rotated(&format!("{what} {tag} k"), &kg[..lk], &k_ref);
            // The guard element after each tensor is untouched.
            assert_eq!((qg[lq], kg[lk]), (0, 0), "{what} {tag}: wrote past the end");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_rope_on_fused_qkv_rows() {
    let Some(dev) = cuda_for_test("cuda_rope_on_fused_qkv_rows") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_rope_on_fused_qkv_rows");
    // q and k as strided views into one [n][(hq + 2·hkv)·D] buffer; v must stay untouched.
    for &(n, hq, hkv, dh) in &[
        (257usize, 14usize, 2usize, 64usize),
        (31, 4, 2, 136),
        (7, 2, 1, 6),
    ] {
        let what = format!("fused qkv n={n} hq={hq} hkv={hkv} D={dh}");
        let row = (hq + 2 * hkv) * dh;
        let qkv = rounded(&rng.normal_vec(n * row, 1.0));
        let pos: Vec<i32> = (0..n).map(|_| (rng.next_u64() % 32768) as i32).collect();
        let theta = 1_000_000.0f32;
        let mut q_ref: Vec<f32> = (0..n)
            .flat_map(|t| qkv[t * row..t * row + hq * dh].to_vec())
            .collect();
        let mut k_ref: Vec<f32> = (0..n)
            .flat_map(|t| qkv[t * row + hq * dh..t * row + (hq + hkv) * dh].to_vec())
            .collect();
        rope::cpu::rope_fwd(&mut q_ref, &mut k_ref, &pos, n, hq, hkv, dh, theta).unwrap();
        let mut buf = up_bf(&dev, &qkv, 0);
        let posd = up(&dev, &pos);
        {
            let s = dev.stream();
            let (base, _g1) = buf.device_ptr_mut(s);
            let (pp, _g2) = posd.device_ptr(s);
            // SAFETY: the strided rows lie inside `buf`; q and k regions are disjoint.
            unsafe {
                rope::cuda::rope_fwd_raw(
                    &dev,
                    base,
                    base + 2 * (hq * dh) as u64,
                    pp,
                    n,
                    hq,
                    hkv,
                    dh,
                    row,
                    row,
                    theta,
                )
                .unwrap();
            }
        }
        let got = down(&dev, &buf);
        let want_bits = to_bf(&qkv);
        let (mut gq, mut gk) = (Vec::new(), Vec::new());
        for t in 0..n {
            gq.extend_from_slice(&got[t * row..t * row + hq * dh]);
            gk.extend_from_slice(&got[t * row + hq * dh..t * row + (hq + hkv) * dh]);
            assert_eq!(
                got[t * row + (hq + hkv) * dh..(t + 1) * row],
                want_bits[t * row + (hq + hkv) * dh..(t + 1) * row],
                "{what}: v of token {t} changed"
            );
        }
        check_rotated(&format!("{what} q"), &gq, &q_ref);
        check_rotated(&format!("{what} k"), &gk, &k_ref);
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_swiglu_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda_swiglu_matches_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_swiglu_matches_cpu");
    for &(n, inter, off) in &[
        (1usize, 64usize, 0usize),
        (7, 896, 0),
        (1000, 4864, 0),
        (129, 80, 0),
        (77, 136, 0),
        (33, 100, 0),
        (5, 37, 0),
        (41, 4864, 1),
    ] {
        let what = format!("swiglu n={n} I={inter} off={off}");
        let mut gu = rng.normal_vec(n * 2 * inter, 2.0);
        if gu.len() > 4 {
            gu[0] = -120.0; // e^−g overflows in fp32: silu must be a clean −0
            gu[1] = 90.0;
        }
        let gu = rounded(&gu);
        let mut out_ref = vec![0.0f32; n * inter];
        act::cpu::swiglu_fwd(&gu, n, inter, &mut out_ref).unwrap();
        let gud = up_bf(&dev, &gu, off);
        let mut outd = poisoned_bf(&dev, n * inter, off);
        act::cuda::swiglu_fwd(
            &dev,
            &gud.slice(off..),
            n,
            inter,
            &mut outd.slice_mut(off..),
        )
        .unwrap();
        assert_close(
            &format!("{what} out"),
            &down_bf(&dev, &outd, off),
            &out_ref,
            BF_RTOL,
            1e-6,
        );

        let dout = rounded(&rng.normal_vec(n * inter, 1.0));
        let d0 = rounded(&rng.normal_vec(n * 2 * inter, 1.0));
        let mut dgu_ref = d0.clone();
        act::cpu::swiglu_bwd(&gu, &dout, n, inter, &mut dgu_ref).unwrap();
        let doutd = up_bf(&dev, &dout, off);
        let mut dgud = up_bf(&dev, &d0, off);
        act::cuda::swiglu_bwd(
            &dev,
            &gud.slice(off..),
            &doutd.slice(off..),
            n,
            inter,
            &mut dgud.slice_mut(off..),
        )
        .unwrap();
        assert_close(
            &format!("{what} dgu"),
            &down_bf(&dev, &dgud, off),
            &dgu_ref,
            BF_RTOL,
            1e-5,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding
// ---------------------------------------------------------------------------------------------

/// n ids over a vocabulary of v: a padding id (0) on ~40% of tokens when `skewed` (so it is
/// split over many work items), a few hot ids, the rest uniform.
fn make_ids(rng: &mut Rng, n: usize, v: usize, skewed: bool) -> Vec<u32> {
    (0..n)
        .map(|_| {
            let u = rng.uniform();
            if skewed && u < 0.4 {
                0
            } else if u < 0.6 {
                (rng.next_u64() % 5.min(v as u64)) as u32
            } else {
                (rng.next_u64() % v as u64) as u32
            }
        })
        .collect()
}

const EMBED_SHAPES: &[(usize, usize, usize, bool)] = &[
    (1, 10, 64, false),
    (1000, 5000, 896, true),
    (77, 300, 80, false),
    (129, 1000, 136, true),
    (33, 50, 100, true),
    (5, 7, 37, false),
    (2000, 30, 64, true),
    (16384, 151936, 64, true),
];

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_embed_fwd_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda_embed_fwd_matches_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_embed_fwd_matches_cpu");
    for &(n, v, d, skewed) in EMBED_SHAPES {
        let what = format!("embed_fwd n={n} v={v} d={d}");
        let table = rounded(&rng.normal_vec(v * d, 1.0));
        let mut ids = make_ids(&mut rng, n, v, skewed);
        let mut out_ref = vec![0.0f32; n * d];
        embed::cpu::embed_fwd(&ids, &table, v, d, &mut out_ref).unwrap();
        let td = up_bf(&dev, &table, 0);
        let idd = up(&dev, &ids);
        let mut outd = poisoned_bf(&dev, n * d, 0);
        let mut bad = up(&dev, &[0u32]);
        embed::cuda::embed_fwd(
            &dev,
            &idd.as_view(),
            &td.as_view(),
            v,
            d,
            &mut outd.as_view_mut(),
            Some(&mut bad.as_view_mut()),
        )
        .unwrap();
        // A gather: bit-exact.
        assert_eq!(down(&dev, &outd), to_bf(&out_ref), "{what}: out");
        assert_eq!(down(&dev, &bad), vec![0], "{what}: bad count");

        // Out-of-range ids: zero rows, counted, nothing read out of bounds.
        let bad_tokens: Vec<usize> = (0..n).step_by(3).collect();
        let mut is_bad = vec![false; n];
        for (j, &t) in bad_tokens.iter().enumerate() {
            ids[t] = [v as u32, v as u32 + 17, u32::MAX][j % 3];
            is_bad[t] = true;
        }
        let idd = up(&dev, &ids);
        let mut outd = poisoned_bf(&dev, n * d, 0);
        let mut bad = up(&dev, &[5u32]);
        embed::cuda::embed_fwd(
            &dev,
            &idd.as_view(),
            &td.as_view(),
            v,
            d,
            &mut outd.as_view_mut(),
            Some(&mut bad.as_view_mut()),
        )
        .unwrap();
        let got = down(&dev, &outd);
        for t in 0..n {
            let row = &got[t * d..(t + 1) * d];
            if is_bad[t] {
                assert!(
                    row.iter().all(|&b| b == 0),
                    "{what}: token {t} with a bad id is not zeros"
                );
            } else {
                assert_eq!(
                    row,
                    &to_bf(&out_ref[t * d..(t + 1) * d])[..],
                    "{what}: token {t}"
                );
            }
        }
        assert_eq!(
            down(&dev, &bad),
            vec![5 + bad_tokens.len() as u32],
            "{what}: bad count (+=)"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_embed_bwd_matches_cpu_and_is_deterministic() {
    let Some(dev) = cuda_for_test("cuda_embed_bwd_matches_cpu_and_is_deterministic") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_embed_bwd_matches_cpu_and_is_deterministic");
    for &(n, v, d, skewed) in EMBED_SHAPES {
        let what = format!("embed_bwd n={n} v={v} d={d}");
        let ids = make_ids(&mut rng, n, v, skewed);
        let dout = rounded(&rng.normal_vec(n * d, 1.0));
        let t0 = rng.normal_vec(v * d, 1.0);
        let mut want = t0.clone();
        embed::cpu::embed_bwd(&ids, &dout, v, d, &mut want).unwrap();
        let plan = embed::EmbedBwdPlan::new(&ids, v).unwrap();
        if skewed && n >= 1000 {
            assert!(
                plan.n_groups() > 0,
                "{what}: the skewed case should split the padding id"
            );
        }
        let doutd = up_bf(&dev, &dout, 0);
        let mut runs = Vec::new();
        for _ in 0..2 {
            let mut td = up(&dev, &t0);
            embed::cuda::embed_bwd(&dev, &plan, &doutd.as_view(), d, &mut td.as_view_mut())
                .unwrap();
            runs.push(down(&dev, &td));
        }
        let got = &runs[0];
        // fp32 sums of up to n bf16 values of |x| < ~6, in a different grouping.
        let mut count = vec![0usize; v];
        for &id in &ids {
            count[id as usize] += 1;
        }
        let max_count = *count.iter().max().unwrap() as f64;
        assert_close(&what, got, &want, 1e-5, 1e-6 * max_count);
        // Rows of ids that do not occur are untouched, bit for bit.
        for id in (0..v).filter(|&i| count[i] == 0).take(1000) {
            assert_eq!(
                got[id * d..(id + 1) * d]
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>(),
                t0[id * d..(id + 1) * d]
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>(),
                "{what}: row {id} (absent id) changed"
            );
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(&runs[0]) == bits(&runs[1]),
            "{what}: dtable differs between runs"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input on the CUDA side
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_bad_inputs_return_errors() {
    let Some(dev) = cuda_for_test("cuda_bad_inputs_return_errors") else {
        return;
    };
    let (n, d) = (4usize, 16usize);
    let x = up(&dev, &vec![0u16; n * d]);
    let w = up(&dev, &vec![0u16; d]);
    let mut y = up(&dev, &vec![0u16; n * d]);
    let mut r = up(&dev, &vec![0.0f32; n]);
    let shape = |e: dfpo::Result<()>, what: &str| match e {
        Err(Error::Shape(m)) => assert!(m.contains(what), "{m:?} should mention {what:?}"),
        other => panic!("expected a Shape error about {what}, got {other:?}"),
    };
    let invalid = |e: dfpo::Result<()>, what: &str| match e {
        Err(Error::Invalid(m)) => assert!(m.contains(what), "{m:?} should mention {what:?}"),
        other => panic!("expected an Invalid error about {what}, got {other:?}"),
    };
    shape(
        norm::cuda::rmsnorm_fwd(
            &dev,
            &x.slice(1..),
            &w.as_view(),
            n,
            d,
            EPS,
            &mut y.as_view_mut(),
            &mut r.as_view_mut(),
        ),
        "rmsnorm_fwd x",
    );
    invalid(
        norm::cuda::rmsnorm_fwd(
            &dev,
            &x.as_view(),
            &w.as_view(),
            n,
            d,
            -1.0,
            &mut y.as_view_mut(),
            &mut r.as_view_mut(),
        ),
        "eps",
    );
    invalid(
        // SAFETY: rejected before any launch (null pointer).
        unsafe { norm::cuda::rmsnorm_fwd_raw(&dev, 0, 0, n, d, EPS, 0, 0) },
        "null",
    );
    let pos = up(&dev, &vec![0i32; n]);
    let mut q = up(&dev, &vec![0u16; n * 2 * 6]);
    let mut k = up(&dev, &vec![0u16; n * 6]);
    invalid(
        rope::cuda::rope_fwd(
            &dev,
            &mut q.slice_mut(..n * 2 * 5),
            &mut k.slice_mut(..n * 5),
            &pos.as_view(),
            n,
            2,
            1,
            5,
            1e4,
        ),
        "head_dim = 5",
    );
    shape(
        rope::cuda::rope_fwd(
            &dev,
            &mut q.as_view_mut(),
            &mut k.as_view_mut(),
            &pos.slice(1..),
            n,
            2,
            1,
            6,
            1e4,
        ),
        "rope_fwd pos",
    );
    let mut out = up(&dev, &vec![0u16; n * 8]);
    shape(
        act::cuda::swiglu_fwd(&dev, &x.as_view(), n, 8, &mut out.slice_mut(1..)),
        "swiglu_fwd out",
    );
    let ids = up(&dev, &vec![0u32; n]);
    shape(
        embed::cuda::embed_fwd(
            &dev,
            &ids.as_view(),
            &w.as_view(),
            2,
            d,
            &mut y.slice_mut(..n * d),
            None,
        ),
        "embed_fwd table",
    );
    let plan = embed::EmbedBwdPlan::new(&[0, 1, 1, 0], 2).unwrap();
    let mut dt = up(&dev, &vec![0.0f32; 2 * d + 1]);
    shape(
        embed::cuda::embed_bwd(&dev, &plan, &x.as_view(), d, &mut dt.as_view_mut()),
        "embed_bwd dtable",
    );
}
