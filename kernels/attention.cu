// attention.cu: causal multi-head attention with grouped-query heads, bf16 in and out, fp32
// accumulation and softmax statistics (CPU references in src/kernels/attention.rs).
// Defines, for every head dim D in {16, 32, 64, 128} (suffix _d{D}):
//   attention_fwd            FlashAttention-2 forward: one CTA of 4 warps per (query head, batch,
//                            64-row query tile); K/V tiles of 64 keys stream through shared memory
//                            by cp.async (V of tile j loads while QK^T of tile j runs, K of tile
//                            j+1 while PV of tile j runs); QK^T and PV on tensor cores
//                            (mma.sync m16n8k16 bf16 -> fp32, fragments by ldmatrix); online
//                            softmax in fp32 registers; writes O and lse (natural log).
//   attention_bwd_pre        backward preprocessing: delta_i = rowsum(dO_i * O_i).
//   attention_bwd            FA2 backward for dK, dV: one CTA per (split, kv head, batch, 64-key
//                            tile) loops over a contiguous slice of the query heads of its GQA
//                            group (the whole group when unsplit) and their query tiles
//                            (double-buffered by cp.async), recomputes P from lse and keeps dK and
//                            dV in registers; unsplit it adds them into dk, dv, split it writes
//                            fp32 partials per slice into a workspace.
//   attention_bwd_finalize   dk, dv += the split partials, summed over the slices in a fixed
//                            order (split backward only).
//   attention_bwd_dq         dQ: one CTA per (query head, batch, 64-row query tile) loops over
//                            the K/V tiles (double-buffered), recomputes P and dP and keeps dQ in
//                            registers. Every gradient element is summed by one thread in a fixed
//                            order (no atomics; the split partials by the finalize, in slice
//                            order), so the whole backward is bit-reproducible.
//   attention_decode         flash-decoding partials: one CTA per (cache split, kv head, batch)
//                            for all query heads of the group; (max, sum, unnormalised acc) per split.
//   attention_decode_combine merges the split partials into out.
// Layouts: q, o, dq [B][S][Hq][D]; k, v, dk, dv [B][S][Hkv][D]; lse, delta [B][Hq][S];
// KV cache [B][Hkv][max_len][D]; query head h reads kv head h / (Hq / Hkv).
// Padding: positions s >= seq_lens[b] are never read into arithmetic (their tiles rows are
// zero-filled by cp.async), their o and lse are written as 0, and dq/dk/dv there are left as they
// were. Lengths above S (max_len) are clamped.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16; g = lane / 4, t = lane % 4):
//   A (16x16, row): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16x8, col):  b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C (16x8, f32):  c0, c1 = C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t], C[g+8][2t+1]
// (lower column / row index in the low 16 bits). So the C fragments of two adjacent n8 tiles are
// exactly the A fragment of one k16 step (P = softmax(S) needs no data movement), and:
//   ldmatrix.x4 (non-trans) on a row-major [row][k] tile gives A fragments (lanes 0-15 address rows
//   0-15 at k 0, lanes 16-31 rows 0-15 at k 8), and B fragments of two n8 tiles when the tile is
//   stored [n][k] (K for QK^T);
//   ldmatrix.x4.trans on a tile stored [k][n] gives B fragments (V for PV).
#include "common.cuh"

#ifndef DFPO_EMU
#include <cuda_bf16.h>

// ---- PTX wrappers (tools/cuda-emu defines each one from the PTX ISA for the emulated driver) ----

// Shared-state-space address of a shared-memory pointer (what cp.async and ldmatrix take).
__device__ __forceinline__ u32 att_smem_u32(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

// 16-byte async global->shared copy; when !valid nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void att_cp16(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}

// 4-byte async copy (lse, delta rows), zero-filled when !valid.
__device__ __forceinline__ void att_cp4(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0)
                 : "memory");
}

__device__ __forceinline__ void att_cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void att_cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i (16-byte rows).
__device__ __forceinline__ void att_ldsm_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void att_ldsm_x4_t(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += A(16x16) * B(16x8), bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void att_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats to a bf16x2 register (round to nearest even), `lo` in the low half.
__device__ __forceinline__ u32 att_pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&v);
}

// Shared-memory loads and stores other than cp.async / ldmatrix go through these two (the
// emulator checks them for races).
template <typename T>
__device__ __forceinline__ T att_lds(const T* p) {
    return *p;
}
template <typename T>
__device__ __forceinline__ void att_sts(T* p, T v) {
    *p = v;
}

__device__ __forceinline__ char* att_dyn_smem() {
    extern __shared__ __align__(128) char att_smem[];
    return att_smem;
}
#endif  // DFPO_EMU

typedef __nv_bfloat16 bf16;

// Padding of every shared-memory row (bf16 elements): rows are 16 bytes apart modulo 128, so the
// eight 16-byte rows one ldmatrix phase reads fall in distinct banks.
#define ATT_PAD 8
#define ATT_LOG2E 1.4426950408889634f
#define ATT_LN2 0.6931471805599453f
#define ATT_THREADS 128  // every attention kernel but the combine runs 4 warps

__device__ __forceinline__ float att_neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float2 att_ld_bf16x2(const bf16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

__device__ __forceinline__ void att_st_bf16x2(bf16* p, float lo, float hi) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(lo, hi);
}

// The A fragment of one k16 step from the C fragments of its two n8 tiles (fp32 -> bf16): the
// C layout of two adjacent n8 tiles is the A layout (see the header), so P and dS never leave
// registers.
__device__ __forceinline__ void att_c_to_a(u32 (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
    a[0] = att_pack_bf16(lo[0], lo[1]);
    a[1] = att_pack_bf16(lo[2], lo[3]);
    a[2] = att_pack_bf16(hi[0], hi[1]);
    a[3] = att_pack_bf16(hi[2], hi[3]);
}

// acc (16 x D, C fragments) += A (16 x 16: one k16 step) * B (16 x D), B being rows k0..k0+15 of
// a bf16 [k][n] shared tile with row stride D + ATT_PAD, at byte address `rows` (ldmatrix.trans;
// off_bt = att_off_bt(lane, ...)).
template <int D>
__device__ __forceinline__ void att_mma_a_bt(float (&acc)[D / 8][4], const u32 (&a)[4], u32 rows, u32 off_bt) {
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
        u32 b[4];
        att_ldsm_x4_t(b, rows + off_bt + dp * 16 * 2);
        att_mma(acc[2 * dp], a, b[0], b[1]);
        att_mma(acc[2 * dp + 1], a, b[2], b[3]);
    }
}

