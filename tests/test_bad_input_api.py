"""Public helpers given inputs that do not fit: an `AmcError` that says so, not torch's or Python's own
exception from deep inside (found by trying odd arguments on each helper of the README)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import amc
from amc.errors import DataError, ExportError, GraphError, PruningError


def _net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(2, 1, 8, 8)
    return model.eval(), x, amc.trace(model.eval(), x)


@pytest.mark.parametrize("call,error,match", [
    (lambda m, x, net, tmp: amc.count(net, torch.randn(1, 3, 8, 8)), GraphError, "could not run the network"),
    (lambda m, x, net, tmp: amc.count(net, "x"), GraphError, "could not run the network"),
    (lambda m, x, net, tmp: amc.count_bytes("x"), GraphError, "needs an nn.Module"),
    (lambda m, x, net, tmp: amc.latency_table(m, (x,), ratios="abc"), PruningError, "ratios in \\[0, 1\\)"),
    (lambda m, x, net, tmp: amc.latency_table(m, (x,), rounds=-1), PruningError, "rounds must be an int"),
    (lambda m, x, net, tmp: amc.export.save_onnx(net, str(tmp / "x.onnx"), torch.randn(1, 3, 8, 8)), ExportError,
     "does not run on the example inputs"),
    (lambda m, x, net, tmp: amc.trainers.recalibrate_bn(net, 3), DataError, "iterable of batches"),
    (lambda m, x, net, tmp: amc.models.create("resnet20", num_classes=-1), amc.models.ModelArgumentError,
     "num_classes must be an int >= 1"),                                     # was torch's RuntimeError
    (lambda m, x, net, tmp: amc.models.create("digits_resnet", widht=16), amc.models.ModelArgumentError,
     r"takes no argument\(s\) \['widht'\].*'width'"),                    # a typo: the message lists what it takes
], ids=["count-shape", "count-text", "count_bytes-text", "latency-ratios", "latency-rounds", "onnx-shape", "bn-int",
        "create-classes", "create-typo"])
def test_helpers_refuse_inputs_that_do_not_fit(tmp_path, call, error, match):
    model, x, net = _net()
    before = [t.clone() for t in net.state_dict().values()]
    with pytest.raises(error, match=match):
        call(model, x, net, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, net.state_dict().values()))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_example_inputs_in_every_spelling_a_user_tries():
    """One tensor, a list or a tuple as `example_inputs=`, and `example_inputs=` on amc.trace / amc.count too
    (the keyword amc.prune takes): all the same network; each was a torch error or a wrong trace before."""
    from amc.compressors import LowRankDecomposition

    model, x, _ = _net()
    assert amc.count(model, example_inputs=(x,)) == amc.count(model, x) == amc.count(model, example_inputs=x)
    nets = [amc.prune(model, example_inputs=e, ratio=0.5) for e in ((x,), [x], x)]
    with torch.no_grad():
        outs = [n(x) for n in nets] + [amc.prune(amc.trace(model, example_inputs=x), example_inputs=x)(x)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert [g.size for g in amc.prune_groups(model, example_inputs=x)] == [
        g.size for g in amc.prune_groups(model, example_inputs=(x,))]
    loader = [(x, torch.zeros(2, dtype=torch.long))]
    lr = LowRankDecomposition(origin_net=model, trainloader=loader, example_inputs=x, compress_ratio=0.5)
    assert len(lr.example_inputs) == 1 and torch.equal(lr.example_inputs[0], x)  # was x's rows, one per input
    with pytest.raises(PruningError, match="second argument is the ratio.*example_inputs=\\(x,\\)"):
        amc.prune(model, x, target_macs=0.5)  # was "needs example inputs ... got none"
    with pytest.raises(PruningError, match="positional inputs, a tuple such as \\(x,\\)"):
        amc.prune(model, example_inputs={"x": x})


@pytest.mark.parametrize("budget", [50, 75.0])
def test_a_percentage_as_target_macs_is_named(budget):
    """target_macs above 1 is a MACs count (documented); 50 meaning 50% used to fail with no hint of why."""
    model, x, _ = _net()
    with pytest.raises(PruningError, match=f"for {budget:g}% of the MACs write target_macs={budget / 100:g}"):
        amc.prune(model, example_inputs=x, target_macs=budget)


def test_a_compressor_names_itself_and_the_argument_meant():
    """Quantization(bits=4) said "BaseCompressor.__init__() got an unexpected keyword argument 'bits'"."""
    from amc.compressors import Quantization
    from amc.errors import AmcError

    model, x, _ = _net()
    loader = [(x, torch.zeros(2, dtype=torch.long))]
    with pytest.raises(TypeError, match="Quantization takes no argument 'bits' \\(did you mean .*'weight_bits'") as e:
        Quantization(origin_net=model, trainloader=loader, bits=4)
    assert isinstance(e.value, AmcError) and "act_bits" in str(e.value)


class TwoInputs(nn.Module):
    """A forward with two required inputs (an image and a timestep, as a diffusion UNet takes them)."""

    def __init__(self):
        super().__init__()
        self.c1, self.t, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(1, 16), nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x, t):
        return self.c2((self.c1(x) + self.t(t.float()[:, None])[:, :, None, None]).relu())


@pytest.mark.parametrize("name", ["ChannelPruning", "LowRankDecomposition", "Quantization"])
def test_compressors_feed_a_multi_input_model_from_dict_batches(name):
    """Dict batches keyed by the forward's own parameter names feed every input; the key `x` was read as an
    image key, so only `x` was traced and the capture failed on the missing `t`. A tuple batch, read as
    (inputs, labels), is refused with the names to use."""
    from amc import compressors

    torch.manual_seed(0)
    model, x, t = TwoInputs().eval(), torch.randn(4, 3, 8, 8), torch.tensor([1, 5, 9, 2])
    cls = getattr(compressors, name)
    out = cls(model, [{"x": x, "t": t}] * 2, compress_ratio=0.5).compress() if name != "Quantization" else \
        cls(model, [{"x": x, "t": t}] * 2, trainset_ratio=1.0).compress()
    assert out(x, t).shape == (4, 3, 8, 8)
    with pytest.raises(DataError, match=r"takes 2 inputs \(x, t\).*\{'x': \.\.\., 't': \.\.\.\}"):
        cls(model, [(x, t)] * 2, compress_ratio=0.5).compress()
