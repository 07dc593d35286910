"""Metadata checker, at least as strict as the strictest thin_check (Rust 1.x), plus the time invariant.

Layer: metadata. May import: errors, checksum, formats, io, btree.walk, spacemap, metadata.pool_metadata.

``repair_leaks`` is `check --auto-repair`: it lowers over-counted (leaked) blocks to the counts the walk found.

Walks everything reachable from the superblock without trusting the space maps, validating every node (checksum,
self block number, flags, value size, max_entries, nr_entries, key order, one-third fill for non-roots, parent key
<= first child key, leaf key order across a tree, cycles), then recomputes the metadata and data reference counts
(dm-thin's rules: one metadata reference per distinct parent; one data reference per entry of each distinct
bottom-level leaf) and compares them with both space maps (under-count = error, over-count = leak). It also checks
details == top level of the mapping tree, mapped_blocks, and that every data block mapped by more than one device
is mapped with a time older than each such device's snapshotted_time (otherwise a write could overwrite shared
data in place; no thin-provisioning-tools version checks this).

Memory (4M mappings: ~57 MB for the whole process): one reference count per metadata block, the data reference
counts (dense: a byte per data block up to 2^25 blocks, saturating with exact counts above 255 kept aside; sparse
pairs beyond), a summary per distinct mapping-tree node (first/last key, mappings, latest time: a subtree shared
with another device is counted from it, not read again), and the data blocks of mappings not older than their
device's snapshotted_time (up to 1M; beyond that their leaves are read again for the time rule). No per-mapping
Python objects; the mapping leaves are walked once, folded in numpy batches per bottom internal node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from thinpool import checksum
from thinpool.btree.walk import SALVAGE, Memo, NodeView, Visitor, Where, read_view, walk
from thinpool.checksum import BlockType
from thinpool.errors import ChecksumError, MetadataCorrupt, MetadataError, StoreIOError
from thinpool.formats.device_details import parse_device_details, unpack_block_times
from thinpool.formats.space_map import (
    ENTRIES_PER_BITMAP,
    IndexEntry,
    SmRoot,
    decode_bitmap,
    parse_index_entry,
    parse_metadata_index,
)
from thinpool.formats.superblock import Superblock
from thinpool.io.block_store import BlockStore
from thinpool.metadata.pool_metadata import PoolMetadata

E = ENTRIES_PER_BITMAP


@dataclass
class Problem:
    section: str
    message: str
    block: int | None = None
    fatal: bool = True
    warning: bool = False  # a hazard no thin_check reports (shared block with a too-recent time): not fatal

    def __str__(self) -> str:
        where = f" (block {self.block})" if self.block is not None else ""
        return f"{self.message}{where}"


@dataclass
class CheckReport:
    transaction_id: int = 0
    needs_check: bool = False
    metadata_blocks: int = 0
    metadata_free_blocks: int = 0
    data_blocks: int = 0
    data_used_blocks: int = 0
    devices: int = 0
    mappings: int = 0
    problems: list[Problem] = field(default_factory=list)
    # every over-counted block (not capped like the problems): (block, count in the space map, references found),
    # in block order; what --auto-repair lowers the counts to
    leaked_data: list[tuple[int, int, int]] = field(default_factory=list)
    leaked_metadata: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    @property
    def leaks(self) -> list[Problem]:
        return [p for p in self.problems if not p.fatal and not p.warning]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.warning]

    @property
    def ok(self) -> bool:
        """No errors and no leaks (what thin_check's exit status 0 means). Warnings are reported separately."""
        return not self.errors and not self.leaks


class _Walker:
    """The checker's bookkeeping over the one B-tree walker (btree/walk.py, SALVAGE policy, shared memo): metadata
    reference counts (one per reference, revisits included), problems, and the per-node rules thin_check adds
    (one-third fill for non-roots, parent key <= first child key, no empty internal node)."""

    def __init__(self, store: BlockStore, report: CheckReport, nr_meta: int) -> None:
        self.store = store
        self.report = report
        self.nr_meta = nr_meta
        self.meta = np.zeros(nr_meta, dtype=np.int64)
        self.visited: Memo = {}  # nodes of the small trees (details, top level, space maps)
        self.summary: dict[int, _Summary | None] = {}  # mapping-tree subtrees (see _MapVisitor)
        self.reach: dict[int, int] = {}  # mapping-tree nodes reached more than once: how often
        self.late_kept = 0
        self.section = "superblock"

    def problem(self, msg: str, block: int | None = None, fatal: bool = True, warning: bool = False) -> None:
        if len(self.report.problems) < 1000:
            self.report.problems.append(Problem(self.section, msg, block, fatal and not warning, warning))

    def ref(self, b: int) -> bool:
        """Count a reference to metadata block b; True if it is in range."""
        if not 0 <= b < self.nr_meta:
            self.problem(f"block pointer {b} beyond the metadata device ({self.nr_meta} blocks)", b)
            return False
        self.meta[b] += 1
        return True

    def raw(self, b: int, bt: BlockType, what: str) -> bytes | None:
        if not self.ref(b):
            return None
        try:
            buf = self.store.read_block(b)
            checksum.validate(buf, bt, b, what)
        except (MetadataError, StoreIOError) as e:
            self.problem(f"{what}: {e}" if isinstance(e, ChecksumError) or not isinstance(e, MetadataCorrupt)
                         else f"bad block nr in {what}", b)
            return None
        return buf

    def tree(self, root: int, value_size: int, on_leaf: Callable[[NodeView], None] | None = None,
             is_root_exempt: bool = True) -> tuple[bool, list[tuple[np.ndarray, NodeView]]]:
        """Reference and walk a tree; on_leaf is called once per distinct leaf. Returns (ok, leaves in order)."""
        v = _CheckVisitor(self, on_leaf)
        walk(self.store, root, v, value_size=value_size, policy=SALVAGE, memo=self.visited, revisit="replay")
        ok = v.ok
        last = None
        for keys, node in v.leaves:
            if len(keys) and last is not None and keys[0] <= last:
                self.problem(f"leaf keys out of order across leaves ({keys[0]} after {last})", node.block)
                ok = False
            if len(keys):
                last = keys[-1]
        return ok, v.leaves


class _CheckVisitor(Visitor):
    def __init__(self, w: _Walker, on_leaf: Callable[[NodeView], None] | None) -> None:
        self.w = w
        self.on_leaf = on_leaf
        self.ok = True
        self.leaves: list[tuple[np.ndarray, NodeView]] = []

    def ref(self, b: int, where: Where) -> bool:
        if not self.w.ref(b):
            self.ok = False
            return False
        return True

    def error(self, err: MetadataCorrupt, where: Where) -> None:
        # the walker's own findings (cycles, pointers, depth) are reported by their reason alone
        f = err.fields
        self.w.problem(f["reason"] if f.get("found_by") == "walker" else str(err), f.get("block"))
        self.ok = False

    def node(self, view: NodeView, where: Where) -> None:
        n, w, b = view.nr_entries, self.w, view.block
        if not where.is_root and n < view.max_entries // 3:
            w.problem(f"too few entries in btree_node: {n}, expected at least {view.max_entries // 3}", b)
        if where.parent_key is not None and n and int(view.keys[0]) < where.parent_key:
            w.problem(f"parent key mismatch: parent says {where.parent_key}, child starts at {view.keys[0]}", b)
        if not view.is_leaf and n == 0:
            w.problem("empty internal node", b)

    def leaf(self, view: NodeView, where: Where) -> None:
        self.leaves.append((view.keys, view))
        if where.first and self.on_leaf is not None:
            self.on_leaf(view)


def _load_sm_counts(w: _Walker, root: SmRoot, is_metadata: bool) -> np.ndarray | None:
    """Reference the space map's own blocks and decode its counts; None if unreadable."""
    kind = "metadata" if is_metadata else "data"
    n = -(-root.nr_blocks // E)
    entries = []
    if is_metadata:
        buf = w.raw(root.bitmap_root, BlockType.INDEX, "metadata index block")
        if buf is None:
            return None
        entries = parse_metadata_index(buf, min(n, 255))
    else:
        found = _sm_index(w, root)
        if found is None:
            return None
        entries = found
    counts = np.zeros(n * E, dtype=np.int64)
    good = True
    for i, e in enumerate(entries):
        buf = w.raw(e.blocknr, BlockType.BITMAP, f"{kind} space map bitmap")
        if buf is None:
            good = False
            continue
        counts[i * E:(i + 1) * E] = decode_bitmap(buf)
    rc_counts: dict[int, int] = {}

    def on_leaf(node: NodeView) -> None:
        for k, v in zip(node.keys, node.values):
            rc_counts[int(k)] = int(v)

    ok, _ = w.tree(root.ref_count_root, 4, on_leaf)
    if not ok or not good:
        return None
    counts = counts[:root.nr_blocks]
    for b, c in rc_counts.items():
        if b >= len(counts) or counts[b] != 3:
            w.problem(f"{kind} ref-count tree has block {b} whose bitmap entry is not 3", root.ref_count_root)
        elif c < 3:
            w.problem(f"{kind} ref-count tree holds count {c} < 3 for block {b}", root.ref_count_root)
        else:
            counts[b] = c
    missing = [int(b) for b in np.flatnonzero(counts == 3) if int(b) not in rc_counts]
    if missing:
        w.problem(f"{kind} block {missing[0]} has bitmap entry 3 but no ref-count tree entry", root.ref_count_root)
    return counts


class _Refs:
    """Data references found in the mapping leaves (one per entry of each distinct leaf).

    Dense when the data device is small enough (one uint8 per data block, saturating at 255 with exact counts
    above that in a dict: 16 MiB for 16M data blocks), else sparse: (block, count) pairs compacted as they come
    (memory O(distinct mapped blocks)). Leaves are folded in batches (fewer numpy steps)."""

    DENSE_LIMIT = 1 << 25  # data blocks (32 MiB of counts; 2 TiB of 64 KiB chunks)

    def __init__(self, nr_data: int) -> None:
        self.chunks: list[np.ndarray] = []
        self.pending = 0
        self.dense: np.ndarray | None = np.zeros(max(nr_data, 1), dtype=np.uint8) \
            if nr_data <= self.DENSE_LIMIT else None
        self.over: dict[int, int] = {}  # dense: exact counts >= 255
        self.blocks = np.zeros(0, dtype=np.int64)  # sparse
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, blocks: np.ndarray) -> None:
        self.chunks.append(blocks)
        self.pending += len(blocks)
        if self.pending > (1 << 16 if self.dense is not None else 1 << 21):
            self.flush()

    def flush(self) -> None:
        if not self.chunks:
            return
        new, cnt = np.unique(np.concatenate(self.chunks).astype(np.int64), return_counts=True)
        self.chunks, self.pending = [], 0
        if self.dense is not None:
            cur = self.dense[new].astype(np.int64)
            sat = cur == 255
            if sat.any():
                cur[sat] = [self.over[b] for b in new[sat].tolist()]
            cur += cnt
            big = cur >= 255
            if big.any():
                self.over.update(zip(new[big].tolist(), cur[big].tolist()))
            self.dense[new] = np.minimum(cur, 255)
            return
        allb = np.concatenate([self.blocks, new])
        allc = np.concatenate([self.counts, cnt])
        self.blocks, inv = np.unique(allb, return_inverse=True)
        self.counts = np.bincount(inv, weights=allc).astype(np.int64)

    def expected(self, lo: int, hi: int) -> np.ndarray:
        """int64 reference counts of data blocks [lo, hi) (call ``flush`` first)."""
        if self.dense is not None:
            e = self.dense[lo:hi].astype(np.int64)
            if self.over and (e == 255).any():
                for j in np.flatnonzero(e == 255).tolist():
                    e[j] = self.over[lo + j]
            return e
        e = np.zeros(hi - lo, dtype=np.int64)
        a, z = np.searchsorted(self.blocks, [lo, hi])
        e[self.blocks[a:z] - lo] = self.counts[a:z]
        return e

    def any_shared(self) -> bool:
        """Some data block has two references or more (call ``flush`` first)."""
        if self.dense is not None:
            return bool(self.dense.max() > 1)
        return bool(len(self.counts) and self.counts.max() > 1)

    def users(self, blocks: np.ndarray) -> np.ndarray:
        """Reference counts of ``blocks`` (int64; call ``flush`` first)."""
        if self.dense is not None:
            got: np.ndarray = self.dense[blocks].astype(np.int64)  # saturated at 255: only "> 1" is asked
            return got
        i = np.searchsorted(self.blocks, blocks)
        i = np.minimum(i, max(len(self.blocks) - 1, 0))
        if not len(self.blocks):
            return np.zeros(len(blocks), dtype=np.int64)
        return np.where(self.blocks[i] == blocks, self.counts[i], 0)


# A subtree's summary, kept per distinct mapping-tree node (the checker's memo, instead of the nodes):
# (first leaf key, last leaf key, number of mappings, latest mapping time, the node's own first key, its
# nr_entries, max_entries, is_leaf, every node below valid). None while being walked, or when the node failed.
_Summary = tuple[int, int, int, int, int, int, int, bool, bool]
_LATE_KEPT = 1 << 20  # data blocks of candidate mappings kept from the walk (8 MiB); leaves beyond are re-read


class _MapVisitor(Visitor):
    """One device's bottom-level mapping tree, walked with the summary memo: a subtree reached before (shared
    with another device's tree) is counted (one metadata reference, its mappings, key order) from its summary and
    not read again. First visits add their data references and note leaves that may hold a shared block with a
    too-recent time (checked once all references are known, by ``_time_candidates``)."""

    def __init__(self, w: _Walker, dev_id: int, snap_time: int, nr_data: int, refs: _Refs) -> None:
        self.w = w
        self.dev_id = dev_id
        self.snap = snap_time
        self.nr_data = nr_data
        self.refs = refs
        self.ok = True
        self.count = 0
        self.last: int | None = None
        self.max_time = -1
        # (block, path from the device root, reached again, or the leaf's late data blocks): subtrees holding a
        # mapping time >= snap_time
        self.candidates: list[tuple[int, tuple[int, ...], bool | np.ndarray]] = []
        self.pending: list[tuple[int, tuple[int, ...], np.ndarray, int, int, int]] = []

    def _node_rules(self, b: int, n: int, max_entries: int, key0: int | None, is_leaf: bool, where: Where) -> None:
        w = self.w
        if not where.is_root and n < max_entries // 3:
            w.problem(f"too few entries in btree_node: {n}, expected at least {max_entries // 3}", b)
        if where.parent_key is not None and n and key0 is not None and key0 < where.parent_key:
            w.problem(f"parent key mismatch: parent says {where.parent_key}, child starts at {key0}", b)
        if not is_leaf and n == 0:
            w.problem("empty internal node", b)

    def _order(self, first: int, last: int, b: int) -> None:
        if self.last is not None and first <= self.last:
            self.w.problem(f"leaf keys out of order across leaves ({first} after {self.last})", b)
            self.ok = False
        self.last = last

    def ref(self, b: int, where: Where) -> bool:
        w = self.w
        if not w.ref(b):
            self.ok = False
            return False
        summ = w.summary
        if b not in summ:
            summ[b] = None
            return True
        s = summ[b]
        w.reach[b] = w.reach.get(b, 1) + 1
        self.flush()  # the candidates stay in key order
        if s is None:  # failed (reported once, when first reached)
            self.ok = False
            return False
        first, last, count, max_time, key0, n, max_entries, is_leaf, ok = s
        self._node_rules(b, n, max_entries, key0, is_leaf, where)
        if count:
            self._order(first, last, b)
        self.count += count
        self.ok = self.ok and ok
        if max_time > self.max_time:
            self.max_time = max_time
        if max_time >= self.snap:
            self.candidates.append((b, where.path, True))
        return False

    def error(self, err: MetadataCorrupt, where: Where) -> None:
        f = err.fields
        self.w.problem(f["reason"] if f.get("found_by") == "walker" else str(err), f.get("block"))
        self.ok = False

    def node(self, view: NodeView, where: Where) -> None:
        n = view.nr_entries
        self._node_rules(view.block, n, view.max_entries, int(view.keys[0]) if n else None, view.is_leaf, where)

    def leaf(self, view: NodeView, where: Where) -> None:
        n = view.nr_entries
        b = view.block
        if not n:
            self.w.summary[b] = (0, 0, 0, -1, 0, 0, view.max_entries, True, True)
            return
        first, last = view.first_key, view.last_key
        self._order(first, last, b)
        self.count += n
        # folded in batches (``flush``): the leaves of one bottom internal node, or until a revisit
        self.pending.append((b, where.path, view.values, first, last, view.max_entries))

    def flush(self) -> None:
        """Fold the pending leaves: data references, latest times, summaries, time candidates."""
        pend = self.pending
        if not pend:
            return
        self.pending = []
        w = self.w
        lens = np.array([len(p[2]) for p in pend], dtype=np.int64)
        starts = np.zeros(len(pend) + 1, dtype=np.int64)
        np.cumsum(lens, out=starts[1:])
        blocks, times = unpack_block_times(np.concatenate([p[2] for p in pend]))
        bad = blocks >= self.nr_data
        any_bad = bool(bad.any())
        if any_bad:
            for i in np.unique(np.searchsorted(starts, np.flatnonzero(bad), side="right") - 1).tolist():
                lb = blocks[starts[i]:starts[i + 1]]
                w.problem(f"device {self.dev_id}: mapping to data block {int(lb[lb >= self.nr_data][0])} beyond "
                          f"the data device ({self.nr_data} blocks)", pend[i][0])
            self.refs.add(blocks[~bad])
        else:
            self.refs.add(blocks)
        mts = np.maximum.reduceat(times, starts[:-1]).tolist()
        summ = w.summary
        for p, n, mt in zip(pend, lens.tolist(), mts):
            summ[p[0]] = (p[3], p[4], n, mt, p[3], n, p[5], True, True)
        mx = max(mts)
        if mx > self.max_time:
            self.max_time = mx
        if mx < self.snap:
            return
        snap = np.uint64(self.snap)
        for i, mt in enumerate(mts):
            if mt < self.snap:
                continue
            lo, hi = int(starts[i]), int(starts[i + 1])
            late = blocks[lo:hi][times[lo:hi] >= snap]
            if not any_bad and w.late_kept + len(late) <= _LATE_KEPT:
                w.late_kept += len(late)  # kept: no second read of this leaf
                self.candidates.append((pend[i][0], pend[i][1], late))
            else:
                self.candidates.append((pend[i][0], pend[i][1], False))

    def node_end(self, view: NodeView, where: Where) -> None:
        self.flush()
        summ = self.w.summary
        first = last = None
        count, mt, ok = 0, -1, True
        for c in view.values.tolist():
            s = summ.get(c)
            if s is None:
                ok = False
                continue
            if s[2]:
                if first is None:
                    first = s[0]
                last = s[1]
            count += s[2]
            mt = max(mt, s[3])
            ok = ok and s[8]
        n = view.nr_entries
        summ[view.block] = (first or 0, last or 0, count, mt, int(view.keys[0]) if n else 0, n, view.max_entries,
                            False, ok)


def _first_late(store: BlockStore, b: int, snap: int, data_block: int) -> tuple[int, int]:
    """(data block, time) of the first mapping of leaf ``b`` to ``data_block`` with a time >= ``snap``."""
    blocks, times = unpack_block_times(read_view(store, b, value_size=8).values)
    i = int(np.flatnonzero((blocks == np.uint64(data_block)) & (times >= np.uint64(snap)))[0])
    return int(blocks[i]), int(times[i])


def _time_candidates(w: _Walker, store: BlockStore, refs: _Refs, nr_data: int, snap: int,
                     candidates: list[tuple[int, tuple[int, ...], bool | np.ndarray]]) -> tuple[int, int] | None:
    """The first mapping of ``dev_id`` (in key order) whose data block is shared and whose time is not older
    than the device's snapshotted_time: (data block, time) or None. A block is shared when two leaf entries
    map it, or when its leaf lies under a node reached from two places (a subtree two devices share)."""
    reach = w.reach
    for b, path, again in candidates:
        if isinstance(again, np.ndarray):  # a first-visit leaf whose late mappings the walk kept
            if reach.get(b, 1) > 1 or any(reach.get(p, 1) > 1 for p in path):
                again = False  # the whole leaf is shared: read it again for the first late mapping's time
            else:
                db = again.astype(np.int64)
                hit = np.flatnonzero(refs.users(db) > 1)
                if hit.size:
                    return _first_late(store, b, snap, int(db[hit[0]]))
                continue
        stack = [(b, again or any(reach.get(p, 1) > 1 for p in path))]
        while stack:
            blk, shared_above = stack.pop()
            view = read_view(store, blk, value_size=8)
            shared_here = shared_above or reach.get(blk, 1) > 1
            if not view.is_leaf:
                stack.extend((c, shared_here) for c in view.values.tolist()[::-1])
                continue
            if not view.nr_entries:
                continue
            blocks, times = unpack_block_times(view.values)
            late = times >= np.uint64(snap)
            if not late.any():
                continue
            db = blocks.astype(np.int64)
            shared = np.ones(len(db), dtype=bool) if shared_here else \
                refs.users(np.minimum(db, max(nr_data - 1, 0))) > 1
            bad = late & shared
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                return int(db[i]), int(times[i])
    return None


def _sm_index(w: _Walker, root: SmRoot) -> list[IndexEntry] | None:
    """The data space map's index entries (its nodes referenced); None if unreadable."""
    n = -(-root.nr_blocks // E)
    ok, leaves = w.tree(root.bitmap_root, 16)
    if not ok:
        return None
    entries: list[IndexEntry] = []
    i = 0
    for keys, node in leaves:
        for k, v in zip(keys.tolist(), node.values):
            if k != i:
                w.problem(f"data space map index: key {k} where {i} expected", node.block)
                return None
            entries.append(parse_index_entry(v))
            i += 1
    if len(entries) != n:
        w.problem(f"data space map index has {len(entries)} bitmaps, expected {n}", root.bitmap_root)
        return None
    return entries


_Pending = list[tuple[str, "int | None", bool]]


def _stream_data_sm(w: _Walker, root: SmRoot, refs: _Refs | None
                    ) -> tuple[int, _Pending] | None:
    """Check the data space map bitmap by bitmap against the references found (memory: one bitmap, the
    ref-count entries and the references, ``_Refs``; never an int64 array over the data device). Returns (blocks in use,
    the comparison's problems, for the caller to report in thin_check's order), or None if unreadable."""
    entries = _sm_index(w, root)
    if entries is None:
        return None
    rc_counts: dict[int, int] = {}

    def on_leaf(node: NodeView) -> None:
        for k, v in zip(node.keys.tolist(), node.values.tolist()):
            rc_counts[int(k)] = int(v)

    ok_rc, _ = w.tree(root.ref_count_root, 4, on_leaf)
    rc_keys = np.array(sorted(rc_counts), dtype=np.int64)
    nr = root.nr_blocks
    rc_problems: _Pending = []
    cmp_problems: _Pending = []
    missing: int | None = None
    leaks = 0
    used = 0
    good = True
    for i, e in enumerate(entries):
        buf = w.raw(e.blocknr, BlockType.BITMAP, "data space map bitmap")
        if buf is None:
            good = False
            continue
        lo = i * E
        valid = min(E, nr - lo)
        counts = decode_bitmap(buf)[:valid].astype(np.int64)
        a, z = np.searchsorted(rc_keys, [lo, lo + valid])
        for b in rc_keys[a:z].tolist():
            c = rc_counts[b]
            if counts[b - lo] != 3:
                rc_problems.append((f"data ref-count tree has block {b} whose bitmap entry is not 3",
                                    root.ref_count_root, True))
            elif c < 3:
                rc_problems.append((f"data ref-count tree holds count {c} < 3 for block {b}", root.ref_count_root,
                                    True))
            else:
                counts[b - lo] = c
        if missing is None:
            threes = np.flatnonzero(counts == 3) + lo
            threes = threes[~np.isin(threes, rc_keys)]
            if threes.size:
                missing = int(threes[0])
        used += int(np.count_nonzero(counts))
        if refs is None:
            continue
        expected = refs.expected(lo, lo + valid)
        for j in np.flatnonzero(counts != expected).tolist():
            b = lo + j
            if counts[j] > expected[j]:
                leaks += 1
                w.report.leaked_data.append((b, int(counts[j]), int(expected[j])))
                if leaks <= 10:
                    cmp_problems.append((f"data block {b} leaked: space map says {counts[j]}, expected {expected[j]}",
                                         None, False))
            else:
                cmp_problems.append((f"data reference counts differ for block {b}, expected {expected[j]}, but got "
                                     f"{counts[j]}", None, True))
    if not ok_rc or not good:
        return None
    for b in rc_keys[rc_keys >= nr].tolist():
        rc_problems.append((f"data ref-count tree has block {b} whose bitmap entry is not 3", root.ref_count_root,
                            True))
    if missing is not None:
        rc_problems.append((f"data block {missing} has bitmap entry 3 but no ref-count tree entry",
                            root.ref_count_root, True))
    for msg, block, fatal in rc_problems:
        w.problem(msg, block, fatal)
    if leaks > 10:
        cmp_problems.append((f"{leaks} data blocks have leaked in all", None, False))
    return used, cmp_problems


def _compare(w: _Walker, kind: str, stored: np.ndarray | None, expected: np.ndarray) -> None:
    if stored is None:
        return
    n = min(len(stored), len(expected))
    if len(expected) > len(stored) and expected[len(stored):].any():
        b = len(stored) + int(np.flatnonzero(expected[len(stored):])[0])
        w.problem(f"{kind} block {b} is in use beyond the end of the {kind} space map ({len(stored)} blocks)",
                  b if kind == "metadata" else None)
    diff = np.flatnonzero(stored[:n] != expected[:n])
    leaks = 0
    for b in diff.tolist():
        if stored[b] > expected[b]:
            leaks += 1
            (w.report.leaked_metadata if kind == "metadata" else w.report.leaked_data).append(
                (b, int(stored[b]), int(expected[b])))
            if leaks <= 10:
                w.problem(f"{kind} block {b} leaked: space map says {stored[b]}, expected {expected[b]}",
                          b if kind == "metadata" else None, fatal=False)
        else:
            w.problem(f"{kind} reference counts differ for block {b}, expected {expected[b]}, but got {stored[b]}",
                      b if kind == "metadata" else None)
    if leaks > 10:
        w.problem(f"{leaks} {kind} blocks have leaked in all", None, fatal=False)


def blocks_in_use(sb: Superblock, *, trees_only: bool = False) -> int:
    """The metadata blocks a full check reads about once: those in use, from the superblock's metadata
    space-map root (no walk); with ``trees_only``, less the space maps' bitmaps and the metadata index (about
    what a tool that reads only the details and mapping trees reads: ls, delta, map). A progress bar's total."""
    n = int(sb.metadata_sm_root.nr_allocated)
    if trees_only:
        n -= sum(-(-int(r.nr_blocks) // E) for r in (sb.metadata_sm_root, sb.data_sm_root)) + 1
    return max(n, 1)


def check_metadata(store: BlockStore, *, use_metadata_snap: bool = False, skip_mappings: bool = False) -> CheckReport:
    """Check the metadata on ``store`` and return a report (never raises for damaged metadata)."""
    report = CheckReport()
    try:
        sb = PoolMetadata.read_superblock(store)
    except (MetadataError, StoreIOError) as e:
        report.problems.append(Problem("superblock", str(e), 0))
        return report
    report.transaction_id = sb.trans_id
    report.needs_check = sb.needs_check
    w = _Walker(store, report, store.nr_blocks)
    report.metadata_blocks = sb.metadata_sm_root.nr_blocks
    report.data_blocks = sb.data_sm_root.nr_blocks
    if sb.incompat_flags:
        w.problem(f"unsupported incompat flags {sb.incompat_flags:#x}", 0)
    if sb.metadata_sm_root.nr_blocks > store.nr_blocks:
        w.problem(f"metadata space map has {sb.metadata_sm_root.nr_blocks} blocks but the device only "
                  f"{store.nr_blocks}", 0)
        return report  # sizes from a damaged superblock: counting against them is meaningless (and may not fit)
    for kind, r in (("metadata", sb.metadata_sm_root), ("data", sb.data_sm_root)):
        if r.nr_allocated > r.nr_blocks:  # (what a writable open refuses too: spacemap load)
            w.problem(f"{kind} space map: {r.nr_allocated} blocks allocated of {r.nr_blocks}", 0)
    if sb.data_sm_root.nr_blocks > store.nr_blocks * E:
        w.problem(f"data space map has {sb.data_sm_root.nr_blocks} blocks: more than {store.nr_blocks} metadata "
                  "blocks of bitmaps can count", 0)
        return report
    w.ref(0)
    view: Superblock = sb
    if sb.held_root:
        w.section = "metadata snapshot"
        buf = w.raw(sb.held_root, BlockType.SUPERBLOCK, "metadata snapshot superblock")
        if buf is not None:
            try:  # the same validation as reading through the snapshot (magic, sizes)
                PoolMetadata.read_superblock(store, sb.held_root)
            except MetadataError as e:
                w.problem(f"metadata snapshot superblock: {e}", sb.held_root)
                buf = None
        if buf is not None and use_metadata_snap:
            from thinpool.formats.superblock import parse_superblock
            held = parse_superblock(buf, sb.held_root)
            view = sb.replace(device_details_root=held.device_details_root, data_mapping_root=held.data_mapping_root)
            report.transaction_id = held.trans_id  # the snapshot's, as thin_check 0.9.0 -m prints
    nr_data = sb.data_sm_root.nr_blocks
    data_refs = _Refs(nr_data)
    roots = [(sb, "live")]
    if sb.held_root and buf is not None:
        from thinpool.formats.superblock import parse_superblock
        roots.append((parse_superblock(buf, sb.held_root), "metadata snapshot"))
    dev_details: dict[int, tuple[int, int, int, int]] = {}
    time_problems: list[tuple[str, bool]] = []  # the live view's time findings, reported if nothing else is wrong
    for which, label in roots:
        w.section = f"devices tree ({label})"
        details: dict[int, tuple[int, int, int, int]] = {}

        # Collect entries from the leaves the walk returns, not from an on_leaf callback: on_leaf runs once per
        # distinct leaf across *all* trees walked, so a leaf the live tree shares with the held metadata snapshot's
        # tree was skipped for the snapshot, which then looked as if it lacked those devices (false "devices in
        # the details tree and the mapping tree differ").
        _, detail_leaves = w.tree(which.device_details_root, 24)
        for _keys, node in detail_leaves:
            for k, v in zip(node.keys, node.values):
                d = parse_device_details(v)
                details[int(k)] = (d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time)
        w.section = f"mapping tree ({label})"
        top: dict[int, int] = {}
        owned: set[int] = set()  # devices whose top-level leaf is first reached in this walk

        def on_top(node: NodeView, owned: set[int] = owned) -> None:
            owned.update(int(k) for k in node.keys)

        _, top_leaves = w.tree(which.data_mapping_root, 8, on_top)
        for _keys, node in top_leaves:
            for k, v in zip(node.keys, node.values):
                top[int(k)] = int(v)
        if (which is sb) == (not use_metadata_snap or not sb.held_root):
            dev_details = details
        if set(details) != set(top):
            w.problem(f"devices in the details tree and the mapping tree differ: "
                      f"{sorted(set(details) ^ set(top))[:10]}", which.data_mapping_root)
        times_here = label == "live" and not use_metadata_snap and not skip_mappings
        per_dev: list[tuple[int, _MapVisitor]] = []
        for dev_id in sorted(top):
            root = top[dev_id]
            if skip_mappings:
                if dev_id in owned:
                    w.ref(root)
                continue
            if dev_id not in owned:
                # A top-level leaf shared with a tree walked before holds one reference on each subtree root,
                # already counted: the subtree's summary gives the mappings for the mapped_blocks check.
                s = w.summary.get(root)
                ok, n = (s is not None and s[8]), (s[2] if s is not None else 0)
            else:
                dd = details.get(dev_id)
                v = _MapVisitor(w, dev_id, dd[3] if dd is not None else 0, nr_data, data_refs)
                walk(store, root, v, value_size=8, policy=SALVAGE)
                v.flush()
                ok, n = v.ok, v.count
                per_dev.append((dev_id, v))
            if ok and (label == "live" or use_metadata_snap):
                report.mappings += n
                dd = details.get(dev_id)
                if dd is not None and dd[0] != n:
                    w.problem(f"thin device {dev_id} has unexpected number of mappings, expected {n}, actual {dd[0]}",
                              root)
        data_refs.flush()
        if times_here:
            time_problems = _times(w, store, which, details, per_dev, data_refs, nr_data)
    report.devices = len(dev_details)
    # times: every shared data block must be older than each mapping device's snapshotted_time.
    w.section = "mapping times"
    if not skip_mappings and not report.errors:
        if use_metadata_snap:
            _check_times(w, store, view, dev_details)
        for msg, warning in time_problems:
            w.problem(msg, warning=warning)
    # space maps
    w.section = "space map counts"
    data = _stream_data_sm(w, sb.data_sm_root, None if skip_mappings else data_refs)
    meta_counts = _load_sm_counts(w, sb.metadata_sm_root, True)
    if data is not None:
        for msg, block, fatal in data[1]:
            w.problem(msg, block, fatal)
    _compare(w, "metadata", meta_counts, w.meta[:sb.metadata_sm_root.nr_blocks]
             if len(w.meta) >= sb.metadata_sm_root.nr_blocks else w.meta)
    if len(w.meta) > sb.metadata_sm_root.nr_blocks and w.meta[sb.metadata_sm_root.nr_blocks:].any():
        b = sb.metadata_sm_root.nr_blocks + int(np.flatnonzero(w.meta[sb.metadata_sm_root.nr_blocks:])[0])
        w.problem(f"metadata block {b} in use beyond the metadata space map", b)
    if meta_counts is not None:
        report.metadata_free_blocks = int(np.count_nonzero(meta_counts == 0))
    if data is not None:
        report.data_used_blocks = data[0]
    return report


def _times(w: _Walker, store: BlockStore, sb: Superblock, details: dict[int, tuple[int, int, int, int]],
           per_dev: list[tuple[int, _MapVisitor]], refs: _Refs, nr_data: int) -> list[tuple[str, bool]]:
    """The time rules over one view's devices, from the walk's per-device latest times and candidate leaves
    (re-read only where a mapping is not older than its device's snapshotted_time). Returns (message, is a
    warning) in thin_check's order: every device's time errors, then the shared-block warnings."""
    out: list[tuple[str, bool]] = []
    for dev, v in per_dev:
        if v.max_time > sb.time:
            out.append((f"device {dev}: mapping time {v.max_time} is later than the pool time {sb.time}", False))
        d = details.get(dev)
        if d is not None and (d[2] > sb.time or d[3] > sb.time):
            out.append((f"device {dev}: creation/snapshot time later than the pool time {sb.time}", False))
    if not w.reach and not refs.any_shared():
        return out  # no data block is mapped twice: no warning can apply
    for dev, v in per_dev:
        if not v.candidates:
            continue
        found = _time_candidates(w, store, refs, nr_data, v.snap, v.candidates)
        if found is not None:
            out.append((f"device {dev}: data block {found[0]} is shared but its mapping time {found[1]} is not "
                        f"older than the device's snapshotted_time {v.snap} (a write would overwrite shared data)",
                        True))
    return out


def _check_times(w: _Walker, store: BlockStore, sb: Superblock, details: dict[int, tuple[int, int, int, int]]) -> None:
    """The time rules through the held metadata snapshot (``check -m``): the whole mapping arrays of that view
    (the streaming path, ``_times``, serves the live view)."""
    pmd = PoolMetadata.open(store, readonly=True, space_maps=False)
    if sb is not pmd.sb and sb.data_mapping_root != pmd.sb.data_mapping_root:
        pmd = PoolMetadata.open(store, readonly=True, space_maps=False, use_metadata_snap=True)
    per_dev = {}
    for dev in pmd.device_ids():
        _, db, t = pmd.mappings(dev)
        per_dev[dev] = (db.astype(np.int64), t.astype(np.int64))
        if len(t) and int(t.max()) > sb.time:
            w.problem(f"device {dev}: mapping time {int(t.max())} is later than the pool time {sb.time}")
        d = details.get(dev)
        if d is not None and (d[2] > sb.time or d[3] > sb.time):
            w.problem(f"device {dev}: creation/snapshot time later than the pool time {sb.time}")
    if not per_dev:
        return
    allb = np.concatenate([db for db, _ in per_dev.values()])
    if not allb.size:
        return
    users = np.bincount(allb)
    for dev, (db, t) in per_dev.items():
        shared = users[db] > 1
        snap = details[dev][3] if dev in details else 0
        bad = shared & (t >= snap)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            w.problem(f"device {dev}: data block {int(db[i])} is shared but its mapping time {int(t[i])} is not "
                      f"older than the device's snapshotted_time {snap} (a write would overwrite shared data)",
                      warning=True)


def format_report(report: CheckReport) -> str:
    """Human-readable report in thin_check's manner."""
    lines = []
    section = None
    for p in report.problems:
        if p.section != section:
            lines.append(p.section)
            section = p.section
        tag = "(warning) " if p.warning else "(leak) " if not p.fatal else ""
        lines.append(f"  {tag}{p}")
    return "\n".join(lines)



@dataclass
class LeakRepair:
    """What ``repair_leaks`` did: the check before, the re-check after, and how many counts it lowered."""

    before: CheckReport
    after: CheckReport
    data_blocks: int = 0  # data blocks whose count was lowered
    metadata_blocks: int = 0
    data_freed: int = 0  # of those, blocks whose count dropped to 0
    metadata_freed: int = 0


def repair_leaks(store: BlockStore, *, name: str = "metadata") -> LeakRepair:
    """thin_check 1.x's --auto-repair: check ``store``; if the only problems are leaked blocks (a space map count
    higher than the references the walk found), lower every such count, data and metadata, to what the walk found,
    in one transaction, then check again. Any other error raises LeakRepairRefused and nothing is written.
    The caller holds the pool's lock; ``store`` must be writable and stays open."""
    from thinpool.errors import LeakRepairRefused

    before = check_metadata(store)
    if before.errors:
        first = before.errors[0]
        raise LeakRepairRefused(path=name, count=len(before.errors), first=str(first), report=before)
    result = LeakRepair(before, before)
    if not before.leaked_data and not before.leaked_metadata:
        return result
    md = PoolMetadata.open(store, allow_needs_check=True)
    try:
        for leaks, sm in ((before.leaked_data, md.data_sm), (before.leaked_metadata, md.meta_disk.core)):
            if not leaks:
                continue
            arr = np.array(leaks, dtype=np.int64)
            blocks, stored, expected = arr[:, 0], arr[:, 1], arr[:, 2]
            now = np.array([sm.count(int(b)) for b in blocks], dtype=np.int64)
            if (now != stored).any():  # the space map the pool loads must be the one the checker read
                b = int(blocks[np.argmax(now != stored)])
                raise LeakRepairRefused(path=name, count=1, first=f"block {b}: count changed while checking",
                                        report=before)
            sm.dec_many(np.repeat(blocks, stored - expected))
        md.commit()
    except BaseException:
        if not md.failed:
            md.abort()
        raise
    result.data_blocks = len(before.leaked_data)
    result.metadata_blocks = len(before.leaked_metadata)
    result.data_freed = sum(1 for _, _, e in before.leaked_data if e == 0)
    result.metadata_freed = sum(1 for _, _, e in before.leaked_metadata if e == 0)
    result.after = check_metadata(store)
    return result
