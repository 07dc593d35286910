"""Issue 13 in the pool layer: deletes punch merged runs of chunks, and device changes append O(1) records to the
manifest journal (pool.json.journal) instead of rewriting pool.json. No timing assertions: the work is counted
(punch calls, bytes appended, pool.json rewrites) and the results are checked on disk and by the real thin_check."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pool_helpers import CH, check_pool, is_data, is_hole, pattern

from thinpool import manifest as mf
from thinpool import pool as pool_mod
from thinpool.errors import InvalidArgument, ManifestError
from thinpool.pool import Pool, block_runs


def test_block_runs_against_a_loop() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        blocks = np.unique(rng.integers(0, 200, size=int(rng.integers(0, 120))))
        starts, ends = block_runs(blocks)
        expect: list[list[int]] = []
        for b in blocks.tolist():
            if expect and expect[-1][1] == b:
                expect[-1][1] = b + 1
            else:
                expect.append([b, b + 1])
        assert [[a, b] for a, b in zip(starts.tolist(), ends.tolist())] == expect


@pytest.mark.external
def test_delete_punches_runs_not_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device of 3 runs of chunks (one shared with a snapshot): its delete punches each freed run with one call,
    every freed chunk becomes a hole, the shared chunks keep their data, thin_check passes."""
    path = tmp_path / "p"
    with Pool.create(path, data_size=256 * CH) as pool:
        dev = pool.create_thin(1, 200 * CH)
        for lo, hi in ((0, 40), (50, 90), (120, 121)):
            dev.write(lo * CH, pattern((hi - lo) * CH, lo))
        pool.create_thin(2, 8 * CH).write(0, pattern(CH, 7))
        pool.commit()
        blocks = {tb: pool.md.lookup(1, tb)[0] for tb in range(200) if pool.md.lookup(1, tb) is not None}
        keep = pool.md.lookup(2, 0)[0]
        pool.create_snap(3, 1)
        dev3 = pool.device(3)
        dev3.write(0, pattern(CH, 99))  # breaks sharing of chunk 0 only
        pool.commit()
        freed = sorted(set(blocks.values()) - {pool.md.lookup(3, tb)[0] for tb in range(1, 200)
                                               if pool.md.lookup(3, tb) is not None})
        assert freed == [blocks[0]]  # only chunk 0 is the origin's alone
        pool.delete_thin(3)  # now everything of 1 but chunk 0 is unshared again... and 3's own chunk 0 freed
        calls: list[tuple[int, int]] = []
        real = pool.data.punch

        def spy(offset: int, length: int) -> None:
            calls.append((offset, length))
            real(offset, length)

        monkeypatch.setattr(pool.data, "punch", spy)
        pool.delete_thin(1)
        monkeypatch.undo()
        mine = np.unique(np.array(sorted(blocks.values()), dtype=np.int64))
        starts, ends = block_runs(mine)
        assert sorted(calls) == [(a * CH, (b - a) * CH) for a, b in zip(starts.tolist(), ends.tolist())]
        assert len(calls) < len(mine)  # merged: fewer calls than chunks
        for b in mine.tolist():
            assert is_hole(path / "data", b * CH, CH)
        assert is_data(path / "data", keep * CH, CH)
        assert pool.device(2).read(0, CH) == pattern(CH, 7)
    check_pool(path)


def test_passdown_splits_long_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_mod, "PASSDOWN_MAX_BYTES", 3 * CH)
    path = tmp_path / "p"
    with Pool.create(path, data_size=32 * CH) as pool:
        pool.create_thin(1, 10 * CH).write(0, pattern(10 * CH, 1))
        pool.commit()
        calls: list[int] = []
        real = pool.data.punch
        monkeypatch.setattr(pool.data, "punch", lambda o, n: (calls.append(n), real(o, n)))
        pool.delete_thin(1)
        assert calls == [3 * CH, 3 * CH, 3 * CH, CH]
        assert is_hole(path / "data", 0, 10 * CH)


def _state(pool: Pool) -> dict:
    return {d: (pool.device_label(d), pool.device_size(d), pool.lineage(d)) for d in pool.list_devices()}


