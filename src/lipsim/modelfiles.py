"""Model files, without torch: where they are, what they hold, and the checks they must pass.

This is the one module that knows lipsim's model files; :mod:`lipsim.checkpoints` (torch modules
built from them, weights-only unpickling) and the NumPy engine both read through it.

* **Ours**: one safetensors file. Its header metadata is ``format=lipsim``, ``format_version``,
  ``arch`` (the :class:`~lipsim.spec.ArchConfig` as JSON, at most 100 kB) and ``embedding``
  ("append" | "plain"), plus any extra string entries a trainer adds (teacher, data, ...).
  Tensors are the backbone's state dict in a float dtype; no pickle anywhere.
* **Training run folders**: ``model.safetensors`` once the run finished, ``checkpoints/last.pt``
  (a torch pickle with ``format="lipsim-train"``, its ``arch``/``embedding`` and the weights under
  ``model``) from the first checkpoint on; a folder is read as its model, else its checkpoint.
* **Published LipSim ``.pth``** (docs/method.md §9): a torch pickle of a dict whose
  ``model_state_dict`` holds each tensor under ``module.model.`` and twice (``convs.i``/``base.1.i``,
  ``linear.j``/``base.2.j``); :func:`published_layout` maps it onto our names and architecture.
* **The packaged default**: ``lipsim/weights/default.safetensors``.

Every check happens before a module is built: the metadata is bounded and parsed
(:func:`config_from_metadata`), the weights' keys, shapes, dtypes and values are checked against
the architecture (:func:`check_state`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import CheckpointError
from .fileio import atomic_write
from .spec import EMBEDDINGS, ArchConfig, expected_state, get_config, layer_plan, list_archs

__all__ = [
    "DEFAULT_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "FLOAT_DTYPES",
    "TRAINING_CHECKPOINT_FORMAT",
    "PUBLISHED_OUT_DIM",
    "RUN_MODEL",
    "RUN_CHECKPOINT",
    "ModelFile",
    "default_model_path",
    "resolve_model_path",
    "run_folder_files",
    "is_safetensors",
    "is_torch_file",
    "is_training_checkpoint",
    "model_metadata",
    "config_from_metadata",
    "training_checkpoint_model",
    "check_dtype",
    "check_state",
    "read_safetensors",
    "tensor_dtypes",
    "write_safetensors",
    "published_layout",
]

DEFAULT_NAME = "default.safetensors"
#: the ``format``/``format_version`` entries of our safetensors model files
FORMAT = "lipsim"
FORMAT_VERSION = "1"
#: floating dtypes a model file may hold: safetensors header names and their array/tensor names
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
#: the ``format`` entry of a training checkpoint (``checkpoints/last.pt``, see lipsim.train.checkpoint)
TRAINING_CHECKPOINT_FORMAT = "lipsim-train"
#: output dimension of the published checkpoints (DreamSim ensemble teacher); not stored in them
PUBLISHED_OUT_DIM = 1792
#: a training run folder's final model and its latest checkpoint, relative to the folder
RUN_MODEL = "model.safetensors"
RUN_CHECKPOINT = "checkpoints/last.pt"
#: largest ``arch`` metadata text accepted
_MAX_ARCH_JSON = 100_000


@dataclass(frozen=True)
class ModelFile:
    """What a model file holds once checked: architecture, embedding mode, weights (NumPy arrays
    or torch tensors, by the framework it was read with) and its header metadata."""

    config: ArchConfig
    embedding: str
    state: dict
    metadata: dict


# -- where files are ----------------------------------------------------------------------------
def default_model_path() -> Path:
    """The packaged default model (it may be absent from an installation)."""
    return Path(str(resources.files("lipsim") / "weights" / DEFAULT_NAME))


def resolve_model_path(source=None) -> Path:
    """The file behind ``source``: ``None``/"default" (packaged), a file, or a training run folder
    (its ``model.safetensors``, else its ``checkpoints/last.pt``). :class:`CheckpointError` when
    there is none."""
    if source is None or source == "default":
        path = default_model_path()
        if not path.exists():
            raise CheckpointError(
                "no packaged default model in this installation; train one with "
                "'lipsim train distill ...' or pass a model file (model.safetensors or a published .pth)"
            )
        return path
    path = Path(source)
    try:
        return _existing_model_file(path, source)
    except OSError as exc:  # a name too long, a symlink loop, no permission...
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _existing_model_file(path: Path, source) -> Path:
    if not path.exists():
        hint = (
            f" (architectures: {', '.join(list_archs())} are built with lipsim.create_model)"
            if str(source) in list_archs()
            else ""
        )
        raise CheckpointError(f"{path}: no such model file{hint}")
    if path.is_dir():
        model_file, checkpoint = run_folder_files(path)
        if model_file is None and checkpoint is None:
            raise CheckpointError(f"{path}: is a directory without {RUN_MODEL} or {RUN_CHECKPOINT}")
        path = model_file or checkpoint
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    return path


def run_folder_files(folder: Path) -> tuple[Path | None, Path | None]:
    """``(model.safetensors, checkpoints/last.pt)`` of a training run folder, each ``None`` when
    absent: a finished run has both, an interrupted one only the checkpoint."""
    model_file = Path(folder) / RUN_MODEL
    checkpoint = Path(folder) / RUN_CHECKPOINT
    return (model_file if model_file.exists() else None, checkpoint if checkpoint.exists() else None)


# -- what a file is -----------------------------------------------------------------------------
def is_safetensors(path: Path) -> bool:
    """Whether the file starts like a safetensors file (8-byte header length, then JSON)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < 100_000_000 and head[8:9] == b"{"


