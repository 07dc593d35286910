"""Read replies built in reused buffers (issue 15): every reply carries exactly its own bytes, whether the socket
took earlier replies at once (buffers reused) or was backlogged (replies queued), and a failed read leaves the
buffers intact. The device is a real thin device (its readinto is the path under test)."""

from __future__ import annotations

import os
import random
import shutil
import struct
import tempfile

import pytest
from nbd_client import RawClient

from thinpool.errors import StoreIOError
from thinpool.nbd import ServerThread
from thinpool.nbd import protocol as P
from thinpool.pool import Pool

MiB = 1 << 20
SIZE = 24 * MiB


class FailingReads:
    """A thin device whose readinto fails inside [8 MiB, 9 MiB): an I/O error in the middle of a reply."""

    def __init__(self, dev) -> None:
        self.dev = dev

    def __getattr__(self, name):
        return getattr(self.dev, name)

    def readinto(self, offset, buf):
        if offset < 9 * MiB and offset + len(buf) > 8 * MiB:
            raise StoreIOError(what="data", op="read", reason="injected")
        return self.dev.readinto(offset, buf)


@pytest.fixture(scope="module")
def served():
    d = tempfile.mkdtemp(prefix="tpnbdbuf", dir="/tmp")
    pool = Pool.create(os.path.join(d, "pool"), data_size=SIZE + 8 * MiB)
    try:
        pool.create_thin(0, SIZE)
        dev = pool.device(0)
        content = bytearray(os.urandom(SIZE))
        content[4 * MiB:6 * MiB] = bytes(2 * MiB)  # a hole, never written: read as zeros
        dev.write(0, memoryview(content)[:4 * MiB])
        dev.write(6 * MiB, memoryview(content)[6 * MiB:])
        with ServerThread({"0": FailingReads(dev)}, unix_path=os.path.join(d, "s")) as srv:
            yield srv, bytes(content)
    finally:
        pool.close()
        shutil.rmtree(d, ignore_errors=True)


def connect(srv) -> RawClient:
    c = RawClient(srv.addresses[0], timeout=30)
    c.greeting()
    c.go("0")
    return c


def data_of(chunks) -> tuple[int, bytes]:
    (rtype, _flags, data), = chunks
    assert rtype == P.REPLY_TYPE_OFFSET_DATA
    return struct.unpack(">Q", data[:8])[0], data[8:]


def test_one_at_a_time_buffers_reused_across_sizes(served) -> None:
    srv, content = served
    rng = random.Random(1)
    with connect(srv) as c:
        for i in range(60):
            length = rng.choice([64 * 1024, 65 * 1024, MiB, MiB + 4096, 3 * MiB, 4 * MiB, 200 * 1024])
            offset = rng.randrange(0, SIZE - length) // 512 * 512
            if 8 * MiB - length < offset < 9 * MiB:
                offset = 10 * MiB
            err, data = c.read(offset, length, cookie=i)
            assert err == 0
            assert data == content[offset:offset + length], (offset, length)


def test_pipelined_reads_with_a_backlogged_socket(served) -> None:
    # 48 reads of up to 1 MiB sent before any reply is read: the socket fills, replies queue in the server
    srv, content = served
    rng = random.Random(2)
    wanted = {}
    with connect(srv) as c:
        reqs = b""
        for cookie in range(48):
            length = rng.choice([64 * 1024, 512 * 1024, MiB])
            offset = rng.choice([0, 3 * MiB + 512, 4 * MiB - 64 * 1024, 5 * MiB, 12 * MiB, SIZE - length])
            wanted[cookie] = (offset, length)
            reqs += P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, cookie, offset, length)
        c.send(reqs)
        for _ in range(48):
            cookie, err, chunks = c.any_reply()
            assert err == 0
            offset, length = wanted.pop(cookie)
            got_off, data = data_of(chunks)
            assert got_off == offset and data == content[offset:offset + length]
        assert not wanted


