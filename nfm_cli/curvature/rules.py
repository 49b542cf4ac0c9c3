"""Per-operation rules of the exact Hessian and Gauss-Newton diagonals (``exact.py``); modules by EXACT class,
functional calls and raw parameters through ``graph.py``.

A rule turns a layer's input a and the back-propagated output gradients g_k of the K-1 scaled
eigenvectors of the logit Hessian into sum_b sum_k s_bk (per-sample gradient of the weight)^2:

* Linear:    sum_b sum_k s_bk g_bk^2 a_b^2  =  (sum_k s_k g_k^2)^T @ a^2 -- one matrix product per batch.
* Conv:      per-sample gradients g_bk @ unfold(a_b)^T in bounded chunks of samples, squared, summed;
             with ``groups`` the weight row i only sees the input channels of its group (Sec. 5.3 layout
             in ``variance.to_matrix``).
* BatchNorm: per-sample gradients of weight and bias from g_bk and the normalised input, squared (eval mode).
* LayerNorm / GroupNorm: the same with the input normalised over its own dimensions / groups.
* Embedding: scatter of g_bk into the rows of the sample's tokens, squared.
* anything else (``PerSampleRule``): per-sample gradients of that one operation by torch.func.

With a single direction per sample (the loss gradient, sign +1) the same rules give the per-sample
squared gradients of the Fisher-Rao norm (eq. 25, ``fisher_rao.py``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from nfm_cli.curvature.conv_routes import (
    PER_SAMPLE_CHUNK_ELEMENTS,
    POSITION_PAIR,
    ConvShape,
    PositionPairSums,
    choose_route,
    output_positions,
    stacks_directions,
    unfold_columns,
)
from nfm_cli.runtime.memory import available_bytes

# Elements processed at once by the per-sample rules (Conv, Linear on sequences): bounds memory. The
# caps below; ``CacheBudget`` lowers both to a share of the memory still available (runtime.memory).
CHUNK_ELEMENTS = 1 << 24
CHUNK_FLOOR = 1 << 18
CHUNK_SHARE = 1 / 16
CACHE_SHARE = 1 / 4
# Elements of unfolded conv inputs kept per batch across the K-1 directions (2^27 float32 = 512 MiB);
# a layer that does not fit unfolds its input again for every direction (slower; equal up to rounding).
CACHE_ELEMENTS = 1 << 27


class LayerRule:
    """Turns a layer's input and the K-1 back-propagated output gradients into its diagonal.

    Constructed once per batch with the layer's (detached) input, ``add_batch`` is called with a
    stack of D directions at once (D of the K-1, all of them when memory allows): the output
    gradients g [D, B, ...] and the signs s [D, B] of the eigenvalues, so that the rule's matrix
    products run over the D directions together (few large products instead of D small ones);
    ``add`` is one direction (g_k [B, ...], s_k [B]). ``result`` returns {parameter name (local): sum
    over the batch and the directions of the diagonal}.
    """

    # Whether ``add_batch`` gains from stacks of directions (one large matrix product instead of D small
    # ones); rules without (elementwise ones) get each direction as it comes, holding no stack in memory.
    stacks = False

    def __init__(self, module: nn.Module, layer_input: torch.Tensor, budget: CacheBudget | None = None):
        self.module = module
        self.input = layer_input

    def add(self, grad, sign: torch.Tensor) -> None:
        """One direction: g_k [B, ...] (a tuple for several outputs) and s_k [B]."""
        stacked = tuple(g.unsqueeze(0) for g in grad) if isinstance(grad, tuple) else grad.unsqueeze(0)
        self.add_batch(stacked, sign.unsqueeze(0))

    def add_batch(self, grad, sign: torch.Tensor) -> None:
        """D directions: g [D, B, ...] (a tuple for several outputs) and s [D, B]."""
        raise NotImplementedError

    def result(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _signed_square_sum(per_sample: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """sum_db sign_db * per_sample_db^2 over the leading (direction, sample) dimensions, sign [D, B]."""
    squared = per_sample * per_sample
    return torch.tensordot(sign, squared, dims=([0, 1], [0, 1]))


class CacheBudget:
    """Elements that rules may keep across the K-1 directions of one batch (e.g. unfolded conv inputs),
    elements a rule may process at once (``chunk``), and how many directions there are (None:
    unknown, taken as 9, CIFAR-10's K-1).

    With a ``device``, both element counts are capped by a share of the memory still available there
    (``runtime.memory.available_bytes``: cgroup limit, MemAvailable, free GPU memory, NFM_MEMORY_LIMIT):
    ``CACHE_SHARE`` for the kept elements, ``CHUNK_SHARE`` (at least ``CHUNK_FLOOR``) for a chunk.
    Results do not depend on either (equal up to rounding), only speed and peak memory do."""

    def __init__(self, elements: int, directions: int | None = None, device: torch.device | None = None,
                 element_size: int = 4):
        self.left, self.chunk = elements, CHUNK_ELEMENTS
        self.directions = directions
        available = available_bytes(device) if device is not None else None
        if available is not None:
            self.left = min(elements, int(CACHE_SHARE * available) // element_size)
            self.chunk = max(CHUNK_FLOOR, min(CHUNK_ELEMENTS, int(CHUNK_SHARE * available) // element_size))

    def take(self, elements: int) -> bool:
        if elements > self.left:
            return False
        self.left -= elements
        return True


def _chunks(n: int, per_sample_elements: int, chunk_elements: int | None = None) -> Iterator[slice]:
    step = max(1, (chunk_elements or CHUNK_ELEMENTS) // max(1, per_sample_elements))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


class LinearRule(LayerRule):
    """nn.Linear, y = a W^T + b. 2-D input: one matrix product; more dims (shared weight): per sample."""

    def __init__(self, module: nn.Linear, layer_input: torch.Tensor, budget: CacheBudget | None = None):
        super().__init__(module, layer_input)
        self.chunk = budget.chunk if budget is not None else CHUNK_ELEMENTS
        self.flat = layer_input.ndim == 2
        self.stacks = not self.flat                         # one product over the positions and directions
        self.grad_square = None  # flat input: sum_k s_k g_k^2, [B, out]
        self.weight_diag = None if self.flat else torch.zeros_like(module.weight)
        self.bias_diag = None if self.flat or module.bias is None else torch.zeros_like(module.bias)

    def add_batch(self, grad, sign):
        if self.flat:                                       # grad [D, B, out]
            term = torch.einsum("db,dbo->bo", sign, grad * grad)
            self.grad_square = term if self.grad_square is None else self.grad_square.add_(term)
            return
        a = self.input.flatten(1, -2)                       # [B, T, in]
        g = grad.flatten(2, -2)                             # [D, B, T, out]
        d, out = g.shape[0], g.shape[-1]
        per_sample_elements = a[0].numel() + d * (g[0, 0].numel() * 2 + a.shape[-1] * out)
        for part in _chunks(a.shape[0], per_sample_elements, self.chunk):
            gp = g[:, part].permute(1, 0, 3, 2).reshape(-1, d * out, g.shape[2])   # [c, D out, T]
            per_sample = torch.bmm(gp, a[part])                                 # [c, D out, in]
            signs = sign[:, part].T                                             # [c, D]
            self.weight_diag += torch.tensordot(signs, per_sample.square_().reshape(-1, d, out, a.shape[-1]),
                                                dims=([0, 1], [0, 1]))
            if self.bias_diag is not None:
                self.bias_diag += _signed_square_sum(g[:, part].sum(2), sign[:, part])

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
    """nn.Conv1d / nn.Conv2d (any stride, padding, dilation, groups, padding mode), by the cheaper of the
    per-sample and position-pair routes (``conv_routes.py``), chosen per layer at the first direction;
    the directions stacked or one by one by the number of output positions (``stacks_directions``)."""

    forced_route: str | None = None         # tests and benchmarks: one route for every layer
    forced_stacks: bool | None = None       # tests and benchmarks: stacked or one by one for every layer

    def __init__(self, module: nn.Conv1d | nn.Conv2d, layer_input: torch.Tensor, budget: CacheBudget):
        self.budget = budget
        self.cached = None
        self.route, self.pairs = None, None
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
        positions = output_positions(tuple(layer_input.shape[-2:]), **self.unfold_args)
        self.stacks = stacks_directions(positions) if self.forced_stacks is None else self.forced_stacks

    def _columns(self, part: slice) -> torch.Tensor:
        cols = unfold_columns(self.input[part], **self.unfold_args)                        # [c, G*i*k, L]
        return cols.reshape(cols.shape[0], self.groups, -1, cols.shape[-1])                # [c, G, i*k, L]

    def add_batch(self, grad, sign):
        d, b = grad.shape[:2]
        g = grad.reshape(d, b, self.groups, self.module.out_channels // self.groups, -1)   # [D, B, G, o, L]
        kernel = self.weight_diag.shape[-1]                 # (in / groups) * kernel positions
        if self.route is None:
            self._choose_route(g[0], kernel)
        if self.pairs is not None:
            self.pairs.add_batch(g, sign)
            return
        groups, out_per_group, positions = g.shape[2:]
        cols_elements = groups * kernel * positions
        if self.cached is None and self.budget.take(b * cols_elements):
            self.cached = self._columns(slice(0, b))    # unfold once per batch, reuse for all K-1 directions
        per_sample_elements = d * (self.module.out_channels * kernel + 2 * g[0, 0].numel())
        if self.cached is None:
            per_sample_elements += cols_elements
        for part in _chunks(b, per_sample_elements, min(self.budget.chunk, PER_SAMPLE_CHUNK_ELEMENTS)):
            cols = self.cached[part] if self.cached is not None else self._columns(part)       # [c, G, i, L]
            gp = g[:, part].permute(1, 2, 0, 3, 4).reshape(-1, groups, d * out_per_group, positions)
            per_sample = torch.matmul(gp, cols.transpose(-1, -2))                            # [c, G, D o, i]
            per_sample = per_sample.square_().reshape(-1, groups, d, out_per_group, kernel)
            self.weight_diag += torch.tensordot(sign[:, part].T, per_sample, dims=([0, 1], [0, 2]))
            if self.bias_diag is not None:
                self.bias_diag += _signed_square_sum(g[:, part].sum(-1).flatten(2), sign[:, part])

    def _choose_route(self, g: torch.Tensor, kernel: int) -> None:
        b, groups, out_per_group, positions = g.shape
        shape = ConvShape(b, positions, groups, out_per_group, kernel, self.budget.directions or 9)
        self.route = self.forced_route or choose_route(shape, self.budget.left)
        if self.route == POSITION_PAIR and self.budget.take(shape.position_pair_elements()):
            self.pairs = PositionPairSums(b, groups, out_per_group, positions, g.dtype, g.device)

    def result(self):
        if self.pairs is not None:
            self.weight_diag = self.pairs.weight(self._columns, self.weight_diag.shape[-1], self.budget.chunk)
            if self.bias_diag is not None:
                self.bias_diag = self.pairs.bias()
            self.pairs = None
        out = {"weight": self.weight_diag.reshape(self.module.weight.shape)}
        if self.bias_diag is not None:
            out["bias"] = self.bias_diag
        return out


class _AffineNormRule(LayerRule):
    """y = w * xhat + b with xhat the parameter-free normalisation of the input: per-sample gradients
    sum over positions of g * xhat (weight) and of g (bias). ``_normalize`` and ``_reduce`` say which;
    ``_reduce`` sums a [D, B, ...] tensor over the positions, keeping the parameter's dimensions."""

    def __init__(self, module, layer_input: torch.Tensor, budget: CacheBudget | None = None):
        super().__init__(module, layer_input)
        self.normalized = self._normalize(layer_input)
        self.weight_diag = torch.zeros_like(module.weight) if module.weight is not None else None
        self.bias_diag = torch.zeros_like(module.bias) if module.bias is not None else None

    def add_batch(self, grad, sign):
        if self.weight_diag is not None:
            self.weight_diag += _signed_square_sum(self._reduce(grad * self.normalized), sign)
        if self.bias_diag is not None:
            self.bias_diag += _signed_square_sum(self._reduce(grad), sign)

    def _reduce(self, per_position):
        """Channels along dimension 1 of a sample (dimension 2 of [D, B, ...]): sum over the rest."""
        dims = tuple(range(3, per_position.ndim))
        return per_position.sum(dims) if dims else per_position

    def result(self):
        out = {}
        if self.weight_diag is not None:
            out["weight"] = self.weight_diag
        if self.bias_diag is not None:
            out["bias"] = self.bias_diag
        return out


class BatchNormRule(_AffineNormRule):
    """nn.BatchNorm1d / 2d in eval mode: y = w * (x - mean) / sqrt(var + eps) + b, linear in w and b:
    xhat normalised by the running statistics."""

    def _normalize(self, x):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - self.module.running_mean.reshape(shape)) / torch.sqrt(
            self.module.running_var.reshape(shape) + self.module.eps)


