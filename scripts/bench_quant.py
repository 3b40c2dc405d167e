"""Quantisation benchmark (issue 16): amc PTQ INT8 beside torch.ao's, 4-bit QAT vs QuantNoise, product
quantisation, pruning then INT8; accuracy, model bytes and onnxruntime CPU latency.

    python scripts/bench_quant.py                       # accuracy phase: every model in its own process
    python scripts/bench_quant.py --latency             # latency phase: times the saved ONNX files (quiet machine!)
    python scripts/bench_quant.py --models resnet20 --qat-epochs 1 --qat-train-limit 20000 --seeds 0 1 2
    python scripts/bench_quant.py --merge a.json b.json  # runs split over processes (--out a / --out b)

Models: `digits_cnn` (the digits CNN of bench_robustness.py: 3 epochs of QAT on its 1,437 images, 360 held out),
the Fashion-MNIST `resnet20` and `vgg_small` originals of `scripts/fashion_originals.py` (accuracy on
the official 10,000-image test set) and the pretrained ImageNet MobileNetV2 (`amc.data`), judged like
`bench_mobilenet_pretrained.py`: top-1 agreement with the float network and KL(float || quantised) on 100
natural-photo crops, calibrated on 100 other crops.

Rows (calibration: `--calib-batches` training batches, the same for amc and torch.ao):
- fp32: the traced float network.
- amc PTQ INT8 (`Quantization`, weights per channel, activations per tensor; min-max, percentile, MSE),
  judged as torch's fake-quantised network and, in brackets, its ONNX file run by onnxruntime; and with
  7-bit weights (onnxruntime's remedy for int16 saturation on x86 without VNNI).
- torch.ao PTQ INT8: `prepare_fx`/`convert_fx` with the x86 default qconfig mapping (the anchor; it runs in
  torch's own INT8 kernels, so its bytes are its `state_dict` and its latency is not onnxruntime's).
- onnxruntime quantize_static INT8: onnxruntime's own quantiser on the fp32 row's ONNX file (QDQ, uint8
  activations, int8 weights per channel, min-max), same calibration batches, judged in onnxruntime: the peer
  for INT8 accuracy as deployed and for INT8 latency.
- 4-bit weights (8-bit activations), no training; then `--qat-epochs` of training with QuantNoise(rate=1) (=
  QAT, seed 004) and QuantNoise(rate=0.5) (without and with BatchNorm re-estimated on 20 batches with every
  weight quantised), same lr, data and seed, each followed by the same PTQ; on the digits CNN at 2 bits too.
  With `--seeds`, each of these rows is trained once per seed: mean ± standard deviation. With
  `--weight-observers mse` the same rows again on the mse weight grid (each channel clipped where the squared
  error is least; training and deployment on that grid), to test seed 004's note that the paper's gain came
  from a histogram-fitted grid for QuantNoise against a min-max one for QAT.
- `--parts scratch` (opt-in, Fashion nets): the paper's own setting, training from random weights for
  `--scratch-epochs` on `--scratch-train-limit` images (lr 0.05): float, QAT, QuantNoise(0.5) without and with
  BatchNorm re-estimation, each then quantised to 4-bit weights by the same PTQ.
- product quantisation at two sizes (k-means; 256 centroids over blocks of the kernel area, the seed's
  setting, or 64 centroids over blocks twice as long; a Linear's block is 4 or 8), before and
  after `--qat-epochs` of iPQ fine-tuning (codebooks + float parameters).
  Fashion nets only: on MobileNetV2 a 1x1 conv's block is one weight, so each layer is a scalar k-means over
  up to 400k weights, too slow for this 2-core sweep.
- ChannelPruning to 0.5x MACs, then amc PTQ INT8.

Bytes: the ONNX file (what onnxruntime loads; INT8 weights for the quantised rows), and for PQ the amc JSON's
weights sidecar (uint8 codes + codebooks; its ONNX decodes float weights). Latency: onnxruntime 1 thread,
rows of a model interleaved round by round, medians, in a separate phase so nothing else runs while it times.
Writes scripts/results/quant.{md,json} (+ ONNX files under --work).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

RESULTS = HERE / "results"
PARTS = ("ptq", "lowbit", "pq", "prune")  # row groups: INT8 PTQ + torch.ao, 4/2-bit (QAT, QuantNoise), PQ, pruning
EXTRA_PARTS = ("scratch", "ort")  # opt-in: 4-bit QAT vs QuantNoise trained from random weights (the paper's
# setting); onnxruntime's own INT8 quantiser alone (it also runs with "ptq")
WORK = Path(os.environ.get("AMC_BENCH_CACHE", Path.home() / ".cache" / "amc_bench")) / "quant"


# ------------------------------------------------------------------------------------------ helpers
def _judge_fashion(net, test) -> Dict[str, float]:
    from amc.models import evaluate

    return {"acc": 100 * float(evaluate(net, test)["acc"])}


def _judge_photos(net, ref_logits, evalset) -> Dict[str, float]:
    import torch
    import torch.nn.functional as F

    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(evalset[i:i + 25]) for i in range(0, len(evalset), 25)])
    agree = 100 * float((logits.argmax(1) == ref_logits.argmax(1)).float().mean())
    kl = float(F.kl_div(F.log_softmax(logits, 1), F.log_softmax(ref_logits, 1), log_target=True,
                        reduction="batchmean"))
    return {"agree": agree, "kl": kl}


def _onnx(net, path: Path, x1) -> int:
    import amc

    amc.export.save_onnx(net, str(path), x1)
    return path.stat().st_size


def _json_bytes(net, path: Path) -> int:
    net.save_to_json(file=str(path))
    return path.stat().st_size + path.with_suffix(".safetensors").stat().st_size


def _state_bytes(model) -> int:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def _torch_ao(model, batches, example):
    """torch's own FX post-training quantisation (x86 qconfig), calibrated on the same batches."""
    import copy
    import warnings

    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (example,))
        with torch.no_grad():
            for (x,) in batches:
                prepared(x)
        return convert_fx(prepared)


