// Temporal attention (softmax(q k^T * scale) v over the frame axis), forward and backward.
//
// q/k/v/out are (N, T, H, D) views with unit stride along D; each (n, h) pair is an independent
// small attention problem (T is the frame count) run by one thread, over N*H in parallel. fp32
// rows with D % 8 == 0 are used in place (other dtypes/widths go through zero-padded fp32 buffers);
// scores/probabilities for a block of up to 64 query rows live in an L1/L2 buffer; the products are
// register-blocked FMA kernels; the next head's rows are prefetched while one computes.
// Backward: dS = P * (dP - delta) * scale, dQ = dS K, dK = dS^T Q, dV = P^T dO, with P recomputed
// as the forward's softmax and delta = rowsum(P * dP) (see attn_bwd_impl).
#include <omp.h>

#include <type_traits>
#include <vector>

#include "ops.h"

namespace hb {
namespace {

constexpr int64_t kBlockQ = 64;

struct Heads {  // an (N, T, H, D) tensor with stride(-1) == 1
  char* data;
  int64_t es, sN, sT, sH;
  template <typename T>
  T* row(int64_t n, int64_t t, int64_t h) const {
    return reinterpret_cast<T*>(data + (n * sN + t * sT + h * sH) * es);
  }
};

Heads heads(const Tensor& t, const char* name, const Tensor& like) {
  check_float(t, name);
  TORCH_CHECK(t.dim() == 4, "hbkernels: ", name, " must be 4D (N, T, H, D)");
  TORCH_CHECK(t.sizes() == like.sizes(), "hbkernels: ", name, " must have the shape of q");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "hbkernels: ", name, " must have the dtype of q");
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "hbkernels: ", name, " must have stride(-1) == 1");
  return Heads{static_cast<char*>(t.data_ptr()), static_cast<int64_t>(t.element_size()), t.stride(0), t.stride(1),
               t.stride(2)};
}

// C[i][j] = sum_d A[i][d] B[j][d] for i < M, j < N; Kd % 8 == 0 (rows zero-padded past the true D).
// Register block: 2 rows of A x 4 rows of B, the 8 dot products reduced together.
void gemm_nt(int64_t M, int64_t N, int64_t Kd, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc) {
  for (int64_t i = 0; i < M; i += 2) {
    const float* a0 = A + i * lda;
    const float* a1 = i + 1 < M ? a0 + lda : a0;
    for (int64_t j = 0; j < N; j += 4) {
      const int64_t nc = std::min<int64_t>(4, N - j);
      const float* b[4];
      for (int c = 0; c < 4; ++c) b[c] = B + std::min<int64_t>(j + c, N - 1) * ldb;  // clamp: no reads past N
      F8 acc[8] = {zero8(), zero8(), zero8(), zero8(), zero8(), zero8(), zero8(), zero8()};
      for (int64_t d = 0; d < Kd; d += 8) {
        F8 x0 = load8(a0 + d), x1 = load8(a1 + d);
        for (int c = 0; c < 4; ++c) {
          F8 y = load8(b[c] + d);
          acc[c] = fmadd(x0, y, acc[c]);
          acc[4 + c] = fmadd(x1, y, acc[4 + c]);
        }
      }
      float r0[4], r1[4];
      reduce_2x4(acc, r0, r1);
      for (int c = 0; c < nc; ++c) C[i * ldc + j + c] = r0[c];
      if (i + 1 < M)
        for (int c = 0; c < nc; ++c) C[(i + 1) * ldc + j + c] = r1[c];
    }
  }
}

