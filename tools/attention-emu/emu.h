// emu.h: a small CUDA emulator for checking kernels/attention.cu on a machine without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext stacks, switched with _setjmp/_longjmp); blocks
// run one after another. A fiber runs until it reaches a synchronisation point:
//   __syncthreads           a block barrier (all threads of the block must arrive, else deadlock);
//   warp collectives        __shfl_xor_sync, ldmatrix (att_ldsm_x4, att_ldsm_x4_t) and
//                           mma.m16n8k16 (att_mma): all 32 lanes deposit their operands, the last
//                           one computes every lane's result from the PTX ISA fragment layouts
//                           (written out below, independently of the kernel's index math).
// cp.async copies are deferred: they land only when the issuing thread waits for their group
// (att_cp_wait<N>), so a read before the wait sees stale data (the shared memory of every block
// starts as 0xFF bytes: NaN in bf16 and fp32). A shadow of the shared memory records, per byte and
// barrier epoch, who wrote and who read it; two different threads touching a byte in the same
// epoch with at least one write is reported as a race (like compute-sanitizer's racecheck).
// The scheduling order of fibers can be forward, reversed or random per pass, and so can the
// order in which the blocks of a grid run.
#pragma once
#define DFPO_EMU 1

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Static __shared__ arrays become function statics: one copy, used by the block that runs (blocks
// run one at a time). Unlike the dynamic shared memory they are not race-tracked or poisoned.
#define __shared__ static

struct dim3_t {
    unsigned x = 1, y = 1, z = 1;
};
static dim3_t threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __int_as_float(unsigned i) { return __int_as_float((int)i); }
inline float __uint_as_float(unsigned i) { return __int_as_float((int)i); }
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline unsigned __float_as_uint(float f) { return (unsigned)__float_as_int(f); }
using std::isfinite;
using std::isnan;
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// bf16 with round-to-nearest-even conversion, as cuda_bf16.h.
struct __nv_bfloat16 {
    uint16_t x;
};
struct __nv_bfloat162 {
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
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16(a), __float2bfloat16(b)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }

namespace emu {

[[noreturn]] inline void fail(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::fprintf(stderr, "EMU FAIL: ");
    std::vfprintf(stderr, fmt, ap);
    std::fprintf(stderr, "\n");
    va_end(ap);
    std::exit(1);
}

struct Copy {
    unsigned dst;
    const void* src;
    int bytes, src_bytes;
};

enum Kind { K_SHFL = 1, K_LDSM, K_LDSM_T, K_MMA, K_SYNCWARP, K_SHFL_IDX, K_SHFL_UP, K_SHFL_DOWN, K_BALLOT };

struct WarpSt {
    int arrived = 0;
    long gen = 0;
    int kind = -1;
    alignas(16) unsigned char in[32][64];
    alignas(16) unsigned char out[32][64];
};

constexpr size_t STACK = 512 * 1024;

struct State {
    const char* kernel = "";
    int nthreads = 0, cur = 0;
    std::vector<ucontext_t> ctx;
    struct JB {
        jmp_buf b;
    };
    std::vector<JB> jb;
    std::vector<char*> stacks;
    std::vector<char> done, started;
    jmp_buf sched;
    int bar_arrived = 0;
    long bar_gen = 0, events = 0, epoch = 1;
    std::vector<WarpSt> warps;
    unsigned char* smem = nullptr;
    size_t smem_bytes = 0;
    std::vector<long> w_ep, r_ep;
    std::vector<int> w_tid, r_tid;
    std::vector<std::vector<std::vector<Copy>>> groups;  // [thread][committed group]
    std::vector<std::vector<Copy>> open;                 // [thread]: not yet committed
    std::function<void()> body;
    int order = 0;        // threads of a block: 0 forward, 1 reverse, 2 random
    int block_order = 0;  // blocks of a grid: 0 forward, 1 reverse, 2 random
    // When not empty: run only these blocks (linear index x + gx (y + gy z)) of the next launch,
    // e.g. the last rows of a real-size problem whose buffers are sparse mappings.
    std::vector<long long> only_blocks;
    std::mt19937 rng{12345};
    long races = 0, collectives = 0, blocks = 0;
};
inline State E;

inline void yield() {
    if (!_setjmp(E.jb[E.cur].b)) _longjmp(E.sched, 1);
}

inline void race(const char* what, unsigned off, int a, int b) {
    if (E.races < 10)
        std::fprintf(stderr, "EMU RACE in %s (block %u,%u,%u): %s at shared byte %u between threads %d and %d\n",
                     E.kernel, blockIdx.x, blockIdx.y, blockIdx.z, what, off, a, b);
    E.races++;
}

// Records a shared-memory access of n bytes at offset off by thread tid in the current epoch.
inline void track(unsigned off, unsigned n, bool write, int tid) {
    if ((size_t)off + n > E.smem_bytes)
        fail("%s: shared access [%u, %u) outside the %zu bytes of dynamic shared memory", E.kernel, off, off + n,
             E.smem_bytes);
    for (unsigned i = off; i < off + n; ++i) {
        if (write) {
            if (E.w_ep[i] == E.epoch && E.w_tid[i] != tid) race("write after write", i, E.w_tid[i], tid);
            if (E.r_ep[i] == E.epoch && E.r_tid[i] != tid) race("write after read", i, E.r_tid[i], tid);
            E.w_ep[i] = E.epoch;
            E.w_tid[i] = tid;
        } else {
            if (E.w_ep[i] == E.epoch && E.w_tid[i] != tid) race("read after write", i, E.w_tid[i], tid);
            if (E.r_ep[i] == E.epoch) {
                if (E.r_tid[i] != tid) E.r_tid[i] = -1;  // several readers
            } else {
                E.r_ep[i] = E.epoch;
                E.r_tid[i] = tid;
            }
        }
    }
}

inline unsigned smem_off(const void* p) {
    const unsigned char* c = (const unsigned char*)p;
    if (c < E.smem || c > E.smem + E.smem_bytes) fail("%s: pointer %p is not in shared memory", E.kernel, p);
    return (unsigned)(c - E.smem);
}

// All 32 lanes of the calling warp deposit `in`; the last to arrive runs f(ins, outs) for all.
template <class In, class Out, class F>
Out collective(int kind, const In& in, F&& f) {
    static_assert(sizeof(In) <= 64 && sizeof(Out) <= 64, "collective operand size");
    const int tid = E.cur, w = tid / 32, lane = tid % 32;
    WarpSt& ws = E.warps[w];
    if (ws.arrived == 0)
        ws.kind = kind;
    else if (ws.kind != kind)
        fail("%s: warp %d lanes reached different collectives (%d vs %d)", E.kernel, w, ws.kind, kind);
    std::memcpy(ws.in[lane], &in, sizeof(In));
    const long gen = ws.gen;
    E.events++;
    if (++ws.arrived == 32) {
        const In* ins[32];
        Out outs[32];
        for (int l = 0; l < 32; ++l) ins[l] = reinterpret_cast<const In*>(ws.in[l]);
        f(ins, outs, w);
        for (int l = 0; l < 32; ++l) std::memcpy(ws.out[l], &outs[l], sizeof(Out));
        ws.arrived = 0;
        ws.gen++;
        E.collectives++;
    } else {
        while (ws.gen == gen) yield();
    }
    Out o;
    std::memcpy(&o, ws.out[lane], sizeof(Out));
    return o;
}

inline void fiber_main() {
    E.body();
    E.done[E.cur] = 1;
    E.events++;
    _longjmp(E.sched, 1);
}

inline void run_block() {
    const int n = E.nthreads;
    std::memset(E.smem, 0xFF, E.smem_bytes);
    E.epoch++;
    E.bar_arrived = 0;
    for (auto& w : E.warps) w.arrived = 0;
    for (int i = 0; i < n; ++i) {
        E.groups[i].clear();
        E.open[i].clear();
        E.done[i] = 0;
        E.started[i] = 0;
        getcontext(&E.ctx[i]);
        E.ctx[i].uc_stack.ss_sp = E.stacks[i];
        E.ctx[i].uc_stack.ss_size = STACK;
        E.ctx[i].uc_link = nullptr;
        makecontext(&E.ctx[i], (void (*)())fiber_main, 0);
    }
    std::vector<int> order(n);
    for (;;) {
        for (int i = 0; i < n; ++i) order[i] = E.order == 1 ? n - 1 - i : i;
        if (E.order == 2) std::shuffle(order.begin(), order.end(), E.rng);
        const long ev = E.events;
        bool any = false;
        for (int idx : order) {
            if (E.done[idx]) continue;
            any = true;
            E.cur = idx;
            threadIdx.x = idx;
            if (!_setjmp(E.sched)) {
                if (!E.started[idx]) {
                    E.started[idx] = 1;
                    setcontext(&E.ctx[idx]);
                } else {
                    _longjmp(E.jb[idx].b, 1);
                }
            }
        }
        if (!any) break;
        if (E.events == ev) {
            int waiting_bar = E.bar_arrived, finished = 0;
            for (int i = 0; i < n; ++i) finished += E.done[i];
            fail("%s block (%u,%u,%u): deadlock (%d threads at a barrier, %d finished, of %d)", E.kernel,
                 blockIdx.x, blockIdx.y, blockIdx.z, waiting_bar, finished, n);
        }
    }
    for (int i = 0; i < n; ++i)
        if (!E.groups[i].empty() || !E.open[i].empty())
            fail("%s: thread %d exits with cp.async copies never waited for", E.kernel, i);
    E.blocks++;
}

// Runs body() as every thread of every block of grid x block, with smem_bytes of dynamic shared
// memory.
inline void launch(const char* name, dim3_t grid, dim3_t block, size_t smem_bytes, std::function<void()> body) {
    if (block.y != 1 || block.z != 1 || block.x % 32 != 0 || block.x == 0)
        fail("%s: the emulator runs 1-D blocks of whole warps only", name);
    E.kernel = name;
    E.nthreads = block.x;
    E.body = std::move(body);
    const int n = block.x;
    while ((int)E.stacks.size() < n) E.stacks.push_back((char*)std::aligned_alloc(64, STACK));
    E.ctx.resize(n);
    E.jb.resize(n);
    E.done.assign(n, 0);
    E.started.assign(n, 0);
    E.warps.assign(n / 32, WarpSt{});
    E.groups.assign(n, {});
    E.open.assign(n, {});
    E.smem_bytes = smem_bytes;
    E.smem = (unsigned char*)std::aligned_alloc(128, ((smem_bytes + 127) / 128 + 1) * 128);
    E.w_ep.assign(smem_bytes, 0);
    E.r_ep.assign(smem_bytes, 0);
    E.w_tid.assign(smem_bytes, 0);
    E.r_tid.assign(smem_bytes, 0);
    blockDim = {block.x, 1, 1};
    gridDim = grid;
    // Blocks run one at a time, in launch order (x fastest), reversed, or shuffled: a result
    // that depends on the order of blocks (e.g. float atomics) differs between orders.
    std::vector<dim3_t> blocks;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                const long long lin = x + (long long)grid.x * (y + (long long)grid.y * z);
                if (E.only_blocks.empty() ||
                    std::find(E.only_blocks.begin(), E.only_blocks.end(), lin) != E.only_blocks.end())
                    blocks.push_back({x, y, z});
            }
    if (E.block_order == 1) std::reverse(blocks.begin(), blocks.end());
    if (E.block_order == 2) std::shuffle(blocks.begin(), blocks.end(), E.rng);
    for (const dim3_t& b : blocks) {
        blockIdx = b;
        run_block();
    }
    std::free(E.smem);
    E.smem = nullptr;
}

}  // namespace emu

