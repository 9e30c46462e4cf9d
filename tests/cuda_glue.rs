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

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_cast_and_row_gather_match_the_host_kernels() {
    use dfpo::train::heads::{GatherRows, HostKernel};
    let Some(dev) = cuda_for_test("cuda_cast_and_row_gather_match_the_host_kernels") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_cast_and_row_gather_match_the_host_kernels");
    // Cast bf16 -> f32 and its backward dx = bf16(dx + dy): exact.
    let n = 1003;
    let xb: Vec<u16> = rng
        .normal_vec(n, 2.0)
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    let xd = up(&dev, &xb);
    let yd = up(&dev, &vec![f32::NAN; n]);
    let dy = rng.normal_vec(n, 1.0);
    let dyd = up(&dev, &dy);
    let dx0: Vec<u16> = rng
        .normal_vec(n, 1.0)
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    let dxd = up(&dev, &dx0);
    {
        let s = dev.stream();
        let (xp, _a) = xd.device_ptr(s);
        let (yp, _b) = yd.device_ptr(s);
        let (gp, _c) = dyd.device_ptr(s);
        let (dp, _d) = dxd.device_ptr(s);
        // SAFETY: n bf16 / f32 buffers each.
        unsafe {
            gpu::cast_bf16_f32(&dev, xp, yp, n).unwrap();
            gpu::acc_f32_bf16(&dev, gp, dp, n).unwrap();
        }
    }
    let (y, dx) = (down(&dev, &yd), down(&dev, &dxd));
    for i in 0..n {
        assert_eq!(y[i], half::bf16::from_bits(xb[i]).to_f32(), "cast [{i}]");
        let want = half::bf16::from_f32(half::bf16::from_bits(dx0[i]).to_f32() + dy[i]);
        assert_eq!(dx[i], want.to_bits(), "cast backward [{i}]");
    }
    // Row gather and its scatter-add backward against the host kernel: distinct rows in a
    // random order, "none" rows (-1), a row list shorter than the input.
    let (rows_in, m, w) = (50usize, 40usize, 7usize);
    let mut order: Vec<usize> = (0..rows_in).collect();
    for i in (1..rows_in).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let rows: Vec<f32> = (0..m)
        .map(|i| if i % 5 == 3 { -1.0 } else { order[i] as f32 })
        .collect();
    let k = GatherRows { n: rows_in, m, w };
    k.check_rows(&rows).unwrap();
    let x = rng.normal_vec(rows_in * w, 1.0);
    let dyr = rng.normal_vec(m * w, 1.0);
    let dx0 = rng.normal_vec(rows_in * w, 1.0);
    let want_y = HostKernel::forward(&k, &[x.clone(), rows.clone()]).unwrap();
    let want_dx = HostKernel::backward(
        &k,
        &[x.clone(), rows.clone()],
        &[],
        std::slice::from_ref(&dyr),
        &[true, false],
    )
    .unwrap();
    let (xd, rd, yd) = (
        up(&dev, &x),
        up(&dev, &rows),
        up(&dev, &vec![f32::NAN; m * w]),
    );
    let (gd, dd) = (up(&dev, &dyr), up(&dev, &dx0));
    {
        let s = dev.stream();
        let (xp, _a) = xd.device_ptr(s);
        let (rp, _b) = rd.device_ptr(s);
        let (yp, _c) = yd.device_ptr(s);
        let (gp, _d) = gd.device_ptr(s);
        let (dp, _e) = dd.device_ptr(s);
        // SAFETY: rows_in·w, m and m·w f32 buffers.
        unsafe {
            gpu::rows(&dev, false, xp, rp, yp, rows_in, m, w).unwrap();
            gpu::rows(&dev, true, gp, rp, dp, rows_in, m, w).unwrap();
        }
    }
    assert_eq!(down(&dev, &yd), want_y[0], "gather");
    let got_dx = down(&dev, &dd);
    let want_dx = want_dx[0].as_ref().unwrap();
    for i in 0..rows_in * w {
        assert_eq!(got_dx[i], dx0[i] + want_dx[i], "scatter-add [{i}]");
    }
    // A row listed twice or out of range is refused before it reaches the device.
    let mut dup = rows.clone();
    dup[1] = dup[0];
    assert!(k
        .check_rows(&dup)
        .unwrap_err()
        .to_string()
        .contains("twice"));
    assert!(k.check_rows(&[rows_in as f32]).is_err());
    assert!(k.check_rows(&[0.5]).is_err());
}
