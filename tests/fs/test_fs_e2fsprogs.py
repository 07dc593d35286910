"""What thinpool writes, checked by the real e2fsprogs; what mkfs.ext2 writes, read and changed by thinpool."""

from __future__ import annotations

import os
import random
import re
import stat as statmod

import pytest
from fs_helpers import debugfs, debugfs_cat, debugfs_dump, debugfs_ls, dumpe2fs_header, e2fsck, mkfs_ext2, sparse_image

from thinpool.fs import Filesystem
from thinpool.io.device import FileDevice

pytestmark = pytest.mark.external
MiB = 2**20


@pytest.fixture
def image(tmp_path):
    return sparse_image(tmp_path / "fs.img", 64 * MiB)


def _populate(fs: Filesystem, rng: random.Random) -> dict[str, bytes]:
    """A tree exercising every kind of object; returns {path: content} of the regular files."""
    files: dict[str, bytes] = {}
    fs.mkdir("/docs/deep/er/still", parents=True)
    fs.mkdir("/empty")
    sizes = [0, 1, 4095, 4096, 4097, 12 * 4096, 12 * 4096 + 1, 200_000, 5 * MiB]
    for i, n in enumerate(sizes):
        p = f"/docs/f{i}-{n}.bin"
        files[p] = rng.randbytes(n)
        fs.write_file(p, files[p])
    with fs.open("/docs/deep/holey", "wb") as f:  # holes in direct, single and double indirect ranges
        for off in (0, 7 * 4096 + 5, 300 * 4096, 2000 * 4096 - 3):
            f.seek(off)
            f.write(b"hole-edge")
    files["/docs/deep/holey"] = fs.read_file("/docs/deep/holey")
    fs.write_file("/docs/deep/er/still/name with spaces & ünïcode", b"odd name")
    files["/docs/deep/er/still/name with spaces & ünïcode"] = b"odd name"
    fs.symlink("../f1-1.bin", "/docs/deep/fastlink")
    fs.symlink("/" + "long/" * 20 + "target", "/slowlink")
    fs.link("/docs/f2-4095.bin", "/hardlink")
    files["/hardlink"] = files["/docs/f2-4095.bin"]
    fs.write_file("/gone", b"removed later")
    fs.unlink("/gone")
    fs.mkdir("/moved-from")
    fs.write_file("/moved-from/x", b"moving")
    fs.rename("/moved-from", "/empty/moved-to")
    files["/empty/moved-to/x"] = b"moving"
    fs.chmod("/docs/f1-1.bin", 0o600)
    fs.chown("/docs/f1-1.bin", 1000, 1000)
    fs.truncate("/docs/f8-5242880.bin", 3 * MiB + 17)
    files["/docs/f8-5242880.bin"] = files["/docs/f8-5242880.bin"][:3 * MiB + 17]
    return files


def test_tree_written_by_thinpool_is_clean_and_readable_by_debugfs(image, tmp_path):
    with FileDevice(image) as dev:
        fs = Filesystem.mkfs(dev)
        files = _populate(fs, random.Random(1))
        fs.flush()
        listing = {d: {e.name: e for e in fs.scandir(d)} for d, _, _ in fs.walk("/")}
        stats = {d: {n: fs.lstat(d.rstrip("/") + "/" + n) for n in names} for d, names in listing.items()}
    e2fsck(image)
    for path, content in files.items():
        assert debugfs_cat(image, path) == content, path
    for d, names in listing.items():
        ls = debugfs_ls(image, d)
        assert sorted(ls) == sorted(names), d
        for n, (ino, mode, size) in ls.items():
            st = stats[d][n]
            assert (ino, mode, size) == (st.ino, st.mode, st.size), (d, n)
    assert debugfs_cat(image, "/slowlink") == ("/" + "long/" * 20 + "target").encode()


def test_debugfs_dump_returns_every_byte(image, tmp_path):
    data = os.urandom(9 * MiB + 123)
    with FileDevice(image) as dev:
        fs = Filesystem.mkfs(dev)
        fs.write_file("/blob", data)
        fs.flush()
    e2fsck(image)
    assert debugfs_dump(image, "/blob", tmp_path / "out") == data


def test_symlinks_as_debugfs_sees_them(image):
    with FileDevice(image) as dev:
        fs = Filesystem.mkfs(dev)
        fs.symlink("short/target", "/fast")
        fs.symlink("x" * 59, "/fast59")
        fs.symlink("y" * 60, "/slow60")
        fs.flush()
    e2fsck(image)
    assert 'Fast link dest: "short/target"' in debugfs(image, "stat /fast")
    assert "Fast link dest" in debugfs(image, "stat /fast59")
    assert "Fast link dest" not in debugfs(image, "stat /slow60")
    assert debugfs_cat(image, "/slow60") == b"y" * 60


