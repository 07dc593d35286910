"""Write rbd diff v1 streams and export-format 2 images of thin devices.

Layer: rbd. May import: errors, units, metadata, tools, thin, pool, rbd.stream, rbd.changes.

Records follow what ``rbd export-diff`` writes: extents ascending, none empty, none past the size, none crossing
a 4 MiB object boundary (Ceph's diff_iterate works object by object). Data records cover whole chunks (the last
one cut at the device size); a chunk that reads all zeros goes out as ``z``, and so do chunks the older snapshot
had that the device no longer maps (discarded, or zeroed by write_zeroes). Memory is bounded by one 4 MiB object
buffer plus the tree walk, whatever the device size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from thinpool.errors import InvalidArgument
from thinpool.rbd.changes import changed_runs
from thinpool.rbd.stream import OBJECT_SIZE, DiffWriter, write_image_header

if TYPE_CHECKING:
    from thinpool.pool import Pool

Progress = Callable[[int], None]  # called with the image offset (bytes) reached so far


@dataclass(slots=True)
class ExportSummary:
    """What an export wrote: stream bytes, records, image bytes carried as data / zeros, seconds."""

    device: str
    size: int
    from_snap: str | None
    to_snap: str | None
    bytes_written: int = 0
    records: int = 0
    write_records: int = 0
    zero_records: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    diffs: int = 1
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pieces(start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) cut at 4 MiB object boundaries."""
    out = []
    pos = start
    while pos < end:
        nxt = min((pos // OBJECT_SIZE + 1) * OBJECT_SIZE, end)
        out.append((pos, nxt))
        pos = nxt
    return out


def _emit_data(w: DiffWriter, pool: Pool, dev_id: int, start: int, end: int, *, zeros: bool = True) -> None:
    """Read [start, end) piece by piece; non-zero chunks as ``w`` (adjacent ones merged), all-zero chunks as
    ``z`` (or nothing with ``zeros=False``, where the receiver already reads zeros)."""
    dev = pool.device(dev_id)
    ch = pool.chunk_bytes
    for a, b in _pieces(start, end):
        buf = dev.read(a, b - a)
        arr = np.frombuffer(buf, dtype=np.uint8)
        # segments: whole chunks (cut at the piece's ends)
        bounds = [a] + list(range((a // ch + 1) * ch, b, ch)) + [b]
        run_kind: bool | None = None
        run_start = a
        for s, e in zip(bounds, bounds[1:]):
            nz = bool(arr[s - a:e - a].any())
            if run_kind is None:
                run_kind, run_start = nz, s
            elif nz != run_kind:
                _flush(w, buf, a, run_start, s, run_kind, zeros)
                run_kind, run_start = nz, s
        if run_kind is not None:
            _flush(w, buf, a, run_start, b, run_kind, zeros)


def _flush(w: DiffWriter, buf: bytes, base: int, s: int, e: int, nonzero: bool, zeros: bool) -> None:
    if nonzero:
        w.write(s, memoryview(buf)[s - base:e - base])
    elif zeros:
        w.zero(s, e - s)


def write_diff(w: DiffWriter, pool: Pool, dev_id: int, from_id: int | None, *,
               to_snap: str | None, progress: Progress | None = None) -> None:
    """Header, extents and end of one diff of ``dev_id`` (against ``from_id`` if given) to ``w``.

    With ``from_id``: below the older snapshot's size, the chunks the two trees map differently; past it (the
    device grew since; the receiver's grown range reads zeros, as RBD's does after a resize) whatever the device
    holds there that is not zero.
    """
    size = pool.device_size(dev_id)
    ch = pool.chunk_bytes
    from_snap = pool.device_name(from_id) if from_id is not None else None
    w.header(size=size, from_snap=from_snap, to_snap=to_snap)
    origin = pool.external_origin(dev_id)
    lo = 0  # everything below ``lo`` has been emitted
    if origin is not None and from_id is None:
        # unprovisioned chunks show the origin: a full diff carries its whole extent
        lo = min(size, -(-origin.size // ch) * ch)
        _emit_data(w, pool, dev_id, 0, lo)
        if progress:
            progress(lo)
    # below ``limit`` the diff is what the mapping trees say differs; from there on, what the device holds
    limit = size if from_id is None else min(size, pool.device_size(from_id))
    for begin, length, kind in changed_runs(pool.md, dev_id, from_id):
        start, end = max(begin * ch, lo), min((begin + length) * ch, limit)
        if start >= end:
            continue
        if kind == "data" or origin is not None:
            # after --from, chunks that became unmapped show the origin again: read rather than zeroed
            _emit_data(w, pool, dev_id, start, end)
        else:
            for a, b in _pieces(start, end):
                w.zero(a, b - a)
        if progress:
            progress(end)
    if limit < size:
        _emit_grown(w, pool, dev_id, max(limit, lo), size, has_origin=origin is not None)
    w.end()
    if progress:
        progress(size)


def _emit_grown(w: DiffWriter, pool: Pool, dev_id: int, start: int, size: int, *, has_origin: bool) -> None:
    """The non-zero data of [start, size): the mapped chunks there (the whole range over an external origin)."""
    if has_origin:
        _emit_data(w, pool, dev_id, start, size, zeros=False)
        return
    ch = pool.chunk_bytes
    for begin, length, _kind in changed_runs(pool.md, dev_id, None):
        a, b = max(begin * ch, start), min((begin + length) * ch, size)
        if a < b:
            _emit_data(w, pool, dev_id, a, b, zeros=False)


def _summary(pool: Pool, dev_id: int, w: DiffWriter, t0: float, *, from_snap: str | None,
             to_snap: str | None) -> ExportSummary:
    return ExportSummary(device=pool.device_name(dev_id), size=pool.device_size(dev_id), from_snap=from_snap,
                         to_snap=to_snap, bytes_written=w.bytes_out, records=w.records, write_records=w.writes,
                         zero_records=w.zeros, data_bytes=w.data_bytes, zero_bytes=w.zero_bytes,
                         seconds=round(time.monotonic() - t0, 6))


def export_diff(pool: Pool, dev_id: int, out: BinaryIO, *, from_id: int | None = None, to_snap: bool = True,
                progress: Progress | None = None) -> ExportSummary:
    """Write an rbd diff v1 stream of device ``dev_id`` to ``out``: ``t`` is the device's name (none with
    ``to_snap=False``), ``f`` the name of ``from_id`` (only what differs from it is carried), ``s`` the size.

    Cost: with ``from_id``, proportional to the chunks that differ (plus the tree walk); without, to the mapped
    chunks. Memory: one 4 MiB buffer.

    Raises:
        DeviceNotFound: no such device (or from-snapshot).
        InvalidArgument: ``from_id`` is the device itself.
    """
    t0 = time.monotonic()
    pool.device(dev_id)
    if from_id is not None:
        pool.device(from_id)
        if from_id == dev_id:
            raise InvalidArgument(reason="--from names the device itself: the diff would be empty")
    w = DiffWriter(out, version=1)
    name = pool.device_name(dev_id) if to_snap else None
    write_diff(w, pool, dev_id, from_id, to_snap=name, progress=progress)
    return _summary(pool, dev_id, w, t0, from_snap=pool.device_name(from_id) if from_id is not None else None,
                    to_snap=name)


def snapshot_chain(pool: Pool, dev_id: int) -> list[int]:
    """The snapshots of ``dev_id`` (the devices the pool records as snapshotted from it), oldest first (by
    creation time, then id). Snapshots of those snapshots are not part of the chain: they are not points in
    ``dev_id``'s history."""
    snaps = [d for d in pool.list_devices() if d != dev_id and pool.origin_of(d) == dev_id]
    return sorted(snaps, key=lambda d: (pool.created_at(d) or 0.0, d))


def export_image(pool: Pool, dev_id: int, out: BinaryIO, *, snaps: list[int] | None = None,
                 progress: Progress | None = None) -> ExportSummary:
    """Write ``dev_id`` with its snapshots as an rbd export-format 2 stream (what ``rbd import --export-format 2``
    reads): diff 1 is the oldest snapshot in full, each next one what changed since the previous, the last HEAD.

    ``snaps`` (oldest first) defaults to ``snapshot_chain``. Snapshots become RBD snapshots named after their
    devices.

    Raises:
        DeviceNotFound: a device is missing.
        InvalidArgument: a snapshot is listed twice or is the device itself.
    """
    t0 = time.monotonic()
    pool.device(dev_id)
    chain = snapshot_chain(pool, dev_id) if snaps is None else list(snaps)
    for s in chain:
        pool.device(s)
    if dev_id in chain or len(set(chain)) != len(chain):
        raise InvalidArgument(reason="the snapshot list repeats a device or names the device itself")
    total = write_image_header(out, nr_diffs=len(chain) + 1)
    agg = ExportSummary(device=pool.device_name(dev_id), size=pool.device_size(dev_id), from_snap=None,
                        to_snap=None, diffs=len(chain) + 1)
    prev: int | None = None
    base = 0  # progress runs over the diffs one after the other
    for d in chain + [dev_id]:
        w = DiffWriter(out, version=2)
        cb = None if progress is None else (lambda pos, b=base: progress(b + pos))
        write_diff(w, pool, d, prev, to_snap=None if d == dev_id else pool.device_name(d), progress=cb)
        base += pool.device_size(d)
        total += w.bytes_out
        agg.records += w.records
        agg.write_records += w.writes
        agg.zero_records += w.zeros
        agg.data_bytes += w.data_bytes
        agg.zero_bytes += w.zero_bytes
        prev = d
    agg.bytes_written = total
    agg.seconds = round(time.monotonic() - t0, 6)
    return agg

