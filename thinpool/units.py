"""Units, sizes and the three block-number spaces (metadata, data, thin), plus size-string parsing.

Layer: bottom. May import: thinpool.errors.
"""

from __future__ import annotations

import re
import sys
from types import ModuleType
from typing import Any, Final, NewType

from thinpool.errors import InvalidArgument

SECTOR_SIZE: Final = 512  # bytes
METADATA_BLOCK_SIZE: Final = 4096  # bytes
METADATA_BLOCK_SIZE_SECTORS: Final = METADATA_BLOCK_SIZE // SECTOR_SIZE
MIN_DATA_BLOCK_SIZE: Final = 64 * 1024  # bytes (128 sectors)
MAX_DATA_BLOCK_SIZE: Final = 1024 * 1024 * 1024  # bytes (2097152 sectors)
DEFAULT_DATA_BLOCK_SIZE: Final = 64 * 1024
MAX_DEV_ID: Final = (1 << 24) - 1
MAX_METADATA_BLOCKS: Final = 255 * 16320  # 4,161,600 blocks (about 15.9 GiB)

class _LazyModule(ModuleType):
    """Stands in for a module until an attribute is first asked for; then imports it (under the import lock, so
    threads racing for the first use are safe) and copies its namespace in, so later lookups are plain dict hits."""

    def __getattr__(self, attr: str) -> Any:  # only called for names not (yet) in our __dict__
        import importlib

        real = importlib.import_module(self.__name__)
        self.__dict__.update({k: v for k, v in vars(real).items() if not k.startswith("__")})
        return getattr(real, attr)


def lazy_module(name: str) -> ModuleType:
    """Module ``name``, imported on its first attribute access.

    numpy costs ~40 ms of a command's start-up; commands whose work never touches it (``--help``, a 4 KiB read)
    should not pay for it. After the first access attribute lookups cost what a module's do. A module already
    imported is returned as is; nothing is put in ``sys.modules``.
    """
    mod = sys.modules.get(name)
    return mod if mod is not None else _LazyModule(name)


MetaBlock = NewType("MetaBlock", int)
DataBlock = NewType("DataBlock", int)
ThinBlock = NewType("ThinBlock", int)

_SUFFIX = {"": 1, "b": 1, "s": SECTOR_SIZE, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bskmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse an LVM-style size (``512``, ``64k``, ``10G``, ``1T``, ``128s`` sectors) into bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise InvalidArgument(reason=f"invalid size {text!r} (use e.g. 512, 64k, 10M, 10G, 1T, 128s)")
    number, suffix = m.group(1), m.group(2).lower()
    value = float(number) * _SUFFIX[suffix] if "." in number else int(number) * _SUFFIX[suffix]
    if int(value) != value:
        raise InvalidArgument(reason=f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(nbytes: int) -> str:
    """Human-readable binary size: 0, 512B, 64KiB, 1.5GiB."""
    if nbytes == 0:
        return "0"
    for unit, factor in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= factor:
            v = nbytes / factor
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{nbytes}B"


def check_data_block_size(nbytes: int) -> int:
    """Validate a chunk size (64 KiB..1 GiB in 64 KiB steps); return it in sectors."""
    if nbytes < MIN_DATA_BLOCK_SIZE or nbytes > MAX_DATA_BLOCK_SIZE or nbytes % MIN_DATA_BLOCK_SIZE:
        raise InvalidArgument(reason=f"chunk size {nbytes} bytes is invalid: must be 64KiB..1GiB in 64KiB steps")
    return nbytes // SECTOR_SIZE
