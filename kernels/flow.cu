// flow.cu: the DFPO flow head v(z, τ | u) and its integration (method doc 2.2, 2.3, 6).
// Defines:
//   flow_noise            per-row prior noise: stratified Φ⁻¹((k+½)/K) or seeded Φ⁻¹(uniform), truncation
//   flow_gemm             tiled fp32 SGEMM with arbitrary strides, optional bias, split-K slices
//                         (the per-token "cond" op u = c·W_cond + b_in and every weight gradient)
//   flow_reduce_slices    dst += Σ_s part[s] in a fixed order (split-K and column-sum partials)
//   flow_colsum_partial   column sums over row slices (bias gradient of the cond op)
//   flow_transpose        W_l -> W_lᵀ for every hidden layer (the backward matmul reads Wᵀ coalesced)
//   flow_integrate(_jac)  fused MLP evaluation + Euler / midpoint steps over a tile of rows, optional
//                         clip after every step and forward-mode J = ∂z/∂z0
//   flow_eval_fwd         fused MLP, one evaluation per row at given (z, τ)
//   flow_eval_bwd         per tile: forward recompute (saves a_l, h_l to a global workspace), backprop
//                         through every layer inside the block; per-row δ_l (over a_l) go to the
//                         workspace for the weight gradients, vector gradients are summed per block
//   flow_vec_reduce       sums the per-block vector-gradient partials in a fixed order into dparams
//   flow_segsum           du per token += Σ over its K rows of δ_0
//
// MLP (src/kernels/flow.rs documents the parameter layout):
//   a_0 = u_tok + w_z z + w_t τ ; h_l = LN_l(GELU(a_l)) ; a_l = h_{l-1} W_l + b_l ; v = h_{L-1}·w_out + b_out
// `hp` always points at the head part of the flat parameter vector, i.e. params + C·H (b_in first).
//
// Tile design (fp32 SIMT; tensor cores are a later issue): a block of 256 threads owns TR rows
// (TR = 64, 32, 16 for H <= 128, 256, 512). Activations live in dynamic shared memory as [TR][H].
// Hidden-layer matmuls: each thread accumulates 8 rows x 4 columns in registers; lanes take
// consecutive float4 columns so every W row read (through __ldg) is coalesced; the 8 rows of a
// warp are shared-memory broadcasts. GELU + LayerNorm run one warp per row, the row staying in
// shared memory between its passes (keeps registers <= 128, so two blocks fit per SM).
// Everything is deterministic: no float atomics anywhere.
#include "common.cuh"

#define FLOW_THREADS 256
#define FLOW_WARPS 8
#define FLOW_RT 8       // rows per thread in the tile matmul
#define FLOW_LN_EPS 1e-5f

// ---------------------------------------------------------------------------------------------
// Parameter layout, head-relative (hp = params + C·H):
//   b_in [H] @0, w_z [H] @H, w_t [H] @2H, gamma_0 [H] @3H, beta_0 [H] @4H,
//   layer l >= 1 at 5H + (l-1)(H²+3H): W_l [H][H], b_l [H], gamma_l [H], beta_l [H];
//   w_out [H] at layer_off(depth), b_out right after.
__device__ __forceinline__ long long flow_layer_off(int H, int l) {
    return l == 0 ? 3LL * H : 5LL * H + (long long)(l - 1) * ((long long)H * H + 3LL * H);
}
__device__ __forceinline__ long long flow_gamma_off(int H, int l) {
    return l == 0 ? 3LL * H : flow_layer_off(H, l) + (long long)H * H + H;
}
// Column groups of the tile matmul (128 columns each; a power of two so they divide the 8 warps)
// and rows per tile: 8 rows per warp row-group, 8 / groups row groups (64, 32 or 16 rows).
__device__ __forceinline__ int flow_col_groups(int H) { return H <= 128 ? 1 : (H <= 256 ? 2 : 4); }
__device__ __forceinline__ int flow_tile_rows(int H) { return 64 / flow_col_groups(H); }

// Per-block vector-gradient accumulator layout (flow_eval_bwd / flow_vec_reduce):
//   w_z @0, w_t @H, w_out @2H, per layer l: gamma @3H+3Hl, beta @+H, b @+2H (unused for l = 0),
//   b_out @3H+3H·depth; V = 3H + 3H·depth + 1.
__device__ __forceinline__ int flow_vec_len(int H, int depth) { return 3 * H + 3 * H * depth + 1; }

