"""The struct form (hot path) and the construct form of every fixed on-disk layout agree byte for byte."""

from __future__ import annotations

import os

import pytest

from thinpool.formats import btree_node, device_details, space_map, superblock
from thinpool.formats.fields import Layout

LAYOUTS = {
    "superblock": (superblock.SUPERBLOCK_LAYOUT, 364),
    "node_header": (btree_node.NODE_HEADER_LAYOUT, 32),
    "device_details": (device_details.DEVICE_DETAILS_LAYOUT, 24),
    "sm_root": (space_map.SM_ROOT_LAYOUT, 32),
    "index_entry": (space_map.INDEX_ENTRY_LAYOUT, 16),
    "bitmap_header": (space_map.BITMAP_HEADER_LAYOUT, 16),
    "metadata_index": (space_map.METADATA_INDEX_LAYOUT, 4096),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_struct_and_construct_forms_agree(name: str) -> None:
    layout, size = LAYOUTS[name]
    cs_struct = layout.construct()
    assert layout.size == cs_struct.sizeof() == size
    for _ in range(20):
        raw = os.urandom(size)
        ours = layout.unpack(raw)
        theirs = cs_struct.parse(raw)
        assert ours == {k: theirs[k] for k in layout.names}
        assert layout.pack(**ours) == cs_struct.build(ours) == raw


def test_the_construct_forms_keep_their_old_names() -> None:
    assert superblock.SuperblockStruct.sizeof() == 364
    assert btree_node.NodeHeaderStruct.sizeof() == 32
    assert device_details.DeviceDetailsStruct.sizeof() == 24
    assert space_map.MetadataIndexStruct.sizeof() == 4096
    with pytest.raises(AttributeError):
        superblock.NoSuchStruct  # noqa: B018


def test_parsers_match_the_construct_parse() -> None:
    raw = bytearray(os.urandom(4096))
    raw[0x40 + 32:0x40 + 128] = raw[0xC0 + 32:0xC0 + 128] = bytes(96)  # past each sm_root: unused slot space
    sb = superblock.parse_superblock(raw)
    c = superblock.SuperblockStruct.parse(bytes(raw[:364]))
    assert (sb.flags, sb.blocknr, sb.uuid, sb.trans_id, sb.metadata_nr_blocks, sb.incompat_flags) == \
        (c.flags, c.blocknr, c.uuid, c.trans_id, c.metadata_nr_blocks, c.incompat_flags)
    assert sb.data_sm_root.ref_count_root == space_map.SmRootStruct.parse(c.data_space_map_root[:32]).ref_count_root
    assert superblock.build_superblock(sb)[4:364] == bytes(raw[4:364])  # csum left 0
    entries = space_map.parse_metadata_index(bytes(raw), 255)
    assert space_map.build_metadata_index(int.from_bytes(raw[8:16], "little"), entries)[8:] == bytes(raw[8:])
    d = device_details.parse_device_details(bytes(raw[:24]))
    assert device_details.build_device_details(d) == bytes(raw[:24])


def test_a_short_superblock_is_metadata_corrupt() -> None:
    from thinpool.errors import MetadataCorrupt

    with pytest.raises(MetadataCorrupt) as e:
        superblock.parse_superblock(bytes(100), blocknr=0)
    assert e.value.block == 0


def test_a_layout_names_its_fields_in_order() -> None:
    lay = Layout("x", (("a", "I"), ("b", "8s"), ("c", "Q")))
    assert lay.size == 20 and lay.names == ("a", "b", "c")
    assert lay.unpack(lay.pack(a=1, b=b"12345678", c=2)) == {"a": 1, "b": b"12345678", "c": 2}
