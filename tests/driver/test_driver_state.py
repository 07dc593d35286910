"""The driver's records and moby's transaction protocol, info, min free space, and the CLI's refusals."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import need_tool, run_tool
from driver_helpers import oci_layout, tar_bytes
from oracles import assert_thin_check

from thinpool.driver import DeviceSet, Driver
from thinpool.driver.state import human_size
from thinpool.pool import Pool
from thinpool_cli.main import cli


def run(*args: object, pool: Path | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env={"THINPOOL_POOL": str(pool) if pool else None},
                              catch_exceptions=False)


def ok(*args: object, pool: Path | None = None) -> str:
    r = run(*args, pool=pool)
    assert r.exit_code == 0, f"exit {r.exit_code}: {r.stdout} {r.stderr}"
    return r.stdout


def fails(code: int, *args: object, pool: Path | None = None) -> str:
    r = run(*args, pool=pool)
    assert r.exit_code == code, f"exit {r.exit_code} != {code}: {r.stdout} {r.stderr}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("thinpool: error: "), r.stderr
    return lines[0]


def fingerprint(pool: Path) -> dict[str, str]:
    out = {}
    for p in sorted(pool.rglob("*")):
        if p.is_file() and p.name != "lock":
            out[str(p.relative_to(pool))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    p = tmp_path / "pool"
    ok("pool", "create", p, "--size", "256M")
    ok("driver", "init", "--base-size", "64M", pool=p)
    return p


def rootfs_of(pool: Path, ref: str) -> dict[str, tuple]:
    """path -> (kind, mode, mtime, content or link target) of an image's top layer rootfs."""
    import stat as S

    from thinpool.driver.rootfs import ROOTFS, walk
    from thinpool.driver.store import mounted

    with Pool.open(pool, readonly=True) as p:
        d = Driver(DeviceSet.open(p))
        top = d.images.top_layer(d.images.resolve(ref))
        with mounted(d.ds, d.images.device_hash(top), write=False) as fs:
            out = {}
            for path, st in walk(fs, ROOTFS):
                rel = path[len(ROOTFS):]
                if S.S_ISREG(st.mode):
                    v: object = fs.read_file(path)
                elif S.S_ISLNK(st.mode):
                    v = fs.readlink(path)
                else:
                    v = None
                out[rel] = ("dir" if S.S_ISDIR(st.mode) else "file" if S.S_ISREG(st.mode) else "other",
                            S.S_IMODE(st.mode), st.mtime, v, st.ino)
            return out


# --- records and transactions ----------------------------------------------------------------------------------
def test_init_writes_mobys_records(pool: Path) -> None:
    md = pool / "driver" / "metadata"
    base = json.loads((md / "base").read_text())
    assert list(base) == ["device_id", "size", "transaction_id", "initialized", "deleted"]
    assert base["size"] == 64 << 20 and base["initialized"] is True and base["deleted"] is False
    ds = json.loads((md / "deviceset-metadata").read_text())
    assert list(ds) == ["next_device_id", "BaseDeviceUUID", "BaseDeviceFilesystem"]
    assert ds["BaseDeviceFilesystem"] == "ext2" and len(ds["BaseDeviceUUID"]) == 36
    tx = json.loads((md / "transaction-metadata").read_text())
    assert list(tx) == ["open_transaction_id", "device_hash", "device_id"]
    with Pool.open(pool, readonly=True) as p:
        assert p.md.trans_id == tx["open_transaction_id"] == base["transaction_id"]
        assert p.device_name(base["device_id"]) == "base"
    assert not [f for f in md.iterdir() if f.name.startswith(".tmp")]
    fails(1, "driver", "init", pool=pool)  # once only


@pytest.mark.external
def test_interrupted_create_is_rolled_back_at_the_next_open(pool: Path) -> None:
    with Pool.open(pool) as p:
        ds = DeviceSet.open(p)
        dev_id = ds._next_free_device_id()
        ds._open_transaction("cafe", dev_id)
        ds._dm_create(dev_id, ds.get("").device_id, "cafe", ds.get("").size)  # the dm message is committed
        ds._save_info(__import__("thinpool.driver.state", fromlist=["DevInfo"]).DevInfo(
            "cafe", dev_id, ds.get("").size, ds.open_transaction_id))
        p.crash_close()  # no set_transaction_id: the transaction stays open
    with Pool.open(pool) as p:
        assert dev_id in p.md.devices
        before = p.md.trans_id
    with Pool.open(pool) as p:
        ds = DeviceSet.open(p)  # processPendingTransaction
        assert dev_id not in p.md.devices and ds.lookup("cafe") is None
        assert not (pool / "driver" / "metadata" / "cafe").exists()
        assert p.md.trans_id == before == ds.open_transaction_id
    need_tool("thin_check")
    assert_thin_check(str(pool / "metadata"))


