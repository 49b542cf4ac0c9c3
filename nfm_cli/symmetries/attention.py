"""The two scaling symmetries inside every attention head.

With q = x W_Q^T + b_Q, k = x W_K^T + b_K, v = x W_V^T + b_V per head and the output o = softmax(q k^T
/ sqrt(d) + B) v W_O^T (B: masks, relative-position biases), for positive factors a_j and b_j:

- query dim j x a_j and key dim j x 1/a_j (rows of W_Q, W_K and their biases): every score q . k
  = sum_j q_j k_j is unchanged;
- value dim j x b_j and input column j of W_O x 1/b_j: o is unchanged.

A fused projection (``in_proj_weight``, timm's ``qkv``) holds the three blocks [Q; K; V] head by
head, so dim j of the attention width is row j, A + j and 2A + j. Only the modules below are known;
another module whose class name says attention is refused (its layout is unknown to nfm), and so
are variants that break a symmetry (query/key normalization, a norm between attention and W_O).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from nfm_cli.errors import NfmError
from nfm_cli.symmetries.scaling import Scaling, columns, rows

# (module, class) -> layout: "mha" (nn.MultiheadAttention), "fused" (a qkv Linear of 3A outputs and
# a proj Linear of A inputs), "split" (q, k, v and out Linear layers)
KNOWN_ATTENTION: dict[tuple[str, str], str] = {
    ("torch.nn.modules.activation", "MultiheadAttention"): "mha",
    ("timm.layers.attention", "Attention"): "fused",
    ("timm.models.vision_transformer", "Attention"): "fused",
    ("timm.models.swin_transformer", "WindowAttention"): "fused",
    ("torchvision.models.swin_transformer", "ShiftedWindowAttention"): "fused",
    ("nfm_models.vit", "Attention"): "split",
}
KNOWN_NAMES = ("nn.MultiheadAttention, timm's vision_transformer Attention and swin_transformer WindowAttention, "
               "torchvision's ShiftedWindowAttention, nfm_models.vit Attention")


@dataclass
class AttentionHeads:
    """One attention module: ``width`` = heads x head dim; the scalings by a (query/key) and b (value/out)."""

    path: str
    cls: str
    heads: int
    width: int
    qk: list[Scaling] = field(default_factory=list)
    vo: list[Scaling] = field(default_factory=list)


def _class_key(module: nn.Module) -> tuple[str, str]:
    return type(module).__module__, type(module).__qualname__


def _where(path: str, module: nn.Module) -> str:
    return f"{path or '(the model)'} ({type(module).__module__}.{type(module).__qualname__})"


def find_attention(model: nn.Module) -> list[AttentionHeads]:
    """Every known attention module of ``model``, in module order; an unknown attention module with
    parameters of its own, or a known one whose heads do not divide its width, is an ``NfmError``."""
    found, inside = [], []
    for path, module in model.named_modules():
        layout = KNOWN_ATTENTION.get(_class_key(module))
        if layout is not None:
            found.append(_build(path, module, layout))
            inside.append(path + ".")
        elif "attention" in type(module).__name__.lower() and not any(path.startswith(p) for p in inside):
            own = [n for n, _ in module.named_parameters()
                   if not any(f"{path}.{n}".startswith(p) for p in _known_below(module, path))]
            if own:
                raise NfmError(f"nfm does not know the attention module {_where(path, module)} (parameter "
                               f"{own[0]!r}); it can rescale {KNOWN_NAMES}, or use --mode layernorm")
    return found


def _known_below(module: nn.Module, path: str) -> list[str]:
    return [f"{path}.{n}." for n, m in module.named_modules() if n and _class_key(m) in KNOWN_ATTENTION]


def _check_width(path: str, module: nn.Module, width: int, heads: int) -> None:
    if heads < 1 or width % heads:
        raise NfmError(f"attention {_where(path, module)}: {heads} heads do not divide its width {width}; "
                       "the head dimensions are undefined, so it cannot be rescaled")


def _build(path: str, module: nn.Module, layout: str) -> AttentionHeads:
    if layout == "mha":
        return _mha(path, module)
    if layout == "split":
        return _split(path, module)
    return _fused(path, module)


def _mha(path: str, m: nn.MultiheadAttention) -> AttentionHeads:
    e = m.embed_dim
    _check_width(path, m, e, m.num_heads)
    heads = AttentionHeads(path, "MultiheadAttention", m.num_heads, e)
    if m.in_proj_weight is not None:
        w_q, w_k, w_v = (m.in_proj_weight.narrow(0, i * e, e) for i in range(3))
    else:
        w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    bias = m.in_proj_bias
    heads.qk = rows(w_q, 0, e, 1) + rows(w_k, 0, e, -1) + rows(bias, 0, e, 1) + rows(bias, e, e, -1)
    if m.bias_k is not None:
        heads.qk.append(Scaling(m.bias_k, 2, -1))
    heads.vo = rows(w_v, 0, e, 1) + rows(bias, 2 * e, e, 1) + columns(m.out_proj.weight, -1)
    if m.bias_v is not None:
        heads.vo.append(Scaling(m.bias_v, 2, 1))
    return heads


def _fused(path: str, m: nn.Module) -> AttentionHeads:
    qkv, proj = m.qkv, m.proj
    width = qkv.out_features // 3
    if qkv.out_features % 3 or proj.in_features != width:
        raise NfmError(f"attention {_where(path, m)}: qkv has {qkv.out_features} outputs and proj "
                       f"{proj.in_features} inputs, not 3A and A; nfm does not know this layout")
    _check_width(path, m, width, m.num_heads)
    for name, breaks in (("q_norm", "query/key"), ("k_norm", "query/key"), ("norm", "value/output")):
        sub = getattr(m, name, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            raise NfmError(f"attention {_where(path, m)} normalizes with {name}, which breaks the {breaks} "
                           "scaling symmetry; use --mode layernorm")
    if getattr(m, "logit_scale", None) is not None:
        raise NfmError(f"attention {_where(path, m)} uses cosine attention (logit_scale), which breaks the "
                       "query/key scaling symmetry; use --mode layernorm")
    heads = AttentionHeads(path, type(m).__qualname__, m.num_heads, width)
    heads.qk = rows(qkv.weight, 0, width, 1) + rows(qkv.weight, width, width, -1) + \
        rows(qkv.bias, 0, width, 1) + rows(qkv.bias, width, width, -1)
    heads.vo = rows(qkv.weight, 2 * width, width, 1) + rows(qkv.bias, 2 * width, width, 1) + \
        columns(proj.weight, -1)
    return heads


def _split(path: str, m: nn.Module) -> AttentionHeads:
    width = m.q.out_features
    if not (m.k.out_features == m.v.out_features == m.out.in_features == width):
        raise NfmError(f"attention {_where(path, m)}: q, k, v and out widths differ; cannot rescale its heads")
    _check_width(path, m, width, m.num_heads)
    heads = AttentionHeads(path, type(m).__qualname__, m.num_heads, width)
    heads.qk = rows(m.q.weight, 0, width, 1) + rows(m.k.weight, 0, width, -1) + \
        rows(m.q.bias, 0, width, 1) + rows(m.k.bias, 0, width, -1)
    heads.vo = rows(m.v.weight, 0, width, 1) + rows(m.v.bias, 0, width, 1) + columns(m.out.weight, -1)
    return heads
