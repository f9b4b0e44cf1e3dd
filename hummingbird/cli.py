"""The ``hummingbird`` command: one function per subcommand (``add_<name>_parser`` + ``cmd_<name>``).

Heavy imports (torch, diffusers) happen inside the commands, so ``--help`` stays instant.
"""
import argparse
import pickle
import sys


def add_convert_parser(subparsers):
    from hummingbird.models.configs import CONFIGS

    p = subparsers.add_parser(
        "convert",
        help="convert an original VideoCrafter2/Hummingbird checkpoint to a diffusers folder",
        description="Convert an original VideoCrafter2/Hummingbird checkpoint (.ckpt/.pt/.pth/.bin/.safetensors, "
        "or a released whole-model pickle, read without running its code) to a diffusers folder with "
        "unet/, text_encoder/ and vae/ (the latter two when the checkpoint holds them).",
    )
    p.add_argument("src", help="original checkpoint file")
    p.add_argument("dst", help="output folder (written atomically)")
    p.add_argument(
        "--config",
        help=f"U-Net config: one of {', '.join(CONFIGS)}, or a config.json; default: detected from the weights",
    )
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast the weights (default: keep the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--extract-ema", action="store_true",
                   help="convert the U-Net's EMA weights (model_ema.* in training checkpoints) in place of its raw ones")
    p.add_argument(
        "--no-strict", dest="strict", action="store_false",
        help="load despite missing/unexpected keys (warns; missing weights stay randomly initialised)",
    )
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from hummingbird.convert import convert

    written = convert(args.src, args.dst, args.config, dtype=args.dtype, overwrite=args.overwrite, strict=args.strict,
                      extract_ema=args.extract_ema)
    print(f"wrote {', '.join(written)} to {args.dst}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hummingbird", description="Hummingbird text-to-video tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_convert_parser(subparsers)
    from hummingbird.generate import add_parser as add_generate_parser  # light: torch loads only when it runs

    add_generate_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, pickle.UnpicklingError) as err:  # OSError: also unreadable/incomplete model folders
        print(f"hummingbird {args.command}: error: {err}", file=sys.stderr)
        return 1
