"""Rules of matrix products and attention, and their hard/soft-prune edits (attention keeps its scale)."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import PruningError
from ..dependency import TL, Fixup, RuleCall, Vec, unlabeled_like
from ...graph.network import ReconstructedNetwork
from ...graph.ops import register_op

from .common import _broadcast, _dims_of, _out_tl, arg_dims
from .registry import opaque, register_rule

T = torch.Tensor
KeepFn = Callable[[np.ndarray], np.ndarray]


def _matmul_dims(c: RuleCall, da: List[Vec], db: List[Vec], sa: Sequence[int], sb: Sequence[int],
                 out_shape: Sequence[int]) -> List[Vec]:
    if len(sa) == 1:
        da, sa = [None] + da, [1] + list(sa)
        drop_a = True
    else:
        drop_a = False
    if len(sb) == 1:
        db, sb = db + [None], list(sb) + [1]
        drop_b = True
    else:
        drop_b = False
    c.a.uf.union_vecs(da[-1], db[-2]) if (da[-1] is not None or db[-2] is not None) else None
    batch = _broadcast(c, [(da[:-2], sa[:-2]), (db[:-2], sb[:-2])],
                       [max(x, y) for x, y in _pad_zip(sa[:-2], sb[:-2])])
    out = batch + ([] if drop_a else [da[-2]]) + ([] if drop_b else [db[-1]])
    return out if len(out) == len(out_shape) else [None] * len(out_shape)


def _pad_zip(a: Sequence[int], b: Sequence[int]):
    n = max(len(a), len(b))
    a = [1] * (n - len(a)) + list(a)
    b = [1] * (n - len(b)) + list(b)
    return zip(a, b)


@register_rule(torch.matmul, T.matmul, T.__matmul__, torch.bmm, T.bmm, torch.mm, T.mm)
def matmul(c: RuleCall) -> Any:
    a, b = c.args[0], c.args[1]
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and isinstance(c.out, torch.Tensor)):
        return opaque(c)
    return TL(_matmul_dims(c, _dims_of(c, 0, a), _dims_of(c, 1, b), a.shape, b.shape, c.out.shape))


_GROUPED_MM = [f for f in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f]


@register_rule(*_GROUPED_MM)
def grouped_mm(c: RuleCall) -> Any:
    """Mixture-of-experts grouped GEMM: `a [tokens, K] @ b [experts, K, N]` (each row by its expert's matrix,
    rows grouped by `offs`), or `a [G, M, K] @ b [G, K, N]`. K couples a's last dim with b's, N is b's
    last; the experts stay whole (the offsets count rows per expert). Both 2-D (K split by `offs`): whole."""
    (a, da), (b, db) = arg_dims(c, 0, "mat_a"), arg_dims(c, 1, "mat_b")
    if not all(isinstance(t, torch.Tensor) for t in (a, b, c.out)) or b.dim() != 3 or a.dim() not in (2, 3):
        return opaque(c)
    c.a.uf.union_vecs(da[-1], db[-2]) if (da[-1] is not None or db[-2] is not None) else None
    c.a.uf.freeze(db[0]) if db[0] is not None else None
    if a.dim() == 3:
        c.a.uf.freeze(da[0]) if da[0] is not None else None
        return _out_tl(c.out, [None, da[1], db[-1]])
    return _out_tl(c.out, [da[0], db[-1]])


@register_rule(torch.addmm, T.addmm, torch.baddbmm, T.baddbmm)
def addmm(c: RuleCall) -> Any:
    """`bias + mat1 @ mat2` (Hugging Face's GPT-2 `Conv1D`: `addmm(b, x, W)` with W stored [in, out]): the
    product couples like matmul, and the added term broadcasts onto its result like an element-wise add."""
    batched = c.module.fn in (torch.baddbmm, T.baddbmm)  # BLOOM: alibi.baddbmm(batch1=q, batch2=k, ...)
    (base, lb), (a, la), (b, lb2) = (arg_dims(c, i, name) for i, name in
                                     enumerate(("input", "batch1" if batched else "mat1",
                                                "batch2" if batched else "mat2")))
    if not all(isinstance(t, torch.Tensor) for t in (base, a, b, c.out)):
        return opaque(c)
    prod = _matmul_dims(c, la, lb2, a.shape, b.shape, c.out.shape)
    return TL(_broadcast(c, [(prod, tuple(c.out.shape)), (lb, tuple(base.shape))], list(c.out.shape)))


@register_rule(torch.einsum)
def einsum(c: RuleCall) -> Any:
    eq = c.args[0].replace(" ", "")
    ops = list(c.args[1:])
    lops = list(c.largs[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops, lops = list(ops[0]), list(lops[0] or [None] * len(ops[0]))
    if "..." in eq or "->" not in eq:
        return opaque(c)
    lhs, rhs = eq.split("->")
    letters: Dict[str, Vec] = {}
    for term, t, lt in zip(lhs.split(","), ops, lops):
        dims = list(lt.dims) if isinstance(lt, TL) and lt.ndim == t.dim() else [None] * t.dim()
        for ch, v, n in zip(term, dims, t.shape):
            if ch in letters:
                prev = letters[ch]
                if n > 1 and (prev is not None or v is not None):
                    c.a.uf.union_vecs(prev, v)
                letters[ch] = prev if prev is not None else v
            else:
                letters[ch] = v
    return _out_tl(c.out, [letters.get(ch) for ch in rhs])


@register_rule(F.scaled_dot_product_attention)
def sdpa(c: RuleCall) -> Any:
    q, k, v = c.args[0], c.args[1], c.args[2]
    dq, dk, dv = _dims_of(c, 0, q), _dims_of(c, 1, k), _dims_of(c, 2, v)
    c.a.uf.union_vecs(dq[-1], dk[-1]) if (dq[-1] is not None or dk[-1] is not None) else None
    c.a.uf.union_vecs(dk[-2], dv[-2]) if (dk[-2] is not None or dv[-2] is not None) else None
    items = [(dq[:-2], q.shape[:-2]), (dk[:-2], k.shape[:-2]), (dv[:-2], v.shape[:-2])]
    mask, dm = arg_dims(c, 3, "attn_mask")
    if isinstance(mask, torch.Tensor):  # added to the scores: its head dim lines up with q's (T5's position bias)
        for vec in dm[-2:]:
            c.a.uf.freeze(vec)
        items.append((dm[:-2], mask.shape[:-2]))
    batch = _broadcast(c, items, c.out.shape[:-2])
    if dq[-1] is not None and c.kwargs.get("scale") is None and len(c.args) < 7:
        c.a.fixup(c.node.name, fix_sdpa_scale, scale=1.0 / math.sqrt(q.shape[-1]))
    return TL(batch + [dq[-2], dv[-1]])


# ----------------------------------------------------------------------------------------------
# layers with parameters

@register_rule(nn.MultiheadAttention)
def multihead_attention(c: RuleCall) -> Any:
    """The embed dim follows the residual stream; head dims shrink with it. One in_proj weight reads query,
    key and value by the same columns, so in cross-attention (nn.Transformer's decoder reading the encoder's
    memory) the three inputs' channels are one group."""
    m, name = c.module, c.node.name
    if m.bias_k is not None or m.add_zero_attn:
        opaque(c)
        return unlabeled_like(c.out)
    (_, dims), (_, key), (_, value) = (arg_dims(c, i, n) for i, n in enumerate(("query", "key", "value")))
    if not m._qkv_same_embed_dim:  # kdim / vdim: key and value channels are columns of their own weights
        for attr, d in (("k_proj_weight", key), ("v_proj_weight", value)):
            if d and d[-1] is not None:
                c.a.axis(name, attr, 1, d[-1])
        c.a.uf.freeze(dims[-1] if dims else None)  # the embed dim stays (its head dims have no rule here)
        return [TL(dims[:-1] + [None]), unlabeled_like(c.out[1])]
    ends = [d[-1] if d else None for d in (dims, key, value)]
    if any(e is None for e in ends):  # a channel dim with no labels (a model input) cannot follow the others
        for e in ends:
            c.a.uf.freeze(e)
        dims = dims[:-1] + [None]
    else:
        c.a.uf.union_vecs(ends[0], ends[1])
        c.a.uf.union_vecs(ends[0], ends[2])
    emb = dims[-1]
    if emb is None:
        return [TL(dims), unlabeled_like(c.out[1])]
    c.a.axis(name, "in_proj_weight", 1, emb)
    c.a.axis(name, "out_proj.weight", 0, emb)
    if m.out_proj.bias is not None:
        c.a.axis(name, "out_proj.bias", 0, emb)
    c.a.multiples.append((emb, m.num_heads))
    c.a.fixup(name, fix_mha, vec=emb)
    return [TL(dims), unlabeled_like(c.out[1])]


# ----------------------------------------------------------------------------------------------


def fix_sdpa_scale(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    if mode == "hard":
        net.node(fx.node).kwargs["scale"] = fx.data["scale"]  # head dims shrank: keep the original scale


def _resize_mha(m: nn.MultiheadAttention) -> None:
    if not m._qkv_same_embed_dim:
        m.kdim, m.vdim = m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]


register_op(nn.MultiheadAttention, resize=_resize_mha)


def mha_inner_selection(m: nn.MultiheadAttention, n_keep: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per head, the q/k dims and the v dims to keep (same count in every head, as MHA requires)."""
    E, H = m.in_proj_weight.shape[0] // 3, m.num_heads
    D = E // H
    if n_keep % H:
        raise PruningError(f"attention embed dim must stay a multiple of num_heads={H}, got {n_keep}")
    d_keep = n_keep // H
    w = m.in_proj_weight.detach().float()
    q, k, v = w[:E].view(H, D, -1), w[E:2 * E].view(H, D, -1), w[2 * E:].view(H, D, -1)
    qk = q.pow(2).sum(-1) + k.pow(2).sum(-1)
    vo = v.pow(2).sum(-1) + m.out_proj.weight.detach().float().view(-1, H, D).pow(2).sum(0)
    base = (torch.arange(H) * D).unsqueeze(1)
    qk_sel = (torch.sort(torch.argsort(qk, dim=1, descending=True, stable=True)[:, :d_keep], dim=1).values
              + base).flatten()
    v_sel = (torch.sort(torch.argsort(vo, dim=1, descending=True, stable=True)[:, :d_keep], dim=1).values
             + base).flatten()
    return qk_sel, v_sel, d_keep


def fix_mha(net: ReconstructedNetwork, fx: Fixup, keep_of: KeepFn, mode: str) -> None:
    keep = keep_of(fx.data["vec"])
    if keep.all():
        return
    m: nn.MultiheadAttention = net.module_of(fx.node)
    E, H = m.in_proj_weight.shape[0] // 3, m.num_heads
    D = E // H
    qk_sel, v_sel, d_keep = mha_inner_selection(m, int(keep.sum()))
    rows = torch.cat([qk_sel, qk_sel + E, v_sel + 2 * E])
    if mode == "hard":
        scale = math.sqrt(d_keep / D)  # keep softmax(q.k / sqrt(D)) with the smaller head dim
        w = m.in_proj_weight.data[rows].clone()
        w[: len(qk_sel)] *= scale
        m.in_proj_weight.data = w
        if m.in_proj_bias is not None:
            b = m.in_proj_bias.data[rows].clone()
            b[: len(qk_sel)] *= scale
            m.in_proj_bias.data = b
        m.out_proj.weight.data = m.out_proj.weight.data[:, v_sel].contiguous()
        n = len(qk_sel)
        m.embed_dim = m.kdim = m.vdim = n
        m.head_dim = d_keep
        m.out_proj.in_features = n
        m.out_proj.out_features = m.out_proj.weight.shape[0]
    else:
        drop = torch.ones(3 * E, dtype=torch.bool)
        drop[rows] = False
        m.in_proj_weight.data[drop] = 0
        if m.in_proj_bias is not None:
            m.in_proj_bias.data[drop] = 0
        vdrop = torch.ones(E, dtype=torch.bool)
        vdrop[v_sel] = False
        m.out_proj.weight.data[:, vdrop] = 0
