"""The lab's one deterministic image: layers of operations, their merged reference tree, and writers.

Layer: tooling (thinpool_bench). May import: everything in thinpool.

An image is a list of layers; a layer is a list of operations applied in order on top of the layers below it, as
an image layer tar is applied (moby's UnpackLayer): ``dir``, ``file`` (content from a seed, so every driver writes
the same bytes without holding them), ``symlink``, ``hardlink`` (to a path of the same layer), ``delete`` (a
whiteout: the path and everything under it disappear) and ``opaque`` (the directory keeps only what this and later
layers put in it).

Writers turn a layer into what a driver consumes: ``write_overlay_layer`` (whiteouts as 0/0 character devices,
opaque as the ``trusted.overlay.opaque`` xattr), ``write_aufs_layer`` (``.wh.NAME`` files and ``.wh..wh..opq``) and
``apply_layer`` (a full tree edited in place: vfs, btrfs, thinpool's ext2) through the small ``TreeWriter``
protocol. ``reference_tree`` is the merged view every container must show.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

KiB, MiB = 1 << 10, 1 << 20
WRITE_PIECE = 4 * MiB  # content is generated and written in pieces of this size


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of a layer; ``size``/``seed`` for files, ``target`` for links."""

    kind: str  # dir | file | symlink | hardlink | delete | opaque
    path: str  # absolute, "/a/b"
    mode: int = 0o755
    size: int = 0
    seed: int = 0
    target: str = ""


@dataclass
class Image:
    """The layers (bottom first), the sized files (for the first-write workload) and the shared file."""

    layers: list[list[Op]]
    sized_files: dict[int, str] = field(default_factory=dict)  # size in bytes -> path
    shared_file: str = ""  # the file N containers read (page cache)
    rewrite_file: str = ""  # a small file of the image, rewritten in a loop
    lower_read_file: str = ""  # a file of a lower layer read through a container
    shared_bytes: int = 0  # the shared file's size

    @property
    def nr_files(self) -> int:
        return sum(1 for layer in self.layers for op in layer if op.kind == "file")

    @property
    def bytes_total(self) -> int:
        return sum(op.size for layer in self.layers for op in layer if op.kind == "file")


def content(seed: int, size: int, offset: int = 0, length: int | None = None) -> bytes:
    """The deterministic bytes of a file: ``length`` bytes from ``offset`` (pieces are independent streams)."""
    end = size if length is None else min(size, offset + length)
    out = []
    pos = offset
    while pos < end:
        piece = pos // WRITE_PIECE
        rng = np.random.default_rng([seed, piece])
        buf = rng.bytes(min(WRITE_PIECE, size - piece * WRITE_PIECE))
        lo = pos - piece * WRITE_PIECE
        hi = min(len(buf), end - piece * WRITE_PIECE)
        out.append(buf[lo:hi])
        pos = piece * WRITE_PIECE + hi
    return b"".join(out)


def pieces(op: Op) -> Iterator[bytes]:
    for off in range(0, op.size, WRITE_PIECE):
        yield content(op.seed, op.size, off, WRITE_PIECE)


_DIGESTS: dict[tuple[int, int], str] = {}


