"""Channels flow through the forms users actually write: here, in-place element-wise chains."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import amc


def _soft_equals_hard(model, *inputs, atol=1e-6, no_warnings=False):
    """amc.prune at ratio 0.5, hard and soft: asserts they compute the same and returns the hard network
    (`no_warnings`: the hard prune raises none: no generic-replay node, no frozen channels)."""
    with warnings.catch_warnings():
        if no_warnings:
            warnings.simplefilter("error")
        hard = amc.prune(model, ratio=0.5, example_inputs=inputs)
    soft = amc.prune(model, ratio=0.5, example_inputs=inputs, mode="soft")
    torch.testing.assert_close(soft(*inputs), hard(*inputs), rtol=1e-4, atol=atol)
    return hard


class InplaceBlock(nn.Module):
    """A conv block written with in-place ops, then flattened into a Linear (issue 19's example)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        y = self.c1(x)
        y.relu_()
        z = self.c2(y)
        z += y
        z.mul_(0.5)
        torch.sigmoid_(z)
        z.exp_()
        return self.fc(z.view(z.size(0), -1))


def test_inplace_chain_is_captured_without_fallback_and_pruned():
    torch.manual_seed(0)
    model, x = InplaceBlock().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "frozen for pruning" fallback
        net = amc.trace(model, x)
    torch.testing.assert_close(net(x), model(x))
    hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert amc.count(hard, x)[0] < 0.5 * amc.count(model, x)[0]
    assert hard(x).shape == (2, 10)
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-5)


class UnknownOpNet(nn.Module):
    """Both convs feed an op with no channel rule: element-wise (`erf`), or mixing channels (`logcumsumexp`)."""

    def __init__(self, fn=lambda t: torch.logcumsumexp(t, dim=1)):
        super().__init__()
        self.fn = fn
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.fn(self.c1(x))
        z = self.fn(self.c2(y))
        return self.fc(z.mean((2, 3)))


def test_prune_says_which_node_froze_the_channels():
    model, x = UnknownOpNet().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # capture's own fallback warning
        plan = amc.compressors.plan_pruning(model, "l2", (x,))
    report = {row["node"]: row["causes"] for row in plan.frozen_report()}
    assert report["c1"] == ["logcumsumexp (Fallback, no channel rule)"]  # probed: it mixes channels
    assert report["c2"] == ["logcumsumexp_1 (Fallback, no channel rule)"]
    assert report["fc"] == ["the network's output shape"]
    assert plan.prunable_fraction() == 0.0 and plan.analysis.probed == []
    with pytest.warns(UserWarning, match=r"only 0% of the layers' output channels can be pruned; the rest are "
                                         r"frozen by logcumsumexp"):
        pruned = amc.prune(model, ratio=0.5, example_inputs=(x,))
    assert amc.count(pruned, x)[0] == amc.count(model, x)[0]


@pytest.mark.parametrize("fn", [torch.special.erf, torch.sinc, lambda t: torch.special.i0(t).log()],
                         ids=["erf", "sinc", "i0_then_log"])
def test_an_element_wise_op_without_a_rule_is_probed_and_pruned(fn):
    model, x = UnknownOpNet(fn).eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = amc.compressors.plan_pruning(model, "l2", (x,))
        hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
        soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert len(plan.analysis.probed) >= 2  # what was probed is reported
    assert amc.count(hard, x)[0] < 0.5 * amc.count(model, x)[0]
    torch.testing.assert_close(hard(x), soft(x))


class ScaleByBuffer(nn.Module):
    """Element-wise, but with a per-channel buffer a pass-through would not slice: never probed."""

    def __init__(self):
        super().__init__()
        self.register_buffer("s", torch.linspace(0.5, 1.5, 16).view(1, -1, 1, 1))

    def forward(self, x):
        return x * self.s


def test_an_op_with_tensors_of_its_own_stays_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), ScaleByBuffer(), nn.Conv2d(16, 8, 1))
    amc.register_op(ScaleByBuffer, leaf=True)
    try:
        x = torch.randn(2, 3, 8, 8)
        plan = amc.compressors.plan_pruning(model, "l2", (x,))
        assert plan.analysis.probed == [] and plan.prunable_fraction() == 0.0
    finally:
        from amc.graph import ops

        ops._MODULE_OPS.pop(ScaleByBuffer, None)


def test_ignored_layers_are_reported_as_ignored():
    model, x = InplaceBlock().eval(), torch.randn(2, 3, 8, 8)
    plan = amc.compressors.plan_pruning(model, "l2", (x,), ignore=["c1"])
    report = {row["node"]: row["causes"] for row in plan.frozen_report()}
    assert report["c1"] == ["ignore='c1'"] and report["c2"] == ["ignore='c1'"]  # z += y couples c2 to c1


def test_a_failing_channel_rule_names_the_node():
    from amc.compressors import rules
    from amc.errors import PruningError
    from amc.graph import ops

    class Odd(nn.Module):
        def forward(self, x):
            return x * 2

    def broken(c):
        raise IndexError("tuple index out of range")

    rules.register_rule(Odd)(broken)
    try:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), Odd(), nn.Conv2d(8, 4, 3)).eval()
        with pytest.raises(PruningError, match=r"channel rule 'broken' failed on node 1 \(Odd.*IndexError"):
            amc.prune(model, ratio=0.5, example_inputs=(torch.randn(1, 3, 8, 8),))
    finally:
        ops._MODULE_OPS.pop(Odd, None)


