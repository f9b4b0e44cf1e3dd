"""Backend selection: Triton on GPUs, the C++ extension on CPUs, the PyTorch reference otherwise.

``HBKERNELS_BACKEND=triton|cpp|torch`` (or :func:`use_backend`) forces one. ``TRITON_INTERPRET=1``
lets the Triton backend run on CPU tensors, which is how CI exercises the Triton code.
"""
import contextlib
import importlib.util
import os
import threading
import warnings

import torch
import torch.autograd.forward_ad as _fwAD

BACKENDS = ("triton", "cpp", "torch")
# use_backend() overrides, a stack per thread: one thread's block never changes the ops of another
_local = threading.local()


def _env_flag(name: str) -> bool:
    """A boolean environment variable read as Triton reads its own (TRITON_INTERPRET): on for 1, true,
    on, yes, y (any case), off otherwise. Read alike, "TRITON_INTERPRET=false" cannot make hbkernels
    run Triton kernels on CPU tensors that Triton itself would not interpret."""
    return os.environ.get(name, "").lower() in ("1", "true", "on", "yes", "y")


def interpreting() -> bool:
    return _env_flag("TRITON_INTERPRET")


_triton_state: list = [] if importlib.util.find_spec("triton") is not None else [False]  # as _cpp_state


def triton_available() -> bool:
    """Triton is installed and hbkernels' Triton kernels import (a triton at odds with torch may not):
    probed once, with one warning when they do not."""
    if not _triton_state:
        try:
            from hbkernels import triton  # noqa: F401  (registers torch.ops.hbkernels_triton.*)

            _triton_state.append(True)
        except Exception as err:  # noqa: BLE001 - whatever a broken install raises means "no Triton backend"
            warnings.warn(f"hbkernels: Triton backend unavailable ({type(err).__name__}: {err}); CUDA tensors "
                          "run the PyTorch reference backend", RuntimeWarning, stacklevel=3)
            _triton_state.append(False)
    return _triton_state[0]


_cpp_state: list = []  # [bool] once probed; a plain global so torch.compile can trace select()


def cpp_available() -> bool:
    if not _cpp_state:
        try:
            from hbkernels import cpp  # noqa: F401  (registers torch.ops.hbkernels.*)

            _cpp_state.append(True)
        except (ImportError, OSError) as err:
            here = os.path.dirname(os.path.abspath(__file__))
            warnings.warn(
                f"hbkernels: C++ CPU backend unavailable ({err}); falling back to the PyTorch reference backend. "
                f"hbkernels was imported from {here}: if that is a source checkout next to a non-editable "
                "install, run from another directory; otherwise reinstall with a C++ compiler present "
                "(pip install --no-build-isolation -e .) to build it.",
                RuntimeWarning,
                stacklevel=3,
            )
            _cpp_state.append(False)
    return _cpp_state[0]


def _requested() -> str | None:
    forced = getattr(_local, "forced", None)
    name = forced[-1][0] if forced else os.environ.get("HBKERNELS_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"HBKERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def select(device: torch.device, dtype: torch.dtype, empty: bool = False) -> str:
    """The backend that runs an op on ``dtype`` tensors living on ``device`` (``empty``: of zero size)."""
    name = _requested()
    # kernels cover fp32/fp16/bf16; float64 is the reference's job, and so are zero-size tensors (an
    # empty batch), which torch's ops take as they come, and meta tensors (shape inference), whatever
    # backend is forced
    if dtype == torch.float64 or empty or device.type == "meta":
        return "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' requested but triton is not installed")
        if device.type == "cpu" and not interpreting():
            raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
        return name
    if name == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpp' runs on CPU tensors only, got device {device}")
        if not cpp_available():
            raise RuntimeError("backend 'cpp' requested but the C++ extension hbkernels._C is not built")
        return name
    if name == "torch":
        return name
    if device.type == "cuda" and triton_available():  # ROCm builds report "cuda" too
        return "triton"
    if device.type == "cpu" and cpp_available():
        return "cpp"
    return "torch"


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``name`` for ops called inside the block (overrides ``HBKERNELS_BACKEND``), in this thread.

    Blocks nest per thread, not per asyncio task or generator (torch.compile traces a thread-local
    read, not a context variable's): blocks that interleave on one thread (tasks awaiting inside them,
    a generator suspended inside one) see each other's setting. Leaving a block that is not the
    innermost warns, and removes only its own setting."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if not hasattr(_local, "forced"):
        _local.forced = []
    # this block's entry: a one-element list, found again by identity (a list, which dynamo can build;
    # an object() it cannot trace)
    entry = [name]
    _local.forced.append(entry)
    try:
        yield
    finally:
        i = next(i for i, e in enumerate(_local.forced) if e is entry)
        if i != len(_local.forced) - 1:
            warnings.warn("hbkernels.use_backend: blocks left out of order on one thread (interleaved by "
                          "asyncio tasks or generators); each removes only its own setting", RuntimeWarning,
                          stacklevel=3)
        del _local.forced[i]


