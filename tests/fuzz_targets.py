"""Fuzz targets shared by `tests/test_fuzz.py` (small budget) and `scripts/fuzz.py` (long budget).

Each `Target` pairs a hypothesis strategy with a `check(case)` that feeds the case to one amc entry
point. The property every check enforces:

- a refusal is an `amc.errors.AmcError` (these entry points document no other exception for bad input,
  so a bare TypeError/ValueError counts as a failure too);
- any other exception, or a case running past `CASE_SECONDS` of CPU time, is a `FuzzFailure`;
- a success is a usable network: it lints, runs on the example input and gives the right output shape.

`check` returns "ok" or "refused" and counts the case in `TRIED[target]`, so callers can prove how many
cases actually ran. `REGRESSIONS` holds the smallest input of every bug the fuzzer found (all fixed);
the test and the script replay them.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from hypothesis import strategies as st

import amc
from amc.errors import AmcError

CASE_SECONDS = 20.0  # CPU seconds one case may take before it counts as a hang
TRIED: collections.Counter = collections.Counter()


class FuzzFailure(AssertionError):
    """A case broke the property: wrong exception type, a hang, or a success that is not usable."""


class Hang(BaseException):  # BaseException, so `except Exception` in amc cannot swallow it
    pass


@contextlib.contextmanager
def cpu_time_limit(seconds: float):
    """Raise `Hang` after `seconds` of process CPU time (ITIMER_PROF: leaves pytest-timeout's SIGALRM alone)."""
    def on_timer(signum: int, frame: Any) -> None:
        raise Hang(f"case ran past {seconds} s of CPU time")

    old = signal.signal(signal.SIGPROF, on_timer)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


# ==============================================================================================
# Fixtures: one tiny network (conv, BN, residual add, pool, linear), traced and saved once per process.

class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = y + self.c2(y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


OUT_SHAPE = (2, 3)


@functools.lru_cache(maxsize=None)
def tiny() -> Tuple[nn.Module, torch.Tensor, "amc.ReconstructedNetwork"]:
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(2, 1, 8, 8)
    return model, x, amc.trace(model, x)


@functools.lru_cache(maxsize=None)
def workdir() -> str:
    path = tempfile.mkdtemp(prefix="amc_fuzz_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def saved_json() -> Tuple[Dict[str, Any], bytes]:
    """(parsed JSON document, sidecar bytes) of the tiny network saved as case.json + case.safetensors."""
    path = os.path.join(workdir(), "case.json")
    tiny()[2].save_to_json(file=path)
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    with open(os.path.join(workdir(), "case.safetensors"), "rb") as f:
        return doc, f.read()


@functools.lru_cache(maxsize=None)
def saved_pkl() -> bytes:
    path = os.path.join(workdir(), "orig.pkl")
    tiny()[2].save(pkl=path)
    with open(path, "rb") as f:
        return f.read()


def _fingerprint(net: nn.Module) -> List[Tuple[str, bytes]]:
    return [(k, v.detach().cpu().numpy().tobytes()) for k, v in net.state_dict().items()]


def _usable(net: Any, what: str, inputs: Optional[Tuple[Any, ...]],
            out_shape: Optional[Tuple[int, ...]] = OUT_SHAPE) -> None:
    """A success must be a ReconstructedNetwork that lints and runs, with the expected output shape.
    `inputs=None`: inputs shaped like the recorded ones (`net.example_inputs()`)."""
    if not isinstance(net, amc.ReconstructedNetwork):
        raise FuzzFailure(f"{what} returned a {type(net).__name__}, not a ReconstructedNetwork")
    try:
        net.lint()
        with torch.no_grad():
            out = net.eval()(*(net.example_inputs() if inputs is None else inputs))
    except Exception as exc:  # noqa: BLE001 - this is the finding
        raise FuzzFailure(f"{what} succeeded but the network does not run: {type(exc).__name__}: {exc}") from exc
    if out_shape is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != out_shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FuzzFailure(f"{what} succeeded but the output is {got}, expected shape {out_shape}")


def _classify(fn: Callable[[], Any]) -> Tuple[str, Any]:
    """("ok", result) or ("refused", exc) for an AmcError; anything else is a FuzzFailure."""
    try:
        with cpu_time_limit(CASE_SECONDS):
            return "ok", fn()
    except AmcError as exc:
        return "refused", exc
    except Hang as exc:
        raise FuzzFailure(f"hang: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - this is the finding
        raise FuzzFailure(f"{type(exc).__name__} escaped (not an AmcError): {exc}") from exc


# ==============================================================================================
# Value strategies.

NODE_NAMES = ["x", "c1", "b1", "relu", "c2", "add", "adaptive_avg_pool2d", "flatten", "fc"]
ODD_STRINGS = ["", "nan", "inf", "-1", "1e309", "torch.nn.modules.conv.Conv2d", "torch.nn.Identity",
               "amc.graph.ops.FunctionOp", "os.system", "builtins.eval", "torch.load", "torch.relu",
               "torch.Tensor.add", "torch.nn.functional.relu", "float32", "int64", "bogus", "cpu", "meta",
               "cuda:7", "../x", "/etc/passwd", "case.json", "case.safetensors", "__class__", "\x00", "é"]
huge_ints = st.sampled_from([-1, 0, 1, 2, 2 ** 31, 2 ** 63, -2 ** 63, 2 ** 64, 10 ** 30, -10 ** 30])
odd_floats = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e-320, 1e308, -1e308, 0.999999, 1.0])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10), huge_ints, st.floats(), odd_floats,
                    st.text(max_size=6), st.sampled_from(NODE_NAMES + ODD_STRINGS))


def _tagged(children: st.SearchStrategy) -> st.SearchStrategy:
    """The tagged objects of amc's JSON value codec, with fuzzed contents."""
    names = st.sampled_from(NODE_NAMES) | st.text(max_size=4) | scalars
    return st.one_of(
        st.builds(lambda n, p: {"ref": n, "path": p}, names, st.lists(children, max_size=2) | children),
        st.builds(lambda v: {"tuple": v}, st.lists(children, max_size=3) | children),
        st.builds(lambda t, f, v: {"namedtuple": t, "fields": f, "values": v}, names,
                  st.lists(st.text(max_size=3), max_size=3) | children, st.lists(children, max_size=3) | children),
        st.builds(lambda v: {"slice": v}, st.lists(children, max_size=4) | children),
        st.builds(lambda v: {"dtype": v}, st.sampled_from(["float32", "int8", "bool", "complex64", "bogus"]) | scalars),
        st.builds(lambda v: {"device": v}, st.sampled_from(["cpu", "meta", "cuda:7", "mps", "xla", ""]) | scalars),
        st.builds(lambda v: {"memory_format": v}, scalars), st.builds(lambda v: {"layout": v}, scalars),
        st.builds(lambda v: {"ellipsis": v}, scalars), st.builds(lambda v: {"float": v}, scalars),
        st.builds(lambda v: {"complex": v}, st.lists(children, max_size=3) | children),
        st.builds(lambda v: {"size": v}, st.lists(children, max_size=3) | children),
        st.builds(lambda v: {"dict": v}, st.lists(st.lists(children, max_size=3), max_size=2) | children),
        st.builds(lambda v: {"odict": v}, st.lists(st.lists(children, max_size=3), max_size=2) | children),
        st.builds(lambda v: {"repr": v}, scalars),
    )


json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=4) | st.sampled_from(NODE_NAMES), children, max_size=3),
                               _tagged(children)),
    max_leaves=6)


# ==============================================================================================
# JSON loader: structural mutations of a real saved document.

