"""thin_delta as a library call: the differences between two thin devices' mappings, as maximal runs, found by
walking both mapping trees together and skipping the subtrees they share.

Layer: tools. May import: thinpool.errors, thinpool.metadata, numpy.

Cost follows the differences: two trees that share a node (same block number = same mappings, since nodes are
copy-on-write) are not descended into there. A shared subtree is reported as "same" runs, which needs its leaves
read once (``include_same=True``, what thin_delta prints); ``include_same=False`` (what an incremental export
needs) skips it unread, so a snapshot with 1 % rewritten costs about 1 % of the tree plus the spine.

Kinds (thin_delta's): ``same`` (both map the block to the same data block), ``different``, ``left_only``
(dev1 only), ``right_only`` (dev2 only). Times are ignored, as thin_delta 0.9.0 ignores them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Literal

import numpy as np

from thinpool.btree.btree import MAX_DEPTH
from thinpool.errors import MetadataCorrupt
from thinpool.metadata.ir import (
    MappingNode,
    RunJoiner,
    Runs,
    batched_leaves,
    leaves_data,
    mapping_leaves,
    read_mapping_node,
)
from thinpool.metadata.pool_metadata import PoolMetadata

Kind = Literal["same", "different", "left_only", "right_only"]
KINDS: tuple[Kind, ...] = ("same", "different", "left_only", "right_only")
_SAME, _DIFFERENT, _LEFT, _RIGHT = range(4)
_INF = 1 << 64
_BATCH_KEYS = 32768  # mappings buffered (both sides) before a comparison: fewer, larger numpy steps


@dataclass(frozen=True, slots=True)
class DeltaRun:
    """``length`` thin blocks from ``begin`` of one kind; data blocks consecutive on each side that maps them."""

    kind: Kind
    begin: int  # first thin block of the run
    length: int  # number of thin blocks
    left_data: int | None  # data block of dev1 at ``begin`` (None where dev1 does not map it)
    right_data: int | None


class _Cursor:
    """One tree's position: the loaded leaves' unconsumed mappings (kept as the leaves' own arrays, joined only
    when taken), and a stack of subtrees still to visit with the lower bound of their keys (every key of the tree
    not yet consumed is buffered or under the stack)."""

    __slots__ = ("pmd", "stack", "kc", "dc", "n")

    def __init__(self, pmd: PoolMetadata, root: int) -> None:
        self.pmd = pmd
        self.stack: list[tuple[int, int, int]] = [(root, 0, 0)]  # (block, lower bound key, depth), top last
        self.kc: list[np.ndarray] = []  # buffered keys, ascending across the chunks
        self.dc: list[np.ndarray | MappingNode] = []  # data blocks, or the leaf they are still to come from
        self.n = 0

    def known_hi(self) -> int:
        """Every key of this tree below this bound is buffered."""
        return self.stack[-1][1] if self.stack else _INF

    def top(self) -> int | None:
        return self.stack[-1][0] if self.stack else None

    def nr_below(self, hi: int) -> int:
        """At least the number of buffered keys below ``hi`` (all buffered keys: a batching hint)."""
        return self.n

    def take_below(self, hi: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.kc:
            z = np.zeros(0, dtype=np.int64)
            return z, z
        keys = self.kc[0] if len(self.kc) == 1 else np.concatenate(self.kc)
        nodes = [c for c in self.dc if isinstance(c, MappingNode)]
        decoded = leaves_data(self.pmd, nodes) if nodes else None  # one numpy pass (and range check) for all
        parts: list[np.ndarray] = []
        i = 0
        for c in self.dc:
            if isinstance(c, MappingNode):
                assert decoded is not None
                parts.append(decoded[i:i + len(c.keys)])
                i += len(c.keys)
            else:
                parts.append(c)
        data = parts[0] if len(parts) == 1 else np.concatenate(parts)
        cut = int(np.searchsorted(keys, hi)) if hi < _INF else len(keys)
        if cut < len(keys):
            self.kc, self.dc = [keys[cut:]], [data[cut:]]
        else:
            self.kc, self.dc = [], []
        self.n = len(keys) - cut
        return keys[:cut], data[:cut]

    def peek(self) -> MappingNode:
        return read_mapping_node(self.pmd, self.stack[-1][0])

    def advance(self, node: MappingNode) -> None:
        """Replace the top subtree by its children (internal) or append its mappings to the buffer (leaf)."""
        _, lo, depth = self.stack.pop()
        hi = self.known_hi()
        if len(node.keys) and (int(node.keys[0]) < lo or int(node.keys[-1]) >= hi):
            raise MetadataCorrupt(block=node.block, reason=f"keys {int(node.keys[0])}..{int(node.keys[-1])} "
                                                           f"outside the parent's range {lo}..{hi}")
        if node.is_leaf:
            if len(node.keys):
                self.kc.append(node.keys)
                self.dc.append(node)  # its data blocks are decoded (and checked) a batch at a time
                self.n += len(node.keys)
            return
        if depth >= MAX_DEPTH:
            raise MetadataCorrupt(block=node.block, reason="btree too deep (cycle?)")
        children = node.values.tolist()
        bounds = node.keys.tolist()
        for i in range(len(children) - 1, -1, -1):
            self.stack.append((int(children[i]), int(bounds[i]), depth + 1))


def _classify(lk: np.ndarray, ld: np.ndarray, rk: np.ndarray, rd: np.ndarray, joiner: RunJoiner) -> Runs:
    """Feed one aligned stretch of both sides (all their keys below one bound) through the joiner."""
    if len(lk) == len(rk) and np.array_equal(lk, rk):  # the usual case: the same blocks mapped on both sides
        kind = np.where(ld == rd, _SAME, _DIFFERENT)
        return joiner.feed((lk, ld, rd), (kind,))
    keys = np.concatenate([lk, rk])
    keys.sort(kind="stable")  # two sorted runs: a merge
    if len(keys) > 1:
        keys = keys[np.append(True, keys[1:] != keys[:-1])]
    li = np.minimum(np.searchsorted(lk, keys), max(len(lk) - 1, 0))
    ri = np.minimum(np.searchsorted(rk, keys), max(len(rk) - 1, 0))
    has_l = (lk[li] == keys) if len(lk) else np.zeros(len(keys), dtype=bool)
    has_r = (rk[ri] == keys) if len(rk) else np.zeros(len(keys), dtype=bool)
    # An absent side carries the thin block itself, which steps by one just as the thin block does, so only the
    # kind (an equal column) decides breaks there; it is reported as None.
    lval = np.where(has_l, ld[li] if len(ld) else keys, keys)
    rval = np.where(has_r, rd[ri] if len(rd) else keys, keys)
    kind = np.where(has_l & has_r, np.where(lval == rval, _SAME, _DIFFERENT), np.where(has_l, _LEFT, _RIGHT))
    return joiner.feed((keys, lval, rval), (kind,))


def _without_same(runs: Runs) -> Runs:
    keep = runs.equals[0] != _SAME
    if keep.all():
        return runs
    return Runs(tuple(c[keep] for c in runs.steps), tuple(c[keep] for c in runs.equals), runs.lengths[keep])


def delta_batches(md: PoolMetadata, dev1: int, dev2: int, *, include_same: bool = True) -> Iterator[Runs]:
    """``delta_runs`` as numpy batches: ``Runs`` with steps (begin, left data, right data), equals (kind index
    into ``KINDS``) and lengths; an absent side's data column holds the thin block (meaningless). Runs are
    maximal across batches. For bulk consumers (the XML writer, export-diff) that want no Python per run.

    Raises:
        DeviceNotFound, MetadataCorrupt.
    """
    left, right = _Cursor(md, md.device_root(dev1)), _Cursor(md, md.device_root(dev2))
    joiner = RunJoiner(3, 1)

    def out(runs: Runs) -> Iterator[Runs]:
        if len(runs):
            r = runs if include_same else _without_same(runs)
            if len(r):
                yield r

    while True:
        lo_hi = min(left.known_hi(), right.known_hi())
        tops_equal = left.top() is not None and left.top() == right.top()
        if tops_equal and include_same:
            node = left.peek()
            if node.is_leaf:  # a shared leaf: its mappings join both buffers (compared "same"), no flush
                left.advance(node)
                right.advance(node)
                continue
        # With the same node next in both trees, neither has a key below that node's keys, which lie above both
        # bounds: everything buffered can be compared, and then the node skipped.
        bound = max(left.known_hi(), right.known_hi()) if tops_equal else lo_hi
        if tops_equal or bound == _INF or left.nr_below(bound) + right.nr_below(bound) >= _BATCH_KEYS:
            lk, ld = left.take_below(bound)
            rk, rd = right.take_below(bound)
            if len(lk) or len(rk):
                yield from out(_classify(lk, ld, rk, rd, joiner))
            if bound == _INF:
                break
            if tops_equal:
                block = left.top()
                assert block is not None
                left.stack.pop()
                right.stack.pop()
                if include_same:
                    for keys, data, _ in batched_leaves(mapping_leaves(md, block)):
                        yield from out(joiner.feed((keys, data, data), (np.zeros(len(keys), dtype=np.int64),)))
                continue
        bound = lo_hi
        sides = [c for c in (left, right) if c.known_hi() == bound]
        nodes = [c.peek() for c in sides]
        if len(sides) == 2 and nodes[0].is_leaf != nodes[1].is_leaf:
            # descend the taller tree until the levels meet: a leaf of one may be a child of the other's node
            i = 0 if not nodes[0].is_leaf else 1
            sides, nodes = [sides[i]], [nodes[i]]
        for c, n in zip(sides, nodes):
            c.advance(n)
    yield from out(joiner.flush())


def delta_runs(md: PoolMetadata, dev1: int, dev2: int, *, include_same: bool = True) -> Iterator[DeltaRun]:
    """The differences between ``dev1`` (left, older) and ``dev2`` (right) as ascending, maximal runs.

    Blocks unmapped in both produce no run. ``include_same=False`` omits "same" runs and never reads a subtree
    the two devices share. Memory O(tree depth x fanout); time O(differing leaves) plus, with ``include_same``,
    the leaves of shared subtrees.

    Raises:
        DeviceNotFound: either device does not exist. MetadataCorrupt: damage in either tree.
    """
    for batch in delta_batches(md, dev1, dev2, include_same=include_same):
        for begin, lval, rval, kind, length in batch.rows():
            yield DeltaRun(KINDS[kind], begin, length, None if kind == _RIGHT else lval,
                           None if kind == _LEFT else rval)


def mapped_runs(md: PoolMetadata, dev: int) -> Iterator[tuple[int, int, int]]:
    """(thin_begin, length, data_begin) runs of consecutive thin blocks mapped to consecutive data blocks (times
    ignored; thin_delta's mapping_recorder). Memory O(depth).

    Raises:
        DeviceNotFound, MetadataCorrupt.
    """
    joiner = RunJoiner(2)
    for keys, data, _ in batched_leaves(mapping_leaves(md, md.device_root(dev))):
        for tb, db, n in joiner.feed((keys, data)).rows():
            yield tb, n, db
    for tb, db, n in joiner.flush().rows():
        yield tb, n, db


def write_delta_xml(out: IO[str], md: PoolMetadata, dev1: int, dev2: int, runs: Iterable[DeltaRun] | None = None,
                    *, verbose: bool, nr_data_blocks: int, held_root: int = 0,
                    batches: Iterable[Runs] | None = None) -> None:
    """thin_delta 0.9.0's XML, byte for byte: verbose lists every range with its data blocks, grouped by kind;
    otherwise adjacent ranges of one kind merge into one element. Give ``runs`` (DeltaRun records) or
    ``batches`` (from ``delta_batches``: no Python per run in the non-verbose form). Streams: O(1) memory."""
    held = f'" metadata_snap="{held_root}' if held_root else ""
    out.write(f'<superblock uuid="" time="{md.time}" transaction="{md.trans_id}" '
              f'data_block_size="{md.data_block_size}" nr_data_blocks="{nr_data_blocks}{held}">\n')
    out.write(f'  <diff left="{dev1}" right="{dev2}">\n')
    if batches is not None:
        if verbose:
            _write_verbose_batches(out, batches)
        else:
            _write_merged(out, batches)
    else:
        assert runs is not None
        if verbose:
            _write_verbose(out, runs)
        else:
            _write_merged(out, _as_batches(runs))
    out.write("  </diff>\n</superblock>\n")


def _write_verbose_batches(out: IO[str], batches: Iterable[Runs]) -> None:
    """The verbose form straight from batches: one line per run, no record objects."""
    current = -1
    for batch in batches:
        lines: list[str] = []
        for begin, lval, rval, kind, length in batch.rows():
            if kind != current:
                if current >= 0:
                    lines.append(f"    </{KINDS[current]}>\n")
                lines.append(f"    <{KINDS[kind]}>\n")
                current = kind
            if kind == _DIFFERENT:
                lines.append(f'      <range begin="{begin}" left_data_begin="{lval}" right_data_begin="{rval}" '
                             f'length="{length}"/>\n')
            else:
                lines.append(f'      <range begin="{begin}" data_begin="{rval if kind == _RIGHT else lval}" '
                             f'length="{length}"/>\n')
        out.write("".join(lines))
    if current >= 0:
        out.write(f"    </{KINDS[current]}>\n")


def _as_batches(runs: Iterable[DeltaRun]) -> Iterator[Runs]:
    rows: list[tuple[int, int, int]] = []
    for r in runs:
        rows.append((r.begin, r.length, KINDS.index(r.kind)))
        if len(rows) >= 4096:
            yield _rows_batch(rows)
            rows = []
    if rows:
        yield _rows_batch(rows)


def _rows_batch(rows: list[tuple[int, int, int]]) -> Runs:
    a = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return Runs((a[:, 0], a[:, 0], a[:, 0]), (a[:, 2],), a[:, 1])


def _write_verbose(out: IO[str], runs: Iterable[DeltaRun]) -> None:
    lines: list[str] = []
    current: str | None = None
    for r in runs:
        if r.kind != current:
            if current is not None:
                lines.append(f"    </{current}>\n")
            lines.append(f"    <{r.kind}>\n")
            current = r.kind
        if r.kind == "different":
            lines.append(f'      <range begin="{r.begin}" left_data_begin="{r.left_data}" '
                         f'right_data_begin="{r.right_data}" length="{r.length}"/>\n')
        else:
            d = r.right_data if r.kind == "right_only" else r.left_data
            lines.append(f'      <range begin="{r.begin}" data_begin="{d}" length="{r.length}"/>\n')
        if len(lines) >= 4096:
            out.write("".join(lines))
            lines.clear()
    if current is not None:
        lines.append(f"    </{current}>\n")
    out.write("".join(lines))


def _write_merged(out: IO[str], batches: Iterable[Runs]) -> None:
    """Adjacent ranges of one kind merge (numpy within a batch, a pending element across batches)."""
    kind = -1  # the pending element: kind index, begin, end
    begin = end = 0
    for batch in batches:
        b = batch.steps[0]
        e = b + batch.lengths
        k = batch.equals[0]
        brk = np.ones(len(b), dtype=bool)
        brk[1:] = (k[1:] != k[:-1]) | (b[1:] != e[:-1])
        starts = np.flatnonzero(brk)
        ends = np.append(starts[1:], len(b)) - 1
        gk, gb, ge = k[starts].tolist(), b[starts].tolist(), e[ends].tolist()
        lines: list[str] = []
        for kk, bb, ee in zip(gk, gb, ge):
            if kk == kind and bb == end:
                end = ee
                continue
            if kind >= 0:
                lines.append(f'    <{KINDS[kind]} begin="{begin}" length="{end - begin}"/>\n')
            kind, begin, end = kk, bb, ee
        out.write("".join(lines))
    if kind >= 0:
        out.write(f'    <{KINDS[kind]} begin="{begin}" length="{end - begin}"/>\n')
