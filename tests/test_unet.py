"""HummingbirdUNet3DModel: architecture (parameter counts, VideoCrafter2 names), blocks against plain
PyTorch, and the diffusers model features (save/load, checkpointing, chunking, processors)."""
import einops
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hbkernels
from hummingbird.models import CONFIGS, HummingbirdUNet3DModel, guidance_scale_embedding
from hummingbird.models import unet_3d
from hummingbird.models.unet_3d import ResBlock, SpatialTransformer, TemporalTransformer
from helpers import LowRankAdapter


pytestmark = pytest.mark.usefixtures("single_thread")


def randomize(module, seed=0, std=0.3):
    """Random values for every parameter, the zero-initialised ones included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(scope="module")
def tiny():
    return randomize(HummingbirdUNet3DModel.from_named_config("tiny"), std=0.2).eval()


def tiny_inputs(b=2, t=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, t, size, size, generator=g), torch.randn(b, 5, 32, generator=g)


# ---------------------------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    "name, overrides, millions",
    [
        ("videocrafter2", {}, 1413.3),
        ("hummingbird-0.9b", {}, 945.2),
        ("hummingbird-0.9b", {"time_cond_proj_dim": None}, 945.1),
        ("hummingbird-0.7b", {"time_cond_proj_dim": None}, 772.0),
        ("hummingbird-0.7b", {}, 772.1),
    ],
)
def test_parameter_counts(name, overrides, millions):
    with torch.device("meta"):
        model = HummingbirdUNet3DModel.from_named_config(name, **overrides)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


def test_videocrafter2_parameter_breakdown():
    # Design notes: temporal conv 266.9M, spatial res/other 594.3M, spatial attention 273.6M, temporal
    # attention 278.1M + 0.33M init attention. The design's 0.33M is the init attention's norm and in/out
    # projections; its transformer block (5.25M) is counted in the 278.1M.
    with torch.device("meta"):
        model = HummingbirdUNet3DModel.from_named_config("videocrafter2")

    def count(modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    temporal = [m for name, m in model.named_modules() if isinstance(m, TemporalTransformer) and name != "init_attn.0"]
    init_block = model.init_attn[0].transformer_blocks
    groups = {
        "temporal_conv": sum(p.numel() for name, p in model.named_parameters() if ".temporal_conv." in name),
        "spatial_attention": count(m for m in model.modules() if isinstance(m, SpatialTransformer)),
        "temporal_attention": count([*temporal, init_block]),
        "init_attention": count([model.init_attn]) - count([init_block]),
    }
    groups["other"] = count([model]) - sum(groups.values())
    assert {k: round(v / 1e6, 2 if k == "init_attention" else 1) for k, v in groups.items()} == {
        "temporal_conv": 266.9, "spatial_attention": 273.6, "temporal_attention": 278.1, "init_attention": 0.33,
        "other": 594.3}


def test_videocrafter2_module_names():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in HummingbirdUNet3DModel.from_named_config("videocrafter2").state_dict().items()}
    expected = {
        "time_embed.0.weight": (1280, 320),
        "fps_embedding.2.weight": (1280, 1280),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "init_attn.0.proj_in.weight": (512, 320, 1),  # 8 heads x 64, 1x1 Conv1d
        "init_attn.0.transformer_blocks.0.attn2.to_k.weight": (512, 512),
        "input_blocks.1.0.in_layers.0.weight": (320,),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "input_blocks.1.0.temporal_conv.conv1.2.weight": (320, 320, 3, 1, 1),
        "input_blocks.1.0.temporal_conv.conv4.3.weight": (320, 320, 3, 1, 1),
        "input_blocks.1.1.proj_in.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.1.2.transformer_blocks.0.attn2.to_k.weight": (320, 320),  # temporal: self-attention
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.11.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "middle_block.2.transformer_blocks.0.attn1.to_q.weight": (1280, 1280),
        "middle_block.3.out_layers.3.weight": (1280, 1280, 3, 3),
        "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.3.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.2.proj_out.weight": (320, 320),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert not any(k.startswith(("input_blocks.12.", "output_blocks.12.", "input_blocks.10.1")) for k in shapes)


# ------------------------------------------------------- blocks against plain PyTorch (VC2 style)


def plain_attention(x, context, sd, prefix, heads):
    """VideoCrafter2's CrossAttention: einsum attention on (b h) n d."""
    ctx = x if context is None else context
    q, k, v = (F.linear(t, sd[f"{prefix}to_{n}.weight"]) for n, t in (("q", x), ("k", ctx), ("v", ctx)))
    q, k, v = (einops.rearrange(t, "b n (h d) -> (b h) n d", h=heads) for t in (q, k, v))
    sim = torch.einsum("b i d, b j d -> b i j", q, k) * q.shape[-1] ** -0.5
    out = torch.einsum("b i j, b j d -> b i d", sim.softmax(-1), v)
    return F.linear(einops.rearrange(out, "(b h) n d -> b n (h d)", h=heads), sd[f"{prefix}to_out.0.weight"], sd[f"{prefix}to_out.0.bias"])


