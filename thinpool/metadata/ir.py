"""The metadata IR: format-neutral records (superblock, device, mapping runs), one emitter that walks the
metadata once and feeds a visitor, and "runs from sorted arrays" coded once.

Layer: metadata. May import: thinpool.errors, thinpool.formats, thinpool.btree, metadata.pool_metadata, numpy.

The model is thin-provisioning-tools' ``thin/ir.rs``: a ``MetadataVisitor`` receives ``superblock_b``,
``device_b``, ``map`` (a batch of mapping runs, ``Runs``), ``device_e``, ``superblock_e`` and ``eof``. The XML,
human-readable and JSON writers (``metadata/dump.py``) are visitors; ``restore`` consumes the same records
(parsed from XML, or produced by repair), so every producer and consumer meets at this one interface.
Producers: ``emit`` (open metadata), ``restore.read_xml`` (thin_dump XML), ``restore.MetadataIR.replay``.
Consumers: ``dump.XmlWriter`` / ``HumanWriter`` / ``JsonWriter``, ``restore.IRCollector``,
``restore.MetadataBuilder`` (fresh metadata; repair's sink).

Memory: the emitter streams batches of leaves (about 4096 mappings plus one pending run in memory) through the
one walker (``btree/walk.py``), so a dump costs O(tree depth) memory whatever the mapping count.

Runs: consecutive entries merge while the "step" columns grow by one and the "equal" columns stay the same. A
``RunJoiner`` carries the open run across chunk (leaf) boundaries, so runs are maximal over the whole device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from thinpool.btree.walk import Visitor, Where, read_view, walk_views
from thinpool.errors import MetadataCorrupt
from thinpool.formats.device_details import TIME_BITS, TIME_MASK
from thinpool.metadata.pool_metadata import PoolMetadata


# --- runs from sorted arrays ----------------------------------------------------------------------------------
def run_starts(steps: Sequence[np.ndarray], equals: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Indices (int64, ascending, starting with 0) where a new run begins in equally long sorted columns."""
    n = len(steps[0]) if steps else len(equals[0])
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    brk = np.zeros(n, dtype=bool)
    brk[0] = True
    for c in steps:
        brk[1:] |= np.diff(c.astype(np.int64)) != 1
    for c in equals:
        brk[1:] |= c[1:] != c[:-1]
    return np.flatnonzero(brk)


@dataclass(frozen=True, slots=True)
class Runs:
    """Completed runs: the first value of each step and equal column per run, and each run's length."""

    steps: tuple[np.ndarray, ...]
    equals: tuple[np.ndarray, ...]
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self) -> list[tuple[int, ...]]:
        """Plain-int rows (steps..., equals..., length), ready for formatting."""
        cols = [c.tolist() for c in self.steps] + [c.tolist() for c in self.equals] + [self.lengths.tolist()]
        return list(zip(*cols))


class RunJoiner:
    """Streams chunks of sorted columns and returns completed maximal runs; the last run of each chunk is held
    back until the next chunk shows whether it continues. Memory: one pending run."""

    def __init__(self, nr_steps: int, nr_equals: int = 0) -> None:
        self.nr_steps = nr_steps
        self.nr_equals = nr_equals
        self._steps: list[int] | None = None  # first values of the pending run
        self._equals: list[int] = []
        self._length = 0

    def _empty(self) -> Runs:
        z = np.zeros(0, dtype=np.int64)
        return Runs(tuple(z for _ in range(self.nr_steps)), tuple(z for _ in range(self.nr_equals)), z)

    def feed(self, steps: Sequence[np.ndarray], equals: Sequence[np.ndarray] = ()) -> Runs:
        """Add one chunk (its entries must sort after the previous chunk's). Returns the runs now complete."""
        n = len(steps[0])
        if n == 0:
            return self._empty()
        st = [c.astype(np.int64) for c in steps]
        eq = [c.astype(np.int64) for c in equals]
        starts = run_starts(st, eq)
        first_steps = [c[starts] for c in st]
        first_equals = [c[starts] for c in eq]
        lengths = np.diff(np.append(starts, n))
        if self._steps is not None:
            joins = all(int(c[0]) == s + self._length for c, s in zip(st, self._steps)) and \
                all(int(c[0]) == e for c, e in zip(eq, self._equals))
            if joins:
                for c, s in zip(first_steps, self._steps):
                    c[0] = s
                lengths[0] += self._length
            else:
                first_steps = [np.concatenate([np.array([s], dtype=np.int64), c])
                               for s, c in zip(self._steps, first_steps)]
                first_equals = [np.concatenate([np.array([e], dtype=np.int64), c])
                                for e, c in zip(self._equals, first_equals)]
                lengths = np.concatenate([np.array([self._length], dtype=np.int64), lengths])
        self._steps = [int(c[-1]) for c in first_steps]
        self._equals = [int(c[-1]) for c in first_equals]
        self._length = int(lengths[-1])
        return Runs(tuple(c[:-1] for c in first_steps), tuple(c[:-1] for c in first_equals), lengths[:-1])

    def flush(self) -> Runs:
        """The pending run, if any (the joiner is then empty)."""
        if self._steps is None:
            return self._empty()
        out = Runs(tuple(np.array([s], dtype=np.int64) for s in self._steps),
                   tuple(np.array([e], dtype=np.int64) for e in self._equals),
                   np.array([self._length], dtype=np.int64))
        self._steps = None
        self._equals = []
        self._length = 0
        return out


