"""Large files: a 300 MiB dense file (double indirect) and a sparse file with data past 4 GiB (triple indirect)."""

from __future__ import annotations

import hashlib
import os

import pytest
from fs_helpers import debugfs, debugfs_dump, dumpe2fs_header, e2fsck, sparse_image

from thinpool.fs import Filesystem
from thinpool.io.device import FileDevice

pytestmark = pytest.mark.external
MiB = 2**20
GiB = 2**30


def test_300_mib_dense_file_round_trips(tmp_path):
    image = sparse_image(tmp_path / "big.img", 400 * MiB)
    chunk = os.urandom(MiB)
    digest = hashlib.sha256()
    with FileDevice(image) as dev:
        fs = Filesystem.mkfs(dev)
        with fs.open("/dense.bin", "wb") as f:
            for i in range(300):
                piece = bytes([i % 251]) + chunk[1:]
                f.write(piece)
                digest.update(piece)
        fs.flush()
        st = fs.stat("/dense.bin")
        assert st.size == 300 * MiB
        # 76800 data blocks + 1 single + 1 double + 74 second-level indirect blocks
        assert st.blocks == (76800 + 1 + 1 + 74) * 8
        back = hashlib.sha256()
        with fs.open("/dense.bin", "rb") as f:
            while piece := f.read(8 * MiB):
                back.update(piece)
        assert back.digest() == digest.digest()
    e2fsck(image)
    assert "large_file" not in dumpe2fs_header(image)["Filesystem features"]
    out = tmp_path / "dense.out"
    debugfs_dump(image, "/dense.bin", out)
    assert hashlib.sha256(out.read_bytes()).digest() == digest.digest()
    out.unlink()
    with FileDevice(image) as dev:  # shrink it back into the direct blocks: every indirect block is freed
        fs = Filesystem.mount(dev)
        free0 = fs.statfs().free_blocks
        fs.truncate("/dense.bin", 10 * 4096 + 1)
        assert fs.statfs().free_blocks == free0 + 76800 + 76 - 11
        fs.flush()
    e2fsck(image)