// Queues cp.async copies of an R x D bf16 tile: shared row r (stride D + ATT_PAD) <- global row
// row0 + r (at src + (row0 + r) * stride); rows at or past `valid` are zero-filled, never read.
template <int D, int R>
__device__ __forceinline__ void att_load_tile(u32 dst, const bf16* src, long long stride, int row0, int valid,
                                              int tid) {
    constexpr int CPR = D / 8;  // 16-byte chunks per row
    constexpr int TOTAL = R * CPR;
    constexpr int LD = D + ATT_PAD;
#pragma unroll
    for (int it = 0; it < (TOTAL + ATT_THREADS - 1) / ATT_THREADS; ++it) {
        const int i = it * ATT_THREADS + tid;
        if (TOTAL % ATT_THREADS == 0 || i < TOTAL) {
            const int r = i / CPR, c = (i % CPR) * 8;
            const bool ok = row0 + r < valid;
            const bf16* s = ok ? src + (long long)(row0 + r) * stride + c : src;
            att_cp16(dst + (r * LD + c) * 2, s, ok);
        }
    }
}

// Per-lane byte offsets of the ldmatrix row addresses for one 16x16 block of a bf16 tile with row
// stride ld (add the block's byte offset):
//   att_off_a:  A fragment of a [m][k] tile (lanes 0-15: rows 0-15 at k 0; lanes 16-31: at k 8);
//   att_off_b:  B fragments of two n8 tiles from a [n][k] tile (matrices: n 0-7 k 0, n 0-7 k 8,
//               n 8-15 k 0, n 8-15 k 8); with .trans on a [k][m] tile it is also the A fragment
//               of the transpose (dS from the stored dS^T);
//   att_off_bt: B fragments of two n8 tiles from a [k][n] tile with .trans (matrices: k 0-7 n 0,
//               k 8-15 n 0, k 0-7 n 8, k 8-15 n 8).
__device__ __forceinline__ u32 att_off_a(int lane, int ld) { return ((lane & 15) * ld + (lane >> 4) * 8) * 2; }
__device__ __forceinline__ u32 att_off_b(int lane, int ld) {
    return (((lane >> 4) * 8 + (lane & 7)) * ld + ((lane >> 3) & 1) * 8) * 2;
}
__device__ __forceinline__ u32 att_off_bt(int lane, int ld) {
    return ((((lane >> 3) & 1) * 8 + (lane & 7)) * ld + (lane >> 4) * 8) * 2;
}

// ---------------------------------------------------------------------------------------------
// Forward.
//
// Warp w owns query rows q0 + 16w .. q0 + 16w + 15 of the tile and all D columns of their output:
// Q fragments stay in registers (D/4 regs), S = Q K^T is 16 x 64 per warp (32 fp32 regs), O is
// 16 x D (D/2 regs). Scores are kept in the log2 domain (scale * log2 e folded in), so
// p = exp2(s - m) and lse = m ln 2 + ln l. A row with no valid key yet has m = -inf; its
// exponent base is 0, so it contributes p = 0 and never NaN.
// ---------------------------------------------------------------------------------------------

