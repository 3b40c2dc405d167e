"""Quantisation: PTQ INT8 on the graph, ONNX QDQ export run by onnxruntime, QuantNoise, product quantisation,
reproducibility and the bad-input guards."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import DataLoader, TensorDataset

import amc
from amc.compressors import ProductQuantization, Quantization, QuantNoise
from amc.compressors.quant import (ActQuant, PQConv2d, QuantConv2d, QuantLinear, fold_batchnorm, product_quantize,
                                   quantize_weights)
from amc.errors import QuantizationError
from amc.graph.edit import insert_after
from amc.trainers import BaseTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ddp_worker import TinyCNN, digits_loaders, seed_everything  # noqa: E402

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_thread")]


class SmallResNet(nn.Module):
    """conv-bn-relu, a residual block with a 1x1 shortcut, pooling, a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.short = nn.Conv2d(8, 16, 1, stride=2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.a(x) + self.short(x))
        return self.head(x.mean((2, 3)))


def _model():
    torch.manual_seed(0)
    m = SmallResNet()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding is tested
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.1, 0.1)
    return m.eval()


def _loader(n=64, batch=16):
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.rand(n, 1, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=batch)


def _logit_error(a, b):
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


def test_fold_batchnorm_is_exact_and_removes_the_bn_nodes():
    model = _model()
    x = torch.rand(4, 1, 12, 12)
    net = amc.trace(model, x[:1])
    folded, names = fold_batchnorm(net)
    assert len(names) == 3 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_ptq_int8_stays_close_to_float(observer):
    model, loader = _model(), _loader()
    x = next(iter(loader))[0]
    c = Quantization(model, loader, weight_bits=8, act_bits=8, observer=observer, trainset_ratio=1.0)
    net = c.compress()
    assert len(c.quantized_layers) == 5 and len(c.folded_bn) == 3
    assert sum(isinstance(m, (QuantConv2d, QuantLinear)) for m in net.modules()) == 5
    quants = [m for m in net.modules() if isinstance(m, ActQuant)]
    assert quants and all(bool(q.calibrated) for q in quants)
    with torch.no_grad():
        err = _logit_error(net(x), model(x))
    assert err < 1e-3, err
    net.lint()


def test_weights_sit_on_the_int_grid():
    lin = nn.Linear(16, 4)
    for bits in (8, 4, 2):
        q = QuantLinear.from_float(lin, bits)
        w = amc.compressors.quant.quantize_weight(q.weight, bits)
        scale = q.weight.detach().abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        codes = w / scale
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
        assert codes.abs().max() <= 2 ** (bits - 1) - 1 + 1e-4
        assert len(torch.unique(codes.round())) <= 2 ** bits


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_mse_weight_grid_has_less_error_and_stays_on_a_bits_grid(bits):
    """The mse observer clips outliers: never more squared error than min-max, much less at low bits, and the
    codes are still `bits`-bit integers."""
    torch.manual_seed(0)
    w = torch.randn(8, 72)
    w[:, 0] *= 6  # one outlier per channel stretches the min-max grid
    q = amc.compressors.quant.quantize_weight
    err = {o: float(((q(w, bits, o) - w) ** 2).sum()) for o in ("minmax", "mse")}
    assert err["mse"] <= err["minmax"] * (1 + 1e-6)
    if bits <= 4:
        assert err["mse"] < 0.8 * err["minmax"], err
    from amc.compressors.quant.quantizers import weight_scale

    codes = q(w, bits, "mse") / weight_scale(w, bits, "mse")[:, None]
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert codes.min() >= -(2 ** (bits - 1)) - 1e-4 and codes.max() <= 2 ** (bits - 1) - 1 + 1e-4


