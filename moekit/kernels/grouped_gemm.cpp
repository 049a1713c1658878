// Grouped GEMM of routed experts on the CPU: every expert's product in one parallel loop.
//
// A layer with many small experts multiplies each expert's few rows by its own small weight. A
// BLAS call per expert pays a fixed cost each time and threads each tiny product on its own; here
// the (expert, column block) pieces of all experts are shared by the OpenMP threads, and each
// piece runs a register-blocked 6 x 16 AVX2 kernel over packed operands (bf16 widened to fp32
// while packing, so bf16 runs at the fp32 rate; accumulation in fp32, one rounding at the end).
// Every output element is one fp32 multiply-add chain over its depth in order, so the result does
// not depend on the thread count, on how rows are grouped, or on which other rows are in the call.
//
//   mk_grouped_gemm  C = A . B per group, the groups splitting either the rows of A and C (mode 0,
//                    B one matrix per group: the experts' forward and input gradient) or the
//                    depth (mode 1, C one matrix per group: the weight gradient); torch._grouped_mm's
//                    2-D x 3-D and 2-D x 2-D cases (moekit.kernels.cpu.grouped_mm).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "simd.h"

namespace {

using namespace mk;

constexpr int MR = 6;   // rows of the register tile
constexpr int NR = 16;  // columns of the register tile (two 8-float vectors)
constexpr int64_t kPackFloats = 65536;  // packed B block: 256 KB, L2-resident

#ifdef MK_AVX2
// 8 rows of 8 values (row r at src + r * ld) transposed: out[k] holds value k of every row.
template <typename T>
inline void load_transposed8(const T* const rows[8], int64_t at, __m256 out[8]) {
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = load8<T>(rows[i], at);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
        out[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        out[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

// dst[k * stride + i] = rows[i][k] for i < n, k < K, 8 x 8 blocks at a time. Each k's store writes
// 8 floats: with n < 8 its last 8 - n spill into the next k's slots (overwritten by it) and, after
// the last k, into 8 - n spare floats the caller provides.
template <typename T>
void store_transposed(const T* const rows[8], int n, int64_t K, float* dst, int64_t stride) {
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 cols[8];
        load_transposed8<T>(rows, k, cols);
        for (int kk = 0; kk < 8; ++kk) _mm256_storeu_ps(dst + (k + kk) * stride, cols[kk]);
    }
    for (; k < K; ++k)
        for (int i = 0; i < n; ++i) dst[k * stride + i] = load1<T>(rows[i], k);
}
#endif

// A strided matrix view: element (i, j) at base + i * si + j * sj (in elements of its dtype).
struct View {
    const void* base;
    int64_t si, sj;
    int bf16;
};

// Rows [m0, m1) of A packed in panels of MR: ap[(p * K + k) * MR + i] = A(m0 + p * MR + i, k0 + k)
// (zero past m1). Read along A's contiguous dim: k inner when A's rows are contiguous, rows inner
// when its columns are (the weight gradient's transposed rows).
template <typename T>
void pack_a_typed(const T* a, int64_t si, int64_t sj, int64_t m0, int64_t m1, int64_t k0, int64_t K, float* ap) {
    const int64_t panels = (m1 - m0 + MR - 1) / MR;
    std::fill(ap + (m1 - m0) / MR * K * MR, ap + panels * K * MR, 0.0f);  // the last panel's missing rows
    if (si == 1) {  // each k: a column of A, contiguous, cut into the panels' MR-row pieces
        const int64_t full = (m1 - m0) / MR;
        for (int64_t k = 0; k < K; ++k) {
            const T* col = a + (k0 + k) * sj + m0;
            for (int64_t p = 0; p < full; ++p) {
                float* dst = ap + (p * K + k) * MR;
                for (int i = 0; i < MR; ++i) dst[i] = load1<T>(col, p * MR + i);
            }
            for (int64_t m = full * MR; m < m1 - m0; ++m) ap[(full * K + k) * MR + m - full * MR] = load1<T>(col, m);
        }
        return;
    }
    int64_t m = 0;
#ifdef MK_AVX2
    if (sj == 1)  // full panels: 8 x 8 transposes of 6 rows (and 2 repeats; ap has 8 spare floats)
        for (; m + MR <= m1 - m0; m += MR) {
            const T* rows[8];
            for (int i = 0; i < 8; ++i) rows[i] = a + (m0 + m + (i < MR ? i : 0)) * si + k0;
            store_transposed<T>(rows, MR, K, ap + (m / MR) * K * MR, MR);
        }
#endif
    for (; m < m1 - m0; ++m) {
        const T* row = a + (m0 + m) * si + k0 * sj;
        float* dst = ap + (m / MR) * K * MR + m % MR;
        for (int64_t k = 0; k < K; ++k) dst[k * MR] = load1<T>(row, k * sj);
    }
}

void pack_a(const View& a, int64_t m0, int64_t m1, int64_t k0, int64_t K, float* ap) {
    if (a.bf16) pack_a_typed(static_cast<const uint16_t*>(a.base), a.si, a.sj, m0, m1, k0, K, ap);
    else pack_a_typed(static_cast<const float*>(a.base), a.si, a.sj, m0, m1, k0, K, ap);
}

#ifdef MK_AVX2
// dst[k * NR + i] = column i of B for i < 8, the 8 columns contiguous along k, ld apart.
template <typename T>
void pack_columns8(const T* col0, int64_t ld, int64_t K, float* dst) {
    const T* rows[8];
    for (int i = 0; i < 8; ++i) rows[i] = col0 + i * ld;
    store_transposed<T>(rows, 8, K, dst, NR);
}
#endif

// bp[(p * K + k) * NR + j] = B(k0 + k, n0 + p * NR + j) for columns < cols (zero beyond).
void pack_b(const View& b, int64_t k0, int64_t K, int64_t n0, int64_t cols, float* bp) {
    const int64_t panels = (cols + NR - 1) / NR;
    for (int64_t p = 0; p < panels; ++p) {
        float* dst = bp + p * K * NR;
        const int64_t width = cols - p * NR < NR ? cols - p * NR : NR;
        if (b.sj == 1 && width == NR && !b.bf16) {  // rows of B contiguous: copy 16 floats per k
            const float* src = static_cast<const float*>(b.base) + k0 * b.si + n0 + p * NR;
            for (int64_t k = 0; k < K; ++k) std::memcpy(dst + k * NR, src + k * b.si, NR * sizeof(float));
            continue;
        }
        int64_t j = 0;
#ifdef MK_AVX2
        if (b.si == 1)  // columns of B contiguous (weights stored (out, in)): 8 x 8 transposes
            for (; j + 8 <= width; j += 8) {
                const int64_t at = k0 + (n0 + p * NR + j) * b.sj;
                if (b.bf16) pack_columns8(static_cast<const uint16_t*>(b.base) + at, b.sj, K, dst + j);
                else pack_columns8(static_cast<const float*>(b.base) + at, b.sj, K, dst + j);
            }
#endif
        for (; j < NR; ++j) {  // each column of B read along its own stride
            if (j >= width) {
                for (int64_t k = 0; k < K; ++k) dst[k * NR + j] = 0.0f;
                continue;
            }
            const int64_t at = k0 * b.si + (n0 + p * NR + j) * b.sj;
            if (b.bf16) {
                const uint16_t* src = static_cast<const uint16_t*>(b.base) + at;
                for (int64_t k = 0; k < K; ++k) dst[k * NR + j] = load1<uint16_t>(src, k * b.si);
            } else {
                const float* src = static_cast<const float*>(b.base) + at;
                for (int64_t k = 0; k < K; ++k) dst[k * NR + j] = src[k * b.si];
            }
        }
    }
}

// acc = sum over k of ap[k] (x) bp[k] for a rows x 16 tile, plus C's fp32 values when `add` (the
// partial sum of the earlier depth blocks); written to C rows m0.., columns n0.. (cols of them),
// rounded to bf16 or stored as fp32.
// A is the packed panel (lda 0: ap[k * MR + i]) or, fp32 rows in place, ap[i * lda + k].
template <int ROWS, bool DIRECT>
void tile(const float* ap, int64_t lda, const float* bp, int64_t K, void* c, int64_t ldc, int64_t m0, int64_t n0,
          int cols, int out_bf16, int add) {
    float acc[ROWS][NR];
#ifdef MK_AVX2
    __m256 c0[ROWS], c1[ROWS];
    for (int i = 0; i < ROWS; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        const __m256 b0 = _mm256_loadu_ps(bp + k * NR), b1 = _mm256_loadu_ps(bp + k * NR + 8);
        for (int i = 0; i < ROWS; ++i) {
            const __m256 a = _mm256_broadcast_ss(DIRECT ? ap + i * lda + k : ap + k * MR + i);
            c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
        }
    }
    if (!out_bf16 && cols == NR) {  // a full fp32 tile: straight from the registers into C
        for (int i = 0; i < ROWS; ++i) {
            float* row = static_cast<float*>(c) + (m0 + i) * ldc + n0;
            if (add) {
                c0[i] = _mm256_add_ps(c0[i], _mm256_loadu_ps(row));
                c1[i] = _mm256_add_ps(c1[i], _mm256_loadu_ps(row + 8));
            }
            _mm256_storeu_ps(row, c0[i]);
            _mm256_storeu_ps(row + 8, c1[i]);
        }
        return;
    }
    for (int i = 0; i < ROWS; ++i) {
        _mm256_storeu_ps(acc[i], c0[i]);
        _mm256_storeu_ps(acc[i] + 8, c1[i]);
    }
#else
    for (int i = 0; i < ROWS; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = 0.0f;
    for (int64_t k = 0; k < K; ++k)
        for (int i = 0; i < ROWS; ++i)
            for (int j = 0; j < NR; ++j) acc[i][j] = __builtin_fmaf(DIRECT ? ap[i * lda + k] : ap[k * MR + i], bp[k * NR + j], acc[i][j]);
#endif
    if (add)
        for (int i = 0; i < ROWS; ++i) {
            const float* row = static_cast<const float*>(c) + (m0 + i) * ldc + n0;
            for (int j = 0; j < cols; ++j) acc[i][j] += row[j];
        }
    for (int i = 0; i < ROWS; ++i) {
        if (out_bf16) {
            uint16_t* row = static_cast<uint16_t*>(c) + (m0 + i) * ldc + n0;
            for (int j = 0; j < cols; ++j) row[j] = f32_to_bf16(acc[i][j]);
        } else {
            float* row = static_cast<float*>(c) + (m0 + i) * ldc + n0;
            std::memcpy(row, acc[i], cols * sizeof(float));
        }
    }
}

template <bool DIRECT>
void run_tile(int rows, const float* ap, int64_t lda, const float* bp, int64_t K, void* c, int64_t ldc, int64_t m0,
              int64_t n0, int cols, int out_bf16, int add) {
    switch (rows) {
        case 1: tile<1, DIRECT>(ap, lda, bp, K, c, ldc, m0, n0, cols, out_bf16, add); break;
        case 2: tile<2, DIRECT>(ap, lda, bp, K, c, ldc, m0, n0, cols, out_bf16, add); break;
        case 3: tile<3, DIRECT>(ap, lda, bp, K, c, ldc, m0, n0, cols, out_bf16, add); break;
        case 4: tile<4, DIRECT>(ap, lda, bp, K, c, ldc, m0, n0, cols, out_bf16, add); break;
        case 5: tile<5, DIRECT>(ap, lda, bp, K, c, ldc, m0, n0, cols, out_bf16, add); break;
        default: tile<6, DIRECT>(ap, lda, bp, K, c, ldc, m0, n0, cols, out_bf16, add); break;
    }
}

// The packed path of one piece: rows [m0, m1) of A and C, depth [k0, k0 + depth), columns
// [n0, n0 + cols) of B and C. Depth in blocks of KC (B's block L2-resident, A's in blocks of MC
// rows); a piece deeper than KC sums its blocks in fp32 in `scratch` (bf16 out) or in C itself.
constexpr int64_t KC = 256, MC = 96;

void packed_piece(const View& av, const View& bv, int64_t m0, int64_t m1, int64_t k0, int64_t depth, int64_t n0,
                  int64_t cols, void* c, int64_t ldc, int out_bf16, std::vector<float>& ap, std::vector<float>& bp,
                  std::vector<float>& scratch) {
    const bool blocks = depth > KC;
    // Where the sums go: C, or (bf16 out over several depth blocks) an fp32 scratch of the piece.
    void* dst = c;
    int64_t ld = ldc, row0 = 0, col0 = 0;
    int dst_bf16 = out_bf16;
    if (blocks && out_bf16) {
        scratch.resize((m1 - m0) * cols);
        dst = scratch.data(), ld = cols, row0 = m0, col0 = n0, dst_bf16 = 0;
    }
    bp.resize(((cols + NR - 1) / NR) * NR * (blocks ? KC : depth));
    ap.resize(((MC + MR - 1) / MR) * MR * (blocks ? KC : depth) + 8);  // 8 spare: pack_a's stores
    for (int64_t kb = k0; kb < k0 + depth; kb += KC) {
        const int64_t kd = k0 + depth - kb < KC ? k0 + depth - kb : KC;
        const int add = kb > k0;
        pack_b(bv, kb, kd, n0, cols, bp.data());
        for (int64_t mb = m0; mb < m1; mb += MC) {
            const int64_t me = mb + MC < m1 ? mb + MC : m1;
            // fp32 rows of A contiguous along the depth are read in place (6 sequential streams).
            const bool direct = !av.bf16 && av.sj == 1;
            if (!direct) pack_a(av, mb, me, kb, kd, ap.data());
            for (int64_t m = mb; m < me; m += MR) {
                const int rows = me - m < MR ? static_cast<int>(me - m) : MR;
                for (int64_t p = 0; p * NR < cols; ++p) {
                    const int width = cols - p * NR < NR ? static_cast<int>(cols - p * NR) : NR;
                    const float* bpanel = bp.data() + p * kd * NR;
                    if (direct)
                        run_tile<true>(rows, static_cast<const float*>(av.base) + m * av.si + kb, av.si, bpanel, kd,
                                       dst, ld, m - row0, n0 + p * NR - col0, width, dst_bf16, add);
                    else
                        run_tile<false>(rows, ap.data() + ((m - mb) / MR) * kd * MR, 0, bpanel, kd, dst, ld, m - row0,
                                        n0 + p * NR - col0, width, dst_bf16, add);
                }
            }
        }
    }
    if (dst != c)
        for (int64_t m = m0; m < m1; ++m)
            for (int64_t j = 0; j < cols; ++j)
                static_cast<uint16_t*>(c)[m * ldc + n0 + j] = f32_to_bf16(scratch[(m - m0) * cols + j]);
}

// Few rows times weights stored (out, in): C(m, j) = dot(A row m, B column j), both contiguous
// along the depth, read in place (packing would cost more than the few rows' arithmetic).
// Register tile of DR rows x DC columns, 8-wide partial sums reduced at the end.
constexpr int64_t kDotMaxRows = 16;
constexpr int DR = 3, DC = 4;

template <typename T, int R, int C>
void dot_tile(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t K, float out[DR][DC]) {
    int64_t k = 0;
#ifdef MK_AVX2
    __m256 acc[R][C];
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < C; ++j) acc[i][j] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        __m256 bv[C];
        for (int j = 0; j < C; ++j) bv[j] = load8<T>(b + j * ldb, k);
        for (int i = 0; i < R; ++i) {
            const __m256 av = load8<T>(a + i * lda, k);
            for (int j = 0; j < C; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < C; ++j) out[i][j] = hsum(acc[i][j]);
#else
    for (int i = 0; i < R; ++i)
        for (int j = 0; j < C; ++j) out[i][j] = 0.0f;
#endif
    for (; k < K; ++k)
        for (int i = 0; i < R; ++i)
            for (int j = 0; j < C; ++j) out[i][j] += load1<T>(a + i * lda, k) * load1<T>(b + j * ldb, k);
}

template <typename T, int R>
void dot_tile_rows(int cols, const T* a, int64_t lda, const T* b, int64_t ldb, int64_t K, float out[DR][DC]) {
    switch (cols) {
        case 1: dot_tile<T, R, 1>(a, lda, b, ldb, K, out); break;
        case 2: dot_tile<T, R, 2>(a, lda, b, ldb, K, out); break;
        case 3: dot_tile<T, R, 3>(a, lda, b, ldb, K, out); break;
        default: dot_tile<T, R, 4>(a, lda, b, ldb, K, out); break;
    }
}

// Rows [m0, m1) of A (rows lda apart) times columns [n0, n0 + cols) of B (columns ldb apart).
template <typename T>
void dot_piece(const void* a_, int64_t lda, int64_t m0, int64_t m1, const void* b_, int64_t ldb, int64_t n0,
               int64_t cols, int64_t K, void* c, int64_t ldc, int out_bf16) {
    const T* a = static_cast<const T*>(a_);
    const T* b = static_cast<const T*>(b_);
    float out[DR][DC];
    for (int64_t j = n0; j < n0 + cols; j += DC) {
        const int nc = n0 + cols - j < DC ? static_cast<int>(n0 + cols - j) : DC;
        for (int64_t m = m0; m < m1; m += DR) {
            const int nr = m1 - m < DR ? static_cast<int>(m1 - m) : DR;
            const T* ar = a + m * lda;
            const T* bc = b + j * ldb;
            if (nr == 1) dot_tile_rows<T, 1>(nc, ar, lda, bc, ldb, K, out);
            else if (nr == 2) dot_tile_rows<T, 2>(nc, ar, lda, bc, ldb, K, out);
            else dot_tile_rows<T, 3>(nc, ar, lda, bc, ldb, K, out);
            for (int i = 0; i < nr; ++i)
                for (int jj = 0; jj < nc; ++jj) {
                    const int64_t at = (m + i) * ldc + j + jj;
                    if (out_bf16) static_cast<uint16_t*>(c)[at] = f32_to_bf16(out[i][jj]);
                    else static_cast<float*>(c)[at] = out[i][jj];
                }
        }
    }
}

void zero_rows(void* c, int64_t ldc, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int out_bf16) {
    const size_t size = out_bf16 ? 2 : 4;
    for (int64_t m = m0; m < m1; ++m)
        std::memset(static_cast<char*>(c) + (m * ldc + n0) * size, 0, (n1 - n0) * size);
}

}  // namespace

extern "C" {

// C = A . B for E groups; offs (int32, E): cumulative ends of the groups along the grouped dim.
//   mode 0: group e is rows [offs[e-1], offs[e]) of A (M rows, K deep) and of C (ldc apart), times
//           B_e = b + e * sbe (K x N); rows past offs[E-1] are left as they are.
//   mode 1: group e is depth [offs[e-1], offs[e]) of A (M x K) and B (K x N); C_e = c + e * sce
//           (M x N, rows ldc apart), zero for an empty group.
// A(i, k) at a + i * sam + k * sak, B(k, j) at b (+ e * sbe) + k * sbk + j * sbn; a and b in one
// dtype (in_bf16), c fp32 or bf16 (out_bf16). Returns 0, or -1 when offs is not non-decreasing
// within [0, rows of the grouped dim] (nothing written).
int mk_grouped_gemm(const void* a, int64_t sam, int64_t sak, const void* b, int64_t sbe, int64_t sbk,
                    int64_t sbn, void* c, int64_t sce, int64_t ldc, int64_t M, int64_t N, int64_t K, int64_t E,
                    const int32_t* offs, int mode, int in_bf16, int out_bf16, int nthreads) {
    const int64_t grouped = mode == 0 ? M : K;
    for (int64_t e = 0, prev = 0; e < E; prev = offs[e], ++e)
        if (offs[e] < prev || offs[e] > grouped) return -1;
    auto lo = [&](int64_t e) { return e == 0 ? int64_t{0} : static_cast<int64_t>(offs[e - 1]); };
    // Column blocks: B's packed block (KC deep) stays in L2.
    const int64_t nc = kPackFloats / KC;
    const int64_t nblocks = (N + nc - 1) / nc;
    const size_t in_size = in_bf16 ? 2 : 4, out_size = out_bf16 ? 2 : 4;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> bp, ap, scratch;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < E * nblocks; ++item) {
            const int64_t e = item / nblocks, n0 = (item % nblocks) * nc;
            const int64_t cols = N - n0 < nc ? N - n0 : nc;
            const int64_t g0 = lo(e), g1 = offs[e];
            // The piece: rows [m0, m1) of A and C_e, depth [k0, k0 + depth), B_e.
            int64_t m0 = 0, m1 = M, k0 = 0, depth = K;
            const char* bb = static_cast<const char*>(b);
            char* cc = static_cast<char*>(c);
            if (mode == 0) {
                m0 = g0, m1 = g1;
                bb += e * sbe * in_size;
            } else {
                k0 = g0, depth = g1 - g0;
                cc += e * sce * out_size;
            }
            if (m1 <= m0) continue;
            if (depth == 0) {
                zero_rows(cc, ldc, m0, m1, n0, n0 + cols, out_bf16);
                continue;
            }
            const View av{a, sam, sak, in_bf16}, bv{bb, sbk, sbn, in_bf16};
            if (mode == 0 && sbk == 1 && sak == 1 && m1 - m0 <= kDotMaxRows) {  // few rows: no packing
                if (in_bf16)
                    dot_piece<uint16_t>(a, sam, m0, m1, bb, sbn, n0, cols, depth, cc, ldc, out_bf16);
                else
                    dot_piece<float>(a, sam, m0, m1, bb, sbn, n0, cols, depth, cc, ldc, out_bf16);
                continue;
            }
            packed_piece(av, bv, m0, m1, k0, depth, n0, cols, cc, ldc, out_bf16, ap, bp, scratch);
        }
    }
    return 0;
}

}  // extern "C"
