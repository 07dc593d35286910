"""Thin-pool metadata: superblock, device-details tree, two-level mapping tree, space maps; the dm-thin messages.

Layer: metadata. May import: errors, units, checksum, formats, io, tx, btree, spacemap.

Layout (kernel dm-thin-metadata.c):
- block 0: superblock; everything else is reached from it.
- details tree: dev_id -> struct disk_device_details (24 bytes).
- mapping tree, two levels: dev_id -> root of that device's tree; thin block -> block_time (data<<24 | time).
- data space map (index btree + bitmaps + ref-count tree), metadata space map (index block + bitmaps +
  ref-count tree, counting itself).

A snapshot shares its origin's mapping root (one metadata reference more, O(1)). Writes shadow the top-level path
first, then the device's own tree, so a shared tree is copied node by node on the way down and each copy takes a
reference on what it points to (the kernel's shadowing with inc_children).

Public methods check state (read-only, failed) then run inside the open transaction; ``commit`` makes it durable,
``abort`` returns to the last commit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from thinpool import checksum
from thinpool.btree.btree import BTree, NoRefValue
from thinpool.btree.two_level import TwoLevelTree
from thinpool.checksum import BlockType
from thinpool.errors import (
    BadDeviceId,
    DeviceExists,
    DeviceNotFound,
    InvalidArgument,
    MetadataCorrupt,
    NeedsCheck,
    PoolFailed,
    ReadOnly,
    ThinpoolError,
    TransactionIdMismatch,
    UnsupportedMetadata,
)
from thinpool.formats.device_details import (
    MAX_DATA_BLOCK,
    TIME_BITS,
    TIME_MASK,
    DeviceDetails,
    build_device_details,
    pack_block_time,
    parse_device_details,
    unpack_block_time,
    unpack_block_times,
)
from thinpool.formats.space_map import ENTRIES_PER_BITMAP, MAX_METADATA_BITMAPS, SmRoot
from thinpool.formats.superblock import (
    NEEDS_CHECK_FLAG,
    THIN_SUPERBLOCK_MAGIC,
    THIN_VERSION,
    Superblock,
    build_superblock,
)
from thinpool.io.block_store import BlockStore
from thinpool.metadata.readonly import read_superblock, snapshot_superblock
from thinpool.metadata.thin_device import (
    MAPPING_CACHE_MAX_ENTRIES,
    MAX_MAPPING_CACHES,
    MappingCache,
    ThinDeviceMetadata,
)
from thinpool.spacemap.core import RootSpaceMap
from thinpool.spacemap.disk import DiskSpaceMap
from thinpool.spacemap.metadata_paged import MetadataSpaceMap, read_metadata_index
from thinpool.spacemap.paged import FreedBlocks as FreedBlocks  # re-exported: the pool uses it
from thinpool.spacemap.paged import PagedSpaceMap
from thinpool.spacemap.paged import sorted_unique as sorted_unique  # re-exported: the pool uses it
from thinpool.tx.transaction import TransactionManager
from thinpool.units import MAX_DEV_ID, MAX_METADATA_BLOCKS, METADATA_BLOCK_SIZE_SECTORS, lazy_module

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

MIN_METADATA_BLOCKS = 16
_KEY_LIMIT = 1 << 64  # thin blocks are 64-bit keys


class ThinDetails:
    """In-core device details (kernel struct dm_thin_device) with a ``changed`` flag. Setting the flag also
    records the device in its metadata's set of changed devices (``owner``), so a commit visits the devices
    changed in the transaction, not every device of the pool."""

    __slots__ = ("dev_id", "mapped_blocks", "transaction_id", "creation_time", "snapshotted_time", "_changed",
                 "_owner")

    def __init__(self, dev_id: int, mapped_blocks: int, transaction_id: int, creation_time: int,
                 snapshotted_time: int, changed: bool = False, owner: set[int] | None = None) -> None:
        self.dev_id = dev_id
        self.mapped_blocks = mapped_blocks
        self.transaction_id = transaction_id
        self.creation_time = creation_time
        self.snapshotted_time = snapshotted_time
        self._owner = owner
        self._changed = False
        self.changed = changed

    @property
    def changed(self) -> bool:
        return self._changed

    @changed.setter
    def changed(self, value: bool) -> None:
        self._changed = value
        if value and self._owner is not None:
            self._owner.add(self.dev_id)

    def __repr__(self) -> str:
        return (f"ThinDetails(dev_id={self.dev_id}, mapped_blocks={self.mapped_blocks}, transaction_id="
                f"{self.transaction_id}, creation_time={self.creation_time}, snapshotted_time="
                f"{self.snapshotted_time}, changed={self._changed})")

    def to_disk(self) -> DeviceDetails:
        return DeviceDetails(self.mapped_blocks, self.transaction_id, self.creation_time, self.snapshotted_time)


class MappingValue:
    """Bottom-level leaf values (block_time): each holds one reference on its data block."""

    size = 8
    batch_dec = True  # dec takes a whole uint64 array (BTree.delete batches leaves)

    def __init__(self, data_sm: PagedSpaceMap) -> None:
        self.data_sm = data_sm

    def inc(self, values: Any) -> None:
        if len(values):
            self.data_sm.inc_many(unpack_block_times(np.frombuffer(values, dtype=np.uint64))[0])

    def dec_one(self, value: int) -> None:
        """``dec([value])``: an overwritten mapping (a copy-on-write remap) gives up its data block."""
        self.data_sm.dec(value >> TIME_BITS)

    def dec(self, values: Any) -> None:
        if type(values) is list and len(values) == 1:
            # Fast path (profiled): an overwritten or removed single mapping. Going through np.unique for one
            # value made the overwrite path of insert/remove ~3x slower.
            self.data_sm.dec(int(values[0]) >> TIME_BITS)
            return
        if len(values):
            arr = np.frombuffer(values, dtype=np.uint64) if not isinstance(values, list) else \
                np.array(values, np.uint64)
            self.data_sm.dec_many(unpack_block_times(arr)[0].astype(np.int64))


class SubtreeValue:
    """Top-level leaf values: each holds one metadata reference on a device's mapping-tree root."""

    size = 8

    def __init__(self, tm: TransactionManager, mapping: BTree) -> None:
        self.tm = tm
        self.mapping = mapping

    def inc(self, values: Any) -> None:
        for b in values:
            self.tm.inc(int(b))

    def dec(self, values: Any) -> None:
        for b in list(values):
            self.mapping.delete(int(b))


