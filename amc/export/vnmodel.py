"""The seed's `.vnmodel` export, written as an ONNX Runtime ORT-format model.

The seed's Venus engine and its `.vnmodel` format are private, so amc cannot write them. ONNX Runtime runs
on Windows, Android and iOS and its mobile builds load the ORT format, so `save_vnmodel` writes that: the
network is exported to ONNX at the base input size (dynamic batch) by `onnx_io`, the deployment facts
(model id, base size, names, shapes, MACs, amc version) go into the ONNX `metadata_props`, and onnxruntime's
own converter (`onnxruntime.tools.convert_onnx_models_to_ort`, Fixed style, portable: no NCHWc layout)
turns it into an ORT file. Everything happens in a temporary folder beside the destination; the file
replaces `path` only after onnxruntime has loaded it back, matched the network at two batch sizes and
returned the metadata.

Load it with `load_vnmodel_session(path)` (or an `InferenceSession` with the session config entry
`session.load_model_format` = `ORT`: onnxruntime picks the format from a `.ort` suffix, not `.vnmodel`).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import numbers
import os
import pathlib
import tempfile
from typing import Any, Dict, List, Sequence, Tuple

import torch

from ..errors import ExportError
from ..graph.counting import count
from ..graph.network import ReconstructedNetwork
from ..graph.untouched import training_mode
from ..version import __version__
from .atomic import atomic_path
from .onnx_io import ATOL, RTOL, save_onnx, tensor_leaves

CHECK_BATCHES = (1, 3)
BATCH_DIM = "batch"


def _base_size(model_base_size_hw: Any) -> Tuple[int, int]:
    """`(h, w)` as two positive Python ints, or ExportError saying what was wrong."""
    what = "model_base_size_hw must be (height, width): two positive ints"
    if isinstance(model_base_size_hw, (str, bytes)) or not isinstance(model_base_size_hw, Sequence):
        raise ExportError(f"{what}, got {model_base_size_hw!r} ({type(model_base_size_hw).__name__})")
    if len(model_base_size_hw) != 2:
        raise ExportError(f"{what}, got {len(model_base_size_hw)} values: {tuple(model_base_size_hw)!r}")
    for v in model_base_size_hw:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ExportError(f"{what}, got {tuple(model_base_size_hw)!r} ({type(v).__name__} {v!r} is not an int)")
    h, w = (int(v) for v in model_base_size_hw)
    if h <= 0 or w <= 0:
        raise ExportError(f"{what}, got {(h, w)!r}: sizes must be > 0")
    return h, w


def _base_input(net: Any, hw: Tuple[int, int]) -> torch.Tensor:
    """A batch-1 float input shaped like the captured image input, at the base size."""
    inputs = net.example_inputs(batch_size=1)
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
        raise ExportError(f"save_to_vnmodel exports networks with one image input; this one takes {len(inputs)} "
                          "positional inputs (use save_to_onnx for it)")
    x = inputs[0]
    if x.dim() < 3 or not x.is_floating_point():
        raise ExportError(f"save_to_vnmodel needs an image input (N, C, H, W) to size to model_base_size_hw; the "
                          f"network's input has shape {list(x.shape)} and dtype {x.dtype} (use save_to_onnx for it)")
    x = torch.randn((*x.shape[:-2], *hw), dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    return x.to(_device(net))


def _device(net: Any) -> torch.device:
    return next((p.device for p in net.parameters()), torch.device("cpu"))


def _shape(t: torch.Tensor) -> List[Any]:
    return [BATCH_DIM, *(int(d) for d in t.shape[1:])] if t.dim() else []


def _metadata(onnx_path: str, x: torch.Tensor, outputs: List[torch.Tensor], hw: Tuple[int, int], model_id: int,
              macs: int) -> Dict[str, str]:
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    input_names = [i.name for i in graph.input if i.name not in inits]
    output_names = [o.name for o in graph.output]
    if len(input_names) != 1 or len(output_names) != len(outputs):
        raise ExportError(f"the exported ONNX model has inputs {input_names} and outputs {output_names}; the "
                          f"network has 1 input and {len(outputs)} tensor outputs")
    return {
        "model_id": str(model_id),
        "model_base_size_hw": json.dumps(list(hw)),
        "amc_version": __version__,
        "input_names": json.dumps(input_names),
        "input_shapes": json.dumps([_shape(x)]),
        "output_names": json.dumps(output_names),
        "output_shapes": json.dumps([_shape(t) for t in outputs]),
        "macs": str(int(macs)),
        "format": "onnxruntime-ort",
    }


def _add_metadata(onnx_path: str, meta: Dict[str, str]) -> None:
    import onnx

    model = onnx.load(onnx_path)
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, onnx_path)


def _convert(onnx_path: str, out_dir: str) -> str:
    """onnxruntime's converter, ONNX -> ORT (Fixed style: optimised once for the CPU provider)."""
    root = logging.getLogger()
    guard = logging.NullHandler()  # the converter's import calls logging.basicConfig: keep the app's logging
    root.addHandler(guard)
    try:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
    finally:
        root.removeHandler(guard)
    log = io.StringIO()
    chatty = logging.getLogger("ort_format_model.utils")  # logs "Created config ..." at INFO
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(log):
            convert_onnx_models_to_ort(pathlib.Path(onnx_path), output_dir=pathlib.Path(out_dir),
                                       optimization_styles=[OptimizationStyle.Fixed])
    except Exception as exc:  # noqa: BLE001 - the converter raises whatever onnxruntime raised
        raise ExportError(f"onnxruntime could not convert the ONNX model to ORT format: {type(exc).__name__}: "
                          f"{str(exc)[:500]}\n{log.getvalue()[-1000:]}") from exc
    finally:
        chatty.setLevel(level)
    found = sorted(p for p in os.listdir(out_dir) if p.endswith(".ort"))
    if len(found) != 1:
        raise ExportError(f"onnxruntime's converter wrote {found or 'no .ort file'} to {out_dir!r}, expected one "
                          f".ort file\n{log.getvalue()[-1000:]}")
    return os.path.join(out_dir, found[0])


