"""LowRankDecomposition: graph edit, rank formula, exactness at full rank, method ordering, seed API, errors;
compress_ratio=0.5 gives 0.5x MACs; reproducible under any global seed; nonlinear <= linear per layer.

One small digits ResNet (amc.models.digits_resnet, width 16) is trained for 3 epochs once per module on
the real sklearn digits; every test compresses it and checks the result against the original.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import amc
from amc.compressors.lowrank import LowRankDecomposition, LowRankDecompostion, eligible_layers, lowrank_rank
from amc.data import digits_loaders
from amc.errors import DataError, PruningError
from amc.graph.counting import node_costs
from amc.models import digits_resnet, evaluate, train_classifier

INNER = ["stages.0.0.conv1", "stages.0.0.conv2", "stages.1.0.conv1", "stages.1.0.conv2"]


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    train, val = digits_loaders(batch_size=64, seed=0)
    model = digits_resnet(width=16)
    train_classifier(model, train, val, epochs=3, lr=0.05, seed=0)
    model.eval()
    return model, train, val


def _state(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _lr(model, train, val, **kw):
    kw.setdefault("trainset_ratio", 0.5)
    return LowRankDecomposition(model, train, val, **kw)


def _weight_macs(net, names):
    rows = {r["name"]: r["macs"] for r in node_costs(net, *net.example_inputs(batch_size=1))}
    return {n: rows[n] for n in names}


def test_decomposed_runs_lints_counts_and_leaves_origin(trained):
    model, train, val = trained
    before = _state(model)
    c = _lr(model, train, val, compress_ratio=0.5, layers=INNER)
    origin_nodes = [n.name for n in c.origin_graph.layer_nodes]
    net = c.compress()
    net.lint()
    # origin untouched: module weights, graph nodes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [n.name for n in c.origin_graph.layer_nodes] == origin_nodes
    # node layout: <name>.lr0 then <name>; the folded BN is gone; consumers still read <name>
    names = [n.name for n in net.layer_nodes]
    for layer in INNER:
        i = names.index(layer)
        assert names[i - 1] == layer + ".lr0"
        first, second = net.module_of(layer + ".lr0"), net.module_of(layer)
        info = c.infos[layer]
        r = lowrank_rank(info.C, info.k2, info.N, 0.5)
        assert r == math.floor(0.5 * info.C * 9 * info.N / (info.C * 9 + info.N))
        assert (first.out_channels, first.kernel_size, first.bias) == (r, (3, 3), None)
        assert (second.in_channels, second.out_channels, second.kernel_size) == (r, info.N, (1, 1))
        assert info.bn not in names
        assert net.node(layer).meta["lowrank"]["rank"] == r
    # per-layer weight MACs at most half of the original conv's
    m_before = _weight_macs(c.origin_graph, INNER)
    m_after = _weight_macs(net, INNER + [n + ".lr0" for n in INNER])
    for layer in INNER:
        info = c.infos[layer]
        bias = info.positions * info.N
        assert m_after[layer] + m_after[layer + ".lr0"] - bias <= 0.5 * m_before[layer]
    assert amc.count(net)[0] < amc.count(c.origin_graph)[0]
    x = next(iter(val))[0]
    assert net(x).shape == model(x).shape
    assert net(x[:3]).shape == (3, 10)  # any batch size


@pytest.mark.parametrize("method", ["svd", "data"])
def test_full_rank_reproduces_original(trained, method):
    model, train, val = trained
    infos = eligible_layers(amc.trace(model, torch.randn(1, 1, 8, 8)))
    ranks = {n: i.full_rank for n, i in infos.items()}
    net = _lr(model, train, val, method=method, ranks=ranks, compress_ratio={"fc": 0.0}).compress()
    assert sum(1 for n in net.layer_nodes if n.name.endswith(".lr0")) == len(infos)
    for x, _ in list(val)[:2]:
        with torch.no_grad():
            torch.testing.assert_close(net(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("nonlinear", [False, True])
def test_asymmetric_full_rank_is_exact_and_low_rank_beats_symmetric(trained, nonlinear):
    """Asymmetric (sequential) fitting: exact at full rank; at 2x on every inner conv its output error
    on held-out images is below the per-layer (symmetric) fit, whose errors pile up with depth."""
    model, train, val = trained
    full = {n: 16 if "stages.0" in n else 32 for n in INNER}
    net = _lr(model, train, val, ranks=full, compress_ratio={n: 0.0 for n in INNER}, asymmetric=True,
              nonlinear_case=nonlinear).compress()
    x = torch.cat([b[0] for b in list(val)[:2]])
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), atol=1e-4, rtol=1e-4)
        ref = model(x)
        errs = {}
        for asym in (False, True):
            c = _lr(model, train, val, compress_ratio={n: 0.5 for n in INNER}, asymmetric=asym,
                    nonlinear_case=nonlinear)
            out = c.compress()(x)
            errs[asym] = float(((out - ref) ** 2).sum() / (ref ** 2).sum())
            if asym:
                assert all("asymmetric" in c.report[n]["method"] for n in INNER), c.report
    assert errs[True] < errs[False], errs


def test_asymmetric_memory_guard(trained, monkeypatch):
    """All calibration images go through the asymmetric pass as one batch: past the memory guard the
    default falls back to the per-layer fit with a warning, an explicit asymmetric=True refuses."""
    import amc.compressors.lowrank as lowrank

    model, train, val = trained
    monkeypatch.setattr(lowrank, "ASYMMETRIC_MAX_BYTES", 1)
    c = _lr(model, train, val, compress_ratio={"stages.0.0.conv1": 0.5})
    with pytest.warns(UserWarning, match="falling back to the per-layer fit"):
        c.compress()
    assert c.report["stages.0.0.conv1"]["method"] == "linear"
    with pytest.raises(DataError, match="lower trainset_ratio, or pass asymmetric=False"):
        _lr(model, train, val, compress_ratio={"stages.0.0.conv1": 0.5}, asymmetric=True).compress()


def test_full_rank_nonlinear_stays_exact(trained):
    model, train, val = trained
    layer = "stages.0.0.conv1"
    c = _lr(model, train, val, nonlinear_case=True, ranks={layer: 16}, compress_ratio={layer: 0.0})
    net = c.compress()
    x = next(iter(val))[0]
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), atol=1e-4, rtol=1e-4)


def _post_relu(net, relu: str, batches):
    outs = []

    def observe(node, module, args, kwargs, out):
        if node.name == relu:
            outs.append(out.detach().double())

    with torch.no_grad():
        for x, _ in batches:
            net.run_observed((x,), {}, observe)
    return torch.cat(outs)


def test_nonlinear_le_linear_le_svd_on_post_relu_error(trained):
    """2x on one layer: reconstruction error of the following ReLU's output on held-out val data."""
    model, train, val = trained
    layer, relu = "stages.1.0.conv1", "stages.1.0.relu1"
    batches = list(val)[:3]
    ref = _post_relu(amc.trace(model, batches[0][0]), relu, batches)
    errs = {}
    for name, kw in (("svd", dict(method="svd")), ("linear", dict(method="data", asymmetric=False)),
                     ("nonlinear", dict(method="data", nonlinear_case=True, asymmetric=False))):
        c = _lr(model, train, val, compress_ratio={layer: 0.5}, seed=0, **kw)
        net = c.compress()
        assert c.report[layer]["method"] == {"svd": "svd", "linear": "linear", "nonlinear": "nonlinear(relu)"}[name]
        errs[name] = float(((_post_relu(net, relu, batches) - ref) ** 2).mean())
    assert errs["nonlinear"] <= errs["linear"] <= errs["svd"], errs
    # on the calibration data the nonlinear solver never does worse than its linear start
    assert c.report[layer]["nonlinear_obj"] <= c.report[layer]["linear_obj"]


