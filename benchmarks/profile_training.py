"""Where a CPU training step's wall time goes, beside the model-only figure, in one run.

    python benchmarks/profile_training.py --threads 2 --json profile.json

Three measurements, all on this CPU with ``--threads`` torch threads:

1. **hinge** -- the hard-triplet hinge loop of ``scripts/train_v2.py`` (``--triplets`` triplets
   per step sampled from a uint8 tensor cache, converted to float, ``model.backbone`` on
   ref/x0/x1 concatenated, appended-constant cosine distances, hinge, backward, Adam) on
   ``s2d-lite-pool`` (``embedding="append"``). The triplet cache holds random uint8 images (no
   data files); the trunk is not copied from the packaged model (that changes no timing).
2. **distill** -- the real ``lipsim train distill`` loop (``lipsim.train.run_distill``) with an
   embedding-cache teacher, on a temporary folder of random JPEGs and a cache built by
   ``lipsim.teachers.build_embedding_cache`` (a random-projection teacher of the architecture's
   output dimension). Phases are timed by wrapping the loop's own functions: the loader's
   ``next`` (split into JPEG decoding ``read_pil``, augmentation ``DistillViews`` and the rest:
   collate, sampler), the cache lookup (``DistillTask._targets``), the forward + loss (the rest
   of ``DistillTask.compute``), ``torch.autograd.backward`` and the optimiser's ``step``.
3. **model only** -- forward + backward + Adam on a fixed in-memory batch of the same size and
   loss (no data, no cache), for each loop, one step after every loop step (a shared machine's
   load then weighs on both alike); and the certified inference throughput of the
   packaged model (``lipsim.load().freeze().embed`` on a batch of 16, ``torch.no_grad``).

Per phase: the median seconds per step over ``--steps`` steps after ``--warmup`` steps, and its
share of the median step. img/s counts images through the network (3 per triplet; 2 views per
distillation item with ``--views published``). The machine is shared: the load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import lipsim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402


class Phases:
    """Per-step phase timers: ``add`` accumulates into the current step, ``end_step`` files it."""

    def __init__(self) -> None:
        self.cur: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def add(self, name: str, seconds: float) -> None:
        self.cur[name] += seconds

    @contextlib.contextmanager
    def time(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def end_step(self, total: float) -> None:
        row = dict(self.cur)
        row["step"] = total
        self.steps.append(row)
        self.cur = defaultdict(float)

    def summary(self, warmup: int, order: list[str], images: int) -> dict:
        rows = self.steps[warmup:]
        med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in order + ["step"]}
        step = med["step"]
        return {
            "steps_measured": len(rows),
            "images_per_step": images,
            "step_s": step,
            "img_per_s": images / step,
            "phases": {k: {"s": med[k], "share": med[k] / step} for k in order},
        }


def timed(phases: Phases, name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases.add(name, time.perf_counter() - t0)

    return wrapper


# -- 1. the hinge loop of scripts/train_v2.py -------------------------------------------------
def hinge_loss(model, f: torch.Tensor, y: torch.Tensor, n: int, margin: float) -> torch.Tensor:
    g = torch.cat([f, torch.ones_like(f[:, :1])], 1)
    g = g / g.norm(dim=1, keepdim=True)
    gr, g0, g1 = g.split(n)
    d0, d1 = 1 - (gr * g0).sum(1), 1 - (gr * g1).sum(1)
    sign = 2.0 * y.float() - 1
    return torch.clamp(margin - (d0 - d1) * sign, min=0).mean()


def hinge_model(arch: str):
    torch.manual_seed(0)
    model = lipsim.LipSim.from_config(lipsim.archs.get_config(arch), embedding="append")
    model.train()
    opt = torch.optim.Adam(model.backbone.parameters(), lr=1e-3, betas=(0.5, 0.9))
    return model, opt


def profile_hinge(args) -> tuple[dict, dict]:
    """The train_v2.py step with --batch 0 --triplets T, phase by phase, alternated with the
    model-only step."""
    ref = model_only_hinge(args)
    model, opt = hinge_model(args.hinge_arch)
    gen = torch.Generator().manual_seed(0)
    n_trip = args.triplet_cache
    trip = {k: torch.randint(0, 256, (n_trip, 3, 224, 224), dtype=torch.uint8) for k in ("ref", "x0", "x1")}
    trip["y"] = torch.randint(0, 2, (n_trip,))
    T = args.triplets
    ph = Phases()
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with ph.time("sample triplets (index uint8 cache)"):
            tidx = torch.randint(0, n_trip, (T,), generator=gen)
            raw = [trip[k][tidx] for k in ("ref", "x0", "x1")]
        with ph.time("uint8 -> float, concat"):
            x = torch.cat([r.float() / 255 for r in raw])
        with ph.time("forward (backbone)"):
            f = model.backbone(x)
        with ph.time("distances + hinge"):
            loss = hinge_loss(model, f, trip["y"][tidx], T, args.margin)
        with ph.time("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with ph.time("optimizer (Adam step)"):
            opt.step()
        ph.end_step(time.perf_counter() - t0)
        ref.step()
    order = [
        "sample triplets (index uint8 cache)",
        "uint8 -> float, concat",
        "forward (backbone)",
        "distances + hinge",
        "backward",
        "optimizer (Adam step)",
    ]
    return ph.summary(args.warmup, order, 3 * T), ref.summary(args.warmup)


class ModelOnly:
    """Forward + loss + backward + Adam on a fixed in-memory batch, one step per call; the
    profiles call it after every loop step, so both see the same machine load."""

    def __init__(self, model, opt, x: torch.Tensor, loss_fn) -> None:
        self.model, self.opt, self.x, self.loss_fn = model, opt, x, loss_fn
        self.ph = Phases()

    def step(self) -> None:
        ph = self.ph
        t0 = time.perf_counter()
        with ph.time("forward + loss"):
            loss = self.loss_fn(self.model.backbone(self.x))
        with ph.time("backward"):
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        with ph.time("optimizer (Adam step)"):
            self.opt.step()
        ph.end_step(time.perf_counter() - t0)

    def summary(self, warmup: int) -> dict:
        order = ["forward + loss", "backward", "optimizer (Adam step)"]
        return self.ph.summary(warmup, order, self.x.shape[0])


def model_only_hinge(args) -> ModelOnly:
    model, opt = hinge_model(args.hinge_arch)
    T = args.triplets
    x = torch.rand(3 * T, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 2, (T,))
    return ModelOnly(model, opt, x, lambda f: hinge_loss(model, f, y, T, args.margin))


# -- 2. the distillation loop of `lipsim train distill` with a teacher cache ------------------
class RandomProjectionTeacher(torch.nn.Module):
    """A stand-in teacher for building the cache: unit rows of a fixed random projection of a
    4x4-pooled image (the cache format and the training loop do not care what made the rows)."""

    name = "random-projection"

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("w", torch.randn(3 * 16, dim, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ self.w
        return z / z.norm(dim=1, keepdim=True)


def make_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        # smooth random images (noise upsampled), closer to a photo's JPEG cost than white noise
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        img.save(folder / f"img{i:04d}.jpg", quality=90)


def profile_distill(args, tmp: Path) -> tuple[dict, dict, dict]:
    from lipsim.data import ImageFolderDataset
    from lipsim.data import views as views_mod
    from lipsim.data.folders import ImageFolderDataset as FolderCls
    from lipsim.teachers import build_embedding_cache
    from lipsim.train import DistillConfig, run_distill
    from lipsim.train import distill as distill_mod
    from lipsim.train import loop as loop_mod

    config = lipsim.archs.get_config(args.distill_arch)
    dim = config.out_dim
    images = tmp / "images"
    make_images(images, args.images, args.image_size)
    t0 = time.perf_counter()
    build_embedding_cache(
        RandomProjectionTeacher(dim), ImageFolderDataset(images), tmp / "cache", batch_size=32, progress=False
    )
    cache_build_s = time.perf_counter() - t0

    ref = model_only_distill(args)
    ph = Phases()
    last_end = [None]
    real = {
        "read_pil": FolderCls.read_pil,
        "views": views_mod.DistillViews.__call__,
        "targets": distill_mod.DistillTask._targets,
        "compute": distill_mod.DistillTask.compute,
        "epoch_loader": loop_mod.epoch_loader,
        "train_step": loop_mod.train_step,
        "backward": torch.autograd.backward,
    }

    class TimedLoader:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            it = iter(self.loader)
            while True:
                t = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                finally:
                    ph.add("data", time.perf_counter() - t)
                yield batch

    def epoch_loader(run):
        with ph.time("data"):
            return TimedLoader(real["epoch_loader"](run))

    def train_step(run, net, batch):
        opt = run.optimizer
        if not getattr(opt, "_profiled", False):
            opt.step = timed(ph, "optimizer (Adam step)", opt.step)
            opt._profiled = True
        out = real["train_step"](run, net, batch)
        now = time.perf_counter()
        if last_end[0] is not None:
            ph.end_step(now - last_end[0])
        else:
            ph.cur.clear()  # the first step has no start mark: dropped with the warm-up
            ph.steps.append({"step": math.nan})
        torch.autograd.backward = real["backward"]  # the model-only step, outside the loop's timers
        try:
            ref.step()
        finally:
            torch.autograd.backward = timed_backward
        last_end[0] = time.perf_counter()
        return out

    def compute(self, net, batch, env):
        with ph.time("forward + loss (incl. lookup)"):
            return real["compute"](self, net, batch, env)

    FolderCls.read_pil = timed(ph, "decode (read_pil)", real["read_pil"])
    views_mod.DistillViews.__call__ = timed(ph, "augment (DistillViews)", real["views"])
    distill_mod.DistillTask._targets = timed(ph, "teacher cache lookup", real["targets"])
    distill_mod.DistillTask.compute = compute
    loop_mod.epoch_loader = epoch_loader
    loop_mod.train_step = train_step
    timed_backward = timed(ph, "backward", real["backward"])
    torch.autograd.backward = timed_backward
    try:
        cfg = DistillConfig(
            data_dir=str(images),
            teacher=str(tmp / "cache"),
            arch=args.distill_arch,
            views=args.views,
            out=str(tmp / "run"),
            steps=args.warmup + 1 + args.steps,
            batch_size=args.batch,
            num_workers=0,
            checkpoint_every=0,
            log_every=10**6,
            device="cpu",
            amp="off",
            progress=False,
        )
        t0 = time.perf_counter()
        result = run_distill(cfg)
        run_s = time.perf_counter() - t0
    finally:
        FolderCls.read_pil = real["read_pil"]
        views_mod.DistillViews.__call__ = real["views"]
        distill_mod.DistillTask._targets = real["targets"]
        distill_mod.DistillTask.compute = real["compute"]
        loop_mod.epoch_loader = real["epoch_loader"]
        loop_mod.train_step = real["train_step"]
        torch.autograd.backward = real["backward"]
    # split the nested timers into disjoint phases
    for row in ph.steps:
        if math.isnan(row["step"]):
            continue
        row["collate, sampler, loader"] = (
            row.get("data", 0) - row.get("decode (read_pil)", 0) - row.get("augment (DistillViews)", 0)
        )
        row["forward + loss"] = row.get("forward + loss (incl. lookup)", 0) - row.get(
            "teacher cache lookup", 0
        )
        row["loop overhead (zero_grad, schedule, stats)"] = row["step"] - sum(
            row.get(k, 0)
            for k in ("data", "forward + loss (incl. lookup)", "backward", "optimizer (Adam step)")
        )
    order = [
        "decode (read_pil)",
        "augment (DistillViews)",
        "collate, sampler, loader",
        "teacher cache lookup",
        "forward + loss",
        "backward",
        "optimizer (Adam step)",
        "loop overhead (zero_grad, schedule, stats)",
    ]
    per_item = 1 if args.views == "single" else 2
    out = ph.summary(args.warmup + 1, order, per_item * args.batch)
    out["items_per_s"] = args.batch / out["step_s"]
    extra = {"cache_build_s": cache_build_s, "run_distill_s": run_s, "steps_run": result.step}
    return out, ref.summary(args.warmup + 1), extra


def model_only_distill(args) -> ModelOnly:
    from lipsim.train.distill import build_student, rmse

    config = lipsim.archs.get_config(args.distill_arch)
    torch.manual_seed(0)
    model = build_student(args.distill_arch, config.out_dim)
    model.train()
    opt = torch.optim.Adam(model.backbone.parameters(), lr=1e-3, betas=(0.5, 0.9))
    n = (1 if args.views == "single" else 2) * args.batch
    g = torch.Generator().manual_seed(2)
    x = torch.rand(n, 3, 224, 224, generator=g)
    t = torch.randn(n, config.out_dim, generator=g)
    return ModelOnly(model, opt, x, lambda f: rmse(f, t))


def inference(args) -> dict:
    frozen = lipsim.load().freeze()
    x = torch.rand(16, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    times = []
    with torch.no_grad():
        frozen.embed(x)
        for _ in range(args.inference_repeats):
            t0 = time.perf_counter()
            frozen.embed(x)
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return {"batch": 16, "s_per_batch": s, "img_per_s": 16 / s, "repeats": len(times)}


# -- report -----------------------------------------------------------------------------------
def table(name: str, res: dict, model_only: dict) -> str:
    lines = [
        f"**{name}**: {res['images_per_step']} images/step, median step {res['step_s']:.3f} s, "
        f"{res['img_per_s']:.1f} img/s end to end; model only (same batch, in memory) "
        f"{model_only['step_s']:.3f} s/step, {model_only['img_per_s']:.1f} img/s "
        f"(the loop reaches {res['img_per_s'] / model_only['img_per_s']:.0%} of it)",
        "",
        "| phase | s/step (median) | share of step |",
        "|---|---:|---:|",
    ]
    for k, v in res["phases"].items():
        lines.append(f"| {k} | {v['s']:.4f} | {v['share']:.1%} |")
    lines.append(f"| **step (median)** | **{res['step_s']:.4f}** | |")
    lines += ["", "| model only | s/step (median) | share |", "|---|---:|---:|"]
    for k, v in model_only["phases"].items():
        lines.append(f"| {k} | {v['s']:.4f} | {v['share']:.1%} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="measured steps per loop (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--triplets", type=int, default=8, help="hinge loop: triplets per step")
    p.add_argument("--triplet-cache", type=int, default=128, help="hinge loop: triplets in the uint8 cache")
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--hinge-arch", default="s2d-lite-pool")
    p.add_argument("--distill-arch", default="s2d-lite-pool-distill", help="the packaged default's")
    p.add_argument("--batch", type=int, default=16, help="distillation: items per step")
    p.add_argument("--views", default="published", choices=("published", "random-resized", "single"))
    p.add_argument("--images", type=int, default=64, help="distillation: random JPEGs in the folder")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--inference-repeats", type=int, default=5)
    p.add_argument("--only", choices=("hinge", "distill"), default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # the optimiser's step is wrapped by a timer after the scheduler wrapped it: harmless here
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    report: dict = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs visible",
        "torch": torch.__version__,
        "threads": args.threads,
        "load_before": load_before,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    if args.only in (None, "hinge"):
        report["hinge"], report["hinge_model_only"] = profile_hinge(args)
    if args.only in (None, "distill"):
        with tempfile.TemporaryDirectory(prefix="lipsim-profile-") as tmp:
            d, m, extra = profile_distill(args, Path(tmp))
            report["distill"], report["distill_model_only"], report["distill_extra"] = d, m, extra
    report["inference"] = inference(args)
    report["load_after"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - t_start

    fmt = lambda la: " / ".join(f"{v:.2f}" for v in la)  # noqa: E731
    print(f"{report['machine']}; torch {torch.__version__}, {args.threads} threads")
    print(f"load average (1/5/15 min) before: {fmt(load_before)}, after: {fmt(report['load_after'])}")
    print()
    if "hinge" in report:
        name = f"hinge loop (scripts/train_v2.py, {args.hinge_arch}, {args.triplets} triplets)"
        print(table(name, report["hinge"], report["hinge_model_only"]))
        print()
    if "distill" in report:
        name = (
            f"distill loop (run_distill, {args.distill_arch}, cache teacher, batch {args.batch}, "
            f"views {args.views}, {args.images} JPEGs {args.image_size}px, 0 workers)"
        )
        print(table(name, report["distill"], report["distill_model_only"]))
        print()
    inf = report["inference"]
    print(
        f"certified inference (lipsim.load().freeze().embed, batch 16, no_grad): {inf['img_per_s']:.1f} img/s"
    )
    print(f"whole run {report['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
