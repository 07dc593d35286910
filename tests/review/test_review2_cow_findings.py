"""Review findings in the deferred copy-on-write (thinpool/thin.py, thinpool/pool.py), each a regression test:
every one failed before its fix (main at e3954d8): a refused multi-chunk write must not count a pending chunk's
sectors as written; Pool.trim must not punch a pending copy's source; a lock-free read must not see a full pending
entry dropped before its pwrite.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest

from thinpool.errors import NoDataSpace
from thinpool.pool import Pool

CH = 64 << 10


def _snapshotted(tmp_path: Path, chunks: int) -> tuple[Pool, bytes]:
    """Device 1 (4 chunks of random bytes, 4 data blocks used) and its snapshot, device 2; ``chunks`` in all."""
    p = Pool.create(tmp_path / "pool", data_size=chunks * CH, chunk_size=CH)
    d = p.create_thin(1, 4 * CH)
    old = random.Random(1).randbytes(4 * CH)
    d.write(0, old)
    p.create_snap(2, 1)
    return p, old


def test_refused_write_spanning_a_pending_chunk_leaves_its_bytes(tmp_path: Path) -> None:
    """BUG 1. ThinDevice._write notes the sectors of every pending chunk it touches as written
    (_note_range) BEFORE the space check; the write is then refused whole (NoDataSpace), nothing was written,
    yet the sectors count as written, so the later completion does not copy them: they read as the zeros
    placeholder instead of the snapshot's (committed) bytes. Fix: note after the space check."""
    p, old = _snapshotted(tmp_path, chunks=5)  # 4 blocks used, 1 free
    d = p.device(1)
    d.write(0, b"A" * 4096)  # deferred break of chunk 0: takes the last free block
    assert 0 in d._pend
    with pytest.raises(NoDataSpace):
        d.write(CH - 8192, b"B" * 16384)  # chunk 0 (pending, owned) + chunk 1 (shared: needs a block): refused
    assert d.read(0, CH) == b"A" * 4096 + old[4096:CH]  # the refused write changed nothing
    p.close()
    with Pool.open(tmp_path / "pool") as p2:
        assert p2.device(1).read(0, CH) == b"A" * 4096 + old[4096:CH]


def test_refused_write_with_queue_timeout_leaves_pending_bytes(tmp_path: Path) -> None:
    """BUG 1 under no_space=queue (a timeout): the same loss."""
    p = Pool.create(tmp_path / "pool", data_size=5 * CH, chunk_size=CH, no_space="queue", no_space_timeout=0.05)
    d = p.create_thin(1, 4 * CH)
    old = random.Random(2).randbytes(4 * CH)
    d.write(0, old)
    p.create_snap(2, 1)
    d.write(0, b"A" * 4096)
    with pytest.raises(NoDataSpace):
        d.write(CH - 8192, b"B" * 16384)
    assert d.read(0, CH) == b"A" * 4096 + old[4096:CH]
    p.close()


def test_trim_with_a_pending_copy_keeps_its_source(tmp_path: Path) -> None:
    """BUG 2. Pool.trim punches every data block whose *current* count is 0. A deferred break's source block
    whose other holder (the snapshot's chunk) was discarded in the same transaction has count 0 but is still
    the source of the pending copy (and still mapped by the last commit): trim punches it, and the origin's
    never-written sectors read as zeros. Fix: Pool.trim commits first (complete_pending + commit), so it only
    punches blocks free in the committed state too."""
    p, old = _snapshotted(tmp_path, chunks=16)
    d, snap = p.device(1), p.device(2)
    d.write(0, b"A" * 4096)  # deferred break of the origin's chunk 0
    snap.discard(0, CH)  # the old block's last holder goes (uncommitted)
    p.trim()
    assert d.read(0, CH) == b"A" * 4096 + old[4096:CH]
    p.close()


def _read_during_the_last_write(p: Pool, d: Any, ch: int) -> list[bytes]:
    """Write "B" over the last 4 KiB of chunk 0 and, inside that write's pwrite, read the same 4 KiB from another
    thread (the window of BUG 3): what the read returned, or nothing if it never finished."""
    seen: list[bytes] = []
    real = p.data.pwrite

    def pwrite(off: int, data: bytes | memoryview) -> None:
        if len(data) == 4096 and bytes(data[:1]) == b"B" and not seen:
            t = threading.Thread(target=lambda: seen.append(d.read(ch - 4096, 4096)))
            t.start()
            t.join(0.5)  # the reader either finished (lock-free) or waits for the pool lock (correct)
        real(off, data)

    p.data.pwrite = pwrite  # type: ignore[method-assign]
    try:
        d.write(ch - 4096, b"B" * 4096)
    finally:
        p.data.pwrite = real  # type: ignore[method-assign]
    for _ in range(100):
        if seen:
            break
        threading.Event().wait(0.01)
    return seen


def test_lock_free_read_during_the_write_that_completes_a_pending_chunk(tmp_path: Path) -> None:
    """BUG 3. The write that covers a pending chunk's last unwritten sectors deletes its pending entry
    (_note_written) BEFORE its pwrite. A lock-free read (another thread: FUSE, a long NBD read, a library user)
    that runs in that window finds the new mapping with no pending entry and reads the new block, whose
    unwritten sectors are the zeros placeholder: bytes the device never held (neither the old nor the new
    ones). Fix: delete the entry only after the pwrite (the entry with all bits set meanwhile sends a
    lock-free reader to the locked path, which waits for the writer)."""
    p, old = _snapshotted(tmp_path, chunks=16)
    d = p.device(1)
    d.write(0, b"A" * (CH - 4096))  # deferred: all but the last 4 KiB written
    assert 0 in d._pend
    seen = _read_during_the_last_write(p, d, CH)
    assert seen and seen[0] in (old[CH - 4096:CH], b"B" * 4096), "the read saw bytes never written"
    p.close()


def test_lock_free_read_window_with_large_chunks_shows_a_deleted_devices_bytes(tmp_path: Path) -> None:
    """BUG 3 with chunks above 128 KiB: the deferred break writes only its piece into the new block (no
    zeros around it), so the window of BUG 3 shows whatever the reused block held: here a deleted device's
    bytes (discard=ignore keeps them; nopassdown too). Same fix."""
    ch = 256 << 10
    p = Pool.create(tmp_path / "pool", data_size=6 * ch, chunk_size=ch, discard="ignore")
    p.create_thin(9, 2 * ch).write(0, b"S" * 2 * ch)
    d = p.create_thin(1, 2 * ch)
    old = random.Random(1).randbytes(2 * ch)
    d.write(0, old)
    p.create_snap(2, 1)
    p.delete_thin(9)
    p.commit()
    d.write(0, b"A" * (ch - 4096))  # deferred into a reused block
    seen = _read_during_the_last_write(p, d, ch)
    assert seen and seen[0] != b"S" * 4096, "a lock-free read returned a deleted device's bytes"
    assert seen[0] in (old[ch - 4096:ch], b"B" * 4096)
    p.close()
