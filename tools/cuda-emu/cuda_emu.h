// cuda_emu.h: what kernels/*.cu see when they are compiled as C++ for the emulated CUDA driver
// (tools/cuda-emu; force-included before each kernel file, with -DDFPO_EMU).
//
// The kernel files are compiled with -fsanitize=thread but WITHOUT the ThreadSanitizer run time:
// the compiler's instrumentation calls __tsan_readN / __tsan_writeN before every memory access
// of kernel code, and emu_runtime.cpp defines those hooks. That is how every shared-memory access
// (static __shared__ arrays and the dynamic shared memory) is race-, bounds- and
// initialisation-checked, and every global access alignment-checked, with no change to the
// kernels. Everything with emulator logic (barriers, warp collectives, ldmatrix, mma, cp.async,
// atomics) is defined in emu_runtime.cpp, which is not instrumented; this header only declares it
// and defines the CUDA types and pure functions.
//
// Static __shared__ arrays become function statics (one copy: blocks run one at a time). The
// link script puts every .bss of the kernel objects into one section, so the run time knows
// where they are. The dynamic shared memory is one buffer of the run time (emu_dyn_smem()).
#pragma once
#define DFPO_EMU 1

#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#ifndef EMU_SCAN  // the build's scan pass keeps them, to read the bounds
#define __launch_bounds__(...)
#endif
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
#define __shared__ static

// ---- index registers (set by the scheduler before it resumes a CUDA thread) ----
struct dim3_t {
    unsigned x, y, z;
};
extern "C" dim3_t threadIdx, blockIdx, blockDim, gridDim;

// A whole-vector copy (a 16- or 8-byte load or store on the GPU) checks the alignment of both
// sides: the compiler may split the copy into smaller accesses, which the hooks would accept.
extern "C" void emu_check_vec_align(const void* p, unsigned bytes);
#define EMU_VEC_COPY(name, bytes)                                              \
    name() = default;                                                          \
    name(const name& o) {                                                      \
        emu_check_vec_align(&o, bytes);                                        \
        v_ = o.v_;                                                             \
    }                                                                          \
    name& operator=(const name& o) {                                           \
        emu_check_vec_align(&o, bytes);                                        \
        emu_check_vec_align(this, bytes);                                      \
        v_ = o.v_;                                                             \
        return *this;                                                          \
    }

// ---- vector types: unions with a GCC vector member, so a whole-vector load or store is one
// 8- or 16-byte access (an instrumented __tsan_read16 etc., alignment-checked by the run time) ----
#define EMU_VEC4(name, T)                                     \
    union alignas(4 * sizeof(T)) name {                       \
        T __attribute__((vector_size(4 * sizeof(T)))) v_;      \
        struct {                                              \
            T x, y, z, w;                                     \
        };                                                    \
        EMU_VEC_COPY(name, 4 * sizeof(T))                     \
    };                                                        \
    inline name make_##name(T a, T b, T c, T d) {             \
        name r;                                               \
        r.x = a;                                              \
        r.y = b;                                              \
        r.z = c;                                              \
        r.w = d;                                              \
        return r;                                             \
    }
#define EMU_VEC2(name, T)                                     \
    union alignas(2 * sizeof(T)) name {                       \
        T __attribute__((vector_size(2 * sizeof(T)))) v_;      \
        struct {                                              \
            T x, y;                                           \
        };                                                    \
        EMU_VEC_COPY(name, 2 * sizeof(T))                     \
    };                                                        \
    inline name make_##name(T a, T b) {                       \
        name r;                                               \
        r.x = a;                                              \
        r.y = b;                                              \
        return r;                                             \
    }
EMU_VEC4(uint4, unsigned)
EMU_VEC4(int4, int)
EMU_VEC4(float4, float)
EMU_VEC2(uint2, unsigned)
EMU_VEC2(int2, int)
EMU_VEC2(float2, float)
EMU_VEC2(double2, double)
EMU_VEC2(ulonglong2, unsigned long long)
EMU_VEC2(longlong2, long long)