def test_nonlinear_falls_back_where_no_relu(trained):
    model, train, val = trained
    c = _lr(model, train, val, nonlinear_case=True, compress_ratio={"stages.0.0.conv2": 0.5, "fc": 0.5})
    c.compress()
    assert c.report["stages.0.0.conv2"]["method"].startswith("linear")  # BN then residual add, no ReLU
    assert c.report["fc"]["method"].startswith("linear")
    assert c.report["stages.0.0.conv2"]["method"] == "linear, asymmetric"  # the default for method="data"


def test_fold_bn_off_keeps_bn(trained):
    model, train, val = trained
    c = _lr(model, train, val, nonlinear_case=True, fold_bn=False, compress_ratio={"stages.0.0.conv1": 0.5})
    net = c.compress()
    assert "stages.0.0.bn1" in [n.name for n in net.layer_nodes]
    assert c.report["stages.0.0.conv1"]["method"].startswith("linear")
    assert net.node("stages.0.0.bn1").args[0].node == "stages.0.0.conv1"


@pytest.mark.parametrize("selection", ["energy", "accuracy", "combined"])
def test_rank_selection_respects_budget(trained, selection):
    model, train, val = trained
    c = _lr(model, train, val, compress_ratio=0.5, rank_selection=selection, layers=INNER, val_batches=2,
            acc_grid=4)
    net = c.compress()
    before = sum(c.infos[n].macs_before() for n in INNER)
    after = sum(c.infos[n].macs_after(r) if r else c.infos[n].macs_before() for n, r in c.chosen_ranks.items())
    after += sum(c.infos[n].macs_before() for n in INNER if n not in c.chosen_ranks)
    assert after <= 0.5 * before
    assert c.chosen_ranks
    net.lint()
    assert amc.count(net)[0] < amc.count(c.origin_graph)[0]


