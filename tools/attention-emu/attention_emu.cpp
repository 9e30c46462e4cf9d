// attention_emu.cpp: runs kernels/attention.cu under the CPU emulator (emu.h) on random shapes and
// compares every output with a double-precision reference computed here from the same bf16-rounded
// inputs. Checks, besides the values: padded rows of o/lse are exactly 0, padded rows of dq/dk/dv
// are left bit-identical, guard bands around every buffer are untouched, no output stays NaN, and
// the emulator's shared-memory race detector reports nothing.
//
//   tools/attention-emu/run.sh [quick|full] [order]     (order: 0 forward, 1 reverse, 2 random)
#include "harness.h"

#include "../../kernels/attention.cu"

#include <string>

typedef __nv_bfloat16 bf;

static int irand(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g_rng); }

static float rbf(float x) { return __bfloat162float(__float2bfloat16(x)); }
static const float NaNf = std::nanf("");

// A host buffer with NaN-filled guard bands before and after (checked after every launch).
template <class T>
struct Buf {
    static constexpr size_t GUARD = 4096;
    std::vector<unsigned char> raw;
    size_t n;
    explicit Buf(size_t n_) : raw(n_ * sizeof(T) + 2 * GUARD + 64, 0xFF), n(n_) {}
    T* p() {
        uintptr_t a = (uintptr_t)(raw.data() + GUARD);
        a = (a + 63) & ~(uintptr_t)63;
        return (T*)a;
    }
    T& operator[](size_t i) { return p()[i]; }
    void check(const char* what) {
        const unsigned char* lo = raw.data();
        const unsigned char* b = (const unsigned char*)p();
        const unsigned char* e = b + n * sizeof(T);
        for (const unsigned char* c = lo; c < b; ++c)
            if (*c != 0xFF) emu::fail("%s: write before the buffer (guard byte %td)", what, b - c);
        for (const unsigned char* c = e; c < raw.data() + raw.size(); ++c)
            if (*c != 0xFF) emu::fail("%s: write past the buffer (guard byte %td)", what, c - e);
    }
};

struct Shape {
    int B, S, Hq, Hkv, D;
    std::vector<int> lens;
};


// Launch wrappers (the same grids and shared-memory sizes as src/kernels/attention.rs).
static size_t fwd_smem(int D) { return (size_t)(64 + 2 * 64) * (D + 8) * 2; }
static int bwd_bm(int D) { return D >= 128 ? 32 : 64; }
static size_t bwd_smem(int D) {
    const int BN = 64, BM = bwd_bm(D);
    return (size_t)(2 * BN + 4 * BM) * (D + 8) * 2 + 4 * BM * 4;
}
static size_t dq_smem(int D) { return (size_t)(2 * 64 + 4 * 64) * (D + 8) * 2; }
static int dec_ch(int D) { return D >= 128 ? 32 : 64; }
static size_t dec_smem(int D) { return (size_t)(8 * D + 8 * dec_ch(D) + 8) * 4 + (size_t)4 * dec_ch(D) * (D + 8) * 2; }

// Calls the extern "C" entry point name_d{D} (the kernels the Rust launchers load by name).
#define ENTRY(name, D, ...)                                 \
    switch (D) {                                            \
        case 16: name##_d16(__VA_ARGS__); break;            \
        case 32: name##_d32(__VA_ARGS__); break;            \
        case 64: name##_d64(__VA_ARGS__); break;            \
        case 128: name##_d128(__VA_ARGS__); break;          \
        default: emu::fail("no kernel for D = %d", D);      \
    }

static void run_fwd(const Shape& sh, bf* q, bf* k, bf* v, u32* lens, bf* o, float* lse, float scale) {
    const float sl2 = scale * ATT_LOG2E;
    dim3_t grid{(unsigned)sh.Hq, (unsigned)sh.B, (unsigned)((sh.S + 63) / 64)};
    emu::launch("attention_fwd", grid, {128, 1, 1}, fwd_smem(sh.D),
                [=] { ENTRY(attention_fwd, sh.D, q, k, v, lens, o, lse, sh.S, sh.Hq, sh.Hkv, sl2); });
}

