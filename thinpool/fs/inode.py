"""Inodes in core and their block maps: 12 direct blocks plus single, double and triple indirect blocks.

Layer: fs. May import: thinpool.errors, numpy.

Logical block ``l`` of a file (``A`` = block_size / 4 pointers per indirect block)::

    l < 12                        i_block[l]
    l < 12 + A                    i_block[12] -> [l - 12]
    l < 12 + A + A^2              i_block[13] -> [q // A] -> [q % A]          (q = l - 12 - A)
    otherwise                     i_block[14] -> [r // A^2] -> [r // A % A] -> [r % A]

A 0 pointer is a hole (reads as zeros). Indirect blocks live in the metadata cache as writable ``<u4`` numpy views;
data blocks never do. ``i_blocks`` counts 512-byte sectors of data and indirect blocks together.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt

from thinpool.errors import FsCorrupt
from thinpool.fs.layout import (
    DIND_BLOCK,
    FAST_SYMLINK_MAX,
    IND_BLOCK,
    INODE_FMT,
    N_BLOCKS,
    NDIR_BLOCKS,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    S_IFSOCK,
    TIND_BLOCK,
)

U32 = npt.NDArray[np.uint32]


@dataclasses.dataclass(slots=True)
class Inode:
    """``struct ext2_inode`` in core (``i_block`` as a list of 15 block numbers)."""

    i_mode: int = 0
    i_uid: int = 0
    i_size: int = 0
    i_atime: int = 0
    i_ctime: int = 0
    i_mtime: int = 0
    i_dtime: int = 0
    i_gid: int = 0
    i_links_count: int = 0
    i_blocks: int = 0
    i_flags: int = 0
    i_osd1: int = 0
    i_block: list[int] = dataclasses.field(default_factory=lambda: [0] * N_BLOCKS)
    i_generation: int = 0
    i_file_acl: int = 0
    i_size_high: int = 0
    i_faddr: int = 0
    l_i_blocks_hi: int = 0
    l_i_file_acl_high: int = 0
    l_i_uid_high: int = 0
    l_i_gid_high: int = 0
    l_i_checksum_lo: int = 0
    l_i_reserved: int = 0

    @property
    def file_type(self) -> int:
        return self.i_mode & S_IFMT

    @property
    def is_dir(self) -> bool:
        return self.i_mode & S_IFMT == S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.i_mode & S_IFMT == S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.i_mode & S_IFMT == S_IFLNK

    @property
    def size(self) -> int:
        """Size in bytes (i_size_high only counts for regular files, as in revision 1 with large_file)."""
        if self.is_reg:
            return self.i_size | (self.i_size_high << 32)
        return self.i_size

    @size.setter
    def size(self, value: int) -> None:
        self.i_size = value & 0xFFFFFFFF
        if self.is_reg:
            self.i_size_high = value >> 32

    @property
    def uid(self) -> int:
        return self.i_uid | (self.l_i_uid_high << 16)

    @property
    def gid(self) -> int:
        return self.i_gid | (self.l_i_gid_high << 16)

    @property
    def is_fast_symlink(self) -> bool:
        """A symlink whose target lives in ``i_block`` (``ext2_inode_is_fast_symlink``: no data blocks; with an
        xattr block counted in ``i_blocks``, a target short enough for ``i_block``, as e2fsprogs decides)."""
        if not self.is_symlink:
            return False
        if self.i_file_acl == 0:
            return self.i_blocks == 0
        return self.i_size <= FAST_SYMLINK_MAX

    @property
    def is_special(self) -> bool:
        """A FIFO, socket, character or block device: no data blocks (a device number in ``i_block``)."""
        return self.i_mode & S_IFMT in (S_IFIFO, S_IFSOCK, S_IFCHR, S_IFBLK)

    @property
    def is_device(self) -> bool:
        return self.i_mode & S_IFMT in (S_IFCHR, S_IFBLK)

    @property
    def has_blocks(self) -> bool:
        """True when ``i_block`` holds block pointers (regular files, directories, slow symlinks)."""
        return not (self.is_special or self.is_fast_symlink)

    @property
    def rdev(self) -> int:
        """The device number of a device node (``ext2_read_inode``: old encoding in i_block[0], else new in
        i_block[1]), as ``os.makedev`` builds it; 0 for other inodes."""
        if not self.is_device:
            return 0
        if self.i_block[0]:
            old = self.i_block[0]
            return os.makedev((old >> 8) & 0xFF, old & 0xFF)
        new = self.i_block[1]
        return os.makedev((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))

    @rdev.setter
    def rdev(self, rdev: int) -> None:
        """Store a device number as ``ext2_write_inode`` does: the old 8:8 encoding when it fits, else the new
        12:20 one in i_block[1]."""
        major, minor = os.major(rdev), os.minor(rdev)
        self.i_block = [0] * N_BLOCKS
        if major < 256 and minor < 256:
            self.i_block[0] = (major << 8) | minor
        else:
            self.i_block[1] = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def parse_inode(buf: bytes | bytearray | memoryview, offset: int = 0) -> Inode:
    v = INODE_FMT.unpack_from(buf, offset)
    return Inode(*v[:12], list(v[12:27]), *v[27:])  # type: ignore[call-arg]  # 12 + i_block + 11 fields


def build_inode_into(inode: Inode, buf: bytearray, offset: int) -> None:
    d = inode
    INODE_FMT.pack_into(buf, offset, d.i_mode, d.i_uid, d.i_size, d.i_atime, d.i_ctime, d.i_mtime, d.i_dtime,
                        d.i_gid, d.i_links_count, d.i_blocks, d.i_flags, d.i_osd1, *d.i_block, d.i_generation,
                        d.i_file_acl, d.i_size_high, d.i_faddr, d.l_i_blocks_hi, d.l_i_file_acl_high,
                        d.l_i_uid_high, d.l_i_gid_high, d.l_i_checksum_lo, d.l_i_reserved)


class BlockMapper:
    """Maps, allocates and frees the logical blocks of one inode at a time.

    ``read_node(block)`` returns a writable ``<u4`` view of a cached indirect block; ``new_node(block)`` a zeroed
    one; ``dirty(block)`` marks a node changed; ``alloc(goal, n)`` allocates blocks; ``free(blocks)`` frees them;
    ``valid(block)`` says whether a block number may be referenced at all.
    """

    def __init__(self, block_size: int, read_node: Callable[[int], U32], new_node: Callable[[int], U32],
                 dirty: Callable[[int], None], alloc: Callable[[int, int], list[int]],
                 free: Callable[[list[int]], None], nr_blocks: int) -> None:
        self.apb = block_size // 4  # addresses per indirect block
        self.sectors_per_block = block_size // 512
        self.read_node = read_node
        self.new_node = new_node
        self.dirty = dirty
        self.alloc = alloc
        self.free = free
        self.nr_blocks = nr_blocks
        a = self.apb
        self.limits = (NDIR_BLOCKS, NDIR_BLOCKS + a, NDIR_BLOCKS + a + a * a, NDIR_BLOCKS + a + a * a + a * a * a)

    @property
    def max_blocks(self) -> int:
        return self.limits[3]

    # --- paths ------------------------------------------------------------------------------------------------
    def _path(self, lblock: int) -> tuple[int, tuple[int, ...]]:
        """(i_block slot, indices inside each indirect level) of a logical block."""
        a = self.apb
        if lblock < NDIR_BLOCKS:
            return lblock, ()
        q = lblock - NDIR_BLOCKS
        if q < a:
            return IND_BLOCK, (q,)
        q -= a
        if q < a * a:
            return DIND_BLOCK, (q // a, q % a)
        q -= a * a
        return TIND_BLOCK, (q // (a * a), q // a % a, q % a)

    def _segments(self, l0: int, n: int) -> Iterator[tuple[int, tuple[int, ...], int, int]]:
        """Split [l0, l0+n) into runs sharing one leaf: (slot, leaf path, index of l in leaf, count).

        For direct blocks the path is empty and the index is the i_block slot.
        """
        end = l0 + n
        lblock = l0
        while lblock < end:
            slot, idx = self._path(lblock)
            if not idx:
                cnt = min(end, NDIR_BLOCKS) - lblock
                yield slot, (), lblock, cnt
            else:
                cnt = min(end - lblock, self.apb - idx[-1])
                yield slot, idx[:-1], idx[-1], cnt
            lblock += cnt

    def _check_ptr(self, ino: int, ptr: int, what: str) -> None:
        if ptr >= self.nr_blocks:
            raise FsCorrupt(reason=f"inode {ino}: {what} points at block {ptr}, past the end of the file system "
                                   f"({self.nr_blocks} blocks)", inode=ino, block=ptr)

    def _leaf(self, ino: int, inode: Inode, slot: int, path: tuple[int, ...], create: bool,
              goal: int, new_blocks: list[int] | None) -> tuple[int, U32 | None]:
        """The leaf indirect block of ``slot``/``path`` (block number and view); (0, None) if absent."""
        blk = inode.i_block[slot]
        if blk == 0:
            if not create:
                return 0, None
            blk = self.alloc(goal, 1)[0]
            self.new_node(blk)
            inode.i_block[slot] = blk
            inode.i_blocks += self.sectors_per_block
            assert new_blocks is not None
            new_blocks.append(blk)
        self._check_ptr(ino, blk, "an indirect block pointer")
        node = self.read_node(blk)
        for i in path:
            child = int(node[i])
            if child == 0:
                if not create:
                    return 0, None
                child = self.alloc(goal, 1)[0]
                self.new_node(child)
                node[i] = child
                self.dirty(blk)
                inode.i_blocks += self.sectors_per_block
                assert new_blocks is not None
                new_blocks.append(child)
            self._check_ptr(ino, child, "an indirect block pointer")
            blk = child
            node = self.read_node(blk)
        return blk, node

    # --- lookup -----------------------------------------------------------------------------------------------
    def map(self, ino: int, inode: Inode, l0: int, n: int) -> npt.NDArray[np.int64]:
        """Physical block of each logical block in [l0, l0+n); 0 marks a hole."""
        if l0 + n <= NDIR_BLOCKS:  # small files: no numpy reductions
            direct = inode.i_block[l0:l0 + n]
            for b in direct:
                if b >= self.nr_blocks:
                    self._check_ptr(ino, b, "a data block pointer")
            return np.array(direct, np.int64)
        out = np.zeros(n, np.int64)
        pos = 0
        for slot, path, idx, cnt in self._segments(l0, n):
            if slot < NDIR_BLOCKS:
                out[pos:pos + cnt] = inode.i_block[idx:idx + cnt]
            else:
                _, node = self._leaf(ino, inode, slot, path, False, 0, None)
                if node is not None:
                    out[pos:pos + cnt] = node[idx:idx + cnt]
            pos += cnt
        if n and int(out.max()) >= self.nr_blocks:
            bad = int(out[out >= self.nr_blocks][0])
            self._check_ptr(ino, bad, "a data block pointer")
        return out

    def mapped_runs(self, ino: int, inode: Inode) -> Iterator[tuple[int, int]]:
        """(first logical block, count) of each run of mapped data blocks, in order; holes (and absent indirect
        subtrees) are skipped without being visited, so the cost follows the mapped blocks, not the file size."""
        run_start, run_len = -1, 0
        for lblock, present in self._mapped(ino, inode):
            n = int(present.size)
            if n == 0:
                continue
            idx = np.flatnonzero(present)
            if idx.size == 0:
                continue
            # split the leaf's mapped slots into consecutive runs
            breaks = np.flatnonzero(np.diff(idx) != 1) + 1
            for part in np.split(idx, breaks):
                first = lblock + int(part[0])
                if run_len and run_start + run_len == first:
                    run_len += int(part.size)
                else:
                    if run_len:
                        yield run_start, run_len
                    run_start, run_len = first, int(part.size)
        if run_len:
            yield run_start, run_len

    def _mapped(self, ino: int, inode: Inode) -> Iterator[tuple[int, npt.NDArray[np.bool_]]]:
        """(first logical block, mask of mapped slots) for the direct blocks and every present leaf."""
        yield 0, np.array(inode.i_block[:NDIR_BLOCKS], np.int64) != 0
        for slot, depth, first in ((IND_BLOCK, 1, self.limits[0]), (DIND_BLOCK, 2, self.limits[1]),
                                   (TIND_BLOCK, 3, self.limits[2])):
            blk = inode.i_block[slot]
            if blk:
                yield from self._mapped_below(ino, blk, depth, first)

    def _mapped_below(self, ino: int, blk: int, depth: int, first: int) -> Iterator[tuple[int, npt.NDArray[np.bool_]]]:
        self._check_ptr(ino, blk, "an indirect block pointer")
        node = self.read_node(blk)
        if depth == 1:
            yield first, node != 0
            return
        span = self.apb ** (depth - 1)
        children = [(i, int(node[i])) for i in np.flatnonzero(node)]
        for i, child in children:
            yield from self._mapped_below(ino, child, depth - 1, first + int(i) * span)

    def count_new(self, ino: int, inode: Inode, l0: int, n: int) -> int:
        """How many blocks (data + indirect) mapping [l0, l0+n) fully would allocate."""
        if l0 + n <= NDIR_BLOCKS:
            return inode.i_block[l0:l0 + n].count(0)
        needed = 0
        missing_nodes: set[tuple[int, ...]] = set()
        for slot, path, idx, cnt in self._segments(l0, n):
            if slot < NDIR_BLOCKS:
                needed += sum(1 for b in inode.i_block[idx:idx + cnt] if b == 0)
                continue
            # walk the chain, counting absent nodes once
            blk = inode.i_block[slot]
            node = self.read_node(blk) if blk else None
            if node is None:
                missing_nodes.add((slot,))
            full: tuple[int, ...] = (slot,)
            for i in path:
                full = full + (i,)
                child = int(node[i]) if node is not None else 0
                if child == 0:
                    missing_nodes.add(full)
                    node = None
                else:
                    self._check_ptr(ino, child, "an indirect block pointer")
                    node = self.read_node(child)
            if node is None:
                needed += cnt
            else:
                needed += int(np.count_nonzero(node[idx:idx + cnt] == 0))
        return needed + len(missing_nodes)

    # --- allocation -------------------------------------------------------------------------------------------
    def ensure(self, ino: int, inode: Inode, l0: int, n: int, goal: int) -> tuple[npt.NDArray[np.int64],
                                                                                  npt.NDArray[np.bool_]]:
        """Map every block of [l0, l0+n), allocating holes. Returns (physical blocks, newly allocated mask).

        The caller has checked there is room (``count_new``); data blocks come as one batch near ``goal``.
        """
        if l0 + n <= NDIR_BLOCKS:  # small files: plain Python on i_block
            blocks = inode.i_block
            holes = [k for k in range(l0, l0 + n) if blocks[k] == 0]
            new_mask = np.zeros(n, np.bool_)
            if holes:
                for k, b in zip(holes, self.alloc(goal, len(holes))):
                    blocks[k] = b
                    new_mask[k - l0] = True
                inode.i_blocks += len(holes) * self.sectors_per_block
            return self.map(ino, inode, l0, n), new_mask
        phys = self.map(ino, inode, l0, n)
        new_mask = phys == 0
        nr_new = int(new_mask.sum())
        if nr_new == 0:
            return phys, new_mask
        if goal == 0:
            mapped = phys[phys != 0]
            goal = int(mapped[-1]) + 1 if mapped.size else goal
        data = self.alloc(goal, nr_new)
        phys[new_mask] = data
        inode.i_blocks += nr_new * self.sectors_per_block
        pos = 0
        meta_new: list[int] = []
        node_goal = data[0]
        for slot, path, idx, cnt in self._segments(l0, n):
            seg = phys[pos:pos + cnt]
            segnew = new_mask[pos:pos + cnt]
            if segnew.any():
                if slot < NDIR_BLOCKS:
                    for k in range(cnt):
                        if segnew[k]:
                            inode.i_block[idx + k] = int(seg[k])
                else:
                    leaf_blk, node = self._leaf(ino, inode, slot, path, True, node_goal, meta_new)
                    assert node is not None
                    node[idx:idx + cnt] = np.where(segnew, seg, node[idx:idx + cnt])
                    self.dirty(leaf_blk)
            pos += cnt
        return phys, new_mask

    def unmap(self, ino: int, inode: Inode, l0: int, mask: npt.NDArray[np.bool_]) -> None:
        """Undo part of :meth:`ensure`: free the data blocks of [l0, l0+len(mask)) where ``mask`` is set and set
        their pointers back to 0 (indirect blocks it created stay, empty, counted in ``i_blocks``)."""
        freed: list[int] = []
        pos = 0
        for slot, path, idx, cnt in self._segments(l0, len(mask)):
            seg = mask[pos:pos + cnt]
            if seg.any():
                if slot < NDIR_BLOCKS:
                    for k in range(cnt):
                        if seg[k]:
                            freed.append(inode.i_block[idx + k])
                            inode.i_block[idx + k] = 0
                else:
                    leaf_blk, node = self._leaf(ino, inode, slot, path, False, 0, None)
                    assert node is not None
                    freed.extend(int(b) for b in node[idx:idx + cnt][seg])
                    node[idx:idx + cnt][seg] = 0
                    self.dirty(leaf_blk)
            pos += cnt
        if freed:
            self.free(freed)
            inode.i_blocks -= len(freed) * self.sectors_per_block

    # --- freeing ----------------------------------------------------------------------------------------------
    def truncate_blocks(self, ino: int, inode: Inode, nr_keep: int) -> list[int]:
        """Free every data block at logical index >= ``nr_keep`` and every indirect block left empty.

        Returns the freed block numbers (already released through ``free``); ``i_blocks`` is updated.
        """
        freed: list[int] = []
        for slot in range(NDIR_BLOCKS):
            if slot >= nr_keep and inode.i_block[slot]:
                freed.append(inode.i_block[slot])
                inode.i_block[slot] = 0
        a = self.apb
        first = {IND_BLOCK: self.limits[0], DIND_BLOCK: self.limits[1], TIND_BLOCK: self.limits[2]}
        depth = {IND_BLOCK: 1, DIND_BLOCK: 2, TIND_BLOCK: 3}
        for slot in (IND_BLOCK, DIND_BLOCK, TIND_BLOCK):
            blk = inode.i_block[slot]
            if blk == 0:
                continue
            if self._trim(ino, blk, depth[slot], first[slot], nr_keep, freed, a):
                freed.append(blk)
                inode.i_block[slot] = 0
        if freed:
            self.free(freed)
            inode.i_blocks -= len(freed) * self.sectors_per_block
        return freed

    def _trim(self, ino: int, blk: int, depth: int, first_l: int, nr_keep: int, freed: list[int], a: int) -> bool:
        """Trim the subtree at ``blk`` (covering logical blocks from ``first_l``); True if it became unused."""
        self._check_ptr(ino, blk, "an indirect block pointer")
        span = a ** (depth - 1)  # logical blocks per entry
        if first_l >= nr_keep:
            self._collect(ino, blk, depth, freed)
            return True
        node = self.read_node(blk)
        start = max(0, (nr_keep - first_l) // span)  # first entry reaching past nr_keep
        changed = False
        for i in range(start, a):
            child = int(node[i])
            if child == 0:
                continue
            child_first = first_l + i * span
            if depth == 1:
                if child_first >= nr_keep:
                    freed.append(child)
                    node[i] = 0
                    changed = True
            elif self._trim(ino, child, depth - 1, child_first, nr_keep, freed, a):
                freed.append(child)
                node[i] = 0
                changed = True
        if changed:
            self.dirty(blk)
        return not node.any()

    def _collect(self, ino: int, blk: int, depth: int, freed: list[int]) -> None:
        """Append every block below indirect block ``blk`` (not ``blk`` itself) to ``freed``."""
        node = self.read_node(blk)
        children = [int(c) for c in node[node != 0]]
        for c in children:
            self._check_ptr(ino, c, "a block pointer")
        if depth > 1:
            for c in children:
                self._collect(ino, c, depth - 1, freed)
        freed.extend(children)
