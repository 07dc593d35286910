"""Corrupt metadata raises a typed error naming the damaged block (never IndexError / struct.error /
RecursionError, never a hang), and the checker reports the same block."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from md_helpers import new_pool_file, our_dump

from thinpool import checksum
from thinpool.btree.spine import NodeCache
from thinpool.checksum import BlockType
from thinpool.errors import ChecksumError, MetadataCorrupt
from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.check import check_metadata
from thinpool.metadata.pool_metadata import PoolMetadata

BS = 4096


def build_pool(path: Path) -> dict[str, int]:
    """A pool whose trees have the shapes the corruptions need; returns the interesting block numbers."""
    pmd = new_pool_file(path, nr_meta_blocks=1024, nr_data_blocks=40_000)  # 3 data bitmaps: index leaf of 3
    keys = np.arange(0, 2000, 2, dtype=np.uint64)
    pmd.build_device(1, keys, keys // np.uint64(2), np.zeros(len(keys), dtype=np.uint64))  # internal root, 4 leaves
    pmd.create_thin(2)
    for t in range(5):
        pmd.insert(2, t, pmd.alloc_data_block())
    pmd.create_snap(3, 1)
    pmd.commit()
    root1 = pmd.device_root(1)
    n = NodeCache.of(pmd.tm).read(root1, 8)
    assert not n.is_leaf and len(n.keys) == 4
    blocks = {
        "bottom_internal": root1,
        "bottom_leaf": int(n.values[2]),
        "small_leaf": pmd.device_root(2),
        "top_leaf": pmd.mapping_root,
        "details_leaf": pmd.details_root,
        "data_index_leaf": pmd.sb.data_sm_root.bitmap_root,
        "data_bitmap": pmd.data_disk.bitmap_blocks[1],
        "meta_index": pmd.sb.metadata_sm_root.bitmap_root,
        "meta_bitmap": pmd.meta_disk.bitmap_blocks[0],
    }
    pmd.close()
    return blocks


def read_block(path: Path, b: int) -> bytearray:
    with open(path, "rb") as f:
        f.seek(b * BS)
        return bytearray(f.read(BS))


def write_block(path: Path, b: int, buf: bytearray) -> None:
    with open(path, "r+b") as f:
        f.seek(b * BS)
        f.write(buf)


def block_type(kind: str) -> BlockType:
    if kind == "meta_index":
        return BlockType.INDEX
    if kind.endswith("bitmap"):
        return BlockType.BITMAP
    return BlockType.BTREE_NODE


def exercise(path: Path) -> None:
    """Open read-write and read everything a user can reach: every device's mappings, the dump, a write."""
    pmd = PoolMetadata.open(FileBlockStore(path))
    our_dump(pmd)
    for dev in pmd.device_ids():
        pmd.lookup(dev, 500)
        pmd.highest_mapped(dev)
    pmd.insert(1, 10_000, pmd.alloc_data_block())
    pmd.remove(2, 3)
    # The data space map is paged in on demand (spacemap/paged.py): a bitmap is read, and its damage found,
    # when a block it covers is counted. Count one block of each bitmap, as a user whose data lives there would.
    for b in range(0, pmd.data_sm.nr_blocks, 16320):
        pmd.data_sm.count(b)
    pmd.commit()


def expect_corrupt(path: Path, blocks: set[int], exc: type[Exception] = MetadataCorrupt) -> None:
    with pytest.raises(exc) as ei:
        exercise(path)
    err = ei.value
    assert isinstance(err, MetadataCorrupt)
    assert err.block in blocks, f"error names block {err.block}, expected one of {blocks}: {err}"
    assert str(err.block) in str(err)
    report = check_metadata(FileBlockStore(path, readonly=True))
    assert not report.ok
    assert any(p.block in blocks for p in report.errors), [str(p) for p in report.problems]


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "pool.bin"
    blocks = build_pool(path)
    exercise(path)  # the undamaged pool works
    path2 = tmp_path / "pool2.bin"
    blocks = build_pool(path2)  # a fresh copy (exercise changed the first)
    return path2, blocks


