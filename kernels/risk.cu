// risk.cu: kernel family `risk`: per-row distribution statistics and the DFPO risk-loss terms
// (method doc 2.8, 2.9 and 6). Input rows hold K samples (1 <= K <= 1024); R rows, row-major
// [R][K], fp32. The CPU reference and the launchers are in src/kernels/risk.rs.
//
// Defines, for every padded row length P = next_pow2(K) in {1, 2, 4, ..., 1024}:
//   risk_stats_p<P>(x, R, K, k_lo, k_hi, quant, stats, quant_out, sorted, perm)
//       stats[R][7] = mean, var, CVaR_low, mean_high, var_low, var_high, std (population
//       moments; the tails are the lowest k_lo and the highest k_hi samples);
//       quant_out[R][quant.n] = quantiles at host-computed Hazen positions;
//       sorted[R][K] ascending. Any output pointer may be null (= not wanted). Sorts values
//       only and ignores `perm`.
//   risk_stats_perm_p<P>(same arguments)
//       the same, and perm[R][K] = stable sort permutation (perm must not be null): the sort
//       carries each value's index (more registers, so a separate kernel).
//   risk_loss_p<P>(pred, target, row_scale, R, K, k_lo, k_hi, w, terms, grad, row_loss)
//       terms[R][4] = (CVaR diff)^2, (upper-tail mean diff)^2, tail-shape relus, mean-shift relu
//       (unweighted); grad[R][K] += row_scale * d(sum_j w_j term_j)/dpred at the UNSORTED
//       positions; row_loss[R] = row_scale * sum_j w_j term_j (null = not wanted).
//
// Design (memory-bound: read each row once, keep it in registers):
// - G = P/E lanes of a warp own one row, E values per lane; a warp holds 32/G rows. Register e
//   of lane s is sorted position p = s*E + e. It is first loaded with element j = s + e*G, so a
//   warp's loads (and the final coalesced stores) touch consecutive addresses.
// - Sort keys: each value becomes an int whose signed order is the value order (the float's bits
//   with the magnitude bits flipped when the sign is set; -0 < +0), every NaN the largest key
//   (canonical NaN bits 0x7fffffff): a total order in which NaN sorts last, as numpy and torch
//   sort. Compare-exchanges are integer min/max (as cheap as fminf/fmaxf, which would drop a
//   NaN), and the sorted keys turn back into floats (the same xor) for the arithmetic.
// - Sort: bitonic network on P slots, padding = the NaN key. Direction-free form: for each block
//   size B the first step pairs p with p ^ (B-1) (mirror), the rest pair p with p ^ j,
//   j = B/4 .. 1, and the lower position always keeps the smaller key. Partners closer than E are
//   in the same lane (compare-exchange in registers); farther ones are reached with
//   __shfl_xor_sync(mask < G), so the G-lane groups of a warp never mix. When the permutation is
//   needed the key is (key, index), compared lexicographically: the result is the stable order
//   (ties by index), and padding (index >= K) sorts after any real NaN, so positions < K hold
//   exactly the row's elements and the permutation is one. Otherwise keys alone are sorted.
// - Non-finite samples: a row holding a NaN or +-inf sample gets NaN for every statistic,
//   quantile, loss term and row loss, and NaN added to every gradient position of the row (a
//   flag reduced over the row's lanes at load): NaN propagates, it is never laundered into a
//   finite (wrong) value. The sorted row and the permutation are still exact (NaN last).
// - Moments: per-lane partial sums, then xor-shuffle sums within the G-lane group; variances are
//   two-pass (sum of squared deviations from the mean), not E[x^2] - E[x]^2.
// - Shared memory is only a per-warp staging area (sorted/perm stores, quantile gathers, the
//   scatter of the loss gradient back to unsorted positions), ordered by __syncwarp: a warp owns
//   its rows, so there are no block barriers and no atomics.
#include "common.cuh"

#define RISK_NSTATS 7
#define RISK_NTERMS 4
#define RISK_MAXQ 16

