"""Exact Hessian diagonal of the training loss for networks piecewise linear in each single weight.

Why it is exact. Let f(theta) be the logits of one sample and l(f) its loss. Then

    d^2 l / d theta_i^2 = J_i^T H J_i + sum_k (dl/df_k) d^2 f_k / d theta_i^2,

J_i = df/d theta_i, H = d^2 l / df^2 the K x K loss Hessian in the logits (``losses.logit_hessian``).
For Linear / Conv / eval-mode BatchNorm layers joined by ReLU, max/avg pooling, flatten and residual
sums, each logit is piecewise linear in any *single* weight (the weight enters linearly once, every
other operation is piecewise linear; ``support.py`` verifies this on the model's torch.fx graph), so d^2 f_k / d theta_i^2 = 0 almost everywhere and the diagonal
of the Hessian equals the diagonal of the generalized Gauss-Newton matrix J^T H J -- for any
symmetric H, also the indefinite one of ``normalized-ce`` (eqs. 20-22). This is the diagonal of the
Hessian in eq. (5) and in (17)/(59) of the paper, without the stochastic estimate (60)-(61).

How it is computed. Both losses are invariant to a common shift of the logits, so H 1 = 0 and H is
determined by its restriction to the (K-1)-dimensional subspace orthogonal to 1. Per sample,
H = sum_{k<K} lambda_k q_k q_k^T (eigendecomposition in that subspace, ``torch.linalg.eigh``), so

    diag(J^T H J)_i = sum_k sign(lambda_k) (J^T v_k)_i^2,     v_k = sqrt|lambda_k| q_k.

One forward pass per batch, then K-1 backward passes of the v_k (gradients with respect to the
outputs of the parameterised layers only: no weight gradients are formed by autograd). Each layer
turns the output gradients g_k and its input a into its diagonal (a ``LayerRule``, ``rules.py``).
``layer_square_sums`` is that machinery for any set of directions; the Fisher-Rao norm uses it with
the loss gradient as the single direction.

Sums over a batch are formed in the model's dtype and returned as float64 for accumulation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from nfm_cli.curvature.losses import check_loss_name, degenerate_mask, logit_hessian
from nfm_cli.curvature.rules import CACHE_ELEMENTS, RULES, CacheBudget, LayerRule, rule_for
from nfm_cli.curvature.support import PIECEWISE_LINEAR_LEAVES, check_exact_supported, parameterised_layers, refusal
from nfm_cli.errors import NfmError

# --------------------------------------------------------------------------------------------
# One batch
# --------------------------------------------------------------------------------------------

def _shift_free_basis(k: int, dtype, device) -> torch.Tensor:
    """[K, K-1] orthonormal basis of the vectors orthogonal to 1 (the logit shift)."""
    ones = torch.ones(k, 1, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.cat([ones, torch.eye(k, dtype=torch.float64)[:, : k - 1]], dim=1))
    return q[:, 1:].to(dtype=dtype, device=device)


def logit_hessian_factor(logits: torch.Tensor, labels: torch.Tensor, loss: str
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns v_k [K-1, B, K] and signs s_k [K-1, B] with H_b = sum_k s_bk v_bk v_bk^T (exactly, up to rounding).

    ``H`` is ``logit_hessian``; its eigendecomposition is taken in the subspace orthogonal to 1,
    where both losses' Hessians live (they are invariant to shifting the logits).
    """
    k = logits.shape[-1]
    hessian = logit_hessian(logits, labels, loss)
    if k == 1:
        return logits.new_zeros(0, logits.shape[0], 1), logits.new_zeros(0, logits.shape[0])
    basis = _shift_free_basis(k, logits.dtype, logits.device)           # [K, K-1]
    reduced = basis.T @ hessian @ basis                                 # [B, K-1, K-1]
    reduced = (reduced + reduced.transpose(1, 2)) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(reduced)
    vectors = basis @ eigenvectors * eigenvalues.abs().sqrt().unsqueeze(1)   # [B, K, K-1]
    return vectors.permute(2, 0, 1), torch.sign(eigenvalues).T


