"""Error paths (issue 7): EIO / ENOSPC injected at every metadata and data write and sync of the standard
workloads. The failing operation raises a typed ThinpoolError; the pool then either aborted to its last commit and
stays usable (a follow-up write + commit works and reads back), or refuses writes (failed / read-only,
needs_check); the disks left behind (and every crash image of the follow-up) hold exactly one committed state,
never a mix. Transient faults (only event N fails) and persistent ones (N and everything after: a dead disk).
"""

from __future__ import annotations

import random

import crash_harness as h
import pytest

from thinpool.errors import PoolFailed, ReadOnly, ThinpoolError
from thinpool.testing.faulty import FaultPlan

TOTALS = {"faults": 0, "aborted": 0, "write_failed": 0, "failed": 0, "read_only": 0, "completed": 0, "images": 0}
CI_WORKLOADS = ["provision", "snapshot", "discard", "metadata_snap", "resize", "delete"]


def _read_dev(d: h.Driver, dev: int) -> dict[int, bytes]:
    """The device's chunks as the open pool's metadata maps them (not through pool.device(): after a failed
    delete the manifest no longer lists the device, see test_failed_delete_keeps_device_reachable)."""
    out = {}
    zero = bytes(h.CH)
    pending = d.pool.md.pending_copies(dev)  # deferred copy-on-writes: sectors not written since come from
    for c in range(d.model.sizes[dev]):      # the shared block (as ThinDevice.read shows them)
        m = d.pool.md.lookup(dev, c)
        got = zero if m is None else d.pool.data.pread(m[0] * h.CH, h.CH)
        if m is not None and c in pending:
            old, new, bits = pending[c]
            assert new == m[0]
            shared = d.pool.data.pread(old * h.CH, h.CH)
            got = b"".join(got[s:s + h.SECT] if bits >> (s // h.SECT) & 1 else shared[s:s + h.SECT]
                           for s in range(0, h.CH, h.SECT))
        if got != zero:
            out[c] = got
    return out


def _check_live_state(d: h.Driver) -> None:
    """The open pool shows the model (the last commit after an abort), modulo writes left undefined."""
    assert sorted(d.pool.md.devices) == sorted(d.model.devs)
    assert d.pool.md.trans_id == d.model.trans_id
    zero = bytes(h.CH)
    for dev in d.model.devs:
        got = _read_dev(d, dev)
        for c in set(got) | set(d.model.devs[dev]):
            g, w = got.get(c, zero), d.model.devs[dev].get(c, zero)
            if g == w:
                continue
            undefined = d.model.aborted.get(dev, [])
            for s in range(0, h.CH, h.SECT):
                if g[s:s + h.SECT] != w[s:s + h.SECT]:
                    pos = c * h.CH + s
                    assert any(off <= pos and pos + h.SECT <= off + len(x) and
                               x[pos - off:pos - off + h.SECT] == g[s:s + h.SECT] for off, x in undefined), \
                        f"device {dev} chunk {c}: live pool shows bytes that were never committed or written"


def _follow_up(d: h.Driver, rng: random.Random) -> None:
    """After an abort: the pool is usable."""
    for dev in sorted(d.model.devs):
        if str(dev) not in d.pool.manifest["devices"]:
            continue  # see test_failed_delete_keeps_device_reachable
        d.write(dev, rng.randrange(d.model.sizes[dev] - 2) * h.CH + 512, rng.randbytes(h.CH))
    d.create(99, 4)
    d.write(99, 0, rng.randbytes(2 * h.CH))
    d.commit()
    _check_live_state(d)


def run_fault(name: str, n: int, *, kind: str, persistent: bool, lose: str = "all") -> str:
    plan = FaultPlan(kind=kind, persistent=persistent, lose=lose)
    d = h.Driver(h.scratch(), plan)
    d.start_recording()
    plan.at = d.start_event + n
    try:
        h.WORKLOADS[name](d, random.Random(0))
    except ThinpoolError:
        pass
    else:
        # only a failed discard passdown after a durable commit is not an error (dm-thin logs it)
        failed = [e for e in plan.trace if e.failed]
        assert failed and all(e.op == "punch" for e in failed), f"fault at event {n} raised nothing"
    TOTALS["faults"] += 1
    md = d.pool.md
    if d.pool.failed:
        # a failed commit (dm-thin's metadata_operation_failed): aborted, needs_check set where the disk took
        # it, every later write and flush refused
        outcome = "failed"
        with pytest.raises(PoolFailed):
            d.pool.commit()
        with pytest.raises(PoolFailed):
            d.pool.create_thin(50, h.CH)
        live = [x for x in d.pool.list_devices() if str(x) in d.pool.manifest["devices"]]
        if live:
            with pytest.raises(PoolFailed):
                d.pool.device(live[0]).write(0, b"x")
    elif md.needs_check:
        outcome = "read_only"
        with pytest.raises(ReadOnly):
            d.pool.create_thin(50, h.CH)
    elif d.last_write is not None:
        # a failed data write: the pool keeps its open transaction, the write's range is undefined
        outcome = "write_failed"
        d.after_failed_write(*d.last_write)
        _check_live_state(d)
        if not persistent:
            _follow_up(d, random.Random(n))
    else:
        # a failed metadata operation / commit: back to the last commit (or, when only the passdown after a
        # durable commit failed, at the new one), nothing of the failed transaction left in core
        assert not d.open_transaction(), "failed operation left a half-done transaction open"
        outcome = "completed" if d.committed_snap().event > d.committed_event else "aborted"
        d.after_abort()
        _check_live_state(d)
        if not persistent:
            _follow_up(d, random.Random(n))
        else:
            with pytest.raises(ThinpoolError):
                d.pool.create_thin(50, h.CH)  # writes its superblock: the dead disk refuses
    TOTALS[outcome] += 1
    # what is on disk: exactly one committed state, at the end and at every crash point of the run
    stats = h.enumerate_crashes(d, plan, full=False, thin_check_every=10 ** 9 if not h.LONG else 5,
                                start_at=1 if h.LONG else n)
    TOTALS["images"] += stats["images"]
    return outcome


def _points(d: h.Driver, plan: FaultPlan, stride: int) -> list[int]:
    """Every event (THINPOOL_LONG=1), else every stride-th plus every superblock write and the sync after it."""
    ev = [e for e in plan.trace if e.index > d.start_event]
    total = plan.events - d.start_event
    if h.LONG:
        return list(range(1, total + 1))
    pts = set(range(stride, total + 1, stride))
    for i, e in enumerate(ev):
        if e.store == "metadata" and e.op == "write" and e.where == 0:
            pts.add(e.index - d.start_event)
            if i + 1 < len(ev):
                pts.add(ev[i + 1].index - d.start_event)
    return sorted(pts)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["transient", "transient_landed", "persistent"])
