"""Read path against a raw sparse file (os.pread / os.preadv), same offsets, same run.

Cells: 4 KiB random and 1 MiB sequential reads of a device's own chunks, through a snapshot, through the newest of
a chain of 8 snapshots (each link overwrote a few chunks, so the mappings of the newest are physically scattered),
and of unprovisioned space; each with ``read`` (returns bytes, raw: os.pread) and ``readinto`` (into a caller's
buffer, raw: os.preadv). The raw file holds the same bytes at the same device offsets (holes where the device has
none). Ratio = raw p50 / thin p50 (>= 1 means as fast as the file). Printed, never asserted; the bytes are.

Run: python -m pytest benchmarks/test_bench_read.py -s   (THINPOOL_BENCH_MIB sets the written span, default 64)
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import tempfile
import time

import pytest

from thinpool.pool import Pool

CH = 64 << 10
MIB = 1 << 20
SPAN = int(os.environ.get("THINPOOL_BENCH_MIB", "64")) * MIB  # written part; the device is twice as large
REPS = {4096: 4000, MIB: 200}


def _p50_us(fn, offsets) -> float:
    ts = []
    clock = time.perf_counter_ns
    for off in offsets:
        t = clock()
        fn(off)
        ts.append(clock() - t)
    return statistics.median(ts) / 1000


@pytest.fixture(scope="module")
def setup():
    d = tempfile.mkdtemp(prefix="tp-bench-read-")
    rng = random.Random(15)
    try:
        pool = Pool.create(os.path.join(d, "pool"), data_size=4 * SPAN)
        pool.create_thin(1, 2 * SPAN)
        content = bytearray(rng.randbytes(SPAN))
        pool.device(1).write(0, content)
        pool.create_snap(2, 1)
        prev = 1
        chain = bytearray(content)
        for link in range(8):  # a chain of 8: each link overwrites a few chunks, then is snapshotted
            dev_id = 10 + link
            pool.create_snap(dev_id, prev)
            for _ in range(max(1, SPAN // CH // 16)):
                off = rng.randrange(0, SPAN, CH)
                piece = rng.randbytes(4096)
                pool.device(dev_id).write(off, piece)
                chain[off:off + 4096] = piece
            prev = dev_id
        pool.commit()
        raws = {}
        for name, data in (("base", content), ("chain", chain)):
            path = os.path.join(d, f"raw-{name}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fd, 2 * SPAN)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            raws[name] = fd
        yield pool, {"own": (1, "base", 0), "snapshot": (2, "base", 0), "chain-of-8": (prev, "chain", 0),
                     "unprovisioned": (1, "base", SPAN)}, raws
        pool.close()
        for fd in raws.values():
            os.close(fd)
    finally:
        shutil.rmtree(d, ignore_errors=True)


ROWS: list[str] = []


@pytest.mark.parametrize("io_size", [4096, MIB])
@pytest.mark.parametrize("cell", ["own", "snapshot", "chain-of-8", "unprovisioned"])
def test_read_cell(setup, cell, io_size):
    pool, cells, raws = setup
    dev_id, raw_name, base = cells[cell]
    dev = pool.device(dev_id)
    fd = raws[raw_name]
    rng = random.Random(io_size)
    n = REPS[io_size]
    if io_size == 4096:
        offsets = [base + rng.randrange(0, SPAN // 4096) * 4096 for _ in range(n)]
    else:
        offsets = [base + (i * MIB) % SPAN for i in range(n)]
    for off in offsets[:20]:  # the bytes are the file's
        assert dev.read(off, io_size) == os.pread(fd, io_size, off)
    buf = bytearray(io_size)
    rbuf = bytearray(io_size)
    results = {}
    for _ in range(3):  # interleaved rounds, best p50 of each (a shared machine is noisy)
        for key, fn in (("raw", lambda o: os.pread(fd, io_size, o)), ("read", lambda o: dev.read(o, io_size)),
                        ("raw_into", lambda o: os.preadv(fd, [rbuf], o)),
                        ("readinto", lambda o: dev.readinto(o, buf))):
            p = _p50_us(fn, offsets)
            results[key] = min(p, results.get(key, p))
    row = (f"| {cell} | {io_size // 1024} KiB | {results['read']:.1f} | {results['raw']:.1f} | "
           f"{results['raw'] / results['read']:.2f} | {results['readinto']:.1f} | {results['raw_into']:.1f} | "
           f"{results['raw_into'] / results['readinto']:.2f} |")
    ROWS.append(row)
    print()
    if len(ROWS) == 1:
        print("| cell | size | read p50 us | raw pread p50 us | ratio | readinto p50 us | raw preadv p50 us | ratio |")
        print("|---|---|---|---|---|---|---|---|")
    print(row)
