"""``nfm rescale``: function-preserving reparametrizations that flatness measures should not notice.

- ``layer`` (Dinh et al., 2017): W_k, b_k <- alpha W_k, alpha b_k and W_{k+1} <- W_{k+1} / alpha for
  two weight layers joined by ReLU (positive homogeneity: relu(alpha z) = alpha relu(z)).
- ``neuron`` (Sec. 5.1, eqs. 15-16, Appendix A.1): W_k[i, :], b_k[i] <- W_k[i, :] / alpha_i, b_k[i] / alpha_i
  and W_{k+1}[:, i] <- alpha_i W_{k+1}[:, i] for every hidden unit i of every such pair (for a conv
  followed by Flatten, unit i is a channel and owns a block of the next layer's columns).
- ``bn``: a convolution whose only consumer is a BatchNorm: output channel c of the conv scaled by
  alpha_c, the running mean by alpha_c, the running variance by alpha_c^2, and the BN weight by
  sqrt(alpha_c^2 v + eps) / (alpha_c sqrt(v + eps)), which makes the eval-mode function exactly
  the same (BN's eps would otherwise break it slightly).
- ``attention`` and ``layernorm``: the transformer symmetries of ``nfm_cli.symmetries`` (per head
  dimension, query x a / key x 1/a and value x b / output column x 1/b; a LayerNorm's gain and bias
  x c with the input columns of the Linear layers that alone consume it x 1/c).
- ``all``: every one of ``attention``, ``layernorm``, ``neuron`` and ``bn`` that the model has, in
  that order, each drawing the factors it would draw alone.

Layers and their connections come from a torch.fx trace of the model, so any registered model works.
The result is checked on a batch of training inputs (max abs difference of the logits reported).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from nfm_cli.choices import RESCALE_MODES as MODES
from nfm_cli.errors import NfmError
from nfm_cli.measures.matrices import RESCALABLE
from nfm_cli.runtime.rng import keyed_generator
from nfm_cli.store.artifacts import write_artifact
from nfm_cli.store.checkpoint import Checkpoint, load_checkpoint
from nfm_cli.symmetries.attention import KNOWN_NAMES, find_attention
from nfm_cli.symmetries.layernorm import find_layernorm_consumers
from nfm_cli.symmetries.scaling import apply_scalings

WEIGHT_LAYERS = RESCALABLE         # measures.matrices: the layers rescaled neuron by neuron
# modules f with f(alpha x) = alpha f(x) for alpha > 0, applied per channel
HOMOGENEOUS = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity)
CHECK_SAMPLES = 256
STRUCTURE_SAMPLES = 4  # inputs of the forward pass that finds what consumes each LayerNorm


@dataclass
class WeightPair:
    """Weight layer ``first`` feeding ``second`` through homogeneous ops only (maybe a Flatten)."""

    first: str
    second: str
    flattened: bool


@dataclass
class RescaleResult:
    path: Path
    mode: str
    touched: list[str]
    max_abs_diff: float
    max_abs_logit: float


def _trace(model: nn.Module) -> tuple[fx.GraphModule, dict[str, nn.Module]]:
    try:
        graph = fx.symbolic_trace(model)
    except Exception as exc:
        raise NfmError(f"cannot trace the model to find its layers ({type(exc).__name__}); "
                       "nfm rescale needs an fx-traceable model") from None
    return graph, dict(model.named_modules())


def _module(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def weight_pairs(model: nn.Module) -> list[WeightPair]:
    """Pairs of weight layers joined only by ReLU/pooling/Flatten, in network order."""
    graph, modules = _trace(model)
    pairs = []
    for node in graph.graph.nodes:
        if not isinstance(_module(node, modules), WEIGHT_LAYERS):
            continue
        current, flattened = node, False
        while len(current.users) == 1:
            (user,) = current.users
            mod = _module(user, modules)
            if isinstance(mod, WEIGHT_LAYERS):
                pairs.append(WeightPair(node.target, user.target, flattened))
                break
            if isinstance(mod, (HOMOGENEOUS, nn.Flatten)):
                flattened = flattened or isinstance(mod, nn.Flatten)
                current = user
                continue
            break
    return pairs


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batchnorm) pairs where the BatchNorm is the conv output's only consumer."""
    graph, modules = _trace(model)
    pairs = []
    for node in graph.graph.nodes:
        if isinstance(_module(node, modules), nn.Conv2d) and len(node.users) == 1:
            (user,) = node.users
            if isinstance(_module(user, modules), nn.BatchNorm2d):
                pairs.append((node.target, user.target))
    return pairs


def _factors(count: int, alpha: float | None, random_range, gen: torch.Generator) -> torch.Tensor:
    if alpha is not None:
        return torch.full((count,), float(alpha), dtype=torch.float64)
    lo, hi = random_range
    return lo + (hi - lo) * torch.rand(count, generator=gen, dtype=torch.float64)


