"""Which chunks of a thin device an rbd diff must carry: all provisioned ones, or those that differ from an older
snapshot.

Layer: rbd. May import: errors, metadata, tools, pool.

``changed_runs`` yields runs of thin blocks ``(begin, length, kind)`` in ascending order: ``"data"`` (the device
maps the chunks, and the older snapshot does not map the same data block) or ``"gone"`` (the older snapshot maps
them, the device does not: they now read as zeros, or as the external origin). The tree walk is
``thinpool.tools.delta`` (it skips subtrees both devices share, so the cost follows the differences); until that
module is in the tree a windowed comparison of the two mapping arrays stands in (bounded memory, cost
proportional to the mapped chunks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    from thinpool.metadata.pool_metadata import PoolMetadata

WINDOW = 1 << 16  # thin blocks per window of the fallback comparison (bounded memory: ~1.5 MiB of arrays)

try:  # thin_delta as a library call (helper tools, issue 19's dependency)
    from thinpool.tools.delta import delta_runs as _delta_runs
    from thinpool.tools.delta import mapped_runs as _mapped_runs
except ImportError:  # pragma: no cover - depends on what has landed
    _delta_runs = None
    _mapped_runs = None


def changed_runs(md: PoolMetadata, dev_id: int, from_id: int | None = None) -> Iterator[tuple[int, int, str]]:
    """Runs ``(begin, length, kind)`` of thin blocks, ascending, adjacent runs of one kind merged."""
    src = _full(md, dev_id) if from_id is None else _delta(md, from_id, dev_id)
    cur: list[int | str] | None = None
    for b, n, kind in src:
        if n <= 0:
            continue
        if cur is not None and cur[2] == kind and int(cur[0]) + int(cur[1]) == b:
            cur[1] = int(cur[1]) + n
            continue
        if cur is not None:
            yield int(cur[0]), int(cur[1]), str(cur[2])
        cur = [b, n, kind]
    if cur is not None:
        yield int(cur[0]), int(cur[1]), str(cur[2])


def _full(md: PoolMetadata, dev_id: int) -> Iterator[tuple[int, int, str]]:
    if _mapped_runs is not None:
        for begin, length, _data in _mapped_runs(md, dev_id):
            yield int(begin), int(length), "data"
        return
    hi = md.highest_mapped(dev_id)
    if hi is None:
        return
    for lo in range(0, hi + 1, WINDOW):
        k, _, _ = md.mappings(dev_id, lo, lo + WINDOW)
        yield from _runs(k.astype(np.int64), "data")


def _delta(md: PoolMetadata, left: int, right: int) -> Iterator[tuple[int, int, str]]:
    if _delta_runs is not None:
        for run in _delta_runs(md, left, right):
            if run.kind in ("different", "right_only"):
                yield int(run.begin), int(run.length), "data"
            elif run.kind == "left_only":
                yield int(run.begin), int(run.length), "gone"
        return
    his = [h for h in (md.highest_mapped(left), md.highest_mapped(right)) if h is not None]
    if not his:
        return
    for lo in range(0, max(his) + 1, WINDOW):
        kl, dl, _ = md.mappings(left, lo, lo + WINDOW)
        kr, dr, _ = md.mappings(right, lo, lo + WINDOW)
        kl64, kr64 = kl.astype(np.int64), kr.astype(np.int64)
        # right-side blocks that the left maps to the same data block are shared: not part of the diff
        pos = np.searchsorted(kl64, kr64)
        pos_c = np.minimum(pos, max(len(kl64) - 1, 0))
        same = (len(kl64) > 0) & (kl64[pos_c] == kr64) & (dl[pos_c] == dr) if len(kl64) else \
            np.zeros(len(kr64), dtype=bool)
        data = kr64[~same]
        gone = np.setdiff1d(kl64, kr64, assume_unique=True)
        runs = sorted(list(_runs(data, "data")) + list(_runs(gone, "gone")))
        yield from runs


def _runs(keys: np.ndarray, kind: str) -> Iterator[tuple[int, int, str]]:
    """Runs of consecutive values in a sorted int64 array."""
    if not len(keys):
        return
    brk = np.flatnonzero(np.diff(keys) != 1) + 1
    starts = np.concatenate([[0], brk])
    ends = np.concatenate([brk, [len(keys)]])
    for s, e in zip(starts.tolist(), ends.tolist()):
        yield int(keys[s]), int(e - s), kind
