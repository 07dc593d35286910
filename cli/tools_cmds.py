"""The metadata tools in the manner of thin-provisioning-tools: check, dump, restore, ls, delta, rmap, map.

Layer: cli. May import: click, the tools_* command modules.

Each tool takes a pool directory OR a bare metadata file or device (so it also works on metadata copied from a
real LVM pool), as TARGET, --pool or $THINPOOL_POOL. Read-only tools take no lock: they read the last commit.
The text output of dump, ls, delta and rmap is byte for byte that of thin-provisioning-tools 0.9.0. The commands
live in tools_check (check), tools_dump (dump, restore), tools_query (ls, delta, rmap) and tools_map (map); the
work is done by the library (``thinpool.metadata`` and ``thinpool.tools``).

Each command's module is imported when the command is first looked up (PEP 562): ``thinpool ls`` imports
tools_query alone, not the checker's, the dumper's or the map's command modules.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import click

    TOOLS: tuple[click.Command, ...]

    from thinpool_cli.tools_check import check
    from thinpool_cli.tools_dump import dump, restore
    from thinpool_cli.tools_map import map_cmd
    from thinpool_cli.tools_query import delta, ls, rmap

# command name -> the module that defines it
_WHERE = {"check": "tools_check", "dump": "tools_dump", "restore": "tools_dump", "ls": "tools_query",
          "delta": "tools_query", "rmap": "tools_query", "map_cmd": "tools_map"}


def __getattr__(name: str) -> Any:
    if name == "TOOLS":
        return tuple(__getattr__(n) for n in ("check", "dump", "restore", "ls", "delta", "rmap", "map_cmd"))
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cmd: click.Command = getattr(import_module(f"thinpool_cli.{mod}"), name)
    globals()[name] = cmd
    return cmd


__all__ = ["TOOLS", "check", "delta", "dump", "ls", "map_cmd", "restore", "rmap"]
