"""`thinpool serve` (NBD server) and `thinpool mount` (FUSE export): real clients on a pool's thin devices.

Each thin device is exported under its name (the pool manifest's name, the device id by default). The pool is
found through ``--pool`` or ``$THINPOOL_POOL``. Both commands commit the pool when they stop: ``serve`` on
SIGINT/SIGTERM, ``mount`` on unmount (``umount DIR`` or SIGINT/SIGTERM to the process).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

POOL_OPTION = click.option("--pool", "pool_path", envvar="THINPOOL_POOL", required=True,
                           type=click.Path(file_okay=False, exists=True),
                           help="Pool directory (or set THINPOOL_POOL).")
READONLY_OPTION = click.option("--read-only", "readonly", is_flag=True,
                               help="Open the pool read-only and refuse writes, trims and zeroing.")
EXPORT_OPTION = click.option("--export", "exports", multiple=True, metavar="ID",
                             help="Export only this device (id or name; repeatable). Default: every device.")


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise click.BadParameter(f"{value!r}: use HOST:PORT, e.g. 127.0.0.1:10809", param_hint="--listen")
    if host.startswith("[") and host.endswith("]"):
        raise click.BadParameter("IPv6 addresses are not supported", param_hint="--listen")
    return host, int(port)


class ReadOnlyDevice:
    """A read-only view of a device (``readonly`` makes NBD advertise READ_ONLY and FUSE show mode 0444)."""

    readonly = True

    def __init__(self, dev: Any) -> None:
        self._dev = dev

    @property
    def size(self) -> int:
        return int(self._dev.size)

    def read(self, offset: int, length: int) -> bytes:
        return self._dev.read(offset, length)

    def mapped_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        return self._dev.mapped_ranges(offset, length)

    def flush(self) -> None:
        pass

    def _refuse(self, *args: Any) -> None:
        from thinpool.errors import ReadOnly

        raise ReadOnly()

    write = discard = write_zeroes = _refuse


def _select(pool: Any, refs: tuple[str, ...], readonly: bool = False) -> dict[str, Any]:
    """Map export name -> ThinDevice for the chosen devices (all of them when ``refs`` is empty)."""
    ids = [pool.find_device(r) for r in refs] if refs else list(pool.list_devices())
    out: dict[str, Any] = {}
    for dev_id in ids:
        name = pool.device_name(dev_id) if hasattr(pool, "device_name") else str(dev_id)
        if name in out:
            raise click.UsageError(f"device {dev_id} is listed twice (export {name!r})")
        dev = pool.device(dev_id)
        out[name] = ReadOnlyDevice(dev) if readonly else dev
    if not out:
        raise click.UsageError("the pool has no thin devices to export")
    return out


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(int(getattr(e, "exit_code", 1)))


@click.command("serve")
@POOL_OPTION
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
              help="Listen on this unix socket (default: nbd.sock in the pool directory).")
@click.option("--listen", "listen", metavar="HOST:PORT", help="Listen on TCP instead, e.g. 127.0.0.1:10809.")
@EXPORT_OPTION
@READONLY_OPTION
@click.option("--commit-interval", type=click.FloatRange(min=0), default=0, show_default=True, metavar="SECONDS",
              help="Also commit the pool every SECONDS (0: only on FLUSH/FUA and at shutdown).")
def serve(pool_path: str, socket_path: str | None, listen: str | None, exports: tuple[str, ...],
          readonly: bool, commit_interval: float) -> None:
    """Serve thin devices over NBD (one export per device, by name) until SIGINT/SIGTERM, then commit.

    NBD FLUSH and FUA writes commit the pool; TRIM discards chunks; block status shows holes vs data.

    Example: thinpool serve --pool ./pool --socket /tmp/tp.sock & nbdinfo --map 'nbd+unix:///0?socket=/tmp/tp.sock'
    """
    from thinpool.errors import ThinpoolError
    from thinpool.nbd.server import serve as nbd_serve
    from thinpool.pool import Pool

    if socket_path and listen:
        raise click.UsageError("give --socket or --listen, not both")
    host = port = None
    if listen:
        host, port = _parse_listen(listen)
    elif not socket_path:
        socket_path = os.path.join(pool_path, "nbd.sock")
    try:
        with Pool.open(pool_path, readonly=readonly) as pool:
            devices = _select(pool, exports, readonly)

            def ready(server: Any) -> None:
                for addr in server.addresses:
                    for name in devices:
                        if isinstance(addr, str):
                            uri = f"nbd+unix:///{name}?socket={os.path.abspath(addr)}"
                        else:
                            uri = f"nbd://{addr[0]}:{addr[1]}/{name}"
                        click.echo(f"serving {uri}")
                sys.stdout.flush()

            periodic = (commit_interval, pool.commit) if commit_interval and not readonly else None
            nbd_serve(devices, unix_path=socket_path, host=host, port=port, on_shutdown=pool.commit, ready=ready,
                      periodic=periodic)
            click.echo("stopped" if readonly else "stopped; pool committed")
    except ThinpoolError as e:
        _fail(e)
    except OSError as e:
        _fail(e)


@click.command("mount")
@POOL_OPTION
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@EXPORT_OPTION
@READONLY_OPTION
@click.option("--no-direct-io", is_flag=True, help="Let the kernel page cache sit in front of the devices.")
def mount(pool_path: str, directory: str, exports: tuple[str, ...], readonly: bool, no_direct_io: bool) -> None:
    """Show thin devices as files DIR/<name> through FUSE (foreground) until unmounted, then commit.

    read/write go to the device, fsync commits the pool, fallocate punch-hole (what a loop device sends for
    discard/fstrim) discards chunks. Unmount with `umount DIR` (or Ctrl-C).

    Example: thinpool mount --pool ./pool /mnt/tp & losetup -f --show /mnt/tp/0
    """
    from thinpool.errors import ThinpoolError
    from thinpool.fusefs import mount as fuse_mount
    from thinpool.pool import Pool

    try:
        with Pool.open(pool_path, readonly=readonly) as pool:
            devices = _select(pool, exports, readonly)
            click.echo(f"mounting {', '.join(devices)} at {os.path.abspath(directory)}")
            sys.stdout.flush()
            fuse_mount(devices, directory, on_unmount=pool.commit, direct_io=not no_direct_io)
            click.echo("unmounted" if readonly else "unmounted; pool committed")
    except ThinpoolError as e:
        _fail(e)
    except (OSError, RuntimeError) as e:
        _fail(e)


COMMANDS = [serve, mount]


def register(group: click.Group) -> None:
    """Add these commands to the `thinpool` group (cli/main.py)."""
    for cmd in COMMANDS:
        group.add_command(cmd)


if __name__ == "__main__":  # python -m thinpool_cli.serve_cmds serve|mount ...
    grp = click.Group(commands={c.name: c for c in COMMANDS})
    grp()
