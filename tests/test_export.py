"""amc.export: pkl, JSON + safetensors and ONNX round trips, bad files, atomic writes.

Golden equality is the backbone: a saved-then-loaded network must give the original network's outputs
at the traced batch size and another one, and must `lint()`.
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import warnings
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
import torch.nn as nn
import torchvision

import amc
from amc.errors import ExportError, LoadError
from amc.export import atomic, json_io, onnx_io, pkl
from amc.export.json_io import load_json, save_json
from amc.export.onnx_io import save_onnx
from amc.export.pkl import load_pkl, save_pkl
from amc.graph import ops
from amc.graph.network import ReconstructedNetwork
from amc.graph.node import InputNode, Node
from amc.graph.template import Ref

RTOL, ATOL = 1e-4, 1e-5


def assert_same(ref: Any, got: Any, where: str = "out") -> None:
    """Same nested structure and container types; tensors equal within rtol 1e-4 / atol 1e-5."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: got {type(got).__name__}"
        torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{where}: {m}")
        return
    assert type(got) is type(ref) or (hasattr(ref, "_fields") and got._fields == ref._fields), \
        f"{where}: {type(got).__name__} != {type(ref).__name__}"
    if isinstance(ref, dict):
        assert list(got) == list(ref), f"{where}: keys {list(got)} != {list(ref)}"
        for k in ref:
            assert_same(ref[k], got[k], f"{where}[{k!r}]")
    elif isinstance(ref, (list, tuple)):
        assert len(got) == len(ref)
        for i, (r, g) in enumerate(zip(ref, got)):
            assert_same(r, g, f"{where}[{i}]")
    else:
        assert got == ref, f"{where}: {got!r} != {ref!r}"


# ----------------------------------------------------------------------------------------------
# Tiny hand-written models, each isolating what the formats must carry.

class Tiny(nn.Module):
    """LayerNorm + permute (ConvNeXt-style), a tensor made in forward and mutated, w.T, sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.rand(8))
        self.proj = nn.Parameter(torch.randn(5, 8 * 36) / 16)

    def forward(self, x: torch.Tensor) -> Dict[str, Any]:
        y = self.conv(x).permute(0, 2, 3, 1)
        y = self.fc(self.norm(y)) * self.scale
        y = y.permute(0, 3, 1, 2)
        mask = torch.zeros(8)
        mask[::2] = y.mean()  # a constant tensor mutated by a traced value: Constant(clone=True)
        z = y.flatten(2).transpose(1, 2) * mask
        z = z.reshape(x.size(0), -1)
        return {"logits": z @ self.proj.T, "pair": (y.mean(dim=(2, 3)), z[..., :7].abs().max(dim=1).values)}


class Tied(nn.Module):
    """A weight used both by its Linear and directly: the JSON sidecar must store it once."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) @ self.fc.weight + torch.clamp(x, min=-float("inf"), max=3.0)


Point = collections.namedtuple("Point", ["a", "b"])


class NamedOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> Point:
        y = self.lin(x)
        return Point(y, y[:, 1:3].sum(-1, keepdim=True))


def tiny_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64)


def tiny_swin() -> nn.Module:
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                                              window_size=[4, 4], num_classes=10)


MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "resnet18": (lambda: torchvision.models.resnet18(), (3, 32, 32)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), (3, 32, 32)),
    "vit_tiny": (tiny_vit, (3, 32, 32)),
    "tiny_layernorm_permute": (Tiny, (3, 6, 6)),
    "swin_tiny": (tiny_swin, (3, 32, 32)),
    "lraspp": (lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None), (3, 64, 64)),
    "tied_weights": (Tied, (6,)),
    "namedtuple_out": (NamedOut, (4,)),
}

_NETS: Dict[str, ReconstructedNetwork] = {}


def traced(name: str) -> ReconstructedNetwork:
    """Trace once per session (batch 2); tests only read the network."""
    if name not in _NETS:
        make, shape = MODELS[name]
        torch.manual_seed(0)
        model = make().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _NETS[name] = amc.trace(model, torch.randn(2, *shape))
    return _NETS[name]


