"""Paths and names: resolve a path (symlinks included), and every operation on directory entries.

Layer: fs. May import: thinpool.io.device, thinpool.errors, thinpool.fs.*, numpy.

``_walk`` resolves a path one component at a time through the cached :class:`Directory` index, following
symlinks (at most 40 hops, as the kernel's ``MAXSYMLINKS``). The public operations (mkdir, rmdir, unlink, link,
symlink, rename, mknod, stat, scandir, walk) check space and POSIX rules first, then change the directory and the
inodes together.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Iterator

from thinpool.errors import (
    DirectoryNotEmpty,
    FileExists,
    FileNotFound,
    FsError,
    IsADirectory,
    NameTooLong,
    NotADirectory,
)
from thinpool.fs import layout as L
from thinpool.fs.core import I_BLOCK_FMT, MAX_LINKS
from thinpool.fs.core import decode as _decode
from thinpool.fs.core import encode as _encode
from thinpool.fs.core import locked as _locked
from thinpool.fs.core import now as _now
from thinpool.fs.data import FsData
from thinpool.fs.directory import init_dir_block
from thinpool.fs.inode import Inode
from thinpool.fs.records import DirEntry, Stat

MAX_SYMLINK_HOPS = 40


class FsNamei(FsData):
    """Path resolution and the namespace operations."""

    def _components(self, path: str | bytes) -> list[bytes]:
        p = _encode(path)
        parts = [c for c in p.split(b"/") if c and c != b"."]
        for c in parts:
            if len(c) > L.NAME_MAX:
                raise NameTooLong(path=_decode(p))
        return parts

    def _walk(self, path: str | bytes, follow_last: bool, hops: int = 0,
              start: int = L.ROOT_INO) -> tuple[int, int, bytes]:
        """Resolve ``path``; returns (parent inode, inode or 0 if the last component is absent, last name)."""
        spath = path if isinstance(path, str) else _decode(path)
        parts = self._components(path)
        cur = start if not _encode(path).startswith(b"/") else L.ROOT_INO
        parent = cur
        if not parts:
            d = self._dir(cur)
            return d.parent, cur, b"."
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            inode = self._live_inode(cur, spath)
            if not inode.is_dir:
                raise NotADirectory(path=spath)
            d = self._dir(cur)
            hit = d.lookup(name)
            parent = cur
            if name == b"..":
                cur = d.parent
                if last:
                    return self._dir(cur).parent, cur, name
                continue
            if hit is None:
                if last:
                    return parent, 0, name
                raise FileNotFound(path=spath)
            child = hit[0]
            cinode = self._live_inode(child, spath)
            if cinode.is_symlink and (not last or follow_last):
                if hops >= MAX_SYMLINK_HOPS:
                    raise FsError(reason=f"too many levels of symbolic links: {spath}", path=spath,
                                  errno=_errno.ELOOP)
                target = self._readlink_inode(child, cinode)
                rest = b"/".join(parts[i + 1:])
                newpath = target + (b"/" + rest if rest else b"")
                if not newpath.startswith(b"/"):
                    p, c, n = self._walk(newpath, follow_last, hops + 1, start=parent)
                else:
                    p, c, n = self._walk(newpath, follow_last, hops + 1)
                return p, c, n
            cur = child
        return parent, cur, parts[-1]

    def _lookup(self, path: str | bytes, follow: bool = True) -> int:
        _, ino, _ = self._walk(path, follow)
        if ino == 0:
            raise FileNotFound(path=path if isinstance(path, str) else _decode(path))
        return ino

    def _parent_of_new(self, path: str | bytes) -> tuple[int, bytes, int]:
        """(parent dir inode, name, existing inode or 0) for creating ``path`` (the last symlink not followed)."""
        spath = path if isinstance(path, str) else _decode(path)
        parent, ino, name = self._walk(path, follow_last=False)
        if name in (b".", b"..") or not self._components(path):
            raise FileExists(path=spath)
        if not self._inode(parent).is_dir:
            raise NotADirectory(path=spath)
        return parent, name, ino

    @_locked
    def exists(self, path: str) -> bool:
        try:
            self._lookup(path, follow=False)
        except (FileNotFound, NotADirectory):
            return False
        return True

    @_locked
    def isdir(self, path: str) -> bool:
        try:
            return self._inode(self._lookup(path)).is_dir
        except (FileNotFound, NotADirectory):
            return False

    @_locked
    def isfile(self, path: str) -> bool:
        try:
            return self._inode(self._lookup(path)).is_reg
        except (FileNotFound, NotADirectory):
            return False

    @_locked
    def stat(self, path: str, *, follow_symlinks: bool = True) -> Stat:
        """Inode attributes of ``path`` (following a final symlink unless ``follow_symlinks`` is false)."""
        ino = self._lookup(path, follow_symlinks)
        return self._stat(ino)

    def lstat(self, path: str) -> Stat:
        return self.stat(path, follow_symlinks=False)

    @_locked
    def scandir(self, path: str = "/") -> list[DirEntry]:
        """Entries of a directory except '.' and '..', in on-disk order."""
        ino = self._lookup(path)
        if not self._inode(ino).is_dir:
            raise NotADirectory(path=path)
        return [DirEntry(_decode(n), i, ft) for n, i, ft in self._dir(ino).names()]

    def listdir(self, path: str = "/") -> list[str]:
        return [e.name for e in self.scandir(path)]

    def walk(self, path: str = "/") -> Iterator[tuple[str, list[str], list[str]]]:
        """Like ``os.walk`` (top-down): (dirpath, dirnames, filenames); symlinks to directories are not followed."""
        entries = self.scandir(path)
        dirs = [e.name for e in entries if e.file_type == L.FT_DIR or
                (e.file_type == L.FT_UNKNOWN and self._inode(e.ino).is_dir)]
        files = [e.name for e in entries if e.name not in dirs]
        yield path, dirs, files
        for d in dirs:
            yield from self.walk(path.rstrip("/") + "/" + d)

    @_locked
    def mkdir(self, path: str, mode: int = 0o755, *, parents: bool = False, exist_ok: bool = False) -> None:
        """Create a directory (with ``parents``, also missing ancestors, like ``mkdir -p``).

        Raises:
            FileExists, FileNotFound (parent missing), NotADirectory, NameTooLong, FsNoSpace.
        """
        self._check_writable()
        if parents:
            parts = self._components(path)
            cur = ""
            for c in parts:
                cur += "/" + _decode(c)
                if not self.exists(cur):
                    self.mkdir(cur, mode)
                elif not self.isdir(cur):
                    raise NotADirectory(path=cur)
            return
        parent, name, existing = self._parent_of_new(path)
        if existing:
            if exist_ok and self._inode(existing).is_dir:
                return
            raise FileExists(path=path)
        pinode = self._inode(parent)
        if pinode.i_links_count >= MAX_LINKS:
            raise FsError(reason=f"too many links in the parent of {path}", path=path, errno=_errno.EMLINK)
        self._need(1 + self._entry_cost(parent, name), 1, path)
        ino, inode = self._new_inode(parent, L.S_IFDIR | (mode & 0o7777))
        inode.i_links_count = 2
        blk = self.alloc.alloc_blocks(self._group_start(ino), 1)[0]
        init_dir_block(self.cache.new(blk), ino, parent, self.filetype)
        inode.i_block[0] = blk
        inode.i_blocks = self.block_size // 512
        inode.i_size = self.block_size
        self._dir(parent).add(name, ino, L.FT_DIR)
        pinode.i_links_count += 1
        self._dir_changed(parent, pinode)

    def makedirs(self, path: str, mode: int = 0o755, exist_ok: bool = True) -> None:
        if exist_ok and self.isdir(path):
            return
        self.mkdir(path, mode, parents=True)

    @_locked
    def rmdir(self, path: str) -> None:
        """Remove an empty directory.

        Raises:
            DirectoryNotEmpty, NotADirectory, FileNotFound, FsError (EBUSY) for the root.
        """
        self._check_writable()
        parent, ino, name = self._walk(path, follow_last=False)
        if ino == 0:
            raise FileNotFound(path=path)
        if ino == L.ROOT_INO:
            raise FsError(reason="cannot remove the root directory", path=path, errno=_errno.EBUSY)
        if name in (b".", b".."):
            raise FsError(reason=f"invalid argument: {path}", path=path, errno=_errno.EINVAL)
        inode = self._inode(ino)
        if not inode.is_dir:
            raise NotADirectory(path=path)
        if len(self._dir(ino)):
            raise DirectoryNotEmpty(path=path)
        self._dir(parent).remove(name)
        pinode = self._inode(parent)
        pinode.i_links_count -= 1
        self._dir_changed(parent, pinode)
        self._release_inode(ino, inode)

    @_locked
    def unlink(self, path: str) -> None:
        """Remove a name of a non-directory; the inode goes when its last link does.

        Raises:
            IsADirectory, FileNotFound, NotADirectory.
        """
        self._check_writable()
        parent, ino, name = self._walk(path, follow_last=False)
        if ino == 0:
            raise FileNotFound(path=path)
        inode = self._inode(ino)
        if inode.is_dir:
            raise IsADirectory(path=path)
        self._dir(parent).remove(name)
        self._dir_changed(parent, self._inode(parent))
        self._drop_link(ino, inode)

    remove = unlink

    def _drop_link(self, ino: int, inode: Inode) -> None:
        inode.i_links_count -= 1
        inode.i_ctime = _now()
        self._touch(ino)
        if inode.i_links_count == 0:
            self._release_inode(ino, inode)

    @_locked
    def link(self, src: str, dst: str) -> None:
        """Make ``dst`` another name of the non-directory ``src`` (a hard link)."""
        self._check_writable()
        ino = self._lookup(src, follow=False)
        inode = self._inode(ino)
        if inode.is_dir:
            raise IsADirectory(path=src)
        if inode.i_links_count >= MAX_LINKS:
            raise FsError(reason=f"too many links: {src}", path=src, errno=_errno.EMLINK)
        parent, name, existing = self._parent_of_new(dst)
        if existing:
            raise FileExists(path=dst)
        self._need(self._entry_cost(parent, name), path=dst)
        self._dir(parent).add(name, ino, L.MODE_TO_FT[inode.file_type])
        self._dir_changed(parent, self._inode(parent))
        inode.i_links_count += 1
        inode.i_ctime = _now()
        self._touch(ino)

    @_locked
    def symlink(self, target: str | bytes, path: str) -> None:
        """Create a symbolic link ``path`` -> ``target`` (inline "fast" symlink below 60 bytes)."""
        self._check_writable()
        tb = _encode(target)
        if not tb or b"\0" in tb:
            raise FsError(reason="invalid symlink target", path=path, errno=_errno.EINVAL)
        if len(tb) > L.SYMLINK_MAX:
            raise NameTooLong(path=path)
        parent, name, existing = self._parent_of_new(path)
        if existing:
            raise FileExists(path=path)
        fast = len(tb) <= L.FAST_SYMLINK_MAX
        self._need((0 if fast else 1) + self._entry_cost(parent, name), 1, path)
        ino, inode = self._new_inode(parent, L.S_IFLNK | 0o777)
        if fast:
            inode.i_block = list(I_BLOCK_FMT.unpack(tb.ljust(60, b"\0")))
        else:
            blk = self.alloc.alloc_blocks(self._group_start(ino), 1)[0]
            self.device.write(blk * self.block_size, tb.ljust(self.block_size, b"\0"))
            inode.i_block[0] = blk
            inode.i_blocks = self.block_size // 512
        inode.i_size = len(tb)
        self._dir(parent).add(name, ino, L.FT_SYMLINK)
        self._dir_changed(parent, self._inode(parent))

    @_locked
    def readlink(self, path: str) -> str:
        ino = self._lookup(path, follow=False)
        inode = self._inode(ino)
        if not inode.is_symlink:
            raise FsError(reason=f"not a symbolic link: {path}", path=path, errno=_errno.EINVAL)
        return _decode(self._readlink_inode(ino, inode))

    @_locked
    def rename(self, src: str, dst: str) -> None:
        """Move ``src`` to ``dst``, replacing a ``dst`` file or empty directory of compatible type (POSIX rules).

        Raises:
            FileNotFound, IsADirectory (file over directory), NotADirectory (directory over file),
            DirectoryNotEmpty, FsError (EINVAL) when moving a directory into itself.
        """
        self._check_writable()
        sparent, sino, sname = self._walk(src, follow_last=False)
        if sino == 0:
            raise FileNotFound(path=src)
        if sname in (b".", b"..") or sino == L.ROOT_INO:
            raise FsError(reason=f"invalid argument: {src}", path=src, errno=_errno.EINVAL)
        dparent, dname, dino = self._parent_of_new(dst)
        sinode = self._inode(sino)
        if dino == sino:
            return
        if sinode.is_dir:
            # dst's parent must not be src or inside it
            p = dparent
            while True:
                if p == sino:
                    raise FsError(reason=f"cannot move {src} into itself", path=dst, errno=_errno.EINVAL)
                if p == L.ROOT_INO:
                    break
                p = self._dir(p).parent
        dinode = self._inode(dino) if dino else None
        if dinode is not None:
            if sinode.is_dir and not dinode.is_dir:
                raise NotADirectory(path=dst)
            if not sinode.is_dir and dinode.is_dir:
                raise IsADirectory(path=dst)
            if dinode.is_dir and len(self._dir(dino)):
                raise DirectoryNotEmpty(path=dst)
        else:
            self._need(self._entry_cost(dparent, dname), path=dst)
        ft = L.MODE_TO_FT[sinode.file_type]
        ddir = self._dir(dparent)
        dpinode = self._inode(dparent)
        spinode = self._inode(sparent)
        if dinode is not None:
            ddir.set_inode(dname, sino, ft)
            if dinode.is_dir:
                dpinode.i_links_count -= 1  # the replaced directory's '..'
                self._release_inode(dino, dinode)
            else:
                self._drop_link(dino, dinode)
        else:
            ddir.add(dname, sino, ft)
        self._dir(sparent).remove(sname)
        if sinode.is_dir and sparent != dparent:
            self._dir(sino).set_inode(b"..", dparent, L.FT_DIR)
            self._dir_changed(sino, sinode)
            spinode.i_links_count -= 1
            dpinode.i_links_count += 1
        sinode.i_ctime = _now()
        self._touch(sino)
        self._dir_changed(sparent, spinode)
        self._dir_changed(dparent, dpinode)

    @_locked
    def mknod(self, path: str, mode: int, rdev: int = 0) -> None:
        """Create a FIFO, socket, character or block device (or, with no type bits, an empty regular file).

        ``mode`` carries the type (``stat.S_IFIFO`` ...) and the permission bits; ``rdev`` (``os.makedev``) is
        stored for device nodes as ext2 does (old 8:8 encoding in i_block[0] when it fits, else the new one in
        i_block[1]). Nothing is ever opened.

        Raises:
            FileExists, FileNotFound (parent missing), NotADirectory, FsNoSpace, FsError (EINVAL: a directory or
            symlink type).
        """
        self._check_writable()
        ftype = mode & L.S_IFMT or L.S_IFREG
        if ftype not in (L.S_IFIFO, L.S_IFSOCK, L.S_IFCHR, L.S_IFBLK, L.S_IFREG):
            raise FsError(reason=f"mknod cannot make type {ftype:#o}: {path}", path=path, errno=_errno.EINVAL)
        parent, name, existing = self._parent_of_new(path)
        if existing:
            raise FileExists(path=path)
        self._need(self._entry_cost(parent, name), 1, path)
        ino, inode = self._new_inode(parent, ftype | (mode & 0o7777))
        if inode.is_device:
            inode.rdev = rdev
        self._dir(parent).add(name, ino, L.MODE_TO_FT[ftype])
        self._dir_changed(parent, self._inode(parent))
