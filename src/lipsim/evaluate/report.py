"""Human-readable reports and plots of evaluation results (text, Markdown, PNG).

Pure formatting: functions take the result dicts of :mod:`lipsim.evaluate` and return strings or
write image files; nothing here prints. Plots use matplotlib's object API with the Agg canvas,
so no global backend or pyplot state is touched.

Published numbers (docs/method.md §9) are stored in :data:`PUBLISHED` with their source tag;
only values that were actually seen are listed (the paper's own tables were not available).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..certify import format_eps
from ..fileio import atomic_write
from . import scoring

__all__ = [
    "PUBLISHED",
    "NIGHT_TEST_APPROX_N",
    "BAPPS_VAL_APPROX_N",
    "format_eps",
    "pct",
    "eval_table",
    "data_caveats",
    "eval_summary_markdown",
    "attack_text",
    "plot_certified",
    "plot_distance_histogram",
]

#: ≈10 % of NIGHT's ≈20k unanimous triplets (exact count not in our sources: read it from data.csv)
NIGHT_TEST_APPROX_N = 2000
#: BAPPS 2AFC val triplets per category (docs/method.md §8.2, rounded there)
BAPPS_VAL_APPROX_N = {
    "traditional": 4700,
    "cnn": 4700,
    "superres": 10900,
    "deblur": 9400,
    "color": 4700,
    "frameinterp": 1900,
}

PUBLISHED = {
    "night": [
        # (source, metric, what, value in %)
        ("[RB] LipSim rebuttal", "LipSim", "natural 2AFC (NIGHT)", 86.55),
        ("[RB] LipSim rebuttal", "DreamSim", "natural 2AFC (NIGHT)", 96.16),
        ("[FC] Croce et al.", "LipSim pretrained (official ckpt)", "clean 2AFC, NIGHT test", 86.6),
        ("[FC] Croce et al.", "LipSim margin 0.2 (official ckpt)", "clean 2AFC, NIGHT test", 88.5),
        ("[FC] Croce et al.", "LipSim margin 0.5 (official ckpt)", "clean 2AFC, NIGHT test", 85.1),
        ("[FC] Croce et al.", "LipSim margin 0.5 (official ckpt)", "APGD ℓ∞ 4/255", 32.8),
        ("[FC] Croce et al.", "LipSim margin 0.5 (official ckpt)", "APGD ℓ2 3.0", 53.1),
        ("[FC] Croce et al.", "R-LPIPS", "clean 2AFC, NIGHT test", 71.6),
        ("[DS] DreamSim README", "DreamSim ensemble (v0.2)", "2AFC, NIGHT test", 96.2),
    ],
    "bapps": [
        ("[RB] LipSim rebuttal", "DreamSim", "natural 2AFC (BAPPS val)", 78.47),
        ("[RB] LipSim rebuttal", "LipSim margin 0.2", "natural 2AFC (BAPPS val)", 73.47),
        ("[RB] LipSim rebuttal", "LipSim margin 0.4", "natural 2AFC (BAPPS val)", 74.31),
        ("[RB] LipSim rebuttal", "LipSim margin 0.5", "natural 2AFC (BAPPS val)", 74.29),
    ],
}
#: what the source tags of :data:`PUBLISHED` stand for (summary.md lists the ones it uses)
SOURCES = {
    "[RB]": "the LipSim authors' ICLR 2024 rebuttal (rebuttal.md in the LipSim repository, since deleted)",
    "[FC]": "Croce et al., fra31/perceptual-metrics: a third-party evaluation of the official LipSim "
    "checkpoints",
    "[DS]": "the DreamSim README (ssundaram21/dreamsim)",
}
#: [RB] certified BAPPS (traditional + cnn), ε in the reference's [-1, 1] units: 36, 72, 108 /255
PUBLISHED_BAPPS_CERTIFIED = {
    "LipSim margin 0.2": (30.0, 12.96, 5.33),
    "LipSim margin 0.4": (31.74, 15.19, 7.0),
    "LipSim margin 0.5": (31.20, 15.07, 6.77),
}


def pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.2f}"


def _row(name: str, entry: dict, eps_count: int, width: int) -> str:
    cells = [f"{name:<{width}}", f"{entry['n']:>7}", f"{pct(entry['natural_2afc']):>9}"]
    certified = entry.get("certified") or []
    cells += [f"{pct(c['score']):>15}" for c in certified] + [f"{'–':>15}"] * (eps_count - len(certified))
    return " ".join(cells)


def eval_table(result: dict) -> str:
    """The on-screen table of ``lipsim eval`` (scores in %)."""
    eps = [c["eps"] for c in result.get("certified") or []] or list(result.get("eps", []))
    names = ["overall", *result.get("groups", {}), *(f"family {f}" for f in result.get("families", {}))]
    width = max(12, *(len(n) for n in names)) + 1
    header = f"{'':<{width}} {'n':>7} {'natural':>9}" + "".join(
        f" {'cert@' + format_eps(e):>15}" for e in eps
    )
    lines = [
        f"{result['dataset'].upper()} {result['split']}  (metric {result.get('metric', 'lipsim')}, "
        f"model {result.get('model', '?')}; 2AFC scores in %)",
        header,
        _row("overall", result, len(eps), width),
    ]
    groups = result.get("groups", {})
    if len(groups) > 1 or (groups and next(iter(groups)) not in (result["split"], "")):
        lines += [_row(name, entry, len(eps), width) for name, entry in groups.items()]
    lines += [
        _row(f"family {name}", entry, len(eps), width) for name, entry in result.get("families", {}).items()
    ]
    if not result.get("certified"):
        lines.append("(no certificates for this metric)")
    else:
        lines.append(
            "cert@ε: share of the score that no ℓ2 perturbation of the reference of norm ≤ ε "
            "([0,1] pixel units) can lower"
        )
    return "\n".join(lines)


def data_caveats(result: dict) -> list[str]:
    """Reasons why these numbers are not comparable with published ones (empty if none found)."""
    notes = []
    dataset, split, n = result["dataset"], result["split"], result["n"]
    if result.get("limit"):
        notes.append(f"--limit {result['limit']}: only the first {n} triplets were scored")
    if result.get("families"):
        notes.append(
            "the data has a 'family' column, which the real NIGHT data.csv lacks: this is a synthetic "
            "2AFC set (e.g. from 'lipsim make-2afc'), not NIGHT"
        )
    if (
        dataset == "night"
        and split == "test"
        and not (0.5 * NIGHT_TEST_APPROX_N <= n <= 1.5 * NIGHT_TEST_APPROX_N)
    ):
        notes.append(
            f"n = {n}, whereas the real NIGHT test split holds roughly {NIGHT_TEST_APPROX_N:,} unanimous "
            "triplets (≈10 % of ≈20k): this is not the full real NIGHT test split"
        )
    if dataset == "night" and split != "test":
        notes.append(f"split {split!r}: the published NIGHT numbers are for the test split")
    if dataset == "bapps":
        if split != "val":
            notes.append(f"split {split!r}: the published BAPPS numbers are for val")
        for name, entry in result.get("groups", {}).items():
            expected = BAPPS_VAL_APPROX_N.get(name)
            if expected is None:
                notes.append(f"category {name!r} is not a BAPPS val category")
            elif abs(entry["n"] - expected) > 0.1 * expected:
                notes.append(f"category {name}: n = {entry['n']}, the real BAPPS val has ≈{expected:,}")
        missing = [c for c in BAPPS_VAL_APPROX_N if c not in result.get("groups", {})]
        if missing and split == "val":
            notes.append(f"categories absent: {', '.join(missing)}")
    if result.get("untrained"):
        notes.append("the model has random, untrained weights: its scores say nothing about perception")
    return notes


def eval_summary_markdown(result: dict) -> str:
    """``summary.md``: our numbers next to the published ones (docs/method.md §9)."""
    dataset = result["dataset"]
    lines = [f"# {dataset.upper()} {result['split']}: 2AFC evaluation", ""]
    lines += [
        f"- metric: `{result.get('metric', 'lipsim')}`, model: `{result.get('model', '?')}`"
        + (f" (arch {result['arch']}, embedding {result['embedding']})" if result.get("arch") else ""),
        f"- triplets: {result['n']}",
        "- scores: 2AFC score `1[d0<d1]·(1−y) + 1[d1<d0]·y + ½·1[d0=d1]`, mean over triplets; "
        "certified at ε: mean of `score·1[radius > ε]`, radii in ℓ2 over the [0, 1] 224×224 RGB input; "
        "ties radius 0.",
        "",
    ]
    caveats = data_caveats(result)
    if caveats:
        lines += ["> **Not the published setting — do not compare these numbers directly:**"]
        lines += [f"> - {c}" for c in caveats]
        lines.append("")
    else:
        lines += [
            "Checks passed: split sizes look like the real dataset's and no synthetic `family` column.",
            "",
        ]

    lines += [
        "## Our numbers (%)",
        "",
        "| set | n | natural |"
        + "".join(f" cert@{format_eps(c['eps'])} |" for c in result.get("certified") or []),
        "|---|---|---|" + "---|" * len(result.get("certified") or []),
    ]

    def md_row(name, entry):
        cells = [name, str(entry["n"]), pct(entry["natural_2afc"])]
        cells += [pct(c["score"]) for c in entry.get("certified") or []]
        return "| " + " | ".join(cells) + " |"

    lines.append(md_row("overall", result))
    for name, entry in result.get("groups", {}).items():
        lines.append(md_row(name, entry))
    for name, entry in result.get("families", {}).items():
        lines.append(md_row(f"family {name}", entry))
    lines.append("")

    lines += ["## Published numbers (%)", "", "| source | metric | what | value |", "|---|---|---|---|"]
    for source, metric, what, value in PUBLISHED.get(dataset, []):
        lines.append(f"| {source} | {metric} | {what} | {value:.2f} |")
    lines.append("")
    if dataset == "night":
        lines += [
            "No published *certified* NIGHT score was available to us (the LipSim paper's tables were not "
            "seen, docs/method.md §9); [FC] evaluated the official checkpoints with plain cosine on f.",
            "",
        ]
    if dataset == "bapps":
        lines += [
            "### Certified BAPPS, in the published units",
            "",
            "The reference code fed BAPPS images in [−1, 1], so its radii are twice ours (its ε = our ε/2, "
            "docs/method.md §7.4), and it certified only `traditional` + `cnn`, count-weighted.",
            "",
            "| | cert@36/255 | cert@72/255 | cert@108/255 |",
            "|---|---|---|---|",
        ]
        for name, values in PUBLISHED_BAPPS_CERTIFIED.items():
            lines.append(f"| [RB] {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
        ours = result.get("bapps_published_units")
        if ours:
            cells = [pct(c["score"]) for c in ours["certified"]]
            eps_txt = ", ".join(format_eps(c["eps_published_units"]) for c in ours["certified"])
            lines.append(
                f"| ours ({'+'.join(ours['categories'])}, n={ours['n']}; our ε = published ε / 2) | "
                + " | ".join(cells)
                + " |"
            )
            lines += ["", f"(our row is at published-unit ε = {eps_txt})"]
        lines.append("")
    text = "\n".join(lines)
    used = [tag for tag in SOURCES if tag in text]
    if used:
        lines += ["Sources:", ""] + [f"- {tag} {SOURCES[tag]}" for tag in used] + [""]
    return "\n".join(lines)


def attack_text(r: dict) -> str:
    """The on-screen summary of ``lipsim attack``."""
    budget = r["l2_budget"]
    lines = [
        f"{r['dataset'].upper()} {r['split']}: {r['attack']} ({r['norm']}, ε = {format_eps(r['eps'])}, "
        f"{r['steps']} {'queries' if r['attack'] == 'square' else 'steps'}) on the reference, "
        f"metric {r['metric']}, n = {r['n']}",
        f"natural 2AFC   {pct(r['natural_2afc'])} %",
        f"attacked 2AFC  {pct(r['attacked_2afc'])} %   (per triplet the worse of clean and attacked; "
        f"{r['n_flipped']} answers changed)",
    ]
    if r.get("certified_2afc") is None:
        lines.append("certified 2AFC –   (this metric has no certificates)")
    else:
        where = (
            f"at ℓ2 radius {budget:.4g}"
            if r["norm"] == "l2"
            else f"at ℓ2 radius {budget:.4g} = √(3·224·224)·ε, the ℓ2 ball that contains the ℓ∞ ball"
        )
        lines.append(f"certified 2AFC {pct(r['certified_2afc'])} %   ({where})")
        lines.append(
            f"violations     {r['violations']} (answer changed although certified beyond the budget); "
            f"{r['violations_measured_norm']} against the measured ‖δ‖₂"
        )
    lines.append(
        f"perturbations: max ‖δ‖₂ {r['max_delta_l2']:.4g}, max ‖δ‖∞ {r['max_delta_linf']:.4g}; "
        f"{r['n_projected']} projected back into the budget after the library"
    )
    if not r.get("reaches_budget", True):
        lines.append(
            f"note: {r['attack']} moves at most steps × step size = {r['reach']:.4g} from the reference, "
            f"less than ε = {r['eps']:.4g}: this attacked a smaller budget than ε "
            "(raise --step-size or --steps)"
        )
    return "\n".join(lines)


def _figure(width=7.0, height=4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def plot_certified(
    scores, radius, eps_marks: Sequence[float], path, title: str, groups: Sequence[str] | None = None
) -> Path:
    """``certified.png``: certified 2AFC score (%) against ε, overall and per group."""
    s, r = scoring.as_vector(scores, "scores"), scoring.as_vector(radius, "radius")
    top = max([*eps_marks, float(r.max()) if r.numel() else 0.0, 1e-3]) * 1.15
    grid = torch.linspace(0, top, 300, dtype=torch.float64)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    curve = scoring.certified_curve(s, r, grid) * 100
    ax.plot(grid.numpy(), curve.numpy(), color="black", lw=2.2, label=f"all (n={s.numel()})")
    if groups is not None and len(set(groups)) > 1:
        for name in dict.fromkeys(groups):
            idx = torch.tensor([i for i, g in enumerate(groups) if g == name])
            ax.plot(
                grid.numpy(),
                (scoring.certified_curve(s[idx], r[idx], grid) * 100).numpy(),
                lw=1.2,
                label=f"{name} (n={idx.numel()})",
            )
    for e in eps_marks:
        value = scoring.certified_score(s, r, e) * 100
        ax.plot([e], [value], "o", color="tab:red", ms=6, zorder=5)
        ax.annotate(
            f"{value:.1f}% @ {format_eps(e)}",
            (e, value),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=8,
            color="tab:red",
        )
    ax.axhline(scoring.natural_score(s) * 100, color="gray", ls="--", lw=1, label="natural score")
    ax.set_xlabel("ε: ℓ2 norm of the perturbation of the reference ([0,1] pixels, 224×224 RGB)")
    ax.set_ylabel("certified 2AFC score (%)")
    ax.set_xlim(0, top)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:] or "png"))
    return path


def plot_distance_histogram(
    series: dict[str, Sequence[float]], eps: float, bound: float | None, path, bound_label: str = "bound ½ε²"
) -> Path:
    """Histogram of ``d(x, x+δ)`` reached per metric (Fig. 3b style), with LipSim's bound (½ε² for
    the appended-constant embedding).

    Left: all metrics on one axis; right: the first series (LipSim) on its own scale with the bound.
    """
    from matplotlib.ticker import MaxNLocator

    names = list(series)
    values = {k: scoring.as_vector(v, k).numpy() for k, v in series.items()}
    fig = _figure(11.0 if len(names) > 1 else 7.0, 4.5)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)] if len(names) > 1 else [fig.add_subplot(1, 1, 1)]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    hi = max(max(float(v.max()) for v in values.values()), bound or 0.0) * 1.08 or 1e-3
    ax = axes[0]
    for i, name in enumerate(names):
        ax.hist(
            values[name],
            bins=40,
            range=(0, hi),
            alpha=0.6,
            color=colors[i % 4],
            label=f"{name} (n={len(values[name])})",
        )
    if bound is not None:
        ax.axvline(bound, color="red", ls="--", lw=1.2, label=f"LipSim {bound_label} = {bound:.4g}")
    ax.set_xlabel("d(x, x+δ) reached by ℓ2-PGD")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("images")
    ax.set_title(f"distance reached under ‖δ‖₂ ≤ {format_eps(eps)}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if len(axes) > 1:
        ax = axes[1]
        first = values[names[0]]
        top = float(first.max()) * 1.1 or 1e-6
        ax.hist(
            first, bins=40, range=(0, top), color=colors[0], alpha=0.8, label=f"{names[0]} (n={len(first)})"
        )
        if bound is not None and bound <= top:
            ax.axvline(bound, color="red", ls="--", lw=1.2, label=f"{bound_label} = {bound:.4g}")
        elif bound is not None:
            ax.text(
                0.98,
                0.95,
                f"{bound_label} = {bound:.4g}\nlies off this axis, to the right\n"
                f"(largest value reached: {float(first.max()):.3g})",
                transform=ax.transAxes,
                ha="right",
                va="top",
                fontsize=8,
                color="red",
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"},
            )
        ax.set_xlabel("d(x, x+δ)")
        ax.set_ylabel("images")
        ax.set_title(f"{names[0]} alone, zoomed to its values", fontsize=10)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:] or "png"))
    return path