def sorted_runs(steps: Sequence[np.ndarray], equals: Sequence[np.ndarray] = ()) -> Runs:
    """Maximal runs of whole (already complete) columns."""
    j = RunJoiner(len(steps), len(equals))
    a = j.feed(steps, equals)
    b = j.flush()
    return Runs(tuple(np.concatenate([x, y]) for x, y in zip(a.steps, b.steps)),
                tuple(np.concatenate([x, y]) for x, y in zip(a.equals, b.equals)),
                np.concatenate([a.lengths, b.lengths]))


# --- reading the mapping trees --------------------------------------------------------------------------------
# Node access for the tools goes through BTree.node_arrays (the B-tree owns its nodes); these two functions
# are the only readers of mapping-tree shape outside btree/ (delta pairs two trees, which no walker does).
@dataclass(frozen=True, slots=True)
class MappingNode:
    """One node of a bottom-level mapping tree: children (internal) or packed block_time values (leaf)."""

    block: int
    is_leaf: bool
    keys: np.ndarray  # int64 thin blocks (leaf) or lower bounds of the children (internal)
    values: np.ndarray  # uint64 child blocks (internal) or block_time values (leaf)


def read_mapping_node(pmd: PoolMetadata, block: int) -> MappingNode:
    """Read and validate one mapping-tree node (through the transaction manager's node cache).

    Raises:
        MetadataCorrupt / ChecksumError naming ``block``.
    """
    if pmd.readonly:
        # no open transaction: read the store directly, so that walks over many nodes do not fill the cache
        view = read_view(pmd.store, block, value_size=8)
        return MappingNode(block, view.is_leaf, view.keys.view(np.int64), view.values)
    is_leaf, keys, values = pmd.mapping.node_arrays(block)
    return MappingNode(block, is_leaf, keys.astype(np.int64), values)


