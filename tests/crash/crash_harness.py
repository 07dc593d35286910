"""Crash-test harness: a pool on fault-injecting in-memory stores, a model of what it must hold, the crash images
at every event of a recorded run, and the verification of one image against the model.

How a crash point is enumerated: the workload runs once with a recording FaultPlan (a dry run that counts every
metadata/data write and sync). Because the engine is deterministic, the run that crashes at event N performs
exactly the first N-1 events of the recording; so the disk the next boot sees is rebuilt from the recording by
replaying its I/O into the same FaultyBlockStore/FaultyDataStore classes and cutting the power at N (identical
semantics, without re-running the engine N times). ``test_trace_replay_matches_real_crash`` re-runs the engine
with a real power cut at sampled N and checks the disks are byte-identical to the replayed ones.
"""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oracles import RUN_CHECKERS, assert_thin_check_blocks

from thinpool.checksum import BlockType, stamp
from thinpool.errors import ThinpoolError
from thinpool.formats.superblock import NEEDS_CHECK_FLAG, build_superblock
from thinpool.io.block_store import MemoryBlockStore
from thinpool.metadata.check import check_metadata, format_report
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.pool import Pool, _write_manifest
from thinpool.testing.faulty import (
    Event,
    FaultPlan,
    FaultyBlockStore,
    FaultyDataStore,
    MemoryDataStore,
    PowerCut,
    torn_sectors,
)

CH = 64 * 1024
SECT = 512
LONG = os.environ.get("THINPOOL_LONG") == "1"
_TMP = tempfile.TemporaryDirectory(prefix="thinpool-crash-")  # every run's manifest dir lives here; removed at exit


def scratch(prefix: str = "run-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_TMP.name))
THIN_CHECK = RUN_CHECKERS  # the C++ and Rust thin_check (tests/oracles.py)


# --- model ------------------------------------------------------------------------------------------------------
@dataclass
class Snap:
    """What the pool must hold at one commit."""

    devs: dict[int, dict[int, bytes]]  # dev -> chunk -> bytes (absent: zeros)
    sizes: dict[int, int]  # dev -> chunks
    trans_id: int
    held: bool
    nr_data: int
    event: int  # index of the superblock write that made it durable (0: format)
    aborted: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)  # writes undefined after an abort


@dataclass
class Model:
    devs: dict[int, dict[int, bytes]] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    trans_id: int = 0
    held: bool = False
    nr_data: int = 0
    aborted: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)  # undefined since an abort

    def snap(self, event: int, held: bool | None = None) -> Snap:
        return Snap({d: dict(c) for d, c in self.devs.items()}, dict(self.sizes), self.trans_id,
                    self.held if held is None else held, self.nr_data, event,
                    {d: list(w) for d, w in self.aborted.items()})

    def write(self, dev: int, offset: int, data: bytes) -> None:
        chunks = self.devs[dev]
        pos = 0
        while pos < len(data):
            c, o = divmod(offset + pos, CH)
            n = min(CH - o, len(data) - pos)
            buf = bytearray(chunks.get(c, bytes(CH)))
            buf[o:o + n] = data[pos:pos + n]
            chunks[c] = bytes(buf)
            pos += n


