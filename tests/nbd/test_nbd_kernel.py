"""The kernel on top of the NBD server without the nbd module: nbdfuse -> loop -> ext4; fstrim arrives as
NBD TRIM and frees chunks of the (sparse) device."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time

import pytest
from conftest import need_root_feature, need_tool, run_tool
from sparse_device import SparseDevice

from thinpool.nbd import ServerThread

MiB = 1 << 20
pytestmark = pytest.mark.root


def _mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == real for line in f)


@pytest.mark.external
def test_nbdfuse_loop_ext4_fstrim():
    need_root_feature("/dev/fuse", os.path.exists("/dev/fuse"))
    need_root_feature("loop devices", os.path.exists("/dev/loop-control") and os.geteuid() == 0)
    need_tool("nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fstrim", "mount", "umount")
    work = tempfile.mkdtemp(prefix="tpnbdk", dir="/tmp")
    fmnt, ext = os.path.join(work, "fuse"), os.path.join(work, "ext")
    os.mkdir(fmnt)
    os.mkdir(ext)
    dev = SparseDevice(128 * MiB)
    proc = loop = None
    try:
        with ServerThread({"disk": dev}, unix_path=os.path.join(work, "s")) as srv:
            proc = subprocess.Popen(["nbdfuse", os.path.join(fmnt, "disk"), srv.uri("disk")],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            deadline = time.monotonic() + 15
            while not _mounted(fmnt):
                assert proc.poll() is None and time.monotonic() < deadline, "nbdfuse did not mount"
                time.sleep(0.05)
            loop = run_tool("losetup", "-f", "--show", os.path.join(fmnt, "disk"), timeout=30).stdout.strip()
            run_tool("mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop, timeout=60)
            run_tool("mount", loop, ext, timeout=30)
            try:
                payload = os.urandom(8 * MiB)
                for i in range(4):
                    with open(os.path.join(ext, f"f{i}"), "wb") as f:
                        f.write(payload)
                run_tool("sync", timeout=60)
                with srv.lock:
                    mapped_full = sum(n for _o, n in dev.mapped_ranges())
                for i in range(3):
                    os.unlink(os.path.join(ext, f"f{i}"))
                run_tool("sync", timeout=60)
                run_tool("fstrim", ext, timeout=120)
                with open(os.path.join(ext, "f3"), "rb") as f:
                    assert f.read() == payload
            finally:
                run_tool("umount", ext, timeout=60)
            r = run_tool("e2fsck", "-fn", loop, check=False, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
            run_tool("losetup", "-d", loop, timeout=30)
            loop = None
            run_tool("umount", fmnt, timeout=30)
            proc.wait(30)
            with srv.lock:
                mapped_after = sum(n for _o, n in dev.mapped_ranges())
                assert dev.discards > 0
            assert mapped_full > 32 * MiB and mapped_after < mapped_full - 20 * MiB, (mapped_full, mapped_after)
    finally:
        if _mounted(ext):
            subprocess.run(["umount", "-l", ext], check=False, timeout=60)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False, timeout=30)
        if _mounted(fmnt):
            subprocess.run(["umount", "-l", fmnt], check=False, timeout=60)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