def check_equal(net: ReconstructedNetwork, loaded: ReconstructedNetwork, batches=(2, 3)) -> None:
    loaded.lint()
    for b in batches:
        inputs = net.example_inputs(b)
        with torch.no_grad():
            assert_same(net(*inputs), loaded(*inputs), f"batch {b}")


@pytest.fixture(params=list(MODELS))
def model_net(request) -> Tuple[str, ReconstructedNetwork]:
    return request.param, traced(request.param)


# ----------------------------------------------------------------------------------------------
# Round trips.

def test_pkl_round_trip(model_net, tmp_path):
    name, net = model_net
    path = save_pkl(net, str(tmp_path / f"{name}.pkl"))
    custom = name == "namedtuple_out"  # the output class lives in this test module: not on the allowlist
    if custom:
        with pytest.raises(LoadError, match="test_export.Point.*trusted=True"):
            load_pkl(path)
    loaded = load_pkl(path, trusted=custom)
    assert isinstance(loaded, ReconstructedNetwork)
    check_equal(net, loaded)
    assert net.save(str(tmp_path / "again.pkl")) and isinstance(
        ReconstructedNetwork.load(str(tmp_path / "again.pkl"), trusted=custom), ReconstructedNetwork)


def test_save_writes_the_format_its_name_says(tmp_path):
    """net.save("m.json") wrote a pickle named .json (and .onnx likewise): every tool opening it failed."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval(), \
        torch.randn(2, 3, 8, 8)
    net = amc.trace(model, x)
    js, ox, pk = (str(tmp_path / f"m.{ext}") for ext in ("json", "onnx", "pt"))
    net.save(js), net.save(ox), net.save(pk)
    assert json.loads(open(js, encoding="utf-8").read())  # JSON text, not a pickle
    import onnx

    onnx.checker.check_model(onnx.load(ox))
    for loaded in (ReconstructedNetwork.load(js), ReconstructedNetwork.load(pk), amc.load(js), amc.load(pk)):
        with torch.no_grad():
            assert torch.equal(loaded(x), net(x))
    with pytest.raises(ExportError, match="does not read back.*onnxruntime"):
        amc.load(ox)
    with pytest.raises(ExportError, match="weights only"):
        net.save(str(tmp_path / "m.safetensors"))


def test_exporters_take_example_inputs_as_everywhere_else(tmp_path):
    """save_onnx(net, path, (x,)) passed the tuple as the first input (torch's conv2d TypeError, wrapped)."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    net = amc.trace(model, x)
    paths = [save_onnx(net, str(tmp_path / "a.onnx"), x), save_onnx(net, str(tmp_path / "b.onnx"), (x,)),
             save_onnx(net, str(tmp_path / "c.onnx"), example_inputs=[x]),
             net.save_to_onnx(str(tmp_path / "d.onnx"), (x,))]
    sessions = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]) for p in paths]
    outs = [s.run(None, {s.get_inputs()[0].name: x.numpy()})[0] for s in sessions]
    assert all((o == outs[0]).all() for o in outs[1:])
    with pytest.raises(ExportError, match="give one of them"):
        save_onnx(net, str(tmp_path / "e.onnx"), x, example_inputs=(x,))
    pruned = amc.prune(model, example_inputs=x, ratio=0.5)
    from amc.export import to_module

    for eager in (to_module(pruned, model, (x,)), to_module(pruned, model, example_inputs=x)):
        with torch.no_grad():
            torch.testing.assert_close(eager(x), pruned(x))


