"""Contract suites: one set of behaviour tests run against every implementation of a protocol (as
thin-provisioning-tools' space_map/tests.rs does): metadata block stores and space maps."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from thinpool.errors import MetadataCorrupt, NoDataSpace, NoMetadataSpace, NoSpace
from thinpool.io.block_store import FileBlockStore, MemoryBlockStore
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.spacemap.core import CoreSpaceMap
from thinpool.spacemap.paged import PagedSpaceMap
from thinpool.tx.transaction import TransactionManager

BS = 4096


# --- block stores ---------------------------------------------------------------------------------------------
@pytest.fixture(params=["memory", "file"])
def make_store(request, tmp_path) -> Callable[[int], object]:
    def make(nr: int):
        if request.param == "memory":
            return MemoryBlockStore(nr)
        p = tmp_path / "meta"
        p.write_bytes(b"")
        with open(p, "r+b") as f:
            f.truncate(nr * BS)
        return FileBlockStore(p)
    return make


def test_store_unwritten_blocks_read_as_zeros(make_store):
    s = make_store(8)
    assert s.nr_blocks == 8 and s.read_block(7) == bytes(BS)


def test_store_write_then_read_round_trips(make_store):
    s = make_store(8)
    data = bytes(range(256)) * 16
    s.write_block(3, data)
    s.sync()
    assert s.read_block(3) == data and s.read_block(2) == bytes(BS)


@pytest.mark.parametrize("b", [-1, 8, 1 << 40])
def test_store_read_out_of_range_is_metadata_corrupt_naming_the_block(make_store, b):
    s = make_store(8)
    with pytest.raises(MetadataCorrupt) as ei:
        s.read_block(b)
    assert ei.value.block == b


def test_store_grow_keeps_contents_and_adds_zero_blocks(make_store):
    s = make_store(4)
    s.write_block(1, b"\x01" * BS)
    s.grow(16)
    assert s.nr_blocks == 16 and s.read_block(1) == b"\x01" * BS and s.read_block(15) == bytes(BS)
    s.grow(2)  # never shrinks
    assert s.nr_blocks == 16
    s.close()


# --- space maps -----------------------------------------------------------------------------------------------
def _core(nr: int, kind: str) -> CoreSpaceMap:
    return CoreSpaceMap(nr, kind=kind)


def _paged(nr: int, kind: str) -> PagedSpaceMap:
    """A fresh paged map inside a transaction manager (pages never written: all free)."""
    sm = CoreSpaceMap(4096, kind="metadata")
    sm.inc(0)
    return PagedSpaceMap.create(TransactionManager(MemoryBlockStore(4096), sm), nr, kind=kind)


def _reloaded(nr: int, kind: str) -> PagedSpaceMap:
    """The data space map of real metadata after a commit and a reopen (paged in from its bitmaps), with at most
    one clean page kept."""
    store = MemoryBlockStore(512)
    pmd = PoolMetadata.format(store, data_block_size=128, nr_data_blocks=nr)
    pmd.close()
    sm = PoolMetadata.open(store).data_sm
    sm.kind = kind
    sm.max_clean_pages = 1
    return sm


@pytest.fixture(params=["core", "paged", "paged-reloaded"])
def make_sm(request) -> Callable[[int, str], CoreSpaceMap | PagedSpaceMap]:
    return {"core": _core, "paged": _paged, "paged-reloaded": _reloaded}[request.param]


@pytest.mark.parametrize("kind", ["data", "metadata"])
def test_sm_new_blocks_are_distinct_and_counted(make_sm, kind):
    sm = make_sm(100, kind)
    got = [sm.new_block() for _ in range(100)]
    assert sorted(got) == list(range(100))
    assert sm.nr_allocated() == 100 and all(sm.count(b) == 1 for b in got)
    with pytest.raises(NoMetadataSpace if kind == "metadata" else NoDataSpace) as ei:
        sm.new_block()
    assert isinstance(ei.value, NoSpace)


def test_sm_inc_dec_and_no_underflow(make_sm):
    sm = make_sm(10, "data")
    sm.inc(3, 2)
    assert sm.count(3) == 2 and sm.dec(3) == 1 and sm.dec(3) == 0
    with pytest.raises(MetadataCorrupt):
        sm.dec(3)


def test_sm_never_hands_out_a_block_freed_since_the_last_commit(make_sm):
    sm = make_sm(20, "metadata")
    held = [sm.new_block() for _ in range(10)]
    sm.commit()
    for b in held:
        sm.dec(b)
    fresh = {sm.new_block() for _ in range(10)}
    assert not fresh & set(held)
    with pytest.raises(NoMetadataSpace):
        sm.new_block()  # the freed ten come back only after a commit
    sm.commit()
    assert sm.new_block() in set(held)


def test_sm_abort_returns_to_the_last_commit(make_sm):
    sm = make_sm(50, "data")
    a = [sm.new_block() for _ in range(5)]
    sm.commit()
    before = [sm.count(b) for b in range(50)]
    sm.new_block()
    sm.inc(a[0])
    sm.dec(a[1])
    sm.abort()
    assert [sm.count(b) for b in range(50)] == before and sm.nr_allocated() == 5


def test_sm_batch_inc_dec_match_single_steps(make_sm):
    sm = make_sm(64, "data")
    blocks = np.array([1, 1, 2, 5, 5, 5], dtype=np.int64)
    sm.inc_many(blocks)
    assert [sm.count(b) for b in (1, 2, 5)] == [2, 1, 3]
    sm.dec_many(blocks[:3])
    assert [sm.count(b) for b in (1, 2, 5)] == [0, 0, 3]
    with pytest.raises(MetadataCorrupt):
        sm.dec_many(np.array([2], dtype=np.int64))