// Quantile read-out positions, computed on the host with the CPU reference's f64 arithmetic:
// quantile i = frac == 0 ? s[lo] : s[lo] + frac * (s[min(lo + 1, K - 1)] - s[lo]).
struct RiskQuantiles {
    int n;
    int lo[RISK_MAXQ];
    float frac[RISK_MAXQ];
};

// Loss weights, in the order of the terms.
struct RiskWeights {
    float cvar, gain, shape, mean_shift;
};

// Layout per padded length P. Mirrored by `cuda::layout` in src/kernels/risk.rs (the host uses it
// for the grid size: the kernels loop over row groups, so any grid is correct).
template <int P>
struct RiskCfg {
    // Values per lane: more values per lane means more compare-exchanges inside a lane and
    // fewer shuffle steps (P = 64: 3 of the 21 network steps cross lanes with E = 16, 6 with
    // E = 8), at the price of registers.
    static constexpr int E = P < 16 ? P : (P / 32 > 16 ? P / 32 : 16);
    static constexpr int G = P / E;                                  // lanes per row
    static constexpr int RPW = 32 / G;                               // rows per warp
    static constexpr int WARPS = E > 16 ? 4 : 8;                     // keeps static smem < 48 KiB
    static constexpr int THREADS = WARPS * 32;
    static constexpr int ROWS = WARPS * RPW;                         // rows per block
    static constexpr int SROW = P + P / 32;                          // staging row stride
    static constexpr int LOGP = P >= 1024 ? 10 : P >= 512 ? 9 : P >= 256 ? 8 : P >= 128 ? 7
                              : P >= 64 ? 6 : P >= 32 ? 5 : P >= 16 ? 4 : P >= 8 ? 3
                              : P >= 4 ? 2 : P >= 2 ? 1 : 0;
    static_assert((1 << LOGP) == P, "P must be a power of two <= 1024");
    static_assert(G * E == P && G <= 32 && (32 % G) == 0, "bad lane layout");
    static_assert(G == 1 || E >= 2, "cross-lane mirror steps pair registers e and E-1-e");
};

// Staging index: one pad word per 32 spreads the strided (s*E + e) writes over the banks.
__device__ __forceinline__ int risk_sidx(int p) { return p + (p >> 5); }

// Sum over the aligned group of G lanes (every lane gets the group's sum).
template <int G>
__device__ __forceinline__ float risk_group_sum(float x) {
#pragma unroll
    for (int o = G / 2; o >= 1; o >>= 1) x += __shfl_xor_sync(DFPO_FULL_MASK, x, o);
    return x;
}

// Sort key of a float (see the header) and its inverse (the same xor; NaN keys give a NaN).
__device__ __forceinline__ int risk_key(float x) {
    const int i = __float_as_int(x);
    return isnan(x) ? 0x7fffffff : i ^ ((i >> 31) & 0x7fffffff);
}
__device__ __forceinline__ float risk_value(int k) { return __int_as_float(k ^ ((k >> 31) & 0x7fffffff)); }

// In-register compare-exchange; (a, ia) is at the lower position and ends with the smaller key.
template <bool IDX>
__device__ __forceinline__ void risk_ce(int& a, int& ia, int& b, int& ib) {
    if constexpr (IDX) {
        const bool sw = (b < a) || (b == a && ib < ia);
        const int ta = a, tia = ia;
        a = sw ? b : a;
        ia = sw ? ib : ia;
        b = sw ? ta : b;
        ib = sw ? tia : ib;
    } else {
        const int lo = min(a, b), hi = max(a, b);
        a = lo;
        b = hi;
    }
}

// Cross-lane half of a compare-exchange: (a, ia) is mine, (b, ib) the partner's; the lane at the
// lower position keeps the smaller key, the other the larger. Keys are distinct when IDX (every
// slot has its own index), so both lanes agree on the exchange.
template <bool IDX>
__device__ __forceinline__ void risk_keep(int& a, int& ia, int b, int ib, bool lower) {
    if constexpr (IDX) {
        const bool b_less = (b < a) || (b == a && ib < ia);
        const bool take = lower == b_less;
        a = take ? b : a;
        ia = take ? ib : ia;
    } else {
        a = lower ? min(a, b) : max(a, b);
    }
}

