"""Per-op benchmarks: hbkernels against what users run today on the same shapes.

Baselines: ``eager`` is the PyTorch path as diffusers / VideoCrafter2 write it (permute copies
included), ``sdpa`` is diffusers' AttnProcessor2_0 layout around F.scaled_dot_product_attention,
``xformers`` where installed, and ``compile`` is torch.compile of the eager path.
"""
import importlib.util
import math

import torch
import torch.nn.functional as F
from einops import rearrange

import hbkernels

# (label, batch, frames, heads, head_dim, positions per frame)
ATTN_GPU = [
    *[(f"vc2 L{lvl} B{b} T{t}", b, t, heads, 64, pos)
      for lvl, heads, pos in ((0, 5, 40 * 64), (1, 10, 20 * 32), (2, 20, 10 * 16))
      for b in (1, 2) for t in (16, 26)],
    *[(f"animatediff L{lvl} D{d}", 2, 16, 8, d, pos) for lvl, d, pos in ((0, 40, 64 * 64), (1, 80, 32 * 32), (2, 160, 16 * 16))],
    ("svd L0 T25", 1, 25, 5, 64, 72 * 128),
    ("N*H>65535 (animatediff B4)", 4, 16, 8, 40, 64 * 64),
]
ATTN_CPU = [("vc2 L0 B1 T16", 1, 16, 5, 64, 40 * 64), ("vc2 L2 B1 T26", 1, 26, 20, 64, 10 * 16),
            ("animatediff L1 D80", 1, 16, 8, 80, 16 * 16), ("svd T25", 1, 25, 5, 64, 18 * 32)]
# (label, N, C, T, H, W); T = 0 means a 4D (N, C, H, W) image tensor
GN_GPU = [*[(f"vc2 L{lvl} B{b} T{t}", b, c, t, h, w)
            for lvl, c, h, w in ((0, 320, 40, 64), (1, 640, 20, 32), (2, 1280, 10, 16))
            for b in (1, 2) for t in (16, 26)],
          ("svd L0 T25", 1, 320, 25, 72, 128), ("sd 4D 64x64", 2, 320, 0, 64, 64)]
GN_CPU = [("vc2 L0 B1 T16", 1, 320, 16, 40, 64), ("vc2 L2 B1 T26", 1, 1280, 26, 10, 16), ("sd 4D 64x64", 1, 320, 0, 64, 64)]
GEGLU_GPU = [("vc2 L0 spatial B2", 2 * 16 * 2560, 1280), ("vc2 L2 temporal B1", 26 * 160, 5120), ("text 77", 77, 8192)]
GEGLU_CPU = [("vc2 L1 spatial B1", 16 * 640, 2560), ("vc2 L2 temporal B1", 26 * 160, 5120)]
# (label, rows, C): the transformer blocks' LayerNorms, one per U-Net level
LN_GPU = [("vc2 L0 B1 T26", 26 * 2560, 320), ("vc2 L1 B1 T26", 26 * 640, 640), ("vc2 L2 B1 T26", 26 * 160, 1280),
          ("vc2 L0 B2 T16", 2 * 16 * 2560, 320)]
LN_CPU = [("vc2 L0 B1 T16", 16 * 2560, 320), ("vc2 L2 B1 T26", 26 * 160, 1280)]


