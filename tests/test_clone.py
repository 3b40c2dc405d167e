"""`amc.graph.clone.clone_module` is `copy.deepcopy` for module trees: same values, nothing shared."""
import copy

import torch
import torch.nn as nn

import amc
from amc.graph.clone import clone_module


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.again = self.shared  # one module under two names
        self.sizes = [1, 2]  # a mutable attribute
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(self.shared(x)) + self.count


class Slotted(nn.Linear):
    def __deepcopy__(self, memo):  # a class's own deepcopy is kept
        new = nn.Linear.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        new.copied_by_own_deepcopy = True
        return new


def test_clone_equals_deepcopy_and_shares_nothing() -> None:
    m = Holder()
    m.shared.register_forward_hook(lambda mod, i, o: o * 2)
    c = clone_module(m, {})
    x = torch.randn(2, 4)
    assert torch.equal(c(x), m(x))
    assert c.shared is c.again and c.shared is not m.shared
    assert c.shared.weight is not m.shared.weight and c.shared.weight.data_ptr() != m.shared.weight.data_ptr()
    c.sizes.append(3)
    assert m.sizes == [1, 2]
    assert len(c.shared._forward_hooks) == 1 and c.shared._forward_hooks is not m.shared._forward_hooks


def test_clone_defers_to_a_class_deepcopy() -> None:
    c = clone_module(nn.Sequential(Slotted(2, 2)), {})
    assert getattr(c[0], "copied_by_own_deepcopy", False)


def test_network_copy_runs_and_is_independent() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)).eval()
    x = torch.randn(2, 3, 8, 8)
    model(x)
    net = amc.trace(model, x)
    c = net.copy()
    assert torch.equal(c(x), net(x))
    with torch.no_grad():
        next(c.parameters()).add_(1.0)
    assert not torch.equal(c(x), net(x))
