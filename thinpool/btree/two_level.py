"""A two-level B-tree keyed by (dev_id, block): the dm-thin mapping tree.

Layer: btree. May import: thinpool.errors, thinpool.btree.

The top level maps dev_id -> the root of that device's tree; the bottom level maps a thin block -> a value
(block_time). The kernel builds it from dm_btree_info with levels = 2; here two BTrees share one node cache. A
change to a device's tree shadows the top-level path to its dev_id first, then the device's own path, and stores
the new subtree root in place (no reference moves: the top-level entry keeps holding the one reference).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from thinpool.btree.btree import BTree

if TYPE_CHECKING:
    import numpy as np


class TwoLevelTree:
    """(dev_id, key) -> value over ``top`` (values: subtree roots) and ``bottom`` (the devices' trees)."""

    def __init__(self, top: BTree, bottom: BTree) -> None:
        self.top = top
        self.bottom = bottom

    def subtree(self, root: int, dev_id: int) -> int | None:
        """The root of ``dev_id``'s tree, or None."""
        v = self.top.lookup(root, dev_id)
        return None if v is None else int(v)

    def lookup(self, sub_root: int, key: int) -> Any | None:
        """The value at ``key`` in the device tree ``sub_root`` (callers keep subtree roots at hand)."""
        return self.bottom.lookup(sub_root, key)

    def lookup_range(self, sub_root: int, lo: int, hi: int | None) -> tuple[np.ndarray, np.ndarray]:
        return self.bottom.lookup_range(sub_root, lo, hi)

    def insert(self, root: int, dev_id: int, key: int, value: Any) -> tuple[int, int, bool]:
        """Insert or overwrite (dev_id, key). Returns (new top root, new subtree root, whether the key is new).

        Raises:
            KeyError: ``dev_id`` has no tree.
        """
        out: list[bool] = []

        def f(sub: Any) -> int:
            new_sub, is_new = self.bottom.insert(int(sub), key, value)
            out.append(is_new)
            return new_sub

        root, new_sub = self.top.update(root, dev_id, f)
        return root, int(new_sub), out[0]

    def insert_run(self, root: int, dev_id: int, keys: list[int], values: list[Any]) -> tuple[int, int, int]:
        """Insert or overwrite (dev_id, k) for sorted, unique ``keys``: the top-level path is shadowed once and the
        device's tree gets ``BTree.insert_run``. Returns (new top root, new subtree root, number of new keys).

        Raises:
            KeyError: ``dev_id`` has no tree.
        """
        out: list[int] = []

        def f(sub: Any) -> int:
            new_sub, nr_new = self.bottom.insert_run(int(sub), keys, values)
            out.append(nr_new)
            return new_sub

        root, new_sub = self.top.update(root, dev_id, f)
        return root, int(new_sub), out[0]

    def remove_range(self, root: int, dev_id: int, lo: int, hi: int) -> tuple[int, int, int]:
        """Remove (dev_id, k) for lo <= k < hi. Returns (new top root, new subtree root, number removed).
        Nothing is shadowed when no key is in the range.

        Raises:
            KeyError: ``dev_id`` has no tree.
        """
        sub = self.subtree(root, dev_id)
        if sub is None:
            raise KeyError(dev_id)
        if not len(self.bottom.lookup_range(sub, lo, hi)[0]):
            return root, sub, 0
        out: list[int] = []

        def f(sub: Any) -> int:
            new_sub, n = self.bottom.remove_range(int(sub), lo, hi)
            out.append(n)
            return new_sub

        root, new_sub = self.top.update(root, dev_id, f)
        return root, int(new_sub), out[0]
