"""VTP (seed 001): gates insert as identity nodes, training moves them, pruning meets the budget and folds
the gates exactly, bad input fails loudly."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import amc
from amc.compressors import VTP, VisionTransformerPruning
from amc.compressors.vtp import FeatureGate, SelectFeatures, fold_gates, gates_of, insert_gates
from amc.errors import PruningError
from amc.models import create


def _vit():
    torch.manual_seed(0)
    return create("vit_digits", image_size=8, dim=24, depth=2, heads=2).eval()


def _tv_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                hidden_dim=24, mlp_dim=48, num_classes=10).eval()


def _loader(shape, n=16):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=8)


@pytest.mark.parametrize("build,shape", [(_vit, (1, 8, 8)), (_tv_vit, (3, 16, 16))])
def test_gates_are_identity_and_fold_exactly(build, shape):
    model = build()
    x = torch.randn(3, *shape)
    gated, pairs = insert_gates(amc.trace(model, x[:1]))
    assert len(pairs) >= 2 and all(isinstance(g, FeatureGate) for g in gates_of(gated).values())
    torch.testing.assert_close(gated(x), model(x))
    for g in gates_of(gated).values():
        g.gate.data.uniform_(0.2, 1.5)
    folded = fold_gates(gated)
    assert not gates_of(folded)
    torch.testing.assert_close(folded(x), gated(x), rtol=1e-5, atol=1e-5)


def test_zeroed_mlp_gates_equal_the_pruned_network():
    """The MLP's hidden dims: the gated network with the pruned dims' gates at 0 computes what the pruned
    network computes (the residual stream and the head dims are pruned as whole coupled groups instead)."""
    model = _vit()
    x = torch.randn(4, 1, 8, 8)
    c = VTP(model, _loader((1, 8, 8)), compress_ratio=0.3, epochs=0, finetune_epochs=0, example_inputs=(x[:1],))
    gated = c.gated
    torch.manual_seed(1)
    for name, g in gates_of(gated).items():
        g.gate.data.uniform_(0.5, 1.5)
        if name.endswith("fc2.gate"):
            g.gate.data[:10] = 0.0  # these hidden dims carry nothing
    from amc.compressors.prune import plan_pruning
    from amc.compressors.vtp.compressor import gate_scores, units_below

    plan = plan_pruning(gated, "l2", (x[:1],))
    scores = gate_scores(plan)
    only_mlp = [s if any(m.axis.node.endswith("fc2.gate") for m in g.members) else None
                for g, s in zip(plan.groups, scores)]
    units, emptied = units_below(plan, only_mlp, 0.25)
    pruned = fold_gates(plan.apply_units(units, "hard"))
    assert not emptied
    assert pruned.network["blocks_0_fc2"].in_features == model.blocks[0].fc2.in_features - 10
    torch.testing.assert_close(pruned(x), gated(x), rtol=1e-5, atol=1e-5)


def test_vtp_meets_the_budget_and_trains_gates():
    model = _vit()
    loader = _loader((1, 8, 8))
    x1 = torch.randn(1, 1, 8, 8)
    c = VisionTransformerPruning(model, loader, target_macs=0.6, sparsity=1e-2, epochs=1, finetune_epochs=1,
                                 lr=1e-3, example_inputs=(x1,))
    net = c.compress()
    assert amc.count(net, x1)[0] <= 0.6 * amc.count(model, x1)[0]
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert len(c.train_history) == 1 and c.zeta is not None
    trained = gates_of(c.trained_gated).values()
    assert all(not torch.equal(g.gate, torch.ones_like(g.gate)) for g in trained)  # L1 + task moved every gate
    assert all(torch.equal(g.gate, torch.ones_like(g.gate)) for g in gates_of(c.gated).values())  # copy trained
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), _vit().state_dict().values()))


def test_torchvision_vit_prunes_to_half_and_round_trips(tmp_path):
    model = _tv_vit()
    x = torch.randn(3, 3, 16, 16)
    net = VTP(model, _loader((3, 16, 16)), compress_ratio=0.5, epochs=0, finetune_epochs=0,
              example_inputs=(x[:1],)).compress()
    assert amc.count(net, x[:1])[0] <= 0.5 * amc.count(model, x[:1])[0]
    path = net.save_to_json(str(tmp_path / "vtp.json"))
    back = amc.ReconstructedNetwork.load_from_json(path)
    assert torch.equal(back(x), net(x)) and net(x[:1]).shape == (1, 10)


def test_bad_input_is_refused():
    loader = _loader((1, 8, 8))
    with pytest.raises(PruningError, match="no Linear layer reading|no attention"):
        VTP(create("digits_resnet"), loader, epochs=0)
    for bad in (1.0, -0.2, 2):
        with pytest.raises(PruningError, match="compress_ratio"):
            VTP(_vit(), loader, compress_ratio=bad, epochs=0)
    with pytest.raises(PruningError, match="heads must be"):
        VTP(_vit(), loader, heads="yes", epochs=0)
    traced = amc.trace(_tv_vit(), torch.randn(1, 3, 16, 16))  # a graph keeps MHA fused: heads tied to width
    with pytest.raises(PruningError, match="no attention heads"):
        VTP(traced, _loader((3, 16, 16)), heads=True, epochs=0, finetune_epochs=0).compress()
    for bad in (0, -1e-3, "fast", True):
        with pytest.raises(PruningError, match="gate_lr must be a finite number > 0"):
            VTP(_vit(), loader, gate_lr=bad, epochs=0)
    c = VTP(_vit(), loader, threshold=10.0, epochs=0, finetune_epochs=0)  # above every gate (all are 1)
    net = c.compress()
    assert c.warnings and "at least one is kept" in c.warnings[0]
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_heads_true_removes_a_dead_head_exactly():
    """A head whose output gates are all zero is removed whole (head count 4 -> 3, head dim and softmax
    scale kept); the pruned network computes what the gated network computes."""
    torch.manual_seed(0)
    model = create("vit_digits", image_size=8, dim=24, depth=2, heads=4).eval()
    x = torch.randn(3, 1, 8, 8)
    c = VTP(model, _loader((1, 8, 8)), threshold=0.25, heads=True, epochs=0, finetune_epochs=0,
            example_inputs=(x[:1],))
    torch.manual_seed(1)
    for name, g in gates_of(c.gated).items():
        g.gate.data.uniform_(0.5, 1.5)
        if name == "blocks.0.attn.proj.gate":
            g.gate.data[6:12] = 0.0  # head 1 (head dim 6) contributes nothing
    gated = c.gated.copy()
    net = c.compress()
    reshape = next(n for n in net.layer_nodes if n.name == "blocks.0.attn.reshape")
    assert reshape.args[4] == 3  # (B, N, 3, heads, head_dim): one head fewer, head dims whole
    assert net.network["blocks_0_attn_proj"].in_features == 18
    assert net.network["blocks_1_attn_proj"].in_features == 24  # the other block keeps its heads
    torch.testing.assert_close(net(x), gated(x), rtol=1e-5, atol=1e-5)


class _SepQKV(torch.nn.Module):
    """A hand-written block with separate q, k, v Linears and F.scaled_dot_product_attention."""

    def __init__(self, dim=24, heads=4, head_dim_from_width=False):
        super().__init__()
        self.heads, self.from_width = heads, head_dim_from_width
        self.norm, self.q, self.k, self.v = torch.nn.LayerNorm(dim), *(torch.nn.Linear(dim, dim) for _ in range(3))
        self.proj, self.fc1, self.fc2 = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 2 * dim), torch.nn.Linear(2 * dim, dim)
        self.embed, self.head = torch.nn.Linear(16, dim), torch.nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x.flatten(2).transpose(1, 2).reshape(x.shape[0], -1, 16))
        b, n, c = t.shape
        h = self.norm(t)
        d = c // self.heads if self.from_width else -1  # timm's C // H: pinned to the traced head dim
        q, k, v = (f(h).view(b, n, self.heads, d).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        t = t + self.proj(a)
        t = t + self.fc2(torch.nn.functional.gelu(self.fc1(t)))
        return self.head(t.mean(1))


@pytest.mark.parametrize("from_width", [False, True])
def test_heads_on_separate_qkv_sdpa(from_width):
    torch.manual_seed(0)
    model = _SepQKV(head_dim_from_width=from_width).eval()
    x = torch.randn(3, 1, 8, 8)
    net = amc.trace(model, x[:1])
    hard = amc.prune(net, 0.5, example_inputs=(x[:1],), heads=True)
    soft = amc.prune(net, 0.5, example_inputs=(x[:1],), heads=True, mode="soft")
    torch.testing.assert_close(hard(x), soft(x), rtol=1e-5, atol=1e-5)
    assert hard.network["q"].out_features == 2 * 6 and hard.network["proj"].in_features == 12
    assert hard.network["embed"].out_features == 12  # the residual width is pruned too


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_prune_heads_soft_equals_hard_and_meets_macs(ratio):
    model = create("vit_digits", image_size=8, dim=24, depth=2, heads=4).eval()
    x = torch.randn(3, 1, 8, 8)
    net = amc.trace(model, x[:1])
    hard = amc.prune(net, ratio, example_inputs=(x[:1],), heads=True)
    soft = amc.prune(net, ratio, example_inputs=(x[:1],), heads=True, mode="soft")
    torch.testing.assert_close(hard(x), soft(x), rtol=1e-5, atol=1e-5)
    for block in range(2):  # (B, N, 3, heads, head_dim): a quarter / half of the heads go, each whole
        reshape = next(n for n in hard.layer_nodes if n.name == f"blocks.{block}.attn.reshape")
        assert reshape.args[4] == int(4 - 4 * ratio)
        assert hard.network[f"blocks_{block}_attn_proj"].in_features == 6 * int(4 - 4 * ratio)
    with pytest.raises(PruningError, match="heads must be"):
        amc.prune(net, ratio, example_inputs=(x[:1],), heads=1)


def test_readers_drop_their_own_columns_exactly_and_keep_the_stream():
    """residual="readers": each qkv / fc1 keeps the input columns its gate keeps (a SelectFeatures gather
    before it), the residual width stays whole, and zeroed gates equal the pruned network."""
    model = _vit()
    x = torch.randn(4, 1, 8, 8)
    c = VTP(model, _loader((1, 8, 8)), threshold=0.25, residual="readers", epochs=0, finetune_epochs=0,
            example_inputs=(x[:1],))
    torch.manual_seed(1)
    for name, g in gates_of(c.gated).items():
        g.gate.data.uniform_(0.5, 1.5)
        if name in ("blocks.0.attn.qkv.gate", "blocks.1.fc1.gate"):
            g.gate.data[::3] = 0.0  # a third of these readers' columns carry nothing
    gated = c.gated.copy()
    net = c.compress()
    assert net.network["blocks_0_attn_qkv"].in_features == 24 - 8
    assert net.network["blocks_1_fc1"].in_features == 24 - 8
    assert net.network["blocks_1_attn_qkv"].in_features == 24  # other readers keep every column
    assert net.network["patch_embed"].out_channels == 24  # the stream is whole
    assert sum(isinstance(m, SelectFeatures) for m in net.network.values()) == 2
    torch.testing.assert_close(net(x), gated(x), rtol=1e-5, atol=1e-5)
    assert amc.count(net, x[:1])[0] < amc.count(model, x[:1])[0]
    tmp = Path(tempfile.mkdtemp())
    back = amc.ReconstructedNetwork.load_from_json(net.save_to_json(str(tmp / "r.json")))
    assert torch.equal(back(x), net(x))
    net.save(str(tmp / "r.pkl"))
    assert torch.equal(amc.ReconstructedNetwork.load(str(tmp / "r.pkl"))(x), net(x))  # safe loader allows it


def test_readers_meet_a_macs_budget():
    model = _vit()
    x1 = torch.randn(1, 1, 8, 8)
    c = VTP(model, _loader((1, 8, 8)), target_macs=0.6, residual="readers", sparsity=1e-2, epochs=1,
            finetune_epochs=0, lr=1e-3, example_inputs=(x1,))
    net = c.compress()
    assert amc.count(net, x1)[0] <= 0.6 * amc.count(model, x1)[0]
    assert net.network["patch_embed"].out_channels == 24
    with pytest.raises(PruningError, match="residual must be"):
        VTP(model, _loader((1, 8, 8)), residual="columns", epochs=0)


@pytest.mark.parametrize("build,shape", [(_vit, (1, 8, 8)), (_tv_vit, (3, 16, 16)), (lambda: _SepQKV().eval(), (1, 8, 8))],
                         ids=["fused_qkv", "torchvision", "separate_qkv"])
def test_zeroed_gates_equal_the_pruned_network(build, shape):
    """The issue's exactness check on three attention styles: gates at zero on the stream's readers (qkv or
    q/k/v, fc1) and on the MLP hidden units; residual="readers" removes exactly those."""
    torch.manual_seed(0)
    model = build()
    x = torch.randn(3, *shape)
    c = VTP(model, _loader(shape), threshold=0.25, residual="readers", epochs=0, finetune_epochs=0,
            example_inputs=(x[:1],))
    torch.manual_seed(1)
    zeroed = 0
    for name, g in gates_of(c.gated).items():
        g.gate.data.uniform_(0.5, 1.5)
        if not any(k in name for k in ("proj", "embed", "head", "out_proj")):
            g.gate.data[::3] = 0.0
            zeroed += 1
    gated = c.gated.copy()
    net = c.compress()
    assert zeroed >= 2
    assert amc.count(net, x[:1])[0] < amc.count(gated, x[:1])[0]
    torch.testing.assert_close(net(x), gated(x), rtol=1e-5, atol=1e-5)


def test_torchvision_attention_is_unfused_and_loses_whole_heads_exactly():
    """VTP unfuses nn.MultiheadAttention (same function), so torchvision's ViT gets qkv/proj gates and
    heads=True removes a head whose output gates are zero, exactly; the user's model is untouched."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=4,
                                                 hidden_dim=24, mlp_dim=48, num_classes=10).eval()
    x = torch.randn(3, 3, 16, 16)
    c = VTP(model, _loader((3, 16, 16)), threshold=0.25, heads=True, epochs=0, finetune_epochs=0,
            example_inputs=(x[:1],))
    assert c.unfused == 2 and isinstance(model.encoder.layers[0].self_attention, torch.nn.MultiheadAttention)
    torch.testing.assert_close(c.gated(x), model(x), rtol=1e-5, atol=1e-5)
    gates = gates_of(c.gated)
    assert "encoder.layers.encoder_layer_0.self_attention.proj.gate" in gates
    for name, g in gates.items():
        g.gate.data.uniform_(0.5, 1.5)
        if name == "encoder.layers.encoder_layer_0.self_attention.proj.gate":
            g.gate.data[6:12] = 0.0  # head 1 of 4
    gated = c.gated.copy()
    net = c.compress()
    assert net.network["encoder_layers_encoder_layer_0_self_attention_proj"].in_features == 18
    assert net.network["encoder_layers_encoder_layer_1_self_attention_proj"].in_features == 24
    torch.testing.assert_close(net(x), gated(x), rtol=1e-5, atol=1e-5)


