//! Benchmarks of kernels/xent.cu, sample.cu and adamw.cu. CPU always (the f32 references, at
//! reduced sizes that are printed); CUDA when a device is present, at the perf-model sizes:
//! xent forward / backward at N = 8192 tokens × V = 151936 (bf16 logits), sampling of 64 rows ×
//! 151936, AdamW and the gradient norm over 500M parameters. Throughput is in bytes moved at the
//! minimum (criterion prints GB/s): xent forward reads the logits (N·V·2 B on the GPU), the
//! backward reads logits and d_logits and writes d_logits (3·N·V·2 B); sampling reads the
//! logits once; AdamW reads p, g, m, v and writes p, m, v and the bf16 copy (30 B/param; the
//! perf model's "~18 B/param" undercounts fp32 moments); the norm reads g (4 B/param). The CUDA
//! part also prints each kernel's bandwidth floor.
//!
//! `cargo bench --bench lmops -- --warm-up-time 1 --measurement-time 2`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use dfpo::device::CudaDevice;
use dfpo::kernels::adamw::{self, AdamWParams};
use dfpo::kernels::sample::{self, SampleParams};
use dfpo::kernels::xent;

const V: usize = 151_936;
const XENT_N: usize = 8192;
const SAMPLE_N: usize = 64;
const ADAMW_N: usize = 500_000_000;

/// Reduced CPU sizes (the references are single-threaded).
const CPU_XENT_N: usize = 8;
const CPU_SAMPLE_N: usize = 8;
const CPU_SAMPLE_FILTERED_N: usize = 2;
const CPU_ADAMW_N: usize = 4_000_000;

/// Deterministic inputs without a test-only dependency.
struct Gen(u64);
impl Gen {
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(1);
        dfpo::kernels::uniform_open(0x5eed, self.0) as f32
    }
    /// Roughly LM-like logits: a uniform bulk with a few strong tokens per row.
    fn logits(&mut self, n: usize, v: usize) -> Vec<f32> {
        let mut z: Vec<f32> = (0..n * v).map(|_| 6.0 * self.uniform() - 3.0).collect();
        for r in 0..n {
            for i in 0..16 {
                let j = (self.uniform() * v as f32) as usize % v;
                z[r * v + j] = 12.0 - i as f32 * 0.5;
            }
        }
        z
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.uniform()).collect()
    }
}

fn filtered() -> SampleParams {
    SampleParams {
        temperature: 0.8,
        top_k: 50,
        top_p: 0.9,
    }
}

