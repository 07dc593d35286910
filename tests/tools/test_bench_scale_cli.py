"""`thinpool bench --only scale --quick` end to end: it runs the real C++ and Rust tools beside ours on the same
metadata, finds the outputs identical (C++) and the same as far as the formats agree (Rust), and writes
RESULTS-scale.md (never RESULTS.md); the tools-only run keeps an earlier report below its own. No timing is
asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_tool
from oracles import RUST, run_tool

from thinpool_bench import scale as scale_mod

RUST_TOOLS = ("thin_check", "thin_dump", "thin_ls", "thin_delta", "thin_rmap", "thin_restore", "thin_repair")


@pytest.mark.external
def test_bench_scale_quick_end_to_end(tmp_path: Path) -> None:
    need_tool("thin_check", "thin_dump", "thin_ls", "thin_delta", *(RUST + t for t in RUST_TOOLS))
    results = tmp_path / "out" / "RESULTS.md"
    results.parent.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-c", "from thinpool_cli.main import main; main()", "bench", "--only", "scale",
           "--quick", "--workdir", str(work), "--results", str(results), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)  # a hang guard: 88 s at load 4-5
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
            assert t["rust"]["failed"] == [], (row["mappings"], name, t)
            if name != "check":
                assert t["identical"] is True and t["rust_same"] is True, (row["mappings"], name)
        assert all(m["failed"] == [] for m in row["steps"].values()), row["steps"]
        assert row["thin_check_after_deletes"] is True and row["rust_thin_check_after_deletes"] is True
    assert [d["devices"] for d in scale["devices"]] == [1, 10, 100, 1000]
    goal = next(c for c in scale["claims"] if c["claim"].startswith("create_snap"))
    assert goal["claim"].endswith("within 2x of at 10") and "of at 1:" in goal["measured"]
    assert not list(work.iterdir())  # scratch pools removed
    assert "| Rust |" in text and f"Rust pdata_tools {scale_mod._rust_version()}" in text


@pytest.mark.external
def test_tools_only_run_keeps_the_earlier_report_below(tmp_path: Path) -> None:
    need_tool("thin_check", "thin_dump", *(RUST + t for t in RUST_TOOLS))
    results = tmp_path / "RESULTS-scale.md"
    results.write_text("# thinpool scale benchmark\n\n## Devices: earlier\n\n| a |\n")
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-m", "thinpool_bench.scale", "--only-tools", "--mappings", "2000", "--rounds", "1",
           "--workdir", str(work), "--results", str(results), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert "pool_size" not in res and "devices" not in res and "delete origin" in res["mappings"][0]["steps"]
    tools = res["mappings"][0]["tools"]
    assert all(t["rust"]["failed"] == [] and t["cpp"]["failed"] == [] for t in tools.values())
    assert all(t["identical"] and t["rust_same"] for name, t in tools.items() if name != "check")
    text = results.read_text()
    top, old = text.split(scale_mod.PREVIOUS)
    assert "the metadata tools" in top.splitlines()[0] and "| 2,000 | dump |" in top
    assert old.strip().splitlines() == ["## thinpool scale benchmark", "", "### Devices: earlier", "", "| a |"]
    subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)  # again: still one earlier report
    assert results.read_text().count(scale_mod.PREVIOUS) == 1 and results.read_text().endswith(old)
    assert not list(work.iterdir())


def test_xml_digest_reads_both_layouts_alike_and_sees_a_changed_mapping(tmp_path: Path) -> None:
    """The digest scale.py compares Rust thin_dump's XML with ours by: 0.9.0's layout and 1.1.0's (<def>/<ref>,
    no flags="0", no final newline) of the same metadata give one digest; a changed block or time another."""
    import gzip
    import shutil

    need_tool("thin_dump", RUST + "thin_dump")
    images = Path(__file__).resolve().parent.parent.parent / "images"
    md = tmp_path / "f3.bin"
    with gzip.open(images / "f3_snapshot.bin.gz", "rb") as src, open(md, "wb") as dst:
        shutil.copyfileobj(src, dst)
    cxx, rs = tmp_path / "cxx.xml", tmp_path / "rust.xml"
    cxx.write_text(run_tool("thin_dump", str(md)).stdout)
    rs.write_text(run_tool(RUST + "thin_dump", str(md)).stdout)
    assert "<def " in rs.read_text() and cxx.read_text() != rs.read_text()
    assert scale_mod._xml_digest(cxx) == scale_mod._xml_digest(rs)
    for old, new in (('data_block="10"', 'data_block="11"'), ('time="1"/>', 'time="0"/>')):
        bad = tmp_path / "bad.xml"
        text = cxx.read_text()
        assert old in text
        bad.write_text(text.replace(old, new, 1))
        assert scale_mod._xml_digest(bad) != scale_mod._xml_digest(rs)
