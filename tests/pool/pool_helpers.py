"""Helpers for the pool tests: check a pool's metadata with our checker and the real thin_check, patterns,
holes in the data file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from conftest import need_tool, run_tool
from oracles import assert_thin_check

from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.check import check_metadata, format_report

CH = 64 << 10


def pattern(n: int, seed: int) -> bytes:
    """n bytes that differ per seed and per position (never all zeros)."""
    block = bytes(((i * 131 + seed * 71 + 1) % 251) + 1 for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


def check_pool(path: str | os.PathLike[str], *, thin_check: bool = True) -> None:
    """The pool (closed, or committed) passes our checker with no warnings and the real thin_check."""
    meta = Path(path) / "metadata"
    report = check_metadata(FileBlockStore(meta, readonly=True))
    assert report.ok and not report.warnings, format_report(report)
    if thin_check:
        assert_thin_check(meta)


def is_hole(path: str | os.PathLike[str], offset: int, length: int) -> bool:
    """Whether [offset, offset+length) of the file holds no data (SEEK_DATA finds nothing before its end)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            nxt = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset at all
                return True
            raise
        return nxt >= offset + length
    finally:
        os.close(fd)


def is_data(path: str | os.PathLike[str], offset: int, length: int) -> bool:
    """Whether [offset, offset+length) of the file is fully allocated (SEEK_HOLE finds no hole inside)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) == offset and os.lseek(fd, offset, os.SEEK_HOLE) >= offset + length
    finally:
        os.close(fd)
