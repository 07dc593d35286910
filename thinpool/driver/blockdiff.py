"""A container's changed files from the pool's block-level delta, in time proportional to what changed.

Layer: driver. May import: thinpool.errors, thinpool.fs, thinpool.tools, thinpool.driver.*.

1. ``thinpool.tools.delta.delta_runs`` of ``NAME-init`` against ``NAME`` gives the chunks that differ (shared
   subtrees of the two mapping trees are never read); in them the 4 KiB ext2 blocks whose content differs.
2. The ext2 geometry splits those blocks: inode-table blocks give the inodes whose slots differ; everything else
   is file content (data, indirect and directory blocks).
3. Candidates are those inodes plus the owners of changed content blocks in the ``-init`` device's
   block-to-inode map (a rewrite that puts mtime back within the same second leaves the inode slot as it was).
   A live inode (in both) is **content-changed** when it owns a changed block or its size or block list differs;
   a directory among them is compared entry by entry: names added (``A``, with everything below an added
   directory), removed (``D``), pointing at another inode (``C``).
4. Paths come from the inode-to-paths index of the ``-init`` device, made once when the container is created
   with the block map (:class:`InodeIndex`, memory-mapped ``.npy`` files; the init device never changes afterwards), and
   from the changed directories.

Parents of changes are reported changed, as in the naive diff. Where the two disagree, on purpose: the block diff
sees a rewrite that keeps size and mtime (the naive diff cannot), and does not report metadata-only changes (mode,
owner, times, xattrs: no content block changes).
"""

from __future__ import annotations

import os
import stat as S
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from thinpool.driver.changes import ADD, DELETE, MODIFY, Change
from thinpool.driver.rootfs import ROOTFS
from thinpool.driver.store import mounted
from thinpool.fs.filesystem import Filesystem
from thinpool.tools.delta import delta_runs

if TYPE_CHECKING:
    from thinpool.driver.container import Containers

ROOT_INO = 2


def inode_index(fs: Filesystem, root: str = ROOTFS) -> dict[int, list[str]]:
    """inode -> every path of it below ``root`` (relative, ``/a/b``), the rootfs itself as ``/``."""
    index: dict[int, list[str]] = {fs.lstat(root).ino: ["/"]}
    stack = [(root, "")]
    while stack:
        path, rel = stack.pop()
        for e in fs.scandir(path):
            p, r = path.rstrip("/") + "/" + e.name, rel + "/" + e.name
            index.setdefault(e.ino, []).append(r)
            if e.is_dir:
                stack.append((p, r))
    return index


def block_map(fs: Filesystem, index: dict[int, list[str]]) -> np.ndarray:
    """The ext2's block-to-inode map of the indexed inodes: shape (2, n), row 0 the blocks in ascending order, row 1
    the inode owning each (each row contiguous, so a memory-mapped copy is binary-searched in place)."""
    blocks: list[int] = []
    owners: list[int] = []
    for ino in index:
        own = fs.inode_blocks(ino)
        blocks.extend(own)
        owners.extend([ino] * len(own))
    arr = np.array([blocks, owners], dtype="<u4").reshape(2, -1)
    return np.ascontiguousarray(arr[:, np.argsort(arr[0], kind="stable")])