def test_json_round_trip(model_net, tmp_path):
    name, net = model_net
    path = save_json(net, str(tmp_path / f"{name}.json"))
    assert (tmp_path / f"{name}.safetensors").is_file()
    loaded = load_json(path)
    check_equal(net, loaded)
    assert [n.name for n in loaded.layer_nodes] == [n.name for n in net.layer_nodes]
    assert [n.meta for n in loaded.layer_nodes] == [n.meta for n in net.layer_nodes]
    assert [(n.name, n.index, n.meta) for n in loaded.input_nodes] == \
        [(n.name, n.index, n.meta) for n in net.input_nodes]
    assert loaded.meta == net.meta
    assert [m.training for m in loaded.modules()] == [m.training for m in net.modules()]
    # the loaded network saves again to the same description
    save_json(loaded, str(tmp_path / "again.json"))
    first, second = (json.loads((tmp_path / p).read_text()) for p in (f"{name}.json", "again.json"))
    for doc in (first, second):
        doc["weights"].pop("file"), doc["weights"].pop("sha256")
    assert first == second


def test_json_is_readable(tmp_path):
    net = traced("resnet18")
    save_json(net, str(tmp_path / "r.json"))
    doc = json.load(open(tmp_path / "r.json"))
    assert doc["format"] == json_io.FORMAT and doc["version"] == json_io.VERSION
    assert len(doc["nodes"]) == len(net.layer_nodes)
    for node in doc["nodes"]:
        assert {"name", "op", "class", "inputs", "out"} <= set(node), node
    conv = doc["nodes"][0]
    assert conv["class"] == "torch.nn.modules.conv.Conv2d"
    assert conv["config"] == {"in_channels": 3, "out_channels": 64, "kernel_size": [7, 7], "stride": [2, 2],
                              "padding": [3, 3], "dilation": [1, 1], "groups": 1, "bias": False,
                              "padding_mode": "zeros"}
    assert conv["inputs"]["args"] == [{"ref": "x", "path": []}]
    assert conv["out"] == {"shape": [2, 64, 16, 16], "dtype": "float32"}
    # one node per line: grep-able
    lines = (tmp_path / "r.json").read_text().splitlines()
    assert any(line.strip().startswith('{"name": "fc"') for line in lines)


def test_json_special_values_and_mha_config(tmp_path):
    vit = traced("vit_tiny")
    save_json(vit, str(tmp_path / "v.json"))
    doc = json.load(open(tmp_path / "v.json"))
    mha = next(n for n in doc["nodes"] if n["op"] == "MultiheadAttention")
    assert mha["config"] == {"embed_dim": 32, "num_heads": 2, "dropout": 0.0, "bias": True, "add_bias_kv": False,
                             "add_zero_attn": False, "kdim": 32, "vdim": 32, "batch_first": True}
    tied = traced("tied_weights")
    save_json(tied, str(tmp_path / "t.json"))
    text = (tmp_path / "t.json").read_text()
    assert '{"float": "-inf"}' in text
    check_equal(tied, load_json(str(tmp_path / "t.json")))
    swin = traced("swin_tiny")
    save_json(swin, str(tmp_path / "s.json"))
    assert '{"slice": [' in (tmp_path / "s.json").read_text()


def test_json_dedupes_shared_tensors(tmp_path):
    from safetensors.torch import load_file

    net = traced("tied_weights")
    save_json(net, str(tmp_path / "t.json"))
    doc = json.load(open(tmp_path / "t.json"))
    aliases = doc["weights"]["aliases"]
    assert aliases, "the Linear weight used directly must be recorded as an alias"
    stored = load_file(str(tmp_path / "t.safetensors"))
    assert not set(aliases) & set(stored)
    loaded = load_json(str(tmp_path / "t.json"))
    (alias, target), = aliases.items()
    assert loaded.network.get_parameter(target) is loaded.network.get_parameter(alias)  # still one parameter


def test_json_keeps_constant_clone_flag_and_frozen_params(tmp_path):
    net = traced("tiny_layernorm_permute").copy()
    consts = [m for m in net.network.values() if isinstance(m, ops.Constant)]
    assert consts and any(m.clone for m in consts)
    net.network["conv"].weight.requires_grad_(False)
    save_json(net, str(tmp_path / "c.json"))
    loaded = load_json(str(tmp_path / "c.json"))
    assert [m.clone for m in loaded.network.values() if isinstance(m, ops.Constant)] == [m.clone for m in consts]
    assert not loaded.network["conv"].weight.requires_grad
    assert loaded.network["fc"].weight.requires_grad
    check_equal(net, loaded)


