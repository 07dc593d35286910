"""Helpers for the ext2 tests: sparse image files and the real e2fsprogs (e2fsck, debugfs, mkfs.ext2)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import need_tool, run_tool

MKFS_OPTS = ["-q", "-F", "-b", "4096", "-O", "none,filetype", "-I", "128", "-m", "0"]


def sparse_image(path: Path, size: int) -> Path:
    """A sparse image file of ``size`` bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def e2fsck(image: Path) -> str:
    """Run ``e2fsck -fn`` and assert it exits 0 (clean); returns its output."""
    need_tool("e2fsck")
    r = run_tool("e2fsck", "-fn", str(image), check=False)
    assert r.returncode == 0, f"e2fsck -fn exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def debugfs(image: Path, request: str) -> str:
    need_tool("debugfs")
    r = run_tool("debugfs", "-R", request, str(image), check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


def debugfs_bytes(image: Path, request: str) -> bytes:
    """``debugfs -R request`` with stdout as raw bytes (for ``cat``)."""
    import subprocess
    need_tool("debugfs")
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    r = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, env=env, check=True)
    return r.stdout


def debugfs_cat(image: Path, path: str) -> bytes:
    return debugfs_bytes(image, f"cat \"{path}\"")


def debugfs_dump(image: Path, path: str, out: Path) -> bytes:
    debugfs(image, f"dump \"{path}\" {out}")
    return out.read_bytes()


_LS_LINE = re.compile(r"^\s*(\d+)\s+(\d+)\s+\((\d+)\)\s+(\d+)\s+(\d+)\s+(\d+)\s+\S+\s+\S+\s(.*)$")


def debugfs_ls(image: Path, path: str) -> dict[str, tuple[int, int, int]]:
    """``debugfs -R 'ls -l PATH'`` as {name: (inode, mode, size)}, without '.' and '..'."""
    out = debugfs(image, f"ls -l \"{path}\"")
    entries: dict[str, tuple[int, int, int]] = {}
    for line in out.splitlines():
        m = _LS_LINE.match(line)
        if not m:
            continue
        ino, mode, _, _, _, size, name = m.groups()
        if name in (".", ".."):
            continue
        entries[_unescape(name)] = (int(ino), int(mode, 8), int(size))
    return entries


def _unescape(name: str) -> str:
    """debugfs prints bytes >= 0x80 of a name as ``\\xNN``; turn them back into the UTF-8 name."""
    raw = re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), name)
    return raw.encode("latin-1").decode("utf-8", "surrogateescape")


def mkfs_ext2(image: Path, *extra: str) -> None:
    need_tool("mkfs.ext2")
    run_tool("mkfs.ext2", *MKFS_OPTS, *extra, str(image))


def dumpe2fs_header(image: Path) -> dict[str, str]:
    need_tool("dumpe2fs")
    r = run_tool("dumpe2fs", "-h", str(image), check=False)
    out = {}
    for line in r.stdout.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def export_thin(pool_dir: Path, dev_id: int, image: Path) -> Path:
    """Copy thin device ``dev_id`` of the pool at ``pool_dir`` into a sparse image file (for e2fsck / debugfs)."""
    from thinpool.pool import Pool

    with Pool.open(pool_dir, readonly=True) as p:
        dev = p.device(dev_id)
        with open(image, "wb") as f:
            f.truncate(dev.size)
            for off, n in dev.mapped_ranges():
                f.seek(off)
                f.write(dev.read(off, n))
    return image
