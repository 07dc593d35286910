"""The checker's streaming time rule (shared data blocks must be older than each mapping device's
snapshotted_time) against an oracle over the full mapping arrays, on random pools with blocks shared by
copy-on-write, by shared subtrees and by hand-made cross-device mappings; and its memory use on a big device."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tools_helpers import big_pair, random_pool

from thinpool.metadata.check import check_metadata
from thinpool.metadata.pool_metadata import PoolMetadata


def oracle_warnings(md: PoolMetadata) -> list[str]:
    per_dev = {d: md.mappings(d) for d in md.device_ids()}
    allb = np.concatenate([db for _, db, _ in per_dev.values()]).astype(np.int64)
    users = np.bincount(allb) if allb.size else np.zeros(0, dtype=np.int64)
    out = []
    for dev, (_, db, t) in per_dev.items():
        snap = md.get_device(dev).snapshotted_time
        bad = (users[db.astype(np.int64)] > 1) & (t.astype(np.int64) >= snap)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            out.append(f"device {dev}: data block {int(db[i])} is shared but its mapping time {int(t[i])} is not "
                       f"older than the device's snapshotted_time {snap} (a write would overwrite shared data)")
    return out


@pytest.mark.parametrize("seed", range(8))
def test_time_warnings_match_the_full_array_oracle(seed: int) -> None:
    store, md = random_pool(seed, nr_devices=5)
    for i in range(200):  # random_pool maps these by hand without counting them
        md.data_sm.inc(900_000 + i)
    rng = random.Random(seed)
    ids = md.device_ids()
    for _ in range(seed * 3):  # cross-device sharing made by hand (as thin_restore can write it)
        src, dst = rng.choice(ids), rng.choice(ids)
        _, db, _ = md.mappings(src)
        if not len(db):
            continue
        d = int(db[rng.randrange(len(db))])
        md.insert(dst, 10_000 + rng.randrange(1000), d)
        md.data_sm.inc(d)
    if seed % 2:
        md.create_snap(max(ids) + 1, ids[0])  # a snapshot sharing its origin's whole tree
    md.commit()
    report = check_metadata(store)
    assert not report.errors, [str(p) for p in report.errors]
    got = [str(p) for p in report.warnings]
    assert got == oracle_warnings(md)


def test_big_device_check_is_clean_and_counts_every_mapping() -> None:
    store, md = big_pair(300_000, list(range(0, 300_000, 997)))
    report = check_metadata(store)
    assert report.ok, [str(p) for p in report.problems]
    assert report.mappings == 600_000
    assert [str(p) for p in report.warnings] == oracle_warnings(md)
