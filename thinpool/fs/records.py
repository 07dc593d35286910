"""What the file system API returns: ``Stat`` (one inode), ``StatFs`` (totals), ``DirEntry`` (one name).

Layer: fs. May import: thinpool.fs.layout.
"""

from __future__ import annotations

import dataclasses

from thinpool.fs import layout as L

NS_PER_S = 10**9


@dataclasses.dataclass(frozen=True, slots=True)
class Stat:
    """What ``stat`` returns (times in seconds since the epoch, ``blocks`` in 512-byte sectors).

    The ``st_*`` properties give the same values under ``os.stat_result``'s names (ext2 keeps whole seconds, so
    the ``*_ns`` times are multiples of 10**9); ``rdev`` is the device number of a character or block device node
    (``os.makedev``), 0 otherwise.
    """

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime: int
    mtime: int
    ctime: int
    blocks: int
    blksize: int
    rdev: int = 0

    @property
    def st_mode(self) -> int:
        return self.mode

    @property
    def st_ino(self) -> int:
        return self.ino

    @property
    def st_nlink(self) -> int:
        return self.nlink

    @property
    def st_uid(self) -> int:
        return self.uid

    @property
    def st_gid(self) -> int:
        return self.gid

    @property
    def st_size(self) -> int:
        return self.size

    @property
    def st_atime(self) -> int:
        return self.atime

    @property
    def st_mtime(self) -> int:
        return self.mtime

    @property
    def st_ctime(self) -> int:
        return self.ctime

    @property
    def st_atime_ns(self) -> int:
        return self.atime * NS_PER_S

    @property
    def st_mtime_ns(self) -> int:
        return self.mtime * NS_PER_S

    @property
    def st_ctime_ns(self) -> int:
        return self.ctime * NS_PER_S

    @property
    def st_blocks(self) -> int:
        return self.blocks

    @property
    def st_blksize(self) -> int:
        return self.blksize

    @property
    def st_rdev(self) -> int:
        return self.rdev

    @property
    def is_dir(self) -> bool:
        return self.mode & L.S_IFMT == L.S_IFDIR

    @property
    def is_file(self) -> bool:
        return self.mode & L.S_IFMT == L.S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.mode & L.S_IFMT == L.S_IFLNK

    @property
    def is_special(self) -> bool:
        """A FIFO, socket, character or block device node."""
        return self.mode & L.S_IFMT in (L.S_IFIFO, L.S_IFSOCK, L.S_IFCHR, L.S_IFBLK)


@dataclasses.dataclass(frozen=True, slots=True)
class StatFs:
    """File system totals (``statvfs``): sizes in blocks of ``block_size`` bytes."""

    block_size: int
    nr_blocks: int
    free_blocks: int
    avail_blocks: int
    nr_inodes: int
    free_inodes: int
    name_max: int
    nr_groups: int

    @property
    def size(self) -> int:
        return self.nr_blocks * self.block_size

    @property
    def free_bytes(self) -> int:
        return self.free_blocks * self.block_size


@dataclasses.dataclass(frozen=True, slots=True)
class DirEntry:
    """One name in a directory listing (``file_type`` is the dirent FT_* code)."""

    name: str
    ino: int
    file_type: int

    @property
    def is_dir(self) -> bool:
        return self.file_type == L.FT_DIR
