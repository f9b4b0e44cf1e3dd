"""hbkernels.apply_to on tiny random diffusers video U-Nets: same outputs, same state_dict keys, and
the patched paths really run (counted through the ops patch.py and nn.py call)."""
import collections
import contextlib
import copy
import functools
import io
import warnings

import pytest
import torch

import hbkernels
import hbkernels.nn
import hbkernels.patch
from helpers import DEVICE

diffusers = pytest.importorskip("diffusers")

FRAMES = 3


def unet3d():
    model = diffusers.UNet3DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    )
    inputs = dict(sample=torch.randn(2, 4, FRAMES, 8, 8), timestep=10, encoder_hidden_states=torch.randn(2, 5, 16))
    return model, inputs


def unet_motion():
    model = diffusers.UNetMotionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=16, num_attention_heads=2, motion_num_attention_heads=8, motion_max_seq_length=8,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
    )
    # the motion U-Net takes per-frame text states
    inputs = dict(sample=torch.randn(2, 4, FRAMES, 8, 8), timestep=10,
                  encoder_hidden_states=torch.randn(2 * FRAMES, 5, 16))
    return model, inputs


def unet_svd():
    # TemporalResnetBlock and TransformerSpatioTemporalModel hard-code 32 groups
    model = diffusers.UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=16, num_attention_heads=(2, 4), addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12, num_frames=FRAMES,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    )
    inputs = dict(sample=torch.randn(1, FRAMES, 8, 8, 8), timestep=10, encoder_hidden_states=torch.randn(1, 1, 16),
                  added_time_ids=torch.randn(1, 3))
    return model, inputs


# model, {count: minimum} (the counts with diffusers 0.42): fused norms come from ResnetBlock2D,
# TemporalResnetBlock, TemporalConvLayer and conv_norm_out; temporal attention from each temporal
# transformer's self-attention layers (two per block in UNet3D/AnimateDiff, one in SVD); time-embedding
# fusions from each ResnetBlock2D
MODELS = {
    "unet3d": (unet3d, {"group_norm_silu": 49, "temporal_attention": 10, "geglu": 9, "temporal_layout": 5,
                        "time_embedding": 8}),
    "motion": (unet_motion, {"group_norm_silu": 17, "temporal_attention": 14, "geglu": 11, "temporal_layout": 7,
                             "time_embedding": 8}),
    "svd": (unet_svd, {"group_norm_silu": 33, "temporal_attention": 4, "geglu": 12, "time_embedding": 8}),
}


@contextlib.contextmanager
def counting(monkeypatch):
    """Count calls of the ops as bound in the modules that the patched model calls through."""
    calls = collections.Counter()

    def wrap(module, name):
        fn = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            if "silu" in [a for a in (*args, *kwargs.values()) if isinstance(a, str)]:
                calls[name + "+silu"] += 1
            if name == "group_norm" and (kwargs.get("shift") is not None or (len(args) > 6 and args[6] is not None)):
                calls[name + "+shift"] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    wrap(hbkernels.nn, "group_norm")
    wrap(hbkernels.nn, "geglu")
    wrap(hbkernels.nn, "layer_norm")
    wrap(hbkernels.nn, "group_norm_to_tokens")  # through hbkernels.nn.norm_to_tokens
    for name in ("temporal_attention", "tokens_to_video"):
        wrap(hbkernels.patch, name)
    yield calls


