"""`thinpool restore` refuses a <superblock> whose optional flags/version attributes are not numbers with one error
line (exit 1) and writes no output, as for every other attribute (found by review3: it was a traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import fails

XML = ('<superblock uuid="" time="1" transaction="3" flags="{flags}" version="{version}" data_block_size="128" '
       'nr_data_blocks="16">\n  <device dev_id="1" mapped_blocks="1" transaction="0" creation_time="0" '
       'snap_time="1">\n    <single_mapping origin_block="0" data_block="0" time="0"/>\n  </device>\n'
       '</superblock>\n')


@pytest.mark.parametrize("flags,version", [("abc", "2"), ("0", "two"), ("", "2"), ("0x1", "2"), ("-1", "2")])
def test_non_numeric_superblock_attributes_are_one_error_line(tmp_path: Path, flags: str, version: str) -> None:
    xml = tmp_path / "in.xml"
    xml.write_text(XML.format(flags=flags, version=version))
    out = tmp_path / "out.bin"
    r = fails(1, "restore", "-i", xml, "-o", out)
    assert "flags" in r.stderr or "version" in r.stderr
    assert not out.exists()
