// decoder.cu: small glue kernels of the decoder's graph ops (src/model/ops.rs; CPU paths there).
// Defines:
//   decoder_bias_fill  y[r][c] = b[c]               (bf16; a cuBLAS GEMM then adds x·Wᵀ, beta = 1)
//   decoder_bias_grad_partial   db's row-chunk partials: ws[ch][c] = Σ_{r in chunk ch} dy[r][c]
//   decoder_bias_grad_finalize  db[c] += Σ_ch ws[ch][c], chunks in order (dy bf16, db fp32;
//                      fixed summation order, deterministic; the rows split so that a narrow
//                      bias such as the k/v biases still fills the card)
//   decoder_add_bf16   y[i] = bf16(y[i] + x[i])     (gradient accumulation of bf16 buffers)
//   decoder_cast_bf16_f32   y[i] = float(x[i])      (the flow critic's f32 conditioning)
//   decoder_acc_f32_bf16    dx[i] = bf16(float(dx[i]) + dy[i])   (its backward)
//   decoder_gather_rows     y[i][c] = x[rows[i]][c], 0 for rows[i] < 0 (f32; rows as f32)
//   decoder_scatter_rows    dx[rows[i]][c] += dy[i][c]  (its backward; rows must be distinct,
//                      so every element has one writer: deterministic, no atomics)
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

// Block (32, 8), grid (ceil(m / 32), chunks): block (bx, ch) sums rows [ch·rpc, min(n, (ch+1)·rpc))
// of its 32 columns in a fixed order into ws[ch][c].
extern "C" __global__ void decoder_bias_grad_partial(const bf16* __restrict__ dy,
                                                     float* __restrict__ ws, int n, int m, int rpc) {
    __shared__ float part[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const long long r0 = (long long)blockIdx.y * rpc;
    const long long r1 = (r0 + rpc < n) ? r0 + rpc : n;
    float s = 0.0f;
    if (c < m)
        for (long long r = r0 + threadIdx.y; r < r1; r += 8) s += __bfloat162float(dy[r * m + c]);
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < m) {
        float t = 0.0f;
#pragma unroll
        for (int g = 0; g < 8; ++g) t += part[g][threadIdx.x];
        ws[(long long)blockIdx.y * m + c] = t;
    }
}

// One thread per column: db[c] += Σ_ch ws[ch][c], chunks in order.
extern "C" __global__ void decoder_bias_grad_finalize(const float* __restrict__ ws, int chunks,
                                                      int m, float* __restrict__ db) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= m) return;
    float t = 0.0f;
    for (int ch = 0; ch < chunks; ++ch) t += ws[(long long)ch * m + c];
    db[c] += t;
}

extern "C" __global__ void decoder_add_bf16(const bf16* __restrict__ x, bf16* __restrict__ y,
                                            long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = __float2bfloat16_rn(__bfloat162float(y[i]) + __bfloat162float(x[i]));
}

extern "C" __global__ void decoder_cast_bf16_f32(const bf16* __restrict__ x, float* __restrict__ y,
                                                 long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = __bfloat162float(x[i]);
}

extern "C" __global__ void decoder_acc_f32_bf16(const float* __restrict__ dy, bf16* __restrict__ dx,
                                                long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dx[i] = __float2bfloat16_rn(__bfloat162float(dx[i]) + dy[i]);
}

// The row of output row i: rows[i] as an index in [0, n), or -1 (none; also for anything out of
// range, which the host rejects before it writes the list).
__device__ __forceinline__ long long decoder_row(const float* __restrict__ rows, long long i, int n) {
    const float r = rows[i];
    return (r >= 0.f && r < (float)n) ? (long long)r : -1;
}

extern "C" __global__ void decoder_gather_rows(const float* __restrict__ x,
                                               const float* __restrict__ rows,
                                               float* __restrict__ y, int n, int m, int w) {
    const long long total = (long long)m * w;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const long long r = decoder_row(rows, e / w, n);
        y[e] = r >= 0 ? x[r * w + e % w] : 0.f;
    }
}

extern "C" __global__ void decoder_scatter_rows(const float* __restrict__ dy,
                                                const float* __restrict__ rows,
                                                float* __restrict__ dx, int n, int m, int w) {
    const long long total = (long long)m * w;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const long long r = decoder_row(rows, e / w, n);
        if (r >= 0) dx[r * w + e % w] += dy[e];
    }
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
