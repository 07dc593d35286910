"""Behaviour of the ext2 file system API; every test's image must pass ``e2fsck -fn`` afterwards."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
from conftest import REQUIRE_EXTERNAL
from fs_helpers import e2fsck, sparse_image

from thinpool.errors import (
    DirectoryNotEmpty,
    FileExists,
    FileNotFound,
    FsError,
    IsADirectory,
    NameTooLong,
    NotADirectory,
)
from thinpool.fs import Filesystem
from thinpool.io.device import FileDevice

MiB = 2**20


class CountingFileDevice(FileDevice):
    """A FileDevice on a sparse image that counts flushes (so e2fsck can check the image afterwards)."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.fixture
def image(tmp_path):
    return sparse_image(tmp_path / "api.img", 32 * MiB)


@pytest.fixture
def dev(image):
    d = CountingFileDevice(image)
    yield d
    d.close()


@pytest.fixture
def fs(dev, image):
    """A fresh file system; after the test it is flushed and must pass e2fsck -fn."""
    f = Filesystem.mkfs(dev)
    yield f
    if not f.readonly and not f.closed:
        f.flush()
    if shutil.which("e2fsck") or os.path.exists("/usr/sbin/e2fsck") or REQUIRE_EXTERNAL:
        e2fsck(image)


def test_new_filesystem_has_lost_and_found(fs):
    assert fs.listdir("/") == ["lost+found"]
    st = fs.stat("/")
    assert st.is_dir and st.nlink == 3 and st.ino == 2
    assert fs.stat("/lost+found").size == 4 * 4096


def test_write_read_roundtrip_and_reopen(dev, fs):
    data = os.urandom(100_000)
    fs.mkdir("/d")
    fs.write_file("/d/f.bin", data)
    assert fs.read_file("/d/f.bin") == data
    fs.flush()
    fs2 = Filesystem.mount(dev)
    assert fs2.read_file("/d/f.bin") == data
    assert fs2.listdir("/d") == ["f.bin"]


def test_flush_flushes_the_device(dev, fs):
    before = dev.flushes
    fs.write_file("/x", b"1")
    fs.flush()
    assert dev.flushes == before + 1


def test_seek_partial_overwrite_and_holes(fs):
    with fs.open("/f", "w+b") as f:
        f.write(b"a" * 10)
        f.seek(5000)
        f.write(b"bc")
        f.seek(3)
        f.write(b"XY")
        f.seek(0)
        assert f.read() == b"aaaXYaaaaa" + bytes(4990) + b"bc"
        assert f.tell() == 5002
    assert fs.stat("/f").size == 5002
    with fs.open("/f", "r+b") as f:
        f.seek(100 * 4096)
        f.write(b"end")
    data = fs.read_file("/f")
    assert len(data) == 100 * 4096 + 3 and data[-3:] == b"end" and not any(data[5002:100 * 4096])
    # 3 data blocks + 1 single indirect block are allocated, the rest is a hole
    assert fs.stat("/f").blocks == 4 * 8


def test_append_mode(fs):
    fs.write_file("/log", b"one\n")
    with fs.open("/log", "ab") as f:
        f.write(b"two\n")
    assert fs.read_file("/log") == b"one\ntwo\n"


def test_truncate_shrink_then_extend_reads_zeros(fs):
    fs.write_file("/t", b"x" * 10000)
    fs.truncate("/t", 5)
    assert fs.read_file("/t") == b"xxxxx"
    fs.truncate("/t", 9000)
    assert fs.read_file("/t") == b"xxxxx" + bytes(8995)
    with fs.open("/t", "r+b") as f:
        f.truncate(0)
    assert fs.read_file("/t") == b"" and fs.stat("/t").blocks == 0


def test_truncate_frees_indirect_blocks(fs):
    free0 = fs.statfs().free_blocks
    fs.write_file("/big", os.urandom(5 * MiB))  # 1280 blocks: direct + single + double indirect
    assert fs.statfs().free_blocks == free0 - 1280 - 1 - 2
    fs.truncate("/big", 4096 * 12)
    assert fs.statfs().free_blocks == free0 - 12
    fs.unlink("/big")
    assert fs.statfs().free_blocks == free0


def test_unlink_and_rmdir(fs):
    fs.mkdir("/d")
    fs.write_file("/d/f", b"x")
    with pytest.raises(DirectoryNotEmpty) as e:
        fs.rmdir("/d")
    assert e.value.errno == errno.ENOTEMPTY and e.value.path == "/d"
    with pytest.raises(IsADirectory):
        fs.unlink("/d")
    with pytest.raises(NotADirectory):
        fs.rmdir("/d/f")
    fs.unlink("/d/f")
    fs.rmdir("/d")
    assert fs.listdir("/") == ["lost+found"]
    assert fs.stat("/").nlink == 3


def test_errors_users_expect(fs):
    fs.write_file("/file", b"x")
    with pytest.raises(NameTooLong):
        fs.write_file("/" + "n" * 256, b"")
    fs.write_file("/" + "n" * 255, b"ok")
    with pytest.raises(NotADirectory):
        fs.write_file("/file/sub", b"")
    with pytest.raises(NotADirectory):
        fs.stat("/file/sub")
    with pytest.raises(FileNotFound):
        fs.read_file("/missing")
    with pytest.raises(FileNotFound):
        fs.mkdir("/missing/child")
    with pytest.raises(FileExists):
        fs.mkdir("/file")
    with pytest.raises(FileExists):
        fs.open("/file", "xb")
    with pytest.raises(IsADirectory):
        fs.open("/lost+found", "rb")
    with pytest.raises(FsError):
        fs.rmdir("/")


