"""Damaged images raise FsCorrupt naming the structure; a full file system raises FsNoSpace and loses nothing."""

from __future__ import annotations

import re
import struct

import pytest
from conftest import run_tool
from fs_helpers import debugfs, e2fsck, sparse_image

from thinpool.errors import FsCorrupt, FsNoSpace, NoSpace
from thinpool.fs import Filesystem
from thinpool.io.device import FileDevice, MemoryDevice

MiB = 2**20


@pytest.fixture
def image(tmp_path):
    img = sparse_image(tmp_path / "c.img", 16 * MiB)
    with FileDevice(img) as dev:
        fs = Filesystem.mkfs(dev)
        fs.mkdir("/dir")
        fs.write_file("/dir/file", b"payload" * 1000)
        fs.flush()
    return img


def _poke(img, offset: int, data: bytes) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _mount(img) -> Filesystem:
    return Filesystem.mount(FileDevice(img))


def _inode_location(img, path: str) -> int:
    out = debugfs(img, f"imap {path}")
    m = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", out)
    assert m, out
    return int(m.group(1)) * 4096 + int(m.group(2), 16)


def _fsck_finds_damage(img) -> None:
    assert run_tool("e2fsck", "-fn", str(img), check=False).returncode != 0


def test_bad_superblock_magic(image):
    _poke(image, 1024 + 56, b"\0\0")
    with pytest.raises(FsCorrupt) as e:
        _mount(image)
    assert "magic" in e.value.reason and "superblock" in e.value.reason and e.value.block == 0


def test_superblock_bigger_than_device(image):
    _poke(image, 1024 + 4, struct.pack("<I", 10**6))
    with pytest.raises(FsCorrupt) as e:
        _mount(image)
    assert "superblock" in e.value.reason


def test_superblock_inode_counts_disagree(image):
    _poke(image, 1024 + 40, struct.pack("<I", 7))
    with pytest.raises(FsCorrupt, match="inode counts"):
        _mount(image)


def test_bad_group_descriptor(image):
    _poke(image, 4096 + 8, struct.pack("<I", 999_999))  # bg_inode_table of group 0
    with pytest.raises(FsCorrupt) as e:
        _mount(image)
    assert "group descriptor 0" in e.value.reason and "inode table" in e.value.reason and e.value.block == 1
    _fsck_finds_damage(image)


def test_bad_inode_mode(image):
    loc = _inode_location(image, "/dir/file")
    _poke(image, loc, struct.pack("<H", 0o170644))
    fs = _mount(image)
    with pytest.raises(FsCorrupt) as e:
        fs.read_file("/dir/file")
    assert "inode" in e.value.reason and e.value.inode == fs.stat("/dir").ino + 1
    _fsck_finds_damage(image)


def test_inode_block_pointer_past_the_end(image):
    loc = _inode_location(image, "/dir/file")
    _poke(image, loc + 40, struct.pack("<I", 123_456_789))  # i_block[0]
    fs = _mount(image)
    with pytest.raises(FsCorrupt) as e:
        fs.read_file("/dir/file")
    assert e.value.block == 123_456_789 and "inode" in e.value.reason
    _fsck_finds_damage(image)


def test_corrupt_directory_block(image):
    blk = int(debugfs(image, "blocks /dir").split()[0])
    _poke(image, blk * 4096 + 12 + 4, struct.pack("<H", 3))  # rec_len of '..' = 3
    fs = _mount(image)
    with pytest.raises(FsCorrupt) as e:
        fs.listdir("/dir")
    assert "directory block" in e.value.reason and e.value.block == blk
    _fsck_finds_damage(image)


def test_root_not_a_directory(image):
    loc = _inode_location(image, "<2>")
    _poke(image, loc, struct.pack("<H", 0o100644))
    with pytest.raises(FsCorrupt, match="root inode"):
        _mount(image)


