// xent_emu.cpp: runs kernels/xent.cu under the CPU emulator (emu.h) on rows of bf16 logits with
// ordinary, partly masked (-inf) and entirely masked rows, aligned and misaligned row bases, and
// real and ignored targets; checks the forward and the backward against a double reference from
// the definitions in src/kernels/xent.rs. A row of only -inf logits must give lse = -inf,
// entropy = 0 (not 0/0), logprob NaN for a real target and 0 for an ignored one, and no gradient.
//
//   tools/attention-emu/run.sh xent [order]
#include "harness.h"

#include "../../kernels/xent.cu"

#include <sys/mman.h>

#include <string>

static bool close(double got, double want, double tol) {
    return got == want || (std::isfinite(got) && std::fabs(got - want) <= tol * (1.0 + std::fabs(want)));
}

// Row r of kind r % 4: 0 ordinary, 1 every logit -inf, 2 a third of the logits -inf, 3 large offset.
static void fill_row(unsigned short* z, unsigned short* d0, long long V, int r) {
    for (long long j = 0; j < V; ++j) {
        float x = (float)(2.0 * normal());
        if (r % 4 == 1 || (r % 4 == 2 && j % 3 == 0)) x = -INFINITY;
        if (r % 4 == 3) x += 40.f;
        z[j] = bf_bits(x);
        d0[j] = bf_bits((float)(1e-3 * normal()));
    }
}

// Runs the forward and the backward over n rows of V logits at z (d_logits at dz, which start as
// d0 on the checked rows) and checks the rows in `rows`; only those blocks run when `subset`.
static void run_check(int n, long long V, float T, const unsigned short* z, unsigned short* dz,
                      const std::vector<unsigned short>& d0, const std::vector<int>& rows, bool subset,
                      const std::string& what) {
    std::vector<u32> tg(n, XENT_IGNORE);
    for (int r : rows) tg[r] = r % 3 == 2 ? XENT_IGNORE : (u32)((r * 7919LL) % V);
    std::vector<float> lp(n, -7.f), lse(n, -7.f), ent(n, -7.f), glp(n, 1.f), gh(n, 0.5f);
    const float c = (float)(1.4426950408889634 / T), inv_t = 1.f / T;
    const u32* tgp = tg.data();
    float *lpp = lp.data(), *lsep = lse.data(), *entp = ent.data();
    const float *glpp = glp.data(), *ghp = gh.data();
    if (subset) emu::E.only_blocks.assign(rows.begin(), rows.end());
    emu::launch("xent_fwd", {(unsigned)n, 1, 1}, {XENT_BLOCK, 1, 1}, 16,
                [=] { xent_fwd(z, tgp, V, c, lpp, lsep, entp); });
    if (subset) emu::E.only_blocks.assign(rows.begin(), rows.end());
    emu::launch("xent_bwd", {(unsigned)n, 1, 1}, {XENT_BLOCK, 1, 1}, 16,
                [=] { xent_bwd(z, tgp, V, c, inv_t, lsep, entp, glpp, ghp, dz); });
    emu::E.only_blocks.clear();

    for (size_t i = 0; i < rows.size(); ++i) {
        const int r = rows[i];
        const unsigned short* zr = z + (size_t)r * V;
        const unsigned short* dr = dz + (size_t)r * V;
        const unsigned short* d0r = d0.data() + i * V;
        const std::string rw = what + " row " + std::to_string(r);
        const bool ignored = tg[r] == XENT_IGNORE;
        if (r % 4 == 1) {
            expect(lse[r] == -INFINITY, rw + ": lse " + std::to_string(lse[r]) + ", want -inf");
            expect(ent[r] == 0.f, rw + ": entropy " + std::to_string(ent[r]) + ", want 0");
            expect(ignored ? lp[r] == 0.f : std::isnan(lp[r]), rw + ": logprob " + std::to_string(lp[r]));
            for (long long j = 0; j < V; ++j) expect(dr[j] == d0r[j], rw + ": got a gradient");
            continue;
        }
        double m = -INFINITY;
        for (long long j = 0; j < V; ++j) m = std::max(m, bf_value(zr[j]) / T);
        double s = 0, a = 0;
        for (long long j = 0; j < V; ++j) {
            const double d = bf_value(zr[j]) / T - m, e = std::exp(d);
            s += e;
            if (e > 0) a += e * d;
        }
        const double L = m + std::log(s), H = std::log(s) - a / s;
        const double LP = ignored ? 0.0 : bf_value(zr[tg[r]]) / T - L;
        expect(close(lse[r], L, 2e-6), rw + ": lse " + std::to_string(lse[r]) + " want " + std::to_string(L));
        expect(close(ent[r], H, 2e-5), rw + ": entropy " + std::to_string(ent[r]) + " want " + std::to_string(H));
        expect(close(lp[r], LP, 2e-6), rw + ": logprob " + std::to_string(lp[r]) + " want " + std::to_string(LP));
        for (long long j = 0; j < V; ++j) {
            const double logp = bf_value(zr[j]) / T - lse[r], p = std::exp(logp);
            const double g_lp = ignored ? 0.0 : glp[r];
            const double g = (g_lp * ((u32)j == tg[r] ? 1.0 - p : -p) - gh[r] * (p > 0 ? p * (logp + ent[r]) : 0.0)) / T;
            const double want = bf_value(d0r[j]) + g;
            // One bf16 rounding of the sum.
            expect(std::fabs(bf_value(dr[j]) - want) <= 4e-3 * std::fabs(want) + 1e-6,
                   rw + ": d_logits[" + std::to_string(j) + "] " + std::to_string(bf_value(dr[j])) + " want " +
                       std::to_string(want));
        }
    }
    std::printf("xent %-52s rows checked %zu (mismatches %d)\n", what.c_str(), rows.size(), g_fail);
}

