"""Special files (mknod), extended attributes, sparse writes, st_* fields and symlink-safe attribute changes.

Every image is checked by the real ``e2fsck -fn`` and read back through ``debugfs`` (stat, ea_list, ls -l, cat);
where root and loop devices exist, the Linux kernel mounts it read-only and sees the same.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import subprocess

import pytest
from conftest import need_root_feature
from fs_helpers import debugfs, debugfs_cat, debugfs_ls, e2fsck, sparse_image

from thinpool.errors import FileExists, FsError, FsNoSpace, XattrNotFound
from thinpool.fs import Filesystem
from thinpool.fs import xattr as X
from thinpool.io.device import FileDevice

MiB = 2**20
CAP = struct.pack("<IIIII", 0x02000001, 0x400, 0, 0, 0)  # vfs_cap_data v2: cap_net_bind_service permitted
ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in (
    (X.ACL_USER_OBJ, 6, 0xFFFFFFFF), (X.ACL_USER, 6, 1000), (X.ACL_GROUP_OBJ, 4, 0xFFFFFFFF),
    (X.ACL_MASK, 6, 0xFFFFFFFF), (X.ACL_OTHER, 4, 0xFFFFFFFF)))


@pytest.fixture
def image(tmp_path):
    return sparse_image(tmp_path / "special.img", 32 * MiB)


def _build(image):
    """A file system with one of each special file, xattrs on a file, a directory and a symlink, a sparse file."""
    with FileDevice(image) as dev:
        fs = Filesystem.mkfs(dev)
        fs.mknod("/fifo", stat.S_IFIFO | 0o640)
        fs.mknod("/sock", stat.S_IFSOCK | 0o600)
        fs.mknod("/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        fs.mknod("/nvme", stat.S_IFBLK | 0o660, os.makedev(259, 300000))  # needs the new encoding
        fs.write_file("/f", b"hello")
        fs.setxattr("/f", "user.comment", b"made by thinpool")
        fs.setxattr("/f", "security.capability", CAP)
        fs.setxattr("/f", "trusted.overlay.opaque", b"y")
        fs.setxattr("/f", "system.posix_acl_access", ACL)
        fs.mkdir("/d")
        fs.setxattr("/d", "user.empty", b"")
        fs.symlink("f", "/link")
        fs.setxattr("/link", "trusted.on-link", b"1")
        fs.chown("/link", 7, 8, follow_symlinks=False)
        fs.utime("/link", ns=(1_000_000_000 * 1_600_000_000, 1_000_000_000 * 1_500_000_000 + 999),
                 follow_symlinks=False)
        fs.write_file("/sparse", b"")
        fs.write_at("/sparse", 10 * MiB, b"tail")
        fs.truncate("/sparse", 20 * MiB)
        fs.close()


def test_mknod_stores_devices_as_ext2_does_and_e2fsck_passes(image):
    _build(image)
    e2fsck(image)
    null = debugfs(image, "stat /null")
    assert "character special" in null and "Device major/minor number: 01:03" in null
    nvme = debugfs(image, "stat /nvme")
    assert "block special" in nvme and "(New-style) Device major/minor number: 259:300000" in nvme
    assert "Type: FIFO" in debugfs(image, "stat /fifo")
    assert "Type: socket" in debugfs(image, "stat /sock")
    ls = debugfs_ls(image, "/")
    assert ls["fifo"][1] == stat.S_IFIFO | 0o640 and ls["sock"][1] == stat.S_IFSOCK | 0o600
    with FileDevice(image) as dev:
        fs = Filesystem.mount(dev, readonly=True)
        assert fs.lstat("/nvme").st_rdev == os.makedev(259, 300000)
        assert fs.lstat("/null").st_rdev == os.makedev(1, 3)
        assert stat.S_ISFIFO(fs.lstat("/fifo").st_mode) and fs.lstat("/fifo").st_rdev == 0
        assert fs.lstat("/sock").is_special


def test_xattrs_are_what_debugfs_lists(image):
    _build(image)
    e2fsck(image)
    out = debugfs(image, "ea_list /f")
    assert 'user.comment (16) = "made by thinpool"' in out
    assert 'trusted.overlay.opaque (1) = "y"' in out
    assert "security.capability (20) = 01 00 00 02 00 04 00 00" in out
    assert "system.posix_acl_access (28)" in out  # ext2's short disk form: 4 + 3*4 + 2*8 - 8 = 28 bytes
    assert 'trusted.on-link (1) = "1"' in debugfs(image, "ea_list /link")
    assert "user.empty (0)" in debugfs(image, "ea_list /d")
    with FileDevice(image) as dev:
        fs = Filesystem.mount(dev, readonly=True)
        assert fs.listxattr("/f") == ["user.comment", "system.posix_acl_access", "trusted.overlay.opaque",
                                      "security.capability"]
        assert fs.getxattr("/f", "security.capability") == CAP
        assert fs.getxattr("/f", "system.posix_acl_access") == ACL
        assert fs.listxattr("/link") == ["trusted.on-link"]
        assert fs.getxattr("/link", "user.comment", follow_symlinks=True) == b"made by thinpool"
        with pytest.raises(XattrNotFound) as e:
            fs.getxattr("/f", "user.nope")
        assert e.value.errno == errno.ENODATA and e.value.path == "/f"


def test_symlink_attributes_change_without_following(image):
    _build(image)
    with FileDevice(image) as dev:
        fs = Filesystem.mount(dev, readonly=True)
        link, target = fs.lstat("/link"), fs.stat("/link")
        assert (link.st_uid, link.st_gid) == (7, 8) and (target.st_uid, target.st_gid) == (0, 0)
        assert link.st_atime_ns == 1_600_000_000 * 10**9 and link.st_mtime_ns == 1_500_000_000 * 10**9
        assert fs.readlink("/link") == "f"
    out = debugfs(image, "stat /link")
    assert "User:     7   Group:     8" in out and "Fast link dest: \"f\"" in out


def test_sparse_write_at_and_truncate_leave_holes(image):
    _build(image)
    out = debugfs(image, "stat /sparse")
    assert "Size: 20971520" in out
    # one data block behind a double-indirect and an indirect block: everything else is a hole
    assert "Blockcount: 24" in out and "TOTAL: 3" in out
    data = debugfs_cat(image, "/sparse")
    assert len(data) == 20 * MiB and data[10 * MiB:10 * MiB + 4] == b"tail" and data.count(0) == 20 * MiB - 4


def test_xattr_edits_update_free_counts_and_the_feature(image):
    with FileDevice(image) as dev:
        fs = Filesystem.mkfs(dev)
        assert not fs.sb.s_feature_compat & X.FEATURE_COMPAT_EXT_ATTR
        fs.write_file("/a", b"x")
        free = fs.statfs().free_blocks
        fs.setxattr("/a", "user.k", b"v" * 100)
        assert fs.sb.s_feature_compat & X.FEATURE_COMPAT_EXT_ATTR
        assert fs.statfs().free_blocks == free - 1 and fs.lstat("/a").st_blocks == 16
        fs.setxattr("/a", "user.k", b"w" * 200)  # rewritten in place
        assert fs.statfs().free_blocks == free - 1
        with pytest.raises(FileExists):
            fs.setxattr("/a", "user.k", b"", os.XATTR_CREATE)
        with pytest.raises(XattrNotFound):
            fs.setxattr("/a", "user.other", b"", os.XATTR_REPLACE)
        with pytest.raises(FsNoSpace):
            fs.setxattr("/a", "user.huge", bytes(4096))
        assert fs.getxattr("/a", "user.k") == b"w" * 200  # the failed set changed nothing
        with pytest.raises(FsError) as e:
            fs.setxattr("/a", "os2.name", b"")
        assert e.value.errno == errno.ENOTSUP
        fs.removexattr("/a", "user.k")
        assert fs.listxattr("/a") == [] and fs.statfs().free_blocks == free and fs.lstat("/a").st_blocks == 8
        fs.setxattr("/a", "trusted.t", b"1")
        fs.unlink("/a")  # frees the xattr block with the inode
        assert fs.statfs().free_blocks == free + 1
        fs.close()
    e2fsck(image)


def test_a_shared_xattr_block_is_copied_before_a_change(image):
    """Blocks shared by refcount (as mke2fs -d or the kernel's mbcache make them) lose one reference only."""
    with FileDevice(image) as dev:
        fs = Filesystem.mkfs(dev)
        fs.write_file("/a", b"1")
        fs.write_file("/b", b"2")
        fs.setxattr("/a", "user.same", b"v")
        fs.close()
    # share /a's block with /b through debugfs (sif writes the raw inode field), as the kernel would
    with FileDevice(image) as dev:
        fs = Filesystem.mount(dev)
        blk = fs._inode(fs.lstat("/a").ino).i_file_acl
    subprocess.run(["debugfs", "-w", "-R", f"sif /b file_acl {blk}", str(image)], check=True, capture_output=True)
    subprocess.run(["debugfs", "-w", "-R", "sif /b blocks 16", str(image)], check=True, capture_output=True)
    with open(image, "r+b") as f:
        f.seek(blk * 4096 + 4)
        f.write(struct.pack("<I", 2))
    e2fsck(image)
    with FileDevice(image) as dev:
        fs = Filesystem.mount(dev)
        fs.setxattr("/b", "user.same", b"changed")
        assert fs.getxattr("/a", "user.same") == b"v" and fs.getxattr("/b", "user.same") == b"changed"
        fs.unlink("/a")
        fs.close()
    e2fsck(image)


def test_mknod_refuses_directories_and_existing_names(image):
    with FileDevice(image) as dev:
        fs = Filesystem.mkfs(dev)
        with pytest.raises(FsError) as e:
            fs.mknod("/d", stat.S_IFDIR | 0o755)
        assert e.value.errno == errno.EINVAL
        fs.mknod("/p", stat.S_IFIFO | 0o644)
        with pytest.raises(FileExists):
            fs.mknod("/p", stat.S_IFIFO | 0o644)
        with pytest.raises(FsError):
            fs.open("/p", "rb")  # never opened as data
        fs.mknod("/empty", 0o600)  # no type bits: a regular file, as mknod(2)
        assert fs.lstat("/empty").is_file
        fs.close()
    e2fsck(image)


@pytest.mark.external
@pytest.mark.root
def test_the_kernel_sees_special_files_and_xattrs(image, tmp_path):
    from test_fs_kernel import _can_loop_mount, loop_mount

    need_root_feature("root and loop devices", _can_loop_mount())
    _build(image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_mount(image, mnt, readonly=True):
        assert os.lstat(mnt / "nvme").st_rdev == os.makedev(259, 300000)
        assert os.lstat(mnt / "null").st_rdev == os.makedev(1, 3)
        assert stat.S_ISFIFO(os.lstat(mnt / "fifo").st_mode) and stat.S_ISSOCK(os.lstat(mnt / "sock").st_mode)
        assert os.getxattr(mnt / "f", "user.comment") == b"made by thinpool"
        assert os.getxattr(mnt / "f", "security.capability") == CAP
        assert os.getxattr(mnt / "f", "trusted.overlay.opaque") == b"y"
        assert os.getxattr(mnt / "f", "system.posix_acl_access") == ACL
        assert os.getxattr(mnt / "link", "trusted.on-link", follow_symlinks=False) == b"1"
        st = os.lstat(mnt / "link")
        assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (7, 8, 1_500_000_000 * 10**9)
        sp = os.stat(mnt / "sparse")
        assert sp.st_size == 20 * MiB and sp.st_blocks == 24


@pytest.mark.external
@pytest.mark.root
def test_thinpool_reads_and_changes_special_files_and_xattrs_the_kernel_wrote(image, tmp_path):
    """The kernel's ext2 writes the xattr blocks (sharing identical ones by refcount through its mbcache), device
    numbers and a sparse file; thinpool reads them, changes a shared block (copied first) and the kernel agrees."""
    from test_fs_kernel import _can_loop_mount, loop_mount

    need_root_feature("root and loop devices", _can_loop_mount())
    with FileDevice(image) as dev:
        Filesystem.mkfs(dev).close()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_mount(image, mnt, readonly=False):
        for name in ("a", "b", "c"):
            (mnt / name).write_bytes(name.encode())
            os.setxattr(mnt / name, "user.same", b"shared value")
            os.setxattr(mnt / name, "trusted.t", b"x" * 300)
        os.setxattr(mnt / "c", "security.capability", CAP)
        os.mknod(mnt / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(mnt / "wide", stat.S_IFBLK | 0o600, os.makedev(300, 70000))
        os.mkfifo(mnt / "fifo")
        with open(mnt / "sparse", "wb") as f:
            f.seek(8 * MiB)
            f.write(b"end")
    e2fsck(image)
    with FileDevice(image) as dev:
        fs = Filesystem.mount(dev)
        acl_a, acl_b = (fs._inode(fs.lstat(p).ino).i_file_acl for p in ("/a", "/b"))
        assert acl_a and acl_a == acl_b  # the kernel shares one block between a and b
        for name in ("/a", "/b"):
            assert sorted(fs.listxattr(name)) == ["trusted.t", "user.same"]
            assert fs.getxattr(name, "user.same") == b"shared value"
        assert fs.getxattr("/c", "security.capability") == CAP
        assert fs.lstat("/null").st_rdev == os.makedev(1, 3)
        assert fs.lstat("/wide").st_rdev == os.makedev(300, 70000)
        assert stat.S_ISFIFO(fs.lstat("/fifo").st_mode)
        assert fs.data_ranges("/sparse") == [(8 * MiB, 3)]
        fs.setxattr("/a", "user.same", b"changed in a")  # a gets its own block, b keeps the shared one
        fs.removexattr("/b", "trusted.t")
        fs.unlink("/c")
        fs.mknod("/from-thinpool", stat.S_IFCHR | 0o600, os.makedev(4095, 1048575))
        fs.close()
    e2fsck(image)
    with loop_mount(image, mnt, readonly=True):
        assert os.getxattr(mnt / "a", "user.same") == b"changed in a"
        assert os.getxattr(mnt / "a", "trusted.t") == b"x" * 300
        assert os.getxattr(mnt / "b", "user.same") == b"shared value"
        assert os.listxattr(mnt / "b") == ["user.same"]
        assert os.lstat(mnt / "from-thinpool").st_rdev == os.makedev(4095, 1048575)
