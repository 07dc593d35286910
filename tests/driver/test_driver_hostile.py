"""Hostile and broken images: path traversal, whiteouts that name the rootfs itself, corrupt blobs, bad JSON,
link loops. Each is refused with one line (`thinpool: error: ...`), never writes outside the device's
``/rootfs``, and leaves the pool as it was (no orphan layer device)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from driver_helpers import oci_layout, tar_bytes

from thinpool.driver import DeviceSet, Driver
from thinpool.driver.rootfs import walk
from thinpool.driver.store import mounted
from thinpool.pool import Pool
from thinpool_cli.main import cli

pytestmark = pytest.mark.timeout(300)


def run(*args: object, pool: Path | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env={"THINPOOL_POOL": str(pool) if pool else None},
                              catch_exceptions=False)


def ok(*args: object, pool: Path | None = None) -> str:
    r = run(*args, pool=pool)
    assert r.exit_code == 0, f"exit {r.exit_code}: {r.stdout} {r.stderr}"
    return r.stdout


def fails(*args: object, pool: Path | None = None) -> str:
    r = run(*args, pool=pool)
    assert r.exit_code == 1, f"exit {r.exit_code}: {r.stdout} {r.stderr}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("thinpool: error: "), r.stderr
    return lines[0]


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    p = tmp_path / "pool"
    ok("pool", "create", p, "--size", "256M")
    ok("driver", "init", "--base-size", "64M", pool=p)
    return p


def state(pool: Path) -> tuple:
    """What a refused command must leave as it was: the pool's devices, the driver's per-device records, the
    image store (layers, images, references)."""
    with Pool.open(pool, readonly=True) as p:
        devices = sorted(p.md.devices)
    files = {}
    for sub in ("driver/image", "driver/metadata"):
        for f in sorted((pool / sub).rglob("*")):
            if f.is_file() and f.name not in ("transaction-metadata", "deviceset-metadata"):
                files[str(f.relative_to(pool))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return devices, files, json.loads((pool / "pool.json").read_text())["devices"]


def device_tree(pool: Path, ref: str) -> dict[str, bytes | None]:
    """Every path of the image's top layer device (from the device root, not only /rootfs) -> file content."""
    with Pool.open(pool, readonly=True) as p:
        d = Driver(DeviceSet.open(p))
        top = d.images.top_layer(d.images.resolve(ref))
        with mounted(d.ds, d.images.device_hash(top), write=False) as fs:
            out: dict[str, bytes | None] = {}
            for path, st in walk(fs, "/"):
                out[path] = fs.read_file(path) if st.mode & 0o170000 == 0o100000 else None
            return out


