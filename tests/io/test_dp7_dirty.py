"""DataStore's dirty ranges (the byte ranges written since the last sync, which tell the pool whether a failed
command overwrote committed chunks in place) are exact across the packing of the recent ranges into the compact
array: every range in order, consecutive writes merged (also across a fold), copies and punches included, cleared
by sync; bytes_written counts every byte written whatever the path; the file's end and the known-hole tail are
still checked by the one comparison of the fast path."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from thinpool.errors import StoreIOError
from thinpool.io import data_store as ds_mod
from thinpool.io.data_store import DataStore

CH = 64 * 1024


def _store(tmp_path: Path, size: int) -> DataStore:
    path = tmp_path / "data"
    path.write_bytes(b"")
    os.truncate(path, size)
    return DataStore(str(path), CH)


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The model: each write's range in order, one merged into the one before when it starts at its end."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if b == a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


@pytest.mark.parametrize("fold", [4, 6, ds_mod._DIRTY_FOLD])
def test_dirty_ranges_are_exact_across_folds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fold: int) -> None:
    monkeypatch.setattr(ds_mod, "_DIRTY_FOLD", fold)
    rnd = random.Random(fold)
    size = 256 * CH
    ds = _store(tmp_path, size)
    ranges: list[tuple[int, int]] = []
    written = 0
    pos = 0
    for i in range(3 * ds_mod._DIRTY_FOLD // 2 + 50):
        kind = rnd.random()
        if kind < 0.35:  # right after the last one: merged
            off = pos
        else:
            off = rnd.randrange(0, size - 8192)
        n = rnd.choice([0, 1, 512, 4096, 5000])
        if off + n > size:
            off = size - n
        ds.pwrite(off, bytes([i % 251 + 1]) * n)
        ranges.append((off, off + n))
        written += n
        pos = off + n
        if i % 97 == 0:  # a copy: its destination is dirty too, and counts as written
            ds.copy(0, 200 * CH, 4096)
            ranges.append((200 * CH, 200 * CH + 4096))
            written += 4096
            pos = 200 * CH + 4096
    assert ds.dirty == _merged(ranges)
    assert ds.bytes_written == written
    ds.sync()
    assert ds.dirty == []
    ds.pwrite(10, b"ab")
    ds.pwrite(12, b"cd")  # after a sync a write at the old end of the last range starts a new one
    assert ds.dirty == [(10, 14)]
    ds.close()


def test_punch_is_dirty_and_a_write_past_the_end_marks_nothing(tmp_path: Path) -> None:
    ds = _store(tmp_path, 8 * CH)
    ds.pwrite(CH, b"x" * CH)
    ds.punch(CH, CH)  # written: punched for real, dirty (merged? no: it starts where the write started)
    assert ds.dirty == [(CH, 2 * CH), (CH, 2 * CH)]
    before = ds.dirty
    with pytest.raises(StoreIOError):
        ds.pwrite(8 * CH - 100, b"y" * 200)  # past the file's end: refused before anything is marked
    with pytest.raises(StoreIOError):
        ds.pwrite(2 * CH, b"y" * (7 * CH))  # a write in pieces past the end: refused whole, nothing written
    assert ds.dirty == before and ds.pread(2 * CH, 16) == bytes(16)
    os.truncate(ds.path, 16 * CH)  # another process grew the file: the limit follows at the first write past it
    ds.pwrite(12 * CH, b"z" * (2 * CH))
    assert ds.pread(12 * CH, 2 * CH) == b"z" * (2 * CH) and ds.dirty[-1] == (12 * CH, 14 * CH)
    ds.close()


def test_hole_tail_moves_with_writes_past_it(tmp_path: Path) -> None:
    """A known-hole tail (learnt by a punch's hole check) is moved up by a write crossing it, so a later punch of a
    chunk that write touched is done for real, and one of a chunk past it is skipped without a seek."""
    ds = _store(tmp_path, 32 * CH)
    ds.punch(4 * CH, CH)  # SEEK_DATA finds nothing from 4 * CH on: the hole tail starts there
    assert ds.punches_skipped == 1 and ds.is_hole(20 * CH, CH)
    ds.pwrite(10 * CH + 5, b"q" * (3 * CH))  # crosses the tail: in pieces, the tail moves past its end
    assert not ds.is_hole(12 * CH, CH)
    ds.punch(11 * CH, CH)
    assert ds.punched == CH and ds.pread(11 * CH, CH) == bytes(CH)
    ds.punch(20 * CH, CH)
    assert ds.punches_skipped == 2
    ds.close()
