"""Streaming build of one device's mapping tree (restore, repair, ``PoolMetadata.build_device``): mappings arrive
in chunks sorted by thin block, the tree is built bottom-up as leaves fill (btree/bulk.py), and the data blocks
gain their references chunk by chunk.

Layer: metadata. May import: thinpool.errors, thinpool.formats, thinpool.btree, metadata.pool_metadata (types).

Memory: one pending node per tree level, a short queue of encoded nodes and the chunk being added, whatever the
device's mapping count; the data space map's dirty pages (a uint32 and a byte per data block of the bitmaps
touched, counts >= 3 going to its ref-count tree at the commit) are the only state that grows, and it grows with
the data device, not with the mappings. The tree is block for block the one ``BTree.build`` makes from the
whole arrays (the number of mappings is given up front, so the leaves' even shares are known).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from thinpool.btree.bulk import BulkTreeBuilder
from thinpool.errors import DeviceExists, InvalidArgument
from thinpool.formats.device_details import TIME_MASK, DeviceDetails, pack_block_times

if TYPE_CHECKING:
    from thinpool.metadata.pool_metadata import PoolMetadata


class DeviceBuilder:
    """Builds device ``dev_id`` with exactly ``nr_mappings`` mappings: ``add`` them in chunks (thin blocks
    ascending, each chunk above the last), then ``finish``. The device exists once ``finish`` returns (its details
    are written at the next commit). Every block of the tree is allocated when the builder is made.

    Raises:
        DeviceExists / BadDeviceId / ReadOnly (when made); InvalidArgument (``add``: keys out of order or
        repeated, a data block beyond the data device, a time wider than 24 bits, more mappings than announced;
        ``finish``: fewer). A failed build leaves the transaction to be aborted.
    """

    def __init__(self, md: PoolMetadata, dev_id: int, nr_mappings: int, details: DeviceDetails | None = None) -> None:
        md._check_writable()
        md._check_id(dev_id)
        if dev_id in md.devices:
            raise DeviceExists(dev_id=dev_id)
        self.md = md
        self.dev_id = dev_id
        self.nr_mappings = nr_mappings
        self.details = details or DeviceDetails(0, md.trans_id, md.time, md.time)
        self._last: int | None = None  # the highest thin block added
        self.tree = BulkTreeBuilder(md.tm, nr_mappings)

    def add(self, thin_blocks: np.ndarray, data_blocks: np.ndarray, times: np.ndarray) -> None:
        """Add a chunk of mappings (thin blocks sorted and unique, above those added before)."""
        n = len(thin_blocks)
        if not n == len(data_blocks) == len(times):
            raise InvalidArgument(reason="build_device: thin_blocks, data_blocks and times differ in length")
        if n == 0:
            return
        tb = thin_blocks.astype(np.uint64, copy=False)
        if (self._last is not None and int(tb[0]) <= self._last) or (n > 1 and not bool((tb[1:] > tb[:-1]).all())):
            raise InvalidArgument(reason="build_device: thin blocks must be sorted and unique")
        nr_data = self.md.data_sm.nr_blocks
        hi = int(data_blocks.max())
        if int(data_blocks.min()) < 0 or hi >= nr_data:
            raise InvalidArgument(reason=f"build_device: data block {hi} beyond the data device ({nr_data} blocks)")
        if int(times.max()) > TIME_MASK or int(times.min()) < 0:
            raise InvalidArgument(reason="build_device: mapping time does not fit in 24 bits")
        if self.tree.added + n > self.nr_mappings:
            raise InvalidArgument(reason=f"build_device: more than the {self.nr_mappings} mappings announced")
        self.md.data_sm.inc_many(data_blocks.astype(np.int64, copy=False))
        self.tree.add(tb, pack_block_times(data_blocks, times))
        self._last = int(tb[-1])

    def finish(self) -> int:
        """Write the rest of the tree and enter the device in the top-level tree. Returns the tree's root."""
        root = self.tree.finish()
        self.md._attach_device(self.dev_id, root, self.nr_mappings, self.details)
        return root