// ---------------------------------------------------------------------------------------------
// Φ⁻¹(p): dfpo_inv_normal_cdf in common.cuh.
__device__ __forceinline__ double flow_inv_normal_cdf(double p) { return dfpo_inv_normal_cdf(p); }

// out[r] = Φ⁻¹((k+½)/K), k = r mod K (kind 0), or Φ⁻¹(uniform_open(seed, r)) (kind 1);
// clamped to [-trunc, trunc] when truncate != 0. Computed in double, rounded once to float.
extern "C" __global__ void flow_noise(float* __restrict__ out, long long rows, int K, int kind, u64 seed,
                                      int truncate, double trunc) {
    long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    double p = kind == 0 ? ((double)(r % K) + 0.5) / (double)K : uniform_open(seed, (u64)r);
    double e = flow_inv_normal_cdf(p);
    if (truncate) e = fmin(fmax(e, -trunc), trunc);
    out[r] = (float)e;
}

// ---------------------------------------------------------------------------------------------
// C(m, n) = [accumulate ? C(m, n) : 0] + Σ_{k in slice} A(m, k)·B(k, n) [+ bias[n]]
// with A(m, k) = A[m·sam + k·sak], B(k, n) = B[k·sbk + n·sbn], C(m, n) = C[z·slice_stride + m·ldc + n],
// slice z = blockIdx.z covering k in [z·kchunk, min(K, (z+1)·kchunk)). 64x64 tiles, BK = 16,
// 4x4 outputs per thread. Tile loads pick the element order that is coalesced for the stride given.
#define GEMM_BM 64
#define GEMM_BN 64
#define GEMM_BK 16
extern "C" __global__ void __launch_bounds__(256)
flow_gemm(const float* __restrict__ A, long long sam, long long sak, const float* __restrict__ B, long long sbk,
          long long sbn, float* __restrict__ C, long long ldc, long long slice_stride, int M, int N, long long K,
          long long kchunk, const float* __restrict__ bias, int accumulate) {
    __shared__ __align__(16) float As[GEMM_BK][GEMM_BM + 4];
    __shared__ __align__(16) float Bs[GEMM_BK][GEMM_BN + 4];
    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
    const int m0 = blockIdx.y * GEMM_BM, n0 = blockIdx.x * GEMM_BN;
    const long long kb = (long long)blockIdx.z * kchunk;
    const long long ke = min(K, kb + kchunk);
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    for (long long k0 = kb; k0 < ke; k0 += GEMM_BK) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            int e = tid + 256 * q;  // 0..1023
            int mi, ki;
            if (sak == 1) { mi = e / GEMM_BK; ki = e % GEMM_BK; } else { mi = e % GEMM_BM; ki = e / GEMM_BM; }
            long long gm = m0 + mi, gk = k0 + ki;
            As[ki][mi] = (gm < M && gk < ke) ? __ldg(A + gm * sam + gk * sak) : 0.0f;
            int ni, kj;
            if (sbn == 1) { kj = e / GEMM_BN; ni = e % GEMM_BN; } else { ni = e / GEMM_BK; kj = e % GEMM_BK; }
            long long gn = n0 + ni, gk2 = k0 + kj;
            Bs[kj][ni] = (gn < N && gk2 < ke) ? __ldg(B + gk2 * sbk + gn * sbn) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GEMM_BK; ++kk) {
            float4 a4 = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
            float4 b4 = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
            float a[4] = {a4.x, a4.y, a4.z, a4.w};
            float b[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    float* Cz = C + (long long)blockIdx.z * slice_stride;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int m = m0 + ty * 4 + i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int n = n0 + tx * 4 + j;
            if (n >= N) continue;
            float val = acc[i][j];
            if (bias) val += __ldg(bias + n);
            float* c = Cz + (long long)m * ldc + n;
            *c = accumulate ? *c + val : val;
        }
    }
}

// dst[i] += Σ_{s < S} part[s·len + i], summed in slice order (deterministic).
extern "C" __global__ void flow_reduce_slices(const float* __restrict__ part, int S, long long len,
                                              float* __restrict__ dst) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    float s = 0.0f;
    for (int q = 0; q < S; ++q) s += part[(long long)q * len + i];
    dst[i] += s;
}

// part[s][col] = Σ_{r in slice s} X[r·cols + col], slice s = blockIdx.y covers rows_per_slice rows.
extern "C" __global__ void flow_colsum_partial(const float* __restrict__ X, long long rows, int cols,
                                               long long rows_per_slice, float* __restrict__ part) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    long long rb = (long long)blockIdx.y * rows_per_slice;
    long long re = min(rows, rb + rows_per_slice);
    float s = 0.0f;
    for (long long r = rb; r < re; ++r) s += X[r * cols + col];
    part[(long long)blockIdx.y * cols + col] = s;
}

