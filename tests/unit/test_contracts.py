"""Contract suites: one set of behaviour tests run against every implementation of a protocol (as
thin-provisioning-tools' space_map/tests.rs does): metadata block stores and space maps."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from thinpool.errors import MetadataCorrupt, NoDataSpace, NoMetadataSpace, NoSpace
from thinpool.io.block_store import FileBlockStore, MemoryBlockStore
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.spacemap.core import CoreSpaceMap, RootSpaceMap
from thinpool.spacemap.metadata_paged import MetadataSpaceMap
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


def _metadata(nr: int, kind: str) -> MetadataSpaceMap:
    """A new metadata space map, its transaction manager's own map (it counts the superblock and the root of its
    ref-count tree), with ``nr`` blocks free."""
    total = nr + 2
    tm = TransactionManager(MemoryBlockStore(total), RootSpaceMap(total, 0))
    sm = MetadataSpaceMap.create(tm, total)
    assert sm.nr_allocated() == 2
    sm.kind = kind
    return sm


def _metadata_reloaded(nr: int, kind: str) -> MetadataSpaceMap:
    """The metadata space map of real metadata after a commit and a reopen (its bitmap paged in from disk), with
    ``nr`` blocks free: the pool's own blocks (superblock, trees, bitmaps, index) are counted in it."""
    used = _reloaded_metadata_sm(64).nr_allocated()
    sm = _reloaded_metadata_sm(used + nr)
    assert sm.nr_free() == nr and sm.pages_loaded == 0
    sm.kind = kind
    return sm


def _reloaded_metadata_sm(nr_meta: int) -> MetadataSpaceMap:
    store = MemoryBlockStore(nr_meta)
    PoolMetadata.format(store, data_block_size=128, nr_data_blocks=1000).close()
    sm = PoolMetadata.open(store).tm.sm
    assert isinstance(sm, MetadataSpaceMap)
    return sm


SPACE_MAPS = {"core": _core, "paged": _paged, "paged-reloaded": _reloaded, "metadata": _metadata,
              "metadata-reloaded": _metadata_reloaded}


@pytest.fixture(params=list(SPACE_MAPS))
def make_sm(request) -> Callable[[int, str], CoreSpaceMap | PagedSpaceMap]:
    return SPACE_MAPS[request.param]


def _free(sm: CoreSpaceMap | PagedSpaceMap) -> list[int]:
    """The blocks free now (a metadata space map counts its own bookkeeping, so not every block starts free)."""
    return [b for b in range(sm.nr_blocks) if sm.count(b) == 0]


@pytest.mark.parametrize("kind", ["data", "metadata"])
def test_sm_new_blocks_are_distinct_and_counted(make_sm, kind):
    sm = make_sm(100, kind)
    free, used = _free(sm), sm.nr_allocated()
    assert len(free) == 100 and sm.nr_blocks - used == 100
    got = [sm.new_block() for _ in range(100)]
    assert sorted(got) == free
    assert sm.nr_allocated() == used + 100 and all(sm.count(b) == 1 for b in got)
    with pytest.raises(NoMetadataSpace if kind == "metadata" else NoDataSpace) as ei:
        sm.new_block()
    assert isinstance(ei.value, NoSpace)


def test_sm_inc_dec_and_no_underflow(make_sm):
    sm = make_sm(10, "data")
    b = _free(sm)[3]
    sm.inc(b, 2)
    assert sm.count(b) == 2 and sm.dec(b) == 1 and sm.dec(b) == 0
    with pytest.raises(MetadataCorrupt):
        sm.dec(b)


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
    used = sm.nr_allocated()
    a = [sm.new_block() for _ in range(5)]
    sm.commit()
    before = [sm.count(b) for b in range(sm.nr_blocks)]
    sm.new_block()
    sm.inc(a[0])
    sm.dec(a[1])
    sm.abort()
    assert [sm.count(b) for b in range(sm.nr_blocks)] == before and sm.nr_allocated() == used + 5


