"""ChannelPruning (He et al. 2017) on amc's graph: MACs target, origin untouched, accuracy vs L1,
least squares, seed alias and arguments, errors, accuracy threshold, the pure helpers; compress_ratio as
the fraction of each layer's MACs removed; reproducible under any global seed, RNG left untouched."""
from __future__ import annotations

import argparse
import hashlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import amc
from amc.compressors.channel_pruning import (ChannelPruning, ChannelPrunning, conv_patches, fit_layer,
                                             lasso_select, unit_gram)
from amc.errors import DataError, PruningError
from amc.data import digits_loaders
from amc.models import create, evaluate, train_classifier


def _hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def trained():
    """digits_resnet trained 3 epochs on the digits (about 3 s on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr, va = digits_loaders(seed=0)
        torch.manual_seed(0)
        model = create("digits_resnet")
        train_classifier(model, tr, va, epochs=3, seed=0)
        model.eval()
        x1 = next(iter(va))[0][:1]
        yield model, tr, va, x1
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def halved(trained):
    """ChannelPruning of the trained model to <= 0.5x MACs, with the origin's hash taken before."""
    model, tr, va, x1 = trained
    before = _hash(model)
    cp = ChannelPruning(model, tr, va, trainset_ratio=0.5, compress_ratio=0.0, example_inputs=(x1,))
    graph_before = _hash(cp.origin_graph)
    cp.compress_ratio = cp.uniform_ratio_for_macs(0.5)
    net = cp.compress()
    return cp, net, before, graph_before


def test_macs_at_most_target_and_network_runs(trained, halved):
    model, tr, va, x1 = trained
    cp, net, _, _ = halved
    macs0, params0 = amc.count(cp.origin_graph, x1)
    macs1, params1 = amc.count(net, x1)
    assert macs1 <= 0.5 * macs0
    assert macs1 >= 0.4 * macs0  # not wildly over-pruned either
    assert params1 < params0
    net.lint()
    assert cp.compressed_net is net
    with torch.no_grad():
        for b in (1, 5):
            assert net(torch.randn(b, 1, 8, 8)).shape == (b, 10)


def test_origin_untouched(trained, halved):
    model, *_ = trained
    cp, _, before, graph_before = halved
    assert _hash(model) == before
    assert _hash(cp.origin_graph) == graph_before
    assert cp.origin_net is model


def test_beats_l1_norm_pruning_without_finetuning(trained, halved):
    """Measured (seed 0): channel pruning 0.975, L1 at the same MACs 0.148; the margin is 0.3."""
    model, tr, va, x1 = trained
    cp, net, _, _ = halved
    l1 = amc.prune(cp.origin_graph, criterion="l1", target_macs=0.5)
    assert amc.count(l1, x1)[0] == amc.count(net, x1)[0]  # same channel counts, same MACs
    acc_cp, acc_l1 = evaluate(net, va)["acc"], evaluate(l1, va)["acc"]
    assert acc_cp > acc_l1 + 0.3, (acc_cp, acc_l1)
    assert acc_cp > 0.9


def test_least_squares_reduces_reconstruction_error(trained, halved):
    model, tr, va, x1 = trained
    cp, net, _, _ = halved
    assert set(cp.layer_errors) >= {"stages.0.0.conv1", "stages.1.0.conv2", "fc"}
    for name, e in cp.layer_errors.items():
        assert e["after"] < e["before"], (name, e)
    no_ls = ChannelPruning(model, tr, va, trainset_ratio=0.5, compress_ratio=cp.compress_ratio,
                           least_squares=False, example_inputs=(x1,)).compress()
    assert evaluate(net, va)["acc"] > evaluate(no_ls, va)["acc"]


def test_seed_alias_with_code2_arguments(trained, tmp_path):
    model, tr, va, _ = trained
    args = argparse.Namespace(compress_trainset_ratio=0.3, compress_sampled_pixels_per_img=8, compress_ratios=0.3,
                              checkpoint_folder=str(tmp_path), compress_draw_graph=False, verbose=False,
                              lars_alpha_init=1e-4, compress_acc_thresh=0)
    assert ChannelPrunning is ChannelPruning
    ca = ChannelPrunning(
        origin_net=model,
        trainloader=tr,
        valloader=va,
        trainset_ratio=args.compress_trainset_ratio,
        sampled_pixels_per_img=args.compress_sampled_pixels_per_img,
        compress_ratio=args.compress_ratios,
        checkpointfolder=args.checkpoint_folder,
        device="cpu",
        drawgraph=args.compress_draw_graph,
        verbose=args.verbose,
        lars_alpha_init=args.lars_alpha_init,
        accuracy_first=True if args.compress_acc_thresh > 0 else False,
        accuracy_threshold=args.compress_acc_thresh,
        args=args,
    )
    assert ca.origin_net is model and ca.args is args
    ca.compress()
    assert isinstance(ca.compressed_net, amc.ReconstructedNetwork)
    assert (tmp_path / "channel_pruning.json").is_file() and (tmp_path / "channel_pruning.pkl").is_file()
    loaded = amc.ReconstructedNetwork.load(str(tmp_path / "channel_pruning.pkl"))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ca.compressed_net.eval()(x))


