"""The click app of the `thinpool` command line: the root group, its lazily loaded commands, its error handling.

Layer: cli. May import: click, thinpool.errors, ``thinpool_cli.main`` (the command table and ``report_failure``),
and the command modules (each of which imports numpy, rich and the library only inside its commands, so
``thinpool --help`` stays fast). ``thinpool_cli.main.main`` runs it; ``thinpool_cli.main.cli`` is this ``cli``.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from thinpool import __version__
from thinpool.errors import ThinpoolError
from thinpool_cli.main import LAZY_COMMANDS, report_failure


class ThinpoolGroup(click.Group):
    """The root group: lazy commands; the commands' errors go to ``thinpool_cli.main.report_failure``, the one
    place where exceptions become exit codes."""

    def _lazy(self, name: str) -> click.Command | None:
        spec = LAZY_COMMANDS.get(name)
        if spec is None:
            return None
        module, attr, _ = spec
        if not self._lazy_available(name):
            return None
        cmd = getattr(importlib.import_module(module), attr, None)
        if not isinstance(cmd, click.Command):
            raise RuntimeError(f"{module}.{attr} is not a command")
        self.add_command(cmd, name)
        return cmd

    def _lazy_available(self, name: str) -> bool:
        from importlib.util import find_spec

        try:
            return find_spec(LAZY_COMMANDS[name][0]) is not None
        except (ImportError, ValueError):
            return False

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(self.commands)
        names.update(n for n in LAZY_COMMANDS if self._lazy_available(n))
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = self.commands.get(cmd_name)
        if cmd is None:
            cmd = self._lazy(cmd_name)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.commands.get(name)
            if cmd is not None:
                if cmd.hidden:
                    continue
                rows.append((name, cmd.get_short_help_str(formatter.width - 6 - len(name))))
            else:
                rows.append((name, LAZY_COMMANDS[name][2]))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ThinpoolError, MemoryError, KeyboardInterrupt, OSError) as e:
            raise click.exceptions.Exit(report_failure(e)) from None


@click.group(cls=ThinpoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="thinpool")
def cli() -> None:
    """thinpool: thin-provisioned block devices with Linux dm-thin metadata.

    A pool is a directory (metadata, data, pool.json). Commands that act on a pool take --pool PATH or read
    $THINPOOL_POOL. The tools (check, dump, restore, ls, delta, rmap, map) also accept a bare metadata file.

    Exit status: 0 ok, 1 error, 2 usage error, 3 no space, 4 metadata error, 5 device error.

    Start with: thinpool quickstart
    """
