"""Model files: our safetensors format, published ``.pth`` checkpoints, the packaged default.

* Ours: one safetensors file; metadata ``format=lipsim``, ``arch`` (ArchConfig JSON) and
  ``embedding`` ("append" | "plain"). No pickle anywhere.
* Published LipSim checkpoints (lipsim-method.md §3.4): a torch pickle holding a dict with
  ``model_state_dict`` whose keys carry ``module.model.`` and appear twice (``convs.i`` and
  ``base.1.i``, ``linear.j`` and ``base.2.j``). Read with ``weights_only=True``: a file that
  would need to run code when unpickled is refused.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .archs import ArchConfig, build_backbone, get_config, list_archs
from .devices import usable_device
from .errors import CheckpointError
from .fileio import atomic_write
from .model import LipSim
from .modelfiles import default_model_path, is_safetensors, resolve_model_path
from .quiet import torch_notices_off
from .spec import (
    EMBEDDINGS,
    FORMAT,
    FORMAT_VERSION,
    check_dtype,
    check_state,
    config_from_metadata,
    layer_plan,
)

__all__ = ["load", "save_model", "load_published", "default_model_path", "PUBLISHED_OUT_DIM"]

#: output dimension of the published checkpoints (DreamSim ensemble teacher)
PUBLISHED_OUT_DIM = 1792
#: the ``format`` entry of a training checkpoint (written by :mod:`lipsim.train.loop`)
TRAINING_CHECKPOINT_FORMAT = "lipsim-train"


def save_model(model: LipSim, path, extra_metadata: dict | None = None) -> None:
    """Saves a :class:`LipSim` into one safetensors file, atomically."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.backbone.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": model.config.to_json(),
        "embedding": model.embedding,
    }
    for key, value in (extra_metadata or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _finish(model: LipSim, device) -> LipSim:
    model.eval().requires_grad_(False)
    return model.to(usable_device(device))


def _load_safetensors(path: Path, device, embedding: str | None) -> LipSim:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    config, mode = config_from_metadata(meta, path, embedding)
    return _finish(build_checked(config, mode, tensors, path), device)


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


_BASE_KEY = re.compile(r"^base\.(1|2)\.(\d+)\.(.+)$")


def normalise_published_keys(state: dict) -> dict:
    """Strips ``module.``/``model.``/``backbone.`` prefixes, maps ``base.*`` duplicates onto
    ``convs``/``linear`` names (checking that duplicates agree) and drops ``alpha`` entries."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key
        for prefix in ("module.", "model.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        if "alpha" in k:
            continue
        m = _BASE_KEY.match(k)
        if m:
            k = f"{'convs' if m.group(1) == '1' else 'linear'}.{m.group(2)}.{m.group(3)}"
        if k in out:
            if not torch.equal(out[k], value):
                raise CheckpointError(f"duplicate entries for {k} disagree")
            continue
        out[k] = value
    return out


_LAYER_KEY = re.compile(r"^(convs|linear)\.(\d{1,6})\.(kernel|weight)$")


def _published_config(state: dict, out_dim: int, path) -> ArchConfig:
    idx: dict[str, set[int]] = {"convs": set(), "linear": set()}
    for key in state:
        m = _LAYER_KEY.match(key)
        if m and (m.group(1) == "convs") == (m.group(3) == "kernel"):
            idx[m.group(1)].add(int(m.group(2)))
    conv_idx, lin_idx = sorted(idx["convs"]), sorted(idx["linear"])
    if not conv_idx or not lin_idx:
        raise CheckpointError(f"{path}: no SLL convolution/linear weights found (not a LipSim checkpoint?)")
    if conv_idx != list(range(len(conv_idx))) or lin_idx != list(range(1, len(lin_idx) + 1)):
        raise CheckpointError(f"{path}: layer indices are not contiguous (not a LipSim checkpoint?)")
    kernel = state[f"convs.{conv_idx[0]}.kernel"]
    weight = state[f"linear.{lin_idx[0]}.weight"]
    if kernel.dim() != 4 or weight.dim() != 2 or 0 in kernel.shape or 0 in weight.shape:
        raise CheckpointError(
            f"{path}: convs.0.kernel {tuple(kernel.shape)} / linear.1.weight {tuple(weight.shape)} "
            "are not a 4-d kernel and a 2-d weight (not a LipSim checkpoint?)"
        )
    conv_size, channels = int(kernel.shape[0]), int(kernel.shape[1])
    n_features, flat = int(weight.shape[0]), int(weight.shape[1])
    side2 = flat // channels
    side = int(round(side2**0.5))
    if side * side * channels != flat:
        raise CheckpointError(f"{path}: linear input size {flat} does not match {channels} channels")
    if out_dim > flat:
        raise CheckpointError(
            f"{path}: out_dim {out_dim} exceeds the network's {flat} features (pass out_dim=...)"
        )
    fields = dict(
        family="published",
        out_dim=out_dim,
        input_size=side * 16,
        depth=len(conv_idx),
        channels=channels,
        conv_size=conv_size,
        depth_linear=len(lin_idx),
        n_features=n_features,
    )
    for name in list_archs():
        cfg = get_config(name)
        if cfg.family == "published" and all(getattr(cfg, k) == v for k, v in fields.items()):
            return cfg
    try:
        return ArchConfig(name="published-custom", **fields)
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a usable LipSim checkpoint ({exc})") from None


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
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        msg = f"{type(exc).__name__}: {msg}" if len(msg) < 20 else msg
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise CheckpointError(
                f"{path}: refused: the file needs full unpickling, which could run code; "
                "lipsim only loads weights"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({msg[:160]})") from None
    return obj


def is_training_checkpoint(obj) -> bool:
    """Whether an unpickled object is a training checkpoint (``checkpoints/last.pt`` of a run)."""
    return isinstance(obj, dict) and obj.get("format") == TRAINING_CHECKPOINT_FORMAT


def model_from_training_checkpoint(ckpt: dict, where, embedding: str | None = None) -> LipSim:
    """The model held by a training checkpoint (``lipsim train ...``'s ``last.pt``), its weights
    checked against its architecture before anything is built; ``embedding`` overrides the one
    it was trained with."""
    try:
        config = ArchConfig.from_json(ckpt["arch"])
        layer_plan(config)
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{where}: bad architecture in checkpoint ({str(exc)[:200]})") from None
    embedding = embedding or ckpt.get("embedding", "append")
    if embedding not in EMBEDDINGS or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{where}: damaged checkpoint (embedding {embedding!r}, model weights)")
    return build_checked(config, embedding, ckpt["model"], where)


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
    try:
        state = normalise_published_keys(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    config = _published_config(state, out_dim, path)
    return _finish(build_checked(config, embedding, state, path), device)


def load(source=None, device="cpu", embedding: str | None = None, out_dim: int = PUBLISHED_OUT_DIM) -> LipSim:
    """Loads a model: ``None``/"default" (packaged), a ``.safetensors`` file, a published ``.pth``,
    or a published checkpoint by name (``"lipsim-margin-0.5"``, ``"lipsim-margin-0.2"``,
    ``"lipsim-pretrained"``; see :mod:`lipsim.hub`).

    The model is returned in eval mode with gradients off for its parameters (input gradients
    still work). Only a published name not yet in the cache is downloaded (once, hash recorded,
    verified on every later load). ``out_dim`` applies to published checkpoints only (their
    truncation size is not stored in the file: 1792 for the DreamSim-ensemble teacher).
    """
    from . import hub

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
