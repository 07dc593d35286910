"""Acceptance against umoci and skopeo: images built with umoci load into the driver and read back entry by entry.

The image (tag ``t``) has four layers: files of several sizes (a sparse one), hard links, symlinks (relative,
absolute, long, dangling), a FIFO and device nodes, xattrs (user, trusted, security.capability), deep paths, long
names, odd owners and modes; then deletions, a deleted and recreated directory, a modified file and a chmod
(``umoci repack``); then ``umoci insert --opaque`` and ``umoci insert --whiteout``. ``umoci unpack`` is the
reference rootfs.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from conftest import need_tool, run_tool
from driver_helpers import (
    INIT_PATHS,
    build_image,
    check_pool,
    data_used,
    differences,
    dir_tree,
    layer_export,
    make_pool,
    reference,
    set_attrs,
    tar_tree,
    tp,
    unpack,
    write_files,
)

pytestmark = pytest.mark.external

@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The umoci layout ``img`` with tags ``v2`` (two layers) and ``t`` (four)."""
    need_tool("umoci")
    return build_image(tmp_path_factory.mktemp("umoci"))


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
    assert got["/.dockerenv"] == {"type": "file", "mode": 0o755, "uid": 0, "gid": 0,
                                  "mtime": got["/.dockerenv"]["mtime"],
                                  "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                                  "size": 0, "xattrs": {}}
    for d in ("/proc", "/sys", "/dev/pts", "/dev/shm"):
        assert got[d]["type"] == "dir" and got[d]["mode"] == 0o755
    # a second tag sharing the lower two layers is not loaded again
    tp("image", "load", f"{image}:v2", pool=pool)
    assert differences(layer_export(pool, tmp_path, "img:v2"), reference(image, "v2", tmp_path)) == []
    rows = json.loads(tp("image", "ls", "--json", pool=pool))
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
    ids = {r["id"] for r in json.loads(tp("image", "ls", "--json", pool=pool))}
    tp("image", "save", "app:t", tmp_path / "again.tar", "--format", "docker", pool=pool)
    with open(tmp_path / "again.tar", "rb") as f, gzip.open(tmp_path / "again.tar.gz", "wb") as g:
        shutil.copyfileobj(f, g)  # docker save | gzip
    pool3 = make_pool(tmp_path / "pool3")
    assert tp("image", "load", tmp_path / "again.tar.gz", pool=pool3).splitlines() == ["Loaded image: app:t"]
    assert {r["id"] for r in json.loads(tp("image", "ls", "--json", pool=pool3))} == ids
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
    # docker cp out of the container: modes, mtimes, content and links as in the container
    out = tmp_path / "copied"
    out.mkdir()
    tp("container", "cp", "web:/newtree", out, pool=pool)
    tp("container", "cp", "web:/hard", out / "hardcopy", pool=pool)
    tp("container", "cp", "web:/links/abs", out / "abs", pool=pool)
    exported = tar_tree(tmp_path / "web.tar")
    copied = dir_tree(out)
    for src, dst in (("/newtree", "/newtree"), ("/hard", "/hardcopy")):
        for p in [q for q in exported if q == src or q.startswith(src + "/")]:
            want = {k: v for k, v in exported[p].items() if k != "link_group"}
            have = {k: v for k, v in copied[dst + p[len(src):]].items() if k != "link_group"}
            assert have == want, p
    assert copied["/hardcopy/b"]["link_group"] == "/hardcopy/a"  # hard links stay links
    assert copied["/abs"]["type"] == "symlink" and copied["/abs"]["target"] == "/files/one"
    # a container of the committed image has no changes against its image
    tp("container", "create", "img:committed", "--name", "web2", pool=pool)
    assert tp("container", "diff", "web2", pool=pool) == ""
    # rm discards, then deletes both devices: the data chunks come back
    used_before = data_used(pool)
    tp("container", "rm", "web", pool=pool)
    tp("container", "rm", "web2", pool=pool)
    assert data_used(pool) < used_before
    names = {e["name"] for e in json.loads((pool / "pool.json").read_text())["devices"].values()}
    assert not names & {"web", "web-init", "web2", "web2-init"}
    # image rm: the committed layer's device goes with the image; the shared lower layers stay
    out_lines = tp("image", "rm", "img:committed", pool=pool).splitlines()
    assert out_lines[0] == "Untagged: img:committed" and sum(ln.startswith("Deleted: ") for ln in out_lines) == 2
    assert len(list((pool / "driver/image/layerdb/sha256").iterdir())) == 4
    assert len(json.loads((pool / "pool.json").read_text())["devices"]) == 5  # base + 4 layers
    check_pool(pool, tmp_path)
