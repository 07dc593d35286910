"""The lab's report is honest about its own numbers: every metric names its unit, every claim's text agrees
with its verdict and quotes the measured values, sizes print as sizes. Checked on the committed full run
(benchmarks/RESULTS-drivers.json) and on variants of it with one number changed."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from thinpool_bench.lab import report, runner

ROOT = Path(__file__).resolve().parents[2]
RES = json.loads((ROOT / "benchmarks" / "RESULTS-drivers.json").read_text())
MiB = 1 << 20


def unit_of(key: str, units: dict[str, str]) -> str | None:
    """The unit of a metric key: that of its longest matching suffix."""
    hits = [s for s in units if key.endswith(s)]
    return units[max(hits, key=len)] if hits else None


def metric_keys(o: Any, key: str = "") -> list[str]:
    """Every key holding a number, below the per-driver results (phase names under ``phase_wall_s`` and N /
    size / depth keys are not metrics: their parent carries the unit)."""
    out: list[str] = []
    if isinstance(o, dict):
        for k, v in o.items():
            if k == "phase_wall_s":
                continue
            out += metric_keys(v, key if str(k).isdigit() else str(k))
    elif isinstance(o, int | float) and not isinstance(o, bool):
        out.append(key)
    return out


def test_every_metric_names_its_unit() -> None:
    units = runner.UNITS
    assert unit_of("throughput_bytes_per_s", units) == "bytes per second"
    assert unit_of("throughput_per_s", units) == "operations per second"
    assert unit_of("new_over_preallocated_time_ratio", units) == "ratio (dimensionless)"
    keys = metric_keys(RES["drivers"]) + metric_keys(RES["image"])
    assert keys
    assert sorted({k for k in keys if unit_of(k, units) is None}) == []
    assert RES["units"] == units  # the stored run says the same


def test_sizes_print_as_sizes() -> None:
    assert report._size(1010 * MiB) == "1010 MiB"
    assert report._size(3 * MiB // 2) == "1.5 MiB"
    assert "e+" not in report.markdown(RES)


def _claims(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["claim"].split(" (")[0].split(";")[0]: c for c in report.claims(res)}


def test_claim_texts_agree_with_their_verdicts_and_numbers() -> None:
    cl = _claims(RES)
    for c in cl.values():
        if c["verdict"] in ("holds", "does not hold"):
            assert "Condition" not in c["why"], c  # a plain verdict carries no condition that would undo it
    d = RES["drivers"]
    ino = cl["overlay consumes many inodes"]["why"]
    assert f"uses {d['btrfs']['import_host_inodes']} host inodes" in ino
    start = cl["container start is fast with layered drivers"]["why"]
    for t in report.THIN:
        rows = sorted((int(n), c["create_time_per_container_s"]) for n, c in d[t]["containers"].items()
                      if "create_time_per_container_s" in c)
        assert f"{t}: {rows[0][1] * 1e3:.0f} ms at N={rows[0][0]}" in start
    worst = max(c["create_time_per_container_s"] for n in ("overlayfs", "aufs-like", "btrfs")
                for c in d[n]["containers"].values() if "create_time_per_container_s" in c)
    assert f"at most {worst * 1e3:.1f} ms per container" in start
    pc = cl["n identical devicemapper containers keep n copies in the page cache"]["why"]
    nmax = max(int(n) for n in d["btrfs"]["page_cache"])
    copies = d["btrfs"]["page_cache"][str(nmax)]["container_files_bytes"] / RES["image"]["shared_file_bytes"]
    assert f"cache {copies:.1f} copies for N={nmax}" in pc
    read = cl["devicemapper copies a block on read"]
    assert read["verdict"] == ("does not hold" if all(d[t]["lower_read"]["copied_bytes"] == 0 for t in report.THIN)
                               else "holds")


@pytest.mark.parametrize("ratio", [0.9, 1.1, 1.5])
def test_allocate_on_demand_verdict_follows_the_time_ratio(ratio: float) -> None:
    res = copy.deepcopy(RES)
    for t in report.THIN:
        res["drivers"][t]["alloc_on_demand"]["new_over_preallocated_time_ratio"] = ratio
    c = _claims(res)["frequent small writes suffer from allocate-on-demand"]
    if ratio > 1.2:
        assert c["verdict"] == "holds" and "Condition" not in c["why"]
    else:
        assert c["verdict"] == "holds with a condition"
        assert "Condition" in c["why"] and f"{ratio:.2f}x" in c["why"]


def test_committed_results_section_is_what_the_report_makes_of_the_committed_numbers() -> None:
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    section = text.split(report.BEGIN, 1)[1].split(report.END, 1)[0]
    want = report.markdown(RES, "results").split(report.BEGIN, 1)[1].split(report.END, 1)[0]
    assert section == want
