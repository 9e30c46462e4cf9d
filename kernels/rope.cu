// rope.cu: rotary position embedding, Hugging Face "rotate_half" convention (CPU reference:
// src/kernels/rope.rs), in place on bf16 q [n][hq][dh] and k [n][hkv][dh] (token rows may be
// strided, e.g. views into a fused QKV buffer), fp32 math.
// Defines:
//   rope_apply   one launch for q and k: for every head and i < dh/2 the pair (i, i + dh/2) is
//                rotated by angle = pos[token] * inv_freq_i:
//                  out_i = x_i cos - x_{i+h} sin,  out_{i+h} = x_{i+h} cos + x_i sin.
//                inverse != 0 rotates by -angle instead: the backward (it maps dq_out to dq_in,
//                in place, because the rotation is orthogonal).
// No table: inv_freq and cos/sin are computed per block, as HF does in fp32:
//   e = fp32(2i) / fp32(dh);  inv_freq = 1 / fp32(theta ^ e);  angle = fp32(pos) * inv_freq
// with theta ^ e evaluated in double and rounded once (the correctly rounded fp32 power), and
// cos/sin evaluated in double on the fp32 angle and rounded once, so every cos/sin is the
// correctly rounded fp32 value. The CPU reference computes the same numbers (a difference needs
// the f64 result within ~1e-16 of an fp32 rounding boundary), and the same fp32 products.
#include <cuda_bf16.h>
#include "common.cuh"

typedef __nv_bfloat16 bf16;

#define ROPE_MAX_HALF 128  // head dim up to 256
#define ROPE_TOK 8         // tokens per block
#define ROPE_THREADS 256

__device__ __forceinline__ float bf_lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf_hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }
__device__ __forceinline__ u32 bf_pack2(float a, float b) {
    return (u32)__bfloat16_as_ushort(__float2bfloat16_rn(a)) |
           ((u32)__bfloat16_as_ushort(__float2bfloat16_rn(b)) << 16);
}
__device__ __forceinline__ void unpack8(uint4 u, float* f) {
    f[0] = bf_lo(u.x); f[1] = bf_hi(u.x); f[2] = bf_lo(u.y); f[3] = bf_hi(u.y);
    f[4] = bf_lo(u.z); f[5] = bf_hi(u.z); f[6] = bf_lo(u.w); f[7] = bf_hi(u.w);
}
__device__ __forceinline__ uint4 pack8(const float* f) {
    uint4 u;
    u.x = bf_pack2(f[0], f[1]); u.y = bf_pack2(f[2], f[3]);
    u.z = bf_pack2(f[4], f[5]); u.w = bf_pack2(f[6], f[7]);
    return u;
}

// HF's fp32 inverse frequency of pair i (see the header).
__device__ __forceinline__ float rope_inv_freq(int i, int dh, float theta) {
    const float e = __fdiv_rn((float)(2 * i), (float)dh);
    const float p = (float)pow((double)theta, (double)e);
    return __fdiv_rn(1.0f, p);
}

// Rotates U consecutive pairs starting at i0 of one head (base points at the head's element 0).
// The products are kept separate (no fma contraction) to match the reference's rounding order.
template <int U>
__device__ __forceinline__ void rope_rotate(bf16* __restrict__ base, int i0, int half,
                                            const float* __restrict__ cs, const float* __restrict__ sn) {
    float a[8], b[8];
    if (U == 8) {
        uint4* pa = (uint4*)(base + i0);
        uint4* pb = (uint4*)(base + half + i0);
        unpack8(*pa, a);
        unpack8(*pb, b);
    } else if (U == 2) {
        const u32 ua = *(const u32*)(base + i0), ub = *(const u32*)(base + half + i0);
        a[0] = bf_lo(ua); a[1] = bf_hi(ua);
        b[0] = bf_lo(ub); b[1] = bf_hi(ub);
    } else {
        a[0] = __bfloat162float(base[i0]);
        b[0] = __bfloat162float(base[half + i0]);
    }
    float oa[8], ob[8];
#pragma unroll
    for (int e = 0; e < U; ++e) {
        const float c = cs[i0 + e], s = sn[i0 + e];
        oa[e] = __fsub_rn(__fmul_rn(a[e], c), __fmul_rn(b[e], s));
        ob[e] = __fadd_rn(__fmul_rn(b[e], c), __fmul_rn(a[e], s));
    }
    if (U == 8) {
        *(uint4*)(base + i0) = pack8(oa);
        *(uint4*)(base + half + i0) = pack8(ob);
    } else if (U == 2) {
        *(u32*)(base + i0) = bf_pack2(oa[0], oa[1]);
        *(u32*)(base + half + i0) = bf_pack2(ob[0], ob[1]);
    } else {
        base[i0] = __float2bfloat16_rn(oa[0]);
        base[half + i0] = __float2bfloat16_rn(ob[0]);
    }
}

