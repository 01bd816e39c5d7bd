"""Builds the distillation image pool for the default model from the offline corpus.

The corpus (``scripts/build_corpus.py``) has only a few dozen scene photos, so the pool
multiplies them: random multi-scale crops, cut-outs composited on photos and textures, texture
crops, and distorted crops (blur, noise, JPEG, colour, contrast, small rotations, translations)
so the student sees how the teacher reacts to the changes a perceptual metric must rank.
Every image is 224×224, written as JPEG (quality 95) under ``--out`` with a ``pool.json``
describing how each one was made. Deterministic given ``--seed``.

    python scripts/build_pool.py --corpus data/corpus/train --out data/pool --n 8000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lipsim.data.synthetic import (
    add_noise,
    color_cast,
    contrast,
    gaussian_blur,
    jpeg_compress,
    rotate_scale,
    translate_crop,
)
from lipsim.images import IMAGE_EXTENSIONS

SIZE = 224
KINDS = ("crop", "composite", "texture", "distorted")
WEIGHTS = (0.35, 0.25, 0.1, 0.3)


def _list(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _load(path: Path, cache: dict, mode: str = "RGB") -> Image.Image:
    key = (path, mode)
    if key not in cache:
        with Image.open(path) as img:
            cache[key] = img.convert(mode)
    return cache[key]


def _random_crop(img: Image.Image, rng: np.random.Generator, min_frac=0.15, max_frac=1.0) -> Image.Image:
    w, h = img.size
    short = min(w, h)
    side = int(short * np.sqrt(rng.uniform(min_frac, max_frac)))
    side = max(side, min(32, short))
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(w, int(side * np.sqrt(aspect))), min(h, int(side / np.sqrt(aspect)))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = img.crop((left, top, left + cw, top + ch)).resize((SIZE, SIZE), Image.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _to_pil(x: torch.Tensor) -> Image.Image:
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(arr)


def _composite(background: Image.Image, cutouts: list[Path], rng, cache) -> tuple[Image.Image, list[str]]:
    canvas = background.copy()
    used = []
    for _ in range(int(rng.integers(1, 4))):
        path = cutouts[int(rng.integers(len(cutouts)))]
        stamp = _load(path, cache, "RGBA")
        scale = rng.uniform(0.25, 0.8) * SIZE / max(stamp.size)
        size = (max(8, int(stamp.size[0] * scale)), max(8, int(stamp.size[1] * scale)))
        stamp = stamp.resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            stamp = stamp.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = int(rng.integers(-size[0] // 4, SIZE - size[0] * 3 // 4 + 1))
        y = int(rng.integers(-size[1] // 4, SIZE - size[1] * 3 // 4 + 1))
        canvas.paste(stamp, (x, y), stamp)
        used.append(path.name)
    return canvas, used


def _distort(photo: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    kind = str(rng.choice(["blur", "noise", "jpeg", "color", "contrast", "rotate", "shift"]))
    if kind in ("rotate", "shift"):
        context = _to_tensor(_random_crop(photo, rng).resize((SIZE + 32, SIZE + 32), Image.BICUBIC))
        if kind == "rotate":
            angle, scale = float(rng.uniform(-8, 8)), float(rng.uniform(0.9, 1.1))
            return _to_pil(rotate_scale(context, angle, scale, SIZE)), {
                "distortion": kind,
                "angle": angle,
                "scale": scale,
            }
        dx, dy = int(rng.integers(-4, 5)), int(rng.integers(-4, 5))
        return _to_pil(translate_crop(context, dx, dy, SIZE)), {"distortion": kind, "dx": dx, "dy": dy}
    x = _to_tensor(_random_crop(photo, rng))
    if kind == "blur":
        sigma = float(rng.uniform(0.5, 3.0))
        return _to_pil(gaussian_blur(x, sigma)), {"distortion": kind, "sigma": sigma}
    if kind == "noise":
        scale = float(rng.uniform(0.01, 0.15))
        noise = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
        return _to_pil(add_noise(x, noise, scale)), {"distortion": kind, "sigma": scale}
    if kind == "jpeg":
        quality = int(rng.integers(5, 60))
        return _to_pil(jpeg_compress(x, quality)), {"distortion": kind, "quality": quality}
    if kind == "color":
        gains = [float(g) for g in rng.uniform(0.7, 1.3, size=3)]
        hue = float(rng.uniform(-0.1, 0.1))
        return _to_pil(color_cast(x, gains, hue)), {"distortion": kind, "gains": gains, "hue": hue}
    factor = float(rng.uniform(0.4, 1.6))
    return _to_pil(contrast(x, factor)), {"distortion": kind, "factor": factor}


def build_pool(corpus: Path, out: Path, n: int, seed: int) -> dict:
    photos = _list(corpus / "photos")
    cutouts = _list(corpus / "cutouts")
    textures = _list(corpus / "textures")
    if len(photos) < 2:
        raise SystemExit(f"{corpus}/photos: need at least 2 photos (run scripts/build_corpus.py first)")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cache: dict = {}
    records = []
    for i in range(n):
        kind = str(rng.choice(KINDS, p=WEIGHTS))
        if kind == "composite" and not cutouts or kind == "texture" and not textures:
            kind = "crop"
        photo_path = photos[int(rng.integers(len(photos)))]
        photo = _load(photo_path, cache)
        info: dict = {"kind": kind}
        if kind == "crop":
            img = _random_crop(photo, rng)
            info["source"] = photo_path.name
        elif kind == "texture":
            tex = textures[int(rng.integers(len(textures)))]
            img = _random_crop(_load(tex, cache), rng, 0.3, 1.0)
            info["source"] = tex.name
        elif kind == "composite":
            use_texture = textures and rng.random() < 0.4
            bg_path = textures[int(rng.integers(len(textures)))] if use_texture else photo_path
            img, used = _composite(_random_crop(_load(bg_path, cache), rng), cutouts, rng, cache)
            info.update(source=bg_path.name, cutouts=used)
        else:
            img, params = _distort(photo, rng)
            info.update(source=photo_path.name, **params)
        name = f"{i:06d}.jpg"
        img.save(out / name, quality=95)
        records.append({"file": name, **info})
        if len(cache) > 256:
            cache.clear()
    summary = {"n": n, "seed": seed, "corpus": str(corpus), "kinds": {k: 0 for k in KINDS}}
    for r in records:
        summary["kinds"][r["kind"]] += 1
    (out / "pool.json").write_text(json.dumps({"summary": summary, "images": records}, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus/train"))
    parser.add_argument("--out", type=Path, default=Path("data/pool"))
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(build_pool(args.corpus, args.out, args.n, args.seed)))


if __name__ == "__main__":
    main()
