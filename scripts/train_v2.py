"""Default model v2 (issue 16): a trained trunk behind a global pooling head, distilled and
hinge-tuned in one loop on the CPU.

Per step: ``--batch`` pool images regressed onto ``--target-scale`` × the teacher's cached
embedding (RMSE, as ``lipsim train distill``; random flips share the target); optionally
``--views`` extra views (a 2–8 px translation, a crop of half to all of the image, or a flip)
regressed onto the teacher's embedding *of that same view* (the teacher runs online on them);
optionally ``--triplets`` hard triplets built from the TRAINING photos
(:func:`lipsim.evaluate.hard.build_hard_set`) labelled by the teacher's own choice, with the hinge
``max(0, margin - (d_wrong - d_right))`` on the appended-constant cosine distance, weighted by
``--hinge-weight``. Adam (0.5, 0.9), linear warm-up then cosine. The trunk is copied from
``--init`` (default: the packaged s2d-lite model), the head starts fresh.

    python scripts/train_v2.py --out runs/v2/m0.2 --steps 120 --margin 0.2 --triplets 8
    python scripts/train_v2.py --out runs/v2/m0.2 --steps 120 --margin 0.2 --triplets 8 --resume

A checkpoint (``last.pt``: weights, optimiser, step, RNG states) is written every
``--checkpoint-every`` steps and at the end; ``--resume`` continues it bit for bit with the same
arguments (``--steps`` may grow: the schedule is recomputed from the new total).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

import lipsim
from lipsim.archs import get_config, transplant
from lipsim.checkpoints import save_model
from lipsim.evaluate import hard
from lipsim.fileio import atomic_write, write_npy_atomic, write_text_atomic


def _u8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images as uint8 (how triplets are kept in memory and on disk)."""
    return (x * 255).round().to(torch.uint8)


