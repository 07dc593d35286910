"""Bulk build of a B-tree bottom-up from a stream of sorted, unique keys whose number is known in advance: leaves
are written as they fill, and memory holds one pending node per level (plus a short queue of encoded nodes).

Layer: btree. May import: thinpool.errors, thinpool.checksum, thinpool.formats, thinpool.io, thinpool.tx,
thinpool.btree.spine, numpy.

The tree is node for node, block for block, the one ``BTree.build`` makes from the whole arrays: leaves hold
``ceil(n / max)`` even shares of the n entries (sizes differing by at most one, the larger first), each internal
level even shares of the level below, and the blocks are allocated up front in BTree.build's order (every leaf,
then each internal level from the bottom), so the same metadata space map hands out the same block numbers.

    entries:  k0 k1 ... k251 | k252 ... k503 | ... | ...k(n-1)     (streamed in chunks of any size)
    leaves:   [leaf b0]        [leaf b1]       ...   [leaf b(L-1)]  written when full
    level 1:  [node bL: (k0,b0) (k252,b1) ...]  ...                 written when full
    root:     the last node written

The nodes never enter the transaction's dirty set: they are new blocks of this transaction (the space map never
hands out a block the last commit uses), so writing them at once is safe, as the kernel's block manager writes
a dirty block whenever it likes before the superblock. An aborted build leaves them as garbage in free blocks.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING, Final

from thinpool import checksum
from thinpool.btree.spine import NodeCache
from thinpool.checksum import BlockType
from thinpool.errors import InvalidArgument
from thinpool.formats.btree_node import INTERNAL_NODE, LEAF_NODE, NODE_HEADER_FMT, NODE_HEADER_SIZE, calc_max_entries
from thinpool.io.block_store import FileBlockStore
from thinpool.tx.transaction import RUN_BLOCKS, TransactionManager
from thinpool.units import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

WRITE_QUEUE_NODES: Final = 64  # encoded nodes queued before they are written (256 KiB)


def level_plan(nr_entries: int, leaf_max: int, internal_max: int) -> list[int]:
    """Nodes per level, leaves first, of the tree BTree.build makes over ``nr_entries`` (>= 1) entries."""
    plan = []
    n, cap = nr_entries, leaf_max
    while True:
        parts = -(-n // cap)
        plan.append(parts)
        if parts == 1:
            return plan
        n, cap = parts, internal_max


class _Level:
    """One level's plan (node j holds ``base + (j < extra)`` entries) and its one pending node."""

    __slots__ = ("nr_nodes", "base", "extra", "first", "next", "keys", "values", "fill", "is_leaf", "max_entries",
                 "value_size", "value_dtype")

    def __init__(self, nr_nodes: int, nr_entries: int, first: int, is_leaf: bool, max_entries: int,
                 value_size: int = 8) -> None:
        self.nr_nodes = nr_nodes
        self.base, self.extra = divmod(nr_entries, nr_nodes)
        self.first = first  # index of this level's first block in the allocation order
        self.next = 0  # the node being filled
        self.is_leaf = is_leaf
        self.max_entries = max_entries
        self.value_size = value_size
        self.value_dtype = "<u8" if value_size == 8 else "<u4"
        self.keys = np.zeros(max_entries, dtype=np.uint64)
        self.values = np.zeros(max_entries, dtype=np.uint64)
        self.fill = 0

    def size(self) -> int:
        """Entries of the node being filled."""
        return self.base + (1 if self.next < self.extra else 0)


