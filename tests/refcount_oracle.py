"""What the reference-count tests share: the data space map and its ref-count tree compared with a numpy oracle of
every block's count, and the rebuild-or-update thresholds of the ref-count tree forced either way."""

from __future__ import annotations

import numpy as np
import pytest

from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.spacemap import paged


def rc_items(pmd: PoolMetadata) -> tuple[list[int], list[int]]:
    """The ref-count tree's (keys, values) in key order."""
    items = list(pmd.data_disk.rc_tree.items(pmd.data_disk.ref_count_root))
    return [k for k, _ in items], [v for _, v in items]


def assert_exact_counts(pmd: PoolMetadata, oracle: np.ndarray) -> None:
    """Every count equals the oracle's; the ref-count tree holds exactly the counts >= 3; the map validates."""
    assert np.array_equal(pmd.data_sm.counts.astype(np.int64), oracle)
    big = np.flatnonzero(oracle >= 3)
    keys, values = rc_items(pmd)
    assert keys == big.tolist() and values == oracle[big].tolist()
    pmd.data_sm.validate_all()


def force_rebuild(mp: pytest.MonkeyPatch, on: bool) -> None:
    """Make every commit rebuild the ref-count tree (``on``) or update it entry by entry."""
    mp.setattr(paged, "RC_REBUILD_MIN", 1 if on else 1 << 62)
    mp.setattr(paged, "RC_REBUILD_FRACTION", 1 << 40)
