"""On-disk space maps, as the kernel lays them: 2-bit bitmaps, an index (a B-tree for the data map, a single
index block for the metadata map), and a ref-count B-tree for counts >= 3.

Layer: spacemap. May import: thinpool.errors, thinpool.formats, thinpool.btree, thinpool.tx, spacemap.core.

Counts live in a CoreSpaceMap while the pool is open. ``load_*`` reads them at open; ``DiskSpaceMap.write``
writes back what changed at commit: every bitmap with a changed entry is relocated once per transaction (copy on
write, so the committed bitmap stays intact until the superblock moves) and its index entry updated; ref-count
tree entries follow the counts that cross 3. The metadata map counts the blocks of its own bookkeeping, so its
write loops until relocating bitmaps and updating its ref-count tree changes nothing more (a fixed point reached
in two or three rounds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from thinpool.btree.btree import BTree, NoRefValue
from thinpool.checksum import BlockType
from thinpool.errors import MetadataCorrupt
from thinpool.formats.space_map import (
    ENTRIES_PER_BITMAP,
    MAX_METADATA_BITMAPS,
    IndexEntry,
    SmRoot,
    build_index_entry,
    build_metadata_index,
    decode_bitmap,
    encode_bitmap,
    parse_index_entry,
    parse_metadata_index,
)
from thinpool.spacemap.core import CoreSpaceMap
from thinpool.tx.transaction import TransactionManager
from thinpool.units import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

E = ENTRIES_PER_BITMAP


def nr_bitmaps(nr_blocks: int) -> int:
    return -(-nr_blocks // E)



def put_ref_count(sm: Any, b: int, want: int | None, have: int | None, written: dict[int, int | None]) -> bool:
    """Make the ref-count tree of ``sm`` (its ``rc_tree`` at ``ref_count_root``) hold ``want`` for block ``b``
    (None: no entry; only counts >= 3 live there) where it holds ``have``; record it in ``written``. Whether the
    tree changed. Shared by the disk and paged metadata space maps' commit."""
    if want == have:
        return False
    if want is None:
        sm.ref_count_root, _ = sm.rc_tree.remove(sm.ref_count_root, b)
    else:
        sm.ref_count_root, _ = sm.rc_tree.insert(sm.ref_count_root, b, want)
    written[b] = want
    return True


