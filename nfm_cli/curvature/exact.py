"""Exact Hessian diagonal of the training loss for networks piecewise linear in each single weight.

Why it is exact. Let f(theta) be the logits of one sample and l(f) its loss. Then

    d^2 l / d theta_i^2 = J_i^T H J_i + sum_k (dl/df_k) d^2 f_k / d theta_i^2,

J_i = df/d theta_i, H = d^2 l / df^2 the K x K loss Hessian in the logits (``losses.logit_hessian``).
For Linear / Conv / eval-mode BatchNorm layers joined by ReLU, max/avg pooling, flatten and residual
sums, each logit is piecewise linear in any *single* weight (the weight enters linearly once, every
other operation is piecewise linear; ``support.py`` verifies this on the model's torch.fx graph), so
d^2 f_k / d theta_i^2 = 0 almost everywhere and the diagonal of the Hessian equals the diagonal of the generalized
Gauss-Newton matrix J^T H J -- for any symmetric H, also the indefinite one of ``normalized-ce`` (eqs. 20-22). This is
the diagonal of the Hessian in eq. (5) and in (17)/(59) of the paper, without the stochastic estimate (60)-(61).

How it is computed. Both losses are invariant to a common shift of the logits, so H 1 = 0 and H is
determined by its restriction to the (K-1)-dimensional subspace orthogonal to 1. Per sample,
H = sum_{k<K} lambda_k q_k q_k^T (eigendecomposition in that subspace, ``torch.linalg.eigh``), so

    diag(J^T H J)_i = sum_k sign(lambda_k) (J^T v_k)_i^2,     v_k = sqrt|lambda_k| q_k.

One forward pass per batch, then K-1 backward passes of the v_k (gradients with respect to the
outputs of the parameterised layers only: no weight gradients are formed by autograd). Each layer
turns the output gradients g_k and its input a into its diagonal (a ``LayerRule``, ``rules.py``); the
rules built on matrix products (conv up to 256 output positions, ``conv_routes.stacks_directions``;
linear on sequences; per-sample) take the K-1 gradients stacked [K-1, B, ...] at once
(``LayerRule.add_batch``: one product over all directions per sample instead of K-1 small ones), in
groups that fit the free memory (``direction_group``); the elementwise ones, and convs with more
positions, take each direction as it comes. (Batching the backward passes themselves, ``is_grads_batched``, was
measured: on the CPU no faster than K-1 passes, the conv backward's batching rule loops over them.)
``layer_square_sums`` is that machinery for any set of directions; the Fisher-Rao norm uses it with
the loss gradient as the single direction.

Sums over a batch are formed in the model's dtype and returned as float64 for accumulation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from nfm_cli.curvature.folded import folded_rule, folded_uses
from nfm_cli.curvature.graph import CurvaturePlan, fetch, tensor_outputs, unsupported
from nfm_cli.curvature.losses import check_loss_name, degenerate_mask, logit_hessian
from nfm_cli.curvature.rules import CACHE_ELEMENTS, RULES, CacheBudget, LayerRule
from nfm_cli.curvature.support import PIECEWISE_LINEAR_LEAVES, check_exact_supported, parameterised_layers
from nfm_cli.errors import NfmError
from nfm_cli.runtime.memory import available_bytes

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
def _capture_layers(layers: dict[str, nn.Module], records: dict[str, list], clone_inputs: bool = False):
    """Record (input, output, input version) of each layer call and hand a clone of the output downstream,
    so an in-place operation there (ReLU(inplace=True), ``out += skip``) cannot overwrite the tensor
    whose gradient we need. ``clone_inputs``: record clones of the inputs too (for a graph that
    modifies a layer input in place after the layer; the version tells)."""
    handles = []

    def hook(name):
        def capture(module, inputs, output):
            layer_input = inputs[0].detach()
            layer_input = layer_input.clone() if clone_inputs else layer_input
            records.setdefault(name, []).append((layer_input, output, layer_input._version))
            return output.clone()
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


class _Recorder(fx.Interpreter):
    """Runs the traced graph of the model, recording the calls of the parameter uses (their arguments,
    cloned, and outputs, handed on as clones so later in-place operations cannot touch them) and the
    values of the per-sample rules' seeds. Attributes are read from the live model."""

    def __init__(self, model: nn.Module, graph: fx.Graph, uses: list):
        super().__init__(model, graph=graph)
        self.model = model
        self.entries = {u.node for u in uses}
        self.seeds = {s for u in uses for s in u.seeds}
        self.calls: dict[str, tuple] = {}
        self.outputs: dict[str, object] = {}
        self.values: dict[str, torch.Tensor] = {}

    def fetch_attr(self, target: str):
        return fetch(self.model, target)

    def run_node(self, n: fx.Node):
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.name in self.entries:
                self.calls[n.name] = _detached_clone((args, kwargs))
            out = getattr(self, n.op)(n.target, args, kwargs)
        if n.name in self.seeds:
            self.values[n.name] = _detached_clone(out)
        if n.name in self.entries:
            self.outputs[n.name] = out
            return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
        return out


