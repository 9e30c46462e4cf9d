// heads.cu: the training heads' losses on the device (issue 11 item 2): the clipped-PPO actor
// loss, the PPO value loss, the quantile critic loss and the DFPO flow-critic loss (the risk terms
// come from risk.cu's risk_loss). CPU references: the HostKernel impls in src/train/heads.rs.
// Defines:
//   heads_actor_rows     per token: w·(ppo, clipped, old−lp, entropy, kl-loss) in double
//   heads_actor_bwd      dlp += dl·w·(dppo + β·dkl), dent += −dl·ent_coef·w
//   heads_value_rows     per token: w·(½·max((v−R)², (v_clip−R)²), clipped)
//   heads_value_bwd      dv += dl·w·d(loss)/dv (v and dv f32 or bf16)
//   heads_quantile_rows  per token: w·quantile-Huber, then the risk row loss and w·terms
//   heads_quantile_bwd   dq += dl·(w·dHuber/dq + risk gradient) (q and dq f32 or bf16)
//   heads_add            out = a + b (the flow readout ẑ = ε + v_read)
//   heads_flow_rows      per token: the DCFM, BCFM and consistency terms, the risk row loss, w·terms
//   heads_flow_bwd       the three evaluations' gradients (+ the risk gradient on v_read)
//   heads_finish         one block: column sums of the per-token rows (fixed order), the loss as a
//                        weighted sum of them, the statistics as chosen columns
// Per-token contributions are written to their own rows and summed by one block in a fixed order:
// deterministic, no atomics. Tokens whose weight is 0 contribute nothing (as on the host).
#include <cuda_bf16.h>
#include "common.cuh"

typedef __nv_bfloat16 bf16;

#define HEADS_BLOCK 256
#define HEADS_MAX_COLS 8
#define HEADS_LOG_RATIO_CLAMP 20.0f

__device__ __forceinline__ long long heads_tid() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long heads_stride() { return (long long)gridDim.x * blockDim.x; }

__device__ __forceinline__ float heads_ld(const void* p, int is_bf16, long long i) {
    return is_bf16 ? __bfloat162float(((const bf16*)p)[i]) : ((const float*)p)[i];
}

// x += g, rounded once to the storage type (the host op's to_host + add + from_host).
__device__ __forceinline__ void heads_acc(void* p, int is_bf16, long long i, float g) {
    if (is_bf16) {
        bf16* q = (bf16*)p;
        q[i] = __float2bfloat16(__bfloat162float(q[i]) + g);
    } else {
        ((float*)p)[i] += g;
    }
}

// heads.rs ppo_token: (loss, dloss/dlogp, clipped).
__device__ __forceinline__ void heads_ppo(float lp, float old, float adv, float lo, float hi, float& l, float& g,
                                          bool& clipped) {
    const float d = lp - old;
    const float c = HEADS_LOG_RATIO_CLAMP;
    const float ratio = expf(fminf(fmaxf(d, -c), c));
    const float s1 = -adv * ratio;
    const float s2 = -adv * fminf(fmaxf(ratio, 1.0f - lo), 1.0f + hi);
    if (s2 > s1) {
        l = s2;
        g = 0.f;
        clipped = true;
    } else {
        l = s1;
        g = fabsf(d) <= c ? s1 : 0.f;
        clipped = false;
    }
}

// heads.rs kl_loss_token: kind 0 = k1, 1 = k3 (verl's clamps).
__device__ __forceinline__ void heads_kl(float lp, float ref, int kind, float& kl, float& g) {
    if (kind == 0) {
        kl = lp - ref;
        g = 1.f;
        return;
    }
    const float d = ref - lp;
    const float c = HEADS_LOG_RATIO_CLAMP;
    const float x = fminf(fmaxf(d, -c), c);
    const float ex = expf(x);
    const float k = ex - x - 1.0f;
    g = (fabsf(d) <= c && k <= 10.0f) ? 1.0f - ex : 0.f;
    kl = fminf(k, 10.0f);
}

