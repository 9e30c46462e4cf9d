// step.cu: the glue of a GPU-resident training step between the model graphs (issue 11 item 2):
// rollout bookkeeping, readout scatter, the flow critic's target fields, minibatch inputs and
// the step's metric sums. CPU references: the host code of src/train/{rollout,trainer}.rs that
// the CPU backend runs (src/kernels/step.rs names each).
// Defines:
//   step_batch_mask      mask[r][t] = 1 on row r's scored response positions, else 0
//   step_token_rewards   −β·kl on the mask (kl optional) plus the row's reward at its last token
//   step_row_value       per output row j (a gathered rollout row): mask·a_j (mode 0) or
//                        mask / a_j (mode 1, token weights; 0 where a_j is 0), 0 for padding rows
//   step_mask_select     x[i] = mask[i / k] != 0 ? x[i] : 0
//   step_readout_finish  clamp the readout samples, scatter them to their tokens, per-token std
//   step_next_rows       the successor token of each listed token (itself at a response's end)
//   step_uniform_normal  the host Stream's draws: tau = uniform, then noise = Φ⁻¹(uniform)
//   step_flow_fields     the flow critic's per-sample target fields at the listed tokens
//   step_pool_first      the prompt-pooled risk targets at each row's first response token
//   step_flow_rows       a micro-batch's token rows, token weights and risk-row weights
//   step_sum             one block: out = Σ_i x[i·stride + col]·(w ? w[i] : 1) in double
//   step_token_list      the response tokens' global positions r·S + t (f32), row-major: the
//                        mask's set positions in order, from the rows' lengths and offsets
//   step_segments        out = the concatenation of segments of src (a micro-batch's response
//                        tokens from the step's token list, row by row)
//   step_seq_rows        a decoder graph's batch (ids, next-token targets, lengths) gathered
//                        from the step's token rows, bound once on the device
// No atomics: every output element has one writer, and sums run in one block in a fixed order.
#include "common.cuh"

#define STEP_BLOCK 256

__device__ __forceinline__ long long step_tid() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long step_stride() { return (long long)gridDim.x * blockDim.x; }

extern "C" __global__ void step_batch_mask(const int* __restrict__ plen, const int* __restrict__ rlen, int rows,
                                           int S, float* __restrict__ mask) {
    const long long n = (long long)rows * S;
    for (long long i = step_tid(); i < n; i += step_stride()) {
        const int r = (int)(i / S), t = (int)(i % S);
        const int t0 = plen[r] - 1;
        mask[i] = (t >= t0 && t < t0 + rlen[r]) ? 1.f : 0.f;
    }
}

// out[i] = mask && kl ? (float)(−β·kl[i]) : 0, then at row r's last token (when it has one)
// out = (float)((double)out + R[r]): the host's f64 arithmetic, rounded where it rounds.
extern "C" __global__ void step_token_rewards(const float* __restrict__ mask, const float* __restrict__ kl,
                                              double beta, const int* __restrict__ plen,
                                              const int* __restrict__ rlen, const double* __restrict__ R,
                                              int rows, int S, float* __restrict__ out) {
    const long long n = (long long)rows * S;
    for (long long i = step_tid(); i < n; i += step_stride()) {
        const int r = (int)(i / S), t = (int)(i % S);
        float o = 0.f;
        if (kl != nullptr && mask[i] != 0.f) o = (float)(-beta * (double)kl[i]);
        if (rlen[r] > 0 && t == plen[r] + rlen[r] - 2) o = (float)((double)o + R[r]);
        out[i] = o;
    }
}

// rows[j] (f32 index, −1 = padding) picks the mask row of output row j.
extern "C" __global__ void step_row_value(const float* __restrict__ mask, const float* __restrict__ rows,
                                          const float* __restrict__ a, int m, int S, int mode,
                                          float* __restrict__ out) {
    const long long n = (long long)m * S;
    for (long long i = step_tid(); i < n; i += step_stride()) {
        const int j = (int)(i / S), t = (int)(i % S);
        const long long r = rows != nullptr ? (long long)rows[j] : j;
        float o = 0.f;
        if (r >= 0) {
            const float mk = mask[r * S + t];
            if (mode == 0)
                o = mk != 0.f ? a[j] : 0.f;
            else
                o = a[j] != 0.f ? mk / a[j] : 0.f;
        }
        out[i] = o;
    }
}

