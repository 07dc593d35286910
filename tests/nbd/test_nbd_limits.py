"""The server under hostile clients: bounded memory, handshake deadline, connection cap, EMFILE, long requests.

Each finding of issue 14 is reproduced with a raw-socket client; memory is the server process's VmRSS from
/proc (the server runs in its own process for those), everything else uses an in-process ServerThread.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from nbd_client import Disconnected, RawClient
from sparse_device import SparseDevice

from thinpool.nbd import ServerOptions, ServerThread
from thinpool.nbd import protocol as P

HERE = Path(__file__).resolve().parent
MiB = 1 << 20


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="tplim", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class ServerProc:
    def __init__(self, sock: str, nofile: int | None = None, **opts) -> None:
        args = [sys.executable, str(HERE / "limits_server.py"), sock, json.dumps(opts)]
        if nofile:
            args.append(str(nofile))
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.sock = sock

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
        return err


def round_trip(path: str, name: str = "small", tag: int = 0x5A) -> None:
    with RawClient(path, timeout=10) as c:
        c.greeting()
        c.go(name)
        assert c.write(4096, bytes([tag]) * 512) == 0
        assert c.read(4096, 512) == (0, bytes([tag]) * 512)


def settle(proc: ServerProc, seconds: float = 1.5) -> int:
    """The server's peak-ish RSS over a short while (sampled)."""
    peak = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, proc.rss())
        time.sleep(0.05)
    return peak


def test_pipelined_huge_reads_keep_memory_bounded(sockdir):
    """150 pipelined 32 MiB READs in 4.2 KB, replies never read: the server stops reading (unbounded: 4.8 GB)."""
    srv = ServerProc(os.path.join(sockdir, "s"))
    try:
        base = srv.rss()
        c = RawClient(srv.sock, timeout=10)
        c.greeting()
        c.go("big")
        c.send(b"".join(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i, i * 32 * MiB, 32 * MiB)
                        for i in range(150)))
        peak = settle(srv)
        round_trip(srv.sock)  # others are still served meanwhile
        assert peak - base < 160 * MiB, (base, peak)
        # the flood still gets correct replies, in order of completion, once it reads
        for _ in range(3):
            _cookie, err, chunks = c.any_reply()
            assert err == 0 and len(chunks[0][2]) == 8 + 32 * MiB
        c.close()
        round_trip(srv.sock)
    finally:
        err = srv.stop()
    assert "Traceback" not in err, err


def test_write_headers_without_payload_allocate_nothing(sockdir):
    """60 connections each send a 28-byte WRITE header declaring 32 MiB: no 32 MiB buffer per connection."""
    srv = ServerProc(os.path.join(sockdir, "s"))
    clients = []
    try:
        base = srv.rss()
        for i in range(60):
            c = RawClient(srv.sock, timeout=10)
            c.greeting()
            c.go("big")
            c.request(P.CMD_WRITE, i * 32 * MiB, 32 * MiB, cookie=i)
            c.send(b"\xab" * 1000)
            clients.append(c)
        peak = settle(srv)
        round_trip(srv.sock)
        assert peak - base < 120 * MiB, (base, peak)  # unbounded: 60 x 64 MiB
        # a payload that does arrive is written whole
        clients[0].send(b"\xab" * (32 * MiB - 1000))
        assert clients[0].simple_or_chunks(expect_cookie=0)[0] == 0
        err, data = clients[0].read(0, 4096)
        assert err == 0 and data == b"\xab" * 4096
    finally:
        for c in clients:
            c.close()
        err = srv.stop()
    assert "Traceback" not in err, err


def test_idle_connections_are_closed_at_the_handshake_deadline(sockdir):
    opts = ServerOptions(handshake_timeout=0.5)
    with ServerThread({"small": SparseDevice(MiB)}, unix_path=os.path.join(sockdir, "s"), options=opts) as srv:
        idle = [RawClient(srv.addresses[0], timeout=10) for _ in range(5)]
        half = RawClient(srv.addresses[0], timeout=10)
        half.greeting()  # started, never finishes
        for c in [*idle, half]:
            data = b""
            try:
                while True:  # the greeting (if not read yet), then EOF
                    chunk = c.sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except ConnectionResetError:
                pass
            assert len(data) in (0, 18)
            c.close()
        assert srv.server.stats["handshake_timeouts"] == 6
        round_trip(srv.addresses[0])  # a client in transmission is never timed out: it outlives the deadline
        with RawClient(srv.addresses[0], timeout=10) as c:
            c.greeting()
            c.go("small")
            time.sleep(1.0)
            assert c.write(0, b"x" * 512) == 0


def test_connection_cap_evicts_handshake_squatters(sockdir):
    """1,100 idle sockets used to lock every real client out; now at most max_connections are held and the
    oldest one still in its handshake gives way to a new client."""
    opts = ServerOptions(max_connections=20, handshake_timeout=60)
    with ServerThread({"small": SparseDevice(MiB)}, unix_path=os.path.join(sockdir, "s"), options=opts) as srv:
        idle = []
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(srv.addresses[0])
            idle.append(s)
        time.sleep(0.3)
        assert len(srv.server.connections) <= 20
        for k in range(5):
            round_trip(srv.addresses[0], tag=k)
        assert srv.server.stats["evicted"] >= 150
        # established clients are never evicted
        with RawClient(srv.addresses[0], timeout=10) as keep:
            keep.greeting()
            keep.go("small")
            more = []
            for _ in range(50):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(srv.addresses[0])
                more.append(s)
            time.sleep(0.3)
            assert keep.write(0, b"k" * 512) == 0
            for s in more:
                s.close()
        for s in idle:
            s.close()


