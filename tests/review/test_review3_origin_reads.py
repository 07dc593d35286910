"""Review: every read path over a device with an external origin, its snapshots, holes and copies left pending.

A device over a read-only origin file (smaller than the device: past its end the device reads zeros) is
snapshotted; random sector writes, unaligned writes, discards (an unmapped chunk shows the origin again) and
write_zeroes go to the origin device and its snapshots, with copies left pending, while reads of random ranges
go through read, readinto, readv and ThinFile, on kept and fresh handles. Every read must equal a byte model;
a commit and a reopen must keep it; both real checkers must accept the metadata.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import need_tool
from oracles import assert_thin_check
from review_helpers import read_by

from thinpool.pool import Pool

CH = 64 << 10
SECT = 512




@pytest.mark.external
@pytest.mark.parametrize("seed", range(6))
def test_reads_over_an_external_origin_with_snapshots_and_pending_copies(tmp_path: Path, seed: int) -> None:
    need_tool("thin_check")
    rng = random.Random(seed)
    size = 24 * CH
    origin = tmp_path / "origin.img"
    origin_bytes = rng.randbytes(17 * CH + 3 * SECT)  # not a whole number of chunks, smaller than the device
    origin.write_bytes(origin_bytes)
    path = tmp_path / "pool"
    p = Pool.create(path, data_size=160 * CH, chunk_size=CH, discard=rng.choice(["passdown", "nopassdown"]))
    model: dict[int, bytearray] = {}
    try:
        p.create_thin(1, size, origin=str(origin))
        model[1] = bytearray(origin_bytes + bytes(size - len(origin_bytes)))
        d1 = p.device(1)
        for _ in range(6):  # some chunks provisioned (copied from the origin around the write)
            off = rng.randrange(size - 8192)
            data = rng.randbytes(rng.randrange(1, 8192))
            d1.write(off, data)
            model[1][off:off + len(data)] = data
        p.create_snap(2, 1)
        model[2] = bytearray(model[1])
        kept = {1: d1, 2: p.device(2)}
        nxt = 3
        pending_seen = 0
        for step in range(300):
            dev = rng.choice(sorted(model))
            h = kept[dev] if rng.random() < 0.5 else p.device(dev)
            op = rng.random()
            if op < 0.45:  # sector-aligned: deferred breaks of shared chunks
                c = rng.randrange(size // CH)
                s = rng.randrange(CH // SECT)
                n = min(rng.choice([1, 8, 16]), CH // SECT - s) * SECT
                off = c * CH + s * SECT
                data = rng.randbytes(n)
                h.write(off, data)
                model[dev][off:off + n] = data
                pending_seen += bool(p.md.pending_copies(dev))
            elif op < 0.55:
                off = rng.randrange(size)
                data = rng.randbytes(min(rng.randrange(1, 2 * CH), size - off))
                h.write(off, data)
                model[dev][off:off + len(data)] = data
            elif op < 0.62:  # discard: whole chunks unmapped show the origin (or zeros past it) again
                off = rng.randrange(size)
                n = min(rng.randrange(1, 3 * CH), size - off)
                h.discard(off, n)
                lo, hi = -(-off // CH), (off + n) // CH
                if off + n == size:
                    hi = size // CH
                for c in range(lo, hi):
                    a, b = c * CH, (c + 1) * CH
                    model[dev][a:b] = (origin_bytes[a:b] + bytes(CH))[:CH]
            elif op < 0.67:
                off = rng.randrange(size)
                n = min(rng.randrange(1, 2 * CH), size - off)
                h.write_zeroes(off, n)
                model[dev][off:off + n] = bytes(n)
            elif op < 0.70 and len(model) < 5:
                p.create_snap(nxt, dev)
                model[nxt] = bytearray(model[dev])
                kept[nxt] = p.device(nxt)
                nxt += 1
            elif op < 0.72:
                p.commit()
            else:
                off = rng.randrange(size)
                n = min(rng.randrange(1, 3 * CH), size - off)
                got = read_by(h, off, n, rng.randrange(4))
                assert got == bytes(model[dev][off:off + n]), (seed, step, dev, off, n)
        assert pending_seen > 10
        for dev, m in model.items():
            assert p.device(dev).read(0, size) == bytes(m), (seed, "before the commit", dev)
        p.commit()
    finally:
        p.close()
    with Pool.open(path, readonly=True) as ro:
        for dev, m in model.items():
            assert ro.device(dev).read(0, size) == bytes(m), (seed, "after a reopen", dev)
    assert_thin_check(path / "metadata")
