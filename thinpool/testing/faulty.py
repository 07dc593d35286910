"""Fault-injecting stores for the metadata device and the data file: I/O errors, full disks and power cuts.

Layer: testing. May import: thinpool.errors, thinpool.units, thinpool.io.

Every store built on one ``FaultPlan`` shares its event counter: each ``write_block`` / ``pwrite`` / ``punch`` is a
write event and each ``sync`` a sync event, numbered from 1 in the order they happen. The plan decides what the
N-th event does:

- ``kind="eio"``: the event raises StoreIOError (the write is not performed; a failed sync loses the writes it
  was to make durable, as Linux marks pages clean after a writeback error, or lands them, per ``lose``);
  ``persistent=True`` makes every later event fail too (a dead disk).
- ``kind="enospc"``: the event fails as a full host disk would: HostNoSpace (a NoSpace) on either store, as
  DataStore and FileBlockStore translate ENOSPC.
- ``kind="power_cut"``: the machine loses power *during* event N. Every write since the store's last completed
  sync is lost (``lose="all"``), or lands (``lose="none"``: the drive wrote its cache in any order but the sync
  never returned), or a seeded random subset lands (``lose=random.Random(seed)``). With ``tear=True`` the write
  at N lands torn: some of its 512-byte sectors are new, the others old (sectors are atomic; a 4 KiB write is
  not). The event then raises PowerCut, and so does every later call on any store of the plan: the process is dead.

Writes are held in a volatile cache (``pending``) until ``sync``, reads see them, and the inner store only ever
holds what is durable: after a power cut the inner stores *are* the disk as the next boot finds it.

A plan with ``at=None`` injects nothing and counts (a dry run). With ``record=True`` it also keeps the trace of
every event (store, op, where, bytes), from which tests/crash derive the disk image at every crash point.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from thinpool.errors import HostNoSpace, StoreIOError
from thinpool.units import METADATA_BLOCK_SIZE

BS = METADATA_BLOCK_SIZE
SECTOR = 512

FAULT_KINDS = ("eio", "enospc", "power_cut")


class PowerCut(BaseException):
    """A simulated power loss. A BaseException so that no ``except Exception`` in the engine can swallow it:
    the process is considered dead from this point on."""

    def __init__(self, event: int) -> None:
        super().__init__(f"simulated power cut at event {event}")
        self.event = event


@dataclass
class Event:
    index: int  # 1-based
    store: str  # store name ("metadata", "data")
    op: str  # write | sync | punch | resize
    where: int = 0  # block number (metadata) or byte offset (data)
    data: bytes | None = None  # bytes written (write) / None
    length: int = 0  # punch / resize length
    failed: bool = False  # the fault injected here made it fail (it did not happen)


@dataclass
class FaultPlan:
    """Shared event counter and fault schedule for a set of stores (see the module docstring)."""

    at: int | None = None
    kind: str = "power_cut"
    ops: tuple[str, ...] = ("write", "sync")  # which event kinds count towards ``at``
    stores: tuple[str, ...] | None = None  # only events of these stores count (None: all)
    persistent: bool = False
    lose: Any = "all"  # "all" | "none" | random.Random
    tear: bool = False
    tear_seed: int = 0
    record: bool = False
    events: int = 0  # events seen (counted ones)
    writes: int = 0
    syncs: int = 0
    trace: list[Event] = field(default_factory=list)
    crashed: bool = False
    failures: int = 0  # faults injected
    _members: list[Any] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {self.kind!r}: use one of {FAULT_KINDS}")

    # called by the stores ----------------------------------------------------------------------------------
    def _event(self, store: Any, op: str, where: int = 0, data: bytes | None = None, length: int = 0) -> bool:
        """Account one event. Returns True when it must fail (EIO/ENOSPC); handles power cuts itself."""
        if self.crashed:
            raise PowerCut(self.events)
        counted = op in self.ops or (op == "punch" and "write" in self.ops)
        if self.stores is not None and store.name not in self.stores:
            counted = False
        if not counted:
            if self.record:
                self.trace.append(Event(0, store.name, op, where, data, length))
            return False
        self.events += 1
        if op == "sync":
            self.syncs += 1
        else:
            self.writes += 1
        if self.record:
            self.trace.append(Event(self.events, store.name, op, where, data, length))
        if self.at is None or self.events < self.at:
            return False
        if self.events > self.at and not self.persistent:
            return False
        if self.kind == "power_cut":
            self._power_cut(store, op, where, data)
        self.failures += 1
        if self.record:
            self.trace[-1].failed = True
        return True

    def _power_cut(self, store: Any, op: str, where: int, data: bytes | None) -> None:
        self.crashed = True
        self.failures += 1
        for m in self._members:
            m._lose_pending(self.lose)
        if self.tear and op in ("write",) and data is not None:
            store._tear(where, data, random.Random(self.tear_seed ^ self.events))
        raise PowerCut(self.events)

    def register(self, store: Any) -> None:
        self._members.append(store)


def _landing(pending: list[Any], lose: Any) -> list[Any]:
    if lose == "all":
        return []
    if lose == "none":
        return list(pending)
    return [p for p in pending if lose.random() < 0.5]


def torn_sectors(old: bytes, new: bytes, rng: random.Random) -> bytes:
    """``new`` written over ``old`` with only some of its 512-byte sectors landing (at least one lands and at
    least one does not; a drive may write the sectors of one request in any order)."""
    n = len(new) // SECTOR
    if n < 2:
        return old
    landed = rng.sample(range(n), rng.randrange(1, n))
    out = bytearray(old)
    for s in landed:
        out[s * SECTOR:(s + 1) * SECTOR] = new[s * SECTOR:(s + 1) * SECTOR]
    return bytes(out)


class FaultyBlockStore:
    """A metadata BlockStore with a volatile write cache and faults from ``plan`` (wraps any BlockStore)."""

    def __init__(self, inner: Any, plan: FaultPlan, *, name: str = "metadata") -> None:
        self.inner = inner
        self.plan = plan
        self.name = name
        self.pending: dict[int, bytes] = {}
        self.order: list[int] = []
        plan.register(self)

    @property
    def nr_blocks(self) -> int:
        return int(self.inner.nr_blocks)

    @property
    def writes(self) -> int:
        return self.plan.writes

    def read_block(self, b: int) -> bytes:
        if self.plan.crashed:
            raise PowerCut(self.plan.events)
        data = self.pending.get(b)
        if data is not None:
            return data
        return bytes(self.inner.read_block(b))

    def write_block(self, b: int, data: bytes | bytearray) -> None:
        assert len(data) == BS
        data = bytes(data)
        if self.plan._event(self, "write", b, data):
            self._fail(f"write of block {b}")
        self.pending[b] = data
        self.order.append(b)

    def sync(self) -> None:
        if self.plan._event(self, "sync"):
            self._lose_pending(self.plan.lose)  # Linux: a failed writeback marks the pages clean
            self._fail("fsync")
        for b in self.order:
            if b in self.pending:
                self.inner.write_block(b, self.pending.pop(b))
        self.order = []
        self.inner.sync()

    def _fail(self, op: str) -> None:
        if self.plan.kind == "enospc":
            raise HostNoSpace(what=f"{self.name} (fault injection)", op=op)
        raise StoreIOError(what=f"{self.name} (fault injection)", op=op, reason="Input/output error")

    def _lose_pending(self, lose: Any) -> None:
        items = [(b, self.pending[b]) for b in dict.fromkeys(self.order) if b in self.pending]
        for b, data in _landing(items, lose):
            self.inner.write_block(b, data)
        self.pending = {}
        self.order = []

    def _tear(self, b: int, data: bytes, rng: random.Random) -> None:
        old = bytes(self.inner.read_block(b))
        self.inner.write_block(b, torn_sectors(old, data, rng))

    def grow(self, nr_blocks: int) -> None:
        if self.plan.crashed:
            raise PowerCut(self.plan.events)
        self.inner.grow(nr_blocks)

    def close(self) -> None:
        self.inner.close()


class MemoryDataStore:
    """The pool's data file in memory (DataStore's interface): chunks in a dict, absent = zeros."""

    def __init__(self, size: int, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self._size = size
        self.chunks: dict[int, bytes] = {}
        self.bytes_written = 0
        self.bytes_read = 0
        self.punched = 0
        self.syncs = 0
        self.path = "<memory data>"
        self.dirty: list[tuple[int, int]] = []  # byte ranges written since the last sync (DataStore.dirty)

    @property
    def size(self) -> int:
        return self._size

    def clone(self) -> MemoryDataStore:
        c = MemoryDataStore(self._size, self.chunk_bytes)
        c.chunks = dict(self.chunks)
        return c

    def copy(self, src: int, dst: int, length: int) -> None:
        """DataStore.copy: [src, src+length) to dst inside the file."""
        self.pwrite(dst, self.pread(src, length))

    def _spans(self, offset: int, length: int) -> Iterable[tuple[int, int, int, int]]:
        """(chunk, offset in chunk, position in buffer, n) pieces of [offset, offset+length)."""
        ch = self.chunk_bytes
        pos = 0
        while pos < length:
            c, o = divmod(offset + pos, ch)
            n = min(ch - o, length - pos)
            yield c, o, pos, n
            pos += n

    def pread(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for c, o, pos, n in self._spans(offset, length):
            if offset + pos >= self._size:
                break
            chunk = self.chunks.get(c)
            if chunk is not None:
                out[pos:pos + n] = chunk[o:o + n]
        self.bytes_read += length
        return bytes(out)

    def preadinto(self, offset: int, view: memoryview) -> None:
        """DataStoreProtocol.preadinto: ``len(view)`` bytes at ``offset`` into ``view`` (through pread, so the
        same faults, write cache and counters apply)."""
        view[:] = self.pread(offset, len(view))

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        if data:
            self.dirty.append((offset, offset + len(data)))
        for c, o, pos, n in self._spans(offset, len(data)):
            chunk = bytearray(self.chunks.get(c, bytes(self.chunk_bytes)))
            chunk[o:o + n] = data[pos:pos + n]
            self.chunks[c] = bytes(chunk)
        self._size = max(self._size, offset + len(data))
        self.bytes_written += len(data)

    def punch(self, offset: int, length: int) -> None:
        for c, o, _pos, n in self._spans(offset, length):
            if o == 0 and n == self.chunk_bytes:
                self.chunks.pop(c, None)
            elif c in self.chunks:
                chunk = bytearray(self.chunks[c])
                chunk[o:o + n] = bytes(n)
                self.chunks[c] = bytes(chunk)
        self.punched += length

    def sync(self) -> None:
        self.syncs += 1
        self.dirty = []

    def resize(self, size: int) -> None:
        if size < self._size:
            self.punch(size, self._size - size)
        self._size = size

    def close(self) -> None:
        pass


class FaultyDataStore:
    """A DataStore (pread/pwrite/punch/sync/resize) with a volatile write cache and faults from ``plan``."""

    def __init__(self, inner: Any, plan: FaultPlan, *, name: str = "data") -> None:
        self.inner = inner
        self.plan = plan
        self.name = name
        self.chunk_bytes = inner.chunk_bytes
        self.path = getattr(inner, "path", name)
        self.pending: list[tuple[str, int, Any]] = []  # ("write", offset, bytes) | ("punch", offset, length)
        self.bytes_written = 0
        self.bytes_read = 0
        self.punched = 0
        plan.register(self)

    @property
    def size(self) -> int:
        return int(self.inner.size)

    @property
    def dirty(self) -> list[tuple[int, int]]:
        """Byte ranges written since the last sync (DataStore.dirty), here and in the inner store."""
        own = [(off, off + (len(arg) if op == "write" else arg)) for op, off, arg in self.pending]
        return own + list(getattr(self.inner, "dirty", []))

    def pread(self, offset: int, length: int) -> bytes:
        if self.plan.crashed:
            raise PowerCut(self.plan.events)
        buf = bytearray(self.inner.pread(offset, length))
        end = offset + length
        for op, off, arg in self.pending:
            n = len(arg) if op == "write" else arg
            lo, hi = max(off, offset), min(off + n, end)
            if lo >= hi:
                continue
            if op == "write":
                buf[lo - offset:hi - offset] = arg[lo - off:hi - off]
            else:
                buf[lo - offset:hi - offset] = bytes(hi - lo)
        self.bytes_read += length
        return bytes(buf)

    def preadinto(self, offset: int, view: memoryview) -> None:
        """DataStoreProtocol.preadinto: ``len(view)`` bytes at ``offset`` into ``view`` (through pread, so the
        same faults, write cache and counters apply)."""
        view[:] = self.pread(offset, len(view))

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        if self.plan._event(self, "write", offset, data):
            if self.plan.kind == "enospc":
                raise HostNoSpace(what=f"{self.name} (fault injection)", op="write")
            raise StoreIOError(what=f"{self.name} (fault injection)", op="write", reason="Input/output error")
        self.pending.append(("write", offset, data))
        self.bytes_written += len(data)

    def copy(self, src: int, dst: int, length: int) -> None:
        """DataStore.copy (copy_file_range): a write of the source bytes, as far as the disk is concerned."""
        self.pwrite(dst, self.pread(src, length))

    def punch(self, offset: int, length: int) -> None:
        if self.plan._event(self, "punch", offset, None, length):
            if self.plan.kind == "enospc":
                raise HostNoSpace(what=f"{self.name} (fault injection)", op="punch")
            raise StoreIOError(what=f"{self.name} (fault injection)", op="punch", reason="Input/output error")
        self.pending.append(("punch", offset, length))
        self.punched += length

    def sync(self) -> None:
        if self.plan._event(self, "sync"):
            self._lose_pending(self.plan.lose)  # Linux: a failed writeback marks the pages clean
            if self.plan.kind == "enospc":
                raise HostNoSpace(what=f"{self.name} (fault injection)", op="fdatasync")
            raise StoreIOError(what=f"{self.name} (fault injection)", op="fdatasync", reason="Input/output error")
        self._apply(self.pending)
        self.pending = []
        self.inner.sync()

    def _apply(self, ops: list[tuple[str, int, Any]]) -> None:
        for op, off, arg in ops:
            if op == "write":
                self.inner.pwrite(off, arg)
            else:
                self.inner.punch(off, arg)

    def _lose_pending(self, lose: Any) -> None:
        self._apply(_landing(self.pending, lose))
        self.pending = []

    def _tear(self, offset: int, data: bytes, rng: random.Random) -> None:
        old = self.inner.pread(offset, len(data))
        self.inner.pwrite(offset, torn_sectors(old, data, rng))

    def resize(self, size: int) -> None:
        if self.plan._event(self, "resize", size):
            raise StoreIOError(what=f"{self.name} (fault injection)", op="resize", reason="Input/output error")
        self.inner.resize(size)  # the size change itself is durable at once (the host fs journals it)

    def close(self) -> None:
        self.inner.close()


def parse_fault_spec(spec: str) -> FaultPlan:
    """A plan from a debug option: ``KIND@N[,tear][,persistent][,land][,meta|,data]``, e.g. ``power_cut@120,tear``
    or ``eio@7,persistent``; N counts the writes and syncs from the moment the plan is installed."""
    head, *opts = [s.strip() for s in spec.split(",") if s.strip()]
    kind, _, at = head.partition("@")
    if kind not in FAULT_KINDS or not at.isdigit() or int(at) < 1:
        raise ValueError(f"fault spec {spec!r}: use KIND@N with KIND one of {', '.join(FAULT_KINDS)} and N >= 1")
    plan = FaultPlan(at=int(at), kind=kind)
    for o in opts:
        if o == "tear":
            plan.tear = True
        elif o == "persistent":
            plan.persistent = True
        elif o == "land":
            plan.lose = "none"
        elif o in ("meta", "data"):
            plan.stores = ("metadata",) if o == "meta" else ("data",)
        else:
            raise ValueError(f"fault spec {spec!r}: unknown option {o!r}")
    return plan


def install(pool: Any, plan: FaultPlan) -> FaultPlan:
    """Put an open Pool's metadata store and data file behind fault-injecting stores (debug option, tests).
    Writes pending at that moment are none: call after a commit. Event numbers count from here."""
    if plan.at is not None:
        plan.at += plan.events
    meta = FaultyBlockStore(pool.md.store, plan)
    pool.md.store = meta
    pool.md.tm.store = meta
    pool.data = FaultyDataStore(pool.data, plan)
    return plan