@pytest.mark.parametrize("name", CI_WORKLOADS)
def test_eio_at_every_point(name: str, mode: str) -> None:
    """``transient``: only event N fails (a failed sync loses its writes); ``transient_landed``: a failed sync's
    writes reached the disk anyway; ``persistent``: N and everything after fail."""
    d, plan = h.record(name)
    persistent = mode == "persistent"
    points = _points(d, plan, {"transient": 3, "transient_landed": 5, "persistent": 6}[mode])
    outcomes = {}
    for n in points:
        outcomes[n] = run_fault(name, n, kind="eio", persistent=persistent,
                                lose="none" if mode == "transient_landed" else "all")
    print(f"\n[eio] {name} {mode}: {len(outcomes)} faults, "
          f"{ {k: list(outcomes.values()).count(k) for k in set(outcomes.values())} } totals {TOTALS}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["snapshot", "delete"] + (["random_mix"] if h.LONG else []))
def test_enospc_sampled(name: str) -> None:
    """A full host disk (ENOSPC) at sampled points: NoDataSpace from the data file, StoreIOError from metadata."""
    d, plan = h.record(name)
    total = plan.events - d.start_event
    rng = random.Random(3)
    for n in sorted(rng.sample(range(1, total + 1), min(total, 40 if h.LONG else 8))):
        run_fault(name, n, kind="enospc", persistent=False)


def test_failed_delete_keeps_device_reachable() -> None:
    d, plan = h.record("provision")
    plan2 = FaultPlan(kind="eio")
    d = h.Driver(h.scratch(), plan2)
    d.start_recording()
    d.create(1, 16)
    d.write(1, 0, b"x" * h.CH)
    d.commit()
    plan2.at = plan2.events + 1  # the data sync that starts delete's commit
    with pytest.raises(ThinpoolError):
        d.delete(1)
    assert 1 in d.pool.md.devices
    assert d.pool.device(1).read(0, 4) == b"xxxx"


@pytest.mark.timeout(120)
def test_metadata_exhaustion_goes_read_only_with_needs_check() -> None:
    """Out of metadata space: the transaction is aborted, needs_check is committed, the pool refuses writes, and
    the disk holds the last commit (readable read-only; a read-write open demands check first)."""
    from thinpool.errors import NeedsCheck, NoMetadataSpace
    from thinpool.metadata.pool_metadata import PoolMetadata
    plan = FaultPlan()
    d = h.Driver(h.scratch(), plan, nr_data=2048, nr_meta=18)
    d.start_recording()
    d.create(1, 2048)
    rng = random.Random(4)
    with pytest.raises(NoMetadataSpace):
        for i in range(2048):
            d.write(1, i * h.CH, rng.randbytes(512))
            if i % 50 == 49:
                d.commit()
    assert d.pool.md.needs_check and d.pool.status().mode == "ro"
    with pytest.raises(ReadOnly):
        d.pool.device(1).write(0, b"x")
    # the needs_check superblock carries the last completed commit's trees
    committed = next(s for snaps in d.expected.values() for s in snaps if s.event == d.committed_event)
    store = h.MemoryBlockStore(d.nr_meta)
    store.blocks = dict(d.meta_inner.blocks)
    with pytest.raises(NeedsCheck):
        PoolMetadata.open(store)
    rep = h.check_metadata(store)
    assert rep.ok and rep.needs_check
    md = PoolMetadata.open(store, readonly=True)
    assert sorted(md.devices) == sorted(committed.devs)
    zero = bytes(h.CH)
    for c in range(committed.sizes[1]):
        m = md.lookup(1, c)
        got = zero if m is None else d.data_inner.chunks.get(m[0], zero)
        assert got == committed.devs[1].get(c, zero), f"chunk {c}"
