// risk_emu.cpp: runs kernels/risk.cu under the CPU emulator (emu.h) on rows of every padded length
// that mix ordinary samples with ties, signed zeros, NaN and +-inf, and checks every output against
// a double reference written here from the definitions in src/kernels/risk.rs:
//   - the sort is stable in the total order -inf < ... < -0 < +0 < ... < +inf < NaN (NaN last);
//     `sorted` and `perm` must match exactly (perm a permutation even with NaN in the row);
//   - a row holding a non-finite sample gets NaN for every statistic, quantile, loss term and row
//     loss, and NaN added to every gradient position (NaN is never laundered into a number);
//   - every other row matches the reference (rtol 1e-4, atol 1e-5) and is unaffected.
//
//   g++ -std=c++17 -O2 tools/attention-emu/risk_emu.cpp && ./a.out   (or tools/attention-emu/run.sh risk)
#include "harness.h"

#include "../../kernels/risk.cu"

#include <string>

static const float NaNf = std::nanf(""), INFf = INFINITY;

// max(1, floor(frac * K * (1 + 1e-6))) clamped to K, as tail_count in src/kernels/risk.rs.
static int tail_count(double frac, int K) {
    const double c = std::floor(frac * K * (1.0 + 1e-6));
    return std::min(K, std::max(1, (int)c));
}
// Hazen read-out position (lower index, weight of the next), as hazen_position.
static void hazen(double q, int K, int& lo, double& frac) {
    const double p = q * K - 0.5;
    lo = 0;
    frac = 0.0;
    if (p <= 0.0) return;
    if (p >= K - 1) {
        lo = K - 1;
        return;
    }
    lo = (int)std::floor(p);
    frac = p - lo;
}

// The reference order of (value, index): NaN after everything, -0 before +0, ties by index.
static bool ref_less(float a, unsigned ia, float b, unsigned ib) {
    const auto k = [](float x) { return std::make_tuple(std::isnan(x), std::isnan(x) ? 0.0 : (double)x, !std::signbit(x)); };
    if (k(a) != k(b)) return k(a) < k(b);
    return ia < ib;
}
static std::vector<unsigned> ref_perm(const float* x, int K) {
    std::vector<unsigned> p(K);
    for (int i = 0; i < K; ++i) p[i] = i;
    std::sort(p.begin(), p.end(), [&](unsigned a, unsigned b) { return ref_less(x[a], a, x[b], b); });
    return p;
}
static bool row_bad(const float* x, int K) {
    for (int j = 0; j < K; ++j)
        if (!std::isfinite(x[j])) return true;
    return false;
}
struct Mom {
    double mean, var, mlo, vlo, mhi, vhi;
};
static void mean_var(const std::vector<double>& s, int a, int b, double& m, double& v) {
    m = 0;
    for (int i = a; i < b; ++i) m += s[i];
    m /= (b - a);
    v = 0;
    for (int i = a; i < b; ++i) v += (s[i] - m) * (s[i] - m);
    v /= (b - a);
}
static Mom moments(const std::vector<double>& s, int klo, int khi) {
    const int K = (int)s.size();
    Mom m;
    mean_var(s, 0, K, m.mean, m.var);
    mean_var(s, 0, klo, m.mlo, m.vlo);
    mean_var(s, K - khi, K, m.mhi, m.vhi);
    return m;
}

// bits equal, or both NaN
static bool same_value(float a, float b) { return (std::isnan(a) && std::isnan(b)) || a == b; }
static bool close(float got, double want) {
    return std::isfinite(got) && std::fabs(got - want) <= 1e-5 + 1e-4 * std::fabs(want);
}

// A row of kind `kind` (see the header).
static void make_row(float* x, int K, int kind) {
    for (int j = 0; j < K; ++j) {
        const double v = normal() + 0.2;
        switch (kind % 8) {
            case 0: x[j] = (float)v; break;
            case 1: x[j] = (float)(std::round(v * 2.0) / 2.0); break;             // ties
            case 2: x[j] = 1.25f; break;                                          // constant
            case 3: x[j] = j % 3 == 0 ? (j % 2 ? -0.f : 0.f) : (float)v; break;   // signed zeros
            case 4: x[j] = (float)v; break;                                       // + one NaN
            case 5: x[j] = (float)v; break;                                       // + +inf
            case 6: x[j] = (float)v; break;                                       // + -inf
            default: x[j] = j % 2 ? NaNf : (float)v; break;                       // many NaN
        }
    }
    std::uniform_int_distribution<int> pos(0, K - 1);
    if (kind % 8 == 4) x[pos(g_rng)] = NaNf;
    if (kind % 8 == 5) x[pos(g_rng)] = INFf;
    if (kind % 8 == 6) x[pos(g_rng)] = -INFf;
}

#define RISK_P_CASES(X) X(1) X(2) X(4) X(8) X(16) X(32) X(64) X(128) X(256) X(512) X(1024)

