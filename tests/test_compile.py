"""The C++ ops are torch.library custom ops with fake (meta) implementations, so torch.compile
traces straight through them: fullgraph=True fails on any graph break."""
import pytest
import torch

import hbkernels
from hbkernels import backend
from helpers import DEVICE, rand

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu" or not backend.cpp_available(), reason="C++ backend not built")


def temporal_block(x, w, b, heads):
    tokens = hbkernels.group_norm_to_tokens(x, 4, w, b, eps=1e-6, activation="silu")
    nhw, t, c = tokens.shape
    q = tokens.view(nhw, t, heads, c // heads)
    att = hbkernels.temporal_attention(q, q, q).view(nhw, t, c)  # one tensor thrice: no graph break either
    return hbkernels.tokens_to_video(hbkernels.geglu(torch.cat([att, att], -1)), residual=x)


@pytest.mark.parametrize("compile_backend", ["aot_eager"])
def test_cpp_ops_compile_without_graph_breaks(compile_backend):
    x = rand(1, 16, 5, 3, 4, requires_grad=True)
    w, b = rand(16, requires_grad=True), rand(16, requires_grad=True)
    with hbkernels.use_backend("cpp"):
        want = temporal_block(x, w, b, 2)
        want_grads = torch.autograd.grad(want.sum(), (x, w, b))
        compiled = torch.compile(temporal_block, fullgraph=True, backend=compile_backend)
        got = compiled(x, w, b, 2)
        got_grads = torch.autograd.grad(got.sum(), (x, w, b))
    torch.testing.assert_close(got, want)
    for g, h in zip(got_grads, want_grads):
        torch.testing.assert_close(g, h)
