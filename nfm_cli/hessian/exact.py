"""Exact Hessian diagonal of the training loss for networks piecewise linear in each single weight.

Why it is exact. Let f(theta) be the logits of one sample and l(f) its loss. Then

    d^2 l / d theta_i^2 = J_i^T H J_i + sum_k (dl/df_k) d^2 f_k / d theta_i^2,

J_i = df/d theta_i, H = d^2 l / df^2 the K x K loss Hessian in the logits (``losses.logit_hessian``).
For Linear / Conv / eval-mode BatchNorm layers joined by ReLU, max/avg pooling, flatten and residual
sums, each logit is piecewise linear in any *single* weight (the weight enters linearly once, every
other operation is piecewise linear), so d^2 f_k / d theta_i^2 = 0 almost everywhere and the diagonal
of the Hessian equals the diagonal of the generalized Gauss-Newton matrix J^T H J -- for any
symmetric H, also the indefinite one of ``normalized-ce`` (eqs. 20-22). This is the diagonal of the
Hessian in eq. (5) and in (17)/(59) of the paper, without the stochastic estimate (60)-(61).

How it is computed. Both losses are invariant to a common shift of the logits, so H 1 = 0 and H is
determined by its restriction to the (K-1)-dimensional subspace orthogonal to 1. Per sample,
H = sum_{k<K} lambda_k q_k q_k^T (eigendecomposition in that subspace, ``torch.linalg.eigh``), so

    diag(J^T H J)_i = sum_k sign(lambda_k) (J^T v_k)_i^2,     v_k = sqrt|lambda_k| q_k.

One forward pass per batch, then K-1 backward passes of the v_k (gradients with respect to the
outputs of the parameterised layers only: no weight gradients are formed by autograd). Each layer
turns the output gradients g_k and its input a into its diagonal (a ``LayerRule``):

* Linear:    sum_b sum_k s_bk g_bk^2 a_b^2  =  (sum_k s_k g_k^2)^T @ a^2 -- one matrix product per batch.
* Conv:      per-sample gradients g_bk @ unfold(a_b)^T in bounded chunks of samples, squared, summed.
* BatchNorm: per-sample gradients of weight and bias from g_bk and the normalised input, squared.

Sums over a batch are formed in the model's dtype and returned as float64 for accumulation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from nfm_cli.errors import NfmError
from nfm_cli.losses import check_loss_name, degenerate_mask, logit_hessian

# Parameter-free modules that are piecewise linear in their input (in eval mode).
PIECEWISE_LINEAR_LEAVES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout,
)

# Elements processed at once by the per-sample rules (Conv, Linear on sequences): bounds memory.
CHUNK_ELEMENTS = 1 << 24
# Elements of unfolded conv inputs kept per batch across the K-1 directions (2^27 float32 = 512 MiB);
# a layer that does not fit unfolds its input again for every direction (slower; equal up to rounding).
CACHE_ELEMENTS = 1 << 27


# --------------------------------------------------------------------------------------------
# Per-layer rules
# --------------------------------------------------------------------------------------------

class LayerRule:
    """Turns a layer's input and the K-1 back-propagated output gradients into its diagonal.

    Constructed once per batch with the layer's (detached) input, ``add`` is called once per
    direction k with the output gradient g_k [B, ...] and the signs s_k [B] of the eigenvalues,
    ``result`` returns {parameter name (local): sum over the batch of the diagonal}.
    """

    def __init__(self, module: nn.Module, layer_input: torch.Tensor, budget: "CacheBudget | None" = None):
        self.module = module
        self.input = layer_input

    def add(self, grad: torch.Tensor, sign: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _signed_square_sum(per_sample: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """sum_b sign_b * per_sample_b^2 over the leading (sample) dimension."""
    squared = per_sample * per_sample
    return torch.tensordot(sign, squared, dims=([0], [0]))


class CacheBudget:
    """Elements that rules may keep across the K-1 directions of one batch (e.g. unfolded conv inputs)."""

    def __init__(self, elements: int):
        self.left = elements

    def take(self, elements: int) -> bool:
        if elements > self.left:
            return False
        self.left -= elements
        return True


def _chunks(n: int, per_sample_elements: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, per_sample_elements))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


class LinearRule(LayerRule):
    """nn.Linear, y = a W^T + b. 2-D input: one matrix product; more dims (shared weight): per sample."""

    def __init__(self, module: nn.Linear, layer_input: torch.Tensor, budget: "CacheBudget | None" = None):
        super().__init__(module, layer_input)
        self.flat = layer_input.ndim == 2
        self.grad_square = None  # flat input: sum_k s_k g_k^2, [B, out]
        self.weight_diag = None if self.flat else torch.zeros_like(module.weight)
        self.bias_diag = None if self.flat or module.bias is None else torch.zeros_like(module.bias)

    def add(self, grad, sign):
        if self.flat:
            term = grad * grad * sign[:, None]
            self.grad_square = term if self.grad_square is None else self.grad_square.add_(term)
            return
        a = self.input.flatten(1, -2)                       # [B, T, in]
        g = grad.flatten(1, -2)                             # [B, T, out]
        for part in _chunks(a.shape[0], a[0].numel() + g[0].numel() + a.shape[-1] * g.shape[-1]):
            per_sample = torch.einsum("bto,bti->boi", g[part], a[part])
            self.weight_diag += _signed_square_sum(per_sample, sign[part])
            if self.bias_diag is not None:
                self.bias_diag += _signed_square_sum(g[part].sum(1), sign[part])

    def result(self):
        if not self.flat:
            out = {"weight": self.weight_diag}
            if self.bias_diag is not None:
                out["bias"] = self.bias_diag
            return out
        if self.grad_square is None:
            return {}
        out = {"weight": self.grad_square.T @ (self.input * self.input)}
        if self.module.bias is not None:
            out["bias"] = self.grad_square.sum(0)
        return out


class ConvRule(LayerRule):
    """nn.Conv1d / nn.Conv2d (any stride, padding, dilation, groups, padding mode)."""

    def __init__(self, module: nn.Conv1d | nn.Conv2d, layer_input: torch.Tensor, budget: "CacheBudget"):
        self.budget = budget
        self.cached = None
        if isinstance(module, nn.Conv1d):                   # treat as a 2-D conv of height 1
            layer_input = layer_input.unsqueeze(-2)
        padding = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            pads = module._reversed_padding_repeated_twice
            if isinstance(module, nn.Conv1d):
                pads = list(pads) + [0, 0]
            layer_input = F.pad(layer_input, pads, mode=mode)
            padding = 0
        elif isinstance(module, nn.Conv1d):
            padding = (0, padding[0])
        super().__init__(module, layer_input)
        two_d = (lambda v: (1, v[0])) if isinstance(module, nn.Conv1d) else (lambda v: tuple(v))
        self.unfold_args = dict(kernel_size=two_d(module.kernel_size), dilation=two_d(module.dilation),
                                padding=padding, stride=two_d(module.stride))
        groups, out_ch = module.groups, module.out_channels
        self.groups = groups
        weight = module.weight
        self.weight_diag = torch.zeros(groups, out_ch // groups, weight[0].numel(),
                                       dtype=weight.dtype, device=weight.device)
        self.bias_diag = torch.zeros_like(module.bias) if module.bias is not None else None

    def _columns(self, part: slice) -> torch.Tensor:
        cols = F.unfold(self.input[part], **self.unfold_args)                              # [c, G*i*k, L]
        return cols.reshape(cols.shape[0], self.groups, -1, cols.shape[-1])                # [c, G, i*k, L]

    def add(self, grad, sign):
        b = grad.shape[0]
        g = grad.reshape(b, self.groups, self.module.out_channels // self.groups, -1)   # [B, G, o, L]
        kernel = self.weight_diag.shape[-1]                 # (in / groups) * kernel positions
        cols_elements = self.groups * kernel * g.shape[-1]
        if self.cached is None and self.budget.take(b * cols_elements):
            self.cached = self._columns(slice(0, b))    # unfold once per batch, reuse for all K-1 directions
        per_sample_elements = self.module.out_channels * kernel + g[0].numel()
        if self.cached is None:
            per_sample_elements += cols_elements
        for part in _chunks(b, per_sample_elements):
            cols = self.cached[part] if self.cached is not None else self._columns(part)
            per_sample = torch.einsum("cgol,cgil->cgoi", g[part], cols)
            self.weight_diag += _signed_square_sum(per_sample, sign[part])
            if self.bias_diag is not None:
                self.bias_diag += _signed_square_sum(g[part].sum(-1).flatten(1), sign[part])

    def result(self):
        out = {"weight": self.weight_diag.reshape(self.module.weight.shape)}
        if self.bias_diag is not None:
            out["bias"] = self.bias_diag
        return out


class BatchNormRule(LayerRule):
    """nn.BatchNorm1d / 2d in eval mode: y = w * (x - mean) / sqrt(var + eps) + b, linear in w and b."""

    def __init__(self, module: nn.modules.batchnorm._BatchNorm, layer_input: torch.Tensor,
                 budget: "CacheBudget | None" = None):
        super().__init__(module, layer_input)
        shape = (1, -1) + (1,) * (layer_input.ndim - 2)
        self.normalized = ((layer_input - module.running_mean.reshape(shape))
                           / torch.sqrt(module.running_var.reshape(shape) + module.eps))
        self.weight_diag = torch.zeros_like(module.weight) if module.weight is not None else None
        self.bias_diag = torch.zeros_like(module.bias) if module.bias is not None else None

    def add(self, grad, sign):
        spatial = tuple(range(2, grad.ndim))
        if self.weight_diag is not None:
            per_sample = (grad * self.normalized).sum(spatial) if spatial else grad * self.normalized
            self.weight_diag += _signed_square_sum(per_sample, sign)
        if self.bias_diag is not None:
            per_sample = grad.sum(spatial) if spatial else grad
            self.bias_diag += _signed_square_sum(per_sample, sign)

    def result(self):
        out = {}
        if self.weight_diag is not None:
            out["weight"] = self.weight_diag
        if self.bias_diag is not None:
            out["bias"] = self.bias_diag
        return out


# Layer type -> rule. Looked up by exact type first, then by isinstance in this order.
RULES: dict[type[nn.Module], Callable[[nn.Module, torch.Tensor], LayerRule]] = {
    nn.Linear: LinearRule,
    nn.Conv1d: ConvRule,
    nn.Conv2d: ConvRule,
    nn.BatchNorm1d: BatchNormRule,
    nn.BatchNorm2d: BatchNormRule,
}


def _rule_for(module: nn.Module):
    rule = RULES.get(type(module))
    if rule is None:
        for kind, candidate in RULES.items():
            if isinstance(module, kind):
                return candidate
    return rule


# --------------------------------------------------------------------------------------------
# Which models qualify
# --------------------------------------------------------------------------------------------

def _refuse(name: str, module: nn.Module, why: str) -> NfmError:
    where = f"layer {name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
    return NfmError(f"the exact Hessian diagonal needs a network that is piecewise linear in each weight; "
                    f"{where} {why}; use --estimator hutchinson (or finite-diff) for this model")


def parameterised_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: module} of the layers with a rule; raises ``NfmError`` for any unsupported module.

    Supported: the ``RULES`` layer types, the parameter-free ``PIECEWISE_LINEAR_LEAVES`` and containers
    (``nn.Sequential`` or any class with ``piecewise_linear = True``, whose forward promises to use only
    its children, sums and reshapes) without parameters of their own. BatchNorm must be in eval mode
    and track running statistics.
    """
    layers: dict[str, nn.Module] = {}
    owners: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        rule = _rule_for(module)
        if rule is not None:
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if module.training:
                    raise _refuse(name, module, "is in training mode (batch statistics); put the model in eval mode")
                if module.running_mean is None:
                    raise _refuse(name, module, "uses batch statistics (track_running_stats=False)")
            if name in layers or any(id(m) == id(module) for m in layers.values()):
                raise _refuse(name, module, "is used twice (shared weights are not piecewise linear)")
            layers[name] = module
        elif isinstance(module, PIECEWISE_LINEAR_LEAVES):
            if isinstance(module, nn.Dropout) and module.training and module.p > 0:
                raise _refuse(name, module, "is in training mode (random masks); put the model in eval mode")
        elif isinstance(module, nn.Sequential) or getattr(type(module), "piecewise_linear", False) is True:
            pass
        else:
            raise _refuse(name, module, "is not a supported layer type")
        for pname, param in module.named_parameters(recurse=False):
            if rule is None:
                raise _refuse(name, module, f"has its own parameter {pname!r} outside a supported layer")
            if id(param) in owners and owners[id(param)] != name:
                raise _refuse(name, module, f"shares parameter {pname!r} with {owners[id(param)]!r}")
            owners[id(param)] = name
    return layers


