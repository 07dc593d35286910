"""Review: `thinpool mount` under 2000 open/write/read/close cycles that also hit its error paths.

Device 0 is shared with a snapshot, so the sector-aligned writes leave copy-on-write copies pending; every cycle
also makes a request the daemon refuses (a write at the end: ENOSPC, a truncate to another size: EINVAL, a
preallocation past the end: EFBIG, a write to the read-only snapshot file: EROFS at open). Pinned: the mount
process's descriptors and threads come back to what they were after a warm-up, its resident set grows by less
than 32 MiB, every read equals a byte model, the unmount commits, and after it the pool reads as the model (the
snapshot unchanged) and both real checkers accept the metadata.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import need_tool
from oracles import assert_thin_check
from review_helpers import proc_counts, settled_counts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuse"))
from test_fuse_export import is_mounted, need_fuse  # noqa: E402

from thinpool.pool import Pool  # noqa: E402

CH = 64 << 10
DEV = 32 * CH  # 2 MiB
ROUNDS = 2000

pytestmark = pytest.mark.root


def _expect_errno(code: int, fn, *args) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == code, (fn, e.value)


@pytest.mark.external
def test_mount_stays_bounded_under_2000_cycles_with_errors() -> None:
    need_fuse()
    need_tool("thin_check")
    d = tempfile.mkdtemp(prefix="tpr3fuse", dir="/tmp")
    mnt = os.path.join(d, "mnt")
    os.mkdir(mnt)
    pool_path = os.path.join(d, "pool")
    old = random.Random(5).randbytes(DEV)
    with Pool.create(pool_path, data_size=128 * CH, chunk_size=CH) as pool:
        pool.create_thin(0, DEV, name="vol").write(0, old)
        pool.create_snap(1, 0, name="snap")
    model = bytearray(old)
    proc = subprocess.Popen([sys.executable, "-m", "thinpool_cli.serve_cmds", "mount", "--pool", pool_path, mnt],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        vol, snap = os.path.join(mnt, "vol"), os.path.join(mnt, "snap")
        rng = random.Random(9)

        def cycle(i: int) -> None:
            fd = os.open(vol, os.O_RDWR)
            try:
                off = rng.randrange(0, DEV // 512 - 8) * 512
                n = rng.choice([512, 4096])
                data = rng.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                model[off:off + n] = data
                lo = max(0, off - 4096)
                got = os.pread(fd, 3 * 4096, lo)
                assert got == bytes(model[lo:lo + len(got)]), f"cycle {i}: read differs"
                kind = i % 4
                if kind == 0:
                    _expect_errno(errno.ENOSPC, os.pwrite, fd, b"x" * 512, DEV)
                elif kind == 1:
                    _expect_errno(errno.EINVAL, os.ftruncate, fd, DEV // 2)
                elif kind == 2:
                    _expect_errno(errno.EFBIG, os.posix_fallocate, fd, 0, DEV * 2)
                    _expect_errno(errno.EROFS, os.open, snap, os.O_RDWR)
                else:
                    sfd = os.open(snap, os.O_RDONLY)
                    try:
                        o2 = rng.randrange(0, DEV - 4096)
                        assert os.pread(sfd, 4096, o2) == old[o2:o2 + 4096], "the snapshot changed"
                    finally:
                        os.close(sfd)
                if i % 250 == 0:
                    os.fsync(fd)
            finally:
                os.close(fd)

        for i in range(100):
            cycle(i)
        time.sleep(0.3)
        fds0, threads0, rss0 = proc_counts(proc.pid)
        for i in range(100, 100 + ROUNDS):
            cycle(i)
        fds, threads, rss = settled_counts(proc.pid, fds0, threads0)
        print(f"mount: fds {fds0}->{fds}, threads {threads0}->{threads}, rss {rss0 >> 20}->{rss >> 20} MiB")
        assert fds <= fds0, f"descriptors {fds0} -> {fds}"
        assert threads <= threads0, f"threads {threads0} -> {threads}"
        assert rss - rss0 < 32 << 20, f"resident set {rss0 >> 20} -> {rss >> 20} MiB"
        with open(vol, "rb") as f:
            assert f.read() == bytes(model)
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", mnt], check=False, capture_output=True, timeout=60)
        try:
            _out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", mnt], check=False, capture_output=True, timeout=60)
    try:
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
        with Pool.open(pool_path, readonly=True) as ro:
            assert ro.device(0).read(0, DEV) == bytes(model)
            assert ro.device(1).read(0, DEV) == old
        assert_thin_check(os.path.join(pool_path, "metadata"))
    finally:
        shutil.rmtree(d, ignore_errors=True)
