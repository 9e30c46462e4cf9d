// sample.cu: token sampling from bf16 logits (CPU reference in src/kernels/sample.rs).
// Defines:
//   sample_rows      one block per row of logits [N][V]: temperature, top-k, top-p, greedy; returns
//                    the token, its log-prob under the sampling distribution (after temperature,
//                    top-k, top-p renormalisation), its log-prob under the temperature-1 policy, and
//                    optionally the number of tokens that survived the filters.
//   sample_rows_dev  the same with (seed, counter) read from device memory (CUDA-graph decoding).
//
// Total order of the tokens: by logit descending, ties by id ascending. Every filter keeps a
// prefix of that order, so the kept set is {key > kap} + {key == kap and id <= idthr}, where key is
// the 16-bit order key of the bf16 logit (bf16 has only 65536 values: a radix select over two
// 8-bit digits finds the exact threshold value, and a scan in id order splits ties).
//
// Passes over the row (each one read of V bf16; the rows of a decode batch stay in L2):
//   P1  always: argmax (greedy; ties to the lowest id), online log-sum-exp at T = 1 (policy
//       log-prob); with no filter also the draw itself (P8 over every token).
//   top-k (0 < k < V):
//   P2  count histogram of the high byte of the key -> the bucket holding the k-th token;
//   P3  count histogram of the low byte inside that bucket -> kap (its exact key) and how many of
//       the tokens equal to kap are kept (c = k - #above);
//   P4  only if some ties are cut: block scan in id order -> idthr = id of the c-th tie.
//   top-p (p < 1), over the top-k survivors, with weights w = 2^((z - zmax)·log2e/T) held in
//   fixed point (round(w·2^40), u64) so that the sums are exact integers, independent of order:
//   P5  mass histogram of the high byte (and the total W) -> bucket holding the prefix mass
//       P = ceil(p·W);
//   P6  count histogram of the low byte inside that bucket; equal keys have equal weights, so the
//       mass of a key is count·w(key) -> kap, and c = ceil((P - mass above) / w(kap)) ties kept;
//   P7  only if some ties are cut: scan in id order -> idthr.
//   P8  the draw over the kept tokens, by the exponential race (as vLLM's sampler): token =
//       argmax_j w_j / E_j with E_j = -ln u_j, u_j = uniform_open(seed, (counter + row)·V + j),
//       which is an exact draw from w / Σw; the same pass sums the kept weights (online) for the
//       sampling log-prob and counts the kept tokens.
// Histograms use warp-aggregated shared-memory atomics on integers only, so every result is
// deterministic. Greedy (temperature 0) is P1 alone; plain temperature sampling is P1 alone.
// A row that cannot be sampled (a NaN or +inf logit, or every logit -inf: P1's sum is NaN or 0)
// skips the filters and gets token 0 (a valid id), NaN log-probs and n_kept 0, the flag the host
// turns into an error (src/kernels/sample.rs); no row ever gets a token >= V.
#include "common.cuh"

#define SB 512
#define SNW (SB / 32)
#define S_UNR 4
#define S_LOG2E 1.4426950408889634f
#define S_LN2 0.6931471805599453f
#define S_NEG_MAX (-3.402823466e38f)
#define S_NEG_INF __int_as_float(0xff800000)
#define S_NONE 0xFFFFFFFFu

__device__ __forceinline__ float s_bf16(unsigned short b) { return __uint_as_float((u32)b << 16); }

// Order key of a bf16 value: a larger value has a larger key; -0 and +0 share the key of +0.
__device__ __forceinline__ u32 s_key(unsigned short b) {
    const u32 x = (b == 0x8000u) ? 0u : (u32)b;
    return (x & 0x8000u) ? ((~x) & 0xFFFFu) : (x | 0x8000u);
}

// The value of a key (inverse of s_key).
__device__ __forceinline__ float s_key_value(u32 key) {
    const u32 b = (key & 0x8000u) ? (key & 0x7FFFu) : ((~key) & 0xFFFFu);
    return __uint_as_float(b << 16);
}

__device__ __forceinline__ bool s_kept(u32 key, long long j, u32 kap, u32 idthr) {
    return key > kap || (key == kap && (unsigned long long)j <= (unsigned long long)idthr);
}

