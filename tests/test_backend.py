import os
import sys
import threading
import warnings

import pytest
import torch

import hbkernels
from hbkernels import backend
from helpers import DEVICE, KERNEL_BACKENDS, OP_CASES, assert_gradients_close, output_gradient, rand, require


def test_required_backends_are_built():
    """CI sets HBKERNELS_REQUIRE so a compiler failure can't silently turn C++ tests into skips."""
    if require("cpp"):
        assert backend.cpp_available(), "C++ extension hbkernels._C did not build"
    if require("triton"):
        assert backend.triton_available() and (backend.interpreting() or torch.cuda.is_available())


def test_sdist_ships_every_cpp_source(tmp_path):
    """A source distribution carries all of csrc/ (headers too): one built from it without them would
    fail to compile the C++ backend and fall back to the reference, only saying so."""
    import shutil
    import subprocess
    import tarfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if listed.returncode:
        pytest.skip("not a git checkout: which files are the project's is unknown")
    tracked = listed.stdout.splitlines()
    src = tmp_path / "src"  # a copy of the tracked files: setup.py writes its release tree beside itself
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(root, name), src / name)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=src, check=True,
                   capture_output=True, env={**os.environ, "HBKERNELS_NO_CPP": "0"})
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {name for name in tracked if name.startswith("csrc/")}
    assert wanted and wanted <= shipped, sorted(wanted - shipped)


def test_automatic_choice():
    if DEVICE.type == "cuda":
        assert backend.select(DEVICE, torch.float16) == "triton"
    else:
        want = "cpp" if backend.cpp_available() else "torch"
        assert backend.select(DEVICE, torch.float32) == want
    assert backend.select(DEVICE, torch.float64) == "torch"  # float64 is the reference's


def test_forcing(monkeypatch):
    monkeypatch.setenv("HBKERNELS_BACKEND", "torch")
    assert backend.select(DEVICE, torch.float32) == "torch"
    monkeypatch.setenv("HBKERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="HBKERNELS_BACKEND must be one of"):
        hbkernels.group_norm(torch.randn(1, 4, 2, 2), 2)
    with hbkernels.use_backend("torch"):  # the context manager wins over the environment
        assert backend.select(DEVICE, torch.float32) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        with hbkernels.use_backend("numpy"):
            pass


def test_use_backend_is_per_thread(monkeypatch):
    """A block in one thread (e.g. one request of a server) neither changes the backend of another
    thread nor, on exit, pops that thread's own override."""
    monkeypatch.delenv("HBKERNELS_BACKEND", raising=False)
    default = backend.select(DEVICE, torch.float32)
    other = "torch" if default != "torch" else "triton"
    entered, leave = threading.Event(), threading.Event()

    def worker():
        with hbkernels.use_backend(other):
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    assert entered.wait(10)
    try:
        assert backend.select(DEVICE, torch.float32) == default
        with hbkernels.use_backend(default):
            leave.set()
            thread.join(10)  # the worker's block exits inside ours
            assert backend.select(DEVICE, torch.float32) == default
    finally:
        leave.set()
        thread.join(10)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU-only rules")
def test_use_backend_blocks_left_out_of_order(monkeypatch):
    """A generator suspended inside a block, closed inside another: the other block's setting was the
    one removed (the stack popped its top), and the caller went on with the generator's."""
    monkeypatch.delenv("HBKERNELS_BACKEND", raising=False)

    def gen():
        with hbkernels.use_backend("torch"):
            yield

    g = gen()
    next(g)
    with hbkernels.use_backend("cpp"):
        with pytest.warns(RuntimeWarning, match="out of order"):
            g.close()
        assert backend._requested() == "cpp"
    assert backend._requested() is None


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("On", True), ("yes", True), ("0", False),
                                      ("false", False), ("off", False), ("no", False), ("", False), ("2", False)])
def test_boolean_environment_variables_read_as_triton_reads_them(monkeypatch, value, on):
    """TRITON_INTERPRET=false made hbkernels count on an interpreter Triton did not run."""
    knobs = pytest.importorskip("triton.knobs")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backend.interpreting() is on is knobs.runtime.interpret


def test_meta_tensors_take_the_reference_whatever_is_forced():
    """Shape inference on meta tensors: forcing a kernel backend gave a copy-out-of-meta error (Triton)
    or a refusal (C++)."""
    x = torch.empty(2, 8, 3, 4, 4, device="meta")
    q = torch.empty(2, 3, 2, 4, device="meta")
    for name in ("triton", "cpp", "torch"):
        with hbkernels.use_backend(name):
            assert backend.select(x.device, x.dtype) == "torch"
            assert hbkernels.group_norm(x, 4, activation="silu").shape == x.shape
            assert hbkernels.temporal_attention(q, q, q).shape == q.shape  # autocast knows no meta device
            assert hbkernels.tokens_to_video(hbkernels.group_norm_to_tokens(x, 4), residual=x).shape == x.shape


