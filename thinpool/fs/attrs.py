"""Inode attributes: permission bits, owner, times and extended attributes (see :mod:`thinpool.fs.xattr`).

Layer: fs. May import: thinpool.io.device, thinpool.errors, thinpool.fs.*, numpy.

Every change here can act on a final symlink itself (``follow_symlinks=False``), as lchown, lutimes and
lsetxattr do; the xattr calls act on the link by default.
"""

from __future__ import annotations

from thinpool.errors import (
    FileExists,
    FsCorrupt,
    FsNoSpace,
    XattrNotFound,
)
from thinpool.fs import layout as L
from thinpool.fs import xattr as X
from thinpool.fs.core import NS_PER_S
from thinpool.fs.core import locked as _locked
from thinpool.fs.core import now as _now
from thinpool.fs.files import FsFiles
from thinpool.fs.inode import Inode

XATTR_CREATE = 1  # os.XATTR_CREATE
XATTR_REPLACE = 2  # os.XATTR_REPLACE


class FsAttrs(FsFiles):
    """chmod, chown, utime and the extended attribute calls."""

    @_locked
    def chmod(self, path: str, mode: int, *, follow_symlinks: bool = True) -> None:
        """Set the permission bits (07777) of ``path``; with ``follow_symlinks=False`` a final symlink itself."""
        self._check_writable()
        ino = self._lookup(path, follow_symlinks)
        inode = self._inode(ino)
        inode.i_mode = (inode.i_mode & L.S_IFMT) | (mode & 0o7777)
        inode.i_ctime = _now()
        self._touch(ino)

    @_locked
    def chown(self, path: str, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        """Set owner and group (-1 leaves one unchanged); 32-bit ids use the Linux high halves.

        With ``follow_symlinks=False`` a final symlink itself changes (``lchown``).
        """
        self._check_writable()
        ino = self._lookup(path, follow_symlinks)
        inode = self._inode(ino)
        if uid != -1:
            inode.i_uid, inode.l_i_uid_high = uid & 0xFFFF, (uid >> 16) & 0xFFFF
        if gid != -1:
            inode.i_gid, inode.l_i_gid_high = gid & 0xFFFF, (gid >> 16) & 0xFFFF
        inode.i_ctime = _now()
        self._touch(ino)

    def lchown(self, path: str, uid: int, gid: int) -> None:
        """``chown`` of a final symlink itself."""
        self.chown(path, uid, gid, follow_symlinks=False)

    @_locked
    def utime(self, path: str, times: tuple[float, float] | None = None, *, ns: tuple[int, int] | None = None,
              follow_symlinks: bool = True) -> None:
        """Set (atime, mtime), as ``os.utime``: ``times`` in seconds, or ``ns`` in nanoseconds, or both to now.

        ext2 keeps whole seconds (32 bits), so nanoseconds are truncated. A ``times`` pair holding a value of
        2**32 or more cannot be seconds ext2 stores and is taken as nanoseconds (``utime(p, (atime_ns,
        mtime_ns))`` works). With ``follow_symlinks=False`` a final symlink itself changes.
        """
        self._check_writable()
        ino = self._lookup(path, follow_symlinks)
        inode = self._inode(ino)
        t = _now()
        if ns is not None:
            atime, mtime = ns[0] // NS_PER_S, ns[1] // NS_PER_S
        elif times is not None:
            if max(abs(times[0]), abs(times[1])) >= 2**32:
                atime, mtime = int(times[0]) // NS_PER_S, int(times[1]) // NS_PER_S
            else:
                atime, mtime = int(times[0] // 1), int(times[1] // 1)
        else:
            atime = mtime = t
        inode.i_atime, inode.i_mtime, inode.i_ctime = int(atime) & 0xFFFFFFFF, int(mtime) & 0xFFFFFFFF, t
        self._touch(ino)

    @_locked
    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0, *, follow_symlinks: bool = False) -> None:
        """Set extended attribute ``name`` (``user.*``, ``trusted.*``, ``security.*``, ``system.posix_acl_*``).

        Acts on a final symlink itself (``lsetxattr``) unless ``follow_symlinks``. ``flags`` as ``os.setxattr``:
        ``os.XATTR_CREATE`` fails if it exists, ``os.XATTR_REPLACE`` if it does not. The first attribute sets the
        ``ext_attr`` feature.

        Raises:
            FileExists (XATTR_CREATE), XattrNotFound (XATTR_REPLACE), FsNoSpace (no free block, or the
            attributes no longer fit one block), FsError (ENOTSUP, EINVAL, ERANGE).
        """
        self._check_writable()
        key = X.split_name(name, path)
        raw = bytes(value)
        if X.is_acl(key[0]):
            raw = X.acl_to_disk(raw, path)
        ino = self._lookup(path, follow_symlinks)
        inode = self._inode(ino)
        attrs = self._xattrs(ino, inode)
        if flags & XATTR_CREATE and key in attrs:
            raise FileExists(path=path, reason=f"attribute {name} exists: {path}")
        if flags & XATTR_REPLACE and key not in attrs:
            raise XattrNotFound(name=name, path=path)
        attrs[key] = raw
        self._store_xattrs(ino, inode, attrs, path)

    @_locked
    def getxattr(self, path: str, name: str, *, follow_symlinks: bool = False) -> bytes:
        """The value of extended attribute ``name`` (of a final symlink itself unless ``follow_symlinks``).

        Raises:
            XattrNotFound, FsError (ENOTSUP for a namespace ext2 does not store).
        """
        key = X.split_name(name, path)
        ino = self._lookup(path, follow_symlinks)
        inode = self._inode(ino)
        value = self._xattrs(ino, inode).get(key)
        if value is None:
            raise XattrNotFound(name=name, path=path)
        return X.acl_from_disk(value, inode.i_file_acl) if X.is_acl(key[0]) else value

    @_locked
    def listxattr(self, path: str, *, follow_symlinks: bool = False) -> list[str]:
        """Names of every extended attribute of ``path``, in on-disk order."""
        ino = self._lookup(path, follow_symlinks)
        inode = self._inode(ino)
        return [X.join_name(k) for k in self._xattrs(ino, inode)]

    @_locked
    def removexattr(self, path: str, name: str, *, follow_symlinks: bool = False) -> None:
        """Remove extended attribute ``name``; the xattr block goes with the last one.

        Raises:
            XattrNotFound.
        """
        self._check_writable()
        key = X.split_name(name, path)
        ino = self._lookup(path, follow_symlinks)
        inode = self._inode(ino)
        attrs = self._xattrs(ino, inode)
        if key not in attrs:
            raise XattrNotFound(name=name, path=path)
        del attrs[key]
        self._store_xattrs(ino, inode, attrs, path)

    def _xattrs(self, ino: int, inode: Inode) -> dict[X.Key, bytes]:
        blk = inode.i_file_acl
        if not blk:
            return {}
        if not self.sb.s_first_data_block < blk < self.sb.s_blocks_count:
            raise FsCorrupt(reason=f"inode {ino}: xattr block {blk} is outside the file system", inode=ino,
                            block=blk)
        return X.parse_block(self.cache.get(blk), blk)[1]

    def _store_xattrs(self, ino: int, inode: Inode, attrs: dict[X.Key, bytes], path: str = "") -> None:
        """Write ``attrs`` as the inode's xattr block: in place when the inode owns it alone, else into a new
        block (a shared block only loses one reference); no attributes free the block."""
        bs = self.block_size
        old = inode.i_file_acl
        if attrs:
            if not X.block_fits(attrs, bs):  # the kernel's ENOSPC: ext2 keeps one xattr block per inode
                raise FsNoSpace(reason=f"{path}: extended attributes need more than one {bs}-byte block", path=path)
            buf = X.build_block(attrs, bs)
            if old and X.parse_block(self.cache.get(old), old)[0] == 1:
                self.cache.get(old)[:] = buf
                self.cache.mark_dirty(old)
            else:
                self._need(1, path=path)
                blk = self.alloc.alloc_blocks(self._group_start(ino), 1)[0]
                self.cache.new(blk)[:] = buf
                if old:
                    self._drop_xattr_block(ino, old)
                else:
                    inode.i_blocks += bs // 512
                inode.i_file_acl = blk
            if not self.sb.s_feature_compat & X.FEATURE_COMPAT_EXT_ATTR:
                self.sb.s_feature_compat |= X.FEATURE_COMPAT_EXT_ATTR
                self._sb_dirty = True
                self._backups_dirty = True
        elif old:
            self._drop_xattr_block(ino, old)
            inode.i_file_acl = 0
            inode.i_blocks -= bs // 512
        inode.i_ctime = _now()
        self._touch(ino)