def test_json_keeps_dtypes(tmp_path):
    net = traced("namedtuple_out").copy().double()
    save_json(net, str(tmp_path / "d.json"))
    loaded = load_json(str(tmp_path / "d.json"))
    assert loaded.network["lin"].weight.dtype == torch.float64
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_same(net(x), loaded(x))


def test_json_sequential_leaf(tmp_path):
    """A pass may replace a layer by an nn.Sequential (low-rank factors): described child by child."""
    net = traced("namedtuple_out").copy()
    net.network["lin"] = nn.Sequential(nn.Linear(4, 2, bias=False), nn.GELU(approximate="tanh"), nn.Linear(2, 4))
    net.recompile()
    save_json(net, str(tmp_path / "s.json"))
    entry = json.load(open(tmp_path / "s.json"))["nodes"][0]
    assert entry["class"] == "torch.nn.modules.container.Sequential"
    assert [c[1]["class"].rsplit(".", 1)[1] for c in entry["children"]] == ["Linear", "GELU", "Linear"]
    assert entry["children"][1][1]["config"] == {"approximate": "tanh"}
    check_equal(net, load_json(str(tmp_path / "s.json")))

    class Odd(nn.Module):
        def forward(self, x):
            return x

    net.network["lin"] = nn.Sequential(nn.Linear(4, 4), Odd())
    with pytest.raises(ExportError, match=r"node 'lin' holds a .*Odd.*not on the JSON allowlist"):
        save_json(net, str(tmp_path / "odd.json"))


def test_json_load_runs_no_pickle(tmp_path, monkeypatch):
    net = traced("swin_tiny")
    save_json(net, str(tmp_path / "s.json"))

    def refuse(*args, **kwargs):
        raise AssertionError("load_json must not unpickle anything")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load_json(str(tmp_path / "s.json"))
    monkeypatch.undo()
    check_equal(net, loaded)


def test_value_codec_round_trips():
    values = [None, True, 3, -2.5, "s", float("inf"), float("-inf"), (1, (2, [3])), [1, 2], slice(1, None, 2),
              Ellipsis, torch.float16, torch.device("cpu"), torch.channels_last, torch.strided, 1 + 2j,
              torch.Size([2, 3]), {"a": 1, "b": (2,)}, {0: "x", "k": 1}, {"tuple": 1},
              collections.OrderedDict(out=Ref("n", ("k", 0))), Point(1, Ref("m"))]
    for v in values:
        encoded = json_io.encode_value(v)
        back = json_io.decode_value(json.loads(json.dumps(encoded, allow_nan=False)))
        assert back == v and type(back).__name__ == type(v).__name__, (v, encoded, back)
    nan = json_io.decode_value(json_io.encode_value(float("nan")))
    assert nan != nan


# ----------------------------------------------------------------------------------------------
# ONNX.

@pytest.mark.parametrize("name", ["resnet18", "vit_tiny", "tiny_layernorm_permute"])
def test_onnx_round_trip(name, tmp_path):
    import numpy as np
    import onnxruntime as ort

    net = traced(name)
    flags = [m.training for m in net.modules()]
    path = save_onnx(net, str(tmp_path / f"{name}.onnx"))  # checks at another batch size itself
    assert [m.training for m in net.modules()] == flags, "export must not change training flags"
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [n.name for n in net.input_nodes]
    for b in (1, 4):
        x = torch.randn(b, *MODELS[name][1])
        with torch.no_grad():
            ref = onnx_io.flatten_leaves(net(x))
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert len(got) == len(ref)
        for r, g in zip(ref, got):
            np.testing.assert_allclose(g, r.numpy(), rtol=1e-3, atol=1e-4)


