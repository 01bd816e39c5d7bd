"""The hard held-out evaluation of issue 16 (lipsim.evaluate.hard) for one or more models.

    python scripts/evaluate_hard.py --model default --out runs/hard/packaged
    python scripts/evaluate_hard.py --model default --head sum_std --out runs/hard/packaged_pool
    python scripts/evaluate_hard.py --model runs/v2/model.safetensors --out runs/hard/v2

``--head`` swaps the packaged grid head for a global pooling head without retraining (the
trunk's features pooled, no linear layers). The teacher's embeddings of the set are cached under
``--cache`` by the set's digest, so a second model costs only its own forward passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

import lipsim
from lipsim.archs import transplant
from lipsim.evaluate import hard


def pooled_trunk(model: lipsim.LipSim, head: str) -> lipsim.LipSim:
    """``model``'s trunk behind a global pooling head, no linear layers, no retraining."""
    config = dataclasses.replace(
        model.config, name=f"{model.config.name}-{head}", head=head, pool=1, linear_width=0, depth_linear=0
    )
    config = dataclasses.replace(config, out_dim=config.flat_dim())
    swapped = lipsim.LipSim.from_config(config, embedding=model.embedding)
    transplant(model.backbone, swapped.backbone)
    return swapped.eval()


def plot_ladder(result: dict, photo: int, name: str, label: str, path: Path) -> None:
    """Distance per change for one photo: ours, the teacher and pixel ℓ2, each divided by its
    largest distance on the ladder (the three metrics have different units)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lipsim.fileio import atomic_write

    lad = result["ladder"]
    series = [
        ("ours", "ours", "tab:blue"),
        ("teacher", "teacher", "tab:green"),
        ("pixel_l2", "pixel ℓ2", "tab:grey"),
    ]
    x = np.arange(len(lad["changes"]))
    fig, ax = plt.subplots(figsize=(10, 4))
    for j, (key, text, colour) in enumerate(series):
        if key not in lad:
            continue
        d = np.asarray(lad[key][photo], dtype=float)
        ax.bar(x + (j - 1) * 0.27, d / d.max(), width=0.27, label=text, color=colour)
    ax.set_xticks(x, lad["changes"], rotation=30, ha="right")
    ax.set_ylabel("distance / largest on the ladder")
    rho = lad.get("spearman_ours", [float("nan")] * (photo + 1))[photo]
    ax.set_title(f"{label}: one held-out photo ({name}), Spearman with the teacher {rho:.2f}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model file, run folder or 'default'")
    p.add_argument("--head", default=None, help="swap in this global pooling head (no retraining)")
    p.add_argument("--photos", type=Path, default=Path("data/corpus/heldout/photos"))
    p.add_argument("--refs-per-photo", type=int, default=6)
    p.add_argument("--attack-per-family", type=int, default=10, help="0: no attack")
    p.add_argument("--attack-steps", type=int, default=20)
    p.add_argument("--teacher", default="offline-ensemble")
    p.add_argument("--cache", type=Path, default=Path("data/hard_cache"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plot", type=Path, default=None, help="write the ladder plot of one photo (PNG)")
    p.add_argument("--plot-photo", type=int, default=0, help="which held-out photo the plot shows")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    hs = hard.build_hard_set(args.photos, refs_per_photo=args.refs_per_photo)
    teacher = hard.teacher_embeddings(hs, args.teacher, args.cache) if args.teacher else None
    model = lipsim.load(None if args.model == "default" else args.model)
    if args.head:
        model = pooled_trunk(model, args.head)
    result = hard.evaluate_model(model, hs, teacher, args.attack_per_family, args.attack_steps)
    result.update(model=args.model, head=args.head, photos=str(args.photos), digest=hs.digest())
    result["seconds"] = time.time() - start
    label = args.model + (f" + {args.head} head (no retraining)" if args.head else "")
    hard.save_report(args.out, label, result)
    print(hard.markdown(label, result))
    if args.plot:
        plot_ladder(result, args.plot_photo, hs.names[args.plot_photo], label, args.plot)
    print(json.dumps({k: result[k] for k in ("digest", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
