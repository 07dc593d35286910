"""The byte-addressed device interface every consumer (filesystem, NBD, FUSE, CLI) programs against.

Layer: io. May import: thinpool.errors.

A device is ``size`` bytes long; ``read``/``write`` take any byte offset and length inside it. ``discard`` and
``write_zeroes`` are optional-feeling but always present (a plain device implements discard as a no-op that is
allowed to leave data, like a disk without TRIM). ``mapped_ranges`` reports allocation (for sparse copies and
NBD block status): a list of (offset, length) byte ranges that hold data; devices that cannot tell report the
whole device.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Protocol, runtime_checkable

from thinpool.errors import OutOfBounds, StoreIOError


@runtime_checkable
class BlockDevice(Protocol):
    """A byte-addressed block device."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``. ``data`` is valid during the call only: servers pass views of their
        receive buffers, which they reuse once the call returns, so a device that keeps the bytes (a cache, a
        queue, ``np.frombuffer``) must copy them first."""
        ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def mapped_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]: ...


def check_bounds(size: int, offset: int, length: int) -> None:
    """Raise OutOfBounds unless [offset, offset+length) lies inside a device of ``size`` bytes."""
    if offset < 0 or length < 0 or offset + length > size:
        raise OutOfBounds(offset=offset, length=length, size=size)


_SMALL_ZEROS = bytes(4096)


def zero_fill(view: memoryview) -> None:
    """Set a writable byte buffer to zeros in place (one memset; no temporary zero buffer for large ones)."""
    n = len(view)
    if n <= len(_SMALL_ZEROS):
        view[:] = _SMALL_ZEROS[:n]
        return
    import ctypes  # here, not at import: start-up time

    c = (ctypes.c_char * n).from_buffer(view)
    try:
        ctypes.memset(c, 0, n)
    finally:
        del c


_bytes_api: tuple[Any, Any, Any] | None = None


def new_bytes(n: int) -> tuple[bytes, memoryview] | None:
    """A new ``bytes`` of ``n`` bytes, not yet filled, and a writable view of its buffer: the C API's idiom
    ``PyBytes_FromStringAndSize(NULL, n)`` then fill, so a read gathered from several places becomes a bytes
    object with no copy. The caller fills the whole view, releases it, and only then hands the bytes out (nothing
    else may see the object before). None where the C API is not reachable (not CPython).
    """
    global _bytes_api
    if _bytes_api is None:
        import ctypes  # here, not at import: start-up time
        import sys

        if sys.implementation.name != "cpython":
            return None
        api = ctypes.pythonapi
        make = api.PyBytes_FromStringAndSize
        make.restype, make.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
        addr = api.PyBytes_AsString
        addr.restype, addr.argtypes = ctypes.c_void_p, (ctypes.py_object,)
        view = api.PyMemoryView_FromMemory
        view.restype, view.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
        _bytes_api = (make, addr, view)
    make, addr, view = _bytes_api
    out: bytes = make(None, n)
    return out, view(addr(out), n, 0x200)  # 0x200: PyBUF_WRITE


class MemoryDevice:
    """A device held in a bytearray (tests, development of the filesystem and servers)."""

    def __init__(self, size: int) -> None:
        self._buf = bytearray(size)
        self._lock = threading.Lock()
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self._buf)

    def read(self, offset: int, length: int) -> bytes:
        check_bounds(self.size, offset, length)
        return bytes(self._buf[offset:offset + length])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        check_bounds(self.size, offset, len(data))
        with self._lock:
            self._buf[offset:offset + len(data)] = data

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        check_bounds(self.size, offset, length)
        with self._lock:
            self._buf[offset:offset + length] = bytes(length)

    def flush(self) -> None:
        self.flushes += 1

    def mapped_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        if length is None:
            length = self.size - offset
        return [(offset, length)] if length else []

    def getvalue(self) -> bytes:
        return bytes(self._buf)


class FileDevice:
    """A device on a regular file (an image), through pread/pwrite."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as e:
            raise StoreIOError(what=self.path, op="open", reason=e.strerror) from e
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        check_bounds(self._size, offset, length)
        data = os.pread(self._fd, length, offset)
        return data + bytes(length - len(data))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        check_bounds(self._size, offset, len(data))
        try:
            os.pwrite(self._fd, data, offset)
        except OSError as e:
            raise StoreIOError(what=self.path, op="write", reason=e.strerror) from e

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def flush(self) -> None:
        os.fsync(self._fd)

    def mapped_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        if length is None:
            length = self._size - offset
        return [(offset, length)] if length else []

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
