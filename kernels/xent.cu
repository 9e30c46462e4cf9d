// xent.cu: the LM-head cross-entropy fused over the vocabulary (CPU references in
// src/kernels/xent.rs).
// Defines:
//   xent_fwd  per row of bf16 logits [N][V] at temperature T: log-prob of the target, log-sum-exp
//             and entropy of softmax(logits / T), in ONE pass over the logits (online max /
//             sum-exp / sum-exp-weighted, never materialising the softmax); fp32 outputs
//   xent_bwd  one more pass: d_logits (bf16, accumulated: read, add in fp32, round once, write)
//             from per-row upstream d_logprob and d_entropy and the saved lse and entropy
//   xent_bwd_inplace  the same gradient written OVER the logits (bf16(g), what xent_bwd gives a
//             zeroed d_logits; rows with no gradient become 0): the chunked LM head's backward
//             (src/model/lm_head.rs), so a chunk needs one buffer, not two
// One block per row; 16-byte vector loads (8 bf16) over the 16-byte-aligned body of each row,
// scalar loads for the unaligned head and the tail, so any V works.
#include <cuda_bf16.h>
#include "common.cuh"

#define XENT_BLOCK 512
#define XENT_IGNORE 0xFFFFFFFFu
#define XENT_LOG2E 1.4426950408889634f
#define XENT_LN2 0.6931471805599453f

// bf16 bits -> fp32 (exact).
__device__ __forceinline__ float xent_bf16_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float xent_bf16_hi(u32 w) { return __uint_as_float(w & 0xFFFF0000u); }
__device__ __forceinline__ float xent_bf16(unsigned short b) { return __uint_as_float((u32)b << 16); }

