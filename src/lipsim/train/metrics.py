"""Training metrics and logging: per-step statistics summed on the device, the lines of
``metrics.jsonl``, and the loss curve ``loss.png``.

Statistics are accumulated without a per-step synchronisation and reduced over processes only
when a line is logged or a checkpoint is written; steps whose loss is not finite are counted
apart (tolerated only under fp16 loss scaling, whose GradScaler skips those steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import LipSimError
from ..fileio import atomic_write, write_text_atomic
from .distributed import DistEnv, all_reduce_sum


class DivergedError(LipSimError, FloatingPointError):
    """The loss became NaN or infinite; no checkpoint is written after that step."""


class StepStats:
    """Sums of the task's statistics since the last metrics line, plus two counters: steps with a
    finite loss and steps without.

    ``stat_reduce`` maps each statistic to "mean" or "sum" (how processes combine it; "loss"
    must be present).
    """

    def __init__(self, stat_reduce: dict[str, str], device: torch.device, tolerate_nonfinite: bool):
        self.names = list(stat_reduce)
        if "loss" not in self.names:
            raise ValueError("a task must report a 'loss' statistic")
        self.reduce = dict(stat_reduce)
        self.acc = torch.zeros(len(self.names) + 2, dtype=torch.float64, device=device)
        self.steps = 0
        self.tolerate_nonfinite = tolerate_nonfinite

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """Adds one step's statistics (zeros when its loss is not finite) on the device."""
        finite = torch.isfinite(loss.detach()).all()
        values = torch.stack([stats[k].detach().double().reshape(()) for k in self.names])
        self.acc[:-2] += torch.where(finite, values, torch.zeros_like(values))
        self.acc[-2] += finite.double()
        self.acc[-1] += (~finite).double()
        self.steps += 1

    def check_finite(self, n_bad: float, step: int) -> None:
        """DivergedError when ``n_bad`` steps before ``step`` had a NaN or infinite loss."""
        if n_bad > 0 and not self.tolerate_nonfinite:
            raise DivergedError(
                f"the loss was NaN or infinite in {int(n_bad)} step(s) before step {step}; "
                "lower --lr or use --clip-grad (the last checkpoint is still good)"
            )

    def summed(self, env: DistEnv) -> torch.Tensor:
        """The pending sums over all processes, on the CPU (a collective: every process calls it)."""
        return all_reduce_sum(self.acc.detach().clone(), env).to("cpu")

    def restore(self, saved, steps: int, is_main: bool) -> None:
        """Takes back the pending sums a checkpoint saved (already summed over processes, so only
        the main process holds them)."""
        if isinstance(saved, torch.Tensor) and saved.shape == self.acc.shape:
            if is_main:
                self.acc.copy_(saved.to(self.acc.device))
            self.steps = int(steps)

    def record(self, env: DistEnv, step: int, epoch: int) -> dict:
        """``{"step", "epoch", statistic: value per step}`` over all processes, then reset."""
        totals = self.summed(env).tolist()
        self.check_finite(totals[-1], step)
        world = env.world_size
        record: dict = {"step": step, "epoch": epoch}
        steps_per_rank = totals[-2] / world  # steps with a finite loss
        for name, value in zip(self.names, totals, strict=False):
            if steps_per_rank == 0:
                record[name] = None
                continue
            value /= steps_per_rank
            if self.reduce[name] == "mean":
                value /= world
            record[name] = value
        return record

    def reset(self) -> None:
        self.acc.zero_()
        self.steps = 0


def append_metrics(path: Path, record: dict) -> None:
    """One JSON line appended to ``metrics.jsonl``."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
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
