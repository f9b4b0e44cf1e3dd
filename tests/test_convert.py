"""Conversion of original-layout (VideoCrafter2 / LDM) checkpoints: U-Net, OpenCLIP text tower and
KL autoencoder; formats, strictness, refusal of code-running pickles, atomic writes, CLI."""
import collections
import enum
import functools
import importlib
import os
import pickle
import re
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from hummingbird.cli import main
from hummingbird.convert import (
    UNET_PREFIX,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    _RestrictedPickleModule,
    convert,
    load_checkpoint,
    text_encoder_from_checkpoint,
    unet_key_from_original,
)
from hummingbird.files import _rename_into, move_into_place
from hummingbird.models import HummingbirdUNet3DModel


pytestmark = pytest.mark.usefixtures("single_thread")


def randn(*shape, g):
    return torch.randn(*shape, generator=g) * 0.2


def original_unet_keys(model):
    """Our state dict under VideoCrafter2's names (the inverse of the converter's key map)."""
    return {UNET_PREFIX + k.replace(".temporal_conv.", ".temopral_conv."): v for k, v in model.state_dict().items()}


def open_clip_tower(width=128, layers=3, vocab=100, seed=0):
    """A tiny OpenCLIP text tower state dict (cond_stage_model.model.* keys, as VideoCrafter2 saves them)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"token_embedding.weight": randn(vocab, width, g=g), "positional_embedding": randn(77, width, g=g)}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        sd.update({
            p + "ln_1.weight": 1 + randn(width, g=g), p + "ln_1.bias": randn(width, g=g),
            p + "attn.in_proj_weight": randn(3 * width, width, g=g), p + "attn.in_proj_bias": randn(3 * width, g=g),
            p + "attn.out_proj.weight": randn(width, width, g=g), p + "attn.out_proj.bias": randn(width, g=g),
            p + "ln_2.weight": 1 + randn(width, g=g), p + "ln_2.bias": randn(width, g=g),
            p + "mlp.c_fc.weight": randn(4 * width, width, g=g), p + "mlp.c_fc.bias": randn(4 * width, g=g),
            p + "mlp.c_proj.weight": randn(width, 4 * width, g=g), p + "mlp.c_proj.bias": randn(width, g=g),
        })
    sd.update({"ln_final.weight": 1 + randn(width, g=g), "ln_final.bias": randn(width, g=g),
               "text_projection": randn(width, width, g=g), "logit_scale": torch.tensor(4.6)})
    return sd


def open_clip_penultimate(sd, tokens, heads):
    """FrozenOpenCLIPEmbedder(layer="penultimate") in plain PyTorch: all blocks but the last, then ln_final."""
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    n = x.shape[1]
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(layers - 1):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = F.linear(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(a, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
        h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    assert n == 77
    return F.layer_norm(x, x.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=32,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(randn(*p.shape, g=g))
    return vae


def ldm_vae_keys(vae):
    """A diffusers AutoencoderKL's weights under the original LDM (first_stage_model) names."""
    n = len(vae.config.block_out_channels)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, v in vae.state_dict().items():
        key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
        key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
        key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n - 1 - int(m[1])}.block.", key)
        key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n - 1 - int(m[1])}.upsample.", key)
        key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
        key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if m := re.fullmatch(r"(.*)mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key):
            key = f"{m[1]}mid.attn_1.{attn[m[2]]}.{m[3]}"
            v = v[:, :, None, None] if v.dim() == 2 else v  # LDM's attention uses 1x1 convolutions
        out["first_stage_model." + key] = v
    return out


@pytest.fixture(scope="module")
def parts():
    unet = HummingbirdUNet3DModel.from_named_config("tiny")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(randn(*p.shape, g=g))
    clip = open_clip_tower()
    vae = tiny_vae()
    checkpoint = {
        **original_unet_keys(unet),
        **{"cond_stage_model.model." + k: v for k, v in clip.items()},
        **ldm_vae_keys(vae),
        "betas": torch.linspace(0.00085, 0.012, 1000),  # schedule buffers: not weights, ignored
        "scale_arr": torch.ones(1000),
    }
    return {"unet": unet.eval(), "clip": clip, "vae": vae, "checkpoint": checkpoint}


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def unet_output(model):
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return model(x, 10, ctx, fps=8).sample


# ------------------------------------------------------------------------------------------ U-Net


def test_unet_key_map_is_identity_but_one_rename(parts):
    original = [k[len(UNET_PREFIX):] for k in parts["checkpoint"] if k.startswith(UNET_PREFIX)]
    renamed = [k for k in original if unet_key_from_original(k) != k]
    assert renamed and all(".temopral_conv." in k for k in renamed)
    assert {unet_key_from_original(k) for k in original} == set(parts["unet"].state_dict())


@pytest.mark.parametrize("layout", ["lightning.ckpt", "flat.pth", "flat.safetensors", "deepspeed.pt"])
def test_from_single_file_round_trip(parts, tmp_path, layout):
    ckpt = parts["checkpoint"]
    path = tmp_path / layout
    if layout.endswith(".safetensors"):
        save_file(ckpt, path)
    elif layout.startswith("lightning"):
        torch.save({"state_dict": ckpt, "epoch": 3, "global_step": 1000}, path)
    elif layout.startswith("deepspeed"):
        torch.save({"module": {"_forward_module." + k: v for k, v in ckpt.items()}}, path)
    else:
        torch.save(ckpt, path)
    model = HummingbirdUNet3DModel.from_single_file(path, config="tiny")
    assert_same_state(model, parts["unet"])
    torch.testing.assert_close(unet_output(model), unet_output(parts["unet"]))
    # the model holds its own memory: a checkpoint still mapped would kill the process (SIGBUS) once
    # saved over, as a user re-exporting to the same path would
    with open("/proc/self/maps") as maps:
        assert str(path) not in maps.read()


def test_config_forms_and_detection(parts, tmp_path):
    from hummingbird.convert import detect_config, unet_from_checkpoint, unet_state_dict
    from hummingbird.models import CONFIGS

    ckpt = parts["checkpoint"]
    assert detect_config(unet_state_dict(ckpt)) == "tiny"
    parts["unet"].save_config(tmp_path)
    for config in (None, dict(CONFIGS["tiny"]), tmp_path, tmp_path / "config.json"):
        assert_same_state(unet_from_checkpoint(ckpt, config), parts["unet"])
    with pytest.raises(CheckpointMismatchError):  # the real 0.7B config does not fit tiny weights
        unet_from_checkpoint(ckpt, "hummingbird-0.7b")


def test_strict_loading_names_the_keys(parts, tmp_path):
    from hummingbird.convert import unet_from_checkpoint

    ckpt = dict(parts["checkpoint"])
    dropped = UNET_PREFIX + "input_blocks.1.0.temopral_conv.conv2.3.bias"
    del ckpt[dropped]
    ckpt[UNET_PREFIX + "input_blocks.1.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError) as err:
        unet_from_checkpoint(ckpt, "tiny")
    # named as the checkpoint names them: prefixed, and in VideoCrafter2's spelling
    assert err.value.missing == [dropped]
    assert err.value.unexpected == [UNET_PREFIX + "input_blocks.1.0.extra.weight"]
    assert dropped in str(err.value) and UNET_PREFIX + "input_blocks.1.0.extra.weight" in str(err.value)

    with pytest.warns(UserWarning, match="extra.weight"):
        model = unet_from_checkpoint(ckpt, "tiny", strict=False)
    assert model.input_blocks[1][0].temporal_conv.conv2[3].bias.device.type == "cpu"
    # a half-precision checkpoint loaded non-strictly: the parameters it lacks take its dtype too
    half = {k: v.half() if v.is_floating_point() else v for k, v in ckpt.items()}
    with pytest.warns(UserWarning, match="extra.weight"):
        model = unet_from_checkpoint(half, "tiny", strict=False)
    assert {p.dtype for p in model.parameters()} == {torch.float16}

    bad_shape = dict(parts["checkpoint"])
    bad_shape[UNET_PREFIX + "out.2.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointMismatchError, match=r"model\.diffusion_model\.out\.2\.bias \(5,\) \(model: \(4,\)\)"):
        unet_from_checkpoint(bad_shape, "tiny", strict=False)

    with pytest.raises(ValueError, match="no U-Net weights"):
        unet_from_checkpoint({"first_stage_model.x": torch.zeros(1)}, "tiny")


def test_ema_weights_are_taken_when_asked_and_announced_when_not(parts, tmp_path):
    """LDM training checkpoints hold LitEma's copy of each trained U-Net weight under its key without
    dots ("model_ema.diffusion_modelout2bias"); the EMA weights are the ones to sample with."""
    from hummingbird.convert import ema_key, unet_from_checkpoint

    raw = parts["checkpoint"]
    unet_keys = [k for k in raw if k.startswith(UNET_PREFIX)]
    ema = {ema_key(k): raw[k] + 1 for k in unet_keys}
    ckpt = {**raw, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}
    assert ema_key(UNET_PREFIX + "out.2.bias") == "model_ema.diffusion_modelout2bias"

    with pytest.warns(UserWarning, match="EMA weights .*extract_ema=True"):
        assert_same_state(unet_from_checkpoint(ckpt, "tiny"), parts["unet"])
    model = unet_from_checkpoint(ckpt, "tiny", extract_ema=True)
    for k, v in model.state_dict().items():
        original = UNET_PREFIX + k.replace(".temporal_conv.", ".temopral_conv.")
        assert torch.equal(v, raw[original] + 1), k

    # trained weights only (LitEma skips frozen ones): the others keep their raw values, with a warning
    frozen = UNET_PREFIX + "out.2.bias"
    del ckpt[ema_key(frozen)]
    with pytest.warns(UserWarning, match=r"1 U-Net weights have no EMA copy .*out\.2\.bias"):
        model = unet_from_checkpoint(ckpt, "tiny", extract_ema=True)
    assert torch.equal(model.out[2].bias, raw[frozen])
    assert torch.equal(model.out[2].weight, raw[UNET_PREFIX + "out.2.weight"] + 1)

    with pytest.raises(ValueError, match="extract_ema=True, but the checkpoint holds no EMA weights"):
        unet_from_checkpoint(raw, "tiny", extract_ema=True)
    with pytest.raises(ValueError, match="none of the checkpoint's model_ema"):
        unet_from_checkpoint({**raw, "model_ema.decay": torch.tensor(0.9999)}, "tiny", extract_ema=True)

    src, dst = tmp_path / "train.ckpt", tmp_path / "out"
    torch.save({"state_dict": {**raw, **ema}}, src)
    assert main(["convert", str(src), str(dst), "--extract-ema"]) == 0
    converted = HummingbirdUNet3DModel.from_pretrained(dst / "unet")
    assert torch.equal(converted.out[2].bias, raw[frozen] + 1)
    assert torch.equal(HummingbirdUNet3DModel.from_single_file(src, extract_ema=True).out[2].bias, raw[frozen] + 1)


# ------------------------------------------------------------------------------- text encoder, VAE


def test_text_encoder_matches_open_clip_penultimate_layer(parts):
    model = text_encoder_from_checkpoint(parts["checkpoint"])
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (2, 128, 2, 512)
    assert (c.vocab_size, c.max_position_embeddings, c.hidden_act) == (100, 77, "gelu")
    tokens = torch.randint(0, 100, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(tokens).last_hidden_state
    torch.testing.assert_close(got, open_clip_penultimate(parts["clip"], tokens, heads=2), rtol=1e-4, atol=1e-4)

    extra = {**parts["checkpoint"], "cond_stage_model.model.visual.proj": torch.zeros(2)}
    with pytest.raises(CheckpointMismatchError, match="visual.proj"):
        text_encoder_from_checkpoint(extra)


def test_vae_round_trip(parts):
    from hummingbird.convert import vae_from_checkpoint

    vae = vae_from_checkpoint(parts["checkpoint"])
    assert vae.config.block_out_channels == [32, 64] and vae.config.layers_per_block == 1
    assert_same_state(vae, parts["vae"])
    extra = {**parts["checkpoint"], "first_stage_model.loss.logvar": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError, match="loss.logvar"):
        vae_from_checkpoint(extra)


# ------------------------------------------------------------------------------- pickles


class LatentDiffusion(torch.nn.Module):
    """Stands in for a released whole-model pickle (torch.save of the original LatentDiffusion)."""


def module_from_state_dict(state_dict, root):
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        module = root
        for name in path:
            if not hasattr(module, name):
                module.add_module(name, torch.nn.Module())
            module = getattr(module, name)
        module.register_parameter(leaf, torch.nn.Parameter(value.clone()))
    module.register_buffer("scratch", torch.zeros(2), persistent=False)  # skipped: non-persistent
    return root


def test_whole_model_pickle_is_read_without_its_classes(parts, tmp_path):
    path = tmp_path / "hummingbird.ckpt"
    torch.save(module_from_state_dict(parts["checkpoint"], LatentDiffusion()), path)
    with pytest.raises(pickle.UnpicklingError):  # weights_only refuses it ...
        torch.load(path, weights_only=True)
    loaded = load_checkpoint(path)  # ... the restricted unpickler reads the tensors out
    assert loaded.keys() == parts["checkpoint"].keys()
    assert all(torch.equal(loaded[k], v) for k, v in parts["checkpoint"].items())
    assert_same_state(HummingbirdUNet3DModel.from_single_file(path, config="tiny"), parts["unet"])


class Mode(enum.Enum):
    EPS = "eps"


class PlainConfig:
    def __init__(self):
        self.channels, self.name = 320, "hummingbird"
        self.table = np.arange(6, dtype=np.int16).reshape(2, 3)


class Registry(collections.OrderedDict):  # pickled as a call of the class, then its items
    pass


class Stack(list):
    pass


def test_whole_model_pickle_with_numpy_enum_and_object_attributes(parts, tmp_path):
    """What released whole-model pickles carry besides modules: numpy arrays and scalars, enums,
    plain objects, tensors with attributes (torch._tensor._rebuild_from_type_v2)."""
    model = module_from_state_dict(parts["checkpoint"], LatentDiffusion())
    model.betas_np = np.linspace(0.00085, 0.012, 1000)
    model.scale_factor = np.float64(0.18215)
    model.parameterization = Mode.EPS
    model.cfg = PlainConfig()
    model.registry, model.stack = Registry(unet="x"), Stack([1, 2])
    noted = torch.arange(3.0)
    noted.note = "a tensor with attributes"
    model.register_buffer("noted", noted)
    path = tmp_path / "hummingbird.ckpt"
    torch.save(model, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

    loaded = load_checkpoint(path)
    assert loaded.keys() == parts["checkpoint"].keys() | {"noted"}
    assert all(torch.equal(loaded[k], v) for k, v in parts["checkpoint"].items())
    assert torch.equal(loaded["noted"], noted)

    obj = vars(torch.load(path, weights_only=False, pickle_module=_RestrictedPickleModule))
    np.testing.assert_array_equal(obj["betas_np"], model.betas_np)
    assert obj["scale_factor"] == np.float64(0.18215) and type(obj["scale_factor"]) is np.float64
    enum_member = obj["parameterization"]  # its class is never imported: an inert stand-in with the call's arguments
    assert type(enum_member).__qualname__.endswith(".Mode") and enum_member._call_args == ("eps",)
    cfg = vars(obj["cfg"])
    assert (cfg["channels"], cfg["name"]) == (320, "hummingbird")
    np.testing.assert_array_equal(cfg["table"], model.cfg.table)
    assert vars(obj["registry"])["_items"] == {"unet": "x"} and vars(obj["stack"])["_list"] == [1, 2]


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_running_pickle_is_refused_not_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    if writer == "torch.save":
        torch.save({"state_dict": {UNET_PREFIX + "out.2.bias": torch.zeros(4)}, "hook": Evil(marker)}, path)
    else:  # a raw pickle (torch.load's legacy path)
        path.write_bytes(pickle.dumps({"hook": Evil(marker)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"refused to call (posix|os|nt)\.system"):
        load_checkpoint(path)
    assert not marker.exists()
    assert main(["convert", str(path), str(tmp_path / "out")]) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


class Call:
    """Pickles as the call ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


CODE_RUNNING = {  # global the pickle calls -> payload that would create the marker file (where it can)
    "builtins.eval": lambda m: Call(eval, f"open({str(m)!r}, 'w').close()"),
    "builtins.exec": lambda m: Call(exec, f"open({str(m)!r}, 'w').close()"),
    "builtins.getattr": lambda m: Call(getattr, torch.Size, "mro"),
    "functools.partial": lambda m: Call(functools.partial(os.system, f"touch {m}")),
    "subprocess.Popen": lambda m: Call(subprocess.Popen, ["touch", str(m)]),
    "importlib.import_module": lambda m: Call(importlib.import_module, "os"),
    "torch.serialization.load": lambda m: Call(torch.load, str(m)),  # torch beyond its rebuild functions
}


@pytest.mark.parametrize("name", CODE_RUNNING)
def test_calls_outside_the_allow_list_are_refused(tmp_path, name):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {UNET_PREFIX + "out.2.bias": torch.zeros(4)}, "hook": CODE_RUNNING[name](marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=f"refused to call {re.escape(name)} "):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("target", [b"torch._utils\n_rebuild_tensor_v2", b"torch.nn.parameter\nParameter"])
def test_pickle_changing_a_function_or_class_is_refused(tmp_path, target):
    # GLOBAL target; BUILD (None, {"pwned": True}): pickle's BUILD would setattr on the allowed global itself.
    path = tmp_path / "evil.ckpt"
    path.write_bytes(b"\x80\x02c" + target + b"\nN}X\x05\x00\x00\x00pwned\x88s\x86b.")
    with pytest.raises(UnsafeCheckpointError, match="refused to set attributes of torch"):
        load_checkpoint(path)
    assert not hasattr(torch._utils._rebuild_tensor_v2, "pwned") and not hasattr(torch.nn.Parameter, "pwned")


def test_unsupported_format(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------- folders and CLI


def test_convert_writes_diffusers_folder(parts, tmp_path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    src, dst = tmp_path / "model.ckpt", tmp_path / "out" / "hummingbird-tiny"
    torch.save({"state_dict": parts["checkpoint"]}, src)
    umask = os.umask(0o022)
    try:
        assert main(["convert", str(src), str(dst), "--config", "tiny"]) == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o755  # the user's umask, not a temporary folder's 0700
    # every file too: safetensors writes its own through a 0600 temporary file
    assert {stat.S_IMODE(p.stat().st_mode) for p in dst.rglob("*") if p.is_file()} == {0o644}
    assert sorted(p.name for p in dst.iterdir()) == ["text_encoder", "unet", "vae"]
    assert (dst / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    unet = HummingbirdUNet3DModel.from_pretrained(dst / "unet").eval()
    assert_same_state(unet, parts["unet"])
    torch.testing.assert_close(unet_output(unet), unet_output(parts["unet"]))
    assert_same_state(AutoencoderKL.from_pretrained(dst / "vae"), parts["vae"])
    assert CLIPTextModel.from_pretrained(dst / "text_encoder").config.num_hidden_layers == 2

    assert main(["convert", str(src), str(dst)]) == 1  # exists
    assert main(["convert", str(src), str(dst), "--overwrite", "--dtype", "fp16"]) == 0  # config detected
    with safe_open(dst / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert sorted(p.name for p in dst.parent.iterdir()) == ["hummingbird-tiny"]  # no temporary folders left


def test_interrupted_conversion_leaves_nothing(parts, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    src, dst = tmp_path / "model.safetensors", tmp_path / "out"
    save_file(parts["checkpoint"], src)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AutoencoderKL, "save_pretrained", fail)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_destination_created_during_conversion_is_not_replaced(parts, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    src, dst = tmp_path / "model.safetensors", tmp_path / "out"
    save_file(parts["checkpoint"], src)
    save = AutoencoderKL.save_pretrained

    def save_while_someone_creates_dst(self, *args, **kwargs):  # after the up-front check, before the move
        save(self, *args, **kwargs)
        dst.mkdir(exist_ok=True)
        (dst / "theirs.txt").write_text("keep me")

    monkeypatch.setattr(AutoencoderKL, "save_pretrained", save_while_someone_creates_dst)
    with pytest.raises(FileExistsError, match="appeared while it was written"):
        convert(src, dst, "tiny")
    assert [p.name for p in dst.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "out"]  # no temporary folders left
    assert convert(src, dst, "tiny", overwrite=True) == ["unet", "text_encoder", "vae"]
    assert sorted(p.name for p in dst.iterdir()) == ["text_encoder", "unet", "vae"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "out"]


@pytest.mark.parametrize("where", ["dst is src", "dst holds src", "src through a linked folder"])
def test_convert_refuses_a_destination_holding_its_source(parts, tmp_path, where):
    """`convert models/vc2/model.ckpt models/vc2 --overwrite` deleted the checkpoint it had just read."""
    folder = tmp_path / "vc2"
    folder.mkdir()
    src = folder / "model.safetensors"
    save_file(parts["checkpoint"], src)
    dst = src if where == "dst is src" else folder
    if where == "src through a linked folder":
        (tmp_path / "link").symlink_to(folder)
        src = tmp_path / "link" / "model.safetensors"
    with pytest.raises(ValueError, match="is or contains the checkpoint"):
        convert(src, dst, "tiny", overwrite=True)
    assert src.is_file()


def test_convert_refuses_a_dangling_symlink_before_converting(parts, tmp_path, monkeypatch):
    src, dst = tmp_path / "model.safetensors", tmp_path / "out"
    save_file(parts["checkpoint"], src)
    dst.symlink_to(tmp_path / "gone")
    monkeypatch.setattr("hummingbird.convert.load_checkpoint", lambda path: pytest.fail("read before the check"))
    with pytest.raises(FileExistsError, match="dangling symbolic link"):
        convert(src, dst, "tiny", overwrite=True)


def test_text_tower_without_its_mlp_is_a_mismatch(parts):
    """The tower's MLP width is read from its first block: a checkpoint without it raised a bare KeyError."""
    key = "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight"
    broken = {k: v for k, v in parts["checkpoint"].items() if k != key}
    for strict in (True, False):
        with pytest.raises(CheckpointMismatchError, match="resblocks.0.mlp.c_fc.weight"):
            text_encoder_from_checkpoint(broken, strict=strict)


@pytest.mark.parametrize("text,match", [("[1, 2]", "must hold a JSON object"), ("{", "not valid JSON")])
def test_config_file_must_be_a_json_object(tmp_path, text, match):
    from hummingbird.convert import resolve_config

    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        resolve_config(str(path))


@pytest.mark.parametrize("intruder", ["empty folder", "folder", "file"])
def test_move_into_place_replaces_only_with_overwrite(tmp_path, intruder):
    new, dst = tmp_path / "new", tmp_path / "dst"
    new.mkdir()
    (new / "model").write_text("new")
    if intruder == "file":
        dst.write_text("theirs")
    else:
        dst.mkdir()
        if intruder == "folder":
            (dst / "theirs").write_text("theirs")
            with pytest.raises(FileExistsError):  # the rename itself refuses, even without the check before it
                _rename_into(new, dst)
    with pytest.raises(FileExistsError, match="not replaced"):
        move_into_place(new, dst, overwrite=False)
    assert (new / "model").is_file() and dst.exists() and not (dst.is_dir() and (dst / "model").exists())
    move_into_place(new, dst, overwrite=True)
    assert (dst / "model").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_write_folder_names_what_a_killed_writer_left(tmp_path):
    """A SIGKILL leaves the temporary folder, or between an overwrite's two renames the previous
    version aside: the next write names them and deletes neither (another writer may own them)."""
    from hummingbird.files import write_folder

    dst = tmp_path / "model[1]"  # a glob pattern in the name matches only itself
    leftovers = [tmp_path / ".model[1].tmp-0123", tmp_path / ".model[1].old-x7" / "model[1]",
                 tmp_path / ".model1.tmp-9"]
    for p in leftovers:
        p.mkdir(parents=True)
    named = r"interrupted write of model\[1\].*\.model\[1\]\.tmp-0123, \.model\[1\]\.old-x7$"
    with pytest.warns(UserWarning, match=named):
        write_folder(dst, lambda tmp: (tmp / "a").write_text("new"))
    assert (dst / "a").read_text() == "new" and all(p.is_dir() for p in leftovers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_folder(tmp_path / "clean", lambda tmp: (tmp / "a").write_text("new"))  # nothing left: no warning


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "hummingbird", "convert", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--config" in result.stdout


def test_convert_dtype_casts_every_component(parts, tmp_path):
    """--dtype casts every component, not only the U-Net."""
    from safetensors import safe_open

    from hummingbird.convert import convert

    src, dst = tmp_path / "model.ckpt", tmp_path / "out"
    torch.save({"state_dict": parts["checkpoint"]}, src)
    convert(src, dst, "tiny", dtype="fp16")
    for name, file in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                       ("text_encoder", "model.safetensors")):
        with safe_open(dst / name / file, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, name


def test_vae_scaling_factor_and_torch_dtype(parts, tmp_path):
    """The converted VAE keeps SD's scaling factor 0.18215; from_single_file honours torch_dtype."""
    from hummingbird.convert import vae_from_checkpoint

    assert vae_from_checkpoint(parts["checkpoint"]).config.scaling_factor == 0.18215
    path = tmp_path / "m.pth"
    torch.save(parts["checkpoint"], path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # diffusers' .to() advises passing torch_dtype, which was done
        model = HummingbirdUNet3DModel.from_single_file(path, config="tiny", torch_dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


@pytest.mark.parametrize("dtype, config, match", [
    ("float16", None, "dtype must be one of 'fp32', 'fp16', 'bf16' or a floating-point torch dtype, got 'float16'"),
    (torch.int8, None, "dtype must be one of .* got torch.int8"),
    (None, "no-such-config", "config 'no-such-config' is neither a named config"),
])
def test_bad_dtype_or_config_fails_before_reading_the_checkpoint(dtype, config, match, tmp_path, monkeypatch):
    import hummingbird.convert

    def read(path):
        raise AssertionError("the checkpoint was read before the arguments were checked")

    monkeypatch.setattr(hummingbird.convert, "load_checkpoint", read)
    with pytest.raises(ValueError, match=match):
        convert(tmp_path / "model.ckpt", tmp_path / "out", config, dtype=dtype)
    with pytest.raises(ValueError, match=match.replace("dtype must", "torch_dtype must")):
        HummingbirdUNet3DModel.from_single_file(tmp_path / "model.ckpt", config, torch_dtype=dtype)
    assert not (tmp_path / "out").exists()


def test_non_strict_text_and_vae_warn_about_the_keys_they_drop(parts):
    """--no-strict promises warnings: the VAE's and text tower's unknown keys are named, not dropped silently."""
    from hummingbird.convert import vae_from_checkpoint

    extra = {**parts["checkpoint"], "first_stage_model.loss.logvar": torch.zeros(1),
             "cond_stage_model.model.visual.proj": torch.zeros(2)}
    with pytest.warns(UserWarning, match="loss.logvar"):
        vae = vae_from_checkpoint(extra, strict=False)
    assert_same_state(vae, parts["vae"])
    with pytest.warns(UserWarning, match="visual.proj"):
        text_encoder_from_checkpoint(extra, strict=False)


def test_from_single_file_detects_the_config(parts, tmp_path):
    """Like `hummingbird convert`, from_single_file without a config detects it (the old default,
    hummingbird-0.7b, refused every other model's checkpoint)."""
    path = tmp_path / "vc2-like.safetensors"
    save_file(parts["checkpoint"], path)
    assert_same_state(HummingbirdUNet3DModel.from_single_file(path), parts["unet"])


@pytest.mark.parametrize("kind", ["truncated.ckpt", "garbage.ckpt", "garbage.safetensors"])
def test_unreadable_checkpoint_is_a_clear_error(parts, tmp_path, kind, capsys):
    from hummingbird.convert import CheckpointReadError

    path = tmp_path / kind
    if kind.startswith("truncated"):  # an interrupted download of a multi-GB file
        torch.save(parts["checkpoint"], path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"garbage" * 1000)
    with pytest.raises(CheckpointReadError, match="truncated or corrupt"):
        load_checkpoint(path)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hummingbird convert: error:") and str(path) in err and "Traceback" not in err


def test_non_strict_text_encoder_warns_once_about_a_dropped_key(parts):
    """The text tower's unknown keys are warned about and dropped before conversion: not passed on to be
    reported a second time by the state-dict load."""
    import warnings

    # under transformer. but no resblock: diffusers' converter would pass it on as "extra_scale"
    extra = {**parts["checkpoint"], "cond_stage_model.model.transformer.extra_scale": torch.zeros(2)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text_encoder = text_encoder_from_checkpoint(extra, strict=False)
    assert sum("extra_scale" in str(w.message) for w in caught) == 1
    assert_same_state(text_encoder, text_encoder_from_checkpoint(parts["checkpoint"]))


def test_checkpoint_io_error_is_not_reported_as_corrupt(parts, tmp_path, monkeypatch):
    """An OSError while reading (a failing disk, a dropped network mount) propagates as itself: the file
    may be fine, so it is not a CheckpointReadError ("truncated or corrupt")."""
    path = tmp_path / "model.ckpt"
    torch.save(parts["checkpoint"], path)

    def failing_load(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(OSError, match="Input/output error"):
        load_checkpoint(path)