// Sorts the row held by this lane's group ascending (see the header). s = lane within the group.
template <int P, bool IDX>
__device__ __forceinline__ void risk_sort(int (&v)[RiskCfg<P>::E], int (&id)[RiskCfg<P>::E], int s) {
    constexpr int E = RiskCfg<P>::E;
    constexpr int LOGP = RiskCfg<P>::LOGP;
#pragma unroll
    for (int lb = 1; lb <= LOGP; ++lb) {
        const int B = 1 << lb;
        // Mirror step: p <-> p ^ (B - 1); the lower of the two has bit B/2 clear.
        if (B <= E) {
#pragma unroll
            for (int e = 0; e < E; ++e) {
                const int f = e ^ (B - 1);
                if (e < f) risk_ce<IDX>(v[e], id[e], v[f], id[f]);
            }
        } else {
            // Partner: lane s ^ (B/E - 1), register E-1-e. Both registers of a pair are read
            // before either is written, so no lane sees a half-updated partner.
            const int lm = B / E - 1;
            const bool lower = (s & (B / 2 / E)) == 0;
#pragma unroll
            for (int e = 0; e < E / 2; ++e) {
                const int f = E - 1 - e;
                const int b_e = __shfl_xor_sync(DFPO_FULL_MASK, v[f], lm);
                const int b_f = __shfl_xor_sync(DFPO_FULL_MASK, v[e], lm);
                int ib_e = 0, ib_f = 0;
                if constexpr (IDX) {
                    ib_e = __shfl_xor_sync(DFPO_FULL_MASK, id[f], lm);
                    ib_f = __shfl_xor_sync(DFPO_FULL_MASK, id[e], lm);
                }
                risk_keep<IDX>(v[e], id[e], b_e, ib_e, lower);
                risk_keep<IDX>(v[f], id[f], b_f, ib_f, lower);
            }
        }
        // Half-cleaner steps: p <-> p ^ j, j = B/4 .. 1.
#pragma unroll
        for (int lj = lb - 2; lj >= 0; --lj) {
            const int j = 1 << lj;
            if (j < E) {
#pragma unroll
                for (int e = 0; e < E; ++e)
                    if ((e & j) == 0) risk_ce<IDX>(v[e], id[e], v[e | j], id[e | j]);
            } else {
                const int lm = j / E;
                const bool lower = (s & lm) == 0;
#pragma unroll
                for (int e = 0; e < E; ++e) {
                    const int b = __shfl_xor_sync(DFPO_FULL_MASK, v[e], lm);
                    int ib = 0;
                    if constexpr (IDX) ib = __shfl_xor_sync(DFPO_FULL_MASK, id[e], lm);
                    risk_keep<IDX>(v[e], id[e], b, ib, lower);
                }
            }
        }
    }
}

// Loads the sort keys of a row (element j = s + e*G into register e; the NaN key and index j
// beyond K or past R) and returns whether any element of the row (over its G lanes) is not
// finite.
template <int P>
__device__ __forceinline__ bool risk_load(const float* __restrict__ src, bool valid, int K, int s,
                                          int (&v)[RiskCfg<P>::E], int (&id)[RiskCfg<P>::E]) {
    constexpr int E = RiskCfg<P>::E, G = RiskCfg<P>::G;
    int bad = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int j = s + e * G;
        id[e] = j;
        const float x = (valid && j < K) ? src[j] : 0.f;
        bad |= !isfinite(x);
        v[e] = (valid && j < K) ? risk_key(x) : 0x7fffffff;
    }
#pragma unroll
    for (int o = G / 2; o >= 1; o >>= 1) bad |= __shfl_xor_sync(DFPO_FULL_MASK, bad, o);
    return bad != 0;
}

struct RiskMoments {
    float mean, var, mlo, vlo, mhi, vhi;
};

