// graph.h: stream capture and CUDA graphs (graph.cpp), as driver.cpp calls them.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace emu_cap {

enum {
    STATUS_NONE = 0,
    STATUS_ACTIVE = 1,
    STATUS_INVALIDATED = 2,
};
enum {
    ERR_CAPTURE_UNSUPPORTED = 900,
    ERR_CAPTURE_INVALIDATED = 901,
    ERR_CAPTURE_WRONG_THREAD = 908,
    ERR_CAPTURED_EVENT = 907,
    ERR_ILLEGAL_STATE = 401,
};

// The capture status of stream s (STATUS_*).
int status(void* s);
// A "potentially unsafe" call (synchronous copy, alloc, free, context synchronize) made on this
// thread: 0 when allowed, else CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED after invalidating the
// captures it conflicts with (this thread's non-relaxed captures, every other thread's global
// one), as the driver does.
int unsafe_call(const char* call);
// A synchronize or query of stream s: CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED (and s's capture
// invalidated) when s is capturing, else 0.
int sync_call(const char* call, void* s);
// Work queued on a capturing stream s (status(s) != NONE): recorded, not run. Returns the
// CUresult of the call (CUDA_ERROR_STREAM_CAPTURE_INVALIDATED into an invalidated capture).
int record_kernel(void* s, void* f, const char* name, const unsigned grid[3], const unsigned block[3], unsigned smem, void** params,
                  const std::vector<unsigned>& sizes);
int record_memcpy_dtod(void* s, uint64_t dst, uint64_t src, size_t n);
int record_memset(void* s, uint64_t dst, unsigned value, unsigned elem_bytes, size_t n);
int record_host_fn(void* s, void (*fn)(void*), void* data);
// A call the emulator cannot record (named in the message): invalidates s's capture, returns
// CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED.
int refuse(const char* call, void* s, const char* why);
// cuEventRecord(e, s): remembers whether e was last recorded in a capture.
void event_recorded(void* e, void* s);
// e was last recorded in a capturing stream (cuEventQuery / Synchronize then fail).
bool event_captured(void* e);
void event_destroyed(void* e);

}  // namespace emu_cap