@pytest.mark.parametrize("name", ["core", "paged-reloaded", "metadata-reloaded"])  # opened maps (a new one is
def test_sm_abort_before_any_commit_returns_to_the_opened_state(name):                # committed at format)
    sm = SPACE_MAPS[name](30, "data")
    before = [sm.count(b) for b in range(sm.nr_blocks)]
    used = sm.nr_allocated()
    got = [sm.new_block() for _ in range(7)]
    sm.inc(got[0])
    sm.abort()
    assert [sm.count(b) for b in range(sm.nr_blocks)] == before and sm.nr_allocated() == used
    assert sorted(sm.new_block() for _ in range(30)) == [b for b, c in enumerate(before) if c == 0]


def test_sm_batch_inc_dec_match_single_steps(make_sm):
    sm = make_sm(64, "data")
    f = _free(sm)
    blocks = np.array([f[1], f[1], f[2], f[5], f[5], f[5]], dtype=np.int64)
    sm.inc_many(blocks)
    assert [sm.count(f[j]) for j in (1, 2, 5)] == [2, 1, 3]
    sm.dec_many(blocks[:3])
    assert [sm.count(f[j]) for j in (1, 2, 5)] == [0, 0, 3]
    with pytest.raises(MetadataCorrupt):
        sm.dec_many(np.array([f[2]], dtype=np.int64))


def test_file_store_write_run_writes_consecutive_blocks_in_few_calls(tmp_path, monkeypatch):
    from thinpool.io import block_store

    (tmp_path / "m").write_bytes(bytes(3000 * BS))
    s = FileBlockStore(tmp_path / "m")
    calls = []
    real = block_store.os.pwritev
    monkeypatch.setattr(block_store.os, "pwritev",
                        lambda fd, bufs, off: (calls.append(len(bufs)), real(fd, bufs, off))[1])
    datas = [bytes([i % 251]) * BS for i in range(2500)]
    s.write_run(7, datas)
    assert sum(calls) == 2500 and len(calls) == -(-2500 // block_store._IOV_MAX)
    assert all(s.read_block(7 + i) == datas[i] for i in range(0, 2500, 97)) and s.read_block(6) == bytes(BS)
    assert s.read_block(2506) == datas[-1] and s.read_block(2507) == bytes(BS)
    s.close()


def test_pre_commit_writes_runs_and_the_same_bytes_as_block_by_block(tmp_path):
    """The metadata a commit writes through runs (file store) equals what block-by-block writes (memory store)."""
    from thinpool.metadata.pool_metadata import PoolMetadata as PM

    (tmp_path / "m").write_bytes(bytes(2048 * BS))
    files, mem = FileBlockStore(tmp_path / "m"), MemoryBlockStore(2048)
    for store in (files, mem):
        pmd = PM.format(store, data_block_size=128, nr_data_blocks=100000)
        n = 20000
        data = np.random.default_rng(3).choice(100000, size=n, replace=False).astype(np.int64)
        pmd.build_device(1, np.arange(n, dtype=np.uint64), data, np.zeros(n, dtype=np.uint32))
        pmd.commit()
        pmd.delete_thin(1)
        pmd.commit()
    for b in range(2048):
        assert files.read_block(b) == mem.read_block(b), b
    files.close()


def test_a_store_that_intercepts_block_writes_sees_every_one(tmp_path):
    """A FileBlockStore subclass overriding write_block (the restore's scratch store counts them) is written
    block by block; so is a wrapper passing other attributes on."""
    seen: list[int] = []

    class Counting(FileBlockStore):
        def write_block(self, b, data):
            seen.append(b)
            super().write_block(b, data)

    assert FileBlockStore.writes_runs() and not Counting.writes_runs()
    (tmp_path / "m").write_bytes(bytes(512 * BS))
    s = Counting(tmp_path / "m")
    pmd = PoolMetadata.format(s, data_block_size=128, nr_data_blocks=5000)
    written = pmd.tm.blocks_written
    assert len(seen) == written and written > 5
    s.close()
