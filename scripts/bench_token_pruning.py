"""Token pruning on the Fashion-MNIST ViT (issue 14): APT (seed 000) against training-free baselines.

    python scripts/bench_token_pruning.py                       # accuracy + MACs (+ latency unless --skip-latency)
    python scripts/bench_token_pruning.py --vit-b16             # + torchvision vit_b_16 (random weights) check
    python scripts/bench_token_pruning.py --skip-latency --save-nets /tmp/tok   # accuracy now, then on a quiet
    python scripts/bench_token_pruning.py --latency-from /tmp/tok               #   machine: the latency columns

The original is `vit_fashion` (49 patch tokens + CLS, width 96, 6 blocks), trained by
scripts/fashion_originals.py and cached. At each MACs budget (fraction of the original's MACs, agents
included, counted by amc.count at batch 1):
  - APT batched: TokenPruning(target_macs=b, epochs=E) on `--train-limit` training images; per layer the
    top-k tokens by agent score;
  - APT dynamic: the same network, per image (batch 1) the tokens whose keep-probability passes the
    calibrated threshold; MACs = mean over the test images actually run;
  - APT not pruning at inference (the seed's "APT (no pruning)"), and the unpruned ViT fine-tuned the same
    epochs without agents (the control for "joint training helps");
  - training-free, same places, same token counts: CLS attention top-k (EViT's rule), token norm,
    random, ToMe-style bipartite merging.
Accuracy on the official 10,000-image test set. Latency: interleaved medians at batch 1 and 64.

Writes scripts/results/token_pruning.{md,json,png}.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import amc  # noqa: E402
from amc.compressors import TokenPruning  # noqa: E402
from amc.compressors.tokens import TokenAgent, agents_of, dynamic_macs, set_mode  # noqa: E402
from amc.models import evaluate, train_classifier  # noqa: E402
from _isolate import write_atomic  # noqa: E402
from _ort import ort_runners  # noqa: E402
from _saved_nets import fuse_all, load_nets, save_nets  # noqa: E402
from bench_speed import interleaved  # noqa: E402
import fashion_originals  # noqa: E402

RESULTS = HERE / "results"
BASELINES = [("CLS attention top-k (EViT rule)", "cls_attention", "none"),
             ("CLS attention + fusion (EViT)", "cls_attention", "one"), ("ToMe merging", "tome", "none"),
             ("token norm top-k", "norm", "none"), ("random tokens", "random", "none"),
             ("random tokens + merge", "random", "merge")]
FREE = {label for label, _, _ in BASELINES}
ORACLE = "ceiling: first k tokens, no scoring"


class FirstTokens(torch.nn.Module):
    """Keeps CLS and the next `keep` tokens: a slice, no scoring and no selection. Timed in place of APT's
    agents, it is the speed any token pruner with APT's kept counts could at best reach on this runtime."""

    def __init__(self, keep: int):
        super().__init__()
        self.keep = int(keep)

    def forward(self, x: torch.Tensor, attn: Any = None) -> torch.Tensor:
        return x[:, :self.keep + 1]


def ceiling_net(net: Any) -> Any:
    """A copy of an APT network whose agents are FirstTokens with the same kept counts."""
    out = copy.deepcopy(net)
    for node in out.layer_nodes:
        agent = out.network[node.module]
        if isinstance(agent, TokenAgent):
            out.network[node.module] = FirstTokens(agent.keep)
    out.recompile()
    return out


def add_ceilings(res: Dict[str, Any], nets: Dict[str, Any], x1) -> None:
    """One ceiling network (and row, accuracy not measured) per budget with an APT batched network."""
    for b in res["args"]["budgets"]:
        apt = nets.get(f"{b}|APT batched")
        if apt is None:
            continue
        net = nets[f"{b}|{ORACLE}"] = ceiling_net(apt)
        if not any(r["budget"] == b and r["method"] == ORACLE for r in res["rows"]):
            at = max(i for i, r in enumerate(res["rows"]) if r["budget"] == b) + 1
            res["rows"].insert(at, {"budget": b, "method": ORACLE, "acc": None, "keep": [m.keep for m in
                                    net.network.values() if isinstance(m, FirstTokens)],
                                    "macs": amc.count(net, x1)[0] / res["base_macs"]})


