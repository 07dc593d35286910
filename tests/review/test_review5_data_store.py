"""Review (review5): the data store's split writes (1687032): a write longer than 64 KiB goes to the file as one
pwrite per piece between multiples of 64 KiB, a short write is retried for the rest, a full disk is HostNoSpace.

- A hypothesis model: writes of any offset and length (up to 300 KiB, bytes / bytearray / memoryview slices) land
  byte for byte, through pwrites that tile the range without crossing a 64 KiB boundary; with a ``pwrite`` that
  takes only part of what it is given (as a filesystem may), the same bytes land.
- A pwrite that makes no progress is a typed StoreIOError; one that fails with ENOSPC after a short write is
  HostNoSpace; the dirty ranges still cover what may have been written.
- A real short write: RLIMIT_FSIZE cuts a write that crosses it (the kernel writes up to the limit), the retry
  fails with EFBIG: a StoreIOError, the bytes before the limit written.
- A real full filesystem (a 4 MiB tmpfs under a pool whose data device is 64 MiB): 1 MiB writes provisioning new
  chunks fail with HostNoSpace (``thinpool thin write``: exit 3, one line); the failed write maps nothing, the
  committed data reads back, both thin_checks accept the metadata.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import need_root_feature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import assert_thin_check

import thinpool.io.data_store as ds_mod
from thinpool.errors import HostNoSpace, NoDataSpace, StoreIOError
from thinpool.io.data_store import PIECE_BYTES, DataStore
from thinpool.pool import Pool

FILE_BYTES = 1 << 20


def _store(tmp_path: Path) -> DataStore:
    p = tmp_path / "data"
    with open(p, "wb") as f:
        f.truncate(FILE_BYTES)
    return DataStore(str(p), 64 * 1024)


def _short_first(keep: int, *, then: Callable[[], int]) -> Callable[[int, object, int], int]:
    """A pwrite whose first call writes only ``keep`` bytes of its buffer; every later call returns ``then()``."""
    real = os.pwrite
    calls = [0]

    def pwrite(fd: int, buf: object, pos: int) -> int:
        calls[0] += 1
        if calls[0] == 1:
            return real(fd, memoryview(buf).cast("B")[:keep], pos)  # type: ignore[arg-type]
        return then()

    return pwrite


def _enospc() -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


writes = st.lists(
    st.tuples(st.integers(0, FILE_BYTES - 1), st.integers(1, 300 * 1024), st.sampled_from(["bytes", "bytearray",
                                                                                          "view"])),
    min_size=1, max_size=6)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ws=writes, short=st.sampled_from([None, 1, 511, 4096, 65535]), seed=st.integers(0, 255))
def test_split_writes_land_byte_for_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ws: list, short: int | None,
                                         seed: int) -> None:
    store = _store(tmp_path)
    calls: list[tuple[int, int]] = []
    real = os.pwrite

    def pwrite(fd: int, buf: object, pos: int) -> int:
        n = len(memoryview(buf).cast("B"))  # type: ignore[arg-type]
        calls.append((pos, n))
        if short is not None and n > short:  # a filesystem that takes only part of a write
            return real(fd, memoryview(buf).cast("B")[:short], pos)  # type: ignore[arg-type]
        return real(fd, buf, pos)  # type: ignore[arg-type]

    monkeypatch.setattr(ds_mod, "_pwrite", pwrite)
    model = bytearray(FILE_BYTES)
    try:
        for i, (off, n, kind) in enumerate(ws):
            n = min(n, FILE_BYTES - off)
            payload = bytes((seed + i + j // 512) & 0xFF for j in range(0, n, 512)).ljust(1, b"\0")
            raw = (payload * (n // len(payload) + 1))[:n]
            data: bytes | bytearray | memoryview
            if kind == "bytes":
                data = raw
            elif kind == "bytearray":
                data = bytearray(raw)
            else:
                data = memoryview(b"\xaa" + raw + b"\xbb")[1:n + 1]
            calls.clear()
            store.pwrite(off, data)
            model[off:off + n] = raw
            # the pwrites tile [off, off + n); with more than a piece, none crosses a multiple of PIECE_BYTES
            pos = off
            for p, k in calls:
                assert p == pos or short is not None
                if n > PIECE_BYTES:
                    assert p // PIECE_BYTES == (p + k - 1) // PIECE_BYTES, (p, k)
                pos = p + min(k, short or k)
            assert pos == off + n
        assert store.pread(0, FILE_BYTES) == bytes(model)
        for off, n, _ in ws:
            n = min(n, FILE_BYTES - off)
            assert any(a <= off and off + n <= b for a, b in store.dirty), (off, n, store.dirty)
    finally:
        store.close()


@pytest.mark.parametrize("size", [4096, 200 * 1024])
def test_a_pwrite_that_makes_no_progress_is_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          size: int) -> None:
    store = _store(tmp_path)
    monkeypatch.setattr(ds_mod, "_pwrite", _short_first(100, then=lambda: 0))
    with pytest.raises(StoreIOError) as ei:
        store.pwrite(8192, b"z" * size)
    assert not isinstance(ei.value, HostNoSpace)
    assert any(a <= 8192 and 8192 + size <= b for a, b in store.dirty)  # what may have been written is dirty
    store.close()


@pytest.mark.parametrize("size", [4096, 200 * 1024])
def test_enospc_after_a_short_write_is_host_no_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     size: int) -> None:
    store = _store(tmp_path)
    monkeypatch.setattr(ds_mod, "_pwrite", _short_first(1000, then=_enospc))
    with pytest.raises(HostNoSpace):
        store.pwrite(0, b"q" * size)
    assert store.pread(0, 1000) == b"q" * 1000
    store.close()


def test_a_real_short_write_under_rlimit_fsize(tmp_path: Path) -> None:
    """The kernel writes up to RLIMIT_FSIZE and returns the short count; the retry fails with EFBIG."""
    p = tmp_path / "data"
    with open(p, "wb") as f:
        f.truncate(4 << 20)
    limit = (1 << 20) + 12345
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from thinpool.errors import HostNoSpace, StoreIOError
        from thinpool.io.data_store import DataStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        s = DataStore({str(p)!r}, 65536)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        try:
            s.pwrite({limit} - 100000, b"w" * 300000)
        except HostNoSpace:
            print("HostNoSpace")
        except StoreIOError as e:
            print("StoreIOError", e.reason)
        else:
            print("no error")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"StoreIOError {os.strerror(errno.EFBIG)}", r.stdout + r.stderr
    with open(p, "rb") as f:
        f.seek(limit - 100000)
        assert f.read(100000) == b"w" * 100000
        assert f.read(4096) == bytes(4096)


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                              capture_output=True).returncode == 0
    need_root_feature("mounting a tmpfs (root)", ok)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.external
@pytest.mark.root
def test_a_full_host_filesystem_is_host_no_space_and_changes_nothing(small_fs: Path, tmp_path: Path) -> None:
    ch = 64 * 1024
    pool_dir = small_fs / "pool"
    pool = Pool.create(pool_dir, data_size=64 << 20, chunk_size=ch, metadata_size=1 << 20)
    dev = pool.create_thin(1, 60 << 20)
    dev.write(0, b"\x01" * (1 << 20))
    pool.commit()
    failed_at = None
    for i in range(1, 60):
        try:
            dev.write(i * (1 << 20), bytes([i + 1]) * (1 << 20))
        except HostNoSpace:
            failed_at = i
            break
        except NoDataSpace:
            pytest.fail("the pool's own space ran out first")
    assert failed_at is not None
    # the failed write mapped nothing: its range reads as zeros (unprovisioned), the ones before it as written
    assert dev.read(failed_at * (1 << 20), 1 << 20) == bytes(1 << 20)
    k, _, _ = pool.md.mappings(1, failed_at * 16, (failed_at + 1) * 16)
    assert len(k) == 0
    for i in range(failed_at):
        assert dev.read(i * (1 << 20), 4096) == bytes([i + 1]) * 4096
    pool.abort()
    pool.close()
    assert_thin_check(str(pool_dir / "metadata"))
    # the command line: exit 3, one line, the committed data intact
    src = tmp_path / "src"
    src.write_bytes(b"\x07" * (8 << 20))
    r = subprocess.run([str(Path(sys.executable).with_name("thinpool")), "thin", "write", "1", str(src),
                        "--offset", "16M", "--pool", str(pool_dir)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, (r.returncode, r.stderr)
    # the error's one line last (before it, the pool's open may log that the full disk kept it from compacting
    # its journal: review5's report)
    assert r.stderr.splitlines()[-1].startswith("thinpool: error: no space left on the host filesystem"), r.stderr
    assert "Traceback" not in r.stderr
    with Pool.open(pool_dir, readonly=True) as p:
        d = p.device(1)
        assert d.read(0, 1 << 20) == b"\x01" * (1 << 20)
        assert d.read(16 << 20, 1 << 20) == bytes(1 << 20)
    assert_thin_check(str(pool_dir / "metadata"))
