"""Review: `thinpool serve` under 2100 clients that connect and drop at every stage of a session.

The server process runs over a real pool whose device 0 is shared with a snapshot, so the writes the clients get
acknowledged leave copy-on-write copies pending. Clients vanish before the greeting, after it, mid-option,
after GO, with a request's payload half sent, with a read's reply unread, after an acknowledged write (no
flush), and some end properly. Pinned:

- clients that get error replies (an unknown export, a read past the end, a write to the read-only snapshot
  export, an unknown command) or break the framing (a bad request magic) change nothing either;
- the server stays bounded: its descriptors and threads come back to what they were after a warm-up, and its
  resident set grows by less than 32 MiB;
- a write whose payload never fully arrived changes nothing; an acknowledged write reads back from the next
  connection (its pending copy completed), the snapshot keeps its bytes;
- SIGTERM commits; the pool then reads as the byte model and both real checkers accept the metadata.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import need_tool
from oracles import assert_thin_check
from review_helpers import proc_counts, settled_counts, stop_process

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "nbd"))
from nbd_client import RawClient  # noqa: E402

from thinpool.nbd import protocol as P  # noqa: E402
from thinpool.pool import Pool  # noqa: E402

CH = 64 << 10
DEV = 64 * CH  # 4 MiB
ROUNDS = 2100
SECT = 512


class _Server:
    def __init__(self, pool_path: str, sock: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "thinpool_cli.serve_cmds", "serve", "--socket", sock, "--export", "0",
             "--export", "snap", "--max-connections", "64"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "THINPOOL_POOL": pool_path})
        for _ in range(2):
            line = self.proc.stdout.readline()
            if not line.startswith("serving "):
                self.proc.kill()
                raise AssertionError(f"serve did not start: {line!r} {self.proc.stderr.read()}")

    def stop(self) -> tuple[int, str, str]:
        return stop_process(self.proc)


def _drop(c: RawClient) -> None:
    """Vanish with a reset (SO_LINGER 0): nothing flushed, no FIN handshake."""
    try:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    c.close()


class _Flood:
    def __init__(self, sock: str, model: bytearray, old: bytes) -> None:
        self.sock = sock
        self.model = model
        self.old = old
        self.stages: dict[str, int] = {}

    def one(self, i: int, rng: random.Random) -> None:
        stage = i % 15
        name = ["connect", "greeting", "flags", "half option", "after go", "half payload", "unread reply",
                "acked write", "proper", "snapshot read", "unknown export", "read out of range",
                "write to the read-only snapshot", "unknown command", "bad request magic"][stage]
        self.stages[name] = self.stages.get(name, 0) + 1
        c = RawClient(self.sock, timeout=30)
        try:
            if stage == 0:
                return
            if stage == 1:
                c.recv_exact(18)
                return
            c.greeting()
            if stage == 2:
                return
            if stage == 3:
                c.send(P.S_OPTION.pack(P.IHAVEOPT, P.OPT_GO, 64)[:10])
                return
            if stage == 10:  # GO to an export that does not exist: an error reply, then the client leaves
                c.option(P.OPT_GO, c.info_payload("no-such-export"))
                assert c.replies_until_final()[-1][1] & P.REP_FLAG_ERROR
                return
            c.go("snap" if stage in (9, 12) else "0")
            if stage == 4:
                return
            if stage == 11:
                err, _ = c.read(DEV - 512, 4096)
                assert err != 0
                return
            if stage == 12:
                assert c.write(0, b"w" * 4096) != 0
                return
            if stage == 13:
                assert c.command(99) != 0
                return
            if stage == 14:  # the server drops a client that breaks the framing
                c.request(P.CMD_READ, 0, 512, magic=0x12345678)
                assert c.is_closed_by_server()
                return
            if stage == 9:
                off = rng.randrange(0, DEV - CH, SECT)
                err, got = c.read(off, CH)
                assert err == 0 and got == self.old[off:off + CH], "the snapshot changed"
                return
            # sector-aligned writes into chunks the snapshot shares: deferred copies
            off = rng.randrange(0, DEV // SECT - 16) * SECT
            n = rng.choice([1, 8, 16]) * SECT
            data = rng.randbytes(n)
            if stage == 5:  # the header and half the payload: the write must not happen
                c.request(P.CMD_WRITE, off, n, cookie=5, payload=data[:n // 2])
                return
            if stage == 6:  # a read whose reply is never read
                c.request(P.CMD_READ, rng.randrange(0, DEV - CH), CH, cookie=6)
                return
            assert c.write(off, data, cookie=7) == 0
            self.model[off:off + n] = data
            if stage == 7:
                return
            err, got = c.read(max(0, off - 4096), min(DEV - max(0, off - 4096), n + 8192))
            lo = max(0, off - 4096)
            assert err == 0 and got == bytes(self.model[lo:lo + len(got)])
            if rng.random() < 0.3:
                assert c.command(P.CMD_FLUSH) == 0
            c.request(P.CMD_DISC)
        finally:
            _drop(c)

    def verify(self) -> None:
        with RawClient(self.sock, timeout=60) as c:
            c.greeting()
            c.go("0")
            for off in range(0, DEV, 1 << 20):
                err, got = c.read(off, 1 << 20)
                assert err == 0
                if got != bytes(self.model[off:off + (1 << 20)]):
                    bad = next(j for j in range(len(got)) if got[j] != self.model[off + j])
                    raise AssertionError(f"device 0 byte {off + bad} differs from the model")
            c.request(P.CMD_DISC)


@pytest.mark.external
def test_serve_stays_bounded_under_2100_dropped_clients() -> None:
    need_tool("thin_check")
    d = tempfile.mkdtemp(prefix="tpr3flood", dir="/tmp")
    try:
        pool_path = os.path.join(d, "pool")
        old = random.Random(3).randbytes(DEV)
        with Pool.create(pool_path, data_size=256 * CH, chunk_size=CH) as pool:
            pool.create_thin(0, DEV).write(0, old)
            pool.create_snap(1, 0, name="snap")
        model = bytearray(old)
        sock = os.path.join(d, "s.sock")
        srv = _Server(pool_path, sock)
        flood = _Flood(sock, model, old)
        rng = random.Random(7)
        try:
            pid = srv.proc.pid
            for i in range(100):  # warm-up: every stage once at least, buffers and caches in place
                flood.one(i, rng)
            flood.verify()
            time.sleep(0.5)
            fds0, threads0, rss0 = proc_counts(pid)
            peak_fds = fds0
            for i in range(100, 100 + ROUNDS):
                flood.one(i, rng)
                if i % 97 == 0:
                    peak_fds = max(peak_fds, proc_counts(pid)[0])
                if i % 500 == 0:
                    flood.verify()
            flood.verify()
            fds, threads, rss = settled_counts(pid, fds0, threads0)
            assert fds <= fds0, f"descriptors {fds0} -> {fds} after {ROUNDS} dropped clients"
            assert threads <= threads0, f"threads {threads0} -> {threads}"
            assert rss - rss0 < 32 << 20, f"resident set {rss0 >> 20} -> {rss >> 20} MiB"
            assert peak_fds < fds0 + 70  # at most the connection cap in flight
            assert srv.proc.poll() is None
            print(f"fds {fds0}->{fds} (peak {peak_fds}), threads {threads0}->{threads}, "
                  f"rss {rss0 >> 20}->{rss >> 20} MiB", flood.stages)
        finally:
            rc, out, err = srv.stop()
        assert rc == 0, err
        assert "Traceback" not in err, err
        assert len(flood.stages) == 15 and min(flood.stages.values()) >= ROUNDS // 15
        with Pool.open(pool_path, readonly=True) as ro:
            assert ro.device(0).read(0, DEV) == bytes(model)
            assert ro.device(1).read(0, DEV) == old
        assert_thin_check(os.path.join(pool_path, "metadata"))
    finally:
        shutil.rmtree(d, ignore_errors=True)

