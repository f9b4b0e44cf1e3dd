// Tiling engine for elementwise/reduction kernels over (N, C, T, S) strided views.
//
// Every tensor is a 4D view with arbitrary strides. Per batch index n the (C, T, S) space is cut
// into 2D tiles: d0 (tile columns) is the primary tensor's unit-stride dim, d1 (tile rows) is the
// unit-stride dim of another tensor when their layouts differ (the tile is then a transpose) or
// the primary's next-innermost dim, and d2 is fixed per tile. A kernel sees each tensor's tile as
// fp32 rows (R x L with a row stride): fp32 tensors whose d0 stride is 1 are used in place, the
// rest are converted/transposed through a small per-thread buffer that stays in L1/L2.
#pragma once

#include <vector>

#include "common.h"

namespace hb {

struct View {  // a tensor seen as (N, C, T, S); dims 0..2 below mean (C, T, S)
  char* data = nullptr;
  at::ScalarType dt = at::kFloat;
  int64_t esize = 4;
  int64_t sn = 0;
  int64_t size[3] = {1, 1, 1};
  int64_t s[3] = {0, 0, 0};
};

inline View make_view(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "hbkernels: ", name, " must be a 4D (N, C, T, S) view, got ", t.dim(), "D");
  check_float(t, name);
  View v;
  v.data = static_cast<char*>(t.data_ptr());
  v.dt = t.scalar_type();
  v.esize = static_cast<int64_t>(t.element_size());
  v.sn = t.stride(0);
  for (int d = 0; d < 3; ++d) {
    v.size[d] = t.size(d + 1);
    v.s[d] = t.stride(d + 1);
  }
  return v;
}

// The dim (0..2) to walk innermost for v: unit stride if any (ignoring size-1 dims), else smallest.
inline int inner_dim(const View& v) {
  int best = -1;
  for (int d = 2; d >= 0; --d) {
    if (v.size[d] <= 1) continue;
    int64_t sd = v.s[d] < 0 ? -v.s[d] : v.s[d];
    if (best < 0) {
      best = d;
      continue;
    }
    int64_t sb = v.s[best] < 0 ? -v.s[best] : v.s[best];
    if (sd < sb) best = d;
  }
  return best < 0 ? 2 : best;
}

struct Plan {
  int64_t N = 1;
  int64_t size[3] = {1, 1, 1};
  int d0 = 2, d1 = 1, d2 = 0;
  int64_t B0 = 1, B1 = 1, nb0 = 1, nb1 = 1;
  bool transposed = false;
  int64_t ntiles() const { return N * size[d2] * nb1 * nb0; }
  // which tile axis carries the channel dim (C is dim 0): 0 columns, 1 rows, 2 fixed per tile
  int cdim() const { return d0 == 0 ? 0 : (d1 == 0 ? 1 : 2); }
};

// views[0] is the primary tensor (read most); the others may force a transposed tile.
inline Plan make_plan(int64_t N, const View* const* views, int nviews, int64_t tile_elems = 8192) {
  Plan p;
  p.N = N;
  for (int d = 0; d < 3; ++d) p.size[d] = views[0]->size[d];
  p.d0 = inner_dim(*views[0]);
  p.d1 = -1;
  for (int i = 1; i < nviews; ++i) {
    int d = inner_dim(*views[i]);
    if (d != p.d0 && p.size[d] > 1 && views[i]->s[d] == 1) {
      p.d1 = d;
      p.transposed = true;
      break;
    }
  }
  if (p.d1 < 0 && p.d0 != 0) {
    // channels not innermost: keep C as the per-tile dim, so one channel's (or group's) tiles are
    // consecutive (GroupNorm then reduces and normalises a group back to back, in cache)
    p.d1 = 3 - p.d0;  // the dim that is neither d0 nor C (d0 is 1 or 2)
  }
  if (p.d1 < 0) {  // primary's next-innermost dim
    int a = (p.d0 + 1) % 3, b = (p.d0 + 2) % 3;
    auto key = [&](int d) {
      int64_t sd = views[0]->s[d] < 0 ? -views[0]->s[d] : views[0]->s[d];
      return p.size[d] <= 1 ? INT64_MAX : sd;
    };
    p.d1 = key(a) <= key(b) ? a : b;
  }
  p.d2 = 3 - p.d0 - p.d1;
  if (p.transposed) {
    // 128 x 128 fp32 = 64 KiB: L2-resident, long enough runs on both sides (measured best on Zen 3)
    p.B0 = std::min<int64_t>(p.size[p.d0], 128);
    p.B1 = std::min<int64_t>(p.size[p.d1], 128);
  } else {
    p.B0 = std::min<int64_t>(p.size[p.d0], 4096);
    p.B1 = std::max<int64_t>(1, std::min<int64_t>(p.size[p.d1], tile_elems / p.B0));
  }
  p.nb0 = ceil_div(p.size[p.d0], p.B0);
  p.nb1 = ceil_div(p.size[p.d1], p.B1);
  return p;
}

struct Tile {
  int64_t n, i2, r0, R, c0, L;  // batch, index along d2, rows [r0, r0+R) of d1, cols [c0, c0+L) of d0
};