// Calls the extern "C" entry points by padded length.
static void run_stats(bool with_perm, int P, const float* x, int R, int K, int klo, int khi, RiskQuantiles q,
                      float* st, float* qo, float* so, unsigned* pe) {
    switch (P) {
#define X(PP)                                                                                            \
    case PP: {                                                                                           \
        using C = RiskCfg<PP>;                                                                           \
        const dim3_t grid{(unsigned)((R + C::ROWS - 1) / C::ROWS), 1, 1}, block{(unsigned)C::THREADS, 1, 1}; \
        if (with_perm)                                                                                   \
            emu::launch("risk_stats_perm_p" #PP, grid, block, 16,                                        \
                        [=] { risk_stats_perm_p##PP(x, R, K, klo, khi, q, st, qo, so, pe); });           \
        else                                                                                             \
            emu::launch("risk_stats_p" #PP, grid, block, 16,                                             \
                        [=] { risk_stats_p##PP(x, R, K, klo, khi, q, st, qo, so, pe); });                \
        break;                                                                                           \
    }
        RISK_P_CASES(X)
#undef X
        default: emu::fail("no risk kernel for P = %d", P);
    }
}

static void run_loss(int P, const float* pred, const float* target, const float* scale, int R, int K, int klo, int khi,
                     RiskWeights w, float* terms, float* grad, float* row_loss) {
    switch (P) {
#define X(PP)                                                                                            \
    case PP: {                                                                                           \
        using C = RiskCfg<PP>;                                                                           \
        const dim3_t grid{(unsigned)((R + C::ROWS - 1) / C::ROWS), 1, 1}, block{(unsigned)C::THREADS, 1, 1}; \
        emu::launch("risk_loss_p" #PP, grid, block, 16,                                                  \
                    [=] { risk_loss_p##PP(pred, target, scale, R, K, klo, khi, w, terms, grad, row_loss); }); \
        break;                                                                                           \
    }
        RISK_P_CASES(X)
#undef X
        default: emu::fail("no risk kernel for P = %d", P);
    }
}

static int next_pow2(int k) {
    int p = 1;
    while (p < k) p <<= 1;
    return p;
}

static void test_stats(int K, double alpha, double beta, bool with_perm) {
    const int P = next_pow2(K);
    const int rows_per_block = [&] {
        int r = 0;
        switch (P) {
#define X(PP) \
    case PP: r = RiskCfg<PP>::ROWS; break;
            RISK_P_CASES(X)
#undef X
        }
        return r;
    }();
    const int R = 2 * rows_per_block + 5;
    const std::vector<double> qs = {0.0, 0.1, 0.5, 0.9, 1.0, 0.37};
    RiskQuantiles q{};
    q.n = (int)qs.size();
    for (int i = 0; i < q.n; ++i) {
        double fr;
        hazen(qs[i], K, q.lo[i], fr);
        q.frac[i] = (float)fr;
    }
    const int klo = tail_count(alpha, K), khi = tail_count(beta, K);
    std::vector<float> x((size_t)R * K), st((size_t)R * RISK_NSTATS, -7.f), qo((size_t)R * q.n, -7.f),
        so((size_t)R * K, -7.f);
    std::vector<unsigned> pe((size_t)R * K, 0xdeadbeefu);
    for (int r = 0; r < R; ++r) make_row(&x[(size_t)r * K], K, r);
    run_stats(with_perm, P, x.data(), R, K, klo, khi, q, st.data(), qo.data(), so.data(), with_perm ? pe.data() : nullptr);
    const std::string what = std::string(with_perm ? "stats_perm" : "stats") + " K=" + std::to_string(K);
    int bad_rows = 0;
    for (int r = 0; r < R; ++r) {
        const float* xr = &x[(size_t)r * K];
        const std::vector<unsigned> p = ref_perm(xr, K);
        std::vector<double> s(K);
        for (int i = 0; i < K; ++i) s[i] = xr[p[i]];
        const std::string rw = what + " row " + std::to_string(r);
        for (int i = 0; i < K; ++i) {
            expect(same_value(so[(size_t)r * K + i], (float)s[i]), rw + " sorted[" + std::to_string(i) + "]");
            if (with_perm) expect(pe[(size_t)r * K + i] == p[i], rw + " perm[" + std::to_string(i) + "]");
        }
        const bool bad = row_bad(xr, K);
        bad_rows += bad;
        const Mom m = moments(s, klo, khi);
        const double want[RISK_NSTATS] = {m.mean, m.var, m.mlo, m.mhi, m.vlo, m.vhi, std::sqrt(m.var)};
        for (int t = 0; t < RISK_NSTATS; ++t) {
            const float got = st[(size_t)r * RISK_NSTATS + t];
            expect(bad ? std::isnan(got) : close(got, want[t]),
                   rw + " stat " + std::to_string(t) + " got " + std::to_string(got) +
                       (bad ? " want NaN" : " want " + std::to_string(want[t])));
        }
        for (int i = 0; i < q.n; ++i) {
            int lo;
            double fr;
            hazen(qs[i], K, lo, fr);
            const double want_q = fr == 0.0 ? s[lo] : s[lo] + fr * (s[std::min(lo + 1, K - 1)] - s[lo]);
            const float got = qo[(size_t)r * q.n + i];
            expect(bad ? std::isnan(got) : close(got, want_q), rw + " quantile " + std::to_string(i) + " got " +
                                                                     std::to_string(got));
        }
    }
    std::printf("%-22s rows %4d (%3d with a non-finite sample)\n", what.c_str(), R, bad_rows);
}

static void test_loss(int K, double alpha, double beta) {
    const int P = next_pow2(K);
    int rows_per_block = 0;
    switch (P) {
#define X(PP) \
    case PP: rows_per_block = RiskCfg<PP>::ROWS; break;
        RISK_P_CASES(X)
#undef X
    }
    const int R = 2 * rows_per_block + 5;
    const int klo = tail_count(alpha, K), khi = tail_count(beta, K);
    const RiskWeights w{1.f, 0.7f, 0.5f, 0.3f};
    std::vector<float> pred((size_t)R * K), target((size_t)R * K), scale(R), terms((size_t)R * RISK_NTERMS, -7.f),
        grad((size_t)R * K), grad0, row_loss(R, -7.f);
    for (int r = 0; r < R; ++r) {
        // Non-finite samples in the prediction on some rows, in the target on others.
        make_row(&pred[(size_t)r * K], K, (r / 2) % 2 ? 0 : r);
        make_row(&target[(size_t)r * K], K, (r / 2) % 2 ? r : 1);
        scale[r] = (float)(0.5 + (r % 7) / 7.0);
    }
    for (auto& g : grad) g = (float)normal();
    grad0 = grad;
    run_loss(P, pred.data(), target.data(), scale.data(), R, K, klo, khi, w, terms.data(), grad.data(), row_loss.data());
    const std::string what = "loss K=" + std::to_string(K);
    int bad_rows = 0;
    for (int r = 0; r < R; ++r) {
        const float* pr = &pred[(size_t)r * K];
        const float* tr = &target[(size_t)r * K];
        const bool bad = row_bad(pr, K) || row_bad(tr, K);
        bad_rows += bad;
        const std::string rw = what + " row " + std::to_string(r);
        const std::vector<unsigned> pp = ref_perm(pr, K), tp = ref_perm(tr, K);
        std::vector<double> ps(K), ts(K);
        for (int i = 0; i < K; ++i) {
            ps[i] = pr[pp[i]];
            ts[i] = tr[tp[i]];
        }
        const Mom mp = moments(ps, klo, khi), mt = moments(ts, klo, khi);
        const double dc = mp.mlo - mt.mlo, dg = mp.mhi - mt.mhi, dl = mp.vlo - mt.vlo, dh = mt.vhi - mp.vhi,
                     dm = mt.mean - mp.mean;
        const double tm[RISK_NTERMS] = {dc * dc, dg * dg, std::max(dl, 0.0) + std::max(dh, 0.0), std::max(dm, 0.0)};
        const double sc = scale[r];
        for (int i = 0; i < RISK_NTERMS; ++i) {
            const float got = terms[(size_t)r * RISK_NTERMS + i];
            expect(bad ? std::isnan(got) : close(got, tm[i]), rw + " term " + std::to_string(i) + " got " +
                                                                  std::to_string(got));
        }
        const double rl = sc * (w.cvar * tm[0] + w.gain * tm[1] + w.shape * tm[2] + w.mean_shift * tm[3]);
        expect(bad ? std::isnan(row_loss[r]) : close(row_loss[r], rl), rw + " row_loss " + std::to_string(row_loss[r]));
        for (int i = 0; i < K; ++i) {
            double g = dm > 0 ? -w.mean_shift / K : 0.0;
            if (i < klo) g += w.cvar * 2 * dc / klo + (dl > 0 ? w.shape * 2 * (ps[i] - mp.mlo) / klo : 0.0);
            if (i >= K - khi) g += w.gain * 2 * dg / khi - (dh > 0 ? w.shape * 2 * (ps[i] - mp.mhi) / khi : 0.0);
            const size_t j = (size_t)r * K + pp[i];
            const double want = grad0[j] + sc * g;
            expect(bad ? std::isnan(grad[j]) : close(grad[j], want),
                   rw + " grad[" + std::to_string(pp[i]) + "] got " + std::to_string(grad[j]) + " want " +
                       std::to_string(want));
        }
    }
    std::printf("%-22s rows %4d (%3d with a non-finite sample)\n", what.c_str(), R, bad_rows);
}

int main(int argc, char** argv) {
    emu::E.order = argc > 1 ? std::atoi(argv[1]) : 0;
    g_rng.seed(7);
    emu::E.block_order = emu::E.order;
    std::printf("risk emulator check: schedule order %d\n", emu::E.order);
    for (int K : {1, 2, 3, 5, 16, 31, 32, 33, 64, 100, 256, 1000, 1024}) {
        test_stats(K, 0.1, 0.2, false);
        test_stats(K, 0.3, 0.1, true);
        test_loss(K, 0.25, 0.5);
    }
    return finish();
}
