// LayerNorm over the last dim of an (M, C) view (unit inner stride, any row stride), forward (optionally
// of x + residual, the sum written out too) and backward. Threads split the rows; every row is short
// enough to stay in L1 between its passes.
//
// Forward statistics are fp32 and two-pass per row (sum, then squared deviations from that mean)
// with the usual correction term (Bjorck's corrected two-pass), never E[x^2] - E[x]^2.
// Backward: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w. dweight/dbias come from
// per-thread fp32 column partials reduced in thread order (deterministic for a fixed thread count).
#include <omp.h>

#include <cmath>
#include <vector>

#include "ops.h"

namespace hb {
namespace {

// out: the rows are written, so they must not overlap (row stride >= C)
Rows rows_of(const Tensor& t, const char* name, int64_t M, int64_t C, at::ScalarType dt, bool out) {
  check_float(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == M && t.size(1) == C, "hbkernels: ln: ", name, " must have shape (", M,
              ", ", C, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, "hbkernels: ln: ", name, " must have the dtype of x (", dt, "), got ",
              t.scalar_type());
  TORCH_CHECK(C <= 1 || t.stride(1) == 1, "hbkernels: ln: ", name, " must have stride(1) == 1, got ", t.stride(1));
  TORCH_CHECK(!out || M <= 1 || t.stride(0) >= C, "hbkernels: ln: ", name, " must have stride(0) >= C = ", C,
              " (rows must not overlap), got ", t.stride(0));
  return Rows{static_cast<char*>(t.data_ptr()), static_cast<int64_t>(t.element_size()), t.stride(0)};
}

// float32 contiguous 1-D of length n (mean, rstd, dweight, dbias)
float* f32_vector(const Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), "hbkernels: ln: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "hbkernels: ln: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "hbkernels: ln: ", name, " must have shape (", n, ",), got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "hbkernels: ln: ", name, " must be contiguous");
  return t.data_ptr<float>();
}

// a, rounded: keeps the compiler from contracting the product that made it into a later add (FMA),
// so g = dy * w is the same rounded value in both backward passes (C == 1 then gives dx == 0 exactly)
inline F8 rounded(F8 a) {
#if HB_AVX2
  asm("" : "+x"(a.v));
#else
  asm("" : "+m"(a));
#endif
  return a;
}

bool given(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// weight/bias as C floats: the tensor's own data when float32, else converted into buf;
// nullptr when absent. Accepts the dtype of x or float32, 1-D (C,) contiguous.
const float* affine_vector(const std::optional<Tensor>& t, const char* name, int64_t C, at::ScalarType dt,
                           std::vector<float>& buf) {
  if (!given(t)) return nullptr;
  const Tensor& w = *t;
  check_float(w, name);
  TORCH_CHECK(w.scalar_type() == dt || w.scalar_type() == at::kFloat, "hbkernels: ln: ", name,
              " must have the dtype of x (", dt, ") or float32, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == C, "hbkernels: ln: ", name, " must have shape (", C, ",), got ",
              w.sizes());
  TORCH_CHECK(w.is_contiguous(), "hbkernels: ln: ", name, " must be contiguous");
  if (w.scalar_type() == at::kFloat) return w.data_ptr<float>();
  buf.resize(static_cast<size_t>(C));
  dispatch_float(w.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    load_row(static_cast<const T*>(w.data_ptr()), buf.data(), C);
  });
  return buf.data();
}

// ------------------------------------------------------------------ forward
// mean and rstd of one row of C >= 1 values
template <typename T>
inline void row_stats(const T* x, int64_t C, double eps, float& mean_out, float& rstd_out) {
  const float invC = 1.f / static_cast<float>(C);
  const float m = sum_row(x, C) * invC;
  double sd, sq;
  deviation_sums(x, C, m, sd, sq);
  const double dC = static_cast<double>(C);
  double var = (sq - sd * sd / dC) / dC;
  if (var < 0) var = 0;
  mean_out = static_cast<float>(m + sd / dC);
  rstd_out = static_cast<float>(1.0 / std::sqrt(var + eps));
}

template <typename T, bool HAS_W, bool HAS_B>
inline void norm_row(const T* x, T* y, int64_t C, float mean, float rstd, const float* w, const float* b) {
  const F8 m = set1(mean), r = set1(rstd);
  auto f = [&](F8 v, auto wv, auto bv) {
    F8 z = (v - m) * r;
    if constexpr (HAS_W && HAS_B) return fmadd(z, wv(), bv());
    else if constexpr (HAS_W) return z * wv();
    else if constexpr (HAS_B) return z + bv();
    else return z;
  };
  int64_t i = 0;
  for (; i + 8 <= C; i += 8)
    store8(y + i, f(load8(x + i), [&] { return load8(w + i); }, [&] { return load8(b + i); }));
  if (i < C) {
    const int n = static_cast<int>(C - i);
    store_n(y + i, f(load_n(x + i, n), [&] { return load_n(w + i, n); }, [&] { return load_n(b + i, n); }), n);
  }
}

// s = x + r, rounded to T as an unfused add would store it
template <typename T>
inline void add_row(const T* x, const T* r, T* s, int64_t C) {
  int64_t i = 0;
  for (; i + 8 <= C; i += 8) store8(s + i, load8(x + i) + load8(r + i));
  if (i < C) {
    const int n = static_cast<int>(C - i);
    store_n(s + i, load_n(x + i, n) + load_n(r + i, n), n);
  }
}

// RES: normalise x + residual (written to S, then read back from L1) instead of x
template <typename T, bool HAS_W, bool HAS_B>
void fwd_rows(const Rows& X, const Rows* R, const Rows& Y, const Rows* S, int64_t M, int64_t C, const float* w,
              const float* b, float* mean, float* rstd, double eps, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < M; ++i) {
    const T* xr = X.row<const T>(i);
    if (R) {
      add_row(xr, R->row<const T>(i), S->row<T>(i), C);
      xr = S->row<const T>(i);
    }
    float m, r;
    row_stats(xr, C, eps, m, r);
    mean[i] = m;
    rstd[i] = r;
    norm_row<T, HAS_W, HAS_B>(xr, Y.row<T>(i), C, m, r, w, b);
  }
}

