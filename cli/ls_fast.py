"""`thinpool ls` without click: its parameters declared once, the listing both entries run, and the fast path.

Layer: cli. May import: thinpool (the library, only inside the functions); never click (``thinpool ls`` with the
default fields runs in a process that loads no click: ``tests/cli/test_ls_fast.py`` checks ``sys.modules``).

``LS_PARAMS`` is the one declaration of ``ls``'s command line: ``tools_query`` builds the click command from it, and
``run_fast`` parses argv with it. The fast path takes only what it is certain of: the exact option names
(``-o X``, ``--format X``, ``--format=X``), flags alone, at most one TARGET, a valid field list of fields the
device details alone give. Anything else (``-h``, an unknown, abbreviated or bundled option, ``--``, ``-oX``, a
value that looks like an option, a missing target, a bad field, a field that reads the mappings, an unreadable
path click's ``Path`` would refuse) returns None before doing anything, and the caller runs click, which prints
every usage error and help text. Errors of the listing itself are printed by ``thinpool_cli.main.report_failure``
on both paths, so they are the same line and exit status.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

POOL_ENVVAR = "THINPOOL_POOL"

LS_HELP_FIELDS = ("DEV, MAPPED_BLOCKS, EXCLUSIVE_BLOCKS, SHARED_BLOCKS, MAPPED_SECTORS, EXCLUSIVE_SECTORS, "
                  "SHARED_SECTORS, MAPPED_BYTES, EXCLUSIVE_BYTES, SHARED_BYTES, MAPPED, EXCLUSIVE, SHARED, "
                  "TRANSACTION, CREATE_TIME, SNAP_TIME, HIGHEST_BLOCK")


class Param:
    """One parameter of a command line: an option (``flags`` non-empty) or the positional argument ``dest``.

    ``is_flag``: takes no value (True when given). ``envvar``: the default of an absent option (non-empty values
    only, as click). ``path``: a click ``Path`` (files and directories; an existing path must be readable).
    """

    __slots__ = ("dest", "flags", "metavar", "help", "is_flag", "envvar", "path")

    def __init__(self, dest: str, flags: tuple[str, ...] = (), *, metavar: str | None = None, help: str = "",
                 is_flag: bool = False, envvar: str | None = None, path: bool = False) -> None:
        self.dest, self.flags, self.metavar, self.help = dest, flags, metavar, help
        self.is_flag, self.envvar, self.path = is_flag, envvar, path

    @property
    def is_argument(self) -> bool:
        return not self.flags


# in the order click lists them (the pool option is ``params.pool_option``'s: a test keeps them equal)
LS_PARAMS: tuple[Param, ...] = (
    Param("pool_path", ("-p", "--pool"), metavar="PATH", envvar=POOL_ENVVAR, path=True,
          help=f"Pool directory (default: ${POOL_ENVVAR})."),
    Param("target", metavar="[TARGET]"),
    Param("fields", ("-o", "--format"), metavar="FIELDS",
          help=f"Comma-separated fields: {LS_HELP_FIELDS}. Default: DEV,MAPPED,CREATE_TIME,SNAP_TIME."),
    Param("no_headers", ("--no-headers",), is_flag=True, help="No header line."),
    Param("metadata_snap", ("-m", "--metadata-snap"), is_flag=True, help="Read through the held metadata snapshot."),
    Param("as_json", ("--json",), is_flag=True, help="Print JSON instead of text."),
)


# --- what both entries share --------------------------------------------------------------------------------------
def metadata_file(target: str) -> str:
    """The metadata file of a tool's (non-empty) target: a pool directory's ``metadata``, or a bare file or device.

    Raises:
        PoolNotFound (nothing at ``target``, or a directory without ``metadata``).
    """
    if os.path.isdir(target):
        md = os.path.join(target, "metadata")
        if not os.path.exists(md):
            from thinpool.errors import PoolNotFound

            raise PoolNotFound(path=target)
        return md
    if not os.path.exists(target):
        from thinpool.errors import PoolNotFound

        raise PoolNotFound(path=target)
    return target


@contextmanager
def open_details(md_file: str, *, use_metadata_snap: bool = False) -> Iterator[Any]:
    """Open the metadata file ``md_file`` (``metadata_file(target)``) as a ``ReadOnlyMetadata`` view: the superblock
    and the device details only (what ``ls`` needs for its default fields; no space map, transaction manager or
    numpy)."""
    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.readonly import ReadOnlyMetadata

    store = FileBlockStore(md_file, readonly=True)
    try:
        yield ReadOnlyMetadata.open(store, use_metadata_snap=use_metadata_snap)
    finally:
        store.close()


def require_metadata_snap(md_file: str) -> None:
    """-m needs a held metadata snapshot (thin_check/thin_dump refuse otherwise): refuse the same way (``md_file``:
    ``metadata_file(target)``).

    Raises:
        InvalidArgument (no snapshot held), and what reading the superblock raises.
    """
    from thinpool.io.block_store import FileBlockStore
    from thinpool.metadata.readonly import read_superblock

    store = FileBlockStore(md_file, readonly=True)
    try:
        held = read_superblock(store).held_root
    finally:
        store.close()
    if not held:
        from thinpool.errors import InvalidArgument

        raise InvalidArgument(reason="no metadata snapshot is held (reserve one with `thinpool pool "
                                     "reserve-metadata-snap`, or drop -m)")


def json_text(obj: Any) -> str:
    """What ``output.echo_json`` prints (without its newline)."""
    import json

    return json.dumps(obj, indent=2, sort_keys=False)


def ls_details_text(md_file: str, chosen: Sequence[str], *, no_headers: bool, metadata_snap: bool,
                    as_json: bool) -> str:
    """``thinpool ls``'s whole output for fields the device details alone give (``not needs_mappings(chosen)``;
    ``chosen`` validated by ``check_fields``) from the metadata file ``md_file`` (``metadata_file(target)``),
    computed before anything is printed.

    Raises:
        ThinpoolError (corrupt metadata, -m without a held snapshot, ...), OSError.
    """
    from thinpool.tools.ls import ls_json, ls_rows, ls_text

    if metadata_snap:
        require_metadata_snap(md_file)
    with open_details(md_file, use_metadata_snap=metadata_snap) as view:
        rows = ls_rows(view, chosen)
    if as_json:
        return json_text(ls_json(rows, chosen)) + "\n"
    return ls_text(rows, chosen, headers=not no_headers)


def write_all(out: Any, text: str) -> None:
    """Write ``text`` to ``out`` (sys.stdout; None: no stdout at all, nothing printed) and flush. Through the
    binary buffer with its count checked: given more than its buffer, BufferedWriter.write returns the count of a
    short write (a reader gone while the pipe was full) and TextIOWrapper.write drops the rest silently; here the
    next write raises BrokenPipeError (exit 1, quietly).

    Raises:
        OSError (BrokenPipeError, ENOSPC, ...).
    """
    if out is None:
        return
    buf = getattr(out, "buffer", None)
    if buf is None or not text:
        if text:
            out.write(text)
        out.flush()
        return
    out.flush()
    with memoryview(text.encode(out.encoding, out.errors or "strict")) as view:
        while view:
            view = view[buf.write(view):]
    buf.flush()


# --- the fast path ------------------------------------------------------------------------------------------------
def parse_fast(args: Sequence[str], params: Sequence[Param] = LS_PARAMS) -> dict[str, Any] | None:
    """``args`` (after the command name) -> {dest: value} by ``params``, or None where click might differ (see the
    module docstring). Absent options are None (flags False); an absent option with an ``envvar`` takes its
    non-empty value."""
    by_flag = {f: p for p in params for f in p.flags}
    positional = [p for p in params if p.is_argument]
    values: dict[str, Any] = {p.dest: (False if p.is_flag else None) for p in params}
    given: set[str] = set()
    seen_args: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        if not tok:
            return None
        if tok[0] != "-":
            seen_args.append(tok)
            continue
        name, eq, inline = tok.partition("=") if tok.startswith("--") else (tok, "", "")
        p = by_flag.get(name)
        if p is None:
            return None
        if p.is_flag:
            if eq:
                return None
            values[p.dest] = True
            continue
        if eq:
            value = inline
        else:
            if i >= len(args) or args[i].startswith("-"):
                return None
            value = args[i]
            i += 1
        values[p.dest] = value
        given.add(p.dest)
    if len(seen_args) > len(positional):
        return None
    for p, v in zip(positional, seen_args):
        values[p.dest] = v
    for p in params:
        if p.envvar and p.dest not in given:
            values[p.dest] = os.environ.get(p.envvar) or None
        v = values[p.dest]
        if p.path and v is not None and not _path_ok(v):
            return None
    return values


def _path_ok(path: str) -> bool:
    """Whether click's ``Path(file_okay=True, dir_okay=True)`` takes ``path`` as it is (absent, or readable)."""
    try:
        os.stat(path)
    except OSError:
        return True
    except ValueError:
        return False
    return os.access(path, os.R_OK)


def run_fast(args: Sequence[str]) -> int | None:
    """``thinpool ls ARGS`` without click: the exit status, or None (nothing done, nothing printed) where the
    fast path is not certain, for the caller to run click."""
    values = parse_fast(args)
    if values is None:
        return None
    target = values["target"] or values["pool_path"]
    if not target:
        return None
    from thinpool.errors import InvalidArgument
    from thinpool.tools.ls import LS_DEFAULT, check_fields, needs_mappings

    fields = values["fields"]
    try:
        chosen = check_fields(fields.split(",")) if fields is not None else list(LS_DEFAULT)
    except InvalidArgument:
        return None
    if needs_mappings(chosen):  # the walks take far longer than click's start-up: its path shows their progress
        return None
    from thinpool_cli.main import report_failure

    try:
        text = ls_details_text(metadata_file(target), chosen, no_headers=values["no_headers"],
                               metadata_snap=values["metadata_snap"], as_json=values["as_json"])
        write_all(sys.stdout, text)
    except BaseException as e:  # noqa: B036  # report_failure re-raises what it does not map to an exit status
        return report_failure(e)
    return 0
