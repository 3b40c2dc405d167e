"""amc.export: a ReconstructedNetwork to files and back.

- `pkl`: the whole object with torch.save (exact for every op; loads allowlisted classes only unless trusted).
- `json_io`: readable JSON + safetensors weights, rebuilt from allowlists without unpickling (the safe path).
- `onnx_io`: ONNX with a dynamic batch axis, checked with onnxruntime.
- `eager`: the pruned layers written back into a copy of the user's own module (`to_module`), and
  `hf`: that copy as a `transformers` checkpoint (`save_pretrained` / `from_pretrained`).
- `vnmodel`: the seed's `.vnmodel`, written as an ONNX Runtime ORT file.
- `to_fx`: the graph as a torch.fx.GraphModule (torch.ao's FX quantisation, FX passes).
Every writer is atomic (`atomic`): a failed save leaves the previous file intact.

Importing this package registers the formats behind ReconstructedNetwork's `save`/`load`/`save_to_*`
methods (`amc.graph.formats`): export knows the graph, the graph never imports export.
"""
from ..graph.formats import register_format
from ..graph.fx_graph import to_fx
from .attribute_rules import register_attribute_rule
from .eager import to_module
from .hf import from_pretrained, save_pretrained
from .json_io import load_json, register_json_op, save_json
from .onnx_io import save_onnx
from .pkl import load_pkl, save_pkl
from .vnmodel import save_vnmodel

register_format("pkl", save=save_pkl, load=load_pkl)
register_format("json", save=save_json, load=load_json)
register_format("onnx", save=save_onnx)
register_format("vnmodel", save=save_vnmodel)

__all__ = ["save_pkl", "load_pkl", "save_json", "load_json", "save_onnx", "save_vnmodel", "register_json_op",
           "to_module", "to_fx", "register_attribute_rule", "save_pretrained", "from_pretrained"]