def test_error_classes_subclass_builtins():
    assert issubclass(FileNotFound, FileNotFoundError)
    assert issubclass(NotADirectory, NotADirectoryError)
    assert issubclass(IsADirectory, IsADirectoryError)
    assert issubclass(FileExists, FileExistsError)


def test_mkdir_parents(fs):
    fs.mkdir("/a/b/c", parents=True)
    fs.mkdir("/a/b/c", parents=True)
    assert fs.isdir("/a/b/c")
    assert fs.stat("/a").nlink == 3 and fs.stat("/a/b/c").nlink == 2


def test_rename_rules(fs):
    fs.mkdir("/a")
    fs.mkdir("/b")
    fs.write_file("/a/f", b"1")
    fs.write_file("/b/g", b"2")
    fs.rename("/a/f", "/b/g")  # replaces a file
    assert fs.read_file("/b/g") == b"1" and fs.listdir("/a") == []
    fs.mkdir("/a/sub")
    fs.rename("/a/sub", "/b/sub")  # moves a directory across parents: link counts follow
    assert fs.stat("/a").nlink == 2 and fs.stat("/b").nlink == 3
    assert fs.stat("/b/sub/..").ino == fs.stat("/b").ino
    with pytest.raises(FsError) as e:
        fs.rename("/b", "/b/sub/inner")
    assert e.value.errno == errno.EINVAL
    fs.write_file("/b/sub/x", b"")
    fs.mkdir("/c")
    with pytest.raises(DirectoryNotEmpty):
        fs.rename("/c", "/b/sub")
    with pytest.raises(IsADirectory):
        fs.rename("/b/g", "/c")
    with pytest.raises(NotADirectory):
        fs.rename("/c", "/b/g")
    fs.mkdir("/e")
    fs.rename("/c", "/e")  # over an empty directory
    assert not fs.exists("/c") and fs.isdir("/e") and fs.stat("/").nlink == 6


def test_symlinks_fast_and_slow(fs):
    fs.mkdir("/d")
    fs.write_file("/d/target", b"data")
    fs.symlink("target", "/d/fast")
    long_target = "/d/" + "x" * 80
    fs.symlink(long_target, "/slow")
    assert fs.readlink("/d/fast") == "target"
    assert fs.readlink("/slow") == long_target
    assert fs.lstat("/d/fast").blocks == 0 and fs.lstat("/slow").blocks == 8
    assert fs.read_file("/d/fast") == b"data"
    fs.symlink("/d", "/dl")
    assert fs.read_file("/dl/target") == b"data"
    with pytest.raises(FileNotFound):
        fs.read_file("/slow")
    fs.unlink("/slow")
    fs.unlink("/dl")
    assert fs.isdir("/d")


def test_hard_links(fs):
    fs.write_file("/a", b"shared")
    fs.link("/a", "/b")
    assert fs.stat("/a").nlink == 2 and fs.stat("/a").ino == fs.stat("/b").ino
    fs.unlink("/a")
    assert fs.read_file("/b") == b"shared" and fs.stat("/b").nlink == 1
    with pytest.raises(IsADirectory):
        fs.link("/lost+found", "/lf2")


def test_chmod_chown_utime(fs):
    fs.write_file("/f", b"")
    fs.chmod("/f", 0o600)
    fs.chown("/f", 100000, 42)
    fs.utime("/f", (1000, 2000))
    st = fs.stat("/f")
    assert st.mode == 0o100600 and st.uid == 100000 and st.gid == 42
    assert st.atime == 1000 and st.mtime == 2000


def test_statfs_counts(fs):
    s = fs.statfs()
    assert s.block_size == 4096 and s.nr_blocks == 32 * MiB // 4096 and s.name_max == 255
    fs.write_file("/f", b"x" * 8192)
    assert fs.statfs().free_blocks == s.free_blocks - 2
    assert fs.statfs().free_inodes == s.free_inodes - 1


def test_many_entries_spill_into_new_directory_blocks(dev, fs):
    fs.mkdir("/many")
    names = [f"file-with-a-longish-name-{i:05d}" for i in range(600)]
    for n in names:
        fs.write_file("/many/" + n, n.encode())
    assert fs.stat("/many").size > 4096
    for n in names[::3]:
        fs.unlink("/many/" + n)
    fs.flush()
    fs2 = Filesystem.mount(dev)
    keep = [n for i, n in enumerate(names) if i % 3]
    assert sorted(fs2.listdir("/many")) == keep
    assert all(fs2.read_file("/many/" + n) == n.encode() for n in keep[::50])


def test_readonly_open_refuses_writes(dev, fs):
    fs.flush()
    ro = Filesystem.mount(dev, readonly=True)
    with pytest.raises(FsError) as e:
        ro.write_file("/x", b"")
    assert e.value.errno == errno.EROFS


def test_threads_sharing_one_filesystem(fs):
    import threading

    errors = []

    def worker(t: int) -> None:
        try:
            fs.mkdir(f"/t{t}")
            for i in range(100):
                fs.write_file(f"/t{t}/f{i}", bytes([t]) * (i * 97))
                if i % 10 == 9:
                    fs.unlink(f"/t{t}/f{i - 5}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for t in range(4):
        names = set(fs.listdir(f"/t{t}"))
        assert len(names) == 90
        assert fs.read_file(f"/t{t}/f99") == bytes([t]) * (99 * 97)
