// Products of a few rows with weights stored (out, in) row-major, streamed once at memory speed.
//
// A decode step multiplies one to a few rows by each weight it touches: the work is reading the
// weight, and a GEMM library's packing and blocking are overhead there. These kernels read each
// weight row once, keep the few input rows in L1, and split the output rows over OpenMP threads
// (the libgomp torch already loaded). Weights are fp32 or bf16 (widened in registers, so a bf16
// weight costs half the bytes); inputs come in the weights' dtype and are widened once;
// accumulation is in fp32.
//
//   mk_linear_rows  y_j[R, N_j] = x[R, K] . w_j[N_j, K]^T (+ b_j) for J weights sharing x
//   mk_expert_rows  o[T, K, D] = expert_{id[t, k]}(x[t]) for every routed slot, for gated
//                   (act(x Wg^T + bg) * (x Wu^T + bu)) Wd^T + bd and plain act(x Wi^T + bi) Wo^T + bo
//                   experts (the caller applies the routing weights)
//   mk_rmsnorm      RMSNorm of a few rows (moekit.model.norm.RMSNorm, cast_to="input")
//   mk_rope         rotary embedding of a few positions (moekit.model.rope.apply_rope)
//   mk_attend_one   one query per head over the KV cache (moekit.model.attention.attend_one)
//   mk_topk_route   token-choice top-k routing of a few tokens (moekit.routing.topk.topk_route)
//
// Compiled at first use by moekit/kernels/cpu.py (g++ -O3 -march=native -fopenmp -ffp-contract=off:
// no fused multiply-add beyond the explicit ones, so the combine rounds as torch's does); every entry
// point has a pure-torch equivalent there and a test that the two agree.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "simd.h"

namespace {

using namespace mk;

enum WeightType { W_F32 = 0, W_BF16 = 1 };
enum Act { A_SWIGLU = 0, A_GEGLU = 1, A_CLAMPED_SWIGLU = 2, A_GELU = 3, A_RELU = 4, A_SILU = 5 };

// out[r] = dot(w, x row r) for NR input rows (ldx apart). One weight row is one sequential stream
// (several rows at once, 2 KB apart, defeat the hardware prefetcher: 7.6 against 11.4 GB/s
// measured); U-way unrolling over k keeps 8 independent FMA chains whatever NR is.
template <int NR, typename WT>
inline void dots(const WT* w, const float* x, int64_t ldx, int64_t K, float* out) {
    int64_t k = 0;
#ifdef MK_AVX2
    constexpr int U = NR >= 8 ? 1 : 8 / NR;
    __m256 acc[U][NR];
    for (int u = 0; u < U; ++u)
        for (int r = 0; r < NR; ++r) acc[u][r] = _mm256_setzero_ps();
    for (; k + 8 * U <= K; k += 8 * U)
        for (int u = 0; u < U; ++u) {
            __m256 wv = load8<WT>(w, k + 8 * u);
            for (int r = 0; r < NR; ++r)
                acc[u][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * ldx + k + 8 * u), acc[u][r]);
        }
    for (; k + 8 <= K; k += 8) {
        __m256 wv = load8<WT>(w, k);
        for (int r = 0; r < NR; ++r) acc[0][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * ldx + k), acc[0][r]);
    }
    for (int r = 0; r < NR; ++r) {
        __m256 s = acc[0][r];
        for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][r]);
        out[r] = hsum(s);
    }
#else
    for (int r = 0; r < NR; ++r) out[r] = 0.0f;
#endif
    for (; k < K; ++k) {
        const float wv = load1<WT>(w, k);
        for (int r = 0; r < NR; ++r) out[r] += wv * x[r * ldx + k];
    }
}

// res[j * R + r] for weight rows [n0, n1) and all R input rows: each weight row is read once from
// memory and reused from cache for every group of up to 4 input rows.
template <typename WT>
void block_dots(const WT* w, int64_t ldw, int64_t n0, int64_t n1, const float* x, int64_t ldx,
                int64_t R, int64_t K, float* res) {
    for (int64_t n = n0; n < n1; ++n) {
        const WT* row = w + n * ldw;
        for (int64_t r = 0; r < R; r += 4) {
            float* o = res + (n - n0) * R + r;
            const float* xr = x + r * ldx;
            switch (R - r >= 4 ? 4 : R - r) {
                case 1: dots<1, WT>(row, xr, ldx, K, o); break;
                case 2: dots<2, WT>(row, xr, ldx, K, o); break;
                case 3: dots<3, WT>(row, xr, ldx, K, o); break;
                default: dots<4, WT>(row, xr, ldx, K, o); break;
            }
        }
    }
}

