"""Kernel-backend ops under torch.compile: the C++ ops are torch.library custom ops with fake
(meta) implementations, and the Triton primitives become ``hbkernels_triton::*`` custom ops while
compiling, so torch.compile traces straight through both: fullgraph=True fails on any graph break.
With inputs that need gradients, AOTAutograd also traces each op's backward."""
import pytest
import torch

import hbkernels
from helpers import DEVICE, KERNEL_BACKENDS, OP_CASES, TRITON, assert_gradients_close, output_gradient, rand



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
@pytest.mark.parametrize("grad_kind", ["sum", "random"])
def test_ops_compile_without_graph_breaks(backend_name, compile_backend, grad_kind):
    torch._dynamo.reset()
    x = rand(1, 16, 5, 3, 4, requires_grad=True)
    w, b = rand(16, requires_grad=True), rand(16, requires_grad=True)
    with hbkernels.use_backend(backend_name):
        want = temporal_block(x, w, b, 2)
        grad_out = output_gradient(want, grad_kind)
        want_grads = torch.autograd.grad(want, (x, w, b), grad_out)
        compiled = torch.compile(temporal_block, fullgraph=True, backend=compile_backend)
        got = compiled(x, w, b, 2)
        got_grads = torch.autograd.grad(got, (x, w, b), grad_out)
        with torch.no_grad():  # inference: the ops' forwards without autograd.Function
            torch.testing.assert_close(compiled(x, w, b, 2), want)
    torch.testing.assert_close(got, want)
    assert_gradients_close(got_grads, want_grads, "temporal block")


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", sorted(OP_CASES))
@pytest.mark.parametrize("grad_kind", ["sum", "random"])
def test_op_gradients_compiled_match_eager(backend_name, op, grad_kind):
    """Each op's gradients from an aot_eager graph equal its eager ones, for the output gradient of
    ``.sum()`` (a stride-0 expanded tensor) and for a dense random one."""
    fn, make = OP_CASES[op]
    leaves = make()
    torch._dynamo.reset()
    with hbkernels.use_backend(backend_name):
        want = fn(*leaves)
        grad_out = output_gradient(want, grad_kind)
        want_grads = torch.autograd.grad(want, leaves, grad_out)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
        got_grads = torch.autograd.grad(got, leaves, grad_out)
    torch.testing.assert_close(got, want)
    assert_gradients_close(got_grads, want_grads, op)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["cropped", "hw_transposed"])
def test_video_layouts_that_need_a_copy_compile(backend_name, layout):
    """Videos whose H and W cannot merge into one axis without a copy: eager code tried the view and
    caught the RuntimeError, which under torch.compile is dynamo's own error and aborted the build."""
    base = rand(2, 8, 3, 5, 6, requires_grad=True)

    def fn(base, w):
        x = base[..., :5] if layout == "cropped" else base.transpose(-1, -2)
        return hbkernels.residual_add(hbkernels.group_norm(x, 4, w, activation="silu"), x)

    w = rand(8, requires_grad=True)
    torch._dynamo.reset()
    with hbkernels.use_backend(backend_name):
        want = fn(base, w)
        want_grads = torch.autograd.grad(want.sum(), (base, w))
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(base, w)
        got_grads = torch.autograd.grad(got.sum(), (base, w))
    torch.testing.assert_close(got, want)
    assert_gradients_close(got_grads, want_grads, layout)


def test_use_backend_inside_compiled_code():
    """A use_backend block traced by dynamo (fullgraph): its entry must be something dynamo can build."""
    x = rand(1, 8, 2, 3, 3)

    def fn(x):
        with hbkernels.use_backend("torch"):
            return hbkernels.group_norm(x, 4, activation="silu")

    torch._dynamo.reset()
    before = list(getattr(hbkernels.backend._local, "forced", []))
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(x), fn(x))
    assert list(getattr(hbkernels.backend._local, "forced", [])) == before  # the block left no setting behind


def _empty(*shape):
    return torch.empty(*shape, device=DEVICE)


