"""A save killed part-way (SIGKILL of the writing process) leaves the previous file intact and loadable,
for `.json` + weights, `.pkl`, `.onnx` and trainer checkpoints."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn

import amc
from amc.trainers.checkpoint import FORMAT as CKPT_FORMAT
from amc.trainers.checkpoint import atomic_save, load_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")

# The child writes a ~64 MB network to the same path; the parent kills it while the temp file grows.
CHILD = textwrap.dedent("""
    import os, signal, sys, torch, torch.nn as nn, amc
    from amc.trainers.checkpoint import FORMAT, atomic_save
    fmt, path, kill_between_renames = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    torch.manual_seed(1)
    big = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(16)]).eval()
    net = amc.trace(big, torch.randn(1, 1024))
    if kill_between_renames:   # the worst moment: one file of a group renamed, the other not yet
        real_replace, done = os.replace, []
        def replace(src, dst):
            real_replace(src, dst)
            done.append(dst)
            if len(done) == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace
    print("ready", flush=True)
    if fmt == "json":
        net.save_to_json(path)
    elif fmt == "pkl":
        net.save(pkl=path)
    elif fmt == "onnx":
        net.save_to_onnx(path, torch.randn(1, 1024), check=False)
    elif fmt == "checkpoint":
        atomic_save({"format": FORMAT, "model": big.state_dict()}, path)
    print("finished", flush=True)
""")


def _small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4), nn.ReLU()).eval()
    return model, amc.trace(model, torch.randn(1, 1024))


def _save_old(fmt: str, path: str):
    model, net = _small()
    if fmt == "json":
        net.save_to_json(path)
    elif fmt == "pkl":
        net.save(pkl=path)
    elif fmt == "onnx":
        net.save_to_onnx(path, torch.randn(1, 1024))
    else:
        atomic_save({"format": CKPT_FORMAT, "model": model.state_dict()}, path)
    return model


def _load_and_check(fmt: str, path: str, model: nn.Module) -> None:
    x = torch.randn(3, 1024)
    with torch.no_grad():
        want = model(x)
        if fmt == "json":
            got = amc.ReconstructedNetwork.load_from_json(path)(x)
        elif fmt == "pkl":
            got = amc.ReconstructedNetwork.load(pkl=path)(x)
        elif fmt == "onnx":
            import onnxruntime as ort

            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        else:
            fresh = nn.Sequential(nn.Linear(1024, 4), nn.ReLU()).eval()
            fresh.load_state_dict(load_checkpoint(path)["model"])
            got = fresh(x)
    assert torch.allclose(got, want, atol=1e-5), f"{fmt}: the file at {path} is not the previous network"


def _files(folder: str):
    """Sizes of the folder's files; one renamed or removed by the writing child between the listing and
    its stat is skipped (the poll races the writer by design)."""
    out = {}
    for n in os.listdir(folder):
        try:
            out[n] = os.path.getsize(os.path.join(folder, n))
        except FileNotFoundError:
            continue
    return out


def _run_child(fmt: str, path: str, between: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, fmt, path, "1" if between else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("fmt", ["json", "pkl", "onnx", "checkpoint"])
def test_save_killed_mid_write_keeps_previous_file(tmp_path, fmt):
    path = str(tmp_path / {"json": "n.json", "pkl": "n.pkl", "onnx": "n.onnx", "checkpoint": "last.pth"}[fmt])
    model = _save_old(fmt, path)
    before = {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path)}
    child = _run_child(fmt, path, between=False)
    killed_while_writing = False
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        growing = [n for n, size in _files(str(tmp_path)).items() if n.endswith(".tmp") and size > (1 << 20)]
        if growing:
            child.send_signal(signal.SIGKILL)
            killed_while_writing = True
            break
        time.sleep(0.002)
    child.wait(timeout=60)
    out, err = child.communicate()
    assert killed_while_writing, f"the child finished before it could be killed mid-write: {out} {err[-500:]}"
    assert child.returncode == -signal.SIGKILL
    for name, data in before.items():  # the previous files are byte-for-byte what they were
        assert open(tmp_path / name, "rb").read() == data, f"{name} changed"
    _load_and_check(fmt, path, model)


def test_json_killed_between_its_two_renames_still_loads(tmp_path):
    """The weights sidecar is replaced first; the description still names the old weights, kept aside."""
    path = str(tmp_path / "n.json")
    model = _save_old("json", path)
    child = _run_child("json", path, between=True)
    child.wait(timeout=180)
    out, err = child.communicate()
    assert child.returncode == -signal.SIGKILL, err[-800:]
    assert "finished" not in out
    assert os.path.getsize(tmp_path / "n.safetensors") > (32 << 20)  # the new weights did land
    _load_and_check("json", path, model)
    # and the next complete save cleans up and loads the new network
    _, net = _small()
    net.save_to_json(path)
    assert not any(n.endswith(".prev") for n in os.listdir(tmp_path))
    _load_and_check("json", path, _small()[0])
