"""Metadata block stores: an array of 4 KiB blocks on a file (pread/pwrite) or in memory.

Layer: io. May import: thinpool.errors, thinpool.units.

Stores know nothing of checksums or caching; the transaction manager validates and caches. ``OSError`` never
leaves this module: it becomes StoreIOError. Fault-injecting stores (tests, crash enumeration) wrap a store and
override ``write_block``/``sync``.
"""

from __future__ import annotations

import errno
import os
import weakref
from typing import Protocol

from thinpool.errors import HostNoSpace, MetadataCorrupt, StoreIOError
from thinpool.units import METADATA_BLOCK_SIZE

try:
    _IOV_MAX = max(1, min(int(os.sysconf("SC_IOV_MAX")), 1024))
except (ValueError, OSError):
    _IOV_MAX = 16

BS = METADATA_BLOCK_SIZE


class BlockStore(Protocol):
    @property
    def nr_blocks(self) -> int: ...

    def read_block(self, b: int) -> bytes: ...

    def write_block(self, b: int, data: bytes | bytearray) -> None: ...

    def sync(self) -> None: ...

    def grow(self, nr_blocks: int) -> None: ...

    def close(self) -> None: ...


class MemoryBlockStore:
    """Blocks in a dict (absent = zeros)."""

    def __init__(self, nr_blocks: int) -> None:
        self._nr = nr_blocks
        self.blocks: dict[int, bytes] = {}
        self.writes = 0
        self.syncs = 0

    @property
    def nr_blocks(self) -> int:
        return self._nr

    def read_block(self, b: int) -> bytes:
        if not 0 <= b < self._nr:
            raise MetadataCorrupt(block=b, reason=f"block number beyond the metadata device ({self._nr} blocks)")
        return self.blocks.get(b, bytes(BS))

    def write_block(self, b: int, data: bytes | bytearray) -> None:
        assert len(data) == BS and 0 <= b < self._nr
        self.writes += 1
        self.blocks[b] = bytes(data)

    def sync(self) -> None:
        self.syncs += 1

    def grow(self, nr_blocks: int) -> None:
        self._nr = max(self._nr, nr_blocks)

    def close(self) -> None:
        pass


class FileBlockStore:
    """Blocks of a file or block device; a trailing partial block is ignored (as the tools do)."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, pool_file: bool = False) -> None:
        """``pool_file``: the metadata file of a pool directory, opened without following a symlink and only if
        it is a regular file (UnsafePoolFile otherwise); a bare metadata file or device named by the user is
        opened as given."""
        from thinpool.io.safe_open import open_pool_file

        self.path = os.fspath(path)
        self.readonly = readonly
        flags = os.O_RDONLY if readonly else os.O_RDWR
        try:
            self._fd = open_pool_file(self.path, flags) if pool_file else os.open(self.path, flags)
            # a store dropped without close() still closes its descriptor when it is collected (as a Python file
            # does), so code that forgets close() cannot run the process out of descriptors
            self._closer = weakref.finalize(self, os.close, self._fd)
            size = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as e:
            raise StoreIOError(what=self.path, op="open", reason=e.strerror or str(e)) from e
        self._nr = size // BS
        self.writes = 0

    @property
    def nr_blocks(self) -> int:
        return self._nr

    def read_block(self, b: int) -> bytes:
        if not 0 <= b < self._nr:
            raise MetadataCorrupt(block=b, reason=f"block number beyond the metadata device ({self._nr} blocks)")
        try:
            data = os.pread(self._fd, BS, b * BS)
        except OSError as e:
            raise StoreIOError(what=self.path, op=f"read of block {b}", reason=e.strerror or str(e)) from e
        if len(data) != BS:
            raise StoreIOError(what=self.path, op=f"read of block {b}", reason="short read")
        return data

    def write_block(self, b: int, data: bytes | bytearray) -> None:
        try:
            n = os.pwrite(self._fd, data, b * BS)
        except OSError as e:
            raise _io_error(e, self.path, f"write of block {b}") from e
        if n != BS:
            raise StoreIOError(what=self.path, op=f"write of block {b}", reason="short write")
        self.writes += 1

    @classmethod
    def writes_runs(cls) -> bool:
        """Whether ``write_run`` may stand for ``write_block`` calls: not in a subclass that overrides
        ``write_block`` (to count or redirect writes) without its own ``write_run``."""
        return cls.write_block is FileBlockStore.write_block and cls.write_run is FileBlockStore.write_run

    def write_run(self, b: int, datas: list[bytes | bytearray]) -> None:
        """Write consecutive blocks ``b``, ``b + 1``, ... in one ``pwritev`` (split at IOV_MAX buffers; a short
        write is continued)."""
        step = _IOV_MAX
        for at in range(0, len(datas), step):
            part = datas[at:at + step]
            first = b + at
            views = [memoryview(d) for d in part]
            want = len(part) * BS
            done = 0
            while done < want:
                try:
                    n = os.pwritev(self._fd, views, first * BS + done)
                except OSError as e:
                    raise _io_error(e, self.path, f"write of blocks {first}-{first + len(part) - 1}") from e
                if n <= 0:
                    raise StoreIOError(what=self.path, op=f"write of block {first + done // BS}",
                                       reason="short write")
                done += n
                while views and n >= len(views[0]):  # drop the buffers written, cut into a partly written one
                    n -= len(views[0])
                    views.pop(0)
                if n:
                    views[0] = views[0][n:]
            self.writes += len(part)

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise _io_error(e, self.path, "fsync") from e

    def grow(self, nr_blocks: int) -> None:
        if nr_blocks > self._nr:
            try:
                os.ftruncate(self._fd, nr_blocks * BS)
            except OSError as e:
                raise _io_error(e, self.path, "grow") from e
            self._nr = nr_blocks

    def close(self) -> None:
        if self._fd >= 0:
            self._closer.detach()
            os.close(self._fd)
            self._fd = -1


def _io_error(e: OSError, what: str, op: str) -> StoreIOError:
    """The typed error for a failed write or sync: a full host filesystem is no space (HostNoSpace), not EIO."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return HostNoSpace(what=what, op=op)
    return StoreIOError(what=what, op=op, reason=e.strerror or str(e))