def test_mse_weight_grid_exports_to_onnxruntime_and_round_trips(tmp_path):
    """Clipped weights: the exported int8 codes are the clipped b-bit ones (onnxruntime = torch), and the
    option survives JSON."""
    ort = pytest.importorskip("onnxruntime")
    model, loader = _model(), _loader()
    x = next(iter(loader))[0]
    net = Quantization(model, loader, weight_bits=4, weight_observer="mse", trainset_ratio=1.0).compress()
    assert {m.weight_observer for m in net.modules() if isinstance(m, (QuantConv2d, QuantLinear))} == {"mse"}
    minmax = Quantization(model, loader, weight_bits=4, trainset_ratio=1.0).compress()
    with torch.no_grad():
        assert not torch.allclose(net(x), minmax(x))
    path = amc.export.save_onnx(net, str(tmp_path / "q.onnx"), x[:2])
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(path).graph  # the clipping folded away: int8 codes stored, no Min/Max left to run
    assert sum(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer) == 5
    assert not {n.op_type for n in graph.node} & {"Min", "Max"}
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = net(x).numpy()
    assert float(((got - ref) ** 2).sum() / (ref ** 2).sum()) < 1e-3
    back = amc.ReconstructedNetwork.load_from_json(net.save_to_json(file=str(tmp_path / "q.json")))
    torch.testing.assert_close(back(x), net(x))
    assert "weight_observer='mse'" in repr(back)


def _has_vnni() -> bool:
    from amc.export.onnx_io import x86_without_vnni

    return not x86_without_vnni()


def test_onnx_int8_matches_fake_quant_within_one_step(tmp_path):
    """The quantised tensor at the end of the network: onnxruntime's integer kernels land on the same grid
    point as torch's fake quantisation, or on the neighbouring one at a rounding tie."""
    ort = pytest.importorskip("onnxruntime")
    model, loader = _model(), _loader()
    # onnxruntime's u8 x s8 kernels on x86 without VNNI (AVX2 only) add products pairwise in int16 and
    # saturate with 8-bit weights: its documented remedy is 7-bit weights (reduce_range)
    bits = 8 if _has_vnni() else 7
    net = Quantization(model, loader, trainset_ratio=1.0, weight_bits=bits).compress()
    last = net.outputs.node  # the head Linear: quantise its output too, and make that the network output
    qnet = insert_after(net, {last: ActQuant(8)}, "aq", "ActQuant", rewire_outputs=True)
    aq = [m for m in qnet.modules() if isinstance(m, ActQuant) and not bool(m.calibrated)][0]
    amc.compressors.quant.calibrate(qnet, [(b[0],) for b in loader], seed=0)
    path = amc.export.save_onnx(qnet, str(tmp_path / "q.onnx"), next(iter(loader))[0][:2])
    x = torch.rand(32, 1, 12, 12, generator=torch.Generator().manual_seed(5))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = qnet(x).numpy()
    steps = np.abs(got - ref) / float(aq.scale)
    assert steps.max() <= 1.0 + 1e-3, steps.max()
    assert (steps < 1e-3).mean() > 0.9  # most values exactly equal


def test_onnx_int8_file_stores_int8_weights_and_is_smaller(tmp_path):
    onnx = pytest.importorskip("onnx")
    model, loader = _model(), _loader()
    x = next(iter(loader))[0][:2]
    fp = amc.export.save_onnx(amc.trace(model, x[:1]), str(tmp_path / "f.onnx"), x)
    for bits in (8, 4):
        q = Quantization(model, loader, weight_bits=bits, trainset_ratio=1.0).compress()
        path = amc.export.save_onnx(q, str(tmp_path / f"q{bits}.onnx"), x)
        m = onnx.load(path)
        int8 = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8]
        assert len(int8) == 5, [i.name for i in m.graph.initializer]
        assert sum(n.op_type == "DequantizeLinear" for n in m.graph.node) >= 5 + 5
        assert _init_bytes(onnx, path) < 0.4 * _init_bytes(onnx, fp)


def _init_bytes(onnx, path):
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(i).nbytes for i in onnx.load(path).graph.initializer)


