"""Entry point of the `thinpool` command line.

Layer: cli. May import: click, thinpool.errors and the command modules (each of which imports numpy, rich and the
library only inside its commands, so ``thinpool --help`` stays fast).

Errors are handled once, here (``ThinpoolGroup.invoke``): one line on stderr and a documented exit status, never a
traceback.

Exit status: 0 success; 1 generic error (and ``check`` found errors); 2 usage error (bad option, bad size, missing
pool argument); 3 no space (data or metadata); 4 metadata error (corrupt, unsupported, needs_check);
5 device error (no such device, device exists, bad id); 130 interrupted.
"""

from __future__ import annotations

import errno
import importlib
import sys
from typing import Any

import click

from thinpool import __version__
from thinpool.errors import ThinpoolError

# Every command is loaded on first use, so that --help imports no command module (name -> module, attribute,
# one-line help shown by --help). A command whose module is not installed is not listed; a module that exists
# but fails to import is an error, not "No such command".
LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "pool": ("thinpool_cli.pool_cmds", "pool", "Create a pool, show its status, resize it, pool messages."),
    "thin": ("thinpool_cli.thin_cmds", "thin", "Thin devices: create, snap, delete, read, write, import, export."),
    "check": ("thinpool_cli.tools_cmds", "check", "Check metadata like thin_check (exit 0 ok, 1 errors)."),
    "dump": ("thinpool_cli.tools_cmds", "dump", "Dump metadata as thin_dump XML, human-readable or JSON."),
    "restore": ("thinpool_cli.tools_cmds", "restore", "Restore metadata from thin_dump XML (thin_restore)."),
    "ls": ("thinpool_cli.tools_cmds", "ls", "List devices like thin_ls: mapped, exclusive, shared."),
    "delta": ("thinpool_cli.tools_cmds", "delta", "Differences between two devices, like thin_delta."),
    "rmap": ("thinpool_cli.tools_cmds", "rmap", "Reverse map data blocks to thin blocks, like thin_rmap."),
    "map": ("thinpool_cli.tools_cmds", "map_cmd", "Block map of devices: text, qemu-img JSON or a PNG."),
    "quickstart": ("thinpool_cli.quickstart", "quickstart", "A demo pool in ./thinpool-demo: snapshots, CoW, maps."),
    "fs": ("thinpool_cli.fs_cmds", "fs", "An ext2 filesystem on a thin device (mkfs, ls, put, get, ...)."),
    "serve": ("thinpool_cli.serve_cmds", "serve", "Serve thin devices over NBD."),
    "mount": ("thinpool_cli.mount_cmds", "mount", "Export thin devices as files through FUSE."),
    "bench": ("thinpool_cli.bench_cmds", "bench", "Measure thinpool against raw files, qcow2 and friends."),
    "metadata-size": ("thinpool_cli.metasize_cmds", "metadata_size",
                      "Estimate the metadata size for a pool, like thin_metadata_size."),
    "driver": ("thinpool_cli.driver_cmds", "driver", "Docker's devicemapper driver: init the base device, info."),
    "image": ("thinpool_cli.driver_cmds", "image", "Images as snapshot chains: load, ls, rm, save (OCI/docker)."),
    "container": ("thinpool_cli.driver_cmds", "container",
                  "Containers on image snapshots: create, ls, cp, diff, commit, export, rm."),
    "export-diff": ("thinpool_cli.rbd_cmds", "export_diff", "Write an rbd diff v1 stream of a device (Ceph RBD)."),
    "import-diff": ("thinpool_cli.rbd_cmds", "import_diff", "Apply an rbd diff v1 stream to a device (Ceph RBD)."),
    "export": ("thinpool_cli.rbd_cmds", "export_cmd", "Export a device with its snapshots (rbd export-format 2)."),
    "import": ("thinpool_cli.rbd_cmds", "import_cmd", "Import an rbd export-format 2 stream as devices."),
}


def report_error(message: str, code: int) -> None:
    """Print one line on stderr and exit with ``code``."""
    click.echo(f"thinpool: error: {message}", err=True)
    raise click.exceptions.Exit(code)


class ThinpoolGroup(click.Group):
    """The root group: lazy commands, and the one place where exceptions become exit codes."""

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
        except ThinpoolError as e:
            report_error(str(e), getattr(e, "exit_code", 1))
        except BrokenPipeError:
            # the reader went away (e.g. `thinpool dump | head`): quiet, like the C tools
            try:
                sys.stdout = None
            finally:
                raise click.exceptions.Exit(1)
        except MemoryError:
            # the work did not fit in this process's memory (a ulimit, a container's limit): one line, as every
            # other error; a failing command changes nothing, as for any exception before its commit
            report_error("out of memory", 1)
        except KeyboardInterrupt:
            click.echo("thinpool: interrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise click.exceptions.Exit(1) from None
            where = f"{e.filename}: " if e.filename else ""
            report_error(f"{where}{e.strerror or e}", 1)


@click.group(cls=ThinpoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="thinpool")
def cli() -> None:
    """thinpool: thin-provisioned block devices with Linux dm-thin metadata.

    A pool is a directory (metadata, data, pool.json). Commands that act on a pool take --pool PATH or read
    $THINPOOL_POOL. The tools (check, dump, restore, ls, delta, rmap, map) also accept a bare metadata file.

    Exit status: 0 ok, 1 error, 2 usage error, 3 no space, 4 metadata error, 5 device error.

    Start with: thinpool quickstart
    """


def main() -> None:
    cli(prog_name="thinpool")