// WT[(l-1)·H² + j·H + i] = W_l[i·H + j] for l = 1..depth-1 (n = (depth-1)·H² elements).
extern "C" __global__ void flow_transpose(const float* __restrict__ hp, int H, int depth, float* __restrict__ WT) {
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long HH = (long long)H * H;
    if (e >= (long long)(depth - 1) * HH) return;
    int l = (int)(e / HH) + 1;
    long long rem = e % HH;
    int j = (int)(rem / H), i = (int)(rem % H);
    WT[e] = __ldg(hp + flow_layer_off(H, l) + (long long)i * H + j);
}

// ---------------------------------------------------------------------------------------------
// Tile matmul: Y[TR][H] = X[TR][H]·M[H][H] (+ bias), M row-major [in][out] in global memory, X and
// Y in shared memory (they may be the same buffer). Preconditions: X complete (caller synced).
// Postcondition: the caller must __syncthreads() before reading Y.
// Warp w: column group cg = w mod CG (CG = 1, 2, 4 for H <= 128, 256, 512), row group rg = w / CG;
// each thread owns rows rg·8 .. rg·8+7 and the 4 consecutive columns cg·128 + 4·lane .. +3 (one
// float4 of each W row: a warp reads 512 contiguous bytes), guarded by < H. Per k: 8 broadcast X
// reads (as float4 over 4 k) and one float4 W read feed 32 FMAs.
__device__ __forceinline__ void flow_tile_matmul(const float* X, float* Y, const float* __restrict__ M,
                                                 const float* __restrict__ bias, int H) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int cgn = flow_col_groups(H);
    const int rg = warp / cgn, cg = warp % cgn;
    const int row0 = rg * FLOW_RT;
    const int col = cg * 128 + 4 * lane;
    const bool cv = col < H;  // H % 4 == 0: the float4 is all in or all out
    float acc[FLOW_RT][4];
#pragma unroll
    for (int i = 0; i < FLOW_RT; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][c] = 0.0f;
    const float* xr = X + row0 * H;
    const float4* mk = reinterpret_cast<const float4*>(M + (cv ? col : 0));
    const int H4 = H >> 2;
    if (cv) {
#pragma unroll 1
        for (int k = 0; k < H; k += 4) {
            float4 x4[FLOW_RT];
#pragma unroll
            for (int i = 0; i < FLOW_RT; ++i) x4[i] = *reinterpret_cast<const float4*>(xr + i * H + k);
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const float4 w4 = __ldg(mk);
                mk += H4;
                const float w[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
                for (int i = 0; i < FLOW_RT; ++i) {
                    const float x = kk == 0 ? x4[i].x : kk == 1 ? x4[i].y : kk == 2 ? x4[i].z : x4[i].w;
#pragma unroll
                    for (int c = 0; c < 4; ++c) acc[i][c] = fmaf(x, w[c], acc[i][c]);
                }
            }
        }
    }
    __syncthreads();  // every thread has finished reading X (Y may alias X)
    if (cv) {
        const float4 b = bias ? __ldg(reinterpret_cast<const float4*>(bias + col)) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int i = 0; i < FLOW_RT; ++i)
            *reinterpret_cast<float4*>(Y + (row0 + i) * H + col) =
                make_float4(acc[i][0] + b.x, acc[i][1] + b.y, acc[i][2] + b.z, acc[i][3] + b.w);
    }
}

// Everything a tile evaluation needs.
struct FlowTile {
    const float* hp;  // head parameters
    const float* u;   // [n_tok][H] conditioning
    int H, depth, K;
    long long R;      // rows in the problem
    long long row0;   // first row of this tile
    int TR;           // rows per tile
};

