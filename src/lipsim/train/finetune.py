"""Stage 2: fine-tune on human (or synthetic) 2AFC judgements with a hinge loss (docs/method.md §6.2).

For a triplet (ref, x0, x1) with label y (the fraction preferring x1) and the appended-constant
embedding g (``model.embedding == "append"``: g is 1-Lipschitz, so certificates stay sound)::

    d_i   = 1 - <g(ref), g(x_i)>
    logit = d0 - d1                      (> 0 when x1 is the closer one)
    ŷ     = 2·round(y) - 1 ∈ {-1, +1}    (torch.round: halves go to even, so y = 0.5 gives -1)
    L     = Σ_batch max(0, margin - logit·ŷ)

The loss is **summed** over the batch, as published (DreamSim's trainer divides by the batch
size, LipSim does not); under torchrun it is the sum over the *global* batch (each process
multiplies its local sum by the number of processes, because DDP averages gradients).

Defaults (a judgement call from §3.2, see ``docs/training.md``): batch 32, 1 epoch, margin 0.2,
Adam betas (0.5, 0.9) with **fresh** moments, peak lr 1e-3 with the cosine schedule and
min(2000, 10 %) warm-up steps. The published run restored the Adam moments of the distillation
checkpoint and used lr 0.01 with the triangular schedule: ``--init-optimizer --lr 0.01
--schedule triangular`` reproduces that recipe.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..checkpoints import load, read_torch_file
from ..embedding import normalise
from ..errors import CheckpointError
from ..model import LipSim
from ..modelfiles import RUN_CHECKPOINT, RUN_MODEL, is_safetensors, is_training_checkpoint, run_folder_files
from . import distributed
from .loop import LoopConfig, TrainResult, TrainTask, check_run_folder, load_checkpoint, train

__all__ = [
    "FinetuneConfig",
    "FinetuneTask",
    "run_finetune",
    "hinge_loss",
    "two_afc_score",
    "load_init",
    "DATASETS",
]

log = logging.getLogger("lipsim.train")

DATASETS = ("night", "bapps")


@dataclass(kw_only=True)
class FinetuneConfig(LoopConfig):
    """Options of ``lipsim train finetune`` (run length: 1 epoch unless steps/epochs are given).

    ``init``: the model to start from: a ``.safetensors`` model, a run folder (its
    ``model.safetensors``, or its ``checkpoints/last.pt`` if the run did not finish), a training
    checkpoint ``last.pt``, a published LipSim ``.pth`` or ``arch:NAME`` (random weights).
    ``init_optimizer``: start from the Adam moments stored with ``init`` (a training checkpoint
    or run folder, or a published ``.pth`` with ``optimizer_state_dict``).
    """

    dataset: str
    data_dir: str
    init: str
    margin: float = 0.2
    split: str = "train"
    min_votes: float = 6
    categories: tuple[str, ...] | None = None
    init_optimizer: bool = False
    lr: float = 1e-3

    def validate(self) -> None:
        super().validate()
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r} (choose from {', '.join(DATASETS)})")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"margin must be a non-negative number, got {self.margin}")


def hinge_loss(d0: torch.Tensor, d1: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    """``Σ max(0, margin - (d0 - d1)·(2·round(y) - 1))`` over the batch (a scalar)."""
    logit = d0.float() - d1.float()
    sign = 2.0 * torch.round(y.float().to(logit.device)) - 1.0
    return torch.clamp(margin - logit * sign, min=0.0).sum()


def two_afc_score(d0: torch.Tensor, d1: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-triplet 2AFC agreement ``1[d0<d1]·(1-y) + 1[d1<d0]·y + 0.5·1[d0=d1]`` (docs/api.md "Scores")."""
    y = y.float().to(d0.device)
    return (d0 < d1).float() * (1 - y) + (d1 < d0).float() * y + 0.5 * (d0 == d1).float()


def _probe_torch_file(path: Path):
    """The content of a torch file (:func:`lipsim.checkpoints.read_torch_file`, the one reader of
    torch pickles: weights-only), or None when it is not one; ``lipsim.load`` then says why."""
    try:
        return read_torch_file(path)
    except CheckpointError:
        return None


