// common.cuh: helpers shared by every kernel family (inlined into each .cu by build.rs).
// Defines: warp reductions, the tanh-approximated GELU and its derivative, the counter-based
// random uniform used for seeded noise (bit-identical to src/kernels/mod.rs), and limits.
#pragma once

#define DFPO_WARP 32
#define DFPO_FULL_MASK 0xffffffffu

typedef unsigned long long u64;
typedef unsigned int u32;

// The dynamic shared memory of a launch (16-byte aligned). The emulator (tools/cuda-emu, which
// defines DFPO_EMU) has one buffer for it.
#ifdef DFPO_EMU
__device__ __forceinline__ char* dfpo_dyn_smem() { return emu_dyn_smem(); }
#else
__device__ __forceinline__ char* dfpo_dyn_smem() {
    extern __shared__ __align__(16) char dfpo_smem[];
    return dfpo_smem;
}
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(DFPO_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(DFPO_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(DFPO_FULL_MASK, v, o));
    return v;
}

// GELU, tanh approximation (as flax.linen.gelu and torch's approximate="tanh").
#define DFPO_GELU_C 0.7978845608028654f  // sqrt(2/pi)
#define DFPO_GELU_A 0.044715f

__device__ __forceinline__ float gelu_tanh(float x) {
    float t = tanhf(DFPO_GELU_C * (x + DFPO_GELU_A * x * x * x));
    return 0.5f * x * (1.0f + t);
}

__device__ __forceinline__ float gelu_tanh_grad(float x) {
    float u = DFPO_GELU_C * (x + DFPO_GELU_A * x * x * x);
    float t = tanhf(u);
    float du = DFPO_GELU_C * (1.0f + 3.0f * DFPO_GELU_A * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
}

// splitmix64 finaliser: the same bits as dfpo::kernels::splitmix64 on the CPU.
__device__ __forceinline__ u64 splitmix64(u64 x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Uniform in the open interval (0, 1) for (seed, counter): 53 random bits, centred in their cell.
__device__ __forceinline__ double uniform_open(u64 seed, u64 counter) {
    u64 x = splitmix64(seed ^ splitmix64(counter));
    return ((double)(x >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}
