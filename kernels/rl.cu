// rl.cu: the RL-side kernels of a PPO/DFPO step (CPU references in src/kernels/rl.rs).
// Defines:
//   rl_dist_gae        distributional GAE over values [B][T][K]: advantages and returns per sample
//   rl_dist_gae_mean   mean over the K samples of each (b, t): the scalar PPO advantage
//   rl_whiten_partial  per-block masked (count, mean, M2) of x in double (shifted sums, Chan merge)
//   rl_whiten_finalize one block merges the partials: mean, unbiased std, 1/sqrt(var + 1e-8)
//   rl_whiten_apply    out = (x - mean) * inv_std on valid tokens, 0 elsewhere
//   rl_ppo_loss        clipped PPO surrogate per token (loss, unscaled dL/dlogp) + block sums
//   rl_ppo_finalize    one block sums the partials: token means and the 1/n_valid grad scale
//   rl_ppo_scale_grad  grad *= 1/n_valid (gradient of the token-mean loss)
//   rl_kl_penalty      per-token KL estimate (k1 or k3) against a reference policy, and d/dlogp
// Every reduction is deterministic: a fixed grid for a given size, fixed-order trees, no atomics.
// A token is valid where its mask is non-zero; padded inputs are never used in arithmetic
// (selects, not multiplies by 0), so garbage or NaN in padding cannot leak into the results.
#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// Distributional GAE.
//
// Thread layout: blockDim = (32, S). Lane x of every warp owns the (b, k) pair
// p = blockIdx.x * 32 + x (flattened b-major, so a warp reads 32 consecutive k of one b, or
// the tail of one b and the head of the next when K is not a multiple of 32): the loads and
// stores of values[b][t][k] are coalesced. Warp y owns the y-th of S contiguous time segments, so
// one (b, k) chain is scanned by S threads at once (B*K alone is too few threads to hide memory
// latency). The linear recurrence A_t = delta_t + c_t*gl*A_{t+1} is split the usual way:
//   pass 1: each segment scans with a zero carry-in, giving A_loc (its first advantage) and P
//           (the product of its coefficients, so A_first = A_loc + P * A_after_segment);
//   carry:  segments are chained through shared memory, last to first;
//   pass 2: each segment rescans from its true carry-in and writes A and G (reloads hit L1/L2).
// Within a segment, time is walked backwards in register tiles of GAE_TILE steps whose loads are
// all issued before any arithmetic, so each tile costs one memory latency, not GAE_TILE.
// ---------------------------------------------------------------------------------------------

#define GAE_MAX_SEG 8
#define GAE_TILE 16

// Scans [s0, e] backwards. On entry a = A_{e+1} (the carry-in), prod = 1; on exit a = A_{s0}
// and prod = the coefficient of the carry-in in A_{s0}. WRITE stores adv and ret.
template <bool WRITE>
__device__ __forceinline__ void gae_scan(const float* __restrict__ vp, const float* __restrict__ rp,
                                         const float* __restrict__ mp, float* __restrict__ ap,
                                         float* __restrict__ gp, long long K, int s0, int e, int T,
                                         float gamma, float gl, float& a, float& prod) {
    // The successor of position e: its value sample and whether it is valid (continue_e).
    float z_next = 0.f;
    bool m_next = false;
    if (e + 1 < T) {
        m_next = mp[e + 1] != 0.f;
        z_next = vp[(long long)(e + 1) * K];
    }
    for (int top = e; top >= s0; top -= GAE_TILE) {
        float zt[GAE_TILE], rt[GAE_TILE];
        bool mt[GAE_TILE];
#pragma unroll
        for (int i = 0; i < GAE_TILE; ++i) {
            const int t = top - i;
            if (t >= s0) {
                zt[i] = vp[(long long)t * K];
                rt[i] = rp[t];
                mt[i] = mp[t] != 0.f;
            } else {
                zt[i] = 0.f;
                rt[i] = 0.f;
                mt[i] = false;
            }
        }
#pragma unroll
        for (int i = 0; i < GAE_TILE; ++i) {
            const int t = top - i;
            if (t >= s0) {
                if (mt[i]) {
                    // continue_t = mask[t+1]: bootstrap and carry only into a valid successor.
                    const float boot = m_next ? gamma * z_next : 0.f;
                    const float delta = rt[i] + boot - zt[i];
                    a = m_next ? delta + gl * a : delta;
                    prod = m_next ? prod * gl : 0.f;
                } else {
                    a = 0.f;
                    prod = 0.f;
                }
                if (WRITE) {
                    ap[(long long)t * K] = a;
                    gp[(long long)t * K] = mt[i] ? zt[i] + a : 0.f;
                }
                z_next = zt[i];
                m_next = mt[i];
            }
        }
    }
}

