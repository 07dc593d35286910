"""The B-tree's view of a transaction manager: decoded, cached nodes; new nodes; shadowing with inc_children.

Layer: btree. May import: thinpool.errors, thinpool.btree.node, thinpool.tx.

Mirrors the kernel's dm-btree-spine.c (bn_read_lock / bn_shadow / inc_children) over dm-transaction-manager:

- ``read`` returns a node of the tree: one created or shadowed in this transaction (writable), else a clean
  node from an LRU cache of decoded nodes, else one read from the store and validated (node_check: checksum,
  self block number, flags, counts, key order, value size, child pointers inside the device).
- ``shadow`` gives a writable copy. Shadowing a node that was created or shadowed in this transaction and has a
  reference count of 1 returns it as is; otherwise the node is copied to a new block, the children of the copy
  are incremented if the original was shared (count > 1: internal children in the metadata space map, leaf
  values through the tree's value type), and the original is decremented (dm_tm_shadow_block + inc_children).
- The cache drops a block as soon as it is freed or reallocated (tx/api.py BlockClient), and takes the dirty
  nodes at commit.

One NodeCache exists per transaction manager (``NodeCache.of(tm)``); every BTree on that manager shares it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import cast

from thinpool.btree.node import Node, decode_node
from thinpool.errors import MetadataCorrupt
from thinpool.tx.api import ValueType
from thinpool.tx.transaction import TransactionManager

DEFAULT_CACHE_NODES = 16384  # decoded clean nodes kept (about 64 MiB of 4 KiB blocks at most)


class NodeCache:
    """Decoded nodes of one transaction manager (see the module docstring)."""

    def __init__(self, tm: TransactionManager, *, cache_nodes: int = DEFAULT_CACHE_NODES) -> None:
        self.tm = tm
        self.cache: OrderedDict[int, Node] = OrderedDict()
        self.cache_nodes = cache_nodes
        self.nodes_decoded = 0

    @classmethod
    def of(cls, tm: TransactionManager) -> NodeCache:
        """The node cache of ``tm`` (created and registered on first use)."""
        c = tm.client(cls)
        if c is None:
            c = cls(tm)
            tm.add_client(c)
        return c

    # --- BlockClient ----------------------------------------------------------------------------------------
    def forget(self, b: int) -> None:
        self.cache.pop(b, None)

    def committed(self) -> None:
        cache = self.cache
        for b, node in self.tm.dirty.items():
            if isinstance(node, Node):
                cache[b] = node
                cache.move_to_end(b)
        while len(cache) > self.cache_nodes:
            cache.popitem(last=False)

    def aborted(self) -> None:
        pass

    # --- reading --------------------------------------------------------------------------------------------
    def read(self, b: int, leaf_value_size: int) -> Node:
        """Node ``b`` of a tree whose leaves hold ``leaf_value_size``-byte values. O(1) when cached.

        Raises:
            MetadataCorrupt / ChecksumError naming ``b`` (or the node whose child pointer is out of range).
        """
        # only B-tree nodes are queued decoded (other blocks go to dirty_raw): no isinstance on this hot path
        node = cast("Node | None", self.tm.dirty.get(b))
        if node is None:
            node = self.cache.get(b)
            if node is not None:
                self.cache.move_to_end(b)
            else:
                node = self._load(b, leaf_value_size)
        if node.is_leaf and node.value_size != leaf_value_size:
            raise MetadataCorrupt(block=b, reason=f"value size mismatch: expected {leaf_value_size}, "
                                                  f"but got {node.value_size}")
        return node

    def _load(self, b: int, leaf_value_size: int) -> Node:
        node = decode_node(self.tm.read_block(b), b, leaf_value_size)
        self.nodes_decoded += 1
        if not node.is_leaf and node.values:
            # Validate child pointers here, where the damaged node is known: a pointer past the device (or at the
            # superblock) is reported against this node, not as an unreadable block number.
            lo, hi = min(node.values), max(node.values)
            limit = self.tm.limit
            if lo == 0 or hi >= limit:
                bad = hi if hi >= limit else lo
                raise MetadataCorrupt(block=b, reason=f"btree node has child pointer {bad} outside the "
                                                      f"metadata device (1..{limit - 1})")
        self.cache[b] = node
        if len(self.cache) > self.cache_nodes:
            self.cache.popitem(last=False)
        return node

    # --- writing --------------------------------------------------------------------------------------------
    def new_node(self, is_leaf: bool, value_size: int) -> Node:
        """An empty writable node in a new block (count 1)."""
        node = Node(self.tm.new_block(), is_leaf, value_size)
        self.tm.add_dirty(node.block, node)
        return node

    def shadow(self, b: int, leaf_value_size: int, vt: ValueType) -> Node:
        """A writable version of node ``b`` (see the module docstring). Effects: at most one new block; the
        original loses a reference; a shared original's children (or leaf values, through ``vt``) gain one."""
        tm = self.tm
        node = tm.dirty.get(b)
        count = tm.sm.count(b)
        if node is not None and count == 1:
            return cast(Node, node)
        orig = self.read(b, leaf_value_size)
        copy = orig.copy(tm.new_block())
        tm.add_dirty(copy.block, copy)
        if count > 1:
            self.inc_children(copy, vt)
        tm.dec(b)
        return copy

    def inc_children(self, node: Node, vt: ValueType) -> None:
        """One more reference on everything ``node`` points to (kernel inc_children)."""
        if node.is_leaf:
            if node.values:
                vt.inc(node.values)
        else:
            self.tm.share_gen += 1  # nodes gain references (tx/transaction.py share_gen)
            inc = self.tm.sm.inc
            for c in node.values:
                inc(c)
