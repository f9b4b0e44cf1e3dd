import pytest
import torch
from einops import rearrange

import hbkernels
from helpers import BACKENDS, KERNEL_BACKENDS, DTYPES, check_against_float64, huge_strided_views, rand, shapes

QUICK = [(1, 12, 16, 2, 3), (2, 5, 1, 3, 2), (1, 8, 25, 2, 2)]
FULL = QUICK + [(1, 320, 16, 40, 64), (2, 640, 26, 20, 32), (1, 1280, 25, 9, 16)]


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", shapes(QUICK, FULL))
@pytest.mark.parametrize("residual_layout", [None, "contiguous", "channels_last", "frames_major", "width_major"])
def test_tokens_to_video(backend_name, dtype, shape, residual_layout):
    n, c, t, h, w = shape
    tokens = rand(n * h * w, t, c, dtype=torch.float64, requires_grad=True)
    if residual_layout is None:
        def fn(tokens):
            return hbkernels.tokens_to_video(tokens, shape=shape)

        check_against_float64(fn, [tokens], backend_name, dtype)
        return
    res = rand(*shape, dtype=torch.float64, requires_grad=True)

    def fn(tokens, res):
        if residual_layout == "channels_last":
            res = res.contiguous(memory_format=torch.channels_last_3d)
        elif residual_layout == "frames_major":  # diffusers' (B*T, C, H, W) activations seen as 5D
            res = res.transpose(1, 2).contiguous().transpose(1, 2)
        elif residual_layout == "width_major":  # H and W can't merge into one axis without a copy
            res = res.transpose(3, 4).contiguous().transpose(3, 4)
        return hbkernels.tokens_to_video(tokens, res)

    check_against_float64(fn, [tokens, res], backend_name, dtype)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_tokens_to_video_inverts_group_norm_to_tokens_layout(backend_name):
    x = rand(2, 6, 3, 4, 5)
    tokens = rearrange(x, "n c t h w -> (n h w) t c")
    with hbkernels.use_backend(backend_name):
        back = hbkernels.tokens_to_video(tokens, shape=x.shape)
        res = rand(*x.shape).transpose(1, 2).contiguous().transpose(1, 2)
        summed = hbkernels.tokens_to_video(tokens, res)
    assert torch.equal(back, x)
    assert torch.equal(summed, x + res)
    assert summed.stride() == res.stride()  # the residual's memory order is kept


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tokens_to_video_returns_a_tensor_of_its_own(backend_name, dtype):
    """Tokens that are a view of an already-contiguous video (N = 1): the result must not be the
    tokens' memory, or writing into it changes the input (float64 always runs the reference)."""
    video = torch.randn(1, 8, 3, 2, 4, dtype=dtype)
    tokens = video.permute(0, 3, 4, 2, 1).reshape(8, 3, 8)  # (N*H*W, T, C), a view of video
    with hbkernels.use_backend(backend_name):
        out = hbkernels.tokens_to_video(tokens, shape=video.shape)
    assert torch.equal(out, video) and out.data_ptr() != video.data_ptr()


def test_tokens_to_video_bad_input():
    tokens = rand(24, 3, 6)
    with pytest.raises(ValueError, match="shape=\\(N, C, T, H, W\\) is required"):
        hbkernels.tokens_to_video(tokens)
    with pytest.raises(ValueError, match="tokens must have shape"):
        hbkernels.tokens_to_video(tokens, shape=(2, 6, 3, 4, 4))
    with pytest.raises(ValueError, match="tokens must be 3D"):
        hbkernels.tokens_to_video(tokens[0], shape=(2, 6, 3, 4, 3))
    with pytest.raises(ValueError, match="residual must be 5D"):
        hbkernels.tokens_to_video(tokens, rand(2, 6, 3, 12))
    with pytest.raises(TypeError, match="residual has dtype"):
        hbkernels.tokens_to_video(tokens, rand(2, 6, 3, 4, 3).half())
    with pytest.raises(ValueError, match="disagrees with residual"):
        hbkernels.tokens_to_video(tokens, rand(2, 6, 3, 4, 3), shape=(2, 6, 3, 3, 4))
    # not truncated to ints, nor negative sizes whose product happens to match
    for shape in [(2, 6, 3, 4, 3.0), (2, 6, 3, 4, 3.5), (-2, 6, 3, -4, 3), (2, 6, 3, 4), (True, 6, 3, 4, 6)]:
        with pytest.raises(ValueError, match="shape must be \\(N, C, T, H, W\\) of ints >= 0"):
            hbkernels.tokens_to_video(tokens, shape=shape)
    with pytest.raises(TypeError, match="shape must be a tuple \\(N, C, T, H, W\\) of ints, got int"):
        hbkernels.tokens_to_video(tokens, shape=5)
    import numpy as np  # numpy and torch integers are ints
    assert hbkernels.tokens_to_video(tokens, shape=(np.int64(2), 6, 3, torch.tensor(4), 3)).shape == (2, 6, 3, 4, 3)


