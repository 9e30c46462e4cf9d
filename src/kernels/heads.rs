//! The training heads' losses on the device (`kernels/heads.cu`, issue 11 item 2): launchers on
//! raw device pointers, queued on [`CudaDevice::stream`] without a synchronisation. The CPU
//! references are the `HostKernel` impls of `crate::train::heads` (ActorLoss, ValueLoss,
//! QuantileLoss, FlowCriticLoss), whose graph ops call these on CUDA; `tests/cuda_heads.rs`
//! checks each against its reference, forward and backward.
//!
//! Each loss runs in two launches: a per-token kernel writes the token's weighted contributions
//! (f64, one row per token) and [`finish`] sums the rows in one block in a fixed order into the
//! loss and the statistics. Deterministic, no atomics.

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use crate::device::{blocks_for, CudaDevice};
use crate::error::{Error, Result};
use crate::kernels::check_i32;

const FAMILY: &str = "heads";
/// `HEADS_BLOCK` in heads.cu.
const BLOCK: u32 = 256;
/// `HEADS_MAX_COLS` in heads.cu.
pub const MAX_COLS: usize = 8;

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks_for(n, BLOCK).clamp(1, 65535), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Columns of the per-token rows of each loss.
pub const ACTOR_COLS: usize = 5;
pub const VALUE_COLS: usize = 2;
pub const QUANTILE_COLS: usize = 5;
pub const FLOW_COLS: usize = 7;

/// `HeadsFinish` in heads.cu: loss = Σ_j coef_j·S_j (coef of `scale_col` × `*scale` when a scale
/// pointer is given), stats[s] = S_{stat_col[s]}.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Finish {
    pub coef: [f64; MAX_COLS],
    pub stat_col: [i32; MAX_COLS],
    pub cols: i32,
    pub n_stats: i32,
    pub scale_col: i32,
}
// SAFETY: plain #[repr(C)] data with the layout of the kernel's by-value struct.
unsafe impl DeviceRepr for Finish {}
// SAFETY: as DeviceRepr (pushed by value; the emulator checks its size).
unsafe impl crate::device::KernelValue for Finish {}
const _: () = assert!(std::mem::size_of::<Finish>() == 112);

impl Finish {
    /// `coef` per column, `stats` the columns reported, `scale_col` the column scaled by the
    /// device scalar (if any).
    pub fn new(coef: &[f64], stats: &[usize], scale_col: Option<usize>) -> Result<Self> {
        if coef.len() > MAX_COLS || stats.len() > MAX_COLS {
            return Err(Error::Invalid(format!(
                "heads finish: {} columns, {} statistics (at most {MAX_COLS})",
                coef.len(),
                stats.len()
            )));
        }
        if let Some(&s) = stats.iter().find(|&&s| s >= coef.len()) {
            return Err(Error::Invalid(format!(
                "heads finish: statistic column {s}"
            )));
        }
        let mut f = Finish {
            coef: [0.0; MAX_COLS],
            stat_col: [0; MAX_COLS],
            cols: coef.len() as i32,
            n_stats: stats.len() as i32,
            scale_col: scale_col.map_or(-1, |c| c as i32),
        };
        f.coef[..coef.len()].copy_from_slice(coef);
        for (o, &s) in f.stat_col.iter_mut().zip(stats) {
            *o = s as i32;
        }
        Ok(f)
    }
}

/// `HeadsFlowIns` in heads.cu: FlowCriticLoss's 12 inputs in its order.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FlowIns(pub [u64; 12]);
// SAFETY: plain #[repr(C)] data with the layout of the kernel's by-value struct of 12 pointers.
unsafe impl DeviceRepr for FlowIns {}
// SAFETY: as DeviceRepr (pushed by value; the emulator checks its size).
unsafe impl crate::device::KernelValue for FlowIns {}

/// Sums the `[n][f.cols]` f64 rows `c` into `loss` (1 f32) and `stats` (`f.n_stats` f32).
///
/// # Safety
/// `c`: `n·cols` f64; `scale`: 1 f32 or 0; `loss`, `stats` as above.
pub unsafe fn finish(
    dev: &CudaDevice,
    c: u64,
    n: usize,
    f: &Finish,
    scale: u64,
    loss: u64,
    stats: u64,
) -> Result<()> {
    let nn = n as i64;
    let func = dev.function(FAMILY, "heads_finish")?;
    let mut a = dev.launch_builder(&func);
    a.arg(&c).arg(&nn).arg(f).arg(&scale).arg(&loss).arg(&stats);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    dev.launch("heads_finish", a, cfg)
}

