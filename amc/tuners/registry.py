"""The one registry of tuners: a new search algorithm is one `@register_tuner("name")` class."""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Type, TypeVar

from ..errors import PruningError

T = TypeVar("T", bound=type)
TUNERS: Dict[str, type] = {}


def register_tuner(name: str) -> Callable[[T], T]:
    """Class decorator: make the tuner available as `get_tuner(name)` and `amc search --tuner name`."""
    def decorate(cls: T) -> T:
        if name in TUNERS and TUNERS[name] is not cls:
            warnings.warn(f"amc.tuners: tuner {name!r} registered twice; {cls.__name__} replaces "
                          f"{TUNERS[name].__name__}", stacklevel=2)
        TUNERS[name] = cls
        cls.name = name
        return cls
    return decorate


def get_tuner(name: str) -> Type:
    if name not in TUNERS:
        raise PruningError(f"unknown tuner {name!r}; registered tuners: {list_tuners()}")
    return TUNERS[name]


def list_tuners() -> List[str]:
    return sorted(TUNERS)
