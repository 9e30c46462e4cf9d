// cublas.cpp: the cuBLAS entry points dfpo calls (through cudarc 0.19), over the emulated driver.
// cublasGemmEx computes exactly what it is asked, column-major, in fp32 with the products summed
// in k order: bf16 or fp32 inputs, bf16 (round to nearest even) or fp32 output, alpha and beta
// fp32 (C is not read when beta == 0, as cuBLAS). Every operand's extent is checked to lie in
// one live allocation, and a context must be current on the calling thread.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

extern "C" int cuemu_context_current();
extern "C" int cuemu_range_ok(unsigned long long p, size_t n, char* err, size_t errlen);
extern "C" int cuemu_stream_ok(void* s);
extern "C" int cuemu_capture_status(void* s);
extern "C" int cuemu_record_callback(void* s, const char* what, int (*run)(void*), void* data, void (*dtor)(void*));

namespace {
enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
enum { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_PEDANTIC = 69, CUBLAS_COMPUTE_32F_FAST_16BF = 75 };

struct Handle {
    void* stream = nullptr;
    int math_mode = 0;
    int ptr_mode = 0;  // 0 host
};

float bf2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
uint16_t f2bf(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
size_t tsize(int t) { return t == CUDA_R_32F ? 4 : 2; }

bool extent_ok(const char* what, const void* p, int t, long long rows, long long cols, long long ld) {
    if (rows <= 0 || cols <= 0) return true;
    const size_t n = (size_t)((cols - 1) * ld + rows) * tsize(t);
    char err[400];
    if (!cuemu_range_ok((unsigned long long)p, n, err, sizeof err)) {
        std::fprintf(stderr, "cuda-emu cublasGemmEx: operand %s (%lld x %lld, ld %lld): %s\n", what, rows, cols, ld,
                     err);
        return false;
    }
    return true;
}

float load(const void* p, int t, size_t i) {
    if (t == CUDA_R_32F) {
        float f;
        std::memcpy(&f, (const char*)p + 4 * i, 4);
        return f;
    }
    uint16_t b;
    std::memcpy(&b, (const char*)p + 2 * i, 2);
    return bf2f(b);
}

// One GEMM, by value (alpha and beta read at call time: host pointer mode).
struct Gemm {
    int ta, tb, m, n, k;
    float al, be;
    const void *A, *B;
    void* C;
    int at, lda, bt, ldb, ct, ldc;
};

// The operands' extents (checked at the call, and again when a captured GEMM replays).
bool operands_ok(const Gemm& g) {
    const int arows = g.ta ? g.k : g.m, acols = g.ta ? g.m : g.k, brows = g.tb ? g.n : g.k, bcols = g.tb ? g.k : g.n;
    if (g.k > 0 && (!extent_ok("A", g.A, g.at, arows, acols, g.lda) || !extent_ok("B", g.B, g.bt, brows, bcols, g.ldb)))
        return false;
    return extent_ok("C", g.C, g.ct, g.m, g.n, g.ldc);
}

void run(const Gemm& g) {
    const int m = g.m, n = g.n, k = g.k, ta = g.ta, tb = g.tb, lda = g.lda, ldb = g.ldb, ldc = g.ldc;
    // op(A) as m x k row-major and op(B) as n x k row-major, in fp32.
    std::vector<float> a((size_t)m * k), b((size_t)n * k);
    for (int i = 0; i < m; ++i)
        for (int p = 0; p < k; ++p)
            a[(size_t)i * k + p] = load(g.A, g.at, ta ? (size_t)i * lda + p : (size_t)p * lda + i);
    for (int j = 0; j < n; ++j)
        for (int p = 0; p < k; ++p)
            b[(size_t)j * k + p] = load(g.B, g.bt, tb ? (size_t)p * ldb + j : (size_t)j * ldb + p);
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            const float* ar = &a[(size_t)i * k];
            const float* br = &b[(size_t)j * k];
            float s = 0.0f;
            for (int p = 0; p < k; ++p) s += ar[p] * br[p];
            const size_t ci = (size_t)j * ldc + i;
            float r = g.al * s;
            if (g.be != 0.0f) r += g.be * load(g.C, g.ct, ci);
            if (g.ct == CUDA_R_32F)
                std::memcpy((char*)g.C + 4 * ci, &r, 4);
            else {
                uint16_t o = f2bf(r);
                std::memcpy((char*)g.C + 2 * ci, &o, 2);
            }
        }
}

// A GEMM recorded into a stream capture, replayed by cuGraphLaunch.
int replay(void* p) {
    const Gemm& g = *(const Gemm*)p;
    if (!operands_ok(g)) {
        std::fprintf(stderr, "cuda-emu cublasGemmEx (captured, replayed): an operand is no longer in one live "
                             "allocation\n");
        return 700;  // CUDA_ERROR_ILLEGAL_ADDRESS
    }
    run(g);
    return 0;
}
void free_gemm(void* p) { delete (Gemm*)p; }
}  // namespace

