"""``std_sort_order`` (numpy partitions + a packed-integer loop) leaves equal keys exactly where the libstdc++
std::sort port leaves them, on arrays with many ties, sorted, reversed and random, through both code paths."""

from __future__ import annotations

import random

import pytest

from thinpool.tools import stdsort
from thinpool.tools.stdsort import std_sort, std_sort_order


def reference(keys: list[int]) -> list[int]:
    items = [[k, i] for i, k in enumerate(keys)]
    std_sort(items, lambda x, y: x[0] < y[0])
    return [i for _, i in items]


@pytest.mark.parametrize("np_min", [2048, 40])
@pytest.mark.parametrize("seed", range(6))
def test_fast_order_equals_the_port(seed: int, np_min: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stdsort, "_NP_MIN", np_min)
    rng = random.Random(seed)
    for n in (0, 1, 2, 16, 17, 40, 300, 5000):
        for hi in (2, 7, n + 1, 1 << 40):
            keys = [rng.randrange(hi) for _ in range(n)]
            for variant in (keys, sorted(keys), sorted(keys, reverse=True)):
                assert std_sort_order(variant).tolist() == reference(variant), (n, hi)