def is_torch_file(path: Path) -> bool:
    """Whether the file starts like a torch checkpoint: a zip archive (``torch.save``'s default)
    or a raw pickle (PROTO opcode). A download that went wrong is usually an HTML page."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def is_training_checkpoint(obj) -> bool:
    """Whether an unpickled object is a training checkpoint (``checkpoints/last.pt`` of a run)."""
    return isinstance(obj, dict) and obj.get("format") == TRAINING_CHECKPOINT_FORMAT


# -- header metadata ----------------------------------------------------------------------------
def model_metadata(config: ArchConfig, embedding: str, extra: dict | None = None) -> dict[str, str]:
    """The header metadata of our model file; ``extra`` entries are stored as text (JSON unless
    they are strings) and cannot replace the format's own entries."""
    if embedding not in EMBEDDINGS:
        raise ValueError(f"unknown embedding mode {embedding!r}")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": config.to_json(),
        "embedding": embedding,
    }
    for key, value in (extra or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return metadata


def _parse_config(text, where, what: str) -> ArchConfig:
    """An architecture from its JSON text, its layer plan built once (sizes must be consistent)."""
    if not isinstance(text, str) or len(text) > _MAX_ARCH_JSON:
        raise CheckpointError(f"{where}: bad {what} (not a JSON text of at most 100 kB)")
    try:
        config = ArchConfig.from_json(text)
        layer_plan(config)
    except (ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{where}: bad {what} ({str(exc)[:200]})") from None
    return config


def _embedding(mode, where) -> str:
    if mode not in EMBEDDINGS:
        raise CheckpointError(f"{where}: unknown embedding mode {mode!r}")
    return mode


def config_from_metadata(meta: dict | None, path, embedding: str | None = None) -> tuple[ArchConfig, str]:
    """The architecture and embedding mode a safetensors model file declares (``embedding``
    overrides the file's); :class:`~lipsim.errors.CheckpointError` when they are unusable."""
    meta = meta or {}
    if meta.get("format") != FORMAT or "arch" not in meta:
        raise CheckpointError(f"{path}: safetensors file without lipsim metadata (format/arch)")
    config = _parse_config(meta["arch"], path, "architecture metadata")
    return config, _embedding(embedding or meta.get("embedding", "append"), path)


def training_checkpoint_model(
    ckpt: dict, where, embedding: str | None = None
) -> tuple[ArchConfig, str, dict]:
    """``(architecture, embedding, weights)`` of a training checkpoint (``lipsim train ...``'s
    ``last.pt``, already unpickled); ``embedding`` overrides the one it was trained with. The
    weights are checked by the caller (:func:`check_state`, in its framework)."""
    config = _parse_config(ckpt.get("arch"), where, "architecture in checkpoint")
    mode = embedding or ckpt.get("embedding", "append")
    if mode not in EMBEDDINGS or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{where}: damaged checkpoint (embedding {mode!r}, model weights)")
    return config, mode, ckpt["model"]


# -- weights ------------------------------------------------------------------------------------
def check_dtype(key: str, dtype, path) -> None:
    """Refuses a weight whose dtype (a torch or NumPy dtype, or a safetensors header name such as
    "F32") is not a float type: integer, boolean, complex or 8-bit float weights are no model."""
    name = str(dtype).removeprefix("torch.")
    if name not in FLOAT_DTYPES and name not in FLOAT_DTYPES.values():
        raise CheckpointError(
            f"{path}: {key} has dtype {name}; weights must be float16, bfloat16, float32 or float64"
        )


def check_state(state: dict, config: ArchConfig, path, is_finite: Callable[[object], bool]) -> None:
    """Refuses weights whose keys, shapes or dtypes differ from ``config``'s or that hold NaN/inf.

    ``state`` maps keys to arrays or tensors; ``is_finite(value)`` says whether all entries are
    finite once in float32, the precision the network runs in (the caller's framework)."""
    expected = expected_state(config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match architecture {config.name!r} "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for key, value in state.items():
        shape = getattr(value, "shape", None)
        if shape is None:
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor")
        check_dtype(key, getattr(value, "dtype", None), path)
        if tuple(shape) != expected[key]:
            raise CheckpointError(f"{path}: {key} has shape {tuple(shape)}, expected {expected[key]}")
        if not is_finite(value):
            raise CheckpointError(f"{path}: {key} contains NaN or infinite values")


# -- safetensors --------------------------------------------------------------------------------
def read_safetensors(path, framework: str = "numpy", embedding: str | None = None) -> ModelFile:
    """Our model file at ``path``, its metadata parsed and checked, its tensors read as NumPy
    arrays (``framework="numpy"``, no torch) or torch tensors ("pt"). Weights are checked against
    the architecture by the caller (:func:`check_state` with its framework's finiteness test).

    NumPy has no bfloat16: with "numpy", header dtypes are checked before any tensor is read."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework=framework) as fh:
            meta = fh.metadata() or {}
            config, mode = config_from_metadata(meta, path, embedding)
            if framework == "numpy":
                for key in fh.keys():  # from the header, before NumPy meets a dtype it lacks
                    dtype = fh.get_slice(key).get_dtype()
                    check_dtype(key, dtype, path)
                    if dtype == "BF16":
                        raise CheckpointError(
                            f"{path}: {key} is bfloat16, which NumPy cannot hold; use --engine torch"
                        )
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    return ModelFile(config, mode, state, dict(meta))


def tensor_dtypes(path) -> dict[str, str]:
    """The safetensors header dtype names ("F32", "BF16", ...) of a file's tensors, by key."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        return {k: fh.get_slice(k).get_dtype() for k in fh.keys()}


def write_safetensors(path, tensors: dict, metadata: dict[str, str]) -> None:
    """Writes ``tensors`` (all NumPy arrays, else torch tensors on the CPU) and ``metadata`` into
    one safetensors file, atomically (:func:`lipsim.fileio.atomic_write`)."""
    import numpy as np

    if all(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save_file
    else:  # torch tensors: the caller has imported torch already
        from safetensors.torch import save_file
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# -- the published .pth layout ------------------------------------------------------------------
_BASE_KEY = re.compile(r"^base\.(1|2)\.(\d+)\.(.+)$")
_LAYER_KEY = re.compile(r"^(convs|linear)\.(\d{1,6})\.(kernel|weight)$")


def published_layout(state: dict, out_dim: int, path, same: Callable[[object, object], bool]) -> tuple:
    """``(architecture, state under our names)`` of a published checkpoint's ``model_state_dict``
    (named tensors, already type-checked by the caller): prefixes stripped, ``base.*`` duplicates
    checked (``same(a, b)``: equal values) and dropped, the architecture read off the shapes."""
    state = _published_keys(state, path, same)
    return _published_config(state, out_dim, path), state


def _published_keys(state: dict, path, same) -> dict:
    """Strips ``module.``/``model.``/``backbone.`` prefixes, maps ``base.*`` duplicates onto
    ``convs``/``linear`` names (checking that duplicates agree) and drops ``alpha`` entries."""
    out: dict = {}
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
            if not same(out[k], value):
                raise CheckpointError(f"{path}: duplicate entries for {k} disagree")
            continue
        out[k] = value
    return out


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
    kernel = tuple(state[f"convs.{conv_idx[0]}.kernel"].shape)
    weight = tuple(state[f"linear.{lin_idx[0]}.weight"].shape)
    if len(kernel) != 4 or len(weight) != 2 or 0 in kernel or 0 in weight:
        raise CheckpointError(
            f"{path}: convs.0.kernel {kernel} / linear.1.weight {weight} "
            "are not a 4-d kernel and a 2-d weight (not a LipSim checkpoint?)"
        )
    conv_size, channels = int(kernel[0]), int(kernel[1])
    n_features, flat = int(weight[0]), int(weight[1])
    side = int(round((flat // channels) ** 0.5))
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
