"""Extended attributes in an ext2 xattr block: names, the block format, the entry and block hashes.

Layer: fs. May import: thinpool.errors, thinpool.fs.layout.

An inode's attributes live in one block named by ``i_file_acl`` (``struct ext2_xattr_header`` and
``struct ext2_xattr_entry`` in the kernel's ``fs/ext2/xattr.h``)::

    offset  size  field
    0       4     h_magic        0xEA020000
    4       4     h_refcount     inodes sharing this block
    8       4     h_blocks       1
    12      4     h_hash         hash over the entry hashes (0: the block is not shareable)
    16      16    h_checksum, h_reserved[3]   zero on ext2
    32      ...   entries, sorted by (name index, name length, name), each 16 bytes + name padded to 4,
                  ended by 4 zero bytes
    ...     ...   values, packed from the end of the block downwards, each padded to 4 bytes

An entry is ``e_name_len(1) e_name_index(1) e_value_offs(2) e_value_inum(4) e_value_size(4) e_hash(4)
e_name``. The hashes are the kernel's ``ext2_xattr_hash_entry`` / ``ext2_xattr_rehash`` (names hashed as
``char``, which is signed on x86 as the kernel and e2fsprogs 1.47.0 compute them).

Name prefixes map to the kernel's name indexes: ``user.`` 1, ``system.posix_acl_access`` 2,
``system.posix_acl_default`` 3, ``trusted.`` 4, ``security.`` 6. POSIX ACL values are converted between the
VFS form (``posix_acl_xattr``, version 2) that callers see and the ext2 disk form (``ext2_acl``, version 1).
"""

from __future__ import annotations

import errno as _errno
import struct
from typing import Final

from thinpool.errors import FsCorrupt, FsError, FsNoSpace
from thinpool.fs.layout import XATTR_ENTRY_FMT, XATTR_HEADER_FMT

XATTR_MAGIC: Final = 0xEA020000
XATTR_HEADER_SIZE: Final = 32  # bytes
XATTR_ENTRY_SIZE: Final = 16  # bytes, without the name
XATTR_REFCOUNT_MAX: Final = 1024  # EXT2_XATTR_REFCOUNT_MAX
XATTR_NAME_MAX: Final = 255  # bytes
FEATURE_COMPAT_EXT_ATTR: Final = 0x0008

INDEX_USER: Final = 1
INDEX_POSIX_ACL_ACCESS: Final = 2
INDEX_POSIX_ACL_DEFAULT: Final = 3
INDEX_TRUSTED: Final = 4
INDEX_SECURITY: Final = 6

_PREFIXES: Final = ((b"user.", INDEX_USER), (b"trusted.", INDEX_TRUSTED), (b"security.", INDEX_SECURITY))
_FULL_NAMES: Final = {b"system.posix_acl_access": INDEX_POSIX_ACL_ACCESS,
                      b"system.posix_acl_default": INDEX_POSIX_ACL_DEFAULT}
_INDEX_PREFIX: Final = {INDEX_USER: b"user.", INDEX_TRUSTED: b"trusted.", INDEX_SECURITY: b"security.",
                        INDEX_POSIX_ACL_ACCESS: b"system.posix_acl_access",
                        INDEX_POSIX_ACL_DEFAULT: b"system.posix_acl_default"}

_HEADER = XATTR_HEADER_FMT  # h_magic h_refcount h_blocks h_hash h_checksum h_reserved
_ENTRY = XATTR_ENTRY_FMT  # e_name_len e_name_index e_value_offs e_value_inum e_value_size e_hash

NAME_HASH_SHIFT: Final = 5
VALUE_HASH_SHIFT: Final = 16
BLOCK_HASH_SHIFT: Final = 16
_M32: Final = 0xFFFFFFFF

Key = tuple[int, bytes]  # (name index, name without its prefix)


def split_name(name: str | bytes, path: str = "") -> Key:
    """``"user.foo"`` -> (1, b"foo"), as the kernel's xattr handlers split a name.

    Raises:
        FsError: ENOTSUP for a namespace ext2 does not store, EINVAL for an empty name, ERANGE past 255 bytes.
    """
    raw = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else bytes(name)
    if raw in _FULL_NAMES:
        return _FULL_NAMES[raw], b""
    for prefix, index in _PREFIXES:
        if raw.startswith(prefix):
            rest = raw[len(prefix):]
            if not rest:
                raise FsError(reason=f"empty attribute name {raw.decode(errors='replace')!r}: {path}", path=path,
                              errno=_errno.EINVAL)
            if len(rest) > XATTR_NAME_MAX:
                raise FsError(reason=f"attribute name too long: {path}", path=path, errno=_errno.ERANGE)
            return index, rest
    raise FsError(reason=f"attribute namespace not supported by ext2: {raw.decode(errors='replace')!r} on {path}",
                  path=path, errno=_errno.ENOTSUP)


