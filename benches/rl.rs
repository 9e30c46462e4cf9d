//! Benchmarks of kernels/rl.cu at the perf-model shape (B = 64 sequences × T = 512 positions,
//! K = 32 samples): distributional GAE, masked whitening, PPO loss and KL penalty. CPU always
//! (the f32 references); CUDA when a device is present (launches queued back to back, one
//! synchronisation per batch of iterations). Throughput is in bytes: for GAE, values read plus
//! adv and ret written (3·B·T·K·4), as in the perf model; the CUDA part also prints the
//! bandwidth floor of each kernel.
//!
//! `cargo bench --bench rl -- --warm-up-time 1 --measurement-time 2`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use dfpo::device::CudaDevice;
use dfpo::kernels::rl::{cpu, cuda, GaeParams, KlKind, PpoParams};

const B: usize = 64;
const T: usize = 512;
const K: usize = 32;

/// Deterministic inputs without a test-only dependency.
struct Gen(u64);
impl Gen {
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(1);
        dfpo::kernels::uniform_open(0x5eed, self.0) as f32
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.uniform()).collect()
    }
}

/// Right-padded masks with lengths uniform in [T/4, T].
fn mask(g: &mut Gen) -> Vec<f32> {
    let mut m = vec![0.0f32; B * T];
    for b in 0..B {
        let len = T / 4 + (g.uniform() * (3 * T / 4) as f32) as usize;
        m[b * T..b * T + len.min(T)].fill(1.0);
    }
    m
}

struct Inputs {
    values: Vec<f32>,
    rewards: Vec<f32>,
    mask: Vec<f32>,
    logp: Vec<f32>,
    logp_old: Vec<f32>,
    adv: Vec<f32>,
}

fn inputs() -> Inputs {
    let mut g = Gen(1);
    let logp_old = g.vec(B * T, -6.0, -0.05);
    let logp = logp_old
        .iter()
        .zip(g.vec(B * T, -0.4, 0.4))
        .map(|(o, d)| o + d)
        .collect();
    Inputs {
        values: g.vec(B * T * K, -1.0, 1.0),
        rewards: g.vec(B * T, -0.1, 0.1),
        mask: mask(&mut g),
        logp,
        logp_old,
        adv: g.vec(B * T, -2.0, 2.0),
    }
}

const GAE_BYTES: u64 = (3 * B * T * K * 4) as u64;
const WHITEN_BYTES: u64 = (3 * B * T * 4) as u64;
const PPO_BYTES: u64 = (6 * B * T * 4) as u64;
const KL_BYTES: u64 = (5 * B * T * 4) as u64;

