"""Benchmark networks as onnxruntime runs them: exported by amc's `save_to_onnx`, one session each.

A tiny network's torch latency at batch 1 is mostly Python and dispatch; onnxruntime, the runtime the
export targets, pays a few microseconds per op. Benchmarks time both, so a pruned network's speedup is
shown where per-op overhead does not hide it.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

import amc


def ort_runners(nets: Dict[str, Any], x1: Any, folder: str, threads: int = 1,
                check: Callable[[str], bool] = lambda label: True,
                errors: Optional[Dict[str, str]] = None) -> Dict[str, Callable[[Any], Any]]:
    """label -> a call running that network in onnxruntime (`threads` intra-op threads) on a torch tensor.

    Eager modules are traced by amc first; `check(label)` says whether the export compares outputs with
    torch (not where outputs are random draws). With `errors`, a network that fails to export is left out
    and its error kept there; without, the error propagates."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    out: Dict[str, Callable[[Any], Any]] = {}
    for i, (label, net) in enumerate(nets.items()):
        try:
            graph = net if isinstance(net, amc.ReconstructedNetwork) else amc.trace(net, x1)
            path = graph.save_to_onnx(os.path.join(folder, f"{i}.onnx"), x1, check=check(label))
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - recorded per network when asked
            if errors is None:
                raise
            errors[label] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        feed = sess.get_inputs()[0].name
        out[label] = lambda x, s=sess, feed=feed: s.run(None, {feed: x.numpy()})
    return out
