"""amc.export.to_module: the pruned network's layers written back into a copy of the user's own module,
checked against the network; what cannot be written back raises ExportError instead."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import amc
from amc.errors import ExportError


class OddAttention(nn.Module):
    """A hand-written attention keeping its head size in an attribute no rule knows (`dk`)."""

    def __init__(self, dim: int = 32, nh: int = 4):
        super().__init__()
        self.nh, self.dk = nh, dim // nh
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).reshape(b, n, -1, self.dk).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-2, -1) * 8 ** -0.5, dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, -1))
        return x + self.fc2(torch.relu(self.fc1(x)))


def _mobilenet_v2():
    import torchvision

    return torchvision.models.mobilenet_v2(num_classes=10)


def _torchvision_vit():
    """Its `_process_input` reshapes the patches to `self.hidden_dim`, which TP's ViT example patches by hand."""
    import torchvision

    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                                mlp_dim=64, num_classes=10)


MODELS = {"digits_resnet": (lambda: amc.models.create("digits_resnet"), (1, 8, 8)),
          "vit_digits": (lambda: amc.models.create("vit_digits"), (1, 16, 16)),
          "torchvision_mobilenet_v2": (_mobilenet_v2, (3, 32, 32)),
          "torchvision_vit": (_torchvision_vit, (3, 32, 32))}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pruned_model_written_back_into_its_module(name, one_thread):
    torch.manual_seed(0)
    make, shape = MODELS[name]
    model = make().eval()
    x = torch.randn(2, *shape)
    small = amc.prune(model, ratio=0.4, example_inputs=(x,))
    eager = amc.export.to_module(small, model, x)
    assert type(eager) is type(model)
    assert sum(p.numel() for p in eager.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        y = torch.randn(3, *shape)
        assert torch.allclose(eager(y), small(y), atol=1e-5)


def test_unknown_head_attribute_is_caught_then_taught_by_a_rule(monkeypatch):
    torch.manual_seed(0)
    model = OddAttention().eval()
    x = torch.randn(2, 5, 32)
    small = amc.prune(model, ratio=0.5, example_inputs=(x,), ignore=["proj", "fc2"])
    with pytest.raises(ExportError, match="register_attribute_rule"):
        amc.export.to_module(small, model, x)
    from amc.export import attribute_rules

    monkeypatch.setattr(attribute_rules, "_RULES", list(attribute_rules._RULES))
    amc.export.register_attribute_rule(lambda m: isinstance(m, OddAttention),
                                       lambda m, path, net: {"dk": net.module_of("q").out_features // m.nh})
    eager = amc.export.to_module(small, model, x)
    assert eager.dk == 4
    with torch.no_grad():
        assert torch.allclose(eager(x), small(x), atol=1e-5)


def test_layers_a_compressor_added_have_no_place_in_the_module():
    from amc.compressors import LowRankDecomposition

    torch.manual_seed(0)
    model = amc.models.create("digits_resnet").eval()
    x = torch.randn(1, 1, 8, 8)
    loader = [(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))]
    net = LowRankDecomposition(model, loader, None, trainset_ratio=1.0, compress_ratio=0.5,
                               example_inputs=(x,)).compress()
    with pytest.raises(ExportError, match="no layer of the same name"):
        amc.export.to_module(net, model, x)


def test_arguments_in_the_wrong_order_are_named():
    model = amc.models.create("digits_resnet").eval()
    net = amc.trace(model, torch.randn(1, 1, 8, 8))
    with pytest.raises(ExportError, match="ReconstructedNetwork first"):
        amc.export.to_module(model, net)
    with pytest.raises(ExportError, match="itself does not run on the example inputs"):
        amc.export.to_module(net, model, torch.randn(1, 3, 8, 8))  # three channels: not what it was traced with
    with pytest.raises(ExportError, match="save_pretrained takes a transformers"):
        amc.export.save_pretrained(model, "/nonexistent/never-written")


def test_bad_rule_and_checkpoint_folder_are_named(tmp_path):
    with pytest.raises(ExportError, match="two callables"):
        amc.export.register_attribute_rule("OddAttention", {"dk": 4})
    with pytest.raises(amc.errors.LoadError, match="no config.json"):
        amc.export.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("heads", [False, True], ids=["dims", "heads"])
def test_timm_vit_written_back(heads, one_thread):
    """timm's Attention reshapes qkv to (B, N, 3, num_heads, head_dim) and returns attn_dim features. With 3
    heads pruned to 2 the reshape (3, 2, 64) was read as 3 heads (the q/k/v count taken for the head
    count), attn_dim was not updated, and with pruned head dims its fused SDPA scaled by the new head size
    (the written-back copy now takes timm's own path, which keeps `scale`)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2,
                                                             num_heads=3, mlp_ratio=2, num_classes=10).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    small = amc.prune(model, ratio=0.4, example_inputs=(x,), heads=heads)
    eager = amc.export.to_module(small, model, x)
    attn = eager.blocks[0].attn
    assert attn.num_heads == (2 if heads else 3) and attn.attn_dim == attn.num_heads * attn.head_dim
    assert attn.fused_attn is heads  # only a changed head size needs the unfused path
    with torch.no_grad():
        assert torch.allclose(eager(y), small(y), atol=1e-5)


def _timm_written_back(name: str, size: int = 64):
    """(model, pruned network, written-back copy, input) for the smallest timm model of a family."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, size, size)
    small = amc.prune(model, ratio=0.5, example_inputs=(x,))
    return model, small, amc.export.to_module(small, model, x), x


def test_blur_pool_channels_follow_its_filter(one_thread):
    """timm's BlurPool2d convolves with `groups=self.channels`: the written-back copy kept the unpruned count
    ('Given groups=64, expected weight to be at least 64')."""
    model, small, eager, x = _timm_written_back("resnetblur18")
    blurs = [(m, o) for m, o in zip(eager.modules(), model.modules()) if type(m).__name__ == "BlurPool2d"]
    assert blurs and all(m.channels == m.filt.shape[0] < o.channels for m, o in blurs)
    with torch.no_grad():
        assert torch.allclose(eager(x), small(x), atol=1e-5)


@pytest.mark.parametrize("name", ["poolformer_s12", "caformer_s18"])
def test_metaformer_scale_and_group_norm_follow_their_tensors(name, one_thread):
    """timm's MetaFormer multiplies by `scale.view(self.shape)` (shape (dim, 1, 1) kept unpruned: 'shape
    [320] is invalid'), and its GroupNorm1 (one group over channels and space) was resized to 0 groups."""
    model, small, eager, x = _timm_written_back(name)
    scales = [m for m in eager.modules() if type(m).__name__ == "Scale"]
    assert all(m.shape[0] == m.scale.numel() for m in scales)
    with torch.no_grad():
        assert torch.allclose(eager(x), small(x), atol=1e-5)


# timm families whose forward reads a size from an attribute (or holds a conv whose kernel runs over
# channels): the written-back copy failed ('split_with_sizes expects split_sizes to sum exactly to 8',
# 'Given groups=1, weight of size [64, 64, 3, 3], expected input[1, 128, 28, 28]') or was refused.
# {model: (class of the layer, attribute that must follow the pruning)}
TIMM_SIZE_ATTRIBUTES = {
    "ecaresnet26t": ("ConvOverKeptChannels", "__class__"),     # ECA's conv over the pooled channels
    "cspresnet50": ("CrossStage", "expand_chs"),               # x.split(self.expand_chs // 2)
    "mixnet_s": ("MixedConv2d", "splits"),                     # torch.split(x, self.splits)
    "rexnet_100": ("LinearBottleneck", "in_channels"),         # x[:, 0:self.in_channels] + shortcut
    "res2net50_26w_4s": ("Bottle2neck", "width"),              # torch.split(out, self.width)
    "skresnet18": ("SelectiveKernel", "in_channels"),          # split by self.in_channels // num_paths
    "nf_regnet_b0": ("ScaledStdConv2d", "out_channels"),       # F.conv2d(..., self.groups): groups kept
    "inception_next_atto": ("InceptionDWConv2d", "split_indexes"),
    "fasternet_t0": ("Partial_conv3", "dim_untouched"),        # split by [self.dim_conv3, self.dim_untouched]
    # .split([self.key_dim, self.key_dim, self.val_dim]) per head, output reshaped to num_heads * val_dim;
    # its last stage has num_heads == key_dim == 16, which a match by value alone resized too
    "levit_128s": ("AttentionDownsample", "val_attn_dim"),
    "tiny_vit_5m_224": ("Attention", "out_dim"),               # and its SDPA path (pruned key size) is left
    "botnet26t_256": ("BottleneckAttn", "dim_head_qk"),        # split by dim_out_qk, per head dim_out_qk / heads
    "maxvit_pico_rw_256": ("AttentionCl", "dim_head"),         # qkv(x).view(B, -1, heads, dim_head * 3)
    "coatnet_pico_rw_224": ("Attention2d", "dim_head"),        # a 1x1 conv qkv viewed (B, heads, dim_head * 3, -1)
    "pvt_v2_b0": ("Attention", "head_dim"),                    # q viewed (B, N, heads, -1), kv (.., heads, head_dim)
}


@pytest.mark.parametrize("name", sorted(TIMM_SIZE_ATTRIBUTES))
def test_timm_size_attributes_follow_the_pruning(name, one_thread):
    # attention biases / position tables are built for these sizes
    size = {"levit_128s": 224, "botnet26t_256": 256, "maxvit_pico_rw_256": 256, "coatnet_pico_rw_224": 224}.get(name, 64)
    model, small, eager, _ = _timm_written_back(name, size)
    assert type(eager) is type(model)
    cls, attribute = TIMM_SIZE_ATTRIBUTES[name]
    pairs = [(getattr(m, attribute), getattr(o, attribute)) for (_, m), (_, o)
             in zip(eager.named_modules(), model.named_modules()) if type(o).__name__ == cls
             or type(m).__name__ == cls]
    assert pairs and any(new != old for new, old in pairs), pairs
    with torch.no_grad():
        y = torch.randn(2, 3, size, size)
        assert torch.allclose(eager(y), small(y), atol=1e-5)


def _torchvision_swin(v2: bool):
    from torchvision.models import swin_transformer as sw

    extra = dict(block=sw.SwinTransformerBlockV2, downsample_layer=sw.PatchMergingV2) if v2 else {}
    return sw.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                              stochastic_depth_prob=0.0, num_classes=10, **extra)


def _torchvision_maxvit():
    from torchvision.models import MaxVit

    return MaxVit(input_size=(64, 64), stem_channels=16, partition_size=4, block_channels=[16, 32],
                  block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)


# torchvision attentions that compute from their input's width: Swin scales queries by (C // heads) ** -0.5
# (the network keeps the captured scale: 6e-4 off), Swin v2 zeroes `qkv_bias[n // 3:2 * n // 3]` (its q/k/v
# stayed unpruned and the copy failed to run), MaxViT splits `to_qkv` by `head_dim`
TORCHVISION_ATTENTIONS = {"swin": lambda: _torchvision_swin(False), "swin_v2": lambda: _torchvision_swin(True),
                          "maxvit": _torchvision_maxvit}


@pytest.mark.parametrize("name", sorted(TORCHVISION_ATTENTIONS))
def test_torchvision_window_attention_written_back(name, one_thread):
    torch.manual_seed(0)
    model = TORCHVISION_ATTENTIONS[name]().eval()
    for n, m in model.named_modules():  # peaked attention (the init's is near uniform, blind to its scale)
        if n.endswith(("attn.qkv", ".to_qkv")):
            nn.init.normal_(m.weight, std=0.5)
    x = torch.randn(1, 3, 64, 64)
    small = amc.prune(model, ratio=0.5, example_inputs=(x,))
    eager = amc.export.to_module(small, model, x)
    assert type(eager) is type(model)
    qkv = [(m, o) for (n, m), (_, o) in zip(eager.named_modules(), model.named_modules())
           if n.endswith(("attn.qkv", ".to_qkv"))]
    assert qkv and all(m.out_features < o.out_features for m, o in qkv)
    with torch.no_grad():
        y = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(eager(y), small(y), rtol=1e-4, atol=1e-5)


def test_halo_attention_q_conv_is_read_as_blocks_not_heads(one_thread):
    """HaloNet's `q` is a 1x1 conv like Attention2d's qkv, but its view splits blocks: read as heads, its
    head count was rewritten and the copy failed ('size of tensor a (392) must match ... (196)')."""
    model, small, eager, x = _timm_written_back("halonet_h1", 256)
    with torch.no_grad():
        assert torch.allclose(eager(x), small(x), atol=1e-5)


@pytest.mark.parametrize("name", ["davit_tiny", "volo_d1_224"])
def test_fused_attention_without_a_head_size_attribute_keeps_its_scale(name, one_thread):
    """DaViT's window attention (and VOLO's) derives its head size from the input (`C // num_heads`) and keeps only
    `scale`: fused SDPA scaled by the pruned head size (6e-4 off, refused); its own path keeps `scale`."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is not None and hasattr(m, "scale")]
    for m in fused:
        m.fused_attn = True
    size = 224 if name.startswith("volo") else 64
    x = torch.randn(1, 3, size, size)
    small = amc.prune(model, ratio=0.5, example_inputs=(x,))
    eager = amc.export.to_module(small, model, x)
    assert any(m.fused_attn is False for m in eager.modules() if getattr(m, "fused_attn", None) is not None)
    with torch.no_grad():
        torch.testing.assert_close(eager(x), small(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,size", [("eva02_tiny_patch14_224", 224), ("vit_tiny_patch16_dinov3_qkvb", 256)])
def test_eva_rotary_attention_prunes_and_writes_back(name, size, one_thread):
    """EVA-02 rotates q/k in interleaved pairs (`x[..., 1::2]` and `x[..., ::2]`, stacked back): those strided
    slices froze q, k and v (0.46x MACs at ratio 0.5), and the output's `reshape(B, N, C)`, C read from the
    pruned residual, then refused the copy. DINOv3's rotary table asserts `periods.numel() == dim // 4`, and
    its register tokens (rows of one parameter, thinned like channels) move the prefix-token counts."""
    model, small, eager, x = _timm_written_back(name, size)
    assert amc.count(small, x)[0] < 0.35 * amc.count(amc.trace(model, x), x)[0]
    with torch.no_grad():
        y = torch.randn(2, 3, size, size)
        torch.testing.assert_close(eager(y), small(y), rtol=1e-4, atol=1e-5)


class AliasedLayer(nn.Module):
    """One conv under two names (`self.shared = self.c2`, a refactor alias), called through both."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 4)
        self.shared = self.c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y)) + y
        y = torch.relu(self.shared(y)) + y
        return self.fc(y.mean((2, 3)))