class DiskSpaceMap:
    """The on-disk side of one space map."""

    def __init__(self, tm: TransactionManager, core: CoreSpaceMap, *, is_metadata: bool,
                 bitmap_blocks: list[int], ref_count_root: int, index_root: int) -> None:
        self.tm = tm
        self.core = core
        self.is_metadata = is_metadata
        self.bitmap_blocks = bitmap_blocks  # location of bitmap i (0 = not yet written)
        self.ref_count_root = ref_count_root
        self.index_root = index_root  # data: index btree root; metadata: the index block
        self.rc_tree = BTree(tm, NoRefValue(4))
        self.index_tree = BTree(tm, NoRefValue(16))
        self.force_dirty: set[int] = set()

    # --- open -----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, tm: TransactionManager, root: SmRoot, *, is_metadata: bool,
             core: CoreSpaceMap | None = None) -> DiskSpaceMap:
        """Read a space map; for the metadata map ``core`` is the (empty) map the tm already uses."""
        n = nr_bitmaps(root.nr_blocks)
        kind = "metadata" if is_metadata else "data"
        if is_metadata:
            if n > MAX_METADATA_BITMAPS:
                raise MetadataCorrupt(block=0, reason=f"metadata space map too large ({root.nr_blocks} blocks)")
            buf = tm.read_raw(root.bitmap_root, BlockType.INDEX, "metadata index block")
            entries = parse_metadata_index(buf, n)
        else:
            tree = BTree(tm, NoRefValue(16))
            entries = []
            for i, (k, v) in enumerate(tree.items(root.bitmap_root)):
                if k != i:
                    raise MetadataCorrupt(block=root.bitmap_root, reason=f"data space map index: key {k} at {i}")
                entries.append(parse_index_entry(v))
            if len(entries) != n:
                raise MetadataCorrupt(block=root.bitmap_root,
                                      reason=f"data space map index has {len(entries)} bitmaps, expected {n}")
        counts = np.zeros(n * E, dtype=np.uint32)
        for i, e in enumerate(entries):
            buf = tm.read_raw(e.blocknr, BlockType.BITMAP, f"{kind} space map bitmap")
            counts[i * E:(i + 1) * E] = decode_bitmap(buf)
        counts = counts[:root.nr_blocks]
        rc = BTree(tm, NoRefValue(4))
        big = np.zeros(len(counts), dtype=bool)
        for b, c in rc.items(root.ref_count_root):
            if b >= len(counts) or counts[b] != 3 or c < 3:
                raise MetadataCorrupt(block=root.ref_count_root,
                                      reason=f"{kind} ref-count tree entry {b}:{c} disagrees with the bitmap")
            counts[b] = c
            big[b] = True
        missing = np.flatnonzero((counts == 3) & ~big)
        if missing.size:
            raise MetadataCorrupt(block=root.ref_count_root,
                                  reason=f"{kind} block {int(missing[0])} has count >= 3 but no ref-count entry")
        if core is None:
            core = CoreSpaceMap(len(counts), kind=kind, counts=counts)
        else:
            core.counts = counts
            core.committed = counts.copy()
        return cls(tm, core, is_metadata=is_metadata, bitmap_blocks=[e.blocknr for e in entries],
                   ref_count_root=root.ref_count_root, index_root=root.bitmap_root)

    @classmethod
    def create(cls, tm: TransactionManager, core: CoreSpaceMap, *, is_metadata: bool) -> DiskSpaceMap:
        rc = BTree(tm, NoRefValue(4)).empty()
        index_root = 0 if is_metadata else BTree(tm, NoRefValue(16)).empty()
        sm = cls(tm, core, is_metadata=is_metadata, bitmap_blocks=[0] * nr_bitmaps(core.nr_blocks),
                 ref_count_root=rc, index_root=index_root)
        sm.force_dirty = set(range(len(sm.bitmap_blocks)))
        return sm

    def extend(self, nr_blocks: int) -> None:
        old = len(self.bitmap_blocks)
        n = nr_bitmaps(nr_blocks)
        if self.is_metadata and n > MAX_METADATA_BITMAPS:
            raise ValueError("metadata space map cannot exceed 255 bitmaps")
        self.core.extend(nr_blocks)
        self.bitmap_blocks.extend([0] * (n - old))
        self.force_dirty.update(range(max(old - 1, 0), n))

    # --- commit ---------------------------------------------------------------------------------------------
    def root(self) -> SmRoot:
        return SmRoot(self.core.nr_blocks, self.core.nr_allocated(), self.index_root, self.ref_count_root)

    def _entry(self, i: int) -> IndexEntry:
        seg = self.core.counts[i * E:(i + 1) * E]
        zero = np.flatnonzero(seg == 0)
        return IndexEntry(self.bitmap_blocks[i], E - int(np.count_nonzero(seg)),
                          int(zero[0]) if zero.size else len(seg))

    def _update_ref_counts(self, changed: np.ndarray, written: dict[int, int | None]) -> bool:
        counts, committed = self.core.counts, self.core.committed
        cand = changed[(counts[changed] >= 3) | (committed[changed] >= 3)]
        progress = False
        for b in cand.tolist():
            want = int(counts[b]) if counts[b] >= 3 else None
            have = written.get(b, int(committed[b]) if committed[b] >= 3 else None)
            progress |= put_ref_count(self, b, want, have, written)
        return progress

    def _relocate(self, i: int) -> None:
        new = self.tm.new_block()
        old = self.bitmap_blocks[i]
        if old:
            self.tm.dec(old)
        self.bitmap_blocks[i] = new

    def write(self) -> None:
        """Write back every change since the last commit (call data map first, then the metadata map)."""
        core = self.core
        written: dict[int, int | None] = {}
        relocated: set[int] = set()
        if self.is_metadata:
            new_index = self.tm.new_block()
            if self.index_root:
                self.tm.dec(self.index_root)
            self.index_root = new_index
        while True:
            changed = np.flatnonzero(core.counts != core.committed)
            progress = self._update_ref_counts(changed, written)
            dirty = (set((changed // E).tolist()) | self.force_dirty) - relocated
            for i in sorted(dirty):
                self._relocate(i)
                relocated.add(i)
                progress = True
            if not self.is_metadata or not progress:
                break
        for i in sorted(relocated):
            b = self.bitmap_blocks[i]
            self.tm.write_raw(b, encode_bitmap(b, core.counts[i * E:(i + 1) * E]), BlockType.BITMAP)
        if self.is_metadata:
            entries = [self._entry(i) for i in range(len(self.bitmap_blocks))]
            self.tm.write_raw(self.index_root, build_metadata_index(self.index_root, entries), BlockType.INDEX)
        else:
            for i in sorted(relocated):
                self.index_root, _ = self.index_tree.insert(self.index_root, i, build_index_entry(self._entry(i)))
        self.force_dirty = set()
