"""Helpers for the driver tests: trees of host directories and tars as comparable records, images built with umoci."""

from __future__ import annotations

import hashlib
import os
import stat as S
import struct
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from conftest import run_tool

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
