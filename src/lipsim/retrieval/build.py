"""Embedding a folder of images into an index, resumably.

``index_folder`` walks a directory (recursively, sorted, hidden entries skipped), embeds every
file with an image extension through :func:`lipsim.load_image` in batches and writes the
embeddings in chunks under ``OUT/partial/``: each chunk is a ``.npy`` pair plus a JSON record
written last, so a chunk either exists completely or not at all. A rerun after an interruption
reuses every finished chunk and embeds only what is missing (at most one chunk is redone).
When all files are done the chunks are merged into the index directory and ``partial/`` is
removed. Running it again on a finished index adds the files that are new since. Files that
cannot be decoded are skipped and reported by path with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..batching import progress_bar
from ..errors import LipSimError, one_line
from ..fileio import write_npy_atomic, write_text_atomic
from ..images import IMAGE_EXTENSIONS, load_image
from .identity import ModelIdentity
from .index import Index, IndexFormatError, embed_images
from .store import UNIT_TOL, first_line, is_pairs

__all__ = ["list_images", "index_folder", "embed_folder", "BuildReport", "FolderEmbeddings"]

PARTIAL = "partial"


def list_images(root, exclude: Path | None = None) -> list[str]:
    """Relative POSIX paths of the image files under ``root`` (recursive, sorted; entries whose
    name starts with '.' and anything inside ``exclude`` are left out)."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory")
    exclude = exclude.resolve() if exclude is not None else None
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and (exclude is None or (here / d).resolve() != exclude)
        )
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            out.append((here / name).relative_to(root).as_posix())
    return sorted(out)


def _batches(
    root: Path, rels: list[str], size: int, batch_size: int, workers: int
) -> Iterator[tuple[list[str], torch.Tensor | None, list[tuple[str, str]]]]:
    """Yields (paths that loaded, their images stacked, [(path, reason) for those that did not])."""

    def load(rel: str):
        try:
            return load_image(root / rel, size=size), None
        except (LipSimError, ValueError, OSError) as exc:
            msg = one_line(exc, limit=10_000)
            prefix = f"{root / rel}: "
            return None, msg[len(prefix) :] if msg.startswith(prefix) else msg

    pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
    try:
        for start in range(0, len(rels), batch_size):
            part = rels[start : start + batch_size]
            results = list(pool.map(load, part)) if pool else [load(r) for r in part]
            ok = [(r, img) for r, (img, err) in zip(part, results, strict=True) if img is not None]
            bad = [(r, err) for r, (img, err) in zip(part, results, strict=True) if img is None]
            images = torch.cat([img for _, img in ok]) if ok else None
            yield [r for r, _ in ok], images, bad
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _embed_checked(model, paths: list[str], images: torch.Tensor, batch_size: int):
    """Embeds a batch; images whose embedding is not a unit vector (a plain-mode model whose
    features vanish: g = f/‖f‖ is then undefined) are reported as skipped, not indexed."""
    emb, norms = embed_images(model, images, batch_size)
    unit = np.abs(np.linalg.norm(emb.astype(np.float64), axis=1) - 1.0) <= UNIT_TOL
    if unit.all():
        return paths, emb, norms, []
    bad = [
        (p, "the model's features vanish for this image: no direction to compare")
        for p, u in zip(paths, unit, strict=True)
        if not u
    ]
    keep = [p for p, u in zip(paths, unit, strict=True) if u]
    return keep, emb[unit], norms[unit], bad


def _progress(total: int, enabled: bool | None, desc: str):
    """:func:`lipsim.batching.progress_bar`: ``None`` shows it for long runs on a terminal only."""
    return progress_bar(total, enabled, desc)


@dataclass
class FolderEmbeddings:
    """Embeddings of a folder held in memory (:func:`embed_folder`)."""

    paths: list[str]
    embeddings: np.ndarray
    norms: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)


