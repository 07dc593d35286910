"""delta_runs / mapped_runs against a model of the mappings, and the shared-subtree skip (blocks read)."""

from __future__ import annotations

import io

import pytest
from tools_helpers import big_pair, model, random_pool, reopen

from thinpool.errors import DeviceNotFound
from thinpool.tools.delta import DeltaRun, delta_runs, mapped_runs, write_delta_xml


def model_delta(left: dict[int, int], right: dict[int, int]) -> list[DeltaRun]:
    """Maximal runs computed block by block."""
    out: list[DeltaRun] = []
    for k in sorted(set(left) | set(right)):
        lv, rv = left.get(k), right.get(k)
        kind = ("same" if lv == rv else "different") if lv is not None and rv is not None else \
            "left_only" if lv is not None else "right_only"
        p = out[-1] if out else None
        if p is not None and p.kind == kind and p.begin + p.length == k \
                and (lv is None or p.left_data is not None and p.left_data + p.length == lv) \
                and (rv is None or p.right_data is not None and p.right_data + p.length == rv):
            out[-1] = DeltaRun(kind, p.begin, p.length + 1, p.left_data, p.right_data)
        else:
            out.append(DeltaRun(kind, k, 1, lv, rv))  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("seed", range(6))
def test_delta_runs_equal_the_block_by_block_model(seed: int):
    store, md = random_pool(seed)
    m = model(md)
    md = reopen(store)
    for a in m:
        for b in m:
            want = model_delta(m[a], m[b])
            assert list(delta_runs(md, a, b)) == want, (a, b)
            assert list(delta_runs(md, a, b, include_same=False)) == [r for r in want if r.kind != "same"]


@pytest.mark.parametrize("seed", range(3))
def test_mapped_runs_cover_the_mappings_in_maximal_runs(seed: int):
    store, md = random_pool(seed)
    m = model(md)
    md = reopen(store)
    for dev, maps in m.items():
        runs = list(mapped_runs(md, dev))
        got = {tb + i: db + i for tb, n, db in runs for i in range(n)}
        assert got == maps
        for (t0, n0, d0), (t1, _, d1) in zip(runs, runs[1:]):
            assert t1 >= t0 + n0
            assert not (t1 == t0 + n0 and d1 == d0 + n0), "runs must be maximal"


def test_delta_skips_shared_subtrees():
    nr = 200_000  # ~800 leaves
    store, md = big_pair(nr, [7, 150_000])
    md = reopen(store, counting=True)
    assert md.store.read_set  # type: ignore[attr-defined]
    md.store.read_set.clear()  # type: ignore[attr-defined]
    runs = list(delta_runs(md, 1, 2, include_same=False))
    assert [(r.kind, r.begin, r.length, r.left_data) for r in runs] == [("different", 7, 1, 17),
                                                                       ("different", 150_000, 1, 150_010)]
    # only the two changed spines and their neighbours are read, not the ~800 leaves
    assert len(md.store.read_set) < 20  # type: ignore[attr-defined]
    md.store.read_set.clear()  # type: ignore[attr-defined]
    full = list(delta_runs(md, 1, 2))
    assert [r.kind for r in full] == ["same", "different", "same", "different", "same"]
    assert sum(r.length for r in full) == nr
    leaves = len(md.store.read_set)  # type: ignore[attr-defined]
    assert leaves > 700  # shared leaves are read once each, for the "same" runs


def test_delta_of_unknown_device_raises():
    store, md = random_pool(1)
    with pytest.raises(DeviceNotFound) as e:
        list(delta_runs(md, 0, 99))
    assert e.value.dev_id == 99


def test_write_delta_xml_merges_adjacent_kinds():
    runs = [DeltaRun("different", 0, 2, 5, 9), DeltaRun("different", 2, 1, 100, 200), DeltaRun("same", 3, 1, 7, 7)]
    store, md = random_pool(2)
    out = io.StringIO()
    write_delta_xml(out, md, 0, 1, runs, verbose=False, nr_data_blocks=10)
    assert out.getvalue().splitlines()[2:4] == ['    <different begin="0" length="3"/>',
                                                '    <same begin="3" length="1"/>']
    out = io.StringIO()
    write_delta_xml(out, md, 0, 1, runs, verbose=True, nr_data_blocks=10)
    assert '      <range begin="2" left_data_begin="100" right_data_begin="200" length="1"/>' in out.getvalue()


@pytest.mark.parametrize("seed", range(3))
def test_delta_between_trees_of_different_heights_and_shapes(seed: int):
    """One device shrunk to a few mappings (a lower tree), others rewritten and grown in places: the paired walk
    meets leaves against internal nodes and subtrees shared at different depths."""
    import random

    rng = random.Random(seed)
    store, md = big_pair(60_000, [rng.randrange(60_000) for _ in range(50)])
    md.create_snap(3, 2)
    md.remove_range(3, 100, 59_000)  # device 3: a one- or two-level tree
    md.create_snap(4, 1)
    for _ in range(300):
        md.insert(4, rng.randrange(120_000), md.alloc_data_block())  # grows past the origin's end
    md.remove_range(4, 20_000, 20_500)
    md.commit()
    m = model(md)
    md = reopen(store)
    for a in (1, 2, 3, 4):
        for b in (1, 2, 3, 4):
            want = model_delta(m[a], m[b])
            assert list(delta_runs(md, a, b)) == want, (a, b)
            assert list(delta_runs(md, a, b, include_same=False)) == [r for r in want if r.kind != "same"], (a, b)


@pytest.mark.parametrize("seed", range(3))
def test_xml_from_batches_equals_xml_from_records(seed: int):
    from thinpool.tools.delta import delta_batches

    store, md = random_pool(seed)
    md = reopen(store)
    for a, b in ((0, 1), (1, 2), (2, 0), (3, 4)):
        for verbose in (False, True):
            x, y = io.StringIO(), io.StringIO()
            write_delta_xml(x, md, a, b, delta_runs(md, a, b), verbose=verbose, nr_data_blocks=5)
            write_delta_xml(y, md, a, b, verbose=verbose, nr_data_blocks=5, batches=delta_batches(md, a, b))
            assert x.getvalue() == y.getvalue(), (a, b, verbose)