extern "C" __global__ void step_mask_select(float* __restrict__ x, const float* __restrict__ mask, long long n,
                                            int k) {
    for (long long i = step_tid(); i < n; i += step_stride())
        if (mask[i / k] == 0.f) x[i] = 0.f;
}

// Row j of z1 ([m][K]) belongs to token idx[j]: z[idx·K + k] = clamp(z1) (NaN stays NaN), and
// std[idx] = the population std of the clamped row (double). z and std are zero elsewhere
// (the caller zeroes them).
extern "C" __global__ void step_readout_finish(const float* __restrict__ z1, const float* __restrict__ idx,
                                               int m, int K, int clip, float lo, float hi,
                                               float* __restrict__ z, float* __restrict__ sd) {
    for (long long j = step_tid(); j < m; j += step_stride()) {
        const long long i = (long long)idx[j];
        double sum = 0.0;
        for (int k = 0; k < K; ++k) {
            float v = z1[j * K + k];
            if (clip) v = v < lo ? lo : (v > hi ? hi : v);
            z[i * K + k] = v;
            sum += (double)v;
        }
        const double mean = sum / (double)K;
        double var = 0.0;
        for (int k = 0; k < K; ++k) {
            const double d = (double)z[i * K + k] - mean;
            var += d * d;
        }
        sd[i] = (float)sqrt(var / (double)K);
    }
}

// The next token continues the response: same row, inside the mask.
__device__ __forceinline__ bool step_cont(long long i, const float* __restrict__ mask, long long n, int S) {
    return (i + 1) % S != 0 && i + 1 < n && mask[i + 1] != 0.f;
}

extern "C" __global__ void step_next_rows(const float* __restrict__ idx, const float* __restrict__ mask, int m,
                                          long long n, int S, float* __restrict__ next) {
    for (long long j = step_tid(); j < m; j += step_stride()) {
        const long long i = (long long)idx[j];
        next[j] = (float)(step_cont(i, mask, n, S) ? i + 1 : i);
    }
}

// Stream (seed, counter): draw c is uniform_open(seed, counter + c), c = 1, 2, ... The host draws
// n uniforms (tau) and then n normals (noise = Φ⁻¹ of the next n uniforms).
extern "C" __global__ void step_uniform_normal(u64 seed, u64 counter, long long n, float* __restrict__ tau,
                                               float* __restrict__ noise) {
    for (long long i = step_tid(); i < n; i += step_stride()) {
        tau[i] = (float)uniform_open(seed, counter + 1 + (u64)i);
        noise[i] = (float)dfpo_inv_normal_cdf(uniform_open(seed, counter + 1 + (u64)n + (u64)i));
    }
}

// The field order of rollout.rs's FlowTargets::fields (10 per-sample fields of [N][K]).
struct StepFlowFields {
    float *z_read, *tau_read, *z_b, *tau_b, *z_d, *tau_d, *eps, *target, *vel_b, *vel_d;
};

// One thread per (listed token j, sample kk), src = j·K + kk, dst = idx[j]·K + kk (see
// rollout.rs flow_targets). w_unc and dmask ([N]) are written by the kk = 0 thread.
extern "C" __global__ void step_flow_fields(StepFlowFields f, float* __restrict__ w_unc, float* __restrict__ dmask,
                                            const float* __restrict__ idx, int m, int K, long long n, int S,
                                            const float* __restrict__ mask, const float* __restrict__ tau,
                                            const float* __restrict__ noise, const float* __restrict__ zp,
                                            const float* __restrict__ vold, const float* __restrict__ sd,
                                            const float* __restrict__ ret, const float* __restrict__ rewards,
                                            const float* __restrict__ z, float gamma, float kappa, int direction,
                                            int anchor_lambda) {
    const long long total = (long long)m * K;
    for (long long src = step_tid(); src < total; src += step_stride()) {
        const long long j = src / K;
        const int kk = (int)(src % K);
        const long long i = (long long)idx[j];
        const long long dst = i * K + kk;
        const bool c = step_cont(i, mask, n, S);
        if (kk == 0) {
            const float s = fmaxf(sd[i], 1e-6f);
            const float conf = 1.0f / (1.0f + expf(kappa / s)) + 0.5f;
            w_unc[i] = direction == 1 ? conf : (direction == -1 ? 1.5f - conf : 1.0f);
            dmask[i] = c ? 1.f : 0.f;
        }
        const float e = (float)dfpo_inv_normal_cdf(((double)kk + 0.5) / (double)K);
        const float ta = tau[src], eb = noise[src];
        float g;
        if (anchor_lambda)
            g = ret[dst];
        else if (c)
            g = __fadd_rn(rewards[i], __fmul_rn(gamma, z[(i + 1) * K + kk]));
        else
            g = rewards[i];
        f.eps[dst] = e;
        f.z_read[dst] = e;
        f.tau_read[dst] = 0.f;
        f.target[dst] = ret[dst];
        f.z_b[dst] = __fadd_rn(__fmul_rn(ta, g), __fmul_rn(__fsub_rn(1.0f, ta), eb));
        f.tau_b[dst] = ta;
        f.vel_b[dst] = g - eb;
        f.tau_d[dst] = ta;
        if (c) {
            f.z_d[dst] = __fadd_rn(rewards[i], __fmul_rn(gamma, zp[src]));
            f.vel_d[dst] = vold[src];
        } else {
            f.z_d[dst] = rewards[i];
            f.vel_d[dst] = 0.f;
        }
    }
}

