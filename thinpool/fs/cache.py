"""A write-back cache of file system metadata blocks (inode tables, directories, indirect blocks).

Layer: fs. May import: thinpool.io.device, thinpool.errors.

File data never goes through this cache: it is read and written straight on the device. The one rule that keeps the
two paths apart: when a block is freed (or handed out for file data) it is dropped from the cache, so a stale dirty
copy can never overwrite data later written to the same block.

Blocks made with :meth:`BlockCache.new` are *fresh*: allocated since the last commit, so free in the committed file
system and safe to write at any time. Every other dirty block overwrites committed metadata in place, so it is only
written by the flush (after the space for it is reserved), never by eviction: a failed operation that is aborted
before its flush leaves no metadata block half-updated.
"""

from __future__ import annotations

from collections import OrderedDict

from thinpool.io.device import BlockDevice

MAX_CLEAN_BLOCKS = 8192  # 32 MiB of clean 4 KiB blocks kept for re-reads
MAX_DIRTY_BLOCKS = 16384  # written back (without a device flush) beyond this many dirty blocks


class BlockCache:
    """Blocks by number; ``get`` returns a mutable buffer, ``mark_dirty`` schedules it for ``write_back``."""

    def __init__(self, device: BlockDevice, block_size: int) -> None:
        self.device = device
        self.block_size = block_size
        self._blocks: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: set[int] = set()
        self._fresh: set[int] = set()  # allocated since the last commit (see the module docstring)

    def get(self, block: int) -> bytearray:
        """The cached contents of ``block`` (read from the device on a miss)."""
        buf = self._blocks.get(block)
        if buf is None:
            buf = bytearray(self.device.read(block * self.block_size, self.block_size))
            self._blocks[block] = buf
            self._evict()
        return buf

    def get_many(self, first: int, count: int) -> list[bytearray]:
        """``count`` consecutive blocks from ``first``, reading all missing ones with one device read."""
        if all(b in self._blocks for b in range(first, first + count)):
            return [self._blocks[b] for b in range(first, first + count)]
        data = self.device.read(first * self.block_size, count * self.block_size)
        out = []
        bs = self.block_size
        for i in range(count):
            b = first + i
            buf = self._blocks.get(b)
            if buf is None:
                buf = bytearray(data[i * bs:(i + 1) * bs])
                self._blocks[b] = buf
            out.append(buf)
        self._evict()
        return out

    def new(self, block: int) -> bytearray:
        """A zero-filled dirty buffer for a freshly allocated metadata block (nothing is read)."""
        buf = bytearray(self.block_size)
        self._blocks[block] = buf
        self._dirty.add(block)
        self._fresh.add(block)
        self._evict()
        return buf

    def mark_dirty(self, block: int) -> None:
        self._dirty.add(block)

    def drop(self, block: int) -> None:
        """Forget ``block`` without writing it (it was freed or now holds file data)."""
        self._blocks.pop(block, None)
        self._dirty.discard(block)
        self._fresh.discard(block)

    def write_fresh(self) -> None:
        """Write every dirty fresh block (free in the committed file system, so harmless if the operation fails)."""
        self._write([b for b in self._dirty if b in self._fresh])

    def dirty_in_place(self) -> list[int]:
        """The dirty blocks that overwrite committed metadata, sorted (what the flush must reserve first)."""
        return sorted(b for b in self._dirty if b not in self._fresh)

    def write_back(self) -> None:
        """Write every dirty block, merging runs of consecutive blocks into one device write."""
        self._write(list(self._dirty))

    def committed(self) -> None:
        """The device committed: every block is now part of the committed file system."""
        self._fresh.clear()

    def _write(self, blocks: list[int]) -> None:
        if not blocks:
            return
        bs = self.block_size
        order = sorted(blocks)
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and order[end] == order[end - 1] + 1:
                end += 1
            first = order[start]
            if end - start == 1:
                self.device.write(first * bs, self._blocks[first])
            else:
                self.device.write(first * bs, b"".join(self._blocks[b] for b in order[start:end]))
            start = end
        self._dirty.difference_update(order)

    def invalidate(self) -> None:
        """Drop every clean block (dirty ones are kept)."""
        for b in [b for b in self._blocks if b not in self._dirty]:
            del self._blocks[b]

    def _evict(self) -> None:
        if len(self._dirty) > MAX_DIRTY_BLOCKS:
            self.write_fresh()  # blocks overwriting committed metadata wait for the flush
        excess = len(self._blocks) - MAX_CLEAN_BLOCKS - len(self._dirty)
        if excess <= 0:
            return
        # oldest first; dirty blocks are rotated to the back (there are at least ``excess`` clean ones)
        while excess > 0:
            b = next(iter(self._blocks))
            if b in self._dirty:
                self._blocks.move_to_end(b)
            else:
                del self._blocks[b]
                excess -= 1
