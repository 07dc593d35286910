"""Entry point of the `thinpool` command line: ``main()``, the command table, and the one mapping of errors to
exit statuses.

Layer: cli. May import: thinpool.errors, ``thinpool_cli.ls_fast``, and (inside ``main`` and ``__getattr__``) the
click app in ``thinpool_cli.app``. This module imports no click: ``thinpool ls`` with the fields the device details
give runs without it (``ls_fast.run_fast``: the same declaration of ``ls``'s options as the click command, and the
same listing); every other command line, and anything the fast path is not certain of, goes to click.

Errors are handled once, here (``report_failure``, which the click group's ``invoke`` and the fast path both call):
one line on stderr and a documented exit status, never a traceback.

Exit status: 0 success; 1 generic error (and ``check`` found errors); 2 usage error (bad option, bad size, missing
pool argument); 3 no space (data or metadata); 4 metadata error (corrupt, unsupported, needs_check);
5 device error (no such device, device exists, bad id); 130 interrupted.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from thinpool_cli.app import ThinpoolGroup, cli

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



FAST_PATH_ENVVAR = "THINPOOL_CLICK_ONLY"  # "1": every command line through click (tests compare the two paths)


def report_failure(e: BaseException) -> int:
    """Print the one stderr line for an exception a command raised and return its exit status; re-raise what is
    not an error of the command's work (SystemExit, click's own exceptions, bugs).

    ThinpoolError: its ``exit_code``; a reader that went away (``thinpool dump | head``): 1, quietly, like the C
    tools; MemoryError (a ulimit, a container's limit): 1; Ctrl-C: 130; another OSError: 1, with the file it names.
    """
    from thinpool.errors import ThinpoolError

    if isinstance(e, ThinpoolError):
        return _error_line(str(e), getattr(e, "exit_code", 1))
    if isinstance(e, BrokenPipeError):
        sys.stdout = None  # type: ignore[assignment]  # nothing more reaches the closed pipe, not even a flush
        return 1
    if isinstance(e, MemoryError):
        # a failing command changes nothing, as for any exception before its commit
        return _error_line("out of memory", 1)
    if isinstance(e, KeyboardInterrupt):
        if sys.stderr is not None:
            sys.stderr.write("thinpool: interrupted\n")
            sys.stderr.flush()
        return 130
    if isinstance(e, OSError):
        if e.errno == errno.EPIPE:
            return 1
        where = f"{e.filename}: " if e.filename else ""
        return _error_line(f"{where}{e.strerror or e}", 1)
    raise e


def _error_line(message: str, code: int) -> int:
    err = sys.stderr
    if err is not None:  # None: no stderr at all; click.echo then prints nothing, as here
        err.write(f"thinpool: error: {message}\n")
        err.flush()
    return code


def main(argv: Sequence[str] | None = None, *, fast: bool | None = None) -> None:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and exit with its status.

    ``fast``: whether ``thinpool ls`` may take the click-free path (default: unless $THINPOOL_CLICK_ONLY is 1).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if fast is None:
        fast = os.environ.get(FAST_PATH_ENVVAR) != "1"
    if fast and args and args[0] == "ls":
        from thinpool_cli.ls_fast import run_fast

        code = run_fast(args[1:])
        if code is not None:
            if argv is None and _is_console_script():  # the process is this command's: no teardown to wait for
                _exit_now(code)
            sys.exit(code)
    from thinpool_cli.app import cli as app

    app(args=args, prog_name="thinpool")


def _is_console_script() -> bool:
    """Whether the process runs the installed ``thinpool`` script (not ``python -c``, a test or another program
    calling ``main()``, which get SystemExit as from click)."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is not None and os.path.basename(main_file) == "thinpool"


def _exit_now(code: int) -> None:
    """Exit at once after flushing stdout and stderr: the fast path has closed what it opened and registered no
    exit handler, so the interpreter's teardown (freeing every module: ~15M instructions, ~3 ms, a tenth of
    ``thinpool ls``) does nothing anyone sees."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def __getattr__(name: str) -> Any:
    """The click app's names (``cli``, ``ThinpoolGroup``), imported on first use."""
    if name in ("cli", "ThinpoolGroup"):
        from thinpool_cli import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FAST_PATH_ENVVAR", "LAZY_COMMANDS", "ThinpoolGroup", "cli", "main", "report_failure"]
