#!/usr/bin/env python
"""Is a teacher perceptually sensible? Forced-choice checks on the held-out corpus photos.

For each held-out photo the script draws several 224x224 reference views and asks every teacher (and,
as a baseline, the pixel l2 distance) which of two candidates is closer to the reference:

  (a) crop      another random crop of the same photo   vs  a random crop of another photo
  (b) mirror    the horizontally mirrored reference     vs  a random crop of another photo
  (c) blur      Gaussian blur sigma 1                    vs  sigma 2
      noise     Gaussian noise std 0.02                  vs  std 0.06
      jpeg      JPEG quality 60                          vs  quality 15
  (d) shift     the view 2 px to the right               vs  Gaussian noise whose l2 norm is half the
                (a real 2-px translation, no padding)        l2 norm of (shifted view - reference)
      shift0.25x ... shift0.05x: the same with noise of 1/4, 1/10 and 1/20 of that norm (harder: where a
      teacher starts to rank faint noise above the shift shows how strongly it discounts translations)

The first candidate is the expected answer; the table gives the fraction of trials in which the
distance prefers it (ties count one half). Pixel l2 prefers the noise in (d) by construction, so a
teacher that passes (d) is not just a pixel metric. Teacher distance: l2 between embeddings.

Usage: OMP_NUM_THREADS=1 python scripts/check_teacher.py [--teachers a,b] [--trials 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lipsim.teachers import get_teacher  # noqa: E402

VIEW = 224
WORK_SHORT_SIDE = 256
SHIFT = 2
NOISE_MULTIPLES = (0.25, 0.1, 0.05)
TESTS = ["crop", "mirror", "blur", "noise", "jpeg", "shift", *(f"shift{k}x" for k in NOISE_MULTIPLES)]
DESCRIPTIONS = {
    "crop": "(a) same-scene crop over another scene",
    "mirror": "(b) mirrored copy over another scene",
    "blur": "(c) blur sigma 1 over sigma 2",
    "noise": "(c) noise std 0.02 over 0.06",
    "jpeg": "(c) JPEG q60 over q15",
    "shift": "(d) 2-px shift over noise of half its l2 norm",
    **{f"shift{k}x": f"(d) ... over noise of {k}x its l2 norm" for k in NOISE_MULTIPLES},
}


def load_photo(path: Path) -> torch.Tensor:
    """(3, 256, W) or (3, H, 256) float in [0, 1]: shorter side resized to 256."""
    image = Image.open(path).convert("RGB")
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0
    h, w = x.shape[-2:]
    scale = WORK_SHORT_SIDE / min(h, w)
    size = (max(WORK_SHORT_SIDE, round(h * scale)), max(WORK_SHORT_SIDE, round(w * scale)))
    return F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(
        0, 1
    )


def random_crop(photo: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A square crop of 60-100 % of the shorter side at a random place, resized to 224."""
    h, w = photo.shape[-2:]
    side = int(rng.integers(int(0.6 * min(h, w)), min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = photo[:, y : y + side, x : x + side][None]
    return F.interpolate(crop, size=(VIEW, VIEW), mode="bilinear", antialias=True, align_corners=False)[
        0
    ].clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    padded = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return out[0]


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    array = (x.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1).float() / 255.0


def noisy(x: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def build_trials(photos: list[torch.Tensor], trials: int, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """All images in one stack and, per trial and test, the indices (ref, expected, alternative)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    images: list[torch.Tensor] = []

    def add(t: torch.Tensor) -> int:
        images.append(t.clamp(0, 1))
        return len(images) - 1

    records = []
    for p, photo in enumerate(photos):
        for _ in range(trials):
            h, w = photo.shape[-2:]
            y, x = int(rng.integers(0, h - VIEW + 1)), int(rng.integers(0, w - VIEW - SHIFT + 1))
            ref_img = photo[:, y : y + VIEW, x : x + VIEW]
            shifted = photo[:, y : y + VIEW, x + SHIFT : x + SHIFT + VIEW]
            other = int(rng.choice([q for q in range(len(photos)) if q != p]))
            ref = add(ref_img)
            other_crop = add(random_crop(photos[other], rng))
            direction = torch.randn(ref_img.shape, generator=gen)
            unit_noise = direction * ((shifted - ref_img).norm() / direction.norm())
            shifted_index = add(shifted)
            harder = {
                f"shift{k}x": (ref, shifted_index, add(ref_img + k * unit_noise)) for k in NOISE_MULTIPLES
            }
            records.append(
                {
                    "photo": p,
                    "crop": (ref, add(random_crop(photo, rng)), other_crop),
                    "mirror": (ref, add(ref_img.flip(-1)), other_crop),
                    "blur": (ref, add(gaussian_blur(ref_img, 1.0)), add(gaussian_blur(ref_img, 2.0))),
                    "noise": (ref, add(noisy(ref_img, 0.02, gen)), add(noisy(ref_img, 0.06, gen))),
                    "jpeg": (ref, add(jpeg(ref_img, 60)), add(jpeg(ref_img, 15))),
                    # clamping to [0, 1] only shrinks the noise, so it stays within its budget
                    "shift": (ref, shifted_index, add(ref_img + 0.5 * unit_noise)),
                    **harder,
                }
            )
    return torch.stack(images), records


def embed_all(fn, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([fn(images[i : i + batch]) for i in range(0, len(images), batch)])


def score(vectors: torch.Tensor, records: list[dict]) -> dict[str, float]:
    out = {}
    for test in TESTS:
        wins = 0.0
        for r in records:
            ref, good, bad = r[test]
            d_good = (vectors[ref] - vectors[good]).norm().item()
            d_bad = (vectors[ref] - vectors[bad]).norm().item()
            wins += 1.0 if d_good < d_bad else 0.5 if d_good == d_bad else 0.0
        out[test] = wins / len(records)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heldout", type=Path, default=REPO / "data/corpus/heldout/photos")
    parser.add_argument(
        "--teachers", default="mobilenet_v2,mobilenet_v2-multistage,efficientnet_lite0,offline-ensemble"
    )
    parser.add_argument("--trials", type=int, default=6, help="reference views per photo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    paths = sorted(p for p in args.heldout.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if len(paths) < 2:
        print(
            f"error: need at least 2 photos in {args.heldout} (run scripts/build_corpus.py)", file=sys.stderr
        )
        return 1
    photos = [load_photo(p) for p in paths]
    images, records = build_trials(photos, args.trials, args.seed)
    print(f"{len(paths)} held-out photos x {args.trials} views = {len(records)} trials per test")

    results: dict[str, dict[str, float]] = {"pixel l2": score(images.flatten(1), records)}
    timings = {}
    for name in [n.strip() for n in args.teachers.split(",") if n.strip()]:
        teacher = get_teacher(name, device=args.device)
        start = time.perf_counter()
        vectors = embed_all(lambda x, t=teacher: t(x.to(args.device)).cpu(), images)
        timings[teacher.name] = (time.perf_counter() - start) / len(images)
        results[teacher.name] = score(vectors, records)

    columns = list(results)
    print()
    print("| check | " + " | ".join(columns) + " |")
    print("| --- | " + " | ".join("---:" for _ in columns) + " |")
    for test in TESTS:
        print(f"| {DESCRIPTIONS[test]} | " + " | ".join(f"{results[c][test]:.2f}" for c in columns) + " |")
    print()
    print(
        f"threads: {torch.get_num_threads()}; seconds per image: "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items())
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "photos": [p.name for p in paths],
                    "trials_per_test": len(records),
                    "seed": args.seed,
                    "results": results,
                    "seconds_per_image": timings,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