def raw_tar(entries: list[tuple[str, bytes, str, bytes | None]]) -> bytes:
    """(name, tar type, linkname, data) -> an uncompressed tar, names exactly as given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tw:
        for name, kind, link, data in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.mtime, ti.mode = kind, link, 1_500_000_000, 0o644
            ti.size = len(data) if data is not None else 0
            tw.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


REG, SYM, DIR = tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE


def test_traversal_never_writes_outside_the_rootfs(pool: Path, tmp_path: Path) -> None:
    for i, name in enumerate(["../escape", "a/../../escape", "./../escape"]):
        before = state(pool)
        layout = oci_layout(tmp_path / f"t{i}", [raw_tar([(name, REG, "", b"x")])])
        assert "is outside of the root" in fails("image", "load", layout, pool=pool)
        assert state(pool) == before
    # an absolute name, and writes through symlinks pointing at / and far above it, all land inside /rootfs
    layer = raw_tar([("/abs", REG, "", b"abs"), ("up", SYM, "/", None), ("up/id", REG, "", b"not the id"),
                     ("far", SYM, "../../../../..", None), ("far/lost+found", DIR, "", None),
                     ("far/x", REG, "", b"x"), ("dotted", SYM, "/../..", None), ("dotted/y", REG, "", b"y")])
    ok("image", "load", oci_layout(tmp_path / "sym", [layer]), pool=pool)
    tree = device_tree(pool, "sym")
    outside = {p for p in tree if not p.startswith("/rootfs/")}
    assert outside == {"/id", "/lost+found", "/rootfs"} and tree["/id"] != b"not the id"
    assert tree["/rootfs/abs"] == b"abs" and tree["/rootfs/id"] == b"not the id"
    assert tree["/rootfs/x"] == b"x" and tree["/rootfs/y"] == b"y" and "/rootfs/lost+found" in tree


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, REG, tarfile.FIFOTYPE])
def test_the_layer_root_cannot_become_a_symlink_or_a_file(pool: Path, tmp_path: Path, kind: bytes) -> None:
    # "." -> "/" would make /rootfs a symlink to the device root: "id" would then overwrite /id
    before = state(pool)
    root = (".", kind, "/" if kind == tarfile.SYMTYPE else "", b"x" if kind == REG else None)
    layer = raw_tar([root, ("id", REG, "", b"OWNED"), ("lost+found/evil", REG, "", b"e")])
    assert "names the root itself" in fails("image", "load", oci_layout(tmp_path / "root", [layer]), pool=pool)
    assert state(pool) == before
    ok("image", "load", oci_layout(tmp_path / "dot", [raw_tar([(".", DIR, "", None), ("id", REG, "", b"in")])]),
       pool=pool)  # "." as a directory only sets the root's attributes
    tree = device_tree(pool, "dot")
    assert tree["/rootfs/id"] == b"in" and tree["/id"] != b"in"


@pytest.mark.parametrize("name", [".wh..", ".wh...", ".wh.", "a/.wh..", "a/.wh..."])
def test_a_whiteout_naming_the_directory_itself_or_its_parent_is_refused(pool: Path, tmp_path: Path,
                                                                         name: str) -> None:
    # ".wh.." would remove /rootfs itself, ".wh..." the device root's entries beside /rootfs
    ok("image", "load", oci_layout(tmp_path / "base", [raw_tar([("a", DIR, "", None), ("a/f", REG, "", b"f")])]),
       pool=pool)
    before = state(pool)
    layout = oci_layout(tmp_path / "wh", [raw_tar([("a", DIR, "", None), ("a/f", REG, "", b"f")]),
                                          raw_tar([(name, REG, "", b"")])])
    assert "names no entry" in fails("image", "load", layout, pool=pool)
    assert state(pool) == before


def test_a_refused_upper_layer_leaves_no_lower_layer_behind(pool: Path, tmp_path: Path) -> None:
    l1, l2 = tar_bytes([("f", "one", b"1")]), tar_bytes([("f", "two", b"2")])
    before = state(pool)
    bad = oci_layout(tmp_path / "bad", [l1, l2],
                     diff_ids=["sha256:" + hashlib.sha256(l1).hexdigest(), "sha256:" + "0" * 64])
    assert "the config says sha256:000" in fails("image", "load", bad, pool=pool)
    assert state(pool) == before
    # the lower layer is not there to be shared: a second image with it loads it (and checks its blob) again
    good = oci_layout(tmp_path / "good", [l1])
    blob = json.loads((good / "index.json").read_text())["manifests"][0]["digest"][7:]
    layer_digest = json.loads((good / "blobs/sha256" / blob).read_text())["layers"][0]["digest"][7:]
    (good / "blobs/sha256" / layer_digest).write_bytes(gzip.compress(l2, mtime=0))
    assert "blob digest is" in fails("image", "load", good, pool=pool)
    assert state(pool) == before


def test_corrupt_and_missing_blobs_are_one_line_errors(pool: Path, tmp_path: Path) -> None:
    l1, l2 = tar_bytes([("f", "one", b"1" * 5000)]), tar_bytes([("f", "two", os.urandom(50000))])
    before = state(pool)

    def layer_blobs(layout: Path) -> list[Path]:
        m = json.loads((layout / "blobs/sha256" /
                        json.loads((layout / "index.json").read_text())["manifests"][0]["digest"][7:]).read_text())
        return [layout / "blobs/sha256" / ld["digest"][7:] for ld in m["layers"]]

    lay = oci_layout(tmp_path / "trunc", [l1, l2])
    b = layer_blobs(lay)[1]
    b.write_bytes(b.read_bytes()[:-4000])  # a gzip stream cut short
    assert "corrupt compressed layer" in fails("image", "load", lay, pool=pool)
    assert state(pool) == before
    lay = oci_layout(tmp_path / "garbled", [l1, l2])
    b = layer_blobs(lay)[1]
    data = bytearray(b.read_bytes())
    data[30:60] = bytes(30)
    b.write_bytes(bytes(data))
    fails("image", "load", lay, pool=pool)
    assert state(pool) == before
    lay = oci_layout(tmp_path / "missing", [l1, l2])
    layer_blobs(lay)[1].unlink()
    assert "missing blobs/sha256/" in fails("image", "load", lay, pool=pool)
    assert state(pool) == before
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    assert "not a tar archive" in fails("image", "load", junk, pool=pool)
    assert state(pool) == before


def _layout_with(d: Path, index: object, blobs: list[bytes] = ()) -> Path:
    (d / "blobs/sha256").mkdir(parents=True)
    (d / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    for b in blobs:
        (d / "blobs/sha256" / hashlib.sha256(b).hexdigest()).write_bytes(b)
    (d / "index.json").write_text(json.dumps(index))
    return d


def _desc(b: bytes, mt: str = "application/vnd.oci.image.manifest.v1+json") -> dict:
    return {"mediaType": mt, "digest": "sha256:" + hashlib.sha256(b).hexdigest(), "size": len(b)}


@pytest.mark.parametrize("case", ["index-list", "index-manifests-str", "desc-str", "digest-dotdot",
                                  "digest-alg-dotdot", "digest-int", "manifest-list", "no-config",
                                  "layers-str", "layer-desc-str", "index-loop", "config-diff-ids-int"])
def test_hostile_manifests_are_one_line_errors(pool: Path, tmp_path: Path, case: str) -> None:
    layer = tar_bytes([("f", "f", b"f")])
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [5]}}).encode()
    man = {"schemaVersion": 2, "config": _desc(config),
           "layers": [_desc(layer, "application/vnd.oci.image.layer.v1.tar")]}
    blobs: list[bytes] = [config, layer]
    index: object = {"schemaVersion": 2, "manifests": []}
    if case == "index-list":
        index = [1, 2]
    elif case == "index-manifests-str":
        index = {"manifests": "abc"}
    elif case == "desc-str":
        index = {"manifests": ["abc"]}
    elif case.startswith("digest-"):
        digest = {"digest-dotdot": "sha256:..", "digest-alg-dotdot": "..:oci-layout", "digest-int": 7}[case]
        index = {"manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest}]}
    elif case == "index-loop":
        # an index whose only entry is itself cannot be written (its digest would contain itself): two that
        # point at each other cannot either, so nest deeper than any real image instead
        inner = json.dumps({"manifests": []}).encode()
        for _ in range(12):
            blobs.append(inner)
            inner = json.dumps({"manifests": [_desc(inner, "application/vnd.oci.image.index.v1+json")]}).encode()
        blobs.append(inner)
        index = {"manifests": [_desc(inner, "application/vnd.oci.image.index.v1+json")]}
    else:
        m: object = {"manifest-list": [1], "no-config": {"layers": []},
                     "layers-str": dict(man, layers="abc"), "layer-desc-str": dict(man, layers=["abc"]),
                     "config-diff-ids-int": man}[case]
        mb = json.dumps(m).encode()
        blobs.append(mb)
        index = {"manifests": [_desc(mb)]}
    before = state(pool)
    fails("image", "load", _layout_with(tmp_path / "img", index, blobs), pool=pool)
    assert state(pool) == before


def test_a_docker_archive_with_a_link_loop_is_refused(pool: Path, tmp_path: Path) -> None:
    arc = tmp_path / "loop.tar"
    with tarfile.open(arc, "w") as tw:
        mj = json.dumps([{"Config": "c.json", "RepoTags": ["x:y"], "Layers": ["l.tar"]}]).encode()
        ti = tarfile.TarInfo("manifest.json")
        ti.size = len(mj)
        tw.addfile(ti, io.BytesIO(mj))
        for name, target in (("c.json", "l.tar"), ("l.tar", "c.json")):
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = tarfile.SYMTYPE, target
            tw.addfile(ti)
    before = state(pool)
    assert "missing c.json" in fails("image", "load", arc, pool=pool)
    assert state(pool) == before
    for hostile in ([{"Config": "/etc/passwd", "Layers": []}], [{"Config": "c.json", "Layers": "l.tar"}],
                    [{"Config": 5}], {"Config": "c.json"}):
        arc2 = tmp_path / "hostile.tar"
        with tarfile.open(arc2, "w") as tw:
            mj = json.dumps(hostile).encode()
            ti = tarfile.TarInfo("manifest.json")
            ti.size = len(mj)
            tw.addfile(ti, io.BytesIO(mj))
        fails("image", "load", arc2, pool=pool)
        assert state(pool) == before


def test_an_ambiguous_id_prefix_names_no_image(pool: Path, tmp_path: Path) -> None:
    i = 0
    while True:  # two images whose ids share a first hex digit (a handful of tries)
        ok("image", "load", oci_layout(tmp_path / f"i{i}", [tar_bytes([("f", "f", str(i).encode())])]),
           "--tag", f"im:{i}", pool=pool)
        rows = json.loads(ok("image", "ls", "--json", pool=pool))
        ids = [r["id"][7:] for r in rows]
        firsts = [x[0] for x in ids]
        dup = next((c for c in firsts if firsts.count(c) > 1), None)
        if dup is not None:
            break
        i += 1
    msg = fails("container", "create", dup, pool=pool)
    assert "ambiguous" in msg or "matches" in msg, msg
    assert "no such image" in fails("container", "create", "sha256:", pool=pool)
    assert "no such image" in fails("image", "rm", "", pool=pool)
