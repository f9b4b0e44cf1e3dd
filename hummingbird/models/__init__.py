from hummingbird.models.configs import CONFIGS

__all__ = ["CONFIGS", "HummingbirdUNet3DModel", "HummingbirdUNet3DOutput", "guidance_scale_embedding"]


def __getattr__(name):
    # Lazy: reading CONFIGS (e.g. for `hummingbird --help`) should not import diffusers.
    if name in __all__:
        from hummingbird.models import unet_3d

        return getattr(unet_3d, name)
    raise AttributeError(f"module 'hummingbird.models' has no attribute {name!r}")
