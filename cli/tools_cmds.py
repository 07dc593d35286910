"""The metadata tools in the manner of thin-provisioning-tools: check, dump, restore, ls, delta, rmap, map.

Layer: cli. May import: click, the tools_* command modules.

Each tool takes a pool directory OR a bare metadata file or device (so it also works on metadata copied from a
real LVM pool), as TARGET, --pool or $THINPOOL_POOL. Read-only tools take no lock: they read the last commit.
The text output of dump, ls, delta and rmap is byte for byte that of thin-provisioning-tools 0.9.0. The commands
live in tools_check (check), tools_dump (dump, restore), tools_query (ls, delta, rmap) and tools_map (map); the
work is done by the library (``thinpool.metadata`` and ``thinpool.tools``).
"""

from __future__ import annotations

from thinpool_cli.tools_check import check
from thinpool_cli.tools_dump import dump, restore
from thinpool_cli.tools_map import map_cmd
from thinpool_cli.tools_query import delta, ls, rmap

TOOLS = (check, dump, restore, ls, delta, rmap, map_cmd)

__all__ = ["TOOLS", "check", "delta", "dump", "ls", "map_cmd", "restore", "rmap"]
