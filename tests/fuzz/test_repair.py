"""Repair (issue 7): ``repair(src, dst)`` salvages readable devices and mappings from damaged metadata into fresh
metadata (never in place); the result passes our checker and the real thin_check, and keeps every mapping that was
readable."""

from __future__ import annotations

import gzip
import os
import random
import subprocess
import tempfile
from pathlib import Path

import fuzz_images as f
import pytest
from oracles import RUN_CHECKERS, assert_thin_check, assert_thin_check_blocks, checkers_verdict

from thinpool.errors import InvalidArgument, MetadataCorrupt
from thinpool.io.block_store import MemoryBlockStore
from thinpool.metadata.check import check_metadata, format_report
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.metadata.repair import repair, repair_file

THIN_CHECK = RUN_CHECKERS  # the C++ and Rust thin_check (tests/oracles.py)
LONG = os.environ.get("THINPOOL_LONG") == "1"


@pytest.fixture(scope="module")
def images() -> dict:
    imgs = f.load_golden()
    imgs.update(f.thinpool_images())
    return imgs


def thin_check(store: MemoryBlockStore) -> None:
    assert_thin_check_blocks(store.blocks, store.nr_blocks)


def do_repair(img: dict) -> tuple[MemoryBlockStore, object]:
    dst = MemoryBlockStore(img["nr"])
    rep = repair(f.store_of(img), dst)
    c = check_metadata(dst)
    assert c.ok, format_report(c)
    return dst, rep


def as_img(store: MemoryBlockStore) -> dict:
    return {**store.blocks, "nr": store.nr_blocks}


def damage(img: dict, b: int, fn) -> dict:
    buf = bytearray(img[b])
    fn(buf)
    out = dict(img)
    out[b] = bytes(buf)
    return out


@pytest.mark.timeout(120)
def test_repair_of_clean_metadata_keeps_everything(images: dict) -> None:
    for name, img in images.items():
        dst, rep = do_repair(img)
        assert f.full_read(as_img(dst), rw=False).maps == f.full_read(img, rw=False).maps, name
        if name in ("f3_snapshot", "tp_held_snap", "f6_snapshots_5000"):
            thin_check(dst)


@pytest.mark.timeout(120)
def test_repair_salvages_around_a_damaged_leaf(images: dict) -> None:
    img = images["tp_held_snap"]
    common, per_dev = f.reach(img)
    orig = f.full_read(img, rw=False)
    # a leaf of device 2 only (not shared with other devices)
    only2 = per_dev[2] - set().union(*(v for k, v in per_dev.items() if k != 2)) - common
    leaf = next(b for b in sorted(only2) if f.catalogue(img)[b].is_leaf)
    bad = damage(img, leaf, lambda buf: buf.__setitem__(100, buf[100] ^ 0x40))  # checksum now wrong
    with pytest.raises(MetadataCorrupt) as ei:
        PoolMetadata.open(f.store_of(bad)).mappings(2)
    assert ei.value.block == leaf
    dst, rep = do_repair(bad)
    thin_check(dst)
    got = f.full_read(as_img(dst), rw=False)
    for dev in orig.maps:
        if dev != 2:
            assert got.maps[dev] == orig.maps[dev], dev
    k_orig, k_got = set(f.np_keys(orig.maps[2]).tolist()), set(f.np_keys(got.maps[2]).tolist())
    assert k_got < k_orig and len(k_orig) - len(k_got) <= 252  # exactly the damaged leaf's entries are gone
    assert rep.skipped_blocks >= 1 and any(str(leaf) in p for p in rep.problems)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["bitmap", "index", "sm_rc_tree", "superblock_csum", "details", "cycle"])