def acc_batch1(net, test, limit: int) -> float:
    """Top-1 accuracy with every image run alone (dynamic mode's lengths differ per image)."""
    hits = seen = 0
    with torch.no_grad():
        for x, y in test:
            for i in range(x.shape[0]):
                hits += int(net(x[i:i + 1]).argmax(1).item() == int(y[i]))
                seen += 1
                if seen >= limit:
                    return hits / seen
    return hits / seen


def latency(nets: Dict[str, Any], x64, reps1: int, reps64: int) -> Dict[str, Dict[str, float]]:
    """Interleaved medians at batch 64 and at batch 1, where every network runs the 64 images in turn (a
    dynamic network's length depends on the image: one image would time one length)."""
    out: Dict[str, Dict[str, float]] = {k: {} for k in nets}
    ones = [x64[i:i + 1] for i in range(x64.shape[0])]
    with torch.no_grad():
        for label, reps in (("b1", reps1), ("b64", reps64)):
            fns = {k: (lambda n=n: n(x64)) if label == "b64" else _cycling(n, ones) for k, n in nets.items()}
            for k, v in interleaved(fns, reps=reps, warmup=2).items():
                out[k][label] = statistics.median(v)
    return out


def _cycling(run, inputs):
    """A no-argument call that runs `run` on the next of `inputs` each time."""
    it = itertools.cycle(inputs)
    return lambda: run(next(it))


def vit_b16_check() -> Dict[str, Any]:
    """torchvision vit_b_16, random weights, 224 px: agents at the default layers, shapes, JSON round trip."""
    import tempfile

    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    x = torch.randn(2, 3, 224, 224)
    loader = DataLoader(TensorDataset(x, torch.zeros(2, dtype=torch.long)), batch_size=2)
    c = TokenPruning(model, loader, target_macs=0.6, epochs=0, example_inputs=(x[:1],))
    net = c.compress()
    seen: List[int] = []
    hooks = [a.register_forward_hook(lambda m, i, o: seen.append(int(o.shape[1]))) for a in agents_of(net)]
    with torch.no_grad():
        out = net(x)
        ref = model(x)
    for h in hooks:
        h.remove()
    with tempfile.TemporaryDirectory() as d:
        path = net.save_to_json(os.path.join(d, "vit_b16_tokens.json"))
        back = amc.ReconstructedNetwork.load_from_json(path)
        with torch.no_grad():
            same = bool(torch.equal(back(x), out))
    macs = amc.count(net, x[:1])[0] / amc.count(model, x[:1])[0]
    return {"layers": [b.output for b in c.chosen], "tokens_after_agents": seen[:len(c.keep)],
            "tokens_in": c.blocks[0].tokens, "out_shape": list(out.shape), "ref_shape": list(ref.shape),
            "macs_ratio": macs, "json_round_trip_equal": same}


