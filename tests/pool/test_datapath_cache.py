"""The per-device mapping cache (metadata/thin_device.py MappingCache) and the single-chunk fast paths of
ThinDevice.read/write: every answer equals an uncached tree lookup, across snapshots, discards, commits, aborts,
deletes and re-creates, several handles of one device, leaf boundaries and gaps, and corrupt leaves."""

from __future__ import annotations

import random

import pytest

from thinpool.errors import DeviceNotFound, MetadataCorrupt, OutOfBounds
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


def test_writes_of_any_buffer_count_bytes_not_items(tmp_path) -> None:
    """The fast path sizes a write in bytes whatever the buffer (an array of 8-byte items, a memoryview of one)."""
    from array import array

    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        dev = pool.create_thin(1, 4 << 20)
        dev.write(0, b"\0" * CH)  # provisioned: the next writes take the fast path
        items = array("Q", range(100, 164))
        dev.write(8, items)
        dev.write(1000, memoryview(items))
        assert dev.read(8, 512) == items.tobytes() and dev.read(1000, 512) == items.tobytes()
        with pytest.raises(OutOfBounds):
            dev.write((4 << 20) - 256, items)  # 512 bytes: past the end, though only 64 items


def test_lock_free_reads_never_see_another_devices_blocks(tmp_path) -> None:
    """Readers on other threads (the lock-free single-chunk path) while a writer discards the device's chunks,
    commits (passdown punches and frees them) and reuses the blocks for another device: every read returns the
    device's own bytes or zeros, never the other device's."""
    import threading

    with Pool.create(tmp_path / "p", data_size=40 * CH, discard="passdown") as pool:
        a = pool.create_thin(1, 16 * CH)
        b = pool.create_thin(2, 16 * CH)
        a.write(0, b"A" * (16 * CH))
        pool.commit()
        stop = threading.Event()
        bad: list[bytes] = []

        def reader() -> None:
            rng = random.Random(threading.get_ident())
            while not stop.is_set():
                got = a.read(rng.randrange(16) * CH + rng.randrange(0, CH - 4096, 512), 4096)
                if got not in (b"A" * 4096, bytes(4096)):
                    bad.append(got[:8])

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            rng = random.Random(1)
            for _ in range(60):
                c = rng.randrange(16)
                a.discard(c * CH, CH)
                pool.commit()  # the chunk's block is free (and punched) now
                b.write(rng.randrange(16) * CH, b"B" * CH)  # may take that block
                a.write(c * CH, b"A" * CH)
                pool.commit()
                b.discard(0, 16 * CH)
                pool.commit()
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not bad, bad[:3]


