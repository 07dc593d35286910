"""Space maps against a numpy reference-count oracle: counts survive commit and reopen (2-bit bitmaps, counts
>= 3 in the ref-count tree, many bitmaps), abort returns to the last commit; the metadata space map grows to
several bitmaps and still passes the real thin_check."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from md_helpers import new_pool_file, real_thin_check

from thinpool.formats.space_map import ENTRIES_PER_BITMAP
from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.check import check_metadata
from thinpool.metadata.pool_metadata import PoolMetadata

NR_DATA = 3 * ENTRIES_PER_BITMAP + 777  # 4 bitmaps, the last one partial


def reopen(path) -> PoolMetadata:
    return PoolMetadata.open(FileBlockStore(path))


# (block, delta, repeat): blocks chosen near bitmap boundaries and in a small hot set so counts reach >= 3.
BLOCKS = st.one_of(st.integers(0, NR_DATA - 1), st.sampled_from([0, 1, ENTRIES_PER_BITMAP - 1, ENTRIES_PER_BITMAP,
                                                                 2 * ENTRIES_PER_BITMAP + 5, NR_DATA - 1]),
                   st.integers(0, 20))
OPS = st.lists(st.one_of(
    st.tuples(st.just("inc"), BLOCKS, st.integers(1, 6)),
    st.tuples(st.just("dec"), BLOCKS, st.integers(1, 6)),
    st.tuples(st.just("inc_many"), st.lists(BLOCKS, min_size=1, max_size=40)),
    st.tuples(st.just("commit")),
    st.tuples(st.just("abort")),
    st.tuples(st.just("reopen")),
), min_size=1, max_size=30)


@settings(max_examples=30)
@given(ops=OPS)
def test_data_space_map_vs_oracle(ops, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("sm") / "pool.bin"
    pmd = new_pool_file(path, nr_meta_blocks=1024, nr_data_blocks=NR_DATA)
    oracle = np.zeros(NR_DATA, dtype=np.int64)
    committed = oracle.copy()
    for op in ops:
        kind = op[0]
        if kind == "inc":
            for _ in range(op[2]):
                pmd.data_sm.inc(op[1])
            oracle[op[1]] += op[2]
        elif kind == "dec":
            n = min(op[2], int(oracle[op[1]]))
            for _ in range(n):
                pmd.data_sm.dec(op[1])
            oracle[op[1]] -= n
        elif kind == "inc_many":
            pmd.data_sm.inc_many(np.array(op[1], dtype=np.int64))
            np.add.at(oracle, op[1], 1)
        elif kind == "commit":
            pmd.commit()
            committed = oracle.copy()
        elif kind == "abort":
            pmd.abort()
            oracle = committed.copy()
        elif kind == "reopen":
            pmd.commit()
            committed = oracle.copy()
            pmd.close()
            pmd = reopen(path)
            assert np.array_equal(pmd.data_sm.counts, committed)
        assert np.array_equal(pmd.data_sm.counts, oracle)
    pmd.commit()
    pmd.close()
    pmd = reopen(path)
    assert np.array_equal(pmd.data_sm.counts.astype(np.int64), oracle)
    assert pmd.data_sm.nr_blocks == NR_DATA
    # the metadata space map is exact too (our checker recomputes it); data counts are arbitrary here, so only
    # the metadata side is compared
    report = check_metadata(FileBlockStore(path, readonly=True), skip_mappings=True)
    assert report.problems == [], [str(p) for p in report.problems]


def test_large_counts_and_all_bitmaps_survive_reopen(tmp_path) -> None:
    """Counts 0..1000 spread over every bitmap of a 5-bitmap data space map; ref-count tree with > 336 entries
    (several leaves); then drop them back below 3 so the tree shrinks to empty."""
    path = tmp_path / "pool.bin"
    nr = 5 * ENTRIES_PER_BITMAP - 3
    pmd = new_pool_file(path, nr_meta_blocks=2048, nr_data_blocks=nr)
    rng = np.random.default_rng(11)
    blocks = rng.choice(nr, size=4000, replace=False)
    counts = rng.integers(0, 1001, size=4000)
    oracle = np.zeros(nr, dtype=np.int64)
    oracle[blocks] = counts
    pmd.data_sm.inc_many(np.repeat(blocks, counts))
    pmd.commit()
    pmd.close()
    pmd = reopen(path)
    assert np.array_equal(pmd.data_sm.counts.astype(np.int64), oracle)
    big = np.flatnonzero(oracle >= 3)
    assert len(big) > 336
    rc_items = list(pmd.data_disk.rc_tree.items(pmd.data_disk.ref_count_root))
    assert [k for k, _ in rc_items] == big.tolist() and [v for _, v in rc_items] == oracle[big].tolist()
    # now everything back to at most 2
    for b in big.tolist():
        for _ in range(int(oracle[b]) - 2):
            pmd.data_sm.dec(b)
    oracle[big] = 2
    pmd.commit()
    pmd.close()
    pmd = reopen(path)
    assert np.array_equal(pmd.data_sm.counts.astype(np.int64), oracle)
    assert list(pmd.data_disk.rc_tree.items(pmd.data_disk.ref_count_root)) == []
    report = check_metadata(FileBlockStore(path, readonly=True), skip_mappings=True)
    assert report.problems == []


def test_metadata_space_map_many_bitmaps_passes_thin_check(tmp_path) -> None:
    """A metadata device of 3 bitmaps (49,000 blocks, sparse file), grown from one; blocks allocated in every
    bitmap; real thin_check and our checker agree it is consistent."""
    path = tmp_path / "pool.bin"
    pmd = new_pool_file(path, nr_meta_blocks=16_000, nr_data_blocks=3 * ENTRIES_PER_BITMAP)
    pmd.resize_metadata(49_000)
    assert pmd.nr_metadata_blocks == 49_000
    keys = np.arange(40_000, dtype=np.uint64)
    pmd.build_device(1, keys, keys, np.zeros(40_000, dtype=np.uint64))
    pmd.commit()
    # Many small transactions, each remapping scattered blocks: every commit shadows ~160 leaves to fresh blocks
    # (a block of the last commit is never reused), so the allocator sweeps through all three bitmaps.
    rng = np.random.default_rng(2)
    highest = 0
    for _ in range(130):
        for t in rng.choice(40_000, size=400, replace=False).tolist():
            pmd.insert(1, t, pmd.alloc_data_block())  # the old data block loses its reference
        pmd.commit()
        highest = max(highest, int(np.flatnonzero(pmd.tm.sm.counts)[-1]))
    assert highest >= ENTRIES_PER_BITMAP
    pmd.resize_data(4 * ENTRIES_PER_BITMAP + 10)
    pmd.commit()
    pmd.close()
    pmd = reopen(path)
    assert pmd.nr_metadata_blocks == 49_000 and pmd.nr_data_blocks == 4 * ENTRIES_PER_BITMAP + 10
    report = check_metadata(FileBlockStore(path, readonly=True))
    assert report.problems == [], [str(p) for p in report.problems]
    real_thin_check(path)


# --- the paged metadata space map (spacemap/metadata_paged.py) -------------------------------------------------
NR_META = 2 * ENTRIES_PER_BITMAP + 500  # 3 bitmaps, the last one partial

META_OPS = st.lists(st.one_of(
    st.tuples(st.just("insert"), st.integers(1, 3), st.integers(1, 400)),
    st.tuples(st.just("snap"), st.integers(1, 3)),
    st.tuples(st.just("delete"), st.integers(1, 6)),
    st.tuples(st.just("cursor"), st.integers(0, NR_META - 1)),
    st.tuples(st.just("evict")),
    st.tuples(st.just("commit")),
    st.tuples(st.just("abort")),
    st.tuples(st.just("reopen")),
), min_size=1, max_size=25)


def _meta_counts_on_disk(path) -> np.ndarray:
    pmd = reopen(path)
    try:
        return pmd.tm.sm.counts
    finally:
        pmd.close()


@settings(max_examples=25, deadline=None)
@given(ops=META_OPS, seed=st.integers(0, 2 ** 32 - 1))
def test_metadata_space_map_vs_the_checker(ops, seed, tmp_path_factory) -> None:
    """Devices, snapshots (shared trees: counts >= 3 in the ref-count tree), deletes, the allocation cursor put
    anywhere in the 3 bitmaps, clean pages evicted, commits, aborts and reopens: after each commit our checker
    (which recomputes every metadata count from the trees) finds nothing; an abort returns the map to exactly
    what is on disk; the real thin_check passes at the end."""
    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("msm") / "pool.bin"
    pmd = new_pool_file(path, nr_meta_blocks=NR_META, nr_data_blocks=200_000)
    next_id = 10
    for op in ops:
        kind = op[0]
        if kind == "insert":
            dev = op[1]
            if dev not in pmd.devices:
                pmd.create_thin(dev)
            for t in rng.choice(50_000, size=op[2], replace=False).tolist():
                pmd.insert(dev, t, pmd.alloc_data_block())
        elif kind == "snap":
            if op[1] in pmd.devices:
                pmd.create_snap(next_id, op[1])
                next_id += 1
        elif kind == "delete":
            devs = pmd.device_ids()
            if devs:
                pmd.delete_thin(devs[op[1] % len(devs)])
        elif kind == "cursor":
            pmd.tm.sm._cursor, pmd.tm.sm._candidates = op[1], []  # the next allocation searches from there
        elif kind == "evict":
            pmd.tm.sm.evict_clean()
        elif kind == "commit":
            pmd.commit()
            report = check_metadata(FileBlockStore(path, readonly=True))
            assert report.problems == [], [str(p) for p in report.problems]
        elif kind == "abort":
            pmd.abort()
            assert np.array_equal(pmd.tm.sm.counts, _meta_counts_on_disk(path))
        elif kind == "reopen":
            pmd.commit()
            pmd.close()
            pmd = reopen(path)
        assert pmd.tm.sm.nr_allocated() == int(np.count_nonzero(pmd.tm.sm.counts))
    pmd.commit()
    pmd.close()
    report = check_metadata(FileBlockStore(path, readonly=True))
    assert report.problems == [], [str(p) for p in report.problems]
    real_thin_check(path)


def test_writable_open_reads_the_metadata_index_not_its_bitmaps(tmp_path) -> None:
    """A 16 GiB metadata device (255 bitmaps, the most there can be): a writable open reads the superblock, the
    metadata index block and a few tree nodes, no bitmap; a change and its commit read one metadata bitmap."""
    from thinpool.units import MAX_METADATA_BLOCKS

    path = tmp_path / "pool.bin"
    pmd = new_pool_file(path, nr_meta_blocks=MAX_METADATA_BLOCKS, nr_data_blocks=4 * ENTRIES_PER_BITMAP)
    assert len(pmd.tm.sm.bitmap_blocks) == 255
    pmd.close()
    store = FileBlockStore(path)
    pmd = PoolMetadata.open(store)
    assert pmd.tm.blocks_read <= 8 and len(pmd.tm.sm._pages) == 0
    pmd.create_thin(1)
    pmd.insert(1, 7, pmd.alloc_data_block())
    pmd.commit()
    assert len(pmd.tm.sm._pages) == 1 and pmd.tm.sm.pages_loaded == 1
    pmd.close()
    real_thin_check(path)
