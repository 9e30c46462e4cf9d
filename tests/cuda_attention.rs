//! CUDA parity for kernels/attention.cu against the f32 CPU reference computed from the SAME
//! bf16-rounded inputs, on fresh random inputs. Overwritten outputs (o, lse, decode out) are
//! pre-filled with NaN; accumulated ones (dq, dk, dv) start from random non-zero bf16 values on
//! valid rows and NaN on padded rows, which must come back bit-identical. Padded input rows hold
//! NaN and must not leak. Without a GPU every test prints a SKIPPED line (and fails under
//! DFPO_REQUIRE_CUDA=1).
//!
//! Tolerances (bf16 outputs, fp32 accumulation; P and dS are rounded to bf16 for the tensor-core
//! products, as in FlashAttention-2):
//! - o: |err| <= 1.5e-2 · max|o_ref| + 1e-2 · |o_ref|; padded rows exactly 0;
//! - lse (fp32 statistics): |err| <= 1e-3 + 1e-4 · |lse_ref|; padded rows exactly 0;
//! - dq, dk, dv: |err| <= 2e-2 · max(max|grad_ref|, 0.05) + 1e-2 · |init + grad_ref| (the second
//!   term is the one bf16 rounding of the accumulated value);
//! - decode out: |err| <= 1.5e-2 · max|ref| + 1e-2 · |ref|.

mod common;

use common::{assert_close, Rng, POISON};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use dfpo::device::emu::BlockOrder;
use dfpo::device::{cuda_for_test, CudaDevice};
use dfpo::kernels::attention::{cpu, cuda, softmax_scale};
use dfpo::Error;
use half::bf16;

fn round_bf16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

fn up_bf16(dev: &CudaDevice, x: &[f32]) -> CudaSlice<u16> {
    let bits: Vec<u16> = x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    dev.stream().clone_htod(&bits).unwrap()
}

fn down_bf16(dev: &CudaDevice, x: &CudaSlice<u16>) -> Vec<f32> {
    let v = dev.stream().clone_dtoh(x).unwrap();
    dev.synchronize().unwrap();
    v.into_iter().map(|b| bf16::from_bits(b).to_f32()).collect()
}

fn down_bits(dev: &CudaDevice, x: &CudaSlice<u16>) -> Vec<u16> {
    let v = dev.stream().clone_dtoh(x).unwrap();
    dev.synchronize().unwrap();
    v
}

fn up_f32(dev: &CudaDevice, x: &[f32]) -> CudaSlice<f32> {
    dev.stream().clone_htod(x).unwrap()
}

fn down_f32(dev: &CudaDevice, x: &CudaSlice<f32>) -> Vec<f32> {
    let v = dev.stream().clone_dtoh(x).unwrap();
    dev.synchronize().unwrap();
    v
}

fn view(x: &CudaSlice<u16>) -> CudaView<'_, bf16> {
    // SAFETY: bf16 and u16 have the same size and every bit pattern is a valid bf16.
    unsafe { x.transmute::<bf16>(x.len()).unwrap() }
}

fn view_mut(x: &mut CudaSlice<u16>) -> CudaViewMut<'_, bf16> {
    let n = x.len();
    // SAFETY: as in `view`.
    unsafe { x.transmute_mut::<bf16>(n).unwrap() }
}

#[derive(Clone, Debug)]
struct Shape {
    b: usize,
    s: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    lens: Vec<u32>,
}

impl Shape {
    fn nq(&self) -> usize {
        self.b * self.s * self.hq * self.d
    }
    fn nk(&self) -> usize {
        self.b * self.s * self.hkv * self.d
    }
    fn nl(&self) -> usize {
        self.b * self.hq * self.s
    }
}

/// bf16-representable N(0, sigma) values on valid rows of a [B][S][H][D] tensor, NaN on padding.
fn tokens(rng: &mut Rng, sh: &Shape, h: usize, sigma: f64) -> Vec<f32> {
    let mut x = round_bf16(&rng.normal_vec(sh.b * sh.s * h * sh.d, sigma));
    for b in 0..sh.b {
        for s in sh.lens[b] as usize..sh.s {
            let o = (b * sh.s + s) * h * sh.d;
            x[o..o + h * sh.d].fill(f32::NAN);
        }
    }
    x
}