// Rust's f32::total_cmp order as a signed integer key.
__device__ __forceinline__ int step_total_key(float v) {
    int b = __float_as_int(v);
    return b ^ (int)(((unsigned)(b >> 31)) >> 1);
}

// One block per group g: its rows' first-token positions are first[start[g] .. start[g+1]]
// (token indices into target's N rows of K). Their targets are pooled (P = rows·K values),
// ranked in total order (ties by pool position: a stable sort), and every listed row's K
// targets become q_j = sorted[min(floor((j + ½)/K·P), P − 1)]. scratch holds P floats per group
// at offset start[g]·K.
extern "C" __global__ void __launch_bounds__(STEP_BLOCK)
step_pool_first(float* __restrict__ target, const int* __restrict__ first, const int* __restrict__ start,
                int K, float* __restrict__ scratch) {
    const int g = blockIdx.x;
    const int r0 = start[g], nr = start[g + 1] - r0;
    const long long P = (long long)nr * K;
    if (P == 0) return;
    float* sorted = scratch + (long long)r0 * K;
    for (long long e = threadIdx.x; e < P; e += blockDim.x) {
        const float v = target[(long long)first[r0 + e / K] * K + e % K];
        const int key = step_total_key(v);
        long long rank = 0;
        for (long long f = 0; f < P; ++f) {
            const int kf = step_total_key(target[(long long)first[r0 + f / K] * K + f % K]);
            rank += (kf < key || (kf == key && f < e)) ? 1 : 0;
        }
        sorted[rank] = v;
    }
    __syncthreads();
    for (long long e = threadIdx.x; e < P; e += blockDim.x) {
        const int j = (int)(e % K);
        long long q = (long long)(((double)j + 0.5) / (double)K * (double)P);
        if (q > P - 1) q = P - 1;
        target[(long long)first[r0 + e / K] * K + j] = sorted[q];
    }
}

// A micro-batch of the flow critic: global[i] (f32 rollout token index, i < m) becomes the
// graph row rowpos[g / S]·S + g % S; rows[i] = −1, tok_w[i] = risk_w[i] = 0 for m <= i < cap.
// tok_w = 1 / total on listed tokens; risk_w = tok_w (prompt == 0), or 1 / nf at a row's first
// response token (g % S + 1 == plen[g / S]) and 0 elsewhere (prompt == 1).
extern "C" __global__ void step_flow_rows(const float* __restrict__ global, const int* __restrict__ rowpos,
                                          const int* __restrict__ plen, int m, int cap, int S, float total,
                                          float nf, int prompt, float* __restrict__ rows, float* __restrict__ tok_w,
                                          float* __restrict__ risk_w) {
    for (long long i = step_tid(); i < cap; i += step_stride()) {
        if (i >= m) {
            rows[i] = -1.f;
            tok_w[i] = 0.f;
            risk_w[i] = 0.f;
            continue;
        }
        const long long g = (long long)global[i];
        const long long r = g / S, t = g % S;
        rows[i] = (float)((long long)rowpos[r] * S + t);
        const float w = 1.0f / total;
        tok_w[i] = w;
        risk_w[i] = prompt ? (t + 1 == plen[r] ? 1.0f / nf : 0.f) : w;
    }
}

