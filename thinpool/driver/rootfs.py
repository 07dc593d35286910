"""Paths inside a device's ``/rootfs`` as a chroot sees them, recursive removal, and tar entries of files.

Layer: driver. May import: thinpool.errors, thinpool.fs.

moby applies layers and copies files inside a chroot at the layer's root (``pkg/chrootarchive``), so an absolute
symlink inside an image (``/lib -> /usr/lib``) resolves inside the rootfs. :func:`resolve` does the same on the
ext2: every component but the last is followed (symlinks restart from ``root`` when absolute), ``..`` stops at
``root``.
"""

from __future__ import annotations

import errno as _errno
import logging
import posixpath
import stat as S
import tarfile
from collections.abc import Iterator
from typing import Any

from thinpool.errors import FileNotFound, FsError, NotADirectory
from thinpool.fs.filesystem import Filesystem
from thinpool.fs.records import Stat

log = logging.getLogger(__name__)

ROOTFS = "/rootfs"
MAX_SYMLINK_HOPS = 40
XATTR_PAX_PREFIX = "SCHILY.xattr."


def clean(name: str) -> str:
    """Go's ``filepath.Clean`` of a relative tar name: ``"./a/b/" -> "a/b"``, the root is ``"."``."""
    c = posixpath.normpath(name) if name else "."
    while c.startswith("/"):
        c = c[1:] or "."
    return c


def join(root: str, rel: str) -> str:
    rel = clean(rel)
    return root if rel == "." else root.rstrip("/") + "/" + rel


def lstat(fs: Filesystem, path: str) -> Stat | None:
    try:
        return fs.lstat(path)
    except (FileNotFound, NotADirectory):
        return None


def resolve(fs: Filesystem, root: str, rel: str, *, follow_last: bool = False) -> str:
    """The ext2 path of ``rel`` (relative to ``root``, the chroot) with every symlink on the way resolved inside
    ``root``; the last component is followed only with ``follow_last``. Missing components are kept as named.

    Raises:
        FsError: more than 40 symlinks (ELOOP).
    """
    stack = [p for p in reversed(clean(rel).split("/")) if p not in ("", ".")]
    parts: list[str] = []
    hops = 0
    while stack:
        c = stack.pop()
        if c == "..":
            if parts:
                parts.pop()
            continue
        cand = root.rstrip("/") + "/" + "/".join(parts + [c])
        if not stack and not follow_last:
            parts.append(c)
            break
        st = lstat(fs, cand)
        if st is None:
            parts.append(c)
            parts.extend(reversed([p for p in stack if p not in ("", ".")]))
            break
        if S.S_ISLNK(st.mode):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise FsError(reason=f"too many levels of symbolic links: {rel}", path=rel, errno=_errno.ELOOP)
            target = fs.readlink(cand)
            if target.startswith("/"):
                parts = []
            stack.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
            continue
        parts.append(c)
    return root if not parts else root.rstrip("/") + "/" + "/".join(parts)


def remove_all(fs: Filesystem, path: str) -> None:
    """Go's ``os.RemoveAll``: remove ``path`` (not following a final symlink) and everything below; a missing
    path is not an error."""
    st = lstat(fs, path)
    if st is None:
        return
    if S.S_ISDIR(st.mode):
        for e in fs.scandir(path):
            remove_all(fs, path.rstrip("/") + "/" + e.name)
        fs.rmdir(path)
    else:
        fs.unlink(path)


def walk(fs: Filesystem, top: str) -> Iterator[tuple[str, Stat]]:
    """Every entry below ``top`` (not ``top`` itself) in lexical preorder, as Go's ``filepath.Walk``: (path, lstat)."""
    for name in sorted(e.name for e in fs.scandir(top)):
        p = top.rstrip("/") + "/" + name
        st = fs.lstat(p)
        yield p, st
        if S.S_ISDIR(st.mode):
            yield from walk(fs, p)


def xattrs(fs: Filesystem, path: str) -> dict[str, bytes]:
    return {n: fs.getxattr(path, n) for n in sorted(fs.listxattr(path))}


