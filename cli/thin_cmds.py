"""`thinpool thin ...`: thin devices and snapshots, raw I/O, sparse import and export of images.

Layer: cli. May import: click, thinpool (the library only inside the commands).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import click

from thinpool_cli.output import echo_json, progress
from thinpool_cli.params import OFFSET, SECTOR_SIZE_PARAM, device_ref, json_option, open_pool, pool_option

IO_CHUNK = 1 << 20  # bytes per read/write call of the copy loops


class _ThinGroup(click.Group):
    """The `thin` group; `import` and `export` live in thin_image.py, imported only when one of them is used
    (or listed), so that `thin read`/`thin write` do not load it."""

    LAZY = ("import", "export")

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.LAZY))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.LAZY and cmd_name not in self.commands:
            from thinpool_cli import thin_image  # noqa: F401  (its decorators add the commands to this group)
        return super().get_command(ctx, cmd_name)


@click.group("thin", cls=_ThinGroup)
def thin() -> None:
    """Thin devices: create, snapshot, delete, read, write, import, export, flush.

    \b
    Examples:
      thinpool thin create 1 --size 1G --name vol
      thinpool thin write vol --offset 1M hello.txt
      thinpool thin snap 2 vol --name vol-snap
      thinpool thin export vol-snap vol-snap.img
    """


def _resolve(p: Any, ref: str) -> int:
    return int(p.find_device(device_ref(ref)))


@thin.command("create")
@click.argument("dev_id", metavar="ID", type=click.IntRange(0, (1 << 24) - 1))
@click.option("-s", "--size", type=SECTOR_SIZE_PARAM, required=True, help="Virtual size (a multiple of 512).")
@click.option("-n", "--name", help="A name to use instead of the id.")
@click.option("--origin", type=click.Path(exists=True, dir_okay=False),
              help="External origin: a read-only file that shows through unwritten chunks.")
@pool_option
@json_option
def thin_create(dev_id: int, size: int, name: str | None, origin: str | None, pool_path: str | None,
                as_json: bool) -> None:
    """Create thin device ID of --size bytes (nothing is allocated until written).

    Example: thinpool thin create 1 --size 1G --name vol
    """
    with open_pool(pool_path) as p:
        dev = p.create_thin(dev_id, size, name=name, origin=origin)
        if as_json:
            echo_json({"dev_id": dev_id, "name": dev.name, "size": size, "origin": origin})
        else:
            click.echo(f"created thin device {dev_id} ({dev.name}), {size} bytes")


@thin.command("snap")
@click.argument("dev_id", metavar="NEW", type=click.IntRange(0, (1 << 24) - 1))
@click.argument("origin", metavar="ORIGIN")
@click.option("-n", "--name", help="A name for the snapshot.")
@pool_option
@json_option
def thin_snap(dev_id: int, origin: str, name: str | None, pool_path: str | None, as_json: bool) -> None:
    """Snapshot device ORIGIN (id or name) as NEW: O(1), the chunks are shared until written.

    Example: thinpool thin snap 2 vol --name vol-snap
    """
    with open_pool(pool_path) as p:
        origin_id = _resolve(p, origin)
        dev = p.create_snap(dev_id, origin_id, name=name)
        if as_json:
            echo_json({"dev_id": dev_id, "name": dev.name, "origin_id": origin_id, "size": dev.size})
        else:
            click.echo(f"created snapshot {dev_id} ({dev.name}) of device {origin_id}")


@thin.command("delete")
@click.argument("ref", metavar="ID")
@click.option("-f", "--force", is_flag=True, help="Really delete (the device's data is lost).")
@pool_option
def thin_delete(ref: str, force: bool, pool_path: str | None) -> None:
    """Delete thin device ID (id or name); needs --force.

    Example: thinpool thin delete vol-snap --force
    """
    with open_pool(pool_path) as p:
        dev_id = _resolve(p, ref)
        if not force:
            raise click.UsageError(f"refusing to delete device {dev_id} without --force (its data would be lost)")
        p.delete_thin(dev_id)
        click.echo(f"deleted thin device {dev_id}")


@thin.command("list")
@pool_option
@json_option
def thin_list(pool_path: str | None, as_json: bool) -> None:
    """List the thin devices: id, name, size, mapped, highest mapped sector, snapshot origin, creation, external origin.

    A snapshot whose origin was deleted shows the origin's id in brackets, as lvs does.

    Example: thinpool thin list
    """
    from thinpool_cli.pool_cmds import device_rows, device_table

    with open_pool(pool_path, readonly=True, lock="none") as p:
        rows = device_rows(p)
    if as_json:
        echo_json(rows)
        return
    device_table(None, rows)


def _copy_in(dev: Any, src: BinaryIO, offset: int, limit: int | None, total: int) -> int:
    """Write ``src`` into ``dev`` at ``offset``; returns the bytes written."""
    written = 0
    with progress(f"writing device {dev.dev_id}", total, min_total=64 << 20) as bar:
        while limit is None or written < limit:
            want = IO_CHUNK if limit is None else min(IO_CHUNK, limit - written)
            buf = src.read(want)
            if not buf:
                break
            dev.write(offset + written, buf)
            written += len(buf)
            bar.advance(len(buf))
    return written


@thin.command("write")
@click.argument("ref", metavar="ID")
@click.argument("src", metavar="SRC|-", type=click.File("rb"), default="-")
@click.option("-o", "--offset", type=OFFSET, default="0", help="Byte offset in the device (sizes like 1M work).")
@pool_option
def thin_write(ref: str, src: BinaryIO, offset: int, pool_path: str | None) -> None:
    """Write the bytes of file SRC (or stdin, '-') into device ID at --offset.

    The whole write is checked before its first byte lands: it fits the device and the pool has the space (a pipe
    is first spooled to a temporary file). A failed write changes nothing.

    Example: echo hello | thinpool thin write vol --offset 4k -
    """
    from thinpool.errors import OutOfBounds

    with _sized(src) as (f, size), open_pool(pool_path) as p:
        dev = p.device(_resolve(p, ref))
        if offset > dev.size or offset + size > dev.size:
            raise OutOfBounds(offset=offset, length=size, size=dev.size)
        p.check_space(dev.dev_id, offset, size)
        n = _copy_in(dev, f, offset, size, size)
        if n != size:
            from thinpool.errors import StoreIOError

            raise StoreIOError(what=getattr(src, "name", "input"), op="read", reason=f"short read ({n} of {size})")
        p.commit()  # before saying so
        click.echo(f"wrote {n} bytes to device {dev.dev_id} at offset {offset}", err=True)


@contextmanager
def _sized(src: BinaryIO) -> Iterator[tuple[BinaryIO, int]]:
    """``src`` with its size known before writing: a regular file as it is, a pipe or terminal spooled to a
    temporary file first (memory up to 64 MiB, then disk)."""
    size = _regular_file_size(src)
    if size is not None:
        yield src, size - src.tell()
        return
    import shutil
    import tempfile

    with tempfile.SpooledTemporaryFile(max_size=64 << 20) as tmp:
        shutil.copyfileobj(src, tmp, IO_CHUNK)
        size = tmp.tell()
        tmp.seek(0)
        yield tmp, size  # type: ignore[misc]


def _regular_file_size(f: BinaryIO) -> int | None:
    """The size of ``f`` when it is a regular file (known before reading), else None (pipes, terminals)."""
    import stat

    try:
        st = os.fstat(f.fileno())
    except Exception:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


@thin.command("read")
@click.argument("ref", metavar="ID")
@click.option("-o", "--offset", type=OFFSET, default="0", help="Byte offset in the device.")
@click.option("-l", "--length", type=OFFSET, help="Bytes to read (default: to the end of the device).")
@click.option("--output", "out", type=click.File("wb"), default="-", help="Write here instead of stdout.")
@pool_option
def thin_read(ref: str, offset: int, length: int | None, out: BinaryIO, pool_path: str | None) -> None:
    """Read bytes of device ID to stdout (unwritten chunks read as zeros).

    Example: thinpool thin read vol --offset 4k --length 6
    """
    from thinpool.io.device import check_bounds

    with open_pool(pool_path, readonly=True) as p:
        dev = p.device(_resolve(p, ref))
        if length is None:
            length = max(0, dev.size - offset)
        check_bounds(dev.size, offset, length)
        if out.isatty() and length > 0:
            click.echo(f"thinpool: warning: writing {length} bytes of binary data to a terminal (use --output FILE "
                       "or a pipe)", err=True)
        _stream(dev, offset, length, out)


def _stream(dev: Any, offset: int, length: int, out: BinaryIO) -> None:
    pos = offset
    with progress(f"reading device {dev.dev_id}", length, min_total=64 << 20) as bar:
        while pos < offset + length:
            n = min(IO_CHUNK, offset + length - pos)
            out.write(dev.read(pos, n))
            pos += n
            bar.advance(n)
    out.flush()


@thin.command("flush")
@click.argument("ref", metavar="[ID]", required=False)
@pool_option
def thin_flush(ref: str | None, pool_path: str | None) -> None:
    """Commit the pool (data first, then metadata). Every command already commits when it finishes.

    Example: thinpool thin flush vol
    """
    with open_pool(pool_path) as p:
        if ref is not None:
            p.device(_resolve(p, ref)).flush()
        else:
            p.commit()
        click.echo(f"committed: transaction {p.transaction_id}, {p.status().used_data_blocks} chunks used", err=True)



@thin.command("resize")
@click.argument("ref", metavar="ID")
@click.option("-s", "--size", type=SECTOR_SIZE_PARAM, required=True, help="New virtual size (a multiple of 512).")
@click.option("-f", "--force", is_flag=True, help="Allow shrinking (what lies past the new end is discarded).")
@pool_option
def thin_resize(ref: str, size: int, force: bool, pool_path: str | None) -> None:
    """Grow or shrink device ID to --size, as lvextend / lvreduce (shrinking needs --force and unmaps every chunk
    past the new end; growing shows zeros).

    Example: thinpool thin resize vol --size 2G
    """
    with open_pool(pool_path) as p:
        dev_id = _resolve(p, ref)
        old = p.device_size(dev_id)
        if size < old and not force:
            raise click.UsageError(f"shrinking device {dev_id} from {old} to {size} bytes discards its data past "
                                   "the new end: use --force")
        p.resize_device(dev_id, size)
        click.echo(f"device {dev_id}: {old} -> {size} bytes", err=True)


@thin.command("rename")
@click.argument("ref", metavar="ID")
@click.argument("name", metavar="NEW_NAME")
@pool_option
def thin_rename(ref: str, name: str, pool_path: str | None) -> None:
    """Give device ID (id or name) the name NEW_NAME ('-' removes the name).

    Example: thinpool thin rename vol data
    """
    with open_pool(pool_path) as p:
        dev_id = _resolve(p, ref)
        p.rename_device(dev_id, None if name == "-" else name)
        click.echo(f"device {dev_id}: now {'unnamed' if name == '-' else repr(name)}", err=True)


@thin.command("discard")
@click.argument("ref", metavar="ID")
@click.option("-o", "--offset", type=OFFSET, default="0", help="Byte offset of the range.")
@click.option("-l", "--length", type=OFFSET, help="Bytes (default: to the end of the device).")
@pool_option
def thin_discard(ref: str, offset: int, length: int | None, pool_path: str | None) -> None:
    """Discard a byte range of device ID, as blkdiscard: the whole chunks inside it are unmapped (per the pool's
    discard mode; a partial chunk at either end is left alone, as dm-thin does).

    Example: thinpool thin discard vol --offset 1M --length 4M
    """
    from thinpool.io.device import check_bounds

    with open_pool(pool_path) as p:
        dev = p.device(_resolve(p, ref))
        if length is None:
            length = max(0, dev.size - offset)
        check_bounds(dev.size, offset, length)
        before = dev.status()[0]
        dev.discard(offset, length)
        p.commit()
        freed = (before - dev.status()[0]) * 512
        click.echo(f"discarded {freed} bytes of device {dev.dev_id} ({freed // dev.chunk} chunk(s) unmapped)",
                   err=True)


@thin.command("merge")
@click.argument("ref", metavar="SNAP")
@pool_option
def thin_merge(ref: str, pool_path: str | None) -> None:
    """Merge snapshot SNAP into the device it was taken of, as lvconvert --merge: the origin takes the
    snapshot's data and size, the snapshot goes away (one transaction, O(1) metadata work plus freeing the
    origin's old chunks).

    Example: thinpool thin merge vol-snap
    """
    with open_pool(pool_path) as p:
        snap_id = _resolve(p, ref)
        origin_id = p.merge_snapshot(snap_id)
        click.echo(f"merged snapshot {snap_id} into device {origin_id} ({p.device_name(origin_id)})", err=True)


@thin.command("rollback")
@click.argument("origin", metavar="ORIGIN")
@click.argument("snap", metavar="SNAP")
@pool_option
def thin_rollback(origin: str, snap: str, pool_path: str | None) -> None:
    """Roll device ORIGIN back to snapshot SNAP, as rbd snap rollback: ORIGIN becomes a copy of SNAP (sharing
    its chunks), SNAP stays.

    Example: thinpool thin rollback vol vol-snap
    """
    with open_pool(pool_path) as p:
        origin_id, snap_id = _resolve(p, origin), _resolve(p, snap)
        p.rollback_to_snapshot(origin_id, snap_id)
        click.echo(f"device {origin_id} rolled back to snapshot {snap_id}", err=True)


thin.add_command(thin_list, "ls")  # STYLE.md's name for it

