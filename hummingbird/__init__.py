"""Hummingbird: VideoCrafter2 / Hummingbird text-to-video models on diffusers, running on hbkernels ops."""

__all__ = ["DEFAULT_SIZE", "HummingbirdPipeline", "HummingbirdUNet3DModel"]

DEFAULT_SIZE = (320, 512)  # (height, width): VideoCrafter2's and Hummingbird's training resolution


def __getattr__(name):
    # Lazy, so that `hummingbird --help` does not pay for importing diffusers.
    if name == "HummingbirdUNet3DModel":
        from hummingbird.models.unet_3d import HummingbirdUNet3DModel

        return HummingbirdUNet3DModel
    if name == "HummingbirdPipeline":
        from hummingbird.pipeline import HummingbirdPipeline

        return HummingbirdPipeline
    raise AttributeError(f"module 'hummingbird' has no attribute {name!r}")
