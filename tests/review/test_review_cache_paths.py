"""Review of the mapping cache and the cached device size (thin.py, metadata/thin_device.py): a ThinDevice kept
across a pool operation (as an NBD export or a FUSE file keeps one) has both its mapping cache and its size cached
before the operation; after it, every read through that handle must equal a read through a fresh handle and the
pool's uncached tree lookups, and the size must be the new one."""

from __future__ import annotations

import io

import pytest

from thinpool.errors import OutOfBounds
from thinpool.pool import Pool
from thinpool.rbd.export import export_diff
from thinpool.rbd.importer import import_diff
from thinpool.thin import ThinDevice

CH = 64 << 10


def _warm(dev: ThinDevice, nr_chunks: int) -> None:
    """Fill the device's mapping cache and its cached size (the single-chunk paths, then lock-free reads)."""
    for c in range(nr_chunks):
        for off in (0, 512):
            if c * CH + off + 512 <= dev.size:
                dev.read(c * CH + off, 512)
    assert dev._mc is not None and dev._mc.valid


def _same_as_fresh(pool: Pool, kept: ThinDevice) -> None:
    fresh = pool.device(kept.dev_id)
    assert kept.size == fresh.size == pool.device_size(kept.dev_id)
    for c in range(-(-kept.size // CH)):
        for off in (0, 4096, CH - 512):
            if c * CH + off + 512 > kept.size:
                continue
            got = kept.read(c * CH + off, 512)
            assert got == fresh.read(c * CH + off, 512), (c, off)
        m = pool.md.lookup(kept.dev_id, c)
        assert kept.md.find_block(c) == m, c


def test_rollback_to_snapshot_under_a_kept_handle(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=64 * CH) as pool:
        a = pool.create_thin(1, 8 * CH)
        a.write(0, b"1" * (8 * CH))
        pool.create_snap(2, 1)
        a.write(0, b"2" * (8 * CH))  # breaks sharing: a's cache now holds the new blocks
        _warm(a, 8)
        pool.rollback_to_snapshot(1, 2)
        assert a.read(3 * CH, 4) == b"1111"
        assert a.read(3 * CH + 100, 4) == b"1111"  # the lock-free path again, with the new cache
        _same_as_fresh(pool, a)


def test_merge_snapshot_under_kept_handles(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=64 * CH) as pool:
        a = pool.create_thin(1, 8 * CH)
        a.write(0, b"1" * (8 * CH))
        s = pool.create_snap(2, 1, size=12 * CH)
        s.write(CH, b"s" * CH)
        _warm(a, 8)
        _warm(s, 12)
        pool.merge_snapshot(2)
        assert a.size == 12 * CH
        assert a.read(CH, 4) == b"ssss" and a.read(0, 4) == b"1111"
        assert a.read(11 * CH, 4) == bytes(4)
        with pytest.raises(Exception):
            s.read(0, 4)  # the snapshot is gone: its kept handle must not serve its old blocks
        _same_as_fresh(pool, a)


def test_resize_shrink_then_grow_under_a_kept_handle(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=64 * CH) as pool:
        a = pool.create_thin(1, 8 * CH)
        a.write(0, b"x" * (8 * CH))
        _warm(a, 8)
        pool.resize_device(1, 3 * CH + 4096)
        with pytest.raises(OutOfBounds):
            a.read(5 * CH, 512)
        with pytest.raises(OutOfBounds):
            a.write(4 * CH, b"y")
        assert a.read(3 * CH, 4096) == b"x" * 4096
        pool.resize_device(1, 8 * CH)
        assert a.read(3 * CH + 4096, 512) == bytes(512)  # the old tail chunk reads zeros past the old end
        assert a.read(6 * CH, 512) == bytes(512)  # unmapped at the shrink: never the old bytes
        a.write(7 * CH, b"z" * 512)
        assert a.read(7 * CH, 512) == b"z" * 512
        _same_as_fresh(pool, a)


def test_import_diff_growing_a_device_under_a_kept_handle(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=64 * CH) as pool:
        src = pool.create_thin(3, 6 * CH)
        for c in range(6):
            src.write(c * CH, bytes([65 + c]) * CH)
        buf = io.BytesIO()
        export_diff(pool, 3, buf, to_snap=False)
        a = pool.create_thin(1, 2 * CH + 512)
        a.write(0, b"o" * (2 * CH + 512))
        _warm(a, 3)
        buf.seek(0)
        import_diff(pool, 1, buf)
        assert a.size == 6 * CH
        for c in range(6):
            assert a.read(c * CH + 1000, 8) == bytes([65 + c]) * 8, c
        _same_as_fresh(pool, a)


def test_set_transaction_id_and_abort_under_a_kept_handle(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=64 * CH) as pool:
        a = pool.create_thin(1, 8 * CH)
        a.write(0, b"c" * (4 * CH))
        pool.commit()
        _warm(a, 8)
        pool.set_transaction_id(pool.md.trans_id, pool.md.trans_id + 5)
        assert a.read(CH, 4) == b"cccc"
        a.write(5 * CH, b"u" * CH)  # uncommitted
        assert a.read(5 * CH, 4) == b"uuuu"
        pool.abort()
        assert a.read(5 * CH, 4) == bytes(4)
        assert a.read(CH, 4) == b"cccc"
        _same_as_fresh(pool, a)


def test_external_origin_under_a_kept_handle(tmp_path) -> None:
    origin = tmp_path / "origin.img"
    origin.write_bytes(b"O" * (4 * CH))
    with Pool.create(tmp_path / "p", data_size=64 * CH) as pool:
        a = pool.create_thin(1, 8 * CH, origin=str(origin))
        _warm(a, 8)
        assert a.read(CH, 4) == b"OOOO" and a.read(5 * CH, 4) == bytes(4)
        a.write(CH + 10, b"w")  # provisions the chunk from the origin
        assert a.read(CH, 12) == b"O" * 10 + b"wO"
        a.discard(CH, CH)  # back to the origin's bytes
        assert a.read(CH + 10, 2) == b"OO"
        _same_as_fresh(pool, a)
