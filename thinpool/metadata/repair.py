"""Salvage damaged pool metadata into fresh metadata (thin_repair's job; never in place).

Layer: metadata. May import: errors, units, checksum, formats, io, btree.walk, metadata.pool_metadata.

``repair(src, dst)`` reads what it can from ``src`` without trusting it: the superblock (its checksum may be bad if
the fields still make sense), the device-details tree, the top-level mapping tree and each device's mapping tree.
Every node is validated as on a normal read (checksum, self block number, flags, sizes, key order); a node that
fails is skipped with its subtree, as are pointers out of range, cycles, keys outside their parent's range and
mappings to data blocks beyond the data device. Space maps are never read: ``dst`` is formatted fresh and every
salvaged device is rebuilt through ``PoolMetadata.build_device``, which recounts the data references; the metadata
space map counts the new trees. Data blocks mapped by more than one device must be copied on the next write, so
such devices get a snapshotted_time newer than every mapping (a damaged time could otherwise let a write
overwrite shared data in place). A readable held metadata snapshot is carried over: its devices and mappings
are salvaged the same way and built first, the snapshot is taken, then the live devices that differ from it are
rebuilt (an unchanged device keeps sharing its tree with the snapshot, as in the source).

Memory (issue 13): each device's tree is walked once and its salvaged (thin block, block_time) pairs go to an
unlinked temporary file (``_Spill``, 16 bytes a mapping, read back in chunks); which devices share data is
decided with one byte per data block (reference counts saturating at 2); each device is rebuilt by streaming its
pairs through a ``DeviceBuilder`` (one pending node per tree level). Blocks already walked are marked in one
byte per source metadata block. Only a device whose salvaged keys come out of order (damage) is sorted in
memory. So memory follows the data and metadata device sizes, not the mapping count.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from thinpool.btree.walk import SALVAGE, NodeView, Visitor, Where, walk
from thinpool.errors import InvalidArgument, MetadataCorrupt, MetadataError
from thinpool.formats.device_details import TIME_MASK, DeviceDetails, parse_device_details
from thinpool.formats.superblock import THIN_SUPERBLOCK_MAGIC, Superblock, parse_superblock
from thinpool.io.block_store import BlockStore, FileBlockStore
from thinpool.metadata.builder import DeviceBuilder
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.units import MAX_DEV_ID


@dataclass
class RepairReport:
    devices: int = 0  # devices written to the new metadata
    mappings: int = 0  # mappings written
    dropped_devices: list[int] = field(default_factory=list)  # in the details tree but without a mapping tree
    skipped_blocks: int = 0  # unreadable / invalid nodes skipped (with their subtrees)
    dropped_mappings: int = 0  # entries dropped (out of range, out of order, beyond the data device)
    problems: list[str] = field(default_factory=list)
    transaction_id: int = 0
    data_blocks: int = 0
    held_snapshot: bool = False  # a held metadata snapshot was carried over
    held_devices: int = 0
    held_mappings: int = 0

    def note(self, msg: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(msg)


Progress = Callable[[int, int], None]  # (work done, total work): mappings walked, then mappings written
SPILL_BUFFER_BYTES = 1 << 20  # salvaged pairs buffered before they go to the temporary file
CHUNK_MAPPINGS = 1 << 16  # pairs read back and handled at once
PENDING_MAPPINGS = 1 << 14  # salvaged leaves' pairs kept back to be spilled as one batch


@dataclass
class _Segment:
    """One salvaged mapping tree in the spill: ``count`` pairs from row ``start``, in strictly increasing key
    order; ``max_data`` the highest data block (-1 without mappings)."""

    start: int
    count: int
    max_data: int = -1


class _Spill:
    """(key, value) uint64 pairs of salvaged mapping trees: buffered, then in an unlinked temporary file; read
    back as segments, in chunks. Memory: the buffer and one chunk."""

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._buf: list[np.ndarray] = []
        self._buf_bytes = 0
        self.rows = 0

    def write(self, keys: np.ndarray, values: np.ndarray) -> None:
        rows = np.empty((len(keys), 2), dtype=np.uint64)
        rows[:, 0], rows[:, 1] = keys, values
        self._buf.append(rows)
        self._buf_bytes += rows.nbytes
        self.rows += len(rows)
        if self._buf_bytes > SPILL_BUFFER_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        if self._file is None:
            import tempfile

            self._file = tempfile.TemporaryFile(prefix="thinpool-repair-")
        self._file.seek(0, os.SEEK_END)
        for rows in self._buf:
            self._file.write(rows.tobytes())
        self._buf, self._buf_bytes = [], 0

    def read(self, seg: _Segment, chunk: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, values) of ``seg`` in chunks of at most ``chunk`` pairs (CHUNK_MAPPINGS)."""
        chunk = chunk or CHUNK_MAPPINGS
        if self._file is None:  # all still buffered
            whole = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0] if self._buf else \
                np.zeros((0, 2), dtype=np.uint64)
            self._buf = [whole] if len(whole) else []
            for lo in range(seg.start, seg.start + seg.count, chunk):
                part = whole[lo:min(lo + chunk, seg.start + seg.count)]
                yield part[:, 0], part[:, 1]
            return
        self._flush()
        f = self._file
        end = seg.start + seg.count
        for lo in range(seg.start, end, chunk):
            f.seek(lo * 16)
            part = np.fromfile(f, dtype=np.uint64, count=2 * min(chunk, end - lo)).reshape(-1, 2)
            yield part[:, 0], part[:, 1]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._buf, self._buf_bytes = [], 0


