// emu_runtime.cpp: the execution engine of the emulated CUDA driver (see README.md here).
//
// Every CUDA thread of a block is a fiber (a ucontext stack, switched with _setjmp/_longjmp);
// the blocks of a grid run one after another, in forward, reverse or random order
// (DFPO_EMU_BLOCK_ORDER=fwd|rev|random, default random; DFPO_EMU_THREAD_ORDER likewise for the
// order in which runnable threads are resumed; DFPO_EMU_SEED seeds both). A fiber runs until it
// reaches a synchronisation point (__syncthreads, a warp collective); the last thread to arrive
// completes it. Warp collectives (shuffles, votes, __syncwarp, ldmatrix, mma.sync) are computed
// from the definitions in the PTX ISA, independently of the kernels' index math.
//
// The checks (each stops the process with the kernel, block and thread named):
//  - shared memory (static __shared__ and dynamic): a shadow per byte records the last writer and
//    readers with the barrier epoch (and the warp's __syncwarp epoch); two threads touching a byte
//    in the same epoch with at least one write is a race (compute-sanitizer racecheck); a read of
//    a byte no thread of this block has written is a read of uninitialised shared memory (the
//    dynamic shared memory is also poisoned with 0xFF bytes at each block); accesses past the
//    dynamic size the launch requested are out of bounds;
//  - barrier divergence: a block in which some threads wait at __syncthreads while others have
//    exited or wait elsewhere; a warp collective whose mask names a lane that never arrives (or
//    does not exist, or has exited); lanes of one mask at different collectives;
//  - global memory: every allocation ends at a PROT_NONE guard page (freed memory becomes
//    PROT_NONE and is never reused), so an access past the end or after free faults and the
//    SIGSEGV handler names it; every access of 2, 4, 8 or 16 bytes must be aligned to its size;
//  - cp.async: copies land at the issuing thread's wait_group; a read of a destination before
//    that, or a thread exiting with copies never waited for, is reported.
// Shared-memory accesses are seen through the -fsanitize=thread instrumentation of the kernel
// objects (__tsan_readN / __tsan_writeN, defined at the end of this file).
#include "emu_internal.h"

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

extern "C" {
dim3_t threadIdx, blockIdx, blockDim, gridDim;
}

// The .bss of the kernel objects (static __shared__ arrays), collected by emu.ld.
extern "C" char __emu_shared_start[] __attribute__((visibility("hidden")));
extern "C" char __emu_shared_end[] __attribute__((visibility("hidden")));

namespace emu {

// ---------------------------------------------------------------- kernel registry
std::map<std::string, KernelInfo>& registry() {
    static std::map<std::string, KernelInfo> r;
    return r;
}

}  // namespace emu

extern "C" void emu_register_kernel(const char* name, void* fn, emu_reg::Invoke inv, const unsigned* sizes,
                                    int nparams, unsigned max_threads, const char* file) {
    emu::KernelInfo k;
    k.name = name;
    k.fn = fn;
    k.inv = inv;
    k.sizes.assign(sizes, sizes + nparams);
    k.max_threads = max_threads;
    k.file = file;
    emu::registry()[name] = k;
}

