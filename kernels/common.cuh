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

// Φ⁻¹(p) in double: Wichura's AS241 (PPND16), the same coefficients as dfpo::kernels::inv_normal_cdf.
__device__ __forceinline__ double dfpo_inv_normal_cdf(double p) {
    double q = p - 0.5;
    if (fabs(q) <= 0.425) {
        double r = 0.180625 - q * q;
        double num = (((((((2509.0809287301226727 * r + 33430.575583588128105) * r + 67265.770927008700853) * r +
                          45921.953931549871457) * r + 13731.693765509461125) * r + 1971.5909503065514427) * r +
                       133.14166789178437745) * r + 3.387132872796366608) * q;
        double den = (((((((5226.495278852545925 * r + 28729.085735721942674) * r + 39307.89580009271061) * r +
                          21213.794301586595867) * r + 5394.1960214247511077) * r + 687.1870074920579083) * r +
                       42.313330701600911252) * r + 1.0);
        return num / den;
    }
    double r = q < 0.0 ? p : 1.0 - p;
    r = sqrt(-log(r));
    double val;
    if (r <= 5.0) {
        r -= 1.6;
        double num = (((((((7.7454501427834140764e-4 * r + 0.0227238449892691845833) * r + 0.24178072517745061177) * r +
                          1.27045825245236838258) * r + 3.64784832476320460504) * r + 5.7694972214606914055) * r +
                       4.6303378461565452959) * r + 1.42343711074968357734);
        double den = (((((((1.05075007164441684324e-9 * r + 5.475938084995344946e-4) * r + 0.0151986665636164571966) * r +
                          0.14810397642748007459) * r + 0.68976733498510000455) * r + 1.6763848301838038494) * r +
                       2.05319162663775882187) * r + 1.0);
        val = num / den;
    } else {
        r -= 5.0;
        double num = (((((((2.01033439929228813265e-7 * r + 2.71155556874348757815e-5) * r + 0.0012426609473880784386) * r +
                          0.026532189526576123093) * r + 0.29656057182850489123) * r + 1.7848265399172913358) * r +
                       5.4637849111641143699) * r + 6.6579046435011037772);
        double den = (((((((2.04426310338993978564e-15 * r + 1.4215117583164458887e-7) * r + 1.8463183175100546818e-5) * r +
                          7.868691311456132591e-4) * r + 0.0148753612908506148525) * r + 0.13692988092273580531) * r +
                       0.59983220655588793769) * r + 1.0);
        val = num / den;
    }
    return q < 0.0 ? -val : val;
}
