"""Deferred copy-on-write (thin.py's module docstring): a sector-aligned write into a shared chunk writes only its
own bytes to the new block; the sectors never written are copied from the shared block before anything can see
the new block (a read of it, a commit, a device-table change, an unaligned write, a full table of pending
chunks). A chunk fully written before then costs no copy.

The state machine runs writes at sector granularity (and some not on sector boundaries), reads, commits (also
through ThinDevice.flush, as the NBD server's FLUSH does), snapshots, discards, deletes, reopens and crashes
against a byte model, with a table of pending chunks small enough to fill. Crash semantics: the last commit's
bytes, except that a chunk the commit left owned may hold bytes written since (in place, as dm-thin); a chunk
broken since the commit shows its shared (committed) bytes exactly. After each run the real thin_check passes.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import need_tool, run_tool
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, precondition, rule

import thinpool.thin as thin_mod
from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.check import check_metadata, format_report
from thinpool.pool import Pool

CH = 64 << 10
SECT = 512
DEV_SIZE = 6 * CH
EVENTS: dict[str, int] = {}


def _event(what: str) -> None:
    EVENTS[what] = EVENTS.get(what, 0) + 1


def _thin_check(path: str) -> None:
    r = run_tool("thin_check", os.path.join(path, "metadata"), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    rust = os.environ.get("THINPOOL_RUST_TOOLS")
    if rust and os.access(os.path.join(rust, "thin_check"), os.X_OK):
        r = run_tool(os.path.join(rust, "thin_check"), os.path.join(path, "metadata"), check=False)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def small_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thin_mod, "PENDING_MAX_BYTES", 3 * CH)


def _pool(tmp_path: Path, chunks: int = 64) -> Pool:
    return Pool.create(tmp_path / "pool", data_size=chunks * CH, chunk_size=CH)


def _snapshotted(tmp_path: Path) -> tuple[Pool, bytes]:
    """A pool whose device 1 (4 chunks of random bytes) has a snapshot, device 2."""
    p = _pool(tmp_path)
    d = p.create_thin(1, 4 * CH)
    old = random.Random(1).randbytes(4 * CH)
    d.write(0, old)
    p.create_snap(2, 1)
    return p, old


# --- examples ---------------------------------------------------------------------------------------------------
def test_fully_rewritten_chunk_copies_nothing(tmp_path: Path) -> None:
    p, old = _snapshotted(tmp_path)
    d = p.device(1)
    new = random.Random(2).randbytes(CH)
    order = list(range(0, CH, 4096))
    random.Random(3).shuffle(order)
    for o in order:  # 16 writes of 4 KiB in random order: the first breaks sharing
        d.write(CH + o, new[o:o + 4096])
    assert p.md.pending_copies(1) == {}  # every sector written: nothing left to copy
    p.commit()
    assert p.stats["cow_bytes"] == 0 and p.stats["cow_copies"] == 0
    assert d.read(0, 4 * CH) == old[:CH] + new + old[2 * CH:]
    assert p.device(2).read(0, 4 * CH) == old
    p.close()
    _thin_check(str(tmp_path / "pool"))


def test_commit_copies_only_the_sectors_never_written(tmp_path: Path) -> None:
    p, old = _snapshotted(tmp_path)
    d = p.device(1)
    d.write(CH + 4096, b"a" * 4096)
    d.write(CH + 3 * 4096, b"b" * 1024)
    assert set(p.md.pending_copies(1)) == {1}
    p.commit()
    assert p.md.pending_copies(1) == {}
    assert p.stats["cow_copies"] == 1 and p.stats["cow_bytes"] == CH - 5120
    want = bytearray(old)
    want[CH + 4096:CH + 8192] = b"a" * 4096
    want[CH + 3 * 4096:CH + 3 * 4096 + 1024] = b"b" * 1024
    p.close()
    with Pool.open(tmp_path / "pool", readonly=True) as ro:  # the committed chunk is complete on disk
        assert ro.device(1).read(0, 4 * CH) == want
        assert ro.device(2).read(0, 4 * CH) == old
    _thin_check(str(tmp_path / "pool"))


def test_read_of_a_pending_chunk_completes_it(tmp_path: Path) -> None:
    p, old = _snapshotted(tmp_path)
    d = p.device(1)
    d.write(2 * CH + 512, b"x" * 512)
    assert d.read(2 * CH, 1024) == old[2 * CH:2 * CH + 512] + b"x" * 512  # gap + fresh sector
    assert p.md.pending_copies(1) == {} and p.stats["cow_bytes"] == CH - 512
    buf = bytearray(CH)
    d.readinto(2 * CH, buf)
    assert bytes(buf) == old[2 * CH:2 * CH + 512] + b"x" * 512 + old[2 * CH + 1024:3 * CH]
    p.close()


def test_readinto_and_wide_reads_see_pending_chunks_merged(tmp_path: Path) -> None:
    p, old = _snapshotted(tmp_path)
    d = p.device(1)
    d.write(0, b"h" * 4096)
    d.write(3 * CH + 8192, b"t" * 8192)
    want = bytearray(old)
    want[0:4096] = b"h" * 4096
    want[3 * CH + 8192:3 * CH + 16384] = b"t" * 8192
    buf = bytearray(4 * CH)
    d.readinto(0, buf)  # several chunks: both pending ones completed first
    assert bytes(buf) == want and p.md.pending_copies(1) == {}
    p.close()


def test_crash_before_the_commit_leaves_the_shared_chunk(tmp_path: Path) -> None:
    p, old = _snapshotted(tmp_path)
    d = p.device(1)
    for c in range(4):
        d.write(c * CH + 4096 * c, b"n" * 4096)
    assert len(p.md.pending_copies(1)) == 4
    p.crash_close()
    with Pool.open(tmp_path / "pool") as p2:  # nothing was committed: both devices hold the old bytes
        assert p2.device(1).read(0, 4 * CH) == old
        assert p2.device(2).read(0, 4 * CH) == old
    _thin_check(str(tmp_path / "pool"))


def test_snapshot_of_a_device_with_pending_chunks_sees_them_complete(tmp_path: Path) -> None:
    p, old = _snapshotted(tmp_path)
    d = p.device(1)
    d.write(CH, b"s" * 512)
    p.create_snap(3, 1)  # a device-table change: the copy completes before the trees are shared
    want = old[:CH] + b"s" * 512 + old[CH + 512:]
    assert p.md.pending_copies(1) == {}
    assert p.device(3).read(0, 4 * CH) == want and d.read(0, 4 * CH) == want
    p.close()
    _thin_check(str(tmp_path / "pool"))


def test_discard_and_delete_drop_pending_chunks(tmp_path: Path) -> None:
    p, old = _snapshotted(tmp_path)
    d = p.device(1)
    d.write(CH, b"d" * 4096)
    d.write(2 * CH, b"e" * 4096)
    d.discard(CH, CH)
    assert set(p.md.pending_copies(1)) == {2}
    assert d.read(CH, CH) == bytes(CH)
    s = p.device(2)
    s.write(3 * CH, b"f" * 4096)  # the snapshot breaks too
    p.delete_thin(2)  # completes before the change, then the device goes
    assert p.md.pending_copies(2) == {}
    p.commit()
    assert d.read(0, 4 * CH) == old[:CH] + bytes(CH) + b"e" * 4096 + old[2 * CH + 4096:]
    p.close()
    _thin_check(str(tmp_path / "pool"))


def test_unaligned_write_completes_the_copy_first(tmp_path: Path) -> None:
    p, old = _snapshotted(tmp_path)
    d = p.device(1)
    d.write(0, b"a" * 512)
    d.write(700, b"b" * 100)  # inside a sector never written: the chunk is completed, then written
    assert p.md.pending_copies(1) == {}
    want = bytearray(old[:CH])
    want[:512] = b"a" * 512
    want[700:800] = b"b" * 100
    assert d.read(0, CH) == want
    p.close()


@pytest.mark.external
def test_a_full_table_breaks_the_next_chunk_at_once(tmp_path: Path, small_table: None) -> None:
    """A break that finds the table full copies around its piece at once (a chunk written whole in zeros and
    copied into later would cost a chunk write more); the chunks already pending stay pending."""
    need_tool("thin_check")
    p, old = _snapshotted(tmp_path)
    d = p.device(1)
    model = bytearray(old)
    for c in range(4):
        d.write(c * CH, b"q" * 512)
        model[c * CH:c * CH + 512] = b"q" * 512
    assert list(p.md.pending_copies(1)) == [0, 1, 2]  # three chunks fit: chunk 3 was copied when it broke
    assert p.stats["cow_copies"] == 1 and p.stats["cow_bytes"] == CH - 512
    d.write(3 * CH + 512, b"r" * 512)  # the chunk broken at once is owned: an overwrite in place
    model[3 * CH + 512:3 * CH + 1024] = b"r" * 512
    d.write(1 * CH + 512, b"s" * (CH - 512))  # pending chunk 1 rewritten whole: its copy is dropped
    model[1 * CH + 512:2 * CH] = b"s" * (CH - 512)
    assert list(p.md.pending_copies(1)) == [0, 2] and p.stats["cow_copies"] == 1
    assert d.read(0, 4 * CH) == model  # completes 0 and 2
    assert p.stats["cow_copies"] == 3
    p.commit()
    p.close()
    with Pool.open(tmp_path / "pool") as p2:
        assert p2.device(1).read(0, 4 * CH) == model and p2.device(2).read(0, 4 * CH) == old
    _thin_check(str(tmp_path / "pool"))


def test_abort_forgets_pending_chunks(tmp_path: Path) -> None:
    p, old = _snapshotted(tmp_path)
    d = p.device(1)
    d.write(CH, b"z" * 4096)
    p.abort()
    assert p.md.pending_copies(1) == {}
    assert d.read(0, 4 * CH) == old
    d.write(CH, b"y" * 4096)  # breaks again, from the shared chunk
    p.commit()
    assert d.read(CH, CH) == b"y" * 4096 + old[CH + 4096:2 * CH]
    p.close()
    _thin_check(str(tmp_path / "pool"))


def test_flush_completes_and_commits(tmp_path: Path) -> None:
    """The NBD server's FLUSH (and FUA) calls ThinDevice.flush: the copy completes and the commit is durable."""
    p, old = _snapshotted(tmp_path)
    d = p.device(1)
    d.write(CH + 512 * 5, b"w" * 1024)
    d.flush()
    p.crash_close()
    with Pool.open(tmp_path / "pool", readonly=True) as ro:
        assert ro.device(1).read(CH, CH) == old[CH:CH + 2560] + b"w" * 1024 + old[CH + 3584:2 * CH]
    _thin_check(str(tmp_path / "pool"))


