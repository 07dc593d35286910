"""Review: the ext2 layer over a thin device whose chunks a snapshot shares: the filesystem's 4 KiB block writes
break sharing with deferred copies (thin.py). Files rewritten on the origin read back, the snapshot's
filesystem keeps the old files, and both devices, exported to images, pass the real e2fsck and read the same
through debugfs. (The filesystem writes back mostly multi-block runs, which cross chunk boundaries and copy
at once; only a write inside one chunk defers its copy.)"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fs"))
from fs_helpers import debugfs_cat, e2fsck  # noqa: E402

from thinpool.fs.filesystem import Filesystem  # noqa: E402
from thinpool.pool import Pool  # noqa: E402

pytestmark = pytest.mark.external
CH = 64 << 10
SIZE = 32 << 20


class Watched:
    """The thin device, recording the most copies left pending after any write the filesystem made."""

    def __init__(self, dev) -> None:
        self.dev = dev
        self.most_pending = 0
        self.sizes = []

    def __getattr__(self, name):
        return getattr(self.dev, name)

    def write(self, offset, data) -> None:
        self.sizes.append((offset % CH, len(data)))
        self.dev.write(offset, data)
        self.most_pending = max(self.most_pending, len(self.dev.pool.md.pending_copies(self.dev.dev_id)))


def _export(pool: Pool, dev_id: int, path: Path) -> Path:
    with open(path, "wb") as f:
        f.write(pool.device(dev_id).read(0, SIZE))
    return path


def test_ext2_over_pending_copies(tmp_path: Path) -> None:
    p = Pool.create(tmp_path / "pool", data_size=4 * SIZE, chunk_size=CH)
    p.create_thin(1, SIZE)
    fs = Filesystem.mkfs(p.device(1))
    rng = random.Random(3)
    old = {f"/f{i}": rng.randbytes(rng.choice([100, 5000, 70_000, 300_000])) for i in range(12)}
    for name, data in old.items():
        fs.write_file(name, data)
    fs.close()
    p.create_snap(2, 1)
    watched = Watched(p.device(1))
    fs = Filesystem.mount(watched)
    new = dict(old)
    for name in list(old)[::2]:  # rewrite every other file (same size: in place, block by block)
        new[name] = rng.randbytes(len(old[name]))
        fs.write_file(name, new[name])
    fs.write_file("/added", b"n" * 9000)
    new["/added"] = b"n" * 9000
    # the filesystem's writes broke sharing: sector-aligned ones inside one chunk deferred, the rest copied
    assert watched.sizes and p.stats["cow_copies"] + watched.most_pending > 0
    fs.flush()
    assert not p.md.pending_devices()
    for name, data in new.items():
        assert fs.read_file(name) == data
    fs.close()
    snapfs = Filesystem.mount(p.device(2), readonly=True)
    for name, data in old.items():
        assert snapfs.read_file(name) == data
    snapfs.close()
    a, b = _export(p, 1, tmp_path / "origin.img"), _export(p, 2, tmp_path / "snap.img")
    e2fsck(a)
    e2fsck(b)
    for name in list(new)[:4] + ["/added"]:
        assert debugfs_cat(a, name) == new[name]
    for name in list(old)[:4]:
        assert debugfs_cat(b, name) == old[name]
    p.close()