@contextlib.contextmanager
def _capture_layers(layers: dict[str, nn.Module], records: dict[str, list], protect: bool = False):
    """Record (input, output, output version) of each layer call. ``protect``: hand a clone of the
    output downstream, so an in-place operation there (ReLU(inplace=True), ``out += skip``) cannot
    overwrite the tensor whose gradient we need."""
    handles = []

    def hook(name):
        def capture(module, inputs, output):
            layer_input = inputs[0].detach()
            layer_input = layer_input.clone() if protect else layer_input
            records.setdefault(name, []).append((layer_input, output, (layer_input._version, output._version)))
            return output.clone() if protect else None
        return capture

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _parameters_require_grad(model: nn.Module):
    """Layer outputs must be part of the autograd graph, also for frozen parameters."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


@dataclass
class BatchDiagonal:
    """Sums over one batch: {parameter name: float64 tensor}, and how many samples were degenerate."""

    sums: dict[str, torch.Tensor]
    degenerate: int


class CapturedForward:
    """One forward pass of ``model`` with the inputs and outputs of its rule layers recorded."""

    def __init__(self, model: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module]):
        records: dict[str, list] = {}
        with _parameters_require_grad(model), _capture_layers(layers, records), torch.enable_grad():
            logits = model(x)
        if any((inp._version, out._version) != versions for calls in records.values()
               for inp, out, versions in calls):
            records = {}                 # a layer output was modified in place: forward again, protected
            with _parameters_require_grad(model), _capture_layers(layers, records, True), torch.enable_grad():
                logits = model(x)
        if logits.ndim != 2:
            raise NfmError(f"the model returns logits of shape {tuple(logits.shape)}; expected [batch, classes]")
        for name, calls in records.items():
            if len(calls) > 1:
                raise refusal(name, layers[name], "is called more than once per forward pass (shared weights)")
        self.model, self.layers, self.logits = model, layers, logits
        self.called = [name for name in layers if name in records]
        self.inputs = {name: records[name][0][0] for name in self.called}
        self.outputs = {name: records[name][0][1] for name in self.called}

    def square_sums(self, directions: torch.Tensor, signs: torch.Tensor) -> dict[str, torch.Tensor]:
        """{parameter name: sum_d sum_b s_db (J_b^T v_db)^2} in float64, for directions v [D, B, K] in the
        logits with signs s [D, B] (one backward pass each; the graph is freed after the last)."""
        budget = CacheBudget(CACHE_ELEMENTS, directions.shape[0], self.logits.device,
                             self.logits.element_size())
        rules = {name: rule_for(self.layers[name])(self.layers[name], self.inputs[name], budget)
                 for name in self.called}
        targets = [name for name in self.called if self.outputs[name].requires_grad]
        for k in range(directions.shape[0]):
            # J^T v as the gradient of the scalar <logits, v>: the same numbers (the backward of the sum and
            # the product hands the logits 1.0 * v = v), without grad_outputs, whose shape check in
            # torch.autograd imports sympy (~0.3 s of every process)
            grads = torch.autograd.grad((self.logits * directions[k]).sum(), [self.outputs[name] for name in targets],
                                        retain_graph=k < directions.shape[0] - 1, allow_unused=True)
            for name, grad in zip(targets, grads):
                if grad is not None:
                    rules[name].add(grad, signs[k])
        sums: dict[str, torch.Tensor] = {}
        for name in self.called:
            for local, value in rules[name].result().items():
                sums[f"{name}.{local}" if name else local] = value.detach().to(torch.float64)
        named = dict(self.model.named_parameters())
        return {name: sums[name] if name in sums else                    # unused layers: zero
                torch.zeros(param.shape, dtype=torch.float64, device=param.device) for name, param in named.items()}


def layer_square_sums(model: nn.Module, x: torch.Tensor, directions_of, layers: dict[str, nn.Module] | None = None
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward pass, then ``CapturedForward.square_sums`` of ``directions_of(logits) -> (v, s)``.
    Returns the sums and the (detached) logits."""
    layers = parameterised_layers(model) if layers is None else layers
    forward = CapturedForward(model, x, layers)
    logits = forward.logits.detach()
    directions, signs = directions_of(logits)
    return forward.square_sums(directions, signs), logits


def exact_diagonal_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str,
                         layers: dict[str, nn.Module] | None = None) -> BatchDiagonal:
    """Sum over the samples of (x, y) of the per-sample loss Hessian diagonal, per parameter.

    ``layers`` is ``parameterised_layers(model)`` (computed when omitted). The model must be in
    eval mode. Dividing the accumulated sums by the number of samples gives the diagonal of the
    Hessian of the mean loss. Returned tensors are float64, named as ``model.named_parameters()``.
    """
    check_loss_name(loss)
    sums, logits = layer_square_sums(model, x, lambda f: logit_hessian_factor(f, y, loss), layers)
    degenerate = int(degenerate_mask(logits).sum()) if loss == "normalized-ce" else 0
    return BatchDiagonal(sums, degenerate)


def exact_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str,
                   batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Diagonal of the Hessian of the mean loss over (x, y) (eq. 5's summands), float64, in memory.

    Convenience for small data; the resumable, file-backed version is ``compute_hessian_diagonal``.
    """
    layers = parameterised_layers(model)
    total: dict[str, torch.Tensor] | None = None
    for start in range(0, len(y), batch_size):
        part = exact_diagonal_batch(model, x[start:start + batch_size], y[start:start + batch_size], loss, layers)
        if total is None:
            total = part.sums
        else:
            for name, value in part.sums.items():
                total[name] += value
    assert total is not None
    return {name: value.div_(len(y)) for name, value in total.items()}


__all__ = ["RULES", "PIECEWISE_LINEAR_LEAVES", "LayerRule", "BatchDiagonal", "CapturedForward",
           "check_exact_supported", "parameterised_layers", "logit_hessian_factor", "layer_square_sums",
           "exact_diagonal_batch", "exact_diagonal"]
