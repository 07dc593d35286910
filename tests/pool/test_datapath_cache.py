"""The per-device mapping cache (metadata/thin_device.py MappingCache) and the single-chunk fast paths of
ThinDevice.read/write: every answer equals an uncached tree lookup, across snapshots, discards, commits, aborts,
deletes and re-creates, several handles of one device, leaf boundaries and gaps, and corrupt leaves."""

from __future__ import annotations

import random

import pytest

from thinpool.errors import DeviceNotFound, MetadataCorrupt
from thinpool.formats.device_details import pack_block_time
from thinpool.pool import Pool

CH = 64 << 10


def _uncached(pool: Pool, dev_id: int, thin_block: int) -> tuple[int, int] | None:
    return pool.md.lookup(dev_id, thin_block)  # walks the tree, never the cache


def _agree(pool: Pool, dev_id: int, nr_chunks: int) -> None:
    dev = pool.device(dev_id)
    for c in range(nr_chunks):
        assert dev.md.find_block(c) == _uncached(pool, dev_id, c), c


def test_a_second_lookup_in_the_same_leaf_walks_no_tree(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        dev = pool.create_thin(1, 16 << 20)
        for c in range(0, 200, 2):
            dev.write(c * CH, b"x" * 4096)
        pool.commit()
        mc = pool.md.mapping_cache(1)
        fills = mc.fills
        for c in range(200):  # mapped and unmapped chunks of one leaf
            assert dev.read(c * CH, 4096) == (b"x" * 4096 if c % 2 == 0 else bytes(4096))
        assert mc.fills <= fills + 1
        assert mc.valid


def test_overwrite_after_snapshot_of_a_cached_device_copies(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        dev = pool.create_thin(1, 4 << 20)
        dev.write(0, b"a" * CH)
        assert dev.read(0, 4) == b"aaaa"  # the mapping is cached now
        dev.write(100, b"b")  # an overwrite through the fast path
        snap = pool.create_snap(2, 1)
        before = _uncached(pool, 1, 0)
        dev.write(200, b"c")  # shared now: must break sharing, not write in place
        after = _uncached(pool, 1, 0)
        assert before is not None and after is not None and after[0] != before[0]
        assert snap.read(200, 1) == b"a" and snap.read(100, 1) == b"b"
        assert dev.read(200, 1) == b"c" and dev.read(100, 1) == b"b"
        assert pool.stats["cow_copies"] == 1
        dev.write(300, b"d")  # owned again: in place
        assert _uncached(pool, 1, 0) == after and pool.stats["cow_copies"] == 1
        _agree(pool, 1, 64)
        _agree(pool, 2, 64)


def test_discard_drops_the_cache(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        dev = pool.create_thin(1, 4 << 20)
        dev.write(0, b"z" * (8 * CH))
        assert dev.read(3 * CH, 2) == b"zz"
        dev.discard(2 * CH, 3 * CH)
        assert dev.read(3 * CH, 2) == bytes(2)
        assert dev.read(5 * CH, 2) == b"zz"
        dev.write(3 * CH, b"q")  # provisions again
        assert dev.read(3 * CH, 2) == b"q\0"
        _agree(pool, 1, 64)


def test_abort_drops_the_cache(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        dev = pool.create_thin(1, 4 << 20)
        dev.write(0, b"1" * CH)
        pool.commit()
        dev.write(CH, b"2" * CH)  # new mapping, cached by insert
        assert dev.read(CH, 1) == b"2"
        pool.abort_command()
        assert dev.read(CH, 1) == b"\0"  # back to the last commit
        assert dev.read(0, 1) == b"1"
        _agree(pool, 1, 64)


def test_commit_keeps_the_cache_right(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        dev = pool.create_thin(1, 4 << 20)
        dev.write(0, b"1" * 4096)
        mc = pool.md.mapping_cache(1)
        pool.commit()
        assert mc.valid
        dev.write(0, b"2")  # overwrite after a commit: the mapping's time is unchanged, still owned
        assert dev.read(0, 2) == b"21"
        _agree(pool, 1, 64)


def test_delete_and_recreate_the_same_id(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        dev = pool.create_thin(1, 4 << 20)
        dev.write(0, b"old" * 100)
        assert dev.read(0, 3) == b"old"
        pool.delete_thin(1)
        with pytest.raises(DeviceNotFound):
            dev.read(0, 3)
        dev2 = pool.create_thin(1, 4 << 20)
        assert dev2.read(0, 3) == bytes(3)
        assert dev.read(0, 3) == bytes(3)  # the old object names the new device 1 now
        _agree(pool, 1, 64)


def test_two_handles_of_one_device_see_each_other(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        a = pool.create_thin(1, 4 << 20)
        b = pool.device(1)
        assert b.read(0, 1) == b"\0"  # b caches "unmapped"
        a.write(0, b"A")
        assert b.read(0, 1) == b"A"
        b.discard(0, CH)
        assert a.read(0, 1) == b"\0"


def test_reads_across_leaf_boundaries_and_gaps(tmp_path) -> None:
    """Several leaves (a leaf holds at most 252 mappings), holes between and below them: every single-chunk and
    multi-chunk read matches the model and every lookup the tree."""
    rng = random.Random(5)
    nr = 2000
    with Pool.create(tmp_path / "p", data_size=(nr + 64) * CH) as pool:
        dev = pool.create_thin(1, nr * CH)
        model = bytearray(nr * CH)
        chunks = sorted(rng.sample(range(10, nr), 1200))
        for c in chunks:
            piece = rng.randbytes(16)
            dev.write(c * CH + 8, piece)
            model[c * CH + 8:c * CH + 24] = piece
        pool.commit()
        for _ in range(600):
            c = rng.randrange(nr)
            assert dev.read(c * CH + 8, 16) == model[c * CH + 8:c * CH + 24]
        for _ in range(60):
            off = rng.randrange(0, nr * CH - 5 * CH)
            n = rng.randrange(1, 5 * CH)
            assert dev.read(off, n) == model[off:off + n]
        _agree(pool, 1, nr)
        assert pool.md.mapping_cache(1).fills < 40  # a few descents per leaf, not one per read


def test_writes_keep_the_cache_right_while_leaves_split(tmp_path) -> None:
    rng = random.Random(9)
    nr = 1500
    with Pool.create(tmp_path / "p", data_size=(nr + 64) * CH) as pool:
        dev = pool.create_thin(1, nr * CH)
        order = list(range(nr))
        rng.shuffle(order)
        for i, c in enumerate(order):
            assert dev.read(c * CH, 1) == b"\0"  # cached as unmapped (a gap or a leaf), then mapped
            dev.write(c * CH, bytes([1 + i % 250]))
            assert dev.read(c * CH, 1) == bytes([1 + i % 250])
        _agree(pool, 1, nr)


def test_a_corrupt_leaf_still_raises(tmp_path) -> None:
    pool = Pool.create(tmp_path / "p", data_size=64 << 20)
    try:
        dev = pool.create_thin(1, 4 << 20)
        dev.write(0, b"x")
        md = pool.md
        # a mapping past the data device, put into the tree behind the metadata's checks
        md.mapping_root, sub, _ = md.tree.insert(md.mapping_root, 1, 5, pack_block_time(md.nr_data_blocks + 7, 0))
        md._forget_mappings(1)
        md._roots[1] = sub
        with pytest.raises(MetadataCorrupt):
            dev.read(5 * CH, 1)
        assert dev.read(0, 1) == b"x"  # the rest of the leaf still reads
    finally:
        pool.crash_close()


def test_random_operations_against_a_model(tmp_path) -> None:
    """Writes, discards, snapshots, deletes, commits and aborts in random order; after every step the fast-path
    reads equal the byte model and every cached lookup equals the tree."""
    rng = random.Random(77)
    size = 48 * CH
    with Pool.create(tmp_path / "p", data_size=1024 * CH) as pool:
        pool.create_thin(1, size)
        models = {1: bytearray(size)}
        committed = {1: bytearray(size)}
        devs = {1: pool.device(1)}
        next_id = 2
        for step in range(400):
            op = rng.random()
            ids = sorted(models)
            d = rng.choice(ids)
            if op < 0.5:
                off = rng.randrange(size)
                n = min(size - off, rng.choice([1, 512, 4096, CH, 3 * CH + 5]))
                data = rng.randbytes(n)
                devs[d].write(off, data)
                models[d][off:off + n] = data
            elif op < 0.6:
                off = rng.randrange(0, size, CH)
                n = rng.randrange(1, 4) * CH
                n = min(n, size - off)
                devs[d].discard(off, n)
                models[d][off:off + n] = bytes(n)
            elif op < 0.7 and len(models) < 6:
                pool.create_snap(next_id, d)  # commits
                models[next_id] = bytearray(models[d])
                devs[next_id] = pool.device(next_id)
                next_id += 1
                committed = {k: bytearray(v) for k, v in models.items()}
            elif op < 0.75 and len(models) > 1:
                pool.delete_thin(d)  # commits
                del models[d], devs[d]
                committed = {k: bytearray(v) for k, v in models.items()}
            elif op < 0.85:
                pool.commit()
                committed = {k: bytearray(v) for k, v in models.items()}
            elif op < 0.9 and not pool._overwrote_committed():  # else the abort would (rightly) fail the pool
                pool.abort_command()
                models = {k: bytearray(v) for k, v in committed.items()}
            for k in models:
                for _ in range(4):
                    off = rng.randrange(size)
                    n = min(size - off, rng.choice([1, 4096, 2 * CH]))
                    assert devs[k].read(off, n) == models[k][off:off + n], (step, k, off, n)
        for k in models:
            _agree(pool, k, size // CH)
            assert devs[k].read(0, size) == models[k]


def test_a_scattered_large_read_is_filled_in_place(tmp_path) -> None:
    """A 1 MiB read whose chunks lie in several places (a snapshot overwrote every fourth chunk) and holes: the
    bytes object is filled in place and equals the model; it is a real bytes (hashable, immutable)."""
    rng = random.Random(3)
    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        dev = pool.create_thin(1, 8 << 20)
        model = bytearray(8 << 20)
        base = rng.randbytes(3 << 20)
        dev.write(0, base)
        model[:3 << 20] = base
        snap = pool.create_snap(2, 1)
        smodel = bytearray(model)
        for c in range(0, 48, 4):
            piece = rng.randbytes(100)
            snap.write(c * CH + 50, piece)
            smodel[c * CH + 50:c * CH + 150] = piece
        for off in (0, 12345, (1 << 20) + 7, (5 << 19), (3 << 20) - 4096):
            got = snap.read(off, 1 << 20)
            assert type(got) is bytes and got == bytes(smodel[off:off + (1 << 20)])
            assert hash(got) == hash(bytes(smodel[off:off + (1 << 20)]))
            assert dev.read(off, 1 << 20) == bytes(model[off:off + (1 << 20)])


def test_new_bytes_is_an_ordinary_bytes_object() -> None:
    from thinpool.io.device import new_bytes

    made = new_bytes(5)
    assert made is not None
    out, view = made
    view[:] = b"hello"
    view.release()
    assert out == b"hello" and type(out) is bytes and {out: 1}[b"hello"] == 1