// ---- bit casts and integer intrinsics ----
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline unsigned __float_as_uint(float f) {
    unsigned i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline double __longlong_as_double(long long i) {
    double d;
    std::memcpy(&d, &i, 8);
    return d;
}
inline long long __double_as_longlong(double d) {
    long long i;
    std::memcpy(&i, &d, 8);
    return i;
}
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline int __ffsll(unsigned long long x) { return __builtin_ffsll((long long)x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int __clzll(unsigned long long x) { return x ? __builtin_clzll(x) : 64; }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }

// ---- integer min/max as CUDA's overloads ----
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

// ---- float intrinsics: IEEE round-to-nearest (the host compiles with -ffp-contract=off) ----
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanhf(float x) { return std::tanh(x); }
inline float exp10f(float x) { return std::pow(10.0f, x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline void sincosf(float x, float* s, float* c) {
    *s = std::sin(x);
    *c = std::cos(x);
}
// cvt.rni.u64.f32 and friends: round to nearest even, saturating; NaN gives 0.
inline unsigned long long __float2ull_rn(float f) {
    if (!(f > 0.f)) return 0ull;
    if (f >= 18446744073709551616.f) return ~0ull;
    return (unsigned long long)std::nearbyint(f);
}
inline unsigned __float2uint_rn(float f) {
    if (!(f > 0.f)) return 0u;
    if (f >= 4294967296.f) return ~0u;
    return (unsigned)std::nearbyint(f);
}
inline int __float2int_rn(float f) {
    if (f != f) return 0;
    if (f >= 2147483648.f) return 2147483647;
    if (f <= -2147483648.f) return (int)0x80000000u;
    return (int)std::nearbyint(f);
}
inline int __float2int_rz(float f) {
    if (f != f) return 0;
    if (f >= 2147483648.f) return 2147483647;
    if (f <= -2147483648.f) return (int)0x80000000u;
    return (int)f;
}
inline int __float2int_rd(float f) { return __float2int_rz(std::floor(f)); }
inline int __float2int_ru(float f) { return __float2int_rz(std::ceil(f)); }
inline float __int2float_rn(int i) { return (float)i; }
inline float __uint2float_rn(unsigned i) { return (float)i; }
inline double __ull2double_rn(unsigned long long i) { return (double)i; }
inline float __ull2float_rn(unsigned long long i) { return (float)i; }

// ---- bf16, round to nearest even (as cuda_bf16.h) ----
struct alignas(2) __nv_bfloat16 {
    uint16_t x;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)0x7fff};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16(a), __float2bfloat16(b)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return {__float2bfloat16(a), __float2bfloat16(a)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return make_float2(__bfloat162float(v.x), __bfloat162float(v.y)); }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }

// __ldg: a read through the non-coherent cache is an ordinary read here.
template <class T>
inline T __ldg(const T* p) {
    return *p;
}

// ---- the emulator run time (emu_runtime.cpp) ----
extern "C" {
void __syncthreads();
int __syncthreads_count(int pred);
int __syncthreads_and(int pred);
int __syncthreads_or(int pred);
void __syncwarp_mask(unsigned mask);
void __threadfence();
void __threadfence_block();
// A warp shuffle of `bytes` (4 or 8) bytes at *v: kind 0 idx, 1 up, 2 down, 3 xor.
void emu_shfl(int kind, unsigned mask, const void* v, void* out, int bytes, int arg, int width);
unsigned emu_vote(int kind, unsigned mask, int pred);  // 0 ballot, 1 all, 2 any
unsigned emu_match_any(unsigned mask, unsigned long long v);
// atomics: op 0 add, 1 max, 2 min, 3 exch, 4 cas, 5 or, 6 and, 7 xor, 8 inc(wrap); type 0 i32,
// 1 u32, 2 u64, 3 f32, 4 f64, 5 i64
void emu_atomic(void* p, int op, int type, const void* v, const void* cmp, void* old);
char* emu_dyn_smem();
unsigned emu_smem_u32(const void* p);
void emu_cp_async(unsigned dst, const void* src, int src_bytes, int bytes);
void emu_cp_commit();
void emu_cp_wait(int n);
void emu_ldmatrix_x4(unsigned* r, unsigned addr, int trans);
void emu_mma_bf16_16816(float* c, const unsigned* a, unsigned b0, unsigned b1);
void emu_trap(const char* what);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) { __syncwarp_mask(mask); }

template <class T>
inline T emu_shfl_t(int kind, unsigned mask, T v, int arg, int width) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 4 or 8 bytes");
    T out;
    emu_shfl(kind, mask, &v, &out, (int)sizeof(T), arg, width);
    return out;
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return emu_shfl_t(0, mask, v, src, width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return emu_shfl_t(1, mask, v, (int)d, width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return emu_shfl_t(2, mask, v, (int)d, width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int o, int width = 32) {
    return emu_shfl_t(3, mask, v, o, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return emu_vote(0, mask, pred); }
inline int __all_sync(unsigned mask, int pred) { return (int)emu_vote(1, mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return (int)emu_vote(2, mask, pred); }
template <class T>
inline unsigned __match_any_sync(unsigned mask, T v) {
    unsigned long long u = 0;
    std::memcpy(&u, &v, sizeof(T) < 8 ? sizeof(T) : 8);
    return emu_match_any(mask, u);
}

template <class T>
struct emu_atomic_type;
template <>
struct emu_atomic_type<int> {
    static constexpr int id = 0;
};
template <>
struct emu_atomic_type<unsigned> {
    static constexpr int id = 1;
};
template <>
struct emu_atomic_type<unsigned long long> {
    static constexpr int id = 2;
};
template <>
struct emu_atomic_type<float> {
    static constexpr int id = 3;
};
template <>
struct emu_atomic_type<double> {
    static constexpr int id = 4;
};
template <>
struct emu_atomic_type<long long> {
    static constexpr int id = 5;
};
template <class T>
inline T emu_atomic_t(T* p, int op, T v, T cmp = T()) {
    T old;
    emu_atomic(p, op, emu_atomic_type<T>::id, &v, &cmp, &old);
    return old;
}
template <class T>
inline T atomicAdd(T* p, T v) {
    return emu_atomic_t(p, 0, v);
}
template <class T>
inline T atomicMax(T* p, T v) {
    return emu_atomic_t(p, 1, v);
}
template <class T>
inline T atomicMin(T* p, T v) {
    return emu_atomic_t(p, 2, v);
}
template <class T>
inline T atomicExch(T* p, T v) {
    return emu_atomic_t(p, 3, v);
}
template <class T>
inline T atomicCAS(T* p, T cmp, T v) {
    return emu_atomic_t(p, 4, v, cmp);
}
template <class T>
inline T atomicOr(T* p, T v) {
    return emu_atomic_t(p, 5, v);
}
template <class T>
inline T atomicAnd(T* p, T v) {
    return emu_atomic_t(p, 6, v);
}
template <class T>
inline T atomicXor(T* p, T v) {
    return emu_atomic_t(p, 7, v);
}
inline unsigned atomicInc(unsigned* p, unsigned v) { return emu_atomic_t(p, 8, v); }

inline void __trap() { emu_trap("__trap()"); }
#define assert(c) ((c) ? (void)0 : emu_trap("assert(" #c ") failed"))

// ---- the PTX wrappers of kernels/attention.cu (its #ifndef DFPO_EMU branch has the asm) ----
inline unsigned att_smem_u32(const void* p) { return emu_smem_u32(p); }
inline char* att_dyn_smem() { return emu_dyn_smem(); }
inline void att_cp16(unsigned dst, const void* src, bool valid) { emu_cp_async(dst, src, valid ? 16 : 0, 16); }
inline void att_cp4(unsigned dst, const void* src, bool valid) { emu_cp_async(dst, src, valid ? 4 : 0, 4); }
inline void att_cp_commit() { emu_cp_commit(); }
template <int N>
inline void att_cp_wait() {
    emu_cp_wait(N);
}
inline void att_ldsm_x4(unsigned (&r)[4], unsigned addr) { emu_ldmatrix_x4(r, addr, 0); }
inline void att_ldsm_x4_t(unsigned (&r)[4], unsigned addr) { emu_ldmatrix_x4(r, addr, 1); }
inline void att_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    emu_mma_bf16_16816(c, a, b0, b1);
}
inline unsigned att_pack_bf16(float lo, float hi) {
    return (unsigned)__float2bfloat16(lo).x | ((unsigned)__float2bfloat16(hi).x << 16);
}
template <typename T>
inline T att_lds(const T* p) {
    return *p;
}
template <typename T>
inline void att_sts(T* p, T v) {
    *p = v;
}

// ---- registration of the kernels of one file (the generated TU lists them) ----
#include <cstddef>
#include <utility>

namespace emu_reg {
using Invoke = void (*)(void* fn, void** params);
extern "C" void emu_register_kernel(const char* name, void* fn, Invoke inv, const unsigned* sizes, int nparams,
                                    unsigned max_threads, const char* file);
template <class... A, std::size_t... I>
void invoke_impl(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<typename std::remove_reference<A>::type*>(p[I])...);
}
template <class... A>
void invoke(void* fn, void** p) {
    invoke_impl(reinterpret_cast<void (*)(A...)>(fn), p, std::index_sequence_for<A...>{});
}
template <class... A>
void reg(const char* name, void (*f)(A...), unsigned max_threads, const char* file) {
    static const unsigned sizes[sizeof...(A) + 1] = {(unsigned)sizeof(A)..., 0u};
    emu_register_kernel(name, reinterpret_cast<void*>(f), &invoke<A...>, sizes, (int)sizeof...(A), max_threads,
                        file);
}
}  // namespace emu_reg
