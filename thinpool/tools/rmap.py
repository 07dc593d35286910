"""thin_rmap as a library call: which thin blocks map the data blocks of some regions.

Layer: tools. May import: thinpool.metadata, thinpool.tools.stdsort, numpy.

Order, as thin_rmap 0.9.0 gives it: devices by id, each device's leaves depth first, a node shared by several
devices visited only for the lowest id that reaches it (thin_rmap's btree_damage_visitor avoids repeated
visits), runs of consecutive data and thin blocks within one device, then std::sort by data_begin. Memory: the
nodes visited and the runs found (the output), never the mappings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from thinpool.metadata.ir import RunJoiner, Runs, batched_leaves, mapping_leaves
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.tools.stdsort import std_sort


@dataclass(frozen=True, slots=True)
class RmapRun:
    """Data blocks [data_begin, data_end) are mapped by thin blocks from ``thin_begin`` of ``dev_id``."""

    data_begin: int
    data_end: int
    dev_id: int
    thin_begin: int


def rmap_runs(md: PoolMetadata, regions: Sequence[tuple[int, int]]) -> list[RmapRun]:
    """thin_rmap's runs for the data blocks in ``regions`` (half-open [begin, end) pairs), in its order.

    Raises:
        MetadataCorrupt on damage.
    """
    found: list[list[int]] = []  # [data_begin, data_end, dev_id, thin_begin]

    def take(runs: Runs) -> None:
        for db, tb, dev, n in runs.rows():
            found.append([db, db + n, dev, tb])

    seen: set[int] = set()
    joiner = RunJoiner(2, 1)
    for dev_id in md.device_ids():
        for thin, data, _ in batched_leaves(mapping_leaves(md, md.device_root(dev_id), seen=seen)):
            keep = np.zeros(len(data), dtype=bool)
            for lo, hi in regions:
                keep |= (data >= lo) & (data < hi)
            if keep.any():
                take(joiner.feed((data[keep], thin[keep]), (np.full(int(np.count_nonzero(keep)), dev_id),)))
    take(joiner.flush())
    std_sort(found, lambda x, y: bool(x[0] < y[0]))
    return [RmapRun(a, b, dev, tb) for a, b, dev, tb in found]