@pytest.mark.parametrize("size_mib", [8, 64, 300, 1100])
def test_mkfs_layout_matches_mkfs_ext2(tmp_path, size_mib):
    ours = sparse_image(tmp_path / "ours.img", size_mib * MiB)
    theirs = sparse_image(tmp_path / "theirs.img", size_mib * MiB)
    with FileDevice(ours) as dev:
        fs = Filesystem.mkfs(dev)
        nr_groups = fs.statfs().nr_groups
    feats = "none,filetype" + (",sparse_super" if nr_groups > 1 else "")
    from conftest import run_tool
    run_tool("mkfs.ext2", "-q", "-F", "-b", "4096", "-O", feats, "-I", "128", "-m", "0", str(theirs))
    e2fsck(ours)
    a, b = dumpe2fs_header(ours), dumpe2fs_header(theirs)
    for key in ("Filesystem revision #", "Filesystem features", "Inode count", "Block count", "Free blocks",
                "Free inodes", "First block", "Block size", "Blocks per group", "Inodes per group",
                "Inode blocks per group", "First inode", "Inode size", "Reserved block count"):
        assert a[key] == b[key], key

    def groups(img):
        from conftest import run_tool as rt
        out = rt("dumpe2fs", str(img), check=False).stdout
        return re.findall(r"(Primary superblock at \d+|Backup superblock at \d+|Block bitmap at \d+|"
                          r"Inode bitmap at \d+|Inode table at \d+-\d+)", out)

    assert groups(ours) == groups(theirs)


def _make_source_tree(root, rng: random.Random) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    for i, n in enumerate([0, 1, 100, 4096, 49153, 300_000, 4 * MiB + 5]):
        (root / ("sub" if i % 2 else "") / f"file{i}").write_bytes(rng.randbytes(n))
    (root / "sub" / "deeper" / "note.txt").write_bytes(b"hello from the host\n")
    for i in range(150):
        (root / "sub" / "deeper" / f"many-{i:03d}").write_bytes(str(i).encode() * i)
    os.symlink("sub/deeper/note.txt", root / "link-fast")
    os.symlink("/" + "p" * 100, root / "link-slow")
    os.chmod(root / "file0", 0o640)


