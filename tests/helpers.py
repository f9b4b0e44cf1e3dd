"""Shared test machinery: which backends run here, and the float64-reference error bound."""
import contextlib
import os
from unittest import mock

import pytest
import torch

import hbkernels
from hbkernels import backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def _backend_params():
    params = [pytest.param("torch", id="torch")]
    cpp_ok = DEVICE.type == "cpu" and backend.cpp_available()
    params.append(pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(not cpp_ok, reason="C++ backend not built / not CPU")))
    triton_ok = backend.triton_available() and (ON_GPU or backend.interpreting())
    params.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(not triton_ok, reason="no triton")))
    return params


BACKENDS = _backend_params()
KERNEL_BACKENDS = BACKENDS[1:]
CPP = BACKENDS[1:2]  # the C++ backend alone (skipped where it is not built)
TRITON = BACKENDS[2:]  # the Triton backend alone (skipped where it cannot run)
# bf16 runs under the Triton interpreter too: the kernels upcast to fp32 before any arithmetic.
DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in (torch.float32, torch.float16, torch.bfloat16)]


def shapes(quick, full):
    """Quick shape list on CPU (the Triton interpreter is slow), the full one on a GPU."""
    return full if ON_GPU else quick


def rand(*shape, dtype=torch.float32, mean=0.0, device=DEVICE, requires_grad=False):
    t = (torch.randn(*shape, dtype=torch.float64, device=device) + mean).to(dtype)
    return t.requires_grad_(requires_grad)


BIG_STRIDE = 2**30 + 2**26  # fits int32; the third index along it (2 * BIG_STRIDE) does not
# constant values past 2^87, where one ulp of a rounded fp32 mean, squared, overflows fp32
HUGE_CONSTANTS = [1e30, 1.7e36, 2.9e36]


def past_int32_storage(extra: int = 0) -> torch.Tensor:
    """fp16 storage of 2 * BIG_STRIDE + 64 + ``extra`` elements (4.25 GiB of address space; only the pages
    views of it hold are ever touched): small views with a stride of BIG_STRIDE reach past 2^31
    elements, where int32 index arithmetic wraps, while each stride alone fits int32 (the kernels get
    int32 stride arguments)."""
    return torch.empty(2 * BIG_STRIDE + 64 + extra, dtype=torch.float16, device=DEVICE)


def huge_strided_views(c, s):
    """Two small (1, c, 1, s) fp16 views of one storage past int32 (:func:`past_int32_storage`): x with
    channel stride BIG_STRIDE, dy with that position stride."""
    store = past_int32_storage()
    x = store.as_strided((1, c, 1, s), (0, BIG_STRIDE, 0, 1))
    dy = store.as_strided((1, c, 1, s), (0, 1, 0, BIG_STRIDE), 32)
    x.copy_(rand(1, c, 1, s, mean=2.0))
    dy.copy_(rand(1, c, 1, s))
    return x, dy


def assert_within_torch_error(name, out, ref64, torch_out, factor=2.0, scale=None):
    """Elementwise |out - ref64| <= ``factor`` x max|torch_out - ref64| (PyTorch's own error in that
    dtype) + 2 ulps at the tensor's largest reference magnitude.

    Why the tensor's scale and not each element's: norms, softmax-weighted sums and their gradients
    are sums of terms of the tensor's magnitude, so their rounding is absolute at that scale (a 0.1
    output of a T=77 attention row carries the rounding of its O(1) inputs). With the element's own
    ulps, PyTorch's max error over a tiny tensor (45 elements) was too noisy a yardstick: over 200
    random draws, kernels whose median error is 0.35-0.5x PyTorch's exceeded the bound in 0.5-3.5% of
    draws (GroupNorm+SiLU gradients, C++ and Triton-interpreted alike)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output?)"
    ref64 = ref64.double()
    err = (out.double() - ref64).abs()
    torch_err = (torch_out.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item() if scale is None else scale
    bound = factor * torch_err + 2 * torch.finfo(out.dtype).eps * scale
    worst = err.argmax()
    assert (err <= bound).all(), (
        f"{name}: max error {err.max().item():.3g} (at ref {ref64.flatten()[worst].item():.3g}) exceeds {factor}x "
        f"PyTorch's own max error {torch_err:.3g} + 2 ulps at the tensor's scale (bound {bound:.3g})"
    )


class _Recorder:
    """A backend's primitives module that records the name of each primitive called."""

    def __init__(self, module, calls: list):
        self._module, self._calls = module, calls

    def __getattr__(self, name):
        fn = getattr(self._module, name)
        if not callable(fn):  # constants such as ATTN_ROW_STATS
            return fn

        def recorded(*args, **kwargs):
            self._calls.append(name)
            return fn(*args, **kwargs)

        return recorded


@contextlib.contextmanager
def kernel_calls(backend_name: str):
    """The names of ``backend_name``'s primitives (attn_fwd, gn_bwd, ...) the ops call in the block:
    whether its kernels ran, not a fallback to the reference."""
    calls, real = [], backend.primitives
    with mock.patch.object(backend, "primitives", lambda name: _Recorder(real(name), calls) if name == backend_name
                           else real(name)):
        yield calls


