"""Node records: small, plain data. The op modules live in the network's ModuleDict."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple


@dataclass
class InputNode:
    """One argument of the network's forward. `index` is its position, or None for keyword-only."""

    name: str
    index: Any
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Node:
    """One call in the captured forward: `ops[module](*args, **kwargs)`, args being templates."""

    name: str
    module: str
    args: Tuple[Any, ...] = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def op(self) -> str:
        """Display name of the op (registry name, or the module class name)."""
        return self.meta.get("op", "?")
