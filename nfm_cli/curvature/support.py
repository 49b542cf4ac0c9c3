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
  pooling, Flatten, Unflatten, Identity, zero padding, Dropout in eval mode; Upsample (any mode: a fixed
  interpolation is linear in its input), Unfold, Fold);
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

from nfm_cli.curvature.graph import PER_SAMPLE_MODULES, CurvaturePlan, plan_curvature, qualified, trace, where
from nfm_cli.curvature.rules import PIECEWISE_LINEAR_RULES, RULES
from nfm_cli.errors import NfmError

# Parameter-free modules that are piecewise linear in their input (in eval mode), by exact class.
PIECEWISE_LINEAR_LEAVES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.ZeroPad1d, nn.ZeroPad2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.Unfold, nn.Fold,   # linear in the input
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
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.pad, F.interpolate, F.unfold, F.fold,
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
# Linear in their parameters (read directly or derived) and piecewise linear in the input (eval mode).
LINEAR_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.batch_norm, F.embedding}
# Calls on constants only are free, except random draws (a random forward has no fixed Hessian).
RANDOM = {torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like,
          torch.randperm, torch.bernoulli, torch.normal, torch.multinomial, torch.poisson}


def refusal(name: str, module: nn.Module, why: str) -> NfmError:
    """The error refusing ``module`` (at ``name``) for the exact estimator, with the way out."""
    where = f"layer {name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
    return NfmError(f"the exact Hessian diagonal needs a network that is piecewise linear in each weight; "
                    f"{where} {why}; use --estimator hutchinson (or finite-diff) for this model")


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


def _operation_problem(node: fx.Node, variable: set[fx.Node], input_dependent: set[fx.Node]) -> str | None:
    """Why a call_function/call_method node with variable inputs is not piecewise linear (None: it is).
    A product is piecewise linear in each single weight when at most one factor depends on the input
    (``x * gamma``: the parameter-derived factor's weights enter nowhere else, ``graph.py``)."""
    head, rest = _parts(node, variable)
    target = node.target
    factors = len([n for n in head + rest if n in input_dependent]) + (
        1 if not any(n in input_dependent for n in head + rest) else 0)
    if node.op == "call_method":
        if target in SUM_METHODS:
            return None
        if target in PRODUCT_METHODS and (len(head) + len(rest) <= 1 or factors <= 1):
            return None
        if target in QUOTIENT_METHODS and not rest:
            return None
        if target in UNARY_METHODS and (not rest or target in ("view_as", "reshape_as", "expand_as")):
            return None
        return f"calls Tensor.{target} on tensors that depend on the weights (not piecewise linear, or not " \
               "on the list of supported operations)"
    if target in SUM_FUNCTIONS:
        return None
    if target in PRODUCT_FUNCTIONS and (len(head) + len(rest) <= 1 or factors <= 1):
        return None
    if target in LINEAR_FUNCTIONS and all(n not in input_dependent for n in rest):
        if target is F.batch_norm and _functional_training(node):
            return "calls batch_norm with batch statistics; put the model in eval mode"
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
    return f"calls {qualified(target)} on tensors that depend on the weights (not piecewise linear, or not " \
           "on the list of supported operations)"


def _functional_training(node: fx.Node) -> bool:
    return node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False) is not False


def _produces_constant(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    return (node.target is builtins.getattr and node.args[1] in SHAPE_ATTRIBUTES) or node.target is builtins.len


def _check_graph(model: nn.Module, graph: fx.Graph) -> None:
    """Every node between the input, the parameters and the logits is on the allow-list (module docstring)."""
    variable: set[fx.Node] = set()            # depends on the input or on parameters
    input_dependent: set[fx.Node] = set()
    params = dict(model.named_parameters())
    for node in graph.nodes:
        inputs_vary = any(n in variable for n in node.all_input_nodes)
        if node.op == "placeholder":
            variable.add(node)
            input_dependent.add(node)
        elif node.op == "get_attr":
            if node.target in params:
                variable.add(node)
        elif node.op == "call_module":
            module = model.get_submodule(node.target)
            kind = type(module)
            if node.target in getattr(graph, "opaque", {}):
                raise refusal(node.target, module, f"cannot be checked piecewise linear: torch.fx cannot trace "
                                                   f"its forward ({graph.opaque[node.target]})")
            if kind in RULES and kind not in PIECEWISE_LINEAR_RULES or kind in PER_SAMPLE_MODULES:
                raise refusal(node.target, module, "is not piecewise linear in its input")
            if kind not in RULES and kind not in PIECEWISE_LINEAR_LEAVES:
                raise refusal(node.target, module, "is not piecewise linear (or not a supported layer type)")
            variable.add(node)
            input_dependent.add(node)
        elif node.op in ("call_function", "call_method"):
            if not inputs_vary:
                if node.target in RANDOM or node.target in ("uniform_", "normal_", "bernoulli_", "random_"):
                    path, owner = where(node, model)
                    raise refusal(path, owner, f"draws random numbers ({qualified(node.target)}) in its forward")
                continue
            if _produces_constant(node):
                continue
            problem = _operation_problem(node, variable, input_dependent)
            if problem is not None:
                path, owner = where(node, model)
                raise refusal(path, owner, problem)
            variable.add(node)
            if any(n in input_dependent for n in node.all_input_nodes):
                input_dependent.add(node)


def _check_dropout(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, DROPOUT) and module.training and module.p > 0:
            raise refusal(name, module, "is in training mode (random masks); put the model in eval mode")


def piecewise_linear_problem(model: nn.Module, graph: fx.Graph) -> NfmError | None:
    """Why the traced ``graph`` is not piecewise linear in each weight, as the error ``exact`` raises
    (None: it is, and the Gauss-Newton diagonal is the Hessian diagonal)."""
    try:
        _check_graph(model, graph)
    except NfmError as problem:
        return problem
    return None


def curvature_plan(model: nn.Module) -> CurvaturePlan:
    """The parameter uses (``graph.plan_curvature``) with ``nonlinear`` filled in; raises ``NfmError``
    for what neither exact estimator can handle (a parameter without a rule, dropout in training mode...)."""
    _check_dropout(model)
    graph = trace(model)
    plan = plan_curvature(model, graph)
    plan.nonlinear = piecewise_linear_problem(model, graph)
    shared = [u for u in plan.uses if u.operation.endswith("(shared parameters)")]
    if plan.nonlinear is None and shared:
        plan.nonlinear = refusal(shared[0].path, shared[0].owner, f"uses parameters at several operations "
                                 f"({shared[0].operation.replace(' (shared parameters)', '')}: shared weights), so "
                                 "the logits are not piecewise linear in them")
    return plan


def parameterised_layers(model: nn.Module) -> CurvaturePlan:
    """The plan of the exact Hessian estimator; raises ``NfmError`` naming the first module or operation
    that keeps the model from being piecewise linear in each weight."""
    plan = curvature_plan(model)
    if plan.nonlinear is not None:
        raise plan.nonlinear
    return plan


def check_exact_supported(model: nn.Module) -> None:
    """Raise ``NfmError`` naming the first layer or operation the exact estimator cannot handle."""
    parameterised_layers(model)


def check_ggn_supported(model: nn.Module) -> None:
    """Raise ``NfmError`` naming the first parameter operation the ggn estimator has no rule for."""
    curvature_plan(model)

__all__ = ["PIECEWISE_LINEAR_LEAVES", "parameterised_layers", "check_exact_supported", "check_ggn_supported",
           "curvature_plan", "piecewise_linear_problem", "refusal"]
