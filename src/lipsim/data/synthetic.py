"""Synthetic 2AFC triplets with known answers, written in the NIGHT layout.

Real human-judgement data cannot be shipped with the package, so ``make_2afc`` builds triplets
from any photo folder whose answer is fixed by construction: one candidate ("closer") is a
milder change of the reference than the other ("farther"). Every reference is a random crop of
an input photo, so a handful of photos gives many triplets.

Families (``FAMILIES``; each a function ``(photo_a, photo_b, rng, size) -> SyntheticTriplet``):

* ``view``: closer = another crop of the same photo overlapping the reference (side ×0.85–1.15,
  centre moved by up to 12 % of the side); farther = a crop of a different photo.
* ``mirror``: closer = the reference mirrored left-right; farther = a crop of a different photo.
* ``blur``, ``noise``, ``jpeg``, ``color``, ``contrast``, ``geometric`` (small rotation and
  scale): closer = a weak, farther = a strong version of the same distortion of the reference.
* ``shift-vs-noise``: closer = the reference translated by 1–3 px (cut from a larger crop, so no
  border is invented); farther = the reference plus Gaussian noise whose ℓ2 norm is smaller than
  the translation's ℓ2 difference. Pixel ℓ2 always picks the wrong answer here; a perceptual
  metric should not.

Images are (3, H, W) float32 tensors in [0, 1]; the candidates returned by the families are
already rounded to the 8-bit grid the PNG files store, so checks made on them hold on disk.
Randomness comes only from the ``numpy.random.Generator`` handed in; ``make_2afc`` derives one
per triplet from ``(seed, index)``, so the output depends only on the seed and the photo files.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from ..fileio import atomic_write, write_text_atomic
from ._io import jpeg_roundtrip, open_rgb, pil_to_tensor, quantize, save_png
from .errors import DatasetError
from .folders import list_images
from .night import SYNTHETIC_MARKER

__all__ = [
    "FAMILIES",
    "SyntheticTriplet",
    "make_2afc",
    "crop_resize",
    "mirror",
    "gaussian_blur",
    "add_noise",
    "jpeg_compress",
    "color_cast",
    "contrast",
    "rotate_scale",
    "translate_crop",
    "family_view",
    "family_mirror",
    "family_blur",
    "family_noise",
    "family_jpeg",
    "family_color",
    "family_contrast",
    "family_geometric",
    "family_shift_vs_noise",
]

#: header of the generated data.csv (NIGHT's column order plus ``family``)
CSV_HEADER = (
    "id",
    "left_vote",
    "right_vote",
    "votes",
    "ref_path",
    "left_path",
    "right_path",
    "family",
    "split",
    "is_imagenet",
)
SPLITS = ("train", "val", "test")
#: photos are decoded with their longer side capped at this many pixels
PHOTO_MAX_SIDE = 1536
#: crop side as a fraction of the photo's shorter side
CROP_FRACTION = (0.35, 0.8)
#: the context crop around the reference for geometric changes (covers ±15° and scale 0.88–1.12)
GEOMETRIC_CONTEXT = 1.6
#: margin in output pixels around the reference for shift-vs-noise (translations are ≤ 3 px)
SHIFT_MARGIN = 8


@dataclass
class SyntheticTriplet:
    """A reference and two candidates; ``closer`` is the intended answer."""

    ref: torch.Tensor
    closer: torch.Tensor
    farther: torch.Tensor
    params: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- pure image functions


def crop_resize(photo: torch.Tensor, top: int, left: int, side: int, size: int = 224) -> torch.Tensor:
    """The square ``photo[:, top:top+side, left:left+side]`` resized to ``size`` (bicubic,
    antialiased), clamped to [0, 1]. ``photo`` is uint8 (0–255) or float in [0, 1]."""
    region = photo[:, top : top + side, left : left + side]
    region = region.float() / 255.0 if region.dtype == torch.uint8 else region.float()
    if region.shape[-1] != side or region.shape[-2] != side:
        raise ValueError(f"crop box ({top}, {left}, {side}) leaves the {tuple(photo.shape[-2:])} photo")
    if side != size:
        region = TF.resize(region, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return region.clamp(0.0, 1.0).contiguous()


def mirror(x: torch.Tensor) -> torch.Tensor:
    """Left-right mirror image."""
    return torch.flip(x, dims=[-1]).contiguous()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with standard deviation ``sigma`` pixels (kernel ±3σ, reflected borders)."""
    radius = max(1, math.ceil(3.0 * sigma))
    return TF.gaussian_blur(x, [2 * radius + 1, 2 * radius + 1], [sigma, sigma]).clamp(0.0, 1.0)


