"""The README tells the truth about the code: every command is documented, and the import graph it shows is the
one the code has (generated here from the sources; no upward arrow, no cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import click

from thinpool_cli.main import cli

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
BEGIN, END = "<!-- import-graph:begin -->", "<!-- import-graph:end -->"


def leaf_commands() -> list[str]:
    ctx = click.Context(cli)
    out: list[str] = []

    def walk(cmd: click.Command, prefix: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None, name
                walk(sub, [*prefix, name])
        else:
            out.append(" ".join(prefix))

    walk(cli, [])
    return out


def test_every_command_is_in_the_readme() -> None:
    missing = [c for c in leaf_commands() if f"thinpool {c}" not in README]
    assert not missing, f"commands without a README entry: {missing}"


def _package(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2])


def import_graph() -> dict[str, set[str]]:
    """Package-level imports among thinpool's packages (imports under TYPE_CHECKING excluded)."""
    edges: dict[str, set[str]] = {}
    for path in sorted((REPO / "thinpool").rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("").parts
        mod = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
        if mod == "thinpool":
            continue  # the package's lazy re-exports
        src = _package(mod)
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for stmt in ast.walk(tree) if isinstance(stmt, ast.If)
                       and getattr(stmt.test, "id", None) == "TYPE_CHECKING" for b in stmt.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module == "thinpool" and node.level == 0:
                names = [f"thinpool.{a.name}" for a in node.names  # from thinpool import checksum
                         if (REPO / "thinpool" / a.name).is_dir() or (REPO / "thinpool" / f"{a.name}.py").exists()]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("thinpool.") and _package(name) != src:
                    edges.setdefault(src, set()).add(_package(name))
    return edges


def render(edges: dict[str, set[str]]) -> str:
    short = lambda m: m.removeprefix("thinpool.")  # noqa: E731
    return "\n".join(f"{short(k)} -> {', '.join(sorted(short(d) for d in v))}" for k, v in sorted(edges.items()))


def test_import_graph_has_no_cycle() -> None:
    edges = import_graph()
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in edges.get(n, ()):
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*path, n, d])}"
            if d not in state:
                visit(d, [*path, n])
        state[n] = 2

    for n in list(edges):
        if n not in state:
            visit(n, [])


def test_readme_shows_the_import_graph_of_the_code() -> None:
    assert BEGIN in README and END in README
    shown = README.split(BEGIN, 1)[1].split(END, 1)[0].strip().strip("`").strip()
    assert shown == render(import_graph()), "regenerate: python -c 'from tests.unit.test_readme import *; print(render(import_graph()))'"
