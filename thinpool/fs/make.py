"""mkfs: lay out an empty ext2 file system the way ``mkfs.ext2 -b 4096 -O none,filetype -I 128 -m 0`` does.

Layer: fs. May import: thinpool.io.device, thinpool.errors, thinpool.fs.*, numpy.

Per group: [superblock + group descriptor table] (group 0, and with ``sparse_super`` groups 1 and powers of 3, 5, 7),
block bitmap, inode bitmap, inode table, then data. Inodes 1..10 are reserved (in use, zeroed); the root directory
is inode 2 with one block, lost+found is inode 11 with four blocks, as mke2fs makes them.

Like mke2fs, mkfs writes the structures themselves (bitmaps, the two directories' blocks and inodes, descriptors,
superblock and its backups) through the layout and directory builders, flushes the device, and then opens the
result with :meth:`Filesystem.mount` like any other ext2 image: nothing reaches into a Filesystem's in-core state.
"""

from __future__ import annotations

import time
import uuid as _uuid

import numpy as np

from thinpool.fs import layout as L
from thinpool.fs.core import write_superblocks
from thinpool.fs.directory import build_dir_block
from thinpool.fs.filesystem import Filesystem
from thinpool.fs.inode import Inode, build_inode_into
from thinpool.io.device import BlockDevice


def mkfs(device: BlockDevice, *, label: str = "", uuid: bytes | None = None, inode_ratio: int | None = None,
         nr_inodes: int | None = None, now: int | None = None) -> Filesystem:
    """Make an empty ext2 file system over the whole device (root directory and lost+found) and return it open.

    ``inode_ratio`` is bytes per inode (default as mke2fs: 4 KiB below 512 MiB, 16 KiB above); ``nr_inodes``
    overrides it. Inode tables are zeroed only where the device reports mapped ranges (a fresh thin device stays
    unprovisioned). The device is flushed (on a thin device: the pool commits) before the file system is opened.

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

    # group 0's first data blocks: the root directory, then lost+found's four blocks (as mke2fs allocates them)
    root_blk = groups[0].bg_inode_table + geo.inode_table_blocks
    lf_blks = list(range(root_blk + 1, root_blk + 1 + L.LOST_FOUND_BLOCKS))
    groups[0].bg_free_blocks_count -= 1 + L.LOST_FOUND_BLOCKS
    groups[0].bg_free_inodes_count -= L.LOST_FOUND_INO  # inodes 1..11 are in use
    groups[0].bg_used_dirs_count = 2
    sb.s_free_blocks_count = sum(gd.bg_free_blocks_count for gd in groups)
    sb.s_free_inodes_count = sum(gd.bg_free_inodes_count for gd in groups)

    bpb = bs * 8
    ibits = np.zeros(bpb, np.uint8)
    ibits[geo.inodes_per_group:] = 1  # bits past the group's inodes are "in use" (as mke2fs pads)
    for g in range(geo.nr_groups):
        bits = np.zeros(bpb, np.uint8)
        bits[:geo.group_overhead(g)] = 1  # superblock copy, GDT, bitmaps, inode table
        bits[geo.group_nr_blocks(g):] = 1  # padding past the end of the last group is "in use"
        gibits = ibits.copy()
        if g == 0:
            bits[root_blk:lf_blks[-1] + 1] = 1
            gibits[:L.LOST_FOUND_INO] = 1
        _, bb, ib, it = geo.group_meta(g)
        device.write(bb * bs, np.packbits(bits, bitorder="little").tobytes())
        device.write(ib * bs, np.packbits(gibits, bitorder="little").tobytes())
        _zero_mapped(device, it * bs, geo.inode_table_blocks * bs)

    # the two directories: blocks, then their inodes in the first inode-table block (the others stay zeroed)
    ft = L.FT_DIR
    device.write(root_blk * bs, bytes(build_dir_block(
        [(L.ROOT_INO, b".", ft), (L.ROOT_INO, b"..", ft), (L.LOST_FOUND_INO, b"lost+found", ft)], bs, True)))
    lf_data = build_dir_block([(L.LOST_FOUND_INO, b".", ft), (L.ROOT_INO, b"..", ft)], bs, True)
    lf_data += b"".join(bytes(build_dir_block([(0, b"", 0)], bs, True)) for _ in lf_blks[1:])
    device.write(lf_blks[0] * bs, bytes(lf_data))
    root = Inode(i_mode=L.S_IFDIR | 0o755, i_links_count=3, i_atime=t, i_ctime=t, i_mtime=t, i_size=bs,
                 i_blocks=bs // 512)
    root.i_block[0] = root_blk
    lf = Inode(i_mode=L.S_IFDIR | 0o700, i_links_count=2, i_atime=t, i_ctime=t, i_mtime=t,
               i_size=len(lf_blks) * bs, i_blocks=len(lf_blks) * bs // 512)
    lf.i_block[:len(lf_blks)] = lf_blks
    itable = bytearray(bs)
    for ino, inode in ((L.ROOT_INO, root), (L.LOST_FOUND_INO, lf)):
        build_inode_into(inode, itable, (ino - 1) * L.GOOD_OLD_INODE_SIZE)
    device.write(groups[0].bg_inode_table * bs, bytes(itable))

    write_superblocks(device, sb, groups, backups=True)
    device.flush()
    return Filesystem.mount(device)


def _now() -> int:
    return int(time.time()) & 0xFFFFFFFF


def _zero_mapped(device: BlockDevice, offset: int, length: int) -> None:
    """Zero [offset, offset+length), skipping ranges the device reports unmapped (they already read as zeros)."""
    for start, n in device.mapped_ranges(offset, length):
        lo = max(start, offset)
        hi = min(start + n, offset + length)
        if hi > lo:
            device.write_zeroes(lo, hi - lo)
