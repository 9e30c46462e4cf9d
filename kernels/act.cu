// act.cu: SwiGLU on a fused gate/up projection (CPU reference: src/kernels/act.rs), bf16
// activations, fp32 math. gu is [n][2I] (gate = columns [0, I), up = [I, 2I)), out is [n][I].
// Defines:
//   act_swiglu_fwd  out = silu(g) * u, silu(g) = g * sigmoid(g)
//   act_swiglu_bwd  d(gu) += [dout * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))), dout * silu(g)]
//                   (bf16 accumulate: read, add in fp32, round once)
// Elementwise, grid-stride; with vec != 0 (I % 8 == 0 and 16-byte aligned pointers, checked by
// the host) each thread moves 8 columns with 16-byte loads, else one column.
#include <cuda_bf16.h>
#include "common.cuh"

typedef __nv_bfloat16 bf16;

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

// 1 / (1 + e^-g) with the accurate expf: e^-g = inf for very negative g gives exactly 0.
__device__ __forceinline__ float act_sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

__device__ __forceinline__ float act_fwd1(float g, float u) {
    const float s = act_sigmoid(g);
    return (g * s) * u;
}

__device__ __forceinline__ void act_bwd1(float g, float u, float dout, float& dg, float& du) {
    const float s = act_sigmoid(g);
    const float ds = s * (1.0f + g * (1.0f - s));
    dg = (dout * u) * ds;
    du = dout * (g * s);
}

extern "C" __global__ void act_swiglu_fwd(const bf16* __restrict__ gu, bf16* __restrict__ out, int n,
                                          int inter, int vec) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    if (vec) {
        const long long upr = inter >> 3;  // 8-column units per row
        const long long units = (long long)n * upr;
        for (long long x = (long long)blockIdx.x * blockDim.x + threadIdx.x; x < units; x += stride) {
            const long long row = x / upr;
            const long long c = (x - row * upr) * 8;
            const bf16* g = gu + row * 2 * inter + c;
            float gf[8], uf[8];
            unpack8(*(const uint4*)g, gf);
            unpack8(*(const uint4*)(g + inter), uf);
#pragma unroll
            for (int e = 0; e < 8; ++e) gf[e] = act_fwd1(gf[e], uf[e]);
            *(uint4*)(out + row * inter + c) = pack8(gf);
        }
    } else {
        const long long units = (long long)n * inter;
        for (long long x = (long long)blockIdx.x * blockDim.x + threadIdx.x; x < units; x += stride) {
            const long long row = x / inter;
            const long long c = x - row * inter;
            const bf16* g = gu + row * 2 * inter + c;
            out[x] = __float2bfloat16_rn(act_fwd1(__bfloat162float(g[0]), __bfloat162float(g[inter])));
        }
    }
}

// dgu must not overlap gu or dout.
extern "C" __global__ void act_swiglu_bwd(const bf16* __restrict__ gu, const bf16* __restrict__ dout,
                                          bf16* __restrict__ dgu, int n, int inter, int vec) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    if (vec) {
        const long long upr = inter >> 3;
        const long long units = (long long)n * upr;
        for (long long x = (long long)blockIdx.x * blockDim.x + threadIdx.x; x < units; x += stride) {
            const long long row = x / upr;
            const long long c = (x - row * upr) * 8;
            const long long go = row * 2 * inter + c;
            float gf[8], uf[8], df[8], ag[8], au[8];
            unpack8(*(const uint4*)(gu + go), gf);
            unpack8(*(const uint4*)(gu + go + inter), uf);
            unpack8(*(const uint4*)(dout + row * inter + c), df);
            unpack8(*(const uint4*)(dgu + go), ag);
            unpack8(*(const uint4*)(dgu + go + inter), au);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                float dg, du;
                act_bwd1(gf[e], uf[e], df[e], dg, du);
                ag[e] += dg;
                au[e] += du;
            }
            *(uint4*)(dgu + go) = pack8(ag);
            *(uint4*)(dgu + go + inter) = pack8(au);
        }
    } else {
        const long long units = (long long)n * inter;
        for (long long x = (long long)blockIdx.x * blockDim.x + threadIdx.x; x < units; x += stride) {
            const long long row = x / inter;
            const long long c = x - row * inter;
            const long long go = row * 2 * inter + c;
            float dg, du;
            act_bwd1(__bfloat162float(gu[go]), __bfloat162float(gu[go + inter]), __bfloat162float(dout[x]),
                     dg, du);
            dgu[go] = __float2bfloat16_rn(__bfloat162float(dgu[go]) + dg);
            dgu[go + inter] = __float2bfloat16_rn(__bfloat162float(dgu[go + inter]) + du);
        }
    }
}
