import math
import pytest
import torch

import hbkernels
from hbkernels import backend, use_backend
from helpers import (BIG_STRIDE, KERNEL_BACKENDS, DEVICE, DTYPES, ON_GPU, TRITON, assert_gradients_close,
                     check_against_float64, past_int32_storage, rand, shapes)

# (N, T, H, D): T = 1/16/25/26, D = 40/64/80, N = 1; tiny N*H keeps the interpreter fast.
QUICK = [(1, 16, 2, 64), (2, 25, 1, 40), (1, 26, 2, 80), (3, 1, 1, 32), (1, 5, 1, 96), (1, 77, 1, 40)]  # 77: several key blocks
FULL = QUICK + [(2560, 16, 5, 64), (640, 26, 10, 64), (160, 16, 20, 64), (64, 25, 8, 40), (32, 128, 8, 80),
                (16, 16, 8, 160), (8, 77, 4, 128), (4, 200, 2, 64)]
LAYOUTS = ["contiguous", "packed_qkv", "projection_views"]
# Quick list: strided layouts on the first two shapes only.
CASES = [(shape, layout) for i, shape in enumerate(shapes(QUICK, FULL)) for layout in LAYOUTS
         if ON_GPU or layout == "contiguous" or i < 2]


def qkv_views(base, layout, heads):
    """q, k, v as a model produces them: separate tensors, one fused qkv projection unbound, or
    (N, T, H*D) projection outputs viewed per head (no copy)."""
    if layout == "packed_qkv":  # base: (N, T, 3, H, D)
        return base.unbind(2)
    if layout == "projection_views":  # base: (3, N, T, H*D)
        return [t.unflatten(-1, (heads, -1)) for t in base.unbind(0)]
    return base.unbind(0)  # base: (3, N, T, H, D)