def test_emfile_backs_off_without_flooding_the_log(sockdir):
    """With the descriptor limit reached, the server pauses accepting (one log line per 10 s) instead of
    spinning; squatters in their handshake are evicted, so a real client still gets in."""
    srv = ServerProc(os.path.join(sockdir, "s"), nofile=48, max_connections=1000, handshake_timeout=60)
    socks = []
    try:
        for _ in range(150):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(srv.sock)
            except (BlockingIOError, OSError):
                pass
            socks.append(s)
        time.sleep(2.0)
        for k in range(3):
            round_trip(srv.sock, tag=k)
    finally:
        for s in socks:
            s.close()
        err = srv.stop()
    lines = [ln for ln in err.splitlines() if "accept failed" in ln]
    assert 1 <= len(lines) <= 3, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_long_requests_do_not_stall_other_clients(sockdir):
    """Pipelined 32 MiB READs (64 of them) used to stall everyone else for 25 s; the reads now run in a worker, a
    piece at a time, and another client's round trips finish while the flood is still being answered."""
    with ServerThread({"big": SparseDevice(4 << 30), "small": SparseDevice(MiB)},
                      unix_path=os.path.join(sockdir, "s")) as srv:
        flood = RawClient(srv.addresses[0], timeout=60)
        flood.greeting()
        flood.go("big")
        n = 24
        flood.send(b"".join(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i, i * 32 * MiB, 32 * MiB)
                            for i in range(n)))
        got = []

        def drain():
            for _ in range(n):
                got.append(flood.any_reply()[1])

        t = threading.Thread(target=drain)
        t.start()
        time.sleep(0.2)
        for k in range(10):
            round_trip(srv.addresses[0], tag=k)
        served_while_flooding = len(got) < n
        t.join(120)
        assert not t.is_alive()
        assert got == [0] * n
        assert served_while_flooding, "the small client waited for the whole flood"
        flood.close()
        assert srv.server.stats["offloaded"] >= n


def test_export_name_over_64k_disconnects(sockdir):
    with ServerThread({"small": SparseDevice(MiB)}, unix_path=os.path.join(sockdir, "s")) as srv:
        with RawClient(srv.addresses[0]) as c:
            c.greeting()
            c.send(P.S_OPTION.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, 70 * 1024) + b"a" * 70 * 1024)
            assert c.is_closed_by_server()
        round_trip(srv.addresses[0])


def test_disc_waits_for_requests_in_flight(sockdir):
    dev = SparseDevice(64 * MiB)
    dev.write(10 * MiB, b"\x77" * 4096)
    with ServerThread({"d": dev}, unix_path=os.path.join(sockdir, "s")) as srv:
        with RawClient(srv.addresses[0], timeout=30) as c:
            c.greeting()
            c.go("d")
            c.request(P.CMD_READ, 0, 16 * MiB, cookie=5)
            c.request(P.CMD_DISC)
            err, chunks = c.simple_or_chunks(expect_cookie=5)
            assert err == 0 and chunks[0][2][8 + 10 * MiB:8 + 10 * MiB + 4096] == b"\x77" * 4096
            assert c.is_closed_by_server()


def test_unix_socket_mode_and_no_takeover(sockdir):
    from thinpool.errors import AddressInUse, ListenError
    from thinpool.nbd.listen import bind_unix

    path = os.path.join(sockdir, "s")
    old = os.umask(0)
    try:
        with ServerThread({"small": SparseDevice(MiB)}, unix_path=path, options=ServerOptions(socket_mode=0o660)):
            assert os.stat(path).st_mode & 0o777 == 0o660
            with pytest.raises(AddressInUse):
                bind_unix(path)
            round_trip(path)  # the live server kept its socket
    finally:
        os.umask(old)
    # a stale socket (no server) is replaced; a regular file never is
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    bind_unix(path).close()
    plain = os.path.join(sockdir, "f")
    Path(plain).write_text("keep")
    with pytest.raises(ListenError):
        bind_unix(plain)
    assert Path(plain).read_text() == "keep"
    with pytest.raises(ListenError):
        bind_unix("/nonexistent-dir/x.sock")


def test_disconnected_flood_does_not_leak(sockdir):
    """Clients that vanish with requests in flight or payloads half sent leave nothing behind."""
    with ServerThread({"big": SparseDevice(4 << 30), "small": SparseDevice(MiB)},
                      unix_path=os.path.join(sockdir, "s")) as srv:
        for _ in range(10):
            c = RawClient(srv.addresses[0])
            c.greeting()
            c.go("big")
            c.request(P.CMD_READ, 0, 32 * MiB, cookie=1)
            c.request(P.CMD_WRITE, 0, 32 * MiB, cookie=2)
            c.send(b"z" * 4096)
            c.close()
        deadline = time.monotonic() + 10
        while srv.server.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not srv.server.connections
        round_trip(srv.addresses[0])
        with pytest.raises(Disconnected):
            with RawClient(srv.addresses[0]) as c:
                c.greeting(client_flags=0x80)
                c.recv_exact(1)
