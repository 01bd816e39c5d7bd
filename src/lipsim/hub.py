"""The published LipSim checkpoints by name: a registry, a download cache and its hash records.

``lipsim.load("lipsim-margin-0.5")`` resolves a registered name to a file in the cache folder
(``$LIPSIM_CACHE``, else ``~/.cache/lipsim``), downloading it once from the authors' Google Drive
link through ``gdown`` (``pip install 'lipsim[download]'``; imported only when a download is
needed). The file's SHA-256 is recorded beside it (``NAME.sha256.json``) the first time it is
used, whether downloaded or put there by hand, and checked on every later load: a changed file is
a one-line :class:`~lipsim.errors.CheckpointError`. When a registry entry carries a known hash,
the file must match it from the first use on.

Without network access (or without gdown), asking for a name that is not cached fails with one
line that says which file to put where. ``$LIPSIM_MIRROR`` names a local folder holding the files
under their registry file names: it is used in place of the download (air-gapped machines, tests).

The files are the reference repository's published training checkpoints (torch pickles read with
weights-only unpickling by :func:`lipsim.checkpoints.load_published`; their layout is described
in :mod:`lipsim.modelfiles`). This module imports no torch: listing models and resolving cache
paths stay cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, one_line
from .fileio import atomic_write, write_text_atomic
from .modelfiles import PUBLISHED_OUT_DIM, is_torch_file

__all__ = [
    "PublishedModel",
    "PUBLISHED",
    "cache_dir",
    "is_published_name",
    "published",
    "fetch",
    "cached_models",
    "sha256_of",
]

#: where the authors list the checkpoints (README, section "Checkpoints")
SOURCE = "https://github.com/SaraGhazanfari/lipsim#checkpoints"


@dataclass(frozen=True)
class PublishedModel:
    """One published checkpoint: its name here, the file name in the cache, where it comes from.

    ``embedding``/``out_dim`` say how :func:`lipsim.checkpoints.load_published` reads it (the
    published networks normalise without the appended constant and keep the teacher's 1792
    features). ``sha256`` is the file's known hash when someone has recorded it, else None (the
    hash is then recorded on first use and checked from then on).
    """

    name: str
    filename: str
    drive_id: str | None
    description: str
    embedding: str = "plain"
    out_dim: int = PUBLISHED_OUT_DIM
    sha256: str | None = None

    @property
    def url(self) -> str | None:
        if self.drive_id is None:
            return None
        return f"https://drive.google.com/file/d/{self.drive_id}/view"

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "filename": self.filename,
            "url": self.url,
            "description": self.description,
            "embedding": self.embedding,
            "out_dim": self.out_dim,
            "sha256": self.sha256,
        }


# The links are those of the reference repository's README as of its last change (2024-02-26,
# when the two fine-tuned links were replaced). The file names follow the checkpoints' own naming
# (model.ckpt-{step}.pth, the fine-tuned ones with their margin), as third-party evaluations
# store them. No hashes have been published; they are recorded on first use.
PUBLISHED: dict[str, PublishedModel] = {
    m.name: m
    for m in (
        PublishedModel(
            "lipsim-pretrained",
            "model.ckpt-1.pth",
            "1Y39Wnpxq3ZS8JMRe6j-Yx7x3E_nardbv",
            "published LipSim 'small', distilled from the DreamSim ensemble on ImageNet (not fine-tuned)",
        ),
        PublishedModel(
            "lipsim-margin-0.2",
            "model.ckpt-435_margin=0.2.pth",
            "1OHRP0uwFrRJ6zXsPrCUDxlTjALa_690c",
            "published LipSim 'small', fine-tuned on NIGHT with hinge margin 0.2",
        ),
        PublishedModel(
            "lipsim-margin-0.5",
            "model.ckpt-435_margin=0.5.pth",
            "11JoY5jrm4qmk0QmncQ5eVqXQpXQNLG1X",
            "published LipSim 'small', fine-tuned on NIGHT with hinge margin 0.5 (the paper's main model)",
        ),
    )
}

#: a downloader takes (drive_id, output_path) and writes the file there; tests replace it
Downloader = Callable[[str, str], None]


def cache_dir() -> Path:
    """``$LIPSIM_CACHE`` if set, else ``~/.cache/lipsim`` (not created here)."""
    env = os.environ.get("LIPSIM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lipsim"


def is_published_name(source) -> bool:
    return isinstance(source, str) and source in PUBLISHED


def published(name: str) -> PublishedModel:
    try:
        return PUBLISHED[name]
    except KeyError:
        raise CheckpointError(
            f"unknown published model {name!r} (known: {', '.join(sorted(PUBLISHED))})"
        ) from None


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _read_record(path: Path) -> str | None:
    record = _record_path(path)
    if not record.exists():
        return None
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        value = data["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(
            f"{record}: unreadable hash record (delete it and {path.name} to download again)"
        ) from None
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise CheckpointError(
            f"{record}: not a SHA-256 hash record (delete it and {path.name} to download again)"
        )
    return value


def _write_record(path: Path, model: PublishedModel, digest: str, origin: str) -> None:
    payload = {"name": model.name, "file": path.name, "sha256": digest, "source": origin}
    write_text_atomic(_record_path(path), json.dumps(payload, indent=2) + "\n")


def _verify(path: Path, model: PublishedModel, origin: str) -> Path:
    """Checks ``path`` against its recorded (or known) hash, recording it on first use."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (delete it to download {model.name} again)")
    digest = sha256_of(path)
    expected = model.sha256 or _read_record(path)
    if expected is not None and digest != expected:
        raise CheckpointError(
            f"{path}: SHA-256 {digest[:16]}... differs from the recorded {expected[:16]}... "
            f"(the file changed; delete it and {_record_path(path).name} to download {model.name} again)"
        )
    if not _record_path(path).exists():
        _write_record(path, model, digest, origin)
    return path


