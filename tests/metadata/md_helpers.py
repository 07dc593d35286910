"""Helpers for the metadata acceptance tests: golden images, real-tool runs, our dump, a file-backed pool."""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

from conftest import IMAGES, need_tool, run_tool
from oracles import assert_thin_check

from thinpool.io.block_store import FileBlockStore
from thinpool.metadata.dump import dump_xml
from thinpool.metadata.pool_metadata import PoolMetadata

IMAGE_NAMES = sorted(p.name[:-len(".bin.gz")] for p in IMAGES.glob("*.bin.gz"))

def unpack_image(name: str, dest_dir: Path) -> Path:
    """Decompress images/<name>.bin.gz into dest_dir; returns the .bin path."""
    out = dest_dir / f"{name}.bin"
    with gzip.open(IMAGES / f"{name}.bin.gz", "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def our_dump(pmd: PoolMetadata) -> str:
    buf = io.StringIO()
    dump_xml(pmd, buf)
    return buf.getvalue()


def our_dump_file(path: Path) -> str:
    store = FileBlockStore(path, readonly=True)
    try:
        return our_dump(PoolMetadata.open(store, readonly=True))
    finally:
        store.close()


def real_thin_check(path: Path, *extra: str) -> None:
    """Run the real checkers (C++ thin_check 0.9.0 and Rust 1.1.0): both exit 0 with nothing but their step headers
    on stderr and a TRANSACTION_ID= line on stdout."""
    assert_thin_check(path, *extra, stdout_has="TRANSACTION_ID=")


def real_thin_dump(path: Path, *extra: str) -> str:
    need_tool("thin_dump")
    r = run_tool("thin_dump", *extra, str(path), check=False)
    assert r.returncode == 0, f"thin_dump exit {r.returncode}\nstderr:\n{r.stderr}"
    return r.stdout


def assert_real_tools_agree(path: Path, expected_dump: str | None = None) -> str:
    """thin_check passes and thin_dump prints exactly our dump (of the file, or ``expected_dump``)."""
    real_thin_check(path)
    mine = our_dump_file(path) if expected_dump is None else expected_dump
    theirs = real_thin_dump(path)
    assert theirs == mine
    return mine


def new_pool_file(path: Path, *, nr_meta_blocks: int = 2048, nr_data_blocks: int = 100_000,
                  data_block_size: int = 128) -> PoolMetadata:
    """Format fresh metadata on a sparse file of nr_meta_blocks 4 KiB blocks."""
    with open(path, "wb") as f:
        f.truncate(nr_meta_blocks * 4096)
    return PoolMetadata.format(FileBlockStore(path), data_block_size=data_block_size, nr_data_blocks=nr_data_blocks)
