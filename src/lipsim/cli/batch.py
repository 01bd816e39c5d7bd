"""Many images at once: ``lipsim distance REF FILE...``, ``lipsim distance --pairs P.csv`` and
``lipsim matrix DIR [DIR2]``. Every image is loaded and embedded once, in batches (a progress bar
on a terminal for long runs); results are CSV or JSON (by the ``--out`` suffix, or ``--json``)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from lipsim import certify
from lipsim.batching import batch_slices

from . import (
    CliError,
    add_engine_arg,
    add_model_args,
    emit,
    model_label,
    parse_eps_list,
    resolve_inference_model,
)

#: lipsim.images.RESIZE_MODES, repeated so that building the parser does not import PIL (a test checks)
RESIZE_MODES = ("crop", "squash")

__all__ = [
    "read_pairs",
    "features_of_paths",
    "cmd_distance_many",
    "cmd_matrix",
    "add_resize_arg",
    "add_batch_args",
]


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """The (a, b) rows of a pairs file: two columns (more are ignored), an optional header row
    ``a,b``; relative image paths are relative to the pairs file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(
            f"{path}: cannot read the pairs file ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["a", "b"]:
        rows = rows[1:]
    pairs = []
    for number, row in enumerate(rows, 1):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise CliError(f"{path}: row {number} does not name two images (expected 'a,b' columns)")
        pairs.append((row[0].strip(), row[1].strip()))
    if not pairs:
        raise CliError(f"{path}: no pairs listed")
    return pairs


def _resolve(base: Path, name: str) -> str:
    p = Path(name)
    return str(p if p.is_absolute() else base / p)


def features_of_paths(model, load_image, paths: list[str], resize: str, batch_size: int, desc: str):
    """Backbone features (len(paths), k) of the image files, each loaded and run once."""
    chunks = []
    for s in batch_slices(len(paths), batch_size, progress=None, desc=desc):
        chunks.append(_numpy(model.features(load_image(paths[s], size=model.input_size, resize=resize))))
    return np.concatenate(chunks)


def _output_format(args) -> str:
    out = getattr(args, "out", None)
    if out:
        suffix = Path(out).suffix.lower()
        if suffix not in (".csv", ".json"):
            raise CliError(f"--out {out}: use a .csv or .json file name")
        return suffix[1:]
    return "json" if args.json else "csv"


def _write(args, fmt: str, payload: dict, csv_text: str, what: str) -> None:
    from lipsim.fileio import write_text_atomic

    text = json.dumps(payload, allow_nan=False) + "\n" if fmt == "json" else csv_text
    if args.out:
        write_text_atomic(args.out, text)
        emit(args, {"out": args.out, "format": fmt, **{k: payload[k] for k in ("model", "arch")}},
             f"wrote {what} to {args.out}")  # fmt: skip
    else:
        print(text, end="")


def _check(args) -> tuple[float | None, int]:
    eps = parse_eps_list(args.eps)[0] if args.eps is not None else None
    if args.batch_size < 1:
        raise CliError("--batch-size must be at least 1")
    return eps, args.batch_size


def _model_fields(args, model) -> dict:
    return {
        "model": model_label(args.model),
        "arch": model.arch,
        "embedding": model.embedding,
        "engine": model.engine,
        "resize": args.resize,
        "untrained": bool(getattr(model, "untrained", False)),
    }


def cmd_distance_many(args) -> int:
    """One reference against many files (``REF F1 F2 ...``) or the pairs of ``--pairs``."""
    if args.pairs and args.images:
        raise CliError("give either image files or --pairs, not both")
    if args.pairs:
        listed = read_pairs(args.pairs)
        base = Path(args.pairs).parent
        pairs = [(a, b, _resolve(base, a), _resolve(base, b)) for a, b in listed]
    elif len(args.images) >= 2:
        ref, *others = args.images
        pairs = [(ref, other, ref, other) for other in others]
    else:
        raise CliError("give two images (A B), a reference and files (REF FILE...), or --pairs P.csv")
    eps, _ = _check(args)
    model, load_image = resolve_inference_model(args)
    unique = list(dict.fromkeys(p for _, _, pa, pb in pairs for p in (pa, pb)))
    index = {p: i for i, p in enumerate(unique)}
    f = features_of_paths(model, load_image, unique, args.resize, args.batch_size, "embedding")
    ia = np.array([index[pa] for _, _, pa, _ in pairs])
    ib = np.array([index[pb] for _, _, _, pb in pairs])
    d, lo, hi = (_numpy(v) for v in certify.interval_from_features(f[ia], f[ib], eps, model.embedding))
    rows = [
        {"a": a, "b": b, "distance": float(d[k]), "lo": float(lo[k]), "hi": float(hi[k])}
        for k, (a, b, _, _) in enumerate(pairs)
    ]
    payload = {**_model_fields(args, model), "eps": eps, "pairs": rows}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["a", "b", "distance", f"lo@{eps:.6g}", f"hi@{eps:.6g}"])
    for r in rows:
        writer.writerow([r["a"], r["b"], f"{r['distance']:.6f}", f"{r['lo']:.6f}", f"{r['hi']:.6f}"])
    _write(args, _output_format(args), payload, buf.getvalue(), f"{len(rows)} distances")
    return 0