def _primitive_args(which: str, triton: bool) -> tuple:
    """Arguments of primitive ``which`` (the Triton and C++ schemas differ only in attention's row
    statistics, which the C++ kernels recompute): small real inputs, fresh output buffers."""
    if which.startswith("attn"):
        q, k, v, do = (rand(2, 5, 3, 8) for _ in range(4))
        out, grads = torch.empty_like(q), [torch.empty_like(q) for _ in range(3)]
        if not triton:
            return (q, k, v, out, 0.3, False) if which == "attn_fwd" else (do, q, k, v, *grads, 0.3, False)
        stats = _empty(2, 3, 5, hbkernels.backend.primitives("triton").ATTN_ROW_STATS)
        if which == "attn_fwd":
            return (q, k, v, out, stats, 0.3, False)
        torch.ops.hbkernels_triton.attn_fwd.default(q, k, v, out, stats, 0.3, False)  # the backward's inputs
        return (do, q, k, v, out, stats, *grads, 0.3, False)
    if which.startswith("gn"):
        x, w, b = rand(2, 8, 3, 5), rand(8), rand(8)
        mean, rstd = rand(2, 4), rand(2, 4).abs() + 0.5
        if which == "gn_fwd":
            return (x, w, b, None, torch.empty_like(x), _empty(2, 4), _empty(2, 4), 4, 1e-5, True)
        return (torch.randn_like(x), x, w, b, None, mean, rstd, torch.empty_like(x), _empty(8), _empty(8), 4, True)
    if which.startswith("ln"):
        x, r, w, b = rand(6, 40), rand(6, 40), rand(40), rand(40)
        if which == "ln_bwd":
            return (torch.randn_like(x), x, w, rand(6), rand(6).abs() + 0.5, torch.empty_like(x), _empty(40), _empty(40))
        residual = which == "ln_fwd_residual"
        return (x, r if residual else None, w, b, torch.empty_like(x), torch.empty_like(x) if residual else None,
                _empty(6), _empty(6), 1e-5)
    if which == "copy_add":
        src = rand(2, 8, 3, 5)
        return (src, rand(2, 8, 3, 5), rand(8), torch.empty_like(src))
    x = rand(6, 16)
    return (x, _empty(6, 8)) if which == "geglu_fwd" else (rand(6, 8), x, torch.empty_like(x))


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("which", ["attn_fwd", "attn_bwd", "gn_fwd", "gn_bwd", "copy_add", "geglu_fwd", "geglu_bwd",
                                   "ln_fwd", "ln_fwd_residual", "ln_bwd"])
def test_custom_op_schemas_declare_their_writes(backend_name, which):
    """Every output buffer an op writes is declared mutated: compiled graphs may otherwise reorder or
    drop reads of it (invisible under aot_eager, which keeps the real buffers). All nine primitives of
    both backends."""
    triton = backend_name == "triton"
    hbkernels.backend.primitives(backend_name)  # registers the backend's library (hbkernels_triton::*)
    library = torch.ops.hbkernels_triton if triton else torch.ops.hbkernels
    op = getattr(library, which.replace("_residual", "")).default
    torch.library.opcheck(op, _primitive_args(which, triton), test_utils=("test_schema",))


@pytest.mark.parametrize("backend_name", TRITON)
def test_triton_primitives_on_fake_tensors(backend_name):
    """Outside torch.compile, fake tensors (shape propagation) go through the custom ops' fake kernels."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), hbkernels.use_backend(backend_name):
        x = torch.empty(2, 8, 3, 4, 5, device=DEVICE)
        y = hbkernels.group_norm(x, 4, activation="silu")
        tokens = hbkernels.group_norm_to_tokens(x, 4)
        z = hbkernels.layer_norm(tokens)
    assert y.shape == x.shape and tokens.shape == (40, 3, 8) and z.shape == tokens.shape


class _TemporalOut(torch.nn.Module):
    def forward(self, x):
        return hbkernels.tokens_to_video(hbkernels.group_norm_to_tokens(x, 4) * 2, residual=x)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_frame_count_stays_symbolic(backend_name):
    """tokens_to_video made every size a constant (operator.index on symbolic sizes): a model using it
    recompiled for each frame count and failed under fullgraph after 8, and torch.export refused
    dynamic dims. Now the frame counts below compile twice (static, then dynamic), as group_norm does."""
    from torch._dynamo.testing import CompileCounterWithBackend

    block = _TemporalOut()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    with hbkernels.use_backend(backend_name), torch.no_grad():
        for t in range(2, 12):
            x = rand(2, 8, t, 3, 2)
            torch.testing.assert_close(compiled(x), block(x))
        assert counter.frame_count == 2
        dims = {0: torch.export.Dim("N", min=2), 2: torch.export.Dim("T", min=2)}
        exported = torch.export.export(block, (rand(2, 8, 5, 3, 2),), dynamic_shapes={"x": dims}, strict=True)
        x = rand(3, 8, 7, 3, 2)
        torch.testing.assert_close(exported.module()(x), block(x))


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_tensor_passed_twice_and_float_scales_compile(backend_name):
    """The same tensor as two arguments (x + x, weight as bias) was a fullgraph error wherever a
    gradient was wanted (autograd.Function's duplicate inputs); a Python float scale varying between
    calls failed on math.isfinite of a symbolic float."""
    x, w = rand(2, 8, 3, 4, requires_grad=True), rand(8, requires_grad=True)
    tokens = rand(6, 5, 8, requires_grad=True)

    def fn(x, w, tokens, scale):
        q = tokens.view(6, 5, 2, 4)
        return (hbkernels.residual_add(x, x).sum() + hbkernels.group_norm(x, 4, w, w).sum()
                + hbkernels.layer_norm(tokens, w, w, residual=tokens)[0].sum()
                + hbkernels.temporal_attention(q, q, q, scale=scale).sum())

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with hbkernels.use_backend(backend_name):
        for scale in (0.3, 0.2):
            want = fn(x, w, tokens, scale)
            want_grads = torch.autograd.grad(want, (x, w, tokens))
            got = compiled(x, w, tokens, scale)
            got_grads = torch.autograd.grad(got, (x, w, tokens))
            torch.testing.assert_close(got, want)
            assert_gradients_close(got_grads, want_grads, f"scale {scale}")