def test_changes_append_to_the_journal_and_close_compacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Device changes never rewrite pool.json (counted); the journal replays at open (after a crash, as seen by a
    lock-free reader while the writer runs) and is folded into pool.json at close."""
    path = tmp_path / "p"
    pool = Pool.create(path, data_size=64 * CH)
    writes: list[dict] = []
    real = pool_mod._write_manifest
    monkeypatch.setattr(pool_mod, "_write_manifest", lambda p, m, **kw: (writes.append(m), real(p, m, **kw)))
    pool.create_thin(1, 4 * CH, name="a")
    pool.create_snap(2, 1, name="b")
    pool.rename_device(1, "c")
    pool.resize_device(2, 8 * CH)
    pool.delete_thin(1)
    pool.create_thin(3, CH, name="a")  # the old name of device 1, free again
    assert writes == []
    lines = (path / mf.JOURNAL).read_bytes().splitlines()
    assert len(lines) == 12 and all(len(x) < 400 for x in lines)
    assert os.stat(path / mf.JOURNAL).st_mode & 0o777 == 0o600
    expect = _state(pool)
    with Pool.open(path, readonly=True, lock="none") as reader:  # beside the writer: pool.json + the journal
        assert _state(reader) == expect
    before = (path / "pool.json").read_bytes()
    pool.crash_close()
    assert (path / "pool.json").read_bytes() == before
    with Pool.open(path) as pool:
        assert _state(pool) == expect == {2: ("b", 8 * CH, [1, 2]), 3: ("a", CH, [3])}
    assert not (path / mf.JOURNAL).exists()
    m = json.loads((path / "pool.json").read_text())
    assert sorted(m["devices"]) == ["2", "3"] and m["devices"]["2"]["name"] == "b"
    with Pool.open(path) as pool:
        assert _state(pool) == expect
        with pytest.raises(InvalidArgument, match="already exists"):
            pool.create_thin(4, CH, name="b")
        with pytest.raises(InvalidArgument, match="already exists"):
            pool.rename_device(3, "b")
        assert pool.find_device("b") == 2 and pool.find_device("a") == 3


def test_torn_and_corrupt_journal_records(tmp_path: Path) -> None:
    path = tmp_path / "p"
    pool = Pool.create(path, data_size=64 * CH)
    pool.create_thin(1, CH, name="a")
    pool.crash_close()
    journal = path / mf.JOURNAL
    good = journal.read_bytes()
    # a torn append (no newline: the step after it never ran) is ignored
    journal.write_bytes(good + b'{"transaction_id":2,"previous_transaction_id":1,"set":{"5":{"na')
    with Pool.open(path, readonly=True) as p:
        assert _state(p) == {1: ("a", CH, [1])}
    # a complete record that does not parse, or is not a record, is refused at open
    for bad in (b"{nope\n", b"[1, 2]\n", b'{"set": {}}\n', b'{"transaction_id": 2, "del": "1"}\n'):
        journal.write_bytes(good + bad)
        with pytest.raises(ManifestError, match="record 3"):
            Pool.open(path, readonly=True)
    # a record whose entry is invalid is refused by the whole-manifest validation
    journal.write_bytes(good + b'{"transaction_id":1,"set":{"1":{"name":"a","size":7}}}\n')
    with pytest.raises(ManifestError, match="size 7"):
        Pool.open(path, readonly=True)
    journal.write_bytes(good)
    with Pool.open(path) as p:
        assert _state(p) == {1: ("a", CH, [1])}
    assert not journal.exists()


def test_compaction_by_size_and_a_crash_before_the_unlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal is folded in once it outgrows pool.json; a crash between the new pool.json and the unlink
    replays the old journal over it harmlessly (same state)."""
    monkeypatch.setattr(pool_mod, "JOURNAL_COMPACT_BYTES", 0)
    path = tmp_path / "p"
    saved: list[bytes] = []
    real_compact = mf.compact

    def compact(d: Path, m: dict) -> None:
        saved.append((Path(d) / mf.JOURNAL).read_bytes())
        real_compact(d, m)

    monkeypatch.setattr(mf, "compact", compact)
    pool = Pool.create(path, data_size=64 * CH)
    for i in range(1, 30):
        pool.create_thin(i, CH, name=f"d{i}")
        if i % 3 == 0:
            pool.delete_thin(i - 1)
    assert len(saved) >= 3
    if (path / mf.JOURNAL).exists():
        pool._compact_manifest()  # end on a compaction, then "crash" before its unlink
    expect = _state(pool)
    pool.crash_close()
    (path / mf.JOURNAL).write_bytes(saved[-1])  # the last compaction's journal, as if its unlink never happened
    with Pool.open(path) as p:
        assert _state(p) == expect
    assert not (path / mf.JOURNAL).exists()


def test_a_whole_rewrite_drops_a_stale_journal(tmp_path: Path) -> None:
    """rebuild-manifest (and restore) write pool.json whole: a journal of the old one is never replayed over it."""
    path = tmp_path / "p"
    pool = Pool.create(path, data_size=64 * CH)
    pool.create_thin(1, CH, name="a")
    pool.create_thin(2, CH, name="b")
    pool.delete_thin(2)
    pool.crash_close()
    assert (path / mf.JOURNAL).exists()
    (path / "pool.json").unlink()
    Pool.rebuild_manifest(path, {1: (2 * CH, "z")})
    assert not (path / mf.JOURNAL).exists()
    with Pool.open(path) as p:
        assert _state(p) == {1: ("z", 2 * CH, [1])}


@pytest.mark.external
def test_many_snapshots_stay_consistent(tmp_path: Path) -> None:
    """200 snapshots created and half deleted through the journal (compacted on the way): the reopened pool
    has every entry, pool.json alone (after close) validates, thin_check passes."""
    path = tmp_path / "p"
    with Pool.create(path, data_size=64 * CH) as pool:
        pool.create_thin(0, 4 * CH, name="base").write(0, pattern(CH, 3))
        for i in range(1, 201):
            pool.create_snap(i, 0, name=f"s{i}")
        for i in range(1, 201, 2):
            pool.delete_thin(i)
        expect = _state(pool)
    assert not (path / mf.JOURNAL).exists()
    shutil.copy(path / "pool.json", tmp_path / "copy.json")
    assert len(mf.validate(json.loads((tmp_path / "copy.json").read_text()), "copy")["devices"]) == 101
    with Pool.open(path, readonly=True) as pool:
        assert _state(pool) == expect
        assert pool.device(200).read(0, CH) == pattern(CH, 3)
    check_pool(path)
