"""The by-inode-number calls (``inode_stat``, ``inode_blocks``, ``dir_entries_by_ino``, ``inode_table_blocks``) and
the geometry properties, each compared with what debugfs / dumpe2fs read from the same image."""

from __future__ import annotations

import errno
import os
import re
import stat as S

import pytest
from fs_helpers import debugfs, debugfs_ls, dumpe2fs_header, e2fsck, mkfs_ext2, sparse_image

from thinpool.errors import FileNotFound, FsError, NotADirectory
from thinpool.fs import Filesystem
from thinpool.io.device import FileDevice

pytestmark = pytest.mark.external
MiB = 2**20


def _populate(fs: Filesystem) -> None:
    fs.mkdir("/d/sub", parents=True)
    for i, n in enumerate([0, 1, 4096, 12 * 4096 + 1, 200_000, 5 * MiB]):
        fs.write_file(f"/d/f{i}", bytes([i + 1]) * n)
    with fs.open("/d/holey", "wb") as f:  # holes in the direct, single and double indirect ranges
        for off in (0, 7 * 4096 + 5, 300 * 4096, 2000 * 4096 - 3):
            f.seek(off)
            f.write(b"edge")
    fs.symlink("f1", "/d/fast")
    fs.symlink("/" + "long/" * 20 + "target", "/d/slow")
    fs.mknod("/d/null", S.S_IFCHR | 0o644, os.makedev(1, 3))
    fs.link("/d/f2", "/d/sub/hard")
    for i in range(40):
        fs.write_file(f"/d/sub/n{i:02d}", b"n")
    fs.write_file("/gone", b"freed later" * 1000)
    fs.unlink("/gone")


@pytest.fixture
def built(tmp_path):
    """A two-group image populated by thinpool, closed; returns (image, {ino of each path}, freed inode)."""
    img = sparse_image(tmp_path / "ino.img", 200 * MiB)
    with Filesystem.mkfs(FileDevice(img)) as fs:
        fs.write_file("/gone-probe", b"")
        freed = fs.lstat("/gone-probe").ino
        fs.unlink("/gone-probe")
        _populate(fs)
        inos = {p: fs.lstat(p).ino for p in ["/", "/d", "/d/sub"]}
        for top, dirs, files in fs.walk("/d"):
            for n in dirs + files:
                p = top.rstrip("/") + "/" + n
                inos[p] = fs.lstat(p).ino
    e2fsck(img)
    return img, inos, freed


_STAT_FIELDS = {"Links": r"Links:\s+(\d+)", "Size": r"Size:\s+(\d+)", "User": r"User:\s+(\d+)",
                "Group": r"Group:\s+(\d+)", "Blockcount": r"Blockcount:\s+(\d+)", "Mode": r"Mode:\s+(\d+)"}


def _debugfs_stat(img, ino: int) -> dict[str, int]:
    out = debugfs(img, f"stat <{ino}>")
    got = {k: int(re.search(rx, out).group(1), 8 if k == "Mode" else 10) for k, rx in _STAT_FIELDS.items()}
    got["Type"] = out.split("Type:")[1].split()[0]
    return got


def _debugfs_data_blocks(img, ino: int) -> list[int]:
    """The data blocks in logical order from the ``BLOCKS:`` section of ``debugfs stat`` (indirect blocks out)."""
    out = debugfs(img, f"stat <{ino}>")
    if "BLOCKS:" not in out:
        return []
    text = out.split("BLOCKS:", 1)[1].split("TOTAL:")[0]
    blocks: list[int] = []
    for m in re.finditer(r"\((\d+)(?:-(\d+))?\):(\d+)(?:-(\d+))?", text):
        first, last = int(m.group(3)), int(m.group(4) or m.group(3))
        blocks.extend(range(first, last + 1))
    return blocks


_TYPES = {S.S_IFREG: "regular", S.S_IFDIR: "directory", S.S_IFLNK: "symlink", S.S_IFCHR: "character"}


def test_inode_stat_matches_debugfs(built):
    img, inos, freed = built
    with Filesystem.mount(FileDevice(img, readonly=True), readonly=True) as fs:
        for path, ino in inos.items():
            st = fs.inode_stat(ino)
            assert st is not None and st == fs.lstat(path), path
            d = _debugfs_stat(img, ino)
            assert (d["Links"], d["Size"], d["User"], d["Group"], d["Blockcount"]) == \
                (st.nlink, st.size, st.uid, st.gid, st.blocks), path
            assert d["Mode"] == S.S_IMODE(st.mode) and d["Type"] == _TYPES[S.S_IFMT(st.mode)], path
        assert fs.inode_stat(freed) is None and _debugfs_stat(img, freed)["Links"] == 0
        never = fs.statfs().nr_inodes  # the last slot was never used: mode 0
        assert fs.inode_stat(never) is None and _debugfs_stat(img, never)["Mode"] == 0
        for bad in (0, never + 1):
            with pytest.raises(FsError) as ei:
                fs.inode_stat(bad)
            assert ei.value.errno == errno.EINVAL