def _paths(doc: Any, prefix: Tuple[Any, ...] = ()) -> List[Tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _get(doc: Any, path: Tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _set(doc: Any, path: Tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _delete(doc: Any, path: Tuple[Any, ...]) -> Any:
    if path:
        del _get(doc, path[:-1])[path[-1]]
    return doc


def _retype(v: Any) -> Any:
    """The same content in another JSON type."""
    if isinstance(v, dict):
        return list(v.items())
    if isinstance(v, list):
        return {str(i): x for i, x in enumerate(v)}
    if isinstance(v, str):
        return [v]
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return str(v)
    return {}


class Mutated(dict):
    """A mutated document that prints as the list of mutations applied (readable failure reports)."""

    ops: List[str]

    def __repr__(self) -> str:
        return f"Mutated({self.ops})"


@st.composite
def mutated_docs(draw: Callable) -> Mutated:
    """A saved document with 1-3 mutations: delete, replace, swap, duplicate, retype or scale a value."""
    doc = copy.deepcopy(saved_json()[0])
    ops: List[str] = []
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths[1:] if len(paths) > 1 else paths))
        kind = draw(st.sampled_from(["delete", "replace", "replace", "swap", "dup", "retype", "huge"]))
        value = _get(doc, path)
        op = f"{kind} {list(path)}"
        if kind == "delete":
            doc = _delete(doc, path)
        elif kind == "replace":
            new = draw(json_values)
            doc = _set(doc, path, new)
            op += f" = {new!r}"
        elif kind == "swap":
            other = draw(st.sampled_from(paths))
            a, b = copy.deepcopy(value), copy.deepcopy(_get(doc, other))
            if other[:len(path)] != path and path[:len(other)] != other:
                doc = _set(_set(doc, path, b), other, a)
            op += f" <-> {list(other)}"
        elif kind == "dup":
            parent = _get(doc, path[:-1]) if path else None
            if isinstance(parent, list):
                parent.insert(path[-1], copy.deepcopy(value))
            elif isinstance(value, list) and value:
                value.append(copy.deepcopy(value[-1]))
        elif kind == "retype":
            doc = _set(doc, path, _retype(value))
        else:  # huge: scale numbers, blow up shapes
            scale = draw(st.sampled_from([-1, 0, 7, 10 ** 6, 2 ** 40]))
            doc = _set(doc, path, _scale(value, scale))
            op += f" x {scale}"
        ops.append(op)
    out = Mutated(doc)  # the root itself is never replaced, so doc is still a dict
    out.ops = ops
    return out


def _scale(v: Any, k: int) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return v * k
    if isinstance(v, list):
        return [_scale(x, k) for x in v]
    if isinstance(v, dict):
        return {kk: _scale(x, k) for kk, x in v.items()}
    return v


def _write_case(doc_text: Optional[str] = None, sidecar: Optional[bytes] = None) -> str:
    d = workdir()
    base_doc, base_sidecar = saved_json()
    path = os.path.join(d, "case.json")
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(json.dumps(base_doc) if doc_text is None else doc_text)
    with open(os.path.join(d, "case.safetensors"), "wb") as f:
        f.write(base_sidecar if sidecar is None else sidecar)
    return path


def _check_load_json(path: str, target: str) -> str:
    TRIED[target] += 1
    status, result = _classify(lambda: amc.ReconstructedNetwork.load_from_json(file=path))
    if status == "ok":
        positional = isinstance(result, amc.ReconstructedNetwork) and all(
            isinstance(n.index, int) for n in result.input_nodes)
        # an edited file may legitimately rename or re-index the input: then call it as the file says
        _usable(result, "load_from_json", (tiny()[1],) if positional else None, out_shape=None)
    return status


def check_json_doc(doc: Any) -> str:
    try:
        text = json.dumps(dict(doc))
    except (ValueError, TypeError):  # a key json cannot write: not a file anyone can produce
        text = "{}"
    return _check_load_json(_write_case(text), "json_doc")


@st.composite
def byte_mutations(draw: Callable, data: bytes) -> bytes:
    """The file as saved (the control: the success path), truncation, bit flips, inserted or overwritten
    bytes, or plain garbage."""
    kind = draw(st.sampled_from(["keep", "truncate", "flip", "insert", "overwrite", "garbage", "empty"]))
    if kind == "keep":
        return data
    if kind == "truncate":
        return data[:draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind == "garbage":
        return draw(st.binary(max_size=256))
    if kind == "empty":
        return b""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(buf) - 1))
        if kind == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            chunk = draw(st.binary(min_size=1, max_size=8))
            buf[i:i + len(chunk)] = chunk
    return bytes(buf)


def json_texts() -> st.SearchStrategy:
    return st.deferred(lambda: byte_mutations(json.dumps(saved_json()[0]).encode()))


def check_json_bytes(data: bytes) -> str:
    path = _write_case()
    with open(path, "wb") as f:
        f.write(data)
    return _check_load_json(path, "json_bytes")


# -- the safetensors sidecar ---------------------------------------------------------------------

