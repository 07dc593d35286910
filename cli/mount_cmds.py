"""`thinpool mount`: a FUSE export of a pool's thin devices (see serve_cmds for the shared options and exports)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

from thinpool.errors import ServerError
from thinpool_cli.serve_cmds import EXPORT_OPTION, POOL_OPTION, READONLY_OPTION, fail_served_pool, select_exports


def _start_fuse_control(pool: Any, ops: Any) -> Any:
    from thinpool.control import ControlServer, FuseHost

    return ControlServer.start(pool, FuseHost(ops, pool))


@click.command("mount")
@POOL_OPTION
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@EXPORT_OPTION
@READONLY_OPTION
@click.option("--no-direct-io", is_flag=True, help="Let the kernel page cache sit in front of the devices.")
def mount(pool_path: str, directory: str, exports: tuple[str, ...], readonly: bool, no_direct_io: bool) -> None:
    """Show thin devices as files DIR/<name> through FUSE (foreground) until unmounted, then commit.

    read/write go to the device, fsync commits the pool, fallocate punch-hole (what a loop device sends for
    discard/fstrim) discards chunks, SEEK_DATA/SEEK_HOLE show the holes. A failed fsync fails the export (every
    later I/O gets EIO, nothing is committed at unmount, exit 4). Unmount with `umount DIR` (or Ctrl-C).

    Example: thinpool mount --pool ./pool /mnt/tp & losetup -f --show /mnt/tp/0
    """
    from thinpool.pool import Pool

    fuse_mount = _fuse()
    pool = Pool.open(pool_path, readonly=readonly)
    try:
        devices, _aliases = select_exports(pool, exports, readonly)
        for name in devices:
            if "/" in name or name in (".", ".."):
                raise ServerError(reason=f"device name {name!r} cannot be a file name in the mount")
        click.echo(f"mounting {', '.join(devices)} at {os.path.abspath(directory)}")
        sys.stdout.flush()
        state: dict[str, Any] = {}
        control: list[Any] = []

        def setup(ops: Any) -> None:
            if not readonly:
                control.append(_start_fuse_control(pool, ops))
                click.echo(f"control {control[-1].path}")
                sys.stdout.flush()

        try:
            fuse_mount(devices, directory, on_unmount=pool.commit, direct_io=not no_direct_io, state=state,
                       setup=setup)
        finally:
            for c in control:
                c.close()
        failed = state.get("failed")
        if failed is not None:
            fail_served_pool(pool, failed)
        pool.close()
    except BaseException:
        if not pool.closed:
            pool.crash_close() if not pool.readonly else pool.close()
        raise
    click.echo("unmounted" if readonly else "unmounted; pool committed")


def _fuse() -> Callable[..., Any]:
    try:
        from thinpool.fusefs import _load_mfusepy
        from thinpool.fusefs import mount as fuse_mount

        _load_mfusepy()
    except ImportError:
        raise ServerError(reason="FUSE support is not installed: pip install 'thinpool[fuse]'") from None
    except OSError as e:
        raise ServerError(reason=f"libfuse3 is not available ({e}): install fuse3 "
                                 "(apt-get install fuse3), then pip install 'thinpool[fuse]'") from None
    return fuse_mount