class PoolMetadata:
    """An open pool metadata device."""

    def __init__(self, store: BlockStore, tm: TransactionManager, sb: Superblock,
                 meta: DiskSpaceMap | MetadataSpaceMap, data: PagedSpaceMap, *, readonly: bool) -> None:
        self.store = store
        self.tm = tm
        self.sb = sb  # the last committed superblock
        self.meta_disk = meta
        self.data_disk = data
        self.readonly = readonly
        self.failed = False
        self.data_sm = data
        self.mapping = BTree(tm, MappingValue(self.data_sm))
        self.top = BTree(tm, SubtreeValue(tm, self.mapping))
        self.tree = TwoLevelTree(self.top, self.mapping)
        self.details_tree = BTree(tm, NoRefValue(24))
        self._mcaches: dict[int, MappingCache] = {}  # per-device lookup caches (metadata/thin_device.py)
        # per device, the chunks whose copy-on-write is deferred (thin.py): {thin block: [shared data block, new
        # data block, fresh-sector bits]}. The new mapping is in the tree (uncommitted); the new block holds the
        # sectors written since, the rest still comes from the shared block. The data path completes them before
        # a commit; this state only goes with the transaction: a reload (abort, open) forgets them, as do the
        # removal of their mappings and the deletion of their device. Each device's dict is kept (cleared, never
        # replaced) so the data path can hold it.
        self._pending: dict[int, dict[int, list[int]]] = {}
        self._load_state(sb)

    def _load_state(self, sb: Superblock) -> None:
        self._forget_mappings()
        self.tree.forget()
        for p in self._pending.values():
            p.clear()
        self.time = sb.time
        self.trans_id = sb.trans_id
        self.flags = sb.flags
        self.held_root = sb.held_root
        self.mapping_root = sb.data_mapping_root
        self.details_root = sb.device_details_root
        self.devices: dict[int, ThinDetails] = {}
        self._changed_ids: set[int] = set()  # devices whose details changed in this transaction
        for dev_id, raw in self.details_tree.items(self.details_root):
            d = parse_device_details(raw)
            self.devices[dev_id] = ThinDetails(dev_id, d.mapped_blocks, d.transaction_id, d.creation_time,
                                               d.snapshotted_time, owner=self._changed_ids)
        self._roots: dict[int, int] = {k: int(v) for k, v in self.top.items(self.mapping_root)}
        if set(self._roots) != set(self.devices):
            raise MetadataCorrupt(block=self.details_root, reason="details tree and mapping tree disagree on "
                                  f"devices ({sorted(set(self._roots) ^ set(self.devices))[:5]})")

    # --- format / open ----------------------------------------------------------------------------------------
    @classmethod
    def format(cls, store: BlockStore, *, data_block_size: int, nr_data_blocks: int) -> PoolMetadata:
        """Write fresh, empty metadata. ``data_block_size`` in sectors (128..2097152, multiple of 128)."""
        if data_block_size < 128 or data_block_size > 2097152 or data_block_size % 128:
            raise InvalidArgument(reason=f"data block size {data_block_size} sectors: must be 128..2097152 in "
                                         "steps of 128")
        nr_meta = min(store.nr_blocks, MAX_METADATA_BLOCKS)
        if nr_meta < MIN_METADATA_BLOCKS:
            raise InvalidArgument(reason=f"metadata device too small: {nr_meta} blocks, need >= {MIN_METADATA_BLOCKS}")
        if nr_data_blocks < 1:
            raise InvalidArgument(reason="the pool needs at least one data block")
        tm = TransactionManager(store, RootSpaceMap(nr_meta, 0))
        meta = MetadataSpaceMap.create(tm, nr_meta)  # counts the superblock; becomes tm.sm
        data = PagedSpaceMap.create(tm, nr_data_blocks)
        details_root = BTree(tm, NoRefValue(24)).empty()
        mapping_root = BTree(tm, NoRefValue(8)).empty()
        sb = Superblock(flags=0, blocknr=0, uuid=bytes(16), magic=THIN_SUPERBLOCK_MAGIC, version=THIN_VERSION,
                        time=0, trans_id=0, held_root=0, data_sm_root=SmRoot(0, 0, 0, 0),
                        metadata_sm_root=SmRoot(0, 0, 0, 0), data_mapping_root=mapping_root,
                        device_details_root=details_root, data_block_size=data_block_size,
                        metadata_block_size=METADATA_BLOCK_SIZE_SECTORS, metadata_nr_blocks=nr_meta)
        pmd = cls(store, tm, sb, meta, data, readonly=False)
        pmd.commit()
        return pmd

    @staticmethod
    def read_superblock(store: BlockStore, blocknr: int = 0) -> Superblock:
        """Read and validate a superblock as the kernel's sb_check does (``metadata.readonly.read_superblock``)."""
        return read_superblock(store, blocknr)

    @classmethod
    def open(cls, store: BlockStore, *, readonly: bool = False, use_metadata_snap: bool = False,
             allow_needs_check: bool = False, space_maps: bool = True) -> PoolMetadata:
        """Open existing metadata. ``use_metadata_snap`` reads through the held metadata snapshot (read-only).
        ``space_maps=False`` (read-only tools such as dump) reads only the superblock, details and mappings."""
        sb = cls.read_superblock(store)
        if not space_maps:
            ro_core = RootSpaceMap(store.nr_blocks, sb.metadata_sm_root.nr_allocated)
            tm = TransactionManager(store, ro_core)
            view = cls._snap_view(store, sb) if use_metadata_snap else sb
            ro_meta = DiskSpaceMap(tm, ro_core, is_metadata=True, bitmap_blocks=[], ref_count_root=0,  # type: ignore[arg-type]
                                   index_root=0)
            ro_data = PagedSpaceMap.load(tm, sb.data_sm_root)  # O(1): nothing is read unless counted
            return cls(store, tm, view, ro_meta, ro_data, readonly=True)
        if sb.incompat_flags:
            raise UnsupportedMetadata(feature=f"incompat flags {sb.incompat_flags:#x}")
        if sb.compat_ro_flags and not readonly:
            raise UnsupportedMetadata(feature=f"compat_ro flags {sb.compat_ro_flags:#x} (open read-only)")
        if sb.needs_check and not readonly and not allow_needs_check:
            raise NeedsCheck()
        mroot = sb.metadata_sm_root
        if mroot.nr_blocks > store.nr_blocks:
            raise MetadataCorrupt(block=0, reason=f"metadata device ({store.nr_blocks} blocks) too small: "
                                                  f"expected {mroot.nr_blocks}")
        if mroot.nr_blocks == 0 or -(-mroot.nr_blocks // ENTRIES_PER_BITMAP) > MAX_METADATA_BITMAPS:
            raise MetadataCorrupt(block=0, reason=f"bad metadata space map size {mroot.nr_blocks}")
        meta: DiskSpaceMap | MetadataSpaceMap
        if readonly or use_metadata_snap:
            # A read-only open reads no bitmap (only the metadata index block, one block, for its checksum and the
            # bitmaps' locations): sizes and counts come from the superblock's roots, as the kernel's status does.
            ro = RootSpaceMap(mroot.nr_blocks, mroot.nr_allocated)
            tm = TransactionManager(store, ro)
            entries = read_metadata_index(tm, mroot)
            meta = DiskSpaceMap(tm, ro, is_metadata=True, bitmap_blocks=[e[0] for e in entries],  # type: ignore[arg-type]
                                ref_count_root=mroot.ref_count_root, index_root=mroot.bitmap_root)
        else:
            # paged as the data map is: the index block is read now, a bitmap when a block it covers is counted
            tm = TransactionManager(store, RootSpaceMap(mroot.nr_blocks, mroot.nr_allocated))
            meta = MetadataSpaceMap.load(tm, mroot)
        data = PagedSpaceMap.load(tm, sb.data_sm_root, validate=not readonly)
        view = sb
        if use_metadata_snap:
            view = cls._snap_view(store, sb)
            readonly = True
        return cls(store, tm, view, meta, data, readonly=readonly)

    @classmethod
    def _snap_view(cls, store: BlockStore, sb: Superblock) -> Superblock:
        return snapshot_superblock(store, sb)

    # --- properties -------------------------------------------------------------------------------------------
    @property
    def data_block_size(self) -> int:
        """Sectors per data block."""
        return self.sb.data_block_size

    @property
    def nr_data_blocks(self) -> int:
        return self.data_sm.nr_blocks

    @property
    def nr_metadata_blocks(self) -> int:
        return self.tm.sm.nr_blocks

    @property
    def needs_check(self) -> bool:
        return bool(self.flags & NEEDS_CHECK_FLAG)

    def _check_writable(self) -> None:
        if self.failed:
            raise PoolFailed()
        if self.readonly:
            raise ReadOnly()

    # --- devices ----------------------------------------------------------------------------------------------
    def device_ids(self) -> list[int]:
        return sorted(self.devices)

    def get_device(self, dev_id: int) -> ThinDetails:
        d = self.devices.get(dev_id)
        if d is None:
            raise DeviceNotFound(dev_id=dev_id)
        return d

    def device(self, dev_id: int) -> ThinDeviceMetadata:
        """The per-device handle the data path uses (metadata/thin_device.py); it does not check that the
        device exists yet (its calls raise DeviceNotFound once it does not)."""
        return ThinDeviceMetadata(self, dev_id)

    def mapping_cache(self, dev_id: int) -> MappingCache:
        """The lookup cache of ``dev_id`` (metadata/thin_device.py MappingCache), created on first use.

        Raises:
            DeviceNotFound: no device ``dev_id``.
        """
        caches = self._mcaches
        c = caches.get(dev_id)
        if c is None:
            # One budget for the pool, not per device: at most MAX_MAPPING_CACHES devices keep a cache, and a new
            # one evicts the least recently opened until the entries held fit 4 devices' worth. An evicted cache
            # is invalidated, so its holders (and a lock-free read in flight) fetch a new one.
            held = sum(len(x.map) for x in caches.values())
            while caches and (len(caches) >= MAX_MAPPING_CACHES or held > 4 * MAPPING_CACHE_MAX_ENTRIES):
                old = caches.pop(next(iter(caches)))
                held -= len(old.map)
                old.invalidate()
            c = caches[dev_id] = MappingCache(self, dev_id, self.get_device(dev_id))
        else:  # most recently used last (dicts keep insertion order)
            del caches[dev_id]
            caches[dev_id] = c
        return c

    def _device_table_changed(self, dev_id: int) -> None:
        """A device is created, snapshotted or deleted: no leaf the mapping tree kept writable for inserts
        (btree/two_level.py) is trusted past this (the sharing generation moves; create_snap's inc and delete's
        removal move it too)."""
        self.tm.share_gen += 1
        self.tree.forget(dev_id)

    def _forget_mappings(self, dev_id: int | None = None) -> None:
        """Drop the lookup cache of ``dev_id`` (all devices' when None): its mappings or root changed other than
        by ``insert``, or the in-core state is reloaded."""
        if dev_id is None:
            for c in self._mcaches.values():
                c.invalidate()
            self._mcaches.clear()
        else:
            old = self._mcaches.pop(dev_id, None)
            if old is not None:
                old.invalidate()

    def pending_copies(self, dev_id: int) -> dict[int, list[int]]:
        """The deferred copies of ``dev_id`` (see ``__init__``): the same dict for the life of the pool."""
        p = self._pending.get(dev_id)
        if p is None:
            p = self._pending[dev_id] = {}
        return p

    def pending_devices(self) -> list[tuple[int, dict[int, list[int]]]]:
        """(dev_id, its deferred copies) for each device with some."""
        return [(d, p) for d, p in self._pending.items() if p]

    def _drop_pending(self, dev_id: int, lo: int = 0, hi: int | None = None) -> None:
        """Forget the deferred copies of ``dev_id``'s chunks in [lo, hi) (their mappings went away)."""
        p = self._pending.get(dev_id)
        if not p:
            return
        if hi is None:
            p.clear()
            return
        for c in [c for c in p if lo <= c < hi]:
            del p[c]

    def device_root(self, dev_id: int) -> int:
        self.get_device(dev_id)
        return self._roots[dev_id]

    @staticmethod
    def _check_id(dev_id: int) -> None:
        if not 0 <= dev_id <= MAX_DEV_ID:
            raise BadDeviceId(dev_id=dev_id)

    def create_thin(self, dev_id: int) -> None:
        """dm-thin 'create_thin': a new device with an empty mapping tree."""
        self._check_writable()
        self._check_id(dev_id)
        if dev_id in self.devices:
            raise DeviceExists(dev_id=dev_id)
        sub = self.mapping.empty()
        self._device_table_changed(dev_id)
        self.mapping_root, _ = self.top.insert(self.mapping_root, dev_id, sub)
        self._forget_mappings(dev_id)
        self._roots[dev_id] = sub
        self.devices[dev_id] = ThinDetails(dev_id, 0, self.trans_id, self.time, self.time, changed=True,
                                           owner=self._changed_ids)

    def create_snap(self, dev_id: int, origin_id: int) -> None:
        """dm-thin 'create_snap': share the origin's mapping root (O(1)) and bump the pool time."""
        self._check_writable()
        self._check_id(dev_id)
        if dev_id in self.devices:
            raise DeviceExists(dev_id=dev_id)
        origin = self.get_device(origin_id)
        if self.time >= TIME_MASK:
            raise InvalidArgument(reason="pool time would overflow 24 bits")
        root = self._roots[origin_id]
        self._device_table_changed(dev_id)
        self.tm.inc(root)
        self.mapping_root, _ = self.top.insert(self.mapping_root, dev_id, root)
        self._forget_mappings(dev_id)
        self._roots[dev_id] = root
        self.time += 1
        origin.snapshotted_time = self.time
        origin.changed = True
        self.devices[dev_id] = ThinDetails(dev_id, origin.mapped_blocks, self.trans_id, self.time, self.time,
                                           changed=True, owner=self._changed_ids)

    def delete_thin(self, dev_id: int) -> None:
        """dm-thin 'delete': drop the device; only blocks nobody else references are freed."""
        self._check_writable()
        self.get_device(dev_id)
        self._device_table_changed(dev_id)
        self.mapping_root, _ = self.top.remove(self.mapping_root, dev_id)
        self.details_root, _ = self.details_tree.remove(self.details_root, dev_id)
        del self.devices[dev_id]
        del self._roots[dev_id]
        self._drop_pending(dev_id)
        # Every device's cache, not only this one's: a block this device shared may now have one holder left,
        # whose copy-on-write can free it within this transaction; a lock-free read of another device through an
        # older mapping of it must then see its cache dropped (thin.py ThinDevice.read).
        self._forget_mappings()

    # --- mappings ---------------------------------------------------------------------------------------------
    def lookup(self, dev_id: int, thin_block: int) -> tuple[int, int] | None:
        """(data_block, time) mapped at ``thin_block``, or None."""
        root = self._roots.get(dev_id)
        if root is None:
            raise DeviceNotFound(dev_id=dev_id)
        v = self.mapping.lookup(root, thin_block)
        if v is None:
            return None
        data_block, t = unpack_block_time(v)
        if data_block >= self.data_sm.nr_blocks and self.data_sm.nr_blocks:
            raise MetadataCorrupt(block=root, reason=f"device {dev_id} block {thin_block} maps to data block "
                                                     f"{data_block} beyond the data device")
        return data_block, t

    def is_shared(self, dev_id: int, mapping_time: int) -> bool:
        """The kernel's __snapshotted_since: the mapping may be shared, so a write must copy.

        Raises:
            DeviceNotFound: no device ``dev_id``.
        """
        return self.get_device(dev_id).snapshotted_time > mapping_time

    def alloc_data_block(self) -> int:
        if self.failed or self.readonly:
            self._check_writable()
        return self.data_sm.new_block()

    def insert(self, dev_id: int, thin_block: int, data_block: int, time: int | None = None) -> None:
        """Map ``thin_block`` -> ``data_block`` at the pool time. The mapping takes over the caller's reference
        on the data block (from ``alloc_data_block``); a replaced mapping drops its own."""
        if self.failed or self.readonly:
            self._check_writable()
        d = self.devices.get(dev_id)
        if d is None:
            raise DeviceNotFound(dev_id=dev_id)
        # Reject what would otherwise surface as OverflowError from array('Q') or as a mapping past the data
        # device that only a checker notices later.
        if not 0 <= data_block < self.data_sm.nr_blocks or not 0 <= thin_block < _KEY_LIMIT:
            raise InvalidArgument(reason=f"insert: thin block {thin_block} -> data block {data_block} out of range "
                                         f"(data device has {self.data_sm.nr_blocks} blocks)")
        if time is None:
            time = self.time
        if not 0 <= time <= TIME_MASK or data_block > MAX_DATA_BLOCK:
            pack_block_time(data_block, time)  # raises InvalidArgument
        value = data_block << TIME_BITS | time  # pack_block_time, inline
        roots = self._roots
        self.mapping_root, new_sub, is_new = self.tree.insert(self.mapping_root, dev_id, thin_block, value,
                                                              roots[dev_id])
        roots[dev_id] = new_sub
        c = self._mcaches.get(dev_id)
        if c is not None:
            c.map[thin_block] = value  # MappingCache.put
        if not d._changed:
            d.changed = True  # on every insert, new or replaced, as the kernel's __insert: the commit then writes
            # the device's details, so no details leaf stays shared with a held metadata snapshot
        if is_new:
            d.mapped_blocks += 1

    def insert_run(self, dev_id: int, thin_blocks: list[int], data_blocks: list[int]) -> None:
        """``insert`` of each thin_blocks[i] -> data_blocks[i] at the pool time, for thin blocks sorted ascending
        without repeats (the chunks of one write): one descent per leaf touched (BTree.insert_run). The mappings
        take over the caller's references; replaced mappings drop theirs."""
        self._check_writable()
        d = self.get_device(dev_id)
        if not thin_blocks:
            return
        nr_data = self.data_sm.nr_blocks
        if (min(data_blocks) < 0 or max(data_blocks) >= nr_data or thin_blocks[0] < 0
                or thin_blocks[-1] >= 2**64):
            raise InvalidArgument(reason=f"insert: a mapping of thin blocks {thin_blocks[0]}..{thin_blocks[-1]} "
                                         f"is out of range (data device has {nr_data} blocks)")
        t = pack_block_time(0, self.time)  # (checks the time once; the data blocks were checked above)
        values = [b << TIME_BITS | t for b in data_blocks]
        self.mapping_root, new_sub, nr_new = self.tree.insert_run(self.mapping_root, dev_id, thin_blocks, values)
        self._roots[dev_id] = new_sub
        c = self._mcaches.get(dev_id)
        if c is not None:
            c.put_many(thin_blocks, values)
        d.changed = True  # (as insert)
        if nr_new:
            d.mapped_blocks += nr_new

    def remove(self, dev_id: int, thin_block: int) -> bool:
        """Unmap ``thin_block``; its data block loses a reference. Returns whether it was mapped."""
        return self.remove_range(dev_id, thin_block, thin_block + 1) == 1

    def remove_range(self, dev_id: int, lo: int, hi: int) -> int:
        """Unmap every thin block in [lo, hi) (kernel dm_thin_remove_range); their data blocks lose a reference
        each. Returns how many were mapped. Nothing changes when none was."""
        self._check_writable()
        d = self.get_device(dev_id)
        self.mapping_root, new_sub, n = self.tree.remove_range(self.mapping_root, dev_id, lo, hi)
        if n:
            self._forget_mappings(dev_id)
            self._drop_pending(dev_id, lo, hi)
        self._roots[dev_id] = new_sub
        if n:
            d.mapped_blocks -= n
            d.changed = True
        return n

    def mappings(self, dev_id: int, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(thin_blocks, data_blocks, times) of the device's mappings in [lo, hi), as numpy arrays."""
        root = self.device_root(dev_id)
        k, v = self.mapping.lookup_range(root, lo, hi)
        d, t = unpack_block_times(v)
        if len(d) and self.data_sm.nr_blocks and int(d.max()) >= self.data_sm.nr_blocks:
            i = int(np.argmax(d >= np.uint64(self.data_sm.nr_blocks)))
            raise MetadataCorrupt(block=root, reason=f"device {dev_id} block {int(k[i])} maps to data block "
                                                     f"{int(d[i])} beyond the data device")
        return k, d, t

    def iter_mappings(self, dev_id: int) -> Iterator[tuple[int, int, int]]:
        for k, v in self.mapping.items(self.device_root(dev_id)):
            yield (k, *unpack_block_time(v))

    def highest_mapped(self, dev_id: int) -> int | None:
        return self.mapping.highest_key(self.device_root(dev_id))

    def build_device(self, dev_id: int, thin_blocks: np.ndarray, data_blocks: np.ndarray, times: np.ndarray,
                     details: DeviceDetails | None = None) -> None:
        """Create a device whose mapping tree is built in bulk from sorted, unique thin blocks (restore). Checks
        everything before changing anything; the tree's nodes are written as they fill (metadata/builder.py)."""
        from thinpool.metadata.builder import DeviceBuilder

        self._check_writable()
        self._check_id(dev_id)
        if dev_id in self.devices:
            raise DeviceExists(dev_id=dev_id)
        # Validate before touching the space map: an out-of-range data block used to escape as a numpy
        # IndexError from inc_many, and unsorted/duplicate thin blocks would build a tree with keys out of order.
        if not len(thin_blocks) == len(data_blocks) == len(times):
            raise InvalidArgument(reason="build_device: thin_blocks, data_blocks and times differ in length")
        if len(data_blocks):
            tb = thin_blocks.astype(np.uint64)
            if len(tb) > 1 and not bool(np.all(tb[1:] > tb[:-1])):
                raise InvalidArgument(reason="build_device: thin blocks must be sorted and unique")
            hi = int(data_blocks.max())
            if int(data_blocks.min()) < 0 or hi >= self.data_sm.nr_blocks:
                raise InvalidArgument(reason=f"build_device: data block {hi} beyond the data device "
                                             f"({self.data_sm.nr_blocks} blocks)")
            if int(times.max()) > TIME_MASK:
                raise InvalidArgument(reason="build_device: mapping time does not fit in 24 bits")
        b = DeviceBuilder(self, dev_id, len(thin_blocks), details)
        b.add(thin_blocks, data_blocks, times)
        b.finish()

    def _attach_device(self, dev_id: int, root: int, nr_mappings: int, details: DeviceDetails) -> None:
        """Enter a device whose mapping tree was built at ``root`` (metadata/builder.py) in the top-level tree
        and the in-core details (written at the next commit)."""
        self._device_table_changed(dev_id)
        self.mapping_root, _ = self.top.insert(self.mapping_root, dev_id, root)
        self._forget_mappings(dev_id)
        self._roots[dev_id] = root
        self.devices[dev_id] = ThinDetails(dev_id, nr_mappings, details.transaction_id, details.creation_time,
                                           details.snapshotted_time, changed=True, owner=self._changed_ids)

    # --- pool-wide messages -----------------------------------------------------------------------------------
    def set_transaction_id(self, current: int, new: int) -> None:
        """Compare-and-swap of the userspace transaction id (dm-thin 'set_transaction_id')."""
        self._check_writable()
        if current != self.trans_id:
            raise TransactionIdMismatch(current=self.trans_id, given=current)
        self.trans_id = new

    def set_needs_check(self) -> None:
        """Set NEEDS_CHECK and commit just the superblock flag (the failure path: trees are left alone)."""
        self.flags |= NEEDS_CHECK_FLAG
        buf = build_superblock(self.sb.replace(flags=self.sb.flags | NEEDS_CHECK_FLAG))
        checksum.stamp(buf, BlockType.SUPERBLOCK)
        self.store.write_block(0, buf)
        self.store.sync()
        self.sb = self.sb.replace(flags=self.sb.flags | NEEDS_CHECK_FLAG)

    def clear_needs_check(self) -> None:
        self.flags &= ~NEEDS_CHECK_FLAG

    def reserve_metadata_snap(self) -> int:
        """Commit, then copy the superblock to a new block that shares the details and mapping roots."""
        self._check_writable()
        if self.held_root:
            raise InvalidArgument(reason="pool metadata snapshot already exists")
        self.commit(force=True)
        self.tm.share_gen += 1  # (the incs below move it too)
        b = self.tm.new_block()
        copy = self.sb.replace(blocknr=b, held_root=0)
        self.tm.write_raw(b, build_superblock(copy, zero_sm_roots=True), BlockType.SUPERBLOCK)
        self.tm.inc(self.details_root)
        self.tm.inc(self.mapping_root)
        self.held_root = b
        self.commit()
        return b

    def release_metadata_snap(self) -> None:
        self._check_writable()
        if not self.held_root:
            raise InvalidArgument(reason="no pool metadata snapshot is held")
        held = self.read_superblock(self.store, self.held_root)
        self.tm.share_gen += 1  # (the deletes below move it too)
        self.details_tree.delete(held.device_details_root)
        self.top.delete(held.data_mapping_root)
        self.tm.dec(self.held_root)
        self.held_root = 0

    def resize_data(self, nr_blocks: int) -> None:
        self._check_writable()
        if nr_blocks < self.data_sm.nr_blocks:
            used = self.data_sm.used_from(nr_blocks)
            if used is not None:
                raise InvalidArgument(reason=f"cannot shrink the data device below block {used} which is in use")
            raise InvalidArgument(reason="shrinking the data space map is not supported (dm-thin cannot either)")
        self.data_disk.extend(nr_blocks)

    def resize_metadata(self, nr_blocks: int) -> None:
        self._check_writable()
        nr_blocks = min(nr_blocks, MAX_METADATA_BLOCKS)
        if nr_blocks < self.tm.sm.nr_blocks:
            raise InvalidArgument(reason="shrinking the metadata device is not supported")
        self.store.grow(nr_blocks)
        self.meta_disk.extend(nr_blocks)

    # --- commit / abort ---------------------------------------------------------------------------------------
    def current_superblock(self) -> Superblock:
        return self.sb.replace(flags=self.flags, time=self.time, trans_id=self.trans_id, held_root=self.held_root,
                               data_sm_root=self.data_disk.root(), metadata_sm_root=self.meta_disk.root(),
                               data_mapping_root=self.mapping_root, device_details_root=self.details_root)

    def commit(self, *, force: bool = False) -> FreedBlocks:
        """Make the transaction durable (dm-thin __commit_transaction). Returns the data blocks that became free
        in it (candidates for discard passdown; FreedBlocks: per bitmap, 2 bytes a block). A commit that would
        change nothing writes nothing unless ``force``. O(changes): the details of the devices changed, the dirty
        bitmaps and nodes."""
        self._check_writable()
        if not force and not self._has_changes():
            return FreedBlocks([])  # an empty commit writes nothing (the kernel skips it too)
        sb_written = False
        changed = self._changed_devices()
        try:
            for d in changed:
                self.details_root, _ = self.details_tree.insert(self.details_root, d.dev_id,
                                                                build_device_details(d.to_disk()))
            self.data_disk.write()
            self.meta_disk.write()
            sb = self.current_superblock()
            buf = build_superblock(sb)
            checksum.stamp(buf, BlockType.SUPERBLOCK)
            self.tm.pre_commit()
            sb_written = True
            self.tm.commit(buf)
        except ThinpoolError:
            if sb_written:
                # The superblock write or the sync after it failed: the new superblock may be on disk or not.
                # Going back to the old state would hand out blocks the new one uses (a later crash would leave
                # a mix of both), so fail the pool instead; reopening reads whichever commit is on disk.
                self.failed = True
                raise
            if self.sb.data_sm_root.bitmap_root == 0:
                # format's first commit: there is no committed state to go back to (its superblock was never
                # written, so reloading it would read unwritten blocks): the error goes up, this object failed
                self.failed = True
                raise
            self.abort()
            raise
        except BaseException:
            self.failed = True
            raise
        self.tree.forget()  # the transaction's writable leaves are clean now (tm.commit moved share_gen)
        for d in changed:
            d.changed = False
        self._changed_ids.clear()
        freed = self.data_sm.freed_blocks()
        self.data_sm.commit()
        self.tm.sm.commit()
        self.sb = sb
        return freed

    def _changed_devices(self) -> list[ThinDetails]:
        """The devices whose details changed in this transaction, by id. O(devices changed)."""
        devices = self.devices
        return [devices[i] for i in sorted(self._changed_ids) if i in devices and devices[i].changed]

    def details_changed(self) -> bool:
        """Whether a device's details changed since the last commit."""
        return bool(self._changed_devices())

    def has_changes(self) -> bool:
        """Whether a commit would change anything on disk. O(devices changed)."""
        return self._has_changes()

    def _has_changes(self) -> bool:
        sb = self.sb
        return bool(self.tm.dirty or self.tm.dirty_raw or self.data_sm.changed or self.meta_disk.core.changed
                    or bool(self._changed_devices())
                    or (self.time, self.trans_id, self.flags, self.held_root, self.mapping_root, self.details_root)
                    != (sb.time, sb.trans_id, sb.flags, sb.held_root, sb.data_mapping_root, sb.device_details_root))

    def abort(self) -> None:
        """Forget everything since the last commit."""
        self.tm.abort()
        self.tm.sm.abort()
        self.data_sm.abort()
        if self.readonly:  # nothing was changed; the space maps of a read-only open hold no counts to reset
            self._load_state(self.sb)
            return
        try:  # both space maps went back to their last commit above (pages, index, roots, sizes)
            self._load_state(self.sb)
        except ThinpoolError:
            self.failed = True
            raise

    def close(self) -> None:
        self.store.close()

