"""Space-map on-disk structures: sm_root (32 bytes in a 128-byte slot), index entry (16), bitmap header (16),
metadata index block (16 + 255 x 16 = 4096). Kernel: struct disk_sm_root, disk_index_entry, disk_bitmap_header,
disk_metadata_index (dm-space-map-common.h).

Layer: formats. May import: thinpool.errors, thinpool.units (lazy numpy), thinpool.formats.fields.

Bitmap packing (the kernel's, easy to get wrong): two bits per block, entry i in byte 16 + i//4 at shift
2*(i%4); the LOWER bit carries value 2 and the higher bit value 1, so raw 0b10 means count 1 and raw 0b01 count 2.
Raw 3 means "count >= 3, look in the ref-count tree".
"""

from __future__ import annotations

import functools
import struct
from typing import TYPE_CHECKING, Final

from thinpool.formats.fields import Layout, record
from thinpool.units import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

SM_ROOT_SLOT_SIZE: Final = 128  # bytes reserved in the superblock
SM_ROOT_SIZE: Final = 32
INDEX_ENTRY_SIZE: Final = 16
BITMAP_HEADER_SIZE: Final = 16
ENTRIES_PER_BITMAP: Final = (4096 - BITMAP_HEADER_SIZE) * 4  # 16320
MAX_METADATA_BITMAPS: Final = 255

SM_ROOT_LAYOUT: Final = Layout("disk_sm_root", (
    ("nr_blocks", "Q"),
    ("nr_allocated", "Q"),
    ("bitmap_root", "Q"),
    ("ref_count_root", "Q"),
))
INDEX_ENTRY_LAYOUT: Final = Layout("disk_index_entry", (
    ("blocknr", "Q"),
    ("nr_free", "I"),
    ("none_free_before", "I"),
))
BITMAP_HEADER_LAYOUT: Final = Layout("disk_bitmap_header", (("csum", "I"), ("not_used", "I"), ("blocknr", "Q")))
METADATA_INDEX_LAYOUT: Final = Layout("disk_metadata_index", (
    ("csum", "I"),
    ("padding", "I"),
    ("blocknr", "Q"),
    ("index", f"{MAX_METADATA_BITMAPS * INDEX_ENTRY_SIZE}s"),
))
assert SM_ROOT_LAYOUT.size == SM_ROOT_SIZE and INDEX_ENTRY_LAYOUT.size == INDEX_ENTRY_SIZE
assert BITMAP_HEADER_LAYOUT.size == BITMAP_HEADER_SIZE and METADATA_INDEX_LAYOUT.size == 4096
_CONSTRUCT_NAMES: Final = {"SmRootStruct": SM_ROOT_LAYOUT, "IndexEntryStruct": INDEX_ENTRY_LAYOUT,
                           "BitmapHeaderStruct": BITMAP_HEADER_LAYOUT, "MetadataIndexStruct": METADATA_INDEX_LAYOUT}


def __getattr__(name: str) -> object:
    if name in _CONSTRUCT_NAMES:  # the construct forms of the same layouts, built on first use
        return _CONSTRUCT_NAMES[name].construct()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@record
class SmRoot:
    nr_blocks: int
    nr_allocated: int
    bitmap_root: int
    ref_count_root: int


@record
class IndexEntry:
    blocknr: int
    nr_free: int
    none_free_before: int


def parse_sm_root(buf: bytes) -> SmRoot:
    return SmRoot(*SM_ROOT_LAYOUT.fmt.unpack_from(buf))


def build_sm_root(r: SmRoot) -> bytes:
    return SM_ROOT_LAYOUT.fmt.pack(r.nr_blocks, r.nr_allocated, r.bitmap_root, r.ref_count_root).ljust(
        SM_ROOT_SLOT_SIZE, b"\0")


def parse_index_entry(buf: bytes) -> IndexEntry:
    return IndexEntry(*INDEX_ENTRY_LAYOUT.fmt.unpack_from(buf))


def build_index_entry(e: IndexEntry) -> bytes:
    return INDEX_ENTRY_LAYOUT.fmt.pack(e.blocknr, e.nr_free, e.none_free_before)


def parse_metadata_index(buf: bytes, nr_bitmaps: int) -> list[IndexEntry]:
    if len(buf) < METADATA_INDEX_LAYOUT.size or not 0 <= nr_bitmaps <= MAX_METADATA_BITMAPS:
        raise struct.error(f"{nr_bitmaps} entries from a {len(buf)}-byte metadata index block")
    off = BITMAP_HEADER_SIZE  # the index entries follow csum, padding, blocknr
    return [IndexEntry(*e) for e in INDEX_ENTRY_LAYOUT.fmt.iter_unpack(
        memoryview(buf)[off:off + nr_bitmaps * INDEX_ENTRY_SIZE])]


def build_metadata_index(blocknr: int, entries: list[IndexEntry]) -> bytearray:
    body = b"".join(build_index_entry(e) for e in entries).ljust(MAX_METADATA_BITMAPS * INDEX_ENTRY_SIZE, b"\0")
    return bytearray(METADATA_INDEX_LAYOUT.pack(csum=0, padding=0, blocknr=blocknr, index=body))


@functools.cache
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """(raw 2-bit value <-> count (0..3), the mapping its own inverse; the 4 shifts in a byte), built on first use
    so that importing this module does not load numpy."""
    return np.array([0, 2, 1, 3], dtype=np.uint8), np.array([0, 2, 4, 6], dtype=np.uint8)


def decode_bitmap(block: bytes | bytearray | memoryview) -> np.ndarray:
    """The 16320 two-bit entries of a bitmap block as counts 0..3 (uint8)."""
    swap, shifts = _tables()
    payload = np.frombuffer(block, dtype=np.uint8, count=4096 - BITMAP_HEADER_SIZE, offset=BITMAP_HEADER_SIZE)
    raw = (payload[:, None] >> shifts[None, :]) & 3
    out: np.ndarray = swap[raw.reshape(-1)]
    return out


def encode_bitmap(blocknr: int, counts: np.ndarray) -> bytearray:
    """Build a bitmap block from up to 16320 counts (values >= 3 are stored as 3); checksum left 0."""
    swap, shifts = _tables()
    vals = np.zeros(ENTRIES_PER_BITMAP, dtype=np.uint8)
    n = min(len(counts), ENTRIES_PER_BITMAP)
    vals[:n] = np.minimum(counts[:n], 3)
    raw = swap[vals].reshape(-1, 4) << shifts[None, :]
    payload = np.bitwise_or.reduce(raw, axis=1).astype(np.uint8)
    block = bytearray(BITMAP_HEADER_LAYOUT.pack(csum=0, not_used=0, blocknr=blocknr))
    block += payload.tobytes()
    return block
