"""Review of the deferred copy-on-write (thin.py): a chunk whose copy is pending must read complete through every
read path and survive every operation that can free, share or replace its shared block, and the result must pass
both real checkers. Each test starts from device 1 (4 chunks of random bytes) with a snapshot, device 2, and
sector-aligned writes into the origin that leave copies pending."""

from __future__ import annotations

import io
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import need_tool
from oracles import assert_thin_check

from thinpool.pool import Pool
from thinpool.rbd.export import export_diff
from thinpool.testing import faulty

CH = 64 << 10


def _snapshotted(tmp_path: Path, chunks: int = 32, **kw: object) -> tuple[Pool, bytes]:
    p = Pool.create(tmp_path / "pool", data_size=chunks * CH, chunk_size=CH, **kw)  # type: ignore[arg-type]
    d = p.create_thin(1, 4 * CH)
    old = random.Random(1).randbytes(4 * CH)
    d.write(0, old)
    p.create_snap(2, 1)
    return p, old


def _break(p: Pool, old: bytes) -> bytearray:
    """Sector-aligned writes into chunks 0, 1 and 3 of the origin (pending copies); returns the origin's bytes."""
    d = p.device(1)
    want = bytearray(old)
    for off, data in ((4096, b"a" * 4096), (CH + 512, b"b" * 1024), (3 * CH + CH - 8192, b"c" * 8192)):
        d.write(off, data)
        want[off:off + len(data)] = data
    assert set(p.md.pending_copies(1)) == {0, 1, 3}
    return want


