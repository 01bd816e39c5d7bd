"""Where model files are and what they are, without importing torch (shared by
:mod:`lipsim.checkpoints` and the NumPy engine)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import CheckpointError
from .spec import list_archs

__all__ = ["DEFAULT_NAME", "default_model_path", "resolve_model_path", "run_folder_files", "is_safetensors"]

DEFAULT_NAME = "default.safetensors"


def default_model_path() -> Path:
    return Path(str(resources.files("lipsim") / "weights" / DEFAULT_NAME))


def resolve_model_path(source=None) -> Path:
    """The file behind ``source``: ``None``/"default" (packaged), a file, or a training run folder
    (its ``model.safetensors``, else its ``checkpoints/last.pt``). :class:`CheckpointError` when
    there is none."""
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
        model_file, checkpoint = run_folder_files(path)
        if model_file is None and checkpoint is None:
            raise CheckpointError(f"{path}: is a directory without model.safetensors or checkpoints/last.pt")
        path = model_file or checkpoint
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    return path


def run_folder_files(folder: Path) -> tuple[Path | None, Path | None]:
    """``(model.safetensors, checkpoints/last.pt)`` of a training run folder, each ``None`` when
    absent: a finished run has both, an interrupted one only the checkpoint."""
    model_file = folder / "model.safetensors"
    checkpoint = folder / "checkpoints" / "last.pt"
    return (model_file if model_file.exists() else None, checkpoint if checkpoint.exists() else None)


def is_safetensors(path: Path) -> bool:
    """Whether the file starts like a safetensors file (8-byte header length, then JSON)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < 100_000_000 and head[8:9] == b"{"
