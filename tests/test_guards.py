"""Shape guards: a Python decision taken on a traced size is recorded and checked on every run."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import amc
from amc.errors import GraphError


class Branchy(nn.Module):
    """Pools only inputs wider than 8: a traced 16x16 run must refuse a 4x4 input, not mis-compute it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(96, 10)

    def forward(self, x):
        x = self.conv(x)
        if x.shape[-1] > 8:
            x = self.pool(x)
        return self.fc(x.flatten(1))


class Asserting(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.c2 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = self.c1(x)
        assert y.shape[1] == 8
        return self.c2(y)


def test_branch_on_shape_is_guarded():
    model = Branchy().eval()
    net = amc.trace(model, torch.randn(2, 3, 16, 16))
    assert [g["condition"] for g in net.guards] == ["16 > 8"]
    assert "if x.shape[-1] > 8:" in net.guards[0]["source"]
    x = torch.randn(3, 3, 12, 12)  # keeps the branch: runs, and equals eager
    assert torch.allclose(net(x), model(x), atol=1e-6)
    with pytest.raises(GraphError) as info:
        net(torch.randn(2, 3, 4, 4))  # eager takes the other branch here
    msg = str(info.value)
    assert "test_guards.py" in msg and "x.shape[-1] > 8" in msg
    assert "16 > 8 is True" in msg and "4 > 8 = False" in msg and "trace the model again" in msg


def test_guards_survive_json_and_pkl(tmp_path):
    net = amc.trace(Branchy().eval(), torch.randn(2, 3, 16, 16))
    net.save_to_json(str(tmp_path / "g.json"))
    net.save(pkl=str(tmp_path / "g.pkl"))
    for loaded in (amc.ReconstructedNetwork.load_from_json(str(tmp_path / "g.json")),
                   amc.ReconstructedNetwork.load(pkl=str(tmp_path / "g.pkl"))):
        assert loaded.guards == net.guards
        loaded(torch.randn(1, 3, 16, 16))
        with pytest.raises(GraphError, match="shape guard failed"):
            loaded(torch.randn(1, 3, 8, 8))


def test_summary_lists_guards(capsys):
    net = amc.trace(Branchy().eval(), torch.randn(1, 3, 16, 16))
    text = net.summary()
    assert "guards (1)" in text and "16 > 8 is True" in text


def test_sizes_that_only_flow_into_ops_stay_dynamic():
    """No comparison, no guard: batch and spatial sizes used by view/interpolate follow the input."""
    class Flow(nn.Module):
        def forward(self, x):
            b, c, h, w = x.shape
            return nn.functional.interpolate(x.view(b, c, h * w).view(b, c, h, w), size=(h * 2, w))

    net = amc.trace(Flow(), torch.randn(2, 3, 4, 4))
    assert net.guards == []
    assert net(torch.randn(5, 3, 6, 2)).shape == (5, 3, 12, 2)


def test_guard_on_batch_size_is_explicit():
    class OneAtATime(nn.Module):
        def forward(self, x):
            if x.size(0) == 1:
                return x * 2
            return x

    net = amc.trace(OneAtATime(), torch.randn(1, 3))
    assert net(torch.ones(1, 3)).sum() == 6
    with pytest.raises(GraphError, match="1 == 1 is True.*4 == 1 = False"):
        net(torch.ones(4, 3))


def test_pruning_keeps_asserted_channel_sizes_working():
    """The pruned graph takes the captured path; its guards are re-recorded for the new sizes."""
    model = Asserting().eval()
    x = torch.randn(2, 3, 16, 16)
    net = amc.trace(model, x)
    assert net.guards[0]["condition"] == "8 == 8"
    small = amc.prune(model, ratio=0.5, example_inputs=(x,))
    assert small.network["c1"].out_channels == 4
    assert small(torch.randn(3, 3, 16, 16)).shape == (3, 4, 12, 12)
    assert net.guards[0]["expected"] is True  # the original graph still expects the original path


def test_guard_comparing_two_traced_sizes():
    class Square(nn.Module):
        def forward(self, x):
            if x.shape[-1] == x.shape[-2]:
                return x.transpose(-1, -2)
            return x

    net = amc.trace(Square(), torch.randn(1, 4, 4))
    assert net(torch.randn(2, 5, 5)).shape == (2, 5, 5)
    with pytest.raises(GraphError, match="4 == 4 is True.*3 == 5 = False"):
        net(torch.randn(2, 5, 3))


class PerImage(nn.Module):
    """A Python loop over a list input, as detectors run one per image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, images):
        return [self.conv(img[None]).mean((2, 3))[0] for img in images]


class DictIn(nn.Module):
    def forward(self, batch):
        return batch["a"] + batch["b"]


def test_list_of_another_length_is_refused_not_truncated():
    model = PerImage().eval()
    one = amc.trace(model, [torch.randn(3, 16, 16)])
    other = [torch.randn(3, 16, 16)]
    assert torch.allclose(one(other)[0], model(other)[0], atol=1e-6)  # another one-image input runs
    assert one([torch.randn(3, 24, 20)])[0].shape == (4,)  # sizes inside stay dynamic
    with pytest.raises(GraphError, match=r"input 'images' has 2 item\(s\); it was captured with 1.*once per item"):
        one([torch.randn(3, 16, 16), torch.randn(3, 16, 16)])
    assert {"node": "images", "source": "input structure", "condition": "len(images) == 1",
            "expected": True} in one.guards


def test_dict_with_other_keys_is_refused():
    net = amc.trace(DictIn(), {"a": torch.ones(2), "b": torch.ones(2)})
    assert net({"a": torch.ones(3), "b": torch.zeros(3)}).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(GraphError, match=r"keys \['a', 'c'\]; it was captured with keys \['a', 'b'\]"):
        net({"a": torch.ones(2), "c": torch.ones(2)})


class MaskSkip(nn.Module):
    """Skips its mask when nothing is masked, as Hugging Face's attention-mask code does in eager mode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask):
        y = self.fc(x)
        if mask.all():
            return y
        return y * mask.unsqueeze(-1)


class ScaledByMax(nn.Module):
    def forward(self, x):
        return x / float(x.abs().max())


def test_value_read_into_python_is_guarded(tmp_path):
    """`if mask.all():` on a traced tensor: the graph holds one branch, so another value must raise
    (before this guard, a net traced with an all-ones mask silently ignored padding later)."""
    model = MaskSkip().eval()
    x = torch.randn(2, 3, 4)
    net = amc.trace(model, x, torch.ones(2, 3))
    assert [g["kind"] for g in net.guards] == ["value"]
    assert torch.allclose(net(x, torch.ones(2, 3)), model(x, torch.ones(2, 3)))
    padded = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    for loaded in (net, amc.ReconstructedNetwork.load_from_json(net.save_to_json(str(tmp_path / "v.json")))):
        with pytest.raises(GraphError, match="value guard failed.*mask.all"):
            loaded(x, padded)


def test_item_read_is_guarded():
    model = ScaledByMax()
    x = torch.randn(3, 5)
    net = amc.trace(model, x)
    assert torch.allclose(net(x), model(x))  # the same values: the captured constant holds
    with pytest.raises(GraphError, match="value guard failed"):
        net(2 * x)  # eager divides by the new maximum; the graph would keep the old one


def test_pruning_names_a_first_sample_that_takes_another_branch():
    """Pruning analyses one sample; when that sample reads another value than the captured batch did, the
    error says so and what to do (before value guards, the wrong branch was pruned silently)."""
    model = MaskSkip().eval()
    x, mask = torch.randn(2, 3, 4), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    net = amc.trace(model, x, mask)
    with pytest.raises(amc.errors.PruningError, match="first sample .* another branch"):
        amc.prune(net, ratio=0.5, example_inputs=(x, mask))
    with pytest.raises(amc.errors.PruningError, match="random ones"):
        amc.prune(net, ratio=0.5)  # random example inputs: no zero in the mask
    one = amc.trace(model, x[1:], mask[1:])
    small = amc.prune(one, ratio=0.5, example_inputs=(x[1:], mask[1:]))
    assert small(x[1:], mask[1:]).shape == (1, 3, 4)
    assert torch.allclose(one(x[1:], mask[1:]), model(x[1:], mask[1:]))


class FixedBatch(nn.Module):
    """`int()` of a traced size hands torch a plain number: the graph holds it for the captured size."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        n = int(x.shape[0])
        channels = int(x.shape[1])
        return self.fc(x.reshape(n, -1)) * channels


def test_int_of_a_traced_size_is_guarded():
    model = FixedBatch().eval()
    net = amc.trace(model, torch.randn(2, 4, 4))
    assert [g["condition"] for g in net.guards] == ["2 == 2", "4 == 4"]
    assert "n = int(x.shape[0])" in net.guards[0]["source"]
    x = torch.randn(2, 4, 4)
    assert torch.allclose(net(x), model(x))
    with pytest.raises(GraphError, match=r"n = int\(x.shape\[0\]\).*3 == 2 = False"):
        net(torch.randn(3, 4, 4))  # before: a torch shape error deep inside the run
