"""amc.count counts what a network multiplies: mixture-of-experts grouped GEMMs and the functional attention
as their module forms count, and an op that computes with weights but has no MACs rule is named, not
silently counted as zero."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import amc


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_mixture_of_experts_counts_as_its_eager_loop(experts: str) -> None:
    """The grouped GEMM (transformers' default MoE kernel) counted 0 MACs: a Mixtral's count was its
    attention alone (0.30x the truth here) and pruning ratios read 0.80x where they were 0.95x."""
    transformers = pytest.importorskip("transformers")
    counts = {}
    for impl in ("eager", experts):
        config = transformers.MixtralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2, max_position_embeddings=64)
        config._experts_implementation = impl
        torch.manual_seed(0)
        model = transformers.MixtralForCausalLM(config).eval()
        ids = torch.randint(1, 100, (2, 12))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            counts[impl] = amc.count(model, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)[0]
        assert not [w for w in caught if "amc.count" in str(w.message)]  # nothing left uncounted
    experts_macs = 2 * 12 * 2 * (64 * 256 + 128 * 64)  # tokens x top-2 x (gate_up + down)
    assert counts[experts] == counts["eager"] > experts_macs


class _FunctionalAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.m = mha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m
        return F.multi_head_attention_forward(x, x, x, 32, 4, m.in_proj_weight, m.in_proj_bias, None, None, False, 0.0,
                                              m.out_proj.weight, m.out_proj.bias, training=False,
                                              need_weights=False)[0]


class _ModuleAttention(_FunctionalAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x, x, x, need_weights=False)[0]


def test_functional_attention_counts_as_the_module() -> None:
    """WavLM calls F.multi_head_attention_forward with its own weights: its attention counted 0."""
    mha, x = nn.MultiheadAttention(32, 4).eval(), torch.randn(7, 2, 32)
    assert amc.count(_FunctionalAttention(mha), x) == amc.count(_ModuleAttention(mha), x)


class _Prototypes(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.centres = nn.Linear(8, 16), nn.Parameter(torch.randn(10, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(self.embed(x), self.centres)


def test_weights_used_by_an_op_without_a_macs_rule_are_named() -> None:
    x = torch.randn(4, 8)
    with pytest.warns(UserWarning, match=r"amc.count: 1 node\(s\) compute with the network's weights .*torch.cdist"):
        macs, _ = amc.count(_Prototypes(), x)
    assert macs == 4 * 8 * 16 + 4 * 16  # the linear layer only, as the warning says
