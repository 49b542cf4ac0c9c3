"""Building blocks of the stochastic Hessian-diagonal estimators (paper eqs. 60-61).

Both estimate diag(H) = E[eps * (H eps)] for probes eps with E[eps eps^T] = I (eq. 60):

* Hutchinson: Rademacher eps (entries +-1), exact Hessian-vector products by double backward.
  For Rademacher probes eps_i^2 = 1, so the error of element i comes only from the off-diagonal
  entries of row i of H.
* Finite differences, Algorithm 1 / eq. (61): Gaussian eps, H eps replaced by the central
  difference of full-set gradients (grad L(theta + r eps) - grad L(theta - r eps)) / (2 r).

Finite-difference radius (``finite_difference_radii``). The paper chooses r "per weight matrix
according to their Frobenius norm" (Appendix C) without the rule. We use, per parameter tensor t,

    r_t = c * ||theta_t||_F / sqrt(numel(theta_t)) = c * rms(theta_t),   c = FD_SCALE = 0.1,

falling back to c * rms(all parameters) for an all-zero tensor (e.g. zero-initialized biases).
With a per-element radius the estimate of element i is eps_i (g+ - g-)_i / (2 r_i), unbiased to
second order since E[eps_i sum_j H_ij r_j eps_j] = H_ii r_i.
Why not small: ReLU networks are only piecewise smooth; the gradient jumps where a unit switches,
and a central difference over a step that straddles a kink divides a jump by 2r. Those rare, huge
terms dominate for small r. Measured (BENCHMARKS.md, CE loss, relative L2 error against exact,
MLP 784-512-512-512-10 on 2048 Fashion-MNIST samples, 1000 probes): c = 3e-3: 137%, 1e-2: 95%,
3e-2: 79%, 0.1: 73%, 0.3: 73% (Hutchinson with 1000 probes: 63%). c = 0.1 is the smallest scale on
that plateau: larger radii do not help and average the curvature over a wider region.
``bench/hessian_diag.py --finite-diff-scan mlp:100`` repeats the scan.

All probes are drawn on the CPU from ``keyed_generator(seed, estimator, probe index)`` in the order of
``named_parameters``, so probe p is the same on every device, run and resume.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from nfm_cli.choices import FD_SCALE
from nfm_cli.curvature.losses import sum_loss
from nfm_cli.runtime.rng import keyed_generator


def rademacher_probe(params: dict[str, torch.Tensor], seed: int, index: int) -> dict[str, torch.Tensor]:
    """Probe ``index``: independent +-1 entries, one tensor per parameter, on the parameters' devices."""
    gen = keyed_generator(seed, "hutchinson", index)
    out = {}
    for name, p in params.items():
        bits = torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int64)
        out[name] = (bits * 2 - 1).to(dtype=p.dtype, device=p.device)
    return out


def gaussian_probe(params: dict[str, torch.Tensor], seed: int, index: int) -> dict[str, torch.Tensor]:
    """Probe ``index``: independent N(0, 1) entries (Algorithm 1), one tensor per parameter."""
    gen = keyed_generator(seed, "finite-diff", index)
    return {name: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype=p.dtype, device=p.device)
            for name, p in params.items()}


def finite_difference_radii(params: dict[str, torch.Tensor], scale: float = FD_SCALE) -> dict[str, float]:
    """r_t = scale * rms(theta_t) per tensor (fallback: scale * rms of all parameters; see module doc)."""
    total_sq = sum(float(p.detach().double().pow(2).sum()) for p in params.values())
    total_n = sum(p.numel() for p in params.values())
    fallback = scale * math.sqrt(total_sq / max(1, total_n))
    if fallback == 0.0:
        fallback = scale
    radii = {}
    for name, p in params.items():
        rms = math.sqrt(float(p.detach().double().pow(2).sum()) / max(1, p.numel()))
        radii[name] = scale * rms if rms > 0 else fallback
    return radii


def model_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: detached parameter} in ``named_parameters`` order."""
    return {name: p.detach() for name, p in model.named_parameters()}


def _forward(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    buffers = dict(model.named_buffers())
    return functional_call(model, {**buffers, **params}, (x,))


def gradient_sum(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 loss: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradient of the *summed* loss over (x, y) at ``params``, float64; and the logits (detached)."""
    leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    with torch.enable_grad():
        logits = _forward(model, leaves, x)
        grads = torch.autograd.grad(sum_loss(logits, y, loss), list(leaves.values()), allow_unused=True)
    return ({name: (g.detach().double() if g is not None else torch.zeros_like(leaves[name], dtype=torch.float64))
             for name, g in zip(leaves, grads, strict=True)}, logits.detach())


def hessian_vector_sum(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                       loss: str, vector: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """H v for the Hessian H of the *summed* loss over (x, y), by double backward, float64; and the logits."""
    leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    with torch.enable_grad():
        logits = _forward(model, leaves, x)
        grads = torch.autograd.grad(sum_loss(logits, y, loss), list(leaves.values()), create_graph=True,
                                    allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        names = list(leaves)
        hv = torch.autograd.grad([grads[i] for i in used], [leaves[n] for n in names],
                                 grad_outputs=[vector[names[i]] for i in used], allow_unused=True) if used else []
    out = {name: torch.zeros_like(leaves[name], dtype=torch.float64) for name in names}
    for name, value in zip(names, hv, strict=True):
        if value is not None:
            out[name] = value.detach().double()
    return out, logits.detach()
