"""thin_rmap as a library call: which thin blocks map the data blocks of some regions.

Layer: tools. May import: thinpool.metadata, thinpool.tools.stdsort, numpy.

Order, as thin_rmap 0.9.0 gives it: devices by id, each device's leaves depth first, a node shared by several
devices visited only for the lowest id that reaches it (thin_rmap's btree_damage_visitor avoids repeated
visits), runs of consecutive data and thin blocks within one device, then std::sort by data_begin (reproduced
over numpy columns by ``stdsort.std_sort_order``). Memory: the nodes visited and the runs found (four int64
columns), never the mappings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from thinpool.metadata.ir import RunJoiner, Runs, batched_leaves, mapping_leaves
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.tools.stdsort import std_sort_order


@dataclass(frozen=True, slots=True)
class RmapRun:
    """Data blocks [data_begin, data_end) are mapped by thin blocks from ``thin_begin`` of ``dev_id``."""

    data_begin: int
    data_end: int
    dev_id: int
    thin_begin: int


def rmap_arrays(md: PoolMetadata, regions: Sequence[tuple[int, int]]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """thin_rmap's runs for the data blocks in ``regions`` (half-open [begin, end) pairs), in its order, as
    int64 columns (data_begin, data_end, dev_id, thin_begin). Memory: the runs found (8 bytes x 4 each).

    Raises:
        MetadataCorrupt on damage.
    """
    cols: list[list[np.ndarray]] = [[], [], [], []]  # the pieces of each column

    def take(runs: Runs) -> None:
        if len(runs):
            db, tb = runs.steps
            for col, piece in zip(cols, (db, db + runs.lengths, runs.equals[0], tb)):
                col.append(piece)

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
    if not cols[0]:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z, z
    out = []
    for col in cols:  # one column at a time, its pieces dropped once joined
        out.append(np.concatenate(col).astype(np.int64, copy=False))
        col.clear()
    order = std_sort_order(out[0])  # libstdc++'s std::sort by data_begin: thin_rmap's order of ties
    for i in range(4):
        out[i] = out[i][order]  # the unordered column is freed as its ordered copy replaces it
    return out[0], out[1], out[2], out[3]


def rmap_runs(md: PoolMetadata, regions: Sequence[tuple[int, int]]) -> list[RmapRun]:
    """``rmap_arrays`` as records.

    Raises:
        MetadataCorrupt on damage.
    """
    db, de, dev, tb = (c.tolist() for c in rmap_arrays(md, regions))
    return [RmapRun(*r) for r in zip(db, de, dev, tb)]
