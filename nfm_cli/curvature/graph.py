"""Where each parameter enters the forward pass, read on the traced graph, and the rule of each entry.

The per-sample squares of ``exact.py`` need, for every parameter, the operation through which it enters
the network: its rule turns (that operation's inputs, the gradient at its output) into the per-sample
gradients of the parameter (eqs. 5, 17, 25 need their squares). The operation, not the module class,
decides (issue 20):

* The model is traced with ``torch.fx``. Leaves are modules of a class with a closed-form rule
  (``rules.RULES``, by EXACT class), parameter-free ``torch.nn`` modules, and the ``torch.nn`` modules
  with parameters of ``PER_SAMPLE_MODULES`` (attention, transformer layers, PReLU); every other module
  -- containers, user and library blocks, *subclasses* of torch.nn layers -- is traced through, so a
  subclass whose forward calls ``F.conv2d(x, self.weight)`` is that call plus whatever it does around it.
* Nodes are input-dependent (they depend on the model's input), parameter-derived (on parameters only:
  ``self.cls_token.expand(B, -1, -1)``, ``table[index].permute(...)``) or constant (buffers, shapes).
* A *use* is a leaf module with parameters, or the first node where parameter-derived values meet
  input-dependent ones (``torch.cat([cls, x])``, ``x + pos_embed``, ``x * gamma``, ``F.linear(x, w)``).
  ``F.linear``/``F.conv1d``/``F.conv2d``/``F.batch_norm`` (eval)/``F.layer_norm``/``F.group_norm``/
  ``F.embedding`` on parameters read directly get the closed-form rules; the other uses on the
  ``PER_SAMPLE_FUNCTIONS``/``PER_SAMPLE_METHODS`` lists get ``rules.PerSampleRule`` (per-sample gradients of
  that operation and its parameter-derived inputs by torch.func; samples along dimension 0).
* A parameter with several uses (tied weights, a module called twice, CaiT's class token): one rule over
  the region between the uses (``shared.py``), or refused with the reason. Samples folded into dimension
  0 (Swin's windows): ``folded.py``.
* Refused, with the module path, class and operation: an operation consuming parameters that is on no
  list, batch statistics, Python control flow on tensor values (the graph changes with the input).

Tracing: torch.fx first; where it fails because a module branches on a tensor's *shape* in Python, the
model is traced again with that module as an opaque leaf measured as a whole (``trace``). Anything else
is refused naming the layer, its class, the reason and the line of code. (torch.export / dynamo graphs
were not used: their aten-level graphs have no modules and lifted parameters, so every rule and the
piecewise-linearity allow-list would need a second, aten-keyed form.)
"""
from __future__ import annotations

import builtins
import math
import operator
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from nfm_cli.curvature.rules import (
    RULES,
    BatchNormRule,
    ConvRule,
    EmbeddingRule,
    GroupNormRule,
    LayerNormRule,
    LayerRule,
    LinearRule,
    PerSampleRule,
)
from nfm_cli.errors import NfmError

# torch.nn modules with parameters but no closed form: per-sample gradients of the module alone.
PER_SAMPLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
    nn.PReLU,
)
# Functions / Tensor methods through which a parameter-derived value may enter (samples independent).
PER_SAMPLE_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
    operator.itruediv, operator.matmul, torch.add, torch.sub, torch.mul, torch.div, torch.matmul, torch.cat,
    torch.concat, torch.stack, torch.where, torch.addcmul, torch.baddbmm, torch.bmm, torch.einsum,
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.layer_norm, F.group_norm, F.embedding,
    F.scaled_dot_product_attention, F.prelu,
}
# Library functions (fx leaves: ``torch.fx.wrap``-ed) taking parameters whose samples are independent along
# dimension 0, by qualified name (no import of the library here): torchvision's Swin window attention.
PER_SAMPLE_FUNCTION_NAMES = {"torchvision.models.swin_transformer.shifted_window_attention"}
PER_SAMPLE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "matmul", "__add__", "__mul__"}
# Shape queries: their results are constants even on input-dependent tensors.
SHAPE_METHODS = {"size", "dim", "numel"}
SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}

