"""Helpers for the driver tests: trees of host directories and tars as comparable records, images built with umoci."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat as S
import struct
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from conftest import need_tool, run_tool
from oracles import assert_thin_check

from thinpool_cli.main import cli

BASE_SIZE = "256M"

# moby's initlayer paths (daemon/initlayer/setup_unix.go) and the parents whose mtimes the init layer changes
INIT_PATHS = {"/.dockerenv", "/etc/resolv.conf", "/etc/hosts", "/etc/hostname", "/dev/console", "/etc/mtab",
              "/dev/pts", "/dev/shm", "/proc", "/sys", "/dev", "/etc"}

# a valid VFS_CAP_REVISION_2 security.capability value (cap_net_raw permitted+effective)
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def _kind(mode: int) -> str:
    return {S.S_IFREG: "file", S.S_IFDIR: "dir", S.S_IFLNK: "symlink", S.S_IFIFO: "fifo", S.S_IFCHR: "char",
            S.S_IFBLK: "block", S.S_IFSOCK: "socket"}[S.S_IFMT(mode)]


def dir_tree(root: str | Path) -> dict[str, dict[str, Any]]:
    """Every entry below ``root`` (not root): type, mode, uid, gid, size, sha256, link target, xattrs, mtime
    (seconds), rdev, and the hard-link group (the smallest path of the inode)."""
    root = str(root)
    out: dict[str, dict[str, Any]] = {}
    by_ino: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = "/" + os.path.relpath(p, root)
            st = os.lstat(p)
            rec: dict[str, Any] = {"type": _kind(st.st_mode), "mode": S.S_IMODE(st.st_mode), "uid": st.st_uid,
                                   "gid": st.st_gid, "mtime": int(st.st_mtime)}
            if S.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    rec["sha256"] = hashlib.sha256(f.read()).hexdigest()
                rec["size"] = st.st_size
                if st.st_nlink > 1:
                    by_ino.setdefault(st.st_ino, []).append(rel)
            if S.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(p)
            if S.S_ISCHR(st.st_mode) or S.S_ISBLK(st.st_mode):
                rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            rec["xattrs"] = {k: os.getxattr(p, k, follow_symlinks=False)
                             for k in sorted(os.listxattr(p, follow_symlinks=False))}
            out[rel] = rec
    for paths in by_ino.values():
        for p in paths:
            out[p]["link_group"] = min(paths)
    return out


def tar_tree(path: str | Path) -> dict[str, dict[str, Any]]:
    """The same records from a flat tar (``docker export``); a hard link takes its target's record."""
    out: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = {}
    with tarfile.open(path) as tf:
        for ti in tf:
            rel = "/" + ti.name.rstrip("/").removeprefix("./")
            if rel == "/" or rel == "/.":
                continue
            if ti.islnk():
                target = "/" + ti.linkname.removeprefix("./")
                out[rel] = dict(out[target])
                groups.setdefault(target, [target]).append(rel)
                continue
            kind = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir",
                    tarfile.SYMTYPE: "symlink", tarfile.FIFOTYPE: "fifo", tarfile.CHRTYPE: "char",
                    tarfile.BLKTYPE: "block"}[ti.type]
            rec: dict[str, Any] = {"type": kind, "mode": ti.mode & 0o7777, "uid": ti.uid, "gid": ti.gid,
                                   "mtime": int(ti.mtime)}
            if kind == "file":
                f = tf.extractfile(ti)
                assert f is not None
                rec["sha256"] = hashlib.sha256(f.read()).hexdigest()
                rec["size"] = ti.size
            if kind == "symlink":
                rec["target"] = ti.linkname
            if kind in ("char", "block"):
                rec["rdev"] = (ti.devmajor, ti.devminor)
            rec["xattrs"] = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                             for k, v in sorted(ti.pax_headers.items()) if k.startswith("SCHILY.xattr.")}
            out[rel] = rec
    for paths in groups.values():
        for p in paths:
            out[p]["link_group"] = min(paths)
    return out


