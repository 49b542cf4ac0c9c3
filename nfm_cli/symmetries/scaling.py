"""One scaling of a slice of a parameter, and applying a list of them with one vector of factors."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Scaling:
    """``view`` (a view of a parameter or buffer: rows, columns, a block of a fused matrix) multiplied
    along ``axis`` by ``factors ** power`` (power +1 or -1), one factor per index of that axis."""

    view: torch.Tensor
    axis: int
    power: int


@torch.no_grad()
def apply_scalings(scalings: list[Scaling], factors: torch.Tensor) -> None:
    """Multiply every scaling's view in place; ``factors`` (float64) has one entry per index."""
    for s in scalings:
        if s.view.shape[s.axis] != len(factors):
            raise ValueError(f"a scaling of size {s.view.shape[s.axis]} got {len(factors)} factors")
        shape = [1] * s.view.ndim
        shape[s.axis] = -1
        s.view.mul_((factors.to(torch.float64) ** s.power).view(shape).to(s.view.dtype))


def rows(tensor: torch.Tensor | None, start: int, length: int, power: int) -> list[Scaling]:
    """Rows ``start:start+length`` of a weight (or entries of a bias); nothing for a missing bias."""
    return [] if tensor is None else [Scaling(tensor.narrow(0, start, length), 0, power)]


def columns(tensor: torch.Tensor, power: int, row_start: int = 0, row_length: int | None = None) -> list[Scaling]:
    """Every input column of a weight matrix (of rows ``row_start:row_start+row_length`` only, for one
    block of a fused projection)."""
    length = tensor.shape[0] - row_start if row_length is None else row_length
    return [Scaling(tensor.narrow(0, row_start, length), 1, power)]
