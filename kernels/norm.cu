// norm.cu: RMSNorm (Llama/Qwen2) on bf16 activations with fp32 math (CPU reference:
// src/kernels/norm.rs). Rows are tokens: x, y, h are [n][d] bf16 row-major, w is [d] bf16.
// Defines:
//   norm_rmsnorm_fwd             one warp per row: r = 1/sqrt(mean(h^2) + eps), y = (h*r)*w,
//                                rstd[row] = r (fp32, saved for the backward). h = x, or with a
//                                residual h = bf16(x + residual), also written out (fused add).
//   norm_rmsnorm_bwd_dx          one warp per row: g = (r*w)*dy - (r^3*sum(dy*w*h)/d)*h, plus an
//                                optional upstream dh; dx += g and, optionally, dx2 += g (bf16:
//                                read, add in fp32, round once).
//   norm_rmsnorm_bwd_dw_partial  column sums of dy*h*r over fixed chunks of rows -> workspace
//                                [chunk][d] fp32 (a grid that depends on n only).
//   norm_rmsnorm_bwd_dw_finalize dw += the chunk partials summed in a fixed order (deterministic,
//                                no atomics).
// Vector path (vec != 0, chosen by the host when d % 8 == 0 and every pointer is 16-byte
// aligned): 16-byte loads of 8 bf16; the first NORM_CACHE vectors per lane stay in registers so
// rows up to 1024 wide are read from memory once. Otherwise a scalar path handles any d.
#include <cuda_bf16.h>
#include "common.cuh"

typedef __nv_bfloat16 bf16;

#define NORM_WARPS 8      // rows (warps) per block of the row kernels
#define NORM_CACHE 4      // uint4 vectors per lane held in registers (4 * 32 * 8 = 1024 columns)
#define NORM_DW_COLS 128  // columns (threads) per block of the dw partial kernel
#define NORM_FIN_X 32     // columns per block of the dw finalize kernel
#define NORM_FIN_Y 16     // chunk lanes per column in the dw finalize kernel

// bf16 <-> fp32. A bf16 is the top half of an fp32, so widening is a shift.
__device__ __forceinline__ float bf_lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf_hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }
__device__ __forceinline__ float bf_ld(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float bf_round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
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

// Vector v of the normalised input: x, or bf16(x + res) stored to h when hr is given.
__device__ __forceinline__ uint4 norm_in8(const uint4* __restrict__ xr, const uint4* __restrict__ rr,
                                          uint4* __restrict__ hr, int v) {
    uint4 u = xr[v];
    if (rr) {
        float a[8], b[8];
        unpack8(u, a);
        unpack8(rr[v], b);
#pragma unroll
        for (int e = 0; e < 8; ++e) a[e] += b[e];
        u = pack8(a);
        if (hr) hr[v] = u;
    }
    return u;
}

__device__ __forceinline__ float sumsq8(uint4 u) {
    float f[8];
    unpack8(u, f);
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) s += f[e] * f[e];
    return s;
}

__device__ __forceinline__ uint4 scale8(uint4 hu, uint4 wu, float r) {
    float h[8], w[8];
    unpack8(hu, h);
    unpack8(wu, w);
#pragma unroll
    for (int e = 0; e < 8; ++e) h[e] = (h[e] * r) * w[e];
    return pack8(h);
}

