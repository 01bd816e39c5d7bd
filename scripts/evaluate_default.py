"""Held-out numbers for the model card: per-family 2AFC, certificates, teacher agreement.

On a NIGHT-layout folder of synthetic triplets made from held-out photos (`lipsim make-2afc`),
compares a LipSim model with pixel ℓ2 and with its teacher:

* natural 2AFC score per family, for the model, pixel ℓ2 and the teacher;
* certified 2AFC score at 36/72/108 (/255) per family (the model's certificates);
* agreement of the model's decisions with the teacher's;
* the distribution of certified radii (quantiles and a histogram PNG).

    python scripts/evaluate_default.py --model src/lipsim/weights/default.safetensors \
        --data-dir data/synth_heldout --teacher offline-ensemble --out runs/default/heldout
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import lipsim
from lipsim.data import NightDataset

EPS = (36 / 255, 72 / 255, 108 / 255)


def _score(d0: torch.Tensor, d1: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (d0 < d1).double() * (1 - y) + (d1 < d0).double() * y + 0.5 * (d0 == d1).double()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--teacher", default="offline-ensemble")
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    model = lipsim.load(args.model)
    teacher = None
    if args.teacher:
        from lipsim.teachers import get_teacher

        teacher = get_teacher(args.teacher)
    data = NightDataset(args.data_dir, split=args.split)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False)
    rows: dict[str, list] = defaultdict(list)
    for batch in loader:
        ref, x0, x1, y = batch["ref"], batch["x0"], batch["x1"], batch["y"].double()
        cert = model.certify_2afc(ref, x0, x1)
        rows["family"] += list(batch["family"])
        rows["y"].append(y)
        rows["ours"].append(_score(cert.d0.double(), cert.d1.double(), y))
        rows["radius"].append(cert.radius.double())
        l2_0 = (ref - x0).flatten(1).norm(dim=1).double()
        l2_1 = (ref - x1).flatten(1).norm(dim=1).double()
        rows["l2"].append(_score(l2_0, l2_1, y))
        rows["ours_closer"].append(cert.closer)
        if teacher is not None:
            with torch.no_grad():
                t = teacher(torch.cat([ref, x0, x1]))
            n = ref.shape[0]
            t0 = 1 - (t[:n] * t[n : 2 * n]).sum(1).double()
            t1 = 1 - (t[:n] * t[2 * n :]).sum(1).double()
            rows["teacher"].append(_score(t0, t1, y))
            rows["teacher_closer"].append(torch.where(t0 < t1, 0, torch.where(t1 < t0, 1, -1)))
    fam = np.array(rows["family"])
    cat = {k: torch.cat(v).numpy() for k, v in rows.items() if k != "family"}
    families = sorted(set(fam.tolist()))
    result: dict = {"model": args.model, "data_dir": str(args.data_dir), "n": int(len(fam)), "families": {}}

    def summarise(mask: np.ndarray) -> dict:
        entry = {
            "n": int(mask.sum()),
            "natural": float(cat["ours"][mask].mean()),
            "pixel_l2": float(cat["l2"][mask].mean()),
            "certified": {
                f"{round(e * 255)}/255": float((cat["ours"][mask] * (cat["radius"][mask] > e)).mean())
                for e in EPS
            },
            "median_radius": float(np.median(cat["radius"][mask])),
        }
        if teacher is not None:
            entry["teacher"] = float(cat["teacher"][mask].mean())
            entry["agreement_with_teacher"] = float(
                (cat["ours_closer"][mask] == cat["teacher_closer"][mask]).mean()
            )
        return entry

    result["overall"] = summarise(np.ones(len(fam), bool))
    for f in families:
        result["families"][f] = summarise(fam == f)
    radius = cat["radius"]
    result["radius_quantiles"] = {str(q): float(np.quantile(radius, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heldout.json").write_text(json.dumps(result, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    correct = cat["ours"] > 0.5
    ax.hist(
        [radius[correct], radius[~correct]],
        bins=40,
        stacked=True,
        label=["correct", "wrong"],
        color=["tab:green", "tab:red"],
    )
    for e in EPS:
        ax.axvline(e, color="k", ls="--", lw=0.8)
    ax.set_xlabel("certified radius (ℓ2, [0,1] pixels, 224×224)")
    ax.set_ylabel("triplets")
    ax.set_title(f"Certified radii on {len(fam)} held-out synthetic triplets (dashed: 36, 72, 108 /255)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "radii.png", dpi=120)

    head = (
        "| family | n | ours | pixel ℓ2 | teacher | agree w/ teacher | cert 36 | cert 72 | cert 108 "
        "| median radius |"
    )
    lines = [head, "|" + "---|" * 10]
    for name, e in [("**all**", result["overall"])] + [(f, result["families"][f]) for f in families]:
        c = list(e["certified"].values())
        lines.append(
            f"| {name} | {e['n']} | {e['natural']:.3f} | {e['pixel_l2']:.3f} "
            f"| {e.get('teacher', float('nan')):.3f} "
            f"| {e.get('agreement_with_teacher', float('nan')):.3f} | {c[0]:.3f} | {c[1]:.3f} | {c[2]:.3f} "
            f"| {e['median_radius']:.3f} |"
        )
    (args.out / "heldout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