def diffusers_attention(q, k, v, heads):
    """diffusers' AttnProcessor: head_to_batch_dim copies, baddbmm, softmax, bmm, batch_to_head_dim."""
    b, t, c = q.shape
    qh, kh, vh = (x.reshape(b, t, heads, c // heads).permute(0, 2, 1, 3).reshape(b * heads, t, c // heads) for x in (q, k, v))
    scores = torch.baddbmm(torch.empty(b * heads, t, t, dtype=q.dtype, device=q.device), qh, kh.transpose(1, 2),
                           beta=0, alpha=1 / math.sqrt(c // heads))
    out = torch.bmm(scores.softmax(-1), vh)
    return out.reshape(b, heads, t, c // heads).permute(0, 2, 1, 3).reshape(b, t, c)


def sdpa_attention(q, k, v, heads):
    """diffusers' AttnProcessor2_0: (B, H, T, D) transposed views into SDPA, then back."""
    b, t, c = q.shape
    qh, kh, vh = (x.view(b, t, heads, c // heads).transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, t, c)


def hb_attention(q, k, v, heads):
    b, t, c = q.shape
    return hbkernels.temporal_attention(*(x.view(b, t, heads, c // heads) for x in (q, k, v))).view(b, t, c)


def eager_group_norm_silu(x, w, b):
    return F.silu(F.group_norm(x, 32, w, b, 1e-5))


def eager_temporal_path(x, w, b, res, heads):
    """GN -> tokens -> attention over frames -> video + residual, as diffusers' TransformerTemporalModel
    writes it: tokens by reshape (a copy where the permute allows no view: batch > 1), the video by
    ``.permute(...).contiguous()`` before the residual add."""
    n, c, t, h, wd = x.shape
    tok = rearrange(F.group_norm(x, 32, w, b, 1e-6), "n c t h w -> (n h w) t c")
    att = sdpa_attention(tok, tok, tok, heads)
    return rearrange(att, "(n h w) t c -> n c t h w", n=n, h=h).contiguous() + res


def hb_temporal_path(x, w, b, res, heads):
    tok = hbkernels.group_norm_to_tokens(x, 32, w, b, 1e-6)
    nhw, t, c = tok.shape
    q = tok.view(nhw, t, heads, c // heads)
    return hbkernels.tokens_to_video(hbkernels.temporal_attention(q, q, q).view(nhw, t, c), res)


def eager_geglu(x):
    h, g = x.chunk(2, dim=-1)
    return h * F.gelu(g)


def eager_layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b)


def eager_add_layer_norm(x, r, w, b):
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), w, b), s


def run(report, dev, dtype, quick=False, timer=None, compile_too=True):
    gpu = dev.type == "cuda"

    def _impls(eager, ours, extra=None):
        # dynamo's cache is keyed on the code, so without a reset every shape after a suite's first would
        # be timed through a recompiled dynamic-shape graph instead of the static one a user's model gets
        torch.compiler.reset()
        compiled = {"compile": torch.compile(eager)} if compile_too else {}
        return {"eager": eager, **(extra or {}), **compiled, "hbkernels": ours}

    elt = torch.empty((), dtype=dtype).element_size()

    def measure(suite, case, impls, args, bytes_moved):
        expected, notes = None, {}
        for name, fn in impls.items():
            try:  # a wrong result must not become a fast row; nor one failure end the run
                got = fn(*args)
                if name == "eager":
                    expected = got
                elif expected is None:  # eager failed: nothing to check against, and the row says so
                    notes = {"unchecked": "eager failed, so this result was not compared"}
                else:
                    _check_close(got, expected, name)
                seconds = timer(fn, args)
            except Exception as err:  # e.g. SDPA past its grid limit, Triton's OutOfResources, a wrong result
                report.rows.append(_failed(suite, case, name, err))
                print(f"{suite} | {case} | {name} | failed: {report.rows[-1].extra['error']}", flush=True)
                continue
            report.add(suite, case, name, seconds, bytes_moved, **notes)
            print(f"{suite} | {case} | {name} | {seconds * 1e3:.3f} ms", flush=True)  # survives a killed run

    def shapes(gpu_list, cpu_list):
        chosen = gpu_list if gpu else cpu_list
        return chosen[:2] if quick else chosen

    for label, b, t, heads, d, pos in shapes(ATTN_GPU, ATTN_CPU):
        n, c = b * pos, heads * d
        q, k, v = (torch.randn(n, t, c, device=dev, dtype=dtype) for _ in range(3))
        extra = {"sdpa": sdpa_attention}
        if importlib.util.find_spec("xformers") is not None:
            import xformers.ops as xops

            extra["xformers"] = lambda q, k, v, h: xops.memory_efficient_attention(
                *(x.view(n, t, h, d) for x in (q, k, v))).view(n, t, c)
        impls = _impls(diffusers_attention, hb_attention, extra)
        measure("temporal_attention", f"{label} N={n} H={heads} D={d}", impls, (q, k, v, heads), 4 * q.numel() * elt)

    def hb_group_norm_silu(x, w, b):
        return hbkernels.group_norm(x, 32, w, b, 1e-5, activation="silu")

    for label, b, c, t, h, w in shapes(GN_GPU, GN_CPU):
        shape = (b, c, t, h, w) if t else (b, c, h, w)
        layouts = [("", torch.contiguous_format)]
        if gpu:  # and the channels-last layout the U-Net runs
            layouts.append((" CL", torch.channels_last_3d if t else torch.channels_last))
        for suffix, fmt in layouts:
            x = (torch.randn(shape, device=dev, dtype=dtype) + 1).contiguous(memory_format=fmt)
            wt, bs = torch.randn(c, device=dev, dtype=dtype), torch.randn(c, device=dev, dtype=dtype)
            impls = _impls(eager_group_norm_silu, hb_group_norm_silu)
            measure("group_norm_silu", f"{label}{suffix} {tuple(shape)}", impls, (x, wt, bs), 2 * x.numel() * elt)

    for label, b, c, t, h, w in shapes(GN_GPU, GN_CPU):
        if not t or c > 640:
            continue
        x, res = (torch.randn(b, c, t, h, w, device=dev, dtype=dtype) for _ in range(2))
        wt, bs = torch.randn(c, device=dev, dtype=dtype), torch.randn(c, device=dev, dtype=dtype)
        impls = _impls(eager_temporal_path, hb_temporal_path)
        measure("temporal_path", f"{label} heads={c // 64}", impls, (x, wt, bs, res, c // 64), 3 * x.numel() * elt)

    for label, rows, f in shapes(GEGLU_GPU, GEGLU_CPU):
        x = torch.randn(rows, 2 * f, device=dev, dtype=dtype)
        measure("geglu", f"{label} ({rows}, {2 * f})", _impls(eager_geglu, hbkernels.geglu), (x,), 3 * rows * f * elt)

    for label, rows, c in shapes(LN_GPU, LN_CPU):
        x = torch.randn(rows, c, device=dev, dtype=dtype) + 1
        wt, bs = torch.randn(c, device=dev, dtype=dtype), torch.randn(c, device=dev, dtype=dtype)
        impls = _impls(eager_layer_norm, hbkernels.layer_norm)
        measure("layer_norm", f"{label} ({rows}, {c})", impls, (x, wt, bs), 2 * x.numel() * elt)
        # the transformer block's x = f(x) + x; h = norm(x): reads 2 tensors, writes 2
        impls = _impls(eager_add_layer_norm, lambda x, r, w, b: hbkernels.layer_norm(x, w, b, residual=r))
        measure("add_layer_norm", f"{label} ({rows}, {c})", impls, (x, x.flip(0), wt, bs), 4 * x.numel() * elt)


TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # of the eager result's largest |value|


def _check_close(got, expected, name):
    """``got`` (a tensor or tuple of them) matches eager's ``expected`` to the dtype's tolerance."""
    for a, b in zip(*((t,) if isinstance(t, torch.Tensor) else t for t in (got, expected)), strict=True):
        if a.shape != b.shape:
            raise ValueError(f"wrong result: {name} returned shape {tuple(a.shape)}, eager {tuple(b.shape)}")
        scale = b.float().abs().max().item()
        err = (a.float() - b.float()).abs().max().item()
        if not err <= TOLERANCE[b.dtype] * scale:  # NaN fails too
            raise ValueError(f"wrong result: {name} differs from eager by {err:.3g} (|eager| up to {scale:.3g})")


def _failed(suite, case, impl, err):
    from bench.common import Row

    return Row(suite, case, impl, float("nan"), extra={"error": str(err).splitlines()[0][:200]})