namespace emu {

// ---------------------------------------------------------------- device memory
// One reserved range; allocations are carved from it in order and never reused.
static char* g_dev_base = nullptr;
static size_t g_dev_cap = 0, g_dev_next = 0;
static std::map<uintptr_t, Alloc> g_allocs;  // by base address
static std::mutex g_mem_mu;
static const size_t PAGE = 4096;

static void dev_reserve() {
    if (g_dev_base) return;
    g_dev_cap = (size_t)4 << 40;  // 4 TiB of address space, nothing committed
    void* p = mmap(nullptr, g_dev_cap, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        g_dev_cap = (size_t)64 << 30;
        p = mmap(nullptr, g_dev_cap, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            std::fprintf(stderr, "cuda-emu: cannot reserve device address space\n");
            std::abort();
        }
    }
    g_dev_base = (char*)p;
}

bool is_device(uintptr_t a) { return g_dev_base && a - (uintptr_t)g_dev_base < g_dev_cap; }

static const unsigned char CANARY = 0xA5;

// Allocates `bytes` (> 0): the data ends 16-byte aligned right before a PROT_NONE page; the
// bytes between the end and that page (fewer than 16) and the slack between the start of the
// first page and the data (less than a page; the page before it is the previous allocation's
// guard page) hold a canary checked at free. Pages never touched cost nothing (the range is
// MAP_NORESERVE), so a real-size buffer of 20 GB of which a test writes a few rows is cheap.
char* dev_alloc(size_t bytes, unsigned long long serial) {
    std::lock_guard<std::mutex> g(g_mem_mu);
    dev_reserve();
    const size_t padded = (bytes + 15) / 16 * 16;
    const size_t pages = (padded + PAGE - 1) / PAGE;
    const size_t span = (pages + 1) * PAGE;  // + the guard page
    if (g_dev_next + span > g_dev_cap) return nullptr;
    char* region = g_dev_base + g_dev_next;
    g_dev_next += span;
    if (mprotect(region, pages * PAGE, PROT_READ | PROT_WRITE) != 0) return nullptr;
    char* base = region + pages * PAGE - padded;
    std::memset(region, CANARY, base - region);  // the slack before the data (< 1 page)
    std::memset(base + bytes, CANARY, padded - bytes);
    Alloc a;
    a.base = (uintptr_t)base;
    a.size = bytes;
    a.padded = padded;
    a.region = (uintptr_t)region;
    a.region_bytes = pages * PAGE;
    a.serial = serial;
    g_allocs[a.base] = a;
    return base;
}

// The allocation (live or freed) containing or nearest below address a.
static const Alloc* find_alloc_locked(uintptr_t a) {
    auto it = g_allocs.upper_bound(a);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    return &it->second;
}

int dev_free(uintptr_t p, std::string& err) {
    std::lock_guard<std::mutex> g(g_mem_mu);
    auto it = g_allocs.find(p);
    if (it == g_allocs.end()) {
        err = "not the start of an allocation";
        return 1;
    }
    Alloc& a = it->second;
    if (a.freed) {
        err = "already freed (double free)";
        return 1;
    }
    for (uintptr_t q = a.region; q < a.base; ++q)
        if (*(unsigned char*)q != CANARY) {
            char b[256];
            std::snprintf(b, sizeof b,
                          "the allocation of %zu bytes at %p was written before its start (byte -%zu, in the "
                          "slack before it)",
                          a.size, (void*)a.base, (size_t)(a.base - q));
            err = b;
            return 2;
        }
    for (size_t i = a.size; i < a.padded; ++i)
        if (((unsigned char*)a.base)[i] != CANARY) {
            char b[256];
            std::snprintf(b, sizeof b,
                          "the allocation of %zu bytes at %p was written past its end (byte %zu, in the "
                          "alignment padding)",
                          a.size, (void*)a.base, i);
            err = b;
            return 2;
        }
    madvise((void*)a.region, a.region_bytes, MADV_DONTNEED);
    mprotect((void*)a.region, a.region_bytes, PROT_NONE);
    a.freed = true;
    return 0;
}

// Checks that [p, p + n) lies inside one live allocation; else describes the problem.
bool dev_range_ok(uintptr_t p, size_t n, std::string& err) {
    std::lock_guard<std::mutex> g(g_mem_mu);
    const Alloc* a = find_alloc_locked(p);
    char b[320];
    if (!a || p >= a->base + a->padded + PAGE) {
        std::snprintf(b, sizeof b, "%p is not a device pointer of this context", (void*)p);
        err = b;
        return false;
    }
    if (a->freed) {
        std::snprintf(b, sizeof b, "%p is in an allocation of %zu bytes that was freed", (void*)p, a->size);
        err = b;
        return false;
    }
    if (p + n > a->base + a->size) {
        std::snprintf(b, sizeof b, "[%p, +%zu) ends %zu bytes past the end of its allocation of %zu bytes at %p",
                      (void*)p, n, (size_t)(p + n - (a->base + a->size)), a->size, (void*)a->base);
        err = b;
        return false;
    }
    return true;
}

std::string describe_address(uintptr_t p) {
    const Alloc* a = find_alloc_locked(p);
    char b[320];
    if (!is_device(p)) {
        std::snprintf(b, sizeof b, "address %p is not device memory (a host pointer or garbage)", (void*)p);
        return b;
    }
    if (!a) {
        std::snprintf(b, sizeof b, "address %p is below every allocation", (void*)p);
        return b;
    }
    if (p >= a->base + a->size) {
        std::snprintf(b, sizeof b,
                      "address %p is %zu bytes past the end of allocation #%llu (%zu bytes at %p)%s", (void*)p,
                      (size_t)(p - a->base - a->size), a->serial, a->size, (void*)a->base,
                      a->freed ? ", which was freed" : "");
        return b;
    }
    std::snprintf(b, sizeof b, "address %p is byte %zu of allocation #%llu (%zu bytes at %p)%s", (void*)p,
                  (size_t)(p - a->base), a->serial, a->size, (void*)a->base,
                  a->freed ? ", which was FREED (use after free)" : "");
    return b;
}

size_t dev_bytes_in_use() {
    std::lock_guard<std::mutex> g(g_mem_mu);
    size_t s = 0;
    for (auto& kv : g_allocs)
        if (!kv.second.freed) s += kv.second.size;
    return s;
}

// ---------------------------------------------------------------- launch state
static const size_t DYN_CAP = 232448;  // 227 KiB: the most a block can opt into on an H100
static const size_t STACK = 256 * 1024;

enum { RUNNABLE = 0, AT_BARRIER = 1, IN_COLLECTIVE = 2, DONE = 3 };

struct Copy {
    unsigned dst;
    const void* src;
    int bytes, src_bytes;
};

struct Fiber {
    char* stack = nullptr;
    ucontext_t ctx;
    jmp_buf start, jb;
    bool made = false;   // the trampoline runs on this stack
    bool begun = false;  // started in the current block
    int state = RUNNABLE;
    std::vector<std::vector<Copy>> groups;  // committed cp.async groups
    std::vector<Copy> open;                 // issued, not yet committed
};

enum CollKind { C_SHFL = 1, C_VOTE, C_SYNCWARP, C_LDSM, C_MMA, C_MATCH };
static const char* coll_name(int k) {
    switch (k) {
        case C_SHFL: return "a shuffle";
        case C_VOTE: return "a vote (__ballot_sync/__all_sync/__any_sync)";
        case C_SYNCWARP: return "__syncwarp";
        case C_LDSM: return "ldmatrix";
        case C_MMA: return "mma.sync";
        case C_MATCH: return "__match_any_sync";
    }
    return "?";
}

struct Group {
    unsigned mask = 0, arrived = 0;
    int kind = 0, sub = 0;
    bool complete = false;
    alignas(16) unsigned char in[32][48];
    alignas(16) unsigned char out[32][48];
};

struct Warp {
    std::vector<Group*> groups;  // pending
    unsigned long wep = 1;       // __syncwarp epoch
};

// Shadow of one byte of shared memory.
struct Sh {
    long long w_ep = 0, r_ep = 0, init = 0;  // epochs; init = block serial when written, -serial
                                             // while a cp.async to it is in flight
    int w_tid = 0, r_tid = 0;                // r_tid -1: several readers
    unsigned w_wep = 0, r_wep = 0;
    short r_warp = 0;                        // -1: readers from several warps
    // Atomics since the last barrier (ordered among themselves, not with plain accesses).
    long long a_ep = 0;
    int a_tid = 0;  // -1: atomics from several threads
    unsigned a_wep = 0;
    short a_warp = 0;  // -1: atomics from several warps
};

struct State {
    const KernelInfo* k = nullptr;
    bool active = false;  // fibers of a launch are running
    int nthreads = 0, cur = -1;
    dim3_t grid{1, 1, 1}, block{1, 1, 1};
    size_t smem_bytes = 0;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    jmp_buf sched;
    int bar_arrived = 0;
    long long epoch = 1, block_serial = 1;
    unsigned char* dyn = nullptr;
    uintptr_t st_base = 0;
    size_t st_size = 0;
    std::vector<Sh> shadow;  // DYN_CAP + st_size entries
    void** params = nullptr;
    std::mt19937_64 rng{1};
    int block_order = 2, thread_order = 2;
    int order_override = -1;                     // cuemu_set_block_order (-1: the environment's)
    bool only_set = false;                       // cuemu_set_only_blocks: run only these blocks
    std::vector<unsigned long long> only_blocks;  // linear block ids, sorted, distinct
    long long launches = 0, blocks_run = 0;
};
static State E;
static std::mutex g_launch_mu;

static void thread_xyz(int tid, unsigned& x, unsigned& y, unsigned& z) {
    x = tid % E.block.x;
    y = (tid / E.block.x) % E.block.y;
    z = tid / (E.block.x * E.block.y);
}

static std::string where(int tid) {
    char b[400];
    unsigned x, y, z;
    if (tid >= 0) {
        thread_xyz(tid, x, y, z);
        std::snprintf(b, sizeof b, "kernel %s (kernels/%s), block (%u,%u,%u), thread (%u,%u,%u) [linear %d, warp %d lane %d]",
                      E.k ? E.k->name.c_str() : "?", E.k ? E.k->file.c_str() : "?", blockIdx.x, blockIdx.y,
                      blockIdx.z, x, y, z, tid, tid / 32, tid % 32);
    } else {
        std::snprintf(b, sizeof b, "kernel %s (kernels/%s), block (%u,%u,%u)", E.k ? E.k->name.c_str() : "?",
                      E.k ? E.k->file.c_str() : "?", blockIdx.x, blockIdx.y, blockIdx.z);
    }
    return b;
}

[[noreturn]] void fail_at(int tid, const char* fmt, ...) {
    std::string w = where(tid);
    char msg[1200];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    std::fprintf(stderr, "\nCUDA-EMU ERROR in %s (grid %u,%u,%u block %u,%u,%u, %zu B dynamic smem): %s\n", w.c_str(),
                 E.grid.x, E.grid.y, E.grid.z, E.block.x, E.block.y, E.block.z, E.smem_bytes, msg);
    std::fflush(stderr);
    _exit(86);
}
#define FAIL(...) fail_at(E.cur, __VA_ARGS__)

// ---------------------------------------------------------------- shared-memory shadow
// Unified shared offsets: [0, DYN_CAP) the dynamic buffer, then the static section.
static inline long long smem_index(uintptr_t a) {
    if (a - (uintptr_t)E.dyn < DYN_CAP) return (long long)(a - (uintptr_t)E.dyn);
    if (a - E.st_base < E.st_size) return (long long)(DYN_CAP + (a - E.st_base));
    return -1;
}
static inline unsigned char* smem_ptr(unsigned off) {
    if (off < DYN_CAP) return E.dyn + off;
    return (unsigned char*)E.st_base + (off - DYN_CAP);
}
static std::string smem_name(long long i) {
    char b[128];
    if (i < (long long)DYN_CAP)
        std::snprintf(b, sizeof b, "dynamic shared byte %lld", i);
    else
        std::snprintf(b, sizeof b, "static __shared__ byte at %p",
                      (void*)(E.st_base + (uintptr_t)(i - DYN_CAP)));
    return b;
}

static std::string tname(int tid) {
    char b[64];
    unsigned x, y, z;
    thread_xyz(tid, x, y, z);
    std::snprintf(b, sizeof b, "thread (%u,%u,%u)", x, y, z);
    return b;
}

// kind: 0 read, 1 write, 2 atomic
static void track(long long idx, unsigned n, int kind, int tid) {
    if (idx < (long long)DYN_CAP && (size_t)idx + n > E.smem_bytes)
        fail_at(tid, "dynamic shared memory access of %u bytes at byte %lld, past the %zu bytes this launch requested",
                n, idx, E.smem_bytes);
    const int w = tid / 32;
    const unsigned wep = E.warps[w].wep;
    for (long long i = idx; i < idx + n; ++i) {
        Sh& s = E.shadow[i];
        if (s.init < 0 && s.init == -E.block_serial)
            fail_at(tid, "%s %s is the destination of a cp.async in flight (issued by %s, before its cp.async.wait_group)",
                    kind == 0 ? "read of" : "write to", smem_name(i).c_str(), tname(s.w_tid).c_str());
        if (kind != 1 && s.init != E.block_serial)
            fail_at(tid, "read of uninitialised shared memory: %s was not written by any thread of this block",
                    smem_name(i).c_str());
        auto ordered = [&](int other, unsigned other_wep) {
            return other == tid || (other >= 0 && other / 32 == w && wep > other_wep);
        };
        if (kind == 2) {  // atomics: ordered among themselves, but not with plain reads and writes
            if (s.w_ep == E.epoch && !ordered(s.w_tid, s.w_wep))
                fail_at(tid, "shared-memory race (atomic after write) on %s: %s wrote it since the last barrier",
                        smem_name(i).c_str(), tname(s.w_tid).c_str());
            if (s.r_ep == E.epoch) {
                const bool ok = s.r_tid >= 0 ? ordered(s.r_tid, s.r_wep) : (s.r_warp == w && wep > s.r_wep);
                if (!ok)
                    fail_at(tid, "shared-memory race (atomic after read) on %s: %s read it since the last barrier",
                            smem_name(i).c_str(), s.r_tid >= 0 ? tname(s.r_tid).c_str() : "several threads");
            }
            if (s.a_ep == E.epoch) {
                if (s.a_tid != tid) s.a_tid = -1;
                if (s.a_warp != w) s.a_warp = -1;
                if (wep > s.a_wep) s.a_wep = wep;
            } else {
                s.a_ep = E.epoch;
                s.a_tid = tid;
                s.a_warp = (short)w;
                s.a_wep = wep;
            }
            s.init = E.block_serial;
            continue;
        }
        if (s.a_ep == E.epoch) {
            const bool ok = s.a_tid >= 0 ? ordered(s.a_tid, s.a_wep) : (s.a_warp == w && wep > s.a_wep);
            if (!ok)
                fail_at(tid, "shared-memory race (%s after atomic) on %s: %s updated it atomically since the last barrier",
                        kind == 1 ? "write" : "read", smem_name(i).c_str(),
                        s.a_tid >= 0 ? tname(s.a_tid).c_str() : "several threads");
        }
        if (kind == 1) {
            if (s.w_ep == E.epoch && !ordered(s.w_tid, s.w_wep))
                fail_at(tid, "shared-memory race (write after write) on %s: %s wrote it since the last barrier",
                        smem_name(i).c_str(), tname(s.w_tid).c_str());
            if (s.r_ep == E.epoch) {
                const bool ok = s.r_tid >= 0 ? ordered(s.r_tid, s.r_wep) : (s.r_warp == w && wep > s.r_wep);
                if (!ok)
                    fail_at(tid, "shared-memory race (write after read) on %s: %s read it since the last barrier",
                            smem_name(i).c_str(), s.r_tid >= 0 ? tname(s.r_tid).c_str() : "several threads");
            }
            s.w_ep = E.epoch;
            s.w_tid = tid;
            s.w_wep = wep;
            s.init = E.block_serial;
        } else {
            if (s.w_ep == E.epoch && !ordered(s.w_tid, s.w_wep))
                fail_at(tid, "shared-memory race (read after write) on %s: %s wrote it since the last barrier",
                        smem_name(i).c_str(), tname(s.w_tid).c_str());
            if (s.r_ep == E.epoch) {
                if (s.r_tid != tid) s.r_tid = -1;
                if (s.r_warp != w) s.r_warp = -1;
                if (wep > s.r_wep) s.r_wep = wep;
            } else {
                s.r_ep = E.epoch;
                s.r_tid = tid;
                s.r_warp = (short)w;
                s.r_wep = wep;
            }
        }
    }
}

static inline void check_align(uintptr_t a, unsigned n, const char* space) {
    if ((n == 2 || n == 4 || n == 8 || n == 16) && (a & (n - 1)))
        FAIL("misaligned %u-byte access to %s at %p (address %% %u = %u)", n, space, (void*)a, n,
             (unsigned)(a & (n - 1)));
}

static inline void access(void* p, unsigned n, int kind) {
    if (!E.active) return;
    const uintptr_t a = (uintptr_t)p;
    const long long i = smem_index(a);
    if (i >= 0) {
        check_align(a, n, "shared memory");
        track(i, n, kind, E.cur);
    } else if (is_device(a)) {
        check_align(a, n, "global memory");
    }
}

// ---------------------------------------------------------------- fibers and scheduling
static void yield_to_scheduler() {
    if (!_setjmp(E.fibers[E.cur].jb)) _longjmp(E.sched, 1);
}

static void fiber_body() {
    E.k->inv(E.k->fn, E.params);
}

static void trampoline() {
    _setjmp(E.fibers[E.cur].start);
    // Reached at the start of every block this fiber runs (E.cur is its index).
    fiber_body();
    Fiber& f = E.fibers[E.cur];
    if (!f.open.empty() || !f.groups.empty())
        FAIL("the thread exits with cp.async copies it never waited for (cp.async.wait_group)");
    f.state = DONE;
    _longjmp(E.sched, 1);
}

static void ensure_fibers(int n) {
    while ((int)E.fibers.size() < n) E.fibers.emplace_back();
    for (int i = 0; i < n; ++i) {
        Fiber& f = E.fibers[i];
        if (f.stack) continue;
        char* m = (char*)mmap(nullptr, STACK + PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                              -1, 0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "cuda-emu: cannot map a fiber stack\n");
            std::abort();
        }
        mprotect(m, PAGE, PROT_NONE);  // overflow guard
        f.stack = m + PAGE;
    }
}

