"""export-diff of a 4 GiB thin device with 1 % changed between two snapshots, next to `rbd export-diff` of the same
change on a one-node test cluster (memstore OSD).

Setup (outside the timed part): a pool with 64 KiB chunks, device ``vol`` of 4 GiB fully written (65536 mappings),
snapshot ``s1``, 1 % of the chunks (655, scattered) rewritten, snapshot ``s2``. Timed: ``export_diff(s2, from=s1)``
in process (pytest-benchmark), and the CLI in a child process whose peak RSS is read with wait4. For Ceph: an
image of 4 GiB whose snapshot s1 is empty and s2 holds the same 655 changed chunks (imported from thinpool's
stream), and ``rbd export-diff --from-snap s1 rbd/img@s2`` timed in a child process with its peak RSS. The full
export-diff of s2 (4 GiB of data) is timed once as well.

Run: python -m pytest benchmarks/test_bench_rbd.py -s   (needs ceph-mon, ceph-osd, rbd for the Ceph side)
"""

from __future__ import annotations

import io
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "rbd"))

from rbd_cluster import CephCluster, have_ceph, measure  # noqa: E402

from thinpool.pool import Pool  # noqa: E402
from thinpool.rbd import export_diff, validate_diff  # noqa: E402

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10
SIZE = 4 * GiB
CHUNK = 64 * KiB
CHANGED = (SIZE // CHUNK) // 100  # 1 % of the chunks


def _child(args: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """(seconds, peak RSS in bytes, 0) of one child process (spawned from a small launcher: Linux keeps the peak
    RSS across fork and exec, so a child of this big process would report this process's RSS)."""
    dt, rss = measure(args, env=env)
    return dt, rss, 0


@pytest.fixture(scope="module")
def setup():
    tmp = Path(tempfile.mkdtemp(prefix="tpbench-rbd", dir="/tmp"))
    pool_path = tmp / "pool"
    rnd = random.Random(19)
    piece = rnd.randbytes(4 * MiB)
    with Pool.create(pool_path, data_size=SIZE + 256 * MiB, chunk_size=CHUNK) as pool:
        d = pool.create_thin(1, SIZE, name="vol")
        for off in range(0, SIZE, 4 * MiB):
            d.write(off, piece)
        pool.commit()
        pool.create_snap(2, 1, name="s1")
        for c in sorted(rnd.sample(range(SIZE // CHUNK), CHANGED)):
            d.write(c * CHUNK, rnd.randbytes(CHUNK))
        pool.create_snap(3, 1, name="s2")
    yield tmp, pool_path
    shutil.rmtree(tmp, ignore_errors=True)


def test_bench_rbd_export_diff_4g_1pct_changed(benchmark, setup):
    tmp, pool_path = setup
    with Pool.open(pool_path, readonly=True) as pool:
        def run() -> io.BytesIO:
            buf = io.BytesIO()
            export_diff(pool, 3, buf, from_id=2)
            return buf

        buf = benchmark.pedantic(run, rounds=3, iterations=1)
        s = validate_diff(io.BytesIO(buf.getvalue()))
    assert s.header.from_snap == "s1" and s.header.to_snap == "s2"
    assert s.data_bytes == CHANGED * CHUNK
    inc = tmp / "inc.diff"
    cli = [sys.executable, "-c", "from thinpool_cli.main import main; main()"]
    dt, rss, _ = _child(cli + ["export-diff", "s2", "--from", "s1", "-o", str(inc), "--force", "-p", str(pool_path)])
    benchmark.extra_info.update({"cli_seconds": round(dt, 3), "cli_peak_rss_mib": round(rss / MiB, 1),
                                 "changed_bytes": s.data_bytes, "stream_bytes": inc.stat().st_size})
    print(f"\nthinpool export-diff --from (4 GiB, 1 % = {s.data_bytes >> 20} MiB changed): CLI {dt:.2f} s, "
          f"peak RSS {rss / MiB:.0f} MiB")
    dt0, rss0, _ = _child(cli + ["thin", "list", "-p", str(pool_path)])
    benchmark.extra_info.update({"cli_baseline_rss_mib": round(rss0 / MiB, 1)})
    print(f"(baseline: `thinpool thin list` on the same pool: {dt0:.2f} s, peak RSS {rss0 / MiB:.0f} MiB)")
    full = tmp / "full.diff"
    dtf, rssf, _ = _child(cli + ["export-diff", "s2", "-o", str(full), "--force", "-p", str(pool_path)])
    benchmark.extra_info.update({"full_cli_seconds": round(dtf, 3), "full_cli_peak_rss_mib": round(rssf / MiB, 1)})
    print(f"thinpool export-diff full (4 GiB of data): CLI {dtf:.2f} s, peak RSS {rssf / MiB:.0f} MiB, "
          f"{SIZE / dtf / MiB:.0f} MiB/s")
    full.unlink()

    missing = have_ceph()
    if missing:
        if os.environ.get("THINPOOL_REQUIRE_EXTERNAL") == "1":
            pytest.fail(f"ceph tools missing: {missing}")
        print(f"rbd side skipped: {', '.join(missing)} not installed")
        return
    cluster = CephCluster(tmp / "ceph")
    try:
        cluster.start()
        cluster.rbd("create", "-s", str(SIZE // MiB) + "M", "rbd/bench")
        cluster.rbd("snap", "create", "rbd/bench@s1")
        cluster.rbd("import-diff", "--no-progress", str(inc), "rbd/bench")
        out = tmp / "rbd.diff"
        times, rsss = [], []
        for _ in range(3):
            if out.exists():
                out.unlink()
            t, r, _ = _child(["rbd", "export-diff", "--no-progress", "--from-snap", "s1", "rbd/bench@s2", str(out)],
                             env=cluster.env)
            times.append(t)
            rsss.append(r)
        with open(out, "rb") as f:
            rs = validate_diff(f)
        # Ceph reports what changed per object extent: at least the changed chunks, usually more
        assert rs.data_bytes + rs.zero_bytes >= CHANGED * CHUNK
        rt = sorted(times)[1]
        benchmark.extra_info.update({"rbd_export_diff_seconds": round(rt, 3),
                                     "rbd_peak_rss_mib": round(max(rsss) / MiB, 1),
                                     "rbd_stream_bytes": out.stat().st_size, "rbd_records": rs.records})
        print(f"rbd export-diff --from-snap (same change, memstore test cluster): {rt:.2f} s (median of 3), "
              f"peak RSS {max(rsss) / MiB:.0f} MiB, {rs.records} records, {rs.data_bytes >> 20} MiB of data "
              f"(thinpool: {s.records} records, {s.data_bytes >> 20} MiB)")
    finally:
        cluster.stop()