def test_full_filesystem_refuses_writes_and_keeps_everything(tmp_path):
    img = sparse_image(tmp_path / "full.img", 8 * MiB)
    with FileDevice(img) as dev:
        fs = Filesystem.mkfs(dev)
        kept = {}
        i = 0
        with pytest.raises(FsNoSpace) as e:
            while True:
                data = bytes([i % 256]) * (300_000 + i)
                kept[f"/f{i}"] = data
                fs.write_file(f"/f{i}", data)
                i += 1
        assert isinstance(e.value, NoSpace) and e.value.errno == 28
        failed = f"/f{i}"
        del kept[failed]
        assert fs.stat(failed).size == 0  # created, but the refused write allocated nothing
        free = fs.statfs().free_blocks
        # a big write into an existing file: refused as a whole, the file keeps its old bytes
        with pytest.raises(FsNoSpace):
            with fs.open("/f0", "r+b") as f:
                f.seek(1 * MiB)
                f.write(b"z" * (free + 1) * 4096)
        assert fs.statfs().free_blocks == free
        with pytest.raises(FsNoSpace):
            fs.mkdir("/too/many/levels", parents=True) if free == 0 else fs.write_file(failed, b"q" * (free + 1) * 4096)
        for p, data in kept.items():
            assert fs.read_file(p) == data
        fs.flush()
    e2fsck(img)
    with FileDevice(img) as dev:
        fs = Filesystem.mount(dev)
        fs.unlink("/f0")
        fs.write_file(failed, b"fits now")
        fs.flush()
    e2fsck(img)


def test_filling_every_block_then_mkdir_fails_cleanly(tmp_path):
    dev = MemoryDevice(4 * MiB)
    fs = Filesystem.mkfs(dev)
    free = fs.statfs().free_blocks
    fs.write_file("/all", b"a" * (free - 1) * 4096)  # leaves exactly the single-indirect block's worth
    assert fs.statfs().free_blocks == 0
    inodes = fs.statfs().free_inodes
    with pytest.raises(FsNoSpace):
        fs.mkdir("/d")
    with pytest.raises(FsNoSpace):
        fs.symlink("x" * 100, "/slow")
    assert fs.statfs().free_inodes == inodes and not fs.exists("/d")
    fs.symlink("fast", "/fast")  # needs an inode but no block
    assert fs.readlink("/fast") == "fast"
    fs.flush()
    img = tmp_path / "full.img"
    img.write_bytes(dev.getvalue())
    e2fsck(img)


def test_running_out_of_inodes(tmp_path):
    img = sparse_image(tmp_path / "ino.img", 8 * MiB)
    with FileDevice(img) as dev:
        fs = Filesystem.mkfs(dev, nr_inodes=64)
        n = 0
        with pytest.raises(FsNoSpace, match="inode"):
            while True:
                fs.write_file(f"/i{n}", b"x")
                n += 1
        assert n == 64 - 11 and fs.statfs().free_inodes == 0
        fs.flush()
    e2fsck(img)


class FailingDevice(MemoryDevice):
    """A memory device whose data writes start failing (like a thin pool out of data space)."""

    fail = False

    def write(self, offset, data):
        if self.fail and len(data) >= 8192:
            raise NoSpace(kind="data", requested=1)
        super().write(offset, data)


def test_device_refusing_a_write_leaves_the_file_system_consistent(tmp_path):
    dev = FailingDevice(16 * MiB)
    fs = Filesystem.mkfs(dev)
    fs.write_file("/keep", b"k" * 100_000)
    free = fs.statfs().free_blocks
    with fs.open("/grow", "wb") as f:
        f.write(b"1" * 4096)
        dev.fail = True
        with pytest.raises(NoSpace):
            f.seek(60_000)
            f.write(b"2" * 200_000)
    dev.fail = False
    assert fs.read_file("/grow") == b"1" * 4096
    # the blocks the failed write had mapped are free again (one data block + the empty indirect block stay)
    assert fs.statfs().free_blocks == free - 2
    fs.flush()
    img = tmp_path / "after.img"
    img.write_bytes(dev.getvalue())
    e2fsck(img)
