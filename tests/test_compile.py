"""Kernel-backend ops under torch.compile: the C++ ops are torch.library custom ops with fake
(meta) implementations, and the Triton primitives become ``hbkernels_triton::*`` custom ops while
compiling, so torch.compile traces straight through both: fullgraph=True fails on any graph break.
With inputs that need gradients, AOTAutograd also traces each op's backward."""
import pytest
import torch

import hbkernels
from helpers import KERNEL_BACKENDS, rand


def temporal_block(x, w, b, heads):
    tokens = hbkernels.group_norm_to_tokens(x, 4, w, b, eps=1e-6, activation="silu")
    nhw, t, c = tokens.shape
    q = tokens.view(nhw, t, heads, c // heads)
    att = hbkernels.temporal_attention(q, q, q).view(nhw, t, c)  # one tensor thrice: no graph break either
    normed, summed = hbkernels.layer_norm(att, w, b, residual=tokens)  # both outputs carry gradients
    att = hbkernels.layer_norm(normed + summed, w, b)
    video = hbkernels.tokens_to_video(hbkernels.geglu(torch.cat([att, att], -1)), residual=x)
    return hbkernels.residual_add(video, x, b)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("compile_backend", ["aot_eager"])
def test_ops_compile_without_graph_breaks(backend_name, compile_backend):
    torch._dynamo.reset()
    x = rand(1, 16, 5, 3, 4, requires_grad=True)
    w, b = rand(16, requires_grad=True), rand(16, requires_grad=True)
    with hbkernels.use_backend(backend_name):
        want = temporal_block(x, w, b, 2)
        want_grads = torch.autograd.grad(want.sum(), (x, w, b))
        compiled = torch.compile(temporal_block, fullgraph=True, backend=compile_backend)
        got = compiled(x, w, b, 2)
        got_grads = torch.autograd.grad(got.sum(), (x, w, b))
        with torch.no_grad():  # inference: the ops' forwards without autograd.Function
            torch.testing.assert_close(compiled(x, w, b, 2), want)
    torch.testing.assert_close(got, want)
    for g, h in zip(got_grads, want_grads):
        torch.testing.assert_close(g, h)
