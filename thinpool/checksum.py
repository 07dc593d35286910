"""CRC-32C block checksums with dm-thin's per-block-type salts: stamp, verify and identify a 4 KiB block.

Layer: bottom (beside units). May import: thinpool.errors.

stored = crc32c(block[4:]) ^ 0xFFFFFFFF ^ salt  (the kernel's dm_bm_checksum: seed ~0, no final inversion).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import Enum
from typing import Final

from thinpool.errors import ChecksumError, MetadataCorrupt


def _load_crc32c() -> Callable[[bytes | bytearray | memoryview], int]:
    """The crc32c function of the crc32c package's C extension, loaded without running the package's ``__init__``.

    That ``__init__`` imports importlib.metadata (for its ``__version__``) and its command-line module: ~15 ms of
    every command's start-up, measured with ``python -X importtime``, for one function. The extension is found
    where the package would import it from; anything unexpected falls back to the ordinary import.
    """
    import importlib.machinery as im
    import os.path

    try:
        spec = im.PathFinder.find_spec("crc32c")
        dirs = list(spec.submodule_search_locations or ()) if spec is not None else []
        for d in dirs:
            for suffix in im.EXTENSION_SUFFIXES:
                path = os.path.join(d, "_crc32c" + suffix)
                if os.path.isfile(path):
                    loader = im.ExtensionFileLoader("crc32c._crc32c", path)
                    mod = loader.create_module(im.ModuleSpec("crc32c._crc32c", loader, origin=path))
                    if mod is not None and callable(getattr(mod, "crc32c", None)):
                        loader.exec_module(mod)
                        fn: Callable[[bytes | bytearray | memoryview], int] = mod.crc32c
                        return fn
    except (ImportError, OSError):
        pass
    import crc32c

    return crc32c.crc32c


_crc32c: Final = _load_crc32c()

SUPERBLOCK_CSUM_XOR: Final = 160774  # K-meta SUPERBLOCK_CSUM_XOR
BTREE_CSUM_XOR: Final = 121107  # K-spine BTREE_CSUM_XOR
INDEX_CSUM_XOR: Final = 160478  # K-smc INDEX_CSUM_XOR
BITMAP_CSUM_XOR: Final = 240779  # K-smc BITMAP_CSUM_XOR


class BlockType(Enum):
    SUPERBLOCK = SUPERBLOCK_CSUM_XOR
    BTREE_NODE = BTREE_CSUM_XOR
    INDEX = INDEX_CSUM_XOR
    BITMAP = BITMAP_CSUM_XOR

    @property
    def label(self) -> str:
        return {"SUPERBLOCK": "superblock", "BTREE_NODE": "btree node", "INDEX": "metadata index block",
                "BITMAP": "space map bitmap"}[self.name]


def compute(block: bytes | bytearray | memoryview, block_type: BlockType) -> int:
    """Checksum a block would carry at offset 0."""
    return (_crc32c(memoryview(block)[4:]) ^ 0xFFFFFFFF ^ block_type.value) & 0xFFFFFFFF


def stamp(block: bytearray, block_type: BlockType) -> None:
    """Write the checksum into bytes 0..3 of ``block`` (in place)."""
    struct.pack_into("<I", block, 0, compute(block, block_type))


def verify(block: bytes | bytearray | memoryview, block_type: BlockType, blocknr: int) -> None:
    """Raise ChecksumError (naming ``blocknr``) unless the stored checksum matches."""
    stored = struct.unpack_from("<I", block, 0)[0]
    computed = compute(block, block_type)
    if stored != computed:
        raise ChecksumError(block=blocknr, block_type=block_type.label, stored=stored, computed=computed)


def validate(block: bytes | bytearray | memoryview, block_type: BlockType, blocknr: int, what: str = "") -> None:
    """The self-check every metadata block type shares (kernel sb_check / bitmap_check / index_check / node_check
    prefix): the checksum, then the block's own number, which all four types keep at byte offset 8.

    Raises:
        ChecksumError: bad checksum.
        MetadataCorrupt: the block says it is another block.
    """
    verify(block, block_type, blocknr)
    got = struct.unpack_from("<Q", block, 8)[0]
    if got != blocknr:
        raise MetadataCorrupt(block=blocknr, reason=f"bad block nr in {what or block_type.label}: says {got}")


def identify(block: bytes | bytearray | memoryview) -> BlockType | None:
    """Which block type's salt makes the checksum match (as thinp-tools' checksum.rs does), or None."""
    stored = struct.unpack_from("<I", block, 0)[0]
    raw = _crc32c(memoryview(block)[4:]) ^ 0xFFFFFFFF
    for t in BlockType:
        if (raw ^ t.value) & 0xFFFFFFFF == stored:
            return t
    return None
