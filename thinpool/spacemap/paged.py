"""The data space map in the kernel's shape: bitmaps paged in on demand, the index in memory, dirty pages
written at commit, allocation from a cursor over bitmaps with free entries.

Layer: spacemap. May import: thinpool.errors, thinpool.checksum, thinpool.formats, thinpool.btree, thinpool.tx.

On disk (kernel dm-space-map-common.c, disk sm): one 2-bit bitmap per ENTRIES_PER_BITMAP (16,320) blocks, an
index B-tree ``bitmap i -> (blocknr, nr_free, none_free_before)`` and a ref-count B-tree for counts >= 3.

In memory, cost follows the work, not the pool:

- **open** reads nothing but the superblock's root (nr_blocks, nr_allocated, the two tree roots); the index is
  loaded on first use a window of INDEX_WINDOW bitmaps at a time (the one or two leaves that hold it, values
  decoded with numpy), a bitmap only when a block in it is counted, allocated or freed. A read-only open never
  touches the data space map; a write near the start of an 8 TiB pool reads one index leaf of its 33.
- a **page** holds one bitmap's counts (uint8 until a count passes 255, then uint32; counts >= 3 resolved
  through the ref-count tree when the page is loaded) and, once changed, the counts of the last commit beside
  them (copy on first write; one shared zero array for a page all free at the last commit). Clean pages are
  evicted LRU beyond ``max_clean_pages``; dirty pages stay until the commit.
- **commit** (``write``) relocates each dirty bitmap once (copy on write: the committed bitmap stays intact until
  the superblock moves), updates its index entry and the ref-count entries that crossed 3: O(dirty pages).
  ``nr_allocated`` is kept as a counter, never recounted.
- **allocation** (``new_block``) searches from a cursor the bitmaps whose index entry has free entries and takes
  a block whose count is 0 now *and* at the last commit (never one the last commit uses, dm-space-map.h).
- a new or grown pool's free bitmaps are not materialised: a page never written reads as all free, and is
  written at the next commit from an all-zero template (every all-free bitmap differs only in its block number
  and checksum: built with numpy in one pass); when most of the index changes at once (a new pool, a large
  resize) the index tree is rebuilt bottom-up instead of one insert per bitmap.
- the blocks **freed** in a transaction are kept as arrays (one per batch), not one Python int each, and
  ``freed_blocks`` filters them with numpy per page at the commit.

``counts`` / ``committed`` materialise the whole map as arrays, O(pool): for tests and oracles only.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from thinpool import checksum
from thinpool.btree.btree import BTree, NoRefValue
from thinpool.checksum import BlockType
from thinpool.errors import MetadataCorrupt, NoDataSpace, NoMetadataSpace, NoSpace
from thinpool.formats.space_map import (
    ENTRIES_PER_BITMAP,
    IndexEntry,
    SmRoot,
    decode_bitmap,
    encode_bitmap,
)
from thinpool.tx.transaction import TransactionManager
from thinpool.units import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

E: Final = ENTRIES_PER_BITMAP
_BATCH: Final = 4096  # allocation candidates taken from a page at a time
INDEX_WINDOW: Final = 252  # index entries loaded at a time (one leaf of 16-byte values holds 252)
REBUILD_FRACTION: Final = 4  # rebuild the index tree when more than 1/4 of its entries (and > 256) changed
RC_REBUILD_MIN: Final = 1024  # ref-count entries a commit changes before the tree is rebuilt rather than updated
RC_REBUILD_FRACTION: Final = 64  # ... and at least 1/64 of the tree's (estimated) entries
MAX_COUNT: Final = (1 << 32) - 1  # ref-count tree values are 4 bytes (the kernel's uint32_t counts)
# a list, not an np.dtype: building that at import would load numpy (numpy takes the list wherever a dtype goes)
_INDEX_DTYPE: Final = [("blocknr", "<u8"), ("nr_free", "<u4"), ("none_free_before", "<u4")]


def nr_bitmaps(nr_blocks: int) -> int:
    return -(-nr_blocks // E)


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique`` of an integer array by sort and compare. numpy 2's ``np.unique`` hashes integers instead: 4.4 s
    for 4 million blocks here, against 0.05 s this way; the result is the same (sorted, unique). Already sorted
    unique input is returned as it is after one comparison pass."""
    a = np.asarray(a)
    if len(a) < 2:
        return a.copy()
    if bool((a[1:] > a[:-1]).all()):
        return a
    s = np.sort(a)
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


