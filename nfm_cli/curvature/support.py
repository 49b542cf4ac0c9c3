"""Which models the exact estimator accepts: piecewise linear in each single weight, checked on the graph.

The exact diagonal (``exact.py``) is the Gauss-Newton diagonal, which equals the Hessian diagonal
only when every logit is piecewise linear in any single weight (d^2 f / d theta_i^2 = 0 a.e.).
That holds when (a) every parameter lives in a layer with a rule (``rules.RULES``, looked up by
the EXACT class: a subclass may override ``forward``), (b) each such layer is called once per
forward pass, and (c) everything between the input, the layers and the logits is piecewise linear
in the tensors flowing through it.

(c) is verified, not promised: the model is traced with ``torch.fx`` (rule layers and known
parameter-free modules are leaves, every other container is traced through, so a ResNet block's own
``forward`` is read op by op) and every node must be on an explicit allow-list:

* modules (exact class): ``PIECEWISE_LINEAR_LEAVES`` (ReLU, ReLU6, Hardtanh, LeakyReLU, max/avg/adaptive
  pooling, Flatten, Unflatten, Identity, zero padding, Dropout in eval mode);
* functions and Tensor methods: sums and differences (``+``, ``+=``, ``torch.add``, ``torch.cat``, ...),
  products and quotients by constants only, relu/relu6/hardtanh/leaky_relu/clamp with constant bounds,
  pooling, reshapes and indexing, sums and means, ``dropout`` with ``training=False``; shape queries
  (``x.size(0)``, ``x.shape``) and arithmetic on them are free.

A node is "variable" when it depends on the input (every layer output is); arithmetic on constants
(buffers, shapes) is free. A parameter read outside its layer (``self.fc.weight``) is refused.
Anything else is refused with the module path, its class and the operation, suggesting
``--estimator hutchinson``, which needs no such structure.
"""
from __future__ import annotations

import builtins
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from nfm_cli.curvature.rules import RULES
from nfm_cli.errors import NfmError

# Parameter-free modules that are piecewise linear in their input (in eval mode), by exact class.
PIECEWISE_LINEAR_LEAVES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.ZeroPad1d, nn.ZeroPad2d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
)
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)

# Functions piecewise linear in their first argument (a tensor, or a list of tensors for cat/stack);
# every other argument must be constant (sizes, dims, bounds).
UNARY_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.hardtanh, F.hardtanh_, F.leaky_relu, F.leaky_relu_,
    torch.clamp, torch.clip, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose,
    torch.permute, torch.narrow, torch.chunk, torch.split, torch.t, torch.cat, torch.concat, torch.stack,
    torch.sum, torch.mean, torch.neg, torch.abs, operator.neg, operator.pos, operator.abs, operator.getitem,
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.pad,
}
# Linear in all their tensor arguments together.
SUM_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
# Linear in one argument when every other one is constant; for quotients it must be the numerator.
PRODUCT_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
QUOTIENT_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div}
DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout}

UNARY_METHODS = {
    "relu", "relu_", "clamp", "clamp_", "clip", "clip_", "view", "view_as", "reshape", "reshape_as", "flatten",
    "contiguous", "permute", "transpose", "squeeze", "unsqueeze", "expand", "expand_as", "chunk", "split",
    "narrow", "t", "sum", "mean", "neg", "abs", "__getitem__",
}
SUM_METHODS = {"add", "add_", "sub", "sub_"}
PRODUCT_METHODS = {"mul", "mul_"}
QUOTIENT_METHODS = {"div", "div_"}
# Methods and attributes giving shapes, not values: their results are constants.
SHAPE_METHODS = {"size", "dim", "numel"}
SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}
# Calls on constants only are free, except random draws (a random forward has no fixed Hessian).
RANDOM = {torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like,
          torch.randperm, torch.bernoulli, torch.normal, torch.multinomial, torch.poisson}


def refusal(name: str, module: nn.Module, why: str) -> NfmError:
    """The error refusing ``module`` (at ``name``) for the exact estimator, with the way out."""
    where = f"layer {name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
    return NfmError(f"the exact Hessian diagonal needs a network that is piecewise linear in each weight; "
                    f"{where} {why}; use --estimator hutchinson (or finite-diff) for this model")


class _Tracer(fx.Tracer):
    """Leaves: rule layers, allow-listed modules and any other torch.nn module (refused as a node);
    every other module (nn.Sequential, user and torchvision blocks) is traced through."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        kind = type(module)
        if kind in RULES or kind in PIECEWISE_LINEAR_LEAVES:
            return True
        return kind.__module__.startswith(("torch.nn", "torch.ao.nn")) and kind is not nn.Sequential


def _check_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Per-module checks (exact classes, eval mode, no shared or stray parameters); the rule layers."""
    layers: dict[str, nn.Module] = {}
    owners: dict[int, str] = {}
    seen: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        kind = type(module)
        if kind in RULES:
            if id(module) in seen:
                raise refusal(name, module, f"is the same module as {seen[id(module)]!r} (shared weights "
                                            "are not piecewise linear)")
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if module.training:
                    raise refusal(name, module, "is in training mode (batch statistics); put the model in eval mode")
                if module.running_mean is None:
                    raise refusal(name, module, "uses batch statistics (track_running_stats=False)")
            layers[name] = module
        elif isinstance(module, DROPOUT) and module.training and module.p > 0:
            raise refusal(name, module, "is in training mode (random masks); put the model in eval mode")
        seen.setdefault(id(module), name)
        for pname, param in module.named_parameters(recurse=False):
            if kind not in RULES:
                base = next((k for k in RULES if isinstance(module, k)), None)
                if base is not None:
                    raise refusal(name, module, f"is a subclass of {base.__name__}; the per-layer rules are keyed "
                                                "by the exact class, since a subclass may compute something else")
                raise refusal(name, module, f"has its own parameter {pname!r} outside a supported layer")
            if id(param) in owners and owners[id(param)] != name:
                raise refusal(name, module, f"shares parameter {pname!r} with {owners[id(param)]!r}")
            owners[id(param)] = name
    return layers


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 -- user code may raise anything while traced
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise refusal("", model, f"cannot be traced with torch.fx to verify its forward "
                                 f"({type(exc).__name__}{': ' + detail if detail else ''})") from None