// fp32 -> bf16 bits, round to nearest even (cvt.rn.bf16.f32).
__device__ __forceinline__ unsigned short xent_to_bf16(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// Online softmax statistics in base 2 over values x = z * log2(e) / T:
//   m = running max, S = sum 2^(x - m), A = sum 2^(x - m) * (x - m).
// Then lse2 = m + log2 S and the entropy in nats is ln2 * (log2 S - A / S).
// m starts at -FLT_MAX (finite), so a -inf logit gives 2^(-inf) = 0 and adds nothing (the e > 0
// select keeps 0 * -inf out of A); NaN logits propagate into S (and so into every output).
struct XentStat {
    float m, S, A;
};

__device__ __forceinline__ void xent_rescale(XentStat& s, float new_m) {
    if (new_m > s.m) {
        if (s.S != 0.f) {
            const float dm = s.m - new_m;
            const float r = exp2f(dm);
            s.A = r * (s.A + dm * s.S);
            s.S *= r;
        }
        s.m = new_m;
    }
}

__device__ __forceinline__ void xent_add(XentStat& s, float x) {
    const float d = x - s.m;
    const float e = exp2f(d);
    s.S += e;
    s.A += (e > 0.f) ? e * d : 0.f;
}

__device__ __forceinline__ void xent_add1(XentStat& s, float x) {
    xent_rescale(s, x);
    xent_add(s, x);
}

// 8 values: one rescale for the batch, then 8 adds.
__device__ __forceinline__ void xent_add8(XentStat& s, const float (&x)[8]) {
    float cm = x[0];
#pragma unroll
    for (int k = 1; k < 8; ++k) cm = fmaxf(cm, x[k]);
    xent_rescale(s, cm);
#pragma unroll
    for (int k = 0; k < 8; ++k) xent_add(s, x[k]);
}

__device__ __forceinline__ XentStat xent_merge(XentStat a, XentStat b) {
    XentStat r;
    r.m = fmaxf(a.m, b.m);
    r.S = 0.f;
    r.A = 0.f;
    // S != 0 is also true for NaN, which must propagate.
    if (a.S != 0.f) {
        const float d = a.m - r.m;
        const float f = exp2f(d);
        r.S += f * a.S;
        r.A += f * (a.A + d * a.S);
    }
    if (b.S != 0.f) {
        const float d = b.m - r.m;
        const float f = exp2f(d);
        r.S += f * b.S;
        r.A += f * (b.A + d * b.S);
    }
    return r;
}

__device__ __forceinline__ void xent_unpack(uint4 q, float c, float (&x)[8]) {
    x[0] = xent_bf16_lo(q.x) * c;
    x[1] = xent_bf16_hi(q.x) * c;
    x[2] = xent_bf16_lo(q.y) * c;
    x[3] = xent_bf16_hi(q.y) * c;
    x[4] = xent_bf16_lo(q.z) * c;
    x[5] = xent_bf16_hi(q.z) * c;
    x[6] = xent_bf16_lo(q.w) * c;
    x[7] = xent_bf16_hi(q.w) * c;
}

// Split of a row into [0, head) scalar, head + [0, 8*nvec) as uint4 vectors, [tail0, V) scalar.
// head = elements before the first 16-byte boundary (the base is 2-byte aligned), or V when
// vectors cannot be used for every stream the kernel touches (`vec_ok` false).
__device__ __forceinline__ void xent_split(const unsigned short* rowp, long long V, bool vec_ok,
                                           long long& head, long long& nvec, long long& tail0) {
    const unsigned long long addr = (unsigned long long)rowp;
    head = vec_ok ? (long long)(((16ull - (addr & 15ull)) & 15ull) >> 1) : V;
    if (head > V) head = V;
    nvec = (V - head) >> 3;
    tail0 = head + (nvec << 3);
}

// logits: [N][V] bf16 bits; targets: [N] (XENT_IGNORE = ignored; >= V otherwise = invalid, gives
// NaN logprob); logprob, lse, entropy: [N] fp32. c = log2(e) / T. grid = N, block = XENT_BLOCK.
extern "C" __global__ void __launch_bounds__(XENT_BLOCK)
xent_fwd(const unsigned short* __restrict__ logits, const u32* __restrict__ targets, long long V,
         float c, float* __restrict__ logprob, float* __restrict__ lse, float* __restrict__ entropy) {
    __shared__ float s_m[XENT_BLOCK / 32], s_S[XENT_BLOCK / 32], s_A[XENT_BLOCK / 32];
    const long long row = blockIdx.x;
    const int tid = threadIdx.x;
    const unsigned short* rowp = logits + row * V;
    long long head, nvec, tail0;
    xent_split(rowp, V, true, head, nvec, tail0);

    XentStat st = {-3.402823466e38f, 0.f, 0.f};
    for (long long j = tid; j < head; j += XENT_BLOCK) xent_add1(st, xent_bf16(rowp[j]) * c);
    for (long long j = tail0 + tid; j < V; j += XENT_BLOCK) xent_add1(st, xent_bf16(rowp[j]) * c);

    // Body: two independent 16-byte loads in flight per thread per iteration.
    const uint4* vp = reinterpret_cast<const uint4*>(rowp + head);
    long long i = tid;
    for (; i + XENT_BLOCK < nvec; i += 2 * XENT_BLOCK) {
        const uint4 q0 = vp[i];
        const uint4 q1 = vp[i + XENT_BLOCK];
        float x[8];
        xent_unpack(q0, c, x);
        xent_add8(st, x);
        xent_unpack(q1, c, x);
        xent_add8(st, x);
    }
    if (i < nvec) {
        float x[8];
        xent_unpack(vp[i], c, x);
        xent_add8(st, x);
    }

    // Block merge: warp butterfly, then warp 0 over the warp results (fixed order).
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        XentStat other;
        other.m = __shfl_xor_sync(DFPO_FULL_MASK, st.m, o);
        other.S = __shfl_xor_sync(DFPO_FULL_MASK, st.S, o);
        other.A = __shfl_xor_sync(DFPO_FULL_MASK, st.A, o);
        st = xent_merge(st, other);
    }
    const int lane = tid & 31, warp = tid >> 5;
    if (lane == 0) {
        s_m[warp] = st.m;
        s_S[warp] = st.S;
        s_A[warp] = st.A;
    }
    __syncthreads();
    if (warp == 0) {
        XentStat w = {-3.402823466e38f, 0.f, 0.f};
        if (lane < XENT_BLOCK / 32) {
            w.m = s_m[lane];
            w.S = s_S[lane];
            w.A = s_A[lane];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            XentStat other;
            other.m = __shfl_xor_sync(DFPO_FULL_MASK, w.m, o);
            other.S = __shfl_xor_sync(DFPO_FULL_MASK, w.S, o);
            other.A = __shfl_xor_sync(DFPO_FULL_MASK, w.A, o);
            w = xent_merge(w, other);
        }
        if (lane == 0) {
            const float l2s = log2f(w.S);
            const float lse2 = w.m + l2s;
            const u32 t = targets[row];
            float lp;
            if (t == XENT_IGNORE) {
                lp = 0.f;
            } else if ((long long)t < V) {
                lp = XENT_LN2 * (xent_bf16(rowp[t]) * c - lse2);
            } else {
                lp = __int_as_float(0x7fc00000);  // invalid target: NaN, visible downstream
            }
            logprob[row] = lp;
            lse[row] = XENT_LN2 * lse2;
            // Every logit -inf (S = 0; NaN is not 0): lse = -inf, logprob NaN (from -inf - -inf),
            // and entropy 0, not 0/0 (the src/kernels/xent.rs definition).
            entropy[row] = w.S == 0.f ? 0.f : XENT_LN2 * (l2s - w.A / w.S);
        }
    }
}

