"""A two-level B-tree keyed by (dev_id, block): the dm-thin mapping tree.

Layer: btree. May import: thinpool.errors, thinpool.btree.

The top level maps dev_id -> the root of that device's tree; the bottom level maps a thin block -> a value
(block_time). The kernel builds it from dm_btree_info with levels = 2; here two BTrees share one node cache. A
change to a device's tree shadows the top-level path to its dev_id first, then the device's own path, and stores
the new subtree root in place (no reference moves: the top-level entry keeps holding the one reference).

Writable leaves (``insert``): once an insert has shadowed the path to a leaf, a later insert into that leaf in the
same transaction would shadow nothing (every node on the path is dirty with one reference: shadowing returns it
as it is) and change nothing but the leaf. So each device keeps the leaves its inserts left writable, with the
key range each one answers for (BTree.insert_leaf), stamped with the transaction manager's sharing generation
(tx/transaction.py ``share_gen``) and the two roots. An insert of a key in such a range, at the same generation
and roots, overwrites the key in the leaf or adds it while the leaf has room, as the full path would, without
the descent and its reference-count reads; anything else takes the full path. The generation changes on every
reference added to a metadata block (snapshots, held roots, copies of shared nodes), every block freed, every
split, merge, rebalance or removal, commit and abort, so no kept leaf outlives the conditions that made it
writable.

Why that is enough: a node on a kept path was dirty with count 1 when kept. Its count can rise only through
``tm.inc`` (create_snap, reserve_metadata_snap, the subtree roots of a copied top-level leaf) or ``inc_children``
of a copied shared node, and a shared node above a kept node would have needed an ``inc`` first; it can drop
(to 0, freed) only when the tree loses it (merge, removal, delete); it stops being dirty only at commit or
abort. Each of these moves the generation. Internal separator keys change only through splits, merges and
rebalancing (which move it) and through an insert below a node's first key, which only widens the range of its
leftmost leaf, so a kept range stays inside the leaf's true range. The metadata also drops every kept leaf at
commit and abort, and a device's own at insert_run, remove_range and any change of the device table.

    device 1: gen 7, roots (top 40, sub 52)   [0, 4410) -> leaf 53   [4410, 8822) -> leaf 61   ...
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from thinpool.btree.btree import BTree

if TYPE_CHECKING:
    import numpy as np

    from thinpool.btree.node import Node

HOT_LEAVES_MAX = 4096  # writable leaves kept per device (about 1M mappings' worth) before it starts over


class _Hot:
    """The writable leaves of one device's tree (see the module docstring)."""

    __slots__ = ("gen", "root", "sub", "starts", "ends", "leaves")

    def __init__(self, gen: int, root: int, sub: int) -> None:
        self.gen = gen
        self.root = root  # the top-level root and the device's subtree root they were found under
        self.sub = sub
        self.starts: list[int] = []  # key ranges [starts[i], ends[i]) -> leaves[i]; sorted, disjoint
        self.ends: list[int] = []
        self.leaves: list[Node] = []


