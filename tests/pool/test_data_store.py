"""DataStore: pread/pwrite/punch on the sparse data file, and its hole check (a punch of a range the filesystem
reports as a hole is skipped; anything written is punched for real), which costs one lseek for the range touched
whatever the size of the file."""

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

    # a new store asks the filesystem: chunk 6 holds data, so zeroing it is a real punch
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


def test_hole_check_is_one_lseek_in_an_8tib_file(tmp_path: Path, monkeypatch) -> None:
    """An 8 TiB sparse data file with data at both ends: a punch of a hole chunk anywhere costs one lseek and no
    fallocate, a punch of a data chunk one lseek and one fallocate, and nothing is kept per chunk of the file."""
    import os
    import sys

    from thinpool.io import data_store as ds_mod

    path = tmp_path / "data"
    path.write_bytes(b"")
    ds = DataStore(str(path), CH)
    ds.resize(8 << 40)
    ds.pwrite(0, b"a" * CH)
    ds.pwrite((8 << 40) - CH, b"z" * CH)
    seeks: list[int] = []
    real_lseek = os.lseek
    punches: list[tuple[int, int]] = []
    real_punch = ds_mod.punch_hole
    monkeypatch.setattr(ds_mod.os, "lseek", lambda fd, pos, how: (seeks.append(how), real_lseek(fd, pos, how))[1])
    monkeypatch.setattr(ds_mod, "punch_hole", lambda fd, o, n: (punches.append((o, n)), real_punch(fd, o, n))[1])
    for chunk in (1, 12345, (8 << 40) // CH - 2, (4 << 40) // CH):
        ds.punch(chunk * CH, CH)
    assert seeks == [os.SEEK_DATA] * 4 and punches == [] and ds.punches_skipped == 4
    ds.punch((8 << 40) - CH, CH)
    assert len(seeks) == 5 and punches == [((8 << 40) - CH, CH)]
    assert is_hole(path, (8 << 40) - CH, CH) and is_data(path, 0, CH)
    monkeypatch.undo()
    assert sys.getsizeof(ds.__dict__) < 4096 and all(sys.getsizeof(v) < 4096 for v in vars(ds).values())
    ds.close()


def test_preadinto_pieces_reads_each_piece_and_zeros_past_the_end(tmp_path: Path) -> None:
    """preadinto_pieces (a scattered read in one call) gives what one preadinto per piece gives, bytes past the end
    of the file as zeros (a short read), and counts every byte once."""
    path = tmp_path / "data"
    path.write_bytes(b"")
    ds = DataStore(str(path), CH)
    ds.resize(4 * CH)
    content = bytes((i * 7 + 3) % 251 for i in range(4 * CH))
    ds.pwrite(0, content)
    # out of file order, adjacent in the buffer; the last piece runs 100 bytes past the end of the file
    pieces = [[0, 3000, 2 * CH + 17], [3000, 5000, 5], [8000, 1100, 4 * CH - 1000]]
    buf = bytearray(b"\xff" * 9100)
    before = ds.bytes_read
    ds.preadinto_pieces(memoryview(buf), pieces)
    assert buf[:3000] == content[2 * CH + 17:2 * CH + 3017]
    assert buf[3000:8000] == content[5:5005]
    assert buf[8000:9000] == content[4 * CH - 1000:] and buf[9000:] == bytes(100)
    assert ds.bytes_read - before == 9100
    ds.close()
