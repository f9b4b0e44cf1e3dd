import copy

import pytest
import torch
import torch.nn.functional as F

import hbkernels
from helpers import BACKENDS, DEVICE, LowRankAdapter, rand


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 12, 5), (2, 12), (1, 12, 4, 4), (1, 12, 3, 2, 2), (0, 12, 5), (0, 12)])
def test_group_norm_module_matches_torch(backend_name, shape):
    ours = hbkernels.nn.GroupNorm(4, 12, eps=1e-6, activation="silu").to(DEVICE)
    torch_norm = torch.nn.GroupNorm(4, 12, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        torch_norm.weight.normal_()
        torch_norm.bias.normal_()
    ours.load_state_dict(torch_norm.state_dict())
    assert ours.state_dict().keys() == torch_norm.state_dict().keys()
    x = rand(*shape, mean=2.0)
    with hbkernels.use_backend(backend_name):
        got = ours(x)
    torch.testing.assert_close(got, F.silu(torch_norm(x)), atol=2e-5, rtol=1e-5)


def test_group_norm_from_torch_shares_parameters():
    norm = torch.nn.GroupNorm(2, 8)
    fused = hbkernels.nn.GroupNorm.from_torch(norm, activation="silu")
    assert fused.weight is norm.weight and fused.bias is norm.bias and fused.activation == "silu"


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_geglu_module_matches_diffusers(backend_name):
    from diffusers.models.activations import GEGLU

    ref = GEGLU(16, 24).to(DEVICE)
    ours = hbkernels.nn.GEGLU(16, 24).to(DEVICE)
    ours.load_state_dict(ref.state_dict())  # strict: same keys
    x = rand(3, 5, 16)
    with hbkernels.use_backend(backend_name):
        got = ours(x)
    torch.testing.assert_close(got, ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_temporal_attention_module_matches_diffusers(backend_name):
    from diffusers.models.attention_processor import Attention

    ref = Attention(query_dim=32, heads=4, dim_head=8).to(DEVICE)
    ours = hbkernels.nn.TemporalAttention(32, heads=4, dim_head=8).to(DEVICE)
    ours.load_state_dict(ref.state_dict())  # strict: same keys
    x = rand(6, 25, 32)
    with hbkernels.use_backend(backend_name):
        got = ours(x)
    torch.testing.assert_close(got, ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_temporal_attention_fused_projections(backend_name):
    ours = hbkernels.nn.TemporalAttention(32, heads=4, dim_head=8, bias=True).to(DEVICE)
    keys = set(ours.state_dict())
    x = rand(6, 25, 32)
    with hbkernels.use_backend(backend_name), torch.no_grad():
        want = ours(x)
        ours.fuse_projections()
        got = ours(x)
        weight = ours.to_qkv.weight
        torch.nn.init.zeros_(ours.to_v.weight)  # the fused copy follows, in place
        changed = ours(x)
        assert ours.to_qkv.weight is weight and not ours.to_qkv.weight[-32:].any()
        ours.unfuse_projections()
        torch.testing.assert_close(ours(x), changed, atol=1e-5, rtol=1e-5)  # the separate layers agree
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed, want)
    assert set(ours.state_dict()) == keys


def test_fused_projections_refresh_after_writes_into_data():
    """Writes through ``.data`` (diffusers' EMAModel.copy_to) leave tensor versions as they were, so the
    fused copy cannot see them: an explicit refresh() copies whatever changed (it compared versions,
    and so kept the stale q, k, v while to_out had the new weights)."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    ours = hbkernels.nn.TemporalAttention(32, heads=4, dim_head=8, bias=True)
    ema = EMAModel(copy.deepcopy(ours).parameters())
    with torch.no_grad():
        for p in ema.shadow_params:
            p.add_(torch.randn_like(p))
    x = rand(6, 5, 32)
    ours.fuse_projections()
    with torch.no_grad():
        ours(x)
        ema.copy_to(ours.parameters())
        ours.to_qkv.refresh()
        got = ours(x)
        ours.unfuse_projections()
        torch.testing.assert_close(got, ours(x), atol=1e-5, rtol=1e-5)


def test_fused_projections_refresh_leaves_offloaded_layers_alone():
    """accelerate's offload keeps the layers' weights on the meta device between calls: a refresh (the
    pipeline's, each call) failed copying out of meta; the forward calls those layers anyway."""
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    ours = hbkernels.nn.TemporalAttention(32, heads=4, dim_head=8, bias=True)
    x = rand(6, 5, 32)
    with torch.no_grad():
        want = ours(x)
    ours.fuse_projections()
    accelerate.cpu_offload(ours, execution_device=torch.device("cpu"))
    ours.to_qkv.refresh()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)


def test_fused_projections_train_the_layers():
    """With gradients wanted, the fused GEMM is built from the live weights: to_q, to_k and to_v get the
    gradients the separate layers would (a snapshot would leave them None); after an optimizer step,
    inference uses the trained weights too."""
    torch.manual_seed(0)
    ours = hbkernels.nn.TemporalAttention(32, heads=4, dim_head=8, bias=True).to(DEVICE)
    x = rand(3, 5, 32)
    grads = {}
    for fused in (False, True):
        ours.fuse_projections() if fused else ours.unfuse_projections()
        ours.zero_grad()
        ours(x).square().sum().backward()
        grads[fused] = {name: p.grad.clone() for name, p in ours.named_parameters()}
    assert grads[True].keys() == grads[False].keys() and "to_q.weight" in grads[True]
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, atol=1e-5, rtol=1e-5, msg=name)
    torch.optim.SGD(ours.parameters(), lr=0.1).step()
    with torch.no_grad():
        fused = ours(x)
        ours.unfuse_projections()
        torch.testing.assert_close(fused, ours(x), atol=1e-5, rtol=1e-5)


class ScaledLinear(torch.nn.Linear):
    """An nn.Linear whose forward is its own (as a quantised linear's): its weights alone are not its output."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_fusable_layers():
    assert hbkernels.nn.fusable(torch.nn.Linear(4, 4))
    assert not hbkernels.nn.fusable(ScaledLinear(4, 4))
    assert not hbkernels.nn.fusable(LowRankAdapter(torch.nn.Linear(4, 4)))
    with pytest.raises(TypeError, match=r"linears\[1\] must be a plain nn.Linear.*ScaledLinear"):
        hbkernels.nn.FusedLinear(torch.nn.Linear(4, 4), ScaledLinear(4, 4))


@pytest.mark.parametrize("adapted", ["before", "after"])
def test_temporal_attention_with_an_adapter_and_fused_projections(adapted):
    """An adapter wrapping to_k: before fusing, fusing is refused (its weights are not its output);
    after fusing, forward calls the projections instead of the fused copy, which would drop it."""
    torch.manual_seed(0)
    ours = hbkernels.nn.TemporalAttention(32, heads=4, dim_head=8).to(DEVICE)
    x = rand(3, 5, 32)
    if adapted == "before":
        ours.to_k = LowRankAdapter(ours.to_k).to(DEVICE)
        with pytest.raises(TypeError, match="merge an adapter"):
            ours.fuse_projections()
        return
    ours.fuse_projections()
    with torch.no_grad():
        plain = ours(x)
        ours.to_k = LowRankAdapter(ours.to_k).to(DEVICE)
        got = ours(x)
        ours.unfuse_projections()
        want = ours(x)
    assert not torch.allclose(want, plain)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_fused_linear_over_weights_made_in_inference_mode():
    """Weights created under torch.inference_mode (a model loaded there) keep no version counter:
    reading it raised, so fusing such a model failed."""
    with torch.inference_mode():
        a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)
    x = torch.randn(5, 4)
    fused = hbkernels.nn.FusedLinear(a, b)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), torch.cat([a(x), b(x)], dim=-1))
    with torch.no_grad():
        a.weight = torch.nn.Parameter(torch.zeros(3, 4))  # replaced, not changed in place: seen
        torch.testing.assert_close(fused(x), torch.cat([a(x), b(x)], dim=-1))


def test_fused_linear_fills_missing_biases():
    a, b = torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(4, 2)
    x = torch.randn(5, 4)
    torch.testing.assert_close(hbkernels.nn.FusedLinear(a, b)(x), torch.cat([a(x), b(x)], dim=-1))
    assert hbkernels.nn.FusedLinear(a, a).bias is None


def test_modules_reject_bad_rank():
    with pytest.raises(ValueError, match="x must be tokens"):
        hbkernels.nn.TemporalAttention(8, 2, 4)(torch.randn(2, 3, 4, 8))
    with pytest.raises(ValueError, match="x must be"):
        hbkernels.nn.GroupNorm(2, 4)(torch.randn(4))



@pytest.mark.parametrize("kwargs", [dict(elementwise_affine=False), dict(bias=False), {}])
def test_layer_norm_module_rejects_a_wrong_width(kwargs):
    """As torch.nn.LayerNorm: x's last dim must be normalized_shape, also without a weight to check
    it against (it would otherwise normalise over the wrong width silently)."""
    with pytest.raises(RuntimeError):
        torch.nn.LayerNorm(16, **kwargs)(torch.randn(2, 32))
    with pytest.raises(ValueError, match="normalized_shape|elements"):
        hbkernels.nn.LayerNorm(16, **kwargs)(torch.randn(2, 32))

def test_conv_deferring_bias():
    """A plain biased conv hands back its bias; hooked, subclassed or bias-free convs run whole."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 6, (3, 1, 1), padding=(1, 0, 0))
    x = torch.randn(2, 4, 5, 3, 3)
    y, bias = hbkernels.nn.conv_deferring_bias(conv, x)
    assert bias is conv.bias
    torch.testing.assert_close(y + bias[:, None, None, None], conv(x))

    class Wrapped(torch.nn.Conv3d):  # e.g. a LoRA layer: its forward must run
        def forward(self, x):
            return super().forward(x) * 2

    wrapped = Wrapped(4, 6, 1)
    y, bias = hbkernels.nn.conv_deferring_bias(wrapped, x)
    assert bias is None
    torch.testing.assert_close(y, wrapped(x))
    handle = conv.register_forward_hook(lambda module, args, out: out + 1)
    y, bias = hbkernels.nn.conv_deferring_bias(conv, x)
    handle.remove()
    assert bias is None
    torch.testing.assert_close(y, conv(x) + 1)
    no_bias = torch.nn.Conv3d(4, 6, 1, bias=False)
    assert hbkernels.nn.conv_deferring_bias(no_bias, x)[1] is None


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("op", ["group_norm", "group_norm_to_tokens", "layer_norm", "geglu", "temporal_attention"])
def test_empty_batch_as_torch_takes_it(backend_name, op):
    """A zero-size batch gives zero-size outputs and gradients, as torch's own ops do (a model patched
    by apply_to must take what the stock model takes)."""
    w = rand(8, requires_grad=True)
    x = rand(0, 8, 3, 2, 2, requires_grad=True)  # (N, C, T, H, W)
    calls = {
        "group_norm": (lambda: hbkernels.group_norm(x, 4, w, activation="silu", shift=rand(0, 8)),
                       lambda: F.silu(F.group_norm(x, 4, w))),
        "group_norm_to_tokens": (lambda: hbkernels.group_norm_to_tokens(x, 4, w), lambda: x.new_zeros(0, 3, 8)),
        "layer_norm": (lambda: hbkernels.layer_norm(x.flatten(2).transpose(1, 2)[..., :8], w),
                       lambda: F.layer_norm(x.flatten(2).transpose(1, 2)[..., :8], (8,), w)),
        "geglu": (lambda: hbkernels.geglu(x.flatten(1)), lambda: x.flatten(1)[:, :48]),
        "temporal_attention": (lambda: hbkernels.temporal_attention(*[x.permute(0, 2, 3, 4, 1).flatten(2, 3)] * 3),
                               lambda: x.permute(0, 2, 3, 4, 1).flatten(2, 3)),
    }
    ours, theirs = calls[op]
    with hbkernels.use_backend(backend_name):
        out = ours()
    assert out.shape == theirs().shape
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_numpy_scalar_hyperparameters_as_torch_takes_them():
    """Configs read from numpy (or JSON through numpy) give np.int64 / np.float32 hyperparameters."""
    np = pytest.importorskip("numpy")
    x = rand(2, 8, 3, 4)
    ours = hbkernels.nn.GroupNorm(np.int64(4), 8, eps=np.float32(1e-6)).to(DEVICE)
    torch.testing.assert_close(ours(x), F.group_norm(x, 4, ours.weight, ours.bias, 1e-6))
    norm = hbkernels.nn.LayerNorm(4, eps=np.float32(1e-6)).to(DEVICE)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (4,), norm.weight, norm.bias, 1e-6))
    with pytest.raises(TypeError, match="num_groups"):
        hbkernels.group_norm(x, np.float64(4.0))
    with pytest.raises(TypeError, match="eps"):
        hbkernels.layer_norm(x, eps="1e-6")


