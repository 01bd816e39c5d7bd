"""One optimisation step, the loader of one epoch, and the graceful stop on Ctrl-C/SIGTERM."""

from __future__ import annotations

import signal
import threading

import torch
from torch.utils.data import DataLoader

from .state import RunState


def train_step(run: RunState, net: torch.nn.Module, batch) -> tuple[torch.Tensor, dict, float]:
    """Forward (under autocast when the run uses it), backward, optional clipping, Adam and the
    schedule. Returns the loss, the task's statistics and the learning rate the step used."""
    optimizer, scaler = run.optimizer, run.scaler
    dtype = run.amp_dtype
    with torch.autocast(run.env.device.type, dtype=dtype, enabled=dtype is not None):
        loss, stats = run.task.compute(net, batch, run.env)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if run.cfg.clip_grad is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(run.params, run.cfg.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    lr_now = optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    run.step, run.pos = run.step + 1, run.pos + 1
    return loss, stats, lr_now


def _worker_init(worker_id: int) -> None:
    # Ctrl-C goes to the whole process group; only the main process handles it (and then stops
    # asking workers for data), so workers ignore it instead of dying mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def epoch_loader(run: RunState) -> DataLoader:
    """The loader of ``run.epoch`` from batch ``run.pos`` on (fresh augmentations per epoch)."""
    cfg, epoch = run.cfg, run.epoch
    run.task.set_epoch(epoch)
    run.sampler.set_epoch(epoch)
    run.sampler.start = run.pos * run.per_rank
    return DataLoader(
        run.task.dataset,
        batch_size=run.per_rank,
        sampler=run.sampler,
        num_workers=cfg.num_workers,
        drop_last=True,
        pin_memory=run.env.device.type == "cuda",
        worker_init_fn=_worker_init if cfg.num_workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch),
        prefetch_factor=4 if cfg.num_workers > 0 else None,
    )


class StopFlag:
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
            previous = self._previous.get(signum)  # read before restore() forgets it
            self.restore()
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