def test_same_arguments_give_identical_networks_and_leave_the_global_rng():
    model, loader = _model(), _loader()
    nets = []
    for s in (1, 2):
        torch.manual_seed(s)
        state = torch.get_rng_state()
        nets.append(Quantization(model, loader, observer="percentile", trainset_ratio=0.5).compress())
        assert torch.equal(torch.get_rng_state(), state)
    a, b = (n.state_dict() for n in nets)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantised_network_round_trips_through_json_and_prunes(tmp_path):
    model, loader = _model(), _loader()
    x = next(iter(loader))[0]
    net = Quantization(model, loader, weight_bits=4, trainset_ratio=1.0).compress()
    back = amc.ReconstructedNetwork.load_from_json(net.save_to_json(file=str(tmp_path / "q.json")))
    torch.testing.assert_close(back(x), net(x))
    small = amc.prune(net, 0.5, example_inputs=(x[:1],))  # quantised layers keep the conv's channel rule
    assert amc.count(small, x[:1])[0] < amc.count(net, x[:1])[0]
    assert small(x).shape == (16, 10)


def test_weight_only_and_qat_fine_tune():
    model, loader = _model(), _loader()
    net = Quantization(model, loader, act_bits=None).compress()
    assert not any(isinstance(m, ActQuant) for m in net.modules())
    qat = Quantization(model, loader, loader, weight_bits=4, qat_epochs=1, lr=0.01, trainset_ratio=1.0)
    before = Quantization(model, loader, weight_bits=4, trainset_ratio=1.0).compress()
    after = qat.compress()
    w0 = [m.weight for m in before.modules() if isinstance(m, QuantConv2d)][0]
    w1 = [m.weight for m in after.modules() if isinstance(m, QuantConv2d)][0]
    assert not torch.equal(w0, w1)  # QAT moved the float weights (gradients reach them straight through)


# ---------------------------------------------------------------------------- QuantNoise
def _tiny():
    seed_everything(0)
    return TinyCNN(width=8)


def _train(callbacks, net=None):
    net = net if net is not None else _tiny()
    seed_everything(0)
    tr, va = digits_loaders(batch_size=32, n_train=128, n_val=64)
    opt = optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    BaseTrainer(tr, va, None, net, nn.CrossEntropyLoss(), opt, None, 2, "cpu", None, None, None,
                callbacks=callbacks, progress=False).run()
    return net


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_quantnoise_rate_zero_trains_exactly_as_without_it():
    plain = _train([])
    noisy = _train([QuantNoise(rate=0.0, bits=4, eval_quantized=False)])
    assert _same(plain, noisy)


def _tiny_quantised(bits: int, weight_observer: str = "minmax") -> nn.Module:
    ref = _tiny()
    for m in list(ref.modules()):
        for child_name, child in list(m.named_children()):
            if type(child) in (nn.Conv2d, nn.Linear):
                cls = QuantConv2d if isinstance(child, nn.Conv2d) else QuantLinear
                setattr(m, child_name, cls.from_float(child, bits, weight_observer))
    return ref


def test_quantnoise_rate_one_is_qat():
    """rate=1 quantises every weight every step: bit for bit the weight-quantised layers' training."""
    qat = _train([], net=_tiny_quantised(4))
    noisy = _train([QuantNoise(rate=1.0, bits=4)])
    sa, sb = qat.state_dict(), noisy.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_quantnoise_half_rate_differs_and_restores_float_layers():
    plain = _train([])
    qn = QuantNoise(rate=0.5, bits=4)
    noisy = _train([qn])
    assert not _same(plain, noisy)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in noisy.modules() if hasattr(m, "weight")
               and not isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)))
    assert not any("parametrizations" in k for k in noisy.state_dict())


# ---------------------------------------------------------------------------- product quantisation
def _pq_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(),
                         nn.Linear(64, 10)).eval()


