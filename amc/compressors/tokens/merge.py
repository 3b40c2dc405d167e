"""Training-free token merging (ToMe's bipartite soft matching), the merging baseline beside the agents.

Tokens (CLS excluded) alternate into sets A and B; each A token's most similar B token (cosine similarity
of the token features; ToMe uses the attention keys, which a generic graph does not expose) is an edge;
the most similar edges are merged (the A token averaged into its B partner, weighted by how many tokens
each already stands for) until `keep` tokens remain. Batches stay rectangular.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ...graph.ops import register_op
from ..rules.common import passthrough
from .agent import add_rows, take_rows


class TokenMerge(nn.Module):
    """Merge the non-CLS tokens of a `[B, N, D]` sequence down to `keep` (no parameters, no training)."""

    def __init__(self, keep: Optional[int] = None, label: str = ""):
        super().__init__()
        self.keep, self.label = keep, label

    def extra_repr(self) -> str:
        return f"keep={self.keep}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep is None:
            return x
        cls, t = x[:, :1], x[:, 1:]
        size = torch.ones(t.shape[0], t.shape[1], 1, dtype=t.dtype, device=t.device)
        while t.shape[1] > max(1, int(self.keep)):
            t, size = _merge_step(t, size, t.shape[1] - max(1, int(self.keep)))
        return torch.cat([cls, t], dim=1)


def _merge_step(t: torch.Tensor, size: torch.Tensor, want: int):
    a, b = t[:, ::2], t[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    r = min(want, a.shape[1])
    an, bn = nn.functional.normalize(a, dim=-1), nn.functional.normalize(b, dim=-1)
    sim = an @ bn.transpose(1, 2)                        # [B, |A|, |B|]
    best, partner = sim.max(dim=-1)                      # each A token's closest B token
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]
    src = take_rows(t, 2 * merged) * sa.gather(1, merged.unsqueeze(-1))  # a = t[:, ::2]
    dst_idx = partner.gather(1, merged)
    b_sum = add_rows(b * sb, dst_idx, src)
    sb_new = sb.scatter_add(1, dst_idx.unsqueeze(-1), sa.gather(1, merged.unsqueeze(-1)))
    b_new = b_sum / sb_new
    a_keep = take_rows(t, 2 * kept)
    sa_keep = sa.gather(1, kept.unsqueeze(-1))
    return torch.cat([a_keep, b_new], dim=1), torch.cat([sa_keep, sb_new], dim=1)


def merge_macs(m: TokenMerge, args: tuple, kwargs: dict, out: Any) -> int:
    """The similarity products of the merge steps (the dominant cost)."""
    x = args[0]
    if m.keep is None or not isinstance(x, torch.Tensor) or x.dim() != 3:
        return 0
    b, n, d = x.shape
    n, total = n - 1, 0
    while n > max(1, int(m.keep)):
        na, nb = (n + 1) // 2, n // 2
        total += b * na * nb * d
        n -= min(n - max(1, int(m.keep)), na)
    return total


register_op(TokenMerge, leaf=True, macs=merge_macs, channels=passthrough)  # merges rows, channel by channel
