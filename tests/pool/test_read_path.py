"""The read path against a byte model: read(), readinto() and ThinFile.readinto return the same bytes for any
range over own chunks, shared chunks (snapshots, a chain of them), physically scattered chunks, holes and an
external origin (smaller than the device), and a read never provisions anything."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from thinpool.errors import OutOfBounds
from thinpool.io.device import zero_fill
from thinpool.pool import Pool

CH = 64 << 10
SIZE = 2 << 20


def _check_range(dev, model: bytes, offset: int, length: int) -> None:
    want = model[offset:offset + length]
    got = dev.read(offset, length)
    assert isinstance(got, bytes) and got == want
    buf = bytearray(b"\xa5") * (length + 6)  # readinto writes only its slice
    assert dev.readinto(offset, memoryview(buf)[3:3 + length]) == length
    assert buf[3:3 + length] == want and buf[:3] == b"\xa5" * 3 and buf[3 + length:] == b"\xa5" * 3
    with dev.open("rb") as f:
        f.seek(offset)
        into = bytearray(length)
        assert f.readinto(into) == length and into == want


def _build(tmp_path, seed: int, with_origin: bool):
    rng = random.Random(seed)
    opath = None
    origin = b""
    if with_origin:
        origin = rng.randbytes(SIZE // 2 + 1234)  # smaller than the device, ends inside a chunk
        opath = str(tmp_path / "origin.img")
        with open(opath, "wb") as f:
            f.write(origin)
    pool = Pool.create(str(tmp_path / "pool"), data_size=64 << 20)
    pool.create_thin(1, SIZE, origin=opath)
    model = bytearray(origin) + bytes(SIZE - len(origin))
    models = {1: model}
    ids = [1]
    for step in range(8):  # a chain: write to the newest, then snapshot it
        dev = pool.device(ids[-1])
        m = models[ids[-1]]
        for _ in range(rng.randint(1, 6)):
            off = rng.randrange(SIZE)
            n = min(rng.choice([1, 4096, CH - 7, CH, 3 * CH + 11]), SIZE - off)
            data = rng.randbytes(n)
            dev.write(off, data)
            m[off:off + n] = data
        if rng.random() < 0.3:
            off = rng.randrange(0, SIZE, CH)
            dev.discard(off, min(2 * CH, SIZE - off))
            for c in range(off // CH, min(off // CH + 2, SIZE // CH)):
                m[c * CH:(c + 1) * CH] = (origin[c * CH:(c + 1) * CH] + bytes(CH))[:CH]
        new = 2 + step
        pool.create_snap(new, ids[-1])
        models[new] = bytearray(m)
        ids.append(new)
    return pool, models, rng


@pytest.mark.parametrize("with_origin", [False, True])
@given(seed=st.integers(0, 2**32 - 1))
def test_read_and_readinto_match_the_model(tmp_path_factory, with_origin, seed):
    tmp = tmp_path_factory.mktemp("rp")
    pool, models, rng = _build(tmp, seed, with_origin)
    try:
        used = pool.status().used_data_blocks
        for dev_id, m in models.items():
            dev = pool.device(dev_id)
            for off, n in [(0, SIZE), (CH - 1, 2), (SIZE - 1, 1), (SIZE // 2, 1 << 20)]:
                _check_range(dev, bytes(m), off, n)
            for _ in range(6):
                off = rng.randrange(SIZE)
                n = rng.randint(0, SIZE - off)
                _check_range(dev, bytes(m), off, n)
        assert pool.status().used_data_blocks == used  # reads provision nothing
    finally:
        pool.close()


def test_readinto_refuses_a_range_past_the_end(tmp_path):
    pool = Pool.create(str(tmp_path / "pool"), data_size=8 << 20)
    try:
        pool.create_thin(1, 1 << 20)
        dev = pool.device(1)
        with pytest.raises(OutOfBounds):
            dev.readinto((1 << 20) - 10, bytearray(11))
        assert dev.readinto(1 << 20, bytearray(0)) == 0
    finally:
        pool.close()


def test_zero_fill_clears_small_and_large_buffers():
    for n in (0, 1, 4096, 4097, 1 << 20):
        b = bytearray(os.urandom(n))
        zero_fill(memoryview(b))
        assert b == bytes(n)
