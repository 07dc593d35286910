"""Sanity checks of the superblock and the group descriptors, done once when a file system is mounted.

Layer: fs. May import: thinpool.errors, thinpool.fs.layout.

Every failure is an :class:`FsCorrupt` naming the structure ("superblock: ...", "group descriptor N: ...") and the
block it lives in; an unknown incompatible feature is an :class:`FsError` (not damage, just not ext2).
"""

from __future__ import annotations

from thinpool.errors import FsCorrupt, FsError
from thinpool.fs import layout as L


def check_superblock(sb: L.Superblock, device_size: int) -> bool:
    """Validate a superblock; returns True when it can only be opened read-only."""
    if sb.s_magic != L.EXT2_SUPER_MAGIC:
        raise FsCorrupt(reason=f"bad magic {sb.s_magic:#06x} in superblock (expected 0xef53)", block=0)
    if sb.s_rev_level > L.EXT2_DYNAMIC_REV:
        raise FsCorrupt(reason=f"superblock: unknown revision {sb.s_rev_level}", block=0)
    if sb.s_log_block_size > 6:
        raise FsCorrupt(reason=f"superblock: bad block size 1024 << {sb.s_log_block_size}", block=0)
    bs = sb.block_size
    if sb.s_first_data_block != (1 if bs == 1024 else 0):
        raise FsCorrupt(reason=f"superblock: first data block {sb.s_first_data_block} wrong for {bs}-byte blocks",
                        block=0)
    if not 8 <= sb.s_blocks_per_group <= 8 * bs:
        raise FsCorrupt(reason=f"superblock: {sb.s_blocks_per_group} blocks per group", block=0)
    if sb.s_blocks_count <= sb.s_first_data_block or sb.s_blocks_count * bs > device_size:
        raise FsCorrupt(reason=f"superblock: {sb.s_blocks_count} blocks of {bs} bytes do not fit the "
                               f"{device_size}-byte device", block=0)
    nr_groups = sb.nr_groups
    if sb.s_rev_level >= L.EXT2_DYNAMIC_REV:
        isz = sb.s_inode_size
        if isz < L.GOOD_OLD_INODE_SIZE or isz > bs or isz & (isz - 1):
            raise FsCorrupt(reason=f"superblock: bad inode size {isz}", block=0)
        if sb.s_first_ino < L.FIRST_INO:
            raise FsCorrupt(reason=f"superblock: bad first inode {sb.s_first_ino}", block=0)
    if not 1 <= sb.s_inodes_per_group <= 8 * bs or sb.s_inodes_count != sb.s_inodes_per_group * nr_groups:
        raise FsCorrupt(reason=f"superblock: inode counts disagree ({sb.s_inodes_count} inodes, "
                               f"{sb.s_inodes_per_group} per group, {nr_groups} groups)", block=0)
    if sb.s_free_blocks_count > sb.s_blocks_count or sb.s_free_inodes_count > sb.s_inodes_count:
        raise FsCorrupt(reason="superblock: free counts exceed totals", block=0)
    unknown_incompat = sb.s_feature_incompat & ~L.SUPPORTED_INCOMPAT
    if unknown_incompat:
        raise FsError(reason=f"unsupported incompatible features {unknown_incompat:#x} (not ext2)")
    return bool(sb.s_feature_ro_compat & ~L.SUPPORTED_RO_COMPAT or sb.s_feature_compat & ~L.SAFE_COMPAT)


def check_group_desc(sb: L.Superblock, g: int, gd: L.GroupDesc, gdt_block: int) -> None:
    bs = sb.block_size
    first = sb.s_first_data_block + g * sb.s_blocks_per_group
    last = min(first + sb.s_blocks_per_group, sb.s_blocks_count) - 1
    itb = -(-sb.s_inodes_per_group * (sb.s_inode_size if sb.s_rev_level else 128) // bs)

    def bad(why: str) -> FsCorrupt:
        return FsCorrupt(reason=f"group descriptor {g}: {why}", block=gdt_block, group=g)

    for what, blk, nr in (("block bitmap", gd.bg_block_bitmap, 1), ("inode bitmap", gd.bg_inode_bitmap, 1),
                          ("inode table", gd.bg_inode_table, itb)):
        if not (first <= blk and blk + nr - 1 <= last):
            raise bad(f"{what} at block {blk} is outside the group (blocks {first}-{last})")
    if gd.bg_free_blocks_count > last - first + 1:
        raise bad(f"{gd.bg_free_blocks_count} free blocks in a group of {last - first + 1}")
    if gd.bg_free_inodes_count > sb.s_inodes_per_group:
        raise bad(f"{gd.bg_free_inodes_count} free inodes in a group of {sb.s_inodes_per_group}")
