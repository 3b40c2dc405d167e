"""Shared fixtures for the amc test-suite, and the `slow` tier.

- `slow` marks tests that are too heavy for the default run; they are deselected unless `--runslow`.
- `seed` (autouse) seeds torch so every test is deterministic.
- `assert_same(ref, got)` compares nested outputs (tensors, tuples, lists, dicts, namedtuples): same
  structure and container types, tensors equal within rtol 1e-4 / atol 1e-5.
- `check_trace(model, make_inputs, ...)` is the golden-equality helper: trace at one batch size,
  `lint()`, compare with eager at the traced batch size and at another one; returns the network.
- `outputs_in_fresh_process(tmp_path, net, *inputs, absent=...)`: the network saved as JSON and pkl, each
  loaded and run in a new process; returns both outputs.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Sequence, Tuple

import pytest
import torch

RTOL, ATOL = 1e-4, 1e-5


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: heavy test, skipped unless --runslow is given")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if config.getoption("--runslow"):
        return
    slow = [item for item in items if "slow" in item.keywords]  # an opt-in tier: deselected, not skipped
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest single-threaded, and do not fight other jobs for the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seed() -> int:
    torch.manual_seed(0)
    return 0


def _assert_same(ref: Any, got: Any, path: str = "out", rtol: float = RTOL, atol: float = ATOL) -> None:
    if isinstance(ref, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{path}: expected a tensor, got {type(got).__name__}"
        assert got.shape == ref.shape, f"{path}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        assert got.dtype == ref.dtype, f"{path}: dtype {got.dtype} != {ref.dtype}"
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=lambda m: f"{path}: {m}")
        return
    assert type(got) is type(ref), f"{path}: container {type(got).__name__} != {type(ref).__name__}"
    if isinstance(ref, dict):
        assert list(got) == list(ref), f"{path}: keys {list(got)} != {list(ref)}"
        for k in ref:
            _assert_same(ref[k], got[k], f"{path}[{k!r}]", rtol, atol)
    elif isinstance(ref, (list, tuple)):
        assert len(got) == len(ref), f"{path}: length {len(got)} != {len(ref)}"
        for i, (r, g) in enumerate(zip(ref, got)):
            _assert_same(r, g, f"{path}[{i}]", rtol, atol)
    else:
        assert got == ref, f"{path}: {got!r} != {ref!r}"


@pytest.fixture
def assert_same() -> Callable[..., None]:
    return _assert_same


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return type(obj)((k, _clone(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_clone(v) for v in obj)
    return copy.copy(obj)


Inputs = Tuple[Tuple[Any, ...], Dict[str, Any]]


def _check_trace(model: torch.nn.Module, make_inputs: Callable[[int], Any], trace_batch: int = 2,
                 other_batches: Sequence[int] = (3,)) -> "Any":
    """Trace `model` on `make_inputs(trace_batch)`, lint, and compare with eager at every batch size.

    `make_inputs(b)` returns a tensor, a tuple of positional inputs, or `(args_tuple, kwargs_dict)`.
    """
    import amc

    def split(inputs: Any) -> Inputs:
        if isinstance(inputs, torch.Tensor):
            return (inputs,), {}
        if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict) \
                and isinstance(inputs[0], tuple):
            return inputs
        return tuple(inputs), {}

    batches = [trace_batch, *other_batches]
    data = {b: split(make_inputs(b)) for b in batches}
    with torch.no_grad():
        refs = {b: model(*_clone(a), **_clone(k)) for b, (a, k) in data.items()}
    args, kwargs = data[trace_batch]
    net = amc.trace(model, *_clone(args), **_clone(kwargs))
    net.lint()
    with torch.no_grad():
        for b, (a, k) in data.items():
            _assert_same(refs[b], net(*_clone(a), **_clone(k)), path=f"batch {b}")
    return net


@pytest.fixture
def check_trace() -> Callable[..., Any]:
    return _check_trace


def _outputs_in_fresh_process(tmp_path: Any, net: Any, *inputs: Any, absent: Sequence[str] = ()) -> list:
    """Save `net` as JSON and pkl, load each in a new Python process (where the modules named in `absent`
    were never imported) and run it in eval mode on `inputs`: the two outputs, for the caller to compare."""
    import subprocess
    import sys

    net.save_to_json(str(tmp_path / "fresh.json"))
    net.save(pkl=str(tmp_path / "fresh.pkl"))
    torch.save(inputs, tmp_path / "fresh_in.pt")
    code = f"""
import sys, torch, amc
torch.set_num_threads({torch.get_num_threads()})  # as many as here: kernels split work by thread count
inputs = torch.load({str(tmp_path / 'fresh_in.pt')!r})
assert not [m for m in {list(absent)!r} if m in sys.modules], "imported before loading"
outs = []
for path in ({str(tmp_path / 'fresh.json')!r}, {str(tmp_path / 'fresh.pkl')!r}):
    with torch.no_grad():
        outs.append(amc.load(path).eval()(*inputs))
torch.save(outs, {str(tmp_path / 'fresh_out.pt')!r})
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return torch.load(tmp_path / "fresh_out.pt")


@pytest.fixture
def outputs_in_fresh_process() -> Callable[..., list]:
    return _outputs_in_fresh_process