def plain_transformer_block(x, sd, p, heads, context=None):
    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"])

    x = plain_attention(ln(x, "norm1"), None, sd, f"{p}attn1.", heads) + x
    x = plain_attention(ln(x, "norm2"), context, sd, f"{p}attn2.", heads) + x
    h, gate = F.linear(ln(x, "norm3"), sd[f"{p}ff.net.0.proj.weight"], sd[f"{p}ff.net.0.proj.bias"]).chunk(2, -1)
    return F.linear(h * F.gelu(gate), sd[f"{p}ff.net.2.weight"], sd[f"{p}ff.net.2.bias"]) + x


def plain_temporal_transformer(x, sd, heads, groups, b):
    """nn.GroupNorm + einops + manual attention, as VideoCrafter2 runs a TemporalTransformer."""
    x = einops.rearrange(x, "(b t) c h w -> b c t h w", b=b)
    _, _, _, h, w = x.shape
    y = F.group_norm(x, groups, sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    if sd["proj_in.weight"].dim() == 3:  # 1x1 Conv1d projections (init attention)
        y = F.conv1d(einops.rearrange(y, "b c t h w -> (b h w) c t"), sd["proj_in.weight"], sd["proj_in.bias"])
        y = einops.rearrange(y, "n c t -> n t c")
    else:
        y = F.linear(einops.rearrange(y, "b c t h w -> (b h w) t c"), sd["proj_in.weight"], sd["proj_in.bias"])
    y = plain_transformer_block(y, sd, "transformer_blocks.0.", heads)
    if sd["proj_out.weight"].dim() == 3:
        y = F.conv1d(einops.rearrange(y, "n t c -> n c t"), sd["proj_out.weight"], sd["proj_out.bias"])
        y = einops.rearrange(y, "(b h w) c t -> b c t h w", b=b, h=h, w=w)
    else:
        y = F.linear(y, sd["proj_out.weight"], sd["proj_out.bias"])
        y = einops.rearrange(y, "(b h w) t c -> b c t h w", b=b, h=h, w=w)
    return einops.rearrange(y + x, "b c t h w -> (b t) c h w")


def plain_spatial_transformer(x, context, sd, heads, groups, t):
    _, _, h, w = x.shape
    y = F.group_norm(x, groups, sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    y = F.linear(einops.rearrange(y, "b c h w -> b (h w) c"), sd["proj_in.weight"], sd["proj_in.bias"])
    y = plain_transformer_block(y, sd, "transformer_blocks.0.", heads, context.repeat_interleave(t, 0))
    y = F.linear(y, sd["proj_out.weight"], sd["proj_out.bias"])
    return einops.rearrange(y, "b (h w) c -> b c h w", h=h, w=w) + x


def plain_resblock(x, emb, sd, groups, b):
    def norm_silu(t, name):
        return F.silu(F.group_norm(t, groups, sd[f"{name}.weight"], sd[f"{name}.bias"]))

    h = F.conv2d(norm_silu(x, "in_layers.0"), sd["in_layers.2.weight"], sd["in_layers.2.bias"], padding=1)
    h = h + F.linear(F.silu(emb), sd["emb_layers.1.weight"], sd["emb_layers.1.bias"])[..., None, None]
    h = F.conv2d(norm_silu(h, "out_layers.0"), sd["out_layers.3.weight"], sd["out_layers.3.bias"], padding=1)
    skip = F.conv2d(x, sd["skip_connection.weight"], sd["skip_connection.bias"]) if "skip_connection.weight" in sd else x
    video = einops.rearrange(skip + h, "(b t) c h w -> b c t h w", b=b)
    y = video
    for i, conv in enumerate(("conv1.2", "conv2.3", "conv3.3", "conv4.3"), 1):
        w, bias = sd[f"temporal_conv.{conv}.weight"], sd[f"temporal_conv.{conv}.bias"]
        y = F.conv3d(norm_silu(y, f"temporal_conv.conv{i}.0"), w, bias, padding=(1, 0, 0))
    return einops.rearrange(video + y, "b c t h w -> (b t) c h w")


BACKENDS = ["torch", "auto"]  # "auto": what hbkernels picks here (C++ on CPU once built, Triton on GPU)


def run_on(backend, fn):
    if backend == "auto":
        return fn()
    with hbkernels.use_backend(backend):
        return fn()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("conv_proj, channels, heads", [(False, 16, 2), (True, 16, 8)])
def test_temporal_transformer_matches_plain_pytorch(backend, conv_proj, channels, heads):
    block = randomize(TemporalTransformer(channels, heads, 8, depth=1, groups=4, conv_proj=conv_proj))
    b, t = 2, 5
    x = torch.randn(b * t, channels, 3, 4)
    with torch.no_grad():
        got = run_on(backend, lambda: block(x, t))
        want = plain_temporal_transformer(x, block.state_dict(), heads, 4, b)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spatial_transformer_matches_plain_pytorch(backend):
    block = randomize(SpatialTransformer(32, 4, 8, depth=1, context_dim=24, groups=4))
    b, t = 2, 3
    x, context = torch.randn(b * t, 32, 4, 3), torch.randn(b, 7, 24)
    with torch.no_grad():
        got = run_on(backend, lambda: block(x, context))
        want = plain_spatial_transformer(x, context, block.state_dict(), 4, 4, t)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resblock_matches_plain_pytorch(backend):
    """Outputs and parameter gradients: the conv biases folded into GroupNorm shifts and residual adds
    get theirs."""
    block = randomize(ResBlock(16, 24, 32, dropout=0.0, groups=4, temporal_dropout=0.1)).eval()
    b, t = 2, 3
    x, emb = torch.randn(b * t, 16, 4, 4), torch.randn(b * t, 24)
    params = dict(block.named_parameters())
    got = run_on(backend, lambda: block(x, emb, t))
    want = plain_resblock(x, emb, params, 4, b)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    cot = torch.randn_like(want)
    names = ["in_layers.2.bias", "out_layers.3.bias", "skip_connection.bias", "temporal_conv.conv1.2.bias",
             "temporal_conv.conv3.3.bias", "temporal_conv.conv4.3.bias", "emb_layers.1.weight",
             "temporal_conv.conv2.0.weight"]
    got_grads = run_on(backend, lambda: torch.autograd.grad(got, [params[n] for n in names], cot))
    want_grads = torch.autograd.grad(want, [params[n] for n in names], cot)
    for name, g, w in zip(names, got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_guidance_scale_embedding_is_lcms():
    # LatentConsistencyModelPipeline.get_guidance_scale_embedding, step by step
    w = torch.tensor([7.5, 5.0]) * 1000.0
    freqs = torch.exp(torch.arange(8) * -(torch.log(torch.tensor(10000.0)) / 7))
    args = w[:, None] * freqs[None, :]
    torch.testing.assert_close(guidance_scale_embedding(torch.tensor([7.5, 5.0]), 16), torch.cat([args.sin(), args.cos()], 1))


# ------------------------------------------------------------------------------------ whole model


def test_forward_shapes_and_timestep_forms(tiny):
    x, ctx = tiny_inputs(t=3)
    with torch.no_grad():
        out = tiny(x, 500, ctx, fps=8).sample
        assert out.shape == x.shape and out.is_contiguous() and out.abs().sum() > 0
        for ts in (torch.tensor(500), torch.tensor([500, 500]), torch.tensor([500.0])):
            torch.testing.assert_close(tiny(x, ts, ctx, fps=8, return_dict=False)[0], out)
        assert not torch.allclose(tiny(x, torch.tensor([500, 20]), ctx, fps=8).sample, out)
        assert not torch.allclose(tiny(x, 500, ctx, fps=28).sample, out)
        torch.testing.assert_close(tiny(x, 500, ctx).sample, tiny(x, 500, ctx, fps=16).sample)  # default fps
        x5, _ = tiny_inputs(t=5)
        assert tiny(x5, 500, ctx).sample.shape == x5.shape  # T is free


def test_numbers_fill_on_device(monkeypatch):
    # a host-to-device copy inside a CUDA-graph capture fails, so numbers (NumPy's too: a pipeline's
    # fps may come from an array) must become a fill on the device, never torch.as_tensor of a number
    as_tensor = torch.as_tensor

    def tensors_only(value, *args, **kwargs):
        assert isinstance(value, torch.Tensor), f"host-to-device copy of {type(value).__name__}"
        return as_tensor(value, *args, **kwargs)

    monkeypatch.setattr(torch, "as_tensor", tensors_only)
    for value in (8, 8.0, np.int64(8), np.float32(8.0), np.int32(8)):
        out = HummingbirdUNet3DModel._per_sample(value, 2, "cpu")
        assert out.shape == (2,) and out.tolist() == [8, 8], value
    assert HummingbirdUNet3DModel._per_sample(torch.tensor([3, 4]), 2, "cpu").tolist() == [3, 4]


def test_timestep_cond(tiny):
    x, ctx = tiny_inputs()
    cond = guidance_scale_embedding(torch.tensor([7.5, 7.5]), 16)
    with torch.no_grad():
        assert not torch.allclose(tiny(x, 10, ctx, timestep_cond=cond).sample, tiny(x, 10, ctx).sample)
    with pytest.raises(ValueError, match=r"timestep_cond must be \(B=2, time_cond_proj_dim=16\)"):
        tiny(x, 10, ctx, timestep_cond=cond[:, :8])
    model = HummingbirdUNet3DModel.from_named_config("tiny", time_cond_proj_dim=None)
    with pytest.raises(ValueError, match="time_cond_proj"), torch.no_grad():
        model(x, 10, ctx, timestep_cond=cond)


def test_frames_are_independent_of_batch_neighbours(tiny):
    # Each video is processed on its own: the temporal layers must not mix videos of a batch.
    x, ctx = tiny_inputs(b=2)
    with torch.no_grad():
        both = tiny(x, 10, ctx).sample
        first = tiny(x[:1], 10, ctx[:1]).sample
    torch.testing.assert_close(both[:1], first, rtol=1e-4, atol=1e-5)


def test_pruned_configuration_runs():
    model = randomize(HummingbirdUNet3DModel.from_named_config("tiny", num_res_blocks=1, use_middle_block=False))
    assert model.middle_block is None and len(model.input_blocks) == 8 and len(model.output_blocks) == 8
    x, ctx = tiny_inputs()
    with torch.no_grad():
        assert model(x, 10, ctx).sample.shape == x.shape


def test_save_and_load_pretrained(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = HummingbirdUNet3DModel.from_pretrained(tmp_path).eval()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(tiny.config)
    x, ctx = tiny_inputs()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny.state_dict().values()))
    with torch.no_grad():  # not bitwise: oneDNN's convolution kernels depend on the weights' alignment
        torch.testing.assert_close(loaded(x, 10, ctx).sample, tiny(x, 10, ctx).sample)


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_resaving_unsharded_over_a_sharded_save_loads_the_new_weights(tiny, tmp_path, variant):
    """diffusers leaves an earlier sharded save's index behind; loading would follow it to the shards
    the unsharded save removed (or, after a failed save, to a mix of old and new ones)."""
    tiny.save_pretrained(tmp_path, max_shard_size="200KB", variant=variant)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    newer = randomize(HummingbirdUNet3DModel.from_named_config("tiny"), std=0.1)
    newer.save_pretrained(tmp_path, variant=variant)
    loaded = HummingbirdUNet3DModel.from_pretrained(tmp_path, variant=variant)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), newer.state_dict().values()))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize(HummingbirdUNet3DModel.from_named_config("tiny", num_res_blocks=1), std=0.2).eval()  # no dropout
    x, ctx = tiny_inputs(b=1)
    cond = guidance_scale_embedding(torch.tensor([7.5]), 16)

    def grads():
        model.zero_grad()
        model(x, 10, ctx, timestep_cond=cond).sample.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checkpointed = grads()
    model.disable_gradient_checkpointing()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


