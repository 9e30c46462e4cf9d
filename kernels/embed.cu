// embed.cu: token embedding gather and its deterministic backward (CPU reference and the host
// plan builder: src/kernels/embed.rs). table [v][d] bf16, out / dout [n][d] bf16, dtable fp32.
// Defines:
//   embed_fwd         out[t] = table[ids[t]]. An id >= v is never read: its row of out is
//                     written with zeros and, when bad is given, *bad is incremented (the count
//                     of out-of-range tokens; the host checks ids before upload where it can).
//   embed_bwd_items   one block per work item of the plan: the item's rows of dout (token
//                     indices sorted by id, ascending token order within an id) are summed in
//                     that fixed order; an id with a single item adds its sum to dtable[id]
//                     (+=), an id split into several items (more than EMBED_ROWS_PER_ITEM rows
//                     on the host side) writes each item's sum to its workspace slot.
//   embed_bwd_groups  one block per split id: dtable[id] += its slots summed in slot order.
// The device builder of the packed plan (the same u32 array as EmbedBwdPlan::new, bit for bit;
// launched by embed::cuda::embed_plan_raw, which also sizes its u32 scratch from n alone):
//   embed_plan_count    radix pass over the keys: one block per tile of EMBED_PLAN_TILE tokens
//                       counts the tile's 8-bit digits, counts[digit][tile].
//   embed_plan_scan     one block per array (grid y): exclusive prefix sum in place, in order,
//                       and the array's total (the digit offsets of a radix pass; the three flag
//                       arrays of the cut).
//   embed_plan_scatter  the stable scatter of a radix pass: per tile, ONE thread walks the tile's
//                       tokens in order and hands out destinations (serial, so ties keep token
//                       order; it runs once per step, 256 tokens per block), all threads move.
//   embed_plan_flags    per sorted position: starts an item / starts a split id (a group) /
//                       starts an item that takes a workspace slot (run bounds by binary search).
//   embed_plan_write    the packed plan from the scanned flags; unused tail entries are zeros.
// The sort key of a token is its id, an id >= v clamped to v: such tokens sort after every valid
// one and form items (and a group) with item_id = v, which embed_bwd_items / _groups skip, so
// they add nothing to dtable -- the backward of embed_fwd's zero row. (No error is possible on
// the device; embed_fwd's bad counter reports them.) The passes cover the bits of v: 3 for
// Qwen2's 151936. Launch grids depend on n and v only.
// Every sum has a fixed order and there are no float atomics, so dtable is bit-for-bit
// reproducible. The launch grids depend on n only (idle blocks exit after reading the plan's
// counts), so the launches can be captured in a CUDA graph and replayed with a new plan.
//
// Packed plan (u32), for n tokens and gmax = n / (EMBED_ROWS_PER_ITEM + 1) groups at most:
//   [0] n_items  [1] n_groups  [2] n  [3] n_slots
//   item_id[n]  item_off[n + 1]  item_slot[n]  perm[n]  grp_id[gmax]  grp_slot[gmax]  grp_cnt[gmax]
// item k covers perm[item_off[k] .. item_off[k+1]); item_slot[k] = EMBED_NO_SLOT means "add to
// dtable directly". Entries past the counts (item_id, item_slot from n_items, item_off from
// n_items + 1, the grp_* arrays from n_groups) are 0 from both builders.
#include <cuda_bf16.h>
#include "common.cuh"

typedef __nv_bfloat16 bf16;

#define EMBED_NO_SLOT 0xffffffffu
#define EMBED_THREADS 128

__device__ __forceinline__ float bf_lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf_hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }

// Grid-stride over units of 8 columns (vec) or 1 column.
extern "C" __global__ void embed_fwd(const u32* __restrict__ ids, const bf16* __restrict__ table,
                                     bf16* __restrict__ out, u32* __restrict__ bad, int n, int v, int d,
                                     int vec) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long upr = vec ? (d >> 3) : d;
    const long long units = (long long)n * upr;
    for (long long x = (long long)blockIdx.x * blockDim.x + threadIdx.x; x < units; x += stride) {
        const long long row = x / upr;
        const long long c = x - row * upr;
        const u32 id = ids[row];
        const bool ok = id < (u32)v;
        if (!ok && bad && c == 0) atomicAdd(bad, 1u);  // integer count: order does not matter
        if (vec) {
            uint4 val = make_uint4(0u, 0u, 0u, 0u);
            if (ok) val = ((const uint4*)(table + (long long)id * d))[c];
            ((uint4*)(out + row * d))[c] = val;
        } else {
            out[row * d + c] = ok ? table[(long long)id * d + c] : __float2bfloat16_rn(0.0f);
        }
    }
}

