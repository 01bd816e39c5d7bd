#!/usr/bin/env python
"""Training triplets "distortion vs other photo" in the NIGHT layout (an ablation of issue 16).

``ref`` is a random 224×224 crop of a photo (scaled to a 320-px short side), ``x0`` (the right
answer, ``left_vote`` 1) a blurred (σ 1–4 px), JPEG-compressed (quality 5–30) or noisy (σ 10–50
of 255) copy of it, and ``x1`` a crop of another photo. The folder feeds
``scripts/train_v2.py --extra-triplets``; the output depends only on the photos and the seed.

    python scripts/make_distort_vs_other.py data/corpus/train/photos data/dvo_train --n 600 --seed 7
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from lipsim.data.folders import list_images

SIZE = 224


def _photo(path: Path, short_side: int = 320) -> Image.Image:
    im = Image.open(path).convert("RGB")
    scale = short_side / min(im.size)
    size = (max(SIZE, round(im.size[0] * scale)), max(SIZE, round(im.size[1] * scale)))
    return im.resize(size, Image.BICUBIC)


def _crop(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    x = int(rng.integers(0, im.size[0] - SIZE + 1))
    y = int(rng.integers(0, im.size[1] - SIZE + 1))
    return im.crop((x, y, x + SIZE, y + SIZE))


def _distort(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return im.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.0, 4.0))))
    if kind == 1:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(5, 31)))
        buf.seek(0)
        return Image.open(buf).convert("RGB")
    noisy = np.asarray(im, np.float32) + rng.normal(0.0, float(rng.uniform(10, 50)), (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("photos", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    photos = [_photo(args.photos / k) for k in list_images(args.photos)]
    if len(photos) < 2:
        p.error(f"{args.photos}: need at least 2 photos")
    (args.out / "ref").mkdir(parents=True, exist_ok=True)
    (args.out / "distort").mkdir(parents=True, exist_ok=True)
    header = ["id", "left_vote", "right_vote", "votes", "ref_path", "left_path", "right_path"]
    rows = [header + ["family", "split", "is_imagenet"]]
    for i in range(args.n):
        a = int(rng.integers(0, len(photos)))
        b = int(rng.integers(0, len(photos) - 1))
        b += b >= a
        ref = _crop(photos[a], rng)
        x0, x1 = _distort(ref, rng), _crop(photos[b], rng)
        names = (f"ref/{i:05d}.png", f"distort/{i:05d}_0.png", f"distort/{i:05d}_1.png")
        for image, name in zip((ref, x0, x1), names, strict=True):
            image.save(args.out / name)
        rows.append([i, 1, 0, 6, *names, "distort-vs-other", "train", "False"])
    with open(args.out / "data.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    print(f"wrote {args.n} triplets to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
