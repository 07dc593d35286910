"""Progress bars over metadata nodes for check, ls (EXCLUSIVE/SHARED), delta and map (issue 13): drawn on a
terminal's stderr (a real subprocess on a pseudo-terminal), nothing of them through a pipe, and the same stdout
either way; the size threshold still decides whether a bar shows at once."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_helpers import read_pty  # noqa: E402

from thinpool.pool import Pool  # noqa: E402

CHUNK = 64 << 10


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An origin of 1,500 chunks over several leaves, a snapshot of it, and rewrites on both sides (shared and
    exclusive blocks, a delta with every kind of run)."""
    p = tmp_path_factory.mktemp("progress") / "pool"
    with Pool.create(p, data_size=256 << 20) as pool:
        vol = pool.create_thin(1, 128 << 20)
        vol.write(0, b"A" * (1500 * CHUNK))
        pool.commit()
        snap = pool.create_snap(2, 1)
        vol.write(10 * CHUNK, b"B" * (40 * CHUNK))
        snap.write(700 * CHUNK, b"C" * (3 * CHUNK))
        snap.write(1600 * CHUNK, b"D" * CHUNK)
        pool.commit()
    return p


def _run(args: list[str], out: Path, *, on_pty: bool, **env_extra: str) -> tuple[bytes, bytes]:
    """``thinpool ARGS`` with stdout to ``out`` and stderr on a pseudo-terminal (or a pipe): (what stderr got,
    stdout's bytes). The exit status must be 0."""
    env = {**os.environ, "THINPOOL_PROGRESS_MIN_MAPPINGS": "1", "THINPOOL_PROGRESS_DELAY": "0", "COLUMNS": "100",
           "TERM": "xterm", **env_extra}
    env.pop("THINPOOL_POOL", None)
    cmd = [sys.executable, "-c", "from thinpool_cli.main import main; main()", *args]
    master, slave = pty.openpty()
    try:
        with open(out, "wb") as f:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f,
                                 stderr=slave if on_pty else subprocess.PIPE, env=env)
            os.close(slave)
            if on_pty:
                err = read_pty(master, 60)
            else:
                assert p.stderr is not None
                err = p.stderr.read()
                p.stderr.close()
            assert p.wait(60) == 0, err
    finally:
        os.close(master)
    return err, out.read_bytes()