template <int D>
__device__ __forceinline__ void attention_fwd_impl(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                   const bf16* __restrict__ v, const u32* __restrict__ seq_lens,
                                                   bf16* __restrict__ o, float* __restrict__ lse, int S, int Hq,
                                                   int Hkv, float scale_log2) {
    constexpr int BM = 64, BN = 64, LD = D + ATT_PAD;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    // Grid (Hq, B, query tiles): blocks launch x fastest, so the longest (last) query tiles of
    // every head and batch start first and the short ones fill in behind them.
    const int tile = gridDim.z - 1 - blockIdx.z;
    const int h = blockIdx.x, b = blockIdx.y;
    const int hk = h / (Hq / Hkv);
    const int len = min((int)seq_lens[b], S);
    const int q0 = tile * BM;
    const long long q_stride = (long long)Hq * D, kv_stride = (long long)Hkv * D;
    const bf16* qb = q + (long long)b * S * q_stride + (long long)h * D;
    const bf16* kb = k + (long long)b * S * kv_stride + (long long)hk * D;
    const bf16* vb = v + (long long)b * S * kv_stride + (long long)hk * D;
    bf16* ob = o + (long long)b * S * q_stride + (long long)h * D;
    float* lseb = lse + ((long long)b * Hq + h) * S;

    if (q0 >= len) {  // the whole tile is padding: o = 0 and lse = 0
        const int rows = min(BM, S - q0);
        for (int i = tid; i < rows * (D / 8); i += ATT_THREADS) {
            const int r = i / (D / 8), c = (i % (D / 8)) * 8;
            *reinterpret_cast<uint4*>(ob + (long long)(q0 + r) * q_stride + c) = make_uint4(0u, 0u, 0u, 0u);
        }
        for (int r = tid; r < rows; r += ATT_THREADS) lseb[q0 + r] = 0.f;
        return;
    }

    const u32 sQ = att_smem_u32(att_dyn_smem());  // [BM][LD]
    const u32 sK = sQ + BM * LD * 2;               // [BN][LD]
    const u32 sV = sK + BN * LD * 2;               // [BN][LD]
    const u32 off_a = att_off_a(lane, LD), off_b = att_off_b(lane, LD), off_bt = att_off_bt(lane, LD);

    att_load_tile<D, BM>(sQ, qb, q_stride, q0, len, tid);
    att_load_tile<D, BN>(sK, kb, kv_stride, 0, len, tid);
    att_cp_commit();

    const int kv_end = min(len, q0 + BM);  // keys any valid row of the tile may see
    const int n_kv = (kv_end + BN - 1) / BN;
    const int wrow0 = q0 + warp * 16;
    const bool warp_rows = wrow0 < len;  // this warp owns at least one valid query row
    const float neg_inf = att_neg_inf();

    u32 qf[D / 16][4];
    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float m_r[2] = {neg_inf, neg_inf}, l_r[2] = {0.f, 0.f};  // rows g and g + 8 (l: this lane's part)

    for (int j = 0; j < n_kv; ++j) {
        const int k0 = j * BN;
        att_cp_wait<0>();
        __syncthreads();  // K_j (and Q) landed; every warp is done with V_{j-1}
        if (j == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                att_ldsm_x4(qf[kk], sQ + off_a + (warp * 16 * LD + kk * 16) * 2);
        }
        att_load_tile<D, BN>(sV, vb, kv_stride, k0, len, tid);
        att_cp_commit();

        // Warp-uniform: keys of this tile above all of the warp's rows are skipped.
        const bool active = warp_rows && k0 <= wrow0 + 15;
        u32 pa[BN / 16][4];
        if (active) {
            float s[BN / 8][4];
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
                for (int np = 0; np < BN / 16; ++np) {
                    u32 bk[4];
                    att_ldsm_x4(bk, sK + off_b + (np * 16 * LD + kk * 16) * 2);
                    att_mma(s[2 * np], qf[kk], bk[0], bk[1]);
                    att_mma(s[2 * np + 1], qf[kk], bk[2], bk[3]);
                }
            }
            const bool need_mask = (k0 + BN - 1 > wrow0) || (wrow0 + 15 >= len);
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float x = s[nt][e] * scale_log2;
                    if (need_mask) {
                        const int row = wrow0 + g + (e >> 1) * 8;
                        const int key = k0 + nt * 8 + 2 * t + (e & 1);
                        if (key > row || row >= len) x = neg_inf;
                    }
                    s[nt][e] = x;
                }
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = neg_inf;
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(DFPO_FULL_MASK, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(DFPO_FULL_MASK, mx, 2));
                const float m_new = fmaxf(m_r[r], mx);
                const float base = m_new == neg_inf ? 0.f : m_new;
                const float alpha = exp2f(m_r[r] - base);
                m_r[r] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
                    s[nt][2 * r] = exp2f(s[nt][2 * r] - base);
                    s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - base);
                    sum += s[nt][2 * r] + s[nt][2 * r + 1];
                }
                l_r[r] = l_r[r] * alpha + sum;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    acc[dt][2 * r] *= alpha;
                    acc[dt][2 * r + 1] *= alpha;
                }
            }
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) att_c_to_a(pa[kk], s[2 * kk], s[2 * kk + 1]);
        }
        att_cp_wait<0>();
        __syncthreads();  // V_j landed; every warp is done with K_j
        if (j + 1 < n_kv) {
            att_load_tile<D, BN>(sK, kb, kv_stride, k0 + BN, len, tid);
            att_cp_commit();
        }
        if (active) {
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk)
                att_mma_a_bt<D>(acc, pa[kk], sV + kk * 16 * LD * 2, off_bt);
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = l_r[r];
        l += __shfl_xor_sync(DFPO_FULL_MASK, l, 1);
        l += __shfl_xor_sync(DFPO_FULL_MASK, l, 2);
        const int row = wrow0 + g + r * 8;
        const bool valid = row < len;
        const float inv = valid && l > 0.f ? 1.f / l : 0.f;
        if (row < S) {
            bf16* orow = ob + (long long)row * q_stride + 2 * t;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt)
                att_st_bf16x2(orow + dt * 8, valid ? acc[dt][2 * r] * inv : 0.f,
                              valid ? acc[dt][2 * r + 1] * inv : 0.f);
            if (t == 0) lseb[row] = valid ? m_r[r] * ATT_LN2 + logf(l) : 0.f;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward.
//
// Preprocessing, one warp per (b, s, h) row: delta = rowsum(dO * O) (0 on padding).
// ---------------------------------------------------------------------------------------------

template <int D>
__device__ __forceinline__ void attention_bwd_pre_impl(const bf16* __restrict__ o, const bf16* __restrict__ dout,
                                                       const u32* __restrict__ seq_lens, float* __restrict__ delta,
                                                       int B, int S, int Hq) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (ATT_THREADS / 32) + (threadIdx.x >> 5);
    if (row >= (long long)B * S * Hq) return;  // warp-uniform
    const int h = (int)(row % Hq);
    const int s = (int)((row / Hq) % S);
    const int b = (int)(row / ((long long)Hq * S));
    const int len = min((int)seq_lens[b], S);
    float acc = 0.f;
    if (s < len) {
        for (int p = lane; p < D / 2; p += 32) {
            const float2 x = att_ld_bf16x2(o + row * D + 2 * p);
            const float2 y = att_ld_bf16x2(dout + row * D + 2 * p);
            acc += x.x * y.x + x.y * y.y;
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) delta[((long long)b * Hq + h) * S + s] = s < len ? acc : 0.f;
}

