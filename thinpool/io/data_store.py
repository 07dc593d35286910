"""The pool's data device: a sparse file addressed in data blocks (chunks), with hole punching.

Layer: io. May import: thinpool.errors.

pread/pwrite, not mmap: a full host disk must stay a clean error (ENOSPC from pwrite), where a store through mmap
would turn it into SIGBUS. Counts every byte written so benchmarks can report write amplification.

Opened as a pool file (no symlink, regular files only). A full host filesystem (ENOSPC, EDQUOT) is HostNoSpace, a
NoSpace, never an EIO. ``dirty`` lists the byte ranges written since the last successful ``sync``: the pool uses it
to tell whether a failed command overwrote committed chunks in place (then it cannot be undone by an abort).

Known holes: before an aligned punch the store asks the filesystem (one ``lseek(SEEK_DATA)`` from the start of
the range) whether the range holds any data; zeroing a newly provisioned chunk that is still a hole (the common
case: a fresh sparse file, or a chunk punched by discard passdown) then costs no fallocate call and marks nothing
dirty. The cost is one system call for the range touched, whatever the size of the file: no per-chunk map is
kept (it was one byte per chunk, 128 MiB for an 8 TiB pool, and built by walking every extent of the file).
"""

from __future__ import annotations

import errno
import os
import struct
import weakref
from array import array
from typing import Any, Final, Protocol, runtime_checkable

from thinpool.errors import HostNoSpace, StoreIOError
from thinpool.io.block_store import _io_error
from thinpool.io.safe_open import open_pool_file

_pwrite = os.pwrite
# A write longer than this goes to the file in pieces that end on its multiples (see DataStore.pwrite): the
# smallest chunk size dm-thin allows, so every chunk boundary is a piece boundary
PIECE_BYTES: Final = 64 * 1024
# dirty ranges kept in a list (cheap to append) until there are this many numbers, then packed into the array
_DIRTY_FOLD: Final = 4096
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2
_fallocate: Any = None  # libc's fallocate, loaded at the first punch (ctypes.util.find_library spawns ldconfig)


