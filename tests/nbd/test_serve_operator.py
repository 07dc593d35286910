"""`thinpool serve` / `mount` operator details: readiness, pid file, no socket takeover, export access, errors."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from nbd_client import RawClient

from thinpool.nbd import protocol as P
from thinpool.pool import Pool

MiB = 1 << 20
CLI = [sys.executable, "-c", "from thinpool_cli.main import main; main()"]


@pytest.fixture
def pools():
    d = Path(tempfile.mkdtemp(prefix="tpop", dir="/tmp"))
    for name in ("a", "b"):
        with Pool.create(str(d / name), data_size=16 * MiB) as p:
            p.create_thin(0, 4 * MiB, name="vol")
            p.create_thin(3, 2 * MiB)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, **kw)


def start(*args: str, ready: bool = True) -> tuple[subprocess.Popen, int | None]:
    """Start serve with --ready-fd; return once the readiness message arrived (no reading of stdout)."""
    r, w = os.pipe()
    proc = subprocess.Popen([*CLI, "serve", *args, "--ready-fd", str(w)], pass_fds=(w,), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read()  # EOF once the server closed its end: after listening
    assert msg == b"READY=1\n", (msg, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
    return proc, None


def stop(proc: subprocess.Popen) -> tuple[int, str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_ready_fd_pid_file_and_no_takeover(pools):
    sock = str(pools / "s.sock")
    pid = str(pools / "serve.pid")
    proc, _ = start("--pool", str(pools / "a"), "--socket", sock, "--pid-file", pid)
    try:
        assert Path(pid).read_text().strip() == str(proc.pid)
        assert os.stat(sock).st_mode & 0o777 == 0o600
        # a second server (another pool) on the same socket is refused and the first keeps serving
        r = run("serve", "--pool", str(pools / "b"), "--socket", sock)
        assert r.returncode == 1 and "in use by a running server" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("thinpool: error:")
        with RawClient(sock) as c:
            c.greeting()
            assert c.go("vol")[0] == 4 * MiB
    finally:
        rc, out, err = stop(proc)
    assert rc == 0, err
    assert not os.path.exists(pid) and not os.path.exists(sock)


def test_socket_in_missing_directory_is_one_line(pools):
    r = run("serve", "--pool", str(pools / "a"), "--socket", "/nonexistent-dir/x.sock")
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [r.stderr.strip()] and "/nonexistent-dir/x.sock" in r.stderr
    assert r.stderr.startswith("thinpool: error:")


def test_exports_by_id_and_name_with_access_modes(pools):
    sock = str(pools / "e.sock")
    proc, _ = start("--pool", str(pools / "a"), "--socket", sock, "--export", "vol", "--export", "3:ro")
    try:
        for name, size, ro in (("vol", 4 * MiB, False), ("0", 4 * MiB, False), ("3", 2 * MiB, True)):
            with RawClient(sock) as c:
                c.greeting()
                got, flags = c.go(name)
                assert got == size and bool(flags & P.FLAG_READ_ONLY) == ro, name
                assert c.write(0, b"w" * 512) == (P.EPERM if ro else 0)
        with RawClient(sock) as c:
            c.greeting()
            c.option(P.OPT_LIST)
            names = [d[4:].decode() for _o, t, d in c.replies_until_final() if t == P.REP_SERVER]
            assert names == ["vol", "3"]
    finally:
        rc, _out, err = stop(proc)
    assert rc == 0, err


def test_read_only_serves_everything_read_only(pools):
    sock = str(pools / "r.sock")
    proc, _ = start("--pool", str(pools / "a"), "--socket", sock, "--read-only")
    try:
        with RawClient(sock) as c:
            c.greeting()
            _size, flags = c.go("vol")
            assert flags & P.FLAG_READ_ONLY
            assert c.write(0, b"x" * 512) == P.EPERM
    finally:
        rc, _out, err = stop(proc)
    assert rc == 0, err


def test_mount_without_mfusepy_names_the_extra(pools, tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "mfusepy.py").write_text("raise ImportError('No module named mfusepy')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake}:{os.environ.get('PYTHONPATH', '')}"}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run("mount", "--pool", str(pools / "a"), str(mnt), env=env)
    assert r.returncode == 1 and r.stderr.strip() == \
        "thinpool: error: FUSE support is not installed: pip install 'thinpool[fuse]'", r.stderr


def test_fork_returns_once_listening(pools):
    sock = str(pools / "k.sock")
    pid = str(pools / "k.pid")
    r = run("serve", "--pool", str(pools / "a"), "--socket", sock, "--fork", "--pid-file", pid)
    assert r.returncode == 0, r.stderr
    assert "serving nbd+unix:///vol" in r.stdout
    child = int(Path(pid).read_text())
    try:
        with RawClient(sock) as c:  # no race: listening before the command returned
            c.greeting()
            assert c.go("vol")[0] == 4 * MiB
            assert c.write(0, b"f" * 512) == 0
    finally:
        os.kill(child, signal.SIGTERM)
    for _ in range(600):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        import time

        time.sleep(0.05)
    else:
        raise AssertionError("the forked server did not stop")
    with Pool.open(str(pools / "a"), readonly=True) as p:
        assert p.device(0).read(0, 512) == b"f" * 512  # committed at SIGTERM
    # a failing --fork start reports the child's error and exits non-zero
    r = run("serve", "--pool", str(pools / "b"), "--socket", "/nonexistent-dir/y.sock", "--fork")
    assert r.returncode == 1 and "/nonexistent-dir/y.sock" in r.stderr and "Traceback" not in r.stderr
