"""Model files as torch modules: :func:`load`, :func:`save` and published ``.pth`` checkpoints.

What a model file holds and every check it must pass live in :mod:`lipsim.modelfiles`
(torch-free, shared with the NumPy engine); this module adds what needs torch: weights-only
unpickling of published ``.pth`` files (docs/method.md §9) and training checkpoints, and building
the :class:`~lipsim.model.LipSim` that holds checked weights. Reading a file that would need to
run code when unpickled is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from . import hub
from .archs import ArchConfig, build_backbone
from .devices import usable_device
from .errors import CheckpointError, one_line
from .model import LipSim
from .modelfiles import (
    PUBLISHED_OUT_DIM,
    check_dtype,
    check_state,
    default_model_path,
    is_safetensors,
    is_training_checkpoint,
    published_layout,
    read_safetensors,
    resolve_model_path,
    training_checkpoint_model,
)
from .quiet import torch_notices_off

__all__ = ["load", "save", "save_model", "load_published", "default_model_path", "PUBLISHED_OUT_DIM"]


def save(model: LipSim, path, extra_metadata: dict | None = None) -> None:
    """Saves a :class:`LipSim` into one safetensors file, atomically: the same call as
    ``model.save(path)`` (one writer, :meth:`LipSim.save`; the format is :mod:`lipsim.modelfiles`').
    ``extra_metadata`` adds text entries to the file's header (a trainer's teacher, data, ...)."""
    if not isinstance(model, LipSim):
        raise TypeError(f"lipsim.save takes a LipSim model, got {type(model).__name__}")
    model.save(path, extra_metadata=extra_metadata)


#: the name training and the scripts use
save_model = save


def _finish(model: LipSim, device) -> LipSim:
    model.eval().requires_grad_(False)
    return model.to(usable_device(device))


def _load_safetensors(path: Path, device, embedding: str | None) -> LipSim:
    found = read_safetensors(path, framework="pt", embedding=embedding)
    return _finish(build_checked(found.config, found.embedding, found.state, path), device)


def finite_in_float32(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite once in float32, the precision the network runs in
    (a float64 weight of 1e300 is finite in its file and infinite in the model)."""
    return bool(torch.isfinite(t.float()).all())


def build_checked(config: ArchConfig, embedding: str, state: dict, path) -> LipSim:
    """The model of ``config`` holding ``state``, after every key, shape and value of ``state`` was
    checked against the configuration: nothing is allocated for a file that does not hold it."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor")
    check_state(state, config, path, finite_in_float32)
    model = LipSim(build_backbone(config), embedding=embedding)
    model.backbone.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model


def load_published(path, out_dim: int = PUBLISHED_OUT_DIM, embedding: str = "plain", device="cpu") -> LipSim:
    """Loads a published LipSim ``.pth`` checkpoint with weights-only unpickling.

    ``embedding="plain"`` reproduces the published network's distances (its certificates then
    use the norm-aware radius); pass "append" only for checkpoints fine-tuned with the appended
    constant (the reference code's ``--requires_bias``).
    """
    path = Path(path)
    return _published_from(read_torch_file(path), path, out_dim, embedding, device)


def read_torch_file(path: Path):
    """The content of a torch pickle, read with weights-only unpickling; one-line
    :class:`CheckpointError` for anything unreadable or unsafe."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({one_line(exc)})") from None
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # zip (torch.save) or pickle
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint nor a safetensors file (a model file, a run folder "
            "or 'default' is expected)"
        )
    try:
        with torch_notices_off():  # torch warns about pickle protocols before it refuses them
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = [line for line in lines if "GLOBAL" in line]  # a class or function to import
        detail = detail or lines[-2:-1] or lines[:1] or [""]
        with open(path, "rb") as fh:
            pickled = fh.read(1) == b"\x80"  # a raw pickle (PROTO opcode), not an image or a text
        if not (pickled or "GLOBAL" in detail[0]):
            raise CheckpointError(f"{path}: not a PyTorch checkpoint ({detail[0][:120]})") from None
        raise CheckpointError(
            f"{path}: refused: the file holds Python objects that weights-only loading will not "
            f"execute (it could run code); lipsim never unpickles untrusted files [{detail[0][:120]}]"
        ) from None
    except Exception as exc:  # any failure to parse a user file is a one-line error
        msg = one_line(exc, empty="")
        msg = f"{type(exc).__name__}: {msg}" if len(msg) < 20 else msg
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise CheckpointError(
                f"{path}: refused: the file needs full unpickling, which could run code; "
                "lipsim only loads weights"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({msg[:160]})") from None
    return obj


def model_from_training_checkpoint(ckpt: dict, where, embedding: str | None = None) -> LipSim:
    """The model held by a training checkpoint (``lipsim train ...``'s ``last.pt``), its weights
    checked against its architecture before anything is built; ``embedding`` overrides the one
    it was trained with."""
    config, mode, state = training_checkpoint_model(ckpt, where, embedding)
    return build_checked(config, mode, state, where)


def _published_from(obj, path: Path, out_dim: int, embedding: str, device) -> LipSim:
    if isinstance(obj, dict) and "model_state_dict" in obj:
        state = obj["model_state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        raise CheckpointError(f"{path}: no model_state_dict in checkpoint")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: model_state_dict is not a dict")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is not a named tensor (not a LipSim checkpoint?)")
        check_dtype(key, value.dtype, path)
        if value.layout != torch.strided:
            raise CheckpointError(f"{path}: {key} is a {value.layout} tensor; weights must be dense")
    config, state = published_layout(state, out_dim, path, torch.equal)
    return _finish(build_checked(config, embedding, state, path), device)


def load(source=None, device="cpu", embedding: str | None = None, out_dim: int = PUBLISHED_OUT_DIM) -> LipSim:
    """Loads a model: ``None``/"default" (packaged), a ``.safetensors`` file, a training run folder
    or its ``checkpoints/last.pt``, a published ``.pth``, or a published checkpoint by name
    (``"lipsim-margin-0.5"``, ``"lipsim-margin-0.2"``, ``"lipsim-pretrained"``; see :mod:`lipsim.hub`).

    The model is returned in eval mode with gradients off for its parameters (input gradients
    still work). Only a published name not yet in the cache is downloaded (once, hash recorded,
    verified on every later load). ``out_dim`` applies to published checkpoints only (their
    truncation size is not stored in the file: 1792 for the DreamSim-ensemble teacher).
    """
    if hub.is_published_name(source):
        entry = hub.published(source)
        path = hub.fetch(source)
        return load_published(
            path, out_dim=entry.out_dim, embedding=embedding or entry.embedding, device=device
        )
    path = resolve_model_path(source)
    if is_safetensors(path):
        return _load_safetensors(path, device, embedding)
    obj = read_torch_file(path)
    if is_training_checkpoint(obj):  # a run's checkpoints/last.pt (also what a run folder without
        return _finish(model_from_training_checkpoint(obj, path, embedding), device)  # a model holds)
    return _published_from(obj, path, out_dim, embedding or "plain", device)