// Fixed-point weight round(2^((z - zmax)·c) · 2^40). Explicit _rn operations: no contraction, so
// every call site computes the same bits for the same z (P5 and P6 must agree exactly).
__device__ __forceinline__ unsigned long long s_wfix(float z, float zmax, float c) {
    const float d = __fmul_rn(__fsub_rn(z, zmax), c);
    const float w = exp2f(d);
    return __float2ull_rn(__fmul_rn(w, 1099511627776.0f));
}

// log2(E) with E = -ln(u) ~ Exp(1), u = uniform_open(seed, ctr) in (0, 1). For u > 1/2 the
// logarithm goes through log1p of the exact u - 1, so E keeps its relative precision near 0.
__device__ __forceinline__ float s_log2_exp1(u64 seed, u64 ctr) {
    const double u = uniform_open(seed, ctr);
    const float e = (u > 0.5) ? -log1pf((float)(u - 1.0)) : -logf((float)u);
    return log2f(e);
}

// Online base-2 sum: m = running max, S = Σ 2^(x - m). m starts at -FLT_MAX (finite) so that a
// -inf value adds 2^-inf = 0; NaN propagates into S.
__device__ __forceinline__ void s_online(float& m, float& S, float x) {
    if (x > m) {
        S = (S != 0.f) ? S * exp2f(m - x) : 0.f;
        m = x;
    }
    S += exp2f(x - m);
}

__device__ __forceinline__ void s_online_merge(float am, float aS, float bm, float bS, float& m,
                                               float& S) {
    m = fmaxf(am, bm);
    S = ((aS != 0.f) ? aS * exp2f(am - m) : 0.f) + ((bS != 0.f) ? bS * exp2f(bm - m) : 0.f);
}

// Per-thread (then per-block) statistics of P1 and P8.
struct SStat {
    float m1, S1;     // online Σ 2^(z·log2e - m1) over every token (T = 1)
    float zmax;       // max logit ...
    u32 amax;         // ... at the lowest id
    float mT, ST;     // online Σ 2^(z·c - mT) over the kept tokens
    float best;       // race: max of z·c - log2(E_j) over the kept tokens ...
    u32 bid;          // ... at the lowest id
    u32 nk;           // number of kept tokens
};

__device__ __forceinline__ SStat s_identity() {
    SStat s;
    s.m1 = S_NEG_MAX;
    s.S1 = 0.f;
    s.zmax = S_NEG_INF;
    s.amax = S_NONE;
    s.mT = S_NEG_MAX;
    s.ST = 0.f;
    s.best = S_NEG_INF;
    s.bid = S_NONE;
    s.nk = 0;
    return s;
}

__device__ __forceinline__ SStat s_merge(const SStat& a, const SStat& b) {
    SStat r;
    s_online_merge(a.m1, a.S1, b.m1, b.S1, r.m1, r.S1);
    const bool bz = b.zmax > a.zmax || (b.zmax == a.zmax && b.amax < a.amax);
    r.zmax = bz ? b.zmax : a.zmax;
    r.amax = bz ? b.amax : a.amax;
    s_online_merge(a.mT, a.ST, b.mT, b.ST, r.mT, r.ST);
    const bool bb = b.best > a.best || (b.best == a.best && b.bid < a.bid);
    r.best = bb ? b.best : a.best;
    r.bid = bb ? b.bid : a.bid;
    r.nk = a.nk + b.nk;
    return r;
}

__device__ __forceinline__ SStat s_shfl_xor(const SStat& s, int o) {
    SStat r;
    r.m1 = __shfl_xor_sync(DFPO_FULL_MASK, s.m1, o);
    r.S1 = __shfl_xor_sync(DFPO_FULL_MASK, s.S1, o);
    r.zmax = __shfl_xor_sync(DFPO_FULL_MASK, s.zmax, o);
    r.amax = __shfl_xor_sync(DFPO_FULL_MASK, s.amax, o);
    r.mT = __shfl_xor_sync(DFPO_FULL_MASK, s.mT, o);
    r.ST = __shfl_xor_sync(DFPO_FULL_MASK, s.ST, o);
    r.best = __shfl_xor_sync(DFPO_FULL_MASK, s.best, o);
    r.bid = __shfl_xor_sync(DFPO_FULL_MASK, s.bid, o);
    r.nk = __shfl_xor_sync(DFPO_FULL_MASK, s.nk, o);
    return r;
}