def test_repair_each_kind_of_damage(images: dict, kind: str) -> None:
    img = images["tp_held_snap"] if kind != "sm_rc_tree" else images["f4_refcount_multilevel"]
    cat = f.catalogue(img)
    common, per_dev = f.reach(img)
    orig = f.full_read(img, rw=False)
    store = f.store_of(img)
    sb = PoolMetadata.read_superblock(store)
    if kind == "bitmap":
        b = PoolMetadata.open(store, readonly=True).data_disk.bitmap_blocks[0]
        bad = damage(img, b, lambda buf: buf.__setitem__(20, buf[20] ^ 0xFF))
    elif kind == "index":
        bad = damage(img, sb.metadata_sm_root.bitmap_root, lambda buf: buf.__setitem__(16, buf[16] ^ 1))
    elif kind == "sm_rc_tree":
        bad = damage(img, sb.data_sm_root.ref_count_root, lambda buf: buf.__setitem__(40, buf[40] ^ 1))
    elif kind == "superblock_csum":
        bad = damage(img, 0, lambda buf: buf.__setitem__(0, buf[0] ^ 1))
    elif kind == "details":
        bad = damage(img, sb.device_details_root, lambda buf: buf.__setitem__(60, buf[60] ^ 1))
    else:  # a child pointer of an internal node points back at the node itself (re-stamped)
        b = next(b for b in sorted(per_dev[1]) if not cat[b].is_leaf)

        def cyc(buf: bytearray) -> None:
            mx = f.get(buf, 20, 4)
            f.put(buf, 32 + 8 * mx + 8, 8, b)
            f.restamp(buf, cat[b])
        bad = damage(img, b, cyc)
    full = f.full_read(bad, rw=False)
    assert full.errors or not check_metadata(f.store_of(bad)).ok, "damage went unnoticed"
    dst, rep = do_repair(bad)
    thin_check(dst)
    got = f.full_read(as_img(dst), rw=False)
    if kind in ("bitmap", "index", "sm_rc_tree", "superblock_csum", "details"):
        assert got.maps == orig.maps  # space maps and details are rebuilt: no mapping lost
    else:
        for dev in orig.maps:
            if dev != 1 and not (per_dev[dev] & per_dev[1]):
                assert got.maps[dev] == orig.maps[dev]
        assert 0 < len(f.np_keys(got.maps[1])) < len(f.np_keys(orig.maps[1]))


@pytest.mark.timeout(300)
def test_repair_of_fuzzed_images_always_passes_the_checkers(images: dict) -> None:
    """Whatever the damage: repair either refuses (unusable superblock) or writes metadata both checkers accept."""
    rng = random.Random(77)
    names = [n for n in images if not n.startswith(("f6", "f7"))]
    cats = {n: f.catalogue(images[n]) for n in names}
    repaired = refused = 0
    for case in range(800 if LONG else 150):
        n = rng.choice(names)
        bad, b, desc, _ = f.mutate(images[n], cats[n], rng)
        dst = MemoryBlockStore(images[n]["nr"])
        try:
            repair(f.store_of(bad), dst)
        except MetadataCorrupt as e:
            assert e.block == 0, f"case {case} {n} block {b} {desc}: {e}"
            refused += 1
            continue
        c = check_metadata(dst)
        assert c.ok, f"case {case} {n} block {b} {desc}:\n{format_report(c)}"
        if case % 10 == 0:
            thin_check(dst)
        repaired += 1
    print(f"\n[repair] fuzzed images repaired {repaired}, refused (superblock unusable) {refused}")
    assert repaired > refused


def test_repair_refuses_in_place(tmp_path: Path, images: dict) -> None:
    store = f.store_of(images["f2_single_thin"])
    with pytest.raises(InvalidArgument):
        repair(store, store)
    p = tmp_path / "meta"
    p.write_bytes(gzip.decompress((f.IMAGES / "f2_single_thin.bin.gz").read_bytes()))
    with pytest.raises(InvalidArgument):
        repair_file(p, p)


def test_repair_file_output_passes_thin_check(tmp_path: Path, images: dict) -> None:
    src = tmp_path / "damaged"
    img = images["f4_refcount_multilevel"]
    bad = damage(img, 0, lambda buf: buf.__setitem__(0, buf[0] ^ 1))  # superblock checksum broken
    raw = bytearray(img["nr"] * 4096)
    for b, buf in bad.items():
        if b != "nr":
            raw[b * 4096:(b + 1) * 4096] = buf
    src.write_bytes(raw)
    before = src.read_bytes()
    rep = repair_file(src, tmp_path / "fixed")
    assert src.read_bytes() == before  # never in place
    assert rep.devices == 5 and rep.mappings == 614
    if THIN_CHECK:
        assert_thin_check(tmp_path / "fixed")
        assert not checkers_verdict(src)


# --- issue 16: the held metadata snapshot survives repair; check --auto-repair ----------------------------------
def _snap_maps(store: MemoryBlockStore) -> dict:
    md = PoolMetadata.open(store, readonly=True, use_metadata_snap=True)
    return {dev: tuple(a.tobytes() for a in md.mappings(dev)) for dev in md.device_ids()}


@pytest.mark.timeout(120)
def test_repair_keeps_the_held_snapshot_of_every_image(images: dict) -> None:
    held = [n for n, img in images.items() if PoolMetadata.read_superblock(f.store_of(img)).held_root]
    assert held, "no image with a held metadata snapshot"
    for name in held:
        img = images[name]
        dst, rep = do_repair(img)
        assert rep.held_snapshot, name
        assert _snap_maps(dst) == _snap_maps(f.store_of(img)), name
        thin_check(dst)


def _counts_of(store: MemoryBlockStore) -> tuple[list[int], list[int]]:
    md = PoolMetadata.open(store, readonly=False, allow_needs_check=True)
    return [md.data_sm.count(b) for b in range(md.data_sm.nr_blocks)], md.meta_disk.core.counts.tolist()