def _layout(t, layout):
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    if layout == "channels_last":
        return t.contiguous(memory_format=fmt)
    if layout == "frames_major" and t.dim() == 5:  # diffusers' (B*T, C, H, W) activations seen as 5D
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", shapes([(2, 12, 3, 5), (1, 12, 4, 2, 3), (2, 5, 1, 3, 2)],
                                         [(2, 12, 3, 5), (26, 320, 40, 64), (1, 320, 26, 40, 64)]))
@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                     ("contiguous", "channels_last"), ("frames_major", "frames_major")])
@pytest.mark.parametrize("with_bias", [True, False])
def test_residual_add(backend_name, dtype, shape, layouts, with_bias):
    x = rand(*shape, dtype=torch.float64, requires_grad=True)
    res = rand(*shape, dtype=torch.float64, requires_grad=True)
    bias = rand(shape[1], dtype=torch.float64, requires_grad=True)

    def fn(x, res, *bias):
        return hbkernels.residual_add(_layout(x, layouts[0]), _layout(res, layouts[1]), *bias)

    check_against_float64(fn, [x, res] + ([bias] if with_bias else []), backend_name, dtype)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_residual_add_keeps_the_residual_layout(backend_name):
    x = rand(2, 16, 3, 4, 5)
    res = rand(2, 16, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)
    with hbkernels.use_backend(backend_name):
        out = hbkernels.residual_add(x, res, torch.ones(16, device=x.device))
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, x + res + 1)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_residual_add_fp32_bias_gradient_of_fp16_activations(backend_name):
    """The bias gradient sums dy over N, T, H, W: in fp16 a channel's sum of 4096 values of 16 (65536)
    overflows, so it accumulates in fp32 and is returned in the bias's fp32."""
    x, res = rand(1, 4, 1, 64, 64, dtype=torch.float16), rand(1, 4, 1, 64, 64, dtype=torch.float16)
    bias = rand(4, requires_grad=True)
    with hbkernels.use_backend(backend_name):
        out = hbkernels.residual_add(x, res, bias)
    (db,) = torch.autograd.grad(out, [bias], torch.full_like(out, 16.0))
    assert db.dtype == torch.float32
    torch.testing.assert_close(db, torch.full((4,), 65536.0, device=db.device))


def test_reference_residual_add_stays_float64():
    """The reference adds in fp32 at least: float64, the tests' ground truth, must stay float64."""
    x, res, bias = rand(2, 3, 4, 5, dtype=torch.float64), rand(2, 3, 4, 5, dtype=torch.float64), rand(3, dtype=torch.float64)
    assert torch.equal(hbkernels.reference.residual_add(x, res, bias), x + res + bias.view(-1, 1, 1))


def test_residual_add_bad_input():
    x = rand(2, 4, 3, 3)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        hbkernels.residual_add(x, rand(2, 4, 3, 2))
    with pytest.raises(ValueError, match="x must be 4D or 5D"):
        hbkernels.residual_add(x[0], x[0])
    with pytest.raises(ValueError, match="bias must have 4 elements"):
        hbkernels.residual_add(x, x, rand(3))
    with pytest.raises(TypeError, match="residual has dtype"):
        hbkernels.residual_add(x, x.double())


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_layout_ops_on_empty_videos(backend_name):
    """Zero frames or pixels: every backend returns the empty result (Triton once divided by zero)."""
    with hbkernels.use_backend(backend_name):
        out = hbkernels.residual_add(rand(2, 4, 0, 3), rand(2, 4, 0, 3), rand(4))
        video = hbkernels.tokens_to_video(rand(0, 3, 4), rand(2, 4, 3, 0, 2))
    assert out.shape == (2, 4, 0, 3) and video.shape == (2, 4, 3, 0, 2)