// Block reduction in a fixed order; every thread gets the result.
__device__ SStat s_block_reduce(SStat st, SStat* s_red, SStat* s_res) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) st = s_merge(st, s_shfl_xor(st, o));
    if (lane == 0) s_red[warp] = st;
    __syncthreads();
    if (warp == 0) {
        SStat w = (lane < SNW) ? s_red[lane] : s_identity();
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) w = s_merge(w, s_shfl_xor(w, o));
        if (lane == 0) *s_res = w;
    }
    __syncthreads();
    const SStat r = *s_res;
    __syncthreads();  // s_red and s_res may be reused from here on
    return r;
}

// Calls f(j, bits, valid) for every element of the row. Every thread makes the same sequence of
// calls (control flow uniform across the block), so f may use warp collectives; invalid calls
// (valid == false) are padding. Step 1: the unaligned head (< 8 elements, thread tid gets element
// tid) and the tail (< 8, element tail0 + tid); then the 16-byte-aligned body as uint4 vectors of
// 8 bf16, S_UNR vectors in flight per thread.
template <class F>
__device__ __forceinline__ void s_pass(const unsigned short* rowp, long long V, long long head,
                                       long long nvec, long long tail0, F&& f) {
    const int tid = threadIdx.x;
    {
        const bool hv = tid < head;
        f((long long)tid, hv ? rowp[tid] : (unsigned short)0, hv);
        const long long jt = tail0 + tid;
        const bool tv = jt < V;
        f(jt, tv ? rowp[jt] : (unsigned short)0, tv);
    }
    const uint4* vp = reinterpret_cast<const uint4*>(rowp + head);
    for (long long i0 = 0; i0 < nvec; i0 += (long long)SB * S_UNR) {
        uint4 q[S_UNR];
#pragma unroll
        for (int u = 0; u < S_UNR; ++u) {
            const long long i = i0 + (long long)u * SB + tid;
            q[u] = (i < nvec) ? vp[i] : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < S_UNR; ++u) {
            const long long i = i0 + (long long)u * SB + tid;
            const bool valid = i < nvec;
            const long long j0 = head + 8 * i;
            const u32 w[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const unsigned short b =
                    (unsigned short)((e & 1) ? (w[e >> 1] >> 16) : (w[e >> 1] & 0xFFFFu));
                f(j0 + e, b, valid);
            }
        }
    }
}

// hist[bin] += number of lanes with that bin (bin < 0: nothing). Whole warp must call.
__device__ __forceinline__ void s_warp_count(u32* hist, int bin) {
    unsigned pending = __ballot_sync(DFPO_FULL_MASK, bin >= 0);
    while (pending) {
        const int leader = __ffs(pending) - 1;
        const int b = __shfl_sync(DFPO_FULL_MASK, bin, leader);
        const unsigned same = __ballot_sync(DFPO_FULL_MASK, bin == b);
        if ((int)(threadIdx.x & 31) == leader) atomicAdd(&hist[b], (u32)__popc(same));
        pending &= ~same;
    }
}

// hist[bin] += Σ w over the lanes with that bin (bin < 0: nothing). Whole warp must call.
__device__ __forceinline__ void s_warp_mass(unsigned long long* hist, int bin, unsigned long long w) {
    unsigned pending = __ballot_sync(DFPO_FULL_MASK, bin >= 0);
    while (pending) {
        const int leader = __ffs(pending) - 1;
        const int b = __shfl_sync(DFPO_FULL_MASK, bin, leader);
        const bool mine = bin == b;
        const unsigned same = __ballot_sync(DFPO_FULL_MASK, mine);
        unsigned long long s = mine ? w : 0ull;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(DFPO_FULL_MASK, s, o);
        if ((int)(threadIdx.x & 31) == leader) atomicAdd(&hist[b], s);
        pending &= ~same;
    }
}