def test_forward_chunking_and_attention_processors(tiny):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    x, ctx = tiny_inputs()
    with torch.no_grad():
        want = tiny(x, 10, ctx).sample
        for dim in (0, 1):
            tiny.enable_forward_chunking(chunk_size=1, dim=dim)
            torch.testing.assert_close(tiny(x, 10, ctx).sample, want)
        tiny.disable_forward_chunking()
        processors = tiny.attn_processors
        # spatial self + cross attention: 2 per spatial transformer (7 input/middle + 9 output)
        assert len(processors) == 2 * 16 and all(isinstance(p, AttnProcessor2_0) for p in processors.values())
        tiny.set_attn_processor(AttnProcessor())  # the non-SDPA reference processor
        try:
            torch.testing.assert_close(tiny(x, 10, ctx).sample, want, rtol=1e-4, atol=1e-4)
        finally:
            tiny.set_attn_processor(AttnProcessor2_0())


def test_rejects_bad_inputs(tiny):
    x, ctx = tiny_inputs()
    with pytest.raises(ValueError, match="sample"):
        tiny(x[:, :, 0], 10, ctx)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        tiny(x, 10, ctx[:1])
    with pytest.raises(ValueError, match="one per sample"):
        tiny(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match=r"sample must be \(B, C=4"):
        tiny(x[:, :3], 10, ctx)
    with pytest.raises(ValueError, match="H and W must be multiples of"):
        tiny(x[..., :-1], 10, ctx)
    with pytest.raises(ValueError, match="context_dim"):
        tiny(x, 10, ctx[..., :-1])


