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
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from thinpool.btree.walk import SALVAGE, NodeView, Visitor, Where, walk
from thinpool.errors import InvalidArgument, MetadataCorrupt, MetadataError
from thinpool.formats.device_details import TIME_MASK, DeviceDetails, parse_device_details
from thinpool.formats.superblock import THIN_SUPERBLOCK_MAGIC, Superblock, parse_superblock
from thinpool.io.block_store import BlockStore, FileBlockStore
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


class _Salvager:
    def __init__(self, src: BlockStore, report: RepairReport) -> None:
        self.src = src
        self.report = report

    def walk(self, root: int, leaf_vs: int, what: str) -> tuple[np.ndarray, list[bytes] | np.ndarray]:
        """Every (key, value) of the tree at ``root`` that can be read, in key order, unique keys (the one walker,
        SALVAGE policy: damaged nodes are skipped with their subtrees; a block reached twice is skipped).
        Memory: the entries found, as numpy arrays (lists of bytes for values wider than 8 bytes)."""
        v = _SalvageVisitor(self.src, self.report, what)
        walk(self.src, root, v, value_size=leaf_vs, policy=SALVAGE)
        if not v.kchunks:
            return np.zeros(0, dtype=np.uint64), []
        k_arr = np.concatenate(v.kchunks)
        vals: list[bytes] | np.ndarray = v.wide if v.is_wide else np.concatenate(v.vchunks)
        v.kchunks, v.vchunks = [], []
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


class _SalvageVisitor(Visitor):
    def __init__(self, src: BlockStore, report: RepairReport, what: str) -> None:
        self.src = src
        self.report = report
        self.what = what
        self.kchunks: list[np.ndarray] = []
        self.vchunks: list[np.ndarray] = []
        self.wide: list[bytes] = []  # values wider than 8 bytes (device details)
        self.is_wide = False
        self.seen: set[int] = set()  # block numbers walked (not the nodes)

    def _skip(self, msg: str) -> None:
        self.report.skipped_blocks += 1
        self.report.note(f"{self.what}: {msg}")

    def ref(self, b: int, where: Where) -> bool:
        if where.hi is not None and where.lo >= where.hi:
            return False  # no key can be valid below this pointer
        if not 0 < b < self.src.nr_blocks:
            self._skip(f"pointer {b} out of range: skipped")
            return False
        if b in self.seen:
            self._skip(f"block {b} reached twice (cycle or shared child): skipped")
            return False
        self.seen.add(b)
        return True

    def error(self, err: MetadataCorrupt, where: Where) -> None:
        self._skip(err.fields["reason"] if err.fields.get("found_by") == "walker" else str(err))

    def leaf(self, view: NodeView, where: Where) -> None:
        lo, hi = where.lo, where.hi
        keys = view.keys
        if not len(keys):
            return
        ok = keys >= np.uint64(lo)
        if hi is not None:
            ok &= keys < np.uint64(hi)
        all_ok = bool(ok.all())
        if not all_ok:
            self.report.dropped_mappings += int(np.count_nonzero(~ok))
        values = view.values
        self.kchunks.append(keys.copy() if all_ok else keys[ok])
        if isinstance(values, list):
            self.is_wide = True
            self.wide.extend(values if all_ok else [x for x, good in zip(values, ok.tolist()) if good])
        else:
            self.vchunks.append(values.copy() if all_ok else values[ok])


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


