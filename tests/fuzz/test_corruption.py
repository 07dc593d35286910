"""Targeted corruption (issue 7): every metadata block type and field. Damage is re-stamped with the right checksum
(except where the checksum itself is the target) so it reaches deeper validation. Fields a read depends on must
make opening or reading raise the typed error naming the block; fields only a whole-metadata walk can judge
(reference counts, mapped_blocks, times) must make the checker fail. Every case runs in bounded time.

Not validated by anyone (like thin_check and the kernel): superblock uuid, trans_id, version, nr_allocated,
metadata_nr_blocks, index nr_free / none_free_before. They are not in the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import fuzz_images as f
import pytest

from thinpool.errors import ChecksumError, MetadataCorrupt, MetadataError, NeedsCheck, UnsupportedMetadata
from thinpool.metadata.check import check_metadata, format_report
from thinpool.metadata.pool_metadata import PoolMetadata

IMAGES = f.load_golden()
IMAGES.update(f.thinpool_images())


@dataclass
class Case:
    image: str
    target: str  # block type . field
    block: int
    fn: Callable[[bytearray], None]
    expect: str  # read | check
    err: type = MetadataError
    blocks: tuple[int, ...] | None = None  # acceptable error block numbers (None: the damaged block)
    restamp: bool = True


def _field(off: int, size: int, value: int) -> Callable[[bytearray], None]:
    return lambda buf: f.put(buf, off, size, value)


def _flip(off: int) -> Callable[[bytearray], None]:
    def fn(buf: bytearray) -> None:
        buf[off] ^= 0x10
    return fn


def _swap_keys(buf: bytearray) -> None:
    a, b = f.get(buf, 32, 8), f.get(buf, 40, 8)
    f.put(buf, 32, 8, b)
    f.put(buf, 40, 8, a)


def _dup_key(buf: bytearray) -> None:
    f.put(buf, 40, 8, f.get(buf, 32, 8))


def _value_off(buf: bytearray, i: int) -> int:
    return 32 + 8 * f.get(buf, 20, 4) + f.get(buf, 24, 4) * i


def _child(i: int, value: int) -> Callable[[bytearray], None]:
    return lambda buf: f.put(buf, _value_off(buf, i), 8, value)


def _set_value(size: int, value: int) -> Callable[[bytearray], None]:
    return lambda buf: f.put(buf, _value_off(buf, 0), size, value)


def _add_value(size: int, delta: int) -> Callable[[bytearray], None]:
    return lambda buf: f.put(buf, _value_off(buf, 0), size, f.get(buf, _value_off(buf, 0), size) + delta)


def _or_value(size: int, bits: int) -> Callable[[bytearray], None]:
    return lambda buf: f.put(buf, _value_off(buf, 0), size, f.get(buf, _value_off(buf, 0), size) | bits)


def cases() -> list[Case]:
    out: list[Case] = []
    for name in ("tp_held_snap", "f4_refcount_multilevel"):
        img = IMAGES[name]
        nr = img["nr"]
        store = f.store_of(img)
        sb = PoolMetadata.read_superblock(store)
        md = PoolMetadata.open(store, readonly=True)
        dev = max(md.devices, key=lambda d: md.devices[d].mapped_blocks)
        root = md._roots[dev]
        internal = f.decode_node(store.read_block(root), root, 8)
        assert not internal.is_leaf, f"{name}: want a multi-level mapping tree"
        leaf = int(internal.values[0])
        # --- superblock -------------------------------------------------------------------------------------
        S = lambda t, fn, **kw: out.append(Case(name, f"superblock.{t}", 0, fn, **kw))  # noqa: E731
        S("checksum", _flip(100), expect="read", err=ChecksumError, restamp=False)
        S("blocknr", _field(8, 8, 5), expect="read")
        S("magic", _field(32, 8, 0), expect="read")
        S("metadata_block_size", _field(340, 4, 16), expect="read", err=UnsupportedMetadata)
        S("data_block_size", _field(336, 4, 0), expect="read")
        S("data_block_size_odd", _field(336, 4, 200), expect="read")
        S("incompat_flags", _field(360, 4, 1), expect="read", err=UnsupportedMetadata)
        S("compat_ro_flags", _field(356, 4, 1), expect="read", err=UnsupportedMetadata)
        S("flags.needs_check", _field(4, 4, 1), expect="read", err=NeedsCheck)
        S("held_root.out_of_range", _field(56, 8, nr + 5), expect="read", blocks=(0, nr + 5))
        S("held_root.not_a_superblock", _field(56, 8, sb.metadata_sm_root.bitmap_root), expect="read",
          err=ChecksumError, blocks=(sb.metadata_sm_root.bitmap_root,))
        S("data_sm.nr_blocks.zero", _field(64, 8, 0), expect="read", blocks=None)
        S("data_sm.nr_blocks.huge", _field(64, 8, 1 << 40), expect="read", blocks=None)
        S("data_sm.bitmap_root", _field(80, 8, sb.device_details_root), expect="read",
          blocks=(sb.device_details_root,))
        S("data_sm.ref_count_root", _field(88, 8, root), expect="read",  # found at root or the first leaf
          blocks=(root,) + tuple(int(c) for c in internal.values))
        S("meta_sm.nr_blocks", _field(192, 8, nr * 2), expect="read")
        S("meta_sm.bitmap_root", _field(208, 8, sb.data_mapping_root), expect="read", err=ChecksumError,
          blocks=(sb.data_mapping_root,))
        S("meta_sm.ref_count_root", _field(216, 8, nr + 1), expect="read", blocks=(nr + 1,))
        S("data_mapping_root.out_of_range", _field(320, 8, nr + 3), expect="read", blocks=(nr + 3,))
        S("data_mapping_root.details", _field(320, 8, sb.device_details_root), expect="read",
          blocks=(sb.device_details_root,))
        S("device_details_root", _field(328, 8, sb.data_mapping_root), expect="read", blocks=(sb.data_mapping_root,))
        if sb.time:
            S("time", _field(44, 4, 0), expect="check")
        # --- btree nodes of every tree ---------------------------------------------------------------------
        nodes = {"details_leaf": sb.device_details_root, "top_leaf": sb.data_mapping_root,
                 "mapping_internal": root, "mapping_leaf": leaf, "data_sm_index": sb.data_sm_root.bitmap_root,
                 "data_rc_tree": sb.data_sm_root.ref_count_root, "meta_rc_tree": sb.metadata_sm_root.ref_count_root}
        for label, b in nodes.items():
            node = f.decode_node(store.read_block(b), b, f.get(store.read_block(b), 24, 4))
            mx = node.max_entries
            N = lambda t, fn, **kw: out.append(Case(name, f"{label}.{t}", b, fn, **kw))  # noqa: E731,B023
            N("checksum", _flip(200), expect="read", err=ChecksumError, restamp=False)
            N("blocknr", _field(8, 8, b + 1), expect="read")
            N("flags.zero", _field(4, 4, 0), expect="read")
            N("flags.both", _field(4, 4, 3), expect="read")
            N("nr_entries", _field(16, 4, mx + 1), expect="read")
            N("max_entries.zero", _field(20, 4, 0), expect="read")
            N("max_entries.not_3n", _field(20, 4, mx - 1), expect="read")
            N("max_entries.overflow", _field(20, 4, 1000), expect="read")
            N("value_size", _field(24, 4, 12), expect="read")
            if node.nr_entries >= 2:
                N("keys.order", _swap_keys, expect="read")
                N("keys.duplicate", _dup_key, expect="read")
            if not node.is_leaf:
                N("child.out_of_range", _child(0, nr + 9), expect="read", blocks=(b, nr + 9))
                N("child.cycle", _child(1, b), expect="read", blocks=None)
                N("child.wrong_tree", _child(0, sb.device_details_root), expect="read",
                  blocks=(b, sb.device_details_root))
            elif node.nr_entries and label == "mapping_leaf":
                N("value.data_block_beyond", _set_value(8, (1 << 39) << 24), expect="read", blocks=(root, b))
                N("value.time_future", _or_value(8, 0xFFFFFF), expect="check")
            elif node.nr_entries and label == "details_leaf":
                N("value.mapped_blocks", _add_value(8, 1), expect="check")
            elif node.nr_entries and label == "data_rc_tree":
                N("value.count_below_3", _set_value(4, 2), expect="read", blocks=(b,))
                N("value.count_changed", _add_value(4, 5), expect="check")
            elif node.nr_entries and label == "data_sm_index":
                N("value.bitmap_blocknr", _set_value(8, sb.data_mapping_root), expect="read", err=ChecksumError,
                  blocks=(sb.data_mapping_root,))
            elif node.nr_entries and label == "top_leaf":
                N("value.subtree_root_out_of_range", _set_value(8, nr + 2), expect="read", blocks=(nr + 2,))
        # --- space-map bitmaps and the metadata index ------------------------------------------------------
        bm = md.data_disk.bitmap_blocks[0]
        out.append(Case(name, "data_bitmap.checksum", bm, _flip(300), "read", ChecksumError, restamp=False))
        out.append(Case(name, "data_bitmap.blocknr", bm, _field(8, 8, bm + 1), "read"))
        out.append(Case(name, "data_bitmap.entry", bm, _flip(16), "check"))
        mbm = md.meta_disk.bitmap_blocks[0]
        out.append(Case(name, "meta_bitmap.entry", mbm, _flip(17), "check"))
        out.append(Case(name, "meta_bitmap.blocknr", mbm, _field(8, 8, 1), "read"))
        idx = sb.metadata_sm_root.bitmap_root
        out.append(Case(name, "meta_index.checksum", idx, _flip(500), "read", ChecksumError, restamp=False))
        out.append(Case(name, "meta_index.blocknr", idx, _field(8, 8, idx + 1), "read"))
        out.append(Case(name, "meta_index.entry_blocknr", idx, _field(16, 8, sb.data_mapping_root), "read",
                        ChecksumError, blocks=(sb.data_mapping_root,)))
    return out


CASES = cases()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.image}:{c.target}" for c in CASES])
def test_corruption_is_detected_with_block_number(case: Case) -> None:
    img = IMAGES[case.image]
    buf = bytearray(img[case.block])
    case.fn(buf)
    if case.restamp:
        f.restamp(buf, f.catalogue({case.block: img[case.block]})[case.block])
    bad = dict(img)
    bad[case.block] = bytes(buf)
    r = f.full_read(bad)
    errs = r.errors + (r.snap.errors if r.snap else [])
    rep = check_metadata(f.store_of(bad))  # never raises
    if case.expect == "read":
        assert errs, f"{case.target}: opening and reading everything raised nothing"
        e = errs[0]
        assert isinstance(e, case.err), f"{case.target}: {type(e).__name__}: {e}"
        if isinstance(e, MetadataCorrupt):
            assert isinstance(e.block, int)
            allowed = (case.block,) if case.blocks is None and case.target.split(".")[-1] not in (
                "cycle", "zero", "huge") else case.blocks
            if allowed is not None:
                assert e.block in allowed, f"{case.target}: error names block {e.block}, expected {allowed}: {e}"
        if not isinstance(e, (NeedsCheck, UnsupportedMetadata)) and "compat_ro" not in case.target:
            assert not rep.ok, f"{case.target}: the checker passes what reading rejects"
    else:
        assert not rep.ok, f"{case.target}: checker did not notice:\n{format_report(rep)}"
        for e in errs:
            assert isinstance(e, MetadataError)