def test_a_layer_under_two_names_is_written_back_once(one_thread):
    """The network names the layer by one of its names; the other kept the unpruned layer (refused as 'no
    layer of the same name and class', or failing at the other call)."""
    torch.manual_seed(0)
    model, x = AliasedLayer().eval(), torch.randn(2, 3, 8, 8)
    small = amc.prune(model, 0.5, example_inputs=(x,))
    eager = amc.export.to_module(small, model, x)
    assert eager.c2 is eager.shared and eager.c2.out_channels == 8
    with torch.no_grad():
        assert torch.allclose(eager(x), small(x), atol=1e-6)


class TiedLM(nn.Module):
    """An output projection that reuses the embedding's Parameter (`head.weight = emb.weight`)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(50, 32), nn.Linear(32, 64), nn.Linear(64, 32)
        self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.emb(t)
        return self.head(self.norm(h + self.fc2(torch.relu(self.fc1(h)))))


def test_tied_weights_stay_one_parameter(one_thread):
    """The residual width pruned: the network keeps the tied table one tensor, but each layer was written
    back as its own copy, so the written-back model held two (fine-tuning would train them apart)."""
    torch.manual_seed(0)
    model, t = TiedLM().eval(), torch.randint(0, 50, (2, 7))
    small = amc.prune(model, 0.5, example_inputs=(t,))
    eager = amc.export.to_module(small, model, t)
    assert eager.head.weight is eager.emb.weight and eager.emb.embedding_dim == 16
    assert len(list(eager.parameters())) == len(list(model.parameters()))
    with torch.no_grad():
        assert torch.allclose(eager(t), small(t), atol=1e-6)
