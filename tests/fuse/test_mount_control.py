"""`thinpool mount` takes pool commands through the control channel: new devices appear as files."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from test_fuse_export import need_fuse
from test_mount_cli import mounted

MiB = 1 << 20
Pool = pytest.importorskip("thinpool.pool").Pool
pytestmark = pytest.mark.root
CLI = [sys.executable, "-c", "from thinpool_cli.main import main; main()"]


def _accepts(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:  # not there yet, or there and not listening yet (ECONNREFUSED)
        return False
    finally:
        s.close()


def test_mount_applies_create_and_snap(tmp_path):
    need_fuse()
    d = tempfile.mkdtemp(prefix="tpmc", dir="/tmp")
    try:
        pool = os.path.join(d, "pool")
        with Pool.create(pool, data_size=32 * MiB) as p:
            p.create_thin(0, 4 * MiB, name="vol")
        mnt = os.path.join(d, "mnt")
        os.mkdir(mnt)
        env = {**os.environ, "THINPOOL_POOL": pool}
        with mounted(pool, mnt) as res:
            # until the control channel accepts a connection (the socket file can exist before it listens)
            ctl = os.path.join(pool, "control.sock")
            deadline = time.monotonic() + 60
            while not _accepts(ctl):
                assert time.monotonic() < deadline, f"{ctl} does not accept connections"
                time.sleep(0.05)
            with open(os.path.join(mnt, "vol"), "r+b") as f:
                f.write(b"\x61" * 65536)
                f.flush()
                os.fsync(f.fileno())
            r = subprocess.run([*CLI, "thin", "snap", "1", "vol", "--name", "vsnap"], env=env, capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            r = subprocess.run([*CLI, "thin", "create", "2", "--size", "1M", "--name", "new"], env=env,
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            assert sorted(os.listdir(mnt)) == ["new", "vol", "vsnap"]
            with open(os.path.join(mnt, "vsnap"), "rb") as f:
                assert f.read(65536) == b"\x61" * 65536
            assert os.stat(os.path.join(mnt, "vsnap")).st_mode & 0o777 == 0o444  # published read-only
            r = subprocess.run([*CLI, "thin", "delete", "new", "--force"], env=env, capture_output=True, text=True,
                               timeout=60)
            assert r.returncode == 5 and "busy" in r.stderr.lower(), r.stderr
        assert res["rc"] == 0, res["err"]
        with Pool.open(pool, readonly=True) as p:
            assert sorted(p.list_devices()) == [0, 1, 2]
            assert p.device(1).read(0, 65536) == b"\x61" * 65536
    finally:
        shutil.rmtree(d, ignore_errors=True)