class InodeIndex:
    """The init device's inode -> paths index and block -> inode map, answering only what a diff asks.

    On disk (``save_index``) it is three ``.npy`` files next to the container's record: ``NAME.inodes.npy`` (shape
    (2, n) uint64: the indexed inode numbers ascending, and the end offset of each one's paths in the blob),
    ``NAME.paths.npy`` (uint8: every path, ``os.fsencode``d, NUL-separated, grouped by inode in the same order) and
    ``NAME.blocks.npy`` (see :func:`block_map`). Loaded memory-mapped, a diff reads the pages its binary searches
    touch and the paths of its candidate inodes, not the whole index.
    """

    def __init__(self, inos: np.ndarray, blob: np.ndarray, bmap: np.ndarray) -> None:
        self._inos = inos
        self._blob = blob
        self._bmap = bmap

    @classmethod
    def build(cls, fs: Filesystem) -> InodeIndex:
        """The index of ``fs`` in memory (from a walk of its rootfs)."""
        index = inode_index(fs)
        order = sorted(index)
        parts = [b"\0".join(os.fsencode(p) for p in index[ino]) for ino in order]
        ends = np.cumsum([len(x) for x in parts], dtype="<u8")
        inos = np.array([order, ends], dtype="<u8").reshape(2, -1)
        blob = np.frombuffer(b"".join(parts), dtype="u1")
        return cls(inos, blob, block_map(fs, index))

    @classmethod
    def load(cls, directory: Path, name: str) -> InodeIndex | None:
        """The saved index of container ``name``, memory-mapped; None when its files are missing or inconsistent."""
        inos_p, blob_p, blocks_p = _index_paths(directory, name)
        try:
            inos = np.load(inos_p, mmap_mode="r")
            blob = np.load(blob_p, mmap_mode="r")
            bmap = np.load(blocks_p, mmap_mode="r")
        except (FileNotFoundError, ValueError, OSError):
            return None
        if inos.ndim != 2 or inos.shape[0] != 2 or bmap.ndim != 2 or bmap.shape[0] != 2 or blob.ndim != 1 or \
                not inos.shape[1] or int(inos[1, -1]) != blob.shape[0]:
            return None
        return cls(inos, blob, bmap)

    def save(self, directory: Path, name: str) -> None:
        """Write the three files (each via a temporary name and a rename; the inode table last)."""
        inos_p, blob_p, blocks_p = _index_paths(directory, name)
        for path, arr in ((blob_p, self._blob), (blocks_p, self._bmap), (inos_p, self._inos)):
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(arr))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def __contains__(self, ino: int) -> bool:
        return self._slot(ino) is not None

    def _slot(self, ino: int) -> int | None:
        keys = self._inos[0]
        i = int(np.searchsorted(keys, ino))
        return i if i < keys.shape[0] and int(keys[i]) == ino else None

    def paths(self, ino: int) -> list[str]:
        """Every path of ``ino`` below the rootfs (``/`` for the rootfs itself); empty if it is not indexed."""
        i = self._slot(ino)
        if i is None:
            return []
        lo = int(self._inos[1, i - 1]) if i else 0
        raw = bytes(self._blob[lo:int(self._inos[1, i])])
        return [os.fsdecode(p) for p in raw.split(b"\0")]

    def owners(self, blocks: set[int]) -> set[int]:
        """The indexed inodes owning any of ``blocks``."""
        col = self._bmap[0]
        if not blocks or not col.shape[0]:
            return set()
        want = np.array(sorted(blocks), dtype="<u4")
        pos = np.searchsorted(col, want)
        inside = pos < col.shape[0]
        pos, want = pos[inside], want[inside]
        hit = np.asarray(col[pos]) == want
        return {int(i) for i in np.asarray(self._bmap[1][pos[hit]])}


def _index_paths(directory: Path, name: str) -> tuple[Path, Path, Path]:
    return directory / f"{name}.inodes.npy", directory / f"{name}.paths.npy", directory / f"{name}.blocks.npy"


def save_index(fs: Filesystem, directory: Path, name: str) -> None:
    """Write container ``name``'s index of its init device's file system ``fs`` (see :class:`InodeIndex`)."""
    InodeIndex.build(fs).save(directory, name)


def remove_index(directory: Path, name: str) -> None:
    """Delete container ``name``'s index files (and those of the earlier JSON format)."""
    for p in (*_index_paths(directory, name), directory / f"{name}.inodes.json"):
        p.unlink(missing_ok=True)
        p.with_name(p.name + ".tmp").unlink(missing_ok=True)