// Output rows per work item: a few KB of weight, enough items for every thread.
constexpr int64_t kBlock = 16;

// x (R, K) in the weights' dtype, widened once to fp32.
template <typename WT>
std::vector<float> widen(const WT* x, int64_t n) {
    std::vector<float> out(n);
    for (int64_t i = 0; i < n; ++i) out[i] = load1<WT>(x, i);
    return out;
}

// J products of the same rows: y_j[R, N_j] = x[R, K] . w_j[N_j, K]^T + b_j, in the weights' dtype
// (fp32 accumulation, one rounding), all (projection, block) items shared by the threads.
template <typename WT>
void linear_rows(const WT* x_in, int64_t R, int64_t K, int64_t J, const int64_t* w, const int64_t* N,
                 const int64_t* ldw, const int64_t* bias, const int64_t* y, int nthreads) {
    const std::vector<float> x = widen<WT>(x_in, R * K);
    std::vector<int64_t> first(J + 1, 0);  // first block of each projection
    for (int64_t j = 0; j < J; ++j) first[j + 1] = first[j] + (N[j] + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> res(kBlock * R);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < first[J]; ++item) {
            int64_t j = 0;
            while (item >= first[j + 1]) ++j;
            const int64_t n0 = (item - first[j]) * kBlock, n1 = n0 + kBlock < N[j] ? n0 + kBlock : N[j];
            const WT* b = reinterpret_cast<const WT*>(bias[j]);
            WT* out = reinterpret_cast<WT*>(y[j]);
            block_dots<WT>(reinterpret_cast<const WT*>(w[j]), ldw[j], n0, n1, x.data(), K, R, K, res.data());
            for (int64_t r = 0; r < R; ++r)
                for (int64_t n = n0; n < n1; ++n) {
                    const float v = res[(n - n0) * R + r] + (b ? load1<WT>(b, n) : 0.0f);
                    if constexpr (sizeof(WT) == 2) out[r * N[j] + n] = f32_to_bf16(v);
                    else out[r * N[j] + n] = v;
                }
        }
    }
}

inline float gelu_tanh(float v) {
    const float c = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * v * (1.0f + std::tanh(c * (v + 0.044715f * v * v * v)));
}
inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

inline float activate(int act, float g, float u) {
    switch (act) {
        case A_SWIGLU: return g * sigmoid(g) * u;
        case A_GEGLU: return gelu_tanh(g) * u;
        case A_CLAMPED_SWIGLU: {  // gpt-oss (moekit/experts/activations.py)
            g = g < 7.0f ? g : 7.0f;
            u = u < -7.0f ? -7.0f : (u > 7.0f ? 7.0f : u);
            return (u + 1.0f) * (g * sigmoid(1.702f * g));
        }
        case A_GELU: return 0.5f * g * (1.0f + std::erf(g * 0.7071067811865476f));
        case A_RELU: return g > 0.0f ? g : 0.0f;
        default: return g * sigmoid(g);  // A_SILU
    }
}

// One projection of every expert: the weight of expert e at w[e] (stored (out, in), rows ld apart;
// null for an expert with no rows) and its bias at b[e] (null: none), both in the weight dtype.
struct Projection {
    const int64_t* w;
    const int64_t* b;
    int64_t ld;
    template <typename WT> const WT* weight(int64_t e) const { return reinterpret_cast<const WT*>(w[e]); }
    template <typename WT> float bias(int64_t e, int64_t i) const {
        return b && b[e] ? load1<WT>(reinterpret_cast<const WT*>(b[e]), i) : 0.0f;
    }
};