def test_target_macs_whole_network(trained):
    model, train, val = trained
    c = _lr(model, train, val, target_macs=0.6, rank_selection="energy", ignore=["stem.0"])
    net = c.compress()
    x = torch.randn(1, 1, 8, 8)
    assert amc.count(net, x)[0] <= 0.6 * amc.count(c.origin_graph, x)[0]


def test_json_and_pkl_round_trip(trained, tmp_path):
    pytest.importorskip("amc.export.json_io")
    model, train, val = trained
    net = _lr(model, train, val, compress_ratio=0.5, layers=INNER).compress()
    x = next(iter(val))[0]
    f = net.save_to_json(file=str(tmp_path / "lr.json"))
    back = amc.ReconstructedNetwork.load_from_json(file=str(f))
    back.lint()
    assert [n.name for n in back.layer_nodes] == [n.name for n in net.layer_nodes]
    with torch.no_grad():
        torch.testing.assert_close(back(x), net(x))
    net.save(pkl=str(tmp_path / "lr.pkl"))
    again = amc.ReconstructedNetwork.load(str(tmp_path / "lr.pkl"))
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x))


def test_seed_alias_with_code2_kwargs(trained, tmp_path):
    model, train, val = trained

    class Args:  # the seed's argparse namespace
        compress_nonlinear_case = True

    args = Args()
    ca = LowRankDecompostion(
        origin_net=model, trainloader=train, valloader=val, trainset_ratio=0.3, sampled_pixels_per_img=8,
        compress_ratio={n: 0.3 for n in INNER}, checkpointfolder=str(tmp_path), device="cpu", verbose=False,
        drawgraph=False, accuracy_first=True, accuracy_threshold=0.5, nonlinear_case=args.compress_nonlinear_case,
        args=args)
    origin_net = ca.origin_net
    ca.compress()
    compressed = ca.compressed_net
    assert origin_net is model
    assert evaluate(compressed, val)["acc"] >= 0.5
    assert LowRankDecompostion is LowRankDecomposition
    assert any(p.endswith(".pkl") for p in ca.saved_files) or ca.saved_files == []


