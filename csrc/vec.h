// Minimal 8-lane fp32 SIMD layer for the hbkernels CPU backend.
//
// With AVX2+FMA (the -march=native build on x86-64) every operation is one or a few intrinsics;
// otherwise the same API runs on plain arrays, which compilers auto-vectorise where they can.
// Inputs/outputs in fp16/bf16 are converted on load/store; all arithmetic is fp32.
//
// exp/erf are our own polynomial fits (fitted in float64 against mpmath, evaluated in fp32):
//   exp: Cody-Waite range reduction + degree-5 polynomial, ~1 ulp on [-87.3, 88]; 0 below.
//   Phi (normal CDF, for exact-erf GELU): erf(x) = x P(x^2) for |x| < 1 and
//   erfc(x) = exp(-x^2) R(1/(1+x)) for |x| >= 1 (relative error ~2 ulp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HB_AVX2 1
#else
#define HB_AVX2 0
#endif

namespace hb {

using Half = c10::Half;
using BF16 = c10::BFloat16;

// ---------------------------------------------------------------- scalar conversions
template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }
template <>
inline float to_f<float>(float v) { return v; }
template <typename T>
inline T from_f(float v) { return static_cast<T>(v); }  // c10: round-to-nearest-even
template <>
inline float from_f<float>(float v) { return v; }

#if HB_AVX2
// ================================================================ AVX2 implementation
struct F8 {
  __m256 v;
};