def _detached_clone(tree):
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)


class CapturedForward:
    """One forward pass of ``model`` with what the rules of its parameter uses (``plan``) need recorded:
    by forward hooks when every use is a rule module's call, else by interpreting the traced graph."""

    def __init__(self, model: nn.Module, x: torch.Tensor, plan: CurvaturePlan):
        self.model, self.plan = model, plan
        if plan.graph is None:
            self._hooked_forward(x)
        else:
            recorder = _Recorder(model, plan.graph, plan.uses)
            with _parameters_require_grad(model), torch.enable_grad():
                self.logits = recorder.run(x)
            self.calls, self.outputs, self.values = recorder.calls, recorder.outputs, recorder.values
            self.called = [u for u in plan.uses if u.node in self.outputs]
        if not isinstance(self.logits, torch.Tensor) or self.logits.ndim != 2:
            shape = tuple(self.logits.shape) if isinstance(self.logits, torch.Tensor) else type(self.logits).__name__
            raise NfmError(f"the model returns logits of shape {shape}; expected [batch, classes]")
        self.folded = folded_uses(model, plan, x, self.outputs, self.called)     # windows (folded.py)

    def _hooked_forward(self, x: torch.Tensor) -> None:
        """Forward hooks on the rule modules, their outputs handed downstream as clones: an in-place
        operation after a layer (resnet's ReLU(inplace=True)) would otherwise overwrite the tensor whose
        gradient the rules need; a clone costs far less than the second forward it used to take."""
        layers = {u.path: u.module for u in self.plan.uses}
        records: dict[str, list] = {}
        with _parameters_require_grad(self.model), _capture_layers(layers, records), torch.enable_grad():
            logits = self.model(x)
        if any(inp._version != version for calls in records.values() for inp, _, version in calls):
            records = {}                 # a layer input was modified in place: forward again, inputs cloned
            with _parameters_require_grad(self.model), _capture_layers(layers, records, True), torch.enable_grad():
                logits = self.model(x)
        for name, calls in records.items():
            if len(calls) > 1:
                raise unsupported(name, layers[name], "is called more than once per forward pass (shared weights)")
        self.logits = logits
        self.called = [u for u in self.plan.uses if u.path in records]
        self.calls = {u.node: ((records[u.path][0][0],), {}) for u in self.called}
        self.outputs = {u.node: records[u.path][0][1] for u in self.called}
        self.values = {}

    def square_sums(self, directions: torch.Tensor, signs: torch.Tensor, keep_graph: bool = False
                    ) -> dict[str, torch.Tensor]:
        """{parameter name: sum_d sum_b s_db (J_b^T v_db)^2} in float64, for directions v [D, B, K] in the
        logits with signs s [D, B]: one backward pass each, their output gradients stacked into groups of
        directions (``direction_group``) that the rules take at once (``LayerRule.add_batch``). The graph
        is freed after the last direction unless ``keep_graph`` (more directions to come: ``measure``)."""
        budget = CacheBudget(CACHE_ELEMENTS, directions.shape[0], self.logits.device,
                             self.logits.element_size())
        rules, targets = self._rules_and_targets(budget)
        total = directions.shape[0]
        stacked_elements = sum(t.numel() for node, _, t in targets if rules[node].stacks)
        group = direction_group(total, stacked_elements, self.logits)
        for start in range(0, total, group):
            self._back_propagate(directions, signs, range(start, min(total, start + group)), targets, rules,
                                 keep_graph)
        named = dict(self.model.named_parameters())
        sums: dict[str, torch.Tensor] = {}
        for use in self.called:
            for local, value in rules[use.node].result().items():
                sums[use.params.get(local, local)] = value.detach().to(torch.float64)
        return {name: sums[name].reshape(param.shape) if name in sums else        # unused parameters: zero
                torch.zeros(param.shape, dtype=torch.float64, device=param.device) for name, param in named.items()}

    def _rules_and_targets(self, budget: CacheBudget) -> tuple[dict[str, LayerRule], list]:
        """The rule of every called use, and the (node, output index, tensor) whose gradients they need."""
        batch = self.logits.shape[0]
        rules, targets = {}, []
        for use in self.called:
            outputs = tensor_outputs(self.outputs[use.node])
            args, kwargs = self.calls[use.node]
            rules[use.node] = folded_rule(use, args, kwargs, self.values, budget, self.outputs[use.node], batch) \
                if use.node in self.folded else use.make_rule(args, kwargs, self.values, budget)
            targets += [(use.node, i, t) for i, t in enumerate(outputs) if t.requires_grad]
        return rules, targets

    def _back_propagate(self, directions: torch.Tensor, signs: torch.Tensor, group: range, targets: list,
                        rules: dict[str, LayerRule], keep_graph: bool) -> None:
        """The directions of ``group``, one backward pass each, to the targets: the rules that take stacks
        (``LayerRule.stacks``) get the group's gradients stacked [len(group), B, ...] after the last
        backward pass (zeros where a direction reached none), the others each direction as it comes."""
        kept: dict[tuple[str, int], torch.Tensor] = {}
        last = directions.shape[0] if keep_graph else directions.shape[0] - 1
        for k in group:
            # J^T v as the gradient of the scalar <logits, v>: the same numbers (the backward of the sum and
            # the product hands the logits 1.0 * v = v), without grad_outputs, whose shape check in
            # torch.autograd imports sympy (~0.3 s of every process)
            grads = torch.autograd.grad((self.logits * directions[k]).sum(), [t for _, _, t in targets],
                                        retain_graph=k < last, allow_unused=True)
            now: dict[str, dict[int, torch.Tensor]] = {}
            for (node, i, t), grad in zip(targets, grads, strict=True):
                if rules[node].stacks:                  # written into one buffer: no second copy at stacking
                    if (node, i) not in kept:
                        kept[node, i] = t.new_empty((len(group), *t.shape))
                    slot = kept[node, i][k - group.start]
                    if grad is None:
                        slot.zero_()
                    else:
                        slot.copy_(grad)
                elif grad is not None:
                    now.setdefault(node, {})[i] = grad
            for node, by_output in now.items():
                rules[node].add(_output_gradients(self.outputs[node], by_output), signs[k])
            del grads, now
        stacked: dict[str, dict[int, torch.Tensor]] = {}
        for (node, i), buffer in kept.items():
            stacked.setdefault(node, {})[i] = buffer
        del kept
        for node, by_output in stacked.items():
            grads = _stacked_output_gradients(self.outputs[node], by_output, len(group))
            rules[node].add_batch(grads, signs[group.start:group.stop])


