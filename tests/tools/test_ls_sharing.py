"""ls / sharing / block map / rmap as library calls, against models computed from the full mapping arrays."""

from __future__ import annotations

import numpy as np
import pytest
from tools_helpers import CountingStore, model, random_pool, reopen

from thinpool.errors import InvalidArgument
from thinpool.tools.blockmap import device_map
from thinpool.tools.ls import LS_DEFAULT, LS_FIELDS, ls_json, ls_rows, ls_text
from thinpool.tools.rmap import rmap_runs
from thinpool.tools.sharing import Sharing
from thinpool.tools.stdsort import std_sort


def counts_of(m: dict[int, dict[int, int]]) -> dict[int, int]:
    c: dict[int, int] = {}
    for maps in m.values():
        for d in maps.values():
            c[d] = c.get(d, 0) + 1
    return c


@pytest.mark.parametrize("seed", range(4))
def test_exclusive_and_shared_match_counting_every_mapping(seed: int):
    store, md = random_pool(seed)
    m = model(md)
    md = reopen(store)
    c = counts_of(m)
    rows = {r["DEV"]: r for r in ls_rows(md, LS_FIELDS)}
    for dev, maps in m.items():
        excl = sum(1 for d in maps.values() if c[d] == 1)
        assert rows[dev]["EXCLUSIVE_BLOCKS"] == excl
        assert rows[dev]["SHARED_BLOCKS"] == len(maps) - excl
        assert rows[dev]["HIGHEST_BLOCK"] == (max(maps) if maps else None)
    sharing = Sharing(md)
    blocks = np.array(sorted(c), dtype=np.int64)
    assert sharing.is_shared(blocks).tolist() == [c[b] > 1 for b in blocks.tolist()]


def test_default_fields_read_no_mapping_tree():
    store, md = random_pool(3)
    md = reopen(store, counting=True)
    s = md.store
    assert isinstance(s, CountingStore)
    s.read_set.clear()
    rows = ls_rows(md, LS_DEFAULT)
    assert s.read_set == set()  # the details were read at open; nothing more
    assert "EXCLUSIVE_BLOCKS" not in rows[0]
    ls_rows(md, ["DEV", "SHARED"])
    assert s.read_set  # now the mapping trees are walked


def test_ls_json_sizes_are_numbers():
    store, md = random_pool(1)
    rows = ls_rows(md, ["DEV", "MAPPED", "SHARED"])
    recs = ls_json(rows, ["DEV", "MAPPED", "SHARED"])
    r = recs[0]
    assert set(r) == {"dev", "mapped_bytes", "mapped_blocks", "shared_bytes", "shared_blocks"}
    assert r["mapped_bytes"] == r["mapped_blocks"] * md.data_block_size * 512  # type: ignore[operator]
    assert ls_text(rows, ["DEV", "MAPPED"]).splitlines()[0] == "DEV MAPPED "
    with pytest.raises(InvalidArgument):
        ls_rows(md, ["DEV", "BOGUS"])


@pytest.mark.parametrize("seed", range(3))
def test_device_map_covers_the_device_and_agrees_with_the_mappings(seed: int):
    store, md = random_pool(seed)
    m = model(md)
    md = reopen(store)
    c = counts_of(m)
    ch = md.data_block_size * 512
    sharing = Sharing(md)
    for dev, maps in m.items():
        size = 3500 * ch
        entries = device_map(md, dev, size, sharing)
        pos = 0
        got = {}
        for e in entries:
            assert e["start"] == pos
            pos += e["length"]
            if e["data"]:
                for i in range(e["length"] // ch):
                    got[e["start"] // ch + i] = e["offset"] // ch + i
                    assert e["shared"] == (c[e["offset"] // ch + i] > 1)
        assert pos == size
        assert got == {k: v for k, v in maps.items() if k < 3500}


def test_rmap_finds_every_mapping_of_a_region_once_per_shared_node():
    store, md = random_pool(2)
    m = model(md)
    md = reopen(store)
    runs = rmap_runs(md, [(0, 300), (900_000, 900_100)])
    assert [r.data_begin for r in runs] == sorted(r.data_begin for r in runs)
    found = {(r.dev_id, r.thin_begin + i): r.data_begin + i for r in runs for i in range(r.data_end - r.data_begin)}
    for (dev, tb), db in found.items():
        assert m[dev][tb] == db
    wanted_blocks = {d for maps in m.values() for d in maps.values() if d < 300 or 900_000 <= d < 900_100}
    assert {db for db in found.values()} == wanted_blocks


def test_std_sort_sorts_and_is_deterministic():
    import random

    rng = random.Random(5)
    a = [[rng.randrange(50), i] for i in range(1000)]
    b = [list(x) for x in a]
    std_sort(a, lambda x, y: x[0] < y[0])
    std_sort(b, lambda x, y: x[0] < y[0])
    assert [x[0] for x in a] == sorted(x[0] for x in a) and a == b


@pytest.mark.parametrize("keep", [0, 500, 3000])
def test_exclusive_counts_with_the_kept_blocks_budget_exceeded(keep: int, monkeypatch: pytest.MonkeyPatch):
    """Devices whose blocks did not fit the budget are walked again; the counts are the same either way."""
    from thinpool.tools import sharing as sharing_mod

    monkeypatch.setattr(sharing_mod, "_BATCH", 64)  # many small batches: the budget runs out midway
    monkeypatch.setattr(sharing_mod, "_KEEP", keep)
    store, md = random_pool(2, nr_devices=6)
    md.create_snap(7, 1)  # a snapshot sharing its origin's whole tree
    md.commit()
    m = model(md)
    md = reopen(store)
    c = counts_of(m)
    s = Sharing(md)
    if keep == 0:
        # only devices that folded nothing of their own (empty, or all shared) count as kept: the rest walk again
        assert all(sum(len(a) for a in s._kept[d]) == 0 for d in s._kept)
        assert len(s._kept) < len(m)
    for dev, maps in m.items():
        assert s.exclusive_blocks(dev) == sum(1 for d in maps.values() if c[d] == 1)
