// harness.h: what the emulation checks (*_emu.cpp) share: a seeded normal generator, the
// mismatch report and count, bf16 bits <-> values, and the closing summary line.
#pragma once
#include "emu.h"

#include <string>

static std::mt19937_64 g_rng(42);
static double normal() {
    static std::normal_distribution<double> n(0.0, 1.0);
    return n(g_rng);
}

static int g_fail = 0;
static void expect(bool ok, const std::string& what) {
    if (!ok) {
        std::fprintf(stderr, "MISMATCH %s\n", what.c_str());
        if (++g_fail > 20) std::exit(1);
    }
}

static unsigned short bf_bits(float x) { return __float2bfloat16(x).x; }
static double bf_value(unsigned short b) { return (double)__bfloat162float(__nv_bfloat16{b}); }

// Prints the summary and returns the exit status: 1 on a mismatch or a shared-memory race.
static int finish() {
    std::printf("emulated %ld blocks, %ld warp collectives; races %ld; mismatches %d\n", emu::E.blocks,
                emu::E.collectives, emu::E.races, g_fail);
    const bool bad = g_fail || emu::E.races;
    std::printf(bad ? "FAILED\n" : "OK\n");
    return bad ? 1 : 0;
}