template <typename WT>
void expert_rows(const WT* x, int64_t T, int64_t D, int64_t F, int64_t K, int64_t E, const int64_t* ids,
                 int64_t only, const Projection& p0, const Projection* p1, const Projection& p2, int act,
                 float* o, int nthreads) {
    // Slots grouped by expert (only expert `only` when it is >= 0).
    auto wanted = [&](int64_t e) { return e >= 0 && e < E && (only < 0 || e == only); };
    std::vector<int64_t> count(E + 1, 0);
    for (int64_t s = 0; s < T * K; ++s)
        if (wanted(ids[s])) ++count[ids[s] + 1];
    for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
    const int64_t S = count[E];
    std::vector<int64_t> slot(S), fill(count.begin(), count.end() - 1);
    for (int64_t s = 0; s < T * K; ++s)
        if (wanted(ids[s])) slot[fill[ids[s]]++] = s;
    std::vector<int64_t> used;  // experts with rows
    for (int64_t e = 0; e < E; ++e)
        if (count[e + 1] > count[e]) used.push_back(e);
    const int64_t U = static_cast<int64_t>(used.size());
    // Each slot's input row gathered: rows of one expert contiguous (xs[S, D]).
    std::vector<float> xs(S * D);
    for (int64_t i = 0; i < S; ++i)
        for (int64_t d = 0; d < D; ++d) xs[i * D + d] = load1<WT>(x, (slot[i] / K) * D + d);
    const int64_t fblocks = (F + kBlock - 1) / kBlock, dblocks = (D + kBlock - 1) / kBlock;
    std::vector<float> h(S * F);
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> r0, r1;
        // Phase 1: h[slot, f] = act(x Wg^T + bg, x Wu^T + bu) over (expert, F block) items.
#pragma omp for schedule(static)
        for (int64_t item = 0; item < U * fblocks; ++item) {
            const int64_t e = used[item / fblocks], f0 = (item % fblocks) * kBlock;
            const int64_t f1 = f0 + kBlock < F ? f0 + kBlock : F;
            const int64_t lo = count[e], R = count[e + 1] - lo;
            r0.resize(kBlock * R);
            r1.resize(kBlock * R);
            block_dots<WT>(p0.weight<WT>(e), p0.ld, f0, f1, &xs[lo * D], D, R, D, r0.data());
            if (p1) block_dots<WT>(p1->weight<WT>(e), p1->ld, f0, f1, &xs[lo * D], D, R, D, r1.data());
            for (int64_t r = 0; r < R; ++r)
                for (int64_t f = f0; f < f1; ++f) {
                    const float g = r0[(f - f0) * R + r] + p0.bias<WT>(e, f);
                    const float u = p1 ? r1[(f - f0) * R + r] + p1->bias<WT>(e, f) : 1.0f;
                    h[(lo + r) * F + f] = activate(act, g, u);
                }
        }
        // Phase 2: o[slot, d] = h Wd^T + bd over (expert, D block) items.
#pragma omp for schedule(static)
        for (int64_t item = 0; item < U * dblocks; ++item) {
            const int64_t e = used[item / dblocks], d0 = (item % dblocks) * kBlock;
            const int64_t d1 = d0 + kBlock < D ? d0 + kBlock : D;
            const int64_t lo = count[e], R = count[e + 1] - lo;
            r0.resize(kBlock * R);
            block_dots<WT>(p2.weight<WT>(e), p2.ld, d0, d1, &h[lo * F], F, R, F, r0.data());
            for (int64_t r = 0; r < R; ++r) {
                float* os = o + slot[lo + r] * D;
                for (int64_t d = d0; d < d1; ++d) os[d] = r0[(d - d0) * R + r] + p2.bias<WT>(e, d);
            }
        }
    }
}

// RMSNorm of R rows: y = w * round(x / sqrt(mean(x^2) + eps)) (the round to the dtype first, as
// transformers' Llama-style norm casts back to the input dtype before the weight), fp32 maths.
template <typename WT>
void rmsnorm(const WT* x, int64_t R, int64_t D, const WT* w, float eps, WT* y) {
    for (int64_t r = 0; r < R; ++r) {
        const WT* xr = x + r * D;
        float ss = 0.0f;
        for (int64_t d = 0; d < D; ++d) {
            const float v = load1<WT>(xr, d);
            ss += v * v;
        }
        const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
        for (int64_t d = 0; d < D; ++d) {
            const float n = load1<WT>(xr, d) * inv;
            if constexpr (sizeof(WT) == 2)
                y[r * D + d] = f32_to_bf16(load1<WT>(w, d) * bf16_to_f32(f32_to_bf16(n)));
            else
                y[r * D + d] = load1<WT>(w, d) * n;
        }
    }
}