class _Salvager:
    def __init__(self, src: BlockStore, report: RepairReport, spill: _Spill | None = None,
                 progress: Progress | None = None) -> None:
        self.src = src
        self.report = report
        self.spill = spill if spill is not None else _Spill()
        self.progress = progress
        self.walked = 0  # mappings salvaged so far (progress)
        self.total = 0  # mappings expected (progress): twice the details' counts (walk, then write)
        # blocks reached in the current walk: seen[b] == generation (one byte per source metadata block)
        self.seen = bytearray(src.nr_blocks)
        self.generation = 0

    def _new_walk(self) -> int:
        self.generation += 1
        if self.generation > 255:
            self.seen = bytearray(self.src.nr_blocks)
            self.generation = 1
        return self.generation

    def walk(self, root: int, leaf_vs: int, what: str) -> tuple[np.ndarray, list[bytes] | np.ndarray]:
        """Every (key, value) of the tree at ``root`` that can be read, in key order, unique keys (the one walker,
        SALVAGE policy: damaged nodes are skipped with their subtrees; a block reached twice is skipped).
        Memory: the entries found, as numpy arrays (lists of bytes for values wider than 8 bytes): for the
        details and top-level trees (an entry per device); mapping trees go through ``walk_mappings``."""
        v = _SalvageVisitor(self, what)
        walk(self.src, root, v, value_size=leaf_vs, policy=SALVAGE)
        if not v.kchunks:
            return np.zeros(0, dtype=np.uint64), []
        k_arr = np.concatenate(v.kchunks)
        vals: list[bytes] | np.ndarray = v.wide if v.is_wide else np.concatenate(v.vchunks)
        v.kchunks, v.vchunks = [], []
        return self._in_key_order(k_arr, vals)

    def _in_key_order(self, k_arr: np.ndarray, vals: list[bytes] | np.ndarray
                      ) -> tuple[np.ndarray, list[bytes] | np.ndarray]:
        # leaves come out in order when the tree is sane; enforce strictly increasing keys regardless
        if len(k_arr) > 1 and bool((k_arr[1:] > k_arr[:-1]).all()):
            return k_arr, vals
        order = np.argsort(k_arr, kind="stable")
        k_arr = k_arr[order]
        keep = np.ones(len(k_arr), dtype=bool)
        keep[1:] = k_arr[1:] != k_arr[:-1]
        self.report.dropped_mappings += int(np.count_nonzero(~keep))
        sel = order[keep]
        if isinstance(vals, list):
            return k_arr[keep], [vals[i] for i in sel.tolist()]
        return k_arr[keep], vals[sel]

    def walk_mappings(self, root: int, what: str) -> _Segment:
        """``walk`` of a mapping tree into the spill: its pairs stream to the file as leaves are read (a tree
        whose keys come out of order is read back and sorted in memory, as ``walk`` sorts)."""
        v = _SalvageVisitor(self, what, spill=True)
        start = self.spill.rows
        walk(self.src, root, v, value_size=8, policy=SALVAGE)
        v.flush()
        seg = _Segment(start, self.spill.rows - start, v.max_data)
        if v.in_order or seg.count == 0:
            return seg
        parts = list(self.spill.read(seg))
        k_arr = np.concatenate([p[0] for p in parts])
        vals = np.concatenate([p[1] for p in parts])
        del parts
        k_arr, sorted_vals = self._in_key_order(k_arr, vals)
        assert isinstance(sorted_vals, np.ndarray)
        start = self.spill.rows
        self.spill.write(k_arr, sorted_vals)
        db = sorted_vals >> np.uint64(24)
        return _Segment(start, len(k_arr), int(db.max()) if len(db) else -1)

    def advance(self, n: int) -> None:
        self.walked += n
        if self.progress is not None:
            self.progress(min(self.walked, self.total), self.total)


