"""Run one function per subprocess, with a wall-clock timeout and an address-space guard.

A zoo sweep must survive a model that hangs, leaks or segfaults: each job runs

    python scripts/_isolate.py --call <script.py>:<function> --kwargs '<json>' --result-file <path>

in its own process group, and the parent kills the whole group when the timeout expires. The child
writes the function's (JSON-able) return value to the result file; the parent returns it as a dict, or
a dict with `status` "timeout" / "crash" / "oom" and the tail of stderr when the child gave none.

Also holds `write_atomic`, used by every script so a killed run never leaves half a result file.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, Optional

HERE = os.path.dirname(os.path.abspath(__file__))


def write_atomic(path: str, text: str) -> str:
    """Write `text` to `path` atomically (amc's own temp-file + rename writer)."""
    from amc.export.atomic import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as f:
        f.write(text)
    return path


def output_shapes(out: Any, leaf: Optional[Any] = None) -> Any:
    """A model output with every tensor replaced by its shape (lists, tuples and dicts kept); other
    values become `leaf(value)`, or None: what sweeps compare between the original and the pruned net."""
    import torch

    if isinstance(out, torch.Tensor):
        return list(out.shape)
    if isinstance(out, (list, tuple)):
        return [output_shapes(o, leaf) for o in out]
    if isinstance(out, dict):
        return {k: output_shapes(v, leaf) for k, v in out.items()}
    return leaf(out) if leaf is not None else None


def cpu_info() -> str:
    """The CPU a timing ran on, with its INT8 dot-product extensions: INT8 and fp32 kernels (oneDNN, MLAS)
    pick code paths by them, so a latency ratio means little without this line beside it."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    ext = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                                   ("amx_int8", "AMX-INT8")) if flag in flags]
    if not ext and "avx2" in flags:
        ext = ["AVX2, no VNNI"]
    return f"{model}, {os.cpu_count()} cores" + (f", {', '.join(ext)}" if ext else "")


def package_version(mod: str) -> str:
    """The installed distribution's version, or "n/a" (for result headers). Not `mod.__version__`:
    torch_pruning 1.6.1 still reports 1.6.0 there."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(mod.replace("_", "-"))
    except PackageNotFoundError:
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001
            return "n/a"


def _limit_memory(mem_gb: Optional[float]):
    def apply() -> None:
        os.setsid()
        if mem_gb:
            import resource

            limit = int(mem_gb * (1 << 30))
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def run_isolated(call: str, kwargs: Dict[str, Any], timeout: float = 300.0, mem_gb: Optional[float] = 16.0,
                 env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run `call` ("path/to/script.py:function") with `kwargs` in a fresh interpreter.

    Returns the function's dict result plus `wall_s`, or {"status": "timeout"|"crash"|"oom", "error": ...}.
    """
    fd, result_file = tempfile.mkstemp(prefix="amc_isolate_", suffix=".json")
    os.close(fd)
    os.unlink(result_file)
    cmd = [sys.executable, os.path.join(HERE, "_isolate.py"), "--call", call, "--kwargs", json.dumps(kwargs),
           "--result-file", result_file]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_limit_memory(mem_gb), env={**os.environ, **(env or {})})
    try:
        _, stderr = proc.communicate(timeout=timeout)
        status = None
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, stderr = proc.communicate()
        status = "timeout"
    wall = time.perf_counter() - start
    try:
        if status is None and os.path.exists(result_file):
            with open(result_file, encoding="utf-8") as f:
                result = json.load(f)
            result.setdefault("wall_s", wall)
            return result
    finally:
        if os.path.exists(result_file):
            os.unlink(result_file)
    tail = (stderr or "").strip().splitlines()[-6:]
    if status is None:
        oom = proc.returncode in (-signal.SIGKILL, -signal.SIGSEGV) or any(
            "MemoryError" in line or "can't allocate memory" in line or "std::bad_alloc" in line for line in tail)
        status = "oom" if oom else "crash"
    msg = f"timed out after {timeout:.0f}s" if status == "timeout" else f"exit code {proc.returncode}"
    return {"status": status, "error": msg + ("; " + " | ".join(tail) if tail else ""), "wall_s": wall}


def _load(call: str):
    path, func = call.rsplit(":", 1)
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(HERE, path)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec.loader.exec_module(module)
    return getattr(module, func)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Child side of run_isolated(): call one function, write its JSON "
                                            "result. Normally started by run_isolated(), not by hand.")
    p.add_argument("--call", required=True, help="path/to/script.py:function")
    p.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments")
    p.add_argument("--result-file", required=True, help="where to write the JSON result")
    args = p.parse_args(argv)
    try:
        result = _load(args.call)(**json.loads(args.kwargs))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as data
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:500],
                  "traceback": traceback.format_exc()[-2000:]}
    write_atomic(args.result_file, json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
