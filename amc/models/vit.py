"""Small Vision Transformers for the token- and dimension-pruning work (trainable on 2 CPU cores).

Written the way timm writes ViTs (pre-norm blocks, one fused qkv Linear, a CLS token at index 0, a
learned position embedding, the head reading the CLS token), so what amc learns on them carries over
to timm and torchvision models; the sequence length is read from the input (``x.shape``), so tokens
can be dropped between blocks.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._registry import register_model


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's layout)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class SmallViT(nn.Module):
    """Patch embedding (a strided conv), CLS token + position embedding, ``depth`` blocks, LN, linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, patch_size: int = 4,
                 dim: int = 96, depth: int = 6, heads: int = 3, mlp_ratio: float = 2.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        tokens = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@register_model("vit_fashion", input_size=(1, 28, 28))
def vit_fashion(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, dim: int = 96, depth: int = 6,
                heads: int = 3) -> nn.Module:
    """ViT for 28x28 Fashion-MNIST: patch 4 (49 tokens + CLS), width 96, 6 blocks, 3 heads, MLP 2x."""
    return SmallViT(num_classes, in_channels, image_size, 4, dim, depth, heads, 2.0)


@register_model("vit_digits", input_size=(1, 16, 16))
def vit_digits(num_classes: int = 10, in_channels: int = 1, image_size: int = 16, dim: int = 48, depth: int = 4,
               heads: int = 3) -> nn.Module:
    """ViT for scikit-learn digits at 16x16: patch 2 (64 tokens + CLS), width 48, 4 blocks, 3 heads."""
    return SmallViT(num_classes, in_channels, image_size, 2, dim, depth, heads, 2.0)
