//! The glue of the GPU-resident training step (`kernels/step.cu`, issue 11 item 2): launchers
//! on raw device pointers (`CUdeviceptr` as u64), queued on [`CudaDevice::stream`] without a
//! synchronisation. Their CPU references are the host code the CPU backend runs, named per
//! launcher; `tests/cuda_step_ops.rs` checks each against it, and `tests/cuda_train.rs` the
//! whole prepare phase.
//!
//! Row indices travel as f32 (as the graph's gather op takes them): exact below 2^24 rows.

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use crate::device::{blocks_for, CudaDevice};
use crate::error::{Error, Result};
use crate::kernels::check_i32;

const FAMILY: &str = "step";
/// `STEP_BLOCK` in step.cu.
const BLOCK: u32 = 256;

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks_for(n, BLOCK).clamp(1, 65535), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Largest row index f32 carries exactly.
pub const MAX_F32_INDEX: usize = 1 << 24;

/// Checks that `n` positions can be indexed by f32 row indices.
pub fn check_f32_index(what: &str, n: usize) -> Result<()> {
    if n > MAX_F32_INDEX {
        return Err(Error::Shape(format!(
            "{what}: {n} positions; f32 row indices are exact up to {MAX_F32_INDEX}"
        )));
    }
    Ok(())
}

/// `mask[r][t]` = 1 on row r's scored response tokens (t in plen−1 .. plen−1+rlen), else 0:
/// [`crate::train::rollout::Batch::mask`].
///
/// # Safety
/// `plen`, `rlen`: `rows` i32; `mask`: `rows·s` f32.
pub unsafe fn batch_mask(
    dev: &CudaDevice,
    plen: u64,
    rlen: u64,
    rows: usize,
    s: usize,
    mask: u64,
) -> Result<()> {
    let (r, si) = (check_i32("rows", rows)?, check_i32("S", s)?);
    let f = dev.function(FAMILY, "step_batch_mask")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&plen).arg(&rlen).arg(&r).arg(&si).arg(&mask);
    dev.launch("step_batch_mask", a, grid(rows * s))
}

/// Token rewards: [`crate::train::rollout::token_rewards`]. `kl` may be 0 (no KL term).
///
/// # Safety
/// `mask`, `kl`, `out`: `rows·s` f32; `plen`, `rlen`: `rows` i32; `reward`: `rows` f64.
#[allow(clippy::too_many_arguments)]
pub unsafe fn token_rewards(
    dev: &CudaDevice,
    mask: u64,
    kl: u64,
    beta: f64,
    plen: u64,
    rlen: u64,
    reward: u64,
    rows: usize,
    s: usize,
    out: u64,
) -> Result<()> {
    let (r, si) = (check_i32("rows", rows)?, check_i32("S", s)?);
    let f = dev.function(FAMILY, "step_token_rewards")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&mask)
        .arg(&kl)
        .arg(&beta)
        .arg(&plen)
        .arg(&rlen)
        .arg(&reward)
        .arg(&r)
        .arg(&si)
        .arg(&out);
    dev.launch("step_token_rewards", a, grid(rows * s))
}

/// Per output row j of `m` (rollout row `rows[j]`, f32, −1 = padding; `rows` 0 = identity):
/// `mode` 0: `mask·a_j` where the mask is set (GRPO's row advantage at every response token,
/// [`crate::train::rollout::grpo_advantages`]); `mode` 1: `mask / a_j`, 0 where `a_j` is 0
/// (token weights, [`crate::train::rollout::token_weights`]); 0 for padding rows.
///
/// # Safety
/// `mask`: the rollout's `[R][s]` f32 (every `rows[j]` below R); `rows`, `a`: `m` f32; `out`:
/// `m·s` f32.
#[allow(clippy::too_many_arguments)]
pub unsafe fn row_value(
    dev: &CudaDevice,
    mask: u64,
    rows: u64,
    a: u64,
    m: usize,
    s: usize,
    mode: i32,
    out: u64,
) -> Result<()> {
    let (mi, si) = (check_i32("m", m)?, check_i32("S", s)?);
    let f = dev.function(FAMILY, "step_row_value")?;
    let mut l = dev.launch_builder(&f);
    l.arg(&mask)
        .arg(&rows)
        .arg(&a)
        .arg(&mi)
        .arg(&si)
        .arg(&mode)
        .arg(&out);
    dev.launch("step_row_value", l, grid(m * s))
}