def _host_tree(root) -> dict[str, tuple[str, bytes | str]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = "/" + os.path.relpath(dirpath, root).replace(".", "", 1) if dirpath != str(root) else "/"
        rel = "/" + os.path.relpath(dirpath, root) if dirpath != str(root) else ""
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if os.path.islink(p):
                out[f"{rel}/{d}"] = ("link", os.readlink(p))
            else:
                out[f"{rel}/{d}"] = ("dir", "")
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                out[f"{rel}/{f}"] = ("link", os.readlink(p))
            else:
                out[f"{rel}/{f}"] = ("file", open(p, "rb").read())
    return out


def _fs_tree(fs: Filesystem) -> dict[str, tuple[str, bytes | str]]:
    out = {}
    for dirpath, dirnames, filenames in fs.walk("/"):
        base = dirpath.rstrip("/")
        for d in dirnames:
            if base + "/" + d != "/lost+found":
                out[f"{base}/{d}"] = ("dir", "")
        for f in filenames:
            p = f"{base}/{f}"
            st = fs.lstat(p)
            out[p] = ("link", fs.readlink(p)) if st.is_symlink else ("file", fs.read_file(p))
    return out


@pytest.mark.parametrize("size_mib", [48, 160])
def test_image_made_by_mkfs_ext2_d_reads_back_and_stays_clean(tmp_path, size_mib):
    src = tmp_path / "src"
    src.mkdir()
    _make_source_tree(src, random.Random(size_mib))
    image = sparse_image(tmp_path / "ext2.img", size_mib * MiB)
    extra = ["-O", "none,filetype,sparse_super"] if size_mib > 128 else []
    mkfs_ext2(image, *extra, "-d", str(src))
    e2fsck(image)
    expected = _host_tree(src)
    with FileDevice(image) as dev:
        fs = Filesystem.mount(dev)
        assert _fs_tree(fs) == expected
        assert statmod.S_IMODE(fs.stat("/file0").mode) == 0o640
        # change it: add, overwrite, grow into indirect blocks, remove, rename, fill a directory
        fs.write_file("/sub/deeper/note.txt", b"rewritten")
        fs.unlink("/sub/file1")
        fs.rename("/sub/deeper", "/deeper-moved")
        with fs.open("/file6", "r+b") as f:
            f.seek(6 * MiB)
            f.write(b"grown")
        fs.mkdir("/new/dir", parents=True)
        for i in range(300):
            fs.write_file(f"/new/dir/n{i}", bytes([i % 256]) * (i * 37))
        fs.rmdir("/empty-dir")
        fs.symlink("deeper-moved/note.txt", "/newlink")
        fs.flush()
    e2fsck(image)
    assert debugfs_cat(image, "/deeper-moved/note.txt") == b"rewritten"
    assert debugfs_cat(image, "/new/dir/n299") == bytes([299 % 256]) * (299 * 37)
    grown = debugfs_cat(image, "/file6")
    assert grown[:4 * MiB + 5] == (src / "file6").read_bytes() and grown[6 * MiB:] == b"grown"
    assert set(debugfs_ls(image, "/new/dir")) == {f"n{i}" for i in range(300)}
    with FileDevice(image) as dev:
        fs = Filesystem.mount(dev)
        assert fs.read_file("/deeper-moved/many-149") == b"149" * 149
        assert not fs.exists("/sub/file1") and not fs.exists("/empty-dir")


def test_mkfs_ext2_image_with_lost_and_found_full_of_free_slots(tmp_path):
    image = sparse_image(tmp_path / "e.img", 16 * MiB)
    mkfs_ext2(image)
    with FileDevice(image) as dev:
        fs = Filesystem.mount(dev)
        assert fs.listdir("/") == ["lost+found"]
        for i in range(200):
            fs.write_file(f"/lost+found/#{i}", b"x")
        for i in range(0, 200, 2):
            fs.unlink(f"/lost+found/#{i}")
        fs.flush()
    e2fsck(image)


def test_default_mkfs_ext2_image_with_htree_directories_and_256_byte_inodes(tmp_path):
    """Not the target layout, but a common one: ext_attr, resize_inode, dir_index (htree) and 256-byte inodes."""
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    for i in range(400):
        (src / "big" / f"file-with-a-long-name-{i}").write_bytes(b"file %d" % i)
    image = sparse_image(tmp_path / "default.img", 64 * MiB)
    from conftest import run_tool
    run_tool("mkfs.ext2", "-q", "-F", "-d", str(src), str(image))
    run_tool("e2fsck", "-fyD", str(image), check=False)  # -D builds htree indexes for the big directory
    assert "Flags: 0x1000" in debugfs(image, "stat /big")
    with FileDevice(image) as dev:
        fs = Filesystem.mount(dev)
        assert len(fs.listdir("/big")) == 400 and fs.read_file("/big/file-with-a-long-name-7") == b"file 7"
        for i in range(200):
            fs.write_file(f"/big/new-{i}", b"x" * i)
        for i in range(100):
            fs.unlink(f"/big/file-with-a-long-name-{i}")
        fs.mkdir("/newdir")
        fs.write_file("/newdir/f", b"1" * 100_000)
        fs.flush()
    e2fsck(image)
    assert len(debugfs_ls(image, "/big")) == 500


@pytest.mark.parametrize("opts", [
    ["-r", "0", "-b", "4096", "-m", "0"],  # revision 0: no features, 16-bit name_len, fixed 128-byte inodes
    ["-b", "1024", "-O", "none,filetype,sparse_super", "-I", "128", "-m", "0"],  # 1 KiB blocks, 8 groups
    ["-b", "2048", "-O", "none", "-I", "128"],  # no filetype feature
], ids=["rev0", "1k-blocks", "no-filetype"])
def test_other_layouts_mkfs_ext2_makes(tmp_path, opts):
    image = sparse_image(tmp_path / "o.img", 64 * MiB)
    from conftest import run_tool
    run_tool("mkfs.ext2", "-q", "-F", *opts, str(image))
    data = os.urandom(3_000_000)
    with FileDevice(image) as dev:
        fs = Filesystem.mount(dev)
        fs.mkdir("/d")
        fs.write_file("/d/f", data)
        fs.symlink("d/f", "/fast")
        fs.symlink("/" + "x" * 100, "/slow")
        for i in range(300):
            fs.write_file(f"/d/n{i}", b"%d" % i)
        with fs.open("/sparse", "wb") as f:  # past 2 GiB: large_file (and revision 1 for a rev 0 image)
            f.seek(2_200_000_000)
            f.write(b"far")
        fs.flush()
    e2fsck(image)
    assert debugfs_cat(image, "/d/f") == data
    assert debugfs_cat(image, "/d/n299") == b"299"
    assert "large_file" in dumpe2fs_header(image)["Filesystem features"]
    assert len(debugfs_ls(image, "/d")) == 301