// ---- the CUDA intrinsics and PTX wrappers the kernels use ----

inline void __syncthreads() {
    using namespace emu;
    const long gen = E.bar_gen;
    E.events++;
    if (++E.bar_arrived == E.nthreads) {
        E.bar_arrived = 0;
        E.bar_gen++;
        E.epoch++;
    } else {
        while (E.bar_gen == gen) yield();
    }
}

inline void __syncwarp() {
    struct None {
        int x;
    };
    emu::collective<None, None>(emu::K_SYNCWARP, None{0}, [](const None* const*, None* out, int) {
        for (int l = 0; l < 32; ++l) out[l] = None{0};
    });
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int o) {
    struct In {
        T v;
        int o;
        unsigned mask;
    };
    struct Out {
        T v;
    };
    return emu::collective<In, Out>(emu::K_SHFL, In{v, o, mask}, [](const In* const* in, Out* out, int w) {
               for (int l = 0; l < 32; ++l) {
                   if (in[l]->mask != 0xffffffffu) emu::fail("%s: shfl with a partial mask", emu::E.kernel);
                   if (in[l]->o != in[0]->o) emu::fail("%s: warp %d: lanes shuffle by different offsets", emu::E.kernel, w);
                   out[l].v = in[l ^ (in[l]->o & 31)]->v;
               }
           }).v;
}

