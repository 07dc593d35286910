"""DataStore.pwrite counts bytes whatever buffer it is given: a memoryview of wider items, of several dimensions or
strided lands byte for byte where a bytes copy of it would (len() of such a view counts items, not bytes)."""

from __future__ import annotations

import os
from array import array

import pytest

from thinpool.io.data_store import DataStore

KiB = 1 << 10


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "data"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    s = DataStore(str(path), 64 * KiB)
    yield s
    s.close()


def _views():
    words = array("I", range(40 * KiB))  # 160 KiB: past one 64 KiB piece
    yield memoryview(words)
    yield memoryview(bytes(range(256)) * 48).cast("B", (48, 256))
    yield memoryview(bytes(range(256)) * 64)[::2]  # strided
    yield memoryview(array("d", [1.5] * 1000))


@pytest.mark.parametrize("view", list(_views()), ids=["uint32", "2-d", "strided", "double"])
def test_a_view_of_any_shape_is_written_as_its_bytes(store, view):
    expect = view.tobytes()
    store.pwrite(12 * KiB, view)
    store.sync()
    with open(store.path, "rb") as f:
        f.seek(12 * KiB)
        assert f.read(len(expect)) == expect
    assert store.bytes_written == len(expect)
    assert os.path.getsize(store.path) == 1 << 20
