"""Pool files are created 0600 and a new pool directory 0750, whatever a permissive umask says."""

from __future__ import annotations

import os
import stat

from thinpool.pool import Pool


def test_new_pool_files_are_private(tmp_path):
    old = os.umask(0)
    try:
        with Pool.create(str(tmp_path / "p"), data_size=1 << 20, chunk_size=64 << 10) as pool:
            pool.create_thin(1, 1 << 20, name="vol")
    finally:
        os.umask(old)
    d = tmp_path / "p"
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    for name in ("metadata", "data", "pool.json"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
