"""Restore metadata from thin_dump XML (thin_restore): parse into a format-neutral IR, then build fresh metadata.

Layer: metadata. May import: metadata.pool_metadata, io, formats.

Accepted input is thin_dump 0.9.0's grammar (superblock / device / range_mapping / single_mapping). Unlike
thin_restore 0.9.0, an overlapping mapping replaces the earlier one without leaving a stale data reference, and
the data space map counts one reference per mapping.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from thinpool.errors import InvalidArgument
from thinpool.formats.device_details import MAX_DATA_BLOCK, TIME_MASK, DeviceDetails
from thinpool.io.block_store import BlockStore
from thinpool.metadata.pool_metadata import PoolMetadata

_SB_REQUIRED = ("uuid", "time", "transaction", "data_block_size", "nr_data_blocks")
_DEV_REQUIRED = ("dev_id", "mapped_blocks", "transaction", "creation_time", "snap_time")
_RANGE_REQUIRED = ("origin_begin", "data_begin", "length", "time")
_SINGLE_REQUIRED = ("origin_block", "data_block", "time")


@dataclass
class DeviceIR:
    dev_id: int
    transaction: int
    creation_time: int
    snap_time: int
    mapped_blocks: int
    thin: list[np.ndarray] = field(default_factory=list)
    data: list[np.ndarray] = field(default_factory=list)
    times: list[np.ndarray] = field(default_factory=list)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sorted by thin block; for a thin block given twice, the later mapping wins."""
        if not self.thin:
            z = np.zeros(0, dtype=np.uint64)
            return z, z, z
        t = np.concatenate(self.thin)
        d = np.concatenate(self.data)
        tm = np.concatenate(self.times)
        order = np.argsort(t, kind="stable")
        t, d, tm = t[order], d[order], tm[order]
        keep = np.ones(len(t), dtype=bool)
        keep[:-1] = t[1:] != t[:-1]  # keep the last of equal keys
        return t[keep], d[keep], tm[keep]


@dataclass
class MetadataIR:
    time: int
    transaction: int
    flags: int
    version: int
    data_block_size: int
    nr_data_blocks: int
    devices: list[DeviceIR] = field(default_factory=list)


def _int(el: ET.Element, name: str) -> int:
    v = el.get(name)
    if v is None:
        raise InvalidArgument(reason=f"could not find attribute: {name} (in <{el.tag}>)")
    try:
        n = int(v)
    except ValueError:
        raise InvalidArgument(reason=f"attribute {name}={v!r} of <{el.tag}> is not a number") from None
    if n < 0:
        raise InvalidArgument(reason=f"attribute {name}={v!r} of <{el.tag}> is negative")
    return n


def parse_xml(src: IO[bytes] | IO[str] | str) -> MetadataIR:
    """Parse thin_dump XML into the IR. Raises InvalidArgument with a clear message on bad input."""
    ir: MetadataIR | None = None
    dev: DeviceIR | None = None
    seen: set[int] = set()
    buf_t: list[int] = []
    buf_d: list[int] = []
    buf_tm: list[int] = []

    def flush() -> None:
        if dev is not None and buf_t:
            dev.thin.append(np.array(buf_t, dtype=np.uint64))
            dev.data.append(np.array(buf_d, dtype=np.uint64))
            dev.times.append(np.array(buf_tm, dtype=np.uint64))
            buf_t.clear(), buf_d.clear(), buf_tm.clear()

    try:
        for event, el in ET.iterparse(src, events=("start", "end")):
            tag = el.tag
            if event == "start":
                if tag == "superblock":
                    for a in _SB_REQUIRED:
                        if el.get(a) is None:
                            raise InvalidArgument(reason=f"could not find attribute: {a}")
                    ir = MetadataIR(_int(el, "time"), _int(el, "transaction"), int(el.get("flags", "0")),
                                    int(el.get("version", "2")), _int(el, "data_block_size"),
                                    _int(el, "nr_data_blocks"))
                elif tag == "device":
                    if ir is None or dev is not None:
                        raise InvalidArgument(reason="<device> outside <superblock>")
                    for a in _DEV_REQUIRED:
                        _int(el, a)
                    dev_id = _int(el, "dev_id")
                    if dev_id in seen:
                        raise InvalidArgument(reason=f"Device already exists: {dev_id}")
                    seen.add(dev_id)
                    dev = DeviceIR(dev_id, _int(el, "transaction"), _int(el, "creation_time"),
                                   _int(el, "snap_time"), _int(el, "mapped_blocks"))
                elif tag in ("range_mapping", "single_mapping"):
                    if dev is None:
                        raise InvalidArgument(reason=f"<{tag}> outside <device>")
                    if tag == "range_mapping":
                        ob, db, n, t = (_int(el, a) for a in _RANGE_REQUIRED)
                    else:
                        ob, db, t = (_int(el, a) for a in _SINGLE_REQUIRED)
                        n = 1
                    if t > TIME_MASK:
                        raise InvalidArgument(reason=f"mapping time {t} does not fit in 24 bits")
                    if n > 1:
                        flush()
                        dev.thin.append(np.arange(ob, ob + n, dtype=np.uint64))
                        dev.data.append(np.arange(db, db + n, dtype=np.uint64))
                        dev.times.append(np.full(n, t, dtype=np.uint64))
                    elif n == 1:
                        buf_t.append(ob), buf_d.append(db), buf_tm.append(t)
                        if len(buf_t) >= 65536:
                            flush()
                else:
                    raise InvalidArgument(reason=f"unknown tag type: <{tag}>")
            else:
                if tag == "device":
                    flush()
                    assert ir is not None and dev is not None
                    ir.devices.append(dev)
                    dev = None
                el.clear()
    except ET.ParseError as e:
        raise InvalidArgument(reason=f"malformed XML: {e}") from None
    if ir is None:
        raise InvalidArgument(reason="no <superblock> element in the XML")
    return ir


def restore(ir: MetadataIR, store: BlockStore) -> PoolMetadata:
    """Write fresh metadata holding ``ir`` onto ``store`` (which is overwritten) and commit it."""
    if store.nr_blocks < 8:
        raise InvalidArgument(reason="output too small (need at least 32 KiB)")
    pmd = PoolMetadata.format(store, data_block_size=ir.data_block_size, nr_data_blocks=max(ir.nr_data_blocks, 1))
    for dev in ir.devices:
        thin, data, times = dev.arrays()
        if len(data) and int(data.max()) >= ir.nr_data_blocks:
            raise InvalidArgument(reason=f"mapping beyond end of data device ({int(data.max())} >= "
                                         f"{ir.nr_data_blocks})")
        if len(data) and int(data.max()) > MAX_DATA_BLOCK:
            raise InvalidArgument(reason="data block does not fit in 40 bits")
        pmd.build_device(dev.dev_id, thin, data, times,
                         DeviceDetails(len(thin), dev.transaction, dev.creation_time, dev.snap_time))
    pmd.time = ir.time
    pmd.trans_id = ir.transaction
    pmd.flags = ir.flags
    pmd.sb = pmd.sb.replace(version=ir.version)
    pmd.commit()
    return pmd