// C[i][j..] (+)= sum_k A(i, k) B[k][j..] for i < M, j < N (N % 8 == 0); A(i, k) = A[i * sai + k * sak].
// The k's are summed kChunkK at a time in registers, each chunk then added to C: rounding error grows
// with K / kChunkK + kChunkK instead of K (a causal key's dK/dV row sums over every later query: one
// 200-term chain gave 2-2.4x the error of torch's matmul, chunks of 16 about 0.7x).
constexpr int64_t kChunkK = 16;
template <int MR, int NV>
inline void nn_block(int64_t K, const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb, float* C,
                     int64_t ldc, bool acc_in) {
  for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
    const int64_t k1 = std::min(K, k0 + kChunkK);
    F8 acc[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = zero8();
    for (int64_t k = k0; k < k1; ++k) {
      F8 b[NV];
      for (int v = 0; v < NV; ++v) b[v] = load8(B + k * ldb + 8 * v);
      for (int r = 0; r < MR; ++r) {
        F8 a = set1(A[r * sai + k * sak]);
        for (int v = 0; v < NV; ++v) acc[r][v] = fmadd(a, b[v], acc[r][v]);
      }
    }
    const bool add = acc_in || k0 > 0;
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) {
        float* c = C + r * ldc + 8 * v;
        store8(c, add ? load8(c) + acc[r][v] : acc[r][v]);
      }
  }
}

template <int MR>
inline void nn_rows(int64_t N, int64_t K, const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb,
                    float* C, int64_t ldc, bool acc_in) {
  int64_t j = 0;
  for (; j + 16 <= N; j += 16) nn_block<MR, 2>(K, A, sai, sak, B + j, ldb, C + j, ldc, acc_in);
  for (; j < N; j += 8) nn_block<MR, 1>(K, A, sai, sak, B + j, ldb, C + j, ldc, acc_in);
}

void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb,
             float* C, int64_t ldc, bool acc_in) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) nn_rows<4>(N, K, A + i * sai, sai, sak, B, ldb, C + i * ldc, ldc, acc_in);
  switch (M - i) {
    case 3:
      nn_rows<3>(N, K, A + i * sai, sai, sak, B, ldb, C + i * ldc, ldc, acc_in);
      break;
    case 2:
      nn_rows<2>(N, K, A + i * sai, sai, sak, B, ldb, C + i * ldc, ldc, acc_in);
      break;
    case 1:
      nn_rows<1>(N, K, A + i * sai, sai, sak, B, ldb, C + i * ldc, ldc, acc_in);
      break;
    default:
      break;
  }
}

// Prefetch rows [0, T) of head (n, h) (D elements of es bytes each) into cache.
inline void prefetch_head(const Heads& t, int64_t n, int64_t h, int64_t T_, int64_t bytes, bool write) {
  for (int64_t r = 0; r < T_; ++r) {
    const char* p = t.data + (n * t.sN + r * t.sT + h * t.sH) * t.es;
    for (int64_t o = 0; o < bytes; o += 64) write ? prefetch_w(p + o) : prefetch_r(p + o);
  }
}

template <typename T>
void load_rows(const Heads& t, int64_t n, int64_t h, int64_t t0, int64_t count, int64_t D, float* buf, int64_t ld) {
  for (int64_t r = 0; r < count; ++r) load_row(t.row<const T>(n, t0 + r, h), buf + r * ld, D);
}
template <typename T>
void store_rows(const Heads& t, int64_t n, int64_t h, int64_t t0, int64_t count, int64_t D, const float* buf,
                int64_t ld) {
  for (int64_t r = 0; r < count; ++r) store_row(t.row<T>(n, t0 + r, h), buf + r * ld, D);
}

// fp32 rows [t0, t0 + count) of head (n, h): in place (row stride t.sT) when the tensor is fp32 and
// D % 8 == 0, else converted into buf (stride Dp, columns D..Dp stay zero).
template <typename T>
const float* rows_in(const Heads& t, int64_t n, int64_t h, int64_t t0, int64_t count, int64_t D, int64_t Dp,
                     float* buf, int64_t* ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (D == Dp) {
      *ld = t.sT;
      return t.row<const float>(n, t0, h);
    }
  }
  load_rows<T>(t, n, h, t0, count, D, buf, Dp);
  *ld = Dp;
  return buf;
}
// where to compute output rows: in place when possible (then out_rows_done is a no-op)
template <typename T>
float* rows_out(const Heads& t, int64_t n, int64_t h, int64_t t0, int64_t D, int64_t Dp, float* buf, int64_t* ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (D == Dp) {
      *ld = t.sT;
      return t.row<float>(n, t0, h);
    }
  }
  *ld = Dp;
  return buf;
}
template <typename T>
void rows_out_done(const Heads& t, int64_t n, int64_t h, int64_t t0, int64_t count, int64_t D, int64_t Dp,
                   const float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (D == Dp) return;
  }
  store_rows<T>(t, n, h, t0, count, D, buf, Dp);
}

inline void scale_row(float* row, int64_t n, float s) {
  F8 sv = set1(s);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) store8(row + j, load8(row + j) * sv);
  for (; j < n; ++j) row[j] *= s;
}

// row[0, lim) <- exp(row - sub), row[lim, kend) <- 0; returns the sum of the exps
inline float exp_row(float* row, int64_t lim, int64_t kend, float sub) {
  F8 nsb = set1(-sub), acc = zero8();
  int64_t j = 0;
  for (; j + 8 <= lim; j += 8) {
    F8 e = vexp(load8(row + j) + nsb);
    store8(row + j, e);
    acc = acc + e;
  }
  if (j < lim) {
    int m = static_cast<int>(lim - j);
    F8 e = and_mask(lane_mask(m), vexp(load_n(row + j, m) + nsb));
    store_n(row + j, e, m);
    acc = acc + e;
  }
  if (kend > lim) std::fill(row + lim, row + kend, 0.f);
  return hsum(acc);
}

inline float row_max(const float* row, int64_t lim) {
  F8 m = set1(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= lim; j += 8) m = vmax(m, load8(row + j));
  float mm = hmax(m);
  for (; j < lim; ++j) mm = std::max(mm, row[j]);
  return mm;
}

// row <- softmax(row * scale) over [0, lim), 0 over [lim, kend). The scores are scaled (rounded) before
// their max is taken: exp(fma(s, scale, -max)) of unrounded products put the max's own exponent below
// -87 once scores pass ~1e9 with a scale that is not a power of two, and the row became 0 / 0.
inline void softmax_row(float* row, int64_t lim, int64_t kend, float scale) {
  scale_row(row, lim, scale);
  scale_row(row, lim, 1.f / exp_row(row, lim, kend, row_max(row, lim)));
}

template <typename T>
void attn_fwd_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, float scale, bool causal) {
  const int64_t N = q.size(0), T_ = q.size(1), H = q.size(2), D = q.size(3);
  Heads Q = heads(q, "q", q), K = heads(k, "k", q), V = heads(v, "v", q), O = heads(out, "out", q);
  const int64_t Dp = round_up(D, 8), Tp = round_up(T_, 8), Bq = std::min(kBlockQ, T_);
  const int nt = num_threads();
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> kb(Tp * Dp, 0.f), vb(Tp * Dp, 0.f), qb(Bq * Dp, 0.f), ob(Bq * Dp, 0.f), sb(Bq * Tp, 0.f);
#pragma omp for schedule(static)
    for (int64_t nh = 0; nh < N * H; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      if (nh + 1 < N * H) {  // the next head's rows stream in while this one computes
        const int64_t n1 = (nh + 1) / H, h1 = (nh + 1) % H, bytes = D * Q.es;
        prefetch_head(Q, n1, h1, T_, bytes, false);
        if (K.data != Q.data || K.sT != Q.sT) prefetch_head(K, n1, h1, T_, bytes, false);
        if (V.data != Q.data || V.sT != Q.sT) prefetch_head(V, n1, h1, T_, bytes, false);
        prefetch_head(O, n1, h1, T_, bytes, true);
      }
      int64_t ldk, ldv, ldq, ldo;
      const float* kp = rows_in<T>(K, n, h, 0, T_, D, Dp, kb.data(), &ldk);
      const float* vp = rows_in<T>(V, n, h, 0, T_, D, Dp, vb.data(), &ldv);
      for (int64_t q0 = 0; q0 < T_; q0 += Bq) {
        const int64_t bq = std::min(Bq, T_ - q0);
        const int64_t kend = causal ? std::min(T_, q0 + bq) : T_;
        const float* qp = rows_in<T>(Q, n, h, q0, bq, D, Dp, qb.data(), &ldq);
        gemm_nt(bq, kend, Dp, qp, ldq, kp, ldk, sb.data(), Tp);
        for (int64_t r = 0; r < bq; ++r) {
          const int64_t i = q0 + r, lim = causal ? i + 1 : T_;
          softmax_row(sb.data() + r * Tp, lim, kend, scale);
        }
        float* op = rows_out<T>(O, n, h, q0, D, Dp, ob.data(), &ldo);
        gemm_nn(bq, Dp, kend, sb.data(), Tp, 1, vp, ldv, op, ldo, false);
        rows_out_done<T>(O, n, h, q0, bq, D, Dp, ob.data());
      }
    }
  }
}

