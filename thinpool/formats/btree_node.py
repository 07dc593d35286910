"""B-tree node header (kernel struct node_header, 32 bytes) and node capacity.

Layer: formats. May import: nothing.

| off | size | field       |
|-----|------|-------------|
| 0   | 4    | csum (salt 121107) |
| 4   | 4    | flags: 1 INTERNAL, 2 LEAF |
| 8   | 8    | blocknr (self) |
| 16  | 4    | nr_entries  |
| 20  | 4    | max_entries |
| 24  | 4    | value_size  |
| 28  | 4    | padding     |

Keys: max_entries little-endian u64 from byte 32; values start at 32 + 8*max_entries (after the FULL key array).
"""

from __future__ import annotations

import struct
from typing import Final

import construct as cs

NODE_HEADER_SIZE: Final = 32
INTERNAL_NODE: Final = 1
LEAF_NODE: Final = 2

NodeHeaderStruct = cs.Struct(
    "csum" / cs.Int32ul,
    "flags" / cs.Int32ul,
    "blocknr" / cs.Int64ul,
    "nr_entries" / cs.Int32ul,
    "max_entries" / cs.Int32ul,
    "value_size" / cs.Int32ul,
    "padding" / cs.Int32ul,
)
assert NodeHeaderStruct.sizeof() == NODE_HEADER_SIZE
# The same layout as a struct format, for the hot path (construct parses ~50x slower per call).
NODE_HEADER_FMT: Final = struct.Struct("<IIQIIII")
assert NODE_HEADER_FMT.size == NODE_HEADER_SIZE


def calc_max_entries(value_size: int) -> int:
    """Largest multiple of 3 entries that fit in a 4 KiB node (kernel calc_max_entries)."""
    return 3 * (((4096 - NODE_HEADER_SIZE) // (8 + value_size)) // 3)