// Forward per-row pass of layer l (one warp per row, lane j covers columns j, j+32, ...; the row
// stays in shared memory between the passes, which keeps registers low).
// Input: l == 0: a_0 from u, ze[r], te[r] (tangent of a_0 = w_z); l >= 1: a_l in X[r] (tangent in T[r]).
// Output: l < depth-1 or SAVE: h_l -> X[r] (dh_l -> T[r]); otherwise v -> vout[r] (and ∂v/∂z ->
// vzout[r]). SAVE also stores a_l to ga[r] and h_l (l < depth-1) to gh[r] (global, tile-relative).
// Rows past the end get zeros in X (and T) so later matmuls read finite values, and zeros in
// vout (vzout) on the last layer.
template <bool TAN, bool SAVE>
__device__ void flow_row_pass(const FlowTile& t, int l, float* X, float* T, const float* ze, const float* te,
                              float* vout, float* vzout, float* ga, float* gh) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int H = t.H;
    const float invH = 1.0f / (float)H;
    const bool last = l == t.depth - 1;
    const float* gamma = t.hp + flow_gamma_off(H, l);
    const float* beta = gamma + H;
    const float* wz = t.hp + H;
    const float* wt = t.hp + 2 * H;
    const float* wout = t.hp + flow_layer_off(H, t.depth);
    for (int r = warp; r < t.TR; r += FLOW_WARPS) {
        const long long grow = t.row0 + r;
        float* xr = X + r * H;
        float* tr = TAN ? T + r * H : nullptr;
        if (grow >= t.R) {  // warp-uniform branch
            for (int j = lane; j < H; j += 32) {
                xr[j] = 0.0f;
                if (TAN) tr[j] = 0.0f;
            }
            // The caller reads vout (vzout) of every tile row, past the end too (the emulator
            // found flow_integrate reading them uninitialised).
            if (last && !SAVE && lane == 0) {
                vout[r] = 0.0f;
                if (TAN) vzout[r] = 0.0f;
            }
            continue;
        }
        // pass 1: a (saved) -> g = GELU(a) into X; dg = GELU'(a)·da into T
        float s = 0.0f, m1 = 0.0f;
        if (l == 0) {
            const float z = ze[r], tau = te[r];
            const float* ur = t.u + (grow / t.K) * (long long)H;
            for (int j = lane; j < H; j += 32) {
                const float wzj = __ldg(wz + j);
                const float a = __ldg(ur + j) + wzj * z + __ldg(wt + j) * tau;
                if (SAVE) ga[(long long)r * H + j] = a;
                const float g = gelu_tanh(a);
                xr[j] = g;
                s += g;
                if (TAN) {
                    const float dg = gelu_tanh_grad(a) * wzj;
                    tr[j] = dg;
                    m1 += dg;
                }
            }
        } else {
            for (int j = lane; j < H; j += 32) {
                const float a = xr[j];
                if (SAVE) ga[(long long)r * H + j] = a;
                const float g = gelu_tanh(a);
                xr[j] = g;
                s += g;
                if (TAN) {
                    const float dg = gelu_tanh_grad(a) * tr[j];
                    tr[j] = dg;
                    m1 += dg;
                }
            }
        }
        const float mean = warp_sum(s) * invH;
        // pass 2: population variance (two-pass)
        float s2 = 0.0f;
        for (int j = lane; j < H; j += 32) {
            const float d = xr[j] - mean;
            s2 += d * d;
        }
        const float rstd = 1.0f / sqrtf(warp_sum(s2) * invH + FLOW_LN_EPS);
        // pass 3 (tangent): dxhat = rstd·(dg − mean(dg) − xhat·mean(xhat·dg))
        float m2 = 0.0f;
        if (TAN) {
            for (int j = lane; j < H; j += 32) m2 += (xr[j] - mean) * rstd * tr[j];
            m1 = warp_sum(m1) * invH;
            m2 = warp_sum(m2) * invH;
        }
        // pass 4: h = gamma·xhat + beta (and dh = gamma·dxhat), or the output layer's dot products
        float vs = 0.0f, vzs = 0.0f;
        for (int j = lane; j < H; j += 32) {
            const float xh = (xr[j] - mean) * rstd;
            const float gj = __ldg(gamma + j);
            const float h = gj * xh + __ldg(beta + j);
            float dh = 0.0f;
            if (TAN) dh = gj * ((tr[j] - m1 - xh * m2) * rstd);
            if (last && !SAVE) {
                const float wo = __ldg(wout + j);
                vs += h * wo;
                if (TAN) vzs += dh * wo;
            } else {
                xr[j] = h;
                if (TAN) tr[j] = dh;
                if (SAVE && !last) gh[(long long)r * H + j] = h;
            }
        }
        if (last && !SAVE) {
            vs = warp_sum(vs);
            if (TAN) vzs = warp_sum(vzs);
            if (lane == 0) {
                vout[r] = vs + __ldg(wout + H);
                if (TAN) vzout[r] = vzs;
            }
        }
    }
}

