"""Property: for random writes, discards, write_zeroes and resizes between snapshots (with or without an external
origin), the chain of diffs thinpool exports (full, then --from) passes the validator and rebuilds every snapshot
in another pool."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from rbd_helpers import KiB, device_bytes, pattern

from thinpool.pool import Pool
from thinpool.rbd import export_diff, import_diff, validate_diff

CH = 64 * KiB
SIZES = st.integers(1, 500).map(lambda n: n * 8 * 512 * 3)  # 12 KiB steps up to 6 MiB: rarely aligned

op = st.one_of(
    st.tuples(st.just("w"), st.floats(0, 1), st.integers(1, 3 * CH), st.integers(0, 255)),
    st.tuples(st.just("d"), st.floats(0, 1), st.integers(1, 4 * CH), st.just(0)),
    st.tuples(st.just("z"), st.floats(0, 1), st.integers(1, 3 * CH), st.just(0)),
    st.tuples(st.just("r"), st.floats(0, 1), st.just(0), st.just(0)),
)


@given(size=SIZES, rounds=st.lists(st.lists(op, max_size=6), min_size=1, max_size=4),
       origin=st.none() | st.integers(1, 300 * KiB), chunk=st.sampled_from([CH, 192 * KiB]))
def test_random_chains_rebuild_every_snapshot(size, rounds, origin, chunk):
    """``origin``: the length of an external origin file under the source device (None: no origin)."""
    with tempfile.TemporaryDirectory(prefix="tprbdprop") as d:
        src, dst = Path(d) / "src", Path(d) / "dst"
        ofile = None
        if origin is not None:
            ofile = Path(d) / "origin"
            ofile.write_bytes(pattern(origin, origin))
        with Pool.create(src, data_size=64 << 20, chunk_size=chunk) as p, \
                Pool.create(dst, data_size=64 << 20, chunk_size=CH) as q:
            dev = p.create_thin(1, size, name="vol", origin=None if ofile is None else str(ofile))
            q.create_thin(1, 512, name="copy")
            prev = None
            for i, ops in enumerate(rounds):
                for kind, where, n, byte in ops:
                    cur = p.device_size(1)
                    if kind == "r":
                        p.resize_device(1, max(512, int(where * 3 * size) // 512 * 512))
                        continue
                    off = min(int(where * cur), cur - 1)
                    n = min(n, cur - off)
                    if kind == "w":
                        dev.write(off, bytes([byte or 1]) * n if byte % 3 else bytes(n))
                    elif kind == "d":
                        dev.discard(off, n)
                    else:
                        dev.write_zeroes(off, n)
                sid = 10 + i
                p.create_snap(sid, 1, name=f"s{i}")
                buf = io.BytesIO()
                export_diff(p, sid, buf, from_id=prev)
                buf.seek(0)
                validate_diff(buf)
                buf.seek(0)
                import_diff(q, 1, buf)
                assert device_bytes(q, f"s{i}") == device_bytes(p, f"s{i}")
                prev = sid