// c[i] = w·(ppo loss, clipped, old − lp, entropy, kl loss) (kl_kind < 0: no KL term, column 0).
extern "C" __global__ void heads_actor_rows(const float* __restrict__ lp, const float* __restrict__ ent,
                                            const float* __restrict__ old, const float* __restrict__ adv,
                                            const float* __restrict__ w, const float* __restrict__ ref, long long n,
                                            float lo, float hi, int kl_kind, double* __restrict__ c) {
    for (long long i = heads_tid(); i < n; i += heads_stride()) {
        double* o = c + i * 5;
        const float wi = w[i];
        if (wi == 0.f) {
            o[0] = o[1] = o[2] = o[3] = o[4] = 0.0;
            continue;
        }
        float l, g;
        bool cl;
        heads_ppo(lp[i], old[i], adv[i], lo, hi, l, g, cl);
        const double wd = (double)wi;
        o[0] = wd * (double)l;
        o[1] = cl ? wd : 0.0;
        o[2] = wd * (double)(old[i] - lp[i]);
        o[3] = wd * (double)ent[i];
        if (kl_kind >= 0) {
            float kl, gk;
            heads_kl(lp[i], ref[i], kl_kind, kl, gk);
            o[4] = wd * (double)kl;
        } else {
            o[4] = 0.0;
        }
    }
}

// dl = *d_loss; β = *beta (kl_kind >= 0). dlp / dent may be null (not needed).
extern "C" __global__ void heads_actor_bwd(const float* __restrict__ lp, const float* __restrict__ old,
                                           const float* __restrict__ adv, const float* __restrict__ w,
                                           const float* __restrict__ ref, const float* __restrict__ beta, long long n,
                                           float lo, float hi, float ent_coef, int kl_kind,
                                           const float* __restrict__ d_loss, float* __restrict__ dlp,
                                           float* __restrict__ dent) {
    const float dl = d_loss[0];
    const float b = kl_kind >= 0 ? beta[0] : 0.f;
    for (long long i = heads_tid(); i < n; i += heads_stride()) {
        const float wi = w[i];
        if (dlp != nullptr) {
            float g = 0.f;
            if (wi != 0.f) {
                float l, gp;
                bool cl;
                heads_ppo(lp[i], old[i], adv[i], lo, hi, l, gp, cl);
                float gk = 0.f;
                if (kl_kind >= 0) {
                    float kl;
                    heads_kl(lp[i], ref[i], kl_kind, kl, gk);
                }
                g = dl * wi * (gp + b * gk);
            }
            dlp[i] += g;
        }
        if (dent != nullptr) dent[i] += -dl * ent_coef * wi;
    }
}

// heads.rs ValueLoss::token: (loss, dloss/dv, clipped).
__device__ __forceinline__ void heads_value(float v, float r, float old, float clip, float& l, float& g,
                                            bool& clipped) {
    const float l1 = 0.5f * (v - r) * (v - r);
    clipped = false;
    l = l1;
    g = v - r;
    if (clip <= 0.f) return;
    const float d = fminf(fmaxf(v - old, -clip), clip);
    const float vc = old + d;
    const float l2 = 0.5f * (vc - r) * (vc - r);
    if (l2 > l1) {
        const bool inside = fabsf(v - old) < clip;
        l = l2;
        g = inside ? vc - r : 0.f;
        clipped = true;
    }
}

extern "C" __global__ void heads_value_rows(const void* __restrict__ v, int v_bf16, const float* __restrict__ ret,
                                            const float* __restrict__ old, const float* __restrict__ w, long long n,
                                            float clip, double* __restrict__ c) {
    for (long long i = heads_tid(); i < n; i += heads_stride()) {
        const float wi = w[i];
        if (wi == 0.f) {
            c[2 * i] = c[2 * i + 1] = 0.0;
            continue;
        }
        float l, g;
        bool cl;
        heads_value(heads_ld(v, v_bf16, i), ret[i], old[i], clip, l, g, cl);
        c[2 * i] = (double)wi * (double)l;
        c[2 * i + 1] = cl ? (double)wi : 0.0;
    }
}

extern "C" __global__ void heads_value_bwd(const void* __restrict__ v, int v_bf16, const float* __restrict__ ret,
                                           const float* __restrict__ old, const float* __restrict__ w, long long n,
                                           float clip, const float* __restrict__ d_loss, void* __restrict__ dv,
                                           int dv_bf16) {
    const float dl = d_loss[0];
    for (long long i = heads_tid(); i < n; i += heads_stride()) {
        const float wi = w[i];
        float g = 0.f;
        if (wi != 0.f) {
            float l, gv;
            bool cl;
            heads_value(heads_ld(v, v_bf16, i), ret[i], old[i], clip, l, gv, cl);
            g = dl * wi * gv;
        }
        heads_acc(dv, dv_bf16, i, g);
    }
}

// Huber H_κ(u) and its derivative.
__device__ __forceinline__ void heads_huber(float u, float kappa, float& h, float& dh) {
    if (fabsf(u) <= kappa) {
        h = 0.5f * u * u;
        dh = u;
    } else {
        h = kappa * (fabsf(u) - 0.5f * kappa);
        dh = kappa * (u > 0.f ? 1.f : (u < 0.f ? -1.f : 0.f));
    }
}

