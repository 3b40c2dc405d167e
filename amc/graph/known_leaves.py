"""Functions of popular libraries whose sizes come from tensor values, recorded whole by capture.

torchvision's detectors paste each mask into its box (`int(box[2] - box[0] + 1)`) and decode each
keypoint heatmap at its box's size (`int(widths_ceil[i].item())`), and `batched_nms` loops over the
classes present: a trace would keep one image's boxes as constants and paste the next image's masks
wrongly. Registered only once the library is
imported (the user's model imported it), so amc itself does not import it.
"""
from __future__ import annotations

import importlib
import sys
from typing import Dict, List, Tuple

import torch.nn as nn

from .ops import function_spec, module_entry, register_op

# module -> (function name, call sites: the modules that imported it by name)
KNOWN: Dict[str, Tuple[Tuple[str, Tuple[str, ...]], ...]] = {
    # one NMS per class present: the loop runs over torch.unique(labels), a count that differs per image
    "torchvision.ops.boxes": (("batched_nms", ("torchvision.ops",)),),
    "torchvision.models.detection.roi_heads": (
        ("paste_masks_in_image", ("torchvision.models.detection.transform",)),
        ("heatmaps_to_keypoints", ()),
    ),
}

#: (package, function name): a library's own "is this a graph trace?" check, answered True while amc
#: captures, so the library keeps the path that holds for every input. transformers skips an all-ones
#: attention mask in eager mode (`if padding_mask.all(): mask = None`); captured that way, a later padded
#: batch would run unmasked (the value guard then refuses it), so its masking code is told it is traced.
#: transformers' `compile_compatible_method_lru_cache` (BEiT's relative position bias, DETR's and SAM's position
#: helpers) memoizes shape helpers unless dynamo compiles: told so in that module only, it runs uncached, and a
#: second capture no longer gets the first one's traced sizes back (BEiT was refused on its second prune).
TRACING_CHECKS: Tuple[Tuple[str, str], ...] = (("transformers", "is_tracing"),
                                               ("transformers.pytorch_utils", "is_torchdynamo_compiling"))

#: Memoized shape helpers run uncached during a capture: (module, cached name, uncached name). A cache keyed
#: on shape ints (equal to traced ones) hands a later call, or a later capture, the traced ints of an
#: earlier one: einops caches its reshape recipe per input shape, so `repeat(cls, "1 1 d -> b 1 d", b=b)`
#: in a second capture read sizes of a graph that no longer exists.
UNCACHED_DURING_CAPTURE: Tuple[Tuple[str, str, str], ...] = (
    ("einops.einops", "_reconstruct_from_shape", "_reconstruct_from_shape_uncached"),)


#: Module classes whose forward branches on `self.training` (drop path, stochastic depth): kept whole, as
#: leaves replayed like nn.Dropout, so a graph follows `.train()` / `.eval()` as the model does. Traced
#: through, the graph kept the captured mode's path: captured in training, timm's DropPath still dropped
#: residual branches after `.eval()` (two eval calls differed by 0.5); captured in eval, fine-tuning ran
#: without it. Besides these, every `*DropPath` class of a loaded transformers model file.
KNOWN_MODULES: Dict[str, Tuple[str, ...]] = {
    "timm.layers.drop": ("DropPath",),
    "torchvision.ops.stochastic_depth": ("StochasticDepth",),
}
HF_MODELS, DROP_PATH = "transformers.models.", "DropPath"


def _training_dependent_modules(name: str) -> List[type]:
    """The loaded classes of KNOWN_MODULES and transformers' `*DropPath`; a loader resolving `name` imports
    its module first when `name` is one of them (a fixed list and one naming pattern: a file cannot
    choose what is imported beyond transformers' own model files)."""
    module_of_name = name.rpartition(".")[0]
    named_hf = name.startswith(HF_MODELS) and name.endswith(DROP_PATH)
    if module_of_name in KNOWN_MODULES or named_hf:
        try:
            importlib.import_module(module_of_name)
        except ImportError:
            pass
    found = []
    for module_name, attrs in KNOWN_MODULES.items():
        module = sys.modules.get(module_name)
        found += [getattr(module, a) for a in attrs if module is not None and isinstance(getattr(module, a, None), type)]
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(HF_MODELS):
            continue
        found += [obj for attr, obj in vars(module).items()
                  if attr.endswith(DROP_PATH) and isinstance(obj, type) and issubclass(obj, nn.Module)
                  and obj.__module__ == module_name]
    return found


def register_known(name: str = "") -> None:
    """Register the entries of KNOWN whose module is imported (idempotent). A loader resolving `name`
    imports the module of a KNOWN entry it names: a fixed list, so a file cannot choose what is imported."""
    for cls in _training_dependent_modules(name):
        if module_entry(cls) is None:
            register_op(cls, like=nn.Dropout, leaf=True)
    for module_name, entries in KNOWN.items():
        if any(name == f"{module_name}.{attr}" for attr, _ in entries):
            importlib.import_module(module_name)
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for attr, sites in entries:
            fn = getattr(module, attr, None)
            if fn is not None and function_spec(fn) is None:
                register_op(fn, leaf=True, call_sites=sites)
