"""The seed's `save_to_vnmodel`: an ONNX Runtime ORT file that loads back and matches the network.

Every file written here is read back by onnxruntime itself (not by amc) and compared with the
compressed network at batch 1 and 3; the metadata is read through `get_modelmeta()`.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torchvision

import amc
from amc import cli
from amc.errors import ExportError
from amc.export import vnmodel
from amc.export.pkl import load_pkl
from amc.models import create

ATOL = 1e-4


def _session_from_bytes(path) -> ort.InferenceSession:
    """How a user without amc loads it: ORT bytes are recognised by their 'ORTM' identifier."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[4:8] == b"ORTM", "not an ORT-format flatbuffer"
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _assert_matches(session: ort.InferenceSession, net: nn.Module, chw, batches=(1, 3)) -> None:
    name = session.get_inputs()[0].name
    for b in batches:
        x = torch.randn(b, *chw)
        with torch.no_grad():
            ref = net(x).numpy()
        (got,) = session.run(None, {name: x.numpy()})
        assert got.shape == ref.shape, (b, got.shape, ref.shape)
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL, err_msg=f"batch {b}")


def _digits_pruned():
    model = create("digits_resnet").eval()
    x = torch.randn(1, 1, 8, 8)
    small = amc.prune(model, ratio=0.5, criterion="l2", example_inputs=(x,))
    assert amc.count(small, x)[0] < amc.count(model, x)[0]
    return small.eval()


@pytest.fixture(scope="module")
def digits_net():
    return _digits_pruned()


def test_digits_network_round_trips_with_metadata(tmp_path, digits_net, one_thread):
    path = tmp_path / "digits.vnmodel"
    assert digits_net.save_to_vnmodel(pkl=str(path), model_base_size_hw=(8, 8), model_id=3) == str(path)
    assert os.listdir(tmp_path) == ["digits.vnmodel"], "temporary files left behind"
    session = _session_from_bytes(path)
    _assert_matches(session, digits_net, (1, 8, 8))
    _assert_matches(vnmodel.load_vnmodel_session(str(path)), digits_net, (1, 8, 8), batches=(2,))

    meta = session.get_modelmeta().custom_metadata_map
    assert meta["model_id"] == "3"
    assert json.loads(meta["model_base_size_hw"]) == [8, 8]
    assert meta["amc_version"] == amc.__version__
    assert int(meta["macs"]) == amc.count(digits_net, torch.randn(1, 1, 8, 8))[0]
    assert json.loads(meta["input_names"]) == [i.name for i in session.get_inputs()]
    assert json.loads(meta["output_names"]) == [o.name for o in session.get_outputs()]
    assert json.loads(meta["input_shapes"]) == [["batch", 1, 8, 8]]
    assert json.loads(meta["output_shapes"]) == [["batch", 10]]
    assert session.get_inputs()[0].shape[1:] == [1, 8, 8]  # the base size is fixed, the batch is free
    assert not isinstance(session.get_inputs()[0].shape[0], int)


def test_pruned_mobilenet_v3_small_round_trips(tmp_path, one_thread):
    model = torchvision.models.mobilenet_v3_small().eval()
    x = torch.randn(1, 3, 64, 64)
    small = amc.prune(model, ratio=0.3, criterion="l2", example_inputs=(x,)).eval()
    path = tmp_path / "mnv3.vnmodel"
    small.save_to_vnmodel(pkl=str(path), model_base_size_hw=(64, 64), model_id=0)
    session = _session_from_bytes(path)
    _assert_matches(session, small, (3, 64, 64))
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["model_id"] == "0" and json.loads(meta["model_base_size_hw"]) == [64, 64]
    assert int(meta["macs"]) == amc.count(small, x)[0] < amc.count(model, x)[0]