def make_base(n, t, h, d, layout):
    shape = {"packed_qkv": (n, t, 3, h, d), "projection_views": (3, n, t, h * d)}.get(layout, (3, n, t, h, d))
    return rand(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_temporal_attention(backend_name, dtype, shape, layout, causal):
    n, t, h, d = shape

    def fn(base):
        return hbkernels.temporal_attention(*qkv_views(base, layout, h), causal=causal)

    check_against_float64(fn, [make_base(n, t, h, d, layout)], backend_name, dtype)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_temporal_attention_scale(backend_name):
    def fn(base):
        return hbkernels.temporal_attention(*base.unbind(0), scale=0.3)

    check_against_float64(fn, [rand(3, 2, 7, 2, 40, dtype=torch.float64, requires_grad=True)], backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_temporal_attention_inference_keeps_no_row_stats(backend_name, monkeypatch):
    """Softmax row statistics are written only when a backward will read them; the output is the same."""
    impl = backend.primitives(backend_name)
    given = []

    def recording_fwd(q, k, v, out, stats, scale, causal):
        given.append(stats)
        return launcher(q, k, v, out, stats, scale, causal)

    launcher = impl.attn_fwd
    monkeypatch.setattr(impl, "attn_fwd", recording_fwd)
    base = rand(3, 2, 16, 2, 40)
    with use_backend(backend_name):
        with torch.no_grad():
            inference = hbkernels.temporal_attention(*base.unbind(0))
        frozen = hbkernels.temporal_attention(*base.unbind(0))  # grad mode on, no input requires grad
        training = hbkernels.temporal_attention(*base.clone().requires_grad_().unbind(0))
        training.backward(torch.ones_like(training))
    assert given[0] is None and given[1] is None
    assert (given[2] is not None) == (impl.ATTN_ROW_STATS > 0)
    torch.testing.assert_close(inference, training.detach(), atol=0, rtol=0)
    torch.testing.assert_close(frozen, training.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("backend_name", TRITON)
@pytest.mark.parametrize("warps", [1, 2, 8])
@pytest.mark.parametrize("t", [16, 26])
def test_temporal_attention_warps(monkeypatch, backend_name, warps, t):
    """The kernels' warps per program (bench/sweep.py times them) change the schedule, never the result."""
    from hbkernels.triton import temporal_attention as ta

    monkeypatch.setattr(ta, "FWD_WARPS", warps)
    monkeypatch.setattr(ta, "BWD_WARPS", warps)
    assert ta._config(t, 64, 2, bwd=False)[2]["num_warps"] == ta._config(t, 64, 2, bwd=True)[2]["num_warps"] == warps
    check_against_float64(lambda base: hbkernels.temporal_attention(*base.unbind(0)),
                          [rand(3, 2, t, 2, 64, dtype=torch.float64, requires_grad=True)], backend_name, torch.float16)


def test_temporal_attention_warp_rules():
    pytest.importorskip("triton")
    from hbkernels.triton import temporal_attention as ta

    # (T, D) -> warps: forward, one per 3072 elements of the (BLOCK_M, BLOCK_D) accumulator and the
    # (BLOCK_M, BLOCK_N) scores; backward, one per 1024 accumulator elements (512 past D = 64), at least
    # one per 1024 score elements. Tiles (16, 64), (32, 64), (64, 64), (16 / 32, 256), (64 / 32, 128),
    # (64, 16), (64, 32): the first two as timed on an H100, the last two (and (64, 64) forward) as
    # their registers require (sm_90: no spills, tests/gpu_compile_check.py).
    shapes = [(16, 64), (26, 64), (64, 64), (16, 160), (77, 80), (48, 16), (48, 32)]
    assert [ta._config(t, d, 2, bwd=False)[2]["num_warps"] for t, d in shapes] == [1, 1, 4, 2, 4, 2, 2]
    assert [ta._config(t, d, 2, bwd=True)[2]["num_warps"] for t, d in shapes] == [1, 2, 4, 8, 8, 4, 4]


@pytest.mark.skipif(not ON_GPU, reason="65,536 heads need a GPU")
def test_temporal_attention_beyond_sdpa_grid_limit():
    q, k, v = rand(3, 16384, 16, 5, 64, dtype=torch.float16).unbind(0)  # N*H = 81,920
    out = hbkernels.temporal_attention(q, k, v)
    assert torch.isfinite(out).all()
    # the first tokens and the last, whose (token, head) rows lie past 65,535 (SDPA itself on 4096 at a time)
    for rows in (slice(0, 4096), slice(-4096, None)):
        ref = torch.nn.functional.scaled_dot_product_attention(*(t[rows].transpose(1, 2) for t in (q, k, v)))
        torch.testing.assert_close(out[rows], ref.transpose(1, 2), atol=2e-3, rtol=2e-3)


def test_temporal_attention_bad_input():
    q = rand(2, 16, 2, 64)
    with pytest.raises(ValueError, match="q must be 4D"):
        hbkernels.temporal_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="k must have the shape of q"):
        hbkernels.temporal_attention(q, q[:, :8], q)
    with pytest.raises(ValueError, match="v must have the shape of q"):
        hbkernels.temporal_attention(q, q, q[..., :32])
    with pytest.raises(TypeError, match="k has dtype"):
        hbkernels.temporal_attention(q, q.half(), q)
    with pytest.raises(TypeError, match="v must have dtype"):
        hbkernels.temporal_attention(q, q, q.int())
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        hbkernels.temporal_attention(None, q, q)
    with pytest.raises(ValueError, match="head dim"):
        big = rand(1, 4, 1, 512)
        hbkernels.temporal_attention(big, big, big)
    for bad in (float("nan"), float("inf"), -math.inf, 1e300, -1e39):  # the last two: inf in the kernels' fp32
        with pytest.raises(ValueError, match="scale must be a finite float"):
            hbkernels.temporal_attention(q, q, q, scale=bad)
    with pytest.raises(TypeError, match="scale"):
        hbkernels.temporal_attention(q, q, q, scale=True)
    with pytest.raises(TypeError, match="causal must be a bool"):
        hbkernels.temporal_attention(q, q, q, causal="no")
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="v is on meta"):
            hbkernels.temporal_attention(q, q, torch.empty_like(q, device="meta"))


def test_temporal_attention_numpy_scalars_and_empty_heads():
    """numpy scalars work as scale and causal, as eps and num_groups do in the norms; a head dim of 0
    gives an empty output rather than a division by zero in the default scale."""
    import numpy as np

    q, k, v = rand(3, 2, 5, 2, 8).unbind(0)
    torch.testing.assert_close(hbkernels.temporal_attention(q, k, v, scale=np.float32(0.5), causal=np.bool_(True)),
                               hbkernels.temporal_attention(q, k, v, scale=0.5, causal=True))
    empty = rand(2, 5, 2, 0)
    assert hbkernels.temporal_attention(empty, empty, empty).shape == (2, 5, 2, 0)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_temporal_attention_head_dim_one_with_an_odd_stride(backend_name):
    """D = 1 may carry any stride (here 7); the kernels take it as unit-stride without a copy."""
    q = rand(2, 3, 4, dtype=torch.float64).as_strided((2, 3, 4, 1), (12, 4, 1, 7)).detach().requires_grad_()
    k, v = (rand(2, 3, 4, 1, dtype=torch.float64, requires_grad=True) for _ in range(2))
    check_against_float64(lambda q, k, v: hbkernels.temporal_attention(q, k, v), [q, k, v], backend_name,
                          torch.float32)


def test_reference_attention_in_slices_past_65535_rows():
    """The reference backend's SDPA path runs 65,535 (token, head) rows a call: a second slice joins the first."""
    from hbkernels import reference

    q, k, v = rand(3, 70000, 2, 1, 4).unbind(0)
    got = reference.temporal_attention(q, k, v, 0.5, False)
    want = reference.temporal_attention(q.double(), k.double(), v.double(), 0.5, False)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.skipif(ON_GPU or not backend.cpp_available(), reason="C++ backend not built / not CPU")
def test_cpp_causal_attention_reuses_buffers_across_heads(single_thread):
    """One thread runs every head in turn, each with several query blocks (T = 77): the causal
    backward must clear the dK/dV rows the previous head left in its per-thread buffers."""
    base = rand(3, 1, 77, 3, 40, dtype=torch.float64, requires_grad=True)
    check_against_float64(lambda b: hbkernels.temporal_attention(*b.unbind(0), causal=True), [base], "cpp",
                          torch.float32)


@pytest.mark.skipif(ON_GPU or not backend.cpp_available(), reason="C++ backend not built / not CPU")
def test_cpp_causal_attention_long_key_sums():
    """T = 200, causal: key 0's dK/dV rows sum over all 200 queries. Summed in one chain those sums
    carried 1.4-2.5x PyTorch's fp32 error; summed in chunks, 0.5-0.95x."""
    for _ in range(3):  # q, k, v apart: each gradient held to PyTorch's error in that gradient
        qkv = [rand(4, 200, 2, 64, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        check_against_float64(lambda q, k, v: hbkernels.temporal_attention(q, k, v, causal=True), qkv, "cpp",
                              torch.float32, factor=1.0)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_temporal_attention_large_scores(backend_name):
    """q . k ~ 300, scaled ~ 100: the row max taken of unscaled scores would underflow every exp."""
    n, t, h, d = 1, 5, 1, 8
    q = (6.0 + 0.1 * rand(n, t, h, d)).requires_grad_()
    k = (6.0 + 0.1 * rand(n, t, h, d)).requires_grad_()
    v = rand(n, t, h, d)
    with hbkernels.use_backend(backend_name):
        out = hbkernels.temporal_attention(q, k, v)
    want = hbkernels.reference.temporal_attention(q.double(), k.double(), v.double(), 1 / math.sqrt(d), False)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-3)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # the interpreter, on masked lanes
def test_temporal_attention_huge_scores_with_a_scale_not_a_power_of_two(backend_name, causal):
    """Scaled scores ~1e10 at D = 40 (scale 1/sqrt(40) rounds in every product): the C++ kernels took
    the row max of rounded products but exponentiated unrounded ones (one FMA), so the max's own exp
    could underflow and the row come out 0 / 0 = NaN. The Triton backward's compiled code fused the
    same FMA (sm_90 PTX; the interpreter does not fuse)."""
    n, t, h, d = 2, 16, 2, 40
    q, k = (1e5 * rand(n, t, h, d, dtype=torch.float64) for _ in range(2))
    v, dout = rand(n, t, h, d, dtype=torch.float64), rand(n, t, h, d, dtype=torch.float64)
    q64, k64, v64 = (x.clone().requires_grad_() for x in (q, k, v))
    want = hbkernels.reference.temporal_attention(q64, k64, v64, 1 / math.sqrt(d), causal)
    want_grads = torch.autograd.grad(want, [q64, k64, v64], dout)
    q32, k32, v32 = (x.float().requires_grad_() for x in (q, k, v))
    with hbkernels.use_backend(backend_name):
        out = hbkernels.temporal_attention(q32, k32, v32, causal=causal)
        grads = torch.autograd.grad(out, [q32, k32, v32], dout.float())
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    for g, w in zip(grads, want_grads):  # rows are one-hot: dq, dk vanish but for rounding
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend_name", TRITON)
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")  # the NaN score: numpy
def test_temporal_attention_backward_scores_above_the_forward_max(backend_name):
    """The Triton backward recomputes S and subtracts the forward's row max m; its tiles may take other
    MMA instructions than the forward's, so a score may come out an ulp above m, which at scores ~1e9
    is past exp2's range. Stand-in: m lowered by 200 (log2 units) after the forward. P stays finite
    (at most 1 / l), and a NaN score still gives NaN gradients."""
    q, k, v = (rand(1, 8, 1, 16, requires_grad=True) for _ in range(3))
    with hbkernels.use_backend(backend_name):
        out = hbkernels.temporal_attention(q, k, v)
        stats = out.grad_fn.saved_tensors[4]
        stats.data[..., 0] -= 200.0  # .data: around the version check, as a mismatched recompute would be
        grads = torch.autograd.grad(out, [q, k, v], torch.ones_like(out))
    assert all(torch.isfinite(g).all() for g in grads)
    q = q.detach().clone()
    q[0, 3, 0, 0] = float("nan")
    q.requires_grad_()
    with hbkernels.use_backend(backend_name):
        (dq,) = torch.autograd.grad(hbkernels.temporal_attention(q, k, v), [q], torch.ones_like(out))
    assert dq[0, 3].isnan().all()


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("need", ["k", "v", "kv"])
def test_temporal_attention_grad_without_q(backend_name, need):
    """Softmax row statistics kept for the backward when only k or v need gradients."""
    q = rand(1, 16, 2, 40, dtype=torch.float64)
    k = rand(1, 16, 2, 40, dtype=torch.float64, requires_grad="k" in need)
    v = rand(1, 16, 2, 40, dtype=torch.float64, requires_grad="v" in need)
    check_against_float64(lambda q, k, v: hbkernels.temporal_attention(q, k, v), [q, k, v], backend_name,
                          torch.float32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_temporal_attention_backward_strided_grad(backend_name):
    """An output gradient whose last dim is not unit-stride (e.g. from a slice after the op)."""
    base = rand(3, 1, 16, 2, 8, requires_grad=True)
    grad_out = rand(1, 16, 2, 16)[..., ::2]  # stride 2 along D
    assert grad_out.stride(-1) == 2
    got = {}
    for name in (backend_name, "torch"):
        b = base.detach().clone().requires_grad_()
        with hbkernels.use_backend(name):
            out = hbkernels.temporal_attention(*b.unbind(0))
        (got[name],) = torch.autograd.grad(out, b, grad_out)
    torch.testing.assert_close(got[backend_name], got["torch"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend_name", [*KERNEL_BACKENDS, "torch"])
@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_temporal_attention_causal_nonpositive_scale(backend_name, scale):
    """Causal with scale <= 0: SDPA's CPU kernel gives NaN there (the reference must not inherit it).
    The kernels are held to the reference's own error; the reference itself (whose error that bound
    is) to fp32 rounding of the float64 result."""
    base = rand(3, 1, 5, 2, 16, dtype=torch.float64, requires_grad=True)

    def fn(b):
        return hbkernels.temporal_attention(*b.unbind(0), scale=scale, causal=True)

    if backend_name != "torch":
        check_against_float64(fn, [base], backend_name, torch.float32)
        return
    b32 = base.detach().float().requires_grad_()
    grad_out = torch.randn(1, 5, 2, 16, dtype=torch.float64)
    with hbkernels.use_backend("torch"):
        want, got = fn(base), fn(b32)
        (want_grad,), (got_grad,) = torch.autograd.grad(want, base, grad_out), torch.autograd.grad(got, b32, grad_out.float())
    assert_gradients_close([got.double(), got_grad.double()], [want, want_grad], "fp32 reference", rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning",  # the NaN dq: numpy says so
                            "ignore:All-NaN slice encountered:RuntimeWarning")
def test_temporal_attention_first_key_block_all_minus_inf(backend_name):
    """Keys 0-63 score -inf for every query (a -inf component against positive queries): the online
    softmax's running max stayed -inf over the first key block, and exp2(-inf - -inf) made every row
    NaN, though the later keys are finite. The float64 reference attends to those."""
    q, k, v = (rand(1, 70, 1, 16) for _ in range(3))
    q[..., 0] = q[..., 0].abs() + 0.1
    k[:, :64] = 0.0
    k[:, :64, :, 0] = float("-inf")
    inputs = [t.requires_grad_() for t in (q, k, v)]
    grad_out = rand(1, 70, 1, 16)
    with hbkernels.use_backend(backend_name):
        out = hbkernels.temporal_attention(*inputs)
        grads = torch.autograd.grad(out, inputs, grad_out)
    ref = [t.detach().double().requires_grad_() for t in inputs]
    want = hbkernels.reference.temporal_attention(*ref, 0.25, False)  # D = 16: the default scale
    want_grads = torch.autograd.grad(want, ref, grad_out.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    for name, got, expected in zip("kv", grads[1:], want_grads[1:]):  # dq is NaN in both (0 * -inf)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
    assert torch.equal(grads[0].isnan(), want_grads[0].isnan())


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_temporal_attention_samples_past_int32(backend_name):
    """q, k, v whose sample stride is BIG_STRIDE: sample 2 starts past 2^31 elements (int64 n * stride)."""
    store = past_int32_storage(extra=3 * 5 * 16)
    q, k, v = (store.as_strided((3, 5, 1, 16), (BIG_STRIDE, 16, 16, 1), i * 5 * 16) for i in range(3))
    for t in (q, k, v):
        t.copy_(rand(3, 5, 1, 16))
    with hbkernels.use_backend(backend_name):
        out = hbkernels.temporal_attention(q, k, v)
    want = hbkernels.reference.temporal_attention(q.double(), k.double(), v.double(), 0.25, False)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=4e-3)


@pytest.mark.parametrize("backend_name", ["torch", *KERNEL_BACKENDS])
def test_temporal_attention_under_autocast_runs_in_its_dtype(backend_name):
    """fp32 q, k, v under autocast: the kernels ran in fp32 and returned fp32 where SDPA (and so the
    reference backend) runs in the autocast dtype, so results and their dtype depended on the backend."""
    device_type = torch.device(DEVICE).type
    q, k, v = (rand(3, 5, 2, 8, requires_grad=True) for _ in range(3))
    with torch.autocast(device_type, dtype=torch.bfloat16):
        want = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
        with hbkernels.use_backend(backend_name):
            got = hbkernels.temporal_attention(q, k, v)
            empty = hbkernels.temporal_attention(*(x[:0] for x in (q, k, v)))
    assert got.dtype == empty.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.transpose(1, 2), atol=2e-2, rtol=2e-2)
    got.float().sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0
    with torch.autocast(device_type, dtype=torch.bfloat16):  # mixed dtypes, which autocast makes agree
        assert hbkernels.temporal_attention(q, k.bfloat16(), v).dtype == torch.bfloat16


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_attention_scale_whose_log2e_multiple_passes_fp32_is_refused(backend_name):
    """The Triton kernels scale scores by scale * log2(e) in fp32: a scale within fp32 but past
    FP32_MAX / log2(e) made that inf and the output NaN (torch's own output finite); every backend
    refuses it by name, and the largest scale the kernels take still gives torch's answer."""
    largest = torch.finfo(torch.float32).max / math.log2(math.e)
    q = rand(1, 3, 1, 16) * 0.05
    for bad in (3e38, -2.5e38):
        with use_backend(backend_name), pytest.raises(ValueError, match="scale must be a finite float"):
            hbkernels.temporal_attention(q, q, q, scale=bad)
    with use_backend(backend_name):
        out = hbkernels.temporal_attention(q, q, q, scale=largest)
    with use_backend("torch"):
        want = hbkernels.temporal_attention(q.double(), q.double(), q.double(), scale=largest)
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-5)
