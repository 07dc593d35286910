"""Review 4: tonight's data-path changes (issue 15) against byte models.

- a write into a pending chunk notes its sectors inline after its pwrite (e829910) while another thread reads
  through read, readinto and readv (gathered in one DataStore.preadinto_pieces call, 6ad74b2) ranges that span
  pending chunks, chunks not pending, holes and (one variant) an external origin: every byte a read returns is the
  old or the new byte of its position, and the sectors nobody writes are always the old ones (never the new
  block's placeholder zeros); at the end every read path equals the model, a commit and a reopen keep it, both
  real checkers accept the metadata;
- a break that finds the pending table full copies around its piece at once (f4331c5): a small table (1, 2 and
  3 chunks) under random sector writes, unaligned writes, discards and reads across many shared chunks of a
  snapshot chain equals a byte model on both devices, through commit and reopen, and both checkers accept.
"""

from __future__ import annotations

import random
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import need_tool
from oracles import assert_thin_check
from review_helpers import read_by

from thinpool import thin
from thinpool.pool import Pool

CH = 64 << 10
SECT = 512




@pytest.mark.external
@pytest.mark.parametrize("with_origin", [False, True])
def test_reads_race_writes_that_note_pending_sectors(tmp_path: Path, with_origin: bool) -> None:
    need_tool("thin_check")
    rng = random.Random(7 + with_origin)
    nr_chunks = 24
    size = nr_chunks * CH
    path = tmp_path / "pool"
    p = Pool.create(path, data_size=400 * CH, chunk_size=CH)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the two threads interleave finely (no timing is asserted)
    try:
        origin_arg = None
        if with_origin:
            origin = tmp_path / "origin.img"
            origin.write_bytes(bytes([0x3C]) * (12 * CH))  # chunks 12.. of the device read zeros past its end
            origin_arg = str(origin)
        p.create_thin(1, size, origin=origin_arg)
        d1 = p.device(1)
        model = bytearray(d1.read(0, size))
        for c in range(16):  # chunks 0..15 provisioned (16..: holes, over the origin or zeros)
            data = bytes([(c * 7 + 1) & 0xFF or 1]) * CH
            d1.write(c * CH, data)
            model[c * CH:(c + 1) * CH] = data
        # the sectors a round writes: sectors 1..63 of the even chunks 0..14 (sector 0: the break that leaves
        # the chunk pending; 64..127 are never written, so they must always read as before)
        allowed = np.zeros(size, dtype=bool)
        for c in range(0, 16, 2):
            allowed[c * CH + SECT:c * CH + 64 * SECT] = True
        total_reads = 0
        for rnd in range(4):
            p.create_snap(100 + rnd, 1)  # commits: every chunk shared again
            for c in range(0, 16, 2):
                d1.write(c * CH, bytes([0xE0 + rnd]) * SECT)
                model[c * CH:c * CH + SECT] = bytes([0xE0 + rnd]) * SECT
            assert len(d1._pend) == 8
            new_byte = 0xA0 + rnd
            plan = [(c, s, k) for c in range(0, 16, 2) for s in range(1, 64, 2) for k in (1, 2)
                    if (s, k) != (63, 2)]
            rng.shuffle(plan)
            written = [(c * CH + s * SECT, k * SECT) for c, s, k in plan]
            old = np.frombuffer(bytes(model), dtype=np.uint8)
            errors: list[str] = []
            stop = threading.Event()
            nr_reads = [0]

            def writer() -> None:
                try:
                    for off, n in written:
                        d1.write(off, bytes([new_byte]) * n)
                finally:
                    stop.set()

            def reader() -> None:
                r = random.Random(rnd)
                h = p.device(1)
                while (not stop.is_set() or nr_reads[0] < 30) and not errors:
                    off = r.randrange(0, size - 1)
                    n = r.randrange(1, min(3 * CH, size - off) + 1)
                    got = np.frombuffer(read_by(h, off, n, r.randrange(3)), dtype=np.uint8)
                    nr_reads[0] += 1
                    bad = np.flatnonzero(got != old[off:off + n])
                    bad = bad[~(allowed[off + bad] & (got[bad] == new_byte))]
                    if len(bad):
                        pos = off + int(bad[0])
                        errors.append(f"round {rnd} byte {pos} (chunk {pos // CH}, sector {pos % CH // SECT}): "
                                      f"{int(got[bad[0]]):#x}, before {int(old[pos]):#x}")

            t_r = threading.Thread(target=reader)
            t_w = threading.Thread(target=writer)
            t_r.start()
            t_w.start()
            t_w.join(120)
            t_r.join(120)
            assert not t_w.is_alive() and not t_r.is_alive()
            assert errors == []
            total_reads += nr_reads[0]
            for off, n in written:
                model[off:off + n] = bytes([new_byte]) * n
            for how in range(3):
                assert read_by(d1, 0, size, how) == bytes(model), (rnd, how)
        snaps = {dev: p.device(dev).read(0, size) for dev in (100, 101, 102, 103)}
        p.commit()
        assert d1.read(0, size) == bytes(model)
    finally:
        sys.setswitchinterval(switch)
        p.close()
    assert_thin_check(path / "metadata", what="pending sectors noted while reads ran")
    with Pool.open(path) as q:
        assert q.device(1).read(0, size) == bytes(model)
        for dev, want in snaps.items():
            assert q.device(dev).read(0, size) == want