def test_onnx_dict_output_names(tmp_path):
    import onnx

    net = traced("tiny_layernorm_permute")
    save_onnx(net, str(tmp_path / "t.onnx"), torch.randn(2, 3, 6, 6), check=False)
    model = onnx.load(str(tmp_path / "t.onnx"))
    outs = [o.name for o in model.graph.output]
    assert outs[0] == "logits" and len(outs) == 3
    assert all(o.type.tensor_type.shape.dim[0].dim_param == "batch" for o in model.graph.output)


@pytest.mark.parametrize("name", ["resnet18", "lraspp"])
def test_onnx_dynamic_axes_free_the_image_size(name, tmp_path):
    """dynamic_axes (torch.onnx.export's form) frees height and width: the file runs, and matches the
    network, at sizes it was not exported at; a segmentation head's output follows the input size."""
    import numpy as np
    import onnxruntime as ort

    net = traced(name)
    path = save_onnx(net, str(tmp_path / f"{name}.onnx"), dynamic_axes={0: {2: "height", 3: "width"}})
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [MODELS[name][1][0], "height", "width"]
    for hw in ((48, 80), (96, 64)):
        x = torch.randn(3, MODELS[name][1][0], *hw)
        with torch.no_grad():
            ref = onnx_io.tensor_leaves(net(x))
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        for r, g in zip(ref, got):
            assert g.shape == tuple(r.shape)
            np.testing.assert_allclose(g, r.numpy(), rtol=1e-3, atol=1e-4)
    fixed = ort.InferenceSession(save_onnx(net, str(tmp_path / "fixed.onnx")), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="dimensions"):  # without it, the traced size is part of the file
        fixed.run(None, {fixed.get_inputs()[0].name: torch.randn(1, MODELS[name][1][0], 48, 80).numpy()})


def test_onnx_dynamic_axes_bad_input(tmp_path):
    net = traced("resnet18")
    for axes, match in [({"image": {2: "h"}}, r"not an input of the network; its inputs are \['x'\]"),
                        ({"x": {4: "b"}}, "has no axis 4.*give axes 0..3"),
                        ({"x": {2: 5}}, "must map axis numbers to names"), ([2, 3], "must be a dict"),
                        ({"x": {2: "side", 1: "side"}}, "one name means one size")]:
        with pytest.raises(ExportError, match=match):
            save_onnx(net, str(tmp_path / "r.onnx"), dynamic_axes=axes)
    import onnx

    listed = onnx.load(save_onnx(net, str(tmp_path / "l.onnx"), dynamic_axes={"x": [2]}))  # named after the input
    assert [d.dim_param or d.dim_value for d in listed.graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, "x_2", 32]
    os.remove(tmp_path / "l.onnx")
    # torch.onnx.export's users name the batch axis too, or count from the end: both are accepted
    named = onnx.load(save_onnx(net, str(tmp_path / "n.onnx"), dynamic_axes={"x": {0: "b", -1: "w"}}))
    assert [d.dim_param or d.dim_value for d in named.graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, 32, "w"]
    os.remove(tmp_path / "n.onnx")
    # a network whose traced ops fix the size (the ViT's position embedding) says so and writes nothing
    with pytest.raises(ExportError, match="does not run at height=64, width=64.*cannot be dynamic"):
        save_onnx(traced("vit_tiny"), str(tmp_path / "v.onnx"), dynamic_axes={"x": {2: "height", 3: "width"}})
    assert not os.listdir(tmp_path)


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x.reshape(int(x.shape[0]), -1))


def test_onnx_of_a_model_that_fixes_its_batch_says_so(tmp_path):
    net = amc.trace(FixedBatch().eval(), torch.randn(2, 4, 4))
    with pytest.raises(ExportError, match=r"does not run at batch 3 .*int\(x.shape\[0\]\).*fixes its batch size"):
        save_onnx(net, str(tmp_path / "f.onnx"))
    assert not os.listdir(tmp_path)