// One MLP evaluation of the tile at (ze[r], te[r]) -> vout[r] (and ∂v/∂z -> vzout[r] when TAN).
// Precondition: ze/te written and synced. Postcondition: caller syncs before reading vout.
template <bool TAN>
__device__ void flow_tile_eval(const FlowTile& t, float* X, float* T, const float* ze, const float* te,
                               float* vout, float* vzout) {
    flow_row_pass<TAN, false>(t, 0, X, T, ze, te, vout, vzout, nullptr, nullptr);
    for (int l = 1; l < t.depth; ++l) {
        __syncthreads();
        const float* W = t.hp + flow_layer_off(t.H, l);
        flow_tile_matmul(X, X, W, W + (long long)t.H * t.H, t.H);
        if (TAN) flow_tile_matmul(T, T, W, nullptr, t.H);
        __syncthreads();
        flow_row_pass<TAN, false>(t, l, X, T, ze, te, vout, vzout, nullptr, nullptr);
    }
}

template <bool TAN>
__device__ void flow_integrate_impl(const float* __restrict__ hp, int H, int depth, const float* __restrict__ u,
                                    int K, long long R, const float* __restrict__ z0, const float* __restrict__ t0p,
                                    const float* __restrict__ t1p, float t0v, float t1v, int steps, int midpoint,
                                    int clip, float lo, float hi, float* __restrict__ z1, float* __restrict__ jac) {
    float* sm = reinterpret_cast<float*>(dfpo_dyn_smem());
    FlowTile t;
    t.hp = hp; t.u = u; t.H = H; t.depth = depth; t.K = K; t.R = R;
    t.TR = flow_tile_rows(H);
    t.row0 = (long long)blockIdx.x * t.TR;
    const int TR = t.TR;
    float* X = sm;
    float* T = X + TR * H;
    float* rows = TAN ? T + TR * H : T;  // per-row state arrays
    float* zs = rows;
    float* Js = zs + TR;
    float* t0s = Js + TR;
    float* dts = t0s + TR;
    float* ze = dts + TR;
    float* te = ze + TR;
    float* v = te + TR;
    float* vz = v + TR;
    float* Jm = vz + TR;
    const int tid = threadIdx.x;
    if (tid < TR) {
        const long long g = t.row0 + tid;
        const bool ok = g < R;
        const float a = ok ? (t0p ? t0p[g] : t0v) : 0.0f;
        const float b = ok ? (t1p ? t1p[g] : t1v) : 0.0f;
        zs[tid] = ok ? z0[g] : 0.0f;
        Js[tid] = 1.0f;
        t0s[tid] = a;
        dts[tid] = (b - a) / (float)steps;
    }
    for (int s = 0; s < steps; ++s) {
        if (tid < TR) {
            ze[tid] = zs[tid];
            te[tid] = t0s[tid] + (float)s * dts[tid];
        }
        __syncthreads();
        flow_tile_eval<TAN>(t, X, T, ze, te, v, vz);
        __syncthreads();
        if (midpoint) {
            if (tid < TR) {
                const float half = 0.5f * dts[tid];
                ze[tid] = zs[tid] + half * v[tid];
                te[tid] = te[tid] + half;
                if (TAN) Jm[tid] = Js[tid] + half * vz[tid] * Js[tid];
            }
            __syncthreads();
            flow_tile_eval<TAN>(t, X, T, ze, te, v, vz);
            __syncthreads();
        }
        if (tid < TR) {
            const float dt = dts[tid];
            float z = zs[tid] + dt * v[tid];
            float J = 0.0f;
            if (TAN) J = Js[tid] + dt * vz[tid] * (midpoint ? Jm[tid] : Js[tid]);
            if (clip) {
                if (z < lo) { z = lo; J = 0.0f; }
                else if (z > hi) { z = hi; J = 0.0f; }
            }
            zs[tid] = z;
            if (TAN) Js[tid] = J;
        }
        // the next step's first write (ze/te by the same threads) is ordered; the sync at the
        // top of the next step orders everything else.
    }
    if (tid < TR) {
        const long long g = t.row0 + tid;
        if (g < R) {
            z1[g] = zs[tid];
            if (TAN) jac[g] = Js[tid];
        }
    }
}

