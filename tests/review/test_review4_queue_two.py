"""Review 4: no_space=queue with two queued writers that need some of the same chunks (1a90de2: the wait asks
the write what it needs after every wake).

Device 1 fills the pool. Writer A wants chunks 0..3 of device 2 (4 blocks, the last only its first half), writer
B the second half of chunk 3 and chunks 4..5 (3 blocks): 6 blocks between them, chunk 3 wanted by both. Both
queue (Pool.on_queue). Device 1 then discards 4 chunks and the pool commits (the blocks become allocatable): one
writer takes its blocks, the other, woken, asks again and now needs one block fewer if the first mapped chunk 3
(or waits for 4 if B went first and A still needs 4 - 1). A resize then adds the rest and both finish. The
bytes (disjoint between A and B) equal a byte model whatever order they ran in, after a reopen too, and both
real checkers accept the metadata.
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
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_queued_writers_sharing_a_chunk_replan_after_a_discard_and_a_resize(tmp_path: Path, seed: int) -> None:
    need_tool("thin_check")
    rng = random.Random(seed)
    path = tmp_path / "pool"
    p = Pool.create(path, data_size=8 * CH, chunk_size=CH, no_space="queue", no_space_timeout=0)
    try:
        p.create_thin(1, 8 * CH)
        p.create_thin(2, 8 * CH)
        d1_bytes = bytearray(rng.randbytes(8 * CH))
        p.device(1).write(0, bytes(d1_bytes))
        p.commit()
        model = bytearray(8 * CH)
        a_off, a_data = 0, rng.randbytes(3 * CH + CH // 2)
        b_off, b_data = 3 * CH + CH // 2, rng.randbytes(CH // 2 + 2 * CH)
        model[a_off:a_off + len(a_data)] = a_data
        model[b_off:b_off + len(b_data)] = b_data
        queued: list[int] = []
        both = threading.Event()

        def on_queue(pool, need, timeout) -> None:  # type: ignore[no-untyped-def]
            queued.append(need)
            if len(queued) >= 2:
                both.set()

        p.on_queue = on_queue
        errors: list[BaseException] = []

        def writer(off: int, data: bytes) -> None:
            try:
                p.device(2).write(off, data)
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        ta = threading.Thread(target=writer, args=(a_off, a_data))
        tb = threading.Thread(target=writer, args=(b_off, b_data))
        first, second = (ta, tb) if seed % 2 == 0 else (tb, ta)
        first.start()
        second.start()
        assert both.wait(30), queued
        assert sorted(queued[:2]) == [3, 4]
        with p.lock:
            assert ta.is_alive() and tb.is_alive() and p.out_of_data_space
            p.device(1).discard(4 * CH, 4 * CH)  # 4 blocks freed: allocatable after the commit
            d1_bytes[4 * CH:] = bytes(4 * CH)
            p.commit()
        # one of them can finish now; the other needs 1 or 2 blocks more than are left
        for _ in range(1200):  # (a hang guard, not a timing check)
            if not (ta.is_alive() and tb.is_alive()):
                break
            ta.join(0.05)
        assert not (ta.is_alive() and tb.is_alive()), "neither queued writer took the 4 blocks the commit freed"
        assert not errors, errors
        p.resize(11 * CH)
        ta.join(60)
        tb.join(60)
        assert not ta.is_alive() and not tb.is_alive(), "a queued writer did not finish after the resize"
        assert not errors, errors
        assert not p.out_of_data_space
        assert p.device(2).read(0, 8 * CH) == bytes(model)
        assert p.device(1).read(0, 8 * CH) == bytes(d1_bytes)
        assert p.md.data_sm.nr_allocated() == 4 + 6
        p.commit()
    finally:
        p.close()
    assert_thin_check(path / "metadata", what="two queued writers")
    with Pool.open(path) as q:
        assert q.device(2).read(0, 8 * CH) == bytes(model)
        assert q.device(1).read(0, 8 * CH) == bytes(d1_bytes)


@pytest.mark.parametrize("when", ["before", "while-queued"])
def test_queued_write_takes_blocks_a_discard_freed_in_the_open_transaction(tmp_path: Path, when: str) -> None:
    """Blocks a discard freed are allocatable only after a commit; a queued write that they would satisfy commits
    and goes on (as dm-thin's periodic commit and check_for_data_space do), whether the discard came before the
    write or while it waited (found by review4: it waited for a commit or a resize that might never come)."""
    p = Pool.create(tmp_path / "pool", data_size=8 * CH, chunk_size=CH, no_space="queue", no_space_timeout=30)
    try:
        p.create_thin(1, 8 * CH)
        p.create_thin(2, 8 * CH)
        p.device(1).write(0, b"x" * 8 * CH)
        p.commit()
        errors: list[BaseException] = []
        if when == "before":
            p.device(1).discard(0, 4 * CH)
            assert p.md.data_sm.nr_free() == 4 and not p.md.data_sm.has_free(1)
            p.device(2).write(0, b"y" * 2 * CH)
        else:
            queued = threading.Event()
            p.on_queue = lambda pool, need, timeout: queued.set()

            def writer() -> None:
                try:
                    p.device(2).write(0, b"y" * 2 * CH)
                except BaseException as e:  # reported by the main thread
                    errors.append(e)

            t = threading.Thread(target=writer)
            t.start()
            assert queued.wait(30)
            p.device(1).discard(0, 4 * CH)
            t.join(60)
            assert not t.is_alive()
        assert not errors, errors
        assert p.device(2).read(0, 2 * CH) == b"y" * 2 * CH
        assert p.device(1).read(0, 8 * CH) == bytes(4 * CH) + b"x" * 4 * CH
        p.commit()
    finally:
        p.close()
    with Pool.open(tmp_path / "pool") as q:
        assert q.device(2).read(0, 2 * CH) == b"y" * 2 * CH
        assert q.device(1).read(0, 8 * CH) == bytes(4 * CH) + b"x" * 4 * CH