def test_named_configs():
    assert set(CONFIGS) >= {"videocrafter2", "hummingbird-0.9b", "hummingbird-0.7b", "tiny"}
    with pytest.raises(ValueError, match="unknown config"):
        HummingbirdUNet3DModel.from_named_config("nope")


def test_fused_qkv_projections_keep_outputs_keys_and_processors(tiny):
    import copy

    from diffusers.models.attention_processor import AttnProcessor, FusedAttnProcessor2_0

    model = copy.deepcopy(tiny)
    model.set_attn_processor(AttnProcessor())  # a user's choice, restored by unfusing (and the fallback meanwhile)
    x, ctx = tiny_inputs()
    keys, version = set(model.state_dict()), model.weights_version
    with torch.no_grad():
        want = model(x, 10, ctx).sample
        model.fuse_qkv_projections()
        got = model(x, 10, ctx).sample
        fused = list(model.attn_processors.values())
        for attn in (m for m in model.modules() if isinstance(m, hbkernels.nn.TemporalAttention)):
            torch.nn.init.zeros_(attn.to_q.weight)  # the fused copies follow, without re-fusing
        changed = model(x, 10, ctx).sample
        model.unfuse_qkv_projections()
        unfused = model(x, 10, ctx).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert all(isinstance(p, FusedAttnProcessor2_0) and isinstance(p.unfused, AttnProcessor) for p in fused)
    assert not torch.allclose(changed, got)
    torch.testing.assert_close(unfused, changed, atol=1e-5, rtol=1e-4)
    assert {type(p).__name__ for p in model.attn_processors.values()} == {"AttnProcessor"}
    assert set(model.state_dict()) == keys and model.weights_version == version + 2
    assert not any(hasattr(m, "to_qkv") and m.to_qkv is not None for m in model.modules())