def join_name(key: Key) -> str:
    """(1, b"foo") -> ``"user.foo"``; unknown indexes (e.g. Lustre's 5) come out as ``"<index>.name"``."""
    index, name = key
    prefix = _INDEX_PREFIX.get(index)
    raw = prefix + name if prefix is not None else str(index).encode() + b"." + name
    return raw.decode("utf-8", "surrogateescape")


def _signed_char(c: int) -> int:
    return c - 256 if c >= 128 else c


def entry_hash(name: bytes, value: bytes) -> int:
    """``ext2_xattr_hash_entry``: the name byte by byte (as signed char), then the value as padded LE words."""
    h = 0
    for c in name:
        h = ((h << NAME_HASH_SHIFT) ^ (h >> (32 - NAME_HASH_SHIFT)) ^ _signed_char(c)) & _M32
    if value:
        padded = value + bytes(-len(value) % 4)
        for (word,) in struct.iter_unpack("<I", padded):
            h = ((h << VALUE_HASH_SHIFT) ^ (h >> (32 - VALUE_HASH_SHIFT)) ^ word) & _M32
    return h


def block_hash(entry_hashes: list[int]) -> int:
    """``ext2_xattr_rehash``: fold the entry hashes; 0 when any entry hash is 0 (the block is not shared)."""
    h = 0
    for eh in entry_hashes:
        if eh == 0:
            return 0
        h = ((h << BLOCK_HASH_SHIFT) ^ (h >> (32 - BLOCK_HASH_SHIFT)) ^ eh) & _M32
    return h


def _entry_len(name_len: int) -> int:
    return (XATTR_ENTRY_SIZE + name_len + 3) & ~3


def _value_len(size: int) -> int:
    return (size + 3) & ~3


def parse_block(buf: bytes | bytearray, block: int) -> tuple[int, dict[Key, bytes]]:
    """(h_refcount, {key: raw value}) of an xattr block, validated the way e2fsck's ``check_ext_attr`` does.

    Raises:
        FsCorrupt: bad magic or h_blocks, an entry or value outside the block, overlapping values.
    """
    bs = len(buf)
    magic, refcount, nr_blocks, _, _, _ = _HEADER.unpack_from(buf, 0)

    def bad(why: str) -> FsCorrupt:
        return FsCorrupt(reason=f"xattr block {block}: {why}", block=block)

    if magic != XATTR_MAGIC:
        raise bad(f"bad magic {magic:#010x} (expected {XATTR_MAGIC:#010x})")
    if nr_blocks != 1:
        raise bad(f"h_blocks is {nr_blocks}, not 1")
    out: dict[Key, bytes] = {}
    off = XATTR_HEADER_SIZE
    entries_end = off
    lowest_value = bs
    while True:
        if off + 4 > bs:
            raise bad("entry list runs past the end of the block")
        if struct.unpack_from("<I", buf, off)[0] == 0:
            entries_end = off + 4
            break
        if off + XATTR_ENTRY_SIZE > bs:
            raise bad(f"entry at offset {off} runs past the end of the block")
        name_len, index, value_offs, value_inum, value_size, _ = _ENTRY.unpack_from(buf, off)
        name = bytes(buf[off + XATTR_ENTRY_SIZE:off + XATTR_ENTRY_SIZE + name_len])
        if off + _entry_len(name_len) > bs:
            raise bad(f"entry at offset {off} runs past the end of the block")
        if value_inum:
            raise bad(f"entry at offset {off} keeps its value in inode {value_inum} (ea_inode is not ext2)")
        if value_size and (value_offs + value_size > bs or value_offs < XATTR_HEADER_SIZE):
            raise bad(f"value of entry at offset {off} lies outside the block")
        if value_size:
            lowest_value = min(lowest_value, value_offs)
        out[(index, name)] = bytes(buf[value_offs:value_offs + value_size])
        off += _entry_len(name_len)
    if entries_end > lowest_value:
        raise bad("entries overlap the values")
    return refcount, out


def block_fits(attrs: dict[Key, bytes], block_size: int) -> bool:
    need = XATTR_HEADER_SIZE + 4 + sum(_entry_len(len(n)) + _value_len(len(v)) for (_, n), v in attrs.items())
    return need <= block_size