@pytest.mark.timeout(300)
def test_auto_repair_of_raised_counts_restores_every_count(images: dict) -> None:
    from thinpool.metadata.check import repair_leaks
    rng = random.Random(16)
    names = [n for n in images if not n.startswith(("f6", "f7"))]
    done = 0
    for name in names:
        store = f.store_of(images[name])
        if not check_metadata(store).ok:
            continue
        data0, meta0 = _counts_of(store)
        maps0 = f.full_read(images[name], rw=False).maps
        md = PoolMetadata.open(store, allow_needs_check=True)
        for _ in range(rng.randint(1, 40)):
            b = rng.randrange(md.data_sm.nr_blocks)
            md.data_sm.inc(b, rng.randint(1, 3))
        for _ in range(rng.randint(0, 5)):
            b = rng.randrange(md.meta_disk.core.nr_blocks)
            md.meta_disk.core.inc(b)
        md.commit()
        assert not check_metadata(store).ok, name
        res = repair_leaks(store)
        assert res.after.ok, f"{name}:\n{format_report(res.after)}"
        assert res.data_blocks >= 1
        data1, meta1 = _counts_of(store)
        assert data1 == data0, name
        # the metadata counts differ only where the repair's own commit shadowed space map blocks
        assert f.full_read(as_img(store), rw=False).maps == maps0, name
        thin_check(store)
        done += 1
    assert done >= 3


@pytest.mark.timeout(300)
def test_auto_repair_of_fuzzed_images_refuses_or_passes(images: dict) -> None:
    """Whatever the damage: auto-repair refuses with the metadata unchanged, or leaves metadata both checkers
    accept."""
    from thinpool.errors import LeakRepairRefused, ThinpoolError
    from thinpool.metadata.check import repair_leaks
    rng = random.Random(1616)
    names = [n for n in images if not n.startswith(("f6", "f7"))]
    cats = {n: f.catalogue(images[n]) for n in names}
    refused = fixed = leaky = 0
    for case in range(300 if LONG else 60):
        n = rng.choice(names)
        bad, b, desc, _ = f.mutate(images[n], cats[n], rng)
        store = f.store_of(bad)
        before = dict(store.blocks)
        try:
            res = repair_leaks(store)
        except LeakRepairRefused:
            assert store.blocks == before, f"case {case} {n} block {b} {desc}: refused but changed"
            refused += 1
            continue
        except ThinpoolError as e:  # opening for the write failed before anything was written
            assert store.blocks == before, f"case {case} {n} block {b} {desc}: {e} after writing"
            refused += 1
            continue
        assert res.after.ok, f"case {case} {n} block {b} {desc}:\n{format_report(res.after)}"
        fixed += 1
        leaky += bool(res.data_blocks or res.metadata_blocks)
    print(f"\n[auto-repair] fuzzed images: refused {refused}, passed {fixed} (of which {leaky} had leaks fixed)")
    assert refused and fixed


def _repair_peak(tmp_path: Path, n: int) -> int:
    """tracemalloc's peak over repair_file of metadata whose device 1 maps n blocks (shuffled data blocks) and
    whose device 2 is a snapshot of it (every block shared: the sharing pass runs over all of them)."""
    import numpy as np

    from thinpool.io.block_store import FileBlockStore

    src, dst = tmp_path / f"src{n}.bin", tmp_path / f"dst{n}.bin"
    with open(src, "wb") as fh:
        fh.truncate(48 << 20)
    store = FileBlockStore(str(src))
    md = PoolMetadata.format(store, data_block_size=128, nr_data_blocks=1 << 20)
    rng = np.random.default_rng(n)
    md.build_device(1, np.arange(n, dtype=np.uint64), rng.permutation(n).astype(np.uint64),
                    np.zeros(n, dtype=np.uint64))
    md.commit()
    md.create_snap(2, 1)
    md.commit()
    store.close()
    import tracemalloc

    tracemalloc.start()
    rep = repair_file(src, dst)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert rep.mappings == 2 * n and rep.devices == 2
    return peak


def test_repair_memory_does_not_follow_the_mapping_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streaming repair (issue 13): 4x the mappings costs the data space map's pages (5 bytes a data block:
    1.5 MB more at 400k) and the sharing counts (a byte a data block), not ~60 bytes a mapping (+36 MB here)."""
    from thinpool.metadata import repair as repair_mod

    monkeypatch.setattr(repair_mod, "CHUNK_MAPPINGS", 1 << 15)
    monkeypatch.setattr(repair_mod, "SPILL_BUFFER_BYTES", 1 << 20)
    small = _repair_peak(tmp_path, 100_000)
    large = _repair_peak(tmp_path, 400_000)
    assert large - small < 4 << 20, (small, large)
