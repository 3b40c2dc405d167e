"""BaseCompressor: what every seed-style compressor (`ChannelPruning`, `LowRankDecomposition`, ...) shares.

The constructor takes the seed's keyword arguments (Code-2 of the seed document), validates them and
traces `origin_net`; `compress()` runs the subclass's `_compress(ratio)` on a copy, honours
`accuracy_first` / `accuracy_threshold` by backing off the ratio, stores the result in
`self.compressed_net`, writes it to `checkpointfolder` and returns it.

Budgets (one vocabulary, seed 003 section 4): `compress_ratio` is the fraction of each conv/linear
layer's computation (MACs) removed, a float or `{layer_name: fraction}`; `target_macs`, where a
compressor takes it, is the fraction of the whole network's MACs kept and overrides `compress_ratio`.

Reproducible: calibration images come from `calibration_batches()`, drawn with the compressor's own
`seed` (`amc.compressors.calibration`), and `compress()` runs under `seeded_rng(seed)`, so the same
arguments give bit-identical networks whatever the caller's global RNG state, which is left as it was.

A subclass implements one method::

    class MyCompressor(BaseCompressor):
        name = "my_compressor"                       # file prefix in checkpointfolder

        def _compress(self, ratio):                  # ratio: float or {layer_name: float}
            net = self.origin_graph.copy()           # never edit origin_graph / origin_net
            ...
            return net                               # a ReconstructedNetwork

and may override `backoff(ratio, attempt)` (how the ratio shrinks when accuracy is too low) or
`validate_layer_names(names)` (which dict keys are accepted).
"""
from __future__ import annotations

import difflib
import inspect
import logging
import math
import numbers
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .._modes import outside_inference_mode
from ..errors import ArgumentError, DataError, PruningError
from .._copying import copy_module
from ..graph.capture import as_network, example_tuple
from ..graph.edit import addmm_as_linear
from ..graph.network import ReconstructedNetwork
from ..graph.untouched import untouched
from .sampling import batch_inputs, example_from_batch
from .calibration import DEFAULT_SEED, calibration_batches, check_loader, first_batch, loader_len, seeded_rng

Ratio = Union[float, Dict[str, float]]
logger = logging.getLogger("amc.compressors")

__all__ = ["BaseCompressor", "Ratio", "batch_inputs", "check_target_macs"]


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


#: names users bring from other tools, for the "did you mean" of `unknown_arguments` (spelling alone misleads:
#: difflib offers mutation_eta for population)
SYNONYMS = {"population": ("pop_size",), "population_size": ("pop_size",), "evaluations": ("samples", "episodes"),
            "bits": ("weight_bits", "act_bits"), "ratio": ("compress_ratio",), "model": ("origin_net",),
            "net": ("origin_net",), "train_loader": ("trainloader",), "val_loader": ("valloader",)}


def unknown_arguments(cls: type, unknown: Mapping[str, Any]) -> ArgumentError:
    """The error for keywords `cls` does not take, naming `cls` (not the base class that saw them) and,
    for each, the nearest argument it does take."""
    taken = sorted({name for klass in cls.__mro__ if "__init__" in vars(klass)
                    for name, p in inspect.signature(vars(klass)["__init__"]).parameters.items()
                    if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)})
    near = {k: [t for t in SYNONYMS.get(k, ()) if t in taken] or difflib.get_close_matches(k, taken, 2, 0.5)
            for k in unknown}
    hints = [f"{k!r} (did you mean {' or '.join(map(repr, near[k]))}?)" if near[k] else repr(k) for k in unknown]
    return ArgumentError(f"{cls.__name__} takes no argument {', '.join(hints)}; it takes: {', '.join(taken)}")


