"""Core commands: distance, compare, models, verify (and matrix, from :mod:`lipsim.cli.batch`)."""

from __future__ import annotations

import argparse

from lipsim.certify import format_eps

from . import (
    CliError,
    add_engine_arg,
    add_model_args,
    emit,
    model_label,
    parse_eps_list,
    resolve_inference_model,
    resolve_model,
)
from .batch import add_batch_args, add_resize_arg
from .batch import register as register_batch

UNITS = "ℓ2 norm over the 224×224 RGB image with pixels in [0,1]"


def _untrained_note(model) -> str:
    return (
        "\nnote: this architecture has random, untrained weights: the numbers are not perceptual"
        if getattr(model, "untrained", False)
        else ""
    )


def cmd_distance(args) -> int:
    if args.pairs or args.out or len(args.images) != 2:
        from .batch import cmd_distance_many

        return cmd_distance_many(args)
    args.a, args.b = args.images
    eps = parse_eps_list(args.eps)[0]
    model, load_image = resolve_inference_model(args)
    a = load_image(args.a, size=model.input_size, resize=args.resize)
    b = load_image(args.b, size=model.input_size, resize=args.resize)
    d, lo, hi = model.distance_with_interval(a, b, eps)
    d = float(d[0])
    payload = {
        "distance": d,
        "a": args.a,
        "b": args.b,
        "model": model_label(args.model),
        "arch": model.arch,
        "embedding": model.embedding,
        "interval": {"eps": eps, "lo": float(lo[0]), "hi": float(hi[0])},
        "untrained": bool(getattr(model, "untrained", False)),
        "engine": model.engine,
    }
    text = (
        f"distance {d:.6f}   (1 - cosine of the embeddings: 0 = identical, 2 = opposite)\n"
        f"certificate: changing A by any perturbation of norm ≤ {format_eps(eps)} ({UNITS}) keeps the "
        f"distance within [{float(lo[0]):.6f}, {float(hi[0]):.6f}]" + _untrained_note(model)
    )
    emit(args, payload, text)
    return 0


def cmd_compare(args) -> int:
    model, load_image = resolve_inference_model(args)
    ref, a, b = (load_image(p, size=model.input_size, resize=args.resize) for p in (args.ref, args.a, args.b))
    cert = model.certify_2afc(ref, a, b)
    closer = {0: "A", 1: "B", -1: "tie"}[int(cert.closer[0])]
    radius = float(cert.radius[0])
    payload = {
        "closer": closer,
        "d_A": float(cert.d0[0]),
        "d_B": float(cert.d1[0]),
        "certified_radius": radius,
        "ref": args.ref,
        "a": args.a,
        "b": args.b,
        "model": model_label(args.model),
        "arch": model.arch,
        "embedding": model.embedding,
        "untrained": bool(getattr(model, "untrained", False)),
        "engine": model.engine,
    }
    if closer == "tie":
        verdict = "A and B are equally close to REF (tie): nothing is certified"
    else:
        verdict = (
            f"{closer} is closer to REF.\ncertificate: no perturbation of REF with norm below {radius:.4f} "
            f"({UNITS}) can change this answer"
        )
    text = (
        f"d(REF, A) = {float(cert.d0[0]):.6f}\nd(REF, B) = {float(cert.d1[0]):.6f}\n{verdict}"
        + _untrained_note(model)
    )
    emit(args, payload, text)
    return 0


