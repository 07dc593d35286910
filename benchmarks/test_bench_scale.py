"""Metadata tools at scale, in process (pytest-benchmark): check, dump, ls (EXCLUSIVE/SHARED) and delta on a
device of N mappings in random data order and a snapshot of it with 1 % rewritten (the pool of
``thinpool bench --only scale``). Whole-process numbers next to the C++ tools: ``thinpool bench --only scale``.

Run: python -m pytest benchmarks/test_bench_scale.py --benchmark-only -s
THINPOOL_BENCH_SCALE_MAPPINGS (default 1000000, comma-separated) sets N.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest

from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.check import check_metadata
from thinpool.metadata.dump import XmlWriter, dump
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.tools.delta import delta_batches
from thinpool.tools.ls import ls_rows
from thinpool_bench.scale import build_mapping_pool

SIZES = [int(x) for x in os.environ.get("THINPOOL_BENCH_SCALE_MAPPINGS", "1000000").split(",")]


@pytest.fixture(scope="module", params=SIZES, ids=[f"{n}-mappings" for n in SIZES])
def pool(request: Any, tmp_path_factory: Any) -> tuple[int, Path]:
    path = tmp_path_factory.mktemp("scale") / "pool"
    build_mapping_pool(path, request.param)
    return request.param, path / "metadata"


def _open(md: Path) -> PoolMetadata:
    return PoolMetadata.open(FileBlockStore(md, readonly=True), readonly=True, space_maps=False)


def test_check(benchmark: Any, pool: tuple[int, Path]) -> None:
    n, md = pool
    report = benchmark.pedantic(lambda: check_metadata(FileBlockStore(md, readonly=True)), rounds=3, iterations=1)
    assert report.ok and report.mappings == 2 * n
    benchmark.extra_info["mappings"] = n


def test_dump(benchmark: Any, pool: tuple[int, Path]) -> None:
    n, md = pool

    def run() -> int:
        out = io.StringIO()
        dump(_open(md), XmlWriter(out))
        return len(out.getvalue())

    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["mappings"] = n


def test_ls_exclusive_shared(benchmark: Any, pool: tuple[int, Path]) -> None:
    n, md = pool
    rows = benchmark.pedantic(lambda: ls_rows(_open(md), ["DEV", "EXCLUSIVE", "SHARED"]), rounds=3, iterations=1)
    assert sum(r["EXCLUSIVE_BLOCKS"] for r in rows) == 2 * max(n // 100, 1)  # the rewritten blocks, both sides
    benchmark.extra_info["mappings"] = n


def test_delta(benchmark: Any, pool: tuple[int, Path]) -> None:
    n, md = pool
    runs = benchmark.pedantic(lambda: sum(len(b) for b in delta_batches(_open(md), 1, 2)), rounds=3, iterations=1)
    assert runs > 0
    benchmark.extra_info["mappings"] = n