class KeywordLinear(nn.Module):
    """timm's EVA attention calls F.linear with keyword weight and bias (a raw IndexError before)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.proj, self.head = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.nn.functional.linear(h, weight=self.proj.weight, bias=self.proj.bias)
        return self.head(torch.relu(h))


def test_functional_linear_with_keyword_weight_is_pruned():
    torch.manual_seed(0)
    model, x = KeywordLinear().eval(), torch.randn(2, 8)
    hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert amc.count(hard, x)[0] < 0.5 * amc.count(model, x)[0]
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,kw", [("edgenext_xx_small", {}), ("eva02_tiny_patch14_224", {"img_size": 64})])
def test_timm_models_that_broke_now_prune(name, kw, one_thread):
    """edgenext: XCA reads its residual width into a reshape of unpruned data (the pruned net no longer
    ran); eva02: F.linear with keyword weight (a raw IndexError). Both prune now, soft == hard."""
    import timm  # test extra (setup.py)

    torch.manual_seed(0)
    model, x = timm.create_model(name, pretrained=False, **kw).eval(), torch.randn(1, 3, 64, 64)
    hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert amc.count(hard, x)[0] < 0.75 * amc.count(model, x)[0]
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["vit_digits", "vit_fashion"])
def test_fused_qkv_vit_prunes_residual_heads_and_mlp(name):
    """timm's `qkv.reshape(B, N, 3, H, C // H)` reads C from the residual stream. That size is pinned (the
    hard prune writes the kept head dim as a constant) instead of freezing the residual and the heads:
    every group prunes, soft == hard, and the head count stays."""
    from amc.compressors import plan_pruning
    from amc.models import create, model_info

    torch.manual_seed(0)
    model = create(name, depth=2).eval()
    x = torch.randn(3, *model_info(name).input_size)
    plan = plan_pruning(model, example_inputs=(x[:1],))
    assert plan.prunable_fraction() == 1.0, plan.frozen_report()
    hard = amc.prune(model, ratio=0.5, example_inputs=(x[:1],))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x[:1],), mode="soft")
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-5)
    qkv = hard.network["blocks_0_attn_qkv"]
    dim, heads = model.blocks[0].attn.qkv.in_features, model.blocks[0].attn.heads
    assert qkv.in_features == dim // 2  # the residual stream shrank
    assert qkv.out_features == 3 * heads * (dim // heads // 2)  # every head kept, each half its dims
    assert hard.network["blocks_0_fc1"].out_features == model.blocks[0].fc1.out_features // 2
    assert amc.count(hard, x[:1])[0] < 0.4 * amc.count(model, x[:1])[0]


class SplitSections(nn.Module):
    """`torch.split(y, [8, 16])` (unequal pieces) used to freeze the producer; Tensor.split by keyword too."""

    def __init__(self, keyword: bool):
        super().__init__()
        self.keyword = keyword
        self.c1 = nn.Conv2d(3, 24, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.c1(x).relu()
        p, q = y.split(split_size=[8, 16], dim=1) if self.keyword else torch.split(y, [8, 16], dim=1)
        return self.fc(torch.cat([self.a(p), self.b(q)], 1).mean((2, 3)))


@pytest.mark.parametrize("keyword", [False, True])
def test_split_with_size_list_prunes_each_piece(keyword):
    from amc.compressors import plan_pruning

    torch.manual_seed(0)
    model, x = SplitSections(keyword).eval(), torch.randn(2, 3, 8, 8)
    assert plan_pruning(model, example_inputs=(x[:1],)).prunable_fraction() == 1.0
    hard = amc.prune(model, ratio=0.5, example_inputs=(x[:1],))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x[:1],), mode="soft")
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-5)
    assert hard.network["c1"].out_channels == 12
    assert hard.network["a"].in_channels + hard.network["b"].in_channels == 12


class Recurrent(nn.Module):
    """Linear -> 2-layer RNN/GRU/LSTM -> last step -> Linear; optionally time-major, or given h0 by the caller."""

    def __init__(self, cls, bidirectional=False, batch_first=True):
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.rnn = cls(12, 16, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
        self.head = nn.Linear(16 * (2 if bidirectional else 1), 5)

    def forward(self, x, h=None):
        y = torch.relu(self.inp(x))
        if not self.rnn.batch_first:
            y = y.transpose(0, 1)
        h0 = None if h is None else h.unsqueeze(0).repeat(self.rnn.num_layers, 1, 1)
        y, _ = self.rnn(y) if h0 is None else self.rnn(y, h0)
        if not self.rnn.batch_first:
            y = y.transpose(0, 1)
        return self.head(y[:, -1])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
@pytest.mark.parametrize("bidirectional,batch_first", [(False, True), (True, False)])
def test_recurrent_hidden_size_prunes_with_gates_consistent(cls, bidirectional, batch_first, tmp_path):
    torch.manual_seed(0)
    model = Recurrent(cls, bidirectional, batch_first).eval()
    x = torch.randn(3, 7, 6)
    net = amc.trace(model, x[:1])
    hard = amc.prune(net, 0.5, example_inputs=(x[:1],))
    soft = amc.prune(net, 0.5, example_inputs=(x[:1],), mode="soft")
    rnn = hard.network["rnn"]
    assert rnn.hidden_size == 8 and rnn.weight_hh_l1.shape == (8 * {nn.LSTM: 4, nn.GRU: 3}.get(cls, 1), 8)
    assert amc.count(hard, x[:1])[0] < 0.4 * amc.count(net, x[:1])[0]
    torch.testing.assert_close(hard(x), soft(x), rtol=1e-5, atol=1e-6)  # removed units computed exactly zero
    assert hard(x).shape == model(x).shape
    back = amc.ReconstructedNetwork.load_from_json(hard.save_to_json(file=str(tmp_path / "r.json")))
    torch.testing.assert_close(back(x), hard(x))


def test_recurrent_state_given_by_the_caller_ties_the_hidden_units():
    torch.manual_seed(0)
    model = Recurrent(nn.GRU).eval()
    x, h = torch.randn(2, 5, 6), torch.zeros(2, 16)
    net = amc.trace(model, x[:1], h[:1])
    pruned = amc.prune(net, 0.5, example_inputs=(x[:1], h[:1]))
    assert pruned.network["rnn"].hidden_size == 16  # the caller's h0 has 16 features: nothing to remove
    assert pruned.network["inp"].out_features == 6  # the input side still prunes


class UntrackedDepthwise(nn.Module):
    """cpubone's ConvAttention: GroupNorm(1) then a depthwise conv whose input channels are not tracked."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(1, 16)
        self.dw, self.pw = nn.Conv2d(16, 16, 2, stride=2, groups=16), nn.Conv2d(16, 24, 1)
        self.up, self.fc = nn.Conv2d(24, 16, 1), nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.up(self.pw(self.dw(self.norm(x)).relu()).relu())
        x = x + nn.functional.interpolate(y, scale_factor=2.0)
        return self.fc(x.mean((2, 3)))


