"""Block maps of thin devices: virtual -> data ranges, shared or exclusive, holes and external-origin ranges, as
``qemu-img map --output=json`` entries (bytes) plus ``shared``.

Layer: tools. May import: thinpool.metadata, thinpool.tools.sharing, numpy.

Memory: the entries (one per run, the output) and the sharing bit maps; the mappings are streamed leaf by leaf.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from thinpool.metadata.ir import RunJoiner, Runs, batched_leaves, mapping_leaves
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.tools.sharing import Sharing

Entry = dict[str, Any]


def device_map(md: PoolMetadata, dev_id: int, size: int, sharing: Sharing, origin_size: int = 0) -> list[Entry]:
    """Entries covering [0, size) bytes of ``dev_id``: data runs (contiguous in the device and in the data
    device, one sharing state), and between them the external origin (depth 1, up to ``origin_size``) or holes.

    Raises:
        DeviceNotFound, MetadataCorrupt.
    """
    ch = md.data_block_size * 512
    out: list[Entry] = []
    pos = 0

    def gap(a: int, b: int) -> None:
        b = min(b, size)
        if b <= a:
            return
        o = min(max(origin_size, a), b)
        if o > a:
            out.append({"start": a, "length": o - a, "depth": 1, "present": True, "zero": False, "data": True,
                        "offset": a, "shared": False})
        if b > o:
            out.append({"start": o, "length": b - o, "depth": 0, "present": False, "zero": True, "data": False,
                        "shared": False})

    def take(runs: Runs) -> bool:
        nonlocal pos
        for tb, db, shared, n in runs.rows():
            a = tb * ch
            if a >= size:
                return False
            gap(pos, a)
            length = min(n * ch, size - a)
            out.append({"start": a, "length": length, "depth": 0, "present": True, "zero": False, "data": True,
                        "offset": db * ch, "shared": bool(shared)})
            pos = a + length
        return True

    joiner = RunJoiner(2, 1)
    going = True
    for thin, data, _ in batched_leaves(mapping_leaves(md, md.device_root(dev_id))):
        if not take(joiner.feed((thin, data), (sharing.is_shared(data).astype(np.int64),))):
            going = False
            break
    if going:
        take(joiner.flush())
    gap(pos, size)
    return out
