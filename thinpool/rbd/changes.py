"""Which chunks of a thin device an rbd diff must carry: all provisioned ones, or those that differ from an older
snapshot.

Layer: rbd. May import: errors, metadata, tools.

``changed_runs`` yields runs of thin blocks ``(begin, length, kind)`` in ascending order: ``"data"`` (the device
maps the chunks, and the older snapshot does not map them to the same data blocks) or ``"gone"`` (the older
snapshot maps them, the device does not: they now read as zeros, or as the external origin). The walk is
``thinpool.tools.delta`` (thin_delta as a library call), which skips the subtrees both devices share, so the cost
follows the differences, not the device size.
"""

from __future__ import annotations

from collections.abc import Iterator

from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.tools.delta import delta_runs, mapped_runs


def changed_runs(md: PoolMetadata, dev_id: int, from_id: int | None = None) -> Iterator[tuple[int, int, str]]:
    """Runs ``(begin, length, kind)`` of thin blocks, ascending, adjacent runs of one kind merged."""
    src = _full(md, dev_id) if from_id is None else _delta(md, from_id, dev_id)
    cur: tuple[int, int, str] | None = None
    for b, n, kind in src:
        if n <= 0:
            continue
        if cur is not None and cur[2] == kind and cur[0] + cur[1] == b:
            cur = (cur[0], cur[1] + n, kind)
            continue
        if cur is not None:
            yield cur
        cur = (b, n, kind)
    if cur is not None:
        yield cur


def _full(md: PoolMetadata, dev_id: int) -> Iterator[tuple[int, int, str]]:
    for begin, length, _data in mapped_runs(md, dev_id):
        yield int(begin), int(length), "data"


def _delta(md: PoolMetadata, left: int, right: int) -> Iterator[tuple[int, int, str]]:
    for run in delta_runs(md, left, right, include_same=False):
        if run.kind in ("different", "right_only"):
            yield int(run.begin), int(run.length), "data"
        elif run.kind == "left_only":
            yield int(run.begin), int(run.length), "gone"