// Integrates dz/dτ = v(z, τ | u_tok) over [τ0, τ1] per row (t0p/t1p per row, or t0v/t1v shared when
// the pointer is null) with `steps` Euler (midpoint = 0) or midpoint steps; clamps z to [lo, hi]
// after every step when clip != 0. flow_integrate_jac also carries J = ∂z/∂z0 (forward mode).
// Grid: ceil(R / TR) blocks of 256 threads; dynamic smem: (nbuf·TR·H + 9·TR)·4 bytes, nbuf = 2
// with J, else 1.
extern "C" __global__ void __launch_bounds__(FLOW_THREADS, 2)
flow_integrate(const float* __restrict__ hp, int H, int depth, const float* __restrict__ u, int K, long long R,
               const float* __restrict__ z0, const float* __restrict__ t0p, const float* __restrict__ t1p, float t0v,
               float t1v, int steps, int midpoint, int clip, float lo, float hi, float* __restrict__ z1) {
    flow_integrate_impl<false>(hp, H, depth, u, K, R, z0, t0p, t1p, t0v, t1v, steps, midpoint, clip, lo, hi, z1,
                               nullptr);
}

extern "C" __global__ void __launch_bounds__(FLOW_THREADS, 2)
flow_integrate_jac(const float* __restrict__ hp, int H, int depth, const float* __restrict__ u, int K, long long R,
                   const float* __restrict__ z0, const float* __restrict__ t0p, const float* __restrict__ t1p,
                   float t0v, float t1v, int steps, int midpoint, int clip, float lo, float hi, float* __restrict__ z1,
                   float* __restrict__ jac) {
    flow_integrate_impl<true>(hp, H, depth, u, K, R, z0, t0p, t1p, t0v, t1v, steps, midpoint, clip, lo, hi, z1, jac);
}

// v[r] = v(z[r], tau[r] | u_{r/K}). Grid: ceil(R / TR) blocks; dynamic smem (TR·H + 4·TR)·4 bytes.
extern "C" __global__ void __launch_bounds__(FLOW_THREADS, 2)
flow_eval_fwd(const float* __restrict__ hp, int H, int depth, const float* __restrict__ u, int K, long long R,
              const float* __restrict__ z, const float* __restrict__ tau, float* __restrict__ v) {
    float* sm = reinterpret_cast<float*>(dfpo_dyn_smem());
    FlowTile t;
    t.hp = hp; t.u = u; t.H = H; t.depth = depth; t.K = K; t.R = R;
    t.TR = flow_tile_rows(H);
    t.row0 = (long long)blockIdx.x * t.TR;
    const int TR = t.TR;
    float* X = sm;
    float* ze = X + TR * H;
    float* te = ze + TR;
    float* vs = te + TR;
    const int tid = threadIdx.x;
    if (tid < TR) {
        const long long g = t.row0 + tid;
        ze[tid] = g < R ? z[g] : 0.0f;
        te[tid] = g < R ? tau[g] : 0.0f;
    }
    __syncthreads();
    flow_tile_eval<false>(t, X, nullptr, ze, te, vs, nullptr);
    __syncthreads();
    if (tid < TR) {
        const long long g = t.row0 + tid;
        if (g < R) v[g] = vs[tid];
    }
}

