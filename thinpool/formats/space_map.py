"""Space-map on-disk structures: sm_root (32 bytes in a 128-byte slot), index entry (16), bitmap header (16),
metadata index block (16 + 255 x 16 = 4096). Kernel: struct disk_sm_root, disk_index_entry, disk_bitmap_header,
disk_metadata_index (dm-space-map-common.h).

Layer: formats. May import: thinpool.errors.

Bitmap packing (the kernel's, easy to get wrong): two bits per block, entry i in byte 16 + i//4 at shift
2*(i%4); the LOWER bit carries value 2 and the higher bit value 1, so raw 0b10 means count 1 and raw 0b01 count 2.
Raw 3 means "count >= 3, look in the ref-count tree".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import construct as cs
import numpy as np

SM_ROOT_SLOT_SIZE: Final = 128  # bytes reserved in the superblock
SM_ROOT_SIZE: Final = 32
INDEX_ENTRY_SIZE: Final = 16
BITMAP_HEADER_SIZE: Final = 16
ENTRIES_PER_BITMAP: Final = (4096 - BITMAP_HEADER_SIZE) * 4  # 16320
MAX_METADATA_BITMAPS: Final = 255

SmRootStruct = cs.Struct(
    "nr_blocks" / cs.Int64ul,
    "nr_allocated" / cs.Int64ul,
    "bitmap_root" / cs.Int64ul,
    "ref_count_root" / cs.Int64ul,
)
IndexEntryStruct = cs.Struct(
    "blocknr" / cs.Int64ul,
    "nr_free" / cs.Int32ul,
    "none_free_before" / cs.Int32ul,
)
BitmapHeaderStruct = cs.Struct("csum" / cs.Int32ul, "not_used" / cs.Int32ul, "blocknr" / cs.Int64ul)
MetadataIndexStruct = cs.Struct(
    "csum" / cs.Int32ul,
    "padding" / cs.Int32ul,
    "blocknr" / cs.Int64ul,
    "index" / cs.Bytes(MAX_METADATA_BITMAPS * INDEX_ENTRY_SIZE),
)
assert SmRootStruct.sizeof() == SM_ROOT_SIZE and IndexEntryStruct.sizeof() == INDEX_ENTRY_SIZE
assert BitmapHeaderStruct.sizeof() == BITMAP_HEADER_SIZE and MetadataIndexStruct.sizeof() == 4096


@dataclass(frozen=True, slots=True)
class SmRoot:
    nr_blocks: int
    nr_allocated: int
    bitmap_root: int
    ref_count_root: int


@dataclass(frozen=True, slots=True)
class IndexEntry:
    blocknr: int
    nr_free: int
    none_free_before: int


def parse_sm_root(buf: bytes) -> SmRoot:
    c = SmRootStruct.parse(buf[:SM_ROOT_SIZE])
    return SmRoot(c.nr_blocks, c.nr_allocated, c.bitmap_root, c.ref_count_root)


def build_sm_root(r: SmRoot) -> bytes:
    return bytes(SmRootStruct.build(dict(nr_blocks=r.nr_blocks, nr_allocated=r.nr_allocated, bitmap_root=r.bitmap_root,
                                   ref_count_root=r.ref_count_root))).ljust(SM_ROOT_SLOT_SIZE, b"\0")


def parse_index_entry(buf: bytes) -> IndexEntry:
    c = IndexEntryStruct.parse(buf)
    return IndexEntry(c.blocknr, c.nr_free, c.none_free_before)


def build_index_entry(e: IndexEntry) -> bytes:
    return bytes(IndexEntryStruct.build(dict(blocknr=e.blocknr, nr_free=e.nr_free,
                                             none_free_before=e.none_free_before)))


def parse_metadata_index(buf: bytes, nr_bitmaps: int) -> list[IndexEntry]:
    c = MetadataIndexStruct.parse(bytes(buf))
    return [parse_index_entry(c.index[i * 16:(i + 1) * 16]) for i in range(nr_bitmaps)]


def build_metadata_index(blocknr: int, entries: list[IndexEntry]) -> bytearray:
    body = b"".join(build_index_entry(e) for e in entries).ljust(MAX_METADATA_BITMAPS * INDEX_ENTRY_SIZE, b"\0")
    return bytearray(MetadataIndexStruct.build(dict(csum=0, padding=0, blocknr=blocknr, index=body)))


# raw 2-bit value <-> count (0..3); the mapping is its own inverse.
_SWAP = np.array([0, 2, 1, 3], dtype=np.uint8)
_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)


def decode_bitmap(block: bytes | bytearray | memoryview) -> np.ndarray:
    """The 16320 two-bit entries of a bitmap block as counts 0..3 (uint8)."""
    payload = np.frombuffer(block, dtype=np.uint8, count=4096 - BITMAP_HEADER_SIZE, offset=BITMAP_HEADER_SIZE)
    raw = (payload[:, None] >> _SHIFTS[None, :]) & 3
    out: np.ndarray = _SWAP[raw.reshape(-1)]
    return out


def encode_bitmap(blocknr: int, counts: np.ndarray) -> bytearray:
    """Build a bitmap block from up to 16320 counts (values >= 3 are stored as 3); checksum left 0."""
    vals = np.zeros(ENTRIES_PER_BITMAP, dtype=np.uint8)
    n = min(len(counts), ENTRIES_PER_BITMAP)
    vals[:n] = np.minimum(counts[:n], 3)
    raw = _SWAP[vals].reshape(-1, 4) << _SHIFTS[None, :]
    payload = np.bitwise_or.reduce(raw, axis=1).astype(np.uint8)
    block = bytearray(BitmapHeaderStruct.build(dict(csum=0, not_used=0, blocknr=blocknr)))
    block += payload.tobytes()
    return block