// values, adv, ret: [B][T][K]; rewards, mask: [B][T]. blockDim = (32, S), S <= GAE_MAX_SEG;
// gridDim.x = ceil(B*K / 32).
extern "C" __global__ void __launch_bounds__(32 * GAE_MAX_SEG)
rl_dist_gae(const float* __restrict__ values, const float* __restrict__ rewards,
            const float* __restrict__ mask, float* __restrict__ adv, float* __restrict__ ret,
            int B, int T, int K, float gamma, float lambda) {
    __shared__ float s_aloc[GAE_MAX_SEG][32];
    __shared__ float s_prod[GAE_MAX_SEG][32];

    const int lane = threadIdx.x;
    const int seg = threadIdx.y;
    const int S = blockDim.y;
    const long long p = (long long)blockIdx.x * 32 + lane;
    const bool active = p < (long long)B * K;
    const int b = active ? (int)(p / K) : 0;
    const int k = active ? (int)(p % K) : 0;

    const int seg_len = (T + S - 1) / S;
    const int s0 = seg * seg_len;
    const int e = min(T, s0 + seg_len) - 1;  // e < s0: empty segment (identity: 0, 1)

    const long long col = (long long)b * T * K + k;
    const float* vp = values + col;
    const float* rp = rewards + (long long)b * T;
    const float* mp = mask + (long long)b * T;
    const float gl = gamma * lambda;

    float a = 0.f, prod = 1.f;
    if (active) gae_scan<false>(vp, rp, mp, nullptr, nullptr, K, s0, e, T, gamma, gl, a, prod);
    s_aloc[seg][lane] = a;
    s_prod[seg][lane] = prod;
    __syncthreads();

    // Carry-in of this segment = the true advantage at the first step of the next one.
    float carry = 0.f;
    for (int j = S - 1; j > seg; --j) carry = s_aloc[j][lane] + s_prod[j][lane] * carry;

    if (active) {
        float dummy = 1.f;
        gae_scan<true>(vp, rp, mp, adv + col, ret + col, K, s0, e, T, gamma, gl, carry, dummy);
    }
}

// adv: [rows][K], mask, adv_mean: [rows]. One warp per row; blockDim.x a multiple of 32.
extern "C" __global__ void rl_dist_gae_mean(const float* __restrict__ adv,
                                            const float* __restrict__ mask,
                                            float* __restrict__ adv_mean, int rows, int K) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // uniform per warp: the shuffles below stay full-warp
    const float* ap = adv + row * K;
    float s = 0.f;
    for (int k = lane; k < K; k += 32) s += ap[k];
    s = warp_sum(s);
    if (lane == 0) adv_mean[row] = mask[row] != 0.f ? s / (float)K : 0.f;
}

// ---------------------------------------------------------------------------------------------
// Block reductions in double (fixed order: deterministic). blockDim.x must be RL_BLOCK.
// ---------------------------------------------------------------------------------------------

#define RL_BLOCK 256

struct Welford {
    double n, mean, m2;
};

// Chan et al.'s merge of two (count, mean, M2) summaries.
__device__ __forceinline__ Welford welford_merge(Welford a, Welford b) {
    const double n = a.n + b.n;
    if (n == 0.0) return a;
    const double d = b.mean - a.mean;
    const double fb = b.n / n;
    Welford r;
    r.n = n;
    r.mean = a.mean + d * fb;
    r.m2 = a.m2 + b.m2 + d * d * a.n * fb;
    return r;
}

