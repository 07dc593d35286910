"""A put on a pool that runs out of data space at every possible point changes nothing.

Two cases: the container case of the devicemapper driver (the file system lives on a snapshot, so its first writes
copy shared chunks) and a plain thin device whose inode table is only partly provisioned (mkfs leaves it
unallocated), where write-back overwrites some metadata blocks in place before it reaches one that needs a new
chunk. The pool is filled up to ``k`` free chunks, for k = 0, 1, 2, ... until the put fits: each failed attempt must
raise NoDataSpace and leave the file system exactly as it was (same tree, same bytes, ``e2fsck -fn`` clean); the
first attempt that fits must leave the new tree.
"""

from __future__ import annotations

import os
import shutil

import pytest
from fs_helpers import e2fsck

from thinpool.errors import NoDataSpace
from thinpool.fs import Filesystem, host

MiB = 2**20
CHUNK = 64 * 1024


def _tree(fs: Filesystem) -> dict[str, object]:
    out: dict[str, object] = {}
    for root, dirs, files in fs.walk("/"):
        for name in dirs + files:
            p = root.rstrip("/") + "/" + name
            st = fs.lstat(p)
            value: object = fs.readlink(p) if st.is_symlink else fs.read_file(p) if st.is_file else None
            out[p] = (st.mode, st.uid, st.size, st.nlink, value)
    return out


def _image(pool, dev_id: int, path):
    dev = pool.device(dev_id)
    with open(path, "wb") as f:
        f.truncate(dev.size)
        for off, n in dev.mapped_ranges():
            f.seek(off)
            f.write(dev.read(off, n))
    return path


@pytest.mark.parametrize(("on_snapshot", "only_dirs"), [(True, False), (False, False), (False, True)],
                         ids=["snapshot", "origin", "origin-only-directories"])
def test_a_put_on_a_full_pool_changes_nothing(tmp_path, on_snapshot, only_dirs):
    from thinpool.pool import Pool

    v1 = tmp_path / "v1"
    (v1 / "etc").mkdir(parents=True)
    for i in range(40):
        (v1 / "etc" / f"conf{i}").write_bytes(os.urandom(3000 + 100 * i))
    (v1 / "big").write_bytes(os.urandom(300_000))
    v2 = tmp_path / "v2"
    (v2 / "etc").mkdir(parents=True)
    for i in range(40):
        (v2 / "etc" / f"conf{i}").write_bytes(os.urandom(5000))
    (v2 / "big").write_bytes(os.urandom(500_000))
    os.symlink("big", v2 / "link")
    for d in range(10):
        (v2 / "new" / f"d{d}").mkdir(parents=True)
    for i in range(600):  # past the inode-table chunk v1 provisioned
        (v2 / "new" / f"d{i % 10}" / f"f{i}").write_bytes(b"%d" % i)
    if only_dirs:  # no file data: every new directory block needs a chunk only write-back provisions
        shutil.rmtree(v2)
        for d in range(300):
            (v2 / "dirs" / f"d{d:03d}").mkdir(parents=True)
    dev_id = 2 if on_snapshot else 1

    pool_dir = tmp_path / "pool"
    with Pool.create(pool_dir, data_size=64 * MiB, chunk_size=CHUNK) as pool:
        pool.create_thin(1, 16 * MiB, name="image")
        fs = Filesystem.mkfs(pool.device(1))
        host.put(fs, str(v1), "/rootfs")
        fs.close()
        if on_snapshot:
            pool.create_snap(2, 1, name="container")
        pool.create_thin(3, 64 * MiB, name="filler")
        filler = pool.device(3)
        st = pool.status()
        nr_free = st.total_data_blocks - st.used_data_blocks
        for c in range(nr_free):  # leave no free chunk
            filler.write(c * CHUNK, b"\1" * CHUNK)
        pool.commit()
        before = _tree(Filesystem.mount(pool.device(dev_id), readonly=True))
    attempts = 0
    for k in range(200):
        with Pool.open(pool_dir) as pool:
            st = pool.status()
            assert st.total_data_blocks - st.used_data_blocks == k
            try:
                fs = Filesystem.mount(pool.device(dev_id))
                host.put(fs, str(v2), "/rootfs")
                fs.flush()
            except NoDataSpace:
                pool.abort()
                failed = True
            else:
                failed = False
        attempts += 1
        with Pool.open(pool_dir, readonly=True) as pool:
            after = _tree(Filesystem.mount(pool.device(dev_id), readonly=True))
            e2fsck(_image(pool, dev_id, tmp_path / "fs.img"))
            if on_snapshot:
                e2fsck(_image(pool, 1, tmp_path / "image.img"))
        if failed:
            assert after == before, f"a failed put with {k} free chunk(s) changed the file system"
            with Pool.open(pool_dir) as pool:  # one more free chunk for the next attempt
                pool.device(3).discard(k * CHUNK, CHUNK)
            continue
        assert after == {**before, **after} and ("/rootfs/dirs/d299" in after if only_dirs else
                                                 after["/rootfs/big"][4] == (v2 / "big").read_bytes())
        break
    else:
        raise AssertionError("the put never fitted")
    assert attempts > 3  # the enumeration really crossed several failure points
