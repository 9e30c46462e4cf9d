//! Flow-head benches: one Euler step of `integrate` (the value readout) and `eval` forward +
//! backward (the training path). CPU always, at a small size; CUDA when a GPU is present, at the
//! perf-model size (32768 tokens × K 32, width 256, depth 3). Throughput is in rows (samples)/s;
//! the CUDA integrate also prints its achieved FLOP/s against the fp32 FMA lead of ~67 TFLOP/s
//! (docs/perf-model.md). FLOPs = rows·steps·(depth−1)·2·H² (the hidden matmuls; the rest is small).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cudarc::driver::{DevicePtr, DevicePtrMut};
use dfpo::kernels::flow::{cpu, cuda, init_params, FlowHeadShape, IntegrateOpts, Interval, Solver};

const WIDTH: usize = 256;
const DEPTH: usize = 3;
const K: usize = 32;
const COND: usize = 896;
const CPU_TOKENS: usize = 64;
const GPU_TOKENS: usize = 32768;
const FP32_PEAK_TFLOPS: f64 = 67.0;

fn inputs(n_tok: usize) -> (FlowHeadShape, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let shape = FlowHeadShape::new(COND, WIDTH, DEPTH).unwrap();
    let params = init_params(&shape, 7);
    let rows = n_tok * K;
    let u: Vec<f32> = (0..n_tok * WIDTH)
        .map(|i| ((i as f32) * 0.37).sin())
        .collect();
    let z: Vec<f32> = (0..rows).map(|i| ((i as f32) * 0.11).cos()).collect();
    let tau: Vec<f32> = (0..rows).map(|i| (i % 97) as f32 / 97.0).collect();
    (shape, params, u, z, tau)
}

fn one_step() -> IntegrateOpts {
    IntegrateOpts {
        steps: 1,
        solver: Solver::Euler,
        clip: None,
        jacobian: false,
    }
}

fn integrate_flops(rows: usize, steps: usize) -> f64 {
    (rows * steps * (DEPTH - 1) * 2 * WIDTH * WIDTH) as f64
}

fn bench_cpu(c: &mut Criterion) {
    let (shape, params, u, z, tau) = inputs(CPU_TOKENS);
    let rows = CPU_TOKENS * K;
    eprintln!(
        "flow CPU bench: {CPU_TOKENS} tokens × K {K} = {rows} rows, width {WIDTH}, depth {DEPTH}"
    );
    let mut g = c.benchmark_group("flow_cpu");
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(rows as u64));
    let mut z1 = vec![0.0f32; rows];
    g.bench_function(BenchmarkId::new("integrate_euler1", rows), |b| {
        b.iter(|| {
            cpu::integrate(
                &shape,
                &params,
                &u,
                K,
                &z,
                Interval::Uniform(0.0, 1.0),
                &one_step(),
                &mut z1,
                None,
            )
            .unwrap()
        })
    });
    let dv: Vec<f32> = (0..rows).map(|i| ((i as f32) * 0.7).sin()).collect();
    let mut v = vec![0.0f32; rows];
    let mut dp = vec![0.0f32; params.len()];
    let mut du = vec![0.0f32; u.len()];
    g.bench_function(BenchmarkId::new("eval_fwd_bwd", rows), |b| {
        b.iter(|| {
            cpu::eval_forward(&shape, &params, &u, K, &z, &tau, &mut v).unwrap();
            cpu::eval_backward(
                &shape, &params, &u, K, &z, &tau, &dv, &mut dp, &mut du, None,
            )
            .unwrap();
        })
    });
    g.finish();
}

fn bench_cuda(c: &mut Criterion) {
    let Some(dev) = dfpo::device::cuda_device() else {
        eprintln!(
            "flow CUDA bench skipped: no CUDA device ({})",
            dfpo::device::cuda_unavailable_reason()
        );
        return;
    };
    let (shape, params, u, z, tau) = inputs(GPU_TOKENS);
    let rows = GPU_TOKENS * K;
    eprintln!(
        "flow CUDA bench on {}: {GPU_TOKENS} tokens × K {K} = {rows} rows, width {WIDTH}, depth {DEPTH}",
        dev.name()
    );
    let s = dev.stream();
    let pd = s.clone_htod(&params).unwrap();
    let ud = s.clone_htod(&u).unwrap();
    let zd = s.clone_htod(&z).unwrap();
    let td = s.clone_htod(&tau).unwrap();
    let dvd = s.clone_htod(&vec![0.01f32; rows]).unwrap();
    let mut z1 = s.alloc_zeros::<f32>(rows).unwrap();
    let mut vd = s.alloc_zeros::<f32>(rows).unwrap();
    let mut dpd = s.alloc_zeros::<f32>(params.len()).unwrap();
    let mut dud = s.alloc_zeros::<f32>(u.len()).unwrap();
    let ws_len = cuda::eval_backward_workspace_len(&shape, GPU_TOKENS, K);
    let mut ws = s.alloc_zeros::<f32>(ws_len).unwrap();

    let integrate = |z1: &mut cudarc::driver::CudaSlice<f32>| {
        cuda::integrate(
            &dev,
            &shape,
            &pd.as_view(),
            &ud.as_view(),
            K,
            &zd.as_view(),
            cuda::DeviceInterval::Uniform(0.0, 1.0),
            &one_step(),
            &mut z1.as_view_mut(),
            None,
        )
        .unwrap()
    };
    // achieved FLOP/s of one Euler step, timed over a few launches
    integrate(&mut z1);
    dev.synchronize().unwrap();
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        integrate(&mut z1);
    }
    dev.synchronize().unwrap();
    let secs = t.elapsed().as_secs_f64() / reps as f64;
    let tflops = integrate_flops(rows, 1) / secs / 1e12;
    eprintln!(
        "flow CUDA integrate (1 Euler step): {:.3} ms, {:.1} M rows/s, {tflops:.2} TFLOP/s = {:.0}% of the {FP32_PEAK_TFLOPS} TFLOP/s fp32 lead",
        secs * 1e3,
        rows as f64 / secs / 1e6,
        100.0 * tflops / FP32_PEAK_TFLOPS
    );

    let mut g = c.benchmark_group("flow_cuda");
    g.sample_size(10);
    g.throughput(Throughput::Elements(rows as u64));
    g.bench_function(BenchmarkId::new("integrate_euler1", rows), |b| {
        b.iter(|| {
            integrate(&mut z1);
            dev.synchronize().unwrap();
        })
    });
    g.bench_function(BenchmarkId::new("eval_fwd_bwd", rows), |b| {
        b.iter(|| {
            cuda::eval_forward(
                &dev,
                &shape,
                &pd.as_view(),
                &ud.as_view(),
                K,
                &zd.as_view(),
                &td.as_view(),
                &mut vd.as_view_mut(),
            )
            .unwrap();
            let (p, _a) = pd.device_ptr(s);
            let (uu, _b) = ud.device_ptr(s);
            let (zz, _c) = zd.device_ptr(s);
            let (tt, _d) = td.device_ptr(s);
            let (g, _e) = dvd.device_ptr(s);
            let (dp, _f) = dpd.device_ptr_mut(s);
            let (du, _g) = dud.device_ptr_mut(s);
            let (w, _h) = ws.device_ptr_mut(s);
            // SAFETY: every buffer has the length the safe wrapper would check.
            unsafe {
                cuda::eval_backward_raw(
                    &dev, &shape, p, uu, K, zz, tt, g, dp, du, 0, GPU_TOKENS, w, ws_len,
                )
            }
            .unwrap();
            dev.synchronize().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench_cpu, bench_cuda);
criterion_main!(benches);
