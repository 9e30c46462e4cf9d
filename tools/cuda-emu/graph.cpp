// graph.cpp: stream capture and CUDA graphs for the emulated driver (driver.cpp), with the
// driver's semantics where dfpo and cudarc 0.19 can meet them:
//  - cuStreamBeginCapture_v2 puts a stream into capture (GLOBAL, THREAD_LOCAL or RELAXED; the
//    legacy NULL stream cannot be captured). Until cuStreamEndCapture, kernel launches, async
//    device-to-device copies and memsets, host functions and cuBLAS GEMMs queued on it are
//    RECORDED, not run: a kernel's parameters are copied by value at record time (by the sizes of
//    the kernel's C++ signature), a GEMM's scalars too. Launch checks run at record time and
//    again at every replay.
//  - "Potentially unsafe" calls (synchronous copies and memsets, cuMemAlloc, cuMemFree,
//    cuCtxSynchronize) fail with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidate the
//    captures they conflict with, by the calling thread's interaction mode
//    (cuThreadExchangeStreamCaptureMode, GLOBAL by default): its own non-relaxed captures and,
//    in GLOBAL mode, every other thread's GLOBAL capture. Synchronizing or querying a capturing
//    stream fails the same way; querying or synchronizing an event last recorded in a capture
//    fails with CUDA_ERROR_STREAM_CAPTURE_CAPTURED_EVENT (907). Work queued into an invalidated
//    capture fails with CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, and so does its
//    cuStreamEndCapture (with a NULL graph). Ending a non-relaxed capture on another thread
//    fails with CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD.
//  - cuGraphInstantiateWithFlags copies the graph's nodes into an exec; cuGraphLaunch replays
//    them in order on the launch stream through the driver's own entry points (every check of a
//    direct launch, on the allocations and function attributes as they are at replay), and into
//    a capturing stream records them (as the driver records a child graph).
// Not emulated (refused with a message, the capture invalidated): async host<->device copies
// during capture (the emulator has no pinned host memory, and the driver cannot capture copies
// from pageable memory), stream-ordered allocation during capture, and cross-stream capture
// (a stream waiting on an event recorded in another stream's capture).
#include "graph.h"

#include <pthread.h>

#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

extern "C" {
int cuemu_context_current();
int cuemu_stream_ok(void* s);
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, void* s, void** params, void** extra);
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* s);
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* s);
CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void* s);
CUresult cuLaunchHostFunc(void* s, void (*fn)(void*), void* data);
}

namespace {

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD = 908,
};
enum { MODE_GLOBAL = 0, MODE_THREAD_LOCAL = 1, MODE_RELAXED = 2 };

void say(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::fprintf(stderr, "cuda-emu: ");
    std::vfprintf(stderr, fmt, ap);
    std::fprintf(stderr, "\n");
    va_end(ap);
}

struct Node {
    enum Kind { KERNEL, MEMCPY, MEMSET, HOST, CALLBACK } kind = KERNEL;
    std::string what;  // for messages
    // KERNEL
    void* f = nullptr;
    unsigned grid[3] = {0, 0, 0}, block[3] = {0, 0, 0}, smem = 0;
    std::vector<std::vector<unsigned char>> args;  // each parameter's bytes, copied at record time
    // MEMCPY, MEMSET
    CUdeviceptr dst = 0, src = 0;
    size_t n = 0;
    unsigned value = 0, elem = 1;
    // HOST
    void (*host)(void*) = nullptr;
    void* data = nullptr;
    // CALLBACK (libcublas): run(data) returns 0 or a message's CUresult
    int (*run)(void*) = nullptr;
    std::shared_ptr<void> cb;
};

struct Capture {
    int mode = MODE_GLOBAL;
    pthread_t thread{};
    bool invalid = false;
    std::string why;  // what invalidated it
    unsigned long long id = 0;
    std::vector<Node> nodes;
};
struct Graph {
    std::vector<Node> nodes;
};
struct Exec {
    std::vector<Node> nodes;
};

std::mutex g_mu;
std::map<void*, Capture> g_caps;          // capturing stream -> its capture
std::map<void*, void*> g_event_capture;   // event -> the capturing stream it was last recorded in
std::set<void*> g_graphs, g_execs;
unsigned long long g_next_id = 1;
thread_local int t_mode = MODE_GLOBAL;

#define NEED_CTX(call)                                                                               \
    do {                                                                                             \
        if (!cuemu_context_current()) {                                                              \
            say("%s: no CUDA context is current on this thread (CUDA_ERROR_INVALID_CONTEXT)", call); \
            return CUDA_ERROR_INVALID_CONTEXT;                                                       \
        }                                                                                            \
    } while (0)

