// GroupNorm (+ fused SiLU) forward/backward and the strided copy(+add), over (N, C, T, S) views
// with arbitrary strides (contiguous video, channels-last, token layouts), via tile.h.
//
// Statistics: each tile row (one channel, contiguous in L1) or tile column (channels-last: one
// channel across the tile's positions) gets an fp32 two-pass mean/M2, merged into per-(n, group)
// float64 accumulators with Chan's formula, so a large mean does not cost accuracy.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "ops.h"
#include "tile.h"

namespace hb {
namespace {

struct Welford {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mb, double m2b) {
    double tot = n + nb;
    if (nb == 0) return;
    double d = mb - mean;
    mean += d * (nb / tot);
    m2 += m2b + d * d * (n * nb / tot);
    n = tot;
  }
  void merge(const Welford& o) { merge(o.n, o.mean, o.m2); }
};

// Coefficient that is either per column (VEC: p[col]) or one scalar for the whole row.
template <bool VEC>
struct Coef {
  const float* p;
  float s;
  F8 v(int64_t i) const {
    if constexpr (VEC) return load8(p + i);
    return set1(s);
  }
  F8 vn(int64_t i, int n) const {
    if constexpr (VEC) return load_n(p + i, n);
    return set1(s);
  }
};
template <bool VEC>
inline Coef<VEC> coef(const float* arr, int64_t c) {  // arr indexed by channel; c = channel of col 0 / of row
  return Coef<VEC>{arr + c, arr[c]};
}

std::vector<float> channel_vector(const std::optional<Tensor>& t, int64_t C, float dflt) {
  std::vector<float> out(static_cast<size_t>(C), dflt);
  if (!t.has_value() || !t->defined()) return out;
  const Tensor& w = *t;
  check_float(w, "weight/bias");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == C, "hbkernels: weight/bias must have shape (C,) = (", C, ",)");
  dispatch_float(w.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* p = w.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) out[c] = to_f(p[c * w.stride(0)]);
  });
  return out;
}

// The optional (N, C) shift added to x before normalising, as N*C floats (zeros without one).
std::vector<float> shift_vector(const std::optional<Tensor>& t, int64_t N, int64_t C) {
  std::vector<float> out(static_cast<size_t>(N * C), 0.f);
  if (!t.has_value() || !t->defined()) return out;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                  t->size(1) == C,
              "hbkernels: shift must be contiguous float32 of shape (N, C) = (", N, ", ", C, ")");
  std::copy(t->data_ptr<float>(), t->data_ptr<float>() + N * C, out.begin());
  return out;
}

void check_stats(const Tensor& t, int64_t N, int64_t G, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == N && t.size(1) == G,
              "hbkernels: ", name, " must be float32 of shape (N, G) = (", N, ", ", G, ")");
}

// ------------------------------------------------------------------ forward statistics
// row-wise: every row of the tile is one channel
// En: the shift of the tile's sample, per channel (it moves each channel's mean, not its M2)
void stats_rows(const float* x, int64_t ld, int64_t R, int64_t L, const Plan& p, const Tile& t,
                int64_t Cg, int64_t G, const float* En, Welford* acc) {
  int64_t cbase = tile_channel_base(p, t);
  bool per_row = p.cdim() == 1;
  for (int64_t r = 0; r < R; ++r) {
    const float* v = x + r * ld;
    const double dL = static_cast<double>(L);
    float m = sum_row(v, L) / static_cast<float>(L);
    double sd, sum_d2;  // deviations from m: their sum corrects m's rounding, in mean and M2 alike
    deviation_sums(v, L, m, sd, sum_d2);
    int64_t c = per_row ? cbase + r : cbase;
    acc[t.n * G + c / Cg].merge(dL, m + sd / dL + En[c], std::max(0.0, sum_d2 - sd * sd / dL));
  }
}