class FreedBlocks:
    """The blocks a commit freed, kept per bitmap as their offsets in it (uint16, sorted, unique): 2 bytes a block,
    never one int64 array of them all (a 4M-block delete holds 8 MB here, not 32 MB plus its concatenation).
    ``runs`` streams them as runs of consecutive blocks a bitmap at a time (runs crossing a bitmap's end joined)."""

    __slots__ = ("_parts",)

    def __init__(self, parts: list[tuple[int, np.ndarray]]) -> None:
        self._parts = parts  # (bitmap, offsets), by bitmap

    def __len__(self) -> int:
        return sum(len(a) for _, a in self._parts)

    def array(self) -> np.ndarray:
        """Every block, sorted int64 (O(blocks): tests and small commits)."""
        if not self._parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([a.astype(np.int64) + i * E for i, a in self._parts])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.array()
        return a if dtype is None else a.astype(dtype)

    def tolist(self) -> list[int]:
        return [int(b) for b in self.array().tolist()]

    def runs(self) -> Iterator[tuple[int, int]]:
        """(start, end) of each run of consecutive blocks, ends exclusive, in order."""
        pending: tuple[int, int] | None = None
        for i, local in self._parts:
            if not len(local):
                continue
            loc = local.astype(np.int64)
            cuts = np.flatnonzero(np.diff(loc) != 1) + 1
            starts = (loc[np.concatenate([[0], cuts])] + i * E).tolist()
            ends = (loc[np.concatenate([cuts - 1, [len(loc) - 1]])] + (i * E + 1)).tolist()
            if pending is not None:
                if pending[1] == starts[0]:
                    starts[0] = pending[0]
                else:
                    yield pending
            yield from zip(starts[:-1], ends[:-1])
            pending = (starts[-1], ends[-1])
        if pending is not None:
            yield pending


_FREE_HEAD: Final = struct.Struct("<I4xQ")  # a bitmap block's header: checksum, not_used, blocknr
_FREE_CRC: list[np.ndarray] = []  # [the checksum of the all-free bitmap at block 0, the change each bit makes]


def free_bitmap_checksums(blocknrs: np.ndarray) -> np.ndarray:
    """The checksums (uint32) of all-free bitmap blocks at ``blocknrs``, in one numpy pass. An all-free bitmap is
    zeros but for its block number (bytes 8..15), and CRC-32C is affine over messages of one length: the
    checksum is that of the block at 0 xor, for each bit set in the block number, what that bit changes."""
    if not _FREE_CRC:
        def of(b: int) -> int:
            buf = bytearray(4096)
            buf[8:16] = b.to_bytes(8, "little")
            return checksum.compute(buf, BlockType.BITMAP)

        base = of(0)
        _FREE_CRC.append(np.array([base], dtype=np.uint32))
        _FREE_CRC.append(np.array([of(1 << j) ^ base for j in range(64)], dtype=np.uint32))
    b = np.asarray(blocknrs, dtype=np.uint64)
    out = np.full(len(b), _FREE_CRC[0][0], dtype=np.uint32)
    bits = _FREE_CRC[1]
    for j in range(int(b.max()).bit_length() if len(b) else 0):
        out ^= np.where((b >> np.uint64(j)) & np.uint64(1), bits[j], np.uint32(0))
    return out


class _FreeBitmap:
    """A dirty all-free bitmap block, queued by its block number alone: encoded (zeros, the block number, the
    checksum) only when the commit writes it, so a new 8 TiB pool does not hold 32 MiB of zero bitmaps. The
    checksum may be given (``free_bitmap_checksums`` of a commit's batch) or is computed at ``encode``."""

    __slots__ = ("blocknr", "csum")

    def __init__(self, blocknr: int, csum: int | None = None) -> None:
        self.blocknr = blocknr
        self.csum = csum

    def encode(self) -> bytearray:
        buf = bytearray(4096)
        if self.csum is None:
            buf[8:16] = self.blocknr.to_bytes(8, "little")
            checksum.stamp(buf, BlockType.BITMAP)
        else:
            _FREE_HEAD.pack_into(buf, 0, self.csum, self.blocknr)
        return buf


_ZERO_COMMITTED: list[np.ndarray] = []


def _zero_committed() -> np.ndarray:
    """One read-only uint8 array of E zeros, shared by every dirty page that was all free at the last commit."""
    if not _ZERO_COMMITTED:
        z = np.zeros(E, dtype=np.uint8)
        z.flags.writeable = False
        _ZERO_COMMITTED.append(z)
    return _ZERO_COMMITTED[0]


class _Page:
    """Counts of one bitmap (uint8 or uint32: see PagedSpaceMap). ``committed`` is ``counts`` itself until the
    page is first changed; then ``counts`` changes in place and ``committed`` is a uint8 copy of the counts at the
    last commit capped at 3 (the bitmap's own two-bit values: 16 KB), the exact committed counts >= 3 kept beside it
    (``_big_at``/``_big``: offsets and counts, as the ref-count tree has them). ``committed == 0`` and
    ``committed >= 3`` read the capped copy; ``committed_exact`` gives counts."""

    __slots__ = ("counts", "committed", "dirty", "_big_at", "_big")

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = counts
        self.committed = counts
        self.dirty = False
        self._big_at: np.ndarray | None = None
        self._big: np.ndarray | None = None

    def make_dirty(self) -> None:
        if not self.dirty:
            c = self.counts
            # a page all free at the last commit (new space: a restore's, a new pool's) shares one read-only zero
            # copy: a dirty page costs its counts alone (4 bytes a block, not 5)
            self.committed = np.minimum(c, 3).astype(np.uint8) if c.any() else _zero_committed()
            at = np.flatnonzero(c >= 3)
            self._big_at, self._big = at, c[at]
            self.dirty = True

    def committed_exact(self, local: np.ndarray) -> np.ndarray:
        """The committed counts (uint32) at the offsets ``local`` (sorted int64)."""
        if not self.dirty:
            out: np.ndarray = self.committed[local].astype(np.uint32)
            return out
        out = self.committed[local].astype(np.uint32)
        assert self._big_at is not None and self._big is not None
        if len(self._big_at):
            hi = np.flatnonzero(out == 3)
            if len(hi):
                out[hi] = self._big[np.searchsorted(self._big_at, local[hi])]
        return out

    def committed_full(self) -> np.ndarray:
        """Every committed count (uint32; the page's own array while it is clean)."""
        if not self.dirty:
            return self.committed
        out = self.committed.astype(np.uint32)
        assert self._big_at is not None and self._big is not None
        out[self._big_at] = self._big
        return out

    def clean(self, *, committed: bool) -> None:
        """The page becomes clean: at its counts now (``committed``: the commit made them durable) or back at its
        last commit (abort)."""
        if self.dirty and not committed:
            self.counts = self.committed_full()
        self.committed = self.counts
        self.dirty = False
        self._big_at = self._big = None


