"""Copy between the host's files and the ext2 file system: trees, sparse files, special files, safe replacement.

Layer: fs. May import: thinpool.errors, thinpool.fs.* (and the host's ``os``).

- **Sparse both ways.** A host file is read extent by extent (``SEEK_DATA``/``SEEK_HOLE``), so its holes stay
  unallocated in ext2; a file copied out is written only where ext2 has blocks (:meth:`Filesystem.data_ranges`)
  and truncated to its size, so its holes stay holes on the host.
- **Replacement keeps the old file until the new one is complete.** An existing file, symlink or special file is
  replaced by writing the new one under a temporary name in the same directory and renaming it over the old name.
  A failure (no space in the file system or in the pool) leaves the old entry as it was; the allocator does not
  reuse a replaced file's blocks before the next commit, so even an aborted command finds the old data intact.
- **Special files are made, never opened**: FIFOs, sockets, character and block devices go through ``mknod``.
- Hard links inside a copied tree stay hard links. Modes and times (second precision) are copied; with
  ``archive`` (as ``cp -a``) also owner, group and extended attributes (of symlinks too, without following them).
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import os
import secrets
import stat as statmod
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any

from thinpool.errors import FileNotFound, FsError, FsNoSpace, IsADirectory, LocalFileError, NotADirectory

if TYPE_CHECKING:
    from thinpool.fs.filesystem import Filesystem
    from thinpool.fs.records import Stat

IO_CHUNK = 1 << 20  # bytes per read/write call


@dataclasses.dataclass(slots=True)
class CopyStats:
    """What a copy did: entries made (files, links, special files; not directories) and bytes of file data."""

    nr_entries: int = 0
    nr_bytes: int = 0


def _local_error(path: str, e: OSError) -> LocalFileError:
    return LocalFileError(path=path, reason=e.strerror or str(e), errno=e.errno)


def _join(parent: str, name: str) -> str:
    return parent.rstrip("/") + "/" + name


def _split(path: str) -> tuple[str, str]:
    head, _, tail = path.rstrip("/").rpartition("/")
    return head or "/", tail


def _temp_name(fs: Filesystem, path: str) -> str:
    parent, _ = _split(path)
    while True:
        tmp = _join(parent, f".thinpool-put.{secrets.token_hex(6)}")
        if not fs.exists(tmp):
            return tmp


# --- into the file system -------------------------------------------------------------------------------------
def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each data extent of an open host file, by SEEK_DATA/SEEK_HOLE.

    A host file system without SEEK_DATA support (EINVAL) yields the whole file as data, never nothing.
    """
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == _errno.ENXIO:  # no data past pos: the rest is a hole
                return
            if e.errno in (_errno.EINVAL, _errno.EOPNOTSUPP):
                yield pos, size - pos
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            yield start, end - start
        pos = end


def _write_extents(fs: Filesystem, inp: IO[bytes], dst: str, size: int) -> int:
    """Write the data extents of open host file ``inp`` into the new ext2 file ``dst``; returns bytes written."""
    with fs.open(dst, "xb") as out:
        return _copy_extents(inp, out, data_extents(inp.fileno(), size), size)


def _copy_extents(inp: Any, out: Any, extents: Iterable[tuple[int, int]], size: int) -> int:
    """Copy the (start, length) data extents from ``inp`` to the same offsets of ``out`` (host files or ext2 Files,
    either way), leave the rest a hole
    (a trailing one too: ``out`` ends at ``size``); returns the bytes copied."""
    total = 0
    for start, length in extents:
        inp.seek(start)
        out.seek(start)
        left = length
        while left:
            chunk = inp.read(min(IO_CHUNK, left))
            if not chunk:
                break
            out.write(chunk)
            left -= len(chunk)
            total += len(chunk)
    out.truncate(size)
    return total