/// `x[i] = 0` where `mask[i / k]` is 0 (the value and quantile readouts off the response).
///
/// # Safety
/// `x`: `n` f32; `mask`: `n / k` f32.
pub unsafe fn mask_select(dev: &CudaDevice, x: u64, mask: u64, n: usize, k: usize) -> Result<()> {
    let (nn, ki) = (n as i64, check_i32("k", k)?);
    let f = dev.function(FAMILY, "step_mask_select")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&x).arg(&mask).arg(&nn).arg(&ki);
    dev.launch("step_mask_select", a, grid(n))
}

/// The readout's end ([`crate::train::rollout::flow_readout`]): row j of `z1` (`[m][k]`)
/// clamped to `clip`, written to token `idx[j]` of `z` (`[N][k]`), and its population std to
/// `sd[idx[j]]`. `z` and `sd` must be zero elsewhere.
///
/// # Safety
/// `z1`: `m·k` f32; `idx`: `m` distinct f32 token indices below N; `z`: `N·k`; `sd`: `N` f32.
#[allow(clippy::too_many_arguments)]
pub unsafe fn readout_finish(
    dev: &CudaDevice,
    z1: u64,
    idx: u64,
    m: usize,
    k: usize,
    clip: Option<(f32, f32)>,
    z: u64,
    sd: u64,
) -> Result<()> {
    let (mi, ki) = (check_i32("m", m)?, check_i32("k", k)?);
    let (c, lo, hi) = match clip {
        Some((lo, hi)) => (1i32, lo, hi),
        None => (0, 0.0f32, 0.0f32),
    };
    let f = dev.function(FAMILY, "step_readout_finish")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&z1)
        .arg(&idx)
        .arg(&mi)
        .arg(&ki)
        .arg(&c)
        .arg(&lo)
        .arg(&hi)
        .arg(&z)
        .arg(&sd);
    dev.launch("step_readout_finish", a, grid(m))
}

/// The successor token of each listed token (itself where the response ends), as in
/// [`crate::train::rollout::flow_targets`].
///
/// # Safety
/// `idx`, `next`: `m` f32; `mask`: `n` f32.
pub unsafe fn next_rows(
    dev: &CudaDevice,
    idx: u64,
    mask: u64,
    m: usize,
    n: usize,
    s: usize,
    next: u64,
) -> Result<()> {
    let (mi, nn, si) = (check_i32("m", m)?, n as i64, check_i32("S", s)?);
    let f = dev.function(FAMILY, "step_next_rows")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&idx).arg(&mask).arg(&mi).arg(&nn).arg(&si).arg(&next);
    dev.launch("step_next_rows", a, grid(m))
}

/// The draws of a [`crate::train::rollout::Stream`] at `(seed, counter)`: `n` uniforms into
/// `tau`, then `n` standard normals into `noise` (the host's `uniform()` then `normal()` calls).
///
/// # Safety
/// `tau`, `noise`: `n` f32.
pub unsafe fn uniform_normal(
    dev: &CudaDevice,
    seed: u64,
    counter: u64,
    n: usize,
    tau: u64,
    noise: u64,
) -> Result<()> {
    let nn = n as i64;
    let f = dev.function(FAMILY, "step_uniform_normal")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&seed).arg(&counter).arg(&nn).arg(&tau).arg(&noise);
    dev.launch("step_uniform_normal", a, grid(n))
}

/// `StepFlowFields` in step.cu: the 10 per-sample fields of
/// [`crate::train::rollout::FlowTargets`] in its `fields()` order.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FlowFieldPtrs(pub [u64; 10]);
// SAFETY: plain #[repr(C)] data with the layout of the kernel's by-value struct of 10 pointers.
unsafe impl DeviceRepr for FlowFieldPtrs {}
// SAFETY: as DeviceRepr (pushed by value; the emulator checks its size).
unsafe impl crate::device::KernelValue for FlowFieldPtrs {}

/// What [`flow_fields`] reads besides the buffers.
#[derive(Clone, Copy, Debug)]
pub struct FlowFieldOpts {
    pub gamma: f32,
    pub kappa: f32,
    pub direction: i32,
    pub anchor_lambda: bool,
}

/// Per-token (device pointers) inputs of [`flow_fields`].
#[derive(Clone, Copy, Debug)]
pub struct FlowFieldInputs {
    /// `m` f32 token indices (the listed tokens).
    pub idx: u64,
    /// `n` f32.
    pub mask: u64,
    /// `m·k` f32 each: the sampled τ and ε, the old flow's z'_τ and v_old(z'_τ, τ).
    pub tau: u64,
    pub noise: u64,
    pub zp: u64,
    pub vold: u64,
    /// `n` f32: the readout's per-token std.
    pub sd: u64,
    /// `n·k` f32: the λ-returns G.
    pub ret: u64,
    /// `n` f32: the token rewards.
    pub rewards: u64,
    /// `n·k` f32: the readout samples.
    pub z: u64,
}