// The second pass of stats_cols: per column, the sums of the deviations about the (scaled) mean and of
// their squares. SCALED only for tiles holding a column past deviation_scale's bound: the common case keeps
// its loop free of the extra load and multiply.
template <bool SCALED>
void col_deviations(const float* x, int64_t ld, int64_t R, int64_t L, const float* mean, const float* scale,
                    float* dev, float* m2) {
  for (int64_t r = 0; r < R; ++r) {
    const float* v = x + r * ld;
    int64_t c = 0;
    for (; c + 8 <= L; c += 8) {
      F8 xs = load8(v + c);
      if constexpr (SCALED) xs = xs * load8(scale + c);
      F8 d = xs - load8(mean + c);
      store8(dev + c, load8(dev + c) + d);
      store8(m2 + c, fmadd(d, d, load8(m2 + c)));
    }
    for (; c < L; ++c) {
      float d = (SCALED ? v[c] * scale[c] : v[c]) - mean[c];
      dev[c] += d;
      m2[c] += d * d;
    }
  }
}

// column-wise: the tile's columns are channels (channels-last); col scratch holds 4 * L floats.
// As stats_rows: the second pass also sums the deviations, which corrects the rounded first-pass mean
// (a large mean with a small spread otherwise lost ~1 ulp of the mean and 1e-5 of the variance), and
// scales them by deviation_scale (a huge column's squared ulp overflowed fp32).
void stats_cols(const float* x, int64_t ld, int64_t R, int64_t L, const Tile& t, int64_t Cg, int64_t G,
                const float* En, Welford* acc, float* scratch) {
  float* sum = scratch;
  float* m2 = scratch + L;
  float* dev = scratch + 2 * L;
  float* scale = scratch + 3 * L;
  for (int64_t c = 0; c < L; ++c) sum[c] = m2[c] = dev[c] = 0.f;
  for (int64_t r = 0; r < R; ++r) {
    const float* v = x + r * ld;
    int64_t c = 0;
    for (; c + 8 <= L; c += 8) store8(sum + c, load8(sum + c) + load8(v + c));
    for (; c < L; ++c) sum[c] += v[c];
  }
  float inv = 1.f / static_cast<float>(R);
  bool scaled = false;
  for (int64_t c = 0; c < L; ++c) {  // sum <- the column means, scaled
    scale[c] = deviation_scale(sum[c] * inv);
    sum[c] = sum[c] * inv * scale[c];
    scaled |= scale[c] != 1.f;
  }
  if (scaled) {
    col_deviations<true>(x, ld, R, L, sum, scale, dev, m2);
  } else {
    col_deviations<false>(x, ld, R, L, sum, scale, dev, m2);
  }
  // merge columns of one group in float64 first (cheap), then into the accumulator
  const double dR = static_cast<double>(R);
  int64_t c = 0;
  while (c < L) {
    int64_t ch = t.c0 + c, g = ch / Cg;
    int64_t end = std::min(L, (g + 1) * Cg - t.c0);
    Welford w;
    for (; c < end; ++c) {
      const double s = scale[c], d = dev[c] / s;
      w.merge(dR, sum[c] / s + d / dR + En[t.c0 + c], std::max(0.0, m2[c] / (s * s) - d * d / dR));
    }
    acc[t.n * G + g].merge(w);
  }
}

void stats_tiles(const Plan& p, const View& xv, int64_t begin, int64_t end, int64_t Cg, int64_t G, const float* E,
                 Welford* acc, TileBuf& xb, std::vector<float>& scratch) {
  for (int64_t idx = begin; idx < end; ++idx) {
    Tile t = tile_at(p, idx);
    int64_t ld;
    const float* x = xb.in(xv, p, t, &ld);
    const float* En = E + t.n * p.size[0];
    if (p.cdim() == 0)
      stats_cols(x, ld, t.R, t.L, t, Cg, G, En, acc, scratch.data());
    else
      stats_rows(x, ld, t.R, t.L, p, t, Cg, G, En, acc);
  }
}

// ------------------------------------------------------------------ forward normalisation
// y = (x - m) * a + b, optionally SiLU; m/a/b per channel
template <bool VEC, bool SILU>
inline void norm_row(const float* x, float* y, int64_t L, Coef<VEC> m, Coef<VEC> a, Coef<VEC> b) {
  auto f = [&](F8 v, F8 mm, F8 aa, F8 bb) {
    F8 z = fmadd(v - mm, aa, bb);
    if constexpr (SILU) z = z / (set1(1.f) + vexp(zero8() - z));
    return z;
  };
  int64_t i = 0;
  for (; i + 8 <= L; i += 8) store8(y + i, f(load8(x + i), m.v(i), a.v(i), b.v(i)));
  if (i < L) {
    int n = static_cast<int>(L - i);
    store_n(y + i, f(load_n(x + i, n), m.vn(i, n), a.vn(i, n), b.vn(i, n)), n);
  }
}

