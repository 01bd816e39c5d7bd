"""The state of a training run: the data order, the run length and learning-rate schedule, the
model with its optimiser, scheduler and loss scaler, and the position (step, epoch, batch) that
a checkpoint saves and a resume restores (:mod:`lipsim.train.checkpoint`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from ..modelfiles import RUN_CHECKPOINT, RUN_MODEL
from ..precision import amp_dtype
from .distributed import DistEnv


# -- learning rate ----------------------------------------------------------------------------
class LRSchedule:
    """Multiplier of the peak learning rate at step ``s`` (``LambdaLR`` calls it before step s+1).

    * ``cosine`` ([HEAD], the usual cosine-with-warm-up): ``s / warmup`` during the warm-up,
      then one cosine half-period from 1 down to 0 at ``total``;
    * ``triangular`` ([PAPER-T] "interp"): ``0 -> 1`` over the first 40 %, ``1 -> 1/20`` until
      80 %, ``1/20 -> 0`` at the end (``warmup`` unused);
    * ``constant``: warm-up, then 1.

    A plain object (not a closure) so that ``LambdaLR.state_dict`` stores its fields.
    """

    def __init__(self, kind: str, total: int, warmup: int):
        self.kind, self.total, self.warmup = kind, int(total), int(warmup)

    def __call__(self, step: int) -> float:
        s, n, w = float(step), float(max(self.total, 1)), float(self.warmup)
        if self.kind == "triangular":
            return float(np.interp(s, [0.0, 0.4 * n, 0.8 * n, n], [0.0, 1.0, 0.05, 0.0]))
        if s < w:
            return s / w
        if self.kind == "constant":
            return 1.0
        progress = min(max((s - w) / max(n - w, 1.0), 0.0), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def default_warmup(total: int) -> int:
    """min(2000, 10 % of the steps): HEAD's 2000 steps, shortened for short runs."""
    return min(2000, total // 10)


# -- data order -------------------------------------------------------------------------------
class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (permutation of epoch e drawn from ``seed + e``) that can start
    ``start`` items into this process's share, so a resumed run skips what it already used.

    Global batch j of an epoch is the same set of items for any number of processes (rank r
    takes positions r, r + N, ... of the permutation), so the position is a property of the run.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def epoch_steps(n_items: int, batch_size: int) -> int:
    """Steps in an epoch: whole global batches of distinct items, the same count for any number
    of processes (the sampler pads its order with repeats to share it evenly among processes;
    those positions are never reached), so a run resumes with another process count."""
    return n_items // batch_size


# -- optimiser and precision ------------------------------------------------------------------
def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` mode on ``device`` (None: no autocast; CUDA only);
    decided by the precision policy, :func:`lipsim.precision.amp_dtype`."""
    return amp_dtype(mode, device)


def reset_hyperparameters(optimizer: torch.optim.Optimizer, cfg) -> None:
    """This run's learning rate, betas and weight decay in every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
        group["initial_lr"] = cfg.lr
        group["betas"] = tuple(cfg.betas)
        group["weight_decay"] = cfg.weight_decay


def load_initial_optimizer(optimizer: torch.optim.Optimizer, state: dict, params: list) -> None:
    """Loads Adam moments taken from another run, checking they fit these parameters one by one."""
    groups = state.get("param_groups") or []
    saved_ids = [i for g in groups for i in g.get("params", [])]
    if len(saved_ids) != len(params):
        raise ValueError(
            f"optimiser state has {len(saved_ids)} parameters, the model has {len(params)}: "
            "it does not belong to this architecture"
        )
    moments = state.get("state") or {}
    fixed: dict = {}
    for pos, (saved_id, param) in enumerate(zip(saved_ids, params, strict=True)):
        entry = moments.get(saved_id)
        if entry is None:
            continue
        entry = dict(entry)
        for key in ("exp_avg", "exp_avg_sq"):
            if key in entry and tuple(entry[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"optimiser state for parameter {pos} has shape {tuple(entry[key].shape)}, "
                    f"the parameter has {tuple(param.shape)}: parameter order or architecture differ"
                )
        if "step" in entry and not isinstance(entry["step"], torch.Tensor):
            entry["step"] = torch.tensor(float(entry["step"]))
        fixed[pos] = entry
    # only the moments are taken over; hyper-parameters are this run's
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    group["params"] = list(range(len(params)))
    optimizer.load_state_dict({"state": fixed, "param_groups": [group]})


# -- the run ----------------------------------------------------------------------------------
@dataclass
class RunState:
    """One process's view of a run: fixed sizes and objects, and the position that moves."""

    task: Any
    cfg: Any
    env: DistEnv
    out: Path
    per_rank: int
    n_items: int
    steps_per_epoch: int
    total: int
    warmup: int
    sampler: ResumableSampler
    model: Any
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    t_start: float
    step: int = 0
    epoch: int = 0
    pos: int = 0  # batches already taken from this epoch
    wall_before: float = 0.0  # seconds spent before the resume
    described: dict = field(default_factory=dict)

    @property
    def backbone(self) -> torch.nn.Module:
        return self.model.backbone

    @property
    def ckpt_path(self) -> Path:
        return self.out / RUN_CHECKPOINT

    @property
    def model_path(self) -> Path:
        return self.out / RUN_MODEL

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def wall(self, now: float) -> float:
        """Seconds of training so far, over every session of the run."""
        return self.wall_before + (now - self.t_start)

    def run_info(self) -> dict:
        """config.json: every option plus the derived sizes."""
        return {
            **self.cfg.as_dict(),
            "task": self.task.kind,
            **{f"task.{k}": v for k, v in self.described.items()},
            "world_size": self.env.world_size,
            "per_process_batch": self.per_rank,
            "dataset_items": self.n_items,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total,
            "warmup_steps": self.warmup,
            "amp_dtype": None if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", ""),
            "device": str(self.env.device),
            "torch": torch.__version__,
        }


def describe_task(task) -> dict:
    """``task.describe()`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(task.describe()))


def start_run(task, cfg, env: DistEnv) -> RunState:
    """Sizes, data order, model, optimiser, schedule and precision of a fresh run at step 0
    (``cfg`` validated by the caller)."""
    t_start = time.perf_counter()
    world = env.world_size
    if cfg.batch_size % world:
        raise ValueError(f"the global batch size {cfg.batch_size} is not divisible by the {world} processes")
    per_rank = cfg.batch_size // world

    n_items = len(task.dataset)
    sampler = ResumableSampler(task.dataset, num_replicas=world, rank=env.rank, seed=cfg.seed)
    steps_per_epoch = epoch_steps(n_items, cfg.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(
            f"the dataset has {n_items} items, fewer than one batch of {cfg.batch_size}: "
            "use a smaller --batch-size or more data"
        )
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    warmup = cfg.warmup if cfg.warmup is not None else default_warmup(total)

    model = task.model.to(env.device)
    model.train()
    model.requires_grad_(True)
    params = list(model.backbone.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    init_state = task.initial_optimizer_state()
    if init_state is not None and not cfg.resume:
        load_initial_optimizer(optimizer, init_state, params)
        reset_hyperparameters(optimizer, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(cfg.schedule, total, warmup))
    amp_dtype = resolve_amp(cfg.amp, env.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return RunState(
        task=task, cfg=cfg, env=env, out=Path(cfg.out), per_rank=per_rank, n_items=n_items,
        steps_per_epoch=steps_per_epoch, total=total, warmup=warmup, sampler=sampler, model=model,
        params=params, optimizer=optimizer, scheduler=scheduler, amp_dtype=amp_dtype, scaler=scaler,
        t_start=t_start,
    )  # fmt: skip
