"""The package imports only downward (the kernel persistent-data layering), and errors keep builtin bases."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import thinpool.errors as E

ROOT = Path(__file__).resolve().parents[2] / "thinpool"

# rank of each module (longest prefix wins); a module may import only modules of a lower rank or itself.
RANKS = {
    "thinpool.errors": 0,
    "thinpool.units": 1, "thinpool.checksum": 1,
    "thinpool.formats": 2,
    "thinpool.io": 3,
    "thinpool.tx": 5,  # knows blocks, checksums and the SpaceMap protocol (tx/api.py) only
    "thinpool.btree": 6,
    "thinpool.spacemap": 7,
    "thinpool.metadata": 8,
    "thinpool.tools": 8.5,  # thin_ls / thin_delta / thin_rmap / block maps over the metadata
    "thinpool.manifest": 8.7,
    "thinpool.thin": 9,
    "thinpool.pool": 10,
    "thinpool.rbd": 10.5,  # Ceph RBD diff streams over pools and devices
    "thinpool.fs": 11,
    "thinpool.driver": 11.5,  # Docker's devicemapper driver over pools and the ext2
    "thinpool.bench": 12, "thinpool.nbd": 12, "thinpool.fusefs": 12, "thinpool.control": 12,
    "thinpool.testing": 12,
    "thinpool": 13,  # the package __init__ may re-export anything
}


def rank(mod: str) -> int:
    best = None
    for prefix in RANKS:
        if (mod == prefix or mod.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    assert best is not None, mod
    return RANKS[best]


def modules():
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), p


@pytest.mark.parametrize("mod,path", list(modules()), ids=lambda x: str(x) if isinstance(x, str) else "")
def test_imports_go_downward(mod: str, path: Path) -> None:
    if mod == "thinpool":
        return
    tree = ast.parse(path.read_text())
    me = rank(mod)
    typing_only = {id(n) for stmt in ast.walk(tree) if isinstance(stmt, ast.If)
                   and getattr(stmt.test, "id", None) == "TYPE_CHECKING" for b in stmt.body for n in ast.walk(b)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            if not n.startswith("thinpool") or n.startswith("thinpool_cli"):
                continue
            if n == "thinpool":
                continue
            assert rank(n) < me or n == mod or (rank(n) == me and n.split(".")[:2] == mod.split(".")[:2]), \
                f"{mod} (layer {me}) imports {n} (layer {rank(n)})"


def test_fs_uses_only_the_device_interface() -> None:
    for p in (ROOT / "fs").rglob("*.py"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("thinpool."):
                assert node.module in ("thinpool.errors", "thinpool.io.device") or node.module.startswith("thinpool.fs"), \
                    f"{p.name} imports {node.module}"


def test_errors_subclass_builtins_where_meaning_matches() -> None:
    assert issubclass(E.DeviceNotFound, LookupError)
    assert issubclass(E.OutOfBounds, ValueError)
    assert issubclass(E.FileNotFound, FileNotFoundError)
    assert issubclass(E.NotADirectory, NotADirectoryError)
    assert issubclass(E.IsADirectory, IsADirectoryError)
    assert issubclass(E.ChecksumError, E.MetadataCorrupt)
    assert issubclass(E.NoDataSpace, E.NoSpace) and issubclass(E.FsNoSpace, E.NoSpace)
    e = E.MetadataCorrupt(block=7, reason="bad")
    assert e.block == 7 and "block 7" in str(e)
    assert E.ChecksumError(block=3, block_type="btree node", stored=1, computed=2).block == 3