def _install(fs: Filesystem, dst: str, make: object) -> None:
    """Create ``dst`` by calling ``make(path)``: directly when the name is free, else under a temporary name that
    is then renamed over the old entry (which stays intact if ``make`` fails)."""
    assert callable(make)
    try:
        old = fs.lstat(dst)
    except FileNotFound:
        make(dst)
        return
    if old.is_dir:
        raise IsADirectory(path=dst, reason=f"cannot replace directory {dst} with a non-directory")
    tmp = _temp_name(fs, dst)
    try:
        make(tmp)
    except BaseException:
        if fs.exists(tmp):
            fs.unlink(tmp)
        raise
    fs.rename(tmp, dst)
    if fs.exists(tmp):  # both names were already links of one inode: rename(2) leaves both in place
        fs.unlink(tmp)


def _host_xattrs(path: str) -> dict[str, bytes]:
    """The extended attributes of a host path (not following a symlink); none where the host has no xattrs."""
    try:
        return {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)}
    except OSError as e:
        if e.errno in (_errno.ENOTSUP, _errno.EOPNOTSUPP):
            return {}
        raise _local_error(path, e) from e


def _copy_attrs(fs: Filesystem, src: str, dst: str, st: os.stat_result, archive: bool) -> None:
    link = statmod.S_ISLNK(st.st_mode)
    if archive:
        fs.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
        for name, value in _host_xattrs(src).items():
            fs.setxattr(dst, name, value, follow_symlinks=False)
    if not link:
        fs.chmod(dst, statmod.S_IMODE(st.st_mode))
    fs.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def put_stream(fs: Filesystem, inp: IO[bytes], dst: str) -> int:
    """Copy a stream (stdin) to ``dst`` (created, or replacing a file); returns the bytes copied."""
    total = 0

    def make(path: str) -> None:
        nonlocal total
        with fs.open(path, "xb") as out:
            while chunk := inp.read(IO_CHUNK):
                out.write(chunk)
                total += len(chunk)

    _install(fs, dst, make)
    return total


def put(fs: Filesystem, src: str, dst: str, *, archive: bool = False) -> CopyStats:
    """Copy host path ``src`` (a file, directory tree, symlink or special file) to ``dst`` in the file system.

    An existing directory at ``dst`` is merged into (as ``cp -r``); other existing entries are replaced as
    described in the module docstring.

    Raises:
        LocalFileError: ``src`` cannot be read. NotADirectory / IsADirectory: a directory and a non-directory
        meet. FsNoSpace and the other Fs errors of the operations used.
    """
    stats = CopyStats()
    links: dict[tuple[int, int], str] = {}
    try:
        st = os.lstat(src)
    except OSError as e:
        raise _local_error(src, e) from e
    if statmod.S_ISDIR(st.st_mode):
        _put_dir(fs, src, dst, st, stats, links, archive)
    else:
        _put_entry(fs, src, dst, st, stats, links, archive)
    return stats


def _put_dir(fs: Filesystem, src: str, dst: str, st: os.stat_result, stats: CopyStats,
             links: dict[tuple[int, int], str], archive: bool) -> None:
    try:
        existing = fs.lstat(dst)
    except FileNotFound:
        fs.mkdir(dst, statmod.S_IMODE(st.st_mode))
    else:
        if not existing.is_dir:
            raise NotADirectory(path=dst, reason=f"cannot replace non-directory {dst} with a directory")
    try:
        with os.scandir(src) as it:
            names = sorted(e.name for e in it)
    except OSError as e:
        raise _local_error(src, e) from e
    for name in names:
        local = os.path.join(src, name)
        try:
            cst = os.lstat(local)
        except OSError as e:
            raise _local_error(local, e) from e
        target = _join(dst, name)
        if statmod.S_ISDIR(cst.st_mode):
            _put_dir(fs, local, target, cst, stats, links, archive)
        else:
            _put_entry(fs, local, target, cst, stats, links, archive)
    _copy_attrs(fs, src, dst, st, archive)  # after the children, so their creation does not change the mtime