// RoPE on x[b, h, s, :] (strides sb, sh, ss; unit stride inside a head), cos/sin (S, R), or
// (B, S, R) when each row has its own positions (cb = S * R, else 0): the first 2R dims rotate,
// the rest pass through;
// half layout pairs j with j + R, interleaved pairs 2j with 2j + 1 and writes the rotated evens
// then odds (moekit.model.rope.apply_rope). y is contiguous (B, H, S, d).
template <typename WT>
void rope(const WT* x, int64_t B, int64_t H, int64_t S, int64_t d, int64_t sb, int64_t sh, int64_t ss,
          const WT* cos, const WT* sin, int64_t cb, int64_t R, int interleaved, WT* y) {
    auto store = [](WT* out, float v) {
        if constexpr (sizeof(WT) == 2) *out = f32_to_bf16(v);
        else *out = v;
    };
    auto round = [](float v) {  // each product rounded to the dtype, as torch's elementwise ops do
        if constexpr (sizeof(WT) == 2) return bf16_to_f32(f32_to_bf16(v));
        else return v;
    };
    for (int64_t n = 0; n < B * H; ++n)
        for (int64_t s = 0; s < S; ++s) {
            const WT* xr = x + (n / H) * sb + (n % H) * sh + s * ss;
            WT* yr = y + (n * S + s) * d;
            for (int64_t j = 0; j < R; ++j) {
                const float x1 = load1<WT>(xr, interleaved ? 2 * j : j);
                const float x2 = load1<WT>(xr, interleaved ? 2 * j + 1 : j + R);
                const int64_t at = (n / H) * cb + s * R + j;
                const float c = load1<WT>(cos, at), sn_ = load1<WT>(sin, at);
                store(yr + j, round(x1 * c) - round(x2 * sn_));
                store(yr + j + R, round(x2 * c) + round(x1 * sn_));
            }
            for (int64_t j = 2 * R; j < d; ++j) yr[j] = xr[j];
        }
}

// One query per head against T cached keys (GQA: head h reads kv head h / (H / KV)), in fp32:
// out[h] = softmax(q[h] . k[kv, t] * scale + mask[t]) . v[kv, t] (moekit.model.attention.attend_one).
// k/v: kv head at + kv * skh, position t at + t * skt (unit stride inside a head).
template <typename WT>
void attend_one(const WT* q, int64_t B, int64_t H, int64_t KV, int64_t T, int64_t d, int64_t e, const WT* k,
                int64_t skb, int64_t skh, int64_t skt, const WT* v, int64_t svb, int64_t svh, int64_t svt,
                const float* mask, int64_t smb, float scale, WT* out, int nthreads) {
    const int64_t G = H / KV;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, h = bh % H, kv = h / G;
        const WT* kb = k + b * skb + kv * skh;
        const WT* vb = v + b * svb + kv * svh;
        const float* mb = mask + b * smb;
        std::vector<float> qf(d), p(T), acc(e, 0.0f);
        for (int64_t i = 0; i < d; ++i) qf[i] = load1<WT>(q, bh * d + i);
        float mx = -INFINITY;
        for (int64_t t = 0; t < T; ++t) {
            float dot;
            dots<1, WT>(kb + t * skt, qf.data(), 0, d, &dot);
            p[t] = dot * scale + mb[t];
            mx = p[t] > mx ? p[t] : mx;
        }
        float sum = 0.0f;
        for (int64_t t = 0; t < T; ++t) {
            p[t] = std::exp(p[t] - mx);
            sum += p[t];
        }
        for (int64_t t = 0; t < T; ++t) {
            const WT* vt = vb + t * svt;
            const float w = p[t] / sum;
            for (int64_t i = 0; i < e; ++i) acc[i] += w * load1<WT>(vt, i);
        }
        for (int64_t i = 0; i < e; ++i) {
            if constexpr (sizeof(WT) == 2) out[bh * e + i] = f32_to_bf16(acc[i]);
            else out[bh * e + i] = acc[i];
        }
    }
}

