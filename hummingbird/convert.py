"""Convert original VideoCrafter2 / Hummingbird checkpoints to diffusers-format models.

An original (LDM-style) checkpoint holds the whole latent diffusion model in one state dict:

    model.diffusion_model.*   3D U-Net                   -> HummingbirdUNet3DModel (unet/)
    cond_stage_model.model.*  OpenCLIP ViT-H text tower  -> transformers CLIPTextModel (text_encoder/)
    first_stage_model.*       KL-f8 autoencoder          -> diffusers AutoencoderKL (vae/)

Training checkpoints may also hold LDM's EMA copy of the U-Net (``model_ema.*``: each weight's key
without its dots); ``extract_ema=True`` (``--extract-ema``) converts those in place of the raw weights,
which otherwise are taken with a warning that the EMA ones exist. Other keys (noise-schedule buffers
such as ``betas``) are not model weights and are ignored. Loads are strict: missing, unexpected or misshapen keys raise
:class:`CheckpointMismatchError` listing them.

U-Net key map: our parameter names are VideoCrafter2's, so the map strips the prefix and fixes the
one misspelt module name (:data:`UNET_RENAMES`).

Reading never runs code from the file. ``.safetensors`` hold only tensors; torch pickles
(``.ckpt``/``.pt``/``.pth``/``.bin``) are read with ``torch.load(weights_only=True)`` first. Released
Hummingbird checkpoints are whole pickled model objects, which weights_only refuses; those are read
with :class:`RestrictedUnpickler`. It resolves only the globals torch's weights_only unpickler allows
(tensor/parameter rebuild functions, dtypes, ``torch.Size``, ``OrderedDict``, ...) plus numpy's
array, scalar and dtype rebuilders; every other name becomes an inert placeholder class and is never
imported, so the nn.Module tree's ``_parameters``/``_buffers`` can be read out of its attribute data.
Calling a placeholder (how enum members and objects with a custom ``__reduce__`` come back) gives an
inert placeholder object too, except for names from modules that run code, touch processes, files
or imports, or forward calls (``os``, ``builtins``, ``subprocess``, ``importlib``, ``functools``, ...,
and anything of torch's or numpy's not allowed above): those are refused with an error naming them.
Setting state on a class or function (which would change code for the rest of the process) is refused.
"""
import _compat_pickle
import json
import pickle
import re
import warnings
import zipfile
from contextlib import nullcontext
from pathlib import Path

import torch

from hummingbird.files import check_destination, write_folder

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.model."  # FrozenOpenCLIPEmbedder keeps the open_clip model as .model
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."  # LDM's LitEma: a buffer per trained U-Net weight, named without the dots
UNET_RENAMES = {".temopral_conv.": ".temporal_conv."}  # VideoCrafter2's spelling -> ours

