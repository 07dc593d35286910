"""Property tests of the CoW B-tree against a dict: insert / remove / lookup / items / range / highest_key,
rebalancing and root collapse, the one-third fill rule, reference counts, and snapshots (a shared root stays
intact while the copy changes)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from md_btree_walk import expected_counts, sm_counts, walk

from thinpool.btree.btree import BTree, NoRefValue
from thinpool.btree.spine import NodeCache
from thinpool.io.block_store import MemoryBlockStore
from thinpool.spacemap.core import CoreSpaceMap
from thinpool.tx.transaction import TransactionManager

NR_META = 20_000


def make_tm() -> TransactionManager:
    sm = CoreSpaceMap(NR_META, kind="metadata")
    sm.inc(0)  # block 0 stands for the superblock
    return TransactionManager(MemoryBlockStore(NR_META), sm)


def commit(tm: TransactionManager) -> None:
    tm.pre_commit()
    tm.commit(bytearray(4096))
    tm.sm.commit()


def val(vs: int, k: int, gen: int = 0):
    return (k * 7 + gen) & 0xFFFFFFFF if vs != 24 else (k * 7 + gen).to_bytes(24, "little")


def keyspace():
    return st.integers(0, 4000)


OPS = st.lists(st.one_of(
    st.tuples(st.just("ins"), keyspace()),
    st.tuples(st.just("del"), keyspace()),
    st.tuples(st.just("ins_range"), keyspace(), st.integers(1, 1500), st.integers(1, 3)),
    st.tuples(st.just("del_range"), keyspace(), st.integers(1, 2000), st.integers(1, 3)),
    st.tuples(st.just("remove_range"), keyspace(), st.integers(0, 2500)),
    st.tuples(st.just("commit")),
), min_size=1, max_size=25)


def apply(tree: BTree, root: int, model: dict, op, gen: int) -> int:
    vs = tree.value_size
    if op[0] == "ins":
        root, new = tree.insert(root, op[1], val(vs, op[1], gen))
        assert new == (op[1] not in model)
        model[op[1]] = val(vs, op[1], gen)
    elif op[0] == "del":
        root, was = tree.remove(root, op[1])
        assert was == (op[1] in model)
        model.pop(op[1], None)
    elif op[0] == "ins_range":
        for k in range(op[1], op[1] + op[2] * op[3], op[3]):
            root, _ = tree.insert(root, k, val(vs, k, gen))
            model[k] = val(vs, k, gen)
    elif op[0] == "del_range":
        for k in range(op[1], op[1] + op[2] * op[3], op[3]):
            root, was = tree.remove(root, k)
            assert was == (k in model)
            model.pop(k, None)
    elif op[0] == "remove_range":
        lo, hi = op[1], op[1] + op[2]
        root, n = tree.remove_range(root, lo, hi)
        gone = [k for k in model if lo <= k < hi]
        assert n == len(gone)
        for k in gone:
            del model[k]
    return root


def assert_tree_equals(tree: BTree, root: int, model: dict) -> int:
    items, height = walk(tree.tm, root, tree.value_size)
    assert [k for k, _ in items] == sorted(model)
    assert [v for _, v in items] == [model[k] for k in sorted(model)]
    assert list(tree.items(root)) == sorted(model.items())
    assert tree.highest_key(root) == (max(model) if model else None)
    assert tree.count(root) == len(model)
    for k in list(model)[:50] + [-1 + 1, 4001, 99999]:
        assert tree.lookup(root, k) == model.get(k)
    lo, hi = 1000, 2500
    assert list(tree.items(root, lo, hi)) == [(k, model[k]) for k in sorted(model) if lo <= k < hi]
    if tree.value_size != 24:
        for lo, hi in ((lo, hi), (0, 5), (17, 18), (0, 10 ** 6)):
            k, v = tree.lookup_range(root, lo, hi)
            assert list(zip(k.tolist(), v.tolist())) == [(k, model[k]) for k in sorted(model) if lo <= k < hi]
    return height


@pytest.mark.parametrize("vs", [8, 24, 4])
@settings(max_examples=25)
@given(ops=OPS)
def test_btree_matches_dict(vs: int, ops) -> None:
    tm = make_tm()
    tree = BTree(tm, NoRefValue(vs))
    root = tree.empty()
    model: dict = {}
    for gen, op in enumerate(ops):
        if op[0] == "commit":
            commit(tm)
            continue
        root = apply(tree, root, model, op, gen)
        assert_tree_equals(tree, root, model)
        # every block in use is exactly what the tree references (nothing leaked, nothing freed too early)
        assert sm_counts(tm, {0}) == expected_counts(tm, [root], vs)
    commit(tm)
    # read back through a fresh transaction manager (no cache): the committed tree
    tm2 = TransactionManager(tm.store, tm.sm)
    assert list(BTree(tm2, NoRefValue(vs)).items(root)) == sorted(model.items())


def test_rebalance_and_root_collapse_three_levels() -> None:
    """Grow to three levels (> 252*84 keys in leaves of 252 max), then remove keys in patterns that force merges,
    redistribution and the root absorbing its only child, checking the fill rule all the way down."""
    tm = make_tm()
    tree = BTree(tm, NoRefValue(8))
    root = tree.empty()
    model = {}
    n = 70_000
    for k in range(n):
        root, _ = tree.insert(root, k, k)
        model[k] = k
    _, height = walk(tm, root, 8)
    assert height == 2  # root internal -> internal -> leaves
    rng = np.random.default_rng(3)
    order = np.concatenate([np.arange(0, n, 2), rng.permutation(np.arange(1, n, 2))])
    heights = {height}
    for i, k in enumerate(order.tolist()):
        root, was = tree.remove(root, k)
        assert was
        del model[k]
        if i % 5000 == 0 or len(model) < 300:
            _, h = walk(tm, root, 8)
            heights.add(h)
    assert model == {} and list(tree.items(root)) == []
    assert heights == {2, 1, 0}  # the tree shrank level by level
    node = NodeCache.of(tm).read(root, 8)
    assert node.is_leaf and node.nr_entries == 0
    assert sm_counts(tm, {0}) == expected_counts(tm, [root], 8)


@settings(max_examples=25)
@given(base=st.lists(st.integers(0, 3000), min_size=0, max_size=1200, unique=True), ops=OPS,
       commit_between=st.booleans())
def test_snapshot_old_root_stays_intact(base, ops, commit_between) -> None:
    """tm.inc on a root makes the tree shared (what create_snap does); changing the copy must shadow instead of
    writing in place, so the old root still reads the old contents, and reference counts follow the sharing."""
    tm = make_tm()
    tree = BTree(tm, NoRefValue(8))
    root = tree.build(np.array(sorted(base), dtype=np.uint64), np.array(sorted(base), dtype=np.uint64) * 7) \
        if base else tree.empty()
    old_model = {k: k * 7 for k in base}
    if commit_between:
        commit(tm)
    tm.inc(root)  # a second reference: the snapshot
    new_root, new_model = root, dict(old_model)
    for gen, op in enumerate(ops):
        if op[0] == "commit":
            commit(tm)
            continue
        new_root = apply(tree, new_root, new_model, op, gen + 1)
        assert_tree_equals(tree, root, old_model)
        assert_tree_equals(tree, new_root, new_model)
        assert sm_counts(tm, {0}) == expected_counts(tm, [root, new_root], 8)
    # dropping the old tree leaves the new one whole and frees exactly what only the old one used
    tree.delete(root)
    assert_tree_equals(tree, new_root, new_model)
    assert sm_counts(tm, {0}) == expected_counts(tm, [new_root], 8)
    tree.delete(new_root)
    assert sm_counts(tm, {0}) == {}


def test_snapshot_of_multilevel_tree_shares_then_diverges() -> None:
    tm = make_tm()
    tree = BTree(tm, NoRefValue(8))
    keys = np.arange(0, 30_000, dtype=np.uint64)
    root = tree.build(keys, keys + np.uint64(1))
    commit(tm)
    before = tm.sm.counts.copy()
    tm.inc(root)
    copy, _ = tree.insert(root, 12_345, 0)
    assert copy != root
    assert tree.lookup(root, 12_345) == 12_346 and tree.lookup(copy, 12_345) == 0
    # only the path root -> leaf was copied: 2 nodes (root, leaf), the rest is shared
    assert int(np.count_nonzero(tm.sm.counts)) == int(np.count_nonzero(before)) + 2
    assert sm_counts(tm, {0}) == expected_counts(tm, [root, copy], 8)
