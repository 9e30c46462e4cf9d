// adamw.cu: the optimizer step (CPU references in src/kernels/adamw.rs).
// Defines:
//   adamw_step           fused AdamW over a flat fp32 vector: fp32 master weights p, moments m, v
//                        updated in place from g * scale (scale = the clip factor, read from device
//                        memory: no host round trip), decoupled weight decay, bias correction;
//                        optional bf16 copy of the new p. A non-finite scale skips the step.
//   adamw_multi          the same update over many parameters in one launch (multi-tensor): a table
//                        of segments (master p, gradient, m, v, compute copy, length, decay on/off,
//                        the copy's type: none, fp32 or bf16) and a table of fixed-size chunks,
//                        one block per chunk; copy_only writes the compute copies from p only
//                        (after a restore) and changes nothing else
//   adamw_norm_partial   global gradient norm, pass 1: per-block sum of g^2 in double over a list
//                        of fp32 buffers (their virtual concatenation, split into fixed chunks)
//   adamw_norm_finalize  pass 2, one block: sums the partials in a fixed order -> norm and the
//                        clip scale min(1, max_norm / (norm + 1e-6)), or NaN when the norm is not
//                        finite (the step must be skipped; adamw_step then does nothing)
// Both reductions are deterministic: the grid depends on the total length only, fixed-order
// trees, no atomics. The AdamW arithmetic uses explicit _rn intrinsics (no FMA contraction), in
// the order of the CPU reference and of torch.optim.AdamW, so it matches the f32 CPU reference
// bit for bit.
#include <cuda_bf16.h>
#include "common.cuh"

#define ADAMW_BLOCK 256
#define NORM_BLOCK 256

// torch.optim.AdamW (single tensor): p *= 1 - lr*wd; m.lerp_(g, 1 - b1);
// v = v*b2 + (1 - b2)*g*g; p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps).
__device__ __forceinline__ void adamw_one(float& p, float g, float& m, float& v, float scale,
                                          float b1c, float b2, float b2c, float eps, float decay,
                                          float step_size, float bc2_sqrt) {
    const float gs = __fmul_rn(g, scale);
    m = __fadd_rn(m, __fmul_rn(b1c, __fsub_rn(gs, m)));
    v = __fadd_rn(__fmul_rn(b2, v), __fmul_rn(__fmul_rn(b2c, gs), gs));
    const float pd = __fmul_rn(p, decay);
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2_sqrt), eps);
    p = __fsub_rn(pd, __fmul_rn(step_size, __fdiv_rn(m, denom)));
}

__device__ __forceinline__ u32 adamw_bf16(float f) {
    return (u32)__bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// p, g, m, v: [n] fp32; pb: [n] bf16 bits or null. vec != 0: p, g, m, v are 16-byte aligned and
// pb (if any) 8-byte aligned, so groups of 4 use vector accesses. scale: device scalar or null (1).
// Grid-stride over groups of 4 elements.
extern "C" __global__ void __launch_bounds__(ADAMW_BLOCK)
adamw_step(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
           float* __restrict__ v, unsigned short* __restrict__ pb, long long n, int vec, float b1c,
           float b2, float b2c, float eps, float decay, float step_size, float bc2_sqrt,
           const float* __restrict__ scale_ptr) {
    float scale = 1.f;
    if (scale_ptr != nullptr) {
        scale = *scale_ptr;
        if (!isfinite(scale)) return;  // non-finite gradient norm: never update with NaN
    }
    const long long groups = (n + 3) >> 2;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x; q < groups; q += stride) {
        const long long i0 = q << 2;
        if (vec && i0 + 3 < n) {
            float4 pp = reinterpret_cast<const float4*>(p)[q];
            const float4 gg = reinterpret_cast<const float4*>(g)[q];
            float4 mm = reinterpret_cast<const float4*>(m)[q];
            float4 vv = reinterpret_cast<const float4*>(v)[q];
            adamw_one(pp.x, gg.x, mm.x, vv.x, scale, b1c, b2, b2c, eps, decay, step_size, bc2_sqrt);
            adamw_one(pp.y, gg.y, mm.y, vv.y, scale, b1c, b2, b2c, eps, decay, step_size, bc2_sqrt);
            adamw_one(pp.z, gg.z, mm.z, vv.z, scale, b1c, b2, b2c, eps, decay, step_size, bc2_sqrt);
            adamw_one(pp.w, gg.w, mm.w, vv.w, scale, b1c, b2, b2c, eps, decay, step_size, bc2_sqrt);
            reinterpret_cast<float4*>(p)[q] = pp;
            reinterpret_cast<float4*>(m)[q] = mm;
            reinterpret_cast<float4*>(v)[q] = vv;
            if (pb != nullptr) {
                uint2 o;
                o.x = adamw_bf16(pp.x) | (adamw_bf16(pp.y) << 16);
                o.y = adamw_bf16(pp.z) | (adamw_bf16(pp.w) << 16);
                reinterpret_cast<uint2*>(pb)[q] = o;
            }
        } else {
            const long long i1 = (i0 + 4 < n) ? i0 + 4 : n;
            for (long long i = i0; i < i1; ++i) {
                float pi = p[i], mi = m[i], vi = v[i];
                adamw_one(pi, g[i], mi, vi, scale, b1c, b2, b2c, eps, decay, step_size, bc2_sqrt);
                p[i] = pi;
                m[i] = mi;
                v[i] = vi;
                if (pb != nullptr) pb[i] = (unsigned short)adamw_bf16(pi);
            }
        }
    }
}

