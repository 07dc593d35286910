"""mkfs: lay out an empty ext2 file system the way ``mkfs.ext2 -b 4096 -O none,filetype -I 128 -m 0`` does.

Layer: fs. May import: thinpool.io.device, thinpool.errors, thinpool.fs.*, numpy.

Per group: [superblock + group descriptor table] (group 0, and with ``sparse_super`` groups 1 and powers of 3, 5, 7),
block bitmap, inode bitmap, inode table, then data. Inodes 1..10 are reserved (in use, zeroed); the root directory
is inode 2 with one block, lost+found is inode 11 with four blocks, as mke2fs makes them.
"""

from __future__ import annotations

import struct
import time
import uuid as _uuid

import numpy as np

from thinpool.fs import layout as L
from thinpool.fs.directory import init_dir_block
from thinpool.fs.filesystem import Filesystem
from thinpool.fs.inode import Inode
from thinpool.io.device import BlockDevice


def mkfs(device: BlockDevice, *, label: str = "", uuid: bytes | None = None, inode_ratio: int | None = None,
         nr_inodes: int | None = None, now: int | None = None) -> Filesystem:
    """Make an empty ext2 file system over the whole device (root directory and lost+found) and return it open.

    ``inode_ratio`` is bytes per inode (default as mke2fs: 4 KiB below 512 MiB, 16 KiB above); ``nr_inodes``
    overrides it. Inode tables are zeroed only where the device reports mapped ranges (a fresh thin device stays
    unprovisioned).

    Raises:
        FsError: the device is too small.
    """
    bs = 4096
    geo = L.plan_geometry(device.size, bs, inode_ratio=inode_ratio, nr_inodes=nr_inodes)
    t = _now() if now is None else now
    sb = L.Superblock(
        s_inodes_count=geo.nr_inodes, s_blocks_count=geo.nr_blocks, s_r_blocks_count=0,
        s_free_blocks_count=geo.nr_blocks, s_free_inodes_count=geo.nr_inodes, s_first_data_block=0,
        s_log_block_size=2, s_log_frag_size=2, s_blocks_per_group=geo.blocks_per_group,
        s_frags_per_group=geo.blocks_per_group, s_inodes_per_group=geo.inodes_per_group,
        s_wtime=t, s_max_mnt_count=-1, s_lastcheck=t, s_first_ino=L.FIRST_INO,
        s_inode_size=L.GOOD_OLD_INODE_SIZE,
        s_feature_incompat=L.FEATURE_INCOMPAT_FILETYPE,
        s_feature_ro_compat=L.FEATURE_RO_COMPAT_SPARSE_SUPER if geo.sparse_super else 0,
        s_uuid=uuid or _uuid.uuid4().bytes, s_volume_name=label.encode()[:16].ljust(16, b"\0"),
        s_hash_seed=_uuid.uuid4().bytes, s_def_hash_version=1, s_mkfs_time=t, s_flags=1)
    groups = []
    for g in range(geo.nr_groups):
        _, bb, ib, it = geo.group_meta(g)
        groups.append(L.GroupDesc(bg_block_bitmap=bb, bg_inode_bitmap=ib, bg_inode_table=it,
                                  bg_free_blocks_count=geo.group_nr_blocks(g) - geo.group_overhead(g),
                                  bg_free_inodes_count=geo.inodes_per_group))
    sb.s_free_blocks_count = sum(gd.bg_free_blocks_count for gd in groups)
    fs = Filesystem(device, sb, groups)
    bpb = bs * 8
    ibits = np.zeros(bpb, np.uint8)
    ibits[geo.inodes_per_group:] = 1  # bits past the group's inodes are "in use" (as mke2fs pads)
    inode_bitmap = np.packbits(ibits, bitorder="little")
    for g in range(geo.nr_groups):
        bits = np.zeros(bpb, np.uint8)
        bits[:geo.group_overhead(g)] = 1  # superblock copy, GDT, bitmaps, inode table
        bits[geo.group_nr_blocks(g):] = 1  # padding past the end of the last group is "in use"
        fs.alloc.set_block_bitmap(g, np.packbits(bits, bitorder="little"))
        fs.alloc.set_inode_bitmap(g, inode_bitmap.copy())
        _, _, _, it = geo.group_meta(g)
        _zero_mapped(device, it * bs, geo.inode_table_blocks * bs)
    for ino in range(1, L.FIRST_INO):
        fs.alloc.mark_inode_used(ino, is_dir=ino == L.ROOT_INO)
    # root directory
    root = Inode(i_mode=L.S_IFDIR | 0o755, i_links_count=3, i_atime=t, i_ctime=t, i_mtime=t)
    blk = fs.alloc.alloc_blocks(groups[0].bg_inode_table + geo.inode_table_blocks, 1)[0]
    init_dir_block(fs.cache.new(blk), L.ROOT_INO, L.ROOT_INO, fs.filetype)
    root.i_block[0] = blk
    root.i_blocks = bs // 512
    root.i_size = bs
    fs._install_inode(L.ROOT_INO, root)
    # lost+found (inode 11, 4 blocks, like mke2fs)
    fs.alloc.mark_inode_used(L.LOST_FOUND_INO, is_dir=True)
    lf = Inode(i_mode=L.S_IFDIR | 0o700, i_links_count=2, i_atime=t, i_ctime=t, i_mtime=t)
    blks = fs.alloc.alloc_blocks(blk + 1, L.LOST_FOUND_BLOCKS)
    init_dir_block(fs.cache.new(blks[0]), L.LOST_FOUND_INO, L.ROOT_INO, fs.filetype)
    for b in blks[1:]:
        buf = fs.cache.new(b)
        struct.pack_into("<IHBB", buf, 0, 0, bs, 0, 0)
    for i, b in enumerate(blks):
        lf.i_block[i] = b
    lf.i_blocks = len(blks) * bs // 512
    lf.i_size = len(blks) * bs
    fs._install_inode(L.LOST_FOUND_INO, lf)
    fs._dir(L.ROOT_INO).add(b"lost+found", L.LOST_FOUND_INO, L.FT_DIR)
    # the other reserved inodes (1, 3..10) stay zeroed, in use in the bitmap
    fs._sb_dirty = True
    fs._backups_dirty = True
    fs.alloc.gd_dirty = True
    fs.flush()
    return fs


def _now() -> int:
    return int(time.time()) & 0xFFFFFFFF


def _zero_mapped(device: BlockDevice, offset: int, length: int) -> None:
    """Zero [offset, offset+length), skipping ranges the device reports unmapped (they already read as zeros)."""
    for start, n in device.mapped_ranges(offset, length):
        lo = max(start, offset)
        hi = min(start + n, offset + length)
        if hi > lo:
            device.write_zeroes(lo, hi - lo)
