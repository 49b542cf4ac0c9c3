"""Samples folded into dimension 0: window attention (Swin) runs on [B * windows, tokens, C] tensors.

The rules of ``rules.py`` take dimension 0 as the samples. Window attention partitions each sample's
feature map into G windows and stacks them along dimension 0, sample-major (timm's and torchvision's
``window_partition``: rows b*G .. (b+1)*G - 1 are sample b's windows), so a parameter's per-sample
gradient (eqs. 5, 17, 25 need its square) is the sum over the G rows of its sample, squared -- not
the sum of the G squares. A use whose outputs have B*G rows (G > 1) is *folded*:

* verified, once per plan, on the first (at most) ``CHECKED_SAMPLES`` samples of the first batch: for
  each sample c and a random direction u_c in its logits, the gradient of <f_c, u_c> at the use's
  outputs is exactly zero outside rows c*G .. (c+1)*G - 1 (no path from another sample's rows to
  sample c's logits). That is the property the rules need, read on the graph's own backward; any other
  order of the rows (window-major, shuffled, mixing samples) is refused naming the layer (the graph is
  traced for the check when forward hooks suffice for the rest);
* ``Linear``/``LayerNorm`` (module or functional, token-wise): the closed forms on [B, G*T, C] views of
  input and output gradient (per-sample gradient = sum over all G*T rows of the sample);
* per-sample rules (relative-position bias tables, torch.nn modules without a closed form): every
  tensor with B*G rows is viewed as [B, G, ...] and the operation is recomputed on one sample's G
  rows (checked once per batch against the recorded output: an operation that does not act row by row
  is refused);
* other rule modules on folded rows (TNT's pixel-patch ``Conv2d``, BatchNorm, ...): the per-sample rule of
  the module (torch.func) on one sample's G rows; functional conv/batch_norm/group_norm/embedding calls
  on folded rows are refused naming the layer.
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from nfm_cli.curvature.graph import CurvaturePlan, Use, module_per_sample_rule, tensor_outputs, trace, unsupported
from nfm_cli.curvature.rules import RULES, LayerNormRule, LayerRule, LinearRule, PerSampleRule

CHECKED_SAMPLES = 3
TOKEN_WISE = ("Linear", "linear", "LayerNorm", "layer_norm")


def groups_of(tensor: torch.Tensor, batch: int) -> int | None:
    """G when ``tensor`` has B*G rows (1: samples along dimension 0), None when it has no such layout."""
    if tensor.ndim == 0 or tensor.shape[0] % batch:
        return None
    return tensor.shape[0] // batch


def folded_uses(model: nn.Module, plan: CurvaturePlan, x: torch.Tensor, outputs: dict[str, object],
                called: list[Use]) -> set[str]:
    """The uses (fx node names) whose outputs hold B*G rows, G > 1, verified sample-major (module
    docstring); refuses a use whose outputs have no batch layout, or whose rows are not sample-major."""
    batch = x.shape[0]
    folded = set()
    for use in called:
        groups = [groups_of(t, batch) for t in tensor_outputs(outputs[use.node])]
        if None in groups:
            raise unsupported(use.path, use.owner, f"has {use.operation} outputs without the samples along "
                                                   "dimension 0")
        if groups and max(groups) > 1:
            folded.add(use.node)
    unchecked = folded - plan.checked_folds
    if unchecked and batch > 1:
        _check_sample_major(model, plan, x[:CHECKED_SAMPLES], {u.node: u for u in called if u.node in unchecked})
    plan.checked_folds |= unchecked
    return folded


class _OutputRecorder(fx.Interpreter):
    """Runs the plan's graph recording the outputs of some nodes (handing on clones, as exact.py does)."""

    def __init__(self, model: nn.Module, graph: fx.Graph, nodes: set[str]):
        super().__init__(model, graph=graph)
        self.model, self.nodes, self.recorded = model, nodes, {}

    def fetch_attr(self, target: str):
        value = self.model
        for atom in target.split("."):
            value = getattr(value, atom)
        return value

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.nodes:
            self.recorded[n.name] = out
            return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
        return out


def _check_sample_major(model: nn.Module, plan: CurvaturePlan, x: torch.Tensor, uses: dict[str, Use]) -> None:
    """Refuse unless sample c's logits reach only rows c*G .. (c+1)*G - 1 of each folded use's outputs."""
    n = x.shape[0]
    recorder = _OutputRecorder(model, plan.graph if plan.graph is not None else trace(model), set(uses))
    with torch.enable_grad():
        logits = recorder.run(x.detach().clone().requires_grad_(True))
        targets = [(node, t) for node in uses for t in tensor_outputs(recorder.recorded[node]) if t.requires_grad]
        gen = torch.Generator().manual_seed(0)
        for c in range(n):
            u = torch.randn(logits.shape[1:], generator=gen, dtype=torch.float64).to(logits)
            grads = torch.autograd.grad((logits[c] * u).sum(), [t for _, t in targets], retain_graph=c < n - 1,
                                        allow_unused=True)
            for (node, _), grad in zip(targets, grads, strict=True):
                if grad is None:
                    continue
                rows = grad.reshape(n, -1)
                if bool((torch.cat([rows[:c], rows[c + 1:]]) != 0).any()):
                    use = uses[node]
                    raise unsupported(use.path, use.owner, f"folds samples into dimension 0 of its {use.operation} "
                                                           "outputs in an order other than sample-major (sample "
                                                           f"{c}'s logits depend on rows of other samples)")


class _Unfolded(LayerRule):
    """A rule run on [B, G, ...] views: ``add`` views each output gradient with B*G rows the same way."""

    def __init__(self, inner: LayerRule, batch: int):
        super().__init__(None, None)
        self.inner, self.batch = inner, batch

    def add(self, grad, sign):
        if isinstance(grad, tuple):
            self.inner.add(tuple(self._view(g) for g in grad), sign)
        else:
            self.inner.add(self._view(grad), sign)

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def result(self):
        return self.inner.result()


class _TokenWise(_Unfolded):
    """Linear / LayerNorm: [B*G, ..., C] -> [B, G*..., C] (the closed forms sum over the middle rows)."""

    def _view(self, t):
        return t.reshape(self.batch, -1, t.shape[-1])


class _Blocks(_Unfolded):
    """Per-sample rules: [B*G, ...] -> [B, G, ...]."""

    def _view(self, t):
        return _block_view(t, self.batch)


def _block_view(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t if t.shape[0] == batch else t.reshape(batch, t.shape[0] // batch, *t.shape[1:])


def folded_rule(use: Use, args, kwargs, values, budget, outputs, batch: int) -> LayerRule:
    """The rule of a folded use (module docstring)."""
    if use.operation in TOKEN_WISE:
        first = args[0]
        viewed = first.reshape(batch, -1, first.shape[-1])
        rule = use.make_rule((viewed, *args[1:]), kwargs, values, budget)
        if not isinstance(rule, (LinearRule, LayerNormRule)):
            raise AssertionError(type(rule))
        return _TokenWise(rule, batch)
    if use.module is not None and type(use.module) in RULES:     # e.g. Conv2d on image patches (TNT)
        rule = module_per_sample_rule(use.module, use.path)(args, kwargs, values, budget)
    else:
        rule = use.make_rule(args, kwargs, values, budget)
    if not isinstance(rule, PerSampleRule):
        raise unsupported(use.path, use.owner, f"calls {use.operation} on samples folded into dimension 0 "
                                               "(windows), which its rule cannot split")
    folded_in = [t.shape[0] != batch for t in rule.inputs]
    folded_out = [t.shape[0] != batch for t in tensor_outputs(outputs)]
    function = rule.function

    def on_blocks(params, *tensors):
        flat = [t.reshape(-1, *t.shape[2:]) if f else t for t, f in zip(tensors, folded_in, strict=True)]
        return tuple(o.unsqueeze(0) if f else o for o, f in zip(function(params, *flat), folded_out, strict=True))
    rule.function = on_blocks
    rule.inputs = [_block_view(t, batch) for t in rule.inputs]
    _check_recomputed(use, rule, outputs, batch)
    return _Blocks(rule, batch)


def _check_recomputed(use: Use, rule: PerSampleRule, outputs, batch: int) -> None:
    """The operation recomputed on each sample's rows must give the recorded output (it acts row by row)."""
    with torch.no_grad():
        again = torch.func.vmap(lambda *ts: rule.function(rule.params, *[t.unsqueeze(0) for t in ts]))(*rule.inputs)
    for got, want in zip(again, tensor_outputs(outputs), strict=True):
        got = got.reshape(want.shape)
        scale = float(want.detach().abs().max()) or 1.0
        if float((got - want.detach()).abs().max()) > 1e-4 * scale:
            raise unsupported(use.path, use.owner, f"calls {use.operation} on samples folded into dimension 0 "
                                                   "(windows) in a way that does not act on each sample's rows "
                                                   "alone")


__all__ = ["folded_uses", "folded_rule", "groups_of", "CHECKED_SAMPLES"]
