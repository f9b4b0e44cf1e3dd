// Shared helpers: dtype dispatch, thread count, argument checks.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vec.h"

namespace hb {

using at::Tensor;

// Threads for one op: torch's intra-op setting (torch.set_num_threads), 1 inside a parallel region.
inline int num_threads() {
  if (at::in_parallel_region()) return 1;
  return std::max(1, at::get_num_threads());
}

inline void check_float(const Tensor& t, const char* name) {
  auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "hbkernels: ", name,
              " must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(t.device().is_cpu(), "hbkernels: ", name, " must be a CPU tensor");
}

// Calls f(T{}) with T the C++ type of dtype dt (float, c10::Half, c10::BFloat16).
template <typename F>
inline void dispatch_float(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(Half{});
      break;
    case at::kBFloat16:
      f(BF16{});
      break;
    default:
      TORCH_CHECK(false, "hbkernels: unsupported dtype ", dt);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// [begin, end) share of `total` items for thread `tid` of `nt` (contiguous blocks)
inline void thread_range(int64_t total, int tid, int nt, int64_t& begin, int64_t& end) {
  int64_t q = total / nt, r = total % nt;
  begin = tid * q + std::min<int64_t>(tid, r);
  end = begin + q + (tid < r ? 1 : 0);
}

// A 2D tensor with unit inner stride, addressed by row.
struct Rows {
  char* data;
  int64_t es, s0;
  template <typename T>
  T* row(int64_t i) const {
    return reinterpret_cast<T*>(data + i * s0 * es);
  }
};

// Sum of n contiguous values in fp32 (four accumulators: independent adds in flight).
template <typename T>
inline float sum_row(const T* v, int64_t n) {
  F8 s0 = zero8(), s1 = zero8(), s2 = zero8(), s3 = zero8();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = s0 + load8(v + i);
    s1 = s1 + load8(v + i + 8);
    s2 = s2 + load8(v + i + 16);
    s3 = s3 + load8(v + i + 24);
  }
  for (; i + 8 <= n; i += 8) s0 = s0 + load8(v + i);
  if (i < n) s1 = s1 + load_n(v + i, static_cast<int>(n - i));
  return hsum((s0 + s1) + (s2 + s3));
}

// Scale of the deviations about a mean m: one ulp of an fp32 mean past 2^87, squared, overflows fp32 (a
// constant row whose rounded first-pass mean missed its value then had an inf variance, and rstd 0), so
// past |m| = 2^64 they are taken of v * 2^-64. Powers of two: scaling and unscaling are exact, and a
// deviation from such a mean is either 0 or at least 2^40, never scaled below fp32's normal range.
inline float deviation_scale(float m) { return std::fabs(m) >= 0x1p64f ? 0x1p-64f : 1.f; }

// The second pass of a two-pass variance over n contiguous values: the sums of d = v - m and of d^2
// (in fp32, unscaled in float64; the tail's unused lanes masked out). sum d, zero up to rounding, is the
// correction term of the corrected two-pass formula.
template <typename T>
inline void deviation_sums(const T* v, int64_t n, float m, double& sum_d, double& sum_d2) {
  const float s = deviation_scale(m);
  const F8 sv = set1(s), nm = set1(-m * s);  // d = v s - m s, one rounding (v s is exact)
  F8 d0 = zero8(), d1 = zero8(), q0 = zero8(), q1 = zero8(), q2 = zero8(), q3 = zero8();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    F8 a = fmadd(load8(v + i), sv, nm), b = fmadd(load8(v + i + 8), sv, nm), c = fmadd(load8(v + i + 16), sv, nm),
       d = fmadd(load8(v + i + 24), sv, nm);
    d0 = d0 + (a + b);
    d1 = d1 + (c + d);
    q0 = fmadd(a, a, q0);
    q1 = fmadd(b, b, q1);
    q2 = fmadd(c, c, q2);
    q3 = fmadd(d, d, q3);
  }
  for (; i + 8 <= n; i += 8) {
    F8 a = fmadd(load8(v + i), sv, nm);
    d0 = d0 + a;
    q0 = fmadd(a, a, q0);
  }
  if (i < n) {  // masked lanes load 0 and would contribute -m: mask them out
    const int k = static_cast<int>(n - i);
    F8 a = and_mask(lane_mask(k), fmadd(load_n(v + i, k), sv, nm));
    d1 = d1 + a;
    q1 = fmadd(a, a, q1);
  }
  const double ds = s;
  sum_d = hsum(d0 + d1) / ds;
  sum_d2 = hsum((q0 + q1) + (q2 + q3)) / (ds * ds);
}

// Converting row load/store (contiguous), vectorised.
template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(dst + i, load8(src + i));
  if (i < n) store_n(dst + i, load_n(src + i, static_cast<int>(n - i)), static_cast<int>(n - i));
}
template <typename T>
inline void store_row(T* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(dst + i, load8(src + i));
  if (i < n) store_n(dst + i, load_n(src + i, static_cast<int>(n - i)), static_cast<int>(n - i));
}

}  // namespace hb