def load_init(
    source: str, want_optimizer: bool = False, seed: int = 0
) -> tuple[LipSim, dict | None, list[str]]:
    """``(model, optimiser state or None, notes)`` for ``--init``; see :class:`FinetuneConfig`.

    The model comes back with ``embedding="append"`` (a note says so when it was switched).
    """
    notes: list[str] = []
    optimizer_state = None
    if source.startswith("arch:"):
        if want_optimizer:
            raise ValueError("--init-optimizer needs an initial model with a stored optimiser state")
        torch.manual_seed(seed)
        model = LipSim.from_config(source[5:], embedding="append")
        notes.append(f"starting from architecture {source[5:]!r} with random weights")
        return model, None, notes
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model, run folder or checkpoint")
    model_file: Path | None = path
    ckpt_file: Path | None = None
    if path.is_dir():
        model_file, ckpt_file = run_folder_files(path)
        if model_file is None and ckpt_file is None:
            raise ValueError(f"{path}: a folder without {RUN_MODEL} or {RUN_CHECKPOINT}")
    probed = None
    if model_file is not None and not is_safetensors(model_file):
        probed = _probe_torch_file(model_file)
        if is_training_checkpoint(probed):
            ckpt_file, model_file, probed = model_file, None, None
    if model_file is None:  # a training checkpoint: its fields are checked as for a resume
        load_checkpoint(ckpt_file)
    model = load(model_file or ckpt_file)  # the one loader of model files (lipsim.load)
    if want_optimizer:
        if ckpt_file is not None:
            optimizer_state = load_checkpoint(ckpt_file)["optimizer"]
        elif isinstance(probed, dict) and isinstance(probed.get("optimizer_state_dict"), dict):
            optimizer_state = probed["optimizer_state_dict"]
        else:
            raise ValueError(
                f"{source}: holds no optimiser state (--init-optimizer needs a run folder, a training "
                "checkpoint last.pt or a published .pth with optimizer_state_dict)"
            )
        notes.append(f"Adam moments restored from {ckpt_file or source}")
    if model.embedding != "append":
        notes.append(
            f"{source}: embedding switched from {model.embedding!r} to 'append' (the appended constant "
            "makes g 1-Lipschitz; the hinge loss is computed on that embedding)"
        )
        model.embedding = "append"
    return model, optimizer_state, notes


class FinetuneTask(TrainTask):
    """2AFC hinge fine-tuning as a :class:`TrainTask` (see the module docstring)."""

    kind = "finetune"
    images_per_item = 3
    stat_reduce = {"loss": "sum", "2afc": "mean"}
    # what selects the data and the objective: a resume with other values would train another run
    locked = ("dataset", "margin", "split", "dataset_items", "min_votes", "categories")

    def __init__(self, cfg: FinetuneConfig, env: distributed.DistEnv, model: LipSim | None = None):
        self.cfg = cfg
        self.env = env
        self.notes: list[str] = []
        self._optimizer_state = None
        if model is None:
            model, self._optimizer_state, self.notes = load_init(
                cfg.init, cfg.init_optimizer and not cfg.resume, cfg.seed
            )
        elif model.embedding != "append":
            self.notes.append("embedding switched to 'append'")
            model.embedding = "append"
        self.model = model
        size = model.input_size
        if cfg.dataset == "night":
            from ..data import NightDataset

            self.dataset = NightDataset(cfg.data_dir, split=cfg.split, size=size, min_votes=cfg.min_votes)
        else:
            from ..data import BappsDataset

            self.dataset = BappsDataset(cfg.data_dir, split=cfg.split, categories=cfg.categories, size=size)

    def compute(self, net, batch, env):
        device = env.device
        ref = batch["ref"].to(device, non_blocking=True)
        x0 = batch["x0"].to(device, non_blocking=True)
        x1 = batch["x1"].to(device, non_blocking=True)
        y = batch["y"].to(device, torch.float32, non_blocking=True)
        n = ref.shape[0]
        f = net(torch.cat([ref, x0, x1])).float()
        g = normalise(f, self.model.embedding)
        g_ref, g0, g1 = g[:n], g[n : 2 * n], g[2 * n :]
        d0 = 1.0 - (g_ref * g0).sum(dim=1)
        d1 = 1.0 - (g_ref * g1).sum(dim=1)
        loss = hinge_loss(d0, d1, y, self.cfg.margin)
        stats = {"loss": loss.detach(), "2afc": two_afc_score(d0.detach(), d1.detach(), y).mean()}
        return loss * env.world_size, stats

    def describe(self) -> dict:
        bapps_categories = self.cfg.categories if self.cfg.dataset == "bapps" else None
        return {
            "dataset": self.cfg.dataset,
            "data_dir": str(self.cfg.data_dir),
            "split": self.cfg.split,
            "margin": self.cfg.margin,
            "min_votes": self.cfg.min_votes if self.cfg.dataset == "night" else None,
            "categories": list(bapps_categories) if bapps_categories else None,
            "init": str(self.cfg.init),
            "arch": self.model.arch,
            "embedding": self.model.embedding,
            "out_dim": self.model.backbone.out_dim,
            "dataset_items": len(self.dataset),
            "loss": "hinge, summed over the global batch",
        }

    def initial_optimizer_state(self) -> dict | None:
        return self._optimizer_state

    def model_metadata(self) -> dict:
        return {"finetune_margin": str(self.cfg.margin), "finetune_dataset": self.cfg.dataset}


def run_finetune(config: FinetuneConfig, model: LipSim | None = None) -> TrainResult:
    """Runs (or with ``config.resume`` continues) a fine-tuning run; call it in every process
    under torchrun. ``model`` overrides ``config.init`` with a model object."""
    if config.steps is None and config.epochs is None:
        config = replace(config, epochs=1)
    config.validate()
    check_run_folder(config)
    env = distributed.setup(config.device)
    try:
        task = FinetuneTask(config, env, model)
        if env.is_main:
            for note in task.notes:
                log.info("note: %s", note)
        return train(task, config, env)
    finally:
        distributed.cleanup(env)
