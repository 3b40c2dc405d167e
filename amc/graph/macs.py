"""MACs of the built-in ops, in ptflops / Torch-Pruning conventions so counts compare like for like.

Each function is the `macs` facet of op registry entries (`amc.graph.ops`): `(module or callable, args,
kwargs, output) -> MACs` of one call, read from the shapes that call actually saw.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

def _numel(t: Any) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else 0


def conv_macs(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> int:
    per_pos = math.prod(m.kernel_size) * m.in_channels * (m.out_channels // m.groups)
    active = out.shape[0] * math.prod(out.shape[2:])
    return per_pos * active + (m.out_channels * active if m.bias is not None else 0)


def linear_macs(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> int:
    return _numel(args[0]) * out.shape[-1] + (out.numel() if m.bias is not None else 0)


def rnn_macs(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> int:
    """nn.RNN/GRU/LSTM: per step, layer and direction, `gates * H * (input + H)` multiply-adds (+ biases)."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor):
        return 0
    steps, batch = (x.shape[0], 1) if x.dim() == 2 else \
        ((x.shape[1], x.shape[0]) if m.batch_first else (x.shape[0], x.shape[1]))
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    h, d = m.hidden_size, 2 if m.bidirectional else 1
    total = 0
    for layer in range(m.num_layers):
        inp = m.input_size if layer == 0 else h * d
        total += gates * h * (inp + h + (2 if m.bias else 0))
    return total * d * steps * batch


