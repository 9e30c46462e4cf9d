//! Benchmarks of kernels/attention.cu. Throughput is FLOPs as `Throughput::Elements`, so criterion's
//! "elem/s" reads as FLOP/s (Telem/s = TFLOP/s): causal forward 4·B·Hq·S²·D/2, backward 2.5× the
//! forward (fwd+bwd 3.5×), the usual FlashAttention accounting. Decode is bytes of KV cache read
//! (`Throughput::Bytes`, GB/s).
//! - CPU (always): the f32 reference, fwd and fwd+bwd at B=2, S=128, Hq=4, Hkv=2, D=64.
//! - CUDA (when a device is present): causal fwd, bwd and fwd+bwd at B=4, S=2048 for
//!   (Hq, Hkv, D) = (16, 16, 128), (16, 4, 128) [GQA], (16, 16, 64), (14, 2, 64) [GQA, Qwen2-0.5B
//!   heads]; the backward at the small batch B=8, S=512 with the Qwen2-0.5B heads (Hq 14, Hkv 2,
//!   D 64) with the dK/dV kernel's GQA group in 1 (unsplit: 128 CTAs), 2, 4 (the automatic
//!   choice) and 7 slices; decode at B=64, Hq=14, Hkv=2, D=64 over a 2048-long cache. Launches are queued back
//!   to back, one synchronisation per batch of iterations. The same shapes run through PyTorch
//!   in tools/reference/torch_attention_bench.py.
//!
//! `cargo bench --bench attention -- --warm-up-time 1 --measurement-time 2`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use dfpo::device::CudaDevice;
use dfpo::kernels::attention::{cpu, cuda, softmax_scale};

/// Deterministic inputs without a test-only dependency.
struct Gen(u64);
impl Gen {
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self.0.wrapping_add(1);
                lo + (hi - lo) * dfpo::kernels::uniform_open(0xa77e, self.0) as f32
            })
            .collect()
    }
}

fn fwd_flops(b: usize, s: usize, hq: usize, d: usize) -> u64 {
    (4 * b * hq * s * s * d / 2) as u64
}

fn bench_cpu(c: &mut Criterion) {
    let (b, s, hq, hkv, d) = (2usize, 128usize, 4usize, 2usize, 64usize);
    println!("attention CPU bench (f32 reference): B={b} S={s} Hq={hq} Hkv={hkv} D={d}, causal");
    let mut g = Gen(1);
    let q = g.vec(b * s * hq * d, -1.0, 1.0);
    let k = g.vec(b * s * hkv * d, -1.0, 1.0);
    let v = g.vec(b * s * hkv * d, -1.0, 1.0);
    let dout = g.vec(b * s * hq * d, -1.0, 1.0);
    let lens = vec![s as u32; b];
    let scale = softmax_scale(d);
    let mut out = vec![0.0f32; b * s * hq * d];
    let mut lse = vec![0.0f32; b * hq * s];
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; b * s * hq * d],
        vec![0.0f32; b * s * hkv * d],
        vec![0.0f32; b * s * hkv * d],
    );
    let fl = fwd_flops(b, s, hq, d);
    let mut grp = c.benchmark_group("attention_cpu");
    grp.sample_size(10);
    grp.throughput(Throughput::Elements(fl));
    grp.bench_function("fwd_b2_s128_h4_kv2_d64", |bch| {
        bch.iter(|| {
            cpu::attention_forward(
                &q, &k, &v, &lens, b, s, hq, hkv, d, scale, &mut out, &mut lse,
            )
            .unwrap()
        })
    });
    grp.throughput(Throughput::Elements(fl * 7 / 2));
    grp.bench_function("fwd_bwd_b2_s128_h4_kv2_d64", |bch| {
        bch.iter(|| {
            cpu::attention_forward(
                &q, &k, &v, &lens, b, s, hq, hkv, d, scale, &mut out, &mut lse,
            )
            .unwrap();
            cpu::attention_backward(
                &q, &k, &v, &out, &lse, &dout, &lens, b, s, hq, hkv, d, scale, &mut dq, &mut dk,
                &mut dv,
            )
            .unwrap()
        })
    });
    grp.finish();
}

/// Times `iters` back-to-back launches with one synchronisation at the end.
fn timed(dev: &CudaDevice, iters: u64, mut launch: impl FnMut()) -> Duration {
    dev.synchronize().unwrap();
    let t0 = Instant::now();
    for _ in 0..iters {
        launch();
    }
    dev.synchronize().unwrap();
    t0.elapsed()
}

fn up_bf16(dev: &CudaDevice, x: &[f32]) -> CudaSlice<u16> {
    let bits: Vec<u16> = x
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    dev.stream().clone_htod(&bits).unwrap()
}

