"""Does a proxy on more held-out batches rank the tuners' picks better? (issue 13)

    python scripts/bench_tuner_proxy_size.py            # all 8 rows of the tuner headroom tables (~25 min)
    python scripts/bench_tuner_proxy_size.py --render-only

The searches of `bench_tuners.py` score a policy by its accuracy on 8 training batches (1,024 images)
after BN re-estimation on 4 others. `bench_tuner_headroom.py` fine-tuned every committed pick with 5 data
orders. This script re-scores those same policies (the uniform one, every pick, and where the row has them
the 24 random policies fine-tuned once) with the proxy on 8, 32 and 64 held-out batches, accuracy or
cross-entropy, BN re-estimated on 4 or 16 batches, and reports the Spearman correlation of each with
the fine-tuned accuracy. The picks are the policies a search has to tell apart at the end: all good, close
to each other. Nothing here reads the test set except through the committed fine-tuned numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_tuner_headroom as bh  # noqa: E402  (its tables hold the policies and their fine-tuned accuracy)
import bench_tuners as bt  # noqa: E402  (the benchmark's originals and loaders)

from amc.export.atomic import atomic_write  # noqa: E402
from amc.trainers import recalibrate_bn  # noqa: E402
from amc.tuners import build_space  # noqa: E402
from amc.tuners.evaluation import take_batches  # noqa: E402

RESULTS = HERE / "results"
OUT = RESULTS / "tuner_proxy_size"
ROWS = [("vgg_small", 0.5, "prune"), ("vgg_small", 0.3, "prune"), ("resnet20", 0.5, "prune"),
        ("resnet20", 0.3, "prune"), ("vgg_small", 0.5, "channel"), ("vgg_small", 0.3, "channel"),
        ("resnet20", 0.5, "channel"), ("resnet20", 0.3, "channel")]
HELD = (8, 32, 64)  # held-out batch counts compared; the first 8 are the searches' own
BN = {"b4": 4, "b16": 16}


def per_batch(net: nn.Module, bn: List[Any], held: List[Any]) -> List[Tuple[float, int, int]]:
    """(summed cross-entropy, correct, images) per held-out batch after BN re-estimation on `bn`."""
    net = recalibrate_bn(net, bn).eval()
    out = []
    with torch.no_grad():
        for x, y in held:
            logits = net(x)
            out.append((float(nn.functional.cross_entropy(logits, y, reduction="sum")),
                        int((logits.argmax(1) == y).sum()), len(y)))
    return out


def headroom(model: str, target: float, comp: str) -> Dict[str, Any]:
    name = bh.stem_name(argparse.Namespace(model=model, target=target, compressor=comp))
    return json.loads((RESULTS / f"{name}.json").read_text())


def policies(model: str, target: float, comp: str) -> List[Tuple[str, Dict[str, float], float, int]]:
    """(name, policy, fine-tuned accuracy, data orders averaged) of every policy the headroom table holds."""
    hr = headroom(model, target, comp)
    out = [("uniform", hr["uniform"]["policy"], statistics.mean(hr["uniform"]["after_ft"].values()), 5)]
    for p in hr["picks"]:
        rows = [r for r in json.loads((RESULTS / p["file"]).read_text())["rows"]
                if (r["model"], r["target"], r["compressor"], r["tuner"], r["seed"])
                == (model, target, comp, p["tuner"], p["seed"])]
        out.append((f"{p['file']}:{p['tuner']}:{p['seed']}", rows[0]["policy"],
                    statistics.mean(p["after_ft"].values()), len(p["after_ft"])))
    for i, p in enumerate(hr["random_policies"]):
        out.append((f"random{i}:{p['proxy']}", p["policy"], p["after_ft"], 1))
    return out


def run(rows, path: Path) -> Dict[str, Any]:
    out: Dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    originals: Dict[str, Any] = {}
    for model, target, comp in rows:
        key = f"{model}_{target}_{comp}"
        if key in out:
            continue
        if model not in originals:
            originals[model] = bt.original("fashion_mnist", model)
        net0, train, _, x = originals[model]
        calibration = headroom(model, target, comp)["args"]["channel_calibration"]  # as its picks were compressed
        options = {"trainset_ratio": calibration} if comp == "channel" else {}
        space = build_space(net0, (x,), target, comp, calibration=train, compressor_options=options)
        bns = {k: take_batches(train, n) for k, n in BN.items()}
        held = take_batches(train, max(HELD), skip=4)  # after the 4 BN batches, as the searches' proxy takes them
        t0, recs = time.perf_counter(), []
        for name, pol, ft, n in policies(model, target, comp):
            net = space.compress(space.vector(pol))
            recs.append({"name": name, "ft": ft, "n": n, **{k: per_batch(net, b, held) for k, b in bns.items()}})
        out[key] = recs
        with atomic_write(str(path), "w") as f:
            json.dump(out, f)
        print(key, len(recs), f"{time.perf_counter() - t0:.0f}s", flush=True)
    return out


def proxy(rec: Dict[str, Any], bn: str, k: int, kind: str) -> float:
    m = rec[bn][:k]
    n = sum(c for _, _, c in m)
    return sum(a for _, a, _ in m) / n if kind == "acc" else -sum(loss for loss, _, _ in m) / n


def render(out: Dict[str, Any]) -> str:
    from scipy.stats import spearmanr

    cols = [(bn, k, kind) for bn in BN for kind in ("acc", "loss") for k in HELD]
    head = [f"{'accuracy' if kind == 'acc' else 'loss'} {k}, BN {BN[bn]}" for bn, k, kind in cols]
    lines = ["# Which proxy ranks the tuners' picks? (issue 13)", "",
             "`python scripts/bench_tuner_proxy_size.py`: Spearman correlation between a proxy and the fine-tuned "
             "test accuracy of the same policies (`tuner_headroom_*.json`). \"picks\": the uniform policy and every "
             "committed search pick, fine-tuned with 5 data orders (mean); \"random\": the 24 random-search "
             "policies fine-tuned with one order, where the row has them. Proxy = accuracy (or minus the mean "
             "cross-entropy) on the first 8 / 32 / 64 training batches after the 4 the BN statistics are "
             "re-estimated on (4 or 16 batches); the searches use accuracy on 8 after BN on 4. Each pick was its "
             "search's best by accuracy on those first 8 batches, so its 8-batch score carries the selection's "
             "lucky noise (the winner's curse), which lowers the 8-batch columns here; that same noise is what "
             "misleads the search's final choice.", "",
             "| row | policies | n | " + " | ".join(head) + " |", "|---|---|---|" + "---|" * len(cols)]
    means: Dict[str, List[float]] = {}
    for key, recs in out.items():
        for group, sel in (("picks", [r for r in recs if r["n"] > 1]), ("random", [r for r in recs if r["n"] == 1])):
            if len(sel) < 3:
                continue
            ft = [r["ft"] for r in sel]
            rhos = [float(spearmanr([proxy(r, *c) for r in sel], ft)[0]) for c in cols]
            if group == "picks":
                means.setdefault("prune" if key.endswith("prune") else "channel", []).append(rhos)
            lines.append(f"| {key.replace('_', ' ')} | {group} | {len(sel)} | "
                         + " | ".join(f"{r:.2f}" for r in rhos) + " |")
    for comp, rs in means.items():
        lines.append(f"| mean of the {len(rs)} {comp} rows | picks | | "
                     + " | ".join(f"**{statistics.mean(c):.2f}**" for c in zip(*rs)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    path = OUT.with_suffix(".json")
    out = json.loads(path.read_text()) if args.render_only else run(ROWS, path)
    text = render(out)
    with atomic_write(str(OUT.with_suffix(".md")), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