class PagedSpaceMap:
    """The data space map (tx/api.py SpaceMap, plus batch operations and the commit-time write).

    A page's counts are uint8 while every count in it is below 256 (1 byte a block: a restore's or repair's
    dirty pages of millions of blocks), widened to uint32 by the first count that needs it (``_fit``)."""

    COMPACT_PAGES: bool = True  # uint8 page counts until a count needs more (the metadata map: always uint32)

    def __init__(self, tm: TransactionManager, root: SmRoot, *, kind: str = "data",
                 max_clean_pages: int = 64) -> None:
        self.tm = tm
        self.kind = kind
        self.max_clean_pages = max_clean_pages
        self.rc_tree = BTree(tm, NoRefValue(4))
        self.index_tree = BTree(tm, NoRefValue(16))
        self.pages_loaded = 0  # bitmaps read from disk (tests bound what an operation reads)
        self._reset(root)
        # the last commit, for abort: its root and (index, loaded windows); None: nothing of the index read yet
        self._saved: tuple[SmRoot, tuple[np.ndarray, np.ndarray] | None] = (root, None)

    # --- state ----------------------------------------------------------------------------------------------
    def _reset(self, root: SmRoot) -> None:
        self._nr_blocks = root.nr_blocks
        self.index_root = root.bitmap_root
        self.ref_count_root = root.ref_count_root
        n = nr_bitmaps(root.nr_blocks)
        if n > max(self.tm.limit, 1) * INDEX_WINDOW:  # more index entries than the metadata device could hold
            raise MetadataCorrupt(block=0, reason=f"{self.kind} space map of {root.nr_blocks} blocks needs {n} "
                                                  f"bitmaps: more than a metadata device of {self.tm.limit} blocks "
                                                  "can index")
        # _index: _INDEX_DTYPE per bitmap, valid where _loaded; _loaded: per window of INDEX_WINDOW entries. Both
        # made on first use (properties below), so that a read-only open that never allocates does not load numpy.
        self._nr_index = n
        self._index_arr: np.ndarray | None = None
        self._loaded_arr: np.ndarray | None = None
        self._pages: OrderedDict[int, _Page] = OrderedDict()
        self._dirty: set[int] = set()
        self._nr_allocated = root.nr_allocated
        self._nr_allocatable = root.nr_blocks - root.nr_allocated  # free now and at the last commit
        self._candidates: list[int] = []
        self._cursor = 0  # bitmap where the allocation search resumes
        # blocks whose count dropped to 0 in this transaction: per bitmap, their offsets in it (uint16: 2 bytes a
        # block; a 4M-block delete keeps 8 MB, not 4M Python ints)
        self._freed: dict[int, list[np.ndarray]] = {}
        self._freed_one: list[int] = []  # the same, one at a time (dec)
        self.changed = False

    @property
    def _index(self) -> np.ndarray:
        if self._index_arr is None:
            self._index_arr = np.zeros(self._nr_index, dtype=_INDEX_DTYPE)
        return self._index_arr

    @_index.setter
    def _index(self, value: np.ndarray) -> None:
        self._index_arr = value

    @property
    def _loaded(self) -> np.ndarray:
        if self._loaded_arr is None:
            self._loaded_arr = np.zeros(-(-self._nr_index // INDEX_WINDOW), dtype=bool)
        return self._loaded_arr

    @_loaded.setter
    def _loaded(self, value: np.ndarray) -> None:
        self._loaded_arr = value

    @classmethod
    def create(cls, tm: TransactionManager, nr_blocks: int, *, kind: str = "data") -> PagedSpaceMap:
        """A new, all-free map (its trees are created now; its bitmaps are written at the commit)."""
        rc = BTree(tm, NoRefValue(4)).empty()
        index_root = BTree(tm, NoRefValue(16)).empty()
        sm = cls(tm, SmRoot(nr_blocks, 0, index_root, rc), kind=kind)
        n = nr_bitmaps(nr_blocks)
        sm._index["nr_free"] = E
        sm._loaded[:] = True
        sm._dirty = set(range(n))
        sm.changed = True
        return sm

    @classmethod
    def load(cls, tm: TransactionManager, root: SmRoot, *, kind: str = "data",
             validate: bool = False) -> PagedSpaceMap:
        """Open the map at ``root``: O(1). Nothing is read until a block is counted or allocated; with
        ``validate`` (a writable open) the root's counts and the roots of its two trees are checked (one descent
        of the ref-count tree, one of the index to its last bitmap), so a superblock pointing nowhere fails the
        open, not a later commit.

        Raises:
            MetadataCorrupt: (validate) a root that cannot be right.
        """
        sm = cls(tm, root, kind=kind)
        if validate:
            if root.nr_allocated > root.nr_blocks:
                raise MetadataCorrupt(block=0, reason=f"{kind} space map: {root.nr_allocated} blocks allocated of "
                                                      f"{root.nr_blocks}")
            for b, tree in ((root.bitmap_root, sm.index_tree), (root.ref_count_root, sm.rc_tree)):
                if not 0 < b < tm.limit:
                    raise MetadataCorrupt(block=0, reason=f"{kind} space map root points at block {b}, outside "
                                                          f"the metadata device ({tm.limit} blocks)")
                tree.validate_node(b)
            sm.rc_tree.lookup(root.ref_count_root, 0)  # one descent to the first leaf (its value size)
            n = nr_bitmaps(root.nr_blocks)
            top = sm.index_tree.highest_key(root.bitmap_root)  # one descent: O(depth) blocks
            if (n - 1 if n else None) != top:
                raise MetadataCorrupt(block=root.bitmap_root, reason=f"{kind} space map index ends at bitmap {top}, "
                                                                     f"but {root.nr_blocks} blocks need {n}")
        return sm

    @property
    def core(self) -> PagedSpaceMap:
        """The map itself (it is its own in-core and on-disk side)."""
        return self

    @property
    def nr_blocks(self) -> int:
        return self._nr_blocks

    def nr_allocated(self) -> int:
        return self._nr_allocated

    def nr_free(self) -> int:
        return self._nr_blocks - self._nr_allocated

    def nr_allocatable(self) -> int:
        """Blocks free now and at the last commit (what ``new_block`` may hand out)."""
        return self._nr_allocatable

    def has_free(self, n: int) -> bool:
        return n <= self._nr_allocatable

    def root(self) -> SmRoot:
        return SmRoot(self._nr_blocks, self._nr_allocated, self.index_root, self.ref_count_root)

    # --- index and pages ------------------------------------------------------------------------------------
    def _load_window(self, w: int) -> None:
        """Read index entries [w*INDEX_WINDOW, (w+1)*INDEX_WINDOW) from the index tree (one or two leaves)."""
        n = len(self._index)
        lo, hi = w * INDEX_WINDOW, min((w + 1) * INDEX_WINDOW, n)
        keys: list[int] = []
        raw: list[bytes] = []
        for k, v in self.index_tree.items(self.index_root, lo, hi):
            keys.append(k)
            raw.append(v)
        if keys != list(range(lo, hi)):
            missing = sorted(set(range(lo, hi)) - set(keys))
            raise MetadataCorrupt(block=self.index_root, reason=f"{self.kind} space map index: bitmap "
                                  f"{missing[0] if missing else keys[0]} missing or out of place ({n} bitmaps)")
        self._index[lo:hi] = np.frombuffer(b"".join(raw), dtype=_INDEX_DTYPE)
        self._loaded[w] = True

    def _entry_of(self, i: int) -> np.void:
        """Index entry of bitmap ``i`` (its window read on first use)."""
        w = i // INDEX_WINDOW
        if not self._loaded[w]:
            self._load_window(w)
        entry: np.void = self._index[i]
        return entry

    def _load_index(self) -> np.ndarray:
        """The whole index (every window read): O(bitmaps), for commit-time rebuilds and whole-map views."""
        for w in np.flatnonzero(~self._loaded).tolist():
            self._load_window(w)
        return self._index

    def _page(self, i: int) -> _Page:
        page = self._pages.get(i)
        if page is not None:
            self._pages.move_to_end(i)
            return page
        if not 0 <= i < len(self._index):
            raise MetadataCorrupt(block=None, reason=f"{self.kind} block {i * E} beyond the {self.kind} space map "
                                                     f"({self._nr_blocks} blocks)")
        blocknr = int(self._entry_of(i)["blocknr"])
        compact = self.COMPACT_PAGES
        if blocknr == 0:  # never written: all free
            counts = np.zeros(E, dtype=np.uint8 if compact else np.uint32)
        else:
            buf = self.tm.read_raw(blocknr, BlockType.BITMAP, f"{self.kind} space map bitmap")
            counts = decode_bitmap(buf)  # uint8, a fresh array
            if not compact:
                counts = counts.astype(np.uint32)
            self.pages_loaded += 1
            if (counts == 3).any():
                lo = i * E
                k, v = self.rc_tree.lookup_range(self.ref_count_root, lo, lo + E)
                local = (k - np.uint64(lo)).astype(np.int64)
                if len(k) and (not (counts[local] == 3).all() or int(v.min()) < 3):
                    raise MetadataCorrupt(block=self.ref_count_root, reason=f"{self.kind} ref-count tree "
                                          "disagrees with the bitmap")
                if len(v) and counts.dtype == np.uint8 and int(v.max()) > 255:
                    counts = counts.astype(np.uint32)
                counts[local] = v
                if np.count_nonzero(counts == 3) != np.count_nonzero(v == 3):
                    b = lo + int(np.flatnonzero(counts == 3)[0])
                    raise MetadataCorrupt(block=self.ref_count_root,
                                          reason=f"{self.kind} block {b} has count >= 3 but no ref-count entry")
        valid = self._nr_blocks - i * E
        if valid < E:
            counts[valid:] = 0
        page = _Page(counts)
        self._pages[i] = page
        self._evict()
        return page

    def _evict(self) -> None:
        if len(self._pages) - len(self._dirty) <= self.max_clean_pages:
            return
        for j in list(self._pages):
            if len(self._pages) - len(self._dirty) <= self.max_clean_pages:
                break
            if not self._pages[j].dirty:
                del self._pages[j]

    def evict_clean(self) -> None:
        """Drop every clean page (tests: reloading must give the same counts)."""
        for j in [j for j, p in self._pages.items() if not p.dirty]:
            del self._pages[j]

    def _wpage(self, i: int) -> _Page:
        page = self._page(i)
        if not page.dirty:
            page.make_dirty()
            self._dirty.add(i)
        self.changed = True
        return page

    def _check(self, b: int) -> None:
        if not 0 <= b < self._nr_blocks:
            raise MetadataCorrupt(block=None, reason=f"{self.kind} block {b} beyond the {self.kind} space map "
                                                     f"({self._nr_blocks} blocks)")

    # --- counts ---------------------------------------------------------------------------------------------
    def count(self, b: int) -> int:
        self._check(b)
        return int(self._page(b // E).counts[b % E])

    def committed_count(self, b: int) -> int:
        self._check(b)
        return int(self._page(b // E).committed_exact(np.array([b % E]))[0])

    @staticmethod
    def _fit(page: _Page, top: int) -> None:
        """Widen a dirty page's uint8 counts to uint32 before a count above 255 (``top``) is stored."""
        if top > 255 and page.counts.dtype == np.uint8:
            page.counts = page.counts.astype(np.uint32)

    def inc(self, b: int, n: int = 1) -> None:
        self._check(b)
        page = self._wpage(b // E)
        i = b % E
        c = int(page.counts[i])
        if c + n > MAX_COUNT:
            raise self._overflow(b)
        if c == 0:
            self._nr_allocated += 1
            if page.committed[i] == 0:
                self._nr_allocatable -= 1
        self._fit(page, c + n)
        page.counts[i] = c + n

    def dec(self, b: int) -> int:
        p = b // E
        page = self._pages.get(p)
        if page is not None and page.dirty and 0 <= b < self._nr_blocks:  # _check and _wpage, inline
            self._pages.move_to_end(p)
            self.changed = True
        else:
            self._check(b)
            page = self._wpage(p)
        i = b - p * E
        c: int = page.counts.item(i)
        if c == 0:
            raise MetadataCorrupt(block=None, reason=f"{self.kind} block {b}: reference count would go below zero")
        page.counts[i] = c - 1
        if c == 1:
            self._nr_allocated -= 1
            if page.committed[i] == 0:
                self._nr_allocatable += 1
            self._freed_one.append(b)
        return c - 1

    def _by_page(self, blocks: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        uniq, times = np.unique(np.asarray(blocks, dtype=np.int64), return_counts=True)
        if not len(uniq):
            return []
        if len(uniq) and (int(uniq[0]) < 0 or int(uniq[-1]) >= self._nr_blocks):
            bad = int(uniq[0]) if int(uniq[0]) < 0 else int(uniq[-1])
            self._check(bad)
        pages = uniq // E
        cuts = np.flatnonzero(np.diff(pages)) + 1
        out = []
        for lo, hi in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [len(uniq)]]).tolist()):
            out.append((int(pages[lo]), uniq[lo:hi] % E, times[lo:hi].astype(np.uint32)))
        return out

    def _overflow(self, b: int) -> MetadataCorrupt:
        return MetadataCorrupt(block=None, reason=f"{self.kind} block {b}: reference count would pass {MAX_COUNT}")

    def inc_many(self, blocks: np.ndarray) -> None:
        """One reference more per occurrence of each block in ``blocks``; raises (changing nothing) if a count
        would pass MAX_COUNT (it would wrap in uint32 and read as free)."""
        groups = self._by_page(blocks)
        for i, local, times in groups:
            over = self._page(i).counts[local].astype(np.uint64) + times > MAX_COUNT
            if over.any():
                raise self._overflow(i * E + int(local[np.argmax(over)]))
        for i, local, times in groups:
            page = self._wpage(i)
            cur = page.counts[local]
            was0 = cur == 0
            self._nr_allocated += int(np.count_nonzero(was0))
            self._nr_allocatable -= int(np.count_nonzero(was0 & (page.committed[local] == 0)))
            new = cur + times  # uint32 (times is)
            if page.counts.dtype == np.uint8:
                self._fit(page, int(new.max()))
            page.counts[local] = new

    def dec_many(self, blocks: np.ndarray) -> None:
        """One reference less per occurrence; raises (changing nothing) if a count would go below zero."""
        groups = self._by_page(blocks)
        for i, local, times in groups:
            cur = self._page(i).counts[local]
            if (cur < times).any():
                bad = i * E + int(local[np.argmax(cur < times)])
                raise MetadataCorrupt(block=None, reason=f"{self.kind} block {bad}: reference count would go "
                                                         "below zero")
        for i, local, times in groups:
            page = self._wpage(i)
            new = page.counts[local] - times
            page.counts[local] = new
            now0 = new == 0
            self._nr_allocated -= int(np.count_nonzero(now0))
            self._nr_allocatable += int(np.count_nonzero(now0 & (page.committed[local] == 0)))
            if now0.any():
                self._freed.setdefault(i, []).append(local[now0].astype(np.uint16))

    def freed_blocks(self) -> FreedBlocks:
        """The blocks whose count dropped to 0 in this transaction and is still 0: the discard passdown candidates
        of a commit. O(blocks freed), numpy per page, 2 bytes a block (FreedBlocks)."""
        per_page = {i: list(v) for i, v in self._freed.items()}
        for b in self._freed_one:
            per_page.setdefault(b // E, []).append(np.array([b % E], dtype=np.uint16))
        out = []
        for i in sorted(per_page):
            parts = per_page.pop(i)
            local = sorted_unique(np.concatenate(parts) if len(parts) > 1 else parts[0])
            del parts
            p = self._pages.get(i)
            if p is None:  # evicted clean: nothing changed in it since it was loaded, so its counts are committed
                p = self._page(i)
            out.append((i, local[p.counts[local] == 0]))
        return FreedBlocks(out)

    # --- allocation -----------------------------------------------------------------------------------------
    def new_block(self) -> int:
        """A block whose count is 0 now and at the last commit; its count becomes 1.

        Raises:
            NoDataSpace: none is free.
        """
        pages = self._pages
        while True:
            cand = self._candidates
            while cand:
                b = cand.pop()
                p = b // E
                page = pages.get(p)
                if page is not None and page.dirty:  # _wpage, inline
                    pages.move_to_end(p)
                    self.changed = True
                else:
                    page = self._wpage(p)
                i = b - p * E
                # (``item``: a Python int, not a numpy scalar and its comparison: a data write allocates here)
                if page.counts.item(i) == 0 and page.committed.item(i) == 0:
                    page.counts[i] = 1
                    self._nr_allocated += 1
                    self._nr_allocatable -= 1
                    return b
            self._refill()

    def _refill(self) -> None:
        """Candidates from the first bitmap at or after the cursor (wrapping) whose index entry has free entries;
        the index is read a window at a time as the search goes, so a pool with free space near the cursor reads
        one window, whatever its size."""
        if self._nr_allocatable <= 0:
            raise self._no_space()
        n = len(self._index)
        start = self._cursor
        nr_windows = len(self._loaded)
        w0 = start // INDEX_WINDOW
        for step in range(nr_windows + 1):
            w = (w0 + step) % max(nr_windows, 1)
            if not self._loaded[w]:
                self._load_window(w)
            lo, hi = w * INDEX_WINDOW, min((w + 1) * INDEX_WINDOW, n)
            if step == 0:
                lo = start  # the first window from the cursor on; its head is searched last (step == nr_windows)
            elif step == nr_windows:
                lo, hi = w0 * INDEX_WINDOW, start
            for i in (np.flatnonzero(self._index["nr_free"][lo:hi] > 0) + lo).tolist():
                page = self._page(i)
                valid = min(E, self._nr_blocks - i * E)
                free = np.flatnonzero((page.counts[:valid] == 0) & (page.committed[:valid] == 0))
                if free.size:
                    self._candidates = (free[:_BATCH][::-1] + i * E).tolist()
                    self._cursor = i if free.size > _BATCH else (i + 1) % max(n, 1)
                    return
        raise self._no_space()

    def _no_space(self) -> NoSpace:
        return NoMetadataSpace() if self.kind == "metadata" else NoDataSpace()

    # --- growth ---------------------------------------------------------------------------------------------
    def extend(self, nr_blocks: int) -> None:
        """Grow to ``nr_blocks`` (the new blocks are free; new bitmaps are written at the commit)."""
        if nr_blocks <= self._nr_blocks:
            return
        old_n, n = len(self._index), nr_bitmaps(nr_blocks)
        if old_n:
            self._wpage(old_n - 1)  # its tail becomes valid: rewrite it and its index entry
        extra = np.zeros(n - old_n, dtype=_INDEX_DTYPE)
        extra["nr_free"] = E
        loaded = np.zeros(-(-n // INDEX_WINDOW), dtype=bool)
        loaded[:len(self._loaded)] = self._loaded
        if old_n % INDEX_WINDOW and not self._loaded[-1]:  # the old last window gains entries: read its old part
            self._load_window(len(self._loaded) - 1)
            loaded[len(self._loaded) - 1] = True
        loaded[len(self._loaded):] = True  # windows wholly new: every entry is known (all free)
        self._index = np.concatenate([self._index, extra])
        self._loaded = loaded
        self._dirty.update(range(old_n, n))
        self._nr_allocatable += nr_blocks - self._nr_blocks
        self._nr_blocks = nr_blocks
        self._candidates = []
        self.changed = True

    def any_committed(self, lo: int, hi: int) -> bool:
        """Whether a block in [lo, hi) is in use at the last commit. O(bitmaps covering the range)."""
        lo, hi = max(lo, 0), min(hi, self._nr_blocks)
        for i in range(lo // E, -(-hi // E)):
            p = self._page(i)
            a, b = max(lo - i * E, 0), min(hi - i * E, E)
            if b > a and bool(p.committed[a:b].any()):
                return True
        return False

    def used_from(self, lo: int) -> int | None:
        """The highest block >= ``lo`` counted now or at the last commit, or None. O(pages above lo)."""
        best = None
        for i in range(lo // E, nr_bitmaps(self._nr_blocks)):
            p = self._page(i)
            used = np.flatnonzero((p.counts != 0) | (p.committed != 0))
            used = used[used + i * E >= lo]
            if used.size:
                best = i * E + int(used[-1])
        return best

    # --- commit ---------------------------------------------------------------------------------------------
    def _entry(self, i: int, counts: np.ndarray, blocknr: int) -> IndexEntry:
        valid = min(E, self._nr_blocks - i * E)
        seg = counts[:valid]
        zero = np.flatnonzero(seg == 0)
        return IndexEntry(blocknr, E - int(np.count_nonzero(seg)), int(zero[0]) if zero.size else valid)

    def write(self) -> None:
        """Write back every dirty bitmap (relocated, copy on write), its index entry and the ref-count entries
        that changed. Call before the metadata space map's write. O(dirty pages): a bitmap never written (all
        free) is queued as its block number alone and encoded at the commit, and when most of the index changed
        the index tree is rebuilt bottom-up (a new 8 TiB pool: 8,225 bitmaps, 33 leaves) instead of one insert
        per bitmap."""
        if not self._dirty:
            return
        tm = self.tm
        idx = self._index
        order = sorted(self._dirty)
        rebuild = self._rebuild_ref_counts(order)
        fresh_at: list[int] = []  # bitmaps never written and never loaded (all free), and their new blocks
        fresh_blocks: list[int] = []
        for i in order:
            page = self._pages.get(i)
            new = tm.new_block()
            if page is None:
                fresh_at.append(i)
                fresh_blocks.append(new)
                continue
            if not rebuild:
                self._update_ref_counts(i, page)
            old = int(self._entry_of(i)["blocknr"])
            if old:
                tm.dec(old)
            counts = page.counts
            tm.write_raw(new, encode_bitmap(new, counts[:min(E, self._nr_blocks - i * E)]), BlockType.BITMAP)
            e = self._entry(i, counts, new)
            idx[i] = (e.blocknr, e.nr_free, e.none_free_before)
        if fresh_at:  # (a new 8 TiB pool: 8,225 of them) entries set and checksums computed in one numpy pass
            at = np.array(fresh_at, dtype=np.int64)
            idx["blocknr"][at] = fresh_blocks
            idx["nr_free"][at] = E
            idx["none_free_before"][at] = 0
            for b, c in zip(fresh_blocks, free_bitmap_checksums(np.array(fresh_blocks, dtype=np.uint64)).tolist()):
                tm.add_dirty(b, _FreeBitmap(b, c))
        n = len(idx)
        if len(order) > 256 and len(order) * REBUILD_FRACTION > n:
            idx = self._load_index()
            raw = idx.tobytes()
            self.index_tree.delete(self.index_root)
            self.index_root = self.index_tree.build(np.arange(n, dtype=np.uint64),
                                                    [raw[16 * j:16 * j + 16] for j in range(n)])
        else:
            for i in order:
                self.index_root, _ = self.index_tree.insert(self.index_root, i, idx[i:i + 1].tobytes())

    @staticmethod
    def _ref_count_changes(page: _Page) -> np.ndarray:
        """Offsets in a dirty page whose ref-count entry changes at the commit (added, altered or removed)."""
        counts = page.counts
        cand = np.flatnonzero((counts >= 3) | (page.committed >= 3))
        changed: np.ndarray = cand[counts[cand] != page.committed_exact(cand)]
        return changed

    def _ref_count_estimate(self) -> int:
        """About how many entries the ref-count tree holds: the fan-outs along its leftmost path multiplied
        (O(depth) node reads)."""
        est = 1
        b = self.ref_count_root
        for _ in range(16):
            is_leaf, keys, values = self.rc_tree.node_arrays(b)
            est *= max(len(keys), 1)
            if is_leaf:
                return est if len(keys) else 0
            b = int(values[0])
        return est

    def _rebuild_ref_counts(self, order: list[int]) -> bool:
        """When the dirty pages change many ref-count entries (a restore's or repair's commit, where every block
        shared three ways crosses 3 at once; a delete that drops millions of counts from 3), build the ref-count
        tree anew bottom-up (btree/bulk.py: leaves written as they fill, memory one node per level) from the old
        tree's entries outside the dirty pages merged with the dirty pages' counts >= 3, instead of one B-tree
        insert or remove per entry (whose shadowed nodes the transaction would hold until the commit: 80 MB and
        most of the time of a 4M-block restore). Returns whether it did (False: the caller updates the tree entry
        by entry, the cheaper way for a few changes)."""
        pages = [(i, p) for i in order if (p := self._pages.get(i)) is not None]
        nr_changes = sum(len(self._ref_count_changes(p)) for _, p in pages)
        if nr_changes < RC_REBUILD_MIN:
            return False
        est = self._ref_count_estimate()
        if est > nr_changes * RC_REBUILD_FRACTION:
            return False
        from thinpool.btree.bulk import BulkTreeBuilder

        old_root = self.ref_count_root
        dirty = np.array([i for i, _ in pages], dtype=np.uint64)

        def old_entries() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            """The old tree's entries outside the dirty pages, a leaf at a time."""
            if est == 0:
                return
            for leaf in self.rc_tree.leaves(old_root):
                k = np.frombuffer(leaf.keys, dtype=np.uint64)
                if not len(k):
                    continue
                v = np.frombuffer(leaf.values, dtype=np.uint32)
                keep = ~np.isin(k // np.uint64(E), dirty)
                if keep.any():
                    yield k[keep], v[keep]

        def new_entries(i: int, p: _Page) -> tuple[np.ndarray, np.ndarray]:
            counts = p.counts[:min(E, self._nr_blocks - i * E)]
            local = np.flatnonzero(counts >= 3)
            return local.astype(np.uint64) + np.uint64(i * E), counts[local]

        total = sum(len(k) for k, _ in old_entries()) + \
            sum(int(np.count_nonzero(p.counts[:min(E, self._nr_blocks - i * E)] >= 3)) for i, p in pages)
        builder = BulkTreeBuilder(self.tm, total, value_size=4)
        old = old_entries()
        held: tuple[np.ndarray, np.ndarray] | None = None

        def add_old_below(limit: int | None) -> None:
            nonlocal held
            while True:
                if held is None:
                    held = next(old, None)
                    if held is None:
                        return
                k, v = held
                j = len(k) if limit is None else int(np.searchsorted(k, np.uint64(limit)))
                if j:
                    builder.add(k[:j], v[:j])
                if j < len(k):
                    held = (k[j:], v[j:])
                    return
                held = None

        for i, p in pages:
            add_old_below(i * E)
            builder.add(*new_entries(i, p))
        add_old_below(None)
        self.ref_count_root = builder.finish()
        self.rc_tree.delete(old_root)
        return True

    def _update_ref_counts(self, i: int, page: _Page) -> None:
        counts = page.counts
        changed = self._ref_count_changes(page)
        for j in changed.tolist():
            b = i * E + j
            if counts[j] >= 3:
                self.ref_count_root, _ = self.rc_tree.insert(self.ref_count_root, b, int(counts[j]))
            else:
                self.ref_count_root, _ = self.rc_tree.remove(self.ref_count_root, b)

    def commit(self) -> None:
        """The transaction is durable: dirty pages become clean (called after the superblock is written)."""
        for i in self._dirty:
            page = self._pages.get(i)
            if page is not None:
                page.clean(committed=True)
        self._dirty = set()
        self._nr_allocatable = self._nr_blocks - self._nr_allocated
        self._candidates = []
        self._freed = {}
        self._freed_one = []
        self.changed = False
        self._saved = (self.root(), (self._index.copy(), self._loaded.copy()))  # O(bitmaps), 16 B each
        self._evict()

    def abort(self) -> None:
        """Back to the last commit: every page returns to its committed counts (kept beside the dirty ones)."""
        pages = self._pages
        root, saved = self._saved
        self._reset(root)
        if saved is not None:
            self._index, self._loaded = saved[0].copy(), saved[1].copy()
        n = nr_bitmaps(root.nr_blocks)
        for i, p in pages.items():
            if i < n:
                p.clean(committed=False)
                self._pages[i] = p

    def validate_all(self) -> None:
        """Read the whole map as the eager loader did: every index entry, every bitmap, every ref-count entry
        (checked against its bitmap). O(pool); for a full read (``thinpool check`` has its own walk).

        Raises:
            MetadataCorrupt / ChecksumError naming the damaged block.
        """
        for i in range(len(self._load_index())):
            self._page(i)
            if len(self._pages) > self.max_clean_pages:
                self._evict()
        for b, c in self.rc_tree.items(self.ref_count_root):
            if b >= self._nr_blocks or self.committed_count(b) != c or c < 3:
                raise MetadataCorrupt(block=self.ref_count_root, reason=f"{self.kind} ref-count tree entry {b}:{c} "
                                                                        "disagrees with the bitmap")

    # --- whole-map views (tests, oracles) -------------------------------------------------------------------
    def _materialise(self, which: str) -> np.ndarray:
        out = np.zeros(self._nr_blocks, dtype=np.uint32)
        for i in range(nr_bitmaps(self._nr_blocks)):
            lo = i * E
            hi = min(lo + E, self._nr_blocks)
            p = self._page(i)
            out[lo:hi] = (p.counts if which == "counts" else p.committed_full())[:hi - lo]
        return out

    @property
    def counts(self) -> np.ndarray:
        """Every count now, as one array (O(pool): tests and oracles only)."""
        return self._materialise("counts")

    @property
    def committed(self) -> np.ndarray:
        """Every count at the last commit (O(pool): tests and oracles only)."""
        return self._materialise("committed")

    @property
    def bitmap_blocks(self) -> list[int]:
        """Where each bitmap is (0: not written yet)."""
        return [int(b) for b in self._load_index()["blocknr"]]