# ``HBKERNELS_POISON=1`` (read at import) fills every output buffer with NaN before a kernel runs, so
# tests see any element a kernel forgot to write.
POISON = _env_flag("HBKERNELS_POISON")


def _poisoning() -> bool:
    """Whether to NaN-fill kernel outputs: under ``HBKERNELS_POISON=1``, outside torch.compile. Traced,
    the fill is an in-place op on a fresh buffer that a custom op then mutates through a view, and
    torch 2.11's compiled video ops return all-zero gradients (eager and aot_eager compile backends
    alike; seen on an H100, reproduced on CPU with torch 2.11; torch 2.13 is fine)."""
    return POISON and not torch.compiler.is_compiling()


def empty(*args, **kwargs) -> torch.Tensor:
    """``torch.empty`` for kernel outputs (NaN-filled when poisoning)."""
    out = torch.empty(*args, **kwargs)
    return out.fill_(float("nan")) if _poisoning() else out


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with ``stride(-1) == 1``, as the kernels index it. ``contiguous()`` keeps any stride on a
    dim of size 1 (it is never used), so such a tensor gets a view with that stride set to 1."""
    if t.stride(-1) == 1:
        return t
    if t.shape[-1] == 1:
        return t.as_strided(t.shape, (*t.stride()[:-1], 1), t.storage_offset())
    return t.contiguous()


def empty_like(t: torch.Tensor, **kwargs) -> torch.Tensor:
    """``torch.empty_like`` (same memory format where ``t`` is dense), NaN-filled when poisoning."""
    out = torch.empty_like(t, **kwargs)
    return out.fill_(float("nan")) if _poisoning() else out


class _NoGradCtx:
    """Autograd's ``ctx`` for a Function.forward called directly: takes what forward stores, keeps nothing."""

    def __init__(self, inputs: int):
        self.needs_input_grad = (False,) * inputs

    def save_for_backward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass


def run_function(function, *args):
    """``function.apply(*args)`` where a result needs a backward; otherwise ``function.forward`` as a
    plain call. ``apply``'s autograd bookkeeping costs tens of microseconds of host time per call,
    which an inference step launching hundreds of ops pays for nothing. Traced code keeps ``apply``."""
    needs_grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    if torch.compiler.is_compiling():
        return function.apply(*_distinct(args))
    if needs_grad or _transformed():
        return function.apply(*args)
    return function.forward(_NoGradCtx(len(args)), *args)


def _distinct(args) -> list:
    """``args`` with each repeat of a tensor (``residual_add(x, x)``, ``q`` as ``k`` and ``v``) as a view
    of it: the same tensor twice is a torch.compile graph break for autograd.Function, distinct views
    are not, and gradients still sum into the tensor."""
    seen = []
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if any(a is s for s in seen):
                a = a.view(a.shape)
            else:
                seen.append(a)
        out.append(a)
    return out


def _transformed() -> bool:
    """Inside a ``torch.func`` transform (jvp, vmap, grad, ...) or a forward-mode AD dual level. Their
    tensors carry tangents or batch dims that don't show in ``requires_grad``: a plain forward call
    would drop them (a zero or missing tangent, silently); ``apply`` raises autograd's clear error."""
    return torch._C._functorch.peek_interpreter_stack() is not None or _fwAD._current_level >= 0


def primitives(name: str):
    """The module holding backend ``name``'s kernel launchers (``triton`` or ``cpp``).

    Each exposes the same out-parameter primitives: ``attn_fwd``, ``attn_bwd``, ``gn_fwd``,
    ``gn_bwd``, ``copy_add``, ``geglu_fwd``, ``geglu_bwd``, ``ln_fwd``, ``ln_bwd`` (signatures in
    hbkernels/ops/*.py)."""
    if name == "triton":
        from hbkernels import triton as mod
    elif name == "cpp":
        from hbkernels import cpp as mod
    else:
        raise ValueError(f"backend {name!r} has no kernel primitives")
    return mod