class _SalvageVisitor(Visitor):
    def __init__(self, sal: _Salvager, what: str, *, spill: bool = False) -> None:
        self.sal = sal
        self.src = sal.src
        self.report = sal.report
        self.what = what
        self.kchunks: list[np.ndarray] = []
        self.vchunks: list[np.ndarray] = []
        self.wide: list[bytes] = []  # values wider than 8 bytes (device details)
        self.is_wide = False
        self.generation = sal._new_walk()  # marks the blocks walked (not the nodes)
        self.to_spill = spill
        self.in_order = True  # (spilled trees) every key so far above the one before
        self.last: int | None = None
        self.max_data = -1
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # leaves not yet spilled
        self._pending_n = 0

    def _skip(self, msg: str) -> None:
        self.report.skipped_blocks += 1
        self.report.note(f"{self.what}: {msg}")

    def ref(self, b: int, where: Where) -> bool:
        if where.hi is not None and where.lo >= where.hi:
            return False  # no key can be valid below this pointer
        if not 0 < b < self.src.nr_blocks:
            self._skip(f"pointer {b} out of range: skipped")
            return False
        seen = self.sal.seen
        if seen[b] == self.generation:
            self._skip(f"block {b} reached twice (cycle or shared child): skipped")
            return False
        seen[b] = self.generation
        return True

    def error(self, err: MetadataCorrupt, where: Where) -> None:
        self._skip(err.fields["reason"] if err.fields.get("found_by") == "walker" else str(err))

    def leaf(self, view: NodeView, where: Where) -> None:
        lo, hi = where.lo, where.hi
        keys = view.keys
        if not len(keys):
            return
        values = view.values
        if self.to_spill:
            # a leaf's keys are strictly increasing (the node decoder checks it): its ends decide the range check
            if int(keys[0]) < lo or (hi is not None and int(keys[-1]) >= hi):
                ok = keys >= np.uint64(lo)
                if hi is not None:
                    ok &= keys < np.uint64(hi)
                self.report.dropped_mappings += int(np.count_nonzero(~ok))
                keys, values = keys[ok], values[ok]
                if not len(keys):
                    return
            self._pending.append((keys, values))  # views of the blocks read (immutable bytes)
            self._pending_n += len(keys)
            if self._pending_n >= PENDING_MAPPINGS:
                self.flush()
            return
        ok = keys >= np.uint64(lo)
        if hi is not None:
            ok &= keys < np.uint64(hi)
        all_ok = bool(ok.all())
        if not all_ok:
            self.report.dropped_mappings += int(np.count_nonzero(~ok))
        self.kchunks.append(keys.copy() if all_ok else keys[ok])
        if isinstance(values, list):
            self.is_wide = True
            self.wide.extend(values if all_ok else [x for x, good in zip(values, ok.tolist()) if good])
        else:
            self.vchunks.append(values.copy() if all_ok else values[ok])

    def flush(self) -> None:
        """Spill the leaves kept back (a batch: one numpy pass for the order check and the highest data block)."""
        if not self._pending:
            return
        parts, self._pending, self._pending_n = self._pending, [], 0
        k = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        v = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        if self.in_order:
            self.in_order = (self.last is None or int(k[0]) > self.last) and \
                (len(k) == 1 or bool((k[1:] > k[:-1]).all()))
            self.last = int(k[-1])
        self.max_data = max(self.max_data, int((v >> np.uint64(24)).max()))
        self.sal.spill.write(k, v)
        self.sal.advance(len(k))