def add_noise(x: torch.Tensor, noise: torch.Tensor, scale: float) -> torch.Tensor:
    """``clamp(x + scale · noise)``. Clamping is the projection onto the [0, 1] box, which is
    non-expansive, so ``‖result - x‖ ≤ scale · ‖noise‖`` for ``x`` in the box."""
    return (x + scale * noise).clamp(0.0, 1.0)


def jpeg_compress(x: torch.Tensor, quality: int) -> torch.Tensor:
    """The image after a JPEG encode/decode round trip at ``quality`` (1–95)."""
    return jpeg_roundtrip(x, int(quality))


def color_cast(x: torch.Tensor, gains: Sequence[float], hue: float) -> torch.Tensor:
    """Per-channel gains (a colour cast), then a hue rotation by ``hue`` turns (|hue| ≤ 0.5)."""
    g = torch.as_tensor(list(gains), dtype=x.dtype).view(3, 1, 1)
    return TF.adjust_hue((x * g).clamp(0.0, 1.0), float(hue)).clamp(0.0, 1.0)


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the mean grey level: factor < 1 flattens, > 1 strengthens contrast."""
    return TF.adjust_contrast(x, float(factor)).clamp(0.0, 1.0)


def rotate_scale(context: torch.Tensor, angle: float, scale: float, size: int = 224) -> torch.Tensor:
    """Rotates ``context`` by ``angle`` degrees and zooms by ``scale`` about its centre, then
    keeps the central ``size`` × ``size`` pixels. The context must be large enough that the
    kept square never samples outside it (``GEOMETRIC_CONTEXT`` × size covers ±15°, 0.88–1.12)."""
    turned = TF.affine(
        context,
        angle=float(angle),
        translate=[0, 0],
        scale=float(scale),
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.BILINEAR,
    )
    return TF.center_crop(turned, [size, size]).clamp(0.0, 1.0).contiguous()


def translate_crop(context: torch.Tensor, dx: int, dy: int, size: int = 224) -> torch.Tensor:
    """The ``size`` × ``size`` window of ``context`` whose top-left corner is moved by
    ``(dx, dy)`` pixels from the centred position: the content appears shifted by
    ``(-dx, -dy)``, and every pixel is real image content (no padding)."""
    margin_y = (context.shape[-2] - size) // 2
    margin_x = (context.shape[-1] - size) // 2
    if abs(dx) > margin_x or abs(dy) > margin_y:
        raise ValueError(f"shift ({dx}, {dy}) exceeds the context margin ({margin_x}, {margin_y})")
    top, left = margin_y + dy, margin_x + dx
    return context[:, top : top + size, left : left + size].contiguous()


# --------------------------------------------------------------------------- families


def _box(photo: torch.Tensor, rng: np.random.Generator, fraction=CROP_FRACTION) -> tuple[int, int, int]:
    height, width = photo.shape[-2:]
    side = max(1, int(round(rng.uniform(*fraction) * min(height, width))))
    return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side


def _signed(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi) * rng.choice([-1.0, 1.0]))


def family_view(photo_a, photo_b, rng: np.random.Generator, size: int = 224) -> SyntheticTriplet:
    """Closer: an overlapping crop of the same photo; farther: a crop of another photo."""
    height, width = photo_a.shape[-2:]
    top, left, side = _box(photo_a, rng)
    side2 = min(min(height, width), max(1, int(round(side * rng.uniform(0.85, 1.15)))))
    cy = top + side / 2 + rng.uniform(-0.12, 0.12) * side
    cx = left + side / 2 + rng.uniform(-0.12, 0.12) * side
    top2 = int(np.clip(round(cy - side2 / 2), 0, height - side2))
    left2 = int(np.clip(round(cx - side2 / 2), 0, width - side2))
    box_b = _box(photo_b, rng)
    return SyntheticTriplet(
        ref=quantize(crop_resize(photo_a, top, left, side, size)),
        closer=quantize(crop_resize(photo_a, top2, left2, side2, size)),
        farther=quantize(crop_resize(photo_b, *box_b, size)),
        params={"ref_box": [top, left, side], "closer_box": [top2, left2, side2], "farther_box": list(box_b)},
    )


def family_mirror(photo_a, photo_b, rng: np.random.Generator, size: int = 224) -> SyntheticTriplet:
    """Closer: the reference mirrored left-right; farther: a crop of another photo."""
    box = _box(photo_a, rng)
    box_b = _box(photo_b, rng)
    ref = quantize(crop_resize(photo_a, *box, size))
    return SyntheticTriplet(
        ref=ref,
        closer=mirror(ref),
        farther=quantize(crop_resize(photo_b, *box_b, size)),
        params={"ref_box": list(box), "farther_box": list(box_b)},
    )


def _weak_strong(
    photo_a, rng: np.random.Generator, size: int, distort: Callable, weak, strong, params: dict
) -> SyntheticTriplet:
    box = _box(photo_a, rng)
    ref = quantize(crop_resize(photo_a, *box, size))
    return SyntheticTriplet(
        ref=ref,
        closer=quantize(distort(ref, weak)),
        farther=quantize(distort(ref, strong)),
        params={"ref_box": list(box), **params},
    )


def family_blur(photo_a, photo_b, rng: np.random.Generator, size: int = 224) -> SyntheticTriplet:
    """Closer: Gaussian blur σ 0.6–1.2 px; farther: σ larger by 1.5–3 px."""
    weak = float(rng.uniform(0.6, 1.2))
    strong = weak + float(rng.uniform(1.5, 3.0))
    return _weak_strong(
        photo_a, rng, size, gaussian_blur, weak, strong, {"sigma_closer": weak, "sigma_farther": strong}
    )


def family_noise(photo_a, photo_b, rng: np.random.Generator, size: int = 224) -> SyntheticTriplet:
    """Closer and farther: the same Gaussian noise field at standard deviation s and 2.5–4 s
    (s in 0.02–0.04), so the farther change is larger pixel by pixel."""
    noise = torch.from_numpy(rng.standard_normal((3, size, size)).astype(np.float32))
    weak = float(rng.uniform(0.02, 0.04))
    strong = weak * float(rng.uniform(2.5, 4.0))
    return _weak_strong(
        photo_a,
        rng,
        size,
        lambda x, s: add_noise(x, noise, s),
        weak,
        strong,
        {"std_closer": weak, "std_farther": strong},
    )


def family_jpeg(photo_a, photo_b, rng: np.random.Generator, size: int = 224) -> SyntheticTriplet:
    """Closer: JPEG quality 60–90; farther: quality 5–15."""
    weak = int(rng.integers(60, 91))
    strong = int(rng.integers(5, 16))
    return _weak_strong(
        photo_a, rng, size, jpeg_compress, weak, strong, {"quality_closer": weak, "quality_farther": strong}
    )


def family_color(photo_a, photo_b, rng: np.random.Generator, size: int = 224) -> SyntheticTriplet:
    """A colour cast (channel gains 1 + t·d, d a random unit direction) with a hue rotation of
    ±t/2 turns; closer t in 0.04–0.08, farther 3–4 times that."""
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction) + 1e-12
    hue_sign = float(rng.choice([-1.0, 1.0]))
    weak = float(rng.uniform(0.04, 0.08))
    strong = weak * float(rng.uniform(3.0, 4.0))

    def distort(x, t):
        return color_cast(x, (1.0 + t * direction).tolist(), hue_sign * t / 2)

    return _weak_strong(
        photo_a,
        rng,
        size,
        distort,
        weak,
        strong,
        {"t_closer": weak, "t_farther": strong, "direction": direction.tolist(), "hue_sign": hue_sign},
    )


def family_contrast(photo_a, photo_b, rng: np.random.Generator, size: int = 224) -> SyntheticTriplet:
    """Contrast factor 1 ± (0.1–0.2) for closer and 1 ± 3–4 times that offset for farther (same
    direction, lowered or raised)."""
    offset = _signed(rng, 0.1, 0.2)
    weak = 1.0 + offset
    strong = 1.0 + offset * float(rng.uniform(3.0, 4.0))
    return _weak_strong(
        photo_a, rng, size, contrast, weak, strong, {"factor_closer": weak, "factor_farther": strong}
    )


def family_geometric(photo_a, photo_b, rng: np.random.Generator, size: int = 224) -> SyntheticTriplet:
    """Closer: rotation 1–3° and zoom 1 ± (0.01–0.03); farther: the same direction, 3–5 times the
    angle and 3–4 times the zoom offset (at most 15°, 0.88–1.12). Both are cut from a larger
    context crop, so no border is rotated into view."""
    context_px = int(round(size * GEOMETRIC_CONTEXT))
    top, left, side = _box(photo_a, rng)
    context = crop_resize(photo_a, top, left, side, context_px)
    angle = _signed(rng, 1.0, 3.0)
    zoom = _signed(rng, 0.01, 0.03)
    angle_far = angle * float(rng.uniform(3.0, 5.0))
    zoom_far = zoom * float(rng.uniform(3.0, 4.0))
    return SyntheticTriplet(
        ref=quantize(TF.center_crop(context, [size, size]).contiguous()),
        closer=quantize(rotate_scale(context, angle, 1.0 + zoom, size)),
        farther=quantize(rotate_scale(context, angle_far, 1.0 + zoom_far, size)),
        params={
            "context_box": [top, left, side],
            "angle_closer": angle,
            "scale_closer": 1.0 + zoom,
            "angle_farther": angle_far,
            "scale_farther": 1.0 + zoom_far,
        },
    )


def family_shift_vs_noise(
    photo_a, photo_b, rng: np.random.Generator, size: int = 224, min_rms: float = 0.02, tries: int = 20
) -> SyntheticTriplet:
    """Closer: the reference translated by 1–3 px; farther: the reference plus Gaussian noise
    with ``‖farther - ref‖₂ < ‖closer - ref‖₂`` (asserted on the 8-bit images).

    Flat crops make a translation nearly invisible, so up to ``tries`` crops are drawn and the
    first whose translation changes the pixels by an RMS of at least ``min_rms`` is kept (else
    the one with the largest change).
    """
    context_px = size + 2 * SHIFT_MARGIN
    best = None
    for _ in range(tries):
        top, left, side = _box(photo_a, rng)
        context = quantize(crop_resize(photo_a, top, left, side, context_px))
        while True:
            dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
            if dx or dy:
                break
        ref = translate_crop(context, 0, 0, size)
        shifted = translate_crop(context, dx, dy, size)
        shift_l2 = float(torch.linalg.vector_norm(shifted - ref))
        if best is None or shift_l2 > best[0]:
            best = (shift_l2, ref, shifted, [top, left, side], dx, dy)
        if shift_l2 >= min_rms * math.sqrt(ref.numel()):
            break
    shift_l2, ref, shifted, box, dx, dy = best
    if shift_l2 == 0.0:
        raise DatasetError("shift-vs-noise: the photo is flat, a translation does not change it")
    direction = torch.from_numpy(rng.standard_normal(ref.shape).astype(np.float32))
    direction /= torch.linalg.vector_norm(direction)
    ratio = float(rng.uniform(0.5, 0.85))
    for _ in range(50):
        noisy = quantize(add_noise(ref, direction, ratio * shift_l2))
        noise_l2 = float(torch.linalg.vector_norm(noisy - ref))
        if noise_l2 < shift_l2:
            break
        ratio *= 0.8  # 8-bit rounding can lengthen a tiny noise vector; shrink until it fits
    if not noise_l2 < shift_l2:  # the family's defining property; checked even under python -O
        raise AssertionError(f"shift-vs-noise: noise l2 {noise_l2:.4g} is not below shift l2 {shift_l2:.4g}")
    if noise_l2 == 0.0:
        raise DatasetError("shift-vs-noise: the photo is too flat, the noise rounds away on the 8-bit grid")
    return SyntheticTriplet(
        ref=ref,
        closer=shifted,
        farther=noisy,
        params={
            "context_box": box,
            "dx": dx,
            "dy": dy,
            "shift_l2": shift_l2,
            "noise_l2": noise_l2,
            "noise_ratio": ratio,
        },
    )


FAMILIES: dict[str, Callable[..., SyntheticTriplet]] = {
    "view": family_view,
    "mirror": family_mirror,
    "blur": family_blur,
    "noise": family_noise,
    "jpeg": family_jpeg,
    "color": family_color,
    "contrast": family_contrast,
    "geometric": family_geometric,
    "shift-vs-noise": family_shift_vs_noise,
}


# --------------------------------------------------------------------------- writer


class _PhotoCache:
    """Decoded photos as uint8 (3, H, W) tensors, least recently used dropped first."""

    def __init__(self, root: Path, keys: Sequence[str], capacity: int = 64):
        self.root, self.keys, self.capacity = root, keys, capacity
        self._items: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __getitem__(self, index: int) -> torch.Tensor:
        if index in self._items:
            self._items.move_to_end(index)
            return self._items[index]
        pil = open_rgb(self.root / self.keys[index], max_side=PHOTO_MAX_SIDE)
        photo = (pil_to_tensor(pil) * 255.0).round().to(torch.uint8)
        self._items[index] = photo
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return photo


def _relative_to(path: Path, folder: Path) -> str | None:
    """``path`` relative to ``folder`` as a posix string if it lies inside it, else None."""
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return None


def _balanced_labels(families: list[str], seed: int) -> list[int]:
    """right_vote per triplet: within each family half 0 and half 1 (odd counts decided by the
    seed), in a seeded random order."""
    rng = np.random.default_rng([seed, 0x1AB])
    labels = [0] * len(families)
    for name in dict.fromkeys(families):
        where = [i for i, f in enumerate(families) if f == name]
        values = (np.arange(len(where)) + int(rng.integers(2))) % 2
        for i, v in zip(where, rng.permutation(values), strict=True):
            labels[i] = int(v)
    return labels


def make_2afc(
    images: str | os.PathLike,
    out: str | os.PathLike,
    n: int = 200,
    seed: int = 0,
    split: str = "test",
    families: Sequence[str] | None = None,
    size: int = 224,
    overwrite: bool = False,
) -> dict:
    """Writes ``n`` synthetic 2AFC triplets built from the photos below ``images`` into ``out``.

    Layout (readable by :class:`lipsim.data.NightDataset`): ``out/data.csv`` with header
    ``id,left_vote,right_vote,votes,ref_path,left_path,right_path,family,split,is_imagenet``,
    ``out/ref/000/000.png`` and ``out/distort/000/000_0.png`` / ``000_1.png`` (``size``² RGB PNGs),
    plus ``out/synthetic.json`` recording the seed, photos and per-triplet parameters. Every row
    has ``votes = 6``, ``is_imagenet = False`` and ``right_vote`` 1 when ``_1`` is the closer
    image, 0 when ``_0`` is; the two values are balanced within each family. Families are
    assigned round-robin in the given order (default: all of ``FAMILIES``).

    Needs at least two readable photos; deterministic given ``seed`` and the photo files.
    ``data.csv`` is written last, so an interrupted run leaves no readable dataset. An existing
    ``data.csv`` in ``out`` is an error unless ``overwrite``. Returns a summary dict:
    ``{"out", "n", "split", "size", "seed", "photos", "families": {name: count}, "right_vote_mean"}``.
    """
    families = list(FAMILIES) if families is None else list(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise DatasetError(
            f"unknown family {', '.join(unknown) or '(none given)'} (choose from {', '.join(FAMILIES)})"
        )
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if int(n) < 1:
        raise DatasetError(f"n must be at least 1, got {n}")
    if int(seed) < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {seed}")
    n, seed, size = int(n), int(seed), int(size)
    if size < 32:
        raise DatasetError(f"size must be at least 32 pixels, got {size}")
    images, out = Path(images), Path(out)
    keys = list_images(images)
    inside = _relative_to(out, images)
    if inside is not None:  # never read our own output (or an earlier run's) as photos
        keys = [k for k in keys if not (inside == "." or k == inside or k.startswith(inside + "/"))]
    if len(keys) < 2:
        raise DatasetError(f"{images}: need at least 2 photos, found {len(keys)}")
    if (out / "data.csv").exists() and not overwrite:
        raise DatasetError(
            f"{out}: already contains data.csv (pass overwrite=True / --overwrite to replace it)"
        )

    photos = _PhotoCache(images, keys)
    assigned = [families[i % len(families)] for i in range(n)]
    labels = _balanced_labels(assigned, seed)
    rows, meta = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        a = int(rng.integers(len(keys)))
        b = (a + int(rng.integers(1, len(keys)))) % len(keys)
        try:
            triplet = FAMILIES[assigned[i]](photos[a], photos[b], rng, size)
        except DatasetError as exc:
            raise DatasetError(f"{images / keys[a]}: triplet {i}: {exc}") from None
        folder = f"{i // 1000:03d}"
        stem = f"{i % 1000:03d}"
        ref_path = f"ref/{folder}/{stem}.png"
        left_path = f"distort/{folder}/{stem}_0.png"
        right_path = f"distort/{folder}/{stem}_1.png"
        left, right = (
            (triplet.farther, triplet.closer) if labels[i] == 1 else (triplet.closer, triplet.farther)
        )
        for image, rel in ((triplet.ref, ref_path), (left, left_path), (right, right_path)):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            save_png(image, out / rel)
        rows.append(
            [i, 1 - labels[i], labels[i], 6, ref_path, left_path, right_path, assigned[i], split, False]
        )
        meta.append(
            {
                "id": i,
                "family": assigned[i],
                "right_vote": labels[i],
                "photo_a": keys[a],
                "photo_b": keys[b],
                "params": triplet.params,
            }
        )

    counts = {name: assigned.count(name) for name in families if name in assigned}
    summary = {
        "out": str(out),
        "n": n,
        "split": split,
        "size": size,
        "seed": seed,
        "photos": len(keys),
        "families": counts,
        "right_vote_mean": float(np.mean(labels)),
    }
    # no output path inside: the folder's bytes depend only on the seed and the photos
    record = {k: v for k, v in summary.items() if k != "out"}
    text = json.dumps({**record, "photo_keys": keys, "triplets": meta}, indent=1)
    write_text_atomic(out / SYNTHETIC_MARKER, text)  # also tells NightDataset the data is synthetic

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_HEADER)
            writer.writerows(rows)

    atomic_write(out / "data.csv", write_csv)  # last: a folder with data.csv is complete
    return summary
