"""B-tree node header (kernel struct node_header, 32 bytes) and node capacity.

Layer: formats. May import: thinpool.formats.fields.

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

from typing import Final

from thinpool.formats.fields import Layout

NODE_HEADER_SIZE: Final = 32
INTERNAL_NODE: Final = 1
LEAF_NODE: Final = 2

NODE_HEADER_LAYOUT: Final = Layout("node_header", (
    ("csum", "I"),
    ("flags", "I"),
    ("blocknr", "Q"),
    ("nr_entries", "I"),
    ("max_entries", "I"),
    ("value_size", "I"),
    ("padding", "I"),
))
# the struct form, for the hot path (construct parses ~50x slower per call)
NODE_HEADER_FMT: Final = NODE_HEADER_LAYOUT.fmt
assert NODE_HEADER_FMT.size == NODE_HEADER_SIZE


def __getattr__(name: str) -> object:
    if name == "NodeHeaderStruct":  # the construct form of the same layout, built on first use
        return NODE_HEADER_LAYOUT.construct()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def calc_max_entries(value_size: int) -> int:
    """Largest multiple of 3 entries that fit in a 4 KiB node (kernel calc_max_entries)."""
    return 3 * (((4096 - NODE_HEADER_SIZE) // (8 + value_size)) // 3)