class LayerNormRule(_AffineNormRule):
    """nn.LayerNorm / F.layer_norm: the affine parameters have the normalised shape; positions are the
    dimensions between the sample and the normalised ones."""

    def _normalize(self, x):
        return F.layer_norm(x, tuple(self.module.normalized_shape), None, None, self.module.eps)

    def _reduce(self, per_position):
        dims = tuple(range(2, per_position.ndim - len(self.module.normalized_shape)))
        return per_position.sum(dims) if dims else per_position


class GroupNormRule(_AffineNormRule):
    """nn.GroupNorm / F.group_norm: one weight and bias per channel (dimension 1)."""

    def _normalize(self, x):
        return F.group_norm(x, self.module.num_groups, None, None, self.module.eps)


class EmbeddingRule(LayerRule):
    """nn.Embedding / F.embedding: the per-sample gradient of the table is the scatter of the output
    gradients into the rows of the sample's tokens (a token seen twice in a sample adds up before
    squaring). Formed on the distinct (sample, token) pairs only, never as [B, V, D]."""

    def __init__(self, module, layer_input: torch.Tensor, budget: CacheBudget | None = None):
        super().__init__(module, layer_input)
        tokens = layer_input.reshape(layer_input.shape[0], -1).long()          # [B, T]
        rows = module.weight.shape[0]
        sample = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(tokens)
        keys, self.inverse = torch.unique((sample * rows + tokens).reshape(-1), return_inverse=True)
        self.key_sample, self.key_token = keys // rows, keys % rows
        if module.padding_idx is not None:                                     # no gradient there
            self.key_sample = torch.where(self.key_token == module.padding_idx, -1, self.key_sample)
        self.weight_diag = torch.zeros_like(module.weight)

    def add_batch(self, grad, sign):
        d = grad.shape[0]
        g = grad.reshape(d, -1, grad.shape[-1]).transpose(0, 1)                # [B*T, D, width]
        per_pair = g.new_zeros(len(self.key_token), d, g.shape[-1]).index_add_(0, self.inverse, g)
        sample = self.key_sample.clamp_min(0)
        weights = torch.where(self.key_sample[:, None] >= 0, sign[:, sample].T, 0.0).to(g.dtype)   # [pairs, D]
        squares = torch.einsum("pd,pdw->pw", weights, per_pair * per_pair)
        self.weight_diag.index_add_(0, self.key_token, squares)

    def result(self):
        return {"weight": self.weight_diag}


