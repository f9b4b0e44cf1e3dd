"""Write generated frames to .mp4 (H.264 through imageio-ffmpeg's bundled ffmpeg) or .gif (PIL).

Files are written to a temporary name in the destination folder and renamed into place, so a
reader never sees a half-written video and a failed export leaves no partial file behind. With
``overwrite=False`` an existing file is never replaced, not even one that appeared during the export.
"""
import contextlib
import os
import uuid

import numpy as np
import torch
from PIL import Image

from hummingbird.files import fsync


def to_uint8_frames(frames) -> np.ndarray:
    """One video as (F, H, W, 3) uint8: from a list of PIL images, uint8 frames in [0, 255], or float
    frames in [0, 1] (the pipeline's "np" and "pt" frames of one video), each as a (F, H, W, 3) or
    (F, 3, H, W) array or tensor."""
    if isinstance(frames, (list, tuple)) and frames and isinstance(frames[0], Image.Image):
        return np.stack([np.asarray(f.convert("RGB")) for f in frames])
    if isinstance(frames, torch.Tensor):  # integers stay integers (uint8: torchvision.io.read_video's frames)
        frames = frames.detach().cpu()
        frames = (frames.float() if frames.is_floating_point() else frames).numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 and not np.issubdtype(frames.dtype, np.floating):
        raise TypeError(f"frames must be uint8 (0-255) or floating point (0-1), got {frames.dtype}")
    if frames.ndim == 4 and frames.shape[1] == 3 and frames.shape[-1] != 3:  # (F, 3, H, W)
        frames = frames.transpose(0, 2, 3, 1)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected one video of F >= 1 RGB frames, got an array of shape {frames.shape}")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    return frames


def temporary_path(path: str, tag: str) -> str:
    """A hidden file beside ``path`` whose name fits wherever ``path``'s does: ``path``'s stem is cut to
    100 bytes (a name's limit is 255) and its suffix kept, so ffmpeg/PIL pick the format from it."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    stem = stem.encode()[:100].decode(errors="ignore")
    return os.path.join(folder, f".{stem}.{tag}{ext}")


def check_writable_target(path: str, overwrite: bool):
    """What can be known before encoding: ``path`` names no folder, and with ``overwrite=False`` no file."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} exists; not replaced (overwrite=True replaces it)")


def _atomic(path: str, write, overwrite: bool = True) -> str:
    """Run ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = os.path.abspath(path)
    check_writable_target(path, overwrite)
    folder = os.path.dirname(path)
    # a unique name: two writers of one path (threads of one process too) must not share a temporary file
    tmp = temporary_path(path, f"tmp{uuid.uuid4().hex[:12]}")
    try:
        open(tmp, "xb").close()  # fail early and clearly; created with the user's umask, unlike mkstemp
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror} ({folder})") from err
    try:
        write(tmp)
        fsync(tmp)  # durable before it takes the name: a power cut after the rename leaves no empty video
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_new(tmp, path)
        fsync(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # a writer that removed it must not hide its own error
            os.unlink(tmp)
        raise
    return path


def _rename_new(tmp: str, path: str):
    """Rename ``tmp`` to ``path``, which must not exist: a hard link fails where a rename would replace."""
    try:
        os.link(tmp, path)
    except OSError as err:
        if isinstance(err, FileExistsError) or os.path.lexists(path):
            raise FileExistsError(f"{path} appeared during the export; not replaced (overwrite=True replaces it)") from None
        os.replace(tmp, path)  # no hard links on this file system (FAT, some network shares): checked instead
    else:
        os.unlink(tmp)


def export_to_mp4(frames, path: str, fps: float = 8, quality: float = 8, overwrite: bool = True) -> str:
    """H.264 / yuv420p (plays everywhere); ``quality`` 0-10 as imageio-ffmpeg defines it. Returns the path."""
    import imageio_ffmpeg

    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    video = to_uint8_frames(frames)
    height, width = video.shape[1:3]

    def write(tmp):
        # macro_block_size=2: yuv420p needs even sizes; larger blocks would make ffmpeg rescale frames.
        writer = imageio_ffmpeg.write_frames(tmp, (width, height), fps=fps, codec="libx264", quality=quality,
                                             pix_fmt_out="yuv420p", macro_block_size=2, ffmpeg_log_level="error")
        writer.send(None)
        for frame in video:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        # imageio-ffmpeg does not check ffmpeg's exit status: a full disk left a truncated file that
        # would have replaced the old video. Decoding it back checks the file before the rename.
        try:
            frames_written = imageio_ffmpeg.count_frames_and_secs(tmp)[0]
        except (RuntimeError, OSError) as err:
            raise OSError(f"ffmpeg did not write a readable video to {path}: {err}") from None
        if frames_written != len(video):
            raise OSError(f"ffmpeg wrote {frames_written} of {len(video)} frames to {path}")

    return _atomic(path, write, overwrite)


GIF_MAX_FPS = 50  # browsers play frames shorter than 20 ms at 100 ms


def gif_durations(count: int, fps: float) -> list:
    """Per-frame durations (ms) of a GIF playing at ``fps``. GIF stores centiseconds, so one constant
    duration drifts (8 fps: 120 ms, played at 8.3 fps); these alternate (120, 130, ...) so frame i
    starts within 5 ms of i / fps."""
    if fps > GIF_MAX_FPS:
        raise ValueError(f"fps must be at most {GIF_MAX_FPS} for a GIF, got {fps}; write an .mp4 instead")
    if not fps > 0:  # NaN too
        raise ValueError(f"fps must be positive, got {fps}")
    starts = [round(100 * i / fps) for i in range(count + 1)]  # centiseconds
    return [10 * (b - a) for a, b in zip(starts, starts[1:])]


def export_to_gif(frames, path: str, fps: float = 8, overwrite: bool = True) -> str:
    """Looping GIF (palette per frame). Returns the path."""
    images = [Image.fromarray(f) for f in to_uint8_frames(frames)]
    durations = gif_durations(len(images), fps)
    return _atomic(path, lambda tmp: images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                                                    duration=durations, loop=0), overwrite)


EXPORTERS = {".mp4": export_to_mp4, ".gif": export_to_gif}


def export_video(frames, path: str, fps: float = 8, overwrite: bool = True) -> str:
    """Pick the writer from the file extension (.mp4 or .gif)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXPORTERS:
        raise ValueError(f"unsupported video format {ext!r} for {path}; use one of {sorted(EXPORTERS)}")
    return EXPORTERS[ext](frames, path, fps, overwrite=overwrite)