// Token-choice top-k routing of a few tokens (moekit.routing.topk.topk_route without expert
// groups): logits = x . gate^T + b in fp32; scores softmax or sigmoid; the top k of scores (+ the
// selection bias) with ties to the lower index; weights the chosen scores (renormalised) or a
// softmax over the chosen logits, times the scaling; probs the softmax, or the sigmoid scores
// normalised per token; counts the tokens per expert.
template <typename WT>
void topk_route(const WT* x, int64_t T, int64_t D, int64_t E, int64_t K, const WT* gate, const WT* gate_bias,
                int sigmoid_scores, int softmax_after_topk, int normalize, float scaling, const float* sel_bias,
                float* logits, float* probs, int64_t* ids, float* weights, int64_t* counts) {
    std::vector<float> xf(D), scores(E), select(E);
    std::vector<char> taken(E);
    for (int64_t e = 0; e < E; ++e) counts[e] = 0;
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t d = 0; d < D; ++d) xf[d] = load1<WT>(x, t * D + d);
        float* lt = logits + t * E;
        for (int64_t e = 0; e < E; ++e) {
            dots<1, WT>(gate + e * D, xf.data(), 0, D, &lt[e]);
            if (gate_bias) lt[e] += load1<WT>(gate_bias, e);
        }
        if (sigmoid_scores) {
            for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-lt[e]));
        } else {
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t e = 0; e < E; ++e) mx = lt[e] > mx ? lt[e] : mx;
            for (int64_t e = 0; e < E; ++e) sum += scores[e] = std::exp(lt[e] - mx);
            for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
        }
        for (int64_t e = 0; e < E; ++e) {
            select[e] = scores[e] + (sel_bias ? sel_bias[e] : 0.0f);
            taken[e] = 0;
        }
        int64_t* it = ids + t * K;
        float* wt = weights + t * K;
        for (int64_t k = 0; k < K; ++k) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; ++e)
                if (!taken[e] && (best < 0 || select[e] > select[best])) best = e;
            taken[best] = 1;
            it[k] = best;
            ++counts[best];
        }
        if (softmax_after_topk) {
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t k = 0; k < K; ++k) mx = lt[it[k]] > mx ? lt[it[k]] : mx;
            for (int64_t k = 0; k < K; ++k) sum += wt[k] = std::exp(lt[it[k]] - mx);
            for (int64_t k = 0; k < K; ++k) wt[k] /= sum;
        } else {
            float sum = 0.0f;
            for (int64_t k = 0; k < K; ++k) sum += wt[k] = scores[it[k]];
            if (normalize)
                for (int64_t k = 0; k < K; ++k) wt[k] /= (sum > 1e-20f ? sum : 1e-20f);
        }
        for (int64_t k = 0; k < K; ++k) wt[k] *= scaling;
        float total = 0.0f;
        if (sigmoid_scores)
            for (int64_t e = 0; e < E; ++e) total += scores[e];
        for (int64_t e = 0; e < E; ++e) probs[t * E + e] = sigmoid_scores ? scores[e] / total : scores[e];
    }
}

}  // namespace

