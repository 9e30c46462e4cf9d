// sample_emu.cpp: runs kernels/sample.cu under the CPU emulator (emu.h) on rows of bf16 logits,
// ordinary ones next to rows that cannot be sampled (a NaN logit, a +inf logit, every logit
// -inf), for greedy, plain, top-k and top-k + top-p sampling. Rows that cannot be sampled must
// get token 0 (never >= V), NaN log-probs and n_kept 0 (src/kernels/sample.rs); ordinary rows a
// token < V, the argmax when greedy, exactly k kept tokens under top-k alone, and the policy
// log-prob of their token (double reference).
//
//   tools/attention-emu/run.sh sample [order]
#include "harness.h"

#include "../../kernels/sample.cu"

#include <string>


struct Params {
    const char* name;
    int greedy;
    float t;
    u32 top_k;
    float top_p;
};

static void test(int n, long long V, int offset) {
    std::vector<unsigned short> buf((size_t)n * V + 8);
    unsigned short* z = buf.data() + offset;
    // Row kinds by r % 5: 0 ordinary, 1 one NaN logit, 2 every logit -inf, 3 one +inf logit,
    // 4 every logit NaN.
    for (int r = 0; r < n; ++r) {
        for (long long j = 0; j < V; ++j)
            z[(size_t)r * V + j] = bf_bits(r % 5 == 2 ? -INFINITY : r % 5 == 4 ? NAN : (float)(2.0 * normal()));
        const long long at = (r * 7919) % V;
        if (r % 5 == 1) z[(size_t)r * V + at] = bf_bits(NAN);
        if (r % 5 == 3) z[(size_t)r * V + at] = bf_bits(INFINITY);
    }
    const Params cases[] = {
        {"greedy", 1, 0.f, 0, 2.f}, {"T=1", 0, 1.f, 0, 2.f}, {"top-k 5", 0, 0.8f, 5, 2.f}, {"top-k 7 top-p 0.8", 0, 1.2f, 7, 0.8f}};
    for (const Params& p : cases) {
        std::vector<u32> tok(n, 0xdeadbeefu), nk(n, 0xdeadbeefu);
        std::vector<float> lps(n, -7.f), lpp(n, -7.f);
        const float c = p.greedy ? 0.f : (float)(1.4426950408889634 / p.t);
        const u32 top_k = p.top_k < V ? p.top_k : 0u;
        const unsigned short* zc = z;
        u32 *tp = tok.data(), *kp = nk.data();
        float *lsp = lps.data(), *lpp_ = lpp.data();
        emu::launch("sample_rows", {(unsigned)n, 1, 1}, {SB, 1, 1}, 16, [=] {
            sample_rows(zc, V, p.greedy, c, top_k, p.top_p, 42, 1000, tp, lsp, lpp_, kp);
        });
        const std::string what = std::string(p.name) + " V=" + std::to_string(V) + " offset=" + std::to_string(offset);
        for (int r = 0; r < n; ++r) {
            const std::string rw = what + " row " + std::to_string(r);
            if (r % 5 != 0) {
                expect(tok[r] == 0u && nk[r] == 0u, rw + ": token " + std::to_string(tok[r]) + " n_kept " +
                                                        std::to_string(nk[r]) + ", want 0 and 0");
                expect(std::isnan(lps[r]) && std::isnan(lpp[r]), rw + ": log-probs not NaN");
                continue;
            }
            const unsigned short* row = z + (size_t)r * V;
            double m = -INFINITY;
            long long amax = 0;
            for (long long j = 0; j < V; ++j)
                if (bf_value(row[j]) > m) {
                    m = bf_value(row[j]);
                    amax = j;
                }
            double s = 0;
            for (long long j = 0; j < V; ++j) s += std::exp(bf_value(row[j]) - m);
            expect(tok[r] < V, rw + ": token " + std::to_string(tok[r]) + " out of range");
            if (tok[r] >= V) continue;
            const double want_lpp = bf_value(row[tok[r]]) - m - std::log(s);
            expect(std::fabs(lpp[r] - want_lpp) <= 1e-4 + 2e-6 * std::fabs(want_lpp),
                   rw + ": policy log-prob " + std::to_string(lpp[r]) + " want " + std::to_string(want_lpp));
            if (p.greedy) expect(tok[r] == amax && nk[r] == 1u && lps[r] == 0.f, rw + ": greedy");
            if (!p.greedy && p.top_p > 1.f)
                expect(nk[r] == (top_k ? top_k : (u32)V), rw + ": n_kept " + std::to_string(nk[r]));
            expect(std::isfinite(lps[r]) && lps[r] <= 1e-6f, rw + ": sampling log-prob " + std::to_string(lps[r]));
        }
    }
    std::printf("sample V=%-6lld offset=%d rows %d (mismatches %d)\n", V, offset, n, g_fail);
}

int main(int argc, char** argv) {
    emu::E.order = argc > 1 ? std::atoi(argv[1]) : 0;
    g_rng.seed(13);
    emu::E.block_order = emu::E.order;
    std::printf("sample emulator check: schedule order %d\n", emu::E.order);
    test(10, 17, 0);
    test(10, 300, 1);
    test(10, 5000, 3);
    return finish();
}