static void test(int n, long long V, int offset, float T) {
    std::vector<unsigned short> buf((size_t)n * V + 8), dbuf((size_t)n * V + 8), d0((size_t)n * V);
    unsigned short* z = buf.data() + offset;
    unsigned short* dz = dbuf.data() + offset;
    std::vector<int> rows(n);
    for (int r = 0; r < n; ++r) {
        rows[r] = r;
        fill_row(z + (size_t)r * V, d0.data() + (size_t)r * V, V, r);
    }
    std::copy(d0.begin(), d0.end(), dz);
    run_check(n, V, T, z, dz, d0, rows, false,
              "V=" + std::to_string(V) + " offset=" + std::to_string(offset) + " T=" + std::to_string(T));
}

// The Qwen2-0.5B size: 64 x 1024 rows of 151936 logits, 9.96e9 bf16 (more than 2^32 elements):
// logits and d_logits are sparse mappings (no memory until touched) and only the blocks of the
// first row, the first rows whose offset passes 2^31 and 2^32 elements, and the last row run. A
// 32-bit row offset would read and write other rows (zeros) and fail the check.
static void test_real_size() {
    const int n = 64 * 1024;
    const long long V = 151936;
    const size_t bytes = (size_t)n * V * 2;
    void* zm = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    void* dm = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (zm == MAP_FAILED || dm == MAP_FAILED) emu::fail("mmap of %zu bytes failed", bytes);
    unsigned short* z = (unsigned short*)zm;
    unsigned short* dz = (unsigned short*)dm;
    const std::vector<int> rows = {0, (int)((1LL << 31) / V + 1), (int)((1LL << 32) / V + 1), (int)((1LL << 32) / V + 2),
                                   n - 1};
    std::vector<unsigned short> d0(rows.size() * V);
    for (size_t i = 0; i < rows.size(); ++i) {
        fill_row(z + (size_t)rows[i] * V, d0.data() + i * V, V, rows[i]);
        std::copy(d0.begin() + i * V, d0.begin() + (i + 1) * V, dz + (size_t)rows[i] * V);
    }
    run_check(n, V, 1.f, z, dz, d0, rows, true, "Qwen2-0.5B: 65536 x 151936 (row subset)");
    munmap(zm, bytes);
    munmap(dm, bytes);
}

int main(int argc, char** argv) {
    emu::E.order = argc > 1 ? std::atoi(argv[1]) : 0;
    g_rng.seed(11);
    emu::E.block_order = emu::E.order;
    std::printf("xent emulator check: schedule order %d\n", emu::E.order);
    test(8, 17, 0, 1.f);
    test(8, 1000, 1, 0.7f);
    test(8, 9000, 3, 1.3f);  // more than one 16-byte vector per thread, misaligned head and tail
    test_real_size();
    return finish();
}
