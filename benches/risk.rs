//! Throughput of the `risk` family: per-row stats (sort + tail moments + quantiles) and the
//! risk loss (two sorts, terms, gradient scatter), at R rows × K ∈ {32, 64, 256}.
//!
//! Bytes counted (what a kernel must move through device memory at least):
//! - stats: read x (R·K·4) + write stats (R·NSTATS·4);
//! - loss: read pred, target (2·R·K·4), read + write grad for `+=` (2·R·K·4), row_scale and
//!   terms (R·(1 + NTERMS)·4).
//!
//! CPU: the reference (fp32) at a reduced R = 2048 (printed in the id). CUDA (when a device is
//! present): R = 32768 (perf-model size) and R = 262144; launches are queued back to back and
//! timed to a final synchronize, so at small sizes the number includes launch overhead.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dfpo::kernels::risk::{cpu, cuda, RiskLossWeights, TailLevels, NSTATS, NTERMS};
use dfpo::kernels::uniform_open;

const KS: [usize; 3] = [32, 64, 256];
const QS: [f32; 3] = [0.1, 0.5, 0.9];
const R_CPU: usize = 2048;
const R_CUDA: [usize; 2] = [32768, 262144];

fn data(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .map(|i| (uniform_open(seed, i as u64) * 2.0 - 1.0) as f32)
        .collect()
}

fn stats_bytes(r: usize, k: usize) -> u64 {
    (r * (k + NSTATS) * 4) as u64
}

fn loss_bytes(r: usize, k: usize) -> u64 {
    (r * (4 * k + 1 + NTERMS) * 4) as u64
}

fn bench_cpu(c: &mut Criterion) {
    let mut g = c.benchmark_group("risk_cpu");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let levels = TailLevels::default();
    let w = RiskLossWeights::default();
    for k in KS {
        let r = R_CPU;
        let x = data(r * k, 1);
        let t = data(r * k, 2);
        let mut st = vec![0.0f32; r * NSTATS];
        let mut qo = vec![0.0f32; r * QS.len()];
        g.throughput(Throughput::Bytes(stats_bytes(r, k)));
        g.bench_function(BenchmarkId::new("stats", format!("R{r}xK{k}")), |b| {
            b.iter(|| cpu::stats(&x, k, levels, &QS, &mut st, &mut qo, None, None).unwrap())
        });
        let scale = vec![1.0f32 / r as f32; r];
        let mut terms = vec![0.0f32; r * NTERMS];
        let mut grad = vec![0.0f32; r * k];
        g.throughput(Throughput::Bytes(loss_bytes(r, k)));
        g.bench_function(BenchmarkId::new("loss", format!("R{r}xK{k}")), |b| {
            b.iter(|| cpu::loss(&x, &t, k, levels, &w, &scale, &mut terms, &mut grad).unwrap())
        });
    }
    g.finish();
}

fn bench_cuda(c: &mut Criterion) {
    let Some(dev) = dfpo::device::cuda_device() else {
        eprintln!("risk bench: no CUDA device, CUDA benches skipped");
        return;
    };
    let st = dev.stream().clone();
    let mut g = c.benchmark_group("risk_cuda");
    g.sample_size(20);
    let levels = TailLevels::default();
    let w = RiskLossWeights::default();
    for r in R_CUDA {
        for k in KS {
            let xd = st.clone_htod(&data(r * k, 1)).unwrap();
            let td = st.clone_htod(&data(r * k, 2)).unwrap();
            let sd = st.clone_htod(&vec![1.0f32 / r as f32; r]).unwrap();
            let mut stats = st.alloc_zeros::<f32>(r * NSTATS).unwrap();
            let mut qo = st.alloc_zeros::<f32>(r * QS.len()).unwrap();
            let mut terms = st.alloc_zeros::<f32>(r * NTERMS).unwrap();
            let mut grad = st.alloc_zeros::<f32>(r * k).unwrap();
            let id = format!("R{r}xK{k}");

            g.throughput(Throughput::Bytes(stats_bytes(r, k)));
            g.bench_function(BenchmarkId::new("stats", &id), |b| {
                b.iter_custom(|iters| {
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        cuda::stats(
                            &dev,
                            &xd.as_view(),
                            k,
                            levels,
                            &[],
                            &mut stats.as_view_mut(),
                            None,
                            None,
                            None,
                        )
                        .unwrap();
                    }
                    dev.synchronize().unwrap();
                    t0.elapsed()
                })
            });
            g.throughput(Throughput::Bytes(
                stats_bytes(r, k) + (r * QS.len() * 4) as u64,
            ));
            g.bench_function(BenchmarkId::new("stats+quantiles", &id), |b| {
                b.iter_custom(|iters| {
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        cuda::stats(
                            &dev,
                            &xd.as_view(),
                            k,
                            levels,
                            &QS,
                            &mut stats.as_view_mut(),
                            Some(&mut qo.as_view_mut()),
                            None,
                            None,
                        )
                        .unwrap();
                    }
                    dev.synchronize().unwrap();
                    t0.elapsed()
                })
            });
            g.throughput(Throughput::Bytes(loss_bytes(r, k)));
            g.bench_function(BenchmarkId::new("loss", &id), |b| {
                b.iter_custom(|iters| {
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        cuda::loss(
                            &dev,
                            &xd.as_view(),
                            &td.as_view(),
                            k,
                            levels,
                            &w,
                            &sd.as_view(),
                            &mut terms.as_view_mut(),
                            &mut grad.as_view_mut(),
                            None,
                        )
                        .unwrap();
                    }
                    dev.synchronize().unwrap();
                    t0.elapsed()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_cpu, bench_cuda);
criterion_main!(benches);