def _adapt_projections(model):
    """LoRA-style adapters on one projection of each kind: a spatial self-attention's to_q, a text
    cross-attention's to_k and a temporal attention's to_v (random, so each changes the output)."""
    from diffusers.models.attention_processor import Attention

    attns = [m for m in model.modules() if isinstance(m, Attention)]
    self_attn = next(m for m in attns if not m.is_cross_attention)
    cross_attn = next(m for m in attns if m.is_cross_attention)
    temporal = next(m for m in model.modules() if isinstance(m, hbkernels.nn.TemporalAttention))
    torch.manual_seed(0)
    for module, name in ((self_attn, "to_q"), (cross_attn, "to_k"), (temporal, "to_v")):
        setattr(module, name, LowRankAdapter(getattr(module, name)))


@pytest.mark.parametrize("adapted", ["before", "after"])
def test_fused_qkv_projections_keep_adapters(tiny, adapted):
    """Adapters (what peft's LoRA puts in a projection's place) are never dropped by fusion: the
    attentions holding one before fusing stay unfused, with a warning; one added after fusing is
    called instead of the fused copy."""
    import copy

    model = copy.deepcopy(tiny)
    x, ctx = tiny_inputs()
    with torch.no_grad():
        if adapted == "before":
            _adapt_projections(model)
            with pytest.warns(UserWarning, match="3 attention layers stay unfused"):
                model.fuse_qkv_projections()
        else:
            model.fuse_qkv_projections()
            _adapt_projections(model)
        got = model(x, 10, ctx).sample
        model.unfuse_qkv_projections()
        want = model(x, 10, ctx).sample
        plain = tiny(x, 10, ctx).sample
    assert not torch.allclose(want, plain, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def merge_adapters(model):
    """peft's LoRA layers in ``model`` merged into their base layers' weights."""
    from peft.tuners.lora import LoraLayer

    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        layer.merge()


@pytest.mark.parametrize("adapted", ["before", "after"])
def test_fused_qkv_projections_with_peft_lora(tiny, adapted):
    """The same with peft's own LoRA layers (whose .weight is the base layer's: fused, they would
    drop the adapter silently), against the adapters merged into the weights of an unfused copy."""
    import copy

    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                             init_lora_weights=False)  # random up-projections: the adapters change the output
    model = copy.deepcopy(tiny)
    x, ctx = tiny_inputs()
    with torch.no_grad():
        torch.manual_seed(0)
        if adapted == "before":
            peft.inject_adapter_in_model(config, model)
            with pytest.warns(UserWarning, match="stay unfused"):
                model.fuse_qkv_projections()
        else:
            model.fuse_qkv_projections()
            peft.inject_adapter_in_model(config, model)
        got = model(x, 10, ctx).sample
        merged = copy.deepcopy(model)
        merged.unfuse_qkv_projections()
        merge_adapters(merged)
        want = merged(x, 10, ctx).sample
        plain = tiny(x, 10, ctx).sample
    assert not torch.allclose(want, plain, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_lora_through_diffusers_adapter_api(tiny, tmp_path):
    """diffusers' PeftAdapterMixin on the U-Net: add, scale, switch off, fuse around, save and load."""
    import copy

    peft = pytest.importorskip("peft")
    model = copy.deepcopy(tiny)
    x, ctx = tiny_inputs()
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                             init_lora_weights=False)
    with torch.no_grad():
        plain = model(x, 10, ctx).sample
        torch.manual_seed(0)
        model.add_adapter(config, adapter_name="style")
        full = model(x, 10, ctx).sample
        model.set_adapters(["style"], weights=[0.5])
        half = model(x, 10, ctx).sample
        model.disable_adapters()
        off = model(x, 10, ctx).sample
        model.enable_adapters()
        with pytest.warns(UserWarning, match="stay unfused"):
            model.fuse_qkv_projections()
        fused = model(x, 10, ctx).sample
        model.unfuse_qkv_projections()
        model.save_lora_adapter(tmp_path, adapter_name="style")
        loaded = copy.deepcopy(tiny)
        loaded.load_lora_adapter(tmp_path, weight_name="pytorch_lora_weights.safetensors", adapter_name="style",
                                 prefix=None)
        loaded.set_adapters(["style"], weights=[0.5])
        reloaded = loaded(x, 10, ctx).sample
    assert not torch.allclose(full, plain, atol=1e-3) and not torch.allclose(half, full, atol=1e-3)
    torch.testing.assert_close(off, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused, half, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reloaded, half, atol=1e-6, rtol=0)