inline F8 set1(float a) { return {_mm256_set1_ps(a)}; }
inline F8 zero8() { return {_mm256_setzero_ps()}; }
inline F8 operator+(F8 a, F8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline F8 operator-(F8 a, F8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline F8 operator*(F8 a, F8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline F8 operator/(F8 a, F8 b) { return {_mm256_div_ps(a.v, b.v)}; }
inline F8 fmadd(F8 a, F8 b, F8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }   // a*b+c
inline F8 fnmadd(F8 a, F8 b, F8 c) { return {_mm256_fnmadd_ps(a.v, b.v, c.v)}; } // c-a*b
inline F8 vmax(F8 a, F8 b) { return {_mm256_max_ps(a.v, b.v)}; }
inline F8 vmin(F8 a, F8 b) { return {_mm256_min_ps(a.v, b.v)}; }
inline F8 vabs(F8 a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
// lanes where m (all-ones mask from a compare) is set take b, others a
inline F8 select(F8 m, F8 a, F8 b) { return {_mm256_blendv_ps(a.v, b.v, m.v)}; }
inline F8 cmp_lt(F8 a, F8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
inline F8 and_mask(F8 m, F8 a) { return {_mm256_and_ps(m.v, a.v)}; }

inline float hsum(F8 a) {
  __m128 lo = _mm256_castps256_ps128(a.v), hi = _mm256_extractf128_ps(a.v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
inline float hmax(F8 a) {
  __m128 lo = _mm256_castps256_ps128(a.v), hi = _mm256_extractf128_ps(a.v, 1);
  lo = _mm_max_ps(lo, hi);
  lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_max_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline __m256i tail_mask(int n) {  // first n lanes on (0 <= n <= 8)
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
}

inline F8 lane_mask(int n) { return {_mm256_castsi256_ps(tail_mask(n))}; }  // lanes < n set
inline F8 load8(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void store8(float* p, F8 a) { _mm256_storeu_ps(p, a.v); }
inline F8 load_n(const float* p, int n) { return {_mm256_maskload_ps(p, tail_mask(n))}; }
inline void store_n(float* p, F8 a, int n) { _mm256_maskstore_ps(p, tail_mask(n), a.v); }

inline F8 load8(const BF16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}
inline __m128i bf16_round(F8 a) {  // round-to-nearest-even like c10::BFloat16, NaN -> 0x7FC0
  __m256i u = _mm256_castps_si256(a.v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
  r = _mm256_srli_epi32(r, 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: [r0..r3 r0..r3 | r4..r7 r4..r7]
  packed = _mm256_permute4x64_epi64(packed, 0x08);  // lanes 0 and 2 -> low 128 bits
  return _mm256_castsi256_si128(packed);
}
inline void store8(BF16* p, F8 a) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_round(a)); }

#if defined(__F16C__)
inline F8 load8(const Half* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline void store8(Half* p, F8 a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT));
}
#else
inline F8 load8(const Half* p) {
  alignas(32) float t[8];
  for (int i = 0; i < 8; ++i) t[i] = static_cast<float>(p[i]);
  return {_mm256_load_ps(t)};
}
inline void store8(Half* p, F8 a) {
  alignas(32) float t[8];
  _mm256_store_ps(t, a.v);
  for (int i = 0; i < 8; ++i) p[i] = static_cast<Half>(t[i]);
}
#endif

template <typename T>
inline F8 load_n(const T* p, int n) {
  alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < n; ++i) t[i] = to_f(p[i]);
  return {_mm256_load_ps(t)};
}
template <typename T>
inline void store_n(T* p, F8 a, int n) {
  alignas(32) float t[8];
  _mm256_store_ps(t, a.v);
  for (int i = 0; i < n; ++i) p[i] = from_f<T>(t[i]);
}

// 2^n for integer-valued n in [-126, 127]
inline F8 pow2i(F8 n) {
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
  return {_mm256_castsi256_ps(e)};
}
inline F8 vround(F8 a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }

// row-block reduction for dot-product kernels: acc[r*4+c] (r<2, c<4) -> out0[c], out1[c]
inline void reduce_2x4(const F8* acc, float* out0, float* out1) {
  __m256 t0 = _mm256_hadd_ps(acc[0].v, acc[1].v);
  __m256 t1 = _mm256_hadd_ps(acc[2].v, acc[3].v);
  __m256 t2 = _mm256_hadd_ps(t0, t1);
  __m256 u0 = _mm256_hadd_ps(acc[4].v, acc[5].v);
  __m256 u1 = _mm256_hadd_ps(acc[6].v, acc[7].v);
  __m256 u2 = _mm256_hadd_ps(u0, u1);
  _mm_storeu_ps(out0, _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1)));
  _mm_storeu_ps(out1, _mm_add_ps(_mm256_castps256_ps128(u2), _mm256_extractf128_ps(u2, 1)));
}

// In-register 8x8 transpose: r[i] lane j <- r[j] lane i.
inline void transpose8(F8* r) {
  __m256 t0 = _mm256_unpacklo_ps(r[0].v, r[1].v), t1 = _mm256_unpackhi_ps(r[0].v, r[1].v);
  __m256 t2 = _mm256_unpacklo_ps(r[2].v, r[3].v), t3 = _mm256_unpackhi_ps(r[2].v, r[3].v);
  __m256 t4 = _mm256_unpacklo_ps(r[4].v, r[5].v), t5 = _mm256_unpackhi_ps(r[4].v, r[5].v);
  __m256 t6 = _mm256_unpacklo_ps(r[6].v, r[7].v), t7 = _mm256_unpackhi_ps(r[6].v, r[7].v);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0].v = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1].v = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2].v = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3].v = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4].v = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5].v = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6].v = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7].v = _mm256_permute2f128_ps(u3, u7, 0x31);
}

#else
// ================================================================ portable fallback
struct F8 {
  float v[8];
};
#define HB_MAP(expr)            \
  F8 r;                         \
  for (int i = 0; i < 8; ++i) { \
    r.v[i] = (expr);            \
  }                             \
  return r;
