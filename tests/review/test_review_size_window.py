"""Review: resize_device's grow zeroes the old last chunk's tail under a provisional size written into the
current manifest entry in place (pool.py, e["size"] = size). A kept handle that refreshes its cached size in that
window caches the provisional size against the unchanged manifest object; if the resize then fails, the handle
keeps the size that never came into being."""

from __future__ import annotations

import pytest

from thinpool.errors import NoDataSpace, OutOfBounds
from thinpool.pool import Pool

CH = 64 << 10


class _Hooked:
    def __init__(self, inner, hook) -> None:
        self.inner, self.hook = inner, hook

    def _run(self) -> None:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()

    def pwrite(self, offset, data):
        self._run()
        return self.inner.pwrite(offset, data)

    def punch(self, offset, length):
        self._run()
        return self.inner.punch(offset, length)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_failed_grow_leaves_no_kept_handle_with_the_provisional_size(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=64 * CH) as pool:
        a = pool.create_thin(1, 2 * CH + 4096)
        a.write(0, b"x" * (2 * CH + 4096))
        kept = pool.device(1)
        kept.read(0, 512)  # caches the size against the current manifest
        pool.create_thin(2, CH)  # a new manifest object: kept's cached size is stale, refreshed at its next I/O

        def during() -> None:
            kept.read(0, 512)  # (another thread's I/O) refreshes the size now
            raise NoDataSpace(requested=1)  # the grow fails after the refresh

        pool.data = _Hooked(pool.data, during)
        with pytest.raises(NoDataSpace):
            pool.resize_device(1, 8 * CH)
        pool.data = pool.data.inner
        assert pool.device_size(1) == 2 * CH + 4096
        assert kept.size == 2 * CH + 4096  # (the property reads the manifest; the I/O paths use the cache)
        with pytest.raises(OutOfBounds):
            kept.read(5 * CH, 512)  # past the real end: today it reads zeros
        with pytest.raises(OutOfBounds):
            kept.write(5 * CH, b"z")  # today: maps chunk 5 of a device 2 chunks + 4 KiB long
