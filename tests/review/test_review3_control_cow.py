"""Review: device-table changes through the control channel of a running `serve` while copies are pending.

A client writes 4 KiB pieces into chunks a snapshot shares (the copies stay pending: no FLUSH); between its
writes, other processes send `thin snap`, `thin delete` and `pool commit` through the control channel. Each
snapshot must hold exactly the writes acknowledged before it; deleting the snapshot whose blocks are the pending
copies' sources must not lose them; the origin must read, over NBD and after SIGTERM, as the byte model; both
real checkers must accept the metadata.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import need_tool
from oracles import assert_thin_check
from review_helpers import stop_process

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "nbd"))
from nbd_client import RawClient  # noqa: E402

from thinpool.pool import Pool  # noqa: E402

CH = 64 << 10
DEV = 16 * CH


def _thinpool(pool: str, *args: str) -> None:
    r = subprocess.run([sys.executable, "-c", "from thinpool_cli.main import main; main()", *args],
                       capture_output=True, text=True, env={**os.environ, "THINPOOL_POOL": pool}, timeout=120)
    assert r.returncode == 0, (args, r.stdout, r.stderr)


@pytest.mark.external
def test_control_snapshots_and_deletes_between_writes_left_pending() -> None:
    need_tool("thin_check")
    d = tempfile.mkdtemp(prefix="tpr3ctl", dir="/tmp")
    try:
        pool = os.path.join(d, "pool")
        old = random.Random(1).randbytes(DEV)
        with Pool.create(pool, data_size=128 * CH, chunk_size=CH) as p:
            p.create_thin(0, DEV, name="vol").write(0, old)
        sock = os.path.join(d, "s.sock")
        proc = subprocess.Popen([sys.executable, "-m", "thinpool_cli.serve_cmds", "serve", "--pool", pool,
                                 "--socket", sock], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while True:
            line = proc.stdout.readline()
            if line.startswith("control "):
                break
            assert line.startswith("serving "), (line, proc.stderr.read() if proc.poll() is not None else "")
        model = bytearray(old)
        cuts: dict[int, bytes] = {}
        rng = random.Random(2)
        try:
            with RawClient(sock, timeout=60) as c:
                c.greeting()
                c.go("vol")

                def scribble(n: int) -> None:
                    for _ in range(n):
                        off = rng.randrange(0, DEV // 4096) * 4096
                        data = rng.randbytes(4096)
                        assert c.write(off, data) == 0
                        model[off:off + 4096] = data

                def cut_reads(name: str, want: bytes) -> None:
                    """The snapshot, through its own export (added when it was made), reads as its cut."""
                    with RawClient(sock, timeout=60) as s:
                        s.greeting()
                        s.go(name)
                        for off in range(0, DEV, CH):
                            err, got = s.read(off, CH)
                            assert err == 0 and got == want[off:off + CH], f"{name} chunk {off // CH}"

                _thinpool(pool, "thin", "snap", "1", "vol", "--name", "s1")
                cuts[1] = bytes(model)
                scribble(12)  # breaks of chunks s1 shares: pending copies from s1's blocks
                _thinpool(pool, "thin", "snap", "2", "vol", "--name", "s2")  # completes them first
                cuts[2] = bytes(model)
                scribble(12)  # pending copies from blocks s2 (and some s1) share
                cut_reads("s1", cuts[1])
                cut_reads("s2", cuts[2])
                _thinpool(pool, "thin", "delete", "s1", "--force")
                del cuts[1]
                scribble(6)
                _thinpool(pool, "pool", "commit")
                scribble(6)
                cut_reads("s2", cuts[2])
                _thinpool(pool, "thin", "delete", "s2", "--force")  # the sources of the copies left pending
                del cuts[2]
                scribble(6)
                _thinpool(pool, "thin", "snap", "3", "vol", "--name", "s3")
                cuts[3] = bytes(model)
                scribble(6)
                for off in range(0, DEV, CH):
                    err, got = c.read(off, CH)
                    assert err == 0 and got == bytes(model[off:off + CH]), f"origin chunk {off // CH}"
        finally:
            _rc, _out, err = stop_process(proc)
        assert proc.returncode == 0, err
        with Pool.open(pool, readonly=True) as ro:
            assert sorted(ro.list_devices()) == [0, 3]
            assert ro.device(0).read(0, DEV) == bytes(model)
            assert ro.device(3).read(0, DEV) == cuts[3]
        assert_thin_check(os.path.join(pool, "metadata"))
    finally:
        shutil.rmtree(d, ignore_errors=True)