class PerSampleRule(LayerRule):
    """Any operation through which parameters enter, samples along dimension 0 and independent: the
    per-sample gradients of its parameters from ``torch.func`` (vmap of the operation's vector-Jacobian
    product alone, not of the network), squared and summed. Exact, slower than the closed forms above;
    used for class tokens, position embeddings, layer scales, relative-position bias tables, weights
    used through a function of themselves, and torch.nn modules without a closed form (attention).

    ``function(params, *inputs)`` recomputes the operation for inputs with a batch dimension (of 1 here);
    ``params`` {local name: tensor}; ``inputs`` the recorded batch-dependent tensors [B, ...]."""

    stacks = True                           # one vjp per sample for all its directions

    def __init__(self, function, params: dict[str, torch.Tensor], inputs: list[torch.Tensor]):
        super().__init__(None, None)
        self.function, self.params, self.inputs = function, {k: v.detach() for k, v in params.items()}, inputs
        self.diag = {k: torch.zeros_like(v) for k, v in self.params.items()}

    def _per_sample(self, inputs, grads):
        """{name: [c, D, ...]} for inputs [c, ...] and output gradients [c, D, ...]: one vjp per sample,
        its pullback applied to the sample's D directions at once."""
        def one(sample_inputs, sample_grads):
            def output(params):
                return self.function(params, *[t.unsqueeze(0) for t in sample_inputs])
            _, pullback = torch.func.vjp(output, self.params)
            return torch.func.vmap(lambda *g: pullback(tuple(t.unsqueeze(0) for t in g))[0])(*sample_grads)
        return torch.func.vmap(one)(tuple(inputs), tuple(grads))

    def add_batch(self, grad, sign):
        grads = tuple(g.transpose(0, 1) for g in (grad if isinstance(grad, tuple) else (grad,)))   # [B, D, ...]
        d = sign.shape[0]
        per_sample_elements = sum(v.numel() for v in self.params.values()) * 3 * d + sum(
            t[0].numel() for t in self.inputs) * 8 + sum(g[0].numel() for g in grads) * 8
        for part in _chunks(grads[0].shape[0], per_sample_elements):
            per_sample = self._per_sample([t[part] for t in self.inputs], [g[part] for g in grads])
            for name, value in per_sample.items():
                self.diag[name] += _signed_square_sum(value, sign[:, part].T)

    def result(self):
        return dict(self.diag)


