"""`thinpool mount` on a real pool, with the kernel on top: loop -> ext4 -> copy a tree -> e2fsck -> ro diff ->
fstrim returns chunks to the pool -> snapshot -> the snapshot's filesystem is clean and holds the tree."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import need_tool, run_tool
from test_fuse_export import is_mounted, make_tree, need_fuse, need_loop

MiB = 1 << 20
Pool = pytest.importorskip("thinpool.pool").Pool

pytestmark = pytest.mark.root


class MountCmd:
    def __init__(self, pool_path: str, mnt: str, *exports: str, extra: tuple[str, ...] = ()) -> None:
        args = [sys.executable, "-m", "thinpool_cli.serve_cmds", "mount", "--pool", pool_path, mnt, *extra]
        for e in exports:
            args += ["--export", e]
        self.mnt = mnt
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while not is_mounted(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                _rc, _out, err = self.stop()
                raise RuntimeError(f"thinpool mount failed: {err}")
            time.sleep(0.05)

    def stop(self) -> tuple[int, str, str]:
        if is_mounted(self.mnt):
            subprocess.run(["umount", self.mnt], check=False, capture_output=True, timeout=60)
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        if is_mounted(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], check=False, capture_output=True, timeout=60)
        return self.proc.returncode, out, err


@contextlib.contextmanager
def mounted(pool_path: str, mnt: str, *exports: str):
    m = MountCmd(pool_path, mnt, *exports)
    result = {}
    try:
        yield result
    finally:
        rc, out, err = m.stop()
        result.update(rc=rc, out=out, err=err)


@contextlib.contextmanager
def loop_attached(path: str, *extra: str):
    loop = run_tool("losetup", "-f", "--show", *extra, path, timeout=30).stdout.strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], check=False, timeout=30)


@contextlib.contextmanager
def ext_mounted(dev: str, where: str, *opts: str):
    run_tool("mount", *opts, dev, where, timeout=60)
    try:
        yield where
    finally:
        r = subprocess.run(["umount", where], check=False, capture_output=True, timeout=60)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", where], check=False, timeout=60)


def used_blocks(pool_path: str) -> int:
    with Pool.open(pool_path, readonly=True) as pool:
        return pool.status().used_data_blocks


@pytest.mark.external
def test_thin_device_ext4_fstrim_snapshot():
    need_fuse()
    need_loop()
    need_tool("losetup", "mkfs.ext4", "e2fsck", "fstrim", "mount", "umount", "diff")
    work = tempfile.mkdtemp(prefix="tpmnt", dir="/tmp")
    try:
        pool_path = os.path.join(work, "pool")
        mnt, ext, tree = (os.path.join(work, n) for n in ("mnt", "ext", "tree"))
        os.mkdir(mnt)
        os.mkdir(ext)
        make_tree(tree)
        with Pool.create(pool_path, data_size=512 * MiB, chunk_size=64 * 1024) as pool:
            pool.create_thin(0, 256 * MiB, name="fs")

        # 1. mkfs + fill: two copies of the tree
        with mounted(pool_path, mnt) as res:
            disk = os.path.join(mnt, "fs")
            assert os.listdir(mnt) == ["fs"] and os.path.getsize(disk) == 256 * MiB
            with loop_attached(disk) as loop:
                run_tool("mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop, timeout=120)
                with ext_mounted(loop, ext):
                    run_tool("cp", "-a", tree, os.path.join(ext, "keep"), timeout=300)
                    run_tool("cp", "-a", tree, os.path.join(ext, "drop"), timeout=300)
                r = run_tool("e2fsck", "-fn", loop, check=False, timeout=120)
                assert r.returncode == 0, r.stdout + r.stderr
                with contextlib.suppress(OSError):
                    Path("/proc/sys/vm/drop_caches").write_text("3\n")
                with ext_mounted(loop, ext, "-o", "ro"):
                    for sub in ("keep", "drop"):
                        r = run_tool("diff", "-r", "--no-dereference", tree, os.path.join(ext, sub), check=False,
                                     timeout=300)
                        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert res["rc"] == 0, res["err"]
        used_full = used_blocks(pool_path)
        assert used_full * 64 * 1024 > 40 * MiB

        # 2. delete one copy and fstrim: the chunks go back to the pool
        with mounted(pool_path, mnt) as res:
            with loop_attached(os.path.join(mnt, "fs")) as loop, ext_mounted(loop, ext):
                shutil.rmtree(os.path.join(ext, "drop"))
                run_tool("sync", timeout=60)
                assert "trimmed" in run_tool("fstrim", "-v", ext, timeout=300).stdout
        assert res["rc"] == 0, res["err"]
        used_trimmed = used_blocks(pool_path)
        assert used_trimmed < used_full - 200, (used_full, used_trimmed)  # ~ one tree copy (>12 MiB) freed

        # 3. snapshot, then change the origin: the snapshot's filesystem stays clean and holds the tree
        with Pool.open(pool_path) as pool:
            pool.create_snap(1, 0, name="snap")
        with mounted(pool_path, mnt) as res:
            assert sorted(os.listdir(mnt)) == ["fs", "snap"]
            with loop_attached(os.path.join(mnt, "fs")) as loop, ext_mounted(loop, ext):
                shutil.rmtree(os.path.join(ext, "keep", "dir0"))
                with open(os.path.join(ext, "new-after-snapshot"), "wb") as f:
                    f.write(os.urandom(3 * MiB))
            r = run_tool("e2fsck", "-fn", os.path.join(mnt, "snap"), check=False, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            with loop_attached(os.path.join(mnt, "snap"), "-r") as loop, ext_mounted(loop, ext, "-o", "ro"):
                r = run_tool("diff", "-r", "--no-dereference", tree, os.path.join(ext, "keep"), check=False,
                             timeout=300)
                assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
                assert not os.path.exists(os.path.join(ext, "new-after-snapshot"))
            r = run_tool("e2fsck", "-fn", os.path.join(mnt, "fs"), check=False, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
        assert res["rc"] == 0, res["err"]
        with Pool.open(pool_path, readonly=True) as pool:
            assert pool.status().used_data_blocks > used_trimmed  # the origin's changes broke sharing (CoW)
    finally:
        for p in (os.path.join(work, "ext"), os.path.join(work, "mnt")):
            if is_mounted(p):
                subprocess.run(["umount", "-l", p], check=False, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def test_mount_read_only():
    need_fuse()
    work = tempfile.mkdtemp(prefix="tpmnt", dir="/tmp")
    try:
        pool_path, mnt = os.path.join(work, "pool"), os.path.join(work, "mnt")
        os.mkdir(mnt)
        with Pool.create(pool_path, data_size=64 * MiB, chunk_size=64 * 1024) as pool:
            pool.create_thin(0, 8 * MiB).write(4096, b"hello")
        m = MountCmd(pool_path, mnt, extra=("--read-only",))
        try:
            path = os.path.join(mnt, "0")
            assert os.stat(path).st_mode & 0o777 == 0o444
            with open(path, "rb") as f:
                f.seek(4096)
                assert f.read(5) == b"hello"
            import errno

            with pytest.raises(OSError) as ei:
                open(path, "r+b")
            assert ei.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
        finally:
            rc, out, err = m.stop()
        assert rc == 0, err
    finally:
        for p in (os.path.join(work, "mnt"),):
            if is_mounted(p):
                subprocess.run(["umount", "-l", p], check=False, timeout=60)
        shutil.rmtree(work, ignore_errors=True)
