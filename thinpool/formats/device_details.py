"""Device details (kernel struct disk_device_details, 24 bytes) and the mapping value block_time.

Layer: formats. May import: thinpool.errors, thinpool.units (lazy numpy), thinpool.formats.fields.

``pack_block_time`` / ``unpack_block_time`` (and their numpy forms for arrays of mappings) are the only place
the block_time packing is written out; everything else calls them.

details: mapped_blocks u64 | transaction_id u64 | creation_time u32 | snapshotted_time u32
block_time (u64) = data_block << 24 | time  (time: 24 bits, data block: 40 bits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from thinpool.errors import InvalidArgument
from thinpool.formats.fields import Layout, record
from thinpool.units import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

DEVICE_DETAILS_SIZE: Final = 24
TIME_BITS: Final = 24
TIME_MASK: Final = (1 << TIME_BITS) - 1
MAX_DATA_BLOCK: Final = (1 << 40) - 1

DEVICE_DETAILS_LAYOUT: Final = Layout("disk_device_details", (
    ("mapped_blocks", "Q"),
    ("transaction_id", "Q"),
    ("creation_time", "I"),
    ("snapshotted_time", "I"),
))
assert DEVICE_DETAILS_LAYOUT.size == DEVICE_DETAILS_SIZE


def __getattr__(name: str) -> object:
    if name == "DeviceDetailsStruct":  # the construct form of the same layout, built on first use
        return DEVICE_DETAILS_LAYOUT.construct()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@record
class DeviceDetails:
    mapped_blocks: int
    transaction_id: int
    creation_time: int
    snapshotted_time: int


def parse_device_details(buf: bytes) -> DeviceDetails:
    return DeviceDetails(*DEVICE_DETAILS_LAYOUT.fmt.unpack_from(buf))


def build_device_details(d: DeviceDetails) -> bytes:
    return DEVICE_DETAILS_LAYOUT.fmt.pack(d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time)


def pack_block_time(data_block: int, time: int) -> int:
    """Kernel pack_block_time; refuses values that would overflow into the other field.

    Raises:
        InvalidArgument: ``time`` outside 0..2^24-1 or ``data_block`` outside 0..2^40-1.
    """
    if not 0 <= time <= TIME_MASK or not 0 <= data_block <= MAX_DATA_BLOCK:
        raise InvalidArgument(reason=f"block_time out of range: data block {data_block} time {time}")
    return (data_block << TIME_BITS) | time


def unpack_block_time(value: int) -> tuple[int, int]:
    """(data_block, time) from a mapping value (kernel unpack_block_time)."""
    return value >> TIME_BITS, value & TIME_MASK


def pack_block_times(data_blocks: np.ndarray, times: np.ndarray) -> np.ndarray:
    """``pack_block_time`` over arrays (uint64 result).

    Raises:
        InvalidArgument: a time or data block out of range.
    """
    d = np.asarray(data_blocks)
    t = np.asarray(times)
    if len(d) and (int(d.min()) < 0 or int(d.max()) > MAX_DATA_BLOCK or int(t.min()) < 0
                   or int(t.max()) > TIME_MASK):
        raise InvalidArgument(reason="block_time out of range: a data block needs 40 bits, a time 24 bits")
    return (d.astype(np.uint64) << np.uint64(TIME_BITS)) | t.astype(np.uint64)


def unpack_block_times(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(data_blocks, times) as uint64 arrays from mapping values."""
    v = np.asarray(values, dtype=np.uint64)
    return v >> np.uint64(TIME_BITS), v & np.uint64(TIME_MASK)
