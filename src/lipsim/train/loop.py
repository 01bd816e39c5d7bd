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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import save_model
from ..fileio import write_text_atomic
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_resume,
    check_run_folder,
    checkpoint_payload,
    load_checkpoint,
    restore_checkpoint,
    rng_state,
    save_torch,
    set_rng_state,
)
from .distributed import DistEnv, any_rank, barrier
from .metrics import DivergedError, StepStats, append_metrics, plot_metrics, truncate_metrics
from .state import (
    LRSchedule,
    ResumableSampler,
    RunState,
    default_warmup,
    describe_task,
    epoch_steps,
    start_run,
)
from .step import StopFlag, epoch_loader, train_step

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
    # defined in the modules the loop is made of (run state, checkpointing, metrics, the step)
    "CHECKPOINT_VERSION",
    "default_warmup",
    "epoch_steps",
    "plot_metrics",
    "rng_state",
    "set_rng_state",
]

log = logging.getLogger("lipsim.train")

SCHEDULES = ("cosine", "triangular", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")
#: options that change the trajectory: a resumed run must use the values it was started with
LOCKED_OPTIONS = (
    "steps", "epochs", "batch_size", "lr", "betas", "weight_decay", "schedule", "warmup", "clip_grad", "amp",
    "seed",
)  # fmt: skip


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


# -- the loop ---------------------------------------------------------------------------------
def _resume(run: RunState, stats: StepStats) -> None:
    """Continues from ``checkpoints/last.pt``: options checked, state restored, the metrics lines
    logged after that checkpoint dropped."""
    env = run.env
    ckpt = load_checkpoint(run.ckpt_path)
    check_resume(ckpt, run, LOCKED_OPTIONS)
    restore_checkpoint(run, ckpt)
    stats.restore(ckpt.get("log_stats"), ckpt.get("log_steps", 0), env.is_main)
    if int(ckpt["world_size"]) != env.world_size and env.is_main:
        log.warning(
            "resuming a run checkpointed with %d process(es) on %d: same data order, "
            "gradients summed in a different order",
            int(ckpt["world_size"]),
            env.world_size,
        )
    del ckpt
    if env.is_main:
        truncate_metrics(run.metrics_path, run.step)
        log.info(
            "resuming %s at step %d/%d (epoch %d, batch %d)", run.out, run.step, run.total, run.epoch, run.pos
        )


def _save_checkpoint(run: RunState, stats: StepStats) -> None:
    """Every process calls this at the same steps: the pending statistics are summed over
    processes (a collective) and only rank 0 writes."""
    pending = stats.summed(run.env)
    stats.check_finite(float(pending[-1]), run.step)  # never checkpoint weights a NaN step may have spoilt
    if not run.env.is_main:
        return
    save_torch(checkpoint_payload(run, pending, stats.steps), run.ckpt_path)
    plot_metrics(run.metrics_path, run.out / "loss.png", title=f"lipsim {run.task.kind}")


def _wrap_distributed(run: RunState) -> torch.nn.Module:
    if not run.env.distributed:
        return run.backbone
    from torch.nn.parallel import DistributedDataParallel

    # static_graph: some parameters never get a gradient (an SLL convolution's q cancels in
    # its rescaling); a static graph lets DDP skip them without a per-step search.
    return DistributedDataParallel(
        run.backbone,
        device_ids=[run.env.device.index] if run.env.device.type == "cuda" else None,
        static_graph=True,
    )


def _announce(run: RunState, run_info: dict) -> None:
    cfg, env = run.cfg, run.env
    run.out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume or not (run.out / "config.json").exists():
        write_text_atomic(run.out / "config.json", json.dumps(run_info, indent=2) + "\n")
    log.info(
        "%s: %d items, %d steps (%d per epoch), global batch %d = %d process(es) × %d, device %s%s",
        run.task.kind, run.n_items, run.total, run.steps_per_epoch, cfg.batch_size, env.world_size,
        run.per_rank, env.device, "" if run.amp_dtype is None else f", autocast {run_info['amp_dtype']}",
    )  # fmt: skip


def _finish(run: RunState, stats: StepStats, stop: StopFlag, last_loss: float | None) -> TrainResult:
    """The end of a session: a checkpoint, and the model file if the run is complete."""
    env = run.env
    seconds = lambda: time.perf_counter() - run.t_start  # noqa: E731
    if run.step < run.total:
        _save_checkpoint(run, stats)
        barrier(env)
        if env.is_main:
            why = f"signal {stop.signum}" if stop.signum else "stop requested"
            log.warning(
                "%s: stopped at step %d/%d; checkpoint %s (continue with --resume)",
                why,
                run.step,
                run.total,
                run.ckpt_path,
            )
        return TrainResult(
            run.out, run.step, run.total, None, run.ckpt_path, True, stop.signum, last_loss, seconds()
        )
    _save_checkpoint(run, stats)
    if env.is_main:
        run.model.eval()
        metadata = {
            "training": json.dumps({"task": run.task.kind, "steps": run.total, **run.described}),
            **run.task.model_metadata(),
        }
        save_model(run.model, run.model_path, extra_metadata=metadata)
        log.debug("wrote %s (step %d)", run.model_path, run.step)
    barrier(env)
    return TrainResult(
        run.out, run.step, run.total, run.model_path, run.ckpt_path, False, None, last_loss, seconds()
    )


def train(task: TrainTask, cfg: LoopConfig, env: DistEnv) -> TrainResult:
    """Runs (or resumes) a training run; see the module docstring. Every process calls it."""
    cfg.validate()
    run = start_run(task, cfg, env)
    check_run_folder(cfg)
    # per-step statistics summed on the device; steps with a non-finite loss are tolerated only
    # with fp16 loss scaling, whose GradScaler skips those steps
    stats = StepStats(task.stat_reduce, env.device, tolerate_nonfinite=run.amp_dtype == torch.float16)
    run.described = describe_task(task)
    if cfg.resume:
        _resume(run, stats)
    elif env.is_main and run.metrics_path.exists():
        run.metrics_path.unlink()  # left by a run that died before its first checkpoint
    barrier(env)

    net = _wrap_distributed(run)
    run_info = run.run_info()
    if env.is_main:
        _announce(run, run_info)

    last_loss: float | None = None
    t_interval = time.perf_counter()
    stop = StopFlag()
    stop.install()
    start_step = run.step
    bar = None
    try:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=run.total, initial=run.step, disable=not (cfg.progress and env.is_main), unit="step",
            dynamic_ncols=True, desc=f"lipsim {task.kind}",
        )  # fmt: skip
        while run.step < run.total:
            if run.pos >= run.steps_per_epoch:
                run.epoch, run.pos = run.epoch + 1, 0
            if any_rank(stop.requested, env):
                break
            loader = epoch_loader(run)
            batches = iter(loader)
            stopping = False
            while run.pos < run.steps_per_epoch and run.step < run.total:
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
                loss, step_stats, lr_now = train_step(run, net, batch)
                stats.add(loss, step_stats)
                bar.update(1)

                if run.step % cfg.log_every == 0 or run.step == run.total:
                    record = stats.record(env, run.step, run.epoch)
                    now = time.perf_counter()
                    items_per_s = stats.steps * cfg.batch_size / max(now - t_interval, 1e-9)
                    record.update(
                        lr=lr_now,
                        items_per_s=items_per_s,
                        images_per_s=items_per_s * task.images_per_item,
                        wall=run.wall(now),
                        time=time.time(),
                    )
                    last_loss = record["loss"]
                    if env.is_main:
                        append_metrics(run.metrics_path, record)
                        bar.set_postfix(
                            loss="nan" if record["loss"] is None else f"{record['loss']:.4g}",
                            lr=f"{lr_now:.3g}",
                            img_s=f"{record['images_per_s']:.1f}",
                        )
                    stats.reset()
                    t_interval = time.perf_counter()

                if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < run.total:
                    t_ck = time.perf_counter()
                    _save_checkpoint(run, stats)
                    barrier(env)
                    t_interval += time.perf_counter() - t_ck
                stop_now = cfg.stop_after is not None and run.step - start_step >= cfg.stop_after
                if stop_now and run.step < run.total:
                    stop.requested = True
            del batches, loader
            if stopping:
                break
        bar.close()
        return _finish(run, stats, stop, last_loss)
    finally:
        if bar is not None:
            bar.close()
        stop.restore()