class ChannelsAlongLength(nn.Module):
    """CoaT's head: class tokens of three branches stacked as [B, 3, C] and mixed by a Conv1d whose
    length axis is the channel axis, then a Linear over C."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1))
                                  for _ in range(3))
        self.agg, self.fc = nn.Conv1d(3, 1, 1), nn.Linear(16, 10)

    def forward(self, x):
        feats = torch.stack([m(x).mean((2, 3)) for m in (self.a, self.b, self.c)], dim=1)
        return self.fc(self.agg(feats).squeeze(1))


@pytest.mark.parametrize("cls", [UntrackedDepthwise, ChannelsAlongLength], ids=lambda c: c.__name__)
def test_conv_over_untracked_or_laid_out_channels_prunes_safely(cls):
    """A depthwise conv whose input cannot lose channels keeps its output (cpubone_nano broke), and
    channels along a conv's spatial axis stay whole (coat_tiny and bat_resnext26ts broke)."""
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(2, 3, 8, 8)
    hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert hard(x).shape == (2, 10)
    assert amc.count(hard, x)[0] < amc.count(model, x)[0]
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-5)


class FunctionalConv(nn.Conv2d):
    """timm's Conv2dSame / StdConv2d: a Conv2d subclass whose forward calls F.conv2d (traced into)."""

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GroupNormNet(nn.Module):
    """GroupNorm heads (FCOS, RetinaNet v2), timm's one-group GroupNorm1 (functional) and functional
    dense and depthwise convs."""

    def __init__(self):
        super().__init__()
        self.c1, self.gn1 = nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32)
        self.c2, self.gn2 = FunctionalConv(32, 32, 3, padding=1), nn.GroupNorm(1, 32)
        self.dw, self.c3 = FunctionalConv(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 16, 1)
        self.gn3, self.fc = nn.GroupNorm(4, 16, affine=False), nn.Linear(16, 5)
        with torch.no_grad():  # norms that are not the identity, so a wrong prune shows
            for gn in (self.gn1, self.gn2):
                gn.weight.uniform_(0.5, 1.5)
                gn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = self.gn1(self.c1(x)).relu()
        y = self.gn2(self.c2(y)).relu()
        y = nn.functional.group_norm(self.dw(y), 1).relu()
        return self.fc(self.gn3(self.c3(y)).relu().mean((2, 3)))


def test_group_norms_and_functional_convs_prune_exactly():
    """Whole groups go (the kept ones normalise as before), one-group norms go channel by channel,
    functional convs keep their kernel size (they lost a kernel row and column before) and `groups`
    of a functional depthwise conv follows its channels; soft == hard."""
    torch.manual_seed(0)
    model, x = GroupNormNet().eval(), torch.randn(2, 3, 8, 8)
    hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-5)
    assert amc.count(hard, x)[0] < 0.5 * amc.count(model, x)[0]
    gn1 = hard.module_of("gn1")
    assert (gn1.num_groups, gn1.num_channels) == (4, 16) and hard.module_of("gn3").num_groups == 2
    kernels = [p.shape[2:] for n, p in hard.named_parameters() if n.endswith(("c2_weight.value", "dw_weight.value"))]
    assert kernels == [torch.Size([3, 3])] * 2



class L2NormNet(nn.Module):
    """SSD's L2Norm: `F.normalize(x, dim=1) * weight` on conv4_3's output."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3), nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x):
        y = nn.functional.normalize(self.c1(x).relu(), dim=1) * self.scale.view(1, -1, 1, 1)
        return self.fc(self.c2(y).mean((2, 3)))


def test_l2_normalize_over_channels_prunes_exactly():
    torch.manual_seed(0)
    model, x = L2NormNet().eval(), torch.randn(2, 3, 8, 8)
    hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert hard.module_of("c1").out_channels == 8
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-5)


class ChannelRuns(nn.Module):
    """Contiguous runs of channels sliced off a conv's output (`g[:, -3:]`, `g[:, 2:5]`) and concatenated."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)
        self.c3, self.fc = nn.Conv2d(8 + 3 + 3, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        g = self.c2(self.c1(x).relu()[..., ::2, 1::2])
        return self.fc(self.c3(torch.cat([g, g[:, -3:], g[..., 2:5, :, :]], 1)).mean((2, 3)))


def test_contiguous_channel_slices_prune_with_their_readers():
    torch.manual_seed(0)
    model, x = ChannelRuns().eval(), torch.randn(2, 3, 8, 8)
    hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert hard.module_of("c2").out_channels < 8 and hard.module_of("c3").in_channels < 14
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-5)


class FoldsTokensIntoBatch(nn.Module):
    """hiera's Unroll: a position embedding labels the token dim, then tokens are folded into the batch
    (`B *= 4`) and viewed with that run-time size."""

    def __init__(self):
        super().__init__()
        self.proj, self.fc = nn.Linear(8, 16), nn.Linear(16, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, 16))

    def forward(self, x):
        B = x.shape[0]
        y = (self.proj(x) + self.pos).view(B, 4, 4, 16).permute(0, 2, 1, 3).flatten(0, 1)
        B = B * 4
        y = y.view(B, 2, 2, 16)
        return self.fc(y.mean((1, 2))).view(x.shape[0], 4, 4).sum(1)


def test_pruned_net_keeps_batch_folded_sizes_dynamic():
    torch.manual_seed(0)
    model = FoldsTokensIntoBatch().eval()
    hard = amc.prune(model, ratio=0.5, example_inputs=(torch.randn(1, 16, 8),))
    soft = amc.prune(model, ratio=0.5, example_inputs=(torch.randn(1, 16, 8),), mode="soft")
    x = torch.randn(3, 16, 8)
    assert hard.module_of("proj").out_features < 16
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-5)



def test_one_channel_split_piece_is_kept(one_thread):
    """MobileViTv2's linear attention splits `qkv` into [1, d, d]: the one-channel query must not vanish
    (the pruned network no longer ran)."""
    import timm  # test extra (setup.py)

    torch.manual_seed(0)
    model, x = timm.create_model("mobilevitv2_050", pretrained=False).eval(), torch.randn(1, 3, 64, 64)
    hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert amc.count(hard, x)[0] < 0.75 * amc.count(model, x)[0]
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-4)


