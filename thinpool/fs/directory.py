"""Linear ext2 directories: parse, validate, look up, insert and remove ``ext2_dir_entry_2`` records.

Layer: fs. May import: thinpool.errors.

A directory is a sequence of blocks; each block is a chain of entries ``inode(4) rec_len(2) name_len(1)
file_type(1) name`` whose ``rec_len`` values add up to exactly one block. Inserting splits the slack off an entry
(or reuses an entry whose inode is 0); removing merges an entry into the one before it in the same block, or sets
its inode to 0 when it is the first in the block (what the kernel's ``ext2_delete_entry`` does).

:class:`Directory` keeps, per directory, a name index and the parsed entries of each block, so a lookup in a
directory of 10,000 names costs one dict access; every change is applied to the cached block and the index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from thinpool.errors import FsCorrupt
from thinpool.fs.layout import DIRENT_FMT, DIRENT_HEADER_SIZE, FT_DIR, rec_len_for

# Entry fields in the per-block lists: [offset, inode, rec_len, name_len, file_type, name]
OFF, INO, REC, NLEN, FTYPE, NAME = range(6)
Entry = list[Any]  # [offset, inode, rec_len, name_len, file_type, name]: int x5, bytes


def parse_dir_block(buf: bytes | bytearray, block: int, dir_ino: int, nr_inodes: int,
                    filetype: bool) -> list[Entry]:
    """Every record of one directory block (including ones with inode 0), validated.

    Raises:
        FsCorrupt: a record overruns the block, has a bad rec_len/name_len, or names an impossible inode.
    """
    bs = len(buf)
    out: list[Entry] = []
    off = 0
    unpack = DIRENT_FMT.unpack_from
    while off < bs:
        if off + DIRENT_HEADER_SIZE > bs:
            raise _bad(dir_ino, block, off, "entry header runs past the end of the block")
        ino, rec_len, name_len, ftype = unpack(buf, off)
        if not filetype:
            name_len |= ftype << 8
            ftype = 0
        if rec_len < 12:
            raise _bad(dir_ino, block, off, f"rec_len {rec_len} is too small")
        if rec_len % 4:
            raise _bad(dir_ino, block, off, f"rec_len {rec_len} is not a multiple of 4")
        if off + rec_len > bs:
            raise _bad(dir_ino, block, off, f"rec_len {rec_len} runs past the end of the block")
        if DIRENT_HEADER_SIZE + name_len > rec_len:
            raise _bad(dir_ino, block, off, f"name_len {name_len} does not fit in rec_len {rec_len}")
        if ino > nr_inodes:
            raise _bad(dir_ino, block, off, f"inode {ino} is past the last inode {nr_inodes}")
        if ino and name_len == 0:
            raise _bad(dir_ino, block, off, "entry with an inode has an empty name")
        name = bytes(buf[off + DIRENT_HEADER_SIZE:off + DIRENT_HEADER_SIZE + name_len])
        out.append([off, ino, rec_len, name_len, ftype, name])
        off += rec_len
    return out


def _bad(dir_ino: int, block: int, off: int, why: str) -> FsCorrupt:
    return FsCorrupt(reason=f"directory block {block} of inode {dir_ino}, offset {off}: {why}",
                     inode=dir_ino, block=block)


def init_dir_block(buf: bytearray, ino: int, parent: int, filetype: bool) -> None:
    """Write '.' and '..' (the rest of the block belongs to '..') into an empty first directory block."""
    ft = FT_DIR if filetype else 0
    DIRENT_FMT.pack_into(buf, 0, ino, 12, 1, ft)
    buf[8:12] = b".\0\0\0"
    DIRENT_FMT.pack_into(buf, 12, parent, len(buf) - 12, 2, ft)
    buf[20:24] = b"..\0\0"


def build_dir_block(entries: list[tuple[int, bytes, int]], block_size: int, filetype: bool) -> bytearray:
    """One directory block holding ``entries`` (inode, name, FT_* type) in order, each record as short as its name
    allows and the last one taking the rest of the block (as mke2fs lays out '.', '..' and lost+found)."""
    buf = bytearray(block_size)
    off = 0
    for k, (ino, name, ftype) in enumerate(entries):
        rec_len = block_size - off if k == len(entries) - 1 else rec_len_for(len(name))
        if filetype:
            DIRENT_FMT.pack_into(buf, off, ino, rec_len, len(name), ftype)
        else:
            DIRENT_FMT.pack_into(buf, off, ino, rec_len, len(name) & 0xFF, len(name) >> 8)
        buf[off + DIRENT_HEADER_SIZE:off + DIRENT_HEADER_SIZE + len(name)] = name
        off += rec_len
    return buf


def empty_dir_block(buf: bytearray) -> None:
    """One unused record spanning the whole block (a new directory block, as ``ext2_make_empty`` pads)."""
    DIRENT_FMT.pack_into(buf, 0, 0, len(buf), 0, 0)


class Directory:
    """One directory's entries, indexed by name.

    ``get_block(i)`` returns (physical block, mutable cached buffer) of directory block ``i`` (used while loading);
    ``read_block(phys)`` the cached buffer of a physical block; ``mark_dirty(phys)`` records a change;
    ``add_block()`` appends a block to the directory (growing i_size) and returns (physical block, buffer).
    """

    def __init__(self, ino: int, nr_blocks: int, get_block: Callable[[int], tuple[int, bytearray]],
                 mark_dirty: Callable[[int], None], add_block: Callable[[], tuple[int, bytearray]],
                 nr_inodes: int, filetype: bool, read_block: Callable[[int], bytearray]) -> None:
        self.ino = ino
        self.read_block = read_block
        self.mark_dirty = mark_dirty
        self.add_block = add_block
        self.nr_inodes = nr_inodes
        self.filetype = filetype
        self.blocks: list[list[Entry]] = []
        self.phys: list[int] = []  # physical block of each directory block
        self.max_slack: list[int] = []  # upper bound of the largest insertable gap in each block (bytes)
        self.index: dict[bytes, tuple[int, int, int]] = {}  # name -> (inode, file type, block index)
        self.parent = 0
        for i in range(nr_blocks):
            phys, buf = get_block(i)
            entries = parse_dir_block(buf, phys, ino, nr_inodes, filetype)
            self.blocks.append(entries)
            self.phys.append(phys)
            self.max_slack.append(max(_slack(e) for e in entries))
            for e in entries:
                if e[INO]:
                    self.index[e[NAME]] = (e[INO], e[FTYPE], i)
        dot = self.index.get(b".")
        dotdot = self.index.get(b"..")
        if dot is None or dotdot is None or dot[0] != ino:
            raise FsCorrupt(reason=f"directory inode {ino}: missing or wrong '.' / '..' entries", inode=ino)
        self.parent = dotdot[0]

    def _block(self, i: int) -> tuple[int, bytearray]:
        phys = self.phys[i]
        return phys, self.read_block(phys)

    def lookup(self, name: bytes) -> tuple[int, int] | None:
        hit = self.index.get(name)
        return None if hit is None else (hit[0], hit[1])

    def names(self) -> Iterator[tuple[bytes, int, int]]:
        """(name, inode, file type) of every entry except '.' and '..', in on-disk order."""
        for entries in self.blocks:
            for e in entries:
                if e[INO] and e[NAME] not in (b".", b".."):
                    yield e[NAME], e[INO], e[FTYPE]

    def __len__(self) -> int:
        return len(self.index) - 2

    def blocks_needed_for(self, name: bytes) -> int:
        """0 if ``name`` fits in an existing block, else 1 (the caller checks free space first)."""
        return 0 if self._find_space(rec_len_for(len(name))) is not None else 1

    def _find_space(self, need: int) -> tuple[int, int] | None:
        """(block index, entry index) of a record with ``need`` bytes of slack; tightens stale bounds on the way.

        The slack is usually in the last record of a block, so records are scanned from the end.
        """
        slack = self.max_slack
        for i in range(len(slack) - 1, -1, -1):
            if slack[i] < need:
                continue
            entries = self.blocks[i]
            best = 0
            for k in range(len(entries) - 1, -1, -1):
                e = entries[k]
                free = e[REC] if e[INO] == 0 else e[REC] - ((e[NLEN] + 11) & ~3)
                if free >= need:
                    return i, k
                if free > best:
                    best = free
            slack[i] = best
        return None

    def add(self, name: bytes, ino: int, ftype: int) -> None:
        """Insert an entry (the name must not exist; space for a new block must have been checked)."""
        hit = self._find_space(rec_len_for(len(name)))
        if hit is not None:
            self._insert_at(hit[0], hit[1], name, ino, ftype)
            return
        phys, buf = self.add_block()
        empty_dir_block(buf)
        self.phys.append(phys)
        self.blocks.append([[0, 0, len(buf), 0, 0, b""]])
        self.max_slack.append(len(buf))
        self._insert_at(len(self.blocks) - 1, 0, name, ino, ftype)

    def _insert_at(self, i: int, k: int, name: bytes, ino: int, ftype: int) -> None:
        phys, buf = self._block(i)
        entries = self.blocks[i]
        e = entries[k]
        ft = ftype if self.filetype else 0
        if e[INO] == 0:
            # reuse the unused record in place
            e[INO], e[NLEN], e[FTYPE], e[NAME] = ino, len(name), ft, name
            self._pack(buf, e)
        else:
            used = rec_len_for(e[NLEN])
            new = [e[OFF] + used, ino, e[REC] - used, len(name), ft, name]
            e[REC] = used
            self._pack(buf, e)
            self._pack(buf, new)
            entries.insert(k + 1, new)
        self.index[name] = (ino, ft, i)
        self.mark_dirty(phys)

    def _pack(self, buf: bytearray, e: Entry) -> None:
        off = e[OFF]
        if self.filetype:
            DIRENT_FMT.pack_into(buf, off, e[INO], e[REC], e[NLEN], e[FTYPE])
        else:
            DIRENT_FMT.pack_into(buf, off, e[INO], e[REC], e[NLEN] & 0xFF, e[NLEN] >> 8)
        n = e[NLEN]
        buf[off + 8:off + 8 + n] = e[NAME]
        pad = rec_len_for(n) - 8 - n
        if pad and off + 8 + n + pad <= off + e[REC]:
            buf[off + 8 + n:off + 8 + n + pad] = bytes(pad)

    def remove(self, name: bytes) -> int:
        """Remove ``name``; returns its inode number (the name must exist)."""
        ino, _, i = self.index.pop(name)
        phys, buf = self._block(i)
        entries = self.blocks[i]
        for k, e in enumerate(entries):  # noqa: B007 - k is the position found
            if e[INO] and e[NAME] == name:
                break
        else:  # pragma: no cover - the index and the block lists are kept in step
            raise FsCorrupt(reason=f"directory inode {self.ino}: index out of step for {name!r}", inode=self.ino)
        if k == 0:
            e[INO] = 0
            self._pack(buf, e)
            slack = e[REC]
        else:
            prev = entries[k - 1]
            prev[REC] += e[REC]
            del entries[k]
            self._pack(buf, prev)
            slack = _slack(prev)
        self.max_slack[i] = max(self.max_slack[i], slack)
        self.mark_dirty(phys)
        return int(ino)

    def set_inode(self, name: bytes, ino: int, ftype: int) -> None:
        """Point an existing entry at another inode (rename over an existing name, or '..' of a moved dir)."""
        _, _, i = self.index[name]
        phys, buf = self._block(i)
        for e in self.blocks[i]:
            if e[INO] and e[NAME] == name:
                e[INO] = ino
                e[FTYPE] = ftype if self.filetype else 0
                self._pack(buf, e)
                break
        self.index[name] = (ino, ftype if self.filetype else 0, i)
        if name == b"..":
            self.parent = ino
        self.mark_dirty(phys)


def _slack(e: Entry) -> int:
    """Bytes a new entry could take from record ``e``."""
    if e[INO] == 0:
        return int(e[REC])
    return int(e[REC]) - rec_len_for(e[NLEN])
