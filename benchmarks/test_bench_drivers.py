"""The storage-driver lab under pytest-benchmark (issue 18): container create, the 1-byte first write per file
size and the lookup at layer depth 100, for thinpool-devicemapper (64 KiB, 512 KiB), overlayfs, btrfs, vfs and
aufs-like, each on the lab's one image (quick scale).

Setup (import of the image, fresh containers for each round) stays outside the timed callable; what a write
copied is checked after timing and put into ``extra_info``. Kernel drivers need root and skip with the reason
where the kernel lacks them (never a fake). The full table, page cache and claims: ``thinpool bench --only
drivers``.

Run: python -m pytest benchmarks/test_bench_drivers.py --benchmark-only
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from thinpool_bench.lab import drivers as D
from thinpool_bench.lab import image as I
from thinpool_bench.lab import runner

KiB, GiB = 1 << 10, 1 << 30
ROUNDS = int(os.environ.get("THINPOOL_BENCH_ROUNDS", "3"))
IMG = I.build_image(quick=True)
MAKERS = {
    "thinpool-dm-64k": lambda p: D.ThinpoolDM(p, 64 * KiB, 8 * GiB, 2 * GiB),
    "thinpool-dm-512k": lambda p: D.ThinpoolDM(p, 512 * KiB, 8 * GiB, 2 * GiB),
    "overlayfs": D.Overlay,
    "btrfs": lambda p: D.Btrfs(p, 4 * GiB),
    "vfs": D.Vfs,
    "aufs-like": D.AufsLike,
}


@pytest.fixture(scope="module", params=list(MAKERS))
def lab(request, tmp_path_factory) -> Iterator[tuple[D.Driver, str, Iterator[int]]]:
    drv = MAKERS[request.param](Path(tmp_path_factory.mktemp("lab")))
    reason = drv.unavailable()
    if reason:
        pytest.skip(f"{drv.name}: {reason}")
    drv.setup()
    try:
        top = drv.import_layers("img", IMG.layers)[-1]
        yield drv, top, itertools.count()
    finally:
        drv.teardown()


def test_drivers_container_create(benchmark, lab) -> None:
    drv, top, ids = lab
    made: list[str] = []

    def setup():
        cid = f"cc{next(ids)}"
        made.append(cid)
        return (cid,), {}

    benchmark.group = "drivers: container create"
    benchmark.pedantic(lambda cid: drv.create_container(cid, top), setup=setup, rounds=ROUNDS, iterations=1)
    for cid in made:
        drv.delete_container(cid)


@pytest.mark.parametrize("size", sorted(IMG.sized_files))
def test_drivers_first_write_1_byte(benchmark, lab, size: int) -> None:
    drv, top, ids = lab
    cid = f"fw{next(ids)}"
    drv.create_container(cid, top)
    img = I.Image(IMG.layers, {size: IMG.sized_files[size]})
    out: dict[str, object] = {}

    def run():
        out.update(runner.first_writes(drv, [cid], img)[str(size)])

    benchmark.group = f"drivers: first 1-byte write, {size // KiB} KiB file"
    benchmark.pedantic(run, rounds=1, iterations=1)  # a first write happens once per container
    benchmark.extra_info.update({k: v for k, v in out.items() if k.endswith("_bytes")})
    drv.delete_container(cid)
    assert out["copied_bytes"] >= 0


def test_drivers_lookup_depth_100(benchmark, lab) -> None:
    drv, _, _ = lab
    cfg = runner.LabConfig(True, depths=(100,), nr_probes=30)
    out: dict[str, object] = {}
    benchmark.group = "drivers: depth-100 stack build + 30 cold lstats (median_us in extra_info)"
    benchmark.pedantic(lambda: out.update(runner.lookup_depth(drv, cfg)["100"]), rounds=1, iterations=1)
    benchmark.extra_info.update(out)
