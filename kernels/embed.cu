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
// Every sum has a fixed order and there are no float atomics, so dtable is bit-for-bit
// reproducible. The launch grids depend on n only (idle blocks exit after reading the plan's
// counts), so the launches can be captured in a CUDA graph and replayed with a new plan.
//
// Packed plan (u32), for n tokens and gmax = n / (EMBED_ROWS_PER_ITEM + 1) groups at most:
//   [0] n_items  [1] n_groups  [2] n  [3] n_slots
//   item_id[n]  item_off[n + 1]  item_slot[n]  perm[n]  grp_id[gmax]  grp_slot[gmax]  grp_cnt[gmax]
// item k covers perm[item_off[k] .. item_off[k+1]); item_slot[k] = EMBED_NO_SLOT means "add to
// dtable directly".
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