def cmd_verify(args) -> int:
    import torch

    import lipsim
    from lipsim.verify import verify_model

    source = args.source
    if source in lipsim.list_archs():
        source = f"arch:{source}"
    model = resolve_model(source, args.device)
    images = None
    if args.images:
        images = torch.cat([lipsim.load_image(p, size=model.input_size) for p in args.images])
    if args.n_random < 0 or args.iters < 1:
        raise CliError("--n-random must be ≥ 0 and --iters ≥ 1")
    report = verify_model(model, images=images, n_random=max(args.n_random, 1), iters=args.iters)
    lines = [f"model {args.source}: arch {report.arch}, embedding {report.embedding}"]
    for layer in report.layers:
        est = "" if layer.estimate is None else f"  power-iteration {layer.estimate:.6f}"
        bound = "NO BOUND" if layer.bound is None else f"bound {layer.bound:g}"
        flag = "ok  " if layer.ok else "FAIL"
        lines.append(f"  {flag} {layer.name:<16} {layer.kind:<15} {bound}{est}")
    lines.append(
        f"embedding g: largest local Lipschitz estimate {report.max_embedding_estimate:.6f} "
        f"over {len(report.embedding_estimates)} image(s)"
    )
    lines += [f"note: {n}" for n in report.notes]
    lines.append(
        "verdict: PASS: every layer is provably 1-Lipschitz and no estimate exceeds 1"
        if report.passed
        else "verdict: FAIL: the Lipschitz chain is broken; certificates from this model are not valid"
    )
    emit(args, report.as_dict(), "\n".join(lines))
    return 0 if report.passed else 1


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def cmd_models(args) -> int:
    from lipsim import hub
    from lipsim.modelfiles import default_model_path

    default = default_model_path()
    packaged = []
    if default.exists():
        packaged.append({"name": "default", "path": str(default), "bytes": default.stat().st_size})
    cached = hub.cached_models()
    cached_names = {m["name"] for m in cached}
    downloadable = [dict(m.as_dict(), cached=m.name in cached_names) for m in hub.PUBLISHED.values()]
    payload = {
        "cache": str(hub.cache_dir()),
        "packaged": packaged,
        "cached": cached,
        "downloadable": downloadable,
    }
    lines = ["packaged:"]
    lines += [f"  {m['name']:<20} {m['path']} ({_megabytes(m['bytes'])})" for m in packaged] or ["  (none)"]
    lines.append(f"cached in {hub.cache_dir()} (LIPSIM_CACHE):")
    lines += [
        f"  {m['name']:<20} {m['path']} ({_megabytes(m['bytes'])}, sha256 "
        f"{(m['sha256'] or 'not yet recorded')[:16]})"
        for m in cached
    ] or ["  (none)"]
    lines.append(
        "downloadable (lipsim.load(NAME) or --model NAME downloads once; pip install 'lipsim[download]'):"
    )
    for m in downloadable:
        flag = " [cached]" if m["cached"] else ""
        lines.append(f"  {m['name']:<20} {m['description']}{flag}")
        lines.append(f"  {'':<20} {m['url'] or 'no known link'} -> {m['filename']}")
    emit(args, payload, "\n".join(lines))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distance",
        help="perceptual distance between two images (or one against many, or listed pairs), "
        "with certified intervals",
        description="lipsim distance A B: one distance. lipsim distance REF F1 F2 ...: REF against each "
        "file (CSV rows a,b,distance,lo,hi). lipsim distance --pairs P.csv: the listed pairs (columns a,b; "
        "relative paths are relative to P.csv). Every image is embedded once.",
    )
    p.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="A B, or REF FILE... (the interval covers perturbations of the first image of each pair)",
    )
    p.add_argument("--pairs", metavar="CSV", default=None, help="a CSV file of image pairs (columns a,b)")
    p.add_argument("--eps", default="36/255", help="ℓ2 budget for the distance interval (default 36/255)")
    add_batch_args(p)
    add_resize_arg(p)
    add_model_args(p)
    add_engine_arg(p)
    p.set_defaults(func=cmd_distance)

    p = sub.add_parser("compare", help="which of A and B is closer to REF, with a certified radius")
    p.add_argument("ref", help="reference image (the certificate covers its perturbations)")
    p.add_argument("a", help="candidate A")
    p.add_argument("b", help="candidate B")
    add_resize_arg(p)
    add_model_args(p)
    add_engine_arg(p)
    p.set_defaults(func=cmd_compare)

    register_batch(sub)

    p = sub.add_parser("models", help="list the packaged, cached and downloadable models")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("verify", help="check a model's Lipschitz chain and estimate its constant")
    p.add_argument("source", help="model file, 'default', or a registered architecture name")
    p.add_argument("--images", nargs="*", default=None, help="images to probe (default: random)")
    p.add_argument("--n-random", type=int, default=2, help="random probe images when --images is absent")
    p.add_argument("--iters", type=int, default=20, help="power-iteration steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)
