"""LeNet-5 style network (LeCun et al., 1998) for 1- or 3-channel 28x28 / 32x32 images."""
from __future__ import annotations

from torch import nn

from nfm_models import register


@register("lenet")
class LeNet(nn.Sequential):
    """conv5x5(6) -> ReLU -> maxpool2 -> conv5x5(16) -> ReLU -> maxpool2 -> 120 -> 84 -> classes.

    28x28 inputs are padded by 2 in the first convolution so both sizes reach a 5x5 map.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10):
        if image_size not in (28, 32):
            raise ValueError(f"lenet takes 28x28 or 32x32 images, not {image_size}x{image_size}")
        pad = (32 - image_size) // 2
        super().__init__(
            nn.Conv2d(in_channels, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )
