"""amc.fuse_attention: hand-written attention -> one F.scaled_dot_product_attention node, same function."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import amc
from amc.errors import GraphError
from amc.models.vit import vit_digits


class ScaledScores(nn.Module):
    """softmax(q @ k.transpose(-2, -1) * s) @ v: our ViTs, DeiT's original code."""

    def forward(self, q, k, v):
        return ((q @ k.transpose(-2, -1)) * 0.3).softmax(dim=-1) @ v


class DividedMasked(nn.Module):
    """BERT's eager attention: matmul(q, k.transpose(-1, -2)) / sqrt(d) + mask, F.softmax, matmul."""

    def forward(self, q, k, v, mask):
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return torch.matmul(F.softmax(s + mask, dim=-1), v)


class ScaledQuery(nn.Module):
    """timm's non-fused path: q = q * scale first, then q @ k.mT, no scale after."""

    def forward(self, q, k, v):
        return torch.softmax((q * 0.25) @ k.mT, dim=3) @ v


class ProbsReturned(nn.Module):
    """The probabilities are an output too: fusing would lose them."""

    def forward(self, q, k, v):
        p = (q @ k.transpose(-2, -1)).softmax(-1)
        return p @ v, p


class DropoutOnProbs(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, q, k, v):
        return self.drop((q @ k.transpose(-2, -1)).softmax(-1)) @ v


class OtherDim(nn.Module):
    """A softmax over the query dim is not attention as SDPA computes it."""

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1)).softmax(-2) @ v


class BoolMaskAdded(nn.Module):
    def forward(self, q, k, v, mask):
        return ((q @ k.transpose(-2, -1)) + mask.float() * 0 + mask).softmax(-1) @ v


def _qkv(batch: int, mask: bool = False):
    g = torch.Generator().manual_seed(batch)
    out = (torch.randn(batch, 2, 5, 8, generator=g), torch.randn(batch, 2, 7, 8, generator=g),
           torch.randn(batch, 2, 7, 4, generator=g))
    return out + (torch.randn(batch, 1, 1, 7, generator=g),) if mask else out


FUSABLE = {
    "scaled": (ScaledScores, lambda b: _qkv(b)),
    "divided_masked": (DividedMasked, lambda b: _qkv(b, mask=True)),
    "scaled_query": (ScaledQuery, lambda b: _qkv(b)),
}


@pytest.mark.parametrize("name", sorted(FUSABLE))
def test_fused_site_computes_the_same_and_counts_the_same(name):
    cls, make = FUSABLE[name]
    net = amc.trace(cls(), *make(2))
    fused = amc.fuse_attention(net)
    assert len(fused.meta["fused_attention"]["fused"]) == 1 and fused.meta["fused_attention"]["skipped"] == []
    assert [n.op for n in fused.layer_nodes].count("ScaledDotProductAttention") == 1
    assert not any(n.op in ("Elementwise", "Functional") and "softmax" in n.name for n in fused.layer_nodes)
    for batch in (1, 3):
        torch.testing.assert_close(fused(*make(batch)), cls()(*make(batch)), atol=1e-5, rtol=1e-5)
    assert amc.count(fused, *make(2)) == amc.count(net, *make(2))
    assert "fused_attention" not in net.meta and len(net.layer_nodes) > len(fused.layer_nodes)  # input untouched


@pytest.mark.parametrize("cls, why", [(ProbsReturned, "read elsewhere"), (DropoutOnProbs, "dropout"),
                                      (OtherDim, None)])
def test_sites_that_would_change_the_function_stay(cls, why):
    torch.manual_seed(0)
    model = cls().eval()
    net = amc.trace(model, *_qkv(2))
    fused = amc.fuse_attention(net)
    assert fused.meta["fused_attention"]["fused"] == []
    skipped = fused.meta["fused_attention"]["skipped"]
    assert (why is None and skipped == []) or (len(skipped) == 1 and why in skipped[0])
    assert [n.op for n in fused.layer_nodes] == [n.op for n in net.layer_nodes]
    torch.testing.assert_close(fused(*_qkv(3)), model(*_qkv(3)))


def test_bool_mask_is_not_taken_for_an_additive_one():
    q, k, v = _qkv(2)
    mask = torch.rand(2, 1, 1, 7) > 0.5
    net = amc.trace(BoolMaskAdded(), q, k, v, mask)
    fused = amc.fuse_attention(net)
    torch.testing.assert_close(fused(q, k, v, mask), BoolMaskAdded()(q, k, v, mask))


def test_vit_fused_prunes_saves_and_exports_like_the_original(tmp_path):
    torch.manual_seed(0)
    vit = vit_digits().eval()
    x = torch.randn(2, 1, 16, 16)
    net = amc.trace(vit, x)
    fused = amc.fuse_attention(vit, x)  # a module is traced first and left as it was
    assert len(fused.meta["fused_attention"]["fused"]) == len(vit.blocks)
    x5 = torch.randn(5, 1, 16, 16)
    torch.testing.assert_close(fused(x5), vit(x5), atol=1e-5, rtol=1e-5)
    # pruning the fused graph = fusing the pruned graph (the explicit scale survives the head-dim cut)
    a = amc.prune(fused, ratio=0.5)
    b = amc.fuse_attention(amc.prune(net, ratio=0.5))
    assert amc.count(a, x) == amc.count(b, x) < amc.count(net, x)
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)
    for ext in ("json", "pkl"):
        a.save(str(tmp_path / f"v.{ext}"))
        back = amc.ReconstructedNetwork.load(str(tmp_path / f"v.{ext}"), trusted=True)
        torch.testing.assert_close(back(x), a(x))
    from amc.export import save_onnx
    save_onnx(a, str(tmp_path / "v.onnx"), x)  # checks onnxruntime against the graph at another batch


def test_bad_input_is_named():
    with pytest.raises(GraphError, match="needs example inputs"):
        amc.fuse_attention(ScaledScores())
    with pytest.raises(GraphError, match="must be an nn.Module"):
        amc.fuse_attention("net.pkl")
