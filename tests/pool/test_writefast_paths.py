"""The 4 KiB write fast paths keep their semantics: the one-expression writable check (failed, closed, read-only,
needs_check), DataStore.pwrite's limit and dirty ranges, the known-hole tail that spares a fresh chunk's lseek
(every write, copy and punch moves it correctly, so a punch is skipped only where the file really has a hole), and
a full host disk on the overwrite fast path."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from pool_helpers import CH, check_pool, is_data, is_hole, pattern

from thinpool.errors import HostNoSpace, InvalidArgument, NoDataSpace, PoolFailed, ReadOnly, StoreIOError
from thinpool.io.data_store import DataStore
from thinpool.pool import Pool
from thinpool.testing.faulty import FaultPlan, install


def _pool(tmp_path: Path, nr_chunks: int = 16) -> Path:
    path = tmp_path / "pool"
    with Pool.create(path, data_size=nr_chunks * CH, chunk_size=CH) as p:
        p.create_thin(1, 8 * CH)
        p.device(1).write(0, pattern(2 * CH, 1))
    return path


def test_fast_overwrite_refused_once_the_pool_failed(tmp_path: Path) -> None:
    path = _pool(tmp_path)
    with Pool.open(path) as p:
        dev = p.device(1)
        dev.write(100, b"warm")  # the mapping cache holds chunk 0: the next write takes the fast path
        p.fail("test")
        with pytest.raises(PoolFailed):
            dev.write(100, b"x")
        with pytest.raises(PoolFailed):
            dev.write(5 * CH, b"x")  # the provisioning path too
    with Pool.open(path, readonly=True) as p:  # the in-place overwrite before the failure stays (as in dm-thin)
        want = bytearray(pattern(2 * CH, 1))
        want[100:104] = b"warm"
        assert p.md.needs_check and p.device(1).read(0, 2 * CH) == want and p.device(1).read(5 * CH, 1) == b"\0"


def test_fast_overwrite_refused_on_needs_check_readonly_and_closed(tmp_path: Path) -> None:
    path = _pool(tmp_path)
    with Pool.open(path) as p:
        dev = p.device(1)
        dev.write(100, b"warm")
        p.commit()
        p.md.flags |= 1  # needs_check in memory (as a failing path sets it)
        with pytest.raises(ReadOnly):
            dev.write(100, b"x")
        p.md.clear_needs_check()
        dev.write(100, b"ok")
    with Pool.open(path) as p:
        dev = p.device(1)
        dev.write(100, b"w")
        p.close()
        with pytest.raises(InvalidArgument):
            dev.write(100, b"x")
    with Pool.open(path, readonly=True) as p:
        with pytest.raises(ReadOnly):
            p.device(1).write(100, b"x")
        assert p.device(1).read(100, 2) == b"wk"
    check_pool(path)


def test_pwrite_limit_and_dirty_ranges(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"")
    ds = DataStore(str(path), CH)
    ds.resize(4 * CH)
    ds.pwrite(0, b"a" * 10)
    ds.pwrite(10, b"b" * 10)  # coalesced with the range before
    ds.pwrite(3 * CH, b"c" * 5)
    assert ds.dirty == [(0, 20), (3 * CH, 3 * CH + 5)] and ds.bytes_written == 25
    with pytest.raises(StoreIOError):
        ds.pwrite(4 * CH - 2, b"dddd")  # past the data file's end: refused, nothing written or marked
    assert os.path.getsize(path) == 4 * CH and ds.dirty[-1] == (3 * CH, 3 * CH + 5)
    ds.pwrite(4 * CH, b"")  # an empty write at the end is nothing
    os.truncate(path, 8 * CH)  # another process grew the file: the limit follows
    ds.pwrite(6 * CH, memoryview(b"e" * 8))
    assert ds.pread(6 * CH, 8) == b"e" * 8 and ds.dirty[-1] == (6 * CH, 6 * CH + 8)
    ds.sync()
    assert ds.dirty == []
    ds.close()


def test_known_hole_tail_follows_writes_copies_and_punches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"")
    ds = DataStore(str(path), CH)
    ds.resize(16 * CH)
    seeks: list[int] = []
    real_lseek = os.lseek

    def counting_lseek(fd: int, pos: int, how: int) -> int:
        if fd == ds.fd:  # the store's own lseeks (the helpers' checks open the file themselves)
            seeks.append(pos)
        return real_lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", counting_lseek)
    ds.punch(2 * CH, CH)  # fresh file: one SEEK_DATA finds nothing after chunk 2
    assert ds.punches_skipped == 1 and seeks == [2 * CH]
    ds.punch(9 * CH, CH)  # past the known-hole tail: no lseek
    assert ds.punches_skipped == 2 and len(seeks) == 1
    ds.pwrite(5 * CH + 100, b"x" * 10)  # data inside the tail: the tail moves past it
    ds.punch(5 * CH, CH)  # so this is a real punch
    assert ds.punched == CH and is_hole(path, 5 * CH, CH) and ds.pread(5 * CH, CH) == bytes(CH)
    ds.punch(7 * CH, CH)  # the punch reached the tail, which starts at chunk 5 again: no lseek
    assert ds.punches_skipped == 3 and len(seeks) == 2
    ds.pwrite(1 * CH, pattern(CH, 2))
    ds.copy(1 * CH, 11 * CH, CH)  # a copy into the tail moves it too
    ds.punch(11 * CH, CH)
    assert ds.punched == 2 * CH and ds.pread(11 * CH, CH) == bytes(CH)
    ds.punch(12 * CH, CH)
    assert ds.punches_skipped == 4
    ds.pwrite(13 * CH, b"y")  # after the tail: moves it past the byte
    ds.punch(13 * CH, CH)
    assert ds.punched == 3 * CH and ds.pread(13 * CH, CH) == bytes(CH)
    assert is_data(path, 1 * CH, CH)
    ds.close()


def test_fresh_chunks_read_zeros_around_the_piece_after_reuse(tmp_path: Path) -> None:
    """A block freed by a discard (passdown punches it) and one written then released are handed out again: the
    part a 4 KiB write does not cover must read as zeros, whatever the known-hole tail said before."""
    path = _pool(tmp_path, nr_chunks=4)
    with Pool.open(path) as p:
        dev = p.device(1)
        dev.write(2 * CH, pattern(2 * CH, 3))  # the last two free chunks
        p.commit()
        dev.discard(2 * CH, 2 * CH)
        p.commit()
        dev.write(6 * CH + 4096, b"z" * 4096)
        dev.write(7 * CH + 8192, b"w" * 4096)
        assert dev.read(6 * CH, CH) == bytes(4096) + b"z" * 4096 + bytes(CH - 8192)
        assert dev.read(7 * CH, CH) == bytes(8192) + b"w" * 4096 + bytes(CH - 12288)
    with Pool.open(path) as p:
        assert p.device(1).read(6 * CH, 2 * CH) == (bytes(4096) + b"z" * 4096 + bytes(CH - 8192) + bytes(8192)
                                                   + b"w" * 4096 + bytes(CH - 12288))
    check_pool(path)


def test_full_host_disk_on_the_fast_overwrite(tmp_path: Path) -> None:
    path = _pool(tmp_path)
    with Pool.open(path) as p:
        dev = p.device(1)
        dev.write(100, b"warm")
        install(p, FaultPlan(kind="enospc", at=1, ops=("write",), stores=("data",)))
        with pytest.raises(HostNoSpace) as ei:
            dev.write(200, b"x" * 4096)
        assert ei.value.exit_code == 3


# --- batched allocation (Pool.alloc_data_blocks, the 1 MiB provision's path) ---------------------------------------
def test_alloc_data_blocks_batch_and_its_failures(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    calls: list[int] = []
    with Pool.create(path, data_size=10 * CH, chunk_size=CH, low_water_mark=3) as p:
        p.low_water_callback = lambda pool: calls.append(pool.nr_allocated_data_blocks)
        dev = p.create_thin(1, 32 * CH)
        dev.write(0, pattern(4 * CH, 1))  # one aligned multi-chunk write: one batch of 4
        assert p.nr_allocated_data_blocks == 4 and calls == []
        p.commit()
        got = p.alloc_data_blocks(3)  # 3 free after it: at the mark, the event is delivered after the I/O
        assert len(set(got)) == 3 and p.nr_allocated_data_blocks == 7
        p.fire_low_water()
        assert calls == [7]
        for b in got:
            p.md.data_sm.dec(b)
        with pytest.raises(NoDataSpace) as ei:  # 6 free, 7 asked: nothing stays taken
            p.alloc_data_blocks(7)
        assert ei.value.requested == 7 and p.nr_allocated_data_blocks == 4
        with pytest.raises(NoDataSpace):
            dev.write(8 * CH, pattern(7 * CH, 2))  # the write path: refused before any block is taken
        assert p.nr_allocated_data_blocks == 4 and dev.read(8 * CH, 7 * CH) == bytes(7 * CH)
        dev.write(8 * CH, pattern(6 * CH, 2))
        assert p.nr_allocated_data_blocks == 10
        p.fail("test")
        with pytest.raises(PoolFailed):
            p.alloc_data_blocks(1)
    with Pool.open(path, readonly=True) as p:
        assert p.device(1).read(0, 4 * CH) == pattern(4 * CH, 1)


def test_alloc_data_blocks_queues_until_a_resize(tmp_path: Path) -> None:
    path = tmp_path / "pool"
    with Pool.create(path, data_size=4 * CH, chunk_size=CH, no_space="queue") as p:
        p.no_space_timeout = 60.0
        p.create_thin(1, 32 * CH)
        p.device(1).write(0, pattern(2 * CH, 1))
        queued = threading.Event()
        p.on_queue = lambda pool, need, timeout: queued.set()
        out: list[object] = []

        def taker() -> None:
            try:
                with p.lock:
                    out.append(p.alloc_data_blocks(5))
            except BaseException as e:  # noqa: BLE001
                out.append(e)

        t = threading.Thread(target=taker)
        t.start()
        assert queued.wait(60)
        assert p.nr_allocated_data_blocks == 2  # nothing held while it waits
        p.resize(8 * CH)
        t.join(60)
        assert not t.is_alive() and len(out) == 1 and isinstance(out[0], list) and len(set(out[0])) == 5
        assert p.nr_allocated_data_blocks == 7
        for b in out[0]:
            p.md.data_sm.dec(b)
    check_pool(path)


def test_break_of_a_cached_shared_chunk(tmp_path: Path) -> None:
    """The mapping cache's shared hit is handed to the break (no second lookup): the snapshot keeps the old chunk,
    the origin gets a copy with the piece, and the next write to the chunk is an in-place overwrite."""
    path = _pool(tmp_path)
    with Pool.open(path) as p:
        dev = p.device(1)
        dev.write(100, b"warm")  # chunk 0 in the cache
        p.create_snap(2, 1)
        used = p.nr_allocated_data_blocks
        dev.write(4096, b"b" * 4096)  # cached, shared: broken (the copy of the rest deferred)
        assert p.nr_allocated_data_blocks == used + 1 and p.stats["cow_copies"] == 0
        dev.write(8192, b"c" * 10)  # now owned: in place, nothing allocated; not on sector boundaries, so the
        assert p.nr_allocated_data_blocks == used + 1  # deferred copy completes first: all but the 4 KiB written
        assert p.stats["cow_copies"] == 1 and p.stats["cow_bytes"] == CH - 4096
        want = bytearray(pattern(CH, 1))
        want[100:104] = b"warm"
        assert p.device(2).read(0, CH) == want
        want[4096:8192] = b"b" * 4096
        want[8192:8202] = b"c" * 10
        assert dev.read(0, CH) == want
    check_pool(path)
