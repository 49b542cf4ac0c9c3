"""The Fisher-Rao norm, eq. (25) of the paper (Liang et al., 2017):

    FR(theta) = sum_i theta_i^2 E_{z ~ S}[ (d L_z / d theta_i)^2 ],

with L_z the training loss (``ce``) of sample z with its trained-on label, over every parameter.
It needs the per-sample squared gradients (the empirical Fisher diagonal), not the Hessian.

Two ways to get them (``method``):

* ``rules`` -- for every model whose parameters all enter through operations with rules (what the
  exact and ggn estimators accept, ``curvature/graph.py``; any graph between them): the per-sample
  gradient of a Linear/Conv/BatchNorm/LayerNorm/Embedding weight is a closed form of the operation's
  input and the back-propagated gradient of L_z at its output (other operations: ``PerSampleRule``),
  so the per-operation rules (``curvature/rules.py``) give sum_z (dL_z/dtheta_i)^2 with the loss
  gradient dL_z/df as the single back-propagated direction: one forward and one backward pass per batch, no per-sample
  weight gradients from autograd. (In eval mode samples do not interact, so the gradient of sum_z L_z at a
  layer output is, row by row, the gradient of each L_z.)
* ``vmap`` -- per-sample gradients with ``torch.func.vmap(grad(...))`` in chunks: any model; slower;
  the test oracle for ``rules``.

``auto`` (default) uses ``rules`` whenever they cover the model and ``vmap`` otherwise.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from nfm_cli.curvature.batch_size import auto_batch_size
from nfm_cli.curvature.exact import CapturedForward
from nfm_cli.curvature.graph import CurvaturePlan
from nfm_cli.curvature.losses import per_sample_loss
from nfm_cli.curvature.support import curvature_plan
from nfm_cli.data.datasets import subset_indices
from nfm_cli.errors import NfmError
from nfm_cli.runtime.progress import ProgressFn, report
from nfm_cli.store.checkpoint import Checkpoint

FISHER_RAO_LOSS = "ce"
METHODS = ("auto", "rules", "vmap")
VMAP_BATCH = 64       # per-sample gradients of the whole model live at once: keep chunks small
RULES_BATCH = 256     # at most; one forward + one backward per batch (memory as the exact estimator)


def loss_gradient_direction(logits: torch.Tensor, y: torch.Tensor, loss: str
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample loss gradients dL_b/df_b as one direction [1, B, K], with signs +1 [1, B]."""
    with torch.enable_grad():
        f = logits.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(per_sample_loss(f, y, loss).sum(), f)
    return gradient.unsqueeze(0), torch.ones(1, len(y), dtype=gradient.dtype, device=gradient.device)


def batch_square_sums(forward: CapturedForward, y: torch.Tensor, loss: str = FISHER_RAO_LOSS, keep_graph: bool = False
                      ) -> dict[str, torch.Tensor]:
    """One batch's sum_z (dL_z/dtheta)^2 from its captured forward pass (one backward pass); ``measure``
    shares the forward with the Hessian diagonals (steps/measure_shared.py)."""
    directions, signs = loss_gradient_direction(forward.logits.detach(), y, loss)
    return forward.square_sums(directions, signs, keep_graph)


def _rules_sums(model, x, y, loss, layers, batch_size, progress) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] | None = None
    for start in range(0, len(y), batch_size):
        part = batch_square_sums(CapturedForward(model, x[start:start + batch_size], layers),
                                 y[start:start + batch_size], loss)
        if sums is None:
            sums = part
        else:
            for k, value in part.items():
                sums[k] += value
        report(progress, "fisher-rao", min(start + batch_size, len(y)), len(y))
    assert sums is not None
    return sums


def _vmap_sums(model, x, y, loss, batch_size, progress) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def sample_loss(p, xi, yi):
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return per_sample_loss(logits, yi.unsqueeze(0), loss).sum()

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    sums = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in params.items()}
    for start in range(0, len(y), batch_size):
        grads = per_sample(params, x[start:start + batch_size], y[start:start + batch_size])
        for k, g in grads.items():
            sums[k] += g.to(torch.float64).square().sum(0)
        report(progress, "fisher-rao", min(start + batch_size, len(y)), len(y))
    return sums


def squared_gradient_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = FISHER_RAO_LOSS,
                          batch_size: int | None = None, progress: ProgressFn = None,
                          method: str = "auto", plan: CurvaturePlan | None = None) -> dict[str, torch.Tensor]:
    """``{name: sum_z (dL_z/dtheta)^2}`` in float64 (module docstring for ``method``); eval mode. ``plan``:
    the rules' plan to use (default ``curvature_plan(model)``; ``measure`` passes its estimator's)."""
    if method not in METHODS:
        raise NfmError(f"unknown Fisher-Rao method {method!r}; use one of {', '.join(METHODS)}")
    if len(y) == 0:
        raise NfmError("the Fisher-Rao norm needs at least one sample")
    layers = plan
    if method != "vmap" and layers is None:
        try:
            layers = curvature_plan(model)
        except NfmError:
            if method == "rules":
                raise
    if layers is not None:
        if batch_size is None:            # as hessian-diag's exact estimator (whose memory it needs), at most 256
            batch_size = min(RULES_BATCH, auto_batch_size(model, x[:1], "exact", len(y), x.device))
        return _rules_sums(model, x, y, loss, layers, batch_size, progress)
    return _vmap_sums(model, x, y, loss, batch_size or VMAP_BATCH, progress)


def fisher_rao_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = FISHER_RAO_LOSS,
                    batch_size: int | None = None, progress: ProgressFn = None, method: str = "auto",
                    plan: CurvaturePlan | None = None) -> float:
    """Eq. (25) over the samples (x, y); the model must be in eval mode."""
    return fisher_rao_from_sums(model, squared_gradient_sums(model, x, y, loss, batch_size, progress, method, plan),
                                len(y))


def fisher_rao_from_sums(model: nn.Module, sums: dict[str, torch.Tensor], samples: int) -> float:
    """Eq. (25) from ``{name: sum_z (dL_z/dtheta)^2}`` over ``samples`` samples (summed in ``sums``' order)."""
    params = dict(model.named_parameters())
    return float(sum((params[k].detach().to(torch.float64) ** 2 * s).sum() for k, s in sums.items()) / samples)


def fisher_rao_norm_of_checkpoint(ck: Checkpoint, *, device: torch.device | str = "cpu", samples: int | None = None,
                                  seed: int = 0, batch_size: int | None = None, progress: ProgressFn = None,
                                  method: str = "auto", plan: CurvaturePlan | None = None) -> float:
    """Eq. (25) over the checkpoint's training set as trained (or the same seeded subset as
    ``hessian-diag --samples``)."""
    x, y = ck.training_tensors(device)
    idx = subset_indices(len(y), samples, seed, "hessian-samples").to(y.device)  # as hessian-diag
    model = ck.model.to(device)
    return fisher_rao_norm(model, x[idx], y[idx], batch_size=batch_size, progress=progress, method=method,
                           plan=plan)