class ChannelStatistics(nn.Module):
    """Reductions over the channel dim inside a block: timm's SimpleNorm (`x * rsqrt(var(x, channels))`,
    channels last), ConvNeXt-V2's GRN (`g / g.mean(channels)` with `torch.addcmul`), CBAM-style spatial
    attention (`amax` and `mean` over channels), `F.rms_norm` on tokens, and `x.norm(2, 1)`."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.att, self.fc = nn.Conv2d(2, 1, 3, padding=1), nn.Linear(16, 6)
        self.gamma, self.beta = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.rand(16) - 0.5)
        self.w = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x):
        y = self.c1(x).permute(0, 2, 3, 1)
        y = y * torch.rsqrt(torch.var(y, dim=(-1,), keepdim=True) + 1e-5) * self.w    # SimpleNorm
        g = torch.norm(y, p=2, dim=(1, 2), keepdim=True)                               # GRN
        y = torch.addcmul(self.beta, y, self.gamma * (g / (g.mean(dim=-1, keepdim=True) + 1e-6)) + 1)
        z = self.c2(y.permute(0, 3, 1, 2).relu())
        a = torch.cat([z.amax(dim=1, keepdim=True), z.mean(dim=1, keepdim=True)], 1)  # spatial attention
        z = z * self.att(a).sigmoid() / z.norm(2, 1, keepdim=True).clamp_min(1e-3)
        t = nn.functional.rms_norm(z.flatten(2).transpose(1, 2), (16,), None, 1e-6)   # tokens
        return self.fc(t.logsumexp(dim=1))


@pytest.mark.parametrize("fmt", ["pkl", "json"])
def test_reductions_over_channels_prune_with_the_statistics_of_the_kept_ones(fmt, tmp_path):
    """Channels reduced over (var, mean, amax, norm, rms_norm) are pruned as LayerNorm's are: the hard
    network reduces over the kept ones, the soft one reads only those (a zeroed channel would still
    count in a mean or a max), so soft == hard; both survive the safe loaders."""
    torch.manual_seed(0)
    model, x = ChannelStatistics().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing captured by the generic replay node, nothing frozen
        hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert hard.module_of("c1").out_channels == 8 and hard.module_of("c2").out_channels == 8
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-5)
    masked = sorted(type(m).__name__ for m in soft.network.values() if type(m).__name__.startswith("Masked"))
    assert masked == ["MaskedFunctionalRMSNorm"] + ["MaskedReduction"] * 5  # var, mean, amax, mean, norm
    path = str(tmp_path / f"soft.{fmt}")
    back = (amc.ReconstructedNetwork.load_from_json(soft.save_to_json(file=path)) if fmt == "json"
            else amc.ReconstructedNetwork.load(soft.save(path)))
    torch.testing.assert_close(back(x), soft(x))


class ArgmaxOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.c1(x)
        return y.argmax(dim=1), y.max(dim=1)[1]


def test_reductions_that_return_channel_positions_freeze_them():
    torch.manual_seed(0)
    model, x = ArgmaxOverChannels().eval(), torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="argmax"):
        pruned = amc.prune(model, ratio=0.5, example_inputs=(x,))
    assert pruned.module_of("c1").out_channels == 8


class GroupedWiden(nn.Module):
    """SENet-154's bottleneck: a grouped 3x3 that widens (16 -> 32, 4 groups), then a residual."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.bn, self.c3, self.fc = nn.BatchNorm2d(32), nn.Conv2d(32, 16, 1), nn.Linear(16, 5)

    def forward(self, x):
        y = self.c1(x).relu()
        return self.fc((self.c3(self.bn(self.c2(y)).relu()) + y).mean((2, 3)))


def test_grouped_conv_that_widens_keeps_equal_groups():
    torch.manual_seed(0)
    model, x = GroupedWiden().eval(), torch.randn(2, 3, 8, 8)
    hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    c2 = hard.module_of("c2")
    assert (c2.in_channels, c2.out_channels, c2.groups) == (8, 16, 4)
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["convnext_zepto_rms", "convnextv2_atto", "resnest14d", "xcit_nano_12_p8_224"])
def test_timm_models_that_pruned_less_than_torch_pruning_now_prune_as_much(name, one_thread):
    """Frozen before: SimpleNorm's var over channels, GRN's mean over channels (and its addcmul), and
    ResNeSt's widening radix conv. At 0.5 they now keep about a quarter of the MACs, as Torch-Pruning's
    do (scripts/results/prune_sweep_timm.md)."""
    import timm  # test extra (setup.py)

    torch.manual_seed(0)
    model, x = timm.create_model(name, pretrained=False).eval(), torch.randn(1, 3, 64, 64)
    hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert amc.count(hard, x)[0] < 0.3 * amc.count(model, x)[0]
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-4)


class EfficientChannelAttention(nn.Module):
    """ECA (timm's EcaModule): a Conv1d with kernel 3 slides along the pooled channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.eca = nn.Conv2d(3, 16, 3, padding=1), nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.c2, self.fc = nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        y = self.c1(x).relu()
        a = self.eca(y.mean((2, 3)).view(y.shape[0], 1, -1)).sigmoid().view(y.shape[0], -1, 1, 1)
        return self.fc(self.c2(y * a.expand_as(y)).mean((2, 3)))


def test_conv_along_pooled_channels_reads_the_same_neighbours_after_pruning(tmp_path):
    """ECA's kernel mixes neighbouring channels; the hard network puts the kept ones back at their
    positions (zeros between, as soft pruning leaves them), so soft == hard; it was frozen before."""
    torch.manual_seed(0)
    model, x = EfficientChannelAttention().eval(), torch.randn(2, 3, 8, 8)
    hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert hard.module_of("c1").out_channels == 8
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-5, atol=1e-6)
    again = amc.prune(hard, ratio=0.5, example_inputs=(x,))  # pruned twice: positions compose
    assert again.module_of("c1").out_channels == 4 and again.module_of("eca").length == 16
    back = amc.ReconstructedNetwork.load_from_json(again.save_to_json(file=str(tmp_path / "eca.json")))
    torch.testing.assert_close(back(x), again(x))


class ChannelAttention(nn.Module):
    """DaViT's channel attention: a softmax over the head-dim channels (k^T v is head_dim x head_dim)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.embed, self.fc = nn.Linear(6, dim), nn.Linear(dim, 4)

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (k.transpose(-1, -2) @ v).softmax(dim=-1)
        y = (attn @ q.transpose(-1, -2)).transpose(-1, -2).transpose(1, 2).reshape(B, N, C)
        return self.fc(self.proj(y).mean(1))


