"""The one B-tree walker (btree/walk.py): key order, key ranges, the strict and salvage policies, the memo, and
MetadataCorrupt.path."""

from __future__ import annotations

import numpy as np
import pytest

from thinpool import checksum
from thinpool.btree.btree import BTree, NoRefValue
from thinpool.btree.walk import SALVAGE, STRICT, Visitor, memo_leaves, walk
from thinpool.checksum import BlockType
from thinpool.errors import MetadataCorrupt
from thinpool.io.block_store import MemoryBlockStore
from thinpool.spacemap.core import CoreSpaceMap
from thinpool.tx.transaction import TransactionManager


class Collect(Visitor):
    def __init__(self) -> None:
        self.keys: list[int] = []
        self.nodes: list[int] = []
        self.errors: list[MetadataCorrupt] = []
        self.ranges: list[tuple[int, int | None]] = []
        self.revisits: list[int] = []

    def node(self, view, where):
        self.nodes.append(view.block)
        self.ranges.append((where.lo, where.hi))
        if where.hi is not None and view.nr_entries:
            assert where.lo <= int(view.keys[0]) and int(view.keys[-1]) < where.hi

    def leaf(self, view, where):
        self.keys.extend(view.keys.tolist())

    def error(self, err, where):
        self.errors.append(err)

    def revisit(self, b, where):
        self.revisits.append(b)


def committed_tree(n: int = 30_000):
    sm = CoreSpaceMap(20_000, kind="metadata")
    sm.inc(0)
    store = MemoryBlockStore(20_000)
    tm = TransactionManager(store, sm)
    tree = BTree(tm, NoRefValue(8))
    keys = np.arange(0, 2 * n, 2, dtype=np.uint64)
    root = tree.build(keys, keys)
    tm.pre_commit()
    tm.commit(bytearray(4096))
    sm.commit()
    return store, tm, tree, root, keys


@pytest.mark.parametrize("source", ["store", "tm"])
def test_walk_visits_every_key_in_order_with_child_ranges(source):
    store, tm, tree, root, keys = committed_tree()
    v = Collect()
    walk(store if source == "store" else tm, root, v, value_size=8)
    assert v.keys == keys.tolist()
    assert len(v.nodes) == len(set(v.nodes)) > 100


def test_walk_key_range_prunes_subtrees():
    store, tm, tree, root, keys = committed_tree()
    full, part = Collect(), Collect()
    walk(tm, root, full, value_size=8)
    walk(tm, root, part, value_size=8, lo=20_000, hi=20_100)
    assert len(part.nodes) < 5 < len(full.nodes)
    assert {k for k in keys.tolist() if 20_000 <= k < 20_100} <= set(part.keys)


def _damage(store: MemoryBlockStore, b: int) -> None:
    buf = bytearray(store.blocks[b])
    buf[100] ^= 0xFF
    store.blocks[b] = bytes(buf)


def test_strict_walk_raises_with_the_path_to_the_bad_node():
    store, tm, tree, root, keys = committed_tree()
    leaf = sorted(tree.leaves(root), key=lambda n: n.keys[0])[50].block
    _damage(store, leaf)
    with pytest.raises(MetadataCorrupt) as ei:
        walk(store, root, Visitor(), value_size=8, policy=STRICT)
    e = ei.value
    assert e.block == leaf and e.path[0] == root and e.path[-1] == leaf and len(e.path) >= 2


def test_salvage_walk_reports_and_skips_the_bad_subtree_and_memoizes_failures():
    store, tm, tree, root, keys = committed_tree()
    leaf_nodes = sorted(tree.leaves(root), key=lambda n: n.keys[0])
    bad = leaf_nodes[7]
    _damage(store, bad.block)
    memo: dict = {}
    v = Collect()
    walk(store, root, v, value_size=8, policy=SALVAGE, memo=memo)
    assert [e.block for e in v.errors] == [bad.block]
    assert v.keys == [k for k in keys.tolist() if k not in set(bad.keys)]
    assert memo[bad.block] is None
    # a second walk over the same memo replays without reading: the failure is not reported again
    v2 = Collect()
    walk(store, root, v2, value_size=8, policy=SALVAGE, memo=memo)
    assert v2.errors == [] and root in v2.revisits and v2.keys == v.keys
    assert memo_leaves(memo, root, 8) is None  # a failed block inside


def test_cycle_is_reported_against_the_node_holding_the_pointer():
    store, tm, tree, root, keys = committed_tree(300)
    buf = bytearray(store.blocks[root])
    vbase = 32 + 8 * int.from_bytes(buf[20:24], "little")  # values follow max_entries keys
    buf[vbase:vbase + 8] = root.to_bytes(8, "little")  # child 0 -> the root itself
    checksum.stamp(buf, BlockType.BTREE_NODE)
    store.blocks[root] = bytes(buf)
    v = Collect()
    walk(store, root, v, value_size=8, policy=SALVAGE)
    assert v.errors and v.errors[0].block == root and "cycle" in v.errors[0].reason
    with pytest.raises(MetadataCorrupt) as ei:
        walk(store, root, Visitor(), value_size=8)
    assert ei.value.block == root and ei.value.path == (root,)
