//! CUDA parity of the chunked LM head.
//!
//! 1. `xent_bwd_inplace` (the gradient written over the logits) is bit-identical to `xent_bwd`
//!    accumulating into a zeroed `d_logits` (itself checked against the CPU reference in
//!    tests/cuda_lmops.rs), and rows with no upstream gradient or only `-inf` logits become
//!    exactly 0; vocabularies 17, 1000, 151936, row bases aligned and misaligned by one element.
//! 2. `LmHeadXent` on CUDA (bf16 activations and weights) against the CPU unfused head (f32 on
//!    the same bf16-rounded inputs) and against the CUDA unfused head, at odd sizes and chunk
//!    sizes 1, non-dividing and past n; each run follows a decoy run of other inputs on the same
//!    graph, so an output row or gradient the head leaves unwritten shows.
//!
//! bf16 tolerances: log-probs |diff| ≤ 5e-2 + 2e-2·|want|, lse and entropy 3e-2 + 1e-2·|want|;
//! gradients cosine ≥ 0.99 and max|diff| ≤ 0.05·max|want|.
//!
//! `#[ignore]`d (run with `--include-ignored`); without a GPU `cuda_for_test` prints SKIPPED, and
//! under DFPO_REQUIRE_CUDA=1 (tools/emu sets it) it fails instead.

mod common;
mod lm_head_graph;

use common::{assert_close, Rng};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use dfpo::device::{cuda_for_test, CudaDevice};
use dfpo::kernels::xent::{self, IGNORE_INDEX};
use dfpo::Device;
use lm_head_graph::{case, run_after_decoy, Case, Head, Out};

fn up<T: DeviceRepr>(dev: &CudaDevice, x: &[T]) -> CudaSlice<T> {
    dev.stream().clone_htod(x).unwrap()
}

fn down<T: DeviceRepr + Default + Clone>(dev: &CudaDevice, x: &CudaSlice<T>) -> Vec<T> {
    let v = dev.stream().clone_dtoh(x).unwrap();
    dev.synchronize().unwrap();
    v
}

fn ptr<T>(dev: &CudaDevice, x: &CudaSlice<T>) -> u64 {
    x.device_ptr(dev.stream()).0
}

fn bf16_bits(x: &[f32]) -> Vec<u16> {
    x.iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_xent_bwd_inplace_equals_xent_bwd_on_zeros() {
    let Some(dev) = cuda_for_test("cuda_xent_bwd_inplace_equals_xent_bwd_on_zeros") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_xent_bwd_inplace_equals_xent_bwd_on_zeros");
    let n = 7;
    for &v in &[17usize, 1000, 151_936] {
        for (t, off) in [(1.0f32, 0usize), (0.7, 1)] {
            // Row kinds: both upstream terms, log-prob only, entropy only, none (must become 0),
            // an ignored target, a row of only -inf logits (no distribution: 0), a large offset.
            let mut z = rng.normal_vec(n * v, 2.0);
            z[6 * v..].iter_mut().for_each(|x| *x += 40.0);
            let mut zb = bf16_bits(&z);
            zb[5 * v..6 * v].fill(0xFF80); // -inf
            let tg: Vec<u32> = (0..n)
                .map(|r| {
                    if r == 4 {
                        IGNORE_INDEX
                    } else {
                        (rng.next_u64() % v as u64) as u32
                    }
                })
                .collect();
            let mut glp = rng.normal_vec(n, 1.0);
            let mut gh = rng.normal_vec(n, 1.0);
            gh[1] = 0.0;
            glp[2] = 0.0;
            glp[3] = 0.0;
            gh[3] = 0.0;
            // Buffers with `off` leading elements (the row bases then sit off 16 bytes).
            let mut padded = vec![0x3F80u16; off]; // 1.0: must survive
            padded.extend_from_slice(&zb);
            let zd = up(&dev, &padded);
            let tgd = up(&dev, &tg);
            let (lse, ent, lp) = (
                up(&dev, &vec![f32::NAN; n]),
                up(&dev, &vec![f32::NAN; n]),
                up(&dev, &vec![f32::NAN; n]),
            );
            let (glpd, ghd) = (up(&dev, &glp), up(&dev, &gh));
            let zp = ptr(&dev, &zd) + 2 * off as u64;
            let mut dz = vec![0x3F80u16; off];
            dz.extend(std::iter::repeat_n(0u16, n * v));
            let dzd = up(&dev, &dz);
            let inplace = up(&dev, &padded);
            // SAFETY: buffers of the sizes above, offsets inside them.
            unsafe {
                xent::cuda::forward_raw(
                    &dev,
                    zp,
                    ptr(&dev, &tgd),
                    n,
                    v,
                    t,
                    ptr(&dev, &lp),
                    ptr(&dev, &lse),
                    ptr(&dev, &ent),
                )
                .unwrap();
                xent::cuda::backward_raw(
                    &dev,
                    zp,
                    ptr(&dev, &tgd),
                    n,
                    v,
                    t,
                    ptr(&dev, &lse),
                    ptr(&dev, &ent),
                    ptr(&dev, &glpd),
                    ptr(&dev, &ghd),
                    ptr(&dev, &dzd) + 2 * off as u64,
                )
                .unwrap();
                xent::cuda::backward_inplace_raw(
                    &dev,
                    ptr(&dev, &inplace) + 2 * off as u64,
                    ptr(&dev, &tgd),
                    n,
                    v,
                    t,
                    ptr(&dev, &lse),
                    ptr(&dev, &ent),
                    ptr(&dev, &glpd),
                    ptr(&dev, &ghd),
                )
                .unwrap();
            }
            let (want, got) = (down(&dev, &dzd), down(&dev, &inplace));
            assert_eq!(got[..off], padded[..off], "element before the rows written");
            assert_eq!(down(&dev, &lse)[5], f32::NEG_INFINITY);
            for r in 0..n {
                let (a, b) = (&got[off + r * v..off + (r + 1) * v], &want[off + r * v..]);
                if let Some(j) = (0..v).find(|&j| a[j] != b[j]) {
                    panic!(
                        "V={v} T={t} off={off} row {r}: in place {:#06x} vs xent_bwd on zeros {:#06x} at {j}",
                        a[j], b[j]
                    );
                }
                if r == 3 || r == 5 {
                    assert!(a.iter().all(|&x| x == 0), "row {r} must be zeroed");
                } else {
                    assert!(a.iter().any(|&x| x != 0), "row {r} has a gradient");
                }
            }
        }
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}

fn max_abs(x: &[f32]) -> f64 {
    x.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()))
}

