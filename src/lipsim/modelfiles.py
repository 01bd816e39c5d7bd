"""Where model files are and what they are, without importing torch (shared by
:mod:`lipsim.checkpoints` and the NumPy engine)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import CheckpointError
from .spec import list_archs

__all__ = ["DEFAULT_NAME", "default_model_path", "resolve_model_path", "is_safetensors"]

DEFAULT_NAME = "default.safetensors"


def default_model_path() -> Path:
    return Path(str(resources.files("lipsim") / "weights" / DEFAULT_NAME))


def resolve_model_path(source=None) -> Path:
    """The file behind ``source``: ``None``/"default" (packaged), a file, or a directory holding
    ``model.safetensors`` (a training run). :class:`CheckpointError` when there is none."""
    if source is None or source == "default":
        path = default_model_path()
        if not path.exists():
            raise CheckpointError(
                "no packaged default model in this installation; train one with "
                "'lipsim train distill ...' or pass a model file (model.safetensors or a published .pth)"
            )
        return path
    path = Path(source)
    try:
        return _existing_model_file(path, source)
    except OSError as exc:  # a name too long, a symlink loop, no permission...
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _existing_model_file(path: Path, source) -> Path:
    if not path.exists():
        hint = (
            f" (architectures: {', '.join(list_archs())} are built with lipsim.create_model)"
            if str(source) in list_archs()
            else ""
        )
        raise CheckpointError(f"{path}: no such model file{hint}")
    if path.is_dir():
        candidate = path / "model.safetensors"
        if not candidate.exists():
            raise CheckpointError(f"{path}: is a directory without model.safetensors")
        path = candidate
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    return path


def is_safetensors(path: Path) -> bool:
    """Whether the file starts like a safetensors file (8-byte header length, then JSON)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < 100_000_000 and head[8:9] == b"{"
