"""Review: `thinpool restore` on hostile XML: cut anywhere (mid-stream, past the fast path's first 1 MiB step,
at a line boundary), attributes replaced by junk, into a new output and over existing metadata with --force.

Every refused input: exit 1-5 with one `thinpool: error:` line and no traceback, an existing target byte for byte
as it was, no new output file, no scratch file left beside the target. Every accepted one passes thin_check.
Also an existing output too small: refused with no metadata space (exit 3), untouched.
"""

from __future__ import annotations

import hashlib
import random
import re
import subprocess
from pathlib import Path

import pytest
from conftest import need_tool

JUNK = ["abc", "", "-1", "1e3", " 5", "99999999999999999999999", "0x10", "1.5", "&amp;", "18446744073709551616"]


def _xml(nr_devices: int, nr_mappings: int, seed: int) -> str:
    rng = random.Random(seed)
    out = [f'<superblock uuid="" time="2" transaction="5" flags="0" version="2" data_block_size="128" '
           f'nr_data_blocks="{4 * nr_mappings}">']
    for d in range(1, nr_devices + 1):
        out.append(f'  <device dev_id="{d}" mapped_blocks="{nr_mappings}" transaction="0" creation_time="0" '
                   f'snap_time="1">')
        for i in range(nr_mappings):
            out.append(f'    <single_mapping origin_block="{2 * i}" data_block="{(7 * i + d) % (4 * nr_mappings)}" '
                       f'time="{rng.randrange(2)}"/>')
        out.append("  </device>")
    out.append("</superblock>")
    return "\n".join(out) + "\n"


def _sha(p: Path) -> str | None:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None


def _restore(xml: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["thinpool", "restore", "-i", str(xml), "-o", str(out), "-f", "-q"], capture_output=True,
                          text=True, timeout=300)


def _judge(r: subprocess.CompletedProcess[str], out: Path, before: str | None, what: str) -> None:
    assert "Traceback" not in r.stderr, (what, r.stderr[-800:])
    assert not list(out.parent.glob(".thinpool-restore-*")), (what, "scratch file left")
    if r.returncode == 0:
        c = subprocess.run(["thin_check", str(out)], capture_output=True, text=True)
        assert c.returncode == 0, (what, c.stderr)
        return
    assert r.returncode in (1, 2, 3, 4, 5), (what, r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("thinpool: error: "), (what, r.stderr)
    assert _sha(out) == before, (what, "the target changed")


@pytest.mark.external
@pytest.mark.parametrize("mode", ["new output", "existing metadata"])
def test_truncated_and_junk_xml_leave_the_target_untouched(tmp_path: Path, mode: str) -> None:
    need_tool("thin_check", "thin_restore")
    good = tmp_path / "good.xml"
    good.write_text(_xml(3, 2000, 1))  # about 420 KB
    big = tmp_path / "big.xml"
    big.write_text(_xml(2, 20000, 2))  # about 2.8 MB: cut past the fast path's first 1 MiB step
    existing = tmp_path / "existing.bin"
    with open(existing, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["thin_restore", "-i", str(good), "-o", str(existing)], check=True, capture_output=True)
    rng = random.Random(5)
    cases: list[tuple[str, bytes]] = []
    for src in (good, big):
        raw = src.read_bytes()
        newlines = [i for i, c in enumerate(raw) if c == 10]
        for cut in rng.sample(range(1, len(raw) - 1), 6) + [newlines[len(newlines) // 2] + 1, newlines[-2] + 1,
                                                              (1 << 20) + 17, 1 << 20]:
            if cut < len(raw) - 1:
                cases.append((f"{src.name} cut at {cut}", raw[:cut]))
    raw = good.read_bytes()
    head = raw[:raw.index(b"\n", raw.index(b"<device", 200)) + 1] + raw[-40000:]  # a few of each element
    attrs = list(re.finditer(rb'(\w+)="([^"]*)"', head))
    for _ in range(18):
        m = rng.choice(attrs)
        v = rng.choice(JUNK).encode()
        cases.append((f"{m.group(1).decode()}={v!r}", head[:m.start(2)] + v + head[m.end(2):]))
    xml = tmp_path / "in.xml"
    out = tmp_path / "out" / "md.bin"
    out.parent.mkdir()
    for what, data in cases:
        xml.write_bytes(data)
        if out.exists():
            out.unlink()
        if mode == "existing metadata":
            out.write_bytes(existing.read_bytes())
        _judge(_restore(xml, out), out, _sha(out), what)


@pytest.mark.external
def test_an_existing_output_too_small_is_no_metadata_space(tmp_path: Path) -> None:
    xml = tmp_path / "in.xml"
    xml.write_text(_xml(2, 20000, 3))
    out = tmp_path / "small.bin"
    with open(out, "wb") as f:
        f.truncate(256 << 10)
    before = _sha(out)
    r = _restore(xml, out)
    assert r.returncode == 3 and "no metadata space" in r.stderr, r.stderr
    assert _sha(out) == before and not list(tmp_path.glob(".thinpool-restore-*"))
