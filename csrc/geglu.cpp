// GEGLU: out = h * gelu(g) with (h, g) the two halves of each row of x (exact erf GELU), and its
// backward. Rows are split into chunks so a few long rows still use every thread.
#include <omp.h>

#include "ops.h"

namespace hb {
namespace {

constexpr int64_t kChunk = 2048;

Rows rows_of(const Tensor& t, const char* name, int64_t M, int64_t cols, at::ScalarType dt) {
  check_float(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == M && t.size(1) == cols, "hbkernels: ", name, " must have shape (", M,
              ", ", cols, ")");
  TORCH_CHECK(t.scalar_type() == dt, "hbkernels: ", name, " must have the dtype of x");
  TORCH_CHECK(cols <= 1 || t.stride(1) == 1, "hbkernels: ", name, " must have stride(-1) == 1");
  return Rows{static_cast<char*>(t.data_ptr()), static_cast<int64_t>(t.element_size()), t.stride(0)};
}

template <typename T>
void fwd_chunk(const T* h, const T* g, T* o, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    F8 gv = load8(g + i);
    store8(o + i, load8(h + i) * gv * vphi_cdf(gv));
  }
  if (i < n) {
    int m = static_cast<int>(n - i);
    F8 gv = load_n(g + i, m);
    store_n(o + i, load_n(h + i, m) * gv * vphi_cdf(gv), m);
  }
}

template <typename T>
void bwd_chunk(const T* dy, const T* h, const T* g, T* dh, T* dg, int64_t n) {
  auto f = [](F8 d, F8 hv, F8 gv, F8& oh, F8& og) {
    F8 dens;
    F8 cdf = vphi_cdf(gv, &dens);
    oh = d * gv * cdf;
    og = d * hv * fmadd(gv, dens, cdf);
  };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    F8 oh, og;
    f(load8(dy + i), load8(h + i), load8(g + i), oh, og);
    store8(dh + i, oh);
    store8(dg + i, og);
  }
  if (i < n) {
    int m = static_cast<int>(n - i);
    F8 oh, og;
    f(load_n(dy + i, m), load_n(h + i, m), load_n(g + i, m), oh, og);
    store_n(dh + i, oh, m);
    store_n(dg + i, og, m);
  }
}

}  // namespace

void geglu_fwd(const Tensor& x, const Tensor& out) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "hbkernels: geglu x must be (M, 2F)");
  const int64_t M = x.size(0), F = x.size(1) / 2;
  Rows X = rows_of(x, "x", M, 2 * F, x.scalar_type()), O = rows_of(out, "out", M, F, x.scalar_type());
  if (M == 0 || F == 0) return;
  const int64_t nc = ceil_div(F, kChunk);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
#pragma omp parallel for schedule(static) num_threads(num_threads())
    for (int64_t w = 0; w < M * nc; ++w) {
      const int64_t i = w / nc, c0 = (w % nc) * kChunk, n = std::min(kChunk, F - c0);
      const T* xr = X.row<const T>(i);
      fwd_chunk(xr + c0, xr + F + c0, O.row<T>(i) + c0, n);
    }
  });
}

void geglu_bwd(const Tensor& dy, const Tensor& x, const Tensor& dx) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "hbkernels: geglu x must be (M, 2F)");
  const int64_t M = x.size(0), F = x.size(1) / 2;
  Rows X = rows_of(x, "x", M, 2 * F, x.scalar_type()), DY = rows_of(dy, "dy", M, F, x.scalar_type()),
       DX = rows_of(dx, "dx", M, 2 * F, x.scalar_type());
  if (M == 0 || F == 0) return;
  const int64_t nc = ceil_div(F, kChunk);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
#pragma omp parallel for schedule(static) num_threads(num_threads())
    for (int64_t w = 0; w < M * nc; ++w) {
      const int64_t i = w / nc, c0 = (w % nc) * kChunk, n = std::min(kChunk, F - c0);
      const T* xr = X.row<const T>(i);
      T* dxr = DX.row<T>(i);
      bwd_chunk(DY.row<const T>(i) + c0, xr + c0, xr + F + c0, dxr + c0, dxr + F + c0, n);
    }
  });
}

}  // namespace hb
