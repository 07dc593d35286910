"""The file system's in-core state and what every operation shares: inodes, blocks, directories, write-back.

Layer: fs. May import: thinpool.io.device, thinpool.errors, thinpool.fs.*, numpy.

:class:`FsCore` holds the superblock, group descriptors, the allocator, the metadata block cache and the in-core
inodes and directories; it loads and installs inodes, frees them with their blocks and xattr block, checks space
before an operation starts (:meth:`FsCore._need`), and writes everything back in :meth:`FsCore.flush`. The
operations themselves live in the modules stacked on it: ``data`` (file contents), ``namei`` (paths and names),
``files`` (opening and sizing regular files), ``attrs`` (modes, owners, times, extended attributes).
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import functools
import os
import struct
import threading
import time
import uuid as _uuid
from collections.abc import Callable
from typing import Any, Self, TypeVar

import numpy as np
import numpy.typing as npt

from thinpool.errors import (
    FileNotFound,
    FsCorrupt,
    FsError,
    FsNoSpace,
    NotADirectory,
)
from thinpool.fs import layout as L
from thinpool.fs import xattr as X
from thinpool.fs.alloc import Allocator
from thinpool.fs.cache import BlockCache
from thinpool.fs.directory import Directory
from thinpool.fs.inode import BlockMapper, Inode, build_inode_into, parse_inode
from thinpool.fs.records import Stat, StatFs
from thinpool.io.device import BlockDevice

MAX_LINKS = 65000  # EXT2_LINK_MAX
NS_PER_S = 10**9
I_BLOCK_FMT = struct.Struct("<15I")  # i_block as 60 bytes (a fast symlink's target)

F = TypeVar("F", bound=Callable[..., Any])


def locked(fn: F) -> F:
    """Run a public method under the file system's lock (callers may share one Filesystem between threads)."""
    @functools.wraps(fn)
    def wrapper(self: FsCore, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return fn(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


def now() -> int:
    """The current time as ext2 stores it (32-bit seconds)."""
    return int(time.time()) & 0xFFFFFFFF


def encode(name: str | bytes) -> bytes:
    return name if isinstance(name, bytes) else os.fsencode(name)


def decode(name: bytes) -> str:
    return os.fsdecode(name)


def superblock_blocks(sb: L.Superblock, groups: list[L.GroupDesc], *, backups: bool) -> list[int]:
    """The blocks :func:`write_superblocks` writes (superblock and descriptor copies)."""
    desc_blocks = -(-len(groups) * L.GROUP_DESC_SIZE // sb.block_size)
    firsts = [sb.s_first_data_block]
    if backups:
        sparse_super = bool(sb.s_feature_ro_compat & L.FEATURE_RO_COMPAT_SPARSE_SUPER)
        firsts += [sb.s_first_data_block + g * sb.s_blocks_per_group for g in range(1, len(groups))
                   if L.group_has_super(g, sparse_super)]
    out = []
    for first in firsts:  # the superblock copy lies in the group's first block (byte 1024 of block 0 at 4 KiB)
        out.append(first)
        out.extend(range(first + 1, first + 1 + desc_blocks))
    return sorted(set(out))


def write_superblocks(device: BlockDevice, sb: L.Superblock, groups: list[L.GroupDesc], *,
                      backups: bool) -> None:
    """Write the group descriptor table and the superblock of group 0 (and, with ``backups``, every backup copy
    in the groups ``sparse_super`` names), as ``ext2fs_flush`` does."""
    bs = sb.block_size
    desc_blocks = -(-len(groups) * L.GROUP_DESC_SIZE // bs)
    gdt = b"".join(L.build_group_desc(gd) for gd in groups).ljust(desc_blocks * bs, b"\0")
    sb.s_block_group_nr = 0
    device.write((sb.s_first_data_block + 1) * bs, gdt)
    device.write(L.SUPERBLOCK_OFFSET, L.build_superblock(sb))
    if not backups:
        return
    sparse_super = bool(sb.s_feature_ro_compat & L.FEATURE_RO_COMPAT_SPARSE_SUPER)
    for g in range(1, len(groups)):
        if not L.group_has_super(g, sparse_super):
            continue
        first = sb.s_first_data_block + g * sb.s_blocks_per_group
        sb_bytes = L.build_superblock(dataclasses.replace(sb, s_block_group_nr=g))
        if bs == 1024:
            device.write(first * bs, sb_bytes)
        else:
            device.write(first * bs, sb_bytes + bytes(bs - L.SUPERBLOCK_SIZE))
        device.write((first + 1) * bs, gdt)


class FsCore:
    """State and shared machinery of one mounted ext2 file system (see the module docstring)."""

    def __init__(self, device: BlockDevice, sb: L.Superblock, groups: list[L.GroupDesc], *,
                 readonly: bool = False) -> None:
        self.device = device
        self.sb = sb
        self.groups = groups
        self._block_size = sb.block_size
        self.readonly = readonly
        self._inode_size = sb.s_inode_size if sb.s_rev_level >= L.EXT2_DYNAMIC_REV else L.GOOD_OLD_INODE_SIZE
        self._first_ino = sb.s_first_ino if sb.s_rev_level >= L.EXT2_DYNAMIC_REV else L.FIRST_INO
        self.filetype = bool(sb.s_feature_incompat & L.FEATURE_INCOMPAT_FILETYPE)
        self.sparse_super = bool(sb.s_feature_ro_compat & L.FEATURE_RO_COMPAT_SPARSE_SUPER)
        self.desc_blocks = -(-len(groups) * L.GROUP_DESC_SIZE // self.block_size)
        self.cache = BlockCache(device, self.block_size)
        self.alloc = Allocator(device, sb, groups)
        self.mapper = BlockMapper(self.block_size, self._node, self._new_node, self.cache.mark_dirty,
                                  self.alloc.alloc_blocks, self._free_blocks, sb.s_blocks_count)
        self._inodes: dict[int, Inode] = {}
        self._dirty_inodes: set[int] = set()
        self._fresh_inodes: set[int] = set()  # allocated since the last flush: the whole slot gets rewritten
        self._dirs: dict[int, Directory] = {}
        self._sb_dirty = False
        self._backups_dirty = False
        self.closed = False
        self.lock = threading.RLock()

    @property
    def block_size(self) -> int:
        """Bytes per file system block."""
        return self._block_size

    @property
    def inode_size(self) -> int:
        """Bytes per on-disk inode slot."""
        return self._inode_size

    @property
    def first_ino(self) -> int:
        """The first inode number not reserved by ext2 (11 on revision 0; ``s_first_ino`` on revision 1)."""
        return self._first_ino

    @property
    def uuid(self) -> str:
        """The file system's UUID (``s_uuid``) in the form blkid and dumpe2fs print."""
        return str(_uuid.UUID(bytes=bytes(self.sb.s_uuid)))

    @locked
    def flush(self) -> None:
        """Write back every dirty inode, directory/indirect block, bitmap, group descriptor and the superblock, in
        that order, then flush the device (on a thin device this commits the pool)."""
        if self.closed:
            raise FsError(reason="file system is closed")
        if not self.readonly:
            self._write_back()
            self.device.flush()
            self.alloc.unpin()  # the frees are committed now
            self.cache.committed()

    @locked
    def close(self) -> None:
        """Flush and drop all in-core state (the device itself stays open)."""
        if not self.closed:
            self.flush()
            self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_back(self) -> None:
        isz = self.inode_size
        for ino in sorted(self._dirty_inodes):
            blk, off = self._inode_pos(ino)
            buf = self.cache.get(blk)
            build_inode_into(self._inodes[ino], buf, off)
            if ino in self._fresh_inodes and isz > L.GOOD_OLD_INODE_SIZE:
                extra = bytearray(isz - L.GOOD_OLD_INODE_SIZE)
                want = min(self.sb.s_want_extra_isize, isz - L.GOOD_OLD_INODE_SIZE) & ~3
                struct.pack_into("<H", extra, 0, want)
                buf[off + L.GOOD_OLD_INODE_SIZE:off + isz] = extra
            self.cache.mark_dirty(blk)
        self._dirty_inodes.clear()
        self._fresh_inodes.clear()
        # in-core caches are only trimmed here, between operations, when nothing holds an Inode or Directory
        if len(self._inodes) > 65536:
            self._inodes.clear()
        if len(self._dirs) > 4096:
            self._dirs.clear()
        # Blocks free at the last commit first: writing them cannot hurt the committed file system. Then every block
        # that overwrites committed metadata is rewritten with its current contents, which makes the device
        # provision it (a thin device copies a shared chunk, allocates an unmapped one) without changing a byte:
        # if the pool is out of space, that fails while nothing committed has changed. Only then the real
        # in-place writes, which no longer need space.
        self.cache.write_fresh()
        sb_changed = self.alloc.gd_dirty or self._sb_dirty
        in_place = self.cache.dirty_in_place() + self.alloc.dirty_bitmap_blocks()
        if sb_changed:
            in_place += superblock_blocks(self.sb, self.groups, backups=self._backups_dirty)
        self._reserve(in_place)
        self.cache.write_back()
        self.alloc.write_back()
        if sb_changed:
            self.sb.s_wtime = now()
            write_superblocks(self.device, self.sb, self.groups, backups=self._backups_dirty)
            self.alloc.gd_dirty = False
            self._sb_dirty = False
            self._backups_dirty = False

    def _reserve(self, blocks: list[int]) -> None:
        """Rewrite each block with what the device holds now (runs of consecutive blocks in one call each)."""
        bs = self.block_size
        order = sorted(set(blocks))
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and order[end] == order[end - 1] + 1:
                end += 1
            off, length = order[start] * bs, (end - start) * bs
            self.device.write(off, self.device.read(off, length))
            start = end

    def _inode_pos(self, ino: int) -> tuple[int, int]:
        g, idx = divmod(ino - 1, self.sb.s_inodes_per_group)
        byte = idx * self.inode_size
        return self.groups[g].bg_inode_table + byte // self.block_size, byte % self.block_size

    def _inode(self, ino: int) -> Inode:
        inode = self._inodes.get(ino)
        if inode is not None:
            return inode
        if not 1 <= ino <= self.sb.s_inodes_count:
            raise FsCorrupt(reason=f"inode number {ino} out of range 1..{self.sb.s_inodes_count}", inode=ino)
        blk, off = self._inode_pos(ino)
        inode = parse_inode(self.cache.get(blk), off)
        if inode.i_links_count and inode.file_type not in L.MODE_TO_FT:
            raise FsCorrupt(reason=f"inode {ino}: bad file type in mode {inode.i_mode:o}", inode=ino, block=blk)
        if inode.is_dir and inode.i_links_count and (inode.i_size % self.block_size or inode.i_size == 0):
            raise FsCorrupt(reason=f"inode {ino}: directory size {inode.i_size} is not a whole number of blocks",
                            inode=ino, block=blk)
        self._inodes[ino] = inode
        return inode

    def _live_inode(self, ino: int, path: str) -> Inode:
        inode = self._inode(ino)
        if inode.i_links_count == 0:
            raise FsCorrupt(reason=f"directory entry {path!r} points at unused inode {ino}", inode=ino, path=path)
        return inode

    def _install_inode(self, ino: int, inode: Inode) -> None:
        self._inodes[ino] = inode
        self._dirty_inodes.add(ino)
        self._fresh_inodes.add(ino)

    def _touch(self, ino: int) -> None:
        self._dirty_inodes.add(ino)

    def _new_inode(self, parent: int, mode: int, uid: int = 0, gid: int = 0) -> tuple[int, Inode]:
        is_dir = mode & L.S_IFMT == L.S_IFDIR
        g = (parent - 1) // self.sb.s_inodes_per_group
        ino = self.alloc.alloc_inode(g, is_dir)
        t = now()
        old = self._inodes.get(ino)
        if old is None:  # the free slot's old contents only matter for the generation number: not validated
            blk, off = self._inode_pos(ino)
            old = parse_inode(self.cache.get(blk), off)
        inode = Inode(i_mode=mode, i_uid=uid & 0xFFFF, i_gid=gid & 0xFFFF, l_i_uid_high=uid >> 16,
                      l_i_gid_high=gid >> 16, i_atime=t, i_ctime=t, i_mtime=t, i_links_count=1,
                      i_generation=(old.i_generation + 1) & 0xFFFFFFFF)
        self._install_inode(ino, inode)
        return ino, inode

    def _release_inode(self, ino: int, inode: Inode) -> None:
        """Free an inode whose link count dropped to zero, with all its blocks."""
        if inode.has_blocks:
            self.mapper.truncate_blocks(ino, inode, 0)
        if inode.i_file_acl:
            self._drop_xattr_block(ino, inode.i_file_acl)
            inode.i_file_acl = 0
        inode.i_block = [0] * L.N_BLOCKS
        inode.i_size = 0
        inode.i_size_high = 0
        inode.i_links_count = 0
        inode.i_blocks = 0
        inode.i_dtime = now() or 1
        self._touch(ino)
        self.alloc.free_inode(ino, inode.is_dir)
        self._dirs.pop(ino, None)

    def _drop_xattr_block(self, ino: int, blk: int) -> None:
        """Drop one reference to xattr block ``blk``; free it with the last (``ext2_xattr_delete_inode``)."""
        buf = self.cache.get(blk)
        refcount = X.parse_block(buf, blk)[0]
        if refcount > 1:
            X.set_refcount(buf, refcount - 1)
            self.cache.mark_dirty(blk)
        else:
            self._free_blocks([blk])

    def _node(self, blk: int) -> npt.NDArray[np.uint32]:
        return np.frombuffer(self.cache.get(blk), "<u4")

    def _new_node(self, blk: int) -> npt.NDArray[np.uint32]:
        return np.frombuffer(self.cache.new(blk), "<u4")

    def _free_blocks(self, blocks: list[int]) -> None:
        for b in blocks:
            self.cache.drop(b)
        self.alloc.free_blocks_list(blocks)

    def _group_start(self, ino: int) -> int:
        g = (ino - 1) // self.sb.s_inodes_per_group
        return self.groups[g].bg_inode_table + (self.sb.s_inodes_per_group * self.inode_size) // self.block_size

    def _goal(self, ino: int, inode: Inode, lblock: int) -> int:
        if lblock > 0:
            prev = inode.i_block[lblock - 1] if lblock <= L.NDIR_BLOCKS else \
                int(self.mapper.map(ino, inode, lblock - 1, 1)[0])
            if prev:
                return prev + 1
        return self._group_start(ino)

    def _need(self, nr_blocks: int, nr_inodes: int = 0, path: str = "") -> None:
        """Raise FsNoSpace (naming ``path``) unless ``nr_blocks`` blocks and ``nr_inodes`` inodes can be allocated
        now; called before an operation changes anything."""
        where = f"{path}: " if path else ""
        if nr_blocks > self.alloc.free_blocks:
            raise FsNoSpace(reason=f"{where}{nr_blocks} block(s) needed, {self.alloc.free_blocks} free", path=path)
        if nr_inodes > self.alloc.free_inodes:
            raise FsNoSpace(reason=f"{where}{nr_inodes} inode(s) needed, {self.alloc.free_inodes} free", path=path)

    def _dir(self, ino: int) -> Directory:
        d = self._dirs.get(ino)
        if d is not None:
            return d
        inode = self._inode(ino)
        if not inode.is_dir:
            raise NotADirectory(path=f"<inode {ino}>")
        nr = inode.i_size // self.block_size

        def get_block(i: int) -> tuple[int, bytearray]:
            phys = int(self.mapper.map(ino, self._inode(ino), i, 1)[0])
            if phys == 0:
                raise FsCorrupt(reason=f"directory inode {ino} has a hole at block {i}", inode=ino)
            return phys, self.cache.get(phys)

        def add_block() -> tuple[int, bytearray]:
            inode = self._inode(ino)
            lblk = inode.i_size // self.block_size
            phys = int(self.mapper.ensure(ino, inode, lblk, 1, self._goal(ino, inode, lblk))[0][0])
            inode.i_size += self.block_size
            if inode.i_flags & L.EXT2_INDEX_FL:
                inode.i_flags &= ~L.EXT2_INDEX_FL
            self._touch(ino)
            return phys, self.cache.new(phys)

        d = Directory(ino, nr, get_block, self.cache.mark_dirty, add_block, self.sb.s_inodes_count, self.filetype,
                      self.cache.get)
        self._dirs[ino] = d
        return d

    def _dir_changed(self, ino: int, inode: Inode) -> None:
        t = now()
        inode.i_mtime = inode.i_ctime = t
        if inode.i_flags & L.EXT2_INDEX_FL:  # an htree index would be stale now; fall back to linear (as ext2)
            inode.i_flags &= ~L.EXT2_INDEX_FL
        self._touch(ino)

    def _entry_cost(self, dir_ino: int, name: bytes) -> int:
        """Blocks adding ``name`` to directory ``dir_ino`` would allocate."""
        d = self._dir(dir_ino)
        if d.blocks_needed_for(name) == 0:
            return 0
        inode = self._inode(dir_ino)
        return self.mapper.count_new(dir_ino, inode, inode.i_size // self.block_size, 1)

    def _check_writable(self) -> None:
        if self.readonly:
            raise FsError(reason="file system is open read-only", errno=_errno.EROFS)
        if self.closed:
            raise FsError(reason="file system is closed")

    def _stat(self, ino: int) -> Stat:
        i = self._inode(ino)
        return Stat(ino=ino, mode=i.i_mode, nlink=i.i_links_count, uid=i.uid, gid=i.gid, size=i.size,
                    atime=i.i_atime, mtime=i.i_mtime, ctime=i.i_ctime, blocks=i.i_blocks, blksize=self.block_size,
                    rdev=i.rdev)

    def _check_ino(self, ino: int) -> None:
        if not 1 <= ino <= self.sb.s_inodes_count:
            raise FsError(reason=f"inode number {ino} out of range 1..{self.sb.s_inodes_count}",
                          errno=_errno.EINVAL, inode=ino)

    def _live_slot(self, ino: int) -> Inode | None:
        """The validated inode ``ino``, or None for a free slot (link count 0 or mode 0, not validated)."""
        self._check_ino(ino)
        inode = self._inodes.get(ino)
        if inode is None:
            blk, off = self._inode_pos(ino)
            raw = parse_inode(self.cache.get(blk), off)
            if raw.i_links_count == 0 or raw.i_mode == 0:
                return None
            inode = self._inode(ino)
        if inode.i_links_count == 0 or inode.i_mode == 0:
            return None
        return inode

    @locked
    def inode_stat(self, ino: int) -> Stat | None:
        """Attributes of inode number ``ino``, or None when its slot is free (link count 0 or mode 0).

        Raises:
            FsError: ``ino`` is outside 1..s_inodes_count (errno EINVAL).
            FsCorrupt: the inode's slot is damaged.
        """
        if self._live_slot(ino) is None:
            return None
        return self._stat(ino)

    @locked
    def inode_blocks(self, ino: int) -> list[int]:
        """The physical blocks holding inode ``ino``'s data, in logical order, holes left out; indirect blocks are
        not included. Empty for a free slot, a fast symlink and a device, FIFO or socket node.

        Raises:
            FsError: ``ino`` is out of range (errno EINVAL).
            FsCorrupt: the inode or one of its indirect blocks is damaged.
        """
        inode = self._live_slot(ino)
        if inode is None or not inode.has_blocks:
            return []
        n = -(-inode.size // self.block_size)
        if not n:
            return []
        phys = self.mapper.map(ino, inode, 0, n)
        return [int(b) for b in phys[phys != 0]]

    @locked
    def dir_entries_by_ino(self, ino: int) -> list[tuple[str, int]]:
        """(name, inode number) of every entry of directory inode ``ino`` except '.' and '..', in on-disk order.

        Raises:
            FileNotFound: the slot is free. NotADirectory: the inode is not a directory.
            FsError: ``ino`` is out of range (errno EINVAL).
        """
        inode = self._live_slot(ino)
        if inode is None:
            raise FileNotFound(path=f"<inode {ino}>", inode=ino)
        if not inode.is_dir:
            raise NotADirectory(path=f"<inode {ino}>", inode=ino)
        return [(decode(n), i) for n, i, _ in self._dir(ino).names()]

    def inode_table_blocks(self) -> list[tuple[int, int, int]]:
        """Per block group: (first block of its inode table, number of inode table blocks, its first inode number)."""
        ipg = self.sb.s_inodes_per_group
        nr = -(-ipg * self.inode_size // self.block_size)
        return [(gd.bg_inode_table, nr, g * ipg + 1) for g, gd in enumerate(self.groups)]

    @locked
    def statfs(self) -> StatFs:
        sb = self.sb
        return StatFs(block_size=self.block_size, nr_blocks=sb.s_blocks_count, free_blocks=sb.s_free_blocks_count,
                      avail_blocks=max(0, sb.s_free_blocks_count - sb.s_r_blocks_count),
                      nr_inodes=sb.s_inodes_count, free_inodes=sb.s_free_inodes_count, name_max=L.NAME_MAX,
                      nr_groups=len(self.groups))

    @locked
    def trim(self) -> int:
        """Discard every free block the device still holds (``fstrim``): on a thin device the chunks wholly inside
        free space go back to the pool. Returns the bytes passed to ``discard``.

        Flushes first, so blocks freed since the last commit are free in the committed file system before any of
        them is discarded; only ranges the device reports mapped are discarded (the work follows what is there).

        Raises:
            FsError: the file system is read-only or closed.
        """
        self._check_writable()
        self.flush()
        bs = self.block_size
        free: list[tuple[int, int]] = []  # (first block, end block) of each free run
        for g in range(len(self.groups)):
            if self.groups[g].bg_free_blocks_count == 0:
                continue
            nbits = self.alloc.group_nr_blocks(g)
            bits = np.unpackbits(self.alloc.block_bitmap(g), bitorder="little")[:nbits].astype(np.int8)
            edges = np.diff(np.concatenate(([1], bits, [1])))
            base = self.sb.s_first_data_block + g * self.sb.s_blocks_per_group
            free.extend((base + int(a), base + int(b)) for a, b in zip(np.flatnonzero(edges == -1),
                                                                       np.flatnonzero(edges == 1), strict=True))
        total = 0
        mapped = self.device.mapped_ranges(0, self.sb.s_blocks_count * bs)
        i = 0
        for start, length in mapped:  # both lists are sorted: intersect them in one pass
            end = start + length
            while i < len(free) and free[i][1] * bs <= start:
                i += 1
            k = i
            while k < len(free) and free[k][0] * bs < end:
                lo, hi = max(free[k][0] * bs, start), min(free[k][1] * bs, end)
                if hi > lo:
                    self.device.discard(lo, hi - lo)
                    total += hi - lo
                k += 1
        self.device.flush()
        return total
