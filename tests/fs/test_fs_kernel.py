"""The Linux kernel's ext2 driver reads what thinpool writes, and thinpool reads what the kernel writes.

Needs root and loop devices (``mount -o loop``); skipped with a reason where they are not available.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pytest
from conftest import need_root_feature
from fs_helpers import e2fsck, sparse_image

from thinpool.fs import Filesystem
from thinpool.io.device import FileDevice

pytestmark = [pytest.mark.external, pytest.mark.root]
MiB = 2**20


def _can_loop_mount() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/loop-control") and shutil.which("mount") is not None


@contextlib.contextmanager
def loop_mount(image, mnt, *, readonly: bool):
    opts = "loop,ro" if readonly else "loop"
    r = subprocess.run(["mount", "-t", "ext2", "-o", opts, str(image), str(mnt)], capture_output=True, text=True)
    need_root_feature(f"mount -o loop ({r.stderr.strip()})", r.returncode == 0)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_kernel_reads_what_thinpool_wrote(tmp_path):
    need_root_feature("root and loop devices", _can_loop_mount())
    image = sparse_image(tmp_path / "k.img", 96 * MiB)
    expected: dict[str, bytes] = {}
    with FileDevice(image) as dev:
        fs = Filesystem.mkfs(dev)
        fs.mkdir("/d/e", parents=True)
        for i in range(400):  # a directory of several blocks
            p = f"/d/entry-with-a-long-name-{i:04d}"
            expected[p] = bytes([i % 256]) * (i * 13)
            fs.write_file(p, expected[p])
        expected["/big"] = os.urandom(20 * MiB)  # double indirect
        fs.write_file("/big", expected["/big"])
        with fs.open("/sparse", "wb") as f:
            f.seek(40 * MiB)
            f.write(b"far away")
        expected["/sparse"] = bytes(40 * MiB) + b"far away"
        fs.symlink("big", "/fast")
        fs.symlink("/d/" + "x" * 90, "/slow")
        fs.link("/big", "/d/e/hard")
        fs.flush()
    e2fsck(image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_mount(image, mnt, readonly=True):
        for p, data in expected.items():
            assert (mnt / p.lstrip("/")).read_bytes() == data, p
        assert os.readlink(mnt / "fast") == "big" and os.readlink(mnt / "slow") == "/d/" + "x" * 90
        assert os.stat(mnt / "big").st_nlink == 2 and (mnt / "d" / "e" / "hard").read_bytes() == expected["/big"]
        assert len(os.listdir(mnt / "d")) == 401


def test_thinpool_reads_and_changes_what_the_kernel_wrote(tmp_path):
    need_root_feature("root and loop devices", _can_loop_mount())
    image = sparse_image(tmp_path / "k2.img", 64 * MiB)
    with FileDevice(image) as dev:
        Filesystem.mkfs(dev).flush()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    blob = os.urandom(3 * MiB + 7)
    with loop_mount(image, mnt, readonly=False):
        (mnt / "k" / "deep").mkdir(parents=True)
        (mnt / "k" / "blob").write_bytes(blob)
        (mnt / "k" / "deep" / "note").write_text("written by the kernel")
        os.symlink("deep/note", mnt / "k" / "ln")
        for i in range(100):
            (mnt / "k" / f"f{i}").write_bytes(b"%d" % i)
        for i in range(0, 100, 3):
            (mnt / "k" / f"f{i}").unlink()
    e2fsck(image)
    with FileDevice(image) as dev:
        fs = Filesystem.mount(dev)
        assert fs.read_file("/k/blob") == blob
        assert fs.read_file("/k/ln") == b"written by the kernel"
        assert sorted(fs.listdir("/k")) == sorted(["blob", "deep", "ln"] + [f"f{i}" for i in range(100) if i % 3])
        fs.write_file("/k/deep/from-thinpool", b"hello kernel")
        fs.unlink("/k/f1")
        fs.rename("/k/deep", "/moved")
        fs.flush()
    e2fsck(image)
    with loop_mount(image, mnt, readonly=True):
        assert (mnt / "moved" / "from-thinpool").read_bytes() == b"hello kernel"
        assert not (mnt / "k" / "f1").exists()