def test_onnx_mismatch_raises_and_writes_nothing(tmp_path, monkeypatch):
    net = traced("vit_tiny")
    other = net.copy()
    with torch.no_grad():
        other.network["heads_head"].bias.add_(1.0)
    real_export = onnx_io._export
    monkeypatch.setattr(onnx_io, "_export", lambda n, *a: real_export(other, *a))
    path = tmp_path / "v.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ExportError, match="differs from the network"):
        save_onnx(net, str(path))
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["v.onnx"]


# ----------------------------------------------------------------------------------------------
# Bad files: pkl.

def test_pkl_bad_files(tmp_path):
    net = traced("namedtuple_out")
    good = save_pkl(net, str(tmp_path / "good.pkl"))
    data = open(good, "rb").read()
    (tmp_path / "trunc.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"trunc\.pkl.*truncated"):
        load_pkl(str(tmp_path / "trunc.pkl"))
    (tmp_path / "junk.pkl").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(LoadError, match=r"junk\.pkl.*truncated, corrupt or not a torch file"):
        load_pkl(str(tmp_path / "junk.pkl"))
    torch.save({"state_dict": {}}, str(tmp_path / "dict.pkl"))
    with pytest.raises(LoadError, match=r"dict\.pkl.*not an amc network file.*dict"):
        load_pkl(str(tmp_path / "dict.pkl"))
    torch.save(nn.Linear(2, 2), str(tmp_path / "module.pkl"))
    with pytest.raises(LoadError, match=r"module\.pkl.*not an amc network file.*Linear"):
        load_pkl(str(tmp_path / "module.pkl"))
    torch.save({"format": pkl.FORMAT, "version": 99, "network": None}, str(tmp_path / "v99.pkl"))
    with pytest.raises(LoadError, match="version 99"):
        load_pkl(str(tmp_path / "v99.pkl"))
    with pytest.raises(LoadError, match=r"missing\.pkl.*no such file"):
        load_pkl(str(tmp_path / "missing.pkl"))
    with pytest.raises(ExportError, match="expects a ReconstructedNetwork"):
        save_pkl(nn.Linear(2, 2), str(tmp_path / "x.pkl"))


# ----------------------------------------------------------------------------------------------
# Bad files: JSON.

@pytest.fixture
def saved_json(tmp_path) -> str:
    return save_json(traced("tiny_layernorm_permute"), str(tmp_path / "net.json"))


def _edit(path: str, fn: Callable[[dict], None]) -> None:
    doc = json.load(open(path))
    fn(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


def test_json_missing_truncated_garbled(saved_json, tmp_path):
    with pytest.raises(LoadError, match=r"nope\.json.*no such file"):
        load_json(str(tmp_path / "nope.json"))
    text = open(saved_json).read()
    (tmp_path / "trunc.json").write_text(text[: len(text) // 2])
    with pytest.raises(LoadError, match=r"trunc\.json.*not valid JSON, truncated or garbled"):
        load_json(str(tmp_path / "trunc.json"))
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(LoadError, match=r"bin\.json.*garbled"):
        load_json(str(tmp_path / "bin.json"))


def test_json_foreign_or_wrong_version(saved_json, tmp_path):
    (tmp_path / "other.json").write_text('{"name": "resnet", "layers": []}')
    with pytest.raises(LoadError, match=r"other\.json.*not an amc network JSON.*format marker"):
        load_json(str(tmp_path / "other.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(LoadError, match="not an amc network JSON"):
        load_json(str(tmp_path / "list.json"))
    _edit(saved_json, lambda d: d.update(version=7))
    with pytest.raises(LoadError, match="format version 7"):
        load_json(saved_json)


def test_json_missing_or_bad_sidecar(saved_json, tmp_path):
    sidecar = tmp_path / "net.safetensors"
    data = sidecar.read_bytes()
    sidecar.unlink()
    with pytest.raises(LoadError, match=r"weights file .*net\.safetensors.* is missing"):
        load_json(saved_json)
    sidecar.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="truncated or not a safetensors file"):
        load_json(saved_json)


def test_json_sidecar_wrong_shapes(saved_json, tmp_path):
    from safetensors.torch import load_file, save_file

    sidecar = str(tmp_path / "net.safetensors")
    tensors = load_file(sidecar)
    tensors["fc.weight"] = torch.zeros(4, 8)
    save_file(tensors, sidecar)
    with pytest.raises(LoadError, match=r"tensor 'fc\.weight'.*shape \[4, 8\].*needs \[8, 8\]"):
        load_json(saved_json)
    del tensors["fc.weight"]
    save_file(tensors, sidecar)
    with pytest.raises(LoadError, match=r"lacks tensors \['fc\.weight'\]"):
        load_json(saved_json)
    tensors["fc.weight"], tensors["extra"] = torch.zeros(8, 8), torch.zeros(1)
    save_file(tensors, sidecar)
    with pytest.raises(LoadError, match=r"tensors \['extra'\] that no module uses"):
        load_json(saved_json)
    del tensors["extra"]
    save_file(tensors, sidecar)  # right names and shapes, other values
    with pytest.raises(LoadError, match="does not match the JSON"):
        load_json(saved_json)


def test_json_refuses_classes_and_callables_off_the_allowlist(saved_json):
    def set_class(cls: str) -> Callable[[dict], None]:
        return lambda d: d["nodes"][0].update({"class": cls})

    original = open(saved_json).read()
    for cls in ("builtins.eval", "os.system", "torch.nn.modules.conv.F", "collections.OrderedDict",
                "torch.nn.modules.conv.os.system"):
        open(saved_json, "w").write(original)
        _edit(saved_json, set_class(cls))
        with pytest.raises(LoadError, match="not on the JSON allowlist"):
            load_json(saved_json)

    def set_fn(fn: str) -> Callable[[dict], None]:
        def edit(d: dict) -> None:
            node = next(n for n in d["nodes"] if n["class"] == "amc.graph.ops.TensorTranspose")
            node["config"]["fn"] = fn
        return edit

    for fn, message in [("torch.load", "effects outside the graph"), ("operator.call", "registered operator"), ("operator.attrgetter", "is refused"),
                        ("torch.Tensor.__reduce_ex__", "private and dunder"), ("os.system", "unknown op callable"),
                        ("torch.nn", "not a function")]:
        open(saved_json, "w").write(original)
        _edit(saved_json, set_fn(fn))
        # refused either by the resolver (only names capture writes) or by the JSON loader's own checks
        with pytest.raises(LoadError, match=f"{message}|unknown op callable"):
            load_json(saved_json)
    open(saved_json, "w").write(original)

    def set_attr(d: dict) -> None:
        next(n for n in d["nodes"] if n["class"] == "amc.graph.ops.GetAttr")["config"]["attr"] = "__class__"

    _edit(saved_json, set_attr)
    with pytest.raises(LoadError, match="GetAttr of '__class__' is refused"):
        load_json(saved_json)


def test_json_malformed_graph(saved_json):
    original = open(saved_json).read()
    _edit(saved_json, lambda d: d["nodes"][0].pop("module"))
    with pytest.raises(LoadError, match="malformed amc JSON"):
        load_json(saved_json)
    open(saved_json, "w").write(original)
    _edit(saved_json, lambda d: d["nodes"].reverse())
    with pytest.raises(LoadError, match="inconsistent"):
        load_json(saved_json)


# ----------------------------------------------------------------------------------------------
# What JSON cannot describe: ExportError at save, naming the node and pointing at pkl.

class Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class WithAutograd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return Twice.apply(self.fc(x))


def test_json_export_errors(tmp_path):
    net = amc.trace(WithAutograd().eval(), torch.randn(2, 3))
    with pytest.raises(ExportError, match=r"node 'twice'.*custom torch.autograd.Function.*pkl"):
        save_json(net, str(tmp_path / "a.json"))
    pkl_path = save_pkl(net, str(tmp_path / "a.pkl"))  # the pickle path keeps it, for trusted files
    x = torch.randn(2, 3)
    with pytest.raises(LoadError, match="Twice.apply.*trusted=True"):
        load_pkl(pkl_path)
    assert_same(net(x), load_pkl(pkl_path, trusted=True)(x))

    fallback = traced("namedtuple_out").copy()
    key = next(n.module for n in fallback.layer_nodes if isinstance(fallback.network[n.module], ops.FunctionOp))
    fallback.network[key] = ops.FunctionOp(lambda t, *a: t.sum(-1, keepdim=True))
    fallback.network[key].fn_name = None
    with pytest.raises(ExportError, match=r"node '.*' replays .*no torch name.*pkl"):
        save_json(fallback, str(tmp_path / "f.json"))

    class Custom(nn.Module):
        def forward(self, x):
            return x + 1

    custom = ReconstructedNetwork({"c": Custom()}, [InputNode("x", 0, {})], [Node("c", "c", (Ref("x"),))], Ref("c"))
    with pytest.raises(ExportError, match=r"node 'c'.*not on the JSON allowlist.*pkl"):
        save_json(custom, str(tmp_path / "c.json"))

    odd = traced("namedtuple_out").copy()
    odd.network["lin"].scale_hint = 3  # state the constructor does not describe
    with pytest.raises(ExportError, match=r"node 'lin'.*differs from the module"):
        save_json(odd, str(tmp_path / "o.json"))
    rnn = nn.RNN(3, 4, nonlinearity="relu")
    assert json_io._module_entry("rnn", rnn)["config"]["nonlinearity"] == "relu"
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------
# Atomic writes.

def _only(tmp_path, *names: str) -> None:
    assert sorted(os.listdir(tmp_path)) == sorted(names), "a failed write left a temporary file behind"


def test_atomic_write_helper(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_write(str(path), "w") as f:
            f.write("new, half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    _only(tmp_path, "f.txt")
    with atomic.atomic_write(str(path), "w") as f:
        f.write("new")
    assert path.read_text() == "new"
    assert path.stat().st_mode & 0o777 == atomic._FILE_MODE  # as open() would have made it, not mkstemp's 0600


def test_pkl_atomic(tmp_path, monkeypatch):
    net = traced("namedtuple_out")
    path = save_pkl(net, str(tmp_path / "n.pkl"))
    before = open(path, "rb").read()

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(pkl.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_pkl(net, path)
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    _only(tmp_path, "n.pkl")
    assert isinstance(load_pkl(path, trusted=True), ReconstructedNetwork)


def test_json_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    net = traced("namedtuple_out")
    path = save_json(net, str(tmp_path / "n.json"))
    before = {p: open(tmp_path / p, "rb").read() for p in ("n.json", "n.safetensors")}

    def broken_save_file(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(ExportError, match="disk full"):
        save_json(net, path)
    monkeypatch.undo()

    def broken_dumps(doc):
        raise OSError("disk full while writing JSON")

    monkeypatch.setattr(json_io, "_dumps", broken_dumps)  # the sidecar is complete, the JSON fails
    with pytest.raises(OSError, match="disk full"):
        save_json(net.copy(), path)
    monkeypatch.undo()
    assert {p: open(tmp_path / p, "rb").read() for p in before} == before
    _only(tmp_path, "n.json", "n.safetensors")
    check_equal(net, load_json(path))


def test_torch_jit_script_names_the_ways_that_work() -> None:
    """torch.jit.script's own error ('variable number of arguments', pointing into amc's source) said
    nothing of jit.trace, torch.export or ONNX, which all take the network."""
    x = torch.randn(1, 3, 16, 16)
    net = amc.trace(torchvision.models.resnet18(num_classes=4).eval(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates TorchScript
        with pytest.raises(ExportError, match=r"torch.jit.trace\(net, \(x,\)\).*torch.export.export"):
            torch.jit.script(net)
        torch.testing.assert_close(torch.jit.trace(net, (x,))(x), net(x))
