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
from typing import Dict, Tuple

from .ops import function_spec, register_op

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
TRACING_CHECKS: Tuple[Tuple[str, str], ...] = (("transformers", "is_tracing"),)

#: Memoized shape helpers run uncached during a capture: (module, cached name, uncached name). A cache keyed
#: on shape ints (equal to traced ones) hands a later call, or a later capture, the traced ints of an
#: earlier one: einops caches its reshape recipe per input shape, so `repeat(cls, "1 1 d -> b 1 d", b=b)`
#: in a second capture read sizes of a graph that no longer exists.
UNCACHED_DURING_CAPTURE: Tuple[Tuple[str, str, str], ...] = (
    ("einops.einops", "_reconstruct_from_shape", "_reconstruct_from_shape_uncached"),)


def register_known(name: str = "") -> None:
    """Register the entries of KNOWN whose module is imported (idempotent). A loader resolving `name`
    imports the module of a KNOWN entry it names: a fixed list, so a file cannot choose what is imported."""
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
