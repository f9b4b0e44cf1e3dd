"""End to end on tiny random pipelines (32x32 videos): samplers, determinism, outputs, saving, export."""
import functools
import os
import shutil
import sys
import warnings
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from hummingbird import files
from hummingbird.export import export_to_gif, export_to_mp4, export_video, to_uint8_frames
from hummingbird.models import guidance_scale_embedding
from hummingbird.pipeline import CFG_DEFAULTS, DISTILLED_DEFAULTS, HummingbirdPipeline, load_pipeline
from hummingbird.schedulers import lcm_timesteps
from hummingbird.testing import tiny_random_pipeline

SIZE = dict(height=32, width=32)


pytestmark = pytest.mark.usefixtures("single_thread")


def _pipe(scheduler):
    pipe = tiny_random_pipeline(scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lcm():
    return _pipe("lcm")


@pytest.fixture(scope="module")
def ddim():
    return _pipe("ddim")


def _record_unet_calls(pipe, monkeypatch, record):
    """A list of ``record(*args, **kwargs)`` of each U-Net call, the calls themselves unchanged."""
    seen, forward = [], pipe.unet.forward

    def recording(*args, **kwargs):
        seen.append(record(*args, **kwargs))
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", recording)
    return seen


def _record_unet_batches(pipe, monkeypatch):
    return _record_unet_calls(pipe, monkeypatch, lambda sample, *args, **kwargs: sample.shape[0])


def test_lcm_26_frames_one_unet_call_per_step(lcm, monkeypatch):
    batches = _record_unet_batches(lcm, monkeypatch)
    out = lcm("a cat", num_frames=26, num_inference_steps=4, seed=0, output_type="np", **SIZE)
    assert batches == [1] * 4  # guidance distilled in: no unconditional batch
    assert lcm.scheduler.timesteps.tolist() == [999, 759, 519, 279]
    assert out.frames.shape == (1, 26, 32, 32, 3) and out.frames.dtype == np.float32
    assert out.frames.std() > 0
    assert set(out.timings) == {"text_encode", "denoise", "decode"} and out.peak_memory_mb > 0


def test_ddim_cfg_batches_cond_and_uncond(ddim, monkeypatch):
    batches = _record_unet_batches(ddim, monkeypatch)
    out = ddim(["a cat", "a dog"], num_frames=16, num_inference_steps=3, seed=0, output_type="pil", **SIZE)
    assert batches == [4] * 3  # one call per step, [uncond, cond] x 2 prompts
    assert len(out.frames) == 2 and len(out.frames[0]) == 16
    assert isinstance(out.frames[0][0], Image.Image) and out.frames[0][0].size == (32, 32)


def test_defaults_follow_the_sampling_mode(lcm, ddim, monkeypatch):
    """The one test that leaves steps/frames/guidance/fps unset. Hummingbird as shipped: 8 LCM steps,
    26 frames, w 7.5, fps 8; VideoCrafter2's reference: 50 DDIM steps with CFG 12, fps 28, 16 frames.
    The U-Net is stubbed out: what is checked is what the pipeline feeds it."""
    assert DISTILLED_DEFAULTS == dict(num_inference_steps=8, num_frames=26, guidance_scale=7.5, fps=8)
    assert CFG_DEFAULTS == dict(num_inference_steps=50, num_frames=16, guidance_scale=12.0, fps=28)
    w_embedding = guidance_scale_embedding(torch.tensor([7.5]), lcm.unet.config.time_cond_proj_dim)
    for pipe, expected_calls in ((lcm, [(1, 26, 8)] * 8), (ddim, [(2, 16, 28)] * 50)):
        calls = []

        def unet(sample, t, context, fps=None, timestep_cond=None):
            calls.append((sample.shape[0], sample.shape[2], fps))  # (batch, frames, fps)
            if pipe is lcm:
                torch.testing.assert_close(timestep_cond, w_embedding)
            return SimpleNamespace(sample=torch.zeros_like(sample))

        monkeypatch.setattr(pipe.unet, "forward", unet)
        frames = pipe("a cat", seed=0, **SIZE).frames
        assert calls == expected_calls and frames.shape[1] == expected_calls[0][1]
    assert lcm.scheduler.timesteps.tolist() == lcm_timesteps(8) == [999, 879, 759, 639, 519, 399, 279, 159]


def test_cfg_guidance_and_negative_prompt_matter(ddim):
    def run(**kw):
        return ddim("a cat", num_frames=2, num_inference_steps=2, seed=0, output_type="pt", **SIZE, **kw).frames

    base = run(guidance_scale=12.0)
    assert not torch.equal(base, run(guidance_scale=3.0))
    assert not torch.equal(base, run(guidance_scale=12.0, negative_prompt="blurry"))
    assert torch.equal(run(guidance_scale=12.0, negative_prompt="blurry"),
                       run(guidance_scale=12.0, negative_prompt=("blurry",)))  # any sequence of strings
    with pytest.warns(UserWarning, match="negative_prompt is ignored: guidance_scale 1.0 <= 1") as record:
        run(guidance_scale=1.0, negative_prompt="blurry")
    assert record[0].filename == __file__  # the caller's line, not torch.no_grad's wrapper


def test_seed_determinism_and_output_types(lcm):
    def run(seed, output_type="pt"):
        return lcm("a cat", num_frames=16, num_inference_steps=2, seed=seed, output_type=output_type, **SIZE).frames

    a = run(0)
    assert a.shape == (1, 16, 3, 32, 32) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, run(0))
    assert not torch.equal(a, run(1))
    np.testing.assert_array_equal(run(0, "np"), a.permute(0, 1, 3, 4, 2).numpy())  # float [0, 1], as diffusers
    # An explicit generator with the same seed gives the same video.
    gen = torch.Generator().manual_seed(0)
    b = lcm("a cat", num_frames=16, num_inference_steps=2, generator=gen, output_type="pt", **SIZE).frames
    assert torch.equal(a, b)
    assert torch.equal(a, run(np.int64(0)))  # numpy seeds (a sweep's np.arange) are seeds too
    # the default is diffusers' T2V output: (B, F, H, W, 3) float32 numpy frames
    np.testing.assert_array_equal(lcm("a cat", num_frames=16, num_inference_steps=2, seed=0, **SIZE).frames,
                                  a.permute(0, 1, 3, 4, 2).numpy())


