"""Device details (kernel struct disk_device_details, 24 bytes) and the mapping value block_time.

Layer: formats. May import: nothing.

details: mapped_blocks u64 | transaction_id u64 | creation_time u32 | snapshotted_time u32
block_time (u64) = data_block << 24 | time  (time: 24 bits, data block: 40 bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import construct as cs

DEVICE_DETAILS_SIZE: Final = 24
TIME_BITS: Final = 24
TIME_MASK: Final = (1 << TIME_BITS) - 1
MAX_DATA_BLOCK: Final = (1 << 40) - 1

DeviceDetailsStruct = cs.Struct(
    "mapped_blocks" / cs.Int64ul,
    "transaction_id" / cs.Int64ul,
    "creation_time" / cs.Int32ul,
    "snapshotted_time" / cs.Int32ul,
)
assert DeviceDetailsStruct.sizeof() == DEVICE_DETAILS_SIZE


@dataclass(frozen=True, slots=True)
class DeviceDetails:
    mapped_blocks: int
    transaction_id: int
    creation_time: int
    snapshotted_time: int


def parse_device_details(buf: bytes) -> DeviceDetails:
    c = DeviceDetailsStruct.parse(buf)
    return DeviceDetails(c.mapped_blocks, c.transaction_id, c.creation_time, c.snapshotted_time)


def build_device_details(d: DeviceDetails) -> bytes:
    return DeviceDetailsStruct.build(dict(mapped_blocks=d.mapped_blocks, transaction_id=d.transaction_id,
                                          creation_time=d.creation_time, snapshotted_time=d.snapshotted_time))


def pack_block_time(data_block: int, time: int) -> int:
    """Kernel pack_block_time; refuses values that would overflow into the other field."""
    if not 0 <= time <= TIME_MASK or not 0 <= data_block <= MAX_DATA_BLOCK:
        raise ValueError(f"block_time out of range: block {data_block} time {time}")
    return (data_block << TIME_BITS) | time


def unpack_block_time(value: int) -> tuple[int, int]:
    """(data_block, time) from a mapping value."""
    return value >> TIME_BITS, value & TIME_MASK