def tar_info(fs: Filesystem, path: str, name: str, st: Stat, seen: dict[int, str] | None) -> TarEntry:
    """The tar header of one file as moby's ``addTarFile`` makes it: directories end in ``/``, a second name of
    an inode with several links becomes a hard link to the first name seen, xattrs as PAX ``SCHILY.xattr.*``."""
    ti = tarfile.TarInfo(name + "/" if S.S_ISDIR(st.mode) and not name.endswith("/") else name)
    ti.mode = S.S_IMODE(st.mode)
    ti.uid, ti.gid = st.uid, st.gid
    ti.mtime = st.mtime
    ti.uname = ti.gname = ""
    fmt = S.S_IFMT(st.mode)
    data = False
    if fmt == S.S_IFDIR:
        ti.type = tarfile.DIRTYPE
    elif fmt == S.S_IFLNK:
        ti.type = tarfile.SYMTYPE
        ti.linkname = fs.readlink(path)
    elif fmt == S.S_IFCHR or fmt == S.S_IFBLK:
        ti.type = tarfile.CHRTYPE if fmt == S.S_IFCHR else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = _major(st.rdev), _minor(st.rdev)
    elif fmt == S.S_IFIFO:
        ti.type = tarfile.FIFOTYPE
    elif fmt == S.S_IFREG:
        ti.type = tarfile.REGTYPE
        ti.size = st.size
        data = True
    else:
        return TarEntry(ti, None, skip=True)  # a socket: moby's addTarFile skips it (tar cannot hold one)
    if fmt != S.S_IFDIR and st.nlink > 1 and seen is not None:
        first = seen.get(st.ino)
        if first is not None:
            ti.type = tarfile.LNKTYPE
            ti.linkname = first
            ti.size = 0
            data = False
        else:
            seen[st.ino] = name
    pax = {XATTR_PAX_PREFIX + k: v.decode("utf-8", "surrogateescape") for k, v in xattrs(fs, path).items()}
    if pax:
        ti.pax_headers = pax
    return TarEntry(ti, path if data else None)


class TarEntry:
    """A header and, for a regular file with content, the ext2 path to read it from."""

    __slots__ = ("info", "data_path", "skip")

    def __init__(self, info: tarfile.TarInfo, data_path: str | None, *, skip: bool = False) -> None:
        self.info = info
        self.data_path = data_path
        self.skip = skip

    def write(self, fs: Filesystem, tw: tarfile.TarFile) -> None:
        if self.skip:
            log.warning("archive: skipping %s since it is a socket", self.info.name)
            return
        if self.data_path is None or self.info.size == 0:
            tw.addfile(self.info)
            return
        with fs.open(self.data_path, "rb") as f:
            tw.addfile(self.info, _Exact(f, self.info.size))


class _Exact:
    """A reader that yields exactly ``size`` bytes of ``f``."""

    def __init__(self, f: Any, size: int) -> None:
        self.f = f
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        b: bytes = self.f.read(n)
        self.left -= len(b)
        return b


def _major(rdev: int) -> int:
    return ((rdev >> 8) & 0xFFF) | ((rdev >> 32) & ~0xFFF)


def _minor(rdev: int) -> int:
    return (rdev & 0xFF) | ((rdev >> 12) & ~0xFF)


def makedev(major: int, minor: int) -> int:
    """glibc's ``makedev`` (what ``os.makedev`` computes), so device numbers round-trip through tar headers."""
    return ((major & 0xFFF) << 8) | ((major & ~0xFFF) << 32) | (minor & 0xFF) | ((minor & ~0xFF) << 12)


def export_tree(fs: Filesystem, root: str, tw: tarfile.TarFile) -> None:
    """``docker export``: every entry under ``root`` (not the root itself) in lexical walk order."""
    seen: dict[int, str] = {}
    for path, st in walk(fs, root):
        name = path[len(root.rstrip("/")) + 1:]
        tar_info(fs, path, name, st, seen).write(fs, tw)
