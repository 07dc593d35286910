"""The mapping tree's writable leaves (btree/two_level.py): an insert into a leaf that an earlier insert of the same
transaction left writable changes that leaf in place, without the descent, the shadows and their reference-count
reads. It is only right while nothing made a node of that path shared again or changed the tree's shape: the
sharing generation (tx/transaction.py ``share_gen``) guards that.

A Hypothesis state machine interleaves inserts (single, runs of neighbours that fill and split leaves, batched
runs), removals, thin devices and snapshots created and deleted, metadata snapshots reserved and released,
commits and aborts, on a file-backed PoolMetadata, against a dict model of every device's mappings (and of the
held metadata snapshot's). After each step the mappings of every device equal the model's; after each commit
thinpool's checker finds nothing and the real thin_check (C++ 0.9.0 and Rust 1.1.0) accepts the committed
metadata (with ``-m`` the held snapshot too). The machine counts how many inserts took the writable-leaf path, so
a run that never exercised it fails.

Deterministic tests then pin the cases a stale writable leaf would get wrong: a snapshot, a metadata snapshot,
an abort, a commit, a delete and a split between two inserts into the same leaf.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from oracles import assert_thin_check

from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.check import check_metadata, format_report
from thinpool.metadata.pool_metadata import PoolMetadata

pytestmark = pytest.mark.external

NR_META = 4096
NR_DATA = 200_000
MAX_DEVS = 5
KEYS = 1500  # thin blocks 0..KEYS-1: about six leaves of 252 entries per device, so runs split them
STATS: dict[str, int] = {}


def _new(path: str) -> PoolMetadata:
    with open(path, "wb") as f:
        f.truncate(NR_META * 4096)
    return PoolMetadata.format(FileBlockStore(path), data_block_size=128, nr_data_blocks=NR_DATA)


def _mappings(pmd: PoolMetadata, dev_id: int) -> dict[int, int]:
    k, d, _ = pmd.mappings(dev_id)
    return dict(zip(k.tolist(), d.tolist()))


def _check_committed(path: str, *, held: bool) -> None:
    """The committed metadata on ``path``: thinpool's checker clean, both real checkers accept it."""
    report = check_metadata(FileBlockStore(path, readonly=True))
    assert report.ok and not report.problems, format_report(report)
    assert_thin_check(path)
    if held:
        assert_thin_check(path, "-m")


class WritableLeafMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tp-dp6-")
        self.path = os.path.join(self.dir, "metadata")
        self.pmd = _new(self.path)
        self.model: dict[int, dict[int, int]] = {}
        self.committed: dict[int, dict[int, int]] = {}
        self.held: dict[int, dict[int, int]] | None = None  # the devices as the held metadata snapshot has them
        self.held_committed: dict[int, dict[int, int]] | None = None  # ... as the last commit has it
        self.next_id = 0
        self.last = -1

    def teardown(self) -> None:
        try:
            self.pmd.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- helpers --------------------------------------------------------------------------------------------
    def _dev(self, i: int) -> int:
        """Device ``i`` (by rank); 0 and 1 mean the one used last, so that steps keep coming back to the leaves an
        earlier step left writable."""
        ids = sorted(self.model)
        if i < 2 and self.last in self.model:
            return self.last
        self.last = ids[i % len(ids)]
        return self.last

    def _insert(self, dev: int, thin_block: int) -> None:
        before = self.pmd.tree.full_inserts
        db = self.pmd.alloc_data_block()
        self.pmd.insert(dev, thin_block, db)
        self.model[dev][thin_block] = db
        STATS["inserts"] = STATS.get("inserts", 0) + 1
        if self.pmd.tree.full_inserts == before:
            STATS["writable-leaf inserts"] = STATS.get("writable-leaf inserts", 0) + 1

    # --- rules ----------------------------------------------------------------------------------------------
    @precondition(lambda self: len(self.model) < MAX_DEVS)
    @rule()
    def create_thin(self) -> None:
        self.pmd.create_thin(self.next_id)
        self.model[self.next_id] = {}
        self.next_id += 1

    @precondition(lambda self: 0 < len(self.model) < MAX_DEVS)
    @rule(i=st.integers(0, MAX_DEVS))
    def create_snap(self, i: int) -> None:
        origin = self._dev(i)
        self.pmd.create_snap(self.next_id, origin)
        self.last = origin if i % 2 else self.next_id  # the origin or the snapshot next
        self.model[self.next_id] = dict(self.model[origin])
        self.next_id += 1

    @precondition(lambda self: len(self.model) > 1)
    @rule(i=st.integers(0, MAX_DEVS))
    def delete(self, i: int) -> None:
        dev = self._dev(i)
        self.pmd.delete_thin(dev)
        del self.model[dev]

    @precondition(lambda self: self.model)
    @rule(i=st.integers(0, MAX_DEVS), key=st.integers(0, KEYS - 1))
    def insert(self, i: int, key: int) -> None:
        self._insert(self._dev(i), key)

    @precondition(lambda self: self.model)
    @rule(i=st.integers(0, MAX_DEVS), start=st.integers(0, KEYS - 1), n=st.sampled_from([2, 20, 130, 300]),
          step=st.sampled_from([1, 1, 2, 7]), down=st.booleans())
    def insert_neighbours(self, i: int, start: int, n: int, step: int, down: bool) -> None:
        """Inserts one by one into neighbouring keys (what a break of consecutive chunks does): most go into a
        leaf the previous one left writable; 130 and 300 of them fill leaves and split them."""
        dev = self._dev(i)
        keys = [start + j * step for j in range(n)]
        for k in reversed(keys) if down else keys:
            self._insert(dev, k)

    @precondition(lambda self: self.model)
    @rule(i=st.integers(0, MAX_DEVS), start=st.integers(0, KEYS - 1), n=st.integers(1, 40))
    def insert_run(self, i: int, start: int, n: int) -> None:
        dev = self._dev(i)
        keys = list(range(start, start + n))
        dbs = [self.pmd.alloc_data_block() for _ in keys]
        self.pmd.insert_run(dev, keys, dbs)
        self.model[dev].update(zip(keys, dbs))

    @precondition(lambda self: self.model)
    @rule(i=st.integers(0, MAX_DEVS), lo=st.integers(0, KEYS - 1), n=st.sampled_from([1, 5, 200]))
    def remove_range(self, i: int, lo: int, n: int) -> None:
        dev = self._dev(i)
        assert self.pmd.remove_range(dev, lo, lo + n) == sum(1 for k in self.model[dev] if lo <= k < lo + n)
        for k in [k for k in self.model[dev] if lo <= k < lo + n]:
            del self.model[dev][k]

    @rule()
    def commit(self) -> None:
        self.pmd.commit()
        self.committed = {d: dict(m) for d, m in self.model.items()}
        self.held_committed = self.held
        _check_committed(self.path, held=self.held is not None)

    @rule()
    def abort(self) -> None:
        self.pmd.abort()
        self.model = {d: dict(m) for d, m in self.committed.items()}
        self.held = self.held_committed  # a release since the commit is undone too

    @precondition(lambda self: self.held is None)
    @rule()
    def reserve_metadata_snap(self) -> None:
        self.pmd.reserve_metadata_snap()  # commits first
        self.committed = {d: dict(m) for d, m in self.model.items()}
        self.held = self.held_committed = {d: dict(m) for d, m in self.model.items()}

    @precondition(lambda self: self.held is not None)
    @rule()
    def release_metadata_snap(self) -> None:
        self.pmd.release_metadata_snap()
        self.held = None

    # --- invariants -----------------------------------------------------------------------------------------
    @invariant()
    def mappings_match(self) -> None:
        assert sorted(self.pmd.device_ids()) == sorted(self.model)
        for d, m in self.model.items():
            assert _mappings(self.pmd, d) == m, f"device {d}"
            assert self.pmd.get_device(d).mapped_blocks == len(m)

    @invariant()
    def held_snapshot_intact(self) -> None:
        if self.held is None:
            return
        snap = PoolMetadata.open(FileBlockStore(self.path, readonly=True), use_metadata_snap=True)
        try:
            assert {d: _mappings(snap, d) for d in snap.device_ids()} == self.held
        finally:
            snap.close()


WritableLeafMachine.TestCase.settings = settings(WritableLeafMachine.TestCase.settings, stateful_step_count=30)


def test_writable_leaf_state_machine() -> None:
    STATS.clear()
    WritableLeafMachine.TestCase().runTest()
    print(STATS)
    # the runs went through the writable-leaf path (and the full one): the machine tested what it is for
    assert STATS.get("writable-leaf inserts", 0) > 0.5 * STATS.get("inserts", 0), STATS
    assert STATS.get("writable-leaf inserts", 0) < STATS.get("inserts", 0), STATS