def build_block(attrs: dict[Key, bytes], block_size: int, refcount: int = 1) -> bytearray:
    """An xattr block holding ``attrs`` (entries sorted as the kernel keeps them, values packed from the end).

    Raises:
        FsNoSpace: the attributes do not fit one block (the kernel's ENOSPC).
    """
    if not block_fits(attrs, block_size):
        raise FsNoSpace(reason=f"extended attributes need more than one {block_size}-byte block")
    buf = bytearray(block_size)
    off = XATTR_HEADER_SIZE
    value_end = block_size
    hashes = []
    for (index, name), value in sorted(attrs.items(), key=lambda kv: (kv[0][0], len(kv[0][1]), kv[0][1])):
        value_end -= _value_len(len(value))  # an empty value points at the end of the values, as the kernel
        buf[value_end:value_end + len(value)] = value
        value_offs = value_end
        h = entry_hash(name, value)
        hashes.append(h)
        _ENTRY.pack_into(buf, off, len(name), index, value_offs, 0, len(value), h)
        buf[off + XATTR_ENTRY_SIZE:off + XATTR_ENTRY_SIZE + len(name)] = name
        off += _entry_len(len(name))
    _HEADER.pack_into(buf, 0, XATTR_MAGIC, refcount, 1, block_hash(hashes), 0, bytes(12))
    return buf


def set_refcount(buf: bytearray, refcount: int) -> None:
    struct.pack_into("<I", buf, 4, refcount)


# --- POSIX ACLs: the VFS xattr form <-> the ext2 disk form ------------------------------------------------------
POSIX_ACL_XATTR_VERSION: Final = 2
EXT2_ACL_VERSION: Final = 1
ACL_USER_OBJ: Final = 0x01
ACL_USER: Final = 0x02
ACL_GROUP_OBJ: Final = 0x04
ACL_GROUP: Final = 0x08
ACL_MASK: Final = 0x10
ACL_OTHER: Final = 0x20
_ACL_TAGS: Final = (ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER)


def acl_to_disk(value: bytes, path: str = "") -> bytes:
    """``posix_acl_xattr`` (version 2, 8-byte entries) -> ``ext2_acl`` (version 1, 4-byte short entries for
    USER_OBJ/GROUP_OBJ/MASK/OTHER, 8-byte entries for USER/GROUP), as ``ext2_acl_to_disk``.

    Raises:
        FsError: EINVAL for a value that is not a valid ACL.
    """
    if len(value) < 4 or (len(value) - 4) % 8 or struct.unpack_from("<I", value, 0)[0] != POSIX_ACL_XATTR_VERSION:
        raise FsError(reason=f"invalid POSIX ACL value: {path}", path=path, errno=_errno.EINVAL)
    out = bytearray(struct.pack("<I", EXT2_ACL_VERSION))
    for tag, perm, ident in struct.iter_unpack("<HHI", value[4:]):
        if tag not in _ACL_TAGS:
            raise FsError(reason=f"invalid POSIX ACL tag {tag:#x}: {path}", path=path, errno=_errno.EINVAL)
        out += struct.pack("<HHI", tag, perm, ident) if tag in (ACL_USER, ACL_GROUP) else struct.pack("<HH", tag, perm)
    return bytes(out)


def acl_from_disk(value: bytes, block: int = 0) -> bytes:
    """``ext2_acl`` -> ``posix_acl_xattr`` (short entries get the undefined id 0xFFFFFFFF, as the kernel reports).

    Raises:
        FsCorrupt: a damaged disk ACL.
    """
    if len(value) < 4 or struct.unpack_from("<I", value, 0)[0] != EXT2_ACL_VERSION:
        raise FsCorrupt(reason=f"xattr block {block}: bad POSIX ACL header", block=block)
    out = bytearray(struct.pack("<I", POSIX_ACL_XATTR_VERSION))
    off = 4
    while off < len(value):
        if off + 4 > len(value):
            raise FsCorrupt(reason=f"xattr block {block}: truncated POSIX ACL entry", block=block)
        tag, perm = struct.unpack_from("<HH", value, off)
        if tag in (ACL_USER, ACL_GROUP):
            if off + 8 > len(value):
                raise FsCorrupt(reason=f"xattr block {block}: truncated POSIX ACL entry", block=block)
            ident = struct.unpack_from("<I", value, off + 4)[0]
            off += 8
        elif tag in _ACL_TAGS:
            ident = 0xFFFFFFFF
            off += 4
        else:
            raise FsCorrupt(reason=f"xattr block {block}: bad POSIX ACL tag {tag:#x}", block=block)
        out += struct.pack("<HHI", tag, perm, ident)
    return bytes(out)


def is_acl(index: int) -> bool:
    return index in (INDEX_POSIX_ACL_ACCESS, INDEX_POSIX_ACL_DEFAULT)
