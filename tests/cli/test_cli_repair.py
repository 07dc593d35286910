"""`thinpool pool repair`: salvage damaged metadata into fresh metadata that the real thin_check accepts."""

from __future__ import annotations

import json
import os
import struct

import pytest
from click.testing import CliRunner
from conftest import need_tool, run_tool
from oracles import assert_thin_check

from thinpool.pool import Pool
from thinpool_cli.main import cli


@pytest.mark.external
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
    assert_thin_check(str(out))
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


@pytest.mark.external
def test_repair_keeps_the_held_metadata_snapshot(tmp_path) -> None:
    need_tool("thin_check", "thin_dump")
    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        a = pool.create_thin(1, 8 << 20)
        a.write(0, b"A" * (1 << 20))
        pool.create_snap(2, 1)
        pool.md.reserve_metadata_snap()
        a.write(1 << 20, b"C" * (1 << 20))
        pool.delete_thin(2)
    src = str(tmp_path / "p" / "metadata")
    out = tmp_path / "repaired.bin"
    r = CliRunner().invoke(cli, ["pool", "repair", str(tmp_path / "p"), str(out)])
    assert r.exit_code == 0, r.output
    assert_thin_check(str(out))
    held = run_tool("thin_dump", "-m", str(out)).stdout
    assert held == run_tool("thin_dump", "-m", src).stdout
    assert 'dev_id="2" mapped_blocks="16"' in held
    assert run_tool("thin_dump", str(out)).stdout == run_tool("thin_dump", src).stdout
    assert CliRunner().invoke(cli, ["check", "-m", str(out)]).exit_code == 0
    r = CliRunner().invoke(cli, ["pool", "repair", str(tmp_path / "p"), str(out), "-f", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert (rep["held_snapshot"], rep["held_devices"], rep["held_mappings"]) == (True, 2, 32)


@pytest.mark.external
def test_check_auto_repair_text_output_and_refusal(tmp_path) -> None:
    need_tool("thin_check")
    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.pool_metadata import PoolMetadata

    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        pool.create_thin(1, 8 << 20).write(0, b"A" * (1 << 20))
        leaf = pool.md.device_root(1)
    meta = tmp_path / "p" / "metadata"
    md = PoolMetadata.open(FileBlockStore(meta))
    md.data_sm.inc(700)
    md.commit()
    md.close()
    r = CliRunner().invoke(cli, ["check", "--auto-repair", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    err = r.stderr
    assert "(leak) data block 700 leaked: space map says 1, expected 0" in err
    assert err.index("(leak)") < err.index("repairing leaks") < err.rindex("checking space map counts")
    assert r.stdout.count("TRANSACTION_ID=") == 1
    assert_thin_check(str(meta))
    # now damage a leaf: refused, the check's findings printed, one error line, nothing changed
    with open(meta, "r+b") as f:
        f.seek(leaf * 4096 + 100)
        f.write(struct.pack("<Q", 0xDEADBEEF))
    before = meta.read_bytes()
    r = CliRunner().invoke(cli, ["check", "--auto-repair", str(meta)])
    assert r.exit_code == 1
    assert "examining mapping tree" in r.stderr and "repairing leaks" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("thinpool: error: ")
    assert "not repairing" in r.stderr and "pool repair" in r.stderr
    assert meta.read_bytes() == before


def _stderr_on(args: list[str], on_pty: bool) -> bytes:
    """What ``thinpool ARGS`` writes to stderr when stderr is a pseudo-terminal (or a pipe); exit status 0."""
    import pty
    import subprocess
    import sys

    from cli_helpers import read_pty

    env = dict(os.environ, THINPOOL_PROGRESS_MIN_MAPPINGS="1", COLUMNS="100", TERM="xterm")
    cmd = [sys.executable, "-c", "from thinpool_cli.main import main; main()", *args]
    master, slave = pty.openpty()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=slave if on_pty else subprocess.PIPE, env=env)
    os.close(slave)
    if on_pty:
        out = read_pty(master, 60)
    else:
        assert p.stderr is not None
        out = p.stderr.read()
    assert p.wait(60) == 0, out
    os.close(master)
    return out


def test_restore_and_repair_show_a_bar_on_a_terminal_only(tmp_path) -> None:
    """restore (XML read / total) and pool repair (mappings salvaged and written / total) draw a rich bar on a
    terminal, and print nothing of it on a pipe; both results are the same either way."""
    with Pool.create(tmp_path / "p", data_size=64 << 20) as pool:
        pool.create_thin(1, 8 << 20).write(0, b"A" * (2 << 20))
    meta = tmp_path / "p" / "metadata"
    xml = tmp_path / "p.xml"
    r = CliRunner().invoke(cli, ["dump", str(meta), "-o", str(xml)])
    assert r.exit_code == 0, r.output
    outs = {}
    for on_pty in (True, False):
        tag = "pty" if on_pty else "pipe"
        rst, rep = tmp_path / f"restored-{tag}.bin", tmp_path / f"repaired-{tag}.bin"
        with open(rst, "wb") as f:
            f.truncate(os.path.getsize(meta))
        seen = _stderr_on(["restore", "-i", str(xml), "-o", str(rst), "-q"], on_pty)
        assert (b"restoring" in seen) == on_pty, seen
        seen = _stderr_on(["pool", "repair", str(meta), str(rep)], on_pty)
        assert (b"repairing metadata" in seen) == on_pty, seen
        outs[tag] = (rst.read_bytes(), rep.read_bytes())
    assert outs["pty"] == outs["pipe"]
