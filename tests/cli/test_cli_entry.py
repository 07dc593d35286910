"""The installed `thinpool` entry point (subprocess), help for every command, quickstart, error formatting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from cli_helpers import fails, ok
from conftest import need_tool, run_tool
from oracles import assert_thin_check

from thinpool_cli.main import LAZY_COMMANDS, cli

REPO = Path(__file__).resolve().parents[2]


def thinpool(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None,
             input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    exe = shutil.which("thinpool") or str(Path(sys.executable).parent / "thinpool")
    e = dict(os.environ)
    e.pop("THINPOOL_POOL", None)
    e.update(env or {})
    return subprocess.run([exe, *map(str, args)], capture_output=True, cwd=cwd, env=e, input=input, timeout=120)


def test_entry_point_help_version_and_a_session(tmp_path: Path):
    r = thinpool("--help")
    assert r.returncode == 0
    for name in ("pool", "thin", "check", "dump", "restore", "ls", "delta", "rmap", "map", "quickstart"):
        assert f"  {name} " in r.stdout.decode()
    assert thinpool("--version").stdout.decode().strip() == "thinpool, version 0.1.0"
    env = {"THINPOOL_POOL": str(tmp_path / "p")}
    assert thinpool("pool", "create", "--size", "16M", env=env).returncode == 0
    assert thinpool("thin", "create", "1", "--size", "1M", "--name", "v", env=env).returncode == 0
    assert thinpool("thin", "write", "v", "-", env=env, input=b"hello").returncode == 0
    r = thinpool("thin", "create", "1", "--size", "1M", env=env)
    assert (r.returncode, r.stderr.decode()) == (5, "thinpool: error: device 1 already exists\n")
    r = thinpool("pool", "status", "--pool", tmp_path / "nope")
    assert (r.returncode, r.stderr.decode()) == (1, f"thinpool: error: no pool at {tmp_path / 'nope'}\n")
    r = thinpool("dump", env=env)
    assert r.returncode == 0 and r.stdout.startswith(b"<superblock") and b"single_mapping" in r.stdout


@pytest.mark.external
def test_quickstart_subprocess_is_rerunnable(tmp_path: Path):
    r = thinpool("quickstart", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    demo = tmp_path / "thinpool-demo"
    out = r.stdout.decode()
    for text in ("thin snap 2 vol", "copy-on-write", "discard_passdown", "exclusive", "shared", "hole"):
        assert text in out
    assert (demo / "map.png").exists() or "matplotlib is not installed" in out
    r2 = ok("quickstart", demo, "--no-png")  # again, in-process: the old demo pool is replaced
    assert "removed the previous demo pool" in r2.stdout
    assert "vol reads b'BBBB'..., vol-snap still reads b'AAAA'..." in r2.stdout
    assert "  1 320KiB     64KiB 256KiB " in r2.stdout  # thin_ls-style: the overwrite made one chunk exclusive
    assert not (demo / "map.png").exists()
    st = json.loads(ok("pool", "status", "--json", "--pool", demo).stdout)
    assert st["used_data_blocks"] == 6 and [d["name"] for d in st["devices"]] == ["vol", "vol-snap"]
    need_tool("thin_check")
    assert_thin_check(str(demo / "metadata"))


def test_quickstart_refuses_a_foreign_directory(tmp_path: Path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "precious.txt").write_text("keep")
    r = fails(1, "quickstart", d)
    assert "not a thinpool demo pool" in r.stderr
    assert (d / "precious.txt").read_text() == "keep"
    f = tmp_path / "file"
    f.write_text("x")
    fails(2, "quickstart", f)


def all_commands() -> list[list[str]]:
    out = []
    for name in sorted(LAZY_COMMANDS):
        cmd = cli.get_command(click.Context(cli), name)
        if cmd is None:
            continue
        if isinstance(cmd, click.Group):
            out += [[name, sub] for sub in cmd.list_commands(click.Context(cmd))]
        else:
            out.append([name])
    return out


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p))
def test_every_command_has_help(path: list[str]):
    r = ok(*path, "--help")
    assert "Usage: " in r.stdout


MY_COMMANDS = ["pool create", "pool status", "pool resize", "pool set-transaction-id", "pool reserve-metadata-snap",
               "pool release-metadata-snap", "pool commit", "thin create", "thin snap", "thin delete", "thin list", "thin ls", "thin write",
               "thin read", "thin import", "thin export", "thin flush", "check", "dump", "restore", "ls", "delta",
               "rmap", "map", "quickstart"]


@pytest.mark.parametrize("command", MY_COMMANDS)
def test_every_command_has_an_example_in_help_and_docs(command: str):
    r = ok(*command.split(), "--help")
    assert "Example" in r.stdout
    docs = (REPO / "README.md").read_text()
    assert f"thinpool {command}" in docs


def test_usage_errors_are_exit_2_without_traceback():
    r = fails(2, "no-such-command")
    assert "No such command" in r.stderr
    fails(2, "thin", "create")
    fails(2, "pool", "create", "--size")


def test_help_imports_no_heavy_module():
    """`thinpool --help` must stay fast: no numpy, rich, matplotlib or command module is imported for it."""
    code = ("import sys\nfrom thinpool_cli.main import cli\n"
            "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('numpy', 'rich', 'matplotlib', 'thinpool.pool', 'thinpool_cli.tools_cmds') "
            "if m in sys.modules]\nprint('HEAVY', heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().endswith("HEAVY []"), r.stdout + r.stderr


def test_out_of_memory_is_one_error_line():
    """A command that runs out of memory (a ulimit, a container's limit) ends with one line and exit 1, as every
    error does, not a traceback: a command registered on the real group allocates under an address-space limit
    of its current size + 64 MiB, in a subprocess."""
    code = ("import resource\n"
            "from thinpool_cli.main import cli\n"
            "@cli.command('eat')\n"
            "def eat():\n"
            "    vm = next(int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('VmSize:'))\n"
            "    limit = (vm << 10) + (64 << 20)\n"
            "    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
            "    [bytearray(1 << 20) for _ in range(1 << 16)]\n"
            "cli(['eat'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == ["thinpool: error: out of memory"]