def check_rescale_options(mode: str, alpha: float | None, random_range) -> None:
    """Refuse bad options before any work (``rescale_checkpoint`` calls it before loading data)."""
    if mode not in MODES:
        raise NfmError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if (alpha is None) == (random_range is None):
        raise NfmError("give exactly one of alpha (a factor) or random_range (LO, HI)")
    if alpha is not None and not (alpha > 0 and math.isfinite(alpha)):
        raise NfmError(f"alpha must be a positive number, not {alpha}")
    if random_range is not None:
        lo, hi = random_range
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise NfmError(f"random_range needs 0 < LO <= HI, not {lo} {hi}")


@torch.no_grad()
def rescale_model(model: nn.Module, mode: str, *, alpha: float | None = None,
                  random_range: tuple[float, float] | None = None, seed: int = 0, pair: int = 0,
                  inputs: torch.Tensor | None = None) -> list[str]:
    """Apply the ``mode`` reparametrization in place; returns the names of the layers touched.

    ``inputs`` (a few example inputs) are needed by the modes that look at LayerNorms (``layernorm``,
    and ``all`` on a model with a LayerNorm): their consumers are found by running the model once.
    ``all`` applies ``attention``, ``layernorm``, ``neuron`` and ``bn`` in turn, each that the model
    has, each with the factors that mode alone would draw for ``seed``.
    """
    check_rescale_options(mode, alpha, random_range)

    def draws(sub: str):
        gen = keyed_generator(seed, "rescale", sub)
        return lambda count: _factors(count, alpha, random_range, gen)

    if mode == "all":
        return _rescale_all(model, draws, inputs)
    if mode == "layer":
        return _rescale_layer(model, draws(mode), pair)
    return _SYMMETRIES[mode](model, draws(mode), inputs)


def _rescale_all(model: nn.Module, draws, inputs) -> list[str]:
    kinds = {type(m) for m in model.modules()}
    if inputs is None and any(issubclass(k, nn.LayerNorm) for k in kinds):
        raise NfmError("mode all on a model with LayerNorm needs example inputs (inputs=...)")
    has = {"attention": lambda: bool(find_attention(model)),
           "layernorm": lambda: inputs is not None and bool(find_layernorm_consumers(model, inputs)),
           "neuron": lambda: nn.ReLU in kinds and bool(weight_pairs(model)),
           "bn": lambda: nn.BatchNorm2d in kinds and bool(conv_bn_pairs(model))}
    touched: list[str] = []
    for sub, present in has.items():   # in this order, each only where the model has it
        if present():
            touched += _SYMMETRIES[sub](model, draws(sub), inputs)
    if not touched:
        raise NfmError("the model has none of the symmetries nfm knows (attention heads, LayerNorm feeding "
                       "Linear layers, ReLU-joined weight layers, convolutions feeding BatchNorm)")
    return list(dict.fromkeys(touched))


def _rescale_attention(model: nn.Module, draw, inputs) -> list[str]:
    """Per head dimension j: query x a_j, key x 1/a_j; value x b_j, output column x 1/b_j."""
    found = find_attention(model)
    if not found:
        raise NfmError(f"the model has no attention module that nfm knows ({KNOWN_NAMES}); use mode "
                       "layernorm, neuron, layer or bn")
    for heads in found:
        apply_scalings(heads.qk, draw(heads.width))
        apply_scalings(heads.vo, draw(heads.width))
    return [heads.path for heads in found]


def _rescale_layernorm(model: nn.Module, draw, inputs) -> list[str]:
    """LayerNorm gain and bias x c_j, input column j of the Linear layers consuming it x 1/c_j."""
    if inputs is None:
        raise NfmError("mode layernorm needs example inputs (rescale_model(..., inputs=x)) to find what "
                       "consumes each LayerNorm")
    found = find_layernorm_consumers(model, inputs)
    if not found:
        raise NfmError("the model has no LayerNorm whose output only Linear layers consume (pre-LN blocks, "
                       "the final norm before the head); use mode attention, neuron, layer or bn")
    touched: list[str] = []
    for norm in found:
        apply_scalings(norm.scalings, draw(norm.features))
        touched += [norm.path] + norm.consumers
    return touched


def _rescale_bn(model: nn.Module, draw, inputs) -> list[str]:
    pairs = conv_bn_pairs(model)
    if not pairs:
        raise NfmError("the model has no convolution feeding a BatchNorm; use mode layer or neuron")
    modules = dict(model.named_modules())
    touched: list[str] = []
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        a = draw(conv.out_channels)
        _scale_rows(conv, a)
        var = bn.running_var.detach().double().clone()
        bn.running_mean.mul_(a.to(bn.running_mean.dtype))
        bn.running_var.copy_(var * a ** 2)
        if bn.weight is not None:
            ratio = torch.sqrt(a ** 2 * var + bn.eps) / (a * torch.sqrt(var + bn.eps))
            bn.weight.mul_(ratio.to(bn.weight.dtype))
        touched += [conv_name, bn_name]
    return touched