def test_unfused_torchvision_vit_prunes_whole_heads_soft_equals_hard():
    from amc.compressors.vtp import unfuse_attention

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=4,
                                                 hidden_dim=24, mlp_dim=48, num_classes=10).eval()
    unfused, n = unfuse_attention(model)
    x = torch.randn(3, 3, 16, 16)
    assert n == 2
    torch.testing.assert_close(unfused(x), model(x), rtol=1e-5, atol=1e-5)
    hard = amc.prune(unfused, 0.5, example_inputs=(x[:1],), heads=True)
    soft = amc.prune(unfused, 0.5, example_inputs=(x[:1],), heads=True, mode="soft")
    torch.testing.assert_close(hard(x), soft(x), rtol=1e-5, atol=1e-5)
    assert hard.network["encoder_layers_encoder_layer_0_self_attention_proj"].in_features == 12  # 2 of 4 heads


def test_unfused_attention_refuses_what_it_cannot_compute():
    """SelfAttention replaces nn.MultiheadAttention for self-attention only: cross-attention, masks and
    attention weights raise a PruningError that says so, instead of computing plain self-attention."""
    from amc.compressors.vtp import SelfAttention

    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    attn = SelfAttention(mha).eval()
    x, other = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    assert torch.allclose(attn(x, x, x)[0], mha(x, x, x, need_weights=False)[0], atol=1e-5)
    calls = {"cross-attention": lambda: attn(x, other, other),
             "a key padding mask": lambda: attn(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)),
             "an attention mask": lambda: attn(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.bool)),
             "attention weights": lambda: attn(x, x, x, need_weights=True)}
    for what, call in calls.items():
        with pytest.raises(PruningError, match="self-attention only"):
            call()