// ------------------------------------------------------------------ backward
// ACC: add dy * xhat and dy of each row into the column partials pw, pb
template <typename T, bool HAS_W, bool ACC>
void bwd_rows(const Rows& DY, const Rows& X, const Rows& DX, int64_t begin, int64_t end, int64_t C, const float* w,
              const float* mean, const float* rstd, float* pw, float* pb) {
  const float invC = 1.f / static_cast<float>(C);
  for (int64_t row = begin; row < end; ++row) {
    const T* x = X.row<const T>(row);
    const T* dy = DY.row<const T>(row);
    T* dx = DX.row<T>(row);
    const F8 m = set1(mean[row]), r = set1(rstd[row]);
    // pass 1: sum g and g * xhat (and the column partials)
    F8 sg0 = zero8(), sg1 = zero8(), sx0 = zero8(), sx1 = zero8();
    int64_t i = 0;
    for (; i + 16 <= C; i += 16) {
      F8 d0 = load8(dy + i), d1 = load8(dy + i + 8);
      F8 h0 = (load8(x + i) - m) * r, h1 = (load8(x + i + 8) - m) * r;
      F8 g0 = d0, g1 = d1;
      if constexpr (HAS_W) {
        g0 = rounded(d0 * load8(w + i));
        g1 = rounded(d1 * load8(w + i + 8));
      }
      sg0 = sg0 + g0;
      sg1 = sg1 + g1;
      sx0 = fmadd(g0, h0, sx0);
      sx1 = fmadd(g1, h1, sx1);
      if constexpr (ACC) {
        store8(pw + i, fmadd(d0, h0, load8(pw + i)));
        store8(pw + i + 8, fmadd(d1, h1, load8(pw + i + 8)));
        store8(pb + i, load8(pb + i) + d0);
        store8(pb + i + 8, load8(pb + i + 8) + d1);
      }
    }
    for (; i < C; i += 8) {  // masked lanes: dy loads 0 and xhat is masked to 0 (-mean * rstd may be inf)
      const int n = static_cast<int>(std::min<int64_t>(8, C - i));
      F8 d = load_n(dy + i, n);
      F8 h = and_mask(lane_mask(n), (load_n(x + i, n) - m) * r);
      F8 g = d;
      if constexpr (HAS_W) g = rounded(d * load_n(w + i, n));
      sg0 = sg0 + g;
      sx0 = fmadd(g, h, sx0);
      if constexpr (ACC) {
        store_n(pw + i, fmadd(d, h, load_n(pw + i, n)), n);
        store_n(pb + i, load_n(pb + i, n) + d, n);
      }
    }
    const F8 a = set1(hsum(sg0 + sg1) * invC), bb = set1(hsum(sx0 + sx1) * invC);
    // pass 2: dx = rstd * (g - a - xhat * bb)
    auto f = [&](F8 d, F8 xv, F8 wv) {
      F8 h = (xv - m) * r;
      F8 g = HAS_W ? rounded(d * wv) : d;
      return r * fnmadd(h, bb, g - a);
    };
    i = 0;
    for (; i + 8 <= C; i += 8) store8(dx + i, f(load8(dy + i), load8(x + i), HAS_W ? load8(w + i) : zero8()));
    if (i < C) {
      const int n = static_cast<int>(C - i);
      store_n(dx + i, f(load_n(dy + i, n), load_n(x + i, n), HAS_W ? load_n(w + i, n) : zero8()), n);
    }
  }
}

