"""Where a pruned network's onnxruntime time goes, per op type and per convolution, beside the original.

Why: the speedup x MACs efficiency of the pruning sweeps says *that* a pruned network is slower than its
MACs promise, not *why*. onnxruntime's profiler times every node; this lines the original's and the
pruned network's nodes up by name (amc's export keeps them). On this AVX-512 machine it showed the
NCHWc block of 16: a convolution pruned to 24 input channels runs padded to 32.

    python scripts/profile_onnxruntime.py efficientnet_v2_s --round-to 8 --ratio 0.5
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from typing import Dict, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def node_times(path: str, x, runs: int) -> Tuple[Dict[str, float], Dict[str, tuple]]:
    """Median microseconds per node over `runs` forwards (1 thread) and each node's (op, input shapes)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.enable_profiling, opts.log_severity_level = True, 3
    opts.profile_file_prefix = os.path.splitext(path)[0]
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    for _ in range(runs):
        sess.run(None, feed)
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    per: Dict[str, list] = collections.defaultdict(list)
    info: Dict[str, tuple] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            per[name].append(e["dur"])
            shapes = [list(s.values())[0] for s in e["args"].get("input_type_shape", [])]
            info[name] = (e["args"]["op_name"], shapes)
    return {k: sorted(v)[len(v) // 2] for k, v in per.items()}, info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a torchvision classifier name, as in sweep_prune.py")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--top", type=int, default=15, help="convolutions listed, by time they lose")
    a = p.parse_args()

    import torch

    import amc
    from sweep_prune import build

    torch.set_num_threads(1)
    model, x = build(a.model, a.size, 0)
    net = amc.trace(model, x)
    pruned = amc.prune(net, ratio=a.ratio, criterion="l2", example_inputs=(x,), round_to=a.round_to)
    macs = amc.count(pruned, x)[0] / amc.count(net, x)[0]
    with tempfile.TemporaryDirectory() as d:
        (t0, i0), (t1, i1) = (node_times(n.save_to_onnx(os.path.join(d, f"{k}.onnx"), x, check=False), x, a.runs)
                              for k, n in (("orig", net), ("pruned", pruned)))
    total0, total1 = sum(t0.values()), sum(t1.values())
    print(f"{a.model} ratio {a.ratio} round_to {a.round_to}: {macs:.3f}x MACs, node time {total0 / 1e3:.2f} -> "
          f"{total1 / 1e3:.2f} ms, speedup {total0 / total1:.2f}x, efficiency {total0 / total1 * macs:.2f}")
    by_op: Dict[str, list] = collections.defaultdict(lambda: [0.0, 0.0])
    for times, info, col in ((t0, i0, 0), (t1, i1, 1)):
        for name, us in times.items():
            by_op[info[name][0]][col] += us
    print("\n| op | original ms | pruned ms | pruned / original |\n|---|---|---|---|")
    for op, (u0, u1) in sorted(by_op.items(), key=lambda kv: -kv[1][0]):
        print(f"| {op} | {u0 / 1e3:.3f} | {u1 / 1e3:.3f} | {u1 / max(u0, 1e-9):.2f} |")
    convs = [(t1[n] - macs * t0[n], n) for n in t0 if n in t1 and "Conv" in i0[n][0]]
    print(f"\nConvolutions losing the most time against {macs:.3f}x of theirs (input and weight shapes as run; "
          "NCHWc pads channels to its block)\n\n| node | original ms | pruned / original | original shapes | pruned shapes |"
          "\n|---|---|---|---|---|")
    for _, n in sorted(convs, reverse=True)[: a.top]:
        print(f"| {n} | {t0[n] / 1e3:.3f} | {t1[n] / t0[n]:.2f} | {i0[n][1][:2]} | {i1[n][1][:2]} |")


if __name__ == "__main__":
    main()
