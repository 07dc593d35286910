"""The ext2 file system: mkfs, open, path operations, file data, flush.

Layer: fs. May import: thinpool.io.device, thinpool.errors, thinpool.fs.*.

On-disk result is plain ext2 revision 1 with 4 KiB blocks, as ``mkfs.ext2 -b 4096 -O none,filetype -I 128 -m 0``
makes it (plus ``sparse_super`` with more than one group, ``large_file`` once a file passes 2 GiB), so e2fsck,
debugfs and the kernel read what we write. Everything goes through the byte-addressed ``BlockDevice`` protocol.

Consistency: metadata (inodes, directories, indirect blocks, bitmaps, descriptors, superblock) is written back by
:meth:`Filesystem.flush`, which then calls ``device.flush()`` (on a thin device that commits the pool); file data is
written to the device immediately. Every operation first checks it has the blocks and inodes it needs, so a full file
system raises :class:`FsNoSpace` before anything changes.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import os
import functools
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from thinpool.errors import (DirectoryNotEmpty, FileExists, FileNotFound, FsCorrupt, FsError, FsNoSpace,
                             IsADirectory, NameTooLong, NoFilesystem, NotADirectory, XattrNotFound)
from thinpool.fs import layout as L
from thinpool.fs import xattr as X
from thinpool.fs.alloc import Allocator
from thinpool.fs.cache import BlockCache
from thinpool.fs.directory import Directory, init_dir_block
from thinpool.fs.file import File
from thinpool.fs.inode import BlockMapper, Inode, build_inode_into, parse_inode
from thinpool.fs.records import DirEntry, Stat, StatFs
from thinpool.fs.validate import check_group_desc, check_superblock
from thinpool.io.device import BlockDevice

MAX_LINKS = 65000  # EXT2_LINK_MAX
MAX_SYMLINK_HOPS = 40
NS_PER_S = 10**9
XATTR_CREATE = 1  # os.XATTR_CREATE
XATTR_REPLACE = 2  # os.XATTR_REPLACE
_I_BLOCK_FMT = struct.Struct("<15I")


F = TypeVar("F", bound=Callable[..., Any])


def _locked(fn: F) -> F:
    """Run a public method under the file system's lock (callers may share one Filesystem between threads)."""
    @functools.wraps(fn)
    def wrapper(self: Filesystem, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return fn(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


def _now() -> int:
    return int(time.time()) & 0xFFFFFFFF


def _encode(name: str | bytes) -> bytes:
    return name if isinstance(name, bytes) else os.fsencode(name)


def _decode(name: bytes) -> str:
    return os.fsdecode(name)


class Filesystem:
    """An ext2 file system on a block device. Use :meth:`mkfs` or :meth:`mount`; paths are absolute, '/'-separated."""

    def __init__(self, device: BlockDevice, sb: L.Superblock, groups: list[L.GroupDesc], *,
                 readonly: bool = False) -> None:
        self.device = device
        self.sb = sb
        self.groups = groups
        self.block_size = sb.block_size
        self.readonly = readonly
        self.inode_size = sb.s_inode_size if sb.s_rev_level >= L.EXT2_DYNAMIC_REV else L.GOOD_OLD_INODE_SIZE
        self.first_ino = sb.s_first_ino if sb.s_rev_level >= L.EXT2_DYNAMIC_REV else L.FIRST_INO
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

    # ================================================================================================ creation
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

    # ================================================================================================ flush
    @_locked
    def flush(self) -> None:
        """Write back every dirty inode, directory/indirect block, bitmap, group descriptor and the superblock, in
        that order, then flush the device (on a thin device this commits the pool)."""
        if self.closed:
            raise FsError(reason="file system is closed")
        if not self.readonly:
            self._write_back()
            self.device.flush()
            self.alloc.unpin()  # the frees are committed now

    @_locked
    def close(self) -> None:
        """Flush and drop all in-core state (the device itself stays open)."""
        if not self.closed:
            self.flush()
            self.closed = True

    def __enter__(self) -> Filesystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_back(self) -> None:
        bs = self.block_size
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
        self.cache.write_back()
        self.alloc.write_back()
        if self.alloc.gd_dirty or self._sb_dirty:
            gdt = b"".join(L.build_group_desc(gd) for gd in self.groups)
            gdt = gdt.ljust(self.desc_blocks * bs, b"\0")
            self.device.write((self.sb.s_first_data_block + 1) * bs, gdt)
            self.sb.s_wtime = _now()
            self.sb.s_block_group_nr = 0
            self.device.write(L.SUPERBLOCK_OFFSET, L.build_superblock(self.sb))
            if self._backups_dirty:
                self._write_backups(gdt)
            self.alloc.gd_dirty = False
            self._sb_dirty = False
            self._backups_dirty = False

    def _write_backups(self, gdt: bytes) -> None:
        bs = self.block_size
        for g in range(1, len(self.groups)):
            if not L.group_has_super(g, self.sparse_super):
                continue
            first = self.sb.s_first_data_block + g * self.sb.s_blocks_per_group
            copy = dataclasses.replace(self.sb, s_block_group_nr=g)
            sb_bytes = L.build_superblock(copy)
            if bs == 1024:
                self.device.write(first * bs, sb_bytes)
            else:
                self.device.write(first * bs, sb_bytes + bytes(bs - L.SUPERBLOCK_SIZE))
            self.device.write((first + 1) * bs, gdt)

    # ================================================================================================ inodes
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
        t = _now()
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
        inode.i_dtime = _now() or 1
        self._touch(ino)
        self.alloc.free_inode(ino, inode.is_dir)
        self._dirs.pop(ino, None)

    # ================================================================================================ blocks
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

    def _need(self, nr_blocks: int, nr_inodes: int = 0) -> None:
        if nr_blocks > self.alloc.free_blocks:
            raise FsNoSpace(reason=f"{nr_blocks} block(s) needed, {self.alloc.free_blocks} free")
        if nr_inodes > self.alloc.free_inodes:
            raise FsNoSpace(reason=f"{nr_inodes} inode(s) needed, {self.alloc.free_inodes} free")

    # ================================================================================================ directories
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
        t = _now()
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

    # ================================================================================================ paths
    def _components(self, path: str | bytes) -> list[bytes]:
        p = _encode(path)
        parts = [c for c in p.split(b"/") if c and c != b"."]
        for c in parts:
            if len(c) > L.NAME_MAX:
                raise NameTooLong(path=_decode(p))
        return parts

    def _walk(self, path: str | bytes, follow_last: bool, hops: int = 0,
              start: int = L.ROOT_INO) -> tuple[int, int, bytes]:
        """Resolve ``path``; returns (parent inode, inode or 0 if the last component is absent, last name)."""
        spath = path if isinstance(path, str) else _decode(path)
        parts = self._components(path)
        cur = start if not _encode(path).startswith(b"/") else L.ROOT_INO
        parent = cur
        if not parts:
            d = self._dir(cur)
            return d.parent, cur, b"."
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            inode = self._live_inode(cur, spath)
            if not inode.is_dir:
                raise NotADirectory(path=spath)
            d = self._dir(cur)
            hit = d.lookup(name)
            parent = cur
            if name == b"..":
                cur = d.parent
                if last:
                    return self._dir(cur).parent, cur, name
                continue
            if hit is None:
                if last:
                    return parent, 0, name
                raise FileNotFound(path=spath)
            child = hit[0]
            cinode = self._live_inode(child, spath)
            if cinode.is_symlink and (not last or follow_last):
                if hops >= MAX_SYMLINK_HOPS:
                    raise FsError(reason=f"too many levels of symbolic links: {spath}", path=spath,
                                  errno=_errno.ELOOP)
                target = self._readlink_inode(child, cinode)
                rest = b"/".join(parts[i + 1:])
                newpath = target + (b"/" + rest if rest else b"")
                if not newpath.startswith(b"/"):
                    p, c, n = self._walk(newpath, follow_last, hops + 1, start=parent)
                else:
                    p, c, n = self._walk(newpath, follow_last, hops + 1)
                return p, c, n
            cur = child
        return parent, cur, parts[-1]

    def _lookup(self, path: str | bytes, follow: bool = True) -> int:
        _, ino, _ = self._walk(path, follow)
        if ino == 0:
            raise FileNotFound(path=path if isinstance(path, str) else _decode(path))
        return ino

    def _parent_of_new(self, path: str | bytes) -> tuple[int, bytes, int]:
        """(parent dir inode, name, existing inode or 0) for creating ``path`` (the last symlink not followed)."""
        spath = path if isinstance(path, str) else _decode(path)
        parent, ino, name = self._walk(path, follow_last=False)
        if name in (b".", b"..") or not self._components(path):
            raise FileExists(path=spath)
        if not self._inode(parent).is_dir:
            raise NotADirectory(path=spath)
        return parent, name, ino

    def _check_writable(self) -> None:
        if self.readonly:
            raise FsError(reason="file system is open read-only", errno=_errno.EROFS)
        if self.closed:
            raise FsError(reason="file system is closed")

    # ================================================================================================ public API
    @_locked
    def exists(self, path: str) -> bool:
        try:
            self._lookup(path, follow=False)
        except (FileNotFound, NotADirectory):
            return False
        return True

    @_locked
    def isdir(self, path: str) -> bool:
        try:
            return self._inode(self._lookup(path)).is_dir
        except (FileNotFound, NotADirectory):
            return False

    @_locked
    def isfile(self, path: str) -> bool:
        try:
            return self._inode(self._lookup(path)).is_reg
        except (FileNotFound, NotADirectory):
            return False

    @_locked
    def stat(self, path: str, *, follow_symlinks: bool = True) -> Stat:
        """Inode attributes of ``path`` (following a final symlink unless ``follow_symlinks`` is false)."""
        ino = self._lookup(path, follow_symlinks)
        return self._stat(ino)

    def lstat(self, path: str) -> Stat:
        return self.stat(path, follow_symlinks=False)

    def _stat(self, ino: int) -> Stat:
        i = self._inode(ino)
        return Stat(ino=ino, mode=i.i_mode, nlink=i.i_links_count, uid=i.uid, gid=i.gid, size=i.size,
                    atime=i.i_atime, mtime=i.i_mtime, ctime=i.i_ctime, blocks=i.i_blocks, blksize=self.block_size,
                    rdev=i.rdev)

    @_locked
    def scandir(self, path: str = "/") -> list[DirEntry]:
        """Entries of a directory except '.' and '..', in on-disk order."""
        ino = self._lookup(path)
        if not self._inode(ino).is_dir:
            raise NotADirectory(path=path)
        return [DirEntry(_decode(n), i, ft) for n, i, ft in self._dir(ino).names()]

    def listdir(self, path: str = "/") -> list[str]:
        return [e.name for e in self.scandir(path)]

    def walk(self, path: str = "/") -> Iterator[tuple[str, list[str], list[str]]]:
        """Like ``os.walk`` (top-down): (dirpath, dirnames, filenames); symlinks to directories are not followed."""
        entries = self.scandir(path)
        dirs = [e.name for e in entries if e.file_type == L.FT_DIR or
                (e.file_type == L.FT_UNKNOWN and self._inode(e.ino).is_dir)]
        files = [e.name for e in entries if e.name not in dirs]
        yield path, dirs, files
        for d in dirs:
            yield from self.walk(path.rstrip("/") + "/" + d)

    @_locked
    def mkdir(self, path: str, mode: int = 0o755, *, parents: bool = False, exist_ok: bool = False) -> None:
        """Create a directory (with ``parents``, also missing ancestors, like ``mkdir -p``).

        Raises:
            FileExists, FileNotFound (parent missing), NotADirectory, NameTooLong, FsNoSpace.
        """
        self._check_writable()
        if parents:
            parts = self._components(path)
            cur = ""
            for i, c in enumerate(parts):
                cur += "/" + _decode(c)
                if not self.exists(cur):
                    self.mkdir(cur, mode)
                elif not self.isdir(cur):
                    raise NotADirectory(path=cur)
            return
        parent, name, existing = self._parent_of_new(path)
        if existing:
            if exist_ok and self._inode(existing).is_dir:
                return
            raise FileExists(path=path)
        pinode = self._inode(parent)
        if pinode.i_links_count >= MAX_LINKS:
            raise FsError(reason=f"too many links in the parent of {path}", path=path, errno=_errno.EMLINK)
        self._need(1 + self._entry_cost(parent, name), 1)
        ino, inode = self._new_inode(parent, L.S_IFDIR | (mode & 0o7777))
        inode.i_links_count = 2
        blk = self.alloc.alloc_blocks(self._group_start(ino), 1)[0]
        init_dir_block(self.cache.new(blk), ino, parent, self.filetype)
        inode.i_block[0] = blk
        inode.i_blocks = self.block_size // 512
        inode.i_size = self.block_size
        self._dir(parent).add(name, ino, L.FT_DIR)
        pinode.i_links_count += 1
        self._dir_changed(parent, pinode)

    def makedirs(self, path: str, mode: int = 0o755, exist_ok: bool = True) -> None:
        if exist_ok and self.isdir(path):
            return
        self.mkdir(path, mode, parents=True)

    @_locked
    def rmdir(self, path: str) -> None:
        """Remove an empty directory.

        Raises:
            DirectoryNotEmpty, NotADirectory, FileNotFound, FsError (EBUSY) for the root.
        """
        self._check_writable()
        parent, ino, name = self._walk(path, follow_last=False)
        if ino == 0:
            raise FileNotFound(path=path)
        if ino == L.ROOT_INO:
            raise FsError(reason="cannot remove the root directory", path=path, errno=_errno.EBUSY)
        if name in (b".", b".."):
            raise FsError(reason=f"invalid argument: {path}", path=path, errno=_errno.EINVAL)
        inode = self._inode(ino)
        if not inode.is_dir:
            raise NotADirectory(path=path)
        if len(self._dir(ino)):
            raise DirectoryNotEmpty(path=path)
        self._dir(parent).remove(name)
        pinode = self._inode(parent)
        pinode.i_links_count -= 1
        self._dir_changed(parent, pinode)
        self._release_inode(ino, inode)

    @_locked
    def unlink(self, path: str) -> None:
        """Remove a name of a non-directory; the inode goes when its last link does.

        Raises:
            IsADirectory, FileNotFound, NotADirectory.
        """
        self._check_writable()
        parent, ino, name = self._walk(path, follow_last=False)
        if ino == 0:
            raise FileNotFound(path=path)
        inode = self._inode(ino)
        if inode.is_dir:
            raise IsADirectory(path=path)
        self._dir(parent).remove(name)
        self._dir_changed(parent, self._inode(parent))
        self._drop_link(ino, inode)

    remove = unlink

    def _drop_link(self, ino: int, inode: Inode) -> None:
        inode.i_links_count -= 1
        inode.i_ctime = _now()
        self._touch(ino)
        if inode.i_links_count == 0:
            self._release_inode(ino, inode)

    @_locked
    def link(self, src: str, dst: str) -> None:
        """Make ``dst`` another name of the non-directory ``src`` (a hard link)."""
        self._check_writable()
        ino = self._lookup(src, follow=False)
        inode = self._inode(ino)
        if inode.is_dir:
            raise IsADirectory(path=src)
        if inode.i_links_count >= MAX_LINKS:
            raise FsError(reason=f"too many links: {src}", path=src, errno=_errno.EMLINK)
        parent, name, existing = self._parent_of_new(dst)
        if existing:
            raise FileExists(path=dst)
        self._need(self._entry_cost(parent, name))
        self._dir(parent).add(name, ino, L.MODE_TO_FT[inode.file_type])
        self._dir_changed(parent, self._inode(parent))
        inode.i_links_count += 1
        inode.i_ctime = _now()
        self._touch(ino)

    @_locked
    def symlink(self, target: str | bytes, path: str) -> None:
        """Create a symbolic link ``path`` -> ``target`` (inline "fast" symlink below 60 bytes)."""
        self._check_writable()
        tb = _encode(target)
        if not tb or b"\0" in tb:
            raise FsError(reason="invalid symlink target", path=path, errno=_errno.EINVAL)
        if len(tb) > L.SYMLINK_MAX:
            raise NameTooLong(path=path)
        parent, name, existing = self._parent_of_new(path)
        if existing:
            raise FileExists(path=path)
        fast = len(tb) <= L.FAST_SYMLINK_MAX
        self._need((0 if fast else 1) + self._entry_cost(parent, name), 1)
        ino, inode = self._new_inode(parent, L.S_IFLNK | 0o777)
        if fast:
            inode.i_block = list(_I_BLOCK_FMT.unpack(tb.ljust(60, b"\0")))
        else:
            blk = self.alloc.alloc_blocks(self._group_start(ino), 1)[0]
            self.device.write(blk * self.block_size, tb.ljust(self.block_size, b"\0"))
            inode.i_block[0] = blk
            inode.i_blocks = self.block_size // 512
        inode.i_size = len(tb)
        self._dir(parent).add(name, ino, L.FT_SYMLINK)
        self._dir_changed(parent, self._inode(parent))

    @_locked
    def readlink(self, path: str) -> str:
        ino = self._lookup(path, follow=False)
        inode = self._inode(ino)
        if not inode.is_symlink:
            raise FsError(reason=f"not a symbolic link: {path}", path=path, errno=_errno.EINVAL)
        return _decode(self._readlink_inode(ino, inode))

    def _readlink_inode(self, ino: int, inode: Inode) -> bytes:
        if inode.is_fast_symlink:
            if inode.i_size > 60:
                raise FsCorrupt(reason=f"inode {ino}: fast symlink of {inode.i_size} bytes", inode=ino)
            return _I_BLOCK_FMT.pack(*inode.i_block)[:inode.i_size]
        if inode.i_size >= self.block_size:
            raise FsCorrupt(reason=f"inode {ino}: symlink of {inode.i_size} bytes", inode=ino)
        return self._read(ino, inode, 0, inode.i_size)

    @_locked
    def rename(self, src: str, dst: str) -> None:
        """Move ``src`` to ``dst``, replacing a ``dst`` file or empty directory of compatible type (POSIX rules).

        Raises:
            FileNotFound, IsADirectory (file over directory), NotADirectory (directory over file),
            DirectoryNotEmpty, FsError (EINVAL) when moving a directory into itself.
        """
        self._check_writable()
        sparent, sino, sname = self._walk(src, follow_last=False)
        if sino == 0:
            raise FileNotFound(path=src)
        if sname in (b".", b"..") or sino == L.ROOT_INO:
            raise FsError(reason=f"invalid argument: {src}", path=src, errno=_errno.EINVAL)
        dparent, dname, dino = self._parent_of_new(dst)
        sinode = self._inode(sino)
        if dino == sino:
            return
        if sinode.is_dir:
            # dst's parent must not be src or inside it
            p = dparent
            while True:
                if p == sino:
                    raise FsError(reason=f"cannot move {src} into itself", path=dst, errno=_errno.EINVAL)
                if p == L.ROOT_INO:
                    break
                p = self._dir(p).parent
        dinode = self._inode(dino) if dino else None
        if dinode is not None:
            if sinode.is_dir and not dinode.is_dir:
                raise NotADirectory(path=dst)
            if not sinode.is_dir and dinode.is_dir:
                raise IsADirectory(path=dst)
            if dinode.is_dir and len(self._dir(dino)):
                raise DirectoryNotEmpty(path=dst)
        else:
            self._need(self._entry_cost(dparent, dname))
        ft = L.MODE_TO_FT[sinode.file_type]
        ddir = self._dir(dparent)
        dpinode = self._inode(dparent)
        spinode = self._inode(sparent)
        if dinode is not None:
            ddir.set_inode(dname, sino, ft)
            if dinode.is_dir:
                dpinode.i_links_count -= 1  # the replaced directory's '..'
                self._release_inode(dino, dinode)
            else:
                self._drop_link(dino, dinode)
        else:
            ddir.add(dname, sino, ft)
        self._dir(sparent).remove(sname)
        if sinode.is_dir and sparent != dparent:
            self._dir(sino).set_inode(b"..", dparent, L.FT_DIR)
            self._dir_changed(sino, sinode)
            spinode.i_links_count -= 1
            dpinode.i_links_count += 1
        sinode.i_ctime = _now()
        self._touch(sino)
        self._dir_changed(sparent, spinode)
        self._dir_changed(dparent, dpinode)

    @_locked
    def chmod(self, path: str, mode: int, *, follow_symlinks: bool = True) -> None:
        """Set the permission bits (07777) of ``path``; with ``follow_symlinks=False`` a final symlink itself."""
        self._check_writable()
        ino = self._lookup(path, follow_symlinks)
        inode = self._inode(ino)
        inode.i_mode = (inode.i_mode & L.S_IFMT) | (mode & 0o7777)
        inode.i_ctime = _now()
        self._touch(ino)

    @_locked
    def chown(self, path: str, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        """Set owner and group (-1 leaves one unchanged); 32-bit ids use the Linux high halves.

        With ``follow_symlinks=False`` a final symlink itself changes (``lchown``).
        """
        self._check_writable()
        ino = self._lookup(path, follow_symlinks)
        inode = self._inode(ino)
        if uid != -1:
            inode.i_uid, inode.l_i_uid_high = uid & 0xFFFF, (uid >> 16) & 0xFFFF
        if gid != -1:
            inode.i_gid, inode.l_i_gid_high = gid & 0xFFFF, (gid >> 16) & 0xFFFF
        inode.i_ctime = _now()
        self._touch(ino)

    def lchown(self, path: str, uid: int, gid: int) -> None:
        """``chown`` of a final symlink itself."""
        self.chown(path, uid, gid, follow_symlinks=False)

    @_locked
    def utime(self, path: str, times: tuple[float, float] | None = None, *, ns: tuple[int, int] | None = None,
              follow_symlinks: bool = True) -> None:
        """Set (atime, mtime), as ``os.utime``: ``times`` in seconds, or ``ns`` in nanoseconds, or both to now.

        ext2 keeps whole seconds (32 bits), so nanoseconds are truncated. A ``times`` pair holding a value of
        2**32 or more cannot be seconds ext2 stores and is taken as nanoseconds (``utime(p, (atime_ns,
        mtime_ns))`` works). With ``follow_symlinks=False`` a final symlink itself changes.
        """
        self._check_writable()
        ino = self._lookup(path, follow_symlinks)
        inode = self._inode(ino)
        t = _now()
        if ns is not None:
            atime, mtime = ns[0] // NS_PER_S, ns[1] // NS_PER_S
        elif times is not None:
            if max(abs(times[0]), abs(times[1])) >= 2**32:
                atime, mtime = int(times[0]) // NS_PER_S, int(times[1]) // NS_PER_S
            else:
                atime, mtime = int(times[0] // 1), int(times[1] // 1)
        else:
            atime = mtime = t
        inode.i_atime, inode.i_mtime, inode.i_ctime = int(atime) & 0xFFFFFFFF, int(mtime) & 0xFFFFFFFF, t
        self._touch(ino)

    # --- special files ------------------------------------------------------------------------------------------
    @_locked
    def mknod(self, path: str, mode: int, rdev: int = 0) -> None:
        """Create a FIFO, socket, character or block device (or, with no type bits, an empty regular file).

        ``mode`` carries the type (``stat.S_IFIFO`` ...) and the permission bits; ``rdev`` (``os.makedev``) is
        stored for device nodes as ext2 does (old 8:8 encoding in i_block[0] when it fits, else the new one in
        i_block[1]). Nothing is ever opened.

        Raises:
            FileExists, FileNotFound (parent missing), NotADirectory, FsNoSpace, FsError (EINVAL: a directory or
            symlink type).
        """
        self._check_writable()
        ftype = mode & L.S_IFMT or L.S_IFREG
        if ftype not in (L.S_IFIFO, L.S_IFSOCK, L.S_IFCHR, L.S_IFBLK, L.S_IFREG):
            raise FsError(reason=f"mknod cannot make type {ftype:#o}: {path}", path=path, errno=_errno.EINVAL)
        parent, name, existing = self._parent_of_new(path)
        if existing:
            raise FileExists(path=path)
        self._need(self._entry_cost(parent, name), 1)
        ino, inode = self._new_inode(parent, ftype | (mode & 0o7777))
        if inode.is_device:
            inode.rdev = rdev
        self._dir(parent).add(name, ino, L.MODE_TO_FT[ftype])
        self._dir_changed(parent, self._inode(parent))

    # --- extended attributes ----------------------------------------------------------------------------------
    @_locked
    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0, *, follow_symlinks: bool = False) -> None:
        """Set extended attribute ``name`` (``user.*``, ``trusted.*``, ``security.*``, ``system.posix_acl_*``).

        Acts on a final symlink itself (``lsetxattr``) unless ``follow_symlinks``. ``flags`` as ``os.setxattr``:
        ``os.XATTR_CREATE`` fails if it exists, ``os.XATTR_REPLACE`` if it does not. The first attribute sets the
        ``ext_attr`` feature.

        Raises:
            FileExists (XATTR_CREATE), XattrNotFound (XATTR_REPLACE), FsNoSpace (no free block, or the
            attributes no longer fit one block), FsError (ENOTSUP, EINVAL, ERANGE).
        """
        self._check_writable()
        key = X.split_name(name, path)
        raw = bytes(value)
        if X.is_acl(key[0]):
            raw = X.acl_to_disk(raw, path)
        ino = self._lookup(path, follow_symlinks)
        inode = self._inode(ino)
        attrs = self._xattrs(ino, inode)
        if flags & XATTR_CREATE and key in attrs:
            raise FileExists(path=path, reason=f"attribute {name} exists: {path}")
        if flags & XATTR_REPLACE and key not in attrs:
            raise XattrNotFound(name=name, path=path)
        attrs[key] = raw
        self._store_xattrs(ino, inode, attrs)

    @_locked
    def getxattr(self, path: str, name: str, *, follow_symlinks: bool = False) -> bytes:
        """The value of extended attribute ``name`` (of a final symlink itself unless ``follow_symlinks``).

        Raises:
            XattrNotFound, FsError (ENOTSUP for a namespace ext2 does not store).
        """
        key = X.split_name(name, path)
        ino = self._lookup(path, follow_symlinks)
        inode = self._inode(ino)
        value = self._xattrs(ino, inode).get(key)
        if value is None:
            raise XattrNotFound(name=name, path=path)
        return X.acl_from_disk(value, inode.i_file_acl) if X.is_acl(key[0]) else value

    @_locked
    def listxattr(self, path: str, *, follow_symlinks: bool = False) -> list[str]:
        """Names of every extended attribute of ``path``, in on-disk order."""
        ino = self._lookup(path, follow_symlinks)
        inode = self._inode(ino)
        return [X.join_name(k) for k in self._xattrs(ino, inode)]

    @_locked
    def removexattr(self, path: str, name: str, *, follow_symlinks: bool = False) -> None:
        """Remove extended attribute ``name``; the xattr block goes with the last one.

        Raises:
            XattrNotFound.
        """
        self._check_writable()
        key = X.split_name(name, path)
        ino = self._lookup(path, follow_symlinks)
        inode = self._inode(ino)
        attrs = self._xattrs(ino, inode)
        if key not in attrs:
            raise XattrNotFound(name=name, path=path)
        del attrs[key]
        self._store_xattrs(ino, inode, attrs)

    def _xattrs(self, ino: int, inode: Inode) -> dict[X.Key, bytes]:
        blk = inode.i_file_acl
        if not blk:
            return {}
        if not self.sb.s_first_data_block < blk < self.sb.s_blocks_count:
            raise FsCorrupt(reason=f"inode {ino}: xattr block {blk} is outside the file system", inode=ino,
                            block=blk)
        return X.parse_block(self.cache.get(blk), blk)[1]

    def _store_xattrs(self, ino: int, inode: Inode, attrs: dict[X.Key, bytes]) -> None:
        """Write ``attrs`` as the inode's xattr block: in place when the inode owns it alone, else into a new
        block (a shared block only loses one reference); no attributes free the block."""
        bs = self.block_size
        old = inode.i_file_acl
        if attrs:
            buf = X.build_block(attrs, bs)  # raises FsNoSpace before anything changes
            if old and X.parse_block(self.cache.get(old), old)[0] == 1:
                self.cache.get(old)[:] = buf
                self.cache.mark_dirty(old)
            else:
                self._need(1)
                blk = self.alloc.alloc_blocks(self._group_start(ino), 1)[0]
                self.cache.new(blk)[:] = buf
                if old:
                    self._drop_xattr_block(ino, old)
                else:
                    inode.i_blocks += bs // 512
                inode.i_file_acl = blk
            if not self.sb.s_feature_compat & X.FEATURE_COMPAT_EXT_ATTR:
                self.sb.s_feature_compat |= X.FEATURE_COMPAT_EXT_ATTR
                self._sb_dirty = True
                self._backups_dirty = True
        elif old:
            self._drop_xattr_block(ino, old)
            inode.i_file_acl = 0
            inode.i_blocks -= bs // 512
        inode.i_ctime = _now()
        self._touch(ino)

    def _drop_xattr_block(self, ino: int, blk: int) -> None:
        """Drop one reference to xattr block ``blk``; free it with the last (``ext2_xattr_delete_inode``)."""
        buf = self.cache.get(blk)
        refcount = X.parse_block(buf, blk)[0]
        if refcount > 1:
            X.set_refcount(buf, refcount - 1)
            self.cache.mark_dirty(blk)
        else:
            self._free_blocks([blk])

    @_locked
    def statfs(self) -> StatFs:
        sb = self.sb
        return StatFs(block_size=self.block_size, nr_blocks=sb.s_blocks_count, free_blocks=sb.s_free_blocks_count,
                      avail_blocks=max(0, sb.s_free_blocks_count - sb.s_r_blocks_count),
                      nr_inodes=sb.s_inodes_count, free_inodes=sb.s_free_inodes_count, name_max=L.NAME_MAX,
                      nr_groups=len(self.groups))

    # --- files ----------------------------------------------------------------------------------------------------
    @_locked
    def open(self, path: str, mode: str = "rb") -> File:
        """Open a regular file. Modes as Python's binary ``open``: r, w, a, x, with optional + (``b`` is implied).

        Raises:
            FileNotFound (r / r+), FileExists (x), IsADirectory, NotADirectory, FsNoSpace (new file).
        """
        m = mode.replace("b", "")
        if not m or m[0] not in "rwax" or any(c not in "rwax+" for c in m) or "t" in mode:
            raise FsError(reason=f"invalid mode {mode!r}", errno=_errno.EINVAL)
        kind, plus = m[0], "+" in m
        readable = kind == "r" or plus
        writable = kind != "r" or plus
        if writable:
            self._check_writable()
        parent, ino, name = self._walk(path, follow_last=True)
        if ino == 0:
            if kind == "r":
                raise FileNotFound(path=path)
            ino = self._create(parent, name, path)
        else:
            if kind == "x":
                raise FileExists(path=path)
            inode = self._inode(ino)
            if inode.is_dir:
                raise IsADirectory(path=path)
            if not inode.is_reg:
                raise FsError(reason=f"not a regular file: {path}", path=path, errno=_errno.EINVAL)
            if kind == "w" and inode.size:
                self._truncate(ino, inode, 0)
        return File(self, ino, path, readable=readable, writable=writable, append=kind == "a")

    def _create(self, parent: int, name: bytes, path: str, mode: int = 0o644) -> int:
        if name in (b".", b".."):
            raise IsADirectory(path=path)
        self._need(self._entry_cost(parent, name), 1)
        ino, _ = self._new_inode(parent, L.S_IFREG | mode)
        self._dir(parent).add(name, ino, L.FT_REG_FILE)
        self._dir_changed(parent, self._inode(parent))
        return ino

    @_locked
    def read_file(self, path: str) -> bytes:
        with self.open(path, "rb") as f:
            return f.read()

    @_locked
    def write_file(self, path: str, data: bytes) -> None:
        with self.open(path, "wb") as f:
            f.write(data)

    @_locked
    def write_at(self, path: str, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at byte ``offset`` of the existing regular file ``path``; returns the bytes written.

        Blocks the write does not touch stay holes (a write past the end leaves a hole before it).

        Raises:
            FileNotFound, IsADirectory, FsError (EINVAL: not a regular file or a negative offset), FsNoSpace.
        """
        self._check_writable()
        if offset < 0:
            raise FsError(reason=f"negative offset {offset}: {path}", path=path, errno=_errno.EINVAL)
        ino = self._lookup(path)
        inode = self._inode(ino)
        if inode.is_dir:
            raise IsADirectory(path=path)
        if not inode.is_reg:
            raise FsError(reason=f"not a regular file: {path}", path=path, errno=_errno.EINVAL)
        return self._write(ino, inode, offset, data)

    @_locked
    def data_ranges(self, path: str) -> list[tuple[int, int]]:
        """(offset, length) in bytes of every allocated stretch of regular file ``path`` (what SEEK_DATA finds),
        clipped to its size; the gaps are holes. Costs O(allocated blocks), not O(size).

        Raises:
            FileNotFound, IsADirectory, FsError (EINVAL: not a regular file).
        """
        ino = self._lookup(path)
        inode = self._inode(ino)
        if inode.is_dir:
            raise IsADirectory(path=path)
        if not inode.is_reg:
            raise FsError(reason=f"not a regular file: {path}", path=path, errno=_errno.EINVAL)
        bs = self.block_size
        size = inode.size
        out = []
        for first, n in self.mapper.mapped_runs(ino, inode):
            start = first * bs
            if start >= size:
                break
            out.append((start, min(n * bs, size - start)))
        return out

    @_locked
    def truncate(self, path: str, size: int) -> None:
        self._check_writable()
        ino = self._lookup(path)
        inode = self._inode(ino)
        if inode.is_dir:
            raise IsADirectory(path=path)
        if not inode.is_reg:
            raise FsError(reason=f"not a regular file: {path}", path=path, errno=_errno.EINVAL)
        self._truncate(ino, inode, size)

    # --- data path --------------------------------------------------------------------------------------------
    def _read(self, ino: int, inode: Inode, offset: int, length: int) -> bytes:
        size = inode.size
        if offset >= size or length <= 0:
            return b""
        length = min(length, size - offset)
        bs = self.block_size
        l0 = offset // bs
        l1 = (offset + length - 1) // bs + 1
        phys = self.mapper.map(ino, inode, l0, l1 - l0)
        parts: list[bytes] = []
        i = 0
        n = len(phys)
        while i < n:
            j = i + 1
            if phys[i] == 0:
                while j < n and phys[j] == 0:
                    j += 1
                parts.append(bytes((j - i) * bs))
            else:
                while j < n and phys[j] == phys[j - 1] + 1:
                    j += 1
                parts.append(self.device.read(int(phys[i]) * bs, (j - i) * bs))
            i = j
        data = b"".join(parts) if len(parts) != 1 else parts[0]
        start = offset - l0 * bs
        return data[start:start + length]

    def _write(self, ino: int, inode: Inode, offset: int, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        if n == 0:
            return 0
        bs = self.block_size
        end = offset + n
        if (end + bs - 1) // bs > self.mapper.max_blocks:
            raise FsError(reason="file too large", errno=_errno.EFBIG)
        l0 = offset // bs
        l1 = (end - 1) // bs + 1
        self._need(self.mapper.count_new(ino, inode, l0, l1 - l0))
        phys, new = self.mapper.ensure(ino, inode, l0, l1 - l0, self._goal(ino, inode, l0))
        head = offset - l0 * bs
        tail = l1 * bs - end
        if head or tail:
            pre = b""
            post = b""
            if head:
                pre = bytes(head) if new[0] else self.device.read(int(phys[0]) * bs, bs)[:head]
            if tail:
                if new[-1]:
                    post = bytes(tail)
                else:
                    post = self.device.read(int(phys[-1]) * bs + bs - tail, tail)
            buf = memoryview(b"".join((pre, bytes(data), post)))
        else:
            buf = memoryview(data).cast("B")
        count = len(phys)
        i = 0
        try:
            while i < count:
                j = i + 1
                while j < count and phys[j] == phys[j - 1] + 1:
                    j += 1
                self.device.write(int(phys[i]) * bs, buf[i * bs:j * bs])
                i = j
        except BaseException:
            # the device refused (e.g. the thin pool ran out of data space): give back the blocks this write
            # mapped, so no file shows blocks that were never written and the bitmaps stay exact
            self.mapper.unmap(ino, inode, l0, new)
            self._touch(ino)
            raise
        if end > inode.size:
            self._set_size(inode, end)
        t = _now()
        inode.i_mtime = inode.i_ctime = t
        self._touch(ino)
        return n

    def _set_size(self, inode: Inode, size: int) -> None:
        inode.size = size
        if size > L.LARGE_FILE_SIZE and not self.sb.s_feature_ro_compat & L.FEATURE_RO_COMPAT_LARGE_FILE:
            if self.sb.s_rev_level < L.EXT2_DYNAMIC_REV:  # features need revision 1 (ext2_update_dynamic_rev)
                self.sb.s_rev_level = L.EXT2_DYNAMIC_REV
                self.sb.s_first_ino = L.FIRST_INO
                self.sb.s_inode_size = L.GOOD_OLD_INODE_SIZE
            self.sb.s_feature_ro_compat |= L.FEATURE_RO_COMPAT_LARGE_FILE
            self._sb_dirty = True
            self._backups_dirty = True

    def _truncate(self, ino: int, inode: Inode, size: int) -> None:
        if size < 0:
            raise FsError(reason="negative size", errno=_errno.EINVAL)
        bs = self.block_size
        if -(-size // bs) > self.mapper.max_blocks:
            raise FsError(reason="file too large", errno=_errno.EFBIG)
        old = inode.size
        if size < old:
            keep = -(-size // bs)
            self.mapper.truncate_blocks(ino, inode, keep)
            if size % bs:
                # zero the tail of the last block, so a later extension reads zeros there
                phys = int(self.mapper.map(ino, inode, size // bs, 1)[0])
                if phys:
                    self.device.write_zeroes(phys * bs + size % bs, bs - size % bs)
        inode.size = size
        if size > old:
            self._set_size(inode, size)
        t = _now()
        inode.i_mtime = inode.i_ctime = t
        self._touch(ino)
