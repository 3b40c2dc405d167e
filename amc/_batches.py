"""How amc reads one loader batch, shared by the compressors and the trainers: `(inputs, targets, ...)`
tuples, a plain tensor, or a dict of named inputs as a tokenizer or a Hugging Face collator yields it, with
its targets under one of `TARGET_KEYS`."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

#: keys of a dict batch that hold targets, not model inputs (Hugging Face's `labels`, torchvision-style `target`)
TARGET_KEYS = frozenset({"labels", "label", "target", "targets", "y"})


def dict_inputs(batch: Mapping[str, Any]) -> Dict[str, Any]:
    """The named model inputs of a dict batch: everything but its targets."""
    return {k: v for k, v in batch.items() if k not in TARGET_KEYS}


def dict_targets(batch: Mapping[str, Any]) -> Optional[Any]:
    """The targets of a dict batch (the first of `TARGET_KEYS` it has), or None."""
    return next((batch[k] for k in sorted(TARGET_KEYS) if k in batch), None)


def logits_of(preds: Any) -> Any:
    """A model output's logits: the tensor itself, or the `logits` entry of a Hugging Face `ModelOutput`."""
    if isinstance(preds, Mapping) and "logits" in preds:
        return preds["logits"]
    return preds
