"""A `.pkl` or checkpoint that names code is refused before anything in it runs; amc's own files load.

Every payload would create a marker file if it ran; each test checks the marker never appears.
"""
from __future__ import annotations

import os
import pickle
import subprocess

import pytest
import torch
import torch.nn as nn
import torchvision

import amc
from amc.errors import LoadError
from amc.export.pkl import FORMAT, VERSION
from amc.graph.ops import FunctionOp, GetAttr
from amc.trainers.checkpoint import FORMAT as CKPT_FORMAT
from amc.trainers.checkpoint import atomic_save, load_checkpoint
from test_export import WithAutograd


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _Popen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


PAYLOADS = {"os.system": _System, "builtins.eval": _Eval, "subprocess.Popen": _Popen}


def _small_net():
    return amc.trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval(), torch.randn(1, 3, 8, 8))


def _write(kind: str, payload, path, net=None):
    if kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    elif kind == "torch.save":
        torch.save(payload, path)
    elif kind == "nested":  # an otherwise valid amc file with the payload inside the header
        torch.save({"format": FORMAT, "version": VERSION, "network": net, "extra": [payload]}, path)
    elif kind == "in_module":  # the payload as an attribute of one of the network's modules
        net.network[next(iter(net.network.keys()))].evil = payload
        torch.save({"format": FORMAT, "version": VERSION, "network": net}, path)


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("kind", ["pickle", "torch.save", "nested", "in_module"])
def test_crafted_pkl_refused_without_side_effect(tmp_path, payload, kind):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pkl"
    _write(kind, PAYLOADS[payload](marker), path, net=_small_net())
    with pytest.raises(LoadError) as info:
        amc.ReconstructedNetwork.load(pkl=str(path))
    assert not marker.exists(), "the payload ran during load"
    assert "trusted=True" in str(info.value) or "refus" in str(info.value)


def test_refusal_names_the_global(tmp_path):
    path = tmp_path / "evil.pkl"
    torch.save(_System(tmp_path / "PWNED"), path)
    with pytest.raises(LoadError, match=r"posix\.system|os\.system"):
        amc.ReconstructedNetwork.load(pkl=str(path))


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_crafted_checkpoint_refused(tmp_path, payload):
    marker = tmp_path / "PWNED"
    path = tmp_path / "last.pth"
    torch.save({"format": CKPT_FORMAT, "epoch": 1, "hook": PAYLOADS[payload](marker)}, path)
    with pytest.raises(LoadError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_own_checkpoint_with_rng_state_loads(tmp_path):
    from amc.trainers.checkpoint import capture_rng_state, restore_rng_state

    state = {"format": CKPT_FORMAT, "rng": capture_rng_state(), "model": nn.Linear(2, 2).state_dict()}
    atomic_save(state, tmp_path / "last.pth")
    back = load_checkpoint(tmp_path / "last.pth")
    before = torch.get_rng_state()
    restore_rng_state(back["rng"])
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])
    torch.set_rng_state(before)


def test_op_callable_named_by_file_is_not_imported(tmp_path):
    """A FunctionOp stores its callable by name; a name outside torch must not be imported on load."""
    net = _small_net()
    op = FunctionOp(torch.relu)
    op.fn_name, op.fn = "os.system", None
    net.network["evil_op"] = op
    path = tmp_path / "evil.pkl"
    torch.save({"format": FORMAT, "version": VERSION, "network": net}, path)
    with pytest.raises(LoadError, match="os.system"):
        amc.ReconstructedNetwork.load(pkl=str(path))


@pytest.mark.parametrize("make", [
    lambda: FunctionOp(torch.save),                       # a known torch name with effects outside the graph
    lambda: GetAttr("__class__"),                         # attribute walks towards globals
])
def test_allowlisted_classes_carrying_effects_refused(tmp_path, make):
    net = _small_net()
    net.network["evil_op"] = make()
    path = tmp_path / "evil.pkl"
    torch.save({"format": FORMAT, "version": VERSION, "network": net}, path)
    with pytest.raises(LoadError, match="refusing"):
        amc.ReconstructedNetwork.load(pkl=str(path))


def test_hooks_refused_and_trusted_loads_them(tmp_path):
    net = _small_net()
    next(iter(net.network.values())).register_forward_hook(torch.nn.modules.module._global_forward_hooks.get)
    path = tmp_path / "hooked.pkl"
    torch.save({"format": FORMAT, "version": VERSION, "network": net}, path)
    with pytest.raises(LoadError):
        amc.ReconstructedNetwork.load(pkl=str(path))


def test_trusted_loads_custom_classes(tmp_path):
    class_file = tmp_path / "custom.pkl"
    net = amc.trace(WithAutograd().eval(), torch.randn(2, 3))  # a custom autograd Function
    net.save(pkl=str(class_file))
    with pytest.raises(LoadError, match="trusted=True"):
        amc.ReconstructedNetwork.load(pkl=str(class_file))
    back = amc.ReconstructedNetwork.load(pkl=str(class_file), trusted=True)
    x = torch.randn(3, 3)
    assert torch.equal(back(x), net(x))


ZOO = ["resnet18", "mobilenet_v3_small", "densenet121", "vit_b_16", "convnext_tiny", "shufflenet_v2_x0_5",
       "efficientnet_b0", "regnet_x_400mf", "googlenet", "swin_t"]


@pytest.mark.parametrize("name", ZOO)
def test_own_pkl_of_zoo_loads_safely_and_runs_equal(tmp_path, name, one_thread):
    size = 224 if name in ("vit_b_16", "swin_t") else 64
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(2, 3, size, size)
    net = amc.trace(model, x)
    path = net.save(pkl=str(tmp_path / f"{name}.pkl"))
    back = amc.ReconstructedNetwork.load(pkl=path)
    with torch.no_grad():
        assert torch.equal(back(x), net(x))


def test_search_checkpoint_with_payload_refused(tmp_path):
    from amc.tuners import RandomSearch

    marker = tmp_path / "PWNED"
    path = tmp_path / "search.ckpt"
    torch.save({"version": 1, "state": _System(marker)}, path)
    with pytest.raises(LoadError, match="cannot read the search checkpoint"):
        RandomSearch()._load(str(path), None)
    assert not marker.exists()


def test_ga_state_blob_needs_this_users_signature(tmp_path):
    """pymoo's GA state can only be stored as a pickle: it is read only when this user's key signed it."""
    from amc.tuners import GA

    marker = tmp_path / "PWNED"
    blob = pickle.dumps(_System(marker))
    state = {"algorithm": torch.frombuffer(bytearray(blob), dtype=torch.uint8), "signature": "0" * 64}
    with pytest.raises(LoadError, match="not written by this user"):
        GA().load_state_dict(state)
    assert not marker.exists()