fn bench_cpu(c: &mut Criterion) {
    let mut gen = Gen(1);
    let mut g = c.benchmark_group("lmops_cpu");
    g.sample_size(10);

    // xent at N = 8 rows × V (f32 logits on the CPU).
    let n = CPU_XENT_N;
    let z = gen.logits(n, V);
    let tg: Vec<u32> = (0..n as u32).map(|r| r * 977 % V as u32).collect();
    println!("lmops CPU bench: xent N={n} V={V}; sample {CPU_SAMPLE_N} rows (filtered: {CPU_SAMPLE_FILTERED_N}) x V={V}; adamw / grad_norm {CPU_ADAMW_N} params");
    let (mut lp, mut lse, mut ent) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    g.throughput(Throughput::Bytes((n * V * 4) as u64));
    g.bench_function("xent_fwd 8x151936 f32", |b| {
        b.iter(|| xent::cpu::forward(&z, &tg, n, V, 1.0, &mut lp, &mut lse, &mut ent).unwrap())
    });
    let (glp, gh) = (vec![1.0f32; n], vec![0.1f32; n]);
    let mut d = vec![0.0f32; n * V];
    g.throughput(Throughput::Bytes((3 * n * V * 4) as u64));
    g.bench_function("xent_bwd 8x151936 f32", |b| {
        b.iter(|| {
            xent::cpu::backward(
                &z,
                &tg,
                n,
                V,
                1.0,
                &lse,
                &ent,
                Some(&glp),
                Some(&gh),
                &mut d,
            )
            .unwrap()
        })
    });
    drop(d);

    // Sampling.
    let zs = gen.logits(CPU_SAMPLE_N, V);
    for (name, p, rows) in [
        ("sample T=1 8x151936", SampleParams::default(), CPU_SAMPLE_N),
        (
            "sample top-k50 top-p0.9 2x151936",
            filtered(),
            CPU_SAMPLE_FILTERED_N,
        ),
    ] {
        let mut tok = vec![0u32; rows];
        let (mut a, mut b2) = (vec![0.0f32; rows], vec![0.0f32; rows]);
        g.throughput(Throughput::Bytes((rows * V * 4) as u64));
        let mut counter = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                counter += rows as u64;
                sample::cpu::sample(
                    &zs[..rows * V],
                    rows,
                    V,
                    &p,
                    7,
                    counter,
                    &mut tok,
                    &mut a,
                    &mut b2,
                    None,
                )
                .unwrap()
            })
        });
    }

    // AdamW and the norm.
    let n = CPU_ADAMW_N;
    let mut p = gen.vec(n, -1.0, 1.0);
    let grad = gen.vec(n, -1e-2, 1e-2);
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut pb = vec![0u16; n];
    let hp = AdamWParams::default();
    g.throughput(Throughput::Bytes((30 * n) as u64));
    let mut step = 0u64;
    g.bench_function("adamw 4M params", |b| {
        b.iter(|| {
            step += 1;
            adamw::cpu::step(&mut p, &grad, &mut m, &mut v, Some(&mut pb), &hp, step, 0.9).unwrap()
        })
    });
    g.throughput(Throughput::Bytes((4 * n) as u64));
    g.bench_function("grad_norm 4M", |b| {
        b.iter(|| adamw::cpu::grad_norm(&[&grad[..]]))
    });
    g.finish();
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

fn floor_line(dev: &CudaDevice, what: &str, bytes: u64) {
    // Copy bandwidth measured on the lent machines (docs/perf-model.md).
    let bw = if dev.name().contains("H200") {
        4.3e12
    } else {
        3.0e12
    };
    println!(
        "lmops CUDA {what}: {bytes} bytes, bandwidth floor {:.1} µs at {:.1} TB/s ({})",
        bytes as f64 / bw * 1e6,
        bw / 1e12,
        dev.name()
    );
}

fn bf16_bits(x: &[f32]) -> Vec<u16> {
    x.iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect()
}

/// `n`·V bf16 logits on the device: 64 generated rows, replicated by device copies.
fn device_logits(dev: &CudaDevice, gen: &mut Gen, n: usize) -> CudaSlice<u16> {
    let s = dev.stream();
    let block = 64.min(n);
    let src = s.clone_htod(&bf16_bits(&gen.logits(block, V))).unwrap();
    let mut all = s.alloc_zeros::<u16>(n * V).unwrap();
    let mut r = 0;
    while r < n {
        let k = block.min(n - r);
        s.memcpy_dtod(&src.slice(..k * V), &mut all.slice_mut(r * V..(r + k) * V))
            .unwrap();
        r += k;
    }
    all
}

