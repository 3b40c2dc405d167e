"""The token-pruning agent (APT, seed 000): a graph node that scores the tokens of a ViT block output
and removes the low-scoring ones, so the blocks after it run on fewer tokens (a real speed-up, not a mask).

Input and output are `[B, N, D]` token tensors with the CLS token at index 0, which is always kept. The
agent reads each token and its interaction with CLS (the seed's "the unit itself and its relation to
the CLS unit"): `score_i = mlp([ln(x_i), ln(x_i) * ln(x_cls)])`. Its input is detached, so the agent
learns only from its own losses (policy gradient + budget) and never pushes gradients into the model.

Modes (`agent.mode`):
  "batched": keep the `keep` highest-scoring tokens of every image (rectangular batches: fast in batches);
  "dynamic": keep, per image, the tokens whose keep-probability sigmoid(score) is above `threshold`,
             compared as logits (`threshold_logit`: float32 sigmoids saturate), (batch 1: each image its own
             length; in a batch, the largest such count, so it stays rectangular);
  "off":     keep every token (APT trained, not pruning);
  "criterion" scorers (`score="cls_attention" | "norm" | "random"`): the training-free baselines.
Kept tokens stay in their original order. `fuse` says what becomes of the dropped ones: "none" (False)
discards them; "one" (True) averages them into one extra token appended after the kept ones (EViT's
inattentive-token fusion), weighted by their scores (softmax of the keep-logits; CLS attention itself for
`cls_attention`), at the cost of one token downstream; "merge" averages each into the kept token it is
most similar to (cosine, as ToMe merges), so no token is added and none is lost outright.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch
import torch.nn as nn

from ...errors import PruningError
import numpy as np

from ...graph.ops import register_op
from ..rules.common import passthrough

logger = logging.getLogger("amc.compressors.tokens")

MODES = ("batched", "dynamic", "off")
SCORES = ("agent", "cls_attention", "norm", "random")  # + "tome" (merge.TokenMerge) at placement
FUSE = ("none", "one", "merge")


def fuse_mode(fuse: Any) -> str:
    """`fuse` as one of FUSE (True = "one", False = "none"); PruningError otherwise."""
    if fuse is True or fuse is False:
        return "one" if fuse else "none"
    if fuse not in FUSE:
        raise PruningError(f"fuse must be one of {FUSE} (or True = 'one', False = 'none'), got {fuse!r}")
    return str(fuse)


class TokenAgent(nn.Module):
    """Scores and drops tokens of a `[B, N, D]` sequence (CLS at 0 kept). See the module docstring."""

    def __init__(self, dim: int, hidden: Optional[int] = None, keep: Optional[int] = None, mode: str = "batched",
                 threshold: float = 0.5, score: str = "agent", label: str = "", fuse: Any = "none"):
        super().__init__()
        if mode not in MODES:
            raise PruningError(f"TokenAgent mode must be one of {MODES}, got {mode!r}")
        if score not in SCORES:
            raise PruningError(f"TokenAgent score must be one of {SCORES}, got {score!r}")
        self.dim, self.keep, self.mode = int(dim), keep, mode
        self.hidden = int(hidden) if hidden else max(8, self.dim // 8)  # ~3% of a block's MACs per token
        self.threshold, self.score, self.label, self.fuse = float(threshold), score, label, fuse_mode(fuse)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, self.hidden), nn.GELU(), nn.Linear(self.hidden, 1))
        self.sample: Optional[int] = None  # training: drop `sample` tokens drawn from the policy (pass 2)
        self._last_log_prob: Optional[torch.Tensor] = None
        self._last_scores: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keep={self.keep}, mode={self.mode!r}, score={self.score!r}, fuse={self.fuse!r}"

    def scores(self, x: torch.Tensor, attn: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Keep-logits `[B, N-1]` of the non-CLS tokens (higher = keep)."""
        x = x.detach()
        if self.score == "agent" and not self.folds_cls():
            h = self.norm(x)
            return self.mlp(torch.cat([h[:, 1:], h[:, 1:] * h[:, :1]], dim=-1)).squeeze(-1)
        if self.score == "agent":  # mlp[0]([h, h * h_cls]) = h @ (W_a + W_b * h_cls)^T: one W per image,
            h = self.norm(x)         # half the first Linear's MACs and no [B, N, 2D] concatenation
            w = self.mlp[0].weight
            w_img = torch.addcmul(w[:, :self.dim], w[:, self.dim:], h[:, :1])             # [B, hidden, D]
            z = torch.baddbmm(self.mlp[0].bias.view(1, 1, -1), h[:, 1:], w_img.transpose(1, 2))
            return self.mlp[2](self.mlp[1](z)).squeeze(-1)
        if self.score == "cls_attention":  # EViT: attention the CLS query pays each token, mean over heads
            if attn is None:
                raise PruningError("score='cls_attention' needs the attention probabilities of the block")
            return attn.detach()[:, :, 0, 1:].mean(1)
        if self.score == "norm":
            return x[:, 1:].norm(dim=-1)
        return torch.rand(x.shape[0], x.shape[1] - 1, device=x.device)

    def folds_cls(self) -> bool:
        """The scorer's first layer is a plain Linear, so h_cls can be folded into its weight; a replaced one
        (a quantised Linear) runs as written on `[h, h * h_cls]`."""
        return type(self.mlp._modules["0"]) is nn.Linear

    def forward(self, x: torch.Tensor, attn: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 3:
            raise PruningError(f"TokenAgent {self.label!r} expects [B, N, D] tokens, got shape {tuple(x.shape)}")
        n = x.shape[1] - 1
        if self.sample is not None:
            return self._sampled(x, attn)
        if self.mode == "off" or (self.mode == "batched" and (self.keep is None or self.keep >= n)):
            return x
        if x.shape[0] == 1 and n and self.score == "agent" and not self.training and self.folds_cls() \
                and not _exporting():
            out = self._one(x)
        else:
            s = self.scores(x, attn)
            self._last_scores = s if self.training else s.detach()  # the budget term (training), thresholds
            if self.mode == "batched":
                k = int(self.keep)
            elif _exporting() and n > 1:  # the count is data: a tensor k keeps it one in the exported graph
                return _dynamic_top(x, s, self.threshold, self.fuse)
            else:  # compared as logits: sigmoid saturates in float32 above a logit of about 16
                k = int((s > threshold_logit(self.threshold)).sum(1).max().item()) if n else 0
            k = max(1, min(k, n))
            out = keep_top(x, s, k, self.fusion_weights(s) if self.fuse == "one" and k < n else None,
                           merge=self.fuse == "merge")
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: tokens %s -> %s", self.label or "agent", tuple(x.shape), tuple(out.shape))
        return out

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        """One image in few ops (batch 1 on CPU is bound by op count, not MACs): the first Linear of
        `[h, h * h_cls]` is one Linear of h with `W_a + W_b * h_cls`; CLS is scored with the rest and then
        forced in, so one index selects CLS and the kept rows in order; dynamic mode compares logits with
        the threshold's logit (no sigmoid, no top-k); merging skips the batched path's sort and scatter."""
        # plain layers are called functionally (no module dispatch); a replaced one (soft pruning's masked
        # norm, a quantised Linear) is called as it is
        F, norm, mods = nn.functional, self.norm, self.mlp._modules
        fc1, act, fc2 = mods["0"], mods["1"], mods["2"]
        x0 = x[0]
        h = F.layer_norm(x0, norm.normalized_shape, norm.weight, norm.bias, norm.eps) \
            if type(norm) is nn.LayerNorm else norm(x0)
        w = fc1.weight
        z = F.linear(h, torch.addcmul(w[:, :self.dim], w[:, self.dim:], h[:1]), fc1.bias)
        z = F.gelu(z, approximate=act.approximate) if type(act) is nn.GELU else act(z)
        s = (F.linear(z, fc2.weight, fc2.bias) if type(fc2) is nn.Linear else fc2(z)).view(-1)
        self._last_scores = s[1:].unsqueeze(0)
        n = s.shape[0] - 1
        if self.mode == "batched":
            k = max(1, min(int(self.keep), n))
            keep = torch.cat([s.new_zeros(1, dtype=torch.long), s[1:].topk(k).indices.sort().values.add_(1)])
            mask = None
        else:
            mask = s > threshold_logit(self.threshold)
            mask.narrow(0, 0, 1).fill_(True)  # CLS (a narrow view's fill: fewer ops than mask[0] = True)
            keep = mask.nonzero().view(-1)
            if keep.shape[0] == 1:  # keep at least one token besides CLS, as the batched path does
                mask.index_fill_(0, s[1:].argmax().add_(1).view(1), True)
                keep = mask.nonzero().view(-1)
        out = x0.index_select(0, keep)
        k = keep.shape[0] - 1
        if k < n and self.fuse != "none":
            if mask is None:
                mask = torch.zeros_like(s, dtype=torch.bool).index_fill_(0, keep, True)
            drop = (~mask).nonzero().view(-1)
            src = x0.index_select(0, drop)
            if self.fuse == "merge":  # _merged for one image: each dropped row joins its most similar kept
                sim = src @ F.normalize(out[1:], dim=-1).t()  # row (cosine x the row's norm); equal-weight means
                to = sim.argmax(-1).add_(1)
                counts = torch.bincount(to, minlength=k + 1).add_(1).to(x.dtype).unsqueeze(1)
                out = out.index_add_(0, to, src).div_(counts)
            else:  # "one": the score-weighted mean of the dropped rows, appended
                out = torch.cat([out, torch.softmax(s.index_select(0, drop), 0).unsqueeze(0) @ src], 0)
        return out.unsqueeze(0)

    def _sampled(self, x: torch.Tensor, attn: Optional[torch.Tensor]) -> torch.Tensor:
        """Pass 2 of the seed's training: drop `sample` tokens drawn without replacement from
        softmax(-score) (Plackett-Luce, via Gumbel-top-k) and keep their log-probability for the
        policy gradient; grad-enabled even under `torch.no_grad()`."""
        n, m = x.shape[1] - 1, int(self.sample)
        m = max(0, min(m, n - 1))
        with torch.enable_grad():
            z = -self.scores(x, attn)  # prune-logits
            gumbel = -torch.log(-torch.log(torch.rand_like(z).clamp_(1e-9, 1 - 1e-9)))
            order = (z.detach() + gumbel).argsort(dim=1, descending=True)[:, :m]
            log_prob = z.new_zeros(z.shape[0])
            masked = z
            for j in range(m):
                idx = order[:, j:j + 1]
                log_prob = log_prob + masked.gather(1, idx).squeeze(1) - torch.logsumexp(masked, dim=1)
                masked = masked.scatter(1, idx, float("-inf"))
        self._last_log_prob = log_prob
        keep_mask = torch.ones_like(z, dtype=torch.bool).scatter(1, order, False)
        idx = keep_mask.nonzero()[:, 1].view(x.shape[0], n - m)
        out = _gather(x, idx)
        if self.fuse == "one" and m:
            out = torch.cat([out, _fused(x, self.fusion_weights(-z.detach()), keep_mask)], dim=1)
        elif self.fuse == "merge" and m:
            out = _merged(x, out, order)
        return out

    def fusion_weights(self, scores: torch.Tensor) -> torch.Tensor:
        """Positive per-token weights `[B, N-1]` for fusing dropped tokens (normalised over the dropped)."""
        s = scores.detach()
        if self.score == "cls_attention":
            return s.clamp_min(0) + 1e-12
        return torch.exp(s - s.max(dim=1, keepdim=True).values)


def threshold_logit(t: float) -> float:
    """The logit of a keep-probability threshold, in float64: dynamic mode compares scores with it, since
    float32 sigmoids of logits above ~16 all round to 1 (a calibrated threshold can sit there)."""
    t = float(t)
    return float("-inf") if t <= 0 else float("inf") if t >= 1 else math.log(t) - math.log1p(-t)


def _exporting() -> bool:
    """Tracing, ONNX export or compilation: keep to the general, batch-size-agnostic path."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def keep_top(x: torch.Tensor, scores: torch.Tensor, k: int, fuse_weights: Optional[torch.Tensor] = None,
             merge: bool = False) -> torch.Tensor:
    """CLS plus the `k` highest-scoring other tokens of every image, in their original order; with
    `fuse_weights` (`[B, N-1]`, positive) also the weighted mean of the dropped tokens, appended last; with
    `merge`, each dropped token averaged into its most similar kept token instead."""
    if merge and k < scores.shape[1] and not _exporting():
        return _merged_top(x, scores, k)
    if merge and k < scores.shape[1]:
        order = scores.argsort(dim=1, descending=True)
        return _merged(x, _gather(x, order[:, :k].sort(dim=1).values), order[:, k:])
    idx = scores.topk(k, dim=1).indices.sort(dim=1).values
    out = _gather(x, idx)
    if fuse_weights is None or k >= scores.shape[1]:
        return out
    kept = torch.zeros_like(fuse_weights).scatter(1, idx, 1.0)  # a float mask: ONNX exports no bool scatter
    return torch.cat([out, _fused(x, fuse_weights, kept)], dim=1)


def _dynamic_top(x: torch.Tensor, scores: torch.Tensor, threshold: float, fuse: str) -> torch.Tensor:
    """Dynamic mode as a traced graph: k (the most tokens any image passes, at least 1) stays a tensor,
    so the exported model keeps a data-dependent token count (TopK with a computed k, in ONNX)."""
    if fuse == "one":
        raise PruningError("dynamic mode with fuse='one' cannot be exported: its appended token exists only "
                           "when a token is dropped, which the graph cannot decide; export in batched mode")
    n = scores.shape[1]
    k = (scores > threshold_logit(threshold)).sum(1).max().clamp(1, n)
    order = scores.argsort(dim=1, descending=True)
    kept = _gather(x, order[:, :k].sort(dim=1).values)
    return _merged(x, kept, order[:, k:]) if fuse == "merge" else kept


def _merged_top(x: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """`keep_top(..., merge=True)` in eager mode with fewer ops and copies (the merging agents' share of a
    batch's time): one mask of the kept rows (CLS included) yields both row lists in order, and the
    dropped rows are added in place into the fresh selection of the kept ones."""
    b, n, d = x.shape
    m = n - 1 - k
    mask = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    mask.narrow(1, 0, 1).fill_(True)
    mask.narrow(1, 1, n - 1).scatter_(1, scores.topk(k, dim=1).indices, True)
    flat = mask.view(-1)
    rows = x.reshape(b * n, d)
    out = rows.index_select(0, flat.nonzero().view(-1))                              # [B * (1 + k), D]
    src = rows.index_select(0, (~flat).nonzero().view(-1))                           # [B * m, D]
    with torch.no_grad():  # where each dropped row goes: not differentiable
        kept = out.view(b, k + 1, d)[:, 1:]
        sim = src.view(b, m, d) @ nn.functional.normalize(kept, dim=-1).transpose(1, 2)  # cosine x |src|
        to = sim.argmax(dim=-1).add_(torch.arange(b, device=x.device).unsqueeze(1) * (k + 1) + 1).view(-1)
        counts = torch.bincount(to, minlength=b * (k + 1)).add_(1).to(x.dtype).unsqueeze(1)
    return out.index_add_(0, to, src).div_(counts).view(b, k + 1, d)


def _fused(x: torch.Tensor, weights: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`[B, 1, D]`: the dropped (`kept` == 0) non-CLS tokens averaged with `weights`."""
    w = weights * (1.0 - kept.to(weights.dtype))
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("bn,bnd->bd", w.to(x.dtype), x[:, 1:]).unsqueeze(1)


def _merged(x: torch.Tensor, kept: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """`kept` (`[B, 1 + k, D]`, CLS first) with every dropped non-CLS token of `x` (indices `drop`) averaged
    into the kept non-CLS token of highest cosine similarity (an equal-weight mean per destination)."""
    src = take_rows(x, drop + 1)                                                     # [B, m, D]
    dst = kept[:, 1:]
    sim = src @ nn.functional.normalize(dst, dim=-1).transpose(1, 2)  # a dropped row's norm scales its row of
    # cosines: the argmax is the same without normalising it (one norm and one division fewer)
    to = sim.argmax(dim=-1)                                                           # [B, m]
    sums = add_rows(dst, to, src)
    counts = torch.ones_like(dst[..., :1]).scatter_add(1, to.unsqueeze(-1), torch.ones_like(src[..., :1]))
    return torch.cat([kept[:, :1], sums / counts], dim=1)


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`x[b, idx[b]]` for every image of a `[B, N, D]` tensor: `[B, k, D]`. One index_select on the
    flattened rows: torch.gather with an index expanded over D is about 5x slower on CPU (64 x 30 of
    50 tokens: 650 vs 130 us), and this runs once per agent per batch."""
    b, n, d = x.shape
    if _exporting():  # one GatherElements, and no Reshape, whose 0 in ONNX copies a size (empty idx)
        return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
    flat = (idx + torch.arange(b, device=idx.device).unsqueeze(1) * n).reshape(-1)
    return x.reshape(b * n, d).index_select(0, flat).view(b, idx.shape[1], d)


def add_rows(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """`dst` (`[B, k, D]`) with each row of `src` (`[B, m, D]`) added to row `idx[b, j]` of its image; one
    index_add on the flattened rows (scatter_add with an index expanded over D is about 3x slower on CPU;
    an ONNX export keeps scatter_add)."""
    b, k, d = dst.shape
    if _exporting():  # ONNX writes index_add with repeated indices as a plain scatter (last write wins)
        return dst.scatter_add(1, idx.unsqueeze(-1).expand(-1, -1, d), src)
    flat = (idx + torch.arange(b, device=idx.device).unsqueeze(1) * k).reshape(-1)
    return dst.reshape(b * k, d).index_add(0, flat, src.reshape(-1, d)).view(b, k, d)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """CLS and the non-CLS tokens `idx` (`[B, k]`, 0 = the first token after CLS), in one selection."""
    return take_rows(x, torch.cat([idx.new_zeros(idx.shape[0], 1), idx + 1], dim=1))


def agent_macs(m: TokenAgent, args: tuple, kwargs: dict, out: Any) -> int:
    """The scorer's cost when it runs (LayerNorm, the CLS product, two Linears) and the fusion's weighted
    sum of the dropped tokens; selection is free."""
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or m.sample is not None:
        return 0
    if m.mode == "off" or (m.mode == "batched" and (m.keep is None or m.keep >= x.shape[1] - 1)):
        return 0
    b, n, d = x.shape
    fused = 0
    if m.fuse == "one" and isinstance(out, torch.Tensor) and out is not x:  # out: CLS, the kept, the fused
        fused = b * ((n - 1) - (out.shape[1] - 2)) * d
    elif m.fuse == "merge" and isinstance(out, torch.Tensor) and out is not x:  # similarities + the means
        kept = out.shape[1] - 1
        fused = b * ((n - 1 - kept) * (kept * d + 2 * d) + kept * d)
    if m.score != "agent":
        return fused
    if not m.folds_cls():  # the written form: a 2D-wide first Linear on [h, h * h_cls]
        return b * (n - 1) * (2 * d + d + 2 * d * m.hidden + m.hidden + m.hidden + 1) + b * 2 * d + fused
    # per image: the CLS LayerNorm and its W_eff = W_a + W_b * h_cls; per token: LayerNorm, the D-wide
    # first Linear, its bias, the second Linear
    per_token = 2 * d + d * m.hidden + m.hidden + m.hidden + 1
    return b * ((n - 1) * per_token + 2 * d + m.hidden * d) + fused


def _resize_agent(m: TokenAgent) -> None:
    m.dim = m.norm.weight.shape[0]
    m.norm.normalized_shape = (m.dim,)
    m.mlp[0].in_features = m.mlp[0].weight.shape[1]


@register_op(TokenAgent, leaf=True, macs=agent_macs, resize=_resize_agent)
def agent_rule(c: Any) -> Any:
    """Tokens pass through channel by channel (the agent only drops rows), so the residual width stays
    prunable; the scorer's LayerNorm and both halves of its first Linear follow the pruned features."""
    out = passthrough(c)
    dims = getattr(out, "dims", None)
    if dims and dims[-1] is not None:
        v = dims[-1]
        c.axis("norm.weight", 0, v)
        c.axis("norm.bias", 0, v)
        c.axis("mlp.0.weight", 1, np.concatenate([v, v]))
        c.a.fixup(c.node.name, _mask_agent_norm, vec=v)
    return out


def _mask_agent_norm(net: Any, fx: Any, keep_of: Any, mode: str) -> None:
    """Soft pruning: the scorer's LayerNorm normalises over the kept features only, as the hard prune's does."""
    from ..rules.layers import MaskedLayerNorm

    keep = keep_of(fx.data["vec"])
    agent = net.network[net.node(fx.node).module]
    if mode == "soft" and not keep.all() and not isinstance(agent.norm, MaskedLayerNorm):
        agent.norm = MaskedLayerNorm(agent.norm, torch.from_numpy(keep))


__all__ = ["TokenAgent", "keep_top", "agent_macs", "MODES", "SCORES"]
