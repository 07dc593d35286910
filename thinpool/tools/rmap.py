"""thin_rmap as a library call: which thin blocks map the data blocks of some regions, in bounded memory.

Layer: tools. May import: thinpool.metadata, thinpool.tools.runsort, thinpool.tools.stdsort, numpy.

Order, as thin_rmap 0.9.0 gives it: devices by id, each device's leaves depth first, a node shared by several
devices visited only for the lowest id that reaches it (thin_rmap's btree_damage_visitor avoids repeated
visits), runs of consecutive data and thin blocks within one device, then std::sort by data_begin (reproduced
by ``runsort.RunStore``, libstdc++'s introsort, on the file once the runs outgrow the budget). ``order="sorted"``
gives thin_rmap 1.x's (Rust) order instead: by (data_begin, data_end, dev_id, thin_begin); the same runs.

Memory: the runs up to ``budget_bytes`` (then an unlinked temporary file), one batch of leaves, a bitmap of the
metadata blocks visited (one bit a block), never the mappings: independent of the mapping count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from thinpool.errors import InvalidArgument
from thinpool.metadata.ir import RunJoiner, Runs, batched_leaves, mapping_leaves
from thinpool.tools.runsort import DEFAULT_BUDGET_BYTES, RunStore

if TYPE_CHECKING:
    from thinpool.metadata.pool_metadata import PoolMetadata

ORDERS = ("cxx", "sorted")  # thin_rmap 0.9.0 (std::sort by data_begin) / thin_rmap 1.x (every field)


@dataclass(frozen=True, slots=True)
class RmapRun:
    """Data blocks [data_begin, data_end) are mapped by thin blocks from ``thin_begin`` of ``dev_id``."""

    data_begin: int
    data_end: int
    dev_id: int
    thin_begin: int


class _VisitedBlocks:
    """The metadata blocks already walked, one bit each (what the walker's ``seen`` set would hold)."""

    def __init__(self, nr_blocks: int) -> None:
        self.bits = bytearray((nr_blocks + 7) // 8 + 1)

    def __contains__(self, b: int) -> bool:
        return 0 <= b < len(self.bits) * 8 and bool(self.bits[b >> 3] & (1 << (b & 7)))

    def add(self, b: int) -> None:
        if 0 <= b < len(self.bits) * 8:  # the walker refuses a pointer beyond the device before it asks
            self.bits[b >> 3] |= 1 << (b & 7)


def collect_runs(md: PoolMetadata, regions: Sequence[tuple[int, int]], store: RunStore, *,
                 progress: Callable[[int], None] | None = None) -> None:
    """Append thin_rmap's runs for the data blocks in ``regions`` (half-open [begin, end) pairs) to ``store``,
    unsorted, in the order the walk finds them. ``progress`` gets the mappings of each batch walked (and, at the
    end of a device, those its shared subtrees, not walked again, account for).

    Raises:
        MetadataCorrupt on damage.
    """
    def take(runs: Runs) -> None:
        if len(runs):
            db, tb = runs.steps
            store.append((db, db + runs.lengths, runs.equals[0], tb))

    seen = _VisitedBlocks(md.store.nr_blocks)
    joiner = RunJoiner(2, 1)
    for dev_id in md.device_ids():
        walked = 0
        for thin, data, _ in batched_leaves(mapping_leaves(md, md.device_root(dev_id), seen=cast(Any, seen))):
            keep = np.zeros(len(data), dtype=bool)
            for lo, hi in regions:
                keep |= (data >= lo) & (data < hi)
            if keep.any():
                take(joiner.feed((data[keep], thin[keep]), (np.full(int(np.count_nonzero(keep)), dev_id),)))
            walked += len(data)
            if progress is not None:
                progress(len(data))
        if progress is not None:
            progress(max(md.get_device(dev_id).mapped_blocks - walked, 0))
    take(joiner.flush())


@contextmanager
def rmap_chunks(md: PoolMetadata, regions: Sequence[tuple[int, int]], *, order: str = "cxx",
                budget_bytes: int = DEFAULT_BUDGET_BYTES, progress: Callable[[int], None] | None = None,
                tmpdir: str | None = None) -> Iterator[Iterator[Any]]:
    """thin_rmap's runs for ``regions`` in ``order`` ("cxx": thin_rmap 0.9.0's; "sorted": thin_rmap 1.x's), as
    an iterator of structured arrays (fields ``runsort.RUN_FIELDS``, int64), a bounded number of runs each.
    Runs beyond ``budget_bytes`` (32 bytes each) are sorted on an unlinked temporary file in ``tmpdir``.

    Raises:
        InvalidArgument (unknown order), MetadataCorrupt on damage.
    """
    if order not in ORDERS:
        raise InvalidArgument(reason=f"unknown rmap order {order!r}; use: {', '.join(ORDERS)}")
    with RunStore(budget_bytes=budget_bytes, tmpdir=tmpdir) as store:
        collect_runs(md, regions, store, progress=progress)
        store.sort()
        yield store.chunks() if order == "cxx" else _fully_sorted(store.chunks())


def _fully_sorted(chunks: Iterator[Any]) -> Iterator[Any]:
    """Chunks sorted by data_begin -> sorted by every field: the runs of one data_begin are contiguous, so each
    chunk is sorted on its own, holding back its last data_begin's runs until the next chunk completes them."""
    held: Any = None
    for rec in chunks:
        if held is not None and len(held):
            rec = np.concatenate((held, rec))
        if not len(rec):
            continue
        last = rec["data_begin"][-1]
        cut = int(np.searchsorted(rec["data_begin"], last, side="left"))
        done, held = rec[:cut], rec[cut:]
        if len(done):
            yield _lexsorted(done)
    if held is not None and len(held):
        yield _lexsorted(held)


def _lexsorted(rec: Any) -> Any:
    return rec[np.lexsort((rec["thin_begin"], rec["dev_id"], rec["data_end"], rec["data_begin"]))]


def rmap_arrays(md: PoolMetadata, regions: Sequence[tuple[int, int]], *, order: str = "cxx",
                budget_bytes: int = DEFAULT_BUDGET_BYTES) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``rmap_chunks`` gathered into four int64 columns (data_begin, data_end, dev_id, thin_begin): memory the
    runs found (for callers that want them all; the CLI streams the chunks).

    Raises:
        InvalidArgument, MetadataCorrupt.
    """
    with rmap_chunks(md, regions, order=order, budget_bytes=budget_bytes) as chunks:
        parts = list(chunks)
    if not parts:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z, z
    rec = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return (np.ascontiguousarray(rec["data_begin"]), np.ascontiguousarray(rec["data_end"]),
            np.ascontiguousarray(rec["dev_id"]), np.ascontiguousarray(rec["thin_begin"]))


def rmap_runs(md: PoolMetadata, regions: Sequence[tuple[int, int]], *, order: str = "cxx") -> list[RmapRun]:
    """``rmap_arrays`` as records.

    Raises:
        InvalidArgument, MetadataCorrupt.
    """
    db, de, dev, tb = (c.tolist() for c in rmap_arrays(md, regions, order=order))
    return [RmapRun(*r) for r in zip(db, de, dev, tb)]