def changed_blocks(containers: Containers, rec: dict[str, object], fs_block_size: int) -> set[int]:
    """The ext2 blocks whose content differs between the init and the rw device."""
    ds = containers.ds
    old = ds.thin(ds.get(str(rec["InitDevice"])))
    new = ds.thin(ds.get(str(rec["Device"])))
    chunk = ds.pool.chunk_bytes
    per = chunk // fs_block_size
    out: set[int] = set()
    for run in delta_runs(ds.pool.md, old.dev_id, new.dev_id, include_same=False):
        for c in range(run.begin, run.begin + run.length):
            a = old.read(c * chunk, chunk)
            b = new.read(c * chunk, chunk)
            for i in range(per):
                lo = i * fs_block_size
                if a[lo:lo + fs_block_size] != b[lo:lo + fs_block_size]:
                    out.add(c * per + i)
    return out


def _blocks(fs: Filesystem, ino: int) -> set[int]:
    return set(fs.inode_blocks(ino))


def block_diff(containers: Containers, name: str) -> list[Change]:
    """The container's changes found from the block delta (see the module docstring)."""
    rec = containers.get(name)
    ds = containers.ds
    with mounted(ds, rec["Device"], write=False) as new, mounted(ds, rec["InitDevice"], write=False) as old:
        index = InodeIndex.load(containers.dir, str(rec["Name"])) or InodeIndex.build(old)
        bs = new.block_size
        blocks = changed_blocks(containers, rec, bs)
        isz = new.inode_size
        per_block = bs // isz
        itables = new.inode_table_blocks()
        inodes: set[int] = set()
        content: set[int] = set()
        for blk in blocks:
            for start, itable_len, first in itables:
                if start <= blk < start + itable_len:
                    a = old.device.read(blk * bs, bs)
                    b = new.device.read(blk * bs, bs)
                    for slot in range(per_block):
                        lo = slot * isz
                        if a[lo:lo + isz] != b[lo:lo + isz]:
                            inodes.add(first + (blk - start) * per_block + slot)
                    break
            else:
                content.add(blk)
        # content blocks that belonged to a file when the container was made: its inode is a candidate even
        # when its inode slot did not change (a rewrite that puts mtime back within the same second)
        inodes.update(index.owners(content))
        changes: dict[str, str] = {}

        def add_tree(path: str, rel: str) -> None:
            for e in new.scandir(path):
                changes[rel.rstrip("/") + "/" + e.name] = ADD
                if e.is_dir:
                    add_tree(path.rstrip("/") + "/" + e.name, rel.rstrip("/") + "/" + e.name)

        for ino in sorted(inodes):
            if ino < new.first_ino and ino != ROOT_INO:
                continue
            ni, oi = new.inode_stat(ino), old.inode_stat(ino)
            if ni is None or oi is None or ino not in index:
                continue  # new or freed inodes are named by the directories that changed
            nb, ob = _blocks(new, ino), _blocks(old, ino)
            if ni.size == oi.size and nb == ob and not (nb & content):
                continue  # metadata only
            n_dir, o_dir = S.S_ISDIR(ni.mode), S.S_ISDIR(oi.mode)
            if n_dir and o_dir:
                after = dict(new.dir_entries_by_ino(ino))
                before = dict(old.dir_entries_by_ino(ino))
                for rel in index.paths(ino):
                    path = ROOTFS + ("" if rel == "/" else rel)
                    for n in sorted(set(after) | set(before), key=os.fsencode):
                        child = rel.rstrip("/") + "/" + n
                        if n not in before:
                            changes[child] = ADD
                            cst = new.inode_stat(after[n])
                            if cst is not None and S.S_ISDIR(cst.mode):
                                add_tree(path.rstrip("/") + "/" + n, child)
                        elif n not in after:
                            changes[child] = DELETE
                        elif after[n] != before[n]:
                            changes[child] = MODIFY
            elif not n_dir:
                for rel in index.paths(ino):
                    changes.setdefault(rel, MODIFY)
        for p in list(changes):
            parts = p.strip("/").split("/")
            for i in range(1, len(parts)):
                parent = "/" + "/".join(parts[:i])
                if changes.get(parent) not in (ADD,):
                    changes[parent] = MODIFY
        changes.pop("/", None)
    return [Change(p, k) for p, k in sorted(changes.items(), key=lambda pk: pk[0].split("/"))]