def digest(op: Op) -> str:
    """sha256 of a file's content (memoised by seed and size)."""
    key = (op.seed, op.size)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for p in pieces(op):
            h.update(p)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def build_image(*, quick: bool, tiny: bool = False) -> Image:
    """The lab image. Full: 3,000 small files and files of 4 KiB..256 MiB; quick: 1,000 and 4 KiB..16 MiB;
    tiny (for tests): 200 and 4 KiB..1 MiB."""
    nr_small = 200 if tiny else 1000 if quick else 3000
    sizes = ([4 * KiB, 64 * KiB, 1 * MiB] if tiny else [4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB] if quick
             else [4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 256 * MiB])
    seed = iter(range(1, 1 << 30))
    l0: list[Op] = [Op("dir", p) for p in ("/etc", "/usr", "/usr/bin", "/usr/lib", "/srv", "/srv/small", "/data",
                                            "/opt", "/opt/plugins", "/var", "/var/log", "/var/log/old")]
    l0 += [Op("file", "/etc/config", 0o644, 1000, next(seed)), Op("file", "/etc/passwd", 0o644, 600, next(seed)),
           Op("file", "/usr/bin/tool", 0o755, 64 * KiB + 123, next(seed)),
           Op("hardlink", "/usr/bin/tool-alias", target="/usr/bin/tool"),
           Op("file", "/usr/lib/libx.so.1", 0o644, 256 * KiB, next(seed)),
           Op("symlink", "/usr/lib/libx.so", target="libx.so.1"),
           Op("symlink", "/usr/bin/abs-link", target="/etc/config")]
    nr_dirs = nr_small // 100
    l0 += [Op("dir", f"/srv/small/d{d:02d}") for d in range(nr_dirs)]
    for i in range(nr_small):
        size = 64 + (i * 7919) % (16 * KiB)
        l0.append(Op("file", f"/srv/small/d{i % nr_dirs:02d}/f{i:05d}", 0o644, size, next(seed)))
    sized = {s: f"/data/size-{s // KiB}k" for s in sizes}
    l0 += [Op("file", p, 0o644, s, next(seed)) for s, p in sized.items()]
    shared = 4 * MiB if tiny else 32 * MiB
    l0.append(Op("file", "/data/shared", 0o644, shared, next(seed)))
    l0.append(Op("file", "/data/rewrite-16k", 0o644, 16 * KiB, next(seed)))
    l0.append(Op("file", "/data/lower-read-1m", 0o644, MiB, next(seed)))
    l0 += [Op("file", f"/opt/plugins/p{i:02d}", 0o644, 2000 + i, next(seed)) for i in range(20)]
    l0 += [Op("file", f"/var/log/old/log{i}", 0o644, 5000 + i, next(seed)) for i in range(10)]
    # layer 1: whiteouts of single files, a replaced file, an opaque directory, new files, a symlink to a dir
    l1: list[Op] = [Op("delete", f"/srv/small/d00/f{i:05d}") for i in range(0, 50 * nr_dirs, nr_dirs)]
    l1 += [Op("file", "/etc/config", 0o600, 1500, next(seed)), Op("opaque", "/opt/plugins")]
    l1 += [Op("file", f"/opt/plugins/new{i}", 0o644, 3000 + i, next(seed)) for i in range(3)]
    l1 += [Op("dir", "/srv/extra")] + [Op("file", f"/srv/extra/e{i:03d}", 0o644, 100 + i * 37, next(seed))
                                       for i in range(100)]
    l1.append(Op("symlink", "/current", target="/srv/extra"))
    # layer 2: a deleted directory, a deleted and recreated file, an app with a hard link
    l2: list[Op] = [Op("delete", "/var/log/old"), Op("delete", "/etc/passwd"),
                    Op("file", "/etc/passwd", 0o644, 700, next(seed)), Op("dir", "/app"), Op("dir", "/app/lib")]
    l2.append(Op("file", "/app/main", 0o755, MiB + 17, next(seed)))
    l2.append(Op("hardlink", "/app/main-link", target="/app/main"))
    l2 += [Op("file", f"/app/lib/m{i:02d}.py", 0o644, 500 + 11 * i, next(seed)) for i in range(50)]
    return Image([l0, l1, l2], sized, "/data/shared", "/data/rewrite-16k", "/data/lower-read-1m", shared)


# moby's initlayer (daemon/initlayer/setup_unix.go): what every container's "-init" layer holds
INIT_DIRS = ("/etc", "/dev", "/dev/pts", "/dev/shm", "/proc", "/sys")
INIT_FILES = ("/.dockerenv", "/etc/resolv.conf", "/etc/hosts", "/etc/hostname", "/dev/console")
INIT_SYMLINKS = {"/etc/mtab": "/proc/mounts"}


def init_layer() -> list[Op]:
    return ([Op("dir", d) for d in INIT_DIRS] + [Op("file", f, 0o755, 0) for f in INIT_FILES]
            + [Op("symlink", p, target=t) for p, t in INIT_SYMLINKS.items()])