static void run_bwd(const Shape& sh, bf* q, bf* k, bf* v, bf* o, float* lse, bf* dout, u32* lens, bf* dq, bf* dk,
                    bf* dv, float* delta, float scale) {
    const float sl2 = scale * ATT_LOG2E;
    const long long rows = (long long)sh.B * sh.S * sh.Hq;
    dim3_t g1{(unsigned)((rows + 3) / 4), 1, 1};
    emu::launch("attention_bwd_pre", g1, {128, 1, 1}, 16,
                [=] { ENTRY(attention_bwd_pre, sh.D, o, dout, lens, delta, sh.B, sh.S, sh.Hq); });
    dim3_t g2{(unsigned)sh.Hkv, (unsigned)sh.B, (unsigned)((sh.S + 63) / 64)};
    emu::launch("attention_bwd", g2, {128, 1, 1}, bwd_smem(sh.D), [=] {
        ENTRY(attention_bwd, sh.D, q, k, v, dout, lse, delta, lens, dk, dv, sh.S, sh.Hq, sh.Hkv, scale, sl2);
    });
    dim3_t g3{(unsigned)sh.Hq, (unsigned)sh.B, (unsigned)((sh.S + 63) / 64)};
    emu::launch("attention_bwd_dq", g3, {128, 1, 1}, dq_smem(sh.D), [=] {
        ENTRY(attention_bwd_dq, sh.D, q, k, v, dout, lse, delta, lens, dq, sh.S, sh.Hq, sh.Hkv, scale, sl2);
    });
}

// Double reference of the forward on bf16-rounded inputs (as floats).
static void ref_fwd(const Shape& sh, const std::vector<float>& q, const std::vector<float>& k,
                    const std::vector<float>& v, double scale, std::vector<double>& o, std::vector<double>& lse) {
    const int S = sh.S, Hq = sh.Hq, Hkv = sh.Hkv, D = sh.D, G = Hq / Hkv;
    o.assign((size_t)sh.B * S * Hq * D, 0.0);
    lse.assign((size_t)sh.B * Hq * S, 0.0);
    std::vector<double> sc(S);
    for (int b = 0; b < sh.B; ++b)
        for (int h = 0; h < Hq; ++h)
            for (int i = 0; i < sh.lens[b]; ++i) {
                const int hk = h / G;
                double m = -INFINITY;
                for (int j = 0; j <= i; ++j) {
                    double s = 0;
                    for (int d = 0; d < D; ++d)
                        s += (double)q[(((size_t)b * S + i) * Hq + h) * D + d] *
                             k[(((size_t)b * S + j) * Hkv + hk) * D + d];
                    sc[j] = s * scale;
                    m = std::max(m, sc[j]);
                }
                double l = 0;
                for (int j = 0; j <= i; ++j) l += std::exp(sc[j] - m);
                for (int d = 0; d < D; ++d) {
                    double a = 0;
                    for (int j = 0; j <= i; ++j) a += std::exp(sc[j] - m) * v[(((size_t)b * S + j) * Hkv + hk) * D + d];
                    o[(((size_t)b * S + i) * Hq + h) * D + d] = a / l;
                }
                lse[((size_t)b * Hq + h) * S + i] = m + std::log(l);
            }
}

// Double reference of the gradients given o (bf16 as float) and lse (as float), FA convention.
static void ref_bwd(const Shape& sh, const std::vector<float>& q, const std::vector<float>& k,
                    const std::vector<float>& v, const std::vector<float>& o, const std::vector<float>& lse,
                    const std::vector<float>& dout, double scale, std::vector<double>& dq, std::vector<double>& dk,
                    std::vector<double>& dv) {
    const int S = sh.S, Hq = sh.Hq, Hkv = sh.Hkv, D = sh.D, G = Hq / Hkv;
    dq.assign((size_t)sh.B * S * Hq * D, 0.0);
    dk.assign((size_t)sh.B * S * Hkv * D, 0.0);
    dv.assign((size_t)sh.B * S * Hkv * D, 0.0);
    for (int b = 0; b < sh.B; ++b)
        for (int h = 0; h < Hq; ++h)
            for (int i = 0; i < sh.lens[b]; ++i) {
                const int hk = h / G;
                const size_t qi = (((size_t)b * S + i) * Hq + h) * D;
                double Di = 0;
                for (int d = 0; d < D; ++d) Di += (double)dout[qi + d] * o[qi + d];
                for (int j = 0; j <= i; ++j) {
                    const size_t kj = (((size_t)b * S + j) * Hkv + hk) * D;
                    double s = 0, dp = 0;
                    for (int d = 0; d < D; ++d) {
                        s += (double)q[qi + d] * k[kj + d];
                        dp += (double)dout[qi + d] * v[kj + d];
                    }
                    const double p = std::exp(s * scale - (double)lse[((size_t)b * Hq + h) * S + i]);
                    const double ds = p * (dp - Di);
                    for (int d = 0; d < D; ++d) {
                        dv[kj + d] += p * dout[qi + d];
                        dq[qi + d] += scale * ds * k[kj + d];
                        dk[kj + d] += scale * ds * q[qi + d];
                    }
                }
            }
}

