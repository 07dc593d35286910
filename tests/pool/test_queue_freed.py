"""no_space=queue: a queued write that blocks freed in the open transaction (a discard, a delete) would satisfy
commits and goes on, as dm-thin's periodic commit makes them allocatable and requeues the bios it held; it used to
wait for a commit or a resize that might never come (found by review4). With no_space=error the write is refused,
as dm-thin errors the bio before its next commit."""

from __future__ import annotations

from pathlib import Path

import pytest

from thinpool.errors import NoDataSpace
from thinpool.pool import Pool

CH = 64 << 10


def _full_then_discarded(path: Path, policy: str) -> Pool:
    p = Pool.create(path, data_size=8 * CH, chunk_size=CH, no_space=policy, no_space_timeout=3)
    p.create_thin(1, 8 * CH)
    p.create_thin(2, 8 * CH)
    p.device(1).write(0, b"x" * 8 * CH)
    p.commit()
    p.device(1).discard(0, 4 * CH)  # 4 blocks free, none allocatable before a commit
    assert p.md.data_sm.nr_free() == 4 and not p.md.data_sm.has_free(1)
    return p


def test_queued_write_commits_to_use_blocks_a_discard_freed(tmp_path: Path) -> None:
    with _full_then_discarded(tmp_path / "pool", "queue") as p:
        p.device(2).write(0, b"y" * 2 * CH)
        assert p.device(2).read(0, 2 * CH) == b"y" * 2 * CH
        assert p.device(1).read(0, 8 * CH) == bytes(4 * CH) + b"x" * 4 * CH
    with Pool.open(tmp_path / "pool") as p:
        assert p.device(2).read(0, 2 * CH) == b"y" * 2 * CH
        assert p.device(1).read(0, 8 * CH) == bytes(4 * CH) + b"x" * 4 * CH


def test_error_policy_refuses_until_a_commit(tmp_path: Path) -> None:
    with _full_then_discarded(tmp_path / "pool", "error") as p:
        with pytest.raises(NoDataSpace):
            p.device(2).write(0, b"y" * CH)
        p.commit()
        p.device(2).write(0, b"y" * CH)
        assert p.device(2).read(0, CH) == b"y" * CH
