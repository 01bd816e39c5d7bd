"""Training checkpoints: what ``checkpoints/last.pt`` holds, how it is written and read back, and
the checks that a resume continues the run it came from.

A checkpoint is written with ``torch.save`` through :func:`lipsim.fileio.atomic_write` (an
interrupted write leaves the previous one) and read with ``torch.load(weights_only=True)``: it
holds only tensors, dicts, lists, numbers and strings (options are stored as JSON text), and every
field is type-checked before anything is restored from it.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..checkpoints import finite_in_float32, read_torch_file
from ..errors import one_line
from ..fileio import atomic_write
from ..modelfiles import (
    RUN_CHECKPOINT,
    RUN_MODEL,
    TRAINING_CHECKPOINT_FORMAT,
    check_state,
    is_training_checkpoint,
)

if TYPE_CHECKING:
    from .state import RunState

CHECKPOINT_FORMAT = TRAINING_CHECKPOINT_FORMAT
CHECKPOINT_VERSION = 1

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


# -- RNG states as weights-only data ----------------------------------------------------------
def rng_state() -> dict:
    """The states of python's, NumPy's and torch's (+CUDA) generators as plain data and tensors."""
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
    """Restores what :func:`rng_state` recorded (CUDA states only on the same number of devices)."""
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
def save_torch(obj, path: Path) -> None:
    """``torch.save`` through :func:`lipsim.fileio.atomic_write` (fsynced before the rename)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, write)


def load_checkpoint(path) -> dict:
    """Reads a training checkpoint with weights-only unpickling (the one reader of torch files,
    :func:`lipsim.checkpoints.read_torch_file`: a corrupt or unsafe file is a one-line
    :class:`~lipsim.errors.CheckpointError`, a ValueError) and checks its format and fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    obj = read_torch_file(path)
    if not is_training_checkpoint(obj):
        raise ValueError(f"{path}: not a lipsim training checkpoint")
    if type(obj.get("format_version", 0)) is not int:
        raise ValueError(f"{path}: damaged training checkpoint (format_version is not an integer)")
    if obj.get("format_version", 0) > CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {obj['format_version']} is newer than this lipsim"
        )
    _check_checkpoint_fields(obj, path)
    return obj


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


def check_run_folder(cfg) -> None:
    """Fails early (before teachers or data load) when ``--resume`` has nothing to continue or a
    fresh run would overwrite a finished or checkpointed one (``cfg``: a :class:`LoopConfig`)."""
    out = Path(cfg.out)
    ckpt_path = out / RUN_CHECKPOINT
    if cfg.resume and not ckpt_path.exists():
        raise FileNotFoundError(f"{ckpt_path}: nothing to resume (no checkpoint in {out})")
    if not cfg.resume and (ckpt_path.exists() or (out / RUN_MODEL).exists()):
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder")


def check_resume(ckpt: dict, run: RunState, locked_options: tuple[str, ...]) -> None:
    """Refuses to continue a checkpoint with options that change the trajectory, another task
    kind or another run length."""
    saved_cfg, saved_task = json.loads(ckpt["config"]), json.loads(ckpt["task"])
    now = run.cfg.as_dict()
    diffs = []
    for key in locked_options:
        if key in saved_cfg and saved_cfg[key] != now[key]:
            diffs.append(f"{key} (checkpoint {saved_cfg[key]!r}, now {now[key]!r})")
    for key in run.task.locked:
        if key in saved_task and saved_task[key] != run.described.get(key):
            diffs.append(f"{key} (checkpoint {saved_task[key]!r}, now {run.described.get(key)!r})")
    if diffs:
        raise ValueError("cannot resume with different options: " + "; ".join(diffs))
    if ckpt.get("kind") != run.task.kind:
        raise ValueError(
            f"cannot resume: the checkpoint is from a {ckpt.get('kind')!r} run, not {run.task.kind!r}"
        )
    if int(ckpt["total_steps"]) != run.total:
        raise ValueError(
            f"cannot resume: the run now has {run.total} steps, the checkpoint {ckpt['total_steps']} "
            "(did the dataset change size?)"
        )


# -- run state <-> checkpoint -----------------------------------------------------------------
def checkpoint_payload(run: RunState, log_stats: torch.Tensor, log_steps: int) -> dict:
    """The checkpoint of ``run`` at its current step; ``log_stats``/``log_steps`` are the
    statistics of the steps since the last metrics line (so a resumed run logs the same)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "kind": run.task.kind,
        "arch": run.model.config.to_json(),
        "embedding": run.model.embedding,
        "model": {k: v.detach().to("cpu").clone() for k, v in run.backbone.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
        "step": run.step,
        "epoch": run.epoch,
        "batch_in_epoch": run.pos,
        "items_in_epoch": run.pos * run.cfg.batch_size,
        "total_steps": run.total,
        "world_size": run.env.world_size,
        "wall": run.wall(time.perf_counter()),
        "rng": rng_state(),
        "log_stats": log_stats,
        "log_steps": log_steps,
        "config": json.dumps(run.cfg.as_dict()),
        "task": json.dumps(run.described),
    }


def restore_checkpoint(run: RunState, ckpt: dict) -> None:
    """Loads weights, optimiser, schedule, loss scaler, RNG states and position from ``ckpt``
    (already read by :func:`load_checkpoint` and accepted by :func:`check_resume`)."""
    check_state(ckpt["model"], run.backbone.config, run.ckpt_path, finite_in_float32)
    try:
        run.backbone.load_state_dict(ckpt["model"], strict=True)
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        if run.scaler.is_enabled() and ckpt.get("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
        first = one_line(exc, 160, empty="")
        raise ValueError(
            f"{run.ckpt_path}: damaged training checkpoint ({type(exc).__name__}: {first})"
        ) from None
    run.step, run.epoch, run.pos = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
    run.wall_before = float(ckpt.get("wall", 0.0))
