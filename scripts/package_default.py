"""Writes a trained model as the packaged default (src/lipsim/weights/default.safetensors).

    python scripts/package_default.py runs/v2/final_m0.05/model.safetensors

The architecture is renamed to the registered one with the same fields (train_v2 names its
variants after their overrides, e.g. ``s2d-lite-pool-l0``); the recipe that made the file is
kept in its metadata. Refuses a model whose architecture matches no registered one, or whose
file would exceed 40 MB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from safetensors import safe_open

import lipsim
from lipsim.checkpoints import save_model
from lipsim.spec import get_config, list_archs

TARGET = Path(__file__).resolve().parent.parent / "src" / "lipsim" / "weights" / "default.safetensors"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--out", type=Path, default=TARGET)
    p.add_argument("--note", default="", help="one line stored as metadata 'notes'")
    args = p.parse_args()
    model = lipsim.load(args.model)
    with safe_open(str(args.model), framework="pt") as fh:
        meta = fh.metadata() or {}
    matches = [
        n for n in list_archs() if dataclasses.replace(get_config(n), name=model.config.name) == model.config
    ]
    if not matches:
        p.error(f"{model.config.name}: no registered architecture has these fields")
    renamed = lipsim.LipSim.from_config(get_config(matches[0]), embedding=model.embedding)
    renamed.backbone.load_state_dict(model.backbone.state_dict())
    extra = {k: v for k, v in meta.items() if k not in ("format", "format_version", "arch", "embedding")}
    extra["source"] = str(args.model)
    if args.note:
        extra["notes"] = args.note
    save_model(renamed.eval(), args.out, extra_metadata=extra)
    size = args.out.stat().st_size
    if size > 40 * 1024 * 1024:
        args.out.unlink()
        p.error(f"{size} bytes exceed 40 MB")
    print(json.dumps({"arch": matches[0], "bytes": size, "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