/// The flow critic's target fields at the listed tokens ([`crate::train::rollout::flow_targets`]):
/// writes the 10 `[n][k]` fields at the listed tokens (they must be zero elsewhere, and
/// `target` a copy of `ret`) and `w_unc`, `dmask` (`n` f32).
///
/// # Safety
/// The pointers address buffers of the sizes documented on [`FlowFieldInputs`] and above.
#[allow(clippy::too_many_arguments)]
pub unsafe fn flow_fields(
    dev: &CudaDevice,
    out: FlowFieldPtrs,
    w_unc: u64,
    dmask: u64,
    x: &FlowFieldInputs,
    m: usize,
    k: usize,
    n: usize,
    s: usize,
    o: FlowFieldOpts,
) -> Result<()> {
    let (mi, ki, nn, si) = (
        check_i32("m", m)?,
        check_i32("k", k)?,
        n as i64,
        check_i32("S", s)?,
    );
    let (dir, al) = (o.direction, o.anchor_lambda as i32);
    let f = dev.function(FAMILY, "step_flow_fields")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&out)
        .arg(&w_unc)
        .arg(&dmask)
        .arg(&x.idx)
        .arg(&mi)
        .arg(&ki)
        .arg(&nn)
        .arg(&si)
        .arg(&x.mask)
        .arg(&x.tau)
        .arg(&x.noise)
        .arg(&x.zp)
        .arg(&x.vold)
        .arg(&x.sd)
        .arg(&x.ret)
        .arg(&x.rewards)
        .arg(&x.z)
        .arg(&o.gamma)
        .arg(&o.kappa)
        .arg(&dir)
        .arg(&al);
    dev.launch("step_flow_fields", a, grid(m * k))
}

/// `critic.risk_targets = "prompt"` ([`crate::train::rollout::pool_first_token_targets`]): group
/// g's first-token indices are `first[start[g] .. start[g+1]]` (i32); `scratch` holds
/// `start[groups]·k` f32.
///
/// # Safety
/// `target`: `[N][k]` f32 with every listed index below N; `first`: `start[groups]` i32;
/// `start`: `groups + 1` i32; `scratch` as above.
pub unsafe fn pool_first(
    dev: &CudaDevice,
    target: u64,
    first: u64,
    start: u64,
    groups: usize,
    k: usize,
    scratch: u64,
) -> Result<()> {
    let ki = check_i32("k", k)?;
    let f = dev.function(FAMILY, "step_pool_first")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&target)
        .arg(&first)
        .arg(&start)
        .arg(&ki)
        .arg(&scratch);
    let cfg = LaunchConfig {
        grid_dim: (check_i32("groups", groups)? as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    dev.launch("step_pool_first", a, cfg)
}

/// A micro-batch's flow-critic token inputs ([`crate::train::trainer`]'s critic inputs):
/// `rows`, `tok_w`, `risk_w` (`cap` f32 each) from the `m` listed rollout tokens `global` (f32)
/// and `rowpos` (i32 per rollout row: its graph row), with the minibatch's token count `total`
/// and first-token count `nf` (`prompt`: risk weights on first tokens only).
///
/// # Safety
/// `global`: `m` f32; `rowpos`, `plen`: R i32 (every `global / s` below R); outputs `cap` f32.
#[allow(clippy::too_many_arguments)]
pub unsafe fn flow_rows(
    dev: &CudaDevice,
    global: u64,
    rowpos: u64,
    plen: u64,
    m: usize,
    cap: usize,
    s: usize,
    total: f32,
    nf: f32,
    prompt: bool,
    rows: u64,
    tok_w: u64,
    risk_w: u64,
) -> Result<()> {
    let (mi, ci, si, p) = (
        check_i32("m", m)?,
        check_i32("cap", cap)?,
        check_i32("S", s)?,
        prompt as i32,
    );
    let f = dev.function(FAMILY, "step_flow_rows")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&global)
        .arg(&rowpos)
        .arg(&plen)
        .arg(&mi)
        .arg(&ci)
        .arg(&si)
        .arg(&total)
        .arg(&nf)
        .arg(&p)
        .arg(&rows)
        .arg(&tok_w)
        .arg(&risk_w);
    dev.launch("step_flow_rows", a, grid(cap))
}

