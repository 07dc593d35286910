"""All-free bitmaps of a new pool are stamped in one numpy pass (issue 13: pool create at 8 TiB writes 8,225 of
them): the checksums equal the per-block stamp for any block number, and a new pool of many bitmaps passes the
real checkers."""

from __future__ import annotations

import numpy as np
import pytest
from md_helpers import new_pool_file

from thinpool.spacemap.paged import _FreeBitmap, free_bitmap_checksums


def test_batch_checksums_equal_the_per_block_stamp() -> None:
    rng = np.random.default_rng(1)
    blocks = [0, 1, 2, 3, 255, 256, 4095, 65535, 4_161_599, (1 << 40) + 5, (1 << 64) - 1]
    blocks += rng.integers(0, 1 << 32, 200).tolist()
    sums = free_bitmap_checksums(np.array(blocks, dtype=np.uint64)).tolist()
    for b, c in zip(blocks, sums):
        assert _FreeBitmap(b, c).encode() == _FreeBitmap(b).encode(), b
    assert free_bitmap_checksums(np.zeros(0, dtype=np.uint64)).tolist() == []


@pytest.mark.external
def test_a_new_pool_of_many_free_bitmaps_passes_both_checkers(tmp_path) -> None:
    from oracles import assert_thin_check

    path = tmp_path / "pool.bin"
    pmd = new_pool_file(path, nr_meta_blocks=8192, nr_data_blocks=700 * 16320 + 11)
    pmd.commit()
    pmd.close()
    assert_thin_check(path, what="new pool of 701 free bitmaps")
