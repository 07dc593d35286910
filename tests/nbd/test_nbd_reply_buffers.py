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