def check_exact_supported(model: nn.Module) -> None:
    """Raise ``NfmError`` naming the first layer the exact estimator cannot handle."""
    parameterised_layers(model)


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


def exact_diagonal_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str,
                         layers: dict[str, nn.Module] | None = None) -> BatchDiagonal:
    """Sum over the samples of (x, y) of the per-sample loss Hessian diagonal, per parameter.

    ``layers`` is ``parameterised_layers(model)`` (computed when omitted). The model must be in
    eval mode. Dividing the accumulated sums by the number of samples gives the diagonal of the
    Hessian of the mean loss. Returned tensors are float64, named as ``model.named_parameters()``.
    """
    check_loss_name(loss)
    layers = parameterised_layers(model) if layers is None else layers
    records: dict[str, list] = {}
    with _parameters_require_grad(model), _capture_layers(layers, records), torch.enable_grad():
        logits = model(x)
    if any((inp._version, out._version) != versions for calls in records.values() for inp, out, versions in calls):
        records = {}                     # a layer output was modified in place: forward again, protected
        with _parameters_require_grad(model), _capture_layers(layers, records, True), torch.enable_grad():
            logits = model(x)
    if logits.ndim != 2:
        raise NfmError(f"the model returns logits of shape {tuple(logits.shape)}; expected [batch, classes]")
    for name, calls in records.items():
        if len(calls) > 1:
            raise _refuse(name, layers[name], "is called more than once per forward pass (shared weights)")
    called = [name for name in layers if name in records]
    outputs = [records[name][0][1] for name in called]
    budget = CacheBudget(CACHE_ELEMENTS)
    rules = {name: _rule_for(layers[name])(layers[name], records[name][0][0], budget) for name in called}
    vectors, signs = logit_hessian_factor(logits.detach(), y, loss)
    needs_backward = [i for i, out in enumerate(outputs) if out.requires_grad]
    for k in range(vectors.shape[0]):
        last = k == vectors.shape[0] - 1
        grads = torch.autograd.grad(logits, [outputs[i] for i in needs_backward], grad_outputs=vectors[k],
                                    retain_graph=not last, allow_unused=True)
        for i, grad in zip(needs_backward, grads):
            if grad is not None:
                rules[called[i]].add(grad, signs[k])
    sums: dict[str, torch.Tensor] = {}
    named = dict(model.named_parameters())
    for name in called:
        for local, value in rules[name].result().items():
            sums[f"{name}.{local}" if name else local] = value.detach().to(torch.float64)
    for name, param in named.items():                         # unused layers: a zero diagonal
        if name not in sums:
            sums[name] = torch.zeros(param.shape, dtype=torch.float64, device=param.device)
    degenerate = int(degenerate_mask(logits.detach()).sum()) if loss == "normalized-ce" else 0
    return BatchDiagonal({name: sums[name] for name in named}, degenerate)


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
    return {name: value / len(y) for name, value in total.items()}


__all__ = ["RULES", "PIECEWISE_LINEAR_LEAVES", "LayerRule", "BatchDiagonal", "check_exact_supported",
           "parameterised_layers", "logit_hessian_factor", "exact_diagonal_batch", "exact_diagonal"]