fn bench_cpu(c: &mut Criterion) {
    let x = inputs();
    let n = B * T;
    println!(
        "rl CPU bench: B={B} T={T} K={K} ({n} tokens, {} value samples)",
        n * K
    );
    let mut g = c.benchmark_group("rl_cpu");
    g.sample_size(10);

    let (mut adv, mut ret, mut mean) = (vec![0.0; n * K], vec![0.0; n * K], vec![0.0; n]);
    g.throughput(Throughput::Bytes(GAE_BYTES));
    g.bench_function("dist_gae B64xT512xK32", |bch| {
        bch.iter(|| {
            cpu::dist_gae(
                &x.values,
                &x.rewards,
                &x.mask,
                B,
                T,
                K,
                GaeParams::default(),
                &mut adv,
                &mut ret,
                &mut mean,
            )
            .unwrap()
        })
    });

    let mut out = vec![0.0; n];
    g.throughput(Throughput::Bytes(WHITEN_BYTES));
    g.bench_function("whiten 32768", |bch| {
        bch.iter(|| cpu::whiten(&mean, &x.mask, &mut out).unwrap())
    });

    let (mut lt, mut gr) = (vec![0.0; n], vec![0.0; n]);
    g.throughput(Throughput::Bytes(PPO_BYTES));
    g.bench_function("ppo_policy_loss 32768", |bch| {
        bch.iter(|| {
            cpu::ppo_policy_loss(
                &x.logp,
                &x.logp_old,
                &x.adv,
                &x.mask,
                PpoParams::default(),
                &mut lt,
                &mut gr,
            )
            .unwrap()
        })
    });

    g.throughput(Throughput::Bytes(KL_BYTES));
    g.bench_function("kl_penalty k3 32768", |bch| {
        bch.iter(|| {
            cpu::kl_penalty(
                &x.logp,
                &x.logp_old,
                &x.mask,
                KlKind::K3,
                &mut lt,
                Some(&mut gr),
            )
            .unwrap()
        })
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
        "rl CUDA {what}: {bytes} bytes, bandwidth floor {:.2} µs at {:.1} TB/s ({})",
        bytes as f64 / bw * 1e6,
        bw / 1e12,
        dev.name()
    );
}

fn bench_cuda(c: &mut Criterion) {
    let Some(dev) = dfpo::device::cuda_device() else {
        println!(
            "rl CUDA bench skipped: no CUDA device ({})",
            dfpo::device::cuda_unavailable_reason()
        );
        return;
    };
    let x = inputs();
    let n = B * T;
    let s = dev.stream();
    let up = |v: &[f32]| -> CudaSlice<f32> { s.clone_htod(v).unwrap() };
    let (values, rewards, mask) = (up(&x.values), up(&x.rewards), up(&x.mask));
    let (logp, logp_old, advd) = (up(&x.logp), up(&x.logp_old), up(&x.adv));
    let mut adv = s.alloc_zeros::<f32>(n * K).unwrap();
    let mut ret = s.alloc_zeros::<f32>(n * K).unwrap();
    let mut mean = s.alloc_zeros::<f32>(n).unwrap();
    let mut out = s.alloc_zeros::<f32>(n).unwrap();
    let mut out2 = s.alloc_zeros::<f32>(n).unwrap();
    let mut stats = s.alloc_zeros::<f32>(4).unwrap();
    let mut ws = s
        .alloc_zeros::<f64>(cuda::whiten_workspace_len(n).max(cuda::ppo_workspace_len(n)))
        .unwrap();

    // Raw pointers: the launches below are what the graph runtime will queue.
    let (vp, _g1) = values.device_ptr(s);
    let (rp, _g2) = rewards.device_ptr(s);
    let (mp, _g3) = mask.device_ptr(s);
    let (lp, _g4) = logp.device_ptr(s);
    let (op, _g5) = logp_old.device_ptr(s);
    let (ap_in, _g6) = advd.device_ptr(s);
    let (ap, _g7) = adv.device_ptr_mut(s);
    let (gp, _g8) = ret.device_ptr_mut(s);
    let (amp, _g9) = mean.device_ptr_mut(s);
    let (outp, _g10) = out.device_ptr_mut(s);
    let (out2p, _g11) = out2.device_ptr_mut(s);
    let (sp, _g12) = stats.device_ptr_mut(s);
    let (wp, _g13) = ws.device_ptr_mut(s);

    floor_line(&dev, "dist_gae", GAE_BYTES);
    floor_line(&dev, "whiten", WHITEN_BYTES);
    floor_line(&dev, "ppo_policy_loss", PPO_BYTES);
    floor_line(&dev, "kl_penalty", KL_BYTES);

    let mut g = c.benchmark_group("rl_cuda");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(GAE_BYTES));
    g.bench_function("dist_gae B64xT512xK32", |bch| {
        bch.iter_custom(|iters| {
            timed(&dev, iters, || unsafe {
                cuda::dist_gae_raw(&dev, vp, rp, mp, B, T, K, GaeParams::default(), ap, gp, amp)
                    .unwrap()
            })
        })
    });
    g.throughput(Throughput::Bytes(WHITEN_BYTES));
    g.bench_function("whiten 32768", |bch| {
        bch.iter_custom(|iters| {
            timed(&dev, iters, || unsafe {
                cuda::whiten_raw(&dev, amp, mp, outp, n, sp, wp).unwrap()
            })
        })
    });
    g.throughput(Throughput::Bytes(PPO_BYTES));
    g.bench_function("ppo_policy_loss 32768", |bch| {
        bch.iter_custom(|iters| {
            timed(&dev, iters, || unsafe {
                cuda::ppo_policy_loss_raw(
                    &dev,
                    lp,
                    op,
                    ap_in,
                    mp,
                    n,
                    PpoParams::default(),
                    outp,
                    out2p,
                    sp,
                    wp,
                )
                .unwrap()
            })
        })
    });
    g.throughput(Throughput::Bytes(KL_BYTES));
    g.bench_function("kl_penalty k3 32768", |bch| {
        bch.iter_custom(|iters| {
            timed(&dev, iters, || unsafe {
                cuda::kl_penalty_raw(&dev, lp, op, mp, n, KlKind::K3, outp, out2p).unwrap()
            })
        })
    });
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