// One contiguous run of one parameter with one weight decay (64 bytes; AdamwSeg in
// src/kernels/adamw.rs builds it as 8 u64 words in this order).
struct AdamwSeg {
    float* p;             // fp32 master weights
    const float* g;       // fp32 gradient
    float* m;             // first moment
    float* v;             // second moment
    void* out;            // compute copy (out_kind 1: fp32, 2: bf16 bits) or null (out_kind 0)
    long long n;          // elements
    int out_kind;
    int decay_on;         // 0: no weight decay (factor 1), else the step's decay factor
    int vec;              // p, g, m, v 16-byte aligned and out aligned to 4 of its elements
    int pad;
};

// Block b updates elements [start, min(start + chunk_len, n)) of segment seg, where
// (seg, start) = chunks[2b], chunks[2b + 1] and start is a multiple of 4. scale: the device clip
// scale (element 1 of the grad-norm's clip buffer); a non-finite one skips the update.
extern "C" __global__ void __launch_bounds__(ADAMW_BLOCK)
adamw_multi(const AdamwSeg* __restrict__ segs, const long long* __restrict__ chunks,
            long long chunk_len, float b1c, float b2, float b2c, float eps, float decay,
            float step_size, float bc2_sqrt, const float* __restrict__ scale_ptr, int copy_only) {
    float scale = 1.f;
    if (!copy_only) {
        scale = *scale_ptr;
        if (!isfinite(scale)) return;  // non-finite gradient norm: nothing changes
    }
    const AdamwSeg s = segs[chunks[2 * (long long)blockIdx.x]];
    const long long c0 = chunks[2 * (long long)blockIdx.x + 1];
    const long long c1 = (c0 + chunk_len < s.n) ? c0 + chunk_len : s.n;
    const float dec = s.decay_on ? decay : 1.f;
    float* __restrict__ outf = reinterpret_cast<float*>(s.out);
    unsigned short* __restrict__ outb = reinterpret_cast<unsigned short*>(s.out);
    for (long long i0 = c0 + 4 * (long long)threadIdx.x; i0 < c1; i0 += 4 * ADAMW_BLOCK) {
        if (s.vec && i0 + 3 < c1) {
            const long long q = i0 >> 2;
            float4 pp = reinterpret_cast<const float4*>(s.p)[q];
            if (!copy_only) {
                const float4 gg = reinterpret_cast<const float4*>(s.g)[q];
                float4 mm = reinterpret_cast<const float4*>(s.m)[q];
                float4 vv = reinterpret_cast<const float4*>(s.v)[q];
                adamw_one(pp.x, gg.x, mm.x, vv.x, scale, b1c, b2, b2c, eps, dec, step_size, bc2_sqrt);
                adamw_one(pp.y, gg.y, mm.y, vv.y, scale, b1c, b2, b2c, eps, dec, step_size, bc2_sqrt);
                adamw_one(pp.z, gg.z, mm.z, vv.z, scale, b1c, b2, b2c, eps, dec, step_size, bc2_sqrt);
                adamw_one(pp.w, gg.w, mm.w, vv.w, scale, b1c, b2, b2c, eps, dec, step_size, bc2_sqrt);
                reinterpret_cast<float4*>(s.p)[q] = pp;
                reinterpret_cast<float4*>(s.m)[q] = mm;
                reinterpret_cast<float4*>(s.v)[q] = vv;
            }
            if (s.out_kind == 1) {
                reinterpret_cast<float4*>(outf)[q] = pp;
            } else if (s.out_kind == 2) {
                uint2 o;
                o.x = adamw_bf16(pp.x) | (adamw_bf16(pp.y) << 16);
                o.y = adamw_bf16(pp.z) | (adamw_bf16(pp.w) << 16);
                reinterpret_cast<uint2*>(outb)[q] = o;
            }
        } else {
            const long long i1 = (i0 + 4 < c1) ? i0 + 4 : c1;
            for (long long i = i0; i < i1; ++i) {
                float pi = s.p[i];
                if (!copy_only) {
                    float mi = s.m[i], vi = s.v[i];
                    adamw_one(pi, s.g[i], mi, vi, scale, b1c, b2, b2c, eps, dec, step_size,
                              bc2_sqrt);
                    s.p[i] = pi;
                    s.m[i] = mi;
                    s.v[i] = vi;
                }
                if (s.out_kind == 1) outf[i] = pi;
                else if (s.out_kind == 2) outb[i] = (unsigned short)adamw_bf16(pi);
            }
        }
    }
}