/// The clipped-PPO actor loss's per-token rows (`c`: `[n][ACTOR_COLS]` f64); `kl_kind` −1: no
/// KL term (`reference` unused), 0: k1, 1: k3.
///
/// # Safety
/// `lp`, `ent`, `old`, `adv`, `w` (and `reference` with a KL term): `n` f32.
#[allow(clippy::too_many_arguments)]
pub unsafe fn actor_rows(
    dev: &CudaDevice,
    lp: u64,
    ent: u64,
    old: u64,
    adv: u64,
    w: u64,
    reference: u64,
    n: usize,
    clip: (f32, f32),
    kl_kind: i32,
    c: u64,
) -> Result<()> {
    let nn = n as i64;
    let f = dev.function(FAMILY, "heads_actor_rows")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&lp)
        .arg(&ent)
        .arg(&old)
        .arg(&adv)
        .arg(&w)
        .arg(&reference)
        .arg(&nn)
        .arg(&clip.0)
        .arg(&clip.1)
        .arg(&kl_kind)
        .arg(&c);
    dev.launch("heads_actor_rows", a, grid(n))
}

/// The actor loss's gradients: `dlp` += dl·w·(dppo + β·dkl), `dent` += −dl·ent_coef·w (either
/// may be 0: not wanted); `beta` 1 f32 (with a KL term), `d_loss` 1 f32.
///
/// # Safety
/// As [`actor_rows`]; `dlp`, `dent`: `n` f32 or 0.
#[allow(clippy::too_many_arguments)]
pub unsafe fn actor_bwd(
    dev: &CudaDevice,
    lp: u64,
    old: u64,
    adv: u64,
    w: u64,
    reference: u64,
    beta: u64,
    n: usize,
    clip: (f32, f32),
    ent_coef: f32,
    kl_kind: i32,
    d_loss: u64,
    dlp: u64,
    dent: u64,
) -> Result<()> {
    let nn = n as i64;
    let f = dev.function(FAMILY, "heads_actor_bwd")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&lp)
        .arg(&old)
        .arg(&adv)
        .arg(&w)
        .arg(&reference)
        .arg(&beta)
        .arg(&nn)
        .arg(&clip.0)
        .arg(&clip.1)
        .arg(&ent_coef)
        .arg(&kl_kind)
        .arg(&d_loss)
        .arg(&dlp)
        .arg(&dent);
    dev.launch("heads_actor_bwd", a, grid(n))
}

/// The PPO value loss's per-token rows (`c`: `[n][VALUE_COLS]` f64); `v` f32 or bf16.
///
/// # Safety
/// `v`: `n` values of its type; `ret`, `old`, `w`: `n` f32.
#[allow(clippy::too_many_arguments)]
pub unsafe fn value_rows(
    dev: &CudaDevice,
    v: u64,
    v_bf16: bool,
    ret: u64,
    old: u64,
    w: u64,
    n: usize,
    clip: f32,
    c: u64,
) -> Result<()> {
    let (nn, vb) = (n as i64, v_bf16 as i32);
    let f = dev.function(FAMILY, "heads_value_rows")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&v)
        .arg(&vb)
        .arg(&ret)
        .arg(&old)
        .arg(&w)
        .arg(&nn)
        .arg(&clip)
        .arg(&c);
    dev.launch("heads_value_rows", a, grid(n))
}

/// `dv` += dl·w·d(value loss)/dv (`dv` f32 or bf16, rounded once).
///
/// # Safety
/// As [`value_rows`]; `d_loss` 1 f32; `dv` `n` values of its type.
#[allow(clippy::too_many_arguments)]
pub unsafe fn value_bwd(
    dev: &CudaDevice,
    v: u64,
    v_bf16: bool,
    ret: u64,
    old: u64,
    w: u64,
    n: usize,
    clip: f32,
    d_loss: u64,
    dv: u64,
    dv_bf16: bool,
) -> Result<()> {
    let (nn, vb, db) = (n as i64, v_bf16 as i32, dv_bf16 as i32);
    let f = dev.function(FAMILY, "heads_value_bwd")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&v)
        .arg(&vb)
        .arg(&ret)
        .arg(&old)
        .arg(&w)
        .arg(&nn)
        .arg(&clip)
        .arg(&d_loss)
        .arg(&dv)
        .arg(&db);
    dev.launch("heads_value_bwd", a, grid(n))
}

/// The quantile critic loss's per-token rows (`c`: `[n][QUANTILE_COLS]` f64); `terms`/`row_loss`
/// the risk kernel's outputs (0: no risk terms).
///
/// # Safety
/// `q`: `n·k` values of its type; `g`: `n·k` f32; `w`: `n` f32; `terms`: `n·4`, `row_loss`: `n`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn quantile_rows(
    dev: &CudaDevice,
    q: u64,
    q_bf16: bool,
    g: u64,
    w: u64,
    n: usize,
    k: usize,
    kappa: f32,
    sum_quantiles: bool,
    terms: u64,
    row_loss: u64,
    c: u64,
) -> Result<()> {
    let (nn, ki, qb, sq) = (
        n as i64,
        check_i32("k", k)?,
        q_bf16 as i32,
        sum_quantiles as i32,
    );
    let f = dev.function(FAMILY, "heads_quantile_rows")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&q)
        .arg(&qb)
        .arg(&g)
        .arg(&w)
        .arg(&nn)
        .arg(&ki)
        .arg(&kappa)
        .arg(&sq)
        .arg(&terms)
        .arg(&row_loss)
        .arg(&c);
    dev.launch("heads_quantile_rows", a, grid(n))
}

