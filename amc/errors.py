"""The one exception hierarchy of amc: every user-facing failure is one of these.

Messages name the node or module involved, what was expected, and what to do about it.
"""


class AmcError(Exception):
    """Base class of every error amc raises on purpose."""


class ArgumentError(AmcError, TypeError):
    """A compressor or tuner given a keyword argument it does not take (a TypeError, as Python's own would be)."""


class CaptureError(AmcError, RuntimeError):
    """Tracing a model failed: bad model, bad example inputs, or nothing to capture."""


class UnsupportedOpError(AmcError, NotImplementedError):
    """An op cannot be handled by the requested feature (serialisation, pruning, counting)."""


class PruningError(AmcError, ValueError):
    """A pruning or compression request is invalid or cannot be honoured."""


class ExportError(AmcError, RuntimeError):
    """Saving a network failed."""


class LoadError(AmcError, ValueError):
    """A saved file is missing, truncated, foreign or inconsistent."""


class TrainingError(AmcError, RuntimeError):
    """A trainer hook returned something unusable, or training diverged."""


class DataError(AmcError, ValueError):
    """A dataset is missing, empty or malformed."""


class GraphError(AmcError, RuntimeError):
    """A ReconstructedNetwork is internally inconsistent (found by `lint()`)."""


class TuningError(AmcError, RuntimeError):
    """A ratio search could not produce a result (e.g. every candidate failed to evaluate)."""


class QuantizationError(AmcError, ValueError):
    """Bad quantisation settings or calibration data (bits, observer, block size, an empty loader)."""
