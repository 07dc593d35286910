"""The thin-pool superblock (metadata block 0; kernel struct thin_disk_superblock, 364 bytes).

Layer: formats. May import: thinpool.errors, thinpool.formats.fields, thinpool.formats.space_map.

| off   | size | field                  |
|-------|------|------------------------|
| 0x000 | 4    | csum (salt 160774)     |
| 0x004 | 4    | flags (bit 0 NEEDS_CHECK) |
| 0x008 | 8    | blocknr (self)         |
| 0x010 | 16   | uuid                   |
| 0x020 | 8    | magic 27022010         |
| 0x028 | 4    | version                |
| 0x02C | 4    | time                   |
| 0x030 | 8    | trans_id               |
| 0x038 | 8    | held_root (metadata_snap) |
| 0x040 | 128  | data_space_map_root    |
| 0x0C0 | 128  | metadata_space_map_root|
| 0x140 | 8    | data_mapping_root      |
| 0x148 | 8    | device_details_root    |
| 0x150 | 4    | data_block_size (sectors) |
| 0x154 | 4    | metadata_block_size (sectors, 8) |
| 0x158 | 8    | metadata_nr_blocks     |
| 0x160 | 4    | compat_flags           |
| 0x164 | 4    | compat_ro_flags        |
| 0x168 | 4    | incompat_flags         |
"""

from __future__ import annotations

import struct
from typing import Final

from thinpool.errors import MetadataCorrupt
from thinpool.formats.fields import Layout, record, replace
from thinpool.formats.space_map import SM_ROOT_SLOT_SIZE, SmRoot, build_sm_root, parse_sm_root

THIN_SUPERBLOCK_MAGIC: Final = 27022010
THIN_VERSION: Final = 2
NEEDS_CHECK_FLAG: Final = 1
SUPERBLOCK_SIZE: Final = 364  # bytes

SUPERBLOCK_LAYOUT: Final = Layout("thin_disk_superblock", (
    ("csum", "I"),
    ("flags", "I"),
    ("blocknr", "Q"),
    ("uuid", "16s"),
    ("magic", "Q"),
    ("version", "I"),
    ("time", "I"),
    ("trans_id", "Q"),
    ("held_root", "Q"),
    ("data_space_map_root", f"{SM_ROOT_SLOT_SIZE}s"),
    ("metadata_space_map_root", f"{SM_ROOT_SLOT_SIZE}s"),
    ("data_mapping_root", "Q"),
    ("device_details_root", "Q"),
    ("data_block_size", "I"),  # sectors
    ("metadata_block_size", "I"),  # sectors
    ("metadata_nr_blocks", "Q"),
    ("compat_flags", "I"),
    ("compat_ro_flags", "I"),
    ("incompat_flags", "I"),
))
assert SUPERBLOCK_LAYOUT.size == SUPERBLOCK_SIZE


def __getattr__(name: str) -> object:
    if name == "SuperblockStruct":  # the construct form of the same layout, built on first use
        return SUPERBLOCK_LAYOUT.construct()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@record
class Superblock:
    flags: int
    blocknr: int
    uuid: bytes
    magic: int
    version: int
    time: int
    trans_id: int
    held_root: int
    data_sm_root: SmRoot
    metadata_sm_root: SmRoot
    data_mapping_root: int
    device_details_root: int
    data_block_size: int  # sectors
    metadata_block_size: int  # sectors
    metadata_nr_blocks: int
    compat_flags: int = 0
    compat_ro_flags: int = 0
    incompat_flags: int = 0

    @property
    def needs_check(self) -> bool:
        return bool(self.flags & NEEDS_CHECK_FLAG)

    def replace(self, **kw: object) -> Superblock:
        return replace(self, **kw)


def parse_superblock(buf: bytes | bytearray | memoryview, blocknr: int = 0) -> Superblock:
    """Parse (not validate checksums) a superblock; raises MetadataCorrupt on a short buffer."""
    try:
        c = SUPERBLOCK_LAYOUT.unpack(buf)
    except struct.error as e:
        raise MetadataCorrupt(block=blocknr, reason=f"unparseable superblock: {e}") from e
    return Superblock(
        flags=c["flags"], blocknr=c["blocknr"], uuid=c["uuid"], magic=c["magic"], version=c["version"],
        time=c["time"], trans_id=c["trans_id"], held_root=c["held_root"],
        data_sm_root=parse_sm_root(c["data_space_map_root"]),
        metadata_sm_root=parse_sm_root(c["metadata_space_map_root"]),
        data_mapping_root=c["data_mapping_root"], device_details_root=c["device_details_root"],
        data_block_size=c["data_block_size"], metadata_block_size=c["metadata_block_size"],
        metadata_nr_blocks=c["metadata_nr_blocks"], compat_flags=c["compat_flags"],
        compat_ro_flags=c["compat_ro_flags"], incompat_flags=c["incompat_flags"])


def build_superblock(sb: Superblock, *, zero_sm_roots: bool = False) -> bytearray:
    """Build a 4096-byte superblock block. The checksum is left 0: the caller stamps it (checksum.stamp, as
    PoolMetadata.commit and TransactionManager.write_raw do)."""
    raw = SUPERBLOCK_LAYOUT.pack(
        csum=0, flags=sb.flags, blocknr=sb.blocknr, uuid=sb.uuid.ljust(16, b"\0")[:16], magic=sb.magic,
        version=sb.version, time=sb.time, trans_id=sb.trans_id, held_root=sb.held_root,
        data_space_map_root=bytes(SM_ROOT_SLOT_SIZE) if zero_sm_roots else build_sm_root(sb.data_sm_root),
        metadata_space_map_root=bytes(SM_ROOT_SLOT_SIZE) if zero_sm_roots else build_sm_root(sb.metadata_sm_root),
        data_mapping_root=sb.data_mapping_root, device_details_root=sb.device_details_root,
        data_block_size=sb.data_block_size, metadata_block_size=sb.metadata_block_size,
        metadata_nr_blocks=sb.metadata_nr_blocks, compat_flags=sb.compat_flags, compat_ro_flags=sb.compat_ro_flags,
        incompat_flags=sb.incompat_flags)
    block = bytearray(4096)
    block[:len(raw)] = raw
    return block