def repair(src: BlockStore, dst: BlockStore, *, nr_data_blocks: int | None = None) -> RepairReport:
    """Salvage ``src`` into freshly formatted metadata on ``dst`` (which must be a different store)."""
    if src is dst:
        raise InvalidArgument(reason="repair never works in place: give a different destination")
    report = RepairReport()
    sb = _superblock(src, report)
    nr_data = nr_data_blocks or sb.data_sm_root.nr_blocks
    sal = _Salvager(src, report)
    details, devices, max_mapped = _salvage(sal, sb, report, "")
    held_sb: Superblock | None = None
    held: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
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
    # drop mappings beyond the data device, clamp times to the pool time
    pool_time = sb.time
    held_time = min(held_sb.time, pool_time) if held_sb is not None else pool_time
    for devs, limit in ((devices, pool_time), (held, held_time)):
        for dev, (k, db, t) in list(devs.items()):
            ok = db < np.uint64(nr_data)
            if bool(ok.all()):  # the usual case: no copies
                devs[dev] = (k, db, np.minimum(t, np.uint64(limit), out=t))
                continue
            report.dropped_mappings += int(np.count_nonzero(~ok))
            t = np.minimum(t[ok], np.uint64(limit))
            devs[dev] = (k[ok], db[ok], t)
    # shared data blocks: the next write by any device mapping one must copy it, so those devices get a
    # snapshotted_time newer than all their (clamped) mapping times
    all_db = np.concatenate([db for _, db, _ in devices.values()]) if devices else np.zeros(0, np.uint64)
    sharers: set[int] = set()
    if len(all_db):
        uniq, counts = np.unique(all_db, return_counts=True)
        shared = uniq[counts > 1]
        if len(shared):
            sharers = {dev for dev, (_, db, _) in devices.items() if np.isin(db, shared).any()}
        del uniq, counts, shared
    del all_db  # freed before the build: memory then holds the devices' mappings and one device's tree
    new_time = pool_time
    if sharers:
        if pool_time >= TIME_MASK:
            raise MetadataCorrupt(block=0, reason="pool time at its 24-bit limit: cannot mark shared data safely")
        new_time = pool_time + 1
    md = PoolMetadata.format(dst, data_block_size=sb.data_block_size, nr_data_blocks=nr_data)
    live_details = {dev: _details(details.get(dev), len(devices[dev][0]), sb, pool_time,
                                  new_time if dev in sharers else None) for dev in devices}
    kept: set[int] = set()
    if held_sb is not None:
        # the snapshot first (its own time and transaction id), then hold it
        for dev in sorted(held):
            k, db, t = held[dev]
            md.build_device(dev, k, db, t, _details(held_details.get(dev), len(k), held_sb, held_time, None))
            report.held_mappings += len(k)
        md.time = held_time
        md.trans_id = held_sb.trans_id
        md.reserve_metadata_snap()
        report.held_snapshot = True
        report.held_devices = len(held)
        # live devices equal to their snapshot copy keep the shared tree; the others are replaced
        for dev in sorted(held):
            same = dev in devices and all(np.array_equal(a, b) for a, b in zip(held[dev], devices[dev]))
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
        k, db, t = devices[dev]
        if dev not in kept:
            md.build_device(dev, k, db, t, live_details[dev])
        report.mappings += len(k)
        empty = np.zeros(0, dtype=np.uint64)
        devices[dev] = (empty, empty, empty)  # this device's arrays are no longer needed (freed)
        del k, db, t
    md.trans_id = sb.trans_id
    md.commit()
    report.devices = len(devices)
    report.transaction_id = sb.trans_id
    report.data_blocks = nr_data
    return report


def repair_file(src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str], *,
                nr_data_blocks: int | None = None) -> RepairReport:
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
            return repair(src, dst, nr_data_blocks=nr_data_blocks)
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


def _salvage(sal: _Salvager, sb: Superblock, report: RepairReport, label: str
             ) -> tuple[dict[int, DeviceDetails], dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], int]:
    """Devices (details where readable; the top level of the mapping tree decides) and their mappings from the
    trees of ``sb`` (the live superblock or the held snapshot's). Returns (details, devices, highest data block)."""
    top_k, top_v = sal.walk(sb.data_mapping_root, 8, f"{label}mapping tree (top level)")
    det_k, det_v = sal.walk(sb.device_details_root, 24, f"{label}device details")
    details: dict[int, DeviceDetails] = {}
    for k, v in zip(det_k.tolist(), det_v):
        try:
            details[int(k)] = parse_device_details(v)
        except Exception:  # noqa: BLE001 - a 24-byte value always parses; be safe with damaged data
            report.dropped_mappings += 1
    devices: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    max_mapped = -1
    for dev, root in zip(top_k.tolist(), top_v):
        if dev > MAX_DEV_ID:
            report.note(f"{label}device id {dev} out of range: dropped")
            continue
        k, v = sal.walk(int(root), 8, f"{label}mapping tree of device {dev}")
        vals = np.asarray(v, dtype=np.uint64) if len(v) else np.zeros(0, dtype=np.uint64)
        db = vals >> np.uint64(24)
        t = vals & np.uint64(TIME_MASK)
        devices[int(dev)] = (k, db, t)
        if len(db):
            max_mapped = max(max_mapped, int(db.max()))
    return details, devices, max_mapped
