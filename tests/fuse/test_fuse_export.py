"""The FUSE export against the real kernel: file I/O, fallocate/discard, and loop -> ext4 -> fstrim on top."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import need_root_feature, need_tool, run_tool

HERE = Path(__file__).resolve().parent
CHILD = HERE / "fuse_child.py"
MiB = 1 << 20

pytestmark = pytest.mark.root


def need_fuse() -> None:
    need_root_feature("/dev/fuse", os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK))
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # as thinpool.fusefs does
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: libfuse3 missing
        need_root_feature(f"mfusepy/libfuse3 ({e})", False)


def need_loop() -> None:
    need_root_feature("loop devices", os.path.exists("/dev/loop-control") and os.geteuid() == 0)


def is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == real for line in f)


class FuseMount:
    def __init__(self, **devices: int) -> None:
        self.tmp = tempfile.mkdtemp(prefix="tpfuse", dir="/tmp")
        self.mnt = os.path.join(self.tmp, "mnt")
        os.mkdir(self.mnt)
        self.report_path = os.path.join(self.tmp, "report.json")
        self.devices = devices
        self.proc: subprocess.Popen | None = None
        self.report: dict | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.mnt, name)

    def start(self) -> FuseMount:
        args = [sys.executable, str(CHILD), self.mnt, self.report_path, *(f"{n}={s}" for n, s in self.devices.items())]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 15
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = self.proc.stdout.read() if self.proc.poll() is not None else ""
                self.stop()
                raise RuntimeError(f"FUSE mount did not come up: {out}")
            time.sleep(0.05)
        return self

    def unmount(self) -> dict:
        if is_mounted(self.mnt):
            subprocess.run(["umount", self.mnt], check=False, capture_output=True, timeout=30)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if os.path.exists(self.report_path):
            self.report = json.loads(Path(self.report_path).read_text())
        return self.report

    def stop(self) -> None:
        try:
            self.unmount()
        finally:
            if is_mounted(self.mnt):
                subprocess.run(["umount", "-l", self.mnt], check=False, capture_output=True, timeout=30)
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            shutil.rmtree(self.tmp, ignore_errors=True)

    def output(self) -> str:
        return self.proc.stdout.read() if self.proc and self.proc.poll() is not None else ""


@pytest.fixture
def fuse_mount():
    need_fuse()
    mounts: list[FuseMount] = []

    def make(**devices: int) -> FuseMount:
        m = FuseMount(**devices)
        mounts.append(m)
        return m.start()

    yield make
    for m in mounts:
        m.stop()


def blocks(path: str) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.external
def test_files_and_sizes(fuse_mount):
    m = fuse_mount(disk=64 * MiB, small=MiB)
    assert sorted(os.listdir(m.mnt)) == ["disk", "small"]
    st = os.stat(m.path("disk"))
    assert st.st_size == 64 * MiB and st.st_blocks == 0
    with pytest.raises(FileNotFoundError):
        os.stat(m.path("nope"))
    # cp onto the device file works as onto a block device (O_TRUNC is ignored, the size stays)
    src = os.path.join(m.tmp, "img")
    blob = os.urandom(200_000)
    Path(src).write_bytes(blob)
    run_tool("cp", src, m.path("small"), timeout=30)
    assert os.path.getsize(m.path("small")) == MiB
    with open(m.path("small"), "rb") as f:
        assert f.read(len(blob)) == blob
    with pytest.raises(OSError) as ei:
        open(os.path.join(m.mnt, "new"), "w")
    assert ei.value.errno in (errno.ENOSYS, errno.EROFS, errno.EPERM, errno.EACCES)


def test_read_write_fsync_punch_hole(fuse_mount):
    m = fuse_mount(disk=64 * MiB, small=MiB)
    data = os.urandom(3 * MiB + 17)
    fd = os.open(m.path("disk"), os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 5 * MiB + 3) == len(data)
        assert os.pread(fd, len(data), 5 * MiB + 3) == data
        assert os.pread(fd, 100, 0) == bytes(100)
        assert blocks(m.path("disk")) == 3 * MiB + 65536  # 64 KiB chunks touched by [5M+3, 8M+20)
        os.fsync(fd)
        # punch a hole (what a loop device does for discard) -> device.discard
        os.posix_fallocate  # noqa: B018 (exists)
        _punch(fd, 6 * MiB, MiB)
        assert os.pread(fd, MiB, 6 * MiB) == bytes(MiB)
        assert blocks(m.path("disk")) == 2 * MiB + 65536
        # ZERO_RANGE -> write_zeroes
        _fallocate(fd, 0x10, 7 * MiB, 4096)
        assert os.pread(fd, 4096, 7 * MiB) == bytes(4096)
        # plain preallocation inside the file is accepted and changes nothing
        _fallocate(fd, 0, 0, MiB)
        assert blocks(m.path("disk")) == 2 * MiB + 65536
        # the end of the device
        assert os.pwrite(fd, b"x" * 10, 64 * MiB - 4) == 4
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"y", 64 * MiB)
        assert ei.value.errno in (errno.ENOSPC, errno.EFBIG)
        assert os.pread(fd, 10, 64 * MiB - 4) == b"xxxx"
        with pytest.raises(OSError) as ei:
            os.ftruncate(fd, MiB)
        assert ei.value.errno == errno.EINVAL
        os.ftruncate(fd, 64 * MiB)  # same size: fine
        os.ftruncate(fd, 0)  # ignored, as on a block device
        assert os.fstat(fd).st_size == 64 * MiB and os.pread(fd, 4, 64 * MiB - 4) == b"xxxx"
    finally:
        os.close(fd)
    report = m.unmount()
    d = report["disk"]
    assert d["discards"] == 1 and d["discarded_bytes"] == MiB
    assert d["flushes"] >= 2  # the fsync and the unmount
    assert report["small"]["flushes"] >= 1
    expect = bytearray(64 * MiB)
    expect[5 * MiB + 3:5 * MiB + 3 + len(data)] = data
    expect[6 * MiB:7 * MiB] = bytes(MiB)
    expect[7 * MiB:7 * MiB + 4096] = bytes(4096)
    expect[64 * MiB - 4:] = b"xxxx"
    import hashlib
    assert d["sha256"] == hashlib.sha256(expect).hexdigest()


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _punch(fd: int, offset: int, length: int) -> None:
    _fallocate(fd, 0x01 | 0x02, offset, length)  # KEEP_SIZE | PUNCH_HOLE


def test_sigterm_unmounts_and_flushes(fuse_mount):
    m = fuse_mount(disk=8 * MiB)
    with open(m.path("disk"), "r+b") as f:
        f.write(b"before signal")
    m.proc.send_signal(signal.SIGTERM)
    m.proc.wait(timeout=30)
    assert not is_mounted(m.mnt)
    report = m.unmount()
    assert report["disk"]["flushes"] >= 1 and report["disk"]["mapped"] == [[0, 65536]]


def make_tree(root: str, seed: int = 1) -> None:
    rnd = random.Random(seed)
    for d in range(12):
        sub = os.path.join(root, f"dir{d}", f"nested{d % 3}")
        os.makedirs(sub)
        for i in range(25):
            size = rnd.choice([0, 1, 100, 4095, 4096, 5000, 65536, 300_000, 1_500_000])
            with open(os.path.join(sub, f"file{i}.bin"), "wb") as f:
                f.write(rnd.randbytes(size))
        os.symlink(f"nested{d % 3}/file0.bin", os.path.join(root, f"dir{d}", "link"))
    with open(os.path.join(root, "sparse.img"), "wb") as f:
        f.truncate(5 * MiB)
        f.seek(2 * MiB)
        f.write(b"middle")
    src = Path(__file__).resolve().parents[2] / "thinpool"
    shutil.copytree(src, os.path.join(root, "thinpool_src"), ignore=shutil.ignore_patterns("__pycache__"))


@pytest.mark.external
def test_loop_ext4_on_fuse_file(fuse_mount):
    need_loop()
    need_tool("losetup", "mkfs.ext4", "e2fsck", "fstrim", "mount", "umount", "diff")
    m = fuse_mount(disk=256 * MiB)
    work = tempfile.mkdtemp(prefix="tpext", dir="/tmp")
    ext = os.path.join(work, "ext")
    tree = os.path.join(work, "tree")
    os.mkdir(ext)
    make_tree(tree)
    loop = None
    try:
        loop = run_tool("losetup", "-f", "--show", m.path("disk"), timeout=30).stdout.strip()
        assert loop.startswith("/dev/loop")
        run_tool("mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop, timeout=60)
        run_tool("mount", loop, ext, timeout=30)
        try:
            run_tool("cp", "-a", tree, os.path.join(ext, "tree"), timeout=120)
            run_tool("sync", timeout=60)
        finally:
            run_tool("umount", ext, timeout=60)
        r = run_tool("e2fsck", "-fn", loop, check=False, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        with contextlib.suppress(OSError):
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        if shutil.which("blockdev") or os.path.exists("/usr/sbin/blockdev") or os.path.exists("/sbin/blockdev"):
            run_tool("blockdev", "--flushbufs", loop, check=False, timeout=30)
        run_tool("mount", "-o", "ro", loop, ext, timeout=30)
        try:
            r = run_tool("diff", "-r", "--no-dereference", tree, os.path.join(ext, "tree"), check=False, timeout=120)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        finally:
            run_tool("umount", ext, timeout=60)
        used_before = blocks(m.path("disk"))
        assert used_before > 20 * MiB
        # delete the tree and fstrim: the discards reach the device as punched holes
        run_tool("mount", loop, ext, timeout=30)
        try:
            shutil.rmtree(os.path.join(ext, "tree"))
            run_tool("sync", timeout=60)
            r = run_tool("fstrim", "-v", ext, timeout=120)
            assert "trimmed" in r.stdout
        finally:
            run_tool("umount", ext, timeout=60)
        used_after = blocks(m.path("disk"))
        assert used_after < used_before - 15 * MiB, (used_before, used_after)
        r = run_tool("e2fsck", "-fn", loop, check=False, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        if is_mounted(ext):
            subprocess.run(["umount", "-l", ext], check=False, timeout=30)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False, timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    report = m.unmount()
    assert report["disk"]["discards"] > 0 and report["disk"]["flushes"] >= 1
    assert sum(n for _o, n in report["disk"]["mapped"]) == used_after
