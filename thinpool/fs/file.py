"""An open regular file of the ext2 file system (``Filesystem.open``): read, write, seek, tell, truncate.

Layer: fs. May import: thinpool.errors, thinpool.fs.*.

A :class:`File` is a position and open flags over an inode number; every access goes through the file system's
public by-inode calls (``file_size``, ``pread``, ``pwrite``, ``ftruncate``), which take the lock and check the
inode is still a live regular file.
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING, Self

from thinpool.errors import FsError

if TYPE_CHECKING:
    from thinpool.fs.files import FsFiles


class File:
    """An open regular file: read / write / seek / tell / truncate, like a binary Python file."""

    def __init__(self, fs: FsFiles, ino: int, path: str, *, readable: bool, writable: bool,
                 append: bool) -> None:
        self.fs = fs
        self.ino = ino
        self.name = path
        self.readable_ = readable
        self.writable_ = writable
        self.append = append
        self.pos = 0
        self.closed = False

    def _check_open(self) -> None:
        if self.closed:
            raise FsError(reason="I/O on a closed file", path=self.name, errno=_errno.EBADF)

    def readable(self) -> bool:
        return self.readable_

    def writable(self) -> bool:
        return self.writable_

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        with self.fs.lock:
            return self._read(size)

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        memoryview(buf).cast("B")[:len(data)] = data
        return len(data)

    def _read(self, size: int) -> bytes:
        self._check_open()
        if not self.readable_:
            raise FsError(reason="file not open for reading", path=self.name, errno=_errno.EBADF)
        if size is None or size < 0:
            size = max(0, self.fs.file_size(self.ino, self.name) - self.pos)
        data = self.fs.pread(self.ino, self.pos, size, self.name)
        self.pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        with self.fs.lock:
            return self._write(data)

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        self._check_open()
        if not self.writable_:
            raise FsError(reason="file not open for writing", path=self.name, errno=_errno.EBADF)
        if self.append:
            self.pos = self.fs.file_size(self.ino, self.name)
        n = self.fs.pwrite(self.ino, self.pos, data, self.name)
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        self._check_open()
        if whence == 0:
            pos = offset
        elif whence == 1:
            pos = self.pos + offset
        elif whence == 2:
            pos = self.fs.file_size(self.ino, self.name) + offset
        else:
            raise FsError(reason=f"bad whence {whence}", errno=_errno.EINVAL)
        if pos < 0:
            raise FsError(reason="negative seek position", errno=_errno.EINVAL)
        self.pos = pos
        return pos

    def tell(self) -> int:
        return self.pos

    def truncate(self, size: int | None = None) -> int:
        with self.fs.lock:
            return self._truncate(size)

    def _truncate(self, size: int | None) -> int:
        self._check_open()
        if not self.writable_:
            raise FsError(reason="file not open for writing", path=self.name, errno=_errno.EBADF)
        size = self.pos if size is None else size
        self.fs.ftruncate(self.ino, size, self.name)
        return size

    def flush(self) -> None:
        """Nothing is buffered in the file object; use ``Filesystem.flush`` to make changes durable."""

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