// Merges the summaries of the block's threads; the result is valid in thread 0.
__device__ Welford block_welford(Welford w) {
    __shared__ double s_w[RL_BLOCK / 32][3];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        Welford other;
        other.n = __shfl_down_sync(DFPO_FULL_MASK, w.n, o);
        other.mean = __shfl_down_sync(DFPO_FULL_MASK, w.mean, o);
        other.m2 = __shfl_down_sync(DFPO_FULL_MASK, w.m2, o);
        if (lane + o < 32) w = welford_merge(w, other);
    }
    if (lane == 0) {
        s_w[warp][0] = w.n;
        s_w[warp][1] = w.mean;
        s_w[warp][2] = w.m2;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 1; i < RL_BLOCK / 32; ++i) {
            Welford o;
            o.n = s_w[i][0];
            o.mean = s_w[i][1];
            o.m2 = s_w[i][2];
            w = welford_merge(w, o);
        }
    }
    return w;
}

// Sums NV doubles over the block; the result is valid in thread 0.
template <int NV>
__device__ void block_sum(double (&v)[NV]) {
    __shared__ double s_v[RL_BLOCK / 32][NV];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int j = 0; j < NV; ++j) v[j] = warp_sum_d(v[j]);
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < NV; ++j) s_v[warp][j] = v[j];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 1; i < RL_BLOCK / 32; ++i) {
#pragma unroll
            for (int j = 0; j < NV; ++j) v[j] += s_v[i][j];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Masked whitening (verl masked_whiten: unbiased variance). Workspace ws (doubles):
// [0, 3G): per-block (n, mean, M2); [3G, 3G+4): mean, inv_std, n, var (written by finalize).
// ---------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(RL_BLOCK)
rl_whiten_partial(const float* __restrict__ x, const float* __restrict__ mask, long long n,
                  double* __restrict__ ws) {
    // Per thread: sums shifted by the thread's first valid value (the shifted-data algorithm:
    // no cancellation as long as the shift is within the data's spread, no division per element).
    double cnt = 0.0, s1 = 0.0, s2 = 0.0, shift = 0.0;
    const long long stride = (long long)gridDim.x * RL_BLOCK;
    for (long long i = (long long)blockIdx.x * RL_BLOCK + threadIdx.x; i < n; i += stride) {
        if (mask[i] != 0.f) {
            const double xi = (double)x[i];
            if (cnt == 0.0) shift = xi;
            const double d = xi - shift;
            cnt += 1.0;
            s1 += d;
            s2 += d * d;
        }
    }
    Welford w = {0.0, 0.0, 0.0};
    if (cnt > 0.0) {
        const double m = s1 / cnt;
        w.n = cnt;
        w.mean = shift + m;
        w.m2 = fmax(s2 - s1 * m, 0.0);
    }
    w = block_welford(w);
    if (threadIdx.x == 0) {
        ws[3 * blockIdx.x + 0] = w.n;
        ws[3 * blockIdx.x + 1] = w.mean;
        ws[3 * blockIdx.x + 2] = w.m2;
    }
}

// One block of RL_BLOCK threads. stats[0] = mean, stats[1] = unbiased std (NaN, NaN when fewer
// than 2 valid tokens).
extern "C" __global__ void __launch_bounds__(RL_BLOCK)
rl_whiten_finalize(double* __restrict__ ws, int G, float* __restrict__ stats) {
    Welford w = {0.0, 0.0, 0.0};
    for (int i = threadIdx.x; i < G; i += RL_BLOCK) {
        Welford o = {ws[3 * i + 0], ws[3 * i + 1], ws[3 * i + 2]};
        w = welford_merge(w, o);
    }
    w = block_welford(w);
    if (threadIdx.x == 0) {
        double* fin = ws + 3LL * G;
        if (w.n >= 2.0) {
            const double var = w.m2 / (w.n - 1.0);
            fin[0] = w.mean;
            fin[1] = 1.0 / sqrt(var + 1e-8);
            fin[3] = var;
            stats[0] = (float)w.mean;
            stats[1] = (float)sqrt(var);
        } else {
            const double nan = __longlong_as_double(0x7ff8000000000000LL);
            fin[0] = nan;
            fin[1] = nan;
            fin[3] = nan;
            stats[0] = (float)nan;
            stats[1] = (float)nan;
        }
        fin[2] = w.n;
    }
}

// fin = ws + 3G. Safe in place (out == x).
extern "C" __global__ void rl_whiten_apply(const float* x, const float* __restrict__ mask,
                                           const double* __restrict__ fin, float* out,
                                           long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const bool ok = fin[2] >= 2.0;
    const float mean = (float)fin[0];
    const float inv = (float)fin[1];
    out[i] = (ok && mask[i] != 0.f) ? (x[i] - mean) * inv : 0.f;
}

// ---------------------------------------------------------------------------------------------
// PPO clipped surrogate. Per valid token: ratio = exp(clamp(logp - logp_old, +-20)) (verl's
// clamp), loss = max(-A*ratio, -A*clip(ratio, 1-clip_low, 1+clip_high)); the clipped branch wins
// (and the gradient is 0) only when it is strictly larger; else d loss/d logp = -A*ratio, and 0
// where the log-ratio is outside the clamp.
// Workspace ws (doubles): [0, 4G): per-block sums (n, loss, clipped, kl); [4G]: 1/n (or 0).
// ---------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(RL_BLOCK)
rl_ppo_loss(const float* __restrict__ logp, const float* __restrict__ logp_old,
            const float* __restrict__ adv, const float* __restrict__ mask, long long n,
            float clip_low, float clip_high, float* __restrict__ loss_tok,
            float* __restrict__ grad, double* __restrict__ ws) {
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    const float lo = 1.f - clip_low, hi = 1.f + clip_high;
    const long long stride = (long long)gridDim.x * RL_BLOCK;
    for (long long i = (long long)blockIdx.x * RL_BLOCK + threadIdx.x; i < n; i += stride) {
        float l = 0.f, g = 0.f;
        if (mask[i] != 0.f) {
            const float d = logp[i] - logp_old[i];
            const float ratio = expf(fminf(fmaxf(d, -20.f), 20.f));
            const float a = adv[i];
            const float s1 = -a * ratio;
            const float s2 = -a * fminf(fmaxf(ratio, lo), hi);
            const bool clipped = s2 > s1;
            l = clipped ? s2 : s1;
            g = (clipped || fabsf(d) > 20.f) ? 0.f : s1;
            acc[0] += 1.0;
            acc[1] += (double)l;
            acc[2] += clipped ? 1.0 : 0.0;
            acc[3] += (double)(-d);
        }
        loss_tok[i] = l;
        grad[i] = g;
    }
    block_sum<4>(acc);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int j = 0; j < 4; ++j) ws[4 * blockIdx.x + j] = acc[j];
    }
}

