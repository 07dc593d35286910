"""The metadata space map paged like the data one: bitmaps read when a block they cover is counted, only dirty
bitmaps written at commit, the kernel's single index block held in memory.

Layer: spacemap. May import: thinpool.errors, thinpool.checksum, thinpool.formats, thinpool.btree, thinpool.tx,
spacemap.paged.

On disk (kernel dm-space-map-metadata.c / dm-space-map-common.c, metadata ll): up to MAX_METADATA_BITMAPS
(255) 2-bit bitmaps, one index block listing them (``disk_metadata_index``: 255 entries of blocknr, nr_free,
none_free_before) and a ref-count B-tree for counts >= 3. The map counts the blocks of its own bookkeeping.

What differs from the data map (spacemap/paged.py, whose paging, allocation rule and abort it reuses):

- **open** reads the index block (one block; its 255 entries decoded with numpy) and checks the ref-count root:
  no bitmap. A 16 GiB metadata device (255 bitmaps, 4.2 million blocks) opens as fast as a 4 MiB one.
- **write** is a fixed point, as the kernel's recursion through its bootstrap allocator is: relocating a dirty
  bitmap (copy on write) allocates a block in this very map and frees the old one, and a count crossing 3 changes
  the ref-count tree, whose shadowed nodes are allocated here too. Each round relocates the bitmaps dirtied by the
  previous one and brings the ref-count tree up to date; it stops when a round changes nothing (two or three
  rounds). Then each relocated bitmap is encoded once, with its final counts, and the index block is rewritten.
- no page is ever evicted (at most 255 of them, and only the touched ones are in memory): ``count`` and ``inc``,
  which every B-tree shadow calls, take a fast path on a page already in memory.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

from thinpool.checksum import BlockType
from thinpool.errors import InvalidArgument, MetadataCorrupt
from thinpool.formats.space_map import (
    INDEX_ENTRY_SIZE,
    MAX_METADATA_BITMAPS,
    METADATA_INDEX_LAYOUT,
    SmRoot,
    encode_bitmap,
)
from thinpool.spacemap.disk import put_ref_count
from thinpool.spacemap.paged import _INDEX_DTYPE, INDEX_WINDOW, E, PagedSpaceMap, _FreeBitmap, _Page, nr_bitmaps
from thinpool.tx.transaction import TransactionManager
from thinpool.units import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

_INDEX_HEADER: Final = METADATA_INDEX_LAYOUT.size - MAX_METADATA_BITMAPS * INDEX_ENTRY_SIZE  # csum, pad, blocknr


def read_metadata_index(tm: TransactionManager, root: SmRoot) -> list[tuple[int, int, int]]:
    """The index entries (blocknr, nr_free, none_free_before) of the metadata space map at ``root``: one block
    read, decoded without numpy (a read-only open uses it too, and loads no numpy).

    Raises:
        MetadataCorrupt / ChecksumError: a bad index block or an entry pointing outside the device.
    """
    n = nr_bitmaps(root.nr_blocks)
    if not 0 < n <= MAX_METADATA_BITMAPS:
        raise MetadataCorrupt(block=0, reason=f"bad metadata space map size {root.nr_blocks}")
    buf = tm.read_raw(root.bitmap_root, BlockType.INDEX, "metadata index block")
    entries = list(struct.iter_unpack("<QII", buf[_INDEX_HEADER:_INDEX_HEADER + n * INDEX_ENTRY_SIZE]))
    limit = tm.limit
    for i, (b, _, _) in enumerate(entries):
        if not 0 < b < limit:
            raise MetadataCorrupt(block=root.bitmap_root, reason=f"metadata index entry {i} points at block {b}, "
                                                                 "outside the metadata device")
    # nr_free / none_free_before are hints (the kernel's search skips entries with nr_free 0; thin_check does
    # not check them): not validated
    return entries


class MetadataSpaceMap(PagedSpaceMap):
    """The metadata space map (tx/api.py SpaceMap); the transaction manager's ``sm`` is this map itself."""

    COMPACT_PAGES = False  # at most 255 pages, and the hot inc path stores counts without a width check

    def __init__(self, tm: TransactionManager, root: SmRoot) -> None:
        # the index entries read at open, as Python tuples: the numpy index is built from them at its first use
        # (a writable open whose transaction changes no metadata block, a 4 KiB overwrite, loads no numpy)
        self._entries: list[tuple[int, int, int]] | None = None
        super().__init__(tm, root, kind="metadata", max_clean_pages=MAX_METADATA_BITMAPS)

    @property
    def _index(self) -> np.ndarray:
        if self._index_arr is None:
            if self._entries is not None:
                self._index_arr = np.array(self._entries, dtype=_INDEX_DTYPE)
            else:
                self._index_arr = np.zeros(self._nr_index, dtype=_INDEX_DTYPE)
        return self._index_arr

    @_index.setter
    def _index(self, value: np.ndarray) -> None:
        self._index_arr = value

    @property
    def _loaded(self) -> np.ndarray:  # the whole index is read at open (or is new at create)
        if self._loaded_arr is None:
            self._loaded_arr = np.ones(-(-self._nr_index // INDEX_WINDOW), dtype=bool)
        return self._loaded_arr

    @_loaded.setter
    def _loaded(self, value: np.ndarray) -> None:
        self._loaded_arr = value

    @classmethod
    def create(cls, tm: TransactionManager, nr_blocks: int, *, kind: str = "metadata") -> MetadataSpaceMap:
        """A new, all-free map of ``nr_blocks`` blocks that becomes ``tm``'s space map; block 0 (the superblock)
        is counted and the empty ref-count tree allocated. The index block and the bitmaps are written at the
        first commit."""
        n = nr_bitmaps(nr_blocks)
        if not 0 < n <= MAX_METADATA_BITMAPS:
            raise InvalidArgument(reason=f"metadata device of {nr_blocks} blocks: at most "
                                         f"{MAX_METADATA_BITMAPS} bitmaps")
        sm = cls(tm, SmRoot(nr_blocks, 0, 0, 0))
        sm._index["nr_free"] = E
        sm._dirty = set(range(n))
        sm.changed = True
        tm.sm = sm
        sm.inc(0)
        sm.ref_count_root = sm.rc_tree.empty()
        return sm

    @classmethod
    def load(cls, tm: TransactionManager, root: SmRoot, *, kind: str = "metadata",
             validate: bool = True) -> MetadataSpaceMap:
        """Open the map at ``root`` and make it ``tm``'s space map: one block read (the index), no bitmap.

        Raises:
            MetadataCorrupt / ChecksumError: a bad index block, an entry pointing outside the device, a ref-count
            root that is not a node (a pointer outside the device is named by its own number, as the tm does).
        """
        n = nr_bitmaps(root.nr_blocks)
        if not 0 < n <= MAX_METADATA_BITMAPS:
            raise MetadataCorrupt(block=0, reason=f"bad metadata space map size {root.nr_blocks}")
        if root.nr_allocated > root.nr_blocks:
            raise MetadataCorrupt(block=0, reason=f"metadata space map: {root.nr_allocated} blocks allocated of "
                                                  f"{root.nr_blocks}")
        sm = cls(tm, root)
        tm.sm = sm
        # the committed index until the first commit: an abort before it rebuilds _index from these entries
        sm._entries = read_metadata_index(tm, root)
        if validate:
            sm.rc_tree.validate_node(root.ref_count_root)
        return sm

    def _load_window(self, w: int) -> None:  # the whole index is read at open
        self._loaded[w] = True

    # --- the hot paths of every shadow ----------------------------------------------------------------------
    def count(self, b: int) -> int:
        page = self._pages.get(b // E)
        if page is None or not 0 <= b < self._nr_blocks:
            return super().count(b)
        c: int = page.counts.item(b % E)
        return c

    def inc(self, b: int, n: int = 1) -> None:
        page = self._pages.get(b // E)
        if page is not None and page.dirty and 0 <= b < self._nr_blocks:
            i = b % E
            c = page.counts.item(i)
            if c:
                page.counts[i] = c + n
                return
        super().inc(b, n)

    def _refill(self) -> None:
        """Candidates from a block cursor that moves forward through the device and wraps (the kernel's
        ``smm->begin``), skipping bitmaps whose index entry had no free entry at the last commit: successive
        transactions spread over the whole device instead of reusing its first blocks."""
        if self._nr_allocatable <= 0:
            raise self._no_space()
        n = len(self._index)
        start = self._cursor if self._cursor < self._nr_blocks else 0
        first = start // E
        for step in range(n + 1):
            i = (first + step) % n
            if self._index["nr_free"][i] == 0:
                continue
            page = self._page(i)
            lo = start - i * E if step == 0 else 0
            hi = start - i * E if step == n else min(E, self._nr_blocks - i * E)
            free = np.flatnonzero((page.counts[lo:hi] == 0) & (page.committed[lo:hi] == 0))[:4096] + lo
            if free.size:
                self._candidates = (free[::-1] + i * E).tolist()
                self._cursor = i * E + int(free[-1]) + 1
                return
        raise self._no_space()

    def extend(self, nr_blocks: int) -> None:
        if nr_bitmaps(nr_blocks) > MAX_METADATA_BITMAPS:
            raise InvalidArgument(reason=f"metadata space map cannot exceed {MAX_METADATA_BITMAPS} bitmaps")
        super().extend(nr_blocks)

    # --- commit ---------------------------------------------------------------------------------------------
    def write(self) -> None:
        """Write back every dirty bitmap, the ref-count entries that changed and a new index block (see the module
        docstring: a fixed point over relocations and ref-count updates). Call after the data map's write."""
        tm = self.tm
        new_index = tm.new_block()
        if self.index_root:
            tm.dec(self.index_root)
        self.index_root = new_index
        relocated: dict[int, int] = {}
        written: dict[int, int | None] = {}  # ref-count tree entries written in this commit (None: removed)
        while True:
            progress = False
            for i in sorted(self._dirty):
                page = self._pages.get(i)
                if page is not None and self._sync_ref_counts(i, page, written):
                    progress = True
            for i in sorted(self._dirty - relocated.keys()):
                new = tm.new_block()
                old = int(self._index["blocknr"][i])
                if old:
                    tm.dec(old)
                self._index["blocknr"][i] = new
                relocated[i] = new
                progress = True
            if not progress:
                break
        for i, new in sorted(relocated.items()):
            page = self._pages.get(i)
            if page is None:  # never loaded, never written: all free
                tm.add_dirty(new, _FreeBitmap(new))
                self._index[i] = (new, E, 0)
                continue
            counts = page.counts
            tm.write_raw(new, encode_bitmap(new, counts[:min(E, self._nr_blocks - i * E)]), BlockType.BITMAP)
            e = self._entry(i, counts, new)
            self._index[i] = (e.blocknr, e.nr_free, e.none_free_before)
        body = self._index.tobytes().ljust(MAX_METADATA_BITMAPS * INDEX_ENTRY_SIZE, b"\0")
        buf = bytearray(METADATA_INDEX_LAYOUT.pack(csum=0, padding=0, blocknr=self.index_root, index=body))
        tm.write_raw(self.index_root, buf, BlockType.INDEX)

    def _sync_ref_counts(self, i: int, page: _Page, written: dict[int, int | None]) -> bool:
        """Bring the ref-count tree entries of bitmap ``i`` to its counts now; whether anything changed."""
        lo = i * E
        counts = page.counts
        big = np.flatnonzero((counts >= 3) | (page.committed >= 3))
        cand = set(big[counts[big] != page.committed_exact(big)].tolist())
        cand.update(b - lo for b in written if lo <= b < lo + E)
        progress = False
        for j in sorted(cand):
            b = lo + j
            want = int(counts[j]) if counts[j] >= 3 else None
            old = int(page.committed_exact(np.array([j]))[0])
            have = written.get(b, old if old >= 3 else None)
            progress |= put_ref_count(self, b, want, have, written)
        return progress
