"""Review: NBD request batches (nbd/connection.py) over a thin device whose shared chunks are broken by sector
writes (deferred copy-on-write, thin.py). One send holds sector writes into shared chunks, unaligned writes,
reads of one sector, of pooled 64 KiB+ and of several chunks (pending ones among them), FUA writes and
flushes: every reply comes once, in a FLUSH's case after every earlier one, reads equal a byte model, the
snapshot's export (a second connection) keeps the old bytes, and the pool reopens to the model and passes
both real thin_checks."""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from oracles import assert_thin_check

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "nbd"))
from nbd_client import RawClient  # noqa: E402

from thinpool.nbd import ServerThread  # noqa: E402
from thinpool.nbd import protocol as P  # noqa: E402
from thinpool.pool import Pool  # noqa: E402

CH = 64 << 10
SIZE = 16 * CH


@pytest.fixture(scope="module")
def served():
    d = tempfile.mkdtemp(prefix="tpr2nbd", dir="/tmp")
    path = os.path.join(d, "pool")
    pool = Pool.create(path, data_size=1024 * CH, chunk_size=CH)
    try:
        pool.create_thin(0, SIZE)
        old = random.Random(5).randbytes(SIZE)
        pool.device(0).write(0, old)
        state = {"model": bytearray(old), "snaps": 0}
        with ServerThread({"0": pool.device(0)}, unix_path=os.path.join(d, "s"), on_shutdown=lambda: None) as srv:
            yield srv, pool, state, path
        pool.close()
        with Pool.open(path, readonly=True) as ro:
            assert ro.device(0).read(0, SIZE) == bytes(state["model"])
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _connect(srv, name: str = "0") -> RawClient:
    c = RawClient(srv.addresses[0], timeout=30)
    c.greeting()
    c.go(name)
    return c


OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE // 512 - 1), st.sampled_from([512, 1024, 4096, 8192])),
    st.tuples(st.just("unaligned"), st.integers(0, SIZE - 1), st.sampled_from([1, 100, 3000])),
    st.tuples(st.just("fua"), st.integers(0, SIZE // 512 - 1), st.sampled_from([512, 4096])),
    st.tuples(st.just("read"), st.integers(0, SIZE // 512 - 1), st.sampled_from([512, 4096, 65536, 3 * CH])),
    st.tuples(st.just("flush"), st.just(0), st.just(0)),
), min_size=1, max_size=30)


@pytest.mark.external
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, seed=st.integers(0, 255))
@example(ops=[("write", 3, 4096), ("read", 0, 512), ("write", 200, 512)], seed=1)  # leaves copies pending
def test_batches_over_pending_copies_match_the_model(served, ops, seed) -> None:
    srv, pool, state, path = served
    model = state["model"]
    with pool.lock:  # every chunk shared again: the batch's sector writes break them (deferred)
        snap = 100 + state["snaps"]
        state["snaps"] += 1
        pool.create_snap(snap, 0)
        snap_bytes = bytes(model)
    wire, expect = [], {}
    for i, (kind, where, n) in enumerate(ops):
        cookie = 1 + i
        if kind in ("write", "fua", "unaligned"):
            off = where * 512 if kind != "unaligned" else where
            n = min(n, SIZE - off)
            payload = random.Random(seed * 1000 + i).randbytes(n)
            flags = P.CMD_FLAG_FUA if kind == "fua" else 0
            wire.append(P.S_REQUEST.pack(P.REQUEST_MAGIC, flags, P.CMD_WRITE, cookie, off, n) + payload)
            model[off:off + n] = payload
            expect[cookie] = (kind, None)
        elif kind == "read":
            off = where * 512
            n = min(n, SIZE - off)
            wire.append(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, cookie, off, n))
            expect[cookie] = (kind, bytes(model[off:off + n]))
        else:
            wire.append(P.S_REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_FLUSH, cookie, 0, 0))
            expect[cookie] = (kind, None)
    with _connect(srv) as c:
        c.send(b"".join(wire))
        got = []
        for _ in ops:
            cookie, err, chunks = c.any_reply()
            got.append((cookie, err, b"".join(d[8:] for t, _f, d in chunks if t == P.REPLY_TYPE_OFFSET_DATA)))
    assert sorted(g[0] for g in got) == sorted(expect)
    seen: set[int] = set()
    for cookie, err, data in got:
        kind, want = expect[cookie]
        assert err == 0, (kind, cookie)
        if want is not None:
            assert data == want, (kind, cookie)
        if kind == "flush":
            assert set(range(1, cookie)) <= seen
        seen.add(cookie)
    with pool.lock:
        state["pending_seen"] = state.get("pending_seen", 0) + bool(pool.md.pending_copies(0))
        assert pool.device(0).read(0, SIZE) == bytes(model)
        assert pool.device(snap).read(0, SIZE) == snap_bytes
        pool.delete_thin(snap)


@pytest.mark.external
def test_the_pool_after_the_batches_passes_both_checkers(served) -> None:
    srv, pool, state, path = served
    assert state.get("pending_seen", 0) >= 1  # batches left copies pending (the reads then saw them merged)
    with pool.lock:
        pool.create_snap(99, 0)
        pool.device(0).write(512, b"q" * 512)  # one pending copy left for the commit to complete
        state["model"][512:1024] = b"q" * 512
        pool.commit()
        assert not pool.md.pending_devices()
    assert_thin_check(os.path.join(path, "metadata"))
