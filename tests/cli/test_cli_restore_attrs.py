"""`thinpool restore`'s errors on bad input: a <superblock> whose optional flags/version attributes are not
numbers, an existing output too small for the bitmaps, a <ref> inside a <def>; one error line each, the output
untouched (found by review3)."""

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


_ONE_MAPPING = ('<superblock uuid="" time="1" transaction="1" flags="0" version="2" data_block_size="128" '
                'nr_data_blocks="200000">\n  <device dev_id="1" mapped_blocks="1" transaction="0" creation_time="0" '
                'snap_time="1">\n    <single_mapping origin_block="0" data_block="0" time="0"/>\n  </device>\n'
                '</superblock>\n')


def test_format_of_a_device_too_small_for_its_bitmaps_is_no_metadata_space() -> None:
    """The first commit of a format runs out of space: that error goes up (there is nothing to go back to; the
    abort used to reread the never-written superblock and report a checksum error instead). Found by review3."""
    from thinpool.errors import NoMetadataSpace
    from thinpool.io.block_store import MemoryBlockStore
    from thinpool.metadata.pool_metadata import PoolMetadata

    with pytest.raises(NoMetadataSpace):
        PoolMetadata.format(MemoryBlockStore(16), data_block_size=128, nr_data_blocks=200000)


@pytest.mark.parametrize("kib", [64, 72, 80])
def test_restore_into_a_tiny_existing_output_is_no_metadata_space(tmp_path: Path, kib: int) -> None:
    xml = tmp_path / "in.xml"
    xml.write_text(_ONE_MAPPING)
    out = tmp_path / "out.bin"
    with open(out, "wb") as f:
        f.truncate(kib << 10)
    before = out.read_bytes()
    r = fails(3, "restore", "-i", xml, "-o", out)
    assert "no metadata space" in r.stderr
    assert out.read_bytes() == before


def _def_bomb(levels: int) -> str:
    out = ['<superblock uuid="" time="1" transaction="1" flags="0" version="2" data_block_size="128" '
           'nr_data_blocks="100">', '  <def name="d0">']
    out += [f'    <single_mapping origin_block="{i}" data_block="{i}" time="0"/>' for i in range(10)]
    out.append("  </def>")
    for lv in range(1, levels + 1):
        out.append(f'  <def name="d{lv}">')
        out += [f'    <ref name="d{lv - 1}"/>'] * 10
        out.append("  </def>")
    out += ['  <device dev_id="1" mapped_blocks="10" transaction="0" creation_time="0" snap_time="1">',
            f'    <ref name="d{levels}"/>', "  </device>", "</superblock>"]
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("levels", [1, 3, 7])
def test_a_ref_inside_a_def_is_refused_as_rust_thin_restore_does(tmp_path: Path, levels: int) -> None:
    """Nested <def>s that each <ref> the one before ten times held 10^n runs in memory from a 2 KB file (7 levels:
    about 10 GB); Rust thin_restore refuses a <ref> outside a <device>, and so does restore now (review3)."""
    xml = tmp_path / "bomb.xml"
    xml.write_text(_def_bomb(levels))
    out = tmp_path / "out.bin"
    r = fails(1, "restore", "-i", xml, "-o", out)
    assert "<ref>" in r.stderr
    assert not out.exists()