def depth_layers(depth: int, nr_probes: int) -> list[list[Op]]:
    """A stack of ``depth`` layers for the lookup workload: the probes live only in the bottom layer, and every
    layer also has a file in /probe, so /probe is a merged directory at every depth."""
    bottom = [Op("dir", "/probe")] + [Op("file", f"/probe/p{i:04d}", 0o644, 100, 10_000 + i)
                                      for i in range(nr_probes)]
    return [bottom] + [[Op("dir", "/probe"), Op("file", f"/probe/x{k:03d}", 0o644, 10, 20_000 + k)]
                       for k in range(1, depth)]


# ---------------------------------------------------------------------------------------------------------------
# the reference tree
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Entry:
    """What a tree shows at a path: type, permission bits, size, content digest or link target."""

    kind: str  # dir | file | symlink
    mode: int
    size: int = 0
    digest: str = ""
    target: str = ""


Tree = dict[str, Entry]


def reference_tree(layers: list[list[Op]], *, digests: bool = True) -> tuple[Tree, set[frozenset[str]]]:
    """The merged tree of ``layers`` and its hard-link groups (paths that must be one inode)."""
    tree: Tree = {"/": Entry("dir", 0o755)}
    links: dict[str, str] = {}  # path -> the path of its group's first member

    def drop(path: str, keep_self: bool = False) -> None:
        pre = path.rstrip("/") + "/"
        for p in [p for p in tree if p.startswith(pre) or (p == path and not keep_self)]:
            del tree[p]
            links.pop(p, None)

    for layer in layers:
        for op in layer:
            if op.kind == "delete":
                drop(op.path)
            elif op.kind == "opaque":
                drop(op.path, keep_self=True)
                tree.setdefault(op.path, Entry("dir", 0o755))
            elif op.kind == "dir":
                if tree.get(op.path, Entry("file", 0)).kind != "dir":
                    drop(op.path)
                    tree[op.path] = Entry("dir", op.mode)
            elif op.kind == "file":
                drop(op.path)
                tree[op.path] = Entry("file", op.mode, op.size, digest(op) if digests else "")
            elif op.kind == "symlink":
                drop(op.path)
                tree[op.path] = Entry("symlink", 0o777, len(op.target), target=op.target)
            elif op.kind == "hardlink":
                drop(op.path)
                tree[op.path] = tree[op.target]
                links[op.path] = links.get(op.target, op.target)
    groups: dict[str, set[str]] = {}
    for p, head in links.items():
        if head in tree and p in tree:
            groups.setdefault(head, {head}).add(p)
    return tree, {frozenset(g) for g in groups.values()}


