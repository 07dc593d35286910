"""The fault-injecting stores themselves (thinpool.testing.faulty), and the debug hook on a real file-backed pool."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path

import pytest
from oracles import RUN_CHECKERS, assert_thin_check

from thinpool.errors import HostNoSpace, NoSpace, StoreIOError
from thinpool.io.block_store import FileBlockStore, MemoryBlockStore
from thinpool.metadata.check import check_metadata
from thinpool.pool import Pool
from thinpool.testing.faulty import (
    FaultPlan,
    FaultyBlockStore,
    FaultyDataStore,
    MemoryDataStore,
    PowerCut,
    install,
    parse_fault_spec,
)

THIN_CHECK = RUN_CHECKERS  # the C++ and Rust thin_check (tests/oracles.py)


def blk(i: int) -> bytes:
    return bytes([i % 256]) * 4096


def test_dry_run_counts_writes_and_syncs() -> None:
    plan = FaultPlan()
    m = FaultyBlockStore(MemoryBlockStore(16), plan)
    d = FaultyDataStore(MemoryDataStore(1 << 20, 65536), plan)
    m.write_block(1, blk(1))
    d.pwrite(0, b"x" * 100)
    m.sync()
    d.sync()
    assert (plan.events, plan.writes, plan.syncs, plan.failures) == (4, 2, 2, 0)


def test_unsynced_writes_are_lost_on_power_cut_and_visible_before() -> None:
    inner = MemoryBlockStore(16)
    plan = FaultPlan(at=4, kind="power_cut")
    m = FaultyBlockStore(inner, plan)
    m.write_block(1, blk(1))
    m.sync()
    m.write_block(2, blk(2))
    assert m.read_block(2) == blk(2)  # the cache is visible to reads
    assert inner.read_block(2) == bytes(4096)  # but not durable
    with pytest.raises(PowerCut):
        m.write_block(3, blk(3))
    assert inner.blocks == {1: blk(1)}
    with pytest.raises(PowerCut):  # the process is dead
        m.read_block(1)


def test_land_all_and_random_subset() -> None:
    for lose, expect in (("none", {1, 2, 3}), (random.Random(1), None)):
        inner = MemoryBlockStore(16)
        plan = FaultPlan(at=4, kind="power_cut", lose=lose)
        m = FaultyBlockStore(inner, plan)
        for b in (1, 2, 3):
            m.write_block(b, blk(b))
        with pytest.raises(PowerCut):
            m.sync()
        if expect is not None:
            assert set(inner.blocks) == expect
        else:
            assert set(inner.blocks) <= {1, 2, 3}


def test_torn_write_lands_some_sectors() -> None:
    inner = MemoryBlockStore(16)
    inner.write_block(5, bytes(4096))
    plan = FaultPlan(at=1, kind="power_cut", tear=True, tear_seed=3)
    m = FaultyBlockStore(inner, plan)
    with pytest.raises(PowerCut):
        m.write_block(5, b"\xff" * 4096)
    got = inner.read_block(5)
    sectors = {got[i:i + 512] for i in range(0, 4096, 512)}
    assert sectors == {b"\xff" * 512, bytes(512)}  # some new, some old, never a partial sector


def test_eio_enospc_transient_and_persistent() -> None:
    plan = FaultPlan(at=2, kind="eio")
    m = FaultyBlockStore(MemoryBlockStore(16), plan)
    m.write_block(1, blk(1))
    with pytest.raises(StoreIOError, match="Input/output error"):
        m.write_block(2, blk(2))
    m.write_block(3, blk(3))  # transient: the next one works
    plan = FaultPlan(at=1, kind="eio", persistent=True)
    m = FaultyBlockStore(MemoryBlockStore(16), plan)
    for _ in range(3):
        with pytest.raises(StoreIOError):
            m.write_block(1, blk(1))
    plan = FaultPlan(at=1, kind="enospc")
    d = FaultyDataStore(MemoryDataStore(1 << 20, 65536), plan)
    with pytest.raises(HostNoSpace) as ei:  # a NoSpace (ENOSPC), never an EIO
        d.pwrite(0, b"x")
    assert isinstance(ei.value, NoSpace) and ei.value.errno == errno.ENOSPC
    plan = FaultPlan(at=1, kind="enospc")
    m = FaultyBlockStore(MemoryBlockStore(16), plan)
    with pytest.raises(HostNoSpace, match="no space left on the host"):
        m.write_block(1, blk(1))


def test_failed_sync_loses_its_writes() -> None:
    inner = MemoryBlockStore(16)
    plan = FaultPlan(at=2, kind="eio")
    m = FaultyBlockStore(inner, plan)
    m.write_block(1, blk(1))
    with pytest.raises(StoreIOError):
        m.sync()
    m.sync()
    assert inner.blocks == {}  # Linux marks the pages clean after a failed writeback


def test_parse_fault_spec() -> None:
    p = parse_fault_spec("power_cut@12,tear,land")
    assert (p.kind, p.at, p.tear, p.lose) == ("power_cut", 12, True, "none")
    assert parse_fault_spec("eio@3,persistent,meta").stores == ("metadata",)
    for bad in ("boom@1", "eio@0", "eio@x", "eio@1,what"):
        with pytest.raises(ValueError):
            parse_fault_spec(bad)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("spec", ["power_cut@1", "power_cut@9,tear", "power_cut@17,land", "power_cut@30,tear,land"])
def test_power_cut_on_a_real_file_pool(tmp_path: Path, spec: str) -> None:
    """The debug hook on a file-backed pool: cut the power mid-way, reopen: the last commit, byte for byte."""
    path = tmp_path / "pool"
    rng = random.Random(1)
    ch = 65536
    pool = Pool.create(path, data_size=16 << 20)
    pool.create_thin(1, 32 * ch)
    model = bytearray(32 * ch)
    model[0:5 * ch] = rng.randbytes(5 * ch)
    pool.device(1).write(0, bytes(model[:5 * ch]))
    pool.commit()
    done = bytes(model)  # the last completed commit
    install(pool, parse_fault_spec(spec))
    with pytest.raises(PowerCut):
        for i in range(27):  # whole new chunks only: what shows after the crash is exactly one commit's content
            c = 5 + i
            buf = rng.randbytes(ch)
            pool.device(1).write(c * ch, buf)
            model[c * ch:(c + 1) * ch] = buf
            if i % 3 == 2:
                pool.commit()
                done = bytes(model)
    # "reboot": drop the process's files without any further write
    pool.md.store.inner.close()
    pool.data.inner.close()
    os.close(pool._lock_fd)
    rep = check_metadata(FileBlockStore(path / "metadata", readonly=True))
    assert rep.ok
    if THIN_CHECK:
        assert_thin_check(path / "metadata")
    with Pool.open(path) as p:
        got = p.device(1).read(0, 32 * ch)
        assert got in (done, bytes(model)), "reopened pool holds neither the last commit nor the one in flight"
        p.device(1).write(0, b"usable")
        p.commit()