static bool fiber_stack_of(uintptr_t a, int& which) {
    for (size_t i = 0; i < E.fibers.size(); ++i) {
        uintptr_t s = (uintptr_t)E.fibers[i].stack;
        if (s && a + PAGE >= s && a < s + STACK) {
            which = (int)i;
            return true;
        }
    }
    return false;
}

static std::string describe_stuck() {
    std::string s;
    int at_bar = 0, done = 0, in_coll = 0;
    for (int i = 0; i < E.nthreads; ++i) {
        at_bar += E.fibers[i].state == AT_BARRIER;
        done += E.fibers[i].state == DONE;
        in_coll += E.fibers[i].state == IN_COLLECTIVE;
    }
    char b[300];
    std::snprintf(b, sizeof b, "%d of %d threads wait at __syncthreads, %d in warp collectives, %d exited", at_bar,
                  E.nthreads, in_coll, done);
    s = b;
    int shown = 0;
    for (size_t w = 0; w < E.warps.size() && shown < 4; ++w)
        for (Group* g : E.warps[w].groups) {
            if (shown++ >= 4) break;
            unsigned missing = g->mask & ~g->arrived;
            std::snprintf(b, sizeof b, "; warp %zu: %s with mask 0x%08x waits for lanes", w, coll_name(g->kind),
                          g->mask);
            s += b;
            for (int l = 0; l < 32; ++l)
                if (missing >> l & 1) {
                    const int t = (int)w * 32 + l;
                    const char* st = t >= E.nthreads ? "does not exist"
                                     : E.fibers[t].state == DONE ? "exited"
                                     : E.fibers[t].state == AT_BARRIER ? "at __syncthreads"
                                                                       : "in another collective";
                    std::snprintf(b, sizeof b, " %d (%s)", l, st);
                    s += b;
                }
        }
    if (at_bar && at_bar < E.nthreads) {
        s += "; threads not at the barrier:";
        int n = 0;
        for (int i = 0; i < E.nthreads && n < 8; ++i)
            if (E.fibers[i].state != AT_BARRIER) {
                s += " " + tname(i) + (E.fibers[i].state == DONE ? " (exited)" : " (in a collective)");
                ++n;
            }
    }
    return s;
}