// c[t] = (w·qh, risk row loss, w·cvar, w·gain, w·shape). terms ([n][4]) and row_loss ([n]) are
// risk_loss's outputs, or null without risk terms.
extern "C" __global__ void heads_quantile_rows(const void* __restrict__ q, int q_bf16, const float* __restrict__ g,
                                               const float* __restrict__ w, long long n, int K, float kappa,
                                               int sum_quantiles, const float* __restrict__ terms,
                                               const float* __restrict__ row_loss, double* __restrict__ c) {
    const float inv = sum_quantiles ? 1.0f / (float)K : 1.0f / (float)(K * K);
    for (long long t = heads_tid(); t < n; t += heads_stride()) {
        const float wt = w[t];
        double qh = 0.0;
        if (wt != 0.f) {
            double total = 0.0;
            for (int i = 0; i < K; ++i) {
                const float qi = heads_ld(q, q_bf16, t * K + i);
                const float tau = ((float)i + 0.5f) / (float)K;
                for (int j = 0; j < K; ++j) {
                    const float u = g[t * K + j] - qi;
                    const float wq = fabsf(tau - (u < 0.f ? 1.f : 0.f));
                    float h, dh;
                    heads_huber(u, kappa, h, dh);
                    total += (double)(wq * h / kappa * inv);
                }
            }
            qh = (double)wt * total;
        }
        double* o = c + t * 5;
        o[0] = qh;
        if (terms != nullptr) {
            o[1] = (double)row_loss[t];
            for (int j = 0; j < 3; ++j) o[2 + j] = (double)wt * (double)terms[t * 4 + j];
        } else {
            o[1] = o[2] = o[3] = o[4] = 0.0;
        }
    }
}

// One thread per (t, i): dq[t][i] += dl·(w_t·Σ_j −wq·dh/κ·inv + risk_grad[t][i]).
extern "C" __global__ void heads_quantile_bwd(const void* __restrict__ q, int q_bf16, const float* __restrict__ g,
                                              const float* __restrict__ w, long long n, int K, float kappa,
                                              int sum_quantiles, const float* __restrict__ risk_grad,
                                              const float* __restrict__ d_loss, void* __restrict__ dq, int dq_bf16) {
    const float dl = d_loss[0];
    const float inv = sum_quantiles ? 1.0f / (float)K : 1.0f / (float)(K * K);
    const long long total = n * K;
    for (long long e = heads_tid(); e < total; e += heads_stride()) {
        const long long t = e / K;
        const int i = (int)(e % K);
        const float wt = w[t];
        float v = 0.f;
        if (wt != 0.f) {
            const float qi = heads_ld(q, q_bf16, e);
            const float tau = ((float)i + 0.5f) / (float)K;
            float gr = 0.f;
            for (int j = 0; j < K; ++j) {
                const float u = g[t * K + j] - qi;
                const float wq = fabsf(tau - (u < 0.f ? 1.f : 0.f));
                float h, dh;
                heads_huber(u, kappa, h, dh);
                gr -= wq * dh / kappa * inv;
            }
            v = gr * wt;
        }
        if (risk_grad != nullptr) v += risk_grad[e];
        heads_acc(dq, dq_bf16, e, v * dl);
    }
}

extern "C" __global__ void heads_add(const float* __restrict__ a, const float* __restrict__ b, long long n,
                                     float* __restrict__ out) {
    for (long long i = heads_tid(); i < n; i += heads_stride()) out[i] = a[i] + b[i];
}

// The flow-critic loss's inputs (heads.rs FlowCriticLoss, ins 0..11).
struct HeadsFlowIns {
    const float *v_read, *v_b, *v_d, *eps, *target, *gc_target, *vel_b, *vel_d, *w_unc, *dmask, *tok_w, *risk_w;
};

