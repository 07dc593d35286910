"""Review 4: a power cut at every write and sync of a commit that rebuilds the data ref-count tree bottom-up
(fc77916) and widens a page past 255 in the same commit (f96ee7a).

The commit under test deletes a device whose 3,000 blocks were shared three ways (3 -> 2: every entry leaves the
tree), deletes 5 of 260 devices sharing two blocks (260 -> 255, a widened page decremented below 256), and builds
three devices sharing 2,000 new blocks (0 -> 3) plus 260 devices sharing one block of a page never used (0 -> 260:
widened in the rebuild commit). It runs once on a recording store; then, for every event N of its trace, the same
run cut at N with the writes since the last sync all landed (the drive wrote its cache, the superblock not yet),
none landed, or a seeded subset. The disk the next boot finds must open as exactly the old or the new commit: the
data counts equal to the oracle of that commit, the ref-count tree holding its counts >= 3 exactly, thinpool's
full check clean, and (at sampled points and both ends) the C++ and Rust thin_check clean. Landing every write of
the cut commit and keeping the old superblock is what catches a new ref-count tree node (or bitmap) written over a
block the last commit still uses.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from oracles import RUN_CHECKERS, assert_thin_check_blocks

from thinpool.formats.space_map import ENTRIES_PER_BITMAP as E
from thinpool.io.block_store import MemoryBlockStore
from thinpool.metadata.check import check_metadata
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.spacemap import paged
from thinpool.testing.faulty import FaultPlan, FaultyBlockStore, PowerCut

NR_DATA = 5 * E + 33
NR_META = 8192
SHARED3 = 3000
WIDE = 260


def _build(pmd: PoolMetadata, dev: int, data: np.ndarray) -> None:
    n = len(data)
    pmd.build_device(dev, np.arange(n, dtype=np.uint64), data.astype(np.uint64), np.zeros(n, dtype=np.uint64))


def _state_a() -> tuple[dict[int, bytes], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(44)
    store = MemoryBlockStore(NR_META)
    pmd = PoolMetadata.format(store, data_block_size=128, nr_data_blocks=NR_DATA)
    oracle = np.zeros(NR_DATA, dtype=np.int64)
    d3 = np.sort(rng.choice(3 * E, SHARED3, replace=False))  # pages 0-2
    for dev in (1, 2, 3):
        _build(pmd, dev, d3)
    oracle[d3] += 3
    free = np.setdiff1d(np.arange(3 * E), d3)
    wide = np.sort(rng.choice(free, 2, replace=False))
    for dev in range(10, 10 + WIDE):
        _build(pmd, dev, wide)
    oracle[wide] += WIDE
    pmd.set_transaction_id(0, 1)
    pmd.commit()
    pmd.close()
    return dict(store.blocks), oracle, d3, wide, rng.choice(np.arange(3 * E, 4 * E), 2000, replace=False)


def _workload_b(pmd: PoolMetadata, fresh: np.ndarray, *, commit: bool = True) -> None:
    pmd.delete_thin(3)
    for dev in range(10, 15):
        pmd.delete_thin(dev)
    fresh = np.sort(fresh)
    for dev in (4, 5, 6):
        _build(pmd, dev, fresh)
    one = np.array([4 * E + 17], dtype=np.int64)  # page 4, never used before
    for dev in range(1000, 1000 + WIDE):
        _build(pmd, dev, one)
    pmd.set_transaction_id(1, 2)
    if commit:
        pmd.commit()


def _oracle_b(oracle_a: np.ndarray, d3: np.ndarray, wide: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    o = oracle_a.copy()
    o[d3] -= 1
    o[wide] -= 5
    o[fresh] += 3
    o[4 * E + 17] += WIDE
    return o


def _verify(blocks: dict[int, bytes], oracles: dict[int, np.ndarray], what: str, *, real: bool) -> int:
    store = MemoryBlockStore(NR_META)
    store.blocks = dict(blocks)
    pmd = PoolMetadata.open(store)
    tid = pmd.current_superblock().trans_id
    assert tid in oracles, what
    oracle = oracles[tid]
    assert np.array_equal(pmd.data_sm.counts.astype(np.int64), oracle), what
    items = list(pmd.data_disk.rc_tree.items(pmd.data_disk.ref_count_root))
    big = np.flatnonzero(oracle >= 3)
    assert [k for k, _ in items] == big.tolist() and [v for _, v in items] == oracle[big].tolist(), what
    pmd.data_sm.validate_all()
    pmd.close()
    report = check_metadata(MemoryBlockStore_from(blocks))
    # (shared blocks at mapping time 0 are warned about: the devices were built, not snapshotted)
    errors = [str(p) for p in report.problems if not p.warning]
    assert errors == [], (what, errors)
    if real:
        assert_thin_check_blocks(blocks, NR_META, what=what)
    return tid


def MemoryBlockStore_from(blocks: dict[int, bytes]) -> MemoryBlockStore:  # noqa: N802
    s = MemoryBlockStore(NR_META)
    s.blocks = dict(blocks)
    return s


def _run(disk_a: dict[int, bytes], fresh: np.ndarray, plan: FaultPlan) -> FaultyBlockStore:
    inner = MemoryBlockStore_from(disk_a)
    fstore = FaultyBlockStore(inner, plan)
    pmd = PoolMetadata.open(fstore)
    try:
        _workload_b(pmd, fresh)
    except PowerCut:
        pass
    return fstore


@pytest.mark.external
def test_power_cut_at_every_event_of_a_rebuild_and_widen_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    disk_a, oracle_a, d3, wide, fresh = _state_a()
    oracle_b = _oracle_b(oracle_a, d3, wide, fresh)
    rebuilt: list[bool] = []
    orig = paged.PagedSpaceMap._rebuild_ref_counts

    def spy(self, order):  # type: ignore[no-untyped-def]
        did = orig(self, order)
        rebuilt.append(did)
        return did

    monkeypatch.setattr(paged.PagedSpaceMap, "_rebuild_ref_counts", spy)
    rec = FaultPlan(record=True)
    done = _run(disk_a, fresh, rec)
    monkeypatch.undo()
    assert rebuilt == [True], rebuilt  # the commit under test rebuilt the tree (default thresholds)
    nr_events = rec.events
    assert nr_events > 20
    assert _verify(done.inner.blocks, {2: oracle_b}, "completed run", real=True) == 2
    seen = {1: 0, 2: 0}
    rng = random.Random(4)
    sample = set(rng.sample(range(1, nr_events + 1), min(8, nr_events))) | {1, nr_events - 1, nr_events}
    for n in range(1, nr_events + 1):
        for lose in ("none", "all", random.Random(n)):
            plan = FaultPlan(at=n, kind="power_cut", lose=lose)
            fstore = _run(disk_a, fresh, plan)
            assert plan.crashed, n
            real = RUN_CHECKERS and n in sample and lose == "none"
            tid = _verify(fstore.inner.blocks, {1: oracle_a, 2: oracle_b}, f"cut at event {n}/{nr_events} "
                          f"lose={lose if isinstance(lose, str) else 'random'}", real=real)
            seen[tid] += 1
    assert seen[1] and seen[2], seen


@pytest.mark.external
def test_a_write_error_at_any_event_of_the_rebuild_commit_aborts_to_the_old_commit_and_a_retry_lands() -> None:
    """An I/O error (then a full disk) at every write of the same rebuild-and-widen commit: the commit raises, the
    pool metadata is back at the old commit in memory (counts, ref-count tree) and on disk, and the same workload
    run again on the same object then commits exactly the new state (both checkers accept it at sampled points)."""
    from thinpool.errors import ThinpoolError

    disk_a, oracle_a, d3, wide, fresh = _state_a()
    oracle_b = _oracle_b(oracle_a, d3, wide, fresh)
    rec = FaultPlan(record=True)
    rstore = FaultyBlockStore(MemoryBlockStore_from(disk_a), rec)
    rpmd = PoolMetadata.open(rstore)
    _workload_b(rpmd, fresh, commit=False)
    before_commit = rec.writes  # the mapping trees' nodes written as they fill, before the commit
    rpmd.commit()
    nr_writes = rec.writes
    assert nr_writes - before_commit > 20
    rng = random.Random(9)
    sample = set(rng.sample(range(before_commit + 1, nr_writes + 1), 4)) | {before_commit + 1, nr_writes}
    failed = 0
    for n in range(before_commit + 1, nr_writes + 1):
        kind = "eio" if n % 2 else "enospc"
        plan = FaultPlan(at=n, kind=kind, ops=("write",))
        fstore = FaultyBlockStore(MemoryBlockStore_from(disk_a), plan)
        pmd = PoolMetadata.open(fstore)
        _workload_b(pmd, fresh, commit=False)
        try:
            pmd.commit()
        except ThinpoolError:
            failed += 1
            assert not pmd.failed or n == nr_writes, n  # (only the superblock's own write may fail the object)
            if pmd.failed:
                continue
            assert np.array_equal(pmd.data_sm.counts.astype(np.int64), oracle_a), n
            items = list(pmd.data_disk.rc_tree.items(pmd.data_disk.ref_count_root))
            big = np.flatnonzero(oracle_a >= 3)
            assert [k for k, _ in items] == big.tolist() and [v for _, v in items] == oracle_a[big].tolist(), n
            on_disk = dict(fstore.inner.blocks)
            on_disk.update(fstore.pending)  # whatever the failed commit wrote, landed
            assert _verify(on_disk, {1: oracle_a}, f"failed commit at write {n}", real=False) == 1
            _workload_b(pmd, fresh)  # again, on the same object: no fault now
        final = dict(fstore.inner.blocks)
        final.update(fstore.pending)
        assert _verify(final, {2: oracle_b}, f"retried after a failure at write {n}",
                       real=RUN_CHECKERS and n in sample) == 2
    assert failed == nr_writes - before_commit