inline F8 set1(float a) { HB_MAP(a) }
inline F8 zero8() { HB_MAP(0.0f) }
inline F8 operator+(F8 a, F8 b) { HB_MAP(a.v[i] + b.v[i]) }
inline F8 operator-(F8 a, F8 b) { HB_MAP(a.v[i] - b.v[i]) }
inline F8 operator*(F8 a, F8 b) { HB_MAP(a.v[i] * b.v[i]) }
inline F8 operator/(F8 a, F8 b) { HB_MAP(a.v[i] / b.v[i]) }
// plain a*b+c (contracted to an FMA where the target has one; std::fma would be a slow libm call)
inline F8 fmadd(F8 a, F8 b, F8 c) { HB_MAP(a.v[i] * b.v[i] + c.v[i]) }
inline F8 fnmadd(F8 a, F8 b, F8 c) { HB_MAP(c.v[i] - a.v[i] * b.v[i]) }
inline F8 vmax(F8 a, F8 b) { HB_MAP(a.v[i] > b.v[i] ? a.v[i] : b.v[i]) }
inline F8 vmin(F8 a, F8 b) { HB_MAP(a.v[i] < b.v[i] ? a.v[i] : b.v[i]) }
inline F8 vabs(F8 a) { HB_MAP(std::fabs(a.v[i])) }
inline F8 select(F8 m, F8 a, F8 b) {
  F8 r;
  for (int i = 0; i < 8; ++i) {
    uint32_t u;
    std::memcpy(&u, &m.v[i], 4);
    r.v[i] = u ? b.v[i] : a.v[i];
  }
  return r;
}
inline F8 cmp_lt(F8 a, F8 b) {
  F8 r;
  for (int i = 0; i < 8; ++i) {
    uint32_t u = a.v[i] < b.v[i] ? 0xFFFFFFFFu : 0u;
    std::memcpy(&r.v[i], &u, 4);
  }
  return r;
}
inline F8 and_mask(F8 m, F8 a) {
  F8 r;
  for (int i = 0; i < 8; ++i) {
    uint32_t u, w;
    std::memcpy(&u, &m.v[i], 4);
    std::memcpy(&w, &a.v[i], 4);
    w &= u;
    std::memcpy(&r.v[i], &w, 4);
  }
  return r;
}
inline F8 lane_mask(int n) {
  F8 r;
  for (int i = 0; i < 8; ++i) {
    uint32_t u = i < n ? 0xFFFFFFFFu : 0u;
    std::memcpy(&r.v[i], &u, 4);
  }
  return r;
}
inline float hsum(F8 a) {
  float s = 0;
  for (int i = 0; i < 8; ++i) s += a.v[i];
  return s;
}
inline float hmax(F8 a) {
  float s = a.v[0];
  for (int i = 1; i < 8; ++i) s = a.v[i] > s ? a.v[i] : s;
  return s;
}
template <typename T>
inline F8 load8(const T* p) { HB_MAP(to_f(p[i])) }
template <typename T>
inline void store8(T* p, F8 a) {
  for (int i = 0; i < 8; ++i) p[i] = from_f<T>(a.v[i]);
}
template <typename T>
inline F8 load_n(const T* p, int n) { HB_MAP(i < n ? to_f(p[i]) : 0.0f) }
template <typename T>
inline void store_n(T* p, F8 a, int n) {
  for (int i = 0; i < n; ++i) p[i] = from_f<T>(a.v[i]);
}
inline F8 pow2i(F8 n) {
  F8 r;
  for (int i = 0; i < 8; ++i) {
    uint32_t e = static_cast<uint32_t>(static_cast<int32_t>(n.v[i]) + 127) << 23;
    std::memcpy(&r.v[i], &e, 4);
  }
  return r;
}
// round to nearest even for |a| < 2^22 (all callers) without a libm call: add/subtract 1.5 * 2^23
inline F8 vround(F8 a) { HB_MAP((a.v[i] + 12582912.0f) - 12582912.0f) }
inline void reduce_2x4(const F8* acc, float* out0, float* out1) {
  for (int c = 0; c < 4; ++c) {
    out0[c] = hsum(acc[c]);
    out1[c] = hsum(acc[4 + c]);
  }
}
inline void transpose8(F8* r) {
  for (int i = 0; i < 8; ++i)
    for (int j = i + 1; j < 8; ++j) std::swap(r[i].v[j], r[j].v[i]);
}
#undef HB_MAP
#endif

// ---------------------------------------------------------------- prefetch
inline void prefetch_r(const void* p) { __builtin_prefetch(p, 0, 3); }
inline void prefetch_w(const void* p) { __builtin_prefetch(p, 1, 3); }