// Grid n (the most items a plan can have), block EMBED_THREADS.
extern "C" __global__ void __launch_bounds__(EMBED_THREADS)
embed_bwd_items(const u32* __restrict__ plan, const bf16* __restrict__ dout, float* __restrict__ dtable,
                float* __restrict__ ws, int n, int v, int d, int max_slots, int vec) {
    const int item = blockIdx.x;
    if (item >= (int)min(plan[0], (u32)n)) return;
    const u32* item_id = plan + 4;
    const u32* item_off = item_id + n;
    const u32* item_slot = item_off + (n + 1);
    const u32* perm = item_slot + n;
    const u32 id = item_id[item];
    const u32 r0 = item_off[item], r1 = min(item_off[item + 1], (u32)n);
    const u32 slot = item_slot[item];
    if (id >= (u32)v) return;  // a plan from EmbedBwdPlan never has one
    if (slot != EMBED_NO_SLOT && slot >= (u32)max_slots) return;
    float* dst = slot == EMBED_NO_SLOT ? dtable + (long long)id * d : ws + (long long)slot * d;
    const bool add = slot == EMBED_NO_SLOT;
    if (vec) {
        const int nv = d >> 3;
        for (int c = threadIdx.x; c < nv; c += EMBED_THREADS) {
            float acc[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] = 0.f;
#pragma unroll 4
            for (u32 r = r0; r < r1; ++r) {
                const u32 t = perm[r];
                const uint4 u = ((const uint4*)(dout + (long long)t * d))[c];
                acc[0] += bf_lo(u.x); acc[1] += bf_hi(u.x); acc[2] += bf_lo(u.y); acc[3] += bf_hi(u.y);
                acc[4] += bf_lo(u.z); acc[5] += bf_hi(u.z); acc[6] += bf_lo(u.w); acc[7] += bf_hi(u.w);
            }
            float4* p = (float4*)(dst + 8 * c);
            float4 a = make_float4(acc[0], acc[1], acc[2], acc[3]);
            float4 b = make_float4(acc[4], acc[5], acc[6], acc[7]);
            if (add) {
                const float4 oa = p[0], ob = p[1];
                a.x += oa.x; a.y += oa.y; a.z += oa.z; a.w += oa.w;
                b.x += ob.x; b.y += ob.y; b.z += ob.z; b.w += ob.w;
            }
            p[0] = a;
            p[1] = b;
        }
    } else {
        for (int j = threadIdx.x; j < d; j += EMBED_THREADS) {
            float acc = 0.f;
#pragma unroll 4
            for (u32 r = r0; r < r1; ++r) acc += __bfloat162float(dout[(long long)perm[r] * d + j]);
            if (add) acc += dst[j];
            dst[j] = acc;
        }
    }
}

// Grid gmax, block EMBED_THREADS: group g adds its grp_cnt slots, in slot order, to dtable[id].
extern "C" __global__ void __launch_bounds__(EMBED_THREADS)
embed_bwd_groups(const u32* __restrict__ plan, const float* __restrict__ ws, float* __restrict__ dtable,
                 int n, int v, int d, int gmax, int max_slots) {
    const int g = blockIdx.x;
    if (g >= (int)min(plan[1], (u32)gmax)) return;
    const u32* grp_id = plan + 4 + 4 * (long long)n + 1;
    const u32 id = grp_id[g];
    const u32 s0 = grp_id[gmax + g];
    const u32 cnt = grp_id[2 * gmax + g];
    if (id >= (u32)v || s0 > (u32)max_slots || cnt > (u32)max_slots - s0) return;
    float* dst = dtable + (long long)id * d;
    for (int j = threadIdx.x; j < d; j += EMBED_THREADS) {
        float s = 0.f;
        for (u32 k = 0; k < cnt; ++k) s += ws[(long long)(s0 + k) * d + j];
        dst[j] += s;
    }
}

// ---- The device plan builder ------------------------------------------------------------------

#define EMBED_PLAN_TILE 256  // tokens per radix tile = threads of count/scatter = digit bins
#define EMBED_PLAN_BITS 8
#define EMBED_PLAN_SCAN_THREADS 1024
#define EMBED_PLAN_THREADS 256
static_assert(EMBED_PLAN_TILE == 1 << EMBED_PLAN_BITS, "one count/scatter thread per digit bin");