inline Tile tile_at(const Plan& p, int64_t idx) {
  Tile t;
  int64_t b0 = idx % p.nb0;
  idx /= p.nb0;
  int64_t b1 = idx % p.nb1;
  idx /= p.nb1;
  t.i2 = idx % p.size[p.d2];
  t.n = idx / p.size[p.d2];
  t.c0 = b0 * p.B0;
  t.L = std::min(p.B0, p.size[p.d0] - t.c0);
  t.r0 = b1 * p.B1;
  t.R = std::min(p.B1, p.size[p.d1] - t.r0);
  return t;
}

// channel index of tile element (r, col) for the plan's cdim: base + r * rstep + col * cstep
inline int64_t tile_channel_base(const Plan& p, const Tile& t) {
  return p.d0 == 0 ? t.c0 : (p.d1 == 0 ? t.r0 : t.i2);
}

inline int64_t tile_offset(const View& v, const Plan& p, const Tile& t) {
  return t.n * v.sn + t.i2 * v.s[p.d2] + t.r0 * v.s[p.d1] + t.c0 * v.s[p.d0];
}

inline bool tile_direct(const View& v, const Plan& p) { return v.dt == at::kFloat && v.s[p.d0] == 1; }

// buf (R x L, row stride ld, fp32) <- tile of a tensor with element strides s0 (columns), s1 (rows)
template <typename T>
inline void gather_t(const T* base, int64_t s0, int64_t s1, int64_t R, int64_t L, float* buf, int64_t ld) {
  if (s0 == 1) {
    for (int64_t r = 0; r < R; ++r) load_row(base + r * s1, buf + r * ld, L);
  } else if (s1 == 1) {  // transpose: the source is contiguous along rows; 8x8 blocks in registers
    int64_t r = 0;
    for (; r + 8 <= R; r += 8) {
      int64_t c = 0;
      for (; c + 8 <= L; c += 8) {
        F8 v[8];
        for (int k = 0; k < 8; ++k) v[k] = load8(base + (c + k) * s0 + r);
        transpose8(v);
        for (int k = 0; k < 8; ++k) store8(buf + (r + k) * ld + c, v[k]);
      }
      for (; c < L; ++c)
        for (int64_t k = 0; k < 8; ++k) buf[(r + k) * ld + c] = to_f(base[c * s0 + r + k]);
    }
    for (; r < R; ++r)
      for (int64_t c = 0; c < L; ++c) buf[r * ld + c] = to_f(base[c * s0 + r]);
  } else {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < L; ++c) buf[r * ld + c] = to_f(base[r * s1 + c * s0]);
  }
}

// tile of a tensor (strides s0 columns, s1 rows) <- buf (R x L, row stride ld, fp32)
template <typename T>
inline void scatter_t(T* base, int64_t s0, int64_t s1, int64_t R, int64_t L, const float* buf, int64_t ld) {
  if (s0 == 1) {
    for (int64_t r = 0; r < R; ++r) store_row(base + r * s1, buf + r * ld, L);
  } else if (s1 == 1) {  // transpose: the destination is contiguous along rows
    int64_t c = 0;
    for (; c + 8 <= L; c += 8) {
      int64_t r = 0;
      for (; r + 8 <= R; r += 8) {
        F8 v[8];
        for (int k = 0; k < 8; ++k) v[k] = load8(buf + (r + k) * ld + c);
        transpose8(v);
        for (int k = 0; k < 8; ++k) store8(base + (c + k) * s0 + r, v[k]);
      }
      for (; r < R; ++r)
        for (int64_t k = 0; k < 8; ++k) base[(c + k) * s0 + r] = from_f<T>(buf[r * ld + c + k]);
    }
    for (; c < L; ++c)
      for (int64_t r = 0; r < R; ++r) base[c * s0 + r] = from_f<T>(buf[r * ld + c]);
  } else {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < L; ++c) base[r * s1 + c * s0] = from_f<T>(buf[r * ld + c]);
  }
}

// Per-thread scratch for one tensor's tile.
struct TileBuf {
  std::vector<float> buf;
  explicit TileBuf(const Plan& p) : buf(static_cast<size_t>(p.B0 * p.B1 + 8)) {}

  // fp32 rows of v's tile; *ld receives the row stride
  const float* in(const View& v, const Plan& p, const Tile& t, int64_t* ld) {
    int64_t off = tile_offset(v, p, t);
    if (tile_direct(v, p)) {
      *ld = v.s[p.d1];
      return reinterpret_cast<const float*>(v.data) + off;
    }
    *ld = t.L;
    dispatch_float(v.dt, [&](auto tag) {
      using T = decltype(tag);
      gather_t(reinterpret_cast<const T*>(v.data) + off, v.s[p.d0], v.s[p.d1], t.R, t.L, buf.data(), t.L);
    });
    return buf.data();
  }
  // where the kernel writes v's tile (in place when possible); call out_done afterwards
  float* out(const View& v, const Plan& p, const Tile& t, int64_t* ld) {
    if (tile_direct(v, p)) {
      *ld = v.s[p.d1];
      return reinterpret_cast<float*>(v.data) + tile_offset(v, p, t);
    }
    *ld = t.L;
    return buf.data();
  }
  void out_done(const View& v, const Plan& p, const Tile& t) {
    if (tile_direct(v, p)) return;
    int64_t off = tile_offset(v, p, t);
    dispatch_float(v.dt, [&](auto tag) {
      using T = decltype(tag);
      scatter_t(reinterpret_cast<T*>(v.data) + off, v.s[p.d0], v.s[p.d1], t.R, t.L, buf.data(), t.L);
    });
  }
};

}  // namespace hb
