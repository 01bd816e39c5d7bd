"""2AFC scoring as pure functions (docs/api.md "Scores"; docs/method.md §7.1).

A triplet is ``(ref, x0, x1)`` with human preference ``y`` ∈ [0, 1], the fraction of judges who
found ``x1`` closer to ``ref`` (NIGHT: 0/1 ``right_vote``; BAPPS: k/5). With the metric's
distances ``d0 = d(ref, x0)`` and ``d1 = d(ref, x1)`` the per-triplet 2AFC score is

    s = 1[d0 < d1]·(1 - y) + 1[d1 < d0]·y + ½·1[d0 = d1]

i.e. the fraction of judges the metric agrees with (a tie agrees with half of them). The natural
score is the mean of ``s``; the certified score at ε is the mean of ``s·1[radius > ε]`` (strict:
a radius ``R`` protects perturbations of norm ``< R``, so ε = R is not covered), which for
NIGHT's 0/1 labels is "correct and certified". Ties carry radius 0 and are never certified.

Everything here works on 1-D tensors or sequences of numbers and returns Python floats or
float64 tensors; nothing touches a model, a file or the screen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "as_vector",
    "score_2afc",
    "score_from_decision",
    "natural_score",
    "certified_mask",
    "certified_score",
    "certified_scores",
    "certified_curve",
    "group_scores",
    "weighted_mean",
    "decision",
    "worse_of",
]


def as_vector(values, name: str = "values") -> torch.Tensor:
    """A 1-D float64 CPU tensor from a tensor, array or sequence; refuses NaN/Inf."""
    if isinstance(values, torch.Tensor):
        t = values.detach().to("cpu", torch.float64).reshape(-1)
    else:  # Python floats must not pass through torch's float32 default dtype
        t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return t


def _same_length(**vectors: torch.Tensor) -> int:
    lengths = {k: v.numel() for k, v in vectors.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k} {n}" for k, n in lengths.items())
        raise ValueError(f"length mismatch: {listed}")
    return next(iter(lengths.values()))


def score_2afc(d0, d1, y) -> torch.Tensor:
    """Per-triplet 2AFC score ``1[d0<d1]·(1-y) + 1[d1<d0]·y + ½·1[d0=d1]`` (float64, shape (N,))."""
    return score_from_decision(decision(d0, d1), y)


def score_from_decision(closer, y) -> torch.Tensor:
    """The 2AFC score of answers ``closer`` (0: x0, 1: x1, -1: tie, as from :func:`decision` or
    a certificate, whose ties allow for float32 noise): ``1[x0]·(1-y) + 1[x1]·y + ½·1[tie]``."""
    closer, y = as_vector(closer, "closer"), as_vector(y, "y")
    _same_length(closer=closer, y=y)
    if ((y < 0) | (y > 1)).any():
        raise ValueError("y: human preferences must be fractions in [0, 1]")
    x0_closer = (closer == 0).to(torch.float64)
    x1_closer = (closer == 1).to(torch.float64)
    tie = (closer == -1).to(torch.float64)
    return x0_closer * (1.0 - y) + x1_closer * y + 0.5 * tie


def decision(d0, d1) -> torch.Tensor:
    """The metric's answer per triplet: 0 (x0 closer), 1 (x1 closer) or -1 (tie), as int64."""
    d0, d1 = as_vector(d0, "d0"), as_vector(d1, "d1")
    _same_length(d0=d0, d1=d1)
    return torch.where(d0 < d1, 0, torch.where(d1 < d0, 1, -1)).long()


def natural_score(scores) -> float:
    """Mean of per-triplet scores (NaN for an empty set)."""
    s = as_vector(scores, "scores")
    return float(s.mean()) if s.numel() else math.nan


def certified_mask(radius, eps: float) -> torch.Tensor:
    """``radius > eps`` (strict), as a bool tensor."""
    if not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps}")
    return as_vector(radius, "radius") > eps


def certified_score(scores, radius, eps: float) -> float:
    """Mean of ``score·1[radius > eps]``: the score that no perturbation of norm ≤ eps can lower."""
    s, r = as_vector(scores, "scores"), as_vector(radius, "radius")
    _same_length(scores=s, radius=r)
    if not s.numel():
        return math.nan
    return float((s * certified_mask(r, eps).to(torch.float64)).mean())


def certified_scores(scores, radius, eps_list: Sequence[float]) -> list[dict]:
    """``[{"eps": ε, "score": certified_score(scores, radius, ε)}, ...]`` in the given order."""
    return [{"eps": float(e), "score": certified_score(scores, radius, float(e))} for e in eps_list]


def certified_curve(scores, radius, eps_grid) -> torch.Tensor:
    """Certified score at every ε of ``eps_grid`` (float64, same length), for plotting."""
    s, r = as_vector(scores, "scores"), as_vector(radius, "radius")
    _same_length(scores=s, radius=r)
    grid = as_vector(eps_grid, "eps_grid")
    if not s.numel():
        return torch.full_like(grid, math.nan)
    return (s[None, :] * (r[None, :] > grid[:, None]).to(torch.float64)).mean(dim=1)


def group_scores(scores, groups: Sequence[str], radius=None, eps_list: Sequence[float] = ()) -> dict:
    """Per-group ``{"n", "natural_2afc", "certified"}`` in first-seen group order.

    ``radius=None`` (a metric without certificates) gives ``"certified": []``.
    """
    s = as_vector(scores, "scores")
    if len(groups) != s.numel():
        raise ValueError(f"length mismatch: scores {s.numel()}, groups {len(groups)}")
    r = None if radius is None else as_vector(radius, "radius")
    out: dict[str, dict] = {}
    for name in dict.fromkeys(groups):
        idx = torch.tensor([i for i, g in enumerate(groups) if g == name], dtype=torch.long)
        entry = {"n": int(idx.numel()), "natural_2afc": natural_score(s[idx])}
        entry["certified"] = [] if r is None else certified_scores(s[idx], r[idx], eps_list)
        out[name] = entry
    return out


def weighted_mean(values: Sequence[float], counts: Sequence[int]) -> float:
    """Count-weighted mean, e.g. NIGHT overall = size-weighted mean of its two test groups."""
    v, c = as_vector(values, "values"), as_vector(counts, "counts")
    _same_length(values=v, counts=c)
    if (c < 0).any() or float(c.sum()) == 0:
        raise ValueError("counts must be non-negative and not all zero")
    return float((v * c).sum() / c.sum())


def worse_of(clean_scores, attacked_scores) -> torch.Tensor:
    """Per-triplet minimum of the clean and the attacked score.

    The threat model contains δ = 0, so an attacker can always leave a reference unchanged; an
    attack run that happens to end on a better answer (e.g. PGD's random start turning a wrong
    answer right) therefore never raises a triplet's adversarial score above its clean one.
    """
    a, b = as_vector(clean_scores, "clean_scores"), as_vector(attacked_scores, "attacked_scores")
    _same_length(clean=a, attacked=b)
    return torch.minimum(a, b)