def test_a_failed_read_between_good_ones(served) -> None:
    srv, content = served
    with connect(srv) as c:
        for i in range(4):
            err, data = c.read(7 * MiB, MiB, cookie=10 + 2 * i)
            assert err == 0 and data == content[7 * MiB:8 * MiB]
            err, _ = c.read(8 * MiB, MiB, cookie=11 + 2 * i)
            assert err == P.EIO
        err, data = c.read(9 * MiB, MiB, cookie=99)
        assert err == 0 and data == content[9 * MiB:10 * MiB]


class HoldingTransport:
    """A transport that, like asyncio's from Python 3.12 on, keeps the memoryviews it is given, uncopied, while
    the socket is backlogged (``open`` False), with write buffer limits high=1, low=0 as the server sets them.
    Every piece's bytes are recorded when written and checked again when the socket drains: a reply buffer the
    server reused while the transport still held it shows up as changed bytes."""

    def __init__(self) -> None:
        self.protocol = None
        self.open = True
        self.held: list[tuple[memoryview, bytes]] = []
        self.stream = bytearray()
        self.paused = False

    def write(self, data) -> None:
        snap = bytes(data)
        self.stream += snap
        if self.open and not self.held:
            return  # the socket took it whole
        self.held.append((memoryview(data), snap))
        if not self.paused:
            self.paused = True
            self.protocol.pause_writing()

    def drain(self) -> None:
        for view, snap in self.held:
            assert bytes(view) == snap, "a reply buffer was reused while the transport held it"
        self.held = []
        if self.paused:
            self.paused = False
            self.protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return sum(len(s) for _v, s in self.held)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_reply_buffers_come_back_only_after_the_transport_drained(served) -> None:
    """Pipelined 256 KiB reads against a backlogged transport that keeps what it is given (Python 3.12+
    behaviour, checked here on any version): no reply buffer is reused while held, every reply carries its own
    bytes, and the buffers the transport gave back are reused by later reads."""
    from thinpool.nbd.connection import _Connection

    srv, content = served
    conn = _Connection(srv.server)
    t = HoldingTransport()
    t.protocol = conn
    conn.transport = t
    conn._hs = None
    conn._export = srv.server.exports["0"]
    conn._structured = True
    rng = random.Random(3)
    wanted: list[tuple[int, int, int]] = []

    def feed(n: int) -> None:
        reqs = b""
        for _ in range(n):
            cookie = len(wanted)
            offset = rng.choice([0, 3 * MiB, 5 * MiB, 12 * MiB, SIZE - 256 * 1024])
            wanted.append((cookie, offset, 256 * 1024))
            reqs += P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, cookie, offset, 256 * 1024)
        buf = conn.get_buffer(len(reqs))
        buf[:len(reqs)] = reqs
        conn.buffer_updated(len(reqs))

    t.open = False  # backlogged: the transport keeps each reply it is given
    feed(6)
    for _ in range(4):
        feed(3)  # more reads while the transport still holds an earlier reply
        t.drain()
    while t.held or conn._out:
        t.drain()
    made = conn.reply_buffers_made
    t.open = True
    feed(12)
    t.drain()
    assert conn.reply_buffers_made - made < 12  # the buffers given back were used again
    stream = memoryview(bytes(t.stream))
    pos = 0
    for cookie, offset, length in wanted:
        magic, flags, rtype, got_cookie, n, got_off = struct.unpack_from(">IHHQIQ", stream, pos)
        assert (magic, rtype, got_cookie, n, got_off) == (P.STRUCTURED_REPLY_MAGIC, P.REPLY_TYPE_OFFSET_DATA,
                                                          cookie, 8 + length, offset)
        assert flags & P.REPLY_FLAG_DONE
        assert stream[pos + 28:pos + 28 + length] == content[offset:offset + length]
        pos += 28 + length
    assert pos == len(stream)