# Token layout at a 1x1 spatial level (tokens are frames only), residuals whose strides differ
# from the output's, and more channels than one C++ transposed tile holds (128).


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("residual_layout", [None, "frames_major"])
def test_tokens_to_video_one_pixel(backend_name, residual_layout):
    shape = (2, 6, 5, 1, 1)
    n, c, t, h, w = shape
    tokens = rand(n * h * w, t, c, dtype=torch.float64, requires_grad=True)
    if residual_layout is None:
        check_against_float64(lambda tok: hbkernels.tokens_to_video(tok, shape=shape), [tokens], backend_name,
                              torch.float32)
        return
    res = rand(*shape, dtype=torch.float64, requires_grad=True)

    def fn(tok, res):
        return hbkernels.tokens_to_video(tok, res.transpose(1, 2).contiguous().transpose(1, 2))

    check_against_float64(fn, [tokens, res], backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_group_norm_to_tokens_one_pixel(backend_name):
    x = rand(2, 8, 5, 1, 1, dtype=torch.float64, mean=1.0, requires_grad=True)
    w = rand(8, dtype=torch.float64, requires_grad=True)
    b = rand(8, dtype=torch.float64, requires_grad=True)
    check_against_float64(lambda x, w, b: hbkernels.group_norm_to_tokens(x, 2, w, b, eps=1e-6), [x, w, b],
                          backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", ["residual_add", "tokens_to_video"])
def test_layout_ops_with_a_strided_residual(backend_name, op):
    """A non-dense residual whose H and W still merge into one axis (every other element of W): the
    output is allocated dense, so its strides differ from the residual's."""
    shape = (2, 4, 3, 3, 5)
    res_base = rand(*shape[:-1], 2 * shape[-1], dtype=torch.float64, requires_grad=True)
    n, c, t, h, w = shape
    if op == "residual_add":
        x = rand(*shape, dtype=torch.float64, requires_grad=True)
        bias = rand(c, dtype=torch.float64, requires_grad=True)
        check_against_float64(lambda x, r, b: hbkernels.residual_add(x, r[..., ::2], b), [x, res_base, bias],
                              backend_name, torch.float32)
    else:
        tokens = rand(n * h * w, t, c, dtype=torch.float64, requires_grad=True)
        check_against_float64(lambda tok, r: hbkernels.tokens_to_video(tok, r[..., ::2]), [tokens, res_base],
                              backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("layouts", [("channels_last", "contiguous"), ("contiguous", "channels_last")])
def test_residual_add_wide_channels_mixed_layouts(backend_name, layouts):
    shape = (1, 160, 2, 3, 3)
    x = rand(*shape, dtype=torch.float64, requires_grad=True)
    res = rand(*shape, dtype=torch.float64, requires_grad=True)
    bias = rand(shape[1], dtype=torch.float64, requires_grad=True)

    def lay(t, layout):
        return t.contiguous(memory_format=torch.channels_last_3d) if layout == "channels_last" else t

    check_against_float64(lambda x, r, b: hbkernels.residual_add(lay(x, layouts[0]), lay(r, layouts[1]), b),
                          [x, res, bias], backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_to_tokens_wide_channels(backend_name, activation):
    x = rand(1, 160, 2, 2, 3, dtype=torch.float64, mean=1.0, requires_grad=True)
    w = rand(160, dtype=torch.float64, requires_grad=True)
    b = rand(160, dtype=torch.float64, requires_grad=True)
    check_against_float64(lambda x, w, b: hbkernels.group_norm_to_tokens(x, 32, w, b, eps=1e-6,
                                                                         activation=activation),
                          [x, w, b], backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_residual_add_offsets_past_int32(backend_name):
    """Inputs whose channel or position offsets pass 2^31 elements: int64 index arithmetic."""
    x, res = huge_strided_views(3, 3)
    bias = rand(3)
    with hbkernels.use_backend(backend_name):
        out = hbkernels.residual_add(x.unsqueeze(-1), res.unsqueeze(-1), bias)
    want = x.double() + res.double() + bias.double()[:, None, None]
    torch.testing.assert_close(out.squeeze(-1).double(), want, rtol=0, atol=2e-3)