@contextlib.contextmanager
def exact_fp32():
    """TF32 convolutions on a GPU would blow small op differences past the fp32 tolerance."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@functools.lru_cache(None)
def patched(which):
    """(model, inputs, output before patching, state_dict keys before patching), patched once."""
    torch.manual_seed(0)
    model, inputs = MODELS[which][0]()
    model.eval().to(DEVICE)
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    keys = list(model.state_dict())
    with torch.no_grad(), exact_fp32():
        ref = model(**inputs).sample
    assert hbkernels.apply_to(model) is model
    return model, inputs, ref, keys


@pytest.mark.parametrize("which", list(MODELS))
def test_apply_to_patches(which):
    model, _, _, keys = patched(which)
    summary = model._hbkernels_patched
    for name, least in MODELS[which][1].items():
        assert summary[name] >= least, (name, summary)
    assert summary["group_norm"] == sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert summary["layer_norm"] == sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules()) > 0
    assert list(model.state_dict()) == keys
    hbkernels.apply_to(model)  # idempotent
    assert model._hbkernels_patched == summary
    buf = io.BytesIO()  # the swapped-in classes pickle
    torch.save(model, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False)._hbkernels_patched == summary


@pytest.mark.parametrize("backend_name", ["torch", None], ids=["torch", "default"])
@pytest.mark.parametrize("which", list(MODELS))
def test_apply_to_outputs(which, backend_name, monkeypatch):
    model, inputs, ref, _ = patched(which)
    minimum = MODELS[which][1]
    ctx = hbkernels.use_backend(backend_name) if backend_name else contextlib.nullcontext()
    with counting(monkeypatch) as calls, ctx, torch.no_grad(), exact_fp32():
        out = model(**inputs).sample
    assert calls["group_norm+silu"] >= minimum["group_norm_silu"]
    assert calls["temporal_attention"] >= minimum["temporal_attention"]
    assert calls["geglu"] >= minimum["geglu"]
    assert calls["layer_norm"] >= model._hbkernels_patched["layer_norm"]  # each swapped norm runs
    if minimum.get("temporal_layout"):
        assert calls["group_norm_to_tokens"] == calls["tokens_to_video"] >= minimum["temporal_layout"]
    assert calls["group_norm+shift"] >= minimum["time_embedding"]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("which", list(MODELS))
def test_diffusers_attention_restored_after_patching(which, monkeypatch):
    """set_attn_processor(AttnProcessor2_0()) takes the temporal processors out again: the patched
    forwards (token layout, fused norms) run with diffusers' attention, to the same outputs."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    model, inputs = MODELS[which][0]()
    model.eval().to(DEVICE)
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad(), exact_fp32():
        ref = model(**inputs).sample
        hbkernels.apply_to(model)
        model.set_attn_processor(AttnProcessor2_0())
        with counting(monkeypatch) as calls:
            out = model(**inputs).sample
    assert {type(p) for p in model.attn_processors.values()} == {AttnProcessor2_0}
    assert calls["temporal_attention"] == 0 and calls["group_norm+silu"] >= MODELS[which][1]["group_norm_silu"]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    # and apply_to puts them back, inside temporal transformers the layout patch has re-classed too
    hbkernels.apply_to(model)
    assert model._hbkernels_patched["temporal_attention"] >= MODELS[which][1]["temporal_attention"]