// Sum of the block's doubles in a fixed order; valid in thread 0. blockDim.x == NORM_BLOCK.
__device__ __forceinline__ double adamw_block_sum(double x) {
    __shared__ double s_w[NORM_BLOCK / 32];
    x = warp_sum_d(x);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) s_w[warp] = x;
    __syncthreads();
    double r = 0.0;
    if (threadIdx.x == 0) {
        for (int i = 0; i < NORM_BLOCK / 32; ++i) r += s_w[i];
    }
    return r;
}

// table: u64[2*nb + 1]: [0, nb) buffer addresses (fp32), [nb, 2*nb] prefix offsets (off[0] = 0,
// off[nb] = total; an empty buffer has off[i] == off[i+1]). Block b sums g^2 over the global
// range [b*chunk, min(total, (b+1)*chunk)) into partials[b].
extern "C" __global__ void __launch_bounds__(NORM_BLOCK)
adamw_norm_partial(const unsigned long long* __restrict__ table, int nb, long long total,
                   long long chunk, double* __restrict__ partials) {
    const unsigned long long* off = table + nb;
    const long long c0 = (long long)blockIdx.x * chunk;
    const long long c1 = (c0 + chunk < total) ? c0 + chunk : total;
    double acc = 0.0;
    if (c0 < c1) {
        // The buffer holding c0: the largest i with off[i] <= c0 (skips empty buffers).
        int lo = 0, hi = nb - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if ((long long)off[mid] <= c0) lo = mid;
            else hi = mid - 1;
        }
        int b = lo;
        long long pos = c0;
        while (pos < c1) {
            const long long bstart = (long long)off[b];
            const long long bend_all = (long long)off[b + 1];
            const long long bend = bend_all < c1 ? bend_all : c1;
            const float* src = reinterpret_cast<const float*>(table[b]);
            long long k = pos - bstart + threadIdx.x;  // index inside buffer b
            const long long kend = bend - bstart;
            // Four independent loads in flight per thread.
            for (; k + 3 * NORM_BLOCK < kend; k += 4 * NORM_BLOCK) {
                const double a0 = src[k], a1 = src[k + NORM_BLOCK];
                const double a2 = src[k + 2 * NORM_BLOCK], a3 = src[k + 3 * NORM_BLOCK];
                acc += a0 * a0;
                acc += a1 * a1;
                acc += a2 * a2;
                acc += a3 * a3;
            }
            for (; k < kend; k += NORM_BLOCK) {
                const double a = src[k];
                acc += a * a;
            }
            pos = bend;
            ++b;
        }
    }
    const double s = adamw_block_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// One block. clip[0] = norm (fp32), clip[1] = min(1, max_norm / (norm + 1e-6)) or NaN when the
// norm is not finite; norm_out[0] = norm in double.
extern "C" __global__ void __launch_bounds__(NORM_BLOCK)
adamw_norm_finalize(const double* __restrict__ partials, int G, float max_norm,
                    float* __restrict__ clip, double* __restrict__ norm_out) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < G; i += NORM_BLOCK) acc += partials[i];
    const double s = adamw_block_sum(acc);
    if (threadIdx.x == 0) {
        const double norm = sqrt(s);
        norm_out[0] = norm;
        clip[0] = (float)norm;
        clip[1] = isfinite(norm) ? (float)fmin(1.0, (double)max_norm / (norm + 1e-6))
                                 : __int_as_float(0x7fc00000);
    }
}
