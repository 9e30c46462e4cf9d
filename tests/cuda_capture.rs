//! Stream capture and CUDA graphs on the driver dfpo runs on (a real GPU, or the emulated driver
//! of tools/emu, whose tools/cuda-emu/graph.cpp these tests pin down): work queued on a
//! capturing stream is recorded, not run; a graph launch replays it, as often as launched, with
//! the kernel parameters and GEMM scalars the capture saw; a synchronous call during capture
//! fails and invalidates the capture.

use std::sync::Arc;

use cudarc::driver::sys::{
    CUgraphInstantiate_flags, CUresult, CUstreamCaptureMode, CUstreamCaptureStatus,
};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use dfpo::device::{cuda_for_test, CudaDevice};
use dfpo::model::ops::gpu;

const THREAD_LOCAL: CUstreamCaptureMode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;

fn bf(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

fn ptr<T>(dev: &CudaDevice, s: &CudaSlice<T>) -> u64 {
    let (p, _g) = s.device_ptr(dev.stream());
    p
}

/// `y[..n] += x[..n]` (decoder_add_bf16) queued on the device's stream, `n` pushed by reference
/// (cudarc copies the value the pointer shows at launch time).
fn add(dev: &CudaDevice, x: u64, y: u64, n: &i64) -> Result<(), dfpo::Error> {
    let f = dev.function("decoder", "decoder_add_bf16").unwrap();
    let mut a = dev.launch_builder(&f);
    a.arg(&x).arg(&y).arg(n);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match decoder_add_bf16(x, y, n); both buffers hold at least n bf16.
    unsafe { dev.launch("decoder_add_bf16", a, cfg) }
}

fn status(dev: &CudaDevice) -> CUstreamCaptureStatus {
    dev.stream().capture_status().unwrap()
}

fn setup(test: &str) -> Option<(Arc<CudaDevice>, CudaSlice<u16>, CudaSlice<u16>)> {
    let dev = cuda_for_test(test)?;
    let st = dev.stream();
    let x = st.clone_htod(&[bf(1.0); 8]).unwrap();
    let y = st.clone_htod(&[bf(2.0); 8]).unwrap();
    // Load the kernel (a module load allocates) before any capture.
    dev.function("decoder", "decoder_add_bf16").unwrap();
    dev.synchronize().unwrap();
    Some((dev, x, y))
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn captured_launches_run_only_when_the_graph_is_launched() {
    let Some((dev, x, y)) = setup("captured_launches_run_only_when_the_graph_is_launched") else {
        return;
    };
    let st = dev.stream().clone();
    let (xp, yp) = (ptr(&dev, &x), ptr(&dev, &y));
    assert_eq!(
        status(&dev),
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
    );
    st.begin_capture(THREAD_LOCAL).unwrap();
    assert_eq!(
        status(&dev),
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE
    );
    // Two launches: all 8 elements, then the first 3 again. `n` changes after each launch is
    // recorded: the graph must keep the values it was captured with.
    let mut n = 8i64;
    add(&dev, xp, yp, &n).unwrap();
    n = 3;
    add(&dev, xp, yp, &n).unwrap();
    n = 0;
    let g = st
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph with two launches");
    assert_eq!(n, 0);
    assert_eq!(
        status(&dev),
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
    );
    assert_eq!(
        st.clone_dtoh(&y).unwrap(),
        vec![bf(2.0); 8],
        "a captured launch ran before the graph was launched"
    );
    let want = |k: f32| {
        let mut v = vec![bf(2.0 + 2.0 * k); 3];
        v.extend(vec![bf(2.0 + k); 5]);
        v
    };
    g.launch().unwrap();
    assert_eq!(st.clone_dtoh(&y).unwrap(), want(1.0), "first replay");
    g.launch().unwrap();
    g.launch().unwrap();
    assert_eq!(st.clone_dtoh(&y).unwrap(), want(3.0), "three replays");
    // Direct launches after the capture run at once again.
    add(&dev, xp, yp, &8).unwrap();
    let mut w = want(3.0);
    w.iter_mut()
        .for_each(|e| *e = bf(half::bf16::from_bits(*e).to_f32() + 1.0));
    assert_eq!(st.clone_dtoh(&y).unwrap(), w);
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn captured_gemm_keeps_its_scalars_and_replays() {
    let Some((dev, _x, _y)) = setup("captured_gemm_keeps_its_scalars_and_replays") else {
        return;
    };
    let st = dev.stream().clone();
    let (m, n, k) = (3usize, 4usize, 5usize);
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.5 - 1.5).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.25 - 0.5).collect();
    let ad = st
        .clone_htod(&a.iter().map(|&v| bf(v)).collect::<Vec<_>>())
        .unwrap();
    let bd = st
        .clone_htod(&b.iter().map(|&v| bf(v)).collect::<Vec<_>>())
        .unwrap();
    let c0: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
    let cd = st.clone_htod(&c0).unwrap();
    dev.blas().unwrap(); // the handle is created (and allocates) before the capture
    dev.synchronize().unwrap();
    let (ap, bp, cp) = (ptr(&dev, &ad), ptr(&dev, &bd), ptr(&dev, &cd));
    st.begin_capture(THREAD_LOCAL).unwrap();
    // C = A·B + 1·C; beta is read by the call (host pointer mode), so the graph keeps 1.0.
    let mut beta = 1.0f32;
    // SAFETY: A is m×k (ld m), B k×n (ld k), C m×n fp32 (ld m).
    unsafe { gpu::gemm(&dev, false, false, m, n, k, ap, m, bp, k, beta, cp, m, true) }.unwrap();
    beta = 0.0;
    let g = st
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .unwrap();
    assert_eq!(beta, 0.0);
    assert_eq!(
        st.clone_dtoh(&cd).unwrap(),
        c0,
        "the GEMM ran during capture"
    );
    let prod: Vec<f32> = (0..m * n)
        .map(|idx| {
            let (i, j) = (idx % m, idx / m);
            (0..k).map(|p| a[p * m + i] * b[j * k + p]).sum()
        })
        .collect();
    for reps in 1..=2 {
        g.launch().unwrap();
        let c = st.clone_dtoh(&cd).unwrap();
        for idx in 0..m * n {
            let want = c0[idx] + reps as f32 * prod[idx];
            assert!(
                (c[idx] - want).abs() <= 1e-4,
                "replay {reps}: C[{idx}] = {} want {want}",
                c[idx]
            );
        }
    }
}

fn code(e: &cudarc::driver::DriverError) -> CUresult {
    e.0
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn a_synchronous_call_during_capture_fails_and_invalidates_it() {
    let Some((dev, x, y)) = setup("a_synchronous_call_during_capture_fails_and_invalidates_it")
    else {
        return;
    };
    let st = dev.stream().clone();
    let (xp, yp) = (ptr(&dev, &x), ptr(&dev, &y));
    let host = [bf(9.0); 8];

    // A synchronous host-to-device copy on the capturing thread.
    st.begin_capture(THREAD_LOCAL).unwrap();
    add(&dev, xp, yp, &8).unwrap();
    dev.make_current().unwrap();
    // SAFETY: y holds 8 bf16.
    let r = unsafe { cudarc::driver::result::memcpy_htod_sync(yp, &host) };
    assert_eq!(
        r.as_ref().map_err(code),
        Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED),
        "cuMemcpyHtoD during capture"
    );
    assert_eq!(
        status(&dev),
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_INVALIDATED
    );
    let e = st.end_capture(CUgraphInstantiate_flags(0));
    assert_eq!(
        e.err().as_ref().map(code),
        Some(CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED),
        "end of an invalidated capture"
    );
    assert_eq!(
        status(&dev),
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
    );

    // Synchronizing the capturing stream.
    st.begin_capture(THREAD_LOCAL).unwrap();
    add(&dev, xp, yp, &8).unwrap();
    assert_eq!(
        st.synchronize().as_ref().map_err(code),
        Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED),
        "cuStreamSynchronize of the capturing stream"
    );
    assert!(st.end_capture(CUgraphInstantiate_flags(0)).is_err());

    // Neither capture ran its launch, and the refused copy wrote nothing.
    assert_eq!(st.clone_dtoh(&y).unwrap(), vec![bf(2.0); 8]);
    // The stream captures again afterwards.
    st.begin_capture(THREAD_LOCAL).unwrap();
    add(&dev, xp, yp, &8).unwrap();
    let g = st
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .unwrap();
    g.launch().unwrap();
    assert_eq!(st.clone_dtoh(&y).unwrap(), vec![bf(3.0); 8]);
}