def test_softmax_over_channels_normalises_over_the_kept_ones(tmp_path):
    torch.manual_seed(0)
    model, x = ChannelAttention().eval(), torch.randn(2, 5, 6)
    hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert hard.module_of("qkv").out_features < 48 and amc.count(hard, x)[0] < 0.6 * amc.count(model, x)[0]
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-5, atol=1e-6)
    assert any(type(m).__name__ == "MaskedSoftmax" for m in soft.network.values())
    back = amc.ReconstructedNetwork.load_from_json(soft.save_to_json(file=str(tmp_path / "soft.json")))
    torch.testing.assert_close(back(x), soft(x))


class HeadsWithParameters(nn.Module):
    """XCiT's temperature (one per head) and CaiT's talking heads (a Linear across heads): the head axis
    carries channels of its own, so `(attn @ v).transpose(1, 2).reshape(B, N, C)` merges two labeled
    axes. The head count stays; the head dims and the residual stream prune (all was frozen before)."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads, self.embed, self.qkv = heads, nn.Linear(6, dim), nn.Linear(dim, 3 * dim)
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)
        self.talk, self.proj, self.fc = nn.Linear(heads, heads), nn.Linear(dim, dim), nn.Linear(dim, 4)

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        attn = self.talk(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.fc(self.proj(y).mean(1) + x.mean(1))


def test_head_axis_with_parameters_keeps_heads_and_prunes_head_dims():
    torch.manual_seed(0)
    model, x = HeadsWithParameters().eval(), torch.randn(2, 5, 6)
    hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert hard.module_of("talk").in_features == 4  # heads kept
    assert hard.module_of("embed").out_features == 8 and hard.module_of("qkv").out_features == 24
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-5, atol=1e-6)


class FocalGates(nn.Module):
    """FocalNet's modulation: `split(x, (C, C, L + 1))`, then one-channel gate slices `gates[:, l:l + 1]`
    and the open run `gates[:, L:]` (pruning its only channel emptied it: focalnet_tiny_srf broke)."""

    def __init__(self, c=8, levels=2):
        super().__init__()
        self.c, self.levels = c, levels
        self.f = nn.Conv2d(3, 2 * c + levels + 1, 1)
        self.focal = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, groups=c) for _ in range(levels))
        self.h, self.fc = nn.Conv2d(c, c, 1), nn.Linear(c, 4)

    def forward(self, x):
        q, ctx, gates = torch.split(self.f(x), (self.c, self.c, self.levels + 1), 1)
        ctx_all = 0
        for level in range(self.levels):
            ctx = self.focal[level](ctx).relu()
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        ctx_all = ctx_all + ctx.mean((2, 3), keepdim=True) * gates[:, self.levels:]
        return self.fc((q * self.h(ctx_all)).mean((2, 3)))


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_channel_runs_and_split_pieces_never_empty(ratio):
    torch.manual_seed(0)
    model, x = FocalGates().eval(), torch.randn(2, 3, 8, 8)
    hard = amc.prune(model, ratio=ratio, example_inputs=(x,))
    soft = amc.prune(model, ratio=ratio, example_inputs=(x,), mode="soft")
    assert hard.module_of("f").out_channels < 19
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-4, atol=1e-5)


class StdConv(nn.Conv2d):
    """NFNet's ScaledStdConv2d: the weight is standardised per output channel at run time by
    `F.batch_norm(w.reshape(1, out, -1), training=True)`, so its statistics run over the inputs."""

    def forward(self, x):
        w = nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                                     momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StandardisedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = StdConv(3, 16, 3, padding=1), StdConv(16, 32, 3, padding=1, groups=4)
        self.c, self.fc = StdConv(32, 16, 1), nn.Linear(16, 5)

    def forward(self, x):
        y = self.a(x).relu()
        return self.fc((self.c(self.b(y).relu()) + y).mean((2, 3)))


def test_weight_standardised_convs_prune_with_statistics_of_the_kept_inputs(tmp_path):
    """Soft pruning zeroed a standardised weight's inputs but still counted them in its statistics, so
    soft and hard differed (dm_nfnet_f0 by 0.27 on outputs of 0.005); the statistics now skip them.
    The grouped functional conv prunes its outputs with equal groups (it was opaque)."""
    torch.manual_seed(0)
    model, x = StandardisedNet().eval(), torch.randn(2, 3, 8, 8)
    hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert amc.count(hard, x)[0] < 0.7 * amc.count(model, x)[0]
    torch.testing.assert_close(soft(x), hard(x), rtol=1e-5, atol=1e-6)
    assert any(type(m).__name__ == "MaskedStatistics" for m in soft.network.values())
    back = amc.ReconstructedNetwork.load_from_json(soft.save_to_json(file=str(tmp_path / "soft.json")))
    torch.testing.assert_close(back(x), soft(x))


class ClassTokenPooling(nn.Module):
    """MViT's pooling: `torch.tensor_split` takes the class token off the token axis, the rest is pooled."""

    def __init__(self):
        super().__init__()
        self.qkv, self.fc = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        cls, rest = torch.tensor_split(self.qkv(x).relu(), (1,), dim=1)
        return self.fc(torch.cat((cls, rest.mean(1, keepdim=True)), dim=1)).sum(1)


def test_tensor_split_along_tokens_passes_the_channels_through():
    """torch.tensor_split (the function; the method already was) had no channel rule: mvit_v2_s froze
    51 of them and kept 0.73x of its MACs at ratio 0.5, 0.50x now."""
    torch.manual_seed(0)
    model, x = ClassTokenPooling().eval(), torch.randn(2, 5, 8)
    hard = _soft_equals_hard(model, x, atol=1e-5, no_warnings=True)
    assert hard.module_of("qkv").out_features == 8


