"""Rival sharpness measures from the literature, on the checkpoint's training set (``nfm measure --rivals``).

Every measure perturbs all parameters w of the model (eval mode) and looks at the training set S
(the labels trained on), accuracy acc(w) and mean cross-entropy L(w):

- ``pacbayes_flatness`` (Jiang et al. 2020, "Fantastic Generalization Measures", eq. 53 / App. C):
  1 / sigma^2 for the largest sigma with |E_u acc(w + u) - acc(w)| <= 0.1, u ~ N(0, sigma^2 I).
- ``pacbayes_mag_flatness`` (eq. 61): the same with magnitude-aware noise of *variance*
  sigma^2 w_i^2 + eps^2 (std sqrt(sigma^2 w_i^2 + eps^2)), eps = 1e-3. The published
  reimplementations pass sigma^2 (a variance) where ``torch.normal`` takes a standard deviation;
  here the standard deviation is sigma (resp. the square root above), as in the paper.
- ``sharpness_worst`` (eq. 50, "sharpness.flatness"): 1 / alpha^2 for the largest alpha with
  max_{|u_i| <= alpha} |acc(w + u) - acc(w)| <= 0.1; ``sharpness_mag_worst`` (eq. 58) with the box
  |u_i| <= alpha |w_i| + eps. The inner max is projected (sign) gradient ascent on L from a seeded
  random point of the box, keeping the iterate of lowest accuracy.
- ``adaptive_sharpness`` (Kwon et al. 2021; Andriushchenko et al. 2023):
  max_{||u / |w| ||_2 <= rho} L(w + u) - L(w) (u / |w| elementwise; zero weights stay put), by
  normalized gradient ascent in v = u / |w| projected on the rho-ball, from a seeded random point
  of the rho/2 sphere, step 2 rho halved at each quarter of the steps, keeping the best iterate.

The largest sigma / alpha is found by bisection in log space (geometric midpoints) on
[hi / 2^20, hi], hi = 2 doubled until the deviation exceeds the target; it stops early once the
deviation is within ``tolerance`` of the target. The Monte-Carlo directions z are drawn once per
measure (common random numbers: sample k uses the same z at every sigma), keyed by (seed, measure, k),
so the search sees one fixed curve and the result is reproducible.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nfm_cli.errors import NfmError
from nfm_cli.runtime.progress import ProgressFn, report
from nfm_cli.runtime.rng import keyed_generator

RIVALS = ("pacbayes_flatness", "pacbayes_mag_flatness", "sharpness_worst", "sharpness_mag_worst",
          "adaptive_sharpness")
EVAL_BATCH = 1024
Params = dict[str, torch.Tensor]


@dataclass
class RivalOptions:
    """Defaults: Jiang et al.'s (deviation 0.1, 10 Monte-Carlo samples, depth 15, tolerance 1e-2,
    eps 1e-3); bisection down to a 1% bracket; 10 box-ascent steps; rho 0.5 and 20 steps as in
    Andriushchenko et al.'s adaptive L2 runs on CNNs."""

    seed: int = 0
    target_deviation: float = 0.1
    mc_samples: int = 10
    search_depth: int = 15
    tolerance: float = 1e-2
    magnitude_eps: float = 1e-3
    resolution: float = 1e-2
    box_steps: int = 10
    ascent_steps: int = 20
    rho: float = 0.5

    def validate(self) -> None:
        if not 0 < self.target_deviation < 1:
            raise NfmError(f"the target accuracy deviation must be in (0, 1), not {self.target_deviation}")
        for name in ("mc_samples", "search_depth", "box_steps", "ascent_steps"):
            if getattr(self, name) < 1:
                raise NfmError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("tolerance", "magnitude_eps", "resolution"):
            if not getattr(self, name) >= 0:
                raise NfmError(f"{name} must be non-negative, not {getattr(self, name)}")
        if not (self.rho > 0 and math.isfinite(self.rho)):
            raise NfmError(f"rho must be a positive number, not {self.rho}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Evaluator:
    """Accuracy and mean cross-entropy of ``model`` on (x, y) at weights w + delta (functional calls)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model, self.x, self.y = model.eval(), x, y
        self.params: Params = {k: p.detach() for k, p in model.named_parameters()}
        self.buffers = dict(model.named_buffers())

    def _logits(self, delta: Params | None, start: int) -> torch.Tensor:
        weights = self.params if delta is None else {k: self.params[k] + delta[k] for k in self.params}
        return torch.func.functional_call(self.model, {**weights, **self.buffers},
                                          (self.x[start:start + EVAL_BATCH],))

    @torch.no_grad()
    def accuracy(self, delta: Params | None = None) -> float:
        correct = sum(int((self._logits(delta, s).argmax(1) == self.y[s:s + EVAL_BATCH]).sum())
                      for s in range(0, len(self.y), EVAL_BATCH))
        return correct / len(self.y)

    def loss(self, delta: Params | None = None) -> torch.Tensor:
        """Mean cross-entropy, differentiable in ``delta``."""
        return self.loss_and_accuracy(delta)[0]

    def loss_and_accuracy(self, delta: Params | None = None) -> tuple[torch.Tensor, float]:
        """Mean cross-entropy (differentiable in ``delta``) and accuracy, from one forward pass."""
        total, correct = 0.0, 0
        for s in range(0, len(self.y), EVAL_BATCH):
            logits, target = self._logits(delta, s), self.y[s:s + EVAL_BATCH]
            total = total + F.cross_entropy(logits, target, reduction="sum")
            correct += int((logits.detach().argmax(1) == target).sum())
        return total / len(self.y), correct / len(self.y)


def normal_directions(params: Params, samples: int, seed: int, key: str) -> list[Params]:
    """``samples`` dicts of standard normal tensors shaped like ``params``, keyed by (seed, key, k)."""
    out = []
    for k in range(samples):
        gen = keyed_generator(seed, "rivals", key, k)
        out.append({n: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for n, p in params.items()})
    return out


def noise_std(params: Params, sigma: float, magnitude_eps: float | None) -> Params:
    """Per-element standard deviation: sigma, or sqrt(sigma^2 w^2 + eps^2) (magnitude-aware, variance form)."""
    if magnitude_eps is None:
        return {n: torch.full_like(p, sigma) for n, p in params.items()}
    return {n: torch.sqrt(sigma ** 2 * p ** 2 + magnitude_eps ** 2) for n, p in params.items()}


def largest_radius(deviation: Callable[[float], float], target: float, *, depth: int = 15, tolerance: float = 1e-2,
                   resolution: float = 1e-2, hi: float = 2.0, span: float = 2.0 ** 20,
                   max_doublings: int = 30) -> float:
    """The largest r with deviation(r) <= target, for a deviation that grows with r: geometric
    bisection on [hi / span, hi] after doubling hi until deviation(hi) > target. Stops after ``depth``
    steps, once a midpoint's deviation is within ``tolerance`` of the target, or once hi / lo <= 1 +
    ``resolution``. Returns 0.0 when even r = hi / span deviates by more than the target."""
    for _ in range(max_doublings):
        if deviation(hi) > target:
            break
        hi *= 2.0
    else:
        return hi  # never exceeded: as flat as we can tell
    lo = hi / span
    if deviation(lo) > target:
        return 0.0
    for _ in range(depth):
        if hi / lo <= 1.0 + resolution:
            break
        mid = math.sqrt(lo * hi)
        d = deviation(mid)
        if abs(d - target) < tolerance:
            return mid
        if d > target:
            hi = mid
        else:
            lo = mid
    return math.sqrt(lo * hi)


def pacbayes_sigma(ev: Evaluator, opts: RivalOptions, magnitude: bool, progress: ProgressFn = None) -> float:
    """Jiang et al.'s sigma (magnitude-aware when ``magnitude``), by bisection over Monte-Carlo accuracy."""
    base = ev.accuracy()
    zs = normal_directions(ev.params, opts.mc_samples, opts.seed, "pacbayes-mag" if magnitude else "pacbayes")
    eps = opts.magnitude_eps if magnitude else None
    calls = [0]

    def deviation(sigma: float) -> float:
        std = noise_std(ev.params, sigma, eps)
        accs = [ev.accuracy({n: std[n] * z[n] for n in z}) for z in zs]
        calls[0] += 1
        report(progress, "pacbayes-mag" if magnitude else "pacbayes", calls[0], opts.search_depth + 1, sigma=sigma)
        return abs(sum(accs) / len(accs) - base)

    return largest_radius(deviation, opts.target_deviation, depth=opts.search_depth, tolerance=opts.tolerance,
                          resolution=opts.resolution)


def box_ascent(objective: Callable[[Params], tuple[torch.Tensor, float]], radius: Params, steps: int,
               generator: torch.Generator) -> tuple[Params, float]:
    """Projected sign-gradient ascent over the box |u| <= radius from a random point of it.

    ``objective(delta)`` gives the differentiable loss to ascend and a score of ``delta`` (e.g. the
    accuracy change, from the same forward pass). Step 2.5 x radius / steps. Returns the iterate with
    the largest score, and that score."""
    delta = {n: ((torch.rand(r.shape, generator=generator, dtype=torch.float64).to(r) * 2 - 1) * r)
             for n, r in radius.items()}
    best, best_score = delta, -math.inf
    step = 2.5 / steps
    for it in range(steps + 1):
        d = {n: t.clone().requires_grad_(it < steps) for n, t in delta.items()}
        value, score = objective(d)
        if score > best_score:
            best, best_score = delta, score
        if it == steps:
            break
        grads = torch.autograd.grad(value, list(d.values()))
        with torch.no_grad():
            delta = {n: torch.maximum(torch.minimum(d[n] + step * radius[n] * g.sign(), radius[n]), -radius[n])
                     for n, g in zip(d, grads, strict=True)}
    return best, best_score


def sharpness_alpha(ev: Evaluator, opts: RivalOptions, magnitude: bool, progress: ProgressFn = None) -> float:
    """Jiang et al.'s worst-case alpha: largest box (magnitude-aware when ``magnitude``) whose worst
    accuracy deviation found by projected gradient ascent stays within the target."""
    base = ev.accuracy()
    name = "sharpness-mag" if magnitude else "sharpness"
    calls = [0]

    def deviation(alpha: float) -> float:
        if magnitude:
            radius = {n: alpha * p.abs() + opts.magnitude_eps for n, p in ev.params.items()}
        else:
            radius = {n: torch.full_like(p, alpha) for n, p in ev.params.items()}
        calls[0] += 1
        gen = keyed_generator(opts.seed, "rivals", name, calls[0])

        def objective(delta):
            loss, acc = ev.loss_and_accuracy(delta)
            return loss, abs(acc - base)

        _, dev = box_ascent(objective, radius, opts.box_steps, gen)
        report(progress, name, calls[0], opts.search_depth + 1, alpha=alpha)
        return dev

    return largest_radius(deviation, opts.target_deviation, depth=opts.search_depth, tolerance=opts.tolerance,
                          resolution=opts.resolution)


def adaptive_sharpness(loss: Callable[[Params], torch.Tensor], params: Params, rho: float, steps: int,
                       generator: torch.Generator) -> float:
    """max over ||u / |w| ||_2 <= rho of loss(u) - loss(0), by normalized gradient ascent in v = u / |w|."""
    scale = {n: p.abs() for n, p in params.items()}
    base = float(loss({n: torch.zeros_like(p) for n, p in params.items()}))
    v = {n: torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p) for n, p in params.items()}
    v = _project_l2(v, rho / 2, exact=True)
    best = -math.inf
    for it in range(steps):
        step = 2.0 * rho / 2 ** (4 * it // steps)  # 2 rho, halved at each quarter of the steps
        vv = {n: t.clone().requires_grad_(True) for n, t in v.items()}
        value = loss({n: scale[n] * vv[n] for n in vv})
        best = max(best, float(value.detach()))
        grads = torch.autograd.grad(value, list(vv.values()))
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        if norm == 0:
            break
        with torch.no_grad():
            v = _project_l2({n: vv[n] + step * g / norm for n, g in zip(vv, grads, strict=True)}, rho)
    with torch.no_grad():
        best = max(best, float(loss({n: scale[n] * v[n] for n in v})))
    return best - base


def _project_l2(v: Params, radius: float, exact: bool = False) -> Params:
    """Onto the ball of ``radius`` (``exact``: onto its sphere)."""
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in v.values()))
    if norm == 0 or (norm <= radius and not exact):
        return v
    return {n: t * (radius / norm) for n, t in v.items()}


