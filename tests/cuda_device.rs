//! The device layer on CUDA: raw driver and cuBLAS calls from threads that never made the context
//! current, one cuBLAS handle per `CudaDevice` (each bound to its own stream), and launches whose
//! grid is empty in y or z, and the argument sizes a launch records (the emulated driver checks
//! them against the kernel's signature). The launch-limit checks themselves are unit tests in
//! src/device.

mod common;

use std::sync::Arc;

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use dfpo::device::{cuda_for_test, CudaDevice};
use dfpo::model::ops::gpu;

fn bf(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// Column-major C (m×n, f32) = A (m×k) · B (k×n) with bf16 A and B, via `gpu::gemm` on `dev`,
/// checked against a CPU product of the same bf16 values.
fn gemm_matches_cpu(dev: &CudaDevice) {
    let (m, n, k) = (5usize, 7usize, 9usize);
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.25)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.125)
        .collect();
    let st = dev.stream();
    let ad = st
        .clone_htod(&a.iter().map(|&x| bf(x)).collect::<Vec<_>>())
        .unwrap();
    let bd = st
        .clone_htod(&b.iter().map(|&x| bf(x)).collect::<Vec<_>>())
        .unwrap();
    let mut cd = st.clone_htod(&vec![f32::NAN; m * n]).unwrap();
    {
        let (ap, _ga) = ad.device_ptr(st);
        let (bp, _gb) = bd.device_ptr(st);
        let (cp, _gc) = cd.device_ptr_mut(st);
        // SAFETY: the buffers hold m·k, k·n and m·n elements with leading dimensions m, k, m.
        unsafe { gpu::gemm(dev, false, false, m, n, k, ap, m, bp, k, 0.0, cp, m, true) }.unwrap();
    }
    let c = st.clone_dtoh(&cd).unwrap();
    for j in 0..n {
        for i in 0..m {
            let want: f32 = (0..k).map(|p| a[p * m + i] * b[j * k + p]).sum();
            assert!(
                (c[j * m + i] - want).abs() <= 1e-5,
                "C[{i}][{j}] = {} want {want}",
                c[j * m + i]
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_raw_calls_work_on_a_fresh_thread() {
    let Some(dev) = cuda_for_test("cuda_raw_calls_work_on_a_fresh_thread") else {
        return;
    };
    let src: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let st = dev.stream();
    let sd = st.clone_htod(&src).unwrap();
    let mut dd = st.alloc_zeros::<f32>(src.len()).unwrap();
    let (sp, dp) = {
        let (sp, _g1) = sd.device_ptr(st);
        let (dp, _g2) = dd.device_ptr_mut(st);
        (sp, dp)
    };
    st.synchronize().unwrap();
    // Each thread's FIRST CUDA call is a raw one: the context is not current there yet.
    let d = dev.clone();
    std::thread::spawn(move || {
        // SAFETY: both buffers hold 1000 f32 and outlive the thread (joined below).
        unsafe { gpu::copy(&d, dp, sp, 4000) }.unwrap();
        d.synchronize().unwrap();
    })
    .join()
    .unwrap();
    assert_eq!(st.clone_dtoh(&dd).unwrap(), src);
    let d = dev.clone();
    std::thread::spawn(move || gemm_matches_cpu(&d))
        .join()
        .unwrap();
}

/// The stream a cuBLAS handle queues on.
fn blas_stream(dev: &CudaDevice) -> usize {
    let h = dev.blas().unwrap();
    let mut s: cudarc::cublas::sys::cudaStream_t = std::ptr::null_mut();
    // SAFETY: a live handle and a valid out-pointer.
    let r = unsafe { cudarc::cublas::sys::cublasGetStream_v2(*h.handle(), &mut s) };
    assert_eq!(
        r,
        cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
    );
    s as usize
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_each_device_has_a_blas_handle_on_its_own_stream() {
    let Some(dev0) = cuda_for_test("cuda_each_device_has_a_blas_handle_on_its_own_stream") else {
        return;
    };
    let dev1: Arc<CudaDevice> = CudaDevice::new(dev0.ordinal()).unwrap();
    assert_ne!(
        dev0.stream().cu_stream() as usize,
        dev1.stream().cu_stream() as usize
    );
    for d in [&dev0, &dev1] {
        assert_eq!(blas_stream(d), d.stream().cu_stream() as usize);
        gemm_matches_cpu(d);
    }
    assert!(!Arc::ptr_eq(&dev0.blas().unwrap(), &dev1.blas().unwrap()));
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_empty_grid_in_y_or_z_is_skipped() {
    let Some(dev) = cuda_for_test("cuda_empty_grid_in_y_or_z_is_skipped") else {
        return;
    };
    // decoder_add_bf16(x, y, n): y += x. Any empty grid dimension must launch nothing (and not
    // reach the driver, which rejects it); a non-empty one must run.
    let st = dev.stream();
    let x = st.clone_htod(&[bf(1.0); 4]).unwrap();
    let mut y = st.clone_htod(&[bf(2.0); 4]).unwrap();
    let f = dev.function("decoder", "decoder_add_bf16").unwrap();
    for grid in [(1, 0, 1), (1, 1, 0), (0, 1, 1), (1, 1, 1)] {
        let (xp, _gx) = x.device_ptr(st);
        let (yp, _gy) = y.device_ptr_mut(st);
        let n = 4i64;
        let mut a = dev.launch_builder(&f);
        a.arg(&xp).arg(&yp).arg(&n);
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match decoder_add_bf16; both buffers hold 4 bf16.
        unsafe { dev.launch("decoder_add_bf16", a, cfg) }.unwrap();
    }
    dev.synchronize().unwrap();
    assert_eq!(st.clone_dtoh(&y).unwrap(), vec![bf(3.0); 4]);
}

/// A launch records the byte size of every argument it pushes, and the emulated driver refuses a
/// launch whose sizes differ from the kernel's signature, naming kernel and parameter: here a
/// u32 where decoder_add_bf16(x, y, long long n) takes 8 bytes, and a missing argument. A real
/// GPU's driver cannot check this (cudarc passes only `void**`): there the recorded sizes are
/// compared with the embedded PTX's parameter list and the wrong launch is not made.
#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_launch_argument_sizes_are_checked() {
    let Some(dev) = cuda_for_test("cuda_launch_argument_sizes_are_checked") else {
        return;
    };
    // Under tools/emu the loaded libcuda must be the emulator (its entry points found), so the
    // check below cannot silently not run.
    assert_eq!(
        dev.is_emulated(),
        dfpo::device::emulated(),
        "DFPO_EMU=1 but the emulator's entry points are missing (or the reverse)"
    );
    let st = dev.stream();
    let x = st.clone_htod(&[bf(1.0); 4]).unwrap();
    let mut y = st.clone_htod(&[bf(2.0); 4]).unwrap();
    let f = dev.function("decoder", "decoder_add_bf16").unwrap();
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n_ok, n_bad) = (4i64, 4u32);
    if let Some(ptx) = dfpo::device::embedded::get("decoder").and_then(|k| k.ptx) {
        assert_eq!(common::ptx_param_sizes(ptx, "decoder_add_bf16"), [8, 8, 8]);
    }
    {
        let mut a = dev.launch_builder(&f);
        a.arg(&x).arg(&mut y).arg(&n_bad);
        assert_eq!(a.param_sizes(), [8, 8, 4]);
        if dev.is_emulated() {
            // SAFETY: the emulator refuses the launch before any kernel code runs.
            let e = unsafe { dev.launch("decoder_add_bf16", a, cfg) }
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("decoder_add_bf16")
                    && e.contains("parameter 2 is 8 bytes")
                    && e.contains("pushed 4 bytes"),
                "{e}"
            );
        }
    }
    if dev.is_emulated() {
        let mut a = dev.launch_builder(&f);
        a.arg(&x).arg(&mut y);
        // SAFETY: refused before launching, as above.
        let e = unsafe { dev.launch("decoder_add_bf16", a, cfg) }
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("takes 3 parameters") && e.contains("pushed 2"),
            "{e}"
        );
    }
    // The right sizes launch, and nothing ran before.
    let mut a = dev.launch_builder(&f);
    a.arg(&x).arg(&mut y).arg(&n_ok);
    assert_eq!(a.param_sizes(), [8, 8, 8]);
    // SAFETY: the arguments match decoder_add_bf16; both buffers hold 4 bf16.
    unsafe { dev.launch("decoder_add_bf16", a, cfg) }.unwrap();
    dev.synchronize().unwrap();
    assert_eq!(st.clone_dtoh(&y).unwrap(), vec![bf(3.0); 4]);
}
