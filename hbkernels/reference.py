"""Pure-PyTorch reference backend: the fallback where no kernel backend runs, differentiable
through ordinary autograd. The PyTorch ops a stock diffusers model runs (SDPA for attention), and in
float64, the tests' reference, plain and obviously correct rather than fast."""
import torch
import torch.nn.functional as F


def temporal_attention(q, k, v, scale: float, causal: bool) -> torch.Tensor:
    """q, k, v: (N, T, H, D) -> (N, T, H, D), softmax(q k^T * scale) v over the frame axis."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (N, H, T, D)
    if q.dtype != torch.float64:
        # what diffusers' default processor (AttnProcessor2_0) runs: SDPA on the transposed views, here in
        # slices of tokens, since SDPA's fused CUDA kernels have failed past 65,535 (token, head) rows
        rows = max(1, 65535 // max(1, q.shape[2]))
        # SDPA's CPU kernel returns NaN for is_causal with scale <= 0 (torch 2.13): an explicit mask does not
        mask = None
        if causal and not scale > 0:
            t = q.shape[1]
            mask, causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), False
        outs = [F.scaled_dot_product_attention(qh[i:i + rows], kh[i:i + rows], vh[i:i + rows], attn_mask=mask,
                                               is_causal=causal, scale=scale)
                for i in range(0, max(1, q.shape[0]), rows)]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).transpose(1, 2).contiguous()
    # float64, the tests' reference: every step spelled out, nothing rounded below float64
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if causal:
        t_q, t_k = scores.shape[-2:]
        keep = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.matmul(scores.softmax(-1), vh).transpose(1, 2).contiguous()


def group_norm(x, num_groups: int, weight, bias, eps: float, silu: bool, shift=None) -> torch.Tensor:
    """In fp32 at least (float64 stays float64), rounded once to x's dtype, as the kernels compute: fp32
    master weights of fp16 activations keep fp32 gradients (an fp16 bias gradient, a sum over N*T*H*W,
    overflows), and the shift is added unrounded."""
    acc = torch.promote_types(x.dtype, torch.float32)
    z = x.to(acc)
    if shift is not None:
        z = z + shift.to(acc).view(*shift.shape, *[1] * (x.dim() - 2))
    weight, bias = (None if p is None else p.to(acc) for p in (weight, bias))
    if torch.is_grad_enabled() and not z.requires_grad and any(p is not None and p.requires_grad
                                                               for p in (weight, bias)):
        # torch's CPU group_norm backward segfaults on a channels-last input that needs no gradient
        # while weight or bias does (torch 2.13); _like_layout restores the layout
        z = z.contiguous()
    # torch.group_norm, not F.group_norm: that refuses groups of one element, which the kernels normalise
    if weight is None and bias is not None:  # torch's group_norm backward fails on bias without weight
        y = torch.group_norm(z, num_groups, None, None, eps) + bias.view(-1, *[1] * (x.dim() - 2))
    else:
        y = torch.group_norm(z, num_groups, weight, bias, eps)
    return _like_layout((F.silu(y) if silu else y).to(x.dtype), x)


def _like_layout(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` in ``x``'s channels-last layout where x has one (CUDA's group_norm returns contiguous)."""
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if x.dim() in (4, 5) and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        return y.contiguous(memory_format=fmt)
    return y


def group_norm_to_tokens(x, num_groups: int, weight, bias, eps: float, silu: bool) -> torch.Tensor:
    """(N, C, T, H, W) -> GroupNorm -> tokens (N*H*W, T, C)."""
    n, c, t, h, w = x.shape
    y = group_norm(x, num_groups, weight, bias, eps, silu)
    return y.permute(0, 3, 4, 2, 1).reshape(n * h * w, t, c)


def tokens_to_video(tokens, shape, residual) -> torch.Tensor:
    """tokens (N*H*W, T, C) -> (N, C, T, H, W), plus ``residual`` when given."""
    n, c, t, h, w = shape
    video = tokens.reshape(n, h, w, t, c).permute(0, 4, 3, 1, 2)
    if residual is None:  # a tensor of its own, as the kernels return (contiguous() may return tokens' memory)
        return video.clone(memory_format=torch.contiguous_format)
    return torch.empty_like(residual).copy_(video).add_(residual)  # in the residual's memory layout


def residual_add(x, residual, bias) -> torch.Tensor:
    """x + residual (+ bias per channel), in the residual's memory layout like the kernels' output."""
    if bias is None:
        out = x + residual
    else:  # in fp32 at least (float64 stays float64), rounded once, as the kernels do; bias's gradient
        # (a sum over N, T, H, W) then accumulates in fp32 too, where an fp16 one overflows past 65504
        acc = torch.promote_types(x.dtype, torch.float32)
        out = (x.to(acc) + residual.to(acc) + bias.to(acc).view(-1, *[1] * (x.dim() - 2))).to(x.dtype)
    if out.stride() != residual.stride():  # mixed layouts: torch's add may pick x's
        out = torch.empty_like(residual).copy_(out)
    return out


def geglu(x) -> torch.Tensor:
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def layer_norm(x, weight, bias, eps: float, residual=None):
    """LayerNorm over the last dim; with ``residual``, (LayerNorm(x + residual), x + residual). In fp32 at
    least, rounded once to x's dtype, as group_norm above."""
    s = x if residual is None else x + residual
    acc = torch.promote_types(x.dtype, torch.float32)
    weight, bias = (None if p is None else p.to(acc) for p in (weight, bias))
    y = F.layer_norm(s.to(acc), (s.shape[-1],), weight, bias, eps).to(x.dtype)
    return y if residual is None else (y, s)
