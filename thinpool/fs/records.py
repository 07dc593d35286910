"""What the file system API returns: ``Stat`` (one inode), ``StatFs`` (totals), ``DirEntry`` (one name).

Layer: fs. May import: thinpool.fs.layout.
"""

from __future__ import annotations

import dataclasses

from thinpool.fs import layout as L


@dataclasses.dataclass(frozen=True, slots=True)
class Stat:
    """What ``stat`` returns (times in seconds since the epoch, ``blocks`` in 512-byte sectors)."""

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

    @property
    def is_dir(self) -> bool:
        return self.mode & L.S_IFMT == L.S_IFDIR

    @property
    def is_file(self) -> bool:
        return self.mode & L.S_IFMT == L.S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.mode & L.S_IFMT == L.S_IFLNK


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