// Main backward kernel (dK, dV). Warp w owns keys k0 + 16w .. k0 + 16w + 15 of the CTA's key tile
// and computes, per query tile (BM = 64 rows of one query head; 32 at D = 128):
//   S^T = K_w Q^T (16 x BM), P^T = exp2(S^T scale log2e - lse log2e), masked to query >= key;
//   dV_w += P^T dO;  dP^T = V_w dO^T;  dS^T = P^T (dP^T - delta);  dK_w += dS^T Q;
// all with the key rows as the M dimension, so P^T and dS^T go from C to A fragments in registers.
// The Q/dO/lse/delta tiles are double-buffered: tile it+1 loads while tile it computes.
// Split over the GQA group (n_splits > 1, grid x = Hkv * n_splits, B = gridDim.y): the CTA of
// split sp handles query heads [sp*G/n_splits, (sp+1)*G/n_splits) of the group and writes its
// unscaled dK, dV sums of the valid keys as fp32 into part (layout [2][n_splits][B][S][Hkv][D],
// dK first); attention_bwd_finalize adds them into dk, dv. n_splits = 1 reads no part and adds
// into dk, dv directly.
template <int D, int BM>
__device__ __forceinline__ void attention_bwd_impl(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                   const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                                   const float* __restrict__ lse, const float* __restrict__ delta,
                                                   const u32* __restrict__ seq_lens, bf16* __restrict__ dk,
                                                   bf16* __restrict__ dv, float* __restrict__ part, int S, int Hq,
                                                   int Hkv, int n_splits, float scale, float scale_log2) {
    constexpr int BN = 64, LD = D + ATT_PAD;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    // Grid (Hkv * n_splits, B, key tiles): key tile 0 has the most query tiles, and launches first.
    const int hk = blockIdx.x % Hkv, split = blockIdx.x / Hkv, b = blockIdx.y;
    const int G = Hq / Hkv;
    const int h0 = hk * G + split * G / n_splits;                      // first query head of the slice
    const int gs = (split + 1) * G / n_splits - split * G / n_splits;  // query heads in the slice
    const int len = min((int)seq_lens[b], S);
    const int k0 = blockIdx.z * BN;
    if (k0 >= len) return;  // only padding keys: their dk, dv stay as they are

    const long long q_stride = (long long)Hq * D, kv_stride = (long long)Hkv * D;
    const bf16* kb = k + (long long)b * S * kv_stride + (long long)hk * D;
    const bf16* vb = v + (long long)b * S * kv_stride + (long long)hk * D;

    char* smem = att_dyn_smem();
    const u32 sK = att_smem_u32(smem);  // [BN][LD]
    const u32 sV = sK + BN * LD * 2;     // [BN][LD]
    const u32 sQ = sV + BN * LD * 2;     // [2][BM][LD]
    const u32 sdO = sQ + 2 * BM * LD * 2;  // [2][BM][LD]
    float* sL = reinterpret_cast<float*>(smem + (sdO - sK) + 2 * BM * LD * 2);  // [2][BM] lse of the rows
    float* sDl = sL + 2 * BM;                                                    // [2][BM] delta
    const u32 sL_a = att_smem_u32(sL), sDl_a = att_smem_u32(sDl);
    const u32 off_a = att_off_a(lane, LD), off_b = att_off_b(lane, LD), off_bt = att_off_bt(lane, LD);

    const int qt_begin = k0 / BM;  // first query tile with a query >= k0
    const int n_qt = (len + BM - 1) / BM - qt_begin;
    const int n_it = gs * n_qt;

    // Queues the loads of iteration `it` (query head h0 + it / n_qt, tile qt_begin + it % n_qt).
    auto load_q = [&](int it, int buf) {
        const int h = h0 + it / n_qt;
        const int qb0 = (qt_begin + it % n_qt) * BM;
        const long long off = (long long)b * S * q_stride + (long long)h * D;
        att_load_tile<D, BM>(sQ + buf * BM * LD * 2, q + off, q_stride, qb0, len, tid);
        att_load_tile<D, BM>(sdO + buf * BM * LD * 2, dout + off, q_stride, qb0, len, tid);
        const float* lrow = lse + ((long long)b * Hq + h) * S;
        const float* drow = delta + ((long long)b * Hq + h) * S;
        for (int i = tid; i < BM; i += ATT_THREADS) {
            const bool ok = qb0 + i < len;
            att_cp4(sL_a + (buf * BM + i) * 4, ok ? lrow + qb0 + i : lrow, ok);
            att_cp4(sDl_a + (buf * BM + i) * 4, ok ? drow + qb0 + i : drow, ok);
        }
    };

    att_load_tile<D, BN>(sK, kb, kv_stride, k0, len, tid);
    att_load_tile<D, BN>(sV, vb, kv_stride, k0, len, tid);
    load_q(0, 0);
    att_cp_commit();

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        dk_acc[i][0] = dk_acc[i][1] = dk_acc[i][2] = dk_acc[i][3] = 0.f;
        dv_acc[i][0] = dv_acc[i][1] = dv_acc[i][2] = dv_acc[i][3] = 0.f;
    }
    const int kw0 = k0 + warp * 16;  // first key of this warp

    for (int it = 0; it < n_it; ++it) {
        const int buf = it & 1;
        att_cp_wait<0>();
        __syncthreads();  // tile `it` landed; every warp is done with tile it-1
        if (it + 1 < n_it) {
            load_q(it + 1, buf ^ 1);
            att_cp_commit();
        }
        const int qb0 = (qt_begin + it % n_qt) * BM;
        const u32 cQ = sQ + buf * BM * LD * 2;
        const u32 cdO = sdO + buf * BM * LD * 2;
        const float* cL = sL + buf * BM;
        const float* cDl = sDl + buf * BM;

        // S^T = K_w Q^T
        float st[BM / 8][4];
#pragma unroll
        for (int i = 0; i < BM / 8; ++i) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 ka[4];
            att_ldsm_x4(ka, sK + off_a + (warp * 16 * LD + kk * 16) * 2);
#pragma unroll
            for (int np = 0; np < BM / 16; ++np) {
                u32 bq[4];
                att_ldsm_x4(bq, cQ + off_b + (np * 16 * LD + kk * 16) * 2);
                att_mma(st[2 * np], ka, bq[0], bq[1]);
                att_mma(st[2 * np + 1], ka, bq[2], bq[3]);
            }
        }
        // P^T, zero where query < key or the query row is padding.
        const bool need_mask = (qb0 < kw0 + 15) || (qb0 + BM > len);