static void run_block() {
    const int n = E.nthreads;
    E.block_serial++;
    E.epoch++;
    if (E.smem_bytes) std::memset(E.dyn, 0xFF, E.smem_bytes);
    E.bar_arrived = 0;
    for (auto& w : E.warps) {
        for (Group* g : w.groups) delete g;
        w.groups.clear();
    }
    for (int i = 0; i < n; ++i) {
        Fiber& f = E.fibers[i];
        f.begun = false;
        f.state = RUNNABLE;
        f.groups.clear();
        f.open.clear();
    }
    std::vector<int> order;
    order.reserve(n);
    for (;;) {
        order.clear();
        for (int i = 0; i < n; ++i)
            if (E.fibers[i].state == RUNNABLE) order.push_back(i);
        if (order.empty()) {
            bool all_done = true;
            for (int i = 0; i < n; ++i) all_done &= E.fibers[i].state == DONE;
            if (all_done) break;
            E.cur = -1;
            fail_at(-1, "deadlock or barrier divergence: %s", describe_stuck().c_str());
        }
        if (E.thread_order == 1) std::reverse(order.begin(), order.end());
        if (E.thread_order == 2) std::shuffle(order.begin(), order.end(), E.rng);
        for (int idx : order) {
            Fiber& f = E.fibers[idx];
            if (f.state != RUNNABLE) continue;
            E.cur = idx;
            thread_xyz(idx, threadIdx.x, threadIdx.y, threadIdx.z);
            if (!_setjmp(E.sched)) {
                if (!f.made) {
                    f.made = f.begun = true;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack;
                    f.ctx.uc_stack.ss_size = STACK;
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, (void (*)())trampoline, 0);
                    setcontext(&f.ctx);
                } else if (!f.begun) {
                    f.begun = true;
                    _longjmp(f.start, 1);
                } else {
                    _longjmp(f.jb, 1);
                }
            }
        }
    }
    E.cur = -1;
    E.blocks_run++;
}

