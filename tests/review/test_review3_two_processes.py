"""Review: a second process against a pool that this one holds open with copy-on-write copies pending.

The pending copies live only in the writer's memory; the pool lock keeps every other writer and data reader out,
and the metadata readers see the last commit, which references no block whose copy is pending. Pinned, with each
command run as its own process (the lock is an flock on the pool directory):

- every command that writes, or reads data, is refused with one line and exit 1, and the metadata file stays
  byte for byte as it was (restore into the pool directory, rebuild-manifest, trim, delete, snapshot, merge,
  rollback, discard, set-transaction-id, reserve-metadata-snap, commit, thin read/write/export, serve);
- the metadata tools work meanwhile and show the last commit: ``thinpool dump`` equals C++ thin_dump, ``check``
  and both real checkers accept, ``pool repair`` salvages exactly the last commit;
- ``pool resize`` from outside only grows the data file (the writer takes it up later);
- the writer then commits: its pending copies complete, and a reopen reads what it wrote.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
from pathlib import Path

import pytest
from conftest import need_tool
from oracles import assert_thin_check

from thinpool.pool import Pool

CH = 64 << 10


def _cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["thinpool", *args], input=stdin, capture_output=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "THINPOOL_POOL"})


def _strip(xml: str) -> str:
    """thin_dump XML without its superblock line and the devices' snap_time."""
    return re.sub(r' snap_time="\d+"', "", xml.split("\n", 1)[1])


def _md_hash(pool: Path) -> str:
    return hashlib.sha256((pool / "metadata").read_bytes()).hexdigest()


@pytest.mark.external
def test_a_second_process_meets_the_lock_and_the_last_commit(tmp_path: Path) -> None:
    need_tool("thin_check", "thin_dump")
    pool = tmp_path / "pool"
    old = random.Random(1).randbytes(4 * CH)
    p = Pool.create(pool, data_size=64 * CH, chunk_size=CH)
    try:
        p.create_thin(1, 4 * CH, name="vol").write(0, old)
        p.create_snap(2, 1, name="snap")
        want = bytearray(old)
        for off in (4096, CH + 512, 3 * CH + 8192):
            data = random.Random(off).randbytes(4096)
            p.device(1).write(off, data)
            want[off:off + len(data)] = data
        assert len(p.md.pending_copies(1)) == 3
        md = str(pool / "metadata")
        committed_xml = subprocess.run(["thin_dump", md], capture_output=True, text=True, check=True).stdout
        xml = tmp_path / "last.xml"
        xml.write_text(committed_xml)
        before = _md_hash(pool)

        refused = [
            ("restore", "-i", str(xml), "-o", str(pool), "-f"),
            ("pool", "rebuild-manifest", str(pool), "--device", "1:256k", "--device", "2:256k", "--force"),
            ("pool", "trim", str(pool)),
            ("pool", "commit", "--pool", str(pool)),
            ("pool", "set-transaction-id", "2", "3", "--pool", str(pool)),
            ("pool", "reserve-metadata-snap", "--pool", str(pool)),
            ("thin", "delete", "snap", "--force", "--pool", str(pool)),
            ("thin", "snap", "3", "vol", "--pool", str(pool)),
            ("thin", "merge", "snap", "--pool", str(pool)),
            ("thin", "rollback", "vol", "snap", "--pool", str(pool)),
            ("thin", "discard", "vol", "--pool", str(pool)),
            ("thin", "read", "vol", "--length", "512", "--pool", str(pool)),
            ("thin", "write", "vol", "-", "--pool", str(pool)),
            ("thin", "export", "vol", str(tmp_path / "out.img"), "--pool", str(pool)),
            ("serve", "--socket", str(tmp_path / "s.sock"), "--pool", str(pool)),
        ]
        for args in refused:
            r = _cli(*args, stdin=b"x" * 512)
            err = r.stderr.decode()
            assert r.returncode == 1, (args, r.returncode, err)
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("thinpool: error: ") and "in use" in lines[0], (args, err)
            assert _md_hash(pool) == before, f"{args} changed the metadata"
        assert not (tmp_path / "out.img").exists()

        r = _cli("dump", str(pool))
        assert r.returncode == 0 and r.stdout.decode() == committed_xml
        assert _cli("check", str(pool)).returncode == 0
        assert_thin_check(md)
        r = _cli("pool", "repair", str(pool), str(tmp_path / "repaired.bin"))
        assert r.returncode == 0, r.stderr
        rep = subprocess.run(["thin_dump", str(tmp_path / "repaired.bin")], capture_output=True, text=True,
                             check=True).stdout
        # the same devices and mappings (repair gives devices that share blocks a newer snap_time, by design)
        assert _strip(rep) == _strip(committed_xml)
        r = _cli("pool", "resize", "--size", str(96 * CH), "--pool", str(pool))
        assert r.returncode == 0, r.stderr
        assert os.path.getsize(pool / "data") == 96 * CH and _md_hash(pool) == before

        assert p.device(1).read(0, 4 * CH) == bytes(want)
        assert p.device(2).read(0, 4 * CH) == old
        p.commit()
        assert not p.md.pending_devices()
    finally:
        p.close()
    with Pool.open(pool, readonly=True) as ro:
        assert ro.device(1).read(0, 4 * CH) == bytes(want)
        assert ro.device(2).read(0, 4 * CH) == old
    assert_thin_check(pool / "metadata")


@pytest.mark.external
def test_metadata_snapshot_tools_in_a_second_process_while_the_writer_goes_on(tmp_path: Path) -> None:
    """A metadata snapshot reserved with copies pending; the writer then writes, deletes, commits and leaves
    new copies pending. Another process's ``-m`` tools read exactly the reservation: ``dump -m`` equals C++
    ``thin_dump -m`` and the dump taken at the reservation, ``ls -m`` and ``delta -m`` equal thin_ls/thin_delta
    ``-m`` byte for byte, ``check -m`` passes."""
    need_tool("thin_dump", "thin_ls", "thin_delta")
    pool = tmp_path / "pool"
    md = str(pool / "metadata")
    p = Pool.create(pool, data_size=64 * CH, chunk_size=CH)
    try:
        p.create_thin(1, 8 * CH).write(0, random.Random(1).randbytes(8 * CH))
        p.create_snap(2, 1)
        p.create_thin(3, 4 * CH).write(0, b"q" * CH)
        p.device(1).write(2 * CH + 4096, b"p" * 4096)  # pending at the reservation (it completes them)
        p.reserve_metadata_snap()
        held = subprocess.run(["thin_dump", "-m", md], capture_output=True, text=True, check=True).stdout
        p.device(1).write(4096, b"z" * 4096)
        p.delete_thin(3)
        p.device(1).write(3 * CH, b"y" * CH)
        p.commit()
        p.device(1).write(5 * CH + 512, b"w" * 512)
        assert p.md.pending_copies(1)
        r = _cli("dump", "-m", str(pool))
        assert r.returncode == 0 and r.stdout.decode() == held
        for ours, theirs in ((("ls", "-m", str(pool)), ("thin_ls", "-m", md)),
                             (("delta", "-m", "1", "2", str(pool)),
                              ("thin_delta", "-m", "--snap1", "1", "--snap2", "2", md))):
            a = _cli(*ours)
            b = subprocess.run(list(theirs), capture_output=True, timeout=60)
            assert a.returncode == 0 == b.returncode, (a.stderr, b.stderr)
            assert a.stdout == b.stdout, ours
        assert _cli("check", "-m", str(pool)).returncode == 0
    finally:
        p.close()