# --- the pool under test ----------------------------------------------------------------------------------------
class Driver:
    """A Pool on FaultyBlockStore/FaultyDataStore over memory, driven in step with a Model."""

    def __init__(self, tmp: Path, plan: FaultPlan, *, nr_data: int = 192, nr_meta: int = 384) -> None:
        self.tmp = tmp
        self.plan = plan
        self.nr_meta = nr_meta
        self.meta_inner = MemoryBlockStore(nr_meta)
        self.data_inner = MemoryDataStore(nr_data * CH, CH)
        self.meta = FaultyBlockStore(self.meta_inner, plan)
        self.data = FaultyDataStore(self.data_inner, plan)
        self.model = Model(nr_data=nr_data)
        self.expected: dict[bytes, list[Snap]] = {}  # superblock bytes -> the state it commits
        self.writes: list[tuple[int, int, int, bytes]] = []  # (events before issue, dev, offset, data)
        self.ops = 0
        self._trace_seen = 0
        self.failed_op: Any = None
        self.committed_event = 0
        self.last_write: tuple[int, int, bytes] | None = None
        md = PoolMetadata.format(self.meta, data_block_size=CH // SECT, nr_data_blocks=nr_data)
        manifest: dict[str, Any] = {"format": 1, "transaction_id": 0, "devices": {},
                                    "options": {"zero": True, "discard": "passdown", "no_space": "error"}}
        _write_manifest(tmp, manifest)
        self.pool = Pool(tmp, md, self.data, manifest, readonly=False, lock_fd=None)  # type: ignore[arg-type]
        self.pool.meta_store = self.meta  # type: ignore[attr-defined]
        self.base_meta = None  # durable images right after format (set by start_recording)
        self.base_data = None
        self.start_event = 0

    def start_recording(self) -> None:
        """Everything so far is durable (format syncs); record from here on."""
        assert not self.meta.pending and not self.data.pending
        self.base_meta = dict(self.meta_inner.blocks)
        self.base_data = dict(self.data_inner.chunks)
        self.plan.record = True
        self.start_event = self.plan.events
        self._trace_seen = len(self.plan.trace)
        self.expected.setdefault(self.meta_inner.blocks[0], []).append(self.model.snap(self.plan.events))

    def _note(self, model: Model, held_before: bool | None = None) -> None:
        """Map every superblock written by the last op to the state it commits."""
        new = [e for e in self.plan.trace[self._trace_seen:] if e.store == "metadata" and e.op == "write"
               and e.where == 0 and not e.failed]
        self._trace_seen = len(self.plan.trace)
        for i, e in enumerate(new):
            held = held_before if (held_before is not None and i == 0) else None  # reserve: 1st commit
            self.expected.setdefault(e.data, []).append(model.snap(e.index, held))  # type: ignore[arg-type]
        self.ops += 1
        if new and self.failed_op is None:
            self.committed_event = new[-1].index

    def _op(self, call: Callable[[], Any], update: Callable[[Model], None], held_before: bool | None = None) -> None:
        """Run a pool operation and the same change on a copy of the model. If the operation fails, superblocks
        it wrote commit the state it was making (they may have landed); the caller then decides what the pool
        holds (``after_abort``)."""
        m = self.model
        tentative = Model({k: dict(v) for k, v in m.devs.items()}, dict(m.sizes), m.trans_id, m.held, m.nr_data,
                          {k: list(v) for k, v in m.aborted.items()})
        update(tentative)
        self.failed_op = None
        try:
            call()
        except BaseException:
            self.failed_op = call
            self._note(tentative, held_before)
            raise
        self.model = tentative
        self._note(tentative, held_before)

    def committed_snap(self) -> Snap:
        """The model of what the pool's last commit (md.sb) holds."""
        buf = build_superblock(self.pool.md.sb)
        stamp(buf, BlockType.SUPERBLOCK)
        snaps = self.expected[bytes(buf)]
        return snaps[-1]

    def open_transaction(self) -> bool:
        md = self.pool.md
        return bool(md.tm.dirty or md.tm.dirty_raw or (md.data_sm.counts != md.data_sm.committed).any()
                    or any(d.changed for d in md.devices.values()))

    def after_failed_write(self, dev: int, offset: int, data: bytes) -> None:
        """A failed write leaves its range undefined (old or new bytes); everything else stands."""
        self.model.aborted.setdefault(dev, []).append((offset, data))

    def after_abort(self) -> None:
        """The pool went back to its last commit: so does the model. Writes since then went to the data file in
        place (or not) and stay undefined until overwritten."""
        snap = self.committed_snap()
        aborted = {k: list(v) for k, v in self.model.aborted.items()}
        for ev, dev, off, data in self.writes:
            if ev >= snap.event:
                aborted.setdefault(dev, []).append((off, data))
        self.model = Model({k: dict(v) for k, v in snap.devs.items()}, dict(snap.sizes), snap.trans_id, snap.held,
                           snap.nr_data, aborted)

    # operations --------------------------------------------------------------------------------------------
    def create(self, dev: int, chunks: int) -> None:
        def upd(m: Model) -> None:
            m.devs[dev] = {}
            m.sizes[dev] = chunks
            m.trans_id += 1
        self._op(lambda: self.pool.create_thin(dev, chunks * CH), upd)

    def snap(self, dev: int, origin: int) -> None:
        def upd(m: Model) -> None:
            m.devs[dev] = dict(m.devs[origin])
            m.sizes[dev] = m.sizes[origin]
            m.aborted[dev] = list(m.aborted.get(origin, []))
            m.trans_id += 1
        self._op(lambda: self.pool.create_snap(dev, origin), upd)

    def delete(self, dev: int) -> None:
        def upd(m: Model) -> None:
            del m.devs[dev]
            del m.sizes[dev]
            m.trans_id += 1
        self._op(lambda: self.pool.delete_thin(dev), upd)

    def write(self, dev: int, offset: int, data: bytes) -> None:
        self.writes.append((self.plan.events, dev, offset, data))
        self.last_write = (dev, offset, data)
        self._op(lambda: self.pool.device(dev).write(offset, data), lambda m: m.write(dev, offset, data))
        self.last_write = None

    def discard(self, dev: int, chunk: int, nr: int) -> None:
        def upd(m: Model) -> None:
            for c in range(chunk, chunk + nr):
                m.devs[dev].pop(c, None)
        self._op(lambda: self.pool.device(dev).discard(chunk * CH, nr * CH), upd)

    def commit(self) -> None:
        self._op(self.pool.commit, lambda m: None)

    def resize_data(self, nr_data: int) -> None:
        def upd(m: Model) -> None:
            m.nr_data = nr_data
        self._op(lambda: self.pool.resize(nr_data * CH), upd)

    def reserve(self) -> None:
        def upd(m: Model) -> None:
            m.held = True
        self._op(self.pool.reserve_metadata_snap, upd, held_before=self.model.held)

    def release(self) -> None:
        def upd(m: Model) -> None:
            m.held = False
        self._op(self.pool.release_metadata_snap, upd)


def pattern(rng: random.Random, n: int) -> bytes:
    """Incompressible-looking test data (distinct per call)."""
    return rng.randbytes(n)


# --- workloads --------------------------------------------------------------------------------------------------
def wl_provision(d: Driver, rng: random.Random) -> None:
    d.create(1, 16)
    d.write(1, 0, pattern(rng, CH))  # whole chunk
    d.write(1, 3 * CH + 1024, pattern(rng, 4096))  # partial chunk (zeroed remainder)
    d.commit()
    d.write(1, 5 * CH, pattern(rng, 3 * CH))  # multi-chunk
    d.write(1, 0, pattern(rng, 512))  # in-place overwrite of a committed chunk
    d.commit()


def wl_snapshot(d: Driver, rng: random.Random) -> None:
    d.create(1, 16)
    d.write(1, 0, pattern(rng, 6 * CH))
    d.commit()
    d.snap(2, 1)
    d.write(1, 2 * CH + 512, pattern(rng, 1024))  # break sharing on the origin
    d.write(2, 4 * CH, pattern(rng, CH))  # and on the snapshot (whole chunk)
    d.commit()
    d.snap(3, 2)  # snapshot of a snapshot
    d.write(3, 0, pattern(rng, 2048))
    d.write(2, 0, pattern(rng, 512))
    d.commit()


def wl_discard(d: Driver, rng: random.Random) -> None:
    d.create(1, 16)
    d.write(1, 0, pattern(rng, 10 * CH))
    d.commit()
    d.snap(2, 1)
    d.discard(1, 2, 3)  # shared chunks: unmapped from the origin only
    d.commit()
    d.discard(2, 0, 8)  # the snapshot's: chunks 2-4 become free (passdown punches them)
    d.commit()
    d.write(1, 3 * CH, pattern(rng, CH))  # reuse of freed space
    d.commit()


def wl_delete(d: Driver, rng: random.Random) -> None:
    d.create(1, 16)
    d.write(1, 0, pattern(rng, 8 * CH))
    d.commit()
    d.snap(2, 1)
    d.write(2, CH, pattern(rng, CH))
    d.commit()
    d.delete(1)  # shared blocks survive in 2
    d.write(2, 5 * CH, pattern(rng, 2 * CH))
    d.delete(2)  # everything freed (uncommitted writes of 2 with it)
    d.create(3, 8)
    d.write(3, 0, pattern(rng, 4 * CH))
    d.commit()


def wl_resize(d: Driver, rng: random.Random) -> None:
    d.create(1, 64)
    d.write(1, 0, pattern(rng, 8 * CH))
    d.commit()
    d.resize_data(d.model.nr_data + 64)
    d.write(1, 20 * CH, pattern(rng, 4 * CH))
    d.resize_data(d.model.nr_data * 2)
    d.write(1, 40 * CH, pattern(rng, 2 * CH))
    d.commit()


def wl_metadata_snap(d: Driver, rng: random.Random) -> None:
    d.create(1, 16)
    d.write(1, 0, pattern(rng, 4 * CH))
    d.reserve()
    d.write(1, CH, pattern(rng, CH))  # live tree diverges from the held one
    d.write(1, 8 * CH, pattern(rng, 2 * CH))
    d.commit()
    d.snap(2, 1)
    d.release()
    d.write(2, 0, pattern(rng, 1024))
    d.reserve()
    d.delete(1)
    d.release()
    d.commit()


def wl_random_mix(d: Driver, rng: random.Random, nr_ops: int = 200) -> None:
    d.create(1, 24)
    next_id = 2
    for _ in range(nr_ops):
        devs = sorted(d.model.devs)
        r = rng.random()
        if r < 0.45 and devs:
            dev = rng.choice(devs)
            size = d.model.sizes[dev] * CH
            n = rng.choice([512, 4096, CH, 2 * CH, 3 * CH + 1024])
            off = rng.randrange(0, size - n) // SECT * SECT
            if d.pool.md.data_sm.nr_allocatable() < 6:
                d.commit()
                if d.pool.md.data_sm.nr_allocatable() < 6:
                    d.resize_data(d.model.nr_data + 64)
            d.write(dev, off, pattern(rng, n))
        elif r < 0.55 and devs:
            dev = rng.choice(devs)
            c = rng.randrange(d.model.sizes[dev])
            d.discard(dev, c, rng.randrange(1, 4))
        elif r < 0.70:
            d.commit()
        elif r < 0.78 and devs and len(devs) < 6:
            d.snap(next_id, rng.choice(devs))
            next_id += 1
        elif r < 0.84 and len(devs) > 1:
            d.delete(rng.choice(devs))
        elif r < 0.88 and len(devs) < 6:
            d.create(next_id, rng.choice([8, 16, 24]))
            next_id += 1
        elif r < 0.92:
            if d.model.held:
                d.release()
            else:
                d.reserve()
        elif r < 0.94 and d.model.nr_data < 1024:
            d.resize_data(d.model.nr_data + 32)
        else:
            d.commit()
    d.commit()


WORKLOADS: dict[str, Callable[[Driver, random.Random], None]] = {
    "provision": wl_provision,
    "snapshot": wl_snapshot,
    "discard": wl_discard,
    "delete": wl_delete,
    "resize": wl_resize,
    "metadata_snap": wl_metadata_snap,
    "random_mix": wl_random_mix,
}


def record(name: str, seed: int = 0) -> tuple[Driver, FaultPlan]:
    """The dry run: run the workload once, counting and recording every event."""
    plan = FaultPlan()
    tmp = scratch()
    d = Driver(tmp, plan)
    d.start_recording()
    WORKLOADS[name](d, random.Random(seed))
    return d, plan


def run_with_crash(name: str, at: int, *, seed: int = 0, lose: Any = "all", tear: bool = False,
                   tear_seed: int = 0) -> Driver:
    """Re-run the workload with a real power cut at event ``at`` (counted from the recording start)."""
    plan = FaultPlan(at=None, kind="power_cut", lose=lose, tear=tear, tear_seed=tear_seed)
    tmp = scratch()
    d = Driver(tmp, plan)
    d.start_recording()
    plan.at = d.start_event + at
    try:
        WORKLOADS[name](d, random.Random(seed))
    except PowerCut:
        pass
    else:
        raise AssertionError(f"no power cut happened at event {at}")
    return d


# --- crash images from a recording -----------------------------------------------------------------------------
@dataclass
class Image:
    n: int  # crash during counted event n (relative to the recording start); len+1 = after the last event
    variant: str  # lose_all | land_all | torn | random
    meta: dict[int, bytes]
    data: dict[int, bytes]


class Replayer:
    """Replays a recording's I/O into faulty stores over memory; ``crash`` clones the state and cuts the power."""

    def __init__(self, d: Driver) -> None:
        self.d = d
        self.plan = FaultPlan()
        self.meta_inner = MemoryBlockStore(d.nr_meta)
        self.meta_inner.blocks = dict(d.base_meta)  # type: ignore[arg-type]
        self.data_inner = MemoryDataStore(d.model.nr_data * CH, CH)
        self.data_inner.chunks = dict(d.base_data)  # type: ignore[arg-type]
        self.meta = FaultyBlockStore(self.meta_inner, self.plan)
        self.data = FaultyDataStore(self.data_inner, self.plan)

    def apply(self, e: Event) -> None:
        if e.failed:  # it did not happen; a failed sync lost (or landed) its writes, as the plan says
            if e.op == "sync":
                lose = self.d.plan.lose if isinstance(self.d.plan.lose, str) else "all"
                (self.meta if e.store == "metadata" else self.data)._lose_pending(lose)
            return
        if e.store == "metadata":
            if e.op == "write":
                self.meta.write_block(e.where, e.data)  # type: ignore[arg-type]
            elif e.op == "sync":
                self.meta.sync()
        else:
            if e.op == "write":
                self.data.pwrite(e.where, e.data)  # type: ignore[arg-type]
            elif e.op == "punch":
                self.data.punch(e.where, e.length)
            elif e.op == "sync":
                self.data.sync()
            elif e.op == "resize":
                self.data.resize(e.where)

    def crash(self, e: Event | None, variant: str, seed: int) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """The durable disks if the power fails during event ``e`` (None: after the last event)."""
        meta = MemoryBlockStore(self.d.nr_meta)
        meta.blocks = dict(self.meta_inner.blocks)
        data = MemoryDataStore(self.data_inner.size, CH)
        data.chunks = dict(self.data_inner.chunks)
        lose: Any = {"lose_all": "all", "torn": "all", "land_all": "none"}.get(variant) or random.Random(seed)
        plan = FaultPlan()
        m = FaultyBlockStore(meta, plan)
        m.pending, m.order = dict(self.meta.pending), list(self.meta.order)
        dd = FaultyDataStore(data, plan)
        dd.pending = list(self.data.pending)
        m._lose_pending(lose)
        dd._lose_pending(lose)
        if variant in ("torn", "random") and e is not None and e.op == "write" and not e.failed:
            rng = random.Random(seed ^ e.index)
            if e.store == "metadata":
                meta.write_block(e.where, torn_sectors(meta.read_block(e.where), e.data, rng))  # type: ignore[arg-type]
            else:
                old = data.pread(e.where, len(e.data))  # type: ignore[arg-type]
                data.pwrite(e.where, torn_sectors(old, e.data, rng))  # type: ignore[arg-type]
        return meta.blocks, data.chunks

    def has_pending(self) -> bool:
        return bool(self.meta.pending) or bool(self.data.pending)


# --- verification -----------------------------------------------------------------------------------------------
class Verifier:
    def __init__(self, d: Driver) -> None:
        self.d = d
        self.verified = 0
        self.thin_checked = 0
        self.bytes_checked = 0

    def allowed_later(self, snap: Snap, crash_event: int, dev: int) -> list[tuple[int, bytes]]:
        """Writes to ``dev`` issued after ``snap`` was committed and before the crash (they may or may not show)."""
        return [(off, data) for ev, dv, off, data in self.d.writes
                if dv == dev and snap.event <= ev < crash_event] + snap.aborted.get(dev, [])

    def verify(self, meta: dict[int, bytes], data: dict[int, bytes], crash_event: int, *,
               thin_check: bool = False, reuse: bool = False, what: str = "") -> None:
        store = MemoryBlockStore(self.d.nr_meta)
        store.blocks = dict(meta)
        rep = check_metadata(store)
        assert rep.ok, f"{what}: checker failed:\n{format_report(rep)}"
        sb0 = meta[0]
        if rep.needs_check:
            # a failed commit set needs_check on the last committed superblock (dm-thin's
            # metadata_operation_failed): the state must still be that commit's; then the pool is reused as after
            # a check
            sb = PoolMetadata.read_superblock(store)
            buf = build_superblock(sb.replace(flags=sb.flags & ~NEEDS_CHECK_FLAG))
            stamp(buf, BlockType.SUPERBLOCK)
            sb0 = bytes(buf)
            store.blocks[0] = sb0
        snaps = self.d.expected.get(sb0)
        assert snaps, f"{what}: the superblock on disk is none of the committed ones"
        md = PoolMetadata.open(store)
        errors = []
        for snap in snaps:
            err = self._compare(md, data, snap, crash_event)
            if err is None:
                break
            errors.append(err)
        else:
            raise AssertionError(f"{what}: state differs from the committed model: {errors}")
        if thin_check and THIN_CHECK:
            self.thin_check(meta, what)
        if reuse:
            self.reuse(store, data, snap, what)
        self.verified += 1

    def _compare(self, md: PoolMetadata, data: dict[int, bytes], snap: Snap, crash_event: int) -> str | None:
        if sorted(md.devices) != sorted(snap.devs):
            return f"devices {sorted(md.devices)} != {sorted(snap.devs)} (commit at event {snap.event})"
        if md.trans_id != snap.trans_id:
            return f"transaction id {md.trans_id} != {snap.trans_id}"
        if bool(md.held_root) != snap.held:
            return f"held metadata root {md.held_root} but model held={snap.held}"
        if md.nr_data_blocks != snap.nr_data:
            return f"{md.nr_data_blocks} data blocks != {snap.nr_data}"
        zero = bytes(CH)
        for dev, chunks in snap.devs.items():
            later = None
            hi = md.highest_mapped(dev)
            if hi is not None and hi >= snap.sizes[dev]:
                return f"device {dev} maps chunk {hi} beyond its size"
            for c in range(snap.sizes[dev]):
                m = md.lookup(dev, c)
                got = zero if m is None else data.get(m[0], zero)
                want = chunks.get(c, zero)
                self.bytes_checked += CH
                if got == want:
                    continue
                if later is None:
                    later = self.allowed_later(snap, crash_event, dev)
                for s in range(0, CH, SECT):
                    g = got[s:s + SECT]
                    if g == want[s:s + SECT]:
                        continue
                    pos = c * CH + s
                    if not any(off <= pos and pos + SECT <= off + len(w) and w[pos - off:pos - off + SECT] == g
                               for off, w in later):
                        return (f"device {dev} chunk {c} sector {s // SECT}: committed bytes lost or wrong "
                                f"(commit at event {snap.event}, crash at {crash_event})")
        return None

    def thin_check(self, meta: dict[int, bytes], what: str) -> None:
        assert_thin_check_blocks(meta, self.d.nr_meta, what=what)
        self.thin_checked += 1

    def reuse(self, store: MemoryBlockStore, data: dict[int, bytes], snap: Snap, what: str) -> None:
        """The recovered pool is usable: write to every device, commit, check again."""
        md = PoolMetadata.open(store)
        ds = MemoryDataStore(snap.nr_data * CH, CH)
        ds.chunks = dict(data)
        tmp = scratch("reuse-")
        manifest = {"format": 1, "transaction_id": md.trans_id,
                    "devices": {str(k): {"name": str(k), "size": snap.sizes[k] * CH, "origin": None}
                                for k in snap.devs}, "options": {}}
        _write_manifest(tmp, manifest)
        pool = Pool(tmp, md, ds, manifest, readonly=False, lock_fd=None)  # type: ignore[arg-type]
        rng = random.Random(len(data))
        expect = {}
        try:
            for dev in sorted(snap.devs):
                buf = rng.randbytes(CH + 1024)
                off = rng.randrange(snap.sizes[dev] - 1) * CH + 512
                pool.device(dev).write(off, buf)
                expect[dev] = (off, buf)
            pool.commit()
        except ThinpoolError as e:
            if "no data space" not in str(e):
                raise
        rep = check_metadata(store)
        assert rep.ok, f"{what}: after reuse: {format_report(rep)}"
        md2 = PoolMetadata.open(store)
        for dev, (off, buf) in expect.items():
            for i in range(0, len(buf), SECT):
                c, o = divmod(off + i, CH)
                m = md2.lookup(dev, c)
                assert m is not None
                assert ds.chunks[m[0]][o:o + SECT] == buf[i:i + SECT], f"{what}: reuse write lost"


def enumerate_crashes(d: Driver, plan: FaultPlan, *, full: bool, thin_check_every: int, seed: int = 1,
                      start_at: int = 1) -> dict[str, int]:
    """Cut the power at every event of the recording; verify the images (see the module docstring).

    Variants per crash point N: ``lose_all`` (everything since the last sync lost), ``land_all`` (every unsynced
    write landed but the sync never returned), ``torn`` (event N lands torn) and ``random`` (a random subset of the
    unsynced writes plus a torn event N). With ``full`` every variant is verified at every N; otherwise images that
    are equal to an already verified one are skipped, ``land_all`` is verified at the last point before each sync
    (where the most unsynced writes have landed), ``torn`` for every superblock write and every 4th write, and
    ``random`` at every 7th point.
    """
    rp = Replayer(d)
    v = Verifier(d)
    events = [e for e in plan.trace if e.index > d.start_event or e.index == 0]
    counted = [e for e in events if e.index]
    stats = {"crash_points": 0, "images": 0, "thin_check": 0, "events": len(counted), "writes": 0, "syncs": 0}
    seen_lose_all: set[tuple[int, int]] = set()
    msync = dsync = 0
    k = 0
    nxt_sync = {}
    pending_sync = None
    for e in reversed(counted):
        nxt_sync[e.index] = pending_sync
        if e.op == "sync":
            pending_sync = e.index
    i = 0
    total = len(counted)
    for pos, e in enumerate(events + [None]):  # type: ignore[operator]
        if e is not None and e.index == 0:
            rp.apply(e)  # uncounted event (resize): not a crash point of its own
            continue
        n = (e.index - d.start_event) if e is not None else total + 1
        crash_event = e.index if e is not None else plan.events + 1
        variants = []
        if n < start_at:
            variants = ["skip"]
        else:
            stats["crash_points"] += 1
        i += 1
        key = (msync, dsync)
        if variants == ["skip"]:
            pass
        elif full or key not in seen_lose_all:
            variants.append("lose_all")
            seen_lose_all.add(key)
        if rp.has_pending() and variants != ["skip"]:
            before_sync = e is None or e.op == "sync"
            if full or before_sync:
                variants.append("land_all")
            if full or n % 7 == 0:
                variants.append("random")
        if e is not None and e.op == "write" and not e.failed and variants != ["skip"]:
            if full or (e.store == "metadata" and e.where == 0) or n % 4 == 0:
                variants.append("torn")
        for var in variants:
            if var == "skip":
                continue
            k += 1
            meta, data = rp.crash(e, var, seed + n)
            v.verify(meta, data, crash_event, thin_check=(k % thin_check_every == 0),
                     reuse=(k % (thin_check_every * 3) == 0), what=f"crash at event {n}/{total} ({var})")
        if e is None:
            break
        rp.apply(e)
        if e.op == "sync":
            stats["syncs"] += 1
            if e.store == "metadata":
                msync += 1
            else:
                dsync += 1
        else:
            stats["writes"] += 1
    stats["images"] = v.verified
    stats["thin_check"] = v.thin_checked
    stats["bytes_checked"] = v.bytes_checked
    return stats
