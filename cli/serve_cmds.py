"""`thinpool serve` (NBD server) and `thinpool mount` (FUSE export): real clients on a pool's thin devices.

Each thin device is exported under its name and reachable by its id too (``nbd+unix:///0`` and
``nbd+unix:///vol`` name the same export). The pool is found through ``--pool`` or ``$THINPOOL_POOL``. Both
commands commit the pool when they stop: ``serve`` on SIGINT/SIGTERM, ``mount`` on unmount (``umount DIR`` or
SIGINT/SIGTERM to the process), unless a commit failed while serving: then the pool is left as its last good
commit with needs_check set and the command fails (exit 4). While either runs, pool commands from another shell
(`thin create|snap|delete`, `pool status|resize|commit`) reach it through the control channel
(``POOL/control.sock``).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any
from urllib.parse import quote

import click

from thinpool.errors import ServedPoolFailed

POOL_OPTION = click.option("--pool", "pool_path", envvar="THINPOOL_POOL", required=True,
                           type=click.Path(file_okay=False, exists=True),
                           help="Pool directory (or set THINPOOL_POOL).")
READONLY_OPTION = click.option("--read-only", "readonly", is_flag=True,
                               help="Open the pool read-only and refuse writes, trims and zeroing on every export.")
EXPORT_OPTION = click.option("--export", "exports", multiple=True, metavar="ID[:ro|:rw]",
                             help="Export only this device (id or name; repeatable); ':ro' makes it read-only, "
                                  "':rw' makes a snapshot writable (snapshots are read-only by default). "
                                  "Default: every device.")


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit():
        raise click.BadParameter(f"{value!r}: use HOST:PORT, e.g. 127.0.0.1:10809 or [::1]:10809",
                                 param_hint="--listen")
    if not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r}: port {port} is outside 0..65535", param_hint="--listen")
    if host == "*":
        host = "0.0.0.0"
    return host, int(port)


def _parse_export(spec: str) -> tuple[str, bool | None]:
    """``ID`` / ``NAME`` with an optional ``:ro`` / ``:rw`` -> (ref, readonly or None for the default)."""
    ref, sep, mode = spec.rpartition(":")
    if sep and mode in ("ro", "rw"):
        return ref, mode == "ro"
    return spec, None


def _readonly(dev: Any) -> Any:
    from thinpool.control import ReadOnlyView

    return ReadOnlyView(dev)


def is_snapshot(pool: Any, dev_id: int) -> bool:
    """Whether the manifest records ``dev_id`` as a snapshot (``snapshot_of``)."""
    entry = pool.manifest.get("devices", {}).get(str(dev_id), {})
    return entry.get("snapshot_of") is not None


def select_exports(pool: Any, specs: tuple[str, ...], readonly: bool = False
                   ) -> tuple[dict[str, Any], dict[str, str]]:
    """(export name -> device, alias (the id) -> export name) for the chosen devices (all when ``specs`` is
    empty). Snapshots are read-only unless their spec says ``:rw``; ``readonly`` makes everything read-only."""
    chosen = [(pool.find_device(ref), ro) for ref, ro in map(_parse_export, specs)] if specs \
        else [(d, None) for d in pool.list_devices()]
    out: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    for dev_id, ro in chosen:
        name = pool.device_name(dev_id)
        if name in out:
            raise click.UsageError(f"device {dev_id} is listed twice (export {name!r})")
        ro = readonly or (is_snapshot(pool, dev_id) if ro is None else ro)
        dev = pool.device(dev_id)
        out[name] = _readonly(dev) if ro else dev
        if str(dev_id) != name:
            aliases[str(dev_id)] = name
    if not out:
        raise click.UsageError("the pool has no thin devices to export")
    return out, aliases


def notify_ready(ready_fd: int | None) -> None:
    """Tell a supervisor we are listening: ``--ready-fd`` gets ``READY=1\\n`` and is closed; $NOTIFY_SOCKET
    (systemd Type=notify) gets the sd_notify datagram."""
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"READY=1\n")
        finally:
            os.close(ready_fd)
    addr = os.environ.get("NOTIFY_SOCKET")
    if addr:
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.sendto(f"READY=1\nMAINPID={os.getpid()}".encode(), addr)
        finally:
            s.close()


class PidFile:
    """``--pid-file``: written once listening, removed at exit (if it still holds our pid)."""

    def __init__(self, path: str | None) -> None:
        self.path = os.path.abspath(path) if path else None

    def write(self) -> None:
        if self.path:
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.path:
            try:
                with open(self.path) as f:
                    if f.read().strip() == str(os.getpid()):
                        os.unlink(self.path)
            except OSError:
                pass


def fail_served_pool(pool: Any, reason: str) -> None:
    """After a failed commit while serving: back to the last commit, needs_check set (best effort, as dm-thin's
    metadata_operation_failed), the pool released without committing, one error for the CLI."""
    try:
        pool.fail(reason)
    except Exception:
        pass  # best effort: the device may be failing; nothing is committed either way
    pool.crash_close()
    raise ServedPoolFailed(reason=reason)


def _tls_options(tls: str | None, cert: str | None, key: str | None, ca: str | None, host: str | None) -> Any:
    from thinpool.nbd.listen import is_loopback
    from thinpool.nbd.tls import server_context

    if (cert is None) != (key is None):
        raise click.UsageError("give --tls-cert and --tls-key together")
    if ca is not None and cert is None:
        raise click.UsageError("--tls-ca needs --tls-cert and --tls-key")
    network = host is not None and not is_loopback(host)
    if tls is None:
        tls = ("require" if network else "on") if cert else "off"
    if tls != "off" and cert is None:
        raise click.UsageError(f"--tls={tls} needs --tls-cert and --tls-key")
    if network and tls == "off":
        if cert is None:
            raise click.UsageError(f"--listen {host}: a non-loopback address needs TLS (--tls-cert/--tls-key); "
                                   "pass --tls=off to serve plaintext to the network anyway")
        click.echo(f"thinpool: warning: serving plaintext NBD on {host}, reachable from the network", err=True)
    elif network and tls == "on":
        click.echo(f"thinpool: warning: TLS is optional on {host}: plaintext clients are served too", err=True)
    ctx = server_context(cert, key, ca) if cert and key and tls != "off" else None
    return tls, ctx


@click.command("serve")
@POOL_OPTION
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
              help="Listen on this unix socket (default: nbd.sock in the pool directory).")
@click.option("--listen", "listen", metavar="HOST:PORT",
              help="Listen on TCP instead, e.g. 127.0.0.1:10809. A non-loopback address requires TLS.")
@EXPORT_OPTION
@READONLY_OPTION
@click.option("--commit-interval", type=click.FloatRange(min=0), default=0, show_default=True, metavar="SECONDS",
              help="Also commit the pool every SECONDS (0: only on FLUSH/FUA and at shutdown).")
@click.option("--tls", "tls", type=click.Choice(["off", "on", "require"]), default=None,
              help="NBD_OPT_STARTTLS: off, on (offered) or require (plaintext refused). Default: require on a "
                   "non-loopback --listen, on when a certificate is given, else off.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Server certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Server private key (PEM).")
@click.option("--tls-ca", type=click.Path(dir_okay=False),
              help="CA certificate (PEM): clients must present a certificate it signed.")
@click.option("--max-connections", type=click.IntRange(min=1), default=100, show_default=True,
              help="Connections at once (at the cap, a connection still in its handshake gives way).")
@click.option("--handshake-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              metavar="SECONDS", help="Seconds a client has to finish the NBD handshake.")
@click.option("--socket-mode", default="0600", show_default=True, metavar="OCTAL",
              help="Permissions of the unix socket (who may connect).")
@click.option("--pid-file", type=click.Path(dir_okay=False), help="Write the server's pid here once listening.")
@click.option("--ready-fd", type=click.IntRange(min=0), metavar="FD",
              help="Write READY=1 to this file descriptor (and close it) once listening; $NOTIFY_SOCKET "
                   "(systemd) is notified too.")
@click.option("--fork", "fork", is_flag=True,
              help="Run in the background: return (exit 0) once the server listens, or fail with its error.")
def serve(pool_path: str, socket_path: str | None, listen: str | None, exports: tuple[str, ...],
          readonly: bool, commit_interval: float, tls: str | None, tls_cert: str | None, tls_key: str | None,
          tls_ca: str | None, max_connections: int, handshake_timeout: float, socket_mode: str,
          pid_file: str | None, ready_fd: int | None, fork: bool) -> None:
    """Serve thin devices over NBD (one export per device, by name and by id) until SIGINT/SIGTERM, then commit.

    NBD FLUSH and FUA writes commit the pool; TRIM discards chunks; block status shows holes vs data. A failed
    commit fails the server: every later request gets an error, nothing is committed at exit (exit 4).

    Example: thinpool serve --pool ./pool --socket /tmp/tp.sock --fork --pid-file tp.pid && nbdinfo 'nbd+unix:///0?socket=/tmp/tp.sock'
    """
    from thinpool.nbd import ServerOptions
    from thinpool.nbd import serve as nbd_serve
    from thinpool.pool import Pool

    if socket_path and listen:
        raise click.UsageError("give --socket or --listen, not both")
    try:
        mode = int(socket_mode, 8)
    except ValueError:
        raise click.BadParameter(f"{socket_mode!r} is not an octal mode", param_hint="--socket-mode") from None
    host = port = None
    if listen:
        host, port = _parse_listen(listen)
    elif not socket_path:
        socket_path = os.path.join(pool_path, "nbd.sock")
    tls_mode, ctx = _tls_options(tls, tls_cert, tls_key, tls_ca, host)
    options = ServerOptions(max_connections=max_connections, handshake_timeout=handshake_timeout, tls=ctx,
                            tls_mode=tls_mode, socket_mode=mode, read_only=readonly)
    pid = PidFile(pid_file)
    if fork:
        ready_fd = _fork(ready_fd)
    pool = Pool.open(pool_path, readonly=readonly)
    try:
        devices, aliases = select_exports(pool, exports, readonly)
        control: list[Any] = []

        def ready(server: Any) -> None:
            scheme = "nbds" if ctx is not None else "nbd"
            for addr in server.addresses:
                for name in devices:
                    if isinstance(addr, str):
                        uri = f"{scheme}+unix:///{quote(name, safe='')}?socket={os.path.abspath(addr)}"
                    else:
                        h = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
                        uri = f"{scheme}://{h}:{addr[1]}/{quote(name, safe='')}"
                    click.echo(f"serving {uri}")
            if not readonly:
                control.append(_start_control(pool, server, devices))
                click.echo(f"control {control[-1].path}")
            sys.stdout.flush()
            pid.write()
            notify_ready(ready_fd)
            if fork:
                _detach_output()

        periodic = (commit_interval, pool.commit) if commit_interval and not readonly else None
        try:
            server = nbd_serve(devices, unix_path=socket_path, host=host, port=port, on_shutdown=pool.commit,
                               ready=ready, periodic=periodic, options=options, aliases=aliases)
        finally:
            for c in control:
                c.close()
            pid.remove()
        if server.failed is not None:
            fail_served_pool(pool, server.failed)
        pool.close()
    except BaseException:
        if not pool.closed:
            pool.crash_close() if not pool.readonly else pool.close()
        raise
    click.echo("stopped" if readonly else "stopped; pool committed")


def _fork(ready_fd: int | None) -> int:
    """--fork: the parent waits for the child's readiness (the pipe) and exits 0, or 1 if the child died first
    (its one-line error is already on the shared stderr). Returns, in the child, the pipe's write end."""
    r, w = os.pipe()
    sys.stdout.flush()
    child = os.fork()
    if child:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            ok = f.read().startswith(b"READY=1")
        if not ok:
            _pid, status = os.waitpid(child, 0)
            raise click.exceptions.Exit(os.waitstatus_to_exitcode(status) or 1)
        if ready_fd is not None:
            notify_ready(ready_fd)
        raise click.exceptions.Exit(0)
    os.close(r)
    os.setsid()
    if ready_fd is not None:
        os.close(ready_fd)  # the parent reports readiness there
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return w


def _detach_output() -> None:
    """A forked server, once ready, writes nothing to the terminal (or pipe) it was started from."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def _start_control(pool: Any, server: Any, devices: dict[str, Any]) -> Any:
    """The control channel of a running `serve` (see thinpool.control)."""
    from thinpool.control import ControlServer, NbdHost

    return ControlServer.start(pool, NbdHost(server, pool))


def commands() -> list[click.Command]:
    """serve and mount (mount lives in mount_cmds, which imports this module's options)."""
    from thinpool_cli.mount_cmds import mount

    return [serve, mount]


def register(group: click.Group) -> None:
    """Add these commands to the `thinpool` group (cli/main.py)."""
    for cmd in commands():
        group.add_command(cmd)


if __name__ == "__main__":  # python -m thinpool_cli.serve_cmds serve|mount ...
    from thinpool_cli.main import ThinpoolGroup

    grp = ThinpoolGroup(commands={c.name: c for c in commands()})
    grp()