// Population mean/variance of the whole sorted row and of its lowest k_lo / highest k_hi
// positions (two-pass). Every lane of the group gets the results.
template <int P>
__device__ __forceinline__ RiskMoments risk_moments(const float (&v)[RiskCfg<P>::E], int s, int K,
                                                   int k_lo, int k_hi) {
    constexpr int E = RiskCfg<P>::E, G = RiskCfg<P>::G;
    const int hi0 = K - k_hi;
    float sa = 0.f, sl = 0.f, sh = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int p = s * E + e;
        // Selects, not multiplies: padding is NaN.
        sa += p < K ? v[e] : 0.f;
        sl += p < k_lo ? v[e] : 0.f;
        sh += (p >= hi0 && p < K) ? v[e] : 0.f;
    }
    RiskMoments m;
    m.mean = risk_group_sum<G>(sa) / (float)K;
    m.mlo = risk_group_sum<G>(sl) / (float)k_lo;
    m.mhi = risk_group_sum<G>(sh) / (float)k_hi;
    float da = 0.f, dl = 0.f, dh = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int p = s * E + e;
        const float xa = v[e] - m.mean, xl = v[e] - m.mlo, xh = v[e] - m.mhi;
        da += p < K ? xa * xa : 0.f;
        dl += p < k_lo ? xl * xl : 0.f;
        dh += (p >= hi0 && p < K) ? xh * xh : 0.f;
    }
    m.var = risk_group_sum<G>(da) / (float)K;
    m.vlo = risk_group_sum<G>(dl) / (float)k_lo;
    m.vhi = risk_group_sum<G>(dh) / (float)k_hi;
    return m;
}

template <int P, bool WITH_PERM>
__device__ __forceinline__ void risk_stats_impl(const float* __restrict__ x, int R, int K, int k_lo,
                                                int k_hi, const RiskQuantiles& q,
                                                float* __restrict__ stats,
                                                float* __restrict__ quant_out,
                                                float* __restrict__ sorted,
                                                unsigned* __restrict__ perm) {
    using C = RiskCfg<P>;
    constexpr int E = C::E, G = C::G;
    // Index staging only in the permutation variant (static smem is per kernel).
    __shared__ float sv[C::ROWS * C::SROW];
    __shared__ int si[WITH_PERM ? C::ROWS * C::SROW : 1];
    const int lane = threadIdx.x & 31;
    const int s = lane & (G - 1);
    const int slot = (threadIdx.x >> 5) * C::RPW + lane / G;
    float* rv = sv + slot * C::SROW;
    int* ri = si + (WITH_PERM ? slot * C::SROW : 0);
    // Uniform over the launch, so the branches below never split a warp.
    const bool want_v = sorted != nullptr || q.n > 0;

    for (long long base = (long long)blockIdx.x * C::ROWS; base < R;
         base += (long long)gridDim.x * C::ROWS) {
        const long long row = base + slot;
        const bool valid = row < R;
        const size_t off = valid ? (size_t)row * (size_t)K : 0;
        int key[E], id[E];
        const bool bad = risk_load<P>(x + off, valid, K, s, key, id);
        risk_sort<P, WITH_PERM>(key, id, s);
        float v[E];
#pragma unroll
        for (int e = 0; e < E; ++e) v[e] = risk_value(key[e]);
        const RiskMoments m = risk_moments<P>(v, s, K, k_lo, k_hi);
        const float nan = __int_as_float(0x7fffffff);  // every output of a row with a non-finite sample

        if (valid && stats != nullptr) {
            const float st[RISK_NSTATS] = {m.mean, m.var, m.mlo, m.mhi, m.vlo, m.vhi, sqrtf(m.var)};
#pragma unroll
            for (int t = 0; t < RISK_NSTATS; ++t)
                if (t % G == s) stats[(size_t)row * RISK_NSTATS + t] = bad ? nan : st[t];
        }

        if (want_v) {
#pragma unroll
            for (int e = 0; e < E; ++e) rv[risk_sidx(s * E + e)] = v[e];
        }
        if constexpr (WITH_PERM) {
#pragma unroll
            for (int e = 0; e < E; ++e) ri[risk_sidx(s * E + e)] = id[e];
        }
        __syncwarp();
        if (valid) {
            if (sorted != nullptr) {
#pragma unroll
                for (int e = 0; e < E; ++e) {
                    const int j = s + e * G;
                    if (j < K) sorted[off + j] = rv[risk_sidx(j)];
                }
            }
            if constexpr (WITH_PERM) {
#pragma unroll
                for (int e = 0; e < E; ++e) {
                    const int j = s + e * G;
                    if (j < K) perm[off + j] = (unsigned)ri[risk_sidx(j)];
                }
            }
            if (quant_out != nullptr) {
#pragma unroll
                for (int i = 0; i < RISK_MAXQ; ++i) {
                    if (i < q.n && i % G == s) {
                        const int lo = q.lo[i];
                        const int hi = lo + 1 < K ? lo + 1 : K - 1;
                        const float a = rv[risk_sidx(lo)], b = rv[risk_sidx(hi)];
                        const float fr = q.frac[i];
                        quant_out[(size_t)row * q.n + i] = bad ? nan : fr == 0.f ? a : a + fr * (b - a);
                    }
                }
            }
        }
        __syncwarp();  // the next row group reuses the staging area
    }
}

