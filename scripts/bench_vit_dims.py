"""ViT dimension and head pruning on the Fashion-MNIST ViT (issue 15): VTP (seed 001) against magnitude.

    python scripts/bench_vit_dims.py                   # accuracy, MACs, latency at batch 1 and 64
    python scripts/bench_vit_dims.py --skip-latency    # accuracy and MACs only
    python scripts/bench_vit_dims.py --vit-b16         # + torchvision vit_b_16 (random weights) check
    python scripts/bench_vit_dims.py --skip-latency --save-nets /tmp/dims   # accuracy now, then with the
    python scripts/bench_vit_dims.py --latency-from /tmp/dims               #   machine to itself: latency
    python scripts/bench_vit_dims.py --add-l2-round-to 8 --save-nets /tmp/dims  # + amc.prune L2 rows rounded to 8

The original is `vit_fashion` (49 patch tokens + CLS, width 96, 6 blocks, 4 heads), trained by
scripts/fashion_originals.py and cached (the token-pruning benchmark's original). At each MACs budget
(fraction of the original's MACs at batch 1, amc.count), every row is fine-tuned the same epochs
(AdamW, `--lr`, on the first `--train-limit` training images) and scored on the official 10,000 test images:
  - VTP (dims): learned gates, one sparsity-training run shared by every budget (`--sparsity-epochs`,
    L1 weight `--sparsity`), then the dims below the threshold found for the budget (the residual width
    as one group); "residual readers": the stream kept whole, each qkv / fc1 dropping its own columns;
  - VTP + heads: the same gates, whole heads first (`heads=True`), then dims;
  - amc.prune L2 (dims) and amc.prune L2 whole heads (`heads=True`; heads removed at the fewest of 1/4,
    1/2, 3/4 per block that reaches the budget, the other groups' ratio bisected): weight magnitude;
  - Torch-Pruning 1.6.1 as its ViT example configures it (MetaPruner, GroupMagnitudeImportance(p=2),
    num_heads of every qkv, classifier ignored): head dims (`prune_head_dims`) and whole heads
    (`prune_num_heads`, head_pruning_ratio chosen as for amc); pruning_ratio bisected to the budget;
  - VTP + tokens: VTP at budget / 0.8, then ToMe token merging (no training) to the budget.
Latency: interleaved medians at batch 1 and 64 (the machine to itself; load average in the table);
efficiency = speedup x MACs ratio (1.0: as fast as the MACs promise). Where the time goes: a profile at
batch 64 splits each network's time into the ops that carry MACs (matrix products, the patch conv) and
the rest (softmax, LayerNorm, GELU, copies, adds), which no dimension count shrinks in proportion.

Writes scripts/results/vit_dims.{md,json,png}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import amc  # noqa: E402
from amc.compressors import VTP, TokenPruning  # noqa: E402
from amc.compressors.vtp.compressor import train_gates  # noqa: E402
from amc.models import evaluate, train_classifier  # noqa: E402
from _budget import smallest_ratio_under  # noqa: E402
from _isolate import write_atomic  # noqa: E402
from _ort import ort_runners  # noqa: E402
from _saved_nets import fuse_all, load_nets, save_nets  # noqa: E402
from bench_speed import interleaved  # noqa: E402
import fashion_originals  # noqa: E402

RESULTS = HERE / "results"
VTP_ROWS = ("VTP (dims)", "VTP (dims, residual readers)", "VTP + heads")


def finetune(net: torch.nn.Module, train, test, args: argparse.Namespace) -> torch.nn.Module:
    if args.finetune_epochs:
        train_classifier(net, train, test, epochs=args.finetune_epochs, lr=args.lr, optimizer="adamw",
                         weight_decay=0.05)
    return net.eval()


HEAD_RATIOS = (0.25, 0.5, 0.75)  # whole-head rows: the fewest heads removed (per block) that reach the budget


def _bisect(build: Callable[[float], torch.nn.Module], x1: torch.Tensor, budget: float) -> Tuple[Any, float]:
    """The smallest ratio in [0, 0.95] whose network keeps <= budget MACs (None if even 0.95 does not)."""
    net, ratio, _ = smallest_ratio_under(build, lambda m: amc.count(m, x1)[0], budget)
    return net, ratio


def tp_prune(model: torch.nn.Module, x1: torch.Tensor, target: float, heads: bool) -> Tuple[torch.nn.Module, Dict[str, float]]:
    """Torch-Pruning 1.6.1 the way its timm ViT example does (num_heads of every qkv, classifier ignored):
    head dims, or whole heads (head_pruning_ratio, the fewest of HEAD_RATIOS that reaches the budget);
    pruning_ratio bisected so MACs <= target."""
    import torch_pruning as tp

    base = amc.count(model, x1)[0]

    def build(ratio: float, head_ratio: float) -> torch.nn.Module:
        m = copy.deepcopy(model)
        qkvs = {blk.attn.qkv: blk.attn.heads for blk in m.blocks}
        pruner = tp.pruner.MetaPruner(m, x1, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=[m.head], num_heads=qkvs,
                                      prune_num_heads=heads, prune_head_dims=not heads,
                                      head_pruning_ratio=head_ratio)
        pruner.step()
        for blk in m.blocks:  # the example's attribute update: heads now counted by the pruner
            blk.attn.heads = pruner.num_heads[blk.attn.qkv]
        return m.eval()

    for hr in (HEAD_RATIOS if heads else (0.0,)):
        m, ratio = _bisect(lambda r: build(r, hr), x1, target * base)
        if m is not None:
            return m, {"tp_pruning_ratio": ratio, "head_ratio": hr}
    raise RuntimeError(f"Torch-Pruning cannot reach {target} of the MACs")


def amc_l2(graph, x1: torch.Tensor, target: float, heads: bool, round_to: int = 1) -> Tuple[torch.nn.Module, Dict[str, float]]:
    """amc.prune's L2 plan at `target` MACs: head dims and every other group at one ratio, or whole heads
    at the fewest of HEAD_RATIOS that reaches the budget and the other groups' ratio bisected."""
    from amc.compressors import plan_pruning

    plan = plan_pruning(graph, "l2", (x1,), heads=heads, round_to=round_to)
    base = amc.count(graph, x1)[0]
    if not heads:
        return amc.prune(graph, target_macs=target, example_inputs=(x1,), round_to=round_to), {}
    head_groups = {g.id for g in plan.groups if any(p.endswith("attn.qkv") for p in g.producers)}
    for hr in HEAD_RATIOS:
        def build(r: float) -> torch.nn.Module:
            ratios = {p: (hr if g.id in head_groups else r) for g in plan.groups for p in g.producers}
            return plan.apply(ratios)
        m, ratio = _bisect(build, x1, target * base)
        if m is not None:
            return m, {"ratio": ratio, "head_ratio": hr}
    raise RuntimeError(f"amc.prune(heads=True) cannot reach {target} of the MACs")