def load_vnmodel_session(path: str, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """An onnxruntime InferenceSession for a `.vnmodel` (ORT format whatever the file's suffix)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.load_model_format", "ORT")
    return ort.InferenceSession(os.fspath(path), options, providers=list(providers))


def _verify(path: str, net: Any, x: torch.Tensor, meta: Dict[str, str]) -> None:
    """Load the ORT file back: metadata intact, outputs equal to the network's at CHECK_BATCHES."""
    import numpy as np

    try:
        session = load_vnmodel_session(path)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnxruntime cannot load the converted ORT file: {type(exc).__name__}: {exc}") from exc
    got_meta = dict(session.get_modelmeta().custom_metadata_map)
    lost = {k: v for k, v in meta.items() if got_meta.get(k) != v}
    if lost:
        raise ExportError(f"the ORT file lost metadata {sorted(lost)}: wrote {lost}, read back "
                          f"{ {k: got_meta.get(k) for k in lost} }")
    name = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(1)
    for batch in CHECK_BATCHES:
        xb = torch.randn((batch, *x.shape[1:]), dtype=x.dtype, generator=gen)
        with torch.no_grad():
            expected = tensor_leaves(net(xb.to(x.device)))
        got = session.run(None, {name: xb.numpy()})
        if len(got) != len(expected):
            raise ExportError(f"the ORT model returned {len(got)} outputs at batch {batch}, the network {len(expected)}")
        for i, (ref, out) in enumerate(zip(expected, got)):
            ref_np = ref.detach().cpu().numpy()
            if ref_np.shape != out.shape:
                raise ExportError(f"ORT output {i} has shape {list(out.shape)} at batch {batch}, the network gives "
                                  f"{list(ref_np.shape)}")
            if not np.allclose(out, ref_np, rtol=RTOL, atol=ATOL, equal_nan=True):
                diff = float(np.max(np.abs(out.astype(np.float64) - ref_np.astype(np.float64))))
                raise ExportError(f"ORT output {i} differs from the network at batch {batch} (max abs diff "
                                  f"{diff:.3g}, rtol {RTOL}, atol {ATOL})")


def save_vnmodel(net: ReconstructedNetwork, path: str, model_base_size_hw: Tuple[int, int],
                 model_id: int = 0, opset: int = 17) -> str:
    """Write `net` to `path` as an ONNX Runtime ORT model at input size `model_base_size_hw` (dynamic batch).

    The metadata (`get_modelmeta().custom_metadata_map`) holds model_id, model_base_size_hw, amc_version,
    input/output names and shapes (batch as "batch") and the MACs of one image at the base size.
    Raises ExportError for a bad size or id, a network that cannot run at that size, or a file that
    does not load back in onnxruntime with the network's outputs.
    """
    if not isinstance(net, ReconstructedNetwork):
        raise ExportError(f"save_vnmodel expects a ReconstructedNetwork, got {type(net).__name__}")
    hw = _base_size(model_base_size_hw)
    if isinstance(model_id, bool) or not isinstance(model_id, numbers.Integral):
        raise ExportError(f"model_id must be an int, got {model_id!r} ({type(model_id).__name__})")
    x = _base_input(net, hw)
    path = os.fspath(path)
    with training_mode(net, False):
        try:
            with torch.no_grad():
                outputs = tensor_leaves(net(x))
        except Exception as exc:  # noqa: BLE001 - any failure here means the size does not fit the network
            raise ExportError(f"the network cannot run at model_base_size_hw={hw} (input {list(x.shape)}): "
                              f"{type(exc).__name__}: {str(exc)[:300]}; pass the size it was built for") from exc
        macs, _ = count(net, x)
        with atomic_path(path) as tmp:
            with tempfile.TemporaryDirectory(prefix=".vnmodel.", dir=os.path.dirname(tmp)) as work:
                onnx_path = os.path.join(work, "model.onnx")
                save_onnx(net, onnx_path, x, opset=opset, check=True)
                meta = _metadata(onnx_path, x, outputs, hw, int(model_id), macs)
                _add_metadata(onnx_path, meta)
                ort_path = _convert(onnx_path, os.path.join(work, "ort"))
                os.replace(ort_path, tmp)
            _verify(tmp, net, x, meta)
    return path
