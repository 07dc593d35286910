"""The crash campaign: SIGKILL `thinpool serve` while fio (nbd engine, verify) and a flush-marking client write;
after every kill, every write acknowledged before an acknowledged FLUSH is in the reopened pool, and thin_check
passes. Runs with the bounded server (limits, off-loop requests, control channel) in place."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from conftest import need_tool, run_tool
from nbd_client import RawClient
from oracles import assert_thin_check

from thinpool.nbd import protocol as P
from thinpool.pool import Pool

pytestmark = pytest.mark.external
MiB = 1 << 20
BS = 4096
NBLOCKS = 32
BASE = 40 * MiB
KILLS = int(os.environ.get("THINPOOL_CRASH_KILLS", "6"))


def tag_of(blk: bytes) -> int:
    t = int.from_bytes(blk[:4], "little")
    assert blk == t.to_bytes(4, "little") * (BS // 4), "torn or foreign block"
    return t


def test_sigkill_during_fio_keeps_every_flushed_write():
    need_tool("fio", "thin_check")
    d = tempfile.mkdtemp(prefix="tpcrash", dir="/tmp")
    rng = random.Random(14)
    try:
        pool = os.path.join(d, "pool")
        with Pool.create(pool, data_size=192 * MiB) as p:
            p.create_thin(0, 64 * MiB, name="vol")
        sock = os.path.join(d, "c.sock")
        issued = 0  # the highest round whose writes were sent
        durable = 0  # the highest round whose FLUSH was acknowledged
        for kill in range(KILLS):
            r, w = os.pipe()
            srv = subprocess.Popen([sys.executable, "-c", "from thinpool_cli.main import main; main()", "serve",
                                    "--pool", pool, "--socket", sock, "--ready-fd", str(w)], pass_fds=(w,),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                assert f.read() == b"READY=1\n", srv.stderr.read() if srv.poll() is not None else ""
            fio = subprocess.Popen(["fio", "--name=v", "--ioengine=nbd", f"--uri=nbd+unix:///vol?socket={sock}",
                                    "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M", "--verify=crc32c",
                                    "--do_verify=1", "--verify_state_save=0", "--loops=100"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            state = {"issued": issued, "durable": durable}

            def pattern(state: dict = state) -> None:
                try:
                    with RawClient(sock, timeout=30) as c:
                        c.greeting()
                        c.go("vol")
                        while True:
                            rnd = state["issued"] + 1
                            state["issued"] = rnd
                            for i in range(NBLOCKS):
                                flags = P.CMD_FLAG_FUA if i == NBLOCKS // 2 and rnd % 3 == 0 else 0  # more commits
                                if c.write(BASE + i * BS, rnd.to_bytes(4, "little") * (BS // 4), flags=flags):
                                    return
                            if c.command(P.CMD_FLUSH):
                                return
                            state["durable"] = rnd  # every write of the round completed before this FLUSH
                except Exception:
                    return  # the server died under us

            t = threading.Thread(target=pattern)
            t.start()
            time.sleep(rng.uniform(0.4, 1.5))
            srv.send_signal(signal.SIGKILL)
            srv.wait(30)
            t.join(60)
            assert not t.is_alive()
            fio.wait(60)
            issued, durable = state["issued"], state["durable"]
            assert_thin_check(os.path.join(pool, "metadata"))
            with Pool.open(pool) as p:
                dev = p.device(0)
                tags = [tag_of(dev.read(BASE + i * BS, BS)) for i in range(NBLOCKS)]
            assert all(durable <= t <= issued for t in tags), (kill, durable, issued, tags)
            assert durable > 0 or kill == 0
            # the next round continues from what the pool holds
            issued = max(issued, *tags)
        assert durable > 0
    finally:
        shutil.rmtree(d, ignore_errors=True)