def embed_folder(
    root, model, *, batch_size: int = 32, workers: int = 0, progress: bool | None = False
) -> FolderEmbeddings:
    """Embeds every image under ``root`` in memory (no index, no resume)."""
    root = Path(root)
    rels = list_images(root)
    paths, embs, norms, skipped = [], [], [], []
    with _progress(len(rels), progress, "embedding") as bar:
        for ok, images, bad in _batches(root, rels, model.input_size, batch_size, workers):
            if images is not None:
                ok, e, n, degenerate = _embed_checked(model, ok, images, batch_size)
                bad = bad + degenerate
                paths += ok
                embs.append(e)
                norms.append(n)
            skipped += bad
            bar.update(len(ok) + len(bad))
    emb = np.concatenate(embs) if embs else np.zeros((0, model.embed_dim), np.float32)
    nrm = np.concatenate(norms) if norms else np.zeros((0,), np.float32)
    return FolderEmbeddings(paths, emb, nrm, skipped)


@dataclass
class BuildReport:
    """What :func:`index_folder` did."""

    out: Path
    total: int
    added: int
    reused_chunks: int
    previously_indexed: int
    skipped: list[tuple[str, str]]
    index: Index


def _read_chunks(partial: Path, identity: ModelIdentity, root: Path) -> list[dict]:
    """Finished chunk records of an interrupted build, after checking it is the same build."""
    manifest = partial / "manifest.json"
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
        built_by = ModelIdentity.from_dict(info["model"])
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        raise IndexFormatError(
            f"{partial}: an unfinished build without a readable manifest; remove it or pass --restart"
        ) from None
    built_by.check(identity, what=f"the unfinished build in {partial}")
    if info.get("root") != str(root):
        raise IndexFormatError(
            f"{partial}: an unfinished build of another folder ({info.get('root')}); --restart discards it"
        )
    records = []
    for rec_path in sorted(partial.glob("chunk-*.json")):
        try:
            rec = json.loads(rec_path.read_text(encoding="utf-8"))
            ok = isinstance(rec, dict) and is_pairs(rec.get("skipped"))
            ok = ok and isinstance(rec.get("paths"), list) and all(isinstance(p, str) for p in rec["paths"])
        except (OSError, ValueError, RecursionError):
            ok = False
        if not ok:
            raise IndexFormatError(
                f"{rec_path}: a damaged chunk of an unfinished build; --restart discards it"
            )
        stem = rec_path.name[: -len(".json")]
        rec["emb"] = partial / f"{stem}.emb.npy"
        rec["norms"] = partial / f"{stem}.norms.npy"
        rec["number"] = int(stem.split("-")[1])
        records.append(rec)
    return records