// x, w, y, rstd required; res and h both null (plain RMSNorm) or both set (fused residual add).
extern "C" __global__ void __launch_bounds__(NORM_WARPS * 32)
norm_rmsnorm_fwd(const bf16* __restrict__ x, const bf16* __restrict__ res, const bf16* __restrict__ w,
                 bf16* __restrict__ h, bf16* __restrict__ y, float* __restrict__ rstd, int n, int d,
                 float eps, int vec) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * NORM_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;  // whole warps leave together; no block-level sync below
    const size_t off = (size_t)row * (size_t)d;
    float ss = 0.f;
    if (vec) {
        const int nv = d >> 3;
        const uint4* xr = (const uint4*)(x + off);
        const uint4* rr = res ? (const uint4*)(res + off) : nullptr;
        uint4* hr = h ? (uint4*)(h + off) : nullptr;
        uint4 cache[NORM_CACHE];
#pragma unroll
        for (int c = 0; c < NORM_CACHE; ++c) {
            const int v = lane + 32 * c;
            cache[c] = make_uint4(0u, 0u, 0u, 0u);
            if (v < nv) {
                cache[c] = norm_in8(xr, rr, hr, v);
                ss += sumsq8(cache[c]);
            }
        }
        for (int v = lane + 32 * NORM_CACHE; v < nv; v += 32) ss += sumsq8(norm_in8(xr, rr, hr, v));
        ss = warp_sum(ss);
        const float r = 1.0f / sqrtf(ss / (float)d + eps);
        const uint4* wr = (const uint4*)w;
        uint4* yr = (uint4*)(y + off);
#pragma unroll
        for (int c = 0; c < NORM_CACHE; ++c) {
            const int v = lane + 32 * c;
            if (v < nv) yr[v] = scale8(cache[c], wr[v], r);
        }
        // Beyond the cache: recompute the input (h is not reread: it is an output).
        for (int v = lane + 32 * NORM_CACHE; v < nv; v += 32)
            yr[v] = scale8(norm_in8(xr, rr, nullptr, v), wr[v], r);
        if (lane == 0) rstd[row] = r;
    } else {
        const bf16* xr = x + off;
        const bf16* rr = res ? res + off : nullptr;
        for (int j = lane; j < d; j += 32) {
            float v = bf_ld(xr + j);
            if (rr) {
                v = bf_round(v + bf_ld(rr + j));
                if (h) h[off + j] = __float2bfloat16_rn(v);
            }
            ss += v * v;
        }
        ss = warp_sum(ss);
        const float r = 1.0f / sqrtf(ss / (float)d + eps);
        for (int j = lane; j < d; j += 32) {
            float v = bf_ld(xr + j);
            if (rr) v = bf_round(v + bf_ld(rr + j));
            y[off + j] = __float2bfloat16_rn((v * r) * bf_ld(w + j));
        }
        if (lane == 0) rstd[row] = r;
    }
}

__device__ __forceinline__ float dot3_8(uint4 dyu, uint4 wu, uint4 xu) {
    float a[8], b[8], c[8];
    unpack8(dyu, a);
    unpack8(wu, b);
    unpack8(xu, c);
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) s += (a[e] * b[e]) * c[e];
    return s;
}

// dx[v] += g (and dx2[v] += g) for one vector: g = (r*w)*dy - a*x (+ dh).
__device__ __forceinline__ void norm_dx8(uint4 xu, uint4 dyu, uint4 wu, const uint4* __restrict__ dhr,
                                         uint4* __restrict__ dxr, uint4* __restrict__ dx2r, int v,
                                         float r, float a) {
    float xf[8], dyf[8], wf[8], g[8], o[8];
    unpack8(xu, xf);
    unpack8(dyu, dyf);
    unpack8(wu, wf);
#pragma unroll
    for (int e = 0; e < 8; ++e) g[e] = (r * wf[e]) * dyf[e] - a * xf[e];
    if (dhr) {
        float t[8];
        unpack8(dhr[v], t);
#pragma unroll
        for (int e = 0; e < 8; ++e) g[e] += t[e];
    }
    unpack8(dxr[v], o);
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] += g[e];
    dxr[v] = pack8(o);
    if (dx2r) {
        unpack8(dx2r[v], o);
#pragma unroll
        for (int e = 0; e < 8; ++e) o[e] += g[e];
        dx2r[v] = pack8(o);
    }
}