#pragma unroll
        for (int nt = 0; nt < BM / 8; ++nt) {
            const int ql = nt * 8 + 2 * t;
            const float l0 = att_lds(cL + ql) * ATT_LOG2E, l1 = att_lds(cL + ql + 1) * ATT_LOG2E;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float p = exp2f(st[nt][e] * scale_log2 - ((e & 1) ? l1 : l0));
                if (need_mask) {
                    const int key = kw0 + g + (e >> 1) * 8;
                    const int query = qb0 + ql + (e & 1);
                    if (query < key || query >= len) p = 0.f;
                }
                st[nt][e] = p;
            }
        }
        // dV_w += P^T dO
        {
            u32 pa[BM / 16][4];
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) att_c_to_a(pa[kk], st[2 * kk], st[2 * kk + 1]);
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk)
                att_mma_a_bt<D>(dv_acc, pa[kk], cdO + kk * 16 * LD * 2, off_bt);
        }
        // dP^T = V_w dO^T, then dS^T = P^T (dP^T - delta) in place.
        float dpt[BM / 8][4];
#pragma unroll
        for (int i = 0; i < BM / 8; ++i) dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 va[4];
            att_ldsm_x4(va, sV + off_a + (warp * 16 * LD + kk * 16) * 2);
#pragma unroll
            for (int np = 0; np < BM / 16; ++np) {
                u32 bo[4];
                att_ldsm_x4(bo, cdO + off_b + (np * 16 * LD + kk * 16) * 2);
                att_mma(dpt[2 * np], va, bo[0], bo[1]);
                att_mma(dpt[2 * np + 1], va, bo[2], bo[3]);
            }
        }
#pragma unroll
        for (int nt = 0; nt < BM / 8; ++nt) {
            const int ql = nt * 8 + 2 * t;
            const float d0 = att_lds(cDl + ql), d1 = att_lds(cDl + ql + 1);
#pragma unroll
            for (int e = 0; e < 4; ++e) dpt[nt][e] = st[nt][e] * (dpt[nt][e] - ((e & 1) ? d1 : d0));
        }
        // dK_w += dS^T Q
        {
            u32 dsa[BM / 16][4];
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) att_c_to_a(dsa[kk], dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk)
                att_mma_a_bt<D>(dk_acc, dsa[kk], cQ + kk * 16 * LD * 2, off_bt);
        }
    }

    if (n_splits > 1) {
        // This slice's partials of the valid keys (fp32, unscaled).
        const long long nk = (long long)gridDim.y * S * kv_stride;
        float* pk = part + split * nk;
        float* pv = part + (n_splits + split) * nk;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int key = kw0 + g + r * 8;
            if (key < len) {
                const long long off = ((long long)b * S + key) * kv_stride + (long long)hk * D + 2 * t;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    *reinterpret_cast<float2*>(pk + off + dt * 8) = make_float2(dk_acc[dt][2 * r], dk_acc[dt][2 * r + 1]);
                    *reinterpret_cast<float2*>(pv + off + dt * 8) = make_float2(dv_acc[dt][2 * r], dv_acc[dt][2 * r + 1]);
                }
            }
        }
        return;
    }
    // dk += scale * dK, dv += dV on the valid keys (read-add-write: fp32 add of the bf16 value).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = kw0 + g + r * 8;
        if (key < len) {
            const long long off = ((long long)b * S + key) * kv_stride + (long long)hk * D + 2 * t;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                const float2 ok = att_ld_bf16x2(dk + off + dt * 8);
                att_st_bf16x2(dk + off + dt * 8, ok.x + scale * dk_acc[dt][2 * r], ok.y + scale * dk_acc[dt][2 * r + 1]);
                const float2 ov = att_ld_bf16x2(dv + off + dt * 8);
                att_st_bf16x2(dv + off + dt * 8, ov.x + dv_acc[dt][2 * r], ov.y + dv_acc[dt][2 * r + 1]);
            }
        }
    }
}

// Finalize of a split dK/dV backward: for every valid key (s < seq_lens[b]) and pair of adjacent
// elements i, i+1 of [B][S][Hkv][D] (n elements, row_w = Hkv*D per token):
//   dk += scale * (part_dk[0] + part_dk[1] + ... + part_dk[n_splits-1]),  dv += the same of part_dv,
// summed in fp32 in slice order by one thread, then one bf16 rounding; padded keys are left as
// they were (their partials were never written). Grid-stride over the pairs.
__device__ __forceinline__ void attention_bwd_finalize_impl(const float* __restrict__ part,
                                                            const u32* __restrict__ seq_lens, bf16* __restrict__ dk,
                                                            bf16* __restrict__ dv, int S, int row_w, long long n,
                                                            int n_splits, float scale) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; 2 * p < n; p += stride) {
        const long long i = 2 * p;
        const long long row = i / row_w;  // b*S + s
        const int b = (int)(row / S), s = (int)(row % S);
        if (s >= min((int)seq_lens[b], S)) continue;
        float2 sk = *reinterpret_cast<const float2*>(part + i);
        float2 sv = *reinterpret_cast<const float2*>(part + n_splits * n + i);
        for (int sp = 1; sp < n_splits; ++sp) {
            const float2 xk = *reinterpret_cast<const float2*>(part + sp * n + i);
            const float2 xv = *reinterpret_cast<const float2*>(part + (n_splits + sp) * n + i);
            sk.x += xk.x;
            sk.y += xk.y;
            sv.x += xv.x;
            sv.y += xv.y;
        }
        const float2 ok = att_ld_bf16x2(dk + i);
        att_st_bf16x2(dk + i, ok.x + scale * sk.x, ok.y + scale * sk.y);
        const float2 ov = att_ld_bf16x2(dv + i);
        att_st_bf16x2(dv + i, ov.x + sv.x, ov.y + sv.y);
    }
}

// ---------------------------------------------------------------------------------------------
// dQ kernel. One CTA per (query head, batch, 64-row query tile), the forward's grid. Warp w owns
// query rows q0 + 16w .. q0 + 16w + 15 and all D columns of their dQ (registers); Q and dO stay
// in registers as A fragments. For each tile of BN keys (K and V double-buffered by cp.async):
//   S = Q K^T, P = exp2(S scale log2e - lse log2e), masked to key <= query;  dP = dO V^T;
//   dS = P (dP - delta);  dQ += dS K
// with the query rows as the M dimension, so dS goes from C to A fragments in registers (as P in
// the forward). Each dq element is summed by one thread over the key tiles in order: no atomics.
// ---------------------------------------------------------------------------------------------