def vit_b16_check() -> Dict[str, Any]:
    """torchvision vit_b_16 (random weights, 224 px): gates inserted, pruned to 0.5x MACs (no training),
    run at batch 1 and 3, JSON round trip."""
    import tempfile

    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    x = torch.randn(3, 3, 224, 224)
    loader = DataLoader(TensorDataset(x, torch.zeros(3, dtype=torch.long)), batch_size=3)
    t = time.perf_counter()
    c = VTP(model, loader, target_macs=0.5, epochs=0, finetune_epochs=0, example_inputs=(x[:1],))
    net = c.compress()
    secs = time.perf_counter() - t
    with torch.no_grad():
        out1, out3 = net(x[:1]), net(x)
        path = net.save_to_json(os.path.join(tempfile.mkdtemp(), "vit_b16_vtp.json"))
        same = bool(torch.equal(amc.ReconstructedNetwork.load_from_json(path)(x), out3))
    return {"gates": len(c.gate_pairs), "macs_ratio": amc.count(net, x[:1])[0] / amc.count(model, x[:1])[0],
            "out_b1": list(out1.shape), "out_b3": list(out3.shape), "json_round_trip_equal": same,
            "seconds": secs}


def vit_b16_latency(reps: int, budgets, round_to: int) -> Dict[str, Any]:
    """Batch-1 latency of VTP on torchvision vit_b_16 (random weights, untrained gates, 224 px, 1 thread), plain
    and after `amc.fuse_attention`: a ViT whose blocks cost MACs at batch 1, where the 25-MMAC vit_fashion
    is per-op overhead. Weights do not change CPU time; the pruned shapes are the budgets'."""
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torchvision.models.vit_b_16().eval()
    x = torch.randn(3, 3, 224, 224)
    x1 = x[:1]
    loader = DataLoader(TensorDataset(x, torch.zeros(3, dtype=torch.long)), batch_size=3)
    base = amc.count(model, x1)[0]
    nets: Dict[str, Any] = {"unpruned": amc.trace(model, x1)}
    ratio = {"unpruned": 1.0}
    for b in budgets:
        for heads, label in ((False, "VTP (dims)"), (True, "VTP + heads")):
            net = VTP(model, loader, target_macs=b, epochs=0, finetune_epochs=0, heads=heads, round_to=round_to,
                      example_inputs=(x1,)).compress()
            nets[f"{b}|{label}"], ratio[f"{b}|{label}"] = net, amc.count(net, x1)[0] / base
    nets.update({f"{k}|fused": amc.fuse_attention(n, x1) for k, n in list(nets.items())})
    load_before = os.getloadavg()
    rows = {k: {"net": k.removesuffix("|fused"), "fused": k.endswith("|fused"), "macs": ratio[k.removesuffix("|fused")]}
            for k in nets}
    for batch, n_reps in ((1, reps), (8, max(3, reps // 3))):
        xb = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            times = interleaved({k: (lambda n=n: n(xb)) for k, n in nets.items()}, reps=n_reps, warmup=1)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, m in med.items():
            ref = med["unpruned|fused" if rows[k]["fused"] else "unpruned"]
            rows[k].update({f"ms_b{batch}": 1e3 * m, f"speedup_b{batch}": ref / m,
                            f"efficiency_b{batch}": ref / m * rows[k]["macs"], f"reps_b{batch}": n_reps})
    return {"rows": list(rows.values()), "reps": reps, "round_to": round_to, "load_before": load_before,
            "load_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}


def macs(net, x1, base) -> float:
    return amc.count(net, x1)[0] / base


def run(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    model, info = fashion_originals.original("vit_fashion", train_limit=args.orig_train_limit)
    train, _ = fashion_originals.loaders(args.train_limit, seed=0)
    _, test = fashion_originals.loaders(None, seed=0)
    x1 = next(iter(test))[0][:1]
    base = amc.count(model, x1)[0]
    graph = amc.trace(model, x1)
    res: Dict[str, Any] = {"original_acc": float(evaluate(model, test)["acc"]), "base_macs": base, "rows": [],
                           "original_info": {k: info.get(k) for k in ("test_acc", "epochs", "lr", "train_seconds")},
                           "args": vars(args)}
    nets: Dict[str, Any] = {"unpruned": graph, "unpruned eager": model}  # TP's nets are eager modules
    ctrl = finetune(copy.deepcopy(model), train, test, args)
    res["finetuned_control_acc"] = float(evaluate(ctrl, test)["acc"])
    print(f"original {res['original_acc']:.4f}; fine-tuned unpruned {res['finetuned_control_acc']:.4f}", flush=True)

    # one sparsity-training run, shared by every budget and both VTP rows
    proto = VTP(model, train, test, target_macs=0.5, sparsity=args.sparsity, epochs=0, finetune_epochs=0,
                lr=args.lr, gate_lr=args.gate_lr, example_inputs=(x1,))
    t = time.perf_counter()
    trained = proto.gated.copy()
    history = train_gates(trained, train, args.sparsity_epochs, args.lr, args.sparsity, "cpu", args.gate_lr)
    res["sparsity_training"] = {"seconds": time.perf_counter() - t, "loss": history,
                                "gated_acc": float(evaluate(trained, test)["acc"])}
    print("sparsity training", res["sparsity_training"], flush=True)

    def record(budget: float, method: str, net, extra: Dict[str, Any] | None = None) -> None:
        row = {"budget": budget, "method": method, "acc": float(evaluate(net, test)["acc"]),
               "macs": macs(net, x1, base), "params": sum(p.numel() for p in net.parameters()), **(extra or {})}
        res["rows"].append(row)
        nets[f"{budget}|{method}"] = net
        print(row, flush=True)

    def vtp(budget: float, heads: bool, residual: str = "stream"):
        c = VTP(model, train, test, target_macs=budget, sparsity=args.sparsity, epochs=0,
                finetune_epochs=args.finetune_epochs, lr=args.lr, heads=heads, residual=residual,
                round_to=args.round_to, example_inputs=(x1,))
        c.gated = trained.copy()  # the shared sparsity-trained gates
        return c.compress(), c.zeta

    for b in args.budgets:
        for heads, residual, label in ((False, "stream", "VTP (dims)"), (False, "readers", "VTP (dims, residual readers)"),
                                       (True, "stream", "VTP + heads")):
            t = time.perf_counter()
            net, zeta = vtp(b, heads, residual)
            record(b, label, net, {"zeta": zeta, "seconds": time.perf_counter() - t})
        for fn, src, heads, label in ((amc_l2, graph, False, "amc.prune L2 (dims)"),
                                      (amc_l2, graph, True, "amc.prune L2, whole heads"),
                                      (tp_prune, model, False, "Torch-Pruning 1.6.1 (head dims)"),
                                      (tp_prune, model, True, "Torch-Pruning 1.6.1 (whole heads)")):
            try:
                m, extra = fn(src, x1, b, heads)
            except Exception as exc:  # noqa: BLE001 - a failure is a result, not a crash
                res["rows"].append({"budget": b, "method": label, "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(res["rows"][-1], flush=True)
                continue
            record(b, label, finetune(m, train, test, args), extra)
        if b / 0.8 < 1.0:
            net, zeta = vtp(b / 0.8, False)
            tok = TokenPruning(net, train, test, target_macs=min(1.0, b / macs(net, x1, base)), epochs=0,
                               score="tome", example_inputs=(x1,)).compress()
            record(b, "VTP + tokens (ToMe, no training)", tok, {"zeta": zeta, "vtp_macs": macs(net, x1, base)})
        write(res, args)
    if args.save_nets:
        save_nets(nets, args.save_nets)
    if not args.skip_latency:
        add_latency(res, nets, test, x1, args)
    if args.vit_b16:
        res["vit_b16"] = vit_b16_check()
        print("vit_b_16", res["vit_b16"], flush=True)
    return res


def add_rounded_l2(args: argparse.Namespace) -> Dict[str, Any]:
    """Add "amc.prune L2 (dims), round_to N" rows to a finished run (its JSON and `--save-nets` folder):
    the uniform ratio with kept sizes in multiples of N, the rounding slack won back, fine-tuned alike;
    so the speed columns can tell rounding from VTP's allocation."""
    res = json.loads(Path(args.out + ".json").read_text())
    torch.set_num_threads(args.threads)
    model, _ = fashion_originals.original("vit_fashion", train_limit=res["args"].get("orig_train_limit"))
    run_args = argparse.Namespace(**{**res["args"], "out": args.out})
    train, _ = fashion_originals.loaders(run_args.train_limit, seed=0)
    _, test = fashion_originals.loaders(None, seed=0)
    x1 = next(iter(test))[0][:1]
    graph, base = amc.trace(model, x1), res["base_macs"]
    nets = load_nets(args.save_nets) if args.save_nets and Path(args.save_nets, "index.json").exists() else {}
    label = f"amc.prune L2 (dims), round_to {args.add_l2_round_to}"
    res["rows"] = [r for r in res["rows"] if r["method"] != label]
    for b in run_args.budgets:
        net = amc.prune(graph, target_macs=b, example_inputs=(x1,), round_to=args.add_l2_round_to)
        net = finetune(net, train, test, run_args)
        row = {"budget": b, "method": label, "acc": float(evaluate(net, test)["acc"]), "macs": macs(net, x1, base),
               "params": sum(p.numel() for p in net.parameters())}
        at = max(i for i, r in enumerate(res["rows"]) if r["budget"] == b and r["method"].startswith("amc.prune")) + 1
        res["rows"].insert(at, row)
        nets[f"{b}|{label}"] = net
        print(row, flush=True)
    if args.save_nets:
        save_nets(nets, args.save_nets)
    return res


MAC_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
           "aten::_convolution", "aten::convolution")


def time_split(net: torch.nn.Module, x: torch.Tensor, reps: int = 5) -> Dict[str, float]:
    """Milliseconds per forward in MAC-carrying ops and in every other op (self CPU time, torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        net(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                net(x)
    mac = other = 0.0
    for ev in prof.key_averages():
        if ev.key.startswith("aten::"):
            if ev.key in MAC_OPS:
                mac += ev.self_cpu_time_total
            else:
                other += ev.self_cpu_time_total
    return {"mac_ms": mac / reps / 1000, "other_ms": other / reps / 1000}


def latency_from(args: argparse.Namespace) -> Dict[str, Any]:
    """Time the networks a previous `--save-nets` run wrote (on a quiet machine), into its result JSON."""
    res = json.loads(Path(args.out + ".json").read_text())
    nets = load_nets(args.latency_from)
    _, test = fashion_originals.loaders(None, seed=0)
    x1 = next(iter(test))[0][:1]
    if args.fuse_attention:  # every network, Torch-Pruning's eager modules traced first: the same runtime for all
        nets, res["fused_attention"] = fuse_all(nets, x1)
        for k in ("unpruned_split_b64", "unpruned_split_b1"):
            res.pop(k, None)
        for row in res["rows"]:
            row.pop("split_b64", None)
    add_latency(res, nets, test, x1, args)
    res["latency_threads"] = args.threads
    return res


def add_latency(res: Dict[str, Any], nets: Dict[str, Any], test, x1, args: argparse.Namespace) -> None:
    """Interleaved batch-1 and batch-64 medians, speedups against the unpruned graph (same per-op overhead)."""
    torch.set_num_threads(args.threads)
    res["load_before"] = os.getloadavg()
    x64 = next(iter(test))[0][:64]
    out: Dict[str, Dict[str, float]] = {k: {} for k in nets}
    with torch.no_grad():
        for label, x, reps in (("b1", x1, args.reps1), ("b64", x64, args.reps64)):
            times = interleaved({k: (lambda n=n, x=x: n(x)) for k, n in nets.items()}, reps=reps, warmup=2)
            for k, v in times.items():
                out[k][label] = statistics.median(v)
    if getattr(args, "onnxruntime", False):  # the exported files, where per-op overhead is microseconds
        with tempfile.TemporaryDirectory() as folder:
            runners = ort_runners(nets, x1, folder)
            ort = {k: {} for k in runners}
            for label, x, reps in (("b1", x1, args.reps1), ("b64", x64, args.reps64)):
                times = interleaved({k: (lambda r=r, x=x: r(x)) for k, r in runners.items()}, reps=reps, warmup=2)
                for k, v in times.items():
                    ort[k][label] = statistics.median(v)
        res["ort_unpruned_ms"] = {k: 1000 * v for k, v in ort["unpruned"].items()}
        res["ort_version"] = ort_version()
    res["load_after"] = os.getloadavg()
    fused = "fused_attention" in res  # the split's "MAC ops" would hold the softmax too: not computed
    split = {} if fused else {k: time_split(n, x64) for k, n in nets.items()}
    res["unpruned_ms"] = {k: 1000 * v for k, v in out["unpruned"].items()}
    if not fused:
        res["unpruned_split_b64"] = split["unpruned"]
        res["unpruned_split_b1"] = time_split(nets["unpruned"], x1, reps=50)
    res["graph_vs_eager"] = {lab: out["unpruned"][lab] / out["unpruned eager"][lab] for lab in ("b1", "b64")}
    for row in res["rows"]:
        key = f"{row['budget']}|{row['method']}"
        if key in out:
            ref = out["unpruned eager" if row["method"].startswith("Torch-Pruning") else "unpruned"]
            for lab in ("b1", "b64"):
                row[f"speedup_{lab}"] = ref[lab] / out[key][lab]
                row[f"efficiency_{lab}"] = row[f"speedup_{lab}"] * row["macs"]
                if getattr(args, "onnxruntime", False):
                    ref_ort = ort["unpruned eager" if row["method"].startswith("Torch-Pruning") else "unpruned"]
                    row[f"ort_speedup_{lab}"] = ref_ort[lab] / ort[key][lab]
                    row[f"ort_efficiency_{lab}"] = row[f"ort_speedup_{lab}"] * row["macs"]
            if fused:
                continue
            ref_split = split["unpruned eager" if row["method"].startswith("Torch-Pruning") else "unpruned"]
            row["split_b64"] = split[key]
            row["mac_op_speedup_b64"] = ref_split["mac_ms"] / split[key]["mac_ms"]


def render(res: Dict[str, Any]) -> str:
    a = res["args"]
    lines = ["# ViT dimension and head pruning on the Fashion-MNIST ViT (issue 15)", "",
             f"Generated by `python scripts/bench_vit_dims.py --train-limit {a['train_limit']} --finetune-epochs "
             f"{a['finetune_epochs']} --sparsity-epochs {a['sparsity_epochs']} --round-to {a.get('round_to', 1)}` on {res.setdefault('generated', time.strftime('%Y-%m-%d %H:%M'))}; torch "
             f"{torch.__version__}, {platform.machine()} CPU, {a['threads']} thread(s). Original `vit_fashion` (trained "
             f"{res['original_info'].get('epochs')} epochs on {a.get('orig_train_limit') or 60000:,} images): "
             f"{100 * res['original_acc']:.2f}% on the 10,000 test images, {res['base_macs'] / 1e6:.1f} MMACs per image; "
             f"the same fine-tuning without pruning: {100 * res['finetuned_control_acc']:.2f}%.", "",
             f"Every row: {a['finetune_epochs']} fine-tuning epoch(s) (AdamW, lr {a['lr']}) on {a['train_limit']:,} "
             f"training images. VTP: one sparsity-training run ({a['sparsity_epochs']} epoch(s), L1 {a['sparsity']}, "
             f"gate lr {a['gate_lr']}, {res['sparsity_training']['seconds']:.0f} s; gated network "
             f"{100 * res['sparsity_training']['gated_acc']:.2f}%) shared by every budget.", ""]
    lat = "unpruned_ms" in res
    if lat:
        lo = res["load_before"][0], res["load_after"][0]
        lines += [f"Latency: unpruned graph {res['unpruned_ms']['b1']:.2f} ms at batch 1, {res['unpruned_ms']['b64']:.1f} ms "
                  f"at batch 64; speedup = unpruned / pruned, efficiency = speedup x MACs ratio (1.0 = as fast "
                  f"as the MACs promise). 1-minute load average {lo[0]:.2f} before, {lo[1]:.2f} after.", ""]
        if "unpruned_split_b64" in res:
            sp = res["unpruned_split_b64"]
            tot = sp["mac_ms"] + sp["other_ms"]
            lines += [f"Latency timed at {res.get('latency_threads', a['threads'])} thread(s). Profile of the unpruned "
                      f"graph at batch 64: {sp['mac_ms']:.1f} ms per forward in ops that carry MACs, {sp['other_ms']:.1f} ms "
                      f"({100 * sp['other_ms'] / tot:.0f}%) in the rest (softmax over 50x50 scores per head, LayerNorm, GELU, "
                      f"copies, adds), which shrinks less than the MACs (the softmax only with whole heads). Had the rest "
                      f"stayed as it is and the MAC ops sped up exactly as the MACs, a network at m x the MACs would reach "
                      f"efficiency m / ({sp['other_ms'] / tot:.2f} + {sp['mac_ms'] / tot:.2f} m): "
                      + ", ".join(f"{m / (sp['other_ms'] / tot + sp['mac_ms'] / tot * m):.2f} at {m}x"
                                  for m in a["budgets"]) + ". Columns \"MAC ops b64\": the MAC-carrying ops' own "
                      "speedup (ideal: 1 / MACs); \"other b64\": the pruned network's ms per forward in the rest (rows above "
                      "that efficiency shrank it: a narrower residual stream and MLP, fewer heads)."]
            if "unpruned_split_b1" in res:
                s1, wall = res["unpruned_split_b1"], res["unpruned_ms"]["b1"]
                rest = max(0.0, wall - s1["mac_ms"] - s1["other_ms"])
                fixed = (wall - s1["mac_ms"]) / wall
                bound = ", ".join(f"{m / (fixed + (1 - fixed) * m):.2f} at {m}x" for m in a["budgets"])
                lines[-1] += (f" At batch 1 the unpruned graph's {wall:.2f} ms are {s1['mac_ms']:.2f} ms of MAC ops, "
                              f"{s1['other_ms']:.2f} ms of other ops and {rest:.2f} ms outside them (Python, dispatch), "
                              f"so (the rest fixed) {bound}.")
            lines.append("")
        if res.get("fused_attention"):
            n = sorted(set(res["fused_attention"].values()))
            lines += [f"Every network timed after `amc.fuse_attention` (Torch-Pruning's eager modules traced first, so "
                      f"every row runs the same graph runtime against the same fused unpruned graph): "
                      f"{'/'.join(map(str, n))} attention site(s) per network became one "
                      f"`F.scaled_dot_product_attention` each; the MAC/other profile split is not computed (the fused "
                      f"kernel holds products and softmax together).", ""]
        gv = res.get("graph_vs_eager")
        if gv and "eager_note" not in res and not res.get("fused_attention"):
            lines += [f"amc's rows are ReconstructedNetworks timed against the unpruned graph; Torch-Pruning's are eager "
                      f"modules timed against the unpruned eager model (the graph runs {gv['b1']:.2f}x the eager time at "
                      f"batch 1, {gv['b64']:.2f}x at batch 64).", ""]
        if "eager_note" in res:
            lines += [res["eager_note"], ""]
    if res.get("note"):
        lines += [res["note"], ""]
    split = "unpruned_split_b64" in res
    ort = "ort_unpruned_ms" in res
    if ort:
        u = res["ort_unpruned_ms"]
        lines += [f"ORT columns: every network exported by `save_to_onnx` (Torch-Pruning's eager modules traced by amc "
                  f"first) and run by onnxruntime {res['ort_version']}, 1 intra-op thread, interleaved medians; unpruned "
                  f"{u['b1']:.2f} ms at batch 1, {u['b64']:.1f} ms at batch 64.", ""]
    head = ("| budget | method | MACs (x orig) | params | top-1 % |" + (" speedup b1 | eff. b1 | speedup b64 | eff. b64 |" if lat else "")
            + (" MAC ops b64 | other b64 |" if split else "")
            + (" ORT speedup b1 | ORT eff. b1 | ORT speedup b64 | ORT eff. b64 |" if ort else ""))
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['budget']:.2f} | {r['method']} | failed: {r['error'][:120]} |" + (" |" * (head.count("|") - 4)))
            continue
        line = f"| {r['budget']:.2f} | {r['method']} | {r['macs']:.3f} | {r['params'] / 1e6:.3f}M | {100 * r['acc']:.2f} |"
        if lat and "speedup_b1" in r:
            line += (f" {r['speedup_b1']:.2f}x | {r['efficiency_b1']:.2f} | {r['speedup_b64']:.2f}x | "
                     f"{r['efficiency_b64']:.2f} |")
        if split and "split_b64" in r:
            line += f" {r['mac_op_speedup_b64']:.2f}x | {r['split_b64']['other_ms']:.1f} ms |"
        if ort and "ort_speedup_b1" in r:
            line += (f" {r['ort_speedup_b1']:.2f}x | {r['ort_efficiency_b1']:.2f} | {r['ort_speedup_b64']:.2f}x | "
                     f"{r['ort_efficiency_b64']:.2f} |")
        lines.append(line)
    if "vit_b16" in res:
        v = res["vit_b16"]
        lines += ["", f"torchvision `vit_b_16` (random weights, 224 px): {v['gates']} gates inserted, pruned to "
                      f"{v['macs_ratio']:.3f}x MACs in {v['seconds']:.0f} s, output {v['out_b1']} at batch 1 and "
                      f"{v['out_b3']} at batch 3, JSON round trip equal: {v['json_round_trip_equal']}."]
    if "vit_b16_latency" in res:
        v = res["vit_b16_latency"]
        lines += ["", "### torchvision `vit_b_16` at batch 1 (random weights, untrained gates, 224 px)", "",
                  f"`--vit-b16-latency {v['reps']}` on {v['date']}: VTP (round_to {v['round_to']}) at each budget, plain "
                  f"and after `amc.fuse_attention` (each against the unpruned graph of the same kind), 1 torch thread, "
                  f"interleaved medians of {v['reps']} runs at batch 1 and {v['rows'][0].get('reps_b8', '-')} at batch 8, "
                  f"nothing else running; load average {v['load_before'][0]:.2f} before, {v['load_after'][0]:.2f} after. "
                  f"At 17.6 GMACs per image a batch-1 forward is compute, not per-op overhead.", "",
                  "| network | attention | MACs (x orig) | ms b1 | speedup b1 | eff. b1 | ms b8 | speedup b8 | eff. b8 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in v["rows"]:
            b8 = (f" {r['ms_b8']:.0f} | {r['speedup_b8']:.2f}x | {r['efficiency_b8']:.2f} |" if "ms_b8" in r else " | | |")
            lines.append(f"| {r['net'].replace('|', ' ')} | {'fused (SDPA)' if r['fused'] else 'plain'} | {r['macs']:.3f} | "
                         f"{r['ms_b1']:.0f} | {r['speedup_b1']:.2f}x | {r['efficiency_b1']:.2f} |" + b8)
    return "\n".join(lines) + "\n"


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def plot(res: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({r["method"] for r in res["rows"] if "error" not in r}, key=lambda m: (m not in VTP_ROWS, m))
    for m in methods:
        rows = sorted((r for r in res["rows"] if r["method"] == m and "error" not in r), key=lambda r: r["macs"])
        ax.plot([r["macs"] for r in rows], [100 * r["acc"] for r in rows], "o-", label=m, lw=2 if m in VTP_ROWS else 1)
    ax.axhline(100 * res["original_acc"], color="grey", ls="--", lw=1, label="unpruned")
    ax.set_xlabel("MACs (fraction of the original)")
    ax.set_ylabel("top-1 % (Fashion-MNIST test)")
    ax.set_title("vit_fashion: dims and heads")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def write(res: Dict[str, Any], args: argparse.Namespace) -> None:
    write_atomic(args.out + ".json", json.dumps(res, indent=1, default=str))
    write_atomic(args.out + ".md", render(res))
    if any("error" not in r for r in res["rows"]):
        plot(res, Path(args.out + ".png"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.6, 0.4])
    ap.add_argument("--train-limit", type=int, default=20000, help="training images for VTP and fine-tuning")
    ap.add_argument("--orig-train-limit", type=int, default=None,
                    help="training images of the original (default: all 60,000, as the token benchmark)")
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--sparsity-epochs", type=int, default=1)
    ap.add_argument("--sparsity", type=float, default=1e-4)
    ap.add_argument("--gate-lr", type=float, default=1e-2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--round-to", type=int, default=8,
                    help="VTP rows keep multiples of it (fast GEMM sizes); the uniform-ratio rows do not: one ratio "
                         "rounded to 8 jumps past the budget (0.75 -> 0.59x MACs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps1", type=int, default=30)
    ap.add_argument("--reps64", type=int, default=10)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--vit-b16", action="store_true", help="also the torchvision vit_b_16 (random weights) check")
    ap.add_argument("--out", default=str(RESULTS / "vit_dims"))
    ap.add_argument("--render", action="store_true", help="only rewrite the .md/.png from the existing .json")
    ap.add_argument("--save-nets", default=None, help="also save every network into this folder")
    ap.add_argument("--latency-from", default=None, help="only time the networks saved by --save-nets")
    ap.add_argument("--fuse-attention", action="store_true",
                    help="with --latency-from: time every network after amc.fuse_attention (write to another --out)")
    ap.add_argument("--onnxruntime", action="store_true",
                    help="with --latency-from: also time every network exported to ONNX in onnxruntime (1 thread)")
    ap.add_argument("--vit-b16-latency", type=int, default=0, metavar="REPS",
                    help="only time VTP on torchvision vit_b_16 at batch 1 (REPS runs each) into the existing --out")
    ap.add_argument("--add-l2-round-to", type=int, default=0,
                    help="add amc.prune L2 rows rounded to this multiple to the existing result (and --save-nets)")
    args = ap.parse_args(argv)
    if args.add_l2_round_to:
        res = add_rounded_l2(args)
        write(res, argparse.Namespace(**{**res["args"], "out": args.out}))
        return 0
    if args.vit_b16_latency:
        res = json.loads(Path(args.out + ".json").read_text())
        res["vit_b16_latency"] = vit_b16_latency(args.vit_b16_latency, res["args"]["budgets"],
                                                 res["args"].get("round_to", 8))
        write(res, argparse.Namespace(**{**res["args"], "out": args.out}))
        return 0
    if args.latency_from:
        res = latency_from(args)
        write(res, argparse.Namespace(**{**res["args"], "out": args.out}))
        return 0
    if args.render:
        res = json.loads(Path(args.out + ".json").read_text())
        write(res, argparse.Namespace(**{**res["args"], "out": args.out}))
        return 0
    res = run(args)
    write(res, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
