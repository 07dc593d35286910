"""The protocols the transaction manager and the B-tree are written against: space maps and value types.

Layer: tx. May import: nothing from thinpool.

Mirrors the kernel's dm-space-map.h and dm_btree_value_type. The concrete space maps (spacemap/core.py,
spacemap/disk.py) sit above the transaction manager and the B-tree, which need them; they are injected when a
pool is opened, as dm_tm_create_with_sm does, so ``tx`` never imports them.
"""

from __future__ import annotations

from typing import Any, Protocol


class SpaceMap(Protocol):
    """Reference counts of one block space, with allocation (kernel struct dm_space_map).

    Rules every implementation keeps (dm-space-map.h):
    - ``new_block`` returns a block whose count is 0 now *and* at the last commit, and sets its count to 1: a
      block freed in this transaction is never handed out before the commit, so everything the last committed
      superblock reaches stays intact until the next superblock is written.
    - ``dec`` of a block whose count is 0 raises MetadataCorrupt (never wraps).
    - ``commit`` makes the current counts the ones ``new_block`` protects; ``abort`` returns to them.
    """

    @property
    def nr_blocks(self) -> int:
        """Blocks the map covers."""
        ...

    def count(self, b: int) -> int:
        """The reference count of block ``b`` (O(1))."""
        ...

    def inc(self, b: int, n: int = 1) -> None:
        """Add ``n`` references to block ``b``."""
        ...

    def dec(self, b: int) -> int:
        """Drop one reference to block ``b``; returns the new count."""
        ...

    def new_block(self) -> int:
        """Allocate a free block (count 0 now and at the last commit); its count becomes 1.

        Raises:
            NoSpace (NoMetadataSpace or NoDataSpace) when no block is free.
        """
        ...

    def nr_allocated(self) -> int:
        """Blocks with a non-zero count."""
        ...

    def commit(self) -> None:
        """The current counts become the committed ones."""
        ...

    def abort(self) -> None:
        """Return to the counts of the last commit."""
        ...


class ValueType(Protocol):
    """How a B-tree's leaf values hold references (kernel struct dm_btree_value_type).

    The B-tree calls ``inc`` when a shared leaf is copied (each copied value now has one more holder) and ``dec``
    when values leave the tree (removed or overwritten entries, leaves of a deleted tree). Both take a sequence of
    values (an ``array('Q')``/``array('I')`` slice or a list of bytes), never a node.
    """

    size: int  # bytes per value on disk

    def inc(self, values: Any) -> None:
        """Add a reference for every value in ``values``."""
        ...

    def dec(self, values: Any) -> None:
        """Drop the reference held by every value in ``values``."""
        ...


class BlockClient(Protocol):
    """Something that keeps decoded blocks of a transaction manager (the B-tree's node cache).

    The transaction manager tells its clients when a block is freed or reallocated (so no stale copy survives),
    when a transaction commits and when it aborts.
    """

    def forget(self, b: int) -> None:
        """Block ``b`` was freed or handed out again: drop anything cached for it."""
        ...

    def committed(self) -> None:
        """The transaction committed: dirty blocks are now clean."""
        ...

    def aborted(self) -> None:
        """The transaction was aborted: dirty blocks are gone."""
        ...