template <typename T>
void attn_bwd_impl(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dq,
                   const Tensor& dk, const Tensor& dv, float scale, bool causal) {
  const int64_t N = q.size(0), T_ = q.size(1), H = q.size(2), D = q.size(3);
  // Needs neither the forward's output nor its softmax statistics: P is recomputed as a full softmax
  // over the (short) key axis and delta from P and dP, more accurate than exp(s - lse) and dO . O.
  Heads Q = heads(q, "q", q), K = heads(k, "k", q), V = heads(v, "v", q), dO = heads(dout, "grad_out", q),
        dQ = heads(dq, "dq", q), dK = heads(dk, "dk", q), dV = heads(dv, "dv", q);
  const int64_t Dp = round_up(D, 8), Tp = round_up(T_, 8), Bq = std::min(kBlockQ, T_);
  const int nt = num_threads();
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> kb(Tp * Dp, 0.f), vb(Tp * Dp, 0.f), dkb(Tp * Dp), dvb(Tp * Dp);
    std::vector<float> qb(Bq * Dp, 0.f), dob(Bq * Dp, 0.f), dqb(Bq * Dp);
    std::vector<float> pb(Bq * Tp, 0.f), dsb(Bq * Tp, 0.f);
    const bool one_block = Bq == T_;
#pragma omp for schedule(static)
    for (int64_t nh = 0; nh < N * H; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      int64_t ldk, ldv, ldq, lddo, lddq, lddk, lddv;
      const float* kp = rows_in<T>(K, n, h, 0, T_, D, Dp, kb.data(), &ldk);
      const float* vp = rows_in<T>(V, n, h, 0, T_, D, Dp, vb.data(), &ldv);
      // dK/dV accumulate over query blocks: in place when there is one block, else in buffers
      float* dkp = one_block ? rows_out<T>(dK, n, h, 0, D, Dp, dkb.data(), &lddk) : (lddk = Dp, dkb.data());
      float* dvp = one_block ? rows_out<T>(dV, n, h, 0, D, Dp, dvb.data(), &lddv) : (lddv = Dp, dvb.data());
      for (int64_t q0 = 0; q0 < T_; q0 += Bq) {
        const int64_t bq = std::min(Bq, T_ - q0);
        const int64_t kend = causal ? std::min(T_, q0 + bq) : T_;
        const bool first = q0 == 0;
        const float* qp = rows_in<T>(Q, n, h, q0, bq, D, Dp, qb.data(), &ldq);
        const float* dop = rows_in<T>(dO, n, h, q0, bq, D, Dp, dob.data(), &lddo);
        gemm_nt(bq, kend, Dp, qp, ldq, kp, ldk, pb.data(), Tp);     // scores
        gemm_nt(bq, kend, Dp, dop, lddo, vp, ldv, dsb.data(), Tp);  // dP
        for (int64_t r = 0; r < bq; ++r) {
          const int64_t i = q0 + r, lim = causal ? i + 1 : T_;
          float* prow = pb.data() + r * Tp;
          float* drow = dsb.data() + r * Tp;
          // P = softmax recomputed exactly as in the forward (max-shifted, normalised by its sum):
          // exp(s - lse) with an fp32 lse kept from the forward would add its rounding to every entry.
          softmax_row(prow, lim, kend, scale);
          // delta_i = sum_j P_ij dP_ij (= sum_d dO_id O_id, but consistent with the recomputed P,
          // which keeps each row of dS summing to ~0 and roughly halves the gradient error)
          F8 acc = zero8();
          int64_t j = 0;
          for (; j + 8 <= kend; j += 8) acc = fmadd(load8(prow + j), load8(drow + j), acc);
          float delta = hsum(acc);
          for (; j < kend; ++j) delta += prow[j] * drow[j];
          F8 dl = set1(delta), sc = set1(scale);
          j = 0;
          for (; j + 8 <= kend; j += 8) store8(drow + j, load8(prow + j) * (load8(drow + j) - dl) * sc);
          for (; j < kend; ++j) drow[j] = prow[j] * (drow[j] - delta) * scale;
        }
        // dQ = dS K ; dK += dS^T Q ; dV += P^T dO   (dS already carries the scale)
        float* dqp = rows_out<T>(dQ, n, h, q0, D, Dp, dqb.data(), &lddq);
        gemm_nn(bq, Dp, kend, dsb.data(), Tp, 1, kp, ldk, dqp, lddq, false);
        rows_out_done<T>(dQ, n, h, q0, bq, D, Dp, dqb.data());
        if (first && kend < T_) {  // causal: rows past kend get no contribution from this block
          for (int64_t t = kend; t < T_; ++t) {
            std::fill(dkp + t * lddk, dkp + t * lddk + Dp, 0.f);
            std::fill(dvp + t * lddv, dvp + t * lddv + Dp, 0.f);
          }
        }
        gemm_nn(kend, Dp, bq, dsb.data(), 1, Tp, qp, ldq, dkp, lddk, !first);
        gemm_nn(kend, Dp, bq, pb.data(), 1, Tp, dop, lddo, dvp, lddv, !first);
      }
      if (one_block) {
        rows_out_done<T>(dK, n, h, 0, T_, D, Dp, dkb.data());
        rows_out_done<T>(dV, n, h, 0, T_, D, Dp, dvb.data());
      } else {
        store_rows<T>(dK, n, h, 0, T_, D, dkb.data(), Dp);
        store_rows<T>(dV, n, h, 0, T_, D, dvb.data(), Dp);
      }
    }
  }
}

}  // namespace

void attn_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, double scale, bool causal) {
  check_float(q, "q");
  TORCH_CHECK(q.dim() == 4, "hbkernels: q must be 4D (N, T, H, D)");
  if (q.numel() == 0) return;
  dispatch_float(q.scalar_type(), [&](auto tag) {
    attn_fwd_impl<decltype(tag)>(q, k, v, out, static_cast<float>(scale), causal);
  });
}

void attn_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dq,
              const Tensor& dk, const Tensor& dv, double scale, bool causal) {
  check_float(q, "q");
  TORCH_CHECK(q.dim() == 4, "hbkernels: q must be 4D (N, T, H, D)");
  if (q.numel() == 0) return;
  dispatch_float(q.scalar_type(), [&](auto tag) {
    attn_bwd_impl<decltype(tag)>(dout, q, k, v, dq, dk, dv, static_cast<float>(scale), causal);
  });
}

}  // namespace hb
