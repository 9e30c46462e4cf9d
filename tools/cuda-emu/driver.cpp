// driver.cpp: the CUDA driver API subset that cudarc 0.19 and dfpo call, over the emulator
// (emu_runtime.cpp). One device: an sm_90 GPU with an H100's limits. Streams execute every
// operation at once, in call order (so "in order" trivially); events are always complete.
// A call that needs a context fails with CUDA_ERROR_INVALID_CONTEXT when none is current on the
// calling thread, as the real driver does. Calls not implemented here print their name and
// return CUDA_ERROR_NOT_SUPPORTED (see the end of this file); a call missing entirely makes
// cudarc panic with its name.
#include <elf.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "emu_internal.h"
#include "graph.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_UNKNOWN = 999,
};

namespace {

struct Ctx {
    int refs = 0;
    bool primary = true;
};
struct Stream {
    Ctx* ctx;
};
struct Event {
    Ctx* ctx;
};
struct Module {
    std::vector<std::string> entries;
    std::map<std::string, unsigned> static_smem;  // from the CUBIN's .nv.shared.<name>
};
struct Func {
    const emu::KernelInfo* k;
    Module* m;
    unsigned static_smem = 0;
    unsigned max_dyn = 48 * 1024;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
};

const unsigned SMEM_DEFAULT = 48 * 1024, SMEM_OPTIN = 232448;  // 227 KiB

bool g_init = false;
Ctx g_primary;
thread_local Ctx* t_current = nullptr;
std::mutex g_mu;
std::set<void*> g_streams, g_events, g_modules, g_funcs;
unsigned long long g_alloc_serial = 0;

void say(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::fprintf(stderr, "cuda-emu: ");
    std::vfprintf(stderr, fmt, ap);
    std::fprintf(stderr, "\n");
    va_end(ap);
}

#define NEED_INIT() \
    if (!g_init) return CUDA_ERROR_NOT_INITIALIZED
#define NEED_CTX(call)                                                                               \
    do {                                                                                             \
        NEED_INIT();                                                                                 \
        if (!t_current) {                                                                            \
            say("%s: no CUDA context is current on this thread (CUDA_ERROR_INVALID_CONTEXT)", call); \
            return CUDA_ERROR_INVALID_CONTEXT;                                                       \
        }                                                                                            \
    } while (0)

bool stream_ok(void* s) {
    std::lock_guard<std::mutex> g(g_mu);
    return s == nullptr || s == (void*)1 || s == (void*)2 || g_streams.count(s);
}

CUresult check_dev(const char* call, CUdeviceptr p, size_t n) {
    if (n == 0) return CUDA_SUCCESS;
    std::string err;
    if (!emu::dev_range_ok((uintptr_t)p, n, err)) {
        say("%s: %s", call, err.c_str());
        return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

// The kernel entry names of a module image (CUBIN: ELF symbols of the kernels; PTX: .entry).
void scan_image(const void* image, Module& m) {
    const unsigned char* p = (const unsigned char*)image;
    if (std::memcmp(p, ELFMAG, SELFMAG) == 0) {
        const Elf64_Ehdr* eh = (const Elf64_Ehdr*)p;
        const Elf64_Shdr* sh = (const Elf64_Shdr*)(p + eh->e_shoff);
        const char* shstr = (const char*)p + sh[eh->e_shstrndx].sh_offset;
        for (int i = 0; i < eh->e_shnum; ++i) {
            const char* nm = shstr + sh[i].sh_name;
            if (!std::strncmp(nm, ".text.", 6)) m.entries.push_back(nm + 6);
            if (!std::strncmp(nm, ".nv.shared.", 11) && std::strncmp(nm, ".nv.shared.reserved", 19))
                m.static_smem[nm + 11] = (unsigned)sh[i].sh_size;
        }
        return;
    }
    const char* s = (const char*)image;
    const char* q = s;
    while ((q = std::strstr(q, ".entry")) != nullptr) {
        q += 6;
        while (*q == ' ' || *q == '\t') ++q;
        const char* e = q;
        while ((*e >= 'a' && *e <= 'z') || (*e >= 'A' && *e <= 'Z') || (*e >= '0' && *e <= '9') || *e == '_') ++e;
        if (e > q) m.entries.push_back(std::string(q, e));
    }
}

const char* err_name(CUresult e) {
    switch (e) {
        case 0: return "CUDA_SUCCESS";
        case 1: return "CUDA_ERROR_INVALID_VALUE";
        case 2: return "CUDA_ERROR_OUT_OF_MEMORY";
        case 3: return "CUDA_ERROR_NOT_INITIALIZED";
        case 101: return "CUDA_ERROR_INVALID_DEVICE";
        case 200: return "CUDA_ERROR_INVALID_IMAGE";
        case 201: return "CUDA_ERROR_INVALID_CONTEXT";
        case 400: return "CUDA_ERROR_INVALID_HANDLE";
        case 500: return "CUDA_ERROR_NOT_FOUND";
        case 600: return "CUDA_ERROR_NOT_READY";
        case 700: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case 701: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
        case 719: return "CUDA_ERROR_LAUNCH_FAILED";
        case 801: return "CUDA_ERROR_NOT_SUPPORTED";
        case 401: return "CUDA_ERROR_ILLEGAL_STATE";
        case 900: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
        case 901: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
        case 907: return "CUDA_ERROR_STREAM_CAPTURE_CAPTURED_EVENT";
        case 908: return "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD";
    }
    return nullptr;
}

}  // namespace

extern "C" {

CUresult cuGetErrorName(CUresult e, const char** s) {
    const char* n = err_name(e);
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *s = n;
    return CUDA_SUCCESS;
}
CUresult cuGetErrorString(CUresult e, const char** s) {
    const char* n = err_name(e);
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *s = n;
    return CUDA_SUCCESS;
}

CUresult cuInit(unsigned flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    g_init = true;
    return CUDA_SUCCESS;
}
CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetCount(int* n) {
    NEED_INIT();
    *n = 1;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    NEED_INIT();
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    NEED_INIT();
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    std::snprintf(name, len, "NVIDIA H100 80GB HBM3 (cuda-emu)");
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* b, CUdevice d) {
    NEED_INIT();
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *b = (size_t)80 << 30;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice d) {
    NEED_INIT();
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    for (int i = 0; i < 16; ++i) uuid[i] = (unsigned char)(0xE0 + i);
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }

CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    NEED_INIT();
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    switch (attr) {
        case 1: *v = 1024; break;              // MAX_THREADS_PER_BLOCK
        case 2: *v = 1024; break;              // MAX_BLOCK_DIM_X
        case 3: *v = 1024; break;              // MAX_BLOCK_DIM_Y
        case 4: *v = 64; break;                // MAX_BLOCK_DIM_Z
        case 5: *v = 2147483647; break;        // MAX_GRID_DIM_X
        case 6: *v = 65535; break;             // MAX_GRID_DIM_Y
        case 7: *v = 65535; break;             // MAX_GRID_DIM_Z
        case 8: *v = (int)SMEM_DEFAULT; break; // MAX_SHARED_MEMORY_PER_BLOCK
        case 9: *v = 65536; break;             // TOTAL_CONSTANT_MEMORY
        case 10: *v = 32; break;               // WARP_SIZE
        case 11: *v = 2147483647; break;       // MAX_PITCH
        case 12: *v = 65536; break;            // MAX_REGISTERS_PER_BLOCK
        case 13: *v = 1980000; break;          // CLOCK_RATE (kHz)
        case 14: *v = 512; break;              // TEXTURE_ALIGNMENT
        case 15: *v = 1; break;                // GPU_OVERLAP
        case 16: *v = 132; break;              // MULTIPROCESSOR_COUNT
        case 17: *v = 0; break;                // KERNEL_EXEC_TIMEOUT
        case 18: *v = 0; break;                // INTEGRATED
        case 19: *v = 1; break;                // CAN_MAP_HOST_MEMORY
        case 20: *v = 0; break;                // COMPUTE_MODE default
        case 31: *v = 1; break;                // CONCURRENT_KERNELS
        case 32: *v = 1; break;                // ECC_ENABLED
        case 33: *v = 0; break;                // PCI_BUS_ID
        case 34: *v = 0; break;                // PCI_DEVICE_ID
        case 36: *v = 2619000; break;          // MEMORY_CLOCK_RATE
        case 37: *v = 5120; break;             // GLOBAL_MEMORY_BUS_WIDTH
        case 38: *v = 50 * 1024 * 1024; break; // L2_CACHE_SIZE
        case 39: *v = 2048; break;             // MAX_THREADS_PER_MULTIPROCESSOR
        case 40: *v = 2; break;                // ASYNC_ENGINE_COUNT
        case 41: *v = 1; break;                // UNIFIED_ADDRESSING
        case 50: *v = 0; break;                // PCI_DOMAIN_ID
        case 75: *v = 9; break;                // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; break;                // COMPUTE_CAPABILITY_MINOR
        case 81: *v = 233472; break;           // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        case 82: *v = 65536; break;            // MAX_REGISTERS_PER_MULTIPROCESSOR
        case 83: *v = 1; break;                // MANAGED_MEMORY
        case 84: *v = 0; break;                // MULTI_GPU_BOARD
        case 86: *v = 1; break;                // HOST_NATIVE_ATOMIC_SUPPORTED
        case 89: *v = 1; break;                // CONCURRENT_MANAGED_ACCESS
        case 95: *v = 1; break;                // COOPERATIVE_LAUNCH
        case 97: *v = (int)SMEM_OPTIN; break;  // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 106: *v = 32; break;              // MAX_BLOCKS_PER_MULTIPROCESSOR
        case 111: *v = 1024; break;            // RESERVED_SHARED_MEMORY_PER_BLOCK
        case 115: *v = 1; break;               // MEMORY_POOLS_SUPPORTED
        default:
            say("cuDeviceGetAttribute: attribute %d is not emulated (CUDA_ERROR_NOT_SUPPORTED)", attr);
            return CUDA_ERROR_NOT_SUPPORTED;
    }
    return CUDA_SUCCESS;
}

// ---- contexts ----
CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice d) {
    NEED_INIT();
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    std::lock_guard<std::mutex> g(g_mu);
    g_primary.refs++;
    *ctx = &g_primary;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    NEED_INIT();
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    std::lock_guard<std::mutex> g(g_mu);
    if (g_primary.refs <= 0) return CUDA_ERROR_INVALID_CONTEXT;
    g_primary.refs--;
    return CUDA_SUCCESS;
}
CUresult cuCtxSetCurrent(void* ctx) {
    NEED_INIT();
    if (ctx && ctx != &g_primary) return CUDA_ERROR_INVALID_CONTEXT;
    t_current = (Ctx*)ctx;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(void** ctx) {
    NEED_INIT();
    *ctx = t_current;
    return CUDA_SUCCESS;
}
CUresult cuCtxPushCurrent_v2(void* ctx) { return cuCtxSetCurrent(ctx); }
CUresult cuCtxPopCurrent_v2(void** ctx) {
    NEED_INIT();
    if (ctx) *ctx = t_current;
    t_current = nullptr;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetDevice(CUdevice* d) {
    NEED_CTX("cuCtxGetDevice");
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() {
    NEED_CTX("cuCtxSynchronize");
    return emu_cap::unsafe_call("cuCtxSynchronize");
}
CUresult cuCtxGetStreamPriorityRange(int* lo, int* hi) {
    NEED_CTX("cuCtxGetStreamPriorityRange");
    if (lo) *lo = 0;
    if (hi) *hi = -5;
    return CUDA_SUCCESS;
}
CUresult cuCtxSetFlags(unsigned) {
    NEED_CTX("cuCtxSetFlags");
    return CUDA_SUCCESS;
}
CUresult cuCtxGetLimit(size_t* v, int limit) {
    NEED_CTX("cuCtxGetLimit");
    *v = limit == 0 ? 1024 : 0;
    return CUDA_SUCCESS;
}

// ---- streams and events ----
CUresult cuStreamCreate(void** s, unsigned) {
    NEED_CTX("cuStreamCreate");
    Stream* st = new Stream{t_current};
    std::lock_guard<std::mutex> g(g_mu);
    g_streams.insert(st);
    *s = st;
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(void** s, unsigned f, int) { return cuStreamCreate(s, f); }
CUresult cuStreamDestroy_v2(void* s) {
    NEED_INIT();
    std::lock_guard<std::mutex> g(g_mu);
    if (!g_streams.erase(s)) return CUDA_ERROR_INVALID_HANDLE;
    delete (Stream*)s;
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(void* s) {
    NEED_CTX("cuStreamSynchronize");
    if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    return emu_cap::sync_call("cuStreamSynchronize", s);
}
CUresult cuStreamQuery(void* s) {
    NEED_CTX("cuStreamQuery");
    if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    return emu_cap::sync_call("cuStreamQuery", s);
}
CUresult cuStreamWaitEvent(void* s, void* e, unsigned) {
    NEED_CTX("cuStreamWaitEvent");
    if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    {
        std::lock_guard<std::mutex> g(g_mu);
        if (!g_events.count(e)) return CUDA_ERROR_INVALID_HANDLE;
    }
    if (emu_cap::event_captured(e) && emu_cap::status(s) == emu_cap::STATUS_NONE)
        return emu_cap::refuse("cuStreamWaitEvent", s,
                               "waiting on an event recorded in another stream's capture (a fork into the capture) "
                               "is not emulated");
    return CUDA_SUCCESS;
}
CUresult cuStreamIsCapturing(void* s, int* status) {
    NEED_CTX("cuStreamIsCapturing");
    if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    *status = emu_cap::status(s);
    return CUDA_SUCCESS;
}
CUresult cuLaunchHostFunc(void* s, void (*fn)(void*), void* data) {
    NEED_CTX("cuLaunchHostFunc");
    if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (emu_cap::status(s)) return emu_cap::record_host_fn(s, fn, data);
    fn(data);
    return CUDA_SUCCESS;
}
CUresult cuEventCreate(void** e, unsigned) {
    NEED_CTX("cuEventCreate");
    Event* ev = new Event{t_current};
    std::lock_guard<std::mutex> g(g_mu);
    g_events.insert(ev);
    *e = ev;
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(void* e) {
    NEED_INIT();
    std::lock_guard<std::mutex> g(g_mu);
    if (!g_events.erase(e)) return CUDA_ERROR_INVALID_HANDLE;
    emu_cap::event_destroyed(e);
    delete (Event*)e;
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(void* e, void* s) {
    NEED_CTX("cuEventRecord");
    if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    {
        std::lock_guard<std::mutex> g(g_mu);
        if (!g_events.count(e)) return CUDA_ERROR_INVALID_HANDLE;
    }
    emu_cap::event_recorded(e, s);
    return CUDA_SUCCESS;
}
CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(void* e) {
    NEED_CTX("cuEventSynchronize");
    {
        std::lock_guard<std::mutex> g(g_mu);
        if (!g_events.count(e)) return CUDA_ERROR_INVALID_HANDLE;
    }
    if (emu_cap::event_captured(e)) {
        say("cuEventSynchronize/cuEventQuery: the event was last recorded in a capturing stream "
            "(CUDA_ERROR_STREAM_CAPTURE_CAPTURED_EVENT)");
        return emu_cap::ERR_CAPTURED_EVENT;
    }
    return CUDA_SUCCESS;
}
CUresult cuEventQuery(void* e) { return cuEventSynchronize(e); }
CUresult cuEventElapsedTime(float* ms, void*, void*) {
    NEED_CTX("cuEventElapsedTime");
    *ms = 0.0f;
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

// ---- memory ----
static CUresult mem_alloc(CUdeviceptr* p, size_t bytes) {
    NEED_CTX("cuMemAlloc");
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    char* m = emu::dev_alloc(bytes, ++g_alloc_serial);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    *p = (CUdeviceptr)m;
    return CUDA_SUCCESS;
}
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    if (CUresult r = emu_cap::unsafe_call("cuMemAlloc")) return r;
    return mem_alloc(p, bytes);
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void* s) {
    if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (emu_cap::status(s))
        return emu_cap::refuse("cuMemAllocAsync", s, "stream-ordered allocation nodes are not emulated");
    return mem_alloc(p, bytes);
}
static CUresult mem_free(CUdeviceptr p) {
    NEED_CTX("cuMemFree");
    if (p == 0) return CUDA_SUCCESS;
    std::string err;
    int r = emu::dev_free((uintptr_t)p, err);
    if (r == 2) {
        std::fprintf(stderr, "\nCUDA-EMU ERROR: out-of-bounds write found at cuMemFree: %s\n", err.c_str());
        std::fflush(stderr);
        _exit(86);
    }
    if (r) {
        say("cuMemFree(%p): %s", (void*)p, err.c_str());
        return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    if (CUresult r = emu_cap::unsafe_call("cuMemFree")) return r;
    return mem_free(p);
}
CUresult cuMemFreeAsync(CUdeviceptr p, void* s) {
    if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (emu_cap::status(s))
        return emu_cap::refuse("cuMemFreeAsync", s, "stream-ordered free nodes are not emulated");
    return mem_free(p);
}
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    NEED_CTX("cuMemGetInfo");
    const size_t t = (size_t)80 << 30, used = emu::dev_bytes_in_use();
    *total = t;
    *free_b = used < t ? t - used : 0;
    return CUDA_SUCCESS;
}
static CUresult memcpyhtod(CUdeviceptr dst, const void* src, size_t n) {
    NEED_CTX("cuMemcpyHtoD");
    if (CUresult r = check_dev("cuMemcpyHtoD destination", dst, n)) return r;
    if (n) std::memcpy((void*)dst, src, n);
    return CUDA_SUCCESS;
}
static CUresult memcpydtoh(void* dst, CUdeviceptr src, size_t n) {
    NEED_CTX("cuMemcpyDtoH");
    if (CUresult r = check_dev("cuMemcpyDtoH source", src, n)) return r;
    if (n) std::memcpy(dst, (const void*)src, n);
    return CUDA_SUCCESS;
}
static CUresult memcpydtod(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    NEED_CTX("cuMemcpyDtoD");
    if (CUresult r = check_dev("cuMemcpyDtoD destination", dst, n)) return r;
    if (CUresult r = check_dev("cuMemcpyDtoD source", src, n)) return r;
    if (n) std::memmove((void*)dst, (const void*)src, n);
    return CUDA_SUCCESS;
}
static CUresult memsetd8(CUdeviceptr dst, unsigned char v, size_t n);
static CUresult memsetd32(CUdeviceptr dst, unsigned v, size_t n);
// The synchronous copies and memsets are "potentially unsafe" during a capture (graph.cpp);
// the async ones are recorded into a capture on their stream.
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    if (CUresult r = emu_cap::unsafe_call("cuMemcpyHtoD")) return r;
    return memcpyhtod(dst, src, n);
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    if (CUresult r = emu_cap::unsafe_call("cuMemcpyDtoH")) return r;
    return memcpydtoh(dst, src, n);
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (CUresult r = emu_cap::unsafe_call("cuMemcpyDtoD")) return r;
    return memcpydtod(dst, src, n);
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    if (CUresult r = emu_cap::unsafe_call("cuMemsetD8")) return r;
    return memsetd8(dst, v, n);
}
CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned v, size_t n) {
    if (CUresult r = emu_cap::unsafe_call("cuMemsetD32")) return r;
    return memsetd32(dst, v, n);
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* s) {
    if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (emu_cap::status(s))
        return emu_cap::refuse("cuMemcpyHtoDAsync", s, "the emulator has no pinned host memory, and copies from "
                                                      "pageable memory cannot be captured");
    return memcpyhtod(dst, src, n);
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* s) {
    if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (emu_cap::status(s))
        return emu_cap::refuse("cuMemcpyDtoHAsync", s, "the emulator has no pinned host memory, and copies to "
                                                      "pageable memory cannot be captured");
    return memcpydtoh(dst, src, n);
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* s) {
    if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (emu_cap::status(s)) {
        NEED_CTX("cuMemcpyDtoDAsync");
        if (CUresult r = check_dev("cuMemcpyDtoDAsync destination", dst, n)) return r;
        if (CUresult r = check_dev("cuMemcpyDtoDAsync source", src, n)) return r;
        return emu_cap::record_memcpy_dtod(s, dst, src, n);
    }
    return memcpydtod(dst, src, n);
}
static CUresult memsetd8(CUdeviceptr dst, unsigned char v, size_t n) {
    NEED_CTX("cuMemsetD8");
    if (CUresult r = check_dev("cuMemsetD8", dst, n)) return r;
    if (n) std::memset((void*)dst, v, n);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* s) {
    if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (emu_cap::status(s)) {
        NEED_CTX("cuMemsetD8Async");
        if (CUresult r = check_dev("cuMemsetD8Async", dst, n)) return r;
        return emu_cap::record_memset(s, dst, v, 1, n);
    }
    return memsetd8(dst, v, n);
}
static CUresult memsetd32(CUdeviceptr dst, unsigned v, size_t n) {
    NEED_CTX("cuMemsetD32");
    if (dst % 4) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = check_dev("cuMemsetD32", dst, n * 4)) return r;
    for (size_t i = 0; i < n; ++i) std::memcpy((char*)dst + 4 * i, &v, 4);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void* s) {
    if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (emu_cap::status(s)) {
        NEED_CTX("cuMemsetD32Async");
        if (dst % 4) return CUDA_ERROR_INVALID_VALUE;
        if (CUresult r = check_dev("cuMemsetD32Async", dst, n * 4)) return r;
        return emu_cap::record_memset(s, dst, v, 4, n);
    }
    return memsetd32(dst, v, n);
}

// ---- modules and functions ----
CUresult cuModuleLoadData(void** mod, const void* image) {
    NEED_CTX("cuModuleLoadData");
    if (!image) return CUDA_ERROR_INVALID_VALUE;
    Module* m = new Module();
    scan_image(image, *m);
    if (m->entries.empty()) {
        say("cuModuleLoadData: the image has no kernel entry (neither a CUBIN nor PTX with .entry)");
        delete m;
        return CUDA_ERROR_INVALID_IMAGE;
    }
    for (const std::string& e : m->entries)
        if (!emu::registry().count(e)) {
            say("cuModuleLoadData: kernel %s of the image is not compiled into the emulator (kernels/*.cu "
                "changed? tools/emu rebuilds it)",
                e.c_str());
            delete m;
            return CUDA_ERROR_INVALID_IMAGE;
        }
    std::lock_guard<std::mutex> g(g_mu);
    g_modules.insert(m);
    *mod = m;
    return CUDA_SUCCESS;
}
CUresult cuModuleLoadDataEx(void** mod, const void* image, unsigned, void*, void*) {
    return cuModuleLoadData(mod, image);
}
CUresult cuModuleUnload(void* mod) {
    NEED_INIT();
    std::lock_guard<std::mutex> g(g_mu);
    if (!g_modules.erase(mod)) return CUDA_ERROR_INVALID_HANDLE;
    return CUDA_SUCCESS;  // the functions stay valid (the module memory is kept)
}
CUresult cuModuleGetFunction(void** f, void* mod, const char* name) {
    NEED_CTX("cuModuleGetFunction");
    Module* m = (Module*)mod;
    {
        std::lock_guard<std::mutex> g(g_mu);
        if (!g_modules.count(mod)) return CUDA_ERROR_INVALID_HANDLE;
    }
    bool found = false;
    for (const std::string& e : m->entries) found |= e == name;
    if (!found) return CUDA_ERROR_NOT_FOUND;
    Func* fn = new Func();
    fn->k = &emu::registry().at(name);
    fn->m = m;
    auto it = m->static_smem.find(name);
    fn->static_smem = it == m->static_smem.end() ? 0 : it->second;
    std::lock_guard<std::mutex> g(g_mu);
    g_funcs.insert(fn);
    *f = fn;
    return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(void* f, int attr, int value) {
    NEED_CTX("cuFuncSetAttribute");
    {
        std::lock_guard<std::mutex> g(g_mu);
        if (!g_funcs.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    }
    Func* fn = (Func*)f;
    if (attr == 8) {  // MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || (unsigned)value + fn->static_smem > SMEM_OPTIN) {
            say("cuFuncSetAttribute(%s, MAX_DYNAMIC_SHARED_SIZE_BYTES, %d): above the %u bytes an H100 allows "
                "(with %u static)",
                fn->k->name.c_str(), value, SMEM_OPTIN, fn->static_smem);
            return CUDA_ERROR_INVALID_VALUE;
        }
        fn->max_dyn = (unsigned)value;
        return CUDA_SUCCESS;
    }
    if (attr == 9) return CUDA_SUCCESS;  // PREFERRED_SHARED_MEMORY_CARVEOUT: a hint
    say("cuFuncSetAttribute: attribute %d is not emulated (CUDA_ERROR_NOT_SUPPORTED)", attr);
    return CUDA_ERROR_NOT_SUPPORTED;
}
CUresult cuFuncGetAttribute(int* v, int attr, void* f) {
    NEED_CTX("cuFuncGetAttribute");
    {
        std::lock_guard<std::mutex> g(g_mu);
        if (!g_funcs.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    }
    Func* fn = (Func*)f;
    switch (attr) {
        case 0: *v = (int)fn->k->max_threads; break;
        case 1: *v = (int)fn->static_smem; break;
        case 2: *v = 0; break;
        case 3: *v = 0; break;
        case 4: *v = 32; break;
        case 5: *v = 80; break;
        case 6: *v = 90; break;
        case 7: *v = 0; break;
        case 8: *v = (int)fn->max_dyn; break;
        case 9: *v = -1; break;
        default:
            say("cuFuncGetAttribute: attribute %d is not emulated (CUDA_ERROR_NOT_SUPPORTED)", attr);
            return CUDA_ERROR_NOT_SUPPORTED;
    }
    return CUDA_SUCCESS;
}
CUresult cuFuncSetCacheConfig(void* f, int) {
    NEED_CTX("cuFuncSetCacheConfig");
    std::lock_guard<std::mutex> g(g_mu);
    return g_funcs.count(f) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, void* s, void** params, void** extra) {
    NEED_CTX("cuLaunchKernel");
    {
        std::lock_guard<std::mutex> g(g_mu);
        if (!g_funcs.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    }
    if (!stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    Func* fn = (Func*)f;
    const char* name = fn->k->name.c_str();
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || gx > 2147483647u || gy > 65535 || gz > 65535) {
        say("cuLaunchKernel(%s): grid (%u,%u,%u) outside an H100's limits (x 1..2^31-1, y and z 1..65535)", name, gx,
            gy, gz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (threads == 0 || threads > 1024 || bx > 1024 || by > 1024 || bz > 64) {
        say("cuLaunchKernel(%s): block (%u,%u,%u) outside the limits (1..1024 threads, z <= 64)", name, bx, by, bz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (threads > fn->k->max_threads) {
        say("cuLaunchKernel(%s): %llu threads a block, but the kernel's __launch_bounds__ is %u", name, threads,
            fn->k->max_threads);
        return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    }
    if (smem > fn->max_dyn || smem + fn->static_smem > SMEM_OPTIN) {
        say("cuLaunchKernel(%s): %u bytes of dynamic shared memory (+ %u static), but the function allows %u "
            "(above 48 KiB needs cuFuncSetAttribute MAX_DYNAMIC_SHARED_SIZE_BYTES; at most 227 KiB)",
            name, smem, fn->static_smem, fn->max_dyn);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (extra) {
        say("cuLaunchKernel(%s): the `extra` parameter buffer is not emulated (CUDA_ERROR_NOT_SUPPORTED)", name);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (!params && !fn->k->sizes.empty()) {
        say("cuLaunchKernel(%s): no kernelParams for %zu parameters", name, fn->k->sizes.size());
        return CUDA_ERROR_INVALID_VALUE;
    }
    for (size_t i = 0; i < fn->k->sizes.size(); ++i)
        if (!params[i]) {
            say("cuLaunchKernel(%s): kernelParams[%zu] is null", name, i);
            return CUDA_ERROR_INVALID_VALUE;
        }
    unsigned long long bad = 0;
    if (!emu::only_blocks_fit((unsigned long long)gx * gy * gz, bad)) {
        say("cuLaunchKernel(%s): cuemu_set_only_blocks names block %llu, but the grid (%u,%u,%u) has %llu blocks", name,
            bad, gx, gy, gz, (unsigned long long)gx * gy * gz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (emu_cap::status(s)) {  // recorded with its parameters' values (graph.cpp)
        const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
        return emu_cap::record_kernel(s, f, name, grid, block, smem, params, fn->k->sizes);
    }
    emu::launch(fn->k, dim3_t{gx, gy, gz}, dim3_t{bx, by, bz}, smem, params);
    return CUDA_SUCCESS;
}

// ---- what cudarc can call but dfpo does not use: named, and refused ----
#define EMU_UNSUPPORTED(name)                                                       \
    CUresult name() {                                                               \
        say("%s is not emulated (CUDA_ERROR_NOT_SUPPORTED)", #name);                \
        return CUDA_ERROR_NOT_SUPPORTED;                                            \
    }
EMU_UNSUPPORTED(cuCtxCreate_v3)
EMU_UNSUPPORTED(cuCtxCreate_v4)
EMU_UNSUPPORTED(cuCtxDestroy_v2)
EMU_UNSUPPORTED(cuCtxGetCacheConfig)
EMU_UNSUPPORTED(cuCtxSetCacheConfig)
EMU_UNSUPPORTED(cuCtxSetLimit)
EMU_UNSUPPORTED(cuDeviceGetDefaultMemPool)
EMU_UNSUPPORTED(cuDeviceGetMemPool)
EMU_UNSUPPORTED(cuDeviceSetMemPool)
EMU_UNSUPPORTED(cuDestroyExternalMemory)
EMU_UNSUPPORTED(cuExternalMemoryGetMappedBuffer)
EMU_UNSUPPORTED(cuImportExternalMemory)
EMU_UNSUPPORTED(cuLaunchCooperativeKernel)
EMU_UNSUPPORTED(cuLaunchKernelEx)
EMU_UNSUPPORTED(cuMemAdvise_v2)
EMU_UNSUPPORTED(cuMemAllocFromPoolAsync)
EMU_UNSUPPORTED(cuMemAllocManaged)
EMU_UNSUPPORTED(cuMemFreeHost)
EMU_UNSUPPORTED(cuMemHostAlloc)
EMU_UNSUPPORTED(cuMemPoolCreate)
EMU_UNSUPPORTED(cuMemPoolDestroy)
EMU_UNSUPPORTED(cuMemPoolGetAttribute)
EMU_UNSUPPORTED(cuMemPoolSetAttribute)
EMU_UNSUPPORTED(cuMemPoolTrimTo)
EMU_UNSUPPORTED(cuMemPrefetchAsync_v2)
EMU_UNSUPPORTED(cuMemcpyPeerAsync)
EMU_UNSUPPORTED(cuModuleGetGlobal_v2)
EMU_UNSUPPORTED(cuModuleLoad)
EMU_UNSUPPORTED(cuOccupancyAvailableDynamicSMemPerBlock)
EMU_UNSUPPORTED(cuOccupancyMaxActiveBlocksPerMultiprocessor)
EMU_UNSUPPORTED(cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags)
EMU_UNSUPPORTED(cuOccupancyMaxPotentialBlockSize)
EMU_UNSUPPORTED(cuOccupancyMaxPotentialBlockSizeWithFlags)
EMU_UNSUPPORTED(cuStreamAttachMemAsync)
EMU_UNSUPPORTED(cuPointerGetAttribute)
EMU_UNSUPPORTED(cuMemcpy2D_v2)
EMU_UNSUPPORTED(cuMemcpy3D_v2)
EMU_UNSUPPORTED(cuMemsetD16_v2)

// The private export tables NVRTC (and the CUDA runtime) ask the driver for: none here. NVRTC
// dlopens libcuda.so.1 and asks for one; it then works without it.
CUresult cuGetExportTable(const void** table, const void*) {
    if (table) *table = nullptr;
    return CUDA_ERROR_NOT_SUPPORTED;
}

// ---- emulator-only entry points: not part of the driver API. dfpo looks them up in the loaded
// libcuda (src/device/emu.rs); NVIDIA's driver has none of them, so a real GPU never calls them.

// Runs only the blocks `ids` (linear ids x + y*gx + z*gx*gy) of every following launch, until
// called with ids == nullptr. A launch whose grid lacks one of the ids fails. Lets a test launch a
// real-size grid (65536 rows of 151936 logits) and run the few blocks whose output it checks.
int cuemu_set_only_blocks(const unsigned long long* ids, size_t n) {
    emu::set_only_blocks(ids, n, ids != nullptr);
    return 0;
}

// Block order of the following launches: 0 forward, 1 reverse, 2 random, -1 back to
// DFPO_EMU_BLOCK_ORDER. Returns the order in force before the call.
int cuemu_set_block_order(int order) { return emu::set_block_order(order); }

// The byte size of every argument the launcher pushed (cudarc hands cuLaunchKernel only the
// `void**`) against the kernel's C++ signature: 1 when they match; 0 with `err` naming the kernel
// and the first parameter that differs; -1 for an unknown function handle.
int cuemu_check_param_sizes(void* f, const unsigned* sizes, size_t n, char* err, size_t errlen) {
    {
        std::lock_guard<std::mutex> g(g_mu);
        if (!g_funcs.count(f)) {
            std::snprintf(err, errlen, "cuemu_check_param_sizes: %p is not a function handle", f);
            return -1;
        }
    }
    const emu::KernelInfo* k = ((Func*)f)->k;
    const std::vector<unsigned>& want = k->sizes;
    for (size_t i = 0; i < n && i < want.size(); ++i)
        if (sizes[i] != want[i]) {
            std::snprintf(err, errlen,
                          "kernel %s (kernels/%s): parameter %zu is %u bytes in the kernel's signature, but the "
                          "launch pushed %u bytes",
                          k->name.c_str(), k->file.c_str(), i, want[i], sizes[i]);
            return 0;
        }
    if (n != want.size()) {
        std::snprintf(err, errlen, "kernel %s (kernels/%s) takes %zu parameters, but the launch pushed %zu",
                      k->name.c_str(), k->file.c_str(), want.size(), n);
        return 0;
    }
    return 1;
}

// For libcublas (cublas.cpp): the context check and the device-range check.
int cuemu_context_current() { return t_current != nullptr; }
int cuemu_range_ok(unsigned long long p, size_t n, char* err, size_t errlen) {
    std::string e;
    if (emu::dev_range_ok((uintptr_t)p, n, e)) return 1;
    std::snprintf(err, errlen, "%s", e.c_str());
    return 0;
}
int cuemu_stream_ok(void* s) { return stream_ok(s); }

}  // extern "C"
