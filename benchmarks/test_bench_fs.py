"""ext2 file system throughput: 10,000 small files and one 256 MiB file, beside the raw device in the same run.

For each device kind (``memory``: MemoryDevice, ``file``: FileDevice on a sparse temp file, ``thin``: a thin device
of a fresh pool with 64 KiB chunks) the suite times:

- writing 10,000 small files (1-4 KiB, in 100 directories) and flushing; reading them all back after a fresh mount;
- writing one 256 MiB file in 1 MiB writes and flushing; reading it back in 1 MiB reads;
- the raw device: 256 MiB written / read sequentially in 1 MiB requests (the ceiling for the big file).

Setup (mkfs, pool creation, writing what a read test reads) stays outside the timed callable; results are checked
after timing. files/s and MB/s go into pytest-benchmark's ``extra_info`` and a summary table printed at the end.

Run: python -m pytest benchmarks/test_bench_fs.py --benchmark-only   (not collected by plain ``pytest``)
Environment: THINPOOL_BENCH_ROUNDS (default 3).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from thinpool.fs import Filesystem
from thinpool.io.device import FileDevice, MemoryDevice

MiB = 2**20
DEVICE_SIZE = 512 * MiB
NR_FILES = 10_000
NR_DIRS = 100
BIG = 256 * MiB
CHUNK = MiB
ROUNDS = int(os.environ.get("THINPOOL_BENCH_ROUNDS", "3"))
KINDS = ["memory", "file", "thin"]

RESULTS: dict[tuple[str, str], str] = {}
_rng = random.Random(7)
SMALL = [_rng.randbytes(1024 + _rng.randrange(3072)) for _ in range(NR_FILES)]
BIG_CHUNK = _rng.randbytes(CHUNK)


def _piece(i: int) -> bytes:
    return i.to_bytes(4, "little") + BIG_CHUNK[4:]


class DeviceFactory:
    """Fresh devices of one kind; everything made is cleaned up at the end."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.tmp = tempfile.mkdtemp(prefix="benchfs")
        self._closers: list[Callable[[], None]] = []
        self._n = 0

    def new(self) -> Any:
        self._n += 1
        if self.kind == "memory":
            return MemoryDevice(DEVICE_SIZE)
        if self.kind == "file":
            path = os.path.join(self.tmp, f"img{self._n}")
            with open(path, "wb") as f:
                f.truncate(DEVICE_SIZE)
            dev = FileDevice(path)
            self._closers.append(dev.close)
            return dev
        from thinpool.pool import Pool
        pool = Pool.create(os.path.join(self.tmp, f"pool{self._n}"), data_size=DEVICE_SIZE + 128 * MiB,
                           chunk_size=64 * 1024)
        self._closers.append(pool.close)
        pool.create_thin(1, DEVICE_SIZE)
        return pool.device(1)

    def close(self) -> None:
        for c in reversed(self._closers):
            c()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(params=KINDS)
def factory(request) -> Iterator[DeviceFactory]:
    if request.param == "thin":
        pytest.importorskip("thinpool.pool")
    f = DeviceFactory(request.param)
    yield f
    f.close()


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    if not RESULTS:
        return
    lines = ["", "ext2 on thinpool devices (mean of rounds)",
             f"{'workload':28s}" + "".join(f"{k:>16s}" for k in KINDS)]
    for w in sorted({w for w, _ in RESULTS}):
        lines.append(f"{w:28s}" + "".join(f"{RESULTS.get((w, k), '-'):>16s}" for k in KINDS))
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print("\n".join(lines), flush=True)
    else:
        print("\n".join(lines))


def _record(benchmark, workload: str, kind: str, amount: float, unit: str) -> None:
    mean = benchmark.stats.stats.mean
    rate = amount / mean
    benchmark.extra_info[unit] = round(rate, 1)
    RESULTS[(workload, kind)] = f"{rate:,.0f} {unit}"