template <int P>
__device__ __forceinline__ void risk_loss_impl(const float* __restrict__ pred,
                                               const float* __restrict__ target,
                                               const float* __restrict__ row_scale, int R, int K,
                                               int k_lo, int k_hi, const RiskWeights& w,
                                               float* __restrict__ terms, float* __restrict__ grad,
                                               float* __restrict__ row_loss) {
    using C = RiskCfg<P>;
    constexpr int E = C::E, G = C::G;
    __shared__ float sg[C::ROWS * C::SROW];
    const int lane = threadIdx.x & 31;
    const int s = lane & (G - 1);
    const int slot = (threadIdx.x >> 5) * C::RPW + lane / G;
    float* rg = sg + slot * C::SROW;

    for (long long base = (long long)blockIdx.x * C::ROWS; base < R;
         base += (long long)gridDim.x * C::ROWS) {
        const long long row = base + slot;
        const bool valid = row < R;
        const size_t off = valid ? (size_t)row * (size_t)K : 0;

        // Target (a stop-gradient): values only.
        RiskMoments mt;
        bool bad;
        {
            int t[E], tid[E];
            bad = risk_load<P>(target + off, valid, K, s, t, tid);
            risk_sort<P, false>(t, tid, s);
            float tv[E];
#pragma unroll
            for (int e = 0; e < E; ++e) tv[e] = risk_value(t[e]);
            mt = risk_moments<P>(tv, s, K, k_lo, k_hi);
        }
        // Prediction: with indices, for the scatter of the gradient.
        int key[E], id[E];
        bad |= risk_load<P>(pred + off, valid, K, s, key, id);
        risk_sort<P, true>(key, id, s);
        float v[E];
#pragma unroll
        for (int e = 0; e < E; ++e) v[e] = risk_value(key[e]);
        const RiskMoments mp = risk_moments<P>(v, s, K, k_lo, k_hi);
        // A non-finite sample in pred or target: NaN terms, row loss and gradient for the row.
        const float nan = __int_as_float(0x7fffffff);

        const float sc = valid ? row_scale[row] : 0.f;
        const float dc = mp.mlo - mt.mlo;    // CVaR_alpha(pred) - CVaR_alpha(target)
        const float dg = mp.mhi - mt.mhi;    // upper-tail means
        const float dl = mp.vlo - mt.vlo;    // lower tail: pred wider than target is penalised
        const float dh = mt.vhi - mp.vhi;    // upper tail: pred narrower than target is penalised
        const float dm = mt.mean - mp.mean;  // pred mean below target mean is penalised
        const float l_cvar = bad ? nan : dc * dc, l_gain = bad ? nan : dg * dg;
        const float l_shape = bad ? nan : (dl > 0.f ? dl : 0.f) + (dh > 0.f ? dh : 0.f);
        const float l_mean = bad ? nan : dm > 0.f ? dm : 0.f;

        // d(row_scale * total)/d(sorted pred position p); relu kinks take the subgradient 0.
        const float inv_lo = 1.f / (float)k_lo, inv_hi = 1.f / (float)k_hi;
        const float g_lo = sc * w.cvar * 2.f * dc * inv_lo;
        const float g_lo_x = dl > 0.f ? sc * w.shape * 2.f * inv_lo : 0.f;  // times (x - mean_lo)
        const float g_hi = sc * w.gain * 2.f * dg * inv_hi;
        const float g_hi_x = dh > 0.f ? -sc * w.shape * 2.f * inv_hi : 0.f;  // times (x - mean_hi)
        const float g_all = dm > 0.f ? -sc * w.mean_shift / (float)K : 0.f;
        const int hi0 = K - k_hi;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const int p = s * E + e;
            if (p < K) {  // positions < K hold the real elements, so id[e] < K
                float g = g_all;
                if (p < k_lo) g += g_lo + g_lo_x * (v[e] - mp.mlo);
                if (p >= hi0) g += g_hi + g_hi_x * (v[e] - mp.mhi);
                rg[risk_sidx(id[e])] = bad ? nan : g;
            }
        }
        __syncwarp();
        if (valid) {
#pragma unroll
            for (int e = 0; e < E; ++e) {
                const int j = s + e * G;
                if (j < K) grad[off + j] += rg[risk_sidx(j)];
            }
            if (terms != nullptr) {
                const float tm[RISK_NTERMS] = {l_cvar, l_gain, l_shape, l_mean};
#pragma unroll
                for (int i = 0; i < RISK_NTERMS; ++i)
                    if (i % G == s) terms[(size_t)row * RISK_NTERMS + i] = tm[i];
            }
            if (row_loss != nullptr && s == 0)
                row_loss[row] = sc * (w.cvar * l_cvar + w.gain * l_gain + w.shape * l_shape +
                                      w.mean_shift * l_mean);
        }
        __syncwarp();  // the next row group reuses the staging area
    }
}

