"""Pipelined requests handled as one batch (issue 15): a client that sends many requests in one write gets every
reply right, whatever mix of plain writes, reads (small, and pooled 64 KiB+ ones), FUA writes, flushes, failing
writes and refused requests the batch holds; a FLUSH's reply comes after the replies of every request sent before
it, and what it acknowledged survives a crash; 2,000 pipelined reads in one send are all answered."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nbd_client import RawClient
from sparse_device import SparseDevice

from thinpool.errors import NoDataSpace
from thinpool.nbd import ServerThread
from thinpool.nbd import protocol as P
from thinpool.pool import Pool

MiB = 1 << 20
SIZE = 4 * MiB
FAIL_AT = 3 * MiB  # writes at or past this offset fail with ENOSPC (reads there work)


class FailingWrites:
    """A real thin device whose writes past FAIL_AT raise NoDataSpace (a full pool, mid-batch)."""

    def __init__(self, dev) -> None:
        self.dev = dev

    def __getattr__(self, name):
        return getattr(self.dev, name)

    def write(self, offset, data):
        if offset + len(data) > FAIL_AT:
            raise NoDataSpace()
        self.dev.write(offset, data)


@pytest.fixture(scope="module")
def served():
    d = tempfile.mkdtemp(prefix="tpnbdbatch", dir="/tmp")
    pool = Pool.create(os.path.join(d, "pool"), data_size=SIZE + 4 * MiB)
    try:
        pool.create_thin(0, SIZE)
        model = bytearray(SIZE)
        with ServerThread({"0": FailingWrites(pool.device(0))}, unix_path=os.path.join(d, "s"),
                          on_shutdown=pool.commit) as srv:
            yield srv, model
    finally:
        pool.close()
        shutil.rmtree(d, ignore_errors=True)


def connect(srv) -> RawClient:
    c = RawClient(srv.addresses[0], timeout=30)
    c.greeting()
    c.go("0")
    return c


def read_replies(c: RawClient, n: int) -> list[tuple[int, int, bytes]]:
    """The next n replies in arrival order: (cookie, error, read data or b"")."""
    out = []
    for _ in range(n):
        cookie, err, chunks = c.any_reply()
        data = b"".join(d[8:] for t, _f, d in chunks if t == P.REPLY_TYPE_OFFSET_DATA)
        out.append((cookie, err, data))
    return out


OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE // 512 - 1), st.sampled_from([1, 512, 4096, 65536, 200_000])),
    st.tuples(st.just("fua"), st.integers(0, SIZE // 512 - 1), st.sampled_from([512, 4096])),
    st.tuples(st.just("read"), st.integers(0, SIZE // 512 - 1), st.sampled_from([1, 4096, 65536, 300_000])),
    st.tuples(st.just("flush"), st.just(0), st.just(0)),
    st.tuples(st.just("past-end"), st.just(0), st.just(4096)),
), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None)
@given(OPS, st.integers(0, 255))
def test_one_send_of_mixed_requests_gets_every_reply_right(served, ops, seed) -> None:
    srv, model = served
    wire = []
    expect: dict[int, tuple[str, int, bytes | None]] = {}  # cookie -> (kind, error, read data)
    for i, (kind, sector, n) in enumerate(ops):
        cookie = 1000 + i
        offset = sector * 512
        if kind in ("write", "fua"):
            payload = bytes([(seed + i) % 256]) * n
            flags = P.CMD_FLAG_FUA if kind == "fua" else 0
            wire.append(P.S_REQUEST.pack(P.REQUEST_MAGIC, flags, P.CMD_WRITE, cookie, offset, n) + payload)
            if offset + n > SIZE:
                expect[cookie] = (kind, P.ENOSPC, None)
            elif offset + n > FAIL_AT:
                expect[cookie] = (kind, P.ENOSPC, None)
            else:
                model[offset:offset + n] = payload
                expect[cookie] = (kind, 0, None)
        elif kind == "read":
            wire.append(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, cookie, offset, n))
            if offset + n > SIZE:
                expect[cookie] = (kind, P.EINVAL, None)
            else:
                expect[cookie] = (kind, 0, bytes(model[offset:offset + n]))
        elif kind == "flush":
            wire.append(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_FLUSH, cookie, 0, 0))
            expect[cookie] = (kind, 0, None)
        else:
            wire.append(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, cookie, SIZE - 2048, n) + bytes(n))
            expect[cookie] = (kind, P.ENOSPC, None)
    with connect(srv) as c:
        c.send(b"".join(wire))  # one send: the server sees the requests together
        got = read_replies(c, len(ops))
    assert sorted(cookie for cookie, _e, _d in got) == sorted(expect)  # each request answered exactly once
    seen: set[int] = set()
    for cookie, err, data in got:
        kind, want_err, want = expect[cookie]
        assert err == want_err, (kind, cookie)
        if want is not None:
            assert data == want, (kind, cookie)
        if kind == "flush":  # everything sent before the flush was answered before it
            assert set(range(1000, cookie)) <= seen
        seen.add(cookie)


def test_a_flush_in_a_batch_commits_every_write_before_it() -> None:
    d = tempfile.mkdtemp(prefix="tpnbdbatch", dir="/tmp")
    try:
        path = os.path.join(d, "pool")
        pool = Pool.create(path, data_size=8 * MiB)
        pool.create_thin(0, 4 * MiB)
        pool.commit()
        before = [(i * 65536 + 4096 * (i % 3), bytes([i + 1]) * 4096) for i in range(40)]
        after = [(i * 65536, b"\xee" * 4096) for i in range(40, 50)]
        wire = b"".join(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, i, off, len(data)) + data
                        for i, (off, data) in enumerate(before))
        wire += P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_FLUSH, 999, 0, 0)
        wire += b"".join(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 2000 + i, off, len(data)) + data
                         for i, (off, data) in enumerate(after))
        with ServerThread({"0": pool.device(0)}, unix_path=os.path.join(d, "s"), on_shutdown=lambda: None) as srv:
            with connect(srv) as c:
                c.send(wire)
                got = read_replies(c, len(before) + 1 + len(after))
        order = [cookie for cookie, _e, _d in got]
        assert all(err == 0 for _c, err, _d in got)
        assert set(order[:order.index(999)]) == set(range(len(before)))
        pool.crash_close()  # no commit at shutdown: only what the FLUSH committed is there
        with Pool.open(path) as again:
            dev = again.device(0)
            for off, data in before:
                assert dev.read(off, len(data)) == data
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_replies_of_a_large_batch_are_bounded_and_complete(tmp_path) -> None:
    """2,000 pipelined 4 KiB reads in one send (8 MiB of replies, the per-connection cap): all answered."""
    dev = SparseDevice(16 * MiB)
    dev.write(0, bytes(range(256)) * (16 * MiB // 256))
    with ServerThread({"r": dev}, unix_path=str(tmp_path / "s")) as srv:
        with RawClient(srv.addresses[0], timeout=60) as c:
            c.greeting()
            c.go("r")
            n = 2000
            c.send(b"".join(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i, (i * 4096 + i) % (16 * MiB - 4096),
                                             4096) for i in range(n)))
            got = read_replies(c, n)
    assert sorted(cookie for cookie, _e, _d in got) == list(range(n))
    for cookie, err, data in got:
        off = (cookie * 4096 + cookie) % (16 * MiB - 4096)
        assert err == 0 and data == dev.read(off, 4096)