def test_bad_inputs(trained):
    model, train, val = trained
    with pytest.raises(PruningError, match="asymmetric=True reconstructs from data"):
        _lr(model, train, val, method="svd", asymmetric=True)
    with pytest.raises(PruningError, match=r"\[0, 1\)"):
        _lr(model, train, val, compress_ratio=1.0)
    with pytest.raises(PruningError, match=r"\[0, 1\)"):
        _lr(model, train, val, compress_ratio=-0.1)
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(DataError, match="empty"):
        _lr(model, empty, val)
    with pytest.raises(PruningError, match="unknown layer 'nope'"):
        _lr(model, train, val, compress_ratio={"nope": 0.5})
    with pytest.raises(PruningError, match="stages.0.0.bn1"):  # a BN is not decomposable
        _lr(model, train, val, compress_ratio={"stages.0.0.bn1": 0.5})
    with pytest.raises(PruningError, match="not decomposable"):
        _lr(model, train, val, layers=["stages.0.0.relu1"])
    with pytest.raises(PruningError, match="method"):
        _lr(model, train, val, method="tucker")
    with pytest.raises(PruningError, match="rank_selection"):
        _lr(model, train, val, rank_selection="magic")
    with pytest.raises(PruningError, match="nonlinear_case"):
        _lr(model, train, val, method="svd", nonlinear_case=True)
    with pytest.raises(PruningError, match="ranks"):
        _lr(model, train, val, ranks={"stages.0.0.conv1": 10_000})
    with pytest.raises(PruningError, match="target_macs"):
        _lr(model, train, val, target_macs=1.5)


