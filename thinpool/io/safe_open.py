"""Opening the files of a pool directory safely: never through a symlink, never blocking, regular files only.

Layer: io. May import: thinpool.errors.

A pool directory may be writable by others (or planted): ``metadata``, ``data`` and ``pool.json`` are opened with
O_NOFOLLOW (a symlink is refused, so a write can never land in another file) and O_NONBLOCK (a FIFO cannot hang the
opener), then checked with fstat to be regular files.
"""

from __future__ import annotations

import errno
import os
import stat

from thinpool.errors import UnsafePoolFile


def open_pool_file(path: str | os.PathLike[str], flags: int, *, what: str | None = None) -> int:
    """Open a file inside a pool directory: never through a symlink (O_NOFOLLOW), never blocking on a FIFO
    (O_NONBLOCK, cleared again after the check), and only a regular file. Raises UnsafePoolFile, or
    FileNotFoundError for a missing file (the caller decides what absence means)."""
    p = os.fspath(path)
    try:
        fd = os.open(p, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP: the last component is a symlink; ENXIO: a FIFO without a writer
        if e.errno == errno.ELOOP:
            raise UnsafePoolFile(path=p, reason="it is a symbolic link (pool files are never followed)") from None
        if e.errno in (errno.ENXIO, errno.EISDIR):
            raise UnsafePoolFile(path=p, reason="it is not a regular file") from None
        raise UnsafePoolFile(path=p, reason=e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePoolFile(path=p, reason="it is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: str | os.PathLike[str], flags: int, *, what: str) -> int:
    """Open a user-named file that must be regular (an external origin, an image): symlinks are followed (the user
    named it), but a FIFO or device is refused without blocking. Raises UnsafePoolFile / FileNotFoundError."""
    p = os.fspath(path)
    fd = os.open(p, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePoolFile(path=p, reason=f"{what} must be a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
