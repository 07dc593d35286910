"""`thinpool thin ...`: devices, snapshots, raw I/O, sparse import/export, and their errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_helpers import busy_pool, fails, fingerprint, ok, pool, run  # noqa: F401

CH = 64 * 1024


def devices(p: Path) -> dict[int, dict]:
    return {d["dev_id"]: d for d in json.loads(ok("thin", "list", "--json", "-p", p).stdout)}


def test_create_list_snap_delete(pool: Path):
    out = json.loads(ok("thin", "create", "1", "--size", "1G", "--name", "vol", "--json", "-p", pool).stdout)
    assert out == {"dev_id": 1, "name": "vol", "size": 1 << 30, "origin": None}
    ok("thin", "snap", "2", "vol", "--name", "vol-snap", "-p", pool)
    ok("thin", "snap", "3", "2", "-p", pool)
    d = devices(pool)
    assert sorted(d) == [1, 2, 3] and d[2]["name"] == "vol-snap" and d[3]["size"] == 1 << 30
    text = ok("thin", "list", "-p", pool).stdout
    assert "vol-snap" in text and "1GiB" in text
    ok("thin", "delete", "vol-snap", "--force", "-p", pool)
    ok("thin", "delete", "3", "-f", "-p", pool)
    assert sorted(devices(pool)) == [1]


def test_delete_needs_force_and_changes_nothing(pool: Path):
    ok("thin", "create", "1", "--size", "1M", "-p", pool)
    before = fingerprint(pool)
    r = fails(2, "thin", "delete", "1", "-p", pool)
    assert "--force" in r.stderr
    assert fingerprint(pool) == before


def test_duplicate_id_and_name(pool: Path):
    ok("thin", "create", "1", "--size", "1M", "--name", "vol", "-p", pool)
    before = fingerprint(pool)
    assert "device 1 already exists" in fails(5, "thin", "create", "1", "--size", "1M", "-p", pool).stderr
    assert "device 1 already exists" in fails(5, "thin", "snap", "1", "vol", "-p", pool).stderr
    assert "named 'vol' already exists" in fails(1, "thin", "create", "2", "--size", "1M", "--name", "vol",
                                                 "-p", pool).stderr
    assert fingerprint(pool) == before


@pytest.mark.parametrize("args", [
    ["thin", "snap", "2", "9"], ["thin", "snap", "2", "nosuch"], ["thin", "delete", "9", "--force"],
    ["thin", "read", "9"], ["thin", "write", "9", "-"], ["thin", "export", "9", "IMG"], ["thin", "flush", "9"],
    ["map", "9"], ["delta", "1", "9"], ["dump", "--dev-id", "9"],
])
def test_wrong_device_id(pool: Path, args: list[str]):
    ok("thin", "create", "1", "--size", "1M", "-p", pool)
    before = fingerprint(pool)
    args = [str(pool.parent / "img") if a == "IMG" else a for a in args]
    r = fails(5, *args, "-p", pool, input=b"x")
    assert "does not exist" in r.stderr
    assert fingerprint(pool) == before
    assert not (pool.parent / "img").exists()


@pytest.mark.parametrize("size,msg", [("1000", "not a whole number of sectors"), ("1.3k", "invalid size"),
                                      ("0", "greater than zero"), ("12x", "invalid size")])
def test_bad_device_size(pool: Path, size: str, msg: str):
    before = fingerprint(pool)
    r = fails(2, "thin", "create", "1", "--size", size, "-p", pool)
    assert msg in r.stderr and repr(size) in r.stderr
    assert fingerprint(pool) == before


def test_bad_device_id_is_a_usage_error(pool: Path):
    fails(2, "thin", "create", "16777216", "--size", "1M", "-p", pool)
    fails(2, "thin", "create", "-1", "--size", "1M", "-p", pool)
    fails(2, "thin", "create", "abc", "--size", "1M", "-p", pool)


def test_write_read_and_copy_on_write(pool: Path, tmp_path: Path):
    ok("thin", "create", "1", "--size", "2M", "--name", "vol", "-p", pool)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    ok("thin", "write", "vol", src, "--offset", "4k", "-p", pool)
    assert ok("thin", "read", "vol", "--offset", "4k", "--length", "100000", "-p", pool).stdout_bytes == \
        src.read_bytes()
    assert ok("thin", "read", "vol", "--length", "4096", "-p", pool).stdout_bytes == bytes(4096)
    ok("thin", "snap", "2", "vol", "-p", pool)
    ok("thin", "write", "1", "--offset", "8k", "-", "-p", pool, input=b"NEW!")
    assert ok("thin", "read", "1", "-o", "8k", "-l", "4", "-p", pool).stdout_bytes == b"NEW!"
    assert ok("thin", "read", "2", "-o", "8k", "-l", "4", "-p", pool).stdout_bytes == src.read_bytes()[4096:4100]
    whole = ok("thin", "read", "2", "-p", pool).stdout_bytes
    assert len(whole) == 2 << 20 and whole[4096:104096] == src.read_bytes()
    out = tmp_path / "out.bin"
    ok("thin", "read", "1", "-l", "12k", "--output", out, "-p", pool)
    assert out.read_bytes()[8192:8196] == b"NEW!"


def test_write_out_of_bounds_changes_nothing(pool: Path, tmp_path: Path):
    ok("thin", "create", "1", "--size", "1M", "-p", pool)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 200_000)
    before = fingerprint(pool)
    assert "out of bounds" in fails(1, "thin", "write", "1", big, "--offset", "900k", "-p", pool).stderr
    # from a pipe the size is not known in advance: the write fails part-way and is rolled back
    assert "out of bounds" in fails(1, "thin", "write", "1", "-", "--offset", "1000k", "-p", pool,
                                    input=b"y" * 300_000).stderr
    assert fingerprint(pool)["metadata"] == before["metadata"]
    assert ok("thin", "read", "1", "-p", pool).stdout_bytes == bytes(1 << 20)
    assert "out of bounds" in fails(1, "thin", "read", "1", "--offset", "1M", "--length", "1", "-p", pool).stderr
    fails(2, "thin", "write", "1", tmp_path / "nonexistent", "-p", pool)


def test_pool_full_is_exit_3_and_changes_nothing(tmp_path: Path):
    p = tmp_path / "small"
    ok("pool", "create", p, "--size", "256k")
    ok("thin", "create", "1", "--size", "1M", "-p", p)
    ok("thin", "write", "1", "-", "-p", p, input=b"a" * CH)
    before = fingerprint(p)
    r = fails(3, "thin", "write", "1", "-", "--offset", "128k", "-p", p, input=b"b" * (4 * CH))
    assert "no data space left" in r.stderr
    assert fingerprint(p)["metadata"] == before["metadata"]
    st = json.loads(ok("pool", "status", "--json", "-p", p).stdout)
    assert st["used_data_blocks"] == 1


def make_image(path: Path) -> bytes:
    """A raw image with data, an all-zero chunk written as data, a real hole and an unaligned tail."""
    size = 20 * CH + 1000
    content = bytearray(size)
    content[0:100] = b"head" * 25
    content[3 * CH + 5:3 * CH + 70_000] = os.urandom(70_000 - 5)
    content[size - 500:] = b"t" * 500
    with open(path, "wb") as f:
        f.write(content[:6 * CH])          # chunk 5 is explicit zeros on disk
        f.seek(size - 1000)
        f.write(content[size - 1000:])    # 6..19 is a hole
    return bytes(content)


def test_import_export_sparse(pool: Path, tmp_path: Path):
    img = tmp_path / "disk.raw"
    content = make_image(img)
    rep = json.loads(ok("thin", "import", "3", img, "--name", "disk", "--json", "-p", pool).stdout)
    assert rep["dev_id"] == 3 and rep["image_size"] == len(content) and rep["mapped"] == 4 * CH
    d = devices(pool)[3]
    assert d["size"] == -(-len(content) // 512) * 512
    # chunks 0, 3, 4 and the tail chunk 20 hold data; the zero chunk 5 and the hole 6..19 are not mapped
    assert d["mapped"] == 4 * CH
    out = tmp_path / "out.raw"
    ok("thin", "export", "disk", out, "-p", pool)
    data = out.read_bytes()
    assert data[:len(content)] == content and data[len(content):] == bytes(len(data) - len(content))
    assert os.stat(out).st_blocks * 512 <= 5 * CH  # holes stayed holes
    assert "exists" in fails(2, "thin", "export", "disk", out, "-p", pool).stderr
    rep = json.loads(ok("thin", "export", "disk", out, "--force", "--json", "-p", pool).stdout)
    assert rep["size"] == d["size"] and 0 < rep["data"] <= 4 * CH
    # re-import over existing data: the device equals the new image exactly
    ok("thin", "write", "disk", "-", "--offset", f"{10 * CH}", "-p", pool, input=b"junk" * 100)
    img2 = tmp_path / "disk2.raw"
    img2.write_bytes(b"\x01" * CH + bytes(CH))
    ok("thin", "import", "disk", img2, "-p", pool)
    back = ok("thin", "read", "disk", "-p", pool).stdout_bytes
    assert back[:CH] == b"\x01" * CH and not any(back[CH:])
    assert devices(pool)[3]["mapped"] == CH


def test_import_larger_than_device(pool: Path, tmp_path: Path):
    ok("thin", "create", "1", "--size", "64k", "-p", pool)
    img = tmp_path / "big.raw"
    img.write_bytes(b"x" * (CH + 1))
    before = fingerprint(pool)
    assert "out of bounds" in fails(1, "thin", "import", "1", img, "-p", pool).stderr
    assert fingerprint(pool) == before


def test_external_origin(pool: Path, tmp_path: Path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"O" * (3 * CH))
    ok("thin", "create", "4", "--size", "1M", "--origin", base, "-p", pool)
    ok("thin", "write", "4", "-", "--offset", "1000", "-p", pool, input=b"w")
    got = ok("thin", "read", "4", "--length", f"{4 * CH}", "-p", pool).stdout_bytes
    assert got[:1000] == b"O" * 1000 and got[1000:1001] == b"w" and got[3 * CH:] == bytes(CH)
    entries = json.loads(ok("map", "4", "--json", "-p", pool).stdout)
    assert [(e["depth"], e["present"], e["data"]) for e in entries] == \
        [(0, True, True), (1, True, True), (0, False, False)]
    fails(2, "thin", "create", "5", "--size", "1M", "--origin", tmp_path / "missing", "-p", pool)


def test_import_over_external_origin(pool: Path, tmp_path: Path):
    """An import makes the device equal the image even where an external origin shows through: the image's
    zero chunks and its holes (inside and past its data) read as zeros, not as the origin's bytes."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"O" * (8 * CH))
    ok("thin", "create", "4", "--size", f"{8 * CH}", "--origin", base, "-p", pool)
    img = tmp_path / "img.raw"
    with open(img, "wb") as f:
        f.write(b"\x01" * CH + bytes(CH))  # data chunk 0, zero chunk 1 (within the data extent)
        f.seek(4 * CH)
        f.write(b"\x02" * CH)  # a hole for chunks 2 and 3, data in chunk 4
        f.truncate(6 * CH)  # a hole for chunk 5; chunks 6 and 7 lie past the image's end
    ok("thin", "import", "4", img, "-p", pool)
    back = ok("thin", "read", "4", "-p", pool).stdout_bytes
    want = img.read_bytes()
    assert back == want + bytes(8 * CH - len(want))


def test_flush(pool: Path):
    ok("thin", "create", "1", "--size", "1M", "-p", pool)
    r = ok("thin", "flush", "-p", pool)
    assert "committed" in r.stderr
    ok("thin", "flush", "1", "-p", pool)
    assert "committed transaction" in ok("pool", "commit", "-p", pool).stderr
    assert ok("thin", "ls", "-p", pool).stdout == ok("thin", "list", "-p", pool).stdout
