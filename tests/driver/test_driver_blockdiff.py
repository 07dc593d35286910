"""``container diff --blocks`` agrees with the naive diff on content changes, and differs exactly where it should."""

from __future__ import annotations

import os
from pathlib import Path

from click.testing import CliRunner
from driver_helpers import oci_layout, tar_bytes

from thinpool.driver import DeviceSet, Driver
from thinpool.driver.store import mounted
from thinpool.pool import Pool
from thinpool_cli.main import cli


def ok(*args: object, pool: Path) -> str:
    r = CliRunner().invoke(cli, [str(a) for a in args], env={"THINPOOL_POOL": str(pool)}, catch_exceptions=False)
    assert r.exit_code == 0, f"exit {r.exit_code}: {r.stdout} {r.stderr}"
    return r.stdout


def test_block_diff_agrees_with_naive_diff_on_content(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    ok("pool", "create", pool, "--size", "256M", pool=pool)
    ok("driver", "init", "--base-size", "64M", pool=pool)
    big = os.urandom(300_000)
    layer = tar_bytes([("d", "etc"), ("f", "etc/conf", b"a=1\n"), ("d", "data"), ("f", "data/big", big),
                       ("f", "data/same", b"x" * 5000, 0o644, 1_500_000_000), ("d", "meta"),
                       ("f", "meta/f", b"meta"), ("d", "gone"), ("f", "gone/f", b"g"), ("f", "top", b"t")])
    ok("image", "load", oci_layout(tmp_path / "img", [layer]), pool=pool)
    ok("container", "create", "img", "--name", "web", pool=pool)
    with Pool.open(pool) as p:
        ds = DeviceSet.open(p)
        with mounted(ds, "web", write=True) as fs:
            fs.write_at("/rootfs/data/big", 200_000, b"patched in place")       # content, same size
            fs.write_file("/rootfs/etc/conf", b"a=2, longer\n")                 # content and size
            fs.mkdir("/rootfs/new")                                             # a new tree
            fs.write_file("/rootfs/new/f", b"new")
            fs.unlink("/rootfs/gone/f")                                         # a deletion
            fs.write_at("/rootfs/data/same", 0, b"y" * 5000)                    # same size, mtime put back
            fs.utime("/rootfs/data/same", (1_500_000_000, 1_500_000_000))
            fs.chmod("/rootfs/meta/f", 0o600)                                   # metadata only
    naive = ok("container", "diff", "web", pool=pool).splitlines()
    blocks = ok("container", "diff", "--blocks", "web", pool=pool).splitlines()
    assert naive == ["C /data", "C /data/big", "C /etc", "C /etc/conf", "C /gone", "D /gone/f", "C /meta",
                     "C /meta/f", "A /new", "A /new/f"]
    # the naive diff misses the rewrite that kept size and mtime; the block diff misses the chmod
    assert set(blocks) == (set(naive) - {"C /meta", "C /meta/f"}) | {"C /data/same"}
    assert blocks == sorted(blocks, key=lambda line: line[2:].split("/"))
    # the container's devices are pool devices by name: the metadata tools and thinpool fs take them
    delta = ok("delta", "web-init", "web", pool=pool)
    assert "<diff left=" in delta and ("<different " in delta or "<right_only " in delta)
    assert ok("fs", "cat", "web", "/rootfs/new/f", pool=pool) == "new"
    assert "web-init" in ok("thin", "list", pool=pool)
    # nothing changed: nothing reported, and only the changed chunks were compared
    ok("container", "create", "img", "--name", "idle", pool=pool)
    assert ok("container", "diff", "--blocks", "idle", pool=pool) == ""
    with Pool.open(pool, readonly=True) as p:
        d = Driver(DeviceSet.open(p))
        from thinpool.driver.blockdiff import changed_blocks

        assert changed_blocks(d.containers, d.containers.get("idle"), 4096) == set()


def test_block_diff_renames_replacements_and_nested_trees(tmp_path: Path) -> None:
    """Directory entries compared by inode number: a rename is D + A, a file replaced by another inode is C, a new
    tree below an existing directory is reported whole; odd names come through unchanged."""
    pool = tmp_path / "pool"
    ok("pool", "create", pool, "--size", "256M", pool=pool)
    ok("driver", "init", "--base-size", "64M", pool=pool)
    layer = tar_bytes([("d", "etc"), ("f", "etc/conf", b"a=1\n"), ("f", "etc/keep", b"k"), ("d", "srv"),
                       ("f", "srv/app", b"v1" * 3000), ("d", "var"), ("f", "var/log", b"l")])
    ok("image", "load", oci_layout(tmp_path / "img", [layer]), pool=pool)
    ok("container", "create", "img", "--name", "box", pool=pool)
    with Pool.open(pool) as p:
        ds = DeviceSet.open(p)
        with mounted(ds, "box", write=True) as fs:
            fs.rename("/rootfs/etc/conf", "/rootfs/etc/conf.old")              # same inode, new name
            fs.write_file("/rootfs/srv/app.tmp", b"v2" * 3000)                 # replaced by another inode
            fs.rename("/rootfs/srv/app.tmp", "/rootfs/srv/app")
            fs.mkdir("/rootfs/var/cache/deep/er", parents=True)                # nested tree in an existing dir
            fs.write_file("/rootfs/var/cache/deep/er/f", b"f")
            fs.write_file("/rootfs/var/ünï côde", b"u")
    naive = ok("container", "diff", "box", pool=pool).splitlines()
    blocks = ok("container", "diff", "--blocks", "box", pool=pool).splitlines()
    assert blocks == ["C /etc", "D /etc/conf", "A /etc/conf.old", "C /srv", "C /srv/app", "C /var",
                     "A /var/cache", "A /var/cache/deep", "A /var/cache/deep/er", "A /var/cache/deep/er/f",
                     "A /var/ünï côde"]
    assert set(naive) == set(blocks)  # the naive diff orders a directory's additions before its deletions


def test_inode_index_saved_memory_mapped_and_removed_with_the_container(tmp_path: Path) -> None:
    """The saved index answers paths (hard links, odd names) and block owners as the init device's file system
    does, is read memory-mapped, is rebuilt when its files are missing or torn, and goes with ``container rm``."""
    import numpy as np

    from thinpool.driver.blockdiff import InodeIndex

    pool = tmp_path / "pool"
    ok("pool", "create", pool, "--size", "256M", pool=pool)
    ok("driver", "init", "--base-size", "64M", pool=pool)
    layer = tar_bytes([("d", "a"), ("f", "a/one", b"1" * 70_000), ("h", "a/two", "a/one"), ("d", "a/ünï côde"),
                       ("f", "a/ünï côde/x", b"x"), ("l", "a/ln", "one")])
    ok("image", "load", oci_layout(tmp_path / "img", [layer]), pool=pool)
    ok("container", "create", "img", "--name", "idx", pool=pool)
    with Pool.open(pool) as p:
        d = Driver(DeviceSet.open(p))
        cdir = d.containers.dir
        saved = InodeIndex.load(cdir, "idx")
        assert saved is not None
        assert all(isinstance(a, np.memmap) for a in (saved._inos, saved._blob, saved._bmap))
        with mounted(d.containers.ds, "idx-init", write=False) as fs:
            one = fs.lstat("/rootfs/a/one").ino
            odd = fs.lstat("/rootfs/a/ünï côde/x").ino
            assert sorted(saved.paths(one)) == ["/a/one", "/a/two"]
            assert saved.paths(odd) == ["/a/ünï côde/x"]
            assert saved.paths(fs.lstat("/rootfs").ino) == ["/"]
            assert saved.paths(fs.statfs().nr_inodes) == [] and fs.statfs().nr_inodes not in saved
            blocks = fs.inode_blocks(one)
            assert len(blocks) == 18
            assert saved.owners(set(blocks[3:5]) | {0, 2**32 - 1}) == {one}
            assert saved.owners(set()) == set()
            built = InodeIndex.build(fs)
            for ino in (one, odd, fs.lstat("/rootfs/a/ln").ino):
                assert built.paths(ino) == saved.paths(ino)
    before = ok("container", "diff", "--blocks", "idx", pool=pool)
    with Pool.open(pool) as p:
        ds = DeviceSet.open(p)
        with mounted(ds, "idx", write=True) as fs:
            fs.write_at("/rootfs/a/two", 5, b"through the other name")
    after = ok("container", "diff", "--blocks", "idx", pool=pool)
    assert before == "" and after.splitlines() == ["C /a", "C /a/one", "C /a/two"]
    blob = cdir / "idx.paths.npy"
    blob.write_bytes(blob.read_bytes()[:-3])  # torn: the index is rebuilt from the init device
    assert InodeIndex.load(cdir, "idx") is None
    assert ok("container", "diff", "--blocks", "idx", pool=pool) == after
    (cdir / "idx.blocks.npy").unlink()
    assert ok("container", "diff", "--blocks", "idx", pool=pool) == after
    ok("container", "rm", "idx", pool=pool)
    assert not [p.name for p in cdir.iterdir() if p.name.startswith("idx.")]