#define RISK_INSTANTIATE(P)                                                                        \
    extern "C" __global__ void __launch_bounds__(RiskCfg<P>::THREADS, 2) risk_stats_p##P(          \
        const float* __restrict__ x, int R, int K, int k_lo, int k_hi, RiskQuantiles q,            \
        float* __restrict__ stats, float* __restrict__ quant_out, float* __restrict__ sorted,      \
        unsigned* __restrict__ perm) {                                                             \
        risk_stats_impl<P, false>(x, R, K, k_lo, k_hi, q, stats, quant_out, sorted, nullptr);      \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(RiskCfg<P>::THREADS, 1) risk_stats_perm_p##P(     \
        const float* __restrict__ x, int R, int K, int k_lo, int k_hi, RiskQuantiles q,            \
        float* __restrict__ stats, float* __restrict__ quant_out, float* __restrict__ sorted,      \
        unsigned* __restrict__ perm) {                                                             \
        risk_stats_impl<P, true>(x, R, K, k_lo, k_hi, q, stats, quant_out, sorted, perm);          \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(RiskCfg<P>::THREADS, 2) risk_loss_p##P(           \
        const float* __restrict__ pred, const float* __restrict__ target,                          \
        const float* __restrict__ row_scale, int R, int K, int k_lo, int k_hi, RiskWeights w,      \
        float* __restrict__ terms, float* __restrict__ grad, float* __restrict__ row_loss) {       \
        risk_loss_impl<P>(pred, target, row_scale, R, K, k_lo, k_hi, w, terms, grad, row_loss);    \
    }

RISK_INSTANTIATE(1)
RISK_INSTANTIATE(2)
RISK_INSTANTIATE(4)
RISK_INSTANTIATE(8)
RISK_INSTANTIATE(16)
RISK_INSTANTIATE(32)
RISK_INSTANTIATE(64)
RISK_INSTANTIATE(128)
RISK_INSTANTIATE(256)
RISK_INSTANTIATE(512)
RISK_INSTANTIATE(1024)
