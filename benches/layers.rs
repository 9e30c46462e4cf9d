//! Benchmarks of the memory-bound transformer layers (kernels/norm.cu, rope.cu, act.cu, embed.cu)
//! at Qwen2-0.5B-like sizes: d = 896, I = 4864, 14 query / 2 KV heads of 64, V = 151936,
//! N = 16384 tokens on CUDA (bf16 activations, launches queued back to back, one synchronisation
//! per batch of iterations). The CPU references (f32) run at a reduced N (printed) so the bench
//! stays quick. Throughput is the fewest bytes each op must move (inputs read once, outputs
//! written once; an accumulated output is read and written), so criterion prints GB/s; the CUDA
//! part also prints each op's bandwidth floor on the card.
//!
//! `cargo bench --bench layers -- --warm-up-time 1 --measurement-time 2`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use dfpo::device::CudaDevice;
use dfpo::kernels::{act, embed, norm, rope};

const D: usize = 896;
const I: usize = 4864;
const HQ: usize = 14;
const HKV: usize = 2;
const HD: usize = 64;
const V: usize = 151936;
const THETA: f32 = 1_000_000.0;
const EPS: f32 = 1e-6;
/// Tokens on CUDA (the perf-model size) and on the CPU (reduced).
const N_CUDA: usize = 16384;
const N_CPU: usize = 1024;
/// SwiGLU on the CPU (an exp per element over n·I) at fewer tokens still.
const N_CPU_ACT: usize = 256;

/// Deterministic inputs without a test-only dependency.
struct Gen(u64);
impl Gen {
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(1);
        dfpo::kernels::uniform_open(0x1a7e, self.0) as f32
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.uniform()).collect()
    }
    /// Token ids with a text-like skew: 5% padding (Qwen2's <|endoftext|>), the rest
    /// concentrated on small ids (V·u³).
    fn ids(&mut self, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| {
                let u = self.uniform();
                if u < 0.05 {
                    151643
                } else {
                    let w = self.uniform();
                    ((V as f32 * w * w * w) as u32).min(V as u32 - 1)
                }
            })
            .collect()
    }
    fn positions(&mut self, n: usize) -> Vec<i32> {
        // Sequences of 512 tokens.
        (0..n).map(|t| (t % 512) as i32).collect()
    }
}

/// Fewest bytes each op moves, for `n` tokens with activations of `e` bytes.
struct Bytes {
    norm_fwd: u64,
    add_norm_fwd: u64,
    norm_bwd: u64,
    rope: u64,
    swiglu_fwd: u64,
    swiglu_bwd: u64,
    embed_fwd: u64,
    embed_bwd: u64,
}

fn bytes(n: usize, e: usize, distinct_ids: usize) -> Bytes {
    let (n, e, u) = (n as u64, e as u64, distinct_ids as u64);
    let (d, i) = (D as u64, I as u64);
    let qk = n * (HQ + HKV) as u64 * HD as u64;
    Bytes {
        // x read, y written, w read, rstd written.
        norm_fwd: 2 * n * d * e + d * e + 4 * n,
        // x, residual read; h, y written.
        add_norm_fwd: 4 * n * d * e + d * e + 4 * n,
        // x, dy read, dx read and written, rstd read, dw read and written.
        norm_bwd: 4 * n * d * e + 4 * n + d * e + 8 * d,
        // q and k read and written, positions read.
        rope: 2 * qk * e + 4 * n,
        // gu read, out written.
        swiglu_fwd: 3 * n * i * e,
        // gu, dout read; dgu read and written.
        swiglu_bwd: 7 * n * i * e,
        // ids read, table rows read, out written.
        embed_fwd: 4 * n + 2 * n * d * e,
        // dout read; the distinct rows of dtable (fp32) read and written.
        embed_bwd: n * d * e + 8 * u * d,
    }
}

/// The embedding table's values (a cheap pattern: 136M elements; a gather does not care).
fn table_values() -> Vec<f32> {
    (0..V * D)
        .map(|i| ((i % 97) as f32 - 48.0) * 1e-3)
        .collect()
}

fn distinct(ids: &[u32]) -> usize {
    let mut v = ids.to_vec();
    v.sort_unstable();
    v.dedup();
    v.len()
}