def _qualified(target) -> str:
    try:
        return fx.node._get_qualified_name(target).replace("_operator.", "operator.")
    except Exception:  # noqa: BLE001
        return repr(target)


def _where(node: fx.Node, model: nn.Module) -> tuple[str, nn.Module]:
    """The innermost module whose forward made ``node`` (from fx's module stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path in reversed(list(stack)):
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            continue
    return "", model


def _parts(node: fx.Node, variable: set[fx.Node]) -> tuple[list, list]:
    """Variable input nodes in the first argument (self for methods) and in all the others."""
    first = node.args[0] if node.args else None
    head: list[fx.Node] = []
    fx.node.map_arg(first, lambda n: head.append(n) if n in variable else None)
    rest: list[fx.Node] = []
    fx.node.map_arg((node.args[1:], node.kwargs), lambda n: rest.append(n) if n in variable else None)
    return head, rest


def _dropout_is_off(node: fx.Node) -> bool:
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    return training is False or p == 0


def _operation_problem(node: fx.Node, variable: set[fx.Node]) -> str | None:
    """Why a call_function/call_method node with variable inputs is not piecewise linear (None: it is)."""
    head, rest = _parts(node, variable)
    target = node.target
    if node.op == "call_method":
        if target in SUM_METHODS:
            return None
        if target in PRODUCT_METHODS and len(head) + len(rest) <= 1:
            return None
        if target in QUOTIENT_METHODS and not rest:
            return None
        if target in UNARY_METHODS and (not rest or target in ("view_as", "reshape_as", "expand_as")):
            return None
        return f"calls Tensor.{target} on tensors that depend on the weights (not piecewise linear, or not " \
               "on the list of supported operations)"
    if target in SUM_FUNCTIONS:
        return None
    if target in PRODUCT_FUNCTIONS and len(head) + len(rest) <= 1:
        return None
    if target in QUOTIENT_FUNCTIONS and not rest:
        return None
    if target in DROPOUT_FUNCTIONS and not rest:
        return None if _dropout_is_off(node) else "calls dropout in training mode; put the model in eval mode"
    if target in UNARY_FUNCTIONS and not rest:
        if target is F.pad and node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant") \
                not in ("constant",):
            return "pads with a non-constant mode inside the forward"
        return None
    if target is builtins.getattr and node.args[1] in SHAPE_ATTRIBUTES:
        return None
    return f"calls {_qualified(target)} on tensors that depend on the weights (not piecewise linear, or not " \
           "on the list of supported operations)"


def _produces_constant(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    return (node.target is builtins.getattr and node.args[1] in SHAPE_ATTRIBUTES) or node.target is builtins.len


def _check_graph(model: nn.Module, graph: fx.Graph) -> None:
    """Every node between the input and the logits is on the allow-list (module docstring)."""
    variable: set[fx.Node] = set()
    called: dict[str, int] = {}
    params = dict(model.named_parameters())
    for node in graph.nodes:
        inputs_vary = any(n in variable for n in node.all_input_nodes)
        if node.op == "placeholder":
            variable.add(node)
        elif node.op == "get_attr":
            if node.target in params:
                path, owner = _where(node, model)
                raise refusal(path, owner, f"reads parameter {node.target!r} outside its layer's forward")
        elif node.op == "call_module":
            module = model.get_submodule(node.target)
            kind = type(module)
            if kind in RULES:
                called[node.target] = called.get(node.target, 0) + 1
                if called[node.target] > 1:
                    raise refusal(node.target, module, "is called more than once per forward pass (shared weights)")
            elif kind not in PIECEWISE_LINEAR_LEAVES:
                raise refusal(node.target, module, "is not piecewise linear (or not a supported layer type)")
            variable.add(node)
        elif node.op in ("call_function", "call_method"):
            if not inputs_vary:
                if node.target in RANDOM or node.target in ("uniform_", "normal_", "bernoulli_", "random_"):
                    path, owner = _where(node, model)
                    raise refusal(path, owner, f"draws random numbers ({_qualified(node.target)}) in its forward")
                continue
            if _produces_constant(node):
                continue
            problem = _operation_problem(node, variable)
            if problem is not None:
                path, owner = _where(node, model)
                raise refusal(path, owner, problem)
            variable.add(node)


def parameterised_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: module} of the layers with a rule; raises ``NfmError`` naming the first
    module or operation that keeps the model from being piecewise linear in each weight."""
    layers = _check_modules(model)
    _check_graph(model, _trace(model))
    return layers


def check_exact_supported(model: nn.Module) -> None:
    """Raise ``NfmError`` naming the first layer or operation the exact estimator cannot handle."""
    parameterised_layers(model)


__all__ = ["PIECEWISE_LINEAR_LEAVES", "parameterised_layers", "check_exact_supported", "refusal"]