/// `out[0]` (f64) = Σ_{i<n} `x[i·stride + col]`·(`w[i]` or 1 when `w` is 0), each product in
/// f32, summed in f64 (one block, fixed order).
///
/// # Safety
/// `x`: `n·stride` f32; `w`: `n` f32 or 0; `out`: 1 f64.
pub unsafe fn sum(
    dev: &CudaDevice,
    x: u64,
    w: u64,
    n: usize,
    stride: usize,
    col: usize,
    out: u64,
) -> Result<()> {
    let (nn, st, c) = (
        n as i64,
        check_i32("stride", stride)?,
        check_i32("col", col)?,
    );
    let f = dev.function(FAMILY, "step_sum")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&x).arg(&w).arg(&nn).arg(&st).arg(&c).arg(&out);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    dev.launch("step_sum", a, cfg)
}

/// The response tokens' positions `r·s + t` (f32), in index order: `list[off[r] + k]` =
/// `r·s + plen[r] − 1 + k` for k < `rlen[r]` ([`batch_mask`]'s set positions; `off` = the
/// exclusive prefix sum of `rlen`). CPU reference: the mask's set positions in
/// [`crate::train::stages::StepRows::new`].
///
/// # Safety
/// `plen`, `rlen`, `off`: `rows` i32 with `plen[r] − 1 + rlen[r] <= s`; `list`: Σ rlen f32.
pub unsafe fn token_list(
    dev: &CudaDevice,
    plen: u64,
    rlen: u64,
    off: u64,
    rows: usize,
    s: usize,
    list: u64,
) -> Result<()> {
    let (r, si) = (check_i32("rows", rows)?, check_i32("S", s)?);
    let f = dev.function(FAMILY, "step_token_list")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&plen)
        .arg(&rlen)
        .arg(&off)
        .arg(&r)
        .arg(&si)
        .arg(&list);
    dev.launch("step_token_list", a, grid(rows * s))
}

/// `out[dst[i] + k] = src[so[i] + k]` for k < `len[i]`, `seg` = `[so | dst | len]` (`nseg` i32
/// each): a concatenation of segments of `src` (a micro-batch's response tokens, row by row,
/// from the step's token list). CPU reference: the host's `flow_tokens` in
/// `src/train/stages/update.rs`.
///
/// # Safety
/// `src` holds every `so[i] + len[i]` f32; `out` every `dst[i] + len[i]`, destinations disjoint.
pub unsafe fn segments(dev: &CudaDevice, src: u64, seg: u64, nseg: usize, out: u64) -> Result<()> {
    let n = check_i32("segments", nseg)?;
    let f = dev.function(FAMILY, "step_segments")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&src).arg(&seg).arg(&n).arg(&out);
    let cfg = LaunchConfig {
        grid_dim: (nseg.clamp(1, 65535) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    dev.launch("step_segments", a, cfg)
}

/// A decoder graph's batch (`ids`, `targets`, `lens` of `b` rows of `s` tokens) gathered from
/// the step's packed token rows: row r's tokens at `src[off[r]..off[r] + len[r]]`, `meta` =
/// `[off | len | skip]` (`src_rows` i32 each; skip = the prompt length). Graph row j takes step
/// row `rows[j]` (i32, −1 = empty) or, with `rows` 0, `row0 + j` for j < m, else empty; the
/// targets start at each row's prompt length with `use_skip`, at token 0 without.
/// CPU reference: [`crate::model::decoder::DecoderGraph::set_batch_masked`].
///
/// # Safety
/// `src`: the packed tokens (u32), every `len[r] <= s`; `meta`: `3·src_rows` i32; `rows`: `b`
/// i32 below `src_rows` or 0; `out` = `[ids, targets, lens]`: `b·s`, `b·s`, `b` u32.
#[allow(clippy::too_many_arguments)]
pub unsafe fn seq_rows(
    dev: &CudaDevice,
    src: u64,
    meta: u64,
    src_rows: usize,
    rows: u64,
    row0: usize,
    m: usize,
    b: usize,
    s: usize,
    use_skip: bool,
    pad: u32,
    ignore: u32,
    out: [u64; 3],
) -> Result<()> {
    let (sr, r0, mm, bb, si) = (
        check_i32("step rows", src_rows)?,
        check_i32("row0", row0)?,
        check_i32("rows", m)?,
        check_i32("B", b)?,
        check_i32("S", s)?,
    );
    let us = use_skip as i32;
    let f = dev.function(FAMILY, "step_seq_rows")?;
    let mut a = dev.launch_builder(&f);
    a.arg(&src)
        .arg(&meta)
        .arg(&sr)
        .arg(&rows)
        .arg(&r0)
        .arg(&mm)
        .arg(&bb)
        .arg(&si)
        .arg(&us)
        .arg(&pad)
        .arg(&ignore)
        .arg(&out[0])
        .arg(&out[1])
        .arg(&out[2]);
    dev.launch("step_seq_rows", a, grid(b * s))
}
