"""Regular files by path: open (modes as Python's binary ``open``), whole-file read/write, write_at, holes.

Layer: fs. May import: thinpool.io.device, thinpool.errors, thinpool.fs.*, numpy.
"""

from __future__ import annotations

import errno as _errno

from thinpool.errors import (
    FileExists,
    FileNotFound,
    FsError,
    IsADirectory,
)
from thinpool.fs import layout as L
from thinpool.fs.core import locked as _locked
from thinpool.fs.file import File
from thinpool.fs.inode import Inode
from thinpool.fs.namei import FsNamei


class FsFiles(FsNamei):
    """Opening, sizing and writing regular files by path; ``pread``/``pwrite`` serve :class:`File` objects."""

    @_locked
    def open(self, path: str, mode: str = "rb") -> File:
        """Open a regular file. Modes as Python's binary ``open``: r, w, a, x, with optional + (``b`` is implied).

        Raises:
            FileNotFound (r / r+), FileExists (x), IsADirectory, NotADirectory, FsNoSpace (new file).
        """
        m = mode.replace("b", "")
        if not m or m[0] not in "rwax" or any(c not in "rwax+" for c in m) or "t" in mode:
            raise FsError(reason=f"invalid mode {mode!r}", errno=_errno.EINVAL)
        kind, plus = m[0], "+" in m
        readable = kind == "r" or plus
        writable = kind != "r" or plus
        if writable:
            self._check_writable()
        parent, ino, name = self._walk(path, follow_last=True)
        if ino == 0:
            if kind == "r":
                raise FileNotFound(path=path)
            ino = self._create(parent, name, path)
        else:
            if kind == "x":
                raise FileExists(path=path)
            inode = self._inode(ino)
            if inode.is_dir:
                raise IsADirectory(path=path)
            if not inode.is_reg:
                raise FsError(reason=f"not a regular file: {path}", path=path, errno=_errno.EINVAL)
            if kind == "w" and inode.size:
                self._truncate(ino, inode, 0)
        return File(self, ino, path, readable=readable, writable=writable, append=kind == "a")

    def _create(self, parent: int, name: bytes, path: str, mode: int = 0o644) -> int:
        if name in (b".", b".."):
            raise IsADirectory(path=path)
        self._need(self._entry_cost(parent, name), 1, path)
        ino, _ = self._new_inode(parent, L.S_IFREG | mode)
        self._dir(parent).add(name, ino, L.FT_REG_FILE)
        self._dir_changed(parent, self._inode(parent))
        return ino

    @_locked
    def read_file(self, path: str) -> bytes:
        with self.open(path, "rb") as f:
            return f.read()

    @_locked
    def write_file(self, path: str, data: bytes) -> None:
        with self.open(path, "wb") as f:
            f.write(data)

    @_locked
    def write_at(self, path: str, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at byte ``offset`` of the existing regular file ``path``; returns the bytes written.

        Blocks the write does not touch stay holes (a write past the end leaves a hole before it).

        Raises:
            FileNotFound, IsADirectory, FsError (EINVAL: not a regular file or a negative offset), FsNoSpace.
        """
        self._check_writable()
        if offset < 0:
            raise FsError(reason=f"negative offset {offset}: {path}", path=path, errno=_errno.EINVAL)
        ino, inode = self._regular(path)
        return self._write(ino, inode, offset, data, path)

    def _regular(self, path: str) -> tuple[int, Inode]:
        """The inode number and inode of regular file ``path``; IsADirectory / FsError (EINVAL) otherwise."""
        ino = self._lookup(path)
        inode = self._inode(ino)
        if inode.is_dir:
            raise IsADirectory(path=path)
        if not inode.is_reg:
            raise FsError(reason=f"not a regular file: {path}", path=path, errno=_errno.EINVAL)
        return ino, inode

    @_locked
    def data_ranges(self, path: str) -> list[tuple[int, int]]:
        """(offset, length) in bytes of every allocated stretch of regular file ``path`` (what SEEK_DATA finds),
        clipped to its size; the gaps are holes. Costs O(allocated blocks), not O(size).

        Raises:
            FileNotFound, IsADirectory, FsError (EINVAL: not a regular file).
        """
        ino, inode = self._regular(path)
        bs = self.block_size
        size = inode.size
        out = []
        for first, n in self.mapper.mapped_runs(ino, inode):
            start = first * bs
            if start >= size:
                break
            out.append((start, min(n * bs, size - start)))
        return out

    @_locked
    def truncate(self, path: str, size: int) -> None:
        self._check_writable()
        ino, inode = self._regular(path)
        self._truncate(ino, inode, size)

    # --- by inode number, for open File objects -------------------------------------------------------------
    def _open_inode(self, ino: int, path: str) -> Inode:
        inode = self._inode(ino)
        if inode.i_links_count == 0:
            raise FsError(reason=f"file {path} was deleted", path=path, errno=_errno.ESTALE)
        if not inode.is_reg:
            raise FsError(reason=f"not a regular file: {path}", path=path, errno=_errno.EINVAL)
        return inode

    @_locked
    def file_size(self, ino: int, path: str = "") -> int:
        """Size in bytes of the open regular file inode ``ino`` (``path`` names it in errors).

        Raises:
            FsError: ESTALE once the file was deleted, EINVAL for an inode that is not a regular file.
        """
        return self._open_inode(ino, path).size

    @_locked
    def pread(self, ino: int, offset: int, length: int, path: str = "") -> bytes:
        """Up to ``length`` bytes of regular file inode ``ino`` from byte ``offset`` (fewer at the end; holes read
        as zeros), like ``os.pread`` on an open file.

        Raises:
            FsError: ESTALE once the file was deleted, EINVAL for a negative offset.
        """
        if offset < 0:
            raise FsError(reason=f"negative offset {offset}: {path}", path=path, errno=_errno.EINVAL)
        return self._read(ino, self._open_inode(ino, path), offset, length)

    @_locked
    def pwrite(self, ino: int, offset: int, data: bytes | bytearray | memoryview, path: str = "") -> int:
        """Write ``data`` at byte ``offset`` of regular file inode ``ino``; untouched blocks stay holes.

        Raises:
            FsError: read-only, ESTALE once deleted, EINVAL for a negative offset. FsNoSpace before anything changes.
        """
        self._check_writable()
        if offset < 0:
            raise FsError(reason=f"negative offset {offset}: {path}", path=path, errno=_errno.EINVAL)
        return self._write(ino, self._open_inode(ino, path), offset, data, path)

    @_locked
    def ftruncate(self, ino: int, size: int, path: str = "") -> None:
        """Set the size of regular file inode ``ino``: shrinking frees blocks, growing leaves a hole.

        Raises:
            FsError: read-only, ESTALE once deleted, EINVAL for a negative size.
        """
        self._check_writable()
        self._truncate(ino, self._open_inode(ino, path), size)

    @_locked
    def rmtree(self, path: str) -> None:
        """Remove directory ``path`` and everything below it (``rm -r``; symlinks are removed, never followed).

        Raises:
            FileNotFound, NotADirectory, FsError (EBUSY) for the root.
        """
        self._check_writable()
        for e in self.scandir(path):
            p = path.rstrip("/") + "/" + e.name
            if self.lstat(p).is_dir:
                self.rmtree(p)
            else:
                self.unlink(p)
        self.rmdir(path)
