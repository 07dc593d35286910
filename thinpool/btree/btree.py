"""Persistent copy-on-write B-tree in the dm-thin node layout: lookup, insert, remove with rebalancing,
ordered iteration, range lookup, highest key, bulk build and recursive delete.

Layer: btree. May import: thinpool.errors, thinpool.formats, thinpool.btree.node, thinpool.btree.spine,
thinpool.tx.

Callers see keys and values (ints, bytes, numpy arrays), never a node: nodes are read, cached and shadowed by
btree/spine.py. Value types (tx/api.py ValueType) are handed values, not nodes.

Every mutating call takes a root block and returns the (possibly new) root block; the old root stays intact
whenever it was shared (snapshots, held metadata roots), because every node on the path is shadowed first.

Shared nodes are reference-counted in the metadata space map; leaf values carry references of their own through
the tree's ``ValueType`` (data blocks for mapping leaves, subtree roots for the top level of the mapping tree).

Insertion splits full nodes on the way down (kernel btree_insert_raw), so a parent always has room:

    before:  [ root: full leaf of 252 ]      after:  [ root: internal ]
                                                       /            \\
                                             [leaf 126]          [leaf 126]

Removal rebalances on the way down so the child it descends into holds more than max_entries/3 entries
(kernel rebalance_children / __rebalance2): two siblings holding fewer than 2*(max/3 + 1) entries are merged,
otherwise their entries are split evenly. A root left with one child absorbs it. Every non-root node thus keeps
at least max_entries/3 entries, which thin_check requires.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from thinpool.btree.node import MAX_DEPTH, Node
from thinpool.btree.spine import NodeCache
from thinpool.btree.walk import walk_nodes
from thinpool.errors import MetadataCorrupt
from thinpool.formats.btree_node import calc_max_entries
from thinpool.tx.api import ValueType
from thinpool.tx.transaction import TransactionManager
from thinpool.units import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

__all__ = ["MAX_DEPTH", "BTree", "NoRefValue", "ValueType"]


_RUN_DEC_BATCH = 64  # insert_run hands overwritten values to ValueType.dec one by one up to this many
DELETE_BATCH_VALUES = 1 << 18  # leaf values handed to a batching value type's dec at once by delete() (~2 MB)


class NoRefValue:
    """Values that hold no references (details, ref counts, index entries)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def inc(self, values: Any) -> None:
        pass

    def dec(self, values: Any) -> None:
        pass


