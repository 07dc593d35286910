"""The pool's data device: a sparse file addressed in data blocks (chunks), with hole punching.

Layer: io. May import: thinpool.errors.

pread/pwrite, not mmap: a full host disk must stay a clean error (ENOSPC from pwrite), where a store through mmap
would turn it into SIGBUS. Counts every byte written so benchmarks can report write amplification.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from thinpool.errors import NoDataSpace, StoreIOError

_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate [offset, offset+length) of a file (reads return zeros). False where unsupported."""
    r = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    return r == 0


class DataStore:
    def __init__(self, path: str, chunk_bytes: int, *, readonly: bool = False) -> None:
        self.path = path
        self.chunk_bytes = chunk_bytes
        try:
            self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as e:
            raise StoreIOError(what=path, op="open", reason=e.strerror or str(e)) from e
        self.bytes_written = 0
        self.bytes_read = 0
        self.punched = 0

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            raise StoreIOError(what=self.path, op="read", reason=e.strerror or str(e)) from e
        self.bytes_read += length
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        try:
            n = os.pwrite(self.fd, data, offset)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise NoDataSpace(f"host filesystem full while writing {self.path}") from e
            raise StoreIOError(what=self.path, op="write", reason=e.strerror or str(e)) from e
        if n != len(data):
            raise StoreIOError(what=self.path, op="write", reason="short write")
        self.bytes_written += n

    def punch(self, offset: int, length: int) -> None:
        if punch_hole(self.fd, offset, length):
            self.punched += length
        else:
            self.pwrite(offset, bytes(length))

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise StoreIOError(what=self.path, op="fdatasync", reason=e.strerror or str(e)) from e

    def resize(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise StoreIOError(what=self.path, op="resize", reason=e.strerror or str(e)) from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