def test_per_layer_dict_ratio_prunes_only_that_group(trained):
    model, tr, va, x1 = trained
    # a key prunes the input channels of that layer (He et al.): conv2's input = conv1's output
    cp = ChannelPruning(model, tr, va, compress_ratio={"stages.0.0.conv2": 0.5}, example_inputs=(x1,))
    net = cp.compress()
    assert net.module_of("stages.0.0.conv1").out_channels == 16
    assert net.module_of("stages.0.0.conv2").in_channels == 16
    assert net.module_of("stages.0.0.conv2").out_channels == 32
    assert net.module_of("stages.1.0.conv1").out_channels == 64
    assert set(cp.layer_errors) == {"stages.0.0.conv2"}
    # the first conv consumes no prunable channels: its key prunes its output (the residual group)
    net2 = ChannelPruning(model, tr, va, compress_ratio={"stem.0": 0.5}, example_inputs=(x1,)).compress()
    assert net2.module_of("stem.0").out_channels == 16
    assert net2.module_of("stages.0.0.conv2").out_channels == 16
    assert net2.module_of("stages.0.0.conv1").out_channels == 32


@pytest.mark.parametrize("selection", ["first_k", "max_response"])
def test_baseline_selections(trained, selection):
    model, tr, va, x1 = trained
    cp = ChannelPruning(model, tr, va, compress_ratio={"stages.0.0.conv2": 0.5}, selection=selection,
                        example_inputs=(x1,))
    cp.compress()
    (kept,) = cp.kept.values()
    assert len(kept) == 16
    if selection == "first_k":
        assert kept.tolist() == list(range(16))


@pytest.mark.parametrize("ratio, match", [
    (1.0, r"\[0, 1\)"), (-0.1, r"\[0, 1\)"), ("0.5", "float"), (True, "float"),
    ({"no.such.layer": 0.2}, "no.such.layer.*valid names include"),
    ({"stages.0.0.relu1": 0.2}, "stages.0.0.relu1"), ({"stages.0.0.conv1": 1.5}, r"stages.0.0.conv1.*\[0, 1\)"),
])
def test_bad_compress_ratio(trained, ratio, match):
    model, tr, va, x1 = trained
    with pytest.raises(PruningError, match=match):
        ChannelPruning(model, tr, va, compress_ratio=ratio, example_inputs=(x1,))


def test_bad_arguments(trained):
    model, tr, va, x1 = trained
    with pytest.raises(DataError, match="trainloader is empty"):
        ChannelPruning(model, [], va, compress_ratio=0.3)
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0)))
    with pytest.raises(DataError):
        ChannelPruning(model, empty, va, compress_ratio=0.3)
    with pytest.raises(DataError, match="valloader is empty"):
        ChannelPruning(model, tr, [], compress_ratio=0.3)
    with pytest.raises(PruningError, match="trainset_ratio"):
        ChannelPruning(model, tr, va, trainset_ratio=0.0)
    with pytest.raises(PruningError, match="selection"):
        ChannelPruning(model, tr, va, selection="random")
    with pytest.raises(PruningError, match="sampled_pixels_per_img"):
        ChannelPruning(model, tr, va, sampled_pixels_per_img=0)


def test_accuracy_threshold_backs_off(trained):
    """Without least squares, compress_ratio 0.5 (half the MACs) falls below 0.85 accuracy: the threshold
    forces milder ratios (0.5 x 0.8^k)."""
    model, tr, va, x1 = trained
    cp = ChannelPruning(model, tr, va, trainset_ratio=0.5, compress_ratio=0.5, least_squares=False,
                        accuracy_first=True, accuracy_threshold=0.85, example_inputs=(x1,))
    net = cp.compress()
    assert cp.evaluate(net) >= 0.85
    assert len(cp.history) > 1 and cp.history[0]["acc"] < 0.85
    assert cp.compressed_ratio < 0.5
    # percent is accepted too; a threshold above the origin's own accuracy cannot be honoured
    with pytest.raises(PruningError, match="above the origin"):
        ChannelPruning(model, tr, va, compress_ratio=0.3, accuracy_first=True, accuracy_threshold=100,
                       example_inputs=(x1,)).compress()