extern "C" {

int mk_version() { return 1; }

int mk_avx2() {
#ifdef MK_AVX2
    return 1;
#else
    return 0;
#endif
}

// J projections of the same rows x (R, K); w, N, ldw, bias (0: none), y: J entries each; x, the
// weights, biases and outputs all in the dtype `wtype`.
void mk_linear_rows(const void* x, int64_t R, int64_t K, int64_t J, const int64_t* w, const int64_t* N,
                    const int64_t* ldw, const int64_t* bias, const int64_t* y, int wtype, int nthreads) {
    if (wtype == W_BF16)
        linear_rows<uint16_t>(static_cast<const uint16_t*>(x), R, K, J, w, N, ldw, bias, y, nthreads);
    else
        linear_rows<float>(static_cast<const float*>(x), R, K, J, w, N, ldw, bias, y, nthreads);
}

// o[t, k] (fp32) = expert ids[t, k] applied to x[t] (x in the weights' dtype), for every slot whose expert is >= 0 (and is `only`,
// when only >= 0); other slots are left as they are. ptrs: (3, E) weight addresses of projections
// 0 (gate/in), 1 (up; unused for plain experts) and 2 (down/out), 0 for experts without rows;
// bias_ptrs: (3, E) or null; lds: the three row strides.
void mk_expert_rows(const void* x, int64_t T, int64_t D, int64_t F, int64_t K, int64_t E, const int64_t* ids,
                    int64_t only, const int64_t* ptrs, const int64_t* bias_ptrs, const int64_t* lds, int gated,
                    int wtype, int act, float* o, int nthreads) {
    const int64_t* b = bias_ptrs;
    Projection p0{ptrs, b, lds[0]}, p1{ptrs + E, b ? b + E : nullptr, lds[1]};
    Projection p2{ptrs + 2 * E, b ? b + 2 * E : nullptr, lds[2]};
    const Projection* up = gated ? &p1 : nullptr;
    if (wtype == W_BF16)
        expert_rows<uint16_t>(static_cast<const uint16_t*>(x), T, D, F, K, E, ids, only, p0, up, p2, act, o,
                              nthreads);
    else
        expert_rows<float>(static_cast<const float*>(x), T, D, F, K, E, ids, only, p0, up, p2, act, o, nthreads);
}

void mk_rmsnorm(const void* x, int64_t R, int64_t D, const void* w, float eps, void* y, int wtype) {
    if (wtype == W_BF16)
        rmsnorm<uint16_t>(static_cast<const uint16_t*>(x), R, D, static_cast<const uint16_t*>(w), eps,
                          static_cast<uint16_t*>(y));
    else
        rmsnorm<float>(static_cast<const float*>(x), R, D, static_cast<const float*>(w), eps, static_cast<float*>(y));
}

void mk_rope(const void* x, int64_t B, int64_t H, int64_t S, int64_t d, const int64_t* strides, const void* cos,
             const void* sin, int64_t cb, int64_t R, int interleaved, void* y, int wtype) {
    const int64_t sb = strides[0], sh = strides[1], ss = strides[2];
    if (wtype == W_BF16)
        rope<uint16_t>(static_cast<const uint16_t*>(x), B, H, S, d, sb, sh, ss, static_cast<const uint16_t*>(cos),
                       static_cast<const uint16_t*>(sin), cb, R, interleaved, static_cast<uint16_t*>(y));
    else
        rope<float>(static_cast<const float*>(x), B, H, S, d, sb, sh, ss, static_cast<const float*>(cos),
                    static_cast<const float*>(sin), cb, R, interleaved, static_cast<float*>(y));
}

// One query per sequence: q (B, H, d) and out (B, H, e) contiguous; sequence b's keys at k + b * skb
// (heads skh, positions skt apart), its values likewise, its additive fp32 mask at mask + b * smb
// (smb 0: one mask for every sequence).
void mk_attend_one(const void* q, int64_t B, int64_t H, int64_t KV, int64_t T, int64_t d, int64_t e,
                   const void* k, int64_t skb, int64_t skh, int64_t skt, const void* v, int64_t svb, int64_t svh,
                   int64_t svt, const float* mask, int64_t smb, float scale, void* out, int wtype, int nthreads) {
    if (wtype == W_BF16)
        attend_one<uint16_t>(static_cast<const uint16_t*>(q), B, H, KV, T, d, e, static_cast<const uint16_t*>(k),
                             skb, skh, skt, static_cast<const uint16_t*>(v), svb, svh, svt, mask, smb, scale,
                             static_cast<uint16_t*>(out), nthreads);
    else
        attend_one<float>(static_cast<const float*>(q), B, H, KV, T, d, e, static_cast<const float*>(k), skb, skh,
                          skt, static_cast<const float*>(v), svb, svh, svt, mask, smb, scale,
                          static_cast<float*>(out), nthreads);
}

void mk_topk_route(const void* x, int64_t T, int64_t D, int64_t E, int64_t K, const void* gate,
                   const void* gate_bias, int sigmoid_scores, int softmax_after_topk, int normalize, float scaling,
                   const float* sel_bias, float* logits, float* probs, int64_t* ids, float* weights,
                   int64_t* counts, int wtype) {
    if (wtype == W_BF16)
        topk_route<uint16_t>(static_cast<const uint16_t*>(x), T, D, E, K, static_cast<const uint16_t*>(gate),
                             static_cast<const uint16_t*>(gate_bias), sigmoid_scores, softmax_after_topk, normalize,
                             scaling, sel_bias, logits, probs, ids, weights, counts);
    else
        topk_route<float>(static_cast<const float*>(x), T, D, E, K, static_cast<const float*>(gate),
                          static_cast<const float*>(gate_bias), sigmoid_scores, softmax_after_topk, normalize,
                          scaling, sel_bias, logits, probs, ids, weights, counts);
}

}  // extern "C"