def index_folder(
    root,
    out,
    model,
    *,
    model_source: str | None = None,
    batch_size: int = 32,
    chunk_size: int = 512,
    approximate: str | None = None,
    workers: int = 0,
    restart: bool = False,
    progress: bool | None = False,
    on_chunk: Callable[[int], None] | None = None,
) -> BuildReport:
    """Embeds the images under ``root`` into the index directory ``out`` (module docstring).

    ``approximate``: "hnsw" to also build an (uncertifiable) HNSW graph; ``None`` keeps what an
    existing index has. ``restart`` discards an unfinished build. ``on_chunk(n_done)`` is called
    after each chunk is safely on disk.
    """
    root = Path(root).resolve()
    out = Path(out)
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch size and chunk size must be positive")
    identity = ModelIdentity.of(model)
    rels = list_images(root, exclude=out)
    existing = None
    if Index.is_index(out):
        try:
            existing = Index.load(out)
            if existing.approximate and len(existing):
                existing.build()  # reads and checks the stored graph now, not after embedding
        except IndexFormatError as exc:
            if not restart:
                raise IndexFormatError(f"{exc}; --restart rebuilds the index from the images") from None
            existing = None  # damaged: rebuilt from the images, its files replaced when saving
    if existing is not None:
        if existing.identity is None:
            raise IndexFormatError(f"{out}: holds embeddings of an unknown model; cannot add to it")
        existing.identity.check(identity, what=f"the index in {out}")
        if existing.info.get("root") not in (None, str(root)):
            raise IndexFormatError(
                f"{out}: indexes another folder ({existing.info.get('root')}); choose another --out"
            )
    elif out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    partial = out / PARTIAL
    if restart and partial.exists():
        shutil.rmtree(partial)
    records = _read_chunks(partial, identity, root) if partial.is_dir() else []
    done = set(existing.paths) if existing is not None else set()
    # chunks already merged by a save that was interrupted before it removed partial/
    records = [rec for rec in records if not (rec["paths"] and set(rec["paths"]) <= done)]
    skipped_before: list[tuple[str, str]] = []
    for rec in records:
        done.update(rec["paths"])
        skipped_before += [tuple(s) for s in rec["skipped"]]
    done.update(p for p, _ in skipped_before)
    todo = [r for r in rels if r not in done]
    if not partial.is_dir():
        partial.mkdir(parents=True)
        manifest = {"model": identity.as_dict(), "root": str(root)}
        write_text_atomic(partial / "manifest.json", json.dumps(manifest))

    number = max((rec["number"] for rec in records), default=-1) + 1
    buf_paths: list[str] = []
    buf_emb: list[np.ndarray] = []
    buf_norms: list[np.ndarray] = []
    buf_skipped: list[tuple[str, str]] = []
    new_records: list[dict] = []

    def flush():
        nonlocal number
        if not buf_paths and not buf_skipped:
            return
        stem = f"chunk-{number:06d}"
        emb = np.concatenate(buf_emb) if buf_emb else np.zeros((0, identity.dim), np.float32)
        nrm = np.concatenate(buf_norms) if buf_norms else np.zeros((0,), np.float32)
        write_npy_atomic(partial / f"{stem}.emb.npy", emb)
        write_npy_atomic(partial / f"{stem}.norms.npy", nrm)
        rec = {"paths": list(buf_paths), "skipped": [list(s) for s in buf_skipped]}
        write_text_atomic(partial / f"{stem}.json", json.dumps(rec, ensure_ascii=False))
        rec.update(emb=partial / f"{stem}.emb.npy", norms=partial / f"{stem}.norms.npy", number=number)
        new_records.append(rec)
        number += 1
        buf_paths.clear(), buf_emb.clear(), buf_norms.clear(), buf_skipped.clear()
        if on_chunk is not None:
            on_chunk(len(new_records))

    with _progress(len(todo), progress, "indexing") as bar:
        for ok, images, bad in _batches(root, todo, model.input_size, batch_size, workers):
            if images is not None:
                ok, e, n, degenerate = _embed_checked(model, ok, images, batch_size)
                bad = bad + degenerate
                buf_paths.extend(ok)
                buf_emb.append(e)
                buf_norms.append(n)
            buf_skipped.extend(bad)
            bar.update(len(ok) + len(bad))
            if len(buf_paths) + len(buf_skipped) >= chunk_size:
                flush()
        flush()

    all_records = records + new_records
    n_before = 0 if existing is None else len(existing)
    if existing is not None:
        index = existing
        if approximate is not None:
            index.approximate = approximate
    else:
        index = Index(identity=identity, dim=identity.dim, approximate=approximate)
    for rec in all_records:
        try:
            emb = np.load(rec["emb"], mmap_mode="r", allow_pickle=False)
            nrm = np.load(rec["norms"], allow_pickle=False)
            index.append(np.asarray(emb), nrm, rec["paths"])  # checks shapes, unit rows, norms
        except MemoryError:
            raise
        except Exception as exc:  # numpy raises many kinds for damaged files
            raise IndexFormatError(
                f"{rec['emb']}: a damaged chunk of an unfinished build ({first_line(exc)}); "
                "--restart discards it"
            ) from None
    skipped = skipped_before + [tuple(s) for rec in new_records for s in rec["skipped"]]
    previous = list(index.info.get("skipped", [])) if existing is not None else []
    now_indexed = set(index.paths)
    merged = {p: why for p, why in previous if p not in now_indexed and (root / p).exists()}
    merged.update({p: why for p, why in skipped})
    index.info.update(root=str(root), skipped=sorted([p, why] for p, why in merged.items()))
    if model_source is not None:
        index.info["model_source"] = model_source
    index.save(out)
    shutil.rmtree(partial, ignore_errors=True)
    added = sum(len(rec["paths"]) for rec in all_records)
    return BuildReport(
        out=out,
        total=len(index),
        added=added,
        reused_chunks=len(records),
        previously_indexed=n_before,
        skipped=sorted(merged.items()),
        index=index,
    )