// ---------------------------------------------------------------- transcendental functions
// exp(x): x = n ln2 + r, |r| <= ln2/2; e^r = 1 + r + r^2 P(r). Below -87.33 returns 0, above 88
// saturates at e^88 (never reached by our callers with meaningful values); NaN stays NaN, so a
// diverging activation shows in softmax, SiLU and GELU outputs as it does in PyTorch's.
#if HB_AVX2
inline F8 vexp(F8 x) {
  const F8 lo = set1(-87.33654f);
  F8 under = cmp_lt(x, lo);
  x = vmin(set1(88.0f), vmax(lo, x));  // maxps/minps return their second operand for a NaN: x passes
  F8 n = vround(x * set1(1.44269504088896341f));
  F8 r = fnmadd(n, set1(0.693359375f), x);  // ln2 split: hi part exact in 9 bits
  r = fnmadd(n, set1(-2.12194440e-4f), r);
  F8 p = set1(1.98992755e-4f);
  p = fmadd(p, r, set1(1.39336439e-3f));
  p = fmadd(p, r, set1(8.33329838e-3f));
  p = fmadd(p, r, set1(4.16664667e-2f));
  p = fmadd(p, r, set1(1.66666672e-1f));
  p = fmadd(p, r, set1(0.5f));
  p = fmadd(p, r * r, r) + set1(1.0f);
  F8 res = p * pow2i(n);
  return select(under, res, zero8());
}
#else
// The same algorithm one lane at a time, written so compilers vectorise the 8-lane loop.
inline float exp_lane(float x) {
  const float lo = -87.33654f;
  const bool under = x < lo;
  x = x < lo ? lo : (x > 88.0f ? 88.0f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.98992755e-4f;
  p = p * r + 1.39336439e-3f;
  p = p * r + 8.33329838e-3f;
  p = p * r + 4.16664667e-2f;
  p = p * r + 1.66666672e-1f;
  p = p * r + 0.5f;
  p = (p * (r * r) + r) + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return under ? 0.0f : p * scale;
}
inline F8 vexp(F8 x) {
  F8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = exp_lane(x.v[i]);
  return r;
}
#endif

// sigmoid(z) = 1 / (1 + exp(-z))
inline F8 vsigmoid(F8 z) { return set1(1.0f) / (set1(1.0f) + vexp(set1(0.0f) - z)); }

// Normal CDF Phi(g) = 0.5 erfc(-g/sqrt2) and, when wanted, the density phi(g).
inline F8 vphi_cdf(F8 g, F8* density = nullptr) {
  const F8 one = set1(1.0f), half = set1(0.5f);
  F8 x = vabs(g) * set1(0.707106781186547524f);  // |g| / sqrt2
  F8 x2 = x * x;
  // small branch: erf(x) = x P(x^2)
  F8 p = set1(8.11220598e-05f);
  p = fmadd(p, x2, set1(-8.08563374e-04f));
  p = fmadd(p, x2, set1(5.19659836e-03f));
  p = fmadd(p, x2, set1(-2.68580038e-02f));
  p = fmadd(p, x2, set1(1.12836823e-01f));
  p = fmadd(p, x2, set1(-3.76126349e-01f));
  p = fmadd(p, x2, set1(1.12837923f));
  F8 erf_small = p * x;
  // large branch: erfc(x) = exp(-x^2) R(1/(1+x)), x clamped to 6 inside R (erfc(6) ~ 2e-17)
  F8 e = vexp(set1(0.0f) - x2);
  F8 t = one / (one + vmin(x, set1(6.0f)));
  F8 q = set1(0.94322145f);
  q = fmadd(q, t, set1(-3.25251102f));
  q = fmadd(q, t, set1(4.51597691f));
  q = fmadd(q, t, set1(-2.81373858f));
  q = fmadd(q, t, set1(0.294431299f));
  q = fmadd(q, t, set1(0.181852624f));
  q = fmadd(q, t, set1(0.575065494f));
  q = fmadd(q, t, set1(0.563517094f));
  q = fmadd(q, t, set1(1.81020951e-05f));
  F8 erfc_large = e * q;
  F8 small = cmp_lt(x, one);
  F8 erfc_x = select(small, erfc_large, one - erf_small);  // erfc(|g|/sqrt2)
  // Phi(g) = 1 - 0.5 erfc(x) for g >= 0, 0.5 erfc(x) for g < 0
  F8 tail = half * erfc_x;
  F8 neg = cmp_lt(g, zero8());
  if (density) *density = e * set1(0.398942280401432678f);  // exp(-g^2/2)/sqrt(2 pi)
  return select(neg, one - tail, tail);
}

}  // namespace hb
