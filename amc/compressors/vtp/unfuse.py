"""`nn.MultiheadAttention` as separate ops, so VTP can gate and prune what the fused module hides.

The fused module keeps its in/out projections, heads and embed width inside one leaf: its channel rule
can only tie the head dims to the residual width. `unfuse_attention` returns a copy of a model whose
self-attention modules are `SelfAttention` (a qkv Linear, a reshape to heads,
`F.scaled_dot_product_attention`, a proj Linear: the same weights, the same function), which capture
records op by op: gates go before qkv and proj, whole heads can be removed, the residual can be read
column by column.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..._copying import copy_module
from ...errors import PruningError


class SelfAttention(nn.Module):
    """The self-attention path of an `nn.MultiheadAttention` (query = key = value, no masks), unfused."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, h = mha.embed_dim, mha.num_heads
        self.heads, self.batch_first, self.dropout = h, mha.batch_first, mha.dropout
        self.scale = (e // h) ** -0.5
        self.qkv = nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None)
        self.proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            self.proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.qkv.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.proj.bias.copy_(mha.out_proj.bias)
        self.to(mha.out_proj.weight.device, mha.out_proj.weight.dtype)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                need_weights: bool = False, **masks: Any) -> Tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query) \
                or any(v is not None for v in masks.values()) or need_weights:
            raise PruningError("an unfused nn.MultiheadAttention supports self-attention only (query = key = "
                               "value, no masks, need_weights=False); pass the model without unfusing")
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                             scale=self.scale)
        out = self.proj(out.transpose(1, 2).reshape(b, n, -1))
        return (out if self.batch_first else out.transpose(0, 1)), None


def unfuse_attention(model: nn.Module) -> Tuple[nn.Module, int]:
    """A deep copy of `model` with every `nn.MultiheadAttention` whose in-projection is one matrix and
    that has no bias_k / zero-attention replaced by `SelfAttention`; returns it and how many were."""
    model = copy_module(model)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention) and child._qkv_same_embed_dim and child.bias_k is None \
                    and not child.add_zero_attn:
                setattr(parent, name, SelfAttention(child).train(child.training))
                swapped += 1
    return model, swapped


__all__ = ["SelfAttention", "unfuse_attention"]
