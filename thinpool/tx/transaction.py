"""Transaction manager: validated, cached metadata block access; shadowing (copy-on-write); two-phase commit.

Layer: tx. May import: thinpool.errors, thinpool.checksum, thinpool.io, thinpool.btree.node, thinpool.spacemap.core.

Mirrors the kernel's dm-transaction-manager:
- A writable node comes only from ``new_node`` or ``shadow``. Shadowing a node that was created or shadowed in
  this transaction and has a reference count of 1 returns it as is; otherwise the node is copied to a new block,
  the children of the copy are incremented if the original was shared (count > 1), and the original is
  decremented (dm_tm_shadow_block + bn_shadow/inc_children).
- New blocks come from the metadata space map, which never returns a block that the last commit uses.
- ``commit`` writes every dirty block, syncs, then writes the superblock (block 0) and syncs again. Until then
  no block reachable from the last committed superblock has been written. ``abort`` drops dirty blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from thinpool import checksum
from thinpool.btree.node import Node, decode_node
from thinpool.checksum import BlockType
from thinpool.errors import MetadataCorrupt
from thinpool.io.block_store import BlockStore
from thinpool.spacemap.core import CoreSpaceMap

ChildInc = Callable[[Node], None]


class TransactionManager:
    def __init__(self, store: BlockStore, meta_sm: CoreSpaceMap, *, cache_nodes: int = 16384) -> None:
        self.store = store
        self.sm = meta_sm
        self.dirty: dict[int, Node] = {}  # nodes created/shadowed in this transaction
        self.dirty_raw: dict[int, bytearray] = {}  # non-node blocks (bitmaps, index, snapshot sb) to write
        self.cache: OrderedDict[int, Node] = OrderedDict()
        self.cache_nodes = cache_nodes
        self.blocks_written = 0

    # --- reading --------------------------------------------------------------------------------------------
    def read_raw(self, b: int, block_type: BlockType) -> bytes:
        """Read and checksum-verify a non-node block, checking its self block number."""
        if b in self.dirty_raw:
            return bytes(self.dirty_raw[b])
        self._check_range(b)
        buf = self.store.read_block(b)
        checksum.verify(buf, block_type, b)
        return buf

    def _check_range(self, b: int) -> None:
        if not 0 <= b < self.store.nr_blocks or b >= self.sm.nr_blocks:
            raise MetadataCorrupt(block=b, reason=f"block pointer {b} beyond the metadata device "
                                                  f"({min(self.store.nr_blocks, self.sm.nr_blocks)} blocks)")

    def read_node(self, b: int, leaf_value_size: int) -> Node:
        node = self.dirty.get(b)
        if node is not None:
            return node
        node = self.cache.get(b)
        if node is not None:
            self.cache.move_to_end(b)
        else:
            self._check_range(b)
            node = decode_node(self.store.read_block(b), b, leaf_value_size)
            if not node.is_leaf and node.values:
                # Validate child pointers here, where the damaged node is known: a pointer past the device (or
                # at the superblock) is reported against this node, not as an unreadable block number.
                lo, hi = min(node.values), max(node.values)  # type: ignore[type-var]
                limit = min(self.store.nr_blocks, self.sm.nr_blocks)
                if lo == 0 or hi >= limit:
                    bad = hi if hi >= limit else lo
                    raise MetadataCorrupt(block=b, reason=f"btree node has child pointer {bad} outside the "
                                                          f"metadata device (1..{limit - 1})")
            self.cache[b] = node
            if len(self.cache) > self.cache_nodes:
                self.cache.popitem(last=False)
        if node.is_leaf and node.value_size != leaf_value_size:
            raise MetadataCorrupt(block=b, reason=f"value size mismatch: expected {leaf_value_size}, "
                                                  f"but got {node.value_size}")
        return node

    # --- writing --------------------------------------------------------------------------------------------
    def new_block(self) -> int:
        b = self.sm.new_block()
        self.cache.pop(b, None)
        return b

    def new_node(self, is_leaf: bool, value_size: int) -> Node:
        node = Node(self.new_block(), is_leaf, value_size)
        self.dirty[node.block] = node
        return node

    def shadow(self, b: int, leaf_value_size: int, inc_values: ChildInc) -> Node:
        """A writable version of node ``b`` (see the module docstring). ``inc_values`` increments the
        references held by a leaf's values when a shared leaf is copied."""
        node = self.dirty.get(b)
        count = self.sm.counts.item(b)  # CoreSpaceMap.count inlined: this runs once per level per insert
        if node is not None and count == 1:
            return node
        orig = self.read_node(b, leaf_value_size)
        copy = orig.copy(self.new_block())
        self.dirty[copy.block] = copy
        if count > 1:
            self.inc_children(copy, inc_values)
        self.dec(b)
        return copy

    def inc_children(self, node: Node, inc_values: ChildInc) -> None:
        if node.is_leaf:
            inc_values(node)
        else:
            for c in node.values:
                self.sm.inc(c)  # type: ignore[arg-type]

    def inc(self, b: int) -> None:
        self.sm.inc(b)

    def dec(self, b: int) -> int:
        """Drop a reference; a block whose count reaches 0 is forgotten (no recursion into children)."""
        c = self.sm.dec(b)
        if c == 0:
            self.dirty.pop(b, None)
            self.dirty_raw.pop(b, None)
        return c

    def write_raw(self, b: int, block: bytearray, block_type: BlockType) -> None:
        """Queue a non-node block for the commit; the checksum is stamped now."""
        checksum.stamp(block, block_type)
        self.dirty_raw[b] = block

    # --- commit / abort -------------------------------------------------------------------------------------
    def pre_commit(self) -> None:
        """Write every dirty block except the superblock, then sync."""
        for b in sorted(self.dirty):
            self.store.write_block(b, self.dirty[b].encode())
        for b in sorted(self.dirty_raw):
            self.store.write_block(b, self.dirty_raw[b])
        self.blocks_written += len(self.dirty) + len(self.dirty_raw)
        self.store.sync()

    def commit(self, superblock: bytearray) -> None:
        """Write the (stamped) superblock to block 0 and sync; the transaction is then durable."""
        self.store.write_block(0, superblock)
        self.store.sync()
        self.blocks_written += 1
        for b, node in self.dirty.items():
            self.cache[b] = node
        while len(self.cache) > self.cache_nodes:
            self.cache.popitem(last=False)
        self.dirty = {}
        self.dirty_raw = {}

    def abort(self) -> None:
        self.dirty = {}
        self.dirty_raw = {}
