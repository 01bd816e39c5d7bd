"""Stage 1: distil a teacher's embedding into a 1-Lipschitz student (docs/method.md §6.1).

For each image the dataset gives two views (a: crop + flip, b: a + colour jitter/grayscale).
The teacher embeds view a (no gradient); the student's backbone output f(x), *not* normalised,
is regressed onto that target on both views::

    loss = ( RMSE(f(view_a), t) + RMSE(f(view_b), t) ) / 2,    t = target_scale · teacher(view_a)

where RMSE is the square root of the mean, over batch and dimensions, of the squared error (the
[HEAD] average of the two RMSEs; [PAPER-T] summed them, which only doubles the gradient). When
the teacher is an embedding cache (``get_teacher(<cache dir>)`` returns an object with
``lookup(keys)``), the targets are read by image key instead of running a network; a cache holds
one embedding per image (typically of the un-flipped centre crop, as the paper's precomputed
targets), so view a's random flip/crop is then not reflected in the target.

The student is ``LipSim.from_config(replace(get_config(arch), out_dim=teacher.dim),
embedding="append")``: the architecture truncated to the teacher's dimension.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..archs import get_config
from ..model import LipSim, exact_float32
from . import distributed
from .loop import LoopConfig, TrainResult, TrainTask, check_run_folder, train

__all__ = [
    "DistillConfig",
    "DistillTask",
    "run_distill",
    "rmse",
    "distill_loss",
    "resolve_teacher",
    "build_student",
]

log = logging.getLogger("lipsim.train")


@dataclass(kw_only=True)
class DistillConfig(LoopConfig):
    """Options of ``lipsim train distill``; the defaults are the published ones (Adam lr 0.01,
    betas (0.5, 0.9), cosine schedule with warm-up, no clipping).

    ``teacher``: a teacher name for :func:`lipsim.teachers.get_teacher` (``offline-ensemble``,
    ``dreamsim``, ``mobilenet_v2``...), the path of an embedding cache folder, or
    ``py:module:factory`` (a zero-argument callable returning a teacher module, for your own).
    """

    data_dir: str
    teacher: str
    arch: str
    views: str = "published"
    target_scale: float = 1.0
    teacher_dir: str | None = None

    def validate(self) -> None:
        super().validate()
        from ..data import VIEW_MODES

        if self.views not in VIEW_MODES + (SINGLE_VIEW,):
            raise ValueError(f"unknown view mode {self.views!r} (choose from {', '.join(VIEW_MODES)})")
        if not (math.isfinite(self.target_scale) and self.target_scale > 0):
            raise ValueError(f"target scale must be a positive number, got {self.target_scale}")
        get_config(self.arch)  # unknown architecture: a one-line error before anything starts


#: distil on view a (centre crop + flip) only: the published colour-jittered second view teaches
#: colour invariance, which a metric that must rank colour distortions does not want
SINGLE_VIEW = "single"


def rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sqrt(mean over batch and dimensions of (pred - target)²), computed in float32."""
    return (pred.float() - target.float()).square().mean().sqrt()


