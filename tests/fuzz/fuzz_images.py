"""Metadata images for corruption tests and the fuzzer: the golden images (thin_restore-made), pools thinpool wrote,
a catalogue of every block's type and fields, mutators, and the full read whose result is compared.

A *read* is everything a user of the metadata can see: open (read-write rules, then read-only), the device
details, every mapping of every device (bulk and single lookups) and the same through a held metadata snapshot.
"""

from __future__ import annotations

import gzip
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from thinpool import checksum
from thinpool.btree.node import decode_node  # noqa: F401 (re-exported for tests)
from thinpool.checksum import BlockType
from thinpool.errors import MetadataCorrupt, MetadataError
from thinpool.formats.btree_node import NODE_HEADER_SIZE
from thinpool.io.block_store import MemoryBlockStore
from thinpool.metadata.pool_metadata import PoolMetadata

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
FIXTURES = Path("/work/shared/fixtures/dm-thin")
BS = 4096


def load_golden() -> dict[str, dict[int, bytes]]:
    out = {}
    names = sorted(p.name[:-len(".bin.gz")] for p in IMAGES.glob("*.bin.gz")) if IMAGES.is_dir() else []
    for n in names:
        out[n] = _blocks(gzip.decompress((IMAGES / f"{n}.bin.gz").read_bytes()))
    if not out and FIXTURES.is_dir():
        for p in sorted(FIXTURES.glob("*.bin")):
            out[p.stem] = _blocks(p.read_bytes())
    return out


