"""`thinpool serve` on a real pool: NBD clients write, map and trim thin devices; SIGTERM commits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
from conftest import need_tool, run_tool

MiB = 1 << 20

Pool = pytest.importorskip("thinpool.pool").Pool


@pytest.fixture
def pooldir():
    d = tempfile.mkdtemp(prefix="tpsrv", dir="/tmp")
    with Pool.create(os.path.join(d, "pool"), data_size=64 * MiB, chunk_size=64 * 1024) as pool:
        pool.create_thin(0, 32 * MiB)
        pool.create_thin(1, 16 * MiB, name="second")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Serve:
    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "thinpool_cli.serve_cmds", "serve", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.uris = []

    def wait_ready(self, n: int) -> list[str]:
        for _ in range(n):
            line = self.proc.stdout.readline()
            if not line.startswith("serving "):
                self.proc.kill()
                raise AssertionError(f"serve did not start: {line!r} {self.proc.stderr.read()}")
            self.uris.append(line.split()[1])
        return self.uris

    def stop(self, sig=signal.SIGTERM) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out, err


@pytest.mark.external
def test_serve_write_map_trim_commit(pooldir):
    need_tool("nbdinfo", "qemu-io")
    pool_path = os.path.join(pooldir, "pool")
    sock = os.path.join(pooldir, "s.sock")
    srv = Serve("--socket", sock, env={"THINPOOL_POOL": pool_path})
    try:
        uris = srv.wait_ready(2)
        assert uris == [f"nbd+unix:///0?socket={sock}", f"nbd+unix:///second?socket={sock}"]
        run_tool("qemu-io", "-f", "raw", uris[0], "-c", "write -P 0xab 1M 192k", "-c", "write -P 0xcd 10M 64k",
                 "-c", "read -P 0xab 1M 192k", "-c", "flush", timeout=60)
        out = run_tool("nbdinfo", "--map", "--json", uris[0], timeout=30).stdout
        data = [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] == 0]
        assert data == [(MiB, 192 * 1024), (10 * MiB, 64 * 1024)]
        run_tool("qemu-io", "-f", "raw", uris[0], "-c", "discard 10M 64k", "-c", "write -P 0x11 0 4k",
                 timeout=60)  # no flush: SIGTERM must commit
    finally:
        rc, out, err = srv.stop()
    assert rc == 0, err
    assert "committed" in out
    with Pool.open(pool_path) as pool:
        dev = pool.device(0)
        assert dev.read(MiB, 192 * 1024) == b"\xab" * (192 * 1024)
        assert dev.read(0, 4096) == b"\x11" * 4096
        assert dev.read(10 * MiB, 65536) == bytes(65536)
        assert dev.mapped_ranges() == [(0, 65536), (MiB, 192 * 1024)]
        assert pool.status().used_data_blocks == 4
    assert not os.path.exists(sock)


@pytest.mark.external
def test_serve_export_selection_and_tcp(pooldir):
    need_tool("nbdinfo")
    pool_path = os.path.join(pooldir, "pool")
    srv = Serve("--pool", pool_path, "--listen", "127.0.0.1:0", "--export", "second")
    try:
        (uri,) = srv.wait_ready(1)
        assert uri.startswith("nbd://127.0.0.1:") and uri.endswith("/second")
        info = json.loads(run_tool("nbdinfo", "--json", uri, timeout=30).stdout)
        assert info["exports"][0]["export-size"] == 16 * MiB
    finally:
        rc, _out, err = srv.stop(signal.SIGINT)
    assert rc == 0, err


def test_serve_errors(pooldir):
    pool_path = os.path.join(pooldir, "pool")
    r = subprocess.run([sys.executable, "-m", "thinpool_cli.serve_cmds", "serve", "--pool", pool_path,
                        "--export", "nope"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "nope" in r.stderr
    r = subprocess.run([sys.executable, "-m", "thinpool_cli.serve_cmds", "serve", "--pool", pool_path,
                        "--listen", "localhost"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "HOST:PORT" in r.stderr
    with Pool.open(pool_path):  # the pool is locked while served; a second server is refused cleanly
        r = subprocess.run([sys.executable, "-m", "thinpool_cli.serve_cmds", "serve", "--pool", pool_path],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "error:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.external
def test_serve_read_only(pooldir):
    need_tool("nbdinfo", "qemu-io")
    pool_path = os.path.join(pooldir, "pool")
    with Pool.open(pool_path) as pool:
        pool.device(0).write(0, b"\x42" * 65536)
    sock = os.path.join(pooldir, "ro.sock")
    srv = Serve("--pool", pool_path, "--socket", sock, "--read-only", "--export", "0")
    try:
        (uri,) = srv.wait_ready(1)
        info = json.loads(run_tool("nbdinfo", "--json", uri, timeout=30).stdout)
        assert info["exports"][0]["is_read_only"] is True
        run_tool("qemu-io", "-r", "-f", "raw", uri, "-c", "read -P 0x42 0 64k", timeout=60)
        r = run_tool("qemu-io", "-f", "raw", uri, "-c", "write -P 1 0 4k", check=False, timeout=60)
        assert r.returncode != 0 or "error" in (r.stdout + r.stderr).lower()
    finally:
        rc, _out, err = srv.stop()
    assert rc == 0, err
    with Pool.open(pool_path, readonly=True) as pool:
        assert pool.device(0).read(0, 4096) == b"\x42" * 4096


@pytest.mark.external
def test_serve_nbdcopy_and_qemu_img_on_thin_device(pooldir):
    need_tool("nbdcopy", "nbdinfo", "qemu-img")
    pool_path = os.path.join(pooldir, "pool")
    src, dst = os.path.join(pooldir, "src.img"), os.path.join(pooldir, "dst.img")
    regions = [(0, 4096), (3 * MiB + 100, 200_000), (9 * MiB, MiB), (16 * MiB - 65536, 65536)]
    with open(src, "wb") as f:
        f.truncate(16 * MiB)
        for off, n in regions:
            f.seek(off)
            f.write(os.urandom(n))
    sock = os.path.join(pooldir, "c.sock")
    srv = Serve("--pool", pool_path, "--socket", sock, "--export", "second")
    try:
        (uri,) = srv.wait_ready(1)
        run_tool("nbdcopy", src, uri, timeout=60)
        with open(dst, "wb") as f:
            f.truncate(16 * MiB)
        run_tool("nbdcopy", uri, dst, timeout=60)
        run_tool("cmp", src, dst)
        assert os.stat(dst).st_blocks * 512 < 4 * MiB
        run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri, timeout=60)
        out = run_tool("nbdinfo", "--map", "--json", uri, timeout=30).stdout
        data = [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] == 0]
        entries = json.loads(run_tool("qemu-img", "map", "-f", "raw", "--output=json", uri, timeout=30).stdout)
        assert [(e["start"], e["length"]) for e in entries if e["data"]] == data
    finally:
        rc, _out, err = srv.stop()
    assert rc == 0, err
    with Pool.open(pool_path, readonly=True) as pool:
        dev = pool.device(1)
        assert dev.mapped_ranges() == data
        with open(src, "rb") as f:
            assert dev.read(0, 16 * MiB) == f.read()
        # only chunks holding data were provisioned (64 KiB chunks)
        assert sum(n for _o, n in data) <= sum(n for _o, n in regions) + 6 * 65536


def _committed_ranges(pool_path: str) -> list[tuple[int, int]] | None:
    """Device 0's mapped ranges in the pool's last commit (no lock: beside the running server), or None while a
    commit is being written (a superblock or manifest caught mid-update)."""
    from thinpool.errors import ThinpoolError

    try:
        with Pool.open(pool_path, readonly=True, lock="none") as p:
            return p.device(0).mapped_ranges()
    except ThinpoolError:
        return None


def test_serve_commit_interval_survives_kill(pooldir):
    """With --commit-interval, writes a client never flushed are committed anyway: a SIGKILL loses nothing."""
    import time

    from nbd_client import RawClient

    pool_path = os.path.join(pooldir, "pool")
    sock = os.path.join(pooldir, "k.sock")
    srv = Serve("--pool", pool_path, "--socket", sock, "--commit-interval", "0.2", "--export", "0")
    try:
        srv.wait_ready(1)
        with RawClient(sock) as c:
            c.greeting()
            c.go("0")
            assert c.write(2 * MiB, b"\x5a" * 65536) == 0  # no FLUSH, no FUA
        # the interval's commit, seen on disk (the last commit, read without the lock) before the kill: a wait on
        # the commit itself, not on a guess of how long the server takes to get to it under load
        deadline = time.monotonic() + 60
        while _committed_ranges(pool_path) != [(2 * MiB, 65536)]:
            assert srv.proc.poll() is None and time.monotonic() < deadline, "no commit within 60 s of the write"
            time.sleep(0.05)
        srv.proc.kill()
    finally:
        srv.stop()
    with Pool.open(pool_path) as pool:
        dev = pool.device(0)
        assert dev.mapped_ranges() == [(2 * MiB, 65536)]
        assert dev.read(2 * MiB, 65536) == b"\x5a" * 65536
