"""Review 4: the data space map's reference counts after tonight's changes (issue 13).

- uint8 page counts widened to uint32 (f96ee7a) and the ref-count tree rebuilt bottom-up (fc77916), against a numpy
  oracle under hypothesis: counts driven across 2/3, 254/255/256 and up to 2^32 - 1 by inc (with n), inc_many and
  dec_many, clean pages evicted and reloaded between steps, commit, abort and reopen, the rebuild switched on and
  off from one commit to the next (thresholds crossed both ways), a rebuild in the same commit as a widening, a
  page loaded with entries above 255 then decremented below 256 and below 3;
- the all-free bitmaps stamped in one numpy pass (76ada58): each checksum equals the slow path's (encode, stamp)
  for block numbers of every bit width, and the bitmaps a new map writes are those of the slow path byte for byte
  for 1 block, one bitmap exactly full, one more, and a sparse 8 TiB map.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from refcount_oracle import assert_exact_counts, commit_reopen_and_check, force_rebuild, rc_items

from thinpool import checksum
from thinpool.checksum import BlockType
from thinpool.errors import MetadataCorrupt
from thinpool.formats.space_map import ENTRIES_PER_BITMAP as E
from thinpool.io.block_store import FileBlockStore, MemoryBlockStore
from thinpool.metadata.check import check_metadata
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.spacemap import paged

NR_DATA = 3 * E + 77  # 4 bitmaps, the last one partial
HOT = [0, 1, E - 1, E, E + 1, 2 * E + 3, 3 * E, NR_DATA - 1]


def _new(path) -> PoolMetadata:
    with open(path, "wb") as f:
        f.truncate(4096 * 4096)
    return PoolMetadata.format(FileBlockStore(path), data_block_size=128, nr_data_blocks=NR_DATA)








BLOCK = st.sampled_from(HOT) | st.integers(0, NR_DATA - 1)
OPS = st.lists(st.one_of(
    st.tuples(st.just("inc"), BLOCK, st.sampled_from([1, 2, 250, 252, 253, 254, 255, 256, 257, 65535, 65536])),
    st.tuples(st.just("inc_many"), st.lists(BLOCK, min_size=1, max_size=12), st.sampled_from([1, 3, 128, 255, 256])),
    st.tuples(st.just("dec_many"), st.lists(BLOCK, min_size=1, max_size=12), st.sampled_from([1, 2, 3, 254, 256])),
    st.tuples(st.just("dec"), BLOCK),
    st.tuples(st.just("range"), st.integers(0, NR_DATA - 1), st.integers(1, 2 * E), st.sampled_from([-1, 1, 3])),
    st.tuples(st.just("evict")),
    st.tuples(st.just("commit"), st.booleans()),
    st.tuples(st.just("abort")),
    st.tuples(st.just("reopen"), st.booleans()),
), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(ops=OPS)
def test_counts_across_byte_and_tree_boundaries_vs_oracle(ops, tmp_path_factory) -> None:
    mp = pytest.MonkeyPatch()
    try:
        force_rebuild(mp, True)
        path = tmp_path_factory.mktemp("rc4") / "pool.bin"
        pmd = _new(path)
        pmd.data_sm.max_clean_pages = 1
        oracle = np.zeros(NR_DATA, dtype=np.int64)
        committed = oracle.copy()
        for op in ops:
            kind = op[0]
            sm = pmd.data_sm
            if kind == "inc":
                sm.inc(op[1], op[2])
                oracle[op[1]] += op[2]
            elif kind == "inc_many":
                blocks = np.repeat(np.array(op[1], dtype=np.int64), op[2])
                sm.inc_many(blocks)
                np.add.at(oracle, blocks, 1)
            elif kind == "dec_many":
                want = np.repeat(np.array(op[1], dtype=np.int64), op[2])
                times = np.bincount(want, minlength=NR_DATA)
                if (times > oracle).any():  # would go below zero: refused, nothing changed
                    before = sm.counts.copy()
                    with pytest.raises(MetadataCorrupt):
                        sm.dec_many(want)
                    assert np.array_equal(sm.counts, before)
                else:
                    sm.dec_many(want)
                    oracle -= times
            elif kind == "dec":
                if oracle[op[1]]:
                    assert sm.dec(op[1]) == oracle[op[1]] - 1
                    oracle[op[1]] -= 1
                else:
                    with pytest.raises(MetadataCorrupt):
                        sm.dec(op[1])
            elif kind == "range":
                lo = op[1]
                blocks = np.arange(lo, min(lo + op[2], NR_DATA), dtype=np.int64)
                if op[3] < 0:
                    blocks = blocks[oracle[blocks] > 0]
                    sm.dec_many(blocks)
                    oracle[blocks] -= 1
                else:
                    sm.inc_many(np.repeat(blocks, op[3]))
                    oracle[blocks] += op[3]
            elif kind == "evict":
                sm.evict_clean()
            elif kind == "commit":
                force_rebuild(mp, op[1])
                pmd.commit()
                committed = oracle.copy()
                assert_exact_counts(pmd, oracle)
            elif kind == "abort":
                pmd.abort()
                oracle = committed.copy()
            else:
                force_rebuild(mp, op[1])
                pmd.commit()
                committed = oracle.copy()
                pmd.close()
                pmd = PoolMetadata.open(FileBlockStore(path))
                pmd.data_sm.max_clean_pages = 1
                assert_exact_counts(pmd, committed)
            assert np.array_equal(pmd.data_sm.counts.astype(np.int64), oracle)
            for b in HOT:
                assert pmd.data_sm.count(b) == oracle[b]
                assert pmd.data_sm.committed_count(b) == committed[b]
        commit_reopen_and_check(pmd, path, oracle)
    finally:
        mp.undo()


@pytest.mark.parametrize("rebuild", [True, False])
def test_widening_in_a_rebuild_commit_then_loaded_big_and_decremented_below_256_and_3(tmp_path, rebuild) -> None:
    """One commit where thousands of entries cross 3 (a rebuild) and, in the same pages, counts pass 255 (the
    page widened); reopened, the pages load uint32 from the tree, and counts brought back to 255, 3, 2 and 0 come
    back exactly after a further commit and reopen, against the other path's result."""
    mp = pytest.MonkeyPatch()
    try:
        force_rebuild(mp, rebuild)
        path = tmp_path / "pool.bin"
        pmd = _new(path)
        oracle = np.zeros(NR_DATA, dtype=np.int64)
        mid = np.arange(10, 2 * E + 10, dtype=np.int64)
        pmd.data_sm.inc_many(np.repeat(mid, 3))
        oracle[mid] += 3
        big = np.array([11, E + 5, 2 * E + 9], dtype=np.int64)
        pmd.data_sm.inc_many(np.repeat(big, 300))
        oracle[big] += 300
        pmd.data_sm.inc(3 * E + 1, (1 << 32) - 1 - 0)  # the largest count a uint32 holds
        oracle[3 * E + 1] += (1 << 32) - 1
        pmd.commit()
        assert_exact_counts(pmd, oracle)
        pmd.close()
        pmd = PoolMetadata.open(FileBlockStore(path))
        assert_exact_counts(pmd, oracle)
        sm = pmd.data_sm
        assert sm._page(0).counts.dtype == np.uint32 and sm._page(3).counts.dtype == np.uint32
        sm.dec_many(np.repeat(big, [48, 300, 301]))  # 255, 3, 2
        oracle[big] -= [48, 300, 301]
        sm.dec_many(np.repeat(mid[::3], 3))  # a third of the 3s to 0
        oracle[mid[::3]] -= 3
        sm.dec_many(np.array([3 * E + 1], dtype=np.int64))
        oracle[3 * E + 1] -= 1
        pmd.commit()
        pmd.close()
        pmd = PoolMetadata.open(FileBlockStore(path))
        assert_exact_counts(pmd, oracle)
        assert pmd.data_sm.count(11) == 255 and pmd.data_sm.count(E + 5) == 3 and pmd.data_sm.count(2 * E + 9) == 2
        pmd.close()
        report = check_metadata(FileBlockStore(path, readonly=True), skip_mappings=True)
        assert report.problems == [], [str(p) for p in report.problems]
    finally:
        mp.undo()


