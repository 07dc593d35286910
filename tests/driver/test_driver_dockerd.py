"""The real dockerd as the oracle of the naive diff: ``docker diff`` and ``docker commit``'s layer.

dockerd (Debian's docker.io) runs with ``--storage-driver=vfs`` (the same NaiveDiffDriver code devicemapper used),
isolated roots in a temp dir, no network; it is killed by its pid at the end. The same image (built with umoci,
copied to a docker-archive by skopeo) is loaded into both, the same ``cp`` changes are made, and the answers are
compared entry by entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REQUIRE_EXTERNAL, need_tool, run_tool
from driver_helpers import (
    INIT_PATHS,
    build_image,
    check_pool,
    differences,
    make_pool,
    set_attrs,
    tar_tree,
    tp,
    write_files,
)

pytestmark = pytest.mark.external


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A private dockerd; yields a function running ``docker ARGS`` against it."""
    need_tool("dockerd", "docker", "umoci", "skopeo")
    if os.geteuid() != 0:
        _cannot("dockerd needs root")
    d = Path(tempfile.mkdtemp(prefix="tp-dockerd-", dir="/tmp"))  # short: unix socket paths are limited
    sock = d / "sock"
    log = open(d / "log", "wb")
    proc = subprocess.Popen(["dockerd", "--storage-driver=vfs", f"--data-root={d / 'root'}",
                             f"--exec-root={d / 'exec'}", f"--pidfile={d / 'pid'}", f"--host=unix://{sock}",
                             "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
                             "--ip-forward=false"], stdout=log, stderr=subprocess.STDOUT)

    def run(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "-H", f"unix://{sock}", *map(str, args)], capture_output=True, text=True,
                              check=check)

    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                _cannot(f"dockerd exited with {proc.returncode}: {(d / 'log').read_text()[-2000:]}")
            if sock.exists() and run("version", check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                _cannot(f"dockerd did not answer within 60 s: {(d / 'log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield run
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        subprocess.run(["umount", "-R", str(d / "exec")], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def _cannot(reason: str) -> None:
    print(f"dockerd cannot start here: {reason}")
    if REQUIRE_EXTERNAL:
        pytest.fail(f"dockerd cannot start (THINPOOL_REQUIRE_EXTERNAL=1: CI must run it): {reason}")
    pytest.skip(f"dockerd cannot start: {reason}")


def layer_entries(tar: tarfile.TarFile) -> dict[str, dict[str, Any]]:
    """Entries of a layer tar: type, permission bits, owner, size, content hash, link target, mtime (not for
    directories: those carry the time of the copy, which differs between two daemons)."""
    out = {}
    for ti in tar:
        rec: dict[str, Any] = {"type": ti.type if ti.type != tarfile.AREGTYPE else tarfile.REGTYPE,
                               "mode": ti.mode & 0o7777, "uid": ti.uid, "gid": ti.gid, "size": ti.size,
                               "linkname": ti.linkname}
        if ti.isreg():
            f = tar.extractfile(ti)
            assert f is not None
            rec["sha256"] = hashlib.sha256(f.read()).hexdigest()
        if not ti.isdir() and not os.path.basename(ti.name).startswith(".wh."):
            rec["mtime"] = int(ti.mtime)
        out[ti.name.rstrip("/")] = rec
    return out


def last_layer(archive: Path) -> dict[str, dict[str, Any]]:
    with tarfile.open(archive) as outer:
        f = outer.extractfile("manifest.json")
        assert f is not None
        name = json.load(f)[0]["Layers"][-1]
        inner = outer.extractfile(name)
        assert inner is not None
        with tarfile.open(fileobj=inner) as t:
            return layer_entries(t)


def test_dockerd_diff_and_commit_layer_equal_thinpool(docker: Any, tmp_path: Path) -> None:
    layout = build_image(tmp_path / "umoci")
    archive = tmp_path / "img.tar"
    run_tool("skopeo", "copy", f"oci:{layout}:t", f"docker-archive:{archive}:app:t")
    loaded_at = int(time.time())
    docker("load", "-i", archive)
    pool = make_pool(tmp_path / "pool")
    tp("image", "load", archive, pool=pool)
    docker("create", "--name", "ct", "app:t", "/bin/true")
    tp("container", "create", "app:t", "--name", "ct", pool=pool)
    host = tmp_path / "host"
    write_files(host, {"/new.conf": b"copied\n", "/tree/a": b"a\n", "/tree/sub/b": b"bb\n",
                       "/over": b"overwrites /mod/file\n", "/deepfile": b"deep\n", "/lnk": ("link", "new.conf"),
                       "/hl/a": b"hard\n", "/hl/b": ("hard", "/hl/a"), "/suid": b"#!/bin/sh\n"})
    set_attrs(host / "suid", mode=0o4711, mtime=1_350_000_000)
    set_attrs(host / "lnk", mtime=1_360_000_000)
    set_attrs(host / "hl/a", mtime=1_370_000_000)
    set_attrs(host / "new.conf", mode=0o640, mtime=1_300_000_000)
    set_attrs(host / "tree/a", mtime=1_310_000_000)
    set_attrs(host / "tree/sub/b", mode=0o600, mtime=1_320_000_000)
    set_attrs(host / "over", mtime=1_330_000_000)
    set_attrs(host / "deepfile", mtime=1_340_000_000)
    deep = "/deep/" + "/".join(f"d{i}" for i in range(30))
    for src, dst in ((host / "new.conf", "/etc/"), (host / "tree", "/newtree"), (host / "over", "/mod/file"),
                     (host / "deepfile", deep + "/"), (host / "new.conf", "/files/renamed.conf"),
                     (host / "lnk", "/etc/lnk"), (host / "hl", "/hl"), (host / "suid", "/usr/"),
                     (host / "tree", "/newtree")):  # the last one: into the existing /newtree, as /newtree/tree
        docker("cp", src, f"ct:{dst}")
        tp("container", "cp", src, f"ct:{dst}", pool=pool)
    want = set(docker("diff", "ct").stdout.splitlines())
    got = tp("container", "diff", "ct", pool=pool).splitlines()
    assert set(got) == want and len(got) == len(want)
    assert {"A /newtree/sub/b", "A /newtree/tree/sub/b", f"C {deep}", "C /deep", "A /hl/b", "A /usr/suid",
            "A /etc/lnk"} <= want
    # docker export against thinpool's: entry by entry (directories the copies changed, and the init layer's
    # entries, carry the times of the two runs)
    docker("export", "-o", tmp_path / "docker-export.tar", "ct")
    tp("container", "export", "ct", tmp_path / "tp-export.tar", pool=pool)
    d_exp, t_exp = tar_tree(tmp_path / "docker-export.tar"), tar_tree(tmp_path / "tp-export.tar")
    # moby leaves the apply's time on a directory a layer changes without carrying it (/del, /mod: thinpool keeps
    # its mtime, as umoci does); such directories, and those the copies changed, have times of this run
    changed_dirs = {p for p, rec in d_exp.items() if rec["type"] == "dir" and rec["mtime"] >= loaded_at - 1}
    assert {"/del", "/mod"} <= changed_dirs
    # moby's tar writer keeps only security.capability; thinpool exports every xattr (umoci's unpack has them)
    assert set(d_exp["/x/file"]["xattrs"]) == {"security.capability"}
    assert set(t_exp["/x/file"]["xattrs"]) == {"security.capability", "trusted.b", "user.a"}
    for rec in t_exp.values():
        rec["xattrs"] = {k: v for k, v in rec["xattrs"].items() if k == "security.capability"}
    assert differences(t_exp, d_exp, no_mtime=changed_dirs | INIT_PATHS) == []
    # docker commit's layer (from docker save) against thinpool's (from image save --format docker)
    docker("commit", "ct", "app:committed")
    docker("save", "-o", tmp_path / "docker.tar", "app:committed")
    tp("container", "commit", "ct", "app:committed", pool=pool)
    tp("image", "save", "app:committed", tmp_path / "thinpool.tar", "--format", "docker", pool=pool)
    want_layer = last_layer(tmp_path / "docker.tar")
    got_layer = last_layer(tmp_path / "thinpool.tar")
    assert got_layer == want_layer
    assert got_layer["newtree/sub/b"]["mtime"] == 1_320_000_000 and got_layer["etc/new.conf"]["mode"] == 0o640
    assert got_layer["hl/b"]["type"] == tarfile.LNKTYPE and got_layer["usr/suid"]["mode"] == 0o4711
    # dockerd loads thinpool's saved image: the DiffIDs it computes from the tars are the config's
    docker("rmi", "app:committed")
    assert docker("load", "-i", tmp_path / "thinpool.tar").stdout.strip() == "Loaded image: app:committed"
    layers = json.loads(docker("image", "inspect", "app:committed").stdout)[0]["RootFS"]["Layers"]
    with tarfile.open(tmp_path / "thinpool.tar") as t:
        f = t.extractfile(json.load(t.extractfile("manifest.json"))[0]["Config"])  # type: ignore[arg-type]
        assert f is not None
        assert layers == json.load(f)["rootfs"]["diff_ids"] and len(layers) == 5
    check_pool(pool, tmp_path)
