"""The one op registry: every op capture can record says what pruning does with it, and a new layer is
one registration that capture, counting, pruning (hard and soft), JSON and the safe pkl loader all see."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import amc
import amc.compressors  # noqa: F401 - registers the channel rules
from amc.compressors import rules
from amc.graph import ops


def _node_capable(spec: ops.OpSpec) -> bool:
    """Entries that can become graph nodes: callables, leaf modules and amc's own op modules.
    FunctionOp subclasses are wrappers (their callables carry the facets); classes only taught to JSON
    are traced into and never become nodes."""
    key = spec.key
    if not isinstance(key, type):
        return True
    if issubclass(key, ops.FunctionOp):
        return False
    return spec.leaf or key.__module__ == ops.__name__


@pytest.mark.parametrize("spec", [s for s in ops.registered_ops() if _node_capable(s)],
                         ids=lambda s: f"{s.name}:{getattr(s.key, '__qualname__', repr(s.key))}")
def test_every_op_has_a_channel_rule_or_is_declared_opaque(spec):
    assert spec.declared, (f"{spec.key!r} is captured as {spec.name} but has no channel rule and is not marked "
                           "opaque: give it a rule (@register_rule) or mark_opaque it")


def test_a_rule_for_an_unknown_callable_makes_it_a_dedicated_op():
    fn = torch.special.expit
    assert ops.function_spec(fn) is None
    try:
        rules.register_rule(fn)(rules.opaque)
        spec = ops.function_spec(fn)
        assert spec is not None and spec.declared and spec.wrapper is ops.FunctionOp
    finally:
        ops._FUNCTION_OPS.pop(fn, None)


def test_overwriting_a_facet_warns_and_a_bad_role_is_refused():
    class Tmp(nn.Module):
        def forward(self, x):
            return x

    try:
        amc.register_op(Tmp, opaque=True)
        with pytest.warns(UserWarning, match="channels of the op registry entry"):
            amc.register_op(Tmp, channels=rules.opaque)
            amc.register_op(Tmp, channels=lambda c: None)
        with pytest.raises(ValueError, match="role must be one of"):
            amc.register_op(Tmp, role="consumer")
        with pytest.raises(ValueError, match="no op registry entry"):
            amc.register_op(Tmp, like=object())
    finally:
        ops._MODULE_OPS.pop(Tmp, None)


# ----------------------------------------------------------------------------------------------
# A new layer end to end: the README's "Extending amc" example, as written there.

class ScaledConv2d(nn.Conv2d):
    """A conv whose output channels are multiplied by a learned scale (its own forward, so amc would
    otherwise trace into it and see a conv followed by a multiplication)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.rand(self.out_channels) + 0.5)

    def forward(self, x):
        return super().forward(x) * self.scale.view(1, -1, 1, 1)


@pytest.fixture
def scaled_conv_registered():
    @amc.register_op(ScaledConv2d, like=nn.Conv2d)
    def scaled_conv(c):
        out = rules.conv(c)  # weight, bias, in/out channels exactly as nn.Conv2d
        c.axis("scale", 0, out.dims[1])  # and the scale follows the output channels
        return out

    yield
    ops._MODULE_OPS.pop(ScaledConv2d, None)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(ScaledConv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         ScaledConv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10)).eval()


def test_one_registration_captures_counts_and_prunes_a_new_layer(scaled_conv_registered, tmp_path):
    model, x = _model(), torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "frozen for pruning" fallback warning
        net = amc.trace(model, x)
    assert [type(net.module_of(n.name)).__name__ for n in net.layer_nodes].count("ScaledConv2d") == 2
    macs = amc.count(net, x)[0]
    assert amc.count(model, x)[0] == macs >= 2 * 16 * 16 * 16 * 3 * 9  # the first conv's MACs at least

    pruned = amc.prune(net, ratio=0.5, example_inputs=(x,))
    convs = [pruned.module_of(n.name) for n in pruned.layer_nodes if isinstance(pruned.module_of(n.name), ScaledConv2d)]
    assert [c.out_channels for c in convs] == [8, 8] and [c.scale.numel() for c in convs] == [8, 8]
    assert convs[1].in_channels == 8 and convs[1].weight.shape[1] == 8  # resize came from like=nn.Conv2d
    assert pruned(x).shape == (2, 10) and amc.count(pruned, x)[0] < macs * 0.5

    soft = amc.prune(net, ratio=0.5, example_inputs=(x,), mode="soft")
    torch.testing.assert_close(soft(x), pruned(x), rtol=1e-4, atol=1e-5)

    path = str(tmp_path / "scaled.json")
    pruned.save_to_json(path)
    again = amc.ReconstructedNetwork.load_from_json(path)
    torch.testing.assert_close(again(x), pruned(x))
    pkl = str(tmp_path / "scaled.pkl")
    pruned.save(pkl)
    torch.testing.assert_close(amc.ReconstructedNetwork.load(pkl=pkl)(x), pruned(x))


def test_without_the_registration_the_layer_is_traced_into(tmp_path):
    model, x = _model(), torch.randn(2, 3, 16, 16)
    net = amc.trace(model, x)
    assert not any(isinstance(net.module_of(n.name), ScaledConv2d) for n in net.layer_nodes)
    torch.testing.assert_close(net(x), model(x))