// Shuffles other than xor (PTX shfl.sync.idx / .up / .down with the whole warp): lane l reads
// lane src & 31, l - d (its own value below d) or l + d (its own value from 32 - d).
template <class T>
inline T emu_shfl(int kind, unsigned mask, T v, int arg) {
    struct In {
        T v;
        int arg;
        unsigned mask;
    };
    struct Out {
        T v;
    };
    return emu::collective<In, Out>(kind, In{v, arg, mask}, [kind](const In* const* in, Out* out, int w) {
               for (int l = 0; l < 32; ++l) {
                   if (in[l]->mask != 0xffffffffu) emu::fail("%s: shfl with a partial mask", emu::E.kernel);
                   const int a = in[l]->arg;
                   if (kind != emu::K_SHFL_IDX && a != in[0]->arg)
                       emu::fail("%s: warp %d: lanes shuffle by different deltas", emu::E.kernel, w);
                   int src = l;
                   if (kind == emu::K_SHFL_IDX) src = a & 31;
                   if (kind == emu::K_SHFL_UP && l >= a) src = l - a;
                   if (kind == emu::K_SHFL_DOWN && l + a < 32) src = l + a;
                   out[l].v = in[src]->v;
               }
           }).v;
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src) { return emu_shfl(emu::K_SHFL_IDX, mask, v, src); }
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d) { return emu_shfl(emu::K_SHFL_UP, mask, v, (int)d); }
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d) { return emu_shfl(emu::K_SHFL_DOWN, mask, v, (int)d); }