fn bench_cpu(c: &mut Criterion) {
    let n = N_CPU;
    let mut g = Gen(1);
    let x = g.vec(n * D, -2.0, 2.0);
    let res = g.vec(n * D, -2.0, 2.0);
    let w = g.vec(D, 0.5, 1.5);
    let dy = g.vec(n * D, -1.0, 1.0);
    let na = N_CPU_ACT;
    let gu = g.vec(na * 2 * I, -4.0, 4.0);
    let dout = g.vec(na * I, -1.0, 1.0);
    let q0 = g.vec(n * HQ * HD, -1.0, 1.0);
    let k0 = g.vec(n * HKV * HD, -1.0, 1.0);
    let pos = g.positions(n);
    let ids = g.ids(n);
    let u = distinct(&ids);
    let table = table_values();
    let by = bytes(n, 4, u);
    let by_act = bytes(na, 4, u);
    println!(
        "layers CPU bench (f32 references): N={n} tokens (SwiGLU: {na}), d={D}, I={I}, {HQ}/{HKV} heads of {HD}, V={V} ({u} distinct ids)"
    );

    let mut grp = c.benchmark_group("layers_cpu");
    grp.sample_size(10);
    let (mut y, mut h, mut rstd) = (vec![0.0f32; n * D], vec![0.0f32; n * D], vec![0.0f32; n]);
    grp.throughput(Throughput::Bytes(by.norm_fwd));
    grp.bench_function(format!("rmsnorm_fwd N{n}xd{D}"), |b| {
        b.iter(|| norm::cpu::rmsnorm_fwd(&x, &w, n, D, EPS, &mut y, &mut rstd).unwrap())
    });
    grp.throughput(Throughput::Bytes(by.add_norm_fwd));
    grp.bench_function(format!("add_rmsnorm_fwd N{n}xd{D}"), |b| {
        b.iter(|| {
            norm::cpu::add_rmsnorm_fwd(&x, &res, &w, n, D, EPS, &mut h, &mut y, &mut rstd).unwrap()
        })
    });
    let (mut dx, mut dw) = (vec![0.0f32; n * D], vec![0.0f32; D]);
    grp.throughput(Throughput::Bytes(by.norm_bwd));
    grp.bench_function(format!("rmsnorm_bwd N{n}xd{D}"), |b| {
        b.iter(|| norm::cpu::rmsnorm_bwd(&x, &w, &rstd, &dy, n, D, &mut dx, &mut dw).unwrap())
    });
    let (mut q, mut k) = (q0.clone(), k0.clone());
    grp.throughput(Throughput::Bytes(by.rope));
    grp.bench_function(format!("rope_fwd N{n} {HQ}+{HKV}x{HD}"), |b| {
        b.iter(|| rope::cpu::rope_fwd(&mut q, &mut k, &pos, n, HQ, HKV, HD, THETA).unwrap())
    });
    let mut out = vec![0.0f32; na * I];
    grp.throughput(Throughput::Bytes(by_act.swiglu_fwd));
    grp.bench_function(format!("swiglu_fwd N{na}xI{I}"), |b| {
        b.iter(|| act::cpu::swiglu_fwd(&gu, na, I, &mut out).unwrap())
    });
    let mut dgu = vec![0.0f32; na * 2 * I];
    grp.throughput(Throughput::Bytes(by_act.swiglu_bwd));
    grp.bench_function(format!("swiglu_bwd N{na}xI{I}"), |b| {
        b.iter(|| act::cpu::swiglu_bwd(&gu, &dout, na, I, &mut dgu).unwrap())
    });
    let mut eo = vec![0.0f32; n * D];
    grp.throughput(Throughput::Bytes(by.embed_fwd));
    grp.bench_function(format!("embed_fwd N{n} V{V}xd{D}"), |b| {
        b.iter(|| embed::cpu::embed_fwd(&ids, &table, V, D, &mut eo).unwrap())
    });
    let mut dtable = vec![0.0f32; V * D];
    grp.throughput(Throughput::Bytes(by.embed_bwd));
    grp.bench_function(format!("embed_bwd N{n} V{V}xd{D}"), |b| {
        b.iter(|| embed::cpu::embed_bwd(&ids, &eo, V, D, &mut dtable).unwrap())
    });
    // The host-side schedule of the CUDA embedding backward, at the CUDA size.
    let ids_big = Gen(7).ids(N_CUDA);
    grp.throughput(Throughput::Elements(N_CUDA as u64));
    grp.bench_function(format!("embed_bwd_plan N{N_CUDA}"), |b| {
        b.iter(|| embed::EmbedBwdPlan::new(&ids_big, V).unwrap())
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

fn floor_line(dev: &CudaDevice, what: &str, bytes: u64) {
    // Copy bandwidth measured on the lent machines (docs/perf-model.md).
    let bw = if dev.name().contains("H200") {
        4.3e12
    } else {
        3.0e12
    };
    println!(
        "layers CUDA {what}: {bytes} bytes, bandwidth floor {:.2} µs at {:.1} TB/s ({})",
        bytes as f64 / bw * 1e6,
        bw / 1e12,
        dev.name()
    );
}

fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect()
}

fn bench_cuda(c: &mut Criterion) {
    let Some(dev) = dfpo::device::cuda_device() else {
        println!(
            "layers CUDA bench skipped: no CUDA device ({})",
            dfpo::device::cuda_unavailable_reason()
        );
        return;
    };
    let n = N_CUDA;
    let mut g = Gen(2);
    let s = dev.stream();
    let upb = |v: Vec<f32>| -> CudaSlice<u16> { s.clone_htod(&bf16_bits(&v)).unwrap() };
    let x = upb(g.vec(n * D, -2.0, 2.0));
    let res = upb(g.vec(n * D, -2.0, 2.0));
    let w = upb(g.vec(D, 0.5, 1.5));
    let dy = upb(g.vec(n * D, -1.0, 1.0));
    let mut y = upb(vec![0.0; n * D]);
    let mut h = upb(vec![0.0; n * D]);
    let mut dx = upb(vec![0.0; n * D]);
    let mut rstd = s.clone_htod(&vec![1.0f32; n]).unwrap();
    let mut dw = s.alloc_zeros::<f32>(D).unwrap();
    let mut nws = s
        .alloc_zeros::<f32>(norm::cuda::rmsnorm_bwd_workspace_len(n, D))
        .unwrap();
    let gu = upb(g.vec(n * 2 * I, -4.0, 4.0));
    let dout = upb(g.vec(n * I, -1.0, 1.0));
    let mut out = upb(vec![0.0; n * I]);
    let mut dgu = upb(vec![0.0; n * 2 * I]);
    let mut q = upb(g.vec(n * HQ * HD, -1.0, 1.0));
    let mut k = upb(g.vec(n * HKV * HD, -1.0, 1.0));
    let pos = s.clone_htod(&g.positions(n)).unwrap();
    let ids_h = g.ids(n);
    let u = distinct(&ids_h);
    let ids = s.clone_htod(&ids_h).unwrap();
    let table = upb(table_values());
    let mut eo = upb(vec![0.0; n * D]);
    let mut dtable = s.alloc_zeros::<f32>(V * D).unwrap();
    let plan = embed::EmbedBwdPlan::new(&ids_h, V).unwrap();
    let plan_d = s.clone_htod(plan.packed()).unwrap();
    let mut ews = s
        .alloc_zeros::<f32>(embed::cuda::embed_bwd_workspace_len(n, D))
        .unwrap();
    let by = bytes(n, 2, u);
    println!(
        "layers CUDA bench (bf16): N={n} tokens, d={D}, I={I}, {HQ}/{HKV} heads of {HD}, V={V} ({u} distinct ids, {} work items, {} split ids)",
        plan.n_items(),
        plan.n_groups()
    );

    // Raw pointers: the launches below are what the graph runtime will queue.
    let (xp, _g1) = x.device_ptr(s);
    let (rp, _g2) = res.device_ptr(s);
    let (wp, _g3) = w.device_ptr(s);
    let (dyp, _g4) = dy.device_ptr(s);
    let (yp, _g5) = y.device_ptr_mut(s);
    let (hp, _g6) = h.device_ptr_mut(s);
    let (dxp, _g7) = dx.device_ptr_mut(s);
    let (rsp, _g8) = rstd.device_ptr_mut(s);
    let (dwp, _g9) = dw.device_ptr_mut(s);
    let (nwsp, _g10) = nws.device_ptr_mut(s);
    let (gup, _g11) = gu.device_ptr(s);
    let (doutp, _g12) = dout.device_ptr(s);
    let (outp, _g13) = out.device_ptr_mut(s);
    let (dgup, _g14) = dgu.device_ptr_mut(s);
    let (qp, _g15) = q.device_ptr_mut(s);
    let (kp, _g16) = k.device_ptr_mut(s);
    let (posp, _g17) = pos.device_ptr(s);
    let (idp, _g18) = ids.device_ptr(s);
    let (tp, _g19) = table.device_ptr(s);
    let (eop, _g20) = eo.device_ptr_mut(s);
    let (dtp, _g21) = dtable.device_ptr_mut(s);
    let (pp, _g22) = plan_d.device_ptr(s);
    let (ewsp, _g23) = ews.device_ptr_mut(s);

    for (what, b) in [
        ("rmsnorm_fwd", by.norm_fwd),
        ("add_rmsnorm_fwd", by.add_norm_fwd),
        ("rmsnorm_bwd", by.norm_bwd),
        ("rope_fwd", by.rope),
        ("swiglu_fwd", by.swiglu_fwd),
        ("swiglu_bwd", by.swiglu_bwd),
        ("embed_fwd", by.embed_fwd),
        ("embed_bwd", by.embed_bwd),
    ] {
        floor_line(&dev, what, b);
    }

    let mut grp = c.benchmark_group("layers_cuda");
    grp.sample_size(20);
    grp.throughput(Throughput::Bytes(by.norm_fwd));
    grp.bench_function(format!("rmsnorm_fwd N{n}xd{D}"), |b| {
        b.iter_custom(|it| {
            timed(&dev, it, || unsafe {
                norm::cuda::rmsnorm_fwd_raw(&dev, xp, wp, n, D, EPS, yp, rsp).unwrap()
            })
        })
    });
    grp.throughput(Throughput::Bytes(by.add_norm_fwd));
    grp.bench_function(format!("add_rmsnorm_fwd N{n}xd{D}"), |b| {
        b.iter_custom(|it| {
            timed(&dev, it, || unsafe {
                norm::cuda::add_rmsnorm_fwd_raw(&dev, xp, rp, wp, n, D, EPS, hp, yp, rsp).unwrap()
            })
        })
    });
    grp.throughput(Throughput::Bytes(by.norm_bwd));
    grp.bench_function(format!("rmsnorm_bwd N{n}xd{D}"), |b| {
        b.iter_custom(|it| {
            timed(&dev, it, || unsafe {
                norm::cuda::rmsnorm_bwd_raw(&dev, xp, wp, rsp, dyp, n, D, dxp, dwp, nwsp).unwrap()
            })
        })
    });
    grp.throughput(Throughput::Bytes(by.rope));
    grp.bench_function(format!("rope_fwd N{n} {HQ}+{HKV}x{HD}"), |b| {
        b.iter_custom(|it| {
            timed(&dev, it, || unsafe {
                rope::cuda::rope_fwd_raw(
                    &dev,
                    qp,
                    kp,
                    posp,
                    n,
                    HQ,
                    HKV,
                    HD,
                    HQ * HD,
                    HKV * HD,
                    THETA,
                )
                .unwrap()
            })
        })
    });
    grp.throughput(Throughput::Bytes(by.swiglu_fwd));
    grp.bench_function(format!("swiglu_fwd N{n}xI{I}"), |b| {
        b.iter_custom(|it| {
            timed(&dev, it, || unsafe {
                act::cuda::swiglu_fwd_raw(&dev, gup, n, I, outp).unwrap()
            })
        })
    });
    grp.throughput(Throughput::Bytes(by.swiglu_bwd));
    grp.bench_function(format!("swiglu_bwd N{n}xI{I}"), |b| {
        b.iter_custom(|it| {
            timed(&dev, it, || unsafe {
                act::cuda::swiglu_bwd_raw(&dev, gup, doutp, n, I, dgup).unwrap()
            })
        })
    });
    grp.throughput(Throughput::Bytes(by.embed_fwd));
    grp.bench_function(format!("embed_fwd N{n} V{V}xd{D}"), |b| {
        b.iter_custom(|it| {
            timed(&dev, it, || unsafe {
                embed::cuda::embed_fwd_raw(&dev, idp, tp, n, V, D, eop, 0).unwrap()
            })
        })
    });
    grp.throughput(Throughput::Bytes(by.embed_bwd));
    grp.bench_function(format!("embed_bwd N{n} V{V}xd{D}"), |b| {
        b.iter_custom(|it| {
            timed(&dev, it, || unsafe {
                embed::cuda::embed_bwd_raw(&dev, pp, eop, n, V, D, dtp, ewsp).unwrap()
            })
        })
    });
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