def _gdown_download(drive_id: str, output: str) -> None:
    import gdown  # optional dependency: pip install 'lipsim[download]'

    result = gdown.download(id=drive_id, output=output, quiet=False)
    if result is None:  # older gdown releases return None instead of raising
        raise OSError("gdown could not retrieve the file")


def _by_hand(model: PublishedModel, path: Path, why: str) -> CheckpointError:
    where = f"download {model.url} " if model.url else "get the file "
    return CheckpointError(
        f"{model.name} is not in the cache and {why}: {where}and save it as {path} "
        f"(or set LIPSIM_CACHE / LIPSIM_MIRROR to a folder holding {model.filename})"
    )


def fetch(name: str, downloader: Downloader | None = None) -> Path:
    """The cached file of the published model ``name``, downloaded first if it is not there.

    The hash is recorded on first use and verified on every call. ``downloader`` (for tests)
    replaces gdown. Raises :class:`CheckpointError` with one line when the file cannot be had.
    """
    model = published(name)
    path = cache_dir() / model.filename
    if path.is_file():
        return _verify(path, model, "cache")
    mirror = os.environ.get("LIPSIM_MIRROR")
    if mirror:
        source = Path(mirror).expanduser() / model.filename
        if not source.is_file():
            raise _by_hand(model, path, f"LIPSIM_MIRROR ({mirror}) has no {model.filename}")
        fill: Callable[[str], None] = lambda tmp: shutil.copyfile(source, tmp)  # noqa: E731
        origin = str(source)
    else:
        if model.drive_id is None:
            raise _by_hand(model, path, "no download link is known for it")
        if downloader is None:
            try:
                import gdown  # noqa: F401
            except ImportError:
                raise _by_hand(
                    model, path, "gdown is not installed (pip install 'lipsim[download]')"
                ) from None
            downloader = _gdown_download
        fill = lambda tmp: downloader(model.drive_id, tmp)  # noqa: E731
        origin = model.url or ""

    def write(tmp: str) -> None:
        try:
            fill(tmp)
        except CheckpointError:
            raise
        except Exception as exc:  # gdown raises many types (requests, its own, OSError) when offline
            detail = one_line(exc, 100)
            raise _by_hand(model, path, f"the download failed ({detail})") from None
        if not Path(tmp).is_file() or Path(tmp).stat().st_size == 0 or not is_torch_file(Path(tmp)):
            raise _by_hand(model, path, "the download did not return a PyTorch checkpoint")

    atomic_write(path, write)
    return _verify(path, model, origin)


def cached_models() -> list[dict]:
    """The registry entries whose file is in the cache, with the file's size and recorded hash
    (nothing is hashed here: listing stays fast)."""
    out = []
    for model in PUBLISHED.values():
        path = cache_dir() / model.filename
        if path.is_file():
            try:
                recorded = _read_record(path)
            except CheckpointError:
                recorded = None
            out.append(
                {"name": model.name, "path": str(path), "bytes": path.stat().st_size, "sha256": recorded}
            )
    return out