def rival_measures(model: nn.Module, x: torch.Tensor, y: torch.Tensor, options: RivalOptions | None = None,
                   progress: ProgressFn = None) -> dict[str, Any]:
    """All five rivals of the module docstring on (x, y), plus their raw radii under ``radii``."""
    opts = options or RivalOptions()
    opts.validate()
    ev = Evaluator(model, x, y)
    sigma = pacbayes_sigma(ev, opts, False, progress)
    mag_sigma = pacbayes_sigma(ev, opts, True, progress)
    alpha = sharpness_alpha(ev, opts, False, progress)
    mag_alpha = sharpness_alpha(ev, opts, True, progress)
    adaptive = adaptive_sharpness(ev.loss, ev.params, opts.rho, opts.ascent_steps,
                                  keyed_generator(opts.seed, "rivals", "adaptive"))
    report(progress, "rivals", 1, 1)
    return {"pacbayes_flatness": _inverse_square(sigma), "pacbayes_mag_flatness": _inverse_square(mag_sigma),
            "sharpness_worst": _inverse_square(alpha), "sharpness_mag_worst": _inverse_square(mag_alpha),
            "adaptive_sharpness": adaptive,
            "radii": {"pacbayes_sigma": sigma, "pacbayes_mag_sigma": mag_sigma, "sharpness_alpha": alpha,
                      "sharpness_mag_alpha": mag_alpha, "train_acc": ev.accuracy(), "samples": len(y)},
            "options": opts.to_json()}


def _inverse_square(radius: float) -> float | None:
    """1 / r^2; None when r = 0 (even the smallest perturbation searched, or eps alone, moves the
    accuracy by more than the target: the measure is off the scale)."""
    return 1.0 / radius ** 2 if radius > 0 else None
