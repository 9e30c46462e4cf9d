// xent_emu.cpp: runs kernels/xent.cu under the CPU emulator (emu.h) on rows of bf16 logits with
// ordinary, partly masked (-inf) and entirely masked rows, aligned and misaligned row bases, and
// real and ignored targets; checks the forward and the backward against a double reference from
// the definitions in src/kernels/xent.rs. A row of only -inf logits must give lse = -inf,
// entropy = 0 (not 0/0), logprob NaN for a real target and 0 for an ignored one, and no gradient.
//
//   tools/attention-emu/run.sh xent [order]
#include "emu.h"

#include "../../kernels/xent.cu"

#include <string>

static std::mt19937_64 g_rng(11);
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
static unsigned short bf(float x) { return __float2bfloat16(x).x; }
static double unbf(unsigned short b) { return (double)__bfloat162float(__nv_bfloat16{b}); }
static bool close(double got, double want, double tol) {
    return got == want || (std::isfinite(got) && std::fabs(got - want) <= tol * (1.0 + std::fabs(want)));
}

static void test(int n, long long V, int offset, float T) {
    // Row kinds: 0 ordinary, 1 every logit -inf, 2 a third of the logits -inf, 3 large offset.
    std::vector<unsigned short> buf((size_t)n * V + 8), dbuf((size_t)n * V + 8);
    unsigned short* z = buf.data() + offset;
    unsigned short* dz = dbuf.data() + offset;
    std::vector<u32> tg(n);
    std::vector<unsigned short> d0((size_t)n * V);
    for (int r = 0; r < n; ++r) {
        for (long long j = 0; j < V; ++j) {
            float x = (float)(2.0 * normal());
            if (r % 4 == 1 || (r % 4 == 2 && j % 3 == 0)) x = -INFINITY;
            if (r % 4 == 3) x += 40.f;
            z[(size_t)r * V + j] = bf(x);
            d0[(size_t)r * V + j] = bf((float)(1e-3 * normal()));
        }
        tg[r] = r % 3 == 2 ? XENT_IGNORE : (u32)((r * 7919) % V);
    }
    std::vector<float> lp(n, -7.f), lse(n, -7.f), ent(n, -7.f), glp(n, 1.f), gh(n, 0.5f);
    const float c = (float)(1.4426950408889634 / T), inv_t = 1.f / T;
    const unsigned short* zc = z;
    const u32* tgp = tg.data();
    float *lpp = lp.data(), *lsep = lse.data(), *entp = ent.data();
    emu::launch("xent_fwd", {(unsigned)n, 1, 1}, {XENT_BLOCK, 1, 1}, 16,
                [=] { xent_fwd(zc, tgp, V, c, lpp, lsep, entp); });
    std::copy(d0.begin(), d0.end(), dz);
    const float *glpp = glp.data(), *ghp = gh.data();
    emu::launch("xent_bwd", {(unsigned)n, 1, 1}, {XENT_BLOCK, 1, 1}, 16,
                [=] { xent_bwd(zc, tgp, V, c, inv_t, lsep, entp, glpp, ghp, dz); });

    const std::string what = "V=" + std::to_string(V) + " offset=" + std::to_string(offset) + " T=" + std::to_string(T);
    for (int r = 0; r < n; ++r) {
        const std::string rw = what + " row " + std::to_string(r);
        const bool ignored = tg[r] == XENT_IGNORE;
        if (r % 4 == 1) {
            expect(lse[r] == -INFINITY, rw + ": lse " + std::to_string(lse[r]) + ", want -inf");
            expect(ent[r] == 0.f, rw + ": entropy " + std::to_string(ent[r]) + ", want 0");
            expect(ignored ? lp[r] == 0.f : std::isnan(lp[r]), rw + ": logprob " + std::to_string(lp[r]));
            for (long long j = 0; j < V; ++j)
                expect(dz[(size_t)r * V + j] == d0[(size_t)r * V + j], rw + ": got a gradient");
            continue;
        }
        double m = -INFINITY;
        for (long long j = 0; j < V; ++j) m = std::max(m, unbf(z[(size_t)r * V + j]) / T);
        double s = 0, a = 0;
        for (long long j = 0; j < V; ++j) {
            const double d = unbf(z[(size_t)r * V + j]) / T - m, e = std::exp(d);
            s += e;
            if (e > 0) a += e * d;
        }
        const double L = m + std::log(s), H = std::log(s) - a / s;
        const double LP = ignored ? 0.0 : unbf(z[(size_t)r * V + tg[r]]) / T - L;
        expect(close(lse[r], L, 2e-6), rw + ": lse " + std::to_string(lse[r]) + " want " + std::to_string(L));
        expect(close(ent[r], H, 2e-5), rw + ": entropy " + std::to_string(ent[r]) + " want " + std::to_string(H));
        expect(close(lp[r], LP, 2e-6), rw + ": logprob " + std::to_string(lp[r]) + " want " + std::to_string(LP));
        for (long long j = 0; j < V; ++j) {
            const double logp = unbf(z[(size_t)r * V + j]) / T - lse[r], p = std::exp(logp);
            const double g_lp = ignored ? 0.0 : glp[r];
            const double g = (g_lp * ((u32)j == tg[r] ? 1.0 - p : -p) - gh[r] * (p > 0 ? p * (logp + ent[r]) : 0.0)) / T;
            const double want = unbf(d0[(size_t)r * V + j]) + g;
            // One bf16 rounding of the sum.
            expect(std::fabs(unbf(dz[(size_t)r * V + j]) - want) <= 4e-3 * std::fabs(want) + 1e-6,
                   rw + ": d_logits[" + std::to_string(j) + "] " + std::to_string(unbf(dz[(size_t)r * V + j])) +
                       " want " + std::to_string(want));
        }
    }
    std::printf("xent %-40s rows %d ok so far (mismatches %d)\n", what.c_str(), n, g_fail);
}

int main(int argc, char** argv) {
    emu::E.order = argc > 1 ? std::atoi(argv[1]) : 0;
    emu::E.block_order = emu::E.order;
    std::printf("xent emulator check: schedule order %d\n", emu::E.order);
    test(8, 17, 0, 1.f);
    test(8, 1000, 1, 0.7f);
    test(8, 9000, 3, 1.3f);  // more than one 16-byte vector per thread, misaligned head and tail
    std::printf("emulated %ld blocks, %ld warp collectives; mismatches %d\n", emu::E.blocks, emu::E.collectives,
                g_fail);
    std::printf(g_fail ? "FAILED\n" : "OK\n");
    return g_fail ? 1 : 0;
}