# --- the cases a stale writable leaf would get wrong -------------------------------------------------------------
def _fill(pmd: PoolMetadata, dev: int, n: int) -> dict[int, int]:
    m = {}
    for k in range(n):
        m[k] = pmd.alloc_data_block()
        pmd.insert(dev, k, m[k])
    return m


def test_inserts_into_a_shadowed_leaf_take_the_writable_path(tmp_path: Path) -> None:
    path = str(tmp_path / "metadata")
    pmd = _new(path)
    pmd.create_thin(0)
    m = _fill(pmd, 0, 1000)  # several leaves, built with splits in this transaction
    pmd.commit()
    pmd.create_snap(1, 0)
    pmd.commit()
    full0 = pmd.tree.full_inserts
    counts: list[int] = []
    orig = pmd.tm.sm.count

    def count(b: int) -> int:
        counts.append(b)
        return orig(b)

    pmd.tm.sm.count = count  # type: ignore[method-assign]
    try:
        new = {k: pmd.alloc_data_block() for k in range(1000)}
        for k in range(1000):  # the break of every chunk, in order: one full insert per leaf
            pmd.insert(0, k, new[k])
    finally:
        del pmd.tm.sm.count
    nr_leaves = len(list(pmd.mapping.leaves(pmd.device_root(0))))
    assert nr_leaves >= 4
    assert pmd.tree.full_inserts - full0 == nr_leaves
    # the reference counts read: the full inserts' shadows and the walks that keep a leaf, not some per insert
    assert len(counts) < 12 * nr_leaves
    assert _mappings(pmd, 0) == new
    assert _mappings(pmd, 1) == m  # the snapshot still sees the old blocks
    pmd.commit()
    _check_committed(path, held=False)
    pmd.close()


@pytest.mark.parametrize("between", ["create_snap", "reserve_metadata_snap", "abort", "commit", "delete other",
                                     "split", "remove", "insert_run", "create_thin"])
def test_no_writable_leaf_survives_what_can_share_or_reshape_it(tmp_path: Path, between: str) -> None:
    path = str(tmp_path / "metadata")
    pmd = _new(path)
    try:
        pmd.create_thin(0)
        pmd.create_thin(5)
        m0 = _fill(pmd, 0, 600)
        _fill(pmd, 5, 10)
        pmd.commit()
        committed = dict(m0)
        pmd.insert(0, 300, b1 := pmd.alloc_data_block())  # the leaf of 300 is writable now
        m0[300] = b1
        held = None
        snap: dict[int, int] | None = None
        if between == "create_snap":
            pmd.create_snap(1, 0)
            snap = dict(m0)
        elif between == "reserve_metadata_snap":
            pmd.reserve_metadata_snap()
            held = dict(m0)
            committed = dict(m0)
        elif between == "abort":
            pmd.abort()
            m0 = dict(committed)
        elif between == "commit":
            pmd.commit()
            committed = dict(m0)
        elif between == "delete other":
            pmd.delete_thin(5)
        elif between == "split":
            for k in range(1000, 1300):  # a new leaf at the end fills and splits; the leaf of 300 stays
                m0[k] = pmd.alloc_data_block()
                pmd.insert(0, k, m0[k])
        elif between == "remove":
            assert pmd.remove_range(0, 290, 300) == 10
            for k in range(290, 300):
                del m0[k]
        elif between == "insert_run":
            keys = list(range(250, 320, 2))
            dbs = [pmd.alloc_data_block() for _ in keys]
            pmd.insert_run(0, keys, dbs)
            m0.update(zip(keys, dbs))
        elif between == "create_thin":
            pmd.create_thin(2)
        for k in (301, 300, 299, 350):  # into the same leaf again
            m0[k] = pmd.alloc_data_block()
            pmd.insert(0, k, m0[k])
        assert _mappings(pmd, 0) == m0
        if snap is not None:
            assert _mappings(pmd, 1) == snap
        pmd.commit()
        assert _mappings(pmd, 0) == m0
        _check_committed(path, held=held is not None)
        if held is not None:
            s = PoolMetadata.open(FileBlockStore(path, readonly=True), use_metadata_snap=True)
            assert _mappings(s, 0) == held
            s.close()
    finally:
        pmd.close()
    pmd = PoolMetadata.open(FileBlockStore(path))
    assert _mappings(pmd, 0) == m0
    pmd.close()
