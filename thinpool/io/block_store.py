"""Metadata block stores: an array of 4 KiB blocks on a file (pread/pwrite) or in memory.

Layer: io. May import: thinpool.errors, thinpool.units.

Stores know nothing of checksums or caching; the transaction manager validates and caches. ``OSError`` never
leaves this module: it becomes StoreIOError. Fault-injecting stores (tests, crash enumeration) wrap a store and
override ``write_block``/``sync``.
"""

from __future__ import annotations

import os
from typing import Protocol

from thinpool.errors import MetadataCorrupt, StoreIOError
from thinpool.units import METADATA_BLOCK_SIZE

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

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        try:
            self._fd = os.open(self.path, os.O_RDONLY if readonly else os.O_RDWR)
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
            raise StoreIOError(what=self.path, op=f"write of block {b}", reason=e.strerror or str(e)) from e
        if n != BS:
            raise StoreIOError(what=self.path, op=f"write of block {b}", reason="short write")
        self.writes += 1

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise StoreIOError(what=self.path, op="fsync", reason=e.strerror or str(e)) from e

    def grow(self, nr_blocks: int) -> None:
        if nr_blocks > self._nr:
            try:
                os.ftruncate(self._fd, nr_blocks * BS)
            except OSError as e:
                raise StoreIOError(what=self.path, op="grow", reason=e.strerror or str(e)) from e
            self._nr = nr_blocks

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