_FUNCTIONAL_ARGS = {
    F.linear: ("input", "weight", "bias"),
    F.conv1d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
    F.embedding: ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
}
_FUNCTIONAL_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "training": False,
                        "eps": 1e-5, "weight": None, "padding_idx": None, "max_norm": None,
                        "scale_grad_by_freq": False}
_PARAMETER_ARGS = ("weight", "bias")


def unsupported(name: str, module: nn.Module, why: str) -> NfmError:
    """The error refusing a parameter's operation for both exact estimators, with the way out."""
    where = f"layer {name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
    return NfmError(f"the exact and ggn estimators need every parameter to enter through one operation with a "
                    f"rule; {where} {why}; use --estimator hutchinson (or finite-diff) for this model")


class Tracer(fx.Tracer):
    """Leaves: rule layers, per-sample modules and any other torch.nn module (judged as a node), and the
    ``opaque`` modules (paths) that torch.fx could not trace through; every other module (nn.Sequential,
    user, torchvision and timm blocks, subclasses) is traced through. ``failed_at``: the innermost module
    whose forward raised while traced (None: the model's own)."""

    def __init__(self, opaque: frozenset[str] = frozenset()):
        super().__init__()
        self.opaque, self.failed_at, self.branch_on_shape = opaque, None, False

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        kind = type(module)
        if kind in RULES or kind in PER_SAMPLE_MODULES or qualified_name in self.opaque:
            return True
        return kind.__module__.startswith(("torch.nn", "torch.ao.nn")) and kind is not nn.Sequential

    def call_module(self, m: nn.Module, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.path_of_module(m)
            raise

    def to_bool(self, obj: fx.Proxy) -> bool:
        """Python control flow on a traced value: fx refuses it; say whether it was a shape."""
        self.branch_on_shape = _shape_derived(obj.node)
        return super().to_bool(obj)


def _shape_derived(node: fx.Node) -> bool:
    """Whether ``node`` is computed from tensor shapes and constants only (``x.shape[-2] < 7``)."""
    if node.op == "call_method" and node.target in SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is builtins.getattr and node.args[1] in SHAPE_ATTRIBUTES:
        return True
    if node.op != "call_function" or node.target not in _SHAPE_ARITHMETIC:
        return False
    return all(_shape_derived(n) for n in node.all_input_nodes)


_SHAPE_ARITHMETIC = {operator.getitem, operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne,
                     operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.truediv,
                     operator.and_, operator.or_, operator.not_, operator.neg, operator.pow, builtins.len, builtins.min,
                     builtins.max, builtins.abs, builtins.int, builtins.round, math.ceil, math.floor, math.trunc}


MAX_OPAQUE = 16


def trace(model: nn.Module) -> fx.Graph:
    """The model's fx graph (``Tracer``). Where torch.fx cannot trace a module's forward because it
    branches on a tensor's *shape* in Python (timm's ``ConvMlp``: ``if x.shape[-2] < 7``), the model is
    traced again with that module as an opaque leaf (``graph.opaque``: path -> why; ``plan_curvature``
    gives it the per-sample rule of the module as a whole, run on the real input; ``support`` refuses it
    for exact: its operations are not read), up to ``MAX_OPAQUE`` modules. Anything else (branches on
    tensor *values*: the graph changes with the input; untraceable calls; a failure in the model's own
    forward) is ``NfmError`` naming the layer, its class, what failed and the line of code."""
    opaque: dict[str, str] = {}
    while True:
        tracer = Tracer(frozenset(opaque))
        try:
            clear_tensor_caches(model)
            try:
                graph = tracer.trace(model)
            finally:
                clear_tensor_caches(model)
        except Exception as exc:  # noqa: BLE001 -- user code may raise anything while traced
            why = _trace_failure(exc, tracer.branch_on_shape)
            path = tracer.failed_at
            if not path or path in opaque or len(opaque) >= MAX_OPAQUE or not tracer.branch_on_shape:
                where_ = f"layer {path!r} ({type(model.get_submodule(path)).__name__})" if path else \
                    f"the model's own forward ({type(model).__name__})"
                raise unsupported("", model, f"cannot be traced with torch.fx to find where its parameters enter: "
                                             f"{where_} {why}") from None
            opaque[path] = why
            continue
        graph.opaque = opaque
        return graph


def clear_tensor_caches(model: nn.Module) -> None:
    """Empty the tensor caches modules keep in dict attributes (timm's LeViT / EfficientFormer
    ``attention_bias_cache``: biases gathered from a parameter once in eval mode). Traced with a cache
    filled, the parameter's use would be a constant of the graph (its diagonal silently zero); traced
    with it empty, the cache would keep a Proxy of this trace for the next one. Clearing only costs
    the module one recomputation."""
    for module in model.modules():
        for name, value in vars(module).items():
            if name.startswith("_") or not isinstance(value, dict) or not value:
                continue
            if all(isinstance(v, (torch.Tensor, fx.Proxy)) for v in value.values()):
                value.clear()


def _trace_failure(exc: Exception, on_shape: bool) -> str:
    """What failed while tracing, with the line of the model's code that did it (not torch's)."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(torch_dir) and f.filename != __file__]
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    if on_shape:
        text = "branches on a tensor's shape in Python"
    elif "control flow" in text:
        text = "branches on tensor values in Python, so its graph changes with the input"
    else:
        text = f"raises {type(exc).__name__}{': ' + text if text else ''}"
    if frames:
        last = frames[-1]
        name = "/".join(Path(last.filename).parts[-3:])
        text += f" ({name}:{last.lineno}: `{(last.line or '').strip()[:80]}`)"
    return text


def where(node: fx.Node, model: nn.Module) -> tuple[str, nn.Module]:
    """The innermost module whose forward made ``node`` (from fx's module stack)."""
    if node.op == "call_module":
        return node.target, model.get_submodule(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    for path in reversed(list(stack)):
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            continue
    return "", model


def qualified(target) -> str:
    """A node target's readable name ("torch.cat", "Tensor.mul_")."""
    if isinstance(target, str):
        return f"Tensor.{target}"
    try:
        return fx.node._get_qualified_name(target).replace("_operator.", "operator.")
    except Exception:  # noqa: BLE001
        return repr(target)


def fetch(model: nn.Module, target: str) -> Any:
    value = model
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


@dataclass
class Use:
    """Where parameters enter: ``node`` (fx node name, or module path on the hook path), ``path`` and
    ``owner`` (for messages), ``operation`` (e.g. "linear", "conv2d", "torch.cat", "MultiheadAttention"),
    ``params`` {rule's local name: parameter name}, ``make_rule(args, kwargs, values, budget)`` building
    the rule from the recorded call, ``seeds`` (input-dependent nodes whose values a per-sample rule
    needs), ``module`` (set for a leaf module call)."""

    node: str
    path: str
    owner: nn.Module
    operation: str
    params: dict[str, str]
    make_rule: Callable[..., LayerRule]
    seeds: list[str] = field(default_factory=list)
    module: nn.Module | None = None


@dataclass
class CurvaturePlan:
    """The uses of a model's parameters; ``graph`` None when every use is a rule module's call (forward
    hooks suffice), else the fx graph to interpret; ``nonlinear``: why the graph is not piecewise linear
    in each weight (None: it is, and the exact Hessian diagonal is the Gauss-Newton one); ``checked_folds``:
    the uses with samples folded into dimension 0 already verified sample-major (``folded.py``)."""

    model: nn.Module
    uses: list[Use]
    graph: fx.Graph | None
    nonlinear: NfmError | None = None
    checked_folds: set[str] = field(default_factory=set)     # folded uses verified sample-major (folded.py)


def _module_use(node: fx.Node, model: nn.Module) -> Use:
    module = model.get_submodule(node.target)
    kind = type(module)
    params = {local: f"{node.target}.{local}" for local, _ in module.named_parameters()}
    if kind in RULES:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training:
                raise unsupported(node.target, module, "is in training mode (batch statistics); put the model in "
                                                       "eval mode")
            if module.running_mean is None:
                raise unsupported(node.target, module, "uses batch statistics (track_running_stats=False)")
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
            raise unsupported(node.target, module, "renormalises or rescales its rows (max_norm, "
                                                   "scale_grad_by_freq)")
        rule = RULES[kind]
        return Use(node.name, node.target, module, kind.__name__, params,
                   lambda args, kwargs, values, budget: rule(module, args[0], budget), module=module)
    opaque = getattr(node.graph, "opaque", {})
    if node.target in opaque:
        return Use(node.name, node.target, module, f"{kind.__name__} (as a whole: torch.fx cannot trace it)",
                   {k: k for k in params.values()}, _opaque_rule(module, node.target), module=module)
    if kind in PER_SAMPLE_MODULES:
        if getattr(module, "batch_first", True) is False:
            raise unsupported(node.target, module, "has batch_first=False (the rules need samples along "
                                                   "dimension 0); build it with batch_first=True")
        return Use(node.name, node.target, module, kind.__name__, {k: k for k in params.values()},
                   module_per_sample_rule(module, node.target), module=module)
    raise unsupported(node.target, module, "has parameters but no rule for its class")


def module_per_sample_rule(module: nn.Module, path: str):
    """``make_rule`` of a module as a whole: ``PerSampleRule`` of ``functional_call(module)`` on the
    recorded call's tensors (parameters named ``path.local``)."""
    local = {f"{path}.{k}": k for k, _ in module.named_parameters()}

    def make(args, kwargs, values, budget):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

        def function(params, *tensors):
            filled = list(leaves)
            for i, t in zip(positions, tensors, strict=True):
                filled[i] = t
            call_args, call_kwargs = pytree.tree_unflatten(filled, spec)
            out = functional_call(module, {local[k]: v for k, v in params.items()}, call_args, call_kwargs)
            return tensor_outputs(out)
        params = dict(module.named_parameters())
        return PerSampleRule(function, {f"{path}.{k}": v for k, v in params.items()},
                             [leaves[i] for i in positions])
    return make


class _GuardedRule(LayerRule):
    """A per-sample rule of an opaque module: vmap refuses data-dependent Python control flow; that is
    reported as the module's refusal (the graph changes with the input), not as vmap's traceback."""

    def __init__(self, inner: LayerRule, path: str, module: nn.Module):
        super().__init__(None, None)
        self.inner, self.path, self.module = inner, path, module

    def add(self, grad, sign):
        try:
            self.inner.add(grad, sign)
        except RuntimeError as exc:
            if "data-dependent control flow" not in str(exc) and ".item()" not in str(exc):
                raise
            raise unsupported(self.path, self.module, "branches on tensor values in its forward (its graph "
                                                      "changes with the input), which neither torch.fx nor the "
                                                      "per-sample rule can follow") from None

    def result(self):
        return self.inner.result()


def _opaque_rule(module: nn.Module, path: str):
    make = module_per_sample_rule(module, path)
    return lambda args, kwargs, values, budget: _GuardedRule(make(args, kwargs, values, budget), path, module)


def tensor_outputs(out) -> tuple[torch.Tensor, ...]:
    """The tensors of an operation's output (a tensor, or a tuple such as attention's (output, weights))."""
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _functional_arguments(node: fx.Node) -> dict[str, Any]:
    names = _FUNCTIONAL_ARGS[node.target]
    values = dict(_FUNCTIONAL_DEFAULTS)
    values.update(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


def _closed_form_use(node: fx.Node, model: nn.Module, parameter_of: dict[fx.Node, str]) -> Use | None:
    """The closed-form rule of F.linear/conv/batch_norm/layer_norm/group_norm/embedding when their
    parameters are read directly (``self.weight``), else None (the per-sample rule takes it)."""
    if node.op != "call_function" or node.target not in _FUNCTIONAL_ARGS:
        return None
    a = _functional_arguments(node)
    direct = {k: parameter_of.get(a[k]) for k in _PARAMETER_ARGS if k in a and isinstance(a[k], fx.Node)}
    if None in direct.values() or not direct:
        return None
    others = [v for k, v in a.items() if k not in _PARAMETER_ARGS and k != "input"]
    if any(isinstance(v, fx.Node) and v in parameter_of for v in others):
        return None
    path, owner = where(node, model)
    named = dict(model.named_parameters())
    weight = named[direct["weight"]] if "weight" in direct else None
    bias = named[direct["bias"]] if "bias" in direct else None
    target = node.target
    if target is F.batch_norm:
        if a["training"] is not False or not isinstance(a["running_mean"], fx.Node):
            raise unsupported(path, owner, "calls batch_norm with batch statistics; put the model in eval mode")
        mean, var = fetch(model, a["running_mean"].target), fetch(model, a["running_var"].target)
        shim, rule = SimpleNamespace(running_mean=mean, running_var=var, eps=a["eps"], weight=weight, bias=bias), \
            BatchNormRule
    elif target is F.linear:
        shim, rule = SimpleNamespace(weight=weight, bias=bias), LinearRule
    elif target in (F.conv1d, F.conv2d):
        shim, rule = _conv_shim(target, weight, bias, a), ConvRule
    elif target is F.layer_norm:
        shim, rule = SimpleNamespace(normalized_shape=tuple(a["normalized_shape"]), eps=a["eps"], weight=weight,
                                     bias=bias), LayerNormRule
    elif target is F.group_norm:
        shim, rule = SimpleNamespace(num_groups=a["num_groups"], eps=a["eps"], weight=weight, bias=bias), GroupNormRule
    else:
        if a["max_norm"] is not None or a["scale_grad_by_freq"]:
            raise unsupported(path, owner, "calls embedding with max_norm or scale_grad_by_freq")
        pad = a["padding_idx"]
        pad = pad + weight.shape[0] if pad is not None and pad < 0 else pad
        shim, rule = SimpleNamespace(weight=weight, padding_idx=pad), EmbeddingRule
    operation = qualified(target).rsplit(".", 1)[-1]
    return Use(node.name, path, owner, operation, {k: v for k, v in direct.items()},
               lambda args, kwargs, values, budget: rule(shim, args[0], budget))


def _conv_shim(target, weight: nn.Parameter, bias, a: dict[str, Any]) -> nn.Module:
    """An nn.Conv1d/2d on the meta device holding the call's parameters and hyper-parameters, for ConvRule."""
    kind = nn.Conv1d if target is F.conv1d else nn.Conv2d
    groups = a["groups"]
    shim = kind(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=a["stride"],
                padding=a["padding"], dilation=a["dilation"], groups=groups, bias=bias is not None, device="meta")
    shim.weight = weight
    if bias is not None:
        shim.bias = bias
    return shim


_IN_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
             operator.itruediv: operator.truediv}


def evaluate(nodes: list[fx.Node], env: dict[fx.Node, Any], model: nn.Module, params: dict[str, torch.Tensor]):
    """Run ``nodes`` (in order) on ``env``, parameters taken from ``params`` (in-place forms out of place)."""
    for n in nodes:
        if n.op == "get_attr":
            env[n] = params[n.target] if n.target in params else fetch(model, n.target)
            continue
        args = fx.node.map_arg(n.args, env.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
        if n.op == "call_function":
            env[n] = _IN_PLACE.get(n.target, n.target)(*args, **kwargs)
        elif n.op == "call_method":
            name = n.target[:-1] if n.target.endswith("_") and not n.target.endswith("__") else n.target
            env[n] = getattr(args[0], name)(*args[1:], **kwargs)
        elif n.op == "call_module":
            module = model.get_submodule(n.target)
            local = {k: params.get(f"{n.target}.{k}", v) for k, v in module.named_parameters()}
            env[n] = functional_call(module, local, args, kwargs)
        else:
            raise AssertionError(n.op)
    return env


def _per_sample_use(node: fx.Node, model: nn.Module, input_dependent: set[fx.Node],
                    parameters_of: dict[fx.Node, set[str]]) -> Use:
    """The per-sample rule of an operation where parameter-derived values meet input-dependent ones:
    it recomputes the parameter-derived inputs from the parameters, and the operation, per sample."""
    path, owner = where(node, model)
    allowed = (node.target in PER_SAMPLE_METHODS) if node.op == "call_method" else (
        node.target in PER_SAMPLE_FUNCTIONS or qualified(node.target) in PER_SAMPLE_FUNCTION_NAMES)
    if not allowed:
        raise unsupported(path, owner, f"passes parameters to {qualified(node.target)}, an operation without "
                                       "a rule")
    names = sorted(set().union(*(parameters_of.get(n, set()) for n in node.all_input_nodes)))
    seeds, make = recomputed_rule(model, node, lambda n: n is not node and n in input_dependent, names)
    return Use(node.name, path, owner, qualified(node.target), {n: n for n in names}, make,
               seeds=[s.name for s in seeds])


def recomputed_rule(model: nn.Module, end: fx.Node, is_seed, names: list[str]):
    """(seeds, make): the nodes ``end`` is recomputed from (the first ones met walking back from it for
    which ``is_seed`` holds: input-dependent values outside the recomputed part) and a rule factory
    whose PerSampleRule recomputes ``end`` from them and the parameters ``names``, per sample."""
    order: list[fx.Node] = []
    seeds: list[fx.Node] = []
    seen: set[fx.Node] = set()

    def visit(n: fx.Node) -> None:
        if n in seen:
            return
        seen.add(n)
        if is_seed(n):
            seeds.append(n)
            return
        for m in n.all_input_nodes:
            visit(m)
        order.append(n)
    visit(end)

    def make(args, kwargs, values, budget):
        def function(params, *tensors):
            env = evaluate(order, dict(zip(seeds, tensors, strict=True)), model, params)
            return tensor_outputs(env[end])
        named = dict(model.named_parameters())
        return PerSampleRule(function, {n: named[n] for n in names}, [values[s.name] for s in seeds])
    return seeds, make


def _produces_constant(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    return node.op == "call_function" and (
        (node.target is builtins.getattr and node.args[1] in SHAPE_ATTRIBUTES) or node.target is builtins.len)


def plan_curvature(model: nn.Module, graph: fx.Graph | None = None) -> CurvaturePlan:
    """The uses of ``model``'s parameters (module docstring), or ``NfmError`` naming what has no rule."""
    graph = trace(model) if graph is None else graph
    params = dict(model.named_parameters())
    input_dependent: set[fx.Node] = set()
    parameters_of: dict[fx.Node, set[str]] = {}      # parameter-derived nodes -> their parameters
    parameter_of: dict[fx.Node, str] = {}            # get_attr nodes of parameters
    uses: list[Use] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            input_dependent.add(node)
            continue
        if node.op == "get_attr":
            if node.target in params:
                parameter_of[node] = node.target
                parameters_of[node] = {node.target}
            continue
        if node.op == "output" or _produces_constant(node):
            continue
        varying = any(n in input_dependent for n in node.all_input_nodes)
        derived = set().union(*(parameters_of.get(n, set()) for n in node.all_input_nodes))
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if any(True for _ in module.parameters()):
                if not varying:
                    derived |= {f"{node.target}.{k}" for k, _ in module.named_parameters()}
                elif derived:
                    raise unsupported(node.target, module, "is called on parameters and activations together")
                else:
                    uses.append(_module_use(node, model))
        if varying and derived and node.op != "call_module":
            use = _closed_form_use(node, model, parameter_of)
            uses.append(use if use is not None else _per_sample_use(node, model, input_dependent, parameters_of))
        if varying:
            input_dependent.add(node)
        elif derived:
            parameters_of[node] = derived
    from nfm_cli.curvature.shared import merge_shared_uses  # it imports this module
    uses = merge_shared_uses(model, graph, uses, input_dependent, _produces_constant)
    _check_single_uses(model, uses)
    hooks_suffice = all(u.module is not None and type(u.module) in RULES for u in uses)
    return CurvaturePlan(model, uses, None if hooks_suffice else graph)


def _check_single_uses(model: nn.Module, uses: list[Use]) -> None:
    """Each parameter and each leaf module enters once (shared weights: per-sample gradients would be
    sums over the uses, squared -- not formed by these rules)."""
    called: dict[int, str] = {}
    for use in uses:
        if use.module is not None:
            if id(use.module) in called:
                raise unsupported(use.path, use.module, "is called more than once per forward pass (shared weights)")
            called[id(use.module)] = use.path
    first: dict[str, Use] = {}
    for use in uses:
        for name in use.params.values():
            if name in first:
                before = first[name]
                raise unsupported(use.path, use.owner, f"uses parameter {name!r} already used by {before.operation} "
                                                       f"at {before.path!r} (shared weights: the per-sample gradient "
                                                       "would be the sum of both uses)")
            first[name] = use

__all__ = ["PER_SAMPLE_MODULES", "PER_SAMPLE_FUNCTIONS", "PER_SAMPLE_FUNCTION_NAMES", "PER_SAMPLE_METHODS", "Tracer",
           "Use", "CurvaturePlan", "plan_curvature", "module_per_sample_rule", "trace", "where", "qualified",
           "unsupported", "tensor_outputs", "evaluate", "clear_tensor_caches"]