def test_pq_decodes_codebook_entries_and_round_trips(tmp_path):
    model, loader = _pq_model(), _loader()
    x = next(iter(loader))[0]
    net = ProductQuantization(model, loader, n_centroids=16).compress()
    layers = [m for m in net.modules() if isinstance(m, PQConv2d)]
    assert layers
    pq = layers[0]
    assert pq.codes.dtype == torch.uint8 and pq.weight.shape == (32, 16, 3, 3)
    torch.testing.assert_close(pq.weight.reshape(-1, 9), pq.codebook[pq.codes.long()])
    path = net.save_to_json(file=str(tmp_path / "pq.json"))
    back = amc.ReconstructedNetwork.load_from_json(path)
    for a, b in zip([m for m in net.modules() if isinstance(m, PQConv2d)],
                    [m for m in back.modules() if isinstance(m, PQConv2d)]):
        assert torch.equal(a.weight, b.weight) and b.codes.dtype == torch.uint8
    torch.testing.assert_close(back(x), net(x))
    assert amc.count_bytes(net) < 0.5 * amc.count_bytes(amc.trace(model, x[:1]))


def test_pq_block_size_must_divide_the_rows():
    model, loader = _pq_model(), _loader()
    net = amc.trace(model, next(iter(loader))[0][:1])
    with pytest.raises(QuantizationError, match="does not divide"):
        product_quantize(net, block_size=7, n_centroids=4, layers=["2"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight_bits=1), "weight_bits=1"), (dict(weight_bits=9), "weight_bits=9"),
    (dict(act_bits=16), "act_bits=16"), (dict(weight_bits=4.0), "weight_bits=4.0"),
    (dict(observer="kl"), "observer='kl'"), (dict(percentile=20), "percentile .* got 20"),
    (dict(weight_observer="percentile"), "weight_observer='percentile'"),
    # the arguments every seed compressor shares are a QuantizationError here too (they were PruningErrors)
    (dict(trainset_ratio=2), "trainset_ratio must be a fraction"), (dict(seed=-1), "seed must be an int"),
    (dict(device="no-such-device"), "device 'no-such-device' is not usable"),
    (dict(compress_ratio={"nope": 0.5}), "compress_ratio names unknown layer 'nope'"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(QuantizationError, match=match):
        Quantization(_model(), _loader(), **kwargs)


def test_empty_calibration_is_refused():
    model = _model()
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 12, 12), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(amc.errors.AmcError, match="empty|no batches"):
        Quantization(model, empty, example_inputs=(torch.rand(1, 1, 12, 12),)).compress()
    with pytest.raises(QuantizationError, match="no batches"):
        amc.compressors.quant.calibrate(_uncalibrated(model), [], seed=0)


def _uncalibrated(model):
    from amc.compressors.quant.prepare import insert_act_quants

    net, _ = quantize_weights(amc.trace(model, torch.rand(1, 1, 12, 12)), 8)
    return insert_act_quants(net, 8, "minmax", 99.99)[0]


def test_uncalibrated_quantiser_fails_loudly():
    with pytest.raises(QuantizationError, match="before calibration"):
        _uncalibrated(_model())(torch.rand(1, 1, 12, 12))


def test_quantnoise_bad_rate():
    with pytest.raises(QuantizationError, match="rate"):
        QuantNoise(rate=1.5)
    with pytest.raises(QuantizationError, match="weight_observer='kl'"):
        QuantNoise(rate=0.5, weight_observer="kl")


def test_quantnoise_rate_one_is_qat_on_the_mse_grid_too():
    qat = _train([], net=_tiny_quantised(4, "mse"))
    noisy = _train([QuantNoise(rate=1.0, bits=4, weight_observer="mse")])
    sa, sb = qat.state_dict(), noisy.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    minmax = _train([QuantNoise(rate=1.0, bits=4)])
    assert not all(torch.equal(sb[k], minmax.state_dict()[k]) for k in sb)


def test_count_bytes_reports_packed_weights():
    model, loader = _model(), _loader()
    x = next(iter(loader))[0][:1]
    net = amc.trace(model, x)
    q8 = Quantization(model, loader, trainset_ratio=1.0).compress()
    q4 = Quantization(model, loader, weight_bits=4, trainset_ratio=1.0).compress()
    weights = sum(m.weight.numel() for m in q8.modules() if isinstance(m, (QuantConv2d, QuantLinear)))
    assert amc.count_bytes(q8) - amc.count_bytes(q4) == weights // 2  # 4 bits fewer per weight
    assert amc.count_bytes(q8) < 0.45 * amc.count_bytes(net)
    table = amc.graph.counting.summary_table(q4, x)
    assert "bytes as stored" in table and " 4" in table