template <bool SILU>
void norm_tiles_impl(const Plan& p, const View& xv, const View& yv, int64_t begin, int64_t end, const float* M,
                     const float* A, const float* B, TileBuf& xb, TileBuf& yb) {
  const int64_t C = p.size[0];
  for (int64_t idx = begin; idx < end; ++idx) {
    Tile t = tile_at(p, idx);
    int64_t ldx, ldy;
    const float* x = xb.in(xv, p, t, &ldx);
    float* y = yb.out(yv, p, t, &ldy);
    int64_t cb = tile_channel_base(p, t), off = t.n * C;
    int cd = p.cdim();
    for (int64_t r = 0; r < t.R; ++r) {
      if (cd == 0) {
        norm_row<true, SILU>(x + r * ldx, y + r * ldy, t.L, coef<true>(M + off, cb), coef<true>(A + off, cb),
                             coef<true>(B + off, cb));
      } else {
        int64_t c = cd == 1 ? cb + r : cb;
        norm_row<false, SILU>(x + r * ldx, y + r * ldy, t.L, coef<false>(M + off, c), coef<false>(A + off, c),
                              coef<false>(B + off, c));
      }
    }
    yb.out_done(yv, p, t);
  }
}

void norm_tiles(bool silu, const Plan& p, const View& xv, const View& yv, int64_t begin, int64_t end,
                const float* M, const float* A, const float* B, TileBuf& xb, TileBuf& yb) {
  if (silu)
    norm_tiles_impl<true>(p, xv, yv, begin, end, M, A, B, xb, yb);
  else
    norm_tiles_impl<false>(p, xv, yv, begin, end, M, A, B, xb, yb);
}

// per-channel coefficients of group (n, g) from its accumulated statistics (of x + shift E)
void finish_group(const Welford& w, int64_t n, int64_t g, int64_t C, int64_t Cg, double eps, const float* wt,
                  const float* bs, const float* E, float* M, float* A, float* B, float* mean_out, float* rstd_out) {
  double var = w.n > 0 ? w.m2 / w.n : 0.0;
  if (var < 0) var = 0;
  double rs = 1.0 / std::sqrt(var + eps);
  *mean_out = static_cast<float>(w.mean);
  *rstd_out = static_cast<float>(rs);
  for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
    M[n * C + c] = static_cast<float>(w.mean - E[n * C + c]);  // (x + e - mean) = (x - (mean - e))
    A[n * C + c] = static_cast<float>(rs * wt[c]);
    B[n * C + c] = bs[c];
  }
}

}  // namespace