class BaseCompressor:
    """Shared constructor, validation and `compress()` contract of the seed-style compressors.

    Arguments (the seed's names):
      origin_net: an nn.Module (traced, in eval mode, on one batch of `trainloader` or on
        `example_inputs`) or a ReconstructedNetwork. It is never modified.
      trainloader / valloader: DataLoaders of `(inputs, labels)`; train data calibrates, val data evaluates.
      trainset_ratio: fraction in (0, 1] of the training images used for calibration (a random subset
        drawn with `seed`; for a loader without a map-style dataset, its first batches).
      sampled_pixels_per_img: output positions sampled per image and layer (data-driven compressors);
        None (default): sized per layer from its dimensions (`calibration.positions_per_image`).
      compress_ratio: fraction in [0, 1) of each conv/linear layer's MACs removed, or
        `{layer_name: fraction}` with layer (node) names of the graph.
      checkpointfolder: where `compress()` writes `<name>.json`, `<name>.pkl` (and a drawing); None: nowhere.
      device: where calibration runs ("cpu", "cuda", torch.device).
      verbose: INFO logging and tqdm progress bars.
      drawgraph: also draw the compressed graph into `checkpointfolder`.
      accuracy_first, accuracy_threshold: never return a network whose val accuracy is below the
        threshold (a fraction, e.g. 0.9; values in (1, 100] are read as percent); the ratio backs off.
      args: the seed's argparse namespace, kept as `self.args` (not read).
      example_inputs: optional tuple of inputs used to trace a plain nn.Module.
      seed: seeds every random draw of the compressor (calibration subset, sampled positions, loader
        shuffling while it reads); the caller's global RNG is never consumed.
    """

    name = "compressor"
    #: what bad arguments and inputs raise (a compressor of its own kind names its own error)
    error: type = PruningError
    #: compressors that work on nn.Linear layers see `addmm(bias, x, W)` on parameters (GPT-2's Conv1D) as one
    linear_addmm: bool = False
    max_backoff_attempts = 8

    @outside_inference_mode
    def __init__(self, origin_net: nn.Module, trainloader: Iterable, valloader: Optional[Iterable] = None,
                 trainset_ratio: float = 0.1, sampled_pixels_per_img: Optional[int] = None,
                 compress_ratio: Ratio = 0.5, checkpointfolder: Optional[str] = None, device: Any = "cpu",
                 verbose: bool = False, drawgraph: bool = False, accuracy_first: bool = False,
                 accuracy_threshold: float = 0.0, args: Any = None, example_inputs: Optional[Sequence[Any]] = None,
                 seed: int = DEFAULT_SEED, **unknown: Any):
        if unknown:
            raise unknown_arguments(type(self), unknown)
        self.origin_net = origin_net
        self.seed = seed
        self.trainloader = trainloader
        self.valloader = valloader
        self.trainset_ratio = trainset_ratio
        self.sampled_pixels_per_img = sampled_pixels_per_img
        self.compress_ratio = compress_ratio
        self.checkpointfolder = checkpointfolder
        self.device = _as_device(device, self.error)
        self.verbose = bool(verbose)
        self.drawgraph = bool(drawgraph)
        self.accuracy_first = bool(accuracy_first)
        self.accuracy_threshold = accuracy_threshold
        self.args = args
        self.compressed_net: Optional[ReconstructedNetwork] = None
        self.history: List[Dict[str, Any]] = []  # one entry per compression attempt
        self.saved_files: List[str] = []
        if self.verbose:
            _enable_info_logging()
        self._validate_scalars()
        self._example_kwargs: Optional[Dict[str, Any]] = None  # a dict batch traces a plain module by keyword
        self.example_inputs = self._example_inputs(example_inputs)
        self.origin_graph = self._as_graph(origin_net)
        if self._example_kwargs is not None:  # from now on the inputs go by position, in the graph's order
            self.example_inputs = self.batch_inputs(self._example_kwargs)
        self.validate_ratio(compress_ratio)

    # -- validation ---------------------------------------------------------------------------
    def _validate_scalars(self) -> None:
        r = self.trainset_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
            raise self.error(f"trainset_ratio must be a fraction in (0, 1], got {r!r}")
        self.trainset_ratio = float(r)
        s = self.sampled_pixels_per_img
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise self.error(f"sampled_pixels_per_img must be a positive int (or None: sized per layer), got {s!r}")
        sd = self.seed
        if isinstance(sd, bool) or not isinstance(sd, numbers.Integral) or not 0 <= int(sd) < 2 ** 63:
            raise self.error(f"seed must be an int in [0, 2**63), got {sd!r}")
        self.seed = int(sd)
        t = self.accuracy_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 100.0:
            raise self.error(f"accuracy_threshold must be a fraction in [0, 1] (or percent in (1, 100]), got {t!r}")
        self.accuracy_threshold = float(t) / 100.0 if float(t) > 1.0 else float(t)
        check_loader(self.trainloader, "trainloader")
        check_loader(self.valloader, "valloader")
        if self.trainloader is None or loader_len(self.trainloader) == 0:
            raise DataError("trainloader is empty: the compressor needs training batches to trace and calibrate")
        if self.valloader is not None and loader_len(self.valloader) == 0:
            raise DataError("valloader is empty: pass a loader with validation batches (or valloader=None)")
        if self.accuracy_first and self.valloader is None:
            raise DataError("accuracy_first=True needs a valloader to measure accuracy")

    def _example_inputs(self, example_inputs: Optional[Sequence[Any]]) -> Tuple[Any, ...]:
        example_inputs = example_tuple(example_inputs, self.error)
        if example_inputs:
            return tuple(_to(x, self.device) for x in example_inputs)
        batch = first_batch(self.trainloader, self.seed, self.device)
        if batch is None:
            raise DataError("trainloader yielded no batches: the compressor needs training data")
        args, kwargs = example_from_batch(batch, self.origin_net)
        if kwargs is not None:
            self._example_kwargs = {k: _to(v, self.device) for k, v in kwargs.items()}
        return tuple(_to(x, self.device) for x in args)

    def batch_inputs(self, batch: Any) -> Tuple[Any, ...]:
        """The network's positional inputs in one loader batch (a dict batch is read by input name)."""
        return batch_inputs(batch, self.origin_graph)

    def _as_graph(self, net: nn.Module) -> ReconstructedNetwork:
        """`as_network`, on an eval-mode copy of a plain module: the compressed network is for inference,
        and the user's stays as it is (a graph is used as given; compressors never edit their input)."""
        if isinstance(net, nn.Module) and not isinstance(net, ReconstructedNetwork):
            net = copy_module(net).to(self.device).eval()
        graph = as_network(net, self.example_inputs, self._example_kwargs, error=self.error, what="origin_net")
        return addmm_as_linear(graph) if self.linear_addmm else graph

    def layer_names(self) -> List[str]:
        """Names accepted as keys of a `compress_ratio` dict (every node of the graph by default)."""
        return [n.name for n in self.origin_graph.layer_nodes]

    def validate_ratio(self, ratio: Ratio) -> None:
        if isinstance(ratio, Mapping):
            if not ratio:
                raise self.error("compress_ratio is an empty dict; give {layer_name: ratio} or a float")
            names = self.layer_names()
            known = set(names)
            for k, v in ratio.items():
                if k not in known:
                    raise self.error(f"compress_ratio names unknown layer {k!r}; valid names include "
                                     f"{self.example_layer_names()} (see [n.name for n in net.layer_nodes])")
                _check_fraction(v, f"compress_ratio[{k!r}]", self.error)
            return
        _check_fraction(ratio, "compress_ratio", self.error)

    def example_layer_names(self, n: int = 5) -> List[str]:
        weighted = [nd.name for nd in self.origin_graph.layer_nodes
                    if isinstance(self.origin_graph.network[nd.module], (nn.Conv2d, nn.Linear))]
        return (weighted or self.layer_names())[:n]

    # -- helpers ------------------------------------------------------------------------------
    def log(self, msg: str, *args: Any) -> None:
        logger.log(logging.INFO if self.verbose else logging.DEBUG, msg, *args)

    def progress(self, iterable: Iterable, desc: str, total: Optional[int] = None) -> Iterable:
        """`iterable` wrapped in a tqdm bar when verbose."""
        if not self.verbose:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False)

    def calibration_batches(self) -> List[Tuple[Any, ...]]:
        """Model inputs of the calibration images: a `trainset_ratio` share of the training set drawn
        with `seed` (see `amc.compressors.calibration`); the caller's RNG and loader are left as they were."""
        key = (self.trainset_ratio, self.seed)
        if getattr(self, "_calibration", (None, None))[0] != key:
            self._calibration = (key, calibration_batches(self.trainloader, self.trainset_ratio, self.seed,
                                                          self.batch_inputs, self.device))
        return list(self._calibration[1])

    def evaluate(self, net: nn.Module, loader: Optional[Iterable] = None) -> float:
        """Top-1 accuracy (a fraction) of `net` on `loader` (default: `valloader`)."""
        from ..models.training import evaluate

        loader = self.valloader if loader is None else loader
        if loader is None:
            raise DataError("no valloader to evaluate on")
        return float(evaluate(net.to(self.device), loader, self.device)["acc"])

    # -- the contract --------------------------------------------------------------------------
    def _compress(self, ratio: Ratio) -> ReconstructedNetwork:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement _compress(ratio)")

    def backoff(self, ratio: Ratio, attempt: int) -> Ratio:
        """The milder ratio to try after `attempt` failed the accuracy threshold (x0.8 per step)."""
        if isinstance(ratio, Mapping):
            return {k: float(v) * 0.8 for k, v in ratio.items()}
        return float(ratio) * 0.8

    @outside_inference_mode
    def compress(self) -> ReconstructedNetwork:
        """Compress a copy of the origin network; sets and returns `self.compressed_net`.

        Runs under `seeded_rng(seed)`: the result depends on the arguments only, and the caller's global
        RNG state (torch, numpy, random) is the same after the call as before."""
        with untouched(self.origin_net, self.origin_graph), seeded_rng(self.seed, self.device):
            return self._compress_with_backoff()

    def _compress_with_backoff(self) -> ReconstructedNetwork:
        ratio = self.compress_ratio
        if not self.accuracy_first:
            net = self._checked(self._compress(ratio))
            self.history.append({"ratio": ratio})
        else:
            base = self.evaluate(self.origin_graph)
            thr = self.accuracy_threshold
            if base < thr:
                raise PruningError(f"accuracy_threshold={thr:.4f} is above the origin network's own val "
                                   f"accuracy {base:.4f}: no compressed network can honour it")
            net = None
            for attempt in range(self.max_backoff_attempts):
                cand = self._checked(self._compress(ratio))
                acc = self.evaluate(cand)
                self.history.append({"ratio": ratio, "acc": acc})
                self.log("%s attempt %d: ratio %s -> val acc %.4f (threshold %.4f)", self.name, attempt,
                         _short_ratio(ratio), acc, thr)
                if acc >= thr:
                    net = cand
                    break
                ratio = self.backoff(ratio, attempt)
            if net is None:
                raise PruningError(f"{self.name}: could not keep val accuracy >= {thr:.4f} after "
                                   f"{self.max_backoff_attempts} back-offs (last ratio {_short_ratio(ratio)}, "
                                   f"origin accuracy {base:.4f}); lower accuracy_threshold or compress_ratio")
        self.compressed_ratio = ratio
        self.compressed_net = net
        if self.checkpointfolder:
            self.save(net, self.checkpointfolder)
        return net

    @staticmethod
    def _checked(net: ReconstructedNetwork) -> ReconstructedNetwork:
        if not isinstance(net, ReconstructedNetwork):
            raise TypeError(f"_compress must return a ReconstructedNetwork, got {type(net).__name__}")
        net.lint()
        return net

    def save(self, net: ReconstructedNetwork, folder: str) -> List[str]:
        """Write `<name>.json` (+ weights sidecar), `<name>.pkl`, and a drawing when `drawgraph`."""
        os.makedirs(folder, exist_ok=True)
        base = os.path.join(folder, self.name)
        written: List[str] = []
        for what, fn in (("json", lambda: net.save_to_json(file=base + ".json")),
                         ("pkl", lambda: net.save(pkl=base + ".pkl"))):
            try:
                written.append(fn())
            except Exception as exc:  # noqa: BLE001 - an exporter gap must not lose the compression
                logger.warning("%s: could not write %s checkpoint (%s: %s)", self.name, what, type(exc).__name__, exc)
        if self.drawgraph:
            try:
                written.append(net.draw(base + "_graph"))
            except Exception as exc:  # noqa: BLE001
                logger.warning("%s: could not draw the graph (%s: %s)", self.name, type(exc).__name__, exc)
        self.saved_files = [str(p) for p in written]
        return self.saved_files