def test_a_count_past_uint32_is_refused_not_wrapped(tmp_path) -> None:
    """A reference count of 2^32 does not fit the ref-count tree's 4-byte value: inc and inc_many refuse it with a
    typed error and change nothing (inc_many used to wrap it to 0: a referenced block that read free; found by
    review4)."""
    from thinpool.errors import ThinpoolError

    pmd = _new(tmp_path / "pool.bin")
    sm = pmd.data_sm
    top = (1 << 32) - 1
    sm.inc(7, top)
    sm.inc_many(np.array([8, 9], dtype=np.int64))
    allocated = sm.nr_allocated()
    with pytest.raises(ThinpoolError):
        sm.inc(7)
    with pytest.raises(ThinpoolError):
        sm.inc_many(np.array([8, 7, 9], dtype=np.int64))
    assert (sm.count(7), sm.count(8), sm.count(9), sm.nr_allocated()) == (top, 1, 1, allocated)
    pmd.commit()
    pmd.close()
    pmd = PoolMetadata.open(FileBlockStore(tmp_path / "pool.bin"))
    assert pmd.data_sm.count(7) == top and pmd.data_sm.count(8) == 1
    pmd.close()


# --- the all-free bitmaps of a new map ------------------------------------------------------------------------
def _slow_free_bitmap(blocknr: int) -> bytes:
    buf = bytearray(4096)
    buf[8:16] = blocknr.to_bytes(8, "little")
    checksum.stamp(buf, BlockType.BITMAP)
    return bytes(buf)


