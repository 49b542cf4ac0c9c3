"""Multilayer perceptron with three hidden ReLU layers (paper Sec. 6.1)."""
from __future__ import annotations

from torch import nn

from nfm_models import register


@register("mlp")
class MLP(nn.Sequential):
    """Flatten -> [Linear -> ReLU] x depth -> Linear, e.g. 784-512-512-512-10."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 width: int = 512, depth: int = 3):
        if width < 1 or depth < 1:
            raise ValueError("mlp needs width >= 1 and depth >= 1")
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_channels * image_size * image_size
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        super().__init__(*layers)