// ---------------------------------------------------------------------------------------------
// Backward. Per tile: forward recompute writing a_l -> wa[l] and h_l -> wh[l] (l < depth-1), then
// reverse through the layers with dh in shared memory:
//   dbeta_l += Σ_r dh ; dgamma_l += Σ_r dh·xhat ; δ_l = dL/da_l = gelu'(a)·rstd·(dxhat − mean(dxhat)
//   − xhat·mean(dxhat·xhat)), dxhat = dh·gamma ; δ_l -> wa[l] (overwrites a_l) ; l >= 1: db_l += Σ δ,
//   dh_{l-1} = δ_l·W_lᵀ (tile matmul with WT) ; l = 0: dw_z += Σ δ z, dw_t += Σ δ τ, dz += δ·w_z.
// Vector gradients are column sums over the tile by one thread per column into a per-block
// accumulator in shared memory (fixed order, no atomics); the block writes it to partial[blockIdx.x].
// Blocks loop over tiles (tile = blockIdx.x + k·gridDim.x).
// wa: [depth][R][H], wh: [depth-1][R][H], WT: [depth-1][H][H], partial: [gridDim.x][V].
// Dynamic smem: (2·TR·H + V + 3·TR)·4 bytes.
extern "C" __global__ void __launch_bounds__(FLOW_THREADS, 2)
flow_eval_bwd(const float* __restrict__ hp, const float* __restrict__ WT, int H, int depth,
              const float* __restrict__ u, int K, long long R, const float* __restrict__ z,
              const float* __restrict__ tau, const float* __restrict__ dv, float* __restrict__ dz,
              float* __restrict__ wa, float* __restrict__ wh, float* __restrict__ partial) {
    float* sm = reinterpret_cast<float*>(dfpo_dyn_smem());
    const int TR = flow_tile_rows(H);
    const int V = flow_vec_len(H, depth);
    const float invH = 1.0f / (float)H;
    float* X = sm;
    float* Y = X + TR * H;
    float* acc = Y + TR * H;
    float* zs = acc + V;
    float* ts = zs + TR;
    float* dvs = ts + TR;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const long long RH = R * (long long)H;
    const float* wz = hp + H;
    const float* wout = hp + flow_layer_off(H, depth);
    for (int e = tid; e < V; e += FLOW_THREADS) acc[e] = 0.0f;

    const long long ntiles = (R + TR - 1) / TR;
    for (long long tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        FlowTile t;
        t.hp = hp; t.u = u; t.H = H; t.depth = depth; t.K = K; t.R = R; t.TR = TR;
        t.row0 = tile * TR;
        const int nvalid = (int)min((long long)TR, R - t.row0);
        __syncthreads();  // the previous tile is done with shared memory
        if (tid < TR) {
            const long long g = t.row0 + tid;
            const bool ok = tid < nvalid;
            zs[tid] = ok ? z[g] : 0.0f;
            ts[tid] = ok ? tau[g] : 0.0f;
            dvs[tid] = ok ? dv[g] : 0.0f;
        }
        __syncthreads();
        // ---- forward recompute, saving a_l and h_l
        const long long toff = t.row0 * H;
        flow_row_pass<false, true>(t, 0, X, nullptr, zs, ts, nullptr, nullptr, wa + toff, wh + toff);
        for (int l = 1; l < depth; ++l) {
            __syncthreads();
            const float* W = hp + flow_layer_off(H, l);
            flow_tile_matmul(X, X, W, W + (long long)H * H, H);
            __syncthreads();
            flow_row_pass<false, true>(t, l, X, nullptr, zs, ts, nullptr, nullptr, wa + l * RH + toff,
                                       l < depth - 1 ? wh + l * RH + toff : nullptr);
        }
        __syncthreads();
        // ---- output layer: X = h_last. dw_out += Σ dv·h ; db_out += Σ dv ; Y = dh_last = dv·w_out.
        for (int j = tid; j < H; j += FLOW_THREADS) {
            const float wo = __ldg(wout + j);
            float s = 0.0f;
            for (int r = 0; r < TR; ++r) {
                if (r < nvalid) s += dvs[r] * X[r * H + j];
                Y[r * H + j] = dvs[r] * wo;  // 0 for rows past the end
            }
            acc[2 * H + j] += s;
        }
        if (tid == 0) {
            float s = 0.0f;
            for (int r = 0; r < nvalid; ++r) s += dvs[r];
            acc[3 * H + 3 * H * depth] += s;
        }
        for (int l = depth - 1; l >= 0; --l) {
            __syncthreads();  // Y = dh_l complete
            float* accl = acc + 3 * H + 3 * H * l;  // gamma, beta, b of layer l
            for (int j = tid; j < H; j += FLOW_THREADS) {
                float s = 0.0f;
                for (int r = 0; r < nvalid; ++r) s += Y[r * H + j];
                accl[H + j] += s;  // dbeta
            }
            __syncthreads();  // the dbeta column pass has read Y before the row pass overwrites it
            const float* gamma = hp + flow_gamma_off(H, l);
            float* wal = wa + l * RH + toff;
            for (int r = warp; r < TR; r += FLOW_WARPS) {
                float* xr = X + r * H;
                float* yr = Y + r * H;
                if (r >= nvalid) {  // warp-uniform
                    for (int j = lane; j < H; j += 32) {
                        xr[j] = 0.0f;
                        yr[j] = 0.0f;
                    }
                    continue;
                }
                float* ar = wal + (long long)r * H;
                // recompute g = GELU(a_l) into X, then the LayerNorm statistics
                float s = 0.0f;
                for (int j = lane; j < H; j += 32) {
                    const float g = gelu_tanh(ar[j]);
                    xr[j] = g;
                    s += g;
                }
                const float mean = warp_sum(s) * invH;
                float s2 = 0.0f;
                for (int j = lane; j < H; j += 32) {
                    const float d = xr[j] - mean;
                    s2 += d * d;
                }
                const float rstd = 1.0f / sqrtf(warp_sum(s2) * invH + FLOW_LN_EPS);
                // dxhat = dh·gamma; X = dh·xhat (for dgamma); means for the LayerNorm backward
                float m1 = 0.0f, m2 = 0.0f;
                for (int j = lane; j < H; j += 32) {
                    const float xh = (xr[j] - mean) * rstd;
                    const float dh = yr[j];
                    const float dx = dh * __ldg(gamma + j);
                    xr[j] = dh * xh;
                    m1 += dx;
                    m2 += dx * xh;
                }
                m1 = warp_sum(m1) * invH;
                m2 = warp_sum(m2) * invH;
                // δ = GELU'(a)·rstd·(dxhat − m1 − xhat·m2) -> Y and the workspace (over a_l)
                float dzs = 0.0f;
                for (int j = lane; j < H; j += 32) {
                    const float a = ar[j];
                    const float xh = (gelu_tanh(a) - mean) * rstd;
                    const float dx = yr[j] * __ldg(gamma + j);
                    const float d = rstd * (dx - m1 - xh * m2) * gelu_tanh_grad(a);
                    yr[j] = d;
                    ar[j] = d;
                    if (l == 0) dzs += d * __ldg(wz + j);
                }
                if (l == 0 && dz) {
                    dzs = warp_sum(dzs);
                    if (lane == 0) dz[t.row0 + r] += dzs;
                }
            }
            __syncthreads();
            // column pass: dgamma from X, and db_l (l >= 1) or dw_z, dw_t (l = 0) from Y = δ_l
            for (int j = tid; j < H; j += FLOW_THREADS) {
                float sg = 0.0f, sb = 0.0f, st = 0.0f;
                for (int r = 0; r < nvalid; ++r) {
                    sg += X[r * H + j];
                    const float d = Y[r * H + j];
                    if (l > 0) {
                        sb += d;
                    } else {
                        sb += d * zs[r];
                        st += d * ts[r];
                    }
                }
                accl[j] += sg;
                if (l > 0) {
                    accl[2 * H + j] += sb;
                } else {
                    acc[j] += sb;      // w_z
                    acc[H + j] += st;  // w_t
                }
            }
            if (l > 0) {
                __syncthreads();  // the column pass has read X before the matmul overwrites it
                flow_tile_matmul(Y, X, WT + (long long)(l - 1) * H * H, nullptr, H);  // X = δ_l·W_lᵀ
                float* tmp = X;
                X = Y;
                Y = tmp;  // Y = dh_{l-1}
            }
        }
    }
    __syncthreads();
    for (int e = tid; e < V; e += FLOW_THREADS) partial[(long long)blockIdx.x * V + e] = acc[e];
}

