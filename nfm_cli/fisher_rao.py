"""The Fisher-Rao norm, eq. (25) of the paper (Liang et al., 2017):

    FR(theta) = sum_i theta_i^2 E_{z ~ S}[ (d L_z / d theta_i)^2 ],

with L_z the training loss (``ce``) of sample z with its trained-on label, over every parameter.
It needs the per-sample squared gradients (the empirical Fisher diagonal), not the Hessian.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from nfm_cli.checkpoint import Checkpoint
from nfm_cli.data import subset_indices
from nfm_cli.losses import per_sample_loss
from nfm_cli.progress import ProgressFn, report

FISHER_RAO_LOSS = "ce"


def squared_gradient_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = FISHER_RAO_LOSS,
                          batch_size: int = 64, progress: ProgressFn = None) -> dict[str, torch.Tensor]:
    """``{name: sum_z (dL_z/dtheta)^2}`` in float64, per-sample gradients in chunks (torch.func)."""
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


def fisher_rao_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = FISHER_RAO_LOSS,
                    batch_size: int = 64, progress: ProgressFn = None) -> float:
    """Eq. (25) over the samples (x, y); the model must be in eval mode."""
    sums = squared_gradient_sums(model, x, y, loss, batch_size, progress)
    params = dict(model.named_parameters())
    return float(sum((params[k].detach().to(torch.float64) ** 2 * s).sum() for k, s in sums.items()) / len(y))


def fisher_rao_norm_of_checkpoint(ck: Checkpoint, *, device: torch.device | str = "cpu", samples: int | None = None,
                                  seed: int = 0, batch_size: int = 64, progress: ProgressFn = None) -> float:
    """Eq. (25) over the checkpoint's training set as trained (or the same seeded subset as
    ``hessian-diag --samples``)."""
    x, y = ck.training_tensors(device)
    idx = subset_indices(len(y), samples, seed, "hessian-samples").to(y.device)  # as hessian-diag
    model = ck.model.to(device)
    return fisher_rao_norm(model, x[idx], y[idx], batch_size=batch_size, progress=progress)
