"""Surrogate losses on the logits: softmax cross-entropy and the paper's normalized cross-entropy.

``ce``            -ln softmax(f)[y].
``normalized-ce`` eq. (20)-(22): -ln softmax(f')[y] with f' = f / s, s = sqrt(1/K sum_i (f_i - mu)^2)
                  the population standard deviation of the K logits (mu = their mean, eq. 21).
                  The logits are divided, not centered: softmax ignores a common shift, so
                  centering would change nothing. The loss is invariant to scaling and shifting
                  the logits (Sec. 5.4).

Constant logits. When the K logits are equal up to rounding (s <= 8 * machine-eps * max_i |f_i|,
or all zero), eq. (22) is 0/0 and the loss is not even continuous there: its limit along
f + t*d, t -> 0+, is the cross-entropy of d / std(d), which depends on the direction d. No value
is right, so such a *degenerate* sample is given the uniform prediction: loss ln K, and zero
gradient and zero Hessian in the logits. ``degenerate_mask`` says which samples those are, so a
caller can report how many there were. A trained network essentially never produces them.

``logit_hessian`` gives the per-sample K x K Hessian of the loss in the logits, in closed form:

* ce:            diag(p) - p p^T, p = softmax(f); positive semi-definite.
* normalized-ce: with g = f / s, p = softmax(g), r = p - e_y, C = I - 11^T/K, w = C f / (K s),
                 a = r . f, J = (I - g w^T) / s (the Jacobian dg/df):
                 H = J^T (diag(p) - p p^T) J - (r w^T + w r^T) / s^2 + 3 a w w^T / s^3 - a C / (K s^3).
                 The second-order terms of the normalization make it indefinite in general.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nfm_cli.choices import LOSS_NAMES
from nfm_cli.errors import NfmError

# A sample's logits count as constant when their std is within this many machine epsilons of
# their largest magnitude (see the module docstring).
_DEGENERATE_EPS_FACTOR = 8.0


def check_loss_name(name: str) -> str:
    """``name`` if it is a known loss; otherwise an ``NfmError`` listing the valid names."""
    if name not in LOSS_NAMES:
        raise NfmError(f"unknown loss {name!r}; valid losses: {', '.join(LOSS_NAMES)}")
    return name


def degenerate_mask(logits: torch.Tensor) -> torch.Tensor:
    """[N] bool: samples whose K logits are constant up to rounding (eq. 22 is 0/0 there)."""
    std = logits.std(dim=-1, correction=0)
    scale = logits.abs().amax(dim=-1)
    return std <= _DEGENERATE_EPS_FACTOR * torch.finfo(logits.dtype).eps * scale


def normalized_logits(logits: torch.Tensor) -> torch.Tensor:
    """f' of eq. (22): each row of ``logits`` [N, K] divided by its population std over the K classes.

    Degenerate rows (constant logits) become zeros, with zero gradient and Hessian.
    Differentiable (also twice) everywhere, including at degenerate rows.
    """
    degenerate = degenerate_mask(logits.detach())
    variance = logits.var(dim=-1, correction=0, keepdim=True)
    # where() on the input of sqrt keeps the backward pass free of 0/0 at degenerate rows
    safe_variance = torch.where(degenerate.unsqueeze(-1), torch.ones_like(variance), variance)
    scaled = logits / safe_variance.sqrt()
    return torch.where(degenerate.unsqueeze(-1), torch.zeros_like(scaled), scaled)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, name: str) -> torch.Tensor:
    """[N] loss of each sample: ``ce`` or ``normalized-ce`` (eq. 20 with eq. 22)."""
    check_loss_name(name)
    if name == "normalized-ce":
        logits = normalized_logits(logits)
    return F.cross_entropy(logits, labels, reduction="none")


def mean_loss(logits: torch.Tensor, labels: torch.Tensor, name: str) -> torch.Tensor:
    """Mean of ``per_sample_loss`` over the samples (the training loss L_S)."""
    return per_sample_loss(logits, labels, name).mean()


def sum_loss(logits: torch.Tensor, labels: torch.Tensor, name: str) -> torch.Tensor:
    """Sum of ``per_sample_loss`` (batches add up to N times L_S)."""
    return per_sample_loss(logits, labels, name).sum()


def logit_hessian(logits: torch.Tensor, labels: torch.Tensor, name: str) -> torch.Tensor:
    """[N, K, K]: Hessian of each sample's loss with respect to its own logits, closed form.

    See the module docstring for the formulas; zero for degenerate samples of ``normalized-ce``.
    Computed in the dtype of ``logits``, without autograd.
    """
    check_loss_name(name)
    logits = logits.detach()
    if name == "ce":
        p = torch.softmax(logits, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return _normalized_ce_logit_hessian(logits, labels)


def _normalized_ce_logit_hessian(f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    n, k = f.shape
    degenerate = degenerate_mask(f)
    centered = f - f.mean(dim=-1, keepdim=True)                   # C f
    variance = (centered * centered).mean(dim=-1)
    s = torch.where(degenerate, torch.ones_like(variance), variance).sqrt()  # [N]
    g = f / s[:, None]                                            # f'
    p = torch.softmax(g, dim=-1)
    r = p - F.one_hot(labels, k).to(f.dtype)                      # dL/dg
    h_g = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    w = centered / (k * s[:, None])                               # ds/df
    eye = torch.eye(k, dtype=f.dtype, device=f.device)
    jac = (eye - g.unsqueeze(-1) * w.unsqueeze(-2)) / s[:, None, None]   # dg/df
    gauss_newton = jac.transpose(1, 2) @ h_g @ jac
    a = (r * f).sum(dim=-1)                                       # r . f
    outer_rw = r.unsqueeze(-1) * w.unsqueeze(-2)
    centering = eye - torch.full((k, k), 1.0 / k, dtype=f.dtype, device=f.device)
    s2, s3 = (s * s)[:, None, None], (s * s * s)[:, None, None]
    curvature = (-(outer_rw + outer_rw.transpose(1, 2)) / s2
                 + 3.0 * a[:, None, None] * w.unsqueeze(-1) * w.unsqueeze(-2) / s3
                 - a[:, None, None] * centering / (k * s3))
    hessian = gauss_newton + curvature
    return torch.where(degenerate[:, None, None], torch.zeros_like(hessian), hessian)
