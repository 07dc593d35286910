"""The ext2 file system: :class:`Filesystem`, made by :meth:`Filesystem.mkfs` or opened by :meth:`Filesystem.mount`.

Layer: fs. May import: thinpool.io.device, thinpool.errors, thinpool.fs.*.

The class is assembled from one module per responsibility, each building on the one before: ``core`` (in-core
state, inodes, blocks, directories, write-back), ``data`` (file contents), ``namei`` (paths and directory entries),
``files`` (regular files by path), ``attrs`` (modes, owners, times, extended attributes).

On-disk result is plain ext2 revision 1 with 4 KiB blocks, as ``mkfs.ext2 -b 4096 -O none,filetype -I 128 -m 0``
makes it (plus ``sparse_super`` with more than one group, ``large_file`` once a file passes 2 GiB), so e2fsck,
debugfs and the kernel read what we write. Everything goes through the byte-addressed ``BlockDevice`` protocol.

By inode number, for tools that start from blocks (the driver's ``container diff --blocks``): ``inode_stat``,
``inode_blocks``, ``dir_entries_by_ino``, ``inode_table_blocks``; the geometry as read-only properties
``block_size``, ``inode_size``, ``first_ino`` and ``uuid``.

Consistency: metadata (inodes, directories, indirect blocks, bitmaps, descriptors, superblock) is written back by
:meth:`Filesystem.flush`, which then calls ``device.flush()`` (on a thin device that commits the pool); file data is
written to the device immediately. Every operation first checks it has the blocks and inodes it needs, so a full file
system raises :class:`FsNoSpace` before anything changes.
"""

from __future__ import annotations

from typing import Any

from thinpool.errors import FsCorrupt, NoFilesystem
from thinpool.fs import layout as L
from thinpool.fs.attrs import FsAttrs
from thinpool.fs.file import File
from thinpool.fs.records import DirEntry, Stat, StatFs
from thinpool.fs.validate import check_group_desc, check_superblock
from thinpool.io.device import BlockDevice

__all__ = ["DirEntry", "File", "Filesystem", "Stat", "StatFs"]


class Filesystem(FsAttrs):
    """An ext2 file system on a block device. Use :meth:`mkfs` or :meth:`mount`; paths are absolute, '/'-separated."""

    @classmethod
    def mkfs(cls, device: BlockDevice, **options: Any) -> Filesystem:
        """Make an empty ext2 file system on ``device`` and return it open (see :func:`thinpool.fs.make.mkfs`)."""
        from thinpool.fs.make import mkfs

        return mkfs(device, **options)

    @classmethod
    def mount(cls, device: BlockDevice, *, readonly: bool = False) -> Filesystem:
        """Open the ext2 file system on ``device``, validating the superblock and every group descriptor.

        Raises:
            FsCorrupt: the superblock or a group descriptor is damaged.
            FsError: a feature thinpool cannot handle (readonly is forced for unknown ro_compat features).
        """
        if device.size < L.SUPERBLOCK_OFFSET + L.SUPERBLOCK_SIZE:
            raise FsCorrupt(reason="device too small to hold a superblock")
        sb = L.parse_superblock(device.read(L.SUPERBLOCK_OFFSET, L.SUPERBLOCK_SIZE))
        if sb.s_magic != L.EXT2_SUPER_MAGIC:
            raise NoFilesystem(reason=f"bad magic {sb.s_magic:#06x} in superblock (expected 0xef53)", block=0)
        readonly = check_superblock(sb, device.size) or readonly
        bs = sb.block_size
        nr_groups = sb.nr_groups
        gdt_first = sb.s_first_data_block + 1
        desc_blocks = -(-nr_groups * L.GROUP_DESC_SIZE // bs)
        raw = device.read(gdt_first * bs, desc_blocks * bs)
        groups = [L.parse_group_desc(raw, g * L.GROUP_DESC_SIZE) for g in range(nr_groups)]
        for g, gd in enumerate(groups):
            check_group_desc(sb, g, gd, gdt_first + g * L.GROUP_DESC_SIZE // bs)
        stale_totals = sum(gd.bg_free_blocks_count for gd in groups) != sb.s_free_blocks_count or \
            sum(gd.bg_free_inodes_count for gd in groups) != sb.s_free_inodes_count
        if stale_totals:
            # the kernel keeps superblock totals lazily; the group counts are authoritative (as e2fsck treats them)
            sb.s_free_blocks_count = sum(gd.bg_free_blocks_count for gd in groups)
            sb.s_free_inodes_count = sum(gd.bg_free_inodes_count for gd in groups)
        fs = cls(device, sb, groups, readonly=readonly)
        fs._sb_dirty = stale_totals
        root = fs._inode(L.ROOT_INO)
        if not root.is_dir or root.i_links_count < 2:
            raise FsCorrupt(reason="root inode 2 is not a directory", inode=L.ROOT_INO)
        return fs