def vit_b16_latency(reps: int) -> Dict[str, Any]:
    """Batch-1 latency of APT on torchvision vit_b_16 (random weights, untrained agents, thresholds calibrated
    on 8 random images, 224 px, 1 thread): a ViT whose blocks cost MACs, not per-op overhead as the 25-MMAC
    vit_fashion's do at batch 1. Weights do not change CPU time; the kept counts are the budget's."""
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torchvision.models.vit_b_16().eval()
    x = torch.randn(8, 3, 224, 224)
    loader = DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4)
    net = TokenPruning(model, loader, target_macs=0.6, epochs=0, example_inputs=(x[:1],)).compress()
    dyn = copy.deepcopy(net)
    set_mode(dyn, "dynamic")
    nets = {"unpruned": amc.trace(model, x[:1]), "APT batched": net, "APT dynamic": dyn}
    base = amc.count(model, x[:1])[0]
    macs = {"unpruned": 1.0, "APT batched": amc.count(net, x[:1])[0] / base,
            "APT dynamic": dynamic_macs(dyn, loader, limit=8) / base}
    load_before = os.getloadavg()
    with torch.no_grad():
        times = interleaved({k: (lambda n=n: n(x[:1])) for k, n in nets.items()}, reps=reps, warmup=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"ms_b1": {k: 1e3 * v for k, v in med.items()}, "macs": macs, "reps": reps,
            "speedup_b1": {k: med["unpruned"] / v for k, v in med.items()},
            "load_before": load_before, "load_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    model, info = fashion_originals.original("vit_fashion")
    train, test = fashion_originals.loaders(args.train_limit, seed=0)
    _, full_test = fashion_originals.loaders(None, seed=0)
    x1 = next(iter(full_test))[0][:1]
    base = amc.count(model, x1)[0]
    res: Dict[str, Any] = {"original_acc": float(evaluate(model, full_test)["acc"]), "base_macs": base,
                           "original_info": {k: info.get(k) for k in ("test_acc", "epochs", "lr", "train_seconds")},
                           "rows": [], "args": vars(args)}
    if not args.skip_control:
        ctrl = copy.deepcopy(model)
        t = time.perf_counter()
        train_classifier(ctrl, train, full_test, epochs=args.epochs, lr=args.lr, optimizer="adamw", weight_decay=0.05)
        res["finetuned_control_acc"] = float(evaluate(ctrl.eval(), full_test)["acc"])
        res["finetuned_control_seconds"] = time.perf_counter() - t
        print(f"original {res['original_acc']:.4f}, fine-tuned without agents {res['finetuned_control_acc']:.4f}",
              flush=True)
    nets: Dict[str, Any] = {"unpruned": amc.trace(model, x1)}  # graph vs graph: same per-op overhead
    for b in args.budgets:
        for label, score, fuse in BASELINES:
            net = TokenPruning(model, train, full_test, target_macs=b, epochs=0, score=score, fuse=fuse).compress()
            row = {"budget": b, "method": label, "acc": float(evaluate(net, full_test)["acc"]),
                   "macs": amc.count(net, x1)[0] / base, "keep": [a.keep for a in agents_of(net)]}
            res["rows"].append(row)
            nets[f"{b}|{label}"] = net
            print(row, flush=True)
        t = time.perf_counter()
        c = TokenPruning(model, train, full_test, target_macs=b, epochs=args.epochs, lr=args.lr,
                         agent_lr=args.agent_lr, fuse=args.fuse, distill=args.distill, samples=args.samples,
                         chain=args.chain)
        net = c.compress()
        secs = time.perf_counter() - t
        row = {"budget": b, "method": "APT batched", "acc": float(evaluate(net, full_test)["acc"]),
               "macs": amc.count(net, x1)[0] / base, "keep": list(c.keep), "train_seconds": secs,
               "history": c.train_history}
        res["rows"].append(row)
        print({k: v for k, v in row.items() if k != "history"}, flush=True)
        set_mode(net, "off")
        res["rows"].append({"budget": b, "method": "APT trained, not pruning", "acc":
                            float(evaluate(net, full_test)["acc"]), "macs": amc.count(net, x1)[0] / base})
        set_mode(net, "dynamic")
        res["rows"].append({"budget": b, "method": "APT dynamic (batch 1)",
                            "acc": acc_batch1(net, full_test, args.dynamic_limit),
                            "macs": dynamic_macs(net, full_test, args.dynamic_limit) / base,
                            "images": args.dynamic_limit})
        print(res["rows"][-2:], flush=True)
        dyn = copy.deepcopy(net)
        set_mode(net, "batched")
        nets[f"{b}|APT batched"] = net
        nets[f"{b}|APT dynamic (batch 1)"] = dyn
    if args.save_nets:
        save_nets(nets, args.save_nets)
    if not args.skip_latency:
        add_latency(res, nets, full_test, x1, args)
    if args.vit_b16:
        res["vit_b16"] = vit_b16_check()
    return res


def add_latency(res: Dict[str, Any], nets: Dict[str, Any], test, x1, args: argparse.Namespace) -> None:
    """Interleaved batch-1 and batch-64 medians of every network, speedups against the unpruned graph."""
    torch.set_num_threads(args.threads)
    res["load_before"] = os.getloadavg()
    x64 = next(iter(test))[0][:64]
    lat = latency(nets, x64, args.reps1, args.reps64)
    if getattr(args, "onnxruntime", False):
        with tempfile.TemporaryDirectory() as folder:
            ort_lat = latency(ort_runners(nets, x1, folder, check=lambda k: "random" not in k), x64,
                              args.reps1, args.reps64)
    res["load_after"] = os.getloadavg()
    for row in res["rows"]:
        key = f"{row['budget']}|{row['method']}"
        if key in lat:
            row["latency"] = lat[key]
            row["speedup"] = {k: lat["unpruned"][k] / v for k, v in lat[key].items()}
        if getattr(args, "onnxruntime", False) and key in ort_lat:
            row["ort_latency"] = ort_lat[key]
            row["ort_speedup"] = {k: ort_lat["unpruned"][k] / v for k, v in ort_lat[key].items()}
    res["unpruned_latency"] = lat["unpruned"]
    res["latency_threads"] = args.threads
    res["latency_b1"] = "the 64 images in turn"


def latency_from(args: argparse.Namespace) -> Dict[str, Any]:
    """Time the networks a previous `--save-nets` run wrote (on a quiet machine), into its result JSON."""
    res = json.loads(Path(args.out + ".json").read_text())
    nets = load_nets(args.latency_from)
    for k, n in nets.items():
        if k.endswith("APT dynamic (batch 1)"):
            set_mode(n, "dynamic")
    _, test = fashion_originals.loaders(None, seed=0)
    x1 = next(iter(test))[0][:1]
    if args.recheck:  # evaluation loads the machine: time in a later run
        recheck(res, nets, test, x1)
        return res
    if args.fuse_attention:  # sites whose probabilities an agent reads (EViT's rule) stay unfused, by design
        nets, res["fused_attention"] = fuse_all(nets, x1)
    if args.ceiling:
        add_ceilings(res, nets, x1)
    add_latency(res, nets, test, x1, args)
    return res


def recheck(res: Dict[str, Any], nets: Dict[str, Any], test, x1) -> None:
    """Accuracy and MACs of the saved networks under today's code (the agents' code may have changed since
    they were trained); rows take the new values and keep the old ones in `before_recheck`."""
    a = res["args"]
    for row in res["rows"]:
        net = nets.get(f"{row['budget']}|{row['method']}")
        if net is None:
            continue
        if row["method"].endswith("(batch 1)"):
            now = {"acc": acc_batch1(net, test, a["dynamic_limit"]),
                   "macs": dynamic_macs(net, test, a["dynamic_limit"]) / res["base_macs"]}
        else:
            now = {"acc": float(evaluate(net, test)["acc"]), "macs": amc.count(net, x1)[0] / res["base_macs"]}
        row.setdefault("before_recheck", {k: row[k] for k in now})
        row.update(now)
        print(row["budget"], row["method"], row["before_recheck"], now, flush=True)
    res["rechecked"] = time.strftime("%Y-%m-%d %H:%M")


def render(res: Dict[str, Any]) -> str:
    a = res["args"]
    flags = (f" --epochs {a['epochs']} --train-limit {a['train_limit']} --fuse {a.get('fuse', 'none')} --samples "
             f"{a.get('samples', 1)}" + (" --chain" if a.get("chain") else "") + (" --vit-b16" if a.get("vit_b16") else ""))
    if a.get("budgets"):  # always named: no second copy of the parser's default to compare with
        flags = " --budgets " + " ".join(str(b) for b in a["budgets"]) + flags
    if a.get("distill"):
        flags += f" --distill {a['distill']}"
    for flag in ("skip_latency", "skip_control"):
        if a.get(flag):
            flags += " --" + flag.replace("_", "-")
    lines = ["# Token pruning on the Fashion-MNIST ViT (issue 14)", "",
             f"Generated by `python scripts/bench_token_pruning.py{flags}` on {time.strftime('%Y-%m-%d %H:%M')}; torch "
             f"{torch.__version__}, {platform.machine()} CPU, {a['threads']} thread(s) for training. Original `vit_fashion`: "
             f"{100 * res['original_acc']:.2f}% on the 10,000 test images; {res['base_macs'] / 1e6:.1f} MMACs per image.",
             "",
             f"APT: {a['epochs']} epoch(s) on {a['train_limit'] or 60000} training images (three passes per batch, "
             f"AdamW lr {a['lr']}, agents Adam lr {a['agent_lr']}, fuse={a.get('fuse', 'none')!r}, distillation "
             f"weight {a.get('distill', 0.0)}, {a.get('samples', 1)} action(s) per image in pass 2"
             f"{', chained' if a.get('chain') else ''}). Training-free rows use the same agent places and "
             "token counts. MACs: amc.count at batch 1, agents included; dynamic: mean over the images run. "
             + (f"Control: the original fine-tuned {a['epochs']} epoch(s) the same way without agents: "
                f"{100 * res['finetuned_control_acc']:.2f}%." if "finetuned_control_acc" in res else
                "No control run (`--skip-control`)."), ""]
    if res.get("note"):
        lines += [f"Note: {res['note']}", ""]
    changed = [r for r in res["rows"] if "before_recheck" in r]
    if changed:
        def moved(rows) -> float:
            return max((abs(r["acc"] - r["before_recheck"]["acc"]) for r in rows), default=0.0)

        rand = [r for r in changed if r["method"].startswith("random")]
        dmacs = [r["macs"] / r["before_recheck"]["macs"] for r in changed if r["before_recheck"]["macs"]]
        lines += [f"Accuracy and MACs rechecked on {res.get('rechecked')} with the code of that day (`--latency-from "
                  f"DIR --recheck`): accuracy of the other rows moved by at most "
                  f"{100 * moved([r for r in changed if r not in rand]):.2f} points, the random-token rows (new "
                  f"draws) by up to {100 * moved(rand):.2f}; MACs by a factor {min(dmacs):.4f}-{max(dmacs):.4f}; the "
                  "table shows the rechecked values.", ""]
    has_lat = any("latency" in r for r in res["rows"])
    has_ort = any("ort_latency" in r for r in res["rows"])
    head = "| budget | method | accuracy | MACs | tokens kept per agent |"
    sep = "|---|---|---:|---:|---|"
    if has_lat:
        head += " b1 speedup | b64 speedup | b64 efficiency |"
        sep += "---:|---:|---:|"
        if has_ort:
            head += " ORT b1 | ORT b64 | ORT b64 efficiency |"
            sep += "---:|---:|---:|"
        lines.append(f"Latency: {res.get('latency_threads', a['threads'])} torch thread(s), nothing else running, "
                     f"interleaved medians, load average before {res['load_before']}, after "
                     f"{res['load_after']}; efficiency = speedup x MACs ratio (1.0 = as fast as the MACs promise)"
                     + (f"; batch 1 runs {res['latency_b1']}" if res.get("latency_b1") else "; batch 1 runs one image")
                     + ("; ORT: the network exported by `save_to_onnx` (dynamic batch axis) run by onnxruntime "
                        "with 1 thread, timed the same way." if has_ort else "."))
        lines.append("")
        if any(r["method"] == ORACLE for r in res["rows"]):
            lines += [f"Rows \"{ORACLE}\" (`--ceiling`): APT's batched network with every agent replaced by a slice "
                      "that keeps CLS and the next k tokens (APT's counts; no scorer, no selection, no merging): "
                      "the fastest any token pruner keeping these counts can run on this runtime: its speedup "
                      "caps the speedup of every row that keeps them.", ""]
        if res.get("fused_attention"):
            f = res["fused_attention"]
            lines += [f"Every network (the unpruned one included) timed after `amc.fuse_attention`: attention sites "
                      f"fused per network {min(f.values())}-{max(f.values())} of the 6 (a site whose probabilities an "
                      f"agent reads, as EViT's CLS-attention rule does, stays as it is).", ""]
    lines += [head, sep]
    for r in res["rows"]:
        acc = "not measured" if r["acc"] is None else f"{100 * r['acc']:.2f}"
        line = (f"| {r['budget']} | {r['method']} | {acc} | {r['macs']:.3f}x | "
                f"{r.get('keep', '')} |")
        if has_lat:
            s = r.get("speedup")
            line += (f" {s['b1']:.2f}x | {s['b64']:.2f}x | {s['b64'] * r['macs']:.2f} |" if s else " | | |")
        if has_ort:
            s = r.get("ort_speedup")
            line += (f" {s['b1']:.2f}x | {s['b64']:.2f}x | {s['b64'] * r['macs']:.2f} |" if s else " | | |")
        lines.append(line)
    lines += ["", "Reading:", ""]
    for b in a["budgets"]:
        rows = {r["method"]: r for r in res["rows"] if r["budget"] == b}
        apt = rows.get("APT batched")
        if not apt:
            continue
        free = {k: v for k, v in rows.items() if k in FREE}
        best = max(free.values(), key=lambda r: r["acc"])
        gap = 100 * (res["original_acc"] - apt["acc"])
        lines.append(f"- budget {b}: APT batched {100 * apt['acc']:.2f}% at {apt['macs']:.3f}x MACs "
                     f"(unpruned minus APT: {gap:+.2f} points); best training-free: {best['method']} "
                     f"{100 * best['acc']:.2f}% ({'APT above' if apt['acc'] > best['acc'] else 'APT NOT above'}).")
        cap, dyn = rows.get(ORACLE), rows.get("APT dynamic (batch 1)")
        if apt.get("speedup") and cap and cap.get("speedup"):
            lines.append("  " + _speed_line(apt, cap, dyn))
    if "vit_b16" in res:
        v = res["vit_b16"]
        lines += ["", "## torchvision vit_b_16 (random weights, 224 px)", "",
                  f"Agents after {v['layers']}; tokens {v['tokens_in']} -> {v['tokens_after_agents']} (CLS included); "
                  f"output {v['out_shape']} (unpruned {v['ref_shape']}); MACs {v['macs_ratio']:.3f}x at "
                  f"target 0.6; JSON round trip equal: {v['json_round_trip_equal']}."]
    if "vit_b16_latency" in res:
        v = res["vit_b16_latency"]
        lines += ["", f"Batch-1 latency on vit_b_16 (`--vit-b16-latency {v['reps']}`, {v['date']}; random weights, "
                  "untrained agents with thresholds calibrated on 8 random images, target 0.6, 1 thread, interleaved "
                  f"medians; load average before {v['load_before'][0]:.2f}, after {v['load_after'][0]:.2f}): "
                  + "; ".join(f"{k} {v['ms_b1'][k]:.0f} ms at {v['macs'][k]:.3f}x MACs ({v['speedup_b1'][k]:.2f}x)"
                              for k in v["ms_b1"]) + "."]
    return "\n".join(lines) + "\n"


def _speed_line(apt: Dict[str, Any], cap: Dict[str, Any], dyn: Any) -> str:
    """APT's speed at one budget beside the ceiling's (the Reading section)."""
    s, c = apt["speedup"], cap["speedup"]
    text = (f"Speed: APT batched at batch 64 {s['b64']:.2f}x, efficiency {s['b64'] * apt['macs']:.2f} (goal 0.9); "
            f"at batch 1 {s['b1']:.2f}x, efficiency {s['b1'] * apt['macs']:.2f}, where the ceiling runs "
            f"{c['b1']:.2f}x, efficiency {c['b1'] * cap['macs']:.2f}")
    if dyn and dyn.get("speedup"):
        text += f"; dynamic at batch 1 {dyn['speedup']['b1']:.2f}x"
    if apt.get("ort_speedup") and cap.get("ort_speedup"):
        ort = [f"batched {apt['ort_speedup']['b1']:.2f}x", f"ceiling {cap['ort_speedup']['b1']:.2f}x"]
        if dyn and dyn.get("ort_speedup"):
            ort.append(f"dynamic {dyn['ort_speedup']['b1']:.2f}x")
        text += f" (onnxruntime at batch 1: {', '.join(ort)})"
    return text + "."


def plot(res: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = dict.fromkeys(r["method"] for r in res["rows"]
                            if r["method"] != "APT trained, not pruning" and r["acc"] is not None)
    for m in methods:
        pts = sorted((r["macs"], 100 * r["acc"]) for r in res["rows"] if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.axhline(100 * res["original_acc"], color="k", ls="--", lw=1, label="unpruned")
    ax.set_xlabel("MACs (fraction of the unpruned ViT)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("vit_fashion token pruning")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.6, 0.45])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--agent-lr", type=float, default=1e-2)
    ap.add_argument("--train-limit", type=int, default=20000)
    ap.add_argument("--fuse", default="none", choices=["none", "one", "merge"],
                    help="what APT does with dropped tokens: discard, fuse into one (EViT), merge into the kept")
    ap.add_argument("--samples", type=int, default=4, help="APT actions per image in pass 2")
    ap.add_argument("--chain", action="store_true", help="pass 2: earlier agents prune as at inference")
    ap.add_argument("--distill", type=float, default=0.0, help="APT's pass-3 distillation weight")
    ap.add_argument("--dynamic-limit", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps1", type=int, default=30)
    ap.add_argument("--reps64", type=int, default=10)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-control", action="store_true",
                    help="no fine-tuning of the original without agents (when an earlier run with the same "
                         "--epochs/--train-limit/--lr has it)")
    ap.add_argument("--vit-b16", action="store_true")
    ap.add_argument("--vit-b16-latency", type=int, default=0, metavar="REPS",
                    help="only add batch-1 latency of APT on vit_b_16 (random weights, 1 thread) to the --out JSON")
    ap.add_argument("--save-nets", default=None, help="also save every network (pkl) into this folder")
    ap.add_argument("--latency-from", default=None, help="only time the networks saved by --save-nets")
    ap.add_argument("--fuse-attention", action="store_true",
                    help="with --latency-from: time every network after amc.fuse_attention (write to another --out)")
    ap.add_argument("--onnxruntime", action="store_true",
                    help="with --latency-from: also time every network exported to ONNX in onnxruntime (1 thread)")
    ap.add_argument("--ceiling", action="store_true",
                    help=f"with --latency-from: also time '{ORACLE}' at each budget: APT's network with its agents "
                         "replaced by a slice to the same counts (the best any token pruner could run at)")
    ap.add_argument("--recheck", action="store_true",
                    help="with --latency-from: only re-measure accuracy and MACs of the saved networks (no timing: "
                         "run --latency-from again, without it, on the quiet machine)")
    ap.add_argument("--out", default=str(RESULTS / "token_pruning"))
    ap.add_argument("--render", action="store_true", help="only rewrite the .md/.png from the existing .json")
    args = ap.parse_args(argv)
    if args.render or args.vit_b16_latency:
        res = json.loads(Path(args.out + ".json").read_text())
        if args.vit_b16_latency:
            res["vit_b16_latency"] = vit_b16_latency(args.vit_b16_latency)
    else:
        res = latency_from(args) if args.latency_from else run(args)
    write_atomic(args.out + ".json", json.dumps(res, indent=1, default=str))
    write_atomic(args.out + ".md", render(res))
    plot(res, Path(args.out + ".png"))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
