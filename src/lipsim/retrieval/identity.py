"""Which model produced a set of embeddings: architecture, embedding mode, a hash of the weights.

Embeddings from two models live in different spaces; a distance between them means nothing and
a certificate computed across them is void. An index therefore records the identity of the model
that built it and refuses queries embedded by any other.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch

from ..errors import LipSimError
from ..spec import EMBEDDINGS

__all__ = ["ModelIdentity", "ModelMismatchError", "weights_sha256"]


class ModelMismatchError(LipSimError, ValueError):
    """Embeddings or queries from a model other than the one an index was built with."""


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over the state dict: every entry's name, dtype, shape and raw bytes, sorted by name."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """The facts that make two models' embeddings comparable."""

    arch: str
    embedding: str
    weights_sha256: str
    dim: int
    arch_config: str = ""

    @classmethod
    def of(cls, model) -> ModelIdentity:
        return cls(
            arch=model.arch,
            embedding=model.embedding,
            weights_sha256=weights_sha256(model.backbone),
            dim=int(model.embed_dim),
            arch_config=model.config.to_json(),
        )

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelIdentity:
        """Inverse of :meth:`as_dict`; a one-line ValueError for a malformed description (a wrong
        embedding mode would select the wrong certificate)."""
        if not isinstance(data, dict):
            raise ValueError(f"the model identity must be an object, got {type(data).__name__}")
        strings = {k: data.get(k) for k in ("arch", "embedding", "weights_sha256")}
        strings["arch_config"] = data.get("arch_config", "")
        bad = [k for k, v in strings.items() if not isinstance(v, str)]
        dim = data.get("dim")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            bad.append("dim")
        if bad:
            raise ValueError(f"the model identity has a missing or invalid {', '.join(bad)}")
        if strings["embedding"] not in EMBEDDINGS:
            raise ValueError(f"the model identity's embedding must be one of {EMBEDDINGS}")
        return cls(dim=dim, **strings)

    def short(self) -> str:
        return f"arch {self.arch}, embedding {self.embedding}, weights sha256 {self.weights_sha256[:12]}"

    def check(self, other: ModelIdentity, what: str = "this index") -> None:
        """Raises :class:`ModelMismatchError` unless ``other`` is the same model."""
        if (self.arch, self.embedding, self.weights_sha256, self.dim) != (
            other.arch,
            other.embedding,
            other.weights_sha256,
            other.dim,
        ):
            raise ModelMismatchError(
                f"{what} was built with a different model ({self.short()}); the model given is "
                f"{other.short()}: its distances would be meaningless, refusing"
            )