def distill_loss(f_a: torch.Tensor, f_b: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(loss, rmse_a, rmse_b)`` with ``loss = (rmse_a + rmse_b) / 2`` (one target for both views)."""
    ra, rb = rmse(f_a, target), rmse(f_b, target)
    return 0.5 * (ra + rb), ra, rb


def resolve_teacher(spec, device: torch.device | str = "cpu", teacher_dir: str | None = None):
    """A teacher object from a name / cache path / ``py:module:factory`` (or an object, as is).

    The result is frozen (eval mode, no parameter gradients) and on ``device``.
    """
    if isinstance(spec, str) and spec.startswith("py:"):
        target = spec[3:]
        module_name, _, attr = target.rpartition(":")
        if not module_name or not attr:
            raise ValueError(f"teacher {spec!r}: expected py:module:factory")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"teacher {spec!r}: cannot import ({exc})") from None
        teacher = factory() if not isinstance(factory, nn.Module) else factory
    elif isinstance(spec, str):
        try:
            from ..teachers import get_teacher
        except ImportError as exc:
            raise ValueError(f"teachers are not available in this installation ({exc})") from None
        teacher = get_teacher(spec, device=str(device), cache_dir=teacher_dir)
    else:
        teacher = spec
    dim = getattr(teacher, "dim", None)
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"teacher {spec!r} has no positive integer 'dim' attribute")
    if isinstance(teacher, nn.Module):
        teacher = teacher.to(device).eval().requires_grad_(False)
    elif hasattr(teacher, "to"):
        moved = teacher.to(device)
        teacher = moved if moved is not None else teacher
    return teacher


def build_student(arch: str, out_dim: int) -> LipSim:
    """The student for a teacher of dimension ``out_dim`` (appended-constant embedding)."""
    config = get_config(arch)
    width = config.feature_width()
    if out_dim > width:
        raise ValueError(
            f"teacher dimension {out_dim} exceeds the feature width {width} of architecture {arch!r}; "
            "choose a wider architecture"
        )
    return LipSim.from_config(dataclasses.replace(config, out_dim=out_dim), embedding="append")


class DistillTask(TrainTask):
    """Distillation as a :class:`TrainTask` (see the module docstring)."""

    kind = "distill"
    images_per_item = 1
    stat_reduce = {"loss": "mean", "rmse_a": "mean", "rmse_b": "mean", "target_norm": "mean"}
    # teacher_name: the same teacher online or through its cache, never another one
    locked = ("arch", "teacher_name", "teacher_dim", "views", "target_scale", "dataset_items")

    def __init__(self, cfg: DistillConfig, teacher, env: distributed.DistEnv, student: LipSim | None = None):
        from ..data import DistillDataset

        self.cfg = cfg
        self.env = env
        self.teacher = teacher
        self.cached = callable(getattr(teacher, "lookup", None))
        self.dim = int(teacher.dim)
        torch.manual_seed(cfg.seed)
        self.model = student if student is not None else build_student(cfg.arch, self.dim)
        if self.model.backbone.out_dim != self.dim:
            raise ValueError(f"student output {self.model.backbone.out_dim} != teacher dimension {self.dim}")
        mode = "published" if cfg.views == SINGLE_VIEW else cfg.views
        self.dataset = DistillDataset(cfg.data_dir, mode=mode, seed=cfg.seed, size=self.model.input_size)
        self._checked = False

    def _targets(self, view_a: torch.Tensor, keys) -> torch.Tensor:
        if self.cached:
            try:
                t = self.teacher.lookup(list(keys))
            except KeyError as exc:
                raise ValueError(
                    f"image {exc.args[0] if exc.args else '?'} is not in the embedding cache "
                    "(build the cache over the same --data-dir)"
                ) from None
        else:  # the targets in float32 even when the loop runs the student under autocast
            with torch.no_grad(), exact_float32(view_a.device.type):
                t = self.teacher(view_a.float())
        t = t.detach().to(self.env.device, torch.float32)
        if not self._checked:
            if t.shape != (view_a.shape[0], self.dim):
                raise ValueError(
                    f"teacher returned shape {tuple(t.shape)}, expected ({view_a.shape[0]}, {self.dim})"
                )
            if not torch.isfinite(t).all():
                raise ValueError("teacher returned NaN or infinite values")
            self._checked = True
        return t * self.cfg.target_scale

    def compute(self, net, batch, env):
        device = env.device
        view_a = batch["view_a"].to(device, non_blocking=True)
        target = self._targets(view_a, batch["key"])
        if self.cfg.views == SINGLE_VIEW:  # view a only: no colour-jittered copy, half the compute
            f_a = f_b = net(view_a).float()
        else:
            view_b = batch["view_b"].to(device, non_blocking=True)
            out = net(torch.cat([view_a, view_b])).float()
            f_a, f_b = out.split(view_a.shape[0])
        loss, ra, rb = distill_loss(f_a, f_b, target)
        stats = {
            "loss": loss.detach(),
            "rmse_a": ra.detach(),
            "rmse_b": rb.detach(),
            "target_norm": target.norm(dim=1).mean(),
        }
        return loss, stats

    def describe(self) -> dict:
        return {
            "arch": self.cfg.arch,
            "arch_config": json.loads(self.model.config.to_json()),
            "teacher": self.cfg.teacher if isinstance(self.cfg.teacher, str) else type(self.teacher).__name__,
            "teacher_name": str(getattr(self.teacher, "name", "")),
            "teacher_dim": self.dim,
            "teacher_cached": self.cached,
            "target_scale": self.cfg.target_scale,
            "views": self.cfg.views,
            "data_dir": str(self.cfg.data_dir),
            "dataset_items": len(self.dataset),
        }

    def model_metadata(self) -> dict:
        return {"teacher": str(getattr(self.teacher, "name", self.cfg.teacher)), "teacher_dim": str(self.dim)}


def run_distill(config: DistillConfig, teacher=None, student: LipSim | None = None) -> TrainResult:
    """Runs (or with ``config.resume`` continues) a distillation run; call it in every process
    under torchrun. ``teacher`` overrides ``config.teacher`` with an object (``.dim``, forward or
    ``lookup``); ``student`` overrides the architecture with a model of output ``teacher.dim``."""
    config.validate()
    check_run_folder(config)
    env = distributed.setup(config.device)
    try:
        t = resolve_teacher(
            teacher if teacher is not None else config.teacher, env.device, config.teacher_dir
        )
        task = DistillTask(config, t, env, student)
        return train(task, config, env)
    finally:
        distributed.cleanup(env)
