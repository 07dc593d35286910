"""The storage drivers of the lab: thinpool-devicemapper, kernel overlayfs, btrfs, vfs and an aufs-like union.

Layer: tooling (thinpool_bench). May import: everything in thinpool.

Every driver offers the same few verbs, moby's graphdriver in miniature: ``import_layers`` (each layer on top of
its parent), ``create_container`` (an ``-init`` layer with moby's initlayer entries, then the rw layer, as the
daemon does for every driver), ``delete_container``, a ``view`` of a container (file operations), ``usage`` (host
space and counters) and ``page_cache`` (read one file in N containers through the kernel, then sum the resident
bytes of what holds it). ``teardown`` unmounts, detaches loops and removes everything, also after a failure.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thinpool_bench.lab import image as I
from thinpool_bench.lab.image import Op, Tree

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096


def run(cmd: list[str], **kw: Any) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def _inodes(path: Path) -> dict[tuple[int, int], int]:
    """Every inode under ``path`` on its own filesystem (mount points below are not entered, as ``du -x``),
    with its allocated bytes."""
    dev = os.lstat(path).st_dev
    seen: dict[tuple[int, int], int] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        st = os.lstat(dirpath)
        seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
        keep = []
        for name in dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_dev == dev:
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return seen


def du_bytes(path: Path) -> int:
    """Allocated bytes under ``path`` (st_blocks; each inode counted once, one filesystem, as ``du -x``)."""
    if path.is_file():
        return os.stat(path).st_blocks * 512
    return sum(_inodes(path).values())


def count_inodes(path: Path) -> int:
    """Distinct inodes under ``path`` on the host filesystem (what statvfs's f_files - f_ffree grows by)."""
    return len(_inodes(path))


def fincore(paths: list[str]) -> dict[str, int]:
    """Resident page-cache bytes of each path (util-linux ``fincore``)."""
    if not paths:
        return {}
    out = run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,FILE", *paths])
    res = {}
    for line in out.splitlines():
        n, _, name = line.partition(" ")
        res[name] = int(n)
    return res


def drop_cache(path: str) -> None:
    """Write back and drop one file's clean pages (posix_fadvise DONTNEED): a cold start for that file only."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_pages(path: str) -> Any:
    """Which 4 KiB pages of a file are in the page cache (mincore(2) on a read-only mapping, which faults nothing
    in): a numpy bool array, one entry per page."""
    import ctypes
    import mmap

    import numpy as np

    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        npages = -(-size // PAGE)
        if not size:
            return np.zeros(0, dtype=bool)
        m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        view = np.frombuffer(m, dtype=np.uint8)
        vec = np.zeros(npages, dtype=np.uint8)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size),
                        ctypes.c_void_p(vec.ctypes.data)):
            raise OSError(ctypes.get_errno(), f"mincore {path}")
        del view
        return (vec & 1).astype(bool)
    finally:
        m.close()


def file_block_offsets(path: str) -> list[int]:
    """The byte offset on its block device of each block of a file on a kernel-mounted filesystem (FIBMAP, which
    ext2 answers; root only), 0 for a hole."""
    import fcntl
    import struct

    fibmap = 1
    bsize = os.statvfs(path).f_bsize
    fd = os.open(path, os.O_RDONLY)
    try:
        nblocks = -(-os.fstat(fd).st_size // bsize)
        out = []
        for lblk in range(nblocks):
            phys = struct.unpack("i", fcntl.ioctl(fd, fibmap, struct.pack("i", lblk)))[0]
            out.append(phys * bsize)
        return out
    finally:
        os.close(fd)


def read_all(path: str) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while b := f.read(MiB):
            n += len(b)
    return n


# ---------------------------------------------------------------------------------------------------------------
# container views: the file operations the workloads use
# ---------------------------------------------------------------------------------------------------------------
class HostView:
    """A container whose tree is a host directory (overlayfs merged dir, btrfs snapshot, vfs copy)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _p(self, path: str) -> str:
        return str(self.root / path.lstrip("/"))

    def write_at(self, path: str, offset: int, data: bytes) -> None:
        fd = os.open(self._p(path), os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def rewrite(self, path: str, data: bytes) -> None:
        fd = os.open(self._p(path), os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def appends(self, path: str, piece: bytes, count: int, preallocate: bool,
                mark: Callable[[], None] | None = None) -> float:
        """``count`` appends of ``piece``, each made durable (fsync), to a new or a preallocated file; returns
        the seconds the appends took (the preallocation is not timed; ``mark`` is called when timing starts)."""
        fd = os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if preallocate:
                os.posix_fallocate(fd, 0, len(piece) * count)
                os.fsync(fd)
            if mark:
                mark()
            t0 = time.perf_counter()
            for i in range(count):
                os.pwrite(fd, piece, i * len(piece))
                os.fsync(fd)
            return time.perf_counter() - t0
        finally:
            os.close(fd)

    def read(self, path: str) -> int:
        return read_all(self._p(path))

    def lstat(self, path: str) -> None:
        os.lstat(self._p(path))

    def tree(self) -> tuple[Tree, set[frozenset[str]]]:
        return I.host_tree(self.root)

    def close(self) -> None:
        pass


class Driver:
    """The common shape; subclasses fill in the verbs."""

    name = "?"
    kernel = False  # needs root and a kernel filesystem
    secondary = False  # quick mode leaves the chunk-size-independent workloads to the primary pool

    def __init__(self, workdir: Path) -> None:
        self.root = workdir / self.name
        self._mounts: list[str] = []
        self._loops: list[str] = []

    def unavailable(self) -> str | None:
        if self.kernel and os.geteuid() != 0:
            return "needs root (mounts)"
        return None

    def setup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)

    def import_layers(self, tag: str, layers: list[list[Op]]) -> list[str]:
        raise NotImplementedError

    def create_container(self, cid: str, layer_id: str) -> None:
        raise NotImplementedError

    def delete_container(self, cid: str) -> None:
        raise NotImplementedError

    def view(self, cid: str) -> Any:
        raise NotImplementedError

    def usage(self) -> dict[str, int]:
        return {"space_bytes": du_bytes(self.root), "host_inodes": count_inodes(self.root)}

    def page_cache(self, cids: list[str], path: str) -> dict[str, Any]:
        raise NotImplementedError

    def _mount(self, args: list[str], target: str, cwd: str | None = None) -> None:
        run(["mount", *args, target], cwd=cwd)
        self._mounts.append(target)

    def _umount(self, target: str) -> None:
        run(["umount", target])
        self._mounts.remove(target)

    def teardown(self) -> None:
        for m in reversed(list(self._mounts)):
            subprocess.run(["umount", m], capture_output=True)
            if os.path.ismount(m):
                subprocess.run(["umount", "-l", m], capture_output=True)
        self._mounts.clear()
        for lo in reversed(list(self._loops)):
            subprocess.run(["losetup", "-d", lo], capture_output=True)
        self._loops.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def _attach_loop(file: Path, *, readonly: bool = False) -> str:
    return run(["losetup", "-f", "--show", *(["-r"] if readonly else []), str(file)]).strip()


# ---------------------------------------------------------------------------------------------------------------
# overlayfs (the kernel's)
# ---------------------------------------------------------------------------------------------------------------
class Overlay(Driver):
    """moby's overlay2 shape: each layer a directory of changes, a container = lowerdirs + upper + work."""

    name = "overlayfs"
    kernel = True
    whiteouts = "overlay"  # how layer directories mark deletions: 0/0 char devices (aufs-like: .wh. files)

    def unavailable(self) -> str | None:
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                return "no overlay in /proc/filesystems"
        return super().unavailable()

    def setup(self) -> None:
        super().setup()
        (self.root / "l").mkdir()
        (self.root / "c").mkdir()
        self.chain: dict[str, list[str]] = {}  # layer id -> its lowerdirs (relative to root), top first
        self.parent: dict[str, str] = {}

    def import_layers(self, tag: str, layers: list[list[Op]]) -> list[str]:
        dirs = I.write_layer_dirs(self.root / "l" / tag, layers, self.whiteouts)
        ids: list[str] = []
        below: list[str] = []
        for i, d in enumerate(dirs):
            lid = f"{tag}/L{i}"
            below = [str(d.relative_to(self.root))] + below
            self.chain[lid] = list(below)
            ids.append(lid)
        return ids

    def create_container(self, cid: str, layer_id: str) -> None:
        c = self.root / "c" / cid
        init = c / "i"
        I._write_layer_dir(init, I.init_layer(), self.whiteouts, {})
        for d in ("u", "w", "m"):
            (c / d).mkdir()
        rel = f"c/{cid}"
        lower = ":".join([f"{rel}/i", *self.chain[layer_id]])
        # relative paths keep a 100-layer lowerdir option under one page; mount resolves them from cwd
        self._mount(["-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={rel}/u,workdir={rel}/w"],
                    f"{rel}/m", cwd=str(self.root))
        self._mounts[-1] = str(self.root / rel / "m")
        self.parent[cid] = layer_id

    def delete_container(self, cid: str) -> None:
        c = self.root / "c" / cid
        self._umount(str(c / "m"))
        shutil.rmtree(c)
        del self.parent[cid]

    def view(self, cid: str) -> HostView:
        return HostView(self.root / "c" / cid / "m")

    def page_cache(self, cids: list[str], path: str) -> dict[str, Any]:
        # the real files behind the merged path: the first layer (top down) that has it, plus any copied-up upper
        real: set[str] = set()
        for cid in cids:
            for d in ["c/" + cid + "/u", "c/" + cid + "/i", *self.chain[self.parent[cid]]]:
                candidate = self.root / d / path.lstrip("/")
                if os.path.lexists(candidate):
                    real.add(str(candidate))
                    break
        for f in real:
            drop_cache(f)
        for cid in cids:
            read_all(str(self.view(cid).root / path.lstrip("/")))
        parts = fincore(sorted(real))
        return {"resident_bytes": sum(parts.values()), "files_count": len(parts)}


# ---------------------------------------------------------------------------------------------------------------
# aufs-like: copy-up through a lookup that walks N branches (no aufs module in this kernel)
# ---------------------------------------------------------------------------------------------------------------
class UnionView:
    """aufs's rules done in user space over branch directories (top first): ``.wh.NAME`` hides NAME below,
    ``.wh..wh..opq`` hides a directory's lower contents, a write copies the whole file up to the top branch."""

    def __init__(self, branches: list[Path]) -> None:
        self.branches = branches

    def _resolve(self, path: str) -> tuple[int, Path] | None:
        parts = [p for p in path.split("/") if p]
        cand = list(range(len(self.branches)))  # branches where the current directory exists
        for k, name in enumerate(parts):
            nxt: list[int] = []
            for b in cand:
                d = self.branches[b].joinpath(*parts[:k])
                if os.path.lexists(d / f".wh.{name}"):
                    break
                p = d / name
                if os.path.lexists(p):
                    if k == len(parts) - 1:
                        return b, p
                    if not p.is_dir() or p.is_symlink():
                        return None
                    nxt.append(b)
                    if os.path.lexists(p / ".wh..wh..opq"):
                        break
            if not nxt:
                return None
            cand = nxt
        return (cand[0], self.branches[cand[0]].joinpath(*parts)) if parts else (0, self.branches[0])

    def _copy_up(self, path: str) -> Path:
        found = self._resolve(path)
        assert found is not None, path
        b, p = found
        top = self.branches[0] / path.lstrip("/")
        if b != 0:
            parent = os.path.dirname(path)
            if parent not in ("", "/"):
                top.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, top)  # whole-file copy-up
        return top

    def write_at(self, path: str, offset: int, data: bytes) -> None:
        top = self._copy_up(path)
        fd = os.open(top, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def rewrite(self, path: str, data: bytes) -> None:
        found = self._resolve(path)
        top = self.branches[0] / path.lstrip("/")
        if found and found[0] != 0:
            top.parent.mkdir(parents=True, exist_ok=True)  # O_TRUNC: aufs copies up nothing but the inode
        fd = os.open(top, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def appends(self, path: str, piece: bytes, count: int, preallocate: bool,
                mark: Callable[[], None] | None = None) -> float:
        return HostView(self.branches[0]).appends(path, piece, count, preallocate, mark)

    def read(self, path: str) -> int:
        found = self._resolve(path)
        assert found is not None, path
        return read_all(str(found[1]))

    def lstat(self, path: str) -> None:
        found = self._resolve(path)
        assert found is not None, path
        os.lstat(found[1])

    def tree(self) -> tuple[Tree, set[frozenset[str]]]:
        tree: Tree = {}
        by_ino: dict[tuple[int, int], set[str]] = {}

        def walk(rel: str) -> None:
            names: dict[str, Path] = {}
            hidden: set[str] = set()
            parts = [p for p in rel.split("/") if p]
            for b in self._dir_branches(rel):
                d = self.branches[b].joinpath(*parts)
                for n in os.listdir(d):
                    if n.startswith(".wh."):
                        if n != ".wh..wh..opq":
                            hidden.add(n[4:])
                    elif n not in names and n not in hidden:
                        names[n] = d / n
            for n, p in sorted(names.items()):
                child = (rel.rstrip("/") + "/" + n)
                st = os.lstat(p)
                if stat.S_ISDIR(st.st_mode):
                    tree[child] = I.Entry("dir", stat.S_IMODE(st.st_mode))
                    walk(child)
                else:
                    sub, groups = I.host_tree(p.parent)  # one entry, hashed the same way as host_tree
                    tree[child] = sub["/" + n]
                    if st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
                        by_ino.setdefault((st.st_dev, st.st_ino), set()).add(child)

        tree["/"] = I.Entry("dir", 0o755)
        walk("/")
        return tree, {frozenset(g) for g in by_ino.values() if len(g) > 1}

    def _dir_branches(self, rel: str) -> list[int]:
        parts = [p for p in rel.split("/") if p]
        if not parts:
            out = []
            for b in range(len(self.branches)):
                out.append(b)
                if os.path.lexists(self.branches[b] / ".wh..wh..opq"):
                    break
            return out
        found = self._resolve(rel)
        assert found is not None
        out = []
        for b in range(found[0], len(self.branches)):
            d = self.branches[b].joinpath(*parts)
            if b > found[0] and os.path.lexists(self.branches[b].joinpath(*parts[:-1]) / f".wh.{parts[-1]}"):
                break
            if d.is_dir() and not d.is_symlink():
                out.append(b)
                if os.path.lexists(d / ".wh..wh..opq"):
                    break
        return out

    def close(self) -> None:
        pass


class AufsLike(Overlay):
    """Branches as aufs lays them out (``.wh.`` files), a lookup walking them, whole-file copy-up; no mounts."""

    name = "aufs-like"
    kernel = False
    whiteouts = "aufs"

    def unavailable(self) -> str | None:
        return None

    def create_container(self, cid: str, layer_id: str) -> None:
        c = self.root / "c" / cid
        I._write_layer_dir(c / "i", I.init_layer(), self.whiteouts, {})
        (c / "u").mkdir()
        self.parent[cid] = layer_id

    def delete_container(self, cid: str) -> None:
        shutil.rmtree(self.root / "c" / cid)
        del self.parent[cid]

    def view(self, cid: str) -> UnionView:  # type: ignore[override]
        rel = [f"c/{cid}/u", f"c/{cid}/i", *self.chain[self.parent[cid]]]
        return UnionView([self.root / r for r in rel])

    def page_cache(self, cids: list[str], path: str) -> dict[str, Any]:
        real = set()
        for cid in cids:
            found = self.view(cid)._resolve(path)
            assert found is not None
            real.add(str(found[1]))
        for p in real:
            drop_cache(p)
        for cid in cids:
            self.view(cid).read(path)
        parts = fincore(sorted(real))
        return {"resident_bytes": sum(parts.values()), "files_count": len(parts),
                "note": "user-space union: reads go to the one branch file"}


# ---------------------------------------------------------------------------------------------------------------
# vfs: a full copy per layer
# ---------------------------------------------------------------------------------------------------------------
class _BranchingDriver(Driver):
    """Drivers whose layers and containers are whole trees made from their parent (vfs: a copy; btrfs: a
    snapshot): one layer, or a container's -init and rw trees, each a new branch of the one below."""

    layer_prefix = container_prefix = ""

    def _branch(self, src: str | None, dst: str) -> Path:
        """A new tree ``dst`` made from ``src`` (an empty one when None)."""
        raise NotImplementedError

    def import_layers(self, tag: str, layers: list[list[Op]]) -> list[str]:
        ids: list[str] = []
        for i, layer in enumerate(layers):
            lid = f"{self.layer_prefix}{tag}-L{i}"
            I.apply_layer(I.HostWriter(self._branch(ids[-1] if ids else None, lid)), layer)
            ids.append(lid)
        return ids

    def create_container(self, cid: str, layer_id: str) -> None:
        c = self.container_prefix
        I.apply_layer(I.HostWriter(self._branch(layer_id, f"{c}{cid}-init")), I.init_layer())
        self._branch(f"{c}{cid}-init", f"{c}{cid}")


class Vfs(_BranchingDriver):
    """moby's vfs driver: every layer and container is a full copy of its parent (``cp -a``) plus its changes."""

    name = "vfs"

    def setup(self) -> None:
        super().setup()
        (self.root / "dir").mkdir()

    def _branch(self, src: str | None, dst: str) -> Path:
        d = self.root / "dir" / dst
        if src is None:
            d.mkdir(0o755)
        else:
            run(["cp", "-a", "--reflink=never", str(self.root / "dir" / src), str(d)])
        return d


    def delete_container(self, cid: str) -> None:
        shutil.rmtree(self.root / "dir" / cid)
        shutil.rmtree(self.root / "dir" / f"{cid}-init")

    def view(self, cid: str) -> HostView:
        return HostView(self.root / "dir" / cid)

    def page_cache(self, cids: list[str], path: str) -> dict[str, Any]:
        files = [str(self.root / "dir" / c / path.lstrip("/")) for c in cids]
        for p in files:
            drop_cache(p)
        for p in files:
            read_all(p)
        parts = fincore(files)
        return {"resident_bytes": sum(parts.values()), "files_count": len(parts)}


# ---------------------------------------------------------------------------------------------------------------
# btrfs on a loop file
# ---------------------------------------------------------------------------------------------------------------
class Btrfs(_BranchingDriver):
    """moby's btrfs driver: a subvolume per layer, a snapshot for each child layer and container."""

    name = "btrfs"
    kernel = True

    def __init__(self, workdir: Path, size: int = 8 * GiB) -> None:
        super().__init__(workdir)
        self.size = size

    def unavailable(self) -> str | None:
        with open("/proc/filesystems") as f:
            if "btrfs" not in f.read():
                return "no btrfs in /proc/filesystems"
        if shutil.which("mkfs.btrfs") is None:
            return "mkfs.btrfs not installed"
        return super().unavailable()

    def setup(self) -> None:
        super().setup()
        self.file = self.root / "btrfs.img"
        with open(self.file, "wb") as f:
            f.truncate(self.size)
        self.loop = _attach_loop(self.file)
        self._loops.append(self.loop)
        run(["mkfs.btrfs", "-q", "-f", self.loop])
        self.mnt = self.root / "mnt"
        self.mnt.mkdir()
        self._mount(["-o", "discard", self.loop], str(self.mnt))
        (self.mnt / "l").mkdir()
        (self.mnt / "c").mkdir()

    layer_prefix, container_prefix = "l/", "c/"

    def _branch(self, src: str | None, dst: str) -> Path:
        d = self.mnt / dst
        if src is None:
            run(["btrfs", "subvolume", "create", str(d)])
        else:
            run(["btrfs", "subvolume", "snapshot", str(self.mnt / src), str(d)])
        return d


    def delete_container(self, cid: str) -> None:
        run(["btrfs", "subvolume", "delete", "-C", str(self.mnt / "c" / cid), str(self.mnt / "c" / f"{cid}-init")])

    def view(self, cid: str) -> HostView:
        return HostView(self.mnt / "c" / cid)

    def usage(self) -> dict[str, int]:
        run(["btrfs", "filesystem", "sync", str(self.mnt)])
        fd = os.open(self.file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        sv = os.statvfs(self.mnt)
        return {"space_bytes": os.stat(self.file).st_blocks * 512, "host_inodes": count_inodes(self.root) - 0,
                "fs_used_bytes": (sv.f_blocks - sv.f_bfree) * sv.f_frsize}

    def page_cache(self, cids: list[str], path: str) -> dict[str, Any]:
        files = [str(self.mnt / "c" / c / path.lstrip("/")) for c in cids]
        for p in files:
            drop_cache(p)
        drop_cache(str(self.file))
        for p in files:
            read_all(p)
        parts = fincore(files)
        backing = fincore([str(self.file)])[str(self.file)]
        return {"resident_bytes": sum(parts.values()) + backing, "files_count": len(parts),
                "container_files_bytes": sum(parts.values()), "loop_backing_file_bytes": backing}

    def teardown(self) -> None:
        if getattr(self, "mnt", None) is not None and os.path.ismount(self.mnt):
            subprocess.run(["umount", str(self.mnt)], capture_output=True)
            if str(self.mnt) in self._mounts:
                self._mounts.remove(str(self.mnt))
        super().teardown()


# ---------------------------------------------------------------------------------------------------------------
# thinpool-devicemapper, built on the library (Pool, snapshot chains, the ext2 under /rootfs)
# ---------------------------------------------------------------------------------------------------------------
class ThinWriter:
    """``TreeWriter`` on thinpool's ext2, every path under ``prefix`` (moby's devmapper keeps it in /rootfs)."""

    def __init__(self, fsys: Any, prefix: str = "/rootfs") -> None:
        self.fs = fsys
        self.prefix = prefix

    def _p(self, path: str) -> str:
        return self.prefix + path if path != "/" else self.prefix

    def mkdir(self, path: str, mode: int) -> None:
        self.fs.mkdir(self._p(path), mode)
        self.fs.chmod(self._p(path), mode)

    def write(self, op: Op) -> None:
        with self.fs.open(self._p(op.path), "wb") as f:
            for piece in I.pieces(op):
                f.write(piece)
        self.fs.chmod(self._p(op.path), op.mode)

    def symlink(self, target: str, path: str) -> None:
        self.fs.symlink(target, self._p(path))

    def link(self, src: str, dst: str) -> None:
        self.fs.link(self._p(src), self._p(dst))

    def remove(self, path: str) -> None:
        p = self._p(path)
        try:
            st = self.fs.lstat(p)
        except FileNotFoundError:
            return
        if st.is_dir:
            self.clear_dir(path)
            self.fs.rmdir(p)
        else:
            self.fs.unlink(p)

    def clear_dir(self, path: str) -> None:
        for name in self.fs.listdir(self._p(path)):
            self.remove(path.rstrip("/") + "/" + name)

    def is_dir(self, path: str) -> bool:
        try:
            st = self.fs.lstat(self._p(path))
        except FileNotFoundError:
            return False
        return bool(st.is_dir)


class ThinView:
    """A container's rw thin device with its ext2 open; each write is followed by a flush (a pool commit)."""

    def __init__(self, driver: ThinpoolDM, dev_id: int) -> None:
        from thinpool import fs as tfs

        self.driver = driver
        self.fs = tfs.mount(driver.pool.device(dev_id))
        self.w = ThinWriter(self.fs)
        self.after_write: Callable[[], None] | None = None

    def write_at(self, path: str, offset: int, data: bytes) -> None:
        with self.fs.open(self.w._p(path), "r+b") as f:
            f.seek(offset)
            f.write(data)
        if self.after_write:
            self.after_write()
        self.fs.flush()

    def rewrite(self, path: str, data: bytes) -> None:
        with self.fs.open(self.w._p(path), "wb") as f:
            f.write(data)
        self.fs.flush()

    def appends(self, path: str, piece: bytes, count: int, preallocate: bool,
                mark: Callable[[], None] | None = None) -> float:
        with self.fs.open(self.w._p(path), "wb") as f:
            if preallocate:  # ext2 has no fallocate: preallocate by writing the range once
                f.write(bytes(len(piece) * count))
                self.fs.flush()
            if mark:
                mark()
            t0 = time.perf_counter()
            for i in range(count):
                f.seek(i * len(piece))
                f.write(piece)
                self.fs.flush()
            return time.perf_counter() - t0

    def read(self, path: str) -> int:
        n = 0
        with self.fs.open(self.w._p(path), "rb") as f:
            while b := f.read(MiB):
                n += len(b)
        return n

    def lstat(self, path: str) -> None:
        self.fs.lstat(self.w._p(path))

    def tree(self) -> tuple[Tree, set[frozenset[str]]]:
        import hashlib

        tree: Tree = {}
        by_ino: dict[int, set[str]] = {}
        pre = self.w.prefix
        for dirpath, _dirs, files in self.fs.walk(pre):
            rel_dir = dirpath[len(pre):] or "/"
            st = self.fs.lstat(dirpath)
            tree[rel_dir] = I.Entry("dir", stat.S_IMODE(st.mode) if rel_dir != "/" else 0o755)
            for name in files:
                full = dirpath.rstrip("/") + "/" + name
                rel = rel_dir.rstrip("/") + "/" + name
                st = self.fs.lstat(full)
                if st.is_symlink:
                    t = self.fs.readlink(full)
                    tree[rel] = I.Entry("symlink", 0o777, len(t), target=t)
                elif st.is_file:
                    h = hashlib.sha256()
                    with self.fs.open(full, "rb") as f:
                        while b := f.read(I.WRITE_PIECE):
                            h.update(b)
                    tree[rel] = I.Entry("file", stat.S_IMODE(st.mode), st.size, h.hexdigest())
                    if st.nlink > 1:
                        by_ino.setdefault(st.ino, set()).add(rel)
                else:
                    tree[rel] = I.Entry("other", stat.S_IMODE(st.mode))
        return tree, {frozenset(g) for g in by_ino.values() if len(g) > 1}

    def close(self) -> None:
        self.fs.close()


class ThinpoolDM(Driver):
    """Docker's devicemapper shape on thinpool: a base device with ext2, each layer a snapshot of its parent
    (the bottom one of the base), a container = ``-init`` snapshot + rw snapshot; delete discards first (moby did,
    on loop files) so the chunks return to the host."""

    backend = "library: Pool snapshot chains and thinpool.fs ext2 under /rootfs, as the driver lays them out"

    def __init__(self, workdir: Path, chunk_size: int = 64 * KiB, data_size: int = 16 * GiB,
                 base_size: int = 4 * GiB) -> None:
        self.name = f"thinpool-dm-{chunk_size // KiB}k"
        super().__init__(workdir)
        self.chunk_size = chunk_size
        self.data_size = data_size
        self.base_size = base_size

    def setup(self) -> None:
        from thinpool import fs as tfs
        from thinpool.pool import Pool

        super().setup()
        self.pool_dir = self.root / "pool"
        self.pool = Pool.create(self.pool_dir, data_size=self.data_size, chunk_size=self.chunk_size,
                                discard="passdown")
        self.ids: dict[str, int] = {}
        self.next_id = 1
        base = self._new_thin("base")
        with tfs.mkfs(base) as fsys:
            fsys.mkdir("/rootfs")
            fsys.flush()
        self.pool.commit()

    def _new_thin(self, name: str, origin: str | None = None) -> Any:
        dev_id = self.next_id
        self.next_id += 1
        if origin is None:
            dev = self.pool.create_thin(dev_id, self.base_size, name=name)
        else:
            dev = self.pool.create_snap(dev_id, self.ids[origin], name=name)
        self.ids[name] = dev_id
        return dev

    def _apply(self, dev: Any, layer: list[Op]) -> None:
        from thinpool import fs as tfs

        with tfs.mount(dev) as fsys:
            I.apply_layer(ThinWriter(fsys), layer)
            fsys.flush()

    def import_layers(self, tag: str, layers: list[list[Op]]) -> list[str]:
        ids: list[str] = []
        for i, layer in enumerate(layers):
            lid = f"{tag}-L{i}"
            self._apply(self._new_thin(lid, ids[-1] if ids else "base"), layer)
            ids.append(lid)
        self.pool.commit()
        return ids

    def create_container(self, cid: str, layer_id: str) -> None:
        self._apply(self._new_thin(f"{cid}-init", layer_id), I.init_layer())
        self._new_thin(cid, f"{cid}-init")
        self.pool.commit()

    def delete_container(self, cid: str) -> None:
        for name in (cid, f"{cid}-init"):
            dev_id = self.ids.pop(name)
            self.pool.device(dev_id).discard(0, self.base_size)
            self.pool.delete_thin(dev_id)
        self.pool.commit()

    def view(self, cid: str) -> ThinView:
        return ThinView(self, self.ids[cid])

    def counters(self) -> dict[str, int]:
        return {"data_written_bytes": self.pool.data.bytes_written,
                "metadata_written_bytes": self.pool.metadata_blocks_written * 4096,
                "allocated_bytes": self.pool.nr_allocated_data_blocks * self.chunk_size}

    def usage(self) -> dict[str, int]:
        return {"space_bytes": du_bytes(self.pool_dir / "data") + du_bytes(self.pool_dir / "metadata"),
                "host_inodes": count_inodes(self.root), **self.counters()}

    def page_cache(self, cids: list[str], path: str) -> dict[str, Any]:
        """Through the kernel: ``thinpool mount`` (FUSE, direct I/O) shows each rw device as a file, a read-only
        loop device on each, the kernel's ext2 mounted on each, the file read in every mount."""
        from thinpool.pool import Pool

        if os.geteuid() != 0:
            return {"unavailable": "needs root (loop devices and kernel ext2 mounts over the FUSE export)"}
        if not os.path.exists("/dev/fuse"):
            return {"unavailable": "no /dev/fuse"}
        for tool in ("thinpool", "losetup", "fincore"):
            if shutil.which(tool) is None:
                return {"unavailable": f"{tool} is not on PATH"}
        self.pool.close()
        fuse_dir = self.root / "fuse"
        fuse_dir.mkdir(exist_ok=True)
        proc = subprocess.Popen(["thinpool", "mount", "--pool", str(self.pool_dir), "--read-only", str(fuse_dir),
                                 *[a for c in cids for a in ("--export", c)]],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        mounts: list[str] = []
        loops: list[str] = []
        try:
            deadline = time.monotonic() + 30
            while not all((fuse_dir / c).exists() for c in cids):
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    return {"unavailable": f"thinpool mount did not come up: {err.strip()[:200]}"}
                time.sleep(0.05)
            files = []
            for c in cids:
                lo = _attach_loop(fuse_dir / c, readonly=True)
                loops.append(lo)
                m = self.root / "kmnt" / c
                m.mkdir(parents=True, exist_ok=True)
                run(["mount", "-t", "ext2", "-o", "ro", lo, str(m)])
                mounts.append(str(m))
                files.append(str(m / "rootfs" / path.lstrip("/")))
            data_file = str(self.pool_dir / "data")
            drop_cache(data_file)
            for p in files:
                read_all(p)
            parts = fincore(files)
            loop_parts = fincore(loops)
            backing = fincore([data_file])[data_file]
            resident = resident_pages(data_file)
            # where each container's copy of the file lies on its device (its ext2's block map), for the pool's
            # mapping below: only the pool knows which data blocks those are
            where = {c: file_block_offsets(p) for c, p in zip(cids, files, strict=True)}
        finally:
            for mp in reversed(mounts):
                subprocess.run(["umount", mp], capture_output=True)
            for lo in loops:
                subprocess.run(["losetup", "-d", lo], capture_output=True)
            if os.path.ismount(fuse_dir):
                subprocess.run(["umount", str(fuse_dir)], capture_output=True)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.pool = Pool.open(self.pool_dir)
        # the data file's pages that hold the file for any of the containers: one copy if they share its chunks.
        # (The whole data file's resident bytes also count the readahead around what ext2 read, which varies.)
        pages: set[int] = set()
        ch = self.chunk_size
        for c, offsets in where.items():
            dev_id = self.pool.find_device(c)
            for off in offsets:
                hit = self.pool.md.lookup(dev_id, off // ch) if off else None
                if hit is not None:
                    pages.add((hit[0] * ch + off % ch) // PAGE)
        held = sum(1 for pg in pages if pg < len(resident) and resident[pg])
        return {"resident_bytes": sum(parts.values()) + sum(loop_parts.values()) + backing,
                "files_count": len(parts), "ext2_files_bytes": sum(parts.values()),
                "loop_devices_bytes": sum(loop_parts.values()), "pool_data_file_bytes": backing,
                "pool_file_copy_bytes": len(pages) * PAGE, "pool_file_copy_resident_bytes": held * PAGE,
                "note": "FUSE export with direct I/O (no page cache in the FUSE files)"}

    def teardown(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            try:
                pool.close()
            except Exception:  # noqa: BLE001 - teardown must go on to remove the files
                pass
        super().teardown()


def moby_driver_available() -> bool:
    """Whether thinpool's devicemapper driver (issue 17, ``thinpool.driver``) is installed."""
    import importlib.util

    return importlib.util.find_spec("thinpool.driver") is not None


class ThinpoolMobyDM(ThinpoolDM):
    """thinpool-devicemapper through ``thinpool.driver`` (moby's devmapper driver on thinpool): the image is
    written as an OCI layout and loaded with the driver's ``image load`` (UnpackLayer rules, layers keyed by
    ChainID and shared), containers are the driver's ``create`` (``NAME-init`` + ``NAME``) and ``rm`` (discard,
    then delete)."""

    backend = "thinpool.driver (issue 17): image load of an OCI layout, container create / rm"

    def setup(self) -> None:
        from thinpool.driver import DeviceSet
        from thinpool.pool import Pool

        Driver.setup(self)
        self.pool_dir = self.root / "pool"
        self.pool = Pool.create(self.pool_dir, data_size=self.data_size, chunk_size=self.chunk_size,
                                discard="passdown")
        self.ds = DeviceSet.init(self.pool, base_size=self.base_size, min_free_percent=0)
        self._bind()

    def _bind(self) -> None:
        from thinpool.driver import DeviceSet
        from thinpool.driver import Driver as MobyDriver

        if getattr(self, "ds", None) is None or self.ds.pool is not self.pool:
            self.ds = DeviceSet.open(self.pool)
        self.moby = MobyDriver(self.ds)

    def import_layers(self, tag: str, layers: list[list[Op]]) -> list[str]:
        """Load the image (all layers); an image of fewer layers is loaded when a container first needs it,
        its layers shared with the ones already there."""
        refs = [f"lab-{tag}:l{i}" for i in range(len(layers))]
        self._layers = {**getattr(self, "_layers", {}), tag: layers}
        self._loaded: set[str] = getattr(self, "_loaded", set())
        self._load(refs[-1])
        return refs

    def _load(self, ref: str) -> None:
        tag, _, idx = ref.partition(":")
        tag = tag[len("lab-"):]
        oci = self.root / f"oci-{tag}"
        I.write_oci_layout(oci, self._layers[tag][:int(idx[1:]) + 1], {ref: int(idx[1:]) + 1})
        try:
            self.moby.images.load(str(oci))
        finally:
            shutil.rmtree(oci)  # the layout is the registry's, not the driver's: keep it out of the space figures
        self.pool.commit()
        self._loaded.add(ref)

    def create_container(self, cid: str, layer_id: str) -> None:
        if layer_id not in self._loaded:
            self._load(layer_id)
        self.moby.containers.create(layer_id, name=cid)
        self.pool.commit()

    def delete_container(self, cid: str) -> None:
        self.moby.containers.remove(cid)
        self.pool.commit()

    def view(self, cid: str) -> ThinView:
        return ThinView(self, self.pool.find_device(cid))

    def page_cache(self, cids: list[str], path: str) -> dict[str, Any]:
        try:
            return super().page_cache(cids, path)
        finally:
            self._bind()


def unavailable_kernel_drivers() -> dict[str, str]:
    """The drivers this kernel cannot run at all, with the reason (measured, never faked)."""
    with open("/proc/filesystems") as f:
        fss = f.read()
    uname = os.uname().release
    out = {}
    if "aufs" not in fss:
        out["aufs"] = f"no aufs in /proc/filesystems (kernel {uname}; aufs was never merged upstream): see aufs-like"
    if "zfs" not in fss:
        out["zfs"] = f"no zfs in /proc/filesystems (kernel {uname}, no zfs module)"
    if not os.path.exists("/dev/mapper/control"):
        out["devicemapper"] = (f"no /dev/mapper/control (kernel {uname} without device-mapper): "
                               "see thinpool-dm-64k / thinpool-dm-512k")
    return out