def _output_gradients(output, grads: dict[int, torch.Tensor]):
    """The gradient of a single-tensor output, or a tuple (zeros where an output got none)."""
    outputs = tensor_outputs(output)
    if len(outputs) == 1:
        return grads[0]
    return tuple(grads[i] if i in grads else torch.zeros_like(t) for i, t in enumerate(outputs))


# Share of the free memory (``runtime.memory``) the stacked output gradients of one group of directions
# may take; the whole K-1 when they fit.
DIRECTION_STACK_SHARE = 1 / 8


def direction_group(directions: int, elements_per_direction: int, like: torch.Tensor) -> int:
    """How many directions to stack at once: all of them unless their output gradients (elements per
    direction, in ``like``'s dtype) exceed ``DIRECTION_STACK_SHARE`` of the free memory; at least 1."""
    available = available_bytes(like.device)
    if available is None or directions <= 1:
        return max(1, directions)
    fits = int(DIRECTION_STACK_SHARE * available) // max(1, elements_per_direction * like.element_size())
    return max(1, min(directions, fits))


def _stacked_output_gradients(output, grads: dict[int, torch.Tensor], count: int):
    """The stacked gradient [count, B, ...] of a single-tensor output, or a tuple (zeros where an
    output got none)."""
    outputs = tensor_outputs(output)
    if len(outputs) == 1:
        return grads[0]
    return tuple(grads[i] if i in grads else t.new_zeros((count, *t.shape)) for i, t in enumerate(outputs))


def layer_square_sums(model: nn.Module, x: torch.Tensor, directions_of, layers: CurvaturePlan | None = None
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward pass, then ``CapturedForward.square_sums`` of ``directions_of(logits) -> (v, s)``.
    Returns the sums and the (detached) logits."""
    layers = parameterised_layers(model) if layers is None else layers
    forward = CapturedForward(model, x, layers)
    logits = forward.logits.detach()
    directions, signs = directions_of(logits)
    return forward.square_sums(directions, signs), logits


def exact_diagonal_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str,
                         layers: CurvaturePlan | None = None) -> BatchDiagonal:
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