// x (the normalised input: h for the fused variant), w, rstd, dy, dx required; dh, dx2 optional.
// dx and dx2 must be distinct buffers that overlap no input.
extern "C" __global__ void __launch_bounds__(NORM_WARPS * 32)
norm_rmsnorm_bwd_dx(const bf16* __restrict__ x, const bf16* __restrict__ w, const float* __restrict__ rstd,
                    const bf16* __restrict__ dy, const bf16* __restrict__ dh, bf16* __restrict__ dx,
                    bf16* __restrict__ dx2, int n, int d, int vec) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * NORM_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    const size_t off = (size_t)row * (size_t)d;
    const float r = rstd[row];
    float c = 0.f;
    if (vec) {
        const int nv = d >> 3;
        const uint4* xr = (const uint4*)(x + off);
        const uint4* dyr = (const uint4*)(dy + off);
        const uint4* wr = (const uint4*)w;
        const uint4* dhr = dh ? (const uint4*)(dh + off) : nullptr;
        uint4* dxr = (uint4*)(dx + off);
        uint4* dx2r = dx2 ? (uint4*)(dx2 + off) : nullptr;
        uint4 cx[NORM_CACHE], cd[NORM_CACHE];
#pragma unroll
        for (int k = 0; k < NORM_CACHE; ++k) {
            const int v = lane + 32 * k;
            cx[k] = make_uint4(0u, 0u, 0u, 0u);
            cd[k] = make_uint4(0u, 0u, 0u, 0u);
            if (v < nv) {
                cx[k] = xr[v];
                cd[k] = dyr[v];
                c += dot3_8(cd[k], wr[v], cx[k]);
            }
        }
        for (int v = lane + 32 * NORM_CACHE; v < nv; v += 32) c += dot3_8(dyr[v], wr[v], xr[v]);
        c = warp_sum(c);
        const float a = ((r * r) * r) * c / (float)d;
#pragma unroll
        for (int k = 0; k < NORM_CACHE; ++k) {
            const int v = lane + 32 * k;
            if (v < nv) norm_dx8(cx[k], cd[k], wr[v], dhr, dxr, dx2r, v, r, a);
        }
        for (int v = lane + 32 * NORM_CACHE; v < nv; v += 32)
            norm_dx8(xr[v], dyr[v], wr[v], dhr, dxr, dx2r, v, r, a);
    } else {
        for (int j = lane; j < d; j += 32) c += (bf_ld(dy + off + j) * bf_ld(w + j)) * bf_ld(x + off + j);
        c = warp_sum(c);
        const float a = ((r * r) * r) * c / (float)d;
        for (int j = lane; j < d; j += 32) {
            const size_t o = off + j;
            float g = (r * bf_ld(w + j)) * bf_ld(dy + o) - a * bf_ld(x + o);
            if (dh) g += bf_ld(dh + o);
            dx[o] = __float2bfloat16_rn(bf_ld(dx + o) + g);
            if (dx2) dx2[o] = __float2bfloat16_rn(bf_ld(dx2 + o) + g);
        }
    }
}

// Grid (ceil(d / NORM_DW_COLS), chunks), block NORM_DW_COLS: thread j of chunk c writes
// ws[c][j] = sum over rows r of the chunk, in order, of (dy[r][j] * x[r][j]) * rstd[r].
extern "C" __global__ void __launch_bounds__(NORM_DW_COLS)
norm_rmsnorm_bwd_dw_partial(const bf16* __restrict__ x, const bf16* __restrict__ dy,
                            const float* __restrict__ rstd, float* __restrict__ ws, int n, int d,
                            int rows_per_chunk) {
    const int j = blockIdx.x * NORM_DW_COLS + threadIdx.x;
    if (j >= d) return;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = min(n, r0 + rows_per_chunk);
    float acc = 0.f;
#pragma unroll 4
    for (int r = r0; r < r1; ++r) {
        const size_t o = (size_t)r * (size_t)d + j;
        acc += (bf_ld(dy + o) * bf_ld(x + o)) * rstd[r];
    }
    ws[(size_t)blockIdx.y * (size_t)d + j] = acc;
}

// Grid ceil(d / NORM_FIN_X), block (NORM_FIN_X, NORM_FIN_Y): lane (tx, ty) sums chunks ty,
// ty + NORM_FIN_Y, ... of column j in order; the NORM_FIN_Y partials are then added in order.
extern "C" __global__ void __launch_bounds__(NORM_FIN_X * NORM_FIN_Y)
norm_rmsnorm_bwd_dw_finalize(const float* __restrict__ ws, int chunks, int d, float* __restrict__ dw) {
    __shared__ float part[NORM_FIN_Y][NORM_FIN_X + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int j = blockIdx.x * NORM_FIN_X + tx;
    float s = 0.f;
    if (j < d) {
        for (int c = ty; c < chunks; c += NORM_FIN_Y) s += ws[(size_t)c * (size_t)d + j];
    }
    part[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && j < d) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < NORM_FIN_Y; ++k) t += part[k][tx];
        dw[j] += t;
    }
}
