"""Two exact routes to a convolution's signed square sums, and the cost model that picks one per layer.

For a conv layer (one group shown; groups are independent blocks), sample b, direction k (one of the
K-1 scaled eigenvectors of the logit Hessian, ``exact.py``, eqs. 20-22 and (5) of the paper), output
gradient g_bk [o, L] over the L output positions and unfolded input c_b [i, L] (i = in/groups *
kernel positions), the per-sample weight gradient is P_bk = g_bk c_b^T [o, i], and the rule needs

    D[o, i] = sum_b sum_k s_bk P_bk[o, i]^2.

* ``per-sample`` route: form P_bk (a batched matrix product, inner dimension L), square, sum with the
  signs -- about 2 B o i L flops and B o i elements written and read per direction. Best for many L.
* ``position-pair`` route: expand the square over pairs of positions,

      D[o, i] = sum_b sum_{l, l'} A_b[o, l, l'] C_b[i, l, l'],
      A_b = sum_k s_bk g_bk[:, l] g_bk[:, l']  (accumulated over the directions, B o L^2 elements),
      C_b[i, l, l'] = c_b[i, l] c_b[i, l'],

  one matrix product with inner dimension B L^2 once per batch (``PositionPairSums.weight``), no
  per-sample gradient formed. Best when L is small (ResNet's last stages run at 2x2 and 1x1 on 32x32
  inputs). The bias is sum_b sum_{l, l'} A_b[o, l, l'] (= sum_b sum_k s_bk (sum_l g_bk[o, l])^2).

``choose_route`` compares estimated costs (flops plus memory traffic) from the layer's shape and the
number of directions, and refuses the pair route when its buffers do not fit the element budget.
``stacks_directions`` says from the number of positions whether the rule takes the K-1 directions
stacked (one product over all of them) or one by one as their backward passes end, and
``unfold_columns`` forms c_b as a strided view of the (padded) input, copied once (a view alone for a
1x1 kernel at stride 1).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

PER_SAMPLE = "per-sample"
POSITION_PAIR = "position-pair"
# Cost of moving one element through memory, in flops of a large matrix product (measured on the
# 2-core benchmark machine: elementwise passes run at about 1/30 of the matrix-product flop rate).
MEMORY_WEIGHT = 30.0
# Per-sample gradients squared in chunks this small stay in the CPU's cache between the matrix product
# and the squares: 2-3x faster than 64 MiB chunks on the benchmark machine (WRN-16-4 and resnet18 layers).
PER_SAMPLE_CHUNK_ELEMENTS = 1 << 18
# ... so those passes cost far less per element than passes through main memory.
CACHED_WEIGHT = 5.0
# Batched matrix products with a short inner dimension run far below the rate of a large one.
SHORT_INNER_PENALTY = 8.0
# Up to this many output positions the directions are stacked [D, B, ...] for one product over all of
# them (a taller left operand: resnet18 at 8x8 and below gains 10-20%); above it each direction is taken
# as its backward pass ends: the product's inner dimension L is long enough alone, and holding K-1
# copies of a large feature map's gradient costs more in memory traffic than it saves (WRN-16-4's
# 32x32 stage, 128 samples: 38.8 -> 35.4 s, BENCHMARKS.md).
STACK_POSITIONS = 256


def stacks_directions(positions: int) -> bool:
    """Whether a conv layer with ``positions`` output positions takes its directions stacked."""
    return positions <= STACK_POSITIONS


def output_shape(spatial: tuple[int, ...], kernel_size, dilation, padding, stride) -> tuple[int, ...]:
    """Output spatial shape of a convolution of an input of spatial shape ``spatial`` (arguments per
    dimension; ``padding`` an int or one per dimension)."""
    pads = (padding,) * len(spatial) if isinstance(padding, int) else tuple(padding)
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, d, p, s in zip(spatial, kernel_size, dilation, pads, stride, strict=True))


def output_positions(spatial: tuple[int, ...], kernel_size, dilation, padding, stride) -> int:
    """Number of output positions L (the product of ``output_shape``)."""
    return math.prod(output_shape(spatial, kernel_size, dilation, padding, stride))


def unfold_columns(x: torch.Tensor, kernel_size, dilation, padding, stride) -> torch.Tensor:
    """``F.unfold(x, ...)`` of a 4-D input, [B, C * kh * kw, L] in the same order, from one strided view of
    the zero-padded input (a single copy; no copy at all for a 1x1 kernel at stride 1 without padding).
    Against ``F.unfold``'s im2col on the CPU (one thread, 32 samples): 1.35x faster for a 3x3 kernel on 64
    channels at 32x32 and on 128 at 16x16, 2.5x at stride 2, ~15% slower on 256 channels at 8x8."""
    pads = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if any(pads):
        x = torch.nn.functional.pad(x, (pads[1], pads[1], pads[0], pads[0]))
    batch, channels = x.shape[:2]
    out_h, out_w = output_shape(tuple(x.shape[-2:]), kernel_size, dilation, 0, stride)   # padded already
    sb, sc, sh, sw = x.stride()
    windows = x.as_strided((batch, channels, kernel_size[0], kernel_size[1], out_h, out_w),
                           (sb, sc, sh * dilation[0], sw * dilation[1], sh * stride[0], sw * stride[1]))
    return windows.reshape(batch, channels * kernel_size[0] * kernel_size[1], out_h * out_w)


@dataclass(frozen=True)
class ConvShape:
    """What the costs depend on: samples, output positions, groups, outputs and kernel size per group,
    and the number of directions (calls of ``add``) per batch."""

    batch: int
    positions: int
    groups: int
    out_per_group: int
    kernel: int                      # in_channels / groups * kernel positions
    directions: int

    @property
    def out_channels(self) -> int:
        return self.groups * self.out_per_group

    def per_sample_cost(self) -> float:
        b, l, o, i, k = self.batch, self.positions, self.out_channels, self.kernel, self.directions
        inner_penalty = SHORT_INNER_PENALTY if l < 16 else 1.0
        matmul = 2.0 * b * o * i * l * inner_penalty
        squares = 4.0 * b * o * i * CACHED_WEIGHT             # write P, square, read for the signed sum
        unfold = b * self.groups * i * l * MEMORY_WEIGHT / k  # once per batch (cached)
        return k * (matmul + squares + unfold)

    def position_pair_cost(self) -> float:
        b, l, o, i, k = self.batch, self.positions, self.out_channels, self.kernel, self.directions
        pairs = b * l * l
        accumulate = k * o * pairs * (2.0 + 3.0 * MEMORY_WEIGHT)    # A += s g g^T, read and write A
        columns = (self.groups * i + o) * pairs * 3.0 * MEMORY_WEIGHT  # form C, lay out A for the product
        matmul = 2.0 * o * i * pairs
        return accumulate + columns + matmul

    def position_pair_elements(self) -> int:
        """Elements the pair route keeps across the directions (A)."""
        return self.batch * self.out_channels * self.positions ** 2


def choose_route(shape: ConvShape, element_budget: int) -> str:
    """``position-pair`` when it is estimated cheaper and A fits ``element_budget``, else ``per-sample``."""
    if shape.position_pair_elements() > element_budget:
        return PER_SAMPLE
    return POSITION_PAIR if shape.position_pair_cost() < shape.per_sample_cost() else PER_SAMPLE


def _sample_chunks(n: int, per_sample_elements: int, chunk_elements: int) -> Iterator[slice]:
    step = max(1, chunk_elements // max(1, per_sample_elements))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


class PositionPairSums:
    """The position-pair route of one conv layer and batch: ``add`` per direction, then ``weight``/``bias``."""

    def __init__(self, batch: int, groups: int, out_per_group: int, positions: int, dtype, device):
        # A laid out [G, o, B, L, L] so that a chunk of samples is one matrix operand per group
        self.pairs = torch.zeros(groups, out_per_group, batch, positions, positions, dtype=dtype, device=device)

    def add_batch(self, grad: torch.Tensor, sign: torch.Tensor) -> None:
        """grad [D, B, G, o, L] of D directions, sign [D, B]: A_b += sum_k s_bk g_bk g_bk^T, one batched
        matrix product with inner dimension D (A is read and written once, not D times)."""
        positions = self.pairs.shape[3]
        g = grad.permute(2, 3, 1, 4, 0)                                          # [G, o, B, L, D]
        signed = (g * sign.T.to(g.dtype)[None, None, :, None, :]).reshape(-1, positions, grad.shape[0])
        pairs = self.pairs.view(-1, positions, positions)
        pairs.baddbmm_(signed, g.reshape(-1, positions, grad.shape[0]).transpose(1, 2))

    def weight(self, columns_of: Callable[[slice], torch.Tensor], kernel: int, chunk_elements: int
               ) -> torch.Tensor:
        """D [G, o, i] from ``columns_of(samples) -> [c, G, i, L]`` (the unfolded input), chunked over samples."""
        groups, out_per_group, batch, positions, _ = self.pairs.shape
        total = self.pairs.new_zeros(groups, out_per_group, kernel)
        per_sample = (groups * kernel + groups * out_per_group) * positions * positions
        for part in _sample_chunks(batch, per_sample, chunk_elements):
            cols = columns_of(part).permute(1, 0, 3, 2)                          # [G, c, L, i]
            products = cols.unsqueeze(3) * cols.unsqueeze(2)                     # [G, c, L, L, i]
            pairs = self.pairs[:, :, part].reshape(groups, out_per_group, -1)    # [G, o, c L L]
            total.baddbmm_(pairs, products.reshape(groups, -1, kernel))
        return total

    def bias(self) -> torch.Tensor:
        """sum_b sum_k s_bk (sum_l g_bk)^2 per output channel, [G * o]."""
        return self.pairs.sum(dim=(2, 3, 4)).flatten()


__all__ = ["PER_SAMPLE", "PER_SAMPLE_CHUNK_ELEMENTS", "POSITION_PAIR", "STACK_POSITIONS", "ConvShape", "choose_route",
           "PositionPairSums", "output_positions", "output_shape", "stacks_directions", "unfold_columns"]
