"""Acceptance against umoci and skopeo: images built with umoci load into the driver and read back entry by entry.

The image (tag ``t``) has four layers: files of several sizes (a sparse one), hard links, symlinks (relative,
absolute, long, dangling), a FIFO and device nodes, xattrs (user, trusted, security.capability), deep paths, long
names, odd owners and modes; then deletions, a deleted and recreated directory, a modified file and a chmod
(``umoci repack``); then ``umoci insert --opaque`` and ``umoci insert --whiteout``. ``umoci unpack`` is the
reference rootfs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import need_tool, run_tool
from driver_helpers import (CAPABILITY, INIT_PATHS, differences, dir_tree, repack, set_attrs, tar_tree, umoci,
                            unpack, write_files)
from thinpool_cli.main import cli

pytestmark = pytest.mark.external

BASE_SIZE = "256M"


def tp(*args: object, pool: Path | None = None) -> str:
    env = {"THINPOOL_POOL": str(pool) if pool else None}
    r = CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)
    assert r.exit_code == 0, f"thinpool {' '.join(map(str, args))}: exit {r.exit_code}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def make_pool(path: Path) -> Path:
    tp("pool", "create", path, "--size", "1G")
    tp("driver", "init", "--base-size", BASE_SIZE, pool=path)
    return path


def layer1(root: Path) -> None:
    rnd = os.urandom(1_500_000)
    write_files(root, {
        "/files/empty": b"", "/files/one": b"1", "/files/4095": rnd[:4095], "/files/4096": rnd[:4096],
        "/files/sparse": bytes(200_000) + b"end" + bytes(100_000), "/files/big": rnd,
        "/files/setuid": b"#!/bin/sh\n",
        "/hard/a": b"hard linked\n", "/hard/b": ("hard", "/hard/a"), "/hard/c": ("hard", "/hard/a"),
        "/links/rel": ("link", "../files/one"), "/links/abs": ("link", "/files/one"),
        "/links/long": ("link", "/" + "t" * 120), "/links/dangling": ("link", "/nope"),
        "/special/fifo": ("fifo",), "/special/null": ("char", 1, 3), "/special/loop": ("block", 7, 0),
        "/x/file": b"with xattrs\n", "/x/dir": ("dir", 0o750),
        "/deep/" + "/".join(f"d{i}" for i in range(30)) + "/leaf": b"deep\n",
        "/long/" + "n" * 255: b"long name\n", "/long/" + "D" * 200 + "/f": b"in a long dir\n",
        "/del/file": b"to be deleted\n", "/del/keep": b"kept\n",
        "/deldir/old1": b"old\n", "/deldir/sub/old2": b"old\n",
        "/opq/old": b"hidden by the opaque layer\n", "/opq/sub/x": b"also hidden\n",
        "/wh/gone": b"whited out\n", "/wh/stays": b"stays\n",
        "/mod/file": b"version 1\n", "/mod/chmod": b"mode changes\n",
        "/etc/app.conf": b"key=value\n", "/usr/lib/libx.so": b"\x7fELF", "/lib": ("link", "usr/lib"),
    })
    set_attrs(root / "files/setuid", mode=0o4755, uid=1000, gid=1000)
    set_attrs(root / "files/one", uid=65534, gid=100, mtime=1_000_000_000)
    set_attrs(root / "x/file", mode=0o600, xattrs={"user.a": b"1", "trusted.b": b"two", "security.capability": CAPABILITY})
    set_attrs(root / "x/dir", xattrs={"user.dir": b"d" * 300})
    set_attrs(root / "links/abs", uid=7, gid=8, mtime=1_200_000_000)
    set_attrs(root / "special/null", mode=0o666)
    set_attrs(root / "deep", mtime=1_100_000_000)


def layer2(root: Path) -> None:
    (root / "del/file").unlink()
    shutil.rmtree(root / "deldir")
    write_files(root, {"/deldir/new": b"recreated\n", "/added/file": b"added in layer 2\n",
                       "/mod/file": b"version 2, longer\n"})
    set_attrs(root / "mod/chmod", mode=0o600)
    set_attrs(root / "deldir", mode=0o700)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The umoci layout ``img`` with tags ``v2`` (two layers) and ``t`` (four)."""
    need_tool("umoci")
    w = tmp_path_factory.mktemp("umoci")
    layout = w / "img"
    umoci("init", "--layout", layout)
    umoci("new", "--image", f"{layout}:t")
    b = w / "b1"
    unpack(layout, "t", b)
    layer1(b / "rootfs")
    repack(layout, "t", b)
    b2 = w / "b2"
    unpack(layout, "t", b2)
    layer2(b2 / "rootfs")
    repack(layout, "t", b2)
    umoci("tag", "--image", f"{layout}:t", "v2")
    src = w / "opq-src"
    write_files(src, {"/new": b"the only file left in /opq\n"})
    umoci("insert", "--image", f"{layout}:t", "--opaque", src, "/opq")
    umoci("insert", "--image", f"{layout}:t", "--whiteout", "/wh/gone")
    return layout