def _list_folder(folder: str) -> list[str]:
    from lipsim.data.folders import list_images

    names = list_images(folder)
    if not names:
        raise CliError(f"{folder}: no image files found")
    return names


def cmd_matrix(args) -> int:
    eps, batch_size = _check(args)
    fmt = _output_format(args)
    if eps is not None and fmt == "csv":
        raise CliError("--eps adds interval matrices, which need JSON output (--out D.json or --json)")
    rows = _list_folder(args.dir)
    cols = rows if args.dir2 is None else _list_folder(args.dir2)
    model, load_image = resolve_inference_model(args)
    fx = features_of_paths(
        model, load_image, [str(Path(args.dir) / r) for r in rows], args.resize, batch_size, "embedding"
    )
    fy = fx
    if args.dir2 is not None:
        fy = features_of_paths(
            model, load_image, [str(Path(args.dir2) / c) for c in cols], args.resize, batch_size, "embedding"
        )
    result = certify.pairwise_from_features(fx, fy, model.embedding, eps)
    d, lo, hi = (result, None, None) if eps is None else result
    d = _numpy(d)
    payload = {
        **_model_fields(args, model),
        "rows": rows,
        "cols": cols,
        "row_dir": args.dir,
        "col_dir": args.dir if args.dir2 is None else args.dir2,
        "distance": [[float(v) for v in line] for line in d],
    }
    if eps is not None:
        payload.update(
            eps=eps,
            lo=[[float(v) for v in line] for line in _numpy(lo)],
            hi=[[float(v) for v in line] for line in _numpy(hi)],
        )
    csv_text = ""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["", *cols])
        for name, line in zip(rows, d, strict=True):
            writer.writerow([name, *(f"{v:.6f}" for v in line)])
        csv_text = buf.getvalue()
    _write(args, fmt, payload, csv_text, f"a {len(rows)} x {len(cols)} distance matrix")
    return 0


def add_resize_arg(p) -> None:
    p.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        default="crop",
        help="how images become 224x224: crop (default: shorter side to 224, centre square, aspect kept) "
        "or squash (both sides to 224, aspect changed)",
    )


def add_batch_args(p) -> None:
    p.add_argument(
        "--out",
        metavar="FILE",
        default=None,
        help="write the results to FILE (.csv or .json) instead of stdout",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")


def register(sub) -> None:
    p = sub.add_parser(
        "matrix",
        help="distance matrix of the images in a folder (or between two folders), CSV or JSON",
        description="Embeds every image of DIR (and DIR2) once and writes D[i, j] = d(row i, column j). "
        "Without DIR2 the matrix is DIR against itself.",
    )
    p.add_argument("dir", metavar="DIR", help="folder of images (rows), searched recursively")
    p.add_argument("dir2", metavar="DIR2", nargs="?", default=None, help="folder of images (columns)")
    p.add_argument(
        "--eps",
        default=None,
        help="also write certified intervals for perturbations of the row images of this ℓ2 norm (JSON only)",
    )
    add_batch_args(p)
    add_resize_arg(p)
    add_model_args(p)
    add_engine_arg(p)
    p.set_defaults(func=cmd_matrix)
