"""Wide ResNet (Zagoruyko & Komodakis, 2016), default depth 16 and width factor 4 (WRN-16-4).

Pre-activation basic blocks: BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3, plus an identity or
1x1-conv shortcut. No dropout. Every layer is piecewise linear in each single weight (BatchNorm in
eval mode), which the exact Hessian diagonal relies on.
"""
from __future__ import annotations

import torch
from torch import nn

from nfm_models import register


class WideBasic(nn.Module):
    """One pre-activation residual block; the residual sum is its only non-module operation."""

    piecewise_linear = True  # forward uses only its child modules and one residual sum

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            if stride != 1 or in_planes != planes else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        # as in the reference WRN, a projection shortcut sees the pre-activated input
        skip = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(pre)
        return out + skip


@register("wrn16-4")
class WideResNet(nn.Module):
    """WRN-depth-k: conv3x3(16) -> 3 groups of n blocks (16k, 32k, 64k) -> BN-ReLU -> avgpool -> fc."""

    piecewise_linear = True

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10,
                 depth: int = 16, widen_factor: int = 4):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"wide resnet depth must be 6n+4 >= 10, not {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        in_planes = widths[0]
        for group, planes in enumerate(widths[1:]):
            for i in range(n):
                stride = 2 if (group > 0 and i == 0) else 1
                blocks.append(WideBasic(in_planes, planes, stride))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv1(x))
        return self.fc(self.flatten(self.pool(self.relu(self.bn(x)))))
