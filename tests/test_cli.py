"""``hummingbird generate`` end to end with the built-in tiny random model, and its error messages."""
import sys
import types

import imageio.v3 as iio
import pytest
import torch
from PIL import Image

from hummingbird.cli import main

TINY = ["--model", "tiny-random", "--height", "32", "--width", "32"]


pytestmark = pytest.mark.usefixtures("single_thread")


def test_generate_tiny_random_mp4_with_hummingbird_defaults(tmp_path, capsys):
    out = tmp_path / "cat.mp4"
    assert main(["generate", "a cat", *TINY, "--seed", "3", "--out", str(out)]) == 0  # 8 steps, 26 frames, fps 8
    printed = capsys.readouterr().out
    assert f"wrote {out} (26 frames, 32x32, 8 fps (conditioned on 8), seed 3" in printed
    for stage in ("load", "text_encode", "denoise", "decode", "export", "peak memory"):
        assert stage in printed
    assert iio.imread(out).shape == (26, 32, 32, 3) and iio.immeta(out)["fps"] == 8


def test_generate_gif_from_saved_pipeline(tmp_path, capsys):
    from hummingbird.testing import tiny_random_pipeline

    tiny_random_pipeline("ddim").save_pretrained(tmp_path / "model")
    out = tmp_path / "cat.gif"
    args = ["generate", "a cat", "--model", str(tmp_path / "model"), "--height", "32", "--width", "32",
            "--frames", "3", "--steps", "2", "--negative-prompt", "blurry", "--out", str(out)]
    assert main(args) == 0
    # a non-distilled model: VideoCrafter2's fps conditioning, played at its scripts' 10 fps
    assert "10 fps (conditioned on 28)" in capsys.readouterr().out
    assert iio.imread(out).shape == (3, 32, 32, 3)
    assert main([*args, "--save-fps", "5", "--overwrite"]) == 0
    assert "5 fps (conditioned on 28)" in capsys.readouterr().out


