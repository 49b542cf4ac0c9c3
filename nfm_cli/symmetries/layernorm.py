"""The LayerNorm scaling symmetry: LN(x) = g * xhat + beta, then Linear layers only.

If every use of a LayerNorm's output is an input of a Linear layer W (possibly after operations that
keep the feature axis: a class-token slice x[:, 0], a mean over tokens, dropout), then for positive
c_j, g_j, beta_j <- c_j g_j, c_j beta_j with column j of every such W <- W[:, j] / c_j leaves the
function unchanged. That holds for the norms of pre-LN blocks (their output feeds attention's Q/K/V
projection or the MLP's first Linear) and the final norm before the head; it never holds on the
residual stream of post-LN blocks, whose norm's output is also added to the next block's output.

The uses are found by recording one forward pass on example inputs (a ``TorchFunctionMode`` sees
every torch operation outside Linear / LayerNorm / MultiheadAttention calls, module hooks see
those), so it works through any Python control flow, torch.fx-traceable or not.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from nfm_cli.symmetries.scaling import Scaling, columns, rows

LEAVES = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention)
MHA_SLOTS = {"query": 0, "key": 1, "value": 2}
# operations through which a per-feature (last axis) scaling passes unchanged
# (elementwise identities; reshapes in row-major order that keep the last axis's size keep every
# feature index in place; the dims of the others must not include the last axis)
_ELEMENTWISE_LINEAR = ("dropout", "clone", "contiguous", "view", "reshape", "flatten", "unflatten")
_AXIS_ARGUMENT = {"mean": 1, "sum": 1, "select": 1, "roll": 2}


@dataclass
class LayerNormConsumers:
    """A LayerNorm whose output only Linear layers consume; the scalings by c (one per feature)."""

    path: str
    consumers: list[str]
    features: int
    scalings: list[Scaling] = field(default_factory=list)


@dataclass
class _Call:
    module: nn.Module | None      # None: a torch function
    func: Any
    args: tuple
    kwargs: dict
    outputs: list[torch.Tensor] = field(default_factory=list)

    def inputs(self) -> list[tuple[Any, torch.Tensor]]:
        pairs = [(i, a) for i, a in enumerate(self.args) if torch.is_tensor(a)]
        return pairs + [(k, v) for k, v in self.kwargs.items() if torch.is_tensor(v)]


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[_Call] = []
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            outs = [t for t in tree_leaves(out) if torch.is_tensor(t)]
            call = _Call(None, func, tuple(args), dict(kwargs), outs)
            if outs and call.inputs():
                self.calls.append(call)
        return out

    def before(self, module, args, kwargs):
        if self.depth == 0:
            self.calls.append(_Call(module, None, tuple(args), dict(kwargs)))
        self.depth += 1

    def after(self, module, args, kwargs, out):
        self.depth -= 1
        if self.depth == 0:
            self.calls[-1].outputs = [t for t in tree_leaves(out) if torch.is_tensor(t)]


@torch.no_grad()
def _record(model: nn.Module, inputs: torch.Tensor) -> tuple[list[_Call], set[int]]:
    recorder = _Recorder()
    handles = []
    for module in model.modules():
        if isinstance(module, LEAVES):
            handles.append(module.register_forward_pre_hook(recorder.before, with_kwargs=True))
            handles.append(module.register_forward_hook(recorder.after, with_kwargs=True))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)   # the fused fast path would skip the module calls
    try:
        with recorder:
            out = model(inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
    return recorder.calls, {id(t) for t in tree_leaves(out) if torch.is_tensor(t)}


def _keeps_features(call: _Call, t: torch.Tensor) -> bool:
    """Whether ``call`` maps a per-feature scaling of its input ``t`` to the same scaling of its output."""
    name = getattr(call.func, "__name__", "")
    if not (call.args and call.args[0] is t) or any(o.shape[-1:] != t.shape[-1:] for o in call.outputs):
        return False
    if name in _ELEMENTWISE_LINEAR:
        return True
    if name == "__getitem__":
        index = call.args[1] if isinstance(call.args[1], tuple) else (call.args[1],)
        return len(index) < t.ndim and all(isinstance(i, (int, slice)) and not isinstance(i, bool) for i in index)
    if name == "pad":  # zeros around the tokens, none on the feature axis
        pad, mode = call.args[1], call.args[2] if len(call.args) > 2 else call.kwargs.get("mode", "constant")
        value = call.args[3] if len(call.args) > 3 else call.kwargs.get("value")
        return tuple(pad[:2]) == (0, 0) and mode == "constant" and not value
    if name == "permute":
        order = call.args[1] if len(call.args) == 2 else call.args[1:]
        return isinstance(order[-1], int) and order[-1] % t.ndim == t.ndim - 1
    dims: Any = call.args[1:3] if name == "transpose" else None
    if name in _AXIS_ARGUMENT:
        at = _AXIS_ARGUMENT[name]
        dims = call.args[at] if len(call.args) > at else call.kwargs.get("dims" if name == "roll" else "dim")
    if dims is None:
        return False
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return bool(dims) and all(isinstance(d, int) and d % t.ndim != t.ndim - 1 for d in dims)


def _consumers(t: torch.Tensor, uses, outputs: set[int], found: list) -> bool:
    """Collect (module, slot) consumers of ``t``; False if any use is something else."""
    if id(t) in outputs or not uses[id(t)]:
        return False
    for call, key in uses[id(t)]:
        if isinstance(call.module, nn.Linear) and key in (0, "input"):
            found.append((call.module, 0))
        elif isinstance(call.module, nn.MultiheadAttention) and MHA_SLOTS.get(key, key) in (0, 1, 2):
            found.append((call.module, MHA_SLOTS.get(key, key)))
        elif call.module is None and _keeps_features(call, t):
            # an identity (dropout in eval mode) may return its input itself: its uses are t's own
            if not all(_consumers(o, uses, outputs, found) for o in call.outputs if o is not t):
                return False
        else:
            return False
    return True


def find_layernorm_consumers(model: nn.Module, inputs: torch.Tensor) -> list[LayerNormConsumers]:
    """Every affine LayerNorm (over one feature axis) whose output only Linear layers (or attention's
    input projections) consume, each of them called once in the forward pass."""
    calls, outputs = _record(model, inputs)
    uses = defaultdict(list)
    for call in calls:
        for key, tensor in call.inputs():
            uses[id(tensor)].append((call, key))
    times_called = Counter(id(c.module) for c in calls if c.module is not None)
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for path, ln in model.named_modules():
        if not isinstance(ln, nn.LayerNorm) or ln.weight is None or len(ln.normalized_shape) != 1:
            continue
        consumers: list = []
        outs = [t for c in calls if c.module is ln for t in c.outputs]
        if not outs or not all(_consumers(t, uses, outputs, consumers) for t in outs):
            continue
        consumers = list(dict.fromkeys((m, slot) for m, slot in consumers))
        if all(times_called[id(m)] == 1 for m, _ in consumers):
            found.append(_plan(path, ln, consumers, names))
    return found


def _plan(path: str, ln: nn.LayerNorm, consumers, names) -> LayerNormConsumers:
    d = ln.normalized_shape[0]
    plan = LayerNormConsumers(path, [], d, rows(ln.weight, 0, d, 1) + rows(ln.bias, 0, d, 1))
    for module, slot in consumers:
        plan.consumers.append(names[id(module)] + ("" if isinstance(module, nn.Linear) else f"[{'qkv'[slot]}]"))
        if isinstance(module, nn.Linear):
            plan.scalings += columns(module.weight, -1)
        elif module.in_proj_weight is not None:
            e = module.embed_dim
            plan.scalings += columns(module.in_proj_weight, -1, slot * e, e)
        else:
            plan.scalings += columns((module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)[slot], -1)
    return plan