@pytest.mark.parametrize("kind", ["shortcut", "skip_time_act", "down", "one_temb_for_the_batch"])
def test_resnet_time_embedding_fused(kind, monkeypatch):
    """ResnetBlock2D's temb add inside norm2: same outputs and gradients (temb's included), in
    training mode, also with one temb broadcast over the batch; resampling blocks keep diffusers'
    forward."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, out_channels=24 if kind == "shortcut" else 16, temb_channels=8, groups=4,
                          skip_time_act=kind == "skip_time_act", down=kind == "down",
                          output_scale_factor=2.0 if kind == "shortcut" else 1.0)  # 1: conv2's bias fused too
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    temb = torch.randn(1 if kind == "one_temb_for_the_batch" else 2, 8, requires_grad=True)
    ref = block(x, temb)
    # conv1's bias moves into norm2's shift, conv2's into the residual add
    wrt = [x, temb, block.time_emb_proj.weight, block.conv1.bias, block.conv2.bias]
    ref_grads = torch.autograd.grad(ref.square().sum(), wrt)
    hbkernels.apply_to(block)
    with counting(monkeypatch) as calls:
        out = block(x, temb)
    grads = torch.autograd.grad(out.square().sum(), wrt)
    assert block._hbkernels_patched["time_embedding"] == calls["group_norm+shift"] == (0 if kind == "down" else 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_resnet_without_time_embedding_not_counted():
    """A block with no time embedding (a VAE's) never takes the fused path, so it keeps its class."""
    from diffusers.models.resnet import ResnetBlock2D

    block = ResnetBlock2D(in_channels=16, temb_channels=None, groups=4)
    hbkernels.apply_to(block)
    assert type(block) is ResnetBlock2D and block._hbkernels_patched["time_embedding"] == 0
    assert block._hbkernels_patched["group_norm_silu"] == 2


def test_time_embedding_not_fused_without_group_norm():
    """time_embedding=True needs group_norm: without hbkernels' GroupNorm as norm2 the block keeps
    diffusers' class and the summary counts nothing."""
    from diffusers.models.resnet import ResnetBlock2D

    block = ResnetBlock2D(in_channels=16, temb_channels=8, groups=4)
    with pytest.warns(RuntimeWarning, match="found nothing to patch"):
        hbkernels.apply_to(block, group_norm=False)
    assert type(block) is ResnetBlock2D and block._hbkernels_patched["time_embedding"] == 0


def test_scale_shift_resnet_not_fused():
    """ResnetBlock2D in "scale_shift" mode modulates norm2's output before the SiLU: only norm1 fuses."""
    from diffusers.models.resnet import ResnetBlock2D  # a submodule: not an attribute until imported

    block = ResnetBlock2D(in_channels=16, temb_channels=8, groups=4,
                                                  time_embedding_norm="scale_shift").eval()
    x, temb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    with torch.no_grad():
        ref = block(x, temb)
        hbkernels.apply_to(block)
        out = block(x, temb)
    assert block.norm1.activation == "silu" and block.norm2.activation is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_attention_fallbacks():
    """Cross-attention and masked calls on a patched processor take the original processor's path."""
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    proc = hbkernels.patch.TemporalAttnProcessor(attn.processor)
    x, ctx = torch.randn(3, 4, 16), torch.randn(3, 5, 16)
    mask = torch.zeros(3, 1, 4)
    mask[..., -1] = -1e4
    with torch.no_grad():
        for kwargs in ({}, {"encoder_hidden_states": ctx}, {"attention_mask": mask}):
            ref = attn(x, **kwargs)
            attn.set_processor(proc)
            out = attn(x, **kwargs)
            attn.set_processor(proc.fallback)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_unknown_model_warns():
    with pytest.warns(RuntimeWarning, match="found nothing"):
        hbkernels.apply_to(torch.nn.Linear(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.SiLU())
        model = hbkernels.apply_to(copy.deepcopy(reference))
    assert model._hbkernels_patched["group_norm_silu"] == 1
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(model(x), reference(x))  # the SiLU once, in the norm


def _attention_through_processor(**attn_kwargs):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, **attn_kwargs).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        ref = attn(x)
        attn.set_processor(hbkernels.patch.TemporalAttnProcessor(attn.processor))
        out = attn(x)
    return out, ref


def test_processor_scale_follows_the_fallback_without_scale_qk():
    from diffusers.models.attention_processor import AttnProcessor2_0

    # attn.scale == 1.0, which AttnProcessor2_0 (set explicitly: with scale_qk=False diffusers would
    # pick AttnProcessor) ignores
    out, ref = _attention_through_processor(scale_qk=False, processor=AttnProcessor2_0())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_processor_uses_attn_scale_behind_attn_processor():
    from diffusers.models.attention_processor import AttnProcessor

    out, ref = _attention_through_processor(scale_qk=False, processor=AttnProcessor())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(residual_connection=True), dict(rescale_output_factor=2.0)],
                         ids=["residual_connection", "rescale_output_factor"])
def test_processor_falls_back_for_residual_or_rescaled_output(kwargs):
    out, ref = _attention_through_processor(**kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_resnet_time_embedding_fused_keeps_dropout():
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, temb_channels=8, groups=4, dropout=0.5).train()
    x, temb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    torch.manual_seed(1)
    ref = block(x, temb)
    hbkernels.apply_to(block)
    assert block._hbkernels_patched["time_embedding"] == 1
    torch.manual_seed(1)  # the same dropout mask: nothing else draws random numbers before it
    out = block(x, temb)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _temporal_transformer():
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    torch.manual_seed(0)
    model = TransformerTemporalModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                     norm_num_groups=4).eval()
    frames = 3
    x = torch.randn(2 * frames, 16, 3, 4)
    return model, x, frames


