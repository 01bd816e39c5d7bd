"""Natural, attacked and certified 2AFC scores of a metric under one attack (``lipsim attack``).

Per triplet: the clean answer (with its certified radius when the metric has certificates),
the attacked reference from :func:`lipsim.evaluate.attacks.perturb_references`, and the answer
on it. Reported:

* ``natural_2afc``: the 2AFC score on clean references;
* ``attacked_2afc``: the 2AFC score on attacked references, taking per triplet the worse of the
  clean and the attacked score (δ = 0 is in the threat model, see :func:`scoring.worse_of`);
  so ``attacked ≤ natural`` always;
* ``certified_2afc``: the certified score at the attack's ℓ2 budget (ε for ℓ2; √(3·H·W)·ε for
  ℓ∞, the ℓ2 ball holding the ℓ∞ ball); ``None`` for metrics without certificates. Without a
  bug, ``certified ≤ attacked``;
* ``violations``: triplets whose answer the attack changed although their certified radius
  exceeds the ℓ2 budget; also ``violations_measured_norm``: answer changed although the radius
  exceeds the *measured* ℓ2 norm of the perturbation (the sharper test of the same promise).
  Either being non-zero means a certificate is wrong: ``violation_details`` lists them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from . import scoring
from .attacks import AttackSettings, linf_to_l2, perturb_references
from .metrics import Metric
from .twoafc import iterate_batches, measure

__all__ = ["run_attack"]


def _strings(values, n):
    return [""] * n if values is None else [str(v) for v in values]


def run_attack(
    metric: Metric,
    dataset,
    settings: AttackSettings,
    batch_size: int = 16,
    progress: Callable[[Iterable, int], Iterable] | None = None,
) -> dict:
    """Runs the attack over ``dataset``; returns the summary dict of ``lipsim attack --json``.

    Seeds torch's global generator with ``settings.seed`` first (PGD's random start draws from it).
    """
    torch.manual_seed(settings.seed)
    loader = iterate_batches(dataset, batch_size)
    batches = progress(loader, len(loader)) if progress else loader
    keys = ("y", "d0", "d1", "closer", "radius", "d0_adv", "d1_adv", "closer_adv", "l2", "linf")
    acc: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    ids: list[str] = []
    n_projected = 0
    logit_gap = 0.0
    image_shape = None
    for batch in batches:
        ref, x0, x1 = (batch[k].to(metric.device) for k in ("ref", "x0", "x1"))
        y = batch["y"].double().reshape(-1)
        image_shape = tuple(ref.shape[1:])
        d0, d1, closer, radius = measure(metric, ref, x0, x1)
        result = perturb_references(metric, ref, x0, x1, y, settings)
        adv = result.adv
        n_projected += result.n_projected
        d0a, d1a, closer_a, _ = measure(metric, adv, x0, x1)
        # the logits the attack saw on its output must be the distances recomputed from scratch
        logit_gap = max(
            logit_gap,
            float((result.logits[:, 1].double().cpu() - d0a).abs().max()),
            float((result.logits[:, 0].double().cpu() - d1a).abs().max()),
        )
        delta = (adv - ref).double().flatten(1).cpu()
        ids += _strings(batch.get("id"), ref.shape[0])
        for k, v in (
            ("y", y),
            ("d0", d0),
            ("d1", d1),
            ("closer", closer),
            ("d0_adv", d0a),
            ("d1_adv", d1a),
            ("closer_adv", closer_a),
            ("l2", torch.linalg.vector_norm(delta, dim=1)),
            ("linf", delta.abs().amax(dim=1)),
        ):
            acc[k].append(v.cpu())
        if radius is not None:
            acc["radius"].append(radius)
    if not ids:
        raise ValueError("the dataset holds no triplets")
    t = {k: torch.cat(v) for k, v in acc.items() if v}
    clean = scoring.score_from_decision(t["closer"], t["y"])
    raw_attacked = scoring.score_from_decision(t["closer_adv"], t["y"])
    attacked = scoring.worse_of(clean, raw_attacked)
    flipped = t["closer"] != t["closer_adv"]
    budget = settings.eps if settings.norm == "l2" else linf_to_l2(settings.eps, image_shape)
    out = {
        "n": len(ids),
        "metric": metric.name,
        "attack": settings.attack,
        "norm": settings.norm,
        "eps": settings.eps,
        "steps": settings.steps,
        "step_size": settings.step_size if settings.attack in ("pgd", "mifgsm") else None,
        "reach": settings.reach,
        "reaches_budget": settings.reaches_budget,
        "l2_budget": budget,
        "natural_2afc": scoring.natural_score(clean),
        "attacked_2afc": scoring.natural_score(attacked),
        "attacked_2afc_raw": scoring.natural_score(raw_attacked),
        "n_flipped": int(flipped.sum()),
        "n_projected": n_projected,
        "max_delta_l2": float(t["l2"].max()),
        "max_delta_linf": float(t["linf"].max()),
        "logits_recompute_max_abs_diff": logit_gap,
        "certified_2afc": None,
        "violations": None,
        "violations_measured_norm": None,
    }
    if "radius" in t:
        radius = t["radius"]
        out["certified_2afc"] = scoring.certified_score(clean, radius, budget)
        bad = flipped & (radius > budget)
        bad_measured = flipped & (radius > t["l2"])
        out["violations"] = int(bad.sum())
        out["violations_measured_norm"] = int(bad_measured.sum())
        out["violation_details"] = [
            {
                "id": ids[i],
                "radius": float(radius[i]),
                "delta_l2": float(t["l2"][i]),
                "d0": float(t["d0"][i]),
                "d1": float(t["d1"][i]),
                "d0_adv": float(t["d0_adv"][i]),
                "d1_adv": float(t["d1_adv"][i]),
            }
            for i in (bad | bad_measured).nonzero().flatten().tolist()
        ]
        out["certified_fraction"] = float((radius > budget).double().mean())
    if not math.isfinite(out["max_delta_l2"]):
        raise AssertionError("non-finite perturbation")  # pragma: no cover
    return out