def test_interrupted_delete_is_finished_at_the_next_open(pool: Path, tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "img", [tar_bytes([("f", "a", b"x")])])
    ok("image", "load", layout, pool=pool)
    ok("container", "create", "img:latest", "--name", "cc", pool=pool)
    with Pool.open(pool) as p:
        ds = DeviceSet.open(p)
        info = ds.get("cc")
        ds._open_transaction("cc", info.device_id)
        ds._dm_delete(info.device_id)
        p.crash_close()
    with Pool.open(pool) as p:
        ds = DeviceSet.open(p)
        assert info.device_id not in p.md.devices and ds.lookup("cc") is None
        assert p.md.trans_id == ds.open_transaction_id


def test_min_free_space_refuses_new_layers_and_changes_nothing(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    ok("pool", "create", pool, "--size", "64M")
    ok("driver", "init", "--base-size", "32M", "--min-free-space", "50%", pool=pool)
    ok("image", "load", oci_layout(tmp_path / "first", [tar_bytes([("f", "a", b"x")])]), pool=pool)
    ok("thin", "create", "99", "--size", "40M", "--name", "filler", pool=pool)
    (tmp_path / "junk").write_bytes(os.urandom(36 << 20))
    ok("thin", "write", "filler", tmp_path / "junk", pool=pool)
    layout = oci_layout(tmp_path / "img", [tar_bytes([("f", "b", b"y")])])
    before = fingerprint(pool)
    msg = fails(3, "image", "load", layout, pool=pool)
    assert "free data blocks which is less than minimum required 512 free data blocks" in msg
    assert "less than minimum required" in fails(3, "container", "create", "first", "--name", "cc", pool=pool)
    assert fingerprint(pool) == before


def test_info_fields_and_go_units(pool: Path) -> None:
    assert [human_size(n) for n in (0, 999, 1000, 65536, 10 << 30, 107374182400)] == \
        ["0B", "999B", "1kB", "65.54kB", "10.74GB", "107.4GB"]
    info = json.loads(ok("driver", "info", "--json", pool=pool))
    assert list(info) == ["Storage Driver", "Pool Name", "Pool Blocksize", "Base Device Size", "Backing Filesystem",
                          "Udev Sync Supported", "Data file", "Metadata file", "Data loop file",
                          "Metadata loop file", "Data Space Used", "Data Space Total", "Data Space Available",
                          "Metadata Space Used", "Metadata Space Total", "Metadata Space Available",
                          "Thin Pool Minimum Free Space", "Deferred Removal Enabled", "Deferred Deletion Enabled",
                          "Deferred Deleted Device Count", "Library Version"]
    st = os.stat(pool)
    assert info["Pool Name"] == f"docker-{os.major(st.st_dev)}:{os.minor(st.st_dev)}-{st.st_ino}-pool"
    assert info["Pool Blocksize"] == "65.54kB" and info["Base Device Size"] == "67.11MB"
    assert info["Data Space Total"] == "268.4MB" and info["Thin Pool Minimum Free Space"] == "26.8MB"
    text = ok("driver", "info", pool=pool)
    assert text.splitlines()[:2] == ["Storage Driver: devicemapper", f" Pool Name: {info['Pool Name']}"]


def test_available_is_capped_by_the_host_filesystem(tmp_path: Path) -> None:
    pool = tmp_path / "big"
    ok("pool", "create", pool, "--size", "10T", "--chunk-size", "1G")
    ok("driver", "init", "--base-size", "64M", pool=pool)

    def host_free() -> int:
        vfs = os.statvfs(pool)
        return vfs.f_bavail * vfs.f_frsize

    # the host filesystem is shared (other processes write and delete meanwhile): the host's free space is taken
    # just before and just after the command, which is asked again until the host held still meanwhile
    for _ in range(50):
        before = host_free()
        info = json.loads(ok("driver", "info", "--json", pool=pool))
        after = host_free()
        if abs(after - before) <= before // 1000:
            break
    assert info["Data Space Total"] == "11TB" and info["Pool Blocksize"] == "1.074GB"
    value = float(info["Data Space Available"].rstrip("kMGTPB"))
    scale = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[info["Data Space Available"][-2]]
    # the host's free space, as go-units prints it (4 significant digits: within 0.05 %)
    assert min(before, after) * 0.9995 <= value * scale <= max(before, after) * 1.0005, (info, before, after)


def test_refusals_are_one_line_errors(pool: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    ok("pool", "create", bare, "--size", "64M")
    assert "run thinpool driver init" in fails(1, "driver", "info", pool=bare)
    assert "no such file or directory" in fails(1, "image", "load", tmp_path / "nope", pool=pool)
    assert "no such image: ghost" in fails(1, "container", "create", "ghost", pool=pool)
    layout = oci_layout(tmp_path / "img", [tar_bytes([("f", "a", b"x")])])
    assert "no image tagged 'v9'" in fails(1, "image", "load", f"{layout}:v9", pool=pool)
    ok("image", "load", layout, pool=pool)
    image_id = json.loads(ok("image", "ls", "--json", pool=pool))[0]["id"]
    ok("container", "create", image_id[7:15], "--name", "c1", pool=pool)  # a unique id prefix names the image
    assert json.loads(ok("container", "ls", "--json", pool=pool))[0]["image"] == image_id[7:15]
    assert "already in use" in fails(1, "container", "create", "img", "--name", "c1", pool=pool)
    assert "invalid container name" in fails(1, "container", "create", "img", "--name", "-x", pool=pool)
    assert "used by container c1" in fails(1, "image", "rm", "img", pool=pool)
    assert "no such container: zz" in fails(1, "container", "diff", "zz", pool=pool)
    before = fingerprint(pool)
    devices_before = json.loads((pool / "pool.json").read_text())["devices"]
    bad = oci_layout(tmp_path / "bad", [tar_bytes([("f", "b", b"y")])], diff_ids=["sha256:" + "0" * 64])
    assert "the config says sha256:000" in fails(1, "image", "load", bad, pool=pool)
    after = fingerprint(pool)
    # only the transaction ids move (moby's protocol spends two on the create and its undo) and moby's
    # next_device_id; every other file is unchanged, and the pool's device table too
    moved = {"driver/metadata/deviceset-metadata", "driver/metadata/transaction-metadata", "metadata", "data",
             "pool.json"}
    assert {k: v for k, v in after.items() if k not in moved} == {k: v for k, v in before.items() if k not in moved}
    assert json.loads((pool / "pool.json").read_text())["devices"] == devices_before
    with Pool.open(pool, readonly=True) as p:
        names = {p.device_label(i) for i in p.list_devices()}
    layer = names - {"base", "c1", "c1-init"}  # base, the image's one layer, c1-init, c1: the refused one is gone
    assert len(names) == 4 and len(layer) == 1 and len(layer.pop()) == 64
    # a bare number names a device id in thinpool (thinpool fs 12 ...): no container may take one as its name
    assert "takes a number for a device id" in fails(1, "container", "create", "img", "--name", "12", pool=pool)


def test_zstd_without_zstandard_is_a_clear_error(pool: Path, tmp_path: Path, monkeypatch) -> None:
    zstandard = pytest.importorskip("zstandard")
    raw = tar_bytes([("f", "a", b"x")])
    layout = oci_layout(tmp_path / "img", [raw], gzip_layers=False)
    blob = next(p for p in (layout / "blobs/sha256").iterdir() if p.read_bytes() == raw)
    z = zstandard.ZstdCompressor().compress(raw)
    blob.unlink()
    (blob.parent / hashlib.sha256(z).hexdigest()).write_bytes(z)
    index = (layout / "blobs/sha256")
    for p in index.iterdir():
        if b'"layers": [' in p.read_bytes():
            m = json.loads(p.read_bytes())
            m["layers"][0]["digest"] = "sha256:" + hashlib.sha256(z).hexdigest()
            m["layers"][0]["size"] = len(z)
            new = json.dumps(m).encode()
            (index / hashlib.sha256(new).hexdigest()).write_bytes(new)
            idx = json.loads((layout / "index.json").read_text())
            idx["manifests"][0]["digest"] = "sha256:" + hashlib.sha256(new).hexdigest()
            idx["manifests"][0]["size"] = len(new)
            (layout / "index.json").write_text(json.dumps(idx))
    monkeypatch.setitem(sys.modules, "zstandard", None)
    assert "pip install zstandard" in fails(1, "image", "load", layout, pool=pool)
    monkeypatch.undo()
    assert ok("image", "load", layout, pool=pool).strip() == "Loaded image: img:latest"


# --- UnpackLayer rules on hand-made layers ---------------------------------------------------------------------
def test_unpack_layer_rules(pool: Path, tmp_path: Path) -> None:
    l1 = tar_bytes([("d", "./", 0o755), ("d", "dir", 0o755), ("f", "dir/a", b"a"), ("f", "dir/b", b"b"),
                    ("d", "dir/sub", 0o700), ("f", "dir/sub/c", b"c"), ("f", "file", b"file"),
                    ("d", "todir", 0o755), ("f", "todir/x", b"x"), ("f", "replaced", b"old", 0o600),
                    ("d", "merge", 0o700, 1_400_000_000), ("f", "merge/kept", b"kept")])
    l2 = tar_bytes([("f", "dir/.wh..wh..opq", b""), ("f", "dir/b", b"new b"),     # opaque: only b survives
                    ("f", ".wh.file", b""),                                            # whiteout
                    ("f", "todir", b"now a file"),                                     # dir replaced by a file
                    ("f", "replaced", b"new", 0o644, 1_450_000_000),                   # file replaced
                    ("d", "merge", 0o755, 1_410_000_000),                              # dir over dir: attributes
                    ("f", "merge/new", b"new"),                                        # dir mtime set last
                    ("f", "missing/parent/f", b"p"),                                   # parents made 0755
                    ("f", ".wh..wh.plnk/123", b"link target"),                         # aufs hard-link dir
                    ("h", "linked1", ".wh..wh.plnk/123"), ("h", "linked2", ".wh..wh.plnk/123"),
                    ("f", "h1", b"shared"), ("h", "h2", "h1"), ("l", "sym", "/dir/b")])
    layout = oci_layout(tmp_path / "img", [l1, l2])
    ok("image", "load", layout, pool=pool)
    got = rootfs_of(pool, "img")
    assert sorted(k for k in got if k.startswith("/dir")) == ["/dir", "/dir/b"]
    assert got["/dir/b"][3] == b"new b"
    assert "/file" not in got and got["/todir"][:2] == ("file", 0o644) and got["/todir"][3] == b"now a file"
    assert got["/replaced"][1:4] == (0o644, 1_450_000_000, b"new")
    assert got["/merge"][:3] == ("dir", 0o755, 1_410_000_000) and got["/merge/kept"][3] == b"kept"
    assert got["/missing"][:2] == ("dir", 0o755) and got["/missing/parent/f"][3] == b"p"
    # moby makes the parent of every entry before it skips .wh..wh.* names: an empty /.wh..wh.plnk stays
    assert [k for k in got if k.startswith("/.wh.")] == ["/.wh..wh.plnk"] and got["/.wh..wh.plnk"][0] == "dir"
    assert got["/linked1"][3] == got["/linked2"][3] == b"link target"
    assert got["/linked1"][4] != got["/linked2"][4]  # copies of the plnk file, as moby makes them
    assert got["/h1"][4] == got["/h2"][4]
    assert got["/sym"][3] == "/dir/b"
    # save rebuilds both layers byte for byte: the DiffIDs (and the image id) do not change
    image_id = json.loads(ok("image", "ls", "--json", pool=pool))[0]["id"]
    out = tmp_path / "saved"
    assert ok("image", "save", "img", out, pool=pool).strip() == image_id
    blobs = {p.name for p in (out / "blobs/sha256").iterdir()}
    assert {hashlib.sha256(raw).hexdigest() for raw in (l1, l2)} <= blobs


def test_devices_a_crash_left_behind_go_at_the_next_writable_open(pool: Path, tmp_path: Path) -> None:
    ok("image", "load", oci_layout(tmp_path / "img", [tar_bytes([("f", "a", b"x")])]), pool=pool)
    with Pool.open(pool) as p:
        ds = DeviceSet.open(p)
        ds.add_device("f" * 64, "", "f" * 64)  # a layer whose load was cut short: no layerdb record
        (pool / "driver/image/layerdb/sha256" / ("e" * 64)).mkdir()
        p.crash_close()
    with Pool.open(pool, readonly=True) as p:
        assert len(p.md.devices) == 3
        Driver(DeviceSet.open(p))  # read-only: nothing is touched
        assert len(p.md.devices) == 3
    with Pool.open(pool) as p:
        d = Driver(DeviceSet.open(p))
        assert len(p.md.devices) == 2 and d.ds.lookup("f" * 64) is None
    assert not (pool / "driver/image/layerdb/sha256" / ("e" * 64)).exists()
    assert ok("image", "ls", "--json", pool=pool).count('"id"') == 1


def test_a_multi_platform_index_loads_this_machines_image(pool: Path, tmp_path: Path) -> None:
    import platform as pf

    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(pf.machine(), pf.machine())
    mine = oci_layout(tmp_path / "mine", [tar_bytes([("f", "mine", b"m")])])
    other = oci_layout(tmp_path / "other", [tar_bytes([("f", "other", b"o")])])
    for d in (mine, other):  # one layout with both manifests behind an image index
        for b in (d / "blobs/sha256").iterdir():
            (mine / "blobs/sha256" / b.name).write_bytes(b.read_bytes())
    descs = []
    for d, a in ((other, "s390x" if arch != "s390x" else "amd64"), (mine, arch)):
        m = json.loads((d / "index.json").read_text())["manifests"][0]
        m.pop("annotations")
        descs.append(dict(m, platform={"os": "linux", "architecture": a}))
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": descs}).encode()
    digest = hashlib.sha256(index).hexdigest()
    (mine / "blobs/sha256" / digest).write_bytes(index)
    (mine / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": "sha256:" + digest,
         "size": len(index), "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}))
    assert ok("image", "load", mine, pool=pool).splitlines() == ["Loaded image: mine:multi"]
    assert set(rootfs_of(pool, "mine:multi")) == {"/mine"}


def test_a_socket_is_a_change_but_no_tar_can_hold_it(pool: Path, tmp_path: Path) -> None:
    import stat as S

    from thinpool.driver.store import mounted

    ok("image", "load", oci_layout(tmp_path / "img", [tar_bytes([("f", "a", b"x")])]), pool=pool)
    ok("container", "create", "img", "--name", "cc", pool=pool)
    with Pool.open(pool) as p:
        with mounted(DeviceSet.open(p), "cc", write=True) as fs:
            fs.mknod("/rootfs/sock", S.S_IFSOCK | 0o755)
    assert ok("container", "diff", "cc", pool=pool).splitlines() == ["A /sock"]
    ok("container", "export", "cc", tmp_path / "cc.tar", pool=pool)
    with tarfile.open(tmp_path / "cc.tar") as t:
        assert "sock" not in t.getnames() and "a" in t.getnames()
    ok("container", "commit", "cc", "img:2", pool=pool)  # moby's addTarFile skips sockets too
    ok("container", "create", "img:2", "--name", "c2", pool=pool)
    assert ok("fs", "ls", "c2", "/rootfs", pool=pool).split().count("sock") == 0


def test_an_image_without_layers_and_cp_refusals(pool: Path, tmp_path: Path) -> None:
    ok("image", "load", oci_layout(tmp_path / "img", [], tag="empty"), pool=pool)
    cid = ok("container", "create", "img:empty", pool=pool).strip()
    name = f"c-{cid[:12]}"  # a container without --name gets one from its id
    assert json.loads(ok("container", "ls", "--json", pool=pool))[0]["name"] == name
    (tmp_path / "f").write_bytes(b"data")
    assert "no such directory" in fails(1, "container", "cp", tmp_path / "f", f"{name}:/nodir/x", pool=pool)
    assert "no such file or directory" in fails(1, "container", "cp", tmp_path / "nope", f"{name}:/", pool=pool)
    ok("container", "cp", tmp_path / "f", f"{name}:/", pool=pool)
    assert ok("container", "diff", name, pool=pool).splitlines() == ["A /f"]
    ok("container", "commit", name, "img:one", pool=pool)
    rows = {r["tag"]: r for r in json.loads(ok("image", "ls", "--json", pool=pool))}
    assert rows["empty"]["layers"] == 0 and rows["one"]["layers"] == 1
    assert run("container", "cp", tmp_path / "f", tmp_path / "g", pool=pool).exit_code == 2  # no NAME:PATH
