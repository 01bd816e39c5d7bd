"""Trains the packaged default model from offline assets only: the record of how it was made.

This is the v1 recipe, and the data steps (corpus, pool, cache) of v2. The packaged model since
issue 16 (v2) starts from v1's trunk and adds the stages of ``scripts/train_v2.py``; its exact
commands are in src/lipsim/weights/MODEL_CARD.md. The ``cache`` step runs the teacher over the
8,000-image pool: it ran at 1-3 images/s on 2 cores shared with other jobs (over an hour).

Steps (each skipped when its output exists, so the script resumes; every command is printed):

1. ``corpus``   scripts/build_corpus.py -> data/corpus/{train,heldout}
2. ``pool``     scripts/build_pool.py   -> data/pool (augmented 224×224 training images)
3. ``cache``    --teacher (offline-ensemble) embeddings of the pool -> data/pool_cache_ensemble
4. ``distill``  lipsim train distill (student --arch s2d-lite, targets from the cache) -> runs/default/distill
5. ``synth``    lipsim make-2afc on the training photos (split train) and the held-out photos (test)
6. ``finetune`` lipsim train finetune --margin M for every margin in --margins -> runs/default/finetune_mM
7. ``evaluate`` lipsim eval night on the held-out triplets for the distilled and every fine-tuned
   model -> runs/default/eval_{distill,mM}/results.json, then a summary table

    python scripts/train_default.py --steps all
    python scripts/train_default.py --steps finetune,evaluate --margins 0.05,0.1,0.2

``--teacher`` is anything ``lipsim train distill --teacher`` takes that can build a cache: a teacher
name or ``py:module:factory`` (tests/test_train_default.py runs steps 2-7 on a tiny fake corpus with
a 16-dimensional fake teacher and ``--arch tiny``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
STEPS = ("corpus", "pool", "cache", "distill", "synth", "finetune", "evaluate")


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"  ({time.time() - start:.0f} s)", flush=True)


def cache_name(teacher: str) -> str:
    """``pool_cache_ensemble`` for offline-ensemble; other teachers with path-safe characters."""
    return "pool_cache_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", teacher.removeprefix("offline-")).strip("_.")


def build_cache(pool: Path, cache: Path, teacher: str) -> None:
    import torch

    from lipsim.data import ImageFolderDataset
    from lipsim.teachers.cache import build_embedding_cache
    from lipsim.train.distill import resolve_teacher

    torch.manual_seed(0)
    build_embedding_cache(
        resolve_teacher(teacher), ImageFolderDataset(pool), cache, batch_size=32, progress=False
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="all", help=f"comma-separated subset of {','.join(STEPS)} or 'all'")
    p.add_argument(
        "--work", type=Path, default=Path("data"), help="folder for corpus, pool, caches, triplets"
    )
    p.add_argument("--runs", type=Path, default=Path("runs/default"))
    p.add_argument("--arch", default="s2d-lite", help="student architecture (lipsim.spec)")
    p.add_argument(
        "--teacher", default="offline-ensemble", help="teacher name or py:module:factory (cache step)"
    )
    p.add_argument("--pool-size", type=int, default=8000)
    p.add_argument("--distill-steps", type=int, default=300)
    p.add_argument("--distill-lr", type=float, default=0.01)
    p.add_argument("--target-scale", type=float, default=2.0)
    p.add_argument("--train-triplets", type=int, default=2400)
    p.add_argument("--heldout-triplets", type=int, default=600)
    p.add_argument("--margins", default="0.05,0.1")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--distill-batch-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch (triplets)")
    args = p.parse_args()
    steps = STEPS if args.steps == "all" else tuple(s.strip() for s in args.steps.split(","))
    unknown = set(steps) - set(STEPS)
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}")
    os.chdir(ROOT)
    work, runs = args.work, args.runs
    corpus, pool = work / "corpus", work / "pool"
    cache = work / cache_name(args.teacher)
    synth_train, synth_heldout = work / "synth_train", work / "synth_heldout"
    distill = runs / "distill"
    runs.mkdir(parents=True, exist_ok=True)
    lipsim = [PY, "-m", "lipsim"]
    common = ["--no-progress", "--num-workers", "0", "--checkpoint-every", "25", "--log-every", "5"]

    if "corpus" in steps and not (corpus / "manifest.json").exists():
        run([PY, "scripts/build_corpus.py", "--out", str(corpus)])
    if "pool" in steps and not (pool / "pool.json").exists():
        run(
            [
                PY,
                "scripts/build_pool.py",
                "--corpus",
                str(corpus / "train"),
                "--out",
                str(pool),
                "--n",
                str(args.pool_size),
            ]
        )
    if "cache" in steps and not (cache / "meta.json").exists():
        print(f"building the {args.teacher} embedding cache of {pool} -> {cache}", flush=True)
        build_cache(pool, cache, args.teacher)
    if "distill" in steps and not (distill / "model.safetensors").exists():
        resume = ["--resume"] if (distill / "checkpoints" / "last.pt").exists() else []
        run(
            lipsim
            + [
                "train",
                "distill",
                "--data-dir",
                str(pool),
                "--teacher",
                str(cache),
                "--arch",
                args.arch,
                "--out",
                str(distill),
                "--steps",
                str(args.distill_steps),
                "--batch-size",
                str(args.distill_batch_size),
                "--lr",
                str(args.distill_lr),
                "--views",
                "single",
                "--target-scale",
                str(args.target_scale),
                "--warmup",
                "20",
                *common,
                *resume,
            ]
        )
    if "synth" in steps:
        if not (synth_train / "data.csv").exists():
            run(
                lipsim
                + [
                    "make-2afc",
                    "--images",
                    str(corpus / "train" / "photos"),
                    "--out",
                    str(synth_train),
                    "--n",
                    str(args.train_triplets),
                    "--split",
                    "train",
                    "--seed",
                    "1",
                ]
            )
        if not (synth_heldout / "data.csv").exists():
            run(
                lipsim
                + [
                    "make-2afc",
                    "--images",
                    str(corpus / "heldout" / "photos"),
                    "--out",
                    str(synth_heldout),
                    "--n",
                    str(args.heldout_triplets),
                    "--split",
                    "test",
                    "--seed",
                    "2",
                ]
            )
    margins = [m.strip() for m in args.margins.split(",") if m.strip()]
    if "finetune" in steps:
        for margin in margins:
            out = runs / f"finetune_m{margin}"
            if (out / "model.safetensors").exists():
                continue
            resume = ["--resume"] if (out / "checkpoints" / "last.pt").exists() else []
            run(
                lipsim
                + [
                    "train",
                    "finetune",
                    "--dataset",
                    "night",
                    "--data-dir",
                    str(synth_train),
                    "--init",
                    str(distill / "model.safetensors"),
                    "--margin",
                    margin,
                    "--out",
                    str(out),
                    "--epochs",
                    str(args.finetune_epochs),
                    "--batch-size",
                    str(args.batch_size),
                    "--lr",
                    str(args.finetune_lr),
                    *common,
                    *resume,
                ]
            )
    if "evaluate" in steps:
        candidates = [("distill", distill)] + [(f"m{m}", runs / f"finetune_m{m}") for m in margins]
        for label, folder in candidates:
            model = folder / "model.safetensors"
            out = runs / f"eval_{label}"
            # lipsim eval --out writes results.json (atomically) with the scores, and summary.md
            if model.exists() and not (out / "results.json").exists():
                run(
                    lipsim
                    + [
                        "eval",
                        "night",
                        "--data-dir",
                        str(synth_heldout),
                        "--split",
                        "test",
                        "--model",
                        str(model),
                        "--no-progress",
                        "--out",
                        str(out),
                    ]
                )
        for label, _ in candidates:
            result = runs / f"eval_{label}" / "results.json"
            if result.exists():
                data = json.loads(result.read_text())
                cert = ", ".join(f"{c['eps']:.3f}: {c['score']:.3f}" for c in data.get("certified", []))
                print(f"{label:>10}: natural {data.get('natural_2afc'):.3f}  certified {cert}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
