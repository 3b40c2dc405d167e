"""`warn_user(message)`: a warning attributed to the first caller outside amc.

A fixed `stacklevel` counts amc's own frames, and a decorator (`outside_inference_mode`) or a context
manager between the call and the warning moves it into amc; walking the stack to the user's frame does not.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from typing import Type

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_PLUMBING = {os.path.abspath(contextlib.__file__), os.path.abspath(functools.__file__)}


def warn_user(message: str, category: Type[Warning] = UserWarning) -> None:
    """`warnings.warn` at the first frame that is neither amc's nor contextlib/functools plumbing."""
    frame, level = sys._getframe(1), 2  # stacklevel 1 is this function, 2 its caller
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not (name.startswith(_PACKAGE) or name in _PLUMBING):
            break
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