static std::string shape_str(const Shape& sh) {
    std::string s = "B=" + std::to_string(sh.B) + " S=" + std::to_string(sh.S) + " Hq=" + std::to_string(sh.Hq) +
                    " Hkv=" + std::to_string(sh.Hkv) + " D=" + std::to_string(sh.D) + " lens=[";
    for (int l : sh.lens) s += std::to_string(l) + ",";
    return s + "]";
}

// Fills a [B][S][H][D] bf16 tensor: N(0, sigma) rounded to bf16 on valid rows, NaN on padding.
static void fill_tokens(const Shape& sh, int H, Buf<bf>& t, std::vector<float>& f, double sigma) {
    f.assign((size_t)sh.B * sh.S * H * sh.D, 0.f);
    for (int b = 0; b < sh.B; ++b)
        for (int s = 0; s < sh.S; ++s)
            for (int x = 0; x < H * sh.D; ++x) {
                const size_t i = ((size_t)b * sh.S + s) * H * sh.D + x;
                if (s < sh.lens[b]) {
                    f[i] = rbf((float)(normal() * sigma));
                    t[i] = __float2bfloat16(f[i]);
                } else {
                    f[i] = 0.f;
                    t[i] = __float2bfloat16(NaNf);
                }
            }
}

static void test_fwd_bwd(const Shape& sh) {
    const int B = sh.B, S = sh.S, Hq = sh.Hq, Hkv = sh.Hkv, D = sh.D;
    const size_t nq = (size_t)B * S * Hq * D, nk = (size_t)B * S * Hkv * D, nl = (size_t)B * Hq * S;
    const double scale = 1.0 / std::sqrt((double)D);
    Buf<bf> q(nq), k(nk), v(nk), o(nq), dout(nq), dq(nq), dk(nk), dv(nk);
    Buf<float> lse(nl), delta(nl);
    Buf<u32> lens(B);
    for (int b = 0; b < B; ++b) lens[b] = (u32)sh.lens[b];
    std::vector<float> fq, fk, fv, fdo;
    fill_tokens(sh, Hq, q, fq, 1.5);
    fill_tokens(sh, Hkv, k, fk, 1.5);
    fill_tokens(sh, Hkv, v, fv, 1.0);
    fill_tokens(sh, Hq, dout, fdo, 1.0);
    for (size_t i = 0; i < nq; ++i) o[i] = __float2bfloat16(NaNf);
    for (size_t i = 0; i < nl; ++i) lse[i] = NaNf;

    run_fwd(sh, q.p(), k.p(), v.p(), lens.p(), o.p(), lse.p(), (float)scale);
    for (auto* bp : {&q, &k, &v, &o}) bp->check("fwd bf16 buffer");
    lse.check("fwd lse");

    std::vector<double> ro, rl;
    ref_fwd(sh, fq, fk, fv, scale, ro, rl);
    const std::string ss = shape_str(sh);
    double max_ref = 1e-30;
    for (double x : ro) max_ref = std::max(max_ref, std::fabs(x));
    double worst_o = 0, worst_l = 0;
    for (int b = 0; b < B; ++b)
        for (int s = 0; s < S; ++s)
            for (int h = 0; h < Hq; ++h) {
                const bool valid = s < sh.lens[b];
                for (int d = 0; d < D; ++d) {
                    const size_t i = (((size_t)b * S + s) * Hq + h) * D + d;
                    const float got = __bfloat162float(o[i]);
                    if (!valid) {
                        expect(got == 0.f, "fwd o padding not 0 " + ss);
                        continue;
                    }
                    const double err = std::fabs(got - ro[i]);
                    worst_o = std::max(worst_o, err / max_ref);
                    expect(std::isfinite(got) && err <= 1e-2 * max_ref + 8e-3 * std::fabs(ro[i]),
                           "fwd o[" + std::to_string(i) + "] got " + std::to_string(got) + " want " +
                               std::to_string(ro[i]) + " " + ss);
                }
                const size_t li = ((size_t)b * Hq + h) * S + s;
                if (!valid) {
                    expect(lse[li] == 0.f, "fwd lse padding not 0 " + ss);
                } else {
                    const double err = std::fabs(lse[li] - rl[li]);
                    worst_l = std::max(worst_l, err);
                    expect(std::isfinite(lse[li]) && err <= 2e-4 + 2e-5 * std::fabs(rl[li]),
                           "fwd lse[" + std::to_string(li) + "] got " + std::to_string(lse[li]) + " want " +
                               std::to_string(rl[li]) + " " + ss);
                }
            }

    // Backward from the emulated forward's o and lse; dq/dk/dv start random on valid rows and
    // NaN on padded rows (which must stay bit-identical).
    std::vector<float> fo(nq), fl(nl);
    for (size_t i = 0; i < nq; ++i) fo[i] = __bfloat162float(o[i]);
    for (size_t i = 0; i < nl; ++i) fl[i] = lse[i];
    std::vector<float> dq0(nq), dk0(nk), dv0(nk);
    auto init_grad = [&](Buf<bf>& g, std::vector<float>& g0, int H) {
        for (int b = 0; b < B; ++b)
            for (int s = 0; s < S; ++s)
                for (int x = 0; x < H * D; ++x) {
                    const size_t i = ((size_t)b * S + s) * H * D + x;
                    g0[i] = s < sh.lens[b] ? rbf((float)(normal() * 0.5)) : NaNf;
                    g[i] = __float2bfloat16(g0[i]);
                }
    };
    init_grad(dq, dq0, Hq);
    init_grad(dk, dk0, Hkv);
    init_grad(dv, dv0, Hkv);
    for (size_t i = 0; i < nl; ++i) delta[i] = NaNf;
    run_bwd(sh, q.p(), k.p(), v.p(), o.p(), lse.p(), dout.p(), lens.p(), dq.p(), dk.p(), dv.p(), delta.p(),
            (float)scale);
    for (auto* bp : {&dq, &dk, &dv}) bp->check("bwd grad buffer");
    delta.check("bwd delta");

    std::vector<double> rdq, rdk, rdv;
    ref_bwd(sh, fq, fk, fv, fo, fl, fdo, scale, rdq, rdk, rdv);
    auto cmp = [&](const char* name, Buf<bf>& g, const std::vector<float>& g0, const std::vector<double>& ref, int H) {
        double mx = 1e-30;
        for (double x : ref) mx = std::max(mx, std::fabs(x));
        double worst = 0;
        for (int b = 0; b < B; ++b)
            for (int s = 0; s < S; ++s)
                for (int x = 0; x < H * D; ++x) {
                    const size_t i = ((size_t)b * S + s) * H * D + x;
                    const float got = __bfloat162float(g[i]);
                    if (s >= sh.lens[b]) {
                        expect(g[i].x == __float2bfloat16(NaNf).x,
                               std::string(name) + " padding row touched " + ss);
                        continue;
                    }
                    const double want = g0[i] + ref[i];
                    const double err = std::fabs(got - want);
                    worst = std::max(worst, std::fabs(got - want) / mx);
                    // Floor 1e-3: with S = 1 the exact dq, dk are 0 and only rounding noise remains.
                    expect(std::isfinite(got) && err <= 2e-2 * std::max(mx, 0.05) + 8e-3 * std::fabs(want),
                           std::string(name) + "[" + std::to_string(i) + "] got " + std::to_string(got) + " want " +
                               std::to_string(want) + " (grad " + std::to_string(ref[i]) + ", max " +
                               std::to_string(mx) + ") " + ss);
                }
        return worst;
    };
    const double wq = cmp("dq", dq, dq0, rdq, Hq);
    const double wk = cmp("dk", dk, dk0, rdk, Hkv);
    const double wv = cmp("dv", dv, dv0, rdv, Hkv);

    // Bit reproducibility: the same backward with the blocks of every grid in reverse and in
    // random order must give the same bits (no result may depend on which block runs first).
    const std::vector<bf> bq(dq.p(), dq.p() + nq), bk(dk.p(), dk.p() + nk), bv(dv.p(), dv.p() + nk);
    const int order0 = emu::E.block_order;
    for (int order : {1, 2}) {
        for (size_t i = 0; i < nq; ++i) dq[i] = __float2bfloat16(dq0[i]);
        for (size_t i = 0; i < nk; ++i) {
            dk[i] = __float2bfloat16(dk0[i]);
            dv[i] = __float2bfloat16(dv0[i]);
        }
        emu::E.block_order = order;
        run_bwd(sh, q.p(), k.p(), v.p(), o.p(), lse.p(), dout.p(), lens.p(), dq.p(), dk.p(), dv.p(), delta.p(),
                (float)scale);
        emu::E.block_order = order0;
        auto same = [&](const char* name, Buf<bf>& g, const std::vector<bf>& want) {
            size_t diff = 0;
            for (size_t i = 0; i < want.size(); ++i) diff += g[i].x != want[i].x;
            expect(diff == 0, std::string(name) + ": " + std::to_string(diff) + " elements differ in block order " +
                                  std::to_string(order) + " " + ss);
        };
        same("dq", dq, bq);
        same("dk", dk, bk);
        same("dv", dv, bv);
    }
    std::printf("fwd+bwd %-60s o %.1e lse %.1e dq %.1e dk %.1e dv %.1e (rel. to max|ref|)\n", ss.c_str(), worst_o,
                worst_l, wq, wk, wv);
}

