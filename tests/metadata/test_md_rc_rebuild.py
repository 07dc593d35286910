"""The data space map's ref-count tree rebuilt bottom-up at a commit that changes many of its entries (issue 13:
a restore or repair where every block is shared three ways; a delete that drops millions of counts from 3): the
rebuilt tree holds exactly the counts >= 3 (the old tree's entries outside the dirty bitmaps kept), against a
numpy oracle through commit, abort and reopen; the entry-by-entry path and the rebuild agree; the real C++ and
Rust thin_check accept a pool whose counts went to 3 and back to 2 by whole devices."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from md_helpers import new_pool_file
from refcount_oracle import assert_exact_counts, commit_reopen_and_check, force_rebuild, rc_items

from thinpool.formats.space_map import ENTRIES_PER_BITMAP as E
from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.check import check_metadata
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.spacemap import paged

NR_DATA = 4 * E + 901  # 5 bitmaps, the last one partial








BLOCKS = st.one_of(st.integers(0, NR_DATA - 1), st.sampled_from([0, E - 1, E, 2 * E + 5, 4 * E, NR_DATA - 1]))
OPS = st.lists(st.one_of(
    st.tuples(st.just("inc_many"), st.lists(BLOCKS, min_size=1, max_size=30), st.integers(1, 4)),
    st.tuples(st.just("dec_many"), st.lists(BLOCKS, min_size=1, max_size=30)),
    st.tuples(st.just("range"), st.integers(0, NR_DATA - 1), st.integers(1, 3 * E), st.integers(-3, 3)),
    st.tuples(st.just("commit")),
    st.tuples(st.just("abort")),
    st.tuples(st.just("reopen")),
), min_size=1, max_size=20)


@settings(max_examples=40, deadline=None)
@given(ops=OPS, rebuild=st.booleans())
def test_ref_count_tree_vs_oracle_rebuilt_or_updated(ops, rebuild, tmp_path_factory) -> None:
    mp = pytest.MonkeyPatch()
    try:
        force_rebuild(mp, rebuild)
        path = tmp_path_factory.mktemp("rc") / "pool.bin"
        pmd = new_pool_file(path, nr_meta_blocks=4096, nr_data_blocks=NR_DATA)
        oracle = np.zeros(NR_DATA, dtype=np.int64)
        committed = oracle.copy()
        for op in ops:
            kind = op[0]
            if kind == "inc_many":
                blocks = np.repeat(np.array(op[1], dtype=np.int64), op[2])
                pmd.data_sm.inc_many(blocks)
                np.add.at(oracle, blocks, 1)
            elif kind == "dec_many":
                blocks = np.array([b for b in op[1] if oracle[b] > 0], dtype=np.int64)
                blocks = np.unique(blocks)
                pmd.data_sm.dec_many(blocks)
                np.add.at(oracle, blocks, -1)
            elif kind == "range":  # a whole device's worth of blocks moving together (restore, delete)
                lo, n, delta = op[1], min(op[2], NR_DATA - op[1]), op[3]
                blocks = np.arange(lo, lo + n, dtype=np.int64)
                if delta > 0:
                    pmd.data_sm.inc_many(np.repeat(blocks, delta))
                    oracle[lo:lo + n] += delta
                else:
                    for _ in range(-delta):
                        live = blocks[oracle[blocks] > 0]
                        pmd.data_sm.dec_many(live)
                        oracle[live] -= 1
            elif kind == "commit":
                pmd.commit()
                committed = oracle.copy()
            elif kind == "abort":
                pmd.abort()
                oracle = committed.copy()
            else:
                pmd.commit()
                committed = oracle.copy()
                pmd.close()
                pmd = PoolMetadata.open(FileBlockStore(path))
                assert_exact_counts(pmd, committed)
            assert np.array_equal(pmd.data_sm.counts.astype(np.int64), oracle)
        commit_reopen_and_check(pmd, path, oracle)
    finally:
        mp.undo()


def test_rebuild_keeps_the_entries_outside_the_dirty_bitmaps(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts >= 3 in bitmaps 0 and 4 are committed; then bitmaps 1-3 change by thousands of entries (a
    rebuild by the default thresholds): the old entries of bitmaps 0 and 4 stay, and the result is the one the
    entry-by-entry path gives."""
    results = []
    for rebuild in (True, False):
        force_rebuild(monkeypatch, rebuild)
        path = tmp_path / f"pool-{rebuild}.bin"
        pmd = new_pool_file(path, nr_meta_blocks=4096, nr_data_blocks=NR_DATA)
        oracle = np.zeros(NR_DATA, dtype=np.int64)
        rng = np.random.default_rng(3)
        first = np.concatenate([rng.choice(E, 900, replace=False), 4 * E + rng.choice(901, 500, replace=False)])
        counts = rng.integers(1, 9, len(first))
        pmd.data_sm.inc_many(np.repeat(first, counts))
        oracle[first] += counts
        pmd.commit()
        mid = np.arange(E, 4 * E, dtype=np.int64)
        pmd.data_sm.inc_many(np.repeat(mid, 3))
        oracle[mid] += 3
        pmd.commit()
        assert_exact_counts(pmd, oracle)
        pmd.data_sm.dec_many(mid[::2])  # half of them back to 2: their entries go
        oracle[mid[::2]] -= 1
        pmd.commit()
        pmd.close()
        pmd = PoolMetadata.open(FileBlockStore(path))
        assert_exact_counts(pmd, oracle)
        results.append(rc_items(pmd))
        pmd.close()
    assert results[0] == results[1]