def test_base_size_other_than_the_traced_one(tmp_path, one_thread):
    """The base size need not be the traced size: mobilenet traced at 64x64 exported at 48x80."""
    model = torchvision.models.mobilenet_v3_small(num_classes=7).eval()
    net = amc.trace(model, torch.randn(1, 3, 64, 64))
    path = tmp_path / "m.vnmodel"
    net.save_to_vnmodel(pkl=str(path), model_base_size_hw=(48, 80))
    session = _session_from_bytes(path)
    assert session.get_inputs()[0].shape[1:] == [3, 48, 80]
    _assert_matches(session, model, (3, 48, 80))
    assert json.loads(session.get_modelmeta().custom_metadata_map["input_shapes"]) == [["batch", 3, 48, 80]]


@pytest.mark.parametrize("size", [(8,), (8, 8, 8), (), (0, 8), (8, -2), (8.0, 8), ("8", 8), (True, 8), "88", 8,
                                  None, (np.float32(8), 8)])
def test_bad_base_size_raises_export_error(tmp_path, digits_net, size):
    path = tmp_path / "bad.vnmodel"
    with pytest.raises(ExportError, match="model_base_size_hw"):
        digits_net.save_to_vnmodel(pkl=str(path), model_base_size_hw=size)
    assert not path.exists()


def test_numpy_ints_are_accepted_as_sizes():
    assert vnmodel._base_size((np.int64(8), np.int32(6))) == (8, 6)
    assert vnmodel._base_size(torch.Size([5, 7])) == (5, 7)


def test_size_the_network_cannot_take(tmp_path):
    """A Flatten into a Linear built for 8x8 cannot run at 16x16: a clear error, no file."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    net = amc.trace(model.eval(), torch.randn(2, 1, 8, 8))
    path = tmp_path / "f.vnmodel"
    with pytest.raises(ExportError, match=r"cannot run at model_base_size_hw=\(16, 16\)"):
        net.save_to_vnmodel(pkl=str(path), model_base_size_hw=(16, 16))
    assert not path.exists()


def test_non_image_network_and_bad_model_id(tmp_path, digits_net):
    net = amc.trace(nn.Sequential(nn.Linear(10, 4)).eval(), torch.randn(2, 10))
    with pytest.raises(ExportError, match="image input"):
        net.save_to_vnmodel(pkl=str(tmp_path / "l.vnmodel"), model_base_size_hw=(8, 8))
    with pytest.raises(ExportError, match="model_id"):
        digits_net.save_to_vnmodel(pkl=str(tmp_path / "d.vnmodel"), model_base_size_hw=(8, 8), model_id="a")
    assert os.listdir(tmp_path) == []


def test_failed_check_keeps_the_previous_file(tmp_path, digits_net, monkeypatch, one_thread):
    path = tmp_path / "d.vnmodel"
    path.write_bytes(b"previous")

    def refuse(*args, **kwargs):
        raise ExportError("ORT output 0 differs from the network (injected)")

    monkeypatch.setattr(vnmodel, "_verify", refuse)
    with pytest.raises(ExportError, match="injected"):
        digits_net.save_to_vnmodel(pkl=str(path), model_base_size_hw=(8, 8))
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["d.vnmodel"], "temporary files left behind"


def test_cli_compress_export_vnmodel(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["compress", "--method", "l1", "--epochs", "1", "--finetune-epochs", "0", "--out", str(out),
                   "--no-progress", "--export", "vnmodel"])
    assert rc == 0
    path = out / "compressed.vnmodel"
    assert path.is_file()
    for name in ("compressed.json", "compressed.pkl", "compressed.onnx"):
        assert (out / name).is_file(), name  # beside the other formats, not instead of them
    assert str(path) in json.loads((out / "summary.json").read_text())["files"]
    session = _session_from_bytes(path)
    assert json.loads(session.get_modelmeta().custom_metadata_map["model_base_size_hw"]) == [8, 8]
    _assert_matches(session, load_pkl(str(out / "compressed.pkl")).eval(), (1, 8, 8))