// d z_j += inv_t * ( g_lp * (1[j = t] - p_j) - g_H * p_j * (log p_j + H) ), with
// p_j = exp(z_j / T - lse) and (log p_j + H) dropped where p_j underflows to 0 (so masked -inf
// logits get 0, not NaN). d_logprob / d_entropy may be null (= 0). Rows with both upstream
// gradients 0 are skipped (adding 0 changes nothing). grid = N, block = XENT_BLOCK.
__device__ __forceinline__ float xent_grad(float z, long long j, long long t, float c, float inv_t,
                                           float lse2, float H, float g_lp, float g_H) {
    const float x = z * c;
    const float d = x - lse2;  // log2 p_j
    const float p = exp2f(d);
    const float logp = XENT_LN2 * d;
    const float ent = (p > 0.f) ? p * (logp + H) : 0.f;
    const float onehot = (j == t) ? 1.f : 0.f;
    return inv_t * (g_lp * (onehot - p) - g_H * ent);
}

__device__ __forceinline__ u32 xent_acc2(u32 dw, u32 zw, long long j, long long t, float c,
                                         float inv_t, float lse2, float H, float g_lp, float g_H) {
    const float g0 = xent_grad(xent_bf16_lo(zw), j, t, c, inv_t, lse2, H, g_lp, g_H);
    const float g1 = xent_grad(xent_bf16_hi(zw), j + 1, t, c, inv_t, lse2, H, g_lp, g_H);
    const u32 lo = xent_to_bf16(xent_bf16_lo(dw) + g0);
    const u32 hi = xent_to_bf16(xent_bf16_hi(dw) + g1);
    return lo | (hi << 16);
}

extern "C" __global__ void __launch_bounds__(XENT_BLOCK)
xent_bwd(const unsigned short* __restrict__ logits, const u32* __restrict__ targets, long long V,
         float c, float inv_t, const float* __restrict__ lse, const float* __restrict__ entropy,
         const float* __restrict__ d_logprob, const float* __restrict__ d_entropy,
         unsigned short* __restrict__ d_logits) {
    const long long row = blockIdx.x;
    const int tid = threadIdx.x;
    const u32 tu = targets[row];
    float g_lp = d_logprob != nullptr ? d_logprob[row] : 0.f;
    // Ignored (or invalid) targets contribute no gradient through the log-prob.
    if (tu == XENT_IGNORE || (long long)tu >= V) g_lp = 0.f;
    const long long t = (tu == XENT_IGNORE || (long long)tu >= V) ? -1 : (long long)tu;
    const float g_H = d_entropy != nullptr ? d_entropy[row] : 0.f;
    if (g_lp == 0.f && g_H == 0.f) return;  // block-uniform; no barrier in this kernel
    // A row of only -inf logits (lse = -inf) has no distribution and gets no gradient.
    if (lse[row] == __int_as_float(0xff800000)) return;
    const float lse2 = lse[row] * XENT_LOG2E;
    const float H = entropy[row];

    const unsigned short* zr = logits + row * V;
    unsigned short* dr = d_logits + row * V;
    // Vectors only when both rows share the same offset within 16 bytes.
    const bool vec_ok = ((((unsigned long long)logits) ^ ((unsigned long long)d_logits)) & 15ull) == 0;
    long long head, nvec, tail0;
    xent_split(zr, V, vec_ok, head, nvec, tail0);

    for (long long j = tid; j < head; j += XENT_BLOCK) {
        const float g = xent_grad(xent_bf16(zr[j]), j, t, c, inv_t, lse2, H, g_lp, g_H);
        dr[j] = xent_to_bf16(xent_bf16(dr[j]) + g);
    }
    for (long long j = tail0 + tid; j < V; j += XENT_BLOCK) {
        const float g = xent_grad(xent_bf16(zr[j]), j, t, c, inv_t, lse2, H, g_lp, g_H);
        dr[j] = xent_to_bf16(xent_bf16(dr[j]) + g);
    }
    const uint4* zv = reinterpret_cast<const uint4*>(zr + head);
    uint4* dv = reinterpret_cast<uint4*>(dr + head);
    for (long long i = tid; i < nvec; i += XENT_BLOCK) {
        const uint4 zq = zv[i];
        const uint4 dq = dv[i];
        const long long j0 = head + 8 * i;
        uint4 o;
        o.x = xent_acc2(dq.x, zq.x, j0 + 0, t, c, inv_t, lse2, H, g_lp, g_H);
        o.y = xent_acc2(dq.y, zq.y, j0 + 2, t, c, inv_t, lse2, H, g_lp, g_H);
        o.z = xent_acc2(dq.z, zq.z, j0 + 4, t, c, inv_t, lse2, H, g_lp, g_H);
        o.w = xent_acc2(dq.w, zq.w, j0 + 6, t, c, inv_t, lse2, H, g_lp, g_H);
        dv[i] = o;
    }
}

