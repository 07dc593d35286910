"""Block and inode allocation: the per-group bitmaps, group descriptors and free counts, kept consistent.

Layer: fs. May import: thinpool.io.device, thinpool.errors, numpy.

Bitmaps are loaded lazily per group as ``uint8`` numpy arrays (bit ``i`` of the group is ``byte[i >> 3] >> (i & 7)``,
little-endian bit order as ext2 uses). Every allocation and free updates the bitmap, the group descriptor counts and
the superblock counts together, so the three always agree; :meth:`Allocator.write_back` writes dirty bitmaps.
Callers check :attr:`Allocator.free_blocks` before they start changing anything (FsNoSpace loses nothing).

Blocks freed since the last commit are *pinned*: free in the bitmaps and counts that the next flush writes, but not
handed out again until :meth:`Allocator.unpin` (called after the device flush that commits). So nothing committed is
overwritten before the commit that frees it: a replaced or deleted file's blocks keep its old contents, and an
aborted transaction (a failed command) finds the old file intact (dm-thin's space maps follow the same rule).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from thinpool.errors import FsCorrupt, FsNoSpace
from thinpool.fs.layout import GroupDesc, Superblock
from thinpool.io.device import BlockDevice

U8 = npt.NDArray[np.uint8]


class Allocator:
    """Bitmaps and counters of one file system."""

    def __init__(self, device: BlockDevice, sb: Superblock, groups: list[GroupDesc]) -> None:
        self.device = device
        self.sb = sb
        self.groups = groups
        self.block_size = sb.block_size
        self.bpg = sb.s_blocks_per_group
        self.ipg = sb.s_inodes_per_group
        self.first_data_block = sb.s_first_data_block
        self._bbm: dict[int, U8] = {}
        self._ibm: dict[int, U8] = {}
        self._dirty_bbm: set[int] = set()
        self._dirty_ibm: set[int] = set()
        self._hint: dict[int, int] = {}  # group -> bit index to start the next single-block search at
        self._ihint: dict[int, int] = {}  # group -> inode index below which every inode is probably in use
        self._pinned: dict[int, U8] = {}  # group -> bitmap of blocks freed since the last commit
        self.nr_pinned = 0  # blocks
        self.gd_dirty = False

    # --- bitmaps ----------------------------------------------------------------------------------------------
    def group_nr_blocks(self, group: int) -> int:
        first = self.first_data_block + group * self.bpg
        return min(self.bpg, self.sb.s_blocks_count - first)

    def block_bitmap(self, group: int) -> U8:
        bm = self._bbm.get(group)
        if bm is None:
            blk = self.groups[group].bg_block_bitmap
            bm = np.frombuffer(bytearray(self.device.read(blk * self.block_size, self.block_size)), np.uint8)
            self._bbm[group] = bm
        return bm

    def inode_bitmap(self, group: int) -> U8:
        bm = self._ibm.get(group)
        if bm is None:
            blk = self.groups[group].bg_inode_bitmap
            bm = np.frombuffer(bytearray(self.device.read(blk * self.block_size, self.block_size)), np.uint8)
            self._ibm[group] = bm
        return bm

    def set_block_bitmap(self, group: int, bm: U8) -> None:
        """Install a whole bitmap (mkfs)."""
        self._bbm[group] = bm
        self._dirty_bbm.add(group)

    def set_inode_bitmap(self, group: int, bm: U8) -> None:
        self._ibm[group] = bm
        self._dirty_ibm.add(group)

    def block_in_use(self, block: int) -> bool:
        g, i = divmod(block - self.first_data_block, self.bpg)
        return bool(self.block_bitmap(g)[i >> 3] >> (i & 7) & 1)

    def inode_in_use(self, ino: int) -> bool:
        g, i = divmod(ino - 1, self.ipg)
        return bool(self.inode_bitmap(g)[i >> 3] >> (i & 7) & 1)

    # --- counters ---------------------------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        """Blocks that can be allocated now (free, and not freed since the last commit)."""
        return self.sb.s_free_blocks_count - self.nr_pinned

    def unpin(self) -> None:
        """The frees are committed: their blocks may be allocated again."""
        self._pinned.clear()
        self.nr_pinned = 0

    def _busy(self, group: int) -> U8:
        """The group's bitmap with pinned blocks counted as used (what allocation may not take)."""
        bm = self.block_bitmap(group)
        pinned = self._pinned.get(group)
        return bm if pinned is None else bm | pinned

    @property
    def free_inodes(self) -> int:
        return self.sb.s_free_inodes_count

    def _account_blocks(self, group: int, delta_free: int) -> None:
        self.groups[group].bg_free_blocks_count += delta_free
        self.sb.s_free_blocks_count += delta_free
        self.gd_dirty = True

    # --- blocks -----------------------------------------------------------------------------------------------
    def alloc_blocks(self, goal: int, count: int) -> list[int]:
        """Allocate ``count`` blocks, the first at or after ``goal`` where possible, preferring consecutive ones.

        Raises:
            FsNoSpace: fewer than ``count`` free blocks (nothing is allocated then).
        """
        if count <= 0:
            return []
        if count > self.free_blocks:
            raise FsNoSpace(reason=f"{count} block(s) needed, {self.free_blocks} free")
        out: list[int] = []
        nr_groups = len(self.groups)
        if not self.first_data_block <= goal < self.sb.s_blocks_count:
            goal = self.first_data_block
        g0, start = divmod(goal - self.first_data_block, self.bpg)
        if count == 1:
            b = self._alloc_one_fast(g0, start)
            if b is not None:
                return [b]
        for k in range(nr_groups + 1):
            g = (g0 + k) % nr_groups
            if self.groups[g].bg_free_blocks_count == 0:
                continue
            lo = start if k == 0 else 0
            out.extend(self._alloc_in_group(g, lo, count - len(out)))
            if len(out) == count:
                return out
            if k == 0 and start > 0:
                out.extend(self._alloc_in_group(g, 0, count - len(out)))
                if len(out) == count:
                    return out
        raise FsCorrupt(reason=f"free block count says {self.free_blocks} allocatable but the bitmaps disagree")

    def _alloc_one_fast(self, group: int, start: int) -> int | None:
        """Find a free bit with a short Python scan from the goal or the group's hint (small files)."""
        if self.groups[group].bg_free_blocks_count == 0:
            return None
        bm = self.block_bitmap(group)
        i = _scan_free_bit(self._busy(group), max(start, self._hint.get(group, 0)), self.group_nr_blocks(group))
        if i is None:
            return None
        bm[i >> 3] |= np.uint8(1 << (i & 7))
        self._dirty_bbm.add(group)
        self._account_blocks(group, -1)
        self._hint[group] = i + 1
        return self.first_data_block + group * self.bpg + i

    def _alloc_in_group(self, group: int, lo: int, want: int) -> list[int]:
        bm = self.block_bitmap(group)
        nbits = self.group_nr_blocks(group)
        bits = np.unpackbits(bm, bitorder="little")[:nbits]
        busy = bits if group not in self._pinned else np.unpackbits(self._busy(group), bitorder="little")[:nbits]
        free = np.flatnonzero(busy[lo:] == 0)[:want] + lo
        if free.size == 0:
            return []
        bits[free] = 1
        bm[:] = np.packbits(np.concatenate([bits, np.ones(len(bm) * 8 - nbits, np.uint8)]), bitorder="little") \
            if nbits < len(bm) * 8 else np.packbits(bits, bitorder="little")
        self._dirty_bbm.add(group)
        self._account_blocks(group, -int(free.size))
        self._hint[group] = int(free[-1]) + 1
        base = self.first_data_block + group * self.bpg
        return [base + int(i) for i in free]

    def free_blocks_list(self, blocks: list[int] | npt.NDArray[np.int64]) -> None:
        """Return ``blocks`` to the free pool (each must be in use)."""
        if len(blocks) == 0:
            return
        arr = np.asarray(blocks, dtype=np.int64) - self.first_data_block
        groups = arr // self.bpg
        for g in np.unique(groups):
            g = int(g)
            idx = arr[groups == g] - g * self.bpg
            bm = self.block_bitmap(g)
            bits = np.unpackbits(bm, bitorder="little")
            if not bits[idx].all():
                bad = int(idx[bits[idx] == 0][0]) + g * self.bpg + self.first_data_block
                raise FsCorrupt(reason=f"freeing block {bad}, which the block bitmap of group {g} says is free",
                                block=bad)
            bits[idx] = 0
            bm[:] = np.packbits(bits, bitorder="little")
            pinned = self._pinned.get(g)
            if pinned is None:
                pinned = self._pinned[g] = np.zeros_like(bm)
            pbits = np.unpackbits(pinned, bitorder="little")
            pbits[idx] = 1
            pinned[:] = np.packbits(pbits, bitorder="little")
            self.nr_pinned += int(idx.size)
            self._dirty_bbm.add(g)
            self._account_blocks(g, int(idx.size))
            self._hint[g] = min(self._hint.get(g, 0), int(idx.min()))

    def mark_blocks_used(self, blocks: list[int]) -> None:
        """Mark specific free blocks in use (mkfs)."""
        for b in blocks:
            g, i = divmod(b - self.first_data_block, self.bpg)
            bm = self.block_bitmap(g)
            bm[i >> 3] |= np.uint8(1 << (i & 7))
            self._dirty_bbm.add(g)
            self._account_blocks(g, -1)

    # --- inodes -----------------------------------------------------------------------------------------------
    def alloc_inode(self, goal_group: int, is_dir: bool) -> int:
        """Allocate an inode, in ``goal_group`` when it has one free (the first free after s_first_ino).

        Raises:
            FsNoSpace: no free inode.
        """
        if self.sb.s_free_inodes_count == 0:
            raise FsNoSpace(reason="no free inodes")
        nr_groups = len(self.groups)
        if is_dir and nr_groups > 1:
            # spread directories (a simple form of the Orlov allocator): the group with most free inodes
            goal_group = max(range(nr_groups), key=lambda g: (self.groups[g].bg_free_inodes_count,
                                                              self.groups[g].bg_free_blocks_count))
        for k in range(nr_groups):
            g = (goal_group + k) % nr_groups
            gd = self.groups[g]
            if gd.bg_free_inodes_count == 0:
                continue
            bm = self.inode_bitmap(g)
            lo = max(0, self.sb.s_first_ino - 1 - g * self.ipg, self._ihint.get(g, 0))
            i = _scan_free_bit(bm, lo, self.ipg)
            if i is None:
                bits = np.unpackbits(bm, bitorder="little")[:self.ipg]
                lo = max(0, self.sb.s_first_ino - 1 - g * self.ipg)
                free = np.flatnonzero(bits[lo:] == 0)
                if free.size == 0:
                    continue
                i = int(free[0]) + lo
            self._ihint[g] = i + 1
            bm[i >> 3] |= np.uint8(1 << (i & 7))
            self._dirty_ibm.add(g)
            gd.bg_free_inodes_count -= 1
            self.sb.s_free_inodes_count -= 1
            if is_dir:
                gd.bg_used_dirs_count += 1
            self.gd_dirty = True
            return g * self.ipg + i + 1
        raise FsCorrupt(reason=f"free inode count says {self.sb.s_free_inodes_count} free but the bitmaps disagree")

    def free_inode(self, ino: int, is_dir: bool) -> None:
        g, i = divmod(ino - 1, self.ipg)
        bm = self.inode_bitmap(g)
        if not (bm[i >> 3] >> (i & 7)) & 1:
            raise FsCorrupt(reason=f"freeing inode {ino}, which the inode bitmap says is free", inode=ino)
        bm[i >> 3] &= np.uint8(~(1 << (i & 7)) & 0xFF)
        self._dirty_ibm.add(g)
        self._ihint[g] = min(self._ihint.get(g, 0), i)
        gd = self.groups[g]
        gd.bg_free_inodes_count += 1
        self.sb.s_free_inodes_count += 1
        if is_dir:
            gd.bg_used_dirs_count -= 1
        self.gd_dirty = True

    def mark_inode_used(self, ino: int, is_dir: bool) -> None:
        g, i = divmod(ino - 1, self.ipg)
        bm = self.inode_bitmap(g)
        bm[i >> 3] |= np.uint8(1 << (i & 7))
        self._dirty_ibm.add(g)
        self.groups[g].bg_free_inodes_count -= 1
        self.sb.s_free_inodes_count -= 1
        if is_dir:
            self.groups[g].bg_used_dirs_count += 1
        self.gd_dirty = True

    # --- persistence ------------------------------------------------------------------------------------------
    def dirty_bitmap_blocks(self) -> list[int]:
        """Block numbers of the bitmaps :meth:`write_back` will write."""
        return sorted([self.groups[g].bg_block_bitmap for g in self._dirty_bbm] +
                      [self.groups[g].bg_inode_bitmap for g in self._dirty_ibm])

    def write_back(self) -> None:
        bs = self.block_size
        for g in sorted(self._dirty_bbm):
            self.device.write(self.groups[g].bg_block_bitmap * bs, self._bbm[g].tobytes())
        for g in sorted(self._dirty_ibm):
            self.device.write(self.groups[g].bg_inode_bitmap * bs, self._ibm[g].tobytes())
        self._dirty_bbm.clear()
        self._dirty_ibm.clear()


def _scan_free_bit(bm: U8, pos: int, nbits: int, max_bytes: int = 64) -> int | None:
    """First clear bit at or after ``pos`` (and below ``nbits``) within ``max_bytes`` bytes, by a Python scan."""
    byte = pos >> 3
    end = min(byte + max_bytes, (nbits + 7) >> 3)
    while byte < end:
        v = int(bm[byte])
        if v != 0xFF:
            for bit in range(8):
                i = byte * 8 + bit
                if i >= pos and i < nbits and not (v >> bit) & 1:
                    return i
        byte += 1
    return None
