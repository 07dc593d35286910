"""The on-disk structs: pinned sizes, and the fast struct formats agree with the construct descriptions."""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from thinpool.fs import layout as L
from thinpool.fs.directory import parse_dir_block
from thinpool.fs.inode import build_inode_into, parse_inode


def test_struct_sizes_are_pinned():
    assert L.SUPERBLOCK.sizeof() == 1024
    assert L.GROUP_DESC.sizeof() == 32
    assert L.INODE.sizeof() == 128
    assert L.DIRENT_HEADER.sizeof() == 8
    assert L.INODE_FMT.size == 128 and L.DIRENT_FMT.size == 8
    assert L.XATTR_HEADER.sizeof() == 32 and L.XATTR_ENTRY.sizeof() == 16


@pytest.mark.parametrize("struct_", ["XATTR_HEADER", "XATTR_ENTRY", "DIRENT_HEADER"])
def test_xattr_and_dirent_fast_formats_match_construct(struct_):
    slow = getattr(L, struct_)
    fast = L.fast_format(slow)
    raw = os.urandom(slow.sizeof())
    parsed = slow.parse(raw)
    assert list(fast.unpack(raw)) == [parsed[sc.name] for sc in slow.subcons]
    assert fast.pack(*fast.unpack(raw)) == raw == slow.build(parsed)


@given(st.binary(min_size=1024, max_size=1024))
def test_superblock_fast_path_matches_construct(raw):
    fast = L.parse_superblock(raw)
    slow = L.SUPERBLOCK.parse(raw)
    for f in dataclasses.fields(L.Superblock):
        assert getattr(fast, f.name) == slow[f.name], f.name
    assert L.build_superblock(fast) == raw == L.SUPERBLOCK.build(slow)


@given(st.binary(min_size=32, max_size=32))
def test_group_desc_fast_path_matches_construct(raw):
    fast = L.parse_group_desc(raw)
    slow = L.GROUP_DESC.parse(raw)
    assert dataclasses.asdict(fast) == {k: v for k, v in slow.items() if not k.startswith("_")}
    assert L.build_group_desc(fast) == raw


@given(st.binary(min_size=128, max_size=128))
def test_inode_fast_path_matches_construct(raw):
    fast = parse_inode(raw)
    slow = L.INODE.parse(raw)
    for f in dataclasses.fields(fast):
        want = list(slow[f.name]) if f.name == "i_block" else slow[f.name]
        assert getattr(fast, f.name) == want, f.name
    buf = bytearray(128)
    build_inode_into(fast, buf, 0)
    assert bytes(buf) == raw == L.INODE.build(slow)


def test_sparse_super_groups():
    assert [g for g in range(100) if L.group_has_super(g, True)] == [0, 1, 3, 5, 7, 9, 25, 27, 49, 81]
    assert all(L.group_has_super(g, False) for g in range(10))


@pytest.mark.parametrize("size", [2**20, 64 * 2**20, 129 * 2**20, 600 * 2**20, 5 * 2**30])
def test_geometry_is_self_consistent(size):
    g = L.plan_geometry(size)
    assert g.nr_blocks <= size // 4096 and g.inodes_per_group % 32 == 0
    assert g.nr_groups == -(-g.nr_blocks // g.blocks_per_group)
    for grp in range(g.nr_groups):
        assert g.group_overhead(grp) < g.group_nr_blocks(grp)


def test_directory_block_parse_rejects_bad_records():
    buf = bytearray(4096)
    L.DIRENT_FMT.pack_into(buf, 0, 2, 12, 1, L.FT_DIR)
    buf[8:9] = b"."
    L.DIRENT_FMT.pack_into(buf, 12, 2, 4096 - 12, 2, L.FT_DIR)
    buf[20:22] = b".."
    assert [e[5] for e in parse_dir_block(buf, 7, 2, 100, True)] == [b".", b".."]
    for off, value in ((16, 4096), (16, 6), (0, 100000)):
        bad = bytearray(buf)
        if off == 0:
            L.DIRENT_FMT.pack_into(bad, 0, value, 12, 1, L.FT_DIR)
        else:
            bad[off:off + 2] = value.to_bytes(2, "little")
        with pytest.raises(Exception) as e:
            parse_dir_block(bad, 7, 2, 100, True)
        assert "directory block 7 of inode 2" in str(e.value)


def test_random_bytes_never_crash_the_parsers():
    for _ in range(200):
        raw = os.urandom(4096)
        try:
            parse_dir_block(raw, 1, 2, 1000, True)
        except Exception as e:  # only the typed error may escape
            assert type(e).__name__ == "FsCorrupt"
