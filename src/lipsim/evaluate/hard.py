"""The hard held-out evaluation of issue 16: where pixel metrics mislead, and under attack.

Built deterministically (``seed``) from a folder of photos (the held-out ones for evaluation, the
training ones for hinge triplets), every photo scaled so that its short side is ``short_side``
pixels and cut into 224×224 crops. Per reference crop:

* ``same-scene``: the crop shifted by half its side (112 px) vs the crop of *another* photo that
  is nearest to the reference in pixel ℓ2 among ``n_candidates`` crops of each other photo;
* ``mirror``: the mirrored reference vs that same pixel-nearest crop;
* ``translation``: the reference window moved by 2–6 px vs the reference plus Gaussian noise
  whose ℓ2 norm is half the translation's;
* ``distortion``: a weaker vs a stronger distortion of one kind (blur, JPEG, noise, in turn).

The right answer is always ``x0`` (``y = 0``). Also measured: a *ladder* per photo (shifts of 2
and 6 px, JPEG q30 and q5, blur σ 1 and 4, noise 10/255 and 50/255, the mirror, two other photos),
scored as the Spearman correlation of a metric's distances with the teacher's; *retrieval*: each
reference as a query against a gallery of every half-crop-shifted view and every pixel-nearest
crop, a hit when the top-1 item comes from the query's photo; certified scores at 36/255 from the
model's own certificates; and an APGD-CE ℓ2 attack on the reference (:mod:`.attack_eval`).

``python scripts/evaluate_hard.py --model default --out runs/hard/packaged`` runs it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from ..data._io import jpeg_roundtrip, open_rgb, pil_to_tensor
from ..data.folders import list_images

__all__ = ["HardSet", "build_hard_set", "evaluate_model", "FAMILIES", "LADDER"]

SIZE = 224
HALF = SIZE // 2
MARGIN = 6
FAMILIES = ("same-scene", "mirror", "translation", "distortion")
LADDER = (
    "shift 2px",
    "shift 6px",
    "jpeg q30",
    "jpeg q5",
    "blur σ1",
    "blur σ4",
    "noise 10/255",
    "noise 50/255",
    "mirror",
    "nearest other photo",
    "random other photo",
)


@dataclass
class HardSet:
    """Triplets (ref, x0 = right answer, x1), ladders and the retrieval gallery, as float32 tensors."""

    ref: torch.Tensor
    x0: torch.Tensor
    x1: torch.Tensor
    family: list[str]
    photo: list[int]
    ladder_ref: torch.Tensor  # (L, 3, S, S)
    ladder: torch.Tensor  # (L, len(LADDER), 3, S, S)
    gallery: torch.Tensor
    gallery_photo: list[int]
    query_photo: list[int]  # photo of each same-scene reference (queries are those references)
    names: list[str] = field(default_factory=list)

    def digest(self) -> str:
        h = hashlib.sha256()
        for t in (self.ref, self.x0, self.x1, self.ladder_ref, self.ladder, self.gallery):
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.family)


def _photo(path: Path, short_side: int) -> torch.Tensor:
    x = pil_to_tensor(open_rgb(path, max_side=4 * short_side))
    h, w = x.shape[-2:]
    # the short side at short_side, and the long side with room for a half-crop shift and 6 px
    scale = max(short_side / min(h, w), (SIZE + HALF + 2 * MARGIN) / max(h, w))
    size = [round(h * scale), round(w * scale)]
    return TF.resize(x, size, interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)


def _crop(p: torch.Tensor, top: int, left: int) -> torch.Tensor:
    return p[:, top : top + SIZE, left : left + SIZE].contiguous()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(3 * sigma))
    return TF.gaussian_blur(x, [2 * r + 1, 2 * r + 1], [sigma, sigma]).clamp(0, 1)


def _noise(x: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def _candidates(p: torch.Tensor, n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` crops of ``p``: squares of random side (224 to the short side) resized to 224."""
    h, w = p.shape[-2:]
    out = []
    for _ in range(n):
        side = int(rng.integers(SIZE, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        region = p[:, top : top + side, left : left + side]
        if side != SIZE:
            region = TF.resize(region, [SIZE, SIZE], interpolation=InterpolationMode.BICUBIC, antialias=True)
        out.append(region.clamp(0, 1))
    return torch.stack(out)


def _distortion_pair(x: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    kind = k % 3
    if kind == 0:
        return _blur(x, 1.0), _blur(x, 2.5)
    if kind == 1:
        return jpeg_roundtrip(x, 40), jpeg_roundtrip(x, 10)
    return _noise(x, 8 / 255, gen), _noise(x, 24 / 255, gen)


def build_hard_set(
    folder, refs_per_photo: int = 6, n_candidates: int = 40, short_side: int = 320, seed: int = 0
) -> HardSet:
    """The triplets, ladders and gallery of the module docstring from the photos in ``folder``."""
    folder = Path(folder)
    paths = [folder / k for k in list_images(folder)]
    if len(paths) < 3:
        raise ValueError(f"{folder}: need at least 3 photos, found {len(paths)}")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    photos = [_photo(p, short_side) for p in paths]
    cands = [_candidates(p, n_candidates, rng) for p in photos]
    owner = torch.cat([torch.full((len(c),), i) for i, c in enumerate(cands)])
    pool = torch.cat(cands)
    flat_pool = pool.flatten(1)
    refs, x0s, x1s, fams, srcs = [], [], [], [], []
    lad_refs, ladders, gallery, gallery_photo, query_photo = [], [], [], [], []
    k = 0
    for i, p in enumerate(photos):
        h, w = p.shape[-2:]
        for r in range(refs_per_photo):
            # room for a half-crop shift along the longer side and 6 px everywhere
            wide = w >= h
            span_w = w - SIZE - 2 * MARGIN - (HALF if wide else 0)
            span_h = h - SIZE - 2 * MARGIN - (0 if wide else HALF)
            top = MARGIN + int(rng.integers(0, max(span_h, 0) + 1))
            left = MARGIN + int(rng.integers(0, max(span_w, 0) + 1))
            ref = _crop(p, top, left)
            shifted = _crop(p, top, left + HALF) if wide else _crop(p, top + HALF, left)
            others = owner != i
            other_idx = others.nonzero().flatten()
            dist = (flat_pool[other_idx] - ref.flatten()).norm(dim=1)
            near_idx = int(other_idx[int(dist.argmin())])
            nearest = pool[near_idx].clone()  # a copy: a view would keep the whole pool alive
            s = 2 + (k % 5)
            dx, dy = [(s, 0), (-s, 0), (0, s), (0, -s)][int(rng.integers(0, 4))]
            moved = _crop(p, top + dy, left + dx)
            noise = torch.randn(ref.shape, generator=gen)
            noisy = (ref + noise * (0.5 * float((moved - ref).norm()) / float(noise.norm()))).clamp(0, 1)
            weak, strong = _distortion_pair(ref, k, gen)
            for fam, a, b in (
                ("same-scene", shifted, nearest),
                ("mirror", TF.hflip(ref), nearest),
                ("translation", moved, noisy),
                ("distortion", weak, strong),
            ):
                refs.append(ref)
                x0s.append(a)
                x1s.append(b)
                fams.append(fam)
                srcs.append(i)
            gallery += [shifted, nearest]
            gallery_photo += [i, int(owner[near_idx])]
            query_photo.append(i)
            if r == 0:
                rand_other = pool[int(other_idx[int(rng.integers(0, len(other_idx)))])].clone()
                lad_refs.append(ref)
                ladders.append(
                    torch.stack(
                        [
                            _crop(p, top, left + 2),
                            _crop(p, top, left + 6),
                            jpeg_roundtrip(ref, 30),
                            jpeg_roundtrip(ref, 5),
                            _blur(ref, 1.0),
                            _blur(ref, 4.0),
                            _noise(ref, 10 / 255, gen),
                            _noise(ref, 50 / 255, gen),
                            TF.hflip(ref),
                            nearest,
                            rand_other,
                        ]
                    )
                )
            k += 1
    return HardSet(
        ref=torch.stack(refs),
        x0=torch.stack(x0s),
        x1=torch.stack(x1s),
        family=fams,
        photo=srcs,
        ladder_ref=torch.stack(lad_refs),
        ladder=torch.stack(ladders),
        gallery=torch.stack(gallery),
        gallery_photo=gallery_photo,
        query_photo=query_photo,
        names=[p.name for p in paths],
    )


# --------------------------------------------------------------------------- measuring


def _embed_all(fn, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i : i + batch]).double() for i in range(0, len(x), batch)])