fn assert_bf16_close(what: &str, got: &Out, want: &Out) {
    assert_close(
        &format!("{what} logprob"),
        &got.logprob,
        &want.logprob,
        2e-2,
        5e-2,
    );
    assert_close(&format!("{what} lse"), &got.lse, &want.lse, 1e-2, 3e-2);
    assert_close(
        &format!("{what} entropy"),
        &got.entropy,
        &want.entropy,
        1e-2,
        3e-2,
    );
    for (name, g, w) in [("da", &got.da, &want.da), ("dW", &got.dw, &want.dw)] {
        let c = cosine(g, w);
        assert!(c >= 0.99, "{what} {name}: cosine {c}");
        assert_close(&format!("{what} {name}"), g, w, 0.0, 0.05 * max_abs(w));
    }
}

/// `c` with its a and W rounded to bf16 (what the CUDA graph computes from).
fn rounded(c: &Case) -> Case {
    let r = |x: &[f32]| -> Vec<f32> {
        x.iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect()
    };
    Case {
        a: r(&c.a),
        w: r(&c.w),
        ..c.clone()
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_chunked_head_matches_cpu_and_the_unfused_head() {
    let Some(dev) = cuda_for_test("cuda_chunked_head_matches_cpu_and_the_unfused_head") else {
        return;
    };
    let cuda = Device::Cuda(dev.clone());
    let mut rng = Rng::fresh("cuda_chunked_head_matches_cpu_and_the_unfused_head");
    for &(n, h, v, t, chunks) in &[
        (13usize, 24usize, 301usize, 1.0f32, &[5usize, 13, 40][..]),
        (9, 8, 17, 0.7, &[1, 4][..]),
    ] {
        let c = rounded(&case(&mut rng, n, h, v, t));
        let decoy = rounded(&case(&mut rng, n, h, v, t));
        let cpu = run_after_decoy(&Device::Cpu, &c, &decoy, Head::Unfused);
        let unfused = run_after_decoy(&cuda, &c, &decoy, Head::Unfused);
        assert_bf16_close(&format!("n {n} v {v} unfused CUDA"), &unfused, &cpu);
        for &chunk in chunks {
            let got = run_after_decoy(&cuda, &c, &decoy, Head::Chunked(chunk));
            let what = format!("n {n} h {h} v {v} T {t} chunk {chunk}");
            assert_bf16_close(&format!("{what} vs CPU"), &got, &cpu);
            assert_bf16_close(&format!("{what} vs CUDA unfused"), &got, &unfused);
            for i in 0..n {
                if c.targets[i] == IGNORE_INDEX {
                    assert_eq!(got.logprob[i], 0.0, "{what}: ignored row {i}");
                }
            }
            // Rows 0..3 have no upstream gradient: their da is exactly 0.
            assert!(got.da[..3 * h].iter().all(|&x| x == 0.0), "{what}");
        }
    }
}