def differences(got: dict[str, dict[str, Any]], want: dict[str, dict[str, Any]], *,
                ignore: set[str] = frozenset(), no_mtime: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """Entry-by-entry differences (empty when equal)."""
    out = []
    for p in sorted(set(got) | set(want)):
        if p in ignore:
            continue
        if p not in got:
            out.append(f"missing {p}: {want[p]}")
        elif p not in want:
            out.append(f"extra {p}: {got[p]}")
        else:
            g, w = dict(got[p]), dict(want[p])
            if p in no_mtime:
                g.pop("mtime"), w.pop("mtime")
            if g != w:
                out.append(f"differs {p}: got {g} want {w}")
    return out


def umoci(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_tool("umoci", *[str(a) for a in args], cwd=cwd)


def write_files(root: Path, spec: dict[str, Any]) -> None:
    """Create entries under ``root``: path -> bytes (file), ("dir", mode), ("link", target), ("hard", src),
    ("fifo",), ("char"|"block", major, minor); then ("attrs", path, mode, uid, gid, mtime, xattrs) tuples."""
    for rel, v in spec.items():
        p = root / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(v, bytes):
            p.write_bytes(v)
        elif v[0] == "dir":
            p.mkdir(exist_ok=True)
            os.chmod(p, v[1])
        elif v[0] == "link":
            os.symlink(v[1], p)
        elif v[0] == "hard":
            os.link(root / v[1].lstrip("/"), p)
        elif v[0] == "fifo":
            os.mkfifo(p)
        elif v[0] in ("char", "block"):
            os.mknod(p, 0o640 | (S.S_IFCHR if v[0] == "char" else S.S_IFBLK), os.makedev(v[1], v[2]))


def set_attrs(p: Path, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
              mtime: int | None = None, xattrs: dict[str, bytes] | None = None) -> None:
    if uid is not None or gid is not None:
        os.lchown(p, -1 if uid is None else uid, -1 if gid is None else gid)
    if mode is not None:
        os.chmod(p, mode)
    for k, v in (xattrs or {}).items():
        os.setxattr(p, k, v, follow_symlinks=False)
    if mtime is not None:
        os.utime(p, (mtime, mtime), follow_symlinks=False)


def repack(layout: Path, tag: str, bundle: Path) -> None:
    umoci("repack", "--image", f"{layout}:{tag}", bundle)


def unpack(layout: Path, tag: str, bundle: Path) -> Path:
    umoci("unpack", "--image", f"{layout}:{tag}", bundle)
    return bundle / "rootfs"


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
    set_attrs(root / "x/file", mode=0o600,
              xattrs={"user.a": b"1", "trusted.b": b"two", "security.capability": CAPABILITY})
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


def build_image(w: Path) -> Path:
    """The umoci layout ``w/img`` with tags ``v2`` (layers 1-2) and ``t`` (1-2, an opaque dir, a whiteout)."""
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


def tp(*args: object, pool: Path | None = None) -> str:
    env = {"THINPOOL_POOL": str(pool) if pool else None}
    r = CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)
    assert r.exit_code == 0, f"thinpool {' '.join(map(str, args))}: exit {r.exit_code}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def make_pool(path: Path) -> Path:
    tp("pool", "create", path, "--size", "1G")
    tp("driver", "init", "--base-size", BASE_SIZE, pool=path)
    return path


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


def data_used(pool: Path) -> int:
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
    assert_thin_check(pool / "metadata")
    tp("check", pool)  # and thinpool's own checker (stricter: leaks, time hazards)


# --- tar and OCI layout builders -------------------------------------------------------------------------------
def tar_bytes(entries: list[tuple]) -> bytes:
    """(name, kind, extra...) -> an uncompressed tar: ("f", name, data, mode, mtime), ("d", name, mode, mtime),
    ("l", name, target) symlink, ("h", name, target) hard link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tw:
        for e in entries:
            kind, name = e[0], e[1]
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_500_000_000
            if kind == "f":
                data = e[2]
                ti.size = len(data)
                ti.mode = e[3] if len(e) > 3 else 0o644
                ti.mtime = e[4] if len(e) > 4 else ti.mtime
                tw.addfile(ti, io.BytesIO(data))
                continue
            if kind == "d":
                ti.type = tarfile.DIRTYPE
                ti.mode = e[2] if len(e) > 2 else 0o755
                ti.mtime = e[3] if len(e) > 3 else ti.mtime
            elif kind == "l":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, e[2], 0o777
            elif kind == "h":
                ti.type, ti.linkname, ti.mode = tarfile.LNKTYPE, e[2], 0o644
            tw.addfile(ti)
    return buf.getvalue()


def oci_layout(d: Path, layers: list[bytes], tag: str = "latest", *, gzip_layers: bool = True,
               diff_ids: list[str] | None = None) -> Path:
    blobs = d / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (d / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(b: bytes) -> str:
        h = hashlib.sha256(b).hexdigest()
        (blobs / h).write_bytes(b)
        return "sha256:" + h

    descs = []
    for raw in layers:
        blob = gzip.compress(raw, mtime=0) if gzip_layers else raw
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gzip_layers else ""),
                      "digest": put(blob), "size": len(blob)})
    ids = diff_ids or ["sha256:" + hashlib.sha256(raw).hexdigest() for raw in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": ids}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": put(config), "size": len(config)}, "layers": descs}).encode()
    (d / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest), "size": len(manifest),
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return d