template <int D, int BN>
__device__ __forceinline__ void attention_bwd_dq_impl(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                      const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                                      const float* __restrict__ lse, const float* __restrict__ delta,
                                                      const u32* __restrict__ seq_lens, bf16* __restrict__ dq, int S,
                                                      int Hq, int Hkv, float scale, float scale_log2) {
    constexpr int BM = 64, LD = D + ATT_PAD;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    // Grid (Hq, B, query tiles), the longest (last) query tiles first, as the forward.
    const int tile = gridDim.z - 1 - blockIdx.z;
    const int h = blockIdx.x, b = blockIdx.y;
    const int hk = h / (Hq / Hkv);
    const int len = min((int)seq_lens[b], S);
    const int q0 = tile * BM;
    if (q0 >= len) return;  // only padding rows: their dq stays as it is

    const long long q_stride = (long long)Hq * D, kv_stride = (long long)Hkv * D;
    const long long q_off = (long long)b * S * q_stride + (long long)h * D;
    const bf16* kb = k + (long long)b * S * kv_stride + (long long)hk * D;
    const bf16* vb = v + (long long)b * S * kv_stride + (long long)hk * D;

    const u32 sQ = att_smem_u32(att_dyn_smem());  // [BM][LD]
    const u32 sdO = sQ + BM * LD * 2;              // [BM][LD]
    const u32 sK = sdO + BM * LD * 2;              // [2][BN][LD]
    const u32 sV = sK + 2 * BN * LD * 2;           // [2][BN][LD]
    const u32 off_a = att_off_a(lane, LD), off_b = att_off_b(lane, LD), off_bt = att_off_bt(lane, LD);

    att_load_tile<D, BM>(sQ, q + q_off, q_stride, q0, len, tid);
    att_load_tile<D, BM>(sdO, dout + q_off, q_stride, q0, len, tid);
    att_load_tile<D, BN>(sK, kb, kv_stride, 0, len, tid);
    att_load_tile<D, BN>(sV, vb, kv_stride, 0, len, tid);
    att_cp_commit();

    const int kv_end = min(len, q0 + BM);  // keys any valid row of the tile may see
    const int n_kv = (kv_end + BN - 1) / BN;
    const int wrow0 = q0 + warp * 16;
    const bool warp_rows = wrow0 < len;
    // lse (log2 domain) and delta of rows g and g + 8; padding rows get 0 (their P is masked).
    float l2_r[2], dl_r[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = wrow0 + g + r * 8;
        const long long li = ((long long)b * Hq + h) * S + row;
        l2_r[r] = row < len ? lse[li] * ATT_LOG2E : 0.f;
        dl_r[r] = row < len ? delta[li] : 0.f;
    }

    u32 qf[D / 16][4], df[D / 16][4];
    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

    for (int j = 0; j < n_kv; ++j) {
        const int buf = j & 1, k0 = j * BN;
        att_cp_wait<0>();
        __syncthreads();  // K_j, V_j (and Q, dO) landed; every warp is done with tile j-1
        if (j == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                att_ldsm_x4(qf[kk], sQ + off_a + (warp * 16 * LD + kk * 16) * 2);
                att_ldsm_x4(df[kk], sdO + off_a + (warp * 16 * LD + kk * 16) * 2);
            }
        }
        if (j + 1 < n_kv) {
            att_load_tile<D, BN>(sK + (buf ^ 1) * BN * LD * 2, kb, kv_stride, k0 + BN, len, tid);
            att_load_tile<D, BN>(sV + (buf ^ 1) * BN * LD * 2, vb, kv_stride, k0 + BN, len, tid);
            att_cp_commit();
        }
        // Warp-uniform: keys of this tile above all of the warp's rows are skipped.
        if (!warp_rows || k0 > wrow0 + 15) continue;
        const u32 cK = sK + buf * BN * LD * 2, cV = sV + buf * BN * LD * 2;
        // S = Q K^T and dP = dO V^T (K and V stored [key][d]: B fragments of [n][k] tiles).
        float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) {
            s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
            dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                u32 bk[4], bv[4];
                att_ldsm_x4(bk, cK + off_b + (np * 16 * LD + kk * 16) * 2);
                att_mma(s[2 * np], qf[kk], bk[0], bk[1]);
                att_mma(s[2 * np + 1], qf[kk], bk[2], bk[3]);
                att_ldsm_x4(bv, cV + off_b + (np * 16 * LD + kk * 16) * 2);
                att_mma(dp[2 * np], df[kk], bv[0], bv[1]);
                att_mma(dp[2 * np + 1], df[kk], bv[2], bv[3]);
            }
        }
        // dS = P (dP - delta), P zero where key > query or the query row is padding.
        const bool need_mask = (k0 + BN - 1 > wrow0) || (wrow0 + 15 >= len);
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float p = exp2f(s[nt][e] * scale_log2 - l2_r[e >> 1]);
                if (need_mask) {
                    const int row = wrow0 + g + (e >> 1) * 8;
                    const int key = k0 + nt * 8 + 2 * t + (e & 1);
                    if (key > row || row >= len) p = 0.f;
                }
                dp[nt][e] = p * (dp[nt][e] - dl_r[e >> 1]);
            }
        }
        // dQ += dS K (K as the B operand [k = key][n = d]: ldmatrix.trans).
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            u32 dsa[4];
            att_c_to_a(dsa, dp[2 * kk], dp[2 * kk + 1]);
            att_mma_a_bt<D>(acc, dsa, cK + kk * 16 * LD * 2, off_bt);
        }
    }

    // dq += scale * dQ on the valid rows (read-add-write: fp32 add of the bf16 value).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = wrow0 + g + r * 8;
        if (row < len) {
            bf16* drow = dq + q_off + (long long)row * q_stride + 2 * t;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                const float2 x = att_ld_bf16x2(drow + dt * 8);
                att_st_bf16x2(drow + dt * 8, x.x + scale * acc[dt][2 * r], x.y + scale * acc[dt][2 * r + 1]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decode (flash-decoding). One CTA per (split, kv head, batch) handles keys
// [split * split_len, min((split + 1) * split_len, len)) for up to 8 query heads of the group at a
// time (more heads: the cache slice is streamed again per group of 8). Chunks of CH keys are
// double-buffered in shared memory; scores are computed by thread per (head, key) pair with the
// query in fp32 shared memory, softmax statistics by one warp per head (warp w owns heads w and
// w + 4, whose running max and sum stay in its registers), and the output by thread per
// (head, dim) pair. The work is memory-bound (each cache byte is read once); CUDA cores suffice.
// Partials: ml [B][Hq][n_splits][2] = (max in the log2 domain, sum), acc [B][Hq][n_splits][D].
// ---------------------------------------------------------------------------------------------

#define ATT_DEC_GMAX 8

template <int D, int CH>
__device__ __forceinline__ void attention_decode_impl(const bf16* __restrict__ q, const bf16* __restrict__ kc,
                                                      const bf16* __restrict__ vc, const u32* __restrict__ cache_lens,
                                                      float* __restrict__ part_ml, float* __restrict__ part_acc,
                                                      int Hq, int Hkv, int max_len, int split_len, float scale_log2) {
    constexpr int GMAX = ATT_DEC_GMAX, LD = D + ATT_PAD, PER = GMAX * D / ATT_THREADS;
    constexpr int HPW = GMAX / (ATT_THREADS / 32);  // heads per warp in the softmax step
    static_assert((GMAX * D) % ATT_THREADS == 0, "decode: (head, dim) pairs per thread");
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const int n_splits = gridDim.x;
    const int G = Hq / Hkv;
    const int len = min((int)cache_lens[b], max_len);
    const int kbeg = split * split_len;
    const int kend = min(kbeg + split_len, len);
    const int n_ch = kend > kbeg ? (kend - kbeg + CH - 1) / CH : 0;
    const float neg_inf = att_neg_inf();

    float* sq = reinterpret_cast<float*>(att_dyn_smem());  // [GMAX][D]
    float* sP = sq + GMAX * D;                              // [GMAX][CH]
    float* sA = sP + GMAX * CH;                             // [GMAX] rescale factors
    bf16* sK = reinterpret_cast<bf16*>(sA + GMAX);          // [2][CH][LD]
    bf16* sV = sK + 2 * CH * LD;                            // [2][CH][LD]
    const u32 sK_a = att_smem_u32(sK), sV_a = att_smem_u32(sV);
    const long long cache_off = ((long long)b * Hkv + hk) * max_len * D;

    for (int hc = 0; hc < G; hc += GMAX) {
        const int gc = min(GMAX, G - hc);
        const int h0 = hk * G + hc;  // first query head of this group of <= 8
        __syncthreads();             // the previous head group is done with sq
        for (int i = tid; i < GMAX * D; i += ATT_THREADS) {
            const int hh = i / D;
            att_sts(sq + i, hh < gc ? __bfloat162float(q[((long long)b * Hq + h0 + hh) * D + (i % D)]) : 0.f);
        }
        float m_w[HPW], l_w[HPW];
#pragma unroll
        for (int i = 0; i < HPW; ++i) {
            m_w[i] = neg_inf;
            l_w[i] = 0.f;
        }
        float acc[PER];
#pragma unroll
        for (int i = 0; i < PER; ++i) acc[i] = 0.f;

        if (n_ch > 0) {
            att_load_tile<D, CH>(sK_a, kc + cache_off, D, kbeg, kend, tid);
            att_load_tile<D, CH>(sV_a, vc + cache_off, D, kbeg, kend, tid);
            att_cp_commit();
        }
        for (int c = 0; c < n_ch; ++c) {
            const int buf = c & 1;
            const int key0 = kbeg + c * CH;
            if (c + 1 < n_ch) {
                att_load_tile<D, CH>(sK_a + (buf ^ 1) * CH * LD * 2, kc + cache_off, D, key0 + CH, kend, tid);
                att_load_tile<D, CH>(sV_a + (buf ^ 1) * CH * LD * 2, vc + cache_off, D, key0 + CH, kend, tid);
                att_cp_commit();
                att_cp_wait<1>();
            } else {
                att_cp_wait<0>();
            }
            __syncthreads();  // chunk c landed (and sq is written)
            const bf16* cK = sK + buf * CH * LD;
            const bf16* cV = sV + buf * CH * LD;
            for (int p = tid; p < GMAX * CH; p += ATT_THREADS) {
                const int hh = p / CH, j = p % CH;
                float x = neg_inf;
                if (hh < gc && key0 + j < kend) {
                    float dot = 0.f;
#pragma unroll
                    for (int d8 = 0; d8 < D; d8 += 8) {
                        const uint4 kw = att_lds(reinterpret_cast<const uint4*>(cK + j * LD + d8));
                        const float4 qa = att_lds(reinterpret_cast<const float4*>(sq + hh * D + d8));
                        const float4 qb = att_lds(reinterpret_cast<const float4*>(sq + hh * D + d8 + 4));
                        const float2 k01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kw.x));
                        const float2 k23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kw.y));
                        const float2 k45 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kw.z));
                        const float2 k67 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kw.w));
                        dot += qa.x * k01.x + qa.y * k01.y + qa.z * k23.x + qa.w * k23.y + qb.x * k45.x +
                               qb.y * k45.y + qb.z * k67.x + qb.w * k67.y;
                    }
                    x = dot * scale_log2;
                }
                att_sts(sP + p, x);
            }
            __syncthreads();  // scores complete