TOOLS = {
    "check": (["check"], "checking metadata"),
    "ls": (["ls", "-o", "DEV,MAPPED,EXCLUSIVE,SHARED,EXCLUSIVE_BLOCKS"], "counting shared blocks"),
    "delta": (["delta", "1", "2"], "comparing mappings"),
    "delta-verbose": (["delta", "--verbose", "1", "2"], "comparing mappings"),
    "map": (["map", "--json"], "mapping devices"),
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_bar_on_a_terminal_nothing_on_a_pipe_and_the_same_output(pool_dir: Path, tmp_path: Path, tool: str):
    args, description = TOOLS[tool]
    args = [*args, str(pool_dir)]
    seen, out_pty = _run(args, tmp_path / "pty.out", on_pty=True)
    err, out_pipe = _run(args, tmp_path / "pipe.out", on_pty=False)
    text = seen.decode(errors="replace")
    assert description in text, text
    assert "100%" in text and "\x1b[" in text, text  # a rich bar, completed when the job ends
    assert out_pty == out_pipe and out_pipe
    assert description.encode() not in err and b"\x1b" not in err
    if tool == "check":  # thin_check's steps, and nothing else, on a pipe
        assert err.decode().splitlines() == ["examining superblock", "examining devices tree",
                                             "examining mapping tree", "checking space map counts"]
        assert b"examining mapping tree" in seen
    else:
        assert err == b""


def test_below_the_threshold_the_bar_waits_for_the_delay(pool_dir: Path, tmp_path: Path):
    """A job smaller than THINPOOL_PROGRESS_MIN_MAPPINGS gets a bar only once it has run
    THINPOOL_PROGRESS_DELAY seconds: with a long delay, none; with none, at once."""
    args = ["ls", "-o", "DEV,SHARED", str(pool_dir)]
    seen, quiet = _run(args, tmp_path / "a.out", on_pty=True, THINPOOL_PROGRESS_MIN_MAPPINGS="100000000",
                       THINPOOL_PROGRESS_DELAY="3600")
    assert b"counting shared blocks" not in seen and b"\x1b" not in seen, seen
    seen, shown = _run(args, tmp_path / "b.out", on_pty=True, THINPOOL_PROGRESS_MIN_MAPPINGS="100000000",
                       THINPOOL_PROGRESS_DELAY="0")
    assert b"counting shared blocks" in seen
    assert quiet == shown


def test_auto_repair_shows_the_check_bar_and_repairs_the_same(pool_dir: Path, tmp_path: Path):
    """check --auto-repair (reads the metadata twice: the bar's total covers both checks) on a pty and a pipe:
    the same stdout, and the same repaired metadata."""
    import shutil

    outs = {}
    for on_pty in (True, False):
        copy = tmp_path / f"pool-{on_pty}"
        shutil.copytree(pool_dir, copy)
        seen, out = _run(["check", "--auto-repair", str(copy)], tmp_path / "o.out", on_pty=on_pty)
        assert (b"checking metadata" in seen) == on_pty, seen
        outs[on_pty] = (out, (copy / "metadata").read_bytes())
    assert outs[True] == outs[False]


def test_the_bar_total_is_the_metadata_in_use_and_never_passed(pool_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """node_progress on a metered store: the total comes from the superblock's metadata space-map root (less the
    bitmaps for a tool that reads trees only), every update stays within it, and the job's end completes it."""
    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.readonly import read_superblock
    from thinpool_cli import output, tools_common

    seen: list[tuple[str, int]] = []

    class Recorder:
        def __init__(self, description: str, total: int, delay: float) -> None:
            self.total = total
            seen.append(("total", total))

        def update(self, completed: int) -> None:
            assert 0 <= completed <= self.total
            seen.append(("update", completed))

        def advance(self, n: int = 1) -> None:
            raise AssertionError("node bars are set, not advanced")

        def stop(self) -> None:
            seen.append(("stop", 0))

    monkeypatch.setattr(output, "_LazyProgress", Recorder)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(tools_common, "METER_STEP", 1)
    md_path = str(pool_dir / "metadata")
    store = FileBlockStore(md_path, readonly=True)
    sb = read_superblock(store)
    store.close()
    with tools_common.open_metadata(md_path) as pmd:
        assert isinstance(pmd.store, FileBlockStore) and pmd.store.nr_read > 0
        with tools_common.node_progress("counting shared blocks", pmd.store, 10):
            from thinpool.tools.ls import ls_rows

            rows = ls_rows(pmd, ["DEV", "SHARED"])
    assert [r["DEV"] for r in rows] == [1, 2]
    total = seen[0][1]
    assert seen[0][0] == "total" and 0 < total < sb.metadata_sm_root.nr_allocated
    updates = [n for k, n in seen if k == "update"]
    assert len(updates) > 2 and updates == sorted(updates) and updates[0] < total and updates[-1] == total
    assert seen[-1] == ("stop", 0)


@pytest.mark.external
def test_under_a_bar_stdout_still_equals_the_real_tools(pool_dir: Path, tmp_path: Path):
    """With the bar drawn on a terminal, stdout is byte for byte thin_ls's, thin_delta's (both verbose and
    not) and thin_check's (C++ 0.9.0)."""
    from conftest import need_tool, run_tool

    need_tool("thin_ls", "thin_delta", "thin_check")
    md = str(pool_dir / "metadata")
    fields = "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,MAPPED,EXCLUSIVE,SHARED"
    for ours, theirs in ((["ls", "-o", fields, md], ["thin_ls", "-o", fields, md]),
                         (["delta", "1", "2", md], ["thin_delta", "--snap1", "1", "--snap2", "2", md]),
                         (["delta", "--verbose", "1", "2", md],
                          ["thin_delta", "--verbose", "--snap1", "1", "--snap2", "2", md]),
                         (["check", md], ["thin_check", md])):
        seen, out = _run(ours, tmp_path / "o.out", on_pty=True)
        assert b"\x1b[" in seen and b"100%" in seen, ours
        assert out.decode() == run_tool(*theirs).stdout, ours
