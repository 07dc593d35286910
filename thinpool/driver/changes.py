"""moby's naive diff (``pkg/archive/changes.go``): the changes between two rootfs trees, and their layer tar.

Layer: driver. May import: thinpool.errors, thinpool.fs, thinpool.driver.rootfs.

A path is changed when mode (type and permissions), uid, gid or rdev differ, or, for what is not a directory
(``mode & S_IFDIR != S_IFDIR``, so also block devices and sockets, as in moby), the mtime (seconds, a zero
nanosecond part matches anything) or the size; or when the ``security.capability`` xattr differs. Content is never
compared. A directory with changes below it is reported changed itself (before them); the root never is.
``export_changes`` writes them as ``ExportChanges`` does: sorted by path, a deletion as an empty ``.wh.NAME``
regular file (mode 0, owner 0, time now), anything else as its whole file.
"""

from __future__ import annotations

import stat as S
import tarfile
import time
from dataclasses import dataclass, field

from thinpool.driver.rootfs import tar_info
from thinpool.errors import FsError
from thinpool.fs.filesystem import Filesystem

CAPABILITY = "security.capability"
ADD, MODIFY, DELETE = "A", "C", "D"


@dataclass
class Change:
    path: str  # "/a/b", relative to the rootfs
    kind: str  # A, C or D

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


@dataclass
class _Info:
    name: str
    stat: tuple[int, int, int, int, int, int] | None  # mode, uid, gid, rdev, mtime, size
    capability: bytes | None
    children: dict[str, _Info] = field(default_factory=dict)
    added: bool = False

    def is_dir(self) -> bool:
        return self.stat is None or self.stat[0] & S.S_IFDIR != 0  # moby's isDir (block devices too)


def collect(fs: Filesystem, root: str) -> _Info:
    """``collectFileInfo``: the tree below ``root`` with each entry's lstat and capability xattr."""
    top = _Info("/", None, None)

    def visit(path: str, node: _Info) -> None:
        for e in fs.scandir(path):
            p = path.rstrip("/") + "/" + e.name
            st = fs.lstat(p)
            try:
                cap: bytes | None = fs.getxattr(p, CAPABILITY)
            except FsError:
                cap = None
            child = _Info(e.name, (st.mode, st.uid, st.gid, st.rdev, st.mtime, st.size), cap)
            node.children[e.name] = child
            if S.S_ISDIR(st.mode):
                visit(p, child)

    visit(root, top)
    return top


def _stat_different(old: tuple[int, ...], new: tuple[int, ...]) -> bool:
    if old[:4] != new[:4]:
        return True
    return old[0] & S.S_IFDIR != S.S_IFDIR and (old[4] != new[4] or old[5] != new[5])


def _add_changes(info: _Info, old: _Info | None, path: str, changes: list[Change]) -> None:
    size_at_entry = len(changes)
    if old is None:
        changes.append(Change(path, ADD))
        info.added = True
    old_children = dict(old.children) if old is not None and info.is_dir() else {}
    for name in sorted(info.children):
        new_child = info.children[name]
        child_path = path.rstrip("/") + "/" + name
        old_child = old_children.pop(name, None)
        if old_child is not None:
            assert old_child.stat is not None and new_child.stat is not None
            if _stat_different(old_child.stat, new_child.stat) or old_child.capability != new_child.capability:
                changes.append(Change(child_path, MODIFY))
                new_child.added = True
        _add_changes(new_child, old_child, child_path, changes)
    for name in sorted(old_children):
        changes.append(Change(path.rstrip("/") + "/" + name, DELETE))
    if len(changes) > size_at_entry and info.is_dir() and not info.added and path != "/":
        changes.insert(size_at_entry, Change(path, MODIFY))


def changes_dirs(new_fs: Filesystem, new_root: str, old_fs: Filesystem, old_root: str) -> list[Change]:
    """``ChangesDirs(new, old)``: what changed from ``old`` to ``new``, in the tree's (sorted) order."""
    new = collect(new_fs, new_root)
    old = collect(old_fs, old_root)
    changes: list[Change] = []
    _add_changes(new, old, "/", changes)
    return changes


def export_changes(fs: Filesystem, root: str, changes: list[Change], tw: tarfile.TarFile) -> None:
    """``ExportChanges``: the changes as a layer tar, sorted by path."""
    seen: dict[int, str] = {}
    now = int(time.time())
    for c in sorted(changes, key=lambda c: c.path):
        if c.kind == DELETE:
            d, _, base = c.path.rpartition("/")
            ti = tarfile.TarInfo((d + "/.wh." + base)[1:])
            ti.mode = 0
            ti.mtime = now
            ti.uname = ti.gname = ""
            tw.addfile(ti)
            continue
        path = root.rstrip("/") + c.path
        tar_info(fs, path, c.path[1:], fs.lstat(path), seen).write(fs, tw)
