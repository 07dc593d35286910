"""Review: the mapping caches of all devices together stay within a pool-wide budget (today each device's cache
is capped at MAPPING_CACHE_MAX_ENTRIES, about 6 MiB, but nothing bounds their sum: memory grows with devices x
mappings read)."""

from __future__ import annotations

from thinpool.metadata.thin_device import MAPPING_CACHE_MAX_ENTRIES
from thinpool.pool import Pool

CH = 64 << 10


def test_the_caches_of_many_devices_share_one_budget(tmp_path) -> None:
    n = 2048
    with Pool.create(tmp_path / "p", data_size=(n + 64) * CH) as pool:
        a = pool.create_thin(1, n * CH)
        a.write(0, b"o" * (n * CH))
        for i in range(300):
            pool.create_snap(100 + i, 1)
        for i in range(300):
            dev = pool.device(100 + i)
            for c in range(n):
                dev.read(c * CH, 512)
        total = sum(len(c.map) for c in pool.md._mcaches.values())
        assert total <= 4 * MAPPING_CACHE_MAX_ENTRIES, total  # today: 614400 entries (~57 MB)