// Warp 0 only. Lane l holds bins 8l..8l+7 in h. Finds the largest bin b whose suffix sum
// (Σ of bins >= b) reaches target (0 < target <= total); writes b and the sum of the bins above b.
// Exactly one lane finds it; nothing is written when target is out of range.
template <typename U>
__device__ __forceinline__ void s_find_top(const U (&h)[8], U target, u32* out_bin, U* out_above) {
    const int lane = threadIdx.x & 31;
    U sum = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += h[e];
    U suf = sum;  // inclusive suffix over lanes
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const U t = __shfl_down_sync(DFPO_FULL_MASK, suf, o);
        if (lane + o < 32) suf += t;
    }
    const U above = suf - sum;
    if (above < target && target <= suf) {
        U acc = above;
        bool done = false;
        u32 bin = 0;
        U ab = 0;
#pragma unroll
        for (int e = 7; e >= 0; --e) {
            if (!done && acc + h[e] >= target) {
                bin = (u32)(lane * 8 + e);
                ab = acc;
                done = true;
            }
            acc += h[e];
        }
        if (done) {
            *out_bin = bin;
            *out_above = ab;
        }
    }
}

// Exclusive block scan of v; total = the block sum. Uses s_scan[SNW]; the caller must put a
// __syncthreads() between two calls.
__device__ __forceinline__ u32 s_block_excl_scan(u32 v, u32& total, u32* s_scan) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u32 t = __shfl_up_sync(DFPO_FULL_MASK, incl, o);
        if (lane >= o) incl += t;
    }
    if (lane == 31) s_scan[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        u32 w = (lane < SNW) ? s_scan[lane] : 0u;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const u32 t = __shfl_up_sync(DFPO_FULL_MASK, w, o);
            if (lane >= o) w += t;
        }
        if (lane < SNW) s_scan[lane] = w;
    }
    __syncthreads();
    total = s_scan[SNW - 1];
    return (warp > 0 ? s_scan[warp - 1] : 0u) + incl - v;
}

// The id of the c-th (1-based) element, in id order, for which pred(j, bits) holds; S_NONE if
// there are fewer than c. Walks the row in id order (head, then tiles of SB vectors with thread t
// owning elements 8t..8t+7 of the tile, then tail) and stops at the tile holding it.
template <class P>
__device__ u32 s_tie_scan(const unsigned short* rowp, long long V, long long head, long long nvec,
                          long long tail0, u32 c, P&& pred, u32* s_scan, u32* s_found) {
    const int tid = threadIdx.x;
    __syncthreads();
    if (tid == 0) *s_found = S_NONE;
    __syncthreads();
    u32 carry = 0;
    {
        const bool f = tid < head && pred((long long)tid, rowp[tid]);
        u32 total;
        const u32 ex = s_block_excl_scan(f ? 1u : 0u, total, s_scan);
        if (f && carry + ex + 1u == c) *s_found = (u32)tid;
        carry += total;
        __syncthreads();
        if (*s_found != S_NONE) return *s_found;
    }
    const uint4* vp = reinterpret_cast<const uint4*>(rowp + head);
    for (long long i0 = 0; i0 < nvec; i0 += SB) {
        const long long i = i0 + tid;
        u32 flags = 0;
        if (i < nvec) {
            const uint4 q = vp[i];
            const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const unsigned short b =
                    (unsigned short)((e & 1) ? (w[e >> 1] >> 16) : (w[e >> 1] & 0xFFFFu));
                if (pred(head + 8 * i + e, b)) flags |= 1u << e;
            }
        }
        const u32 cnt = (u32)__popc(flags);
        u32 total;
        const u32 ex = s_block_excl_scan(cnt, total, s_scan);
        if (carry + ex < c && c <= carry + ex + cnt) {
            u32 f = flags;
            for (u32 r = c - carry - ex; r > 1u; --r) f &= f - 1u;  // drop the lower set bits
            *s_found = (u32)(head + 8 * i + (__ffs(f) - 1));
        }
        carry += total;
        __syncthreads();
        if (*s_found != S_NONE) return *s_found;
    }
    {
        const long long jt = tail0 + tid;
        const bool f = jt < V && pred(jt, rowp[jt]);
        u32 total;
        const u32 ex = s_block_excl_scan(f ? 1u : 0u, total, s_scan);
        if (f && carry + ex + 1u == c) *s_found = (u32)jt;
        __syncthreads();
        return *s_found;
    }
}