class BTree:
    """Operations on trees of one value type inside a transaction manager."""

    def __init__(self, tm: TransactionManager, vt: ValueType) -> None:
        self.tm = tm
        self.vt = vt
        self.value_size = vt.size
        self.leaf_max = calc_max_entries(vt.size)
        self.nodes = NodeCache.of(tm)
        # in-memory node arrays are in the machine's order (btree/node.py swaps at the block boundary)
        # a dtype name, not np.uint64: naming numpy here would load it for every tree (native order, as arrays)
        self._np_dtype: str | None = "u8" if vt.size == 8 else "u4" if vt.size == 4 else None

    # --- reading --------------------------------------------------------------------------------------------
    def _read(self, b: int) -> Node:
        return self.nodes.read(b, self.value_size)

    def lookup(self, root: int, key: int) -> Any | None:
        node = self._read(root)
        depth = 0
        while not node.is_leaf:
            i = bisect_right(node.keys, key) - 1
            if i < 0:
                return None
            depth += 1
            if depth > MAX_DEPTH:
                self._find_cycle(root, key)
            node = self._read(node.values[i])
        i = bisect_right(node.keys, key) - 1
        if i >= 0 and node.keys[i] == key:
            return node.values[i]
        return None

    def lookup_leaf(self, root: int, key: int) -> tuple[int, int, Any, Any]:
        """The leaf a ``lookup(root, key)`` ends in, as (lo, hi, keys, values): every lookup of a key in
        [lo, hi) ends in that same leaf, so for such a key the leaf's entries answer it (present, or absent).
        ``keys``/``values`` are the node's own arrays (read-only to the caller; a writable node may change them
        later: copy what is kept). When the descent stops above the leaves (``key`` is below an internal node's
        first key, which ``lookup`` answers with None), the range is that gap and the entries are empty.
        O(log n); what the per-device mapping cache (metadata/thin_device.py) fills from.
        """
        lo, hi = 0, 1 << 64
        node = self._read(root)
        depth = 0
        while not node.is_leaf:
            keys = node.keys
            i = bisect_right(keys, key) - 1
            if i < 0:  # below this node's first key: lookup says absent for the whole gap
                return lo, min(hi, keys[0]), (), ()
            if keys[i] > lo:
                lo = keys[i]
            if i + 1 < len(keys) and keys[i + 1] < hi:
                hi = keys[i + 1]
            depth += 1
            if depth > MAX_DEPTH:
                self._find_cycle(root, key)
            node = self._read(node.values[i])
        return lo, hi, node.keys, node.values

    def leaves(self, root: int, lo: int = 0, hi: int | None = None) -> Iterator[Node]:
        """Leaves in key order that may hold keys in [lo, hi) (through the one walker, btree/walk.py)."""
        for node, _ in walk_nodes(self.tm, root, value_size=self.value_size, lo=lo, hi=hi):
            yield node

    def items(self, root: int, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, Any]]:
        for leaf in self.leaves(root, lo, hi):
            for k, v in zip(leaf.keys, leaf.values):
                if k < lo:
                    continue
                if hi is not None and k >= hi:
                    return
                yield k, v

    def lookup_range(self, root: int, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All (keys, values) with lo <= key < hi as numpy arrays (uint64 keys; uint64 values for value_size 8,
        uint32 for 4; other value sizes are not supported here, use ``items``). Read-only copies.

        O(log n + k): a range inside one leaf costs one descent and two bisects (the common case for an I/O of
        a few chunks); a wider range walks the leaves it covers.
        """
        node = self._read(root)
        depth = 0
        while not node.is_leaf:
            keys = node.keys
            i = bisect_right(keys, lo) - 1
            if i < 0:
                i = 0
            if i + 1 < len(keys) and (hi is None or keys[i + 1] < hi):
                return self._range_walk(root, lo, hi)  # the range spans two children
            depth += 1
            if depth > MAX_DEPTH:
                self._find_cycle(root, lo)
            node = self._read(node.values[i])
        keys = node.keys
        a = bisect_left(keys, lo)
        b = len(keys) if hi is None else bisect_left(keys, hi)
        return self._leaf_arrays(node, a, b)

    def _leaf_arrays(self, node: Node, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self._np_dtype is None:
            raise TypeError(f"lookup_range needs 4- or 8-byte values, not {self.value_size}")
        k = np.frombuffer(node.keys, dtype=np.uint64)[a:b].copy()
        v = np.frombuffer(node.values, dtype=self._np_dtype)[a:b].copy()
        return k, v

    def _range_walk(self, root: int, lo: int, hi: int | None) -> tuple[np.ndarray, np.ndarray]:
        ks, vs = [], []
        for leaf in self.leaves(root, lo, hi):
            k, v = self._leaf_arrays(leaf, 0, len(leaf.keys))
            ks.append(k)
            vs.append(v)
        if not ks:
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=self._np_dtype or np.uint64)
        k = np.concatenate(ks)
        v = np.concatenate(vs)
        m = (k >= lo) if hi is None else ((k >= lo) & (k < hi))
        return k[m], v[m]

    def validate_node(self, b: int) -> None:
        """Read and validate node ``b`` of this tree (a cheap check of a root before trusting it).

        Raises:
            MetadataCorrupt / ChecksumError naming ``b``.
        """
        self._read(b)

    def node_arrays(self, b: int) -> tuple[bool, np.ndarray, np.ndarray]:
        """One validated node of this tree as (is_leaf, keys, values): uint64 keys; child block numbers (uint64)
        for an internal node, the leaf's values (uint64 / uint32) for a leaf. Read-only views; for walkers
        that need the tree's shape (btree/walk.py, the tools).

        Raises:
            MetadataCorrupt / ChecksumError naming ``b``.
        """
        node = self._read(b)
        keys = np.frombuffer(node.keys, dtype=np.uint64)
        if not node.is_leaf:
            return False, keys, np.frombuffer(node.values, dtype=np.uint64)
        if self._np_dtype is None:
            raise TypeError(f"node_arrays needs 4- or 8-byte values, not {self.value_size}")
        return True, keys, np.frombuffer(node.values, dtype=self._np_dtype)

    def arrays(self, root: int, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``lookup_range`` with the values widened to uint64."""
        k, v = self.lookup_range(root, lo, hi)
        return k, v.astype(np.uint64)

    def highest_key(self, root: int) -> int | None:
        node = self._read(root)
        path = [root]
        while not node.is_leaf:
            if not node.keys:
                raise MetadataCorrupt(block=node.block, reason="empty internal node")
            _check_descent(path, node.block, node.values[-1])
            node = self._read(node.values[-1])
        return node.keys[-1] if node.keys else None

    def _find_cycle(self, root: int, key: int) -> None:
        """Slow path once a descent got deeper than any real tree: walk the original nodes from ``root`` towards
        ``key`` again, tracking the path, and raise against the node whose child pointer closes the cycle. The
        hot paths only count levels."""
        node = self._read(root)
        path = [root]
        while not node.is_leaf:
            i = max(bisect_right(node.keys, key) - 1, 0)
            _check_descent(path, node.block, node.values[i])
            node = self._read(node.values[i])
        raise MetadataCorrupt(block=root, reason="btree too deep (cycle?)")

    def count(self, root: int) -> int:
        return sum(len(leaf.keys) for leaf in self.leaves(root))

    # --- building -------------------------------------------------------------------------------------------
    def empty(self) -> int:
        """A new empty tree (a single empty leaf); returns its root."""
        return self.nodes.new_node(True, self.value_size).block

    def _shadow(self, b: int) -> Node:
        return self.nodes.shadow(b, self.value_size, self.vt)

    def _split_node(self, node: Node) -> Node:
        """Move the upper half of ``node`` into a new sibling; returns the sibling."""
        self.tm.share_gen += 1  # the tree's shape changes (tx/transaction.py share_gen)
        sib = self.nodes.new_node(node.is_leaf, node.value_size)
        half = len(node.keys) // 2
        sib.keys = node.keys[half:]
        sib.values = node.values[half:]
        del node.keys[half:]
        del node.values[half:]
        return sib

    def _split_beneath(self, root: Node) -> None:
        """Root is full: move its entries into two new children; the root becomes internal over them."""
        self.tm.share_gen += 1
        left = self.nodes.new_node(root.is_leaf, root.value_size)
        left.keys, left.values = root.keys, root.values
        right = self._split_node(left)
        root.is_leaf = False
        root.value_size = 8
        root.max_entries = calc_max_entries(8)
        root.keys = array("Q", [left.keys[0], right.keys[0]])
        root.values = array("Q", [left.block, right.block])

    def insert(self, root: int, key: int, value: Any) -> tuple[int, bool]:
        """Insert or overwrite ``key``. The tree takes over the caller's reference held by ``value``; an
        overwritten value has its reference dropped. Returns (new root, whether the key is new). O(log n)."""
        new_root, is_new, _, _, _ = self.insert_leaf(root, key, value)
        return new_root, is_new

    def insert_leaf(self, root: int, key: int, value: Any) -> tuple[int, bool, Node | None, int, int]:
        """``insert``, also returning the leaf it changed and the key range [lo, hi) that leaf answers for, when
        no internal node on the path is full (else None for the leaf). Every node on the path was shadowed in
        this transaction, so it is dirty with one reference: any key in [lo, hi) descends through the same nodes
        to the same leaf, changing none but the leaf (while it has room), and while the transaction manager's
        ``share_gen`` stays as it is now all of that stays true, so a later insert of such a key may change the
        leaf in place as this full path would (btree/two_level.py). Returns (new root, whether the key is new,
        leaf, lo, hi)."""
        new_root, node, lo, hi, roomy = self._insert_descent(root, key)
        keys = node.keys
        i = bisect_right(keys, key)
        leaf = node if roomy else None
        if i > 0 and keys[i - 1] == key:
            old = node.values[i - 1]
            node.values[i - 1] = value
            self.vt.dec([old])
            return new_root, False, leaf, lo, hi
        keys.insert(i, key)
        node.values.insert(i, value)
        return new_root, True, leaf, lo, hi

    def insert_run(self, root: int, keys: list[int], values: list[Any]) -> tuple[int, int]:
        """``insert`` of each (key, value) pair, for keys sorted ascending without repeats, with one descent per
        leaf the run touches instead of one per key: the descent shadows and splits as ``insert`` does, then
        every following key that belongs in the same leaf (below the leaf's upper bound) goes in while it has
        room. Overwritten values have their references dropped in one ``ValueType.dec`` call. Returns (new root,
        number of keys that were new). O(k + leaves * log n) for k keys.
        """
        n = len(keys)
        new = 0
        olds: list[Any] = []
        i = 0
        while i < n:
            root, leaf, _, hi, _ = self._insert_descent(root, keys[i])
            lkeys, lvals = leaf.keys, leaf.values
            cap = leaf.max_entries
            while i < n:
                key = keys[i]
                if key >= hi:
                    break
                j = bisect_right(lkeys, key)
                if j > 0 and lkeys[j - 1] == key:
                    olds.append(lvals[j - 1])
                    lvals[j - 1] = values[i]
                elif len(lkeys) < cap:
                    lkeys.insert(j, key)
                    lvals.insert(j, values[i])
                    new += 1
                else:
                    break  # full: the next descent splits it
                i += 1
        if len(olds) > _RUN_DEC_BATCH:
            self.vt.dec(olds)
        else:  # a few: one value at a time (a value type's batch path costs more for a handful, profiled)
            for old in olds:
                self.vt.dec([old])
        return root, new

    def _insert_descent(self, root: int, key: int) -> tuple[int, Node, int, int, bool]:
        """Shadow the path from ``root`` to the leaf ``key`` belongs in, splitting full nodes on the way down
        (so the leaf has room for one entry), as ``insert`` does. Returns (new root, the writable leaf, the
        leaf's key bounds lo and hi: keys below lo or at or above hi belong in another leaf, whether no internal
        node on the path is full now). Every node on the path is then dirty with one reference (each came from
        ``_shadow``; a copy's inc_children reaches only the nodes below it, which are shadowed after)."""
        node = self._shadow(root)
        new_root = node.block
        if len(node.keys) >= node.max_entries:
            self._split_beneath(node)
        lo, hi = 0, 1 << 64
        path: list[Node] = []
        depth = 0
        while not node.is_leaf:
            keys = node.keys
            i = bisect_right(keys, key) - 1
            if i < 0:
                i = 0
                keys[0] = key
            depth += 1
            if depth > MAX_DEPTH:
                self._find_cycle(root, key)
            child = self._shadow(node.values[i])
            node.values[i] = child.block
            if len(child.keys) >= child.max_entries:
                sib = self._split_node(child)
                keys.insert(i + 1, sib.keys[0])
                node.values.insert(i + 1, sib.block)
                if key >= sib.keys[0]:
                    child = sib
                    i += 1
            if i + 1 < len(keys) and keys[i + 1] < hi:
                hi = keys[i + 1]
            if keys[i] > lo:
                lo = keys[i]
            path.append(node)
            node = child
        for n in path:  # a child's split may have filled its parent
            if len(n.keys) >= n.max_entries:
                return new_root, node, lo, hi, False
        return new_root, node, lo, hi, True

    def _shadow_path(self, root: int, key: int) -> tuple[int, Node, int]:
        """Shadow every node from the root to the leaf holding ``key`` (which must exist).
        Returns (new root, the writable leaf, index of key in it). Used to update a value in place, e.g. a
        subtree root in the top level of the mapping tree, without the overwrite's reference drop."""
        node = self._shadow(root)
        new_root = node.block
        depth = 0
        while not node.is_leaf:
            i = bisect_right(node.keys, key) - 1
            if i < 0:
                raise KeyError(key)
            depth += 1
            if depth > MAX_DEPTH:
                self._find_cycle(root, key)
            child = self._shadow(node.values[i])
            node.values[i] = child.block
            node = child
        i = bisect_right(node.keys, key) - 1
        if i < 0 or node.keys[i] != key:
            raise KeyError(key)
        return new_root, node, i

    def remove(self, root: int, key: int) -> tuple[int, bool]:
        """Remove ``key`` (dropping its value's reference). Returns (new root, whether it was present)."""
        if self.lookup(root, key) is None:
            return root, False
        new_root, _ = self._remove_run(root, key, key + 1, 1)
        return new_root, True

    def remove_range(self, root: int, lo: int, hi: int) -> tuple[int, int]:
        """Remove every key in [lo, hi), dropping their values' references (kernel dm_btree_remove_leaves).
        Returns (new root, number removed). Each pass descends once (rebalancing as ``remove`` does) and deletes
        a run from one leaf, as many entries as keep the leaf above max_entries/3: O(k/leaf * log n) passes
        for k keys, and one ``ValueType.dec`` call per run."""
        if hi <= lo:
            return root, 0
        keys = self.lookup_range(root, lo, hi)[0] if self._np_dtype else \
            np.array([k for k, _ in self.items(root, lo, hi)], dtype=np.uint64)
        done = 0
        total = len(keys)
        while done < total:
            root, n = self._remove_run(root, int(keys[done]), hi, total - done)
            done += n
        return root, done

    def _remove_run(self, root: int, key: int, hi: int, at_most: int) -> tuple[int, int]:
        """Descend towards ``key`` (present), rebalancing, and delete the leaf's entries from ``key`` up to
        ``hi`` (exclusive): at most ``at_most``, and no more than keep a non-root leaf above max/3."""
        self.tm.share_gen += 1
        node = self._shadow(root)
        new_root = node.block
        steps = 0
        while not node.is_leaf:
            steps += 1
            if steps > 2 * MAX_DEPTH:  # the caller found the key's path acyclic; this guards sibling pointers
                raise MetadataCorrupt(block=node.block, reason="btree too deep (cycle?)")
            i = max(bisect_right(node.keys, key) - 1, 0)
            i = self._rebalance_child(node, i, key)
            if node.block == new_root and len(node.keys) == 1:
                self._absorb_only_child(node)
                continue
            child = self._shadow(node.values[i])
            node.values[i] = child.block
            node = child
        keys = node.keys
        j = bisect_left(keys, key)
        end = bisect_left(keys, hi, j)
        if node.block != new_root:
            end = min(end, j + max(1, len(keys) - self._min_entries(node)))
        end = min(end, j + at_most)
        if end - j == 1:
            old = [node.values[j]]
        else:
            old = node.values[j:end]
        del keys[j:end]
        del node.values[j:end]
        self.vt.dec(old)
        return new_root, end - j

    def update(self, root: int, key: int, fn: Callable[[Any], Any]) -> tuple[int, Any]:
        """Replace the value of ``key`` (which must exist) by ``fn(old)``, shadowing the path to it, without
        the overwrite's reference drop (the caller's ``fn`` owns the references: the top level of a two-level
        tree hands a subtree root to the bottom tree and stores the new root). Returns (new root, new value).

        Raises:
            KeyError: ``key`` is not in the tree.
        """
        new_root, leaf, i = self._shadow_path(root, key)
        new = fn(leaf.values[i])
        leaf.values[i] = new
        return new_root, new

    def _min_entries(self, child: Node) -> int:
        return child.max_entries // 3

    def _rebalance_child(self, parent: Node, i: int, key: int) -> int:
        """Make sure child ``i`` of ``parent`` holds more than max/3 entries; returns the child index for key."""
        child = self._read(parent.values[i])
        if len(child.keys) > self._min_entries(child) or len(parent.keys) < 2:
            return i
        self.tm.share_gen += 1  # a merge or a redistribution
        li = i if i + 1 < len(parent.keys) else i - 1
        left = self._shadow(parent.values[li])
        parent.values[li] = left.block
        right = self._shadow(parent.values[li + 1])
        parent.values[li + 1] = right.block
        total = len(left.keys) + len(right.keys)
        threshold = 2 * (self._min_entries(left) + 1)
        if total < threshold:
            # merge right into left:  [L][R] -> [L+R], parent entry for R removed, R freed (its children moved)
            left.keys.extend(right.keys)
            left.values.extend(right.values)
            del parent.keys[li + 1]
            del parent.values[li + 1]
            self.tm.dec(right.block)
            return li
        # redistribute evenly:  [L][R] -> [L'][R'] with |L'| = total // 2
        target = total // 2
        if len(left.keys) > target:
            move = len(left.keys) - target
            right.keys[0:0] = left.keys[target:]
            right.values[0:0] = left.values[target:]
            del left.keys[target:]
            del left.values[target:]
        elif len(left.keys) < target:
            move = target - len(left.keys)
            left.keys.extend(right.keys[:move])
            left.values.extend(right.values[:move])
            del right.keys[:move]
            del right.values[:move]
        parent.keys[li + 1] = right.keys[0]
        return li if key < right.keys[0] else li + 1

    def _absorb_only_child(self, root: Node) -> None:
        """A root with one child takes the child's entries (the tree loses a level)."""
        self.tm.share_gen += 1
        child = self._shadow(root.values[0])
        root.is_leaf = child.is_leaf
        root.value_size = child.value_size
        root.max_entries = child.max_entries
        root.keys = array("Q", child.keys)
        root.values = child.values[:] if not isinstance(child.values, list) else list(child.values)
        self.tm.dec(child.block)

    def build(self, keys: np.ndarray, values: Any) -> int:
        """Build a new tree bottom-up from sorted unique keys; the tree takes over the values' references.
        Leaves hold at most max entries and at least max/3 (sizes spread evenly). Returns the root."""
        n = len(keys)
        if n == 0:
            return self.empty()
        level: list[tuple[int, int]] = []  # (first key, block)
        for lo, hi in _even_chunks(n, self.leaf_max):
            leaf = self.nodes.new_node(True, self.value_size)
            leaf.keys = array("Q", keys[lo:hi].astype("<u8").tobytes())
            if self.value_size == 8:
                leaf.values = array("Q", np.asarray(values[lo:hi], dtype="<u8").tobytes())
            elif self.value_size == 4:
                leaf.values = array("I", np.asarray(values[lo:hi], dtype="<u4").tobytes())
            else:
                leaf.values = list(values[lo:hi])
            level.append((int(keys[lo]), leaf.block))
        internal_max = calc_max_entries(8)
        while len(level) > 1:
            nxt = []
            for lo, hi in _even_chunks(len(level), internal_max):
                node = self.nodes.new_node(False, 8)
                node.keys = array("Q", [k for k, _ in level[lo:hi]])
                node.values = array("Q", [b for _, b in level[lo:hi]])
                nxt.append((node.keys[0], node.block))
            level = nxt
        return level[0][1]

    # --- deletion -------------------------------------------------------------------------------------------
    def delete(self, root: int) -> None:
        """Drop one reference to the tree at ``root``; nodes (and values) no longer referenced are freed."""
        self.tm.share_gen += 1
        # Value types whose dec takes a whole array (MappingValue: data blocks) get the leaves' values in batches of
        # about a million, not one call per leaf: a 4M-mapping delete in random data order went from ~19 s to ~2 s.
        batch = getattr(self.vt, "batch_dec", False)
        pending: list[Any] = []
        nr_pending = 0
        stack = [(root, 0)]
        while stack:
            b, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise MetadataCorrupt(block=b, reason="btree too deep (cycle?)")
            if self.tm.count(b) > 1:
                self.tm.dec(b)
                continue
            node = self._read(b)
            if node.is_leaf:
                if batch:
                    pending.append(np.frombuffer(node.values, dtype=np.uint64).copy())
                    nr_pending += len(node.values)
                    if nr_pending >= DELETE_BATCH_VALUES:
                        self.vt.dec(np.concatenate(pending))
                        pending, nr_pending = [], 0
                else:
                    self.vt.dec(node.values)
            else:
                stack.extend((c, depth + 1) for c in node.values)
            self.tm.dec(b)
        if pending:
            self.vt.dec(np.concatenate(pending))


def _check_descent(path: list[int] | tuple[int, ...], parent: int, child: int) -> None:
    """Before following ``parent``'s pointer to ``child``: a child that is already on the path from the root is a
    cycle, reported against the node holding the pointer (it would otherwise loop, or fail far from the damage).
    ``path`` (a list) gets ``child`` appended."""
    if child in path:
        raise MetadataCorrupt(block=parent, reason=f"cycle in btree: child pointer {child} points at an ancestor")
    if len(path) > MAX_DEPTH:
        raise MetadataCorrupt(block=parent, reason="btree too deep (cycle?)")
    if isinstance(path, list):
        path.append(child)


def _even_chunks(n: int, cap: int) -> list[tuple[int, int]]:
    """Split n entries into ceil(n/cap) runs whose sizes differ by at most one."""
    parts = -(-n // cap)
    base, extra = divmod(n, parts)
    out, lo = [], 0
    for p in range(parts):
        hi = lo + base + (1 if p < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out