def test_channels_last_pipeline_gives_the_same_video():
    pipe = _pipe("lcm")  # not the shared fixture: this converts its weights
    kwargs = dict(num_frames=3, num_inference_steps=2, seed=0, output_type="pt", **SIZE)
    plain = pipe("a cat", **kwargs).frames
    pipe.enable_channels_last()
    assert pipe.unet.channels_last
    torch.testing.assert_close(pipe("a cat", **kwargs).frames, plain, atol=1e-5, rtol=0)
    pipe.disable_channels_last()
    assert not pipe.unet.channels_last


def test_fused_pipeline_refreshes_fused_weights_before_the_unet_runs(monkeypatch):
    """A compiled U-Net cannot check its fused projections against weights changed in place: the
    pipeline refreshes them once per call, before the first U-Net step (an eager U-Net checks itself)."""
    pipe = _pipe("lcm")
    events = []
    pipe.unet.register_forward_pre_hook(lambda *_: events.append("unet"))
    monkeypatch.setattr(pipe.unet, "refresh_fused_projections", lambda: events.append("refresh"))
    kwargs = dict(num_frames=3, num_inference_steps=2, seed=0, output_type="pt", **SIZE)
    pipe("a cat", **kwargs)
    assert events == ["unet", "unet"]  # unfused: nothing to refresh
    events.clear()
    pipe.fuse_qkv_projections()
    pipe("a cat", **kwargs)
    assert events == ["refresh", "unet", "unet"]


