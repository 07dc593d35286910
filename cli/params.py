"""Shared click parameter types and option decorators (sizes, --pool, --json, targets of the metadata tools).

Layer: cli. May import: click, thinpool.errors, thinpool.units (kept light: ``thinpool --help`` imports this).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from thinpool.errors import InvalidArgument
from thinpool.units import SECTOR_SIZE, check_data_block_size, parse_size
from thinpool_cli.ls_fast import metadata_file

F = TypeVar("F", bound=Callable[..., Any])

POOL_ENVVAR = "THINPOOL_POOL"


class SizeParam(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2 on
    """An LVM-style size (``512``, ``64k``, ``10M``, ``10G``, ``1T``, ``128s`` sectors) in bytes.

    ``multiple_of`` rejects sizes that are not a multiple of it (e.g. 512 for device sizes); ``chunk`` validates a
    dm-thin chunk size (64 KiB..1 GiB in 64 KiB steps). Every rejection is a usage error naming the value.
    """

    name = "size"

    def __init__(self, *, multiple_of: int = 1, chunk: bool = False, allow_zero: bool = False) -> None:
        self.multiple_of = multiple_of
        self.chunk = chunk
        self.allow_zero = allow_zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            n = value
        else:
            try:
                n = parse_size(str(value))
            except InvalidArgument:
                self.fail(f"invalid size {value!r} (use e.g. 512, 64k, 10M, 10G, 1T, 128s)", param, ctx)
        if n == 0 and not self.allow_zero:
            self.fail(f"size {value!r} must be greater than zero", param, ctx)
        if self.chunk:
            try:
                check_data_block_size(n)
            except InvalidArgument:
                self.fail(f"chunk size {value!r} is invalid: must be 64KiB..1GiB in 64KiB steps", param, ctx)
        if n % self.multiple_of:
            what = "sectors (512 bytes)" if self.multiple_of == SECTOR_SIZE else f"{self.multiple_of} bytes"
            self.fail(f"size {value!r} ({n} bytes) is not a whole number of {what}", param, ctx)
        return n


SIZE = SizeParam()
SECTOR_SIZE_PARAM = SizeParam(multiple_of=SECTOR_SIZE)
OFFSET = SizeParam(allow_zero=True)
CHUNK_SIZE = SizeParam(chunk=True)


def pool_option(f: F) -> F:
    """``--pool PATH`` / ``-p``, defaulting to $THINPOOL_POOL."""
    return click.option("-p", "--pool", "pool_path", envvar=POOL_ENVVAR, metavar="PATH",
                        type=click.Path(file_okay=True, dir_okay=True),
                        help=f"Pool directory (default: ${POOL_ENVVAR}).")(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(f)


def require_pool(pool_path: str | None) -> str:
    """The pool directory from --pool / $THINPOOL_POOL, or a usage error."""
    if not pool_path:
        raise click.UsageError(f"no pool given: use --pool PATH or set {POOL_ENVVAR}")
    return pool_path


def is_target(arg: str) -> bool:
    """Whether a positional argument names an existing pool directory or metadata file rather than a device id,
    name or region: it must exist, and a bare number is always a device id (write ./7 for a file named 7)."""
    return not arg.isdigit() and os.path.exists(arg)


def metadata_path(target: str | None) -> str:
    """The metadata file of a tool's target: a pool directory (its ``metadata``) or a bare metadata file/device."""
    if not target:
        raise click.UsageError(f"no pool or metadata file given: pass TARGET, --pool PATH or set {POOL_ENVVAR}")
    return metadata_file(target)


def is_pool_dir(target: str) -> bool:
    return os.path.isdir(target) and os.path.exists(os.path.join(target, "metadata")) \
        and os.path.exists(os.path.join(target, "data"))


_REGION_RE = re.compile(r"^(\d+)\.\.(\d+)$")


def parse_region(text: str) -> tuple[int, int]:
    """A thin_rmap region ``begin..end`` (half-open, data blocks)."""
    m = _REGION_RE.match(text.strip())
    if not m:
        raise click.BadParameter(f"badly formed region {text!r} (use BEGIN..END, e.g. 0..100)")
    begin, end = int(m.group(1)), int(m.group(2))
    if end <= begin:
        raise click.BadParameter(f"badly formed region {text!r} (end <= begin)")
    return begin, end


@contextmanager
def open_pool(pool_path: str | None, *, readonly: bool = False, lock: str | None = None) -> Iterator[Any]:
    """Open the pool named by --pool / $THINPOOL_POOL (``lock``: see thinpool.pool; readers default to a shared
    lock, ``"none"`` peeks at the last commit). Success commits on close; a failure aborts the open transaction
    and closes without committing, so a refused command leaves the metadata file byte-identical (or, if it had
    overwritten committed data in place, fails the pool: needs_check, reported)."""
    from thinpool.errors import PoolLocked
    from thinpool.pool import Pool

    try:
        p = Pool.open(require_pool(pool_path), readonly=readonly, lock=lock)
    except PoolLocked:
        from thinpool.control import connect_if_served

        remote = connect_if_served(require_pool(pool_path))  # a running serve/mount holds it: it applies the command
        if remote is None:
            raise
        with remote:
            yield remote
        return
    with p:
        p.on_queue = _report_queue
        yield p


def _report_queue(pool: Any, need: int, timeout: float) -> None:
    """queue-if-no-space: say on stderr that the write waits, for how long and how to give it space."""
    wait = "until space is added" if timeout == 0 else f"up to {timeout:g} s"
    click.echo(f"thinpool: out of data space ({need} chunk(s) needed): the write waits {wait}; grow the pool "
               f"from another shell: thinpool pool resize --pool {pool.path} --size BIGGER", err=True)


def device_ref(text: str) -> int | str:
    """A device reference: an id (digits) or a name."""
    return int(text) if text.isdigit() else text
