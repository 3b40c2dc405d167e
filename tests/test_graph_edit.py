"""The shared graph edits (`amc.graph.edit`): insert a node after a producer, drop identity nodes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import amc
from amc.graph.edit import insert_after, remove_nodes


class Scale(nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k


def _net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    return model, amc.trace(model, torch.randn(1, 1, 8, 8))


def test_insert_after_rewires_every_reader_and_keeps_the_input_untouched():
    model, net = _net()
    x = torch.randn(2, 1, 8, 8)
    first = net.layer_nodes[0].name
    new = insert_after(net, {first: Scale(2.0), net.input_nodes[0].name: Scale(0.5)}, "s", "Scale")
    new.lint()
    assert len(new.layer_nodes) == len(net.layer_nodes) + 2 and len(net.layer_nodes) == 3
    with torch.no_grad():
        ref = model[2](model[1](model[0](x * 0.5) * 2.0))
    torch.testing.assert_close(new(x), ref)
    torch.testing.assert_close(net(x), model(x))  # the input graph is unchanged


def test_insert_after_an_output_only_rewires_it_when_asked():
    model, net = _net()
    last = net.layer_nodes[-1].name
    x = torch.randn(2, 1, 8, 8)
    kept = insert_after(net, {last: Scale(3.0)}, "s", "Scale")
    torch.testing.assert_close(kept(x), model(x))
    rewired = insert_after(net, {last: Scale(3.0)}, "s", "Scale", rewire_outputs=True)
    torch.testing.assert_close(rewired(x), 3 * model(x))
    with pytest.raises(KeyError, match="no node named"):
        insert_after(net, {"nope": Scale(1.0)}, "s", "Scale")


def test_remove_nodes_drops_identities_and_their_modules():
    model, net = _net()
    x = torch.randn(2, 1, 8, 8)
    relu = net.layer_nodes[1].name
    new = remove_nodes(net, [relu])
    assert len(new.layer_nodes) == 2 and len(new.network) == 2
    with torch.no_grad():
        torch.testing.assert_close(new(x), model[2](model[0](x)))
    with pytest.raises(KeyError):
        remove_nodes(net, ["missing"])