class BulkTreeBuilder:
    """Builds one tree of 8-byte values (``value_size`` 4: of 4-byte values, as the ref-count tree of a space map;
    see the module docstring). ``add`` chunks of sorted keys (each above the last), ``finish`` returns the root.
    Allocates every block of the tree when created.

    Raises (from ``add``/``finish``): InvalidArgument when more or fewer entries than announced arrive.
    """

    def __init__(self, tm: TransactionManager, nr_entries: int, value_size: int = 8) -> None:
        if value_size not in (4, 8):
            raise InvalidArgument(reason=f"bulk build: values of {value_size} bytes (4 or 8 only)")
        self.tm = tm
        self.value_size = value_size
        self.nr_entries = nr_entries
        self.added = 0
        self.root: int | None = None
        self.nodes_written = 0
        self.max_held = 0  # most nodes held at once (pending nodes plus the write queue), for the tests
        self._queue: list[tuple[int, bytearray]] = []
        self._levels: list[_Level] = []
        # block numbers in allocation order, as runs: (first index, first block, length)
        self._runs: list[tuple[int, int, int]] = []
        self._run_starts: list[int] = []
        if nr_entries <= 0:
            return
        leaf_max, internal_max = calc_max_entries(value_size), calc_max_entries(8)
        plan = level_plan(nr_entries, leaf_max, internal_max)
        first = 0
        below = nr_entries
        for depth, nodes in enumerate(plan):
            self._levels.append(_Level(nodes, below, first, depth == 0, leaf_max if depth == 0 else internal_max,
                                       value_size if depth == 0 else 8))
            first += nodes
            below = nodes
        for i in range(first):  # BTree.build's order: every leaf, then each level up
            b = tm.new_block()
            if self._runs and self._runs[-1][1] + self._runs[-1][2] == b:
                s, fb, ln = self._runs[-1]
                self._runs[-1] = (s, fb, ln + 1)
            else:
                self._runs.append((i, b, 1))
                self._run_starts.append(i)

    @property
    def nodes_held(self) -> int:
        """Nodes in memory now: the pending (partly filled) node of each level and the queued encoded ones."""
        return sum(1 for lv in self._levels if lv.fill) + len(self._queue)

    def _block(self, index: int) -> int:
        r = self._runs[bisect_right(self._run_starts, index) - 1]
        return r[1] + index - r[0]

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Append entries (uint64 keys ascending, above every key added before; uint64 values)."""
        n = len(keys)
        if n == 0:
            return
        if self.added + n > self.nr_entries:
            raise InvalidArgument(reason=f"bulk build: more than the {self.nr_entries} entries announced")
        self.added += n
        lv = self._levels[0]
        keys = np.asarray(keys, dtype=np.uint64)
        values = np.asarray(values, dtype=np.uint64)
        at = 0
        while at < n:
            size = lv.size()
            if lv.fill == 0 and n - at >= size:  # a whole leaf straight from the chunk
                self._emit(0, keys[at:at + size], values[at:at + size])
                at += size
                continue
            take = min(size - lv.fill, n - at)
            lv.keys[lv.fill:lv.fill + take] = keys[at:at + take]
            lv.values[lv.fill:lv.fill + take] = values[at:at + take]
            lv.fill += take
            at += take
            if lv.fill == size:
                lv.fill = 0
                self._emit(0, lv.keys[:size], lv.values[:size])
            self.max_held = max(self.max_held, self.nodes_held)

    def _emit(self, depth: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Write the next node of level ``depth`` and hand (its first key, its block) to the level above."""
        lv = self._levels[depth]
        block = self._block(lv.first + lv.next)
        lv.next += 1
        nr = len(keys)
        buf = bytearray(4096)
        NODE_HEADER_FMT.pack_into(buf, 0, 0, LEAF_NODE if lv.is_leaf else INTERNAL_NODE, block, nr,
                                  lv.max_entries, lv.value_size, 0)
        buf[NODE_HEADER_SIZE:NODE_HEADER_SIZE + 8 * nr] = keys.astype("<u8").tobytes()
        vbase = NODE_HEADER_SIZE + 8 * lv.max_entries
        buf[vbase:vbase + lv.value_size * nr] = values.astype(lv.value_dtype).tobytes()
        checksum.stamp(buf, BlockType.BTREE_NODE)
        self._queue.append((block, buf))
        self.max_held = max(self.max_held, self.nodes_held)
        if len(self._queue) >= WRITE_QUEUE_NODES:
            self._flush()
        first_key = int(keys[0])
        if depth + 1 == len(self._levels):
            self.root = block
            return
        up = self._levels[depth + 1]
        up.keys[up.fill] = first_key
        up.values[up.fill] = block
        up.fill += 1
        if up.fill == up.size():
            size, up.fill = up.fill, 0
            self._emit(depth + 1, up.keys[:size], up.values[:size])

    def _flush(self) -> None:
        """Write the queued nodes: runs of consecutive blocks in one call on a store that writes runs."""
        queue, self._queue = sorted(self._queue), []
        if not queue:
            return
        store = self.tm.store
        if isinstance(store, FileBlockStore) and type(store).writes_runs():
            run: list[bytes | bytearray] = [queue[0][1]]
            start = queue[0][0]
            for b, buf in queue[1:]:
                if b != start + len(run) or len(run) >= RUN_BLOCKS:
                    store.write_run(start, run)
                    start, run = b, []
                run.append(buf)
            store.write_run(start, run)
        else:
            for b, buf in queue:
                store.write_block(b, buf)
        self.nodes_written += len(queue)
        self.tm.blocks_written += len(queue)

    def finish(self) -> int:
        """Write what is left and return the root (an empty tree: one new empty leaf, as BTree.empty)."""
        if self.nr_entries <= 0:
            return NodeCache.of(self.tm).new_node(True, self.value_size).block
        if self.added != self.nr_entries or self.root is None:
            raise InvalidArgument(reason=f"bulk build: {self.added} entries of the {self.nr_entries} announced")
        self._flush()
        return self.root