def test_temporal_layout_keeps_the_norms_activation():
    model, x, frames = _temporal_transformer()
    model.norm = hbkernels.nn.GroupNorm.from_torch(model.norm, activation="silu")
    with torch.no_grad():
        ref = model(x, num_frames=frames).sample  # diffusers' forward: the norm module applies the SiLU
        hbkernels.apply_to(model, attention=False, geglu=False, layer_norm=False, time_embedding=False)
        assert model._hbkernels_patched["temporal_layout"] == 1
        out = model(x, num_frames=frames).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_temporal_processor_runs_a_fallback_it_cannot_reproduce():
    """TemporalAttnProcessor(fallback) took its fast path whatever the fallback did: a custom processor
    was skipped, and wrapping one TemporalAttnProcessor in another lost AttnProcessor's attn.scale."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    class Doubling(AttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            return 2 * super().__call__(*args, **kwargs)

    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, scale_qk=False).eval()  # scale_qk=False: attn.scale is 1
    x = torch.randn(3, 5, 16)
    for fallback in (Doubling(), hbkernels.patch.TemporalAttnProcessor(AttnProcessor())):
        plain = fallback.fallback if isinstance(fallback, hbkernels.patch.TemporalAttnProcessor) else fallback
        with torch.no_grad():
            attn.set_processor(plain)
            want = attn(x)
            attn.set_processor(hbkernels.patch.TemporalAttnProcessor(fallback))
            torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)


def test_custom_attention_processor_kept():
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Doubling(AttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            return 2 * super().__call__(*args, **kwargs)

    model, x, frames = _temporal_transformer()
    for m in model.modules():
        if hasattr(m, "set_processor") and not m.is_cross_attention:
            m.set_processor(Doubling())
    with torch.no_grad():
        ref = model(x, num_frames=frames).sample
        hbkernels.apply_to(model)
        out = model(x, num_frames=frames).sample
    assert model._hbkernels_patched["temporal_attention"] == 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", ["resnet", "temporal_transformer"])
def test_autocast_with_float32_activations(block):
    """Under autocast a patched block's projections/convolutions run in low precision while its input
    (the residual) may stay float32: the residual add then promotes, as diffusers' own add does,
    rather than raising on the dtype mismatch."""
    import copy

    from diffusers.models.resnet import ResnetBlock2D

    if block == "resnet":
        torch.manual_seed(0)
        model = ResnetBlock2D(in_channels=16, temb_channels=8, groups=4).eval()
        args, kwargs = (torch.randn(2, 16, 4, 4), torch.randn(2, 8)), {}
    else:
        model, x, frames = _temporal_transformer()
        args, kwargs = (x,), dict(num_frames=frames, return_dict=False)
    patched_model = hbkernels.apply_to(copy.deepcopy(model))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = model(*args, **kwargs), patched_model(*args, **kwargs)
    if block != "resnet":
        ref, out = ref[0], out[0]
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0.02 * ref.abs().max().item())


@pytest.mark.parametrize("which", list(MODELS))
def test_layerwise_casting_after_patching(which):
    """diffusers' layerwise casting (and accelerate's offload) wrap each layer's forward to cast or move
    its weights around the call: the fused paths read conv and norm weights themselves, and met fp8
    (or meta) weights. Hooked layers are now called as modules."""
    torch.manual_seed(0)
    model, inputs = MODELS[which][0]()
    model.eval().to(DEVICE)
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    plain = hbkernels.apply_to(copy.deepcopy(model))
    hooks_seen = []
    for m in (model, plain):
        m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        norms = [mod.norm for mod in m.modules() if hasattr(mod, "transformer_blocks") and hasattr(mod, "proj_in")
                 and isinstance(getattr(mod, "norm", None), torch.nn.GroupNorm)]
        for norm in norms:
            norm.register_forward_hook(lambda *args, patched=m is plain: hooks_seen.append(patched))
    with torch.no_grad(), exact_fp32():
        ref = model(**inputs).sample
        out = plain(**inputs).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    assert hooks_seen.count(True) == hooks_seen.count(False)  # the temporal norms' hooks ran when patched too


def _wrap_forward(module):
    """A forward bound on the instance, around the class's, as accelerate's and diffusers' hooks install."""
    inner = module.forward
    module.forward = lambda *args, **kwargs: inner(*args, **kwargs)