def reference(layout: Path, tag: str, where: Path) -> dict:
    return dir_tree(unpack(layout, tag, where / f"ref-{tag}"))


def layer_export(pool: Path, tmp: Path, ref: str) -> dict:
    """The rootfs of an image's top layer device, through the library (no init layer)."""
    import tarfile

    from thinpool.driver import DeviceSet, ImageStore
    from thinpool.driver.rootfs import ROOTFS, export_tree
    from thinpool.driver.store import mounted
    from thinpool.pool import Pool

    out = tmp / "layer.tar"
    with Pool.open(pool, readonly=True) as p:
        ds = DeviceSet.open(p)
        st = ImageStore(ds)
        top = st.top_layer(st.resolve(ref))
        with mounted(ds, st.device_hash(top), write=False) as fs, tarfile.open(out, "w") as tw:
            export_tree(fs, ROOTFS, tw)
    return tar_tree(out)


def test_umoci_image_loads_entry_by_entry(image: Path, tmp_path: Path) -> None:
    pool = make_pool(tmp_path / "pool")
    out = tp("image", "load", f"{image}:t", pool=pool)
    assert out.splitlines() == ["Loaded image: img:t"]
    want = reference(image, "t", tmp_path)
    assert "/opq/old" not in want and "/wh/gone" not in want and "/del/file" not in want  # umoci's own view
    assert differences(layer_export(pool, tmp_path, "img:t"), want) == []
    # the container: the same, plus moby's initlayer entries
    tp("container", "create", "img:t", "--name", "c1", pool=pool)
    tp("container", "export", "c1", tmp_path / "c1.tar", pool=pool)
    got = tar_tree(tmp_path / "c1.tar")
    assert differences(got, want, ignore=INIT_PATHS) == []
    assert got["/etc/mtab"]["target"] == "/proc/mounts"
    assert got["/.dockerenv"] == {"type": "file", "mode": 0o755, "uid": 0, "gid": 0, "mtime": got["/.dockerenv"]["mtime"],
                                  "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                                  "size": 0, "xattrs": {}}
    for d in ("/proc", "/sys", "/dev/pts", "/dev/shm"):
        assert got[d]["type"] == "dir" and got[d]["mode"] == 0o755
    # a second tag sharing the lower two layers is not loaded again
    tp("image", "load", f"{image}:v2", pool=pool)
    assert differences(layer_export(pool, tmp_path, "img:v2"), reference(image, "v2", tmp_path)) == []
    rows = __import__("json").loads(tp("image", "ls", "--json", pool=pool))
    assert sorted(r["tag"] for r in rows) == ["t", "v2"] and [r["layers"] for r in rows if r["tag"] == "t"] == [4]
    layer_dirs = list((pool / "driver/image/layerdb/sha256").iterdir())
    assert len(layer_dirs) == 4
    check_pool(pool, tmp_path)


def test_skopeo_docker_archive_and_zstd_load_the_same(image: Path, tmp_path: Path) -> None:
    need_tool("skopeo")
    want = reference(image, "t", tmp_path)
    archive = tmp_path / "t.tar"
    run_tool("skopeo", "copy", f"oci:{image}:t", f"docker-archive:{archive}:app:t")
    pool = make_pool(tmp_path / "pool")
    assert tp("image", "load", archive, pool=pool).splitlines() == ["Loaded image: app:t"]
    assert differences(layer_export(pool, tmp_path, "app:t"), want) == []
    zst = tmp_path / "zst"
    run_tool("skopeo", "copy", "--dest-compress-format", "zstd", f"oci:{image}:t", f"oci:{zst}:z")
    pool2 = make_pool(tmp_path / "pool2")
    assert tp("image", "load", f"{zst}:z", "--tag", "zz:1", pool=pool2).splitlines() == ["Loaded image: zz:1"]
    assert differences(layer_export(pool2, tmp_path, "zz:1"), want) == []
    # save -> load round trip keeps the image id (layers are rebuilt byte for byte from the devices)
    ids = {r["id"] for r in __import__("json").loads(tp("image", "ls", "--json", pool=pool))}
    tp("image", "save", "app:t", tmp_path / "again.tar", "--format", "docker", pool=pool)
    pool3 = make_pool(tmp_path / "pool3")
    tp("image", "load", tmp_path / "again.tar", pool=pool3)
    assert {r["id"] for r in __import__("json").loads(tp("image", "ls", "--json", pool=pool3))} == ids
    check_pool(pool, tmp_path)


def test_commit_save_unpack_equals_the_container(image: Path, tmp_path: Path) -> None:
    from thinpool.driver import DeviceSet
    from thinpool.driver.store import mounted
    from thinpool.pool import Pool

    pool = make_pool(tmp_path / "pool")
    tp("image", "load", f"{image}:t", pool=pool)
    tp("container", "create", "img:t", "--name", "web", pool=pool)
    host = tmp_path / "host"
    write_files(host, {"/new.txt": b"copied in\n", "/tree/a": b"a\n", "/tree/sub/b": b"b\n"})
    set_attrs(host / "new.txt", mtime=1_300_000_000)
    tp("container", "cp", host / "new.txt", "web:/files/", pool=pool)
    tp("container", "cp", host / "tree", "web:/newtree", pool=pool)
    tp("container", "cp", host / "new.txt", "web:/mod/file", pool=pool)  # overwrite: same path, new content
    # the devices are reachable by name: thinpool fs works on the container's rw device
    tp("fs", "rm", "web", "/rootfs/links/rel", pool=pool)
    tp("fs", "rm", "web", "/rootfs/deep/d0", "-r", pool=pool)
    with Pool.open(pool) as p:
        ds = DeviceSet.open(p)
        with mounted(ds, "web", write=True) as fs:
            fs.chmod("/rootfs/hard/a", 0o640)
            fs.chown("/rootfs/links/abs", 1, 2, follow_symlinks=False)
    diff = tp("container", "diff", "web", pool=pool).splitlines()
    assert diff == ["C /deep", "D /deep/d0", "C /files", "A /files/new.txt", "C /hard", "C /hard/a", "C /hard/b",
                    "C /hard/c", "C /links", "C /links/abs", "D /links/rel", "C /mod", "C /mod/file",
                    "A /newtree", "A /newtree/a", "A /newtree/sub", "A /newtree/sub/b"]
    tp("container", "commit", "web", "img:committed", pool=pool)
    tp("image", "save", "img:committed", tmp_path / "out", "--format", "oci", pool=pool)
    got = dir_tree(unpack(tmp_path / "out", "committed", tmp_path / "bundle"))
    tp("container", "export", "web", tmp_path / "web.tar", pool=pool)
    assert differences(got, tar_tree(tmp_path / "web.tar"), ignore=INIT_PATHS) == []
    assert got["/mod/file"]["size"] == len(b"copied in\n") and got["/files/new.txt"]["uid"] == 0
    assert got["/files/new.txt"]["mtime"] == 1_300_000_000
    # a container of the committed image has no changes against its image
    tp("container", "create", "img:committed", "--name", "web2", pool=pool)
    assert tp("container", "diff", "web2", pool=pool) == ""
    # rm discards, then deletes both devices: the data chunks come back
    used_before = _data_used(pool)
    tp("container", "rm", "web", pool=pool)
    tp("container", "rm", "web2", pool=pool)
    assert _data_used(pool) < used_before
    names = {e["name"] for e in __import__("json").loads((pool / "pool.json").read_text())["devices"].values()}
    assert not names & {"web", "web-init", "web2", "web2-init"}
    check_pool(pool, tmp_path)


def _data_used(pool: Path) -> int:
    from thinpool.pool import Pool

    with Pool.open(pool, readonly=True) as p:
        return p.status().used_data_blocks


def check_pool(pool: Path, tmp: Path) -> None:
    """e2fsck -fn clean on every device, thin_check clean on the pool."""
    need_tool("e2fsck", "thin_check")
    import json

    devices = json.loads((pool / "pool.json").read_text())["devices"]
    for dev_id, e in devices.items():
        img = tmp / f"dev-{dev_id}.img"
        tp("thin", "export", dev_id, img, "--force", pool=pool)
        r = run_tool("e2fsck", "-fn", str(img), check=False)
        assert r.returncode == 0, f"e2fsck on {e['name']}: {r.stdout}{r.stderr}"
        img.unlink()
    r = run_tool("thin_check", str(pool / "metadata"), check=False)
    assert r.returncode == 0, r.stderr