/// Lengths mixing full, zero (when B > 1), one and random.
fn lens_for(rng: &mut Rng, b: usize, s: usize) -> Vec<u32> {
    (0..b)
        .map(|i| match i % 4 {
            0 => s as u32,
            1 if b > 1 => 0,
            2 => 1 + (rng.next_u64() % s as u64) as u32,
            _ => (s / 2).max(1) as u32 + (rng.next_u64() % (s - (s / 2).max(1) + 1) as u64) as u32,
        })
        .collect()
}

fn max_abs(x: &[f32]) -> f64 {
    x.iter()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, &v| m.max(v.abs() as f64))
}

/// The shapes of the parity tests: every head dim x GQA group 1/2/7 x S in {1, 17, 64, 129}, plus
/// S = 512 for every head dim.
fn parity_shapes(rng: &mut Rng) -> Vec<Shape> {
    let mut v = Vec::new();
    for &d in &cuda::HEAD_DIMS {
        for &(hq, hkv) in &[(2usize, 2usize), (4, 2), (7, 1)] {
            for &s in &[1usize, 17, 64, 129] {
                let b = if s == 1 { 2 } else { 3 };
                v.push(Shape {
                    b,
                    s,
                    hq,
                    hkv,
                    d,
                    lens: lens_for(rng, b, s),
                });
            }
        }
        v.push(Shape {
            b: 2,
            s: 512,
            hq: 4,
            hkv: 2,
            d,
            lens: vec![512, 300],
        });
    }
    v
}