ALL = ["bottom_internal", "bottom_leaf", "small_leaf", "top_leaf", "details_leaf", "data_index_leaf", "data_bitmap",
       "meta_index", "meta_bitmap"]
NODES = ["bottom_internal", "bottom_leaf", "small_leaf", "top_leaf", "details_leaf", "data_index_leaf"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ALL)
def test_bad_checksum(pool, kind) -> None:
    path, blocks = pool
    b = blocks[kind]
    buf = read_block(path, b)
    buf[100] ^= 0x40
    write_block(path, b, buf)
    expect_corrupt(path, {b}, ChecksumError)


@pytest.mark.timeout(30)
def test_bad_superblock_checksum(pool) -> None:
    path, _ = pool
    buf = read_block(path, 0)
    buf[0x30] ^= 1  # trans_id
    write_block(path, 0, buf)
    with pytest.raises(ChecksumError) as ei:
        exercise(path)
    assert ei.value.block == 0
    report = check_metadata(FileBlockStore(path, readonly=True))
    assert [p.block for p in report.errors] == [0]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ALL)
def test_wrong_block_number(pool, kind) -> None:
    path, blocks = pool
    b = blocks[kind]
    buf = read_block(path, b)
    struct.pack_into("<Q", buf, 8, b + 1)
    checksum.stamp(buf, block_type(kind))
    write_block(path, b, buf)
    expect_corrupt(path, {b})


@pytest.mark.timeout(30)
def test_block_copied_to_wrong_place(pool) -> None:
    """A valid node written at another location (a misdirected write): self block number catches it."""
    path, blocks = pool
    src, dst = blocks["bottom_leaf"], blocks["small_leaf"]
    write_block(path, dst, read_block(path, src))
    expect_corrupt(path, {dst})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", NODES)
def test_keys_out_of_order(pool, kind) -> None:
    path, blocks = pool
    b = blocks[kind]
    buf = read_block(path, b)
    nr = struct.unpack_from("<I", buf, 16)[0]
    assert nr >= 2
    k0, k1 = struct.unpack_from("<QQ", buf, 32)
    struct.pack_into("<QQ", buf, 32, k1, k0)
    checksum.stamp(buf, BlockType.BTREE_NODE)
    write_block(path, b, buf)
    expect_corrupt(path, {b})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", NODES)
@pytest.mark.parametrize("nr", [253, 2**32 - 1])
def test_nr_entries_above_max(pool, kind, nr) -> None:
    path, blocks = pool
    b = blocks[kind]
    buf = read_block(path, b)
    struct.pack_into("<I", buf, 16, nr if kind not in ("details_leaf", "data_index_leaf") else nr - 253 + 127
                     if nr == 253 else nr)
    checksum.stamp(buf, BlockType.BTREE_NODE)
    write_block(path, b, buf)
    expect_corrupt(path, {b})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", NODES)
@pytest.mark.parametrize("max_entries", [0, 255, 1000])
def test_bad_max_entries(pool, kind, max_entries) -> None:
    path, blocks = pool
    b = blocks[kind]
    buf = read_block(path, b)
    struct.pack_into("<I", buf, 20, max_entries)
    checksum.stamp(buf, BlockType.BTREE_NODE)
    write_block(path, b, buf)
    expect_corrupt(path, {b})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ptr", [1024, 5000, 2**40, 2**64 - 1])
def test_child_pointer_out_of_range(pool, ptr) -> None:
    path, blocks = pool
    b = blocks["bottom_internal"]
    buf = read_block(path, b)
    struct.pack_into("<Q", buf, 32 + 8 * 252 + 8 * 1, ptr)  # value (child) 1
    checksum.stamp(buf, BlockType.BTREE_NODE)
    write_block(path, b, buf)
    expect_corrupt(path, {b})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("child", [1, 3])
def test_cycle_child_points_at_ancestor(pool, child) -> None:
    """The internal root's child points back at the root itself (checksum re-stamped)."""
    path, blocks = pool
    b = blocks["bottom_internal"]
    buf = read_block(path, b)
    struct.pack_into("<Q", buf, 32 + 8 * 252 + 8 * child, b)
    checksum.stamp(buf, BlockType.BTREE_NODE)
    write_block(path, b, buf)
    expect_corrupt(path, {b})


