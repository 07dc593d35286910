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
   with the block map (``NAME.inodes.json``, ``NAME.blocks.npy``; the init device never changes afterwards), and
   from the changed directories.

Parents of changes are reported changed, as in the naive diff. Where the two disagree, on purpose: the block diff
sees a rewrite that keeps size and mtime (the naive diff cannot), and does not report metadata-only changes (mode,
owner, times, xattrs: no content block changes).
"""

from __future__ import annotations

import json
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
    """The ext2's block-to-inode map of the indexed inodes: rows (block, inode), sorted by block."""
    rows = [(b, ino) for ino in index for b in _blocks(fs, ino)]
    arr = np.array(sorted(rows), dtype="<u4").reshape(-1, 2)
    return arr


def save_index(fs: Filesystem, path: Path) -> None:
    """Write ``NAME.inodes.json`` (inode -> paths) and ``NAME.blocks.npy`` (block -> inode) of ``fs``."""
    index = inode_index(fs)
    path.write_text(json.dumps({str(k): v for k, v in index.items()}, separators=(",", ":")))
    np.save(_blocks_path(path), block_map(fs, index))


def _blocks_path(index_path: Path) -> Path:
    return index_path.with_name(index_path.name.replace(".inodes.json", ".blocks.npy"))


def _load_index(path: Path, fs: Filesystem) -> tuple[dict[int, list[str]], np.ndarray]:
    try:
        index = {int(k): v for k, v in json.loads(path.read_text()).items()}
        return index, np.load(_blocks_path(path))
    except FileNotFoundError:
        index = inode_index(fs)
        return index, block_map(fs, index)


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
        index, bmap = _load_index(containers.dir / f"{rec['Name']}.inodes.json", old)
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
        if content and len(bmap):
            want = np.array(sorted(content), dtype="<u4")
            pos = np.searchsorted(bmap[:, 0], want)
            hit = (pos < len(bmap)) & (bmap[np.minimum(pos, len(bmap) - 1), 0] == want)
            inodes.update(int(i) for i in bmap[pos[hit], 1])
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
                for rel in index[ino]:
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
                for rel in index[ino]:
                    changes.setdefault(rel, MODIFY)
        for p in list(changes):
            parts = p.strip("/").split("/")
            for i in range(1, len(parts)):
                parent = "/" + "/".join(parts[:i])
                if changes.get(parent) not in (ADD,):
                    changes[parent] = MODIFY
        changes.pop("/", None)
    return [Change(p, k) for p, k in sorted(changes.items(), key=lambda pk: pk[0].split("/"))]