struct Fwd {
    o: Vec<f32>,
    lse: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn gpu_fwd(
    dev: &CudaDevice,
    sh: &Shape,
    q: &CudaSlice<u16>,
    k: &CudaSlice<u16>,
    v: &CudaSlice<u16>,
    lens: &CudaSlice<u32>,
    scale: f32,
) -> Fwd {
    let mut o = up_bf16(dev, &vec![POISON; sh.nq()]);
    let mut lse = up_f32(dev, &vec![POISON; sh.nl()]);
    cuda::attention_fwd(
        dev,
        &view(q),
        &view(k),
        &view(v),
        &lens.as_view(),
        sh.b,
        sh.s,
        sh.hq,
        sh.hkv,
        sh.d,
        scale,
        &mut view_mut(&mut o),
        &mut lse.as_view_mut(),
    )
    .unwrap();
    Fwd {
        o: down_bf16(dev, &o),
        lse: down_f32(dev, &lse),
    }
}

fn check_padding_zero(sh: &Shape, f: &Fwd) {
    for b in 0..sh.b {
        for s in sh.lens[b] as usize..sh.s {
            let o = (b * sh.s + s) * sh.hq * sh.d;
            assert!(
                f.o[o..o + sh.hq * sh.d].iter().all(|&x| x == 0.0),
                "o at padded b={b} s={s} not 0 ({sh:?})"
            );
            for h in 0..sh.hq {
                assert_eq!(
                    f.lse[(b * sh.hq + h) * sh.s + s],
                    0.0,
                    "lse at padded b={b} h={h} s={s}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_attention_fwd_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda_attention_fwd_matches_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_attention_fwd_matches_cpu");
    for sh in parity_shapes(&mut rng) {
        let q = tokens(&mut rng, &sh, sh.hq, 1.5);
        let k = tokens(&mut rng, &sh, sh.hkv, 1.5);
        let v = tokens(&mut rng, &sh, sh.hkv, 1.0);
        let scale = softmax_scale(sh.d);
        let (gq, gk, gv) = (up_bf16(&dev, &q), up_bf16(&dev, &k), up_bf16(&dev, &v));
        let glens = dev.stream().clone_htod(&sh.lens).unwrap();
        let f = gpu_fwd(&dev, &sh, &gq, &gk, &gv, &glens, scale);
        let mut o = vec![0.0f32; sh.nq()];
        let mut lse = vec![0.0f32; sh.nl()];
        cpu::attention_forward(
            &q, &k, &v, &sh.lens, sh.b, sh.s, sh.hq, sh.hkv, sh.d, scale, &mut o, &mut lse,
        )
        .unwrap();
        check_padding_zero(&sh, &f);
        let what = format!("{sh:?}");
        assert_close(&format!("o {what}"), &f.o, &o, 1e-2, 1.5e-2 * max_abs(&o));
        assert_close(&format!("lse {what}"), &f.lse, &lse, 1e-4, 1e-3);
        eprintln!("fwd ok: {what}");
    }
}

/// One backward parity check of `sh` with the dK/dV kernel cut into `splits` slices of the GQA
/// group: three runs (forward, reverse and random block order on the emulator) must agree bit
/// for bit, and the gradients match the CPU reference. The workspace starts poisoned (NaN).
fn check_bwd(dev: &CudaDevice, rng: &mut Rng, sh: &Shape, splits: usize) {
    let q = tokens(rng, sh, sh.hq, 1.5);
    let k = tokens(rng, sh, sh.hkv, 1.5);
    let v = tokens(rng, sh, sh.hkv, 1.0);
    let dout = tokens(rng, sh, sh.hq, 1.0);
    let scale = softmax_scale(sh.d);
    let (gq, gk, gv, gdo) = (
        up_bf16(dev, &q),
        up_bf16(dev, &k),
        up_bf16(dev, &v),
        up_bf16(dev, &dout),
    );
    let glens = dev.stream().clone_htod(&sh.lens).unwrap();
    // The backward consumes the GPU forward's o and lse, on both sides.
    let f = gpu_fwd(dev, sh, &gq, &gk, &gv, &glens, scale);
    let go = up_bf16(dev, &f.o);
    let glse = up_f32(dev, &f.lse);
    let dq0 = tokens(rng, sh, sh.hq, 0.5);
    let dk0 = tokens(rng, sh, sh.hkv, 0.5);
    let dv0 = tokens(rng, sh, sh.hkv, 0.5);
    // The backward from the same initial gradients, run three times: the bits must agree
    // (the gradients are bit-reproducible: no atomics, fixed summation orders). On the
    // emulator the three runs take the blocks of every grid in forward, reverse and random
    // order, so a result that depends on which block runs first differs.
    let run = |order: BlockOrder| {
        let _order = dev.emu_block_order(order);
        let (mut gdq, mut gdk, mut gdv) =
            (up_bf16(dev, &dq0), up_bf16(dev, &dk0), up_bf16(dev, &dv0));
        let ws_len = cuda::bwd_workspace_len_split(sh.b, sh.s, sh.hq, sh.hkv, sh.d, splits);
        let mut ws = up_f32(dev, &vec![POISON; ws_len]);
        cuda::attention_bwd_split(
            dev,
            &view(&gq),
            &view(&gk),
            &view(&gv),
            &view(&go),
            &glse.as_view(),
            &view(&gdo),
            &glens.as_view(),
            sh.b,
            sh.s,
            sh.hq,
            sh.hkv,
            sh.d,
            scale,
            &mut view_mut(&mut gdq),
            &mut view_mut(&mut gdk),
            &mut view_mut(&mut gdv),
            &mut ws.as_view_mut(),
            splits,
        )
        .unwrap();
        [
            down_bits(dev, &gdq),
            down_bits(dev, &gdk),
            down_bits(dev, &gdv),
        ]
    };
    let first = run(BlockOrder::Forward);
    for order in [BlockOrder::Reverse, BlockOrder::Random] {
        let again = run(order);
        for (name, a, b) in [
            ("dq", &first[0], &again[0]),
            ("dk", &first[1], &again[1]),
            ("dv", &first[2], &again[2]),
        ] {
            let diff = a.iter().zip(b.iter()).filter(|(x, y)| x != y).count();
            assert_eq!(
                diff, 0,
                "{name}: {diff} elements differ between block orders Forward and {order:?} \
                 (splits {splits}, {sh:?})"
            );
        }
    }
    // CPU: gradients alone (from zero), then init + grad.
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; sh.nq()],
        vec![0.0f32; sh.nk()],
        vec![0.0f32; sh.nk()],
    );
    cpu::attention_backward(
        &q, &k, &v, &f.o, &f.lse, &dout, &sh.lens, sh.b, sh.s, sh.hq, sh.hkv, sh.d, scale, &mut dq,
        &mut dk, &mut dv,
    )
    .unwrap();
    let what = format!("splits {splits} {sh:?}");
    for (name, bits, init, grad, h) in [
        ("dq", &first[0], &dq0, &dq, sh.hq),
        ("dk", &first[1], &dk0, &dk, sh.hkv),
        ("dv", &first[2], &dv0, &dv, sh.hkv),
    ] {
        let got: Vec<f32> = bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
        let nan_bits = bf16::from_f32(f32::NAN).to_bits();
        let (mut g_valid, mut w_valid) = (Vec::new(), Vec::new());
        for b in 0..sh.b {
            for s in 0..sh.s {
                let o = (b * sh.s + s) * h * sh.d;
                for x in o..o + h * sh.d {
                    if s >= sh.lens[b] as usize {
                        assert_eq!(
                            bits[x], nan_bits,
                            "{name}[{x}] on a padded row was touched ({what})"
                        );
                    } else {
                        g_valid.push(got[x]);
                        w_valid.push(init[x] + grad[x]);
                    }
                }
            }
        }
        // Floor: with S = 1 the exact dq, dk are 0 and only rounding noise (~1e-7) remains.
        let atol = 2e-2 * max_abs(grad).max(0.05);
        assert_close(&format!("{name} {what}"), &g_valid, &w_valid, 1e-2, atol);
    }
    eprintln!("bwd ok: {what}");
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_attention_bwd_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda_attention_bwd_matches_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_attention_bwd_matches_cpu");
    // The unsplit dK/dV kernel (one CTA per KV head, sequence and key tile) on every shape.
    for sh in parity_shapes(&mut rng) {
        check_bwd(&dev, &mut rng, &sh, 1);
    }
}

/// The dK/dV kernel with the GQA group split across CTAs (fp32 partials per slice, ordered
/// finalize): split counts 2, G and non-dividing ones (G = 7 in 3 slices of 2, 2, 3 heads), every
/// head dim, several KV heads, padded and empty sequences; bit-reproducible across block orders
/// and within the CPU reference's tolerance, as the unsplit kernel. Small shapes: the emulator
/// runs every CUDA thread as a fiber.
#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_attention_bwd_split_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda_attention_bwd_split_matches_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_attention_bwd_split_matches_cpu");
    let shape = |rng: &mut Rng, b: usize, s: usize, hq: usize, hkv: usize, d: usize| Shape {
        b,
        s,
        hq,
        hkv,
        d,
        lens: lens_for(rng, b, s),
    };
    // G = 7 (one KV head), 129 positions: 3 key tiles, the last one partly padding.
    for splits in [2, 3, 7] {
        let sh = shape(&mut rng, 3, 129, 7, 1, 64);
        check_bwd(&dev, &mut rng, &sh, splits);
    }
    // The non-dividing split at the other head dims (D = 128 runs 32-row query tiles).
    for d in [16, 32, 128] {
        let sh = shape(&mut rng, 3, 129, 7, 1, d);
        check_bwd(&dev, &mut rng, &sh, 3);
    }
    // Several KV heads (block x = split·Hkv + kv head): the Qwen2-0.5B heads (G = 7) and G = 2.
    let sh = shape(&mut rng, 2, 64, 14, 2, 64);
    check_bwd(&dev, &mut rng, &sh, 3);
    let sh = shape(&mut rng, 3, 80, 4, 2, 32);
    check_bwd(&dev, &mut rng, &sh, 2);
    // The automatic choice at a small grid splits the group (and G = 1 cannot be split).
    let sh = shape(&mut rng, 2, 64, 4, 1, 16);
    let auto = cuda::bwd_splits(sh.b, sh.s, sh.hq, sh.hkv);
    assert_eq!(auto, 4, "bwd_splits of {sh:?}");
    check_bwd(&dev, &mut rng, &sh, auto);
    assert_eq!(cuda::bwd_splits(2, 64, 2, 2), 1, "G = 1");
}

/// The backward kernels' parameter lists in the embedded PTX (byte sizes, in order) match what
/// `attention_bwd_split_raw` pushes: delta (o, dout, seq_lens, delta, B, S, Hq); dK/dV (q, k, v,
/// dout, lse, delta, seq_lens, dk, dv, part, S, Hq, Hkv, splits, scale, scale·log2e); dQ (q, k,
/// v, dout, lse, delta, seq_lens, dq, S, Hq, Hkv, scale, scale·log2e); the split finalize (part,
/// seq_lens, dk, dv, S, Hkv·D, n as i64, splits, scale). Runs without a GPU.
#[test]
fn backward_kernel_parameters_match_the_launcher() {
    let Some(ptx) = dfpo::device::embedded::get("attention").and_then(|k| k.ptx) else {
        eprintln!("SKIPPED backward_kernel_parameters_match_the_launcher: this build has no PTX");
        return;
    };
    let pre = [8, 8, 8, 8, 4, 4, 4];
    let bwd = [8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 4, 4, 4, 4, 4, 4];
    let dq = [8, 8, 8, 8, 8, 8, 8, 8, 4, 4, 4, 4, 4];
    for d in cuda::HEAD_DIMS {
        for (name, want) in [
            (format!("attention_bwd_pre_d{d}"), &pre[..]),
            (format!("attention_bwd_d{d}"), &bwd[..]),
            (format!("attention_bwd_dq_d{d}"), &dq[..]),
        ] {
            let sizes = common::ptx_param_sizes(ptx, &name);
            assert_eq!(sizes, want, "{name} parameter sizes");
        }
    }
    let sizes = common::ptx_param_sizes(ptx, "attention_bwd_finalize");
    assert_eq!(
        sizes,
        [8, 8, 8, 8, 4, 4, 8, 4, 4],
        "attention_bwd_finalize parameter sizes"
    );
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_decode_attention_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda_decode_attention_matches_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_decode_attention_matches_cpu");
    for &d in &cuda::HEAD_DIMS {
        for &(hq, hkv) in &[(2usize, 2usize), (4, 2), (14, 2), (16, 1)] {
            for &max_len in &[1usize, 17, 300, 2048] {
                let b = 4;
                let lens: Vec<u32> = vec![
                    max_len as u32,
                    0,
                    1,
                    1 + (rng.next_u64() % max_len as u64) as u32,
                ];
                let q = round_bf16(&rng.normal_vec(b * hq * d, 1.5));
                let mut kc = round_bf16(&rng.normal_vec(b * hkv * max_len * d, 1.5));
                let mut vc = round_bf16(&rng.normal_vec(b * hkv * max_len * d, 1.0));
                for bi in 0..b {
                    for hk in 0..hkv {
                        let o = (bi * hkv + hk) * max_len * d;
                        kc[o + lens[bi] as usize * d..o + max_len * d].fill(f32::NAN);
                        vc[o + lens[bi] as usize * d..o + max_len * d].fill(f32::NAN);
                    }
                }
                let scale = softmax_scale(d);
                let (gq, gk, gv) = (up_bf16(&dev, &q), up_bf16(&dev, &kc), up_bf16(&dev, &vc));
                let glens = dev.stream().clone_htod(&lens).unwrap();
                let mut gout = up_bf16(&dev, &vec![POISON; b * hq * d]);
                let mut ws = up_f32(
                    &dev,
                    &vec![POISON; cuda::decode_workspace_len(b, hq, hkv, max_len, d)],
                );
                cuda::decode_attention(
                    &dev,
                    &view(&gq),
                    &view(&gk),
                    &view(&gv),
                    &glens.as_view(),
                    b,
                    hq,
                    hkv,
                    max_len,
                    d,
                    scale,
                    &mut view_mut(&mut gout),
                    &mut ws.as_view_mut(),
                )
                .unwrap();
                let got = down_bf16(&dev, &gout);
                let mut want = vec![0.0f32; b * hq * d];
                cpu::decode_attention(
                    &q, &kc, &vc, &lens, b, hq, hkv, max_len, d, scale, &mut want,
                )
                .unwrap();
                let what =
                    format!("decode B={b} Hq={hq} Hkv={hkv} D={d} max_len={max_len} lens={lens:?}");
                assert!(
                    got[hq * d..2 * hq * d].iter().all(|&x| x == 0.0),
                    "zero-length row not 0: {what}"
                );
                assert_close(&what, &got, &want, 1e-2, 1.5e-2 * max_abs(&want));
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_attention_rejects_bad_input() {
    let Some(dev) = cuda_for_test("cuda_attention_rejects_bad_input") else {
        return;
    };
    let (b, s, hq, hkv) = (2, 8, 4, 2);
    let lens = dev.stream().clone_htod(&[8u32, 3]).unwrap();
    let expect = |r: dfpo::Result<()>, needle: &str| match r {
        Err(e @ (Error::Shape(_) | Error::Invalid(_))) => {
            assert!(e.to_string().contains(needle), "{e} does not name {needle}")
        }
        other => panic!("expected an error naming {needle}, got {other:?}"),
    };
    // An unsupported head dim.
    let d = 48;
    let q = up_bf16(&dev, &vec![0.1; b * s * hq * d]);
    let k = up_bf16(&dev, &vec![0.1; b * s * hkv * d]);
    let mut o = up_bf16(&dev, &vec![0.0; b * s * hq * d]);
    let mut lse = up_f32(&dev, &vec![0.0; b * hq * s]);
    expect(
        cuda::attention_fwd(
            &dev,
            &view(&q),
            &view(&k),
            &view(&k),
            &lens.as_view(),
            b,
            s,
            hq,
            hkv,
            d,
            0.1,
            &mut view_mut(&mut o),
            &mut lse.as_view_mut(),
        ),
        "head dim",
    );
    // Wrong lengths, GQA mismatch, short workspace.
    let d = 64;
    let q = up_bf16(&dev, &vec![0.1; b * s * hq * d]);
    let k = up_bf16(&dev, &vec![0.1; b * s * hkv * d]);
    let mut o = up_bf16(&dev, &vec![0.0; b * s * hq * d]);
    expect(
        cuda::attention_fwd(
            &dev,
            &view(&q),
            &view(&q),
            &view(&k),
            &lens.as_view(),
            b,
            s,
            hq,
            hkv,
            d,
            0.1,
            &mut view_mut(&mut o),
            &mut lse.as_view_mut(),
        ),
        "attention_fwd k",
    );
    expect(
        cuda::attention_fwd(
            &dev,
            &view(&q),
            &view(&k),
            &view(&k),
            &lens.as_view(),
            b,
            s,
            hq,
            3,
            d,
            0.1,
            &mut view_mut(&mut o),
            &mut lse.as_view_mut(),
        ),
        "multiple of Hkv",
    );
    let (mut dq, mut dk, mut dv) = (q.clone(), k.clone(), k.clone());
    let mut ws = up_f32(
        &dev,
        &vec![0.0; cuda::bwd_workspace_len(b, s, hq, hkv, d) - 1],
    );
    expect(
        cuda::attention_bwd(
            &dev,
            &view(&q),
            &view(&k),
            &view(&k),
            &view(&q),
            &lse.as_view(),
            &view(&q),
            &lens.as_view(),
            b,
            s,
            hq,
            hkv,
            d,
            0.1,
            &mut view_mut(&mut dq),
            &mut view_mut(&mut dk),
            &mut view_mut(&mut dv),
            &mut ws.as_view_mut(),
        ),
        "workspace",
    );
    // Split counts outside 1..=G (G = 2 here), and a short workspace for a split run.
    for (splits, ws_len, needle) in [
        (
            0,
            cuda::bwd_workspace_len_split(b, s, hq, hkv, d, 1),
            "splits = 0",
        ),
        (
            3,
            cuda::bwd_workspace_len_split(b, s, hq, hkv, d, 2),
            "splits = 3",
        ),
        (
            2,
            cuda::bwd_workspace_len_split(b, s, hq, hkv, d, 2) - 1,
            "workspace",
        ),
        (
            2,
            cuda::bwd_workspace_len_split(b, s, hq, hkv, d, 1),
            "workspace",
        ),
    ] {
        let mut ws = up_f32(&dev, &vec![0.0; ws_len]);
        expect(
            cuda::attention_bwd_split(
                &dev,
                &view(&q),
                &view(&k),
                &view(&k),
                &view(&q),
                &lse.as_view(),
                &view(&q),
                &lens.as_view(),
                b,
                s,
                hq,
                hkv,
                d,
                0.1,
                &mut view_mut(&mut dq),
                &mut view_mut(&mut dk),
                &mut view_mut(&mut dv),
                &mut ws.as_view_mut(),
                splits,
            ),
            needle,
        );
    }
    let mut out = up_bf16(&dev, &vec![0.0; b * hq * d]);
    let qd = up_bf16(&dev, &vec![0.0; b * hq * d]);
    let mut dws = up_f32(&dev, &[0.0; 16]);
    expect(
        cuda::decode_attention(
            &dev,
            &view(&qd),
            &view(&k),
            &view(&k),
            &lens.as_view(),
            b,
            hq,
            hkv,
            0,
            d,
            0.1,
            &mut view_mut(&mut out),
            &mut dws.as_view_mut(),
        ),
        "max_len",
    );
    expect(
        cuda::decode_attention(
            &dev,
            &view(&qd),
            &view(&k),
            &view(&k),
            &lens.as_view(),
            b,
            hq,
            hkv,
            s,
            d,
            0.1,
            &mut view_mut(&mut out),
            &mut dws.as_view_mut(),
        ),
        "workspace",
    );
    // An empty batch is a no-op.
    let e = up_bf16(&dev, &[0.0]);
    let mut e2 = up_bf16(&dev, &[0.0]);
    let mut el = up_f32(&dev, &[0.0]);
    cuda::attention_fwd(
        &dev,
        &view(&e).slice(0..0),
        &view(&e).slice(0..0),
        &view(&e).slice(0..0),
        &lens.as_view().slice(0..0),
        0,
        s,
        hq,
        hkv,
        d,
        0.1,
        &mut view_mut(&mut e2).slice_mut(0..0),
        &mut el.as_view_mut().slice_mut(0..0),
    )
    .unwrap();
}