def test_default_thresholds_rebuild_a_large_change_and_update_a_small_one(tmp_path) -> None:
    pmd = new_pool_file(tmp_path / "pool.bin", nr_meta_blocks=4096, nr_data_blocks=NR_DATA)
    sm = pmd.data_sm
    calls = []
    orig = sm._rebuild_ref_counts

    def spy(order: list[int]) -> bool:
        did = orig(order)
        calls.append(did)
        return did

    sm._rebuild_ref_counts = spy  # type: ignore[method-assign]
    sm.inc_many(np.repeat(np.arange(3 * E, dtype=np.int64), 3))
    pmd.commit()
    sm.inc_many(np.repeat(np.arange(10, dtype=np.int64) + 4 * E, 3))
    pmd.commit()
    assert calls == [True, False]
    oracle = np.zeros(NR_DATA, dtype=np.int64)
    oracle[:3 * E] = 3
    oracle[4 * E:4 * E + 10] = 3
    assert_exact_counts(pmd, oracle)


@pytest.mark.external
def test_three_devices_sharing_every_block_then_one_deleted_pass_both_checkers(tmp_path) -> None:
    """Three devices mapping the same 60,000 blocks (every count 3: the ref-count tree rebuilt, several leaves and
    a second level), then one deleted (every count back to 2: rebuilt empty): the C++ and Rust thin_check accept
    both commits, and thin_dump shows the mappings."""
    from oracles import assert_thin_check

    path = tmp_path / "pool.bin"
    pmd = new_pool_file(path, nr_meta_blocks=8192, nr_data_blocks=NR_DATA)
    n = 60_000
    rng = np.random.default_rng(9)
    data = rng.permutation(NR_DATA)[:n].astype(np.uint64)
    for dev in (1, 2, 3):
        pmd.build_device(dev, np.arange(n, dtype=np.uint64), data, np.zeros(n, dtype=np.uint64))
    pmd.commit()
    keys, _ = rc_items(pmd)
    assert len(keys) == n
    pmd.close()
    assert_thin_check(path, what="three devices sharing every block")
    pmd = PoolMetadata.open(FileBlockStore(path))
    pmd.delete_thin(3)
    pmd.commit()
    assert rc_items(pmd) == ([], [])
    pmd.close()
    assert_thin_check(path, what="after one of the three deleted")


def test_compact_pages_widen_past_255_through_every_path(tmp_path) -> None:
    """Data space-map pages hold uint8 counts until one passes 255: inc, inc_many and a page loaded with ref-count
    entries above 255 widen it, and the counts survive commit, abort and reopen exactly."""
    path = tmp_path / "pool.bin"
    pmd = new_pool_file(path, nr_meta_blocks=4096, nr_data_blocks=NR_DATA)
    sm = pmd.data_sm
    oracle = np.zeros(NR_DATA, dtype=np.int64)
    sm.inc_many(np.arange(2 * E, dtype=np.int64))
    oracle[:2 * E] += 1
    assert sm._page(0).counts.dtype == np.uint8
    for _ in range(300):
        sm.inc(5)
    oracle[5] += 300
    assert sm._page(0).counts.dtype == np.uint32
    sm.inc_many(np.repeat(np.array([E + 7, E + 8], dtype=np.int64), 256))
    oracle[[E + 7, E + 8]] += 256
    assert sm._page(1).counts.dtype == np.uint32
    sm.inc_many(np.repeat(np.array([3 * E + 1], dtype=np.int64), 255))  # 255 fits a byte
    oracle[3 * E + 1] += 255
    assert sm._page(3).counts.dtype == np.uint8
    pmd.commit()
    sm.inc(3 * E + 1)  # 256 after the commit
    pmd.abort()
    assert_exact_counts(pmd, oracle)
    pmd.close()
    pmd = PoolMetadata.open(FileBlockStore(path))
    assert_exact_counts(pmd, oracle)
    assert pmd.data_sm._page(0).counts.dtype == np.uint32  # loaded with a count of 301
    assert pmd.data_sm._page(2).counts.dtype == np.uint8
    pmd.data_sm.dec_many(np.array([5, E + 7], dtype=np.int64))
    oracle[[5, E + 7]] -= 1
    pmd.commit()
    pmd.close()
    pmd = PoolMetadata.open(FileBlockStore(path))
    assert_exact_counts(pmd, oracle)
    pmd.close()