def test_lora_on_every_linear_and_conv(tiny):
    """LoRA on every Linear and Conv of the U-Net (the design's stage-2 recipe), the init attention's
    pointwise Conv1d projections included: peft builds their A and B layers with Conv1d's signature,
    which PointwiseConv1d refused. Adapted, the output moves; merged, it stays."""
    import copy

    peft = pytest.importorskip("peft")
    model = copy.deepcopy(tiny)
    targets = [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d,
                                                                           torch.nn.Conv2d, torch.nn.Conv3d))]
    assert any(isinstance(model.get_submodule(n), unet_3d.PointwiseConv1d) for n in targets)
    x, ctx = tiny_inputs()
    with torch.no_grad():
        torch.manual_seed(0)
        peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=targets,
                                                     init_lora_weights=False), model)
        adapted = model(x, 10, ctx).sample
        merge_adapters(model)
        merged = model(x, 10, ctx).sample
        plain = tiny(x, 10, ctx).sample
    assert not torch.allclose(adapted, plain, atol=1e-3)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)


def test_pointwise_conv1d_refuses_what_a_linear_cannot_do():
    with pytest.raises(ValueError, match="kernel_size"):
        unet_3d.PointwiseConv1d(4, 4, 3)
    with pytest.raises(ValueError, match="padding"):
        unet_3d.PointwiseConv1d(4, 4, 1, 1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_keeps_outputs_and_every_conv_input_channels_last(tiny, backend):
    import copy

    model = copy.deepcopy(tiny)
    x, ctx = tiny_inputs(size=16)  # 8x8 would reach 1x1 latents, where NCHW and NHWC coincide
    seen = []

    def record(module, args):
        fmt = torch.channels_last if isinstance(module, torch.nn.Conv2d) else torch.channels_last_3d
        name = names[module]
        # PyTorch's own single-threaded CPU Conv3d returns NCDHW whatever its input: on CPU only the
        # first Conv3d of a temporal block (fed by hbkernels' GroupNorm of the frames view) is ours.
        if x.device.type == "cpu" and isinstance(module, torch.nn.Conv3d) and not name.endswith("conv1.2"):
            return
        seen.append((name, args[0].is_contiguous(memory_format=fmt)))

    with torch.no_grad():
        want = run_on(backend, lambda: model(x, 10, ctx).sample)
        model.enable_channels_last()
        names = {m: n for n, m in model.named_modules() if type(m) in (torch.nn.Conv2d, torch.nn.Conv3d)}
        convs = list(names)
        hooks = [m.register_forward_pre_hook(record) for m in convs]
        got = run_on(backend, lambda: model(x, 10, ctx).sample)
        for h in hooks:
            h.remove()
    assert len(seen) >= len(convs) // 2 and all(ok for _, ok in seen), [s for s in seen if not s[1]][:5]
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    model.disable_channels_last()
    assert not model.channels_last and all(m.weight.is_contiguous() for m in convs)


@pytest.mark.skipif(not hbkernels.backend.cpp_available() or torch.cuda.is_available(), reason="C++ backend on CPU")
@pytest.mark.parametrize("fused", [False, True])
def test_whole_unet_compiles_without_graph_breaks(fused):
    model = randomize(HummingbirdUNet3DModel.from_named_config(
        "tiny", channel_mult=(1, 2), attention_levels=(1,), num_res_blocks=1, use_middle_block=False), std=0.2).eval()
    if fused:  # the fused processors' check that the fused layers are still the attention's own traces too
        model.fuse_qkv_projections()
    x, ctx = tiny_inputs(b=1)
    cond = guidance_scale_embedding(torch.tensor([7.5]), 16)
    torch._dynamo.reset()
    with torch.no_grad(), hbkernels.use_backend("cpp"):
        want = model(x, 10, ctx, timestep_cond=cond).sample
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(x, 10, ctx, timestep_cond=cond).sample
        torch.testing.assert_close(got, want)
        if fused:  # weights changed in place (a load, a merged LoRA): the compiled forward sees them once refreshed
            for attn in (m for m in model.modules() if isinstance(m, hbkernels.nn.TemporalAttention)):
                attn.to_v.weight.mul_(-1)
            model.refresh_fused_projections()
            changed = compiled(x, 10, ctx, timestep_cond=cond).sample
            model.unfuse_qkv_projections()
            torch.testing.assert_close(changed, model(x, 10, ctx, timestep_cond=cond).sample)
            assert not torch.allclose(changed, got)


# ------------------------------------------------------------------- whole forward against VideoCrafter2


def vc2_timestep_embedding(t, dim, max_period=10000):
    """VideoCrafter2's lvdm timestep_embedding (repeat_only=False): cos first, freqs 10000^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sub(sd, prefix):
    """The entries of ``sd`` under ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def plain_unet(sd, cfg, x, timestep, context, fps, timestep_cond=None):
    """VideoCrafter2's UNetModel.forward with its layer layout written out from the config (not
    read off our module lists): input block i = [Res, Spatial, Temporal] or [Res] or [Downsample],
    middle [Res, Spatial, Temporal, Res], outputs cat([h, skip]) -> Res (-> Spatial, Temporal)
    (-> nearest upsample + conv), init attention right after conv_in, before its skip is kept."""
    b, _, t, _, _ = x.shape
    mc, groups, hd = cfg["model_channels"], cfg["norm_num_groups"], cfg["attention_head_dim"]

    def mlp(v, p):
        return F.linear(F.silu(F.linear(v, sd[p + "0.weight"], sd[p + "0.bias"])), sd[p + "2.weight"], sd[p + "2.bias"])

    t_emb = vc2_timestep_embedding(timestep, mc)
    if timestep_cond is not None:
        t_emb = t_emb + F.linear(timestep_cond, sd["time_cond_proj.weight"])
    emb = mlp(t_emb, "time_embed.") + mlp(vc2_timestep_embedding(fps, mc), "fps_embedding.")
    emb = emb.repeat_interleave(t, dim=0)
    h = x.transpose(1, 2).reshape(b * t, *x.shape[1:2], *x.shape[3:])

    def attention(h, p, ch):
        h = plain_spatial_transformer(h, context, sub(sd, p + "1."), ch // hd, groups, t)
        return plain_temporal_transformer(h, sub(sd, p + "2."), ch // hd, groups, b)

    hs = []
    h = F.conv2d(h, sd["input_blocks.0.0.weight"], sd["input_blocks.0.0.bias"], padding=1)
    h = plain_temporal_transformer(h, sub(sd, "init_attn.0."), cfg["init_attn_heads"], groups, b)
    hs.append(h)
    idx, levels = 1, cfg["channel_mult"]
    for level, mult in enumerate(levels):
        for _ in range(cfg["num_res_blocks"]):
            p = f"input_blocks.{idx}."
            h = plain_resblock(h, emb, sub(sd, p + "0."), groups, b)
            if level in cfg["attention_levels"]:
                h = attention(h, p, mult * mc)
            hs.append(h)
            idx += 1
        if level != len(levels) - 1:
            p = f"input_blocks.{idx}.0.op."
            h = F.conv2d(h, sd[p + "weight"], sd[p + "bias"], stride=2, padding=1)
            hs.append(h)
            idx += 1
    if cfg["use_middle_block"]:
        ch = levels[-1] * mc
        h = plain_resblock(h, emb, sub(sd, "middle_block.0."), groups, b)
        h = attention(h, "middle_block.", ch)
        h = plain_resblock(h, emb, sub(sd, "middle_block.3."), groups, b)
    idx = 0
    for level, mult in reversed(list(enumerate(levels))):
        for i in range(cfg["num_res_blocks"] + 1):
            p = f"output_blocks.{idx}."
            h = plain_resblock(torch.cat([h, hs.pop()], dim=1), emb, sub(sd, p + "0."), groups, b)
            k = 1
            if level in cfg["attention_levels"]:
                h = attention(h, p, mult * mc)
                k = 3
            if level and i == cfg["num_res_blocks"]:
                up = F.interpolate(h, scale_factor=2, mode="nearest")
                h = F.conv2d(up, sd[f"{p}{k}.conv.weight"], sd[f"{p}{k}.conv.bias"], padding=1)
            idx += 1
    h = F.silu(F.group_norm(h, groups, sd["out.0.weight"], sd["out.0.bias"]))
    h = F.conv2d(h, sd["out.2.weight"], sd["out.2.bias"], padding=1)
    return h.reshape(b, t, *h.shape[1:]).transpose(1, 2)


@pytest.mark.parametrize("overrides", [{}, {"num_res_blocks": 1, "use_middle_block": False}])
def test_whole_unet_matches_videocrafter2_forward(overrides):
    """The whole forward against VideoCrafter2's, written out independently of our module lists: the
    timestep and fps sinusoids, per-sample embeddings repeated per frame, skip order, nearest
    upsampling, init attention and middle-block order all show in the output."""
    model = randomize(HummingbirdUNet3DModel.from_named_config("tiny", **overrides), std=0.2).eval()
    cfg = {**CONFIGS["tiny"], **overrides}
    g = torch.Generator().manual_seed(1)
    b, t, size = 2, 3, 16  # 16: the deepest level is 2x2, so the upsample mode matters
    x, ctx = torch.randn(b, 4, t, size, size, generator=g), torch.randn(b, 5, 32, generator=g)
    timestep, fps = torch.tensor([500, 20]), torch.tensor([8, 28])  # per-sample: rows must not mix
    cond = guidance_scale_embedding(torch.tensor([7.5, 3.0]), 16)
    with torch.no_grad():
        got = model(x, timestep, ctx, fps=fps, timestep_cond=cond).sample
        want = plain_unet(model.state_dict(), cfg, x, timestep, ctx, fps, cond)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_fresh_model_has_videocrafter2_zero_inits():
    """VideoCrafter2 zero-initialises the output head and every residual branch's last layer, so a
    fresh model predicts exactly zero (tests otherwise randomise every parameter)."""
    model = HummingbirdUNet3DModel.from_named_config("tiny")
    zero = [n for n, p in model.named_parameters()
            if n.startswith("out.2.") or ".proj_out." in n or ".out_layers.3." in n or ".conv4.3." in n]
    assert zero and all(not dict(model.named_parameters())[n].any() for n in zero)
    x = torch.randn(1, 4, 2, 8, 8)
    with torch.no_grad():
        assert not model(x, 10, torch.randn(1, 5, 32)).sample.any()


def test_temporal_conv_dropout_is_active_in_training():
    """VideoCrafter2 trains its temporal convs with dropout 0.1; every other dropout is 0, so train-mode
    randomness comes from them only."""
    model = randomize(HummingbirdUNet3DModel.from_named_config("tiny"), std=0.2)
    x, ctx = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        model.train()
        a, b = model(x, 10, ctx).sample, model(x, 10, ctx).sample
        model.eval()
        c, d = model(x, 10, ctx).sample, model(x, 10, ctx).sample
    assert not torch.allclose(a, b) and torch.equal(c, d)


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_transformer_norm_eps_is_1e_6(kind):
    """The transformers' GroupNorms use eps 1e-6 (not torch's 1e-5): inputs with variance ~1e-6, where
    eps is not negligible."""
    b, t = 2, 3
    x = torch.randn(b * t, 16, 4, 3) * 1e-3
    with torch.no_grad():
        if kind == "spatial":
            block = randomize(SpatialTransformer(16, 2, 8, depth=1, context_dim=24, groups=4))
            ctx = torch.randn(b, 7, 24)
            got, want = block(x, ctx), plain_spatial_transformer(x, ctx, block.state_dict(), 2, 4, t)
        else:
            block = randomize(TemporalTransformer(16, 2, 8, depth=1, groups=4))
            got, want = block(x, t), plain_temporal_transformer(x, block.state_dict(), 2, 4, b)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_videocrafter2_middle_block_layout():
    """The middle block's spatial transformer (text cross-attention) is middle_block.1, the temporal one
    middle_block.2: swapped, a real VideoCrafter2 checkpoint would not load (parameter counts agree)."""
    with torch.device("meta"):
        sd = HummingbirdUNet3DModel.from_named_config("videocrafter2").state_dict()
    assert tuple(sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (1280, 1024)
    assert tuple(sd["middle_block.2.transformer_blocks.0.attn2.to_k.weight"].shape) == (1280, 1280)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused-qkv"])
def test_layerwise_casting(tiny, fused):
    """diffusers' enable_layerwise_casting stores weights in fp8 and casts each layer's around its call:
    the model's own reads of weights (the time embedding's dtype, the temporal norm written as tokens,
    conv biases folded into the next op, fused q/k/v) met fp8 storage. Hooked layers are called as
    modules, and the result is that of the same fp8-rounded weights in fp32."""
    import copy

    cast = copy.deepcopy(tiny)
    cast.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    stored = dict(cast.named_parameters())
    assert torch.float8_e4m3fn in {p.dtype for p in stored.values()}
    ref = copy.deepcopy(tiny)
    for name, p in ref.named_parameters():
        p.data = stored[name].data.float()
    if fused:
        cast.fuse_qkv_projections()
        ref.fuse_qkv_projections()
    x, context = torch.randn(1, 4, 3, 16, 16), torch.randn(1, 7, 32)
    with torch.no_grad():
        want = ref(x, 10, context).sample
        got = cast(x, 10, context).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_named_config_refuses_an_unknown_override():
    """from_config only logged a misspelt override (num_res_block) and built the model without it."""
    with pytest.raises(TypeError, match="unknown config arguments num_res_block"):
        HummingbirdUNet3DModel.from_named_config("tiny", num_res_block=1)
    model = HummingbirdUNet3DModel.from_named_config("tiny", channel_mult=(1, 2), attention_levels=(0, 1),
                                                      num_res_blocks=1, default_fps=8)
    assert model.config.num_res_blocks == 1 and model.config.default_fps == 8