def test_residual_and_linear_consumers_on_vgg():
    """vgg_small: flatten -> Linear consumes 9 features per channel; untrained, random data."""
    torch.manual_seed(0)
    model = create("vgg_small").eval()
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    cp = ChannelPruning(model, loader, loader, trainset_ratio=1.0, compress_ratio=0.4)
    with pytest.warns(UserWarning, match=r"under-determined: classifier\.0 \(32 rows"):  # 32 images, 1 row each
        net = cp.compress()
    net.lint()
    x = torch.randn(2, 1, 28, 28)
    assert net(x).shape == (2, 10)
    assert "classifier.0" in cp.layer_errors  # the Linear after flatten was re-fitted
    assert net.module_of("classifier.0").in_features < 128 * 9
    assert amc.count(net, x[:1])[0] < amc.count(cp.origin_graph, x[:1])[0]


# -- pure helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (2, 2, 2), (1, 0, 1)])
def test_conv_patches_match_unfold(stride, padding, dilation):
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 3, 9, 9)
    out = conv(x)
    ho, wo = out.shape[-2:]
    pos = torch.tensor([[0, ho * wo - 1, 3], [1, 2, ho * wo // 2]])
    got = conv_patches(conv, x, pos, wo)
    cols = F.unfold(x, 3, dilation=dilation, padding=padding, stride=stride)  # [N, C*9, L]
    want = torch.stack([cols[b, :, pos[b]].T for b in range(2)]).reshape(-1, 27)
    torch.testing.assert_close(got, want)
    y = got @ conv.weight.reshape(4, -1).T + conv.bias
    torch.testing.assert_close(y, torch.stack([out.flatten(2)[b, :, pos[b]].T for b in range(2)]).reshape(-1, 4),
                               rtol=1e-4, atol=1e-5)


def test_unit_gram_matches_explicit_contributions():
    torch.manual_seed(0)
    x = torch.randn(50, 6 * 4)  # 6 channels, kernel 2x2
    w = torch.randn(5, 6 * 4)
    unit_index = np.array([0, 0, 1, -1, 2, 1])
    g = unit_gram(x, w, unit_index, 3, 4)
    z = torch.einsum("rck,ock->rco", x.view(50, 6, 4), w.view(5, 6, 4)).double()
    zu = torch.stack([z[:, unit_index == u].sum(1).flatten() for u in range(3)])
    torch.testing.assert_close(g, zu @ zu.T)


def test_lasso_select_keeps_informative_units():
    torch.manual_seed(0)
    z = torch.zeros(8, 200, dtype=torch.float64)
    z[[1, 4, 6]] = torch.randn(3, 200, dtype=torch.float64) * torch.tensor([[3.0], [2.0], [1.0]], dtype=torch.float64)
    z[[0, 2, 3, 5, 7]] = 1e-3 * torch.randn(5, 200, dtype=torch.float64)
    kept, beta = lasso_select(z @ z.T, 3)
    assert kept.tolist() == [1, 4, 6]
    assert len(kept) == 3 and beta.shape == (8,)


def test_fit_layer_recovers_weights_and_prefers_prior_when_underdetermined():
    torch.manual_seed(0)
    w_true, b_true = torch.randn(4, 10), torch.randn(4)
    x = torch.randn(200, 10)
    w, b = fit_layer(x, x @ w_true.T + b_true, torch.zeros(4, 10), torch.zeros(4), ridge=1e-8)
    torch.testing.assert_close(w.float(), w_true, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.float(), b_true, rtol=1e-4, atol=1e-4)
    # fewer rows than columns: the dual form, and the fit stays close to the prior where data says nothing
    x = torch.randn(5, 10)
    w, b = fit_layer(x, x @ w_true.T, w_true, None, ridge=1e-3)
    torch.testing.assert_close(w.float(), w_true, rtol=1e-3, atol=1e-3)
    assert b is None


# -- budgets: compress_ratio is the fraction of each layer's MACs removed (seed 003, section 4) ---------


@pytest.mark.parametrize("name, shape", [("digits_resnet", (1, 8, 8)), ("resnet20", (1, 28, 28))])
def test_compress_ratio_half_gives_half_the_macs(name, shape):
    """compress_ratio=0.5 halves the MACs (0.5x +- 0.05), as LowRankDecomposition does; it used to prune
    half the channels of every group (0.255x). target_macs keeps meaning the fraction of MACs kept."""
    torch.manual_seed(0)
    model = create(name).eval()
    x1 = torch.randn(1, *shape)
    loader = [(torch.randn(8, *shape), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    macs0 = amc.count(model, x1)[0]
    cp = ChannelPruning(model, loader, None, trainset_ratio=1.0, compress_ratio=0.5, least_squares=False,
                        selection="first_k", example_inputs=(x1,))  # the budget, not the selection, is tested
    got = amc.count(cp.compress(), x1)[0] / macs0
    assert abs(got - 0.5) <= 0.05, got
    # one uniform channel fraction for every group: about 1 - sqrt(0.5), not 0.5
    assert 0.25 < cp.channel_fraction(0.5) < 0.35
    # a float from uniform_ratio_for_macs passed back reaches that whole-network target
    cp2 = ChannelPruning(model, loader, None, trainset_ratio=1.0, compress_ratio=cp.uniform_ratio_for_macs(0.6),
                         least_squares=False, selection="first_k", example_inputs=(x1,))
    assert amc.count(cp2.compress(), x1)[0] <= 0.6 * macs0
    small = ChannelPruning(model, loader, None, trainset_ratio=1.0, target_macs=0.3, least_squares=False,
                           selection="first_k", example_inputs=(x1,)).compress()
    assert 0.25 <= amc.count(small, x1)[0] / macs0 <= 0.3


def test_compress_ratio_out_of_reach_is_refused(trained):
    """Two channels between a conv and a linear: at most half of their MACs can go."""
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 10)).eval()
    loader = [(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(PruningError, match=r"removes only 4\d\.\d% of them; lower compress_ratio"):
        ChannelPruning(tiny, loader, None, trainset_ratio=1.0, compress_ratio=0.6).compress()
    model, tr, va, x1 = trained
    with pytest.raises(PruningError, match="target_macs"):
        ChannelPruning(model, tr, va, target_macs=1.5, example_inputs=(x1,))


# -- reproducible: the compressor's seed decides, the caller's RNG is neither read nor changed ------------


def _rng_states():
    import random

    return torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


def _same_rng(a, b) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_same_arguments_same_network_under_any_global_seed(trained):
    """A loader with shuffle=True and no generator of its own reads the global RNG when iterated: the
    compressor must neither depend on it nor leave it changed."""
    model, tr, va, x1 = trained
    shuffled = torch.utils.data.DataLoader(tr.dataset, batch_size=64, shuffle=True)
    hashes = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        before = _rng_states()
        cp = ChannelPruning(model, shuffled, va, trainset_ratio=0.3, compress_ratio=0.5)
        net = cp.compress()
        assert _same_rng(before, _rng_states()), "compress() changed the caller's global RNG state"
        hashes.append(_hash(net))
    assert hashes[0] == hashes[1]
    # reusing a loader that shuffles from its own generator does not advance that generator either
    gen_state = tr.generator.get_state().clone()
    other = ChannelPruning(model, tr, va, trainset_ratio=0.3, compress_ratio=0.5, seed=1).compress()
    assert torch.equal(gen_state, tr.generator.get_state())
    assert _hash(other) != hashes[0]  # and the seed is what decides: another seed, other samples


@pytest.mark.parametrize("criterion", ["thinet", "apoz"])
def test_sampling_criteria_reproducible_and_rng_neutral(trained, criterion):
    from amc.compressors import plan_pruning

    model, tr, va, x1 = trained
    shuffled = torch.utils.data.DataLoader(tr.dataset, batch_size=32, shuffle=True)
    scores = []
    for global_seed in (3, 4):
        torch.manual_seed(global_seed)
        before = _rng_states()
        plan = plan_pruning(model, criterion, (x1,), dataloader=shuffled)
        assert _same_rng(before, _rng_states())
        scores.append(torch.cat([s.flatten() for s in plan.importance]))
    assert torch.equal(scores[0], scores[1])


# -- robust defaults: samples sized from the layer, a warning when a given count leaves a fit short --------


def test_samples_sized_per_layer_and_underdetermined_warning(trained):
    model, tr, va, x1 = trained
    cp = ChannelPruning(model, tr, va, trainset_ratio=0.2, compress_ratio=0.5, example_inputs=(x1,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cp.compress()
    assert not [w for w in caught if "under-determined" in str(w.message)]
    n_img = int(cp.calibration_inputs()[0].shape[0])
    for name, rows in cp.sampled_rows.items():
        mod = cp.origin_graph.module_of(name)
        if isinstance(mod, nn.Conv2d):
            d = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
            h, w = cp.origin_graph.node(name).meta["out"]["shape"][-2:]
            assert rows >= min(16 * d, n_img * h * w), (name, rows, d)  # 16 rows per column, or every position
    few = ChannelPruning(model, tr, va, trainset_ratio=0.05, sampled_pixels_per_img=1, compress_ratio=0.5,
                         example_inputs=(x1,))
    with pytest.warns(UserWarning, match=r"under-determined.*raise sampled_pixels_per_img \(now 1\)"):
        few.compress()
    n_few = int(few.calibration_inputs()[0].shape[0])
    assert set(few.sampled_rows.values()) == {n_few}  # the given count is honoured: one row per image
