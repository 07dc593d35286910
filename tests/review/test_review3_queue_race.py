"""Review: a write that waits for space (no_space=queue) while another thread leaves copies pending in its range.

The lead's closing note names this interleaving as untested: ``_write`` used to take the list of pending chunks
before the space check, but a queued wait releases the pool lock, and another writer of the same device can
break shared chunks of the waiting write's range meanwhile (deferred copies). Had the waiting write missed those
new pending chunks, their completion at the commit would copy the snapshot's sectors over its bytes.

Here thread A writes all 8 chunks of an origin a snapshot shares, on a full pool, and waits; thread B, once A
waits, frees space (discard + commit), makes sector writes into chunks 1, 3 and 5 of A's range (copies pending),
then grows the data file as another process would (no commit, so the copies stay pending). A then
completes. A's write is the last to land everywhere in its range: after the commit
and a reopen the origin reads A's bytes whole, the snapshot its old bytes, and both checkers accept.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from conftest import need_tool
from oracles import assert_thin_check

from thinpool.pool import Pool

CH = 64 << 10


@pytest.mark.external
@pytest.mark.parametrize("chunk_kib", [64, 256])
def test_a_queued_write_and_copies_left_pending_in_its_range_meanwhile(tmp_path: Path, chunk_kib: int) -> None:
    need_tool("thin_check")
    ch = chunk_kib << 10
    path = tmp_path / "pool"
    p = Pool.create(path, data_size=32 * ch, chunk_size=ch, no_space="queue", no_space_timeout=60)
    old = random.Random(1).randbytes(8 * ch)
    new = random.Random(2).randbytes(8 * ch)
    try:
        p.create_thin(1, 8 * ch).write(0, old)
        p.create_snap(2, 1)
        p.create_thin(3, 24 * ch).write(0, random.Random(3).randbytes(24 * ch))
        p.commit()
        assert not p.has_free_data_blocks(1)
        events: list[str] = []
        failures: list[BaseException] = []
        pending_seen: list[int] = []

        def other_writer() -> None:
            try:
                with p.lock:  # granted once A waits (the wait releases the pool lock)
                    events.append("B")
                    p.device(3).discard(0, 4 * ch)
                    p.commit()  # the 4 chunks free now (not before the commit)
                    d = p.device(1)
                    for c in (1, 3, 5):
                        d.write(c * ch + 8192, b"B" * 4096)  # deferred breaks: copies pending
                    pending_seen.extend(sorted(p.md.pending_copies(1)))
                    # more space as another process gives it (the data file grown; no commit here): A's wait
                    # takes it up in the open transaction, with the copies still pending
                    Pool.grow_data_file(path, 48 * ch)
            except BaseException as e:  # noqa: BLE001 (reported below)
                failures.append(e)

        started: list[threading.Thread] = []

        def on_queue(pool: Pool, need: int, timeout: float) -> None:
            if not started:
                events.append(f"A waits for {need}")
                t = threading.Thread(target=other_writer)
                started.append(t)
                t.start()

        p.on_queue = on_queue
        p.device(1).write(0, new)  # A: needs 8 chunks, none free: waits
        events.append("A done")
        started[0].join(30)
        assert not failures, failures
        assert events == ["A waits for 8", "B", "A done"], events
        assert pending_seen == [1, 3, 5]
        assert sorted(p.md.pending_copies(1)) == []  # A wrote them whole: nothing left to copy
        assert p.device(1).read(0, 8 * ch) == new
        p.commit()
        assert p.device(1).read(0, 8 * ch) == new
        assert p.device(2).read(0, 8 * ch) == old
    finally:
        p.close()
    with Pool.open(path, readonly=True) as ro:
        assert ro.device(1).read(0, 8 * ch) == new
        assert ro.device(2).read(0, 8 * ch) == old
        assert ro.device(3).read(0, 4 * ch) == bytes(4 * ch)
    assert_thin_check(path / "metadata")
