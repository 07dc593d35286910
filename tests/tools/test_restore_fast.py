"""restore's fast XML path (thin_dump's exact layout, parsed with numpy) yields the same IR as the ElementTree
parser on every input it accepts, and gives up (so that the general parser's checks and messages apply) on any
other layout or bad value."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
from tools_helpers import random_pool, reopen

from thinpool.errors import InvalidArgument
from thinpool.metadata.dump import XmlWriter, dump
from thinpool.metadata.restore import IRCollector, MetadataIR, _parse_fast, parse_xml, read_xml

IMAGES = Path(__file__).resolve().parents[2] / "images"


def general(path: Path) -> MetadataIR:
    col = IRCollector()
    with open(path, "rb") as f:
        read_xml(f, col)
    assert col.ir is not None
    return col.ir


def flat(ir: MetadataIR) -> tuple[object, ...]:
    devs = []
    for d in ir.devices:
        cols = [np.concatenate([c[i] for c in ((r.steps[0], r.steps[1], r.equals[0], r.lengths) for r in d.runs)])
                .astype(np.int64).tolist() if d.runs else [] for i in range(4)]
        devs.append((d.dev_id, d.transaction, d.creation_time, d.snap_time, d.mapped_blocks, cols))
    return (ir.time, ir.transaction, ir.flags, ir.version, ir.data_block_size, ir.nr_data_blocks, devs)


def xml_of_pool(seed: int) -> str:
    store, _ = random_pool(seed)
    buf = io.StringIO()
    dump(reopen(store), XmlWriter(buf))
    return buf.getvalue()


@pytest.mark.parametrize("seed", range(4))
def test_fast_path_equals_the_general_parser(seed: int, tmp_path: Path) -> None:
    text = xml_of_pool(seed)
    assert "range_mapping" in text and "single_mapping" in text  # mixed stretches are exercised
    p = tmp_path / "d.xml"
    p.write_text(text)
    fast = _parse_fast(p)
    assert fast is not None
    assert flat(fast) == flat(general(p))


@pytest.mark.parametrize("name", sorted(x.name[:-len(".thin_dump.xml")] for x in IMAGES.glob("*.thin_dump.xml")))
def test_fast_path_reads_thin_dump_output(name: str) -> None:
    p = IMAGES / f"{name}.thin_dump.xml"  # written by the real thin_dump
    fast = _parse_fast(p)
    if fast is not None:
        assert flat(fast) == flat(general(p))


def test_small_chunks_split_lines_and_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from thinpool.metadata import restore

    monkeypatch.setattr(restore, "_FAST_CHUNK", 300)
    p = tmp_path / "d.xml"
    p.write_text(xml_of_pool(2))
    fast = _parse_fast(p)
    assert fast is not None and flat(fast) == flat(general(p))


@pytest.mark.parametrize("edit", [
    ("time=\"", "time=\"9999999999999999999999"),  # too long for int64
    ("data_block=\"", "data_block=\"-"),
    ("    <single_mapping", "   <single_mapping"),  # other indentation
    ("<single_mapping", "<!-- x --><single_mapping"),
    ("  </device>", "  </device> "),
    ("time=\"", "time=\"16777216"),  # beyond 24 bits: the general parser's error
    ("data_block=\"", "data_block=\"1 2"),
])
def test_other_layouts_and_bad_values_go_to_the_general_parser(edit: tuple[str, str], tmp_path: Path) -> None:
    text = xml_of_pool(1)
    old, new = edit
    i = [m for m in range(len(text)) if text.startswith(old, m)]
    pos = random.Random(0).choice(i)
    bad = text[:pos] + new + text[pos + len(old):]
    p = tmp_path / "d.xml"
    p.write_text(bad)
    assert _parse_fast(p) is None
    try:
        want: object = flat(general(p))
    except InvalidArgument as e:
        want = e.fields
    try:
        got: object = flat(parse_xml(str(p)))
    except InvalidArgument as e:
        got = e.fields
    assert got == want


def _cli(*args: object) -> tuple[int, str]:
    from click.testing import CliRunner

    from thinpool_cli.main import cli

    r = CliRunner().invoke(cli, [str(a) for a in args], env={"THINPOOL_POOL": None}, catch_exceptions=False)
    return r.exit_code, r.stderr


def test_restore_restarts_with_the_general_parser_midway(tmp_path: Path) -> None:
    """The fast path feeds device after device into the scratch build, meets a comment, gives up; the general
    parser builds it all again: the result dumps like the source."""
    text = xml_of_pool(3)
    cut = text.index("  <device", text.index("  <device") + 1)
    odd = text[:cut] + "  <!-- a comment thin_dump never writes -->\n" + text[cut:]
    src = tmp_path / "in.xml"
    src.write_text(odd)
    out = tmp_path / "out.bin"
    code, err = _cli("restore", "-i", src, "-o", out, "-q")
    assert code == 0, err
    got = io.StringIO()
    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.pool_metadata import PoolMetadata

    dump(PoolMetadata.open(FileBlockStore(out, readonly=True), readonly=True, space_maps=False), XmlWriter(got))
    assert got.getvalue() == text


def test_restore_of_bad_xml_leaves_the_target_unchanged(tmp_path: Path) -> None:
    text = xml_of_pool(0)
    src = tmp_path / "in.xml"
    src.write_text(text)
    out = tmp_path / "out.bin"
    assert _cli("restore", "-i", src, "-o", out, "-q")[0] == 0
    before = out.read_bytes()
    last = text.rindex("  </device>")
    src.write_text(text[:last] + '    <single_mapping origin_block="5" data_block="99999999999" time="0"/>\n'
                   + text[last:])  # beyond the data device, in the last device: found after the others were built
    code, err = _cli("restore", "-i", src, "-o", out, "-q", "-f")
    assert code != 0 and "beyond end of data device" in err
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".thinpool-restore-")]