// ---------------------------------------------------------------- signals
static void on_segv(int sig, siginfo_t* si, void*) {
    const uintptr_t a = (uintptr_t)si->si_addr;
    if (E.active) {
        int which = -1;
        if (fiber_stack_of(a, which))
            fail_at(E.cur, "stack overflow of the emulated thread (a fiber stack is %zu KiB)", STACK / 1024);
        fail_at(E.cur, "invalid %s access: %s", is_device(a) ? "global memory" : "memory",
                describe_address(a).c_str());
    }
    if (is_device(a)) {
        std::fprintf(stderr, "\nCUDA-EMU ERROR: host code touched device memory directly (signal %d): %s\n", sig,
                     describe_address(a).c_str());
        std::fflush(stderr);
        _exit(86);
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

static void install_signals() {
    static bool done = false;
    if (done) return;
    done = true;
    static char altstack[1 << 16];
    stack_t ss;
    ss.ss_sp = altstack;
    ss.ss_size = sizeof altstack;
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
}

static int env_order(const char* name, int dflt) {
    const char* v = getenv(name);
    if (!v || !*v) return dflt;
    if (!strcmp(v, "fwd") || !strcmp(v, "forward") || !strcmp(v, "0")) return 0;
    if (!strcmp(v, "rev") || !strcmp(v, "reverse") || !strcmp(v, "1")) return 1;
    return 2;
}

static void init_once() {
    static bool done = false;
    if (done) return;
    done = true;
    E.dyn = (unsigned char*)mmap(nullptr, DYN_CAP, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    E.st_base = (uintptr_t)__emu_shared_start;
    E.st_size = (size_t)(__emu_shared_end - __emu_shared_start);
    E.shadow.assign(DYN_CAP + E.st_size, Sh{});
    E.block_order = env_order("DFPO_EMU_BLOCK_ORDER", 2);
    E.thread_order = env_order("DFPO_EMU_THREAD_ORDER", 2);
    const char* seed = getenv("DFPO_EMU_SEED");
    E.rng.seed(seed ? strtoull(seed, nullptr, 10) : 1);
}

size_t static_smem_total() {
    init_once();
    return E.st_size;
}

// Runs one launch to completion. The caller has checked the configuration.
void launch(const KernelInfo* k, dim3_t grid, dim3_t block, size_t smem, void** params) {
    std::lock_guard<std::mutex> g(g_launch_mu);
    init_once();
    install_signals();
    E.k = k;
    E.grid = grid;
    E.block = block;
    E.smem_bytes = smem;
    E.params = params;
    E.nthreads = (int)(block.x * block.y * block.z);
    ensure_fibers(E.nthreads);
    E.warps.assign((E.nthreads + 31) / 32, Warp{});
    blockDim = block;
    gridDim = grid;
    E.launches++;
    const unsigned long long nb = (unsigned long long)grid.x * grid.y * grid.z;
    std::vector<unsigned long long> ids;
    if (E.only_set) {
        // cuemu_set_only_blocks: the listed blocks that exist in this grid (the caller checked
        // them against the grid at cuLaunchKernel; a replayed graph node may have a smaller one).
        for (unsigned long long id : E.only_blocks)
            if (id < nb) ids.push_back(id);
        std::fprintf(stderr, "cuda-emu: %s: running %zu of its %llu blocks (cuemu_set_only_blocks)\n",
                     k->name.c_str(), ids.size(), nb);
    } else {
        ids.resize(nb);
        for (unsigned long long i = 0; i < nb; ++i) ids[i] = i;
    }
    const int order = E.order_override >= 0 ? E.order_override : E.block_order;
    if (order == 1) std::reverse(ids.begin(), ids.end());
    if (order == 2) std::shuffle(ids.begin(), ids.end(), E.rng);
    E.active = true;
    for (unsigned long long id : ids) {
        blockIdx.x = (unsigned)(id % grid.x);
        blockIdx.y = (unsigned)((id / grid.x) % grid.y);
        blockIdx.z = (unsigned)(id / ((unsigned long long)grid.x * grid.y));
        run_block();
    }
    E.active = false;
    E.k = nullptr;
}

void set_only_blocks(const unsigned long long* ids, size_t n, bool on) {
    std::lock_guard<std::mutex> g(g_launch_mu);
    E.only_set = on;
    E.only_blocks.assign(ids, ids + (on ? n : 0));
    std::sort(E.only_blocks.begin(), E.only_blocks.end());
    E.only_blocks.erase(std::unique(E.only_blocks.begin(), E.only_blocks.end()), E.only_blocks.end());
}

bool only_blocks_fit(unsigned long long nb, unsigned long long& bad) {
    std::lock_guard<std::mutex> g(g_launch_mu);
    if (!E.only_set) return true;
    for (unsigned long long id : E.only_blocks)
        if (id >= nb) {
            bad = id;
            return false;
        }
    return true;
}

int set_block_order(int order) {
    std::lock_guard<std::mutex> g(g_launch_mu);
    init_once();
    const int prev = E.order_override >= 0 ? E.order_override : E.block_order;
    E.order_override = order >= 0 && order <= 2 ? order : -1;
    return prev;
}

// ---------------------------------------------------------------- barriers
static void barrier_wait() {
    Fiber& f = E.fibers[E.cur];
    if (++E.bar_arrived == E.nthreads) {
        E.bar_arrived = 0;
        E.epoch++;
        for (int i = 0; i < E.nthreads; ++i)
            if (E.fibers[i].state == AT_BARRIER) E.fibers[i].state = RUNNABLE;
        return;
    }
    f.state = AT_BARRIER;
    yield_to_scheduler();
}

// ---------------------------------------------------------------- warp collectives
// Lane `lane` of warp `w` arrives at a collective of `kind` with `mask`, depositing `in`;
// the last lane of the mask to arrive runs compute(group); every lane then reads its `out`.
template <class F>
static void collective(int kind, int sub, unsigned mask, const void* in, size_t in_bytes, void* out,
                       size_t out_bytes, F&& compute) {
    const int tid = E.cur, w = tid / 32, lane = tid % 32;
    if (!(mask >> lane & 1))
        FAIL("%s with mask 0x%08x that does not name the calling lane %d", coll_name(kind), mask, lane);
    for (int l = 0; l < 32; ++l)
        if ((mask >> l & 1) && w * 32 + l >= E.nthreads)
            FAIL("%s with mask 0x%08x names lane %d, which does not exist (the block has %d threads)",
                 coll_name(kind), mask, l, E.nthreads);
    Warp& W = E.warps[w];
    Group* g = nullptr;
    for (Group* x : W.groups)
        if (!x->complete && x->mask == mask && !(x->arrived >> lane & 1)) {
            g = x;
            break;
        }
    if (!g) {
        for (Group* x : W.groups)
            if (!x->complete && (x->mask & ~x->arrived & (1u << lane)))
                FAIL("warp %d: lane %d reaches %s (mask 0x%08x) while lanes of mask 0x%08x wait for it in %s", w,
                     lane, coll_name(kind), mask, x->mask, coll_name(x->kind));
        g = new Group;  // no value-initialisation of the operand arrays
        g->mask = mask;
        g->kind = kind;
        g->sub = sub;
        W.groups.push_back(g);
    } else if (g->kind != kind || g->sub != sub) {
        FAIL("warp %d: lanes of mask 0x%08x reached different collectives (%s and %s)", w, mask, coll_name(g->kind),
             coll_name(kind));
    }
    std::memcpy(g->in[lane], in, in_bytes);
    g->arrived |= 1u << lane;
    if (g->arrived == g->mask) {
        compute(*g, w);
        g->complete = true;
        for (int l = 0; l < 32; ++l)
            if ((mask >> l & 1) && l != lane) E.fibers[w * 32 + l].state = RUNNABLE;
    } else {
        E.fibers[tid].state = IN_COLLECTIVE;
        yield_to_scheduler();
    }
    std::memcpy(out, g->out[lane], out_bytes);
    // The last lane to leave frees the group.
    g->arrived &= ~(1u << lane);
    if (g->arrived == 0) {
        W.groups.erase(std::find(W.groups.begin(), W.groups.end(), g));
        delete g;
    }
}

}  // namespace emu

using namespace emu;

// ---------------------------------------------------------------- the intrinsics
extern "C" {

void __syncthreads() { barrier_wait(); }

static int sync_reduce(int pred, int op) {
    // Each thread publishes pred in a per-block array (kept across the barrier).
    static std::vector<int> preds;
    preds.resize(E.nthreads);
    preds[E.cur] = pred != 0;
    barrier_wait();
    int r = op == 0 ? 0 : (op == 1 ? 1 : 0);
    for (int i = 0; i < E.nthreads; ++i) {
        if (op == 0) r += preds[i];
        if (op == 1) r &= preds[i];
        if (op == 2) r |= preds[i];
    }
    barrier_wait();  // nobody overwrites preds before everyone has read it
    return r;
}
int __syncthreads_count(int pred) { return sync_reduce(pred, 0); }
int __syncthreads_and(int pred) { return sync_reduce(pred, 1); }
int __syncthreads_or(int pred) { return sync_reduce(pred, 2); }

void __syncwarp_mask(unsigned mask) {
    int dummy = 0, o = 0;
    collective(C_SYNCWARP, 0, mask, &dummy, 4, &o, 4, [](Group&, int w) { E.warps[w].wep++; });
}

void __threadfence() {}
void __threadfence_block() {}

void emu_shfl(int kind, unsigned mask, const void* v, void* out, int bytes, int arg, int width) {
    struct In {
        unsigned long long v;
        int arg, width;
    } in{0, arg, width};
    std::memcpy(&in.v, v, bytes);
    unsigned long long o = 0;
    collective(C_SHFL, kind * 16 + bytes, mask, &in, sizeof in, &o, 8, [kind](Group& g, int w) {
        for (int l = 0; l < 32; ++l) {
            if (!(g.mask >> l & 1)) continue;
            const In& x = *reinterpret_cast<const In*>(g.in[l]);
            const int wd = x.width;
            if (wd < 1 || wd > 32 || (wd & (wd - 1)))
                fail_at(w * 32 + l, "shuffle width %d is not a power of two in [1, 32]", wd);
            const int seg = l & ~(wd - 1);
            int src = l;
            if (kind == 0) src = seg + (x.arg & (wd - 1));
            if (kind == 1) src = (l - seg) >= x.arg ? l - x.arg : l;
            if (kind == 2) src = (l - seg) + x.arg < wd ? l + x.arg : l;
            if (kind == 3) {
                src = l ^ (x.arg & 31);
                if ((src & ~(wd - 1)) != seg) src = l;
            }
            if (!(g.mask >> src & 1))
                fail_at(w * 32 + l, "shuffle: lane %d reads lane %d, which is not in the mask 0x%08x", l, src,
                        g.mask);
            std::memcpy(g.out[l], &reinterpret_cast<const In*>(g.in[src])->v, 8);
        }
    });
    std::memcpy(out, &o, bytes);
}

unsigned emu_vote(int kind, unsigned mask, int pred) {
    int p = pred != 0;
    unsigned o = 0;
    collective(C_VOTE, kind, mask, &p, 4, &o, 4, [kind](Group& g, int) {
        unsigned b = 0;
        for (int l = 0; l < 32; ++l)
            if ((g.mask >> l & 1) && *reinterpret_cast<const int*>(g.in[l])) b |= 1u << l;
        unsigned r = kind == 0 ? b : kind == 1 ? (unsigned)(b == g.mask) : (unsigned)(b != 0);
        for (int l = 0; l < 32; ++l) std::memcpy(g.out[l], &r, 4);
    });
    return o;
}

unsigned emu_match_any(unsigned mask, unsigned long long v) {
    unsigned o = 0;
    collective(C_MATCH, 0, mask, &v, 8, &o, 4, [](Group& g, int) {
        for (int l = 0; l < 32; ++l) {
            if (!(g.mask >> l & 1)) continue;
            unsigned r = 0;
            for (int m = 0; m < 32; ++m)
                if ((g.mask >> m & 1) && !std::memcmp(g.in[l], g.in[m], 8)) r |= 1u << m;
            std::memcpy(g.out[l], &r, 4);
        }
    });
    return o;
}

void emu_atomic(void* p, int op, int type, const void* v, const void* cmp, void* old) {
    static const unsigned sz[] = {4, 4, 8, 4, 8, 8};
    const unsigned n = sz[type];
    const uintptr_t a = (uintptr_t)p;
    if (a & (n - 1)) FAIL("misaligned %u-byte atomic at %p", n, p);
    const long long i = smem_index(a);
    if (i >= 0) track(i, n, 2, E.cur);
    std::memcpy(old, p, n);
    auto apply = [&](auto cur, auto val, auto c) -> decltype(cur) {
        switch (op) {
            case 0: return cur + val;
            case 1: return cur > val ? cur : val;
            case 2: return cur < val ? cur : val;
            case 3: return val;
            case 4: return cur == c ? val : cur;
        }
        return cur;
    };
    auto bits = [&](auto cur, auto val) -> decltype(cur) {
        switch (op) {
            case 5: return cur | val;
            case 6: return cur & val;
            case 7: return cur ^ val;
            case 8: return cur >= val ? 0 : cur + 1;
        }
        return apply(cur, val, val);
    };
    switch (type) {
        case 0: {
            int c, x, y;
            std::memcpy(&c, old, 4);
            std::memcpy(&x, v, 4);
            std::memcpy(&y, cmp, 4);
            int r = op >= 5 ? bits(c, x) : apply(c, x, y);
            std::memcpy(p, &r, 4);
            break;
        }
        case 1: {
            unsigned c, x, y;
            std::memcpy(&c, old, 4);
            std::memcpy(&x, v, 4);
            std::memcpy(&y, cmp, 4);
            unsigned r = op >= 5 ? bits(c, x) : apply(c, x, y);
            std::memcpy(p, &r, 4);
            break;
        }
        case 2: {
            unsigned long long c, x, y;
            std::memcpy(&c, old, 8);
            std::memcpy(&x, v, 8);
            std::memcpy(&y, cmp, 8);
            unsigned long long r = op >= 5 ? bits(c, x) : apply(c, x, y);
            std::memcpy(p, &r, 8);
            break;
        }
        case 5: {
            long long c, x, y;
            std::memcpy(&c, old, 8);
            std::memcpy(&x, v, 8);
            std::memcpy(&y, cmp, 8);
            long long r = op >= 5 ? bits(c, x) : apply(c, x, y);
            std::memcpy(p, &r, 8);
            break;
        }
        case 3: {
            float c, x, y;
            std::memcpy(&c, old, 4);
            std::memcpy(&x, v, 4);
            std::memcpy(&y, cmp, 4);
            if (op >= 5) FAIL("bitwise atomic on float");
            float r = apply(c, x, y);
            std::memcpy(p, &r, 4);
            break;
        }
        case 4: {
            double c, x, y;
            std::memcpy(&c, old, 8);
            std::memcpy(&x, v, 8);
            std::memcpy(&y, cmp, 8);
            if (op >= 5) FAIL("bitwise atomic on double");
            double r = apply(c, x, y);
            std::memcpy(p, &r, 8);
            break;
        }
    }
}

void emu_check_vec_align(const void* p, unsigned bytes) {
    if (!E.active) return;
    const uintptr_t a = (uintptr_t)p;
    if (smem_index(a) >= 0)
        check_align(a, bytes, "shared memory");
    else if (is_device(a))
        check_align(a, bytes, "global memory");
}

char* emu_dyn_smem() { return (char*)E.dyn; }

unsigned emu_smem_u32(const void* p) {
    const long long i = smem_index((uintptr_t)p);
    if (i < 0) FAIL("a shared-state-space address was taken of %p, which is not shared memory", p);
    return (unsigned)i;
}

void emu_cp_async(unsigned dst, const void* src, int src_bytes, int bytes) {
    if (dst % bytes) FAIL("cp.async destination (shared offset %u) not %d-byte aligned", dst, bytes);
    if ((uintptr_t)src % bytes) FAIL("cp.async source %p not %d-byte aligned", src, bytes);
    if (src_bytes && !is_device((uintptr_t)src))
        FAIL("cp.async source %p is not global memory: %s", src, describe_address((uintptr_t)src).c_str());
    track(dst, bytes, 1, E.cur);
    for (int i = 0; i < bytes; ++i) E.shadow[dst + i].init = -E.block_serial;
    E.fibers[E.cur].open.push_back(Copy{dst, src, bytes, src_bytes});
}

void emu_cp_commit() {
    Fiber& f = E.fibers[E.cur];
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}

void emu_cp_wait(int n) {
    Fiber& f = E.fibers[E.cur];
    while ((int)f.groups.size() > n) {
        for (const Copy& c : f.groups.front()) {
            unsigned char* d = smem_ptr(c.dst);
            if (c.src_bytes) std::memcpy(d, c.src, c.src_bytes);  // faults (and is named) if out of bounds
            std::memset(d + c.src_bytes, 0, c.bytes - c.src_bytes);
            for (int i = 0; i < c.bytes; ++i) E.shadow[c.dst + i].init = E.block_serial;
        }
        f.groups.erase(f.groups.begin());
    }
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lane 8m + r gives the address of row r of
// matrix m (8 contiguous b16). Without .trans lane l receives, of matrix m, row l/4 elements
// 2(l%4), 2(l%4)+1; with .trans rows 2(l%4) and 2(l%4)+1 of column l/4. The element with the
// lower index goes to the low 16 bits.
void emu_ldmatrix_x4(unsigned* r, unsigned addr, int trans) {
    unsigned o[4];
    collective(C_LDSM, trans, 0xffffffffu, &addr, 4, o, 16, [trans](Group& g, int w) {
        unsigned ad[32];
        for (int l = 0; l < 32; ++l) {
            std::memcpy(&ad[l], g.in[l], 4);
            if (ad[l] % 16) fail_at(w * 32 + l, "ldmatrix row address (shared offset %u) not 16-byte aligned", ad[l]);
            track(ad[l], 16, 0, w * 32 + l);
        }
        auto row = [&](int lane) { return reinterpret_cast<const uint16_t*>(smem_ptr(ad[lane])); };
        for (int l = 0; l < 32; ++l) {
            unsigned res[4];
            for (int m = 0; m < 4; ++m) {
                uint16_t e0, e1;
                if (!trans) {
                    e0 = row(m * 8 + l / 4)[2 * (l % 4)];
                    e1 = row(m * 8 + l / 4)[2 * (l % 4) + 1];
                } else {
                    e0 = row(m * 8 + 2 * (l % 4))[l / 4];
                    e1 = row(m * 8 + 2 * (l % 4) + 1)[l / 4];
                }
                res[m] = (unsigned)e0 | ((unsigned)e1 << 16);
            }
            std::memcpy(g.out[l], res, 16);
        }
    });
    for (int i = 0; i < 4; ++i) r[i] = o[i];
}

static inline float bf_lo(unsigned v) {
    unsigned u = v << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline float bf_hi(unsigned v) {
    unsigned u = v & 0xffff0000u;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, fragments as in the PTX ISA
// (g = lane / 4, t = lane % 4):
//   A: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C/D: c0 = (g, 2t), c1 = (g, 2t+1), c2 = (g+8, 2t), c3 = (g+8, 2t+1)
void emu_mma_bf16_16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    struct In {
        unsigned a[4], b[2];
        float c[4];
    } in{{a[0], a[1], a[2], a[3]}, {b0, b1}, {c[0], c[1], c[2], c[3]}};
    float d[4];
    collective(C_MMA, 0, 0xffffffffu, &in, sizeof in, d, 16, [](Group& gr, int) {
        float A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < 32; ++l) {
            const int g = l / 4, t = l % 4;
            const In& f = *reinterpret_cast<const In*>(gr.in[l]);
            A[g][2 * t] = bf_lo(f.a[0]);
            A[g][2 * t + 1] = bf_hi(f.a[0]);
            A[g + 8][2 * t] = bf_lo(f.a[1]);
            A[g + 8][2 * t + 1] = bf_hi(f.a[1]);
            A[g][2 * t + 8] = bf_lo(f.a[2]);
            A[g][2 * t + 9] = bf_hi(f.a[2]);
            A[g + 8][2 * t + 8] = bf_lo(f.a[3]);
            A[g + 8][2 * t + 9] = bf_hi(f.a[3]);
            B[2 * t][g] = bf_lo(f.b[0]);
            B[2 * t + 1][g] = bf_hi(f.b[0]);
            B[2 * t + 8][g] = bf_lo(f.b[1]);
            B[2 * t + 9][g] = bf_hi(f.b[1]);
            C[g][2 * t] = f.c[0];
            C[g][2 * t + 1] = f.c[1];
            C[g + 8][2 * t] = f.c[2];
            C[g + 8][2 * t + 1] = f.c[3];
        }
        float D[16][8];
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 8; ++j) {
                float s = 0.f;
                for (int k = 0; k < 16; ++k) s += A[i][k] * B[k][j];
                D[i][j] = C[i][j] + s;
            }
        for (int l = 0; l < 32; ++l) {
            const int g = l / 4, t = l % 4;
            float o[4] = {D[g][2 * t], D[g][2 * t + 1], D[g + 8][2 * t], D[g + 8][2 * t + 1]};
            std::memcpy(gr.out[l], o, 16);
        }
    });
    for (int i = 0; i < 4; ++i) c[i] = d[i];
}

void emu_trap(const char* what) { FAIL("%s", what); }

// ---------------------------------------------------------------- ThreadSanitizer hooks
// The kernel objects are compiled with -fsanitize=thread; these receive their accesses.
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
#define EMU_HOOK(n)                                                                 \
    void __tsan_read##n(void* p) { access(p, n, 0); }                             \
    void __tsan_write##n(void* p) { access(p, n, 1); }                            \
    void __tsan_unaligned_read##n(void* p) { access(p, n, 0); }                   \
    void __tsan_unaligned_write##n(void* p) { access(p, n, 1); }                  \
    void __tsan_volatile_read##n(void* p) { access(p, n, 0); }                    \
    void __tsan_volatile_write##n(void* p) { access(p, n, 1); }                   \
    void __tsan_read##n##_pc(void* p, void*) { access(p, n, 0); }                 \
    void __tsan_write##n##_pc(void* p, void*) { access(p, n, 1); }
EMU_HOOK(1)
EMU_HOOK(2)
EMU_HOOK(4)
EMU_HOOK(8)
EMU_HOOK(16)
void __tsan_read_range(void* p, unsigned long n) {
    for (unsigned long i = 0; i < n; ++i) access((char*)p + i, 1, 0);
}
void __tsan_write_range(void* p, unsigned long n) {
    for (unsigned long i = 0; i < n; ++i) access((char*)p + i, 1, 1);
}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}

}  // extern "C"
