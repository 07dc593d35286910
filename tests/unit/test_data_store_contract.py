"""One contract for every data store the pool runs on (the sparse file, the in-memory and the fault-injecting
stores): the same calls, the same bytes. A store missing a call the data path uses (as `preadinto` once was on the
test stores) fails here, not in a rare read path."""

from __future__ import annotations

import pytest

from thinpool.io.data_store import DataStore, DataStoreProtocol
from thinpool.testing.faulty import FaultPlan, FaultyDataStore, MemoryDataStore

CH = 64 * 1024


def _file(tmp_path):
    p = tmp_path / "data"
    p.write_bytes(b"")
    import os

    os.truncate(p, 8 * CH)
    return DataStore(str(p), CH)


@pytest.fixture(params=["file", "memory", "faulty"])
def store(request, tmp_path):
    if request.param == "file":
        s = _file(tmp_path)
    elif request.param == "memory":
        s = MemoryDataStore(8 * CH, CH)
    else:
        s = FaultyDataStore(MemoryDataStore(8 * CH, CH), FaultPlan())
    yield s
    s.close()


def test_every_store_has_the_whole_protocol(store) -> None:
    assert isinstance(store, DataStoreProtocol)


def test_reads_writes_copy_punch_agree(store) -> None:
    store.pwrite(CH + 10, b"hello")
    assert store.pread(CH + 8, 9) == b"\0\0hello\0\0"
    buf = bytearray(b"x" * 9)
    store.preadinto(CH + 8, memoryview(buf))
    assert bytes(buf) == b"\0\0hello\0\0"
    store.copy(CH, 3 * CH, CH)
    assert store.pread(3 * CH + 10, 5) == b"hello"
    store.punch(CH, CH)
    assert store.pread(CH + 10, 5) == bytes(5) and store.pread(3 * CH + 10, 5) == b"hello"
    store.sync()