def test_onnx_check_still_catches_a_wrong_export(tmp_path, monkeypatch):
    """The quantised check's looser tolerance (rounding ties) must not hide an export that computes
    something else: break one weight after export and the check fails."""
    from amc.errors import ExportError
    from amc.export import onnx_io

    model, loader = _model(), _loader()
    net = Quantization(model, loader, trainset_ratio=1.0).compress()
    real = onnx_io.fold_constant_quantize

    def corrupt(path):
        import onnx
        from onnx import numpy_helper

        n = real(path)
        m = onnx.load(path)
        init = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8][0]  # the stem
        arr = numpy_helper.to_array(init).copy()
        arr = -arr  # the stem conv negated (a sign lost in export): 42% relative error
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        onnx.save(m, path)
        return n

    monkeypatch.setattr(onnx_io, "fold_constant_quantize", corrupt)
    with pytest.raises(ExportError, match="differs from the network"):
        amc.export.save_onnx(net, str(tmp_path / "bad.onnx"), next(iter(loader))[0][:2])


def test_quantnoise_reestimates_batchnorm_with_every_weight_quantised():
    plain = _train([QuantNoise(rate=0.5, bits=2)])
    recal = _train([QuantNoise(rate=0.5, bits=2, bn_batches=2)])
    sa, sb = plain.state_dict(), recal.state_dict()
    assert torch.equal(sa["conv1.weight"], sb["conv1.weight"])  # the weights trained the same
    assert not torch.equal(sa["bn1.running_mean"], sb["bn1.running_mean"])  # the statistics were re-estimated
    with pytest.raises(QuantizationError, match="bn_batches"):
        QuantNoise(bn_batches=-1)


@pytest.mark.parametrize("build,shape", [
    (lambda: amc.models.create("vit_digits", image_size=8, dim=24, depth=2, heads=2), (1, 8, 8)),
    (lambda: __import__("torchvision").models.mobilenet_v3_small(num_classes=10), (3, 32, 32)),
    (lambda: __import__("torchvision").models.resnet18(num_classes=10), (3, 32, 32)),
    (lambda: __import__("torchvision").models.video.r3d_18(num_classes=10), (3, 4, 32, 32)),
], ids=["vit_digits", "mobilenet_v3_small", "resnet18", "r3d_18"])
def test_zoo_models_quantise_and_export(build, shape, tmp_path):
    """r3d_18: its Conv3d layers (torchvision's Conv3DSimple, an nn.Conv3d subclass) are quantised too;
    before, only its fc was."""
    torch.manual_seed(0)
    model = build().eval()
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(16, *shape, generator=g), torch.zeros(16, dtype=torch.long)),
                        batch_size=8)
    x = torch.randn(4, *shape, generator=g)
    compressor = Quantization(model, loader, trainset_ratio=1.0)
    q = compressor.compress()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    assert len(compressor.quantized_layers) == len(layers)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in q.modules())  # all folded
    with torch.no_grad():
        assert _logit_error(q(x), model(x)) < 0.05
    amc.export.save_onnx(q, str(tmp_path / "q.onnx"), x[:2])  # checked by onnxruntime inside


@pytest.mark.parametrize("vnni", [False, True])
def test_save_onnx_warns_where_int8_kernels_saturate(tmp_path, monkeypatch, vnni):
    """8-bit weights exported on an x86 CPU without VNNI get a warning naming weight_bits=7; 7-bit weights,
    or a CPU with VNNI, do not."""
    import warnings

    from amc.export import onnx_io

    monkeypatch.setattr(onnx_io, "x86_without_vnni", lambda: not vnni)
    model, loader = _model(), _loader()
    x = next(iter(loader))[0][:2]
    for bits in (8, 7):
        q = Quantization(model, loader, weight_bits=bits, trainset_ratio=1.0).compress()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            amc.export.save_onnx(q, str(tmp_path / f"q{bits}.onnx"), x, check=False)
        warned = [w for w in seen if "weight_bits=7" in str(w.message)]
        assert len(warned) == (1 if bits == 8 and not vnni else 0), [str(w.message) for w in seen]