static void test_decode(int B, int Hq, int Hkv, int D, int max_len, std::vector<int> lens, int split_len) {
    const int G = Hq / Hkv;
    const size_t nc = (size_t)B * Hkv * max_len * D;
    Buf<bf> q((size_t)B * Hq * D), kc(nc), vc(nc), out((size_t)B * Hq * D);
    Buf<u32> cl(B);
    const int n_splits = (max_len + split_len - 1) / split_len;
    Buf<float> ml((size_t)B * Hq * n_splits * 2), acc((size_t)B * Hq * n_splits * D);
    std::vector<float> fq((size_t)B * Hq * D), fk(nc), fv(nc);
    for (size_t i = 0; i < fq.size(); ++i) {
        fq[i] = rbf((float)(normal() * 1.5));
        q[i] = __float2bfloat16(fq[i]);
        out[i] = __float2bfloat16(NaNf);
    }
    for (int b = 0; b < B; ++b) {
        cl[b] = (u32)lens[b];
        for (int hk = 0; hk < Hkv; ++hk)
            for (int j = 0; j < max_len; ++j)
                for (int d = 0; d < D; ++d) {
                    const size_t i = (((size_t)b * Hkv + hk) * max_len + j) * D + d;
                    const bool ok = j < lens[b];
                    fk[i] = ok ? rbf((float)(normal() * 1.5)) : 0.f;
                    fv[i] = ok ? rbf((float)normal()) : 0.f;
                    kc[i] = __float2bfloat16(ok ? fk[i] : NaNf);
                    vc[i] = __float2bfloat16(ok ? fv[i] : NaNf);
                }
    }
    for (size_t i = 0; i < ml.n; ++i) ml[i] = NaNf;
    for (size_t i = 0; i < acc.n; ++i) acc[i] = NaNf;
    const float scale = 1.f / std::sqrt((float)D), sl2 = scale * ATT_LOG2E;
    bf *qp = q.p(), *kp = kc.p(), *vp = vc.p(), *op = out.p();
    float *mlp = ml.p(), *ap = acc.p();
    u32* lp = cl.p();
    emu::launch("attention_decode", {(unsigned)n_splits, (unsigned)Hkv, (unsigned)B}, {128, 1, 1}, dec_smem(D), [=] {
        ENTRY(attention_decode, D, qp, kp, vp, lp, mlp, ap, Hq, Hkv, max_len, split_len, sl2);
    });
    // The combine runs D threads per block (D = 16: one warp, half of it idle).
    emu::launch("attention_decode_combine", {(unsigned)Hq, (unsigned)B, 1}, {(unsigned)std::max(32, D), 1, 1}, 16,
                [=] {
                    if ((int)threadIdx.x < D) ENTRY(attention_decode_combine, D, mlp, ap, op, Hq, n_splits);
                });
    for (auto* bp : {&q, &kc, &vc, &out}) bp->check("decode bf16 buffer");
    ml.check("decode ml");
    acc.check("decode acc");
    std::string ss = "decode B=" + std::to_string(B) + " Hq=" + std::to_string(Hq) + " Hkv=" + std::to_string(Hkv) +
                     " D=" + std::to_string(D) + " max_len=" + std::to_string(max_len) +
                     " split=" + std::to_string(split_len) + " lens=[";
    for (int l : lens) ss += std::to_string(l) + ",";
    ss += "]";
    double worst = 0;
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < Hq; ++h) {
            const int hk = h / G;
            std::vector<double> sc(lens[b]);
            double m = -INFINITY;
            for (int j = 0; j < lens[b]; ++j) {
                double s = 0;
                for (int d = 0; d < D; ++d)
                    s += (double)fq[((size_t)b * Hq + h) * D + d] * fk[(((size_t)b * Hkv + hk) * max_len + j) * D + d];
                sc[j] = s * scale;
                m = std::max(m, sc[j]);
            }
            double l = 0;
            for (int j = 0; j < lens[b]; ++j) l += std::exp(sc[j] - m);
            for (int d = 0; d < D; ++d) {
                double a = 0;
                for (int j = 0; j < lens[b]; ++j)
                    a += std::exp(sc[j] - m) * fv[(((size_t)b * Hkv + hk) * max_len + j) * D + d];
                const double want = lens[b] ? a / l : 0.0;
                const float got = __bfloat162float(out[((size_t)b * Hq + h) * D + d]);
                worst = std::max(worst, std::fabs(got - want));
                expect(std::isfinite(got) && std::fabs(got - want) <= 1e-2 + 8e-3 * std::fabs(want),
                       "decode out got " + std::to_string(got) + " want " + std::to_string(want) + " b=" +
                           std::to_string(b) + " h=" + std::to_string(h) + " d=" + std::to_string(d) + " " + ss);
            }
        }
    std::printf("%-90s max|err| %.1e\n", ss.c_str(), worst);
}

