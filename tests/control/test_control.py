"""The control channel: pool commands from another shell reach a running `serve`, applied between requests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import need_tool, run_tool
from oracles import assert_thin_check

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "nbd"))
from nbd_client import RawClient  # noqa: E402

from thinpool.nbd import protocol as P  # noqa: E402
from thinpool.pool import Pool  # noqa: E402

MiB = 1 << 20
BS = 4096


@pytest.fixture
def pooldir():
    d = tempfile.mkdtemp(prefix="tpctl", dir="/tmp")
    with Pool.create(os.path.join(d, "pool"), data_size=160 * MiB, chunk_size=64 * 1024) as pool:
        pool.create_thin(0, 48 * MiB, name="vol")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def thinpool(*args: str, pool: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-c", "from thinpool_cli.main import main; main()", *args],
                       capture_output=True, text=True, env={**os.environ, "THINPOOL_POOL": pool}, timeout=120)
    if check:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


class Serve:
    def __init__(self, pool: str, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "thinpool_cli.serve_cmds", "serve", "--pool", pool,
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.uris = []
        while True:
            line = self.proc.stdout.readline()
            if line.startswith("control "):
                break
            if not line.startswith("serving "):
                self.proc.kill()
                raise AssertionError(f"serve did not start: {line!r} {self.proc.stderr.read()}")
            self.uris.append(line.split()[1])

    def stop(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out, err


@pytest.mark.external
def test_pool_commands_reach_the_running_server(pooldir):
    pool = os.path.join(pooldir, "pool")
    sock = os.path.join(pooldir, "s.sock")
    srv = Serve(pool, "--socket", sock)
    try:
        assert oct(os.stat(os.path.join(pool, "control.sock")).st_mode & 0o777) == \
            oct(os.stat(pool).st_mode & 0o777)
        r = thinpool("thin", "create", "5", "--size", "1M", "--name", "new", pool=pool)
        assert "created thin device 5" in r.stdout
        with RawClient(sock) as c:  # the new device is served at once, by name and by id
            c.greeting()
            assert c.go("new")[0] == MiB
            assert c.write(0, b"\x33" * BS) == 0
        with RawClient(sock) as c:
            c.greeting()
            assert c.go("5")[0] == MiB
            assert c.read(0, BS) == (0, b"\x33" * BS)
        r = thinpool("thin", "snap", "6", "new", "--name", "new-snap", pool=pool)
        assert "created snapshot 6" in r.stdout
        with RawClient(sock) as c:
            c.greeting()
            size, flags = c.go("new-snap")
            assert flags & P.FLAG_READ_ONLY  # a snapshot is published read-only
            assert c.read(0, BS) == (0, b"\x33" * BS)
        st = json.loads(thinpool("pool", "status", "--json", pool=pool).stdout)
        assert st["nr_devices"] == 3
        # errors come back typed: exit codes and one line
        r = thinpool("thin", "create", "5", "--size", "1M", pool=pool, check=False)
        assert r.returncode == 5 and r.stderr.startswith("thinpool: error:") and len(r.stderr.splitlines()) == 1
        with RawClient(sock) as busy:
            busy.greeting()
            busy.go("new")
            r = thinpool("thin", "delete", "5", "--force", pool=pool, check=False)
            assert r.returncode == 5 and "busy" in r.stderr.lower(), r.stderr
        r = thinpool("thin", "delete", "new-snap", "--force", pool=pool)
        r = thinpool("pool", "resize", "--size", "192M", pool=pool)
        thinpool("pool", "commit", pool=pool)
    finally:
        rc, out, err = srv.stop()
    assert rc == 0, err
    assert not os.path.exists(os.path.join(pool, "control.sock"))
    with Pool.open(pool, readonly=True) as p:
        assert sorted(p.list_devices()) == [0, 5]
        assert p.device(5).read(0, BS) == b"\x33" * BS
        assert p.status().total_data_blocks * 64 * 1024 == 192 * MiB
    need_tool("thin_check")
    assert_thin_check(os.path.join(pool, "metadata"))


@pytest.mark.external
def test_snapshot_while_fio_writes(pooldir):
    """A snapshot through the control channel while fio (nbd engine, verify) writes to the origin and a second
    client writes flush-marked rounds: the snapshot is a consistent cut of the origin at that moment (every
    write acknowledged before the request is in it, none issued after the reply), the origin keeps its later
    writes, fio's verify passes, thin_check passes."""
    need_tool("fio", "thin_check")
    pool = os.path.join(pooldir, "pool")
    sock = os.path.join(pooldir, "f.sock")
    srv = Serve(pool, "--socket", sock)
    nblocks, base = 64, 32 * MiB  # the pattern region; fio uses the first 16 MiB
    rounds: list[int] = []  # rounds whose writes were all acknowledged
    stop = threading.Event()
    errors: list[BaseException] = []

    def pattern() -> None:
        try:
            with RawClient(sock, timeout=60) as c:
                c.greeting()
                c.go("vol")
                r = 0
                while not stop.is_set() or r < 3:
                    r += 1
                    for i in range(nblocks):
                        assert c.write(base + i * BS, r.to_bytes(4, "little") * (BS // 4)) == 0
                    assert c.command(P.CMD_FLUSH) == 0
                    rounds.append(r)
        except BaseException as e:  # reported below
            errors.append(e)

    uri = f"nbd+unix:///vol?socket={sock}"
    fio = subprocess.Popen(["fio", "--name=v", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
                            "--iodepth=16", "--size=16M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                            "--verify_state_save=0", "--loops=3"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    t = threading.Thread(target=pattern)
    t.start()
    try:
        deadline = time.monotonic() + 120  # (a hang guard, not a timing check)
        while len(rounds) < 3 and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        before = rounds[-1] if rounds else 0
        thinpool("thin", "snap", "1", "vol", "--name", "cut", pool=pool)
        after = rounds[-1] + 1 if rounds else 1  # the round in progress when the reply came
        # the pattern goes on until a round begun after the reply is complete (the origin's later writes), however
        # slowly the host runs it: a wait on that round, not a fixed 0.3 s
        deadline = time.monotonic() + 120
        while not (rounds and rounds[-1] > after) and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        t.join(120)
        out, _ = fio.communicate(timeout=300)
        assert fio.returncode == 0, out
        assert not errors, errors
        last = rounds[-1]
    finally:
        stop.set()
        if fio.poll() is None:
            fio.kill()
            fio.wait()
        rc, _out, err = srv.stop()
    assert rc == 0, err
    assert_thin_check(os.path.join(pool, "metadata"))
    with Pool.open(pool, readonly=True) as p:
        snap, origin = p.device(1), p.device(0)
        tags = [int.from_bytes(snap.read(base + i * BS, 4), "little") for i in range(nblocks)]
        for i in range(nblocks):
            blk = snap.read(base + i * BS, BS)
            assert blk == tags[i].to_bytes(4, "little") * (BS // 4), f"torn block {i} in the snapshot"
        # a consistent cut: a prefix of round t+1 over round t, between the rounds seen around the request
        t0 = tags[-1]
        assert before <= t0 <= after and all(x in (t0, t0 + 1) for x in tags), (before, after, tags)
        k = tags.count(t0 + 1)
        assert tags == [t0 + 1] * k + [t0] * (nblocks - k), tags
        assert all(origin.read(base + i * BS, BS) == last.to_bytes(4, "little") * (BS // 4)
                   for i in range(nblocks))  # the origin kept its later writes
        assert last > after