def _superblock(src: BlockStore, report: RepairReport) -> Superblock:
    buf = src.read_block(0)
    try:
        return PoolMetadata.read_superblock(src)
    except MetadataError as e:
        report.note(f"superblock: {e}")
    # a bad checksum alone is survivable if the fields still make sense
    try:
        sb = parse_superblock(buf, 0)
    except MetadataError as e:
        raise MetadataCorrupt(block=0, reason=f"superblock unreadable, nothing to salvage from: {e}") from e
    if sb.magic != THIN_SUPERBLOCK_MAGIC or sb.data_block_size < 128 or sb.data_block_size % 128 or \
            sb.data_block_size > 2097152:
        raise MetadataCorrupt(block=0, reason="superblock unreadable (bad magic or data block size): nothing to "
                                              "salvage from")
    report.note("superblock checksum ignored: its fields are plausible")
    return sb


def _count_refs(counts: np.ndarray, data: np.ndarray) -> None:
    """Add one reference per entry of ``data`` to ``counts`` (uint8, saturating at 2: "mapped more than once")."""
    if not len(data):
        return
    s = np.sort(data)
    first = np.ones(len(s), dtype=bool)
    first[1:] = s[1:] != s[:-1]
    u = s[first]
    counts[u] = np.minimum(counts[u] + 1, 2)
    again = s[~first]
    if len(again):
        counts[again] = 2


