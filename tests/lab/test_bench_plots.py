"""The benchmark's plots say what the numbers say: titles follow the run's own verdict, one outlier cannot flatten
the scale, and --quick says its numbers are noisy."""

from __future__ import annotations

import pytest

from thinpool_bench import suite
from thinpool_cli.bench_cmds import QUICK_NOTE


def _run(medians: list[float]) -> suite.BenchRun:
    run = suite.BenchRun(machine={})
    run.snapshots = [{"mappings": 10 ** i, "median_s": m} for i, m in enumerate(medians)]
    return run


def test_snapshot_title_follows_the_verdict() -> None:
    flat, steep = _run([0.001, 0.0012, 0.0015]), _run([0.001, 0.002, 0.005])
    assert "goal met" in suite.snapshot_title(flat) and "O(1)" in suite.snapshot_title(flat)
    assert "goal missed" in suite.snapshot_title(steep) and "O(1)" not in suite.snapshot_title(steep)
    # the same run's claim gives the same verdict as the title
    for run in (flat, steep):
        claim = next(c for c in suite.claims(run) if c["claim"].startswith("snapshot create time flat"))
        assert (claim["verdict"] == "met") == ("goal met" in suite.snapshot_title(run))


def test_an_outlier_does_not_flatten_the_scale() -> None:
    values = [0.8, 0.9, 1.0, 0.7, 40.0]
    top = suite.robust_top(values)
    assert top < 40.0 and top >= 0.9 * 3  # the outlier is cut, the rest use most of the axis
    assert suite.robust_top([0.5, 0.6]) == pytest.approx(max(1.2, 0.6 * 1.05))


def test_plots_render_with_titles_and_legends(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    run = _run([0.001, 0.0011, 0.004])
    out = suite.plot(run, tmp_path)
    assert [p.name for p in out] == ["snapshot.png"] and out[0].stat().st_size > 0


def test_quick_says_its_numbers_are_noisy() -> None:
    assert "noisy" in QUICK_NOTE