TORCH_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model; ``missing``, ``unexpected`` and
    ``mismatched`` hold the offending keys."""

    def __init__(self, what, missing=(), unexpected=(), mismatched=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        lines = [f"{what} weights do not match the model:"]
        for label, keys in (
            ("missing from the checkpoint", self.missing),
            ("unexpected in the checkpoint", self.unexpected),
            ("wrong shape", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... and {len(keys) - 12} more" if len(keys) > 12 else "")
                lines.append(f"  {label} ({len(keys)}): {shown}")
        super().__init__("\n".join(lines))


class CheckpointReadError(ValueError):
    """A checkpoint file could not be read at all (truncated, corrupt, or not a checkpoint)."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle asked to run code (to call something no checkpoint needs to call) or to change a
    class or function."""


# ----------------------------------------------------------------------------- reading checkpoints

# Top-level modules whose callables run code, start processes, touch files, the network or imports,
# or forward calls to other callables (partial, getattr, methodcaller). A pickle calling into one of
# them is not a checkpoint. torch, numpy and builtins are listed because their safe callables are
# allow-listed by name (:func:`_allowed_globals`); anything else of theirs (torch.load, torch.hub.load,
# numpy.load, eval, getattr, ...) is refused.
REFUSED_MODULES = frozenset({
    "builtins", "os", "posix", "nt", "sys", "subprocess", "importlib", "functools", "operator", "runpy",
    "shutil", "socket", "pickle", "_pickle", "marshal", "types", "code", "codeop", "ctypes", "pty",
    "webbrowser", "multiprocessing", "asyncio", "threading", "_thread", "signal", "copyreg", "pydoc",
    "timeit", "inspect", "pdb", "bdb", "zipimport", "pkgutil", "site", "pip", "setuptools", "torch", "numpy",
})

_EXPORT_HINT = (
    "Only tensors, plain containers and the attribute data of pickled objects (such as a pickled "
    "nn.Module's parameters) can be read safely. If you trust the file, export its weights in an "
    "isolated environment, e.g. python -c \"import torch; m = torch.load('IN', weights_only=False); "
    "torch.save(m.state_dict() if hasattr(m, 'state_dict') else m, 'OUT.ckpt')\", and convert OUT.ckpt."
)


class _InertCalls(type):
    """Metaclass of the placeholders. Creating objects through NEWOBJ (``cls.__new__``) is how pickled
    class instances are rebuilt. *Calling* a placeholder (REDUCE, INST, OBJ) is how a pickle runs
    functions: it is refused for names from :data:`REFUSED_MODULES`; otherwise (an enum member, an
    object with a custom ``__reduce__``) it gives an inert instance holding the arguments in
    ``_call_args``. Nothing is imported either way, so nothing from the file runs."""

    def __call__(cls, *args, **kwargs):
        if cls.__module__.split(".")[0] in REFUSED_MODULES:
            raise UnsafeCheckpointError(
                f"refused to call {cls.__qualname__} while unpickling: the checkpoint runs code when loaded. "
                + _EXPORT_HINT
            )
        obj = cls.__new__(cls)
        obj.__dict__["_call_args"] = args
        return obj


class Placeholder(metaclass=_InertCalls):
    """Stands in for a class named in a pickle; instances only hold the state the pickle sets."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    # SETITEM(S) / APPEND(S): the items of a pickled dict or list subclass, kept as data.
    def __setitem__(self, key, value):
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, item):
        self.__dict__.setdefault("_list", []).append(item)

    def extend(self, items):
        self.__dict__.setdefault("_list", []).extend(items)


def _numpy_globals() -> dict:
    """numpy's array, scalar and dtype rebuilders, under numpy 1's and numpy 2's module names."""
    try:
        import numpy
        try:
            from numpy._core import multiarray  # numpy >= 2 (numpy.core is a deprecated alias there)
        except ImportError:
            from numpy.core import multiarray
    except ImportError:  # no numpy: its names stay placeholders, and calling them is refused
        return {}
    allowed = {"numpy.ndarray": numpy.ndarray, "numpy.dtype": numpy.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{module}._reconstruct"] = multiarray._reconstruct
        allowed[f"{module}.scalar"] = multiarray.scalar
    return allowed


def _allowed_globals() -> dict:
    """``"module.name"`` -> object: exactly what ``torch.load(weights_only=True)`` resolves by default
    (tensor and parameter rebuild functions, tensor/storage classes, dtypes, ``torch.Size``,
    ``torch.device``, ``OrderedDict``, ``Counter``, and ``set``/``bytearray``/``complex``/``_codecs.encode``
    for protocol-2 data), plus numpy's rebuilders and ``frozenset``."""
    from torch._weights_only_unpickler import _get_allowed_globals

    return {**_get_allowed_globals(), **_numpy_globals(), "builtins.frozenset": frozenset}


class RestrictedUnpickler(pickle._Unpickler):
    """Resolves only allow-listed globals; every other global becomes a :class:`Placeholder`
    subclass (nothing is imported). Storages are supplied by torch.load's persistent_load.

    The pure-Python unpickler, so that BUILD can be checked: it may set the state of data objects
    (placeholders, tensors, arrays, ordered dicts) but not of a class or function."""

    allowed = _allowed_globals()

    def find_class(self, module, name):
        # Protocol-2 pickles (torch.save's default) name Python 2 modules: __builtin__.set, ...
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if f"{module}.{name}" in self.allowed:
            return self.allowed[f"{module}.{name}"]
        return _InertCalls(name, (Placeholder,), {"__module__": module, "__qualname__": f"{module}.{name}"})

    def load_build(self):
        inst = self.stack[-2]
        if isinstance(inst, type) or callable(inst):
            name = getattr(inst, "__qualname__", type(inst).__qualname__)
            raise UnsafeCheckpointError(
                f"refused to set attributes of {getattr(inst, '__module__', '?')}.{name} while unpickling: "
                "the checkpoint changes code when loaded. " + _EXPORT_HINT
            )
        if not isinstance(inst, Placeholder):
            return pickle._Unpickler.load_build(self)
        # A placeholder's state goes straight into its __dict__: no __setstate__ or setattr is looked up.
        state = self.stack.pop()
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__ state, __slots__ state)
        if isinstance(state, dict):
            inst.__dict__.update(state)
        else:  # what a custom __getstate__ returned: kept as is
            inst.__dict__["_state"] = state

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build}


class _RestrictedPickleModule:
    """What torch.load is given as ``pickle_module``: its Unpickler subclasses ours."""

    Unpickler = RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()


def _module_tensors(module, prefix="", out=None) -> dict:
    """The state dict of a pickled nn.Module rebuilt as placeholders (parameters and persistent buffers)."""
    out = {} if out is None else out
    state = vars(module)
    non_persistent = state.get("_non_persistent_buffers_set", ())
    buffers = {k: v for k, v in (state.get("_buffers") or {}).items() if k not in non_persistent}
    for name, tensor in {**(state.get("_parameters") or {}), **buffers}.items():
        if isinstance(tensor, torch.Tensor):
            out[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _module_tensors(child, f"{prefix}{name}.", out)
    return out


def _is_pickled_module(obj) -> bool:
    return isinstance(obj, Placeholder) and isinstance(vars(obj).get("_modules"), dict)


def _find_state_dict(obj, path) -> dict:
    """Tensors by name from what a checkpoint file held: a state dict, a Lightning/DeepSpeed
    checkpoint (nested under "state_dict"/"module"), or a pickled model."""
    if _is_pickled_module(obj):
        return _module_tensors(obj)
    if isinstance(obj, dict):
        for key in ("state_dict", "module", "model"):
            if isinstance(obj.get(key), dict) or _is_pickled_module(obj.get(key)):
                return _find_state_dict(obj[key], path)
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            for wrapper in ("_forward_module.", "module."):  # DeepSpeed / DDP wrappers
                if all(k.startswith(wrapper) for k in tensors):
                    tensors = {k[len(wrapper):]: v for k, v in tensors.items()}
            return tensors
    raise ValueError(f"{path}: found no state dict or model in the checkpoint (top-level object: {type(obj).__name__})")


def load_checkpoint(path) -> dict:
    """Read every tensor of an original checkpoint, by name, without running code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in TORCH_PICKLE_SUFFIXES:
        expected = ", ".join((".safetensors",) + TORCH_PICKLE_SUFFIXES)
        raise ValueError(f"{path}: unsupported checkpoint format {suffix!r}; expected one of {expected}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        mmap = zipfile.is_zipfile(path)  # torch's zip format can be memory-mapped instead of read whole
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            # Not plain weights (e.g. a pickled model object): read it with the restricted unpickler.
            obj = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap,
                             pickle_module=_RestrictedPickleModule)
    except (UnsafeCheckpointError, OSError):
        raise
    except Exception as err:  # torch's RuntimeError for a truncated zip, SafetensorError, pickle's ValueError, ...
        raise CheckpointReadError(
            f"{path}: cannot read it as a {suffix} checkpoint; the file is truncated or corrupt (an interrupted "
            f"download?) or not a checkpoint ({type(err).__name__}: {err})"
        ) from err
    return _find_state_dict(obj, path)


# ----------------------------------------------------------------------------- loading components


def load_state_dict_checked(model, state_dict, what, strict=True, key_name=None):
    """Load ``state_dict`` into ``model`` (assigning tensors, so meta-device models work). Shape
    mismatches always raise; missing/unexpected keys raise when strict, else warn. ``key_name`` maps a
    key to the name errors show (the checkpoint's own, where the converter renamed it)."""
    key_name = key_name or (lambda key: key)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(map(key_name, expected.keys() - state_dict.keys()))
    unexpected = sorted(map(key_name, state_dict.keys() - expected.keys()))
    mismatched = sorted(
        f"{key_name(k)} {tuple(state_dict[k].shape)} (model: {tuple(expected[k])})"
        for k in expected.keys() & state_dict.keys()
        if state_dict[k].shape != expected[k]
    )
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointMismatchError(what, missing, unexpected, mismatched)
    if missing or unexpected:
        warnings.warn(str(CheckpointMismatchError(what, missing, unexpected)) + "\n(loaded non-strictly)", stacklevel=2)
    if not any(t.is_meta for t in model.state_dict().values()):
        # a model built for a partial load: first in the checkpoint's dtype, so that the parameters the
        # checkpoint lacks do not stay in another one (a mixed-dtype model fails in its first forward)
        dtype = next((v.dtype for v in state_dict.values() if v.is_floating_point()), None)
        if dtype is not None:
            torch.nn.Module.to(model, dtype)
    model.load_state_dict({k: v.contiguous() for k, v in state_dict.items() if k in expected}, strict=False, assign=True)
    return model


def _reject_or_warn(what, unexpected, strict):
    """Unexpected keys a component's converter cannot take: an error when strict, else a warning
    (they are dropped), as :func:`load_state_dict_checked` does for the keys it sees."""
    err = CheckpointMismatchError(what, unexpected=unexpected)
    if strict:
        raise err
    warnings.warn(f"{err}\n(loaded non-strictly; these are ignored)", stacklevel=3)


def unet_key_from_original(key: str) -> str:
    for old, new in UNET_RENAMES.items():
        key = key.replace(old, new)
    return key


def _unet_prefix(checkpoint: dict) -> str:
    """The U-Net's key prefix in a checkpoint: "" for a bare U-Net state dict."""
    prefix = UNET_PREFIX if any(k.startswith(UNET_PREFIX) for k in checkpoint) else ""
    if not prefix and "input_blocks.0.0.weight" not in checkpoint:
        raise ValueError(f"no U-Net weights in the checkpoint (no keys starting with {UNET_PREFIX!r})")
    return prefix


def ema_key(key: str) -> str:
    """LitEma's name for the U-Net weight ``key``: "model.diffusion_model.out.2.bias" ->
    "model_ema.diffusion_modelout2bias"."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def _ema_weights(checkpoint: dict, keys: list, extract_ema: bool) -> dict:
    """Original U-Net key -> its EMA copy, where the caller asked for them."""
    has_ema = any(k.startswith(EMA_PREFIX) for k in checkpoint)
    if not extract_ema:
        if has_ema:
            warnings.warn(f"the checkpoint also holds EMA weights of the U-Net ({EMA_PREFIX}*), usually better for "
                          "inference; converting the raw ones (extract_ema=True / --extract-ema takes the EMA ones)",
                          stacklevel=4)
        return {}
    if not has_ema or not keys:
        raise ValueError(f"extract_ema=True, but the checkpoint holds no EMA weights of the U-Net "
                         f"(no keys starting with {EMA_PREFIX!r} beside {UNET_PREFIX!r} ones)")
    ema = {k: checkpoint[ema_key(k)] for k in keys if ema_key(k) in checkpoint}
    if not ema:
        raise ValueError(f"extract_ema=True, but none of the checkpoint's {EMA_PREFIX}* keys is a U-Net weight's")
    if len(ema) < len(keys):  # LitEma tracks trained weights only: frozen ones keep their (unchanged) values
        frozen = [k for k in keys if k not in ema]
        warnings.warn(f"{len(frozen)} U-Net weights have no EMA copy (frozen in training?), their raw values are "
                      f"used: {', '.join(frozen[:5])}{', ...' if len(frozen) > 5 else ''}", stacklevel=4)
    return ema


def unet_state_dict(checkpoint: dict, extract_ema: bool = False) -> dict:
    """The U-Net's tensors under our names (a bare U-Net state dict, without prefix, works too);
    ``extract_ema`` takes LitEma's copies (``model_ema.*``) in place of the raw weights."""
    prefix = _unet_prefix(checkpoint)
    keys = [k for k in checkpoint if k.startswith(prefix)] if prefix else []
    ema = _ema_weights(checkpoint, keys, extract_ema)
    return {unet_key_from_original(k[len(prefix):]): ema.get(k, v) for k, v in checkpoint.items() if k.startswith(prefix)}


def _unet_key_in(checkpoint: dict):
    """Our U-Net key -> the name the checkpoint has (or would have) for it."""
    prefix = _unet_prefix(checkpoint)
    renames = {new: old for old, new in UNET_RENAMES.items() if any(old in k for k in checkpoint)}

    def original(key):
        for ours, theirs in renames.items():
            key = key.replace(ours, theirs)
        return prefix + key

    return original


def resolve_config(config) -> dict:
    """A named config, a dict, or a path to a config.json (or a folder holding one) -> kwargs."""
    from hummingbird.models.configs import CONFIGS

    if isinstance(config, dict):
        return dict(config)
    if isinstance(config, str) and config in CONFIGS:
        return dict(CONFIGS[config])
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"config {config!r} is neither a named config ({', '.join(CONFIGS)}) nor a config.json")
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"config {path} is not valid JSON: {err}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config {path} must hold a JSON object of model settings, got {type(loaded).__name__}")
    return loaded


