"""A remap (a copy-on-write break: an existing mapping replaced) marks the device's details changed, as the
kernel's ``__insert`` sets ``td->changed`` on every insert. Otherwise, after ``reserve_metadata_snap``, the commit
kept the details leaf shared with the held metadata snapshot while the device's mapping leaf was not, and Rust
thin_check 1.1.0 rejected the metadata ("metadata snap: unexpected thin ids"). Found by review3."""

from __future__ import annotations

from pathlib import Path

import pytest
from oracles import assert_thin_check

from thinpool.pool import Pool

pytestmark = pytest.mark.external

CH = 64 << 10


@pytest.mark.parametrize("how", ["whole-chunk break", "deferred (sector) break", "one more device"])
def test_cow_break_after_a_metadata_snapshot_passes_both_checkers(tmp_path: Path, how: str) -> None:
    p = Pool.create(tmp_path / "pool", data_size=40 * CH, chunk_size=CH)
    p.create_thin(0, 4 * CH).write(0, b"x" * 4 * CH)
    p.create_snap(1, 0)
    if how == "one more device":
        p.create_thin(2, CH)
    p.reserve_metadata_snap()
    d = p.device(0)
    if how == "deferred (sector) break":
        d.write(4096, b"y" * 4096)
    else:
        d.write(0, b"y" * CH)  # a remap: mapped_blocks unchanged
    p.close()
    md = tmp_path / "pool" / "metadata"
    assert_thin_check(md)
    assert_thin_check(md, "-m")  # the held snapshot too
    p = Pool.open(tmp_path / "pool")
    want = b"x" * 4096 + b"y" * 4096 + b"x" * (CH - 8192) if how == "deferred (sector) break" else b"y" * CH
    assert p.device(0).read(0, CH) == want
    assert p.device(1).read(0, CH) == b"x" * CH
    p.close()