#pragma unroll
            for (int i = 0; i < HPW; ++i) {
                const int hh = warp + i * (ATT_THREADS / 32);
                float mx = neg_inf;
                for (int j = lane; j < CH; j += 32) mx = fmaxf(mx, att_lds(sP + hh * CH + j));
                mx = warp_max(mx);
                const float m_new = fmaxf(m_w[i], mx);
                const float base = m_new == neg_inf ? 0.f : m_new;
                float sum = 0.f;
                for (int j = lane; j < CH; j += 32) {
                    const float e = exp2f(att_lds(sP + hh * CH + j) - base);
                    att_sts(sP + hh * CH + j, e);
                    sum += e;
                }
                sum = warp_sum(sum);
                const float alpha = exp2f(m_w[i] - base);
                m_w[i] = m_new;
                l_w[i] = l_w[i] * alpha + sum;
                if (lane == 0) att_sts(sA + hh, alpha);
            }
            __syncthreads();  // probabilities and rescale factors complete
#pragma unroll
            for (int i = 0; i < PER; ++i) {
                const int pidx = tid + i * ATT_THREADS;
                const int hh = pidx / D, d = pidx % D;
                float a = acc[i] * att_lds(sA + hh);
                for (int j = 0; j < CH; ++j)
                    a += att_lds(sP + hh * CH + j) * __bfloat162float(att_lds(cV + j * LD + d));
                acc[i] = a;
            }
            __syncthreads();  // sP, sA and this chunk's buffers are free
        }
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int pidx = tid + i * ATT_THREADS;
            const int hh = pidx / D, d = pidx % D;
            if (hh < gc) part_acc[(((long long)b * Hq + h0 + hh) * n_splits + split) * D + d] = acc[i];
        }