def _read_paths(p: Pool) -> dict[str, Callable[[int, int], bytes]]:
    def readinto(off: int, n: int) -> bytes:
        buf = bytearray(n)
        p.device(1).readinto(off, buf)
        return bytes(buf)

    def thinfile(off: int, n: int) -> bytes:
        f = p.device(1).open("rb")
        f.seek(off)
        return f.read(n)

    def readv(off: int, n: int) -> bytes:
        return b"".join(p.device(1).readv([(off, n // 2), (off + n // 2, n - n // 2)]))

    return {"read": lambda off, n: p.device(1).read(off, n), "readinto": readinto, "thinfile": thinfile,
            "readv": readv}


@pytest.mark.parametrize("path", ["read", "readinto", "thinfile", "readv"])
@pytest.mark.parametrize("span", ["one sector", "one chunk", "two chunks", "whole device"])
def test_every_read_path_sees_pending_chunks_complete(tmp_path: Path, path: str, span: str) -> None:
    p, old = _snapshotted(tmp_path)
    want = _break(p, old)
    off, n = {"one sector": (CH + 1536, 512), "one chunk": (0, CH), "two chunks": (CH // 2, CH * 2),
              "whole device": (0, 4 * CH)}[span]
    k = p.device(1)
    k.read(2 * CH, 512)  # a warm mapping cache: the lock-free path is taken where it can be
    assert _read_paths(p)[path](off, n) == bytes(want[off:off + n])
    assert p.device(2).read(0, 4 * CH) == old
    p.close()


def test_a_kept_handle_and_a_fresh_one_share_the_pending_table(tmp_path: Path) -> None:
    p, old = _snapshotted(tmp_path)
    kept = p.device(1)
    kept.read(0, 512)  # cache warm before the break (as an NBD export's handle)
    want = _break(p, old)
    other = p.device(1)
    other.write(CH, b"x" * 512)  # through a second handle, into a pending chunk
    want[CH:CH + 512] = b"x" * 512
    for off in range(0, 4 * CH, 512):
        assert kept.read(off, 512) == bytes(want[off:off + 512]), off
    p.close()
    with Pool.open(tmp_path / "pool", readonly=True) as ro:
        assert ro.device(1).read(0, 4 * CH) == bytes(want)


def test_write_spanning_pending_and_shared_chunks(tmp_path: Path) -> None:
    p, old = _snapshotted(tmp_path)
    want = _break(p, old)
    d = p.device(1)
    for off, n in ((CH - 4096, 8192), (CH + 100, 3 * CH - 200), (2 * CH - 512, 1024)):  # aligned and not
        data = random.Random(off).randbytes(n)
        d.write(off, data)
        want[off:off + n] = data
    assert d.read(0, 4 * CH) == bytes(want)
    p.commit()
    assert not p.md.pending_devices()
    p.close()
    with Pool.open(tmp_path / "pool", readonly=True) as ro:
        assert ro.device(1).read(0, 4 * CH) == bytes(want)
        assert ro.device(2).read(0, 4 * CH) == old


def _ops() -> dict[str, Callable[[Pool], None]]:
    return {
        "delete the snapshot": lambda p: p.delete_thin(2),
        "discard the snapshot's chunks": lambda p: p.device(2).discard(0, 4 * CH),
        "snapshot of the origin": lambda p: (p.create_snap(3, 1), None)[1],
        "rollback of another device": lambda p: (p.create_thin(4, CH), p.rollback_to_snapshot(4, 2))[1],
        "set the transaction id": lambda p: p.set_transaction_id(p.transaction_id, p.transaction_id + 7),
        "grow the origin": lambda p: p.resize_device(1, 4 * CH + 4096),
        "rename the origin": lambda p: p.rename_device(1, "renamed"),
        "reserve a metadata snapshot": lambda p: (p.reserve_metadata_snap(), None)[1],
        "grow the data device": lambda p: p.resize(64 * CH),
        "flush": lambda p: p.device(1).flush(),
        "trim after a commit": lambda p: (p.commit(), p.trim())[0],
    }


@pytest.mark.external
@pytest.mark.parametrize("op", list(_ops()))
def test_pending_chunks_survive_pool_operations(tmp_path: Path, op: str) -> None:
    """After the operation (and a reopen) the origin holds its bytes and the snapshot, where it still exists,
    its old bytes; passdown punches nothing still in use; both real checkers pass."""
    need_tool("thin_check")
    p, old = _snapshotted(tmp_path)
    want = _break(p, old)
    _ops()[op](p)
    assert p.device(1).read(0, 4 * CH) == bytes(want)
    p.commit()
    p.close()
    with Pool.open(tmp_path / "pool", readonly=True) as ro:
        assert ro.device(1).read(0, 4 * CH) == bytes(want)
        if 2 in ro.list_devices() and op != "discard the snapshot's chunks":
            assert ro.device(2).read(0, 4 * CH) == old
    assert_thin_check(tmp_path / "pool" / "metadata")


def test_merge_of_the_snapshot_after_origin_writes(tmp_path: Path) -> None:
    """merge_snapshot discards the origin's tree (its pending new blocks) for the snapshot's: the snapshot's bytes
    come back whole, and nothing pending is left to copy into a block now free."""
    p, old = _snapshotted(tmp_path)
    _break(p, old)
    p.merge_snapshot(2)
    assert not p.md.pending_devices()
    assert p.device(1).read(0, 4 * CH) == old
    p.device(1).write(CH, b"z" * 4096)
    p.close()
    with Pool.open(tmp_path / "pool", readonly=True) as ro:
        want = bytearray(old)
        want[CH:CH + 4096] = b"z" * 4096
        assert ro.device(1).read(0, 4 * CH) == bytes(want)


def test_discard_of_the_origins_pending_chunk_then_reuse(tmp_path: Path) -> None:
    """The origin's pending chunk discarded: its new block goes; reallocated for another write in the same
    transaction, it must not receive the stale pending copy at commit."""
    p, old = _snapshotted(tmp_path, chunks=7)  # 4 used; 3 free: the three breaks take them
    want = _break(p, old)
    d = p.device(1)
    d.discard(CH, CH)  # chunk 1 (pending) unmapped: its new block free again... (not reused before the commit)
    want[CH:2 * CH] = bytes(CH)
    p.commit()
    d.write(CH, b"n" * CH)  # the block is free now: reused, whole chunk
    want[CH:2 * CH] = b"n" * CH
    p.commit()
    assert d.read(0, 4 * CH) == bytes(want)
    assert p.device(2).read(0, 4 * CH) == old
    p.close()


def test_abort_command_after_a_deferred_break(tmp_path: Path) -> None:
    """A failed command after a deferred break: back to the last commit, nothing pending, the pool healthy (the
    new block was never mapped by a commit, so this is not an in-place overwrite of committed data)."""
    p, old = _snapshotted(tmp_path)
    _break(p, old)
    p.abort_command(RuntimeError("boom"))
    assert not p.failed and not p.md.pending_devices()
    assert p.device(1).read(0, 4 * CH) == old
    p.close()


@pytest.mark.external
@pytest.mark.parametrize("tear", [False, True])
@pytest.mark.parametrize("at", [1, 2, 3, 4, 6, 9, 12, 14, 15])  # the commit makes 15 events (12 writes, 3 syncs)
def test_power_cut_during_the_commit_that_completes_pending_copies(tmp_path: Path, at: int, tear: bool) -> None:
    """The commit's copies, data sync and metadata writes cut at event ``at``: after the reopen the origin
    reads either its last commit (the shared bytes) or the new state, chunk by chunk never a mix of a new block's
    gaps; the snapshot is intact; both checkers pass."""
    need_tool("thin_check")
    p, old = _snapshotted(tmp_path)
    want = _break(p, old)
    plan = faulty.install(p, faulty.FaultPlan(at=at, kind="power_cut", tear=tear, tear_seed=at))
    try:
        p.commit()
    except faulty.PowerCut:
        pass
    assert plan.crashed
    p.crash_close()
    with Pool.open(tmp_path / "pool", readonly=True) as ro:
        got = ro.device(1).read(0, 4 * CH)
        assert got in (old, bytes(want)), "a mix of the committed and the new state"
        assert ro.device(2).read(0, 4 * CH) == old
    assert_thin_check(tmp_path / "pool" / "metadata")


def test_export_diff_of_the_origin_with_pending_chunks(tmp_path: Path) -> None:
    """rbd export-diff of the origin against its snapshot reads the pending chunks through the device."""
    from thinpool.rbd.importer import import_diff

    p, old = _snapshotted(tmp_path)
    want = _break(p, old)
    buf = io.BytesIO()
    export_diff(p, 1, buf, from_id=2, to_snap=False)
    p.create_thin(5, 4 * CH)
    p.device(5).write(0, old)
    buf.seek(0)
    import_diff(p, 5, buf)
    assert p.device(5).read(0, 4 * CH) == bytes(want)
    p.close()


def test_metadata_exhaustion_in_the_middle_of_deferred_breaks(tmp_path: Path) -> None:
    """Deferred breaks until the metadata is full: the failing write raises NoMetadataSpace, the transaction is
    dropped (needs_check, as dm-thin), nothing stays pending, and both devices read their last commit."""
    from thinpool.errors import NoMetadataSpace

    n = 1700
    p = Pool.create(tmp_path / "pool", data_size=8192 * CH, chunk_size=CH, metadata_size=128 << 10)
    d = p.create_thin(1, n * CH)
    data = random.Random(1).randbytes(n * CH)
    for c in range(0, n, 100):
        d.write(c * CH, data[c * CH:(c + 100) * CH])
    p.commit()
    p.create_snap(2, 1)
    with pytest.raises(NoMetadataSpace):
        for c in range(n):
            d.write(c * CH + 512, b"x" * 512)  # one deferred break a chunk
    assert p.md.needs_check and not p.md.pending_devices()
    assert p.device(1).read(0, n * CH) == data
    assert p.device(2).read(0, n * CH) == data
    p.close()
