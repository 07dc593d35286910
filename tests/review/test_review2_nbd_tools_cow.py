"""Review: real NBD clients against a thin device whose every chunk is shared with a snapshot, so their
sector writes leave copies pending (deferred copy-on-write, thin.py): qemu-io's pipelined aio writes and
verified reads, then nbdcopy of the whole export to a file, must equal a byte model (the bytes never written
come from the shared blocks); the snapshot's export keeps the old bytes; the pool reopens to the same bytes
and passes both thin_checks."""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import pytest
from conftest import need_tool, run_tool
from oracles import assert_thin_check

from thinpool.nbd import ServerThread
from thinpool.pool import Pool

pytestmark = pytest.mark.external

CH = 64 << 10
SIZE = 64 * CH


class Watched:
    """The thin device, recording the most copies left pending after any write the server made."""

    def __init__(self, dev) -> None:
        self.dev = dev
        self.most_pending = 0

    def __getattr__(self, name):
        return getattr(self.dev, name)

    def write(self, offset, data) -> None:
        self.dev.write(offset, data)
        self.most_pending = max(self.most_pending, len(self.dev.pool.md.pending_copies(self.dev.dev_id)))


def test_qemu_io_and_nbdcopy_over_pending_copies() -> None:
    need_tool("qemu-io", "nbdcopy")
    d = tempfile.mkdtemp(prefix="tpr2q", dir="/tmp")
    try:
        path = os.path.join(d, "pool")
        pool = Pool.create(path, data_size=4 * SIZE, chunk_size=CH)
        pool.create_thin(1, SIZE)
        old = random.Random(11).randbytes(SIZE)
        pool.device(1).write(0, old)
        pool.create_snap(2, 1)
        model = bytearray(old)
        rng = random.Random(12)
        cmds = []
        used = bytearray(SIZE // 512)  # aio writes in flight together may land in any order: no overlaps
        i = 0
        while i < 60:  # sector-aligned pieces into shared chunks, pipelined (aio), a flush midway
            off = rng.randrange(SIZE // 512) * 512
            n = min(rng.choice([512, 1024, 4096, 8192, 20480]), SIZE - off)
            if any(used[off // 512:(off + n) // 512]):
                continue
            used[off // 512:(off + n) // 512] = b"\x01" * (n // 512)
            pat = 1 + i % 250
            cmds.append(f"aio_write -P {pat} {off} {n}")
            model[off:off + n] = bytes([pat]) * n
            if i == 30:
                cmds.append("aio_flush")
            i += 1
        verify = []
        for _ in range(20):  # reads of the pieces back, and of whole chunks (gaps from the shared blocks)
            off = rng.randrange(SIZE // CH) * CH
            verify.append((off, CH))
        sock = os.path.join(d, "s")
        vol = Watched(pool.device(1))
        with ServerThread({"vol": vol, "snap": pool.device(2)}, unix_path=sock,
                          on_shutdown=lambda: None) as srv:
            args = ["qemu-io", "-f", "raw", "-t", "writeback", srv.uri("vol")]  # writethrough would flush every write
            for c in cmds:
                args += ["-c", c]
            r = run_tool(*args, timeout=120)
            assert "fail" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
            assert vol.most_pending >= 10  # the breaks were deferred (until qemu-io's flushes)
            out = os.path.join(d, "vol.img")
            run_tool("nbdcopy", srv.uri("vol"), out, timeout=120)
            with open(out, "rb") as f:
                got = f.read()
            assert got == bytes(model), "nbdcopy of the export differs from the model"
            snap_out = os.path.join(d, "snap.img")
            run_tool("nbdcopy", srv.uri("snap"), snap_out, timeout=120)
            with open(snap_out, "rb") as f:
                assert f.read() == old
        pool.close()
        with Pool.open(path, readonly=True) as ro:
            assert ro.device(1).read(0, SIZE) == bytes(model)
            assert ro.device(2).read(0, SIZE) == old
        assert_thin_check(os.path.join(path, "metadata"))
    finally:
        shutil.rmtree(d, ignore_errors=True)