class SizeAsValue(nn.Module):
    """A channel count read from a shape and used as a number, not as a shape."""

    def __init__(self, form):
        super().__init__()
        self.c1, self.c2, self.form = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1), form

    def forward(self, x):
        y = self.c1(x).relu()
        if self.form == "tensor_sqrt":  # RAFT's correlation volume: corr / sqrt(tensor(C))
            y = y / torch.sqrt(torch.tensor(y.shape[1]))
        elif self.form == "sum_div":  # a mean written by hand
            y = y - y.sum(1, keepdim=True) / y.shape[1]
        elif self.form == "numel":  # counts H and W too, which may change from call to call
            y = y / y[0].numel()
        return self.c2(y)


@pytest.mark.parametrize("form,kept", [("tensor_sqrt", 8), ("sum_div", 8), ("numel", 16)])
def test_a_channel_count_used_as_a_value_keeps_its_traced_value(form, kept, tmp_path):
    """The hard network used to scale by the *kept* count (RAFT: soft and hard flows 0.46 apart): now the
    count is written as its traced constant (soft == hard), or its channels stay where the number also
    counts a dim that is no channel."""
    torch.manual_seed(0)
    model, x = SizeAsValue(form).eval(), torch.randn(2, 3, 8, 8)
    hard = _soft_equals_hard(model, x)
    assert hard.module_of("c1").out_channels == kept
    back = amc.ReconstructedNetwork.load_from_json(hard.save_to_json(str(tmp_path / "hard.json")))
    torch.testing.assert_close(back(x), hard(x))


def test_instance_norm_without_tensors_learns_its_kept_width():
    """InstanceNorm2d(affine=False) holds no tensor to slice; its num_features follows by a fixup, so
    torch no longer warns on every call of the pruned network (RAFT's encoders)."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.InstanceNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
    assert hard.module_of("1").num_features == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hard(x)


class Warp(nn.Module):
    """RAFT's lookup: features sampled at coordinates that a conv predicts."""

    def __init__(self):
        super().__init__()
        self.c1, self.flow, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        grid = self.flow(x).permute(0, 2, 3, 1).tanh()
        return self.c2(nn.functional.grid_sample(self.c1(x).relu(), grid, align_corners=False))


def test_grid_sample_passes_the_sampled_channels_and_keeps_the_coordinates():
    torch.manual_seed(0)
    model, x = Warp().eval(), torch.randn(2, 3, 8, 8)
    hard = _soft_equals_hard(model, x, no_warnings=True)  # a dedicated op now, not the generic replay node
    assert (hard.module_of("c1").out_channels, hard.module_of("flow").out_channels) == (8, 2)


class TanhGelu(torch.autograd.Function):
    """BLOOM's GeLU: an element-wise activation written as a custom autograd Function."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
        return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * 0.79788456 * (1 + 3 * 0.044715 * x * x))


class ScaleRows(torch.autograd.Function):
    """Not element-wise along the features: each output mixes every feature of its row."""

    @staticmethod
    def forward(ctx, x):
        return x / x.norm(dim=-1, keepdim=True)

    @staticmethod
    def backward(ctx, g):
        return g


class CustomActivationMLP(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fc1, self.fc2, self.fn = nn.Linear(8, 32), nn.Linear(32, 4), fn

    def forward(self, x):
        return self.fc2(self.fn.apply(self.fc1(x)))


@pytest.mark.parametrize("fn,hidden", [(TanhGelu, 16), (ScaleRows, 32)], ids=["elementwise", "mixing"])
def test_custom_autograd_function_is_probed_like_any_op_without_a_rule(fn, hidden):
    """A custom autograd Function froze every channel it touched (BLOOM's MLP kept its 4h width): it is now
    probed as any op without a rule is, passing channels only where it is proven element-wise."""
    torch.manual_seed(0)
    model, x = CustomActivationMLP(fn).eval(), torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hard = amc.prune(model, ratio=0.5, example_inputs=(x,))
        soft = amc.prune(model, ratio=0.5, example_inputs=(x,), mode="soft")
    assert hard.module_of("fc1").out_features == hidden
    torch.testing.assert_close(hard(x), soft(x), rtol=1e-4, atol=1e-6)


class TokenPooler(nn.Module):
    """Hugging Face Swin's pooler: AdaptiveAvgPool1d over the tokens of [B, C, L]."""

    def __init__(self, functional):
        super().__init__()
        self.proj, self.fc, self.functional = nn.Linear(8, 16), nn.Linear(16, 4), functional
        self.pool = nn.AdaptiveAvgPool1d(1)

    def forward(self, x):
        t = self.proj(x).transpose(1, 2)
        t = nn.functional.adaptive_avg_pool1d(t, 1) if self.functional else self.pool(t)
        return self.fc(t.flatten(1))


@pytest.mark.parametrize("functional", [False, True])
def test_pooling_1d_over_tokens_keeps_the_channels_prunable(functional):
    """A 3-D input was read as an unbatched 2-D pooling, so the channels of [B, C, L] froze (Swin's whole
    residual stream); a 1d op pools the last dim only."""
    torch.manual_seed(0)
    model, x = TokenPooler(functional).eval(), torch.randn(2, 5, 8)
    assert _soft_equals_hard(model, x).module_of("proj").out_features == 8


class Seq2Seq(nn.Module):
    """nn.Transformer with its inputs projected: the decoder's cross-attention reads the encoder's memory."""

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.src, self.tgt, self.head = nn.Linear(8, 32), nn.Embedding(50, 32), nn.Linear(32, 50)
        self.t = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                dim_feedforward=64, batch_first=batch_first)

    def forward(self, src, tgt):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        a, b = self.src(src), self.tgt(tgt)
        if not self.batch_first:
            a, b = a.transpose(0, 1), b.transpose(0, 1)
        out = self.t(a, b, tgt_mask=mask, tgt_is_causal=True)
        return self.head(out if self.batch_first else out.transpose(0, 1))


