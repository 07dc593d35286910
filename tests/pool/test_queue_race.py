"""no_space=queue: a write that waits for data space releases the pool lock, and other writers of the same device
change its chunks meanwhile (thin.py ThinDevice._write_chunks): they complete a pending copy-on-write, discard a
pending chunk, break shared chunks into new pending ones. When space is added (another process grows the data
file, or Pool.resize, which commits), the waiting write plans again from the mappings and the table of pending
chunks as they are then. Deterministic: the waiting writer announces itself through Pool.on_queue (called under
the pool lock just before it waits), the other writer then takes the lock (so it runs only while the first one
waits) and holds it across all its changes. The result is compared with a byte model, after a reopen too, and
both thin_checks accept the metadata.

What it caught: the waiting write kept waiting for the number of blocks it needed before the others ran (6 here),
when it needed 3 once they had broken three of its chunks: with no timeout it waited forever (Pool.no_data_space
now asks the write what it needs after every wake). The write that took its list of pending chunks before the
wait (the code before f2a0d67) fails the grow-data-file case: chunk 4, broken by the other writer while it
waited and then rewritten whole by it, stays pending and its copy would bring back the snapshot's bytes.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from pool_helpers import check_pool

from thinpool.pool import Pool

CH = 64 << 10
K4 = 4096
DEV_CHUNKS = 8


@pytest.mark.external
@pytest.mark.parametrize("add_space", ["grow-data-file", "resize"])
def test_queued_write_replans_after_others_change_its_chunks(tmp_path: Path, add_space: str) -> None:
    rng = random.Random(15)
    path = tmp_path / "pool"
    # device 1: 8 chunks of random bytes (8 blocks), a snapshot shares them all; 13 blocks in all
    p = Pool.create(path, data_size=13 * CH, chunk_size=CH, no_space="queue", no_space_timeout=0)
    d = p.create_thin(1, DEV_CHUNKS * CH)
    orig = rng.randbytes(DEV_CHUNKS * CH)
    d.write(0, orig)
    p.create_snap(2, 1)
    model = bytearray(orig)

    def write(off: int, data: bytes) -> None:
        d.write(off, data)
        model[off:off + len(data)] = data

    # two deferred breaks outside writer A's range: chunks 0 and 7 pending (10 blocks used, 3 free)
    write(0, rng.randbytes(K4))
    write(7 * CH + 4 * K4, rng.randbytes(K4))
    assert sorted(d._pend) == [0, 7]

    # writer A: chunks 1..6, all shared (needs 6 blocks, 3 free), none pending yet: waits
    a_off, a_data = 1 * CH + 2 * K4, rng.randbytes(5 * CH - K4)  # to 6 * CH + 4 KiB
    queued = threading.Event()
    p.on_queue = lambda pool, need, timeout: queued.set()
    errors: list[BaseException] = []

    def writer_a() -> None:
        try:
            d.write(a_off, a_data)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    t = threading.Thread(target=writer_a)
    t.start()
    assert queued.wait(10), "writer A did not queue"
    with p.lock:  # A waits (the condition released the lock): all of these run before it can look again
        assert p.out_of_data_space and t.is_alive()
        write(2 * CH + 4 * K4, rng.randbytes(K4))  # breaks chunk 2: pending
        write(2 * CH + 100, rng.randbytes(10))  # unaligned: completes chunk 2's copy (no block needed)
        write(3 * CH, rng.randbytes(K4))  # breaks chunk 3: pending
        d.discard(3 * CH, CH)  # pending chunk 3 goes (its mapping and new block): unmapped
        model[3 * CH:4 * CH] = bytes(CH)
        write(4 * CH + 2 * K4, rng.randbytes(K4))  # breaks chunk 4 (A rewrites all of it)
        write(6 * CH, rng.randbytes(2 * K4))  # breaks chunk 6 (A rewrites only its first 4 KiB)
        assert sorted(d._pend) == [0, 4, 6, 7]
        assert t.is_alive()
    model[a_off:a_off + len(a_data)] = a_data  # A's write lands after all of these
    if add_space == "grow-data-file":  # another process grows the file: A takes it up at its next look
        Pool.grow_data_file(path, 17 * CH)
    else:  # resize commits (every pending copy completes) and wakes A
        p.resize(17 * CH)
    t.join(20)
    assert not t.is_alive(), "writer A did not finish after space was added"
    assert not errors, errors
    if add_space == "grow-data-file":  # (before any read: a read of a pending chunk completes its copy)
        # chunk 4 fully written since its break: dropped; chunk 6 keeps its unwritten sectors pending
        assert sorted(d._pend) == [0, 6, 7]
    else:
        assert not d._pend
    assert not p.out_of_data_space
    assert p.device(2).read(0, DEV_CHUNKS * CH) == orig  # the snapshot is untouched
    assert d.read(0, DEV_CHUNKS * CH) == bytes(model)
    p.close()
    check_pool(path)
    with Pool.open(path) as p2:
        assert p2.device(1).read(0, DEV_CHUNKS * CH) == bytes(model)
        assert p2.device(2).read(0, DEV_CHUNKS * CH) == orig
