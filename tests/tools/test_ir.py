"""The metadata IR: runs from sorted arrays, the emitter, writers as visitors, the builder (restore)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from tools_helpers import model, random_pool, reopen

from thinpool.io.block_store import MemoryBlockStore
from thinpool.metadata.dump import dump_json, dump_xml
from thinpool.metadata.ir import RunJoiner, emit, sorted_runs
from thinpool.metadata.restore import IRCollector, MetadataBuilder, parse_xml, read_xml, restore


def test_run_joiner_gives_maximal_runs_across_chunks():
    rng = np.random.default_rng(3)
    thin = np.cumsum(rng.integers(1, 3, 2000))
    data = np.cumsum(rng.integers(1, 3, 2000))
    times = rng.integers(0, 2, 2000)
    whole = sorted_runs((thin, data), (times,)).rows()
    j = RunJoiner(2, 1)
    parts = []
    for lo in range(0, 2000, 37):
        parts += j.feed((thin[lo:lo + 37], data[lo:lo + 37]), (times[lo:lo + 37],)).rows()
    parts += j.flush().rows()
    assert parts == whole
    # every entry covered exactly once, and no two neighbours could merge
    assert sum(r[3] for r in whole) == 2000
    for a, b in zip(whole, whole[1:]):
        assert not (b[0] == a[0] + a[3] and b[1] == a[1] + a[3] and b[2] == a[2])


@pytest.mark.parametrize("seed", range(3))
def test_emit_collect_build_round_trip(seed: int):
    store, md = random_pool(seed)
    m = model(md)
    md = reopen(store)
    xml = io.StringIO()
    dump_xml(md, xml)
    col = IRCollector()
    emit(md, col)
    assert col.ir is not None
    out = MemoryBlockStore(4096)
    built = restore(col.ir, out)
    assert model(built) == m
    again = io.StringIO()
    dump_xml(built, again)
    assert again.getvalue() == xml.getvalue()
    # and through XML text
    out2 = MemoryBlockStore(4096)
    b = MetadataBuilder(out2)
    read_xml(io.StringIO(xml.getvalue()), b)
    assert b.md is not None and model(b.md) == m
    assert [d.dev_id for d in parse_xml(io.StringIO(xml.getvalue())).devices] == sorted(m)


def test_json_writer_streams_what_json_dumps_would_print():
    store, md = random_pool(1)
    for skip in (False, True):
        buf = io.StringIO()
        dump_json(md, buf, skip_mappings=skip)
        text = buf.getvalue()
        assert json.dumps(json.loads(text), indent=2) + "\n" == text
        d = json.loads(text)
        assert [x["dev_id"] for x in d["devices"]] == md.device_ids()
        assert ("mappings" in d["devices"][0]) != skip
    empty_store = MemoryBlockStore(64)
    from thinpool.metadata.pool_metadata import PoolMetadata

    empty = PoolMetadata.format(empty_store, data_block_size=128, nr_data_blocks=10)
    buf = io.StringIO()
    dump_json(empty, buf)
    assert json.dumps(json.loads(buf.getvalue()), indent=2) + "\n" == buf.getvalue()


def test_builder_takes_arrays_as_repair_would_give_them():
    from thinpool.metadata.ir import DeviceDetailsIR, SuperblockIR

    out = MemoryBlockStore(256)
    b = MetadataBuilder(out)
    b.superblock_b(SuperblockIR("", 3, 7, 0, 2, 128, 100))
    b.device_b(DeviceDetailsIR(5, 3, 7, 1, 2))
    b.map_arrays(np.array([9, 1, 2]), np.array([50, 10, 11]), np.array([1, 1, 1]))
    b.device_e()
    b.superblock_e()
    b.eof()
    assert b.md is not None
    t, d, _ = b.md.mappings(5)
    assert t.tolist() == [1, 2, 9] and d.tolist() == [10, 11, 50] and b.md.trans_id == 7
