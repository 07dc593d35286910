"""A read-only view of pool metadata: the superblock and the device details, nothing else opened.

Layer: metadata. May import: thinpool.errors, thinpool.checksum, thinpool.formats, thinpool.btree.walk (the
strict walk with the node decoder; no transaction manager, no space map, no numpy).

What a listing needs (``thinpool ls`` with its default fields, as thin_ls computes them): the superblock,
validated as the kernel's sb_check validates it, the details tree (dev_id -> struct disk_device_details) and the
top level of the mapping tree (dev_id -> the device's mapping root), both walked through the one walker
(``walk_items``: checksums, block numbers, key order, child key ranges, cycles, depth). The two trees must name the
same devices, as ``PoolMetadata.open`` requires. Through the held metadata snapshot (``use_metadata_snap``) both
trees are the snapshot's. Cost: the superblock plus the nodes of those two trees (one each below ~120 devices).

``read_superblock`` and ``snapshot_superblock`` are the one place the superblock checks and the snapshot view are
written; ``PoolMetadata`` calls them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from thinpool import checksum
from thinpool.btree.walk import walk_items
from thinpool.checksum import BlockType
from thinpool.errors import DeviceNotFound, InvalidArgument, MetadataCorrupt, UnsupportedMetadata
from thinpool.formats.device_details import DEVICE_DETAILS_SIZE, DeviceDetails, parse_device_details
from thinpool.formats.space_map import SmRoot
from thinpool.formats.superblock import THIN_SUPERBLOCK_MAGIC, Superblock, parse_superblock
from thinpool.units import METADATA_BLOCK_SIZE_SECTORS

if TYPE_CHECKING:
    from thinpool.io.block_store import BlockStore


def read_superblock(store: BlockStore, blocknr: int = 0) -> Superblock:
    """Read and validate a superblock as the kernel's sb_check does (checksum, self block number, magic), plus
    the block sizes this implementation supports.

    Raises:
        MetadataCorrupt (all-zero block 0, bad magic, bad data block size), ChecksumError, UnsupportedMetadata
        (a metadata block size other than 8 sectors).
    """
    buf = store.read_block(blocknr)
    if blocknr == 0 and not any(buf):
        raise MetadataCorrupt(block=0, reason="superblock is all zeros (unformatted metadata)")
    checksum.validate(buf, BlockType.SUPERBLOCK, blocknr, "superblock")
    sb = parse_superblock(buf, blocknr)
    if sb.magic != THIN_SUPERBLOCK_MAGIC:
        raise MetadataCorrupt(block=blocknr, reason=f"bad superblock magic {sb.magic}")
    if sb.metadata_block_size != METADATA_BLOCK_SIZE_SECTORS:
        raise UnsupportedMetadata(feature=f"metadata block size {sb.metadata_block_size} sectors")
    if sb.data_block_size < 128 or sb.data_block_size % 128 or sb.data_block_size > 2097152:
        raise MetadataCorrupt(block=blocknr, reason=f"bad data block size {sb.data_block_size}")
    return sb


def snapshot_superblock(store: BlockStore, sb: Superblock) -> Superblock:
    """``sb`` seen through its held metadata snapshot: the snapshot's trees, time, transaction id and flags; no
    data space map (the snapshot holds none of its own).

    Raises:
        InvalidArgument (no snapshot held), and what ``read_superblock`` raises for the snapshot's block.
    """
    if not sb.held_root:
        raise InvalidArgument(reason="no metadata snapshot is held")
    held = read_superblock(store, sb.held_root)
    return sb.replace(data_mapping_root=held.data_mapping_root, device_details_root=held.device_details_root,
                      time=held.time, trans_id=held.trans_id, flags=held.flags, held_root=sb.held_root,
                      data_sm_root=SmRoot(0, 0, 0, 0))


class ReadOnlyMetadata:
    """Superblock, device details and device roots of committed metadata, read once at open (see the module
    docstring). It has the reading half of ``PoolMetadata``'s device API: ``devices``, ``device_ids``,
    ``get_device``, ``device_root``, ``data_block_size``, ``held_root``, ``sb``."""

    readonly = True

    def __init__(self, store: BlockStore, sb: Superblock) -> None:
        self.store = store
        self.sb = sb
        self.held_root = sb.held_root
        self.devices: dict[int, DeviceDetails] = {}
        for dev_id, raw in walk_items(store, sb.device_details_root, value_size=DEVICE_DETAILS_SIZE):
            self.devices[dev_id] = parse_device_details(raw)
        self._roots: dict[int, int] = dict(walk_items(store, sb.data_mapping_root, value_size=8))
        if self._roots.keys() != self.devices.keys():
            raise MetadataCorrupt(block=sb.device_details_root, reason="details tree and mapping tree disagree on "
                                  f"devices ({sorted(self._roots.keys() ^ self.devices.keys())[:5]})")

    @classmethod
    def open(cls, store: BlockStore, *, use_metadata_snap: bool = False) -> ReadOnlyMetadata:
        """Read the superblock (through the held snapshot with ``use_metadata_snap``) and both trees' tops.

        Raises:
            MetadataCorrupt / ChecksumError (with the block and, inside a tree, the path), UnsupportedMetadata,
            InvalidArgument (``use_metadata_snap`` and no snapshot held).
        """
        sb = read_superblock(store)
        return cls(store, snapshot_superblock(store, sb) if use_metadata_snap else sb)

    @property
    def data_block_size(self) -> int:
        """Sectors per data block."""
        return self.sb.data_block_size

    def device_ids(self) -> list[int]:
        return sorted(self.devices)

    def get_device(self, dev_id: int) -> DeviceDetails:
        d = self.devices.get(dev_id)
        if d is None:
            raise DeviceNotFound(dev_id=dev_id)
        return d

    def device_root(self, dev_id: int) -> int:
        self.get_device(dev_id)
        return self._roots[dev_id]