void gn_fwd(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
            const std::optional<Tensor>& shift, const Tensor& y, const Tensor& mean, const Tensor& rstd,
            int64_t num_groups, double eps, bool silu) {
  View xv = make_view(x, "x"), yv = make_view(y, "y");
  TORCH_CHECK(x.sizes() == y.sizes(), "hbkernels: gn_fwd: y must have the shape of x");
  const int64_t N = x.size(0), C = x.size(1), G = num_groups;
  TORCH_CHECK(G > 0 && C % G == 0, "hbkernels: num_groups must divide C");
  TORCH_CHECK(eps > 0, "hbkernels: eps must be positive");
  check_stats(mean, N, G, "mean");
  check_stats(rstd, N, G, "rstd");
  if (x.numel() == 0) {  // empty groups: mean 0, variance 0
    mean.fill_(0.0);
    rstd.fill_(1.0 / std::sqrt(eps));
    return;
  }
  const int64_t Cg = C / G;
  std::vector<float> wt = channel_vector(weight, C, 1.f), bs = channel_vector(bias, C, 0.f);
  std::vector<float> E = shift_vector(shift, N, C);
  std::vector<float> M(N * C), A(N * C), B(N * C);
  float* mean_p = mean.data_ptr<float>();
  float* rstd_p = rstd.data_ptr<float>();
  const int64_t ms0 = mean.stride(0), ms1 = mean.stride(1), rs0 = rstd.stride(0), rs1 = rstd.stride(1);

  const View* views[2] = {&xv, &yv};
  Plan p = make_plan(N, views, 2);
  const int nt = num_threads();
  const int64_t tasks = N * G;
  // Fused path: when channels are the outermost tile dim (contiguous-like layouts), one group's
  // tiles are consecutive, so a thread normalises a group right after reducing it (re-read hits
  // cache instead of memory). Needs enough groups for all threads.
  const bool fused = p.d2 == 0 && tasks >= nt && (tasks % nt == 0 || tasks >= 4 * nt);
  if (fused) {
    const int64_t per_channel = p.nb1 * p.nb0;
#pragma omp parallel num_threads(nt)
    {
      TileBuf xb(p), yb(p);
      std::vector<float> scratch(4 * p.B0 + 8);  // stats_cols: 4 * L
      std::vector<Welford> acc(static_cast<size_t>(tasks));  // only acc[task] is used per task
#pragma omp for schedule(static)
      for (int64_t task = 0; task < tasks; ++task) {
        int64_t n = task / G, g = task % G;
        int64_t b = (n * C + g * Cg) * per_channel, e = (n * C + (g + 1) * Cg) * per_channel;
        stats_tiles(p, xv, b, e, Cg, G, E.data(), acc.data(), xb, scratch);
        finish_group(acc[task], n, g, C, Cg, eps, wt.data(), bs.data(), E.data(), M.data(), A.data(), B.data(),
                     mean_p + n * ms0 + g * ms1, rstd_p + n * rs0 + g * rs1);
        norm_tiles(silu, p, xv, yv, b, e, M.data(), A.data(), B.data(), xb, yb);
      }
    }
    return;
  }

  // statistics read x alone: tile it for x's own layout (long contiguous rows), not the transpose
  const View* xonly[1] = {&xv};
  Plan ps = make_plan(N, xonly, 1);
  const int64_t ntiles = p.ntiles(), nstat = ps.ntiles();
  std::vector<Welford> acc(static_cast<size_t>(nt * tasks));
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    TileBuf xb(p), yb(p);
    int64_t b, e;
    {
      TileBuf sb(ps);
      std::vector<float> scratch(4 * ps.B0 + 8);
      thread_range(nstat, tid, team, b, e);
      stats_tiles(ps, xv, b, e, Cg, G, E.data(), acc.data() + tid * tasks, sb, scratch);
    }
    thread_range(ntiles, tid, team, b, e);
#pragma omp barrier
#pragma omp single
    {
      for (int64_t task = 0; task < tasks; ++task) {
        Welford w;
        for (int i = 0; i < team; ++i) w.merge(acc[i * tasks + task]);
        int64_t n = task / G, g = task % G;
        finish_group(w, n, g, C, Cg, eps, wt.data(), bs.data(), E.data(), M.data(), A.data(), B.data(),
                     mean_p + n * ms0 + g * ms1, rstd_p + n * rs0 + g * rs1);
      }
    }  // implicit barrier
    norm_tiles(silu, p, xv, yv, b, e, M.data(), A.data(), B.data(), xb, yb);
  }
}

