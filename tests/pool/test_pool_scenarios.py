"""Scenario tests after the device-mapper-test-suite (thin-provisioning tests): sharing, snapshot chains, discard
matrix, out of space, external origins, zeroing, locking, bounds, file-like access, threads."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pool_helpers import CH, check_pool, is_data, is_hole, pattern

from thinpool.errors import DeviceNotFound, InvalidArgument, NoDataSpace, OutOfBounds, PoolLocked, ReadOnly
from thinpool.pool import Pool

REPO = Path(__file__).resolve().parents[2]


def used(pool: Pool) -> int:
    return pool.status().used_data_blocks


def data_block(pool: Pool, dev_id: int, chunk: int) -> int | None:
    m = pool.md.lookup(dev_id, chunk)
    return None if m is None else m[0]


# --- breaking sharing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", ["origin", "snapshot"])
@pytest.mark.parametrize("piece", [(CH + 512, 4096), (CH, CH), (CH - 100, 200)], ids=["partial", "whole", "straddle"])
def test_break_sharing(tmp_path: Path, writer: str, piece: tuple[int, int]) -> None:
    path = tmp_path / "pool"
    with Pool.create(path, data_size=64 * CH) as pool:
        origin = pool.create_thin(1, 8 * CH)
        before = pattern(4 * CH, 1)
        origin.write(0, before)
        snap = pool.create_snap(2, 1)
        assert used(pool) == 4  # a snapshot allocates no data
        shared = [data_block(pool, 1, c) for c in range(4)]
        assert shared == [data_block(pool, 2, c) for c in range(4)]

        off, n = piece
        new = pattern(n, 2)
        target, other = (origin, snap) if writer == "origin" else (snap, origin)
        copies = pool.stats["cow_copies"]
        target.write(off, new)
        touched = range(off // CH, (off + n - 1) // CH + 1)
        expect = bytearray(before)
        expect[off:off + n] = new
        assert target.read(0, 4 * CH) == bytes(expect)
        assert other.read(0, 4 * CH) == before  # the other side keeps the old data
        assert used(pool) == 4 + len(touched)
        # only partially written chunks are copied; a whole-chunk write needs no copy
        partial = sum(1 for c in touched if not (off <= c * CH and (c + 1) * CH <= off + n))
        assert pool.stats["cow_copies"] - copies == partial
        for c in range(4):
            if c in touched:
                assert data_block(pool, target.dev_id, c) not in shared
                assert data_block(pool, other.dev_id, c) == shared[c]
            else:
                assert data_block(pool, target.dev_id, c) == shared[c]
        # already broken: a second write to the same chunk goes in place
        blocks = [data_block(pool, target.dev_id, c) for c in touched]
        target.write(off, pattern(n, 3))
        assert [data_block(pool, target.dev_id, c) for c in touched] == blocks
        assert used(pool) == 4 + len(touched)
        assert other.read(0, 4 * CH) == before
    check_pool(path)
    with Pool.open(path, readonly=True) as pool:
        assert pool.device(other.dev_id).read(0, 4 * CH) == before


def test_delete_frees_only_unshared_chunks(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    with Pool.create(path, data_size=64 * CH) as pool:
        pool.create_thin(1, 8 * CH).write(0, pattern(4 * CH, 1))
        snap = pool.create_snap(2, 1)
        snap.write(0, pattern(2 * CH, 2))  # chunks 0, 1 broken: 2 new blocks
        assert used(pool) == 6
        pool.delete_thin(1)  # frees origin's chunks 0, 1; chunks 2, 3 still held by the snapshot
        assert used(pool) == 4
        assert snap.read(0, 4 * CH) == pattern(2 * CH, 2) + pattern(4 * CH, 1)[2 * CH:]
        pool.delete_thin(2)
        assert used(pool) == 0
        with pytest.raises(DeviceNotFound):
            pool.device(2)
    check_pool(path)


# --- snapshot chains and fans ---------------------------------------------------------------------------------
def test_recursive_snapshot_chain_depth_50(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    depth = 50
    size = 64 * CH
    with Pool.create(path, data_size=256 * CH) as pool:
        dev = pool.create_thin(0, size)
        dev.write(0, pattern(size, 0))
        base_meta = pool.status().used_metadata_blocks
        for level in range(1, depth + 1):
            before = used(pool)
            dev = pool.create_snap(level, level - 1)
            assert used(pool) == before  # O(1): no data copied
            dev.write((level % 64) * CH + 100, pattern(1000, level))  # one chunk broken per level
            assert used(pool) == before + 1
        # a snapshot adds O(1) metadata (a details entry and a top-level entry), not a copy of the tree
        assert pool.status().used_metadata_blocks - base_meta < 4 * depth
        pool.commit()
        # every level sees its own write and those of its ancestors, and nothing of its descendants
        for level in range(depth + 1):
            expect = bytearray(pattern(size, 0))
            for lv in range(1, level + 1):
                off = (lv % 64) * CH + 100
                expect[off:off + 1000] = pattern(1000, lv)
            assert pool.device(level).read(0, size) == bytes(expect), level
        # delete from the middle of the chain: the rest still reads correctly
        for level in range(1, depth, 2):
            pool.delete_thin(level)
        expect = bytearray(pattern(size, 0))
        for lv in range(1, depth + 1):
            off = (lv % 64) * CH + 100
            expect[off:off + 1000] = pattern(1000, lv)
        assert pool.device(depth).read(0, size) == bytes(expect)
    check_pool(path)


def test_many_snapshots_of_one_origin(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    n = 100
    with Pool.create(path, data_size=512 * CH) as pool:
        origin = pool.create_thin(0, 16 * CH)
        data = pattern(16 * CH, 0)
        origin.write(0, data)
        for i in range(1, n + 1):
            pool.create_snap(i, 0)
        assert used(pool) == 16
        for i in range(1, n + 1):
            pool.device(i).write((i % 16) * CH + i, pattern(64, i))
        assert used(pool) == 16 + n
        origin.write(0, bytes(CH))  # the origin breaks sharing too
        assert used(pool) == 17 + n
        for i in range(1, n + 1):
            expect = bytearray(data)
            expect[(i % 16) * CH + i:(i % 16) * CH + i + 64] = pattern(64, i)
            assert pool.device(i).read(0, 16 * CH) == bytes(expect)
        pool.delete_thin(0)
        assert pool.device(7).read(0, CH) == data[:CH]
        assert used(pool) == 16 + n  # the origin's unshared chunk 0 went, its old chunk 0 is still shared
    check_pool(path)


# --- discard matrix -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["passdown", "nopassdown", "ignore"])
@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared"])
@pytest.mark.parametrize("extent", ["partial", "whole"])
def test_discard_matrix(tmp_path: Path, mode: str, shared: bool, extent: str) -> None:
    path = tmp_path / "pool"
    datafile = path / "data"
    with Pool.create(path, data_size=32 * CH, discard=mode) as pool:
        dev = pool.create_thin(1, 8 * CH)
        data = pattern(4 * CH, 1)
        dev.write(0, data)
        snap = pool.create_snap(2, 1) if shared else None
        pool.commit()
        blocks = [data_block(pool, 1, c) for c in range(4)]
        for b in blocks:
            assert is_data(datafile, b * CH, CH)
        off, n = (CH + 512, 4096) if extent == "partial" else (CH, 2 * CH)  # whole: chunks 1 and 2
        dev.discard(off, n)
        pool.commit()
        st = pool.status()
        assert st.discard == mode
        unmapped = mode != "ignore" and extent == "whole"
        got = dev.read(0, 4 * CH)
        if unmapped:
            assert got == data[:CH] + bytes(2 * CH) + data[3 * CH:]
            assert data_block(pool, 1, 1) is None and data_block(pool, 1, 2) is None
            assert dev.status()[0] == 2 * CH // 512  # mapped sectors
        else:
            # a partial-chunk discard (or mode ignore) leaves the data and the mappings alone
            assert got == data
            assert [data_block(pool, 1, c) for c in range(4)] == blocks
        freed = unmapped and not shared
        assert st.used_data_blocks == (2 if freed else 4)
        for c in (1, 2):
            if freed and mode == "passdown":
                assert is_hole(datafile, blocks[c] * CH, CH)  # the data file's block was punched
            else:
                assert is_data(datafile, blocks[c] * CH, CH)
        for c in (0, 3):
            assert is_data(datafile, blocks[c] * CH, CH)
        if snap is not None:
            assert snap.read(0, 4 * CH) == data  # the snapshot keeps the shared chunks
            if unmapped:
                # discarding the snapshot's copies too frees the chunks
                snap.discard(CH, 2 * CH)
                pool.commit()
                assert used(pool) == 2
                for c in (1, 2):
                    assert is_hole(datafile, blocks[c] * CH, CH) == (mode == "passdown")
    check_pool(path)


def test_discard_tail_and_unaligned_ranges(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    size = 3 * CH + 4096  # partial tail chunk
    with Pool.create(path, data_size=16 * CH) as pool:
        dev = pool.create_thin(1, size)
        dev.write(0, pattern(size, 5))
        dev.discard(100, size - 100)  # reaches the end: chunks 1, 2 and the partial tail chunk 3 unmapped
        assert [data_block(pool, 1, c) is not None for c in range(4)] == [True, False, False, False]
        assert dev.read(0, size) == pattern(100, 5) + pattern(size, 5)[100:CH] + bytes(size - CH)
        assert dev.mapped_ranges() == [(0, CH)]
    check_pool(path)


# --- out of space ---------------------------------------------------------------------------------------------
def test_out_of_space_then_resize(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    with Pool.create(path, data_size=8 * CH) as pool:
        dev = pool.create_thin(1, 32 * CH)
        committed = pattern(6 * CH, 1)
        dev.write(0, committed)
        pool.commit()
        dev.write(6 * CH, pattern(CH, 2))  # 7 of 8 used, not committed
        # a write needing two chunks with one free is refused whole: nothing allocated, nothing written
        with pytest.raises(NoDataSpace):
            dev.write(7 * CH + 10, pattern(CH, 3))
        assert used(pool) == 7
        assert dev.read(7 * CH, 2 * CH) == bytes(2 * CH)
        assert pool.status().mode == "out_of_data_space"
        dev.write(7 * CH, pattern(CH, 4))  # the last chunk
        with pytest.raises(NoDataSpace):
            dev.write(20 * CH, b"x")
        with pytest.raises(NoDataSpace):
            dev.write(9 * CH, pattern(3 * CH, 9))
        # reads and overwrites of provisioned chunks keep working
        assert dev.read(0, 6 * CH) == committed
        dev.write(CH + 5, b"overwrite")
        # a snapshot's shared chunks cannot be broken without space
        snap = pool.create_snap(2, 1)
        with pytest.raises(NoDataSpace):
            snap.write(0, b"needs a copy")
        with pytest.raises(NoDataSpace):
            dev.write(0, b"needs a copy too")
        assert snap.read(0, 8 * CH) == dev.read(0, 8 * CH)
        # resize grows the data file and recovers
        pool.resize(32 * CH)
        assert pool.status().mode == "rw"
        assert pool.status().total_data_blocks == 32
        assert os.path.getsize(path / "data") == 32 * CH
        snap.write(0, b"needs a copy")
        dev.write(20 * CH, b"x")
        expect = bytearray(committed + pattern(CH, 2) + pattern(CH, 4))
        expect[CH + 5:CH + 14] = b"overwrite"
        assert dev.read(0, 8 * CH) == bytes(expect)
        assert dev.read(20 * CH, 1) == b"x"
    check_pool(path)
    with Pool.open(path) as pool:
        assert pool.device(1).read(0, 8 * CH) == bytes(expect)
        assert pool.device(2).read(0, 12) == b"needs a copy"


def test_out_of_space_loses_nothing_committed_after_crash(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    pool = Pool.create(path, data_size=4 * CH)
    dev = pool.create_thin(1, 8 * CH)
    dev.write(0, pattern(3 * CH, 1))
    pool.commit()
    dev.write(3 * CH, pattern(CH, 2))
    with pytest.raises(NoDataSpace):
        dev.write(4 * CH, b"no room")
    pool.crash_close()
    with Pool.open(path) as pool:
        dev = pool.device(1)
        assert dev.read(0, 3 * CH) == pattern(3 * CH, 1)
        assert dev.read(3 * CH, 2 * CH) == bytes(2 * CH)  # the uncommitted provisioning is gone
        assert used(pool) == 3
    check_pool(path)


def test_write_zeroes_refused_whole_when_out_of_space(tmp_path: Path) -> None:
    """Zeroing partial chunks of a shared device needs copies; without room nothing may change."""
    path = tmp_path / "pool"
    with Pool.create(path, data_size=5 * CH) as pool:
        dev = pool.create_thin(1, 8 * CH)
        data = pattern(4 * CH, 1)
        dev.write(0, data)
        snap = pool.create_snap(2, 1)
        snap.write(3 * CH, pattern(CH, 2))  # 5 of 5 used
        with pytest.raises(NoDataSpace):
            snap.write_zeroes(100, 2 * CH)  # head and tail partial chunks are shared: 2 copies needed
        assert snap.read(0, 3 * CH) == data[:3 * CH]
        assert used(pool) == 5
    check_pool(path)


def test_no_space_queue_times_out_or_resumes_after_resize(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    with Pool.create(path, data_size=2 * CH, no_space="queue") as pool:
        assert pool.status().no_space_policy == "queue"
        pool.queue_timeout = 0.2
        dev = pool.create_thin(1, 8 * CH)
        dev.write(0, pattern(2 * CH, 1))
        with pytest.raises(NoDataSpace):
            dev.write(2 * CH, b"waits, then gives up")
        assert pool.status().mode == "out_of_data_space"
        # a queued write resumes when another thread grows the pool
        pool.queue_timeout = 60.0
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                dev.write(2 * CH, b"queued write")
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=writer)
        t.start()
        # until the writer waits (or, a failure, has ended: its error is asserted below instead of a hang)
        while t.is_alive() and (pool.status().mode != "out_of_data_space" or not pool._space_cv._waiters):  # type: ignore[attr-defined]
            t.join(0.01)
        pool.resize(4 * CH)
        t.join(30)
        assert not t.is_alive() and not errors
        assert dev.read(2 * CH, 12) == b"queued write"
        assert pool.status().mode == "rw"
    check_pool(path)


def test_low_water_mark_callback(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    calls: list[int] = []
    with Pool.create(path, data_size=10 * CH, low_water_mark=3) as pool:
        pool.low_water_callback = lambda p: calls.append(p.status().used_data_blocks)
        dev = pool.create_thin(1, 32 * CH)
        for c in range(6):
            dev.write(c * CH, b"x")
        assert calls == []  # 4 free
        dev.write(6 * CH, b"x")  # 3 free: at the mark
        assert calls == [7]
        dev.write(7 * CH, b"x")
        assert calls == [7]  # fires once until the pool is resized
        pool.resize(20 * CH)
        dev.write(8 * CH, b"x")
        assert calls == [7]
        for c in range(9, 17):
            dev.write(c * CH, b"x")
        assert calls == [7, 17]
    with Pool.open(path) as pool:
        assert pool.low_water_mark == 3  # the option persists in the manifest
    check_pool(path)


# --- external origin ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("origin_size", ["equal", "smaller", "larger"])
def test_external_origin(tmp_path: Path, origin_size: str) -> None:
    path = tmp_path / "pool"
    size = 5 * CH + 4096  # a partial tail chunk
    osize = {"equal": size, "smaller": 2 * CH + 1234, "larger": size + 3 * CH + 17}[origin_size]
    ofile = tmp_path / "origin.img"
    ocontent = random.Random(7).randbytes(osize)
    ofile.write_bytes(ocontent)
    view = ocontent[:size] + bytes(max(0, size - osize))
    with Pool.create(path, data_size=32 * CH) as pool:
        dev = pool.create_thin(1, size, origin=str(ofile))
        assert dev.read(0, size) == view
        assert used(pool) == 0  # reads never copy
        assert dev.mapped_ranges() == [(0, min(size, osize))]
        expect = bytearray(view)
        for off, n in [(100, 10), (2 * CH + 1000, 500), (5 * CH + 10, 20), (3 * CH - 5, 10), (4 * CH, CH)]:
            d = pattern(n, off)
            dev.write(off, d)
            expect[off:off + n] = d
        assert dev.read(0, size) == bytes(expect)  # the rest of each written chunk kept the origin's bytes
        snap = pool.create_snap(2, 1)
        assert snap.read(0, size) == bytes(expect)
        # a discarded chunk shows the origin again
        dev.discard(0, CH)
        expect[0:CH] = view[0:CH]
        assert dev.read(0, size) == bytes(expect)
        # write_zeroes over the origin really zeros
        dev.write_zeroes(CH, CH + 7)
        expect[CH:2 * CH + 7] = bytes(CH + 7)
        assert dev.read(0, size) == bytes(expect)
        # the tail chunk, partly written above, reads the origin past the write (or zeros past the origin)
        assert dev.read(5 * CH, 4096) == bytes(expect[5 * CH:])
    assert ofile.read_bytes() == ocontent  # the origin is never written
    check_pool(path)
    with Pool.open(path, readonly=True) as pool:
        assert pool.device(1).read(0, size) == bytes(expect)


# --- block zeroing --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero,discard", [(True, "nopassdown"), (False, "nopassdown"), (False, "passdown")])
def test_skip_block_zeroing(tmp_path: Path, zero: bool, discard: str) -> None:
    """With zeroing off, the unwritten part of a newly provisioned chunk shows whatever the data block held (as
    dm-thin's skip_block_zeroing); with zeroing on (or a passdown-punched block) it reads zeros."""
    path = tmp_path / "pool"
    with Pool.create(path, data_size=CH, zero=zero, discard=discard) as pool:  # a single data block
        assert pool.status().zero is zero
        old = pattern(CH, 1)
        pool.create_thin(1, 4 * CH).write(0, old)
        pool.delete_thin(1)  # the block is free again (commit)
        dev = pool.create_thin(2, 4 * CH)
        written = pool.data.bytes_written
        dev.write(512, b"new")
        assert pool.data.bytes_written - written == 3  # no zero-filling writes either way (a hole is punched)
        got = dev.read(0, CH)
        assert got[512:515] == b"new"
        rest = got[:512] + got[515:]
        if not zero and discard == "nopassdown":
            assert rest == old[:512] + old[515:]  # stale data shows through
        else:
            assert rest == bytes(CH - 3)
        # a whole-chunk write needs no zeroing and is correct either way
        dev.write(0, pattern(CH, 2))
        assert dev.read(0, CH) == pattern(CH, 2)
    check_pool(path)


# --- locking and read-only ------------------------------------------------------------------------------------
def _child(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


def test_second_writer_refused_metadata_snapshot_reader_works(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    with Pool.create(path, data_size=32 * CH) as pool:
        dev = pool.create_thin(1, 16 * CH)
        dev.write(0, pattern(2 * CH, 1))
        r = _child(f"""
from thinpool.pool import Pool
from thinpool.errors import PoolLocked
try:
    Pool.open({str(path)!r})
except PoolLocked as e:
    print("LOCKED", e)
else:
    print("OPENED")
""")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("LOCKED") and "in use by another writer" in r.stdout
        with pytest.raises(PoolLocked):  # another open file description in this process too
            Pool.open(path)
        held = pool.reserve_metadata_snap()
        assert pool.status().held_metadata_root == held
        dev.write(4 * CH, pattern(CH, 2))  # after the metadata snapshot: not visible through it
        pool.commit()
        r = _child(f"""
from thinpool.pool import Pool
from thinpool.errors import ReadOnly
import hashlib
with Pool.open({str(path)!r}, use_metadata_snap=True) as p:
    d = p.device(1)
    print(hashlib.sha256(d.read(0, 2 * d.chunk)).hexdigest(), d.read(4 * d.chunk, d.chunk) == bytes(d.chunk))
    try:
        d.write(0, b"x")
    except ReadOnly:
        print("READONLY")
""")
        assert r.returncode == 0, r.stderr
        digest, unseen = r.stdout.split()[:2]
        assert digest == hashlib.sha256(pattern(2 * CH, 1)).hexdigest()
        assert unseen == "True"
        assert "READONLY" in r.stdout
        # a plain read-only open wants a shared lock: refused beside the writer
        with pytest.raises(PoolLocked) as ei:
            Pool.open(path, readonly=True)
        assert ei.value.holder == "writer"
        # a lock-free peek sees the live committed state
        with Pool.open(path, readonly=True, lock="none") as ro:
            assert ro.device(1).read(4 * CH, CH) == pattern(CH, 2)
            with pytest.raises(ReadOnly):
                ro.device(1).write(0, b"x")
        pool.release_metadata_snap()
        assert pool.status().held_metadata_root is None
    # the lock goes with the writer
    with Pool.open(path) as pool:
        assert pool.device(1).read(0, 2 * CH) == pattern(2 * CH, 1)
    check_pool(path)


# --- bounds, file-like access, threads ------------------------------------------------------------------------
def test_io_past_the_end(tmp_path: Path) -> None:
    with Pool.create(tmp_path / "pool", data_size=8 * CH) as pool:
        size = 2 * CH + 512
        dev = pool.create_thin(1, size)
        dev.write(size - 10, b"0123456789")
        assert dev.read(size - 10, 10) == b"0123456789"
        for op in (lambda: dev.read(size - 10, 11), lambda: dev.write(size - 9, b"0123456789"),
                   lambda: dev.discard(size, 1), lambda: dev.write_zeroes(0, size + 1),
                   lambda: dev.read(-1, 1), lambda: dev.write(size, b"x"), lambda: dev.read(0, -1)):
            with pytest.raises(OutOfBounds):
                op()
        assert dev.read(size, 0) == b""
        assert used(pool) == 1  # the write at size-10 touched only the partial tail chunk
        with pytest.raises(InvalidArgument):
            pool.create_thin(2, 1000)  # not a multiple of 512


def test_file_like_wrapper_copyfileobj(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    src = random.Random(3).randbytes(3 * CH + 12345)
    with Pool.create(path, data_size=32 * CH) as pool:
        dev = pool.create_thin(1, 8 * CH)
        with dev.open("r+b") as f:
            assert isinstance(f, io.RawIOBase) and f.seekable() and f.writable()
            f.seek(1000)
            shutil.copyfileobj(io.BytesIO(src), f, length=50_000)
            assert f.tell() == 1000 + len(src)
        out = io.BytesIO()
        with io.BufferedReader(dev.open("rb")) as f:
            f.seek(1000)
            shutil.copyfileobj(f, out)
        assert out.getvalue()[:len(src)] == src
        assert out.getvalue()[len(src):] == bytes(8 * CH - 1000 - len(src))
        with dev.open("rb") as f:
            assert f.seek(-5, io.SEEK_END) == 8 * CH - 5
            assert f.read() == bytes(5)
            assert f.read() == b""
            with pytest.raises(io.UnsupportedOperation):
                f.write(b"x")
        assert dev.readv([(1000, 10), (1000 + len(src) - 3, 3)]) == [src[:10], src[-3:]]
        dev.writev([(0, b"abc"), (CH * 7, b"def")])
        assert dev.read(0, 3) == b"abc" and dev.read(7 * CH, 3) == b"def"
    check_pool(path)


def test_threads_writing_different_devices(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    nthreads, size = 6, 16 * CH
    with Pool.create(path, data_size=160 * CH) as pool:
        for i in range(nthreads):
            pool.create_thin(i, size)
        pool.create_snap(100, 0)
        models = {i: bytearray(size) for i in range(nthreads)}
        errors: list[BaseException] = []

        def work(i: int) -> None:
            rng = random.Random(i)
            dev = pool.device(i)
            try:
                for k in range(150):
                    off = rng.randrange(size - 1)
                    n = min(rng.choice([1, 512, 4096, CH, 3 * CH // 2]), size - off)
                    d = rng.randbytes(n)
                    dev.write(off, d)
                    models[i][off:off + n] = d
                    if k % 25 == 0:
                        c = rng.randrange(size // CH)
                        dev.discard(c * CH, CH)
                        models[i][c * CH:(c + 1) * CH] = bytes(CH)
                    if k % 40 == 0:
                        pool.commit()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i in range(nthreads):
            assert pool.device(i).read(0, size) == models[i], i
        assert pool.device(100).read(0, size) == bytes(size)
    check_pool(path)


def test_status_fields(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    with Pool.create(path, data_size=16 * CH, discard="nopassdown", no_space="queue") as pool:
        dev = pool.create_thin(1, 8 * CH)
        dev.write(CH + 1, b"x")
        st = pool.status()
        assert (st.used_data_blocks, st.total_data_blocks, st.chunk_size, st.devices) == (1, 16, CH, 1)
        assert st.mode == "rw" and not st.needs_check and st.held_metadata_root is None
        line = st.dm_line()
        assert line.split()[2] == "1/16"
        assert "no_discard_passdown" in line and "queue_if_no_space" in line
        assert dev.status() == (CH // 512, 2 * CH // 512 - 1)
        tid = st.transaction_id
    with Pool.open(path, readonly=True) as pool:
        assert pool.status().mode == "rw"  # the pool's mode: a read-only opener only observes it
        assert pool.status().transaction_id == tid


def test_failed_data_write_maps_nothing_and_leaks_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data-file error in the middle of a multi-chunk write: no chunk of it gets a new mapping (no mapping to
    unwritten data), the blocks allocated for it are released, and the metadata stays exact."""
    from thinpool.errors import StoreIOError

    path = tmp_path / "pool"
    with Pool.create(path, data_size=32 * CH) as pool:
        dev = pool.create_thin(1, 16 * CH)
        dev.write(0, pattern(CH, 1))
        pool.commit()
        real = pool.data.pwrite
        calls = []

        def flaky(off: int, data: bytes) -> None:
            calls.append(off)
            if len(calls) == 1:  # the three new chunks are contiguous: one coalesced pwrite
                raise StoreIOError(what="data", op="write", reason="injected")
            real(off, data)

        monkeypatch.setattr(pool.data, "pwrite", flaky)
        with pytest.raises(StoreIOError):
            dev.write(4 * CH + 100, pattern(3 * CH, 2))  # partial head chunk, whole chunk, partial tail chunk
        monkeypatch.setattr(pool.data, "pwrite", real)
        assert used(pool) == 1
        assert [data_block(pool, 1, c) for c in range(4, 8)] == [None] * 4
        assert dev.read(0, CH) == pattern(CH, 1)
        pool.commit()
    check_pool(path)


def test_sequential_overwrite_is_coalesced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks provisioned in order sit contiguously in the data file; an overwrite across them is one pwrite."""
    with Pool.create(tmp_path / "pool", data_size=64 * CH) as pool:
        dev = pool.create_thin(1, 32 * CH)
        dev.write(0, pattern(16 * CH, 1))
        assert [data_block(pool, 1, c) for c in range(16)] == list(range(16))
        real = pool.data.pwrite
        calls: list[tuple[int, int]] = []
        monkeypatch.setattr(pool.data, "pwrite", lambda off, d: (calls.append((off, len(d))), real(off, d)))
        dev.write(100, pattern(16 * CH - 200, 2))
        assert calls == [(100, 16 * CH - 200)]
        assert dev.read(0, 16 * CH) == pattern(100, 1) + pattern(16 * CH - 200, 2) + pattern(16 * CH, 1)[-100:]


def test_low_water_callback_that_commits_leaves_no_leak(tmp_path: Path) -> None:
    """The callback runs after the I/O that crossed the mark, so a callback that commits (as a resize does)
    never commits blocks that are allocated but not yet mapped."""
    path = tmp_path / "pool"
    pool = Pool.create(path, data_size=8 * CH, low_water_mark=4)
    seen: list[tuple[int, int]] = []

    def on_low(p: Pool) -> None:
        seen.append((p.status().used_data_blocks, p.md.get_device(1).mapped_blocks))
        p.commit()

    pool.low_water_callback = on_low
    dev = pool.create_thin(1, 16 * CH)
    dev.write(0, pattern(3 * CH, 1))
    dev.write(3 * CH + 10, pattern(2 * CH, 2))  # crosses the mark (4 free) in the middle of a 3-chunk write
    assert seen == [(6, 6)]  # every allocated block was already mapped when the callback ran
    pool.crash_close()  # the callback's commit is the last one
    check_pool(path)
    with Pool.open(path) as pool:
        assert pool.device(1).read(0, 3 * CH + 10) == pattern(3 * CH, 1) + bytes(10)


def test_queued_write_plans_again_after_waiting(tmp_path: Path) -> None:
    """A write queued for space releases the pool lock while it waits; what it looked up before may be stale
    when it wakes (here: its in-place chunk was discarded, committed, and the block reused by another device).
    It must look the mappings up again instead of writing into another device's block."""
    path = tmp_path / "pool"
    with Pool.create(path, data_size=2 * CH, no_space="queue", discard="nopassdown") as pool:
        pool.queue_timeout = 60.0
        a = pool.create_thin(1, 4 * CH)
        b = pool.create_thin(2, 4 * CH)
        a.write(0, pattern(2 * CH, 1))  # pool full: chunks 0, 1 of device 1
        blk0 = data_block(pool, 1, 0)
        errors: list[BaseException] = []

        def writer() -> None:
            try:  # chunk 0 in place + chunk 2 new: needs one block, none free -> waits
                a.write(CH - 100, pattern(CH + 200, 9)[:100] + bytes(CH) + pattern(100, 9))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=writer)
        t.start()
        while t.is_alive() and not pool._space_cv._waiters:  # type: ignore[attr-defined]  (a dead writer: asserted below)
            t.join(0.01)
        with pool.lock:
            a.discard(0, CH)  # frees chunk 0's block ...
            pool.commit()
            b.write(0, pattern(CH, 5))  # ... which device 2 now gets
            assert data_block(pool, 2, 0) == blk0
            pool.resize(8 * CH)
        t.join(30)
        assert not t.is_alive() and not errors, errors
        assert b.read(0, CH) == pattern(CH, 5)  # device 2's data is intact
        expect = bytes(CH - 100) + pattern(CH + 200, 9)[:100] + bytes(CH) + pattern(100, 9)
        assert a.read(0, 2 * CH + 100)[:len(expect)] == expect
    check_pool(path)


def test_multi_leaf_trees_random_writes_against_model(tmp_path: Path) -> None:
    """Enough mappings for a mapping tree of several levels, provisioned in random order (data blocks not
    contiguous), then multi-chunk writes across leaf boundaries, before and after a snapshot."""
    path = tmp_path / "pool"
    nchunks = 1200
    size = nchunks * CH
    rng = random.Random(11)
    model = bytearray(size)
    with Pool.create(path, data_size=3000 * CH) as pool:
        dev = pool.create_thin(1, size)
        order = list(range(nchunks))
        rng.shuffle(order)
        for c in order[:1000]:
            off = c * CH + rng.randrange(CH - 600)
            d = rng.randbytes(500)
            dev.write(off, d)
            model[off:off + 500] = d

        def scatter(nwrites: int) -> None:
            for _ in range(nwrites):
                n = rng.choice([CH, 3 * CH + 5, 16 * CH, 40 * CH + 1])
                off = rng.randrange(size - n)
                d = rng.randbytes(n)
                dev.write(off, d)
                model[off:off + n] = d

        scatter(40)
        assert dev.read(0, size) == model
        snap = pool.create_snap(2, 1)
        frozen = bytes(model)
        scatter(40)
        assert dev.read(0, size) == model
        assert snap.read(0, size) == frozen
        # sequential rewrite of everything: runs of consecutive blocks take the one-pwrite path
        for off in range(0, size, 16 * CH):
            d = rng.randbytes(16 * CH)
            dev.write(off, d)
            model[off:off + 16 * CH] = d
        scatter(20)
        assert dev.read(0, size) == model
        assert snap.read(0, size) == frozen
    check_pool(path)


@pytest.mark.parametrize("crash_at", ["pending manifest write", "metadata superblock", "final manifest write"])
def test_crash_during_delete_keeps_name_and_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 crash_at: str) -> None:
    """The manifest and the metadata are two files; a crash between their updates must leave a pool whose device
    set is the metadata's, with names and sizes intact (the manifest is written before and after the commit)."""
    import thinpool.pool as pool_mod

    path = tmp_path / "pool"
    pool = Pool.create(path, data_size=16 * CH)
    pool.create_thin(1, 3 * CH + 512, name="keep").write(0, pattern(CH, 1))
    pool.create_thin(2, 4 * CH, name="gone").write(0, pattern(CH, 2))
    pool.commit()

    class Crash(BaseException):
        pass

    calls = []
    real = pool_mod._append_manifest

    def write_manifest(p: Path, m: dict) -> int:
        calls.append(m)
        if (crash_at == "pending manifest write") == (len(calls) == 1):
            raise Crash()
        return real(p, m)

    def tm_commit(*a: object, **k: object) -> None:
        raise Crash()  # power lost before the superblock write: the old one stays on disk

    if crash_at == "metadata superblock":
        monkeypatch.setattr(pool.md.tm, "commit", tm_commit)
    else:
        monkeypatch.setattr(pool_mod, "_append_manifest", write_manifest)
    with pytest.raises(Crash):
        pool.delete_thin(2)
    monkeypatch.undo()
    # a failed superblock write fails the pool: the last commit is flagged needs_check
    assert pool.failed == (crash_at == "metadata superblock")
    pool.crash_close()
    with Pool.open(path, allow_needs_check=True) as pool:
        committed = crash_at == "final manifest write"  # the metadata commit happened: the delete stands
        assert pool.list_devices() == ([1] if committed else [1, 2])
        assert (pool.device_name(1), pool.device_size(1)) == ("keep", 3 * CH + 512)
        if not committed:
            assert (pool.device_name(2), pool.device_size(2)) == ("gone", 4 * CH)
            assert pool.device(2).read(0, CH) == pattern(CH, 2)
        assert pool.device(1).read(0, CH) == pattern(CH, 1)
        assert pool.md.needs_check == (crash_at == "metadata superblock")
    check_pool(path)


def test_metadata_exhaustion_during_writes_makes_the_pool_read_only(tmp_path: Path) -> None:
    """Running out of metadata space in the middle of I/O (not only at commit): the open transaction is dropped,
    the pool turns read-only with needs_check, committed data stays readable, and the metadata stays valid."""
    from thinpool.errors import NeedsCheck, NoMetadataSpace

    path = tmp_path / "pool"
    pool = Pool.create(path, data_size=20000 * CH, metadata_size=24 * 4096)
    dev = pool.create_thin(1, 20000 * CH)
    dev.write(0, b"committed")
    pool.commit()
    with pytest.raises(NoMetadataSpace):
        for c in range(2, 20000, 2):  # one mapping per chunk, no commits: the metadata device fills up
            dev.write(c * CH, b"x")
    st = pool.status()
    assert st.needs_check and st.mode == "ro"
    assert st.used_data_blocks == 1  # back at the last commit
    with pytest.raises(ReadOnly):
        dev.write(CH, b"y")
    with pytest.raises(ReadOnly):
        dev.discard(0, CH)
    assert dev.read(0, 9) == b"committed" and dev.read(2 * CH, 1) == b"\0"
    pool.close()
    with pytest.raises(NeedsCheck):
        Pool.open(path)
    with Pool.open(path, readonly=True) as ro:
        assert ro.status().needs_check
        assert ro.device(1).read(0, 9) == b"committed"
    check_pool(path)