def test_quantised_linear_exports_with_an_int32_bias_and_fuses(tmp_path):
    """onnxruntime fuses a Gemm into QGemm only when its bias is int32 (scale = input scale x weight scale);
    with a float bias it dequantizes the whole int8 weight at every run. The export writes the int32 bias,
    and the file still computes what the network computes (save_onnx checks it)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, loader = _model(), _loader()
    x = next(iter(loader))[0][:2]
    q = Quantization(model, loader, trainset_ratio=1.0).compress()
    path = amc.export.save_onnx(q, str(tmp_path / "q.onnx"), x)
    m = onnx.load(path)
    gemms = [n for n in m.graph.node if n.op_type == "Gemm"]
    producer = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name: i for i in m.graph.initializer}
    assert gemms and all(producer[g.input[2]].op_type == "DequantizeLinear" for g in gemms)
    assert all(inits[producer[g.input[2]].input[0]].data_type == onnx.TensorProto.INT32 for g in gemms)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "QGemm" in ops and "Gemm" not in ops, ops


@pytest.mark.parametrize("observer", ["percentile", "mse", "minmax"])
def test_max_pooling_keeps_its_input_grid_and_runs_in_int8(observer, tmp_path):
    """A quantiser that reads max-pooled (and flattened) values of another one's output takes that one's grid:
    the values are on it already, and onnxruntime runs the pooling in int8 only then (the percentile and mse
    observers used to calibrate a second, coarser grid on the pooled maxima: float MaxPool between
    DequantizeLinear and QuantizeLinear, 0.50x instead of 0.45x of vgg_small's float latency)."""
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 3 * 3, 10)).eval()
    q = Quantization(model, _loader(), trainset_ratio=1.0, observer=observer).compress()
    scales = {n.name: float(q.network[n.module].scale) for n in q.layer_nodes
              if isinstance(q.network[n.module], ActQuant)}
    assert scales["2.aq"] == scales["1.aq"] and scales["6.aq"] == scales["4.aq"], scales
    path = amc.export.save_onnx(q, str(tmp_path / "q.onnx"), torch.rand(1, 1, 12, 12))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "MaxPool" not in ops and "DequantizeLinear" not in ops, ops  # int8 from the input Q to the logits


class TaggedLinear(nn.Linear):
    """A Linear subclass that only adds an attribute (library layers often are): computes what Linear does."""

    tag = "keeps Linear.forward"


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward: never rebuilt as a plain layer."""

    def forward(self, x):
        return super().forward(x) * 2


def test_layer_subclasses_that_keep_the_forward_are_quantised_and_decomposed():
    """INT8, product quantisation and low-rank skipped any subclass of their layer types (an exact type
    check); one that keeps its parent's forward is now the layer it computes, one that overrides it stays."""
    from amc.compressors import LowRankDecomposition

    torch.manual_seed(0)
    model = nn.Sequential(TaggedLinear(16, 32), nn.ReLU(), ScaledLinear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    loader = [(torch.randn(8, 16), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    q = Quantization(model, loader, trainset_ratio=1.0)
    q.compress()
    assert q.quantized_layers == ["0", "4"]
    pq = ProductQuantization(model, loader, n_centroids=4)
    pq.compress()
    assert sorted(pq.quantized_layers) == ["0", "4"]
    low = LowRankDecomposition(model, loader, compress_ratio=0.5, trainset_ratio=1.0).compress()
    assert [n.name for n in low.layer_nodes if n.name.startswith("0")] == ["0.lr0", "0"]  # two factors