def test_free_bitmap_checksums_equal_the_slow_path_for_every_bit_width() -> None:
    rng = np.random.default_rng(4)
    nrs = [0, 1, 2, 3, 255, 256, 4095, 4096, (1 << 32) - 1, 1 << 32, (1 << 63), (1 << 64) - 1]
    nrs += [1 << j for j in range(64)] + [(1 << j) - 1 for j in range(1, 65)]
    nrs += rng.integers(0, 1 << 63, 200, dtype=np.uint64).tolist()
    got = paged.free_bitmap_checksums(np.array(nrs, dtype=np.uint64))
    for b, c in zip(nrs, got.tolist()):
        slow = _slow_free_bitmap(int(b))
        assert c == int.from_bytes(slow[:4], "little"), b
        assert bytes(paged._FreeBitmap(int(b), c).encode()) == slow
        assert bytes(paged._FreeBitmap(int(b)).encode()) == slow
    assert len(paged.free_bitmap_checksums(np.zeros(0, dtype=np.uint64))) == 0


@pytest.mark.parametrize("nr_data", [1, E - 1, E, E + 1, 2 * E, 2 * E + 1, 257 * E + 3])
def test_new_map_writes_bitmaps_byte_identical_to_the_slow_path(nr_data) -> None:
    store = MemoryBlockStore(16384)
    pmd = PoolMetadata.format(store, data_block_size=128, nr_data_blocks=nr_data)
    pmd.commit()
    blocks = pmd.data_sm.bitmap_blocks
    assert len(blocks) == -(-nr_data // E)
    for b in blocks:
        assert store.blocks[b] == _slow_free_bitmap(b), b
    report = check_metadata(store)
    assert report.problems == [], [str(p) for p in report.problems]
    assert pmd.data_sm.nr_free() == nr_data


@pytest.mark.external
def test_8tib_sparse_pool_create_bitmaps_and_both_checkers(tmp_path) -> None:
    from conftest import need_tool
    from oracles import assert_thin_check

    need_tool("thin_check")
    path = tmp_path / "meta.bin"
    nr_data = (8 << 40) // (64 << 10)  # 8 TiB of 64 KiB blocks
    with open(path, "wb") as f:
        f.truncate(16384 * 4096)
    pmd = PoolMetadata.format(FileBlockStore(path), data_block_size=128, nr_data_blocks=nr_data)
    pmd.commit()
    blocks = pmd.data_sm.bitmap_blocks
    pmd.close()
    assert len(blocks) == -(-nr_data // E) and len(set(blocks)) == len(blocks)
    with open(path, "rb") as f:
        for b in blocks[:50] + blocks[-50:] + blocks[::97]:
            f.seek(b * 4096)
            assert f.read(4096) == _slow_free_bitmap(b), b
    assert_thin_check(path, what="8 TiB new pool")
