// generate.cu: glue kernels of generation on the device (src/model/generate_cuda.rs; the CPU
// generator src/model/generate.rs is the reference of the whole loop).
// Defines:
//   gen_prefill_cache  after the batched prefill of P prompts: for every row r (prompt r / n_samples)
//                      and position p < len[r / n]: k_cache[r][g][p][:] = k[(r / n)·S + p][g][:] and
//                      the same for v (the n samples of a prompt copy its one prefill)
//   gen_decode_cache   k_cache[r][g][pos[r]][:] = k[r][g][:] and the same for v (one decode token per row)
//   gen_gather_last    out[r][:] = hidden[(r / n)·S + len[r / n] − 1][:] (each row's last prompt token)
//   gen_step           after sampling step t: per row not yet finished, record the token (and its
//                      log-probs), set the next decode input and position, the finished flag on a
//                      stop id; then t += 1, counter += advance, and the count of active rows
// Caches are [rows][Hkv][max_len][D] bf16 (handled as 16-bit words: pure copies).
#include "common.cuh"

typedef unsigned short u16;

// The generation state in device memory (src/model/generate_cuda.rs GenState, same layout).
struct GenState {
    u64 seed;     // sampling seed
    u64 counter;  // sampling counter of the next step (advances by `advance` per step)
    u64 advance;  // rows of the caller (the CPU generator advances by its row count)
    u32 step;     // the next step's index t (0-based new token)
    u32 n_stop;   // stop ids in use
    u32 active;   // rows not finished after the last step
    u32 bad_row;  // 0xffffffff, or the first active row the sampler could not sample
};

extern "C" __global__ void gen_prefill_cache(const u16* __restrict__ k, const u16* __restrict__ v,
                                             u16* __restrict__ kc, u16* __restrict__ vc,
                                             const u32* __restrict__ plen, int n_samples, int S, int Hkv,
                                             int max_len, int D, int rows) {
    const long long total = (long long)rows * Hkv * S * D;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int d = (int)(i % D);
        const int p = (int)((i / D) % S);
        const int g = (int)((i / ((long long)D * S)) % Hkv);
        const int r = (int)(i / ((long long)D * S * Hkv));
        const int q = r / n_samples;
        if (p >= (int)plen[q]) continue;
        const long long src = (((long long)q * S + p) * Hkv + g) * D + d;
        const long long dst = (((long long)r * Hkv + g) * max_len + p) * D + d;
        kc[dst] = k[src];
        vc[dst] = v[src];
    }
}

extern "C" __global__ void gen_decode_cache(const u16* __restrict__ k, const u16* __restrict__ v,
                                            u16* __restrict__ kc, u16* __restrict__ vc,
                                            const u32* __restrict__ pos, int Hkv, int max_len, int D,
                                            int rows) {
    const long long total = (long long)rows * Hkv * D;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int d = (int)(i % D);
        const int g = (int)((i / D) % Hkv);
        const int r = (int)(i / ((long long)D * Hkv));
        const u32 p = pos[r];
        if (p >= (u32)max_len) continue;  // never for positions the host planned
        const long long dst = (((long long)r * Hkv + g) * max_len + p) * D + d;
        kc[dst] = k[i];
        vc[dst] = v[i];
    }
}

extern "C" __global__ void gen_gather_last(const u16* __restrict__ hidden, u16* __restrict__ out,
                                           const u32* __restrict__ plen, int n_samples, int S, int H,
                                           int rows) {
    const long long total = (long long)rows * H;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int c = (int)(i % H);
        const int r = (int)(i / H);
        const int q = r / n_samples;
        const long long t = (long long)q * S + (long long)plen[q] - 1;
        out[i] = hidden[t * H + c];
    }
}

// One block (any size). tok / lps / lpp / n_kept: the sampler's outputs of this step, [rows].
// out_tok / out_lps / out_lpp: [rows][max_new]. cur_tok, pos, cache_lens, finished, n_tok: [rows].
extern "C" __global__ void gen_step(GenState* __restrict__ st, const u32* __restrict__ tok,
                                    const float* __restrict__ lps, const float* __restrict__ lpp,
                                    const u32* __restrict__ n_kept, const u32* __restrict__ stop_ids,
                                    const u32* __restrict__ plen, int n_samples, int rows, int max_new,
                                    u32* __restrict__ out_tok, float* __restrict__ out_lps,
                                    float* __restrict__ out_lpp, u32* __restrict__ cur_tok,
                                    u32* __restrict__ pos, u32* __restrict__ cache_lens,
                                    u32* __restrict__ finished, u32* __restrict__ n_tok) {
    __shared__ u32 s_active, s_bad;
    const u32 t = st->step;
    const u32 n_stop = st->n_stop;
    if (threadIdx.x == 0) {
        s_active = 0u;
        s_bad = st->bad_row;
    }
    __syncthreads();
    if (t < (u32)max_new) {
        for (int r = threadIdx.x; r < rows; r += blockDim.x) {
            if (finished[r]) continue;
            const u32 x = tok[r];
            const long long o = (long long)r * max_new + t;
            out_tok[o] = x;
            out_lps[o] = lps[r];
            out_lpp[o] = lpp[r];
            n_tok[r] = t + 1u;
            cur_tok[r] = x;
            pos[r] = plen[r / n_samples] + t;
            cache_lens[r] = plen[r / n_samples] + t + 1u;
            if (n_kept[r] == 0u) atomicMin(&s_bad, (u32)r);
            bool stop = false;
            for (u32 i = 0; i < n_stop; ++i) stop = stop || stop_ids[i] == x;
            if (stop)
                finished[r] = 1u;
            else
                atomicAdd(&s_active, 1u);
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        st->active = s_active;
        st->bad_row = s_bad;
        st->step = t + 1u;
        st->counter += st->advance;
    }
}