def teacher_embeddings(hs: HardSet, teacher: str = "offline-ensemble", cache_dir=None) -> dict:
    """The teacher's unit-norm embeddings of every image of the set (cached by the set's digest)."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"teacher_{teacher}_{hs.digest()}.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
    from ..teachers import get_teacher

    net = get_teacher(teacher).eval()
    out = {k: _embed_all(net, getattr(hs, k)) for k in ("ref", "x0", "x1", "ladder_ref", "gallery")}
    out["ladder"] = _embed_all(net, hs.ladder.flatten(0, 1)).view(*hs.ladder.shape[:2], -1)
    if path is not None:
        from ..fileio import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(out, tmp))
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.argsort().argsort().astype(float), b.argsort().argsort().astype(float)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra * ra).sum() * (rb * rb).sum()))


def _cos_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - (a * b).sum(-1)


def _score(d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
    """Right answer is x0: 1 if d0 < d1, 0.5 on a tie."""
    return (d0 < d1).double() + 0.5 * (d0 == d1).double()


def evaluate_model(
    model,
    hs: HardSet,
    teacher: dict | None,
    attack_per_family: int = 10,
    attack_steps: int = 20,
    eps_cert: float = 36 / 255,
    eps_attack: float = 0.5,
) -> dict:
    """All numbers of the hard evaluation for ``model`` (a :class:`lipsim.LipSim`)."""
    model = model.eval()
    fam = np.array(hs.family)
    with torch.no_grad():
        certs = [
            model.certify_2afc(hs.ref[i : i + 32], hs.x0[i : i + 32], hs.x1[i : i + 32])
            for i in range(0, len(hs), 32)
        ]
    closer = torch.cat([c.closer for c in certs])
    radius = torch.cat([c.radius for c in certs]).double()
    ours = (closer == 0).double() + 0.5 * (closer == -1).double()
    pix = _score((hs.ref - hs.x0).flatten(1).norm(dim=1), (hs.ref - hs.x1).flatten(1).norm(dim=1))
    out: dict = {"n": len(hs), "families": {}}
    t_score = t_closer = None
    if teacher is not None:
        t0, t1 = _cos_dist(teacher["ref"], teacher["x0"]), _cos_dist(teacher["ref"], teacher["x1"])
        t_score = _score(t0, t1)
        t_closer = torch.where(t0 < t1, 0, torch.where(t1 < t0, 1, -1))

    def summary(mask: np.ndarray) -> dict:
        m = torch.from_numpy(mask)
        entry = {
            "n": int(mask.sum()),
            "ours": float(ours[m].mean()),
            "pixel_l2": float(pix[m].mean()),
            "certified_36": float((ours[m] * (radius[m] > eps_cert)).mean()),
            "median_radius": float(radius[m].median()),
        }
        if t_score is not None:
            entry["teacher"] = float(t_score[m].mean())
            entry["agree_teacher"] = float((closer[m] == t_closer[m]).double().mean())
        return entry

    out["all"] = summary(np.ones(len(fam), bool))
    for f in FAMILIES:
        out["families"][f] = summary(fam == f)

    # ladder: Spearman of distances with the teacher's, per photo
    emb_ref = _embed_all(model.embed, hs.ladder_ref)
    emb_lad = _embed_all(model.embed, hs.ladder.flatten(0, 1)).view(*hs.ladder.shape[:2], -1)
    d_ours = (emb_lad - emb_ref[:, None]).norm(dim=-1).numpy()
    d_pix = (hs.ladder - hs.ladder_ref[:, None]).flatten(2).norm(dim=-1).double().numpy()
    out["ladder"] = {"changes": list(LADDER), "ours": d_ours.tolist(), "pixel_l2": d_pix.tolist()}
    if teacher is not None:
        d_t = _cos_dist(teacher["ladder"], teacher["ladder_ref"][:, None]).numpy()
        out["ladder"]["teacher"] = d_t.tolist()
        rho = [_spearman(d_ours[i], d_t[i]) for i in range(len(d_t))]
        rho_pix = [_spearman(d_pix[i], d_t[i]) for i in range(len(d_t))]
        out["ladder"]["spearman_ours"] = rho
        out["ladder"]["spearman_pixel"] = rho_pix
        out["ladder_median_spearman"] = float(np.median(rho))
        out["ladder_median_spearman_pixel"] = float(np.median(rho_pix))

    # retrieval: queries = same-scene references, gallery = shifted views + pixel-nearest crops
    queries = hs.ref[fam == "same-scene"]
    q = _embed_all(model.embed, queries)
    g = _embed_all(model.embed, hs.gallery)
    gp = torch.tensor(hs.gallery_photo)
    qp = torch.tensor(hs.query_photo)
    out["retrieval_top1"] = float((gp[torch.cdist(q, g).argmin(1)] == qp).double().mean())
    out["retrieval_top1_pixel"] = float(
        (gp[torch.cdist(queries.flatten(1), hs.gallery.flatten(1)).argmin(1)] == qp).double().mean()
    )
    if teacher is not None:
        tq = teacher["ref"][torch.from_numpy(fam == "same-scene")]
        out["retrieval_top1_teacher"] = float(
            (gp[torch.cdist(tq, teacher["gallery"]).argmin(1)] == qp).double().mean()
        )

    if attack_per_family > 0:
        out["attack"] = attack(model, hs, attack_per_family, attack_steps, eps_attack)
    return out


def attack_subset(hs: HardSet, per_family: int) -> list[int]:
    """The first ``per_family`` triplets of each family (spread over the photos)."""
    idx = []
    for f in FAMILIES:
        idx += [i for i, g in enumerate(hs.family) if g == f][:per_family]
    return idx


def attack(model, hs: HardSet, per_family: int, steps: int, eps: float) -> dict:
    """APGD-CE (torchattacks) in ℓ2 on the reference, as ``lipsim attack`` runs it."""
    from .attack_eval import run_attack
    from .attacks import AttackSettings
    from .metrics import LipSimMetric

    idx = attack_subset(hs, per_family)
    items = [
        {"ref": hs.ref[i], "x0": hs.x0[i], "x1": hs.x1[i], "y": torch.tensor(0.0), "id": str(i)} for i in idx
    ]
    settings = AttackSettings("apgd-ce", "l2", eps, steps=steps, seed=0)
    res = run_attack(LipSimMetric(model), items, settings, batch_size=20)
    keep = (
        "n",
        "natural_2afc",
        "attacked_2afc",
        "certified_2afc",
        "violations",
        "violations_measured_norm",
        "n_flipped",
        "max_delta_l2",
    )
    out = {k: res.get(k) for k in keep}
    out["kept_share"] = out["attacked_2afc"] / out["natural_2afc"] if out["natural_2afc"] else None
    out["steps"] = steps
    out["eps"] = eps
    return out


def markdown(label: str, r: dict) -> str:
    """One results table (per family) plus the summary lines, as Markdown."""
    lines = [
        f"**{label}**",
        "",
        "| family | n | ours | teacher | pixel ℓ2 | agree w/ teacher | cert 36/255 | median radius |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in [("all", r["all"])] + list(r["families"].items()):
        lines.append(
            f"| {name} | {e['n']} | {e['ours']:.3f} | {e.get('teacher', float('nan')):.3f} "
            f"| {e['pixel_l2']:.3f} | {e.get('agree_teacher', float('nan')):.3f} "
            f"| {e['certified_36']:.3f} | {e['median_radius']:.3f} |"
        )
    lines.append("")
    if "ladder_median_spearman" in r:
        lines.append(
            f"ladder median Spearman with the teacher: ours {r['ladder_median_spearman']:.3f}, "
            f"pixel ℓ2 {r['ladder_median_spearman_pixel']:.3f}"
        )
    lines.append(
        f"retrieval top-1: ours {r['retrieval_top1']:.3f}, "
        f"teacher {r.get('retrieval_top1_teacher', float('nan')):.3f}, "
        f"pixel ℓ2 {r['retrieval_top1_pixel']:.3f}"
    )
    if "attack" in r:
        a = r["attack"]
        lines.append(
            f"APGD-CE ℓ2 {a['eps']} ({a['steps']} steps) on {a['n']} triplets: "
            f"natural {a['natural_2afc']:.3f}, "
            f"attacked {a['attacked_2afc']:.3f} ({a['kept_share']:.0%} kept), certified at {a['eps']} "
            f"{a['certified_2afc']:.3f}, violations {a['violations']}"
        )
    return "\n".join(lines) + "\n"


def save_report(out_dir, label: str, result: dict) -> None:
    from ..fileio import write_text_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "hard.json", json.dumps(result, indent=1))
    write_text_atomic(out_dir / "hard.md", markdown(label, result))