@pytest.mark.parametrize("which", list(MODELS))
def test_modules_hooked_before_patching_are_left_alone(which):
    """Norms whose forward was wrapped (accelerate's offload) before apply_to: each copy ran the old
    bound forward, so the time-embedding shift met torch's GroupNorm (TypeError) and fused SiLUs were
    lost. Hooked modules now stay as they are, with a warning, and the output is the unpatched one."""
    torch.manual_seed(0)
    model, inputs = MODELS[which][0]()
    model.eval()
    for m in model.modules():  # TemporalConvLayer's last conv starts at 0: a lost SiLU there would not show
        if type(m).__name__ == "TemporalConvLayer":
            torch.nn.init.normal_(m.conv4[-1].weight, 0, 0.1)
        if type(m) is torch.nn.GroupNorm:
            _wrap_forward(m)
    patched_model = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="already run hooks"):
        hbkernels.apply_to(patched_model)
    assert patched_model._hbkernels_patched["group_norm"] == 0
    with torch.no_grad():
        ref, out = model(**inputs).sample, patched_model(**inputs).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_accelerate_offload_before_patching():
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model, inputs = unet3d()
    model.eval()
    with torch.no_grad():
        ref = model(**inputs).sample
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match="already run hooks"):
        hbkernels.apply_to(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, ref, rtol=1e-5, atol=1e-5)


def test_forward_hook_on_a_fused_norm_sees_the_norms_output():
    """A forward hook added after patching on a norm whose SiLU is fused gets the norm's output and its
    return value goes through the SiLU, as unpatched: a hook returning a new tensor (a copy, a cast) lost
    the fused output's mark and had SiLU applied twice."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, temb_channels=8, groups=4).eval()
    x, temb = torch.randn(2, 16, 5, 5), torch.randn(2, 8)
    patched_block = hbkernels.apply_to(copy.deepcopy(block))
    seen = {}
    for name, b in (("torch", block), ("hbkernels", patched_block)):
        b.norm1.register_forward_hook(lambda mod, args, out, name=name: seen.setdefault(name, out.clone()) * 1.5)
    sequential = torch.nn.Sequential(torch.nn.GroupNorm(4, 16), torch.nn.SiLU())
    patched_sequential = hbkernels.apply_to(copy.deepcopy(sequential))
    for s in (sequential, patched_sequential):
        s[0].register_forward_hook(lambda mod, args, out: out * 1.5)
    with torch.no_grad():
        torch.testing.assert_close(patched_block(x, temb), block(x, temb), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(patched_sequential(x), sequential(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["hbkernels"], seen["torch"], rtol=1e-5, atol=1e-5)


def test_hooks_on_a_fused_norms_silu_or_on_norm2_see_what_they_see_unpatched():
    """Hooks added after patching on the SiLU after a fused norm got the already-activated tensor, and a
    pre-hook returning a new tensor had SiLU applied twice; a pre-hook on ResnetBlock2D's norm2 got h
    without the time embedding and conv1's bias (which rode in the fused shift)."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, temb_channels=8, groups=4).eval()
    for p in block.parameters():  # conv1's bias and the embedding must move norm2's input visibly
        torch.nn.init.normal_(p, 0, 0.3)
    sequential = torch.nn.Sequential(torch.nn.GroupNorm(4, 16), torch.nn.SiLU())
    x, temb = torch.randn(2, 16, 5, 5), torch.randn(2, 8)
    runs = {}
    patched = (hbkernels.apply_to(copy.deepcopy(block)), hbkernels.apply_to(copy.deepcopy(sequential)))
    for name, (b, s) in (("torch", (block, sequential)), ("hbkernels", patched)):
        seen = runs.setdefault(name, {"silu in": [], "norm2 in": []})
        b.nonlinearity.register_forward_hook(lambda mod, args, out, seen=seen: seen["silu in"].append(args[0].clone()))
        b.nonlinearity.register_forward_pre_hook(lambda mod, args: (args[0] * 1.0,))  # a new tensor, same values
        b.norm2.register_forward_pre_hook(lambda mod, args, seen=seen: seen["norm2 in"].append(args[0].clone())
                                          or (args[0].clamp(-1, 1),))
        s[1].register_forward_pre_hook(lambda mod, args: (args[0] * 1.0,))
        with torch.no_grad():
            seen["out"], seen["sequential"] = b(x, temb), s(x)
    want, got = runs["torch"], runs["hbkernels"]
    assert len(got["silu in"]) == len(want["silu in"]) == 3 and len(got["norm2 in"]) == 1
    for key in ("silu in", "norm2 in", "out", "sequential"):
        for g, w in zip(*((r[key] if isinstance(r[key], list) else [r[key]]) for r in (got, want)), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item(), msg=key)


