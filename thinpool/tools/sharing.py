"""Which data blocks are mapped more than once across the devices (thin_ls's exclusive / shared split), found in
two bit maps over the data device and one walk of every distinct mapping-tree node.

Layer: tools. May import: thinpool.metadata, numpy.

Memory: two bits per data block (16 MiB each for an 8 TiB pool of 64 KiB chunks), one entry per distinct node
visited, and the data blocks the first walk found, up to 8M of them (32 MiB), kept for the per-device exclusive
counts. Work: every distinct leaf is read once, plus the leaves of shared subtrees a second time (their blocks
are mapped by two devices at least); the leaves of devices beyond the 8M budget once more for their exclusive
counts.

A node reached from two device trees (a snapshot's shared subtree) maps every one of its blocks at least twice,
so it counts as shared without looking at other devices' leaves; blocks shared between different leaves (the
usual state after copy-on-write) are found through the bit maps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from thinpool.btree.btree import MAX_DEPTH
from thinpool.errors import MetadataCorrupt
from thinpool.metadata.ir import MappingNode, leaf_data, leaves_data, read_mapping_node
from thinpool.metadata.pool_metadata import PoolMetadata

_BATCH = 1 << 16  # mappings folded at once
_KEEP = 1 << 23  # data blocks kept from the first walk for the exclusive counts (32 MiB as uint32)


class BlockBits:
    """A bit per data block (numpy uint8, little bit order)."""

    def __init__(self, nr_blocks: int) -> None:
        self.bits = np.zeros((max(nr_blocks, 1) + 7) // 8, dtype=np.uint8)

    def test(self, blocks: np.ndarray) -> np.ndarray:
        found: np.ndarray = (self.bits[blocks >> 3] >> (blocks & 7).astype(np.uint8)) & 1 != 0
        return found

    def set(self, blocks: np.ndarray) -> None:
        np.bitwise_or.at(self.bits, blocks >> 3, (np.uint8(1) << (blocks & 7).astype(np.uint8)))


class Sharing:
    """The shared data blocks of a pool (or of the devices ``dev_ids``): ``is_shared(data_blocks)`` and
    ``exclusive_blocks(dev_id)``. Built eagerly by the constructor; see the module docstring for the cost.

    Raises:
        DeviceNotFound, MetadataCorrupt (a damaged node, a data block beyond the data device, a cycle).
    """

    def __init__(self, md: PoolMetadata, dev_ids: Sequence[int] | None = None) -> None:
        self.md = md
        self.dev_ids = md.device_ids() if dev_ids is None else list(dev_ids)
        nr = md.nr_data_blocks or 1
        self._once = BlockBits(nr)
        self._twice = BlockBits(nr)
        # node -> 1 (reached from one place) or 2 (reached again: every block below it is shared)
        self._reach: dict[int, int] = {}
        shared_roots: list[int] = []
        # each device's data blocks as the first walk found them (up to _KEEP in all), so that its exclusive
        # count needs no second walk; a device beyond the budget is walked again (exclusive_blocks)
        self._kept: dict[int, list[np.ndarray]] = {}
        budget = [_KEEP]
        small = nr < (1 << 32)
        for dev in self.dev_ids:
            pending: list[MappingNode] = []  # leaves folded in batches (fewer numpy steps)
            nr_pending = 0
            mine: list[np.ndarray] | None = []

            def fold(mine: list[np.ndarray] | None, pending: list[MappingNode]) -> list[np.ndarray] | None:
                data = leaves_data(md, pending)
                self._fold(data)
                if mine is None:
                    return None
                if len(data) > budget[0]:  # over the budget: give back what this device kept
                    budget[0] += sum(len(d) for d in mine)
                    return None
                budget[0] -= len(data)
                mine.append(data.astype(np.uint32) if small else data)
                return mine

            for node_block, node in self._walk(md.device_root(dev)):
                if node is not None:
                    pending.append(node)
                    nr_pending += len(node.values)
                    if nr_pending < _BATCH:
                        continue
                else:
                    shared_roots.append(node_block)
                if pending:
                    mine = fold(mine, pending)
                    pending, nr_pending = [], 0
            if pending:
                mine = fold(mine, pending)
            if mine is not None:
                self._kept[dev] = mine
        refolded: set[int] = set()
        for root in shared_roots:
            for _, node in self._leaves(root, refolded):
                self._twice.set(leaf_data(md, node))

    def _walk(self, root: int) -> Iterator[tuple[int, MappingNode | None]]:
        """First visits: (leaf block, the leaf); a node reached again: (block, None), not descended."""
        stack = [(root, 0)]
        while stack:
            block, depth = stack.pop()
            if block in self._reach:
                self._reach[block] = 2
                yield block, None
                continue
            self._reach[block] = 1
            node = read_mapping_node(self.md, block)
            if node.is_leaf:
                if len(node.values):
                    yield block, node
                continue
            if depth >= MAX_DEPTH:
                raise MetadataCorrupt(block=block, reason="btree too deep (cycle?)")
            stack.extend((c, depth + 1) for c in node.values[::-1].tolist())

    def _leaves(self, root: int, done: set[int]) -> Iterator[tuple[int, MappingNode]]:
        stack = [(root, 0)]
        while stack:
            block, depth = stack.pop()
            if block in done:
                continue
            done.add(block)
            node = read_mapping_node(self.md, block)
            if node.is_leaf:
                yield block, node
            elif depth < MAX_DEPTH:
                stack.extend((c, depth + 1) for c in node.values[::-1].tolist())

    def _fold(self, data: np.ndarray) -> None:
        if not len(data):
            return
        u, counts = np.unique(data, return_counts=True)
        again = self._once.test(u) | (counts > 1)
        if again.any():
            self._twice.set(u[again])
        self._once.set(u)

    def is_shared(self, data_blocks: np.ndarray) -> np.ndarray:
        """Per data block: mapped more than once among the devices considered."""
        if not len(data_blocks):
            return np.zeros(0, dtype=bool)
        return self._twice.test(data_blocks.astype(np.int64))

    def exclusive_blocks(self, dev_id: int) -> int:
        """Mappings of ``dev_id`` whose data block no other mapping uses (subtrees reached from two places are
        skipped unread: all their blocks are shared)."""
        mine = self._kept.get(dev_id)
        if mine is not None:  # every block under a subtree reached twice is in the "twice" map: none counts
            return sum(int(np.count_nonzero(~self._twice.test(d.astype(np.int64)))) for d in mine)
        n = 0
        pending: list[MappingNode] = []
        nr_pending = 0
        stack = [(self.md.device_root(dev_id), 0)]
        while stack:
            block, depth = stack.pop()
            if self._reach.get(block) == 2:
                continue
            node = read_mapping_node(self.md, block)
            if node.is_leaf:
                if len(node.values):
                    pending.append(node)
                    nr_pending += len(node.values)
                    if nr_pending >= _BATCH:
                        n += int(np.count_nonzero(~self._twice.test(leaves_data(self.md, pending))))
                        pending, nr_pending = [], 0
            elif depth < MAX_DEPTH:
                stack.extend((c, depth + 1) for c in node.values.tolist())
        if pending:
            n += int(np.count_nonzero(~self._twice.test(leaves_data(self.md, pending))))
        return n