template <int U>
__device__ __forceinline__ void rope_body(bf16* __restrict__ q, bf16* __restrict__ k, int n, int hq,
                                          int hkv, int dh, long long q_stride, long long k_stride,
                                          int tok0, const float (*s_cos)[ROPE_MAX_HALF],
                                          const float (*s_sin)[ROPE_MAX_HALF]) {
    const int half = dh >> 1;
    const int uph = half / U;           // units (U pairs) per head
    const int upt = (hq + hkv) * uph;   // units per token
    for (int idx = threadIdx.x; idx < ROPE_TOK * upt; idx += blockDim.x) {
        const int t = idx / upt;
        const int tok = tok0 + t;
        if (tok >= n) break;  // idx only grows, so every later unit is past the end too
        const int u = idx - t * upt;
        const int head = u / uph;
        const int i0 = (u - head * uph) * U;
        bf16* base = head < hq ? q + (long long)tok * q_stride + (long long)head * dh
                               : k + (long long)tok * k_stride + (long long)(head - hq) * dh;
        rope_rotate<U>(base, i0, half, s_cos[t], s_sin[t]);
    }
}

// Grid ceil(n / ROPE_TOK), block ROPE_THREADS. unit (8, 2 or 1 pairs per thread) is chosen by
// the host from dh, the strides and pointer alignment. q (or k) may be null when hq (hkv) is 0.
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
rope_apply(bf16* __restrict__ q, bf16* __restrict__ k, const int* __restrict__ pos, int n, int hq,
           int hkv, int dh, long long q_stride, long long k_stride, float theta, int unit, int inverse) {
    __shared__ float s_inv[ROPE_MAX_HALF];
    __shared__ float s_cos[ROPE_TOK][ROPE_MAX_HALF];
    __shared__ float s_sin[ROPE_TOK][ROPE_MAX_HALF];
    const int half = dh >> 1;
    const int tok0 = blockIdx.x * ROPE_TOK;
    for (int i = threadIdx.x; i < half; i += blockDim.x) s_inv[i] = rope_inv_freq(i, dh, theta);
    __syncthreads();
    for (int idx = threadIdx.x; idx < ROPE_TOK * half; idx += blockDim.x) {
        const int t = idx / half;
        const int i = idx - t * half;
        const int tok = tok0 + t;
        if (tok < n) {
            const float ang = __fmul_rn((float)pos[tok], s_inv[i]);
            double sd, cd;
            sincos((double)ang, &sd, &cd);
            s_cos[t][i] = (float)cd;
            s_sin[t][i] = inverse ? -(float)sd : (float)sd;
        }
    }
    __syncthreads();
    if (unit == 8)
        rope_body<8>(q, k, n, hq, hkv, dh, q_stride, k_stride, tok0, s_cos, s_sin);
    else if (unit == 2)
        rope_body<2>(q, k, n, hq, hkv, dh, q_stride, k_stride, tok0, s_cos, s_sin);
    else
        rope_body<1>(q, k, n, hq, hkv, dh, q_stride, k_stride, tok0, s_cos, s_sin);
}
