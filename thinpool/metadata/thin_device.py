"""The narrow per-device view of the pool metadata that the data path uses (kernel struct dm_thin_device).

Layer: metadata. May import: errors, formats, metadata.pool_metadata.

A ThinDeviceMetadata names one device of one open PoolMetadata and offers what dm-thin.c asks of
dm-thin-metadata.c for a thin device: find a block (``dm_thin_find_block``), find a mapped range
(``dm_thin_find_mapped_range``), insert a mapping (``dm_thin_insert_block``), remove a range
(``dm_thin_remove_range``), the device's snapshot time (for ``__snapshotted_since``), its mapped count and highest
mapped block. Data-block allocation goes through the DataAllocator protocol (the pool implements it: it applies
the no-space policy and the low-water mark); ``release`` gives back a block allocated for a write that failed.

The handle holds no state of its own: it looks the device up on every call, so it stays valid across commits and
aborts, and raises DeviceNotFound once the device is deleted.

Lookups go through a per-device MappingCache held by the PoolMetadata (one per device, shared by every handle and
ThinDevice of that device): the leaves recent lookups ended in, as one dict {thin block: packed block_time} plus the
key ranges those leaves cover (a key in a covered range that is not in the dict is unmapped). A hit is one dict
lookup, no tree walk. Invariant: while ``valid``, the cache agrees with the device's tree in the open transaction.
PoolMetadata keeps it so: ``insert`` writes the new value into the cache; every other change of the device's
mappings or root (remove_range, delete, create over the id, build_device) and every reload of the in-core state
(abort, open) drops the device's cache (``valid`` goes False: holders fetch a new one). Commits change no mapping.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING, Final, Protocol

from thinpool.errors import DeviceNotFound
from thinpool.formats.device_details import TIME_BITS, TIME_MASK

if TYPE_CHECKING:
    import numpy as np

    from thinpool.metadata.pool_metadata import PoolMetadata, ThinDetails


class DataAllocator(Protocol):
    """Where a thin device gets data blocks from (the pool: no-space policy, low-water mark)."""

    def alloc_data_block(self) -> int:
        """A data block with one reference, owned by the caller until it is mapped or released.

        Raises:
            NoDataSpace: the pool is full (after waiting, under the queue policy).
        """
        ...


# cached mappings per device before the cache starts over (about 6 MiB; 4 GiB of a device at 64 KiB chunks)
MAPPING_CACHE_MAX_ENTRIES: Final = 1 << 16
# devices of one pool that keep a mapping cache at once (the least recently opened gives way): pool.md mapping_cache
MAX_MAPPING_CACHES: Final = 8


class MappingCache:
    """The mappings of one device that recent lookups saw (see the module docstring). Used under the pool lock."""

    __slots__ = ("pmd", "dev_id", "details", "valid", "map", "starts", "ends", "fills")
    TIME_BITS: Final = TIME_BITS  # a cached value is packed: data block << TIME_BITS | time (kernel block_time)
    TIME_MASK: Final = TIME_MASK

    def __init__(self, pmd: PoolMetadata, dev_id: int, details: ThinDetails) -> None:
        self.pmd = pmd
        self.dev_id = dev_id
        self.details = details  # the device's in-core details (snapshotted_time is read live from here)
        self.valid = True
        self.map: dict[int, int] = {}  # thin block -> packed block_time, for every key of the cached leaves
        self.starts: list[int] = []  # covered key ranges [starts[i], ends[i]), sorted, disjoint
        self.ends: list[int] = []
        self.fills = 0  # tree descents made to fill the cache (tests and benchmarks count them)

    def find(self, thin_block: int) -> int | None:
        """The packed block_time mapped at ``thin_block``, or None when unmapped. A hit is a dict lookup; a miss
        outside the covered ranges descends the tree once and caches the leaf it ends in.

        Raises:
            MetadataCorrupt: the leaf maps a block past the data device (that leaf is not cached).
        """
        v = self.map.get(thin_block)
        if v is not None:
            return v
        i = bisect_right(self.starts, thin_block) - 1
        if i >= 0 and thin_block < self.ends[i]:
            return None
        return self._fill(thin_block)

    def _fill(self, thin_block: int) -> int | None:
        pmd = self.pmd
        root = pmd.device_root(self.dev_id)
        lo, hi, keys, values = pmd.mapping.lookup_leaf(root, thin_block)
        self.fills += 1
        nr_data = pmd.data_sm.nr_blocks
        if len(values) and nr_data and max(values) >> TIME_BITS >= nr_data:
            pmd.lookup(self.dev_id, thin_block)  # raises MetadataCorrupt if this block is the bad one
            j = bisect_right(keys, thin_block) - 1
            return int(values[j]) if j >= 0 and keys[j] == thin_block else None
        if len(self.map) + len(keys) > MAPPING_CACHE_MAX_ENTRIES:
            self.map.clear()
            self.starts.clear()
            self.ends.clear()
        self.map.update(zip(keys, values))
        # Every recorded range stays right while the cache is valid: inserts go into the map as well, removals
        # drop the cache. Ranges may come to overlap (an insert below a node's first key moves a leaf's start
        # down into a gap recorded earlier); a key is answered from the last range starting at or before it, so
        # an overlap costs at most one more descent, never a wrong answer.
        j = bisect_right(self.starts, lo)
        self.starts.insert(j, lo)
        self.ends.insert(j, hi)
        return self.map.get(thin_block)

    def put(self, thin_block: int, value: int) -> None:
        """The tree now maps ``thin_block`` to the packed ``value`` (PoolMetadata.insert calls this)."""
        self.map[thin_block] = value

    def put_many(self, thin_blocks: list[int], values: list[int]) -> None:
        """``put`` for each pair (PoolMetadata.insert_run calls this)."""
        self.map.update(zip(thin_blocks, values))

    def invalidate(self) -> None:
        self.valid = False
        self.map = {}
        self.starts = []
        self.ends = []


class ThinDeviceMetadata:
    """Metadata operations on device ``dev_id`` of ``pmd`` (see the module docstring)."""

    __slots__ = ("pmd", "dev_id")
    TIME_BITS: Final = TIME_BITS  # how the mapping cache packs a value (MappingCache.TIME_BITS), for the data path
    TIME_MASK: Final = TIME_MASK

    def __init__(self, pmd: PoolMetadata, dev_id: int) -> None:
        self.pmd = pmd
        self.dev_id = dev_id

    def _details(self) -> ThinDetails:
        d = self.pmd.devices.get(self.dev_id)
        if d is None:
            raise DeviceNotFound(dev_id=self.dev_id)
        return d

    @property
    def snapshotted_time(self) -> int:
        """Mappings older than this may be shared with a snapshot (a write must copy them)."""
        return self._details().snapshotted_time

    @property
    def mapped_blocks(self) -> int:
        return self._details().mapped_blocks

    def is_shared(self, mapping_time: int) -> bool:
        """The kernel's __snapshotted_since: a mapping made at ``mapping_time`` may be shared."""
        return self._details().snapshotted_time > mapping_time

    def cache(self) -> MappingCache:
        """The device's mapping cache (valid now; keep it while ``valid`` holds).

        Raises:
            DeviceNotFound: no device ``dev_id``.
        """
        return self.pmd.mapping_cache(self.dev_id)

    def find_block(self, thin_block: int) -> tuple[int, int] | None:
        """(data block, mapping time) of ``thin_block``, or None when unmapped. O(1) on a cache hit, else
        O(log n)."""
        v = self.pmd.mapping_cache(self.dev_id).find(thin_block)
        return None if v is None else (v >> TIME_BITS, v & TIME_MASK)

    def find_mapped_range(self, lo: int, hi: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(thin blocks, data blocks, times) of the mappings in [lo, hi) as uint64 arrays. O(log n + k)."""
        return self.pmd.mappings(self.dev_id, lo, hi)

    def find_mapped_dict(self, lo: int, hi: int) -> dict[int, tuple[int, int]]:
        """{thin block: (data block, time)} for the mappings in [lo, hi)."""
        if hi - lo == 1:
            m = self.pmd.lookup(self.dev_id, lo)
            return {} if m is None else {lo: m}
        k, d, t = self.pmd.mappings(self.dev_id, lo, hi)
        return dict(zip(k.tolist(), zip(d.tolist(), t.tolist())))

    def highest_mapped(self) -> int | None:
        return self.pmd.highest_mapped(self.dev_id)

    def has_free(self, nr_blocks: int) -> bool:
        """Whether ``nr_blocks`` data blocks can be allocated now."""
        return self.pmd.data_sm.has_free(nr_blocks)

    def release(self, data_block: int) -> None:
        """Give back a data block from ``DataAllocator.alloc_data_block`` that was never mapped."""
        self.pmd.data_sm.dec(data_block)

    def insert_block(self, thin_block: int, data_block: int) -> None:
        """Map ``thin_block`` -> ``data_block`` at the pool's current time; the mapping takes over the caller's
        reference on the data block, a replaced mapping drops its own. Must be in a writable transaction."""
        self.pmd.insert(self.dev_id, thin_block, data_block)

    def insert_blocks(self, thin_blocks: list[int], data_blocks: list[int]) -> None:
        """``insert_block`` for each pair, thin blocks sorted ascending without repeats (one descent per leaf)."""
        if len(thin_blocks) == 1:
            self.pmd.insert(self.dev_id, thin_blocks[0], data_blocks[0])
        else:
            self.pmd.insert_run(self.dev_id, thin_blocks, data_blocks)

    def remove_range(self, lo: int, hi: int) -> int:
        """Unmap [lo, hi); returns how many blocks were mapped."""
        return self.pmd.remove_range(self.dev_id, lo, hi)

    def metadata_exhausted(self) -> None:
        """Out of metadata space mid-I/O (dm-thin's metadata_operation_failed): drop the open transaction and
        set needs_check (committed data stays readable, the pool goes read-only)."""
        self.pmd.abort()
        self.pmd.set_needs_check()
