"""The tool items of issue 16 through the CLI: names everywhere, -m refusals, ls --json numbers, errors naming
their file, the missing-extra message, progress on a terminal (a real subprocess on a pty)."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_helpers import busy_pool, fails, ok, pool, read_pty  # noqa: E402, F401


def test_dump_by_name_equals_dump_by_id(busy_pool: Path):
    assert ok("dump", "--dev-id", "snap", busy_pool).stdout == ok("dump", "--dev-id", "2", busy_pool).stdout
    assert "does not exist" in fails(5, "dump", "--dev-id", "nosuch", busy_pool).stderr
    js = json.loads(ok("dump", "--json", "--dev-id", "vol", busy_pool).stdout)
    assert [d["dev_id"] for d in js["devices"]] == [1]
    human = ok("dump", "-f", "human_readable", "--dev-id", "vol", busy_pool).stdout
    assert "device: 1\n" in human and "device: 2\n" not in human


def test_a_name_with_a_bare_metadata_file_gives_a_hint(busy_pool: Path):
    md = busy_pool / "metadata"
    for args in (("dump", "--dev-id", "vol", md), ("delta", "vol", "snap", md), ("map", "vol", md)):
        err = fails(5, *args).stderr
        assert "pool.json" in err and "bare metadata file" in err and str(md) in err
    assert ok("delta", "1", "2", md).stdout == ok("delta", "vol", "snap", busy_pool).stdout


def test_metadata_snap_options_refuse_without_a_held_snapshot(busy_pool: Path):
    ok("pool", "release-metadata-snap", "-p", busy_pool)
    for args in (("check", "-m"), ("dump", "-m"), ("ls", "-m"), ("delta", "-m", "1", "2"), ("map", "-m")):
        err = fails(1, *args, busy_pool).stderr
        assert "no metadata snapshot is held" in err, args


def test_ls_json_gives_sizes_as_numbers(busy_pool: Path):
    rows = json.loads(ok("ls", "--json", "-o", "DEV,MAPPED,EXCLUSIVE,SHARED,MAPPED_BYTES", busy_pool).stdout)
    r = rows[0]
    assert isinstance(r["mapped_bytes"], int) and isinstance(r["mapped_blocks"], int)
    assert r["mapped_bytes"] == r["mapped_blocks"] * 65536
    assert r["exclusive_blocks"] + r["shared_blocks"] == r["mapped_blocks"]
    assert not any(isinstance(v, str) for row in rows for v in row.values())
    default = json.loads(ok("ls", "--json", busy_pool).stdout)
    assert set(default[0]) == {"dev", "mapped_bytes", "mapped_blocks", "create_time", "snap_time"}


def test_dump_to_a_missing_directory_names_that_path(busy_pool: Path, tmp_path: Path):
    target = tmp_path / "nonexist" / "x.xml"
    err = fails(1, "dump", busy_pool, "-o", target).stderr
    assert str(target) in err and ".tmp" not in err
    assert not (tmp_path / "nonexist").exists()


def test_map_png_without_matplotlib_names_the_extra(busy_pool: Path, tmp_path: Path):
    code = ("import sys, importlib.util as u; real = u.find_spec\n"
            "u.find_spec = lambda n, *a: None if n == 'matplotlib' else real(n, *a)\n"
            "from thinpool_cli.main import cli; sys.argv = ['thinpool'] + sys.argv[1:]; cli()")
    r = subprocess.run([sys.executable, "-c", code, "map", str(busy_pool), "--png", str(tmp_path / "m.png")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["thinpool: error: map --png needs matplotlib: "
                                             "pip install 'thinpool[plot]'"]
    assert not (tmp_path / "m.png").exists()


def test_map_png_draws_one_chunk_runs_at_least_the_minimum_width():
    pytest.importorskip("matplotlib")
    from thinpool_cli.tools_map import MIN_BAR_FRACTION, bar_spans

    ch = 65536
    entries = [{"start": 0, "length": ch, "depth": 0, "present": True, "zero": False, "data": True, "offset": 0,
                "shared": False},
               {"start": ch, "length": 99_999 * ch, "depth": 0, "present": False, "zero": True, "data": False,
                "shared": False}]
    spans = bar_spans(entries, ch, 100_000)
    assert spans["exclusive"] == [(0.0, MIN_BAR_FRACTION * 100_000)]
    assert spans["hole"] == [(1.0, 99_999.0)]


def _on_pty(args: list[str], env: dict[str, str]) -> str:
    """Run the thinpool CLI with stderr (and stdin/stdout) on a pseudo-terminal; return what the terminal got."""
    exe = shutil.which("thinpool") or ""
    cmd = [exe, *args] if exe else [sys.executable, "-m", "thinpool_cli.main", *args]
    master, slave = pty.openpty()
    p = subprocess.Popen(cmd, stdin=slave, stdout=subprocess.DEVNULL, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = read_pty(master, 30)
    p.wait(timeout=60)
    os.close(master)
    assert p.returncode == 0, out
    return out.decode(errors="replace")


def test_progress_shows_on_a_terminal_only(busy_pool: Path, tmp_path: Path):
    env = dict(os.environ, THINPOOL_PROGRESS_MIN_MAPPINGS="1", COLUMNS="100", TERM="xterm")
    seen = _on_pty(["dump", str(busy_pool), "-o", str(tmp_path / "a.xml")], env)
    assert "dumping" in seen
    seen = _on_pty(["ls", str(busy_pool), "-o", "DEV,SHARED"], env)
    assert "counting shared blocks" in seen
    # not a terminal: nothing but the output
    r = ok("dump", busy_pool, "-o", tmp_path / "b.xml", env={"THINPOOL_PROGRESS_MIN_MAPPINGS": "1"})
    assert r.stderr == ""
    assert (tmp_path / "a.xml").read_text() == (tmp_path / "b.xml").read_text()
