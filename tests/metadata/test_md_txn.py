"""Transactions: reopen after commit == the committed state; abort (and reopen after abort) == the previous
commit; a commit interrupted by a write error leaves the previous commit on disk; blocks freed in a transaction
are not reused before the commit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from md_helpers import new_pool_file, our_dump, our_dump_file

from thinpool.errors import StoreIOError
from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.check import check_metadata
from thinpool.metadata.pool_metadata import PoolMetadata

OPS = st.lists(st.one_of(
    st.tuples(st.just("create"), st.integers(0, 6)),
    st.tuples(st.just("snap"), st.integers(0, 6), st.integers(0, 6)),
    st.tuples(st.just("delete"), st.integers(0, 6)),
    st.tuples(st.just("map"), st.integers(0, 6), st.integers(0, 3000), st.integers(1, 300)),
    st.tuples(st.just("unmap"), st.integers(0, 6), st.integers(0, 3000), st.integers(1, 300)),
    st.tuples(st.just("trans"), st.integers(0, 100)),
    st.tuples(st.just("commit")),
    st.tuples(st.just("abort")),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("metasnap")),
), min_size=1, max_size=30)


def state_of(pmd: PoolMetadata) -> tuple:
    devs = {}
    for dev in pmd.device_ids():
        k, d, t = pmd.mappings(dev)
        det = pmd.get_device(dev)
        devs[dev] = (k.tolist(), d.tolist(), t.tolist(), det.mapped_blocks, det.creation_time,
                     det.snapshotted_time, det.transaction_id)
    return devs, pmd.time, pmd.trans_id, pmd.held_root, pmd.data_sm.counts.tolist()


@settings(max_examples=25)
@given(ops=OPS)
def test_reopen_after_commit_and_abort(ops, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("txn") / "pool.bin"
    pmd = new_pool_file(path, nr_meta_blocks=1024, nr_data_blocks=20_000)
    committed = state_of(pmd)
    for op in ops:
        kind = op[0]
        devs = set(pmd.device_ids())
        if kind == "create" and op[1] not in devs:
            pmd.create_thin(op[1])
        elif kind == "snap" and op[2] in devs and op[1] not in devs:
            pmd.create_snap(op[1], op[2])
        elif kind == "delete" and op[1] in devs:
            pmd.delete_thin(op[1])
        elif kind == "map" and op[1] in devs:
            for t in range(op[2], op[2] + op[3]):
                pmd.insert(op[1], t, pmd.alloc_data_block())
        elif kind == "unmap" and op[1] in devs:
            for t in range(op[2], op[2] + op[3]):
                pmd.remove(op[1], t)
        elif kind == "trans":
            pmd.set_transaction_id(pmd.trans_id, op[1])
        elif kind == "commit":
            pmd.commit()
            committed = state_of(pmd)
        elif kind == "metasnap":
            if pmd.held_root:
                pmd.release_metadata_snap()  # uncommitted until the next commit
            else:
                pmd.reserve_metadata_snap()  # commits
                committed = state_of(pmd)
        elif kind == "abort":
            pmd.abort()
            assert state_of(pmd) == committed
        elif kind == "reopen":
            # drop the open transaction: what is on disk is the last commit
            pmd.close()
            pmd = PoolMetadata.open(FileBlockStore(path))
            assert state_of(pmd) == committed
    # uncommitted work is invisible on disk; after commit it is what reopen sees
    live = state_of(pmd)
    other = PoolMetadata.open(FileBlockStore(path, readonly=True), readonly=True)
    assert state_of(other) == committed
    pmd.commit()
    assert state_of(PoolMetadata.open(FileBlockStore(path, readonly=True), readonly=True)) == live
    assert check_metadata(FileBlockStore(path, readonly=True)).problems == []


class FailAfter:
    """A FileBlockStore whose writes fail with StoreIOError after ``n`` successful block writes."""

    def __init__(self, inner: FileBlockStore, n: int) -> None:
        self.inner, self.left = inner, n

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def nr_blocks(self) -> int:
        return self.inner.nr_blocks

    def write_block(self, b, data) -> None:
        if self.left <= 0:
            raise StoreIOError(what="test", op=f"write of block {b}", reason="injected")
        self.left -= 1
        self.inner.write_block(b, data)


def _interrupted_commit(path, fail_after: int) -> FailAfter:
    pmd = PoolMetadata.open(FailAfter(FileBlockStore(path), fail_after))
    pmd.create_snap(2, 1)
    for t in range(0, 2000, 3):
        pmd.insert(2, t, pmd.alloc_data_block())
        pmd.remove(1, t + 1)
    store = pmd.store
    try:
        pmd.commit()
    finally:
        pmd.close()
    return store  # type: ignore[return-value]


@pytest.mark.parametrize("where", ["first", "early", "middle", "superblock"])
def test_commit_interrupted_by_write_error_keeps_previous_commit(tmp_path, where) -> None:
    path = tmp_path / "pool.bin"
    pmd = new_pool_file(path, nr_meta_blocks=1024, nr_data_blocks=20_000)
    pmd.create_thin(1)
    for t in range(2000):
        pmd.insert(1, t, pmd.alloc_data_block())
    pmd.commit()
    before = our_dump(pmd)
    pmd.close()
    image = path.read_bytes()
    total = 10**9 - _interrupted_commit(path, 10**9).left  # dry run: block writes of this commit (sb last)
    assert total > 10
    path.write_bytes(image)
    n = {"first": 0, "early": 2, "middle": total // 2, "superblock": total - 1}[where]
    with pytest.raises(StoreIOError):
        _interrupted_commit(path, n)
    # every write the failed commit made went to blocks the last commit does not use: still intact
    assert our_dump_file(path) == before
    assert check_metadata(FileBlockStore(path, readonly=True)).problems == []


def test_freed_blocks_not_reused_before_commit(tmp_path) -> None:
    """Metadata blocks freed in a transaction (a deleted device's tree) and data blocks freed by unmapping are not
    handed out again until the commit."""
    path = tmp_path / "pool.bin"
    pmd = new_pool_file(path, nr_meta_blocks=1024, nr_data_blocks=3000)
    keys = np.arange(2000, dtype=np.uint64)
    pmd.build_device(1, keys, keys, np.zeros(2000, dtype=np.uint64))
    pmd.commit()
    old_nodes = set(np.flatnonzero(pmd.tm.sm.counts).tolist())
    pmd.delete_thin(1)
    pmd.create_thin(2)
    got_data = [pmd.alloc_data_block() for _ in range(1000)]
    assert min(got_data) >= 2000  # 0..1999 were freed by the delete but are still committed in use
    for i, b in enumerate(got_data):
        pmd.insert(2, i, b)
    new_nodes = set(pmd.tm.dirty)
    assert not (new_nodes & old_nodes)
    pmd.commit()
    # after the commit the freed data blocks are allocatable again
    again = [pmd.alloc_data_block() for _ in range(10)]
    assert any(b < 2000 for b in again) or pmd.data_sm.nr_allocatable() >= 1990
    for b in again:
        pmd.data_sm.dec(b)
    pmd.commit()
    assert check_metadata(FileBlockStore(path, readonly=True)).problems == []


def test_metadata_full_then_abort(tmp_path) -> None:
    """Filling a tiny metadata device raises NoMetadataSpace (typed); the disk still holds the last commit; after
    abort the pool is usable again and passes the real thin_check."""
    from md_helpers import real_thin_check

    from thinpool.errors import NoMetadataSpace
    path = tmp_path / "p.bin"
    pmd = new_pool_file(path, nr_meta_blocks=40, nr_data_blocks=100_000)
    pmd.create_thin(1)
    pmd.commit()
    committed = our_dump(pmd)
    t = 0
    with pytest.raises(NoMetadataSpace):
        for _ in range(100):
            for _ in range(500):
                pmd.insert(1, t, pmd.alloc_data_block())
                t += 1
            pmd.commit()
            committed = our_dump(pmd)
    assert t > 500
    assert our_dump_file(path) == committed
    assert check_metadata(FileBlockStore(path, readonly=True)).problems == []
    pmd.abort()
    assert our_dump(pmd) == committed
    pmd.create_thin(2)
    pmd.commit()
    assert check_metadata(FileBlockStore(path, readonly=True)).problems == []
    real_thin_check(path)
