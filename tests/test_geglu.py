import pytest
import torch

import hbkernels
from helpers import BIG_STRIDE, KERNEL_BACKENDS, DTYPES, check_against_float64, past_int32_storage, rand, shapes

# F = 40: ragged last column block; 2100: past a C++ chunk; 300 rows: two Triton row programs, the last ragged
QUICK = [(7, 10), (2, 3, 40), (1, 160), (3, 80), (2, 4200), (2, 150, 32)]
# Level-0 spatial and level-2 temporal widths, fewer rows than the model's (40960 / 16640): a float64
# reference with gradients of those takes ~10 GB per test, and the GPU run has 8 test workers.
FULL = QUICK + [(2560 * 4, 2560), (640 * 4, 10240), (77, 8192)]


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", shapes(QUICK, FULL))
@pytest.mark.parametrize("strided", [False, True])
def test_geglu(backend_name, dtype, shape, strided):
    x = rand(*shape, dtype=torch.float64, requires_grad=True)

    def fn(x):
        return hbkernels.geglu(x.transpose(0, -1).contiguous().transpose(0, -1) if strided else x)

    check_against_float64(fn, [x], backend_name, dtype)


def test_geglu_bad_input():
    with pytest.raises(ValueError, match="last dim must be even"):
        hbkernels.geglu(rand(3, 5))
    with pytest.raises(TypeError, match="x must have dtype"):
        hbkernels.geglu(torch.ones(3, 4, dtype=torch.int32))


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_geglu_one_feature_with_an_odd_gradient_stride(backend_name):
    """F = 1 with a transposed incoming gradient: the (M, 1) gradient's column stride is not 1."""
    x = rand(4, 2, dtype=torch.float64, requires_grad=True)
    check_against_float64(lambda x: hbkernels.geglu(x).t().contiguous().t(), [x], backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_geglu_gradient_rows_past_int32(backend_name):
    """An incoming gradient whose row stride fits int32 but whose third row lies past 2^31 elements
    (a narrowed view of a wide tensor): int64 row offsets in the backward."""
    dy = past_int32_storage().as_strided((3, 16), (BIG_STRIDE, 1))
    dy.copy_(rand(3, 16))
    x = rand(3, 32, dtype=torch.float16, requires_grad=True)
    with hbkernels.use_backend(backend_name):
        (dx,) = torch.autograd.grad(hbkernels.geglu(x), [x], dy)
    x64 = x.detach().double().requires_grad_()
    h, g = x64.chunk(2, -1)
    (want,) = torch.autograd.grad(h * torch.nn.functional.gelu(g), [x64], dy.double())
    torch.testing.assert_close(dx.double(), want, rtol=0, atol=4e-3)
