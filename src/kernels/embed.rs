//! Token embedding (`kernels/embed.cu`): the gather and its deterministic backward.
//!
//! # Layout and math
//! `ids` is `[n]` u32 token ids, `table` is `[v][d]` row-major, `out` is `[n][d]`:
//! `out[t] = table[ids[t]]`. The backward accumulates `dtable[id] += Σ_{t: ids[t] = id} dout[t]`
//! (`+=`, fp32 on every backend).
//!
//! # Out-of-range ids
//! The CPU references and [`EmbedBwdPlan::new`] reject an id `≥ v` with [`Error::Invalid`]
//! naming the token ([`check_ids`] is the same check for callers that hold the ids on the host,
//! e.g. before uploading a batch). The CUDA forward cannot return an error without a host round
//! trip, so it never reads out of range instead: a token with an id `≥ v` gets a row of zeros,
//! and when a `bad` counter (one u32 on the device) is passed it is incremented once per such
//! token, for the caller to check when it next synchronises.
//!
//! # Deterministic backward on CUDA (no float atomics)
//! The host builds an [`EmbedBwdPlan`] from the ids: token indices sorted by id (stable, so
//! ascending token order within an id), cut into work items of at most
//! [`EMBED_ROWS_PER_ITEM`] rows. One block per item sums its rows in that fixed order; an id with
//! one item adds the sum to `dtable[id]` directly, an id with several (a frequent token, e.g.
//! padding) writes each item's sum to a workspace slot and a second kernel adds the slots to
//! `dtable[id]` in slot order. The result is bit-for-bit reproducible and load-balanced however
//! skewed the ids are. The launch grids depend on `n` only, and the plan is one fixed-size u32
//! array ([`plan_len`]), so the launches can be captured once in a CUDA graph and replayed with a
//! new plan each step (uploaded, or built on the device: below).
//!
//! # The plan on the device
//! [`cuda::embed_plan_raw`] builds the same packed array on the device from the ids already
//! there (a stable LSD radix sort over the bits of `v`, then scans that cut items and groups),
//! bit for bit what [`EmbedBwdPlan::new`] writes, tails included (zeros), so a step uploads no
//! plan. It cannot fail on an id `≥ v`: such a token sorts as the id `v` (after every valid
//! one), and the backward kernels skip items and groups of an id `≥ v`, so it adds nothing to
//! `dtable`, the gradient of the zero row the forward gave it. Its plan equals
//! `EmbedBwdPlan::new` of the ids with every id `≥ v` replaced by `v`, for a vocabulary of
//! `v + 1`.
//!
//! On CUDA `table`, `out` and `dout` are bf16 (`u16` bit patterns), `dtable` fp32.

use super::Real;
use crate::error::{check_len, Error, Result};

/// Rows summed by one work item of the CUDA backward (longer runs of one id are split).
pub const EMBED_ROWS_PER_ITEM: usize = 64;
/// `item_slot` value meaning "add straight into dtable" (`EMBED_NO_SLOT` in embed.cu).
const NO_SLOT: u32 = u32::MAX;

fn dims(what: &str, n: usize, v: usize, d: usize) -> Result<(usize, usize)> {
    if d == 0 {
        return Err(Error::Invalid(format!(
            "{what}: d = 0: rows must be non-empty"
        )));
    }
    if v == 0 {
        return Err(Error::Invalid(format!("{what}: vocab size v = 0")));
    }
    let ovf = || Error::Shape(format!("{what}: size overflows usize"));
    Ok((
        n.checked_mul(d).ok_or_else(ovf)?,
        v.checked_mul(d).ok_or_else(ovf)?,
    ))
}