def _refuse_loading(monkeypatch):
    import hummingbird.pipeline
    import hummingbird.testing

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the cheap checks")

    monkeypatch.setattr(hummingbird.pipeline, "load_pipeline", load)
    monkeypatch.setattr(hummingbird.testing, "tiny_random_pipeline", load)


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "model folder /no/such/model does not exist"),
    ([*TINY, "--out", "old.gif"], "old.gif exists; choose another --out or overwrite it"),
    ([*TINY, "--steps", "60", "--out", "v.gif"], "--steps 60: this model's scheduler takes at most 50"),
    ([*TINY, "--out", "/no/such/dir/v.mp4"], "folder /no/such/dir does not exist"),
    ([*TINY, "--out", "v.avi"], "--out must end in .mp4 or .gif"),
    ([*TINY, "--out", "v.gif", "--save-fps", "60"], "GIFs play at most 50 fps"),
    ([*TINY, "--out", "v.mp4"], r"writing .mp4 needs imageio-ffmpeg: pip install 'hbkernels\[video\]'"),
    ([*TINY, "--height", "40"], "must be multiples of 16 for this model .*got 40x32"),
    pytest.param([*TINY, "--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
    ([*TINY, "--device", "meta"], "--device meta holds no data"),
    pytest.param([*TINY, "--device", "mps"], "--device mps is not usable here",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available")),
    ([*TINY, "--out", "folder.gif"], "--out folder.gif is a folder"),
    ([*TINY, "--out", "a" * 252 + ".gif"], "its name is longer than the 255 bytes"),
])
def test_generate_errors_before_loading(args, message, tmp_path, monkeypatch):
    if "imageio" in message:
        monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if not installed
    _refuse_loading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.gif").write_bytes(b"old")
    (tmp_path / "folder.gif").mkdir()
    with pytest.raises(SystemExit, match=message):
        main(["generate", "a cat", *args])


@pytest.mark.parametrize("args, message", [
    (["--frames", "0"], "argument --frames: must be >= 1"),
    (["--height", "36"], "argument --height: must be a positive multiple of 8"),
    (["--width", "0"], "argument --width: must be a positive multiple of 8"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice"),
    (["--guidance-scale", "nan"], "argument --guidance-scale: must be finite, got 'nan'"),
    (["--guidance-scale", "high"], "argument --guidance-scale: must be a number, got 'high'"),
    (["--seed", "99999999999999999999"], "argument --seed: must be in [0, 2**64 - 1]"),
    (["--seed", "-1"], "argument --seed: must be in [0, 2**64 - 1]"),
])
def test_generate_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "a cat", "--model", "tiny-random", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_generate_checks_steps_against_the_scheduler_before_loading(tmp_path, monkeypatch):
    """The most steps: LCM's original_inference_steps, DDIM's training timesteps less its steps_offset
    (1000 steps would start at timestep 1000, past the schedule); from a saved pipeline's scheduler
    config, or for a `hummingbird convert` folder from the scheduler its U-Net implies."""
    from hummingbird.models import HummingbirdUNet3DModel
    from hummingbird.schedulers import lcm_scheduler

    _refuse_loading(monkeypatch)
    for name, steps, most in (("hummingbird-0.7b", 51, 50), ("videocrafter2", 1000, 999)):
        with torch.device("meta"):
            HummingbirdUNet3DModel.from_named_config(name).save_config(tmp_path / name / "unet")
        with pytest.raises(SystemExit, match=f"--steps {steps}: this model's scheduler takes at most {most}$"):
            main(["generate", "a cat", "--model", str(tmp_path / name), "--steps", str(steps),
                  "--out", str(tmp_path / "v.gif")])
    lcm_scheduler(original_inference_steps=8).save_config(tmp_path / "videocrafter2" / "scheduler")
    with pytest.raises(SystemExit, match="takes at most 8$"):
        main(["generate", "a cat", "--model", str(tmp_path / "videocrafter2"), "--steps", "9",
              "--out", str(tmp_path / "v.gif")])


def test_generate_overwrites_out_only_with_overwrite(tmp_path):
    out = str(tmp_path / "v.gif")
    args = ["generate", "a cat", *TINY, "--steps", "1", "--out", out]
    assert main([*args, "--frames", "2"]) == 0
    with pytest.raises(SystemExit, match="exists; choose another --out or overwrite it"):
        main([*args, "--frames", "3"])
    assert iio.imread(out).shape[0] == 2
    assert main([*args, "--frames", "3", "--overwrite"]) == 0
    assert iio.imread(out).shape[0] == 3


def test_generate_checks_size_against_model_config_before_loading(tmp_path, capsys):
    """The released models need multiples of 64 (VAE 8 x U-Net 8): read from unet/config.json before
    any weights load (this folder has none: only the config is there)."""
    from hummingbird.models import HummingbirdUNet3DModel

    with torch.device("meta"):
        HummingbirdUNet3DModel.from_named_config("hummingbird-0.7b").save_config(tmp_path / "unet")
    out = str(tmp_path / "v.mp4")
    for size in (["--height", "72"], ["--width", "520"]):
        with pytest.raises(SystemExit, match="must be multiples of 64 for this model"):
            main(["generate", "a cat", "--model", str(tmp_path), *size, "--out", out])
    assert main(["generate", "a cat", "--model", str(tmp_path), "--height", "384", "--out", out]) == 1  # passes: loads
    assert "has no model_index.json" in capsys.readouterr().err


def test_tiny_random_size_multiple_matches_the_model():
    from hummingbird.generate import TINY_MULTIPLE, TINY_SIZE
    from hummingbird.testing import tiny_random_pipeline

    assert tiny_random_pipeline().spatial_multiple == TINY_MULTIPLE and TINY_SIZE % TINY_MULTIPLE == 0


def test_generate_model_folder_without_pipeline(tmp_path, capsys):
    assert main(["generate", "a cat", "--model", str(tmp_path), "--out", str(tmp_path / "v.mp4")]) == 1
    assert "has no model_index.json" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--height", "--frames", "--steps"])
def test_generate_non_integer_argument_message(flag, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "a cat", "--model", "tiny-random", flag, "abc"])
    err = capsys.readouterr().err
    assert f"argument {flag}: must be an integer, got 'abc'" in err and "_multiple_of_8" not in err


def test_generate_incomplete_saved_pipeline_is_an_error_not_a_traceback(tmp_path, capsys):
    """A pipeline folder missing a weights file (an interrupted copy): one line, exit status 1."""
    from hummingbird.testing import tiny_random_pipeline

    tiny_random_pipeline("lcm").save_pretrained(tmp_path / "model")
    for f in (tmp_path / "model" / "unet").glob("*.safetensors"):
        f.unlink()
    out = tmp_path / "v.gif"
    assert main(["generate", "a cat", "--model", str(tmp_path / "model"), "--height", "32", "--width", "32",
                 "--out", str(out)]) == 1
    assert "hummingbird generate: error:" in capsys.readouterr().err and not out.exists()


def stub_model_folder(folder, config, monkeypatch):
    """A model folder holding only the U-Net's config, and load_pipeline replaced by a stand-in pipeline
    that records its calls and returns distinct random frames (a GIF merges identical ones)."""
    import numpy as np

    import hummingbird.pipeline
    from hummingbird.models import HummingbirdUNet3DModel

    with torch.device("meta"):
        model = HummingbirdUNet3DModel.from_named_config(config)
    model.save_config(folder / "unet")
    calls = []

    class Pipe:
        guidance_distilled = model.config.time_cond_proj_dim is not None

        def to(self, *args, **kwargs):
            return self

        def __call__(self, prompt, **kwargs):
            calls.append({"prompt": prompt, **kwargs})
            shape = (1, kwargs["num_frames"], kwargs["height"], kwargs["width"], 3)
            frames = np.random.default_rng(0).random(shape, np.float32)
            return types.SimpleNamespace(frames=frames, timings={}, peak_memory_mb=0.0)

    monkeypatch.setattr(hummingbird.pipeline, "load_pipeline", lambda *args, **kwargs: Pipe())
    return calls


def test_generate_model_folder_defaults_to_the_training_resolution(tmp_path, monkeypatch):
    """Without --height / --width a model folder runs at hummingbird.DEFAULT_SIZE, 320 x 512 (H x W)."""
    from hummingbird import DEFAULT_SIZE

    calls = stub_model_folder(tmp_path, "hummingbird-0.7b", monkeypatch)
    out = tmp_path / "v.gif"
    assert main(["generate", "a cat", "--model", str(tmp_path), "--frames", "1", "--steps", "1", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert DEFAULT_SIZE == (320, 512) and [(c["height"], c["width"]) for c in calls] == [DEFAULT_SIZE]
    assert iio.imread(out).shape[-3:-1] == DEFAULT_SIZE


def test_generate_passes_every_sampling_flag_to_the_pipeline(tmp_path, monkeypatch):
    """--seed, --guidance-scale, --negative-prompt and --fps reach the pipeline call, and --save-fps the
    file: a flag dropped on the way would still print and exit 0."""
    calls = stub_model_folder(tmp_path, "videocrafter2", monkeypatch)
    out = tmp_path / "v.gif"
    assert main(["generate", "a cat", "--model", str(tmp_path), "--frames", "3", "--steps", "2", "--device", "cpu",
                 "--height", "64", "--width", "64", "--seed", "3", "--guidance-scale", "2.5",
                 "--negative-prompt", "blurry", "--fps", "12", "--save-fps", "10", "--out", str(out)]) == 0
    (call,) = calls
    assert (call["prompt"], call["seed"], call["guidance_scale"], call["negative_prompt"], call["fps"],
            call["num_inference_steps"], call["num_frames"]) == ("a cat", 3, 2.5, "blurry", 12, 2, 3)
    with Image.open(out) as im:  # 10 fps: 100 ms a frame (the conditioning fps, 12, would be 80-90)
        assert [im.seek(i) or im.info["duration"] for i in range(im.n_frames)] == [100] * 3


def test_generate_leaves_out_an_unknown_peak_memory(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "resource", None)
    out = tmp_path / "v.gif"
    assert main(["generate", "a cat", "--model", "tiny-random", "--height", "16", "--width", "16",
                 "--frames", "1", "--steps", "1", "--out", str(out)]) == 0
    assert "peak memory" not in capsys.readouterr().out and out.exists()
