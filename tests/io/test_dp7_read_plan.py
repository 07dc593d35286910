"""A read of several chunks, every one mapped (a read through a snapshot chain): the pieces _plan_mapped finds
(one per run of consecutive data blocks) are exactly those of the general _plan_pieces, and reads and readinto
through a chain of snapshots return the bytes of a byte model, whatever the offset, length and layout."""

from __future__ import annotations

import os
import random
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from thinpool.pool import Pool

CH = 64 * 1024
MiB = 1 << 20


@given(st.data())
def test_plan_mapped_equals_the_general_plan(tmp_path_factory, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    pool_dir = tmp_path_factory.mktemp("plan") / "pool"
    with Pool.create(pool_dir, data_size=4 * CH, chunk_size=CH) as p:
        dev = p.create_thin(1, 64 * CH)
        shift = dev._tbits
        nr = data.draw(st.integers(1, 20))
        # data blocks in runs: each next chunk continues the run or jumps anywhere (even backwards, or to the
        # block just before)
        dbs = [data.draw(st.integers(0, 1000))]
        for _ in range(nr - 1):
            dbs.append(dbs[-1] + 1 if data.draw(st.booleans()) else data.draw(st.integers(0, 1000)))
        times = [data.draw(st.integers(0, 5)) for _ in range(nr)]
        vals = [d << shift | t for d, t in zip(dbs, times)]
        first = data.draw(st.integers(0, 40))
        head = data.draw(st.integers(0, CH - 1))
        tail = data.draw(st.integers(1, CH)) if nr > 1 else data.draw(st.integers(1, CH - head))
        offset = first * CH + head
        length = (nr - 1) * CH - head + tail if nr > 1 else tail
        end = offset + length
        got = dev._plan_mapped(offset, length, first, vals)
        want = dev._plan_pieces(offset, end, first, list(vals), shift)
        assert got == want
        assert sum(n for _, n, _ in got) == length and got[0][0] == 0


def test_reads_through_a_chain_match_a_byte_model(tmp_path: Path) -> None:
    """A device written end to end, then a chain of 8 snapshots, each overwriting 4 KiB in one chunk of every
    16 (so the newest device's chunks lie in runs all over the data file): read and readinto of random ranges
    (aligned and not, one chunk to 2 MiB) equal the model, before and after a reopen."""
    rnd = random.Random(7)
    span = 4 * MiB
    model = bytearray(os.urandom(span))
    path = tmp_path / "pool"
    with Pool.create(path, data_size=4 * span, chunk_size=CH) as p:
        dev = p.create_thin(1, span)
        for off in range(0, span, MiB):
            dev.write(off, model[off:off + MiB])
        top = 1
        for sid in range(2, 10):
            p.create_snap(sid, top)
            top = sid
            link = p.device(top)
            for off in range(0, span, 16 * CH):
                at = off + (sid % 16) * CH + rnd.randrange(0, CH - 4096, 512)
                piece = os.urandom(4096)
                link.write(at, piece)
                model[at:at + 4096] = piece
        p.commit()
        for reopen in (False, True):
            if reopen:
                p.close()
                p = Pool.open(path)
            d = p.device(top)
            for _ in range(200):
                n = rnd.choice([CH, 2 * CH, MiB, 2 * MiB, rnd.randrange(1, 2 * MiB)])
                off = rnd.randrange(0, span - n + 1)
                if rnd.random() < 0.3:
                    off -= off % CH
                assert d.read(off, n) == model[off:off + n]
                buf = bytearray(n)
                assert d.readinto(off, buf) == n and buf == model[off:off + n]
        p.close()