def test_conv_deferring_bias_runs_pre_hooks():
    """A conv with forward pre-hooks runs whole (bias included), hooks and all."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    handle = conv.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    y, bias = hbkernels.nn.conv_deferring_bias(conv, x)
    want = conv(x)
    handle.remove()
    assert bias is None
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_temporal_attention_module_causal(backend_name):
    mod = hbkernels.nn.TemporalAttention(16, heads=2, dim_head=8, causal=True).to(DEVICE)
    x = rand(3, 6, 16)
    with hbkernels.use_backend(backend_name), torch.no_grad():
        got = mod(x)
        q, k, v = (p(x).view(3, 6, 2, 8).transpose(1, 2) for p in (mod.to_q, mod.to_k, mod.to_v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(3, 6, 16)
        want = mod.to_out[0](att)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_runs_hooks_sees_hooks_and_their_removal():
    """Hooked layers are called as modules (their weights may be on meta or in fp8 until the call); once
    a hook is removed (accelerate and diffusers leave the class's forward bound on the instance) the
    fused paths are taken again."""
    conv = torch.nn.Conv2d(2, 2, 1)
    assert not hbkernels.nn.runs_hooks(conv)
    handle = conv.register_forward_pre_hook(lambda module, args: None)
    assert hbkernels.nn.runs_hooks(conv)
    handle.remove()
    original = conv.forward
    conv.forward = lambda x: original(x)  # how accelerate's and diffusers' hooks wrap a layer
    assert hbkernels.nn.runs_hooks(conv)
    conv.forward = type(conv).forward.__get__(conv)  # what their removal leaves
    assert not hbkernels.nn.runs_hooks(conv)
    x = torch.randn(1, 2, 3, 3)
    out, bias = hbkernels.nn.conv_deferring_bias(conv, x)
    assert bias is conv.bias


def test_runs_hooks_sees_backward_and_global_hooks():
    """Backward hooks (a layer's own or global ones) and global forward hooks are hooks too: a fused path that
    reads a layer's weights itself skipped them, so they never ran (conv1/conv2 of a patched ResnetBlock2D) or
    saw other tensors."""
    from torch.nn.modules import module as torch_module

    conv = torch.nn.Conv2d(2, 2, 1)
    for register in (conv.register_full_backward_hook, conv.register_full_backward_pre_hook,
                     torch_module.register_module_forward_hook, torch_module.register_module_forward_pre_hook,
                     torch_module.register_module_full_backward_hook):
        handle = register(lambda *args: None)
        try:
            assert hbkernels.nn.runs_hooks(conv), register
            _, bias = hbkernels.nn.conv_deferring_bias(conv, torch.randn(1, 2, 3, 3))
            assert bias is None, register
        finally:
            handle.remove()
    assert not hbkernels.nn.runs_hooks(conv)


def test_norm_to_tokens_calls_a_module_that_is_not_a_plain_group_norm():
    """A GroupNorm subclass (its own forward) or another module in a norm's place had its weights read (or
    an AttributeError) instead of being called."""
    class Halved(torch.nn.GroupNorm):
        def forward(self, x):
            return super().forward(x) * 0.5

    video = torch.randn(2, 8, 3, 4, 5)
    for norm in (Halved(2, 8), torch.nn.Identity()):
        want = norm(video).permute(0, 3, 4, 2, 1).reshape(-1, 3, 8)
        torch.testing.assert_close(hbkernels.nn.norm_to_tokens(norm, video), want)


def test_group_norm_module_takes_torchs_bias_option():
    """hbkernels.nn.GroupNorm(..., bias=False) raised TypeError where torch.nn.GroupNorm takes it."""
    import inspect

    if "bias" not in inspect.signature(torch.nn.GroupNorm).parameters:
        pytest.skip("this torch's GroupNorm has no bias option")
    torch.manual_seed(0)
    norm = hbkernels.nn.GroupNorm(2, 8, bias=False, activation="silu")
    ref = torch.nn.GroupNorm(2, 8, bias=False)
    assert norm.bias is None and list(norm.state_dict()) == list(ref.state_dict()) == ["weight"]
    with torch.no_grad():
        norm.weight.normal_()
    ref.load_state_dict(norm.state_dict())
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(norm(x), F.silu(ref(x)))