extern "C" {

int cublasCreate_v2(void** h) {
    if (!cuemu_context_current()) {
        std::fprintf(stderr, "cuda-emu cublasCreate: no CUDA context is current on this thread\n");
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    *h = new Handle();
    return CUBLAS_STATUS_SUCCESS;
}
int cublasDestroy_v2(void* h) {
    delete (Handle*)h;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasSetStream_v2(void* h, void* s) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!cuemu_stream_ok(s)) return CUBLAS_STATUS_INVALID_VALUE;
    ((Handle*)h)->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasGetStream_v2(void* h, void** s) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    *s = ((Handle*)h)->stream;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasSetMathMode(void* h, int m) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    ((Handle*)h)->math_mode = m;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasGetMathMode(void* h, int* m) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    *m = ((Handle*)h)->math_mode;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasSetPointerMode_v2(void* h, int m) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (m != 0) {
        std::fprintf(stderr, "cuda-emu cublasSetPointerMode: only host pointer mode is emulated\n");
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    return CUBLAS_STATUS_SUCCESS;
}
int cublasSetWorkspace_v2(void* h, void*, size_t) { return h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED; }

// C (m x n, ldc) = alpha op(A) op(B) + beta C, column-major; op(A) is m x k, op(B) k x n.
int cublasGemmEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* A, int at, int lda,
                 const void* B, int bt, int ldb, const void* beta, void* C, int ct, int ldc, int compute, int algo) {
    (void)algo;
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!cuemu_context_current()) {
        std::fprintf(stderr, "cuda-emu cublasGemmEx: no CUDA context is current on this thread\n");
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC) {
        std::fprintf(stderr, "cuda-emu cublasGemmEx: compute type %d is not emulated\n", compute);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    for (int t : {at, bt, ct})
        if (t != CUDA_R_32F && t != CUDA_R_16BF) {
            std::fprintf(stderr, "cuda-emu cublasGemmEx: data type %d is not emulated\n", t);
            return CUBLAS_STATUS_NOT_SUPPORTED;
        }
    if (ta > 1 || tb > 1 || ta < 0 || tb < 0) {
        std::fprintf(stderr, "cuda-emu cublasGemmEx: only CUBLAS_OP_N and CUBLAS_OP_T are emulated\n");
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    const int arows = ta ? k : m, acols = ta ? m : k, brows = tb ? n : k, bcols = tb ? k : n;
    if (lda < (arows > 1 ? arows : 1) || ldb < (brows > 1 ? brows : 1) || ldc < (m > 1 ? m : 1)) {
        std::fprintf(stderr, "cuda-emu cublasGemmEx: leading dimension too small (lda %d, ldb %d, ldc %d)\n", lda,
                     ldb, ldc);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    Gemm g{ta, tb, m, n, k, 0.0f, 0.0f, A, B, C, at, lda, bt, ldb, ct, ldc};
    std::memcpy(&g.al, alpha, 4);
    std::memcpy(&g.be, beta, 4);
    if (!operands_ok(g)) return CUBLAS_STATUS_INVALID_VALUE;
    void* stream = ((Handle*)h)->stream;
    if (cuemu_capture_status(stream)) {
        // Stream capture: recorded (its scalars by value), run at each graph launch.
        Gemm* rec = new Gemm(g);
        if (cuemu_record_callback(stream, "cublasGemmEx", replay, rec, free_gemm) != 0) {
            std::fprintf(stderr, "cuda-emu cublasGemmEx: the stream's capture was invalidated\n");
            return CUBLAS_STATUS_EXECUTION_FAILED;
        }
        return CUBLAS_STATUS_SUCCESS;
    }
    run(g);
    return CUBLAS_STATUS_SUCCESS;
}

#define BLAS_UNSUPPORTED(name)                                                      \
    int name() {                                                                    \
        std::fprintf(stderr, "cuda-emu: %s is not emulated (CUBLAS_STATUS_NOT_SUPPORTED)\n", #name); \
        return CUBLAS_STATUS_NOT_SUPPORTED;                                         \
    }
BLAS_UNSUPPORTED(cublasSgemm_v2)
BLAS_UNSUPPORTED(cublasDgemm_v2)
BLAS_UNSUPPORTED(cublasHgemm)
BLAS_UNSUPPORTED(cublasGemmStridedBatchedEx)
BLAS_UNSUPPORTED(cublasSgemmStridedBatched)
BLAS_UNSUPPORTED(cublasDgemmStridedBatched)
BLAS_UNSUPPORTED(cublasHgemmStridedBatched)
BLAS_UNSUPPORTED(cublasGemmBatchedEx)
BLAS_UNSUPPORTED(cublasSgemv_v2)
BLAS_UNSUPPORTED(cublasDgemv_v2)
BLAS_UNSUPPORTED(cublasSaxpy_v2)

}  // extern "C"