def _blocks(raw: bytes) -> dict[int, bytes]:
    blocks = {}
    for i in range(len(raw) // BS):
        b = raw[i * BS:(i + 1) * BS]
        if any(b):
            blocks[i] = b
    blocks["nr"] = len(raw) // BS  # type: ignore[index]
    return blocks


def thinpool_images() -> dict[str, dict[int, bytes]]:
    """Pools written by thinpool: snapshots sharing multi-level trees, counts >= 3 (ref-count trees), a held
    metadata snapshot, discards and deletes."""
    out = {}
    for name, held in (("tp_snapshots", False), ("tp_held_snap", True)):
        store = MemoryBlockStore(1024)
        md = PoolMetadata.format(store, data_block_size=128, nr_data_blocks=20000)
        rng = random.Random(len(name))
        md.create_thin(1)
        for k in range(700):  # 700 mappings: a two-level bottom tree
            md.insert(1, k * 3, md.alloc_data_block())
        md.commit()
        for s in (2, 3, 4):  # shared leaves, data counts 4 (ref-count tree entries)
            md.create_snap(s, 1)
        md.commit()
        for k in rng.sample(range(2100), 150):
            md.insert(2, k, md.alloc_data_block())
        for k in range(0, 300, 7):
            md.remove(3, k * 3)
        md.delete_thin(4)
        md.create_thin(9)
        md.commit()
        if held:
            md.reserve_metadata_snap()
            for k in range(40):
                md.insert(1, 5000 + k, md.alloc_data_block())
            md.commit()
        blocks: dict[Any, bytes] = {b: v for b, v in store.blocks.items() if any(v)}
        blocks["nr"] = store.nr_blocks
        out[name] = blocks
    return out


def store_of(img: dict[Any, bytes]) -> MemoryBlockStore:
    s = MemoryBlockStore(img["nr"])  # type: ignore[arg-type]
    s.blocks = {k: v for k, v in img.items() if k != "nr"}
    return s


# --- full read -----------------------------------------------------------------------------------------------------
@dataclass
class Read:
    devices: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    maps: dict[int, tuple[bytes, bytes, bytes]] = field(default_factory=dict)
    lookups: dict[int, list[Any]] = field(default_factory=dict)
    snap: Read | None = None
    errors: list[BaseException] = field(default_factory=list)  # typed errors met (open/read)
    opened: bool = False  # the read-only open succeeded


def _read_md(md: PoolMetadata, r: Read, probe: dict[int, list[int]] | None) -> None:
    for dev in md.device_ids():
        d = md.devices[dev]
        r.devices[dev] = (d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time)
    for dev in md.device_ids():
        try:
            k, db, t = md.mappings(dev)
            r.maps[dev] = (k.astype("<u8").tobytes(), db.astype("<u8").tobytes(), t.astype("<u8").tobytes())
            keys = probe.get(dev, []) if probe is not None else [int(x) for x in k[:3]] + [int(x) for x in k[-3:]] + [
                10 ** 9]
            r.lookups[dev] = [md.lookup(dev, key) for key in keys]
        except MetadataError as e:
            r.errors.append(e)
    try:  # the data space map is paged in on demand: "everything" includes reading all of it
        md.data_sm.validate_all()
    except MetadataError as e:
        r.errors.append(e)


def full_read(img: dict[Any, bytes], probe: dict[int, list[int]] | None = None, *, rw: bool = True) -> Read:
    """Read everything; typed errors are collected (any other exception propagates: a test failure)."""
    r = Read()
    store = store_of(img)
    if rw:
        try:  # the metadata space map is paged in on demand too: "everything" includes reading all of it
            PoolMetadata.open(store).meta_disk.validate_all()
        except MetadataError as e:
            r.errors.append(e)
    try:
        md = PoolMetadata.open(store, readonly=True)
    except MetadataError as e:
        r.errors.append(e)
        return r
    r.opened = True
    _read_md(md, r, probe)
    if md.held_root:
        r.snap = Read()
        try:
            snap = PoolMetadata.open(store, readonly=True, use_metadata_snap=True)
            _read_md(snap, r.snap, None)
        except MetadataError as e:
            r.snap.errors.append(e)
    return r


# --- block catalogue -------------------------------------------------------------------------------------------------
@dataclass
class BlockInfo:
    blocknr: int
    kind: str  # superblock | node | index | bitmap | unknown
    value_size: int = 0
    is_leaf: bool = False
    tree: str = ""  # details | top | mapping | data_sm_index | rc | held_sb ...


def catalogue(img: dict[Any, bytes]) -> dict[int, BlockInfo]:
    """Type of every non-zero block (by its checksum salt and header), and which tree it belongs to."""
    out = {}
    for b, buf in img.items():
        if b == "nr":
            continue
        t = checksum.identify(buf)
        if t is BlockType.SUPERBLOCK:
            out[b] = BlockInfo(b, "superblock")
        elif t is BlockType.INDEX:
            out[b] = BlockInfo(b, "index")
        elif t is BlockType.BITMAP:
            out[b] = BlockInfo(b, "bitmap")
        elif t is BlockType.BTREE_NODE:
            flags, _, nr, mx, vs = struct.unpack_from("<IQIII", buf, 4)
            out[b] = BlockInfo(b, "node", vs, flags == 2)
        else:
            out[b] = BlockInfo(b, "unknown")
    return out


def _walk(store: MemoryBlockStore, root: int, leaf_vs: int, acc: set[int]) -> None:
    stack = [root]
    while stack:
        b = stack.pop()
        if b in acc:
            continue
        acc.add(b)
        node = decode_node(store.read_block(b), b, leaf_vs)
        if not node.is_leaf:
            stack.extend(int(c) for c in node.values)


def reach(img: dict[Any, bytes]) -> tuple[set[int], dict[int, set[int]]]:
    """(blocks every read depends on: superblocks, details and top-level trees; per device: its mapping tree, in
    the live view and the held snapshot's)."""
    store = store_of(img)
    views = [PoolMetadata.open(store, readonly=True)]
    common = {0}
    if views[0].held_root:
        common.add(views[0].held_root)
        views.append(PoolMetadata.open(store, readonly=True, use_metadata_snap=True))
    per_dev: dict[int, set[int]] = {}
    for v in views:
        _walk(store, v.details_root, 24, common)
        _walk(store, v.mapping_root, 8, common)
        for dev in v.device_ids():
            _walk(store, v._roots[dev], 8, per_dev.setdefault(dev, set()))
    return common, per_dev


# --- mutations -----------------------------------------------------------------------------------------------------
SB_FIELDS = {  # offset, size
    "flags": (4, 4), "blocknr": (8, 8), "magic": (32, 8), "version": (40, 4), "time": (44, 4), "trans_id": (48, 8),
    "held_root": (56, 8), "data_sm.nr_blocks": (64, 8), "data_sm.nr_allocated": (72, 8),
    "data_sm.bitmap_root": (80, 8), "data_sm.ref_count_root": (88, 8), "meta_sm.nr_blocks": (192, 8),
    "meta_sm.nr_allocated": (200, 8), "meta_sm.bitmap_root": (208, 8), "meta_sm.ref_count_root": (216, 8),
    "data_mapping_root": (320, 8), "device_details_root": (328, 8), "data_block_size": (336, 4),
    "metadata_block_size": (340, 4), "metadata_nr_blocks": (344, 8), "compat_flags": (352, 4),
    "compat_ro_flags": (356, 4), "incompat_flags": (360, 4),
}
NODE_FIELDS = {"flags": (4, 4), "blocknr": (8, 8), "nr_entries": (16, 4), "max_entries": (20, 4),
               "value_size": (24, 4)}


def interesting(size: int, nr_meta: int, b: int, rng: random.Random, others: list[int]) -> int:
    mx = (1 << (8 * size)) - 1
    pool = [0, 1, 2, 3, mx, mx - 1, 1 << (8 * size - 1), rng.randrange(mx + 1), b, nr_meta, nr_meta - 1,
            nr_meta + 1, 252, 253, 255, 126, 127, 128, 0x7FFFFFFF]
    if others:
        pool += [rng.choice(others)] * 4
    return rng.choice(pool) & mx


def block_type(info: BlockInfo) -> BlockType | None:
    return {"superblock": BlockType.SUPERBLOCK, "node": BlockType.BTREE_NODE, "index": BlockType.INDEX,
            "bitmap": BlockType.BITMAP}.get(info.kind)


def put(buf: bytearray, off: int, size: int, value: int) -> None:
    buf[off:off + size] = value.to_bytes(size, "little")


def get(buf: bytes | bytearray, off: int, size: int) -> int:
    return int.from_bytes(buf[off:off + size], "little")


def restamp(buf: bytearray, info: BlockInfo) -> None:
    bt = block_type(info)
    if bt is not None:
        checksum.stamp(buf, bt)


def mutate(img: dict[Any, bytes], cat: dict[int, BlockInfo], rng: random.Random) -> tuple[dict[Any, bytes], int, str, bool]:
    """One random mutation. Returns (image, mutated block, description, checksum re-stamped)."""
    blocks = [b for b in cat]
    b = rng.choice(blocks)
    info = cat[b]
    nr_meta = img["nr"]  # type: ignore[assignment]
    buf = bytearray(img[b])
    kind = rng.random()
    desc = ""
    stamped = True
    if kind < 0.15:  # raw bit flips: the checksum must catch them
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(BS * 8)
            buf[i // 8] ^= 1 << (i % 8)
        stamped = False
        desc = "bit flips"
    elif kind < 0.25:  # byte / word overwrite at a random offset, re-stamped
        size = rng.choice([1, 2, 4, 8])
        off = rng.randrange(4, BS - size)
        put(buf, off, size, interesting(size, nr_meta, b, rng, blocks))
        desc = f"overwrite {size}@{off}"
    elif kind < 0.30:  # block-level damage
        what = rng.choice(["zero", "copy", "swap_in_other"])
        if what == "zero":
            buf = bytearray(BS)
            stamped = False
        else:
            src = rng.choice(blocks)
            buf = bytearray(img[src])
            if what == "copy":  # another block's content, claiming to be this one
                put(buf, 8, 8, b)
                restamp(buf, cat[src])
        desc = f"block {what}"
    else:
        desc = _structured(buf, info, nr_meta, b, rng, blocks)
        restamp(buf, info)
    out = dict(img)
    out[b] = bytes(buf)
    return out, b, desc, stamped


def _structured(buf: bytearray, info: BlockInfo, nr_meta: int, b: int, rng: random.Random, blocks: list[int]) -> str:
    """Field-aware mutation (the checksum is re-stamped by the caller so the damage reaches deeper checks)."""
    if info.kind == "superblock":
        name = rng.choice(list(SB_FIELDS))
        off, size = SB_FIELDS[name]
        put(buf, off, size, interesting(size, nr_meta, b, rng, blocks))
        return f"superblock.{name}"
    if info.kind == "node":
        nr, mx, vs = get(buf, 16, 4), get(buf, 20, 4), get(buf, 24, 4)
        mx_ok = mx if 0 < mx <= 255 else 1
        vbase = NODE_HEADER_SIZE + 8 * mx_ok
        r = rng.random()
        if r < 0.3 or nr == 0:
            name = rng.choice(list(NODE_FIELDS))
            off, size = NODE_FIELDS[name]
            put(buf, off, size, interesting(size, nr_meta, b, rng, blocks))
            return f"node.{name}"
        i = rng.randrange(nr) if nr else 0
        if r < 0.45 and nr >= 2:  # key order
            j = rng.randrange(nr)
            ki, kj = get(buf, 32 + 8 * i, 8), get(buf, 32 + 8 * j, 8)
            put(buf, 32 + 8 * i, 8, kj)
            put(buf, 32 + 8 * j, 8, ki)
            return "node.keys swapped"
        if r < 0.55:
            put(buf, 32 + 8 * i, 8, interesting(8, nr_meta, b, rng, blocks))
            return "node.key"
        if not info.is_leaf:  # child pointer: out of range, self (cycle), another node
            choice = rng.choice([b, nr_meta, nr_meta + 7, 0, rng.choice(blocks), 2 ** 64 - 1])
            put(buf, vbase + 8 * i, 8, choice)
            return f"node.child -> {choice}"
        if vs in (4, 8, 16, 24) and vbase + vs * (i + 1) <= BS:
            sub = rng.randrange(0, vs, 4)
            size = 8 if vs - sub >= 8 and rng.random() < 0.5 else 4
            put(buf, vbase + vs * i + sub, size, interesting(size, nr_meta, b, rng, blocks))
            return f"node.value[{sub}:{sub + size}] (vs {vs})"
        return "node.noop"
    if info.kind == "index":
        i = rng.randrange(4)
        sub, size = rng.choice([(0, 8), (8, 4), (12, 4)])
        put(buf, 16 + 16 * i + sub, size, interesting(size, nr_meta, b, rng, blocks))
        return f"index.entry[{i}]+{sub}"
    if info.kind == "bitmap":
        if rng.random() < 0.2:
            put(buf, 8, 8, interesting(8, nr_meta, b, rng, blocks))
            return "bitmap.blocknr"
        off = rng.randrange(16, 16 + 64)  # the low entries are the ones in use
        buf[off] ^= 1 << rng.randrange(8)
        return "bitmap.entry"
    i = rng.randrange(BS)
    buf[i] ^= 0xFF
    return "unknown block byte"


def arrays_equal(a: tuple[bytes, bytes, bytes], b: tuple[bytes, bytes, bytes]) -> bool:
    return a == b


def np_keys(m: tuple[bytes, bytes, bytes]) -> np.ndarray:
    return np.frombuffer(m[0], dtype="<u8")


def block_of(e: BaseException) -> int | None:
    return getattr(e, "block", None) if isinstance(e, MetadataCorrupt) else 0