#pragma unroll
        for (int i = 0; i < HPW; ++i) {
            const int hh = warp + i * (ATT_THREADS / 32);
            if (lane == 0 && hh < gc) {
                float* ml = part_ml + (((long long)b * Hq + h0 + hh) * n_splits + split) * 2;
                ml[0] = m_w[i];
                ml[1] = l_w[i];
            }
        }
    }
}

// One CTA of D threads per (query head, batch): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.
template <int D>
__device__ __forceinline__ void attention_decode_combine_impl(const float* __restrict__ part_ml,
                                                              const float* __restrict__ part_acc,
                                                              bf16* __restrict__ out, int Hq, int n_splits) {
    const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    const long long base = ((long long)b * Hq + h) * n_splits;
    const float neg_inf = att_neg_inf();
    float M = neg_inf;
    for (int s = 0; s < n_splits; ++s) M = fmaxf(M, part_ml[(base + s) * 2]);
    float L = 0.f, acc = 0.f;
    if (M != neg_inf) {
        for (int s = 0; s < n_splits; ++s) {
            const float w = exp2f(part_ml[(base + s) * 2] - M);  // 0 for an empty split
            L += w * part_ml[(base + s) * 2 + 1];
            acc += w * part_acc[(base + s) * D + d];
        }
    }
    out[((long long)b * Hq + h) * D + d] = __float2bfloat16(L > 0.f ? acc / L : 0.f);
}

// ---------------------------------------------------------------------------------------------
// Entry points, one per head dim. The minimum-blocks hints keep ptxas from its own register
// target (which spilled): fwd and bwd may use up to 255 registers (2 CTAs of 4 warps per SM), the
// memory-bound decode at most 128 (4 CTAs per SM).
// ---------------------------------------------------------------------------------------------

#define ATT_DEC_CH(D) ((D) >= 128 ? 32 : 64)
// Query rows per backward iteration: 32 at D = 128 keeps dK, dV, S^T and dP^T in 255 registers.
#define ATT_BWD_BM(D) ((D) >= 128 ? 32 : 64)
// Keys per tile of the dQ kernel.
#define ATT_DQ_BN(D) 64

#define ATT_ENTRIES(D)                                                                                       \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2)                                            \
        attention_fwd_d##D(const bf16* q, const bf16* k, const bf16* v, const u32* seq_lens, bf16* o,       \
                           float* lse, int S, int Hq, int Hkv, float scale_log2) {                           \
        attention_fwd_impl<D>(q, k, v, seq_lens, o, lse, S, Hq, Hkv, scale_log2);                           \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                               \
        attention_bwd_pre_d##D(const bf16* o, const bf16* dout, const u32* seq_lens, float* delta, int B,   \
                               int S, int Hq) {                                                              \
        attention_bwd_pre_impl<D>(o, dout, seq_lens, delta, B, S, Hq);                                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2)                                            \
        attention_bwd_d##D(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, \
                           const float* delta, const u32* seq_lens, bf16* dk, bf16* dv, float* part, int S, \
                           int Hq, int Hkv, int n_splits, float scale, float scale_log2) {                   \
        attention_bwd_impl<D, ATT_BWD_BM(D)>(q, k, v, dout, lse, delta, seq_lens, dk, dv, part, S, Hq, Hkv,  \
                                             n_splits, scale, scale_log2);                                   \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2)                                            \
        attention_bwd_dq_d##D(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,                \
                              const float* lse, const float* delta, const u32* seq_lens, bf16* dq, int S,   \
                              int Hq, int Hkv, float scale, float scale_log2) {                              \
        attention_bwd_dq_impl<D, ATT_DQ_BN(D)>(q, k, v, dout, lse, delta, seq_lens, dq, S, Hq, Hkv, scale,  \
                                               scale_log2);                                                  \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, 4)                                            \
        attention_decode_d##D(const bf16* q, const bf16* kc, const bf16* vc, const u32* cache_lens,          \
                              float* part_ml, float* part_acc, int Hq, int Hkv, int max_len, int split_len, \
                              float scale_log2) {                                                            \
        attention_decode_impl<D, ATT_DEC_CH(D)>(q, kc, vc, cache_lens, part_ml, part_acc, Hq, Hkv, max_len, \
                                                split_len, scale_log2);                                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(D)                                                          \
        attention_decode_combine_d##D(const float* part_ml, const float* part_acc, bf16* out, int Hq,       \
                                      int n_splits) {                                                        \
        attention_decode_combine_impl<D>(part_ml, part_acc, out, Hq, n_splits);                             \
    }

ATT_ENTRIES(16)
ATT_ENTRIES(32)
ATT_ENTRIES(64)
ATT_ENTRIES(128)

extern "C" __global__ void __launch_bounds__(256)
    attention_bwd_finalize(const float* part, const u32* seq_lens, bf16* dk, bf16* dv, int S, int row_w, long long n,
                           int n_splits, float scale) {
    attention_bwd_finalize_impl(part, seq_lens, dk, dv, S, row_w, n, n_splits, scale);
}
