"""`thinpool pool repair`: salvage damaged metadata into fresh metadata that the real thin_check accepts."""

from __future__ import annotations

import os
import struct

from click.testing import CliRunner
from conftest import need_tool, run_tool

from thinpool.pool import Pool
from thinpool_cli.main import cli


def test_repair_salvages_a_pool_with_a_damaged_leaf(tmp_path) -> None:
    need_tool("thin_check")
    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        a = pool.create_thin(1, 8 << 20)
        b = pool.create_thin(2, 8 << 20)
        a.write(0, b"A" * (1 << 20))
        b.write(0, b"B" * (1 << 20))
        leaf = pool.md.device_root(2)
    meta = tmp_path / "p" / "metadata"
    with open(meta, "r+b") as f:  # scribble over device 2's mapping leaf (checksum now wrong)
        f.seek(leaf * 4096 + 100)
        f.write(struct.pack("<Q", 0xDEADBEEF))
    out = tmp_path / "repaired.bin"
    r = CliRunner().invoke(cli, ["pool", "repair", str(tmp_path / "p"), str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert '"devices": 2' in r.output or '"devices": 1' in r.output
    assert run_tool("thin_check", str(out), check=False).returncode == 0
    dump = run_tool("thin_dump", str(out)).stdout
    assert 'dev_id="1" mapped_blocks="16"' in dump


def test_repair_refuses_in_place(tmp_path) -> None:
    with Pool.create(tmp_path / "p", data_size=16 << 20):
        pass
    meta = str(tmp_path / "p" / "metadata")
    before = open(meta, "rb").read()
    r = CliRunner().invoke(cli, ["pool", "repair", meta, meta])
    assert r.exit_code == 1 and "in place" in r.output
    assert open(meta, "rb").read() == before
    assert os.path.exists(meta)
