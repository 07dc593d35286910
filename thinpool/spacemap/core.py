"""In-core reference counts for one space map (metadata or data blocks), with the allocation rule.

Layer: spacemap. May import: thinpool.errors.

The on-disk form (bitmaps + index + ref-count tree, see spacemap/disk.py) is loaded into a numpy uint32 array at
open and written back at commit. ``committed`` is the array as of the last commit: a block whose committed count
is non-zero is never handed out, so nothing the last committed superblock can reach is overwritten before the
next commit (the kernel's rule that a block freed in a transaction is not reused in it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from thinpool.errors import MetadataCorrupt, NoDataSpace, NoMetadataSpace, ReadOnly
from thinpool.units import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

_BATCH = 4096


class CoreSpaceMap:
    """Reference counts for ``nr_blocks`` blocks."""

    def __init__(self, nr_blocks: int, *, kind: str, counts: np.ndarray | None = None) -> None:
        self.kind = kind
        self.counts = np.zeros(nr_blocks, dtype=np.uint32) if counts is None else counts.astype(np.uint32)
        self.committed = self.counts.copy()
        self._candidates: list[int] = []
        self._cursor = 0
        self.freed: set[int] = set()  # blocks whose count dropped to 0 in this transaction
        self.changed = False  # any count changed since the last commit (an empty commit is skipped)

    @property
    def nr_blocks(self) -> int:
        return len(self.counts)

    def count(self, b: int) -> int:
        # ndarray.item: a Python int without a numpy scalar in between (2x faster; on every shadow).
        return self.counts.item(b)

    def nr_allocated(self) -> int:
        return int(np.count_nonzero(self.counts))

    def nr_free(self) -> int:
        return self.nr_blocks - self.nr_allocated()

    def inc(self, b: int, n: int = 1) -> None:
        self.counts[b] += n
        self.changed = True

    def dec(self, b: int) -> int:
        c = int(self.counts[b])
        if c == 0:
            raise MetadataCorrupt(block=b if self.kind == "metadata" else None,
                                  reason=f"{self.kind} block {b}: reference count would go below zero")
        self.counts[b] = c - 1
        self.changed = True
        if c == 1:
            self.freed.add(b)
        return c - 1

    def inc_many(self, blocks: np.ndarray) -> None:
        np.add.at(self.counts, blocks, 1)
        self.changed = True

    def dec_many(self, blocks: np.ndarray) -> None:
        uniq, times = np.unique(blocks, return_counts=True)
        cur = self.counts[uniq]
        if (cur < times).any():
            bad = int(uniq[np.argmax(cur < times)])
            raise MetadataCorrupt(block=None, reason=f"{self.kind} block {bad}: reference count would go below zero")
        self.counts[uniq] = cur - times.astype(np.uint32)
        self.changed = True
        self.freed.update(int(x) for x in uniq[self.counts[uniq] == 0])

    def is_free_for_alloc(self, b: int) -> bool:
        return bool(self.counts[b] == 0 and self.committed[b] == 0)

    def new_block(self) -> int:
        """Allocate a block (count 0 now and at the last commit); its count becomes 1."""
        while True:
            while self._candidates:
                b = self._candidates.pop()
                if self.counts[b] == 0 and self.committed[b] == 0:
                    self.counts[b] = 1
                    self.changed = True
                    return b
            self._refill()

    def _refill(self) -> None:
        n = self.nr_blocks
        free = (self.counts == 0) & (self.committed == 0)
        idx = np.flatnonzero(free[self._cursor:])
        if idx.size:
            idx = idx[:_BATCH] + self._cursor
        else:
            idx = np.flatnonzero(free[:self._cursor])[:_BATCH]
        if not idx.size:
            raise (NoMetadataSpace() if self.kind == "metadata" else NoDataSpace())
        self._cursor = int(idx[-1]) + 1
        if self._cursor >= n:
            self._cursor = 0
        self._candidates = idx[::-1].tolist()

    def has_free(self, n: int) -> bool:
        """Whether ``n`` blocks can be allocated now (cheap when the candidate batch covers it)."""
        if n <= len(self._candidates):
            return True
        return self.nr_allocatable() >= n

    def nr_allocatable(self) -> int:
        return int(np.count_nonzero((self.counts == 0) & (self.committed == 0)))

    def extend(self, nr_blocks: int) -> None:
        if nr_blocks <= self.nr_blocks:
            return
        extra = nr_blocks - self.nr_blocks
        self.counts = np.concatenate([self.counts, np.zeros(extra, dtype=np.uint32)])
        self.committed = np.concatenate([self.committed, np.zeros(extra, dtype=np.uint32)])
        self._candidates = []
        self.changed = True

    def commit(self) -> None:
        self.committed = self.counts.copy()
        self._candidates = []
        self.freed = set()
        self.changed = False

    def abort(self) -> None:
        self.counts = self.committed.copy()
        self._candidates = []
        self.freed = set()
        self.changed = False


class RootSpaceMap:
    """A read-only open's metadata space map: its size and allocated count from the superblock's space-map root,
    no bitmap read (tx/api.py SpaceMap). Reference counts are not known: ``count`` and every change raise
    ReadOnly (only writes need them)."""

    def __init__(self, nr_blocks: int, nr_allocated: int, *, kind: str = "metadata") -> None:
        self._nr_blocks = nr_blocks
        self._nr_allocated = nr_allocated
        self.kind = kind
        self.changed = False
        self.freed: set[int] = set()

    @property
    def nr_blocks(self) -> int:
        return self._nr_blocks

    def nr_allocated(self) -> int:
        return self._nr_allocated

    def nr_free(self) -> int:
        return self._nr_blocks - self._nr_allocated

    def count(self, b: int) -> int:
        raise ReadOnly()

    def inc(self, b: int, n: int = 1) -> None:
        raise ReadOnly()

    def dec(self, b: int) -> int:
        raise ReadOnly()

    def new_block(self) -> int:
        raise ReadOnly()

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass
