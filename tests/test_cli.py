"""``hummingbird generate`` end to end with the built-in tiny random model, and its error messages."""
import imageio.v3 as iio
import pytest
import torch

from hummingbird.cli import main

TINY = ["--model", "tiny-random", "--height", "32", "--width", "32"]


pytestmark = pytest.mark.usefixtures("single_thread")


def test_generate_tiny_random_mp4(tmp_path, capsys):
    out = tmp_path / "cat.mp4"
    assert main(["generate", "a cat", *TINY, "--frames", "26", "--steps", "4", "--seed", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "seed 3" in printed
    for stage in ("load", "text_encode", "denoise", "decode", "export", "peak memory"):
        assert stage in printed
    assert iio.imread(out).shape == (26, 32, 32, 3)


def test_generate_gif_from_saved_pipeline(tmp_path, capsys):
    from hummingbird.testing import tiny_random_pipeline

    tiny_random_pipeline("ddim").save_pretrained(tmp_path / "model")
    out = tmp_path / "cat.gif"
    args = ["generate", "a cat", "--model", str(tmp_path / "model"), "--height", "32", "--width", "32",
            "--frames", "3", "--steps", "2", "--negative-prompt", "blurry", "--out", str(out)]
    assert main(args) == 0
    assert "28 fps" in capsys.readouterr().out  # VideoCrafter2's fps default for a non-distilled model
    assert iio.imread(out).shape == (3, 32, 32, 3)


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "model folder /no/such/model does not exist"),
    ([*TINY, "--out", "/no/such/dir/v.mp4"], "folder /no/such/dir does not exist"),
    ([*TINY, "--out", "v.avi"], "--out must end in .mp4 or .gif"),
    pytest.param([*TINY, "--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
])
def test_generate_errors_before_loading(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=message):
        main(["generate", "a cat", *args])


@pytest.mark.parametrize("args, message", [
    (["--frames", "0"], "argument --frames: must be >= 1"),
    (["--height", "36"], "argument --height: must be a positive multiple of 8"),
    (["--width", "0"], "argument --width: must be a positive multiple of 8"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice"),
])
def test_generate_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "a cat", "--model", "tiny-random", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_generate_model_folder_without_pipeline(tmp_path, capsys):
    assert main(["generate", "a cat", "--model", str(tmp_path), "--out", str(tmp_path / "v.mp4")]) == 1
    assert "has no model_index.json" in capsys.readouterr().err