inline unsigned __ballot_sync(unsigned mask, bool pred) {
    struct In {
        int p;
        unsigned mask;
    };
    struct Out {
        unsigned b;
    };
    return emu::collective<In, Out>(emu::K_BALLOT, In{pred ? 1 : 0, mask}, [](const In* const* in, Out* out, int) {
               unsigned b = 0;
               for (int l = 0; l < 32; ++l) {
                   if (in[l]->mask != 0xffffffffu) emu::fail("%s: ballot with a partial mask", emu::E.kernel);
                   b |= (unsigned)in[l]->p << l;
               }
               for (int l = 0; l < 32; ++l) out[l].b = b;
           }).b;
}
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

// Atomics: fibers switch only at synchronisation points, so a read-modify-write is atomic.
template <class T>
inline T atomicAdd(T* p, T v) {
    const T old = *p;
    *p = old + v;
    return old;
}

// Round-to-nearest float operations (no contraction on the host either: -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline unsigned long long __float2ull_rn(float f) {
    if (!(f > 0.f)) return 0ull;  // negative and NaN (cvt.rni.u64 saturates; NaN gives 0)
    if (f >= 18446744073709551616.f) return ~0ull;
    return (unsigned long long)std::nearbyint(f);
}

typedef unsigned int emu_u32;