// One block. stats = [loss, clipfrac, approx_kl, n_valid] (token means over the mask; 0 when no
// token is valid).
extern "C" __global__ void __launch_bounds__(RL_BLOCK)
rl_ppo_finalize(double* __restrict__ ws, int G, float* __restrict__ stats) {
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    for (int i = threadIdx.x; i < G; i += RL_BLOCK) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j] += ws[4 * i + j];
    }
    block_sum<4>(acc);
    if (threadIdx.x == 0) {
        const double inv = acc[0] > 0.0 ? 1.0 / acc[0] : 0.0;
        ws[4LL * G] = inv;
        stats[0] = (float)(acc[1] * inv);
        stats[1] = (float)(acc[2] * inv);
        stats[2] = (float)(acc[3] * inv);
        stats[3] = (float)acc[0];
    }
}

extern "C" __global__ void rl_ppo_scale_grad(float* __restrict__ grad,
                                             const double* __restrict__ inv_n, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    grad[i] = grad[i] * (float)inv_n[0];
}

// ---------------------------------------------------------------------------------------------
// KL penalty per token. kind 0 (k1): kl = logp - ref, d/dlogp = 1.
// kind 1 (k3): x = ref - logp, kl = exp(x) - x - 1, d/dlogp = 1 - exp(x). 0 on invalid tokens.
// grad may be null (not written).
// ---------------------------------------------------------------------------------------------

extern "C" __global__ void rl_kl_penalty(const float* __restrict__ logp,
                                         const float* __restrict__ logp_ref,
                                         const float* __restrict__ mask, long long n, int kind,
                                         float* __restrict__ out, float* __restrict__ grad) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = 0.f, g = 0.f;
    if (mask[i] != 0.f) {
        if (kind == 0) {
            v = logp[i] - logp_ref[i];
            g = 1.f;
        } else {
            const float x = logp_ref[i] - logp[i];
            const float ex = expf(x);
            v = ex - x - 1.f;
            g = 1.f - ex;
        }
    }
    out[i] = v;
    if (grad != nullptr) grad[i] = g;
}
