"""A failed commit fails the served pool (dm-thin's metadata_operation_failed), over NBD and FUSE.

The pool sits on thinpool.io.faulty stores; the fault plan makes the next data sync (the first step of a commit)
fail with EIO or ENOSPC. Before the fix a FLUSH failed once, the acknowledged writes then read back as zeros and
later FLUSHes succeeded; a failed periodic commit dropped acknowledged writes with no error at all.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from nbd_client import RawClient

from thinpool.io.block_store import MemoryBlockStore
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.nbd import ServerThread, serve
from thinpool.nbd import protocol as P
from thinpool.pool import Pool, _write_manifest
from thinpool.testing.faulty import FaultPlan, FaultyBlockStore, FaultyDataStore, MemoryDataStore

CH = 64 * 1024
MiB = 1 << 20


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="tpfail", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def faulty_pool(tmp: Path, plan: FaultPlan, nr_data: int = 256, zero: bool = True) -> Pool:
    meta = FaultyBlockStore(MemoryBlockStore(512), plan)
    data = FaultyDataStore(MemoryDataStore(nr_data * CH, CH), plan)
    md = PoolMetadata.format(meta, data_block_size=CH // 512, nr_data_blocks=nr_data)
    manifest: dict[str, Any] = {"format": 1, "transaction_id": 0, "devices": {},
                                "options": {"zero": zero, "discard": "passdown", "no_space": "error"}}
    _write_manifest(tmp, manifest)
    pool = Pool(tmp, md, data, manifest, readonly=False, lock_fd=None)  # type: ignore[arg-type]
    pool.create_thin(1, 8 * MiB, name="vol")
    pool.commit()
    return pool


def fail_next_sync(plan: FaultPlan, kind: str = "eio") -> None:
    plan.kind = kind
    plan.ops = ("sync",)
    plan.at = plan.events + 1


def test_failed_flush_fails_the_server(tmp):
    plan = FaultPlan(at=None, kind="eio")
    pool = faulty_pool(tmp, plan)
    dev = pool.device(1)
    committed = []
    with ServerThread({"vol": dev}, unix_path=str(tmp / "s"), on_shutdown=lambda: committed.append(1)) as srv:
        with RawClient(srv.addresses[0]) as c:
            c.greeting()
            c.go("vol")
            assert c.write(0, b"\xaa" * 4096) == 0
            assert c.command(P.CMD_FLUSH) == 0  # durable
            assert c.write(CH, b"\xbb" * 4096) == 0  # acknowledged, not yet flushed
            fail_next_sync(plan)
            assert c.command(P.CMD_FLUSH) == P.EIO
            assert srv.server.failed is not None
            # from now on: no write, no flush, and no read that could show acknowledged data changed
            assert c.write(2 * CH, b"\xcc" * 4096) == P.EIO
            assert c.command(P.CMD_FLUSH) == P.EIO
            assert c.command(P.CMD_FLUSH) == P.EIO
            err, _ = c.read(CH, 4096)
            assert err == P.EIO
            assert c.command(P.CMD_TRIM, 0, CH) == P.EIO
        with RawClient(srv.addresses[0]) as c2:  # a new client too
            c2.greeting()
            c2.go("vol")
            assert c2.write(3 * CH, b"\xdd" * 512) == P.EIO
            assert c2.read(0, 512)[0] == P.EIO
    assert committed == []  # shutdown never commits a failed pool
    assert plan.failures == 1


def test_failed_fua_write_fails_the_server(tmp):
    plan = FaultPlan(at=None, kind="eio")
    pool = faulty_pool(tmp, plan)
    with ServerThread({"vol": pool.device(1)}, unix_path=str(tmp / "s")) as srv:
        with RawClient(srv.addresses[0]) as c:
            c.greeting()
            c.go("vol")
            fail_next_sync(plan)
            assert c.write(0, b"\x01" * 4096, flags=P.CMD_FLAG_FUA) == P.EIO
            assert c.write(0, b"\x02" * 4096) == P.EIO
            assert srv.server.failed is not None


def test_host_disk_full_is_enospc(tmp):
    plan = FaultPlan(at=None, kind="enospc")
    pool = faulty_pool(tmp, plan, zero=False)  # the first data event of a write is then its pwrite
    with ServerThread({"vol": pool.device(1)}, unix_path=str(tmp / "s")) as srv:
        with RawClient(srv.addresses[0]) as c:
            c.greeting()
            c.go("vol")
            plan.kind, plan.ops, plan.stores, plan.at = "enospc", ("write",), ("data",), plan.events + 1
            assert c.write(4 * CH, b"\x05" * 4096) == P.ENOSPC  # a full host disk on a data write
            assert srv.server.failed is None  # a refused write does not fail the pool
            plan.at = None
            assert c.write(4 * CH, b"\x06" * 4096) == 0
            assert c.read(4 * CH, 4096) == (0, b"\x06" * 4096)
            fail_next_sync(plan, "enospc")
            plan.stores = None
            assert c.command(P.CMD_FLUSH) in (P.ENOSPC, P.EIO)
            assert c.write(0, b"x" * 512) == P.EIO


def test_failed_periodic_commit_fails_the_server(tmp):
    """--commit-interval: a failed periodic commit used to drop acknowledged writes silently."""
    plan = FaultPlan(at=None, kind="eio")
    pool = faulty_pool(tmp, plan)
    dev = pool.device(1)
    box: dict[str, Any] = {}
    started = threading.Event()
    stop = threading.Event()

    def ready(server):
        box["server"] = server
        started.set()

    t = threading.Thread(target=serve, kwargs=dict(exports={"vol": dev}, unix_path=str(tmp / "s"),
                                                   on_shutdown=pool.commit, ready=ready, stop_event=stop,
                                                   periodic=(0.05, pool.commit)))
    t.start()
    try:
        assert started.wait(10)
        with RawClient(str(tmp / "s")) as c:
            c.greeting()
            c.go("vol")
            assert c.write(0, b"\x42" * 4096) == 0
            with pool.lock:  # no periodic commit counts a sync between reading plan.events and setting plan.at
                fail_next_sync(plan)
            deadline = time.monotonic() + 60
            while box["server"].failed is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert box["server"].failed is not None and "periodic" in box["server"].failed
            assert c.write(CH, b"\x43" * 4096) == P.EIO  # the client learns at its next request
            assert c.read(0, 4096)[0] == P.EIO
            assert c.command(P.CMD_FLUSH) == P.EIO
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    assert plan.failures == 1  # shutdown did not commit again


def test_fuse_failed_fsync_fails_the_export(tmp):
    """The same for FUSE (the operations object, without a mount)."""
    pytest.importorskip("mfusepy")
    from mfusepy import FuseOSError

    from thinpool.fusefs import make_operations

    plan = FaultPlan(at=None, kind="eio")
    pool = faulty_pool(tmp, plan)
    unmounted = []
    ops = make_operations({"vol": pool.device(1)}, on_unmount=lambda: unmounted.append(1))
    assert ops.write("/vol", b"\x10" * 4096, 0, 0) == 4096
    assert ops.fsync("/vol", 0, 0) == 0
    assert ops.write("/vol", b"\x11" * 4096, CH, 0) == 4096
    fail_next_sync(plan)
    with pytest.raises(FuseOSError):
        ops.fsync("/vol", 0, 0)
    assert ops.failed is not None
    for call in (lambda: ops.write("/vol", b"\x12" * 512, 0, 0), lambda: ops.read("/vol", 512, CH, 0),
                 lambda: ops.fsync("/vol", 0, 0)):
        with pytest.raises(FuseOSError) as ei:
            call()
        assert ei.value.errno == errno.EIO
    ops.destroy("/")
    assert unmounted == []  # nothing committed at unmount
    assert plan.failures == 1
