"""What the reference-count tests share: the data space map and its ref-count tree compared with a numpy oracle of
every block's count (also after a commit and a reopen), and the rebuild-or-update thresholds of the ref-count tree
forced either way."""

from __future__ import annotations

import os

import numpy as np
import pytest

from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.check import check_metadata
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


def commit_reopen_and_check(pmd: PoolMetadata, path: str | os.PathLike[str], oracle: np.ndarray) -> None:
    """Commit, reopen from ``path``: the counts are the oracle's; then thinpool's checker finds no problem."""
    pmd.commit()
    pmd.close()
    pmd = PoolMetadata.open(FileBlockStore(path))
    assert_exact_counts(pmd, oracle)
    pmd.close()
    report = check_metadata(FileBlockStore(path, readonly=True), skip_mappings=True)
    assert report.problems == [], [str(p) for p in report.problems]
