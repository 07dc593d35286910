"""`thinpool bench --only scale --quick` end to end: it runs the real C++ tools beside ours on the same metadata,
finds the outputs identical, and writes RESULTS-scale.md (never RESULTS.md). No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_tool


@pytest.mark.external
def test_bench_scale_quick_end_to_end(tmp_path: Path) -> None:
    need_tool("thin_check", "thin_dump", "thin_ls", "thin_delta")
    results = tmp_path / "out" / "RESULTS.md"
    results.parent.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-c", "from thinpool_cli.main import main; main()", "bench", "--only", "scale",
           "--quick", "--workdir", str(work), "--results", str(results), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout[:r.stdout.rindex("}") + 1])
    scale = doc["scale"]
    assert not results.exists()  # a scale-only run leaves RESULTS.md (another part's file) alone
    text = (results.parent / "RESULTS-scale.md").read_text()
    for heading in ("## Same commands, empty pool of growing size", "## Mappings:", "## Devices:", "## Goals"):
        assert heading in text
    # every command ran and succeeded, at every size
    for label in scale["pool_size"]["sizes"]:
        for step, m in scale["pool_size"]["table"][label].items():
            assert m["failed"] == [], (label, step, m)
            assert m["rss_mb"] > 0
    assert [row["mappings"] for row in scale["mappings"]] == [10_000, 100_000]
    for row in scale["mappings"]:
        for name, t in row["tools"].items():
            assert t["thinpool"]["failed"] == [] and t["cpp"]["failed"] == [], (row["mappings"], name, t)
            if name != "check":
                assert t["identical"] is True, (row["mappings"], name)
        assert all(m["failed"] == [] for m in row["steps"].values()), row["steps"]
        assert row["thin_check_after_deletes"] is True
    assert [d["devices"] for d in scale["devices"]] == [1, 100, 1000]
    assert not list(work.iterdir())  # scratch pools removed
