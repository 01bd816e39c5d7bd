"""Training: distillation (stage 1) and 2AFC hinge fine-tuning (stage 2), one loop for both.

From a script::

    from lipsim.train import DistillConfig, run_distill, FinetuneConfig, run_finetune

    run_distill(DistillConfig(data_dir="photos/", teacher="offline-ensemble", arch="s2d-compact",
                              out="runs/distill", epochs=40, batch_size=64))
    run_finetune(FinetuneConfig(dataset="night", data_dir="nights/", init="runs/distill",
                                margin=0.2, out="runs/finetune"))

Both return a :class:`TrainResult`. Under ``torchrun`` call them in every process; they join the
process group themselves. See ``docs/training.md`` for the recipes.
"""

from __future__ import annotations

from .distill import (
    DistillConfig,
    DistillTask,
    build_student,
    distill_loss,
    resolve_teacher,
    rmse,
    run_distill,
)
from .finetune import FinetuneConfig, FinetuneTask, hinge_loss, load_init, run_finetune, two_afc_score
from .loop import (
    DivergedError,
    LoopConfig,
    LRSchedule,
    ResumableSampler,
    TrainResult,
    TrainTask,
    load_checkpoint,
    train,
)

__all__ = [
    "DivergedError",
    "DistillConfig",
    "DistillTask",
    "FinetuneConfig",
    "FinetuneTask",
    "LRSchedule",
    "LoopConfig",
    "ResumableSampler",
    "TrainResult",
    "TrainTask",
    "build_student",
    "distill_loss",
    "hinge_loss",
    "load_checkpoint",
    "load_init",
    "resolve_teacher",
    "rmse",
    "run_distill",
    "run_finetune",
    "train",
    "two_afc_score",
]
