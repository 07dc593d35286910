"""Crash-point enumeration (issue 7): cut the power at every metadata/data write and sync of standard workloads and
require, after each crash: our checker and (sampled, or every image for the small workloads) the real thin_check
pass, the state equals the model at the last completed commit (or the new one when its superblock landed), and
every committed byte reads back exactly. THINPOOL_LONG=1 verifies every variant at every point, more seeds.
"""

from __future__ import annotations

import json
import os
import random

import crash_harness as h
import pytest

from thinpool.tx.transaction import TransactionManager

STATS: dict[str, dict[str, int]] = {}
SMALL = ["provision", "snapshot", "discard", "delete", "resize", "metadata_snap"]


def _report(name: str, stats: dict[str, int]) -> None:
    STATS[name] = stats
    print(f"\n[crash] {name}: {json.dumps(stats)}")
    out = os.environ.get("THINPOOL_CRASH_STATS")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({name: stats}) + "\n")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", SMALL)
def test_every_crash_point_small_workloads(name: str) -> None:
    d, plan = h.record(name)
    assert plan.writes > 10 and plan.syncs > 3
    stats = h.enumerate_crashes(d, plan, full=True, thin_check_every=1 if h.LONG else 10)
    assert stats["crash_points"] == stats["events"] + 1
    if h.THIN_CHECK:
        assert stats["thin_check"] > 0
    _report(name, stats)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [0, 1, 2, 3] if h.LONG else [0])
def test_every_crash_point_random_mix(seed: int) -> None:
    d, plan = h.record("random_mix", seed)
    assert d.ops > 200
    stats = h.enumerate_crashes(d, plan, full=h.LONG, thin_check_every=10)
    assert stats["crash_points"] == stats["events"] + 1
    _report(f"random_mix[{seed}]", stats)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["snapshot", "metadata_snap", "delete", "random_mix"])
def test_trace_replay_matches_real_crash(name: str) -> None:
    """The crash images the enumeration derives from the recording are the disks a real power cut leaves."""
    d, plan = h.record(name)
    total = plan.events - d.start_event
    rng = random.Random(7)
    points = sorted(set(rng.sample(range(1, total + 1), min(total, (40 if h.LONG else 3) if name == "random_mix" else (60 if h.LONG else 8)))))
    rp = h.Replayer(d)
    counted = [e for e in plan.trace if e.index > d.start_event or e.index == 0]
    it = iter(counted)
    cur = next(it)
    for n in points:
        while cur.index == 0 or cur.index - d.start_event < n:
            rp.apply(cur)
            cur = next(it)
        for var in ("lose_all", "land_all", "torn", "random"):
            seed = 1000 + n if var == "random" else 0
            meta, data = rp.crash(cur, var, seed)
            lose = {"lose_all": "all", "land_all": "none", "torn": "all"}.get(var) or random.Random(seed)
            crashed = h.run_with_crash(name, n, lose=lose, tear=var in ("torn", "random"), tear_seed=seed)
            assert crashed.meta_inner.blocks == meta, f"{name}: metadata differs at crash point {n} ({var})"
            assert crashed.data_inner.chunks == data, f"{name}: data differs at crash point {n} ({var})"


@pytest.mark.timeout(120)
def test_enumeration_catches_a_missing_barrier(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sensitivity: without the sync between the tree writes and the superblock write, some crash image (the
    superblock landed, a node it points to did not) must fail verification."""

    def pre_commit_no_sync(self: TransactionManager) -> None:
        for b in sorted(self.dirty):
            self.store.write_block(b, self.dirty[b].encode())
        for b in sorted(self.dirty_raw):
            self.store.write_block(b, self.dirty_raw[b])

    monkeypatch.setattr(TransactionManager, "pre_commit", pre_commit_no_sync)
    d, plan = h.record("snapshot")
    with pytest.raises(AssertionError):
        h.enumerate_crashes(d, plan, full=True, thin_check_every=10 ** 9)


@pytest.mark.timeout(120)
def test_enumeration_catches_lost_data_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sensitivity: if the data file were not synced before the metadata commit, committed bytes would be lost
    on a power cut, and the byte-exact read-back must notice."""
    from thinpool.testing.faulty import FaultyDataStore
    monkeypatch.setattr(FaultyDataStore, "sync", lambda self: self.plan._event(self, "sync") and None)
    d, plan = h.record("provision")
    with pytest.raises(AssertionError, match="committed bytes lost"):
        h.enumerate_crashes(d, plan, full=True, thin_check_every=10 ** 9)