// ------------------------------------------------------------------ backward
namespace {

struct BwdCoef {  // per (n, c) arrays, N*C each (W, Bi per channel only)
  const float *M, *R, *W, *Bi, *K1, *KA, *KB;
};

// dz = dy * silu'(z) with z = xhat * w + b (or dy without SiLU)
template <bool SILU>
inline F8 dz_of(F8 dy, F8 xh, F8 w, F8 b) {
  if constexpr (SILU) {
    F8 z = fmadd(xh, w, b);
    F8 s = set1(1.f) / (set1(1.f) + vexp(zero8() - z));
    return dy * (s * fmadd(z, set1(1.f) - s, set1(1.f)));
  }
  return dy;
}

// pass 1: per-row sums of dz and dz * xhat (VEC = channels along the row)
template <bool VEC, bool SILU>
inline void bwd_reduce_row(const float* x, const float* dy, int64_t L, Coef<VEC> m, Coef<VEC> r, Coef<VEC> w,
                           Coef<VEC> b, F8& sdz, F8& sdzx) {
  int64_t i = 0;
  for (; i + 8 <= L; i += 8) {
    F8 xh = (load8(x + i) - m.v(i)) * r.v(i);
    F8 dz = dz_of<SILU>(load8(dy + i), xh, w.v(i), b.v(i));
    sdz = sdz + dz;
    sdzx = fmadd(dz, xh, sdzx);
  }
  if (i < L) {
    int n = static_cast<int>(L - i);
    // lanes past n: dy loads 0 and xhat is masked to 0 (-mean * rstd may be inf: 0 * inf would be NaN)
    F8 xh = and_mask(lane_mask(n), (load_n(x + i, n) - m.vn(i, n)) * r.vn(i, n));
    F8 dz = dz_of<SILU>(load_n(dy + i, n), xh, w.vn(i, n), b.vn(i, n));
    sdz = sdz + dz;
    sdzx = fmadd(dz, xh, sdzx);
  }
}

template <bool SILU>
void bwd_reduce_tiles(const Plan& p, const View& xv, const View& dyv, int64_t begin, int64_t end, const BwdCoef& k,
                      double* sum_dz, double* sum_dzx, TileBuf& xb, TileBuf& db, std::vector<float>& scratch) {
  const int64_t C = p.size[0];
  for (int64_t idx = begin; idx < end; ++idx) {
    Tile t = tile_at(p, idx);
    int64_t ldx, ldd;
    const float* x = xb.in(xv, p, t, &ldx);
    const float* dy = db.in(dyv, p, t, &ldd);
    int64_t cb = tile_channel_base(p, t), off = t.n * C;
    int cd = p.cdim();
    if (cd == 0) {  // columns are channels: accumulate per column across rows
      float* a1 = scratch.data();
      float* a2 = a1 + t.L;
      for (int64_t c = 0; c < t.L; ++c) a1[c] = a2[c] = 0.f;
      for (int64_t r = 0; r < t.R; ++r) {
        const float* xr = x + r * ldx;
        const float* dr = dy + r * ldd;
        auto m = coef<true>(k.M + off, cb), rr = coef<true>(k.R + off, cb), w = coef<true>(k.W, cb),
             b = coef<true>(k.Bi, cb);
        int64_t i = 0;
        for (; i + 8 <= t.L; i += 8) {
          F8 xh = (load8(xr + i) - m.v(i)) * rr.v(i);
          F8 dz = dz_of<SILU>(load8(dr + i), xh, w.v(i), b.v(i));
          store8(a1 + i, load8(a1 + i) + dz);
          store8(a2 + i, fmadd(dz, xh, load8(a2 + i)));
        }
        if (i < t.L) {
          int n = static_cast<int>(t.L - i);
          F8 xh = (load_n(xr + i, n) - m.vn(i, n)) * rr.vn(i, n);
          F8 dz = dz_of<SILU>(load_n(dr + i, n), xh, w.vn(i, n), b.vn(i, n));
          store_n(a1 + i, load_n(a1 + i, n) + dz, n);
          store_n(a2 + i, fmadd(dz, xh, load_n(a2 + i, n)), n);
        }
      }
      for (int64_t c = 0; c < t.L; ++c) {
        sum_dz[off + cb + c] += a1[c];
        sum_dzx[off + cb + c] += a2[c];
      }
    } else {
      for (int64_t r = 0; r < t.R; ++r) {
        int64_t c = cd == 1 ? cb + r : cb;
        F8 s1 = zero8(), s2 = zero8();
        bwd_reduce_row<false, SILU>(x + r * ldx, dy + r * ldd, t.L, coef<false>(k.M + off, c),
                                    coef<false>(k.R + off, c), coef<false>(k.W, c), coef<false>(k.Bi, c), s1, s2);
        sum_dz[off + c] += hsum(s1);
        sum_dzx[off + c] += hsum(s2);
      }
    }
  }
}

// pass 2: dx = k1 * dz + (xhat * kb + ka)
template <bool VEC, bool SILU>
inline void bwd_apply_row(const float* x, const float* dy, float* dx, int64_t L, Coef<VEC> m, Coef<VEC> r,
                          Coef<VEC> w, Coef<VEC> b, Coef<VEC> k1, Coef<VEC> ka, Coef<VEC> kb) {
  int64_t i = 0;
  for (; i + 8 <= L; i += 8) {
    F8 xh = (load8(x + i) - m.v(i)) * r.v(i);
    F8 dz = dz_of<SILU>(load8(dy + i), xh, w.v(i), b.v(i));
    store8(dx + i, fmadd(k1.v(i), dz, fmadd(xh, kb.v(i), ka.v(i))));
  }
  if (i < L) {
    int n = static_cast<int>(L - i);
    F8 xh = (load_n(x + i, n) - m.vn(i, n)) * r.vn(i, n);
    F8 dz = dz_of<SILU>(load_n(dy + i, n), xh, w.vn(i, n), b.vn(i, n));
    store_n(dx + i, fmadd(k1.vn(i, n), dz, fmadd(xh, kb.vn(i, n), ka.vn(i, n))), n);
  }
}

template <bool SILU>
void bwd_apply_tiles(const Plan& p, const View& xv, const View& dyv, const View& dxv, int64_t begin, int64_t end,
                     const BwdCoef& k, TileBuf& xb, TileBuf& db, TileBuf& ob) {
  const int64_t C = p.size[0];
  for (int64_t idx = begin; idx < end; ++idx) {
    Tile t = tile_at(p, idx);
    int64_t ldx, ldd, ldo;
    const float* x = xb.in(xv, p, t, &ldx);
    const float* dy = db.in(dyv, p, t, &ldd);
    float* dx = ob.out(dxv, p, t, &ldo);
    int64_t cb = tile_channel_base(p, t), off = t.n * C;
    int cd = p.cdim();
    for (int64_t r = 0; r < t.R; ++r) {
      if (cd == 0) {
        bwd_apply_row<true, SILU>(x + r * ldx, dy + r * ldd, dx + r * ldo, t.L, coef<true>(k.M + off, cb),
                                  coef<true>(k.R + off, cb), coef<true>(k.W, cb), coef<true>(k.Bi, cb),
                                  coef<true>(k.K1 + off, cb), coef<true>(k.KA + off, cb),
                                  coef<true>(k.KB + off, cb));
      } else {
        int64_t c = cd == 1 ? cb + r : cb;
        bwd_apply_row<false, SILU>(x + r * ldx, dy + r * ldd, dx + r * ldo, t.L, coef<false>(k.M + off, c),
                                   coef<false>(k.R + off, c), coef<false>(k.W, c), coef<false>(k.Bi, c),
                                   coef<false>(k.K1 + off, c), coef<false>(k.KA + off, c),
                                   coef<false>(k.KB + off, c));
      }
    }
    ob.out_done(dxv, p, t);
  }
}

}  // namespace