def test_sparse_file_past_4_gib_sets_large_file_and_round_trips(tmp_path):
    image = sparse_image(tmp_path / "sparse.img", 64 * MiB)
    pieces = {0: b"head", 3 * GiB: os.urandom(10_000), 5 * GiB + 123: os.urandom(70_000),
              9 * GiB: b"tail-marker"}
    with FileDevice(image) as dev:
        fs = Filesystem.mkfs(dev)
        with fs.open("/sparse", "wb") as f:
            for off, data in pieces.items():
                f.seek(off)
                f.write(data)
        fs.flush()
        size = 9 * GiB + len(b"tail-marker")
        assert fs.stat("/sparse").size == size
        for off, data in pieces.items():
            with fs.open("/sparse", "rb") as f:
                f.seek(off)
                assert f.read(len(data)) == data
                f.seek(off - 4096 if off else 4096)
                assert f.read(100) == bytes(100)
    e2fsck(image)
    assert "large_file" in dumpe2fs_header(image)["Filesystem features"]
    assert f"Size: {size}" in debugfs(image, "stat /sparse")
    # every data byte, through debugfs' own block map (bmap), read straight from the image
    with open(image, "rb") as img:
        for off, data in pieces.items():
            got = b""
            for lblk in range(off // 4096, (off + len(data) - 1) // 4096 + 1):
                phys = int(debugfs(image, f"bmap /sparse {lblk}").strip())
                assert phys > 0
                img.seek(phys * 4096)
                got += img.read(4096)
            start = off % 4096
            assert got[start:start + len(data)] == data
    with FileDevice(image) as dev:  # reopen, punch everything past 4 GiB away again
        fs = Filesystem.mount(dev)
        fs.truncate("/sparse", 4 * GiB + 1)
        with fs.open("/sparse", "rb") as f:
            assert f.read(4) == b"head"
        fs.unlink("/sparse")
        assert fs.statfs().free_blocks == fs.statfs().nr_blocks - _used_after_mkfs(fs)
        fs.flush()
    e2fsck(image)


def _used_after_mkfs(fs: Filesystem) -> int:
    # (one group) mkfs uses: superblock, GDT, 2 bitmaps, the inode table, root's block and lost+found's 4
    s = fs.statfs()
    itb = (s.nr_inodes // s.nr_groups) * 128 // 4096
    return s.nr_groups * (4 + itb) + 1 + 4


A = 1024  # block pointers per 4 KiB indirect block
BOUNDARIES = [0, 11, 12, 12 + A - 1, 12 + A, 12 + A + A - 1, 12 + A + A, 12 + A + A * A - 1, 12 + A + A * A,
              12 + A + A * A + A * A + 5, 12 + A + A * A + 3 * A * A + 17]


def test_truncate_across_every_indirection_boundary(tmp_path):
    image = sparse_image(tmp_path / "t.img", 32 * MiB)
    with FileDevice(image) as dev:
        fs = Filesystem.mkfs(dev)
        free0 = fs.statfs().free_blocks
        with fs.open("/f", "wb") as f:
            for lb in BOUNDARIES:
                f.seek(lb * 4096)
                f.write(lb.to_bytes(8, "little") * 512)
        for cut in reversed(BOUNDARIES):
            for size in (cut * 4096 + 4096, cut * 4096 + 1, cut * 4096):
                fs.truncate("/f", size)
                with fs.open("/f", "rb") as f:
                    for lb in BOUNDARIES:
                        f.seek(lb * 4096)
                        got = f.read(4096)
                        if lb * 4096 + 4096 <= size:
                            assert got == lb.to_bytes(8, "little") * 512
                        else:
                            assert got == (lb.to_bytes(8, "little") * 512)[:max(0, size - lb * 4096)]
                fs.flush()
                e2fsck(image)
        assert fs.stat("/f").blocks == 0 and fs.statfs().free_blocks == free0
        # grow again through a hole: the old bytes must not come back
        fs.truncate("/f", 20 * MiB)
        with fs.open("/f", "rb") as f:
            assert not any(f.read())
        fs.flush()
    e2fsck(image)


def test_directory_with_indirect_blocks(tmp_path):
    image = sparse_image(tmp_path / "dir.img", 64 * MiB)
    names = [f"{i:05d}-" + "n" * 100 for i in range(3000)]  # ~80 directory blocks: single indirect
    with FileDevice(image) as dev:
        fs = Filesystem.mkfs(dev)
        fs.mkdir("/big")
        for n in names:
            fs.write_file(f"/big/{n}", n[:5].encode())
        for n in names[::2]:
            fs.unlink(f"/big/{n}")
        fs.flush()
        assert fs.stat("/big").size > 12 * 4096
    e2fsck(image)
    with FileDevice(image) as dev:
        fs = Filesystem.mount(dev)
        assert sorted(fs.listdir("/big")) == names[1::2]
        for n in names[::2][:500]:  # refill the freed slots
            fs.write_file(f"/big/{n}", b"again")
        fs.flush()
    e2fsck(image)


def test_large_file_feature_reaches_the_backup_superblocks(tmp_path):
    image = sparse_image(tmp_path / "groups.img", 300 * MiB)  # 3 block groups: backups in groups 1 (and 0)
    with FileDevice(image) as dev:
        fs = Filesystem.mkfs(dev)
        assert fs.statfs().nr_groups == 3
        with fs.open("/s", "wb") as f:
            f.seek(3 * GiB)
            f.write(b"x")
        fs.flush()
    e2fsck(image)
    from conftest import run_tool
    backup = run_tool("dumpe2fs", "-o", "superblock=32768", "-o", "blocksize=4096", "-h", str(image)).stdout
    assert "large_file" in backup and "sparse_super" in backup
    assert run_tool("e2fsck", "-fn", "-b", "32768", "-B", "4096", str(image), check=False).returncode == 0
