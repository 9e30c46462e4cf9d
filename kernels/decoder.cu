// decoder.cu: small glue kernels of the decoder's graph ops (src/model/ops.rs; CPU paths there).
// Defines:
//   decoder_bias_fill  y[r][c] = b[c]               (bf16; a cuBLAS GEMM then adds x·Wᵀ, beta = 1)
//   decoder_bias_grad  db[c] += Σ_r dy[r][c]        (dy bf16, db fp32; fixed summation order)
//   decoder_add_bf16   y[i] = bf16(y[i] + x[i])     (gradient accumulation of bf16 buffers)
//   decoder_nll_fwd    loss = −Σ_{t valid} lp[t] / #valid   (one block; 0 when none is valid)
//   decoder_nll_bwd    dlp[t] += −dloss / #valid for valid t (one block)
// "valid": targets[t] != 0xffffffff (the xent ignore index).
#include <cuda_bf16.h>
#include "common.cuh"

typedef __nv_bfloat16 bf16;

extern "C" __global__ void decoder_bias_fill(bf16* __restrict__ y, const bf16* __restrict__ b,
                                             long long n, int m) {
    const long long total = n * (long long)m;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride)
        y[i] = b[i % m];
}

// Block (32, 8): 32 columns per block, 8 row groups; partial sums in fixed order, then an
// ordered sum over the 8 groups in shared memory. Deterministic.
extern "C" __global__ void decoder_bias_grad(const bf16* __restrict__ dy, float* __restrict__ db,
                                             int n, int m) {
    __shared__ float part[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (c < m)
        for (int r = threadIdx.y; r < n; r += 8) s += __bfloat162float(dy[(long long)r * m + c]);
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < m) {
        float t = 0.0f;
#pragma unroll
        for (int g = 0; g < 8; ++g) t += part[g][threadIdx.x];
        db[c] += t;
    }
}

extern "C" __global__ void decoder_add_bf16(const bf16* __restrict__ x, bf16* __restrict__ y,
                                            long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = __float2bfloat16_rn(__bfloat162float(y[i]) + __bfloat162float(x[i]));
}

// Block-wide sums of (value, count) over 1024 threads; result valid in every thread.
__device__ __forceinline__ void block_sum2(float& v, float& c) {
    __shared__ float sv[32], sc[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    v = warp_sum(v);
    c = warp_sum(c);
    if (lane == 0) { sv[w] = v; sc[w] = c; }
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? sv[lane] : 0.0f;
    c = lane < nw ? sc[lane] : 0.0f;
    v = warp_sum(v);
    c = warp_sum(c);
}

extern "C" __global__ void decoder_nll_fwd(const float* __restrict__ lp, const u32* __restrict__ tg,
                                           int n, float* __restrict__ loss) {
    float s = 0.0f, c = 0.0f;
    for (long long i = threadIdx.x; i < n; i += blockDim.x)
        if (tg[i] != 0xffffffffu) { s += lp[i]; c += 1.0f; }
    block_sum2(s, c);
    if (threadIdx.x == 0) loss[0] = c > 0.0f ? -s / c : 0.0f;
}

extern "C" __global__ void decoder_nll_bwd(const u32* __restrict__ tg, int n,
                                           const float* __restrict__ dloss, float* __restrict__ dlp) {
    float z = 0.0f, c = 0.0f;
    for (long long i = threadIdx.x; i < n; i += blockDim.x)
        if (tg[i] != 0xffffffffu) c += 1.0f;
    block_sum2(z, c);
    if (c == 0.0f) return;
    const float g = -dloss[0] / c;
    for (long long i = threadIdx.x; i < n; i += blockDim.x)
        if (tg[i] != 0xffffffffu) dlp[i] += g;
}
