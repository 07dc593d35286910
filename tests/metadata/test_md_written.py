"""Metadata written by thinpool (file-backed PoolMetadata) passes the real thin_check (exit 0, nothing alarming
on stderr), the real thin_dump prints exactly our dump, and our checker is clean (no warnings either)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from md_helpers import (
    assert_real_tools_agree,
    new_pool_file,
    our_dump,
    our_dump_file,
)
from md_model import MAX_CHAIN, Harness, run_random

from thinpool.btree.spine import NodeCache
from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.check import check_metadata
from thinpool.metadata.pool_metadata import PoolMetadata


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.timeout(120)
def test_random_sequences_seeded(seed: int, tmp_path) -> None:
    h = run_random(tmp_path / "pool.bin", seed, 25)
    assert h.verified >= 25


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 108))
def test_random_sequences_long(seed: int, tmp_path) -> None:
    run_random(tmp_path / "pool.bin", seed, 150)


@pytest.mark.timeout(120)
def test_snapshot_chain_50_deep(tmp_path) -> None:
    """A chain of 50 snapshots (each a snapshot of the previous one), written at every level so every level has
    private and shared leaves; then the middle of the chain is deleted and the rest stays intact."""
    h = Harness(tmp_path / "pool.bin")
    h.create(0)
    h.map_range(0, 0, 800)  # four leaves under an internal root: shared internal nodes get shadowed
    h.verify()
    prev = 0
    for level in range(1, MAX_CHAIN + 1):
        h.snapshot(level, prev)
        h.map(level, (level * 37) % 800)  # overwrite one shared block in the new snapshot
        h.map(prev, 800 + level)  # and add a block to the origin after the snapshot
        if level % 10 == 0:
            h.verify()
        prev = level
    assert h.depth[MAX_CHAIN] == MAX_CHAIN
    for dev in range(10, 40, 3):
        h.delete(dev)
    h.unmap(MAX_CHAIN, 5)
    h.verify()
    h.delete(0)
    h.verify()
    for dev in sorted(h.model):
        h.delete(dev)
    h.verify()
    # everything deleted: only the empty trees and the space maps remain in use
    report = check_metadata(FileBlockStore(h.path, readonly=True))
    assert report.data_used_blocks == 0 and report.devices == 0


OPS = st.one_of(
    st.tuples(st.just("create"), st.integers(0, 9)),
    st.tuples(st.just("snap"), st.integers(0, 9), st.integers(0, 9)),
    st.tuples(st.just("delete"), st.integers(0, 9)),
    st.tuples(st.just("map"), st.integers(0, 9), st.integers(0, 1000), st.integers(1, 400)),
    st.tuples(st.just("unmap"), st.integers(0, 9), st.integers(0, 1000), st.integers(1, 400)),
    st.tuples(st.just("commit")),
    st.tuples(st.just("metasnap")),
)


@settings(max_examples=12)
@given(ops=st.lists(OPS, min_size=1, max_size=10))
@pytest.mark.timeout(300)
def test_random_sequences_hypothesis(ops, tmp_path_factory) -> None:
    h = Harness(tmp_path_factory.mktemp("hyp") / "pool.bin", nr_meta_blocks=2048)
    for op in ops:
        kind = op[0]
        if kind == "create" and op[1] not in h.model:
            h.create(op[1])
        elif kind == "snap" and op[2] in h.model and op[1] not in h.model and h.depth[op[2]] < MAX_CHAIN:
            h.snapshot(op[1], op[2])
        elif kind == "delete" and op[1] in h.model:
            h.delete(op[1])
        elif kind == "map" and op[1] in h.model:
            h.map_range(op[1], op[2], op[3])
        elif kind == "unmap" and op[1] in h.model:
            for t in range(op[2], op[2] + op[3]):
                h.unmap(op[1], t)
        elif kind == "metasnap":
            h.release() if h.pmd.held_root else h.reserve()
        h.verify()


def _bulk_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin blocks 0..n-1 -> mostly contiguous data blocks with one in 500 moved elsewhere (so the dump has both
    ranges and singles without being a million lines), times 0..3."""
    rng = np.random.default_rng(seed)
    thin = np.arange(n, dtype=np.uint64)
    data = np.arange(n, dtype=np.uint64) + np.uint64(7)
    moved = rng.choice(n, size=n // 500, replace=False)
    data[moved] = np.uint64(n + 100) + np.arange(len(moved), dtype=np.uint64)
    times = (thin // np.uint64(250_000)).astype(np.uint64)
    return thin, data, times


@pytest.mark.timeout(300)
def test_one_million_mappings_bulk(tmp_path) -> None:
    path = tmp_path / "big.bin"
    pmd = new_pool_file(path, nr_meta_blocks=8192, nr_data_blocks=1_100_000)
    thin, data, times = _bulk_arrays(1_000_000, 7)
    pmd.time = 3
    pmd.build_device(1, thin, data, times)
    pmd.create_snap(2, 1)  # the snapshot shares the 1M-mapping tree
    pmd.insert(2, 5, pmd.alloc_data_block())  # and diverges by one block
    pmd.commit()
    assert pmd.get_device(1).mapped_blocks == 1_000_000
    assert pmd.lookup(1, 999_999) == (int(data[-1]), 3)
    mine = our_dump(pmd)
    pmd.close()
    report = check_metadata(FileBlockStore(path, readonly=True))
    assert report.problems == [] and report.mappings == 2_000_000
    assert report.data_used_blocks == 1_000_001
    assert_real_tools_agree(path, mine)


@pytest.mark.timeout(300)
def test_ten_thousand_inserts_paths(tmp_path) -> None:
    """The one-at-a-time insert path: 10k sequential, 10k random (with overwrites), 10k descending into a
    snapshot of a 10k device, then 5k removals; real tools after each phase."""
    path = tmp_path / "ins.bin"
    h = Harness(path, nr_meta_blocks=4096)
    rng = random.Random(5)
    h.create(1)
    h.map_range(1, 0, 10_000)
    h.verify()
    h.create(2)
    for _ in range(10_000):
        h.map(2, rng.randrange(0, 50_000))
    h.verify()
    h.snapshot(3, 1)
    for t in range(19_999, 9_999, -1):
        h.map(3, t)
    for t in rng.sample(range(10_000), 2_000):
        h.map(3, t)  # break sharing of the origin's leaves
    h.verify()
    for t in rng.sample(range(20_000), 5_000):
        h.unmap(3, t)
    h.verify()
    assert len(h.model[1]) == 10_000


def test_reopen_reads_back_written_pool(tmp_path) -> None:
    h = Harness(tmp_path / "p.bin")
    h.create(4)
    h.map_range(4, 100, 300)
    h.snapshot(5, 4)
    h.verify()
    pmd = PoolMetadata.open(FileBlockStore(h.path))
    assert our_dump(pmd) == our_dump(h.pmd) == our_dump_file(h.path)
    assert pmd.time == 1 and pmd.get_device(4).snapshotted_time == 1 and pmd.get_device(5).creation_time == 1


def test_bad_arguments_raise_typed_errors(tmp_path) -> None:
    """Regression: build_device with a data block beyond the data device raised numpy's IndexError (from
    CoreSpaceMap.inc_many) and left the pool half-updated; insert of an out-of-range block raised OverflowError."""
    from thinpool.errors import InvalidArgument
    pmd = new_pool_file(tmp_path / "p.bin", nr_meta_blocks=256, nr_data_blocks=100)
    z = np.zeros(2, dtype=np.uint64)
    with pytest.raises(InvalidArgument):
        pmd.build_device(1, np.array([0, 1], dtype=np.uint64), np.array([5, 100], dtype=np.uint64), z)
    with pytest.raises(InvalidArgument):
        pmd.build_device(1, np.array([1, 0], dtype=np.uint64), np.array([5, 6], dtype=np.uint64), z)
    with pytest.raises(InvalidArgument):
        pmd.build_device(1, np.array([0, 0], dtype=np.uint64), np.array([5, 6], dtype=np.uint64), z)
    assert 1 not in pmd.devices and not pmd.data_sm.counts.any()
    pmd.create_thin(1)
    with pytest.raises(InvalidArgument):
        pmd.insert(1, 0, 100)
    with pytest.raises(InvalidArgument):
        pmd.insert(1, 0, 1 << 45)
    with pytest.raises(InvalidArgument):
        pmd.insert(1, -1, 3)
    pmd.insert(1, 0, pmd.alloc_data_block())
    pmd.commit()
    assert check_metadata(FileBlockStore(tmp_path / "p.bin", readonly=True)).problems == []


@pytest.mark.parametrize("nr_devs", [130, 260])
def test_checker_metadata_snapshot_sharing_leaves(tmp_path, nr_devs) -> None:
    """Regression (check.py, check_metadata): a details-tree leaf shared by the live tree and the held metadata
    snapshot was read only for the live tree, so the checker falsely reported that the snapshot's details and
    mapping trees disagreed (> 126 devices: two details leaves, a change to only one). With > 252 devices a
    top-level leaf is shared too; its subtree roots must then be counted once, not once per tree."""
    h = Harness(tmp_path / "p.bin", nr_meta_blocks=2048)
    for dev in range(nr_devs):
        h.create(dev)
    h.map(0, 1)
    h.map(1, 2)
    h.reserve()
    h.map(nr_devs - 1, 7)  # shadows the leaves holding the last device; those holding 0 and 1 stay shared
    h.verify()
    report = check_metadata(FileBlockStore(h.path, readonly=True), use_metadata_snap=True)
    assert report.problems == [] and report.devices == nr_devs
    h.release()
    h.verify()


@pytest.mark.timeout(300)
def test_three_level_shared_tree_rebalancing(tmp_path) -> None:
    """A 100k-mapping device (three-level tree) snapshotted; most of the snapshot's mappings removed in random
    order (merges and redistributions of shared internal nodes and leaves, root collapse) while the origin keeps
    changing; then the origin is deleted. Real tools and our checker after each phase."""
    path = tmp_path / "deep.bin"
    pmd = new_pool_file(path, nr_meta_blocks=8192, nr_data_blocks=300_000)
    n = 100_000
    keys = np.arange(n, dtype=np.uint64)
    pmd.build_device(1, keys, keys + np.uint64(11), np.zeros(n, dtype=np.uint64))
    root = pmd.device_root(1)
    assert not NodeCache.of(pmd.tm).read(int(NodeCache.of(pmd.tm).read(root, 8).values[0]), 8).is_leaf  # three levels
    pmd.create_snap(2, 1)
    pmd.commit()
    rng = np.random.default_rng(9)
    gone = rng.permutation(n)[:97_000].tolist()
    for i, t in enumerate(gone):
        assert pmd.remove(2, t)
        if i % 3 == 0:
            pmd.insert(1, n + i, pmd.alloc_data_block())
        if i % 20_000 == 0:
            pmd.commit()
    pmd.commit()
    left = sorted(set(range(n)) - set(gone))
    k, d, t = pmd.mappings(2)
    assert k.tolist() == left and d.tolist() == [x + 11 for x in left]
    assert pmd.get_device(1).mapped_blocks == n + len(range(0, 97_000, 3))
    mine = our_dump(pmd)
    assert check_metadata(FileBlockStore(path, readonly=True)).problems == []
    assert_real_tools_agree(path, mine)
    pmd.delete_thin(1)
    pmd.commit()
    report = check_metadata(FileBlockStore(path, readonly=True))
    assert report.problems == [] and report.data_used_blocks == 3000
    assert_real_tools_agree(path, our_dump(pmd))
