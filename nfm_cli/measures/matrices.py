"""Which tensors are the weight matrices W(l) of the normalized sharpness (17): one definition.

* Linear ``[out, in]`` and Conv1d/2d/3d ``[out, in / groups, *kernel]`` (kernel positions summed, a
  grouped conv as its block-diagonal [out, in] matrix, Sec. 5.3) -- subclasses included, as before;
* attention (``nn.MultiheadAttention``): the output projection is a Linear; the fused ``in_proj_weight``
  ``[3E, E]`` is three matrices, Q, K and V (rows 0:E, E:2E, 2E:3E), each with its own row and column
  sigmas; with ``kdim``/``vdim`` != E the separate ``q/k/v_proj_weight`` are the three matrices;
* ``nn.Embedding`` ``[tokens, dim]``: a matrix with rows = tokens;
* left out (footnote 5, like BatchNorm's): biases, BatchNorm/LayerNorm/GroupNorm affine parameters,
  class tokens, position embeddings, layer scales and other raw parameters (``params_left_out``).

``RESCALABLE`` are the layers whose [out, in] matrices ``steps/rescale.py`` rescales neuron by neuron.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

MATRIX_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
RESCALABLE = (nn.Linear, nn.Conv2d)
QKV = ("q", "k", "v")


@dataclass(frozen=True)
class WeightMatrix:
    """``name`` (the key of the per-layer table and of the sigma tensors: the parameter name, or
    ``<param>[q]`` for a third of a fused projection), ``param`` (the parameter it is part of),
    ``rows`` (its rows of that parameter; None: all), ``groups`` (of a grouped conv) and ``kind``
    (the layer class, e.g. "Linear", "MultiheadAttention.q")."""

    name: str
    param: str
    kind: str
    groups: int = 1
    rows: tuple[int, int] | None = None

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This matrix's part of ``tensor`` (the parameter, or its Hessian diagonal)."""
        return tensor if self.rows is None else tensor[self.rows[0]:self.rows[1]]


def _qualified(path: str, local: str) -> str:
    return f"{path}.{local}" if path else local


def weight_matrices(model: nn.Module) -> dict[str, WeightMatrix]:
    """``{name: WeightMatrix}`` of every weight matrix of ``model`` (module docstring), in model order."""
    out: dict[str, WeightMatrix] = {}
    for path, module in model.named_modules():
        if isinstance(module, MATRIX_LAYERS):
            name = _qualified(path, "weight")
            out[name] = WeightMatrix(name, name, type(module).__name__, getattr(module, "groups", 1))
        elif isinstance(module, nn.MultiheadAttention):
            if module.in_proj_weight is not None:
                param = _qualified(path, "in_proj_weight")
                e = module.embed_dim
                for i, part in enumerate(QKV):
                    out[f"{param}[{part}]"] = WeightMatrix(f"{param}[{part}]", param, f"MultiheadAttention.{part}",
                                                           rows=(i * e, (i + 1) * e))
            else:
                for part in QKV:
                    name = _qualified(path, f"{part}_proj_weight")
                    out[name] = WeightMatrix(name, name, f"MultiheadAttention.{part}")
    return out


__all__ = ["MATRIX_LAYERS", "RESCALABLE", "WeightMatrix", "weight_matrices"]
