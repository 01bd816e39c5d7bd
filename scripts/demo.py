"""`make demo`: the main job on the packaged default model, offline.

Prints the distance between two bundled photos (two views of one cat), the 2AFC decision for
(cat view A; cat view B vs. a coffee cup) and its certified radius.
"""

from __future__ import annotations

import sys
from importlib import resources

from lipsim.checkpoints import default_model_path
from lipsim.cli import main


def run() -> int:
    assets = resources.files("lipsim") / "assets"
    cat_a, cat_b, coffee = (str(assets / name) for name in ("cat_a.jpg", "cat_b.jpg", "coffee.jpg"))
    model = []
    if default_model_path().exists():
        print(f"model: packaged default ({default_model_path().name})")
    else:
        print(
            "model: no packaged default model in this checkout; using the untrained 's2d-compact' "
            "architecture (random weights): the numbers below are NOT perceptual"
        )
        model = ["--model", "arch:s2d-compact"]
    print("\n$ lipsim distance cat_a.jpg cat_b.jpg")
    rc = main(["distance", cat_a, cat_b, *model])
    print("\n$ lipsim compare cat_a.jpg cat_b.jpg coffee.jpg")
    rc |= main(["compare", cat_a, cat_b, coffee, *model])
    return rc


if __name__ == "__main__":
    sys.exit(run())