def _put_entry(fs: Filesystem, src: str, dst: str, st: os.stat_result, stats: CopyStats,
               links: dict[tuple[int, int], str], archive: bool) -> None:
    mode = st.st_mode
    key = (st.st_dev, st.st_ino)
    if st.st_nlink > 1 and key in links:
        _install(fs, dst, lambda p: fs.link(links[key], p))
        stats.nr_entries += 1
        return
    try:
        if statmod.S_ISREG(mode):
            with open(src, "rb") as inp:
                def make(path: str) -> None:
                    stats.nr_bytes += _write_extents(fs, inp, path, st.st_size)
                _install(fs, dst, make)
        elif statmod.S_ISLNK(mode):
            target = os.readlink(src)
            _install(fs, dst, lambda p: fs.symlink(target, p))
        elif statmod.S_ISFIFO(mode) or statmod.S_ISSOCK(mode) or statmod.S_ISCHR(mode) or statmod.S_ISBLK(mode):
            _install(fs, dst, lambda p: fs.mknod(p, mode, st.st_rdev))
        else:
            raise FsError(reason=f"{src}: unknown file type {statmod.S_IFMT(mode):#o}", path=src,
                          errno=_errno.EINVAL)
    except FsNoSpace as e:
        raise FsNoSpace(reason=f"{dst}: {getattr(e, 'reason', e)}", path=dst) from e
    except OSError as e:
        if isinstance(e, LocalFileError | FsError):
            raise
        raise _local_error(src, e) from e
    _copy_attrs(fs, src, dst, st, archive)
    if st.st_nlink > 1:
        links[key] = dst
    stats.nr_entries += 1


# --- out of the file system -----------------------------------------------------------------------------------
def get_stream(fs: Filesystem, src: str, out: IO[bytes]) -> int:
    """Write the contents of regular file ``src`` to a stream (stdout); returns the bytes written."""
    total = 0
    with fs.open(src, "rb") as inp:
        while chunk := inp.read(IO_CHUNK):
            out.write(chunk)
            total += len(chunk)
    return total


def get(fs: Filesystem, src: str, dst: str, *, archive: bool = False) -> CopyStats:
    """Copy ``src`` (a file, directory tree, symlink or special file) out of the file system to host path ``dst``.

    Files are written sparse; an existing host file or symlink at ``dst`` is replaced, an existing directory is
    merged into.

    Raises:
        LocalFileError: the host refused (e.g. a device node without root). Fs errors of the reads.
    """
    stats = CopyStats()
    _get_any(fs, src, dst, stats, archive)
    return stats


def _set_host_attrs(fs: Filesystem, src: str, dst: str, st: Stat, archive: bool) -> None:
    if archive:
        os.chown(dst, st.uid, st.gid, follow_symlinks=False)
        for name in fs.listxattr(src):
            os.setxattr(dst, name, fs.getxattr(src, name), follow_symlinks=False)
    if not st.is_symlink:
        os.chmod(dst, statmod.S_IMODE(st.mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _get_any(fs: Filesystem, src: str, dst: str, stats: CopyStats, archive: bool) -> None:
    st = fs.lstat(src)
    try:
        if st.is_dir:
            os.makedirs(dst, exist_ok=True)
            for e in sorted(fs.scandir(src), key=lambda e: e.name):
                _get_any(fs, _join(src, e.name), os.path.join(dst, e.name), stats, archive)
            _set_host_attrs(fs, src, dst, st, archive)
            return
        if os.path.lexists(dst) and not os.path.isdir(dst) or os.path.islink(dst):
            os.unlink(dst)
        if st.is_symlink:
            os.symlink(fs.readlink(src), dst)
        elif st.is_file:
            stats.nr_bytes += _get_file(fs, src, dst, st.size)
        elif statmod.S_ISFIFO(st.mode):
            os.mkfifo(dst, statmod.S_IMODE(st.mode))
        else:
            os.mknod(dst, st.mode, st.rdev)
        _set_host_attrs(fs, src, dst, st, archive)
    except OSError as e:
        if isinstance(e, LocalFileError | FsError):
            raise
        raise _local_error(dst, e) from e
    stats.nr_entries += 1


def _get_file(fs: Filesystem, src: str, dst: str, size: int) -> int:
    with fs.open(src, "rb") as inp, open(dst, "wb") as out:
        return _copy_extents(inp, out, fs.data_ranges(src), size)
