"""The layer check covers the command line and the benchmark tooling too: the library never imports them, and they
use the library from the pool layer up (plus errors, units and the block stores that open a bare metadata file),
never the engine's internals (nodes, transaction manager, space maps, on-disk layouts)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLING = [p for d in ("cli", "thinpool_bench") for p in sorted((REPO / d).rglob("*.py"))]
ENGINE = ("thinpool.btree", "thinpool.tx", "thinpool.spacemap", "thinpool.formats", "thinpool.checksum")


def imported(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if node.module == "thinpool":
                names += [f"thinpool.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


@pytest.mark.parametrize("path", sorted((REPO / "thinpool").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_the_library_never_imports_the_cli_or_the_benchmarks(path: Path) -> None:
    bad = [n for n in imported(path) if n.split(".")[0] in ("thinpool_cli", "thinpool_bench", "cli")]
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


@pytest.mark.parametrize("path", TOOLING, ids=lambda p: str(p.relative_to(REPO)))
def test_the_cli_and_benchmarks_do_not_reach_into_the_engine(path: Path) -> None:
    bad = [n for n in imported(path) if any(n == e or n.startswith(e + ".") for e in ENGINE)]
    assert not bad, f"{path.relative_to(REPO)} imports engine internals {bad}"



def test_no_cli_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in sorted((REPO / "cli").glob("*.py"))
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