class KeyValueDims(nn.Module):
    """nn.MultiheadAttention with kdim / vdim: separate q, k and v projection weights."""

    def __init__(self):
        super().__init__()
        self.q, self.kv, self.head = nn.Linear(8, 32), nn.Linear(8, 24), nn.Linear(32, 3)
        self.att = nn.MultiheadAttention(32, 4, kdim=24, vdim=24, batch_first=True)

    def forward(self, x, y):
        kv = self.kv(y)
        return self.head(self.att(self.q(x), kv, kv, need_weights=False)[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_prunes_with_the_memory_it_reads(batch_first):
    """nn.MultiheadAttention was pruned only as self-attention; any other call froze its inputs, so the
    whole nn.Transformer kept its width (0.82x MACs at ratio 0.5). Query, key and value share in_proj's
    columns, so their channels are one group now: 0.29x, soft == hard."""
    torch.manual_seed(0)
    model, xs = Seq2Seq(batch_first).eval(), (torch.randn(2, 6, 8), torch.randint(0, 50, (2, 5)))
    hard = _soft_equals_hard(model, *xs, atol=1e-5)
    assert amc.count(hard, *xs)[0] < 0.35 * amc.count(model, *xs)[0]


def test_attention_key_and_value_dims_prune_their_own_columns(tmp_path):
    torch.manual_seed(0)
    model, xs = KeyValueDims().eval(), (torch.randn(2, 5, 8), torch.randn(2, 7, 8))
    hard = _soft_equals_hard(model, *xs, atol=1e-5)
    att = hard.module_of("att")
    assert (hard.module_of("kv").out_features, att.kdim, att.vdim, att.k_proj_weight.shape[1]) == (12, 12, 12, 12)
    back = amc.ReconstructedNetwork.load_from_json(hard.save_to_json(str(tmp_path / "kv.json")))
    torch.testing.assert_close(back(*xs), hard(*xs))


class MadeFromSizes(nn.Module):
    """A mask made with x.new_zeros (Swin's shifted windows) and a zeros tensor sized by x's channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.c1(x).relu()
        mask = y.new_zeros((y.shape[2], y.shape[3]))
        mask[:2] = 1.0
        return self.c2(y * (1 - mask) + torch.zeros(y.shape[0], y.shape[1], 1, 1) + y.new_full((1, y.shape[1], 1, 1), 0.5))


def test_tensors_made_from_sizes_leave_the_channels_prunable(tmp_path, one_thread):
    """x.new_zeros & co were declared opaque, so the tensor they read for its dtype froze its channels:
    torchvision's swin_t kept 0.48x of its MACs at ratio 0.5 (0.26x now). A dim sized from a channel dim
    carries those channels (one value everywhere, so it resizes exactly)."""
    import torchvision

    torch.manual_seed(0)
    model, x = MadeFromSizes().eval(), torch.randn(2, 3, 8, 8)
    assert _soft_equals_hard(model, x, atol=1e-5, no_warnings=True).module_of("c1").out_channels == 8
    swin, x = torchvision.models.swin_t().eval(), torch.randn(1, 3, 224, 224)
    hard = amc.prune(swin, ratio=0.5, example_inputs=(x,))
    assert amc.count(hard, x)[0] < 0.3 * amc.count(swin, x)[0]
    torch.testing.assert_close(amc.prune(swin, ratio=0.5, example_inputs=(x,), mode="soft")(x), hard(x),
                               rtol=1e-3, atol=1e-4)
    back = amc.ReconstructedNetwork.load_from_json(hard.save_to_json(str(tmp_path / "swin.json")))
    x2 = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(back(x2), hard(x2))


class MaskedTokens(nn.Module):
    """Tokens picked by a boolean mask: over one dim (`h[:, keep]`) or over batch and tokens (`h[keep]`)."""

    def __init__(self, two_dims):
        super().__init__()
        self.a, self.b, self.two_dims = nn.Linear(8, 16), nn.Linear(16, 3), two_dims

    def forward(self, x, keep):
        h = self.a(x).relu()
        return self.b(h[keep]).mean(0) if self.two_dims else self.b(h[:, keep]).mean(1)


@pytest.mark.parametrize("two_dims", [False, True], ids=["one_dim_mask", "two_dim_mask"])
def test_boolean_mask_indexing_keeps_the_feature_channels(two_dims):
    """A mask (or an index tensor) picks positions, so the features it carries along still prune; the
    indexed dims keep theirs (they were all frozen: the op was opaque)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    keep = torch.rand(2, 5) > 0.3 if two_dims else torch.tensor([True, False, True, True, False])
    model = MaskedTokens(two_dims).eval()
    assert _soft_equals_hard(model, x, keep).module_of("a").out_features == 8


class EinopsAttention(nn.Module):
    """lucidrains' vit-pytorch attention: qkv chunked, heads split and merged by einops."""

    def __init__(self, dim=32, heads=4, dim_head=16):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)
        self.fc = nn.Linear(dim, 3)

    def forward(self, x):
        from einops import rearrange

        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = (torch.matmul(q, k.transpose(-1, -2)) * 0.25).softmax(-1)
        out = rearrange(torch.matmul(attn, v), "b h n d -> b n (h d)")
        return self.fc(self.to_out(out) + x).mean(1)


class UnflattenHeads(nn.Module):
    """Heads split by `unflatten` (function, keyword or nn.Unflatten), attention by einsum."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.qkv, self.o, self.fc = nn.Linear(32, 96), nn.Linear(32, 32), nn.Linear(32, 3)
        self.split = nn.Unflatten(-1, (4, 8))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        if self.form == "module":
            q, k, v = map(self.split, (q, k, v))
        elif self.form == "keyword":
            q, k, v = (torch.unflatten(t, dim=-1, sizes=(4, -1)) for t in (q, k, v))
        else:
            q, k, v = (t.unflatten(2, (4, 8)) for t in (q, k, v))
        a = torch.einsum("bihd,bjhd->bhij", q, k).softmax(-1)
        return self.fc(self.o(torch.einsum("bhij,bjhd->bihd", a, v).flatten(2))).mean(1)


def test_einops_vit_attention_prunes_its_head_dims():
    """The head count, read back from the split tensor to merge heads (einops multiplies h by d), is static:
    it no longer freezes the qkv projection (it kept all 192 columns)."""
    pytest.importorskip("einops")
    model = EinopsAttention().eval()
    hard = _soft_equals_hard(model, torch.randn(2, 5, 32), no_warnings=True)
    assert hard.module_of("to_qkv").out_features == 96 and hard.module_of("to_out").in_features == 32
    for b in (1, 3):
        assert hard(torch.randn(b, 7, 32)).shape == (b, 3)


@pytest.mark.parametrize("form", ["method", "keyword", "module"])
def test_unflatten_splits_follow_pruning(form, tmp_path):
    """`unflatten` froze every dim it split; its sizes are now rewritten like a view's."""
    model = UnflattenHeads(form).eval()
    x = torch.randn(2, 5, 32)
    hard = _soft_equals_hard(model, x, no_warnings=True)
    assert hard.module_of("qkv").out_features == 48
    amc.export.save_json(hard, tmp_path / "n.json")
    torch.testing.assert_close(amc.load(tmp_path / "n.json")(x), hard(x))


class Siamese(nn.Module):
    """One encoder on two inputs: its layers are called twice, on paths that meet only at the head."""

    def __init__(self, scales=False):
        super().__init__()
        self.scales = scales
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head, self.other = nn.Linear(64, 2), nn.Linear(32, 2)

    def forward(self, a, b):
        if self.scales:  # the second call feeds another layer
            return self.head(torch.cat([self.enc(a), self.enc(b)], 1)) + self.other(self.enc(a[..., ::2, ::2]))
        return self.head(torch.cat([self.enc(a), self.enc(b)], 1))


@pytest.mark.parametrize("scales", [False, True])
def test_a_module_called_twice_prunes_one_set_of_channels(scales):
    """Both calls of a module slice its one weight: their channels are one group. They were two groups
    (one holder of the weight was counted, not two readers), so the hard network sliced the weight for
    one call and differed from the soft one by 6e-3."""
    model = Siamese(scales).eval()
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    hard = _soft_equals_hard(model, a, b)
    assert amc.count(hard, a, b)[0] < 0.4 * amc.count(model, a, b)[0]


class TwoViews(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.c2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 8, 1)

    def forward(self, x):
        y = self.c(x).view(x.shape[0], 4, -1, 8, 8).mean(1)
        return self.c2(y.repeat(1, 4, 1, 1)) + self.c(x).sum(1, keepdim=True)


def test_a_module_called_twice_stays_whole_when_one_call_must():
    """One call's channels frozen (tiled by repeat), the other's free: the weight they share stays whole
    (the hard network sliced it for the free call and no longer ran)."""
    model, x = TwoViews().eval(), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="frozen by repeat"):
        hard = _soft_equals_hard(model, x)
    assert hard.module_of("c").out_channels == 32