def leaf_mappings(pmd: PoolMetadata, node: MappingNode) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thin blocks, data blocks, times) of a leaf as int64 arrays, data blocks checked against the data
    device's size.

    Raises:
        MetadataCorrupt: a data block beyond the data device.
    """
    data = (node.values >> np.uint64(TIME_BITS)).astype(np.int64)
    times = (node.values & np.uint64(TIME_MASK)).astype(np.int64)
    nr_data = pmd.data_sm.nr_blocks
    if len(data) and nr_data and int(data.max()) >= nr_data:
        i = int(np.argmax(data >= nr_data))
        raise MetadataCorrupt(block=node.block, reason=f"block {int(node.keys[i])} maps to data block "
                                                       f"{int(data[i])} beyond the data device")
    return node.keys, data, times


def leaf_data(pmd: PoolMetadata, node: MappingNode) -> np.ndarray:
    """The data blocks of a leaf (int64), checked against the data device's size, as ``leaf_mappings``
    checks them, without the times.

    Raises:
        MetadataCorrupt: a data block beyond the data device.
    """
    data = (node.values >> np.uint64(TIME_BITS)).astype(np.int64)
    nr_data = pmd.data_sm.nr_blocks
    if len(data) and nr_data and int(data.max()) >= nr_data:
        i = int(np.argmax(data >= nr_data))
        raise MetadataCorrupt(block=node.block, reason=f"block {int(node.keys[i])} maps to data block "
                                                       f"{int(data[i])} beyond the data device")
    return data


def leaves_data(pmd: PoolMetadata, nodes: Sequence[MappingNode]) -> np.ndarray:
    """The data blocks of several leaves, concatenated in order (int64; one numpy pass for all of them),
    checked as ``leaf_data`` checks them.

    Raises:
        MetadataCorrupt: a data block beyond the data device (naming the first such leaf).
    """
    if len(nodes) == 1:
        return leaf_data(pmd, nodes[0])
    data = (np.concatenate([n.values for n in nodes]) >> np.uint64(TIME_BITS)).astype(np.int64)
    nr_data = pmd.data_sm.nr_blocks
    if len(data) and nr_data and int(data.max()) >= nr_data:
        for n in nodes:
            leaf_data(pmd, n)
    return data


class _SkipSeen(Visitor):
    """Walk each node once across several walks (thin_rmap's repeated-visit avoidance), remembering block
    numbers only (the walker's memo would keep the nodes)."""

    def __init__(self, seen: set[int]) -> None:
        self.seen = seen

    def ref(self, b: int, where: Where) -> bool:
        if b in self.seen:
            return False
        self.seen.add(b)
        return True


def mapping_leaves(pmd: PoolMetadata, root: int, *,
                   seen: set[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(thin blocks, data blocks, times) of each non-empty leaf of the mapping tree at ``root``, in key order,
    through the one walker (btree/walk.py: strict policy, child key ranges, cycles, MAX_DEPTH). Memory
    O(depth x fanout). With ``seen``, nodes already in it are skipped and every node visited is added (thin_rmap
    visits a subtree shared by several devices once).

    Raises:
        MetadataCorrupt (with ``path``): a damaged node, a key outside its parent's range, a cycle.
    """
    visitor = _SkipSeen(seen) if seen is not None else None
    # Read-only metadata has no open transaction: reading the store directly keeps a streaming walk from filling
    # the node cache (each node is visited once; the cache would only hold memory).
    source = pmd.store if pmd.readonly else pmd.tm
    for view, _ in walk_views(source, root, value_size=8, visitor=visitor):
        if view.nr_entries:
            yield leaf_mappings(pmd, MappingNode(view.block, True, view.keys.astype(np.int64), view.values))


BATCH_MAPPINGS = 4096  # mappings per batch handed on by batched_leaves (fewer, larger numpy steps)


def batched_leaves(leaves: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                   nr_mappings: int = BATCH_MAPPINGS) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Consecutive leaves joined into batches of at least ``nr_mappings`` (the last may be smaller): the same
    mappings in the same order. Memory: one batch."""
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    n = 0
    for leaf in leaves:
        parts.append(leaf)
        n += len(leaf[0])
        if n >= nr_mappings:
            yield _join(parts)
            parts, n = [], 0
    if parts:
        yield _join(parts)


def _join(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]))


def device_leaves(pmd: PoolMetadata, dev_id: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``mapping_leaves`` of one device (DeviceNotFound if it does not exist)."""
    return mapping_leaves(pmd, pmd.device_root(dev_id))


# --- the IR ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SuperblockIR:
    """thin_dump's <superblock> attributes (``nr_data_blocks`` as thin_dump prints it)."""

    uuid: str
    time: int
    transaction: int
    flags: int
    version: int
    data_block_size: int  # sectors
    nr_data_blocks: int
    metadata_snap: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceDetailsIR:
    """thin_dump's <device> attributes."""

    dev_id: int
    mapped_blocks: int
    transaction: int
    creation_time: int
    snap_time: int


@dataclass(frozen=True, slots=True)
class MapRun:
    """``length`` consecutive thin blocks from ``thin_begin`` mapped to consecutive data blocks from
    ``data_begin``, all with mapping time ``time`` (a thin_dump range_mapping; length 1 is a single_mapping)."""

    thin_begin: int
    data_begin: int
    length: int
    time: int


class MetadataVisitor(Protocol):
    """Receives the IR in order: superblock_b, then per device device_b, map*, device_e; superblock_e; eof."""

    def superblock_b(self, sb: SuperblockIR) -> None: ...
    def device_b(self, dev: DeviceDetailsIR) -> None: ...
    def map(self, runs: Runs) -> None: ...
    def device_e(self) -> None: ...
    def superblock_e(self) -> None: ...
    def eof(self) -> None: ...


def map_runs_of(runs: Runs) -> Iterator[MapRun]:
    """The records of a ``Runs`` batch as handed to ``MetadataVisitor.map`` (steps: thin, data; equals:
    time)."""
    for tb, db, t, n in runs.rows():
        yield MapRun(tb, db, n, t)


def superblock_ir(pmd: PoolMetadata) -> SuperblockIR:
    """The superblock record of open metadata (through a held snapshot, its view)."""
    return SuperblockIR("", pmd.time, pmd.trans_id, pmd.flags, pmd.sb.version, pmd.data_block_size,
                        pmd.sb.data_sm_root.nr_blocks, pmd.held_root or None)


def device_ir(pmd: PoolMetadata, dev_id: int) -> DeviceDetailsIR:
    d = pmd.get_device(dev_id)
    return DeviceDetailsIR(dev_id, d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time)


def emit(pmd: PoolMetadata, visitor: MetadataVisitor, *, dev_ids: Sequence[int] | None = None,
         skip_mappings: bool = False, progress: Callable[[int], None] | None = None) -> None:
    """Walk the metadata once and feed ``visitor`` (thin_dump's order: devices by id, mappings by thin block,
    maximal runs of consecutive thin and data blocks with one time). ``progress`` gets the number of mappings
    done after every leaf. Memory O(depth): one leaf at a time.

    Raises:
        DeviceNotFound for an id in ``dev_ids`` that does not exist; MetadataCorrupt on damage.
    """
    ids = pmd.device_ids() if dev_ids is None else list(dev_ids)
    for d in ids:
        pmd.get_device(d)
    visitor.superblock_b(superblock_ir(pmd))
    for dev_id in ids:
        visitor.device_b(device_ir(pmd, dev_id))
        if not skip_mappings:
            joiner = RunJoiner(2, 1)
            for thin, data, times in batched_leaves(device_leaves(pmd, dev_id)):
                runs = joiner.feed((thin, data), (times,))
                if len(runs):
                    visitor.map(runs)
                if progress is not None:
                    progress(len(thin))
            runs = joiner.flush()
            if len(runs):
                visitor.map(runs)
        visitor.device_e()
    visitor.superblock_e()
    visitor.eof()
