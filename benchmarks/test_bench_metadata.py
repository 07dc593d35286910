"""Metadata engine benchmarks (issue 2): the insert path (1M sequential and 1M random mappings, one
PoolMetadata.insert each), lookups, commit, open, and snapshot of a 1M-mapping device vs an empty one.

Run: python -m pytest benchmarks/test_bench_metadata.py --benchmark-only -s
(not collected by plain `pytest`: testpaths = tests). THINPOOL_BENCH_INSERTS (default 1000000) sets the number of
mappings of the insert benchmarks. Numbers go to pytest-benchmark's table; rates and the snapshot ratio are also
printed and stored in extra_info.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pytest

from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.pool_metadata import PoolMetadata

N_INSERT = int(os.environ.get("THINPOOL_BENCH_INSERTS", "1000000"))
N_BIG = 1_000_000
META_BLOCKS = 131_072  # 512 MiB sparse metadata file: room for several copies of a 1M-mapping tree
DATA_BLOCKS = 4_000_000
_results: dict[str, float] = {}


def fresh_pool(path: Path) -> PoolMetadata:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(META_BLOCKS * 4096)
    return PoolMetadata.format(FileBlockStore(path), data_block_size=128, nr_data_blocks=DATA_BLOCKS)


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory) -> Path:
    """A committed pool: device 1 with 1M mappings (built in bulk), device 2 empty."""
    path = tmp_path_factory.mktemp("bench") / "big.bin"
    pmd = fresh_pool(path)
    keys = np.arange(N_BIG, dtype=np.uint64) * np.uint64(3)  # spread: thin blocks 0, 3, 6, ...
    data = np.random.default_rng(0).permutation(N_BIG).astype(np.uint64)
    pmd.build_device(1, keys, data, np.zeros(N_BIG, dtype=np.uint64))
    pmd.create_thin(2)
    pmd.commit()
    pmd.close()
    return path


def _report(benchmark, name: str, n: int) -> None:
    secs = benchmark.stats.stats.median
    benchmark.extra_info["ops"] = n
    benchmark.extra_info["ops_per_sec"] = round(n / secs)
    _results[name] = secs
    print(f"\n{name}: {n} ops in {secs:.3f} s = {n / secs:,.0f} ops/s")


def _insert_bench(benchmark, tmp_path: Path, keys: list[int], name: str) -> None:
    state: dict[str, PoolMetadata] = {}

    def setup():
        pmd = fresh_pool(tmp_path / "ins.bin")
        pmd.create_thin(1)
        state["pmd"] = pmd
        return (), {}

    def run():
        pmd = state["pmd"]
        ins = pmd.insert
        for i, k in enumerate(keys):
            ins(1, k, i)

    benchmark.pedantic(run, setup=setup, rounds=1, iterations=1)
    pmd = state["pmd"]
    assert pmd.get_device(1).mapped_blocks == len(keys)
    t0 = time.perf_counter()
    pmd.commit()
    benchmark.extra_info["commit_after_s"] = round(time.perf_counter() - t0, 3)
    _report(benchmark, name, len(keys))
    print(f"  commit of the {len(keys)}-mapping transaction: {benchmark.extra_info['commit_after_s']} s")


def test_insert_sequential(benchmark, tmp_path) -> None:
    _insert_bench(benchmark, tmp_path, list(range(N_INSERT)), f"insert {N_INSERT} sequential")


def test_insert_random(benchmark, tmp_path) -> None:
    keys = random.Random(1).sample(range(50 * N_INSERT), N_INSERT)
    _insert_bench(benchmark, tmp_path, keys, f"insert {N_INSERT} random")


def test_lookup_random(benchmark, big_pool) -> None:
    pmd = PoolMetadata.open(FileBlockStore(big_pool), readonly=True)
    rng = random.Random(2)
    keys = [rng.randrange(3 * N_BIG) for _ in range(100_000)]  # one in three is mapped
    lookup = pmd.lookup

    def run():
        return sum(1 for k in keys if lookup(1, k) is not None)

    hits = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert 25_000 < hits < 42_000
    _report(benchmark, "lookup (random, 1M-mapping device)", len(keys))


def test_commit_after_10k_random_inserts(benchmark, big_pool, tmp_path) -> None:
    """Commit of a transaction that remapped 10k random blocks of the 1M device (shadowed leaves, data and
    metadata space-map bitmaps and ref-count trees, two fsyncs)."""
    work = tmp_path / "c.bin"
    state: dict[str, PoolMetadata] = {}
    rng = random.Random(3)

    def setup():
        work.write_bytes(big_pool.read_bytes()) if not work.exists() else None
        pmd = state.get("pmd") or PoolMetadata.open(FileBlockStore(work))
        state["pmd"] = pmd
        for _ in range(10_000):
            pmd.insert(1, 3 * rng.randrange(N_BIG), pmd.alloc_data_block())
        return (), {}

    benchmark.pedantic(lambda: state["pmd"].commit(), setup=setup, rounds=5, iterations=1)
    _report(benchmark, "commit (10k remaps in a 1M device)", 1)


def test_open(benchmark, big_pool) -> None:
    """Open with space maps (superblock, both space maps: index, bitmaps, ref-count trees; details; top level)."""
    def run():
        pmd = PoolMetadata.open(FileBlockStore(big_pool), readonly=True)
        pmd.close()

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    _report(benchmark, "open (1M-mapping pool)", 1)


def _snap_bench(benchmark, big_pool: Path, tmp_path: Path, origin: int, name: str) -> None:
    work = tmp_path / "s.bin"
    work.write_bytes(big_pool.read_bytes())
    pmd = PoolMetadata.open(FileBlockStore(work))
    ids = iter(range(1000, 100_000))
    before = int(np.count_nonzero(pmd.tm.sm.counts))

    def setup():
        return (next(ids),), {}

    benchmark.pedantic(lambda dev: pmd.create_snap(dev, origin), setup=setup, rounds=200, iterations=1,
                       warmup_rounds=5)
    # O(1) structurally: 205 snapshots added 205 top-level entries (a few new leaves) and no mapping nodes
    new_blocks = int(np.count_nonzero(pmd.tm.sm.counts)) - before
    assert new_blocks < 10, new_blocks
    assert pmd.get_device(1004).mapped_blocks == (N_BIG if origin == 1 else 0)
    _report(benchmark, name, 1)
    benchmark.extra_info["new_metadata_blocks"] = new_blocks


def test_snapshot_empty_device(benchmark, big_pool, tmp_path) -> None:
    _snap_bench(benchmark, big_pool, tmp_path, 2, "snapshot of an empty device")


def test_snapshot_1m_device(benchmark, big_pool, tmp_path) -> None:
    _snap_bench(benchmark, big_pool, tmp_path, 1, "snapshot of a 1M-mapping device")
    empty = _results.get("snapshot of an empty device")
    if empty:
        ratio = _results["snapshot of a 1M-mapping device"] / empty
        benchmark.extra_info["ratio_vs_empty"] = round(ratio, 3)
        print(f"  snapshot 1M / snapshot empty (medians): {ratio:.2f}x")


def _snap_commit_bench(benchmark, big_pool: Path, tmp_path: Path, origin: int, name: str) -> None:
    """create_snap followed by commit (the durable operation: details + top-level leaves, space maps, 2 fsyncs)."""
    work = tmp_path / "sc.bin"
    work.write_bytes(big_pool.read_bytes())
    pmd = PoolMetadata.open(FileBlockStore(work))
    ids = iter(range(1000, 100_000))

    def run():
        pmd.create_snap(next(ids), origin)
        pmd.commit()

    benchmark.pedantic(run, rounds=40, iterations=1, warmup_rounds=3)
    _report(benchmark, name, 1)


def test_snapshot_commit_empty_device(benchmark, big_pool, tmp_path) -> None:
    _snap_commit_bench(benchmark, big_pool, tmp_path, 2, "snapshot+commit of an empty device")


def test_snapshot_commit_1m_device(benchmark, big_pool, tmp_path) -> None:
    _snap_commit_bench(benchmark, big_pool, tmp_path, 1, "snapshot+commit of a 1M-mapping device")
    empty = _results.get("snapshot+commit of an empty device")
    if empty:
        ratio = _results["snapshot+commit of a 1M-mapping device"] / empty
        benchmark.extra_info["ratio_vs_empty"] = round(ratio, 3)
        print(f"  snapshot+commit 1M / empty (medians): {ratio:.2f}x")


# --- scale (#13): the same work on a 1 GiB, 1 TiB and 8 TiB pool ------------------------------------------------
SCALE_SIZES = {"1GiB": 1 << 30, "1TiB": 1 << 40, "8TiB": 8 << 40}


@pytest.fixture(scope="module", params=list(SCALE_SIZES))
def scale_pool(request, tmp_path_factory) -> tuple[str, Path]:
    """An empty pool (64 KiB chunks) of each size on sparse files, with one committed thin device."""
    from thinpool.pool import Pool

    path = tmp_path_factory.mktemp("scale") / request.param
    with Pool.create(path, data_size=SCALE_SIZES[request.param], chunk_size=64 * 1024) as pool:
        pool.create_thin(1, 1 << 30)
    return request.param, path


def test_scale_open_write_commit(benchmark, scale_pool) -> None:
    """Open, one 4 KiB provisioning write, commit, close: should not grow with the pool size."""
    from thinpool.pool import Pool

    name, path = scale_pool
    offsets = iter(range(0, 1 << 30, 64 * 1024))

    def once() -> None:
        with Pool.open(path) as pool:
            pool.device(1).write(next(offsets), b"x" * 4096)
            pool.commit()

    benchmark.group = "scale open+write+commit"
    benchmark.name = f"test_scale_open_write_commit[{name}]"
    benchmark.pedantic(once, rounds=5, iterations=1)


def test_scale_readonly_open_read(benchmark, scale_pool) -> None:
    from thinpool.pool import Pool

    name, path = scale_pool

    def once() -> None:
        with Pool.open(path, readonly=True) as pool:
            pool.device(1).read(0, 4096)
            assert pool.md.data_sm.pages_loaded == 0

    benchmark.group = "scale read-only open+read"
    benchmark.pedantic(once, rounds=5, iterations=1)


def test_scale_check(benchmark, scale_pool) -> None:
    from thinpool.metadata.check import check_metadata

    name, path = scale_pool

    def once() -> None:
        store = FileBlockStore(path / "metadata", readonly=True)
        assert check_metadata(store).ok
        store.close()

    benchmark.group = "scale check"
    benchmark.pedantic(once, rounds=2, iterations=1)
