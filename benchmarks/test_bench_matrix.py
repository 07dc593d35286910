"""Device-matrix benchmarks (issues 6 and 15): thinpool vs a raw sparse file for the same pattern, in the same run.

Run: python -m pytest benchmarks/test_bench_matrix.py --benchmark-only
Each benchmark times one phase on thinpool; the raw baseline for the same pattern is measured in the same test and
the ratio is stored in extra_info (pytest-benchmark prints it with --benchmark-columns or in the JSON).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from thinpool.pool import Pool
from thinpool_bench import suite as b

KiB, MiB = 1 << 10, 1 << 20


@pytest.mark.parametrize("io_size,pattern", [(4 * KiB, "rand"), (64 * KiB, "seq"), (1 * MiB, "seq")])
@pytest.mark.parametrize("phase", ["provision", "overwrite", "snapshot-break"])
def test_device_write_phase(benchmark, tmp_path: Path, io_size: int, pattern: str, phase: str) -> None:
    span = 8 * MiB
    ops = b.offsets(span, io_size, pattern)
    buf = os.urandom(io_size)
    state: dict[str, object] = {}
    counter = [0]

    def setup():
        counter[0] += 1
        d = tmp_path / f"p{counter[0]}"
        pool = Pool.create(d, data_size=span * 3, chunk_size=64 * KiB)
        dev = pool.create_thin(1, span)
        if phase in ("overwrite", "snapshot-break"):
            for o in ops:
                dev.write(o, buf)
            pool.commit()
        if phase == "snapshot-break":
            pool.create_snap(2, 1)
        state["pool"] = pool
        return (dev, pool), {}

    def run(dev, pool):
        for o in ops:
            dev.write(o, buf)
        pool.commit()

    benchmark.pedantic(run, setup=setup, rounds=3)
    state["pool"].close()  # type: ignore[attr-defined]
    raw = b.RawFile(tmp_path / "raw.img", span)
    if phase != "provision":
        for o in ops:
            raw.write(o, buf)
    secs, _ = b._timed(ops, lambda o: raw.write(o, buf), raw.sync)
    raw.close()
    benchmark.extra_info["raw_seconds"] = secs
    benchmark.extra_info["ratio_vs_raw"] = secs / benchmark.stats.stats.median


def test_snapshot_of_1m_mappings_vs_empty(benchmark, tmp_path: Path) -> None:
    rows = b.snapshot_series(tmp_path, (1, 1_000_000), trials=5)
    benchmark.extra_info["snapshot_rows"] = rows
    benchmark.extra_info["ratio_1m_vs_1"] = rows[1]["median_s"] / rows[0]["median_s"]
    benchmark.pedantic(lambda: None, rounds=1)


def test_cowlab_small_and_large(benchmark, tmp_path: Path) -> None:
    res = b.cow_lab(tmp_path, sizes=(4 * KiB, 16 * MiB), trials=2)
    benchmark.extra_info["cowlab"] = res
    benchmark.pedantic(lambda: None, rounds=1)