class _OrtNet:
    """An ONNX file run by onnxruntime, callable like a network on a torch batch (for the judges)."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def __call__(self, x):
        import torch

        return torch.from_numpy(self.session.run(None, {self.name: x.detach().numpy()})[0])

    training = False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


def _ort_static(fp32_onnx: Path, out: Path, batches) -> _OrtNet:
    """onnxruntime's own post-training quantiser (`quantize_static`: QDQ, uint8 activations, int8 weights per
    channel, min-max calibration) on the same calibration batches: the peer for the INT8 latency goal."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = _OrtNet(fp32_onnx).name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: x.numpy()} for (x,) in batches])

        def get_next(self):
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_onnx), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    pre.unlink()
    return _OrtNet(out)


def _train_with_noise(model, train, val, epochs: int, rate: Optional[float], bits: int, lr: float, seed: int,
                      bn_batches: int = 0, weight_observer: str = "minmax"):
    """`epochs` of SGD on a copy of `model` (BatchNorm kept) with QuantNoise(rate, bits); returns the copy."""
    import copy

    import torch
    import torch.nn as nn

    from amc.compressors import QuantNoise
    from amc.trainers import BaseTrainer

    net = copy.deepcopy(model).train()
    torch.manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    noise = [] if rate is None else [QuantNoise(rate=rate, bits=bits, seed=seed, bn_batches=bn_batches,
                                                weight_observer=weight_observer)]  # None: float training
    BaseTrainer(train, val, None, net, nn.CrossEntropyLoss(), opt, None, epochs, "cpu",
                callbacks=noise, progress=False).run()
    return net.eval()


