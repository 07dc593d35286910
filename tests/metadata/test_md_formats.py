"""On-disk sizes and constants pinned to the dm-thin v2 format (docs/dm-thin-format.md), checked against the real
images byte for byte where possible."""

from __future__ import annotations

import struct

from md_helpers import unpack_image

from thinpool import checksum
from thinpool.checksum import BlockType
from thinpool.formats import btree_node, device_details, space_map, superblock
from thinpool.formats.btree_node import calc_max_entries
from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.pool_metadata import PoolMetadata


def test_struct_sizes() -> None:
    assert superblock.SUPERBLOCK_SIZE == 364 and superblock.SuperblockStruct.sizeof() == 364
    assert btree_node.NODE_HEADER_SIZE == 32 and btree_node.NodeHeaderStruct.sizeof() == 32
    assert btree_node.NODE_HEADER_FMT.size == 32
    assert device_details.DEVICE_DETAILS_SIZE == 24 and device_details.DeviceDetailsStruct.sizeof() == 24
    assert space_map.INDEX_ENTRY_SIZE == 16 and space_map.IndexEntryStruct.sizeof() == 16
    assert space_map.SM_ROOT_SIZE == 32 and space_map.SmRootStruct.sizeof() == 32
    assert space_map.SM_ROOT_SLOT_SIZE == 128
    assert space_map.MetadataIndexStruct.sizeof() == 4096
    assert space_map.BITMAP_HEADER_SIZE == 16 and space_map.ENTRIES_PER_BITMAP == 16320
    assert space_map.MAX_METADATA_BITMAPS == 255


def test_constants() -> None:
    assert superblock.THIN_SUPERBLOCK_MAGIC == 27022010 and superblock.THIN_VERSION == 2
    assert [calc_max_entries(v) for v in (4, 8, 16, 24)] == [336, 252, 168, 126]
    assert (checksum.SUPERBLOCK_CSUM_XOR, checksum.BTREE_CSUM_XOR, checksum.INDEX_CSUM_XOR,
            checksum.BITMAP_CSUM_XOR) == (160774, 121107, 160478, 240779)
    assert device_details.TIME_BITS == 24
    # the standard CRC-32C check value, and the dm-thin transform (no final inversion, xor the salt)
    import crc32c
    assert crc32c.crc32c(b"123456789") == 0xE3069283
    blk = bytearray(4096)
    checksum.stamp(blk, BlockType.BTREE_NODE)
    assert struct.unpack_from("<I", blk)[0] == crc32c.crc32c(bytes(4092)) ^ 0xFFFFFFFF ^ 121107


def test_real_superblock_fields(tmp_path) -> None:
    """Worked example of the format doc: f3_snapshot's superblock."""
    path = unpack_image("f3_snapshot", tmp_path)
    raw = path.read_bytes()[:4096]
    assert raw[0x20:0x28] == bytes.fromhex("ba529c0100000000")
    assert not any(raw[364:])  # the rest of block 0 is zero
    sb = PoolMetadata.read_superblock(FileBlockStore(path, readonly=True))
    assert (sb.version, sb.time, sb.trans_id) == (2, 2, 5)
    d = sb.data_sm_root
    assert (d.nr_blocks, d.nr_allocated, d.bitmap_root, d.ref_count_root) == (2048, 7, 4, 5)
    m = sb.metadata_sm_root
    assert (m.nr_blocks, m.nr_allocated, m.bitmap_root, m.ref_count_root) == (64, 12, 1, 2)
    assert (sb.data_mapping_root, sb.device_details_root, sb.data_block_size, sb.metadata_block_size,
            sb.metadata_nr_blocks) == (7, 6, 128, 8, 64)
    # our encoder reproduces the superblock byte for byte
    buf = superblock.build_superblock(sb)
    checksum.stamp(buf, BlockType.SUPERBLOCK)
    assert bytes(buf) == raw


def test_every_block_of_the_images_round_trips(tmp_path) -> None:
    """Every node we decode from the real images re-encodes to the identical 4 KiB block (same checksum)."""
    from thinpool.btree.node import decode_node
    for name, vs_for in [("f4_refcount_multilevel", None), ("f3_snapshot", None)]:
        path = unpack_image(name, tmp_path)
        data = path.read_bytes()
        n = 0
        for b in range(len(data) // 4096):
            blk = data[b * 4096:(b + 1) * 4096]
            if checksum.identify(blk) is not BlockType.BTREE_NODE:
                continue
            vs = struct.unpack_from("<I", blk, 24)[0]
            flags = struct.unpack_from("<I", blk, 4)[0]
            node = decode_node(blk, b, vs if flags == 2 else 8)
            enc = node.encode()
            nr, mx = node.nr_entries, node.max_entries
            vbase = 32 + 8 * mx
            used = [(4, 32), (32, 32 + 8 * nr), (vbase, vbase + nr * node.value_size)]
            for lo, hi in used:  # header, used keys, used values: identical
                assert enc[lo:hi] == blk[lo:hi], (name, b, lo)
            # unused slots are ignored by readers; thin_restore leaves stale keys in a split node's copy, we
            # write zeros. Where the original's are zero too, the whole block (and checksum) is identical.
            unused = blk[32 + 8 * nr:vbase] + blk[vbase + nr * node.value_size:]
            if not any(unused):
                assert bytes(enc) == blk, (name, b)
                n += 1
        assert n >= 6