# --- the state machine ------------------------------------------------------------------------------------------
class DeferredCowMachine(RuleBasedStateMachine):
    devs = Bundle("devs")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tp-dcow-")
        self.path = os.path.join(self.dir, "pool")
        self.pool: Pool | None = None
        self.model: dict[int, bytearray] = {}
        self.committed: dict[int, bytes] = {}
        self.owned_at_commit: dict[int, set[int]] = {}  # chunks a crash may show overwritten in place
        self.since: dict[int, list[tuple[int, bytes]]] = {}
        self.next_id = 0
        self.saved_max = thin_mod.PENDING_MAX_BYTES

    def _mark_committed(self) -> None:
        assert self.pool is not None
        self.committed = {d: bytes(m) for d, m in self.model.items()}
        self.since = {d: [] for d in self.model}
        self.owned_at_commit = {}
        for d in self.model:
            snap = self.pool.md.devices[d].snapshotted_time
            k, _, t = self.pool.md.mappings(d)
            self.owned_at_commit[d] = {int(c) for c, tt in zip(k.tolist(), t.tolist()) if tt >= snap}

    def _check(self, dev: int, offset: int, length: int) -> None:
        assert self.pool is not None
        got = self.pool.device(dev).read(offset, length)
        want = bytes(self.model[dev][offset:offset + length])
        if got != want:
            bad = int(np.flatnonzero(np.frombuffer(got, np.uint8) != np.frombuffer(want, np.uint8))[0])
            raise AssertionError(f"device {dev}: byte {offset + bad} (chunk {(offset + bad) // CH}) differs")

    @initialize(table=st.sampled_from([1, 2, 4, 4096]))
    def init(self, table: int) -> None:
        thin_mod.PENDING_MAX_BYTES = table * CH
        self.pool = Pool.create(self.path, data_size=96 * CH, chunk_size=CH)

    @precondition(lambda self: len(self.model) < 4)
    @rule(target=devs, seed=st.integers(0, 2**32 - 1), chunks=st.integers(0, 6))
    def create(self, seed: int, chunks: int) -> int:
        _event("create")
        assert self.pool is not None
        dev = self.next_id
        self.next_id += 1
        d = self.pool.create_thin(dev, DEV_SIZE)
        data = random.Random(seed).randbytes(chunks * CH)
        if data:
            d.write(0, data)
        self.model[dev] = bytearray(data + bytes(DEV_SIZE - len(data)))
        self.pool.commit()
        self._mark_committed()
        return dev

    @precondition(lambda self: len(self.model) < 5)
    @rule(target=devs, origin=devs)
    def snapshot(self, origin: int) -> int:
        _event("snapshot")
        assert self.pool is not None
        if origin not in self.model:
            return origin
        dev = self.next_id
        self.next_id += 1
        self.pool.create_snap(dev, origin)
        self.model[dev] = bytearray(self.model[origin])
        self._mark_committed()
        return dev

    def _write(self, dev: int, offset: int, data: bytes) -> None:
        assert self.pool is not None
        self.pool.device(dev).write(offset, data)
        self.model[dev][offset:offset + len(data)] = data
        self.since[dev].append((offset, data))

    def write_sectors(self, dev: int, chunk: int, sector: int, nr: int, seed: int) -> None:
        """Sector-aligned writes inside one chunk (the deferred breaks and the writes that fill them)."""
        if dev not in self.model:
            return
        _event("write sectors")
        nr = min(nr, CH // SECT - sector)
        self._write(dev, chunk * CH + sector * SECT, random.Random(seed).randbytes(nr * SECT))
        if self.pool is not None and self.pool.md.pending_copies(dev):
            _event("pending after a write")

    def fill_chunk(self, dev: int, chunk: int, seed: int) -> None:
        """A chunk rewritten 4 KiB at a time in random order (the snapshot-break cell's pattern)."""
        if dev not in self.model:
            return
        _event("fill chunk")
        rng = random.Random(seed)
        order = list(range(0, CH, 4096))
        rng.shuffle(order)
        for o in order[:rng.choice([15, 16])]:
            self._write(dev, chunk * CH + o, rng.randbytes(4096))

    def write_any(self, dev: int, where: int, length: int, seed: int) -> None:
        """Any offset and length (unaligned, multi-chunk)."""
        if dev not in self.model:
            return
        _event("write any")
        length = min(length, DEV_SIZE - where)
        self._write(dev, where, random.Random(seed).randbytes(length))

    @rule(dev=devs, ops=st.lists(st.tuples(st.sampled_from("sssssfard"), st.integers(0, 2**32 - 1)), min_size=1,
                                  max_size=10))
    def io_batch(self, dev: int, ops: list[tuple[str, int]]) -> None:
        """Several operations on one device in one step (sector writes dominate)."""
        for kind, seed in ops:
            rng = random.Random(seed)
            if kind == "s":
                self.write_sectors(dev, rng.randrange(6), rng.randrange(CH // SECT), rng.choice([1, 8, 8, 64]), seed)
            elif kind == "f":
                self.fill_chunk(dev, rng.randrange(6), seed)
            elif kind == "a":
                self.write_any(dev, rng.randrange(DEV_SIZE), rng.randrange(1, 2 * CH), seed)
            elif kind == "r":
                self.read(dev, rng.randrange(DEV_SIZE), rng.randrange(1, 2 * CH))
            else:
                self.discard(dev, rng.randrange(DEV_SIZE), rng.randrange(1, 3 * CH))

    def read(self, dev: int, where: int, length: int) -> None:
        if dev not in self.model:
            return
        _event("read")
        self._check(dev, where, min(length, DEV_SIZE - where))

    def discard(self, dev: int, where: int, length: int) -> None:
        assert self.pool is not None
        if dev not in self.model:
            return
        _event("discard")
        length = min(length, DEV_SIZE - where)
        self.pool.device(dev).discard(where, length)
        end = where + length
        for c in range(-(-where // CH), DEV_SIZE // CH):
            if (c + 1) * CH > end:
                break
            self.model[dev][c * CH:(c + 1) * CH] = bytes(CH)

    @rule(dev=consumes(devs))
    def delete(self, dev: int) -> None:
        assert self.pool is not None
        if dev not in self.model:
            return
        _event("delete")
        self.pool.delete_thin(dev)
        del self.model[dev]
        self._mark_committed()

    def commit(self, through_flush: bool) -> None:
        assert self.pool is not None
        _event("commit")
        if through_flush:
            self.pool.device(next(iter(self.model))).flush()
        else:
            self.pool.commit()
        assert not self.pool.md.pending_devices()
        self._mark_committed()

    @precondition(lambda self: bool(self.model))
    @rule(kind=st.sampled_from(["commit", "flush", "commit", "crash", "crash", "reopen", "verify"]))
    def lifecycle(self, kind: str) -> None:
        if kind in ("commit", "flush"):
            self.commit(kind == "flush")
        elif kind == "crash":
            self.crash()
        elif kind == "reopen":
            self.reopen()
        else:
            self.verify_all()

    @precondition(lambda self: len(self.model) < 5)
    @rule(dev=devs, seed=st.integers(0, 2**32 - 1))
    def snapshot_write_crash(self, dev: int, seed: int) -> None:
        """Breaks left pending when the power fails: a snapshot of ``dev``, sector writes to both, a crash."""
        if dev not in self.model:
            return
        snap = self.snapshot(dev)
        rng = random.Random(seed)
        for d in (dev, snap, dev):
            self.write_sectors(d, rng.randrange(6), rng.randrange(CH // SECT), rng.choice([1, 8, 64]), seed)
        self.crash()

    def reopen(self) -> None:
        assert self.pool is not None
        _event("reopen")
        self.pool.close()
        self.pool = Pool.open(self.path)
        self._mark_committed()
        for d in self.model:
            self._check(d, 0, DEV_SIZE)

    def crash(self) -> None:
        assert self.pool is not None
        _event("crash")
        if self.pool.md.pending_devices():
            _event("crash with pending copies")
        self.pool.crash_close()
        self.pool = Pool.open(self.path)
        assert sorted(self.pool.list_devices()) == sorted(self.committed)
        self.model = {}
        for d, old in self.committed.items():
            got = self.pool.device(d).read(0, DEV_SIZE)
            a = np.frombuffer(got, np.uint8)
            o = np.frombuffer(old, np.uint8)
            ok = a == o
            for c in self.owned_at_commit[d]:  # owned at the commit: overwritten in place, bytes since may show
                lo, hi = c * CH, (c + 1) * CH
                for off, data in self.since[d]:
                    a0, a1 = max(lo, off), min(hi, off + len(data))
                    if a0 < a1:
                        ok[a0:a1] |= a[a0:a1] == np.frombuffer(data[a0 - off:a1 - off], np.uint8)
            if not ok.all():
                bad = int(np.flatnonzero(~ok)[0])
                raise AssertionError(f"device {d} after a crash: byte {bad} (chunk {bad // CH}) is not the "
                                     "committed value (nor, in a chunk owned at the commit, one written since)")
            self.model[d] = bytearray(got)
        self._mark_committed()

    def verify_all(self) -> None:
        _event("verify all")
        for d in self.model:
            self._check(d, 0, DEV_SIZE)

    def teardown(self) -> None:
        try:
            if self.pool is not None:
                self.pool.close()
                with Pool.open(self.path, readonly=True) as ro:
                    self.pool = ro
                    assert sorted(ro.list_devices()) == sorted(self.model)
                    for d in self.model:
                        self._check(d, 0, DEV_SIZE)
                self.pool = None
                report = check_metadata(FileBlockStore(os.path.join(self.path, "metadata"), readonly=True))
                assert report.ok and not report.warnings, format_report(report)
                _thin_check(self.path)
        finally:
            thin_mod.PENDING_MAX_BYTES = self.saved_max
            shutil.rmtree(self.dir, ignore_errors=True)


DeferredCowMachine.TestCase.settings = settings(DeferredCowMachine.TestCase.settings, stateful_step_count=40,
                                                deadline=None)


@pytest.mark.external
def test_deferred_cow_against_byte_model() -> None:
    need_tool("thin_check")
    DeferredCowMachine.TestCase().runTest()
    print("deferred-cow model events:", EVENTS)
    assert EVENTS.get("pending after a write", 0) and EVENTS.get("crash with pending copies", 0)


def test_lock_free_reads_never_see_a_pending_chunks_gaps(tmp_path: Path) -> None:
    """A reader thread's lock-free single-chunk reads race a writer that breaks shared chunks with sector writes
    (deferred copies) and commits: every sector read is one some write put there (never a gap of a new block)."""
    import struct
    import threading

    nr_chunks = 8
    sectors = nr_chunks * CH // SECT

    def sector(i: int, gen: int) -> bytes:
        return struct.pack("<QQ", i, gen) * (SECT // 16)

    p = _pool(tmp_path, chunks=512)
    d = p.create_thin(1, nr_chunks * CH)
    d.write(0, b"".join(sector(i, 0) for i in range(sectors)))
    p.commit()
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        r = p.device(1)
        rng = random.Random(7)
        while not stop.is_set():
            c = rng.randrange(nr_chunks)
            o = rng.randrange(CH // 4096) * 4096
            got = r.read(c * CH + o, 4096)
            for k in range(8):
                s = got[k * SECT:(k + 1) * SECT]
                i, gen = struct.unpack_from("<QQ", s)
                if i != (c * CH + o) // SECT + k or s != sector(i, gen):
                    errors.append(f"chunk {c} sector {(o // SECT) + k}: {s[:16].hex()}")
                    return

    t = threading.Thread(target=reader)
    t.start()
    try:
        rng = random.Random(8)
        w = p.device(1)
        for rnd in range(30):
            p.create_snap(100 + rnd, 1)  # every chunk shared again
            for _ in range(40):
                i = rng.randrange(sectors)
                w.write(i * SECT, sector(i, rnd + 1))
            if rnd % 3 == 0:
                p.commit()
            p.delete_thin(100 + rnd)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    p.close()
    _thin_check(str(tmp_path / "pool"))


@pytest.mark.external
def test_a_full_table_with_large_chunks_breaks_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks above 128 KiB take the general deferred path (_prepare_new, the piece alone written); a full table
    sends it to the copy at once as well."""
    need_tool("thin_check")
    ch = 256 << 10
    monkeypatch.setattr(thin_mod, "PENDING_MAX_BYTES", 2 * ch)
    p = Pool.create(tmp_path / "pool", data_size=16 * ch, chunk_size=ch)
    d = p.create_thin(1, 4 * ch)
    old = random.Random(3).randbytes(4 * ch)
    d.write(0, old)
    p.create_snap(2, 1)
    model = bytearray(old)
    for c in range(4):
        piece = random.Random(c).randbytes(8192)
        d.write(c * ch + 4096, piece)
        model[c * ch + 4096:c * ch + 4096 + 8192] = piece
    assert list(p.md.pending_copies(1)) == [0, 1]
    assert p.stats["cow_copies"] == 2 and p.stats["cow_bytes"] == 2 * (ch - 8192)
    p.close()
    with Pool.open(tmp_path / "pool") as p2:
        assert p2.device(1).read(0, 4 * ch) == model and p2.device(2).read(0, 4 * ch) == old
    _thin_check(str(tmp_path / "pool"))


@pytest.mark.external
@pytest.mark.parametrize("ch", [CH, 256 << 10])
def test_4k_writes_at_any_sector_of_a_pending_chunk_count_exactly_their_sectors(tmp_path: Path, ch: int) -> None:
    """A 4 KiB write into a pending chunk marks its 8 sectors (from the table of 4 KiB masks for chunks up to
    128 KiB, computed for larger ones) wherever it starts, 4 KiB-aligned or not, up to the chunk's last 4 KiB: the
    pending bits are the union of the sectors written, the commit copies exactly the rest, and the device reads
    back as a byte model after a reopen."""
    need_tool("thin_check")
    p = Pool.create(tmp_path / "pool", data_size=16 * ch, chunk_size=ch)
    d = p.create_thin(1, 2 * ch)
    old = random.Random(1).randbytes(2 * ch)
    d.write(0, old)
    p.create_snap(2, 1)
    want = bytearray(old)
    spc = ch // 512
    sectors = [1, 3, 8, 17, spc - 8, spc - 9]  # in sectors: not 4 KiB-aligned, aligned, the chunk's last 4 KiB
    rng = random.Random(2)
    written: set[int] = set()
    for i, s in enumerate(sectors):
        piece = rng.randbytes(4096)
        d.write(ch + s * 512, piece)
        want[ch + s * 512:ch + s * 512 + 4096] = piece
        written.update(range(s, s + 8))
        bits = p.md.pending_copies(1)[1][2]
        assert bits == sum(1 << k for k in written), i
    assert d.read(0, ch) == old[:ch]  # the other chunk is untouched (and still shared)
    p.commit()
    assert p.stats["cow_bytes"] == ch - 512 * len(written)
    p.close()
    with Pool.open(tmp_path / "pool", readonly=True) as ro:
        assert ro.device(1).read(0, 2 * ch) == want
        assert ro.device(2).read(0, 2 * ch) == old
    _thin_check(str(tmp_path / "pool"))