static std::vector<int> mixed_lens(int B, int S) {
    std::vector<int> l(B);
    for (int b = 0; b < B; ++b) {
        switch (b % 4) {
            case 0: l[b] = S; break;
            case 1: l[b] = B > 1 ? 0 : S; break;
            case 2: l[b] = irand(1, S); break;
            default: l[b] = irand(std::max(1, S / 2), S); break;
        }
    }
    return l;
}

int main(int argc, char** argv) {
    const std::string mode = argc > 1 ? argv[1] : "quick";
    emu::E.order = argc > 2 ? std::atoi(argv[2]) : 0;
    if (argc > 3) g_rng.seed(std::atoll(argv[3]));
    std::printf("attention emulator check: mode %s, schedule order %d\n", mode.c_str(), emu::E.order);
    struct G {
        int Hq, Hkv;
    };
    const G groups[] = {{2, 2}, {4, 2}, {7, 1}};
    if (mode == "quick") {
        test_fwd_bwd({2, 17, 2, 1, 16, {17, 5}});
        test_fwd_bwd({3, 70, 4, 2, 32, {70, 0, 33}});
        test_fwd_bwd({1, 129, 2, 2, 64, {129}});
        test_fwd_bwd({2, 65, 2, 1, 128, {65, 40}});
        // Eight key tiles per query row: enough partial sums that an order-dependent dQ shows.
        test_fwd_bwd({1, 500, 2, 1, 64, {500}});
        test_decode(3, 4, 2, 64, 200, {200, 0, 77}, 64);
        test_decode(2, 7, 1, 128, 100, {1, 100}, 64);
        test_decode(2, 9, 1, 32, 300, {300, 130}, 256);  // 4-5 chunks per split, 2 head groups
    } else {
        for (int D : {16, 32, 64, 128})
            for (const G& gr : groups)
                for (int S : {1, 17, 64, 129}) {
                    const int B = S == 1 ? 2 : 3;
                    test_fwd_bwd({B, S, gr.Hq, gr.Hkv, D, mixed_lens(B, S)});
                }
        test_fwd_bwd({1, 300, 2, 1, 64, {300}});
        test_fwd_bwd({2, 260, 4, 4, 128, {260, 131}});
        test_fwd_bwd({1, 512, 1, 1, 32, {512}});
        // Qwen2-0.5B heads over a 2048-long cache, split as decode_splits(8, 2, 2048) = (16, 128).
        test_decode(8, 14, 2, 64, 2048, {2048, 2048, 1, 1500, 0, 2047, 129, 128}, 128);
        for (int D : {16, 32, 64, 128})
            for (const G& gr : {G{2, 2}, G{14, 2}, G{7, 1}, G{16, 1}})
                for (int split : {64, 128, 1024}) {
                    const int max_len = irand(1, 300);
                    std::vector<int> lens = {max_len, 0, irand(1, max_len), 1};
                    test_decode(4, gr.Hq, gr.Hkv, D, max_len, lens, split);
                }
    }
    return finish();
}
