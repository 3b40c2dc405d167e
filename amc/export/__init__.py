"""amc.export: a ReconstructedNetwork to files and back.

- `pkl`: the whole object with torch.save (exact for every op; loading unpickles code: trusted files only).
- `json_io`: readable JSON + safetensors weights, rebuilt from allowlists without unpickling (the safe path).
- `onnx_io`: ONNX with a dynamic batch axis, checked with onnxruntime.
Every writer is atomic (`atomic`): a failed save leaves the previous file intact.
"""
from .json_io import load_json, register_json_op, save_json
from .onnx_io import save_onnx
from .pkl import load_pkl, save_pkl

__all__ = ["save_pkl", "load_pkl", "save_json", "load_json", "save_onnx", "register_json_op"]
