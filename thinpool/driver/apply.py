"""Apply one layer tar to a device's rootfs with moby's ``archive.UnpackLayer`` rules.

Layer: driver. May import: thinpool.errors, thinpool.fs, thinpool.driver.rootfs.

The rules (``pkg/archive/diff.go``, ``createTarFile`` in ``archive.go``), applied as in moby's chroot:

* a missing parent directory is made (0755, root); names are cleaned; a name escaping the root is refused;
* top-level ``.wh..wh.*`` entries are skipped, except regular files under ``.wh..wh.plnk/`` (kept aside as
  targets of hard links, which become copies of them) and ``.wh..wh..opq``;
* ``D/.wh..wh..opq`` removes every child of ``D`` not unpacked by this layer so far; ``D/.wh.X`` removes ``D/X``;
* an existing path is removed and replaced unless both it and the entry are directories (then only the
  attributes change);
* ownership (lchown), xattrs (``SCHILY.xattr.*``), mode (not for symlinks, nor for a hard link to a symlink) and
  times follow the header; directory mtimes are set last, after everything is in place;
* the returned size is the sum of the entries' sizes.

One deliberate difference from moby (``keep_parent_mtimes``, on by default): a directory that the layer changes
(an entry removed, added or replaced in it) without carrying the directory itself keeps its mtime, as ``umoci
unpack`` does. moby leaves there the time of the apply (the kernel's), so the rootfs would depend on when a layer
was pulled; docker's own diff ignores directory mtimes, so its answers do not change.

Regular file content is written sparse: 4 KiB blocks of zeros stay holes.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import stat as S
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import IO

from thinpool.driver.rootfs import ROOTFS, XATTR_PAX_PREFIX, clean, lstat, makedev, remove_all, resolve, walk
from thinpool.errors import FsError, ImageFormatError
from thinpool.fs.filesystem import Filesystem

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_LINK_DIR = ".wh..wh.plnk"
WHITEOUT_OPAQUE_DIR = ".wh..wh..opq"
BLOCK = 4096  # bytes: zero blocks of this size stay holes
COPY_CHUNK = 1 << 20  # bytes per read of a member's content


@dataclass
class Applied:
    """What one layer did: ``size`` (sum of entry sizes, as moby's ApplyDiff returns) and, for the tar-split
    record, each regular file written: (offset of its data in the tar stream, size, ext2 path, inode)."""

    size: int = 0
    files: list[tuple[int, int, str, int]] = field(default_factory=list)


def _mtime(ti: tarfile.TarInfo) -> int:
    return int(ti.mtime)


def _atime(ti: tarfile.TarInfo) -> int:
    a = ti.pax_headers.get("atime")
    m = _mtime(ti)
    try:
        at = int(float(a)) if a is not None else m
    except ValueError:
        at = m
    return max(at, m)


def _xattrs(ti: tarfile.TarInfo) -> dict[str, bytes]:
    return {k[len(XATTR_PAX_PREFIX):]: v.encode("utf-8", "surrogateescape")
            for k, v in ti.pax_headers.items() if k.startswith(XATTR_PAX_PREFIX)}


class LayerApplier:
    """One ``UnpackLayer`` run over an open file system; ``root`` is the chroot (the device's ``/rootfs``)."""

    def __init__(self, fs: Filesystem, root: str = ROOTFS, *, source: str = "layer", whiteouts: bool = True) -> None:
        self.fs = fs
        self.whiteouts = whiteouts  # False: plain ``Untar`` (docker cp), no whiteout processing
        self.keep_parent_mtimes = whiteouts
        self.parent_times: dict[str, tuple[int, int]] = {}
        self.root = root
        self.source = source
        self.dirs: list[tuple[str, tarfile.TarInfo]] = []
        self.unpacked: set[str] = set()
        self.plnk: dict[str, tuple[tarfile.TarInfo, IO[bytes]]] = {}  # .wh..wh.plnk/NAME -> header, content
        self.result = Applied()

    def bad(self, reason: str) -> ImageFormatError:
        return ImageFormatError(source=self.source, reason=reason)

    def apply(self, stream: IO[bytes] | object) -> Applied:
        st = lstat(self.fs, self.root)
        if st is None or not S.S_ISDIR(st.mode):
            raise self.bad(f"{self.root} is not a directory")  # never apply through a root that is a symlink
        try:
            tf = tarfile.open(fileobj=stream, mode="r|")  # type: ignore[call-overload]
        except tarfile.TarError as e:
            raise self.bad(f"not a tar archive ({e})") from None
        try:
            while True:
                try:
                    ti = tf.next()
                except tarfile.TarError as e:
                    raise self.bad(f"bad tar stream ({e})") from None
                if ti is None:
                    break
                self.result.size += ti.size
                self.entry(tf, ti)
            layer_dirs = {path for path, _ in self.dirs}
            for path, times in self.parent_times.items():
                if path not in layer_dirs and lstat(self.fs, path) is not None:
                    self.fs.utime(path, times, follow_symlinks=False)
            for path, ti in self.dirs:
                self.fs.utime(path, (_atime(ti), _mtime(ti)), follow_symlinks=False)
        finally:
            for _, f in self.plnk.values():
                f.close()
        return self.result

    def entry(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        fs = self.fs
        name = clean(ti.name)
        if name == ".." or name.startswith("../"):
            raise self.bad(f"{ti.name!r} is outside of the root")
        if name == "." and not ti.isdir():
            # replacing the root by a file, a device or a symlink (to "/": every later path of this and every
            # upper layer would land beside /rootfs, on /id and /lost+found) is refused
            raise self.bad(f"{ti.name!r} names the root itself, which must stay a directory")
        if name != ".":
            parent = resolve(fs, self.root, posixpath_dir(name), follow_last=False)
            if lstat(fs, parent) is None:
                self._touch_parent(parent)
                fs.mkdir(resolve(fs, self.root, posixpath_dir(name), follow_last=True), 0o755, parents=True)
        if name.startswith(WHITEOUT_META_PREFIX) and self.whiteouts:
            if name.startswith(WHITEOUT_LINK_DIR + "/") and ti.isreg():
                tmp: IO[bytes] = tempfile.TemporaryFile()
                src = tf.extractfile(ti)
                assert src is not None
                _copy(src, tmp, ti.size)
                self.plnk[os.path.basename(name)] = (ti, tmp)
            if name != WHITEOUT_OPAQUE_DIR:
                return
        path = resolve(fs, self.root, name, follow_last=False)
        base = os.path.basename(name)
        if base.startswith(WHITEOUT_PREFIX) and self.whiteouts:
            d = path.rsplit("/", 1)[0] or "/"
            if base == WHITEOUT_OPAQUE_DIR:
                if lstat(fs, d) is None:
                    raise self.bad(f"opaque whiteout {ti.name!r}: no directory {os.path.dirname(name) or '/'}")
                self._opaque(d)
            else:
                original = base[len(WHITEOUT_PREFIX):]
                if original in ("", ".", ".."):
                    # ``.wh.`` and ``.wh..`` name the directory itself, ``.wh...`` its parent: at the top, the
                    # rootfs itself and the device root beside ``/id``. No real layer carries them.
                    raise self.bad(f"whiteout {ti.name!r} names no entry")
                self._remove(d.rstrip("/") + "/" + original)
            return
        st = lstat(fs, path)
        if st is not None and S.S_ISDIR(st.mode) and name == "." and not self.whiteouts:
            return  # Untar keeps the destination directory as it is
        if st is not None and not (S.S_ISDIR(st.mode) and ti.isdir()):
            self._remove(path)
        if st is None or not S.S_ISDIR(st.mode) or not ti.isdir():
            self._touch_parent(path)
        src_ti = ti
        data: IO[bytes] | None = None
        if ti.islnk() and clean(ti.linkname).startswith(WHITEOUT_LINK_DIR + "/"):
            got = self.plnk.get(os.path.basename(clean(ti.linkname)))
            if got is None:
                raise self.bad(f"hard link {ti.name!r} to a missing {ti.linkname!r}")
            src_ti, data = got
            data.seek(0)
        elif ti.isreg():
            data = tf.extractfile(ti)
        self.create(path, src_ti, data, ti.offset_data if src_ti is ti else None)
        if ti.isdir():
            self.dirs.append((path, ti))
        self.unpacked.add(path)

    def _opaque(self, d: str) -> None:
        for p, _ in list(walk(self.fs, d)):
            if p in self.unpacked:
                continue
            if lstat(self.fs, p) is not None:  # an ancestor may already be gone (Walk ignores ENOENT)
                self._remove(p)

    def _touch_parent(self, path: str) -> None:
        """Remember the times of ``path``'s directory before the layer changes an entry in it."""
        if not self.keep_parent_mtimes:
            return
        parent = path.rsplit("/", 1)[0] or "/"
        if parent not in self.parent_times:
            st = lstat(self.fs, parent)
            if st is not None:
                self.parent_times[parent] = (st.atime, st.mtime)

    def _remove(self, path: str) -> None:
        if lstat(self.fs, path) is not None:
            self._touch_parent(path)
            remove_all(self.fs, path)

    def create(self, path: str, ti: tarfile.TarInfo, data: IO[bytes] | None, offset: int | None) -> None:
        """``createTarFile``: make the entry, then lchown, xattrs, chmod, times."""
        fs = self.fs
        mode = ti.mode & 0o7777
        set_mode_times = True
        if ti.isdir():
            st = lstat(fs, path)
            if not (st is not None and S.S_ISDIR(st.mode)):
                fs.mkdir(path, mode)
        elif ti.isreg():
            fs.open(path, "wb").close()
            fs.chmod(path, mode)
            assert data is not None
            ino = self.write_content(path, data, ti.size)
            if offset is not None:
                self.result.files.append((offset, ti.size, path, ino))
        elif ti.ischr() or ti.isblk() or ti.isfifo():
            kind = S.S_IFCHR if ti.ischr() else S.S_IFBLK if ti.isblk() else S.S_IFIFO
            rdev = makedev(ti.devmajor, ti.devminor) if kind != S.S_IFIFO else 0
            fs.mknod(path, kind | mode, rdev)
        elif ti.islnk():
            target = resolve(fs, self.root, ti.linkname, follow_last=False)
            fs.link(target, path)
            tst = lstat(fs, target)
            set_mode_times = tst is not None and not S.S_ISLNK(tst.mode)
        elif ti.issym():
            fs.symlink(ti.linkname, path)
        else:
            raise self.bad(f"unhandled tar header type {ti.type!r} for {ti.name!r}")
        fs.chown(path, ti.uid, ti.gid, follow_symlinks=False)
        for k, v in _xattrs(ti).items():
            try:
                fs.setxattr(path, k, v, follow_symlinks=False)
            except FsError as e:
                if getattr(e, "errno", None) not in (_errno.ENOTSUP, _errno.EOPNOTSUPP, _errno.EPERM):
                    raise
                log.warning("ignored xattr %s of %s: %s", k, ti.name, e)
        if ti.issym():
            fs.utime(path, (_atime(ti), _mtime(ti)), follow_symlinks=False)
            return
        if set_mode_times:
            fs.chmod(path, mode)
            fs.utime(path, (_atime(ti), _mtime(ti)), follow_symlinks=False)

    def write_content(self, path: str, data: IO[bytes], size: int) -> int:
        """Copy ``size`` bytes into the (new, empty) file at ``path``, leaving zero blocks as holes."""
        fs = self.fs
        pos = 0
        while pos < size:
            chunk = data.read(min(COPY_CHUNK, size - pos))
            if not chunk:
                raise self.bad(f"{path}: content ends after {pos} of {size} bytes")
            _write_sparse(fs, path, pos, chunk)
            pos += len(chunk)
        if size:
            fs.truncate(path, size)  # a trailing hole: the size is still the header's
        return fs.lstat(path).ino


def _write_sparse(fs: Filesystem, path: str, pos: int, chunk: bytes) -> None:
    """Write ``chunk`` at ``pos``, skipping the whole file blocks in it that are all zeros."""
    n = len(chunk)
    mv = memoryview(chunk)
    run: int | None = None
    i = 0
    while i < n:
        end = min(n, (pos + i) // BLOCK * BLOCK + BLOCK - pos)
        if end - i == BLOCK and mv[i:end] == _ZERO_BLOCK:
            if run is not None:
                fs.write_at(path, pos + run, mv[run:i])
                run = None
        elif run is None:
            run = i
        i = end
    if run is not None:
        fs.write_at(path, pos + run, mv[run:n])


_ZERO_BLOCK = bytes(BLOCK)


def _copy(src: IO[bytes], dst: IO[bytes], size: int) -> None:
    left = size
    while left:
        b = src.read(min(COPY_CHUNK, left))
        if not b:
            break
        dst.write(b)
        left -= len(b)


def posixpath_dir(name: str) -> str:
    d = os.path.dirname(name)
    return d or "."
