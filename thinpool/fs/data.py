"""File contents: read and write byte ranges through the block map, grow and shrink files, read symlinks.

Layer: fs. May import: thinpool.io.device, thinpool.errors, thinpool.fs.*, numpy.

The data path of :class:`FsData` never goes through the metadata cache: data blocks are read and written on the
device directly, in runs of consecutive blocks. Every write checks it has the blocks it needs before it maps
anything, and gives back what it mapped if the device refuses the write (a full thin pool).
"""

from __future__ import annotations

import errno as _errno

from thinpool.errors import (
    FsCorrupt,
    FsError,
)
from thinpool.fs import layout as L
from thinpool.fs.core import I_BLOCK_FMT, FsCore
from thinpool.fs.core import now as _now
from thinpool.fs.inode import Inode


class FsData(FsCore):
    """Byte-range access to an inode's data (callers hold the lock and have checked the inode)."""

    def _read(self, ino: int, inode: Inode, offset: int, length: int) -> bytes:
        size = inode.size
        if offset >= size or length <= 0:
            return b""
        length = min(length, size - offset)
        bs = self.block_size
        l0 = offset // bs
        l1 = (offset + length - 1) // bs + 1
        phys = self.mapper.map(ino, inode, l0, l1 - l0)
        parts: list[bytes] = []
        i = 0
        n = len(phys)
        while i < n:
            j = i + 1
            if phys[i] == 0:
                while j < n and phys[j] == 0:
                    j += 1
                parts.append(bytes((j - i) * bs))
            else:
                while j < n and phys[j] == phys[j - 1] + 1:
                    j += 1
                parts.append(self.device.read(int(phys[i]) * bs, (j - i) * bs))
            i = j
        data = b"".join(parts) if len(parts) != 1 else parts[0]
        start = offset - l0 * bs
        return data[start:start + length]

    def _write(self, ino: int, inode: Inode, offset: int, data: bytes | bytearray | memoryview,
               path: str = "") -> int:
        n = len(data)
        if n == 0:
            return 0
        bs = self.block_size
        end = offset + n
        if (end + bs - 1) // bs > self.mapper.max_blocks:
            raise FsError(reason=f"file too large: {path}", path=path, errno=_errno.EFBIG)
        l0 = offset // bs
        l1 = (end - 1) // bs + 1
        self._need(self.mapper.count_new(ino, inode, l0, l1 - l0), path=path)
        phys, new = self.mapper.ensure(ino, inode, l0, l1 - l0, self._goal(ino, inode, l0))
        head = offset - l0 * bs
        tail = l1 * bs - end
        if head or tail:
            pre = b""
            post = b""
            if head:
                pre = bytes(head) if new[0] else self.device.read(int(phys[0]) * bs, bs)[:head]
            if tail:
                if new[-1]:
                    post = bytes(tail)
                else:
                    post = self.device.read(int(phys[-1]) * bs + bs - tail, tail)
            buf = memoryview(b"".join((pre, bytes(data), post)))
        else:
            buf = memoryview(data).cast("B")
        count = len(phys)
        i = 0
        try:
            while i < count:
                j = i + 1
                while j < count and phys[j] == phys[j - 1] + 1:
                    j += 1
                self.device.write(int(phys[i]) * bs, buf[i * bs:j * bs])
                i = j
        except BaseException:
            # the device refused (e.g. the thin pool ran out of data space): give back the blocks this write
            # mapped, so no file shows blocks that were never written and the bitmaps stay exact
            self.mapper.unmap(ino, inode, l0, new)
            self._touch(ino)
            raise
        if end > inode.size:
            self._set_size(inode, end)
        t = _now()
        inode.i_mtime = inode.i_ctime = t
        self._touch(ino)
        return n

    def _set_size(self, inode: Inode, size: int) -> None:
        inode.size = size
        if size > L.LARGE_FILE_SIZE and not self.sb.s_feature_ro_compat & L.FEATURE_RO_COMPAT_LARGE_FILE:
            if self.sb.s_rev_level < L.EXT2_DYNAMIC_REV:  # features need revision 1 (ext2_update_dynamic_rev)
                self.sb.s_rev_level = L.EXT2_DYNAMIC_REV
                self.sb.s_first_ino = L.FIRST_INO
                self.sb.s_inode_size = L.GOOD_OLD_INODE_SIZE
            self.sb.s_feature_ro_compat |= L.FEATURE_RO_COMPAT_LARGE_FILE
            self._sb_dirty = True
            self._backups_dirty = True

    def _truncate(self, ino: int, inode: Inode, size: int) -> None:
        if size < 0:
            raise FsError(reason="negative size", errno=_errno.EINVAL)
        bs = self.block_size
        if -(-size // bs) > self.mapper.max_blocks:
            raise FsError(reason="file too large", errno=_errno.EFBIG)
        old = inode.size
        if size < old:
            keep = -(-size // bs)
            self.mapper.truncate_blocks(ino, inode, keep)
            if size % bs:
                # zero the tail of the last block, so a later extension reads zeros there
                phys = int(self.mapper.map(ino, inode, size // bs, 1)[0])
                if phys:
                    self.device.write_zeroes(phys * bs + size % bs, bs - size % bs)
        inode.size = size
        if size > old:
            self._set_size(inode, size)
        t = _now()
        inode.i_mtime = inode.i_ctime = t
        self._touch(ino)

    def _readlink_inode(self, ino: int, inode: Inode) -> bytes:
        if inode.is_fast_symlink:
            if inode.i_size > 60:
                raise FsCorrupt(reason=f"inode {ino}: fast symlink of {inode.i_size} bytes", inode=ino)
            return I_BLOCK_FMT.pack(*inode.i_block)[:inode.i_size]
        if inode.i_size >= self.block_size:
            raise FsCorrupt(reason=f"inode {ino}: symlink of {inode.i_size} bytes", inode=ino)
        return self._read(ino, inode, 0, inode.i_size)
