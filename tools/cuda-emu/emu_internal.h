// emu_internal.h: what the parts of the emulated driver (emu_runtime.cpp, driver.cpp) share.
#pragma once
#include <cstddef>
#include <map>
#include <cstdint>
#include <string>
#include <vector>

struct dim3_t {
    unsigned x, y, z;
};
namespace emu_reg {
using Invoke = void (*)(void* fn, void** params);
}

namespace emu {

struct KernelInfo {
    std::string name, file;
    void* fn = nullptr;
    emu_reg::Invoke inv = nullptr;
    std::vector<unsigned> sizes;  // sizeof each parameter, from the C++ signature
    unsigned max_threads = 1024;  // __launch_bounds__ (1024 without)
};

struct Alloc {
    uintptr_t base = 0, region = 0;
    size_t size = 0, padded = 0, region_bytes = 0;
    unsigned long long serial = 0;
    bool freed = false;
};

std::map<std::string, KernelInfo>& registry();
char* dev_alloc(size_t bytes, unsigned long long serial);
int dev_free(uintptr_t p, std::string& err);
bool dev_range_ok(uintptr_t p, size_t n, std::string& err);
bool is_device(uintptr_t a);
std::string describe_address(uintptr_t p);
size_t dev_bytes_in_use();
size_t static_smem_total();
void launch(const KernelInfo* k, dim3_t grid, dim3_t block, size_t smem, void** params);
// The emulator-only hooks (driver.cpp exports them as cuemu_*; see README.md).
void set_only_blocks(const unsigned long long* ids, size_t n, bool on);
bool only_blocks_fit(unsigned long long nblocks, unsigned long long& bad);
int set_block_order(int order);

}  // namespace emu
