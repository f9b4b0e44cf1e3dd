import pytest
import torch

import hbkernels
from helpers import (BACKENDS, BIG_STRIDE, CPP, DEVICE, DTYPES, KERNEL_BACKENDS, TRITON, check_against_float64,
                     HUGE_CONSTANTS, past_int32_storage, rand, shapes)

# (leading shape..., C): C = 1, not a multiple of 8, wider than a tile; one and many rows.
QUICK = [(7, 40), (2, 3, 320), (1, 1283), (5, 1), (130, 40)]  # 130 rows: three Triton forward programs of 64
FULL = QUICK + [(26, 2560, 320), (2560, 26, 320), (16640, 640), (4160, 1280), (3, 77, 16384), (2, 20000)]


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", shapes(QUICK, FULL))
@pytest.mark.parametrize("strided", [False, True])
def test_layer_norm(backend_name, dtype, shape, strided):
    c = shape[-1]
    x = rand(*shape, dtype=torch.float64, mean=3.0, requires_grad=True)  # mean 3 tests stable variance
    w = rand(c, dtype=torch.float64, mean=1.0, requires_grad=True)
    b = rand(c, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        # strided: rows further apart than C (a view, as a slice of a wider projection gives)
        return hbkernels.layer_norm(torch.cat([x, x], dim=-1)[..., :c] if strided else x, w, b, eps=1e-5)

    check_against_float64(fn, [x, w, b], backend_name, dtype)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", shapes(QUICK, FULL))
def test_layer_norm_with_residual(backend_name, dtype, shape):
    """(norm(x + residual), x + residual): outputs and the gradients that reach x and residual through both."""
    c = shape[-1]
    x = rand(*shape, dtype=torch.float64, mean=3.0, requires_grad=True)
    res = rand(*shape, dtype=torch.float64, requires_grad=True)
    w = rand(c, dtype=torch.float64, mean=1.0, requires_grad=True)
    b = rand(c, dtype=torch.float64, requires_grad=True)

    def fn(x, res, w, b):
        y, s = hbkernels.layer_norm(x, w, b, eps=1e-5, residual=res)
        return torch.cat([y, s], dim=-1)

    check_against_float64(fn, [x, res, w, b], backend_name, dtype)


@pytest.mark.parametrize("backend_name", TRITON)
@pytest.mark.parametrize("bwd_tile, rows", [(64, 20), (128, 23)], ids=["one_row_tiles", "ragged_last_tile"])
def test_layer_norm_backward_walks_many_tiles(monkeypatch, backend_name, bwd_tile, rows):
    """Small backward tiles: each program walks several (prefetched) row tiles, the last one partial."""
    from hbkernels.triton import layer_norm as ln

    monkeypatch.setattr(ln, "_BWD_TILE", bwd_tile)
    x = rand(rows, 40, dtype=torch.float64, mean=3.0, requires_grad=True)
    w = rand(40, dtype=torch.float64, mean=1.0, requires_grad=True)
    b = rand(40, dtype=torch.float64, requires_grad=True)
    check_against_float64(lambda x, w, b: hbkernels.layer_norm(x, w, b), [x, w, b], backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_layer_norm_optional_affine(backend_name, affine):
    x = rand(3, 5, 24, dtype=torch.float64, requires_grad=True)
    w = rand(24, dtype=torch.float64, mean=1.0, requires_grad=True) if affine == "weight" else None
    b = rand(24, dtype=torch.float64, requires_grad=True) if affine == "bias" else None
    inputs = [x] + [t for t in (w, b) if t is not None]

    def fn(x, *params):
        it = iter(params)
        return hbkernels.layer_norm(x, None if w is None else next(it), None if b is None else next(it))

    check_against_float64(fn, inputs, backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_layer_norm_fp32_parameters_with_half_input(backend_name):
    """Mixed precision keeps LayerNorm parameters in fp32 while activations are fp16."""
    x = rand(6, 40, dtype=torch.float16, requires_grad=True)
    w = rand(40, mean=1.0, requires_grad=True)
    b = rand(40, requires_grad=True)
    with hbkernels.use_backend(backend_name):
        y = hbkernels.layer_norm(x, w, b)
        gx, gw, gb = torch.autograd.grad(y.float().square().sum(), [x, w, b])
    want = torch.nn.functional.layer_norm(x.float(), (40,), w, b)
    assert y.dtype == torch.float16 and gw.dtype == torch.float32 and gb.dtype == torch.float32
    torch.testing.assert_close(y.float(), want, rtol=2e-3, atol=2e-3)
    wx, ww, wb = torch.autograd.grad(want.square().sum(), [x, w, b])
    torch.testing.assert_close(gx.float(), wx.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gw, ww, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gb, wb, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_layer_norm_residual_sum_of_frozen_inputs_needs_no_graph(backend_name):
    """Only the weight trains: s = x + residual depends on no trained tensor, so it carries no graph
    (downstream ops would build one, and the backward compute a dx nobody reads), as with torch."""
    x, r = rand(6, 16), rand(6, 16)
    w = rand(16, mean=1.0, requires_grad=True)
    with hbkernels.use_backend(backend_name):
        y, s = hbkernels.layer_norm(x, w, None, residual=r)
        (dw,) = torch.autograd.grad(y, [w], torch.ones_like(y))
    assert not s.requires_grad and y.requires_grad
    want = torch.nn.functional.layer_norm((x + r).double(), (16,)).sum(0)
    torch.testing.assert_close(dw.double(), want, rtol=1e-5, atol=1e-5)
    with hbkernels.use_backend(backend_name):
        _, s = hbkernels.layer_norm(x, w, None, residual=r.requires_grad_())
    assert s.requires_grad


def test_layer_norm_module_matches_torch():
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(48, device=DEVICE)
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    mod = hbkernels.nn.LayerNorm.from_torch(ref)
    assert mod.weight is ref.weight and mod.state_dict().keys() == ref.state_dict().keys()
    x = rand(4, 9, 48)
    torch.testing.assert_close(mod(x), ref(x), rtol=1e-5, atol=1e-5)
    two_d = hbkernels.nn.LayerNorm((9, 48), device=DEVICE)  # over more than the last dim: torch's path
    torch.testing.assert_close(two_d(x), torch.nn.functional.layer_norm(x, (9, 48), two_d.weight, two_d.bias))
    res = rand(4, 9, 48)
    for module, shape in ((mod, (48,)), (two_d, (9, 48))):
        y, s = module(x, residual=res)
        torch.testing.assert_close(s, x + res)
        torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + res, shape, module.weight, module.bias),
                                   rtol=1e-5, atol=1e-5)


def test_layer_norm_bad_input():
    x = rand(3, 8)
    with pytest.raises(TypeError, match="x must have dtype"):
        hbkernels.layer_norm(x.long())
    with pytest.raises(ValueError, match="x must have a last dim"):
        hbkernels.layer_norm(rand(()))
    with pytest.raises(ValueError, match="weight must have 8 elements"):
        hbkernels.layer_norm(x, weight=torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="bias is on meta"):
        hbkernels.layer_norm(x, bias=torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="eps"):
        hbkernels.layer_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        hbkernels.layer_norm(x, residual=rand(3, 4))
    with pytest.raises(TypeError, match="residual has dtype"):
        hbkernels.layer_norm(x, residual=rand(3, 8, dtype=torch.float64))


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("param_dtype", [torch.float64, torch.float16])
def test_layer_norm_parameters_strided_or_in_another_dtype(backend_name, param_dtype):
    """weight/bias as strided views (every other element) or in another float dtype than x: every
    backend gives PyTorch's answer for those parameters (the Triton kernel once read a strided
    weight as if it were contiguous; the C++ and reference backends raised RuntimeErrors)."""
    x = rand(6, 8)
    w, b = rand(16, mean=1.0, dtype=param_dtype)[::2], rand(16, dtype=param_dtype)[::2]
    with hbkernels.use_backend(backend_name):
        y = hbkernels.layer_norm(x, w, b)
    want = torch.nn.functional.layer_norm(x.double(), (8,), w.to(x.dtype).double(), b.to(x.dtype).double())
    assert y.dtype == x.dtype
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_layer_norm_one_channel_with_an_odd_stride(backend_name):
    """A last dim of size 1 may carry any stride (here a transposed (1, 4)); the kernels still run.
    One channel normalises to 0 whatever x holds, so only the bias (and its gradient, the row sum of
    dy) tells a right answer from a wrong one here."""
    x = rand(1, 4, dtype=torch.float64, requires_grad=True)
    w = rand(1, dtype=torch.float64, mean=1.0, requires_grad=True)
    b = rand(1, dtype=torch.float64, requires_grad=True)
    check_against_float64(lambda x, w, b: hbkernels.layer_norm(x.t(), w, b), [x, w, b], backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_layer_norm_residual_with_strided_x(backend_name):
    """The residual read with its own row stride, not x's."""
    c = 40
    x = rand(7, c, dtype=torch.float64, mean=3.0, requires_grad=True)
    res = rand(7, c, dtype=torch.float64, requires_grad=True)
    w = rand(c, dtype=torch.float64, mean=1.0, requires_grad=True)
    b = rand(c, dtype=torch.float64, requires_grad=True)

    def fn(x, res, w, b):
        y, s = hbkernels.layer_norm(torch.cat([x, x], dim=-1)[..., :c], w, b, residual=res)
        return torch.cat([y, s], dim=-1)

    check_against_float64(fn, [x, res, w, b], backend_name, torch.float32)


@pytest.mark.skipif(DEVICE.type != "cpu" or not hbkernels.backend.cpp_available(), reason="C++ backend is CPU-only")
def test_layer_norm_cpp_mean_rounds_once():
    """The C++ rows correct the fp32 mean sum / C with the sum of deviations from it, so each row's mean
    is the exact one rounded once (error <= 0.5 ulp); sum / C alone errs by ~1-2 ulps. Mean 1000 with std
    0.01: each ulp of the mean (2^-14) is 0.6% of y's scale."""
    ulp = 2.0**-14  # of fp32 in [512, 1024)
    x = (torch.randn(256, 1280, dtype=torch.float64) * 1e-2 + 1000.0).float()
    x64 = x.double()
    std = x64.var(-1, unbiased=False, keepdim=True).sqrt()
    want = (x64 - x64.mean(-1, keepdim=True)) / std
    with hbkernels.use_backend("cpp"):
        y = hbkernels.layer_norm(x, None, None, eps=1e-30)
    err_in_mean_ulps = ((y.double() - want).abs() * std / ulp).max().item()
    assert err_in_mean_ulps < 0.6


@pytest.mark.parametrize("backend_name", CPP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [16, 20], ids=["no-tail", "tail"])
def test_layer_norm_backward_of_huge_constant_rows(backend_name, dtype, width):
    """Constant rows of magnitude 3e36: xhat is 0 everywhere, but in a vector's empty tail lanes
    (0 - mean) * rstd overflows to -inf, and dy's 0 there times it was NaN in the row's sums: the result
    depended on where the row's length left a tail."""
    x = torch.full((2, width), 3e36, dtype=dtype, requires_grad=True)
    dy = rand(*x.shape).to(dtype)
    with hbkernels.use_backend(backend_name):
        (dx,) = torch.autograd.grad(hbkernels.layer_norm(x), [x], dy)
    # exact: xhat = 0 and rstd = eps^-1/2 (float64 layer_norm itself finds a rounding-error variance here)
    want = (dy.double() - dy.double().mean(-1, keepdim=True)) / 1e-5 ** 0.5
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(dx.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("backend_name", CPP)
def test_layer_norm_of_huge_constant_rows_of_any_length(backend_name):
    """As GroupNorm's: a constant row of 1e30-3e36 had rstd 0 (a zero dx) for the lengths whose fp32 mean
    rounded off the row's value."""
    for value in HUGE_CONSTANTS:
        for c in range(2, 24):
            x = torch.full((3, c), value, requires_grad=True)
            dy, b = rand(3, c), rand(c)
            with hbkernels.use_backend(backend_name):
                y = hbkernels.layer_norm(x, None, b)
                (dx,) = torch.autograd.grad(y, [x], dy)
            torch.testing.assert_close(y, b.expand_as(y), rtol=0, atol=0)
            want = (dy.double() - dy.double().mean(-1, keepdim=True)) / 1e-5 ** 0.5
            torch.testing.assert_close(dx.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item(),
                                       msg=lambda m, v=value, c=c: f"value {v}, C={c}: {m}")


@pytest.mark.parametrize("backend_name", CPP)
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_merges_every_threads_partial_sums(backend_name, residual, many_threads):
    """dweight / dbias are summed per thread, then across threads."""
    x, r = rand(64, 40, dtype=torch.float64, requires_grad=True), rand(64, 40, dtype=torch.float64, requires_grad=residual)
    w, b = rand(40, dtype=torch.float64, mean=1.0, requires_grad=True), rand(40, dtype=torch.float64, requires_grad=True)

    def fn(x, r, w, b):
        return hbkernels.layer_norm(x, w, b, residual=r)[0] if residual else hbkernels.layer_norm(x, w, b)

    check_against_float64(fn, [x, r, w, b], backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_layer_norm_at_the_widest_kernel_row(backend_name):
    """TRITON_MAX_C wide rows still run the kernels (wider ones take the reference on GPUs)."""
    from hbkernels.ops.layer_norm import TRITON_MAX_C

    x = rand(1, TRITON_MAX_C, dtype=torch.float64, requires_grad=True)
    w, b = rand(TRITON_MAX_C, dtype=torch.float64, mean=1.0, requires_grad=True), rand(TRITON_MAX_C, dtype=torch.float64)
    check_against_float64(lambda x, w: hbkernels.layer_norm(x, w, b), [x, w], backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_of_constant_rows_is_the_bias(backend_name, residual):
    """fp32 rows of one repeated value normalise to exactly the bias (variance 0), as torch's do: the
    Triton kernel's mean, a plain sum / C, was an ulp or two off the value, and times 1/sqrt(eps) its
    outputs came out up to 0.17 off at C = 1280 (0.96 at eps 1e-12)."""
    values = torch.tensor([3333.3333, -7.77, 123.456, 0.1], device=DEVICE)
    for c, eps in ((40, 1e-5), (1280, 1e-5), (1280, 1e-12)):
        x = values.view(4, 1).expand(4, c).contiguous()
        r = torch.zeros_like(x) if residual else None
        w, b = rand(c, mean=1.0), rand(c)
        with hbkernels.use_backend(backend_name):
            y = hbkernels.layer_norm(x, w, b, eps, residual=r)
        y = y[0] if residual else y
        torch.testing.assert_close(y, b.expand_as(y), atol=1e-6, rtol=0, msg=lambda m: f"C={c} eps={eps}: {m}")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_layer_norm_fp32_parameters_of_fp16_activations(backend_name):
    """As for GroupNorm: fp32 parameters of fp16 activations are used as they are, not rounded to fp16."""
    ratios = []
    for _ in range(8):
        x = rand(64, 40, dtype=torch.float16)
        w, b = rand(40, requires_grad=True), (rand(40) * 30).requires_grad_()
        with hbkernels.use_backend(backend_name):
            y = hbkernels.layer_norm(x, w, b)
        want = torch.nn.functional.layer_norm(x.double(), (40,), w.detach().double(), b.detach().double())
        torch_err = (torch.nn.functional.layer_norm(x.float(), (40,), w, b).half().double() - want).abs().max()
        ratios.append(((y.double() - want).abs().max() / torch_err).item())
    assert sorted(ratios)[len(ratios) // 2] <= 1.2, ratios
    with hbkernels.use_backend(backend_name):
        gw, gb = torch.autograd.grad(hbkernels.layer_norm(x, w, b).float().square().sum(), [w, b])
    assert gw.dtype == gb.dtype == torch.float32


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_backward_of_constant_rows(backend_name, residual):
    """Constant fp32 rows: xhat is exactly 0, so dx = rstd * (w dy - mean(w dy)) and dweight = 0; a mean
    saved for the backward an ulp off the value makes xhat = ulp * 1/sqrt(eps) instead."""
    values = torch.tensor([3333.3333, -7.77, 123.456, 0.1], device=DEVICE)
    x = values.view(4, 1).expand(4, 40).contiguous().requires_grad_()
    r = torch.zeros_like(x, requires_grad=True) if residual else None
    w, b = rand(40, mean=1.0, requires_grad=True), rand(40, requires_grad=True)
    dy = rand(4, 40)
    with hbkernels.use_backend(backend_name):
        y = hbkernels.layer_norm(x, w, b, 1e-5, residual=r)
        y = y[0] if residual else y
        gx, gw, gb = torch.autograd.grad(y, [x, w, b], dy)
    g = dy.double() * w.detach().double()
    want_dx = (g - g.mean(-1, keepdim=True)) / (1e-5) ** 0.5
    torch.testing.assert_close(gx.double(), want_dx, rtol=1e-4, atol=1e-4 * want_dx.abs().max().item())
    torch.testing.assert_close(gw.double(), torch.zeros(40, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(gb.double(), dy.double().sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_layer_norm_rows_past_int32(backend_name):
    """x's third row lies past 2^31 elements (a narrowed view of a wide tensor): int64 row offsets."""
    x = past_int32_storage().as_strided((3, 16), (BIG_STRIDE, 1))
    x.copy_(rand(3, 16))
    w, b = rand(16, mean=1.0, dtype=torch.float16), rand(16, dtype=torch.float16)
    with hbkernels.use_backend(backend_name):
        y = hbkernels.layer_norm(x, w, b)
    want = torch.nn.functional.layer_norm(x.double(), (16,), w.double(), b.double())
    torch.testing.assert_close(y.double(), want, rtol=0, atol=4e-3)
