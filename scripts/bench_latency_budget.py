"""Equal measured latency (issue 22): per-layer latency allocation vs one uniform ratio.

    python scripts/bench_latency_budget.py --models resnet20 vgg_small mobilenet_v2 resnet50 vit_b_16 --target 0.5

Both rows are pruned with the same L2 scores until they *measure* `--target` x the original's latency at
batch 1 on this CPU: `amc.prune(target_latency=t)` (one ratio for every group: what `target_macs` gives at
the MACs that run that fast) against `amc.prune(target_latency=t, latency_allocation="layers")` (per-group
ratios from per-layer latency tables). Accuracy after the same recalibration: the Fashion-MNIST originals
(BN re-estimated on 4 training batches, then `--ft-epochs` on `--ft-train-limit` images, official test set);
the pretrained MobileNetV2 (BN re-estimated on the 100 calibration crops of the bundled photos, with
`--kd-steps` also distilled from the float network on them; top-1 agreement and KL with the float model on
the other 100 crops); resnet50 and vit_b_16 have random weights here (no pretrained ones
ship offline), so their rows show latency, MACs and the table's prediction error only; their accuracy
stand-ins are trained on Fashion-MNIST: `resnet50_fashion` (torchvision's resnet50, 32 px RGB, trained by
fashion_originals.py) and `vit_fashion` (fine-tuned with AdamW).
Each model runs in its own process with a timeout; latencies of a model are timed interleaved.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from _isolate import package_version, run_isolated, write_atomic  # noqa: E402

RESULTS = HERE / "results"
# Fashion-MNIST originals; vit_fashion and resnet50_fashion stand in for vit_b_16 and resnet50, whose
# pretrained weights do not ship offline -> fine-tuning (optimizer, lr, weight decay)
FASHION = {"resnet20": ("sgd", 0.02, 5e-4), "vgg_small": ("sgd", 0.02, 5e-4), "vit_fashion": ("adamw", 1e-4, 0.05),
           "resnet50_fashion": ("sgd", 0.02, 5e-4)}


def _subject(name: str):
    """(model, example input, scorer(net) -> dict) for one benchmark model."""
    from amc.trainers import recalibrate_bn

    if name in FASHION:
        import fashion_originals as fo
        from amc.data import fashion_mnist_loaders
        from amc.models import evaluate, train_classifier
        from amc.tuners.evaluation import take_batches

        model, _ = fo.original(name)
        train, test = fo.loaders(name=name)
        ft = fashion_mnist_loaders(batch_size=128, train_limit=SETTINGS["ft_train_limit"], seed=0,
                                   **fo.input_format(name))[0]
        bn = take_batches(train, 4)
        opt, lr, wd = FASHION[name]

        def score(net):
            import statistics

            before = evaluate(recalibrate_bn(net, bn), test)["acc"]
            runs = [train_classifier(recalibrate_bn(net, bn), ft, test, epochs=SETTINGS["ft_epochs"], lr=lr,
                                     seed=seed, optimizer=opt, weight_decay=wd)["acc"]
                    for seed in SETTINGS["ft_seeds"]] \
                if SETTINGS["ft_epochs"] else [before]
            return {"acc_before_ft": before, "acc_after_ft": statistics.mean(runs), "acc_after_ft_runs": runs,
                    "acc_after_ft_sd": statistics.stdev(runs) if len(runs) > 1 else 0.0}
        score.train = train  # the search's proxy reads training batches only
        return model.eval(), next(iter(test))[0][:1], score
    if name == "mobilenet_v2":
        from torch.utils.data import DataLoader, TensorDataset
        import torch.nn.functional as F
        from amc.data import photo_split, pretrained_mobilenet_v2

        import statistics

        calib, evalset = photo_split(crops_per_image=SETTINGS.get("crops_per_image", 25))
        loader = DataLoader(TensorDataset(calib), batch_size=20)
        model = pretrained_mobilenet_v2().eval()
        def logits(net):  # in chunks: 1,000 crops at once need over 1 GB of activations
            with torch.no_grad():
                return torch.cat([net(chunk) for chunk in evalset.split(100)])

        ref = logits(model)

        def judge(net):
            out = logits(net)
            kl = F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean")
            return float((out.argmax(1) == ref.argmax(1)).float().mean()), float(kl)

        def score(net):
            seeds = SETTINGS.get("kd_seeds") or [0]
            runs = []
            for seed in seeds:  # each seed distils its own copy: recalibrate_bn copies the network
                tuned = recalibrate_bn(net, loader)
                if SETTINGS.get("kd_steps"):
                    distill_on_crops(tuned, model, calib, SETTINGS["kd_steps"], seed=seed)
                runs.append(judge(tuned))
            agree, kls = [r[0] for r in runs], [r[1] for r in runs]
            sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
            return {"agreement": statistics.mean(agree), "kl": statistics.mean(kls), "agreement_runs": agree,
                    "kl_runs": kls, "agreement_sd": sd(agree), "kl_sd": sd(kls), "eval_crops": len(evalset)}
        score.train = loader  # calibration crops: BN re-estimation and the sensitivity row's distortion
        return model, torch.randn(1, 3, 224, 224), score
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    return model, torch.randn(1, 3, 224, 224), None


SETTINGS: Dict[str, Any] = {}


def distill_on_crops(student, teacher, crops, steps: int, batch: int = 32, lr: float = 0.01,
                     temperature: float = 2.0, seed: int = 0) -> None:
    """Distil `student` from `teacher` on the calibration crops only (random flips and re-crops of them),
    so a network pruned far below what it survives untrained is judged after the same short recovery;
    the evaluation crops are never seen. SGD with momentum, cosine learning rate, BatchNorm in train mode."""
    import math

    import torch.nn.functional as F
    from amc.trainers.losses import kd_loss

    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, os.cpu_count() or 1))  # the timing is over: training may use every core
    try:
        opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9)
        size = crops.shape[-1]
        student.train()
        for step in range(steps):
            x = crops[torch.randint(len(crops), (batch,), generator=g)]
            side = int(size * (0.6 + 0.4 * float(torch.rand(1, generator=g))))  # one random window per batch
            i, j = (int(torch.randint(size - side + 1, (1,), generator=g)) for _ in range(2))
            x = F.interpolate(x[..., i:i + side, j:j + side], size=(size, size), mode="bilinear", align_corners=False)
            flip = torch.rand(batch, generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            with torch.no_grad():
                target = teacher(x)
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            opt.zero_grad(set_to_none=True)
            kd_loss(student(x), target, temperature).backward()
            opt.step()
        student.eval()
    finally:
        torch.set_num_threads(threads)


def one_model(name: str, target: float, threads: int, ft_epochs: int, ft_train_limit: int,
              batch: int = 1, round_to: int = 8, search: str = "", evaluations: int = 40,
              capacity: str = "macs+params", max_ratio: float = 0.8, ft_seeds=(0,),
              kd_steps: int = 0, sensitivity: bool = False, kd_seeds=(0,),
              crops_per_image: int = 25, reprune: int = 0) -> Dict[str, Any]:
    import amc
    from amc.compressors.latency import build_table, measure, prune_to_latency
    from amc.compressors.layer_latency import layer_table, node_dims, prune_to_layer_latency
    from amc.compressors.prune import plan_pruning
    from amc.errors import PruningError

    torch.set_num_threads(threads)
    SETTINGS.update(ft_epochs=ft_epochs, ft_train_limit=ft_train_limit, ft_seeds=list(ft_seeds), kd_steps=kd_steps,
                    kd_seeds=list(kd_seeds), crops_per_image=crops_per_image)
    model, x, score = _subject(name)
    x = x.expand(batch, *x.shape[1:]).contiguous() if batch > 1 else x
    net = amc.trace(model, x)
    plan = plan_pruning(net, "l2", (x,), round_to=round_to)
    rows: Dict[str, Any] = {}
    nets: Dict[str, Any] = {}
    t = time.perf_counter()
    table = build_table(plan, (x,), cache_dir=False)
    rows["uniform"] = {"table_s": time.perf_counter() - t}
    dims = node_dims(plan)
    t = time.perf_counter()
    ltable = layer_table(plan, (x,), cache_dir=False, dims=dims)
    rows["layers"] = {"table_s": time.perf_counter() - t}
    runs = [("uniform", lambda aim: prune_to_latency(plan, aim, (x,), table)),
            ("layers", lambda aim: prune_to_layer_latency(plan, aim, (x,), ltable, dims=dims, capacity=capacity,
                                                          max_ratio=max_ratio))]
    if sensitivity and score is not None and hasattr(score, "train"):
        from amc.compressors.sensitivity import curve, group_sensitivity
        from amc.tuners.evaluation import take_batches

        def sensitive(aim):
            t0 = time.perf_counter()
            sens = group_sensitivity(plan, take_batches(score.train, 4))
            rows["sensitivity"]["sensitivity_s"] = time.perf_counter() - t0
            return prune_to_layer_latency(plan, aim, (x,), ltable, dims=dims, max_ratio=max_ratio,
                                          sensitivity={g: curve(v) for g, v in sens.items()})
        rows["sensitivity"] = {"table_s": rows["layers"]["table_s"]}
        runs.append(("sensitivity", sensitive))
    if search and score is not None and hasattr(score, "train"):
        from amc.jobs.search import make_tuner
        from amc.tuners.evaluation import default_evaluator

        def searched(aim):
            res = make_tuner(search, evaluations, 0, pop_size=10).search(
                net, example_inputs=(x,), target_macs=None, target_latency=aim, latency_table=ltable,
                evaluate=default_evaluator(score.train, None, bn_batches=4, holdout_batches=8),
                calibration=score.train, compressor_options={"round_to": round_to}, max_ratio=max_ratio,
                progress=False)
            res.net.meta["latency"] = {**res.info["latency"], "evaluations": len(res.history)}
            return res.net
        rows[search] = {"table_s": rows["layers"]["table_s"]}
        runs.append((search, searched))
    fns = dict(runs)
    for key, fn in runs:
        t = time.perf_counter()
        try:
            nets[key] = fn(target)
        except PruningError as exc:  # a budget one allocation cannot meet here: the row says so
            rows[key]["error"] = str(exc)[:400]
        rows[key]["prune_s"] = time.perf_counter() - t
    load_before = os.getloadavg()[0]
    base_ms, *ms_all = measure([net, *nets.values()], (x,), rounds=41)
    for _ in range(reprune):  # equal latency = every row within the budget in the same final timing
        over = {k: ms / base_ms for k, ms in zip(nets, ms_all) if ms / base_ms > target * 1.01}
        if not over:
            break
        for key, measured in over.items():  # aim lower by the overshoot, prune again from the same plan
            rows[key]["aim"] = rows[key].get("aim", target) * target / measured
            rows[key]["repruned"] = rows[key].get("repruned", 0) + 1
            try:
                nets[key] = fns[key](rows[key]["aim"])
            except PruningError as exc:  # keep the network that overshot; the row says why
                rows[key]["reprune_error"] = str(exc)[:200]
        base_ms, *ms_all = measure([net, *nets.values()], (x,), rounds=41)
    load_after = os.getloadavg()[0]  # before the scoring below, which may train on every core
    base_macs = amc.count(net, x[:1])[0]
    for (key, pruned), ms in zip(nets.items(), ms_all):
        meta = pruned.meta["latency"]
        rows[key].update(latency=ms / base_ms, ms=ms, macs=amc.count(pruned, x[:1])[0] / base_macs,
                         params=sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in net.parameters()),
                         predicted=meta.get("predicted"), ratio=meta.get("ratio"), tried=meta.get("tried"),
                         group_ratios=meta.get("ratios"))
    if score is not None:
        for key, pruned in nets.items():
            rows[key].update(score(pruned))
    if {"uniform", "layers"} <= set(nets) and score is not None and hasattr(score, "train"):
        # latency_allocation="auto": of the two networks above, what amc.prune would return (its rule: the
        # outputs closer to the original's on 4 calibration batches, BN re-estimated)
        from itertools import islice

        from amc.compressors.sensitivity import least_distorted

        chosen, dist = least_distorted(net, {k: nets[k] for k in ("uniform", "layers")}, islice(score.train, 4))
        rows["auto"] = {**rows[chosen], "auto_choice": chosen, "distortion": dist}
    return {"model": name, "original_ms": base_ms, "rows": rows, "load": [load_before, load_after],
            "fit": {"grid": ltable.grid, "measured_ms": ltable.measured_ms}}


def render(res: Dict[str, Any]) -> str:
    a = res["args"]
    lines = ["# Equal measured latency: per-layer allocation vs one uniform ratio (issue 22)", "",
             f"Generated by `{res['command']}` on {res['date']}; torch {res['torch']}, {a['threads']} thread(s), "
             f"batch {a.get('batch', 1)}, CPU ({res['cpu']}), nothing else running. Load average (1 min) "
             "before / after each model's final timing is in its row.", "",
             "Both rows prune with the same L2 scores until the pruned network *measures* "
             f"{a['target']}x the original's latency (interleaved medians, 41 rounds): **uniform** = "
             "`amc.prune(target_latency=t)`, one ratio for every group (what `target_macs` gives at the MACs "
             "that run that fast); **layers** = `amc.prune(target_latency=t, latency_allocation=\"layers\")`, "
             "per-group ratios from per-layer latency tables, a channel's cost being the capacity (MACs, "
             "parameters) it carries; **sensitivity** = the same tables (`layer_latency.allocate(sensitivity=)`, "
             "not offered by `amc.prune`), "
             "**auto** = `latency_allocation=\"auto\"`'s choice between the uniform and layers rows (the one whose "
             "outputs stay closer to the original's on 4 calibration batches, BN re-estimated; same network, so "
             "the chosen row's numbers); "
             "a channel's cost being the output distortion its group adds when pruned alone (4 calibration "
             "batches, BN re-estimated; `amc.compressors.sensitivity`); a tuner's name (`--search`): "
             f"`{a.get('search') or 'ga'}.search(target_latency=t)`, {a.get('evaluations', 40)} policies scored by "
             "adaptive-BN accuracy on training batches, each within the tables' predicted budget, best one "
             "timed. Accuracy after the same recalibration: "
             f"Fashion-MNIST originals: BN re-estimated on 4 training batches, then {a['ft_epochs']} epoch(s) on "
             f"{a['ft_train_limit']:,} training images, official test set; pretrained MobileNetV2: BN re-estimated "
             f"on the {4 * a.get('crops_per_image', 25)} calibration crops of the bundled photos"
             + (f", then {a['kd_steps']} steps of distillation from the float network on those crops (batch 32, "
                "random flips and re-crops, SGD, cosine lr 0.01, T=2; `distill_on_crops`)" if a.get("kd_steps") else "")
             + f", top-1 agreement / KL with the float model on the other {4 * a.get('crops_per_image', 25)} crops "
             f"(1 crop = {100 / (4 * a.get('crops_per_image', 25)):.2g} point); "
             "resnet50, vit_b_16: random weights (no pretrained weights ship offline), latency only. "
             "\"(over budget)\": the final timing (all rows interleaved) is more than 3% above the target, "
             "though the pruning loop had measured the row within it."
             + (f" With `--reprune {a['reprune']}`: a row more than 1% over the target in the final timing is pruned "
                "again from the same plan at a lower aim (aim x target / measured) and every row re-timed, up to "
                f"{a['reprune']} times, so the rows compare at equal latency (\"pruned again\")."
                if a.get("reprune") else ""), "",
             "| model | allocation | latency (x original) | predicted | MACs | params | accuracy | tables + prune s "
             "| load |", "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    if res.get("note"):
        lines[4:4] = [f"Note: {res['note']}", ""]
    for m in res["models"]:
        if "rows" not in m:
            lines.append(f"| {m['model']} | - | {m.get('status')}: {m.get('error', '')[:200]} |||||||")
            continue
        for key in m["rows"]:
            r = m["rows"][key]
            if "error" in r:
                lines.append(f"| {m['model']} ({m['original_ms']:.1f} ms) | {key} | not met: {r['error'][:160]} "
                             "|||||||")
                continue
            if "acc_after_ft" in r:
                sd = (f" ± {100 * r['acc_after_ft_sd']:.2f} ({len(r['acc_after_ft_runs'])} FT seeds)"
                      if len(r.get("acc_after_ft_runs", [])) > 1 else "")
                acc = f"{100 * r['acc_before_ft']:.2f}% -> {100 * r['acc_after_ft']:.2f}%{sd} after FT"
            elif "agreement" in r and len(r.get("agreement_runs", [])) > 1:
                acc = (f"agreement {100 * r['agreement']:.1f} ± {100 * r['agreement_sd']:.1f}%, KL {r['kl']:.3f} ± "
                       f"{r['kl_sd']:.3f} ({len(r['agreement_runs'])} distillation seeds)")
            elif "agreement" in r:
                acc = f"agreement {100 * r['agreement']:.0f}%, KL {r['kl']:.2f}"
            else:
                acc = "-"
            pred = f"{r['predicted']:.3f}" if r.get("predicted") is not None else f"ratio {r['ratio']:.3f}"
            over = " (over budget)" if r["latency"] > a["target"] * 1.03 else ""  # the final timing disagrees
            label = (f"auto (= {r['auto_choice']}; distortion uniform {r['distortion']['uniform']:.3g}, layers "
                     f"{r['distortion']['layers']:.3g})" if "auto_choice" in r else key)
            if r.get("repruned"):
                label += f" (pruned again {r['repruned']}x, aim {r['aim']:.3f})"
            lines.append(f"| {m['model']} ({m['original_ms']:.1f} ms) | {label} | {r['latency']:.3f}{over} | {pred} | "
                         f"{r['macs']:.3f} | {r['params']:.3f} | {acc} | {r['table_s'] + r['prune_s']:.0f} | "
                         f"{m['load'][0]:.2f} / {m['load'][1]:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "vgg_small", "mobilenet_v2", "resnet50", "vit_b_16"])
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--round-to", type=int, default=8, help="kept widths a multiple of this, in both rows")
    ap.add_argument("--batch", type=int, default=1, help="the batch the latency is measured (and budgeted) at")
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--ft-train-limit", type=int, default=10000)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--search", default="", choices=("", "ga", "ddpg", "random"),
                    help="Fashion nets: also a tuner's search under the same latency budget (per-layer tables' "
                         "prediction; adaptive-BN accuracy on training batches as its proxy)")
    ap.add_argument("--evaluations", type=int, default=40)
    ap.add_argument("--ft-seeds", type=int, nargs="+", default=[0],
                    help="fine-tune every row once per seed (same images in another order): mean ± sd")
    ap.add_argument("--max-ratio", type=float, default=0.8, help="largest fraction of a group the per-layer "
                    "allocation and the search may remove (uniform rows are not capped)")
    ap.add_argument("--capacity", default="macs+params", choices=("macs", "macs+params"),
                    help="what the per-layer allocation keeps per millisecond (amc's default: macs+params)")
    ap.add_argument("--kd-steps", type=int, default=0,
                    help="MobileNetV2: after the BN re-estimation, this many steps of distillation from the float "
                         "network on the calibration crops (batch 32), so rows pruned past what survives untrained "
                         "still get a usable agreement")
    ap.add_argument("--kd-seeds", type=int, nargs="+", default=[0],
                    help="MobileNetV2: distil every row once per seed (other batches and re-crops): mean ± sd")
    ap.add_argument("--crops-per-image", type=int, default=25,
                    help="MobileNetV2: random crops per bundled photo, half for calibration, half for judging "
                         "(25: 100 + 100 crops)")
    ap.add_argument("--reprune", type=int, default=0,
                    help="rows over the budget (by >1%%) in the final interleaved timing are pruned again at a lower "
                         "aim and every row re-timed, up to this many times (equal latency, not just the loop's)")
    ap.add_argument("--sensitivity", action="store_true",
                    help="add the row whose allocation costs a channel by the output distortion its group adds "
                         "pruned alone (minutes: one pruned network per group and grid ratio)")
    ap.add_argument("--out", default=str(RESULTS / "latency_budget"))
    a = ap.parse_args()
    from amc.compressors.latency import _cpu_name

    res = {"command": "python scripts/bench_latency_budget.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "cpu": _cpu_name(),
           "versions": {"torchvision": package_version("torchvision")}, "args": vars(a), "models": []}
    for name in a.models:
        r = run_isolated(str(HERE / "bench_latency_budget.py") + ":one_model",
                         {"name": name, "target": a.target, "threads": a.threads, "ft_epochs": a.ft_epochs,
                          "ft_train_limit": a.ft_train_limit, "batch": a.batch, "round_to": a.round_to,
                          "search": a.search, "evaluations": a.evaluations,
                          "capacity": a.capacity, "max_ratio": a.max_ratio,
                          "ft_seeds": a.ft_seeds, "kd_steps": a.kd_steps, "sensitivity": a.sensitivity,
                          "kd_seeds": a.kd_seeds, "crops_per_image": a.crops_per_image, "reprune": a.reprune},
                         timeout=a.timeout)
        r.setdefault("model", name)
        res["models"].append(r)
        print(name, json.dumps(r.get("rows", r), default=str)[:600], flush=True)
        write_atomic(a.out + ".json", json.dumps(res, indent=1, default=str))
        write_atomic(a.out + ".md", render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