class GatedConv(nn.Module):
    """A conformer's convolution module: pointwise conv to 2C, GLU over channels, depthwise conv."""

    def __init__(self, module):
        super().__init__()
        self.pw1, self.dw, self.pw2 = nn.Conv1d(16, 64, 1), nn.Conv1d(32, 32, 5, padding=2, groups=32), nn.Conv1d(32, 16, 1)
        self.glu = nn.GLU(dim=1) if module else None
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = self.glu(self.pw1(x)) if self.glu is not None else F.glu(self.pw1(x), dim=1)
        return self.fc((x + self.pw2(F.silu(self.dw(h)))).mean(-1))


@pytest.mark.parametrize("module", [False, True])
def test_glu_prunes_both_halves_alike(module):
    """GLU was opaque: the 2C-wide conv feeding it kept every channel. Channel i of both halves now prune
    together, so the gated width halves with the rest."""
    model = GatedConv(module).eval()
    hard = _soft_equals_hard(model, torch.randn(2, 16, 12), no_warnings=True)
    assert hard.module_of("pw1").out_channels == 32 and hard.module_of("dw").out_channels == 16


class PerChannelStatistics(nn.Module):
    """Hand-written normalisation by stored per-channel statistics, and a learned per-channel temperature."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)
        self.register_buffer("mean", torch.randn(1, 16, 1, 1))
        self.register_buffer("std", torch.rand(1, 16, 1, 1) + 0.5)
        self.tau = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x):
        h = (self.c1(x) - self.mean) / self.std
        return self.c2((h / self.tau.view(1, -1, 1, 1)).relu())


def test_soft_pruning_never_divides_by_a_zeroed_channel():
    """Soft pruning zeroed every tensor along a pruned channel, the divisors too: 0 / 0 made the whole soft
    network NaN. A tensor that is divided by keeps its pruned entries (as BatchNorm's running_var does)."""
    model, x = PerChannelStatistics().eval(), torch.randn(2, 3, 8, 8)
    hard = _soft_equals_hard(model, x, no_warnings=True)
    assert hard.module_of("c1").out_channels == 8


class CountedSlices(nn.Module):
    """Bounds counted from channels alone: Swin v2 zeroes the key third of its qkv bias with
    `b[n // 3:2 * n // 3]` (n = `b.numel()`), and a hand-written GLU halves by `x.shape[1] // 2`."""

    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.proj = nn.Linear(16, 16), nn.Linear(16, 48), nn.Linear(16, 16)
        self.up, self.fc = nn.Linear(16, 32), nn.Linear(16, 4)

    def forward(self, x):
        x = self.embed(x)
        bias = self.qkv.bias.clone()
        n = bias.numel()
        bias[n // 3:2 * n // 3].zero_()
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(x.shape[0], x.shape[1], 3, 2, -1).unbind(2)
        a = torch.softmax(q.transpose(1, 2) @ k.permute(0, 2, 3, 1), -1) @ v.transpose(1, 2)
        x = x + self.proj(a.transpose(1, 2).flatten(2))
        h = self.up(x)
        c = h.shape[-1] // 2
        return self.fc((x + h[..., :c] * torch.sigmoid(h[..., c:])).mean(1))


def test_slice_bounds_counted_from_channels_prune_with_the_run():
    """Such bounds froze every channel they cut (Swin v2's q/k/v stayed whole: 0.37x MACs, not 0.26x): no
    input changes them, so they prune like constant bounds and the hard prune writes the kept run's."""
    hard = _soft_equals_hard(CountedSlices().eval(), torch.randn(2, 5, 16), no_warnings=True)
    assert hard.module_of("qkv.weight").value.shape[0] == 24 and hard.module_of("up").out_features == 16
