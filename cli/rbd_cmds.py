"""`thinpool export-diff | import-diff | export | import`: thin devices and snapshot deltas to and from Ceph RBD.

Layer: cli. May import: click, thinpool (the library only inside the commands).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import click

from thinpool_cli.output import echo_json, progress
from thinpool_cli.params import device_ref, json_option, open_pool, pool_option

MIN_BAR = 64 << 20  # bytes: smaller jobs get no progress bar


def _resolve(p: Any, ref: str) -> int:
    return int(p.find_device(device_ref(ref)))


@contextmanager
def _output(path: str, force: bool) -> Iterator[BinaryIO]:
    """stdout for ``-``; else a new file (refused if it exists without --force), removed again on failure."""
    if path == "-":
        yield sys.stdout.buffer
        sys.stdout.flush()
        return
    if os.path.exists(path) and not force:
        raise click.UsageError(f"{path} exists: use --force to overwrite it")
    try:
        with open(path, "wb") as f:
            yield f
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise


@contextmanager
def _input(path: str) -> Iterator[BinaryIO]:
    """A seekable binary file: FILE itself, or stdin spooled to a temporary file (the whole stream is validated
    before anything changes, so it must be readable twice)."""
    if path != "-":
        try:
            f = open(path, "rb")
        except OSError as e:
            raise click.UsageError(f"cannot open {path}: {e.strerror}") from None
        with f:
            yield f
        return
    with tempfile.TemporaryFile() as tmp:
        shutil.copyfileobj(sys.stdin.buffer, tmp, 1 << 20)
        tmp.seek(0)
        yield tmp


def _report(summary: dict[str, Any], as_json: bool, text: str, *, to_stderr: bool) -> None:
    if as_json:
        if to_stderr:
            import json

            click.echo(json.dumps(summary, indent=2, sort_keys=True), err=True)
        else:
            echo_json(summary)
    else:
        click.echo(text, err=True)


def _bar_cb(bar: Any) -> Callable[[int], None]:
    return lambda pos: bar.update(pos)


@click.command("export-diff")
@click.argument("ref", metavar="DEV")
@click.option("--from", "from_ref", metavar="SNAP", help="Only what differs from this older snapshot device.")
@click.option("-o", "--output", "out_path", default="-", show_default=True, metavar="FILE|-",
              help="Where the stream goes ('-' is stdout).")
@click.option("--no-to-snap", is_flag=True, help="Write no `t` record (rbd import-diff then takes no snapshot).")
@click.option("-f", "--force", is_flag=True, help="Overwrite FILE if it exists.")
@pool_option
@json_option
def export_diff(ref: str, from_ref: str | None, out_path: str, no_to_snap: bool, force: bool,
                pool_path: str | None, as_json: bool) -> None:
    """Write an rbd diff v1 stream of device DEV (what `rbd import-diff` applies): `t` is DEV's name, `f` the
    name of --from SNAP, `s` DEV's size; data as `w`, zeros and discarded chunks as `z`.

    With the stream on stdout the --json summary goes to stderr.

    Example: thinpool export-diff vol-snap2 --from vol-snap1 -o snap2.diff && rbd import-diff snap2.diff rbd/vol
    """
    from thinpool.rbd import export_diff as run

    with open_pool(pool_path, readonly=True) as p:
        dev = _resolve(p, ref)
        frm = _resolve(p, from_ref) if from_ref is not None else None
        size = p.device_size(dev)
        with _output(out_path, force) as out, progress(f"export-diff {p.device_name(dev)}", size,
                                                       min_total=MIN_BAR) as bar:
            s = run(p, dev, out, from_id=frm, to_snap=not no_to_snap, progress=_bar_cb(bar))
            out.flush()
    _report(s.to_dict(), as_json, f"exported {s.device}: {s.records} records, {s.data_bytes} bytes of data, "
                                  f"{s.zero_bytes} bytes of zeros, {s.bytes_written} bytes of stream",
            to_stderr=out_path == "-")


@click.command("import-diff")
@click.argument("path", metavar="FILE|-")
@click.argument("ref", metavar="DEV")
@click.option("--snap-prefix", default="", metavar="P",
              help="Prefix for snapshot device names (the from-snapshot is looked up as P+f, the new one is P+t).")
@pool_option
@json_option
def import_diff(path: str, ref: str, snap_prefix: str, pool_path: str | None, as_json: bool) -> None:
    """Apply an rbd diff v1 stream (from `rbd export-diff` or `thinpool export-diff`) to device DEV, as
    `rbd import-diff` does: resize to `s`, apply the records in order, then snapshot DEV as a new device named
    after `t`. The from-snapshot `f` must exist. The whole stream is checked first: a malformed or truncated one
    changes nothing and the error names the byte where it broke.

    Example: rbd export-diff --from-snap s1 rbd/vol@s2 - | thinpool import-diff - vol
    """
    from thinpool.rbd import import_diff as run

    with _input(path) as f, open_pool(pool_path) as p:
        dev = _resolve(p, ref)
        total = os.fstat(f.fileno()).st_size
        with progress(f"import-diff into {p.device_name(dev)}", total, min_total=MIN_BAR) as bar:
            s = run(p, dev, f, snap_prefix=snap_prefix, progress=_bar_cb(bar))
    snaps = ", ".join(f"{x['name']} (id {x['dev_id']})" for x in s.snapshots) or "none"
    _report(s.to_dict(), as_json, f"imported into {s.device}: {s.records} records, {s.bytes_written} bytes of "
                                  f"data; new snapshot: {snaps}", to_stderr=False)


@click.command("export")
@click.argument("ref", metavar="DEV")
@click.option("--export-format", type=click.Choice(["2"]), default="2", show_default=True,
              help="rbd's export format (2: the image with all its snapshots).")
@click.option("-o", "--output", "out_path", required=True, metavar="FILE|-", help="Where the stream goes.")
@click.option("--snap", "snaps", multiple=True, metavar="SNAP",
              help="Snapshot devices to include, oldest first (default: DEV's snapshots, from their origins).")
@click.option("-f", "--force", is_flag=True, help="Overwrite FILE if it exists.")
@pool_option
@json_option
def export_cmd(ref: str, export_format: str, out_path: str, snaps: tuple[str, ...], force: bool,
               pool_path: str | None, as_json: bool) -> None:
    """Write device DEV with its chain of snapshots as an rbd export-format 2 stream, which
    `rbd import --export-format 2` turns into an image with all those snapshots in one step.

    Example: thinpool export vol --export-format 2 -o vol.rbd2 && rbd import --export-format 2 vol.rbd2 rbd/vol
    """
    from thinpool.rbd import export_image

    with open_pool(pool_path, readonly=True) as p:
        dev = _resolve(p, ref)
        chain = [_resolve(p, s) for s in snaps] if snaps else None
        from thinpool.rbd import snapshot_chain

        size = sum(p.device_size(d) for d in (chain if chain is not None else snapshot_chain(p, dev)) + [dev])
        with _output(out_path, force) as out, progress(f"export {p.device_name(dev)}", size,
                                                       min_total=MIN_BAR) as bar:
            s = export_image(p, dev, out, snaps=chain, progress=_bar_cb(bar))
            out.flush()
    _report(s.to_dict(), as_json, f"exported {s.device} with {s.diffs - 1} snapshot(s): {s.records} records, "
                                  f"{s.bytes_written} bytes of stream", to_stderr=out_path == "-")


@click.command("import")
@click.argument("path", metavar="FILE|-")
@click.argument("name", metavar="[NAME]", required=False)
@click.option("--export-format", type=click.Choice(["2"]), default="2", show_default=True,
              help="rbd's export format (2: an image with all its snapshots).")
@click.option("--id", "dev_id", type=click.IntRange(0, (1 << 24) - 1), help="Device id (default: the next free).")
@click.option("--snap-prefix", default="", metavar="P", help="Prefix for the snapshot device names (P+t).")
@pool_option
@json_option
def import_cmd(path: str, name: str | None, export_format: str, dev_id: int | None, snap_prefix: str,
               pool_path: str | None, as_json: bool) -> None:
    """Create device NAME (default: FILE's name without its extension) with all its snapshots from an rbd
    export-format 2 stream (`rbd export --export-format 2`). The whole stream is checked first; a malformed one
    changes nothing.

    Example: rbd export --export-format 2 rbd/vol - | thinpool import --export-format 2 - vol
    """
    from thinpool.rbd import import_image

    if name is None:
        if path == "-":
            raise click.UsageError("NAME is required when the stream comes from stdin")
        name = os.path.splitext(os.path.basename(path))[0]
    with _input(path) as f, open_pool(pool_path) as p:
        total = os.fstat(f.fileno()).st_size
        with progress(f"import {name}", total, min_total=MIN_BAR) as bar:
            s = import_image(p, f, name, dev_id=dev_id, snap_prefix=snap_prefix, progress=_bar_cb(bar))
    _report(s.to_dict(), as_json, f"imported {s.device} (id {s.dev_id}) with {len(s.snapshots)} snapshot(s): "
                                  f"{s.records} records, {s.bytes_written} bytes of data", to_stderr=False)