/// `dq` += dl·(w·dHuber/dq + risk_grad) (`risk_grad` 0: none; `dq` f32 or bf16).
///
/// # Safety
/// As [`quantile_rows`]; `risk_grad`: `n·k` f32 or 0; `dq`: `n·k` values of its type.
#[allow(clippy::too_many_arguments)]
pub unsafe fn quantile_bwd(
    dev: &CudaDevice,
    q: u64,
    q_bf16: bool,
    g: u64,
    w: u64,
    n: usize,
    k: usize,
    kappa: f32,
    sum_quantiles: bool,
    risk_grad: u64,
    d_loss: u64,
    dq: u64,
    dq_bf16: bool,
) -> Result<()> {
    let (nn, ki, qb, sq, db) = (
        n as i64,
        check_i32("k", k)?,
        q_bf16 as i32,
        sum_quantiles as i32,
        dq_bf16 as i32,
    );
    let f = dev.function(FAMILY, "heads_quantile_bwd")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&q)
        .arg(&qb)
        .arg(&g)
        .arg(&w)
        .arg(&nn)
        .arg(&ki)
        .arg(&kappa)
        .arg(&sq)
        .arg(&risk_grad)
        .arg(&d_loss)
        .arg(&dq)
        .arg(&db);
    dev.launch("heads_quantile_bwd", a, grid(n * k))
}

/// `out = a + b` (`n` f32).
///
/// # Safety
/// `a`, `b`, `out`: `n` f32.
pub unsafe fn add(dev: &CudaDevice, a: u64, b: u64, n: usize, out: u64) -> Result<()> {
    let nn = n as i64;
    let f = dev.function(FAMILY, "heads_add")?;
    let mut l = dev.launch_builder(&f);
    l.arg(&a).arg(&b).arg(&nn).arg(&out);
    dev.launch("heads_add", l, grid(n))
}

/// The flow-critic loss's per-token rows (`c`: `[n][FLOW_COLS]` f64); `terms`/`row_loss` the
/// risk kernel's outputs on ẑ = ε + v_read (0: no risk terms).
///
/// # Safety
/// The inputs: `n·k` f32 (0..8) and `n` f32 (8..12); `terms`: `n·4`; `row_loss`: `n` f32.
#[allow(clippy::too_many_arguments)]
pub unsafe fn flow_rows(
    dev: &CudaDevice,
    x: &FlowIns,
    n: usize,
    k: usize,
    use_gc: bool,
    terms: u64,
    row_loss: u64,
    c: u64,
) -> Result<()> {
    let (nn, ki, g) = (n as i64, check_i32("k", k)?, use_gc as i32);
    let f = dev.function(FAMILY, "heads_flow_rows")?;
    let mut a = dev.launch_builder(&f);
    a.arg(x)
        .arg(&nn)
        .arg(&ki)
        .arg(&g)
        .arg(&terms)
        .arg(&row_loss)
        .arg(&c);
    dev.launch("heads_flow_rows", a, grid(n))
}

/// The gradients of the three flow evaluations (`d_read`, `d_b`, `d_d`; 0: not wanted), with
/// the risk gradient `risk_grad` (0: none) added to v_read's.
///
/// # Safety
/// As [`flow_rows`]; the gradients and `risk_grad`: `n·k` f32 or 0; `d_loss` 1 f32.
#[allow(clippy::too_many_arguments)]
pub unsafe fn flow_bwd(
    dev: &CudaDevice,
    x: &FlowIns,
    n: usize,
    k: usize,
    w: (f32, f32, f32),
    risk_grad: u64,
    d_loss: u64,
    d_read: u64,
    d_b: u64,
    d_d: u64,
) -> Result<()> {
    let (nn, ki) = (n as i64, check_i32("k", k)?);
    let f = dev.function(FAMILY, "heads_flow_bwd")?;
    let mut a = dev.launch_builder(&f);
    a.arg(x)
        .arg(&nn)
        .arg(&ki)
        .arg(&w.0)
        .arg(&w.1)
        .arg(&w.2)
        .arg(&risk_grad)
        .arg(&d_loss)
        .arg(&d_read)
        .arg(&d_b)
        .arg(&d_d);
    dev.launch("heads_flow_bwd", a, grid(n * k))
}
