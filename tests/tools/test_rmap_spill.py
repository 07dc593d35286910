"""rmap in bounded memory (issue 13): the external std::sort (``tools/runsort.py``) against the in-memory one and
against the reference port of libstdc++'s std::sort; rmap with a tiny budget (the spill path) against the
in-memory result, C++ thin_rmap 0.9.0 and Rust thin_rmap 1.x; its progress bar on a terminal only."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REQUIRE_EXTERNAL, need_tool, run_tool
from tools_helpers import random_pool, reopen

from thinpool.errors import InvalidArgument
from thinpool.tools.rmap import rmap_arrays, rmap_chunks, rmap_runs
from thinpool.tools.runsort import RunStore
from thinpool.tools.stdsort import std_sort, std_sort_order

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_helpers import busy_pool, fails, ok, read_pty  # noqa: E402, F401

RUST_DIR = os.environ.get("THINPOOL_RUST_TOOLS", "/opt/thin-provisioning-tools-rust/usr/sbin")


def rust_tool(name: str) -> str:
    path = os.path.join(RUST_DIR, name)
    if not os.access(path, os.X_OK):
        msg = f"Rust thin-provisioning-tools not installed: {path}"
        if REQUIRE_EXTERNAL:
            pytest.fail(msg + " (THINPOOL_REQUIRE_EXTERNAL=1: CI must not skip)")
        pytest.skip(msg)
    return path


def external_sort(keys: np.ndarray, *, budget_runs: int, chunk_runs: int, piece: int = 37) -> tuple[np.ndarray, int]:
    """The positions of ``keys`` in the order a RunStore leaves them, and how many ranges it partitioned on file."""
    n = len(keys)
    with RunStore(budget_bytes=budget_runs * 32, chunk_runs=chunk_runs) as rs:
        for i in range(0, n, piece):
            sl = slice(i, i + piece)
            rs.append((keys[sl], keys[sl] + 1, np.zeros(len(keys[sl]), dtype=np.int64), np.arange(n)[sl]))
        rs.sort()
        got = np.concatenate(list(rs.chunks())) if n else None
        return (got["thin_begin"] if got is not None else np.zeros(0, dtype=np.int64)), rs.partitions_on_file


def shapes(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    few = rng.integers(0, 3, n)
    pairs = np.repeat(rng.permutation(max(n // 2, 1)), 2)[:n]  # rmap's common case: every key twice
    rng.shuffle(pairs)
    wide = rng.integers(0, 1 << 40, n)
    return [few, pairs, wide, np.sort(pairs), np.sort(pairs)[::-1].copy(), np.full(n, 7), np.arange(n)[::-1].copy()]


@pytest.mark.parametrize("seed", range(6))
def test_the_external_sort_leaves_equal_keys_where_std_sort_leaves_them(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(200, 5000))
    for keys in shapes(rng, n):
        keys = keys.astype(np.int64)
        got, parts = external_sort(keys, budget_runs=64, chunk_runs=int(rng.integers(1, 60)))
        assert parts > 0  # the ranges above the budget really were partitioned on the file
        assert np.array_equal(got, std_sort_order(keys))


def test_the_external_sort_equals_the_reference_port_of_std_sort() -> None:
    rng = random.Random(3)
    for n in (0, 1, 16, 17, 65, 300, 2000):
        items = [[rng.randrange(40), i] for i in range(n)]
        ref = [list(x) for x in items]
        std_sort(ref, lambda x, y: x[0] < y[0])
        got, _ = external_sort(np.array([x[0] for x in items], dtype=np.int64), budget_runs=64, chunk_runs=5)
        assert got.tolist() == [x[1] for x in ref]


def test_memory_stays_the_budget_while_runs_are_added() -> None:
    with RunStore(budget_bytes=64 * 32, chunk_runs=16) as rs:
        for i in range(100):
            rs.append((np.arange(50) + i, np.arange(50) + i + 1, np.zeros(50), np.arange(50)))
            assert rs._pending_n <= 64  # what is held in memory, whatever has been added
        assert rs.spilled and rs.n == 5000


@pytest.mark.parametrize("order", ["cxx", "sorted"])
@pytest.mark.parametrize("seed", range(3))
def test_rmap_through_the_spill_file_equals_rmap_in_memory(seed: int, order: str) -> None:
    store, _ = random_pool(seed, nr_devices=6)
    md = reopen(store)
    regions = [(0, 2500), (900_000, 900_150)]
    want = rmap_arrays(md, regions, order=order)
    assert len(want[0]) > 64 * 4
    got = rmap_arrays(md, regions, order=order, budget_bytes=64 * 32)
    for a, b in zip(got, want):
        assert np.array_equal(a, b)
    if order == "sorted":
        rows = list(zip(*(c.tolist() for c in got)))
        assert rows == sorted(rows)
    # the library calls give the same runs, by record
    assert [(r.data_begin, r.data_end, r.dev_id, r.thin_begin) for r in rmap_runs(md, regions, order=order)] == \
        list(zip(*(c.tolist() for c in want)))


def test_rmap_chunks_are_bounded_and_progress_counts_every_mapping() -> None:
    store, md0 = random_pool(1, nr_devices=5)
    md = reopen(store)
    seen: list[int] = []
    with rmap_chunks(md, [(0, 1 << 30)], budget_bytes=64 * 32, progress=seen.append) as chunks:
        sizes = [len(c) for c in chunks]
    assert max(sizes) <= 16 and sum(sizes) == len(rmap_arrays(md, [(0, 1 << 30)])[0])
    assert sum(seen) == sum(md.get_device(d).mapped_blocks for d in md.device_ids())
    with pytest.raises(InvalidArgument):
        with rmap_chunks(md, [(0, 10)], order="random"):
            pass


@pytest.mark.external
def test_rmap_spilled_equals_cpp_and_rust_thin_rmap(tmp_path: Path) -> None:
    """A pool with shared leaves (snapshots) and many runs: the CLI with a 4 KiB budget (128 runs) gives C++
    thin_rmap's bytes by default and Rust thin_rmap's with --order sorted."""
    need_tool("thin_rmap")
    rust = rust_tool("thin_rmap")
    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.pool_metadata import PoolMetadata

    p = tmp_path / "pool"
    ok("pool", "create", p, "--size", "256M", "--chunk-size", "64k")
    store = FileBlockStore(p / "metadata")
    md = PoolMetadata.open(store)
    rng = random.Random(9)
    md.create_thin(1)
    for tb in rng.sample(range(3000), 2000):
        md.insert(1, tb, md.alloc_data_block())
    md.create_snap(2, 1)
    md.create_snap(3, 2)
    for dev in (2, 3):
        for tb in rng.sample(range(3000), 150):
            md.insert(dev, tb, md.alloc_data_block())
    md.commit()
    store.close()
    meta = str(p / "metadata")
    for regions in (["0..4000"], ["0..10", "100..1500"]):
        args = [a for r in regions for a in ("--region", r)]
        cpp = run_tool("thin_rmap", *args, meta).stdout
        assert cpp.count("\n") > 1000
        assert ok("rmap", *regions, "--memory-budget", "4k", p).stdout == cpp
        assert ok("rmap", *regions, p).stdout == cpp
        if len(regions) == 1:  # Rust thin_rmap takes one region
            assert ok("rmap", *regions, "--order", "sorted", "--memory-budget", "4k", p).stdout == \
                run_tool(rust, *args, meta).stdout


def test_rmap_json_streamed_is_the_json_of_the_runs(tmp_path: Path) -> None:
    import json

    store, _ = random_pool(4, nr_devices=4)
    meta = tmp_path / "metadata"
    meta.write_bytes(b"".join(store.read_block(b) for b in range(store.nr_blocks)))
    md = reopen(store)
    want = [{"data_begin": a, "data_end": b, "dev_id": d, "thin_begin": t, "thin_end": t + (b - a)}
            for a, b, d, t in zip(*(c.tolist() for c in rmap_arrays(md, [(0, 3000)])))]
    assert len(want) > 200
    out = ok("rmap", "0..3000", meta, "--json", "--memory-budget", "2k").stdout
    assert out == json.dumps(want, indent=2) + "\n"
    assert ok("rmap", "5000000..5000001", meta, "--json").stdout == "[]\n"


def test_rmap_memory_budget_errors(busy_pool: Path) -> None:
    assert "invalid size" in fails(2, "rmap", "0..10", "--memory-budget", "lots", busy_pool).stderr


def _on_pty(args: list[str], env: dict[str, str]) -> str:
    import pty
    import subprocess

    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", "from thinpool_cli.main import main; main()", *args],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    out = read_pty(master, 30)
    p.wait(timeout=60)
    os.close(master)
    assert p.returncode == 0, out
    return out.decode(errors="replace")


def test_rmap_progress_shows_on_a_terminal_only(busy_pool: Path) -> None:
    env = dict(os.environ, THINPOOL_PROGRESS_MIN_MAPPINGS="1", COLUMNS="100", TERM="xterm")
    assert "searching mappings" in _on_pty(["rmap", "0..100", str(busy_pool)], env)
    r = ok("rmap", "0..100", busy_pool, env={"THINPOOL_PROGRESS_MIN_MAPPINGS": "1"})
    assert r.stderr == ""