/// `Error::Invalid` naming the first token whose id is `≥ v`.
pub fn check_ids(ids: &[u32], v: usize) -> Result<()> {
    if let Some((t, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
        return Err(Error::Invalid(format!(
            "embedding: ids[{t}] = {id} is out of range for a vocabulary of {v}"
        )));
    }
    Ok(())
}

/// Most split ids (groups) a plan for `n` tokens can have: each has more than
/// [`EMBED_ROWS_PER_ITEM`] rows.
pub fn max_groups(n: usize) -> usize {
    n / (EMBED_ROWS_PER_ITEM + 1)
}

/// Most workspace slots a plan for `n` tokens can use: an id with `c > R` rows takes
/// `⌈c/R⌉ < 2c/R` slots, so at most `2n/R` in all.
pub fn max_slots(n: usize) -> usize {
    2 * n / EMBED_ROWS_PER_ITEM
}

/// u32 elements of a packed plan for `n` tokens (the layout is in the header of embed.cu).
pub fn plan_len(n: usize) -> usize {
    5 + 4 * n + 3 * max_groups(n)
}

/// The host-side schedule of the deterministic CUDA backward (see the module doc).
#[derive(Clone, Debug)]
pub struct EmbedBwdPlan {
    n: usize,
    v: usize,
    n_items: usize,
    n_groups: usize,
    n_slots: usize,
    packed: Vec<u32>,
}

impl EmbedBwdPlan {
    /// Sorts the token indices by id and cuts them into work items. Errors: an id `≥ v`, more
    /// than `i32::MAX` tokens.
    pub fn new(ids: &[u32], v: usize) -> Result<Self> {
        check_ids(ids, v)?;
        let n = ids.len();
        if n > i32::MAX as usize {
            return Err(Error::Shape(format!(
                "embedding backward: {n} tokens exceed i32::MAX"
            )));
        }
        let mut perm: Vec<u32> = (0..n as u32).collect();
        perm.sort_by_key(|&t| ids[t as usize]); // stable: token order within an id
        let gmax = max_groups(n);
        let mut p = vec![0u32; plan_len(n)];
        let (item_id, rest) = p[4..].split_at_mut(n);
        let (item_off, rest) = rest.split_at_mut(n + 1);
        let (item_slot, rest) = rest.split_at_mut(n);
        let (perm_out, rest) = rest.split_at_mut(n);
        let (grp_id, rest) = rest.split_at_mut(gmax);
        let (grp_slot, grp_cnt) = rest.split_at_mut(gmax);
        perm_out.copy_from_slice(&perm);
        let (mut items, mut groups, mut slots) = (0usize, 0usize, 0usize);
        let mut s = 0;
        while s < n {
            let id = ids[perm[s] as usize];
            let mut e = s + 1;
            while e < n && ids[perm[e] as usize] == id {
                e += 1;
            }
            let k = (e - s).div_ceil(EMBED_ROWS_PER_ITEM);
            if k > 1 {
                grp_id[groups] = id;
                grp_slot[groups] = slots as u32;
                grp_cnt[groups] = k as u32;
                groups += 1;
            }
            for j in 0..k {
                item_id[items] = id;
                item_off[items] = (s + j * EMBED_ROWS_PER_ITEM) as u32;
                item_slot[items] = if k > 1 {
                    slots += 1;
                    (slots - 1) as u32
                } else {
                    NO_SLOT
                };
                items += 1;
            }
            s = e;
        }
        item_off[items] = n as u32;
        debug_assert!(items <= n && groups <= gmax && slots <= max_slots(n));
        p[0] = items as u32;
        p[1] = groups as u32;
        p[2] = n as u32;
        p[3] = slots as u32;
        Ok(EmbedBwdPlan {
            n,
            v,
            n_items: items,
            n_groups: groups,
            n_slots: slots,
            packed: p,
        })
    }

    /// Tokens the plan was built for.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Vocabulary size the ids were checked against.
    pub fn vocab(&self) -> usize {
        self.v
    }
    /// Work items (blocks with work in the first kernel).
    pub fn n_items(&self) -> usize {
        self.n_items
    }
    /// Ids split over several items (blocks with work in the second kernel).
    pub fn n_groups(&self) -> usize {
        self.n_groups
    }
    /// Workspace slots in use.
    pub fn n_slots(&self) -> usize {
        self.n_slots
    }
    /// The packed plan to upload ([`plan_len`]`(n)` u32).
    pub fn packed(&self) -> &[u32] {
        &self.packed
    }
}

pub mod cpu {
    //! CPU references, generic over [`Real`] (f64 for checks, f32 for parity with CUDA).
    use super::*;

    /// `out[t] = table[ids[t]]`. Errors: lengths, `d = 0`, `v = 0`, an id `≥ v`.
    pub fn embed_fwd<T: Real>(
        ids: &[u32],
        table: &[T],
        v: usize,
        d: usize,
        out: &mut [T],
    ) -> Result<()> {
        let n = ids.len();
        let (nd, vd) = dims("embed_fwd", n, v, d)?;
        check_len("embed_fwd table", table.len(), vd)?;
        check_len("embed_fwd out", out.len(), nd)?;
        check_ids(ids, v)?;
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            out[t * d..(t + 1) * d].copy_from_slice(&table[id * d..(id + 1) * d]);
        }
        Ok(())
    }

    /// `dtable[ids[t]] += dout[t]` for every token, in token order. Errors as [`embed_fwd`].
    pub fn embed_bwd<T: Real>(
        ids: &[u32],
        dout: &[T],
        v: usize,
        d: usize,
        dtable: &mut [T],
    ) -> Result<()> {
        let n = ids.len();
        let (nd, vd) = dims("embed_bwd", n, v, d)?;
        check_len("embed_bwd dout", dout.len(), nd)?;
        check_len("embed_bwd dtable", dtable.len(), vd)?;
        check_ids(ids, v)?;
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            for (o, &g) in dtable[id * d..(id + 1) * d]
                .iter_mut()
                .zip(&dout[t * d..(t + 1) * d])
            {
                *o += g;
            }
        }
        Ok(())
    }
}

