"""On-disk structures of ext2 revision 1 (superblock, group descriptor, inode, directory entry) and geometry.

Layer: fs. May import: thinpool.errors.

Each structure is described once, as a construct ``Struct`` whose field names are the kernel's (``struct
ext2_super_block``, ``struct ext2_group_desc``, ``struct ext2_inode``, ``struct ext2_dir_entry_2`` in
``fs/ext2/ext2.h``). The hot paths (every inode and directory entry) would spend ~80 us per construct parse, so
:func:`fast_format` derives an equivalent :class:`struct.Struct` from the same description; a test pins that the
two agree byte for byte.

Superblock (1024 bytes at byte 1024 of the device; backups at byte 0 of the first block of groups 1, 3^n, 5^n,
7^n when ``sparse_super`` is set, of every group otherwise):

=======  =====================  ==========================================
offset   field                  unit / meaning
=======  =====================  ==========================================
0        s_inodes_count         inodes
4        s_blocks_count         blocks
12       s_free_blocks_count    blocks
16       s_free_inodes_count    inodes
20       s_first_data_block     block (0 for 4 KiB blocks)
24       s_log_block_size       block size = 1024 << n
32       s_blocks_per_group     blocks
40       s_inodes_per_group     inodes
56       s_magic                0xEF53
76       s_rev_level            1 (dynamic)
84       s_first_ino            first non-reserved inode (11)
88       s_inode_size           bytes (128)
92..100  s_feature_*            compat / incompat / ro_compat bit sets
=======  =====================  ==========================================
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, Final

import construct as cs

EXT2_SUPER_MAGIC: Final = 0xEF53
SUPERBLOCK_OFFSET: Final = 1024  # bytes
SUPERBLOCK_SIZE: Final = 1024  # bytes
GROUP_DESC_SIZE: Final = 32  # bytes
GOOD_OLD_INODE_SIZE: Final = 128  # bytes
EXT2_DYNAMIC_REV: Final = 1

ROOT_INO: Final = 2
FIRST_INO: Final = 11  # first non-reserved inode of revision 1 file systems made by mke2fs
LOST_FOUND_INO: Final = 11
NDIR_BLOCKS: Final = 12
IND_BLOCK: Final = 12
DIND_BLOCK: Final = 13
TIND_BLOCK: Final = 14
N_BLOCKS: Final = 15
NAME_MAX: Final = 255  # bytes
FAST_SYMLINK_MAX: Final = 59  # bytes; a target of fewer than 60 bytes lives in i_block
SYMLINK_MAX: Final = 4095  # bytes (one block minus the terminating NUL)
LOST_FOUND_BLOCKS: Final = 4  # blocks mke2fs gives lost+found (16 KiB at 4 KiB blocks)

# s_state
EXT2_VALID_FS: Final = 1
# s_feature_compat / incompat / ro_compat
FEATURE_COMPAT_DIR_INDEX: Final = 0x0020
FEATURE_INCOMPAT_FILETYPE: Final = 0x0002
FEATURE_RO_COMPAT_SPARSE_SUPER: Final = 0x0001
FEATURE_RO_COMPAT_LARGE_FILE: Final = 0x0002
SUPPORTED_INCOMPAT: Final = FEATURE_INCOMPAT_FILETYPE
SUPPORTED_RO_COMPAT: Final = FEATURE_RO_COMPAT_SPARSE_SUPER | FEATURE_RO_COMPAT_LARGE_FILE
# compat features we can leave untouched while writing: dir_prealloc 0x1, ext_attr 0x8 (xattr blocks, see xattr.py),
# resize_inode 0x10 (its blocks are already accounted as used), dir_index 0x20 (we clear EXT2_INDEX_FL when we
# change an indexed directory, as the kernel's ext2 driver does).
SAFE_COMPAT: Final = 0x0001 | 0x0008 | 0x0010 | FEATURE_COMPAT_DIR_INDEX
LARGE_FILE_SIZE: Final = 0x7FFFFFFF  # bytes; a bigger file needs the large_file ro_compat feature

# i_flags
EXT2_INDEX_FL: Final = 0x00001000
# i_mode
S_IFMT: Final = 0o170000
S_IFSOCK: Final = 0o140000
S_IFLNK: Final = 0o120000
S_IFREG: Final = 0o100000
S_IFBLK: Final = 0o060000
S_IFDIR: Final = 0o040000
S_IFCHR: Final = 0o020000
S_IFIFO: Final = 0o010000
# ext2_dir_entry_2.file_type
FT_UNKNOWN: Final = 0
FT_REG_FILE: Final = 1
FT_DIR: Final = 2
FT_CHRDEV: Final = 3
FT_BLKDEV: Final = 4
FT_FIFO: Final = 5
FT_SOCK: Final = 6
FT_SYMLINK: Final = 7
MODE_TO_FT: Final = {S_IFREG: FT_REG_FILE, S_IFDIR: FT_DIR, S_IFCHR: FT_CHRDEV, S_IFBLK: FT_BLKDEV,
                     S_IFIFO: FT_FIFO, S_IFSOCK: FT_SOCK, S_IFLNK: FT_SYMLINK}

SUPERBLOCK = cs.Struct(  # struct ext2_super_block, 1024 bytes
    "s_inodes_count" / cs.Int32ul,  # inodes
    "s_blocks_count" / cs.Int32ul,  # blocks
    "s_r_blocks_count" / cs.Int32ul,  # blocks reserved for root
    "s_free_blocks_count" / cs.Int32ul,  # blocks
    "s_free_inodes_count" / cs.Int32ul,  # inodes
    "s_first_data_block" / cs.Int32ul,  # block
    "s_log_block_size" / cs.Int32ul,  # block size = 1024 << n
    "s_log_frag_size" / cs.Int32ul,  # fragment size = 1024 << n
    "s_blocks_per_group" / cs.Int32ul,  # blocks
    "s_frags_per_group" / cs.Int32ul,  # fragments
    "s_inodes_per_group" / cs.Int32ul,  # inodes
    "s_mtime" / cs.Int32ul,  # seconds since the epoch
    "s_wtime" / cs.Int32ul,  # seconds
    "s_mnt_count" / cs.Int16ul,
    "s_max_mnt_count" / cs.Int16sl,
    "s_magic" / cs.Int16ul,  # EXT2_SUPER_MAGIC
    "s_state" / cs.Int16ul,
    "s_errors" / cs.Int16ul,
    "s_minor_rev_level" / cs.Int16ul,
    "s_lastcheck" / cs.Int32ul,  # seconds
    "s_checkinterval" / cs.Int32ul,  # seconds
    "s_creator_os" / cs.Int32ul,
    "s_rev_level" / cs.Int32ul,
    "s_def_resuid" / cs.Int16ul,
    "s_def_resgid" / cs.Int16ul,
    "s_first_ino" / cs.Int32ul,  # inode
    "s_inode_size" / cs.Int16ul,  # bytes
    "s_block_group_nr" / cs.Int16ul,  # group holding this copy
    "s_feature_compat" / cs.Int32ul,
    "s_feature_incompat" / cs.Int32ul,
    "s_feature_ro_compat" / cs.Int32ul,
    "s_uuid" / cs.Bytes(16),
    "s_volume_name" / cs.Bytes(16),
    "s_last_mounted" / cs.Bytes(64),
    "s_algorithm_usage_bitmap" / cs.Int32ul,
    "s_prealloc_blocks" / cs.Int8ul,
    "s_prealloc_dir_blocks" / cs.Int8ul,
    "s_reserved_gdt_blocks" / cs.Int16ul,  # blocks
    "s_journal_uuid" / cs.Bytes(16),
    "s_journal_inum" / cs.Int32ul,
    "s_journal_dev" / cs.Int32ul,
    "s_last_orphan" / cs.Int32ul,
    "s_hash_seed" / cs.Bytes(16),
    "s_def_hash_version" / cs.Int8ul,
    "s_jnl_backup_type" / cs.Int8ul,
    "s_desc_size" / cs.Int16ul,  # bytes (0 = 32)
    "s_default_mount_opts" / cs.Int32ul,
    "s_first_meta_bg" / cs.Int32ul,
    "s_mkfs_time" / cs.Int32ul,  # seconds
    "s_jnl_blocks" / cs.Bytes(68),
    "s_blocks_count_hi" / cs.Int32ul,
    "s_r_blocks_count_hi" / cs.Int32ul,
    "s_free_blocks_count_hi" / cs.Int32ul,
    "s_min_extra_isize" / cs.Int16ul,  # bytes
    "s_want_extra_isize" / cs.Int16ul,  # bytes
    "s_flags" / cs.Int32ul,
    "s_rest" / cs.Bytes(668),  # ext4 fields thinpool never sets; preserved as read
)

GROUP_DESC = cs.Struct(  # struct ext2_group_desc, 32 bytes
    "bg_block_bitmap" / cs.Int32ul,  # block
    "bg_inode_bitmap" / cs.Int32ul,  # block
    "bg_inode_table" / cs.Int32ul,  # block
    "bg_free_blocks_count" / cs.Int16ul,  # blocks
    "bg_free_inodes_count" / cs.Int16ul,  # inodes
    "bg_used_dirs_count" / cs.Int16ul,  # directories
    "bg_flags" / cs.Int16ul,
    "bg_exclude_bitmap_lo" / cs.Int32ul,
    "bg_block_bitmap_csum_lo" / cs.Int16ul,
    "bg_inode_bitmap_csum_lo" / cs.Int16ul,
    "bg_itable_unused" / cs.Int16ul,
    "bg_checksum" / cs.Int16ul,
)

INODE = cs.Struct(  # struct ext2_inode, 128 bytes
    "i_mode" / cs.Int16ul,
    "i_uid" / cs.Int16ul,
    "i_size" / cs.Int32ul,  # bytes, low 32 bits
    "i_atime" / cs.Int32ul,  # seconds
    "i_ctime" / cs.Int32ul,  # seconds
    "i_mtime" / cs.Int32ul,  # seconds
    "i_dtime" / cs.Int32ul,  # seconds; deletion time
    "i_gid" / cs.Int16ul,
    "i_links_count" / cs.Int16ul,
    "i_blocks" / cs.Int32ul,  # 512-byte sectors, including indirect blocks
    "i_flags" / cs.Int32ul,
    "i_osd1" / cs.Int32ul,
    "i_block" / cs.Array(N_BLOCKS, cs.Int32ul),  # 12 direct, single, double, triple indirect (blocks)
    "i_generation" / cs.Int32ul,
    "i_file_acl" / cs.Int32ul,  # block
    "i_size_high" / cs.Int32ul,  # bytes << 32 (i_dir_acl before large_file)
    "i_faddr" / cs.Int32ul,
    "l_i_blocks_hi" / cs.Int16ul,
    "l_i_file_acl_high" / cs.Int16ul,
    "l_i_uid_high" / cs.Int16ul,
    "l_i_gid_high" / cs.Int16ul,
    "l_i_checksum_lo" / cs.Int16ul,
    "l_i_reserved" / cs.Int16ul,
)

DIRENT_HEADER = cs.Struct(  # struct ext2_dir_entry_2 without the name, 8 bytes
    "inode" / cs.Int32ul,
    "rec_len" / cs.Int16ul,  # bytes to the next entry
    "name_len" / cs.Int8ul,  # bytes
    "file_type" / cs.Int8ul,  # FT_*; the high byte of a 16-bit name_len without the filetype feature
)
DIRENT_HEADER_SIZE: Final = 8

XATTR_HEADER = cs.Struct(  # struct ext2_xattr_header, 32 bytes at the start of an xattr block (fs/ext2/xattr.h)
    "h_magic" / cs.Int32ul,  # EXT2_XATTR_MAGIC 0xEA020000
    "h_refcount" / cs.Int32ul,  # inodes sharing the block
    "h_blocks" / cs.Int32ul,  # blocks (always 1)
    "h_hash" / cs.Int32ul,  # hash of the entry hashes
    "h_checksum" / cs.Int32ul,  # ext4 metadata_csum only; 0 on ext2
    "h_reserved" / cs.Bytes(12),
)

XATTR_ENTRY = cs.Struct(  # struct ext2_xattr_entry without the name, 16 bytes
    "e_name_len" / cs.Int8ul,  # bytes
    "e_name_index" / cs.Int8ul,  # namespace: 1 user, 2/3 POSIX ACL, 4 trusted, 6 security
    "e_value_offs" / cs.Int16ul,  # bytes from the start of the block
    "e_value_inum" / cs.Int32ul,  # ext4 ea_inode only; 0 on ext2
    "e_value_size" / cs.Int32ul,  # bytes
    "e_hash" / cs.Int32ul,  # ext2_xattr_hash_entry
)


def fast_format(struct_: cs.Struct) -> struct.Struct:
    """Derive a :class:`struct.Struct` equal to a construct Struct of fixed-size integer/bytes/array fields.

    Arrays come out as that many consecutive values, so callers regroup them (see :class:`Inode`).
    """
    fmt = "<"
    for sub in struct_.subcons:
        fmt += _fmt_of(sub.subcon if isinstance(sub, cs.Renamed) else sub)
    return struct.Struct(fmt)


def _fmt_of(sub: Any) -> str:
    if isinstance(sub, cs.Renamed):
        return _fmt_of(sub.subcon)
    if isinstance(sub, cs.FormatField):
        return str(sub.fmtstr[1:])
    if isinstance(sub, cs.Array):
        return f"{sub.count}{_fmt_of(sub.subcon)}"
    if isinstance(sub, cs.StringEncoded | cs.Bytes) and isinstance(getattr(sub, "length", None), int):
        return f"{sub.length}s"
    raise TypeError(f"no struct format for {sub!r}")


_SB_FMT: Final = fast_format(SUPERBLOCK)
_GD_FMT: Final = fast_format(GROUP_DESC)
INODE_FMT: Final = fast_format(INODE)
DIRENT_FMT: Final = fast_format(DIRENT_HEADER)
XATTR_HEADER_FMT: Final = fast_format(XATTR_HEADER)
XATTR_ENTRY_FMT: Final = fast_format(XATTR_ENTRY)
_SB_FIELDS: Final = tuple(sc.name for sc in SUPERBLOCK.subcons)
_GD_FIELDS: Final = tuple(sc.name for sc in GROUP_DESC.subcons)
assert _SB_FMT.size == SUPERBLOCK_SIZE and _GD_FMT.size == GROUP_DESC_SIZE and INODE_FMT.size == 128
assert XATTR_HEADER_FMT.size == 32 and XATTR_ENTRY_FMT.size == 16


@dataclasses.dataclass(slots=True)
class Superblock:
    """The superblock, mutable in core (fields as in ``struct ext2_super_block``)."""

    s_inodes_count: int = 0
    s_blocks_count: int = 0
    s_r_blocks_count: int = 0
    s_free_blocks_count: int = 0
    s_free_inodes_count: int = 0
    s_first_data_block: int = 0
    s_log_block_size: int = 0
    s_log_frag_size: int = 0
    s_blocks_per_group: int = 0
    s_frags_per_group: int = 0
    s_inodes_per_group: int = 0
    s_mtime: int = 0
    s_wtime: int = 0
    s_mnt_count: int = 0
    s_max_mnt_count: int = -1
    s_magic: int = EXT2_SUPER_MAGIC
    s_state: int = EXT2_VALID_FS
    s_errors: int = 1
    s_minor_rev_level: int = 0
    s_lastcheck: int = 0
    s_checkinterval: int = 0
    s_creator_os: int = 0
    s_rev_level: int = EXT2_DYNAMIC_REV
    s_def_resuid: int = 0
    s_def_resgid: int = 0
    s_first_ino: int = FIRST_INO
    s_inode_size: int = GOOD_OLD_INODE_SIZE
    s_block_group_nr: int = 0
    s_feature_compat: int = 0
    s_feature_incompat: int = 0
    s_feature_ro_compat: int = 0
    s_uuid: bytes = bytes(16)
    s_volume_name: bytes = bytes(16)
    s_last_mounted: bytes = bytes(64)
    s_algorithm_usage_bitmap: int = 0
    s_prealloc_blocks: int = 0
    s_prealloc_dir_blocks: int = 0
    s_reserved_gdt_blocks: int = 0
    s_journal_uuid: bytes = bytes(16)
    s_journal_inum: int = 0
    s_journal_dev: int = 0
    s_last_orphan: int = 0
    s_hash_seed: bytes = bytes(16)
    s_def_hash_version: int = 0
    s_jnl_backup_type: int = 0
    s_desc_size: int = 0
    s_default_mount_opts: int = 0
    s_first_meta_bg: int = 0
    s_mkfs_time: int = 0
    s_jnl_blocks: bytes = bytes(68)
    s_blocks_count_hi: int = 0
    s_r_blocks_count_hi: int = 0
    s_free_blocks_count_hi: int = 0
    s_min_extra_isize: int = 0
    s_want_extra_isize: int = 0
    s_flags: int = 0
    s_rest: bytes = bytes(668)

    @property
    def block_size(self) -> int:
        return int(1024 << self.s_log_block_size)

    @property
    def nr_groups(self) -> int:
        return -(-(self.s_blocks_count - self.s_first_data_block) // self.s_blocks_per_group)


assert tuple(f.name for f in dataclasses.fields(Superblock)) == _SB_FIELDS


def parse_superblock(buf: bytes) -> Superblock:
    return Superblock(*_SB_FMT.unpack_from(buf))


def build_superblock(sb: Superblock) -> bytes:
    return _SB_FMT.pack(*dataclasses.astuple(sb))


@dataclasses.dataclass(slots=True)
class GroupDesc:
    """One block group descriptor, mutable in core (``struct ext2_group_desc``)."""

    bg_block_bitmap: int = 0
    bg_inode_bitmap: int = 0
    bg_inode_table: int = 0
    bg_free_blocks_count: int = 0
    bg_free_inodes_count: int = 0
    bg_used_dirs_count: int = 0
    bg_flags: int = 0
    bg_exclude_bitmap_lo: int = 0
    bg_block_bitmap_csum_lo: int = 0
    bg_inode_bitmap_csum_lo: int = 0
    bg_itable_unused: int = 0
    bg_checksum: int = 0


assert tuple(f.name for f in dataclasses.fields(GroupDesc)) == _GD_FIELDS


def parse_group_desc(buf: bytes | memoryview, offset: int = 0) -> GroupDesc:
    return GroupDesc(*_GD_FMT.unpack_from(buf, offset))


def build_group_desc(gd: GroupDesc) -> bytes:
    return _GD_FMT.pack(*dataclasses.astuple(gd))


def is_power_of(n: int, base: int) -> bool:
    while n > 1 and n % base == 0:
        n //= base
    return n == 1


def group_has_super(group: int, sparse_super: bool) -> bool:
    """True when block group ``group`` holds a superblock copy and group descriptor table (``ext2fs_bg_has_super``)."""
    if group == 0 or not sparse_super:
        return True
    if group == 1:
        return True
    return group % 2 == 1 and (is_power_of(group, 3) or is_power_of(group, 5) or is_power_of(group, 7))


def rec_len_for(name_len: int) -> int:
    """Smallest record length (bytes) of a directory entry with a name of ``name_len`` bytes (4-byte aligned)."""
    return (DIRENT_HEADER_SIZE + name_len + 3) & ~3


@dataclasses.dataclass(frozen=True, slots=True)
class Geometry:
    """Where mkfs puts things: counts and per-group metadata positions (all in blocks / inodes)."""

    block_size: int
    nr_blocks: int
    blocks_per_group: int
    inodes_per_group: int
    nr_groups: int
    desc_blocks: int
    inode_table_blocks: int
    sparse_super: bool

    @property
    def nr_inodes(self) -> int:
        return self.inodes_per_group * self.nr_groups

    def group_first_block(self, group: int) -> int:
        return group * self.blocks_per_group

    def group_nr_blocks(self, group: int) -> int:
        return min(self.blocks_per_group, self.nr_blocks - self.group_first_block(group))

    def group_meta(self, group: int) -> tuple[int, int, int, int]:
        """(superblock+GDT blocks, block bitmap, inode bitmap, inode table) of ``group``."""
        first = self.group_first_block(group)
        nr_sb = 1 + self.desc_blocks if group_has_super(group, self.sparse_super) else 0
        bb = first + nr_sb
        return nr_sb, bb, bb + 1, bb + 2

    def group_overhead(self, group: int) -> int:
        return self.group_meta(group)[0] + 2 + self.inode_table_blocks


def plan_geometry(size: int, block_size: int = 4096, inode_ratio: int | None = None,
                  nr_inodes: int | None = None, inode_size: int = GOOD_OLD_INODE_SIZE) -> Geometry:
    """Choose the layout ``mkfs.ext2 -b 4096 -O none,filetype -I 128 -m 0`` makes for a device of ``size`` bytes.

    Like ``ext2fs_initialize``: 8 * block_size blocks per group; one inode per ``inode_ratio`` bytes (4 KiB below
    512 MiB, 16 KiB up to 4 TiB, 32 KiB above, as mke2fs.conf's "small", "default" and "big" types), rounded up
    to fill whole inode table blocks; a last group too small for its metadata plus 50 blocks is dropped. Sparse
    superblock backups are used when there is more than one group.
    """
    from thinpool.errors import FsError

    blocks_per_group = 8 * block_size
    nr_blocks = min(size // block_size, 2**32 - 1)
    if inode_ratio is None:  # mke2fs.conf usage types: small, default, big (>= 4 TiB)
        inode_ratio = 4096 if size < 512 * 2**20 else 16384 if size < 4 * 2**40 else 32768
    inodes_per_block = block_size // inode_size
    while True:
        if nr_blocks < 16:
            raise FsError(reason=f"device of {size} bytes is too small for an ext2 file system")
        nr_groups = -(-nr_blocks // blocks_per_group)
        total_inodes = nr_inodes if nr_inodes is not None else max(nr_blocks * block_size // inode_ratio, 16)
        ipg = -(-total_inodes // nr_groups)
        ipg = max(ipg, 16)
        ipg = -(-ipg // inodes_per_block) * inodes_per_block  # fill whole inode-table blocks
        ipg = min(ipg, blocks_per_group, (2**32 - 1) // nr_groups // inodes_per_block * inodes_per_block)
        itb = ipg // inodes_per_block
        desc_blocks = -(-nr_groups * GROUP_DESC_SIZE // block_size)
        geo = Geometry(block_size, nr_blocks, blocks_per_group, ipg, nr_groups, desc_blocks, itb, nr_groups > 1)
        rem = nr_blocks % blocks_per_group
        overhead = geo.group_overhead(nr_groups - 1)
        if nr_groups == 1 and overhead + 2 + LOST_FOUND_BLOCKS > nr_blocks:
            raise FsError(reason=f"device of {size} bytes is too small for an ext2 file system")
        if nr_groups > 1 and rem and rem < overhead + 50:
            nr_blocks -= rem
            continue
        return geo
