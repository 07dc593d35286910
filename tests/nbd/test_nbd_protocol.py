"""NBD protocol conformance and robustness, with a hand-driven raw client (no external tools needed)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nbd_client import Disconnected, RawClient
from sparse_device import SparseDevice

from thinpool.errors import NoDataSpace
from thinpool.io.device import MemoryDevice
from thinpool.nbd import ServerThread, allocation_extents
from thinpool.nbd import protocol as P

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


class FailingDevice(SparseDevice):
    """Raises on writes in a chosen range: a device bug / a full pool."""

    def write(self, offset, data):
        if offset >= 512 * 1024:
            raise NoDataSpace()
        if offset >= 256 * 1024:
            raise RuntimeError("device bug")
        super().write(offset, data)


class ReadOnlyDevice(MemoryDevice):
    readonly = True


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="tpnbd", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(sockdir):
    devs = {"a": SparseDevice(8 << 20), "b": SparseDevice(1 << 20), "fail": FailingDevice(1 << 20),
            "ro": ReadOnlyDevice(1 << 20)}
    srv = ServerThread(devs, unix_path=os.path.join(sockdir, "s"))
    srv.devs = devs
    with srv:
        yield srv


def connect(server) -> RawClient:
    return RawClient(server.addresses[0])


def healthy(server, name="b") -> bool:
    """Another client can still do a full write/read round trip."""
    with connect(server) as c:
        c.greeting()
        c.go(name)
        assert c.write(4096, b"\x5a" * 512) == 0
        err, data = c.read(4096, 512)
        return err == 0 and data == b"\x5a" * 512


# --- handshake ------------------------------------------------------------------------------------------------
def test_greeting_flags(server):
    with connect(server) as c:
        assert c.greeting() == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES


def test_unknown_client_flags_disconnect(server):
    with connect(server) as c:
        c.greeting(client_flags=P.FLAG_C_FIXED_NEWSTYLE | 0x80)
        assert c.is_closed_by_server()
    assert healthy(server)


def test_bad_option_magic_disconnects(server):
    with connect(server) as c:
        c.greeting()
        c.option(P.OPT_LIST, magic=0x1122334455667788)
        assert c.is_closed_by_server()
    assert healthy(server)


def test_unknown_option_is_unsupported_and_session_continues(server):
    with connect(server) as c:
        c.greeting()
        c.option(200, b"some data")
        opt, rtype, _ = c.reply()
        assert (opt, rtype) == (200, P.REP_ERR_UNSUP)
        c.option(P.OPT_STARTTLS)
        assert c.reply()[1] == P.REP_ERR_UNSUP
        size, flags = c.go("a")
        assert size == 8 << 20
        assert flags & P.FLAG_SEND_TRIM and flags & P.FLAG_SEND_FUA and flags & P.FLAG_SEND_WRITE_ZEROES


def test_oversized_option_is_refused_too_big(server):
    with connect(server) as c:
        c.greeting()
        c.option(P.OPT_LIST_META_CONTEXT, b"\0" * (200 * 1024))
        assert c.reply()[1] == P.REP_ERR_TOO_BIG
        c.go("a")


def test_list_exports(server):
    with connect(server) as c:
        c.greeting()
        c.option(P.OPT_LIST)
        reps = c.replies_until_final()
        names = [d[4:4 + struct.unpack(">I", d[:4])[0]].decode() for _o, t, d in reps if t == P.REP_SERVER]
        assert names == ["a", "b", "fail", "ro"] and reps[-1][1] == P.REP_ACK
        c.option(P.OPT_LIST, b"junk")
        assert c.reply()[1] == P.REP_ERR_INVALID


def test_info_then_go(server):
    with connect(server) as c:
        c.greeting()
        c.option(P.OPT_INFO, c.info_payload("b", (P.INFO_NAME, P.INFO_BLOCK_SIZE)))
        reps = c.replies_until_final()
        infos = {struct.unpack(">H", d[:2])[0]: d for _o, t, d in reps if t == P.REP_INFO}
        assert P.S_INFO_EXPORT.unpack(infos[P.INFO_EXPORT])[1] == 1 << 20
        assert infos[P.INFO_NAME][2:] == b"b"
        _, mn, pref, mx = P.S_INFO_BLOCK_SIZE.unpack(infos[P.INFO_BLOCK_SIZE])
        assert mn == 1 and pref == 4096 and mx == P.MAX_PAYLOAD
        # INFO stays in negotiation: GO to another export still works
        assert c.go("a")[0] == 8 << 20


def test_go_unknown_export_and_malformed(server):
    with connect(server) as c:
        c.greeting()
        c.option(P.OPT_GO, c.info_payload("nope"))
        assert c.reply()[1] == P.REP_ERR_UNKNOWN
        c.option(P.OPT_GO, b"\0\0\0\x09ab")  # name length runs past the payload
        assert c.reply()[1] == P.REP_ERR_INVALID
        c.go("b")


def test_export_name_unknown_disconnects_known_works(server):
    with connect(server) as c:
        c.greeting()
        c.option(P.OPT_EXPORT_NAME, b"nope")
        assert c.is_closed_by_server()
    with connect(server) as c:
        c.greeting(client_flags=P.FLAG_C_FIXED_NEWSTYLE)  # without NO_ZEROES: 124 zero bytes follow
        c.option(P.OPT_EXPORT_NAME, b"b")
        size, flags = P.S_EXPORT_NAME_REPLY.unpack(c.recv_exact(10))
        assert size == 1 << 20 and flags & P.FLAG_HAS_FLAGS
        assert c.recv_exact(124) == bytes(124)
        assert c.write(0, b"hello") == 0  # simple replies
        assert c.read(0, 5) == (0, b"hello")


def test_abort_acks_and_closes(server):
    with connect(server) as c:
        c.greeting()
        c.option(P.OPT_ABORT)
        assert c.reply()[1] == P.REP_ACK
        assert c.is_closed_by_server()


def test_meta_contexts(server):
    with connect(server) as c:
        c.greeting()
        c.option(P.OPT_SET_META_CONTEXT, c.meta_payload("a", (P.META_BASE_ALLOCATION,)))
        assert c.reply()[1] == P.REP_ERR_INVALID  # structured replies first
        c.option(P.OPT_LIST_META_CONTEXT, c.meta_payload("a", ()))
        reps = c.replies_until_final()
        assert [d[4:] for _o, t, d in reps if t == P.REP_META_CONTEXT] == [b"base:allocation"]
        c.option(P.OPT_STRUCTURED_REPLY)
        assert c.reply()[1] == P.REP_ACK
        c.option(P.OPT_SET_META_CONTEXT, c.meta_payload("a", ("qemu:dirty-bitmap:x", P.META_BASE_ALLOCATION)))
        reps = c.replies_until_final()
        ctx = [(struct.unpack(">I", d[:4])[0], d[4:]) for _o, t, d in reps if t == P.REP_META_CONTEXT]
        assert ctx == [(1, b"base:allocation")]
        c.option(P.OPT_SET_META_CONTEXT, c.meta_payload("zz", (P.META_BASE_ALLOCATION,)))
        assert c.reply()[1] == P.REP_ERR_UNKNOWN
        c.option(P.OPT_SET_META_CONTEXT, b"\0\0\0\x01a\0\0\0\x05\0\0\0\x20x")  # query length past the end
        assert c.reply()[1] == P.REP_ERR_INVALID


# --- transmission ---------------------------------------------------------------------------------------------
def test_read_write_fua_flush_trim_zero(server):
    dev = server.devs["a"]
    with connect(server) as c:
        c.greeting()
        c.go("a")
        data = os.urandom(200_000)
        assert c.write(100_000, data) == 0
        assert c.read(100_000, len(data)) == (0, data)
        flushes = dev.flushes
        assert c.write(0, b"f" * 10, flags=P.CMD_FLAG_FUA) == 0
        assert dev.flushes == flushes + 1
        assert c.command(P.CMD_FLUSH) == 0
        assert dev.flushes == flushes + 2
        assert c.command(P.CMD_TRIM, 0, 4 << 20) == 0
        assert dev.discards == 1 and dev.mapped_ranges() == []
        assert c.read(100_000, 100) == (0, bytes(100))
        assert c.write(0, b"z" * 65536) == 0
        assert c.command(P.CMD_WRITE_ZEROES, 0, 65536) == 0
        assert dev.mapped_ranges() == []  # zeroing may punch holes
        assert c.command(P.CMD_WRITE_ZEROES, 0, 65536, flags=P.CMD_FLAG_NO_HOLE) == 0
        assert dev.mapped_ranges() == [(0, 65536)]  # NO_HOLE: allocated zeroes
        assert c.read(0, 65536) == (0, bytes(65536))
        assert c.read(5, 0)[0] == 0


def test_block_status(server):
    dev = server.devs["a"]
    dev.write(64 * 1024, b"x" * 100)
    dev.write(1 << 20, b"y" * (128 * 1024))
    with connect(server) as c:
        c.greeting()
        c.go("a")
        err, ext = c.block_status(0, 8 << 20)
        assert err == 0
        assert ext == [(65536, 3), (65536, 0), ((1 << 20) - 131072, 3), (131072, 0), ((8 << 20) - (1 << 20) - 131072, 3)]
        err, ext = c.block_status(70_000, 1 << 20, flags=P.CMD_FLAG_REQ_ONE)
        assert (err, ext) == (0, [(131072 - 70_000, 0)])
        assert c.block_status(0, 0)[0] == P.EINVAL
        assert c.block_status(8 << 20, 1)[0] == P.EINVAL


def test_meta_context_is_bound_to_the_export_and_replaced(server):
    with connect(server) as c:
        c.greeting()
        c.option(P.OPT_STRUCTURED_REPLY)
        assert c.reply()[1] == P.REP_ACK
        c.option(P.OPT_SET_META_CONTEXT, c.meta_payload("a", (P.META_BASE_ALLOCATION,)))
        assert c.replies_until_final()[-1][1] == P.REP_ACK
        c.structured = True
        c.option(P.OPT_GO, c.info_payload("b"))
        assert c.replies_until_final()[-1][1] == P.REP_ACK
        assert c.block_status(0, 4096)[0] == P.EINVAL  # contexts were selected for another export
    with connect(server) as c:
        c.greeting()
        c.option(P.OPT_STRUCTURED_REPLY)
        assert c.reply()[1] == P.REP_ACK
        c.option(P.OPT_SET_META_CONTEXT, c.meta_payload("a", (P.META_BASE_ALLOCATION,)))
        assert c.replies_until_final()[-1][1] == P.REP_ACK
        c.option(P.OPT_SET_META_CONTEXT, c.meta_payload("zz", (P.META_BASE_ALLOCATION,)))
        assert c.reply()[1] == P.REP_ERR_UNKNOWN  # a failed SET still clears the selection
        c.go("a", structured=False)
        c.structured = True
        assert c.block_status(0, 4096)[0] == P.EINVAL


def test_df_flag_only_with_structured_replies(server):
    with connect(server) as c:
        c.greeting()
        _, flags = c.go("a", structured=False)
        assert not flags & P.FLAG_SEND_DF
        c.request(P.CMD_READ, 0, 4, flags=P.CMD_FLAG_DF, cookie=5)
        assert c.simple_or_chunks(5)[0] == P.EINVAL
    with connect(server) as c:
        c.greeting()
        _, flags = c.go("a")
        assert flags & P.FLAG_SEND_DF


def test_plain_newstyle_client_is_served(server):
    with connect(server) as c:
        c.greeting(client_flags=0)  # not even FIXED_NEWSTYLE: only EXPORT_NAME, with the 124 zero bytes
        c.option(P.OPT_EXPORT_NAME, b"b")
        size, _flags = P.S_EXPORT_NAME_REPLY.unpack(c.recv_exact(10))
        assert size == 1 << 20 and c.recv_exact(124) == bytes(124)
        assert c.read(0, 4) == (0, bytes(4))


def test_block_status_needs_meta_context(server):
    with connect(server) as c:
        c.greeting()
        c.go("a", meta=False)
        assert c.block_status(0, 4096)[0] == P.EINVAL
        assert c.write(0, b"ok") == 0  # still serving


def test_requests_past_the_end(server):
    with connect(server) as c:
        c.greeting()
        size, _ = c.go("b")
        assert c.write(size - 10, b"x" * 20) == P.ENOSPC
        assert c.read(size - 10, 20)[0] == P.EINVAL
        assert c.read(size + (1 << 40), 1)[0] == P.EINVAL
        assert c.command(P.CMD_TRIM, size, 1) == P.EINVAL
        assert c.command(P.CMD_WRITE_ZEROES, size - 1, 2) == P.ENOSPC
        assert c.write(size - 20, b"x" * 20) == 0  # the connection is still usable
        assert server.devs["b"].mapped_ranges() == [(size - 65536, 65536)]


def test_unknown_command_and_bad_flags(server):
    with connect(server) as c:
        c.greeting()
        c.go("b")
        assert c.command(42) == P.EINVAL
        assert c.command(P.CMD_CACHE, 0, 10) == 0  # advisory, accepted
        assert c.command(P.CMD_CACHE, 1 << 20, 10) == P.EINVAL
        assert c.command(P.CMD_FLUSH, flags=P.CMD_FLAG_REQ_ONE) == P.EINVAL
        assert c.command(P.CMD_WRITE_ZEROES, 0, 10, flags=P.CMD_FLAG_FAST_ZERO) == P.EINVAL  # not advertised
        assert c.command(P.CMD_FLUSH, flags=P.CMD_FLAG_FUA) == 0  # FUA is valid on every command
        c.request(P.CMD_READ, 0, 3, flags=P.CMD_FLAG_FUA | P.CMD_FLAG_DF, cookie=77)
        err, chunks = c.simple_or_chunks(77)
        assert err == 0 and chunks[0][2] == struct.pack(">Q", 0) + bytes(3)
        assert c.write(0, b"abc", flags=1 << 9) == P.EINVAL  # payload consumed, stream stays in sync
        assert c.read(0, 3) == (0, bytes(3))


def test_oversized_write_is_skipped_and_refused(server):
    with connect(server) as c:
        c.greeting()
        c.go("a")
        big = P.MAX_PAYLOAD + 4096
        c.request(P.CMD_WRITE, 0, big, cookie=5)
        c.send(b"\x01" * big)
        assert c.simple_or_chunks(5)[0] == P.EINVAL
        assert c.read(0, 16) == (0, bytes(16))
        assert server.devs["a"].mapped_ranges() == []


def test_oversized_read_is_refused(server):
    with connect(server) as c:
        c.greeting()
        c.go("a")
        assert c.read(0, P.MAX_PAYLOAD + 1)[0] == P.EINVAL  # larger than the advertised maximum block size


def test_bad_request_magic_disconnects_others_unaffected(server):
    with connect(server) as c:
        c.greeting()
        c.go("a")
        c.request(P.CMD_READ, 0, 10, magic=0xDEADBEEF)
        assert c.is_closed_by_server()
    assert healthy(server, "a")


def test_disconnect_mid_request_leaves_device_untouched(server):
    dev = server.devs["a"]
    with connect(server) as c:
        c.greeting()
        c.go("a")
        c.request(P.CMD_WRITE, 0, 65536, cookie=3)
        c.send(b"\xee" * 1000)  # then vanish
    with connect(server) as c:
        c.greeting()
        c.go("a")
        c.send(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 1, 0, 4096)[:10])  # half a header
    with connect(server) as c:
        c.greeting()
        c.send(P.S_OPTION.pack(P.IHAVEOPT, P.OPT_GO, 10) + b"\0\0")  # half an option
    assert healthy(server, "b")
    assert dev.read(0, 1000) == bytes(1000)
    assert not any(s < 65536 for s, _n in dev.mapped_ranges())


def test_device_errors_become_nbd_errors(server):
    with connect(server) as c:
        c.greeting()
        c.go("fail")
        assert c.write(0, b"fine") == 0
        assert c.write(300 * 1024, b"bug") == P.EIO
        assert c.write(600 * 1024, b"full") == P.ENOSPC
        assert c.read(0, 4) == (0, b"fine")
    assert healthy(server)


def test_read_only_export(server):
    with connect(server) as c:
        c.greeting()
        _, flags = c.go("ro")
        assert flags & P.FLAG_READ_ONLY and not flags & P.FLAG_SEND_TRIM
        assert c.write(0, b"x") == P.EPERM
        assert c.command(P.CMD_TRIM, 0, 10) == P.EPERM
        assert c.read(0, 4) == (0, bytes(4))


def test_pipelined_requests_and_disc(server):
    dev = server.devs["a"]
    with connect(server) as c:
        c.greeting()
        c.go("a")
        reqs = b"".join(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 100 + i, i * 4096, 4096) + bytes([i]) * 4096
                        for i in range(64))
        c.send(reqs)
        cookies = set()
        for _ in range(64):
            (magic, err, cookie) = struct.unpack(">IIQ", c.recv_exact(16))
            assert magic == P.SIMPLE_REPLY_MAGIC and err == 0
            cookies.add(cookie)
        assert cookies == set(range(100, 164))
        c.request(P.CMD_DISC)
        assert c.is_closed_by_server()
    assert all(dev.read(i * 4096, 4096) == bytes([i]) * 4096 for i in range(64))


def test_many_concurrent_clients(server):
    errors = []

    def worker(k):
        try:
            with connect(server) as c:
                c.greeting()
                c.go("a")
                for j in range(20):
                    off = (k * 20 + j) * 8192
                    blob = bytes([k, j]) * 2048
                    assert c.write(off, blob) == 0
                    assert c.read(off, 4096) == (0, blob)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors


def test_default_export_is_first(server):
    with connect(server) as c:
        c.greeting()
        assert c.go("")[0] == 8 << 20


def test_server_stop_calls_shutdown_and_closes_clients(sockdir):
    calls = []
    srv = ServerThread({"x": SparseDevice(1 << 20)}, unix_path=os.path.join(sockdir, "s"),
                       on_shutdown=lambda: calls.append("commit"))
    srv.start()
    c = connect(srv)
    c.greeting()
    c.go("x")
    srv.stop()
    assert calls == ["commit"]
    with pytest.raises((Disconnected, OSError)):
        c.write(0, b"late")
        c.write(0, b"late")
    c.close()
    assert not os.path.exists(os.path.join(sockdir, "s"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_signal_commits(sockdir, sig):
    """serve() in its own process: a signal shuts it down cleanly and calls on_shutdown after the last write."""
    sock = os.path.join(sockdir, "s")
    marker = os.path.join(sockdir, "committed")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        from sparse_device import SparseDevice
        from thinpool.nbd import serve
        dev = SparseDevice(1 << 20)
        def commit():
            open({marker!r}, "w").write(repr(dev.mapped_ranges()))
        serve({{"x": dev}}, unix_path={sock!r}, on_shutdown=commit, ready=lambda s: print("ready", flush=True))
        print("exited", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with RawClient(sock) as c:
            c.greeting()
            c.go("x")
            assert c.write(65536, b"data") == 0
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "exited" in out
        assert Path(marker).read_text() == "[(65536, 65536)]"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_tcp_loopback(sockdir):
    dev = SparseDevice(1 << 20)
    with ServerThread({"t": dev}, host="127.0.0.1", port=0) as srv:
        host, port = srv.addresses[0]
        assert host == "127.0.0.1" and port > 0
        import socket as _s
        c = RawClient.__new__(RawClient)
        c.sock = _s.create_connection((host, port), timeout=5)
        c.structured = False
        with c:
            c.greeting()
            c.go("t")
            assert c.write(10, b"tcp") == 0
        assert srv.uri("t") == f"nbd://127.0.0.1:{port}/t"
    assert dev.read(10, 3) == b"tcp"


# --- pure functions -------------------------------------------------------------------------------------------
@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 200)), max_size=12),
       st.integers(0, 1100), st.integers(1, 600))
def test_allocation_extents_cover_exactly(ranges, offset, length):
    ext = allocation_extents(ranges, offset, length)
    assert sum(n for n, _ in ext) == length
    assert all(n > 0 for n, _ in ext)
    assert all(a[1] != b[1] for a, b in zip(ext, ext[1:]))
    pos = offset
    for n, flags in ext:
        for b in (pos, pos + n - 1):
            mapped = any(s <= b < s + m for s, m in ranges)
            assert mapped == (flags == 0)
        pos += n


# --- fuzzing: random bytes in either phase never hurt the server ---------------------------------------------
@pytest.fixture(scope="module")
def fuzz_server():
    d = tempfile.mkdtemp(prefix="tpnbdz", dir="/tmp")
    devs = {"a": SparseDevice(1 << 20), "b": SparseDevice(1 << 20)}
    srv = ServerThread(devs, unix_path=os.path.join(d, "s"))
    srv.devs = devs
    with srv:
        yield srv
    shutil.rmtree(d, ignore_errors=True)


def _garbage_session(server, prefix_go: bool, junk: bytes) -> None:
    with connect(server) as c:
        c.greeting()
        if prefix_go:
            c.go("a")
        c.sock.settimeout(2)  # what the junk gets back is not asserted: bounded (the handshake above is not)
        try:
            c.send(junk)
            c.sock.shutdown(socket.SHUT_WR)
            while c.sock.recv(65536):
                pass
        except (TimeoutError, OSError):
            pass


@given(st.booleans(), st.binary(min_size=1, max_size=600))
def test_fuzz_garbage_never_hurts(fuzz_server, prefix_go, junk):
    _garbage_session(fuzz_server, prefix_go, junk)
    assert healthy(fuzz_server, "b")


@given(st.lists(st.tuples(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 99]), st.integers(0, 0xFFFF),
                          st.integers(0, (1 << 20) + 10), st.integers(0, 70_000)), min_size=1, max_size=6))
def test_fuzz_wellformed_requests_get_replies(fuzz_server, reqs):
    """Syntactically valid requests with arbitrary commands/flags/ranges: every one gets exactly one reply
    (or DISC ends the session), in order, and the server stays healthy."""
    with connect(fuzz_server) as c:
        c.greeting()
        c.go("a")
        for i, (cmd, flags, off, length) in enumerate(reqs):
            payload = bytes(length) if cmd == P.CMD_WRITE else b""
            c.request(cmd, off, length, flags=flags, cookie=1000 + i, payload=payload)
            if cmd == P.CMD_DISC:
                assert c.is_closed_by_server()
                break
            if cmd == P.CMD_READ:
                (magic,) = struct.unpack(">I", c.recv_exact(4))
                assert magic == P.STRUCTURED_REPLY_MAGIC
                while True:
                    f, rtype, cookie, n = struct.unpack(">HHQI", c.recv_exact(16))
                    assert cookie == 1000 + i
                    c.recv_exact(n)
                    if f & P.REPLY_FLAG_DONE:
                        break
                    assert struct.unpack(">I", c.recv_exact(4))[0] == P.STRUCTURED_REPLY_MAGIC
            else:
                c.simple_or_chunks(1000 + i)
    assert healthy(fuzz_server, "b")


def test_short_read_from_device_is_an_error(sockdir):
    class Short(SparseDevice):
        def read(self, offset, length):
            return super().read(offset, length)[:-1]

    with ServerThread({"s": Short(1 << 20)}, unix_path=os.path.join(sockdir, "s")) as srv:
        with connect(srv) as c:
            c.greeting()
            c.go("s")
            assert c.read(0, 100)[0] == P.EIO
        with connect(srv) as c:
            c.greeting()
            c.go("s", structured=False)
            assert c.read(0, 100)[0] == P.EIO
            assert c.write(0, b"ok") == 0