def host_tree(root: Path) -> tuple[Tree, set[frozenset[str]]]:
    """The tree under a host directory (a container's view), in the same terms as ``reference_tree``."""
    tree: Tree = {}
    by_ino: dict[tuple[int, int], set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = "/" + os.path.relpath(dirpath, root) if dirpath != str(root) else "/"
        rel_dir = posixpath.normpath(rel_dir)
        st = os.lstat(dirpath)
        tree[rel_dir] = Entry("dir", stat.S_IMODE(st.st_mode) if rel_dir != "/" else 0o755)
        for name in list(dirnames) + filenames:
            full = os.path.join(dirpath, name)
            rel = posixpath.join(rel_dir, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                t = os.readlink(full)
                tree[rel] = Entry("symlink", 0o777, len(t), target=t)
                if name in dirnames:
                    dirnames.remove(name)
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(full, "rb") as f:
                    while b := f.read(WRITE_PIECE):
                        h.update(b)
                tree[rel] = Entry("file", stat.S_IMODE(st.st_mode), st.st_size, h.hexdigest())
                if st.st_nlink > 1:
                    by_ino.setdefault((st.st_dev, st.st_ino), set()).add(rel)
            elif not stat.S_ISDIR(st.st_mode):
                tree[rel] = Entry("other", stat.S_IMODE(st.st_mode))
    return tree, {frozenset(g) for g in by_ino.values() if len(g) > 1}


def diff_trees(want: Tree, got: Tree) -> list[str]:
    """Human-readable differences (empty when equal)."""
    out = []
    for p in sorted(set(want) | set(got)):
        if p not in got:
            out.append(f"missing {p}")
        elif p not in want:
            out.append(f"extra {p} ({got[p].kind})")
        elif want[p] != got[p]:
            out.append(f"differs {p}: want {want[p]}, got {got[p]}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------------------------
class TreeWriter(Protocol):
    """A full tree edited in place (a vfs copy, a btrfs subvolume, thinpool's ext2 under /rootfs)."""

    def mkdir(self, path: str, mode: int) -> None: ...
    def write(self, op: Op) -> None: ...
    def symlink(self, target: str, path: str) -> None: ...
    def link(self, src: str, dst: str) -> None: ...
    def remove(self, path: str) -> None: ...  # a file, link or whole directory tree; absent is fine
    def clear_dir(self, path: str) -> None: ...  # remove every entry in a directory
    def is_dir(self, path: str) -> bool: ...


def apply_layer(w: TreeWriter, layer: list[Op]) -> None:
    """Apply one layer to a full tree, with UnpackLayer's rules (replace unless both are directories)."""
    for op in layer:
        if op.kind == "delete":
            w.remove(op.path)
        elif op.kind == "opaque":
            if w.is_dir(op.path):
                w.clear_dir(op.path)
            else:
                w.remove(op.path)
                w.mkdir(op.path, 0o755)
        elif op.kind == "dir":
            if not w.is_dir(op.path):
                w.remove(op.path)
                w.mkdir(op.path, op.mode)
        else:
            w.remove(op.path)
            if op.kind == "file":
                w.write(op)
            elif op.kind == "symlink":
                w.symlink(op.target, op.path)
            elif op.kind == "hardlink":
                w.link(op.target, op.path)


class HostWriter:
    """``TreeWriter`` on a host directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _p(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def mkdir(self, path: str, mode: int) -> None:
        p = self._p(path)
        p.mkdir(mode)
        os.chmod(p, mode)

    def write(self, op: Op) -> None:
        write_host_file(self._p(op.path), op)

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, self._p(path))

    def link(self, src: str, dst: str) -> None:
        os.link(self._p(src), self._p(dst))

    def remove(self, path: str) -> None:
        p = self._p(path)
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)

    def clear_dir(self, path: str) -> None:
        for child in self._p(path).iterdir():
            self.remove(str(Path(path) / child.name))

    def is_dir(self, path: str) -> bool:
        p = self._p(path)
        return p.is_dir() and not p.is_symlink()


def write_host_file(p: Path, op: Op) -> None:
    with open(p, "wb") as f:
        for piece in pieces(op):
            f.write(piece)
    os.chmod(p, op.mode)


def _layer_dirs(layer: list[Op]) -> set[str]:
    """Every parent directory the layer's entries need in a layer directory."""
    need = set()
    for op in layer:
        d = posixpath.dirname(op.path)
        while d not in ("/", ""):
            need.add(d)
            d = posixpath.dirname(d)
    return need


def _write_layer_dir(root: Path, layer: list[Op], whiteout: str, below: Tree) -> None:
    """A layer as a directory of changes (the shape of a layer tar), with whiteouts in overlay or aufs form."""
    root.mkdir(parents=True, exist_ok=True)
    made: set[str] = set()
    for d in sorted(_layer_dirs(layer)):
        if not (root / d.lstrip("/")).exists():
            mode = below[d].mode if d in below and below[d].kind == "dir" else 0o755
            (root / d.lstrip("/")).mkdir(mode)
            os.chmod(root / d.lstrip("/"), mode)
    w = HostWriter(root)
    for op in layer:
        p = root / op.path.lstrip("/")
        name = posixpath.basename(op.path)
        if op.kind == "delete":
            w.remove(op.path)
            if whiteout == "overlay":
                os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            else:
                (p.parent / f".wh.{name}").touch()
        elif op.kind == "opaque":
            if not p.is_dir():
                w.remove(op.path)
                p.mkdir(0o755)
            if whiteout == "overlay":
                os.setxattr(p, "trusted.overlay.opaque", b"y")
            else:
                (p / ".wh..wh..opq").touch()
            made.add(op.path)
        elif op.kind == "dir":
            if not p.is_dir():
                w.remove(op.path)
                w.mkdir(op.path, op.mode)
            else:
                os.chmod(p, op.mode)
        else:
            if whiteout == "overlay" and p.exists() and stat.S_ISCHR(os.lstat(p).st_mode):
                p.unlink()  # deleted then recreated in the same layer: the new entry replaces the whiteout
            elif whiteout == "aufs":
                (p.parent / f".wh.{name}").unlink(missing_ok=True)
            w.remove(op.path)
            if op.kind == "file":
                w.write(op)
            elif op.kind == "symlink":
                w.symlink(op.target, op.path)
            else:
                w.link(op.target, op.path)


def write_layer_dirs(base: Path, layers: list[list[Op]], whiteout: str) -> list[Path]:
    """Each layer as its own directory ``base/L<i>`` (bottom first), whiteouts in ``overlay`` or ``aufs`` form."""
    out = []
    for i, layer in enumerate(layers):
        below, _ = reference_tree(layers[:i], digests=False) if i else ({}, set())
        d = base / f"L{i}"
        _write_layer_dir(d, layer, whiteout, below)
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------------------------------
# an OCI image layout (for drivers that load images the way docker does)
# ---------------------------------------------------------------------------------------------------------------
def layer_tar(layer: list[Op], below: Tree, out: Path) -> str:
    """One layer as an uncompressed layer tar (aufs-style whiteouts, as the OCI spec has them); its sha256."""
    import io
    import tarfile

    def info(path: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
        ti = tarfile.TarInfo(path.lstrip("/") + ("/" if kind == tarfile.DIRTYPE else ""))
        ti.type, ti.mode, ti.size, ti.linkname = kind, mode, size, link
        ti.mtime = 1_700_000_000
        return ti

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        done: set[str] = set()
        for d in sorted(_layer_dirs(layer)):
            mode = below[d].mode if d in below and below[d].kind == "dir" else 0o755
            tar.addfile(info(d, tarfile.DIRTYPE, mode))
            done.add(d)
        for op in layer:
            parent, name = posixpath.split(op.path)
            if op.kind == "delete":
                tar.addfile(info(posixpath.join(parent, f".wh.{name}"), tarfile.REGTYPE, 0o644))
            elif op.kind == "opaque":
                if op.path not in done:
                    tar.addfile(info(op.path, tarfile.DIRTYPE, 0o755))
                tar.addfile(info(posixpath.join(op.path, ".wh..wh..opq"), tarfile.REGTYPE, 0o644))
            elif op.kind == "dir":
                tar.addfile(info(op.path, tarfile.DIRTYPE, op.mode))
            elif op.kind == "file":
                tar.addfile(info(op.path, tarfile.REGTYPE, op.mode, op.size), io.BytesIO(b"".join(pieces(op))))
            elif op.kind == "symlink":
                tar.addfile(info(op.path, tarfile.SYMTYPE, 0o777, link=op.target))
            elif op.kind == "hardlink":
                # a tar writer gives a hard link the inode's mode (moby's UnpackLayer chmods the link with it)
                mode = next(o.mode for o in layer if o.path == op.target and o.kind == "file")
                tar.addfile(info(op.path, tarfile.LNKTYPE, mode, link=op.target.lstrip("/")))
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while b := f.read(WRITE_PIECE):
            h.update(b)
    return h.hexdigest()


def write_oci_layout(root: Path, layers: list[list[Op]], tags: dict[str, int]) -> None:
    """An OCI image layout at ``root``: one image per tag, ``tags[name]`` = how many layers (bottom first) it has;
    layers are shared between the images."""
    import json

    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def blob(data: bytes) -> dict[str, Any]:
        dg = hashlib.sha256(data).hexdigest()
        (blobs / dg).write_bytes(data)
        return {"digest": f"sha256:{dg}", "size": len(data)}

    descs = []
    for i, layer in enumerate(layers):
        below, _ = reference_tree(layers[:i], digests=False) if i else ({}, set())
        tmp = blobs / f"tmp-{i}"
        dg = layer_tar(layer, below, tmp)
        size = tmp.stat().st_size
        tmp.rename(blobs / dg)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{dg}",
                      "size": size})
    manifests = []
    for name, n in tags.items():
        config = {"architecture": "amd64", "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs[:n]]}}
        cfg = blob(json.dumps(config, sort_keys=True).encode())
        man = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg}, "layers": descs[:n]}
        m = blob(json.dumps(man, sort_keys=True).encode())
        manifests.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", **m,
                          "annotations": {"org.opencontainers.image.ref.name": name}})
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