class TwoLevelTree:
    """(dev_id, key) -> value over ``top`` (values: subtree roots) and ``bottom`` (the devices' trees)."""

    def __init__(self, top: BTree, bottom: BTree) -> None:
        self.top = top
        self.bottom = bottom
        self.tm = bottom.tm
        vt = bottom.vt
        # an overwritten value's reference, dropped: the value type's dec_one where it has one (MappingValue)
        self._dec_one: Callable[[Any], None] = getattr(vt, "dec_one", None) or (lambda v: vt.dec([v]))
        self._hot: dict[int, _Hot] = {}
        self.full_inserts = 0  # inserts that took the full path (tests and benchmarks count them)

    def subtree(self, root: int, dev_id: int) -> int | None:
        """The root of ``dev_id``'s tree, or None."""
        v = self.top.lookup(root, dev_id)
        return None if v is None else int(v)

    def lookup(self, sub_root: int, key: int) -> Any | None:
        """The value at ``key`` in the device tree ``sub_root`` (callers keep subtree roots at hand)."""
        return self.bottom.lookup(sub_root, key)

    def lookup_range(self, sub_root: int, lo: int, hi: int | None) -> tuple[np.ndarray, np.ndarray]:
        return self.bottom.lookup_range(sub_root, lo, hi)

    def insert(self, root: int, dev_id: int, key: int, value: Any, sub: int | None = None) -> tuple[int, int, bool]:
        """Insert or overwrite (dev_id, key). Returns (new top root, new subtree root, whether the key is new).
        In a kept writable leaf (module docstring) when it can (``sub``: the device's subtree root as the caller
        knows it, which that leaf must have been found under); otherwise the full path, which then keeps the
        leaf it left writable.

        Raises:
            KeyError: ``dev_id`` has no tree.
        """
        h = self._hot.get(dev_id)
        if h is not None and h.gen == self.tm.share_gen and h.root == root and (sub is None or h.sub == sub):
            j = bisect_right(h.starts, key) - 1
            if j >= 0 and key < h.ends[j]:
                leaf = h.leaves[j]
                keys = leaf.keys
                i = bisect_right(keys, key)
                if i and keys[i - 1] == key:  # an overwrite (a remap: copy-on-write)
                    vals = leaf.values
                    old = vals[i - 1]
                    vals[i - 1] = value
                    self._dec_one(old)
                    return root, h.sub, False
                if len(keys) < leaf.max_entries:
                    keys.insert(i, key)
                    leaf.values.insert(i, value)
                    return root, h.sub, True
        return self._insert_full(root, dev_id, key, value, h)

    def _insert_full(self, root: int, dev_id: int, key: int, value: Any, h: _Hot | None) -> tuple[int, int, bool]:
        """``insert`` through the top-level path and the device's tree (BTree.update, BTree.insert)."""
        self.full_inserts += 1
        out: list[tuple[bool, Node | None, int, int]] = []

        def f(sub: Any) -> int:
            new_sub, is_new, leaf, lo, hi = self.bottom.insert_leaf(int(sub), key, value)
            out.append((is_new, leaf, lo, hi))
            return new_sub

        # (top.update shadows the top-level path, BTree.insert_leaf the device's: every node on both is then dirty
        # with one reference, see BTree._insert_descent)
        root, new_sub = self.top.update(root, dev_id, f)
        new_sub = int(new_sub)
        is_new, leaf, lo, hi = out[0]
        if leaf is not None:
            self._keep(root, dev_id, new_sub, leaf, lo, hi, h)
        return root, new_sub, is_new

    def _keep(self, root: int, dev_id: int, sub: int, leaf: Node, lo: int, hi: int, h: _Hot | None) -> None:
        """After a full insert: keep the leaf it left writable, answering for [lo, hi), for later inserts."""
        gen = self.tm.share_gen
        if h is None or h.gen != gen or h.root != root or h.sub != sub or len(h.leaves) >= HOT_LEAVES_MAX:
            h = self._hot[dev_id] = _Hot(gen, root, sub)
        starts, ends, leaves = h.starts, h.ends, h.leaves
        j = bisect_right(starts, lo)
        # a range kept earlier for this leaf may have grown since (an insert below its parent's first key lowers
        # it): ranges of different leaves never overlap, so an overlapping one is this leaf's and is replaced
        while j > 0 and ends[j - 1] > lo:
            j -= 1
            del starts[j], ends[j], leaves[j]
        while j < len(starts) and starts[j] < hi:
            del starts[j], ends[j], leaves[j]
        starts.insert(j, lo)
        ends.insert(j, hi)
        leaves.insert(j, leaf)

    def forget(self, dev_id: int | None = None) -> None:
        """Drop the kept writable leaves of ``dev_id`` (every device's when None: the metadata does at every commit
        and abort, so no leaf is held past its transaction)."""
        if dev_id is None:
            self._hot.clear()
        else:
            self._hot.pop(dev_id, None)

    def insert_run(self, root: int, dev_id: int, keys: list[int], values: list[Any]) -> tuple[int, int, int]:
        """Insert or overwrite (dev_id, k) for sorted, unique ``keys``: the top-level path is shadowed once and the
        device's tree gets ``BTree.insert_run``. Returns (new top root, new subtree root, number of new keys).

        Raises:
            KeyError: ``dev_id`` has no tree.
        """
        self._hot.pop(dev_id, None)
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
        self._hot.pop(dev_id, None)
        out: list[int] = []

        def f(sub: Any) -> int:
            new_sub, n = self.bottom.remove_range(int(sub), lo, hi)
            out.append(n)
            return new_sub

        root, new_sub = self.top.update(root, dev_id, f)
        return root, int(new_sub), out[0]