fn bench_cuda(c: &mut Criterion) {
    let Some(dev) = dfpo::device::cuda_device() else {
        println!(
            "attention CUDA bench skipped: no CUDA device ({})",
            dfpo::device::cuda_unavailable_reason()
        );
        return;
    };
    let st = dev.stream().clone();
    // bf16 dense tensor-core rate measured on the lent machines (docs/perf-model.md).
    let peak = 790e12;
    let mut grp = c.benchmark_group("attention_cuda");
    grp.sample_size(10);
    let (b, s) = (4usize, 2048usize);
    for &(hq, hkv, d) in &[
        (16usize, 16usize, 128usize),
        (16, 4, 128),
        (16, 16, 64),
        (14, 2, 64),
    ] {
        let mut g = Gen(7);
        let nq = b * s * hq * d;
        let nk = b * s * hkv * d;
        let q = up_bf16(&dev, &g.vec(nq, -1.0, 1.0));
        let k = up_bf16(&dev, &g.vec(nk, -1.0, 1.0));
        let v = up_bf16(&dev, &g.vec(nk, -1.0, 1.0));
        let dout = up_bf16(&dev, &g.vec(nq, -1.0, 1.0));
        let lens = st.clone_htod(&vec![s as u32; b]).unwrap();
        let mut out = st.alloc_zeros::<u16>(nq).unwrap();
        let mut lse = st.alloc_zeros::<f32>(b * hq * s).unwrap();
        let mut dq = st.alloc_zeros::<u16>(nq).unwrap();
        let mut dk = st.alloc_zeros::<u16>(nk).unwrap();
        let mut dv = st.alloc_zeros::<u16>(nk).unwrap();
        let mut ws = st
            .alloc_zeros::<f32>(cuda::bwd_workspace_len(b, s, hq, hkv, d))
            .unwrap();
        let (qp, _g1) = q.device_ptr(&st);
        let (kp, _g2) = k.device_ptr(&st);
        let (vp, _g3) = v.device_ptr(&st);
        let (dop, _g4) = dout.device_ptr(&st);
        let (lp, _g5) = lens.device_ptr(&st);
        let (op, _g6) = out.device_ptr_mut(&st);
        let (sp, _g7) = lse.device_ptr_mut(&st);
        let (dqp, _g8) = dq.device_ptr_mut(&st);
        let (dkp, _g9) = dk.device_ptr_mut(&st);
        let (dvp, _g10) = dv.device_ptr_mut(&st);
        let (wp, _g11) = ws.device_ptr_mut(&st);
        let scale = softmax_scale(d);
        let fwd = || unsafe {
            cuda::attention_fwd_raw(&dev, qp, kp, vp, lp, b, s, hq, hkv, d, scale, op, sp).unwrap()
        };
        let bwd = || unsafe {
            cuda::attention_bwd_raw(
                &dev, qp, kp, vp, op, sp, dop, lp, b, s, hq, hkv, d, scale, dqp, dkp, dvp, wp,
            )
            .unwrap()
        };
        fwd();
        dev.synchronize().unwrap();
        let fl = fwd_flops(b, s, hq, d);
        let tag = format!("b{b}_s{s}_h{hq}_kv{hkv}_d{d}");
        println!(
            "attention CUDA {tag}: causal fwd {:.3} TFLOP, floor {:.1} µs at {:.0} TFLOP/s bf16 ({})",
            fl as f64 / 1e12,
            fl as f64 / peak * 1e6,
            peak / 1e12,
            dev.name()
        );
        grp.throughput(Throughput::Elements(fl));
        grp.bench_function(format!("fwd_{tag}"), |bch| {
            bch.iter_custom(|iters| timed(&dev, iters, fwd))
        });
        grp.throughput(Throughput::Elements(fl * 5 / 2));
        grp.bench_function(format!("bwd_{tag}"), |bch| {
            bch.iter_custom(|iters| timed(&dev, iters, bwd))
        });
        grp.throughput(Throughput::Elements(fl * 7 / 2));
        grp.bench_function(format!("fwd_bwd_{tag}"), |bch| {
            bch.iter_custom(|iters| {
                timed(&dev, iters, || {
                    fwd();
                    bwd()
                })
            })
        });
    }

    // Backward at a small batch: the dK/dV kernel's grid is under one wave unsplit.
    let (b, s, hq, hkv, d) = (8usize, 512usize, 14usize, 2usize, 64usize);
    let mut g = Gen(9);
    let (nq, nk) = (b * s * hq * d, b * s * hkv * d);
    let q = up_bf16(&dev, &g.vec(nq, -1.0, 1.0));
    let k = up_bf16(&dev, &g.vec(nk, -1.0, 1.0));
    let v = up_bf16(&dev, &g.vec(nk, -1.0, 1.0));
    let dout = up_bf16(&dev, &g.vec(nq, -1.0, 1.0));
    let lens = st.clone_htod(&vec![s as u32; b]).unwrap();
    let mut out = st.alloc_zeros::<u16>(nq).unwrap();
    let mut lse = st.alloc_zeros::<f32>(b * hq * s).unwrap();
    let mut dq = st.alloc_zeros::<u16>(nq).unwrap();
    let mut dk = st.alloc_zeros::<u16>(nk).unwrap();
    let mut dv = st.alloc_zeros::<u16>(nk).unwrap();
    let g_max = hq / hkv;
    let mut ws = st
        .alloc_zeros::<f32>(cuda::bwd_workspace_len_split(b, s, hq, hkv, d, g_max))
        .unwrap();
    let (qp, _g1) = q.device_ptr(&st);
    let (kp, _g2) = k.device_ptr(&st);
    let (vp, _g3) = v.device_ptr(&st);
    let (dop, _g4) = dout.device_ptr(&st);
    let (lp, _g5) = lens.device_ptr(&st);
    let (op, _g6) = out.device_ptr_mut(&st);
    let (sp, _g7) = lse.device_ptr_mut(&st);
    let (dqp, _g8) = dq.device_ptr_mut(&st);
    let (dkp, _g9) = dk.device_ptr_mut(&st);
    let (dvp, _g10) = dv.device_ptr_mut(&st);
    let (wp, _g11) = ws.device_ptr_mut(&st);
    let scale = softmax_scale(d);
    unsafe { cuda::attention_fwd_raw(&dev, qp, kp, vp, lp, b, s, hq, hkv, d, scale, op, sp) }
        .unwrap();
    dev.synchronize().unwrap();
    let fl = fwd_flops(b, s, hq, d);
    let auto = cuda::bwd_splits(b, s, hq, hkv);
    println!(
        "attention CUDA small-batch bwd B={b} S={s} Hq={hq} Hkv={hkv} D={d}: automatic split {auto} \
         of G={g_max}; {} SMs ({})",
        dev.sm_count(),
        dev.name()
    );
    grp.throughput(Throughput::Elements(fl * 5 / 2));
    for splits in [1usize, 2, 4, 7] {
        let l = cuda::launches_split(b, s, hq, hkv, d, splits).unwrap();
        println!(
            "  split {splits}: dK/dV grid {:?}, workspace {} f32",
            l.bwd.grid_dim,
            cuda::bwd_workspace_len_split(b, s, hq, hkv, d, splits)
        );
        grp.bench_function(
            format!("bwd_split{splits}_b{b}_s{s}_h{hq}_kv{hkv}_d{d}"),
            |bch| {
                bch.iter_custom(|iters| {
                    timed(&dev, iters, || unsafe {
                        cuda::attention_bwd_split_raw(
                            &dev, qp, kp, vp, op, sp, dop, lp, b, s, hq, hkv, d, scale, dqp, dkp,
                            dvp, wp, splits,
                        )
                        .unwrap()
                    })
                })
            },
        );
    }

    // Decode: one new token per sequence over a full 2048-long cache.
    let (b, hq, hkv, d, max_len) = (64usize, 14usize, 2usize, 64usize, 2048usize);
    let mut g = Gen(11);
    let nc = b * hkv * max_len * d;
    let q = up_bf16(&dev, &g.vec(b * hq * d, -1.0, 1.0));
    let kc = up_bf16(&dev, &g.vec(nc, -1.0, 1.0));
    let vc = up_bf16(&dev, &g.vec(nc, -1.0, 1.0));
    let lens = st.clone_htod(&vec![max_len as u32; b]).unwrap();
    let mut out = st.alloc_zeros::<u16>(b * hq * d).unwrap();
    let mut ws = st
        .alloc_zeros::<f32>(cuda::decode_workspace_len(b, hq, hkv, max_len, d))
        .unwrap();
    let (qp, _g1) = q.device_ptr(&st);
    let (kp, _g2) = kc.device_ptr(&st);
    let (vp, _g3) = vc.device_ptr(&st);
    let (lp, _g4) = lens.device_ptr(&st);
    let (op, _g5) = out.device_ptr_mut(&st);
    let (wp, _g6) = ws.device_ptr_mut(&st);
    let bytes = (2 * nc * 2) as u64;
    let bw = if dev.name().contains("H200") {
        4.3e12
    } else {
        3.0e12
    };
    let (splits, split_len) = cuda::decode_splits(b, hkv, max_len);
    println!(
        "attention CUDA decode B={b} Hq={hq} Hkv={hkv} D={d} cache {max_len}: {bytes} bytes of cache, \
         floor {:.2} µs at {:.1} TB/s; {splits} splits of {split_len}",
        bytes as f64 / bw * 1e6,
        bw / 1e12
    );
    grp.throughput(Throughput::Bytes(bytes));
    grp.bench_function(
        format!("decode_b{b}_h{hq}_kv{hkv}_d{d}_len{max_len}"),
        |bch| {
            bch.iter_custom(|iters| {
                timed(&dev, iters, || unsafe {
                    cuda::decode_attention_raw(
                        &dev,
                        qp,
                        kp,
                        vp,
                        lp,
                        b,
                        hq,
                        hkv,
                        max_len,
                        d,
                        softmax_scale(d),
                        op,
                        wp,
                    )
                    .unwrap()
                })
            })
        },
    );
    grp.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_cpu, bench_cuda
}
criterion_main!(benches);
