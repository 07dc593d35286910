"""DataStore: pread/pwrite/punch on the sparse data file, and its known-holes bookkeeping (a punch of a chunk
known to be a hole is skipped; anything written is punched for real)."""

from __future__ import annotations

from pathlib import Path

from pool_helpers import CH, is_data, is_hole

from thinpool.io.data_store import DataStore


def test_punch_skips_known_holes_and_zeroes_written_chunks(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"")
    ds = DataStore(str(path), CH)
    ds.resize(8 * CH)
    ds.punch(2 * CH, CH)  # fresh sparse file: already a hole
    assert ds.punches_skipped == 1 and ds.punched == 0
    ds.pwrite(3 * CH + 100, b"x" * 10)
    ds.punch(3 * CH, CH)  # written: must really be punched
    assert ds.pread(3 * CH, CH) == bytes(CH)
    assert is_hole(path, 3 * CH, CH) and ds.punched == CH
    ds.punch(3 * CH, CH)  # now known to be a hole again
    assert ds.punches_skipped == 2
    ds.pwrite(5 * CH, b"y" * CH)
    ds.resize(16 * CH)  # the grown part is a hole
    ds.punch(12 * CH, 2 * CH)
    assert ds.punches_skipped == 3
    ds.punch(5 * CH, CH)
    assert ds.pread(5 * CH, CH) == bytes(CH)
    ds.pwrite(6 * CH, b"z" * CH)
    ds.close()

    # a new store scans the file: chunk 6 holds data, so zeroing it is a real punch
    ds = DataStore(str(path), CH)
    assert is_data(path, 6 * CH, CH)
    ds.punch(6 * CH, CH)
    assert ds.punched == CH and ds.pread(6 * CH, CH) == bytes(CH)
    ds.punch(7 * CH, CH)
    assert ds.punches_skipped == 1
    # an unaligned punch still zeroes exactly its range
    ds.pwrite(0, b"a" * (2 * CH))
    ds.punch(100, CH)
    assert ds.pread(0, 2 * CH) == b"a" * 100 + bytes(CH) + b"a" * (CH - 100)
    ds.close()


def test_copy_inside_the_file(tmp_path: Path, monkeypatch) -> None:
    import os

    path = tmp_path / "data"
    path.write_bytes(b"")
    ds = DataStore(str(path), CH)
    ds.resize(8 * CH)
    ds.punch(4 * CH, CH)  # scan: all holes
    src = bytes(range(256)) * (CH // 256)
    ds.pwrite(CH, src)
    ds.copy(CH, 4 * CH, CH)
    assert ds.pread(4 * CH, CH) == src
    ds.punch(4 * CH, CH)  # the copy made chunk 4 data: the punch is real
    assert ds.pread(4 * CH, CH) == bytes(CH)

    def no_cfr(*a: object) -> int:
        raise OSError(38, "Function not implemented")  # ENOSYS: fall back to pread + pwrite

    monkeypatch.setattr(os, "copy_file_range", no_cfr)
    ds.copy(CH, 6 * CH, CH)
    assert ds.pread(6 * CH, CH) == src
    ds.close()
