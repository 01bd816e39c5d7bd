"""Evaluation: 2AFC scoring, certified scores, attacks, the distance-attack demo, reports.

* :mod:`.scoring`: the 2AFC score and certified score as pure functions;
* :mod:`.metrics`: LipSim and other metrics behind one interface (:func:`get_metric`);
* :mod:`.twoafc`: running a metric over NIGHT / BAPPS (:func:`open_2afc`, :func:`run_2afc`,
  :func:`summarize`);
* :mod:`.attacks` / :mod:`.attack_eval`: reference-only attacks through torchattacks
  (:func:`run_attack`);
* :mod:`.distance_attack`: maximising d(x, x+δ) under an ℓ2 budget (:func:`attack_distances`);
* :mod:`.report`: tables, ``summary.md`` and plots.
"""

from __future__ import annotations

import importlib

# name -> submodule; loaded on first access so that `lipsim eval` does not import torchattacks
_LAZY = {
    "run_attack": "attack_eval",
    "ATTACKS": "attacks",
    "NORMS": "attacks",
    "AttackSettings": "attacks",
    "linf_to_l2": "attacks",
    "perturb_references": "attacks",
    "attack_distances": "distance_attack",
    "distance_bound": "distance_attack",
    "maximise_distance": "distance_attack",
    "Metric": "metrics",
    "MetricUnavailable": "metrics",
    "get_metric": "metrics",
    "ssim": "metrics",
    "certified_score": "scoring",
    "certified_scores": "scoring",
    "natural_score": "scoring",
    "score_2afc": "scoring",
    "DEFAULT_EPS": "twoafc",
    "TripletResults": "twoafc",
    "open_2afc": "twoafc",
    "run_2afc": "twoafc",
    "summarize": "twoafc",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = [
    "ATTACKS",
    "DEFAULT_EPS",
    "NORMS",
    "AttackSettings",
    "Metric",
    "MetricUnavailable",
    "TripletResults",
    "attack_distances",
    "certified_score",
    "certified_scores",
    "distance_bound",
    "get_metric",
    "linf_to_l2",
    "maximise_distance",
    "natural_score",
    "open_2afc",
    "perturb_references",
    "run_2afc",
    "run_attack",
    "score_2afc",
    "ssim",
    "summarize",
]
