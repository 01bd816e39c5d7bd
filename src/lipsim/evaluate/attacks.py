"""Empirical attacks on 2AFC decisions through torchattacks (docs/method.md §7.2).

Threat model: only the reference is perturbed, inside the ℓ2 or ℓ∞ ball of radius ε around it
(in [0, 1] pixel units) and clipped to [0, 1]; x0 and x1 stay clean.

The attacked "classifier" (:class:`TwoAFCLogits`) maps a reference to the logits
``[d(ref, x1), d(ref, x0)]``: index 1 wins iff ``d0 > d1`` iff x1 is closer, so with the label
``round(y)`` (1 = x1 closer, torch rounding: 0.5 -> 0) "argmax == label" is "the metric agrees
with the majority", and cross-entropy on these logits is what the gradient attacks maximise.

The batch pitfall. The logits module holds x0/x1 (or their embeddings) for *one* batch, but
torchattacks' APGD and Square call the model on *subsets* of the batch (only the initially
correct samples, then only those not yet fooled); a module that pairs row i of its input with
row i of its stored x0/x1 would then silently compare references with the wrong candidates.
Here that cannot happen:

* :class:`TwoAFCLogits` refuses any call whose batch size differs from the stored one
  (:class:`SubsetCallError`), so a misaligned call fails loudly instead of returning numbers;
* APGD runs as :class:`APGDFullBatch`, whose ``perturb`` gives the whole batch to torchattacks'
  own ``attack_single_run`` (which only ever calls the model on the full batch it received) and
  keeps a result only for samples that were correct before the attack and fooled by it (the
  library's selection, without subsetting);
* Square subsets inside its inner loop, so it runs one triplet at a time (:data:`PER_SAMPLE`);
  a subset of a batch of one is that sample or nothing;
* PGD (``PGD``/``PGDL2``) and MI-FGSM always use the full batch; torchattacks has no ℓ2
  MI-FGSM, so :class:`MIFGSML2` adds it (advertorch's L2 momentum iterative attack).

Every returned reference is then checked in float64: ``‖δ‖ ≤ ε`` in the attack's norm and
values in [0, 1]; one that overshoots (float rounding in the library's projection) is projected
back and counted (``n_projected``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from .metrics import Metric

__all__ = [
    "ATTACKS",
    "NORMS",
    "PER_SAMPLE",
    "SubsetCallError",
    "TwoAFCLogits",
    "APGDFullBatch",
    "MIFGSML2",
    "AttackSettings",
    "default_steps",
    "build_attack",
    "labels_from_preferences",
    "project_to_ball",
    "PerturbResult",
    "perturb_references",
    "linf_to_l2",
]

ATTACKS = ("apgd-ce", "pgd", "mifgsm", "square")
NORMS = ("l2", "linf")
#: attacks that call the model on subsets of the batch and therefore run one triplet at a time
PER_SAMPLE = frozenset({"square"})


def default_steps(attack: str, norm: str) -> int:
    """Iterations (queries for Square) used by the reference harness (docs/method.md §7.2)."""
    if attack == "apgd-ce":
        return 100
    if attack == "pgd":
        return 1000 if norm == "l2" else 50
    if attack == "mifgsm":
        return 100
    if attack == "square":
        return 5000
    raise ValueError(f"unknown attack {attack!r}")


def linf_to_l2(eps_linf: float, shape=(3, 224, 224)) -> float:
    """ℓ2 radius of the smallest ℓ2 ball holding the ℓ∞ ball: ``√(C·H·W)·ε`` (√(3·224·224) ≈ 388)."""
    return math.sqrt(math.prod(shape)) * eps_linf


def labels_from_preferences(y: torch.Tensor) -> torch.Tensor:
    """``round(y)`` as int64 (torch rounding, half to even: 0.5 -> 0): 1 = x1 preferred."""
    return torch.round(y.double()).long()


class SubsetCallError(RuntimeError):
    """The logits module was called with a batch that is not the one it was set up for."""


class TwoAFCLogits(nn.Module):
    """``ref -> [d(ref, x1), d(ref, x0)]`` for fixed x0, x1 (argmax 1 ⇔ x1 closer).

    Embedding metrics embed x0/x1 once (:meth:`set_pair`); others call ``metric.distance``.
    A call with a batch size other than the stored one raises :class:`SubsetCallError`.
    """

    def __init__(self, metric: Metric, x0: torch.Tensor, x1: torch.Tensor):
        super().__init__()
        self.metric = metric
        # torchattacks reads the device from the first parameter; this empty one carries it
        self._device_anchor = nn.Parameter(torch.zeros(0, device=metric.device), requires_grad=False)
        self.set_pair(x0, x1)

    @torch.no_grad()
    def set_pair(self, x0: torch.Tensor, x1: torch.Tensor) -> None:
        if x0.shape != x1.shape:
            raise ValueError("x0 and x1 must have the same shape")
        self.n = x0.shape[0]
        device = self.metric.device
        if self.metric.has_embedding:
            e = self.metric.embed(torch.cat([x0, x1]).to(device)).detach()
            self.e0, self.e1 = e[: self.n], e[self.n :]
            self.x0 = self.x1 = None
        else:
            self.x0, self.x1 = x0.to(device), x1.to(device)
            self.e0 = self.e1 = None

    def distances(self, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ref.shape[0] != self.n:
            raise SubsetCallError(
                f"the 2AFC logits were set up for a batch of {self.n} triplets but called with "
                f"{ref.shape[0]} "
                "references (an attack evaluating a subset would pair references with the wrong candidates)"
            )
        if self.e0 is not None:
            g = self.metric.embed(ref)
            return 1.0 - (g * self.e0).sum(dim=1), 1.0 - (g * self.e1).sum(dim=1)
        return self.metric.distance(ref, self.x0), self.metric.distance(ref, self.x1)

    def forward(self, ref: torch.Tensor) -> torch.Tensor:
        d0, d1 = self.distances(ref)
        return torch.stack([d1, d0], dim=1)


class APGDFullBatch(torchattacks.APGD):
    """torchattacks' APGD whose ``perturb`` never hands the model a subset of the batch.

    torchattacks runs ``attack_single_run`` on ``x[initially correct]``; here it runs on the whole
    batch and the adversarial example is kept only for samples that were correct on the clean
    input and misclassified at some iterate (the same selection, and the same per-sample
    algorithm: APGD's step sizes and checkpoints are per sample). Restarts attack the whole
    batch again and update the samples still correct.
    """

    def perturb(self, x_in, y_in, best_loss=False, cheap=True):
        if best_loss or not cheap:
            raise ValueError("APGDFullBatch supports the default (cheap, not best-loss) mode only")
        x, y = x_in.clone(), y_in.clone()
        adv = x.clone()
        with torch.no_grad():
            acc = self.get_logits(x).max(1)[1] == y
        torch.random.manual_seed(self.seed)
        if torch.cuda.is_available():
            torch.cuda.random.manual_seed(self.seed)
        for _ in range(self.n_restarts):
            if not bool(acc.any()):
                break
            _, acc_curr, _, adv_curr = self.attack_single_run(x, y)
            fooled = acc & ~acc_curr.bool()
            adv[fooled] = adv_curr[fooled].detach()
            acc = acc & ~fooled
        return acc, adv


class MIFGSML2(torchattacks.attack.Attack):
    """Momentum iterative attack in ℓ2 (advertorch's ``L2MomentumIterativeAttack``).

    ``g ← μ·g + ∇/‖∇‖₁``; ``x ← x + α·g/‖g‖₂``; δ projected onto the ℓ2 ball of radius ε and
    ``x + δ`` clipped to [0, 1]. Starts at the clean input (no random start), like MI-FGSM.
    """

    def __init__(self, model, eps=1.0, alpha=0.01, steps=100, decay=1.0):
        super().__init__("MIFGSML2", model)
        self.eps, self.alpha, self.steps, self.decay = eps, alpha, steps, decay
        self.supported_mode = ["default"]

    def forward(self, images, labels):
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        momentum = torch.zeros_like(images)
        adv = images.clone()
        for _ in range(self.steps):
            adv.requires_grad_(True)
            cost = F.cross_entropy(self.get_logits(adv), labels)
            grad = torch.autograd.grad(cost, adv)[0]
            l1 = grad.abs().flatten(1).sum(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            momentum = self.decay * momentum + grad / l1
            l2 = torch.linalg.vector_norm(momentum.flatten(1), dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            adv = adv.detach() + self.alpha * momentum / l2
            delta = adv - images
            norm = torch.linalg.vector_norm(delta.flatten(1), dim=1).clamp_min(1e-12)
            delta = delta * torch.clamp(self.eps / norm, max=1.0).view(-1, 1, 1, 1)
            adv = torch.clamp(images + delta, 0.0, 1.0).detach()
        return adv


#: the reference harness's step for PGD and MI-FGSM (docs/method.md §7.2)
HARNESS_STEP = 0.01
#: MI-FGSM's default step is this many budgets over the number of steps, so that it can reach ε
MIFGSM_STEP_BUDGETS = 2.5


@dataclass
class AttackSettings:
    """What to run: ``attack`` in :data:`ATTACKS`, ``norm`` in :data:`NORMS`, budget ``eps``.

    ``step_size`` (PGD and MI-FGSM) defaults to the harness's 0.01 for PGD (its random start
    already spreads over the whole ball) and to ``2.5·eps/steps`` for MI-FGSM, which starts at
    the clean reference and moves exactly one step per iteration: with the harness's 0.01 and 100
    steps it could never leave a ball of radius 1, so at ε = 2 or 3 it silently attacked a
    smaller budget. :attr:`reach` is how far an attack can move; :attr:`reaches_budget` says
    whether that covers ε.
    """

    attack: str
    norm: str
    eps: float
    steps: int | None = None
    step_size: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r} (choose from {', '.join(ATTACKS)})")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r} (choose l2 or linf)")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError("--eps must be a positive number")
        if self.steps is None:
            self.steps = default_steps(self.attack, self.norm)
        if self.steps < 1:
            raise ValueError("--steps must be at least 1")
        if self.step_size is None:
            self.step_size = (
                MIFGSM_STEP_BUDGETS * self.eps / self.steps if self.attack == "mifgsm" else HARNESS_STEP
            )
        if not (self.step_size > 0 and math.isfinite(self.step_size)):
            raise ValueError("--step-size must be a positive number")

    @property
    def reach(self) -> float | None:
        """The farthest (in the attack's norm) that MI-FGSM's iterates can get from the clean
        reference: ``steps·step_size`` (each iteration moves by exactly one step in ℓ2 or at most
        one in ℓ∞); ``None`` for attacks whose start or step rule covers the whole ball."""
        return self.steps * self.step_size if self.attack == "mifgsm" else None

    @property
    def reaches_budget(self) -> bool:
        return self.reach is None or self.reach >= self.eps


def build_attack(model: nn.Module, s: AttackSettings) -> torchattacks.attack.Attack:
    """The torchattacks object for ``s`` around the logits module ``model``."""
    tnorm = "L2" if s.norm == "l2" else "Linf"
    if s.attack == "apgd-ce":
        return APGDFullBatch(
            model, norm=tnorm, eps=s.eps, steps=s.steps, n_restarts=1, seed=s.seed, loss="ce", rho=0.75
        )
    if s.attack == "pgd":
        if s.norm == "l2":
            return torchattacks.PGDL2(model, eps=s.eps, alpha=s.step_size, steps=s.steps, random_start=True)
        return torchattacks.PGD(model, eps=s.eps, alpha=s.step_size, steps=s.steps, random_start=True)
    if s.attack == "mifgsm":
        if s.norm == "l2":
            return MIFGSML2(model, eps=s.eps, alpha=s.step_size, steps=s.steps, decay=1.0)
        return torchattacks.MIFGSM(model, eps=s.eps, alpha=s.step_size, steps=s.steps, decay=1.0)
    return torchattacks.Square(
        model, norm=tnorm, eps=s.eps, n_queries=s.steps, n_restarts=1, p_init=0.8, loss="margin", seed=s.seed
    )


def _norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.double().flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else torch.linalg.vector_norm(flat, dim=1)


def project_to_ball(
    x: torch.Tensor, adv: torch.Tensor, eps: float, norm: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(adv', fixed)``: adv clipped to [0, 1] and inside ``‖adv' - x‖ ≤ eps`` (checked in float64).

    ``fixed`` marks the rows that needed it; rows already inside are returned bit-identical.
    A fixed row is projected in float64 (onto the ball of radius ``eps·(1 - 1e-9)``, then into
    [0, 1]) and rounded to ``x``'s dtype; every element whose rounding moved it farther from ``x``
    than the float64 target is then stepped one ulp towards ``x`` (``torch.nextafter``) until none
    is. Elementwise ``|adv' - x| ≤ |target - x|`` then gives the budget in both norms, however
    small ε is compared with the float32 spacing near 1.
    """
    x = x.detach()
    adv = adv.detach().to(x.dtype)
    finite = torch.isfinite(adv).flatten(1).all(dim=1)
    bad_range = (adv < 0).flatten(1).any(dim=1) | (adv > 1).flatten(1).any(dim=1) | ~finite
    bad_norm = _norms(torch.nan_to_num(adv - x), norm) > eps
    fixed = bad_range | bad_norm
    if not bool(fixed.any()):
        return adv, fixed
    out = adv.clone()
    rows = fixed.nonzero().flatten()
    xr = x[rows]
    x64 = xr.double()
    delta = torch.nan_to_num(adv[rows].double() - x64)
    target_eps = eps * (1 - 1e-9)
    if norm == "linf":
        delta = delta.clamp(-target_eps, target_eps)
    else:
        n = torch.linalg.vector_norm(delta.flatten(1), dim=1).clamp_min(1e-300)
        delta = delta * torch.clamp(target_eps / n, max=1.0).view(-1, 1, 1, 1)
    target = (x64 + delta).clamp(0.0, 1.0)
    limit = (target - x64).abs()
    candidate = target.to(x.dtype)
    for _ in range(64):
        over = (candidate.double() - x64).abs() > limit
        if not bool(over.any()):
            break
        candidate = torch.where(over, torch.nextafter(candidate, xr), candidate)
    else:  # pragma: no cover - cannot happen: every step moves an element one ulp towards x
        candidate = xr.clone()
    out[rows] = candidate
    return out, fixed


@dataclass
class PerturbResult:
    adv: torch.Tensor
    n_projected: int
    logits: torch.Tensor  # [d1, d0] of the returned references, from the logits module


def perturb_references(
    metric: Metric, ref: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, y: torch.Tensor, s: AttackSettings
) -> PerturbResult:
    """Adversarial references for one batch (see the module docstring for how batches are handled)."""
    device = metric.device
    ref, x0, x1 = ref.to(device), x0.to(device), x1.to(device)
    labels = labels_from_preferences(y).to(device)
    if s.attack in PER_SAMPLE:
        rows = []
        wrapper = TwoAFCLogits(metric, x0[:1], x1[:1])
        attack = build_attack(wrapper, s)
        for i in range(ref.shape[0]):
            wrapper.set_pair(x0[i : i + 1], x1[i : i + 1])
            rows.append(attack(ref[i : i + 1], labels[i : i + 1]).detach())
        adv = torch.cat(rows)
        wrapper.set_pair(x0, x1)
    else:
        wrapper = TwoAFCLogits(metric, x0, x1)
        adv = build_attack(wrapper, s)(ref, labels).detach()
    adv, fixed = project_to_ball(ref, adv, s.eps, s.norm)
    with torch.no_grad():
        logits = wrapper(adv).detach()
    return PerturbResult(adv=adv, n_projected=int(fixed.sum()), logits=logits)