# Layer class -> rule, looked up by EXACT class: a subclass may override ``forward`` (e.g. square the
# output), so it is traced through instead (``graph.py``) and its operations get their own rules.
RULES: dict[type[nn.Module], Callable[[nn.Module, torch.Tensor], LayerRule]] = {
    nn.Linear: LinearRule,
    nn.Conv1d: ConvRule,
    nn.Conv2d: ConvRule,
    nn.BatchNorm1d: BatchNormRule,
    nn.BatchNorm2d: BatchNormRule,
    nn.LayerNorm: LayerNormRule,
    nn.GroupNorm: GroupNormRule,
    nn.Embedding: EmbeddingRule,
}
# Of these, the classes whose output is linear in its parameters AND piecewise linear in its input
# (eval mode): the ones the exact Hessian estimator accepts.
PIECEWISE_LINEAR_RULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding)


def rule_for(module: nn.Module) -> Callable[..., LayerRule] | None:
    """The rule of ``module``'s exact class, or None (subclasses get none)."""
    return RULES.get(type(module))


__all__ = ["RULES", "PIECEWISE_LINEAR_RULES", "LayerRule", "CacheBudget", "LinearRule", "ConvRule", "BatchNormRule",
           "LayerNormRule", "GroupNormRule", "EmbeddingRule", "PerSampleRule", "rule_for",
           "CHUNK_ELEMENTS", "CACHE_ELEMENTS", "CHUNK_FLOOR", "CHUNK_SHARE", "CACHE_SHARE"]
