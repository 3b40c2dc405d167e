"""The vectorised union-find of the channel analysis against the one-pair-at-a-time definition."""
from typing import Dict, List

import numpy as np
import pytest

from amc.compressors.dependency import UnionFind


class Reference:
    """Union-find done pair by pair: root = smallest element, 0 is the frozen sentinel."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.frozen_by: Dict[int, str] = {}

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = sorted((self.find(a), self.find(b)))
        self.parent[rb] = ra

    def freeze(self, v: List[int], cause: str) -> None:
        for x in sorted(set(v)):
            if x and self.find(x) != 0:
                self.frozen_by.setdefault(x, cause)
            self.union(0, x)


@pytest.mark.parametrize("seed", range(12))
def test_vectorised_unions_and_freezes_match_pairwise(seed: int) -> None:
    rng = np.random.default_rng(seed)
    uf = UnionFind()
    blocks = [uf.new(int(rng.integers(1, 40)), i) for i in range(12)]
    ref = Reference(uf.size)
    for step in range(30):
        a, b = blocks[rng.integers(len(blocks))], blocks[rng.integers(len(blocks))]
        n = min(len(a), len(b))
        a, b = rng.permutation(a)[:n], rng.permutation(b)[:n]
        if rng.random() < 0.2:
            uf.cause = f"step {step}"
            uf.freeze(a)
            ref.freeze(a.tolist(), f"step {step}")
        else:
            uf.union_vecs(a, b)
            for x, y in zip(a.tolist(), b.tolist()):
                ref.union(x, y)
    assert uf.roots().tolist() == [ref.find(i) for i in range(uf.size)]
    assert uf.frozen_by == ref.frozen_by


def test_chained_pairs_in_one_call_join_transitively() -> None:
    uf = UnionFind()
    x = uf.new(4, 0)
    uf.union_vecs(x[[0, 1, 2]], x[[1, 2, 3]])  # 1-2, 2-3, 3-4 in one call: one class
    assert len(set(uf.roots()[1:].tolist())) == 1
    assert uf.find(int(x[3])) == int(x[0])


def test_unequal_lengths_and_none_freeze() -> None:
    uf = UnionFind()
    x, y = uf.new(3, 0), uf.new(2, 1)
    uf.union_vecs(x, None)
    assert all(uf.find(int(e)) == 0 for e in x)
    uf.union_vecs(y, y[:1])
    assert all(uf.find(int(e)) == 0 for e in y)
