"""DataStore.pwrite writes a large write in pieces that end on multiples of PIECE_BYTES (64 KiB), as dm-thin
splits a bio at block boundaries, so the host page cache never makes a folio larger than a chunk out of one
write (a 4 KiB overwrite into a 1 MiB folio costs ~3x one into a 64 KiB folio on ext4 with large folios); a
short write is retried, so a full disk is HostNoSpace; the accounting (bytes_written, dirty) is per call."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from conftest import need_root_feature, need_tool

from thinpool.errors import HostNoSpace, StoreIOError
from thinpool.io import data_store as ds_mod
from thinpool.io.data_store import PIECE_BYTES, DataStore
from thinpool.pool import Pool

MiB = 1 << 20
P = PIECE_BYTES


def _store(tmp_path: Path, size: int = 8 * MiB) -> DataStore:
    path = tmp_path / "data"
    path.write_bytes(b"")
    os.truncate(path, size)
    return DataStore(str(path), 64 * 1024)


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    real = os.pwrite

    def rec(fd: int, data: bytes | memoryview, off: int) -> int:
        calls.append((off, len(data)))
        return real(fd, data, off)

    monkeypatch.setattr(ds_mod, "_pwrite", rec)
    return calls


def test_piece_is_the_smallest_chunk() -> None:
    assert PIECE_BYTES == 64 * 1024


@pytest.mark.parametrize(("offset", "length"), [(0, MiB), (100, 200_000), (P - 1, P + 2), (3 * P, 4 * P),
                                                (5, P), (7 * P - 10, 10), (P, P + 1)])
def test_write_is_one_pwrite_per_piece(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offset: int,
                                       length: int) -> None:
    ds = _store(tmp_path)
    data = os.urandom(length)
    calls = _recording(monkeypatch)
    ds.pwrite(offset, data)
    if length <= P:  # up to one piece: one pwrite, wherever it lies
        assert calls == [(offset, length)]
    else:
        edges = [offset, *range(offset - offset % P + P, offset + length, P), offset + length]
        assert calls == [(a, b - a) for a, b in zip(edges, edges[1:])]
        assert all((a + n) % P == 0 for a, n in calls[:-1])
    assert ds.pread(offset, length) == data
    assert ds.bytes_written == length and ds.dirty == [(offset, offset + length)]
    ds.close()


def test_buffers_of_any_kind_are_written_whole(tmp_path: Path) -> None:
    ds = _store(tmp_path)
    data = os.urandom(3 * P + 17)
    ds.pwrite(11, bytearray(data))
    ds.pwrite(4 * MiB + 3, memoryview(data)[5:])
    assert ds.pread(11, len(data)) == data and ds.pread(4 * MiB + 3, len(data) - 5) == data[5:]
    assert ds.bytes_written == 2 * len(data) - 5
    ds.close()


def test_short_write_is_retried_for_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _store(tmp_path)
    real = os.pwrite
    calls: list[tuple[int, int]] = []

    def half(fd: int, data: bytes | memoryview, off: int) -> int:  # every call writes at most half (>= 1 byte)
        calls.append((off, len(data)))
        return real(fd, memoryview(data)[:max(1, len(data) // 2)], off)

    monkeypatch.setattr(ds_mod, "_pwrite", half)
    data = os.urandom(2 * P + 1000)
    ds.pwrite(300, data)
    assert ds.pread(300, len(data)) == data and ds.bytes_written == len(data)
    assert all(a + n <= 300 + len(data) for a, n in calls)
    small = os.urandom(4096)
    ds.pwrite(6 * MiB, small)
    assert ds.pread(6 * MiB, 4096) == small and ds.bytes_written == len(data) + 4096
    ds.close()


@pytest.mark.parametrize("at", [0, 2, 5])
def test_full_disk_in_a_piece_is_host_no_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """ENOSPC at the ``at``-th pwrite (a piece, or the retry of a short one) is HostNoSpace; nothing is counted
    as written and the range stays dirty (the pool then knows committed chunks may have changed)."""
    ds = _store(tmp_path)
    real = os.pwrite
    n_calls = [0]

    def failing(fd: int, data: bytes | memoryview, off: int) -> int:
        n_calls[0] += 1
        if n_calls[0] == at + 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        if n_calls[0] == at:  # the call before the failure writes only part: the retry meets ENOSPC
            return real(fd, memoryview(data)[:100], off)
        return real(fd, data, off)

    monkeypatch.setattr(ds_mod, "_pwrite", failing)
    with pytest.raises(HostNoSpace) as ei:
        ds.pwrite(0, os.urandom(6 * P))
    assert ei.value.exit_code == 3
    assert ds.bytes_written == 0 and ds.dirty == [(0, 6 * P)]
    ds.close()


def test_no_progress_is_a_short_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _store(tmp_path)
    monkeypatch.setattr(ds_mod, "_pwrite", lambda fd, data, off: 0)
    for n in (4096, 3 * P):
        with pytest.raises(StoreIOError) as ei:
            ds.pwrite(0, bytes(n))
        assert not isinstance(ei.value, HostNoSpace) and ei.value.reason == "short write"
    assert ds.bytes_written == 0
    ds.close()


def test_a_real_full_filesystem_ends_as_host_no_space(tmp_path: Path) -> None:
    """A 1 MiB tmpfs under a 4 MiB sparse data file: a 2 MiB write (32 pieces) fills it part way; the kernel's
    short count is retried and its ENOSPC is HostNoSpace (exit 3), nothing counted as written."""
    need_tool("mount", "umount")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    need_root_feature(f"mounting a tmpfs ({r.stderr.strip()})", r.returncode == 0)
    try:
        path = mnt / "data"
        path.write_bytes(b"")
        os.truncate(path, 4 * MiB)
        ds = DataStore(str(path), 64 * 1024)
        ds.pwrite(0, b"x" * 4096)
        with pytest.raises(HostNoSpace) as ei:
            ds.pwrite(MiB, os.urandom(2 * MiB))
        assert ei.value.exit_code == 3 and ds.bytes_written == 4096
        assert ds.pread(0, 4096) == b"x" * 4096
        ds.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_pool_writes_go_to_the_file_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a pool: a 1 MiB provision (16 new consecutive chunks, one coalesced store write) and a 1 MiB
    overwrite across chunks reach the file as 64 KiB pwrites; every byte reads back, and reopened."""
    path = tmp_path / "pool"
    a, b = os.urandom(MiB), os.urandom(MiB)
    with Pool.create(path, data_size=8 * MiB, chunk_size=64 * 1024) as p:
        dev = p.create_thin(1, 4 * MiB)
        calls = _recording(monkeypatch)
        dev.write(MiB, a)
        provision = [c for c in calls]
        del calls[:]
        dev.write(MiB + 4096, b[:MiB - 8192])
        overwrite = [c for c in calls]
        monkeypatch.undo()
        assert len(provision) == 16 and all(n == P and off % P == 0 for off, n in provision)
        assert len(overwrite) == 16 and all(n <= P for _, n in overwrite)
        assert sum(n for _, n in overwrite) == MiB - 8192
        p.commit()
    want = a[:4096] + b[:MiB - 8192] + a[-4096:]
    with Pool.open(path, readonly=True) as p:
        assert p.device(1).read(MiB, MiB) == want
        assert p.device(1).read(0, MiB) == bytes(MiB)