def _write_small(fs: Filesystem) -> None:
    for d in range(NR_DIRS):
        fs.mkdir(f"/d{d:03d}")
    for i, data in enumerate(SMALL):
        fs.write_file(f"/d{i % NR_DIRS:03d}/file{i:05d}", data)
    fs.flush()


def _read_small(dev: Any) -> list[bytes]:
    fs = Filesystem.mount(dev)
    return [fs.read_file(f"/d{i % NR_DIRS:03d}/file{i:05d}") for i in range(NR_FILES)]


def _write_big(fs: Filesystem) -> None:
    with fs.open("/big.bin", "wb") as f:
        for i in range(BIG // CHUNK):
            f.write(_piece(i))
    fs.flush()


def _read_big(dev: Any) -> int:
    fs = Filesystem.mount(dev)
    bad = 0
    with fs.open("/big.bin", "rb") as f:
        for i in range(BIG // CHUNK):
            if f.read(CHUNK) != _piece(i):
                bad += 1
    return bad


@pytest.mark.benchmark(group="fs-small-files")
def test_fs_write_10k_small_files(benchmark, factory):
    made: list[Any] = []

    def setup():
        dev = factory.new()
        made.append(dev)
        return (Filesystem.mkfs(dev),), {}

    benchmark.pedantic(_write_small, setup=setup, rounds=ROUNDS, iterations=1)
    _record(benchmark, "write 10k small files", factory.kind, NR_FILES, "files/s")
    assert _read_small(made[-1])[::997] == SMALL[::997]


@pytest.mark.benchmark(group="fs-small-files")
def test_fs_read_10k_small_files(benchmark, factory):
    dev = factory.new()
    _write_small(Filesystem.mkfs(dev))
    got = benchmark.pedantic(_read_small, args=(dev,), rounds=ROUNDS, iterations=1)
    _record(benchmark, "read 10k small files", factory.kind, NR_FILES, "files/s")
    assert got == SMALL


@pytest.mark.benchmark(group="fs-big-file")
def test_fs_write_256mib_file(benchmark, factory):
    made: list[Any] = []

    def setup():
        dev = factory.new()
        made.append(dev)
        return (Filesystem.mkfs(dev),), {}

    benchmark.pedantic(_write_big, setup=setup, rounds=ROUNDS, iterations=1)
    _record(benchmark, "write 256 MiB file", factory.kind, BIG / 1e6, "MB/s")
    assert _read_big(made[-1]) == 0


@pytest.mark.benchmark(group="fs-big-file")
def test_fs_read_256mib_file(benchmark, factory):
    dev = factory.new()
    _write_big(Filesystem.mkfs(dev))
    bad = benchmark.pedantic(_read_big, args=(dev,), rounds=ROUNDS, iterations=1)
    _record(benchmark, "read 256 MiB file", factory.kind, BIG / 1e6, "MB/s")
    assert bad == 0


def _raw_write(dev: Any) -> None:
    for i in range(BIG // CHUNK):
        dev.write(i * CHUNK, _piece(i))
    dev.flush()


def _raw_read(dev: Any) -> int:
    return sum(dev.read(i * CHUNK, CHUNK) != _piece(i) for i in range(BIG // CHUNK))


@pytest.mark.benchmark(group="fs-big-file")
def test_raw_device_write_256mib(benchmark, factory):
    made: list[Any] = []

    def setup():
        dev = factory.new()
        made.append(dev)
        return (dev,), {}

    benchmark.pedantic(_raw_write, setup=setup, rounds=ROUNDS, iterations=1)
    _record(benchmark, "raw device write 256 MiB", factory.kind, BIG / 1e6, "MB/s")
    assert _raw_read(made[-1]) == 0


@pytest.mark.benchmark(group="fs-big-file")
def test_raw_device_read_256mib(benchmark, factory):
    dev = factory.new()
    _raw_write(dev)
    bad = benchmark.pedantic(_raw_read, args=(dev,), rounds=ROUNDS, iterations=1)
    _record(benchmark, "raw device read 256 MiB", factory.kind, BIG / 1e6, "MB/s")
    assert bad == 0