def _valid(spill: _Spill, seg: _Segment, nr_data: int, limit: int
           ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The mappings of ``seg`` that repair keeps: (thin blocks, data blocks, times) uint64 chunks without those
    beyond the data device, times clamped to ``limit`` (empty chunks left out)."""
    nr = np.uint64(nr_data)
    for k, v in spill.read(seg):
        db = v >> np.uint64(24)
        t = np.minimum(v & np.uint64(TIME_MASK), np.uint64(limit))
        ok = db < nr
        if not bool(ok.all()):
            k, db, t = k[ok], db[ok], t[ok]
        if len(k):
            yield k, db, t


def _dropped(spill: _Spill, seg: _Segment, nr_data: int) -> int:
    """Mappings of ``seg`` beyond the data device."""
    if seg.max_data < nr_data:
        return 0
    nr = np.uint64(nr_data)
    return sum(int(np.count_nonzero((v >> np.uint64(24)) >= nr)) for _, v in spill.read(seg))


def _same(a: Iterator[tuple[np.ndarray, ...]], b: Iterator[tuple[np.ndarray, ...]]) -> bool:
    """Whether two streams of (thin, data, time) chunks hold the same mappings, whatever their chunking."""
    x: tuple[np.ndarray, ...] | None = None
    y: tuple[np.ndarray, ...] | None = None
    while True:
        if x is None or not len(x[0]):
            x = next(a, None)
        if y is None or not len(y[0]):
            y = next(b, None)
        if x is None or y is None:
            return x is None and y is None
        m = min(len(x[0]), len(y[0]))
        if not all(np.array_equal(p[:m], q[:m]) for p, q in zip(x, y)):
            return False
        x, y = tuple(p[m:] for p in x), tuple(q[m:] for q in y)


def _build(md: PoolMetadata, dev: int, n: int, chunks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]],
           details: DeviceDetails, sal: _Salvager) -> None:
    b = DeviceBuilder(md, dev, n, details)
    for k, db, t in chunks:
        b.add(k, db, t)
        sal.advance(len(k))
    b.finish()


def repair(src: BlockStore, dst: BlockStore, *, nr_data_blocks: int | None = None,
           progress: Progress | None = None) -> RepairReport:
    """Salvage ``src`` into freshly formatted metadata on ``dst`` (which must be a different store).

    ``progress(done, total)`` is called as mappings are salvaged and then written (total: twice the mappings
    the device details announce, the held snapshot's guessed the same as the live ones')."""
    if src is dst:
        raise InvalidArgument(reason="repair never works in place: give a different destination")
    report = RepairReport()
    sb = _superblock(src, report)
    nr_data = nr_data_blocks or sb.data_sm_root.nr_blocks
    sal = _Salvager(src, report, progress=progress)
    try:
        return _repair(sal, sb, dst, nr_data, report)
    finally:
        sal.spill.close()


def _repair(sal: _Salvager, sb: Superblock, dst: BlockStore, nr_data: int, report: RepairReport) -> RepairReport:
    src = sal.src
    details, devices, max_mapped = _salvage(sal, sb, report, "", held_follows=bool(sb.held_root))
    held_sb: Superblock | None = None
    held: dict[int, _Segment] = {}
    held_details: dict[int, DeviceDetails] = {}
    if sb.held_root:
        try:
            if not 0 < sb.held_root < src.nr_blocks:
                raise MetadataCorrupt(block=sb.held_root, reason="held root beyond the metadata device")
            held_sb = PoolMetadata.read_superblock(src, sb.held_root)
        except MetadataError as e:
            report.note(f"metadata snapshot superblock: {e}: the snapshot is dropped")
        if held_sb is not None:
            held_details, held, held_max = _salvage(sal, held_sb, report, "metadata snapshot: ")
            max_mapped = max(max_mapped, held_max)
    if not nr_data or nr_data > src.nr_blocks * 16320:
        report.note(f"data space map size {nr_data} implausible: using the highest mapped block")
        nr_data = max_mapped + 1
    nr_data = max(nr_data, 1)
    report.dropped_devices = sorted(set(details) - set(devices))
    spill = sal.spill
    # mappings beyond the data device are dropped, times clamped to the pool time (as the chunks are read)
    pool_time = sb.time
    held_time = min(held_sb.time, pool_time) if held_sb is not None else pool_time
    kept_count: dict[tuple[bool, int], int] = {}
    for is_held, segs in ((False, devices), (True, held)):
        for dev, seg in segs.items():
            drop = _dropped(spill, seg, nr_data)
            report.dropped_mappings += drop
            kept_count[is_held, dev] = seg.count - drop
    # shared data blocks: the next write by any device mapping one must copy it, so those devices get a
    # snapshotted_time newer than all their (clamped) mapping times. One byte per data block: 0, 1, "2 or more".
    sharers: set[int] = set()
    counts = np.zeros(nr_data, dtype=np.uint8)
    for seg in devices.values():
        for _, db, _ in _valid(spill, seg, nr_data, pool_time):
            _count_refs(counts, db)
    if bool((counts >= 2).any()):
        for dev, seg in devices.items():
            if any(bool((counts[db] >= 2).any()) for _, db, _ in _valid(spill, seg, nr_data, pool_time)):
                sharers.add(dev)
    del counts  # freed before the build
    new_time = pool_time
    if sharers:
        if pool_time >= TIME_MASK:
            raise MetadataCorrupt(block=0, reason="pool time at its 24-bit limit: cannot mark shared data safely")
        new_time = pool_time + 1
    md = PoolMetadata.format(dst, data_block_size=sb.data_block_size, nr_data_blocks=nr_data)
    live_details = {dev: _details(details.get(dev), kept_count[False, dev], sb, pool_time,
                                  new_time if dev in sharers else None) for dev in devices}
    kept: set[int] = set()
    if held_sb is not None:
        # the snapshot first (its own time and transaction id), then hold it
        for dev in sorted(held):
            n = kept_count[True, dev]
            _build(md, dev, n, _valid(spill, held[dev], nr_data, held_time),
                   _details(held_details.get(dev), n, held_sb, held_time, None), sal)
            report.held_mappings += n
        md.time = held_time
        md.trans_id = held_sb.trans_id
        md.reserve_metadata_snap()
        report.held_snapshot = True
        report.held_devices = len(held)
        # live devices equal to their snapshot copy keep the shared tree; the others are replaced
        for dev in sorted(held):
            same = dev in devices and kept_count[True, dev] == kept_count[False, dev] and \
                _same(_valid(spill, held[dev], nr_data, held_time), _valid(spill, devices[dev], nr_data, pool_time))
            if same:
                kept.add(dev)
                d = live_details[dev]
                det = md.devices[dev]
                if (det.mapped_blocks, det.transaction_id, det.creation_time, det.snapshotted_time) != \
                        (d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time):
                    det.transaction_id, det.creation_time = d.transaction_id, d.creation_time
                    det.snapshotted_time, det.changed = d.snapshotted_time, True
            else:
                md.delete_thin(dev)
    md.time = new_time
    for dev in sorted(devices):
        n = kept_count[False, dev]
        if dev not in kept:
            _build(md, dev, n, _valid(spill, devices[dev], nr_data, pool_time), live_details[dev], sal)
        report.mappings += n
    md.trans_id = sb.trans_id
    md.commit()
    report.devices = len(devices)
    report.transaction_id = sb.trans_id
    report.data_blocks = nr_data
    return report


def repair_file(src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str], *,
                nr_data_blocks: int | None = None, progress: Progress | None = None) -> RepairReport:
    """Repair the metadata file ``src_path`` into ``dst_path`` (created with src's size when missing)."""
    src_path, dst_path = os.fspath(src_path), os.fspath(dst_path)
    if os.path.exists(dst_path) and os.path.samefile(src_path, dst_path):
        raise InvalidArgument(reason="repair never works in place: give a different destination")
    src = FileBlockStore(src_path, readonly=True)
    try:
        if not os.path.exists(dst_path):
            with open(dst_path, "wb") as f:
                f.truncate(src.nr_blocks * 4096)
        dst = FileBlockStore(dst_path)
        try:
            if dst.nr_blocks < 16:
                raise InvalidArgument(reason=f"destination {dst_path} too small ({dst.nr_blocks} blocks)")
            zero = bytes(4096)
            dst.write_block(0, zero)  # whatever was there is no longer a superblock until the new one lands
            dst.sync()
            return repair(src, dst, nr_data_blocks=nr_data_blocks, progress=progress)
        finally:
            dst.close()
    finally:
        src.close()




def _details(d: DeviceDetails | None, mapped: int, sb: Superblock, pool_time: int,
             snapped_override: int | None) -> DeviceDetails:
    """A salvaged device's details: times clamped to the pool time, the superblock's transaction id when the
    details were lost."""
    creation = min(d.creation_time, pool_time) if d is not None else pool_time
    snapped = min(d.snapshotted_time, pool_time) if d is not None else pool_time
    if snapped_override is not None:
        snapped = snapped_override
    trans = d.transaction_id if d is not None else sb.trans_id
    return DeviceDetails(mapped, trans, creation, snapped)


def _salvage(sal: _Salvager, sb: Superblock, report: RepairReport, label: str, *, held_follows: bool = False
             ) -> tuple[dict[int, DeviceDetails], dict[int, _Segment], int]:
    """Devices (details where readable; the top level of the mapping tree decides) and their mappings (spilled)
    from the trees of ``sb`` (the live superblock or the held snapshot's). Returns (details, devices, highest data
    block)."""
    top_k, top_v = sal.walk(sb.data_mapping_root, 8, f"{label}mapping tree (top level)")
    det_k, det_v = sal.walk(sb.device_details_root, 24, f"{label}device details")
    details: dict[int, DeviceDetails] = {}
    for k, v in zip(det_k.tolist(), det_v):
        try:
            details[int(k)] = parse_device_details(v)
        except Exception:  # noqa: BLE001 - a 24-byte value always parses; be safe with damaged data
            report.dropped_mappings += 1
    if not sal.total:  # progress: walk then write what the details announce (a held snapshot: as much again)
        sal.total = 2 * sum(d.mapped_blocks for d in details.values()) * (2 if held_follows else 1)
    devices: dict[int, _Segment] = {}
    max_mapped = -1
    for dev, root in zip(top_k.tolist(), top_v):
        if dev > MAX_DEV_ID:
            report.note(f"{label}device id {dev} out of range: dropped")
            continue
        seg = sal.walk_mappings(int(root), f"{label}mapping tree of device {dev}")
        devices[int(dev)] = seg
        max_mapped = max(max_mapped, seg.max_data)
    return details, devices, max_mapped