__device__ __forceinline__ u32 plan_key(u32 id, u32 v) { return id < v ? id : v; }

// Grid ceil(n / TILE), block TILE. keys: the ids (first pass) or the previous pass's keys.
extern "C" __global__ void __launch_bounds__(EMBED_PLAN_TILE)
embed_plan_count(const u32* __restrict__ keys, u32* __restrict__ counts, int n, int v, int shift,
                 int ntiles) {
    __shared__ u32 hist[EMBED_PLAN_TILE];
    const int i = threadIdx.x;
    hist[i] = 0u;
    __syncthreads();
    const long long t = (long long)blockIdx.x * EMBED_PLAN_TILE + i;
    // Integer shared atomics: the counts do not depend on the order.
    if (t < n) atomicAdd(&hist[(plan_key(keys[t], (u32)v) >> shift) & (EMBED_PLAN_TILE - 1)], 1u);
    __syncthreads();
    counts[(long long)i * ntiles + blockIdx.x] = hist[i];
}

// Grid (1, arrays), block SCAN_THREADS: a[y * stride + (0..m)] becomes its exclusive prefix
// sum, totals[y] its total. One block walks the array in order (chunks of 4 per thread).
extern "C" __global__ void __launch_bounds__(EMBED_PLAN_SCAN_THREADS)
embed_plan_scan(u32* __restrict__ a, u32* __restrict__ totals, long long m, long long stride) {
    __shared__ u32 warp_tot[EMBED_PLAN_SCAN_THREADS / DFPO_WARP];
    u32* x = a + blockIdx.y * stride;
    const int lane = threadIdx.x & (DFPO_WARP - 1), warp = threadIdx.x / DFPO_WARP;
    u32 carry = 0;
    for (long long base = 0; base < m; base += 4LL * EMBED_PLAN_SCAN_THREADS) {
        const long long i0 = base + 4LL * threadIdx.x;
        u32 v[4], s = 0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            v[e] = i0 + e < m ? x[i0 + e] : 0u;
            s += v[e];
        }
        u32 inc = s;
#pragma unroll
        for (int o = 1; o < DFPO_WARP; o <<= 1) {
            const u32 y = __shfl_up_sync(DFPO_FULL_MASK, inc, o);
            if (lane >= o) inc += y;
        }
        if (lane == DFPO_WARP - 1) warp_tot[warp] = inc;
        __syncthreads();
        if (warp == 0) {
            u32 w = warp_tot[lane];
#pragma unroll
            for (int o = 1; o < DFPO_WARP; o <<= 1) {
                const u32 y = __shfl_up_sync(DFPO_FULL_MASK, w, o);
                if (lane >= o) w += y;
            }
            warp_tot[lane] = w;  // inclusive over warps
        }
        __syncthreads();
        u32 ex = carry + (warp ? warp_tot[warp - 1] : 0u) + inc - s;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if (i0 + e < m) x[i0 + e] = ex;
            ex += v[e];
        }
        carry += warp_tot[DFPO_WARP - 1];
        __syncthreads();  // warp_tot is rewritten by the next chunk
    }
    if (threadIdx.x == 0) totals[blockIdx.y] = carry;
}

// Grid ceil(n / TILE), block TILE. offs: the scanned counts (the tile's first destination per
// digit). idx_in null on the first pass (token t itself).
extern "C" __global__ void __launch_bounds__(EMBED_PLAN_TILE)
embed_plan_scatter(const u32* __restrict__ keys_in, const u32* __restrict__ idx_in,
                   const u32* __restrict__ offs, u32* __restrict__ keys_out,
                   u32* __restrict__ idx_out, int n, int v, int shift, int ntiles) {
    __shared__ u32 key[EMBED_PLAN_TILE];
    __shared__ u32 dst[EMBED_PLAN_TILE];
    __shared__ u32 next[EMBED_PLAN_TILE];
    const int i = threadIdx.x;
    const long long base = (long long)blockIdx.x * EMBED_PLAN_TILE;
    const int len = (int)min((long long)EMBED_PLAN_TILE, (long long)n - base);
    next[i] = offs[(long long)i * ntiles + blockIdx.x];
    if (i < len) key[i] = plan_key(keys_in[base + i], (u32)v);
    __syncthreads();
    if (i == 0) {  // serial, so equal digits keep their order (what makes the sort stable)
        for (int j = 0; j < len; ++j) dst[j] = next[(key[j] >> shift) & (EMBED_PLAN_TILE - 1)]++;
    }
    __syncthreads();
    if (i < len) {
        const u32 d = dst[i];
        keys_out[d] = key[i];
        idx_out[d] = idx_in ? idx_in[base + i] : (u32)(base + i);
    }
}

