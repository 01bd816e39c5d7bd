"""Retrieval commands: index, search, dedup (thin wrappers over :mod:`lipsim.retrieval`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import CliError, add_model_args, emit, model_label, parse_eps_list, resolve_model

UNITS = "ℓ2 norm over the 224×224 RGB query with pixels in [0,1]"
UNITS_IMAGE = "ℓ2 norm over the 224×224 RGB image with pixels in [0,1]"


def _model_source(source: str | None) -> str:
    """What to record in the index so that `search` can find the same model again."""
    if source is None or source == "default" or source.startswith("arch:"):
        return source or "default"
    path = Path(source)
    return str(path.resolve()) if path.exists() else source


def _untrained(model) -> bool:
    return bool(getattr(model, "untrained", False))


def _report_skipped(skipped) -> None:
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s):", file=sys.stderr)
        for path, reason in skipped:
            print(f"  {path}: {reason}", file=sys.stderr)


def cmd_index(args) -> int:
    from lipsim.retrieval import index_folder

    if args.batch_size < 1 or args.chunk_size < 1 or args.workers < 0:
        raise CliError("--batch-size and --chunk-size must be ≥ 1, --workers ≥ 0")
    model = resolve_model(args.model, args.device)
    report = index_folder(
        args.dir,
        args.out,
        model,
        model_source=_model_source(args.model),
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        approximate=args.approximate,
        workers=args.workers,
        restart=args.restart,
        progress=False if args.no_progress else None,  # None: long runs on a terminal
    )
    index = report.index
    payload = {
        "index": str(report.out),
        "total": report.total,
        "added": report.added,
        "previously_indexed": report.previously_indexed,
        "reused_chunks": report.reused_chunks,
        "skipped": [{"path": p, "reason": r} for p, r in report.skipped],
        "model": index.identity.as_dict() if index.identity else None,
        "approximate": index.approximate,
        "untrained": _untrained(model),
    }
    mode = (
        "exact (certifiable)"
        if index.approximate is None
        else f"{index.approximate} (approximate, not certifiable)"
    )
    text = (
        f"indexed {report.added} new image(s) into {report.out}: {report.total} in total"
        + (
            f", {report.reused_chunks} chunk(s) reused from an interrupted run"
            if report.reused_chunks
            else ""
        )
        + f"\nmodel: {index.identity.short()}\nsearch: {mode}"
    )
    _report_skipped(report.skipped)
    emit(args, payload, text)
    return 0


def _load_index_and_model(index_path: str, source: str | None, device: str):
    from lipsim.retrieval import Index

    index = Index.load(index_path)
    source = source or index.info.get("model_source")
    model = resolve_model(source, device)
    index.attach(model)
    return index, model, source


def cmd_search(args) -> int:
    import lipsim

    if args.k < 1 or args.certify_k < 1:
        raise CliError("-k and --certify-k must be ≥ 1")
    if args.rerank is not None and args.rerank < 1:
        raise CliError("--rerank must be ≥ 1")
    index, model, source = _load_index_and_model(args.index, args.model, args.device)
    query = lipsim.load_image(args.query, size=model.input_size)
    exact = True if args.exact else None
    (result,) = index.search(query, k=args.k, certify_k=args.certify_k, exact=exact, rerank=args.rerank)
    payload = result.as_dict()
    payload.update(
        query=args.query,
        index=args.index,
        model=model_label(source),
        embedding=model.embedding,
        untrained=_untrained(model),
    )
    lines = [
        f"{i + 1:>3}. {d:.6f}  {p}"
        for i, (p, d) in enumerate(zip(result.paths, result.distances, strict=True))
    ]
    radius = result.certified_radius
    if radius is None:
        lines.append(f"certificate: none ({result.note})")
    elif radius == float("inf"):
        lines.append("certificate: the index holds one item; no perturbation can change the top-1")
    elif radius == 0:
        lines.append("certificate: none (the top-1 is tied with a rival: radius 0)")
    else:
        where = (
            "" if result.scope == "gallery" else f" among the {result.candidates} re-ranked candidates only"
        )
        lines.append(
            f"certificate: no perturbation of the query with norm below {radius:.5f} ({UNITS}) "
            f"changes the top-1{where}"
        )
    if _untrained(model):
        lines.append("note: this architecture has random, untrained weights: the numbers are not perceptual")
    emit(args, payload, "\n".join(lines))
    return 0


def cmd_dedup(args) -> int:
    from lipsim.retrieval import Index, embed_folder, find_near_duplicates

    eps = parse_eps_list(args.eps)[0]
    if not 0 < args.threshold < 2:
        raise CliError("--threshold must lie in (0, 2)")
    skipped: list = []
    if Index.is_index(args.dir):
        index = Index.load(args.dir)
        model = None
        if args.model is not None:
            model = resolve_model(args.model, args.device)
            index.attach(model)
        if index.identity is None:
            raise CliError(f"{args.dir}: index without a model identity; its distances cannot be certified")
        embedding = index.identity.embedding
        paths, emb, norms = index.paths, index.embeddings, index.norms
        skipped = [tuple(s) for s in index.info.get("skipped", [])]
        untrained = str(index.info.get("model_source", "")).startswith("arch:")
    else:
        if args.batch_size < 1 or args.workers < 0:
            raise CliError("--batch-size must be ≥ 1, --workers ≥ 0")
        model = resolve_model(args.model, args.device)
        found = embed_folder(
            args.dir,
            model,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=False if args.no_progress else None,
        )
        embedding = model.embedding
        paths, emb, norms, skipped = found.paths, found.embeddings, found.norms, found.skipped
        untrained = _untrained(model)
    result = find_near_duplicates(
        emb,
        paths,
        args.threshold,
        eps=eps,
        norms=norms if embedding == "plain" else None,
        max_pairs=args.max_pairs,
        embedding=embedding,
    )
    result.skipped = list(skipped)
    payload = result.as_dict()
    payload.update(embedding=embedding, untrained=untrained, grouping="connected components")
    _report_skipped(skipped)
    lines = [
        f"{result.n_images} image(s), threshold d < {args.threshold:g}: {len(result.groups)} group(s) "
        "of near duplicates (connected components)"
    ]
    for g, r in zip(result.groups, result.group_radii, strict=True):
        lines.append(f"group of {len(g)} (certified radius {r:.5f}):")
        lines += [f"    {p}" for p in g]
    below = [p for p in result.pairs if p.below]
    lines.append(
        f"{len(below)} pair(s) below the threshold; {len(result.pairs) - len(below)} near miss(es) listed"
    )
    for p in result.pairs:
        side = "<" if p.below else "≥"
        mark = "" if p.radius > eps else "   NOT certified at eps"
        lines.append(f"  d = {p.distance:.6f} {side} T  radius {p.radius:.5f}  {p.a} | {p.b}{mark}")
    lines.append(
        f"certificate: perturbing any one image by less than {result.certified_radius:.5f} ({UNITS_IMAGE}) "
        f"changes no verdict and no group (pairs farther than d = {result.reach:.4f} are certified beyond "
        f"eps = {eps:.4f} and not listed)"
    )
    if untrained:
        lines.append("note: this architecture has random, untrained weights: the numbers are not perceptual")
    emit(args, payload, "\n".join(lines))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="embed every image under DIR into a searchable index (resumable)")
    p.add_argument("dir", help="folder of images (searched recursively)")
    p.add_argument(
        "--out", required=True, metavar="INDEX", help="index directory to create, resume or extend"
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--chunk-size", type=int, default=512, help="images per on-disk chunk while building")
    p.add_argument(
        "--approximate",
        nargs="?",
        const="hnsw",
        choices=["hnsw"],
        default=None,
        help="also build an HNSW graph for very large collections (approximate: not certifiable)",
    )
    p.add_argument("--workers", type=int, default=2, help="threads decoding images (default 2; 0: none)")
    p.add_argument(
        "--restart", action="store_true", help="discard an unfinished build instead of resuming it"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_model_args(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="nearest images in an index, with a certified top-1 radius")
    p.add_argument("index", help="index directory made by 'lipsim index'")
    p.add_argument("query", help="query image (the certificate covers its perturbations)")
    p.add_argument("-k", type=int, default=5, help="results to show (default 5)")
    p.add_argument(
        "--certify-k",
        type=int,
        default=32,
        help="exact candidates the certificate examines (default 32; more: larger radius)",
    )
    p.add_argument("--exact", action="store_true", help="search an approximate index exactly (certifiable)")
    p.add_argument(
        "--rerank",
        type=int,
        default=None,
        metavar="R",
        help="approximate index: re-rank R candidates exactly; certifies the top-1 among them only",
    )
    add_model_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("dedup", help="groups of near-duplicate images, each verdict with a certified radius")
    p.add_argument("dir", help="folder of images, or an index directory")
    p.add_argument("--threshold", type=float, required=True, help="near duplicates: distance below this")
    p.add_argument(
        "--eps",
        default="36/255",
        help="ℓ2 budget of interest: every pair whose verdict is not certified beyond it is listed "
        "(default 36/255)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-pairs", type=int, default=1_000_000, help="refuse to list more pairs than this")
    p.add_argument("--no-progress", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_dedup)