# ------------------------------------------------------------------------------------------ one model
def run_model(name: str, qat_epochs: int = 1, qat_train_limit: int = 20000, calib_batches: int = 16,
              threads: int = 1, work: str = str(WORK), lr: float = 0.005, seeds: Tuple[int, ...] = (0,),
              parts: Tuple[str, ...] = PARTS, weight_observers: Tuple[str, ...] = ("minmax",),
              scratch_epochs: int = 3, scratch_train_limit: int = 10000, scratch_lr: float = 0.05
              ) -> Dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import amc
    from amc.compressors import ChannelPruning, ProductQuantization, Quantization

    torch.set_num_threads(threads)
    out = Path(work) / name
    out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    photos = name == "mobilenet_v2"
    if photos:
        from amc.data import photo_split, pretrained_mobilenet_v2

        calib, evalset = photo_split()
        model = pretrained_mobilenet_v2().eval()
        train = DataLoader(TensorDataset(calib, torch.zeros(len(calib), dtype=torch.long)), batch_size=25)
        with torch.no_grad():
            ref = torch.cat([model(evalset[i:i + 25]) for i in range(0, len(evalset), 25)])
        judge = lambda net: _judge_photos(net, ref, evalset)  # noqa: E731
        x1 = evalset[:1]
        ratio = 1.0
    elif name == "digits_cnn":
        from bench_robustness import digits_cnn

        model, train, test, info = digits_cnn()
        info = {"test_acc": None, **info}
        judge = lambda net: _judge_fashion(net, test)  # noqa: E731
        x1 = next(iter(test))[0][:1]
        ratio = 1.0
    else:
        import fashion_originals

        model, info = fashion_originals.original(name)
        train, test = fashion_originals.loaders()
        judge = lambda net: _judge_fashion(net, test)  # noqa: E731
        x1 = next(iter(test))[0][:1]
        ratio = calib_batches / len(train)
    digits = name == "digits_cnn"
    if digits:
        qat_epochs = max(qat_epochs, 3)  # 23 batches an epoch: a few more to train at all
    graph = amc.trace(model, x1)
    common = dict(trainset_ratio=min(1.0, ratio), example_inputs=(x1,), seed=0)

    def add(label: str, net, kind: str = "onnx", seconds: float = 0.0, **extra) -> None:
        t = time.perf_counter()
        row = {"row": label, **judge(net), "seconds": round(seconds, 1), **extra}
        if "acc_seeds" in row:  # trained rows over several seeds: the mean (the ONNX file is the first seed's)
            row["acc"] = statistics.mean(row["acc_seeds"])
        stem = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
        if kind == "onnx":
            path = out / f"{stem}.onnx"
            row["onnx_bytes"] = _onnx(net, path, x1)
            row["onnx"] = str(path)
        elif kind == "file":  # already an ONNX file (onnxruntime's quantiser wrote it)
            row["onnx_bytes"] = Path(extra["onnx"]).stat().st_size
        elif kind == "json":
            row["json_bytes"] = _json_bytes(net, out / f"{stem}.json")
        else:
            row["state_bytes"] = _state_bytes(net)
        rows.append(row)
        print(f"[{name}] {label}: {row} ({time.perf_counter() - t:.0f}s to judge/export)", flush=True)

    def timed(fn):
        t = time.perf_counter()
        net = fn()
        return net, time.perf_counter() - t

    def over_seeds(label: str, bits: int, wobs: str, train_fn) -> None:
        """One row: `train_fn(seed)` for every seed, each quantised by the same PTQ; mean accuracy (the
        ONNX file is the first seed's)."""
        accs, first, total = [], None, 0.0
        for seed in seeds:
            trained, s = timed(lambda: train_fn(seed))
            tg = amc.trace(trained, x1)
            net, s2 = timed(lambda: Quantization(tg, train, weight_bits=bits, weight_observer=wobs,
                                                 **common).compress())
            accs.append(judge(net)["acc"])
            first, total = (net if first is None else first), total + s + s2
            print(f"[{name}] {label} seed {seed}: {accs[-1]:.2f}", flush=True)
        add(label, first, seconds=total / len(seeds), **({"acc_seeds": accs} if len(seeds) > 1 else {}))

    add("fp32", graph)
    if "ptq" in parts or "ort" in parts:
        batches = [(b[0],) for b, _ in zip(train, range(calib_batches))] if not photos else [(calib,)]
        ort_file = out / "onnxruntime_quantize_static_INT8.onnx"
        ort_net, s = timed(lambda: _ort_static(out / "fp32.onnx", ort_file, batches))
        add("onnxruntime quantize_static INT8 (QDQ, U8S8, per channel)", ort_net, kind="file", seconds=s,
            onnx=str(ort_file))
    if "ptq" in parts:
        for observer in ("minmax", "percentile", "mse"):
            net, s = timed(lambda: Quantization(graph, train, observer=observer, **common).compress())
            add(f"amc PTQ INT8 ({observer})", net, seconds=s)
            # the same file as deployed: onnxruntime's fused integer kernels round (and, on x86 without VNNI,
            # saturate) differently from torch's fake quantisation; judged like onnxruntime's own row
            rows[-1]["in_onnxruntime"] = judge(_OrtNet(Path(rows[-1]["onnx"])))
        # 7-bit weights: onnxruntime's documented remedy (reduce_range) for its u8 x s8 kernels on x86 without
        # VNNI, which add products pairwise in int16 and saturate with 8-bit weights
        net, s = timed(lambda: Quantization(graph, train, weight_bits=7, **common).compress())
        add("amc PTQ INT8, 7-bit weights (minmax)", net, seconds=s)
        rows[-1]["in_onnxruntime"] = judge(_OrtNet(Path(rows[-1]["onnx"])))
        try:
            ao, s = timed(lambda: _torch_ao(model, batches, x1))
            add("torch.ao PTQ INT8 (FX, x86)", ao, kind="state", seconds=s)
        except Exception as exc:  # noqa: BLE001 - the anchor failing is a result, not a crash
            rows.append({"row": "torch.ao PTQ INT8 (FX, x86)", "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    for wobs in weight_observers if "lowbit" in parts else ():
        grid = "" if wobs == "minmax" else f", {wobs} weight grid"
        net, s = timed(lambda: Quantization(graph, train, weight_bits=4, weight_observer=wobs, **common).compress())
        add(f"amc PTQ W4A8{grid} (no training)", net, seconds=s)
        if photos or not qat_epochs:
            continue
        import fashion_originals

        small_train, val = (train, test) if digits else fashion_originals.loaders(train_limit=qat_train_limit)
        for bits in (4, 2) if digits else (4,):
            if bits != 4:
                net, s = timed(lambda: Quantization(graph, train, weight_bits=bits, weight_observer=wobs,
                                                    **common).compress())
                add(f"amc PTQ W{bits}A8{grid} (no training)", net, seconds=s)
            for rate, bn, label in ((1.0, 0, "QAT = QuantNoise(rate=1)"), (0.5, 0, "QuantNoise(rate=0.5)"),
                                    (0.5, 20, "QuantNoise(rate=0.5), BN re-estimated")):
                # the training seed (shuffling, noise mask); the PTQ after it is the same
                over_seeds(f"{label} W{bits}A8{grid} ({qat_epochs} ep)", bits, wobs,
                           lambda seed: _train_with_noise(model, small_train, val, qat_epochs, rate, bits, lr, seed,
                                                          bn, wobs))
    for bs_mult, k in ((1, 256), (2, 64)) if not photos and "pq" in parts else ():  # MobileNetV2: module doc
        block = {n.name: bs_mult * (int(torch.tensor(graph.network[n.module].kernel_size).prod())
                                    if isinstance(graph.network[n.module], torch.nn.Conv2d) else 4)
                 for n in graph.layer_nodes if type(graph.network[n.module]) in (torch.nn.Conv2d, torch.nn.Linear)}
        block = {k: v for k, v in block.items()
                 if (graph.network[graph.node(k).module].weight[0].numel() % v) == 0}
        pq, s = timed(lambda: ProductQuantization(graph, train, block_size=block, n_centroids=k, seed=0).compress())
        add(f"PQ {k} centroids, block x{bs_mult} (no FT)", pq, kind="json", seconds=s)
        if qat_epochs:
            import fashion_originals

            small_train, val = (train, test) if digits else fashion_originals.loaders(train_limit=qat_train_limit)
            ft, s2 = timed(lambda: ProductQuantization(graph, small_train, val, block_size=block, n_centroids=k,
                                                       finetune_epochs=qat_epochs, lr=lr, seed=0).compress())
            add(f"PQ {k} centroids, block x{bs_mult} + iPQ ({qat_epochs} ep)", ft, kind="json", seconds=s2)
    if "scratch" in parts and not photos and not digits:
        import fashion_originals

        from amc.models import create

        small_train, val = fashion_originals.loaders(train_limit=scratch_train_limit)
        for rate, bn, label in ((None, 0, "float, then PTQ"), (1.0, 0, "QAT = QuantNoise(rate=1)"),
                                (0.5, 0, "QuantNoise(rate=0.5)"), (0.5, 20, "QuantNoise(rate=0.5), BN re-estimated")):
            def scratch(seed: int, rate=rate, bn=bn):  # the seed draws the random weights too
                torch.manual_seed(seed)
                return _train_with_noise(create(name), small_train, val, scratch_epochs, rate, 4, scratch_lr, seed, bn)

            over_seeds(f"from scratch ({scratch_epochs} ep, {scratch_train_limit:,} images): {label} W4A8", 4,
                       "minmax", scratch)
    if "prune" in parts:
        cp, s = timed(lambda: ChannelPruning(graph, train, target_macs=0.5, **common).compress())
        add("ChannelPruning 0.5x MACs (fp32)", cp, seconds=s, macs=amc.count(cp, x1)[0] / amc.count(graph, x1)[0])
        net, s2 = timed(lambda: Quantization(cp, train, **common).compress())
        add("ChannelPruning 0.5x MACs + amc PTQ INT8", net, seconds=s + s2)
    meta = {"torch": torch.__version__, "threads": threads, "calib_batches": calib_batches,
            "qat_epochs": qat_epochs, "qat_train_limit": qat_train_limit, "lr": lr, "seeds": list(seeds)}
    if not photos:
        meta["original"] = {k: info[k] for k in ("test_acc", "epochs") if k in info}
    return {"model": name, "rows": rows, "meta": meta, "x_shape": list(x1.shape)}


# ------------------------------------------------------------------------------------------ latency
def _session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def interleaved_ms(paths: List[str], shape: List[int], batch: int, rounds: int) -> List[float]:
    """Median onnxruntime latency (ms) of each file, timed round by round (every file once per round), so
    a drift of the machine's speed hits every row alike."""
    import numpy as np

    sessions = [_session(p) for p in paths]
    x = np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype(np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, f in zip(sessions, feeds):
        for _ in range(3):
            s.run(None, f)
    times: List[List[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t = time.perf_counter()
            s.run(None, f)
            times[i].append(time.perf_counter() - t)
    return [1e3 * statistics.median(t) for t in times]


def latency_phase(res: Dict[str, Any]) -> None:
    from _isolate import cpu_info

    res["latency"] = {"load_before": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_info()}
    for m in res["models"].values():
        rows = [r for r in m.get("rows", []) if "onnx" in r and os.path.isfile(r["onnx"])]
        if not rows:
            continue
        for key, batch, rounds in (("ms_b1", 1, 50), ("ms_b32", 32, 15)):
            for r, ms in zip(rows, interleaved_ms([r["onnx"] for r in rows], m["x_shape"], batch, rounds)):
                r[key] = ms
        for r in rows:
            print(f"{m['model']} {r['row']}: b1 {r['ms_b1']:.2f} ms, b32 {r['ms_b32']:.1f} ms", flush=True)
    res["latency"]["load_after"] = os.getloadavg()


# ------------------------------------------------------------------------------------------ report
def write_md(res: Dict[str, Any], path: Path) -> None:
    from _isolate import write_atomic

    c = res["config"]
    L = ["# Quantisation (issue 16): accuracy, bytes, onnxruntime INT8 latency", "",
         f"Generated by `python scripts/bench_quant.py` on {c['date']} (accuracy) ; torch {c['torch']}, "
         f"onnxruntime {c['onnxruntime']}, {c.get('cpu', 'CPU')}, 1 thread.", ""]
    lat = res.get("latency")
    if lat:
        L += [f"Latency phase {lat['date']} on {lat.get('cpu', 'CPU not recorded')}: onnxruntime, 1 intra-op thread; per model, every row's file timed "
              "once per round, 50 rounds at batch 1 and 15 at batch 32, medians; load average before "
              f"{lat['load_before'][0]:.2f}, after {lat['load_after'][0]:.2f} (nothing else running). Rows with the "
              "same graph (INT8 and W4A8 both run int8 kernels) differ only by timing noise.", ""]
    else:
        L += ["Latency: not measured yet (`--latency`).", ""]
    if res.get("note"):
        L += [res["note"], ""]
    L += [__doc__.split("Rows (")[1].split("Writes")[0].join(["Rows (", ""]), ""]
    for m in res["models"].values():
        if "rows" not in m:
            L += [f"## {m['model']}", "", f"failed: {m.get('status')} {str(m.get('error', ''))[:300]}", ""]
            continue
        photos = m["model"] == "mobilenet_v2"
        fp = m["rows"][0]
        L += [f"## {m['model']}", ""]
        if photos:
            L += ["Pretrained ImageNet MobileNetV2; agreement (%) with the float network and KL(float || row) on 100 "
                  "held-out photo crops.", ""]
            head = "| row | agreement | KL | ONNX bytes | other bytes | ms b1 | x fp32 | ms b32 | x fp32 | s |"
        else:
            what = "Digits CNN (16x16), accuracy on the 360 held-out images" if m["model"] == "digits_cnn" else \
                "Fashion-MNIST original, accuracy on the 10,000 test images"
            L += [f"{what}: {fp['acc']:.2f}% (fp32 row).", ""]
            head = "| row | test acc | vs fp32 | ONNX bytes | other bytes | ms b1 | x fp32 | ms b32 | x fp32 | s |"
        L += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in m["rows"]:
            if "error" in r:
                L.append(f"| {r['row']} | failed: {r['error']} |" + " |" * (head.count("|") - 3))
                continue
            q = (f"{r['agree']:.1f} | {r['kl']:.4f}" if photos else f"{r['acc']:.2f} | {r['acc'] - fp['acc']:+.2f}")
            if "in_onnxruntime" in r:  # the same file judged in onnxruntime (its integer kernels)
                o = r["in_onnxruntime"]
                q = q.replace(" |", f" (onnxruntime: {o['agree' if photos else 'acc']:.{1 if photos else 2}f}) |", 1)
            if "acc_seeds" in r:
                q = q.replace(" |", f" ± {statistics.stdev(r['acc_seeds']):.2f} ({len(r['acc_seeds'])} seeds) |", 1)
            onnx_b = f"{r['onnx_bytes']:,}" if "onnx_bytes" in r else "-"
            other = (f"{r['json_bytes']:,} (JSON+sidecar)" if "json_bytes" in r else
                     f"{r['state_bytes']:,} (state_dict)" if "state_bytes" in r else "-")
            lat_cells = []
            for key in ("ms_b1", "ms_b32"):
                if key in r and key in fp:
                    lat_cells += [f"{r[key]:.2f}", f"{r[key] / fp[key]:.2f}"]
                else:
                    lat_cells += ["-", "-"]
            L.append(f"| {r['row']} | {q} | {onnx_b} | {other} | {' | '.join(lat_cells)} | {r['seconds']} |")
        L.append("")
    write_atomic(str(path), "\n".join(L) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["digits_cnn", "resnet20", "vgg_small", "mobilenet_v2"])
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--qat-train-limit", type=int, default=20000)
    ap.add_argument("--calib-batches", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of the QAT/QuantNoise rows")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS + EXTRA_PARTS,
                    help="row groups to run (scratch: opt-in, Fashion nets only)")
    ap.add_argument("--scratch-epochs", type=int, default=3)
    ap.add_argument("--scratch-train-limit", type=int, default=10000)
    ap.add_argument("--weight-observers", nargs="+", default=["minmax"], choices=["minmax", "mse"],
                    help="weight grids of the low-bit rows (PTQ, QAT, QuantNoise)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="merge these result files (runs split over processes or row groups) into --out; "
                         "rows of a model are joined in order, a later file's row replacing one of the same name "
                         "(keeping the latency of an equal row)")
    ap.add_argument("--latency", action="store_true", help="time the ONNX files of an earlier accuracy run")
    ap.add_argument("--timeout", type=float, default=5400.0, help="seconds per model")
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--out", default=str(RESULTS / "quant"))
    a = ap.parse_args()
    out = Path(a.out)
    if a.latency:
        res = json.loads(out.with_suffix(".json").read_text())
        latency_phase(res)
        save(res, out)
        return 0
    if a.merge:
        parts = [json.loads(Path(p).read_text()) for p in a.merge]
        res = {**parts[0], "models": {}}
        for part in parts:
            for k, m in part["models"].items():
                if k not in res["models"] or "rows" not in res["models"][k] or "rows" not in m:
                    res["models"][k] = m
                    continue
                rows = {r["row"]: r for r in res["models"][k]["rows"]}
                for r in m["rows"]:  # the same network again (e.g. fp32 in every part) keeps its latency
                    old = rows.get(r["row"], {})
                    same = all(old.get(q) == r.get(q) for q in ("acc", "agree")) and "acc_seeds" not in r
                    rows[r["row"]] = {**old, **r} if old and same else r
                res["models"][k] = {**res["models"][k], "rows": sorted(rows.values(), key=_row_group)}
        order = ap.get_default("models")
        res["models"] = dict(sorted(res["models"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order
                                    else len(order)))
        save(res, out)
        return 0
    from _isolate import cpu_info, package_version, run_isolated

    res = {"config": {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_info(), "torch": package_version("torch"),
                      "onnxruntime": package_version("onnxruntime"), "python": platform.python_version()},
           "models": {}}
    if out.with_suffix(".json").exists():  # keep models of an earlier run that this one does not redo
        res["models"] = json.loads(out.with_suffix(".json").read_text()).get("models", {})
    for name in a.models:
        r = run_isolated(f"{HERE / 'bench_quant.py'}:run_model",
                         {"name": name, "qat_epochs": a.qat_epochs, "qat_train_limit": a.qat_train_limit,
                          "calib_batches": a.calib_batches, "work": a.work, "seeds": a.seeds,
                          "parts": a.parts, "weight_observers": a.weight_observers,
                          "scratch_epochs": a.scratch_epochs, "scratch_train_limit": a.scratch_train_limit}, timeout=a.timeout, mem_gb=16)
        r.setdefault("model", name)
        res["models"][name] = r
        save(res, out)
    return 0


def _row_group(row: Dict[str, Any]) -> float:
    """Where a merged row goes: fp32, INT8 PTQ (amc, torch.ao), low-bit, PQ, pruning (stable within a group)."""
    label = row["row"]
    order = (("fp32", 0), ("amc PTQ INT8", 1), ("torch.ao", 1), ("onnxruntime", 1), ("from scratch", 2.5), ("PQ ", 3),
             ("ChannelPruning", 4))
    return next((g for prefix, g in order if label.startswith(prefix)), 2)


def save(res: Dict[str, Any], out: Path) -> None:
    from _isolate import write_atomic

    write_atomic(str(out.with_suffix(".json")), json.dumps(res, indent=1))
    write_md(res, out.with_suffix(".md"))


if __name__ == "__main__":
    sys.exit(main())
