"""The one training loop behind ``lipsim train distill`` and ``lipsim train finetune``.

A :class:`TrainTask` says *what* is learnt (the model, the dataset, the loss of one batch); the
loop owns everything else: Adam, the learning-rate schedule, mixed precision on CUDA, gradient
clipping, the deterministic data order, DistributedDataParallel under torchrun, progress,
metrics, atomic checkpoints, resuming and a graceful stop on Ctrl-C/SIGTERM.

Determinism. The data order of epoch ``e`` is a permutation drawn from ``(seed, e)``
(:class:`ResumableSampler`), and the tasks' augmentations depend only on ``(seed, epoch, index)``,
so a resumed run sees exactly the batches an uninterrupted one would. The checkpoint holds the
model, the optimiser and scheduler states, the step, the epoch, the number of batches already
taken from that epoch and the RNG states of python, numpy and torch (+CUDA): on the CPU a resumed
run reaches bit-for-bit the weights of an uninterrupted one.

Run folder (``out``)::

    config.json             every option plus derived sizes (written once, at the start)
    metrics.jsonl           one JSON object per logged step: step, epoch, loss, lr, images_per_s, ...
    loss.png                the loss curve (matplotlib, Agg canvas; refreshed at each checkpoint)
    checkpoints/last.pt     the latest checkpoint (temp file + os.replace: never half-written)
    model.safetensors       the final model (``lipsim.load`` reads it)

Checkpoints are written with ``torch.save`` and read back with ``torch.load(weights_only=True)``:
they hold only tensors, dicts, lists, numbers and strings (options are stored as JSON text).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..checkpoints import finite_in_float32, save_model
from ..errors import LipSimError
from ..fileio import atomic_write, write_text_atomic
from ..spec import check_state
from .distributed import DistEnv, all_reduce_sum, any_rank, barrier

__all__ = [
    "LoopConfig",
    "TrainTask",
    "TrainResult",
    "DivergedError",
    "LRSchedule",
    "ResumableSampler",
    "train",
    "load_checkpoint",
    "check_run_folder",
    "CHECKPOINT_FORMAT",
    "SCHEDULES",
    "AMP_MODES",
]

log = logging.getLogger("lipsim.train")

CHECKPOINT_FORMAT = "lipsim-train"
CHECKPOINT_VERSION = 1
SCHEDULES = ("cosine", "triangular", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")
#: options that change the trajectory: a resumed run must use the values it was started with
LOCKED_OPTIONS = (
    "steps", "epochs", "batch_size", "lr", "betas", "weight_decay", "schedule", "warmup", "clip_grad", "amp",
    "seed",
)  # fmt: skip


class DivergedError(LipSimError, FloatingPointError):
    """The loss became NaN or infinite; no checkpoint is written after that step."""


@dataclass(kw_only=True)
class LoopConfig:
    """Options shared by distillation and fine-tuning (see ``docs/training.md``).

    ``batch_size`` is the **global** batch: under torchrun each of the N processes takes
    ``batch_size / N`` items per step. Exactly one of ``steps``/``epochs`` sets the run length
    (a task may supply a default). ``warmup=None`` means ``min(2000, 10 % of the steps)``.
    """

    out: str
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 32
    lr: float = 0.01
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: int | None = None
    clip_grad: float | None = None
    amp: str = "auto"
    seed: int = 0
    num_workers: int = 4
    checkpoint_every: int = 1000
    log_every: int = 10
    device: str = "auto"
    resume: bool = False
    stop_after: int | None = None
    progress: bool = True

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    def validate(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give either steps or epochs, not both")
        if self.steps is None and self.epochs is None:
            raise ValueError("give the run length: steps or epochs")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"Adam betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ValueError("weight decay must be non-negative")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r} (choose from {', '.join(SCHEDULES)})")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError("warm-up steps must be non-negative")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError("gradient clipping norm must be positive (omit it to disable clipping)")
        if self.amp not in AMP_MODES:
            raise ValueError(f"unknown AMP mode {self.amp!r} (choose from {', '.join(AMP_MODES)})")
        if self.seed < 0:
            raise ValueError("seed must be non-negative")
        if self.num_workers < 0:
            raise ValueError("number of data workers must be non-negative")
        if self.checkpoint_every < 0 or self.log_every < 1:
            raise ValueError("checkpoint_every must be ≥ 0 (0: only at the end) and log_every ≥ 1")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError("stop_after must be at least 1")


class TrainTask:
    """What the loop trains. Subclasses set the attributes and implement :meth:`compute`.

    * ``kind``: a short name ("distill", "finetune") stored in checkpoints;
    * ``model``: the :class:`lipsim.LipSim` being trained (its ``backbone`` gets the gradients);
    * ``dataset``: a map-style dataset whose items the default collate can batch;
    * ``images_per_item``: images per dataset item, for the images/s figure;
    * ``stat_reduce``: for each statistic :meth:`compute` returns, how processes combine it
      ("mean" or "sum"; "loss" must be present).
    """

    kind: str = "task"
    model = None
    dataset = None
    images_per_item: int = 1
    stat_reduce: dict[str, str] = {"loss": "mean"}
    #: options of the task that must not change on resume
    locked: tuple[str, ...] = ()

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch's loader is built (fresh augmentations per epoch)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def compute(
        self, net: torch.nn.Module, batch, env: DistEnv
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss to back-propagate, {statistic: detached scalar})`` for this process's batch.

        ``net`` is the backbone, wrapped in DDP when distributed (DDP averages gradients over
        processes, so a loss that should be *summed* over the global batch must be multiplied by
        ``env.world_size`` here).
        """
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-serialisable facts about the task for config.json and the checkpoint."""
        return {}

    def initial_optimizer_state(self) -> dict | None:
        """An optimiser state dict to start from (e.g. Adam moments of an earlier run), or None."""
        return None

    def model_metadata(self) -> dict:
        """Extra metadata stored in ``model.safetensors``."""
        return {}


@dataclass
class TrainResult:
    """What a finished (or interrupted) run produced."""

    out: Path
    step: int
    total_steps: int
    model_path: Path | None
    checkpoint: Path | None
    interrupted: bool = False
    signal: int | None = None
    loss: float | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "out": str(self.out),
            "step": self.step,
            "total_steps": self.total_steps,
            "model": str(self.model_path) if self.model_path else None,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "interrupted": self.interrupted,
            "signal": self.signal,
            "loss": self.loss,
            "seconds": self.seconds,
            **self.extra,
        }


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


def _worker_init(worker_id: int) -> None:
    # Ctrl-C goes to the whole process group; only the main process handles it (and then stops
    # asking workers for data), so workers ignore it instead of dying mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# -- RNG states as weights-only data ----------------------------------------------------------
def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [int(py[0]), [int(v) for v in py[1]], None if py[2] is None else float(py[2])],
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["key"].numpy().astype(np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].to(torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda])


# -- files ------------------------------------------------------------------------------------
def _save_torch(obj, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, write)


def load_checkpoint(path) -> dict:
    """Reads a training checkpoint with ``torch.load(weights_only=True)`` and checks its format."""
    path = Path(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # corrupt file, unsafe pickle, ...: one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a readable training checkpoint ({msg[:160]})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a lipsim training checkpoint")
    if type(obj.get("format_version", 0)) is not int:
        raise ValueError(f"{path}: damaged training checkpoint (format_version is not an integer)")
    if obj.get("format_version", 0) > CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {obj['format_version']} is newer than this lipsim"
        )
    _check_checkpoint_fields(obj, path)
    return obj


#: what a training checkpoint holds: key -> type (checked before anything is restored from it)
_CHECKPOINT_FIELDS = {
    "config": str,
    "task": str,
    "kind": str,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "rng": dict,
    "step": int,
    "epoch": int,
    "batch_in_epoch": int,
    "total_steps": int,
    "world_size": int,
}


def _check_checkpoint_fields(obj: dict, path) -> None:
    """A damaged or hand-edited checkpoint fails here with one line, not halfway through a
    resume (a step count past the run's end would otherwise 'finish' a run it never trained)."""
    for key, kind in _CHECKPOINT_FIELDS.items():
        if type(obj.get(key)) is not kind:
            raise ValueError(f"{path}: damaged training checkpoint ({key!r}: missing or not {kind.__name__})")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj["model"].items()):
        raise ValueError(f"{path}: damaged training checkpoint (model weights are not named tensors)")
    if not 0 <= obj["step"] <= obj["total_steps"] or min(obj["epoch"], obj["batch_in_epoch"]) < 0:
        raise ValueError(
            f"{path}: damaged training checkpoint (step {obj['step']} of {obj['total_steps']}, "
            f"epoch {obj['epoch']}, batch {obj['batch_in_epoch']})"
        )
    if obj["world_size"] < 1:
        raise ValueError(f"{path}: damaged training checkpoint (world_size {obj['world_size']})")
    for key in ("config", "task"):
        try:
            if not isinstance(json.loads(obj[key]), dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"{path}: damaged training checkpoint ({key}: {exc})") from None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops metric lines logged after ``step`` (a run killed after its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    write_text_atomic(path, "".join(k + "\n" for k in kept))


def plot_metrics(metrics_path: Path, png_path: Path, title: str = "") -> None:
    """Draws loss against step from metrics.jsonl into a PNG (Agg canvas, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, losses = [], []
    if metrics_path.exists():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                steps.append(int(rec["step"]))
                losses.append(float(rec["loss"]))
            except (ValueError, KeyError, TypeError):
                continue
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if steps:
        ax.plot(steps, losses, lw=1.2)
        if all(v > 0 for v in losses) and max(losses) / max(min(losses), 1e-12) > 20:
            ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png"))


# -- signals ----------------------------------------------------------------------------------
class _StopFlag:
    """First SIGINT/SIGTERM: remember it (the loop checkpoints and stops after the current step).
    Second one: the previous handler (so a second Ctrl-C interrupts at once)."""

    def __init__(self):
        self.signum: int | None = None
        self.requested = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.restore()
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            elif signum == signal.SIGINT:
                raise KeyboardInterrupt
            else:
                raise SystemExit(128 + signum)
            return
        self.signum = signum
        self.requested = True

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


# -- the loop ---------------------------------------------------------------------------------
def _resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        if mode in ("bf16", "fp16"):
            raise ValueError(f"mixed precision ({mode}) is only used on CUDA; this run is on {device}")
        return None
    if mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _reset_hyperparameters(optimizer: torch.optim.Optimizer, cfg: LoopConfig) -> None:
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
        group["initial_lr"] = cfg.lr
        group["betas"] = tuple(cfg.betas)
        group["weight_decay"] = cfg.weight_decay


def _load_initial_optimizer(optimizer: torch.optim.Optimizer, state: dict, params: list) -> None:
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


def _check_resume(
    saved_cfg: dict, saved_task: dict, cfg: LoopConfig, task: TrainTask, total: int, ckpt: dict
):
    now = cfg.as_dict()
    diffs = []
    for key in LOCKED_OPTIONS:
        if key in saved_cfg and saved_cfg[key] != now[key]:
            diffs.append(f"{key} (checkpoint {saved_cfg[key]!r}, now {now[key]!r})")
    described = json.loads(json.dumps(task.describe()))
    for key in task.locked:
        if key in saved_task and saved_task[key] != described.get(key):
            diffs.append(f"{key} (checkpoint {saved_task[key]!r}, now {described.get(key)!r})")
    if diffs:
        raise ValueError("cannot resume with different options: " + "; ".join(diffs))
    if ckpt.get("kind") != task.kind:
        raise ValueError(
            f"cannot resume: the checkpoint is from a {ckpt.get('kind')!r} run, not {task.kind!r}"
        )
    if int(ckpt["total_steps"]) != total:
        raise ValueError(
            f"cannot resume: the run now has {total} steps, the checkpoint {ckpt['total_steps']} "
            "(did the dataset change size?)"
        )


def check_run_folder(cfg: LoopConfig) -> None:
    """Fails early (before teachers or data load) when ``--resume`` has nothing to continue or a
    fresh run would overwrite a finished or checkpointed one."""
    out = Path(cfg.out)
    ckpt_path = out / "checkpoints" / "last.pt"
    if cfg.resume and not ckpt_path.exists():
        raise FileNotFoundError(f"{ckpt_path}: nothing to resume (no checkpoint in {out})")
    if not cfg.resume and (ckpt_path.exists() or (out / "model.safetensors").exists()):
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder")


def train(task: TrainTask, cfg: LoopConfig, env: DistEnv) -> TrainResult:
    """Runs (or resumes) a training run; see the module docstring. Every process calls it."""
    cfg.validate()
    t_start = time.perf_counter()
    out = Path(cfg.out)
    ckpt_path = out / "checkpoints" / "last.pt"
    model_path = out / "model.safetensors"
    metrics_path = out / "metrics.jsonl"
    world = env.world_size
    if cfg.batch_size % world:
        raise ValueError(f"the global batch size {cfg.batch_size} is not divisible by the {world} processes")
    per_rank = cfg.batch_size // world

    # -- data order and run length
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

    # -- model, optimiser, schedule, precision
    model = task.model.to(env.device)
    model.train()
    model.requires_grad_(True)
    backbone = model.backbone
    params = list(backbone.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    init_state = task.initial_optimizer_state()
    if init_state is not None and not cfg.resume:
        _load_initial_optimizer(optimizer, init_state, params)
        _reset_hyperparameters(optimizer, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(cfg.schedule, total, warmup))
    amp_dtype = _resolve_amp(cfg.amp, env.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    check_run_folder(cfg)
    step, epoch, pos, wall_before = 0, 0, 0, 0.0
    stat_names = list(task.stat_reduce)
    if "loss" not in stat_names:
        raise ValueError("a task must report a 'loss' statistic")
    # per-step statistics summed on the device (no per-step synchronisation), then two counters:
    # steps with a finite loss and steps without (tolerated only with fp16 loss scaling, whose
    # GradScaler skips those steps)
    stat_acc = torch.zeros(len(stat_names) + 2, dtype=torch.float64, device=env.device)
    acc_steps = 0
    tolerate_nonfinite = amp_dtype == torch.float16

    def check_finite(n_bad: float) -> None:
        if n_bad > 0 and not tolerate_nonfinite:
            raise DivergedError(
                f"the loss was NaN or infinite in {int(n_bad)} step(s) before step {step}; "
                "lower --lr or use --clip-grad (the last checkpoint is still good)"
            )

    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        _check_resume(json.loads(ckpt["config"]), json.loads(ckpt["task"]), cfg, task, total, ckpt)
        check_state(ckpt["model"], backbone.config, ckpt_path, finite_in_float32)
        try:
            backbone.load_state_dict(ckpt["model"], strict=True)
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if scaler.is_enabled() and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise ValueError(
                f"{ckpt_path}: damaged training checkpoint ({type(exc).__name__}: {first})"
            ) from None
        step, epoch, pos = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
        wall_before = float(ckpt.get("wall", 0.0))
        saved_stats = ckpt.get("log_stats")
        if isinstance(saved_stats, torch.Tensor) and saved_stats.shape == stat_acc.shape:
            if env.is_main:  # the saved values are already summed over processes
                stat_acc.copy_(saved_stats.to(stat_acc.device))
            acc_steps = int(ckpt.get("log_steps", 0))
        if int(ckpt["world_size"]) != world and env.is_main:
            log.warning(
                "resuming a run checkpointed with %d process(es) on %d: same data order, "
                "gradients summed in a different order",
                int(ckpt["world_size"]),
                world,
            )
        del ckpt
        if env.is_main:
            _truncate_metrics(metrics_path, step)
            log.info("resuming %s at step %d/%d (epoch %d, batch %d)", out, step, total, epoch, pos)
    elif env.is_main and metrics_path.exists():
        metrics_path.unlink()  # left by a run that died before its first checkpoint
    barrier(env)

    net: torch.nn.Module = backbone
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # static_graph: some parameters never get a gradient (an SLL convolution's q cancels in
        # its rescaling); a static graph lets DDP skip them without a per-step search.
        net = DistributedDataParallel(
            backbone,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            static_graph=True,
        )

    described = json.loads(json.dumps(task.describe()))
    run_info = {
        **cfg.as_dict(),
        "task": task.kind,
        **{f"task.{k}": v for k, v in described.items()},
        "world_size": world,
        "per_process_batch": per_rank,
        "dataset_items": n_items,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "warmup_steps": warmup,
        "amp_dtype": None if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
        "device": str(env.device),
        "torch": torch.__version__,
    }
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume or not (out / "config.json").exists():
            write_text_atomic(out / "config.json", json.dumps(run_info, indent=2) + "\n")
        log.info(
            "%s: %d items, %d steps (%d per epoch), global batch %d = %d process(es) × %d, device %s%s",
            task.kind, n_items, total, steps_per_epoch, cfg.batch_size, world, per_rank, env.device,
            "" if amp_dtype is None else f", autocast {run_info['amp_dtype']}",
        )  # fmt: skip

    def save_checkpoint() -> None:
        # every process calls this at the same steps: the pending statistics are summed over
        # processes (a collective) and only rank 0 writes
        pending = all_reduce_sum(stat_acc.detach().clone(), env).to("cpu")
        check_finite(float(pending[-1]))  # never checkpoint weights a NaN step may have spoilt
        if not env.is_main:
            return
        obj = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "kind": task.kind,
            "arch": model.config.to_json(),
            "embedding": model.embedding,
            "model": {k: v.detach().to("cpu").clone() for k, v in backbone.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": pos,
            "items_in_epoch": pos * cfg.batch_size,
            "total_steps": total,
            "world_size": world,
            "wall": wall_before + (time.perf_counter() - t_start),
            "rng": rng_state(),
            # statistics of the steps since the last metrics line, so a resumed run logs the same
            "log_stats": pending,
            "log_steps": acc_steps,
            "config": json.dumps(cfg.as_dict()),
            "task": json.dumps(described),
        }
        _save_torch(obj, ckpt_path)
        plot_metrics(metrics_path, out / "loss.png", title=f"lipsim {task.kind}")

    last_loss: float | None = None
    t_interval = time.perf_counter()
    stop = _StopFlag()
    stop.install()
    start_step = step
    bar = None
    try:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total, initial=step, disable=not (cfg.progress and env.is_main), unit="step",
            dynamic_ncols=True, desc=f"lipsim {task.kind}",
        )  # fmt: skip
        while step < total:
            if pos >= steps_per_epoch:
                epoch, pos = epoch + 1, 0
            if any_rank(stop.requested, env):
                break
            task.set_epoch(epoch)
            sampler.set_epoch(epoch)
            sampler.start = pos * per_rank
            loader = DataLoader(
                task.dataset,
                batch_size=per_rank,
                sampler=sampler,
                num_workers=cfg.num_workers,
                drop_last=True,
                pin_memory=env.device.type == "cuda",
                worker_init_fn=_worker_init if cfg.num_workers > 0 else None,
                generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch),
                prefetch_factor=4 if cfg.num_workers > 0 else None,
            )
            batches = iter(loader)
            stopping = False
            while pos < steps_per_epoch and step < total:
                if any_rank(stop.requested, env):
                    stopping = True
                    break
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except RuntimeError:
                    if stop.requested:  # a worker died of the same Ctrl-C: stop cleanly
                        stopping = True
                        break
                    raise
                with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, stats = task.compute(net, batch, env)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                lr_now = optimizer.param_groups[0]["lr"]
                scheduler.step()
                step, pos = step + 1, pos + 1
                finite = torch.isfinite(loss.detach()).all()
                values = torch.stack([stats[k].detach().double().reshape(()) for k in stat_names])
                stat_acc[:-2] += torch.where(finite, values, torch.zeros_like(values))
                stat_acc[-2] += finite.double()
                stat_acc[-1] += (~finite).double()
                acc_steps += 1
                bar.update(1)

                if step % cfg.log_every == 0 or step == total:
                    totals = all_reduce_sum(stat_acc.clone(), env).cpu().tolist()
                    check_finite(totals[-1])
                    now = time.perf_counter()
                    elapsed = max(now - t_interval, 1e-9)
                    record = {"step": step, "epoch": epoch}
                    steps_per_rank = totals[-2] / world  # steps with a finite loss
                    for name, value in zip(stat_names, totals, strict=False):
                        if steps_per_rank == 0:
                            record[name] = None
                            continue
                        value /= steps_per_rank
                        if task.stat_reduce[name] == "mean":
                            value /= world
                        record[name] = value
                    items_per_s = acc_steps * cfg.batch_size / elapsed
                    record.update(
                        lr=lr_now,
                        items_per_s=items_per_s,
                        images_per_s=items_per_s * task.images_per_item,
                        wall=wall_before + (now - t_start),
                        time=time.time(),
                    )
                    last_loss = record["loss"]
                    if env.is_main:
                        with open(metrics_path, "a", encoding="utf-8") as fh:
                            fh.write(json.dumps(record) + "\n")
                        bar.set_postfix(
                            loss="nan" if record["loss"] is None else f"{record['loss']:.4g}",
                            lr=f"{lr_now:.3g}",
                            img_s=f"{record['images_per_s']:.1f}",
                        )
                    stat_acc.zero_()
                    acc_steps = 0
                    t_interval = time.perf_counter()

                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                    t_ck = time.perf_counter()
                    save_checkpoint()
                    barrier(env)
                    t_interval += time.perf_counter() - t_ck
                if cfg.stop_after is not None and step - start_step >= cfg.stop_after and step < total:
                    stop.requested = True
            del batches, loader
            if stopping:
                break
        bar.close()

        interrupted = step < total
        if interrupted:
            save_checkpoint()
            barrier(env)
            if env.is_main:
                why = f"signal {stop.signum}" if stop.signum else "stop requested"
                log.warning(
                    "%s: stopped at step %d/%d; checkpoint %s (continue with --resume)",
                    why,
                    step,
                    total,
                    ckpt_path,
                )
            return TrainResult(
                out, step, total, None, ckpt_path, True, stop.signum, last_loss, time.perf_counter() - t_start
            )
        save_checkpoint()
        if env.is_main:
            model.eval()
            metadata = {
                "training": json.dumps({"task": task.kind, "steps": total, **described}),
                **task.model_metadata(),
            }
            save_model(model, model_path, extra_metadata=metadata)
            log.debug("wrote %s (step %d)", model_path, step)
        barrier(env)
        return TrainResult(
            out, step, total, model_path, ckpt_path, False, None, last_loss, time.perf_counter() - t_start
        )
    finally:
        if bar is not None:
            bar.close()
        stop.restore()
