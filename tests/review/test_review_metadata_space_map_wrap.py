"""Review of the paged metadata space map (spacemap/metadata_paged.py): thousands of small commits move its
allocation cursor through a two-bitmap metadata device and wrap it, with mapping leaves shared by four devices
(metadata counts >= 3, in its ref-count tree). The real thin_check accepts the result, thin_dump reads what
thinpool dump reads, and a crash with an open transaction reopens at the last commit."""

from __future__ import annotations

import pytest
from conftest import need_tool, run_tool
from oracles import assert_thin_check

from thinpool.pool import Pool
from thinpool.spacemap.paged import E

CH = 64 << 10


@pytest.mark.external
def test_the_metadata_cursor_wraps_over_two_bitmaps_and_thin_check_agrees(tmp_path) -> None:
    need_tool("thin_check", "thin_dump")
    path = tmp_path / "p"
    expect: dict[int, bytes] = {}
    with Pool.create(path, data_size=256 * CH, metadata_size=80 << 20) as pool:
        sm = pool.md.tm.sm
        assert sm.nr_blocks > E  # two bitmaps
        a = pool.create_thin(1, 128 * CH)
        a.write(0, b"a" * (64 * CH))
        for snap in (2, 3, 4):
            pool.create_snap(snap, 1)
        seen_second = False
        cursors = []
        for n in range(3000):
            c = n % 64
            piece = bytes([n % 251]) * 512
            a.write(c * CH, piece)
            expect[c] = piece
            pool.commit()
            if n % 250 == 0:
                cursors.append(sm._cursor)
                seen_second = seen_second or sm.used_from(E) is not None
        assert seen_second, "no metadata block of the second bitmap was ever used"
        assert any(b < a_ for a_, b in zip(cursors, cursors[1:])), f"the cursor never wrapped: {cursors}"
        a.write(100 * CH, b"U" * 512)  # a new mapping, uncommitted when the process dies
        pool.crash_close()
    md = str(path / "metadata")
    assert_thin_check(md)
    from click.testing import CliRunner

    from cli.main import cli

    ours = CliRunner().invoke(cli, ["dump", md], catch_exceptions=False)
    assert ours.exit_code == 0 and ours.stdout == run_tool("thin_dump", md).stdout
    with Pool.open(path) as pool:
        a = pool.device(1)
        for c, piece in expect.items():
            assert a.read(c * CH, 512) == piece, c
        assert a.read(100 * CH, 512) == bytes(512)  # the crash lost the uncommitted mapping
        for snap in (2, 3, 4):
            assert pool.device(snap).read(5 * CH, 512) == b"a" * 512