template <typename T, bool HAS_W, bool ACC>
void bwd_impl(const Rows& DY, const Rows& X, const Rows& DX, int64_t M, int64_t C, const float* w, const float* mean,
              const float* rstd, float* dw, float* db, int nt) {
  // per-thread partials: [tid][0, C) dy * xhat, [tid][C, 2C) dy
  std::vector<float> part(ACC ? static_cast<size_t>(nt) * 2 * C : 0, 0.f);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    int64_t b, e;
    thread_range(M, tid, team, b, e);
    float* pw = ACC ? part.data() + static_cast<size_t>(tid) * 2 * C : nullptr;
    bwd_rows<T, HAS_W, ACC>(DY, X, DX, b, e, C, w, mean, rstd, pw, pw ? pw + C : nullptr);
    if constexpr (ACC) {
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t c = 0; c < C; ++c) {
        float sw = 0.f, sb = 0.f;
        for (int k = 0; k < team; ++k) {
          sw += part[static_cast<size_t>(k) * 2 * C + c];
          sb += part[static_cast<size_t>(k) * 2 * C + C + c];
        }
        if (dw) dw[c] = sw;
        if (db) db[c] = sb;
      }
    }
  }
}

}  // namespace

void ln_fwd(const Tensor& x, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
            const std::optional<Tensor>& bias, const Tensor& y, const std::optional<Tensor>& s, const Tensor& mean,
            const Tensor& rstd, double eps) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "hbkernels: ln_fwd: x must be 2-D (M, C), got ", x.dim(), "-D");
  TORCH_CHECK(eps >= 0, "hbkernels: ln_fwd: eps must be non-negative, got ", eps);
  TORCH_CHECK(given(residual) == given(s), "hbkernels: ln_fwd: s (the sum's output) must be given with residual");
  const int64_t M = x.size(0), C = x.size(1);
  const auto dt = x.scalar_type();
  Rows X = rows_of(x, "x", M, C, dt, false), Y = rows_of(y, "y", M, C, dt, true);
  std::optional<Rows> R, S;
  if (given(residual)) {
    R = rows_of(*residual, "residual", M, C, dt, false);
    S = rows_of(*s, "s", M, C, dt, true);
  }
  const Rows* rp = R ? &*R : nullptr;
  const Rows* sp = S ? &*S : nullptr;
  float* mean_p = f32_vector(mean, "mean", M);
  float* rstd_p = f32_vector(rstd, "rstd", M);
  std::vector<float> wbuf, bbuf;
  const float* w = affine_vector(weight, "weight", C, dt, wbuf);
  const float* b = affine_vector(bias, "bias", C, dt, bbuf);
  if (M == 0) return;
  if (C == 0) {  // empty rows: mean 0, variance 0
    mean.fill_(0.0);
    rstd.fill_(1.0 / std::sqrt(eps));
    return;
  }
  const int nt = static_cast<int>(std::min<int64_t>(num_threads(), M));
  dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    if (w && b)
      fwd_rows<T, true, true>(X, rp, Y, sp, M, C, w, b, mean_p, rstd_p, eps, nt);
    else if (w)
      fwd_rows<T, true, false>(X, rp, Y, sp, M, C, w, b, mean_p, rstd_p, eps, nt);
    else if (b)
      fwd_rows<T, false, true>(X, rp, Y, sp, M, C, w, b, mean_p, rstd_p, eps, nt);
    else
      fwd_rows<T, false, false>(X, rp, Y, sp, M, C, w, b, mean_p, rstd_p, eps, nt);
  });
}

void ln_bwd(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight, const Tensor& mean,
            const Tensor& rstd, const Tensor& dx, const std::optional<Tensor>& dweight,
            const std::optional<Tensor>& dbias) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "hbkernels: ln_bwd: x must be 2-D (M, C), got ", x.dim(), "-D");
  const int64_t M = x.size(0), C = x.size(1);
  const auto dt = x.scalar_type();
  Rows X = rows_of(x, "x", M, C, dt, false), DY = rows_of(dy, "dy", M, C, dt, false),
       DX = rows_of(dx, "dx", M, C, dt, true);
  const float* mean_p = f32_vector(mean, "mean", M);
  const float* rstd_p = f32_vector(rstd, "rstd", M);
  std::vector<float> wbuf;
  const float* w = affine_vector(weight, "weight", C, dt, wbuf);
  float* dw = given(dweight) ? f32_vector(*dweight, "dweight", C) : nullptr;
  float* db = given(dbias) ? f32_vector(*dbias, "dbias", C) : nullptr;
  if (C == 0) return;
  if (M == 0) {  // no rows: the sums over rows are 0
    if (dw) std::fill(dw, dw + C, 0.f);
    if (db) std::fill(db, db + C, 0.f);
    return;
  }
  const int nt = static_cast<int>(std::min<int64_t>(num_threads(), M));
  const bool acc = dw || db;
  dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    if (w && acc)
      bwd_impl<T, true, true>(DY, X, DX, M, C, w, mean_p, rstd_p, dw, db, nt);
    else if (w)
      bwd_impl<T, true, false>(DY, X, DX, M, C, w, mean_p, rstd_p, dw, db, nt);
    else if (acc)
      bwd_impl<T, false, true>(DY, X, DX, M, C, w, mean_p, rstd_p, dw, db, nt);
    else
      bwd_impl<T, false, false>(DY, X, DX, M, C, w, mean_p, rstd_p, dw, db, nt);
  });
}

}  // namespace hb