def test_forcing_unusable_backend_is_a_clear_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with hbkernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        hbkernels.geglu(torch.randn(2, 4))


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    """Without hbkernels._C the package still works on the reference backend and says so once."""
    monkeypatch.setitem(sys.modules, "hbkernels._C", None)  # makes `import hbkernels._C` fail
    monkeypatch.delitem(sys.modules, "hbkernels.cpp", raising=False)
    monkeypatch.delattr(hbkernels, "cpp", raising=False)
    monkeypatch.setattr(backend, "_cpp_state", [])
    x = torch.randn(1, 4, 3, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [hbkernels.group_norm(x, 2, activation="silu") for _ in range(3)]
    assert backend.select(torch.device("cpu"), torch.float32) == "torch"
    assert sum("C++ CPU backend unavailable" in str(w.message) for w in caught) == 1
    for y in ys:
        torch.testing.assert_close(y, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 2)))


def test_broken_triton_falls_back_with_one_warning(monkeypatch):
    """A triton that is installed but does not import (one at odds with torch) is not chosen for CUDA
    tensors: they run the reference backend, and it is said once."""
    pytest.importorskip("triton")
    monkeypatch.setitem(sys.modules, "hbkernels.triton", None)  # makes `from hbkernels import triton` fail
    monkeypatch.delattr(hbkernels, "triton", raising=False)
    monkeypatch.setattr(backend, "_triton_state", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = [backend.select(torch.device("cuda"), torch.float16) for _ in range(3)]
    assert chosen == ["torch"] * 3
    assert sum("Triton backend unavailable" in str(w.message) for w in caught) == 1
    with hbkernels.use_backend("triton"), pytest.raises(RuntimeError, match="triton is not installed"):
        backend.select(torch.device("cuda"), torch.float16)


def test_cuda_cache_folder_without_a_home(monkeypatch, tmp_path):
    """Containers run as a user without a home: HBKERNELS_CACHE_DIR is then the way, and without it the
    CUDA kernels' build says what to set (a BuildError, which leaves the Triton kernels running)."""
    from pathlib import Path

    from hbkernels.cuda import build

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    monkeypatch.setenv("HBKERNELS_CACHE_DIR", str(tmp_path))
    assert build.cache_dir() == tmp_path
    monkeypatch.delenv("HBKERNELS_CACHE_DIR")
    with pytest.raises(build.BuildError, match="set HBKERNELS_CACHE_DIR"):
        build.cache_dir()


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", sorted(OP_CASES))
def test_double_backward_is_refused(backend_name, op):
    """Kernel backwards are not themselves differentiable: asking for it must raise, not return a
    silently wrong second derivative (without once_differentiable, LayerNorm's was off by 8 in 28)."""
    fn, make = OP_CASES[op]
    inputs = make()
    with hbkernels.use_backend(backend_name):
        grads = torch.autograd.grad(fn(*inputs).pow(2).sum(), inputs, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            sum(g.square().sum() for g in grads).backward()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's own
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_forward_ad_and_func_transforms_are_refused(backend_name):
    """Tangents (forward AD, torch.func.jvp) and batch dims (vmap) don't show in requires_grad: the
    kernels must raise rather than return an output whose tangent is silently zero or missing."""
    import torch.autograd.forward_ad as fwAD

    x = rand(3, 8)
    with hbkernels.use_backend(backend_name):
        with pytest.raises(RuntimeError, match="setup_context"):
            torch.func.jvp(hbkernels.geglu, (x,), (torch.ones_like(x),))
        with pytest.raises(RuntimeError, match="setup_context"):
            torch.func.vmap(hbkernels.layer_norm)(x.view(3, 2, 4))
        with fwAD.dual_level(), pytest.raises(NotImplementedError, match="jvp"):
            hbkernels.geglu(fwAD.make_dual(x, torch.ones_like(x)))
        with fwAD.dual_level():  # no dual inputs: the ops still run
            torch.testing.assert_close(hbkernels.geglu(x), hbkernels.geglu(x.double()).float())


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_autograd_function_only_when_a_gradient_is_needed(backend_name, monkeypatch):
    from hbkernels.ops.group_norm import GroupNormFunction

    applied = []
    apply = GroupNormFunction.apply
    monkeypatch.setattr(GroupNormFunction, "apply", lambda *args: applied.append(1) or apply(*args))
    x, w = rand(2, 8, 3, 4, 5, requires_grad=True), rand(8, requires_grad=True)
    with hbkernels.use_backend(backend_name):
        with torch.no_grad():
            plain = hbkernels.group_norm(x, 4, w, activation="silu")
        assert applied == [] and plain.grad_fn is None
        tracked = hbkernels.group_norm(x, 4, w, activation="silu")
        assert applied == [1] and tracked.grad_fn is not None
        untracked = hbkernels.group_norm(x.detach(), 4, w.detach(), activation="silu")
        assert applied == [1] and not untracked.requires_grad
    torch.testing.assert_close(plain, tracked.detach(), rtol=0, atol=0)
    torch.testing.assert_close(untracked, plain, rtol=0, atol=0)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", sorted(OP_CASES))
def test_expanded_output_gradient(backend_name, op):
    """The output gradient of ``.sum()`` or ``.mean()`` is one value expanded (every stride 0): the
    kernels' backward reads it through those strides and must match the reference backend's."""
    fn, make = OP_CASES[op]
    inputs = make()

    def gradients():
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, output_gradient(out, "sum"))

    _gradients_match_the_reference(backend_name, op, gradients)


def _gradients_match_the_reference(backend_name, op, gradients):
    """``gradients()`` on ``backend_name`` and on the reference backend agree."""
    got = {}
    for name in (backend_name, "torch"):
        with hbkernels.use_backend(name):
            got[name] = gradients()
    assert_gradients_close(got[backend_name], got["torch"], op, rtol=1e-4, atol=1e-5)


# each op's own outputs (OP_CASES sums the fused LayerNorm's two into a new tensor)
RAW_OUTPUTS = {**OP_CASES, "layer_norm_residual": (lambda x, w, b, r: hbkernels.layer_norm(x, w, b, residual=r),
                                                   OP_CASES["layer_norm_residual"][1])}


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", sorted(set(RAW_OUTPUTS) - {"temporal_attention"}))
def test_outputs_modified_in_place(backend_name, op):
    """``h = op(x); h += 1`` (or an in-place dropout) in training code: the output is a tensor of its
    own, which autograd lets callers modify in place, as torch's ops and the reference backend's are
    (a returned view of a buffer made inside the Function is refused), with the same gradients. Not
    temporal attention: its backward reads its output (as flash attention's does), so autograd's
    version check refuses that, as for torch's ops that save their output."""
    fn, make = RAW_OUTPUTS[op]
    inputs = make()

    def gradients():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        outs[0].mul_(2)
        return torch.autograd.grad(sum(o.square().sum() for o in outs), inputs)

    _gradients_match_the_reference(backend_name, op, gradients)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", sorted(RAW_OUTPUTS))
def test_nan_inputs_give_nan_where_the_reference_does(backend_name, op):
    """A NaN in an input (a diverging run) shows in exactly the outputs the float64 reference makes NaN,
    not hidden by a clamp in an exp, a max or a softmax that drops it. (Not against the reference
    backend in fp32: torch 2.13's CPU SDPA keeps a NaN query's row finite but for one element.)"""
    fn, make = RAW_OUTPUTS[op]
    with torch.no_grad():
        inputs = make()
        inputs[0].view(-1)[inputs[0].numel() // 3] = float("nan")
        nans = {}
        for name, args in ((backend_name, inputs), ("torch", [t.double() for t in inputs])):
            with hbkernels.use_backend(name):
                outs = fn(*args)
                nans[name] = [o.isnan() for o in (outs if isinstance(outs, tuple) else (outs,))]
    assert any(m.any() for m in nans["torch"])
    for got, want in zip(nans[backend_name], nans["torch"]):
        assert torch.equal(got, want), f"{op}: NaN at {got.sum()} outputs, the reference at {want.sum()}"


def test_poisoning_stays_out_of_compiled_graphs(monkeypatch):
    """HBKERNELS_POISON fills kernel outputs with NaN in eager code only: traced into a graph, the fill
    made torch 2.11's compiled video ops return zero gradients."""
    monkeypatch.setattr(backend, "POISON", True)
    assert backend._poisoning()
    torch._dynamo.reset()
    assert torch.compile(backend._poisoning, fullgraph=True, backend="eager")() is False
    monkeypatch.setattr(backend, "POISON", False)
    assert not backend._poisoning()


# The results of each op (outputs, then input gradients) that bf16 rounds once from fp32 arithmetic on
# the inputs. Not the fused LayerNorm's y and gradients: it normalises the sum s rounded to bf16, as an
# unfused add leaves it. Not attention's gradients: its backward reads its rounded output (as flash
# attention's does), and its case feeds one tensor as q, k and v, whose three bf16 gradients autograd adds.
ROUNDED_ONCE = {"layer_norm_residual": [1], "temporal_attention": [0]}


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", sorted(RAW_OUTPUTS))
def test_bf16_results_round_to_nearest(backend_name, op):
    """An op in bf16 computes in fp32 and rounds once to nearest: its results are the same op's fp32
    results on the same values, rounded, but where a different summation order flips a near-tie.
    Triton's interpreter truncates fp32 -> bf16; unrounded by hand, about half the elements of every
    Triton op but attention came out one ulp low, twice the rounding error a GPU makes."""
    fn, make = RAW_OUTPUTS[op]
    leaves = [t.detach().bfloat16() for t in make()]
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        inputs = [t.to(dtype).requires_grad_() for t in leaves]
        with hbkernels.use_backend(backend_name):
            outs = fn(*inputs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            dys = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).bfloat16().to(dtype)
                   for i, o in enumerate(outs)]
            results[dtype] = [*outs, *torch.autograd.grad(outs, inputs, dys)]
    compared = ROUNDED_ONCE.get(op, range(len(results[torch.float32])))
    for i in compared:
        got, want = results[torch.bfloat16][i], results[torch.float32][i]
        assert got.dtype == torch.bfloat16
        off = got.float() != want.bfloat16().float()
        assert off.float().mean() <= 0.02, f"{op}: result {i}: {off.sum()} of {off.numel()} not rounded to nearest"
