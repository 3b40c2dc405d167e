"""How amc reads one loader batch, shared by the compressors and the trainers: `(inputs, targets, ...)`
tuples, a plain tensor, or a dict of named inputs as a tokenizer or a Hugging Face collator yields it, with
its targets under one of `TARGET_KEYS`."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .errors import DataError

#: keys of a dict batch that hold targets, not model inputs (Hugging Face's `labels`, torchvision-style `target`)
TARGET_KEYS = frozenset({"labels", "label", "target", "targets", "y"})


def dict_inputs(batch: Mapping[str, Any]) -> Dict[str, Any]:
    """The named model inputs of a dict batch: everything but its targets."""
    return {k: v for k, v in batch.items() if k not in TARGET_KEYS}


def dict_targets(batch: Mapping[str, Any]) -> Optional[Any]:
    """The targets of a dict batch (the first of `TARGET_KEYS` it has), or None."""
    return next((batch[k] for k in sorted(TARGET_KEYS) if k in batch), None)


def targets_of(batch: Any) -> Optional[Any]:
    """The targets of a batch: `batch[1]` of a tuple, a dict batch's (under one of `TARGET_KEYS`), or None."""
    if isinstance(batch, Mapping):
        return dict_targets(batch)
    return batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None


def labels_of(batch: Any, who: str) -> torch.Tensor:
    """The targets of a labelled batch (`targets_of`), or a DataError naming `who` needs them and where."""
    targets = targets_of(batch)
    if not isinstance(targets, torch.Tensor):
        keys = f" (its keys: {sorted(map(str, batch))})" if isinstance(batch, Mapping) else ""
        raise DataError(f"{who} trains on labelled batches: (inputs, labels, ...) tuples or dicts with labels under "
                        f"one of {sorted(TARGET_KEYS)}; got a {type(batch).__name__}{keys}")
    return targets


def logits_of(preds: Any) -> Any:
    """A model output's logits: the tensor itself, or the `logits` entry of a Hugging Face `ModelOutput`."""
    if isinstance(preds, Mapping) and "logits" in preds:
        return preds["logits"]
    return preds


def class_rows(output: Any, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(logits, targets)` to score a model's output against its targets: as they are, except a Hugging Face
    output's `[B, L, V]` logits against `[B, L]` labels: one row per token, shifted by one for a causal LM (its
    output class says so; transformers computes its own loss the same way), labels -100 left out. A plain
    `[B, C, L]` tensor keeps torch's class-on-dim-1 reading."""
    logits = logits_of(output)
    if per_token(output) and targets.dim() == 2:
        if "CausalLM" in type(output).__name__:
            logits, targets = logits[:, :-1], targets[:, 1:]
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        keep = targets != -100
        return logits[keep], targets[keep]
    return logits, targets


def per_token(output: Any) -> bool:
    """A Hugging Face output with `[B, L, V]` logits (classes last, one row per token), not `[B, C, ...]`."""
    return isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor) \
        and output["logits"].dim() == 3


def logit_rows(output: Any) -> Any:
    """The logits with classes on dim 1 as losses such as KD read them: a per-token output's `[B * L, V]`."""
    logits = logits_of(output)
    return logits.reshape(-1, logits.shape[-1]) if per_token(output) else logits


def split_batch(batch: Any) -> Tuple[Any, Any]:
    """`(inputs, targets)` of a labelled batch: `batch[0], batch[1]`, or a dict's named inputs and labels."""
    if isinstance(batch, Mapping):
        targets = dict_targets(batch)
        if targets is None:
            raise ValueError(f"a dict batch with keys {sorted(map(str, batch))} has no targets under one of "
                             f"{sorted(TARGET_KEYS)}")
        return dict_inputs(batch), targets
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"expected a labelled batch, (inputs, targets, ...) or a dict with labels; got "
                     f"{type(batch).__name__}")


def to_device(data: Any, device: Any) -> Any:
    """Tensors moved to `device`, also inside lists, tuples and dicts."""
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, (list, tuple)):
        return type(data)(to_device(d, device) for d in data)
    if isinstance(data, Mapping):
        return {k: to_device(v, device) for k, v in data.items()}
    return data


def call_with(network: Any, inputs: Any) -> Any:
    """`network(**inputs)` for named inputs, else `network(inputs)`."""
    return network(**inputs) if isinstance(inputs, Mapping) else network(inputs)