def _load_fallocate() -> Any:
    global _fallocate
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    f = libc.fallocate
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    _fallocate = f
    return f


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate [offset, offset+length) of a file (reads return zeros). False where unsupported."""
    r: int = (_fallocate or _load_fallocate())(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    return r == 0


@runtime_checkable
class DataStoreProtocol(Protocol):
    """What the pool and its thin devices need of a data device (DataStore on a sparse file; the in-memory and
    fault-injecting stores of thinpool.testing): byte-addressed reads and writes, an in-file copy, hole punching."""

    chunk_bytes: int
    path: str
    bytes_read: int
    bytes_written: int

    @property
    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def preadinto(self, offset: int, view: memoryview) -> None: ...

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def copy(self, src: int, dst: int, length: int) -> None: ...

    def punch(self, offset: int, length: int) -> None: ...

    def sync(self) -> None: ...

    def resize(self, size: int) -> None: ...

    def close(self) -> None: ...


class DataStore:
    """The data device of a pool on a sparse regular file (see the module docstring)."""

    def __init__(self, path: str, chunk_bytes: int, *, readonly: bool = False) -> None:
        self.path = path
        self.chunk_bytes = chunk_bytes
        try:
            self.fd = open_pool_file(path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as e:
            raise StoreIOError(what=path, op="open", reason=e.strerror or str(e)) from e
        self._closer = weakref.finalize(self, os.close, self.fd)  # closed when collected, if close() was not called
        # [start, end) byte ranges written since the last sync, flat (start, end, start, end...): the latest in
        # a list (an append there is a tenth of an array's, whose append parses its argument), packed into an
        # array of int64 every _DIRTY_FOLD numbers, so a burst of random writes holds 16 bytes a range and no
        # objects the garbage collector walks. The list is never empty while _dirty_end >= 0 (a fold keeps the
        # last range in it).
        self._dirty = array("q")
        self._recent: list[int] = []
        self._dirty_end = -1  # the end of the last range (a write starting there extends it); -1: none
        self._limit = os.fstat(self.fd).st_size  # writes never grow the file (resize does)
        self.bytes_written = 0
        self.bytes_read = 0
        self.punched = 0
        self.punches_skipped = 0
        self._seek_data = True  # the filesystem answers SEEK_DATA (cleared at the first EINVAL/EOPNOTSUPP)
        # every byte from here to the end of the file is known to be a hole (learnt from a SEEK_DATA that found
        # no data after an offset, moved up by every write and copy past it, down by a punch reaching it): a new
        # block past it needs no lseek. One integer whatever the file's size; only this process writes the file
        # (the pool's exclusive lock)
        self._hole_from = 1 << 63
        self._fast_end = self._limit  # min(_limit, _hole_from): a write ending at or below it checks nothing more

    def _set_fast_end(self) -> None:
        self._fast_end = min(self._limit, self._hole_from)

    def is_hole(self, offset: int, length: int) -> bool:
        """Whether [offset, offset+length) holds no data (one ``lseek(SEEK_DATA)``: O(1) in the file's size).
        False where the filesystem cannot tell (then a punch is always done)."""
        if offset >= self._hole_from:
            return True
        if not self._seek_data:
            return False
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data at or after offset
                self._hole_from = offset
                self._set_fast_end()
                return True
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                self._seek_data = False
                return False
            raise StoreIOError(what=self.path, op="seek", reason=e.strerror or str(e)) from e
        return data >= offset + length

    @property
    def dirty(self) -> list[tuple[int, int]]:
        """The [start, end) byte ranges written since the last successful ``sync`` (consecutive ones merged)."""
        d = self._dirty.tolist() + self._recent
        return list(zip(d[0::2], d[1::2]))

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

    def preadinto(self, offset: int, view: memoryview) -> None:
        """Read ``len(view)`` bytes at ``offset`` straight into ``view`` (a writable byte buffer); bytes past the
        end of the file read as zeros."""
        length = len(view)
        try:
            done = os.preadv(self.fd, [view], offset)  # one call reads it all (a short read only at the end)
            while 0 < done < length:
                n = os.preadv(self.fd, [view[done:]], offset + done)
                if n <= 0:
                    break
                done += n
        except OSError as e:
            raise StoreIOError(what=self.path, op="read", reason=e.strerror or str(e)) from e
        self.bytes_read += length
        if done < length:
            view[done:] = bytes(length - done)

    def preadinto_pieces(self, view: memoryview, pieces: list[list[int]]) -> None:
        """``preadinto`` of each [view offset, length, file offset] piece (file offsets >= 0) in one call: a
        read gathered from several places (a chunk read through a snapshot chain) pays one Python call, not one
        per piece. A short read (the end of the file) reads the rest as zeros, as ``preadinto``."""
        fd, preadv = self.fd, os.preadv
        total = 0
        try:
            for boff, n, off in pieces:
                piece = view[boff:boff + n]
                if preadv(fd, [piece], off) != n:
                    self.preadinto(off, piece)  # a short read: the careful path (it counts its bytes)
                    total -= n
                total += n
        except OSError as e:
            raise StoreIOError(what=self.path, op="read", reason=e.strerror or str(e)) from e
        finally:
            self.bytes_read += total

    def _mark_dirty(self, start: int, end: int) -> None:
        """Record [start, end) as written since the last sync (pwrite does the same inline); moves the hole tail."""
        if end > self._hole_from:
            self._hole_from = end
            self._set_fast_end()
        if start == self._dirty_end:
            self._recent[-1] = end
            self._dirty_end = end
        elif end > start:
            r = self._recent
            r.append(start)
            r.append(end)
            self._dirty_end = end
            if len(r) >= _DIRTY_FOLD:
                self._fold_dirty()

    def _fold_dirty(self) -> None:
        """Pack the recent dirty ranges but the last into the array (one struct.pack: no per-number parsing)."""
        r = self._recent
        k = len(r) - 2
        self._dirty.frombytes(struct.pack(f"={k}q", *r[:k]))
        del r[:k]

    def _slow_end(self, end: int) -> None:
        """pwrite's checks for a write ending past _fast_end: the file's end (raises there), the hole tail."""
        if end > self._limit:
            self._check_limit(end)
        if end > self._hole_from:
            self._hole_from = end
        self._set_fast_end()

    def _check_limit(self, end: int) -> None:
        """A write past the end of the data file means a mapping beyond the data device (corrupt metadata, or a
        hostile pool): refused instead of silently growing the file (dm-thin would hit the device's end)."""
        if end > self._limit:
            self._limit = max(self._limit, self.size)  # another process may have grown it (grow_data_file)
            self._set_fast_end()
            if end > self._limit:
                raise StoreIOError(what=self.path, op="write", reason=f"offset {end} is past the end of the data "
                                   f"file ({self._limit} bytes): a mapping beyond the data device (run check)")

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (never past the end of the file: see _check_limit).

        A write longer than PIECE_BYTES is made as one pwrite per piece between multiples of PIECE_BYTES, as
        dm-thin splits a bio at block boundaries. The page cache sizes a new folio by the write that creates it
        (ext4 with large folios, Linux 6.16 on: a 1 MiB pwrite makes one 1 MiB folio), and a later 4 KiB write
        into a folio walks every block of it: ~6 us a 4 KiB pwrite into a 1 MiB folio against ~2 us into a
        64 KiB one (measured on 6.18). In pieces, no folio spans two chunks and a 4 KiB overwrite after a large
        write costs what it costs after 64 KiB writes. A short write is retried for the rest, so a full disk
        ends as ENOSPC (HostNoSpace), not as a short count.

        Raises:
            HostNoSpace: the host filesystem is full (ENOSPC, EDQUOT).
            StoreIOError: any other failure, or a write past the end of the file.
        """
        # the 4 KiB overwrite's path: the file's end and the known-hole tail one comparison (_slow_end has the
        # checks), the dirty range _mark_dirty's steps inline
        if data.__class__ is memoryview and (data.itemsize != 1 or data.ndim != 1 or not data.c_contiguous):
            data = data.cast("B") if data.c_contiguous else data.tobytes()  # so that len() counts bytes
        n = len(data)
        end = offset + n
        if end > self._fast_end:
            self._slow_end(end)
        if offset == self._dirty_end:
            self._recent[-1] = end
            self._dirty_end = end
        elif n:
            r = self._recent
            r.append(offset)
            r.append(end)
            self._dirty_end = end
            if len(r) >= _DIRTY_FOLD:
                self._fold_dirty()
        try:
            if n > PIECE_BYTES:
                self._pwrite_pieces(offset, data, end)
            elif (done := _pwrite(self.fd, data, offset)) != n:
                self._pwrite_rest(offset, data, done)
        except StoreIOError:  # a short write (an OSError too): already typed
            raise
        except OSError as e:
            raise _io_error(e, self.path, "write") from e
        self.bytes_written += n

    def _pwrite_pieces(self, offset: int, data: bytes | bytearray | memoryview, end: int) -> None:
        """The pwrites of a write longer than PIECE_BYTES: one per piece between multiples of PIECE_BYTES."""
        fd, step = self.fd, PIECE_BYTES
        with memoryview(data) as view:
            pos = offset
            stop = offset - offset % step + step
            i = 0
            while pos < end:
                if stop > end:
                    stop = end
                k = stop - pos
                piece = view[i:i + k]
                if (done := _pwrite(fd, piece, pos)) != k:
                    self._pwrite_rest(pos, piece, done)
                i += k
                pos = stop
                stop += step

    def _pwrite_rest(self, offset: int, data: bytes | bytearray | memoryview, done: int) -> None:
        """After a pwrite at ``offset`` that wrote only ``done`` bytes of ``data``: write the rest. A full disk
        then fails with ENOSPC (raised as OSError, which pwrite turns into HostNoSpace); no progress at all is
        a short write (StoreIOError)."""
        with memoryview(data) as view:
            n = len(view)
            while done < n:
                k = _pwrite(self.fd, view[done:], offset + done)
                if k <= 0:
                    raise StoreIOError(what=self.path, op="write", reason="short write")
                done += k

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy [src, src+length) to dst inside the file (copy_file_range: in the kernel, no round trip through
        Python; pread + pwrite where the filesystem cannot). The ranges must not overlap."""
        if length:
            self._check_limit(dst + length)
            self._mark_dirty(dst, dst + length)
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(self.fd, self.fd, length - done, src + done, dst + done)
                if n <= 0:
                    break
                done += n
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise HostNoSpace(what=self.path, op="copy") from e
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise StoreIOError(what=self.path, op="copy", reason=e.strerror or str(e)) from e
        if done < length:  # no copy_file_range here (or EOF inside the range): copy the rest by hand
            self.pwrite(dst + done, self.pread(src + done, length - done))
        else:
            self.bytes_written += length
            self.bytes_read += length

    def punch(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros: a hole where the filesystem can, written zeros elsewhere."""
        if length <= 0:
            return
        ch = self.chunk_bytes
        if offset % ch == 0 and length % ch == 0 and self.is_hole(offset, length):
            self.punches_skipped += 1
            return
        self._mark_dirty(offset, offset + length)
        if punch_hole(self.fd, offset, length):
            self.punched += length
            if offset + length >= self._hole_from:  # the hole tail now starts at this hole
                self._hole_from = offset
                self._set_fast_end()
        else:
            self.pwrite(offset, bytes(length))

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise _io_error(e, self.path, "fdatasync") from e
        del self._dirty[:]
        self._recent.clear()
        self._dirty_end = -1

    def resize(self, size: int) -> None:
        """Grow the file to ``size`` bytes (never shrinks it: another process may have grown it meanwhile)."""
        old = self.size
        if size <= old:
            self._limit = max(self._limit, size)
            self._set_fast_end()
            return
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise _io_error(e, self.path, "resize") from e
        self._limit = size
        self._set_fast_end()

    def close(self) -> None:
        if self.fd >= 0:
            self._closer.detach()
            os.close(self.fd)
            self.fd = -1
