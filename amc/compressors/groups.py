"""Pruning groups: channels that must go together, clustered by the layers they touch."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn

from .dependency import Analysis, Axis, param_of  # noqa: F401 - param_of re-exported


@dataclass
class Member:
    """One parameter axis of a group: position i of `axis` belongs to unit `unit_index[i]` (-1: not ours)."""

    axis: Axis
    unit_index: np.ndarray


@dataclass
class Group:
    """A set of coupled channels ("units"): pruning unit u slices every member axis where it appears."""

    id: int
    units: np.ndarray  # root element of each prunable unit
    n_frozen: int  # frozen positions that count towards `multiple_of`
    members: List[Member] = field(default_factory=list)
    producers: List[str] = field(default_factory=list)
    multiple_of: int = 1  # structural: kept count must be a multiple (attention heads); else not pruned
    round_to: int = 1  # kernel-friendly: kept count rounded up to a multiple where the group allows it

    @property
    def size(self) -> int:
        """Prunable channels in the group."""
        return len(self.units)

    @functools.cached_property
    def channels_per_unit(self) -> int:
        """Channels one unit spans on its widest member: a grouped conv's groups are pruned alike, so
        one unit bundles a channel of each (25 for RegNet's 25 groups); 1 for a plain layer."""
        if not self.members or not self.size:
            return 1
        return max(1, max(int(np.count_nonzero(m.unit_index >= 0)) for m in self.members) // self.size)

    @property
    def layers(self) -> List[str]:
        """Names of the nodes whose parameters this group slices."""
        return list(dict.fromkeys(m.axis.node for m in self.members))

    def __repr__(self) -> str:
        return (f"Group({self.id}, channels={self.size}+{self.n_frozen} frozen, producers={self.producers[:3]}"
                f"{'...' if len(self.producers) > 3 else ''}, layers={len(self.layers)})")


def _lcm(a: int, b: int) -> int:
    return a * b // int(np.gcd(a, b))


def rounding_step(multiple_of: int, round_to: int, total: int, bundled: bool = False) -> int:
    """The step a group's kept count (in units) moves in: a multiple of both its structural
    `multiple_of` (attention heads) and `round_to`. For a grouped conv (`bundled`: one unit per channel
    of each group) or a structural multiple, a step that is the group's whole width (RegNet's groups 16
    wide at round_to=16: 16 of 16 units) would keep every channel, so the largest divisor of round_to whose
    step still leaves something to prune is used instead (8 there: half of each group). A plain layer no
    wider than round_to keeps its width, as round_to asks."""
    m = max(multiple_of, 1)
    if m == 1 and not bundled:
        return round_to
    divisors = [r for r in range(round_to, 1, -1) if round_to % r == 0]
    return next((_lcm(m, r) for r in divisors if _lcm(m, r) < total), m)


def _units_by_signature(rr: np.ndarray, sp: np.ndarray, n_spaces: int) -> Dict[Tuple[int, ...], List[int]]:
    """Unit roots grouped by the set of spaces their elements lie in (their signature), in order of
    each signature's first root. `rr`/`sp`: root and space of every live element, sorted by root then
    space. Vectorised: a signature is keyed by two independent 64-bit hashes of its distinct spaces
    (a Python loop over tens of thousands of units was most of build_groups' time)."""
    if not len(rr):
        return {}
    distinct = np.ones(len(rr), dtype=bool)
    distinct[1:] = (rr[1:] != rr[:-1]) | (sp[1:] != sp[:-1])
    ur, us = rr[distinct], sp[distinct]
    starts = np.flatnonzero(np.r_[True, ur[1:] != ur[:-1]])
    rng = np.random.default_rng(0)
    h = rng.integers(1, 2**63 - 1, size=(2, n_spaces), dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        keys = np.stack([np.add.reduceat(h[0][us], starts), np.add.reduceat(h[1][us], starts),
                         np.diff(np.r_[starts, len(ur)]).astype(np.uint64)], axis=1)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    ends = np.r_[starts[1:], len(ur)]
    roots = ur[starts]
    by_sig: Dict[Tuple[int, ...], List[int]] = {}
    for j in np.argsort(first, kind="stable"):
        i = int(first[j])
        by_sig[tuple(us[starts[i]:ends[i]].tolist())] = roots[inverse == j].tolist()
    return by_sig


def build_groups(a: Analysis) -> Tuple[List[Group], np.ndarray]:
    """Groups of prunable units, and the root of every element (index into it with an axis vector)."""
    roots = a.uf.roots()
    space_of = np.asarray(a.uf.space, dtype=np.int64)
    n = len(roots)
    r = roots[1:]
    live = r != 0
    order = np.lexsort((space_of[1:][live], r[live]))
    rr, sp = r[live][order], space_of[1:][live][order]
    by_sig = _units_by_signature(rr, sp, len(a.spaces))
    groups: List[Group] = []
    unit_pos = np.full(n, -1, dtype=np.int64)
    group_of = np.full(n, -1, dtype=np.int64)
    for sig, units in by_sig.items():
        g = Group(len(groups), np.asarray(sorted(units), dtype=np.int64), 0)
        g.producers = list(dict.fromkeys(a.spaces[s].node for s in sig))
        unit_pos[g.units] = np.arange(len(g.units))
        group_of[g.units] = g.id
        groups.append(g)
    for vec, m in a.multiples:  # e.g. attention: kept embed dims must stay a multiple of num_heads
        rv = roots[vec]
        gids = np.unique(group_of[rv[rv != 0]])
        if len(gids) == 1:
            g = groups[int(gids[0])]
            g.multiple_of = _lcm(g.multiple_of, m)
            g.n_frozen = max(g.n_frozen, int((rv == 0).sum()))
        else:
            for gid in gids.tolist():  # one dim split over several groups: no way to keep the multiple
                groups[gid].multiple_of = 0
    for ax in a.axes:
        rv = roots[ax.vec]
        gids = np.unique(group_of[rv])
        for gid in gids.tolist():
            if gid < 0:
                continue
            idx = np.where(group_of[rv] == gid, unit_pos[rv], -1)
            groups[gid].members.append(Member(ax, idx))
    return [g for g in groups if g.members], roots


def module_key(a: Analysis, node: str) -> str:
    return a.net.node(node).module


def keep_counts(group: Group, ratio: float) -> int:
    """How many units of `group` to prune at `ratio`, keeping >= 1 and honouring multiple_of; with
    `round_to` > 1 the kept count is rounded up to a multiple of it (never more pruned than asked; a
    grouped conv whose groups are no wider than that step rounds to a divisor: `rounding_step`)."""
    n, frozen, m = group.size, group.n_frozen, group.multiple_of
    if m == 0:
        return 0
    total = n + frozen
    keep_total = max(1, total - int(np.floor(ratio * n + 1e-9)))
    if m > 1:
        keep_total = max(m, (keep_total // m) * m)
        if total % m:
            return 0
    if group.round_to > 1:
        step = rounding_step(m, group.round_to, total, group.channels_per_unit > 1)
        keep_total = min(total, -(-keep_total // step) * step)
    return max(0, min(n, total - keep_total))


def select_units(group: Group, importance: torch.Tensor, ratio: float) -> np.ndarray:
    """Roots of the least important units to prune."""
    k = keep_counts(group, ratio)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    order = torch.argsort(importance.double(), stable=True)[:k].numpy()
    return group.units[order]
