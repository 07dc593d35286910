"""An independent walk of B-trees in a TransactionManager: structural invariants and expected reference counts."""

from __future__ import annotations

from collections import Counter

from thinpool.btree.node import Node
from thinpool.btree.spine import NodeCache
from thinpool.tx.transaction import TransactionManager


def walk(tm: TransactionManager, root: int, value_size: int) -> tuple[list[tuple[int, object]], int]:
    """Check one tree (key order, parent key <= first child key, one-third fill for non-roots, equal leaf depth,
    internal nodes value_size 8 / max 252, no cycles); return (items in order, height)."""
    items: list[tuple[int, object]] = []
    leaf_depths: set[int] = set()

    def visit(b: int, depth: int, lower: int | None, upper: int | None, ancestors: tuple[int, ...]) -> None:
        assert b not in ancestors, f"cycle at block {b}"
        n: Node = NodeCache.of(tm).read(b, value_size)
        keys = list(n.keys)
        assert keys == sorted(set(keys)), f"block {b}: keys not strictly increasing"
        assert len(keys) <= n.max_entries
        if depth > 0:
            assert len(keys) >= n.max_entries // 3, f"block {b}: {len(keys)} < {n.max_entries // 3} (non-root)"
        if keys and lower is not None:
            assert keys[0] >= lower, f"block {b}: first key {keys[0]} below parent key {lower}"
        if keys and upper is not None:
            assert keys[-1] < upper
        if n.is_leaf:
            assert n.value_size == value_size
            leaf_depths.add(depth)
            items.extend(zip(keys, list(n.values)))
        else:
            assert n.value_size == 8 and n.max_entries == 252 and keys, f"block {b}: bad internal node"
            for i, child in enumerate(n.values):
                visit(int(child), depth + 1, keys[i], keys[i + 1] if i + 1 < len(keys) else upper,
                      ancestors + (b,))

    visit(root, 0, None, None, ())
    assert len(leaf_depths) == 1, f"leaves at different depths {leaf_depths}"
    return items, leaf_depths.pop()


def expected_counts(tm: TransactionManager, roots: list[int], value_size: int) -> Counter[int]:
    """dm-thin's metadata reference counts: one per root reference, plus one per distinct parent."""
    counts: Counter[int] = Counter()
    seen: set[int] = set()
    stack = []
    for r in roots:
        counts[r] += 1
        stack.append(r)
    while stack:
        b = stack.pop()
        if b in seen:
            continue
        seen.add(b)
        n = NodeCache.of(tm).read(b, value_size)
        if not n.is_leaf:
            for c in n.values:
                counts[int(c)] += 1
                stack.append(int(c))
    return counts


def sm_counts(tm: TransactionManager, exclude: set[int] = frozenset()) -> Counter[int]:  # type: ignore[assignment]
    import numpy as np
    nz = np.flatnonzero(tm.sm.counts)
    return Counter({int(b): int(tm.sm.counts[b]) for b in nz if int(b) not in exclude})