pub mod cuda {
    //! CUDA launchers (bf16 as `u16` bits). `*_raw` take raw device pointers and queue work on
    //! [`CudaDevice::stream`] without synchronising; the safe wrappers take cudarc views.
    use super::*;
    use crate::device::CudaDevice;
    use crate::kernels::check_ptr;
    use cudarc::driver::{
        CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    };

    const FAMILY: &str = "embed";
    const THREADS: u32 = 128;
    const FWD_THREADS: u32 = 256;
    const MAX_BLOCKS: usize = 65536;

    fn ints(what: &str, n: usize, v: usize, d: usize) -> Result<(i32, i32, i32)> {
        let f = |x: usize, name: &str| {
            i32::try_from(x)
                .map_err(|_| Error::Shape(format!("{what}: {name} = {x} exceeds i32::MAX")))
        };
        Ok((f(n, "n")?, f(v, "v")?, f(d, "d")?))
    }

    /// f32 elements of the workspace [`embed_bwd_raw`] needs for `n` tokens of width `d`.
    pub fn embed_bwd_workspace_len(n: usize, d: usize) -> usize {
        max_slots(n).max(1) * d
    }

    /// Embedding gather on raw pointers: `ids` u32 `[n]`, `table` bf16 `[v][d]`, `out` bf16
    /// `[n][d]`. An id `≥ v` gives a zero row and, when `bad` is not 0, increments the u32 at
    /// `bad` (see the module doc).
    ///
    /// # Safety
    /// The pointers must be live device allocations of `dev`'s context of those sizes; `out`
    /// and `bad` must not overlap anything else.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn embed_fwd_raw(
        dev: &CudaDevice,
        ids: u64,
        table: u64,
        n: usize,
        v: usize,
        d: usize,
        out: u64,
        bad: u64,
    ) -> Result<()> {
        dims("embed_fwd", n, v, d)?;
        if n == 0 {
            return Ok(());
        }
        let (ni, vi, di) = ints("embed_fwd", n, v, d)?;
        check_ptr("embed_fwd ids", ids, 4)?;
        check_ptr("embed_fwd table", table, 2)?;
        check_ptr("embed_fwd out", out, 2)?;
        if bad != 0 {
            check_ptr("embed_fwd bad", bad, 4)?;
        }
        let vec = d.is_multiple_of(8) && table.is_multiple_of(16) && out.is_multiple_of(16);
        let units = if vec { n * (d / 8) } else { n * d };
        let grid = units.div_ceil(FWD_THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
        let vec = vec as i32;
        let f = dev.function(FAMILY, "embed_fwd")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&ids)
            .arg(&table)
            .arg(&out)
            .arg(&bad)
            .arg(&ni)
            .arg(&vi)
            .arg(&di)
            .arg(&vec);
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (FWD_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("embed_fwd", a, cfg)
    }

    /// Deterministic embedding backward on raw pointers (two launches): `dtable += ` the
    /// per-id sums of `dout` rows. `plan` is an uploaded [`EmbedBwdPlan::packed`] built for
    /// these `n` tokens and this `v` ([`plan_len`]`(n)` u32), `dout` bf16 `[n][d]`, `dtable`
    /// f32 `[v][d]`, `workspace` [`embed_bwd_workspace_len`]`(n, d)` f32.
    ///
    /// # Safety
    /// The pointers must be live device allocations of `dev`'s context of those sizes, the plan
    /// must come from [`EmbedBwdPlan::new`] with the same `n` and `v` (the kernels skip ids,
    /// slots and offsets out of range, but a foreign plan gives a wrong result); `dtable` and
    /// `workspace` must not overlap anything else.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn embed_bwd_raw(
        dev: &CudaDevice,
        plan: u64,
        dout: u64,
        n: usize,
        v: usize,
        d: usize,
        dtable: u64,
        workspace: u64,
    ) -> Result<()> {
        dims("embed_bwd", n, v, d)?;
        if n == 0 {
            return Ok(());
        }
        let (ni, vi, di) = ints("embed_bwd", n, v, d)?;
        check_ptr("embed_bwd plan", plan, 4)?;
        check_ptr("embed_bwd dout", dout, 2)?;
        check_ptr("embed_bwd dtable", dtable, 4)?;
        check_ptr("embed_bwd workspace", workspace, 4)?;
        let slots = max_slots(n);
        let slots_i = i32::try_from(slots).unwrap_or(i32::MAX);
        let gmax = max_groups(n);
        let gmax_i = gmax as i32; // < n
        let vec = (d.is_multiple_of(8)
            && dout.is_multiple_of(16)
            && dtable.is_multiple_of(16)
            && workspace.is_multiple_of(16)) as i32;

        let f = dev.function(FAMILY, "embed_bwd_items")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&plan)
            .arg(&dout)
            .arg(&dtable)
            .arg(&workspace)
            .arg(&ni)
            .arg(&vi)
            .arg(&di)
            .arg(&slots_i)
            .arg(&vec);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("embed_bwd_items", a, cfg)?;

        if gmax == 0 {
            return Ok(()); // no id can be split with n ≤ EMBED_ROWS_PER_ITEM
        }
        let f = dev.function(FAMILY, "embed_bwd_groups")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&plan)
            .arg(&workspace)
            .arg(&dtable)
            .arg(&ni)
            .arg(&vi)
            .arg(&di)
            .arg(&gmax_i)
            .arg(&slots_i);
        let cfg = LaunchConfig {
            grid_dim: (gmax as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        dev.launch("embed_bwd_groups", a, cfg)
    }

    /// Tokens per radix tile of the plan builder (`EMBED_PLAN_TILE` in embed.cu; also its digit
    /// bins: 8-bit digits).
    const PLAN_TILE: usize = 256;
    const PLAN_BITS: u32 = 8;
    const PLAN_THREADS: usize = 256;
    const PLAN_SCAN_THREADS: u32 = 1024;

    /// u32 elements of the scratch [`embed_plan_raw`] needs for `n` tokens: two key and two
    /// index buffers of the radix sort (4n), the digit counts (256 per tile of 256 tokens), the
    /// three flag arrays of the cut (3n) and four totals.
    pub fn embed_plan_scratch_len(n: usize) -> usize {
        7 * n + PLAN_TILE * n.div_ceil(PLAN_TILE) + 4
    }

    /// Radix passes for keys up to `v` (ids `≥ v` sort as `v`): the bits of `v`, 8 a pass.
    pub fn embed_plan_passes(v: usize) -> u32 {
        (usize::BITS - v.leading_zeros()).div_ceil(PLAN_BITS)
    }

    /// Builds on the device the packed backward plan of `ids` (u32 `[n]`, device) into `plan`
    /// ([`plan_len`]`(n)` u32): the array [`EmbedBwdPlan::new`] makes, bit for bit; ids `≥ v`
    /// as in the module doc. `scratch`: [`embed_plan_scratch_len`]`(n)` u32, any contents.
    /// `3·passes + 3` launches ([`embed_plan_passes`]: 12 for Qwen2's 151936), grids from `n`
    /// and `v` only (so they can be captured in a CUDA graph); nothing is synchronised or copied
    /// to the host. Errors: `v = 0`, `n` or `v` past `i32::MAX`, a null or misaligned pointer.
    ///
    /// # Safety
    /// The pointers must be live device allocations of `dev`'s context of those sizes; `plan`
    /// and `scratch` must not overlap each other or `ids`.
    pub unsafe fn embed_plan_raw(
        dev: &CudaDevice,
        ids: u64,
        n: usize,
        v: usize,
        plan: u64,
        scratch: u64,
    ) -> Result<()> {
        if v == 0 {
            return Err(Error::Invalid("embed_plan: vocab size v = 0".into()));
        }
        let (ni, vi, _) = ints("embed_plan", n, v, 1)?;
        check_ptr("embed_plan plan", plan, 4)?;
        let gmax = max_groups(n) as i32; // < n
        let rows = EMBED_ROWS_PER_ITEM as i32;
        let block = |x: usize| LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (x as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let null = 0u64;
        let write = dev.function(FAMILY, "embed_plan_write")?;
        if n == 0 {
            let mut a = dev.launch_builder(&write);
            a.arg(&null).arg(&null).arg(&null).arg(&null).arg(&plan);
            a.arg(&ni).arg(&gmax).arg(&rows);
            return dev.launch("embed_plan_write", a, block(PLAN_THREADS));
        }
        check_ptr("embed_plan ids", ids, 4)?;
        check_ptr("embed_plan scratch", scratch, 4)?;
        let tiles = n.div_ceil(PLAN_TILE);
        let tiles_i = tiles as i32; // ≤ n
        let at = |words: usize| scratch + 4 * words as u64;
        let keys = [at(0), at(n)];
        let idx = [at(2 * n), at(3 * n)];
        let counts = at(4 * n);
        let flags = counts + 4 * (PLAN_TILE * tiles) as u64;
        let totals = flags + 4 * (3 * n) as u64;
        let grid = |blocks: usize, threads: usize| LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let scan = dev.function(FAMILY, "embed_plan_scan")?;
        let scan_cfg = |arrays: u32| LaunchConfig {
            grid_dim: (1, arrays, 1),
            block_dim: (PLAN_SCAN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let count = dev.function(FAMILY, "embed_plan_count")?;
        let scatter = dev.function(FAMILY, "embed_plan_scatter")?;
        // Pass k reads (keys_in, idx_in) and writes buffer k % 2; the first reads the ids.
        let (mut kin, mut iin) = (ids, null);
        let n_counts = (PLAN_TILE * tiles) as i64;
        let no_stride = 0i64;
        let sink = totals + 12; // the digit scans' totals are not needed: totals[3]
        for k in 0..embed_plan_passes(v) {
            let shift = (k * PLAN_BITS) as i32;
            let (kout, iout) = (keys[k as usize % 2], idx[k as usize % 2]);
            let mut a = dev.launch_builder(&count);
            a.arg(&kin)
                .arg(&counts)
                .arg(&ni)
                .arg(&vi)
                .arg(&shift)
                .arg(&tiles_i);
            dev.launch("embed_plan_count", a, grid(tiles, PLAN_TILE))?;
            let mut a = dev.launch_builder(&scan);
            a.arg(&counts).arg(&sink).arg(&n_counts).arg(&no_stride);
            dev.launch("embed_plan_scan", a, scan_cfg(1))?;
            let mut a = dev.launch_builder(&scatter);
            a.arg(&kin).arg(&iin).arg(&counts).arg(&kout).arg(&iout);
            a.arg(&ni).arg(&vi).arg(&shift).arg(&tiles_i);
            dev.launch("embed_plan_scatter", a, grid(tiles, PLAN_TILE))?;
            (kin, iin) = (kout, iout);
        }
        let blocks = n.div_ceil(PLAN_THREADS);
        let f = dev.function(FAMILY, "embed_plan_flags")?;
        let mut a = dev.launch_builder(&f);
        a.arg(&kin).arg(&flags).arg(&ni).arg(&rows);
        dev.launch("embed_plan_flags", a, grid(blocks, PLAN_THREADS))?;
        let (m, stride) = (n as i64, n as i64);
        let mut a = dev.launch_builder(&scan);
        a.arg(&flags).arg(&totals).arg(&m).arg(&stride);
        dev.launch("embed_plan_scan", a, scan_cfg(3))?;
        let mut a = dev.launch_builder(&write);
        a.arg(&kin).arg(&iin).arg(&flags).arg(&totals).arg(&plan);
        a.arg(&ni).arg(&gmax).arg(&rows);
        dev.launch("embed_plan_write", a, grid(blocks, PLAN_THREADS))
    }

    /// [`embed_plan_raw`] on device views: `plan` must hold [`plan_len`]`(ids.len())` u32;
    /// allocates the scratch.
    pub fn embed_plan(
        dev: &CudaDevice,
        ids: &CudaView<'_, u32>,
        v: usize,
        plan: &mut CudaViewMut<'_, u32>,
    ) -> Result<()> {
        let n = ids.len();
        check_len("embed_plan plan", plan.len(), plan_len(n))?;
        let s = dev.stream();
        let scratch = s.alloc_zeros::<u32>(embed_plan_scratch_len(n))?;
        let (ip, _g1) = ids.device_ptr(s);
        let (pp, _g2) = plan.device_ptr_mut(s);
        let (sp, _g3) = scratch.device_ptr(s);
        // SAFETY: lengths checked above; the &mut plan cannot alias ids; scratch is our own.
        unsafe { embed_plan_raw(dev, ip, n, v, pp, sp) }
    }

    /// Embedding gather on device views. `bad`, when given (one u32), counts out-of-range ids
    /// (`+=`, on the device; those rows of `out` are zeros).
    pub fn embed_fwd(
        dev: &CudaDevice,
        ids: &CudaView<'_, u32>,
        table: &CudaView<'_, u16>,
        v: usize,
        d: usize,
        out: &mut CudaViewMut<'_, u16>,
        bad: Option<&mut CudaViewMut<'_, u32>>,
    ) -> Result<()> {
        let n = ids.len();
        let (nd, vd) = dims("embed_fwd", n, v, d)?;
        check_len("embed_fwd table", table.len(), vd)?;
        check_len("embed_fwd out", out.len(), nd)?;
        if let Some(b) = &bad {
            check_len("embed_fwd bad", b.len(), 1)?;
        }
        if n == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let (ip, _g1) = ids.device_ptr(s);
        let (tp, _g2) = table.device_ptr(s);
        let (op, _g3) = out.device_ptr_mut(s);
        let bg = bad.map(|b| b.device_ptr_mut(s));
        let bp = bg.as_ref().map_or(0, |(p, _)| *p);
        // SAFETY: lengths checked above; &mut views cannot alias each other or the inputs.
        unsafe { embed_fwd_raw(dev, ip, tp, n, v, d, op, bp) }
    }

    /// Deterministic embedding backward on device views: uploads `plan`, allocates the
    /// workspace, `dtable += ` the per-id sums of `dout` (bf16 `[n][d]`, `n = plan.n()`).
    pub fn embed_bwd(
        dev: &CudaDevice,
        plan: &EmbedBwdPlan,
        dout: &CudaView<'_, u16>,
        d: usize,
        dtable: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let (n, v) = (plan.n(), plan.vocab());
        let (nd, vd) = dims("embed_bwd", n, v, d)?;
        check_len("embed_bwd dout", dout.len(), nd)?;
        check_len("embed_bwd dtable", dtable.len(), vd)?;
        if n == 0 {
            return Ok(());
        }
        let s = dev.stream();
        let plan_dev = dev.htod(plan.packed())?;
        let mut ws = s.alloc_zeros::<f32>(embed_bwd_workspace_len(n, d))?;
        let (pp, _g1) = plan_dev.device_ptr(s);
        let (dp, _g2) = dout.device_ptr(s);
        let (tp, _g3) = dtable.device_ptr_mut(s);
        let (wp, _g4) = ws.device_ptr_mut(s);
        // SAFETY: lengths checked above; the plan was built by EmbedBwdPlan::new for (n, v).
        unsafe { embed_bwd_raw(dev, pp, dp, n, v, d, tp, wp) }
    }
}
