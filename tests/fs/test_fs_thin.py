"""ext2 on thin devices: snapshot semantics, e2fsck on both devices, and copy-on-write limited to touched chunks."""

from __future__ import annotations

import os
import random

import pytest
from fs_helpers import e2fsck

from thinpool.fs import Filesystem
from thinpool.pool import Pool

pytestmark = pytest.mark.external
MiB = 2**20
CHUNK = 64 * 1024


class RecordingDevice:
    """Passes every call to a device and remembers which chunks were written, zeroed or discarded."""

    def __init__(self, dev) -> None:
        self.dev = dev
        self.touched: set[int] = set()

    @property
    def size(self) -> int:
        return self.dev.size

    def _note(self, offset: int, length: int) -> None:
        if length:
            self.touched.update(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))

    def read(self, offset, length):
        return self.dev.read(offset, length)

    def write(self, offset, data):
        self._note(offset, len(data))
        self.dev.write(offset, data)

    def discard(self, offset, length):
        self._note(offset, length)
        self.dev.discard(offset, length)

    def write_zeroes(self, offset, length):
        self._note(offset, length)
        self.dev.write_zeroes(offset, length)

    def flush(self):
        self.dev.flush()

    def mapped_ranges(self, offset=0, length=None):
        return self.dev.mapped_ranges(offset, length)


def _export(dev, path) -> None:
    """Copy a device's mapped ranges into a sparse image file (for e2fsck / debugfs)."""
    with open(path, "wb") as f:
        f.truncate(dev.size)
        for off, n in dev.mapped_ranges():
            f.seek(off)
            f.write(dev.read(off, n))


def _mapping(pool: Pool, dev_id: int) -> dict[int, int]:
    thin, data, _ = pool.md.mappings(dev_id)
    return dict(zip(thin.tolist(), data.tolist()))


def _tree(fs: Filesystem) -> dict[str, bytes]:
    out = {}
    for d, _, files in fs.walk("/"):
        for f in files:
            p = d.rstrip("/") + "/" + f
            out[p] = fs.read_file(p)
    return out


def test_snapshot_keeps_old_tree_and_only_touched_chunks_are_copied(tmp_path):
    rng = random.Random(5)
    with Pool.create(tmp_path / "pool", data_size=256 * MiB, chunk_size=CHUNK) as pool:
        pool.create_thin(1, 128 * MiB)
        fs = Filesystem.mkfs(pool.device(1))
        for d in range(4):
            fs.mkdir(f"/d{d}")
            for i in range(10):
                fs.write_file(f"/d{d}/f{i}", rng.randbytes(rng.randrange(1, 300_000)))
        fs.flush()  # commits the pool
        old_tree = _tree(fs)
        before = _mapping(pool, 1)

        pool.create_snap(2, 1)
        rec = RecordingDevice(pool.device(1))
        fs1 = Filesystem.mount(rec)
        with fs1.open("/d1/f3", "r+b") as f:
            f.seek(1000)
            f.write(b"changed after the snapshot")
        fs1.write_file("/d2/new", b"new file on the origin")
        fs1.unlink("/d0/f0")
        fs1.flush()
        new_tree = _tree(fs1)
        assert new_tree != old_tree

        assert _tree(Filesystem.mount(pool.device(2), readonly=True)) == old_tree
        assert _mapping(pool, 2) == before  # the snapshot's block map is untouched

        after = _mapping(pool, 1)
        remapped = {c for c in before if after.get(c) != before[c]}
        assert remapped, "writes to shared chunks must break sharing"
        assert remapped <= rec.touched  # nothing the file system did not write was copied
        assert {c for c in rec.touched if c in before} == remapped  # and every shared chunk written was copied
        assert len(remapped) < len(before) // 4
        for i in (1, 2):
            img = tmp_path / f"thin{i}.img"
            _export(pool.device(i), img)
            e2fsck(img)
        assert _tree(Filesystem.mount(pool.device(1))) == new_tree


def test_mkfs_on_a_thin_device_provisions_only_metadata_chunks(tmp_path):
    with Pool.create(tmp_path / "pool", data_size=64 * MiB, chunk_size=CHUNK) as pool:
        pool.create_thin(1, 2 * 2**30)  # 2 GiB virtual over a 64 MiB pool: inode tables are not written
        fs = Filesystem.mkfs(pool.device(1))
        s = fs.statfs()
        assert s.nr_groups == 16
        mapped = sum(n for _, n in pool.device(1).mapped_ranges())
        # per group at most the chunk holding its bitmaps (+ the one with a superblock copy), plus the root dirs
        assert mapped <= (2 * s.nr_groups + 4) * CHUNK
        fs.write_file("/hello", b"world")
        fs.flush()
        assert Filesystem.mount(pool.device(1)).read_file("/hello") == b"world"
        img = tmp_path / "thin.img"
        _export(pool.device(1), img)
        e2fsck(img)


def test_trim_gives_deleted_files_chunks_back_to_the_pool(tmp_path):
    from fs_helpers import export_thin

    with Pool.create(tmp_path / "pool", data_size=128 * 2**20, chunk_size=64 * 1024) as pool:
        pool.create_thin(1, 64 * 2**20)
        fs = Filesystem.mkfs(pool.device(1))
        base = pool.status().used_data_blocks
        keep = os.urandom(100_000)
        fs.write_file("/keep", keep)
        fs.write_file("/big", os.urandom(20 * 2**20))
        fs.flush()
        full = pool.status().used_data_blocks
        fs.unlink("/big")
        assert pool.status().used_data_blocks == full  # deleting frees ext2 blocks, not pool chunks
        trimmed = fs.trim()
        used = pool.status().used_data_blocks
        assert trimmed >= 20 * 2**20 and used <= base + 3 < full
        assert fs.trim() < 64 * 1024 * 4 and pool.status().used_data_blocks == used  # only partial chunks remain
        assert fs.read_file("/keep") == keep
        fs.close()
    e2fsck(export_thin(tmp_path / "pool", 1, tmp_path / "t.img"))