// c[t] = (dcfm, bcfm, gc, risk row loss, risk_w·cvar, risk_w·gain, risk_w·shape), each already
// multiplied by the token's weights (tok_w·w_unc·dmask / tok_w·w_unc / tok_w, over K).
extern "C" __global__ void heads_flow_rows(HeadsFlowIns x, long long n, int K, int use_gc,
                                           const float* __restrict__ terms, const float* __restrict__ row_loss,
                                           double* __restrict__ c) {
    const double inv_k = 1.0 / (double)K;
    for (long long t = heads_tid(); t < n; t += heads_stride()) {
        double* o = c + t * 7;
        const float tw = x.tok_w[t];
        if (tw == 0.f) {
            o[0] = o[1] = o[2] = 0.0;
        } else {
            double sd = 0.0, sb = 0.0, sc = 0.0;
            for (long long r = t * K; r < (t + 1) * K; ++r) {
                const double dd = (double)(x.v_d[r] - x.vel_d[r]);
                const double db = (double)(x.v_b[r] - x.vel_b[r]);
                sd += dd * dd;
                sb += db * db;
                if (use_gc) {
                    const double dc = (double)(x.v_read[r] + x.eps[r] - x.gc_target[r]);
                    sc += dc * dc;
                }
            }
            const double w = (double)tw;
            o[0] = w * (double)x.w_unc[t] * (double)x.dmask[t] * sd * inv_k;
            o[1] = w * (double)x.w_unc[t] * sb * inv_k;
            o[2] = w * sc * inv_k;
        }
        if (terms != nullptr) {
            const double rw = (double)x.risk_w[t];
            o[3] = (double)row_loss[t];
            for (int j = 0; j < 3; ++j) o[4 + j] = rw * (double)terms[t * 4 + j];
        } else {
            o[3] = o[4] = o[5] = o[6] = 0.0;
        }
    }
}

// One thread per (t, k): the gradients of v_read (d_read), v_b (d_b), v_d (d_d), each null when
// not needed; risk_grad ([n][K], null without risk terms) is added to v_read's.
extern "C" __global__ void heads_flow_bwd(HeadsFlowIns x, long long n, int K, float w_dcfm, float w_bcfm, float w_gc,
                                          const float* __restrict__ risk_grad, const float* __restrict__ d_loss,
                                          float* __restrict__ d_read, float* __restrict__ d_b, float* __restrict__ d_d) {
    const float dl = d_loss[0];
    const float inv_k = 1.0f / (float)K;
    const long long total = n * K;
    for (long long r = heads_tid(); r < total; r += heads_stride()) {
        const long long t = r / K;
        const float tw = x.tok_w[t];
        float gd = 0.f, gb = 0.f, gr = 0.f;
        if (tw != 0.f) {
            const float s = tw * inv_k * 2.0f;
            const float wu = x.w_unc[t];
            gd = w_dcfm * s * wu * x.dmask[t] * (x.v_d[r] - x.vel_d[r]);
            gb = w_bcfm * s * wu * (x.v_b[r] - x.vel_b[r]);
            gr = w_gc * s * (x.v_read[r] + x.eps[r] - x.gc_target[r]);
        }
        if (risk_grad != nullptr) gr += risk_grad[r];
        if (d_read != nullptr) d_read[r] += gr * dl;
        if (d_b != nullptr) d_b[r] += gb * dl;
        if (d_d != nullptr) d_d[r] += gd * dl;
    }
}

// How heads_finish combines the column sums S_j of c ([n][cols]): loss = Σ_j coef_j·S_j (the
// column scale_col's coefficient further multiplied by *scale when scale is not null), and
// stats[s] = S_{stat_col[s]} for s < n_stats.
struct HeadsFinish {
    double coef[HEADS_MAX_COLS];
    int stat_col[HEADS_MAX_COLS];
    int cols;
    int n_stats;
    int scale_col;
};

extern "C" __global__ void __launch_bounds__(HEADS_BLOCK)
heads_finish(const double* __restrict__ c, long long n, HeadsFinish f, const float* __restrict__ scale,
             float* __restrict__ loss, float* __restrict__ stats) {
    __shared__ double part[HEADS_BLOCK / DFPO_WARP][HEADS_MAX_COLS];
    double acc[HEADS_MAX_COLS];
#pragma unroll
    for (int j = 0; j < HEADS_MAX_COLS; ++j) acc[j] = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x)
        for (int j = 0; j < f.cols; ++j) acc[j] += c[i * f.cols + j];
    const int lane = threadIdx.x % DFPO_WARP, warp = threadIdx.x / DFPO_WARP;
#pragma unroll
    for (int j = 0; j < HEADS_MAX_COLS; ++j) {
        const double v = warp_sum_d(acc[j]);
        if (lane == 0) part[warp][j] = v;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double sum[HEADS_MAX_COLS];
        for (int j = 0; j < HEADS_MAX_COLS; ++j) {
            sum[j] = 0.0;
            for (int w = 0; w < HEADS_BLOCK / DFPO_WARP; ++w) sum[j] += part[w][j];
        }
        double l = 0.0;
        for (int j = 0; j < f.cols; ++j) {
            double cj = f.coef[j];
            if (scale != nullptr && j == f.scale_col) cj *= (double)scale[0];
            l += cj * sum[j];
        }
        loss[0] = (float)l;
        for (int s = 0; s < f.n_stats; ++s) stats[s] = (float)sum[f.stat_col[s]];
    }
}