void gn_bwd(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
            const std::optional<Tensor>& shift, const Tensor& mean, const Tensor& rstd, const Tensor& dx,
            const std::optional<Tensor>& dweight, const std::optional<Tensor>& dbias, int64_t num_groups, bool silu) {
  View dyv = make_view(dy, "dy"), xv = make_view(x, "x"), dxv = make_view(dx, "dx");
  TORCH_CHECK(x.sizes() == dy.sizes() && x.sizes() == dx.sizes(), "hbkernels: gn_bwd: dy/x/dx shapes differ");
  const int64_t N = x.size(0), C = x.size(1), G = num_groups;
  TORCH_CHECK(G > 0 && C % G == 0, "hbkernels: num_groups must divide C");
  check_stats(mean, N, G, "mean");
  check_stats(rstd, N, G, "rstd");
  const bool want_w = dweight.has_value() && dweight->defined();
  const bool want_b = dbias.has_value() && dbias->defined();
  // written at c * stride(0): a (1, C) tensor would be written past its end
  if (want_w)
    TORCH_CHECK(dweight->scalar_type() == at::kFloat && dweight->dim() == 1 && dweight->size(0) == C,
                "hbkernels: dweight must be float32 of shape (C,) = (", C, ",), got ", dweight->sizes());
  if (want_b)
    TORCH_CHECK(dbias->scalar_type() == at::kFloat && dbias->dim() == 1 && dbias->size(0) == C,
                "hbkernels: dbias must be float32 of shape (C,) = (", C, ",), got ", dbias->sizes());
  const int64_t Cg = C / G;
  const double cnt = static_cast<double>(Cg) * x.size(2) * x.size(3);
  std::vector<float> W = channel_vector(weight, C, 1.f), Bi = channel_vector(bias, C, 0.f);
  std::vector<float> M = shift_vector(shift, N, C), R(N * C), K1(N * C), KA(N * C), KB(N * C);
  const float* mean_p = mean.data_ptr<float>();
  const float* rstd_p = rstd.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      M[n * C + c] = mean_p[n * mean.stride(0) + (c / Cg) * mean.stride(1)] - M[n * C + c];  // mean - shift
      R[n * C + c] = rstd_p[n * rstd.stride(0) + (c / Cg) * rstd.stride(1)];
    }
  BwdCoef k{M.data(), R.data(), W.data(), Bi.data(), K1.data(), KA.data(), KB.data()};

  // tot[0, N*C): sum of dz per (n, c); tot[N*C, 2*N*C): sum of dz * xhat
  std::vector<double> tot(2 * N * C, 0.0);
  auto finish_group = [&](int64_t n, int64_t g) {  // dx coefficients of group (n, g)
    const double* sdz = tot.data();
    const double* sdzx = tot.data() + N * C;
    double a = 0, bb = 0;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      a += W[c] * sdz[n * C + c];
      bb += W[c] * sdzx[n * C + c];
    }
    a /= cnt;
    bb /= cnt;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      double rs = R[n * C + c];
      K1[n * C + c] = static_cast<float>(rs * W[c]);
      KA[n * C + c] = static_cast<float>(-rs * a);
      KB[n * C + c] = static_cast<float>(-rs * bb);
    }
  };
  auto write_affine_grads = [&]() {
    if (!want_w && !want_b) return;
    float* dw = want_w ? dweight->data_ptr<float>() : nullptr;
    float* dbp = want_b ? dbias->data_ptr<float>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      double aw = 0, ab = 0;
      for (int64_t n = 0; n < N; ++n) {
        aw += tot[N * C + n * C + c];
        ab += tot[n * C + c];
      }
      if (dw) dw[c * dweight->stride(0)] = static_cast<float>(aw);
      if (dbp) dbp[c * dbias->stride(0)] = static_cast<float>(ab);
    }
  };
  if (x.numel() == 0) {
    write_affine_grads();
    return;
  }

  const View* views[3] = {&xv, &dyv, &dxv};
  Plan p = make_plan(N, views, 3);
  const int nt = num_threads();
  const int64_t tasks = N * G;
  // Fused path (see gn_fwd): a group's tiles are consecutive, so each thread reduces a group and
  // applies it right away while x/dy are still in cache; each group owns its (n, c) sums.
  const bool fused = p.d2 == 0 && tasks >= nt && (tasks % nt == 0 || tasks >= 4 * nt);
  if (fused) {
    const int64_t per_channel = p.nb1 * p.nb0;
#pragma omp parallel num_threads(nt)
    {
      TileBuf xb(p), db(p), ob(p);
      std::vector<float> scratch(2 * p.B0 + 8);
#pragma omp for schedule(static)
      for (int64_t task = 0; task < tasks; ++task) {
        int64_t n = task / G, g = task % G;
        int64_t b = (n * C + g * Cg) * per_channel, e = (n * C + (g + 1) * Cg) * per_channel;
        double* s1 = tot.data();
        double* s2 = tot.data() + N * C;
        if (silu)
          bwd_reduce_tiles<true>(p, xv, dyv, b, e, k, s1, s2, xb, db, scratch);
        else
          bwd_reduce_tiles<false>(p, xv, dyv, b, e, k, s1, s2, xb, db, scratch);
        finish_group(n, g);
        if (silu)
          bwd_apply_tiles<true>(p, xv, dyv, dxv, b, e, k, xb, db, ob);
        else
          bwd_apply_tiles<false>(p, xv, dyv, dxv, b, e, k, xb, db, ob);
      }
    }
    write_affine_grads();
    return;
  }

  const int64_t ntiles = p.ntiles();
  std::vector<double> sums(static_cast<size_t>(nt) * 2 * N * C, 0.0);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    TileBuf xb(p), db(p), ob(p);
    std::vector<float> scratch(2 * p.B0 + 8);
    int64_t b, e;
    thread_range(ntiles, tid, team, b, e);
    double* s1 = sums.data() + static_cast<size_t>(tid) * 2 * N * C;
    double* s2 = s1 + N * C;
    if (silu)
      bwd_reduce_tiles<true>(p, xv, dyv, b, e, k, s1, s2, xb, db, scratch);
    else
      bwd_reduce_tiles<false>(p, xv, dyv, b, e, k, s1, s2, xb, db, scratch);