@pytest.mark.timeout(30)
def test_cycle_through_two_nodes(tmp_path) -> None:
    """A three-level tree where a leaf-level pointer of the lower internal node points at the root."""
    path = tmp_path / "deep.bin"
    pmd = new_pool_file(path, nr_meta_blocks=4096, nr_data_blocks=200_000)
    keys = np.arange(100_000, dtype=np.uint64)
    pmd.build_device(1, keys, keys, np.zeros(len(keys), dtype=np.uint64))
    pmd.commit()
    root = pmd.device_root(1)
    mid = int(NodeCache.of(pmd.tm).read(root, 8).values[0])
    assert not NodeCache.of(pmd.tm).read(mid, 8).is_leaf
    pmd.close()
    buf = read_block(path, mid)
    struct.pack_into("<Q", buf, 32 + 8 * 252 + 8 * 5, root)
    checksum.stamp(buf, BlockType.BTREE_NODE)
    write_block(path, mid, buf)
    expect_corrupt(path, {root, mid})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("flags", [0, 3, 4, 0xFFFFFFFF])
def test_bad_node_flags(pool, flags) -> None:
    path, blocks = pool
    b = blocks["bottom_leaf"]
    buf = read_block(path, b)
    struct.pack_into("<I", buf, 4, flags)
    checksum.stamp(buf, BlockType.BTREE_NODE)
    write_block(path, b, buf)
    expect_corrupt(path, {b})


@pytest.mark.timeout(30)
def test_garbage_blocks_never_escape_as_untyped_errors(pool) -> None:
    """Random bytes (with a valid node checksum) in every interesting block, one at a time."""
    path, blocks = pool
    rng = np.random.default_rng(0)
    original = path.read_bytes()
    for kind, b in blocks.items():
        for _ in range(5):
            path.write_bytes(original)
            buf = bytearray(rng.integers(0, 256, BS, dtype=np.uint8).tobytes())
            struct.pack_into("<Q", buf, 8, b)
            checksum.stamp(buf, block_type(kind))
            write_block(path, b, buf)
            with pytest.raises(MetadataCorrupt):
                exercise(path)
            assert not check_metadata(FileBlockStore(path, readonly=True)).ok


@pytest.mark.timeout(30)
@pytest.mark.parametrize("field,offset,fmt,value", [
    ("data_mapping_root", 0x140, "<Q", 10**12),
    ("data_mapping_root", 0x140, "<Q", 2**64 - 1),
    ("device_details_root", 0x148, "<Q", 5000),
    ("device_details_root", 0x148, "<Q", 0),
    ("metadata sm nr_blocks", 0xC0, "<Q", 2**40),
    ("metadata sm bitmap_root", 0xC0 + 16, "<Q", 10**9),
    ("data sm nr_blocks", 0x40, "<Q", 2**40),
    ("data sm bitmap_root", 0x40 + 16, "<Q", 7777),
    ("data sm ref_count_root", 0x40 + 24, "<Q", 2**63),
    ("metadata_snap", 0x38, "<Q", 10**6),
])
def test_bad_superblock_pointers(pool, field, offset, fmt, value) -> None:
    """Superblock fields pointing nowhere (checksum re-stamped): a typed error, never an untyped one or a
    giant allocation; the checker reports a problem too."""
    path, _ = pool
    buf = read_block(path, 0)
    struct.pack_into(fmt, buf, offset, value)
    checksum.stamp(buf, BlockType.SUPERBLOCK)
    write_block(path, 0, buf)
    with pytest.raises(MetadataCorrupt) as ei:
        exercise(path)
        if field == "metadata_snap":
            PoolMetadata.open(FileBlockStore(path), readonly=True, use_metadata_snap=True)
    assert ei.value.block is not None
    report = check_metadata(FileBlockStore(path, readonly=True))
    assert not report.ok