// dparams (head-relative) += Σ_b partial[b][e], mapped from the accumulator layout to the parameter
// layout. One thread per accumulator element; blocks summed in order (deterministic).
extern "C" __global__ void flow_vec_reduce(const float* __restrict__ partial, int nblocks, int H, int depth,
                                           float* __restrict__ dhp) {
    const int V = flow_vec_len(H, depth);
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= V) return;
    long long off;
    if (e < H) {
        off = H + e;  // w_z
    } else if (e < 2 * H) {
        off = 2LL * H + (e - H);  // w_t
    } else if (e < 3 * H) {
        off = flow_layer_off(H, depth) + (e - 2 * H);  // w_out
    } else if (e == V - 1) {
        off = flow_layer_off(H, depth) + H;  // b_out
    } else {
        const int q = e - 3 * H;
        const int l = q / (3 * H), w = (q % (3 * H)) / H, j = q % H;
        if (w == 2 && l == 0) return;  // layer 0 has no bias of its own (b_in belongs to the cond op)
        const long long g = flow_gamma_off(H, l);
        off = w == 0 ? g + j : w == 1 ? g + H + j : flow_layer_off(H, l) + (long long)H * H + j;
    }
    float s = 0.0f;
    for (int b = 0; b < nblocks; ++b) s += partial[(long long)b * V + e];
    dhp[off] += s;
}

// du[tok·H + j] += Σ_{k < K} delta[(tok·K + k)·H + j] for tok < ntok.
extern "C" __global__ void flow_segsum(const float* __restrict__ delta, int K, long long ntok, int H,
                                       float* __restrict__ du) {
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= ntok * H) return;
    const long long tok = e / H;
    const int j = (int)(e % H);
    const float* d = delta + tok * K * (long long)H + j;
    float s = 0.0f;
    for (int k = 0; k < K; ++k) s += d[(long long)k * H];
    du[e] += s;
}
