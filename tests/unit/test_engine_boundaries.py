"""Engine boundaries: the transaction manager knows no nodes; the B-tree's range operations; block_time packing;
the per-device handle."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from thinpool.btree.btree import BTree, NoRefValue
from thinpool.btree.spine import NodeCache
from thinpool.errors import DeviceNotFound, InvalidArgument
from thinpool.formats.device_details import pack_block_time, pack_block_times, unpack_block_time, unpack_block_times
from thinpool.io.block_store import MemoryBlockStore
from thinpool.metadata.pool_metadata import PoolMetadata
from thinpool.spacemap.core import CoreSpaceMap
from thinpool.tx.transaction import TransactionManager

ROOT = Path(__file__).resolve().parents[2] / "thinpool"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_transaction_manager_imports_no_btree_or_space_map():
    for p in (ROOT / "tx").glob("*.py"):
        bad = {m for m in _imports(p) if m.startswith(("thinpool.btree", "thinpool.spacemap"))}
        assert not bad, f"{p.name} imports {bad}"


def test_no_module_outside_btree_imports_the_node():
    users = [p.relative_to(ROOT) for p in ROOT.rglob("*.py")
             if "thinpool.btree.node" in _imports(p) and p.parent.name != "btree"]
    assert not users, users


def make_tm(n: int = 20_000) -> TransactionManager:
    sm = CoreSpaceMap(n, kind="metadata")
    sm.inc(0)
    return TransactionManager(MemoryBlockStore(n), sm)


def test_lookup_range_matches_items_inside_and_across_leaves():
    tm = make_tm()
    tree = BTree(tm, NoRefValue(8))
    keys = np.arange(0, 3000, 3, dtype=np.uint64)
    root = tree.build(keys, keys * np.uint64(7))
    for lo, hi in [(0, 1), (5, 40), (100, 2000), (2990, 5000), (7, 8), (0, 3000)]:
        k, v = tree.lookup_range(root, lo, hi)
        want = [(kk, vv) for kk, vv in tree.items(root) if lo <= kk < hi]
        assert list(zip(k.tolist(), v.tolist())) == want
        assert k.dtype == np.uint64 and v.dtype == np.uint64


def test_block_time_round_trip_and_range_check():
    assert unpack_block_time(pack_block_time(12345, 678)) == (12345, 678)
    with pytest.raises(InvalidArgument):
        pack_block_time(1, 1 << 24)
    with pytest.raises(InvalidArgument):
        pack_block_time(1 << 40, 0)
    d, t = unpack_block_times(pack_block_times(np.array([1, 2]), np.array([3, 4])))
    assert d.tolist() == [1, 2] and t.tolist() == [3, 4]
    with pytest.raises(InvalidArgument):
        pack_block_times(np.array([1]), np.array([1 << 24]))


def test_device_handle_and_is_shared_for_unknown_device():
    pmd = PoolMetadata.format(MemoryBlockStore(2048), data_block_size=128, nr_data_blocks=1000)
    pmd.create_thin(1)
    h = pmd.device(1)
    db = pmd.alloc_data_block()
    h.insert_block(10, db)
    assert h.find_block(10) == (db, 0) and h.find_block(11) is None
    assert h.mapped_blocks == 1
    k, d, _ = h.find_mapped_range(0, 100)
    assert k.tolist() == [10] and d.tolist() == [db]
    assert h.remove_range(0, 100) == 1 and h.mapped_blocks == 0
    with pytest.raises(DeviceNotFound):
        pmd.is_shared(99, 0)
    with pytest.raises(DeviceNotFound):
        pmd.device(99).find_block(0)


def test_insert_refuses_a_time_that_does_not_fit():
    pmd = PoolMetadata.format(MemoryBlockStore(2048), data_block_size=128, nr_data_blocks=1000)
    pmd.create_thin(1)
    with pytest.raises(InvalidArgument):
        pmd.insert(1, 0, pmd.alloc_data_block(), time=1 << 24)


def test_node_cache_drops_freed_blocks():
    tm = make_tm()
    tree = BTree(tm, NoRefValue(8))
    root = tree.build(np.arange(1000, dtype=np.uint64), np.arange(1000, dtype=np.uint64))
    tm.pre_commit()
    tm.commit(bytearray(4096))
    tm.sm.commit()  # type: ignore[attr-defined]
    cache = NodeCache.of(tm)
    assert root in cache.cache
    tree.delete(root)
    assert root not in cache.cache