// P1 (ALL) and P8 (RACE) over the row; see SStat. kept = s_kept(key, j, kap, idthr).
template <bool ALL, bool RACE>
__device__ SStat s_stats(const unsigned short* rowp, long long V, long long head, long long nvec,
                         long long tail0, float c, u32 kap, u32 idthr, u64 seed, u64 ctr0,
                         SStat* s_red, SStat* s_res) {
    SStat st = s_identity();
    s_pass(rowp, V, head, nvec, tail0, [&](long long j, unsigned short b, bool valid) {
        if (!valid) return;
        const float z = s_bf16(b);
        if constexpr (ALL) {
            s_online(st.m1, st.S1, z * S_LOG2E);
            if (z > st.zmax || (z == st.zmax && (u32)j < st.amax)) {
                st.zmax = z;
                st.amax = (u32)j;
            }
        }
        if constexpr (RACE) {
            if (s_kept(s_key(b), j, kap, idthr)) {
                const float x = z * c;
                s_online(st.mT, st.ST, x);
                st.nk += 1u;
                const float sc = x - s_log2_exp1(seed, ctr0 + (u64)j);
                if (sc > st.best || (sc == st.best && (u32)j < st.bid)) {
                    st.best = sc;
                    st.bid = (u32)j;
                }
            }
        }
    });
    return s_block_reduce(st, s_red, s_res);
}