// First index in [lo, hi) of sorted sk whose key is > k (upper) or >= k (!upper).
__device__ __forceinline__ u32 plan_bound(const u32* sk, u32 lo, u32 hi, u32 k, bool upper) {
    while (lo < hi) {
        const u32 mid = lo + (hi - lo) / 2;
        if (upper ? sk[mid] <= k : sk[mid] < k) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// Grid ceil(n / THREADS). sk: the sorted keys. flags [3][n]: item start, group start (first item
// of an id with more than `rows` tokens), slot-taking item start (any item of such an id).
extern "C" __global__ void __launch_bounds__(EMBED_PLAN_THREADS)
embed_plan_flags(const u32* __restrict__ sk, u32* __restrict__ flags, int n, int rows) {
    const long long p = (long long)blockIdx.x * EMBED_PLAN_THREADS + threadIdx.x;
    if (p >= n) return;
    const u32 k = sk[p];
    const u32 rs = plan_bound(sk, 0u, (u32)p, k, false);
    const u32 re = plan_bound(sk, (u32)p + 1u, (u32)n, k, true);
    const u32 off = (u32)p - rs;
    const bool split = re - rs > (u32)rows;
    const bool item = off % (u32)rows == 0u;
    flags[p] = item;
    flags[n + p] = item && off == 0u && split;
    flags[2LL * n + p] = item && split;
}

// Grid max(1, ceil(n / THREADS)). scanned: the exclusive sums of the flags (item, group, slot
// index of each position), totals their counts. perm_sorted: the token of each sorted position.
extern "C" __global__ void __launch_bounds__(EMBED_PLAN_THREADS)
embed_plan_write(const u32* __restrict__ sk, const u32* __restrict__ perm_sorted,
                 const u32* __restrict__ scanned, const u32* __restrict__ totals,
                 u32* __restrict__ plan, int n, int gmax, int rows) {
    const long long p = (long long)blockIdx.x * EMBED_PLAN_THREADS + threadIdx.x;
    u32* item_id = plan + 4;
    u32* item_off = item_id + n;
    u32* item_slot = item_off + (n + 1);
    u32* perm = item_slot + n;
    u32* grp_id = perm + n;
    u32* grp_slot = grp_id + gmax;
    u32* grp_cnt = grp_slot + gmax;
    if (n == 0) {  // the plan of no tokens: five zeros
        if (p < 5) plan[p] = 0u;
        return;
    }
    const u32 items = totals[0], groups = totals[1];
    if (p == 0) {
        plan[0] = items;
        plan[1] = groups;
        plan[2] = (u32)n;
        plan[3] = totals[2];
        item_off[items] = (u32)n;
    }
    if (p >= n) return;
    const u32* I = scanned;
    const u32* G = scanned + n;
    const u32* S = scanned + 2LL * n;
    // A flag is the step of its exclusive sum.
    const bool last = p + 1 == n;
    const bool is_item = (last ? items : I[p + 1]) != I[p];
    const bool is_group = (last ? groups : G[p + 1]) != G[p];
    const bool takes_slot = (last ? totals[2] : S[p + 1]) != S[p];
    const u32 k = sk[p];
    perm[p] = perm_sorted[p];
    if (is_item) {
        item_id[I[p]] = k;
        item_off[I[p]] = (u32)p;
        item_slot[I[p]] = takes_slot ? S[p] : EMBED_NO_SLOT;
    }
    if (is_group) {
        const u32 re = plan_bound(sk, (u32)p + 1u, (u32)n, k, true);
        grp_id[G[p]] = k;
        grp_slot[G[p]] = S[p];
        grp_cnt[G[p]] = (re - (u32)p + (u32)rows - 1u) / (u32)rows;
    }
    // The tails, as the host builder leaves them (zeros).
    if ((u32)p >= items) {
        item_id[p] = 0u;
        item_slot[p] = 0u;
    }
    if ((u32)p + 1u > items) item_off[p + 1] = 0u;
    if (p < gmax && (u32)p >= groups) {
        grp_id[p] = 0u;
        grp_slot[p] = 0u;
        grp_cnt[p] = 0u;
    }
}