def rnn_cell_macs(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> int:
    """nn.RNNCell/GRUCell/LSTMCell: one step, counted as nn.RNN/GRU/LSTM count each step."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor):
        return 0
    gates = {"LSTMCell": 4, "GRUCell": 3}.get(type(m).__name__, 1)
    batch = x.shape[0] if x.dim() == 2 else 1
    return gates * m.hidden_size * (m.input_size + m.hidden_size + (2 if m.bias else 0)) * batch


def bilinear_macs(m: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """nn.Bilinear / F.bilinear: `x1^T W_k x2` for each of the out features, per sample (+ the bias)."""
    weight = getattr(m, "weight", None) if isinstance(m, nn.Module) else (args[2] if len(args) > 2 else kwargs.get("weight"))
    bias = getattr(m, "bias", None) if isinstance(m, nn.Module) else (args[3] if len(args) > 3 else kwargs.get("bias"))
    if not isinstance(weight, torch.Tensor) or not isinstance(out, torch.Tensor):
        return 0
    rows = out.numel() // weight.shape[0]
    return rows * weight.numel() + (out.numel() if bias is not None else 0)


def norm_macs(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> int:
    affine = getattr(m, "affine", getattr(m, "elementwise_affine", False))
    return _numel(args[0]) * (2 if affine else 1)


def out_numel(m: Any, args: tuple, kwargs: dict, out: Any) -> int:
    return _numel(out)


def in_numel(m: Any, args: tuple, kwargs: dict, out: Any) -> int:
    return _numel(args[0]) if args else 0


def mha_macs(m: nn.MultiheadAttention, args: tuple, kwargs: dict, out: Any) -> int:
    q = args[0] if args else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs.get("key", q)
    v = args[2] if len(args) > 2 else kwargs.get("value", k)
    bdim, ldim = (0, 1) if m.batch_first else (1, 0)
    if q.dim() == 2:
        bdim, ldim, batch = None, 0, 1
    else:
        batch = q.shape[bdim]
    qlen, klen, vlen = q.shape[ldim], k.shape[ldim], v.shape[ldim]
    qdim, kdim, vdim = q.shape[-1], k.shape[-1], v.shape[-1]
    e = m.embed_dim
    flops = qlen * e + qlen * qdim * e + klen * kdim * e + vlen * vdim * e
    if m.in_proj_bias is not None:
        flops += (qlen + klen + vlen) * e
    head = e // m.num_heads
    flops += m.num_heads * (qlen * klen * head * 2 + qlen * klen)
    flops += qlen * e * (m.out_proj.out_features + 1)
    return flops * batch


_FMHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
              "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias")


def fmha_macs(fn: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """`F.multi_head_attention_forward` (WavLM calls it with its own weights): as nn.MultiheadAttention counts."""
    given = {**dict(zip(_FMHA_ARGS, args)), **kwargs}
    w = given.get("out_proj_weight")
    if not isinstance(w, torch.Tensor) or not isinstance(given.get("query"), torch.Tensor):
        return 0
    layer = SimpleNamespace(batch_first=False, embed_dim=int(given["embed_dim_to_check"]),
                            num_heads=int(given["num_heads"]), in_proj_bias=given.get("in_proj_bias"),
                            out_proj=SimpleNamespace(out_features=w.shape[0]))
    return mha_macs(layer, (given["query"], given.get("key", given["query"]), given.get("value", given["query"])),
                    {}, out)


def fconv_macs(fn: Any, args: tuple, kwargs: dict, out: Any) -> int:
    w = args[1] if len(args) > 1 else kwargs["weight"]  # F.conv1d(x, weight=w) (Mamba's causal conv)
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    active = out.shape[0] * math.prod(out.shape[2:])
    return math.prod(w.shape[1:]) * w.shape[0] * active + (w.shape[0] * active if bias is not None else 0)


def flinear_macs(fn: Any, args: tuple, kwargs: dict, out: Any) -> int:
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return _numel(args[0]) * out.shape[-1] + (out.numel() if bias is not None else 0)


def matmul_macs(fn: Any, args: tuple, kwargs: dict, out: Any) -> int:
    a = args[0]
    return (out.numel() * a.shape[-1]) if isinstance(a, torch.Tensor) and isinstance(out, torch.Tensor) else 0


def grouped_mm_macs(fn: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """Mixture-of-experts grouped GEMM (`F.grouped_mm`, `torch._grouped_mm`): every output row is one token's
    product with its expert's matrix, `out.numel() * K`; with both operands 2D the groups split K instead
    (`out` is `(groups, M, N)`), so each of the M x N outputs sums K products once."""
    a = args[0] if args else kwargs.get("mat_a", kwargs.get("self"))
    b = args[1] if len(args) > 1 else kwargs.get("mat_b", kwargs.get("mat2"))
    if not all(isinstance(t, torch.Tensor) for t in (a, b, out)):
        return 0
    if a.dim() == 2 and b.dim() == 2 and out.dim() == 3:
        return out.shape[1] * out.shape[2] * a.shape[-1]
    return out.numel() * a.shape[-1]


def addmm_macs(fn: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """`input + mat1 @ mat2` (addmm, baddbmm; Hugging Face's GPT-2 Conv1D): the product, plus the added term
    as a linear layer's bias counts."""
    a = args[1] if len(args) > 1 else kwargs.get("mat1", kwargs.get("batch1"))
    if not (isinstance(a, torch.Tensor) and isinstance(out, torch.Tensor)):
        return 0
    return out.numel() * a.shape[-1] + out.numel()


def contraction_macs(fn: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """mv, dot, inner, tensordot: every output element sums `c` products, `c` being the contracted size
    (`a.numel() * b.numel() == out.numel() * c**2` for a contraction without broadcasting)."""
    a, b = (args + (None, None))[:2]
    if not all(isinstance(t, torch.Tensor) for t in (a, b, out)) or out.numel() == 0:
        return 0
    return out.numel() * math.isqrt(a.numel() * b.numel() // out.numel())


def addbmm_macs(fn: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """`input + sum_b batch1[b] @ batch2[b]`: every batch's product, plus the added term."""
    b1 = args[1] if len(args) > 1 else kwargs.get("batch1")
    if not isinstance(b1, torch.Tensor) or not isinstance(out, torch.Tensor):
        return 0
    return b1.shape[0] * out.numel() * b1.shape[-1] + out.numel()


def chain_macs(fn: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """linalg.multi_dot / chain_matmul: the products of the cheapest order, which both compute in (matrix
    chain dynamic programme; a first or last 1-D operand is a row or column vector)."""
    mats = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
    if len(mats) < 2 or not all(isinstance(t, torch.Tensor) for t in mats):
        return 0
    dims = [mats[0].shape[0] if mats[0].dim() == 2 else 1] + [t.shape[-1] for t in mats[:-1]] \
        + [mats[-1].shape[-1] if mats[-1].dim() == 2 else 1]
    n = len(mats)
    cost = [[0] * n for _ in range(n)]
    for span in range(1, n):
        for i in range(n - span):
            j = i + span
            cost[i][j] = min(cost[i][k] + cost[k + 1][j] + dims[i] * dims[k + 1] * dims[j + 1] for k in range(i, j))
    return cost[0][n - 1]


def einsum_macs(fn: Any, args: tuple, kwargs: dict, out: Any) -> int:
    eq = args[0].replace(" ", "")
    ops = args[1:] if not (len(args) == 2 and isinstance(args[1], (list, tuple))) else args[1]
    lhs = eq.split("->")[0].split(",")
    sizes: Dict[str, int] = {}
    for term, t in zip(lhs, ops):
        if "..." in term:
            return _numel(out)  # broadcasting einsum: only the output is known reliably
        for ch, n in zip(term, t.shape):
            sizes[ch] = n
    return math.prod(sizes.values()) if len(ops) > 1 else 0


def sdpa_macs(fn: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """The two products (q k^T, then p v), as the hand-written matmuls count: `amc.fuse_attention`
    must not change a network's count (the scale is an element-wise multiply, counted nowhere else)."""
    q, k, v = args[0], args[1], args[2]
    lq, e = q.shape[-2], q.shape[-1]
    s, ev = k.shape[-2], v.shape[-1]
    batch = math.prod(q.shape[:-2])
    return batch * lq * s * (e + ev)


def fnorm_macs(fn: Any, args: tuple, kwargs: dict, out: Any) -> int:
    weight = kwargs.get("weight", args[2] if fn is F.layer_norm and len(args) > 2 else None)
    return _numel(args[0]) * (2 if weight is not None else 1)