#pragma omp barrier
#pragma omp single
    {
      for (int i = 0; i < team; ++i)
        for (int64_t j = 0; j < 2 * N * C; ++j) tot[j] += sums[static_cast<size_t>(i) * 2 * N * C + j];
      for (int64_t n = 0; n < N; ++n)
        for (int64_t g = 0; g < G; ++g) finish_group(n, g);
    }  // implicit barrier
    if (silu)
      bwd_apply_tiles<true>(p, xv, dyv, dxv, b, e, k, xb, db, ob);
    else
      bwd_apply_tiles<false>(p, xv, dyv, dxv, b, e, k, xb, db, ob);
  }
  write_affine_grads();
}

// ------------------------------------------------------------------ copy_add
// row `row` of tile t += bias[channel]: channels run along the row (cdim 0), one per row (cdim 1),
// or one per tile (cdim 2)
inline void add_channel_bias(float* orow, const float* bias, const Plan& p, const Tile& t, int64_t row) {
  const int cd = p.cdim();
  if (cd == 0) {
    const float* b = bias + t.c0;
    int64_t i = 0;
    for (; i + 8 <= t.L; i += 8) store8(orow + i, load8(orow + i) + load8(b + i));
    for (; i < t.L; ++i) orow[i] += b[i];
    return;
  }
  const float v = bias[cd == 1 ? t.r0 + row : t.i2];
  const F8 vv = set1(v);
  int64_t i = 0;
  for (; i + 8 <= t.L; i += 8) store8(orow + i, load8(orow + i) + vv);
  for (; i < t.L; ++i) orow[i] += v;
}