def test_an_activation_replacing_a_fused_silu_after_patching_gets_the_norms_output():
    """Replacing the SiLU that a fused norm stands in for (say by Mish) ran Mish on SiLU'd values."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, temb_channels=8, groups=4).eval()
    sequential = torch.nn.Sequential(torch.nn.GroupNorm(4, 16), torch.nn.SiLU())
    x, temb = torch.randn(2, 16, 5, 5), torch.randn(2, 8)
    patched_block, patched_sequential = (hbkernels.apply_to(copy.deepcopy(m)) for m in (block, sequential))
    for b in (block, patched_block):
        b.nonlinearity = torch.nn.Mish()
    for s in (sequential, patched_sequential):
        s[1] = torch.nn.Mish()
    with torch.no_grad():
        torch.testing.assert_close(patched_block(x, temb), block(x, temb), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(patched_sequential(x), sequential(x), rtol=1e-5, atol=1e-5)


def test_containers_whose_hook_was_removed_get_their_fused_forward():
    """A hook added and removed before apply_to (accelerate, diffusers) leaves the class's forward bound on
    the instance, which shadowed the fused class's: it never ran, yet was counted. A container still
    hooked is left alone with a warning, and not counted."""
    torch.manual_seed(0)
    model, inputs = unet3d()
    model.eval()
    with torch.no_grad():
        ref = model(**inputs).sample
    hooked = copy.deepcopy(model)
    containers = [m for m in model.modules() if type(m).__name__ in ("ResnetBlock2D", "TransformerTemporalModel")]
    for m in containers:
        m.forward = m.forward  # what removing accelerate's hook leaves: the class's own forward, bound
    for m in hooked.modules():
        if type(m).__name__ in ("ResnetBlock2D", "TransformerTemporalModel"):
            _wrap_forward(m)
    hbkernels.apply_to(model)
    fused = [m for m in containers if getattr(type(m), "_hbkernels_fused", False)]
    assert len(fused) == model._hbkernels_patched["time_embedding"] + model._hbkernels_patched["temporal_layout"]
    assert model._hbkernels_patched["time_embedding"] > 0 and model._hbkernels_patched["temporal_layout"] > 0
    assert all(m.forward.__func__ is type(m).forward for m in fused)  # the fused forward is what runs
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    with pytest.warns(RuntimeWarning, match="already run hooks"):
        hbkernels.apply_to(hooked)
    assert hooked._hbkernels_patched["time_embedding"] == hooked._hbkernels_patched["temporal_layout"] == 0


def test_subclasses_in_temporal_transformers_are_left_alone():
    """A GroupNorm or Attention subclass (which may override forward or get_attention_scores) inside a
    temporal transformer keeps its own code: the layout patch read the norm's weights itself and the
    attention processor reimplemented diffusers' Attention, bypassing both."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    class HalvedGroupNorm(torch.nn.GroupNorm):
        def forward(self, x):
            return super().forward(x) * 0.5

    class SharperAttention(Attention):
        def get_attention_scores(self, query, key, attention_mask=None):
            return super().get_attention_scores(query * 3.0, key, attention_mask)

    model, x, frames = _temporal_transformer()
    norm = model.norm
    model.norm = HalvedGroupNorm(norm.num_groups, norm.num_channels, norm.eps)
    model.norm.load_state_dict(norm.state_dict())
    block = model.transformer_blocks[0]
    attn = SharperAttention(query_dim=16, heads=2, dim_head=8, processor=AttnProcessor())
    attn.load_state_dict(block.attn1.state_dict())
    block.attn1 = attn
    with torch.no_grad():
        ref = model(x, num_frames=frames).sample
        hbkernels.apply_to(model)
        out = model(x, num_frames=frames).sample
    assert model._hbkernels_patched["temporal_layout"] == 0 and type(block.attn1.processor) is AttnProcessor
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_backward_and_global_hooks_after_patching_see_what_they_see_unpatched():
    """Full backward hooks on a patched ResnetBlock2D's convolutions never ran (the fused forward read their
    weights), those on a fused norm or its SiLU got the gradient of the SiLU'd output; a global forward hook
    on a temporal transformer's norm was skipped by the token-layout norm."""
    from diffusers.models.resnet import ResnetBlock2D
    from torch.nn.modules.module import register_module_forward_hook

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, temb_channels=8, groups=4).eval()
    sequential = torch.nn.Sequential(torch.nn.GroupNorm(4, 16), torch.nn.SiLU())
    x, temb = torch.randn(2, 16, 5, 5, requires_grad=True), torch.randn(2, 8)
    runs = {}
    patched = (hbkernels.apply_to(copy.deepcopy(block)), hbkernels.apply_to(copy.deepcopy(sequential)))
    for name, (b, s) in (("torch", (block, sequential)), ("hbkernels", patched)):
        seen = runs.setdefault(name, collections.defaultdict(list))
        for key, mod in (("conv1", b.conv1), ("conv2", b.conv2), ("norm1", b.norm1), ("norm2", b.norm2),
                         ("silu", b.nonlinearity), ("sequential norm", s[0]), ("sequential silu", s[1])):
            mod.register_full_backward_hook(lambda m, grad_in, grad_out, key=key, seen=seen:
                                            seen[key].append(grad_out[0].clone()))
        (b(x, temb).square().sum() + s(x).square().sum()).backward()
    want, got = runs["torch"], runs["hbkernels"]
    assert set(got) == set(want) and len(want) == 7
    for key in want:
        for g, w in zip(got[key], want[key], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item(), msg=key)

    model, v, frames = _temporal_transformer()
    patched_model = hbkernels.apply_to(copy.deepcopy(model))
    handle = register_module_forward_hook(lambda m, args, out: out * 2 if isinstance(m, torch.nn.GroupNorm) else None)
    try:
        with torch.no_grad():
            ref, out = model(v, num_frames=frames).sample, patched_model(v, num_frames=frames).sample
    finally:
        handle.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_temporal_layout_calls_a_norm_replaced_after_patching():
    """A norm put in a layout-patched temporal transformer after patching (a GroupNorm subclass, another
    module) had its weights read by the token-layout norm (its forward skipped, or an AttributeError)."""
    class Halved(torch.nn.GroupNorm):
        def forward(self, x):
            return super().forward(x) * 0.5

    model, x, frames = _temporal_transformer()
    patched_model = hbkernels.apply_to(copy.deepcopy(model))
    assert patched_model._hbkernels_patched["temporal_layout"] == 1
    for make in (lambda n: Halved(n.num_groups, n.num_channels, n.eps), lambda n: torch.nn.Identity()):
        for m in (model, patched_model):
            new = make(m.norm)
            new.load_state_dict(m.norm.state_dict(), strict=False)
            m.norm = new
        with torch.no_grad():
            torch.testing.assert_close(patched_model(x, num_frames=frames).sample, model(x, num_frames=frames).sample,
                                       rtol=1e-5, atol=1e-5)