def _check_fraction(v: Any, what: str, error: type = PruningError) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
        raise error(f"{what} must be a float in [0, 1) (the fraction of the layer's MACs removed), got {v!r}")


def _as_device(device: Any, error: type = PruningError) -> torch.device:
    """`device` as a torch.device this machine has (an unknown or absent device is an `error` now,
    not a RuntimeError at the first tensor moved there)."""
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        raise error(f"device {device!r} is not usable here ({type(exc).__name__}: {str(exc)[:120]}); "
                    "pass 'cpu' or an available 'cuda:N'") from None
    return dev


def check_count(value: Any, what: str, minimum: int = 1, error: type = PruningError) -> int:
    """An int argument (iterations, batches, grid points) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise error(f"{what} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_number(value: Any, what: str, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, error: type = PruningError) -> float:
    """A finite real argument (learning rate, weight, rate) in [low, high] (open ends where said): a
    string, None or NaN here would otherwise surface as a TypeError/ValueError deep inside a run."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))
    if ok and low is not None:
        ok = float(value) > low if low_open else float(value) >= low
    if ok and high is not None:
        ok = float(value) < high if high_open else float(value) <= high
    if not ok:
        bounds = ("" if low is None else f" {'>' if low_open else '>='} {low:g}") + \
                 ("" if high is None else f"{' and' if low is not None else ''} {'<' if high_open else '<='} {high:g}")
        raise error(f"{what} must be a finite number{bounds}, got {value!r}")
    return float(value)


