"""The ``lipsim`` command line: thin parsers over the library.

Each command module in :data:`COMMAND_MODULES` exposes ``register(subparsers)`` and sets a
``func`` default on its parsers. Errors end with a non-zero exit and one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

__all__ = [
    "main",
    "add_model_args",
    "add_engine_arg",
    "resolve_model",
    "resolve_inference_model",
    "emit",
    "parse_eps_list",
    "CliError",
]

#: modules under lipsim.cli that contribute sub-commands (missing ones are skipped)
COMMAND_MODULES = ("core", "data", "train", "evaluate", "retrieval")


class CliError(Exception):
    """A user-facing error raised by a command handler."""


def add_model_args(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    parser.add_argument(
        "--model",
        default=None,
        metavar="SOURCE",
        help="model file (.safetensors or a published .pth), 'default' (packaged), or "
        "'arch:NAME' for an untrained registered architecture",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def check_device(device: str) -> None:
    """A one-line error for a device this machine does not have (before any work starts)."""
    from lipsim.devices import usable_device

    usable_device(device)


def resolve_model(source: str | None, device: str = "cpu"):
    """Loads ``--model``: a file, 'default'/None, or 'arch:NAME' (random weights, flagged)."""
    import lipsim

    if source and source.startswith("arch:"):
        model = lipsim.create_model(source[5:], seed=0).to(device)
        model.requires_grad_(False)
        model.untrained = True
        return model
    model = lipsim.load(source, device=device)
    model.untrained = False
    return model


ENGINES = ("auto", "numpy", "torch")


def add_engine_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="numpy: torch-free float32 inference of a safetensors model (fast start, CPU); "
        "torch: the PyTorch model; auto (default): numpy when it can run the model on the CPU",
    )


def resolve_inference_model(args):
    """``(model, load_images)`` for one-shot inference commands: the NumPy engine (no torch
    import) or the torch model, by ``--engine``; ``load_images(path, size)`` matches the engine."""
    source, engine = args.model, getattr(args, "engine", "torch")
    if engine != "torch":
        from lipsim.numpy_engine import NumpyLipSim, supported

        usable = args.device == "cpu" and not (source or "").startswith("arch:") and supported(source)
        if engine == "numpy" and not usable:
            raise CliError(
                "--engine numpy runs lipsim safetensors model files on the CPU "
                "(use --engine torch for published .pth files, arch:NAME or another device)"
            )
        if usable:
            from lipsim.images import load_image_array

            model = NumpyLipSim.load(source)
            model.engine = "numpy"
            return model, load_image_array
    import lipsim

    model = resolve_model(source, args.device).freeze()  # inference only: the weights folded once
    model.engine = "torch"
    return model, lipsim.load_image


def model_label(source: str | None) -> str:
    return source or "default"


def emit(args, payload: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=None, default=float, allow_nan=False))
    else:
        print(text)


def parse_eps_list(text: str) -> list[float]:
    """'36/255,72/255,0.5' -> [0.1411..., 0.2823..., 0.5]"""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "/" in part:
                num, den = part.split("/", 1)
                values.append(float(num) / float(den))
            else:
                values.append(float(part))
        except (ValueError, ZeroDivisionError):
            raise CliError(f"bad eps value {part!r} (use e.g. 36/255 or 0.14)") from None
    if not values or not all(v >= 0 for v in values):  # NaN fails v >= 0
        raise CliError(f"eps must be non-negative (got {text!r}; e.g. 36/255 or 0.14)")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lipsim",
        description="LipSim: a perceptual similarity metric whose answers come with ℓ2 certificates "
        "(radii in [0,1] pixel units of the 224×224 RGB input).",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"lipsim.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"lipsim.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from lipsim import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from lipsim.errors import LipSimError, one_line

    try:
        if getattr(args, "device", "cpu") not in ("cpu", "auto"):
            check_device(args.device)
        result = args.func(args)
        return int(result or 0)
    except (CliError, LipSimError, ValueError, OSError) as exc:
        print(f"lipsim {args.command}: error: {one_line(exc, None)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lipsim {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"lipsim {args.command}: error: out of memory", file=sys.stderr)
        return 1
    except Exception as exc:  # last resort: still one line, but say it is a bug
        if os.environ.get("LIPSIM_DEBUG"):
            raise
        print(
            f"lipsim {args.command}: internal error: {type(exc).__name__}: {one_line(exc, None, empty='')}"
            " (set LIPSIM_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 3
