"""A small Vision Transformer (Dosovitskiy et al., 2021) for 28x28 / 32x32 images, from plain torch modules.

Patches of 4x4 pixels embedded by a convolution, a class token and learned position embeddings, pre-LN
blocks (LayerNorm -> multi-head self-attention -> residual, LayerNorm -> Linear -> GELU -> Linear ->
residual), a final LayerNorm and a Linear head on the class token. The attention is written out with
separate q, k, v and out Linear layers (no fused kernel), so every parameter enters through a plain
operation and the model traces with torch.fx.
"""
from __future__ import annotations

import torch
from torch import nn

from nfm_models import register


class Attention(nn.Module):
    """softmax(q k^T / sqrt(d)) v per head, q = x W_q^T + b_q (likewise k, v), then the out projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"vit-tiny: {num_heads} heads do not divide the width {dim}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, N, dim) -> (B, heads, N, head_dim)
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        weights = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(dim=-1)
        return self.out((weights @ v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@register("vit-tiny")
class ViTTiny(nn.Module):
    """Patch embedding (4x4) -> [class token; patches] + positions -> depth x Block -> LayerNorm -> head."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, dim: int = 32,
                 depth: int = 2, num_heads: int = 2, patch_size: int = 4, mlp_ratio: int = 2):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"vit-tiny: patch size {patch_size} does not divide the image size {image_size}")
        if dim < 1 or depth < 1 or mlp_ratio < 1:
            raise ValueError("vit-tiny needs dim >= 1, depth >= 1 and mlp_ratio >= 1")
        tokens = (image_size // patch_size) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.Sequential(*(Block(dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)              # (B, patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])