def _public(config):
    """A config without diffusers' bookkeeping keys, tuples as JSON gives them back (lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}


def test_save_load_round_trip(lcm, tmp_path):
    lcm.save_pretrained(tmp_path)
    loaded = HummingbirdPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(lcm, name).state_dict(), getattr(loaded, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    for name in ("unet", "scheduler"):
        assert _public(getattr(loaded, name).config) == _public(getattr(lcm, name).config), name
    kw = dict(num_frames=4, num_inference_steps=2, seed=0, output_type="pt", **SIZE)
    # Same weights; CPU BLAS picks kernels by memory alignment (mmap-loaded tensors are not 64-byte
    # aligned), so equality is to float32 rounding rather than bitwise.
    torch.testing.assert_close(loaded("a cat", **kw).frames, lcm("a cat", **kw).frames, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(height=36), ValueError, "multiples of 16"),
    (dict(width=0), ValueError, "multiples of 16"),
    (dict(height=32.0), TypeError, "height must be an int"),
    (dict(width=True), TypeError, "width must be an int"),
    (dict(num_frames=0), ValueError, "num_frames"),
    (dict(num_frames=2.5), TypeError, "num_frames must be an int"),
    (dict(num_frames="2"), TypeError, "num_frames must be an int"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(num_inference_steps=2.0), TypeError, "num_inference_steps must be an int"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be finite"),
    (dict(guidance_scale="7.5"), TypeError, "guidance_scale must be a real number"),
    (dict(fps=-3), ValueError, "fps must be >= 1"),
    (dict(fps=8.0), TypeError, "fps must be an int"),
    (dict(output_type="gif"), ValueError, "output_type"),
    (dict(decode_chunk_size=0), ValueError, "decode_chunk_size"),
    (dict(decode_chunk_size=2.5), TypeError, "decode_chunk_size must be an int"),
    (dict(prompt=None), TypeError, r"prompt must be a string or a sequence of strings \(or pass prompt_embeds\), got "
                                   "NoneType"),
    (dict(prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "either prompt or prompt_embeds"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 8)), ValueError, r"prompt_embeds must have shape \(prompts >= 1, "
                                                                       r"tokens, 32\), got \(1, 77, 8\)"),
    (dict(prompt=None, prompt_embeds=torch.zeros(77, 32)), ValueError, "prompt_embeds must have shape"),
    (dict(prompt=None, prompt_embeds=[[0.0]]), TypeError, "prompt_embeds must be a floating-point tensor"),
    (dict(negative_prompt="a", negative_prompt_embeds=torch.zeros(1, 77, 32)), ValueError,
     "either negative_prompt or negative_prompt_embeds"),
    (dict(negative_prompt_embeds=torch.zeros(2, 77, 32)), ValueError, "negative_prompt_embeds holds 2 prompts, for 1"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError, "callback_on_step_end_tensor_inputs must be"),
    (dict(callback_on_step_end_tensor_inputs="latents"), ValueError, "callback_on_step_end_tensor_inputs must be"),
    (dict(prompt=[]), ValueError, "prompt must be a string or a non-empty sequence"),
    (dict(prompt=["a cat", 3]), TypeError, "prompt must be a string or a sequence of strings"),
    (dict(negative_prompt=3), TypeError, "negative_prompt must be None, a string or a sequence of strings"),
    (dict(negative_prompt=["a", "b"]), ValueError, "2 negative prompts for 1 prompts"),
    (dict(negative_prompt=[None]), TypeError, "negative_prompt must be None, a string or a sequence of strings"),
    (dict(seed=0, generator=torch.Generator().manual_seed(0)), ValueError, "either seed or generator"),
    (dict(latents=torch.zeros(1, 4, 2, 2, 2)), ValueError, "latents must have shape"),
    (dict(num_videos_per_prompt=0), ValueError, "num_videos_per_prompt"),
    (dict(num_videos_per_prompt=1.5), TypeError, "num_videos_per_prompt"),
    (dict(seed=-1), ValueError, "seed must be in"),
    (dict(seed=2**64), ValueError, "seed must be in"),
    (dict(seed=0.5), TypeError, "seed must be an int"),
])
def test_bad_arguments(lcm, kwargs, error, match):
    with pytest.raises(error, match=match):
        lcm(**{"prompt": "a cat", "num_frames": 2, "num_inference_steps": 1, **SIZE, **kwargs})


def test_empty_string_prompt_is_a_prompt(lcm):
    frames = lcm("", num_frames=2, num_inference_steps=1, output_type="latent", **SIZE).frames
    assert frames.shape[0] == 1


def test_long_prompt_truncated_with_warning(lcm):
    prompt = "a cat " * 20 + "THE END"  # 86 tokens: each letter is one in the tiny tokenizer
    with pytest.warns(UserWarning, match="dropped: .*the end"):
        embeddings = lcm.encode_prompt([prompt], "cpu")
    assert embeddings.shape == (1, 77, 32)


def test_export_mp4_and_gif(lcm, tmp_path):
    frames = lcm("a cat", num_frames=16, num_inference_steps=1, seed=0, output_type="np", **SIZE).frames[0]
    frames = to_uint8_frames(frames)
    mp4 = export_to_mp4(frames, tmp_path / "v.mp4", fps=8)
    video = iio.imread(mp4)
    assert video.shape == (16, 32, 32, 3)
    assert iio.immeta(mp4)["fps"] == 8
    assert np.abs(video.astype(float) - frames).mean() < 40  # lossy, but the same pictures
    gif = export_to_gif(torch.from_numpy(frames).permute(0, 3, 1, 2) / 255, tmp_path / "v.gif", fps=8)
    assert iio.imread(gif).shape == (16, 32, 32, 3)
    with Image.open(gif) as im:  # 16 frames at 8 fps play for 2 s (a constant 120 ms would be 1.92 s)
        durations = [im.seek(i) or im.info["duration"] for i in range(im.n_frames)]
    assert sum(durations) == 2000 and set(durations) == {120, 130}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gif", "v.mp4"]  # no temporary files left


@pytest.mark.parametrize("fps", [0, -8, 60])
def test_export_gif_rejects_fps_it_cannot_play(fps, tmp_path):
    with pytest.raises(ValueError, match="fps"):
        export_to_gif(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "v.gif", fps=fps)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fps", [0, -8])
def test_export_mp4_rejects_fps_that_are_not_positive(fps, tmp_path):
    with pytest.raises(ValueError, match="fps must be positive"):
        export_to_mp4(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "v.mp4", fps=fps)
    assert not list(tmp_path.iterdir())


def test_export_refuses_before_encoding(tmp_path, monkeypatch):
    """An existing file without overwrite, or a folder, is refused before any frame is encoded."""
    def encode(*args, **kwargs):
        raise AssertionError("encoded first")

    monkeypatch.setattr(Image.Image, "save", encode)
    (tmp_path / "old.gif").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="old.gif exists; not replaced"):
        export_to_gif(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "old.gif", overwrite=False)
    (tmp_path / "folder.gif").mkdir()
    with pytest.raises(IsADirectoryError, match="folder.gif is a folder"):
        export_to_gif(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "folder.gif")
    assert (tmp_path / "old.gif").read_bytes() == b"old"


def test_export_is_durable_before_it_is_renamed(tmp_path, monkeypatch):
    from hummingbird import export

    events, replace, fsync = [], os.replace, os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(export.os, "replace", lambda src, dst: events.append(("rename", src)) or replace(src, dst))
    export_to_gif(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "v.gif")
    (_, tmp), rename, folder = events
    assert rename == ("rename", tmp) and folder == ("fsync", str(tmp_path))


def test_export_to_the_longest_name(tmp_path):
    """A file name of 255 bytes is legal; the temporary file beside it must fit too."""
    name = "é" * 120 + "a" * 11 + ".gif"
    assert len(name.encode()) == 255
    export_to_gif(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_export_to_unwritable_path(tmp_path):
    with pytest.raises(OSError, match="cannot write"):
        export_to_mp4(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "missing" / "v.mp4")


def test_export_writers_of_one_path_do_not_share_a_temporary_file(tmp_path, monkeypatch):
    """Two threads writing one path: each finishes its own file (the last rename wins) and no temporary
    file is left; a writer's own error is what surfaces, even if its temporary file is already gone."""
    import threading

    from hummingbird import export

    started = threading.Barrier(2)
    save = Image.Image.save

    def slow_save(img, fp, *args, **kwargs):  # both writers hold their temporary file at once
        started.wait(timeout=10)
        return save(img, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", slow_save)
    frames = [np.full((2, 16, 16, 3), v, np.uint8) for v in (40, 200)]
    errors = []
    threads = [threading.Thread(target=lambda f=f: errors.extend(_raised(export_to_gif, f, tmp_path / "v.gif", fps=8)))
               for f in frames]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and [p.name for p in tmp_path.iterdir()] == ["v.gif"]
    assert iio.imread(tmp_path / "v.gif", index=0)[0, 0, 0] in (40, 200)

    def vanishing_write(tmp):
        os.unlink(tmp)
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        export._atomic(str(tmp_path / "w.gif"), vanishing_write)


@pytest.mark.parametrize("hard_links", [True, False])
def test_export_without_overwrite_keeps_a_file_that_appeared(tmp_path, monkeypatch, hard_links):
    """overwrite=False: a file created while the video was written is kept, not replaced; the same on a
    file system without hard links (FAT), where a check stands in for the link."""
    from hummingbird import export

    def no_link(src, dst):
        raise PermissionError(1, "Operation not permitted")

    if not hard_links:
        monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "v.gif"
    frames = np.stack([np.full((16, 16, 3), v, np.uint8) for v in (40, 200)])
    export_video(frames, str(tmp_path / "new.gif"), overwrite=False)

    def write_while_another_appears(tmp):
        path.write_bytes(b"theirs")
        Image.new("RGB", (16, 16)).save(tmp, format="GIF")

    with pytest.raises(FileExistsError, match="appeared during the export; not replaced"):
        export._atomic(str(path), write_while_another_appears, overwrite=False)
    assert path.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["new.gif", "v.gif"]
    assert iio.imread(tmp_path / "new.gif").shape == (2, 16, 16, 3)


def _raised(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as err:  # collected for the test's assertion
        return [err]
    return []


def test_load_converted_folder(ddim, tmp_path):
    """A `hummingbird convert` folder (no model_index.json / scheduler) plus a tokenizer: assembled,
    with the scheduler the U-Net implies (DDIM: no time_cond_proj)."""
    ddim.save_pretrained(tmp_path)
    (tmp_path / "model_index.json").unlink()
    shutil.rmtree(tmp_path / "scheduler")
    pipe = load_pipeline(str(tmp_path), dtype=torch.float16)
    assert isinstance(pipe.scheduler, DDIMScheduler) and not pipe.guidance_distilled
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16
    shutil.rmtree(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="lacks tokenizer/"):
        load_pipeline(str(tmp_path))


def test_load_without_dtype_keeps_the_stored_one_for_every_component(tmp_path):
    """Left alone, diffusers would load the U-Net and VAE in fp32 and transformers the text encoder in fp16."""
    tiny_random_pipeline("lcm").to(dtype=torch.float16).save_pretrained(tmp_path)
    saved = load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").unlink()  # now as `hummingbird convert` writes it (plus tokenizer/)
    shutil.rmtree(tmp_path / "scheduler")
    converted = load_pipeline(str(tmp_path))
    for pipe in (saved, converted):
        assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16


@pytest.mark.parametrize("variant, shard", [("fp16", None), (None, "20KB"), ("fp16", "20KB")])
def test_load_variant_and_sharded_weights_in_their_stored_dtype(tmp_path, variant, shard):
    """A pipeline saved with variant="fp16" and/or in shards loads, in the shards' dtype, saved or as
    `hummingbird convert` lays it out."""
    pipe = tiny_random_pipeline("lcm").to(dtype=torch.float16)
    pipe.save_pretrained(tmp_path, variant=variant, **({"max_shard_size": shard} if shard else {}))
    assert not shard or any(p.name.endswith(".index.json") or ".index." in p.name for p in (tmp_path / "unet").iterdir())
    saved = load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").unlink()
    shutil.rmtree(tmp_path / "scheduler")
    converted = load_pipeline(str(tmp_path))
    for loaded in (saved, converted):
        assert loaded.unet.dtype == loaded.vae.dtype == loaded.text_encoder.dtype == torch.float16
        for a, b in zip(loaded.unet.state_dict().values(), pipe.unet.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_load_refuses_to_guess_between_variants(tmp_path):
    pipe = tiny_random_pipeline("lcm")
    pipe.save_pretrained(tmp_path, variant="fp16")
    pipe.save_pretrained(tmp_path, variant="ema")
    with pytest.raises(ValueError, match=r"several variants \(ema, fp16\) and no plain ones"):
        load_pipeline(str(tmp_path))


def test_size_defaults_to_the_training_resolution(lcm):
    frames = lcm("a cat", num_frames=1, num_inference_steps=1, height=None, width=None).frames
    assert frames.shape == (1, 1, 320, 512, 3)


def test_videos_per_prompt_are_a_batch_of_repeated_prompts(ddim, monkeypatch):
    batches = _record_unet_batches(ddim, monkeypatch)
    kw = dict(num_frames=2, num_inference_steps=2, seed=0, negative_prompt=["blurry", "dark"], output_type="pt", **SIZE)
    videos = ddim(["a cat", "a dog"], num_videos_per_prompt=2, **kw).frames
    assert batches == [8] * 2  # [uncond, cond] x 2 prompts x 2 videos in one call per step
    assert videos.shape[0] == 4 and not torch.equal(videos[0], videos[1])  # each its own noise
    repeated = ddim(["a cat", "a cat", "a dog", "a dog"], **{**kw, "negative_prompt": ["blurry"] * 2 + ["dark"] * 2})
    torch.testing.assert_close(videos, repeated.frames, rtol=0, atol=1e-6)


def test_latent_output_and_step_callback(lcm):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, int(t), tuple(tensors["latents"].shape)))
        if i == 1:
            return {"latents": torch.zeros_like(tensors["latents"])}

    kw = dict(num_frames=2, num_inference_steps=2, seed=0, **SIZE)
    out = lcm("a cat", output_type="latent", callback_on_step_end=callback, **kw)
    assert seen == [(0, 999, (1, 4, 2, 4, 4)), (1, 499, (1, 4, 2, 4, 4))]
    assert set(out.timings) == {"text_encode", "denoise"}  # nothing decoded
    assert torch.equal(out.frames, torch.zeros(1, 4, 2, 4, 4))  # the callback's latents are the result
    latents = lcm("a cat", output_type="latent", **kw).frames
    torch.testing.assert_close(lcm.decode_latents(latents, 8), lcm("a cat", output_type="pt", **kw).frames, rtol=0, atol=0)
    with pytest.raises(TypeError, match="callback_on_step_end must be callable"):
        lcm("a cat", callback_on_step_end="print", **kw)


def test_prompt_embeds_instead_of_prompts(ddim):
    """prompt_embeds / negative_prompt_embeds (as diffusers' video pipelines take them) give the video
    their prompts give; missing negative embeddings are those of ""."""
    kw = dict(guidance_scale=12.0, num_frames=2, num_inference_steps=2, seed=0, output_type="latent", **SIZE)
    want = ddim(["a cat", "a dog"], negative_prompt=["blurry", "dark"], **kw).frames
    cond, uncond = ddim.encode_prompt(["a cat", "a dog"], "cpu"), ddim.encode_prompt(["blurry", "dark"], "cpu")
    torch.testing.assert_close(ddim(prompt_embeds=cond, negative_prompt_embeds=uncond, **kw).frames, want, rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(ddim(prompt_embeds=cond, negative_prompt=["blurry", "dark"], **kw).frames, want,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ddim(prompt_embeds=cond, **kw).frames, ddim(["a cat", "a dog"], **kw).frames, rtol=1e-5,
                               atol=1e-5)
    assert not torch.allclose(ddim(prompt_embeds=uncond, negative_prompt_embeds=cond, **kw).frames, want)
    long = torch.cat([cond, cond], dim=1)  # 154 tokens against the 77 of "" encoded for CFG
    with pytest.raises(ValueError, match="negative_prompt and prompt_embeds must have as many tokens"):
        ddim(prompt_embeds=long, **kw)
    with pytest.raises(ValueError, match="negative_prompt_embeds and prompt_embeds must have as many tokens"):
        ddim(prompt_embeds=long, negative_prompt_embeds=uncond, **kw)


def test_step_callback_reads_and_replaces_the_text_context(ddim):
    """callback_on_step_end_tensor_inputs picks what the callback sees; a returned "prompt_embeds" (the
    U-Net's [uncond, cond] context under CFG) is used from the next step on."""
    kw = dict(guidance_scale=12.0, num_frames=2, num_inference_steps=2, seed=0, output_type="latent", **SIZE)
    seen = []

    def swap(pipe, i, t, tensors):
        seen.append(sorted(tensors))
        uncond, cond = tensors["prompt_embeds"].chunk(2)
        return {"prompt_embeds": torch.cat([cond, uncond])} if i == 0 else None

    swapped = ddim("a cat", negative_prompt="blurry", callback_on_step_end=swap,
                   callback_on_step_end_tensor_inputs=["prompt_embeds", "latents"], **kw).frames
    assert seen == [["latents", "prompt_embeds"]] * 2
    assert not torch.allclose(swapped, ddim("a cat", negative_prompt="blurry", **kw).frames)
    ddim("a cat", callback_on_step_end=lambda pipe, i, t, tensors: seen.append(sorted(tensors)), **kw)
    assert seen[2:] == [["latents"]] * 2  # the default


def test_generator_lists_hold_one_generator_per_video(ddim):
    kw = dict(num_frames=1, num_inference_steps=1, output_type="latent", **SIZE)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    pair = ddim("a cat", num_videos_per_prompt=2, generator=gens, **kw).frames
    for video, seed in zip(pair, (1, 2)):
        one = ddim("a cat", generator=torch.Generator().manual_seed(seed), **kw).frames[0]
        torch.testing.assert_close(video, one, rtol=1e-4, atol=1e-5)
    for count, prompts in ((1, "a cat"), (3, "a cat"), (2, ["a cat", "a dog", "a cow"])):
        gens = [torch.Generator().manual_seed(s) for s in range(count)]
        with pytest.raises(ValueError, match=f"generator is a list of {count} generators for"):
            ddim(prompts, num_videos_per_prompt=2 if isinstance(prompts, str) else 1, generator=gens, **kw)


def test_diffusers_callbacks_turn_guidance_off_and_interrupt(ddim, monkeypatch):
    """diffusers' callback protocol: PipelineCallback objects bring their tensor_inputs;
    SDCFGCutoffCallback reads num_timesteps, sets _guidance_scale to 0 and keeps the context's
    conditional half, so the later steps run one batch; _interrupt = True stops after that step."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback

    kw = dict(guidance_scale=12.0, num_frames=1, num_inference_steps=3, seed=0, output_type="latent", **SIZE)
    batches = _record_unet_batches(ddim, monkeypatch)
    cut = ddim("a cat", callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.34), **kw).frames
    assert batches == [2, 2, 1] and ddim.num_timesteps == 3 and not ddim.do_classifier_free_guidance
    full = ddim("a cat", **kw).frames
    assert not torch.allclose(cut, full)

    def guidance_off(pipe, i, t, tensors):  # the context left as it is: its conditional half is used
        if i == 1:
            pipe._guidance_scale = 0.0
        return tensors

    batches.clear()
    torch.testing.assert_close(ddim("a cat", callback_on_step_end=guidance_off, **kw).frames, cut, rtol=0, atol=0)
    assert batches == [2, 2, 1]

    class Stop(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipe, i, t, tensors):
            pipe._interrupt = i == 0
            return tensors

    batches.clear()
    ddim("a cat", callback_on_step_end=MultiPipelineCallbacks([Stop()]), **kw)
    assert batches == [2] and ddim.interrupt
    ddim("a cat", **kw)
    assert not ddim.interrupt  # each call starts over


def test_step_callback_may_change_a_distilled_guidance_scale(lcm, monkeypatch):
    """In a guidance-distilled U-Net the scale is an input (timestep_cond): a callback's new scale is
    what the next steps are conditioned on."""
    conds = _record_unet_calls(lcm, monkeypatch, lambda *args, timestep_cond=None, **kwargs: timestep_cond)

    def lower(pipe, i, t, tensors):
        pipe._guidance_scale = 3.0
        return tensors

    lcm("a cat", num_frames=1, num_inference_steps=2, seed=0, guidance_scale=7.5, output_type="latent",
        callback_on_step_end=lower, **SIZE)
    want = [guidance_scale_embedding(torch.tensor([w]), lcm.unet.config.time_cond_proj_dim) for w in (7.5, 3.0)]
    for got, expected in zip(conds, want, strict=True):
        torch.testing.assert_close(got, expected)


def test_ddim_swapped_in_from_an_lcm_config_samples_the_training_schedule(lcm, monkeypatch):
    """DDIMScheduler.from_config(lcm.scheduler.config), diffusers' way to swap samplers, keeps the LCM's
    original_inference_steps in its config: DDIM was capped at those 50 steps."""
    from diffusers import DDIMScheduler, TCDScheduler

    from hummingbird.schedulers import max_inference_steps

    ddim = DDIMScheduler.from_config(lcm.scheduler.config)
    assert "original_inference_steps" in ddim.config
    assert max_inference_steps(ddim.config, DDIMScheduler) == 1000  # "trailing" spacing: no steps_offset
    assert max_inference_steps({**ddim.config, "_class_name": "DDIMScheduler"}) == 1000  # a saved config
    assert max_inference_steps(TCDScheduler.from_config(lcm.scheduler.config).config, TCDScheduler) == 50
    monkeypatch.setattr(lcm, "scheduler", ddim)  # restored after: later tests share the fixture
    out = lcm("a cat", num_frames=1, num_inference_steps=60, seed=0, output_type="latent", **SIZE)
    assert out.frames.shape == (1, 4, 1, 4, 4)


def test_eta_defaults_to_videocrafter2s_for_ddim_only(ddim, monkeypatch):
    """VideoCrafter2 samples DDIM with eta 1; a swapped-in TCD scheduler's step also takes eta (its
    gamma), which must keep its own default (0.3) unless given."""
    from diffusers import TCDScheduler

    etas = []

    def recording(scheduler):
        step = scheduler.step
        def step_recording(*args, eta=None, **kwargs):
            etas.append(eta)
            return step(*args, **kwargs, **({} if eta is None else {"eta": eta}))

        monkeypatch.setattr(scheduler, "step", step_recording)
        return scheduler

    kw = dict(num_frames=1, num_inference_steps=1, seed=0, output_type="latent", **SIZE)
    recording(ddim.scheduler)
    ddim("a cat", **kw)
    ddim("a cat", eta=0.0, **kw)
    monkeypatch.setattr(ddim, "scheduler", recording(TCDScheduler.from_config(ddim.scheduler.config)))
    ddim("a cat", **kw)
    ddim("a cat", eta=0.5, **kw)
    assert etas == [1.0, 0.0, None, 0.5]


def test_ddim_steps_stay_on_the_training_schedule(ddim):
    """1000 DDIM steps would start at timestep 1000 ("leading" spacing, steps_offset 1): refused by name
    before any sampling, where it would fail with an index error."""
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 999\]"):
        ddim("a cat", num_frames=1, num_inference_steps=1000, **SIZE)


def test_ddim_default_eta_is_one(ddim, monkeypatch):
    """VideoCrafter2 samples DDIM with eta 1."""
    seen, step = [], ddim.scheduler.step

    @functools.wraps(step)  # the pipeline passes eta only to a step() whose signature takes it
    def recording(*args, **kwargs):
        seen.append(kwargs.get("eta"))
        return step(*args, **kwargs)

    monkeypatch.setattr(ddim.scheduler, "step", recording)
    ddim("a cat", num_frames=2, num_inference_steps=2, seed=0, **SIZE, output_type="latent")
    assert seen == [1.0, 1.0]


def test_cfg_combines_uncond_and_cond(ddim, monkeypatch):
    """noise = uncond + g (cond - uncond), each from its own prompt. The stub U-Net returns, per row,
    the mean over tokens of hidden channel 0 of that row's text embedding (not the mean over all channels:
    the text encoder ends in a LayerNorm, which makes that ~0 for every prompt), so rows are identified
    by their prompt."""
    def unet(sample, t, context, fps=None, timestep_cond=None):
        from types import SimpleNamespace
        return SimpleNamespace(sample=context[..., 0].mean(1).view(-1, 1, 1, 1, 1).expand_as(sample).clone())

    noises, step = [], ddim.scheduler.step

    @functools.wraps(step)
    def recording(noise, *args, **kwargs):
        noises.append(noise.clone())
        return step(noise, *args, **kwargs)

    monkeypatch.setattr(ddim.unet, "forward", unet)
    monkeypatch.setattr(ddim.scheduler, "step", recording)
    with torch.no_grad():
        u = ddim.encode_prompt(["blurry"], "cpu")[..., 0].mean().item()
        c = ddim.encode_prompt(["a cat"], "cpu")[..., 0].mean().item()
    assert abs(c - u) > 1e-3
    ddim("a cat", negative_prompt="blurry", guidance_scale=12.0, num_frames=2, num_inference_steps=1, seed=0,
         **SIZE, output_type="latent")
    torch.testing.assert_close(noises[0], torch.full_like(noises[0], u + 12.0 * (c - u)))


def test_decode_latents_matches_frame_by_frame_vae(ddim):
    """Latents divided by the VAE's scale factor, each (video, frame) decoded as one image."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 3, 4, 4, generator=g)
    with torch.no_grad():
        got = ddim.decode_latents(latents, 8)
        for bi in range(2):
            for fi in range(3):
                img = ddim.vae.decode(latents[bi:bi + 1, :, fi] / 0.18215).sample[0]
                torch.testing.assert_close(got[bi, fi], (img / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_export_keeps_fps_and_frame_orientation(tmp_path):
    """fps other than the default reach both writers; (F, 3, H, W) frames keep their orientation."""
    frames = torch.rand(4, 3, 16, 32)
    u8 = to_uint8_frames(frames)
    assert u8.shape == (4, 16, 32, 3)
    np.testing.assert_array_equal(u8, (frames.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    mp4 = export_video(frames, str(tmp_path / "v.mp4"), fps=5)
    assert iio.immeta(mp4)["fps"] == 5 and iio.imread(mp4).shape == (4, 16, 32, 3)
    gif = export_video(frames, str(tmp_path / "v.gif"), fps=5)
    with Image.open(gif) as im:
        assert [im.seek(i) or im.info["duration"] for i in range(im.n_frames)] == [200] * 4


def test_mp4_export_that_ffmpeg_fails_keeps_the_old_video(tmp_path, monkeypatch):
    """imageio-ffmpeg ignores ffmpeg's exit status: on a full disk a truncated file replaced the old
    video and the export reported success. The file is decoded back before it is renamed into place."""
    import imageio_ffmpeg

    frames = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    path = export_to_mp4(frames, tmp_path / "v.mp4")
    good = (tmp_path / "v.mp4").read_bytes()

    def truncated(tmp, *args, **kwargs):  # what ffmpeg leaves when the disk fills: no moov atom
        with open(tmp, "wb") as f:
            f.write(good[:len(good) // 3])
        while True:
            yield

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", truncated)
    with pytest.raises(OSError, match="did not write a readable video|wrote .* of 4 frames"):
        export_to_mp4(frames, path, overwrite=True)
    assert (tmp_path / "v.mp4").read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_integer_frames_are_read_as_0_to_255():
    """uint8 tensors (torchvision.io.read_video's frames) were cast to float and clipped to [0, 1]: a
    white video. Other integer types are refused rather than guessed."""
    u8 = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    np.testing.assert_array_equal(to_uint8_frames(u8), u8.numpy())
    np.testing.assert_array_equal(to_uint8_frames(u8.permute(0, 3, 1, 2)), u8.numpy())
    with pytest.raises(TypeError, match="frames must be uint8 .* or floating point .*, got int64"):
        to_uint8_frames(u8.long())


def test_np_frames_follow_diffusers_convention(lcm, tmp_path):
    """The default output ("np") is float32 in [0, 1] as in diffusers' video pipelines, so diffusers'
    export_to_video (which multiplies by 255) writes a video's frames as they come, not uint8
    overflow noise; so does export_video."""
    from diffusers.utils import export_to_video

    kwargs = dict(num_frames=4, num_inference_steps=2, seed=0, **SIZE)
    frames = lcm("a cat", **kwargs).frames
    assert frames.dtype == np.float32 and frames.shape == (1, 4, 32, 32, 3)
    assert 0 <= frames.min() and frames.max() <= 1
    want = lcm("a cat", output_type="pt", **kwargs).frames[0].permute(0, 2, 3, 1).numpy() * 255
    for path in (export_to_video(frames[0], str(tmp_path / "d.mp4"), macro_block_size=1),
                 export_video(frames[0], str(tmp_path / "h.mp4"))):
        assert np.abs(iio.imread(path).astype(float) - want).mean() < 20  # lossy H.264, same pictures



def test_pil_frames_are_the_pt_frames_rounded(lcm):
    kw = dict(num_frames=2, num_inference_steps=1, seed=0, **SIZE)
    pt = lcm("a cat", output_type="pt", **kw).frames[0]
    pil = lcm("a cat", output_type="pil", **kw).frames[0]
    want = (pt.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), want)


def test_initial_latents_scaled_by_the_schedulers_init_noise_sigma(ddim, monkeypatch):
    """LCM and DDIM start at sigma 1, so only a swapped-in sigma scheduler (Euler's init_noise_sigma is
    1.9 here) shows whether the given noise is scaled before the first step."""
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler.from_config(ddim.scheduler.config)
    monkeypatch.setattr(ddim, "scheduler", euler)
    seen = []
    unet = ddim._unet
    monkeypatch.setattr(ddim, "_unet", lambda model_in, *args: seen.append(model_in) or unet(model_in, *args))
    latents = torch.randn(1, 4, 2, 4, 4)
    ddim("a cat", latents=latents, num_frames=2, num_inference_steps=2, guidance_scale=1.0, output_type="latent",
         **SIZE)
    euler.set_timesteps(2)
    assert euler.init_noise_sigma > 1.5
    want = euler.scale_model_input(latents * euler.init_noise_sigma, euler.timesteps[0])
    torch.testing.assert_close(seen[0], want)


def test_lora_weights_load_scale_fuse_and_unload(tmp_path):
    """diffusers' LoRA API on the pipeline: a U-Net LoRA saved with save_lora_weights and loaded into a
    fresh pipeline reproduces the adapted one; weight 0 is the base model; fused into the weights it
    gives the adapted output, and unloaded the base one again."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    def run(pipe):
        return pipe("a cat", num_frames=2, num_inference_steps=2, seed=0, output_type="latent", **SIZE).frames

    pipe = _pipe("lcm")
    base = run(pipe)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    adapted = run(pipe)
    HummingbirdPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    fresh = _pipe("lcm")
    torch.testing.assert_close(run(fresh), base, atol=0, rtol=0)  # the same random weights as pipe's
    fresh.load_lora_weights(tmp_path, adapter_name="style")
    assert (adapted - base).abs().max() > 0.1
    torch.testing.assert_close(run(fresh), adapted, atol=1e-6, rtol=0)
    fresh.set_adapters(["style"], adapter_weights=[0.0])
    # peft froze the base weights, and torch's matmul of a non-contiguous 3-D input (the spatial
    # proj_in's) takes another algorithm when the weight needs no gradient, even under no_grad: the same
    # math rounded otherwise (1e-6 per step on an AVX-512 CPU, 0 on others)
    torch.testing.assert_close(run(fresh), base, atol=1e-4, rtol=1e-4)
    fresh.set_adapters(["style"], adapter_weights=[1.0])
    fresh.fuse_lora(adapter_names=["style"])
    fresh.unload_lora_weights()  # the fused weights stay; the adapter layers go
    # W + BA rounded once against x W + (x B) A: rounding apart, grown over two steps (the adapter moved
    # the latents by > 0.1)
    torch.testing.assert_close(run(fresh), adapted, atol=1e-4, rtol=1e-4)
    fresh = _pipe("lcm")
    fresh.load_lora_weights(tmp_path, adapter_name="style")
    fresh.unload_lora_weights()
    torch.testing.assert_close(run(fresh), base, atol=1e-4, rtol=1e-4)  # frozen weights, as above


def test_encode_prompt_takes_a_string_as_one_prompt(lcm):
    """A string was iterated as characters for the length check: a long one was cut without a warning."""
    long = "word " * 100
    with pytest.warns(UserWarning, match="prompt is longer than 77 tokens"):
        embeds = lcm.encode_prompt(long, "cpu")
    assert embeds.shape == (1, 77, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert embeds.equal(lcm.encode_prompt([long], "cpu"))


def test_pipeline_on_cpu_without_the_resource_module(lcm, monkeypatch):
    """Windows has no `resource`: the CPU peak-memory readout failed every call once it had finished."""
    monkeypatch.setitem(sys.modules, "resource", None)
    out = lcm("a cat", num_frames=1, num_inference_steps=1, height=16, width=16, output_type="latent")
    assert out.frames.shape == (1, 4, 1, 2, 2) and out.peak_memory_mb == 0.0


def test_gif_export_names_a_nan_fps(tmp_path):
    with pytest.raises(ValueError, match="fps must be positive, got nan"):
        export_to_gif(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "v.gif", fps=float("nan"))
    assert list(tmp_path.iterdir()) == []


def test_exports_and_folders_where_folders_cannot_be_opened(tmp_path, monkeypatch):
    """Windows: os.open refuses folders (PermissionError), so syncing the folder after the rename failed
    an export whose file was already in place, and every write_folder before its move."""
    real_open = os.open

    def windows_open(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(files, "_WINDOWS", True)
    monkeypatch.setattr(os, "open", windows_open)
    export_to_gif(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "v.gif")
    files.write_folder(tmp_path / "model", lambda tmp: (tmp / "config.json").write_text("{}"))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "v.gif"]
    assert (tmp_path / "model" / "config.json").read_text() == "{}"
