"""Host-side cost of one op call: every public op on tensors so small that the kernels' own work is
negligible, so the median time is Python, argument checks, allocation and launch. This is what a U-Net
step run op by op (no CUDA graph) pays a few hundred times, and what caps per-call bandwidth at small
shapes. ``eager`` is the PyTorch code users would call instead, on the same tensors.

    python -m bench.host_overhead [--out bench/results]

GPU: the Triton backend on CUDA tensors (timed without synchronising each call, so a GPU-bound call
would show its kernel time instead). CPU: the C++ backend, single-threaded.
"""
import argparse
import os

import torch
import torch.nn.functional as F
from einops import rearrange

import hbkernels
from bench import common


def cases(dev):
    def rand(*shape):
        return torch.randn(*shape, device=dev)

    x, w, b = rand(1, 32, 2, 4, 4), rand(32), rand(32)
    q, k, v = rand(8, 4, 2, 16), rand(8, 4, 2, 16), rand(8, 4, 2, 16)  # (N, T, H, D)
    tokens, video = rand(16, 2, 32), rand(1, 32, 2, 4, 4)
    g = rand(16, 64)

    def sdpa():
        qh, kh, vh = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        return F.scaled_dot_product_attention(qh, kh, vh).permute(0, 2, 1, 3)

    def geglu_eager():
        hidden, gate = g.chunk(2, -1)
        return hidden * F.gelu(gate)

    return [
        ("group_norm + silu", lambda: F.silu(F.group_norm(x, 8, w, b)),
         lambda: hbkernels.group_norm(x, 8, w, b, activation="silu")),
        ("group_norm_to_tokens", lambda: rearrange(F.group_norm(video, 8, w, b), "n c t h w -> (n h w) t c").contiguous(),
         lambda: hbkernels.group_norm_to_tokens(video, 8, w, b)),
        ("temporal_attention", sdpa, lambda: hbkernels.temporal_attention(q, k, v)),
        ("tokens_to_video + residual", lambda: rearrange(tokens, "(n h w) t c -> n c t h w", n=1, h=4) + video,
         lambda: hbkernels.tokens_to_video(tokens, residual=video)),
        ("geglu", geglu_eager, lambda: hbkernels.geglu(g)),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    dev = common.device()
    if dev.type == "cpu":
        torch.set_num_threads(1)  # thread hand-offs would dominate tensors this small
    report = common.Report(device=common.device_name(dev))
    print(f"{report.device}: commit {report.commit}")
    with torch.no_grad():
        for label, eager, ours in cases(dev):
            for impl, fn in (("eager", eager), ("hbkernels", ours)):
                seconds = min(common.median_seconds(fn, 0.2) for _ in range(3))  # least disturbed of 3
                report.add("host_overhead", label, impl, seconds)
                print(f"{label} / {impl}: {seconds * 1e6:.1f} us")
    report.save(args.out, "host_overhead")


if __name__ == "__main__":
    main()
