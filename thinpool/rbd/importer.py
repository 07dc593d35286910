"""Apply rbd diff v1 streams and export-format 2 images to thin devices, as ``rbd import-diff`` / ``rbd import``.

Layer: rbd. May import: errors, units, thin, pool, rbd.stream.

Order of work (so that a refused stream changes nothing):

1. the whole stream's framing is validated (records only; data is skipped, so this costs O(records)) and the
   names it needs are checked: the from-snapshot must be a device of the pool, the to-snapshot must not; sizes
   must be whole sectors; the data blocks the stream can need at most must be free;
2. then, as rbd does: ``s`` sets the size, ``w`` and ``z`` apply in stream order to the device (HEAD), and the
   to-snapshot is taken as a new snapshot device named after ``t``.

A failure in step 2 (an I/O error) aborts the open transaction (``Pool.abort_command``): the pool goes back to its
last commit, or fails (needs_check) if committed chunks had been overwritten in place; ``import_image`` deletes
the devices it had already created. Memory is bounded by one 4 MiB buffer, whatever the stream or device size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from thinpool.errors import DeviceExists, InvalidArgument, NoDataSpace, SnapshotExists, SnapshotNotFound
from thinpool.rbd.stream import DiffHeader, DiffSummary, Extent, ImageSummary, StreamReader, iter_diff, scan_image
from thinpool.units import SECTOR_SIZE

if TYPE_CHECKING:
    from thinpool.pool import Pool

Progress = Callable[[int], None]  # called with the stream offset (bytes) consumed so far
PIECE = 4 << 20  # bytes of write data read at a time


@dataclass(slots=True)
class ImportSummary:
    """What an import did: the device, the snapshots it created, records applied, bytes, seconds."""

    device: str
    dev_id: int
    size: int
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    records: int = 0
    write_records: int = 0
    zero_records: int = 0
    bytes_written: int = 0  # data bytes written to the device
    zero_bytes: int = 0
    stream_bytes: int = 0
    diffs: int = 1
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _find_name(pool: Pool, name: str) -> int | None:
    for d in pool.list_devices():
        if pool.device_name(d) == name:
            return d
    return None


def _next_id(pool: Pool, taken: set[int]) -> int:
    ids = set(pool.list_devices()) | taken
    return max(ids, default=0) + 1


def _check_size(size: int, where: str) -> None:
    if size <= 0 or size % SECTOR_SIZE:
        raise InvalidArgument(reason=f"{where}: image size {size} is not a positive multiple of 512 bytes "
                                     f"(thin devices are whole sectors)")


def _check_snap_name(name: str) -> None:
    if not name or name.isdigit():
        raise InvalidArgument(reason=f"to-snapshot name {name!r} cannot name a device (empty or a number)")


def _blocks_needed(r: StreamReader, version: int, chunk: int, has_origin: bool) -> tuple[DiffSummary, int]:
    """Validate one diff and bound the data blocks applying it can allocate: every chunk a ``w`` touches, and the
    partial chunks at the ends of each ``z`` (all of a ``z``'s chunks over an external origin), each counted once
    (extents are ascending)."""
    start = r.pos
    summary: DiffSummary | None = None
    need = 0
    last = -1  # highest chunk counted so far
    for rec in iter_diff(r, version):
        if isinstance(rec, DiffHeader):
            summary = DiffSummary(rec, version, start, 0)
            continue
        assert summary is not None
        first_c, last_c = rec.offset // chunk, (rec.offset + rec.length - 1) // chunk
        if rec.kind == "w":
            summary.writes += 1
            summary.data_bytes += rec.length
            cs = range(max(first_c, last + 1), last_c + 1)
            need += len(cs)
        else:
            summary.zeros += 1
            summary.zero_bytes += rec.length
            if has_origin:
                cs = range(max(first_c, last + 1), last_c + 1)
                need += len(cs)
            else:
                for c, partial in ((first_c, rec.offset % chunk != 0),
                                   (last_c, (rec.offset + rec.length) % chunk != 0)):
                    if partial and c > last:
                        need += 1
                        last = c
        last = max(last, last_c)
    assert summary is not None
    summary.end = r.pos
    return summary, need


def _apply_extents(pool: Pool, dev_id: int, r: StreamReader, version: int, s: DiffSummary,
                   progress: Progress | None) -> None:
    dev = pool.device(dev_id)
    r.pos = s.start
    for rec in iter_diff(r, version):
        if not isinstance(rec, Extent):
            continue
        if rec.kind == "w":
            done = 0
            while done < rec.length:
                n = min(PIECE, rec.length - done)
                dev.write(rec.offset + done, r.pread(rec.data_pos + done, n))
                done += n
        else:
            dev.write_zeroes(rec.offset, rec.length)
        if progress:
            progress(r.pos)


def _apply_one(pool: Pool, dev_id: int, r: StreamReader, version: int, s: DiffSummary, snap_name: str | None,
               snap_id: int | None, progress: Progress | None) -> dict[str, Any] | None:
    """Size, extents, snapshot (rbd import-diff's order). Writes past the old size go in under a provisional
    size (in memory only) so that nothing is committed before the extents are in."""
    old = pool.device_size(dev_id)
    new = s.header.size
    if new > old:
        pool._entry(dev_id)["size"] = new  # provisional: pool.abort() rereads the manifest
        ch = pool.chunk_bytes
        tail_end = min(-(-old // ch) * ch, new)
        if tail_end > old:  # the grown range reads as zeros, as in RBD: clear what the old last chunk held there
            pool.device(dev_id).write_zeroes(old, tail_end - old)
    _apply_extents(pool, dev_id, r, version, s, progress)
    if new != old:
        pool.resize_device(dev_id, new)  # shrinking unmaps the chunks past the end; commits
    if snap_name is None:
        pool.commit()
        return None
    assert snap_id is not None
    pool.create_snap(snap_id, dev_id, name=snap_name)  # commits
    return {"dev_id": snap_id, "name": snap_name, "size": new}


def import_diff(pool: Pool, dev_id: int, f: BinaryIO, *, snap_prefix: str = "",
                progress: Progress | None = None) -> ImportSummary:
    """Apply the rbd diff v1 stream in seekable ``f`` to device ``dev_id`` (HEAD), then take its to-snapshot as a
    new snapshot device named ``snap_prefix + t`` (none when the stream has no ``t``).

    Raises:
        RbdStreamError: malformed or truncated stream (nothing changed; ``offset`` says where it broke).
        SnapshotNotFound: the from-snapshot ``snap_prefix + f`` is not a device of the pool (nothing changed).
        SnapshotExists: a device already has the to-snapshot's name (nothing changed).
        InvalidArgument: the size is not whole sectors (nothing changed).
        NoDataSpace: the stream could need more data blocks than are free (nothing changed).
        DeviceNotFound: no device ``dev_id``.
    """
    t0 = time.monotonic()
    pool.check_writable()
    pool.device(dev_id)
    r = StreamReader(f)
    has_origin = pool.external_origin(dev_id) is not None
    s, need = _blocks_needed(r, 1, pool.chunk_bytes, has_origin)
    if r.pos != r.size:
        raise r.fail(f"{r.size - r.pos} bytes of trailing data after the end record")
    h = s.header
    _check_size(h.size, "the diff")
    if h.from_snap is not None and _find_name(pool, snap_prefix + h.from_snap) is None:
        raise SnapshotNotFound(dev_id=snap_prefix + h.from_snap, name=snap_prefix + h.from_snap)
    snap_name = None if h.to_snap is None else snap_prefix + h.to_snap
    if snap_name is not None:
        _check_snap_name(snap_name)
        if _find_name(pool, snap_name) is not None:
            raise SnapshotExists(dev_id=snap_name, name=snap_name)
    _check_space(pool, need + 1)  # + the old last chunk, zeroed past the old end when growing
    snap_id = _next_id(pool, set()) if snap_name else None
    out = ImportSummary(device=pool.device_name(dev_id), dev_id=dev_id, size=h.size, records=s.records,
                        write_records=s.writes, zero_records=s.zeros, bytes_written=s.data_bytes,
                        zero_bytes=s.zero_bytes, stream_bytes=r.size)
    try:
        snap = _apply_one(pool, dev_id, r, 1, s, snap_name, snap_id, progress)
    except BaseException as e:
        pool.abort_command(e)  # back to the last commit (the pool fails if committed data was overwritten)
        raise
    if snap:
        out.snapshots.append(snap)
    out.seconds = round(time.monotonic() - t0, 6)
    return out


def _check_space(pool: Pool, need: int) -> None:
    free = pool.nr_data_blocks - pool.nr_allocated_data_blocks
    if need > free:
        raise NoDataSpace(requested=need)


def validate_image(f: BinaryIO) -> ImageSummary:
    """Validate a whole export-format 2 stream (``scan_image``) from the file's current position."""
    return scan_image(f)


def import_image(pool: Pool, f: BinaryIO, name: str, *, dev_id: int | None = None, snap_prefix: str = "",
                 progress: Progress | None = None) -> ImportSummary:
    """Create device ``name`` (id ``dev_id``, default the next free one) from the export-format 2 stream in
    seekable ``f``: each diff is applied in turn and every to-snapshot becomes a snapshot device named
    ``snap_prefix + t``; the last diff leaves HEAD in the device.

    Raises:
        RbdStreamError: malformed or truncated stream, broken snapshot chain (nothing changed).
        SnapshotExists / DeviceExists / InvalidArgument / NoDataSpace: a name or id is taken, a size is not whole
            sectors, not enough free data blocks (nothing changed).
    """
    t0 = time.monotonic()
    pool.check_writable()
    img = scan_image(f)
    if _find_name(pool, name) is not None:
        raise DeviceExists(dev_id=name)
    if name.isdigit() or not name:
        raise InvalidArgument(reason=f"device name {name!r} must not be empty or a number")
    if dev_id is not None and dev_id in pool.list_devices():
        raise DeviceExists(dev_id=dev_id)
    head_id = dev_id if dev_id is not None else _next_id(pool, set())
    taken = {head_id}
    plan: list[tuple[DiffSummary, str | None, int | None]] = []
    names = {name}
    r = StreamReader(f, kind="rbd export-format 2")
    need = 0
    for i, s in enumerate(img.diffs):
        _check_size(s.header.size, f"diff {i + 1}")
        r.pos = s.start
        _, n = _blocks_needed(r, 2, pool.chunk_bytes, False)
        need += n + 1
        sn = None if s.header.to_snap is None else snap_prefix + s.header.to_snap
        sid = None
        if sn is not None:
            _check_snap_name(sn)
            if sn in names or _find_name(pool, sn) is not None:
                raise SnapshotExists(dev_id=sn, name=sn)
            names.add(sn)
            sid = _next_id(pool, taken)
            taken.add(sid)
        plan.append((s, sn, sid))
    _check_space(pool, need)
    out = ImportSummary(device=name, dev_id=head_id, size=img.diffs[-1].header.size, diffs=len(img.diffs),
                        stream_bytes=img.end)
    created: list[int] = []
    try:
        pool.create_thin(head_id, img.diffs[0].header.size, name=name)
        created.append(head_id)
        for s, sn, sid in plan:
            snap = _apply_one(pool, head_id, r, 2, s, sn, sid, progress)
            if snap:
                created.append(int(snap["dev_id"]))
                out.snapshots.append(snap)
            out.records += s.records
            out.write_records += s.writes
            out.zero_records += s.zeros
            out.bytes_written += s.data_bytes
            out.zero_bytes += s.zero_bytes
    except BaseException as e:
        pool.abort_command(e)
        for d in reversed(created):  # what was committed already goes again
            try:
                pool.delete_thin(d)
            except Exception:
                pass
        raise
    out.seconds = round(time.monotonic() - t0, 6)
    return out