@pytest.mark.external
@pytest.mark.parametrize(("pend_chunks", "seed"), [(1, 0), (2, 1), (3, 2), (2, 3)])
def test_full_pending_table_copies_around_against_a_byte_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               pend_chunks: int, seed: int) -> None:
    need_tool("thin_check")
    monkeypatch.setattr(thin, "PENDING_MAX_BYTES", pend_chunks * CH)
    rng = random.Random(seed)
    nr_chunks = 20
    size = nr_chunks * CH
    path = tmp_path / "pool"
    p = Pool.create(path, data_size=400 * CH, chunk_size=CH)
    model: dict[int, bytearray] = {}
    try:
        p.create_thin(1, size)
        model[1] = bytearray(size)
        base = rng.randbytes(size)
        p.device(1).write(0, base[:14 * CH])  # chunks 14..: holes
        model[1][:14 * CH] = base[:14 * CH]
        p.create_snap(2, 1)
        model[2] = bytearray(model[1])
        copies_before = p.stats["cow_copies"]
        for step in range(400):
            dev = rng.choice([1, 2])
            d = p.device(dev)
            assert len(d._pend) <= pend_chunks
            op = rng.random()
            if op < 0.6:
                c = rng.randrange(nr_chunks)
                s = rng.randrange(CH // SECT)
                n = min(rng.choice([1, 2, 8, 64]), CH // SECT - s) * SECT
                off = c * CH + s * SECT
            elif op < 0.75:
                off = rng.randrange(size - 1)
                n = rng.randrange(1, min(3 * CH, size - off) + 1)
            elif op < 0.8:
                c = rng.randrange(nr_chunks - 1)
                k = rng.choice([1, 2])
                d.discard(c * CH, k * CH)  # whole chunks unmapped: they read zeros
                model[dev][c * CH:(c + k) * CH] = bytes(k * CH)
                continue
            elif op < 0.83:
                p.create_snap(10 + step, dev)  # a snapshot commits: pending copies completed, all shared again
                model[10 + step] = bytearray(model[dev])
                continue
            else:
                off = rng.randrange(size - 1)
                n = rng.randrange(1, min(2 * CH + 1000, size - off) + 1)
                assert read_by(d, off, n, rng.randrange(3)) == bytes(model[dev][off:off + n]), (step, dev, off, n)
                continue
            data = rng.randbytes(n)
            d.write(off, data)
            model[dev][off:off + n] = data
        assert p.stats["cow_copies"] > copies_before
        for dev in sorted(model):
            for how in range(3):
                assert read_by(p.device(dev), 0, size, how) == bytes(model[dev]), (dev, how)
        p.commit()
    finally:
        p.close()
    assert_thin_check(path / "metadata", what=f"pending table of {pend_chunks}")
    with Pool.open(path) as q:
        for dev in sorted(model):
            assert q.device(dev).read(0, size) == bytes(model[dev]), dev