// logits: [N][V] bf16 bits (2-byte aligned); grid = N, block = SB.
// greedy != 0: temperature 0 (argmax; top_k / top_p ignored). Otherwise c = log2(e) / T,
// top_k in [1, V) or 0 (off), top_p < 1 or >= 1 (off).
// Outputs per row: tokens, lp_sample (log-prob under the sampling distribution; 0 for greedy),
// lp_policy (log-prob under softmax(logits)), n_kept (optional, may be null).
__device__ __forceinline__ void sample_rows_impl(const unsigned short* __restrict__ logits, long long V,
                                                 int greedy, float c, u32 top_k, float top_p, u64 seed,
                                                 u64 counter, u32* __restrict__ tokens,
                                                 float* __restrict__ lp_sample,
                                                 float* __restrict__ lp_policy, u32* __restrict__ n_kept) {
    __shared__ u32 s_h32[256];
    __shared__ unsigned long long s_h64[256];
    __shared__ u32 s_scan[SNW];
    __shared__ SStat s_red[SNW];
    __shared__ SStat s_res;
    __shared__ u32 s_u[4];                   // [0] bin, [1] count above, [3] tie-scan result
    __shared__ unsigned long long s_ull[2];  // [0] mass above, [1] P

    const long long row = blockIdx.x;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const unsigned short* rowp = logits + row * V;
    long long head, nvec, tail0;
    {
        const unsigned long long addr = (unsigned long long)rowp;
        head = (long long)(((16ull - (addr & 15ull)) & 15ull) >> 1);
        if (head > V) head = V;
        nvec = (V - head) >> 3;
        tail0 = head + (nvec << 3);
    }
    const u64 ctr0 = (counter + (u64)row) * (u64)V;
    const bool filtered = !greedy && (top_k != 0u || top_p < 1.f);

    const SStat st = (greedy || filtered)
                         ? s_stats<true, false>(rowp, V, head, nvec, tail0, c, 0u, S_NONE, seed,
                                                ctr0, s_red, &s_res)
                         : s_stats<true, true>(rowp, V, head, nvec, tail0, c, 0u, S_NONE, seed,
                                               ctr0, s_red, &s_res);
    // Block-uniform: S1 is NaN with a NaN or +inf logit and 0 when every logit is -inf.
    const bool bad = !(st.S1 > 0.f);
    u32 tok, nk;
    float mT = 0.f, ST = 1.f;
    if (bad) {
        tok = 0u;
        nk = 0u;
    } else if (greedy) {
        tok = st.amax;
        nk = 1u;
    } else if (!filtered) {
        tok = st.bid;
        nk = st.nk;
        mT = st.mT;
        ST = st.ST;
    } else {
        const float zmax = st.zmax;
        u32 kap = 0u, idthr = S_NONE;  // keep everything
        if (top_k != 0u) {
            // P2: high byte of the key.
            for (int b = tid; b < 256; b += SB) s_h32[b] = 0u;
            if (tid == 0) {
                s_u[0] = 0u;
                s_u[1] = 0u;
            }
            __syncthreads();
            s_pass(rowp, V, head, nvec, tail0, [&](long long, unsigned short b, bool valid) {
                s_warp_count(s_h32, valid ? (int)(s_key(b) >> 8) : -1);
            });
            __syncthreads();
            if (warp == 0) {
                u32 h[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) h[e] = s_h32[lane * 8 + e];
                s_find_top<u32>(h, top_k, &s_u[0], &s_u[1]);
            }
            __syncthreads();
            const u32 bk = s_u[0];
            const u32 above_hi = s_u[1];
            __syncthreads();
            // P3: low byte inside bucket bk.
            for (int b = tid; b < 256; b += SB) s_h32[b] = 0u;
            if (tid == 0) {
                s_u[0] = 0u;
                s_u[1] = 0u;
            }
            __syncthreads();
            s_pass(rowp, V, head, nvec, tail0, [&](long long, unsigned short b, bool valid) {
                const u32 key = s_key(b);
                s_warp_count(s_h32, (valid && (key >> 8) == bk) ? (int)(key & 255u) : -1);
            });
            __syncthreads();
            if (warp == 0) {
                u32 h[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) h[e] = s_h32[lane * 8 + e];
                s_find_top<u32>(h, top_k - above_hi, &s_u[0], &s_u[1]);
            }
            __syncthreads();
            const u32 lo = s_u[0];
            kap = (bk << 8) | lo;
            const u32 neq = s_h32[lo];
            const u32 ck = top_k - (above_hi + s_u[1]);  // ties of kap kept, 1 <= ck <= neq
            __syncthreads();
            if (ck < neq) {
                const u32 kk = kap;
                idthr = s_tie_scan(rowp, V, head, nvec, tail0, ck,
                                   [&](long long, unsigned short b) { return s_key(b) == kk; },
                                   s_scan, &s_u[3]);
            }
        }
        if (top_p < 1.f) {
            const u32 kap_k = kap, idthr_k = idthr;
            // P5: fixed-point mass of the high byte over the top-k survivors.
            for (int b = tid; b < 256; b += SB) s_h64[b] = 0ull;
            if (tid == 0) {
                s_u[0] = 0u;
                s_ull[0] = 0ull;
                s_ull[1] = 1ull;
            }
            __syncthreads();
            s_pass(rowp, V, head, nvec, tail0, [&](long long j, unsigned short b, bool valid) {
                int bin = -1;
                unsigned long long w = 0ull;
                if (valid) {
                    const u32 key = s_key(b);
                    if (s_kept(key, j, kap_k, idthr_k)) {
                        bin = (int)(key >> 8);
                        w = s_wfix(s_bf16(b), zmax, c);
                    }
                }
                s_warp_mass(s_h64, bin, w);
            });
            __syncthreads();
            if (warp == 0) {
                unsigned long long h[8], sum = 0ull;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    h[e] = s_h64[lane * 8 + e];
                    sum += h[e];
                }
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(DFPO_FULL_MASK, sum, o);
                const double pw = ceil((double)sum * (double)top_p);
                unsigned long long P = (pw < 1.0) ? 1ull : (unsigned long long)pw;
                if (P > sum) P = sum;
                if (lane == 0) s_ull[1] = P;
                s_find_top<unsigned long long>(h, P, &s_u[0], &s_ull[0]);
            }
            __syncthreads();
            const u32 bp = s_u[0];
            const unsigned long long above_hi = s_ull[0];
            const unsigned long long P = s_ull[1];
            __syncthreads();
            // P6: counts of the low byte inside bucket bp, over the top-k survivors.
            for (int b = tid; b < 256; b += SB) s_h32[b] = 0u;
            if (tid == 0) {
                s_u[0] = 0u;
                s_ull[0] = 0ull;
            }
            __syncthreads();
            s_pass(rowp, V, head, nvec, tail0, [&](long long j, unsigned short b, bool valid) {
                const u32 key = s_key(b);
                const bool in = valid && (key >> 8) == bp && s_kept(key, j, kap_k, idthr_k);
                s_warp_count(s_h32, in ? (int)(key & 255u) : -1);
            });
            __syncthreads();
            if (warp == 0) {
                unsigned long long h[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const u32 cnt = s_h32[lane * 8 + e];
                    const u32 key = (bp << 8) | (u32)(lane * 8 + e);
                    h[e] = cnt ? (unsigned long long)cnt * s_wfix(s_key_value(key), zmax, c) : 0ull;
                }
                s_find_top<unsigned long long>(h, P - above_hi, &s_u[0], &s_ull[0]);
            }
            __syncthreads();
            const u32 lo = s_u[0];
            kap = (bp << 8) | lo;
            const unsigned long long mgt = above_hi + s_ull[0];
            const u32 neq = s_h32[lo];
            __syncthreads();
            const unsigned long long w = s_wfix(s_key_value(kap), zmax, c);
            unsigned long long cp = (w > 0ull) ? (P - mgt + w - 1ull) / w : (unsigned long long)neq;
            if (cp > neq) cp = neq;
            if (cp < neq) {
                const u32 kk = kap;
                idthr = s_tie_scan(
                    rowp, V, head, nvec, tail0, (u32)cp,
                    [&](long long j, unsigned short b) {
                        const u32 key = s_key(b);
                        return key == kk && s_kept(key, j, kap_k, idthr_k);
                    },
                    s_scan, &s_u[3]);
            } else {
                idthr = (kap == kap_k) ? idthr_k : S_NONE;
            }
        }
        // P8: the draw over the kept tokens.
        const SStat s8 = s_stats<false, true>(rowp, V, head, nvec, tail0, c, kap, idthr, seed,
                                              ctr0, s_red, &s_res);
        tok = s8.bid;
        nk = s8.nk;
        mT = s8.mT;
        ST = s8.ST;
    }
    if (tid == 0) {
        const float nan = __int_as_float(0x7fc00000);
        // tok < V always holds for a sampleable row; the check keeps any other case in range.
        const bool ok = nk > 0u && (long long)tok < V;
        const float zt = ok ? s_bf16(rowp[tok]) : nan;
        tokens[row] = ok ? tok : 0u;
        lp_sample[row] = !ok ? nan : greedy ? 0.f : S_LN2 * (zt * c - (mT + log2f(ST)));
        lp_policy[row] = S_LN2 * (zt * S_LOG2E - (st.m1 + log2f(st.S1)));
        if (n_kept != nullptr) n_kept[row] = ok ? nk : 0u;
    }
}

extern "C" __global__ void __launch_bounds__(SB)
sample_rows(const unsigned short* __restrict__ logits, long long V, int greedy, float c, u32 top_k,
            float top_p, u64 seed, u64 counter, u32* __restrict__ tokens,
            float* __restrict__ lp_sample, float* __restrict__ lp_policy, u32* __restrict__ n_kept) {
    sample_rows_impl(logits, V, greedy, c, top_k, top_p, seed, counter, tokens, lp_sample, lp_policy,
                     n_kept);
}

// sample_rows with (seed, counter) read from the device (seed_ctr[0], seed_ctr[1]), so that a
// captured CUDA graph replays with the values the generation state holds at each launch.
extern "C" __global__ void __launch_bounds__(SB)
sample_rows_dev(const unsigned short* __restrict__ logits, long long V, int greedy, float c, u32 top_k,
                float top_p, const u64* __restrict__ seed_ctr, u32* __restrict__ tokens,
                float* __restrict__ lp_sample, float* __restrict__ lp_policy, u32* __restrict__ n_kept) {
    sample_rows_impl(logits, V, greedy, c, top_k, top_p, seed_ctr[0], seed_ctr[1], tokens, lp_sample,
                     lp_policy, n_kept);
}