fn bench_cuda(c: &mut Criterion) {
    let Some(dev) = dfpo::device::cuda_device() else {
        println!(
            "lmops CUDA bench skipped: no CUDA device ({})",
            dfpo::device::cuda_unavailable_reason()
        );
        return;
    };
    let mut gen = Gen(2);
    let s = dev.stream().clone();
    let mut g = c.benchmark_group("lmops_cuda");
    g.sample_size(10);

    // ---- xent at N = 8192 × V = 151936 ----
    {
        let n = XENT_N;
        let logits = device_logits(&dev, &mut gen, n);
        let tg: Vec<u32> = (0..n as u32).map(|r| r * 977 % V as u32).collect();
        let tgd = s.clone_htod(&tg).unwrap();
        let mut lp = s.alloc_zeros::<f32>(n).unwrap();
        let mut lse = s.alloc_zeros::<f32>(n).unwrap();
        let mut ent = s.alloc_zeros::<f32>(n).unwrap();
        let glp = s.clone_htod(&vec![1.0f32; n]).unwrap();
        let gh = s.clone_htod(&vec![0.01f32; n]).unwrap();
        let mut dl = s.alloc_zeros::<u16>(n * V).unwrap();
        let (zp, _g1) = logits.device_ptr(&s);
        let (tp, _g2) = tgd.device_ptr(&s);
        let (lpp, _g3) = lp.device_ptr_mut(&s);
        let (lsp, _g4) = lse.device_ptr_mut(&s);
        let (ep, _g5) = ent.device_ptr_mut(&s);
        let (glpp, _g6) = glp.device_ptr(&s);
        let (ghp, _g7) = gh.device_ptr(&s);
        let (dp, _g8) = dl.device_ptr_mut(&s);
        let fwd_bytes = (n * V * 2) as u64;
        let bwd_bytes = (3 * n * V * 2) as u64;
        floor_line(&dev, "xent_fwd 8192x151936", fwd_bytes);
        floor_line(&dev, "xent_bwd 8192x151936", bwd_bytes);
        g.throughput(Throughput::Bytes(fwd_bytes));
        g.bench_function("xent_fwd 8192x151936 bf16", |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || unsafe {
                    xent::cuda::forward_raw(&dev, zp, tp, n, V, 1.0, lpp, lsp, ep).unwrap()
                })
            })
        });
        g.throughput(Throughput::Bytes(bwd_bytes));
        g.bench_function("xent_bwd 8192x151936 bf16", |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || unsafe {
                    xent::cuda::backward_raw(&dev, zp, tp, n, V, 1.0, lsp, ep, glpp, ghp, dp)
                        .unwrap()
                })
            })
        });
    }

    // ---- sampling, 64 rows × 151936 ----
    {
        let n = SAMPLE_N;
        let logits = device_logits(&dev, &mut gen, n);
        let mut tok = s.alloc_zeros::<u32>(n).unwrap();
        let mut a = s.alloc_zeros::<f32>(n).unwrap();
        let mut b2 = s.alloc_zeros::<f32>(n).unwrap();
        let (zp, _g1) = logits.device_ptr(&s);
        let (tp, _g2) = tok.device_ptr_mut(&s);
        let (ap, _g3) = a.device_ptr_mut(&s);
        let (bp, _g4) = b2.device_ptr_mut(&s);
        let bytes = (n * V * 2) as u64;
        floor_line(&dev, "sample 64x151936 (one read)", bytes);
        for (name, p) in [
            ("sample greedy 64x151936", SampleParams::greedy()),
            ("sample T=1 64x151936", SampleParams::default()),
            ("sample top-k50 top-p0.9 64x151936", filtered()),
        ] {
            g.throughput(Throughput::Bytes(bytes));
            let mut counter = 0u64;
            g.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    timed(&dev, iters, || {
                        counter += n as u64;
                        unsafe {
                            sample::cuda::sample_raw(&dev, zp, n, V, &p, 7, counter, tp, ap, bp, 0)
                                .unwrap()
                        }
                    })
                })
            });
        }
    }

    // ---- AdamW and the gradient norm, 500M parameters ----
    {
        let n = ADAMW_N;
        let mut p = s.alloc_zeros::<f32>(n).unwrap();
        let grad = s.alloc_zeros::<f32>(n).unwrap();
        let mut m = s.alloc_zeros::<f32>(n).unwrap();
        let mut v = s.alloc_zeros::<f32>(n).unwrap();
        let mut pb = s.alloc_zeros::<u16>(n).unwrap();
        let mut clip = s.clone_htod(&[0.0f32, 1.0]).unwrap();
        let mut ws = s
            .alloc_zeros::<f64>(adamw::cuda::grad_norm_workspace_len(n))
            .unwrap();
        let (pp, _g1) = p.device_ptr_mut(&s);
        let (gp, _g2) = grad.device_ptr(&s);
        let (mp, _g3) = m.device_ptr_mut(&s);
        let (vp, _g4) = v.device_ptr_mut(&s);
        let (pbp, _g5) = pb.device_ptr_mut(&s);
        let (cp, _g6) = clip.device_ptr_mut(&s);
        let (wp, _g7) = ws.device_ptr_mut(&s);
        let table = s
            .clone_htod(&adamw::cuda::grad_norm_table(&[(gp, n)]))
            .unwrap();
        let (tabp, _g8) = table.device_ptr(&s);
        let hp = AdamWParams::default();
        let step_bytes = (30 * n) as u64;
        let norm_bytes = (4 * n) as u64;
        floor_line(&dev, "adamw 500M params", step_bytes);
        floor_line(&dev, "grad_norm 500M", norm_bytes);
        g.throughput(Throughput::Bytes(step_bytes));
        let mut step = 0u64;
        g.bench_function("adamw 500M params (+bf16 copy)", |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    step += 1;
                    unsafe {
                        adamw::cuda::step_raw(&dev, pp, gp, mp, vp, pbp, n, &hp, step, cp + 4)
                            .unwrap()
                    }
                })
            })
        });
        // The same update as one adamw_multi launch over the Qwen2-0.5B parameter list (290
        // tensors, from 128-element biases to the 136M-element embedding; 494M in all).
        let (h, kv, f, vocab) = (896usize, 128usize, 4864usize, 151_936usize);
        let mut sizes = vec![vocab * h];
        for _ in 0..24 {
            sizes.extend([
                h * h,
                kv * h,
                kv * h,
                h,
                kv,
                kv,
                h * h,
                f * h,
                f * h,
                h * f,
                h,
                h,
            ]);
        }
        let total: usize = sizes.iter().sum();
        assert!(
            total <= n,
            "the Qwen2-0.5B list ({total}) exceeds the buffers ({n})"
        );
        let mut segs = Vec::new();
        let mut at = 0u64;
        for &len in &sizes {
            segs.push(adamw::cuda::MultiSeg {
                p: pp + 4 * at,
                g: gp + 4 * at,
                m: mp + 4 * at,
                v: vp + 4 * at,
                out: pbp + 2 * at,
                out_kind: adamw::cuda::OutKind::Bf16,
                n: len,
                decay: len > h,
            });
            at += len.next_multiple_of(4) as u64;
        }
        let (words, chunks) = adamw::cuda::multi_tables(&segs).unwrap();
        let wd = s.clone_htod(&words).unwrap();
        let kd = s.clone_htod(&chunks).unwrap();
        let (wdp, _g9) = wd.device_ptr(&s);
        let (kdp, _g10) = kd.device_ptr(&s);
        let nchunks = chunks.len() / 2;
        let multi_bytes = (30 * total) as u64;
        floor_line(&dev, "adamw_multi Qwen2-0.5B list", multi_bytes);
        g.throughput(Throughput::Bytes(multi_bytes));
        g.bench_function(
            "adamw_multi Qwen2-0.5B list (290 tensors, +bf16 copies)",
            |b| {
                b.iter_custom(|iters| {
                    timed(&dev, iters, || {
                        step += 1;
                        unsafe {
                            adamw::cuda::multi_step_raw(
                                &dev,
                                wdp,
                                kdp,
                                nchunks,
                                &hp,
                                step,
                                cp + 4,
                                false,
                            )
                            .unwrap()
                        }
                    })
                })
            },
        );
        g.throughput(Throughput::Bytes(norm_bytes));
        g.bench_function("grad_norm 500M", |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || unsafe {
                    adamw::cuda::grad_norm_raw(&dev, tabp, 1, n, 1.0, cp, wp).unwrap()
                })
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_cpu, bench_cuda
}
criterion_main!(benches);