// The chunked LM head's backward: overwrites z [N][V] (bf16, the logits of this chunk, computed
// again from the hidden states) with d_logits = bf16(xent_grad), the value xent_bwd accumulates
// into a zeroed d_logits. Rows with no upstream gradient, or only -inf logits, become 0 (the next
// GEMMs read every row). Each element is read and written by the same thread, so in place is
// safe (no __restrict__ on z). grid = N, block = XENT_BLOCK.
extern "C" __global__ void __launch_bounds__(XENT_BLOCK)
xent_bwd_inplace(unsigned short* z, const u32* __restrict__ targets, long long V, float c,
                 float inv_t, const float* __restrict__ lse, const float* __restrict__ entropy,
                 const float* __restrict__ d_logprob, const float* __restrict__ d_entropy) {
    const long long row = blockIdx.x;
    const int tid = threadIdx.x;
    const u32 tu = targets[row];
    float g_lp = d_logprob != nullptr ? d_logprob[row] : 0.f;
    if (tu == XENT_IGNORE || (long long)tu >= V) g_lp = 0.f;
    const long long t = (tu == XENT_IGNORE || (long long)tu >= V) ? -1 : (long long)tu;
    const float g_H = d_entropy != nullptr ? d_entropy[row] : 0.f;
    const bool none = (g_lp == 0.f && g_H == 0.f) || lse[row] == __int_as_float(0xff800000);
    const float lse2 = lse[row] * XENT_LOG2E;
    const float H = entropy[row];

    unsigned short* zr = z + row * V;
    long long head, nvec, tail0;
    xent_split(zr, V, true, head, nvec, tail0);
    for (long long j = tid; j < head; j += XENT_BLOCK)
        zr[j] = none ? 0 : xent_to_bf16(xent_grad(xent_bf16(zr[j]), j, t, c, inv_t, lse2, H, g_lp, g_H));
    for (long long j = tail0 + tid; j < V; j += XENT_BLOCK)
        zr[j] = none ? 0 : xent_to_bf16(xent_grad(xent_bf16(zr[j]), j, t, c, inv_t, lse2, H, g_lp, g_H));
    uint4* zv = reinterpret_cast<uint4*>(zr + head);
    for (long long i = tid; i < nvec; i += XENT_BLOCK) {
        uint4 o;
        o.x = 0u;
        o.y = 0u;
        o.z = 0u;
        o.w = 0u;
        if (!none) {
            const uint4 zq = zv[i];
            const long long j0 = head + 8 * i;
            // xent_acc2 over a zero d_logits: bf16(0 + g) = bf16(g).
            o.x = xent_acc2(0u, zq.x, j0 + 0, t, c, inv_t, lse2, H, g_lp, g_H);
            o.y = xent_acc2(0u, zq.y, j0 + 2, t, c, inv_t, lse2, H, g_lp, g_H);
            o.z = xent_acc2(0u, zq.z, j0 + 4, t, c, inv_t, lse2, H, g_lp, g_H);
            o.w = xent_acc2(0u, zq.w, j0 + 6, t, c, inv_t, lse2, H, g_lp, g_H);
        }
        zv[i] = o;
    }
}