# -- budgets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, shape", [("digits_resnet", (1, 8, 8)), ("resnet20", (1, 28, 28))])
def test_compress_ratio_half_gives_half_the_macs(name, shape):
    """compress_ratio = fraction of each layer's MACs removed: 0.5 gives 0.5x +- 0.05 (as ChannelPruning)."""
    torch.manual_seed(0)
    model = amc.models.create(name).eval()
    x1 = torch.randn(1, *shape)
    loader = [(torch.randn(8, *shape), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    c = LowRankDecomposition(model, loader, None, trainset_ratio=1.0, compress_ratio=0.5, example_inputs=(x1,))
    got = amc.count(c.compress(), x1)[0] / amc.count(model, x1)[0]
    assert abs(got - 0.5) <= 0.05, got
    assert "fc" not in c.chosen_ranks  # the layer writing the logits stays whole by default


def test_output_layer_kept_unless_asked(trained):
    model, train, val = trained
    c = _lr(model, train, val, compress_ratio=0.5, decompose_output_layer=True)
    c.compress()
    assert "fc" in c.chosen_ranks
    c = _lr(model, train, val, compress_ratio={"fc": 0.5})  # named: decomposed
    c.compress()
    assert "fc" in c.chosen_ranks


# -- reproducible --------------------------------------------------------------------------------------


def _hash(net) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rng_states():
    import random

    import numpy as np

    return torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


@pytest.mark.parametrize("asymmetric", [True, False])
def test_same_arguments_same_network_under_any_global_seed(trained, asymmetric):
    """shuffle=True without a generator reads the global RNG when iterated: the result must not depend
    on it, and compress() must leave torch's, numpy's and python's global RNG states as they were."""
    import numpy as np

    model, train, val = trained
    shuffled = DataLoader(train.dataset, batch_size=64, shuffle=True)
    hashes = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        before = _rng_states()
        c = LowRankDecomposition(model, shuffled, val, trainset_ratio=0.3, compress_ratio={n: 0.5 for n in INNER},
                                 nonlinear_case=True, nonlinear_iters=5, asymmetric=asymmetric)
        net = c.compress()
        after = _rng_states()
        assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
        hashes.append(_hash(net))
    assert hashes[0] == hashes[1]
    other = LowRankDecomposition(model, shuffled, val, trainset_ratio=0.3, compress_ratio={n: 0.5 for n in INNER},
                                 nonlinear_case=True, nonlinear_iters=5, asymmetric=asymmetric, seed=1).compress()
    assert _hash(other) != hashes[0]


# -- nonlinear never worse than linear per layer ---------------------------------------------------------


def _layer_post_act_errors(origin, net, names, x):
    """Per layer: relative error of act(decomposed layer) vs act(original layer), both fed the ORIGINAL
    network's input of that layer (so each layer is judged alone)."""
    ins, outs = {}, {}
    infos = eligible_layers(origin)

    def observe(node, module, args, kwargs, out):
        if node.name in names:
            ins[node.name] = args[0]
        for n in names:
            if node.name == (infos[n].bn or n):
                outs[n] = out

    with torch.no_grad():
        origin.run_observed((x,), {}, observe)
        errs = {}
        for n in names:
            t = outs[n].clamp_min(0)
            p = net.module_of(n)(net.module_of(n + ".lr0")(ins[n])).clamp_min(0)
            errs[n] = float(((t - p) ** 2).sum() / (t ** 2).sum())
    return errs


@pytest.mark.parametrize("trainset_ratio", [0.5, 0.03])
def test_nonlinear_per_layer_error_not_above_linear(trained, trainset_ratio):
    """Each layer followed by a ReLU: post-ReLU error on held-out val images of the nonlinear case <= the
    linear case's. With few calibration images (0.03: 43 images) the nonlinear fit overfits some layers,
    which must then carry exactly the linear solution."""
    model, train, val = trained
    x = torch.cat([b[0] for b in val])
    nets, reports = {}, {}
    for nl in (False, True):
        c = _lr(model, train, val, trainset_ratio=trainset_ratio, compress_ratio=0.5, asymmetric=False,
                nonlinear_case=nl)
        nets[nl], reports[nl] = c.compress(), c.report
        origin = c.origin_graph
    relu_layers = [n for n in reports[True] if "heldout_linear" in reports[True][n]]
    assert len(relu_layers) >= 3
    lin = _layer_post_act_errors(origin, nets[False], relu_layers, x)
    non = _layer_post_act_errors(origin, nets[True], relu_layers, x)
    for n in relu_layers:
        r = reports[True][n]
        assert min(r["heldout_linear"], r["heldout_nonlinear"]) <= r["heldout_linear"]
        if r["method"].startswith("linear"):  # fell back: the very same factors as the linear case
            assert r["heldout_nonlinear"] >= r["heldout_linear"]
            for suffix in ("", ".lr0"):
                assert torch.equal(nets[True].module_of(n + suffix).weight, nets[False].module_of(n + suffix).weight)
        assert non[n] <= lin[n] * (1 + 1e-9), (n, r["method"], non[n], lin[n])
    fell_back = [n for n in relu_layers if reports[True][n]["method"].startswith("linear")]
    if trainset_ratio < 0.1:  # measured: stages.1.0.conv1 (32 outputs from 43 images x 16 positions) overfits
        assert fell_back, reports[True]
    else:
        assert not fell_back, reports[True]


def test_underdetermined_fit_warns(trained):
    model, train, val = trained
    with pytest.warns(UserWarning, match=r"under-determined.*sampled_pixels_per_img \(now 1\)"):
        _lr(model, train, val, trainset_ratio=0.02, sampled_pixels_per_img=1, compress_ratio={"stages.1.0.conv1": 0.5}
            ).compress()


@pytest.mark.parametrize("dims", [1, 3], ids=["conv1d", "conv3d"])
@pytest.mark.parametrize("kw", [{}, {"method": "svd"}, {"asymmetric": True}, {"nonlinear_case": True}],
                         ids=["data", "svd", "asymmetric", "nonlinear"])
def test_audio_and_video_convolutions_are_decomposed(dims, kw, tmp_path):
    """Conv1d (audio) and Conv3d (video) split like Conv2d: the same class with the layer's kernel and r
    outputs, then a 1x..x1 mix; BatchNorm1d/3d folded. They were refused ('no decomposable layer')."""
    conv, norm = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
    torch.manual_seed(0)
    model = nn.Sequential(conv(2, 16, 3, padding=1), norm(16), nn.ReLU(), conv(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(4))
    shape = (8, 2) + (6,) * dims
    model(torch.randn(*shape))
    model.eval()
    loader = [(torch.randn(*shape), torch.zeros(8, dtype=torch.long)) for _ in range(4)]
    low = LowRankDecomposition(model, loader, compress_ratio=0.4, trainset_ratio=1.0, **kw).compress()
    convs = [m for m in low.modules() if isinstance(m, conv)]
    assert len(convs) > 2 and not any(isinstance(m, norm) for m in low.modules())
    x = loader[0][0]
    assert amc.count(low, x)[0] < 0.8 * amc.count(model, x)[0]
    back = amc.ReconstructedNetwork.load_from_json(low.save_to_json(str(tmp_path / "low.json")))
    torch.testing.assert_close(back(x), low(x))