class _Interfering:
    """The pool's data store, running ``hook`` once just before the next pread/preadinto: what another thread
    could do while a lock-free read is between its lookup and its read."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.hook = None

    def _run(self) -> None:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()

    def pread(self, offset, length):
        self._run()
        return self.inner.pread(offset, length)

    def preadinto(self, offset, view):
        self._run()
        return self.inner.preadinto(offset, view)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("into", [False, True])
@pytest.mark.parametrize("how", ["discard-commit", "abort", "cow-commit"])
def test_a_lock_free_read_racing_a_block_reuse_is_redone(tmp_path, how, into) -> None:
    """Between a lock-free read's lookup and its pread, the chunk's block is freed and handed to another device
    (discard + commit; abort of the transaction that mapped it; a copy-on-write, after the sharing snapshot was
    deleted, then a commit), which writes it: the read notices (the cache was dropped, or a commit happened) and
    is redone under the lock, returning the chunk's current bytes, never the other device's."""
    nr = 8
    pool = Pool.create(tmp_path / "p", data_size=nr * CH, discard="passdown")
    try:
        a = pool.create_thin(1, nr * CH)
        b = pool.create_thin(2, nr * CH)
        want = bytes(4096)
        if how == "abort":
            a.write(0, b"A" * ((nr - 1) * CH))
            pool.commit()
            a.write((nr - 1) * CH, b"A" * CH)  # mapped in the open transaction only
            c = nr - 1
        elif how == "cow-commit":
            a.write(0, b"A" * ((nr - 1) * CH))
            pool.create_snap(3, 1)
            pool.delete_thin(3)  # the chunks still look shared (their time is older than the snapshot)
            c = 3
            want = b"C" * 4096
        else:
            a.write(0, b"A" * (nr * CH))
            pool.commit()
            c = 3
        assert a.read(c * CH, 4096) == b"A" * 4096  # cached
        store = pool.data = _Interfering(pool.data)

        def reuse() -> None:
            if how == "abort":
                pool.md.abort()  # (what a failed command's abort does to the metadata)
            elif how == "cow-commit":
                a.write(c * CH, b"C" * CH)  # copy-on-write to the one free block; the old block is freed
                pool.commit()
            else:
                a.discard(c * CH, CH)
                pool.commit()
            b.write(0, b"B" * CH)  # the only free block: the one chunk c had
            assert b.md.find_block(0) is not None

        store.hook = reuse
        if into:
            buf = bytearray(4096)
            a.readinto(c * CH, buf)
            got = bytes(buf)
        else:
            got = a.read(c * CH, 4096)
        assert got == want
        assert b.read(0, 4) == b"BBBB"
    finally:
        pool.crash_close()


def test_whole_chunk_runs_provision_and_break_without_copies(tmp_path) -> None:
    """Aligned multi-chunk writes whose every chunk needs a new block (fresh, shared after a snapshot, over an
    external origin) copy nothing and map every chunk; a run where some chunks are owned takes the general path;
    all read back as the model."""
    origin = random.Random(4).randbytes(6 * CH)
    (tmp_path / "origin.img").write_bytes(origin)
    with Pool.create(tmp_path / "p", data_size=256 * CH) as pool:
        dev = pool.create_thin(1, 32 * CH)
        model = bytearray(32 * CH)
        o = pool.create_thin(2, 8 * CH, origin=str(tmp_path / "origin.img"))
        omodel = bytearray(origin) + bytes(2 * CH)
        rng = random.Random(8)
        for off, n in ((0, 8), (8, 8), (4, 8)):  # fresh; fresh; half owned (general path)
            data = rng.randbytes(n * CH)
            dev.write(off * CH, data)
            model[off * CH:(off + n) * CH] = data
        pool.create_snap(3, 1)
        snap_model = bytes(model)
        data = rng.randbytes(16 * CH)
        dev.write(0, data)  # every chunk shared: break without copying
        model[:16 * CH] = data
        data = rng.randbytes(4 * CH)
        o.write(2 * CH, data)  # over the origin: whole chunks, nothing read from it
        omodel[2 * CH:6 * CH] = data
        assert pool.stats["cow_copies"] == 0
        assert dev.read(0, 32 * CH) == model and pool.device(3).read(0, 32 * CH) == snap_model
        assert o.read(0, 8 * CH) == omodel
        assert pool.md.get_device(1).mapped_blocks == 16
        _agree(pool, 1, 32)


def test_a_failed_whole_chunk_run_maps_and_keeps_nothing(tmp_path) -> None:
    class Failing(_Interfering):
        def pwrite(self, offset, data):
            raise OSError("injected")

    with Pool.create(tmp_path / "p", data_size=64 * CH) as pool:
        dev = pool.create_thin(1, 16 * CH)
        used = pool.nr_allocated_data_blocks
        real = pool.data
        pool.data = Failing(real)
        with pytest.raises(OSError):
            dev.write(0, bytes(8 * CH))
        pool.data = real
        assert pool.nr_allocated_data_blocks == used
        assert pool.md.get_device(1).mapped_blocks == 0 and dev.read(0, 8 * CH) == bytes(8 * CH)
        _agree(pool, 1, 16)