def test_inode_blocks_match_debugfs(built):
    img, inos, freed = built
    with Filesystem.mount(FileDevice(img, readonly=True), readonly=True) as fs:
        seen_indirect = 0
        for path, ino in inos.items():
            mine = fs.inode_blocks(ino)
            assert mine == _debugfs_data_blocks(img, ino), path
            every = [int(b) for b in debugfs(img, f"blocks <{ino}>").split()]
            st = fs.lstat(path)
            if S.S_ISLNK(st.mode) and st.blocks == 0 or S.S_ISCHR(st.mode):
                assert mine == [], path  # debugfs prints i_block's raw words for these
                continue
            # debugfs also lists indirect blocks, each right before the blocks it maps
            assert [b for b in every if b in set(mine)] == mine, path
            assert len(every) * (fs.block_size // 512) == st.blocks, path
            seen_indirect += len(every) - len(mine)
        assert seen_indirect >= 4  # f3, f4, f5 (single + double) and holey have indirect blocks
        holey = fs.inode_blocks(inos["/d/holey"])
        assert len(holey) == 5 and fs.lstat("/d/holey").size > 1999 * 4096  # holes out; last write spans 2
        assert fs.inode_blocks(freed) == []
        assert fs.inode_blocks(inos["/d/f0"]) == []


def test_dir_entries_by_ino_match_debugfs(built):
    img, inos, _ = built
    with Filesystem.mount(FileDevice(img, readonly=True), readonly=True) as fs:
        for path in ["/", "/d", "/d/sub"]:
            got = fs.dir_entries_by_ino(inos[path])
            assert got == [(e.name, e.ino) for e in fs.scandir(path)]
            assert {n: i for n, i in got} == {n: v[0] for n, v in debugfs_ls(img, f"<{inos[path]}>").items()}
        assert ("hard", inos["/d/f2"]) in fs.dir_entries_by_ino(inos["/d/sub"])
        with pytest.raises(NotADirectory):
            fs.dir_entries_by_ino(inos["/d/f1"])
        with pytest.raises(FileNotFound):
            fs.dir_entries_by_ino(fs.statfs().nr_inodes)


def test_inode_table_blocks_and_geometry_match_debugfs(built):
    img, _, _ = built
    stats = debugfs(img, "stats")
    tables = [int(t) for t in re.findall(r"inode table at (\d+)", stats)]
    per_group = int(re.search(r"Inode blocks per group:\s+(\d+)", stats).group(1))
    ipg = int(re.search(r"Inodes per group:\s+(\d+)", stats).group(1))
    assert len(tables) == 2
    with Filesystem.mount(FileDevice(img, readonly=True), readonly=True) as fs:
        assert fs.inode_table_blocks() == [(t, per_group, g * ipg + 1) for g, t in enumerate(tables)]
        assert (fs.block_size, fs.inode_size, fs.first_ino) == \
            (int(re.search(r"Block size:\s+(\d+)", stats).group(1)),
             int(re.search(r"Inode size:\s+(\d+)", stats).group(1)),
             int(re.search(r"First inode:\s+(\d+)", stats).group(1)))
        assert fs.uuid == re.search(r"Filesystem UUID:\s+(\S+)", stats).group(1)
        for name in ("block_size", "inode_size", "first_ino", "uuid"):
            with pytest.raises(AttributeError):
                setattr(fs, name, 1)


def test_geometry_of_a_mkfs_ext2_image(tmp_path):
    """An image made by mkfs.ext2 with 256-byte inodes: the properties and tables follow its superblock."""
    img = sparse_image(tmp_path / "mk.img", 160 * MiB)
    mkfs_ext2(img, "-I", "256")
    hdr = dumpe2fs_header(img)
    stats = debugfs(img, "stats")
    tables = [int(t) for t in re.findall(r"inode table at (\d+)", stats)]
    with Filesystem.mount(FileDevice(img)) as fs:
        assert (fs.block_size, fs.inode_size, fs.first_ino) == \
            (int(hdr["Block size"]), int(hdr["Inode size"]), int(hdr["First inode"]))
        assert fs.uuid == hdr["Filesystem UUID"]
        assert [t for t, _, _ in fs.inode_table_blocks()] == tables
        assert all(n == int(hdr["Inode blocks per group"]) for _, n, _ in fs.inode_table_blocks())
        fs.write_file("/x", b"y" * 70_000)
        ino = fs.lstat("/x").ino
        assert fs.dir_entries_by_ino(2) == [(e.name, e.ino) for e in fs.scandir("/")]
    assert Filesystem.mount(FileDevice(img, readonly=True), readonly=True).inode_blocks(ino) == \
        _debugfs_data_blocks(img, ino)
    e2fsck(img)
