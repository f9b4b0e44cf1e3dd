// The CPU kernels behind torch.ops.hbkernels.* (registered in module.cpp).
#pragma once

#include <optional>

#include "common.h"

namespace hb {

void attn_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, double scale, bool causal);
void attn_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dq,
              const Tensor& dk, const Tensor& dv, double scale, bool causal);
void gn_fwd(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
            const std::optional<Tensor>& shift, const Tensor& y, const Tensor& mean, const Tensor& rstd,
            int64_t num_groups, double eps, bool silu);
void gn_bwd(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
            const std::optional<Tensor>& shift, const Tensor& mean, const Tensor& rstd, const Tensor& dx,
            const std::optional<Tensor>& dweight, const std::optional<Tensor>& dbias, int64_t num_groups, bool silu);
void copy_add(const Tensor& src, const std::optional<Tensor>& residual, const std::optional<Tensor>& bias,
              const Tensor& out);
void geglu_fwd(const Tensor& x, const Tensor& out);
void geglu_bwd(const Tensor& dy, const Tensor& x, const Tensor& dx);
void ln_fwd(const Tensor& x, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
            const std::optional<Tensor>& bias, const Tensor& y, const std::optional<Tensor>& s, const Tensor& mean,
            const Tensor& rstd, double eps);
void ln_bwd(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight, const Tensor& mean,
            const Tensor& rstd, const Tensor& dx, const std::optional<Tensor>& dweight,
            const std::optional<Tensor>& dbias);

}  // namespace hb