@st.composite
def sidecar_cases(draw: Callable) -> Tuple[bytes, bool]:
    """(sidecar bytes, keep the JSON's sha256?): corrupted bytes, or a valid file with wrong tensors."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    base = saved_json()[1]
    if draw(st.booleans()):
        return draw(byte_mutations(base)), draw(st.booleans())
    tensors = dict(st_load(base))
    names = sorted(tensors)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        kind = draw(st.sampled_from(["drop", "extra", "reshape", "dtype", "empty", "scalar", "nan"]))
        t = tensors.get(name, torch.zeros(1))
        if kind == "drop":
            tensors.pop(name, None)
        elif kind == "extra":
            tensors[draw(st.sampled_from(names + ["ghost.weight", "c1.ghost", "c1"]))] = torch.zeros(2)
        elif kind == "reshape":
            shape = draw(st.lists(st.integers(0, 5), max_size=4))
            tensors[name] = torch.zeros(shape)
        elif kind == "dtype":
            dtype = draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                          torch.int8, torch.bool, torch.uint8]))
            tensors[name] = t.to(dtype)
        elif kind == "empty":
            tensors[name] = t.reshape(-1)[:0]
        elif kind == "scalar":
            tensors[name] = torch.tensor(1.0)
        else:
            tensors[name] = torch.full_like(t, math.nan) if t.is_floating_point() else t
    return st_save({k: v.contiguous() for k, v in tensors.items()}), draw(st.booleans())


def check_sidecar(case: Tuple[bytes, bool]) -> str:

    data, keep_hash = case
    doc = copy.deepcopy(saved_json()[0])
    if keep_hash:  # a consistent pair: the JSON vouches for this sidecar
        doc["weights"]["sha256"] = hashlib.sha256(data).hexdigest()
        doc["weights"]["bytes"] = len(data)
    else:
        doc["weights"].pop("sha256")
    return _check_load_json(_write_case(json.dumps(doc), data), "json_sidecar")


# ==============================================================================================
# pkl loader: corrupted files and valid pickles of arbitrary objects.

def pkl_files() -> st.SearchStrategy:
    return st.deferred(lambda: byte_mutations(saved_pkl()))


def check_pkl_bytes(data: bytes) -> str:
    path = os.path.join(workdir(), "case.pkl")
    with open(path, "wb") as f:
        f.write(data)
    return _check_load_pkl(path, "pkl_bytes")


def _check_load_pkl(path: str, target: str) -> str:
    TRIED[target] += 1
    status, result = _classify(lambda: amc.ReconstructedNetwork.load(pkl=path))
    if status == "ok":
        _usable(result, "load(pkl=)", (tiny()[1],))
    return status


_HEADER = {"format": "amc.ReconstructedNetwork/pkl", "version": 1}
pickle_leaves = st.one_of(scalars, st.binary(max_size=8), st.complex_numbers(), st.deferred(lambda: st.just(tiny()[2])),
                          st.builds(lambda n: torch.zeros(n), st.integers(0, 3)),
                          st.sampled_from([torch.float32, torch.device("cpu"), slice(1, 2), Ellipsis, range(3),
                                           collections.OrderedDict(a=1), frozenset({1}), nn.Identity(), nn.ReLU()]))
pickle_objects = st.recursive(
    pickle_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.tuples(children, children), st.sets(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=4) | st.integers(), children, max_size=3),
        st.builds(lambda net, v, extra: {**_HEADER, "network": net, "version": v, **extra},
                  children, st.sampled_from([1, 1, 2, "1", None]), st.dictionaries(st.text(max_size=4), children,
                                                                                 max_size=2))),
    max_leaves=6)


def check_pkl_object(case: Tuple[Any, str]) -> str:
    obj, how = case
    path = os.path.join(workdir(), "case.pkl")
    if how == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=int(how))
    return _check_load_pkl(path, "pkl_objects")


network_objects = st.deferred(lambda: st.one_of(
    st.just(tiny()[2]),
    st.builds(lambda v, extra: {**_HEADER, "network": tiny()[2], "version": v, **extra},
              st.sampled_from([1, 1, 1, 2, "1", None]), st.dictionaries(st.text(max_size=4), scalars, max_size=2))))
pkl_object_cases = st.tuples(pickle_objects | network_objects, st.sampled_from(["torch.save", "2", "4", "5"]))


# ==============================================================================================
# amc.prune: ratios, per-layer dicts, criteria, target_macs, modes, ignore lists.

PRUNE_LAYERS = ["c1", "b1", "c2", "fc", "add", "relu"]
ratios = st.one_of(st.floats(), odd_floats, st.floats(0, 1, exclude_max=True), st.integers(-2, 2), huge_ints,
                   st.booleans(), st.none(), st.text(max_size=3),
                   st.dictionaries(st.sampled_from(PRUNE_LAYERS) | st.text(max_size=3) | st.integers(0, 3),
                                   st.floats() | odd_floats | st.floats(0, 0.99) | scalars | st.dictionaries(
                                       st.sampled_from(PRUNE_LAYERS), st.floats(0, 0.9), max_size=1),
                                   max_size=3))
criteria = st.sampled_from(["l1", "l2", "fpgm", "random", "L2", "apoz", "thinet", "", "l3", None, 3, b"l1",
                            lambda g: torch.ones(g.size), lambda g: [1.0], lambda g: "x",
                            lambda g: torch.full((g.size,), math.nan)])
target_macs = st.one_of(st.none(), st.none(), st.floats(), odd_floats, st.floats(0.01, 1.0), huge_ints,
                        st.booleans(), st.text(max_size=3), st.integers(1, 10 ** 6))
plausible_prune = st.fixed_dictionaries(
    {"ratio": st.floats(0, 0.95) | st.dictionaries(st.sampled_from(["c1", "c2", "fc"]), st.floats(0, 0.95), max_size=3)},
    optional={"criterion": st.sampled_from(["l1", "l2", "fpgm", "random"]), "target_macs": st.floats(0.05, 1.0),
              "mode": st.sampled_from(["hard", "soft"]), "plain_module": st.booleans()})
wild_prune = st.fixed_dictionaries(
    {"ratio": ratios},
    optional={"criterion": criteria, "target_macs": target_macs,
              "mode": st.sampled_from(["hard", "soft", "HARD", "", None, 1]),
              "ignore": st.lists(st.sampled_from(PRUNE_LAYERS) | st.text(max_size=3), max_size=2) | scalars,
              "plain_module": st.booleans(), "example_inputs": st.sampled_from(["x", "none", "empty", "garbage"])})
prune_cases = st.one_of(plausible_prune, wild_prune)


def _example_inputs(how: str, x: torch.Tensor) -> Any:
    """`example_inputs=` as a case names it: the right ones, none, an empty tuple, or text."""
    return {"x": (x,), "none": None, "empty": (), "garbage": ("text",)}[how]


def check_prune(case: Dict[str, Any]) -> str:
    TRIED["prune"] += 1
    model, x, net = tiny()
    kwargs = dict(case)
    target = model if kwargs.pop("plain_module", False) else net
    how = kwargs.pop("example_inputs", "x")
    kwargs["example_inputs"] = _example_inputs(how, x)
    before = _fingerprint(target)
    status, result = _classify(lambda: amc.prune(target, **kwargs))
    if _fingerprint(target) != before:
        raise FuzzFailure("amc.prune changed the network it was given")
    if status == "ok":
        _usable(result, "amc.prune", (x,))
        if result is target:
            raise FuzzFailure("amc.prune returned the network it was given, not a new one")
        if kwargs.get("mode", "hard") == "hard":  # soft pruning keeps shapes, so MACs are counted unchanged
            _check_macs(result, kwargs.get("target_macs"))
    return status


def _check_macs(pruned: nn.Module, target: Any) -> None:
    """A pruned network never costs more than the original, and meets target_macs when given."""
    x = tiny()[1][:1]
    base, got = amc.count(tiny()[2], x)[0], amc.count(pruned, x)[0]
    limit = base if target is None else (target * base if target <= 1 else target)
    if not got <= limit:
        raise FuzzFailure(f"amc.prune(target_macs={target!r}) returned {got} MACs of {base}: the budget is not met")


# ==============================================================================================
# Compressor constructors (the argument validation path), plus compress() on valid small cases.

def _loader(kind: str) -> Any:
    x = tiny()[1]
    y = torch.tensor([0, 1])
    return {"ok": [(x, y), (x, y)], "empty": [], "none": None, "tensors": [x], "dicts": [{"input": x}],
            "garbage": [("text", 1)], "int": 3}[kind]


def _valid_or(valid: st.SearchStrategy, invalid: st.SearchStrategy = scalars) -> st.SearchStrategy:
    """Half plausible values (to reach compress()), half anything."""
    return st.one_of(valid, invalid)


plausible_compressor = st.fixed_dictionaries(
    {"cls": st.sampled_from(["ChannelPruning", "LowRankDecomposition"]), "run": st.just(True)},
    optional={
        "compress_ratio": st.floats(0, 0.9) | st.dictionaries(st.sampled_from(["c1", "c2", "fc"]), st.floats(0, 0.9),
                                                              min_size=1, max_size=3),
        "trainset_ratio": st.floats(0.1, 1), "sampled_pixels_per_img": st.none() | st.integers(1, 20),
        "accuracy_first": st.booleans(), "accuracy_threshold": st.floats(0, 0.5), "seed": st.integers(0, 2 ** 32),
        "selection": st.sampled_from(["lasso", "first_k", "max_response"]), "ridge": st.floats(0, 1),
        "method": st.sampled_from(["data", "svd"]), "rank_selection": st.sampled_from([None, "energy", "accuracy"]),
        "target_macs": st.floats(0.2, 1), "nonlinear_iters": st.integers(0, 2),
        "ignore": st.lists(st.sampled_from(["c1", "c2", "fc"]), max_size=1)})
wild_compressor = st.fixed_dictionaries(
    {"cls": st.sampled_from(["ChannelPruning", "LowRankDecomposition"])},
    optional={
        "compress_ratio": _valid_or(st.floats(0, 0.9), ratios),
        "trainset_ratio": _valid_or(st.floats(0.1, 1)), "sampled_pixels_per_img": _valid_or(st.integers(1, 20)),
        "accuracy_threshold": _valid_or(st.floats(0, 0.5)), "accuracy_first": st.booleans(),
        "trainloader": st.sampled_from(["ok", "ok", "empty", "none", "tensors", "dicts", "garbage", "int"]),
        "valloader": st.sampled_from(["ok", "empty", "none"]),
        "device": st.sampled_from(["cpu", "cpu", "meta", "cuda:7", "bogus", 3, torch.device("cpu")]),
        "lars_alpha_init": _valid_or(st.floats(0, 1)), "ridge": _valid_or(st.floats(0, 1)),
        "seed": _valid_or(st.integers(0, 2 ** 64)),
        "selection": st.sampled_from(["lasso", "first_k", "max_response", "bogus", None]),
        "method": st.sampled_from(["data", "svd", "bogus", None]),
        "rank_selection": st.sampled_from([None, "energy", "accuracy", "combined", "bogus"]),
        "target_macs": st.none() | _valid_or(st.floats(0.05, 1)), "nonlinear_iters": _valid_or(st.integers(0, 3)),
        "val_batches": _valid_or(st.integers(1, 3)), "acc_grid": _valid_or(st.integers(1, 4)),
        "ranks": st.dictionaries(st.sampled_from(["c1", "c2", "fc", "b1", "?"]), _valid_or(st.integers(1, 4)),
                                 max_size=2) | scalars,
        "layers": st.none() | st.lists(st.sampled_from(["c1", "c2", "fc", "b1", "?"]), max_size=2) | scalars,
        "ignore": st.lists(st.sampled_from(["c1", "c2", "fc", "b1", "?"]), max_size=2) | scalars,
        "run": st.booleans()})
compressor_cases = st.one_of(plausible_compressor, wild_compressor)

_CP_ONLY = {"lars_alpha_init", "ridge", "selection"}
_LR_ONLY = {"method", "rank_selection", "nonlinear_iters", "val_batches", "acc_grid", "ranks", "layers"}


def _build_and_compress(cls: Any, name: str, target: nn.Module, kwargs: Dict[str, Any], run: bool,
                        x: torch.Tensor, counter: str) -> str:
    """A seed-shaped compressor built on `target` (and compressed when `run`): refusals are AmcErrors, a
    success is a usable network, and `target` is left bit-identical."""
    before = _fingerprint(target)
    status, comp = _classify(lambda: cls(target, **kwargs))
    if status == "ok" and run:
        status, comp = _classify(comp.compress)
        if status == "ok":
            _usable(comp, f"{name}.compress()", (x,))
            TRIED[f"{counter}:compress() succeeded"] += 1
    if _fingerprint(target) != before:
        raise FuzzFailure(f"{name} changed origin_net")
    return status


def check_compressor(case: Dict[str, Any]) -> str:
    from amc.compressors import ChannelPruning, LowRankDecomposition

    TRIED["compressor_args"] += 1
    _, x, net = tiny()
    kwargs = dict(case)
    name = kwargs.pop("cls")
    run = kwargs.pop("run", False)
    for k in (_LR_ONLY if name == "ChannelPruning" else _CP_ONLY):
        kwargs.pop(k, None)
    kwargs["trainloader"] = _loader(kwargs.get("trainloader", "ok"))
    kwargs["valloader"] = _loader(kwargs.get("valloader", "ok"))
    cls = ChannelPruning if name == "ChannelPruning" else LowRankDecomposition
    if run:
        kwargs.setdefault("trainset_ratio", 0.5)
        kwargs.setdefault("sampled_pixels_per_img", 4)
        if name == "LowRankDecomposition":
            kwargs.setdefault("nonlinear_iters", 2)
    return _build_and_compress(cls, name, net, kwargs, run, x, "compressor_args")


# ==============================================================================================
# amc.trace: non-modules, odd inputs.

class _Returns(nn.Module):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.lin = nn.Linear(8, 3)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        value = {"none": None, "int": 3, "str": "s", "input": args[0] if args else None,
                 "dict": {"a": args[0] if args else 1}, "raise": None}[self.what]
        if self.what == "raise":
            raise KeyError("boom")
        return value


def _model(kind: str) -> Any:
    return {"tiny": lambda: tiny()[0], "linear": lambda: nn.Linear(8, 3), "identity": nn.Identity,
            "empty_seq": nn.Sequential, "net": lambda: tiny()[2], "int": lambda: 3, "str": lambda: "model",
            "none": lambda: None, "function": lambda: torch.relu, "class": lambda: nn.Linear,
            "ret_none": lambda: _Returns("none"), "ret_int": lambda: _Returns("int"),
            "ret_str": lambda: _Returns("str"), "ret_input": lambda: _Returns("input"),
            "ret_dict": lambda: _Returns("dict"), "raises": lambda: _Returns("raise")}[kind]()


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8,
           torch.bool, torch.complex64]
tensors = st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype) if dtype == torch.bool
                    else torch.ones(shape).to(dtype),
                    st.sampled_from([(2, 1, 8, 8), (1, 1, 8, 8), (2, 8), (0, 1, 8, 8), (), (8,), (2, 1, 1, 1),
                                     (2, 3, 8, 8), (0,)]), st.sampled_from(_DTYPES))
trace_inputs = st.one_of(tensors, scalars, st.lists(tensors, max_size=2), st.tuples(), st.just(()),
                         st.dictionaries(st.text(max_size=2), tensors, max_size=1),
                         st.sampled_from([torch.float32, nn.Linear(2, 2), object()]))
_MATCHING = {"tiny": (2, 1, 8, 8), "linear": (2, 8), "identity": (2, 3), "ret_input": (2, 3)}
plausible_trace = st.builds(lambda kind, dtype, batch: (kind, [torch.randn(batch, *_MATCHING[kind][1:]).to(dtype)], {}),
                            st.sampled_from(sorted(_MATCHING)), st.sampled_from(_DTYPES), st.sampled_from([0, 1, 2]))
trace_cases = st.one_of(plausible_trace, st.tuples(
    st.sampled_from(["tiny", "tiny", "linear", "identity", "empty_seq", "net", "int", "str", "none", "function",
                     "class", "ret_none", "ret_int", "ret_str", "ret_input", "ret_dict", "raises"]),
    st.lists(trace_inputs, max_size=3),
    st.dictionaries(st.sampled_from(["x", "input", "y"]), trace_inputs, max_size=1)))


def check_trace(case: Tuple[str, List[Any], Dict[str, Any]]) -> str:
    TRIED["trace"] += 1
    kind, args, kwargs = case
    model = _model(kind)
    status, net = _classify(lambda: amc.trace(model, *args, **kwargs))
    if status == "ok":
        if not isinstance(net, amc.ReconstructedNetwork):
            raise FuzzFailure(f"amc.trace returned a {type(net).__name__}")
        try:
            net.lint()
            with torch.no_grad():
                ref = model(*args, **kwargs)
                got = net(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - this is the finding
            raise FuzzFailure(f"amc.trace succeeded but the network does not run: {type(exc).__name__}: {exc}") from exc
        if not _same_output(ref, got):
            raise FuzzFailure(f"amc.trace succeeded but the network computes something else: {ref!r} vs {got!r}")
        TRIED["trace:traced and equal to eager"] += 1
    return status


def _same_output(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and bool(
            torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, atol=1e-5, equal_nan=True)))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_output(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(_same_output(a[k], b[k]) for k in a)
    return a == b


# ==============================================================================================
# The newer compressors: VTP and TokenPruning on a tiny ViT, Quantization / ProductQuantization /
# QuantNoise on the tiny CNN. Constructor validation, then compress() on the accepted ones when `run`.

@functools.lru_cache(maxsize=None)
def tiny_vit() -> Tuple[nn.Module, torch.Tensor, "amc.ReconstructedNetwork"]:
    """The 8x8 input of `tiny()`, cut into 4 patches (+ CLS): 2 blocks of width 8, 2 heads, 3 classes."""
    torch.manual_seed(0)
    model = amc.models.SmallViT(num_classes=3, in_channels=1, image_size=8, patch_size=4, dim=8, depth=2,
                                heads=2).eval()
    x = tiny()[1]
    return model, x, amc.trace(model, x)


# wild values, but no int large enough to be a valid count (epochs, episodes, k-means restarts): such a case
# legitimately runs for hours, which the harness would report as a hang
_not_big = scalars.filter(lambda v: isinstance(v, bool) or not isinstance(v, int) or v <= 3)


def _count_or(valid: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(valid, _not_big)


numbers_or_wild = st.one_of(st.floats(1e-4, 0.5), scalars)
plausible_vit = st.fixed_dictionaries(
    {"cls": st.sampled_from(["VTP", "TokenPruning"]), "run": st.just(True), "epochs": st.integers(0, 1)},
    optional={"target_macs": st.floats(0.3, 1.0), "compress_ratio": st.floats(0.0, 0.7),
              "finetune_epochs": st.integers(0, 1), "heads": st.booleans(), "round_to": st.integers(1, 4),
              "residual": st.sampled_from(["stream", "readers"]), "threshold": st.none() | st.floats(0, 1.5),
              "score": st.sampled_from(["agent", "cls_attention", "norm", "random", "tome"]),
              "fuse": st.sampled_from(["none", "one", "merge", True, False]), "samples": st.integers(1, 3),
              "chain": st.booleans(), "plain_module": st.booleans()})
wild_vit = st.fixed_dictionaries(
    {"cls": st.sampled_from(["VTP", "TokenPruning"])},
    optional={"target_macs": st.none() | _valid_or(st.floats(0.3, 1.0), ratios),
              "compress_ratio": _valid_or(st.floats(0.0, 0.7), ratios),
              "epochs": _count_or(st.integers(0, 1)), "finetune_epochs": _count_or(st.integers(0, 1)),
              "lr": numbers_or_wild, "gate_lr": numbers_or_wild, "agent_lr": numbers_or_wild,
              "sparsity": numbers_or_wild, "budget_weight": numbers_or_wild, "distill": numbers_or_wild,
              "threshold": st.none() | numbers_or_wild, "heads": _valid_or(st.booleans()),
              "round_to": _count_or(st.integers(1, 4)), "residual": st.sampled_from(["stream", "readers", "x", None]),
              "score": st.sampled_from(["agent", "tome", "bogus", None, 3]),
              "fuse": st.sampled_from(["none", "merge", "one", "bogus", None, 2]),
              "samples": _count_or(st.integers(1, 3)), "chain": _valid_or(st.booleans()),
              "accumulation_steps": _count_or(st.integers(1, 2)), "hidden": st.none() | _count_or(st.integers(1, 8)),
              "layers": st.none() | st.lists(st.sampled_from(["blocks.0.add_1", "blocks.1.add_1", "fc", "?"]),
                                             max_size=2) | scalars,
              "trainloader": st.sampled_from(["ok", "ok", "empty", "none", "tensors", "garbage", "int"]),
              "valloader": st.sampled_from(["ok", "empty", "none"]), "model": st.sampled_from(["vit", "vit", "cnn"]),
              "device": st.sampled_from(["cpu", "cpu", "bogus", 3]), "run": st.booleans()})
vit_cases = st.one_of(plausible_vit, wild_vit)
_VTP_ONLY = {"compress_ratio", "finetune_epochs", "heads", "round_to", "residual", "threshold", "sparsity", "gate_lr"}
_TOKENS_ONLY = {"score", "fuse", "samples", "chain", "agent_lr", "budget_weight", "distill", "accumulation_steps",
                "hidden", "layers"}


def check_vit_compressor(case: Dict[str, Any]) -> str:
    from amc.compressors import VTP, TokenPruning

    TRIED["vit_compressor_args"] += 1
    kwargs = dict(case)
    name, run = kwargs.pop("cls"), kwargs.pop("run", False)
    for k in (_TOKENS_ONLY if name == "VTP" else _VTP_ONLY):
        kwargs.pop(k, None)
    model, x, net = tiny() if kwargs.pop("model", "vit") == "cnn" else tiny_vit()
    target = model if kwargs.pop("plain_module", False) else net
    kwargs["trainloader"] = _loader(kwargs.get("trainloader", "ok"))
    kwargs["valloader"] = _loader(kwargs.get("valloader", "ok"))
    kwargs.setdefault("epochs", 0)
    if name == "VTP":
        kwargs.setdefault("finetune_epochs", 0)
    return _build_and_compress(VTP if name == "VTP" else TokenPruning, name, target, kwargs, run, x,
                               "vit_compressor_args")


plausible_quant = st.fixed_dictionaries(
    {"cls": st.sampled_from(["Quantization", "ProductQuantization"]), "run": st.just(True)},
    optional={"weight_bits": st.integers(2, 8), "act_bits": st.none() | st.integers(2, 8),
              "observer": st.sampled_from(["minmax", "percentile", "mse"]),
              "weight_observer": st.sampled_from(["minmax", "mse"]), "percentile": st.floats(90, 100),
              "trainset_ratio": st.floats(0.1, 1), "fold_bn": st.booleans(), "qat_epochs": st.integers(0, 1),
              "block_size": st.none() | st.sampled_from([1, 2, 3, 4, 9]), "n_centroids": st.integers(2, 8),
              "finetune_epochs": st.integers(0, 1), "ignore": st.lists(st.sampled_from(["c1", "c2", "fc"]), max_size=1),
              "plain_module": st.booleans()})
wild_quant = st.fixed_dictionaries(
    {"cls": st.sampled_from(["Quantization", "ProductQuantization", "QuantNoise"])},
    optional={"weight_bits": _valid_or(st.integers(2, 8)), "act_bits": st.none() | _valid_or(st.integers(2, 8)),
              "bits": _valid_or(st.integers(2, 8)), "rate": _valid_or(st.floats(0, 1)),
              "observer": st.sampled_from(["minmax", "bogus", None, 1]),
              "weight_observer": st.sampled_from(["minmax", "mse", "bogus", None]),
              "percentile": _valid_or(st.floats(90, 100)), "trainset_ratio": _valid_or(st.floats(0.1, 1)),
              "qat_epochs": _count_or(st.integers(0, 1)), "lr": numbers_or_wild,
              "optimizer": st.sampled_from(["sgd", "adamw", "bogus", None]),
              "block_size": st.none() | _valid_or(st.sampled_from([1, 2, 4, 9]), scalars) | st.dictionaries(
                  st.sampled_from(["c1", "c2", "fc", "?"]), _valid_or(st.integers(1, 9)), max_size=2),
              "n_centroids": _count_or(st.integers(2, 8)), "finetune_epochs": _count_or(st.integers(0, 1)),
              "n_init": _count_or(st.integers(1, 2)), "seed": _valid_or(st.integers(0, 2 ** 64)),
              "bn_batches": _count_or(st.integers(0, 2)), "eval_quantized": _valid_or(st.booleans()),
              "layers": st.none() | st.lists(st.sampled_from(["c1", "c2", "fc", "?"]), max_size=2) | scalars,
              "ignore": st.lists(st.sampled_from(["c1", "c2", "fc", "?"]), max_size=2) | scalars,
              "trainloader": st.sampled_from(["ok", "ok", "empty", "none", "tensors", "garbage", "int"]),
              "valloader": st.sampled_from(["ok", "empty", "none"]),
              "device": st.sampled_from(["cpu", "cpu", "bogus", 3]), "run": st.booleans()})
quant_cases = st.one_of(plausible_quant, wild_quant)
_ARGS = {"Quantization": {"weight_bits", "act_bits", "observer", "percentile", "weight_observer", "trainset_ratio",
                          "fold_bn", "qat_epochs", "lr", "optimizer", "layers", "ignore", "device", "seed",
                          "trainloader", "valloader"},
         "ProductQuantization": {"block_size", "n_centroids", "finetune_epochs", "lr", "optimizer", "layers",
                                 "ignore", "device", "seed", "n_init", "trainloader", "valloader"},
         "QuantNoise": {"rate", "bits", "seed", "eval_quantized", "bn_batches", "weight_observer"}}


def check_quant(case: Dict[str, Any]) -> str:
    from amc.compressors.quant import ProductQuantization, Quantization, QuantNoise

    TRIED["quant_args"] += 1
    kwargs = dict(case)
    name, run = kwargs.pop("cls"), kwargs.pop("run", False)
    model, x, net = tiny()
    target = model if kwargs.pop("plain_module", False) else net
    kwargs = {k: v for k, v in kwargs.items() if k in _ARGS[name]}
    if name == "QuantNoise":
        status, cb = _classify(lambda: QuantNoise(**kwargs))
        if status == "ok":  # one epoch with the plug-in: fake-quantised weights, straight-through grads
            from amc.trainers import BaseTrainer

            student = net.copy()
            opt = torch.optim.SGD(student.parameters(), lr=0.01)
            status, _ = _classify(lambda: BaseTrainer(_loader("ok"), _loader("ok"), None, student,
                                                      nn.CrossEntropyLoss(), opt, None, 1, "cpu", callbacks=[cb],
                                                      progress=False).run())
            if status == "ok":
                _usable(student, "training with QuantNoise", (x,))
        return status
    for k in ("trainloader", "valloader"):
        kwargs[k] = _loader(kwargs.get(k, "ok"))
    if name == "ProductQuantization":
        kwargs.setdefault("n_centroids", 4)
        kwargs.setdefault("example_inputs", (x,))
    return _build_and_compress(Quantization if name == "Quantization" else ProductQuantization, name, target,
                               kwargs, run, x, "quant_args")


# ==============================================================================================
# amc.prune under a latency budget: target_latency, latency_allocation, dataloader, latency_table.

plausible_latency = st.fixed_dictionaries(
    {"target_latency": st.floats(0.3, 1.0)},
    optional={"latency_allocation": st.sampled_from(["uniform", "layers", "auto"]), "round_to": st.integers(1, 4),
              "dataloader": st.just("ok"), "mode": st.sampled_from(["hard", "soft"])})
wild_latency = st.fixed_dictionaries(
    {"target_latency": st.none() | _valid_or(st.floats(0.3, 1.0), ratios)},
    optional={"latency_allocation": st.sampled_from(["uniform", "layers", "auto", "bogus", None, 1]),
              "target_macs": st.none() | _valid_or(st.floats(0.3, 1.0)), "ratio": st.none() | ratios,
              "round_to": _count_or(st.integers(1, 4)), "heads": _valid_or(st.booleans()),
              "dataloader": st.sampled_from(["ok", "empty", "none", "tensors", "garbage", "int"]),
              "latency_table": st.sampled_from(["none", "none", "garbage", "int"]),
              "mode": st.sampled_from(["hard", "soft", "bogus"]),
              "example_inputs": st.sampled_from(["x", "x", "none", "empty", "garbage"])})
latency_cases = st.one_of(plausible_latency, wild_latency)


def check_latency_prune(case: Dict[str, Any]) -> str:
    from amc.compressors import latency

    TRIED["latency_prune"] += 1
    _, x, net = tiny()
    kwargs = dict(case)
    how = kwargs.pop("example_inputs", "x")
    kwargs["example_inputs"] = _example_inputs(how, x)
    if "dataloader" in kwargs:
        kwargs["dataloader"] = _loader(kwargs["dataloader"])
    table = kwargs.pop("latency_table", "none")
    if table != "none":
        kwargs["latency_table"] = {"garbage": "table.json", "int": 3}[table]
    before = _fingerprint(net)
    saved, latency.CACHE = latency.CACHE, latency.Path(workdir()) / "latency"  # keep the user's cache clean
    try:
        status, result = _classify(lambda: amc.prune(net, **kwargs))
    finally:
        latency.CACHE = saved
    if _fingerprint(net) != before:
        raise FuzzFailure("amc.prune(target_latency=...) changed the network it was given")
    if status == "ok":
        _usable(result, "amc.prune(target_latency=...)", (x,))
        if kwargs.get("mode", "hard") == "hard":
            _check_macs(result, kwargs.get("target_macs"))
    return status


# ==============================================================================================
# Tuners: constructor and search() arguments on the tiny CNN, a handful of evaluations per case.

def _raise(net: Any) -> float:
    raise RuntimeError("evaluator failed")


_EVALUATORS = {"const": lambda net: 0.5, "random": lambda net: float(torch.rand(1)), "nan": lambda net: math.nan,
               "inf": lambda net: math.inf, "raises": _raise, "string": lambda net: "high",
               "tensor": lambda net: torch.tensor(0.7), "none_result": lambda net: None, "not_callable": 3}
_SMALL_CTOR = {"DDPG": {"episodes": 3, "warmup": 1, "batch_size": 2}, "GA": {"generations": 1, "pop_size": 3},
               "RandomSearch": {"samples": 3}}
# constructor arguments per tuner (others would be Python's own TypeError for an unknown keyword)
_CTOR_ARGS = {"DDPG": {"episodes", "warmup", "seed", "reward", "hidden", "lr_actor", "lr_critic", "tau", "discount",
                       "batch_size", "replay_size", "noise", "noise_decay", "moving_alpha", "parallel_episodes"},
              "GA": {"generations", "pop_size", "seed", "objectives", "crossover_eta", "mutation_eta", "initial"},
              "RandomSearch": {"samples", "seed", "batch"}}
plausible_tuner = st.fixed_dictionaries(
    {"cls": st.sampled_from(sorted(_SMALL_CTOR)), "target_macs": st.floats(0.35, 0.95),
     "evaluate": st.sampled_from(["const", "random", "default"])},
    optional={"compressor": st.sampled_from(["prune", "channel", "lowrank", "callable"]),
              "min_ratio": st.floats(0, 0.2), "max_ratio": st.floats(0.5, 0.9),
              "ignore": st.lists(st.sampled_from(["c1", "c2", "fc"]), max_size=1),
              "criterion": st.sampled_from(["l1", "l2", "fpgm"]), "seed": st.integers(0, 2 ** 31)})
wild_tuner = st.fixed_dictionaries(
    {"cls": st.sampled_from(sorted(_SMALL_CTOR))},
    optional={"ctor": st.dictionaries(st.sampled_from(sorted(set().union(*_CTOR_ARGS.values()))),
                                      st.integers(-1, 3) | _not_big, max_size=2),
              "target_macs": st.none() | _valid_or(st.floats(0.35, 0.95), ratios),
              "compressor": st.sampled_from(["prune", "channel", "lowrank", "bogus", None, 3, "callable",
                                             "callable_bad"]),
              "evaluate": st.sampled_from(sorted(_EVALUATORS) + ["default"]),
              "calibration": st.sampled_from(["ok", "empty", "none", "tensors", "garbage", "int"]),
              "min_ratio": _valid_or(st.floats(0, 0.5)) | st.dictionaries(st.sampled_from(["c1", "c2", "?"]),
                                                                           numbers_or_wild, max_size=2),
              "max_ratio": _valid_or(st.floats(0.3, 0.95)),
              "ignore": st.lists(st.sampled_from(["c1", "c2", "fc", "?"]), max_size=2) | scalars,
              "criterion": st.sampled_from(["l2", "bogus", None, 3]),
              "executor": st.sampled_from(["local", "local", "bogus", None]),
              "bn_batches": _count_or(st.integers(0, 2)), "holdout_batches": st.none() | _count_or(st.integers(0, 2)),
              "finetune_steps": _count_or(st.integers(0, 1)), "rerank": _count_or(st.integers(0, 1)),
              "checkpoint_every": _count_or(st.integers(1, 2)), "tighten": st.none() | scalars,
              "compressor_options": st.none() | st.dictionaries(st.sampled_from(["round_to", "bogus"]),
                                                                _valid_or(st.integers(1, 4)), max_size=1) | scalars,
              "example_inputs": st.sampled_from(["x", "x", "none", "empty", "garbage"])})
tuner_cases = st.one_of(plausible_tuner, wild_tuner)


def check_tuner(case: Dict[str, Any]) -> str:
    from amc import tuners

    TRIED["tuner_args"] += 1
    model, x, net = tiny()
    kwargs = dict(case)
    name = kwargs.pop("cls")
    ctor = {**_SMALL_CTOR[name], "seed": kwargs.pop("seed", 0),
            **{k: v for k, v in kwargs.pop("ctor", {}).items() if k in _CTOR_ARGS[name]}}
    how = kwargs.pop("example_inputs", "x")
    kwargs["example_inputs"] = _example_inputs(how, x)
    kwargs["calibration"] = _loader(kwargs.get("calibration", "ok"))
    kwargs.setdefault("holdout", _loader("ok"))
    ev = kwargs.pop("evaluate", "const")
    kwargs["evaluate"] = None if ev == "default" else _EVALUATORS[ev]
    comp = kwargs.get("compressor")
    if comp == "callable":
        kwargs["compressor"] = lambda policy: amc.prune(net, ratio=policy, example_inputs=(x,))
    elif comp == "callable_bad":
        kwargs["compressor"] = lambda policy: "not a network"
    before = _fingerprint(net)
    cls = getattr(tuners, name)
    status, result = _classify(lambda: cls(**ctor).search(net, progress=False, **kwargs))
    if _fingerprint(net) != before:
        raise FuzzFailure(f"{name}.search changed the model it was given")
    if status == "ok":
        _usable(result.net, f"{name}.search", (x,))
        target = kwargs.get("target_macs", 0.5)
        got = amc.count(result.net, x[:1])[0] / amc.count(net, x[:1])[0]
        if target is not None and got > float(target) * 1.001:
            raise FuzzFailure(f"{name}.search(target_macs={target!r}) returned {got:.4f} of the MACs")
        if not abs(got - float(result.macs_ratio)) <= 1e-6:
            raise FuzzFailure(f"{name}.search reports macs_ratio {result.macs_ratio!r}, the network has {got:.6f}")
    return status


# ==============================================================================================
# The registry the test and the script iterate.

@dataclass
class Target:
    name: str
    strategy: Callable[[], st.SearchStrategy]
    check: Callable[[Any], str]
    doc: str


TARGETS: Dict[str, Target] = {t.name: t for t in [
    Target("json_doc", lambda: st.deferred(mutated_docs), check_json_doc,
           "load_from_json on a saved document with keys deleted, values replaced/swapped/retyped/scaled"),
    Target("json_bytes", json_texts, check_json_bytes,
           "load_from_json on the JSON text truncated, bit-flipped, overwritten or replaced by garbage"),
    Target("json_sidecar", lambda: st.deferred(sidecar_cases), check_sidecar,
           "load_from_json with a corrupted safetensors file, or a valid one with wrong/missing/extra tensors"),
    Target("pkl_bytes", pkl_files, check_pkl_bytes,
           "load(pkl=) on a saved .pkl truncated, bit-flipped, overwritten or replaced by garbage"),
    Target("pkl_objects", lambda: pkl_object_cases, check_pkl_object,
           "load(pkl=) on valid pickles / torch.save files of arbitrary objects, with and without amc's header"),
    Target("prune", lambda: prune_cases, check_prune,
           "amc.prune: ratios (nan/inf/negative/>=1/non-numbers), per-layer dicts, criteria, target_macs, mode"),
    Target("compressor_args", lambda: compressor_cases, check_compressor,
           "ChannelPruning / LowRankDecomposition arguments; compress() on the accepted ones when `run`"),
    Target("trace", lambda: trace_cases, check_trace,
           "amc.trace: non-modules, modules returning non-tensors, odd dtypes/shapes, empty and keyword inputs"),
    Target("vit_compressor_args", lambda: vit_cases, check_vit_compressor,
           "VTP / TokenPruning arguments on a tiny ViT (and on a CNN); compress() on the accepted ones when `run`"),
    Target("quant_args", lambda: quant_cases, check_quant,
           "Quantization / ProductQuantization / QuantNoise arguments; compress() or one training epoch"),
    Target("latency_prune", lambda: latency_cases, check_latency_prune,
           "amc.prune(target_latency=...): allocations, dataloaders, tables, with target_macs / ratio / round_to"),
    Target("tuner_args", lambda: tuner_cases, check_tuner,
           "DDPG / GA / RandomSearch constructor and search() arguments, evaluators that fail; 3-5 evaluations"),
]}


@dataclass
class Regression:
    id: int
    target: str
    bug: str
    fixed_in: str
    case: Any


def _mutated(doc_edit: Callable[[Dict[str, Any]], None], ops: List[str]) -> Mutated:
    doc = copy.deepcopy(saved_json()[0])
    doc_edit(doc)
    out = Mutated(doc)
    out.ops = ops
    return out


class _Lazy:
    """A case built on first use (the JSON cases need the saved tiny network)."""

    def __init__(self, make: Callable[[], Any], text: str) -> None:
        self.make, self.text = make, text

    def __repr__(self) -> str:
        return self.text


def _retyped_training_differs(doc: Dict[str, Any]) -> None:
    doc["weights"]["training_differs"] = {str(i): v for i, v in enumerate(doc["weights"]["training_differs"])}


def _dropped_args(doc: Dict[str, Any]) -> None:
    del doc["nodes"][1]["inputs"]["args"]


def _string_padding(doc: Dict[str, Any]) -> None:
    doc["nodes"][0]["config"]["padding"] = "sideways"


def _bool_weights() -> Tuple[bytes, bool]:
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    tensors = dict(st_load(saved_json()[1]))
    tensors["c1.weight"] = tensors["c1.weight"].to(torch.bool)
    return st_save(tensors), True


def _dotted_module_key(doc: Dict[str, Any]) -> None:
    doc["nodes"][0]["module"] = {"device": 2.5e297}


def _flipped_attribute_name() -> bytes:
    data = bytearray(saved_pkl())
    data[data.find(b"running_var")] ^= 0x20  # one bit: "running_var" -> "Running_var"
    return bytes(data)


def _multi_disk_zip() -> bytes:
    data = bytearray(saved_pkl())
    data[data.rfind(b"PK\x06\x07") + 4] ^= 1  # zip64 end-record locator: "disk of the zip64 end record"
    return bytes(data)


# The smallest input of every bug the fuzzer found; each was fixed where `fixed_in` says.
REGRESSIONS: List[Regression] = [
    Regression(1, "json_doc", "weights.training_differs not a list of submodule names: AttributeError/TypeError "
               "after the network was built", "amc/export/json_io.py load_json",
               _Lazy(lambda: _mutated(_retyped_training_differs, ["retype ['weights', 'training_differs']"]),
                     "training_differs as a dict")),
    Regression(2, "json_doc", "a node's inputs deleted: the file loaded, the network failed at its first call",
               "amc/export/json_io.py check_runs (load runs the graph once)",
               _Lazy(lambda: _mutated(_dropped_args, ["delete ['nodes', 1, 'inputs', 'args']"]),
                     "delete ['nodes', 1, 'inputs', 'args']")),
    Regression(3, "json_doc", "a config value of the wrong type (Conv2d padding) loaded; TypeError at the first call",
               "amc/export/json_io.py check_runs",
               _Lazy(lambda: _mutated(_string_padding, ["replace ['nodes', 0, 'config', 'padding']"]),
                     "replace ['nodes', 0, 'config', 'padding'] = 'sideways'")),
    Regression(4, "json_sidecar", "a sidecar with the right shapes but bool weights (sha256 matching) loaded; "
               "RuntimeError at the first call", "amc/export/json_io.py check_runs",
               _Lazy(_bool_weights, "c1.weight stored as bool, sha256 updated")),
    Regression(5, "prune", "ignore=None: TypeError from list(None)", "amc/compressors/prune.py plan_pruning",
               {"ratio": 0.5, "ignore": None}),
    Regression(6, "prune", "example_inputs that do not fit a ReconstructedNetwork: TypeError from inside the "
               "dependency analysis", "amc/compressors/prune.py _check_inputs_run",
               {"ratio": {}, "example_inputs": "garbage"}),
    Regression(7, "prune", "a dict ratio whose value is a dict passed validation; TypeError in group_ratio",
               "amc/compressors/prune.py _validate_ratio", {"ratio": {"c2": {"c1": 0.5}}}),
    Regression(8, "prune", "a criterion function returning a non-number: TypeError from torch.as_tensor",
               "amc/compressors/prune.py _scores (criteria.py returns the raw value)",
               {"ratio": 0.25, "criterion": _Lazy(lambda: (lambda g: "x"), "lambda g: 'x'")}),
    Regression(9, "prune", "target_macs=nan passed every check and pruned to 12% of the MACs, silently (found "
               "reading the code; the harness's MACs-budget check now flags it); target_macs was also validated "
               "only after the whole analysis", "amc/compressors/prune.py _check_target_macs",
               {"ratio": 0.5, "target_macs": math.nan}),
    Regression(10, "compressor_args", "LowRankDecomposition val_batches/acc_grid/nonlinear_iters None, text or "
               "inf: TypeError/ValueError/OverflowError from int()", "amc/compressors/lowrank.py via base.check_count",
               {"cls": "LowRankDecomposition", "val_batches": math.inf}),
    Regression(11, "compressor_args", "device='bogus': RuntimeError from torch.device; device='cuda:7' on a "
               "machine without it: RuntimeError at the first tensor moved", "amc/compressors/base.py _as_device",
               {"cls": "ChannelPruning", "device": "cuda:7"}),
    Regression(12, "compressor_args", "seed >= 2**64 accepted; ValueError (overflow) when seeding",
               "amc/compressors/base.py _validate_scalars", {"cls": "LowRankDecomposition", "seed": 2 ** 64}),
    Regression(13, "compressor_args", "trainloader=3 (not iterable) passed validation; TypeError when iterated",
               "amc/compressors/base.py _validate_scalars", {"cls": "ChannelPruning", "trainloader": "int"}),
    Regression(14, "compressor_args", "ignore=True / ignore=1: TypeError from list()/tuple()",
               "amc/compressors/channel_pruning.py, lowrank.py via base.check_names",
               {"cls": "LowRankDecomposition", "ignore": True}),
    Regression(15, "json_doc", "a node's module key that nn.ModuleDict cannot hold (text with a dot): KeyError",
               "amc/export/json_io.py load_json",
               _Lazy(lambda: _mutated(_dotted_module_key, ["replace ['nodes', 0, 'module']"]),
                     "replace ['nodes', 0, 'module'] = {'device': 2.5e297}")),
    Regression(16, "pkl_bytes", "one flipped bit in a pickled attribute name (BatchNorm running_var): the file "
               "loaded, the network failed at its first call", "amc/export/pkl.py load_pkl (runs json_io.check_runs)",
               _Lazy(_flipped_attribute_name, "saved .pkl, 'running_var' -> 'Running_var'")),
    Regression(17, "pkl_bytes", "the 1-byte file b'r': struct.error from the zip reader",
               "amc/export/pkl.py _CORRUPT", b"r"),
    Regression(18, "pkl_bytes", "a zip whose end record claims another disk: BadZipFile from zipfile.is_zipfile",
               "amc/export/pkl.py _allowed_globals_of", _Lazy(_multi_disk_zip, "saved .pkl, zip64 locator disk number 0 -> 1")),
    Regression(19, "vit_compressor_args", "VTP lr (also sparsity, threshold, round_to) as text or None: ValueError/"
               "TypeError from float()/int()", "amc/compressors/vtp/compressor.py via base.check_number",
               {"cls": "VTP", "lr": "x"}),
    Regression(20, "quant_args", "ProductQuantization seed=-2**63: scikit-learn's InvalidParameterError from KMeans",
               "amc/compressors/quant/pq.py via base.check_seed",
               {"cls": "ProductQuantization", "seed": -2 ** 63, "run": True}),
    Regression(21, "quant_args", "ProductQuantization seed=None / lr='': TypeError/ValueError from int()/float()",
               "amc/compressors/quant/pq.py", {"cls": "ProductQuantization", "lr": ""}),
    Regression(22, "quant_args", "QuantNoise seed=None: TypeError from int()", "amc/compressors/quant/noise.py",
               {"cls": "QuantNoise", "seed": None}),
    Regression(23, "quant_args", "Quantization percentile as text: ValueError from float()",
               "amc/compressors/quant/compressor.py", {"cls": "Quantization", "percentile": "x"}),
    Regression(24, "tuner_args", "compressor_options='6' or 5: ValueError/TypeError from dict()",
               "amc/tuners/base.py Tuner.search", {"cls": "GA", "compressor_options": "6"}),
    Regression(25, "tuner_args", "ignore=1.0: TypeError from list()", "amc/tuners/base.py via base.check_names",
               {"cls": "RandomSearch", "ignore": 1.0}),
    Regression(26, "tuner_args", "DDPG(discount=None) accepted; TypeError in the first agent update",
               "amc/tuners/ddpg.py (every hyper-parameter checked)", {"cls": "DDPG", "ctor": {"discount": None}}),
    Regression(27, "tuner_args", "GA(objectives=inf): TypeError from tuple()", "amc/tuners/ga.py",
               {"cls": "GA", "ctor": {"objectives": math.inf}}),
    Regression(28, "tuner_args", "GA(seed=nan): ValueError from int()", "amc/tuners/base.py via base.check_seed",
               {"cls": "GA", "ctor": {"seed": math.nan}}),
    Regression(29, "tuner_args", "calibration=3 with rerank: TypeError when the re-ranking evaluator iterated it",
               "amc/tuners/evaluation.py default_evaluator", {"cls": "DDPG", "calibration": "int", "rerank": 1}),
]


def regression_case(reg: Regression) -> Any:
    """The case of a regression, with lazy parts built."""
    if isinstance(reg.case, _Lazy):
        return reg.case.make()
    if isinstance(reg.case, dict):
        return {k: v.make() if isinstance(v, _Lazy) else v for k, v in reg.case.items()}
    return reg.case