def grads(fn, inputs, grad_out, forward_calls=None):
    """Output and gradients of fn(*inputs) (inputs needing grad) for a given output gradient;
    ``forward_calls`` (a :func:`kernel_calls` list): the forward must have called a kernel."""
    out = fn(*inputs)
    assert forward_calls is None or forward_calls, "the forward ran no kernel of the backend under test"
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return (out, *torch.autograd.grad(out, wrt, grad_out))


def clone_inputs(inputs, dtype=None):
    """Detached copies (optionally cast) that keep requires_grad, for a fresh autograd graph."""
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor):
            c = t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)
            out.append(c)
        else:
            out.append(t)
    return out


def require(name: str):
    """CI sets HBKERNELS_REQUIRE=cpp,triton so a backend that silently failed to build fails loudly."""
    return name in os.environ.get("HBKERNELS_REQUIRE", "").split(",")


def check_against_float64(fn, inputs, backend_name, dtype, factor=2.0, scales=None):
    """Run ``fn(*inputs)`` forward and backward on ``backend_name`` in ``dtype`` and hold the output
    and every input gradient to ``factor`` x the error of the PyTorch reference run in ``dtype``,
    both measured against the reference in float64. ``inputs`` are float64 tensors (requires_grad
    marks the ones to differentiate); other arguments pass through. ``scales``: {label: function of
    the float64 results (output, then gradients)} giving the magnitude whose 2 ulps a result may add,
    where it is a sum whose terms are larger than it (default: the result's own largest magnitude)."""
    from hbkernels import use_backend

    with use_backend("torch"):
        with torch.no_grad():
            grad_out = torch.randn_like(fn(*clone_inputs(inputs)))
        ref = grads(fn, clone_inputs(inputs), grad_out)
    runs = {}
    for name in (backend_name, "torch"):
        with use_backend(name), kernel_calls(name) as calls:
            runs[name] = grads(fn, clone_inputs(inputs, dtype), grad_out.to(dtype), calls if name != "torch" else None)
    labels = ["output"] + [f"grad[{i}]" for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    for label, got, want, own in zip(labels, runs[backend_name], ref, runs["torch"]):
        assert got.dtype == dtype, f"{label}: dtype {got.dtype}, expected {dtype}"
        scale = (scales or {}).get(label)
        assert_within_torch_error(f"{backend_name}/{dtype}/{label}", got, want, own, factor,
                                  None if scale is None else scale(ref))


def output_gradient(out, kind: str):
    """An output gradient for ``out``: "sum" is what ``out.sum()`` hands backward (one value expanded,
    every stride 0), "random" a dense random one."""
    return out.new_ones(()).expand(out.shape) if kind == "sum" else torch.randn_like(out)


def assert_gradients_close(got, want, label: str, **tolerances):
    """assert_close for each pair of gradients, naming the input whose gradient differs."""
    for i, (g, h) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, h, **tolerances, msg=lambda m, i=i: f"{label}: gradient of input {i}: {m}")


def _leaves(*shapes):
    """A maker of fresh random fp32 leaves (requiring grad) of these shapes."""
    return lambda: [rand(*shape, requires_grad=True) for shape in shapes]


# One small case per differentiable op: (function of the inputs, maker of fresh inputs). For tests that
# hold each op to the same property (e.g. its gradients compiled or for an expanded output gradient).
_VIDEO, _TOKENS = (1, 16, 5, 3, 4), (12, 5, 16)  # tokens of that video: (N*H*W, T, C)
OP_CASES = {
    "group_norm": (lambda x, w, b: hbkernels.group_norm(x, 4, w, b, activation="silu"), _leaves(_VIDEO, (16,), (16,))),
    "group_norm_to_tokens": (lambda x, w, b: hbkernels.group_norm_to_tokens(x, 4, w, b, activation="silu"),
                             _leaves(_VIDEO, (16,), (16,))),
    "temporal_attention": (lambda q: hbkernels.temporal_attention(q, q, q), _leaves((12, 5, 2, 8))),
    "layer_norm_residual": (lambda x, w, b, r: sum(hbkernels.layer_norm(x, w, b, residual=r)),
                            _leaves(_TOKENS, (16,), (16,), _TOKENS)),
    "geglu": (lambda x: hbkernels.geglu(x), _leaves((12, 5, 32))),
    "tokens_to_video": (lambda t, x: hbkernels.tokens_to_video(t, residual=x), _leaves(_TOKENS, _VIDEO)),
    "residual_add": (lambda x, r, b: hbkernels.residual_add(x, r, b), _leaves(_VIDEO, _VIDEO, (16,))),
}


class LowRankAdapter(torch.nn.Module):
    """A LoRA-style wrapper (what peft puts in a layer's place): base(x) + up(down(x))."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.up(self.down(x))
