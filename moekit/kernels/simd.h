// What both kernel sources share: bf16 <-> fp32 conversion and the AVX2 loads and reduction.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MK_AVX2 1
#endif

namespace mk {

inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch's cast
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
    return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// Element k of a row of fp32 or bf16 (uint16_t) values, as fp32.
template <typename T> inline float load1(const T* w, int64_t k);
template <> inline float load1<float>(const float* w, int64_t k) { return w[k]; }
template <> inline float load1<uint16_t>(const uint16_t* w, int64_t k) { return bf16_to_f32(w[k]); }

#ifdef MK_AVX2
// Elements k..k+7, as fp32.
template <typename T> inline __m256 load8(const T* w, int64_t k);
template <> inline __m256 load8<float>(const float* w, int64_t k) { return _mm256_loadu_ps(w + k); }
template <> inline __m256 load8<uint16_t>(const uint16_t* w, int64_t k) {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

}  // namespace mk
