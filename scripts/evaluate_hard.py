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
    print(json.dumps({k: result[k] for k in ("digest", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