bool legacy(void* s) { return s == nullptr || s == (void*)1; }

// Appends n to s's capture (g_mu held).
int append(void* s, Node&& n) {
    auto it = g_caps.find(s);
    if (it == g_caps.end()) return CUDA_ERROR_ILLEGAL_STATE;
    if (it->second.invalid) {
        say("%s: the stream's capture was invalidated (%s): CUDA_ERROR_STREAM_CAPTURE_INVALIDATED", n.what.c_str(),
            it->second.why.c_str());
        return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    }
    it->second.nodes.push_back(std::move(n));
    return CUDA_SUCCESS;
}

void invalidate(Capture& c, const std::string& why) {
    if (!c.invalid) {
        c.invalid = true;
        c.why = why;
    }
}

// Replays nodes on stream s (g_mu not held).
CUresult replay(const std::vector<Node>& nodes, void* s) {
    for (size_t i = 0; i < nodes.size(); ++i) {
        const Node& n = nodes[i];
        CUresult r = CUDA_SUCCESS;
        switch (n.kind) {
            case Node::KERNEL: {
                std::vector<void*> p(n.args.size());
                for (size_t j = 0; j < p.size(); ++j) p[j] = (void*)n.args[j].data();
                r = cuLaunchKernel(n.f, n.grid[0], n.grid[1], n.grid[2], n.block[0], n.block[1], n.block[2], n.smem,
                                   s, p.empty() ? nullptr : p.data(), nullptr);
                break;
            }
            case Node::MEMCPY: r = cuMemcpyDtoDAsync_v2(n.dst, n.src, n.n, s); break;
            case Node::MEMSET:
                r = n.elem == 1 ? cuMemsetD8Async(n.dst, (unsigned char)n.value, n.n, s)
                                : cuMemsetD32Async(n.dst, n.value, n.n, s);
                break;
            case Node::HOST: r = cuLaunchHostFunc(s, n.host, n.data); break;
            case Node::CALLBACK: r = n.run(n.cb.get()); break;
        }
        if (r != CUDA_SUCCESS) {
            say("cuGraphLaunch: node %zu of %zu (%s) failed with error %d", i, nodes.size(), n.what.c_str(), r);
            return r;
        }
    }
    return CUDA_SUCCESS;
}

}  // namespace

namespace emu_cap {

int status(void* s) {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_caps.find(s);
    if (it == g_caps.end()) return STATUS_NONE;
    return it->second.invalid ? STATUS_INVALIDATED : STATUS_ACTIVE;
}

int unsafe_call(const char* call) {
    if (t_mode == MODE_RELAXED) return 0;
    std::lock_guard<std::mutex> g(g_mu);
    if (g_caps.empty()) return 0;
    const pthread_t me = pthread_self();
    bool hit = false;
    for (auto& kv : g_caps) {
        Capture& c = kv.second;
        const bool mine = pthread_equal(c.thread, me) && c.mode != MODE_RELAXED;
        const bool global = t_mode == MODE_GLOBAL && !pthread_equal(c.thread, me) && c.mode == MODE_GLOBAL;
        if (mine || global) {
            invalidate(c, std::string(call) + " during the capture");
            hit = true;
        }
    }
    if (!hit) return 0;
    say("%s: not permitted while a stream is capturing (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED; the capture is "
        "invalidated)",
        call);
    return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
}

int sync_call(const char* call, void* s) {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_caps.find(s);
    if (it == g_caps.end()) return 0;
    invalidate(it->second, std::string(call) + " of the capturing stream");
    say("%s: the stream is capturing (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED; the capture is invalidated)", call);
    return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
}

int record_kernel(void* s, void* f, const char* name, const unsigned grid[3], const unsigned block[3], unsigned smem,
                  void** params, const std::vector<unsigned>& sizes) {
    Node n;
    n.kind = Node::KERNEL;
    n.what = std::string("kernel ") + name;
    n.f = f;
    for (int i = 0; i < 3; ++i) {
        n.grid[i] = grid[i];
        n.block[i] = block[i];
    }
    n.smem = smem;
    n.args.resize(sizes.size());
    for (size_t i = 0; i < sizes.size(); ++i) {
        n.args[i].resize(sizes[i] ? sizes[i] : 1);
        std::memcpy(n.args[i].data(), params[i], sizes[i]);
    }
    std::lock_guard<std::mutex> g(g_mu);
    return append(s, std::move(n));
}

int record_memcpy_dtod(void* s, uint64_t dst, uint64_t src, size_t bytes) {
    Node n;
    n.kind = Node::MEMCPY;
    n.what = "cuMemcpyDtoDAsync";
    n.dst = dst;
    n.src = src;
    n.n = bytes;
    std::lock_guard<std::mutex> g(g_mu);
    return append(s, std::move(n));
}

int record_memset(void* s, uint64_t dst, unsigned value, unsigned elem_bytes, size_t count) {
    Node n;
    n.kind = Node::MEMSET;
    n.what = elem_bytes == 1 ? "cuMemsetD8Async" : "cuMemsetD32Async";
    n.dst = dst;
    n.value = value;
    n.elem = elem_bytes;
    n.n = count;
    std::lock_guard<std::mutex> g(g_mu);
    return append(s, std::move(n));
}

int record_host_fn(void* s, void (*fn)(void*), void* data) {
    Node n;
    n.kind = Node::HOST;
    n.what = "cuLaunchHostFunc";
    n.host = fn;
    n.data = data;
    std::lock_guard<std::mutex> g(g_mu);
    return append(s, std::move(n));
}

int refuse(const char* call, void* s, const char* why) {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_caps.find(s);
    if (it != g_caps.end()) invalidate(it->second, std::string(call) + " during the capture");
    say("%s during stream capture: %s (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED; the capture is invalidated)", call,
        why);
    return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
}

void event_recorded(void* e, void* s) {
    std::lock_guard<std::mutex> g(g_mu);
    if (g_caps.count(s))
        g_event_capture[e] = s;
    else
        g_event_capture.erase(e);
}

bool event_captured(void* e) {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_event_capture.find(e);
    return it != g_event_capture.end() && g_caps.count(it->second);
}

void event_destroyed(void* e) {
    std::lock_guard<std::mutex> g(g_mu);
    g_event_capture.erase(e);
}

}  // namespace emu_cap