def pool_array(pool: Path, cache_file: Path) -> tuple[np.ndarray, list[str]]:
    """The pool's images as one uint8 (N, 3, 224, 224) array (decoded once, then memory-mapped)."""
    from lipsim.data import ImageFolderDataset

    folder = ImageFolderDataset(pool)
    keys = list(folder.keys)
    if not cache_file.exists():
        arr = np.empty((len(keys), 3, 224, 224), np.uint8)
        for i in range(len(keys)):
            x, _ = folder[i]
            arr[i] = (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        write_npy_atomic(cache_file, arr)
    return np.load(cache_file, mmap_mode="r"), keys


def hard_triplets(photos: Path, cache: Path, refs_per_photo: int, teacher_name: str | None) -> dict:
    """Hard triplets from the training photos (y = 1: x1 is closer), labelled by the teacher's
    choice, or with ``teacher_name=None`` by construction (x0 is the right answer; the teacher
    agrees with the construction on every held-out triplet, and running it costs CPU time).
    Saved under ``cache`` once built."""
    label = teacher_name or "construction"
    saved = Path(cache) / f"train_triplets_{Path(photos).name}_{refs_per_photo}_{label}.pt"
    if saved.exists():
        return torch.load(saved, weights_only=True)
    hs = hard.build_hard_set(photos, refs_per_photo=refs_per_photo, seed=1)
    y = torch.zeros(len(hs), dtype=torch.long)
    agree = float("nan")
    if teacher_name:
        t = hard.teacher_embeddings(hs, teacher_name, cache)
        t0 = 1 - (t["ref"] * t["x0"]).sum(1)
        t1 = 1 - (t["ref"] * t["x1"]).sum(1)
        y = (t1 < t0).long()
        agree = float((t0 < t1).double().mean())
    out = {"ref": _u8(hs.ref), "x0": _u8(hs.x0), "x1": _u8(hs.x1), "y": y, "agree_construction": agree}
    atomic_write(saved, lambda tmp: torch.save(out, tmp))
    return out


def extra_triplets(root: Path) -> dict:
    """Triplets of a NIGHT-layout folder (e.g. ``lipsim make-2afc --split train``), split "train",
    as uint8 tensors with ``y = 1`` where the judges (or the construction) prefer x1."""
    from lipsim.data import NightDataset

    ds = NightDataset(root, split="train")
    items = [ds[i] for i in range(len(ds))]
    out = {k: _u8(torch.stack([it[k] for it in items])) for k in ("ref", "x0", "x1")}
    out["y"] = torch.tensor([int(float(it["y"]) > 0.5) for it in items], dtype=torch.long)
    return out


def view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view of a (3, 224, 224) image: translation, crop or flip."""
    kind = int(torch.randint(0, 3, (), generator=gen))
    if kind == 0:
        dx, dy = (int(v) for v in torch.randint(-8, 9, (2,), generator=gen))
        padded = torch.nn.functional.pad(x[None], (8, 8, 8, 8), mode="reflect")[0]
        return padded[:, 8 + dy : 8 + dy + 224, 8 + dx : 8 + dx + 224].contiguous()
    if kind == 1:
        side = int(torch.randint(112, 225, (), generator=gen))
        top, left = (int(v) for v in torch.randint(0, 224 - side + 1, (2,), generator=gen))
        crop = x[:, top : top + side, left : left + side]
        return TF.resize(crop, [224, 224], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(
            0, 1
        )
    return TF.hflip(x).contiguous()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arch", default="s2d-lite-pool-distill")
    p.add_argument(
        "--head", default=None, help="override the architecture's head (sum, norm, sum_norm, sum_std)"
    )
    p.add_argument(
        "--linear-layers", type=int, default=None, help="override depth_linear (0: no head layers)"
    )
    p.add_argument("--init", default="default", help="model whose trunk seeds the student ('none': fresh)")
    p.add_argument("--pool", type=Path, default=Path("data/pool"))
    p.add_argument("--cache", type=Path, default=Path("data/pool_cache_ensemble"))
    p.add_argument(
        "--targets-npy",
        type=Path,
        default=None,
        help="teacher rows as one .npy (e.g. a cache shard being built)",
    )
    p.add_argument("--pool-array", type=Path, default=Path("data/pool_u8.npy"))
    p.add_argument("--teacher", default="offline-ensemble")
    p.add_argument("--train-photos", type=Path, default=Path("data/corpus/train/photos"))
    p.add_argument("--hard-cache", type=Path, default=Path("data/hard_cache"))
    p.add_argument("--refs-per-photo", type=int, default=4)
    p.add_argument(
        "--extra-triplets",
        type=Path,
        default=None,
        help="a NIGHT-layout folder of training triplets added to the hard ones (split train)",
    )
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--views", type=int, default=0, help="extra views per step with the teacher online")
    p.add_argument("--triplets", type=int, default=0, help="hard training triplets per step (hinge)")
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument(
        "--labels", choices=("teacher", "construction"), default="construction", help="labels of the triplets"
    )
    p.add_argument("--hinge-weight", type=float, default=1.0)
    p.add_argument("--target-scale", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--trunk-lr-scale", type=float, default=1.0, help="the trunk's lr relative to the head's")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    last = args.out / "last.pt"
    if last.exists() and not args.resume:
        p.error(f"{last} exists: add --resume to continue it, or choose another --out")

    from lipsim.teachers.cache import EmbeddingCache

    distil = args.batch > 0 or args.views > 0
    if distil:
        images, keys = pool_array(args.pool, args.pool_array)
        if args.targets_npy:  # rows in the pool's key order; all-zero rows (not yet embedded) are skipped
            target_rows = torch.from_numpy(
                np.array(np.load(args.targets_npy, mmap_mode="r"), dtype=np.float32)
            )
        else:
            target_rows = EmbeddingCache(args.cache).lookup(keys).float()
        usable = torch.nonzero(target_rows.abs().sum(1) > 0).flatten()
        print(f"{len(usable)} of {len(keys)} pool images have teacher targets", flush=True)
    elif not args.triplets:
        p.error("nothing to train: give --batch, --views or --triplets")
    config = get_config(args.arch)
    if args.head:
        config = dataclasses.replace(config, name=f"{config.name}-{args.head}", head=args.head)
    if args.linear_layers is not None:
        config = dataclasses.replace(
            config, name=f"{config.name}-l{args.linear_layers}", depth_linear=args.linear_layers
        )
        if args.linear_layers == 0:  # the pooled features themselves, no padding
            config = dataclasses.replace(config, linear_width=0, out_dim=config.flat_dim())
    if distil and config.out_dim != target_rows.shape[1]:
        p.error(f"{args.arch} outputs {config.out_dim} features, the teacher {target_rows.shape[1]}")
    torch.manual_seed(args.seed)
    model = lipsim.LipSim.from_config(config, embedding="append")
    if args.init != "none":
        copied = transplant(
            lipsim.load(None if args.init == "default" else args.init).backbone, model.backbone
        )
        print(f"copied {len(copied)} tensors from {args.init}", flush=True)
    teacher = None
    if args.views:
        from lipsim.teachers import get_teacher

        teacher = get_teacher(args.teacher).eval()
    trip = None
    if args.triplets:
        trip = hard_triplets(
            args.train_photos,
            args.hard_cache,
            args.refs_per_photo,
            args.teacher if args.labels == "teacher" else None,
        )
        print(
            f"{len(trip['y'])} hard training triplets; teacher agrees with the construction on "
            f"{trip['agree_construction']:.3f}",
            flush=True,
        )
        if args.extra_triplets:
            extra = extra_triplets(args.extra_triplets)
            trip = {k: torch.cat([trip[k], extra[k]]) for k in ("ref", "x0", "x1", "y")}
            print(f"+ {len(extra['y'])} triplets from {args.extra_triplets}", flush=True)
    trunk = [p_ for n, p_ in model.backbone.named_parameters() if not n.startswith("head")]
    head = [p_ for n, p_ in model.backbone.named_parameters() if n.startswith("head")]
    opt = torch.optim.Adam(
        [{"params": trunk, "scale": args.trunk_lr_scale}, {"params": head, "scale": 1.0}],
        lr=args.lr,
        betas=(0.5, 0.9),
    )
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    log: list[dict] = []
    if args.resume and last.exists():
        ckpt = torch.load(last, weights_only=True)  # tensors and plain containers only: no unpickling of code
        model.backbone.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        step, log = ckpt["step"], ckpt["log"]
        print(f"resumed at step {step}", flush=True)

    def checkpoint() -> None:
        state = {
            "model": model.backbone.state_dict(),
            "optimizer": opt.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": step,
            "log": log,
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        atomic_write(last, lambda tmp: torch.save(state, tmp))

    model.train()
    n = len(usable) if distil else 0
    start = time.time()
    seen = 0
    while step < args.steps:
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr * group["scale"]
        parts, t = [], torch.zeros(0, config.out_dim)
        if args.batch:
            idx = usable[torch.randint(0, n, (args.batch,), generator=gen)]
            x = torch.from_numpy(np.stack([images[i] for i in idx.tolist()])).float() / 255
            flip = torch.rand(args.batch, generator=gen) < 0.5
            x[flip] = x[flip].flip(-1)
            t = target_rows[idx] * args.target_scale
            parts = [x]
        if args.views:
            vidx = usable[torch.randint(0, n, (args.views,), generator=gen)]
            v = torch.stack(
                [view(torch.from_numpy(images[i].copy()).float() / 255, gen) for i in vidx.tolist()]
            )
            with torch.no_grad():
                tv = teacher(v).float() * args.target_scale
            parts.append(v)
            t = torch.cat([t, tv])
        m = len(t)
        if trip is not None:
            tidx = torch.randint(0, len(trip["y"]), (args.triplets,), generator=gen)
            parts += [trip[k][tidx].float() / 255 for k in ("ref", "x0", "x1")]
        f = model.backbone(torch.cat(parts))
        rmse = (f[:m] - t).square().mean().sqrt() if m else torch.zeros(())
        loss = rmse
        hinge = torch.zeros(())
        if trip is not None:
            g = torch.cat([f[m:], torch.ones_like(f[m:, :1])], 1)
            g = g / g.norm(dim=1, keepdim=True)
            gr, g0, g1 = g.split(args.triplets)
            d0, d1 = 1 - (gr * g0).sum(1), 1 - (gr * g1).sum(1)
            sign = 2.0 * trip["y"][tidx].double().float() - 1  # +1: x1 is the right answer
            hinge = torch.clamp(args.margin - (d0 - d1) * sign, min=0).mean()
            loss = loss + args.hinge_weight * hinge
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        seen += len(torch.cat(parts))
        if step % 5 == 0 or step == args.steps:
            entry = {"step": step, "lr": lr, "rmse": float(rmse.detach()), "hinge": float(hinge.detach())}
            entry["img_per_s"] = seen / (time.time() - start)
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if step % args.checkpoint_every == 0 or step == args.steps:
            checkpoint()
    model.eval()
    meta = {"teacher": args.teacher, "recipe": "scripts/train_v2.py " + " ".join(sys.argv[1:])}
    save_model(model, args.out / "model.safetensors", extra_metadata=meta)
    write_text_atomic(args.out / "log.json", json.dumps(log, indent=1))
    print(
        f"wrote {args.out / 'model.safetensors'} after {step} steps ({time.time() - start:.0f} s)", flush=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