def check_seed(value: Any, what: str = "seed", error: type = PruningError) -> int:
    """A random seed every generator here accepts (numpy, torch, scikit-learn): an int in [0, 2**32)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < 2 ** 32:
        raise error(f"{what} must be an int in [0, 2**32), got {value!r}")
    return int(value)


def check_names(value: Any, what: str, error: type = PruningError, model: Any = None) -> List[str]:
    """A list of node names (`ignore=`, `layers=`): any iterable of str, but not a bare string; with
    `model`, its modules too (`ignore=[model.fc]`), named as `module_names` does."""
    names = None if isinstance(value, (str, bytes, nn.Module)) or not isinstance(value, Iterable) else list(value)
    if names is not None and model is not None:
        names = list(dict.fromkeys(q for qs in module_names(model, names, what, error).values() for q in qs))
    if names is None or not all(isinstance(n, str) for n in names):
        raise error(f"{what} must be a list of node names{' or modules' if model is not None else ''}, "
                    f"got {value!r}")
    return names


def module_names(model: Any, keys: Iterable[Any], what: str, error: type = PruningError) -> Dict[Any, List[str]]:
    """Each key -> names: a module of `model` (Torch-Pruning's `ignored_layers=[model.fc]` habit) -> its
    qualified name, or, in a graph, the nodes that call it; a string stays itself. Needs no trace, so
    the tuners resolve `ignore=` with it before they build their network."""
    lookup: Dict[int, List[str]] = {}
    aliases: Dict[str, List[str]] = {}  # a string naming one of a layer's names reaches all of them
    if isinstance(model, ReconstructedNetwork):
        for n in model.layer_nodes:
            lookup.setdefault(id(model.network[n.module]), []).append(n.name)
    elif isinstance(model, nn.Module):
        for q, m in model.named_modules(remove_duplicate=False):  # every name of a layer held under two
            if q:
                lookup.setdefault(id(m), []).append(q)
        aliases = {q: names for names in lookup.values() for q in names}
    out: Dict[Any, List[str]] = {}
    for key in keys:
        if isinstance(key, str):
            out[key] = aliases.get(key, [key])
        elif isinstance(key, nn.Module):
            if id(key) not in lookup:
                raise error(f"{what} names a {type(key).__name__} that is not a module of this model "
                            "(a module of the model you pass, or its node name)")
            out[key] = lookup[id(key)]
        else:
            raise error(f"{what} entries are node names or modules, got {type(key).__name__} {key!r}")
    return out


def check_target_macs(target_macs: Any) -> Optional[float]:
    """None, or a fraction in (0, 1] of the whole network's MACs to keep."""
    if target_macs is None:
        return None
    if isinstance(target_macs, bool) or not isinstance(target_macs, (int, float)) or not 0.0 < float(target_macs) <= 1.0:
        raise PruningError(f"target_macs must be a fraction in (0, 1] of the network's MACs kept, got {target_macs!r}")
    return float(target_macs)


def _short_ratio(r: Ratio) -> str:
    if isinstance(r, Mapping):
        vals = list(r.values())
        return f"{{{len(vals)} layers, mean {sum(vals) / max(len(vals), 1):.3f}}}"
    return f"{float(r):.3f}"


_LOGGING_READY = False


def _enable_info_logging() -> None:
    """verbose=True: make amc's INFO messages visible when the application configured no logging."""
    global _LOGGING_READY
    if _LOGGING_READY:
        return
    _LOGGING_READY = True
    amc_logger = logging.getLogger("amc")
    if amc_logger.level == logging.NOTSET or amc_logger.level > logging.INFO:
        amc_logger.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not amc_logger.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        amc_logger.addHandler(h)