def detect_config(unet_sd: dict) -> str:
    """The named config whose parameter names and shapes are exactly those of ``unet_sd``."""
    from hummingbird.models import CONFIGS, HummingbirdUNet3DModel

    shapes = {k: v.shape for k, v in unet_sd.items()}
    conv_in = shapes.get("input_blocks.0.0.weight")
    for name, config in CONFIGS.items():
        if conv_in is None or conv_in[0] != config["model_channels"]:  # skip building hopeless candidates
            continue
        with torch.device("meta"):
            model = HummingbirdUNet3DModel.from_config(config)
        if {k: v.shape for k, v in model.state_dict().items()} == shapes:
            return name
    raise ValueError(f"the U-Net weights match none of the named configs ({', '.join(CONFIGS)}); pass a config")


def resolve_dtype(dtype, name="dtype"):
    """None, a name in :data:`DTYPES` or a floating-point torch dtype -> a torch dtype or None; ``name``
    is the argument named in the error."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ValueError(f"{name} must be one of {', '.join(map(repr, DTYPES))} or a floating-point torch dtype, "
                     f"got {dtype!r}")


def unet_from_checkpoint(checkpoint: dict, config=None, *, strict=True, torch_dtype=None, extract_ema=False):
    """HummingbirdUNet3DModel from a loaded original checkpoint; ``config=None`` detects it.
    ``torch_dtype``: as ``dtype`` of :func:`convert`; ``extract_ema``: as :func:`unet_state_dict`."""
    from hummingbird.models import HummingbirdUNet3DModel

    torch_dtype = resolve_dtype(torch_dtype, "torch_dtype")
    unet_sd = unet_state_dict(checkpoint, extract_ema)
    config = resolve_config(config if config is not None else detect_config(unet_sd))
    # Strict loads assign every parameter, so build on the meta device (no 1.4B random init).
    with torch.device("meta") if strict else nullcontext():
        model = HummingbirdUNet3DModel.from_config(config)
    load_state_dict_checked(model, unet_sd, "U-Net", strict, key_name=_unet_key_in(checkpoint))
    # not model.to(): diffusers' warns to pass torch_dtype to from_pretrained, which is what was done
    return (torch.nn.Module.to(model, torch_dtype) if torch_dtype else model).eval()


def _component(checkpoint: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}


_OPEN_CLIP_TOP_KEYS = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
_OPEN_CLIP_UNUSED = {"text_projection", "logit_scale", "attn_mask"}  # not part of the penultimate-layer features


def text_encoder_from_checkpoint(checkpoint: dict, *, strict=True):
    """CLIPTextModel from the OpenCLIP text tower under ``cond_stage_model.model.``, or None.

    VideoCrafter2 takes the *penultimate* layer's output (then ln_final), so the last residual
    block is dropped: ViT-H's 24 blocks give 23 CLIP layers, as Stable Diffusion 2 ships it.
    Heads are width // 64 (OpenCLIP's text towers all use 64-wide heads).
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    tower = _component(checkpoint, TEXT_PREFIX)
    if not tower:
        return None
    block_of = {k: int(m[1]) for k in tower if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    needed = ["token_embedding.weight", "transformer.resblocks.0.mlp.c_fc.weight"]  # what the config is read from
    if not block_of or any(k not in tower for k in needed):
        raise CheckpointMismatchError("text encoder", missing=[TEXT_PREFIX + k for k in needed if k not in tower]
                                      or [TEXT_PREFIX + "transformer.resblocks.*"])
    last = max(block_of.values())
    unexpected = sorted(k for k in tower if k not in block_of and k not in _OPEN_CLIP_TOP_KEYS | _OPEN_CLIP_UNUSED)
    if unexpected:
        _reject_or_warn("text encoder", [TEXT_PREFIX + k for k in unexpected], strict)
    kept = {TEXT_PREFIX + k: v for k, v in tower.items()
            if block_of.get(k, -1) != last and k not in _OPEN_CLIP_UNUSED and k not in unexpected}

    vocab, width = tower["token_embedding.weight"].shape
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=tower["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=last,
        num_attention_heads=width // 64,
        max_position_embeddings=tower["positional_embedding"].shape[0] if "positional_embedding" in tower else 77,
        hidden_act="gelu",
        projection_dim=width,
        bos_token_id=vocab - 2,  # CLIP's BPE vocabulary ends with <start_of_text>, <end_of_text>
        eos_token_id=vocab - 1,
    )
    model = CLIPTextModel(config)
    converted = convert_open_clip_checkpoint(model, kept, prefix=TEXT_PREFIX)
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 dropped that level
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return load_state_dict_checked(model, converted, "text encoder (keys as transformers names them)", strict).eval()


# Every key an LDM KL autoencoder has (diffusers' converter silently skips anything else).
_LDM_VAE_KEY = re.compile(
    r"(?:(?:encoder|decoder)\.(?:conv_in|conv_out|norm_out"
    r"|(?:down|up)\.\d+\.(?:block\.\d+\.(?:norm1|conv1|norm2|conv2|nin_shortcut)|downsample\.conv|upsample\.conv)"
    r"|mid\.(?:block_[12]\.(?:norm1|conv1|norm2|conv2|nin_shortcut)|attn_1\.(?:norm|q|k|v|proj_out)))"
    r"|(?:post_)?quant_conv)\.(?:weight|bias)"
)


def vae_from_checkpoint(checkpoint: dict, *, strict=True):
    """diffusers AutoencoderKL from the LDM autoencoder under ``first_stage_model.``, or None.
    The architecture (channels, levels, blocks per level, latent channels) is read off the shapes."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ldm = _component(checkpoint, VAE_PREFIX)
    if not ldm:
        return None
    unexpected = sorted(VAE_PREFIX + k for k in ldm if not _LDM_VAE_KEY.fullmatch(k))
    if unexpected:
        _reject_or_warn("VAE", unexpected, strict)
    needed = ["encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"]
    if any(k not in ldm for k in needed):
        raise CheckpointMismatchError("VAE", missing=[VAE_PREFIX + k for k in needed if k not in ldm])
    levels = sum(1 for k in ldm if re.fullmatch(r"encoder\.down\.\d+\.block\.0\.conv1\.weight", k))
    vae = AutoencoderKL(
        in_channels=ldm["encoder.conv_in.weight"].shape[1],
        out_channels=ldm["decoder.conv_out.weight"].shape[0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[ldm[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)],
        layers_per_block=sum(1 for k in ldm if re.fullmatch(r"encoder\.down\.0\.block\.\d+\.conv1\.weight", k)),
        latent_channels=ldm["decoder.conv_in.weight"].shape[1],
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )
    known = {k: v for k, v in ldm.items() if _LDM_VAE_KEY.fullmatch(k)}
    return load_state_dict_checked(vae, convert_ldm_vae_checkpoint(known, vae.config), "VAE (keys as diffusers names them)",
                                   strict).eval()


def convert(src, dst, config=None, *, dtype=None, overwrite=False, strict=True, extract_ema=False) -> list:
    """Write the diffusers folder ``dst`` (unet/, and text_encoder/ and vae/ where the checkpoint has
    them) from the original checkpoint ``src``. ``config``: as for :func:`resolve_config`, None
    detects a named config. ``dtype``: "fp32"/"fp16"/"bf16" or a floating-point torch dtype to cast to.
    ``extract_ema``: the U-Net's EMA weights in place of its raw ones (:func:`unet_state_dict`).

    Everything is written to a temporary folder next to ``dst`` and moved into place at the end
    (:func:`hummingbird.files.write_folder`), so an interrupted conversion never leaves a half-written
    model. Returns the components written.
    """
    # compared with links resolved (a linked folder is the same folder): --overwrite would delete the
    # checkpoint being read
    real_dst, source = Path(dst).resolve(), Path(src).resolve()
    if real_dst == source or real_dst in source.parents:
        raise ValueError(f"dst {dst} is or contains the checkpoint {source}; choose another destination")
    check_destination(dst, overwrite)  # before the slow part; write_folder checks again at the end
    dtype = resolve_dtype(dtype)
    config = None if config is None else resolve_config(config)  # a bad name fails before reading the checkpoint
    checkpoint = load_checkpoint(src)
    components = {
        "unet": unet_from_checkpoint(checkpoint, config, strict=strict, extract_ema=extract_ema),
        "text_encoder": text_encoder_from_checkpoint(checkpoint, strict=strict),
        "vae": vae_from_checkpoint(checkpoint, strict=strict),
    }
    components = {name: model for name, model in components.items() if model is not None}
    def fill(tmp):
        for name, model in components.items():
            if dtype is not None:
                torch.nn.Module.to(model, dtype)  # diffusers' .to() warns about keep-in-fp32 modules we don't have
            model.save_pretrained(tmp / name, safe_serialization=True)

    write_folder(dst, fill, overwrite)
    return list(components)
