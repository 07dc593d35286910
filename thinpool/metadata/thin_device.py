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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from thinpool.errors import DeviceNotFound

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


class ThinDeviceMetadata:
    """Metadata operations on device ``dev_id`` of ``pmd`` (see the module docstring)."""

    __slots__ = ("pmd", "dev_id")

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

    def find_block(self, thin_block: int) -> tuple[int, int] | None:
        """(data block, mapping time) of ``thin_block``, or None when unmapped. O(log n)."""
        return self.pmd.lookup(self.dev_id, thin_block)

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

    def remove_range(self, lo: int, hi: int) -> int:
        """Unmap [lo, hi); returns how many blocks were mapped."""
        return self.pmd.remove_range(self.dev_id, lo, hi)

    def metadata_exhausted(self) -> None:
        """Out of metadata space mid-I/O (dm-thin's metadata_operation_failed): drop the open transaction and
        set needs_check (committed data stays readable, the pool goes read-only)."""
        self.pmd.abort()
        self.pmd.set_needs_check()
