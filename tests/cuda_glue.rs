//! CUDA parity of the decoder's glue kernels that the step's speed work changed (issue 11 item
//! 6): the bias gradient with its rows split over chunks and an ordered finalize, against an
//! f64 CPU sum on fresh random inputs (poisoned workspace, accumulation into an existing
//! gradient, narrow and wide biases, row counts around the chunk size), and bit-identical
//! on a rerun. Ignored without a GPU (`DFPO_REQUIRE_CUDA=1` makes a missing GPU a failure).

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use dfpo::device::{cuda_for_test, CudaDevice};
use dfpo::model::ops::gpu;

mod common;
use common::Rng;

fn up<T: DeviceRepr>(dev: &CudaDevice, x: &[T]) -> CudaSlice<T> {
    dev.stream().clone_htod(x).unwrap()
}

fn down<T: DeviceRepr + Default + Clone>(dev: &CudaDevice, x: &CudaSlice<T>) -> Vec<T> {
    let v = dev.stream().clone_dtoh(x).unwrap();
    dev.synchronize().unwrap();
    v
}

#[test]
fn bias_grad_chunks_depend_on_rows_only_and_cover_them() {
    for n in [0usize, 1, 127, 128, 129, 8192, 8195, 1 << 20] {
        let c = gpu::bias_grad_chunks(n);
        assert!((1..=64).contains(&c), "n {n}: {c} chunks");
        // Every row lies in some chunk: chunks x rows per chunk >= n.
        assert!(c * n.div_ceil(c).max(1) >= n);
    }
    // The k/v bias of the Qwen2-0.5B shape at B 8 x S 512: 4 column blocks x 64 chunks.
    assert_eq!(gpu::bias_grad_chunks(8 * 512), 32);
    assert_eq!(gpu::bias_grad_chunks(64 * 1024), 64);
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_bias_grad_split_matches_cpu() {
    let Some(dev) = cuda_for_test("cuda_bias_grad_split_matches_cpu") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_bias_grad_split_matches_cpu");
    for &(n, m) in &[
        (1usize, 1usize),
        (7, 33),
        (129, 128),
        (300, 5),
        (2 * 128 * 64 + 3, 128),
    ] {
        let dy: Vec<u16> = rng
            .normal_vec(n * m, 1.0)
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let db0 = rng.normal_vec(m, 1.0);
        let dyd = up(&dev, &dy);
        let mut outs = Vec::new();
        for _ in 0..2 {
            let dbd = up(&dev, &db0);
            let ws = up(&dev, &vec![f32::NAN; gpu::bias_grad_workspace_len(n, m)]);
            let s = dev.stream();
            let (yp, _a) = dyd.device_ptr(s);
            let (bp, _b) = dbd.device_ptr(s);
            let (wp, _c) = ws.device_ptr(s);
            // SAFETY: buffers of n·m bf16, m f32 and the workspace length.
            unsafe { gpu::bias_grad_split(&dev, yp, bp, wp, n, m).unwrap() };
            drop((_a, _b, _c));
            outs.push(down(&dev, &dbd));
        }
        let got = &outs[0];
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            outs[1].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "n {n} m {m}: not deterministic"
        );
        for c in 0..m {
            let (mut sum, mut abs) = (db0[c] as f64, db0[c].abs() as f64);
            for r in 0..n {
                let v = half::bf16::from_bits(dy[r * m + c]).to_f64();
                sum += v;
                abs += v.abs();
            }
            // f32 sums of <= 16 + 8 + 64 terms in a row: relative error below 88 · 2^-24.
            let g = got[c] as f64;
            assert!(
                !g.is_nan() && (g - sum).abs() <= 6e-6 * abs + 1e-6,
                "n {n} m {m} column {c}: GPU {g} CPU {sum}"
            );
        }
    }
}