void copy_add(const Tensor& src, const std::optional<Tensor>& residual, const std::optional<Tensor>& bias,
              const Tensor& out) {
  View sv = make_view(src, "src"), ov = make_view(out, "out");
  TORCH_CHECK(src.sizes() == out.sizes(), "hbkernels: copy_add: src/out shapes differ");
  const bool has_res = residual.has_value() && residual->defined();
  View rv;
  if (has_res) {
    rv = make_view(*residual, "residual");
    TORCH_CHECK(residual->sizes() == out.sizes(), "hbkernels: copy_add: residual/out shapes differ");
  }
  const float* bv = nullptr;  // per channel, added after the sum
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->dim() == 1 &&
                    bias->size(0) == out.size(1) && bias->device().is_cpu(),
                "hbkernels: copy_add: bias must be a contiguous float32 CPU tensor of C = ", out.size(1), " elements");
    bv = bias->data_ptr<float>();
  }
  if (out.numel() == 0) return;
  // out is primary: its stores stay sequential; src (e.g. tokens) is transposed through L1
  const View* views[3] = {&ov, &sv, &rv};
  Plan p = make_plan(src.size(0), views, has_res ? 3 : 2);
  const int nt = num_threads();
  const int64_t ntiles = p.ntiles();
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    TileBuf sb(p), rb(p), ob(p);
    int64_t b, e;
    thread_range(ntiles, tid, team, b, e);
    for (int64_t idx = b; idx < e; ++idx) {
      Tile t = tile_at(p, idx);
      int64_t lds, ldr = 0, ldo;
      const float* s = sb.in(sv, p, t, &lds);
      const float* r = has_res ? rb.in(rv, p, t, &ldr) : nullptr;
      float* o = ob.out(ov, p, t, &ldo);
      for (int64_t row = 0; row < t.R; ++row) {
        const float* sr = s + row * lds;
        float* orow = o + row * ldo;
        if (r) {
          const float* rr = r + row * ldr;
          int64_t i = 0;
          for (; i + 8 <= t.L; i += 8) store8(orow + i, load8(sr + i) + load8(rr + i));
          for (; i < t.L; ++i) orow[i] = sr[i] + rr[i];
        } else if (orow != sr) {
          int64_t i = 0;
          for (; i + 8 <= t.L; i += 8) store8(orow + i, load8(sr + i));
          for (; i < t.L; ++i) orow[i] = sr[i];
        }
        if (bv) add_channel_bias(orow, bv, p, t, row);
      }
      ob.out_done(ov, p, t);
    }
  }
}

}  // namespace hb
