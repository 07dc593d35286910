"""The B-tree calls the data path's fast paths stand on: ``insert_run`` (one descent per leaf for the sorted chunks
of one write) equals one ``insert`` per key, on plain and shared (snapshotted) trees, with the structural rules and
reference counts intact; ``lookup_leaf`` returns a key range every lookup of which ends in the returned leaf; and
multi-chunk writes through the pool leave metadata the real thin_check accepts."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from pool_helpers import check_pool

from thinpool.btree.btree import BTree, NoRefValue
from thinpool.io.block_store import MemoryBlockStore
from thinpool.pool import Pool
from thinpool.spacemap.core import CoreSpaceMap
from thinpool.tx.transaction import TransactionManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "metadata"))
from md_btree_walk import expected_counts, sm_counts, walk  # noqa: E402

NR_META = 20_000
CH = 64 << 10


def make_tm() -> TransactionManager:
    sm = CoreSpaceMap(NR_META, kind="metadata")
    sm.inc(0)
    return TransactionManager(MemoryBlockStore(NR_META), sm)


def commit(tm: TransactionManager) -> None:
    tm.pre_commit()
    tm.commit(bytearray(4096))
    tm.sm.commit()


RUNS = st.lists(st.one_of(
    st.tuples(st.just("range"), st.integers(0, 6000), st.integers(1, 900), st.integers(1, 3)),
    st.tuples(st.just("set"), st.lists(st.integers(0, 6000), min_size=1, max_size=400, unique=True)),
    st.tuples(st.just("commit")),
), min_size=1, max_size=12)


@settings(max_examples=30, deadline=None)
@given(base=st.lists(st.integers(0, 6000), max_size=1500, unique=True), runs=RUNS, shared=st.booleans())
def test_insert_run_equals_one_insert_per_key(base, runs, shared) -> None:
    tm = make_tm()
    tree = BTree(tm, NoRefValue(8))
    keys = np.array(sorted(base), dtype=np.uint64)
    root = tree.build(keys, keys * np.uint64(3)) if base else tree.empty()
    old_model = {k: k * 3 for k in base}
    if shared:
        commit(tm)
        tm.inc(root)
    new_root, model = root, dict(old_model)
    for gen, run in enumerate(runs):
        if run[0] == "commit":
            commit(tm)
            continue
        ks = list(range(run[1], run[1] + run[2] * run[3], run[3])) if run[0] == "range" else sorted(run[1])
        vs = [k * 5 + gen for k in ks]
        new_root, nr_new = tree.insert_run(new_root, ks, vs)
        assert nr_new == sum(1 for k in ks if k not in model)
        model.update(zip(ks, vs))
        items, _ = walk(tm, new_root, 8)  # key order, one-third fill, equal leaf depth
        assert items == sorted(model.items())
        if shared:
            assert walk(tm, root, 8)[0] == sorted(old_model.items())
    roots = [root, new_root] if shared else [new_root]
    assert sm_counts(tm, {0}) == expected_counts(tm, roots, 8)


@settings(max_examples=30, deadline=None)
@given(base=st.lists(st.integers(0, 100_000), max_size=3000, unique=True), probes=st.lists(st.integers(0, 110_000),
                                                                                          min_size=1, max_size=30))
def test_lookup_leaf_range_answers_every_key_in_it(base, probes) -> None:
    tm = make_tm()
    tree = BTree(tm, NoRefValue(8))
    root = tree.empty()
    for k in base:  # one insert at a time: separators below first keys, uneven leaves
        root, _ = tree.insert(root, k, k + 1)
    model = {k: k + 1 for k in base}
    rng = random.Random(len(base))
    for key in probes:
        lo, hi, keys, values = tree.lookup_leaf(root, key)
        assert lo <= key < hi
        entries = dict(zip(keys, values))
        for k in {key, lo, hi - 1, *(rng.randrange(lo, hi) for _ in range(20))}:
            assert entries.get(k) == model.get(k) == tree.lookup(root, k)


def test_multichunk_writes_across_leaves_pass_thin_check(tmp_path) -> None:
    """Writes of 1..40 chunks at random offsets over ~1500 chunks (leaves split in the middle of a run), over a
    snapshot (runs that break sharing), and partial chunks at both ends: the bytes read back, the mapped counts
    and both checkers agree."""
    rng = random.Random(21)
    nr = 1500
    size = nr * CH
    path = tmp_path / "p"
    with Pool.create(path, data_size=(3 * nr + 64) * CH) as pool:
        dev = pool.create_thin(1, size)
        model = bytearray(size)
        for i in range(60):
            if i == 30:
                pool.create_snap(2, 1)
                snap_model = bytes(model)
            off = rng.randrange(0, size - CH)
            n = min(size - off, rng.randrange(1, 40) * CH + rng.choice([0, 0, 777]))
            data = rng.randbytes(n)
            dev.write(off, data)
            model[off:off + n] = data
        assert dev.read(0, size) == model
        assert pool.device(2).read(0, size) == snap_model
        mapped = sum(1 for c in range(nr) if dev.md.find_block(c) is not None)
        assert pool.md.get_device(1).mapped_blocks == mapped == len(dev.md.find_mapped_range(0, None)[0])
    check_pool(path)
