"""Review: `thinpool serve --tls require` under 1200 clients that fail or drop around the TLS upgrade.

Clients ask for an export in plaintext (refused: TLS required), send STARTTLS and vanish before the handshake,
send garbage instead of a ClientHello, vanish after their ClientHello, or complete the handshake and read (some
then write to a chunk a snapshot shares, leaving a copy pending, and drop). Pinned: the server's descriptors and
threads come back to what they were after a warm-up, its resident set grows by less than 32 MiB, acknowledged
writes read back from the next connection, and after SIGTERM the pool reads as the byte model and both real
checkers accept it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import need_tool, run_tool
from oracles import assert_thin_check
from review_helpers import proc_counts, settled_counts, stop_process

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "nbd"))
from nbd_client import RawClient  # noqa: E402

from thinpool.nbd import protocol as P  # noqa: E402
from thinpool.pool import Pool  # noqa: E402

CH = 64 << 10
DEV = 32 * CH
ROUNDS = 1200


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _TlsClient(RawClient):
    """RawClient whose socket is upgraded after NBD_OPT_STARTTLS."""

    def starttls(self) -> None:
        self.option(P.OPT_STARTTLS)
        _opt, rtype, _data = self.reply()
        assert rtype == P.REP_ACK, hex(rtype)

    def upgrade(self, ctx: ssl.SSLContext) -> None:
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")


@pytest.mark.external
def test_tls_serve_stays_bounded_under_failed_and_dropped_upgrades() -> None:
    need_tool("openssl", "thin_check")
    d = tempfile.mkdtemp(prefix="tpr3tls", dir="/tmp")
    try:
        run_tool("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out",
                 "cert.pem", "-days", "2", "-subj", "/CN=localhost", cwd=d, timeout=60)
        pool = os.path.join(d, "pool")
        old = random.Random(1).randbytes(DEV)
        with Pool.create(pool, data_size=128 * CH, chunk_size=CH) as p:
            p.create_thin(0, DEV, name="vol").write(0, old)
            p.create_snap(1, 0, name="snap")
        model = bytearray(old)
        sock = os.path.join(d, "t.sock")
        proc = subprocess.Popen([sys.executable, "-m", "thinpool_cli.serve_cmds", "serve", "--pool", pool,
                                 "--socket", sock, "--export", "vol", "--tls", "require", "--tls-cert",
                                 os.path.join(d, "cert.pem"), "--tls-key", os.path.join(d, "key.pem")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert line.startswith("serving "), (line, proc.stderr.read() if proc.poll() is not None else "")
        ctx = ssl.create_default_context(cafile=os.path.join(d, "cert.pem"))
        rng = random.Random(4)
        stages: dict[int, int] = {}

        def one(i: int) -> None:
            stage = i % 6
            stages[stage] = stages.get(stage, 0) + 1
            c = _TlsClient(sock, timeout=30)
            try:
                c.greeting()
                if stage == 0:  # plaintext GO: refused
                    c.option(P.OPT_GO, c.info_payload("vol"))
                    assert c.replies_until_final()[-1][1] == P.REP_ERR_TLS_REQD
                    return
                c.starttls()
                if stage == 1:  # gone before the handshake
                    return
                if stage == 2:  # garbage instead of a ClientHello
                    c.send(b"\x16\x03\x01\x00\x05hello, not TLS" * 4)
                    c.is_closed_by_server()
                    return
                if stage == 3:  # a ClientHello, then gone
                    raw = c.sock
                    obj = ssl.MemoryBIO(), ssl.MemoryBIO()
                    tls = ctx.wrap_bio(obj[0], obj[1], server_hostname="localhost")
                    try:
                        tls.do_handshake()
                    except ssl.SSLWantReadError:
                        pass
                    raw.sendall(obj[1].read())
                    return
                c.upgrade(ctx)
                c.go("vol")
                off = rng.randrange(0, DEV - 4096)
                err, got = c.read(off, 4096)
                assert err == 0 and got == bytes(model[off:off + 4096])
                if stage == 5:  # an acknowledged write into a shared chunk (copy pending), then gone
                    woff = rng.randrange(0, DEV // 4096) * 4096
                    data = rng.randbytes(4096)
                    assert c.write(woff, data) == 0
                    model[woff:woff + 4096] = data
            finally:
                _reset(c.sock)

        try:
            for i in range(60):
                one(i)
            time.sleep(0.5)
            fds0, threads0, rss0 = proc_counts(proc.pid)
            for i in range(60, 60 + ROUNDS):
                one(i)
            fds, threads, rss = settled_counts(proc.pid, fds0, threads0)
            print(f"tls serve: fds {fds0}->{fds}, threads {threads0}->{threads}, rss {rss0 >> 20}->{rss >> 20} MiB")
            assert fds <= fds0, f"descriptors {fds0} -> {fds}"
            assert threads <= threads0, f"threads {threads0} -> {threads}"
            assert rss - rss0 < 32 << 20, f"resident set {rss0 >> 20} -> {rss >> 20} MiB"
            assert min(stages.values()) >= ROUNDS // 6
        finally:
            _rc, _out, err = stop_process(proc)
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err[-2000:]
        with Pool.open(pool, readonly=True) as ro:
            assert ro.device(0).read(0, DEV) == bytes(model)
            assert ro.device(1).read(0, DEV) == old
        assert_thin_check(os.path.join(pool, "metadata"))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_client_gone_after_its_client_hello_leaves_no_connection_behind(tmp_path: Path) -> None:
    """Regression (found by this review): when the client vanished during the TLS handshake, asyncio's
    start_tls failed without calling the protocol's connection_lost, so the connection stayed in the server's
    set (a slot against max_connections, a handshake 'squatter' to evict) with its 256 KiB receive buffer,
    for ever: 150 such clients left 99 connections and 25 MiB behind."""
    need_tool("openssl")
    import gc

    from sparse_device import SparseDevice  # tests/nbd

    from thinpool.nbd import ServerOptions, ServerThread
    from thinpool.nbd.connection import _Connection
    from thinpool.nbd.tls import server_context

    run_tool("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "cert.pem",
             "-days", "2", "-subj", "/CN=localhost", cwd=str(tmp_path), timeout=60)
    opts = ServerOptions(tls=server_context(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")),
                         tls_mode="require")
    cctx = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    sock = tempfile.mktemp(prefix="tpr3tls", suffix=".sock", dir="/tmp")
    with ServerThread({"vol": SparseDevice(1 << 20)}, unix_path=sock, options=opts) as srv:
        for _ in range(150):
            c = _TlsClient(srv.addresses[0], timeout=10)
            c.greeting()
            c.starttls()
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = cctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
            with pytest.raises(ssl.SSLWantReadError):
                tls.do_handshake()
            c.send(outgoing.read())  # the ClientHello
            _reset(c.sock)
        deadline = time.monotonic() + 10
        while srv.server.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not srv.server.connections and not srv.server._handshaking
        assert srv.server.stats["evicted"] == 0
        gc.collect()
        assert not [o for o in gc.get_objects() if isinstance(o, _Connection)]
        with _TlsClient(srv.addresses[0], timeout=10) as c:  # and a real client is served
            c.greeting()
            c.starttls()
            c.upgrade(cctx)
            c.go("vol")
            assert c.read(0, 512) == (0, bytes(512))
