"""Data reference counts stop at 2^32 - 1 (the ref-count tree holds 4-byte values, as the kernel's uint32_t): inc and
inc_many refuse to pass it with a typed error and change nothing; inc_many used to wrap a count to 0 in uint32, so
a referenced block read as free (found by review4)."""

import numpy as np
import pytest

from thinpool.errors import ThinpoolError
from thinpool.io.block_store import MemoryBlockStore
from thinpool.metadata.pool_metadata import PoolMetadata


def _sm():
    return PoolMetadata.format(MemoryBlockStore(4096), data_block_size=128, nr_data_blocks=1000).data_sm


def test_inc_many_past_uint32_is_refused_not_wrapped() -> None:
    sm = _sm()
    sm.inc(7, (1 << 32) - 1)
    with pytest.raises(ThinpoolError):
        sm.inc_many(np.array([7], dtype=np.int64))
    assert sm.count(7) == (1 << 32) - 1


def test_inc_past_uint32_is_a_thinpool_error() -> None:
    sm = _sm()
    sm.inc(7, (1 << 32) - 1)
    with pytest.raises(ThinpoolError):
        sm.inc(7)
    assert sm.count(7) == (1 << 32) - 1


def test_inc_many_refused_on_a_later_page_changes_no_earlier_page() -> None:
    sm = PoolMetadata.format(MemoryBlockStore(4096), data_block_size=128, nr_data_blocks=40000).data_sm
    sm.inc(20000, (1 << 32) - 1)  # the second bitmap page (16,320 entries a page)
    allocated = sm.nr_allocated()
    with pytest.raises(ThinpoolError):
        sm.inc_many(np.array([3, 3, 20000], dtype=np.int64))
    assert sm.count(3) == 0 and sm.count(20000) == (1 << 32) - 1 and sm.nr_allocated() == allocated