// out[0] = Σ_{i<n} x[i·stride + col]·(w ? w[i] : 1): each product in float (the host's f32
// product), summed in double; one block of STEP_BLOCK threads, fixed order.
extern "C" __global__ void __launch_bounds__(STEP_BLOCK)
step_sum(const float* __restrict__ x, const float* __restrict__ w, long long n, int stride, int col,
         double* __restrict__ out) {
    __shared__ double part[STEP_BLOCK / DFPO_WARP];
    double acc = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = x[i * stride + col];
        acc += w != nullptr ? (double)(v * w[i]) : (double)v;
    }
    acc = warp_sum_d(acc);
    const int lane = threadIdx.x % DFPO_WARP, warp = threadIdx.x / DFPO_WARP;
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        double v = lane < STEP_BLOCK / DFPO_WARP ? part[lane] : 0.0;
        v = warp_sum_d(v);
        if (lane == 0) out[0] = v;
    }
}

// list[off[r] + k] = (float)(r·S + plen[r] − 1 + k) for k < rlen[r]: the positions where
// step_batch_mask sets the mask, in index order (off = the exclusive prefix sum of rlen, from
// the host). One writer per entry.
extern "C" __global__ void step_token_list(const int* __restrict__ plen, const int* __restrict__ rlen,
                                           const int* __restrict__ off, int rows, int S,
                                           float* __restrict__ list) {
    const long long n = (long long)rows * S;
    for (long long i = step_tid(); i < n; i += step_stride()) {
        const int r = (int)(i / S), t = (int)(i % S);
        const int t0 = plen[r] - 1;
        if (t >= t0 && t < t0 + rlen[r]) list[off[r] + (t - t0)] = (float)i;
    }
}

// out[dst[i] + k] = src[so[i] + k] for k < len[i], seg = [so | dst | len] (nseg i32 each; the
// host sets disjoint destinations). One block per segment, grid-stride over segments.
extern "C" __global__ void __launch_bounds__(STEP_BLOCK)
step_segments(const float* __restrict__ src, const int* __restrict__ seg, int nseg, float* __restrict__ out) {
    for (int i = blockIdx.x; i < nseg; i += gridDim.x) {
        const int so = seg[i], dst = seg[nseg + i], len = seg[2 * nseg + i];
        for (int k = threadIdx.x; k < len; k += blockDim.x) out[dst + k] = src[so + k];
    }
}

// A decoder graph's batch from the step's token rows (DecoderGraph::set_batch_masked's
// arithmetic, src/model/decoder.rs). The step's rows are packed: row r's tokens at
// src[off[r] .. off[r] + len[r]], meta = [off | len | skip], src_rows each. Graph row j takes
// step row r = rows ? rows[j] : (j < m ? row0 + j : -1), -1 = an empty row: ids = the row's
// tokens then pad; targets[t] = ids[t+1] for max(skip-1, 0) <= t < len-1 (skip = 0 without
// use_skip), else ignore; lens[j] = len. The host checks len <= S; each output element has one writer.
extern "C" __global__ void step_seq_rows(const unsigned* __restrict__ src, const int* __restrict__ meta,
                                         int src_rows, const int* __restrict__ rows, int row0, int m, int B,
                                         int S, int use_skip, unsigned pad, unsigned ignore, unsigned* __restrict__ ids,
                                         unsigned* __restrict__ targets, unsigned* __restrict__ lens) {
    const long long n = (long long)B * S;
    for (long long i = step_tid(); i < n; i += step_stride()) {
        const int j = (int)(i / S), t = (int)(i % S);
        int r = rows != nullptr ? rows[j] : (j < m ? row0 + j : -1);
        if (r >= src_rows) r = -1;  // the host checks; never read out of bounds
        const int len = r >= 0 ? min(meta[src_rows + r], S) : 0;
        const int t0 = r >= 0 && use_skip ? max(meta[2 * src_rows + r] - 1, 0) : 0;
        const unsigned* q = src + (r >= 0 ? meta[r] : 0);
        ids[i] = t < len ? q[t] : pad;
        targets[i] = (t >= t0 && t + 1 < len) ? q[t + 1] : ignore;
        if (t == 0) lens[j] = (unsigned)len;
    }
}