extern "C" {

CUresult cuStreamBeginCapture_v2(void* s, int mode) {
    NEED_CTX("cuStreamBeginCapture");
    if (!cuemu_stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (mode < MODE_GLOBAL || mode > MODE_RELAXED) return CUDA_ERROR_INVALID_VALUE;
    if (legacy(s)) {
        say("cuStreamBeginCapture: the legacy NULL stream cannot be captured (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)");
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    std::lock_guard<std::mutex> g(g_mu);
    if (g_caps.count(s)) {
        say("cuStreamBeginCapture: the stream is already capturing (CUDA_ERROR_ILLEGAL_STATE)");
        return CUDA_ERROR_ILLEGAL_STATE;
    }
    Capture& c = g_caps[s];
    c.mode = mode;
    c.thread = pthread_self();
    c.id = g_next_id++;
    return CUDA_SUCCESS;
}
CUresult cuStreamBeginCapture(void* s) { return cuStreamBeginCapture_v2(s, MODE_GLOBAL); }

CUresult cuStreamEndCapture(void* s, void** graph) {
    NEED_CTX("cuStreamEndCapture");
    if (!cuemu_stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (!graph) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_caps.find(s);
    if (it == g_caps.end()) {
        say("cuStreamEndCapture: the stream is not capturing (CUDA_ERROR_ILLEGAL_STATE)");
        return CUDA_ERROR_ILLEGAL_STATE;
    }
    Capture& c = it->second;
    if (c.mode != MODE_RELAXED && !pthread_equal(c.thread, pthread_self())) {
        say("cuStreamEndCapture: the capture began on another thread (CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD)");
        return CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD;
    }
    if (c.invalid) {
        say("cuStreamEndCapture: the capture was invalidated (%s): CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
            c.why.c_str());
        g_caps.erase(it);
        *graph = nullptr;
        return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    }
    Graph* gr = new Graph{std::move(c.nodes)};
    g_caps.erase(it);
    g_graphs.insert(gr);
    *graph = gr;
    return CUDA_SUCCESS;
}

// cuStreamIsCapturing is in driver.cpp (it existed before capture); it asks emu_cap::status.

CUresult cuStreamGetCaptureInfo(void* s, int* st, unsigned long long* id) {
    NEED_CTX("cuStreamGetCaptureInfo");
    if (!cuemu_stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_caps.find(s);
    if (st) *st = it == g_caps.end() ? 0 : it->second.invalid ? 2 : 1;
    if (id && it != g_caps.end()) *id = it->second.id;
    return CUDA_SUCCESS;
}
CUresult cuStreamGetCaptureInfo_v2(void* s, int* st, unsigned long long* id, void** graph, const void*** deps,
                                   size_t* ndeps) {
    CUresult r = cuStreamGetCaptureInfo(s, st, id);
    if (r) return r;
    // The graph under construction is not exposed (cuGraph* node queries are not emulated).
    if (graph) *graph = nullptr;
    if (deps) *deps = nullptr;
    if (ndeps) *ndeps = 0;
    return CUDA_SUCCESS;
}
CUresult cuStreamGetCaptureInfo_v3(void* s, int* st, unsigned long long* id, void** graph, const void*** deps,
                                   const void** edges, size_t* ndeps) {
    if (edges) *edges = nullptr;
    return cuStreamGetCaptureInfo_v2(s, st, id, graph, deps, ndeps);
}

CUresult cuThreadExchangeStreamCaptureMode(int* mode) {
    if (!mode || *mode < MODE_GLOBAL || *mode > MODE_RELAXED) return CUDA_ERROR_INVALID_VALUE;
    const int old = t_mode;
    t_mode = *mode;
    *mode = old;
    return CUDA_SUCCESS;
}

CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long flags) {
    NEED_CTX("cuGraphInstantiateWithFlags");
    if (!exec) return CUDA_ERROR_INVALID_VALUE;
    // AUTO_FREE_ON_LAUNCH 1, UPLOAD 2, DEVICE_LAUNCH 4, USE_NODE_PRIORITY 8
    if (flags & ~0xfull) {
        say("cuGraphInstantiateWithFlags: unknown flags 0x%llx (CUDA_ERROR_INVALID_VALUE)", flags);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (flags & 4) {
        say("cuGraphInstantiateWithFlags: CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH is not emulated");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    std::lock_guard<std::mutex> g(g_mu);
    if (!g_graphs.count(graph)) return CUDA_ERROR_INVALID_HANDLE;
    Exec* e = new Exec{((Graph*)graph)->nodes};
    g_execs.insert(e);
    *exec = e;
    return CUDA_SUCCESS;
}

CUresult cuGraphLaunch(void* exec, void* s) {
    NEED_CTX("cuGraphLaunch");
    if (!cuemu_stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    std::vector<Node> nodes;
    {
        std::lock_guard<std::mutex> g(g_mu);
        if (!g_execs.count(exec)) return CUDA_ERROR_INVALID_HANDLE;
        auto it = g_caps.find(s);
        if (it != g_caps.end()) {
            // Launched into a capture: the graph's nodes join it (the driver adds a child graph).
            const std::vector<Node>& src = ((Exec*)exec)->nodes;
            for (const Node& n : src) {
                Node c = n;
                c.what = "cuGraphLaunch into a capture: " + n.what;
                if (int r = append(s, std::move(c))) return r;
            }
            return CUDA_SUCCESS;
        }
        nodes = ((Exec*)exec)->nodes;  // the exec may be destroyed by another thread meanwhile
    }
    return replay(nodes, s);
}

CUresult cuGraphUpload(void* exec, void* s) {
    NEED_CTX("cuGraphUpload");
    if (!cuemu_stream_ok(s)) return CUDA_ERROR_INVALID_HANDLE;
    std::lock_guard<std::mutex> g(g_mu);
    return g_execs.count(exec) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

CUresult cuGraphExecDestroy(void* exec) {
    std::lock_guard<std::mutex> g(g_mu);
    if (!g_execs.erase(exec)) return CUDA_ERROR_INVALID_HANDLE;
    delete (Exec*)exec;
    return CUDA_SUCCESS;
}

CUresult cuGraphDestroy(void* graph) {
    std::lock_guard<std::mutex> g(g_mu);
    if (!g_graphs.erase(graph)) return CUDA_ERROR_INVALID_HANDLE;
    delete (Graph*)graph;
    return CUDA_SUCCESS;
}

CUresult cuGraphGetNodes(void* graph, void** nodes, size_t* n) {
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(g_mu);
    if (!g_graphs.count(graph)) return CUDA_ERROR_INVALID_HANDLE;
    Graph* gr = (Graph*)graph;
    if (!nodes) {
        *n = gr->nodes.size();
        return CUDA_SUCCESS;
    }
    // Node handles: the node's address (valid while the graph lives).
    size_t k = 0;
    for (; k < *n && k < gr->nodes.size(); ++k) nodes[k] = &gr->nodes[k];
    for (size_t j = k; j < *n; ++j) nodes[j] = nullptr;
    *n = k;
    return CUDA_SUCCESS;
}

// For libcublas (cublas.cpp): the capture status of a stream, and a recorded call that
// cuGraphLaunch replays as run(data) (0, or a CUresult after a message); dtor(data) frees data
// when the last graph holding it goes.
int cuemu_capture_status(void* s) { return emu_cap::status(s); }
int cuemu_record_callback(void* s, const char* what, int (*run)(void*), void* data, void (*dtor)(void*)) {
    Node n;
    n.kind = Node::CALLBACK;
    n.what = what;
    n.run = run;
    n.cb = std::shared_ptr<void>(data, dtor);
    std::lock_guard<std::mutex> g(g_mu);
    return append(s, std::move(n));
}

}  // extern "C"