def _relu_pairs(model: nn.Module) -> list[WeightPair]:
    pairs = weight_pairs(model)
    if not pairs:
        raise NfmError("the model has no two weight layers joined by ReLU/pooling; try mode bn")
    return pairs


def _rescale_layer(model: nn.Module, draw, pair: int) -> list[str]:
    pairs = _relu_pairs(model)
    if not 0 <= pair < len(pairs):
        raise NfmError(f"pair must be in [0, {len(pairs) - 1}] for this model, not {pair}")
    chosen = pairs[pair]
    modules = dict(model.named_modules())
    first, second = modules[chosen.first], modules[chosen.second]
    a = float(draw(1)[0])
    first.weight.mul_(a)
    if first.bias is not None:
        first.bias.mul_(a)
    second.weight.div_(a)
    return [chosen.first, chosen.second]


def _rescale_neuron(model: nn.Module, draw, inputs) -> list[str]:
    modules = dict(model.named_modules())
    touched: list[str] = []
    for p in _relu_pairs(model):
        first, second = modules[p.first], modules[p.second]
        scale_units(first, second, draw(first.weight.shape[0]))
        touched += [p.first, p.second]
    return list(dict.fromkeys(touched))


_SYMMETRIES = {"attention": _rescale_attention, "layernorm": _rescale_layernorm, "neuron": _rescale_neuron,
               "bn": _rescale_bn}


@torch.no_grad()
def scale_units(first: nn.Module, second: nn.Module, factors: torch.Tensor) -> None:
    """Eqs. (15)-(16): row i of ``first`` (and its bias) divided by factors[i], the inputs of
    ``second`` that unit i feeds (one column, or a block of columns after a Flatten) multiplied."""
    units = first.weight.shape[0]
    cols = factors.to(torch.float64)
    if second.weight.shape[1] != units:  # conv channel -> Flatten -> Linear: a block per channel
        cols = cols.repeat_interleave(second.weight.shape[1] // units)
    _scale_rows(first, 1.0 / factors.to(torch.float64))
    shape = [1, -1] + [1] * (second.weight.ndim - 2)
    second.weight.mul_(cols.view(shape).to(second.weight.dtype))


def _scale_rows(layer: nn.Module, factors: torch.Tensor) -> None:
    shape = [-1] + [1] * (layer.weight.ndim - 1)
    layer.weight.mul_(factors.view(shape).to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.mul_(factors.to(layer.bias.dtype))


def rescale_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, mode: str, *,
                       alpha: float | None = None, random_range: tuple[float, float] | None = None,
                       seed: int = 0, pair: int = 0, data_dir=None) -> RescaleResult:
    """Write a rescaled copy of ``checkpoint`` to ``out`` after checking the function is unchanged."""
    out = Path(out)
    check_rescale_options(mode, alpha, random_range)
    if out.resolve() == Path(checkpoint).resolve():
        raise NfmError("the output must differ from the input checkpoint (rescale never overwrites it)", out)
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir() or not folder.is_dir():
        raise NfmError("the output must be a file in an existing folder", out)
    # rescale in float64 and round once when saving: every stored value is the correctly rounded
    # rescaled value (rescaling in float32 compounds roundings the measures can pick up)
    ck: Checkpoint = load_checkpoint(checkpoint, data_dir=data_dir, dtype=torch.float64)
    x, _ = ck.training_tensors()
    x = x[:CHECK_SAMPLES]
    stored = {k: v.dtype for k, v in ck.artifact.tensors.items() if k.startswith("model.")}
    with torch.no_grad():
        before = ck.model(x)
    touched = rescale_model(ck.model, mode, alpha=alpha, random_range=random_range, seed=seed, pair=pair,
                            inputs=x[:STRUCTURE_SAMPLES])
    with torch.no_grad():
        after = ck.model(x)
    diff = float((after - before).abs().max())
    scale = float(before.abs().max())
    if not math.isfinite(diff) or diff > 1e-3 * max(scale, 1.0):
        raise NfmError(f"rescaling changed the outputs by {diff:.3g} (logits up to {scale:.3g}); "
                       "the factors are too extreme for float32, pick a smaller range", checkpoint)
    art = ck.artifact
    tensors = {k: v for k, v in art.tensors.items() if not k.startswith(("model.", "optim."))}
    tensors.update({f"model.{k}": v.to(stored[f"model.{k}"]) for k, v in ck.model.state_dict().items()})
    meta: dict[str, Any] = dict(art.meta)
    meta.pop("optimizer", None)  # the Adam state no longer matches the weights
    meta["rescale"] = {"mode": mode, "alpha": alpha, "random_range": list(random_range) if random_range else None,
                       "seed": seed, "pair": pair if mode == "layer" else None, "layers": touched,
                       "max_abs_diff": diff, "checked_samples": len(x)}
    meta["parents"] = {"checkpoint": ck.sha256}
    write_artifact(out, tensors, "checkpoint", meta)
    return RescaleResult(out, mode, touched, diff, scale)
