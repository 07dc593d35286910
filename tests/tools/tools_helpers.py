"""Builders for library-level tool tests: metadata in a MemoryBlockStore, a model of every device's mappings,
and a block store that counts reads."""

from __future__ import annotations

import random

import numpy as np

from thinpool.io.block_store import MemoryBlockStore
from thinpool.metadata.pool_metadata import PoolMetadata

NR_DATA = 1 << 20


class CountingStore(MemoryBlockStore):
    """A MemoryBlockStore sharing another's blocks that counts the distinct blocks read."""

    def __init__(self, base: MemoryBlockStore) -> None:
        super().__init__(base.nr_blocks)
        self.blocks = dict(base.blocks)
        self.read_set: set[int] = set()

    def read_block(self, b: int) -> bytes:
        self.read_set.add(b)
        return super().read_block(b)


def new_md(nr_meta_blocks: int = 4096) -> tuple[MemoryBlockStore, PoolMetadata]:
    store = MemoryBlockStore(nr_meta_blocks)
    return store, PoolMetadata.format(store, data_block_size=128, nr_data_blocks=NR_DATA)


def reopen(store: MemoryBlockStore, counting: bool = False) -> PoolMetadata:
    s = CountingStore(store) if counting else store
    return PoolMetadata.open(s, readonly=True, space_maps=False)


def model(md: PoolMetadata) -> dict[int, dict[int, int]]:
    """dev_id -> {thin block: data block} (from the library's full arrays, the reference)."""
    out = {}
    for d in md.device_ids():
        t, db, _ = md.mappings(d)
        out[d] = dict(zip(t.tolist(), db.tolist()))
    return out


def random_pool(seed: int, nr_devices: int = 4, span: int = 3000, writes: int = 800) -> tuple[MemoryBlockStore,
                                                                                               PoolMetadata]:
    """Devices and snapshots of them with random writes (new data blocks), removes and rewrites, committed."""
    rng = random.Random(seed)
    store, md = new_md()
    md.create_thin(0)
    for _ in range(writes):
        tb = rng.randrange(span)
        md.insert(0, tb, md.alloc_data_block())
    # a consecutive stretch so that runs form
    for i in range(200):
        md.insert(0, 500 + i, 900_000 + i)  # far above what alloc_data_block hands out
    ids = [0]
    for dev in range(1, nr_devices):
        origin = rng.choice(ids)
        md.create_snap(dev, origin)
        ids.append(dev)
        for _ in range(rng.randrange(0, writes // 4)):
            target = rng.choice(ids)
            tb = rng.randrange(span)
            if rng.random() < 0.15:
                md.remove(target, tb)
            else:
                md.insert(target, tb, md.alloc_data_block())
    md.create_thin(nr_devices)  # an empty device
    md.commit()
    return store, md


def big_pair(nr_mappings: int, rewrites: list[int]) -> tuple[MemoryBlockStore, PoolMetadata]:
    """Device 1 with ``nr_mappings`` consecutive mappings and device 2 a snapshot of it with ``rewrites``
    remapped."""
    store, md = new_md(16384)
    t = np.arange(nr_mappings, dtype=np.uint64)
    md.build_device(1, t, t + np.uint64(10), np.zeros(nr_mappings, dtype=np.uint64))
    md.create_snap(2, 1)
    for tb in rewrites:
        md.insert(2, tb, md.alloc_data_block())
    md.commit()
    return store, md
