"""Review: restore of XML whose numbers are out of range must fail with one typed error (no traceback, no
allocation proportional to a number in the input)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_helpers import IMAGES, fails  # noqa: E402

XML = (IMAGES / "f3_snapshot.xml").read_text()


def _restore_fails(tmp_path: Path, text: str) -> str:
    src = tmp_path / "in.xml"
    src.write_text(text)
    out = tmp_path / "out.bin"
    out.write_bytes(bytes(4 << 20))
    r = fails(1, "restore", "-i", src, "-o", out)
    assert out.read_bytes() == bytes(4 << 20)  # a failing command changes nothing
    return r.stderr


def test_a_range_longer_than_the_data_device_is_refused_before_it_is_expanded(tmp_path) -> None:
    # thin_restore: "mapping beyond end of data device (2048 >= 2048)"; here: numpy MemoryError (32 GiB)
    bad = XML.replace('data_begin="0" length="3"', 'data_begin="0" length="4294967296"', 1)
    assert bad != XML
    assert "beyond end of data device" in _restore_fails(tmp_path, bad)


@pytest.mark.parametrize("old,new", [
    ('creation_time="2" snap_time="2">', 'creation_time="2" snap_time="99999999999">'),
    ('creation_time="2" snap_time="2">', 'creation_time="4294967298" snap_time="2">'),
    ('flags="0"', 'flags="99999999999"'),
])
def test_a_number_too_wide_for_its_field_is_a_typed_error(tmp_path, old, new) -> None:
    # here: struct.error: 'I' format requires 0 <= number <= 4294967295 (a traceback)
    bad = XML.replace(old, new, 1)
    assert bad != XML
    _restore_fails(tmp_path, bad)


@pytest.mark.parametrize("value", ["18446744073709551616", "9223372036854775808"])
def test_a_data_block_past_int64_is_a_typed_error(tmp_path, value) -> None:
    # here: OverflowError: Python int too large to convert to C long (restore.py, np.array(..., int64))
    bad = XML.replace('data_block="10"', f'data_block="{value}"', 1)
    assert bad != XML
    _restore_fails(tmp_path, bad)
