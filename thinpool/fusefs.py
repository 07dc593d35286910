"""FUSE export of block devices (mfusepy on libfuse3): each device is a regular file ``<name>`` in the mount.

Layer: clients. May import: thinpool.errors, thinpool.io.

File operations map onto the device:

* ``read`` / ``write`` -> ``device.read`` / ``device.write`` (the file has the device's fixed size; writes past
  the end are short or fail with ENOSPC; like a block device, O_TRUNC and truncate(0) are ignored, so
  ``cp``/``dd`` onto the file work, and truncation to any other size fails with EINVAL);
* ``fsync`` / ``fdatasync`` -> ``device.flush()`` (for a thin device: the pool commit);
* ``fallocate(PUNCH_HOLE|KEEP_SIZE)`` -> ``device.discard`` (loop devices turn discard/fstrim into exactly
  this), ``fallocate(ZERO_RANGE)`` -> ``device.write_zeroes``, plain preallocation inside the file is a no-op;
* ``st_blocks`` reports the device's mapped bytes, so ``du`` shows thin allocation;
* unmount (``umount``/``fusermount3 -u``, or SIGINT/SIGTERM to the daemon) flushes every device and then calls
  ``on_unmount``;
* a failed ``fsync`` (a failed commit) fails the export as dm-thin fails a pool (metadata_operation_failed):
  every later read, write, discard and fsync returns EIO (ENOSPC when the host disk was full), nothing is
  committed at unmount, and ``failed`` holds the reason; acknowledged data can therefore never read back changed;
* ``lseek(SEEK_DATA/SEEK_HOLE)`` reports the device's mapped ranges, so ``cp --sparse`` and ``qemu-img map``
  see the holes.

The daemon runs single-threaded (``-s``; per the measurements it is also the fastest mode for Python) and every
device call is made under one lock, so the devices need not be thread-safe.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from thinpool.errors import NoSpace, OutOfBounds, ReadOnly, ThinpoolError
from thinpool.io.device import BlockDevice

log = logging.getLogger("thinpool.fuse")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
MAX_WRITE = 1024 * 1024


def _load_mfusepy() -> Any:
    # mfusepy picks libfuse2 when both are installed; this module is written for libfuse3.
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    import mfusepy

    return mfusepy


def _device_errno(e: BaseException) -> int:
    if isinstance(e, NoSpace):
        return errno.ENOSPC
    if isinstance(e, OutOfBounds):
        return errno.EINVAL
    if isinstance(e, ReadOnly):
        return errno.EROFS
    if isinstance(e, OSError) and e.errno:
        return e.errno
    return errno.EIO


def make_operations(exports: Mapping[str, BlockDevice], *, on_unmount: Callable[[], Any] | None = None,
                    lock: threading.Lock | None = None, direct_io: bool = True) -> Any:
    """Build the mfusepy Operations object for ``exports`` (separate from :func:`mount` for testing)."""
    mfusepy = _load_mfusepy()
    FuseOSError = mfusepy.FuseOSError

    class DeviceFS(mfusepy.Operations):  # type: ignore[misc,name-defined]  # mfusepy is untyped
        use_ns = True

        def __init__(self) -> None:
            for name in exports:
                if not name or "/" in name or name in (".", ".."):
                    raise ValueError(f"export name {name!r} cannot be a file name")
            self.devices = dict(exports)
            self.names = list(self.devices)
            self.device_lock = lock if lock is not None else threading.Lock()
            self.on_unmount = on_unmount
            self.mounted_ns = time.time_ns()
            self.uid, self.gid = os.getuid(), os.getgid()
            self.unmounted = False
            self.failed: str | None = None

        # --- helpers ----------------------------------------------------------------------------------------
        def _dev(self, path: str) -> BlockDevice:
            dev = self.devices.get(path.lstrip("/"))
            if dev is None or path.count("/") != 1:
                raise FuseOSError(errno.ENOENT)
            return dev

        def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
            if self.failed is not None:
                raise FuseOSError(errno.EIO)
            try:
                with self.device_lock:
                    return fn(*args)
            except FuseOSError:
                raise
            except (ThinpoolError, OSError) as e:
                log.warning("fuse: %s failed: %s", getattr(fn, "__name__", fn), e)
                raise FuseOSError(_device_errno(e)) from e
            except Exception as e:
                log.exception("fuse: %s raised", getattr(fn, "__name__", fn))
                raise FuseOSError(errno.EIO) from e

        # --- libfuse callbacks ------------------------------------------------------------------------------
        def init_with_config(self, conn: Any, config: Any) -> None:
            if conn is not None:
                conn.max_write = MAX_WRITE
            if config is not None:
                if direct_io and hasattr(config, "direct_io"):
                    config.direct_io = 1
                for attr in ("attr_timeout", "entry_timeout"):
                    if hasattr(config, attr):
                        setattr(config, attr, 0.0)  # st_size/st_blocks change behind the kernel's back

        def destroy(self, path: str) -> None:
            if self.unmounted:
                return
            self.unmounted = True
            if self.failed is not None:
                log.error("fuse: not committing at unmount: %s", self.failed)
                return
            with self.device_lock:
                try:
                    for dev in self.devices.values():
                        dev.flush()
                finally:
                    if self.on_unmount is not None:
                        self.on_unmount()

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            t = self.mounted_ns
            base = {"st_uid": self.uid, "st_gid": self.gid, "st_atime": t, "st_mtime": t, "st_ctime": t}
            if path == "/":
                return {**base, "st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_size": 0}
            dev = self._dev(path)
            mapped = sum(n for _o, n in self._call(dev.mapped_ranges))
            mode = 0o444 if getattr(dev, "readonly", False) else 0o644
            return {**base, "st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": dev.size,
                    "st_blocks": (mapped + 511) // 512, "st_blksize": 4096}

        def readdir(self, path: str, fh: int) -> list[str]:
            if path != "/":
                raise FuseOSError(errno.ENOTDIR)
            return [".", "..", *self.names]

        def access(self, path: str, amode: int) -> int:
            if path != "/":
                self._dev(path)
            return 0

        def open(self, path: str, flags: int) -> int:
            dev = self._dev(path)
            if getattr(dev, "readonly", False) and flags & (os.O_WRONLY | os.O_RDWR):
                raise FuseOSError(errno.EROFS)
            return self.names.index(path[1:])

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            dev = self._dev(path)
            end = min(offset + size, dev.size)
            if offset >= end:
                return b""
            data: bytes = self._call(dev.read, offset, end - offset)
            return data

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            dev = self._dev(path)
            if offset >= dev.size:
                raise FuseOSError(errno.ENOSPC)
            if offset + len(data) > dev.size:
                data = data[:dev.size - offset]  # short write up to the end of the device
            self._call(dev.write, offset, data)
            return len(data)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            dev = self._dev(path)
            if length not in (0, dev.size):
                raise FuseOSError(errno.EINVAL)  # a block device cannot change size
            return 0  # O_TRUNC / truncate(0) is ignored, as opening a block device with O_TRUNC is

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            dev = self._dev(path)
            try:
                self._call(dev.flush)
            except FuseOSError as e:
                if self.failed is None:
                    self.failed = f"fsync of {path[1:]} failed: {e.__cause__ or e}"
                    log.error("fuse: %s; refusing all I/O until the pool is checked", self.failed)
                raise
            return 0

        def lseek(self, path: str, offset: int, whence: int, fh: int) -> int:
            dev = self._dev(path)
            if whence not in (SEEK_DATA, SEEK_HOLE):
                raise FuseOSError(errno.EINVAL)  # SEEK_SET/CUR/END never reach a FUSE filesystem
            if offset < 0 or offset >= dev.size:
                raise FuseOSError(errno.ENXIO)
            ranges: list[tuple[int, int]] = self._call(dev.mapped_ranges, offset, dev.size - offset)
            for start, n in ranges:
                if start + n <= offset:
                    continue
                if whence == SEEK_DATA:
                    return max(start, offset)
                if start > offset:
                    return offset  # a hole at offset
                offset = start + n  # inside data: the hole starts where this range ends (ranges may touch)
            if whence == SEEK_DATA:
                raise FuseOSError(errno.ENXIO)
            return min(offset, dev.size)

        def flush(self, path: str, fh: int) -> int:
            return 0  # close(): durability is fsync's job

        def release(self, path: str, fh: int) -> int:
            return 0

        def fallocate(self, path: str, mode: int, offset: int, length: int, fh: int) -> int:
            dev = self._dev(path)
            if offset < 0 or length <= 0:
                raise FuseOSError(errno.EINVAL)
            end = min(offset + length, dev.size)
            if mode & FALLOC_FL_PUNCH_HOLE:
                if not mode & FALLOC_FL_KEEP_SIZE or mode & ~(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE):
                    raise FuseOSError(errno.EOPNOTSUPP)
                if offset < end:
                    self._call(dev.discard, offset, end - offset)
                return 0
            if mode & FALLOC_FL_ZERO_RANGE:
                if mode & ~(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
                    raise FuseOSError(errno.EOPNOTSUPP)
                if offset + length > dev.size and not mode & FALLOC_FL_KEEP_SIZE:
                    raise FuseOSError(errno.EFBIG)
                if offset < end:
                    self._call(dev.write_zeroes, offset, end - offset)
                return 0
            if mode & ~FALLOC_FL_KEEP_SIZE:
                raise FuseOSError(errno.EOPNOTSUPP)
            if offset + length > dev.size and not mode & FALLOC_FL_KEEP_SIZE:
                raise FuseOSError(errno.EFBIG)
            return 0  # preallocation: a thin device allocates on write

        def statfs(self, path: str) -> dict[str, int]:
            total = sum(d.size for d in self.devices.values()) // 4096
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": total, "f_bfree": 0, "f_bavail": 0,
                    "f_files": len(self.devices), "f_ffree": 0, "f_namemax": 255}

        def utimens(self, path: str, times: Any = None) -> int:
            return 0

        def chmod(self, path: str, mode: int) -> int:
            raise FuseOSError(errno.EPERM)

        def chown(self, path: str, uid: int, gid: int) -> int:
            raise FuseOSError(errno.EPERM)

    return DeviceFS()


def mount(exports: Mapping[str, BlockDevice], mountpoint: str | os.PathLike[str], *, foreground: bool = True,
          on_unmount: Callable[[], Any] | None = None, lock: threading.Lock | None = None, direct_io: bool = True,
          allow_other: bool = False, fsname: str = "thinpool", state: dict[str, Any] | None = None,
          setup: Callable[[Any], Any] | None = None) -> None:
    """Mount ``exports`` at ``mountpoint`` and serve until unmounted (blocks when ``foreground``).

    Must run in the main thread of its process (libfuse installs SIGINT/SIGTERM/SIGHUP handlers that unmount).
    On unmount every device is flushed and then ``on_unmount`` is called (not after a failed fsync: then
    ``state["failed"]`` says why). ``setup(ops)`` runs before the mount (the control channel).
    """
    mfusepy = _load_mfusepy()
    ops = make_operations(exports, on_unmount=on_unmount, lock=lock, direct_io=direct_io)
    kwargs: dict[str, Any] = {"foreground": foreground, "nothreads": True, "fsname": fsname,
                              "subtype": "thinpool"}
    if allow_other:
        kwargs["allow_other"] = True
    if setup is not None:
        setup(ops)  # e.g. the control channel, which needs the operations object
    try:
        _fuse_class(mfusepy)(ops, os.fspath(mountpoint), **kwargs)
    finally:
        if state is not None:
            state["failed"] = ops.failed


def _fuse_class(mfusepy: Any) -> Any:
    """mfusepy's FUSE with the one callback wrapper it lacks: lseek (SEEK_DATA/SEEK_HOLE, libfuse >= 3.8)."""

    class FUSE(mfusepy.FUSE):  # type: ignore[misc]
        def lseek(self, path: bytes | None, off: int, whence: int, fip: Any) -> int:
            fh = fip.contents if self.raw_fi else fip.contents.fh
            name = None if path is None else path.decode(self.encoding, self.errors)
            return int(self.operations.lseek(name, off, whence, fh))

    return FUSE
