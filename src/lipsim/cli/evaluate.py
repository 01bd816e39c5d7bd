"""Evaluation commands: ``eval``, ``attack``, ``attack-distance`` (thin: parse, call, print)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from ..fileio import write_text_atomic
from . import CliError, add_model_args, emit, model_label, parse_eps_list, resolve_model

DEFAULT_EPS_TEXT = "36/255,72/255,108/255"
UNITS = "ℓ2 over the 224×224 RGB input with pixels in [0,1]"
#: exit status when an attack beats a certificate or the distance bound fails (a bug, not a result)
EXIT_SOUNDNESS = 4


def _progress(args):
    if getattr(args, "no_progress", False):
        return None
    from tqdm import tqdm

    def wrap(iterable, total):
        return tqdm(iterable, total=total, file=sys.stderr, unit="batch", leave=False, dynamic_ncols=True)

    return wrap


def _metric(args):
    from lipsim.evaluate.metrics import LipSimMetric, get_metric

    spec = (args.metric or "lipsim").strip()
    if spec == "lipsim":
        return LipSimMetric(resolve_model(args.model, args.device))
    return get_metric(spec, model_source=args.model, device=args.device)


def _label(args, metric) -> str:
    return model_label(args.model) if metric.name == "lipsim" else metric.name


def _single_eps(text: str) -> float:
    values = parse_eps_list(text)
    if len(values) != 1 or values[0] <= 0:
        raise CliError(f"--eps takes one positive value (e.g. 36/255 or 0.5), got {text!r}")
    return values[0]


def _out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


# -- eval -------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from lipsim.evaluate import report
    from lipsim.evaluate.twoafc import DEFAULT_SPLITS, open_2afc, run_2afc, summarize

    eps = parse_eps_list(args.eps)
    metric = _metric(args)
    split = args.split or DEFAULT_SPLITS[args.dataset]
    data = open_2afc(args.dataset, args.data_dir, split, limit=args.limit, size=metric.input_size or 224)
    res = run_2afc(metric, data, batch_size=args.batch_size, progress=_progress(args), workers=args.workers)
    summary = summarize(res, eps, dataset=args.dataset)
    payload = {"dataset": args.dataset, "split": split, **summary, "eps": eps, "model": _label(args, metric)}
    payload.update(metric.describe())
    payload["limit"] = args.limit
    payload["data_dir"] = str(args.data_dir)
    payload["caveats"] = report.data_caveats(payload)
    text = report.eval_table(payload)
    if payload["caveats"]:
        text += "\n" + "\n".join(f"note: {c}" for c in payload["caveats"])
    if args.out:
        out = _out_dir(args.out)
        write_text_atomic(out / "results.json", json.dumps(payload, indent=2, default=float) + "\n")
        table = io.StringIO()
        rows = res.rows()
        writer = csv.DictWriter(table, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(out / "per_triplet.csv", table.getvalue())
        write_text_atomic(out / "summary.md", report.eval_summary_markdown(payload))
        written = ["results.json", "per_triplet.csv", "summary.md"]
        if res.radius is not None:
            title = f"{args.dataset.upper()} {split}: certified 2AFC score, metric {payload['model']}"
            report.plot_certified(res.scores, res.radius, eps, out / "certified.png", title, res.groups)
            written.append("certified.png")
        text += f"\nwrote {', '.join(written)} to {out}"
    emit(args, payload, text)
    return 0


# -- attack -----------------------------------------------------------------------------------------
def cmd_attack(args) -> int:
    from lipsim.evaluate import report
    from lipsim.evaluate.attack_eval import run_attack
    from lipsim.evaluate.attacks import AttackSettings
    from lipsim.evaluate.twoafc import DEFAULT_SPLITS, open_2afc

    eps = _single_eps(args.eps)
    settings = AttackSettings(
        args.attack, args.norm, eps, steps=args.steps, step_size=args.step_size, seed=args.seed
    )
    metric = _metric(args)
    split = args.split or DEFAULT_SPLITS[args.dataset]
    data = open_2afc(args.dataset, args.data_dir, split, limit=args.limit, size=metric.input_size or 224)
    result = run_attack(metric, data, settings, batch_size=args.batch_size, progress=_progress(args))
    payload = {"dataset": args.dataset, "split": split, **result, "model": _label(args, metric)}
    payload.update({k: v for k, v in metric.describe().items() if k != "metric"})
    payload["limit"] = args.limit
    text = report.attack_text(payload)
    emit(args, payload, text)
    if payload.get("violations") or payload.get("violations_measured_norm"):
        first = payload["violation_details"][0]
        print(
            f"lipsim attack: SOUNDNESS BUG: {payload['violations']} certified answer(s) changed "
            "by the attack "
            f"(e.g. triplet {first['id']}: radius {first['radius']:.6g} > ‖δ‖₂ {first['delta_l2']:.6g}); "
            "this is not a result to report",
            file=sys.stderr,
        )
        return EXIT_SOUNDNESS
    return 0


# -- attack-distance --------------------------------------------------------------------------------
def _image_batches(paths, size: int, batch_size: int):
    import torch

    import lipsim

    for start in range(0, len(paths), batch_size):
        yield torch.cat([lipsim.load_image(p, size=size) for p in paths[start : start + batch_size]])


def _list_images(folder: str, limit: int | None) -> list[Path]:
    from lipsim.images import IMAGE_EXTENSIONS

    root = Path(folder)
    if not root.is_dir():
        raise CliError(f"--images {root}: not a folder")
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not paths:
        raise CliError(f"--images {root}: no image files found")
    if limit is not None:
        if limit < 1:
            raise CliError("--limit must be at least 1")
        paths = paths[:limit]
    return paths


def _stats(values) -> dict:
    import torch

    v = values.double()
    return {
        "n": int(v.numel()),
        "mean": float(v.mean()),
        "median": float(v.median()),
        "min": float(v.min()),
        "p90": float(torch.quantile(v, 0.9)),
        "max": float(v.max()),
    }


def cmd_attack_distance(args) -> int:
    from lipsim.evaluate import report
    from lipsim.evaluate.distance_attack import BOUND_SLACK, attack_distances
    from lipsim.evaluate.metrics import LipSimMetric, get_metric

    eps = _single_eps(args.eps)
    if args.steps < 1:
        raise CliError("--steps must be at least 1")
    if args.batch_size < 1:
        raise CliError("--batch-size must be at least 1")
    paths = _list_images(args.images, args.limit)
    metrics = [_metric(args)]
    if args.compare:
        metrics.append(get_metric(args.compare, model_source=args.model, device=args.device))
    runs = {}
    for metric in metrics:
        if metric.name in runs:
            metric.name = f"{metric.name} (compare)"
        size = metric.input_size or 224
        n_batches = (len(paths) + args.batch_size - 1) // args.batch_size
        runs[metric.name] = (
            metric,
            attack_distances(
                metric,
                _image_batches(paths, size, args.batch_size),
                eps,
                steps=args.steps,
                step_size=args.step_size,
                seed=args.seed,
                progress=_progress(args),
                total=n_batches,
            ),
        )
    main_metric, main = runs[metrics[0].name]
    payload = {"images": len(paths), "eps": eps, "steps": args.steps, "metrics": {}}
    lines = [
        f"ℓ2-PGD maximising d(x, x+δ) over ‖δ‖₂ ≤ {report.format_eps(eps)} ({UNITS}), {args.steps} steps, "
        f"{len(paths)} image(s)",
        f"{'metric':<26} {'mean':>10} {'median':>10} {'p90':>10} {'max':>10}",
    ]
    for name, (metric, r) in runs.items():
        stats = _stats(r.distances)
        payload["metrics"][name] = {
            **stats,
            "values": [float(v) for v in r.distances],
            "max_delta_l2": float(r.delta_l2.max()),
            "n_projected": r.n_projected,
            **({} if name != main_metric.name else {"model": _label(args, metric)}),
        }
        lines.append(
            f"{name:<26} {stats['mean']:>10.4g} {stats['median']:>10.4g} "
            f"{stats['p90']:>10.4g} {stats['max']:>10.4g}"
        )
    payload["metric"] = main_metric.name
    held = main.bound_held
    bound_value = None
    bound_label = "bound ½ε²"
    if main.bounds is None:
        payload.update({"bound": None, "bound_held": None})
        lines.append(f"no proven bound for {main_metric.name} (only LipSim models have one)")
    else:
        append = isinstance(main_metric, LipSimMetric) and main_metric.model.embedding == "append"
        bound_value = float(main.bounds.max())
        if append:
            kind = "½ρ(ε)² per image (1-Lipschitz g, ρ = ε/√(max(‖f(x)‖−ε,0)²+1) ≤ ε); largest"
        else:
            kind = "½ρ(ε)² per image (plain embedding, norm-aware movement bound); largest"
        bound_label = "largest bound ½ρ(ε)² (≤ ½ε²)" if append else "largest bound ½ρ²"
        worst = float((main.distances - main.bounds).max())
        payload.update(
            {
                "bound": bound_value,
                "bound_kind": "half_rho_squared",
                "bound_half_eps_squared": 0.5 * eps**2 if append else None,
                "bound_slack": BOUND_SLACK,
                "bound_held": held,
                "max_excess_over_bound": worst,
            }
        )
        verdict = "HELD" if held else "VIOLATED"
        lines.append(
            f"bound for {main_metric.name}: d(x, x+δ) ≤ {kind} = {bound_value:.6g} "
            f"(+{BOUND_SLACK:g} float slack): "
            f"{verdict} (max reached {float(main.distances.max()):.6g})"
        )
    if args.out:
        out = _out_dir(args.out)
        series = {name: r.distances for name, (_, r) in runs.items()}
        hist = report.plot_distance_histogram(
            series, eps, bound_value, out / "distance_hist.png", bound_label
        )
        payload["histogram"] = str(hist)
        write_text_atomic(out / "distances.json", json.dumps(payload, indent=2) + "\n")
        lines.append(f"wrote {hist.name}, distances.json to {out}")
    emit(args, payload, "\n".join(lines))
    if held is False:
        print(
            "lipsim attack-distance: the proven bound was exceeded by "
            f"{payload['max_excess_over_bound']:.3g} "
            "(a soundness bug)",
            file=sys.stderr,
        )
        return EXIT_SOUNDNESS
    return 0


# -- registration -----------------------------------------------------------------------------------
def _metric_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metric",
        default="lipsim",
        help="lipsim (the --model), lipsim:SOURCE, teacher:NAME, l2, ssim, lpips[:NET], dreamsim[:TYPE]",
    )


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", choices=("night", "bapps"), help="dataset layout")
    p.add_argument(
        "--data-dir", required=True, help="NIGHT: the folder with data.csv; BAPPS: the 2afc folder or above"
    )
    p.add_argument(
        "--split",
        default=None,
        help="NIGHT: test (default), val, train, test_imagenet, test_no_imagenet; "
        "BAPPS: val (default) or train",
    )
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N triplets")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="natural and certified 2AFC scores on NIGHT or BAPPS")
    _data_args(p)
    p.add_argument(
        "--eps",
        default=DEFAULT_EPS_TEXT,
        help=f"certified radii, comma-separated ({UNITS}); default {DEFAULT_EPS_TEXT}",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write results.json, per_triplet.csv, summary.md, certified.png",
    )
    _metric_arg(p)
    add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "attack", help="attack the reference images (torchattacks) and compare with certificates"
    )
    _data_args(p)
    p.add_argument("--attack", required=True, choices=("apgd-ce", "pgd", "mifgsm", "square"))
    p.add_argument("--norm", required=True, choices=("l2", "linf"))
    p.add_argument(
        "--eps", required=True, help="budget in [0,1] pixel units (ℓ2 norm or ℓ∞ bound), e.g. 0.5 or 4/255"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="iterations (Square: queries); default as the reference "
        "harness: apgd-ce 100, pgd 1000 (l2) / 50 (linf), mifgsm 100, square 5000",
    )
    p.add_argument(
        "--step-size",
        type=float,
        default=None,
        help="step of pgd (default 0.01, the reference harness's) and mifgsm (default 2.5·ε/steps, "
        "so that it can reach ε; a step with steps × step < ε is reported)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    _metric_arg(p)
    add_model_args(p)
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser(
        "attack-distance", help="how far ℓ2-PGD can push d(x, x+δ) under ‖δ‖₂ ≤ ε (LipSim: ≤ ½ρ(ε)² ≤ ½ε²)"
    )
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--eps", required=True, help=f"ℓ2 budget ({UNITS}), e.g. 36/255")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--step-size", type=float, default=None, help="PGD step (default 2.5·ε/steps)")
    p.add_argument(
        "--limit", type=int, default=None, metavar="N", help="only the first N images (sorted by path)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="DIR", help="write distance_hist.png and distances.json")
    p.add_argument(
        "--compare",
        default=None,
        metavar="METRIC",
        help="a second metric to attack, e.g. teacher:mobilenet_v2",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _metric_arg(p)
    add_model_args(p)
    p.set_defaults(func=cmd_attack_distance)
