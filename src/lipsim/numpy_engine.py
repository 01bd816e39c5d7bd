"""Torch-free LipSim inference in NumPy float32: the command line's fast-start path.

``import torch`` alone takes about 2 s on a small CPU machine, more than everything else a
one-shot ``lipsim distance a.jpg b.jpg`` does. :class:`NumpyLipSim` computes the same function
as :class:`lipsim.LipSim` for our safetensors model files (both are built from
:func:`lipsim.spec.layer_plan`), with NumPy and its BLAS, and finishes distances, intervals and
2AFC certificates with the same code (:mod:`lipsim.certify`). It is inference only (no
gradients, no training, no published ``.pth`` files, which need torch to unpickle).

Soundness is the torch path's argument: the function is the composition of the same 1-Lipschitz
layers; SLL rescalings are computed in float64 from the stored float32 weights (at least as
accurate as the torch path's IEEE float32); activations are float32, whose rounding the
certificates absorb through :data:`lipsim.certify.FLOAT_SLACK`. Tests hold the backbone outputs of
the two engines to a relative error of 1e-5 on every registered test architecture and on the
packaged model.

Layout: activations are channels-last (B, H, W, C) float32. An SLL convolution
``x - 𝒦*(s·ReLU(𝒦x + b))`` runs as two GEMMs over 3×3 patches: the rescaling ``s = 2/t ≥ 0`` is
folded into the small kernel and bias (``s·ReLU(z) = ReLU(s·z)``) and the transposed
convolution is the convolution with the flipped, channel-transposed, negated kernel, added into x.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import certify
from .batching import in_batches
from .errors import CheckpointError
from .images import check_image_array
from .modelfiles import check_state, is_safetensors, read_safetensors, resolve_model_path, tensor_dtypes
from .spec import ArchConfig, LayerSpec, flat_layers, layer_plan

__all__ = ["NumpyLipSim", "supported"]

_F32 = np.float32


def _safe_inverse(t: np.ndarray) -> np.ndarray:
    """1/t with 1/0 := 0 (a zero row of the Gram matrix is a dead channel), float64."""
    out = np.zeros_like(t)
    np.divide(1.0, t, out=out, where=t > 0)
    return out


def conv_rescaling(kernel: np.ndarray) -> np.ndarray:
    """``t_i = Σ_{j,shift} |G_ij(shift)|`` with ``G = K ⋆ K`` (see lipsim.layers), in float64."""
    k = np.asarray(kernel, dtype=np.float64)
    size = k.shape[-1]
    padded = np.pad(k, ((0, 0), (0, 0), (size - 1, size - 1), (size - 1, size - 1)))
    windows = sliding_window_view(padded, (size, size), axis=(2, 3))  # (i, c, a, b, u, v)
    gram = np.einsum("icabuv,jcuv->ijab", windows, k, optimize=True)
    return np.abs(gram).sum(axis=(1, 2, 3))


def linear_rescaling(weight: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``t_i = Σ_j |(W Wᵀ)_ij| · exp(q_j - q_i)`` (see lipsim.layers), in float64."""
    w = np.asarray(weight, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    gram = w @ w.T
    return np.abs(gram * np.exp(q[None, :] - q[:, None])).sum(axis=1)


def _patches(x: np.ndarray, size: int) -> np.ndarray:
    """(B, H, W, C) -> (B·H·W, C·size²) zero-padded "same" patches, ordered (c, u, v)."""
    b, h, w, c = x.shape
    pad = size // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return sliding_window_view(padded, (size, size), axis=(1, 2)).reshape(b * h * w, c * size * size)


class _SLLConv:
    def __init__(self, kernel: np.ndarray, bias: np.ndarray, q: np.ndarray):
        del q  # cancels in the published parametrisation (see lipsim.layers.sll_conv_rescaling)
        k = np.asarray(kernel, dtype=np.float64)
        s = 2.0 * _safe_inverse(conv_rescaling(k))
        inner, channels, size, _ = k.shape
        self.size = size
        self.w1 = np.ascontiguousarray((k * s[:, None, None, None]).reshape(inner, -1).T, dtype=_F32)
        self.b1 = (np.asarray(bias, dtype=np.float64).reshape(-1) * s).astype(_F32)
        # 𝒦* as a convolution: flip spatially, swap channel axes; negated so that it adds into x
        k2 = -k[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)  # (channels, inner, size, size)
        self.w2 = np.ascontiguousarray(k2.reshape(channels, -1).T, dtype=_F32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        b, h, w, c = x.shape
        res = _patches(x, self.size) @ self.w1
        res += self.b1
        np.maximum(res, 0, out=res)
        out = _patches(res.reshape(b, h, w, -1), self.size) @ self.w2
        out += x.reshape(b * h * w, c)
        return out.reshape(b, h, w, c)


class _SLLLinear:
    def __init__(self, weight: np.ndarray, bias: np.ndarray, q: np.ndarray):
        w = np.asarray(weight, dtype=np.float64)
        self.scale = (2.0 * _safe_inverse(linear_rescaling(w, q))).astype(_F32)
        self.w = np.ascontiguousarray(w, dtype=_F32)
        self.b = np.asarray(bias, dtype=_F32).reshape(-1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        res = x @ self.w.T
        res += self.b
        np.maximum(res, 0, out=res)
        res *= self.scale
        return x - res @ self.w


def _space_to_depth(r: int):
    def apply(x: np.ndarray) -> np.ndarray:  # channel c·r² + i·r + j, as torch.pixel_unshuffle
        b, h, w, c = x.shape
        if h % r or w % r:
            raise ValueError(f"space-to-depth by {r} needs sides divisible by {r}, got {h}x{w}")
        x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)
        return np.ascontiguousarray(x).reshape(b, h // r, w // r, c * r * r)

    return apply


def _sum_pool(k: int):
    def apply(x: np.ndarray) -> np.ndarray:
        b, h, w, c = x.shape
        x = x[:, : h - h % k, : w - w % k]  # as avg_pool2d: a ragged border is dropped
        pooled = x.reshape(b, h // k, k, w // k, k, c).sum(axis=(2, 4), dtype=_F32)
        return pooled / _F32(k)

    return apply


def _channel_pad(channels: int):
    def apply(x: np.ndarray) -> np.ndarray:
        extra = channels - x.shape[-1]
        if extra < 0:
            raise ValueError(f"cannot pad {x.shape[-1]} channels down to {channels}")
        return np.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))

    return apply


def _flatten(x: np.ndarray) -> np.ndarray:  # channel-major, as lipsim.layers.Flatten on NCHW
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(x.shape[0], -1)


def _truncate(n: int):
    def apply(x: np.ndarray) -> np.ndarray:
        if x.shape[1] < n:
            raise ValueError(f"cannot keep {n} of {x.shape[1]} features")
        return x[:, :n]

    return apply


def _zero_pad(n: int):
    def apply(x: np.ndarray) -> np.ndarray:
        if x.shape[1] > n:
            raise ValueError(f"cannot pad {x.shape[1]} features down to {n}")
        return np.pad(x, ((0, 0), (0, n - x.shape[1])))

    return apply


def _global_pool(mode: str):
    """lipsim.pooling.GlobalPool on channels-last (B, H, W, C) input (sums in float32)."""

    def apply(x: np.ndarray) -> np.ndarray:
        b, h, w, c = x.shape
        flat = x.reshape(b, h * w, c)
        total = flat.sum(axis=1, dtype=_F32)
        pooled = total / _F32(np.sqrt(h * w))
        if mode == "sum":
            return pooled
        if mode in ("sum_std", "sum_std_grid"):
            centred = flat - (total / _F32(h * w))[:, None, :]
            out = np.concatenate([pooled, np.sqrt(np.square(centred).sum(axis=1, dtype=_F32))], axis=1)
            if mode == "sum_std":
                return out
            h2, w2 = h // 2, w // 2
            quads = [x[:, :h2, :w2], x[:, :h2, w2:], x[:, h2:, :w2], x[:, h2:, w2:]]
            grid = [q.sum(axis=(1, 2), dtype=_F32) / _F32(np.sqrt(q.shape[1] * q.shape[2])) for q in quads]
            return np.concatenate([out, *grid], axis=1) / _F32(np.sqrt(2.0))
        norm = np.sqrt(np.square(flat).sum(axis=1, dtype=_F32))
        if mode == "norm":
            return norm
        if mode == "sum_norm":
            return np.concatenate([pooled, norm], axis=1) / _F32(np.sqrt(2.0))
        raise ValueError(f"the NumPy engine has no global pooling mode {mode!r}")

    return apply


def _layer(spec: LayerSpec, params: dict[str, np.ndarray]):
    kind, args = spec.kind, spec.args
    if kind == "sll_conv":
        return _SLLConv(params["kernel"], params["bias"], params["q"])
    if kind == "sll_linear":
        return _SLLLinear(params["weight"], params["bias"], params["q"])
    if kind == "shift":
        value = _F32(args[0])
        return lambda x: x - value
    if kind == "space_to_depth":
        return _space_to_depth(args[0])
    if kind == "sum_pool":
        return _sum_pool(args[0])
    if kind == "channel_pad":
        return _channel_pad(args[0])
    if kind == "flatten":
        return _flatten
    if kind == "truncate":
        return _truncate(args[0])
    if kind == "zero_pad":
        return _zero_pad(args[0])
    if kind == "global_pool":
        return _global_pool(args[0])
    raise ValueError(f"the NumPy engine has no layer of kind {kind!r}")


def supported(source) -> bool:
    """Whether ``source`` (a path, None or "default") is a file this engine can run: one of our
    safetensors model files without bfloat16 weights (published ``.pth`` checkpoints and bf16
    weights need torch)."""
    try:
        path = resolve_model_path(source)
        if not is_safetensors(path):
            return False
    except (CheckpointError, OSError):
        return False
    try:  # bfloat16 weights need torch; anything unreadable is left to load() to explain
        return "BF16" not in tensor_dtypes(path).values()
    except Exception:
        return True


class NumpyLipSim:
    """Inference-only LipSim on NumPy float32 arrays (B, 3, S, S) in [0, 1].

    Same answers as :class:`lipsim.LipSim` for the same weights; see the module docstring.
    """

    def __init__(
        self, config: ArchConfig, state: dict[str, np.ndarray], embedding: str = "append", source=None
    ):
        finite = lambda a: bool(np.isfinite(np.asarray(a, dtype=_F32)).all())  # noqa: E731
        check_state(state, config, source or config.name, finite)
        self.config = config
        self.embedding = embedding
        self._layers = []
        for prefix, spec in flat_layers(layer_plan(config)):
            params = {name: state[f"{prefix}.{name}"] for name in spec.param_shapes()}
            self._layers.append(_layer(spec, params))
        self.untrained = False

    @classmethod
    def load(cls, source=None, embedding: str | None = None) -> NumpyLipSim:
        """A safetensors model file, or ``None``/"default" for the packaged model, read and
        checked by :func:`lipsim.modelfiles.read_safetensors` (the one reader of model files)."""
        path = resolve_model_path(source)
        found = read_safetensors(path, framework="numpy", embedding=embedding)
        return cls(found.config, found.state, embedding=found.embedding, source=path)

    # -- description ----------------------------------------------------------------------------
    @property
    def arch(self) -> str:
        return self.config.name

    @property
    def input_size(self) -> int:
        return self.config.input_size

    @property
    def embed_dim(self) -> int:
        return self.config.out_dim + (1 if self.embedding == "append" else 0)

    # -- the function ---------------------------------------------------------------------------
    def _features_of(self, *named: tuple[np.ndarray, str]) -> np.ndarray:
        for x, name in named:
            check_image_array(x, name, size=self.input_size)
        x = np.concatenate([np.asarray(x, dtype=_F32) for x, _ in named])
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # channels-last
        for layer in self._layers:
            x = layer(x)
        return x

    def features(self, x: np.ndarray) -> np.ndarray:
        """The backbone output f(x), (B, k), float32."""
        return self._features_of((x, "images"))

    def embed(self, x: np.ndarray) -> np.ndarray:
        """Unit-norm embeddings g(x), (B, D), float64."""
        return certify.normalise_features(self.features(x), self.embedding)

    def distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Distance ``1 - ⟨g(x), g(y)⟩`` in [0, 2], float32 (B,); a batch of 1 broadcasts (as
        :meth:`lipsim.LipSim.distance`, also ``model(x, y)``)."""
        nx, ny = len(x), len(y)
        if nx != ny and 1 not in (nx, ny):
            raise ValueError(f"batch sizes {nx} and {ny} do not match")
        f = self._features_of((x, "x"), (y, "y"))
        fx, fy = f[:nx], f[nx:]
        shape = (max(nx, ny), f.shape[1])
        fx, fy = np.broadcast_to(fx, shape), np.broadcast_to(fy, shape)
        return certify.interval_from_features(fx, fy, 0.0, self.embedding)[0]

    __call__ = distance

    def distance_interval(self, x: np.ndarray, y: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """Bounds ``lo ≤ d(x + δ, y) ≤ hi`` for every ‖δ‖₂ ≤ eps (δ on x only)."""
        return self.distance_with_interval(x, y, eps)[1:]

    def pairwise(
        self,
        x: np.ndarray,
        y: np.ndarray | None = None,
        eps: float | None = None,
        batch_size: int = 64,
        progress: bool | None = False,
    ):
        """All distances (N, M), each image embedded once; with ``eps`` also ``(lo, hi)``; as
        :meth:`lipsim.LipSim.pairwise` (cached embeddings (N, ``embed_dim``) too)."""
        if isinstance(x, np.ndarray) and x.ndim == 2:
            return certify.pairwise_from_cached(x, y, self.embed_dim, self.embedding, eps)
        sides = [(x, "x")] if y is None else [(x, "x"), (y, "y")]
        for images, name in sides:
            if not isinstance(images, np.ndarray) or images.ndim != 4 or len(images) == 0:
                raise ValueError(f"{name} must be a non-empty image batch array (B, 3, H, W)")
        fx = in_batches(self.features, x, batch_size, np.concatenate, progress)
        fy = fx if y is None else in_batches(self.features, y, batch_size, np.concatenate, progress)
        return certify.pairwise_from_features(fx, fy, self.embedding, eps)

    def distance_with_interval(self, x: np.ndarray, y: np.ndarray, eps: float):
        """``(d, lo, hi)`` as :meth:`lipsim.LipSim.distance_with_interval`."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"batch sizes {x.shape[0]} and {y.shape[0]} do not match")
        f = self._features_of((x, "x"), (y, "y"))
        return certify.interval_from_features(f[: x.shape[0]], f[x.shape[0] :], eps, self.embedding)

    def certify_2afc(self, ref: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> certify.Certificate2AFC:
        """As :meth:`lipsim.LipSim.certify_2afc`, with NumPy arrays."""
        n_ref = certify.check_2afc_batches(len(ref), len(x0), len(x1))
        f = self._features_of((ref, "ref"), (x0, "x0"), (x1, "x1"))
        f_ref, f0, f1 = np.split(f, [n_ref, n_ref + len(x0)])
        return certify.certificate_from_features(np.broadcast_to(f_ref, f0.shape), f0, f1, self.embedding)
