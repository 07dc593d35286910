"""An ext2 (revision 1) file system on any thinpool block device: ``mkfs(dev)`` / ``mount(dev)``.

Layer: fs. May import: thinpool.io.device, thinpool.errors.
"""

from __future__ import annotations

from thinpool.fs.filesystem import DirEntry, File, Filesystem, Stat, StatFs
from thinpool.io.device import BlockDevice

__all__ = ["DirEntry", "File", "Filesystem", "Stat", "StatFs", "mkfs", "mount"]


def mkfs(device: BlockDevice, **options: object) -> Filesystem:
    """Make an empty ext2 file system on ``device`` and return it open (see :meth:`Filesystem.mkfs`)."""
    return Filesystem.mkfs(device, **options)


def mount(device: BlockDevice, *, readonly: bool = False) -> Filesystem:
    """Open the ext2 file system on ``device`` (see :meth:`Filesystem.mount`)."""
    return Filesystem.mount(device, readonly=readonly)