inline emu_u32 att_smem_u32(const void* p) { return emu::smem_off(p); }
inline char* att_dyn_smem() { return (char*)emu::E.smem; }

inline void att_cp_issue(emu_u32 dst, const void* src, bool valid, int bytes) {
    using namespace emu;
    if (dst % bytes) fail("%s: cp.async destination %u not %d-byte aligned", E.kernel, dst, bytes);
    if (((uintptr_t)src) % bytes) fail("%s: cp.async source %p not %d-byte aligned", E.kernel, src, bytes);
    if (src == nullptr) fail("%s: cp.async from a null pointer", E.kernel);
    track(dst, bytes, true, E.cur);
    E.open[E.cur].push_back(Copy{dst, src, bytes, valid ? bytes : 0});
}
inline void att_cp16(emu_u32 dst, const void* src, bool valid) { att_cp_issue(dst, src, valid, 16); }
inline void att_cp4(emu_u32 dst, const void* src, bool valid) { att_cp_issue(dst, src, valid, 4); }
inline void att_cp_commit() {
    using namespace emu;
    E.groups[E.cur].push_back(std::move(E.open[E.cur]));
    E.open[E.cur].clear();
}
template <int N>
inline void att_cp_wait() {
    using namespace emu;
    auto& gs = E.groups[E.cur];
    while ((int)gs.size() > N) {
        for (const Copy& c : gs.front()) {
            if (c.src_bytes) std::memcpy(E.smem + c.dst, c.src, c.src_bytes);
            std::memset(E.smem + c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
            track(c.dst, c.bytes, true, E.cur);
        }
        gs.erase(gs.begin());
    }
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lane 8m + r gives the address of row r of
// matrix m (8 contiguous b16). Without .trans lane l receives, for matrix m, row l/4 elements
// 2(l%4), 2(l%4)+1; with .trans it receives rows 2(l%4) and 2(l%4)+1 of column l/4. The element
// with the lower index goes to the low 16 bits.
inline void att_ldsm_impl(emu_u32 (&r)[4], emu_u32 addr, bool trans) {
    struct Out {
        emu_u32 r[4];
    };
    Out o = emu::collective<emu_u32, Out>(
        trans ? emu::K_LDSM_T : emu::K_LDSM, addr, [trans](const emu_u32* const* in, Out* out, int w) {
            using namespace emu;
            for (int l = 0; l < 32; ++l) {
                if (*in[l] % 16) fail("%s: ldmatrix row address %u not 16-byte aligned", E.kernel, *in[l]);
                track(*in[l], 16, false, w * 32 + l);
            }
            auto row = [&](int lane) { return reinterpret_cast<const uint16_t*>(E.smem + *in[lane]); };
            for (int l = 0; l < 32; ++l)
                for (int m = 0; m < 4; ++m) {
                    uint16_t e0, e1;
                    if (!trans) {
                        e0 = row(m * 8 + l / 4)[2 * (l % 4)];
                        e1 = row(m * 8 + l / 4)[2 * (l % 4) + 1];
                    } else {
                        e0 = row(m * 8 + 2 * (l % 4))[l / 4];
                        e1 = row(m * 8 + 2 * (l % 4) + 1)[l / 4];
                    }
                    out[l].r[m] = (emu_u32)e0 | ((emu_u32)e1 << 16);
                }
        });
    for (int i = 0; i < 4; ++i) r[i] = o.r[i];
}
inline void att_ldsm_x4(emu_u32 (&r)[4], emu_u32 addr) { att_ldsm_impl(r, addr, false); }
inline void att_ldsm_x4_t(emu_u32 (&r)[4], emu_u32 addr) { att_ldsm_impl(r, addr, true); }

inline float emu_bf16_lo(emu_u32 v) { return __bfloat162float(__nv_bfloat16{(uint16_t)(v & 0xffff)}); }
inline float emu_bf16_hi(emu_u32 v) { return __bfloat162float(__nv_bfloat16{(uint16_t)(v >> 16)}); }

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, fragments as in the PTX ISA
// (g = lane / 4, t = lane % 4):
//   A: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C/D: c0 = (g, 2t), c1 = (g, 2t+1), c2 = (g+8, 2t), c3 = (g+8, 2t+1)
inline void att_mma(float (&c)[4], const emu_u32 (&a)[4], emu_u32 b0, emu_u32 b1) {
    struct In {
        emu_u32 a[4], b[2];
        float c[4];
    };
    struct Out {
        float d[4];
    };
    In in{{a[0], a[1], a[2], a[3]}, {b0, b1}, {c[0], c[1], c[2], c[3]}};
    Out o = emu::collective<In, Out>(emu::K_MMA, in, [](const In* const* x, Out* out, int) {
        float A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < 32; ++l) {
            const int g = l / 4, t = l % 4;
            const In& f = *x[l];
            A[g][2 * t] = emu_bf16_lo(f.a[0]);
            A[g][2 * t + 1] = emu_bf16_hi(f.a[0]);
            A[g + 8][2 * t] = emu_bf16_lo(f.a[1]);
            A[g + 8][2 * t + 1] = emu_bf16_hi(f.a[1]);
            A[g][2 * t + 8] = emu_bf16_lo(f.a[2]);
            A[g][2 * t + 9] = emu_bf16_hi(f.a[2]);
            A[g + 8][2 * t + 8] = emu_bf16_lo(f.a[3]);
            A[g + 8][2 * t + 9] = emu_bf16_hi(f.a[3]);
            B[2 * t][g] = emu_bf16_lo(f.b[0]);
            B[2 * t + 1][g] = emu_bf16_hi(f.b[0]);
            B[2 * t + 8][g] = emu_bf16_lo(f.b[1]);
            B[2 * t + 9][g] = emu_bf16_hi(f.b[1]);
            C[g][2 * t] = f.c[0];
            C[g][2 * t + 1] = f.c[1];
            C[g + 8][2 * t] = f.c[2];
            C[g + 8][2 * t + 1] = f.c[3];
        }
        float Dm[16][8];
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 8; ++j) {
                float s = 0.f;
                for (int k = 0; k < 16; ++k) s += A[i][k] * B[k][j];
                Dm[i][j] = C[i][j] + s;
            }
        for (int l = 0; l < 32; ++l) {
            const int g = l / 4, t = l % 4;
            out[l].d[0] = Dm[g][2 * t];
            out[l].d[1] = Dm[g][2 * t + 1];
            out[l].d[2] = Dm[g + 8][2 * t];
            out[l].d[3] = Dm[g + 8][2 * t + 1];
        }
    });
    for (int i = 0; i < 4; ++i) c[i] = o.d[i];
}

inline emu_u32 att_pack_bf16(float lo, float hi) {
    return (emu_u32)__float2bfloat16(lo).x | ((emu_u32)__float2bfloat16(hi).x << 16);
}

template <typename T>
inline T att_lds(const T* p) {
    emu::track(emu::smem_off(p), sizeof(T), false, emu::E.cur);
    return *p;
}
template <typename T>
inline void att_sts(T* p, T v) {
    emu::track(emu::smem_off(p), sizeof(T), true, emu::E.cur);
    *p = v;
}
